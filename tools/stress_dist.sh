#!/usr/bin/env bash
# Rerun the multi-process tests N times and report every failure with its output.
#
#   bash tools/stress_dist.sh N [pytest selection ...]     # default selection: -m dist
#
# Each run's log goes to $LOG_DIR (default: a new folder under /tmp); a failed run's summary lines
# and the rank output around its first error are printed. Exit code: 0 when all N runs passed, 1
# otherwise. Flaky teardown shows up here as "TEARDOWN FAULT" lines (see mmddp_hooks.ranks).
set -uo pipefail
cd "$(dirname "$0")/.."
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]]; then
  echo "usage: $0 N [pytest args...]   (default pytest args: -m dist)" >&2
  exit 2
fi
N=$1
shift
[ $# -gt 0 ] || set -- -m dist
. "$(dirname "$0")/python_env.sh"
LOG_DIR=${LOG_DIR:-$(mktemp -d /tmp/stress_dist.XXXXXX)}
mkdir -p "$LOG_DIR"
failed=()
start=$SECONDS
for i in $(seq 1 "$N"); do
  log="$LOG_DIR/run$i.log"
  t0=$SECONDS
  "$PYTHON" -m pytest -q -p no:cacheprovider "$@" >"$log" 2>&1
  rc=$?
  summary=$(tail -n 1 "$log")
  printf '[stress] run %d/%d: exit %d in %ds: %s\n' "$i" "$N" "$rc" $((SECONDS - t0)) "$summary"
  if [ $rc -ne 0 ]; then
    failed+=("$i")
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/[stress]   /'
    grep -n -m 3 -E 'TEARDOWN FAULT|terminate called|Traceback|FAILED \(exit code' "$log" \
      | sed 's/^/[stress]   /'
  fi
done
echo "[stress] $N runs of 'pytest $*' in $((SECONDS - start))s: $((N - ${#failed[@]})) passed," \
     "${#failed[@]} failed${failed:+ (runs ${failed[*]})}; logs in $LOG_DIR"
[ ${#failed[@]} -eq 0 ]
