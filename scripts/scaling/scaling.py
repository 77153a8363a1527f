#!/usr/bin/python3
"""Weak- and strong-scaling experiments for sdmoe_pretrain.

  scaling.py run    --mode strong|weak --ranks 1,2,4,8 [--config C] [--steps N] [--global-batch B] [--out DIR]
                    [--launcher local|slurm] [--gpus-per-node G] [--expert-parallel] [--set field=value ...]
  scaling.py report DIR              table (DIR/scaling.md) and plot (DIR/scaling.png) from the runs' JSONL
  scaling.py model  [--config C] [--gpus 8,16,...,512] [--tokens-per-gpu-second R]
                                     communication cost model per step for data and expert parallelism

run, local: one mpirun per rank count, one after the other (--oversubscribe, so more
ranks than cores is allowed: such figures measure overheads, not speed-up). run, slurm:
one `sbatch scripts/slurm/sdmoe.sbatch` per count, with --nodes = ranks / gpus-per-node;
run `report` once the jobs are done. Strong scaling keeps the config's global batch;
weak scaling multiplies it by the rank count over the smallest one. Layout: data
parallel over all ranks, or with --expert-parallel ep = min(ranks, experts).
"""
import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


def config_number(path, field, default):
    """A scalar field of a protobuf text config, found by name (first occurrence)."""
    text = open(path).read()
    m = re.search(r"\b%s\s*:\s*([0-9.eE+-]+)" % re.escape(field), text)
    return float(m.group(1)) if m else default


def run_dir(out, ranks):
    return os.path.join(out, "ranks_%d" % ranks)


