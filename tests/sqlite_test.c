/*
 * libcancel-sqlite against real SQLite database files (in a fresh mkdtemp
 * directory): a long recursive CTE cancelled from a timer stops within
 * 5 ms of the cancel and the connection then works; a token cancelled
 * before the call runs nothing; exec stops between and inside statements;
 * the transaction helper rolls back work that saw the token and commits
 * work that finished before it fired (the shield); malformed SQL and NULL
 * arguments give errors distinct from -ECANCELED.
 */
#include "test_util.h"

#include "cancel/sqlite.h"

#include <dirent.h>
#include <unistd.h>

/* Cancel to return: the bound. */
#define CANCEL_LATENCY CANCEL_MSEC(5)

/* A query that runs for minutes unless stopped. */
static const char LONG_SQL[] =
    "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 FROM c "
    "WHERE x < 1000000000) SELECT count(*) FROM c";

static char dir[64];

static int setup_dir(void **state) {
  (void)state;
  snprintf(dir, sizeof dir, "/tmp/cancel_sqlite_test.XXXXXX");
  return mkdtemp(dir) != NULL ? 0 : -1;
}

static int remove_dir(void **state) {
  (void)state;
  DIR *d = opendir(dir);
  if (d == NULL)
    return -1;
  struct dirent *e;
  char path[512];
  while ((e = readdir(d)) != NULL) {
    if (e->d_name[0] == '.')
      continue;
    snprintf(path, sizeof path, "%s/%s", dir, e->d_name);
    unlink(path);
  }
  closedir(d);
  return rmdir(dir);
}

/* SQL functions the tests put inside statements, to act at a known point
 * of a running query (no sleeping):
 *   started()      posts `started` and returns 1;
 *   cancel_me()    cancels `cancel_target` and returns 1;
 *   interrupt_me() calls sqlite3_interrupt on its own connection. */
static sem_t started;
static cancel_source *cancel_target;

static void fn_started(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
  (void)argc, (void)argv;
  sem_post(&started);
  sqlite3_result_int(ctx, 1);
}

static void fn_cancel_me(sqlite3_context *ctx, int argc, sqlite3_value **argv) {
  (void)argc, (void)argv;
  cancel_source_cancel(cancel_target);
  sqlite3_result_int(ctx, 1);
}

static void fn_interrupt_me(sqlite3_context *ctx, int argc,
                            sqlite3_value **argv) {
  (void)argc, (void)argv;
  sqlite3_interrupt(sqlite3_context_db_handle(ctx));
  sqlite3_result_int(ctx, 1);
}

