/*
 * libcancel-pq: libpq's asynchronous API driven by a thread that waits on
 * the connection's socket with the token.
 *
 * One engine, run(), serves every call: it sends the query, flushes it
 * (the connection is non-blocking for the duration), then alternates
 * between reading the results that are complete and waiting on the socket
 * with the token.  When the wait returns -ECANCELED the same thread sends
 * the cancel request (PQcancel: blocking, but it returns only once the
 * server has signalled the backend, which is what makes the connection
 * safe from a late cancel) and goes on reading, now without the token and
 * under the drain deadline, until libpq has no result left.  What the
 * results were decides the return value: a query that completed before
 * the cancel landed returns its result; one the server cancelled returns
 * -ECANCELED.  The caller's wrapper then rolls back an open transaction.
 *
 * Why not PQcancel from the cancellation callback: it connects to the
 * server and waits for it (DESIGN: callbacks only wake), and the thread
 * that owns the connection must drain it anyway.
 */
#define _GNU_SOURCE
#include "cancel/pq.h"
#include "deadline.h"

#include "cancel/diag.h"

#include <errno.h>
#include <inttypes.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>

#define DEFAULT_MARGIN_NS CANCEL_MSEC(50)
#define DEFAULT_DRAIN_NS CANCEL_SEC(5)

/* One statement with parameters, as PQsendQueryParams takes it. */
struct params {
  int n;
  const Oid *types;
  const char *const *values;
  const int *lengths;
  const int *formats;
  int result_format;
};

/* What run() needs beyond the SQL. */
struct call {
  PGconn *conn;
  const cancel_token *tok; /* NULL once the cancel was sent */
  int64_t deadline;        /* the wait's own bound (drain, rollback) */
  int64_t drain_ns;
  bool cancel_sent;
  bool skip_first; /* the first result is our backstop SET */
};

/* The socket is of no more use: make libpq see the connection as broken
 * (the next read gets end of file) without closing a descriptor it owns. */
static void break_conn(PGconn *conn) {
  int fd = PQsocket(conn);
  if (fd >= 0)
    (void)shutdown(fd, SHUT_RDWR);
  (void)PQconsumeInput(conn);
}

/* Sends a cancel request for whatever conn's backend is running.  Its
 * failure (the server unreachable) is not reported: the drain that
 * follows is bounded and breaks the connection if nothing comes. */
static void send_cancel(struct call *c) {
  PGcancel *pc = PQgetCancel(c->conn);
  if (pc != NULL) {
    char err[256];
    (void)PQcancel(pc, err, (int)sizeof err);
    PQfreeCancel(pc);
  }
  c->cancel_sent = true;
  c->tok = NULL;
  int64_t d = cancel__add_sat(cancel_now(), c->drain_ns);
  if (d < c->deadline)
    c->deadline = d;
}

/* Waits for the socket (events) with the call's token and deadline.
 * Returns > 0 (revents), or -ETIMEDOUT / -ECONNRESET after breaking the
 * connection (the drain deadline, or a bad socket).  A token that fires
 * turns into a cancel request and the wait goes on without the token. */
static int wait_sock(struct call *c, short events) {
  for (;;) {
    int fd = PQsocket(c->conn);
    if (fd < 0)
      return -ECONNRESET;
    int r = cancel_wait_fd(c->tok, fd, events, c->deadline);
    if (r > 0)
      return r;
    if (r == -ECANCELED && !c->cancel_sent) {
      send_cancel(c);
      continue;
    }
    if (r == -ETIMEDOUT) {
      break_conn(c->conn);
      return -ETIMEDOUT;
    }
    break_conn(c->conn);
    return -ECONNRESET;
  }
}

/* Pushes libpq's output buffer to the server.  A token that fires while
 * the query is half sent cannot stop it (the server would read the rest
 * as a new message): the rest is sent, then the cancel follows. */
static int flush(struct call *c) {
  int r;
  while ((r = PQflush(c->conn)) == 1) {
    int w = wait_sock(c, POLLOUT | POLLIN);
    if (w < 0)
      return w;
    /* The server may block on its own output to us: read while we wait
     * (libpq's documented rule for non-blocking sends). */
    if ((w & POLLIN) && !PQconsumeInput(c->conn))
      return -ECONNRESET;
  }
  return r == 0 ? 0 : -ECONNRESET;
}

