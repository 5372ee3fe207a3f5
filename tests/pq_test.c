/*
 * libcancel-pq against a real PostgreSQL server.
 *
 * The group setup starts a throwaway server (tests/pg/server.sh: initdb in
 * a temporary directory, Unix socket only, run as the postgres user when
 * the tests run as root) and the teardown stops it; set
 * CANCEL_TEST_PG_CONNINFO to use a server of your own instead.  What the
 * server did is checked on the server: pg_stat_activity from a second
 * connection, rows counted after a cancelled transaction.
 */
#include "test_util.h"

#include "loopback.h"
#include "stall.h"

#include "cancel/pq.h"
#include "pg/pg_server.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/wait.h>

#ifndef CANCEL_TEST_SOURCE_DIR
#error "the build defines CANCEL_TEST_SOURCE_DIR (the repository's root)"
#endif

static struct pg_server g_pg;
#define g_conninfo g_pg.conninfo

static int group_setup(void **state) {
  (void)state;
  return pg_server_start(&g_pg, CANCEL_TEST_SOURCE_DIR,
                         "CANCEL_TEST_PG_CONNINFO", "cancel-pq-test");
}

static int group_teardown(void **state) {
  (void)state;
  pg_server_stop(&g_pg, CANCEL_TEST_SOURCE_DIR);
  return 0;
}

/* ---- Helpers ----------------------------------------------------------- */

static PGconn *connect_ok(void) {
  PGconn *c = NULL;
  int r = cancel_pq_connect(NULL, g_conninfo, &c);
  if (r != 0)
    print_error("connect: %s\n", c != NULL ? PQerrorMessage(c) : "(null)");
  assert_int_equal(r, 0);
  assert_int_equal(PQstatus(c), CONNECTION_OK);
  return c;
}

/* Runs sql without a token and returns the first column of the first row
 * as an integer (the test fails on error). */
static long query_long(PGconn *c, const char *sql) {
  PGresult *r = NULL;
  int rc = cancel_pq_exec(NULL, c, sql, &r);
  if (rc != 0)
    print_error("%s: %s %s\n", sql, cancel_strerror(rc), PQerrorMessage(c));
  assert_int_equal(rc, 0);
  assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
  assert_true(PQntuples(r) >= 1);
  long v = strtol(PQgetvalue(r, 0, 0), NULL, 10);
  PQclear(r);
  return v;
}

static void exec_ok(PGconn *c, const char *sql) {
  int rc = cancel_pq_exec(NULL, c, sql, NULL);
  if (rc != 0)
    print_error("%s: %s %s\n", sql, cancel_strerror(rc), PQerrorMessage(c));
  assert_int_equal(rc, 0);
}

/* The state of backend pid in pg_stat_activity ("active", "idle", ...),
 * seen from connection `mon`, into buf. */
static void backend_state(PGconn *mon, int pid, char *buf, size_t len) {
  char pidtxt[16];
  snprintf(pidtxt, sizeof pidtxt, "%d", pid);
  const char *vals[] = {pidtxt};
  PGresult *r = NULL;
  assert_int_equal(
      cancel_pq_exec_params(NULL, mon,
                            "SELECT coalesce(state, '') || ' ' || "
                            "coalesce(query, '') FROM pg_stat_activity "
                            "WHERE pid = $1::int",
                            1, NULL, vals, NULL, NULL, 0, &r),
      0);
  snprintf(buf, len, "%s", PQntuples(r) > 0 ? PQgetvalue(r, 0, 0) : "gone");
  PQclear(r);
}

static bool backend_active(PGconn *mon, int pid) {
  char st[256];
  backend_state(mon, pid, st, sizeof st);
  return strncmp(st, "active ", 7) == 0;
}

/* A query on its own thread: the thread that owns the connection. */
struct bg_query {
  PGconn *conn;
  const cancel_token *tok;
  const char *sql;
  int result;
  int64_t returned_at;
  pthread_t thread;
};

static void *bg_query_main(void *arg) {
  struct bg_query *q = arg;
  q->result = cancel_pq_exec(q->tok, q->conn, q->sql, NULL);
  q->returned_at = cancel_now();
  return NULL;
}

/* A query's stop (a failed test's teardown): the server cancels it. */
static void stop_bg_query(void *arg) {
  struct bg_query *q = arg;
  PGcancel *pc = PQgetCancel(q->conn);
  char err[256];
  if (pc != NULL)
    (void)PQcancel(pc, err, sizeof err);
  PQfreeCancel(pc);
}

/* Waits until the backend of conn runs a query (seen from mon). */
static void wait_active(PGconn *mon, PGconn *conn) {
  int pid = PQbackendPID(conn);
  int64_t end = cancel_now() + test_tol(CANCEL_SEC(10));
  while (!backend_active(mon, pid)) {
    assert_true(cancel_now() < end);
    test_sleep_ns(CANCEL_MSEC(1));
  }
}

