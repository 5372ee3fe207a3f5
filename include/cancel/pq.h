/*
 * libcancel-pq: PostgreSQL queries (libpq) that stop on the server when the
 * token says so.
 *
 * Every call runs on libpq's asynchronous API: the query is sent
 * (PQsendQuery / PQsendQueryParams, the connection in non-blocking mode for
 * the duration of the call), and the thread waits on PQsocket(conn) with
 * the token.  When the token fires, the waiting thread itself (never the
 * cancellation callback, which only wakes it):
 *   1. sends a cancel request (PQcancel), which returns once the server
 *      has signalled the backend running the query;
 *   2. drains every result of the query, so the connection is idle again;
 *   3. rolls back the transaction if one is open (the caller's explicit
 *      transaction included: a cancelled call leaves none open);
 * and returns -ECANCELED.  The work stops on the server, not only in our
 * thread: the backend's query is cancelled (pg_stat_activity shows it
 * idle).  A cancel request is acted on by the server only while a query
 * runs; once the server is waiting for the next command it discards a
 * pending one.  Since step 1 returns only after the backend has been
 * signalled, the next query on the connection is never hit by a late
 * cancel.
 *
 * If the query completed before the cancel reached the server, its result
 * is returned as if the token had not fired (its work is done, and for a
 * write in autocommit mode, durable): the next call returns -ECANCELED.
 *
 * Draining is bounded (options.drain_timeout_ns, default 5 s).  A server
 * that answers neither the query nor the cancel within it (a network
 * partition) gets its socket shut down: the connection is then broken
 * (PQstatus(conn) == CONNECTION_BAD) and the call still returns
 * -ECANCELED.  A pool discards such a connection or calls PQreset.
 *
 * The deadline backstop.  When the token has a deadline
 * (cancel_token_deadline), the adapter also tells the server, so that the
 * server stops the query at the deadline even if this process can no
 * longer send the cancel (stopped, partitioned, killed): it sets
 * statement_timeout to the time remaining plus options.backstop_margin_ns
 * (default 50 ms, so that the token's own cancel, which carries the
 * reason, normally comes first) with SET LOCAL, which lasts until the end
 * of the current transaction and never leaks into the session:
 *   - cancel_pq_exec: `SET LOCAL statement_timeout = ...;` is sent in the
 *     same message as the SQL, and its result is not returned.  Outside a
 *     transaction block this makes the SQL run in an implicit transaction
 *     with the SET, as a multi-statement string does: statements that
 *     refuse to run in a transaction block (VACUUM, CREATE DATABASE,
 *     CREATE INDEX CONCURRENTLY, ...) need options.no_backstop, or a token
 *     without a deadline;
 *   - cancel_pq_exec_params inside a transaction block: a separate
 *     SET LOCAL is sent first (one more round trip);
 *     cancel_pq_exec_params outside a transaction block: no backstop (a
 *     parameterised statement cannot share its message with a SET);
 *   - cancel_pq_transaction: the BEGIN message carries it, so it covers
 *     every statement of the transaction, and the COMMIT's message resets
 *     it to 0 (the commit is shielded: see there).
 * The server's timeout is reported like the token's own: -ECANCELED, once
 * the token's timer has fired the token (the call waits for it with
 * cancel_token_settle(): the server's timeout may end a moment before the
 * timer, when the margin is small or the timer late), so that the token
 * is cancelled and its reason readable when the call returns.
 *
 * Not observed by the token: host name resolution in cancel_pq_connect
 * (libpq resolves synchronously in PQconnectStart; give hostaddr= for
 * hosts whose resolution must not hold a cancel up), and PQcancel itself
 * (a connection to the server's port; on loopback it takes well under a
 * millisecond).  COPY is not supported: a COPY statement is ended at once
 * (COPY FROM STDIN with an error, COPY TO STDOUT read and discarded) and
 * the call returns -ENOTSUP.
 *
 * Return values, for every function below (unless it says otherwise):
 *   0            success (PGRES_COMMAND_OK, PGRES_TUPLES_OK, an empty
 *                query);
 *   -ECANCELED   the token fired (before the call, or while it ran), or
 *                the backstop timeout derived from its deadline fired, or
 *                the deadline had passed before the call; in every case
 *                the token is cancelled and its reason readable on return
 *                (see the backstop above);
 *   -EINVAL      a NULL argument, or invalid options, or a conninfo string
 *                libpq cannot parse;
 *   -EIO         the server reported an error for the SQL (syntax,
 *                constraint, permission...): with resp non-NULL, *resp is
 *                the error result (PQresultErrorField(*resp,
 *                PG_DIAG_SQLSTATE), PQresultErrorMessage), else the
 *                message is PQerrorMessage(conn);
 *   -EAGAIN      serialization failure or deadlock (SQLSTATE 40001,
 *                40P01): retry the transaction; *resp as for -EIO;
 *   -EINTR       the query was cancelled, but not by our token: another
 *                client's pg_cancel_backend, or a statement_timeout of
 *                your own (SQLSTATE 57014); *resp as for -EIO;
 *   -EBUSY       the connection is busy with another command (a query
 *                sent with libpq's own async API and not finished);
 *   -ECONNRESET  the connection is broken (the server went away, or
 *                draining timed out): PQreset it or open a new one;
 *   -ECONNREFUSED (cancel_pq_connect) the connection could not be made:
 *                refused, unreachable, authentication failed...: the
 *                message is PQerrorMessage(*connp);
 *   -ENOTSUP     a COPY statement;
 *   -ETIMEDOUT   (cancel_pq_wait_notify) its own deadline passed; (the
 *                others) the token's deadline passed, before the call or
 *                through the backstop, and the token was still not
 *                cancelled CANCEL_SETTLE_WAIT_NS after it (nothing fires
 *                it: the child of a fork(), or a timer thread not
 *                scheduled); an open transaction is rolled back, as for
 *                -ECANCELED;
 *   -ENOMEM.
 *
 * Thread-safety: a connection is used by one thread at a time (as libpq
 * requires); the token may be cancelled from any thread.
 *
 * Link with -lcancel-pq -lcancel -lpq (pkg-config: cancel-pq).
 */
