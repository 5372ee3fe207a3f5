/*
 * reportd's database, on libcancel-sqlite or libcancel-pq.  See store.h.
 */
#define _GNU_SOURCE
#include "store.h"

#include <cancel/log.h>
#include <cancel/pq.h>
#include <cancel/sqlite.h>

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ---- The connection pool ------------------------------------------------- */

struct conn {
  void *h; /* sqlite3 * or PGconn * */
  struct conn *next;
};

struct store {
  struct store_config cfg;
  bool pg;
  pthread_mutex_t mu;
  struct conn *idle;
};

static int open_handle(store *s, void **h);
static void close_handle(store *s, void *h);

static int conn_get(store *s, struct conn **cp) {
  pthread_mutex_lock(&s->mu);
  struct conn *c = s->idle;
  if (c != NULL)
    s->idle = c->next;
  pthread_mutex_unlock(&s->mu);
  if (c != NULL) {
    *cp = c;
    return 0;
  }
  c = calloc(1, sizeof *c);
  if (c == NULL)
    return -ENOMEM;
  int rc = open_handle(s, &c->h);
  if (rc < 0) {
    free(c);
    return rc;
  }
  *cp = c;
  return 0;
}

/* Back to the pool, or closed when the call broke it. */
static void conn_put(store *s, struct conn *c, int rc) {
  if (rc == -ECONNRESET || rc == -ENOMEM) {
    close_handle(s, c->h);
    free(c);
    return;
  }
  pthread_mutex_lock(&s->mu);
  c->next = s->idle;
  s->idle = c;
  pthread_mutex_unlock(&s->mu);
}

/* ---- SQLite -------------------------------------------------------------- */

typedef int sq_row_fn(sqlite3_stmt *st, void *ctx);

/* Runs one statement with integer arguments ?1..?n, calling row() for each
 * row.  Returns 0, or the first error. */
static int sq_run(sqlite3 *db, const cancel_token *tok, const char *sql,
                  const long *args, int nargs, sq_row_fn *row, void *ctx) {
  sqlite3_stmt *st = NULL;
  int rc = cancel_sqlite_prepare(tok, db, sql, -1, &st, NULL);
  if (rc < 0)
    return rc;
  for (int i = 0; i < nargs; i++)
    sqlite3_bind_int64(st, i + 1, args[i]);
  while ((rc = cancel_sqlite_step(tok, st)) == 1)
    if (row != NULL && (rc = row(st, ctx)) < 0)
      break;
  sqlite3_finalize(st);
  return rc;
}

static int sq_exec(sqlite3 *db, const char *sql) {
  int rc = cancel_sqlite_exec(NULL, db, sql);
  if (rc < 0) {
    char head[41];
    snprintf(head, sizeof head, "%s", sql);
    CANCEL_LOG(CANCEL_LOG_ERROR, "reportd", "sqlite",
               CANCEL_LOG_STR("sql", head),
               CANCEL_LOG_STR("error", sqlite3_errmsg(db)));
  }
  return rc;
}

static long g_commit_delay_ms;

/* Makes the jobs worker's COMMIT slow (a slow disk's fsync): the demo's
 * way to land a SIGTERM inside the point of no return. */
static int slow_commit(void *arg) {
  (void)arg;
  CANCEL_LOG(CANCEL_LOG_INFO, "reportd", "job commit started",
             CANCEL_LOG_I64("delay_ms", g_commit_delay_ms));
  struct timespec ts = {.tv_sec = g_commit_delay_ms / 1000,
                        .tv_nsec = (g_commit_delay_ms % 1000) * 1000000};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
  return 0; /* go on committing */
}