/* Ends a COPY the server started: FROM STDIN with an error, TO STDOUT by
 * reading the data to its end.  Returns 0 or a negative errno value. */
static int end_copy(struct call *c, ExecStatusType st) {
  if (st == PGRES_COPY_IN || st == PGRES_COPY_BOTH) {
    int r;
    while ((r = PQputCopyEnd(c->conn,
                             "COPY is not supported by libcancel-pq")) == 0)
      if (wait_sock(c, POLLOUT) < 0)
        return -ECONNRESET;
    if (r < 0)
      return -ECONNRESET;
    return flush(c);
  }
  for (;;) {
    char *buf = NULL;
    int n = PQgetCopyData(c->conn, &buf, 1);
    if (buf != NULL)
      PQfreemem(buf);
    if (n > 0)
      continue;
    if (n == -1)
      return 0; /* done: the final result follows */
    if (n == -2)
      return -ECONNRESET;
    int w = wait_sock(c, POLLIN);
    if (w < 0)
      return w;
    if (!PQconsumeInput(c->conn))
      return -ECONNRESET;
  }
}

static bool sqlstate_is(const PGresult *r, const char *code) {
  const char *s = PQresultErrorField(r, PG_DIAG_SQLSTATE);
  return s != NULL && strcmp(s, code) == 0;
}

/* The outcome of an error result. */
static int map_error(const struct call *c, const PGresult *r,
                     const cancel_token *tok) {
  if (sqlstate_is(r, "57014")) { /* query_canceled */
    /* Ours when we sent the cancel (the token fired).  Else the backstop,
     * when the token's deadline has passed: its timer may be a moment
     * behind the server's, so settle with it, and report -ECANCELED only
     * with the reason there (cancel.h's conventions).  Else somebody
     * else's cancel. */
    if (c->cancel_sent)
      return -ECANCELED;
    int s = cancel_token_settle(tok, 0);
    return s == 0 ? -EINTR : s;
  }
  if (sqlstate_is(r, "40001") || sqlstate_is(r, "40P01"))
    return -EAGAIN;
  if (PQstatus(c->conn) == CONNECTION_BAD)
    return -ECONNRESET;
  return -EIO;
}

/* Sends sql (simple protocol when p is NULL) and reads every result.
 * Returns as the public functions; *resp (may be NULL) as documented for
 * cancel_pq_exec.  The token is c->tok; the caller checked it already. */
static int run(struct call *c, const char *sql, const struct params *p,
               PGresult **resp) {
  const cancel_token *tok = c->tok;
  int sent = p == NULL
                 ? PQsendQuery(c->conn, sql)
                 : PQsendQueryParams(c->conn, sql, p->n, p->types, p->values,
                                     p->lengths, p->formats, p->result_format);
  if (!sent)
    return PQstatus(c->conn) == CONNECTION_BAD ? -ECONNRESET : -ENOMEM;

  int ret = flush(c);
  PGresult *last = NULL, *err = NULL;
  bool skip = c->skip_first, copy = false;
  while (ret == 0) {
    if (PQisBusy(c->conn)) {
      ret = wait_sock(c, POLLIN);
      if (ret > 0)
        ret = PQconsumeInput(c->conn) ? 0 : -ECONNRESET;
      continue;
    }
    PGresult *r = PQgetResult(c->conn);
    if (r == NULL)
      break; /* the query is over: the connection is idle */
    ExecStatusType st = PQresultStatus(r);
    if (st == PGRES_COPY_IN || st == PGRES_COPY_OUT || st == PGRES_COPY_BOTH) {
      copy = true;
      PQclear(r);
      ret = end_copy(c, st);
    } else if (st == PGRES_FATAL_ERROR || st == PGRES_BAD_RESPONSE ||
               st == PGRES_NONFATAL_ERROR) {
      /* The first error is the one that matters; libpq reports no
       * further statement after it. */
      if (err == NULL)
        err = r;
      else
        PQclear(r);
    } else if (skip) {
      PQclear(r);
    } else {
      PQclear(last);
      last = r;
    }
    skip = false;
  }

  if (ret == -ETIMEDOUT)
    ret = c->cancel_sent ? -ECANCELED : -ECONNRESET;
  else if (ret == 0 && copy)
    ret = -ENOTSUP; /* also when the server reports the COPY we ended */
  else if (ret == 0 && err != NULL)
    ret = map_error(c, err, tok);
  else if (ret == 0 && PQstatus(c->conn) == CONNECTION_BAD)
    ret = -ECONNRESET;
  /* A broken connection after our cancel is still the token's doing. */
  if (ret == -ECONNRESET && c->cancel_sent)
    ret = -ECANCELED;

  if (resp != NULL && ret == 0) {
    *resp = last;
    last = NULL;
  } else if (resp != NULL && err != NULL &&
             (ret == -EIO || ret == -EAGAIN || ret == -EINTR)) {
    *resp = err;
    err = NULL;
  }
  PQclear(last);
  PQclear(err);
  return ret;
}