#ifndef CANCEL_PQ_H
#define CANCEL_PQ_H

#include <cancel.h>

#include <libpq-fe.h>
#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Options for the _ex functions; zero-initialise, then set what you need.
 * A NULL options pointer means the defaults. */
typedef struct cancel_pq_options {
  /* Do not send the statement_timeout backstop (see above). */
  bool no_backstop;
  /* Added to the time remaining for the backstop; 0 means the default,
   * 50 ms; negative is invalid. */
  int64_t backstop_margin_ns;
  /* How long to wait for the server to give up the query after the
   * cancel, and for the ROLLBACK after it; 0 means the default, 5 s;
   * negative is invalid. */
  int64_t drain_timeout_ns;
} cancel_pq_options;

/* Opens a connection (PQconnectStart / PQconnectPoll) observing tok.
 * *connp is set whenever libpq allocated a connection, also on failure,
 * so that PQerrorMessage(*connp) can say why: the caller MUST PQfinish it
 * in every case (PQfinish(NULL) is harmless; *connp is NULL on -EINVAL
 * from a NULL argument and on -ENOMEM).
 * Returns 0 (CONNECTION_OK), -ECANCELED (the attempt is abandoned),
 * -EINVAL (NULL argument, unparsable conninfo), -ECONNREFUSED, -ENOMEM. */
CANCEL_API int cancel_pq_connect(const cancel_token *tok, const char *conninfo,
                                 PGconn **connp);