static int sq_open(store *s, sqlite3 **dbp) {
  sqlite3 *db = NULL;
  int rc = sqlite3_open_v2(
      s->cfg.sqlite_path, &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX, NULL);
  if (rc != SQLITE_OK) {
    CANCEL_LOG(CANCEL_LOG_ERROR, "reportd", "cannot open database",
               CANCEL_LOG_STR("path", s->cfg.sqlite_path),
               CANCEL_LOG_STR("error", db != NULL ? sqlite3_errmsg(db)
                                                  : "out of memory"));
    sqlite3_close(db);
    return -EIO;
  }
  sqlite3_busy_timeout(db, 5000);
  if (sq_exec(db, "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL") < 0) {
    sqlite3_close(db);
    return -EIO;
  }
  *dbp = db;
  return 0;
}

static int count_row(sqlite3_stmt *st, void *ctx) {
  *(long *)ctx = (long)sqlite3_column_int64(st, 0);
  return 0;
}

static int sq_seed(store *s, sqlite3 *db) {
  if (sq_exec(db, "CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY,"
                  " title TEXT NOT NULL);"
                  "CREATE TABLE IF NOT EXISTS rows (report_id INTEGER NOT NULL,"
                  " amount REAL NOT NULL);"
                  "CREATE INDEX IF NOT EXISTS rows_report ON rows(report_id);"
                  "CREATE TABLE IF NOT EXISTS jobs (id INTEGER PRIMARY KEY"
                  " AUTOINCREMENT, report_id INTEGER NOT NULL,"
                  " state TEXT NOT NULL DEFAULT 'pending',"
                  " attempts INTEGER NOT NULL DEFAULT 0, last_error TEXT,"
                  " created_at INTEGER, updated_at INTEGER,"
                  " next_at INTEGER NOT NULL DEFAULT 0);"
                  "CREATE TABLE IF NOT EXISTS reports_out (job_id INTEGER"
                  " PRIMARY KEY, report_id INTEGER NOT NULL, body TEXT)") < 0)
    return -EIO;
  /* A jobs table made by an older reportd: the columns the retries need
   * (SQLite has no ADD COLUMN IF NOT EXISTS). */
  long n = 0;
  int rc = sq_run(db, NULL,
                  "SELECT count(*) FROM pragma_table_info('jobs') "
                  "WHERE name = 'next_at'",
                  NULL, 0, count_row, &n);
  if (rc == 0 && n == 0 &&
      sq_exec(db, "ALTER TABLE jobs ADD COLUMN attempts INTEGER NOT NULL "
                  "DEFAULT 0;"
                  "ALTER TABLE jobs ADD COLUMN last_error TEXT;"
                  "ALTER TABLE jobs ADD COLUMN created_at INTEGER;"
                  "ALTER TABLE jobs ADD COLUMN updated_at INTEGER;"
                  "ALTER TABLE jobs ADD COLUMN next_at INTEGER NOT NULL "
                  "DEFAULT 0") < 0)
    return -EIO;
  if (rc == 0 && sq_exec(db, "CREATE INDEX IF NOT EXISTS jobs_due ON "
                             "jobs(state, next_at, id)") < 0)
    return -EIO;
  if (rc == 0)
    rc = sq_run(db, NULL, "SELECT count(*) FROM reports", NULL, 0, count_row,
                &n);
  if (rc < 0 || n > 0)
    return rc;
  long args[1] = {s->cfg.rows_per_report};
  rc = sq_exec(db, "BEGIN");
  if (rc == 0)
    rc = sq_exec(db, "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 "
                     "FROM r WHERE i < 100) INSERT INTO reports "
                     "SELECT i, 'Report ' || i FROM r");
  if (rc == 0)
    rc = sq_run(db, NULL,
                "WITH RECURSIVE r(i) AS (SELECT 1 UNION ALL SELECT i+1 FROM r "
                "WHERE i < 100), k(j) AS (SELECT 1 UNION ALL SELECT j+1 FROM "
                "k WHERE j < ?1) INSERT INTO rows SELECT i, "
                "((i * 7919 + j * 104729) % 100000) / 100.0 FROM r, k",
                args, 1, NULL, NULL);
  if (rc == 0)
    rc = sq_exec(db, "COMMIT");
  else
    (void)cancel_sqlite_exec(NULL, db, "ROLLBACK");
  return rc;
}

