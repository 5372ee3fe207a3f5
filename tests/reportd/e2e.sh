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
#   9-11 the watchdog and /metrics (examples/reportd/lib.sh)
#   12   bad jobs (a 404, a 503 for good) fail, with their error, after a
#        bounded number of attempts with backoff, while later jobs run
#   13   SIGTERM while a job waits for its backoff: exit at once; the
#        job's attempts and error are still there after a restart
#   14   hostile titles from the downstream (quotes, backslashes, control
#        and NUL bytes, 1 MiB, invalid UTF-8): JSON that parses and holds
#        the title exactly, or a 502
#   1-5, 12-13 again on PostgreSQL (tests/pg/server.sh)
#
# REPORTD_E2E_ONLY="jobs hostile" runs only the parts named (core, load,
# hangups, malformed, diag, jobs, hostile, pg): for development.
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
command -v jq >/dev/null || rd_die "needs jq (Debian: jq)"
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

# ---- 12-14. Jobs and JSON -----------------------------------------------------

# e2e_json NAME: the body rd_curl NAME got parses as JSON (jq).
e2e_json() { jq -e . "$RD_TMP/$1.body" >/dev/null 2>&1; }

# $(e2e_jq NAME FILTER): jq -r FILTER over NAME's body.
e2e_jq() { jq -r "$2" "$RD_TMP/$1.body" 2>/dev/null; }

# e2e_ds_put ROUTE FILE [QUERY]: PUT FILE's bytes to the downstream's
# /meta/ROUTE.  RD_CODE = its status.
e2e_ds_put() {
  rd_curl ds-put -X PUT --data-binary "@$2" "http://127.0.0.1:$DS_PORT/meta/$1${3:+?$3}"
}

# e2e_job_post REPORT: POST /jobs?report=REPORT; RD_JOB = the job's id, from
# a 202 whose body parses as JSON.
e2e_job_post() {
  RD_JOB=""
  rd_curl job-post -X POST "$RD_URL/jobs?report=$1"
  [[ $RD_CODE == 202 ]] && e2e_json job-post && RD_JOB=$(e2e_jq job-post .job)
  [[ $RD_JOB =~ ^[0-9]+$ ]]
}

# e2e_job_get JOB: GET /jobs/JOB (body in job-JOB.body, JSON); RD_JSTATE,
# RD_JATTEMPTS, RD_JERROR from it.
e2e_job_get() {
  RD_JSTATE="" RD_JATTEMPTS="" RD_JERROR=""
  rd_curl "job-$1" "$RD_URL/jobs/$1"
  [[ $RD_CODE == 200 ]] && e2e_json "job-$1" || return 1
  RD_JSTATE=$(e2e_jq "job-$1" .state)
  RD_JATTEMPTS=$(e2e_jq "job-$1" .attempts)
  RD_JERROR=$(e2e_jq "job-$1" '.last_error // ""')
}

# e2e_job_wait JOB STATE MS: polls GET /jobs/JOB until its state is STATE.
e2e_job_wait() {
  local deadline
  rd_now
  deadline=$((RD_NOW + $3 * 1000))
  while :; do
    e2e_job_get "$1" && [[ $RD_JSTATE == "$2" ]] && return 0
    rd_now
    ((RD_NOW > deadline)) && return 1
    sleep 0.02
  done
}

# e2e_jq_is NAME JQ-EXPR: NAME's body satisfies JQ-EXPR; e2e_job_is JOB
# JQ-EXPR: the job's last GET (e2e_job_get) does.
e2e_jq_is() { jq -e "$2" "$RD_TMP/$1.body" >/dev/null 2>&1; }
e2e_job_is() { e2e_jq_is "job-$1" "$2"; }

# $(e2e_line FILE ERE): the number of the first line of FILE that matches,
# 999999999 when none does.
e2e_line() {
  local n
  n=$(grep -n -m1 -E -- "$2" "$1" 2>/dev/null | cut -d: -f1)
  echo "${n:-999999999}"
}

