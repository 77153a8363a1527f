#!/usr/bin/python3
"""The SD-MoE study: plain MoE against SD-MoE, at the config's learning rate and at larger
ones, over several seeds, on the real corpus and at equal tokens (docs/results.md).

  sdmoe_study.py run    [--out DIR] [--config C] [--steps N] [--eval-interval N] [--seeds N (5)]
                        [--arms plain,sdmoe] [--lr-factors 1,4] [--np R] [--threads T]
                        [--set field=value ...] [--quick]
  sdmoe_study.py report DIR [--results FILE]

run: one sdmoe_pretrain per (arm, learning-rate factor, seed), one after the other, each
in DIR/runs/ARM_lrFx_seedI/ (log, metrics JSONL, checkpoints every eval interval). It
resumes where it stopped: a finished run (its summary.json exists) is skipped, and an
unfinished one restarts from its latest checkpoint (sdmoe_pretrain resumes from
checkpoint.dir/latest by itself). When a run ends, the inter-expert overlap of its expert
weights is computed from each of its checkpoints (numpy, from the HDF5 files, not from
sdmoe's code) and the checkpoints are deleted.
report: tables and PNG plots from DIR into FILE (default DIR/results.md): validation loss
(mean and spread over seeds), the tokens each arm needs to reach plain MoE's final
validation loss, weight overlap over time, expert load balance, divergence and throughput.

Arms (our reading of the paper; docs/sdmoe.md):
  plain   sdmoe.enabled=false
  sdmoe   SD-MoE as configured (the config's sdmoe block)
A learning-rate factor f scales optimizer.lr and optimizer.min_lr by f. Seed i sets
training.seed = 42 + 1000 i and data.seed = 1234 + 1000 i: both the initialisation and the
sample order change between seeds, and every arm sees the same ones.

--quick: the tiny config, 20 steps, 1 seed, learning-rate factor 1 (a ctest).
"""
import argparse
import glob
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
ARMS = {
    "plain": ["sdmoe.enabled=false"],
    "sdmoe": ["sdmoe.enabled=true"],
}


def config_number(path, field, default):
    """A scalar field of a protobuf text config, found by name (first occurrence)."""
    m = re.search(r"\b%s\s*:\s*([0-9.eE+-]+)" % re.escape(field), open(path).read())
    return float(m.group(1)) if m else default


def seeds(i):
    return 42 + 1000 * i, 1234 + 1000 * i


def run_name(arm, factor, seed):
    return "%s_lr%gx_seed%d" % (arm, factor, seed)


def plan(args):
    """Every run of the matrix, with its command line."""
    config = os.path.join(REPO, args.config) if not os.path.isabs(args.config) else args.config
    lr = config_number(config, "lr", 1e-3)
    min_lr = config_number(config, "min_lr", 0.0)
    runs = []
    for factor in args.lr_factors:
        for i in range(args.seeds):
            for arm in args.arms:
                name = run_name(arm, factor, i)
                d = os.path.join(args.out, "runs", name)
                train_seed, data_seed = seeds(i)
                sets = ARMS[arm] + [
                    "training.steps=%d" % args.steps,
                    "training.eval_interval=%d" % args.eval_interval,
                    "training.log_interval=%d" % args.eval_interval,
                    "optimizer.lr=%.6g" % (lr * factor),
                    "optimizer.min_lr=%.6g" % (min_lr * factor),
                    "training.seed=%d" % train_seed,
                    "data.seed=%d" % data_seed,
                    "threads=%d" % args.threads,
                    "metrics.jsonl=%s" % os.path.join(d, "metrics.jsonl"),
                    "checkpoint.dir=%s" % os.path.join(d, "checkpoints"),
                    "checkpoint.interval=%d" % args.eval_interval,
                    "checkpoint.keep=0",
                ] + args.set
                cmd = [os.path.join(REPO, "build", "bin", "sdmoe_pretrain"), "--config", config]
                for s in sets:
                    cmd += ["--set", s]
                if args.np > 1:
                    cmd = ["mpirun", "-np", str(args.np), "--bind-to", "none"] + cmd
                runs.append({"name": name, "dir": d, "arm": arm, "lr_factor": factor, "seed": i,
                             "training_seed": train_seed, "data_seed": data_seed, "cmd": cmd})
    return runs