/* Runs sql (one or more statements) observing tok, like PQexec.  With resp
 * non-NULL, *resp receives the result of the last statement on success
 * (PQclear it), the error result on -EIO, -EAGAIN and -EINTR, and NULL
 * otherwise. */
CANCEL_API int cancel_pq_exec(const cancel_token *tok, PGconn *conn,
                              const char *sql, PGresult **resp);

/* PQexecParams observing tok: one statement, parameters as in libpq
 * (paramTypes, paramLengths and paramFormats may be NULL; resultFormat 0
 * for text, 1 for binary).  *resp as for cancel_pq_exec. */
CANCEL_API int cancel_pq_exec_params(const cancel_token *tok, PGconn *conn,
                                     const char *sql, int nparams,
                                     const Oid *paramTypes,
                                     const char *const *paramValues,
                                     const int *paramLengths,
                                     const int *paramFormats, int resultFormat,
                                     PGresult **resp);

/* The same with options (NULL for the defaults).  sql is run with
 * PQsendQuery when nparams == 0 and paramValues == NULL, else with
 * PQsendQueryParams (a NULL paramValues with nparams > 0 sends every
 * parameter as NULL, as libpq does).  -EINVAL also for nparams < 0. */
CANCEL_API int
cancel_pq_exec_ex(const cancel_token *tok, PGconn *conn, const char *sql,
                  int nparams, const Oid *paramTypes,
                  const char *const *paramValues, const int *paramLengths,
                  const int *paramFormats, int resultFormat,
                  const cancel_pq_options *opts, PGresult **resp);

/* Waits for a notification (LISTEN/NOTIFY) on conn, observing tok and an
 * absolute deadline (CANCEL_NEVER for none).  The caller has sent LISTEN
 * already.  A notification that arrived earlier (also while another call
 * ran on the connection) is returned at once.  On 0, *out is the
 * notification: free it with PQfreemem.  Returns 0, -ECANCELED,
 * -ETIMEDOUT, -EINVAL, -EBUSY (a command is in progress), -ECONNRESET. */
CANCEL_API int cancel_pq_wait_notify(const cancel_token *tok, PGconn *conn,
                                     int64_t deadline, PGnotify **out);

/* The work of a transaction: runs its statements with tok (through the
 * functions above) and returns >= 0 to commit or a negative errno value to
 * roll back.  It MUST NOT end the transaction itself (COMMIT, ROLLBACK). */
typedef int cancel_pq_work_fn(const cancel_token *tok, PGconn *conn, void *arg);

/* A transaction with an explicit point of no return, as
 * cancel_sqlite_transaction:
 *   1. BEGIN (cancellable; carries the deadline backstop);
 *   2. work(tok, conn, arg) (cancellable: it gets tok);
 *   3. work returned >= 0: the point of no return.  COMMIT runs under a
 *      shield on tok (cancel_source_init_shield, named "pq-commit"): a
 *      token that fires now does not cancel it (no cancel request is sent,
 *      and the backstop is lifted).  commit_grace_ns == 0: the COMMIT
 *      always runs to its end; > 0: commit_grace_ns after tok fired, a
 *      COMMIT still running is cancelled on the server like any query (and
 *      rolled back if it had not committed yet).
 * On any failure before the COMMIT succeeded the transaction is rolled
 * back: the database is unchanged and no transaction is open.
 * Returns work's value (>= 0) when committed, work's negative value,
 * -ECANCELED, -ETIMEDOUT (the token's deadline passed and its timer did
 * not fire it: see the list above), -EINVAL (conn or work NULL,
 * commit_grace_ns < 0, a transaction already open on conn, or work ended
 * the transaction itself), -ENOMEM (the shield), or an error as above
 * (e.g. -EAGAIN from a serialization failure at COMMIT). */
CANCEL_API int cancel_pq_transaction(const cancel_token *tok, PGconn *conn,
                                     cancel_pq_work_fn *work, void *arg,
                                     int64_t commit_grace_ns);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_PQ_H */
