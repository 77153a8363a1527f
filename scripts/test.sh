#!/usr/bin/env bash
# One command from a fresh machine to the full test suite: installs dependencies, builds
# everything (the CUDA backend too when nvcc exists), prepares the corpus and runs ctest.
# Tests labelled gpu are reported as skipped on machines without a GPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
scripts/build.sh
scripts/prepare_data.sh
cd build
ctest --output-on-failure -j2 --timeout 900 "$@"