/* Opens (creating) dir/name with a table t(x INTEGER). */
static sqlite3 *open_db(const char *name) {
  char path[256];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  assert_int_equal(sqlite3_create_function(db, "started", 0, SQLITE_UTF8, NULL,
                                           fn_started, NULL, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_create_function(db, "cancel_me", 0, SQLITE_UTF8,
                                           NULL, fn_cancel_me, NULL, NULL),
                   SQLITE_OK);
  assert_int_equal(sqlite3_create_function(db, "interrupt_me", 0, SQLITE_UTF8,
                                           NULL, fn_interrupt_me, NULL, NULL),
                   SQLITE_OK);
  assert_int_equal(
      cancel_sqlite_exec(NULL, db, "CREATE TABLE IF NOT EXISTS t(x INTEGER)"),
      0);
  return db;
}

/* A second connection to the same file, to see what was committed. */
static int64_t committed_rows(const char *name) {
  char path[256];
  snprintf(path, sizeof path, "%s/%s", dir, name);
  sqlite3 *db = NULL;
  assert_int_equal(sqlite3_open(path, &db), SQLITE_OK);
  sqlite3_stmt *st = NULL;
  assert_int_equal(
      cancel_sqlite_prepare(NULL, db, "SELECT count(*) FROM t", -1, &st, NULL),
      0);
  assert_int_equal(cancel_sqlite_step(NULL, st), 1);
  int64_t n = sqlite3_column_int64(st, 0);
  assert_int_equal(cancel_sqlite_step(NULL, st), 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return n;
}

/* The connection answers a normal query correctly. */
static void assert_usable(sqlite3 *db, const cancel_token *tok) {
  sqlite3_stmt *st = NULL;
  assert_int_equal(
      cancel_sqlite_prepare(tok, db, "SELECT 40 + 2", -1, &st, NULL), 0);
  assert_int_equal(cancel_sqlite_step(tok, st), 1);
  assert_int_equal(sqlite3_column_int(st, 0), 42);
  assert_int_equal(cancel_sqlite_step(tok, st), 0);
  sqlite3_finalize(st);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
}

/* Runs LONG_SQL through cancel_sqlite_step with a timer cancelling after
 * `after`; returns the time from the cancel to the return. */
static int64_t cancel_long_query(sqlite3 *db, int64_t after) {
  cancel_source *s = new_src("query");
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  /* No assertion while reg (in this frame) is registered: a failed one
   * would leave the timer to fire into a dead frame.  Results first. */
  sqlite3_stmt *st = NULL;
  int prc = cancel_sqlite_prepare(TOK(s), db, LONG_SQL, -1, &st, NULL);
  int arc = prc == 0 ? cancel_source_cancel_after(s, after) : 0;
  int rc = prc == 0 && arc == 0 ? cancel_sqlite_step(TOK(s), st) : 0;
  int64_t end = cancel_now();
  /* The step sees the token cancelled as soon as the timer thread
   * publishes it, before that thread has run the callbacks: wait for
   * ours (its semaphore) before counting. */
  if (rc == -ECANCELED)
    (void)test_sem_wait_ns(&f.sem, test_tol(CANCEL_SEC(5)));
  int count = test_load(&f.count);
  int urc = cancel_unregister(&reg);
  assert_int_equal(prc, 0);
  assert_int_equal(arc, 0);
  assert_int_equal(rc, -ECANCELED);
  assert_int_equal(count, 1);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_int_equal(urc, 0);
  /* Level-triggered, and the statement was reset, not left running. */
  assert_int_equal(cancel_sqlite_step(TOK(s), st), -ECANCELED);
  assert_int_equal(sqlite3_stmt_busy(st), 0);
  sqlite3_finalize(st);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
  return end - f.at;
}

/* ---- Cancelled while running ------------------------------------------ */

static void test_long_query_cancelled_by_timer(void **state) {
  (void)state;
  sqlite3 *db = open_db("timer.db");
  int64_t t0 = cancel_now();
  int64_t late = cancel_long_query(db, CANCEL_MSEC(50));
  assert_i64_ge(test_since(t0), CANCEL_MSEC(50));
  assert_i64_ge(late, 0);
  assert_i64_lt(late, test_tol(CANCEL_LATENCY));
  assert_usable(db, NULL);
  cancel_source *live = new_src("live");
  assert_usable(db, TOK(live));
  cancel_source_unref(live);
  sqlite3_close(db);
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* 50 cancels: the latency distribution, printed for the README. */
static void test_cancel_latency_distribution(void **state) {
  (void)state;
  enum { RUNS = 50 };
  sqlite3 *db = open_db("latency.db");
  int64_t lat[RUNS];
  for (int i = 0; i < RUNS; i++)
    lat[i] = cancel_long_query(db, CANCEL_MSEC(5));
  qsort(lat, RUNS, sizeof lat[0], cmp_i64);
  print_message("sqlite cancel latency over %d runs: p50 %" PRId64
                " us, p99 %" PRId64 " us, max %" PRId64 " us\n",
                RUNS, lat[RUNS / 2] / 1000, lat[RUNS * 99 / 100] / 1000,
                lat[RUNS - 1] / 1000);
  assert_i64_lt(lat[RUNS / 2], test_tol(CANCEL_LATENCY));
  assert_usable(db, NULL);
  sqlite3_close(db);
}

/* Cancelled from another thread (no timer) while inside an explicit
 * transaction: the rows inserted before are rolled back and no
 * transaction stays open. */
struct query_ctx {
  sqlite3 *db;
  cancel_source *src;
};

/* The long query, announcing (once) that it really runs. */
static const char LONG_STARTED_SQL[] =
    "WITH RECURSIVE c(x) AS (SELECT started() UNION ALL SELECT x+1 FROM c "
    "WHERE x < 1000000000) SELECT count(*) FROM c";

static int64_t run_long_exec(void *arg) {
  struct query_ctx *c = arg;
  return cancel_sqlite_exec(TOK(c->src), c->db, LONG_STARTED_SQL);
}

static void test_cancel_inside_transaction(void **state) {
  (void)state;
  sqlite3 *db = open_db("intx.db");
  cancel_source *s = new_src("tx");
  assert_int_equal(
      cancel_sqlite_exec(TOK(s), db, "BEGIN; INSERT INTO t VALUES (1), (2)"),
      0);
  assert_int_equal(sqlite3_get_autocommit(db), 0);
  struct query_ctx c = {db, s};
  struct test_waiter w;
  sem_init(&started, 0, 0);
  test_waiter_start(&w, run_long_exec, &c);
  test_waiter_stop_with(&w, test_rescue_cancel, s);
  /* Cancel once the query is running (its first row was computed). */
  if (test_sem_wait_ns(&started, test_tol(CANCEL_SEC(5))) != 0)
    fail_msg("the query did not start");
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(s), 1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(5)), test_rescue_cancel, s);
  assert_i64_eq(w.result, -ECANCELED);
  assert_i64_lt(w.t_end - t_cancel, test_tol(CANCEL_LATENCY));
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_i64_eq(committed_rows("intx.db"), 0);
  assert_usable(db, NULL);
  sem_destroy(&started);
  cancel_source_unref(s);
  sqlite3_close(db);
}

/* ---- Cancelled before the call ---------------------------------------- */

static void test_cancelled_before_runs_nothing(void **state) {
  (void)state;
  sqlite3 *db = open_db("before.db");
  cancel_source *s = new_src("before");
  sqlite3_stmt *ins = NULL;
  assert_int_equal(cancel_sqlite_prepare(NULL, db, "INSERT INTO t VALUES (7)",
                                         -1, &ins, NULL),
                   0);
  assert_int_equal(cancel_source_cancel(s), 1);

  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sqlite_step(TOK(s), ins), -ECANCELED);
  assert_int_equal(cancel_sqlite_exec(TOK(s), db, "INSERT INTO t VALUES (8)"),
                   -ECANCELED);
  assert_int_equal(cancel_sqlite_exec(TOK(s), db, LONG_SQL), -ECANCELED);
  sqlite3_stmt *st = (sqlite3_stmt *)&st; /* set to NULL by the call */
  assert_int_equal(cancel_sqlite_prepare(TOK(s), db, "SELECT 1", -1, &st, NULL),
                   -ECANCELED);
  assert_null(st);
  assert_i64_lt(test_since(t0), test_tol(CANCEL_MSEC(20)));
  assert_i64_eq(committed_rows("before.db"), 0);

  /* An explicit transaction open when a cancelled call comes: rolled back,
   * the rule "after -ECANCELED no transaction is open" holds. */
  assert_int_equal(
      cancel_sqlite_exec(NULL, db, "BEGIN; INSERT INTO t VALUES (9)"), 0);
  assert_int_equal(cancel_sqlite_step(TOK(s), ins), -ECANCELED);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_i64_eq(committed_rows("before.db"), 0);

  /* The same statement with a live token runs. */
  assert_int_equal(cancel_sqlite_step(NULL, ins), 0);
  assert_i64_eq(committed_rows("before.db"), 1);
  sqlite3_finalize(ins);
  cancel_source_unref(s);
  sqlite3_close(db);
}