def cmd_run(args):
    ranks = sorted(int(r) for r in args.ranks.split(","))
    base_batch = args.global_batch or int(config_number(args.config, "global_batch_size", 8))
    micro = int(config_number(args.config, "micro_batch_size", 4))
    experts = int(config_number(args.config, "num_experts", 0))
    os.makedirs(args.out, exist_ok=True)
    manifest = {"mode": args.mode, "config": args.config, "steps": args.steps, "launcher": args.launcher,
                "cores": os.cpu_count() if args.launcher == "local" else 0, "runs": []}
    for n in ranks:
        batch = base_batch * n // ranks[0] if args.mode == "weak" else base_batch
        if batch % (micro * n) != 0:
            sys.exit(f"scaling.py: global batch {batch} is not a multiple of micro_batch_size {micro} x {n} ranks")
        directory = run_dir(args.out, n)
        os.makedirs(directory, exist_ok=True)
        jsonl = os.path.join(directory, "metrics.jsonl")
        if os.path.exists(jsonl):
            os.remove(jsonl)
        sets = ["training.steps=%d" % args.steps, "training.eval_interval=0", "training.log_interval=1",
                "training.global_batch_size=%d" % batch, "metrics.jsonl=" + os.path.abspath(jsonl)]
        if args.expert_parallel and experts > 0:
            sets.append("parallel.ep=%d" % math.gcd(n, experts))
        sets += args.set
        program = [os.path.join(REPO, "build", "bin", "sdmoe_pretrain"), "--config", args.config]
        for s in sets:
            program += ["--set", s]
        if args.launcher == "local":
            command = ["mpirun", "--oversubscribe", "--bind-to", "none", "-np", str(n)]
            if os.geteuid() == 0:
                command.append("--allow-run-as-root")
            print("scaling.py: %d rank(s), global batch %d" % (n, batch), flush=True)
            with open(os.path.join(directory, "log.txt"), "w") as log:
                rc = subprocess.call(command + program, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
            if rc != 0:
                sys.exit(f"scaling.py: the {n}-rank run failed (exit {rc}); see {directory}/log.txt")
        else:
            nodes = max(1, n // args.gpus_per_node)
            env = dict(os.environ, CONFIG=os.path.abspath(args.config), RUN_DIR=os.path.abspath(directory))
            submit = ["sbatch", "--parsable", "--nodes=%d" % nodes, "--ntasks-per-node=%d" % min(n, args.gpus_per_node),
                      "--gpus-per-node=%d" % min(n, args.gpus_per_node),
                      os.path.join(REPO, "scripts", "slurm", "sdmoe.sbatch")] + program[3:]
            job = subprocess.check_output(submit, env=env, cwd=REPO).decode().strip()
            print("scaling.py: %d rank(s) on %d node(s): job %s" % (n, nodes, job))
        manifest["runs"].append({"ranks": n, "global_batch": batch, "dir": os.path.relpath(directory, args.out)})
    with open(os.path.join(args.out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
    if args.launcher == "local":
        cmd_report(argparse.Namespace(dir=args.out))


def read_jsonl(path):
    by_step = {}
    for line in open(path):
        if line.strip():
            r = json.loads(line)
            by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def cmd_report(args):
    manifest = json.load(open(os.path.join(args.dir, "manifest.json")))
    rows = []
    for run in manifest["runs"]:
        records = read_jsonl(os.path.join(args.dir, run["dir"], "metrics.jsonl"))
        steady = records[2:] if len(records) > 4 else records  # the first steps warm caches up
        tps = statistics.median(r["tokens_per_second"] for r in steady)
        sent = {}
        for r in steady:
            for group, b in r.get("bytes_sent", {}).items():
                sent.setdefault(group, []).append(b)
        rows.append({"ranks": run["ranks"], "global_batch": run["global_batch"], "tps": tps,
                     "loss": records[-1]["loss"],
                     "sent": {g: statistics.median(v) for g, v in sent.items()}})
    base = rows[0]
    # Local runs share one machine's C cores (each rank gets C / ranks threads), so their
    # ideal speed-up is 1: the second efficiency is against that and shows the parallel
    # overheads; the first is against linear scaling.
    cores = manifest.get("cores", 0)
    lines = ["| ranks | global batch | tokens/s (median) | speed-up | efficiency | efficiency on %s (ideal speed-up 1) | "
             "MB sent per step by rank 0 |" % ("the same %d cores" % cores if cores else "the hardware"),
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        speedup = r["tps"] / base["tps"]
        efficiency = speedup / (r["ranks"] / base["ranks"])
        hardware = speedup if cores else efficiency
        r["efficiency"], r["hardware_efficiency"] = efficiency, hardware
        sent = ", ".join("%s %.2f" % (g, b / 1e6) for g, b in sorted(r["sent"].items())) or "-"
        lines.append("| %d | %d | %.0f | %.2f | %.2f | %.2f | %s |" % (r["ranks"], r["global_batch"], r["tps"], speedup,
                                                                      efficiency, hardware, sent))
    table = "\n".join(lines)
    title = "%s scaling, %s, %d steps (%s)" % (manifest["mode"], os.path.basename(manifest["config"]), manifest["steps"],
                                               manifest["launcher"])
    with open(os.path.join(args.dir, "scaling.md"), "w") as f:
        f.write("%s\n\n%s\n" % (title, table))
    print(title)
    print(table)
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    ranks = [r["ranks"] for r in rows]
    left.plot(ranks, [r["tps"] for r in rows], "o-", label="measured")
    left.plot(ranks, [base["tps"] * n / base["ranks"] for n in ranks], "--", label="linear")
    if cores:
        left.axhline(base["tps"], linestyle=":", color="gray", label="all %d cores, 1 rank" % cores)
    left.set_xscale("log", base=2)
    left.set_xlabel("ranks")
    left.set_ylabel("tokens/s")
    left.legend()
    right.plot(ranks, [r["efficiency"] for r in rows], "o-", label="against linear scaling")
    if cores:
        right.plot(ranks, [r["hardware_efficiency"] for r in rows], "s-", label="against the same %d cores" % cores)
    right.legend()
    right.set_xscale("log", base=2)
    right.set_ylim(0, 1.1)
    right.set_xlabel("ranks")
    right.set_ylabel("scaling efficiency")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(os.path.join(args.dir, "scaling.png"), dpi=120)


def cmd_model(args):
    """Per-step communication of data + expert parallelism on GPUs, from the config's shapes.

    Layout: ep = min(gpus, experts, gpus_per_node) inside a node; dp over the rest; tp 1.
    Bytes per GPU per step (fp32 gradients and activations, 4 bytes):
      gradient all-reduce (ring): 2 (p - 1) / p x parameter bytes, dense parameters over dp
        and expert parameters over expert-dp = gpus / ep;
      token all-to-all: per MoE layer and micro-batch, 4 exchanges (dispatch and combine,
        forward and backward) of tokens x top_k x dim x 4 bytes x (ep - 1) / ep.
    Time: bytes / bandwidth, NVLink inside a node and the network between nodes. Compute
    time per step: tokens per GPU / the measured single-GPU rate. Efficiency without
    overlap: compute / (compute + communication); with the gradient reduction overlapped
    with the backward (bucketed, as the trainer does on GPU): compute / (max(compute,
    all-reduce) + all-to-all).
    """
    c = args.config
    dim = int(config_number(c, "dim", 768))
    layers = int(config_number(c, "layers", 12))
    vocab = int(config_number(c, "vocab_size", 50304))
    ffn = int(config_number(c, "ffn_dim", 3072))
    experts = int(config_number(c, "num_experts", 8))
    top_k = int(config_number(c, "top_k", 2))
    expert_ffn = int(config_number(c, "expert_ffn_dim", 768))
    shared_ffn = int(config_number(c, "shared_expert_ffn_dim", 0))
    seq = int(config_number(c, "seq_len", 1024))
    micro = int(config_number(c, "micro_batch_size", 8))
    first_dense = int(config_number(c, "first_dense_layers", 0))
    moe_layers = max(0, layers - first_dense) if experts > 0 else 0
    attention = 4 * dim * dim
    dense_params = vocab * dim + layers * attention + (layers - moe_layers) * 3 * dim * ffn \
        + moe_layers * (experts * dim + 3 * dim * shared_ffn)
    expert_params = moe_layers * experts * 3 * dim * expert_ffn
    tokens = micro * seq  # per GPU per step (one micro-batch)
    compute = tokens / args.tokens_per_gpu_second
    lines = ["| GPUs | nodes | ep x expert-dp (dense dp) | all-reduce MB | all-to-all MB | all-reduce ms | all-to-all ms | "
             "compute ms | efficiency, no overlap | efficiency, all-reduce overlapped |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for gpus in [int(g) for g in args.gpus.split(",")]:
        nodes = max(1, gpus // args.gpus_per_node)
        ep = min(gpus, experts, args.gpus_per_node) if experts > 0 else 1
        dp, edp = gpus, gpus // ep
        ring = lambda p: 2.0 * (p - 1) / p if p > 1 else 0.0
        reduce_bytes = 4 * (dense_params * ring(dp) + expert_params / ep * ring(edp))
        a2a_bytes = moe_layers * 4 * tokens * top_k * dim * 4 * (ep - 1) / ep
        inter = nodes > 1
        reduce_s = reduce_bytes / ((args.network_gbs if inter else args.nvlink_gbs) * 1e9)
        a2a_s = a2a_bytes / (args.nvlink_gbs * 1e9)  # ep stays inside a node
        plain = compute / (compute + reduce_s + a2a_s)
        overlapped = compute / (max(compute, reduce_s) + a2a_s)
        lines.append("| %d | %d | %d x %d (%d) | %.0f | %.0f | %.1f | %.1f | %.1f | %.2f | %.2f |" % (
            gpus, nodes, ep, edp, dp, reduce_bytes / 1e6, a2a_bytes / 1e6, 1e3 * reduce_s, 1e3 * a2a_s, 1e3 * compute,
            plain, overlapped))
    print("model %s: %.1fM dense + %.1fM expert parameters, %d tokens per GPU per step; %.0f tokens/s per GPU; "
          "NVLink %.0f GB/s, network %.0f GB/s per GPU" % (os.path.basename(c), dense_params / 1e6,
                                                          expert_params / 1e6, tokens, args.tokens_per_gpu_second,
                                                          args.nvlink_gbs, args.network_gbs))
    print("\n".join(lines))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--mode", choices=["strong", "weak"], required=True)
    r.add_argument("--ranks", default="1,2,4,8")
    r.add_argument("--config", default=os.path.join(REPO, "configs", "tiny.textproto"))
    r.add_argument("--steps", type=int, default=12)
    r.add_argument("--global-batch", type=int, default=0,
                   help="global batch of the smallest run (default: the config's)")
    r.add_argument("--out", default="scaling")
    r.add_argument("--launcher", choices=["local", "slurm"], default="local")
    r.add_argument("--gpus-per-node", type=int, default=8)
    r.add_argument("--expert-parallel", action="store_true")
    r.add_argument("--set", action="append", default=[], help="extra sdmoe_pretrain --set field=value")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    m = sub.add_parser("model")
    m.add_argument("--config", default=os.path.join(REPO, "configs", "gpt2-124m-moe.textproto"))
    m.add_argument("--gpus", default="8,16,32,64,128,256,512")
    m.add_argument("--gpus-per-node", type=int, default=8)
    m.add_argument("--tokens-per-gpu-second", type=float, default=32934.0,
                   help="measured single-GPU training rate (H100, gpt2-124m-moe, docs/performance.md)")
    m.add_argument("--nvlink-gbs", type=float, default=300.0, help="per-GPU bus bandwidth inside a node, GB/s")
    m.add_argument("--network-gbs", type=float, default=50.0, help="per-GPU network bandwidth between nodes, GB/s")
    args = p.parse_args()
    {"run": cmd_run, "report": cmd_report, "model": cmd_model}[args.command](args)


if __name__ == "__main__":
    main()
