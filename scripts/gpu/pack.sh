#!/usr/bin/env bash
# Packs what the GPU checks (scripts/gpu/check.sh) need on a GPU machine that lacks the
# MPI/HDF5/protobuf runtime, into the git-ignored folder .gpu/ of the repository:
#
#   .gpu/bin/      sdmoe_pretrain, sdmoe_bench, the GPU and MPI test binaries, and Open
#                  MPI's launcher (mpirun, orted, ompi_info)
#   .gpu/lib/      every shared library those need that is not glibc, libstdc++/libgcc_s,
#                  the CUDA toolkit (cudart, cuBLAS, cuSOLVER, cuSPARSE, nvJitLink, NCCL:
#                  hundreds of MB, and present wherever PyTorch for CUDA is) or the driver
#   .gpu/lib/compat/  libstdc++ and libgcc_s, used only where the machine's own are older
#   .gpu/openmpi/  Open MPI's components, help texts and MCA defaults, relocated
#   .gpu/pmix/     PMIx's components and help texts, relocated
#   .gpu/data/     the tokenized corpus and tokenizer of configs/gpt2-124m-moe.textproto
#   .gpu/env.sh    sourced before running anything from the pack
#   .gpu/pack.tar.xz  all of the above in one archive: the one path to take along to the GPU
#                  machine, where check.sh unpacks it
#
# Run after scripts/build.sh, from anywhere:  scripts/gpu/pack.sh [--no-verify]
# The verification at the end runs the packed binaries here, from a scrubbed environment,
# with the system's copies of every packed library, Open MPI's installation and ssh hidden
# (a private mount namespace; needs root): what the GPU machine looks like.
# SDMOE_PACK_KEEP=1 keeps its logs.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
build="${SDMOE_BUILD_DIR:-$repo/build}"
config="$repo/configs/gpt2-124m-moe.textproto"
pack="$repo/.gpu"
verify=1
[ "${1:-}" = "--no-verify" ] && verify=0
cd "$repo"

[ -x "$build/bin/sdmoe_pretrain" ] || { echo "pack: $build/bin/sdmoe_pretrain missing; run scripts/build.sh" >&2; exit 1; }

# The pack is carried beside the tracked files, never committed; .gitignore belongs to the
# project, so the rule goes into this clone's own exclude file.
exclude="$(git rev-parse --git-path info/exclude)"
mkdir -p "$(dirname "$exclude")"
grep -qxF '/.gpu/' "$exclude" 2>/dev/null || echo '/.gpu/' >>"$exclude"

rm -rf "$pack"
mkdir -p "$pack"/{bin,lib/compat,data} "$pack"/openmpi/{lib,share,etc} "$pack"/pmix/{lib,share}

# ---- binaries --------------------------------------------------------------------------
for f in "$build"/bin/sdmoe_pretrain "$build"/bin/sdmoe_bench "$build"/tests/gpu/test_cuda_* \
         "$build"/tests/layout/test_layout_invariance "$build"/tests/parallel/test_collectives; do
  if [ -f "$f" ] && [ -x "$f" ]; then cp "$f" "$pack/bin/"; fi
done
# Open MPI's launcher as installed (Debian: mpirun -> alternatives -> orterun).
mpirun_real="$(readlink -f "$(command -v mpirun)")"
mpi_bindir="$(dirname "$mpirun_real")"
cp "$mpirun_real" "$pack/bin/mpirun"
for tool in orted ompi_info; do
  [ -x "$mpi_bindir/$tool" ] && cp "$mpi_bindir/$tool" "$pack/bin/"
done