/* SELECT pg_sleep(30) on conn with tok, on its own thread; returns once
 * the server runs it (seen from mon).  q is test_shared(): a failed test
 * leaves the thread to the teardown. */
static void bg_sleep_start(struct bg_query *q, PGconn *conn, PGconn *mon,
                           const cancel_token *tok) {
  *q =
      (struct bg_query){.conn = conn, .tok = tok, .sql = "SELECT pg_sleep(30)"};
  q->thread = test_helper_start(bg_query_main, q, stop_bg_query);
  wait_active(mon, conn);
}

/* ---- Queries ------------------------------------------------------------ */

static void test_exec_completes(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  cancel_source *s = new_src("req");
  PGresult *r = NULL;
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT 20 + 22", &r), 0);
  assert_int_equal(PQresultStatus(r), PGRES_TUPLES_OK);
  assert_string_equal(PQgetvalue(r, 0, 0), "42");
  PQclear(r);

  /* Several statements: the last one's result, as with PQexec. */
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT 1; SELECT 'two'", &r), 0);
  assert_string_equal(PQgetvalue(r, 0, 0), "two");
  PQclear(r);

  const char *vals[] = {"40", "2"};
  assert_int_equal(cancel_pq_exec_params(TOK(s), c, "SELECT $1::int + $2::int",
                                         2, NULL, vals, NULL, NULL, 0, &r),
                   0);
  assert_string_equal(PQgetvalue(r, 0, 0), "42");
  PQclear(r);
  /* The connection's blocking mode is left as it was. */
  assert_int_equal(PQisnonblocking(c), 0);
  cancel_source_unref(s);
  PQfinish(c);
}

/* The case: SELECT pg_sleep(30) cancelled after 100 ms returns
 * -ECANCELED promptly, the backend is no longer running it, and the same
 * connection runs the next query correctly. */
static void test_cancel_stops_server_work(void **state) {
  (void)state;
  PGconn *c = connect_ok(), *mon = connect_ok();
  cancel_source *s = new_src("req");
  struct bg_query *q = test_shared(sizeof *q);
  bg_sleep_start(q, c, mon, TOK(s));
  test_sleep_ns(CANCEL_MSEC(100));
  int64_t t0 = cancel_now();
  assert_true(cancel_source_cancel(s));
  test_helper_join(q->thread);
  assert_int_equal(q->result, -ECANCELED);
  assert_i64_lt(q->returned_at - t0, test_tol(CANCEL_MSEC(100)));

  /* On the server: the backend is idle, not sleeping out its 30 s. */
  char st[256];
  backend_state(mon, PQbackendPID(c), st, sizeof st);
  assert_true(strncmp(st, "idle ", 5) == 0);
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);

  /* The same connection, the next query. */
  assert_int_equal(query_long(c, "SELECT 6 * 7"), 42);
  cancel_source_unref(s);
  PQfinish(mon);
  PQfinish(c);
}

static void test_cancelled_before_call(void **state) {
  (void)state;
  PGconn *c = connect_ok(), *mon = connect_ok();
  cancel_source *s = new_src("req");
  cancel_source_cancel(s);
  PGresult *r = (PGresult *)&r; /* must be set to NULL */
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT pg_sleep(30)", &r),
                   -ECANCELED);
  assert_null(r);
  assert_i64_lt(test_since(t0), test_tol(CANCEL_MSEC(50)));
  /* Nothing was sent: the backend's last query is not ours. */
  char st[256];
  backend_state(mon, PQbackendPID(c), st, sizeof st);
  assert_null(strstr(st, "pg_sleep"));
  assert_int_equal(query_long(c, "SELECT 1"), 1);
  cancel_source_unref(s);
  PQfinish(mon);
  PQfinish(c);
}

/* A token's deadline: the call is cancelled with the timeout reason. */
static void test_deadline(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  cancel_source *s = NULL;
  assert_int_equal(
      cancel_source_new_timeout(&s, "db-query", NULL, CANCEL_MSEC(100)), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT pg_sleep(30)", NULL),
                   -ECANCELED);
  int64_t took = test_since(t0);
  assert_i64_ge(took, CANCEL_MSEC(90));
  assert_i64_lt(took, CANCEL_MSEC(100) + test_tol(CANCEL_MSEC(200)));
  /* The token fired, and its reason is there at once (also when the
   * server's backstop came before the token's own timer). */
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_int_equal(query_long(c, "SELECT 2"), 2);
  cancel_source_unref(s);
  PQfinish(c);
}

