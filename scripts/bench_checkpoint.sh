#!/usr/bin/env bash
# Checkpoint save and load bandwidth, the parallel writer against the gather to rank 0, at
# 1, 2 and 4 ranks (expert parallel over the ranks), on the GPU config's model (385.5M
# parameters, a 4.6 GB checkpoint) run on the CPU with short sequences so that the one
# training step before the save is quick. Prints one row per (ranks, writer): the file's
# size, the save time of the first run and the load time of the resumed one, as printed by
# sdmoe_pretrain, and their bandwidths.
#   scripts/bench_checkpoint.sh [DIR]      DIR: where the checkpoints go (default: a temporary directory)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
bin="${SDMOE_BIN:-build/bin}"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
work="${1:-$(mktemp -d)}"
mkdir -p "$work"
common=(--config configs/gpt2-124m-moe.textproto --set device=CPU --set threads=1 --set model.seq_len=64
        --set training.micro_batch_size=1 --set training.eval_interval=0 --set training.log_interval=1
        --set checkpoint.keep=1)
printf '%5s %-8s %9s %8s %10s %8s %10s\n' ranks writer "size GB" "save s" "save GB/s" "load s" "load GB/s"
for np in 1 2 4; do
  for writer in GATHER PARALLEL; do
    dir="$work/np$np-$writer"
    rm -rf "$dir"
    run=(mpirun -np "$np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep="$np"
         --set training.global_batch_size="$np" --set checkpoint.writer="$writer" --set checkpoint.dir="$dir")
    "${run[@]}" --set training.steps=1 > "$dir.save.log" 2>&1 || { tail -5 "$dir.save.log"; exit 1; }
    bytes=$(stat -c %s "$dir/step_00000001/checkpoint.h5")
    "${run[@]}" --set training.steps=2 --resume > "$dir.load.log" 2>&1 || { tail -5 "$dir.load.log"; exit 1; }
    save=$(sed -n 's/^checkpoint .*step_00000001 written (\([0-9.]*\) s)$/\1/p' "$dir.save.log")
    load=$(sed -n 's/^resumed from .* (\([0-9.]*\) s)$/\1/p' "$dir.load.log")
    awk -v np="$np" -v w="$writer" -v b="$bytes" -v s="$save" -v l="$load" \
      'BEGIN { printf "%5d %-8s %9.2f %8.2f %10.2f %8.2f %10.2f\n", np, w, b / 1e9, s, b / 1e9 / s, l, b / 1e9 / l }'
    rm -rf "$dir"
  done
done
