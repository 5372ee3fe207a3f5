# shellcheck shell=bash
#
# examples/reportd/lib.sh: what `make demo` (examples/reportd/demo.sh) and
# the end-to-end tests (tests/reportd/e2e.sh) share.  Sourced, not run.
#
#   rd_setup BIN_DIR          temp dir, exit trap, the clock; call first
#   rd_start_downstream       the downstream on a free port (DS_PORT,
#                             DS_LOG)
#   rd_start_reportd LABEL [ARGS...]
#                             reportd on a free port, talking to the
#                             downstream (RD_PID, RD_PORT, RD_URL, RD_LOG)
#   rd_play_core LABEL [ARGS...]
#                             the five scenarios of issue 5, one table row
#                             each; ARGS choose the database (--db / --pg)
#   rd_table, rd_finish       the summary; rd_finish prints the logs when
#                             something failed and returns the verdict
#
# Every scenario is checked against reportd's own logfmt lines (its access
# line: status, dur_ms, cancel_kind, cancel_origin, after_cancel_ms,
# handler_end_mono_us), found by path; each scenario uses report ids of its
# own, so that a path (and the downstream's "meta id=N" line) names one
# request.  Waits poll a log file or a process with a bounded loop: nothing
# sleeps a fixed time where a condition can be waited for.
#
# Clients are real: curl's command line, and perl over plain TCP sockets
# where a client must hang up at a chosen moment or send raw bytes.  perl
# also reads CLOCK_MONOTONIC (Time::HiRes), the clock reportd's
# handler_end_mono_us is on, so "client closed -> handler returned" is
# measured across the two processes.
#
# CANCEL_TEST_TIME_SCALE (default 1) widens every tolerance and wait, not
# the timeouts under test.

RD_SCALE=${CANCEL_TEST_TIME_SCALE:-1}
if ! [[ $RD_SCALE =~ ^[0-9]*[.]?[0-9]+$ ]] ||
  ! awk -v s="$RD_SCALE" 'BEGIN { exit !(s > 0) }'; then
  RD_SCALE=1
fi

RD_LOGS=()      # every log written here: printed on failure
RD_FAILED=0     # scenarios that did not behave
RD_PASSED=0
RD_NEXT_ID=10   # report ids 1..100 are seeded; scenarios take their own
RD_PG_DIR=""    # a throwaway PostgreSQL's directory, when one runs
RD_ROW_RESULT=() RD_ROW_NAME=() RD_ROW_STATUS=() RD_ROW_TIME=() RD_ROW_LOG=()
RD_NOTES=()

rd_die() {
  echo "reportd demo: $*" >&2
  exit 1
}

# $(rd_ms N): N milliseconds widened by the time scale, rounded.
rd_ms() { awk -v v="$1" -v s="$RD_SCALE" 'BEGIN { printf "%d", v * s + 0.5 }'; }

# rd_cmp A OP B: a numeric comparison that takes decimals (awk).
rd_cmp() { awk -v a="$1" -v b="$3" "BEGIN { exit !(a $2 b) }"; }

# $(rd_fmt X): X with one decimal.
rd_fmt() { awk -v v="$1" 'BEGIN { printf "%.1f", v }'; }

# rd_now: RD_NOW = CLOCK_MONOTONIC in microseconds, from a perl coprocess
# (no fork per reading).  Not from a subshell: the coprocess's descriptors
# belong to this shell.
rd_now() {
  printf '\n' >&"${RD_CLOCK[1]}"
  read -r RD_NOW <&"${RD_CLOCK[0]}"
}

rd_setup() {
  RD_BIN=$1
  [[ -x $RD_BIN/reportd && -x $RD_BIN/downstream ]] ||
    rd_die "$RD_BIN/reportd and downstream are not built (make build)"
  command -v curl >/dev/null || rd_die "needs curl (Debian: curl)"
  perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -MIO::Socket::INET -e 1 \
    2>/dev/null || rd_die "needs perl with Time::HiRes (Debian: perl)"
  RD_TMP=$(mktemp -d "${TMPDIR:-/tmp}/reportd-demo.XXXXXX") ||
    rd_die "cannot make a temp dir"
  trap rd_cleanup EXIT
  trap 'exit 130' INT
  trap 'exit 143' TERM
  coproc RD_CLOCK {
    exec perl -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e \
      '$| = 1; while (<STDIN>) { printf "%.0f\n", clock_gettime(CLOCK_MONOTONIC) * 1e6 }'
  }
}

# On any exit: kills what this shell started and has not reaped (its
# jobs: a process already waited for is not among them, so a recycled pid
# is never hit), stops PostgreSQL, removes the temp dir.
rd_cleanup() {
  local pid
  for pid in $(jobs -p); do
    kill -KILL "$pid" 2>/dev/null
    wait "$pid" 2>/dev/null # reaps it quietly: no "Killed" notice
  done
  rd_pg_stop
  [[ -n ${RD_TMP:-} ]] && rm -rf "$RD_TMP"
}

# ---- Processes --------------------------------------------------------------

