/*
 * reportd's database: SQLite (a file, the default) or PostgreSQL, behind
 * one small interface.  Every call takes the caller's token and passes it
 * to the adapter: a query stops when the request (or the host) stops.
 *
 * Connections come from a pool (one per concurrent caller, opened on
 * demand, kept for the next); the schema is created and seeded on first
 * open (and the jobs table of an older reportd gets its new columns).
 * Calls return 0 or a negative errno value: -ECANCELED from the token,
 * -ENOENT for an unknown report or job, -ENOMEM, the adapter's errors
 * otherwise.
 */
#ifndef REPORTD_STORE_H
#define REPORTD_STORE_H

#include <cancel.h>

#include <stddef.h>
#include <stdint.h>

typedef struct store store;

struct store_config {
  const char *sqlite_path; /* used when pg_conninfo is NULL */
  const char *pg_conninfo;
  long rows_per_report; /* seeding */
  long commit_delay_ms; /* SQLite: a slow COMMIT (commit hook) */
};

int store_open(store **sp, const struct store_config *cfg);
void store_close(store *s);
const char *store_kind(const store *s); /* "sqlite" or "postgresql" */

/* The amounts of report `id`'s rows, in *vals (free() it). */
int store_load_rows(store *s, const cancel_token *tok, long id, double **vals,
                    size_t *n);

/* A recursive CTE counting to n: a long query. */
int store_scan(store *s, const cancel_token *tok, long n, long *count);

/* ---- Jobs ------------------------------------------------------------------
 * A job builds one report in the background.  It is "pending" until an
 * attempt succeeds ("done", with the report's JSON) or the worker gives up
 * ("failed", with the last attempt's error).  A pending job that failed an
 * attempt waits for its next one (next_at) and is not due until then, so
 * the worker takes the jobs behind it first.  Times are wall-clock Unix
 * milliseconds (CLOCK_REALTIME): they outlive the process. */

struct store_job {
  long id, report, attempts;
  char state[16]; /* "pending", "done" or "failed" */
  char *error;    /* the last failed attempt's, NULL: none (free()) */
  char *result;   /* done: the report's JSON, else NULL (free()) */
  int64_t created_ms, updated_ms, next_ms; /* -1: not recorded */
};

/* Frees what store_job_get() put in *j. */
void store_job_clear(struct store_job *j);

/* Queues a job for `report`, due at once. */
int store_job_add(store *s, const cancel_token *tok, long report, long *job);

/* Job `job` into *out (store_job_clear() it); -ENOENT when there is none. */
int store_job_get(store *s, const cancel_token *tok, long job,
                  struct store_job *out);

/* The pending job that is due (its next attempt's time has come), the one
 * due first, then the oldest: its id, report and the attempts it has had.
 * -ENOENT when none is due; *wait_ms is then the time until the first
 * pending job is, -1 when there is no pending job at all. */
int store_job_next(store *s, const cancel_token *tok, long *job, long *report,
                   long *attempts, int64_t *wait_ms);

/* Records a failed attempt: the job has had `attempts`, the last ending
 * with `error`.  retry_in_ms >= 0: it stays pending, due again that many
 * milliseconds from now; < 0: it is "failed" for good. */
int store_job_attempt_failed(store *s, const cancel_token *tok, long job,
                             long attempts, const char *error,
                             int64_t retry_in_ms);

/* In one transaction: stores the report's body and marks the job done
 * after `attempts`.  The COMMIT is the point of no return: it runs under a
 * shield. */
int store_job_finish(store *s, const cancel_token *tok, long job, long report,
                     long attempts, const char *body);

#endif /* REPORTD_STORE_H */