/* Cancels that land as the query completes must never hit the next query
 * on the connection. */
static void test_late_cancel_never_hits_next_query(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  int rounds = (int)(100 * test_stress_scale()), cancelled = 0, completed = 0;
  unsigned seed = 12345;
  for (int i = 0; i < rounds; i++) {
    cancel_source *s = new_src("late");
    /* The query takes 2 ms; the cancel comes between 0 and 4 ms. */
    seed = seed * 1103515245u + 12345u;
    int64_t delay = CANCEL_USEC((seed >> 8) % 4000);
    assert_int_equal(cancel_source_cancel_after(s, delay), 0);
    int r = cancel_pq_exec(TOK(s), c, "SELECT pg_sleep(0.002)", NULL);
    assert_true(r == 0 || r == -ECANCELED);
    r == 0 ? completed++ : cancelled++;
    cancel_source_unref(s);
    /* The next query, without a token: it must succeed. */
    PGresult *res = NULL;
    int r2 = cancel_pq_exec(NULL, c, "SELECT pg_sleep(0.001), 7", &res);
    if (r2 != 0)
      print_error("round %d: %s: %s\n", i, cancel_strerror(r2),
                  PQerrorMessage(c));
    assert_int_equal(r2, 0);
    assert_string_equal(PQgetvalue(res, 0, 1), "7");
    PQclear(res);
  }
  print_message("late cancels: %d cancelled, %d completed\n", cancelled,
                completed);
  assert_true(cancelled > 0);
  PQfinish(c);
}

/* ---- Transactions ------------------------------------------------------- */

static void reset_table(PGconn *c) {
  exec_ok(c, "DROP TABLE IF EXISTS t_rows; "
             "CREATE TABLE t_rows (id int PRIMARY KEY, v text)");
}

struct tx_arg {
  cancel_source *src;
  bool cancel_after_insert; /* cancel right after the last statement */
  const char *then_sql;     /* a statement after the insert, or NULL */
};

static int tx_work(const cancel_token *tok, PGconn *c, void *p) {
  struct tx_arg *a = p;
  int r = cancel_pq_exec(tok, c, "INSERT INTO t_rows VALUES (1, 'one')", NULL);
  if (r < 0)
    return r;
  if (a->then_sql != NULL &&
      (r = cancel_pq_exec(tok, c, a->then_sql, NULL)) < 0)
    return r;
  if (a->cancel_after_insert)
    cancel_source_cancel(a->src);
  return 5;
}

/* The cancel arrives while work runs: nothing is left behind. */
static void test_transaction_cancelled_before_commit(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  reset_table(c);
  cancel_source *s = new_src("req");
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(100)), 0);
  struct tx_arg a = {.src = s, .then_sql = "SELECT pg_sleep(30)"};
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_pq_transaction(TOK(s), c, tx_work, &a, 0),
                   -ECANCELED);
  assert_i64_lt(test_since(t0), test_tol(CANCEL_SEC(2)));
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
  assert_int_equal(query_long(c, "SELECT count(*) FROM t_rows"), 0);
  cancel_source_unref(s);
  PQfinish(c);
}

/* The cancel arrives after the point of no return: the COMMIT runs. */
static void test_transaction_commits_after_point_of_no_return(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  reset_table(c);
  cancel_source *s = new_src("req");
  struct tx_arg a = {.src = s, .cancel_after_insert = true};
  assert_int_equal(cancel_pq_transaction(TOK(s), c, tx_work, &a, 0), 5);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
  assert_int_equal(query_long(c, "SELECT count(*) FROM t_rows"), 1);
  cancel_source_unref(s);
  PQfinish(c);
}

/* A COMMIT that takes time (a deferred trigger sleeping 300 ms) while the
 * token fires: the shield keeps the cancel away from it. */
static void test_transaction_slow_commit_shielded(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  reset_table(c);
  exec_ok(c, "CREATE OR REPLACE FUNCTION slow_commit() RETURNS trigger "
             "LANGUAGE plpgsql AS $$ BEGIN PERFORM pg_sleep(0.3); "
             "RETURN NULL; END $$; "
             "CREATE CONSTRAINT TRIGGER t_rows_slow AFTER INSERT ON t_rows "
             "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
             "EXECUTE FUNCTION slow_commit()");
  cancel_source *s = new_src("req");
  struct tx_arg a = {.src = s};
  /* Work takes a few ms; the cancel lands inside the 300 ms COMMIT. */
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(100)), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_pq_transaction(TOK(s), c, tx_work, &a, 0), 5);
  assert_i64_ge(test_since(t0), CANCEL_MSEC(300));
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(query_long(c, "SELECT count(*) FROM t_rows"), 1);
  cancel_source_unref(s);

  /* With a grace shorter than the COMMIT, the commit is cancelled on the
   * server and rolled back: still all or nothing. */
  reset_table(c);
  exec_ok(c, "CREATE CONSTRAINT TRIGGER t_rows_slow AFTER INSERT ON t_rows "
             "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW "
             "EXECUTE FUNCTION slow_commit()");
  s = new_src("req");
  a.src = s;
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(50)), 0);
  int r = cancel_pq_transaction(TOK(s), c, tx_work, &a, CANCEL_MSEC(50));
  /* On a very slow machine the work itself may see the cancel. */
  assert_int_equal(r, -ECANCELED);
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
  assert_int_equal(query_long(c, "SELECT count(*) FROM t_rows"), 0);
  cancel_source_unref(s);
  PQfinish(c);
}

