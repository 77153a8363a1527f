#!/usr/bin/env bash
# The GPU checks in one run, on a GPU machine that lacks the MPI/HDF5/protobuf runtime:
# the binaries and libraries come from the pack that scripts/gpu/pack.sh builds on a
# machine with the full toolchain (.gpu/pack.tar.xz, carried along with the repository),
# the CUDA libraries (cudart, cuBLAS, cuSOLVER, cuSPARSE, nvJitLink, NCCL) from the
# machine's CUDA toolkit or its PyTorch. From the repository root:
#
#   bash scripts/gpu/check.sh
#
# Parts, in order, each under its own time limit:
#   a  the GPU unit tests (CUDA ops against the CPU oracle)       tests.log
#   b  sdmoe_bench on configs/gpt2-124m-moe.textproto             bench.log
#   c  the same with a dense MLP in every layer                   bench.log
#   d  200 BF16 training steps of that config on the corpus       train.log, train.jsonl
#   e  the PyTorch peer (scripts/gpu/torch_peer.py), MoE and dense torch_peer.log
#   f  layout invariance and collectives on the GPU under mpirun  layout.log
# Logs go to ${OUT:-/tmp/gpu_out}: env.log, the five above, train.jsonl and summary.txt
# (8 files). A failing part does not stop the others. The whole run stays under 8
# minutes: each part's limit is cut to what is left of the budget, less a reserve kept
# for the parts after it.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.." || exit 1
out="${OUT:-/tmp/gpu_out}"
mkdir -p "$out"
# The end of the budget for everything, summary included: 8 minutes less a margin. An
# absolute time, so that the parts' own shells read the same clock.
deadline=$(($(date +%s) + 465))
config=configs/gpt2-124m-moe.textproto
orig_ld_library_path="${LD_LIBRARY_PATH:-}"
export deadline config orig_ld_library_path PYTHONUNBUFFERED=1 GTEST_COLOR=no
summary=()

# time_left CAP [RESERVE]: CAP seconds, or fewer if the budget less RESERVE ends sooner.
time_left() {
  local left=$((deadline - ${2:-0} - $(date +%s)))
  ((left < 0)) && left=0
  echo $(($1 < left ? $1 : left))
}
export -f time_left
# part NAME CAP RESERVE LOG COMMAND...: runs COMMAND (a program or an exported function)
# under `timeout`, appends its output to LOG (and stdout), and records its exit status
# and seconds for the summary.
part() {
  local name="$1" limit log="$out/$4" start rc status
  limit="$(time_left "$2" "$3")"
  shift 4
  if ((limit < 5)); then
    echo "== $name: skipped, the time budget is spent" | tee -a "$log"
    summary+=("$(printf '%-36s %8s %7s' "$name" "skipped" "0")")
    return 124
  fi
  echo "== $name (limit ${limit} s): $*" | tee -a "$log"
  start=$SECONDS
  timeout -k 5 "$limit" bash -c '"$@"' part "$@" 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  status="$rc"
  ((rc == 124 || rc == 137)) && status="timeout"
  echo "== $name: exit $rc after $((SECONDS - start)) s" | tee -a "$log"
  summary+=("$(printf '%-36s %8s %7s' "$name" "$status" "$((SECONDS - start))")")
  return "$rc"
}

# ---- set-up (~10 s) ------------------------------------------------------------------------
if [ -f .gpu/pack.tar.xz ] && { [ ! -f .gpu/env.sh ] || [ .gpu/pack.tar.xz -nt .gpu/env.sh ]; }; then
  tar -C .gpu -xJf .gpu/pack.tar.xz 2>/dev/null ||
    python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2])' .gpu/pack.tar.xz .gpu
  touch .gpu/env.sh
fi
[ -f .gpu/env.sh ] || { echo "check: no .gpu/ pack (run scripts/gpu/pack.sh where the project builds and bring .gpu/pack.tar.xz along)" >&2; exit 1; }
# shellcheck source=/dev/null
. .gpu/env.sh

# The library path of the packed programs: the pack, then the CUDA libraries they were
# linked against, found by soname in the toolkit's folders first, then in the NVIDIA
# wheels next to PyTorch. Only the packed programs get it (through `env`): the machine's
# own tools and PyTorch keep the machine's own libraries.
pack_ld="$LD_LIBRARY_PATH"
export LD_LIBRARY_PATH="$orig_ld_library_path"
cuda_dirs=(/usr/local/cuda/lib64 /usr/local/cuda/lib /usr/local/cuda/targets/x86_64-linux/lib /usr/local/cuda-*/lib64
           /usr/local/cuda-*/targets/x86_64-linux/lib /usr/lib/x86_64-linux-gnu)
