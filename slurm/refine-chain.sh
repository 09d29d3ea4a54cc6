#!/bin/bash
# Submit one hpcrefine refinement as a chain of N SLURM jobs, for clusters where jobs may not requeue
# themselves (JobRequeue=0, or a policy against it) or where a long run is easier to schedule as
# several shorter jobs:
#
#   bash slurm/refine-chain.sh N [SBATCH OPTIONS...] -- MODEL --half-maps H1 H2 --resolution 3.5 --output DIR
#   bash slurm/refine-chain.sh 4 --ntasks=9 --time=12:00:00 -- start.cif --half-maps h1.mrc h2.mrc --resolution 3.5 --output run
#
# Every job runs slurm/refine.sbatch with HPCREFINE_REQUEUE=0 and the same arguments (with --resume):
# the first starts the refinement, and each next one, submitted with --dependency=afterany on the one
# before, continues from DIR/checkpoint.h5. A job warned of its time limit (--signal=B:USR1@...)
# forwards SIGUSR1 to the ranks, which checkpoint and exit 75, and the job ends; the next job starts.
# The job that completes the refinement (or fails) cancels the jobs of the chain still pending; they
# all carry one job name, hpcrefine-chain-<time>-<pid> (HPCREFINE_CHAIN_NAME to choose it), and log
# to one file, <job name>.log in the submit directory (unless an --output option says otherwise). If the
# chain runs out before the refinement is done, submit another: it continues from the checkpoint.
# Prints the job ids, one a line.
set -euo pipefail

usage() { echo "usage: $0 N [SBATCH OPTIONS...] -- HPCREFINE REFINE ARGUMENTS..." >&2; exit 2; }
[ $# -ge 2 ] || usage
N=$1; shift
[[ "$N" =~ ^[1-9][0-9]*$ ]] || usage
opts=()
while [ $# -gt 0 ] && [ "$1" != -- ]; do opts+=("$1"); shift; done
[ $# -gt 0 ] || usage
shift   # --
[ $# -gt 0 ] || usage

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
NAME=${HPCREFINE_CHAIN_NAME:-hpcrefine-chain-$(date +%Y%m%d%H%M%S)-$$}
prev=""
for _ in $(seq "$N"); do
  dep=()
  [ -n "$prev" ] && dep=(--dependency="afterany:$prev")
  prev=$(sbatch --parsable --job-name="$NAME" --export=ALL,HPCREFINE_REQUEUE=0 \
         --output="$NAME.log" "${dep[@]}" "${opts[@]}" \
         "$HERE/refine.sbatch" "$@")
  prev=${prev%%;*}     # "id;cluster" on federated clusters
  echo "$prev"
done