/* exec: the token fires during the second statement (a short one, which
 * completes); the third is not started.  The first was autocommitted. */
static void test_exec_stops_between_statements(void **state) {
  (void)state;
  sqlite3 *db = open_db("between.db");
  cancel_source *s = new_src("between");
  cancel_target = s;
  assert_int_equal(cancel_sqlite_exec(TOK(s), db,
                                      "INSERT INTO t VALUES (1);"
                                      "SELECT cancel_me();"
                                      "INSERT INTO t VALUES (2)"),
                   -ECANCELED);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_i64_eq(committed_rows("between.db"), 1);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_usable(db, NULL);
  cancel_target = NULL;
  cancel_source_unref(s);
  sqlite3_close(db);
}

/* ---- Errors ------------------------------------------------------------- */

static void test_malformed_sql(void **state) {
  (void)state;
  sqlite3 *db = open_db("bad.db");
  cancel_source *s = new_src("bad");
  assert_int_equal(cancel_sqlite_exec(TOK(s), db, "SELEKT 1"), -EIO);
  assert_int_equal(sqlite3_errcode(db), SQLITE_ERROR);
  assert_non_null(strstr(sqlite3_errmsg(db), "syntax error"));
  sqlite3_stmt *st = (sqlite3_stmt *)&st;
  assert_int_equal(
      cancel_sqlite_prepare(TOK(s), db, "SELECT * FROM nosuch", -1, &st, NULL),
      -EIO);
  assert_null(st);
  assert_non_null(strstr(sqlite3_errmsg(db), "no such table"));
  /* A run-time error: -EIO too, statements before it have run. */
  assert_int_equal(
      cancel_sqlite_exec(TOK(s), db,
                         "CREATE TABLE u(x UNIQUE); INSERT INTO u VALUES (1);"
                         "INSERT INTO u VALUES (1); INSERT INTO u VALUES (2)"),
      -EIO);
  assert_int_equal(sqlite3_extended_errcode(db), SQLITE_CONSTRAINT_UNIQUE);
  /* The connection is fine afterwards. */
  assert_usable(db, TOK(s));
  assert_false(cancel_token_is_cancelled(TOK(s)));
  /* An interrupt that is not our token's: -EINTR, not -ECANCELED. */
  assert_int_equal(
      cancel_sqlite_exec(TOK(s), db,
                         "WITH RECURSIVE c(x) AS (SELECT interrupt_me() "
                         "UNION ALL SELECT x+1 FROM c WHERE x < 100000000) "
                         "SELECT count(*) FROM c"),
      -EINTR);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_usable(db, TOK(s));
  cancel_source_unref(s);
  sqlite3_close(db);
}

