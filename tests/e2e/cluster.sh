#!/usr/bin/env bash
# What a shared cluster does to a job, run by ctest: a rank that stalls (SIGSTOP, as a
# hung GPU, file system or network looks to its peers) or dies, a second stop signal
# while the first is being handled, checkpoints written by every rank, and a disk that
# fills up during a save.
#   cluster.sh BIN_DIR REPO watchdog | second_signal | stragglers | parallel_io | disk_full
set -uo pipefail
bin="$1"; repo="$2"; what="$3"
cd "$repo"
export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1
tmp="$(mktemp -d)"; trap 'pkill -KILL -f "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
die() { echo "FAIL: $*"; exit 1; }

common=(--config configs/tiny.textproto --set training.eval_interval=0 --set training.log_interval=1
        --set threads=1 --set training.steps=100000)
# The ranks' pids, in rank order (mpirun starts them in order; their command lines start
# with the binary, mpirun's with mpirun).
rank_pids() { pgrep -f "^$bin/sdmoe_pretrain .*checkpoint.dir=$1" | sort -n; }
wait_for_step() {  # log, step
  for _ in $(seq 1200); do grep -q "^step $2/" "$1" && return 0; sleep 0.05; done
  cat "$1"; die "no step $2 in $1"
}

case "$what" in
watchdog)
  # One rank of a 2-rank and of a 4-rank run stopped mid-training with timeout_s 5: the
  # job must end within 30 s (the timeout, a check period, the grace period for the other
  # ranks' lines, and mpirun's teardown) with a nonzero exit and the watchdog's line from a
  # live rank naming the collective it waits in; the last checkpoint must then load.
  for layout in "2|--set parallel.ep=2" "4|--set parallel.tp=2 --set parallel.ep=2"; do
    np="${layout%%|*}"; read -r -a extra <<< "${layout#*|}"
    dir="$tmp/np$np"
    mpirun -np "$np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" "${extra[@]}" --set parallel.timeout_s=5 \
      --set checkpoint.dir="$dir" --set checkpoint.interval=2 > "$tmp/np$np.log" 2>&1 &
    pid=$!
    wait_for_step "$tmp/np$np.log" 5
    victim="$(rank_pids "$dir" | tail -1)"
    [ -n "$victim" ] || die "np $np: no rank process found"
    kill -STOP "$victim"
    start=$(date +%s.%N)
    for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
    if kill -0 "$pid" 2>/dev/null; then
      kill -CONT "$victim"; kill -KILL "$pid"; cat "$tmp/np$np.log"; die "np $np: the job still ran 30 s after a rank stopped"
    fi
    wait "$pid"; rc=$?
    seconds=$(echo "$(date +%s.%N) - $start" | bc)
    [ "$rc" -ne 0 ] || die "np $np: exit code 0 after a rank stalled"
    grep -q "^sdmoe_pretrain: error: watchdog: rank [0-9]* (.*) at step [0-9]*: waiting in .* on .* (parallel.timeout_s = 5); ending the job" \
      "$tmp/np$np.log" || { cat "$tmp/np$np.log"; die "np $np: no watchdog line naming a collective"; }
    [ -e "$dir/latest" ] || die "np $np: no checkpoint before the stall"
    # The last checkpoint loads (a rank stopped during a save leaves only a partial
    # directory, which `latest` never points to), and training goes on from it.
    mpirun -np "$np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" "${extra[@]}" \
      --set checkpoint.dir="$dir" --set training.steps=$(( $(sed 's/step_0*//' "$dir/latest") + 2 )) --resume \
      > "$tmp/resume$np.log" 2>&1 || { cat "$tmp/resume$np.log"; die "np $np: resuming after the watchdog failed"; }
    grep -q "^resumed from $dir/step_" "$tmp/resume$np.log" || die "np $np: the run after the stall did not resume"
    echo "np $np: job ended $seconds s after the stall (exit $rc): $(grep -m1 'watchdog: rank' "$tmp/np$np.log")"
  done
  # A rank killed outright also ends the job (mpirun sees it die).
  dir="$tmp/killed"
  mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 --set parallel.timeout_s=5 \
    --set checkpoint.dir="$dir" > "$tmp/killed.log" 2>&1 &
  pid=$!
  wait_for_step "$tmp/killed.log" 3
  kill -KILL "$(rank_pids "$dir" | tail -1)"
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; die "the job still ran 30 s after a rank was killed"; }
  wait "$pid" && die "exit code 0 after a rank was killed"
  echo "a killed rank ended the job"
  ;;
