/*
 * libcancel-http: the server side.  An HTTP server on libmicrohttpd whose
 * every request carries a token that fires when the client goes away, when
 * the route's timeout or the caller's deadline passes, or when the process
 * stops; and an edge that answers a cancelled request by its reason.
 *
 * Each request gets a chain of sources, innermost last, and the handler
 * gets the innermost token:
 *
 *   drain      a shield on the server's `stopping` token (the host's):
 *              it fires drain_timeout_ns after stopping fired, so
 *              requests in flight may finish first (kind shutdown)
 *   client     "client <addr>:<port>", the connection's, linked to drain;
 *              cancelled with kind client gone when the connection hangs
 *              up while a request of it is in a handler (its descriptor
 *              is watched for EPOLLRDHUP from its first request until it
 *              closes, cancel_watch_hangup_fn; the connection is
 *              suspended while a handler runs), or when the answer a
 *              handler gave could not be delivered.  A connection that
 *              closes idle, or after its answer went out, cancels
 *              nothing: cancel_cancellations_total{kind="client gone"}
 *              counts exactly the requests logged 499
 *   route      "route GET /reports/{id}" (the route's method, "*" for a
 *              route of every method, and pattern): the request's scope,
 *              with the route's timeout (kind timeout, detail "2s")
 *   deadline   "deadline header grpc-timeout" or "... X-Request-Timeout-Ms":
 *              the caller's budget, when a request carries one (capped by
 *              max_deadline_ns; a malformed header is ignored with a
 *              warning); the smaller of the two headers wins
 *
 * so the reason says who asked: "client gone (client 10.0.0.7:5123) via
 * route GET /reports/{id}", "timeout (route GET /reports/{id} 2s)",
 * "shutdown (host SIGTERM) via drain (grace 20s expired) -> client ...".
 *
 * A handler may derive tokens of its own from the request's (a timeout
 * around a downstream call: cancel_http_request_timeout_new, or any
 * source it tells the edge of with cancel_http_request_cancelled; see
 * "The handler's own tokens" below).
 *
 * Handlers run on a pool of threads (the connection is suspended while
 * they do).  The edge, after the handler returns:
 *   >= 0          the response the handler set is sent (none set: 500);
 *   -ECANCELED    answered by the reason of the token that fired first:
 *                 the request's, or one the handler derived from it that
 *                 fired by itself (its own timeout) and that the edge
 *                 knows of (see below):
 *                   client gone: nothing is sent (the connection is
 *                     closed), logged at info, status 499 in the log;
 *                     also when the handler saw it through a token it
 *                     derived (the kind came down the link);
 *                   timeout: 504, logged at warn naming the source that
 *                     timed out (cancel_origin: the route's, a deadline
 *                     header's, or the handler's own "downstream call");
 *                   shutdown: 503 with Connection: close, info;
 *                   requested or a user kind: 503, info;
 *                 a handler that returns -ECANCELED although neither its
 *                 token nor a token of its own that the edge knows of
 *                 fired: 500, error;
 *   other < 0     500, logged at error with cancel_strerror.
 * Nothing cancellation-related is logged as an error.  Every request that
 * started (its request line was read) ends with one access line
 * (component "http", msg "request"), whatever happens to it: id, method
 * ("-" when the headers never came), path, route, status, dur_ms, and
 * for cancellations the reason's fields
 * (cancel_logfmt_reason), after_cancel_ms: how long the handler ran
 * after the token it is answered by fired (for a request drained by a
 * stop: from the end of the drain's grace, when its token fired, not from
 * the stop), and handler_end_mono_us: when it returned, on
 * CLOCK_MONOTONIC (cancel_now() / 1000), which other processes of the
 * machine share (a load generator measures from its own close to it).
 *
 * Requests the server answers itself: 404 (no route), 405 (route exists,
 * other method; with Allow), 413 (body over max_body), 400 (malformed
 * request: libmicrohttpd's own answer, logged with its status, or one of
 * the checks below), 501 (a Transfer-Encoding other than chunked), 503
 * with Connection: close (a request that arrives on an open connection
 * after stopping fired).  HEAD is answered by the route that answers GET
 * (the handler sees the method "HEAD"; the body it sets is not sent).
 *
 * The status logged for a request that ended before it was answered:
 *   400  the client left with it unfinished (headers or body cut short:
 *        it is the request that is bad, as nginx logs it; 499 stays for a
 *        complete request whose client left before the answer);
 *   408  its read timed out: its header or body time passed
 *        (header_timeout_ns, body_timeout_ns: the server cut the
 *        connection, see the options), or nothing moved on the connection
 *        for idle_timeout_ns (libmicrohttpd's connection timeout).  Logged
 *        at info: a slow client is a normal event, not the server's error;
 *   503  a stop closed it while it was being read.
 * A status logged for an answer that could not be delivered is that
 * answer's status, except for a handler's answer (499, above).
 *
 * Strictness (RFC 9112 and 9110; a proxy in front and this server must
 * never disagree on where a request ends): answered 400 with Connection:
 * close, the reason in the access line's error field (client values in
 * it quoted), the handler never called:
 *   - Content-Length twice with different values, a list in one field, or
 *     a value that is not digits (the same value twice is one length);
 *   - Transfer-Encoding with Content-Length, Transfer-Encoding in an
 *     HTTP/1.0 request, or more than one Transfer-Encoding field;
 *   - HTTP/1.1 without Host, more than one Host, a Host with a space,
 *     '/', '?', '#', '@', '\\' or a control byte;
 *   - a NUL in the decoded path or query ("/reports/5%00", which
 *     libmicrohttpd's C strings would read as "/reports/5"), or in a
 *     header name or value as far as libmicrohttpd shows it: 0.9.75
 *     (Debian 12) ends a header value at a NUL and reports that shorter
 *     length through its _n calls too, so there "250\0" is read as
 *     "250"; put a proxy that refuses NUL (RFC 9110 5.5) in front where
 *     that matters.
 * Route captures are percent-decoded: a handler that takes a number reads
 * it with cancel_http_request_param_u64, which accepts one spelling.
 *
 * libmicrohttpd's own messages go through the log sink (msg
 * "libmicrohttpd") at the level their meaning deserves: a client that
 * left, timed out or sent something malformed at debug (the access line
 * tells it); limits and resource exhaustion (accept, memory, threads,
 * epoll) at warn or error; anything else at warn.
 *
 * Graceful stop (cancel_http_server_stop, or stopping firing under
 * cancel_http_server_run): stop accepting connections (new handshakes are
 * dropped, the ones under way are still served), let the requests in
 * flight finish until the drain shield fires them (they answer 503),
 * answer every request that arrives on an open connection meanwhile (503
 * with Connection: close, which closes it), then stop the daemon once
 * every connection is closed or has been quiet for 250 ms (no request
 * starting or ending, no body arriving): a request that has reached the
 * server is answered before its connection closes.
 *
 * Link with -lcancel-http -lcancel -lmicrohttpd (pkg-config: cancel-http).
 */
