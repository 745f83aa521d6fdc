#!/usr/bin/env bash
# make test-compat TORCH=2.1.2: every test that needs no mmcv ops (multi-process ones included) on
# another torch, in its side venv .venv-torch$TORCH (built by tools/setup_compat.sh, idempotently).
set -euo pipefail
cd "$(dirname "$0")/.."
TORCH=${1:?usage: $0 TORCH_VERSION (e.g. 2.1.2 or 2.15.0)}
start=$SECONDS
bash tools/setup_compat.sh "$TORCH"
set +e
".venv-torch$TORCH/bin/python" -m pytest -q -p no:cacheprovider -m "not mmseg and not mmdet and not gpu" "${@:2}"
rc=$?
set -e
echo "[compat] torch $TORCH: pytest exit $rc, $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s in all"
exit $rc
