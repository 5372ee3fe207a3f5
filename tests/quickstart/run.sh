#!/bin/sh
# quickstart_test: runs examples/quickstart/quickstart.c, the README's
# program, as a user would: a real SQLite file (made with the sqlite3
# shell), a real downstream on loopback (downstream.pl), real clients
# (curl), and SIGTERM.
#   1. GET /orders/7 answers 200 with the count from SQLite and the
#      downstream's stock;
#   2. a client that gives up after 300 ms on a request whose downstream
#      takes 3 s: the access line says 499 "client gone" at info, through
#      the route's source ("route GET /orders/{customer}"), the handler
#      returned within 200 ms of the cancel (after_cancel_ms), and the
#      downstream sees its own client (the curl adapter) leave;
#   3. a downstream that takes 5 s against the route's 1 s: 504 after about
#      1 s, a warning naming the route's source (cancel_origin="route GET
#      /orders/{customer}", cancel_detail=1s), and the downstream was sent
#      the budget (grpc-timeout);
#   4. the background worker logs its tally (typed fields: orders=1000
#      error=0);
#   5. SIGTERM with a request in flight: the server's drain is the one it
#      derived from the host's 10 s shutdown timeout (drain_ms=9000), that
#      request is answered 200, the process exits 0, the host logs the
#      stop and both workers stopping, and nothing was logged at error.
# usage: run.sh QUICKSTART-EXECUTABLE
set -eu

exe=$1
here=$(cd "$(dirname "$0")" && pwd)
for tool in perl sqlite3 curl; do
  if ! command -v "$tool" >/dev/null 2>&1; then
    echo "SKIP: $tool not installed"
    exit 77
  fi
done
scale=${CANCEL_TEST_TIME_SCALE:-1}
case $scale in '' | *[!0-9]*) scale=1 ;; esac

work=$(mktemp -d "${TMPDIR:-/tmp}/quickstart-test.XXXXXX")
ds_pid=
qs_pid=
cleanup() {
  [ -n "$qs_pid" ] && kill -KILL "$qs_pid" 2>/dev/null || true
  [ -n "$ds_pid" ] && kill -TERM "$ds_pid" 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT

fail() {
  echo "FAIL: $*"
  echo "--- quickstart's log"
  cat "$work/qs.log" 2>/dev/null || true
  echo "--- the downstream's log"
  cat "$work/ds.log" 2>/dev/null || true
  exit 1
}

now_ms() { echo $(($(date +%s%N) / 1000000)); }

# wait_for FILE PATTERN SECONDS: until a line of FILE matches the extended
# regular expression PATTERN, for at most SECONDS (times the scale).  The
# programs write the lines; polling the file is the only signal a shell has.
wait_for() {
  limit=$(($(now_ms) + $3 * 1000 * scale))
  while ! grep -Eq -- "$2" "$1" 2>/dev/null; do
    [ "$(now_ms)" -lt "$limit" ] || fail "no line /$2/ in $1 after $3 s"
    sleep 0.02
  done
}

# The database: 1000 orders of customers 0 to 9 (customer 7 has 100).
sqlite3 "$work/shop.db" "
  CREATE TABLE orders(id INTEGER PRIMARY KEY, customer INTEGER NOT NULL);
  CREATE INDEX orders_customer ON orders(customer);
  WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < 1000)
  INSERT INTO orders(customer) SELECT i % 10 FROM n;"

: >"$work/ds.log"
perl "$here/downstream.pl" "$work/ds.log" >"$work/ds.out" 2>&1 &
ds_pid=$!
wait_for "$work/ds.out" '^port [0-9]+$' 10
ds_port=$(sed -n 's/^port \([0-9]*\)$/\1/p' "$work/ds.out")

"$exe" 0 "$work/shop.db" "http://127.0.0.1:$ds_port" 2>"$work/qs.log" &
qs_pid=$!
wait_for "$work/qs.log" 'component=http msg=listening .* port=[0-9]+' 10
port=$(sed -n 's/.*component=http msg=listening .* port=\([0-9]*\).*/\1/p' "$work/qs.log")
base=http://127.0.0.1:$port

echo "== 1. GET /orders/7"
code=$(curl -sS -o "$work/body" -w '%{http_code}' "$base/orders/7") || fail "curl failed"
body=$(cat "$work/body")
echo "$code $body"
case "$code $body" in
'200 {"orders":100,"stock":7,"hash":'*'}') ;;
*) fail "unexpected answer: $code $body" ;;
esac
wait_for "$work/qs.log" 'level=info .*msg=request .*path=/orders/7 .*status=200' 5