/* A transaction of the caller's own (BEGIN through the adapter): a
 * cancelled statement rolls it back. */
static void test_cancel_rolls_back_open_transaction(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  reset_table(c);
  cancel_source *s = new_src("req");
  assert_int_equal(cancel_pq_exec(TOK(s), c, "BEGIN", NULL), 0);
  assert_int_equal(
      cancel_pq_exec(TOK(s), c, "INSERT INTO t_rows VALUES (2, 'two')", NULL),
      0);
  assert_int_equal(PQtransactionStatus(c), PQTRANS_INTRANS);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(50)), 0);
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT pg_sleep(30)", NULL),
                   -ECANCELED);
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
  assert_int_equal(query_long(c, "SELECT count(*) FROM t_rows"), 0);

  /* And a token already cancelled when the call starts, in a transaction:
   * rolled back too. */
  exec_ok(c, "BEGIN; INSERT INTO t_rows VALUES (3, 'three')");
  assert_int_equal(PQtransactionStatus(c), PQTRANS_INTRANS);
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT 1", NULL), -ECANCELED);
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
  assert_int_equal(query_long(c, "SELECT count(*) FROM t_rows"), 0);
  cancel_source_unref(s);
  PQfinish(c);
}

static int tx_nothing(const cancel_token *tok, PGconn *c, void *p) {
  (void)tok;
  (void)c;
  (void)p;
  return 0;
}

static int tx_commits_itself(const cancel_token *tok, PGconn *c, void *p) {
  (void)p;
  return cancel_pq_exec(tok, c, "COMMIT", NULL);
}

static void test_transaction_misuse(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  assert_int_equal(cancel_pq_transaction(NULL, NULL, tx_nothing, NULL, 0),
                   -EINVAL);
  assert_int_equal(cancel_pq_transaction(NULL, c, NULL, NULL, 0), -EINVAL);
  assert_int_equal(cancel_pq_transaction(NULL, c, tx_nothing, NULL, -1),
                   -EINVAL);
  exec_ok(c, "BEGIN");
  assert_int_equal(cancel_pq_transaction(NULL, c, tx_nothing, NULL, 0),
                   -EINVAL);
  exec_ok(c, "ROLLBACK");
  assert_int_equal(cancel_pq_transaction(NULL, c, tx_commits_itself, NULL, 0),
                   -EINVAL);
  assert_int_equal(PQtransactionStatus(c), PQTRANS_IDLE);
  assert_int_equal(cancel_pq_transaction(NULL, c, tx_nothing, NULL, 0), 0);
  PQfinish(c);
}

/* ---- The deadline backstop ---------------------------------------------- */

static void test_backstop_set_local(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_timeout(&s, "req", NULL, CANCEL_SEC(10)),
                   0);
  PGresult *r = NULL;
  /* The statement sees statement_timeout = remaining + 50 ms margin. */
  assert_int_equal(cancel_pq_exec(TOK(s), c,
                                  "SELECT current_setting('statement_timeout')",
                                  &r),
                   0);
  char *unit = NULL;
  long ms = strtol(PQgetvalue(r, 0, 0), &unit, 10);
  if (strcmp(unit, "s") == 0)
    ms *= 1000;
  PQclear(r);
  assert_true(ms > 5000 && ms <= 10050);
  /* ... and it does not leak into the session. */
  assert_int_equal(cancel_pq_exec(NULL, c, "SHOW statement_timeout", &r), 0);
  assert_string_equal(PQgetvalue(r, 0, 0), "0");
  PQclear(r);

  /* exec_params inside a transaction gets it too; outside, none. */
  const char *none[1] = {NULL};
  exec_ok(c, "BEGIN");
  assert_int_equal(cancel_pq_exec_params(TOK(s), c, "SHOW statement_timeout", 0,
                                         NULL, none, NULL, NULL, 0, &r),
                   0);
  assert_string_not_equal(PQgetvalue(r, 0, 0), "0");
  PQclear(r);
  exec_ok(c, "COMMIT");
  assert_int_equal(cancel_pq_exec_params(TOK(s), c, "SHOW statement_timeout", 0,
                                         NULL, none, NULL, NULL, 0, &r),
                   0);
  assert_string_equal(PQgetvalue(r, 0, 0), "0");
  PQclear(r);

  /* Off when asked. */
  cancel_pq_options o = {.no_backstop = true};
  assert_int_equal(cancel_pq_exec_ex(TOK(s), c, "SHOW statement_timeout", 0,
                                     NULL, NULL, NULL, NULL, 0, &o, &r),
                   0);
  assert_string_equal(PQgetvalue(r, 0, 0), "0");
  PQclear(r);
  o.no_backstop = false;
  o.backstop_margin_ns = -1;
  assert_int_equal(cancel_pq_exec_ex(TOK(s), c, "SELECT 1", 0, NULL, NULL, NULL,
                                     NULL, 0, &o, &r),
                   -EINVAL);
  cancel_source_unref(s);
  PQfinish(c);
}

