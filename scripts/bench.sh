#!/usr/bin/env bash
# Benchmark: measured fp32 FMA peak, GEMM GFLOP/s on the model's shapes and training step
# throughput, as percentages of that peak, on the device the config names (or --device).
# Run on an otherwise idle machine.
#   scripts/bench.sh [--config configs/small-cpu.textproto] [--device CPU|CUDA|AUTO] [--steps 7]
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/build.sh --target sdmoe_bench >/dev/null
exec build/bin/sdmoe_bench "$@"
