#!/usr/bin/env bash
#
# tests/reportd/e2e.sh BIN_DIR SOURCE_DIR: the reference service end to
# end, as a user runs it (CTest: reportd_e2e, label e2e).  BIN_DIR holds
# reportd and downstream (build/examples/reportd).
#
#   1-5  the demo's scenarios (examples/reportd/lib.sh), on SQLite
#   6    SIGTERM under load (wrk and curl loops): no request lost, exit 0
#        within the shutdown timeout
#   7    100 clients hang up mid-request: GET /admin/in-flight says 0
#        50 ms (scaled) after the last close
#   8    malformed requests and headers: 4xx, never a crash
#   1-5  again on PostgreSQL (tests/pg/server.sh)
#
# Prints the demo's table with a row per scenario and exits 0 only when
# every one behaved.  CANCEL_TEST_TIME_SCALE widens the tolerances.
set -u -o pipefail

[[ $# -eq 2 ]] || {
  echo "usage: e2e.sh BIN_DIR SOURCE_DIR" >&2
  exit 2
}
bin=$1 src=$2
# shellcheck source=examples/reportd/lib.sh
. "$src/examples/reportd/lib.sh"

command -v wrk >/dev/null || rd_die "needs wrk (Debian: wrk)"
rd_setup "$bin"
rd_start_downstream

# $(e2e_count FILE ERE): how many lines of FILE match.
e2e_count() { grep -c -E -- "$2" "$1" 2>/dev/null; }

# e2e_wait_count FILE ERE N [MS]: waits until N lines of FILE match.
e2e_wait_count() {
  local deadline
  rd_now
  deadline=$((RD_NOW + ${4:-$(rd_ms 10000)} * 1000))
  while (($(e2e_count "$1" "$2") < $3)); do
    rd_now
    ((RD_NOW > deadline)) && return 1
    sleep 0.02
  done
}

# e2e_alive: reportd (RD_PID) is still running.
e2e_alive() { ! rd_exited "$RD_PID"; }

# e2e_no_errors: reportd logged nothing at level=error.
e2e_no_errors() { ! grep -q 'level=error' "$RD_LOG"; }

# ---- 6. SIGTERM under load ------------------------------------------------
# wrk keeps 32 keep-alive connections busy on a route that waits 50 ms on
# the downstream, and 4 curl loops open a new connection per request;
# SIGTERM lands with requests in flight.  Every request sent must get a
# response, 200 or 503 (one that arrives after the stop began):
#   wrk: read errors (a connection closed with a request on it) and
#     timeouts must stay 0.  Its write errors are connections refused once
#     reportd stopped listening (wrk counts a refused non-blocking connect
#     there): nothing was sent on them.  What wrk received must match
#     reportd's access lines.
#   curl: each request ends 200, 503, or "connection refused" (exit 7,
#     nothing sent); never a reset or an empty reply (exit 52, 56).
e2e_load() {
  local wrk_pid out w200 w503 wother s200 s503 sother werr k loops=() lost refused
  rd_begin
  # Light CPU work per request (--work): the load is on the plumbing, and
  # a sanitizer build's slow aggregation must not time requests out.
  rd_start_reportd load --shutdown-timeout 10000 --drain 5000 --work 100 ||
    rd_die "reportd did not start"
  rd_take_id
  wrk -t2 -c32 -d60s --timeout "$(rd_ms 10)s" -s "$src/tests/reportd/count.lua" \
    "$RD_URL/reports/$RD_ID?downstream_delay_ms=50" >"$RD_TMP/wrk.out" 2>&1 &
  wrk_pid=$!
  for k in 1 2 3 4; do
    while [[ ! -e $RD_TMP/load.stop ]]; do
      curl -s -o /dev/null -w '%{http_code} %{exitcode}\n' --max-time "$(rd_ms 10)" \
        "$RD_URL/reports/$RD_ID?downstream_delay_ms=50&loop=$k"
    done >"$RD_TMP/loop.$k" 2>&1 &
    loops+=("$!")
  done
  rd_expect "the load never reached 300 requests" \
    e2e_wait_count "$RD_LOG" 'msg=request ' 300
  rd_stop_reportd 10000
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "exit ${RD_STOP_MS} ms after SIGTERM: over the 10000 ms budget" \
    [ "$RD_STOP_MS" -le 10000 ]
  touch "$RD_TMP/load.stop"
  kill -INT "$wrk_pid" 2>/dev/null
  rd_expect "wrk did not stop" rd_wait_exit "$wrk_pid" "$(rd_ms 10000)"
  for k in "${loops[@]}"; do
    rd_expect "a curl loop did not stop" rd_wait_exit "$k" "$(rd_ms 15000)"
  done
  out=$(cat "$RD_TMP/wrk.out")
  w200=$(awk '$1 == "status" && $2 == 200 { print $3 }' <<<"$out")
  w503=$(awk '$1 == "status" && $2 == 503 { print $3 }' <<<"$out")
  wother=$(awk '$1 == "status" && $2 != 200 && $2 != 503 { n += $3 } END { print n + 0 }' <<<"$out")
  werr=$(grep '^errors ' <<<"$out")
  lost=$(cat "$RD_TMP"/loop.* | grep -c -v -E '^(200 0|503 0|000 7)$')
  refused=$(cat "$RD_TMP"/loop.* | grep -c '^000 7$')
  s200=$(e2e_count "$RD_LOG" 'msg=request .* status=200 ')
  s503=$(e2e_count "$RD_LOG" 'msg=request .* status=503 ')
  sother=$(grep 'msg=request ' "$RD_LOG" | grep -c -v -E ' status=(200|503) ')
  # reportd's lines count wrk's requests and the loops' together.
  local c200 c503
  c200=$(cat "$RD_TMP"/loop.* | grep -c '^200 0$')
  c503=$(cat "$RD_TMP"/loop.* | grep -c '^503 0$')
  rd_expect "wrk printed no counts (see its output)" rd_match "$werr" '^errors '
  rd_expect "wrk: requests lost: $werr" rd_match "$werr" ' read 0 .* timeout 0 '
  rd_expect "curl loops: $lost requests without an answer: $(cat "$RD_TMP"/loop.* |
    grep -v -E '^(200 0|503 0|000 7)$' | sort | uniq -c | tr '\n' ' ')" [ "$lost" = 0 ]
  rd_expect "wrk got $wother responses neither 200 nor 503" [ "$wother" = 0 ]
  rd_expect "reportd answered $sother requests neither 200 nor 503" [ "$sother" = 0 ]
  rd_expect "clients got $((${w200:-0} + c200)) x 200 + $((${w503:-0} + c503)) x 503, reportd sent $s200 + $s503" \
    [ "$((${w200:-0} + c200))/$((${w503:-0} + c503))" = "$s200/$s503" ]
  rd_expect "an error logged" e2e_no_errors
  local wlost
  wlost=$(awk '{ for (i = 1; i < NF; i++) if ($i == "read" || $i == "timeout") n += $(i + 1) }
               END { print n + 0 }' <<<"$werr")
  rd_row "6 SIGTERM under load (wrk + curl loops)" \
    "$((${w200:-0} + c200)) x 200, $((${w503:-0} + c503)) x 503, $((wlost + lost)) lost" \
    "SIGTERM -> exit $RD_STOP_MS ms (budget 10 s)" \
    "wrk ${werr#errors }; curl: $refused refused after stop"
}

# ---- 7. 100 clients hang up -------------------------------------------------
# 100 connections, each with a slow report in a handler of its own (128
# handler threads), close at once; 50 ms (scaled) after the last close,
# GET /admin/in-flight must say 0.
e2e_hangups() {
  local n=100 target line ends late="" inflight="" at="" gone
  rd_begin
  rd_start_reportd hangups --threads 128 || rd_die "reportd did not start"
  rd_take_id
  rd_hangup_start s7 "$RD_PORT" "$n" "/reports/$RD_ID?downstream_delay_ms=10000"
  # Every request in a handler (this GET excluded), then the hang-up.
  local deadline
  rd_now
  deadline=$((RD_NOW + $(rd_ms 10000) * 1000))
  while :; do
    inflight=$(curl -s --max-time 5 "$RD_URL/admin/in-flight")
    [[ $inflight == "$n" ]] && break
    rd_now
    ((RD_NOW > deadline)) && break
    sleep 0.02
  done
  rd_expect "only ${inflight:-?} of $n requests in flight before the hang-up" \
    [ "$inflight" = "$n" ]
  rd_expect "the clients could not hang up: $(cat "$RD_TMP/s7.err" 2>/dev/null)" \
    rd_hangup_go s7
  rd_expect "${RD_ANSWERED:-?} clients had an answer before they hung up" \
    [ "${RD_ANSWERED:-1}" = 0 ]
  target=$((${RD_CLOSE_US:-0} + $(rd_ms 50) * 1000))
  rd_now
  ((RD_NOW < target)) && sleep "$(awk -v u=$((target - RD_NOW)) 'BEGIN { printf "%.6f", u / 1e6 }')"
  rd_now
  at=$(((RD_NOW - ${RD_CLOSE_US:-0}) / 1000))
  inflight=$(curl -s --max-time 5 "$RD_URL/admin/in-flight")
  rd_expect "$inflight request(s) still in flight $at ms after the last close" \
    [ "$inflight" = 0 ]
  rd_expect "not every request was logged" \
    e2e_wait_count "$RD_LOG" "msg=request .* path=/reports/$RD_ID " "$n"
  gone=$(e2e_count "$RD_LOG" "path=/reports/$RD_ID .*status=499 .*cancel_kind=\"client gone\"")
  rd_expect "$gone of $n logged as 499 client gone" [ "$gone" = "$n" ]
  ends=$(grep "path=/reports/$RD_ID " "$RD_LOG" | grep -o 'handler_end_mono_us=[0-9]*' |
    cut -d= -f2 | sort -n | tail -n 1)
  if [[ -n $ends && -n ${RD_CLOSE_US:-} ]]; then
    late=$(awk -v e="$ends" -v c="$RD_CLOSE_US" 'BEGIN { printf "%.1f", (e - c) / 1000 }')
  fi
  rd_stop_reportd
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "an error logged" e2e_no_errors
  line="in-flight=$inflight at +$at ms"
  rd_row "7 $n clients hang up mid-request" "$gone x 499" \
    "last close -> last handler return ${late:-?} ms" "$line"
}

# ---- 8. Malformed input -------------------------------------------------------

# e2e_raw NAME [half]: sends the bytes of NAME.bin (temp dir) on a new TCP
# connection and prints the first line of the answer, "closed" (EOF or
# reset) or "timeout".  With "half", closes right after sending.
e2e_raw() {
  perl -MIO::Socket::INET -MIO::Select -e '
    my ($port, $file, $wait, $half) = @ARGV;
    $SIG{PIPE} = "IGNORE";
    open(my $f, "<:raw", $file) or die "$file: $!\n";
    my $data = do { local $/; <$f> };
    my $s = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port,
                                  Proto => "tcp") or do { print "refused\n"; exit };
    for (my $off = 0; $off < length $data;) {
      my $n = syswrite($s, $data, 65536, $off);
      last unless defined $n;   # the server closed: it may
      $off += $n;
    }
    if ($half) { close($s); print "sent\n"; exit }
    if (!IO::Select->new($s)->can_read($wait)) { print "timeout\n"; exit }
    my $n = sysread($s, my $buf, 4096);
    print $n ? (split /\r?\n/, $buf)[0] . "\n" : "closed\n";
  ' "$RD_PORT" "$RD_TMP/$1.bin" "$(rd_ms 5)" "${2:-}" 2>&1
}