# ---- Open MPI and PMIx data ------------------------------------------------------------
ompi_path() { ompi_info --parsable --path "$1" | sed -n "s/^path:$1://p"; }
ompi_pkglibdir="$(ompi_path pkglibdir)"
ompi_pkgdatadir="$(ompi_path pkgdatadir)"
ompi_sysconfdir="$(ompi_path sysconfdir)"
# Components for one node over shared memory. Those for fabrics (UCX, libfabric, verbs,
# PSM) and for OpenSHMEM would drag in their libraries and have nothing to drive there.
mkdir -p "$pack/openmpi/lib/openmpi3"
skipped_components=()
for so in "$ompi_pkglibdir"/*.so; do
  if objdump -p "$so" | awk '/NEEDED/{print $2}' |
      grep -qE '^lib(ucp|uct|ucs|ucm|fabric|ibverbs|rdmacm|psm|psm2|psm_infinipath|infinipath|oshmem|mca_common_(ucx|ofi|verbs)|nl-)'; then
    skipped_components+=("$(basename "$so" .so)")
    continue
  fi
  cp "$so" "$pack/openmpi/lib/openmpi3/"
done
cp -r "$ompi_pkgdatadir" "$pack/openmpi/share/"
cp "$ompi_sysconfdir"/openmpi-mca-params.conf "$ompi_sysconfdir"/openmpi-default-hostfile "$pack/openmpi/etc/" 2>/dev/null || true

# Debian's Open MPI talks to an external PMIx, which loads its own components.
pmix_lib="$(ldd "$pack/openmpi/lib/openmpi3/"mca_pmix_ext*.so 2>/dev/null | awk '$1 ~ /^libpmix\.so/ && !found {print $3; found = 1}')"
if [ -n "$pmix_lib" ]; then
  pmix_prefix="$(dirname "$(dirname "$(readlink -f "$pmix_lib")")")"  # .../pmix2 (lib/libpmix.so.2)
  [ -d "$pmix_prefix/lib/pmix" ] && cp -r "$pmix_prefix/lib/pmix" "$pack/pmix/lib/"
  [ -d "$pmix_prefix/share" ] && cp -r "$pmix_prefix/share/." "$pack/pmix/share/"
fi

# ---- shared libraries ------------------------------------------------------------------
# Left to the GPU machine: glibc, the C++ runtime, the CUDA toolkit and the driver.
system_lib='^(linux-vdso|ld-linux|libc|libm|libdl|libpthread|librt|libresolv|libutil|libanl|libmvec|libnsl|libnss_[a-z]+|libstdc\+\+|libgcc_s|libcuda|libnvidia-[a-z-]+|libcudart|libcublas|libcublasLt|libcusolver|libcusolverMg|libcusparse|libcufft|libcurand|libnvJitLink|libnvrtc|libnccl)\.so'
elves=("$pack"/bin/* "$pack"/openmpi/lib/openmpi3/*.so)
[ -d "$pack/pmix/lib/pmix" ] && elves+=("$pack"/pmix/lib/pmix/*.so)
missing=0
while read -r name path; do
  [[ "$name" =~ $system_lib ]] && continue
  case "$path" in
    "not") echo "pack: $name: not found by ldd" >&2; missing=1; continue ;;
    /usr/local/cuda*) continue ;;
  esac
  [ -e "$pack/lib/$name" ] || cp -L "$path" "$pack/lib/$name"
done < <(for e in "${elves[@]}"; do ldd "$e" 2>/dev/null; done | awk '$2 == "=>" {print $1, $3}' | sort -u)
[ "$missing" = 0 ] || { echo "pack: unresolved libraries above; the build machine lacks them" >&2; exit 1; }
# The C++ runtime the binaries were linked with, in case the GPU machine's is older.
for name in libstdc++.so.6 libgcc_s.so.1; do
  cp -L "$(ldd "$pack/bin/sdmoe_pretrain" | awk -v n="$name" '$1 == n {print $3}')" "$pack/lib/compat/$name"
done
# Symbols only cost bytes here; nothing in the pack is debugged.
if command -v strip >/dev/null; then
  find "$pack/bin" "$pack/lib" "$pack/openmpi/lib" "$pack/pmix/lib" -type f \( -perm -u+x -o -name '*.so*' \) \
    -exec strip --strip-unneeded {} + 2>/dev/null || true
fi

# ---- data --------------------------------------------------------------------------------
textproto_value() { sed -n "s/^[[:space:]]*$1:[[:space:]]*\"\(.*\)\".*/\1/p" "$config" | head -1; }
data_path="$(textproto_value path)"
tokenizer_dir="$(textproto_value tokenizer_dir)"
[ -f "$data_path" ] || scripts/prepare_data.sh
cp "$data_path" "$pack/data/corpus.h5"
mkdir -p "$pack/data/tokenizer"
cp "$tokenizer_dir"/encoder.json "$tokenizer_dir"/vocab.bpe "$pack/data/tokenizer/"

