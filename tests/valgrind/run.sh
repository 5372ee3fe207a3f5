#!/bin/sh
# Runs test and example programs under valgrind, JOBS at a time (valgrind
# runs one thread of a program at a time: two programs keep two cores
# busy), and prints one line per program in the order given, each
# program's output and valgrind's log after a failure.
#
#   run.sh BUILD-DIR JOBS TIMEOUT PROGRAM-SOURCE...
#
# The environment carries VALGRIND (the valgrind command line) and the
# tests' CANCEL_TEST_TIME_SCALE.  The last line is "PASSED FAILED".
set -eu
if [ "${1:-}" = --one ]; then
  # --one BUILD-DIR TIMEOUT SOURCE: one program; its status in a file.
  build=$2 timeout=$3 src=$4
  name=$(basename "$src" .c)
  exe=$build/${src%.c}
  log=$build/valgrind-$name.log
  if [ ! -x "$exe" ]; then
    echo skipped >"$log.status"
    exit 0
  fi
  # shellcheck disable=SC2086 # VALGRIND is a command line
  if timeout "$timeout" $VALGRIND --log-file="$log" "$exe" >"$log.out" 2>&1; then
    echo passed >"$log.status"
  else
    echo FAILED >"$log.status"
  fi
  exit 0
fi

build=$1 jobs=$2 timeout=$3
shift 3
for src in "$@"; do
  rm -f "$build/valgrind-$(basename "$src" .c).log.status"
done
# Those named in VALGRIND_ALONE (their timing needs a CPU of their own
# under valgrind: a timer thread that a neighbour keeps waiting fires too
# late for them) run after the others, one at a time.
together= alone=
for src in "$@"; do
  case " ${VALGRIND_ALONE:-} " in
  *" $(basename "$src" .c) "*) alone="$alone $src" ;;
  *) together="$together $src" ;;
  esac
done
# shellcheck disable=SC2086 # one program per word
printf '%s\n' $together | xargs -P "$jobs" -I{} sh "$0" --one "$build" "$timeout" {}
for src in $alone; do
  sh "$0" --one "$build" "$timeout" "$src"
done
passed=0 failed=0
for src in "$@"; do
  name=$(basename "$src" .c)
  log=$build/valgrind-$name.log
  status=$(cat "$log.status" 2>/dev/null || echo FAILED)
  case $status in
  passed) echo "valgrind $name: passed"; passed=$((passed + 1)) ;;
  skipped) echo "valgrind $name: not built, skipped" ;;
  *)
    echo "valgrind $name: FAILED"
    cat "$log.out" "$log" 2>/dev/null || true
    failed=$((failed + 1))
    ;;
  esac
done
echo "$passed $failed"