# e2e_http_case WANT CURL-ARGS...: curl must get WANT, and reportd must
# log the request (http.h: every request ends with one access line).
e2e_http_case() {
  local want=$1 before
  shift
  before=$(e2e_count "$RD_LOG" "msg=request .* status=$want ")
  rd_curl s8 "$@"
  rd_expect "$* -> $RD_CODE, not $want" [ "$RD_CODE" = "$want" ]
  rd_expect "$* -> no access line with status=$want" \
    e2e_wait_count "$RD_LOG" "msg=request .* status=$want " $((before + 1)) "$(rd_ms 2000)"
  E2E_CASES=$((E2E_CASES + 1))
}

# e2e_header_case HEADER VALUE: served (200) with the header ignored and a
# warning that names it.
e2e_header_case() {
  rd_take_id
  e2e_http_case 200 -H "$1: $2" "$RD_URL/reports/$RD_ID"
  rd_expect "no warning for $1: $2" \
    rd_wait_log "$RD_LOG" "level=warn .*msg=\"malformed deadline header ignored\" .*header=$1 value=\"?$2\"? *$"
}

# e2e_raw_case NAME [half] [STATUS-ERE]: the raw bytes must get a 4xx (or
# STATUS-ERE) or a close; with half, the client closes first: nothing to
# check but that reportd goes on.
e2e_raw_case() {
  local got
  got=$(e2e_raw "$@")
  if [[ ${2:-} == half ]]; then
    rd_expect "$1: $got" [ "$got" = sent ]
  else
    rd_expect "$1 -> $got, not a 4xx or a close" rd_match "$got" "^(HTTP/1\\.[01] ${3:-4[0-9][0-9]}|closed)"
  fi
  E2E_CASES=$((E2E_CASES + 1))
}

