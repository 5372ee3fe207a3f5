/*
 * libcancel-sqlite: SQLite statements that stop when the token says so.
 *
 * A statement run through these functions observes the token while SQLite
 * executes it: when the token fires the running statement stops within a
 * few microseconds of virtual-machine work and the call returns -ECANCELED.
 * After -ECANCELED the connection is reusable and no transaction is left
 * open (sqlite3_get_autocommit(db) == 1): an explicit transaction that was
 * open is rolled back, as SQLite itself does for an interrupted write.
 *
 * How: for the duration of each call, the connection's progress handler
 * checks the token (one acquire load) every CANCEL_SQLITE_PROGRESS_OPS
 * virtual-machine instructions, on the thread that runs the statement.
 * sqlite3_interrupt() from a cancellation callback was measured too and
 * rejected: sqlite3_step() clears the interrupt flag when a statement
 * starts on a connection with no other active statement, so a token that
 * fires between our check and the start of the statement is lost and the
 * statement runs to its end; and a late interrupt stays set for the next
 * statements while any statement is active.  The progress handler has
 * neither race; it costs ~40 ns per call and nothing measurable on a long
 * query (numbers in src/adapters/sqlite.c).
 *
 * Consequences a caller MUST know:
 *   - With a non-NULL token a call replaces the connection's progress
 *     handler for its duration and removes it (sets none) before
 *     returning.  Do not rely on your own progress handler on a
 *     connection you pass to these functions.  A NULL token touches
 *     nothing: the call is the plain SQLite call.
 *   - Only the statement's execution observes the token.  Waiting for a
 *     lock in the busy handler (sqlite3_busy_timeout) does not: keep busy
 *     timeouts short on connections that must stop promptly.
 *   - A connection is used by one thread at a time (as SQLite requires for
 *     a meaningful progress handler); the token may be cancelled from any
 *     thread.
 *
 * Return values, for every function below:
 *   1           (cancel_sqlite_step) a row is ready;
 *   0           done / success;
 *   -ECANCELED  the token fired (before the call, or while it ran);
 *   -EINVAL     a NULL argument, bad grace, or SQLITE_MISUSE;
 *   -EBUSY      SQLITE_BUSY or SQLITE_LOCKED;
 *   -ENOMEM     SQLITE_NOMEM;
 *   -EINTR      SQLITE_INTERRUPT that was not our token (somebody called
 *               sqlite3_interrupt() on the connection);
 *   -EIO        any other SQLite error: malformed SQL, constraint,
 *               read-only database, I/O error...  The SQLite code and
 *               message are on the connection: sqlite3_extended_errcode(db)
 *               and sqlite3_errmsg(db), until the next call on it.
 *
 * Link with -lcancel-sqlite -lcancel -lsqlite3.
 */
#ifndef CANCEL_SQLITE_H
#define CANCEL_SQLITE_H

#include <cancel.h>

#include <sqlite3.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* How many SQLite virtual-machine instructions run between two looks at
 * the token: microseconds of work (measured cancel-to-return latency p50
 * 18 us, see src/adapters/sqlite.c). */
#define CANCEL_SQLITE_PROGRESS_OPS 1000

/* sqlite3_step(stmt) observing tok.  Returns 1 for a row, 0 when the
 * statement is done, -ECANCELED, or an error as listed above (the statement
 * then needs sqlite3_reset, as with sqlite3_step).
 * On -ECANCELED the statement has been reset (the next step starts it
 * again) and, if the connection had a transaction open, it has been
 * rolled back.  A token already cancelled when the call starts gives
 * -ECANCELED without running the statement.  A row that was complete when
 * the token fired is returned (1): the next call returns -ECANCELED. */
CANCEL_API int cancel_sqlite_step(const cancel_token *tok, sqlite3_stmt *stmt);

/* sqlite3_prepare_v2 with the token checked first: -ECANCELED (nothing
 * prepared, *stmtp NULL) when it already fired.  Arguments as in
 * sqlite3_prepare_v2; tailp may be NULL.  *stmtp is NULL for an empty
 * statement (only whitespace or comments), as with SQLite.
 * Returns 0, -ECANCELED, -EINVAL (db, sql or stmtp NULL), or an error. */
CANCEL_API int cancel_sqlite_prepare(const cancel_token *tok, sqlite3 *db,
                                     const char *sql, int nbyte,
                                     sqlite3_stmt **stmtp, const char **tailp);

/* Runs every statement of sql (separated by ';') to completion, discarding
 * rows, like sqlite3_exec without a callback.  Stops at the first error or
 * when the token fires; a statement not yet started when the token fired is
 * not started.  Returns 0, -ECANCELED (open transaction rolled back), or an
 * error (statements before it have run; nothing is rolled back). */
CANCEL_API int cancel_sqlite_exec(const cancel_token *tok, sqlite3 *db,
                                  const char *sql);

/* The work of a transaction: runs its statements with tok (through the
 * functions above) and returns >= 0 to commit or a negative errno value to
 * roll back.  It MUST NOT end the transaction itself (COMMIT, ROLLBACK). */
typedef int cancel_sqlite_work_fn(const cancel_token *tok, sqlite3 *db,
                                  void *arg);

/* A transaction with an explicit point of no return:
 *   1. BEGIN (cancellable);
 *   2. work(tok, db, arg) (cancellable: it gets tok);
 *   3. work returned >= 0: the point of no return.  COMMIT runs under a
 *      shield on tok (cancel_source_init_shield, named "sqlite-commit"):
 *      a token that fired after work's last statement, or fires now, does
 *      not stop it.  commit_grace_ns == 0: the COMMIT always runs;
 *      > 0: the shield follows tok commit_grace_ns after tok fired, so a
 *      COMMIT not yet started by then is not started (rolled back,
 *      -ECANCELED).  A COMMIT that started always finishes: SQLite runs it
 *      as one virtual-machine instruction that the token cannot split
 *      (measured: a token fired inside the commit hook with a 1 us grace
 *      still commits).
 * On any failure before the COMMIT succeeded (work < 0, e.g. -ECANCELED
 * from a statement that saw the token; BEGIN or COMMIT failing; the token
 * fired before BEGIN) the transaction is rolled back: the database is
 * unchanged and no transaction is open.
 * Returns work's value (>= 0) when committed, work's negative value,
 * -ECANCELED, -EINVAL (db or work NULL, commit_grace_ns < 0, a transaction
 * already open on db: use savepoints inside work instead, or work ended the
 * transaction itself), -ENOMEM (the shield), or an error as above (e.g.
 * -EBUSY from a COMMIT blocked by readers).  After an error the SQLite
 * message of the failing statement may have been replaced by the ROLLBACK's
 * result. */
CANCEL_API int cancel_sqlite_transaction(const cancel_token *tok, sqlite3 *db,
                                         cancel_sqlite_work_fn *work, void *arg,
                                         int64_t commit_grace_ns);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_SQLITE_H */