/* ---- PostgreSQL -------------------------------------------------------- */

/* Runs sql with integer parameters; *res (may be NULL) gets the result. */
static int pg_run(PGconn *c, const cancel_token *tok, const char *sql,
                  const long *args, int nargs, PGresult **res) {
  char buf[4][24];
  const char *vals[4];
  for (int i = 0; i < nargs && i < 4; i++) {
    snprintf(buf[i], sizeof buf[i], "%ld", args[i]);
    vals[i] = buf[i];
  }
  PGresult *r = NULL;
  int rc =
      cancel_pq_exec_params(tok, c, sql, nargs, NULL, vals, NULL, NULL, 0, &r);
  if (rc == -EIO) {
    char head[41];
    snprintf(head, sizeof head, "%s", sql);
    const char *state =
        r != NULL ? PQresultErrorField(r, PG_DIAG_SQLSTATE) : NULL;
    CANCEL_LOG(CANCEL_LOG_ERROR, "reportd", "postgresql",
               CANCEL_LOG_STR("sql", head),
               CANCEL_LOG_STR("sqlstate", state != NULL ? state : "-"));
  }
  if (res != NULL && rc == 0)
    *res = r;
  else
    PQclear(r);
  return rc;
}

static int pg_open(store *s, PGconn **cp) {
  PGconn *c = NULL;
  int rc = cancel_pq_connect(NULL, s->cfg.pg_conninfo, &c);
  if (rc < 0) {
    CANCEL_LOG(
        CANCEL_LOG_ERROR, "reportd", "cannot connect to PostgreSQL",
        CANCEL_LOG_STRN("error", c != NULL ? PQerrorMessage(c) : "", 300));
    PQfinish(c);
    return rc;
  }
  *cp = c;
  return 0;
}

static int pg_seed(store *s, PGconn *c) {
  int rc = cancel_pq_exec(
      NULL, c,
      "SET client_min_messages = warning;"
      "CREATE TABLE IF NOT EXISTS reports (id bigint PRIMARY KEY,"
      " title text NOT NULL);"
      "CREATE TABLE IF NOT EXISTS rows (report_id bigint NOT NULL,"
      " amount double precision NOT NULL);"
      "CREATE INDEX IF NOT EXISTS rows_report ON rows(report_id);"
      "CREATE TABLE IF NOT EXISTS jobs (id bigserial PRIMARY KEY,"
      " report_id bigint NOT NULL, state text NOT NULL DEFAULT 'pending');"
      /* Fresh, or made by an older reportd: the columns the retries need. */
      "ALTER TABLE jobs ADD COLUMN IF NOT EXISTS attempts bigint NOT NULL"
      " DEFAULT 0, ADD COLUMN IF NOT EXISTS last_error text,"
      " ADD COLUMN IF NOT EXISTS created_at bigint,"
      " ADD COLUMN IF NOT EXISTS updated_at bigint,"
      " ADD COLUMN IF NOT EXISTS next_at bigint NOT NULL DEFAULT 0;"
      "CREATE INDEX IF NOT EXISTS jobs_due ON jobs(state, next_at, id);"
      "CREATE TABLE IF NOT EXISTS reports_out (job_id bigint PRIMARY KEY,"
      " report_id bigint NOT NULL, body text)",
      NULL);
  if (rc < 0)
    return rc;
  PGresult *r = NULL;
  rc = pg_run(c, NULL, "SELECT count(*) FROM reports", NULL, 0, &r);
  if (rc < 0)
    return rc;
  long n = strtol(PQgetvalue(r, 0, 0), NULL, 10);
  PQclear(r);
  if (n > 0)
    return 0;
  long args[1] = {s->cfg.rows_per_report};
  rc = cancel_pq_exec(NULL, c,
                      "BEGIN; INSERT INTO reports SELECT i, 'Report ' || i "
                      "FROM generate_series(1, 100) i",
                      NULL);
  if (rc == 0)
    rc = pg_run(c, NULL,
                "INSERT INTO rows SELECT i, ((i * 7919 + j * 104729) % 100000)"
                " / 100.0 FROM generate_series(1, 100) i,"
                " generate_series(1, $1::int) j",
                args, 1, NULL);
  rc = cancel_pq_exec(NULL, c, rc == 0 ? "COMMIT" : "ROLLBACK", NULL) < 0 &&
               rc == 0
           ? -EIO
           : rc;
  return rc;
}

