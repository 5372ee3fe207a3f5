/*
 * reportd's database: SQLite (a file, the default) or PostgreSQL, behind
 * one small interface.  Every call takes the caller's token and passes it
 * to the adapter: a query stops when the request (or the host) stops.
 *
 * Connections come from a pool (one per concurrent caller, opened on
 * demand, kept for the next); the schema is created and seeded on first
 * open.  Calls return 0 or a negative errno value: -ECANCELED from the
 * token, -ENOENT for an unknown report or job, the adapter's errors
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

int store_job_add(store *s, const cancel_token *tok, long report, long *job);
/* "pending" or "done" into state. */
int store_job_state(store *s, const cancel_token *tok, long job, char *state,
                    size_t len);
/* The oldest pending job; -ENOENT when there is none. */
int store_job_next(store *s, const cancel_token *tok, long *job, long *report);
/* In one transaction: stores the report's body and marks the job done.
 * The COMMIT is the point of no return: it runs under a shield. */
int store_job_finish(store *s, const cancel_token *tok, long job, long report,
                     const char *body);

#endif /* REPORTD_STORE_H */