#ifndef CANCEL_HTTP_H
#define CANCEL_HTTP_H

#include <cancel.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

typedef struct cancel_http_server cancel_http_server;
typedef struct cancel_http_request cancel_http_request;

/* A request handler: runs on a pool thread with the request's token (never
 * NULL, unless the server was built with no_cancellation).  It sets the
 * response with cancel_http_respond() and returns 0, or returns -ECANCELED
 * / another negative errno value for the edge to answer (see above).  It
 * MUST NOT keep req or tok after returning. */
typedef int cancel_http_handler(cancel_http_request *req,
                                const cancel_token *tok, void *arg);

typedef struct cancel_http_route {
  const char *method;  /* "GET", "POST"...; NULL matches every method */
  const char *pattern; /* "/reports/{id}": literal segments and {name}
                          captures, one segment each */
  cancel_http_handler *handler;
  void *arg;
  int64_t timeout_ns; /* the route's timeout; 0: the server's default */
} cancel_http_route;

/* The part of a host's shutdown timeout `t` that a server's drain leaves
 * for what follows it (see drain_timeout_ns): a second, or a quarter of t
 * when t is shorter than 4 s.  30 s gives a 29 s drain, 2 s a 1.5 s one. */
#define CANCEL_HTTP_DRAIN_MARGIN(t)                                            \
  ((t) / 4 < CANCEL_SEC(1) ? (t) / 4 : CANCEL_SEC(1))