/* The child of the next test, run as `pq_test --frozen-child FD CONNINFO`
 * (an exec'd program: a forked copy of this multi-threaded test could not
 * start the timer thread under TSan): connects, writes its backend's pid
 * to FD, runs a 30 s query with a 300 ms deadline, exits. */
static int frozen_child(int fd, const char *conninfo) {
  PGconn *c = NULL;
  if (cancel_pq_connect(NULL, conninfo, &c) != 0)
    return 2;
  int bpid = PQbackendPID(c);
  if (write(fd, &bpid, sizeof bpid) != (ssize_t)sizeof bpid)
    return 3;
  close(fd);
  cancel_source *s = NULL;
  if (cancel_source_new_timeout(&s, "frozen", NULL, CANCEL_MSEC(300)) != 0)
    return 4;
  (void)cancel_pq_exec(TOK(s), c, "SELECT pg_sleep(30)", NULL);
  cancel_source_unref(s);
  PQfinish(c);
  return 0;
}

/* The backstop stops the query on the server when this side cannot send
 * the cancel: a child process runs the query with a 300 ms deadline and is
 * stopped (SIGSTOP) while it waits; the server ends the query by itself. */
static void test_backstop_when_client_frozen(void **state) {
  (void)state;
  PGconn *mon = connect_ok();
  int pfd[2];
  assert_int_equal(pipe(pfd), 0);
  assert_true(test_others_asleep(test_tol(CANCEL_SEC(5))));
  char fdtxt[16], self[4096];
  snprintf(fdtxt, sizeof fdtxt, "%d", pfd[1]);
  /* The program's path, not /proc/self/exe itself: under valgrind that
   * would start valgrind's tool instead (readlink is translated). */
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  assert_true(n > 0);
  self[n] = '\0';
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    close(pfd[0]);
    execl(self, "pq_test", "--frozen-child", fdtxt, g_conninfo, (char *)NULL);
    _exit(127);
  }
  close(pfd[1]);
  int bpid = 0;
  assert_int_equal(read(pfd[0], &bpid, sizeof bpid), (ssize_t)sizeof bpid);
  close(pfd[0]);
  int64_t end = cancel_now() + test_tol(CANCEL_SEC(10));
  while (!backend_active(mon, bpid)) {
    assert_true(cancel_now() < end);
    test_sleep_ns(CANCEL_MSEC(1));
  }
  int64_t t0 = cancel_now();
  kill(pid, SIGSTOP);
  /* The child cannot cancel now; the server must stop by itself. */
  end = t0 + test_tol(CANCEL_SEC(5));
  while (backend_active(mon, bpid) && cancel_now() < end)
    test_sleep_ns(CANCEL_MSEC(5));
  int64_t took = test_since(t0);
  bool still = backend_active(mon, bpid);
  kill(pid, SIGKILL);
  int st;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  assert_false(still);
  assert_i64_lt(took, test_tol(CANCEL_SEC(2)));
  PQfinish(mon);
}

/* ---- -ECANCELED means the token fired ------------------------------------
 * The backstop (statement_timeout from the token's deadline) races the
 * library's timer that fires the token at that deadline.  Whoever wins, a
 * call that returns -ECANCELED has a cancelled token whose reason can be
 * read at once (cancel.h's conventions). */

#define ROUNDS_PQ_RACE 100