while read -r sp; do [ -d "$sp/nvidia" ] && cuda_dirs+=("$sp/nvidia"); done < <(
  python3 -c 'import site; print("\n".join(site.getsitepackages()))' 2>/dev/null)
missing_libs() {
  LD_LIBRARY_PATH="$pack_ld" ldd .gpu/bin/sdmoe_pretrain .gpu/bin/test_layout_invariance 2>/dev/null |
    awk '/not found/ {print $1}' | sort -u
}
for soname in $(missing_libs); do
  for d in "${cuda_dirs[@]}"; do
    [ -d "$d" ] || continue
    hit="$(find "$d" -maxdepth 3 -name "$soname" 2>/dev/null | head -1)"
    [ -n "$hit" ] || continue
    case ":$pack_ld:" in *":$(dirname "$hit"):"*) ;; *) pack_ld="$pack_ld:$(dirname "$hit")" ;; esac
    break
  done
done
export pack_ld

{
  echo "== environment"
  date -u
  uname -a
  grep PRETTY_NAME /etc/os-release 2>/dev/null
  echo "cores: $(nproc); memory: $(free -g 2>/dev/null | awk '/Mem:/ {print $2 " GiB"}')"
  ldd --version 2>&1 | head -1
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm,power.limit --format=csv
  else
    echo "nvidia-smi: not on PATH"
  fi
  python3 -c 'import torch; print("torch", torch.__version__, "CUDA", torch.version.cuda,
    "GPU", torch.cuda.is_available() and torch.cuda.get_device_name(0))' 2>&1 | tail -1
  echo "pack: $GPU_PACK"
  echo "library path of the packed programs: $pack_ld"
  echo "sdmoe_pretrain's libraries from outside the pack:"
  LD_LIBRARY_PATH="$pack_ld" ldd .gpu/bin/sdmoe_pretrain | grep -v "$GPU_PACK"
  left="$(missing_libs)"
  [ -z "$left" ] || echo "STILL MISSING: $left (the runs that need them will fail)"
  env LD_LIBRARY_PATH="$pack_ld" mpirun --version | head -1
  echo "binaries:" .gpu/bin/*
} 2>&1 | tee "$out/env.log"

# ---- a: GPU unit tests (~40 s; 90 s cap, 45 s a binary) -------------------------------------
# The suites expected, then any other test_cuda_* the build made.
part_a() {
  local rc=0 t e f
  local -a suites=(test_cuda_ops test_cuda_bf16_ops test_cuda_flash_attention test_cuda_sdmoe)
  for f in .gpu/bin/test_cuda_*; do
    [[ -e "$f" && " ${suites[*]} " != *" ${f##*/} "* ]] && suites+=("${f##*/}")
  done
  for t in "${suites[@]}"; do
    if [ ! -x ".gpu/bin/$t" ]; then
      echo "-- $t: not in the pack (not built), skipped"
      continue
    fi
    echo "-- $t"
    timeout -k 5 "$(time_left 45)" env LD_LIBRARY_PATH="$pack_ld" ".gpu/bin/$t" --gtest_brief=1 || { e=$?; echo "-- $t: exit $e"; rc=$e; }
  done
  return "$rc"
}
export -f part_a
# Reserves: what the later parts need at the least (d 60 s, e 2 x 45 s, f 45 s).
part "a gpu unit tests" 90 195 tests.log part_a

# ---- b, c: benchmarks (~30 s each; 55 s and 45 s caps) --------------------------------------
part "b bench moe" 55 195 bench.log env LD_LIBRARY_PATH="$pack_ld" sdmoe_bench --config "$config" --device CUDA --steps 5
# The dense variant: --set where the bench takes it, else a copy of the config.
if env LD_LIBRARY_PATH="$pack_ld" sdmoe_bench --help 2>&1 | grep -q -- '--set'; then
  part "c bench dense" 45 195 bench.log env LD_LIBRARY_PATH="$pack_ld" sdmoe_bench --config "$config" --device CUDA --steps 5 --set model.moe.num_experts=0
else
  dense_config=/tmp/gpt2-124m-dense.textproto
  sed -E 's/^([[:space:]]*num_experts:)[[:space:]]*[0-9]+/\1 0/' "$config" >"$dense_config"
  part "c bench dense" 45 195 bench.log env LD_LIBRARY_PATH="$pack_ld" sdmoe_bench --config "$dense_config" --device CUDA --steps 5
fi

