#!/usr/bin/env bash
# OpenMMLab-style launcher: bash tools/dist_train.sh CONFIG NPROC [train.py args]
# Env: NNODES (1), NODE_RANK (0), MASTER_ADDR (127.0.0.1), PORT (free port; never 0: torchrun hangs).
# One node without PORT uses torchrun --standalone; several nodes need MASTER_ADDR and PORT.
# Works without a GPU: tools/train.py then uses gloo and CPU DDP.
# Python: PYTHON if set, else the project's .venv, so no venv needs activating.
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: $0 CONFIG NPROC [train.py args...]" >&2
  exit 2
fi
CONFIG=$1
NPROC=$2
shift 2
NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
HERE="$(cd "$(dirname "$0")" && pwd)"
. "$HERE/python_env.sh"
export PYTHONPATH="$HERE/..${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}

if [ "$NNODES" = 1 ] && [ -z "${PORT:-}" ]; then
  exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="$NPROC" \
    "$HERE/train.py" "$CONFIG" --launcher pytorch "$@"
fi
if [ -z "${PORT:-}" ]; then
  echo "multi-node runs need PORT (and MASTER_ADDR) set to the same values on every node" >&2
  exit 2
fi
exec "$PYTHON" -m torch.distributed.run --nnodes="$NNODES" --node_rank="$NODE_RANK" \
  --master_addr="$MASTER_ADDR" --master_port="$PORT" --nproc_per_node="$NPROC" \
  "$HERE/train.py" "$CONFIG" --launcher pytorch "$@"