e2e_malformed() {
  local u
  E2E_CASES=0
  rd_begin
  # The requests that are served must not time out on a busy machine.
  rd_start_reportd malformed --route-timeout 10000 --work 100 ||
    rd_die "reportd did not start"
  u=$RD_URL
  e2e_http_case 400 "$u/reports/abc"
  e2e_http_case 400 "$u/reports/-1"
  e2e_http_case 400 "$u/reports/99999999999999999999"
  e2e_http_case 404 "$u/reports/1000"
  e2e_http_case 404 "$u/no/such/route"
  e2e_http_case 405 -X DELETE "$u/health"
  e2e_http_case 405 -X POST "$u/reports/5"
  e2e_http_case 400 "$u/reports/5?downstream_delay_ms=xyz"
  e2e_http_case 400 "$u/reports/5?downstream_delay_ms=-1"
  e2e_http_case 400 "$u/reports/5?downstream_delay_ms=99999999"
  e2e_http_case 400 -X POST "$u/jobs?report=zz"
  e2e_http_case 400 -X POST "$u/jobs"
  e2e_http_case 400 "$u/jobs/abc"
  e2e_http_case 404 "$u/jobs/999999"
  e2e_http_case 400 "$u/scan/lots"
  # Route captures are exact (one spelling per report), a decoded NUL is 400.
  e2e_http_case 400 "$u/reports/%205"
  e2e_http_case 400 "$u/reports/+5"
  e2e_http_case 400 "$u/reports/05"
  e2e_http_case 400 "$u/reports/5%00"
  e2e_http_case 400 "$u/jobs/%201"
  e2e_http_case 400 -X POST "$u/jobs?report=%205"
  # Framing in doubt (RFC 9112 6.3), HTTP/1.1 without Host.
  e2e_http_case 400 -X POST -H 'Content-Length: 1' -H 'Content-Length: 2' \
    --data-binary 'ab' "$u/jobs?report=1"
  e2e_http_case 400 -H 'Host:' "$u/health"
  head -c $((2 * 1024 * 1024)) /dev/zero >"$RD_TMP/big.body"
  e2e_http_case 413 -X POST --data-binary "@$RD_TMP/big.body" "$u/jobs?report=1"
  e2e_header_case grpc-timeout banana
  e2e_header_case grpc-timeout 123456789S
  e2e_header_case grpc-timeout 10x
  e2e_header_case X-Request-Timeout-Ms 12abc
  e2e_header_case X-Request-Timeout-Ms -5
  # Raw bytes on a socket.
  printf 'GARBAGE \001\002\377 nonsense\r\n\r\n' >"$RD_TMP/garbage.bin"
  head -c 65536 /dev/urandom >"$RD_TMP/random.bin"
  printf 'GET /health HTTP/1.1\r\nHost: x\r\nX-Big: %s\r\n\r\n' \
    "$(head -c 100000 /dev/zero | tr '\0' a)" >"$RD_TMP/bigheader.bin"
  printf 'GET /he\000alth HTTP/1.1\r\nHost: x\r\n\r\n' >"$RD_TMP/nul.bin"
  printf 'POST /jobs?report=1 HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n' >"$RD_TMP/badlength.bin"
  printf 'GET /health HTTP/9.9\r\nHost: x\r\n\r\n' >"$RD_TMP/version.bin"
  printf 'GET /reports/5 HTTP/1.1\r\nHost: x\r\nX-Half: ' >"$RD_TMP/halfheaders.bin"
  printf 'POST /jobs?report=1 HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\nabc' >"$RD_TMP/halfbody.bin"
  e2e_raw_case garbage
  e2e_raw_case random
  e2e_raw_case bigheader
  e2e_raw_case nul
  e2e_raw_case badlength
  e2e_raw_case version "" 505 # HTTP Version Not Supported: the right answer
  e2e_raw_case halfheaders half
  e2e_raw_case halfbody half
  # Still there, still answering, nothing logged as an error.
  e2e_http_case 200 "$u/health"
  rd_expect "reportd exited (crashed?) during the malformed input" e2e_alive
  rd_expect "an error logged" e2e_no_errors
  rd_stop_reportd
  rd_expect "exit status $RD_EXIT after SIGTERM, not 0" [ "$RD_EXIT" = 0 ]
  rd_row "8 malformed requests and headers" "$E2E_CASES cases: 4xx, close or served" \
    "SIGTERM -> exit $RD_STOP_MS ms" \
    "$(rd_short "$(grep -m1 'malformed deadline header' "$RD_LOG")" msg header value)"
}

echo "== reportd end to end (time scale $RD_SCALE)"
rd_play_core SQLite
e2e_load
e2e_hangups
e2e_malformed
rd_play_diag 9
if rd_pg_start "$src"; then
  rd_play_core PostgreSQL --pg "$RD_PG"
  rd_pg_stop
else
  rd_begin
  rd_expect "tests/pg/server.sh could not start PostgreSQL (Debian: postgresql)" false
  rd_row "1-5 on PostgreSQL" "-" "-" "-"
fi
echo
rd_table
rd_finish