# ---- d: training (~60 s; 100 s cap) ------------------------------------------------------------
# 200 steps of one micro-batch (8 x 1024 tokens) each: about a minute at the 34K tokens/s
# an H100 gave in FP32. The warm-up is shortened so that the loss moves within them;
# validation every 50 steps on 4 micro-batches.
train_args=(--config "$config" --set data.path=.gpu/data/corpus.h5 --set data.tokenizer_dir=.gpu/data/tokenizer
            --set training.steps=200 --set training.global_batch_size=8 --set optimizer.warmup_steps=20
            --set training.log_interval=10 --set training.eval_interval=50 --set training.eval_batches=4)
start_d=$SECONDS
part "d train 200 steps BF16" 100 135 train.log env LD_LIBRARY_PATH="$pack_ld" sdmoe_pretrain "${train_args[@]}" --set training.precision=BF16 \
  --set metrics.jsonl="$out/train.jsonl"
rc_d=$?
# A build whose CUDA backend has no BF16 refuses it at once: FP32 then gives the figures.
if ((rc_d != 0 && SECONDS - start_d < 30)); then
  rm -f "$out/train.jsonl"
  part "d' train 200 steps FP32 (fallback)" $((100 - (SECONDS - start_d))) 135 train.log \
    env LD_LIBRARY_PATH="$pack_ld" sdmoe_pretrain \
    "${train_args[@]}" --set training.precision=FP32 --set metrics.jsonl="$out/train.jsonl"
fi

# ---- e: PyTorch peer (~50 s each, compilation included; 75 s and 65 s caps) ------------------
peer() {
  python3 scripts/gpu/torch_peer.py --config "$config" --dtype bf16 --compile \
    --warmup 3 --steps 15 "$@"
}
export -f peer
part "e torch peer moe bf16 compile" 75 90 torch_peer.log peer
part "e torch peer dense bf16 compile" 65 45 torch_peer.log peer --dense

# ---- f: layout invariance on the GPU (~5-10 s a run; what is left, 25 s a run) --------------
# The layout_invariance_gpu_* entries of tests/layout/CMakeLists.txt (read from it, so the
# list follows the tests), the BF16 and fused-attention ones first; then the collectives
# on device buffers. Ranks share the one GPU.
part_f() {
  local rc=0 e limit
  local -a runs
  mapfile -t runs < <(python3 - <<'EOF'
import re
text = open("tests/layout/CMakeLists.txt").read()
entries = []
for m in re.finditer(r'foreach\(layout((?:\s*"[^"]*")+)\s*\)(.*?)endforeach', text, re.S):
    if "layout_invariance_gpu_" in m.group(2):
        entries += re.findall(r'"([^"]*)"', m.group(1))
first = [e for e in entries if "bf16" in e or "fused" in e]
for e in first + [e for e in entries if e not in first]:
    name, ranks, *args = e.split()
    print(ranks, "test_layout_invariance", " ".join(args), "--device cuda")
EOF
  )
  [ "${#runs[@]}" -gt 0 ] || { echo "-- no layout_invariance_gpu_ entries read from tests/layout/CMakeLists.txt"; rc=1; }
  runs+=("2 test_collectives --device=cuda")
  for r in "${runs[@]}"; do
    read -r -a words <<<"$r"
    limit="$(time_left 25)"
    ((limit < 5)) && { echo "-- budget spent before: mpirun -np $r"; rc=124; break; }
    echo "-- mpirun -np $r"
    timeout -k 5 "$limit" env LD_LIBRARY_PATH="$pack_ld" mpirun --oversubscribe --bind-to none -np "${words[0]}" "${words[@]:1}" ||
      { e=$?; echo "-- exit $e: mpirun -np $r"; rc=$e; }
  done
  return "$rc"
}
export -f part_f
part "f layout invariance gpu" 300 0 layout.log part_f

# ---- summary ---------------------------------------------------------------------------------
{
  echo
  echo "== headline figures"
  grep -E "^(-- |\[  (PASSED|FAILED|SKIPPED) +\] [0-9]+ test)" "$out/tests.log" 2>/dev/null
  grep -E "^== [bc] |^backend|tokens/s" "$out/bench.log" 2>/dev/null
  grep -E "^== d|^step " "$out/train.log" 2>/dev/null | grep -E "^== d|^step +(10|100|200)/" | tail -6
  grep -iE "val_loss" "$out/train.log" 2>/dev/null | tail -1
  grep -E "^torch_peer: .* tokens/s" "$out/torch_peer.log" 2>/dev/null
  grep -E "^(-- |PASS|FAIL|SKIPPED: |\[  (PASSED|FAILED) +\] [0-9]+ test)" "$out/layout.log" 2>/dev/null | tail -40
  echo
  echo "== summary ($SECONDS s in all)"
  printf '%-36s %8s %7s\n' "part" "exit" "seconds"
  printf '%s\n' "${summary[@]}"
} | tee "$out/summary.txt"