static int work_nop(const cancel_token *tok, sqlite3 *db, void *arg) {
  (void)tok, (void)db, (void)arg;
  return 0;
}

static void test_null_args(void **state) {
  (void)state;
  sqlite3 *db = open_db("null.db");
  sqlite3_stmt *st = NULL;
  assert_int_equal(cancel_sqlite_step(NULL, NULL), -EINVAL);
  assert_int_equal(cancel_sqlite_exec(NULL, NULL, "SELECT 1"), -EINVAL);
  assert_int_equal(cancel_sqlite_exec(NULL, db, NULL), -EINVAL);
  assert_int_equal(cancel_sqlite_prepare(NULL, NULL, "SELECT 1", -1, &st, NULL),
                   -EINVAL);
  assert_int_equal(cancel_sqlite_prepare(NULL, db, NULL, -1, &st, NULL),
                   -EINVAL);
  assert_int_equal(cancel_sqlite_prepare(NULL, db, "SELECT 1", -1, NULL, NULL),
                   -EINVAL);
  assert_int_equal(cancel_sqlite_transaction(NULL, NULL, work_nop, NULL, 0),
                   -EINVAL);
  assert_int_equal(cancel_sqlite_transaction(NULL, db, NULL, NULL, 0), -EINVAL);
  assert_int_equal(cancel_sqlite_transaction(NULL, db, work_nop, NULL, -1),
                   -EINVAL);
  /* Nested: refused, the caller's transaction left alone. */
  assert_int_equal(cancel_sqlite_exec(NULL, db, "BEGIN"), 0);
  assert_int_equal(cancel_sqlite_transaction(NULL, db, work_nop, NULL, 0),
                   -EINVAL);
  assert_int_equal(sqlite3_get_autocommit(db), 0);
  assert_int_equal(cancel_sqlite_exec(NULL, db, "ROLLBACK"), 0);
  assert_usable(db, NULL);
  sqlite3_close(db);
}

/* ---- Transactions ------------------------------------------------------- */

struct tx_ctx {
  cancel_source *src;
  int rows;
  bool cancel_after_work; /* fire the token right after the last statement */
  bool run_long;          /* then run the long query (sees the token) */
  int fail_with;          /* a work error to return, 0 for none */
};

static int tx_work(const cancel_token *tok, sqlite3 *db, void *arg) {
  struct tx_ctx *c = arg;
  for (int i = 0; i < c->rows; i++) {
    int rc = cancel_sqlite_exec(tok, db, "INSERT INTO t VALUES (1)");
    if (rc < 0)
      return rc;
  }
  if (c->run_long) {
    int rc = cancel_sqlite_exec(tok, db, LONG_SQL);
    if (rc < 0)
      return rc;
  }
  if (c->fail_with != 0)
    return c->fail_with;
  if (c->cancel_after_work)
    cancel_source_cancel(c->src);
  return c->rows;
}

static void test_transaction_commits(void **state) {
  (void)state;
  sqlite3 *db = open_db("txok.db");
  cancel_source *s = new_src("txok");
  struct tx_ctx c = {.src = s, .rows = 3};
  assert_int_equal(cancel_sqlite_transaction(TOK(s), db, tx_work, &c, 0), 3);
  assert_i64_eq(committed_rows("txok.db"), 3);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  /* NULL token: never cancelled. */
  assert_int_equal(cancel_sqlite_transaction(NULL, db, tx_work, &c, 0), 3);
  assert_i64_eq(committed_rows("txok.db"), 6);
  cancel_source_unref(s);
  sqlite3_close(db);
}

