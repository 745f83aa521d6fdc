#!/usr/bin/env bash
# The README's test command: ruff, then the whole pytest suite. Exits non-zero on any failure,
# including pytest's exit code 5 ("no tests collected"), so an empty run is never green.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${VENV:-.venv}/bin/python
"$PY" -m ruff check .
# A full disk makes ranks die with neither output nor result, test after test: say so first.
# The suite needs about 1.2 GB of it at its peak (measured); 4 GiB leaves room.
tmp=$("$PY" -c 'import tempfile; print(tempfile.gettempdir())')
free_mib=$(( $(df -Pk "$tmp" | awk 'NR==2 {print $4}') / 1024 ))
if [ "$free_mib" -lt 4096 ]; then
  echo "run_tests.sh: only $free_mib MiB free on the disk of $tmp; the suite needs about 1.2 GB at its peak, and make test asks for 4 GiB." >&2
  echo "Leftovers of earlier runs: $(ls -d "$tmp"/mmddp_* "$tmp"/pytest-of-* 2>/dev/null | head -5)" >&2
  exit 1
fi
# Two pytest workers (both cores; MMDDP_TEST_WORKERS=0 runs in this process), a test file each at a
# time, so a file's module-scoped fixtures run once. Each worker forks its ranks from zygotes of its own.
"$PY" -m pytest -q -n "${MMDDP_TEST_WORKERS:-2}" --dist loadfile "$@"
