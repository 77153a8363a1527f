#!/usr/bin/env bash
# One command from a fresh machine to the full test suite: installs dependencies, builds
# everything (the CUDA backend too when nvcc exists), prepares the corpus, runs ctest, and
# then a smoke run of every fuzz target (its regression inputs, and 10 s of fuzzing each;
# only without arguments, which otherwise go to ctest).
# Tests labelled gpu are reported as skipped on machines without a GPU.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
scripts/setup.sh
scripts/build.sh
scripts/prepare_data.sh
cd build
ctest --output-on-failure -j2 --timeout 900 "$@"
# The fuzz smoke run belongs to the full suite, not to a selection of tests (arguments).
if [ $# -eq 0 ]; then
  cd "$repo"
  JOBS=2 scripts/fuzz.sh --smoke
fi
