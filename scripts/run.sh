#!/usr/bin/env bash
# One command from a fresh machine to a training run: installs dependencies, builds,
# prepares the default corpus and pretrains configs/small-cpu.textproto under mpirun.
#   scripts/run.sh [CONFIG] [extra sdmoe_pretrain arguments...]
#   SDMOE_RANKS=2 scripts/run.sh      (data-parallel ranks under mpirun, default 1)
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
scripts/build.sh --target sdmoe_pretrain sdmoe_preprocess
scripts/prepare_data.sh
config="${1:-configs/small-cpu.textproto}"
shift || true
ranks="${SDMOE_RANKS:-1}"
mpi_root=(); [ "$(id -u)" -eq 0 ] && mpi_root=(--allow-run-as-root)
exec mpirun "${mpi_root[@]}" --oversubscribe -np "$ranks" --bind-to none \
  build/bin/sdmoe_pretrain --config "$config" "$@"
