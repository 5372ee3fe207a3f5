/*
 * libcancel-http: libmicrohttpd with a token per request.
 *
 * The daemon runs its own polling thread (epoll).  A connection gets a
 * source of its own ("client <addr>:<port>", linked to the drain) and a
 * hang-up watch on its descriptor (EPOLLRDHUP, on the library's reactor)
 * with its first request; both live until libmicrohttpd closes the
 * connection, so a keep-alive connection pays for them once.  When a
 * request is complete (headers and body), the access handler builds the
 * request's sources under the connection's, suspends the connection and
 * queues the request for the pool.  A pool thread runs the handler,
 * classifies its result (the edge), drops the sources and resumes the
 * connection; libmicrohttpd then calls the access handler again, which
 * queues the response (or refuses, closing the connection, when the client
 * is gone).  The completion callback writes the access line and frees the
 * request.
 *
 * Why suspend: while a handler runs, libmicrohttpd must not time the
 * connection out or read the next request from it.  The watch holds a
 * duplicate of the descriptor, so it never watches a number that
 * libmicrohttpd closed and the kernel gave to somebody else.
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/diag.h"
#include "cancel/http.h"
#include "cancel/log.h"
#include "cancel/watch.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <linux/filter.h>
#include <microhttpd.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#define DEFAULT_THREADS 8
#define DEFAULT_TIMEOUT CANCEL_SEC(30)
#define DEFAULT_MAX_DEADLINE CANCEL_SEC(300)
#define DEFAULT_DRAIN CANCEL_SEC(20)
#define DEFAULT_MAX_BODY ((size_t)1 << 20)
#define DEFAULT_HEADER_TIMEOUT CANCEL_SEC(10)
#define DEFAULT_BODY_TIMEOUT CANCEL_SEC(60)
#define DEFAULT_IDLE_TIMEOUT CANCEL_SEC(60)
#define DEFAULT_MAX_CONNECTIONS 4096u
#define DEFAULT_MAX_PER_IP 256u
/* A connection's read deadline once the sweeper cut it. */
#define READ_CUT INT64_MIN
#define MAX_PARAMS 8
/* A graceful stop closes a keep-alive connection only once it has had no
 * request for this long (and no other connection had one either): a
 * client that has just been answered sends its next request within
 * microseconds on loopback, within a round trip elsewhere, and that
 * request must find the connection open, to be answered 503 with
 * Connection: close.  Closing at once would race it (Go's Shutdown and
 * nginx do, and leave the retry to the client). */
#define KEEPALIVE_GRACE CANCEL_MSEC(250)

/* The longest value, quotes included, of the server's name in a log line
 * (CANCEL_LOG_STRN); the access line's method, path and route are cut
 * shorter than the library's own cap too, so that the reason after them
 * keeps its room. */
#define SERVER_NAME_MAX 63
#define METHOD_MAX 63
#define PATH_MAX_LOGGED 511
#define ROUTE_MAX 127
#define ERROR_MAX 139

struct kv {
  const char *k, *v;
};

struct kvs {
  struct kv *a;
  size_t n, cap;
};

enum req_state { REQ_NEW, REQ_QUEUED, REQ_DONE };

/* Where a connection is, for its hang-up watch (conn_ctx.state):
 *   IDLE  no request of ours on it: between requests, or sending an answer
 *         that is already decided (libmicrohttpd tells us whether it got
 *         through);
 *   BUSY  a request handed to a handler, until the handler's result is
 *         classified;
 *   LEFT  the peer went away while BUSY: the source was cancelled, the
 *         request is answered 499 (nothing sent);
 *   GONE  the peer went away while IDLE: nothing was cancelled (an idle
 *         keep-alive connection closing, or a client that read its answer
 *         and left).  A request that is complete all the same (its client
 *         half-closed after sending it) starts LEFT.
 * The watch's callback (reactor thread) and the request's own steps (the
 * daemon's thread, a pool thread) move it by compare-and-swap, so exactly
 * one of them decides, and the kind "client gone" is counted once per
 * request answered 499, never for a connection that cancelled nothing. */
enum { CONN_IDLE, CONN_BUSY, CONN_LEFT, CONN_GONE };

/* A connection's own source, "client <addr>:<port>", linked to the drain
 * and cancelled by a hang-up watch armed once per connection (on its first
 * request): a keep-alive connection pays for the watch once, not per
 * request.  Made on libmicrohttpd's thread, freed there when the
 * connection closes; requests hold a reference while they run.  The watch
 * calls conn_hangup (cancel_watch_hangup_fn) rather than cancelling the
 * source whenever the peer leaves: it cancels only a BUSY connection. */
struct conn_ctx {
  cancel_source *src;
  cancel_watch watch;
  uint32_t state; /* atomic: CONN_* */
  uint32_t hup;   /* atomic: 0 before the watch fired, then 1 + reset */
  bool watching;
  bool tried; /* the source and watch were attempted */
  /* The read deadline (header_timeout_ns, body_timeout_ns): the time by
   * which the request being received must be complete, CANCEL_NEVER while
   * none is being received (a handler runs, an answer is sent), READ_CUT
   * once the sweeper cut the connection.  Written by libmicrohttpd's
   * thread, cut by the sweeper's, both by compare-and-swap: a deadline
   * that passes just as the request completes is either a cut or a
   * request, never both. */
  int64_t read_deadline;
  int64_t read_since;     /* when the phase began, for the log */
  const char *read_phase; /* "headers", "body", "next request" */
  unsigned requests;      /* request lines seen */
  bool bad_escape;        /* the request's path or query decoded to a NUL */
  bool listed;            /* on the server's list (it has its fd) */
  int fd;
  struct conn_ctx *prev, *next; /* the server's list; conn_mu */
};

struct cancel_http_request {
  cancel_http_server *srv;
  struct MHD_Connection *conn;
  struct cancel_http_request *next; /* the pool's queue */
  uint64_t id;
  int64_t t0, t_handler_end;
  enum req_state state;
  bool seen;                /* on_access had it: method and url are set */
  bool dispatched;          /* counted in in_flight */
  bool busy;                /* made its connection BUSY (conn_begin) */
  struct conn_ctx *cc;      /* the connection's (NULL: no memory for it);
                               its src is NULL without cancellation */
  const char *method, *url; /* libmicrohttpd's, valid until completion */
  const cancel_http_route *route;
  char *pathbuf; /* url split into segments: the captures point here */
  struct kv params[MAX_PARAMS];
  size_t nparams;
  struct kvs headers, args; /* libmicrohttpd's strings */
  char *body;
  size_t body_len;
  bool too_large;
  /* Cancellation. */
  cancel_source *client, *route_src, *deadline_src; /* client: a reference
                                                        to the connection's */
  const cancel_token *tok;
  /* When tok fired, noted by fired_reg's callback (see fired_at()): the
   * reason's time is its origin's, which for a request drained by the
   * server's shield is the stop, not the end of the grace. */
  cancel_reg fired_reg;
  bool fired_armed;
  int64_t fired_time; /* atomic; 0 until the callback ran */
  /* The handler's own sources (cancel_http_request_timeout_new): the
   * request holds a reference to each until the handler's result is
   * classified.  Only the handler's thread touches them. */
  cancel_source **own;
  size_t nown, own_cap;
  /* The token the handler named (cancel_http_request_cancelled): its
   * reason as it was then (the token may be gone by the time the edge
   * looks), the fields already in cancel_fields.  told_through: it fired
   * because the request's token did (the request's reason is the one). */
  bool told, told_through;
  int told_kind;
  int64_t told_time;
  char told_origin[96];
  /* The answer. */
  unsigned status, log_status;
  char *resp_body, *ctype;
  size_t resp_len;
  struct kvs resp_headers; /* our copies */
  bool close_conn, no_response;
  int level; /* of the access line */
  char cancel_fields[640];
  char error[128];
  double after_cancel_ms; /* < 0: not cancelled */
};

struct cancel_http_server {
  cancel_http_options o;
  cancel_http_route *routes;
  size_t nroutes;
  struct MHD_Daemon *d;
  uint16_t port;
  const cancel_token *stopping;
  cancel_source *drain;
  cancel_reg stop_reg;
  bool reg_armed;
  MHD_socket lfd;    /* the listening socket, ours once quiesced */
  int stopping_flag; /* atomic: answer new requests 503 */
  uint64_t next_id;  /* atomic */
  pthread_mutex_t mu;
  pthread_cond_t cv;      /* the queue is not empty, or closing: the pool */
  pthread_cond_t done_cv; /* in_flight went down: the stopper only */
  bool stopping_waits;    /* atomic: a stopper waits on done_cv */
  bool handed;   /* the stopper handed connections from the listen queue */
  bool filtered; /* the listen socket drops new handshakes, still open */
  cancel_http_request *head, *tail;
  size_t in_flight; /* atomic reads outside mu */
  /* What a graceful stop waits for (atomics; changed on the daemon's
   * thread, read by the stopper, which waits on done_cv): */
  size_t open;         /* requests started (request line read), not ended */
  size_t nconns;       /* connections open */
  int64_t last_active; /* a request started or ended, a connection opened */
  size_t running;      /* handlers running now */
  bool closing;        /* pool threads exit */
  pthread_t *threads;
  unsigned nthreads;
  enum { SRV_NEW, SRV_RUNNING, SRV_STOPPED, SRV_STUCK } state;
  /* The read-deadline sweeper: every open connection is on the list from
   * libmicrohttpd's STARTED notice to its CLOSED one, which comes before
   * libmicrohttpd closes the descriptor; so under conn_mu a listed
   * connection's fd is its own and the sweeper may shut it down. */
  pthread_mutex_t conn_mu;
  pthread_cond_t sweep_cv; /* the list became non-empty, or sweep_stop */
  struct conn_ctx *conns;
  bool sweep_stop, sweeping;
  pthread_t sweeper;
  int64_t sweep_horizon; /* the shortest read timeout: no deadline set
                            from now on is nearer than now + this */
};

/* ---- Small helpers ------------------------------------------------------ */

static bool kvs_add(struct kvs *s, const char *k, const char *v) {
  if (s->n == s->cap) {
    size_t cap = s->cap ? s->cap * 2 : 16;
    struct kv *a = realloc(s->a, cap * sizeof *a);
    if (a == NULL)
      return false;
    s->a = a;
    s->cap = cap;
  }
  s->a[s->n].k = k;
  s->a[s->n].v = v;
  s->n++;
  return true;
}

static const char *kvs_get(const struct kvs *s, const char *k, bool nocase) {
  for (size_t i = 0; i < s->n; i++)
    if ((nocase ? strcasecmp : strcmp)(s->a[i].k, k) == 0)
      return s->a[i].v;
  return NULL;
}

