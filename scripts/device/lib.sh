# scripts/device/lib.sh — the step runner shared by run.sh and parts/*.sh (sourced, not run).
# The sourcing script sets SCRIPT_NAME (log prefix), OUT (logs), LOG (its summary file) and
# STEP_BUDGET (seconds it may use in all, counted by bash's SECONDS from its start).

say() { echo "[$SCRIPT_NAME $(date -u +%H:%M:%S)] $*" | tee -a "$LOG" >&2; }

failures=0
# step NAME TIMEOUT COMMAND...: one step, output in $OUT/NAME.log, its timeout cut to the budget
# left; a failure is counted in $failures and does not stop the others.
step() {
  local name="$1" limit="$2"; shift 2
  local left=$((STEP_BUDGET - SECONDS - 5))
  if (( left < 20 )); then say "$name: skipped, only ${left}s of the budget left"; failures=$((failures + 1)); return 0; fi
  (( limit > left )) && limit=$left
  say "$name: $* (timeout ${limit}s)"
  local start=$SECONDS
  timeout --kill-after=5 "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  say "$name: exit $rc after $((SECONDS - start))s (log $OUT/$name.log)"
  (( rc == 0 )) || failures=$((failures + 1))
  tail -n 20 "$OUT/$name.log" >&2
}