def records(path):
    """The JSONL's records by step; a resumed run appends, so the last record of a step wins."""
    by_step = {}
    if os.path.exists(path):
        for line in open(path):
            line = line.strip()
            if line:
                r = json.loads(line)
                by_step[r["step"]] = r
    return [by_step[s] for s in sorted(by_step)]


def overlap(stack, k):
    """Mean over ordered expert pairs i != j of |A_i^T A_j|_F^2 / k, for the top-k left and
    right singular vectors of each expert matrix in `stack` [E, m, n] (docs/sdmoe.md)."""
    import numpy as np
    lefts, rights = [], []
    for w in stack:
        u, _, vt = np.linalg.svd(np.asarray(w, dtype=np.float64), full_matrices=False)
        lefts.append(u[:, :k])
        rights.append(vt[:k].T)
    e = len(stack)
    result = []
    for bases in (lefts, rights):
        total = sum(float(np.sum((bases[i].T @ bases[j]) ** 2)) / k for i in range(e) for j in range(e) if i != j)
        result.append(total / (e * (e - 1)))
    return result


def checkpoint_overlaps(ckpt_dir, k):
    """{step: {matrix: [left, right] averaged over MoE layers}} from every checkpoint."""
    import h5py
    out = {}
    for d in sorted(glob.glob(os.path.join(ckpt_dir, "step_*"))):
        path = os.path.join(d, "checkpoint.h5")
        if not os.path.exists(path):
            continue
        step = int(os.path.basename(d)[5:])
        per = {"gate": [], "up": [], "down": []}
        with h5py.File(path, "r") as f:
            layers = sorted({int(m.group(1)) for m in (re.match(r"layers\.(\d+)\.moe\.experts\.gate_up$", n)
                                                       for n in f["params"].keys()) if m})
            for layer in layers:
                gate_up = f["params/layers.%d.moe.experts.gate_up" % layer][()]  # [E, 2, F, D]
                down = f["params/layers.%d.moe.experts.down" % layer][()]        # [E, D, F]
                per["gate"].append(overlap(gate_up[:, 0], k))
                per["up"].append(overlap(gate_up[:, 1], k))
                per["down"].append(overlap(down, k))
        out[step] = {m: [statistics.mean(v[0] for v in vals), statistics.mean(v[1] for v in vals)]
                     for m, vals in per.items() if vals}
    return out


def summarise(run, seconds, exit_code, rank):
    recs = records(os.path.join(run["dir"], "metrics.jsonl"))
    val = [(r["step"], r["val_loss"]) for r in recs if r.get("val_loss") is not None]
    losses = [r["loss"] for r in recs]
    finite = all(isinstance(x, (int, float)) and math.isfinite(x) for x in losses)
    diverged = exit_code != 0 or not finite or (len(val) >= 2 and not val[-1][1] < val[0][1])
    steady = recs[min(5, len(recs)):] or recs
    return {
        "name": run["name"], "arm": run["arm"], "lr_factor": run["lr_factor"], "seed": run["seed"],
        "training_seed": run["training_seed"], "data_seed": run["data_seed"], "exit_code": exit_code,
        "wall_seconds": seconds, "steps": recs[-1]["step"] if recs else 0,
        "val_loss": val, "diverged": diverged,
        "tokens_per_second": statistics.mean(r["tokens_per_second"] for r in steady) if steady else None,
        "max_load": statistics.mean(statistics.mean(r["max_load"]) for r in steady if r["max_load"]) if steady else None,
        "min_load": statistics.mean(statistics.mean(r["min_load"]) for r in steady if r["min_load"]) if steady else None,
        "overlap": checkpoint_overlaps(os.path.join(run["dir"], "checkpoints"), rank),
        "command": " ".join(run["cmd"]),
    }


