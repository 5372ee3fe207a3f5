#!/usr/bin/env bash
#
# tests/reportd/sigterm_keepalive.sh BIN_DIR SOURCE_DIR [REPS]: SIGTERM
# under fast keep-alive load loses nothing (CTest: reportd_sigterm_keepalive,
# label e2e).  BIN_DIR holds reportd and downstream (build/examples/reportd).
#
# Each repetition (REPS, default 20) starts reportd, puts wrk on GET
# /health with 32 keep-alive connections (2 threads; thousands of requests
# a second, each connection sending its next request as soon as the last
# answer came), sends SIGTERM mid-run and waits for reportd to exit.  A
# request that reached reportd must be answered, 200 or 503 with
# Connection: close, before its connection closes:
#   - wrk's read errors (a connection closed with a request on it and no
#     answer) and timeouts stay 0; its connect and write errors are
#     connections refused after reportd stopped listening (nothing was
#     sent on them);
#   - every answer wrk got is 200 or 503, and each 503 closed its
#     connection (wrk then reconnects: refused);
#   - reportd's access lines are all 200 or 503 (no 499: nobody left) and
#     count what wrk received;
#   - reportd exits 0 and logs no warning or error.
# Prints one line per repetition and the totals, and exits 0 only when
# every repetition lost nothing.  CANCEL_TEST_TIME_SCALE widens the waits.
set -u -o pipefail

[[ $# -ge 2 ]] || {
  echo "usage: sigterm_keepalive.sh BIN_DIR SOURCE_DIR [REPS]" >&2
  exit 2
}
bin=$1 src=$2 reps=${3:-20}
# shellcheck source=examples/reportd/lib.sh
. "$src/examples/reportd/lib.sh"

command -v wrk >/dev/null || rd_die "needs wrk (Debian: wrk)"
rd_setup "$bin"
rd_start_downstream

# A wrk script: count.lua's counts, and the 503s that did not carry
# Connection: close (there must be none).
cat "$src/tests/reportd/count.lua" >"$RD_TMP/count.lua"
cat >>"$RD_TMP/count.lua" <<'EOF'
local base_response = response
response = function(status, headers, body)
  base_response(status, headers, body)
  if status == 503 then
    local c = headers["Connection"] or headers["connection"] or ""
    if string.lower(c) ~= "close" then
      counts[-1] = (counts[-1] or 0) + 1
    end
  end
end
EOF

total_lost=0 total_200=0 total_503=0 failed=0
for ((rep = 1; rep <= reps; rep++)); do
  rd_begin
  rd_start_reportd "ka$rep" --shutdown-timeout 10000 --drain 5000 ||
    rd_die "reportd did not start"
  wrk -t2 -c32 -d60s --timeout "$(rd_ms 10)s" -s "$RD_TMP/count.lua" \
    "$RD_URL/health" >"$RD_TMP/wrk.$rep" 2>&1 &
  wrk_pid=$!
  # Mid-run: the load is going (some thousand requests answered), and the
  # signal comes at a moment of its own in each repetition.
  if ! rd_wait_log "$RD_LOG" 'msg=request .* id=2000 ' "$(rd_ms 20000)"; then
    rd_expect "the load never reached 2000 requests" false
  fi
  sleep "0.0$((RANDOM % 10))"
  rd_stop_reportd 10000
  kill -INT "$wrk_pid" 2>/dev/null
  rd_wait_exit "$wrk_pid" "$(rd_ms 10000)" || rd_expect "wrk did not stop" false
  out=$(cat "$RD_TMP/wrk.$rep")
  werr=$(grep '^errors ' <<<"$out")
  w200=$(awk '$1 == "status" && $2 == 200 { print $3 }' <<<"$out")
  w503=$(awk '$1 == "status" && $2 == 503 { print $3 }' <<<"$out")
  wkeep=$(awk '$1 == "status" && $2 == -1 { print $3 }' <<<"$out")
  wother=$(awk '$1 == "status" && $2 != 200 && $2 != 503 && $2 != -1 { n += $3 }
                END { print n + 0 }' <<<"$out")
  wlost=$(awk '{ for (i = 1; i < NF; i++) if ($i == "read" || $i == "timeout") n += $(i + 1) }
               END { print n + 0 }' <<<"$werr")
  s200=$(grep -c -E 'msg=request .* status=200 ' "$RD_LOG")
  s503=$(grep -c -E 'msg=request .* status=503 ' "$RD_LOG")
  sother=$(grep 'msg=request ' "$RD_LOG" | grep -c -v -E ' status=(200|503) ')
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "wrk printed no counts (see its output)" rd_match "$werr" '^errors '
  rd_expect "wrk: requests lost: $werr" [ "$wlost" = 0 ]
  rd_expect "wrk got $wother answers neither 200 nor 503" [ "$wother" = 0 ]
  rd_expect "wrk got ${wkeep:-0} x 503 without Connection: close" [ -z "$wkeep" ]
  rd_expect "reportd logged $sother requests neither 200 nor 503" [ "$sother" = 0 ]
  rd_expect "wrk got ${w200:-0} x 200 + ${w503:-0} x 503, reportd sent $s200 + $s503" \
    [ "${w200:-0}/${w503:-0}" = "$s200/$s503" ]
  rd_expect "a warning or an error logged" \
    eval '! grep -q -E "level=(warn|error)" "$RD_LOG"'
  lost=$((wlost + sother))
  total_lost=$((total_lost + lost))
  total_200=$((total_200 + ${w200:-0}))
  total_503=$((total_503 + ${w503:-0}))
  rd_row "rep $rep" "${w200:-0} x 200, ${w503:-0} x 503, $lost lost" \
    "SIGTERM -> exit $RD_STOP_MS ms" "wrk ${werr#errors }; reportd: $sother not 200/503"
  if ((${#RD_PROBLEMS[@]} > 0)); then
    failed=$((failed + 1))
  else
    # A passed repetition's log (tens of thousands of lines) is not kept
    # for rd_finish to print.
    keep=()
    for f in "${RD_LOGS[@]}"; do [[ $f == "$RD_LOG" ]] || keep+=("$f"); done
    RD_LOGS=("${keep[@]}")
    rm -f "$RD_LOG"
  fi
done

echo
echo "SIGTERM under keep-alive load: $reps repetitions, $total_lost requests lost," \
  "$total_200 x 200, $total_503 x 503, $failed repetitions failed"
rd_table
rd_finish