static void test_transaction_cancelled_before_commit(void **state) {
  (void)state;
  sqlite3 *db = open_db("txcancel.db");
  cancel_source *s = new_src("txcancel");
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  /* Rows inserted, then the long query is cut by the timer: work returns
   * -ECANCELED and nothing is committed.  No assertion while reg (in this
   * frame) is registered: results first. */
  struct tx_ctx c = {.src = s, .rows = 5, .run_long = true};
  int arc = cancel_source_cancel_after(s, CANCEL_MSEC(30));
  int trc =
      arc == 0 ? cancel_sqlite_transaction(TOK(s), db, tx_work, &c, 0) : 0;
  int64_t since_fire = test_since(f.at);
  int urc = cancel_unregister(&reg);
  assert_int_equal(arc, 0);
  assert_int_equal(trc, -ECANCELED);
  /* One shot, so a loaded machine's scheduling shows: the loose bound;
   * the latency loop above asserts the median against CANCEL_LATENCY. */
  assert_i64_lt(since_fire, test_tol(CANCEL_MSEC(200)));
  assert_int_equal(urc, 0);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_i64_eq(committed_rows("txcancel.db"), 0);
  /* Cancelled before the call: BEGIN does not even run. */
  assert_int_equal(cancel_sqlite_transaction(TOK(s), db, tx_work, &c, 0),
                   -ECANCELED);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_i64_eq(committed_rows("txcancel.db"), 0);
  assert_usable(db, NULL);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
  sqlite3_close(db);
}

static void test_transaction_work_error_rolls_back(void **state) {
  (void)state;
  sqlite3 *db = open_db("txerr.db");
  cancel_source *s = new_src("txerr");
  struct tx_ctx c = {.src = s, .rows = 2, .fail_with = -EPROTO};
  assert_int_equal(cancel_sqlite_transaction(TOK(s), db, tx_work, &c, 0),
                   -EPROTO);
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_i64_eq(committed_rows("txerr.db"), 0);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
  sqlite3_close(db);
}

/* The token fires right after work returned (here: as its last act): the
 * point of no return is passed, the COMMIT runs under the shield. */
static void test_transaction_cancelled_after_work_commits(void **state) {
  (void)state;
  sqlite3 *db = open_db("txlate.db");
  for (int grace = 0; grace < 2; grace++) {
    cancel_source *s = new_src("txlate");
    struct tx_ctx c = {.src = s, .rows = 4, .cancel_after_work = true};
    size_t shields = cancel_shields_open();
    assert_int_equal(cancel_sqlite_transaction(TOK(s), db, tx_work, &c,
                                               grace ? CANCEL_SEC(10) : 0),
                     4);
    assert_true(cancel_token_is_cancelled(TOK(s)));
    assert_int_equal(sqlite3_get_autocommit(db), 1);
    assert_i64_eq(committed_rows("txlate.db"), 4 * (grace + 1));
    assert_int_equal(cancel_shields_open(), shields);
    cancel_source_unref(s);
  }
  sqlite3_close(db);
}

/* The token fires DURING the COMMIT (from SQLite's commit hook, which runs
 * inside it): the commit still happens. */
static size_t shields_in_commit;

static int commit_hook_cancel(void *arg) {
  shields_in_commit = cancel_shields_open();
  cancel_source_cancel((cancel_source *)arg);
  return 0; /* 0: let the commit proceed */
}

static void test_transaction_cancelled_during_commit(void **state) {
  (void)state;
  sqlite3 *db = open_db("txhook.db");
  cancel_source *s = new_src("txhook");
  struct tx_ctx c = {.src = s, .rows = 2};
  size_t shields = cancel_shields_open();
  sqlite3_commit_hook(db, commit_hook_cancel, s);
  assert_int_equal(
      cancel_sqlite_transaction(TOK(s), db, tx_work, &c, CANCEL_SEC(10)), 2);
  sqlite3_commit_hook(db, NULL, NULL);
  /* The COMMIT ran under the helper's shield, now closed. */
  assert_int_equal(shields_in_commit, shields + 1);
  assert_int_equal(cancel_shields_open(), shields);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(sqlite3_get_autocommit(db), 1);
  assert_i64_eq(committed_rows("txhook.db"), 2);
  cancel_source_unref(s);
  sqlite3_close(db);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_long_query_cancelled_by_timer),
      cmocka_unit_test(test_cancel_latency_distribution),
      cmocka_unit_test(test_cancel_inside_transaction),
      cmocka_unit_test(test_cancelled_before_runs_nothing),
      cmocka_unit_test(test_exec_stops_between_statements),
      cmocka_unit_test(test_malformed_sql),
      cmocka_unit_test(test_null_args),
      cmocka_unit_test(test_transaction_commits),
      cmocka_unit_test(test_transaction_cancelled_before_commit),
      cmocka_unit_test(test_transaction_work_error_rolls_back),
      cmocka_unit_test(test_transaction_cancelled_after_work_commits),
      cmocka_unit_test(test_transaction_cancelled_during_commit),
  };
  return cmocka_run_group_tests(tests, setup_dir, remove_dir);
}