static void test_backstop_race_has_reason(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  /* A margin of 1 ns: the server's timeout ends a hair after the token's
   * deadline, at the same moment as the token's timer. */
  cancel_pq_options o = {.backstop_margin_ns = 1};
  int lies = 0, cancelled = 0, timedout = 0;
  for (int round = 0; round < ROUNDS_PQ_RACE; round++) {
    cancel_source *s = NULL;
    assert_int_equal(
        cancel_source_new_timeout(&s, "db-query", NULL, CANCEL_MSEC(20)), 0);
    int rc = cancel_pq_exec_ex(TOK(s), c, "SELECT pg_sleep(10)", 0, NULL, NULL,
                               NULL, NULL, 0, &o, NULL);
    bool fired = cancel_token_is_cancelled(TOK(s)); /* at once */
    cancel_reason why;
    int have = cancel_token_reason(TOK(s), &why);
    if (rc == -ECANCELED && (!fired || have != 1)) {
      lies++;
    } else if (rc == -ECANCELED) {
      cancelled++;
      assert_int_equal(why.kind, CANCEL_TIMEOUT);
      assert_string_equal(why.origin, "db-query");
    } else {
      /* The token not fired long after its deadline: honest, but a
       * machine far too loaded for this test. */
      assert_int_equal(rc, -ETIMEDOUT);
      assert_false(fired);
      timedout++;
    }
    cancel_source_unref(s);
  }
  print_message("pq backstop race: %d rounds, %d -ECANCELED with the "
                "reason, %d -ECANCELED on a live token, %d -ETIMEDOUT\n",
                ROUNDS_PQ_RACE, cancelled, lies, timedout);
  assert_int_equal(lies, 0);
  assert_int_equal(timedout, 0);
  assert_int_equal(query_long(c, "SELECT 5"), 5);
  PQfinish(c);
}

/* The same race lost every time: the timer thread is held while the
 * deadline passes (tests/stall.h).  The server's backstop ends the query
 * first, and the call waits for the token's timer; a call made after the
 * deadline passed waits for it as well, and sends nothing. */
