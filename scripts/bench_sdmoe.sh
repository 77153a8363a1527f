#!/usr/bin/env bash
# Benchmark: the cost of SD-MoE against plain MoE on the same model in one process (step
# time ratio with a refresh every T steps, the refresh's share, the per-step projection's
# share), exact against subspace-iteration refreshes (time, largest principal angle, energy
# held by the common parts), and asynchronous refreshes (the worker's time beside a step,
# the wait at the boundary).
# Needs the corpus (scripts/prepare_data.sh). Run on an otherwise idle machine.
#   scripts/bench_sdmoe.sh [--config configs/small-cpu.textproto] [--device CPU|CUDA|AUTO] [--rounds 4]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/build.sh --target sdmoe_spectral_bench >/dev/null
exec build/bin/sdmoe_spectral_bench "$@"