/* ---- The interface ------------------------------------------------------ */

static int open_handle(store *s, void **h) {
  return s->pg ? pg_open(s, (PGconn **)h) : sq_open(s, (sqlite3 **)h);
}

static void close_handle(store *s, void *h) {
  if (s->pg)
    PQfinish(h);
  else
    sqlite3_close(h);
}

int store_open(store **sp, const struct store_config *cfg) {
  store *s = calloc(1, sizeof *s);
  if (s == NULL)
    return -ENOMEM;
  s->cfg = *cfg;
  s->pg = cfg->pg_conninfo != NULL;
  g_commit_delay_ms = cfg->commit_delay_ms;
  pthread_mutex_init(&s->mu, NULL);
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc == 0) {
    rc = s->pg ? pg_seed(s, c->h) : sq_seed(s, c->h);
    conn_put(s, c, rc);
  }
  if (rc < 0) {
    store_close(s);
    return rc;
  }
  *sp = s;
  return 0;
}

void store_close(store *s) {
  if (s == NULL)
    return;
  while (s->idle != NULL) {
    struct conn *c = s->idle;
    s->idle = c->next;
    close_handle(s, c->h);
    free(c);
  }
  pthread_mutex_destroy(&s->mu);
  free(s);
}

const char *store_kind(const store *s) {
  return s->pg ? "postgresql" : "sqlite";
}

struct amounts {
  double *v;
  size_t n, cap;
};

static int push(struct amounts *a, double x) {
  if (a->n == a->cap) {
    size_t cap = a->cap ? a->cap * 2 : 1024;
    double *v = realloc(a->v, cap * sizeof *v);
    if (v == NULL)
      return -ENOMEM;
    a->v = v;
    a->cap = cap;
  }
  a->v[a->n++] = x;
  return 0;
}

static int amount_row(sqlite3_stmt *st, void *ctx) {
  return push(ctx, sqlite3_column_double(st, 0));
}

int store_load_rows(store *s, const cancel_token *tok, long id, double **vals,
                    size_t *n) {
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  struct amounts a = {0};
  long args[1] = {id};
  static const char sql_sq[] = "SELECT amount FROM rows WHERE report_id = ?1";
  static const char sql_pg[] = "SELECT amount FROM rows WHERE report_id = $1";
  if (s->pg) {
    PGresult *r = NULL;
    rc = pg_run(c->h, tok, sql_pg, args, 1, &r);
    for (int i = 0; rc == 0 && i < PQntuples(r); i++)
      rc = push(&a, strtod(PQgetvalue(r, i, 0), NULL));
    PQclear(r);
  } else {
    rc = sq_run(c->h, tok, sql_sq, args, 1, amount_row, &a);
  }
  conn_put(s, c, rc);
  if (rc == 0 && a.n == 0)
    rc = -ENOENT;
  if (rc < 0) {
    free(a.v);
    return rc;
  }
  *vals = a.v;
  *n = a.n;
  return 0;
}