/* After -ECANCELED: leave no transaction open.  Runs without a token,
 * bounded by the drain timeout; a ROLLBACK that cannot complete breaks
 * the connection rather than leave it in an unknown state. */
static void rollback_open(PGconn *conn, int64_t drain_ns) {
  PGTransactionStatusType ts = PQtransactionStatus(conn);
  if (ts != PQTRANS_INTRANS && ts != PQTRANS_INERROR)
    return;
  struct call c = {.conn = conn,
                   .tok = NULL,
                   .deadline = cancel__add_sat(cancel_now(), drain_ns),
                   .drain_ns = drain_ns};
  (void)run(&c, "ROLLBACK", NULL, NULL);
}

static int check_options(const cancel_pq_options *o, int64_t *margin,
                         int64_t *drain) {
  if (o->backstop_margin_ns < 0 || o->drain_timeout_ns < 0)
    return -EINVAL;
  *margin = o->backstop_margin_ns ? o->backstop_margin_ns : DEFAULT_MARGIN_NS;
  *drain = o->drain_timeout_ns ? o->drain_timeout_ns : DEFAULT_DRAIN_NS;
  return 0;
}

/* The connection must be free for a new command. */
static int check_idle(PGconn *conn) {
  if (PQstatus(conn) != CONNECTION_OK)
    return -ECONNRESET;
  if (PQtransactionStatus(conn) == PQTRANS_ACTIVE || PQisBusy(conn))
    return -EBUSY;
  return 0;
}

/* The backstop's statement for a deadline `left` ns away, into buf. */
static void backstop_sql(char *buf, size_t len, int64_t left, int64_t margin) {
  /* Rounded up, at most the setting's upper bound. */
  int64_t ms = cancel__ns_to_ms_ceil(cancel__add_sat(left, margin), INT32_MAX);
  snprintf(buf, len, "SET LOCAL statement_timeout = %" PRId64, ms);
}