# 12. A job whose report the downstream does not know (404: permanent)
# fails at its first attempt; one whose downstream answers 503 (transient)
# is retried with backoff (--job-backoff 500: waits of 250-500, 500-1000,
# 1000-2000 ms) and fails after --job-attempts 4; one that gets a 503
# until its first attempt failed succeeds at a later one; and a good job
# posted after them all is done before the 503 one's last attempt.  Each
# failed attempt is one warning; the downstream sees exactly the attempts.
e2e_jobs() {
  local tag=${1:+ [$1]} n=4 bad uid fid gid a b f c c2 t0 good_ms fail_ms
  local calls warns line="" bound committed last
  shift
  rd_begin
  # The job options from the environment (REPORTD_JOB_*, the flags'
  # twins), which a reportd without them ignores: on one, this fails on
  # what it does, not on how it is started.
  REPORTD_JOB_ATTEMPTS=$n REPORTD_JOB_BACKOFF_MS=500 REPORTD_JOB_BACKOFF_MAX_MS=10000 \
    rd_start_reportd "jobs$RD_NEXT_ID" --poll 100 --work 100 "$@" ||
    rd_die "reportd did not start"
  # Unknown to the downstream (ids 1..100 only), and this run's own: the
  # downstream's log counts its calls.
  bad=$((4200 + RD_NEXT_ID))
  rd_take_id && uid=$RD_ID
  rd_take_id && fid=$RD_ID
  rd_take_id && gid=$RD_ID
  printf '503' >"$RD_TMP/503.txt"
  printf '200' >"$RD_TMP/200.txt"
  e2e_ds_put "$uid/status" "$RD_TMP/503.txt"
  rd_expect "the downstream did not take status 503 for $uid ($RD_CODE)" [ "$RD_CODE" = 200 ]
  e2e_ds_put "$fid/status" "$RD_TMP/503.txt"
  rd_now
  t0=$RD_NOW
  rd_expect "POST /jobs?report=$bad: no job" e2e_job_post "$bad" && a=$RD_JOB
  rd_expect "POST /jobs?report=$uid: no job" e2e_job_post "$uid" && b=$RD_JOB
  rd_expect "POST /jobs?report=$fid: no job" e2e_job_post "$fid" && f=$RD_JOB
  rd_expect "POST /jobs?report=$gid: no job" e2e_job_post "$gid" && c=$RD_JOB
  # The downstream recovers for report fid once its first attempt failed.
  rd_expect "job $f never failed an attempt" \
    rd_wait_log "$RD_LOG" "level=warn .*msg=\"job attempt failed\" .*job=$f " "$(rd_ms 5000)"
  e2e_ds_put "$fid/status" "$RD_TMP/200.txt"
  # The good job, posted last, is done before the 503 one's last attempt:
  # reportd's own log says in which order it did them.
  rd_expect "the good job ${c:-?} (report $gid) was not done within $(rd_ms 5000) ms" \
    e2e_job_wait "${c:-0}" "done" "$(rd_ms 5000)"
  rd_now
  good_ms=$(((RD_NOW - t0) / 1000))
  rd_expect "job $c: no result with its title" \
    e2e_job_is "$c" ".result.title == \"Report $gid\" and .attempts == 1"
  committed=$(e2e_line "$RD_LOG" "msg=\"job committed\" job=$c ")
  last=$(e2e_line "$RD_LOG" "msg=\"job started\" job=$b report=$uid attempt=$n/$n")
  rd_expect "the good job $c was done (log line $committed) after the 503 job's last attempt (line $last)" \
    [ "$committed" -lt "$last" ]
  # The 404: failed at once, one attempt, the downstream called once.
  rd_expect "job $a (404) was not failed within $(rd_ms 2000) ms" \
    e2e_job_wait "${a:-0}" failed "$(rd_ms 2000)"
  rd_expect "job $a (404): $RD_JATTEMPTS attempts, not 1" [ "$RD_JATTEMPTS" = 1 ]
  rd_expect "job $a (404): last_error '$RD_JERROR' does not say 404" rd_match "$RD_JERROR" '404'
  rd_expect "job $a: not the GET /jobs JSON (job, report, state, attempts, timestamps)" \
    e2e_job_is "$a" ".job == $a and .report == $bad and .max_attempts == $n and
      (.created_at | test(\"^[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9:.]+Z$\")) and
      (.updated_at | type == \"string\") and .next_attempt_at == null and .result == null"
  rd_expect "job $f (503 until its first attempt) was not done within $(rd_ms 5000) ms" \
    e2e_job_wait "${f:-0}" "done" "$(rd_ms 5000)"
  rd_expect "job $f (503 until its first attempt): done after $RD_JATTEMPTS attempts, not 2..$n" \
    rd_match "$RD_JATTEMPTS" "^[2-$n]$"
  # The 503 for good: failed after n attempts, within the backoffs' sum
  # (at most 3500 ms) and the attempts' own time, and no sooner than the
  # shortest waits allow (1750 ms).
  bound=$((3500 + $(rd_ms 3000)))
  rd_expect "job $b (503) was not failed within $bound ms" \
    e2e_job_wait "${b:-0}" failed "$bound"
  rd_now
  fail_ms=$(((RD_NOW - t0) / 1000))
  rd_expect "job $b (503): $RD_JATTEMPTS attempts, not $n" [ "$RD_JATTEMPTS" = "$n" ]
  local b_attempts=$RD_JATTEMPTS
  rd_expect "job $b (503): last_error '$RD_JERROR' does not name the 503" rd_match "$RD_JERROR" '503'
  rd_expect "job $b failed ${fail_ms} ms after it was posted: sooner than its backoffs (>= 1750 ms)" \
    [ "$fail_ms" -ge 1700 ]
  # One more job, run to the end: the worker has looked at the queue again
  # since, and has not tried the failed ones.
  rd_take_id
  rd_expect "POST /jobs?report=$RD_ID: no job" e2e_job_post "$RD_ID" && c2=$RD_JOB
  rd_expect "the job posted last was not done" e2e_job_wait "${c2:-0}" "done" "$(rd_ms 5000)"
  calls=$(e2e_count "$DS_LOG" "msg=meta id=$uid ")
  rd_expect "the downstream was called $calls times for report $uid, not $n" [ "$calls" = "$n" ]
  calls=$(e2e_count "$DS_LOG" "msg=meta id=$bad ")
  rd_expect "the downstream was called $calls times for report $bad, not 1" [ "$calls" = 1 ]
  warns=$(e2e_count "$RD_LOG" "level=warn .*msg=\"?job (attempt )?failed\"? .*job=$a ")
  rd_expect "job $a (404): $warns warnings, not 1" [ "$warns" = 1 ]
  warns=$(e2e_count "$RD_LOG" "level=warn .*msg=\"?job (attempt )?failed\"? .*job=$b ")
  rd_expect "job $b (503): $warns warnings, not $n" [ "$warns" = "$n" ]
  rd_wait_log "$RD_LOG" "level=warn .*msg=\"job failed\" .*job=$b " 0 && line=$RD_LINE
  rd_stop_reportd
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "an error logged" e2e_no_errors
  rd_row "12 bad jobs do not block the queue$tag" \
    "404: failed, 1 attempt; 503: failed, ${b_attempts:-?} attempts" \
    "good job done +$good_ms ms; 503 failed +$fail_ms ms" \
    "$(rd_short "$line" msg attempts error)"
}

# 13. SIGTERM while the only job waits for its backoff (the downstream
# refuses connections: transient; --job-backoff 20000): reportd exits at
# once, not after the wait.  The job's attempts and error were stored: a
# new reportd on the same database shows them.
e2e_job_shutdown() {
  local tag=${1:+ [$1]} port job="" budget
  shift
  rd_begin
  port=$(perl -MIO::Socket::INET -e '
    my $s = IO::Socket::INET->new(Listen => 1, LocalAddr => "127.0.0.1",
                                  LocalPort => 0) or die "$!\n";
    print $s->sockport, "\n";')
  REPORTD_JOB_ATTEMPTS=5 REPORTD_JOB_BACKOFF_MS=20000 \
    rd_start_reportd "backoff$RD_NEXT_ID" --poll 100 --work 100 \
    --downstream "http://127.0.0.1:$port" "$@" || rd_die "reportd did not start"
  rd_take_id
  rd_expect "POST /jobs?report=$RD_ID: no job" e2e_job_post "$RD_ID" && job=$RD_JOB
  rd_expect "job $job never failed an attempt" \
    rd_wait_log "$RD_LOG" "level=warn .*msg=\"job attempt failed\" .*job=$job " "$(rd_ms 5000)"
  e2e_job_get "${job:-0}"
  rd_expect "job $job: $RD_JSTATE after $RD_JATTEMPTS attempts, not pending after 1" \
    [ "$RD_JSTATE/$RD_JATTEMPTS" = pending/1 ]
  rd_expect "job $job: last_error '$RD_JERROR' does not say the connection was refused" \
    rd_match "$RD_JERROR" '[Rr]efused'
  rd_expect "job $job: no next_attempt_at while it waits" \
    e2e_job_is "${job:-0}" '.next_attempt_at | type == "string"'
  budget=$(rd_ms 1000)
  rd_stop_reportd 10000
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "exit ${RD_STOP_MS} ms after SIGTERM during the backoff: over $budget ms" \
    [ "$RD_STOP_MS" -le "$budget" ]
  rd_expect "an error logged" e2e_no_errors
  local stop=$RD_STOP_MS
  REPORTD_JOB_BACKOFF_MS=20000 rd_start_reportd "backoff$RD_NEXT_ID" --poll 100 \
    --work 100 "$@" || rd_die "reportd did not start"
  e2e_job_get "${job:-0}"
  rd_expect "after a restart, job $job is $RD_JSTATE/$RD_JATTEMPTS with '$RD_JERROR', not pending/1 refused" \
    rd_match "$RD_JSTATE/$RD_JATTEMPTS/$RD_JERROR" '^pending/1/.*[Rr]efused'
  rd_stop_reportd
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_row "13 SIGTERM during a job's backoff$tag" "exit $RD_EXIT; job pending/1 kept" \
    "SIGTERM -> exit $stop ms (backoff 10-20 s)" \
    "last_error=\"$(printf '%.60s' "$RD_JERROR")\""
}

# 14. Titles a downstream may send: quotes, backslashes, every control
# byte, NUL, multibyte UTF-8 (U+2028 included), JSON-looking text, 1 MiB
# of all of them.  reportd's GET /reports/{id}, and a job's result in GET
# /jobs/{id}, must parse as JSON and hold the title byte for byte.  Invalid
# UTF-8 is refused by the downstream (400); sent anyway by a broken one
# (?unchecked=1, its bytes between quotes), reportd answers 502 and its
# job fails at once.
e2e_hostile() {
  local kind kinds=() exact=0 refused=0 job line="" t broken
  rd_begin
  rd_start_reportd hostile --poll 100 --work 100 --route-timeout 10000 ||
    rd_die "reportd did not start"
  perl -e '
    my $dir = shift;
    my %t = (
      quotes => q{He said "hi" "" \" and left"},
      backslashes => q{C:\new\table\\ \u0041 \\\\ \\},
      control => join("", map { chr } 1 .. 31, 127),
      nul => "before\0after\0",
      utf8 => "Gr\xc3\xbc\xc3\x9fe \xe2\x80\x94 \xe6\x97\xa5\xe6\x9c\xac " .
              "\xf0\x9f\x8e\x89 \xe2\x80\xa8 \xe2\x80\xa9 \xef\xbf\xbf",
      json => q{","id":0,"title":{"x":[1,2]}} . q{</script><!--},
      # 16 bytes a round, whole characters: exactly 1 MiB.
      big => ("\"\\\x01\x1f\x7f\xc3\xa9\xe6\x97\xa5\xf0\x9f\x8e\x89ab" x 65536),
      bad_ff => "title \xff",
      bad_overlong => "\xc0\xaf",
      bad_surrogate => "\xed\xa0\x80",
      bad_cut => "euro \xe2\x82",
      bad_cont => "\x80 alone",
    );
    for (keys %t) {
      open(my $f, ">:raw", "$dir/title-$_.bin") or die;
      print $f $t{$_};
    }' "$RD_TMP"
  for kind in quotes backslashes control nul utf8 json big; do
    rd_take_id
    e2e_ds_put "$RD_ID/title" "$RD_TMP/title-$kind.bin"
    rd_expect "the downstream did not take the $kind title ($RD_CODE)" [ "$RD_CODE" = 200 ]
    rd_curl "title-$kind" "$RD_URL/reports/$RD_ID"
    rd_expect "$kind title: $RD_CODE, not 200" [ "$RD_CODE" = 200 ]
    if ! e2e_json "title-$kind"; then
      rd_expect "$kind title: the response is not JSON: $(head -c 120 "$RD_TMP/title-$kind.body")" false
      continue
    fi
    jq -j .title "$RD_TMP/title-$kind.body" >"$RD_TMP/got-$kind.bin"
    if cmp -s "$RD_TMP/got-$kind.bin" "$RD_TMP/title-$kind.bin"; then
      exact=$((exact + 1))
    else
      rd_expect "$kind title: not the title sent ($(cmp "$RD_TMP/got-$kind.bin" "$RD_TMP/title-$kind.bin" 2>&1 | head -c 100))" false
    fi
    rd_expect "$kind title: the report's other fields are gone" \
      e2e_jq_is "title-$kind" ".id == $RD_ID and (.rows | type == \"number\") and
      (.digest | type == \"string\")"
    kinds+=("$kind:$RD_ID")
  done
  # A job's result: stored in the database, read back into GET /jobs/{id}.
  for t in "${kinds[@]}"; do
    kind=${t%%:*}
    [[ $kind == big || $kind == nul || $kind == quotes ]] || continue
    e2e_job_post "${t#*:}" || { rd_expect "$kind title: no job" false; continue; }
    job=$RD_JOB
    rd_expect "$kind title: job $job not done" e2e_job_wait "$job" "done" "$(rd_ms 10000)"
    jq -j .result.title "$RD_TMP/job-$job.body" >"$RD_TMP/got-job-$kind.bin"
    rd_expect "$kind title: job $job's result does not hold the title" \
      cmp -s "$RD_TMP/got-job-$kind.bin" "$RD_TMP/title-$kind.bin"
  done
  for kind in bad_ff bad_overlong bad_surrogate bad_cut bad_cont; do
    rd_take_id
    e2e_ds_put "$RD_ID/title" "$RD_TMP/title-$kind.bin"
    rd_expect "the downstream took the title $kind ($RD_CODE, not 400)" [ "$RD_CODE" = 400 ]
    [[ $RD_CODE == 400 ]] && refused=$((refused + 1))
  done
  # A broken downstream: invalid UTF-8 and a bare quote between quotes.
  rd_take_id
  printf 'broken \377 "quote' >"$RD_TMP/title-broken.bin"
  e2e_ds_put "$RD_ID/title" "$RD_TMP/title-broken.bin" unchecked=1
  rd_curl title-broken "$RD_URL/reports/$RD_ID"
  broken=$RD_CODE
  rd_expect "a broken downstream's JSON: $RD_CODE, not 502" [ "$RD_CODE" = 502 ]
  rd_expect "a broken downstream's JSON: no warning naming it" \
    rd_wait_log "$RD_LOG" 'level=warn .*msg="downstream failed" .*error="[^"]*JSON'
  line=$RD_LINE
  if e2e_job_post "$RD_ID"; then
    job=$RD_JOB
    rd_expect "a broken downstream's JSON: job $job not failed" \
      e2e_job_wait "$job" failed "$(rd_ms 5000)"
    rd_expect "a broken downstream's JSON: job $job failed after $RD_JATTEMPTS attempts, not 1" \
      [ "$RD_JATTEMPTS" = 1 ]
  else
    rd_expect "a broken downstream's JSON: no job" false
  fi
  rd_curl scan "$RD_URL/scan/10"
  rd_expect "GET /scan/10: $RD_CODE, or not {\"count\":10}" \
    e2e_jq_is scan '.count == 10'
  rd_stop_reportd
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "an error logged" e2e_no_errors
  rd_row "14 hostile titles" \
    "$exact exact (1 MiB too), $refused invalid UTF-8 refused, broken JSON -> $broken" \
    "-" "$(rd_short "$line" msg error)"
}

# e2e_want PART: PART is to run (REPORTD_E2E_ONLY, above).
e2e_want() { [[ -z ${REPORTD_E2E_ONLY:-} || " $REPORTD_E2E_ONLY " == *" $1 "* ]]; }

echo "== reportd end to end (time scale $RD_SCALE)"
e2e_want core && rd_play_core SQLite
e2e_want load && e2e_load
e2e_want hangups && e2e_hangups
e2e_want malformed && e2e_malformed
e2e_want diag && rd_play_diag 9
e2e_want jobs && e2e_jobs SQLite
e2e_want jobs && e2e_job_shutdown SQLite
e2e_want hostile && e2e_hostile
if ! e2e_want pg; then
  :
elif rd_pg_start "$src"; then
  rd_play_core PostgreSQL --pg "$RD_PG"
  e2e_jobs PostgreSQL --pg "$RD_PG"
  e2e_job_shutdown PostgreSQL --pg "$RD_PG"
  rd_pg_stop
else
  rd_begin
  rd_expect "tests/pg/server.sh could not start PostgreSQL (Debian: postgresql)" false
  rd_row "1-5 on PostgreSQL" "-" "-" "-"
fi
echo
rd_table
rd_finish