def cmd_run(args):
    if args.quick:
        args.config, args.steps, args.eval_interval, args.seeds = "configs/tiny.textproto", 20, 10, 1
        args.lr_factors = [1.0]
        args.set = args.set + ["training.eval_batches=2"]
    runs = plan(args)
    os.makedirs(args.out, exist_ok=True)
    json.dump({"argv": sys.argv[1:], "runs": [r["name"] for r in runs]}, open(os.path.join(args.out, "study.json"), "w"),
              indent=1)
    skipped = 0
    for i, run in enumerate(runs):
        summary_path = os.path.join(run["dir"], "summary.json")
        if os.path.exists(summary_path):
            skipped += 1
            continue
        os.makedirs(run["dir"], exist_ok=True)
        print("[%d/%d] %s" % (i + 1, len(runs), run["name"]), flush=True)
        start = time.time()
        with open(os.path.join(run["dir"], "log.txt"), "a") as log:
            code = subprocess.call(run["cmd"], stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
        if code < 0 or code in (130, 143):  # interrupted: leave it unfinished, to resume
            sys.exit("sdmoe_study: %s interrupted (exit %d); run again to resume" % (run["name"], code))
        summary = summarise(run, time.time() - start, code, args.rank)
        json.dump(summary, open(summary_path, "w"), indent=1)
        shutil.rmtree(os.path.join(run["dir"], "checkpoints"), ignore_errors=True)
        print("  exit %d, %d steps, final validation loss %s%s" % (
            code, summary["steps"], "%.4f" % summary["val_loss"][-1][1] if summary["val_loss"] else "-",
            ", diverged" if summary["diverged"] else ""), flush=True)
    print("sdmoe_study: %d run(s) done, %d skipped (finished before)" % (len(runs) - skipped, skipped))


# ---- report ------------------------------------------------------------------------------

def spread(values):
    """mean, sample standard deviation, min, max (std 0 for one value)."""
    values = list(values)
    return (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0, min(values), max(values))


def fmt(values, digits=3):
    if not values:
        return "-"
    m, s, lo, hi = spread(values)
    if len(values) == 1:
        return "%.*f" % (digits, m)
    return "%.*f ± %.*f (%.*f to %.*f)" % (digits, m, digits, s, digits, lo, digits, hi)


def tokens_to_reach(val, target, tokens_per_step):
    """Tokens at which the validation curve first reaches `target` (linear between evals)."""
    prev = None
    for step, loss in val:
        if loss <= target:
            if prev is None:
                return step * tokens_per_step
            (s0, l0) = prev
            frac = (l0 - target) / (l0 - loss) if l0 != loss else 1.0
            return (s0 + frac * (step - s0)) * tokens_per_step
        prev = (step, loss)
    return None


def cmd_report(args):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    study = json.load(open(os.path.join(args.dir, "study.json")))
    summaries = []
    for name in study["runs"]:
        p = os.path.join(args.dir, "runs", name, "summary.json")
        if os.path.exists(p):
            summaries.append(json.load(open(p)))
    if not summaries:
        sys.exit("sdmoe_study: no finished runs in %s" % args.dir)
    results = args.results or os.path.join(args.dir, "results.md")
    image_dir = os.path.splitext(results)[0]
    os.makedirs(image_dir, exist_ok=True)
    rel = os.path.relpath(image_dir, os.path.dirname(os.path.abspath(results)))

    def save(fig, name, alt):
        fig.tight_layout()
        fig.savefig(os.path.join(image_dir, name), dpi=110)
        plt.close(fig)
        return ["![%s](%s/%s)" % (alt, rel, name), ""]
    first_cmd = summaries[0]["command"]
    config = re.search(r"--config (\S+)", first_cmd).group(1)
    m = re.search(r"--set training\.steps=(\d+)", first_cmd)
    batch = config_number(config, "global_batch_size", 1) * config_number(config, "seq_len", 1)
    arms = [a for a in ARMS if any(s["arm"] == a for s in summaries)]
    factors = sorted({s["lr_factor"] for s in summaries})
    group = lambda a, f: [s for s in summaries if s["arm"] == a and s["lr_factor"] == f]

    lines = ["# SD-MoE study", "",
             "Written by `scripts/study/sdmoe_study.py report` from the runs of `%s`." % " ".join(
                 ["scripts/study/sdmoe_study.py"] + study["argv"]), "",
             "Config `%s`, %s steps of %d tokens; seeds: training.seed = 42 + 1000 i, data.seed = 1234 + 1000 i "
             "for i = 0 .. %d. Values are mean ± sample standard deviation (min to max) over the seeds." % (
                 os.path.relpath(config, REPO), m.group(1) if m else "?", batch,
                 max(s["seed"] for s in summaries)), "",
             "The %d runs took %.0f minutes of wall time in all, one after the other." % (
                 len(summaries), sum(s["wall_seconds"] for s in summaries) / 60), "",
             "One run's command (the others differ in the arm, learning rate and seeds):", "", "```",
             re.sub(r"\s+--set", " \\\n  --set", first_cmd.replace(REPO + "/", "")), "```", ""]

    lines += ["## Validation loss", "",
              "The seeds are shared by the arms, so the difference to plain MoE is also given per seed (paired): "
              "the spread between seeds moves both arms alike.", "",
              "| lr factor | arm | seeds | final validation loss | minus plain MoE's, same seed | diverged | "
              "tokens to reach plain MoE's final loss |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for f in factors:
        plain = [s for s in group("plain", f) if s["val_loss"]]
        target = statistics.mean(s["val_loss"][-1][1] for s in plain) if plain else None
        for a in arms:
            runs = group(a, f)
            finals = [s["val_loss"][-1][1] for s in runs if s["val_loss"] and not s["diverged"]]
            reach = [tokens_to_reach(s["val_loss"], target, batch) for s in runs if s["val_loss"]] if target else []
            reached = [r / 1e6 for r in reach if r is not None]
            plain_final = {s["seed"]: s["val_loss"][-1][1] for s in plain if not s["diverged"]}
            paired = [s["val_loss"][-1][1] - plain_final[s["seed"]] for s in runs
                      if s["val_loss"] and not s["diverged"] and s["seed"] in plain_final]
            lines.append("| %gx | %s | %d | %s | %s | %d of %d | %s |" % (
                f, a, len(runs), fmt(finals), fmt(paired) if a != "plain" else "-",
                sum(s["diverged"] for s in runs), len(runs),
                ("%s M (%d of %d runs reach it)" % (fmt(reached, 2), len(reached), len(reach)) if reached
                 else "no run reaches it") if reach else "-"))
    lines.append("")
    for f in factors:
        plain_final = {s["seed"]: s["val_loss"][-1][1] for s in group("plain", f) if s["val_loss"] and not s["diverged"]}
        for a in arms:
            if a == "plain":
                continue
            paired = [s["val_loss"][-1][1] - plain_final[s["seed"]] for s in group(a, f)
                      if s["val_loss"] and not s["diverged"] and s["seed"] in plain_final]
            if len(paired) < 2:
                continue
            m, sd, lo, hi = spread(paired)
            verdict = ("behind plain MoE on every seed" if lo > 0 else "ahead of plain MoE on every seed" if hi < 0
                       else "ahead on some seeds and behind on others")
            lines.append("- At %gx the learning rate, %s ends %+.3f nats against plain MoE (mean of %d paired seeds, "
                         "%+.3f to %+.3f): %s." % (f, a, m, len(paired), lo, hi, verdict))
    lines.append("")

    fig, axes = plt.subplots(1, len(factors), figsize=(6 * len(factors), 4), squeeze=False)
    for ax, f in zip(axes[0], factors):
        for a in arms:
            runs = [s for s in group(a, f) if s["val_loss"]]
            if not runs:
                continue
            steps = sorted({st for s in runs for st, _ in s["val_loss"]})
            mean, lo, hi, xs = [], [], [], []
            for st in steps:
                v = [l for s in runs for st2, l in s["val_loss"] if st2 == st and math.isfinite(l)]
                if v:
                    xs.append(st * batch / 1e6)
                    mean.append(statistics.mean(v))
                    lo.append(min(v))
                    hi.append(max(v))
            ax.plot(xs, mean, label="%s (%d seeds)" % (a, len(runs)))
            ax.fill_between(xs, lo, hi, alpha=0.2)
        ax.set_title("learning rate x%g" % f)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("validation loss")
        ax.legend()
    lines += save(fig, "validation_loss.png", "validation loss: mean over seeds, band from min to max")

    lines += ["## Inter-expert overlap of the weights", "",
              "Mean over ordered expert pairs of |U_i^T U_j|_F^2 / k (k = %d) for the top-k left (U) and right (V) "
              "singular vectors of each expert matrix, averaged over the MoE layers; computed with numpy from the "
              "checkpoints (random subspaces give about k / dimension). At the last checkpoint:" % args.rank, "",
              "| lr factor | arm | gate U / V | up U / V | down U / V |", "| --- | --- | --- | --- | --- |"]
    for f in factors:
        for a in arms:
            runs = [s for s in group(a, f) if s["overlap"]]
            cells = []
            for mat in ("gate", "up", "down"):
                last = [s["overlap"][max(s["overlap"], key=int)].get(mat) for s in runs]
                last = [x for x in last if x]
                cells.append("%s / %s" % (fmt([x[0] for x in last]), fmt([x[1] for x in last])) if last else "-")
            lines.append("| %gx | %s | %s |" % (f, a, " | ".join(cells)))
    lines.append("")
    fig, ax = plt.subplots(figsize=(6, 4))
    for f in factors:
        for a in arms:
            runs = [s for s in group(a, f) if s["overlap"]]
            steps = sorted({int(st) for s in runs for st in s["overlap"]})
            ys = []
            for st in steps:
                v = [statistics.mean(x[0] for x in s["overlap"][str(st)].values()) for s in runs if str(st) in s["overlap"]]
                ys.append(statistics.mean(v))
            if steps:
                ax.plot([st * batch / 1e6 for st in steps], ys, marker="o", label="%s, lr x%g" % (a, f))
    ax.set_xlabel("tokens (M)")
    ax.set_ylabel("left overlap, mean of gate, up, down")
    ax.legend()
    lines += save(fig, "overlap.png", "weight overlap over training")

    lines += ["## Load balance and throughput", "",
              "Expert shares of routed rows (1/E is balanced), mean over steps after the fifth and over MoE "
              "layers; tokens/s over the same steps, measured one run at a time on the same machine.", "",
              "| lr factor | arm | smallest share | largest share | tokens/s | relative to plain |",
              "| --- | --- | --- | --- | --- | --- |"]
    for f in factors:
        base = [s["tokens_per_second"] for s in group("plain", f) if s["tokens_per_second"]]
        for a in arms:
            runs = group(a, f)
            tps = [s["tokens_per_second"] for s in runs if s["tokens_per_second"]]
            lines.append("| %gx | %s | %s | %s | %s | %s |" % (
                f, a, fmt([s["min_load"] for s in runs if s["min_load"] is not None]),
                fmt([s["max_load"] for s in runs if s["max_load"] is not None]), fmt(tps, 0),
                "%.3f" % (statistics.mean(tps) / statistics.mean(base)) if tps and base else "-"))
    lines.append("")
    open(results, "w").write("\n".join(lines))
    print("sdmoe_study: wrote %s and %s/" % (results, image_dir))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run")
    r.add_argument("--out", default=os.path.join(REPO, "study"))
    r.add_argument("--config", default="configs/small-cpu.textproto")
    r.add_argument("--steps", type=int, default=300)
    r.add_argument("--eval-interval", type=int, default=50)
    r.add_argument("--seeds", type=int, default=5)
    r.add_argument("--arms", type=lambda s: s.split(","), default=["plain", "sdmoe"])
    r.add_argument("--lr-factors", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 4.0])
    r.add_argument("--np", type=int, default=1)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--rank", type=int, default=8, help="k of the weight overlap (the config's sdmoe.rank)")
    r.add_argument("--set", action="append", default=[])
    r.add_argument("--quick", action="store_true")
    rep = sub.add_parser("report")
    rep.add_argument("dir")
    rep.add_argument("--results")
    rep.add_argument("--rank", type=int, default=8)
    args = p.parse_args()
    if args.command == "run":
        unknown = [a for a in args.arms if a not in ARMS]
        if unknown:
            p.error("unknown arm(s) %s (arms: %s)" % (",".join(unknown), ",".join(ARMS)))
        if args.steps < 1 or args.eval_interval < 1 or args.seeds < 1:
            p.error("--steps, --eval-interval and --seeds must be positive")
        args.out = os.path.abspath(args.out)
        cmd_run(args)
    else:
        cmd_report(args)


if __name__ == "__main__":
    main()
