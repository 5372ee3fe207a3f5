#!/usr/bin/env bash
# Runs the libFuzzer harnesses of a fuzzing build for a bounded time each.
#
#   tests/fuzz/run.sh BUILD-DIR SECONDS [HARNESS...]
#
# Each harness starts from its committed corpus (tests/fuzz/corpus/<name>,
# read only) plus a working corpus in BUILD-DIR/corpus/<name> that keeps
# what earlier runs found; a crash leaves its input in BUILD-DIR/artifacts/.
# Prints one line per harness ("fuzz <name>: <runs> runs in <s> s, ...") and
# the totals as "N passed, M failed"; exits 1 when a harness failed.
set -u
build=${1:?build dir}
seconds=${2:?seconds per harness}
shift 2
here=$(cd "$(dirname "$0")" && pwd)
names=("$@")
if [ ${#names[@]} -eq 0 ]; then
  for exe in "$build"/fuzz/*_fuzz; do
    [ -x "$exe" ] && names+=("$(basename "$exe")")
  done
fi
if [ ${#names[@]} -eq 0 ]; then
  echo "fuzz: no harness built in $build/fuzz" >&2
  exit 1
fi
mkdir -p "$build/artifacts"
passed=0 failed=0
for name in "${names[@]}"; do
  exe=$build/fuzz/$name
  work=$build/corpus/$name
  seed=$here/corpus/${name%_fuzz}
  mkdir -p "$work"
  log=$build/$name.log
  dirs=("$work")
  [ -d "$seed" ] && dirs+=("$seed")
  # -timeout: one input that hangs for 10 s is a finding; -rss_limit_mb:
  # the harnesses hold little, a leak shows as growth.
  "$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 \
    -print_final_stats=1 -artifact_prefix="$build/artifacts/$name-" \
    "${dirs[@]}" >"$log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)
  corp=$(ls "$work" | wc -l)
  # The exposition harness checks the page's grammar itself; Prometheus'
  # own parser reads the page of the whole corpus replayed.
  if [ $rc -eq 0 ] && [ "$name" = metrics_fuzz ]; then
    if command -v promtool >/dev/null 2>&1; then
      METRICS_FUZZ_PAGE=$build/metrics_fuzz.prom "$exe" -runs=0 "${dirs[@]}" \
        >>"$log" 2>&1 || rc=$?
      if [ $rc -eq 0 ] && ! promtool check metrics <"$build/metrics_fuzz.prom" \
        >>"$log" 2>&1; then
        # promtool exits 1 for lint findings too (e.g. no HELP); only a
        # parse error fails the run.
        if grep -q 'error while linting\|text format parsing error' "$log"; then
          rc=1
          echo "promtool rejected the page of the replayed corpus" >>"$log"
        fi
      fi
    else
      echo "fuzz $name: promtool not found, page not checked by Prometheus"
    fi
  fi
  if [ $rc -eq 0 ]; then
    echo "fuzz $name: ${runs:-0} runs in ${secs:-?} s, corpus $corp new + $(ls "$seed" 2>/dev/null | wc -l) committed: passed"
    passed=$((passed + 1))
  else
    echo "fuzz $name: FAILED (exit $rc) after ${runs:-?} runs; log $log"
    grep -av '^#\|^INFO\|^    #\|^stat::' "$log" | head -n 20
    failed=$((failed + 1))
  fi
done
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
