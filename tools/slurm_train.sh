#!/usr/bin/env bash
# OpenMMLab-style slurm launcher: one srun task per rank, each running tools/train.py --launcher slurm.
#   [GPUS=8] [GPUS_PER_NODE=8] [CPUS_PER_TASK=5] [SRUN_ARGS=...] \
#     bash tools/slurm_train.sh PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py args...]
# GPUS is the number of tasks (ranks) in all, GPUS_PER_NODE the tasks on each node; nodes without
# GPUs: GRES= (empty) drops the --gres request, and the ranks train on CPU over gloo.
# PORT sets MASTER_PORT (default 29500, torch's; give each job on shared nodes its own); MASTER_ADDR
# defaults to the job's first node. On nodes with several network interfaces set
# GLOO_SOCKET_IFNAME (see README, "Clusters"). Python: PYTHON if set, else the project's .venv.
set -euo pipefail
if [ $# -lt 3 ]; then
  echo "usage: $0 PARTITION JOB_NAME CONFIG [WORK_DIR] [train.py args...]" >&2
  exit 2
fi
PARTITION=$1
JOB_NAME=$2
CONFIG=$3
WORK_DIR=()
if [ $# -ge 4 ] && [ "${4#-}" = "$4" ]; then  # a 4th argument that is not an option: WORK_DIR
  WORK_DIR=(--work-dir "$4")
  shift
fi
shift 3
GPUS=${GPUS:-8}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(( GPUS < 8 ? GPUS : 8 ))}
CPUS_PER_TASK=${CPUS_PER_TASK:-5}
GRES=${GRES-gpu:$GPUS_PER_NODE}
SRUN_ARGS=${SRUN_ARGS:-}
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/python_env.sh"
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
[ -z "${PORT:-}" ] || export MASTER_PORT=$PORT
# shellcheck disable=SC2086 - SRUN_ARGS is a list of options, as in OpenMMLab's script
exec srun -p "$PARTITION" --job-name="$JOB_NAME" ${GRES:+--gres="$GRES"} --ntasks="$GPUS" \
  --ntasks-per-node="$GPUS_PER_NODE" --cpus-per-task="$CPUS_PER_TASK" --kill-on-bad-exit=1 \
  $SRUN_ARGS "$PYTHON" -u "$HERE/train.py" "$CONFIG" ${WORK_DIR[@]+"${WORK_DIR[@]}"} --launcher slurm "$@"