static void test_backstop_waits_for_late_timer(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  const int64_t hold = CANCEL_MSEC(300);
  cancel_pq_options o = {.backstop_margin_ns = 1};

  int64_t deadline = cancel_now() + CANCEL_MSEC(40);
  struct test_stall *st = test_stall_begin(deadline - CANCEL_MSEC(2), hold);
  cancel_source *s = new_src("db-query");
  assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
  int rc = cancel_pq_exec_ex(TOK(s), c, "SELECT pg_sleep(10)", 0, NULL, NULL,
                             NULL, NULL, 0, &o, NULL);
  int64_t back = cancel_now();
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(rc, -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_i64_ge(back, __atomic_load_n(&st->left_at, __ATOMIC_ACQUIRE));
  test_stall_end(st);
  cancel_source_unref(s);

  /* The deadline passed before the call, the timer held. */
  deadline = cancel_now() + CANCEL_MSEC(10);
  st = test_stall_begin(deadline - CANCEL_MSEC(2), hold);
  s = new_src("db-query");
  assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
  test_stall_entered(st);
  while (cancel_now() < deadline)
    test_sleep_ns(deadline - cancel_now());
  rc = cancel_pq_exec(TOK(s), c, "SELECT 1", NULL);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(rc, -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  test_stall_end(st);
  cancel_source_unref(s);

  assert_int_equal(query_long(c, "SELECT 6"), 6);
  PQfinish(c);
}

/* ---- LISTEN / NOTIFY ------------------------------------------------------
 */

struct listener {
  PGconn *conn;
  const cancel_token *tok;
  int64_t deadline;
  PGnotify *n;
};

static int64_t listen_wait(void *p) {
  struct listener *l = p;
  return cancel_pq_wait_notify(l->tok, l->conn, l->deadline, &l->n);
}

static void test_notify_wakes_listener(void **state) {
  (void)state;
  PGconn *lc = connect_ok(), *nc = connect_ok();
  exec_ok(lc, "LISTEN jobs");
  cancel_source *s = new_src("worker");
  struct listener l = {.conn = lc, .tok = TOK(s), .deadline = CANCEL_NEVER};
  struct test_waiter w;
  test_waiter_block(&w, listen_wait, &l);
  int64_t t0 = cancel_now();
  exec_ok(nc, "NOTIFY jobs, 'job 17'");
  test_waiter_end(&w, test_tol(CANCEL_SEC(5)), test_rescue_cancel, s);
  assert_i64_eq(w.result, 0);
  assert_i64_lt(w.t_end - t0, test_tol(CANCEL_MSEC(500)));
  assert_non_null(l.n);
  assert_string_equal(l.n->relname, "jobs");
  assert_string_equal(l.n->extra, "job 17");
  assert_int_equal(l.n->be_pid, PQbackendPID(nc));
  PQfreemem(l.n);

  /* A notification that came while another query ran is not lost: the
   * NOTIFY has committed, so lc's backend delivers it with (at the latest
   * right after) the next query's result, which the query's call reads. */
  exec_ok(nc, "NOTIFY jobs, 'job 18'");
  assert_int_equal(query_long(lc, "SELECT 3"), 3);
  l.n = NULL;
  assert_int_equal(cancel_pq_wait_notify(TOK(s), lc, CANCEL_NEVER, &l.n), 0);
  assert_string_equal(l.n->extra, "job 18");
  PQfreemem(l.n);
  cancel_source_unref(s);
  PQfinish(nc);
  PQfinish(lc);
}

static void test_notify_wait_cancelled_and_deadline(void **state) {
  (void)state;
  PGconn *lc = connect_ok();
  exec_ok(lc, "LISTEN quiet");
  cancel_source *s = new_src("shutdown");
  struct listener l = {.conn = lc, .tok = TOK(s), .deadline = CANCEL_NEVER};
  struct test_waiter w;
  test_waiter_block(&w, listen_wait, &l);
  int64_t t0 = cancel_now();
  cancel_source_cancel_with(s, CANCEL_SHUTDOWN, "test");
  test_waiter_end(&w, test_tol(CANCEL_SEC(5)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_i64_lt(w.t_end - t0, test_tol(CANCEL_MSEC(50)));
  assert_null(l.n);
  cancel_source_unref(s);

  /* Its own deadline. */
  PGnotify *n = NULL;
  t0 = cancel_now();
  assert_int_equal(cancel_pq_wait_notify(NULL, lc, t0 + CANCEL_MSEC(50), &n),
                   -ETIMEDOUT);
  assert_i64_ge(test_since(t0), CANCEL_MSEC(50));
  assert_null(n);
  assert_int_equal(cancel_pq_wait_notify(NULL, NULL, CANCEL_NEVER, &n),
                   -EINVAL);
  assert_int_equal(query_long(lc, "SELECT 4"), 4);
  PQfinish(lc);
}

/* ---- Bad input and failures ------------------------------------------------
 */

static void test_sql_error(void **state) {
  (void)state;
  PGconn *c = connect_ok();
  cancel_source *s = new_src("req");
  PGresult *r = NULL;
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELEKT nonsense", &r), -EIO);
  assert_non_null(r);
  assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "42601");
  PQclear(r);
  assert_int_equal(
      cancel_pq_exec(TOK(s), c, "SELECT * FROM no_such_table", NULL), -EIO);
  /* A missing parameter, a bad parameter value. */
  const char *bad[] = {"not a number"};
  assert_int_equal(cancel_pq_exec_params(TOK(s), c, "SELECT $1::int", 1, NULL,
                                         bad, NULL, NULL, 0, &r),
                   -EIO);
  assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "22P02");
  PQclear(r);
  /* Not our cancel: somebody's statement_timeout. */
  exec_ok(c, "SET statement_timeout = 50");
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT pg_sleep(5)", &r), -EINTR);
  assert_string_equal(PQresultErrorField(r, PG_DIAG_SQLSTATE), "57014");
  PQclear(r);
  exec_ok(c, "RESET statement_timeout");
  /* COPY is refused without leaving the connection in COPY mode. */
  assert_int_equal(cancel_pq_exec(TOK(s), c, "COPY (SELECT 1) TO STDOUT", NULL),
                   -ENOTSUP);
  reset_table(c);
  assert_int_equal(cancel_pq_exec(TOK(s), c, "COPY t_rows FROM STDIN", NULL),
                   -ENOTSUP);
  assert_int_equal(query_long(c, "SELECT 5"), 5);
  /* NULL arguments. */
  assert_int_equal(cancel_pq_exec(TOK(s), NULL, "SELECT 1", NULL), -EINVAL);
  assert_int_equal(cancel_pq_exec(TOK(s), c, NULL, NULL), -EINVAL);
  assert_int_equal(cancel_pq_exec_params(TOK(s), c, "SELECT $1", -1, NULL, NULL,
                                         NULL, NULL, 0, NULL),
                   -EINVAL);
  /* No values with nparams > 0: every parameter NULL, as in libpq. */
  assert_int_equal(cancel_pq_exec_params(TOK(s), c, "SELECT $1::int IS NULL", 1,
                                         NULL, NULL, NULL, NULL, 0, &r),
                   0);
  assert_string_equal(PQgetvalue(r, 0, 0), "t");
  PQclear(r);
  /* Busy with a query sent with libpq's own API. */
  assert_int_equal(PQsendQuery(c, "SELECT 1"), 1);
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT 2", NULL), -EBUSY);
  PGresult *x;
  while ((x = PQgetResult(c)) != NULL)
    PQclear(x);
  assert_int_equal(query_long(c, "SELECT 6"), 6);
  cancel_source_unref(s);
  PQfinish(c);
}

static void test_connect_failures(void **state) {
  (void)state;
  PGconn *c = NULL;
  assert_int_equal(cancel_pq_connect(NULL, NULL, &c), -EINVAL);
  assert_int_equal(cancel_pq_connect(NULL, g_conninfo, NULL), -EINVAL);
  assert_int_equal(cancel_pq_connect(NULL, "this is = not valid", &c), -EINVAL);
  assert_null(c);
  /* A dead server: nothing listens on that socket directory. */
  assert_int_equal(
      cancel_pq_connect(NULL, "host=/nonexistent-cancel-test dbname=x", &c),
      -ECONNREFUSED);
  assert_non_null(c);
  assert_true(strlen(PQerrorMessage(c)) > 0);
  PQfinish(c);
  /* A refused TCP connection: bind a port, then close it. */
  int port = 0;
  int fd = loopback_socket(0, &port);
  assert_true(fd >= 0);
  close(fd);
  char ci[128];
  snprintf(ci, sizeof ci,
           "hostaddr=127.0.0.1 port=%d dbname=x connect_timeout=5", port);
  assert_int_equal(cancel_pq_connect(NULL, ci, &c), -ECONNREFUSED);
  PQfinish(c);
  /* A cancelled token: no attempt. */
  cancel_source *s = new_src("req");
  cancel_source_cancel(s);
  c = NULL;
  assert_int_equal(cancel_pq_connect(TOK(s), g_conninfo, &c), -ECANCELED);
  PQfinish(c);
  cancel_source_unref(s);
}

/* A server that accepts the connection and never answers the startup
 * packet: the token abandons the attempt. */
static void test_connect_cancelled(void **state) {
  (void)state;
  int port = 0;
  int lfd = loopback_socket(4, &port);
  assert_true(lfd >= 0);
  char ci[128];
  snprintf(ci, sizeof ci, "hostaddr=127.0.0.1 port=%d dbname=x sslmode=disable",
           port);
  cancel_source *s = NULL;
  assert_int_equal(
      cancel_source_new_timeout(&s, "connect", NULL, CANCEL_MSEC(100)), 0);
  PGconn *c = NULL;
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_pq_connect(TOK(s), ci, &c), -ECANCELED);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(99), CANCEL_MSEC(200));
  PQfinish(c);
  cancel_source_unref(s);
  close(lfd);
}

