#!/usr/bin/env bash
# Configures and builds sdmoe into build/ (Release). The CUDA backend is compiled
# whenever nvcc is found in /usr/local/cuda or on PATH.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
build="${SDMOE_BUILD_DIR:-$repo/build}"
cmake -S "$repo" -B "$build" -DCMAKE_BUILD_TYPE=Release ${SDMOE_CMAKE_ARGS:-} >/dev/null
cmake --build "$build" -j"$(nproc)" "$@"
