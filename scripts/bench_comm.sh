#!/usr/bin/env bash
# Communication benchmark: all-reduce, all-gather, reduce-scatter and all-to-all from 4 KiB
# to 64 MiB, and the MoE token dispatcher, over MPI on the CPU backend (time, algbw and
# busbw as nccl-tests defines them). Ranks may outnumber cores (--oversubscribe); the
# figures then measure processes time-sharing the cores, not the interconnect.
#   SDMOE_RANKS=4 scripts/bench_comm.sh [--tokens 1024] [--dim 192] [--experts 8] [--top-k 2] [--reps 9]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/build.sh --target sdmoe_comm_bench >/dev/null
# Containers run as root.
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
exec mpirun --oversubscribe --bind-to none -np "${SDMOE_RANKS:-2}" build/bin/sdmoe_comm_bench "$@"