int cancel_http_parse_timeout(const char *v, bool grpc, int64_t *ns) {
  if (v == NULL || ns == NULL)
    return -EINVAL;
  size_t digits = strspn(v, "0123456789");
  if (digits == 0 || digits > (grpc ? 8u : 12u))
    return -EINVAL;
  int64_t n = 0;
  for (size_t i = 0; i < digits; i++)
    n = n * 10 + (v[i] - '0');
  const char *rest = v + digits;
  if (!grpc) {
    if (*rest != '\0')
      return -EINVAL;
    *ns = n * 1000000;
    return 0;
  }
  if (rest[0] == '\0' || rest[1] != '\0')
    return -EINVAL;
  int64_t unit;
  switch (rest[0]) {
  case 'H':
    unit = CANCEL_SEC(3600);
    break;
  case 'M':
    unit = CANCEL_SEC(60);
    break;
  case 'S':
    unit = CANCEL_SEC(1);
    break;
  case 'm':
    unit = CANCEL_MSEC(1);
    break;
  case 'u':
    unit = CANCEL_USEC(1);
    break;
  case 'n':
    unit = 1;
    break;
  default:
    return -EINVAL;
  }
  /* 8 digits of hours (3.6e20 ns) do not fit: saturate, the cap applies. */
  *ns = n > INT64_MAX / unit ? INT64_MAX : n * unit;
  return 0;
}

/* ---- Routing ------------------------------------------------------------- */

/* Matches path against pattern; on success fills the request's params
 * (pointing into its pathbuf, which holds path split at '/'). */
static bool route_match(cancel_http_request *r, const char *pattern) {
  const char *p = pattern, *u = r->url;
  size_t np = 0;
  char *out = r->pathbuf;
  while (*p == '/' && *u == '/') {
    p++;
    u++;
    size_t pl = strcspn(p, "/"), ul = strcspn(u, "/");
    if (pl >= 2 && p[0] == '{' && p[pl - 1] == '}') {
      if (ul == 0 || np == MAX_PARAMS)
        return false;
      memcpy(out, u, ul);
      out[ul] = '\0';
      r->params[np].k = NULL; /* the name is matched by param() */
      r->params[np].v = out;
      out += ul + 1;
      np++;
    } else if (pl != ul || memcmp(p, u, pl) != 0) {
      return false;
    }
    p += pl;
    u += ul;
  }
  if (*p != '\0' || *u != '\0')
    return false;
  r->nparams = np;
  return true;
}

const char *cancel_http_request_param(const cancel_http_request *r,
                                      const char *name) {
  if (r == NULL || name == NULL || r->route == NULL)
    return NULL;
  /* The i-th {capture} of the pattern is params[i]. */
  size_t i = 0, len = strlen(name);
  for (const char *p = r->route->pattern; (p = strchr(p, '{')) != NULL; p++) {
    const char *end = strchr(p, '}');
    if (end == NULL || i >= r->nparams)
      break;
    if ((size_t)(end - p - 1) == len && memcmp(p + 1, name, len) == 0)
      return r->params[i].v;
    i++;
  }
  return NULL;
}

int cancel_http_request_param_u64(const cancel_http_request *r,
                                  const char *name, uint64_t max,
                                  uint64_t *out) {
  if (r == NULL || name == NULL || out == NULL)
    return -EINVAL;
  const char *v = cancel_http_request_param(r, name);
  if (v == NULL)
    return -ENOENT;
  /* strtoull would take " 5", "+5" and "-5" (as 2^64 - 5): digits only,
   * counted by hand, and one spelling per number. */
  size_t n = strspn(v, "0123456789");
  if (n == 0 || v[n] != '\0' || n > 20 || (n > 1 && v[0] == '0'))
    return -EINVAL;
  uint64_t x = 0;
  for (size_t i = 0; i < n; i++) {
    unsigned d = (unsigned)(v[i] - '0');
    if (x > (UINT64_MAX - d) / 10)
      return -ERANGE;
    x = x * 10 + d;
  }
  if (x > max)
    return -ERANGE;
  *out = x;
  return 0;
}

/* ---- Responses ------------------------------------------------------------
 */

int cancel_http_respond(cancel_http_request *r, unsigned status,
                        const char *ctype, const void *body, size_t len) {
  if (r == NULL || status < 100 || status > 599 || (body == NULL && len > 0))
    return -EINVAL;
  char *b = malloc(len ? len : 1);
  char *t = ctype != NULL ? strdup(ctype) : NULL;
  if (b == NULL || (ctype != NULL && t == NULL)) {
    free(b);
    free(t);
    return -ENOMEM;
  }
  if (len)
    memcpy(b, body, len);
  free(r->resp_body);
  free(r->ctype);
  r->resp_body = b;
  r->resp_len = len;
  r->ctype = t;
  r->status = status;
  return 0;
}

int cancel_http_respond_header(cancel_http_request *r, const char *name,
                               const char *value) {
  if (r == NULL || name == NULL || value == NULL || r->status == 0 ||
      strpbrk(name, "\r\n:") != NULL || strpbrk(value, "\r\n") != NULL)
    return -EINVAL;
  char *k = strdup(name), *v = strdup(value);
  if (k == NULL || v == NULL || !kvs_add(&r->resp_headers, k, v)) {
    free(k);
    free(v);
    return -ENOMEM;
  }
  return 0;
}

static void respond_text(cancel_http_request *r, unsigned status,
                         const char *text) {
  if (cancel_http_respond(r, status, "text/plain; charset=utf-8", text,
                          strlen(text)) < 0)
    r->status = status; /* no memory: an empty body still answers */
}

/* ---- The request's sources ---------------------------------------------- */

static void client_name(struct MHD_Connection *c, char *buf, size_t len) {
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(c, MHD_CONNECTION_INFO_CLIENT_ADDRESS);
  char host[INET6_ADDRSTRLEN] = "?";
  unsigned port = 0;
  if (ci != NULL && ci->client_addr != NULL) {
    const struct sockaddr *sa = ci->client_addr;
    if (sa->sa_family == AF_INET) {
      const struct sockaddr_in *in = (const struct sockaddr_in *)sa;
      inet_ntop(AF_INET, &in->sin_addr, host, sizeof host);
      port = ntohs(in->sin_port);
    } else if (sa->sa_family == AF_INET6) {
      const struct sockaddr_in6 *in6 = (const struct sockaddr_in6 *)sa;
      inet_ntop(AF_INET6, &in6->sin6_addr, host, sizeof host);
      port = ntohs(in6->sin6_port);
    }
  }
  snprintf(buf, len, "client %s:%u", host, port);
}

/* The caller's budget from the deadline headers (the smaller one), or
 * CANCEL_NEVER; *which names the header it came from. */
static int64_t header_budget(cancel_http_request *r, const char **which) {
  cancel_http_server *s = r->srv;
  int64_t best = CANCEL_NEVER;
  static const struct {
    const char *name;
    bool grpc;
  } hs[] = {{"grpc-timeout", true}, {"X-Request-Timeout-Ms", false}};
  for (size_t i = 0; i < 2; i++) {
    const char *v = kvs_get(&r->headers, hs[i].name, true);
    if (v == NULL)
      continue;
    int64_t ns;
    if (cancel_http_parse_timeout(v, hs[i].grpc, &ns) < 0) {
      /* The value is the client's bytes: a typed field, quoted and cut by
       * the library. */
      CANCEL_LOG(CANCEL_LOG_WARN, "http", "malformed deadline header ignored",
                 CANCEL_LOG_U64("id", r->id),
                 CANCEL_LOG_STR("header", hs[i].name),
                 CANCEL_LOG_STRN("value", v, 159));
      continue;
    }
    if (ns > s->o.max_deadline_ns)
      ns = s->o.max_deadline_ns;
    if (ns < best) {
      best = ns;
      *which = hs[i].grpc ? "deadline header grpc-timeout"
                          : "deadline header X-Request-Timeout-Ms";
    }
  }
  return best;
}

static const char *hup_detail(uint32_t hup) {
  return hup == 2 ? "connection reset" : "peer closed";
}

/* The hang-up watch's callback, on the reactor thread, once (one-shot):
 * cancels the connection's source only when a request is BUSY on it.
 * c stays valid: on_connection removes the watch (waiting for a callback
 * that runs) before it frees c. */