int cancel_pq_exec_ex(const cancel_token *tok, PGconn *conn, const char *sql,
                      int nparams, const Oid *paramTypes,
                      const char *const *paramValues, const int *paramLengths,
                      const int *paramFormats, int resultFormat,
                      const cancel_pq_options *opts, PGresult **resp) {
  static const cancel_pq_options defaults;
  if (resp != NULL)
    *resp = NULL;
  if (opts == NULL)
    opts = &defaults;
  int64_t margin, drain;
  if (conn == NULL || sql == NULL || nparams < 0 ||
      check_options(opts, &margin, &drain) < 0)
    return -EINVAL;
  int ret = check_idle(conn);
  if (ret < 0)
    return ret;

  int64_t left = cancel_token_remaining(tok);
  if (cancel_token_is_cancelled(tok) || left == 0) {
    /* Nothing is sent; a deadline that passed is reported once its timer
     * fired the token (or as -ETIMEDOUT if it does not). */
    ret = cancel_token_settle(tok, 0);
    ret = ret == -ECANCELED ? -ECANCELED : -ETIMEDOUT;
    rollback_open(conn, drain);
    return ret;
  }

  int was_nonblocking = PQisnonblocking(conn);
  if (!was_nonblocking && PQsetnonblocking(conn, 1) != 0)
    return -ECONNRESET;

  /* The call, the cancel request and the drain: the watchdog names a
   * server that does not let go ("pq exec"). */
  cancel_scope scope;
  cancel_scope_begin(&scope, tok, "pq exec");
  struct call c = {
      .conn = conn, .tok = tok, .deadline = CANCEL_NEVER, .drain_ns = drain};
  bool simple = nparams == 0 && paramValues == NULL; /* see the header */
  const struct params p = {nparams,      paramTypes,   paramValues,
                           paramLengths, paramFormats, resultFormat};
  char set[64];
  char *joined = NULL;
  const char *text = sql;
  bool backstop = left != CANCEL_NEVER && !opts->no_backstop;
  if (backstop)
    backstop_sql(set, sizeof set, left, margin);
  if (backstop && simple) {
    /* One message: the SET and the SQL share the (implicit or explicit)
     * transaction, and the SET's result is skipped. */
    size_t n = strlen(set) + 2 + strlen(sql) + 1;
    joined = malloc(n);
    if (joined == NULL) {
      ret = -ENOMEM;
      goto out;
    }
    snprintf(joined, n, "%s; %s", set, sql);
    text = joined;
    c.skip_first = true;
  } else if (backstop && PQtransactionStatus(conn) == PQTRANS_INTRANS) {
    ret = run(&c, set, NULL, NULL);
    if (ret < 0)
      goto out;
  }
  ret = run(&c, text, simple ? NULL : &p, resp);
out:
  free(joined);
  if (ret == -ECANCELED || ret == -ETIMEDOUT)
    rollback_open(conn, drain);
  if (!was_nonblocking && PQstatus(conn) == CONNECTION_OK)
    (void)PQsetnonblocking(conn, 0);
  cancel_scope_end(&scope);
  return ret;
}

int cancel_pq_exec(const cancel_token *tok, PGconn *conn, const char *sql,
                   PGresult **resp) {
  return cancel_pq_exec_ex(tok, conn, sql, 0, NULL, NULL, NULL, NULL, 0, NULL,
                           resp);
}

int cancel_pq_exec_params(const cancel_token *tok, PGconn *conn,
                          const char *sql, int nparams, const Oid *paramTypes,
                          const char *const *paramValues,
                          const int *paramLengths, const int *paramFormats,
                          int resultFormat, PGresult **resp) {
  /* Parameters always go through PQsendQueryParams, also with none (a
   * NULL paramValues with nparams > 0 means all NULL, as in libpq). */
  static const char *const none[1] = {NULL};
  return cancel_pq_exec_ex(
      tok, conn, sql, nparams, paramTypes,
      paramValues != NULL || nparams > 0 ? paramValues : none, paramLengths,
      paramFormats, resultFormat, NULL, resp);
}

int cancel_pq_connect(const cancel_token *tok, const char *conninfo,
                      PGconn **connp) {
  if (connp != NULL)
    *connp = NULL;
  if (conninfo == NULL || connp == NULL)
    return -EINVAL;
  char *perr = NULL;
  PQconninfoOption *parsed = PQconninfoParse(conninfo, &perr);
  if (parsed == NULL) {
    /* NULL message: out of memory; else the string is malformed. */
    int r = perr != NULL ? -EINVAL : -ENOMEM;
    PQfreemem(perr);
    return r;
  }
  PQconninfoFree(parsed);
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;

  PGconn *conn = PQconnectStart(conninfo);
  if (conn == NULL)
    return -ENOMEM;
  *connp = conn;
  PostgresPollingStatusType ps = PGRES_POLLING_WRITING;
  for (;;) {
    if (PQstatus(conn) == CONNECTION_BAD || ps == PGRES_POLLING_FAILED)
      return -ECONNREFUSED;
    if (ps == PGRES_POLLING_OK)
      return 0;
    int fd = PQsocket(conn);
    if (fd < 0)
      return -ECONNREFUSED;
    int r = cancel_wait_fd(
        tok, fd, ps == PGRES_POLLING_READING ? POLLIN : POLLOUT, CANCEL_NEVER);
    if (r == -ECANCELED)
      return -ECANCELED; /* the caller's PQfinish closes the attempt */
    ps = PQconnectPoll(conn);
  }
}