/* The server ends our backend (an administrator, a restart): a clear
 * -ECONNRESET, not -ECANCELED, and nothing leaked. */
static void test_server_terminates_backend(void **state) {
  (void)state;
  PGconn *c = connect_ok(), *mon = connect_ok();
  cancel_source *s = new_src("req");
  struct bg_query *q = test_shared(sizeof *q);
  bg_sleep_start(q, c, mon, TOK(s));
  char sql[64];
  snprintf(sql, sizeof sql, "SELECT pg_terminate_backend(%d)::int",
           PQbackendPID(c));
  assert_int_equal(query_long(mon, sql), 1);
  test_helper_join(q->thread);
  assert_int_equal(q->result, -ECONNRESET);
  assert_int_equal(cancel_pq_exec(TOK(s), c, "SELECT 1", NULL), -ECONNRESET);
  cancel_source_unref(s);
  PQfinish(mon);
  PQfinish(c);
}

int main(int argc, char **argv) {
  if (argc == 4 && strcmp(argv[1], "--frozen-child") == 0)
    return frozen_child(atoi(argv[2]), argv[3]);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_exec_completes),
      cmocka_unit_test(test_cancel_stops_server_work),
      cmocka_unit_test(test_cancelled_before_call),
      cmocka_unit_test(test_deadline),
      cmocka_unit_test(test_late_cancel_never_hits_next_query),
      cmocka_unit_test(test_transaction_cancelled_before_commit),
      cmocka_unit_test(test_transaction_commits_after_point_of_no_return),
      cmocka_unit_test(test_transaction_slow_commit_shielded),
      cmocka_unit_test(test_cancel_rolls_back_open_transaction),
      cmocka_unit_test(test_transaction_misuse),
      cmocka_unit_test(test_backstop_set_local),
      cmocka_unit_test(test_backstop_when_client_frozen),
      cmocka_unit_test(test_backstop_race_has_reason),
      cmocka_unit_test(test_backstop_waits_for_late_timer),
      cmocka_unit_test(test_notify_wakes_listener),
      cmocka_unit_test(test_notify_wait_cancelled_and_deadline),
      cmocka_unit_test(test_sql_error),
      cmocka_unit_test(test_connect_failures),
      cmocka_unit_test(test_connect_cancelled),
      cmocka_unit_test(test_server_terminates_backend),
  };
  return cmocka_run_group_tests(tests, group_setup, group_teardown);
}
