# Sourced by the tools' shell scripts: pick the Python that has this project installed.
# An explicit PYTHON=... wins; else the project's .venv (made by `make setup`); else `python3`.
# So the scripts work from a fresh shell without activating anything.
_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
if [ -z "${PYTHON:-}" ]; then
  if [ -x "$_ROOT/.venv/bin/python" ]; then
    PYTHON="$_ROOT/.venv/bin/python"
  else
    PYTHON=python3
  fi
fi
if ! "$PYTHON" -c 'import torch' 2>/dev/null; then
  echo "$PYTHON cannot import torch: run 'make setup' first (it makes $_ROOT/.venv), or set PYTHON" >&2
  exit 2
fi
export PYTHON