second_signal)
  # Two SIGTERMs in a row to every rank: the first asks for a checkpoint at the end of the
  # step, the second (while that step still runs) ends the process at once with a message
  # and a nonzero exit; the previous checkpoint stays `latest` and loads.
  dir="$tmp/twice"
  mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 \
    --set checkpoint.dir="$dir" --set checkpoint.interval=2 > "$tmp/twice.log" 2>&1 &
  pid=$!
  wait_for_step "$tmp/twice.log" 4
  before="$(cat "$dir/latest")"
  pids="$(rank_pids "$dir")"
  # Apart, so that the two are not merged into one pending signal; well within a step
  # and its checkpoint save.
  kill -TERM $pids; sleep 0.05; kill -TERM $pids
  for _ in $(seq 600); do kill -0 "$pid" 2>/dev/null || break; sleep 0.05; done
  kill -0 "$pid" 2>/dev/null && { kill -KILL "$pid"; die "still running 30 s after two SIGTERMs"; }
  wait "$pid" && { cat "$tmp/twice.log"; die "exit code 0 after a second SIGTERM"; }
  grep -q "^sdmoe_pretrain: second stop signal while the first was being handled: exiting now" "$tmp/twice.log" \
    || { cat "$tmp/twice.log"; die "no message for the second signal"; }
  grep -q "^stopping after step" "$tmp/twice.log" && die "the run stopped normally: the second signal came too late to test"
  after="$(cat "$dir/latest")"
  mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 --set checkpoint.dir="$dir" \
    --set training.steps=$(( $(sed 's/step_0*//' "$dir/latest") + 1 )) --resume > "$tmp/after.log" 2>&1 \
    || { cat "$tmp/after.log"; die "the checkpoint after the second signal does not load"; }
  echo "second SIGTERM: exited at once, latest $before before and $after after, and it loads"
  ;;
stragglers)
  # Rank 1 is stopped for 50 ms of every 75 ms (SIGSTOP/SIGCONT, as a node whose core is
  # taken by another job's processes), so it computes at about a third of rank 0's speed
  # whatever else the machine runs at the time: the log line and the JSONL must show it as
  # the slowest, and after 5 steps in a row above 1.5x the (lower) median the warning must
  # name it and its host.
  dir="$tmp/s"
  mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 \
    --set training.steps=14 --set metrics.jsonl="$tmp/run.jsonl" --set checkpoint.dir="$dir" > "$tmp/s.log" 2>&1 &
  pid=$!
  wait_for_step "$tmp/s.log" 1
  victim="$(rank_pids "$dir" | tail -1)"
  [ -n "$victim" ] || die "no rank process found"
  ( while kill -STOP "$victim" 2>/dev/null; do sleep 0.05; kill -CONT "$victim" 2>/dev/null; sleep 0.025; done ) &
  throttle=$!
  trap 'kill "$throttle" 2>/dev/null; kill -CONT "$victim" 2>/dev/null; pkill -KILL -f "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
  wait "$pid"; rc=$?
  kill "$throttle" 2>/dev/null; wait "$throttle" 2>/dev/null
  [ "$rc" -eq 0 ] || { cat "$tmp/s.log"; die "the run with a slow rank failed"; }
  grep -q "^sdmoe_pretrain: warning: rank 1 (.*) is a straggler: its compute time exceeded 1.5x the median" "$tmp/s.log" \
    || { grep -E "compute|straggler" "$tmp/s.log" | head; die "no straggler warning naming rank 1"; }
  grep -q "| compute [0-9.]*-[0-9.]* s (slowest rank 1)" "$tmp/s.log" || die "the log line does not show rank 1 as the slowest"
  /usr/bin/python3 - "$tmp/run.jsonl" <<'PYTHON' || die "the JSONL records lack the compute-time spread"
import json, sys
records = [json.loads(line) for line in open(sys.argv[1])]
late = records[-5:]
assert all(r["slowest_rank"] == 1 for r in late), [r["slowest_rank"] for r in late]
assert all(r["compute_seconds_max"] > 1.3 * r["compute_seconds_min"] > 0 for r in late), late[-1]
assert all(r["compute_seconds_min"] <= r["compute_seconds_median"] <= r["compute_seconds_max"] for r in records)
PYTHON
  echo "rank 1 named: $(grep -m1 'is a straggler' "$tmp/s.log" | cut -c1-160)"
  ;;
