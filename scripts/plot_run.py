#!/usr/bin/python3
"""Plots of one training run from its metrics JSONL (metrics.jsonl in the config).

usage: scripts/plot_run.py RUN.jsonl [OUT_DIR]

Writes into OUT_DIR (default: next to the JSONL file):
  loss.png                 training loss per step and validation loss where measured
  throughput.png           tokens/s and model FLOP/s as a percentage of the measured peak
  step_time.png            rank 0's step time per step, stacked by phase (forward and
                           backward, optimizer, SD-MoE refresh)
  expert_load_layerL.png   each expert's share of routed rows over time, per MoE layer
  spectral_overlap.png     SD-MoE inter-expert overlap of the bases over time (runs with SD-MoE)

A resumed run appends to the same file, so a step may appear more than once: the last
record of each step wins.
"""
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402


def read_records(path):
    by_step = {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                sys.exit(f"plot_run.py: {path}:{number}: not JSON ({e.msg})")
            if "step" not in record:
                sys.exit(f"plot_run.py: {path}:{number}: record without a step")
            by_step[record["step"]] = record
    if not by_step:
        sys.exit(f"plot_run.py: {path}: no records")
    return [by_step[s] for s in sorted(by_step)]


def series(records, key):
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def plot_loss(records, out):
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(*series(records, "loss"), label="training loss", linewidth=1)
    steps, val = series(records, "val_loss")
    if steps:
        ax.plot(steps, val, "o-", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_throughput(records, out):
    fig, ax = plt.subplots(figsize=(7, 4))
    steps, tps = series(records, "tokens_per_second")
    ax.plot(steps, tps, linewidth=1, color="tab:blue")
    ax.set_xlabel("step")
    ax.set_ylabel("tokens/s", color="tab:blue")
    right = ax.twinx()
    steps, peak = series(records, "peak_fraction")
    right.plot(steps, [100 * p for p in peak], linewidth=1, color="tab:orange")
    right.set_ylabel("model FLOP/s, % of measured peak", color="tab:orange")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def plot_step_time(records, out):
    phases = [("forward_backward_seconds", "forward + backward"), ("optimizer_seconds", "optimizer"),
              ("refresh_seconds", "SD-MoE refresh")]
    timed = [r for r in records if all(r.get(key) is not None for key, _ in phases)]
    if not timed:  # files written before the phases were recorded
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.stackplot([r["step"] for r in timed], *[[r[key] for r in timed] for key, _ in phases],
                 labels=[label for _, label in phases], step="mid")
    ax.set_xlabel("step")
    ax.set_ylabel("seconds (rank 0)")
    ax.legend(fontsize="small", loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def plot_expert_load(records, out_dir):
    with_load = [r for r in records if r.get("expert_load")]
    if not with_load:
        return []
    written = []
    for layer in range(len(with_load[0]["expert_load"])):
        rows = [r["expert_load"][layer] for r in with_load]
        grid = list(map(list, zip(*rows)))  # [expert][time]
        fig, ax = plt.subplots(figsize=(8, 3 + 0.15 * len(grid)))
        image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis",
                          extent=(with_load[0]["step"] - 0.5, with_load[-1]["step"] + 0.5, len(grid) - 0.5, -0.5))
        ax.set_xlabel("step")
        ax.set_ylabel("expert")
        ax.set_title(f"MoE layer {layer}: share of routed rows")
        fig.colorbar(image, ax=ax)
        fig.tight_layout()
        path = os.path.join(out_dir, f"expert_load_layer{layer}.png")
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    return written


def plot_spectral(records, out):
    refreshes = [r for r in records if r.get("spectral")]
    if not refreshes:
        return False
    fig, ax = plt.subplots(figsize=(7, 4))
    keys = sorted({(m["layer"], m["matrix"]) for r in refreshes for m in r["spectral"]})
    for layer, matrix in keys:
        steps, values = [], []
        for r in refreshes:
            for m in r["spectral"]:
                if (m["layer"], m["matrix"]) == (layer, matrix) and m["overlap_left"] is not None:
                    steps.append(r["step"])
                    values.append(0.5 * (m["overlap_left"] + m["overlap_right"]))
        ax.plot(steps, values, "o-", markersize=3, linewidth=1, label=f"layer {layer} {matrix}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean inter-expert overlap (U and V)")
    ax.legend(fontsize="small", ncol=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return True


def main():
    if len(sys.argv) not in (2, 3) or sys.argv[1] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if len(sys.argv) == 2 else 2)
    path = sys.argv[1]
    out_dir = sys.argv[2] if len(sys.argv) == 3 else os.path.dirname(os.path.abspath(path))
    os.makedirs(out_dir, exist_ok=True)
    records = read_records(path)
    written = [os.path.join(out_dir, "loss.png"), os.path.join(out_dir, "throughput.png")]
    plot_loss(records, written[0])
    plot_throughput(records, written[1])
    step_time = os.path.join(out_dir, "step_time.png")
    if plot_step_time(records, step_time):
        written.append(step_time)
    written += plot_expert_load(records, out_dir)
    spectral = os.path.join(out_dir, "spectral_overlap.png")
    if plot_spectral(records, spectral):
        written.append(spectral)
    for w in written:
        print(w)


if __name__ == "__main__":
    main()