/* Options; zero-initialise, then set what you need.  NULL: defaults. */
typedef struct cancel_http_options {
  const char *name;           /* the server's name in logs; "http" */
  const char *bind_address;   /* an IPv4 or IPv6 literal; "127.0.0.1" */
  uint16_t port;              /* 0: any free port (cancel_http_server_port) */
  unsigned threads;           /* handler threads; 0: 8 */
  int64_t default_timeout_ns; /* routes without their own; 0: 30 s */
  int64_t max_deadline_ns;    /* cap on an incoming deadline header; 0: 5 min */
  bool ignore_deadline_headers;
  /* The drain: after stopping fired, how long requests in flight may run
   * before their tokens fire.  Under a host (cancel/host.h), set
   * host_shutdown_timeout_ns to cancel_host_shutdown_timeout(h) and leave
   * the drain 0: it is then the host's shutdown timeout less
   * CANCEL_HTTP_DRAIN_MARGIN of it, so the drain ends that margin before
   * the host's deadline (cancel_host_shutdown_deadline) and the requests
   * it cancels have the margin to answer 503, their connections to close
   * and the server's worker to return.  An explicit drain longer than
   * that (timeout - margin) is rejected by cancel_http_server_new with
   * -EINVAL and an error line (msg "drain outlasts the host's shutdown")
   * naming both values.  Without a host (host_shutdown_timeout_ns 0) the
   * drain is not checked; 0 then means 20 s. */
  int64_t drain_timeout_ns;
  int64_t host_shutdown_timeout_ns;
  size_t max_body; /* request bodies; 0: 1 MiB */
  /* Slow and greedy clients (slowloris; nginx's client_header_timeout,
   * client_body_timeout, keepalive_timeout and limit_conn).  Timeouts: 0
   * takes the default, CANCEL_NEVER turns one off.
   *
   * header_timeout_ns: the time a client has to send a request's line and
   *   headers, in total: a client that trickles a byte a second is cut
   *   when it passes, although it is never idle.  It counts from the
   *   connection's accept for its first request, and from the moment the
   *   request line arrived for a later request on a keep-alive connection
   *   (that line must arrive within idle_timeout_ns of the previous
   *   answer).  0: 10 s.
   * body_timeout_ns: the time, in total, to send the body once the headers
   *   are in.  0: 60 s (a 1 MiB body needs 18 KB/s).
   * idle_timeout_ns: a connection on which nothing moves for this long is
   *   closed (libmicrohttpd's connection timeout: whole seconds, rounded
   *   up); also the keep-alive wait for the next request.  A connection
   *   whose handler runs is never idle.  0: 60 s.
   * A connection cut by the header or body timeout is closed without an
   *   answer and logged at info ("request read timed out", its client and
   *   phase); a request on it whose request line had arrived, cut in its
   *   headers or its body, also gets its access line, status 408 (see
   *   the statuses of a request that ended before it was answered).
   *
   * max_connections: connections open at once; at the limit
   *   libmicrohttpd accepts no more until one closes.  0: 4096.
   * max_connections_per_ip: connections open at once from one client
   *   address; the next one is accepted and closed at once.  0: 256;
   *   UINT_MAX: no limit (behind a reverse proxy every client has the
   *   proxy's address: raise it to the proxy's connection pool, or lift
   *   it and let the proxy limit its clients).
   *
   * Descriptors: every connection holds its socket and, from its first
   * request on, the duplicate its hang-up watch keeps.  When the soft
   * RLIMIT_NOFILE is below 2 * max_connections + 1024, start raises it to
   * the hard limit (as Go's runtime does at start), logging the change at
   * info, and warns when the hard limit is below that too (raise it:
   * `ulimit -Hn`, systemd's LimitNOFILE=).  keep_nofile_limit: leave the
   * limit alone (a process that still uses select() needs descriptors
   * below FD_SETSIZE). */
  int64_t header_timeout_ns;
  int64_t body_timeout_ns;
  int64_t idle_timeout_ns;
  unsigned max_connections;
  unsigned max_connections_per_ip;
  bool keep_nofile_limit;
  /* The plumbing off, for comparison (the benchmark's "plain"): no
   * sources, no hang-up watch, no deadline headers; handlers get a NULL
   * token.  Everything else (pool, routing, logging) is the same. */
  bool no_cancellation;
} cancel_http_options;

/* Creates a server for n routes (copied: the strings must outlive the
 * server; the first matching route wins).  Nothing listens yet.
 * Returns 0, -EINVAL (NULL srvp, routes NULL with n > 0, a route without
 * handler or pattern, a pattern not starting with '/', negative times, a
 * bind_address that is not an IP literal, a drain_timeout_ns above
 * host_shutdown_timeout_ns - CANCEL_HTTP_DRAIN_MARGIN of it: logged at
 * error with both values), -ENOMEM. */
CANCEL_API int cancel_http_server_new(cancel_http_server **srvp,
                                      const cancel_http_options *opts,
                                      const cancel_http_route *routes,
                                      size_t n);

/* Starts listening and serving.  stopping (may be NULL; borrowed: it MUST
 * stay valid until cancel_http_server_stop returns) is the process's
 * stopping token: requests are linked to it through the drain shield.
 * Returns 0, -EINVAL (NULL srv), -EALREADY (started), -EADDRINUSE,
 * -EACCES, -ENOMEM, -EAGAIN (a thread, of the pool or the read-deadline
 * sweeper, could not be created), -EIO (libmicrohttpd could not start;
 * it logs why). */
