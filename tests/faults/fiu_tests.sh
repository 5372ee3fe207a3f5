#!/usr/bin/env bash
# The project's own test programs under random allocation failures
# (libfiu's preload library: malloc, calloc and realloc fail with
# probability P), to see that a test that fails does so cleanly: it
# reports and stops its helpers, and never crashes the run.
#
#   tests/faults/fiu_tests.sh BUILD-DIR [RUNS] [PROBABILITY] [TEST...]
#
# Each program runs RUNS times (default 3; P default 0.002, 60 s each).
# A run ends "passed", "failed cleanly" (a non-zero exit, no signal) or
# "crashed" (killed by a signal, or cmocka caught one: "Test failed with
# exception"); a run over 60 s is "hung".  Prints one line per program and
# "N passed, M failed", where a failure is a crash or a hang; exits 1 then.
set -u
build=${1:?build dir}
runs=${2:-3}
prob=${3:-0.002}
shift $(($# < 3 ? $# : 3))
command -v fiu-run >/dev/null || { echo "fiu-run not found (Debian: fiu-utils)"; exit 1; }
tests=("$@")
if [ ${#tests[@]} -eq 0 ]; then
  for exe in "$build"/tests/*_test; do
    [ -x "$exe" ] && tests+=("$(basename "$exe")")
  done
fi
ok=0 bad=0
for t in "${tests[@]}"; do
  exe=$build/tests/$t
  passed=0 clean=0 crashed=0 hung=0
  for r in $(seq 1 "$runs"); do
    log=$build/fiu-$t-$r.log
    # -f "": no remote control.  Its thread starts before main() with
    # every signal unblocked, so a test's kill(getpid(), SIGTERM) (blocked
    # in all of the test's own threads, read by a signalfd) would kill the
    # process there.
    timeout -s KILL 60 fiu-run -x -f "" \
      -c "enable_random name=libc/mm/*,probability=$prob" \
      "$exe" >"$log" 2>&1 </dev/null
    rc=$?
    if [ $rc -eq 255 ] && ! grep -q -a "^\[ RUN" "$log"; then
      # cmocka's exit(-1) before any test ran: its own table could not be
      # allocated.  Not the tests' doing; after a test started, 255 is an
      # assertion outside a running test (in a helper thread): a crash.
      clean=$((clean + 1))
    elif [ $rc -eq 137 ]; then
      hung=$((hung + 1))
    elif [ $rc -gt 128 ] || grep -q "Test failed with exception" "$log"; then
      crashed=$((crashed + 1))
      echo "fiu $t run $r: crashed (exit $rc): $(grep -m1 -a 'exception\|Segmentation\|Aborted' "$log")"
    elif [ $rc -eq 0 ]; then
      passed=$((passed + 1))
    else
      clean=$((clean + 1))
    fi
  done
  echo "fiu $t: $runs runs: $passed passed, $clean failed cleanly, $crashed crashed, $hung hung"
  if [ $((crashed + hung)) -eq 0 ]; then ok=$((ok + 1)); else bad=$((bad + 1)); fi
done
echo "$ok passed, $bad failed"
[ $bad -eq 0 ]