int store_scan(store *s, const cancel_token *tok, long n, long *count) {
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  long args[1] = {n};
  if (s->pg) {
    PGresult *r = NULL;
    rc = pg_run(c->h, tok,
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM "
                "c WHERE x < $1::bigint) SELECT count(*) FROM c",
                args, 1, &r);
    if (rc == 0)
      *count = strtol(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
  } else {
    rc = sq_run(c->h, tok,
                "WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM "
                "c WHERE x < ?1) SELECT count(*) FROM c",
                args, 1, count_row, count);
  }
  conn_put(s, c, rc);
  return rc;
}

/* ---- Jobs ------------------------------------------------------------------
 */

/* The wall clock in Unix milliseconds: job times outlive the process, so
 * not CLOCK_MONOTONIC. */
static long now_ms(void) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  return (long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int store_job_add(store *s, const cancel_token *tok, long report, long *job) {
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  long args[2] = {report, now_ms()};
  if (s->pg) {
    PGresult *r = NULL;
    rc = pg_run(c->h, tok,
                "INSERT INTO jobs (report_id, created_at, updated_at, next_at)"
                " VALUES ($1, $2, $2, $2) RETURNING id",
                args, 2, &r);
    if (rc == 0)
      *job = strtol(PQgetvalue(r, 0, 0), NULL, 10);
    PQclear(r);
  } else {
    rc = sq_run(c->h, tok,
                "INSERT INTO jobs (report_id, created_at, updated_at, next_at)"
                " VALUES (?1, ?2, ?2, ?2)",
                args, 2, NULL, NULL);
    if (rc == 0)
      *job = (long)sqlite3_last_insert_rowid(c->h);
  }
  conn_put(s, c, rc);
  return rc;
}

void store_job_clear(struct store_job *j) {
  free(j->error);
  free(j->result);
  j->error = j->result = NULL;
}

/* The columns store_job_get reads, in this order. */
#define JOB_COLUMNS                                                            \
  "report_id, state, attempts, last_error, created_at, updated_at, next_at,"   \
  " (SELECT body FROM reports_out WHERE job_id = jobs.id)"

struct job_row {
  struct store_job *j;
  bool found;
  int rc;
};

/* A copy of a text column's value (NULL stays NULL); false when out of
 * memory. */
static bool dup_text(const char *v, char **out) {
  *out = NULL;
  return v == NULL || (*out = strdup(v)) != NULL;
}

static int job_row(sqlite3_stmt *st, void *ctx) {
  struct job_row *jr = ctx;
  struct store_job *j = jr->j;
  const unsigned char *state = sqlite3_column_text(st, 1);
  j->report = (long)sqlite3_column_int64(st, 0);
  snprintf(j->state, sizeof j->state, "%s",
           state != NULL ? (const char *)state : "");
  j->attempts = (long)sqlite3_column_int64(st, 2);
  for (int i = 4; i <= 6; i++) {
    int64_t v = sqlite3_column_type(st, i) == SQLITE_NULL
                    ? -1
                    : (int64_t)sqlite3_column_int64(st, i);
    *(i == 4 ? &j->created_ms : i == 5 ? &j->updated_ms : &j->next_ms) = v;
  }
  if (!dup_text((const char *)sqlite3_column_text(st, 3), &j->error) ||
      !dup_text((const char *)sqlite3_column_text(st, 7), &j->result))
    return -ENOMEM;
  jr->found = true;
  return 0;
}

static void pg_job_row(PGresult *r, struct job_row *jr) {
  struct store_job *j = jr->j;
  j->report = strtol(PQgetvalue(r, 0, 0), NULL, 10);
  snprintf(j->state, sizeof j->state, "%s", PQgetvalue(r, 0, 1));
  j->attempts = strtol(PQgetvalue(r, 0, 2), NULL, 10);
  for (int i = 4; i <= 6; i++) {
    int64_t v =
        PQgetisnull(r, 0, i) ? -1 : strtoll(PQgetvalue(r, 0, i), NULL, 10);
    *(i == 4 ? &j->created_ms : i == 5 ? &j->updated_ms : &j->next_ms) = v;
  }
  if (!dup_text(PQgetisnull(r, 0, 3) ? NULL : PQgetvalue(r, 0, 3), &j->error) ||
      !dup_text(PQgetisnull(r, 0, 7) ? NULL : PQgetvalue(r, 0, 7), &j->result))
    jr->rc = -ENOMEM;
  jr->found = true;
}

int store_job_get(store *s, const cancel_token *tok, long job,
                  struct store_job *out) {
  *out = (struct store_job){.id = job};
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  long args[1] = {job};
  struct job_row jr = {out, false, 0};
  if (s->pg) {
    PGresult *r = NULL;
    rc = pg_run(c->h, tok, "SELECT " JOB_COLUMNS " FROM jobs WHERE id = $1",
                args, 1, &r);
    if (rc == 0 && PQntuples(r) > 0) {
      pg_job_row(r, &jr);
      rc = jr.rc;
    }
    PQclear(r);
  } else {
    rc = sq_run(c->h, tok, "SELECT " JOB_COLUMNS " FROM jobs WHERE id = ?1",
                args, 1, job_row, &jr);
  }
  conn_put(s, c, rc);
  if (rc == 0 && !jr.found)
    rc = -ENOENT;
  if (rc < 0)
    store_job_clear(out);
  return rc;
}

struct next {
  long job, report, attempts, next_at;
  bool found;
};

static int next_row(sqlite3_stmt *st, void *ctx) {
  struct next *p = ctx;
  p->job = (long)sqlite3_column_int64(st, 0);
  p->report = (long)sqlite3_column_int64(st, 1);
  p->attempts = (long)sqlite3_column_int64(st, 2);
  p->next_at = (long)sqlite3_column_int64(st, 3);
  p->found = true;
  return 0;
}

int store_job_next(store *s, const cancel_token *tok, long *job, long *report,
                   long *attempts, int64_t *wait_ms) {
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  /* One query: the pending job due first.  When its time has not come,
   * none has, and its next_at says how long to wait. */
  struct next p = {0};
  long now = now_ms();
  static const char sql[] =
      "SELECT id, report_id, attempts, next_at FROM jobs WHERE state = "
      "'pending' ORDER BY next_at, id LIMIT 1";
  if (s->pg) {
    PGresult *r = NULL;
    rc = pg_run(c->h, tok, sql, NULL, 0, &r);
    if (rc == 0 && PQntuples(r) > 0) {
      p.job = strtol(PQgetvalue(r, 0, 0), NULL, 10);
      p.report = strtol(PQgetvalue(r, 0, 1), NULL, 10);
      p.attempts = strtol(PQgetvalue(r, 0, 2), NULL, 10);
      p.next_at = strtol(PQgetvalue(r, 0, 3), NULL, 10);
      p.found = true;
    }
    PQclear(r);
  } else {
    rc = sq_run(c->h, tok, sql, NULL, 0, next_row, &p);
  }
  conn_put(s, c, rc);
  if (rc < 0)
    return rc;
  if (!p.found || p.next_at > now) {
    *wait_ms = p.found ? p.next_at - now : -1;
    return -ENOENT;
  }
  *job = p.job;
  *report = p.report;
  *attempts = p.attempts;
  return 0;
}

int store_job_attempt_failed(store *s, const cancel_token *tok, long job,
                             long attempts, const char *error,
                             int64_t retry_in_ms) {
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  long now = now_ms();
  long next = retry_in_ms >= 0 ? now + (long)retry_in_ms : now;
  const char *state = retry_in_ms >= 0 ? "pending" : "failed";
  if (s->pg) {
    char a[4][24];
    snprintf(a[0], sizeof a[0], "%ld", job);
    snprintf(a[1], sizeof a[1], "%ld", attempts);
    snprintf(a[2], sizeof a[2], "%ld", now);
    snprintf(a[3], sizeof a[3], "%ld", next);
    const char *vals[6] = {a[0], a[1], a[2], a[3], error, state};
    rc = cancel_pq_exec_params(
        tok, c->h,
        "UPDATE jobs SET attempts = $2, updated_at = $3, next_at = $4,"
        " last_error = $5, state = $6 WHERE id = $1",
        6, NULL, vals, NULL, NULL, 0, NULL);
  } else {
    sqlite3_stmt *st = NULL;
    rc = cancel_sqlite_prepare(
        tok, c->h,
        "UPDATE jobs SET attempts = ?2, updated_at = ?3, next_at = ?4,"
        " last_error = ?5, state = ?6 WHERE id = ?1",
        -1, &st, NULL);
    if (rc == 0) {
      sqlite3_bind_int64(st, 1, job);
      sqlite3_bind_int64(st, 2, attempts);
      sqlite3_bind_int64(st, 3, now);
      sqlite3_bind_int64(st, 4, next);
      sqlite3_bind_text(st, 5, error, -1, SQLITE_STATIC);
      sqlite3_bind_text(st, 6, state, -1, SQLITE_STATIC);
      rc = cancel_sqlite_step(tok, st);
      sqlite3_finalize(st);
    }
  }
  conn_put(s, c, rc);
  return rc < 0 ? rc : 0;
}

struct finish {
  long job, report, attempts, now;
  const char *body;
};

static int sq_finish_work(const cancel_token *tok, sqlite3 *db, void *arg) {
  struct finish *f = arg;
  sqlite3_stmt *st = NULL;
  int rc = cancel_sqlite_prepare(
      tok, db, "INSERT OR REPLACE INTO reports_out VALUES (?1, ?2, ?3)", -1,
      &st, NULL);
  if (rc < 0)
    return rc;
  sqlite3_bind_int64(st, 1, f->job);
  sqlite3_bind_int64(st, 2, f->report);
  sqlite3_bind_text(st, 3, f->body, -1, SQLITE_STATIC);
  rc = cancel_sqlite_step(tok, st);
  sqlite3_finalize(st);
  if (rc < 0)
    return rc;
  long args[3] = {f->job, f->attempts, f->now};
  return sq_run(db, tok,
                "UPDATE jobs SET state = 'done', attempts = ?2,"
                " updated_at = ?3 WHERE id = ?1",
                args, 3, NULL, NULL);
}

static int pg_finish_work(const cancel_token *tok, PGconn *c, void *arg) {
  struct finish *f = arg;
  char job[24], report[24], attempts[24], now[24];
  snprintf(job, sizeof job, "%ld", f->job);
  snprintf(report, sizeof report, "%ld", f->report);
  snprintf(attempts, sizeof attempts, "%ld", f->attempts);
  snprintf(now, sizeof now, "%ld", f->now);
  const char *vals[3] = {job, report, f->body};
  int rc = cancel_pq_exec_params(
      tok, c,
      "INSERT INTO reports_out VALUES ($1, $2, $3) ON CONFLICT (job_id) "
      "DO UPDATE SET body = EXCLUDED.body",
      3, NULL, vals, NULL, NULL, 0, NULL);
  if (rc < 0)
    return rc;
  const char *uvals[3] = {job, attempts, now};
  return cancel_pq_exec_params(tok, c,
                               "UPDATE jobs SET state = 'done', attempts = $2,"
                               " updated_at = $3 WHERE id = $1",
                               3, NULL, uvals, NULL, NULL, 0, NULL);
}

int store_job_finish(store *s, const cancel_token *tok, long job, long report,
                     long attempts, const char *body) {
  struct conn *c;
  int rc = conn_get(s, &c);
  if (rc < 0)
    return rc;
  struct finish f = {job, report, attempts, now_ms(), body};
  if (s->pg) {
    rc = cancel_pq_transaction(tok, c->h, pg_finish_work, &f, 0);
  } else {
    if (g_commit_delay_ms > 0)
      sqlite3_commit_hook(c->h, slow_commit, NULL);
    rc = cancel_sqlite_transaction(tok, c->h, sq_finish_work, &f, 0);
    sqlite3_commit_hook(c->h, NULL, NULL);
  }
  conn_put(s, c, rc);
  return rc;
}