static void conn_hangup(void *arg, int reset) {
  struct conn_ctx *c = arg;
  uint32_t hup = reset ? 2 : 1;
  st_relaxed(&c->hup, hup);
  uint32_t cur = ld_acquire(&c->state);
  for (;;) {
    if (cur != CONN_IDLE && cur != CONN_BUSY)
      return; /* not expected: the watch is one-shot */
    uint32_t next = cur == CONN_BUSY ? CONN_LEFT : CONN_GONE;
    if (__atomic_compare_exchange_n(&c->state, &cur, next, false,
                                    __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
      break;
  }
  if (cur == CONN_BUSY)
    cancel_source_cancel_with(c->src, CANCEL_CLIENT_GONE, hup_detail(hup));
}

/* The connection's source, made and watched on its first request. */
static cancel_source *conn_source(cancel_http_request *r) {
  struct conn_ctx *c = r->cc;
  if (c == NULL)
    return NULL;
  if (!c->tried) {
    c->tried = true;
    char name[96];
    client_name(r->conn, name, sizeof name);
    const cancel_token *drain = cancel_source_token(r->srv->drain);
    if (cancel_source_new_linked(&c->src, name, &drain, 1) < 0)
      return NULL;
    const union MHD_ConnectionInfo *fi =
        MHD_get_connection_info(r->conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    /* Without a watch the requests still have their timeouts and the
     * shutdown; only the client's hang-up goes unseen: say so.  The
     * callback may run before this returns (a peer gone already): c is
     * complete. */
    if (fi == NULL ||
        cancel_watch_hangup_fn(&c->watch, fi->connect_fd, conn_hangup, c) < 0)
      CANCEL_LOG(CANCEL_LOG_WARN, "http", "client hang-up not watched",
                 CANCEL_LOG_U64("id", r->id));
    else
      c->watching = true;
  }
  return c->src;
}

/* The request is handed to a handler: its connection is BUSY, so that a
 * hang-up from now on cancels it.  A peer that left already (it
 * half-closed after sending this request) cancels it at once. */
static void conn_begin(cancel_http_request *r) {
  struct conn_ctx *c = r->cc;
  if (c == NULL || c->src == NULL)
    return;
  r->busy = true;
  uint32_t cur = CONN_IDLE;
  if (__atomic_compare_exchange_n(&c->state, &cur, CONN_BUSY, false,
                                  __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    return;
  if (cur == CONN_GONE) {
    st_release(&c->state, CONN_LEFT);
    cancel_source_cancel_with(c->src, CANCEL_CLIENT_GONE,
                              hup_detail(ld_relaxed(&c->hup)));
  }
}

/* The handler's result is classified: the connection is IDLE again (the
 * answer goes out, or libmicrohttpd says why not).  Returns whether the
 * client left while the request was BUSY: its source was (or is being,
 * on the reactor) cancelled with kind client gone, and the request is
 * answered 499.  The one exception: the drain fired the source first
 * (shutdown), which is then the reason, and the 503 goes out. */
static bool conn_end(cancel_http_request *r) {
  struct conn_ctx *c = r->cc;
  if (!r->busy)
    return false;
  uint32_t cur = CONN_BUSY;
  if (__atomic_compare_exchange_n(&c->state, &cur, CONN_IDLE, false,
                                  __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
    return false;
  int kind = cancel_token_kind(cancel_source_token(c->src));
  return kind == CANCEL_NONE || kind == CANCEL_CLIENT_GONE;
}

/* The request's token fired: noted for after_cancel_ms (on the
 * cancelling thread; one store). */
static void on_fired(void *arg) {
  cancel_http_request *r = arg;
  st_release(&r->fired_time, cancel_now());
}

static int build_sources(cancel_http_request *r) {
  cancel_http_server *s = r->srv;
  cancel_source *conn = conn_source(r);
  if (conn == NULL)
    return -ENOMEM;
  r->client = cancel_source_ref(conn);
  int64_t t =
      r->route->timeout_ns ? r->route->timeout_ns : s->o.default_timeout_ns;
  /* The request's scope under its route, named after the route (the
   * server's strings, not the client's): "route GET /reports/{id}".  Its
   * timeout is in the reason's detail ("2s"), so a timeout reads
   * "timeout (route GET /reports/{id} 2s)" and a client that left
   * "client gone (client ...) via route GET /reports/{id}". */
  char name[256];
  snprintf(name, sizeof name, "route %s %s",
           r->route->method != NULL ? r->route->method : "*",
           r->route->pattern);
  int rc = cancel_source_new_timeout(&r->route_src, name,
                                     cancel_source_token(r->client), t);
  if (rc < 0)
    return rc;
  r->tok = cancel_source_token(r->route_src);
  if (!s->o.ignore_deadline_headers) {
    const char *which = NULL;
    int64_t budget = header_budget(r, &which);
    if (budget != CANCEL_NEVER) {
      rc = cancel_source_new_timeout(&r->deadline_src, which, r->tok, budget);
      if (rc < 0)
        return rc;
      r->tok = cancel_source_token(r->deadline_src);
    }
  }
  /* Registering never fails on a token (1: fired already, noted now). */
  r->fired_armed = cancel_register(&r->fired_reg, r->tok, on_fired, r) >= 0;
  return 0;
}

/* When the request's token fired (0: it did not), once; ends the
 * registration.  A callback that had not run yet when the handler
 * returned is removed: the cancellation is being delivered at this very
 * moment (the cancelling thread is still running the callbacks of the
 * tree that the handler saw cancelled), so now is when it fired. */
static int64_t fired_at(cancel_http_request *r) {
  if (r->fired_armed) {
    r->fired_armed = false;
    if (cancel_unregister(&r->fired_reg) == 1 &&
        cancel_token_is_cancelled(r->tok))
      st_release(&r->fired_time, cancel_now());
  }
  return ld_acquire(&r->fired_time);
}

/* Drops the request's sources, the handler's own first (they hang on
 * the request's token). */
static void teardown_sources(cancel_http_request *r) {
  for (size_t i = 0; i < r->nown; i++)
    cancel_source_unref(r->own[i]);
  free(r->own);
  r->own = NULL;
  r->nown = r->own_cap = 0;
  if (r->fired_armed) {
    (void)cancel_unregister(&r->fired_reg);
    r->fired_armed = false;
  }
  cancel_source_unref(r->deadline_src);
  cancel_source_unref(r->route_src);
  cancel_source_unref(r->client);
  r->deadline_src = r->route_src = r->client = NULL;
  r->tok = NULL;
}

/* ---- Slow clients: read deadlines and their sweeper --------------------- */

static struct conn_ctx *conn_ctx_of(struct MHD_Connection *conn) {
  const union MHD_ConnectionInfo *ci =
      MHD_get_connection_info(conn, MHD_CONNECTION_INFO_SOCKET_CONTEXT);
  return ci != NULL ? ci->socket_context : NULL;
}

/* now + t, or CANCEL_NEVER for a timeout turned off. */
static int64_t deadline_in(int64_t t) {
  return t == CANCEL_NEVER ? CANCEL_NEVER : cancel__add_sat(cancel_now(), t);
}

/* Moves the connection's read deadline to `at` (CANCEL_NEVER: nothing is
 * being read).  Returns false when the sweeper cut the connection first:
 * the caller closes it (MHD_NO) instead of going on. */
static bool read_deadline_set(struct conn_ctx *c, int64_t at,
                              const char *phase) {
  if (c == NULL)
    return true;
  int64_t cur = __atomic_load_n(&c->read_deadline, __ATOMIC_ACQUIRE);
  do {
    if (cur == READ_CUT)
      return false;
  } while (!__atomic_compare_exchange_n(&c->read_deadline, &cur, at, true,
                                        __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE));
  if (at != CANCEL_NEVER) {
    c->read_since = cancel_now();
    c->read_phase = phase;
  }
  return true;
}

static bool read_was_cut(const struct conn_ctx *c) {
  return c != NULL &&
         __atomic_load_n(&c->read_deadline, __ATOMIC_ACQUIRE) == READ_CUT;
}

/* The sweeper: one thread per server that cuts every connection whose
 * read deadline passed.  Not a timer per connection: deadlines move
 * three times per request (request line, headers, complete), and an
 * atomic store is all that costs on libmicrohttpd's thread.  Every
 * deadline is set at least sweep_horizon ahead, so a scan that finds the
 * earliest one knows when to look again; wake-ups are coalesced to a
 * sixteenth of the horizon, which is the precision of a cut. */
static void *sweep_main(void *arg) {
  cancel_http_server *s = arg;
  int64_t slack = s->sweep_horizon / 16;
  if (slack < CANCEL_MSEC(1))
    slack = CANCEL_MSEC(1);
  pthread_mutex_lock(&s->conn_mu);
  while (!s->sweep_stop) {
    int64_t now = cancel_now(), next = cancel__add_sat(now, s->sweep_horizon);
    for (struct conn_ctx *c = s->conns; c != NULL; c = c->next) {
      int64_t at = __atomic_load_n(&c->read_deadline, __ATOMIC_ACQUIRE);
      if (at == READ_CUT || at == CANCEL_NEVER)
        continue;
      if (at > now) {
        if (at < next)
          next = at;
        continue;
      }
      /* libmicrohttpd then reads the end of the stream and closes the
       * connection on its own thread, as for a client that left. */
      if (__atomic_compare_exchange_n(&c->read_deadline, &at, READ_CUT, false,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        (void)shutdown(c->fd, SHUT_RDWR);
    }
    if (s->conns == NULL) {
      pthread_cond_wait(&s->sweep_cv, &s->conn_mu);
      continue;
    }
    if (next < cancel__add_sat(now, slack))
      next = cancel__add_sat(now, slack);
    struct timespec ts = {.tv_sec = (time_t)(next / 1000000000),
                          .tv_nsec = (long)(next % 1000000000)};
    (void)pthread_cond_timedwait(&s->sweep_cv, &s->conn_mu, &ts);
  }
  pthread_mutex_unlock(&s->conn_mu);
  return NULL;
}

static void conn_list_add(cancel_http_server *s, struct conn_ctx *c) {
  pthread_mutex_lock(&s->conn_mu);
  bool was_empty = s->conns == NULL;
  c->prev = NULL;
  c->next = s->conns;
  if (s->conns != NULL)
    s->conns->prev = c;
  s->conns = c;
  if (was_empty)
    pthread_cond_signal(&s->sweep_cv);
  pthread_mutex_unlock(&s->conn_mu);
}

static void conn_list_del(cancel_http_server *s, struct conn_ctx *c) {
  pthread_mutex_lock(&s->conn_mu);
  if (c->prev != NULL)
    c->prev->next = c->next;
  else
    s->conns = c->next;
  if (c->next != NULL)
    c->next->prev = c->prev;
  pthread_mutex_unlock(&s->conn_mu);
}

static int sweeper_start(cancel_http_server *s) {
  int64_t h = s->o.header_timeout_ns;
  if (s->o.body_timeout_ns < h)
    h = s->o.body_timeout_ns;
  if (s->o.idle_timeout_ns < h)
    h = s->o.idle_timeout_ns;
  s->sweep_horizon = h;
  s->sweep_stop = false;
  if (s->o.header_timeout_ns == CANCEL_NEVER &&
      s->o.body_timeout_ns == CANCEL_NEVER)
    return 0; /* nothing to cut: libmicrohttpd's idle timeout only */
  if (pthread_create(&s->sweeper, NULL, sweep_main, s) != 0)
    return -EAGAIN;
  s->sweeping = true;
  return 0;
}

static void sweeper_stop(cancel_http_server *s) {
  if (!s->sweeping)
    return;
  pthread_mutex_lock(&s->conn_mu);
  s->sweep_stop = true;
  pthread_cond_signal(&s->sweep_cv);
  pthread_mutex_unlock(&s->conn_mu);
  pthread_join(s->sweeper, NULL);
  s->sweeping = false;
}

/* libmicrohttpd's unescaper for the path and the query: its own, but a
 * "%00" is noted so that the request is refused instead of being read
 * as the shorter string that libmicrohttpd's C strings would give. */
static size_t on_unescape(void *cls, struct MHD_Connection *conn, char *val) {
  (void)cls;
  size_t n = MHD_http_unescape(val);
  if (memchr(val, '\0', n) != NULL) {
    struct conn_ctx *c = conn_ctx_of(conn);
    if (c != NULL)
      c->bad_escape = true;
  }
  return n;
}

/* Raises the soft RLIMIT_NOFILE to the hard limit when the connection
 * limit needs more descriptors than the soft one allows (see the header). */
static void raise_nofile(const cancel_http_server *s) {
  if (s->o.keep_nofile_limit)
    return;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return;
  rlim_t want = 2 * (rlim_t)s->o.max_connections + 1024;
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want &&
      rl.rlim_cur < rl.rlim_max) {
    rlim_t was = rl.rlim_cur;
    /* An unlimited hard limit is still capped by fs.nr_open. */
    rl.rlim_cur = rl.rlim_max == RLIM_INFINITY ? want : rl.rlim_max;
    if (setrlimit(RLIMIT_NOFILE, &rl) == 0)
      CANCEL_LOG(CANCEL_LOG_INFO, "http", "raised descriptor limit",
                 CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
                 CANCEL_LOG_U64("rlimit_nofile_was", was),
                 CANCEL_LOG_U64("rlimit_nofile", rl.rlim_cur),
                 CANCEL_LOG_U64("max_connections", s->o.max_connections));
    else
      rl.rlim_cur = was;
  }
  if (rl.rlim_cur != RLIM_INFINITY && rl.rlim_cur < want)
    CANCEL_LOG(CANCEL_LOG_WARN, "http", "descriptor limit below connections",
               CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
               CANCEL_LOG_U64("rlimit_nofile", rl.rlim_cur),
               CANCEL_LOG_U64("needed", want),
               CANCEL_LOG_U64("max_connections", s->o.max_connections),
               CANCEL_LOG_STR("hint", "raise the hard RLIMIT_NOFILE (ulimit "
                                      "-Hn, systemd LimitNOFILE=) or lower "
                                      "max_connections"));
}

/* ---- Strictness -----------------------------------------------------------
 */

struct header_scan {
  unsigned host, content_length, transfer_encoding;
  const char *cl, *te; /* the first of each */
  size_t cl_len;
  const char *bad; /* the first problem found: a reason for the log */
  const char *bad_name;
};

static bool token_eq(const char *v, size_t n, const char *lit) {
  return strlen(lit) == n && strncasecmp(v, lit, n) == 0;
}

static enum MHD_Result scan_header(void *cls, enum MHD_ValueKind kind,
                                   const char *k, size_t klen, const char *v,
                                   size_t vlen) {
  (void)kind;
  struct header_scan *h = cls;
  if (v == NULL)
    v = "";
  if (memchr(k, '\0', klen) != NULL || memchr(v, '\0', vlen) != NULL) {
    h->bad = "NUL in a header";
    h->bad_name = k;
    return MHD_NO;
  }
  if (strcasecmp(k, MHD_HTTP_HEADER_HOST) == 0) {
    h->host++;
    if (strpbrk(v, " \t/?#@\\") != NULL) {
      h->bad = "invalid Host";
      return MHD_NO;
    }
    for (size_t i = 0; i < vlen; i++)
      if ((unsigned char)v[i] < 0x20 || v[i] == 0x7f) {
        h->bad = "invalid Host";
        return MHD_NO;
      }
  } else if (strcasecmp(k, MHD_HTTP_HEADER_CONTENT_LENGTH) == 0) {
    if (vlen == 0 || strspn(v, "0123456789") != vlen) {
      h->bad = "Content-Length not a number";
      return MHD_NO;
    }
    if (h->content_length++ > 0 &&
        (vlen != h->cl_len || memcmp(v, h->cl, vlen) != 0)) {
      h->bad = "two different Content-Length values";
      return MHD_NO;
    }
    h->cl = v;
    h->cl_len = vlen;
  } else if (strcasecmp(k, MHD_HTTP_HEADER_TRANSFER_ENCODING) == 0) {
    h->transfer_encoding++;
    h->te = v;
  }
  return MHD_YES;
}

/* Checks what libmicrohttpd lets through and RFC 9112 forbids (see the
 * header).  Returns 0, or the status to answer with *why set. */
static unsigned check_request(cancel_http_request *r, const char *version,
                              const char **why) {
  struct conn_ctx *c = r->cc;
  if (c != NULL && c->bad_escape) {
    c->bad_escape = false;
    *why = "NUL in the decoded path or query";
    return 400;
  }
  struct header_scan h = {0};
  MHD_get_connection_values_n(r->conn, MHD_HEADER_KIND, scan_header, &h);
  if (h.bad != NULL) {
    *why = h.bad;
    return 400;
  }
  bool http11 = strcmp(version, MHD_HTTP_VERSION_1_1) == 0;
  if (h.transfer_encoding > 0) {
    if (h.content_length > 0) {
      *why = "Transfer-Encoding with Content-Length";
      return 400;
    }
    if (!http11 || h.transfer_encoding > 1) {
      *why = http11 ? "more than one Transfer-Encoding"
                    : "Transfer-Encoding in an HTTP/1.0 request";
      return 400;
    }
    if (!token_eq(h.te, strlen(h.te), "chunked")) {
      *why = "Transfer-Encoding other than chunked";
      return 501;
    }
  }
  if (http11 && h.host != 1) {
    *why = h.host == 0 ? "HTTP/1.1 without Host" : "more than one Host";
    return 400;
  }
  return 0;
}

/* ---- The edge ----------------------------------------------------------- */

/* A handler that saw a deadline pass by its own means (a downstream's
 * "deadline exceeded", a budget it computed) may return -ECANCELED a
 * moment before the token's timer fires it: settle, so the reason is
 * there to answer by (cancel.h's guarantee covers libcancel's calls; this
 * covers the handler's own code). */
static void settle(const cancel_token *tok) {
  (void)cancel_token_settle(tok, CANCEL_MSEC(50));
}

/* Whether two reasons are one cancellation: the same origin source (its
 * name's storage is its own) at the same time. */
static bool same_cancellation(const cancel_reason *a, const cancel_reason *b) {
  return a->origin == b->origin && a->time == b->time && a->kind == b->kind;
}

/* A handler's token of its own that fired by itself, not because the
 * request's token did (whose reason is req, NULL while it has not fired):
 * the one the handler named, else the first to fire of the sources made
 * with cancel_http_request_timeout_new, whose fields go to cancel_fields.
 * Returns whether there is one, with its kind, origin and time. */
struct own_reason {
  int kind;
  int64_t time;
  const char *origin; /* valid until teardown_sources */
};

static bool own_reason(cancel_http_request *r, const cancel_reason *req,
                       struct own_reason *out) {
  if (r->told) {
    if (r->told_through)
      return false;
    *out = (struct own_reason){r->told_kind, r->told_time, r->told_origin};
    return true;
  }
  cancel_reason best, cur;
  bool found = false;
  for (size_t i = 0; i < r->nown; i++) {
    if (cancel_token_reason(cancel_source_token(r->own[i]), &cur) != 1 ||
        (req != NULL && same_cancellation(&cur, req)))
      continue;
    if (!found || cur.time < best.time) {
      best = cur;
      found = true;
    }
  }
  if (!found)
    return false;
  cancel_logfmt_reason(r->cancel_fields, sizeof r->cancel_fields, &best);
  *out = (struct own_reason){best.kind, best.time, best.origin};
  return true;
}

/* The token whose deadline comes first, of the request's and the
 * handler's own: the one to settle. */
static const cancel_token *first_deadline(const cancel_http_request *r) {
  const cancel_token *t = r->tok;
  for (size_t i = 0; i < r->nown; i++) {
    const cancel_token *o = cancel_source_token(r->own[i]);
    if (t == NULL || cancel_token_deadline(o) < cancel_token_deadline(t))
      t = o;
  }
  return t;
}

static bool any_fired(const cancel_http_request *r) {
  if (r->told || cancel_token_is_cancelled(r->tok))
    return true;
  for (size_t i = 0; i < r->nown; i++)
    if (cancel_token_is_cancelled(cancel_source_token(r->own[i])))
      return true;
  return false;
}

/* The edge (see the header).  A -ECANCELED is answered by the reason of
 * the token that fired first: the request's, or one the handler derived
 * from it that fired by itself (its own timeout). */
static void classify(cancel_http_request *r, int rc) {
  r->level = CANCEL_LOG_INFO;
  r->after_cancel_ms = -1;
  cancel_reason why;
  if (rc == -ECANCELED && !any_fired(r))
    settle(first_deadline(r));
  bool fired = r->tok != NULL && cancel_token_reason(r->tok, &why) == 1;
  int64_t fired_time = fired ? fired_at(r) : 0;
  struct own_reason own;
  bool mine = rc == -ECANCELED && own_reason(r, fired ? &why : NULL, &own) &&
              (!fired || own.time < fired_time);
  int kind = CANCEL_NONE;
  const char *origin = "";
  int64_t since = 0;
  if (mine) {
    kind = own.kind;
    origin = own.origin;
    since = own.time;
  } else if (fired) {
    cancel_logfmt_reason(r->cancel_fields, sizeof r->cancel_fields, &why);
    kind = why.kind;
    origin = why.origin;
    since = fired_time != 0 ? fired_time : why.time;
  } else {
    r->cancel_fields[0] = '\0'; /* a named token's, unused */
  }
  if (mine || fired) {
    /* How long the handler went on after the token it answers by fired:
     * 0 when it returned a moment before the token's timer (settle): it
     * stopped at the deadline. */
    int64_t after = r->t_handler_end - since;
    r->after_cancel_ms = after > 0 ? (double)after / 1e6 : 0.0;
  }
  fired = fired || mine;
  if (rc >= 0) {
    if (r->status == 0) {
      respond_text(r, 500, "internal error\n");
      snprintf(r->error, sizeof r->error, "handler set no response");
      r->level = CANCEL_LOG_ERROR;
    }
  } else if (rc == -ECANCELED && fired) {
    char line[256];
    switch (kind) {
    case CANCEL_CLIENT_GONE:
      r->no_response = true;
      r->log_status = 499;
      break;
    case CANCEL_TIMEOUT:
      snprintf(line, sizeof line, "timeout: %s\n",
               origin[0] ? origin : "deadline");
      respond_text(r, 504, line);
      r->level = CANCEL_LOG_WARN;
      break;
    case CANCEL_SHUTDOWN:
      respond_text(r, 503, "shutting down\n");
      r->close_conn = true;
      break;
    default:
      respond_text(r, 503, "cancelled\n");
      break;
    }
  } else if (rc == -ECANCELED) {
    respond_text(r, 500, "internal error\n");
    snprintf(r->error, sizeof r->error,
             "handler returned -ECANCELED but neither its token nor one "
             "it derived fired (cancel_http_request_cancelled)");
    r->level = CANCEL_LOG_ERROR;
  } else {
    respond_text(r, 500, "internal error\n");
    snprintf(r->error, sizeof r->error, "%s", cancel_strerror(rc));
    r->level = CANCEL_LOG_ERROR;
  }
}

static void run_request(cancel_http_request *r) {
  cancel_http_server *s = r->srv;
  /* The handler's work is done on the request's behalf: a scope, so the
   * watchdog names a handler that goes on after its request was
   * cancelled ("GET /reports/{id}"). */
  char name[160];
  snprintf(name, sizeof name, "%s %s", r->method, r->route->pattern);
  cancel_scope scope;
  cancel_scope_begin(&scope, r->tok, name);
  int rc = r->route->handler(r, r->tok, r->route->arg);
  cancel_scope_end(&scope);
  r->t_handler_end = cancel_now();
  classify(r, rc);
  bool gone = conn_end(r);
  teardown_sources(r);
  if (gone || r->no_response) {
    /* The client is gone: whatever the handler answered, nobody reads
     * it.  Logged as nginx does (499), not as an error. */
    r->no_response = true;
    r->log_status = 499;
    if (r->level == CANCEL_LOG_ERROR && rc == -ECANCELED)
      r->level = CANCEL_LOG_INFO;
  }
  if (ld_acquire(&s->stopping_flag))
    r->close_conn = true;
  r->state = REQ_DONE;
  pthread_mutex_lock(&s->mu);
  s->running--;
  pthread_mutex_unlock(&s->mu);
  /* From here on r belongs to libmicrohttpd's thread again. */
  MHD_resume_connection(r->conn);
}

static void *pool_main(void *arg) {
  cancel_http_server *s = arg;
  pthread_mutex_lock(&s->mu);
  for (;;) {
    while (s->head == NULL && !s->closing)
      pthread_cond_wait(&s->cv, &s->mu);
    if (s->head == NULL)
      break;
    cancel_http_request *r = s->head;
    s->head = r->next;
    if (s->head == NULL)
      s->tail = NULL;
    s->running++;
    pthread_mutex_unlock(&s->mu);
    run_request(r);
    pthread_mutex_lock(&s->mu);
  }
  pthread_mutex_unlock(&s->mu);
  return NULL;
}

/* ---- libmicrohttpd's callbacks ---------------------------------------------
 */

static enum MHD_Result collect(void *cls, enum MHD_ValueKind kind,
                               const char *k, const char *v) {
  (void)kind;
  struct kvs *s = cls;
  return kvs_add(s, k, v != NULL ? v : "") ? MHD_YES : MHD_NO;
}

static enum MHD_Result send_response(cancel_http_request *r) {
  struct MHD_Response *resp = MHD_create_response_from_buffer(
      r->resp_len, r->resp_body != NULL ? r->resp_body : (void *)"",
      MHD_RESPMEM_MUST_COPY);
  if (resp == NULL)
    return MHD_NO;
  if (r->ctype != NULL)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, r->ctype);
  for (size_t i = 0; i < r->resp_headers.n; i++)
    MHD_add_response_header(resp, r->resp_headers.a[i].k,
                            r->resp_headers.a[i].v);
  if (r->close_conn)
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONNECTION, "close");
  enum MHD_Result ret = MHD_queue_response(r->conn, r->status, resp);
  MHD_destroy_response(resp);
  if (r->log_status == 0)
    r->log_status = r->status;
  return ret;
}

/* Answers at once, on libmicrohttpd's thread (no handler). */
static enum MHD_Result answer_now(cancel_http_request *r, unsigned status,
                                  const char *text) {
  respond_text(r, status, text);
  r->state = REQ_DONE;
  r->level = CANCEL_LOG_INFO;
  return send_response(r);
}

static const cancel_http_route *find_route(cancel_http_request *r,
                                           bool *other_method, char *allow,
                                           size_t alen) {
  cancel_http_server *s = r->srv;
  *other_method = false;
  size_t al = 0;
  allow[0] = '\0';
  for (size_t i = 0; i < s->nroutes; i++) {
    const cancel_http_route *rt = &s->routes[i];
    if (!route_match(r, rt->pattern))
      continue;
    if (rt->method == NULL || strcmp(rt->method, r->method) == 0 ||
        (strcmp(rt->method, "GET") == 0 && strcmp(r->method, "HEAD") == 0))
      return rt; /* HEAD: GET's answer, libmicrohttpd drops the body */
    *other_method = true;
    int n =
        snprintf(allow + al, alen - al, "%s%s%s", al ? ", " : "", rt->method,
                 strcmp(rt->method, "GET") == 0 ? ", HEAD" : "");
    if (n > 0 && (size_t)n < alen - al)
      al += (size_t)n;
  }
  return NULL;
}

static enum MHD_Result dispatch(cancel_http_request *r) {
  cancel_http_server *s = r->srv;
  /* The whole request is in: its read deadline ends, unless it passed
   * first (then the sweeper is closing the connection). */
  if (!read_deadline_set(r->cc, CANCEL_NEVER, NULL))
    return MHD_NO;
  if (ld_acquire(&s->stopping_flag)) {
    r->close_conn = true;
    return answer_now(r, 503, "shutting down\n");
  }
  if (r->too_large)
    return answer_now(r, 413, "request body too large\n");
  r->pathbuf = malloc(strlen(r->url) + 1);
  if (r->pathbuf == NULL) {
    r->log_status = 500;
    r->level = CANCEL_LOG_ERROR;
    snprintf(r->error, sizeof r->error, "no memory for the path");
    return MHD_NO;
  }
  bool other;
  char allow[128];
  r->route = find_route(r, &other, allow, sizeof allow);
  if (r->route == NULL) {
    if (!other)
      return answer_now(r, 404, "not found\n");
    respond_text(r, 405, "method not allowed\n");
    cancel_http_respond_header(r, "Allow", allow);
    r->state = REQ_DONE;
    r->level = CANCEL_LOG_INFO;
    return send_response(r);
  }
  MHD_get_connection_values(r->conn, MHD_HEADER_KIND, collect, &r->headers);
  MHD_get_connection_values(r->conn, MHD_GET_ARGUMENT_KIND, collect, &r->args);
  if (!s->o.no_cancellation && build_sources(r) < 0) {
    teardown_sources(r);
    return answer_now(r, 503, "out of memory\n");
  }
  conn_begin(r);
  MHD_suspend_connection(r->conn);
  r->state = REQ_QUEUED;
  r->dispatched = true;
  pthread_mutex_lock(&s->mu);
  __atomic_add_fetch(&s->in_flight, 1, __ATOMIC_RELAXED);
  if (s->tail != NULL)
    s->tail->next = r;
  else
    s->head = r;
  s->tail = r;
  pthread_cond_signal(&s->cv);
  pthread_mutex_unlock(&s->mu);
  return MHD_YES;
}

/* Only a stopper waits on done_cv: waking the idle pool threads on every
 * request cost more than the request.  Sequentially consistent with the
 * stopper's store of stopping_waits and its loads of the counters: one of
 * the two sees the other's write, so no wake-up is lost. */
static void wake_stopper(cancel_http_server *s) {
  if (__atomic_load_n(&s->stopping_waits, __ATOMIC_SEQ_CST)) {
    pthread_mutex_lock(&s->mu);
    pthread_cond_signal(&s->done_cv);
    pthread_mutex_unlock(&s->mu);
  }
}

static void active(cancel_http_server *s) {
  __atomic_store_n(&s->last_active, cancel_now(), __ATOMIC_RELAXED);
}

/* A request starts when its request line is read: from then on it is
 * open (a graceful stop waits for it), it gets one access line whatever
 * happens, and the method is "-" until the headers are in. */
static cancel_http_request *new_request(cancel_http_server *s,
                                        struct MHD_Connection *conn,
                                        const char *url) {
  cancel_http_request *r = calloc(1, sizeof *r);
  if (r == NULL)
    return NULL;
  r->srv = s;
  r->conn = conn;
  r->id = __atomic_add_fetch(&s->next_id, 1, __ATOMIC_RELAXED);
  r->t0 = cancel_now();
  r->method = "-";
  r->url = url != NULL ? url : "-";
  r->after_cancel_ms = -1;
  r->level = CANCEL_LOG_INFO;
  r->cc = conn_ctx_of(conn);
  __atomic_add_fetch(&s->open, 1, __ATOMIC_SEQ_CST);
  active(s);
  return r;
}

/* libmicrohttpd's URI log callback (MHD_OPTION_URI_LOG_CALLBACK, the one
 * callback of the request line): the request line is in, the headers may
 * still be on their way.  On a keep-alive connection this starts the next
 * request's header time (its first request's counts from the accept);
 * and the request starts here (new_request).  Returns the request, which
 * on_access gets as its context, or NULL without memory (on_access tries
 * once more). */
static void *on_request_line(void *cls, const char *uri,
                             struct MHD_Connection *conn) {
  cancel_http_server *s = cls;
  struct conn_ctx *c = conn_ctx_of(conn);
  if (c != NULL) {
    c->bad_escape = false; /* the unescaper runs next, for this request */
    if (c->requests++ > 0)
      (void)read_deadline_set(c, deadline_in(s->o.header_timeout_ns),
                              "headers");
  }
  return new_request(s, conn, uri);
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn,
                                 const char *url, const char *method,
                                 const char *version, const char *upload,
                                 size_t *upload_size, void **con_cls) {
  cancel_http_server *s = cls;
  cancel_http_request *r = *con_cls;
  if (r == NULL) {
    /* on_request_line had no memory for it: once more. */
    r = new_request(s, conn, url);
    if (r == NULL)
      return MHD_NO;
    *con_cls = r;
  }
  if (!r->seen) {
    /* The headers are in.  libmicrohttpd's strings, valid until the
     * request ends (on_request_line's uri is the same buffer, decoded
     * in place). */
    r->seen = true;
    r->method = method;
    r->url = url;
    /* The body's time starts. */
    if (!read_deadline_set(r->cc, deadline_in(s->o.body_timeout_ns), "body"))
      return MHD_NO;
    const char *why = NULL;
    unsigned st = check_request(r, version, &why);
    if (st != 0) {
      (void)read_deadline_set(r->cc, CANCEL_NEVER, NULL);
      snprintf(r->error, sizeof r->error, "bad request: %s", why);
      r->close_conn = true; /* where the request ends is in doubt */
      return answer_now(r, st,
                        st == 400 ? "bad request\n"
                                  : "transfer coding not implemented\n");
    }
    return MHD_YES;
  }
  if (r->state == REQ_DONE) {
    /* Resumed after the handler. */
    if (r->no_response)
      return MHD_NO; /* closes the connection: the client left */
    return send_response(r);
  }
  if (*upload_size > 0) {
    size_t n = *upload_size;
    *upload_size = 0;
    active(s); /* a body arriving holds a graceful stop */
    if (r->too_large || r->body_len + n > r->srv->o.max_body) {
      r->too_large = true;
      return MHD_YES; /* read and drop the rest, answer 413 at the end */
    }
    char *b = realloc(r->body, r->body_len + n + 1);
    if (b == NULL) {
      r->log_status = 500;
      r->level = CANCEL_LOG_ERROR;
      snprintf(r->error, sizeof r->error, "no memory for the body");
      return MHD_NO;
    }
    memcpy(b + r->body_len, upload, n);
    r->body = b;
    r->body_len += n;
    r->body[r->body_len] = '\0';
    return MHD_YES;
  }
  return dispatch(r);
}

static void free_request(cancel_http_request *r) {
  for (size_t i = 0; i < r->resp_headers.n; i++) {
    free((char *)r->resp_headers.a[i].k);
    free((char *)r->resp_headers.a[i].v);
  }
  free(r->resp_headers.a);
  free(r->headers.a);
  free(r->args.a);
  free(r->pathbuf);
  free(r->body);
  free(r->resp_body);
  free(r->ctype);
  free(r);
}

/* The status in the access line of a request that ended before the
 * server answered it (see the header).  `cut`: the sweeper cut the
 * connection because the request's header or body time passed; the
 * termination code then only says that libmicrohttpd read the end of the
 * stream, as for a client that left. */
static unsigned cut_short_status(struct MHD_Connection *conn,
                                 enum MHD_RequestTerminationCode tc, bool cut) {
  if (cut)
    return 408; /* the client was too slow to send it: we cut it */
  switch (tc) {
  case MHD_REQUEST_TERMINATED_COMPLETED_OK: {
    /* libmicrohttpd answered it itself: a malformed request. */
    const union MHD_ConnectionInfo *ci =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_HTTP_STATUS);
    return ci != NULL && ci->http_status >= 100 ? ci->http_status : 400;
  }
  case MHD_REQUEST_TERMINATED_TIMEOUT_REACHED:
    return 408; /* nothing moved for idle_timeout_ns: libmicrohttpd cut it */
  case MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN: {
    /* The stop closed it while it was being read: a client still there
     * was refused (503); one that had left already (libmicrohttpd 0.9.75
     * can miss a close that comes with the last bytes) is told by its
     * socket. */
    const union MHD_ConnectionInfo *fi =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    struct pollfd p = {.fd = fi != NULL ? fi->connect_fd : -1,
                       .events = POLLRDHUP};
    return p.fd >= 0 && poll(&p, 1, 0) == 1 &&
                   (p.revents & (POLLRDHUP | POLLHUP | POLLERR)) != 0
               ? 400
               : 503;
  }
  default:
    return 400; /* the client left with its request unfinished */
  }
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode tc) {
  cancel_http_server *s = cls;
  cancel_http_request *r = *con_cls;
  struct conn_ctx *cc = conn_ctx_of(conn);
  bool cut = read_was_cut(cc);
  /* Kept alive: the next request line must come within the idle time. */
  (void)read_deadline_set(cc, deadline_in(s->o.idle_timeout_ns),
                          "next request");
  if (r == NULL)
    return;
  *con_cls = NULL;
  if (r->state != REQ_DONE) {
    if (r->log_status == 0)
      r->log_status = cut_short_status(conn, tc, cut);
  } else if (r->no_response) {
    r->log_status = 499; /* the client left while BUSY (conn_end) */
  } else {
    if (r->log_status == 0)
      r->log_status = r->status;
    /* A handler's answer that could not be delivered: the client left
     * after the handler was done.  The request was still in progress, so
     * it is cancelled now, once: 499 and one "client gone" counted.  (A
     * source the drain fired first keeps its reason and the status.) */
    if (tc != MHD_REQUEST_TERMINATED_COMPLETED_OK &&
        tc != MHD_REQUEST_TERMINATED_DAEMON_SHUTDOWN && r->busy &&
        cancel_source_cancel_with(r->cc->src, CANCEL_CLIENT_GONE,
                                  "answer not delivered") == 1) {
      r->log_status = 499;
      cancel_reason why;
      if (r->cancel_fields[0] == '\0' &&
          cancel_token_reason(cancel_source_token(r->cc->src), &why) == 1)
        cancel_logfmt_reason(r->cancel_fields, sizeof r->cancel_fields, &why);
    }
  }
  if (cancel_log_enabled(r->level)) {
    /* Method and path are the client's bytes: typed fields, which the
     * library quotes (a TAB or a quote in them cannot make fields of
     * their own) and cuts inside their quotes, so the line keeps room for
     * the reason after them.  The reason's fields were written when it
     * could be read (cancel_logfmt_reason): whole logfmt already. */
    cancel_log_attr a[12];
    size_t n = 0;
    a[n++] = CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX);
    a[n++] = CANCEL_LOG_U64("id", r->id);
    a[n++] = CANCEL_LOG_STRN("method", r->method, METHOD_MAX);
    a[n++] = CANCEL_LOG_STRN("path", r->url, PATH_MAX_LOGGED);
    a[n++] = CANCEL_LOG_STRN(
        "route", r->route != NULL ? r->route->pattern : "-", ROUTE_MAX);
    a[n++] = CANCEL_LOG_U64("status", r->log_status);
    a[n++] = CANCEL_LOG_MS("dur_ms", cancel_now() - r->t0);
    a[n++] = CANCEL_LOG_LOGFMT(r->cancel_fields);
    if (r->after_cancel_ms >= 0) {
      a[n++] = CANCEL_LOG_FIXED("after_cancel_ms", r->after_cancel_ms, 3);
      a[n++] = CANCEL_LOG_I64("handler_end_mono_us", r->t_handler_end / 1000);
    }
    if (r->error[0] != '\0')
      a[n++] = CANCEL_LOG_STRN("error", r->error, ERROR_MAX);
    cancel_log_attrs(r->level, "http", "request", a, n);
  }
  bool counted = r->dispatched;
  free_request(r);
  if (counted)
    __atomic_sub_fetch(&s->in_flight, 1, __ATOMIC_SEQ_CST);
  __atomic_sub_fetch(&s->open, 1, __ATOMIC_SEQ_CST);
  active(s);
  wake_stopper(s);
}

static void on_connection(void *cls, struct MHD_Connection *conn,
                          void **socket_context,
                          enum MHD_ConnectionNotificationCode code) {
  cancel_http_server *s = cls;
  if (code == MHD_CONNECTION_NOTIFY_STARTED) {
    __atomic_add_fetch(&s->nconns, 1, __ATOMIC_SEQ_CST);
    active(s);
    /* The source and the watch come with the first request: a connection
     * that never sends one costs an allocation and its read deadline. */
    struct conn_ctx *c = calloc(1, sizeof *c);
    *socket_context = c;
    const union MHD_ConnectionInfo *fi =
        MHD_get_connection_info(conn, MHD_CONNECTION_INFO_CONNECTION_FD);
    if (c == NULL || fi == NULL)
      return;
    c->fd = fi->connect_fd;
    c->read_deadline = deadline_in(s->o.header_timeout_ns);
    c->read_since = cancel_now();
    c->read_phase = "headers";
    c->listed = true;
    conn_list_add(s, c);
    return;
  }
  struct conn_ctx *c = *socket_context;
  *socket_context = NULL;
  if (c != NULL) {
    if (c->listed)
      conn_list_del(s, c);
    if (read_was_cut(c)) {
      /* The address without client_name's "client " prefix. */
      char name[96];
      client_name(conn, name, sizeof name);
      CANCEL_LOG(CANCEL_LOG_INFO, "http", "request read timed out",
                 CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
                 CANCEL_LOG_STRN("client", name + 7, 111),
                 CANCEL_LOG_STR("phase", c->read_phase),
                 CANCEL_LOG_MSD("waited_ms", cancel_now() - c->read_since, 0));
    }
    /* Waits for a callback running on the reactor: c is ours after. */
    if (c->watching)
      (void)cancel_unwatch(&c->watch);
    cancel_source_unref(c->src);
    free(c);
  }
  __atomic_sub_fetch(&s->nconns, 1, __ATOMIC_SEQ_CST);
  wake_stopper(s);
}

/* The level of one of libmicrohttpd's own messages, by what it means.  A
 * client that left, timed out or sent something malformed is a normal
 * event of a server on a network (the access line tells it already):
 * debug.  Resource exhaustion and failures of the machinery (accept,
 * memory, threads, epoll) are the operator's business: warn or error.
 * A message not listed stays a warning. */
static const struct {
  const char *prefix;
  int level;
} mhd_levels[] = {
    /* Ours: refusing a resumed connection is how we close it for a client
     * that left (libmicrohttpd calls that an internal error). */
    {"Application reported internal error", CANCEL_LOG_DEBUG},
    /* The client left, or its connection failed. */
    {"Socket has been disconnected", CANCEL_LOG_DEBUG},
    {"Connection socket is closed", CANCEL_LOG_DEBUG},
    {"Connection was closed by remote side", CANCEL_LOG_DEBUG},
    {"The connection was forcibly closed", CANCEL_LOG_DEBUG},
    {"The socket is no longer available", CANCEL_LOG_DEBUG},
    {"The socket is not connected", CANCEL_LOG_DEBUG},
    {"Failed to send data in request", CANCEL_LOG_DEBUG},
    {"Failed to send the response", CANCEL_LOG_DEBUG},
    {"Failed to send the chunked response", CANCEL_LOG_DEBUG},
    {"Failed to send the footers", CANCEL_LOG_DEBUG},
    {"Failed to push the data from buffers", CANCEL_LOG_DEBUG},
    {"Too late to send an error response", CANCEL_LOG_DEBUG},
    {"Too late for error response", CANCEL_LOG_DEBUG},
    /* The client sent something malformed or too large: answered 4xx. */
    {"Error processing request", CANCEL_LOG_DEBUG},
    {"Received HTTP/1.1 request without", CANCEL_LOG_DEBUG},
    {"Too large value of 'Content-Length'", CANCEL_LOG_DEBUG},
    {"Failed to parse `Content-Length'", CANCEL_LOG_DEBUG},
    {"Not enough memory in pool to", CANCEL_LOG_DEBUG},
    {"Refused wrong status code", CANCEL_LOG_ERROR},
    {"Wrong status code", CANCEL_LOG_ERROR},
    /* Limits and exhaustion: the service is refusing work. */
    {"Server reached connection limit", CANCEL_LOG_WARN},
    {"Hit process or system resource limit", CANCEL_LOG_ERROR},
    {"Error accepting connection", CANCEL_LOG_ERROR},
    {"Error allocating memory", CANCEL_LOG_ERROR},
    {"Closing connection (out of memory)", CANCEL_LOG_ERROR},
    {"Not enough system resources", CANCEL_LOG_ERROR},
    {"Failed to create", CANCEL_LOG_ERROR},
    {"Call to epoll", CANCEL_LOG_ERROR},
    {"Failed to signal", CANCEL_LOG_ERROR},
    {"Internal server error", CANCEL_LOG_ERROR},
};

static void on_mhd_log(void *cls, const char *fmt, va_list ap) {
  (void)cls;
  char msg[256];
  vsnprintf(msg, sizeof msg, fmt, ap);
  size_t n = strlen(msg);
  while (n > 0 && (msg[n - 1] == '\n' || msg[n - 1] == '\r'))
    msg[--n] = '\0';
  int level = CANCEL_LOG_WARN;
  for (size_t i = 0; i < sizeof mhd_levels / sizeof mhd_levels[0]; i++)
    if (strncmp(msg, mhd_levels[i].prefix, strlen(mhd_levels[i].prefix)) == 0) {
      level = mhd_levels[i].level;
      break;
    }
  /* The message may hold a client's bytes (a header it refused). */
  CANCEL_LOG(level, "http", "libmicrohttpd",
             CANCEL_LOG_STRN("detail", msg, 299));
}

/* ---- The server -------------------------------------------------------------
 */

/* Under a host, the drain must end CANCEL_HTTP_DRAIN_MARGIN before the
 * host's deadline: the requests it cancels answer 503 and their
 * connections close in that margin, and the server's worker returns
 * before the host gives up on it.  A drain left 0 is derived from the
 * host's timeout; an explicit one that breaks the rule is a configuration
 * error, said with both numbers (the two settings usually come from two
 * places: a flag and the host's options). */
static int drain_for_host(cancel_http_options *o) {
  int64_t host = o->host_shutdown_timeout_ns;
  int64_t margin = CANCEL_HTTP_DRAIN_MARGIN(host), max = host - margin;
  if (o->drain_timeout_ns == 0) {
    o->drain_timeout_ns = max;
    return 0;
  }
  if (o->drain_timeout_ns <= max)
    return 0;
  CANCEL_LOG(CANCEL_LOG_ERROR, "http", "drain outlasts the host's shutdown",
             CANCEL_LOG_STRN("server", o->name, SERVER_NAME_MAX),
             CANCEL_LOG_MSD("drain_ms", o->drain_timeout_ns, 0),
             CANCEL_LOG_MSD("host_shutdown_timeout_ms", host, 0),
             CANCEL_LOG_MSD("margin_ms", margin, 0),
             CANCEL_LOG_MSD("max_drain_ms", max, 0),
             CANCEL_LOG_STR("error", "drain_timeout_ns must end the margin "
                                     "before the host's shutdown deadline"));
  return -EINVAL;
}

int cancel_http_server_new(cancel_http_server **srvp,
                           const cancel_http_options *opts,
                           const cancel_http_route *routes, size_t n) {
  static const cancel_http_options defaults;
  if (srvp != NULL)
    *srvp = NULL;
  if (opts == NULL)
    opts = &defaults;
  if (srvp == NULL || (routes == NULL && n > 0) ||
      opts->default_timeout_ns < 0 || opts->max_deadline_ns < 0 ||
      opts->drain_timeout_ns < 0 || opts->header_timeout_ns < 0 ||
      opts->body_timeout_ns < 0 || opts->idle_timeout_ns < 0 ||
      opts->host_shutdown_timeout_ns < 0)
    return -EINVAL;
  for (size_t i = 0; i < n; i++)
    if (routes[i].handler == NULL || routes[i].pattern == NULL ||
        routes[i].pattern[0] != '/' || routes[i].timeout_ns < 0)
      return -EINVAL;
  cancel_http_options o = *opts;
  if (o.name == NULL)
    o.name = "http";
  if (o.bind_address == NULL)
    o.bind_address = "127.0.0.1";
  struct in6_addr probe;
  if (inet_pton(AF_INET, o.bind_address, &probe) != 1 &&
      inet_pton(AF_INET6, o.bind_address, &probe) != 1)
    return -EINVAL;
  if (o.threads == 0)
    o.threads = DEFAULT_THREADS;
  if (o.default_timeout_ns == 0)
    o.default_timeout_ns = DEFAULT_TIMEOUT;
  if (o.max_deadline_ns == 0)
    o.max_deadline_ns = DEFAULT_MAX_DEADLINE;
  if (o.host_shutdown_timeout_ns > 0 && drain_for_host(&o) < 0)
    return -EINVAL;
  if (o.drain_timeout_ns == 0)
    o.drain_timeout_ns = DEFAULT_DRAIN;
  if (o.max_body == 0)
    o.max_body = DEFAULT_MAX_BODY;
  if (o.header_timeout_ns == 0)
    o.header_timeout_ns = DEFAULT_HEADER_TIMEOUT;
  if (o.body_timeout_ns == 0)
    o.body_timeout_ns = DEFAULT_BODY_TIMEOUT;
  if (o.idle_timeout_ns == 0)
    o.idle_timeout_ns = DEFAULT_IDLE_TIMEOUT;
  if (o.max_connections == 0)
    o.max_connections = DEFAULT_MAX_CONNECTIONS;
  if (o.max_connections_per_ip == 0)
    o.max_connections_per_ip = DEFAULT_MAX_PER_IP;

  cancel_http_server *s = calloc(1, sizeof *s);
  if (s == NULL)
    return -ENOMEM;
  s->routes = calloc(n ? n : 1, sizeof *s->routes);
  if (s->routes == NULL) {
    free(s);
    return -ENOMEM;
  }
  if (n)
    memcpy(s->routes, routes, n * sizeof *routes);
  s->nroutes = n;
  s->o = o;
  s->lfd = MHD_INVALID_SOCKET;
  pthread_mutex_init(&s->mu, NULL);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  pthread_cond_init(&s->cv, &ca);
  pthread_cond_init(&s->done_cv, &ca);
  pthread_mutex_init(&s->conn_mu, NULL);
  pthread_cond_init(&s->sweep_cv, &ca);
  pthread_condattr_destroy(&ca);
  *srvp = s;
  return 0;
}

static void on_stopping(void *arg) {
  cancel_http_server *s = arg;
  st_release(&s->stopping_flag, 1);
}

static void pool_stop(cancel_http_server *s) {
  pthread_mutex_lock(&s->mu);
  s->closing = true;
  pthread_cond_broadcast(&s->cv);
  pthread_mutex_unlock(&s->mu);
  for (unsigned i = 0; i < s->nthreads; i++)
    pthread_join(s->threads[i], NULL);
  free(s->threads);
  s->threads = NULL;
  s->nthreads = 0;
}

static void release_start(cancel_http_server *s) {
  if (s->reg_armed) {
    cancel_unregister(&s->stop_reg);
    s->reg_armed = false;
  }
  cancel_source_unref(s->drain);
  s->drain = NULL;
}

int cancel_http_server_start(cancel_http_server *s,
                             const cancel_token *stopping) {
  if (s == NULL)
    return -EINVAL;
  if (s->state != SRV_NEW)
    return -EALREADY;
  int rc = cancel_source_new_shield(&s->drain, "drain", stopping,
                                    s->o.drain_timeout_ns);
  if (rc < 0)
    return rc;
  s->stopping = stopping;
  cancel_register(&s->stop_reg, stopping, on_stopping, s);
  s->reg_armed = true;

  s->threads = calloc(s->o.threads, sizeof *s->threads);
  if (s->threads == NULL) {
    release_start(s);
    return -ENOMEM;
  }
  for (; s->nthreads < s->o.threads; s->nthreads++)
    if (pthread_create(&s->threads[s->nthreads], NULL, pool_main, s) != 0)
      break;
  if (s->nthreads == 0) {
    free(s->threads);
    s->threads = NULL;
    release_start(s);
    return -EAGAIN;
  }

  struct sockaddr_storage ss;
  memset(&ss, 0, sizeof ss);
  unsigned flags = MHD_USE_INTERNAL_POLLING_THREAD | MHD_USE_EPOLL |
                   MHD_ALLOW_SUSPEND_RESUME | MHD_USE_ERROR_LOG;
  struct sockaddr_in *in = (struct sockaddr_in *)&ss;
  struct sockaddr_in6 *in6 = (struct sockaddr_in6 *)&ss;
  if (inet_pton(AF_INET, s->o.bind_address, &in->sin_addr) == 1) {
    in->sin_family = AF_INET;
    in->sin_port = htons(s->o.port);
  } else {
    memset(&ss, 0, sizeof ss);
    inet_pton(AF_INET6, s->o.bind_address, &in6->sin6_addr);
    in6->sin6_family = AF_INET6;
    in6->sin6_port = htons(s->o.port);
    flags |= MHD_USE_IPv6;
  }
  raise_nofile(s);
  if (sweeper_start(s) < 0) {
    pool_stop(s);
    release_start(s);
    return -EAGAIN;
  }
  /* libmicrohttpd counts its idle timeout in seconds: rounded up, so that
   * it never cuts sooner than asked. */
  int64_t idle_s =
      s->o.idle_timeout_ns == CANCEL_NEVER
          ? 0
          : (s->o.idle_timeout_ns + CANCEL_SEC(1) - 1) / CANCEL_SEC(1);
  if (idle_s > UINT_MAX / 2)
    idle_s = UINT_MAX / 2;
  errno = 0;
  /* The logger first: libmicrohttpd reports options before it on its own
   * standard-error logger. */
  s->d = MHD_start_daemon(
      flags, s->o.port, NULL, NULL, on_access, s, MHD_OPTION_EXTERNAL_LOGGER,
      on_mhd_log, s, MHD_OPTION_SOCK_ADDR, (struct sockaddr *)&ss,
      MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
      MHD_OPTION_NOTIFY_CONNECTION, on_connection, s,
      MHD_OPTION_URI_LOG_CALLBACK, on_request_line, s,
      MHD_OPTION_UNESCAPE_CALLBACK, on_unescape, s,
      MHD_OPTION_CONNECTION_TIMEOUT, (unsigned)idle_s,
      MHD_OPTION_CONNECTION_LIMIT, s->o.max_connections,
      MHD_OPTION_PER_IP_CONNECTION_LIMIT,
      s->o.max_connections_per_ip == UINT_MAX ? 0u
                                              : s->o.max_connections_per_ip,
      MHD_OPTION_END);
  if (s->d == NULL) {
    int e = errno;
    sweeper_stop(s);
    pool_stop(s);
    release_start(s);
    return e == EADDRINUSE ? -EADDRINUSE : e == EACCES ? -EACCES : -EIO;
  }
  const union MHD_DaemonInfo *di =
      MHD_get_daemon_info(s->d, MHD_DAEMON_INFO_BIND_PORT);
  s->port = di != NULL ? di->port : s->o.port;
  s->state = SRV_RUNNING;
  /* A timeout that is off reads -1. */
  CANCEL_LOG(CANCEL_LOG_INFO, "http", "listening",
             CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
             CANCEL_LOG_STRN("address", s->o.bind_address, 63),
             CANCEL_LOG_U64("port", s->port),
             CANCEL_LOG_U64("threads", s->nthreads),
             CANCEL_LOG_MSD("header_timeout_ms",
                            s->o.header_timeout_ns == CANCEL_NEVER
                                ? -CANCEL_MSEC(1)
                                : s->o.header_timeout_ns,
                            0),
             CANCEL_LOG_MSD("body_timeout_ms",
                            s->o.body_timeout_ns == CANCEL_NEVER
                                ? -CANCEL_MSEC(1)
                                : s->o.body_timeout_ns,
                            0),
             CANCEL_LOG_I64("idle_timeout_s", idle_s),
             CANCEL_LOG_U64("max_connections", s->o.max_connections),
             CANCEL_LOG_U64("max_connections_per_ip",
                            s->o.max_connections_per_ip == UINT_MAX
                                ? 0u
                                : s->o.max_connections_per_ip));
  return 0;
}

uint16_t cancel_http_server_port(const cancel_http_server *s) {
  return s != NULL ? s->port : 0;
}

size_t cancel_http_server_in_flight(const cancel_http_server *s) {
  return s != NULL ? __atomic_load_n(&s->in_flight, __ATOMIC_RELAXED) : 0;
}

/* Hands the connections waiting in the quiesced listen socket's queue to
 * the daemon, which answers their requests 503 with Connection: close
 * (stopping_flag). */
static void hand_over(cancel_http_server *s) {
  for (;;) {
    struct sockaddr_storage sa;
    socklen_t salen = sizeof sa;
    int fd = accept4(s->lfd, (struct sockaddr *)&sa, &salen,
                     SOCK_NONBLOCK | SOCK_CLOEXEC);
    if (fd < 0)
      return;
    /* On failure libmicrohttpd closes fd itself. */
    if (MHD_add_connection(s->d, fd, (struct sockaddr *)&sa, salen) ==
        MHD_YES) {
      s->handed = true;
      active(s);
    }
  }
}

int cancel_http_server_stop(cancel_http_server *s, int64_t deadline) {
  if (s == NULL || (s->state != SRV_RUNNING && s->state != SRV_STUCK))
    return -EINVAL;
  st_release(&s->stopping_flag, 1);
  /* No new connections.  The listening socket is ours once quiesced, but
   * libmicrohttpd's thread lets go of it only by MHD_stop_daemon (its
   * documentation): it is closed after that, never before. */
  if (s->state == SRV_RUNNING) {
    s->lfd = MHD_quiesce_daemon(s->d);
    if (s->lfd != MHD_INVALID_SOCKET) {
      /* A filter that drops new handshakes (SYN without ACK) while the
       * ones under way complete: the listen queue stops growing, and what
       * is in it is handed to the daemon (hand_over) until the end of the
       * wait below, then the socket is shut down.  Without the filter, a
       * connection the kernel completes between the last accept and the
       * shutdown is reset, with the request its client may have sent on
       * it already.  A client whose SYN was dropped is refused when it
       * tries again.  If the filter cannot be set: shut down now. */
      struct sock_filter syn_drop[] = {
          BPF_STMT(BPF_LD | BPF_B | BPF_ABS, 13), /* TCP flags */
          BPF_STMT(BPF_ALU | BPF_AND | BPF_K, 0x12),
          BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, 0x02, 0, 1),
          BPF_STMT(BPF_RET | BPF_K, 0),
          BPF_STMT(BPF_RET | BPF_K, 0xffffffffu),
      };
      struct sock_fprog prog = {.len = 5, .filter = syn_drop};
      s->filtered = setsockopt(s->lfd, SOL_SOCKET, SO_ATTACH_FILTER, &prog,
                               sizeof prog) == 0;
      fcntl(s->lfd, F_SETFL, fcntl(s->lfd, F_GETFL) | O_NONBLOCK);
      hand_over(s);
      if (!s->filtered)
        (void)shutdown(s->lfd, SHUT_RDWR);
    }
  }
  int64_t t0 = cancel_now();
  size_t at_stop = cancel_http_server_in_flight(s);
  if (!cancel_token_is_cancelled(s->stopping))
    cancel_source_cancel_with(s->drain, CANCEL_SHUTDOWN, "server stop");
  CANCEL_LOG(
      CANCEL_LOG_INFO, "http", "stopping",
      CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
      CANCEL_LOG_U64("in_flight", at_stop),
      CANCEL_LOG_MSD("drain_ms",
                     cancel_token_is_cancelled(cancel_source_token(s->drain))
                         ? 0
                         : s->o.drain_timeout_ns,
                     0));

  /* Wait until every request handed to a handler has been answered, and
   * every connection is closed or quiet.  Each request that comes on an
   * open connection meanwhile is answered 503 with Connection: close,
   * which closes it; MHD_stop_daemon then closes only connections that
   * had nothing happen for KEEPALIVE_GRACE (no request started or ended,
   * no body bytes, no connection opened), so that none is closed under a
   * request that is arriving or was just sent.  A request stuck in its
   * headers that long (a client gone without libmicrohttpd seeing it, or
   * one sending a byte at a time) does not hold the stop. */
  bool timed_out = false;
  pthread_mutex_lock(&s->mu);
  __atomic_store_n(&s->stopping_waits, true, __ATOMIC_SEQ_CST);
  for (;;) {
    if (s->filtered) {
      pthread_mutex_unlock(&s->mu);
      hand_over(s);
      pthread_mutex_lock(&s->mu);
    }
    int64_t now = cancel_now(), wake = deadline;
    if (__atomic_load_n(&s->in_flight, __ATOMIC_SEQ_CST) == 0) {
      /* Connections handed over from the listen queue may not have
       * reached on_connection yet: they count as open for one grace. */
      if (__atomic_load_n(&s->nconns, __ATOMIC_SEQ_CST) == 0 && !s->handed)
        break;
      int64_t quiet = cancel__add_sat(
          __atomic_load_n(&s->last_active, __ATOMIC_RELAXED), KEEPALIVE_GRACE);
      if (now >= quiet)
        break;
      if (quiet < wake)
        wake = quiet;
    }
    if (now >= deadline) {
      timed_out = true;
      break;
    }
    if (wake == CANCEL_NEVER) {
      pthread_cond_wait(&s->done_cv, &s->mu);
      continue;
    }
    struct timespec ts = cancel__timespec_at(wake);
    (void)pthread_cond_timedwait(&s->done_cv, &s->mu, &ts);
  }
  size_t left = __atomic_load_n(&s->open, __ATOMIC_SEQ_CST),
         running = s->running;
  __atomic_store_n(&s->stopping_waits, false, __ATOMIC_SEQ_CST);
  pthread_mutex_unlock(&s->mu);
  if (s->filtered) {
    (void)shutdown(s->lfd, SHUT_RDWR);
    s->filtered = false;
  }
  if (timed_out && running > 0) {
    /* Handlers that ignore their tokens still hold connections: the
     * daemon must stay up for them (see the header). */
    s->state = SRV_STUCK;
    CANCEL_LOG(CANCEL_LOG_ERROR, "http", "stop timed out",
               CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
               CANCEL_LOG_U64("handlers_running", running),
               CANCEL_LOG_U64("in_flight", left),
               CANCEL_LOG_MSD("waited_ms", cancel_now() - t0, 0));
    return -ETIMEDOUT;
  }
  if (left > 0)
    /* Requests still being read (a client too slow to finish sending, or
     * gone unseen): closed by the daemon's stop, logged 503 or 400. */
    CANCEL_LOG(CANCEL_LOG_INFO, "http", "stop closes unfinished requests",
               CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
               CANCEL_LOG_U64("requests", left));
  pool_stop(s);
  MHD_stop_daemon(s->d);
  s->d = NULL;
  sweeper_stop(s); /* after the daemon: every connection is off its list */
  if (s->lfd != MHD_INVALID_SOCKET)
    close(s->lfd);
  s->lfd = MHD_INVALID_SOCKET;
  release_start(s);
  s->state = SRV_STOPPED;
  CANCEL_LOG(CANCEL_LOG_INFO, "http", "stopped",
             CANCEL_LOG_STRN("server", s->o.name, SERVER_NAME_MAX),
             CANCEL_LOG_MSD("waited_ms", cancel_now() - t0, 1));
  return 0;
}

int cancel_http_server_run(const cancel_token *stopping, void *arg) {
  cancel_http_server *s = arg;
  if (s == NULL)
    return -EINVAL;
  int rc = s->state == SRV_NEW ? cancel_http_server_start(s, stopping) : 0;
  if (rc < 0)
    return rc;
  (void)cancel_sleep_until(stopping, CANCEL_NEVER);
  int64_t deadline = cancel__add_sat(
      cancel_now(), cancel__add_sat(s->o.drain_timeout_ns, CANCEL_SEC(1)));
  cancel_reason why;
  int64_t host = s->o.host_shutdown_timeout_ns;
  if (host > 0 && cancel_token_reason(stopping, &why) == 1) {
    /* The host's deadline, as cancel_host_shutdown_deadline() computes
     * it, less half the margin: the stop's own report of handlers that
     * ignore their tokens comes before the host's. */
    int64_t by =
        cancel__add_sat(why.time, host - CANCEL_HTTP_DRAIN_MARGIN(host) / 2);
    if (by < deadline)
      deadline = by;
  }
  rc = cancel_http_server_stop(s, deadline);
  return rc < 0 ? rc : -ECANCELED;
}

int cancel_http_server_free(cancel_http_server *s) {
  if (s == NULL)
    return 0;
  if (s->state == SRV_RUNNING || s->state == SRV_STUCK)
    return -EBUSY;
  pthread_mutex_destroy(&s->mu);
  pthread_cond_destroy(&s->cv);
  pthread_cond_destroy(&s->done_cv);
  pthread_mutex_destroy(&s->conn_mu);
  pthread_cond_destroy(&s->sweep_cv);
  free(s->routes);
  free(s);
  return 0;
}

/* ---- Request accessors
 * ------------------------------------------------------- */

uint64_t cancel_http_request_id(const cancel_http_request *r) {
  return r != NULL ? r->id : 0;
}

const char *cancel_http_request_method(const cancel_http_request *r) {
  return r != NULL ? r->method : NULL;
}

const char *cancel_http_request_path(const cancel_http_request *r) {
  return r != NULL ? r->url : NULL;
}

const char *cancel_http_request_route(const cancel_http_request *r) {
  return r != NULL && r->route != NULL ? r->route->pattern : NULL;
}

const char *cancel_http_request_query(const cancel_http_request *r,
                                      const char *name) {
  return r != NULL && name != NULL ? kvs_get(&r->args, name, false) : NULL;
}

const char *cancel_http_request_header(const cancel_http_request *r,
                                       const char *name) {
  return r != NULL && name != NULL ? kvs_get(&r->headers, name, true) : NULL;
}

const void *cancel_http_request_body(const cancel_http_request *r,
                                     size_t *len) {
  if (len != NULL)
    *len = r != NULL ? r->body_len : 0;
  return r != NULL ? r->body : NULL;
}

/* ---- The handler's own tokens ------------------------------------------- */

int cancel_http_request_timeout_new(cancel_http_request *r,
                                    cancel_source **srcp, const char *name,
                                    int64_t timeout_ns) {
  if (srcp != NULL)
    *srcp = NULL;
  if (r == NULL || srcp == NULL || timeout_ns < 0)
    return -EINVAL;
  if (r->nown == r->own_cap) {
    size_t cap = r->own_cap ? 2 * r->own_cap : 4;
    cancel_source **a = realloc(r->own, cap * sizeof *a);
    if (a == NULL)
      return -ENOMEM;
    r->own = a;
    r->own_cap = cap;
  }
  cancel_source *src;
  int rc = cancel_source_new_timeout(&src, name, r->tok, timeout_ns);
  if (rc < 0)
    return rc;
  r->own[r->nown++] = cancel_source_ref(src);
  *srcp = src;
  return 0;
}

int cancel_http_request_cancelled(cancel_http_request *r,
                                  const cancel_token *tok) {
  if (r == NULL || tok == NULL)
    return -EINVAL;
  settle(tok);
  cancel_reason why, req;
  if (cancel_token_reason(tok, &why) != 1)
    return -EINVAL;
  r->told = true;
  r->told_kind = why.kind;
  r->told_time = why.time;
  /* A token derived from the request's that fired because the request's
   * did: the parent is cancelled before its children, so the request's
   * reason is readable now, and it is the same cancellation. */
  r->told_through = r->tok != NULL && cancel_token_reason(r->tok, &req) == 1 &&
                    same_cancellation(&why, &req);
  snprintf(r->told_origin, sizeof r->told_origin, "%s", why.origin);
  cancel_logfmt_reason(r->cancel_fields, sizeof r->cancel_fields, &why);
  return -ECANCELED;
}