# rd_exited PID: true once PID has exited (a zombie, or gone).  Reads
# /proc with the shell's own `read`: polling forks nothing.
rd_exited() {
  local st
  read -r st 2>/dev/null <"/proc/$1/stat" || return 0
  st=${st##*) }
  [[ ${st%% *} == Z ]]
}

# rd_wait_exit PID MS: waits up to MS for PID (a child of this shell) to
# exit.  RD_EXIT = its status, or "killed" when it had to be killed;
# RD_EXIT_AT = when it was seen gone (rd_now).  Returns 0 when it exited.
rd_wait_exit() {
  local pid=$1 deadline
  rd_now
  deadline=$((RD_NOW + $2 * 1000))
  while ! rd_exited "$pid"; do
    rd_now
    if ((RD_NOW > deadline)); then
      kill -KILL "$pid" 2>/dev/null
      wait "$pid" 2>/dev/null
      RD_EXIT=killed RD_EXIT_AT=$RD_NOW
      return 1
    fi
    sleep 0.005
  done
  rd_now
  RD_EXIT_AT=$RD_NOW
  wait "$pid"
  RD_EXIT=$?
  return 0
}

# rd_spawn NAME PROGRAM ARGS...: starts a server that prints
# "listening port=N" on stdout and logs on stderr (NAME.log in the temp
# dir); waits for the port.  RD_SPAWN_PID, RD_SPAWN_PORT, RD_SPAWN_LOG.
rd_spawn() {
  local name=$1 out="$RD_TMP/$1.out" log="$RD_TMP/$1.log" line deadline
  shift
  : >"$out" # there before the child opens it: read below may come first
  "$@" >"$out" 2>"$log" &
  RD_SPAWN_PID=$!
  RD_LOGS+=("$log")
  RD_SPAWN_LOG=$log
  rd_now
  deadline=$((RD_NOW + $(rd_ms 10000) * 1000))
  while :; do
    line=""
    read -r line <"$out"
    if [[ $line == "listening port="* ]]; then
      RD_SPAWN_PORT=${line#listening port=}
      return 0
    fi
    rd_now
    if rd_exited "$RD_SPAWN_PID" || ((RD_NOW > deadline)); then
      echo "== $name did not start; its log:" >&2
      cat "$log" >&2
      return 1
    fi
    sleep 0.01
  done
}

rd_start_downstream() {
  rd_spawn downstream "$RD_BIN/downstream" --port 0 || rd_die "downstream did not start"
  DS_PID=$RD_SPAWN_PID DS_PORT=$RD_SPAWN_PORT DS_LOG=$RD_SPAWN_LOG
}

# rd_start_reportd LABEL [ARGS...]: a reportd on a free port, logging to
# reportd-LABEL.log.  Without --db or --pg among ARGS it uses reportd.db in
# the temp dir (created and seeded by the first reportd).
rd_start_reportd() {
  local label=$1 db=(--db "$RD_TMP/reportd.db")
  shift
  [[ " $* " == *" --db "* || " $* " == *" --pg "* ]] && db=()
  rd_spawn "reportd-$label" "$RD_BIN/reportd" --port 0 \
    --downstream "http://127.0.0.1:$DS_PORT" "${db[@]}" "$@" || return 1
  RD_PID=$RD_SPAWN_PID RD_PORT=$RD_SPAWN_PORT RD_LOG=$RD_SPAWN_LOG
  RD_URL="http://127.0.0.1:$RD_PORT"
}

# rd_stop_reportd [MS]: SIGTERM, then waits up to MS (default 15000
# scaled).  RD_EXIT, RD_STOP_MS (SIGTERM -> exit).
rd_stop_reportd() {
  local t0
  rd_now
  t0=$RD_NOW
  kill -TERM "$RD_PID"
  rd_wait_exit "$RD_PID" "${1:-$(rd_ms 15000)}"
  RD_STOP_MS=$(((RD_EXIT_AT - t0) / 1000))
}

# ---- Logs -------------------------------------------------------------------

# rd_wait_log FILE ERE [MS]: waits (default 5 s scaled) until a line of
# FILE matches ERE.  RD_LINE = the last such line.  Returns 1 on timeout.
rd_wait_log() {
  local file=$1 re=$2 deadline
  rd_now
  deadline=$((RD_NOW + ${3:-$(rd_ms 5000)} * 1000))
  while :; do
    RD_LINE=$(grep -E -- "$re" "$file" 2>/dev/null | tail -n 1)
    [[ -n $RD_LINE ]] && return 0
    rd_now
    ((RD_NOW > deadline)) && return 1
    sleep 0.01
  done
}

# rd_access FILE PATH [MS]: waits for the access line of the request for
# PATH (the path without its query string, as the access line has it).
rd_access() {
  rd_wait_log "$1" "msg=request .* path=$2 " "${3:-}"
}

# $(rd_field LINE KEY): a logfmt value, without its quotes.
rd_field() {
  local re=" $2=(\"[^\"]*\"|[^ ]*)"
  [[ " $1" =~ $re ]] || return 1
  local v=${BASH_REMATCH[1]}
  v=${v#\"}
  printf '%s' "${v%\"}"
}

# $(rd_short LINE KEY...): the line's level and the named fields, in that
# order, cut to 96 characters: the table's "log line".
rd_short() {
  local line=$1 out k v
  shift
  out="level=$(rd_field "$line" level)"
  for k in "$@"; do
    v=$(rd_field "$line" "$k") || continue
    [[ $v == *[\ =]* || -z $v ]] && v="\"$v\""
    out+=" $k=$v"
  done
  ((${#out} > 96)) && out="${out:0:93}..."
  printf '%s' "$out"
}

# ---- Clients ----------------------------------------------------------------

# rd_curl NAME CURL-ARGS...: runs curl, body to NAME.body in the temp dir.
# RD_CODE = the HTTP status (000: no response).
rd_curl() {
  local name=$1
  shift
  RD_CODE=$(curl -sS -o "$RD_TMP/$name.body" -w '%{http_code}' \
    --max-time "$(rd_ms 30)" "$@" 2>"$RD_TMP/$name.err")
}

# rd_hangup_start NAME PORT N PATH: perl opens N connections, sends
# "GET PATH" on each, then waits for a line on the FIFO NAME.go in the
# temp dir (rd_hangup_go), closes them all and writes the monotonic time
# (us) of the last close, and how many got an answer before it, to
# NAME.close.  A real TCP client that hangs up at the moment we choose.
rd_hangup_start() {
  local name=$1 fifo="$RD_TMP/$1.go"
  mkfifo "$fifo"
  # Open read-write: never blocks, and keeps a writer so perl's read
  # blocks for the line, not for an open.
  exec {RD_GO_FD}<>"$fifo"
  perl -MIO::Socket::INET -MIO::Select -MTime::HiRes=clock_gettime,CLOCK_MONOTONIC -e '
    my ($port, $n, $path) = @ARGV;
    my @s;
    for (1 .. $n) {
      my $c = IO::Socket::INET->new(PeerAddr => "127.0.0.1", PeerPort => $port,
                                    Proto => "tcp") or die "connect: $!\n";
      $c->autoflush(1);
      print $c "GET $path HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: reportd-hangup\r\n\r\n";
      push @s, $c;
    }
    my $go = <STDIN>;
    my $answered = IO::Select->new(@s)->can_read(0);
    my $t;
    for my $c (@s) { $t = clock_gettime(CLOCK_MONOTONIC); close($c); }
    printf "%.0f %d\n", $t * 1e6, $answered;
  ' "$2" "$3" "$4" <"$fifo" >"$RD_TMP/$name.close" 2>"$RD_TMP/$name.err" &
  RD_HANGUP_PID=$!
}

# rd_hangup_go NAME: the clients hang up now.  RD_CLOSE_US = the last
# close, RD_ANSWERED = connections that had an answer before (should be 0).
rd_hangup_go() {
  printf 'go\n' >&"$RD_GO_FD"
  exec {RD_GO_FD}>&-
  RD_CLOSE_US="" RD_ANSWERED=""
  rd_wait_exit "$RD_HANGUP_PID" "$(rd_ms 10000)" || return 1
  read -r RD_CLOSE_US RD_ANSWERED <"$RD_TMP/$1.close"
  [[ -n $RD_CLOSE_US ]]
}

# rd_take_id: RD_ID = a report id no other scenario used.
rd_take_id() {
  RD_ID=$RD_NEXT_ID
  RD_NEXT_ID=$((RD_NEXT_ID + 1))
}

# ---- Checks and the table ---------------------------------------------------

# rd_begin: starts a scenario's checks; rd_expect WHAT COMMAND... records
# WHAT when COMMAND fails; rd_row adds the table row with the verdict.
rd_begin() { RD_PROBLEMS=(); }
rd_expect() {
  local what=$1
  shift
  "$@" || RD_PROBLEMS+=("$what")
}
rd_match() { [[ $1 =~ $2 ]]; }
# rd_ere TEXT: TEXT as an ERE that matches it literally (a source's name
# such as "route GET /reports/{id}" holds braces).
rd_ere() { sed 's/[][\\.*^$(){}?+|]/\\&/g' <<<"$1"; }
# rd_absent_in TEXT PART: TEXT does not hold PART (a fixed string).
rd_absent_in() { [[ $1 != *"$2"* ]]; }
# rd_absent FILE TEXT: no line of FILE holds TEXT (a fixed string).
rd_absent() { ! grep -qF -- "$2" "$1"; }

# rd_check_access PATH ERE WHAT: reportd's access line for PATH must come
# and match ERE (WHAT: what it should say).  RD_LINE = the line.
rd_check_access() {
  rd_expect "no access line for $1" rd_access "$RD_LOG" "$1"
  rd_expect "access line: not $3" rd_match "$RD_LINE" "$2"
}

# rd_row NAME STATUS TIME LOG
rd_row() {
  local result=ok p
  if ((${#RD_PROBLEMS[@]} > 0)); then
    result=FAIL
    RD_FAILED=$((RD_FAILED + 1))
    for p in "${RD_PROBLEMS[@]}"; do RD_NOTES+=("$1: $p"); done
  else
    RD_PASSED=$((RD_PASSED + 1))
  fi
  RD_ROW_RESULT+=("$result") RD_ROW_NAME+=("$1") RD_ROW_STATUS+=("$2")
  RD_ROW_TIME+=("$3") RD_ROW_LOG+=("$4")
  printf '  %-4s %s\n' "$result" "$1"
}

rd_table() {
  local w=(0 0 0 0) i c cols
  local head=("scenario" "status" "time from cause to stop" "log line (shortened)")
  for ((c = 0; c < 3; c++)); do w[c]=${#head[c]}; done
  for i in "${!RD_ROW_NAME[@]}"; do
    cols=("${RD_ROW_RESULT[i]} ${RD_ROW_NAME[i]}" "${RD_ROW_STATUS[i]}" "${RD_ROW_TIME[i]}")
    for ((c = 0; c < 3; c++)); do
      ((${#cols[c]} > w[c])) && w[c]=${#cols[c]}
    done
  done
  printf "%-${w[0]}s | %-${w[1]}s | %-${w[2]}s | %s\n" "${head[@]}"
  printf '%s-|-%s-|-%s-|-%s\n' "$(printf '%*s' "${w[0]}" '' | tr ' ' -)" \
    "$(printf '%*s' "${w[1]}" '' | tr ' ' -)" \
    "$(printf '%*s' "${w[2]}" '' | tr ' ' -)" "--------------------"
  for i in "${!RD_ROW_NAME[@]}"; do
    printf "%-${w[0]}s | %-${w[1]}s | %-${w[2]}s | %s\n" \
      "${RD_ROW_RESULT[i]} ${RD_ROW_NAME[i]}" "${RD_ROW_STATUS[i]}" \
      "${RD_ROW_TIME[i]}" "${RD_ROW_LOG[i]}"
  done
}

# rd_finish: stops the downstream (it must exit 0 too), looks for
# sanitizer reports in every log (a sanitizer build's programs write them
# on standard error), prints the verdict line and, on failure, what failed
# and the logs.  Returns 0 only when every scenario behaved.
rd_finish() {
  local n f
  if [[ -n ${DS_PID:-} ]]; then
    kill -TERM "$DS_PID"
    rd_wait_exit "$DS_PID" "$(rd_ms 10000)"
    if [[ $RD_EXIT != 0 ]]; then
      RD_FAILED=$((RD_FAILED + 1))
      RD_NOTES+=("downstream: exit status $RD_EXIT after SIGTERM, not 0")
    fi
  fi
  for f in "${RD_LOGS[@]}"; do
    if grep -q -E 'WARNING: ThreadSanitizer|ERROR: (Address|Leak)Sanitizer|runtime error:' "$f"; then
      RD_FAILED=$((RD_FAILED + 1))
      RD_NOTES+=("$(basename "$f"): a sanitizer report")
    fi
  done
  if ((RD_FAILED > 0)); then
    echo
    echo "What did not behave:"
    for n in "${RD_NOTES[@]}"; do echo "  - $n"; done
    for f in "${RD_LOGS[@]}"; do
      [[ -s $f ]] || continue
      echo
      echo "== $(basename "$f") (last 150 lines)"
      tail -n 150 "$f"
    done
  fi
  echo
  echo "scenarios: $RD_PASSED passed, $RD_FAILED failed"
  ((RD_FAILED == 0))
}

# ---- The scenarios ----------------------------------------------------------
# Each runs against the reportd of RD_URL / RD_LOG and adds one row.
# Tolerances: RD_LATE_MS (default 500, scaled) for "how long after its
# cause did it stop"; the typical figure is a millisecond or two, the
# margin is for a loaded machine.

RD_LATE_MS=${RD_LATE_MS:-500}

# 1. A request that completes: 200 and the report's JSON.
rd_scenario_complete() {
  local line body
  rd_begin
  rd_take_id
  rd_curl "s1-$RD_ID" "$RD_URL/reports/$RD_ID"
  body=$(cat "$RD_TMP/s1-$RD_ID.body" 2>/dev/null)
  rd_expect "answered $RD_CODE, not 200" [ "$RD_CODE" = 200 ]
  rd_expect "body is not the report's JSON: $body" \
    rd_match "$body" "^\\{\"id\":$RD_ID,\"title\":\"Report $RD_ID\",\"rows\":[0-9]+,"
  rd_check_access "/reports/$RD_ID" 'level=info .* status=200 ' "status=200 at info"
  line=$RD_LINE
  rd_row "1 request completes$1" "$RD_CODE + JSON" \
    "- (served in $(rd_fmt "$(rd_field "$line" dur_ms)") ms)" \
    "$(rd_short "$line" path status dur_ms)"
}

# 2. A client that hangs up while reportd waits on the downstream: 499 at
# info, kind "client gone", nothing sent; the downstream call is cut too.
# The time from the client's close() to the handler's return is measured
# across the two processes: both on CLOCK_MONOTONIC.
rd_scenario_client_gone() {
  local line end stop_ms="?" ds="" name
  rd_begin
  rd_take_id
  name="s2-$RD_ID"
  rd_hangup_start "$name" "$RD_PORT" 1 "/reports/$RD_ID?downstream_delay_ms=3000"
  # Mid-request: the downstream has reportd's call.
  rd_expect "the downstream never got the call" \
    rd_wait_log "$DS_LOG" "msg=meta id=$RD_ID "
  rd_expect "the client could not hang up: $(cat "$RD_TMP/$name.err" 2>/dev/null)" \
    rd_hangup_go "$name"
  rd_expect "the client had an answer before it hung up" [ "${RD_ANSWERED:-0}" = 0 ]
  rd_check_access "/reports/$RD_ID" 'level=info .* status=499 .*cancel_kind="client gone"' \
    "status=499 at info, kind client gone"
  line=$RD_LINE
  end=$(rd_field "$line" handler_end_mono_us)
  if [[ -n $end && -n $RD_CLOSE_US ]]; then
    stop_ms=$(awk -v u=$((end - RD_CLOSE_US)) 'BEGIN { printf "%.1f", u / 1000 }')
    rd_expect "the handler returned $stop_ms ms after the close (> $(rd_ms "$RD_LATE_MS"))" \
      rd_cmp "$stop_ms" '<=' "$(rd_ms "$RD_LATE_MS")"
  else
    rd_expect "no handler_end_mono_us in the access line, or no close time" false
  fi
  # reportd hung up on the downstream, which saw its client go.
  rd_wait_log "$DS_LOG" "msg=request .* path=/meta/$RD_ID .*status=499 " && ds="; downstream 499"
  rd_expect "the downstream did not see its call go (no 499 for /meta/$RD_ID)" [ -n "$ds" ]
  rd_row "2 client hangs up mid-request$1" "499 (nothing sent)$ds" \
    "close -> handler returned $stop_ms ms" \
    "$(rd_short "$line" status cancel_kind after_cancel_ms)"
}

# rd__timed_out NAME TIMEOUT_MS ORIGIN CURL-ARGS...: a request for
# /reports/<new id>?downstream_delay_ms=3000 that must be answered 504 by
# a warning naming ORIGIN, TIMEOUT_MS after it arrived.  RD_T_LINE = the
# access line; RD_T_LATE = ms from the deadline to the answer (dur_ms -
# TIMEOUT_MS; after_cancel_ms is not always in the line, see
# src/adapters/http.c's classify()).
rd__timed_out() {
  local name=$1 timeout=$2 origin=$3 dur
  shift 3
  rd_begin
  rd_take_id
  rd_curl "$name-$RD_ID" "$@" "$RD_URL/reports/$RD_ID?downstream_delay_ms=3000"
  rd_expect "answered $RD_CODE, not 504" [ "$RD_CODE" = 504 ]
  rd_check_access "/reports/$RD_ID" \
    "level=warn .* status=504 .*cancel_kind=timeout cancel_origin=\"$(rd_ere "$origin")\"" \
    "a warning, status=504, cancel_kind=timeout, origin $origin"
  RD_T_LINE=$RD_LINE
  dur=$(rd_field "$RD_T_LINE" dur_ms)
  RD_T_LATE=$(awk -v d="${dur:-1e9}" -v t="$timeout" 'BEGIN { printf "%.1f", d - t }')
  rd_expect "answered after ${dur:-?} ms, before its ${timeout} ms" \
    rd_cmp "$RD_T_LATE" '>=' -5
  rd_expect "answered ${RD_T_LATE} ms after its deadline (> $(rd_ms "$RD_LATE_MS"))" \
    rd_cmp "$RD_T_LATE" '<=' "$(rd_ms "$RD_LATE_MS")"
  RD_T_STATUS="$RD_CODE after $(rd_fmt "${dur:-0}") ms"
}

# 3. The route's timeout (reportd runs with --route-timeout 1000): 504 and
# a warning naming the route's source, "route GET /reports/{id}".
rd_scenario_route_timeout() {
  rd__timed_out s3 1000 "route GET /reports/{id}"
  rd_row "3 route timeout (1 s)$1" "$RD_T_STATUS" \
    "timeout -> 504 sent +$RD_T_LATE ms" \
    "$(rd_short "$RD_T_LINE" status cancel_kind cancel_origin)"
}

# 3b. The downstream call's own timeout (reportd runs with
# --downstream-timeout 300 and --route-timeout 5000): a source the handler
# derived from the request's token fired, not the request's: 504 and a
# warning naming "downstream call", not a 500 (issue 12).
rd_scenario_downstream_timeout() {
  rd__timed_out s3b 300 "downstream call"
  rd_expect "the access line is not a warning without error: $RD_T_LINE" \
    rd_absent_in "$RD_T_LINE" "error="
  rd_row "3b downstream call timeout (300 ms)$1" "$RD_T_STATUS" \
    "timeout -> 504 sent +$RD_T_LATE ms" \
    "$(rd_short "$RD_T_LINE" status cancel_kind cancel_origin)"
}

# 4. The caller's deadline header, shorter than the route's timeout: 504
# after ~200 ms naming the header; the downstream got what was left.
rd_scenario_deadline() {
  local got=""
  rd__timed_out s4 200 "deadline header grpc-timeout" -H 'grpc-timeout: 200m'
  if rd_wait_log "$DS_LOG" "msg=meta id=$RD_ID "; then
    got=$(rd_field "$RD_LINE" grpc_timeout)
  fi
  # What was left of 200 ms when reportd called: positive, at most 200.
  rd_expect "the downstream got grpc-timeout=${got:--}, not the remaining budget" \
    rd_match "$got" '^(200|1[0-9][0-9]|[1-9][0-9]?)m$'
  rd_row "4 header grpc-timeout: 200m$1" "$RD_T_STATUS" \
    "deadline -> 504 sent +$RD_T_LATE ms" \
    "$(rd_short "$RD_T_LINE" status cancel_origin); downstream got grpc-timeout ${got:--}"
}

# 5. SIGTERM with three slow requests and a job's COMMIT in flight
# (reportd runs with --commit-delay, --poll 100, --shutdown-timeout 10000):
# the requests are answered (200, or 503 once the drain ends), the shielded
# commit finishes (stopping=1), the workers stop, exit 0 within the budget.
# PostgreSQL has no slow-commit hook (--commit-delay is SQLite's): there
# the job commits before the signal.
rd_scenario_sigterm() {
  local pg=$2 line k pids=() ids=() codes="" job="" what="3 requests + job commit"
  [[ -n $pg ]] && what="3 requests (job done before)"
  rd_begin
  rd_take_id
  rd_curl "s5-$RD_ID" -X POST "$RD_URL/jobs?report=$RD_ID"
  rd_expect "POST /jobs answered $RD_CODE, not 202" [ "$RD_CODE" = 202 ]
  if [[ -z $pg ]]; then
    rd_expect "no job commit started" \
      rd_wait_log "$RD_LOG" 'msg="job commit started"' "$(rd_ms 5000)"
  else
    rd_expect "the job did not commit" \
      rd_wait_log "$RD_LOG" 'msg="job committed"' "$(rd_ms 5000)"
  fi
  for k in 1 2 3; do
    rd_take_id
    ids[k]=$RD_ID
    curl -sS -o /dev/null -w '%{http_code}' --max-time "$(rd_ms 30)" \
      "$RD_URL/reports/$RD_ID?downstream_delay_ms=800" >"$RD_TMP/s5-$RD_ID.code" 2>&1 &
    pids[k]=$!
  done
  for k in 1 2 3; do
    rd_expect "request $k never reached the downstream" \
      rd_wait_log "$DS_LOG" "msg=meta id=${ids[k]} "
  done
  rd_stop_reportd 10000
  rd_expect "exit status $RD_EXIT, not 0" [ "$RD_EXIT" = 0 ]
  rd_expect "exit ${RD_STOP_MS} ms after SIGTERM: over the 10000 ms budget" \
    [ "$RD_STOP_MS" -le 10000 ]
  for k in 1 2 3; do
    wait "${pids[k]}"
    codes+="${codes:+ }$(cat "$RD_TMP/s5-${ids[k]}.code")"
  done
  rd_expect "in-flight requests answered $codes (want 200 or 503 each)" \
    rd_match "$codes" '^(200|503) (200|503) (200|503)$'
  rd_wait_log "$RD_LOG" 'msg="job committed"' 0 && job=$RD_LINE
  if [[ -z $pg ]]; then
    rd_expect "the job's commit did not finish under SIGTERM (no committed stopping=1)" \
      rd_match "$job" 'stopping=1'
  fi
  rd_expect "the jobs worker did not stop" \
    rd_wait_log "$RD_LOG" 'msg="worker stopped" .*worker=jobs ' 0
  rd_expect "the http worker did not stop" \
    rd_wait_log "$RD_LOG" 'msg="worker stopped" .*worker=http ' 0
  rd_expect "no stopped line with status=0" \
    rd_wait_log "$RD_LOG" 'msg=stopped host=reportd status=0 ' 0
  line=$RD_LINE
  rd_row "5 SIGTERM, $what$1" "exit $RD_EXIT; $codes" \
    "SIGTERM -> exit $RD_STOP_MS ms (budget 10 s)" \
    "$(rd_short "$job" msg stopping); $(rd_short "$line" msg status)"
}

# rd_play_core LABEL [ARGS...]: the five scenarios against one database
# (ARGS: --db FILE or --pg CONNINFO; LABEL tags the rows).  Scenarios 1-4
# share one reportd (--route-timeout 1000), which then must stop cleanly;
# scenario 3b has its own (--downstream-timeout 300, under a 5 s route
# timeout); scenario 5 has its own (--route-timeout 5000: its requests are slow, not
# late).  Both aggregate with a tenth of the default CPU work (--work
# 2000): a sanitizer build on a busy machine still answers well within
# the timeouts that are not under test.
rd_play_core() {
  local tag=${1:+ [$1]} pg=""
  shift
  [[ " $* " == *" --pg "* ]] && pg=1
  rd_start_reportd "core$RD_NEXT_ID" --route-timeout 1000 --poll 100 --work 2000 "$@" ||
    rd_die "reportd did not start"
  rd_scenario_complete "$tag"
  rd_scenario_client_gone "$tag"
  rd_scenario_route_timeout "$tag"
  rd_scenario_deadline "$tag"
  rd_stop_reportd
  if [[ $RD_EXIT != 0 ]] || grep -q 'level=error' "$RD_LOG"; then
    RD_FAILED=$((RD_FAILED + 1))
    RD_NOTES+=("reportd of scenarios 1-4$tag: exit status $RD_EXIT, or an error logged")
  fi
  rd_start_reportd "ds$RD_NEXT_ID" --route-timeout 5000 --downstream-timeout 300 \
    --poll 100 --work 2000 "$@" || rd_die "reportd did not start"
  rd_scenario_downstream_timeout "$tag"
  rd_stop_reportd
  if [[ $RD_EXIT != 0 ]] || grep -q 'level=error' "$RD_LOG"; then
    RD_FAILED=$((RD_FAILED + 1))
    RD_NOTES+=("reportd of scenario 3b$tag: exit status $RD_EXIT, or an error logged")
  fi
  # The commit must still run when SIGTERM comes (a slow machine takes
  # longer to start the three requests), and end well within the budget.
  local delay
  delay=$(rd_ms 1500)
  ((delay > 5000)) && delay=5000
  rd_start_reportd "sigterm$RD_NEXT_ID" --commit-delay "$delay" --poll 100 \
    --shutdown-timeout 10000 --route-timeout 5000 --work 2000 "$@" ||
    rd_die "reportd did not start"
  rd_scenario_sigterm "$tag" "$pg"
}

# ---- Diagnostics (issue 6) ----------------------------------------------------

# rd__hangup_after_downstream NAME PATH: a client asks for PATH (a report
# whose downstream call takes 50 ms) and hangs up as soon as the
# downstream has answered reportd: reportd is then aggregating.
rd__hangup_after_downstream() {
  local name=$1 path=$2
  rd_hangup_start "$name" "$RD_PORT" 1 "$path?downstream_delay_ms=50"
  rd_expect "the downstream never answered reportd's call" \
    rd_wait_log "$DS_LOG" "msg=request .* path=/meta/$RD_ID .*status=200 "
  rd_expect "the client could not hang up: $(cat "$RD_TMP/$name.err" 2>/dev/null)" \
    rd_hangup_go "$name"
}

# 6. The seeded bug (--seeded-bug): GET /buggy/reports/{id} drops its token
# before the aggregation.  The client hangs up while it aggregates: the
# watchdog reports the handler's scope by name, with the reason and a stack
# naming aggregate_ignoring_token, and once more when it ends.
rd_scenario_watchdog() {
  local line report="" over="?" since="?" top="no stack"
  rd_begin
  rd_take_id
  rd__hangup_after_downstream "s6-$RD_ID" "/buggy/reports/$RD_ID"
  if rd_wait_log "$RD_LOG" 'msg="scope still running after cancel" scope="GET /buggy/reports/\{id\}"'; then
    report=$RD_LINE
    since=$(rd_fmt "$(rd_field "$report" since_cancel_ms)")
  fi
  rd_expect "no watchdog report for the buggy route" [ -n "$report" ]
  rd_expect "the report does not say the client left" \
    rd_match "$report" 'cancel_kind="client gone"'
  if rd_wait_log "$RD_LOG" 'msg=(stack|"stack unavailable") scope="GET /buggy/reports/\{id\}"'; then
    rd_wait_log "$RD_LOG" 'msg=stack scope="GET /buggy/reports/\{id\}" .*aggregate_ignoring_token' 0 &&
      top="aggregate_ignoring_token"
  fi
  # ThreadSanitizer delivers a signal only when the thread next makes a
  # call it intercepts: a loop of arithmetic (the seeded bug) gets no stack
  # under TSan, and the watchdog says so ("stack unavailable").
  if [[ $top != aggregate_ignoring_token && $(ldd "$RD_BIN/reportd" 2>/dev/null) == *libtsan* ]] &&
    grep -q 'msg="stack unavailable" scope="GET /buggy/reports/{id}"' "$RD_LOG"; then
    top="unavailable under TSan"
  else
    rd_expect "no stack frame names aggregate_ignoring_token" [ "$top" = aggregate_ignoring_token ]
  fi
  if rd_wait_log "$RD_LOG" 'msg="scope ended after cancel" scope="GET /buggy/reports/\{id\}"' "$(rd_ms 15000)"; then
    over=$(rd_fmt "$(rd_field "$RD_LINE" overrun_ms)")
  fi
  rd_expect "no line for the end of the buggy scope" [ "$over" != "?" ]
  rd_check_access "/buggy/reports/$RD_ID" 'status=499 ' "status=499"
  rd_row "$RD_DIAG_N seeded bug: token dropped" "watchdog report; stack: $top" \
    "cancel -> report $since ms; ran on $over ms" \
    "$(rd_short "$report" scope cancel_kind since_cancel_ms)"
}

# 7. The fixed route, same hang-up: it stops at once; the watchdog says
# nothing about it.
rd_scenario_fixed_route() {
  local line after="?"
  rd_begin
  rd_take_id
  rd__hangup_after_downstream "s7-$RD_ID" "/reports/$RD_ID"
  rd_check_access "/reports/$RD_ID" 'status=499 .*cancel_kind="client gone"' \
    "status=499, kind client gone"
  line=$RD_LINE
  after=$(rd_field "$line" after_cancel_ms)
  rd_expect "the fixed route ran on ${after:-?} ms after the cancel" \
    rd_cmp "${after:-1e9}" '<' 50
  # Give the watchdog three of its looks: still nothing.
  sleep 0.3
  rd_expect "the watchdog reported the fixed route" \
    rd_absent "$RD_LOG" 'msg="scope still running after cancel" scope="GET /reports/{id}"'
  rd_row "$((RD_DIAG_N + 1)) fixed route, same hang-up" "499; no watchdog report" \
    "cancel -> handler returned $(rd_fmt "${after:-0}") ms" \
    "$(rd_short "$line" status cancel_kind after_cancel_ms)"
}

# 8. /metrics: Prometheus' text format, parsed and linted by Prometheus'
# own promtool (Debian package prometheus) when it is installed, and every
# line checked against the format's grammar in any case; counters that
# match what this reportd went through.
rd_scenario_metrics() {
  local body bad gone reports samples parser="grammar ok" lint
  rd_begin
  rd_curl "s8-metrics" "$RD_URL/metrics"
  body="$RD_TMP/s8-metrics.body"
  rd_expect "answered $RD_CODE, not 200" [ "$RD_CODE" = 200 ]
  if command -v promtool >/dev/null 2>&1; then
    if lint=$(promtool check metrics <"$body" 2>&1); then
      parser="promtool ok"
    else
      rd_expect "promtool check metrics: $(echo "$lint" | head -n 3)" false
      parser="promtool failed"
    fi
  fi
  bad=$(grep -Ev '^(# (HELP|TYPE) [a-zA-Z_:][a-zA-Z0-9_:]* .+|[a-zA-Z_:][a-zA-Z0-9_:]*(\{[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*"(,[a-zA-Z_][a-zA-Z0-9_]*="([^"\\]|\\.)*")*\})? [-+]?([0-9.eE+-]+|Inf|NaN))$' "$body" | head -n 3)
  rd_expect "lines outside the text format: $bad" [ -z "$bad" ]
  samples=$(grep -cv '^#' "$body")
  gone=$(sed -n 's/^cancel_cancellations_total{kind="client gone"} //p' "$body")
  reports=$(sed -n 's/^cancel_watchdog_reports_total //p' "$body")
  rd_expect "client gone counted ${gone:-?} times, not 2" [ "${gone:-}" = 2 ]
  rd_expect "watchdog reports ${reports:-?}, not 1" [ "${reports:-}" = 1 ]
  rd_row "$((RD_DIAG_N + 2)) /metrics after $RD_DIAG_N and $((RD_DIAG_N + 1))" "$RD_CODE, $samples samples, $parser" "-" \
    "client gone=${gone:-?} watchdog reports=${reports:-?}"
}

# rd_play_diag [FIRST]: three scenarios, numbered from FIRST (default 6),
# on a reportd with the seeded bug and enough
# CPU work per report (--work 100000) that its aggregation outlasts the
# watchdog's threshold (100 ms) by far.
rd_play_diag() {
  RD_DIAG_N=${1:-6}
  shift $(($# > 0 ? 1 : 0))
  rd_start_reportd "diag$RD_NEXT_ID" --seeded-bug --watchdog 100 --work 100000 "$@" ||
    rd_die "reportd did not start"
  rd_scenario_watchdog
  rd_scenario_fixed_route
  rd_scenario_metrics
  rd_stop_reportd
  if [[ $RD_EXIT != 0 ]] || grep -q 'level=error' "$RD_LOG"; then
    RD_FAILED=$((RD_FAILED + 1))
    RD_NOTES+=("reportd of the watchdog scenarios: exit status $RD_EXIT, or an error logged")
  fi
}

# ---- PostgreSQL -------------------------------------------------------------

# rd_pg_start SRC_DIR: a throwaway server (tests/pg/server.sh).  RD_PG =
# its conninfo.  Its directory is made apart from the temp dir: the
# server's owner (not root) must be able to reach it.
rd_pg_start() {
  RD_PG_SRC=$1
  RD_PG_DIR=$(mktemp -d "${TMPDIR:-/tmp}/reportd-pg.XXXXXX") || return 1
  # shellcheck disable=SC2034 # RD_PG is for the caller
  RD_PG=$(sh "$RD_PG_SRC/tests/pg/server.sh" start "$RD_PG_DIR") || return 1
}

rd_pg_stop() {
  [[ -n $RD_PG_DIR ]] || return 0
  sh "$RD_PG_SRC/tests/pg/server.sh" stop "$RD_PG_DIR" >/dev/null 2>&1
  RD_PG_DIR=""
}
