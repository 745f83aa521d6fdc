#!/usr/bin/env bash
# Side venv for another torch: bash tools/setup_compat.sh 2.1.2  ->  .venv-torch2.1.2
#
# torch==VERSION (the registry's build: for most versions the CUDA one, which runs on CPU too),
# mmengine 0.10.7, numpy<2 where that torch was built against numpy 1 (< 2.3), pytest, and this
# package without its mmseg extras. Idempotent like tools/setup_env.sh: a venv whose torch already
# has VERSION is left as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: $0 TORCH_VERSION}
VENV=.venv-torch$TORCH
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
if "$PY" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH')" 2>/dev/null; then
  echo "[compat] $VENV already has torch $TORCH"
else
  echo "[compat] $VENV: torch $TORCH (several GB with its CUDA libraries, for the first time)"
  NUMPY='numpy'
  case $TORCH in 2.0.*|2.1.*|2.2.*) NUMPY='numpy<2' ;; esac
  "$PY" -m pip install --disable-pip-version-check -q "torch==$TORCH" "$NUMPY" mmengine==0.10.7 \
    pytest "setuptools<81" wheel
fi
"$PY" -m pip install --disable-pip-version-check -q --no-build-isolation --no-deps -e .
"$PY" -c "import torch, mmengine, numpy, mmddp_hooks; print('[compat] ok: torch', torch.__version__, \
'numpy', numpy.__version__, 'mmengine', mmengine.__version__)"