echo "== 2. the client gives up after 300 ms (downstream: 3 s)"
rc=0
curl -sS -o /dev/null --max-time 0.3 "$base/orders/3000" 2>/dev/null || rc=$?
[ "$rc" -eq 28 ] || fail "curl --max-time 0.3 exited $rc, not 28 (timed out)"
wait_for "$work/qs.log" 'level=info .*path=/orders/3000 .*status=499 .*cancel_kind="client gone"' 5
wait_for "$work/ds.log" '^abandoned /stock/3000$' 5
line=$(grep -E 'path=/orders/3000 ' "$work/qs.log")
echo "$line"
case $line in
*' cancel_via="route GET /orders/{customer}" '*) ;;
*) fail "the 499 line does not name the route's source as its via" ;;
esac
after=$(echo "$line" | sed -n 's/.* after_cancel_ms=\([0-9]*\)\.[0-9]* .*/\1/p')
[ -n "$after" ] && [ "$after" -lt $((200 * scale)) ] ||
  fail "after_cancel_ms is '$after', not under $((200 * scale)) ms"

echo "== 3. the route's 1 s against a downstream of 5 s"
t0=$(now_ms)
code=$(curl -sS -o /dev/null -w '%{http_code}' "$base/orders/5000") || fail "curl failed"
took=$(($(now_ms) - t0))
echo "status $code after $took ms"
[ "$code" = 504 ] || fail "status $code, not 504"
[ "$took" -ge 950 ] && [ "$took" -lt $((1000 + 1000 * scale)) ] ||
  fail "504 after $took ms, not about 1000"
wait_for "$work/qs.log" 'level=warn .*path=/orders/5000 .*status=504 .*cancel_kind=timeout cancel_origin="route GET /orders/[{]customer[}]" cancel_detail=1s ' 5
grep -E 'path=/orders/5000 ' "$work/qs.log"
budget=$(sed -n 's|^got /stock/5000 grpc-timeout=\([0-9]*\)m$|\1|p' "$work/ds.log")
[ -n "$budget" ] && [ "$budget" -le 1000 ] && [ "$budget" -gt 0 ] ||
  fail "the downstream was not sent the budget (grpc-timeout): $(grep /stock/5000 "$work/ds.log")"
echo "the downstream was given ${budget} ms"

echo "== 4. the background worker's tally"
wait_for "$work/qs.log" 'level=info component=quickstart msg=tally orders=1000 error=0$' 5
grep -E 'msg=tally' "$work/qs.log" | tail -n 1

echo "== 5. SIGTERM with a request in flight (downstream: 700 ms)"
curl -sS -o "$work/inflight.body" -w '%{http_code}' "$base/orders/700" \
  >"$work/inflight.code" 2>&1 &
curl_pid=$!
wait_for "$work/ds.log" '^got /stock/700 ' 5
t0=$(now_ms)
kill -TERM "$qs_pid"
# The shutdown timeout is 10 s and the drain 9 s: the request in flight
# ends in 700 ms, the process well within the timeout; then wait (which
# then returns at once).
limit=$((t0 + 10000 * scale))
while kill -0 "$qs_pid" 2>/dev/null && [ "$(now_ms)" -lt "$limit" ]; do
  sleep 0.02
done
kill -0 "$qs_pid" 2>/dev/null && fail "still running $(($(now_ms) - t0)) ms after SIGTERM"
rc=0
wait "$qs_pid" || rc=$?
qs_pid=
took=$(($(now_ms) - t0))
echo "exit status $rc, $took ms after SIGTERM"
[ "$rc" -eq 0 ] || fail "exit status $rc, not 0"
wait "$curl_pid" || true
[ "$(cat "$work/inflight.code")" = 200 ] ||
  fail "the request in flight got $(cat "$work/inflight.code"), not 200"
log=$work/qs.log
grep -Eq 'level=info component=http msg=stopping server=quickstart .*drain_ms=9000' "$log" ||
  fail "the drain was not derived from the host's shutdown timeout (drain_ms=9000)"
grep -Eq 'level=info component=host msg=stopping .*cancel_kind=shutdown .*cancel_detail=SIGTERM' "$log" ||
  fail "no stopping line with the SIGTERM reason"
grep -Eq 'msg="worker stopped" .*worker=tally' "$log" || fail "the tally worker's stop was not logged"
grep -Eq 'msg="worker stopped" .*worker=http' "$log" || fail "the http worker's stop was not logged"
grep -Eq 'level=info component=host msg=stopped' "$log" || fail "no stopped line"
if grep -Eq 'level=error' "$log"; then
  fail "a line at error: $(grep -E 'level=error' "$log")"
fi
echo "ok: quickstart answered 200, 499, 504, tallied, and stopped on SIGTERM with exit 0"
