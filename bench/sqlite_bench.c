/*
 * sqlite_bench: libcancel-sqlite.
 *
 *   sqlite_cancel_latency_p50 / _p99 (us): a recursive CTE counting to 10^9
 *     runs in cancel_sqlite_step; a timer cancels the token 2-10 ms in; a
 *     sample runs from the token's callback (on the timer thread) to the
 *     step's return.  200 samples (40 with BENCH_QUICK).
 *   sqlite_uncancelled (ns per query): `SELECT count(*)` over a 1000-row
 *     in-memory table, prepared once, stepped and reset: through
 *     cancel_sqlite_step with a live token (impl libcancel) and through
 *     sqlite3_step (impl plain), in batches of 200 taken in turn; the
 *     median batch of each.
 */
#include "cancel_latency.h"

#include <cancel.h>
#include <cancel/sqlite.h>

#include <sqlite3.h>

/* The 10^9 CTE, stepped until the token stops it (cancel_sqlite_step
 * resets a cancelled statement: ready for the next sample). */
static int long_step(const cancel_token *tok, void *stmt) {
  return cancel_sqlite_step(tok, stmt);
}

static void cancel_latency(sqlite3 *db) {
  const char *sql = "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x+1 "
                    "FROM c WHERE x < 1000000000) SELECT count(*) FROM c";
  sqlite3_stmt *stmt;
  if (sqlite3_prepare_v2(db, sql, -1, &stmt, NULL) != SQLITE_OK)
    bench_die("prepare", 0);
  bench_cancel_latency("sqlite_cancel_latency", long_step, stmt);
  sqlite3_finalize(stmt);
}

struct q {
  sqlite3_stmt *stmt;
  const cancel_token *tok; /* NULL: the plain call */
};

static int64_t run_query(void *ctx, uint64_t n) {
  struct q *q = ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    int rc = q->tok != NULL ? cancel_sqlite_step(q->tok, q->stmt)
                            : (sqlite3_step(q->stmt) == SQLITE_ROW ? 1 : -1);
    if (rc != 1)
      bench_die("step", rc);
    sqlite3_reset(q->stmt);
  }
  return bench_now() - t0;
}

int main(void) {
  sqlite3 *db;
  if (sqlite3_open(":memory:", &db) != SQLITE_OK)
    bench_die("sqlite3_open", 0);
  if (sqlite3_exec(db,
                   "CREATE TABLE t(x); WITH RECURSIVE c(x) AS (SELECT 1 UNION "
                   "ALL SELECT x+1 FROM c WHERE x < 1000) INSERT INTO t "
                   "SELECT x FROM c",
                   NULL, NULL, NULL) != SQLITE_OK)
    bench_die("seed", 0);
  if (bench_wanted("sqlite_cancel_latency"))
    cancel_latency(db);
  if (bench_wanted("sqlite_uncancelled")) {
    cancel_source *live;
    cancel_source_new(&live, "live");
    struct q ours = {NULL, cancel_source_token(live)};
    if (sqlite3_prepare_v2(db, "SELECT count(*) FROM t", -1, &ours.stmt,
                           NULL) != SQLITE_OK)
      bench_die("prepare", 0);
    struct q plain = {ours.stmt, NULL};
    /* Batches of 200 queries, one of each in turn, so that the machine's
     * noise hits both alike; the median batch of each. */
    size_t n = bench_quick() ? 40 : 400;
    int64_t *a = calloc(n, sizeof *a), *b = calloc(n, sizeof *b);
    if (a == NULL || b == NULL)
      bench_die("calloc", -ENOMEM);
    (void)run_query(&ours, 1000); /* warm both paths */
    (void)run_query(&plain, 1000);
    for (size_t i = 0; i < n; i++) {
      a[i] = run_query(&ours, 200) / 200;
      b[i] = run_query(&plain, 200) / 200;
    }
    bench_row("sqlite_uncancelled", "libcancel",
              (double)bench_percentile(a, n, 50), "ns");
    bench_row("sqlite_uncancelled", "plain", (double)bench_percentile(b, n, 50),
              "ns");
    free(a);
    free(b);
    sqlite3_finalize(ours.stmt);
    cancel_source_unref(live);
  }
  sqlite3_close(db);
  return 0;
}
