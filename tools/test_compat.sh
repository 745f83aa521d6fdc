#!/usr/bin/env bash
# make test-compat TORCH=2.1.2 [MMENGINE=0.7.1]: the whole suite (multi-process tests included) on
# another torch and mmengine, in their side venv (tools/setup_compat.sh builds it
# idempotently, and checks that `pip install .` keeps both).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: $0 TORCH_VERSION [MMENGINE_VERSION] [pytest args]}
shift
MMENGINE=0.10.7
if [ $# -gt 0 ] && [ "${1#-}" = "$1" ]; then  # a version, not a pytest option
  MMENGINE=$1
  shift
fi
VENV=.venv-torch$TORCH
[ "$MMENGINE" = 0.10.7 ] || VENV=$VENV-mmengine$MMENGINE
start=$SECONDS
bash tools/setup_compat.sh "$TORCH" "$MMENGINE"
set +e
# what needs torchvision, mmcv, an OpenMMLab codebase or CUDA is skipped, each skip saying why (-rs)
"$VENV/bin/python" -m pytest -q -rs -p no:cacheprovider "$@"
rc=$?
set -e
echo "[compat] torch $TORCH, mmengine $MMENGINE: pytest exit $rc," \
     "$(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s in all"
exit $rc
