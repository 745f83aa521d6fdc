#!/usr/bin/env bash
# The README's test command: ruff, then the whole pytest suite. Exits non-zero on any failure,
# including pytest's exit code 5 ("no tests collected"), so an empty run is never green.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
"$PY" -m ruff check .
"$PY" -m pytest -q "$@"