parallel_io)
  # The parallel writer (every rank writes its own parts through MPI-IO) and the gather
  # writer (rank 0 writes everything) must produce the same tensors, bit for bit, at 1, 2
  # and 4 ranks (tensor-, expert- and data-parallel parts, ZeRO-1 moment shards, SD-MoE
  # bases and unique-part moments), and each file must load under another layout.
  for layout in "1|" "2|--set parallel.ep=2 --set parallel.zero1=true" "4|--set parallel.tp=2 --set parallel.ep=2"; do
    np="${layout%%|*}"; read -r -a extra <<< "${layout#*|}"
    for writer in PARALLEL GATHER; do
      mpirun -np "$np" --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" "${extra[@]}" --set training.steps=3 \
        --set sdmoe.enabled=true --set sdmoe.refresh_interval=2 --set checkpoint.writer=$writer \
        --set checkpoint.slab_mb=0.05 --set checkpoint.dir="$tmp/$np/$writer" > "$tmp/$np.$writer.log" 2>&1 \
        || { cat "$tmp/$np.$writer.log"; die "np $np: the run with the $writer writer failed"; }
    done
    a="$tmp/$np/PARALLEL/step_00000003/checkpoint.h5"; b="$tmp/$np/GATHER/step_00000003/checkpoint.h5"
    for group in /params /optimizer /sdmoe; do
      h5diff -q "$a" "$b" "$group" "$group" > /dev/null || die "np $np: the writers differ in $group"
    done
    # Not a file of zeros: the embedding must hold the trained values on both.
    /usr/bin/python3 -c "import h5py, sys; f = h5py.File(sys.argv[1]); e = f['params/embedding'][...]; assert abs(e).max() > 0" \
      "$a" || die "np $np: the parallel writer's embedding is empty"
    mpirun -np 1 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set sdmoe.enabled=true \
      --set sdmoe.refresh_interval=2 --set training.steps=4 --set checkpoint.load="$tmp/$np/PARALLEL/step_00000003" \
      > "$tmp/$np.load.log" 2>&1 || { cat "$tmp/$np.load.log"; die "np $np: the parallel writer's file does not load on 1 rank"; }
    echo "np $np: PARALLEL and GATHER files identical; loads on 1 rank"
  done
  ;;
disk_full)
  # A save that runs out of space (a tmpfs of 192 MB, 120 MB taken by a filler file, 40 MB
  # per checkpoint: the first fits, the second does not) fails with the reason and the
  # path, removes its partial directory and leaves `latest` on the first, which loads;
  # once the filler is deleted the same command resumes and saves its next two.
  mnt="$tmp/small"; mkdir -p "$mnt"
  if ! mount -t tmpfs -o size=192m tmpfs "$mnt" 2> /dev/null; then
    echo "SKIPPED: cannot mount a tmpfs here (needs root and CAP_SYS_ADMIN)"; exit 77
  fi
  trap 'umount "$mnt" 2>/dev/null; pkill -KILL -f "$tmp" 2>/dev/null; rm -rf "$tmp"' EXIT
  head -c 120M /dev/zero > "$mnt/filler"
  for writer in PARALLEL GATHER; do
    dir="$mnt/$writer"
    run=(mpirun -np 2 --bind-to none "$bin/sdmoe_pretrain" "${common[@]}" --set parallel.ep=2 --set training.steps=6
         --set checkpoint.interval=2 --set checkpoint.writer=$writer --set checkpoint.dir="$dir")
    "${run[@]}" > "$tmp/full.$writer.log" 2>&1 && { cat "$tmp/full.$writer.log"; die "$writer: the run did not fail on a full disk"; }
    grep -q "^sdmoe_pretrain: error: checkpoint at step 4 failed on rank [0-9]*: .*[Nn]o space left on device.*$dir/step_00000004.partial.*its partial directory was removed and $dir/latest still names step_00000002" \
      "$tmp/full.$writer.log" || { cat "$tmp/full.$writer.log"; die "$writer: no plain message naming the full disk, the path and latest"; }
    ls -d "$dir"/*.partial 2> /dev/null && die "$writer: a partial directory was left behind"
    [ "$(cat "$dir/latest")" = step_00000002 ] || die "$writer: latest moved to $(cat "$dir/latest")"
    rm -f "$mnt/filler"
    "${run[@]}" > "$tmp/again.$writer.log" 2>&1 || { grep -v '^step' "$tmp/again.$writer.log" | tail -20; die "$writer: the run did not resume once space was freed"; }
    grep -q "^resumed from $dir/step_00000002" "$tmp/again.$writer.log" || die "$writer: the second run did not resume from step 2"
    [ "$(cat "$dir/latest")" = step_00000006 ] || die "$writer: the resumed run did not save step 6"
    echo "$writer: $(grep -m1 'checkpoint at step 4 failed' "$tmp/full.$writer.log" | cut -c1-220)..."
    rm -rf "$dir"; head -c 120M /dev/zero > "$mnt/filler"
  done
  ;;
*) die "unknown check $what" ;;
esac