CANCEL_API int cancel_http_server_start(cancel_http_server *srv,
                                        const cancel_token *stopping);

/* The port the server listens on (useful with port 0), 0 before start. */
CANCEL_API uint16_t cancel_http_server_port(const cancel_http_server *srv);

/* Graceful stop: stops accepting, waits for the requests in flight until
 * `deadline` (absolute; their tokens fire when the drain shield does, or
 * now if stopping has not fired: the server is then stopped with kind
 * shutdown, detail "server stop") and for open connections to close or go
 * quiet (see above), then stops the daemon (a request still being read
 * then, from a client too slow to finish sending it, is closed and logged
 * 503).  Returns 0 (every request handed to a handler answered),
 * -ETIMEDOUT (handlers still running at the deadline: they ignore their
 * tokens; the daemon is left running for them and the server cannot be
 * freed until a later call returns 0), -EINVAL (NULL, or not started).
 * Call it from one thread. */
CANCEL_API int cancel_http_server_stop(cancel_http_server *srv,
                                       int64_t deadline);

/* A host worker (cancel_worker_fn of cancel/host.h): starts the server
 * (arg) with `stopping` (unless it was started already, e.g. by main() to
 * learn its port: it MUST then have been started with the same token),
 * waits until stopping fires, then stops gracefully with the deadline
 * drain_timeout_ns + 1 s after that; with host_shutdown_timeout_ns set, at
 * the latest half the margin before the host's deadline (when stopping
 * fired plus that timeout), so that a stop which times out is the
 * server's report, not the host's.  Returns -ECANCELED after a clean
 * stop, or the error of start / stop. */
CANCEL_API int cancel_http_server_run(const cancel_token *stopping, void *srv);

/* Frees a stopped (or never started) server.  Returns 0, or -EBUSY (still
 * running, or handlers still running after a timed-out stop: nothing is
 * freed). */
CANCEL_API int cancel_http_server_free(cancel_http_server *srv);

/* How many requests are between arrival and their answer right now
 * (handlers running or queued).  Thread-safe. */
CANCEL_API size_t cancel_http_server_in_flight(const cancel_http_server *srv);

/* ---- The request, inside a handler ----------------------------------- *
 * Strings are valid until the handler returns. */

/* The request's number on this server, from 1 up: the id= of its log
 * lines.  0 for NULL. */
CANCEL_API uint64_t cancel_http_request_id(const cancel_http_request *req);
/* The request's method as the client sent it ("GET", "HEAD"...).  NULL
 * for NULL. */
CANCEL_API const char *
cancel_http_request_method(const cancel_http_request *req);
/* The request's path, without the query string.  NULL for NULL. */
CANCEL_API const char *cancel_http_request_path(const cancel_http_request *req);
/* The route's pattern that matched ("/reports/{id}"). */
CANCEL_API const char *
cancel_http_request_route(const cancel_http_request *req);
/* A {name} capture of the route, NULL if the route has none such.  The
 * capture is the percent-decoded segment (a request whose decoded path
 * holds a NUL never reaches a handler: it is answered 400). */
CANCEL_API const char *cancel_http_request_param(const cancel_http_request *req,
                                                 const char *name);
/* The {name} capture read as a number: the canonical decimal spelling
 * only, so that one resource has one path (a cache, an ACL or a log keyed
 * on the path sees the same name the handler does): 1 to 20 ASCII digits
 * and no leading zero ("0" itself is fine); no sign, no space, no "0x",
 * nothing after the digits.  "5" is 5; " 5" (%205), "+5", "05", "5 " and
 * "-5" are not numbers.  Returns 0 with *out set, -ENOENT (no such
 * capture), -EINVAL (not a canonical number; NULL req, name or out),
 * -ERANGE (a number above max).  *out is untouched on error. */
CANCEL_API int cancel_http_request_param_u64(const cancel_http_request *req,
                                             const char *name, uint64_t max,
                                             uint64_t *out);
/* A query-string argument (?name=value), NULL when absent. */
CANCEL_API const char *cancel_http_request_query(const cancel_http_request *req,
                                                 const char *name);
/* A request header (case-insensitive name), NULL when absent. */
CANCEL_API const char *
cancel_http_request_header(const cancel_http_request *req, const char *name);
/* The body (NULL with *len 0 when there is none). */
CANCEL_API const void *cancel_http_request_body(const cancel_http_request *req,
                                                size_t *len);