# ---- environment ---------------------------------------------------------------------------
cat >"$pack/env.sh" <<'EOF'
# Environment for the packed sdmoe binaries and Open MPI (written by scripts/gpu/pack.sh).
# Source it with bash: every path follows from this file's location.
GPU_PACK="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GPU_PACK
export PATH="$GPU_PACK/bin:$PATH"
export LD_LIBRARY_PATH="$GPU_PACK/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
# Open MPI was configured for /usr: each of its directories is moved into the pack (it
# reads OPAL_<DIR> for every one), and the component search path named outright.
export OPAL_PREFIX="$GPU_PACK/openmpi" OPAL_EXEC_PREFIX="$GPU_PACK/openmpi"
export OPAL_BINDIR="$GPU_PACK/bin" OPAL_LIBDIR="$GPU_PACK/lib"
export OPAL_PKGLIBDIR="$GPU_PACK/openmpi/lib/openmpi3"
export OPAL_DATAROOTDIR="$GPU_PACK/openmpi/share" OPAL_DATADIR="$GPU_PACK/openmpi/share"
export OPAL_PKGDATADIR="$GPU_PACK/openmpi/share/openmpi" OPAL_SYSCONFDIR="$GPU_PACK/openmpi/etc"
export OMPI_MCA_mca_base_component_path="$OPAL_PKGLIBDIR"
export PMIX_PREFIX="$GPU_PACK/pmix" PMIX_PKGLIBDIR="$GPU_PACK/pmix/lib/pmix"
export PMIX_DATAROOTDIR="$GPU_PACK/pmix/share" PMIX_DATADIR="$GPU_PACK/pmix/share"
export PMIX_PKGDATADIR="$GPU_PACK/pmix/share/pmix" PMIX_SYSCONFDIR="$GPU_PACK/pmix/share"
export PMIX_MCA_mca_base_component_path="$PMIX_PKGLIBDIR"
# One node: launch without ssh, talk over shared memory only, and copy through it rather
# than with cross-memory attach, which sandboxed kernels may refuse.
export OMPI_MCA_plm=isolated OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader
export OMPI_MCA_btl_vader_single_copy_mechanism=none
export OMPI_MCA_rmaps_base_oversubscribe=1 OMPI_MCA_hwloc_base_binding_policy=none
# The components left out on purpose should not be reported missing.
export OMPI_MCA_mca_base_component_show_load_errors=0
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
# The machine's own C++ runtime unless it is older than the one the binaries need.
if LD_LIBRARY_PATH="$GPU_PACK/lib" ldd "$GPU_PACK/bin/sdmoe_pretrain" 2>&1 | grep -q 'version .\(GLIBCXX\|CXXABI\|GCC\)_'; then
  export LD_LIBRARY_PATH="$GPU_PACK/lib/compat:$LD_LIBRARY_PATH"
fi
EOF

