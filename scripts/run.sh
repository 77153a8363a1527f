#!/usr/bin/env bash
# One command from a fresh machine to a training run: installs dependencies, builds,
# prepares the default corpus and pretrains configs/small-cpu.textproto under mpirun.
#   scripts/run.sh [CONFIG] [extra sdmoe_pretrain arguments...]
# By default 4 ranks under mpirun split the model every way at once: tensor parallel over
# pairs of ranks (tp 2), experts over pairs (ep 2), and data parallel over the rest
# (dp 2). SDMOE_RANKS=N runs N plain data-parallel ranks instead (SDMOE_RANKS=1: one
# process using every core, the fastest choice on a 2-core machine).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
scripts/build.sh --target sdmoe_pretrain sdmoe_preprocess
scripts/prepare_data.sh
config="${1:-configs/small-cpu.textproto}"
shift || true
ranks="${SDMOE_RANKS:-4}"
layout=()
[ -z "${SDMOE_RANKS:-}" ] && layout=(--set parallel.tp=2 --set parallel.ep=2)
mpi_root=(); [ "$(id -u)" -eq 0 ] && mpi_root=(--allow-run-as-root)
exec mpirun "${mpi_root[@]}" --oversubscribe -np "$ranks" --bind-to none \
  build/bin/sdmoe_pretrain --config "$config" "${layout[@]}" "$@"