int cancel_pq_wait_notify(const cancel_token *tok, PGconn *conn,
                          int64_t deadline, PGnotify **out) {
  if (out != NULL)
    *out = NULL;
  if (conn == NULL || out == NULL)
    return -EINVAL;
  if (PQstatus(conn) != CONNECTION_OK)
    return -ECONNRESET;
  if (PQtransactionStatus(conn) == PQTRANS_ACTIVE)
    return -EBUSY;
  for (;;) {
    /* Already here (read during an earlier call) or just read. */
    if ((*out = PQnotifies(conn)) != NULL)
      return 0;
    if (cancel_token_is_cancelled(tok))
      return -ECANCELED;
    int fd = PQsocket(conn);
    if (fd < 0)
      return -ECONNRESET;
    int r = cancel_wait_fd(tok, fd, POLLIN, deadline);
    if (r < 0)
      return r == -EBADF ? -ECONNRESET : r;
    if (!PQconsumeInput(conn))
      return -ECONNRESET;
    /* A result nobody asked for (the server reports errors such as an
     * administrator's termination as results): consume it. */
    while (!PQisBusy(conn)) {
      PGresult *r2 = PQgetResult(conn);
      if (r2 == NULL)
        break;
      PQclear(r2);
    }
    if (PQstatus(conn) == CONNECTION_BAD)
      return -ECONNRESET;
  }
}

int cancel_pq_transaction(const cancel_token *tok, PGconn *conn,
                          cancel_pq_work_fn *work, void *arg,
                          int64_t commit_grace_ns) {
  if (conn == NULL || work == NULL || commit_grace_ns < 0)
    return -EINVAL;
  int ret = check_idle(conn);
  if (ret < 0)
    return ret;
  /* Nesting would turn our BEGIN into a warning and our ROLLBACK into the
   * caller's: refuse it up front. */
  if (PQtransactionStatus(conn) != PQTRANS_IDLE)
    return -EINVAL;

  /* BEGIN, with the backstop for the whole transaction in its message. */
  static const cancel_pq_options no_backstop = {.no_backstop = true};
  char begin[96] = "BEGIN";
  int64_t left = cancel_token_remaining(tok);
  if (left != CANCEL_NEVER && left > 0) {
    char set[64];
    backstop_sql(set, sizeof set, left, DEFAULT_MARGIN_NS);
    snprintf(begin, sizeof begin, "BEGIN; %s", set);
  }
  ret = cancel_pq_exec_ex(tok, conn, begin, 0, NULL, NULL, NULL, NULL, 0,
                          &no_backstop, NULL);
  if (ret < 0)
    return ret;

  int w = work(tok, conn, arg);
  if (w < 0) {
    rollback_open(conn, DEFAULT_DRAIN_NS);
    return w;
  }
  if (PQtransactionStatus(conn) != PQTRANS_INTRANS) {
    /* The transaction is gone or failed: work ignored an error (a
     * cancelled statement rolled it back already), or ended it itself. */
    rollback_open(conn, DEFAULT_DRAIN_NS);
    return cancel_token_is_cancelled(tok) ? -ECANCELED : -EINVAL;
  }

  /* The point of no return: work is complete, the COMMIT must not be cut
   * by the token.  The shield follows tok only after the grace; the
   * backstop set at BEGIN is lifted in the same message. */
  cancel_source shield;
  ret = cancel_source_init_shield(&shield, "pq-commit", tok, commit_grace_ns);
  if (ret < 0) {
    rollback_open(conn, DEFAULT_DRAIN_NS);
    return ret;
  }
  ret = cancel_pq_exec_ex(cancel_source_token(&shield), conn,
                          "SET LOCAL statement_timeout = 0; COMMIT", 0, NULL,
                          NULL, NULL, NULL, 0, &no_backstop, NULL);
  cancel_source_destroy(&shield);
  if (ret < 0) {
    rollback_open(conn, DEFAULT_DRAIN_NS);
    return ret;
  }
  return w;
}
