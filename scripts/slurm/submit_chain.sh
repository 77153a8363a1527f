#!/usr/bin/env bash
# Submits COUNT copies of sdmoe.sbatch, each starting when the previous one has ended
# (--dependency=afterany), so a run longer than the time limit continues job after job;
# each resumes from the checkpoint directory's latest.
#   CONFIG=run.textproto RUN_DIR=runs/exp1 scripts/slurm/submit_chain.sh COUNT [sbatch options...] [-- sdmoe_pretrain args...]
set -euo pipefail
count="${1:?usage: submit_chain.sh COUNT [sbatch options...] [-- sdmoe_pretrain args...]}"
shift
sbatch_args=()
while [ $# -gt 0 ] && [ "$1" != "--" ]; do sbatch_args+=("$1"); shift; done
[ "${1:-}" = "--" ] && shift
script="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/sdmoe.sbatch"
previous=""
for i in $(seq "$count"); do
  dependency=()
  [ -n "$previous" ] && dependency=(--dependency="afterany:$previous")
  previous="$(sbatch --parsable "${dependency[@]}" "${sbatch_args[@]}" "$script" "$@")"
  echo "submitted job $previous ($i of $count)"
done