/* Sets the response: status, content type (NULL: none), body (copied).
 * A second call replaces the first.  Returns 0, -EINVAL (status outside
 * 100-599, body NULL with len > 0), -ENOMEM. */
CANCEL_API int cancel_http_respond(cancel_http_request *req, unsigned status,
                                   const char *content_type, const void *body,
                                   size_t len);

/* Adds a header to the response (after cancel_http_respond).  Returns 0,
 * -EINVAL (no response yet, a name or value with CR/LF), -ENOMEM. */
CANCEL_API int cancel_http_respond_header(cancel_http_request *req,
                                          const char *name, const char *value);

/* ---- The handler's own tokens ---------------------------------------- *
 * A handler that derives a token from the request's (Go's
 * context.WithTimeout around a downstream call) and returns -ECANCELED
 * because that token fired leaves the request's own token live: the edge
 * must learn which token fired, or it has no reason to answer by.  Either
 * make the source through the request, which then finds it:
 *
 *   cancel_source *call;
 *   int rc = cancel_http_request_timeout_new(req, &call, "downstream call",
 *                                            CANCEL_MSEC(800));
 *   if (rc < 0)
 *     return rc;
 *   rc = cancel_curl_perform(cancel_source_token(call), easy);
 *   cancel_source_unref(call);
 *   if (rc < 0)
 *     return rc;        // -ECANCELED: 504 "downstream call", or 499 ...
 *
 * or name the token that fired before returning (any token: one made
 * with cancel_source_new_timeout, a shield, a token linked to several):
 *
 *   if (rc == -ECANCELED)
 *     rc = cancel_http_request_cancelled(req, cancel_source_token(call));
 *   cancel_source_unref(call);
 *   return rc;
 *
 * A handler's token that fired because the request's did (the client
 * left, the route's timeout, the drain) is answered by the request's
 * reason, as if the handler had waited on the request's token itself.
 * Both calls are for the handler, on its thread, while it runs. */

/* Creates a source linked to the request's token that times out after
 * timeout_ns (cancel_source_new_timeout: 0 gives one cancelled already, a
 * timeout too long to end gives none), named `name` (copied; the reason's
 * origin and the 504's body say it; the duration is its detail).  *srcp
 * holds the caller's reference, to drop with cancel_source_unref() as
 * for any source, before or after returning; the request holds one of
 * its own until the edge has classified the handler's result.  When the
 * handler returns -ECANCELED, the edge answers by the reason of the first
 * of these sources that fired by itself, if none of the request's own
 * fired first (a later cancellation of the request, the drain firing
 * while the handler returns from its own timeout, is not the cause).  A
 * server without cancellation (no_cancellation) links it to nothing.
 * Returns 0 with *srcp set, or with *srcp NULL: -EINVAL (NULL req or
 * srcp, timeout_ns < 0), -ENOMEM, -EMFILE, -ENFILE, -EAGAIN (the timer
 * could not be armed, as for cancel_source_new_timeout). */
CANCEL_API int cancel_http_request_timeout_new(cancel_http_request *req,
                                               cancel_source **srcp,
                                               const char *name,
                                               int64_t timeout_ns);

/* Tells the edge that the handler's -ECANCELED comes from tok (borrowed
 * for the call: its reason is copied, so tok may be freed as soon as this
 * returns).  When the handler then returns -ECANCELED, the edge answers
 * by tok's reason, unless tok fired because the request's token did, or
 * the request's token fired first: then by the request's.  A later call
 * replaces an earlier one; the edge ignores it when the handler returns
 * anything but -ECANCELED.  A tok whose deadline has just passed but
 * whose timer has not fired it yet (a call that counts time on its own
 * clock returned a moment early) is waited for, up to 150 ms.
 * Returns -ECANCELED, the value for the handler to return (`return
 * cancel_http_request_cancelled(req, tok);`), or -EINVAL (NULL req or
 * tok, or tok not cancelled: nothing is recorded, and a handler returning
 * this is answered 500 as for any error). */
CANCEL_API int cancel_http_request_cancelled(cancel_http_request *req,
                                             const cancel_token *tok);

/* Parses a deadline header value: grpc-timeout ("250m": 1-8 digits and a
 * unit H M S m u n) when grpc is true, else X-Request-Timeout-Ms (1-12
 * decimal digits of milliseconds).  Returns 0 with *ns set (INT64_MAX for
 * a valid value too large to count in nanoseconds), or -EINVAL. */
CANCEL_API int cancel_http_parse_timeout(const char *value, bool grpc,
                                         int64_t *ns);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_HTTP_H */