du_mib() { du -sm --apparent-size "$@" | awk '{s += $1} END {print s}'; }
packed_bins=("$pack"/bin/*) packed_libs=("$pack"/lib/*.so*) packed_components=("$pack"/openmpi/lib/openmpi3/*.so)
echo "pack: ${#packed_bins[@]} binaries, ${#packed_libs[@]} libraries, ${#packed_components[@]} Open MPI components"
[ "${#skipped_components[@]}" -gt 0 ] && echo "pack: left out (fabric/OpenSHMEM): ${skipped_components[*]}"
for d in bin lib openmpi pmix data; do printf 'pack:   %-8s %4s MiB\n' "$d" "$(du_mib "$pack/$d")"; done

# What travels is one xz archive of all this: OpenBLAS (all CPU kernels) and ICU's data
# alone are 65 MiB uncompressed, and the working tree that travels is limited to 64 MiB.
archive() {
  tar -C "$pack" -cf - env.sh bin lib openmpi pmix data | xz -T0 -6 >"$pack/pack.tar.xz.tmp"
  mv "$pack/pack.tar.xz.tmp" "$pack/pack.tar.xz"
  local mib repo_mib
  mib="$(awk '{printf "%.1f", $1 / 1048576}' < <(stat -c %s "$pack/pack.tar.xz"))"
  repo_mib="$(git ls-files -z | xargs -0 du -cm --apparent-size 2>/dev/null | tail -1 | cut -f1)"
  echo "pack: .gpu unpacked $(du_mib "$pack/env.sh" "$pack/bin" "$pack/lib" "$pack/openmpi" "$pack/pmix" "$pack/data") MiB;" \
    "carried: .gpu/pack.tar.xz ${mib} MiB, plus ${repo_mib} MiB of tracked files (the limit is 64 MiB together)"
  awk -v m="$mib" 'BEGIN {exit !(m < 60)}' || { echo "pack: .gpu/pack.tar.xz is over 60 MiB" >&2; exit 1; }
}
[ "$verify" = 1 ] || { archive; exit 0; }

# ---- verification ------------------------------------------------------------------------
# 1. Every library of every packed ELF resolves into the pack, or to what the GPU machine
#    provides itself.
echo "verify: library resolution under the pack's environment"
bad=0
for e in "${elves[@]}"; do
  while read -r name arrow path _; do
    [ "$arrow" = "=>" ] || continue
    case "$path" in "$pack"/*) continue ;; esac
    [[ "$name" =~ $system_lib ]] && continue
    echo "  $(basename "$e"): $name => $path" >&2
    bad=1
  done < <(env -i PATH=/usr/bin:/bin bash -c ". '$pack/env.sh'; ldd '$e'" 2>&1)
done
if [ "$bad" = 0 ]; then echo "  ok: all resolve into .gpu/ or to glibc/libstdc++/CUDA"; else echo "verify: FAILED" >&2; exit 1; fi

# 2. Run the packed programs with the system's copy of every packed library, Open MPI's
#    installation and ssh hidden (bind-mounted over in a private mount namespace), from a
#    scrubbed environment.
if ! unshare -m true 2>/dev/null; then
  echo "verify: no private mount namespace here (needs root); skipped the run checks"
  exit 0
fi
scratch="$(mktemp -d)"
if [ -n "${SDMOE_PACK_KEEP:-}" ]; then echo "verify: logs kept in $scratch"; else trap 'rm -rf "$scratch"' EXIT; fi
mkdir -p "$scratch/empty" "$scratch/home"
# inner.sh ENV REPO CMDFILE: hides the system's copies, then runs CMDFILE from a scrubbed
# environment with only the pack's env.sh sourced.
{
  echo 'set -e'
  ldcache="$(ldconfig -p)"
  for l in "$pack"/lib/*.so*; do
    sys="$(awk -v n="$(basename "$l")" '$1 == n && !found {print $NF; found = 1}' <<<"$ldcache")"
    [ -n "$sys" ] && echo "mount --bind /dev/null '$(readlink -f "$sys")'"
  done
  for d in "$ompi_pkglibdir" "$ompi_pkgdatadir" "$ompi_sysconfdir" "${pmix_prefix:-}"; do
    [ -n "$d" ] && [ -d "$d" ] && echo "mount --bind '$scratch/empty' '$d'"
  done
  for b in "$mpirun_real" "$mpi_bindir/orted" "$mpi_bindir/ompi_info" "$(command -v ssh || true)"; do
    [ -n "$b" ] && [ -e "$b" ] && echo "mount --bind /dev/null '$(readlink -f "$b")'"
  done
  echo "exec env -i PATH=/usr/bin:/bin HOME='$scratch/home' TMPDIR='$scratch/home' \\"
  echo '  bash -c '"'"'. "$1"; cd "$2"; . "$3"'"'"' verify "$1" "$2" "$3"'
} >"$scratch/inner.sh"
run_hidden() {  # run_hidden LOG COMMAND: COMMAND (one string) under the pack alone
  printf '%s\n' "$2" >"$scratch/$1.cmd"
  unshare -m bash "$scratch/inner.sh" "$pack/env.sh" "$repo" "$scratch/$1.cmd" >"$scratch/$1" 2>&1
}
check() {  # check NAME LOG COMMAND
  if run_hidden "$2" "$3"; then echo "  ok: $1"; else
    echo "  FAILED: $1 (exit $?); its output:" >&2
    tail -30 "$scratch/$2" >&2
    bad=1
  fi
}
echo "verify: runs with the system's Open MPI and libraries hidden"
if run_hidden probe.log 'test ! -s /usr/bin/orterun && ! ldd /usr/lib/x86_64-linux-gnu/libfmt.so.9'; then
  echo "  ok: system copies hidden"
else
  echo "  note: could not confirm the hiding:"; cat "$scratch/probe.log"
fi
check "mpirun --version" mpirun_version.log 'mpirun --version'
check "ompi_info finds the packed components" ompi_info.log \
  'ompi_info --parsable --path pkglibdir | grep -q "$GPU_PACK" && ompi_info | grep -q "MCA btl: vader"'
check "sdmoe_pretrain --help" pretrain_help.log 'sdmoe_pretrain --help | head -3'
check "sdmoe_bench --help" bench_help.log 'sdmoe_bench --help'
check "mpirun -np 2 test_collectives (CPU)" collectives.log 'mpirun -np 2 test_collectives'
check "mpirun -np 2 test_layout_invariance --ep 2 (CPU)" layout.log 'mpirun -np 2 test_layout_invariance --tp 1 --ep 2'
# The corpus and tokenizer as check.sh passes them, on a small CPU model: HDF5, protobuf,
# ICU and OpenBLAS from the pack.
check "mpirun -np 2 sdmoe_pretrain on the packed corpus (CPU, 2 steps)" pretrain.log \
  'mpirun -np 2 sdmoe_pretrain --config configs/gpt2-124m-moe.textproto --set device=CPU \
     --set data.path=$GPU_PACK/data/corpus.h5 --set data.tokenizer_dir=$GPU_PACK/data/tokenizer \
     --set model.layers=2 --set model.dim=64 --set model.heads=2 --set model.ffn_dim=128 \
     --set model.moe.expert_ffn_dim=64 --set model.seq_len=64 --set training.micro_batch_size=2 \
     --set training.global_batch_size=4 --set training.steps=2 --set training.eval_interval=2 \
     --set training.eval_batches=2 --set training.log_interval=1 --set training.precision=FP32'
# check.sh runs the bench and the training without mpirun: MPI as a singleton.
check "sdmoe_pretrain without mpirun (CPU, 2 steps)" singleton.log \
  'sdmoe_pretrain --config configs/gpt2-124m-moe.textproto --set device=CPU \
     --set data.path=$GPU_PACK/data/corpus.h5 --set data.tokenizer_dir=$GPU_PACK/data/tokenizer \
     --set model.layers=2 --set model.dim=64 --set model.heads=2 --set model.ffn_dim=128 \
     --set model.moe.expert_ffn_dim=64 --set model.seq_len=64 --set training.micro_batch_size=2 \
     --set training.global_batch_size=2 --set training.steps=2 --set training.eval_interval=0'
if [ "$bad" = 0 ]; then echo "verify: all passed"; else echo "verify: FAILED" >&2; exit 1; fi
archive
