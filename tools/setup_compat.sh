#!/usr/bin/env bash
# Side venv for another torch (and mmengine):
#   bash tools/setup_compat.sh 2.1.2            ->  .venv-torch2.1.2 (mmengine 0.10.7)
#   bash tools/setup_compat.sh 2.1.2 0.7.1      ->  .venv-torch2.1.2-mmengine0.7.1
#
# torch==VERSION (the registry's build: for most versions the CUDA one, which runs on CPU too),
# that mmengine, numpy<2 where that torch was built against numpy 1 (< 2.3), and pytest: the
# environment a user already has. Then `pip install .` of this package, with its dependencies
# resolved as a user's install would, must change none of what was there: `pip freeze` before and
# after differ in mmddp_hooks alone, or this fails. Then the package is reinstalled editable (no
# deps) so the tests run the working tree. Idempotent: a venv that already has both versions is
# kept as it is.
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: $0 TORCH_VERSION [MMENGINE_VERSION]}
MMENGINE=${2:-0.10.7}
VENV=.venv-torch$TORCH
[ "$MMENGINE" = 0.10.7 ] || VENV=$VENV-mmengine$MMENGINE
PYTHON=${PYTHON:-python3}
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)
if "$PY" -c "import torch, mmengine, sys; from mmengine import Config; Config(dict(a=1)).pretty_text; \
sys.exit(torch.__version__.split('+')[0] != '$TORCH' or mmengine.__version__ != '$MMENGINE')" 2>/dev/null; then
  echo "[compat] $VENV already has torch $TORCH and mmengine $MMENGINE"
else
  echo "[compat] $VENV: torch $TORCH (several GB with its CUDA libraries, the first time), mmengine $MMENGINE"
  NUMPY='numpy'
  case $TORCH in 2.0.*|2.1.*|2.2.*) NUMPY='numpy<2' ;; esac
  # mmengine before 0.9 formats configs with yapf's `verify=` argument, which yapf 0.40.2 dropped:
  # an environment that trains with such an mmengine has the yapf before that
  YAPF='yapf'
  case $MMENGINE in 0.[0-8].*) YAPF='yapf<=0.40.1' ;; esac
  "${PIP[@]}" "torch==$TORCH" "$NUMPY" "mmengine==$MMENGINE" "$YAPF" pytest "setuptools<81" wheel
fi
before=$(mktemp) after=$(mktemp)
trap 'rm -f "$before" "$after"' EXIT
"$PY" -m pip freeze --exclude-editable | grep -v '^mmddp[_-]hooks' | sort > "$before"
"${PIP[@]}" --no-build-isolation .
"$PY" -m pip freeze --exclude-editable | grep -v '^mmddp[_-]hooks' | sort > "$after"
if ! diff -u "$before" "$after"; then
  echo "[compat] 'pip install .' changed the packages above in $VENV: setup.py's ranges do not" \
       "accept torch $TORCH with mmengine $MMENGINE" >&2
  exit 1
fi
echo "[compat] pip install . kept all $(wc -l < "$before") packages of $VENV as they were"
"${PIP[@]}" --no-build-isolation --no-deps -e .
"$PY" -c "import torch, mmengine, numpy, mmddp_hooks; print('[compat] ok: torch', torch.__version__, \
'numpy', numpy.__version__, 'mmengine', mmengine.__version__)"
