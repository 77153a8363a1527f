#!/usr/bin/env bash
# A real single-node Slurm cluster on this machine (munged, slurmctld, slurmd from Debian's
# slurm packages, all state in a temporary directory) runs scripts/slurm/sdmoe.sbatch:
# the job is warned before its end with SIGUSR1 to the batch shell (what --signal=B:USR1
# does before the time limit), checkpoints, requeues itself, resumes from the checkpoint
# and completes.
#   slurm.sh BIN_DIR REPO          (needs root: the daemons run as root)
set -uo pipefail
bin="$1"; repo="$2"
cd "$repo"
die() { echo "FAIL: $*"; [ -n "${tmp:-}" ] && tail -n 20 "$tmp"/*.log 2>/dev/null; exit 1; }
[ "$(id -u)" -eq 0 ] || { echo "SKIP: the Slurm daemons need root"; exit 77; }
for tool in munged slurmctld slurmd sbatch squeue scontrol; do
  command -v "$tool" > /dev/null || die "$tool not found (scripts/setup.sh installs slurmctld, slurmd, slurm-client and munge)"
done

tmp="$(mktemp -d /tmp/sdmoe-slurm.XXXXXX)"
chmod 755 "$tmp"
cleanup() {
  [ -f "$tmp/slurmd.pid" ] && kill "$(cat "$tmp/slurmd.pid")" 2>/dev/null
  [ -f "$tmp/slurmctld.pid" ] && kill "$(cat "$tmp/slurmctld.pid")" 2>/dev/null
  [ -f "$tmp/munged.pid" ] && kill "$(cat "$tmp/munged.pid")" 2>/dev/null
  pkill -KILL -f "$tmp" 2>/dev/null
  sleep 1
  rm -rf "$tmp"
}
trap cleanup EXIT

host="$(hostname -s)"
cpus="$(nproc)"
mkdir -p "$tmp/state" "$tmp/spool" "$tmp/munge"
dd if=/dev/urandom of="$tmp/munge/munge.key" bs=1024 count=1 2> /dev/null
chmod 700 "$tmp/munge"; chmod 400 "$tmp/munge/munge.key"
munged --force --key-file="$tmp/munge/munge.key" --socket="$tmp/munge/munge.socket" \
  --pid-file="$tmp/munged.pid" --log-file="$tmp/munged.log" --seed-file="$tmp/munge/munge.seed" \
  || die "munged did not start"

# Ports away from the defaults, so a site Slurm on this machine is not disturbed.
cat > "$tmp/slurm.conf" <<CONF
ClusterName=sdmoetest
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket=$tmp/munge/munge.socket
CredType=cred/munge
SlurmctldPort=16917
SlurmdPort=16918
StateSaveLocation=$tmp/state
SlurmdSpoolDir=$tmp/spool
SlurmctldPidFile=$tmp/slurmctld.pid
SlurmdPidFile=$tmp/slurmd.pid
SlurmctldLogFile=$tmp/slurmctld.log
SlurmdLogFile=$tmp/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
MpiDefault=none
ReturnToService=2
JobRequeue=1
NodeName=$host CPUs=$cpus State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
CONF
export SLURM_CONF="$tmp/slurm.conf"
slurmctld -f "$SLURM_CONF" || die "slurmctld did not start"
slurmd -f "$SLURM_CONF" || die "slurmd did not start"
for _ in $(seq 60); do
  state="$(sinfo -h -o %T 2> /dev/null | head -1)"
  [ "$state" = idle ] && break
  sleep 1
done
[ "$state" = idle ] || die "the node did not become idle (state '$state')"

# The tiny model on 2 ranks through the batch script, with checkpoints every 20 steps,
# launched by mpirun and by srun (through Slurm's PMIx plugin).
submit_warn_requeue() {  # LAUNCHER
  local launcher="$1" run="$tmp/run-$1" job log state stopped
  job="$(CONFIG=configs/tiny.textproto RUN_DIR="$run" LAUNCHER="$launcher" SRUN_MPI=pmix SDMOE_BIN="$bin/sdmoe_pretrain" \
    OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1 OMPI_MCA_rmaps_base_oversubscribe=1 \
    sbatch --parsable --job-name="sdmoe-$launcher" --nodes=1 --ntasks-per-node=2 --cpus-per-task=1 --gpus-per-node=0 \
      --time=10 --output="$tmp/job-%j.log" scripts/slurm/sdmoe.sbatch \
      --set threads=1 --set training.steps=200 --set training.eval_interval=0 --set training.log_interval=10 \
      --set checkpoint.interval=20)" || die "$launcher: sbatch failed"
  echo "$launcher: submitted job $job"
  log="$tmp/job-$job.log"
  for _ in $(seq 300); do [ -e "$run/checkpoints/latest" ] && break; sleep 0.5; done
  [ -e "$run/checkpoints/latest" ] || die "$launcher: no checkpoint within 150 s"
  # The time-limit warning, delivered now.
  scancel --signal=USR1 --batch "$job" || die "$launcher: scancel --signal failed"
  for _ in $(seq 120); do grep -q "requeueing job" "$log" 2> /dev/null && break; sleep 1; done
  grep -q "stopping after step [0-9]* on signal 10" "$log" || die "$launcher: the ranks did not stop on the warning"
  grep -q "requeueing job $job" "$log" || die "$launcher: the batch script did not requeue the job"
  stopped="$(grep -o 'stopping after step [0-9]*' "$log" | awk '{print $4}' | tail -1)"
  echo "$launcher: stopped at step $stopped and requeued"
  # A requeued job waits for its begin time; release it at once.
  sleep 2
  scontrol update JobId="$job" StartTime=now > /dev/null 2>&1
  for _ in $(seq 240); do
    state="$(squeue -h -j "$job" -o %T 2> /dev/null)"
    [ -z "$state" ] && break
    sleep 1
  done
  [ -z "$state" ] || die "$launcher: job still $state after 240 s"
  grep -q "^resumed from $run/checkpoints/step_0*$stopped:" "$log" || die "$launcher: the requeued job did not resume from step $stopped"
  grep -q "^step 200/200" "$log" || die "$launcher: the requeued job did not finish"
  [ -d "$run/checkpoints/step_00000200" ] || die "$launcher: no final checkpoint"
  [ "$(wc -l < "$run/metrics.jsonl")" -ge 200 ] || die "$launcher: metrics.jsonl is short"
  echo "$launcher: job $job warned at step $stopped, requeued, resumed and completed 200 steps"
}
submit_warn_requeue mpirun
submit_warn_requeue srun
echo "PASS: Slurm jobs through mpirun and srun warned, requeued, resumed and completed"
