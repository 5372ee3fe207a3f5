/*
 * pq_bench: libcancel-pq against a real PostgreSQL server.
 *
 * The server is a throwaway one started with tests/pg/server.sh (Unix
 * socket, fsync off), or the one CANCEL_BENCH_PG_CONNINFO names.
 *
 *   pq_cancel_latency_p50 / _p99 (us): `SELECT pg_sleep(30)` runs in
 *     cancel_pq_exec; a timer cancels the token 2-10 ms in; a sample runs
 *     from the token's callback (on the timer thread) to the call's return,
 *     which includes the cancel request to the server (PQcancel opens a
 *     connection to it) and reading the backend's "canceled" error: the
 *     connection is idle and reusable when the clock stops.  200 samples
 *     (40 with BENCH_QUICK).
 *   pq_uncancelled (us per query): `SELECT 1` on one connection, through
 *     cancel_pq_exec with a live token without a deadline (impl libcancel)
 *     and through PQexec (impl plain), one query of each in turn so that
 *     the machine's noise hits both alike; the median of each.
 */
#include "cancel_latency.h"

#include <cancel.h>
#include <cancel/pq.h>

#include "../tests/pg/pg_server.h"

#include <errno.h>
#include <stdlib.h>
#include <unistd.h>

#ifndef CANCEL_BENCH_SOURCE_DIR
#error "the build defines CANCEL_BENCH_SOURCE_DIR (the repository's root)"
#endif

static int long_query(const cancel_token *tok, void *conn) {
  return cancel_pq_exec(tok, conn, "SELECT pg_sleep(30)", NULL);
}

static void uncancelled(PGconn *c) {
  size_t n = bench_quick() ? 300 : 3000;
  int64_t *ours = calloc(n, sizeof *ours), *plain = calloc(n, sizeof *plain);
  if (ours == NULL || plain == NULL)
    bench_die("calloc", -ENOMEM);
  cancel_source *live;
  if (cancel_source_new(&live, "live") < 0)
    bench_die("cancel_source_new", -ENOMEM);
  /* Warm both paths (the server's plan cache, the connection's buffers). */
  for (size_t i = 0; i < n + 100; i++) {
    int64_t t0 = bench_now();
    PGresult *r = NULL;
    int rc = cancel_pq_exec(cancel_source_token(live), c, "SELECT 1", &r);
    int64_t t1 = bench_now();
    if (rc != 0)
      bench_die("cancel_pq_exec", rc);
    PQclear(r);
    int64_t t2 = bench_now();
    r = PQexec(c, "SELECT 1");
    int64_t t3 = bench_now();
    if (PQresultStatus(r) != PGRES_TUPLES_OK)
      bench_die("PQexec", -EIO);
    PQclear(r);
    if (i >= 100) {
      ours[i - 100] = t1 - t0;
      plain[i - 100] = t3 - t2;
    }
  }
  bench_median_row("pq_uncancelled", "libcancel", ours, n);
  bench_median_row("pq_uncancelled", "plain", plain, n);
  cancel_source_unref(live);
  free(ours);
  free(plain);
}

int main(void) {
  bool latency = bench_wanted_latency("pq_cancel_latency");
  if (!latency && !bench_wanted("pq_uncancelled"))
    return 0;
  struct pg_server pg;
  if (pg_server_start(&pg, CANCEL_BENCH_SOURCE_DIR, "CANCEL_BENCH_PG_CONNINFO",
                      "cancel-pq-bench") != 0)
    bench_die("starting PostgreSQL (tests/pg/server.sh)", -EIO);
  const char *conninfo = pg.conninfo;
  PGconn *c = NULL;
  int rc = cancel_pq_connect(NULL, conninfo, &c);
  if (rc == 0) {
    if (latency)
      bench_cancel_latency("pq_cancel_latency", long_query, c);
    if (bench_wanted("pq_uncancelled"))
      uncancelled(c);
  } else {
    fprintf(stderr, "pq_bench: %s\n", c != NULL ? PQerrorMessage(c) : "");
  }
  PQfinish(c);
  pg_server_stop(&pg, CANCEL_BENCH_SOURCE_DIR);
  if (rc != 0)
    bench_die("cancel_pq_connect", rc);
  return 0;
}
