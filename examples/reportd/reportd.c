/*
 * reportd: the reference service (see README.md beside this file).
 *
 * One token per request, made by libcancel-http from the client's
 * connection, the route's timeout, the caller's deadline header and the
 * host's stopping token, goes everywhere the request waits or works: the
 * downstream call (libcancel-curl), the query (libcancel-sqlite or -pq),
 * the aggregation loop.  Nothing here decides what a cancellation means:
 * handlers return -ECANCELED and the edge answers by the reason.
 */
#define _GNU_SOURCE
#include "number.h"
#include "store.h"

#include <cancel.h>
#include <cancel/curl.h>
#include <cancel/diag.h>
#include <cancel/host.h>
#include <cancel/http.h>
#include <cancel/log.h>
#include <cancel/watch.h>

#include <curl/curl.h>
#include <errno.h>
#include <getopt.h>
#include <inttypes.h>
#include <jansson.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* ---- Configuration --------------------------------------------------------
 */

struct config {
  long port;
  const char *bind;
  const char *db;
  const char *pg;
  const char *downstream;
  long route_timeout_ms, downstream_timeout_ms, shutdown_timeout_ms, drain_ms,
      threads, poll_ms;
  long rows, work, commit_delay_ms, watchdog_ms;
  long header_timeout_ms, body_timeout_ms, idle_timeout_ms, max_conns,
      max_conns_per_ip;
  long job_attempts, job_backoff_ms, job_backoff_max_ms, job_timeout_ms;
  bool ignore_tokens, no_cancellation, seeded_bug, no_diagnostics;
};

static const char usage[] =
    "usage: reportd [options]\n"
    "  --port N              REPORTD_PORT (8080; 0: any free port)\n"
    "  --bind ADDR           REPORTD_BIND (127.0.0.1)\n"
    "  --db PATH             REPORTD_DB, SQLite file (./reportd.db)\n"
    "  --pg CONNINFO         REPORTD_PG, PostgreSQL instead of SQLite\n"
    "  --downstream URL      REPORTD_DOWNSTREAM (http://127.0.0.1:8081)\n"
    "  --route-timeout MS    REPORTD_ROUTE_TIMEOUT_MS (2000)\n"
    "  --downstream-timeout MS REPORTD_DOWNSTREAM_TIMEOUT_MS, the downstream\n"
    "                        call's own timeout (0: none, the request's budget)\n"
    "  --shutdown-timeout MS REPORTD_SHUTDOWN_TIMEOUT_MS (30000)\n"
    "  --drain MS            REPORTD_DRAIN_MS (the server's: shutdown\n"
    "                        timeout - a second; longer is refused)\n"
    "  --threads N           REPORTD_THREADS (16)\n"
    "  --poll MS             REPORTD_POLL_MS (500)\n"
    "  --header-timeout MS   REPORTD_HEADER_TIMEOUT_MS, a request's line and\n"
    "                        headers in total, from the accept (10000)\n"
    "  --body-timeout MS     REPORTD_BODY_TIMEOUT_MS, its body in total "
    "(60000)\n"
    "  --idle-timeout MS     REPORTD_IDLE_TIMEOUT_MS, a connection with no\n"
    "                        traffic, keep-alive included (60000)\n"
    "  --max-connections N   REPORTD_MAX_CONNECTIONS, open at once (4096)\n"
    "  --max-connections-per-ip N\n"
    "                        REPORTD_MAX_CONNECTIONS_PER_IP (256; 0: no "
    "limit,\n"
    "                        e.g. behind a reverse proxy)\n"
    "  --rows N              REPORTD_ROWS, rows per report when seeding "
    "(2000)\n"
    "  --work N              REPORTD_WORK, CPU work per row (20000)\n"
    "  --commit-delay MS     REPORTD_COMMIT_DELAY_MS, slow job COMMIT (0)\n"
    "  --job-attempts N      REPORTD_JOB_ATTEMPTS, attempts before a job\n"
    "                        fails (5)\n"
    "  --job-backoff MS      REPORTD_JOB_BACKOFF_MS, the wait after a job's\n"
    "                        first failed attempt, doubled after each next\n"
    "                        one, with jitter (1000)\n"
    "  --job-backoff-max MS  REPORTD_JOB_BACKOFF_MAX_MS, its cap (60000)\n"
    "  --job-timeout MS      REPORTD_JOB_TIMEOUT_MS, one attempt's budget\n"
    "                        (30000)\n"
    "  --watchdog MS         REPORTD_WATCHDOG_MS, report work still running\n"
    "                        this long after its cancel (100; 0: off)\n"
    "  --seeded-bug          serve GET /buggy/reports/{id}, whose aggregation\n"
    "                        ignores its token (for the watchdog demo)\n"
    "  --ignore-tokens       pass no token anywhere (benchmarks)\n"
    "  --no-cancellation     HTTP server without its plumbing (benchmarks)\n"
    "  --no-diagnostics      no work scopes, no watchdog (benchmarks)\n"
    "  --help\n";

/* A number option: from the flag, else the environment, else the default.
 * Returns false (with a message) when it does not parse or is out of
 * range. */
static bool number(const char *name, const char *text, long lo, long hi,
                   long *out) {
  if (text == NULL)
    return true;
  if (!parse_number(text, lo, hi, out)) {
    fprintf(stderr, "reportd: %s: '%s' is not a number in %ld..%ld\n", name,
            text, lo, hi);
    return false;
  }
  return true;
}

static bool configure(int argc, char **argv, struct config *c) {
  *c = (struct config){.port = 8080,
                       .bind = "127.0.0.1",
                       .db = "reportd.db",
                       .downstream = "http://127.0.0.1:8081",
                       .route_timeout_ms = 2000,
                       .shutdown_timeout_ms = 30000,
                       .drain_ms = 0, /* the server derives it */
                       .threads = 16,
                       .poll_ms = 500,
                       .rows = 2000,
                       .work = 20000,
                       .watchdog_ms = 100,
                       .header_timeout_ms = 10000,
                       .body_timeout_ms = 60000,
                       .idle_timeout_ms = 60000,
                       .max_conns = 4096,
                       .max_conns_per_ip = 256,
                       .job_attempts = 5,
                       .job_backoff_ms = 1000,
                       .job_backoff_max_ms = 60000,
                       .job_timeout_ms = 30000};
  /* The environment first, the flags over it. */
  static const struct {
    const char *env, *flag;
    long lo, hi;
    size_t off;
  } nums[] = {
      {"REPORTD_PORT", "port", 0, 65535, offsetof(struct config, port)},
      {"REPORTD_ROUTE_TIMEOUT_MS", "route-timeout", 1, 3600000,
       offsetof(struct config, route_timeout_ms)},
      {"REPORTD_DOWNSTREAM_TIMEOUT_MS", "downstream-timeout", 0, 3600000,
       offsetof(struct config, downstream_timeout_ms)},
      {"REPORTD_SHUTDOWN_TIMEOUT_MS", "shutdown-timeout", 100, 3600000,
       offsetof(struct config, shutdown_timeout_ms)},
      {"REPORTD_DRAIN_MS", "drain", 1, 3600000,
       offsetof(struct config, drain_ms)},
      {"REPORTD_THREADS", "threads", 1, 1024, offsetof(struct config, threads)},
      {"REPORTD_POLL_MS", "poll", 1, 3600000, offsetof(struct config, poll_ms)},
      {"REPORTD_ROWS", "rows", 1, 10000000, offsetof(struct config, rows)},
      {"REPORTD_WORK", "work", 0, 100000000, offsetof(struct config, work)},
      {"REPORTD_COMMIT_DELAY_MS", "commit-delay", 0, 600000,
       offsetof(struct config, commit_delay_ms)},
      {"REPORTD_WATCHDOG_MS", "watchdog", 0, 3600000,
       offsetof(struct config, watchdog_ms)},
      {"REPORTD_HEADER_TIMEOUT_MS", "header-timeout", 1, 3600000,
       offsetof(struct config, header_timeout_ms)},
      {"REPORTD_BODY_TIMEOUT_MS", "body-timeout", 1, 3600000,
       offsetof(struct config, body_timeout_ms)},
      {"REPORTD_IDLE_TIMEOUT_MS", "idle-timeout", 1, 3600000,
       offsetof(struct config, idle_timeout_ms)},
      {"REPORTD_MAX_CONNECTIONS", "max-connections", 1, 1000000,
       offsetof(struct config, max_conns)},
      {"REPORTD_MAX_CONNECTIONS_PER_IP", "max-connections-per-ip", 0, 1000000,
       offsetof(struct config, max_conns_per_ip)},
      {"REPORTD_JOB_ATTEMPTS", "job-attempts", 1, 1000,
       offsetof(struct config, job_attempts)},
      {"REPORTD_JOB_BACKOFF_MS", "job-backoff", 1, 86400000,
       offsetof(struct config, job_backoff_ms)},
      {"REPORTD_JOB_BACKOFF_MAX_MS", "job-backoff-max", 1, 86400000,
       offsetof(struct config, job_backoff_max_ms)},
      {"REPORTD_JOB_TIMEOUT_MS", "job-timeout", 1, 3600000,
       offsetof(struct config, job_timeout_ms)},
  };
  for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++)
    if (!number(nums[i].env, getenv(nums[i].env), nums[i].lo, nums[i].hi,
                (long *)((char *)c + nums[i].off)))
      return false;
  if (getenv("REPORTD_BIND"))
    c->bind = getenv("REPORTD_BIND");
  if (getenv("REPORTD_DB"))
    c->db = getenv("REPORTD_DB");
  if (getenv("REPORTD_PG"))
    c->pg = getenv("REPORTD_PG");
  if (getenv("REPORTD_DOWNSTREAM"))
    c->downstream = getenv("REPORTD_DOWNSTREAM");

  enum {
    O_BIND = 1000,
    O_DB,
    O_PG,
    O_DOWN,
    O_IGNORE,
    O_PLAIN,
    O_BUG,
    O_NODIAG,
    O_HELP,
    O_NUM
  };
  struct option longs[32];
  size_t n = 0;
  for (size_t i = 0; i < sizeof nums / sizeof nums[0]; i++)
    longs[n++] =
        (struct option){nums[i].flag, required_argument, NULL, O_NUM + (int)i};
  longs[n++] = (struct option){"bind", required_argument, NULL, O_BIND};
  longs[n++] = (struct option){"db", required_argument, NULL, O_DB};
  longs[n++] = (struct option){"pg", required_argument, NULL, O_PG};
  longs[n++] = (struct option){"downstream", required_argument, NULL, O_DOWN};
  longs[n++] = (struct option){"ignore-tokens", no_argument, NULL, O_IGNORE};
  longs[n++] = (struct option){"no-cancellation", no_argument, NULL, O_PLAIN};
  longs[n++] = (struct option){"seeded-bug", no_argument, NULL, O_BUG};
  longs[n++] = (struct option){"no-diagnostics", no_argument, NULL, O_NODIAG};
  longs[n++] = (struct option){"help", no_argument, NULL, O_HELP};
  longs[n] = (struct option){NULL, 0, NULL, 0};
  int opt;
  while ((opt = getopt_long(argc, argv, "", longs, NULL)) != -1) {
    switch (opt) {
    case O_BIND:
      c->bind = optarg;
      break;
    case O_DB:
      c->db = optarg;
      break;
    case O_PG:
      c->pg = optarg;
      break;
    case O_DOWN:
      c->downstream = optarg;
      break;
    case O_IGNORE:
      c->ignore_tokens = true;
      break;
    case O_PLAIN:
      c->no_cancellation = true;
      break;
    case O_BUG:
      c->seeded_bug = true;
      break;
    case O_NODIAG:
      c->no_diagnostics = true;
      c->watchdog_ms = 0;
      break;
    case O_HELP:
      fputs(usage, stdout);
      exit(0);
    default:
      if (opt >= O_NUM && opt < O_NUM + (int)(sizeof nums / sizeof nums[0])) {
        size_t i = (size_t)(opt - O_NUM);
        if (!number(nums[i].flag, optarg, nums[i].lo, nums[i].hi,
                    (long *)((char *)c + nums[i].off)))
          return false;
        break;
      }
      fputs(usage, stderr);
      return false;
    }
  }
  if (optind < argc) {
    fprintf(stderr, "reportd: unexpected argument '%s'\n%s", argv[optind],
            usage);
    return false;
  }
  /* --drain is checked against --shutdown-timeout by the server, which
   * knows the margin (cancel_http_server_new refuses a drain that would
   * outlast the host's shutdown, and logs both values). */
  return true;
}

/* ---- The service ------------------------------------------------------------
 */

struct service {
  struct config cfg;
  store *db;
  cancel_http_server *http;
  cancel_host *host;
};

/* The token a call gets: none at all with --ignore-tokens (the "before"
 * picture the benchmarks compare with). */
static const cancel_token *pass(const struct service *s,
                                const cancel_token *tok) {
  return s->cfg.ignore_tokens ? NULL : tok;
}

/* A response body as it comes in; a downstream sending more than this is
 * broken, not slow. */
#define BODY_MAX (16u << 20)

struct body {
  char *buf;
  size_t len, cap;
};

static size_t body_write(char *p, size_t size, size_t n, void *arg) {
  struct body *b = arg;
  size_t len = size * n;
  if (len > BODY_MAX - b->len)
    return 0; /* too large: curl fails the transfer */
  if (b->len + len > b->cap) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap < b->len + len)
      cap *= 2;
    char *buf = realloc(b->buf, cap);
    if (buf == NULL)
      return 0;
    b->buf = buf;
    b->cap = cap;
  }
  memcpy(b->buf + b->len, p, len);
  b->len += len;
  return len;
}

/* What went wrong, in words, for a log line and a job's last_error.  Only
 * printable ASCII is kept (the rest becomes '?'): jansson's messages quote
 * the bytes they choked on, and those come from the downstream. */
static void say(char *why, size_t len, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));
static void say(char *why, size_t len, const char *fmt, ...) {
  if (why == NULL || len == 0)
    return;
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(why, len, fmt, ap);
  va_end(ap);
  for (char *c = why; *c != '\0'; c++)
    if (*c < 0x20 || *c > 0x7e)
      *c = '?';
}

/* The downstream call's token: tok, or with --downstream-timeout a source
 * of its own derived from tok ("downstream call"), which *callp then
 * holds (drop it after the call).  In a request (req not NULL) the
 * source is made through the request, so that the edge answers its
 * timeout as the 504 it is, naming it, rather than a -ECANCELED from a
 * token it never saw fire (cancel_http_request_timeout_new). */
static int call_token(const struct service *s, cancel_http_request *req,
                      const cancel_token *tok, cancel_source **callp,
                      const cancel_token **out) {
  *callp = NULL;
  *out = tok;
  if (s->cfg.downstream_timeout_ms == 0)
    return 0;
  int64_t t = CANCEL_MSEC(s->cfg.downstream_timeout_ms);
  int rc = req != NULL
               ? cancel_http_request_timeout_new(req, callp, "downstream call",
                                                 t)
               : cancel_source_new_timeout(callp, "downstream call", tok, t);
  if (rc == 0)
    *out = cancel_source_token(*callp);
  return rc;
}

/* GET <downstream>/meta/<id>: the report's title, into *title (free() it;
 * *tlen bytes, NUL bytes possible).  req: the request it is for, NULL for
 * the background job.  Returns -ENOENT for a 404, -EINVAL for
 * another 4xx (our request is wrong: asking again will not help), -EPROTO
 * for a 5xx or another status (the downstream may recover), -EBADMSG for a
 * 200 whose body is not the JSON object we expect, the adapter's errors
 * otherwise; `why` says it in words. */
static int fetch_metadata(const struct service *s, cancel_http_request *req,
                          const cancel_token *reqtok, long id, long delay_ms,
                          char **title, size_t *tlen, char *why,
                          size_t whylen) {
  cancel_source *call;
  const cancel_token *tok;
  int rc = call_token(s, req, reqtok, &call, &tok);
  if (rc < 0) {
    say(why, whylen, "cannot arm the downstream call's timeout: %s",
        cancel_strerror(rc));
    return rc;
  }
  CURL *e = curl_easy_init();
  if (e == NULL) {
    cancel_source_unref(call);
    return -ENOMEM;
  }
  char url[512];
  snprintf(url, sizeof url, "%s/meta/%ld?delay_ms=%ld", s->cfg.downstream, id,
           delay_ms);
  struct body b = {0};
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, body_write);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  rc = cancel_curl_perform(tok, e);
  long status = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(e);
  if (rc == 0 && status == 504 &&
      cancel_token_settle(tok, CANCEL_MSEC(50)) == -ECANCELED) {
    /* The downstream gave up on the budget we sent it, which is ours: our
     * own deadline is at most 50 ms away (its clock and the trip back).
     * Settled with our timer, so that the edge names our timeout, not a
     * downstream failure. */
    rc = -ECANCELED;
  }
  /* The call's source is no longer needed: the request holds its own
   * reference for the edge (the job's is dropped here). */
  cancel_source_unref(call);
  if (rc < 0) {
    say(why, whylen, "downstream: %s", cancel_strerror(rc));
  } else if (status == 404) {
    rc = -ENOENT;
    say(why, whylen, "downstream: 404, no such report");
  } else if (status != 200) {
    rc = status >= 400 && status < 500 ? -EINVAL : -EPROTO;
    say(why, whylen, "downstream: HTTP %ld", status);
  } else {
    /* {"id":42,"title":"Report 42"}: the title's value, whatever bytes it
     * holds (NUL too: JSON_ALLOW_NUL), checked as UTF-8 by jansson. */
    json_error_t err;
    json_t *root =
        json_loadb(b.buf != NULL ? b.buf : "", b.len, JSON_ALLOW_NUL, &err);
    json_t *t = json_object_get(root, "title");
    if (root == NULL) {
      rc = -EBADMSG;
      say(why, whylen, "downstream sent invalid JSON: %s (at byte %d)",
          err.text, err.position);
    } else if (!json_is_string(t)) {
      rc = -EBADMSG;
      say(why, whylen, "downstream sent JSON without a string title");
    } else {
      *tlen = json_string_length(t);
      if ((*title = malloc(*tlen + 1)) == NULL) {
        rc = -ENOMEM;
      } else {
        memcpy(*title, json_string_value(t), *tlen + 1);
      }
    }
    json_decref(root);
  }
  free(b.buf);
  return rc;
}

struct report {
  long id, rows;
  double sum, max;
  uint64_t digest;
  char *title; /* title_len bytes of UTF-8 (malloc()) */
  size_t title_len;
};

/* The CPU part: a mixing loop per row standing in for real aggregation
 * work, with a look at the token before each row (one load: nothing next
 * to a row's work). */
static int aggregate(const cancel_token *tok, const double *v, size_t n,
                     long work, struct report *out) {
  double sum = 0, max = 0;
  uint64_t digest = 0;
  for (size_t i = 0; i < n; i++) {
    if (cancel_token_is_cancelled(tok))
      return -ECANCELED;
    uint64_t x = (uint64_t)(v[i] * 100.0) + 0x9e3779b97f4a7c15u;
    for (long k = 0; k < work; k++)
      x = (x ^ (x >> 31)) * 0xbf58476d1ce4e5b9u;
    digest ^= x; /* in the answer: the loop cannot be optimised away */
    sum += v[i];
    if (v[i] > max)
      max = v[i];
  }
  out->rows = (long)n;
  out->sum = sum;
  out->max = max;
  out->digest = digest;
  return 0;
}

/* THE SEEDED BUG (served only with --seeded-bug): the same aggregation
 * with the token dropped on the way down, the mistake the watchdog is
 * there to find.  Not static, so that the watchdog's stack names it. */
__attribute__((noinline)) int aggregate_ignoring_token(const double *v,
                                                       size_t n, long work,
                                                       struct report *out) {
  return aggregate(NULL, v, n, work, out);
}

/* The service method: one token, passed to every step.  On success the
 * caller frees out->title; `why` (may be NULL) says what failed. */
static int build_report(const struct service *s, cancel_http_request *req,
                        const cancel_token *tok, long id, long delay_ms,
                        bool buggy, struct report *out, char *why,
                        size_t whylen) {
  *out = (struct report){.id = id};
  int rc = fetch_metadata(s, req, tok, id, delay_ms, &out->title,
                          &out->title_len, why, whylen);
  if (rc < 0)
    return rc;
  double *v = NULL;
  size_t n = 0;
  rc = store_load_rows(s->db, tok, id, &v, &n);
  if (rc == 0) {
    rc = buggy ? aggregate_ignoring_token(v, n, s->cfg.work, out)
               : aggregate(tok, v, n, s->cfg.work, out);
    free(v);
  } else if (rc == -ENOENT) {
    say(why, whylen, "no rows for report %ld", id);
  } else {
    say(why, whylen, "database: %s", cancel_strerror(rc));
  }
  if (rc < 0) {
    free(out->title);
    out->title = NULL;
  }
  return rc;
}

/* x rounded to cents, as a double: what the report shows. */
static double cents(double x) {
  char text[64];
  snprintf(text, sizeof text, "%.2f", x);
  return strtod(text, NULL);
}

/* The report as JSON, or NULL (out of memory). */
static json_t *report_object(const struct report *r) {
  char digest[17];
  snprintf(digest, sizeof digest, "%016" PRIx64, r->digest);
  return json_pack("{s:I,s:s%,s:I,s:f,s:f,s:s}", "id", (json_int_t)r->id,
                   "title", r->title, r->title_len, "rows", (json_int_t)r->rows,
                   "sum", cents(r->sum), "max", cents(r->max), "digest",
                   digest);
}

/* The text of a JSON value: compact, reals with up to 15 significant
 * digits (cents print as cents).  NULL: out of memory. */
static char *dump(const json_t *v) {
  return v != NULL ? json_dumps(v, JSON_COMPACT | JSON_REAL_PRECISION(15))
                   : NULL;
}

/* Answers obj (whose reference this call takes over, NULL: out of memory)
 * as JSON, with the newline the bodies have always ended with. */
static int respond_json(cancel_http_request *req, unsigned status,
                        json_t *obj) {
  char *text = dump(obj);
  json_decref(obj);
  if (text == NULL)
    return -ENOMEM;
  size_t n = strlen(text);
  char *body = realloc(text, n + 2);
  if (body == NULL) {
    free(text);
    return -ENOMEM;
  }
  memcpy(body + n, "\n", 2);
  int rc = cancel_http_respond(req, status, "application/json", body, n + 1);
  free(body);
  return rc;
}

static int respond_text(cancel_http_request *req, unsigned status,
                        const char *text) {
  return cancel_http_respond(req, status, "text/plain; charset=utf-8", text,
                             strlen(text));
}

/* A route capture as a number: one spelling only ("5", not " 5", "+5" or
 * "05"; see cancel_http_request_param_u64). */
static bool param_number(cancel_http_request *req, const char *name, long hi,
                         long *out) {
  uint64_t v;
  if (cancel_http_request_param_u64(req, name, (uint64_t)hi, &v) < 0)
    return false;
  *out = (long)v;
  return true;
}

static int report(cancel_http_request *req, const cancel_token *tok,
                  struct service *s, bool buggy) {
  long id, delay = 0;
  if (!param_number(req, "id", 1000000000, &id))
    return respond_text(req, 400, "report id: a number\n");
  const char *d = cancel_http_request_query(req, "downstream_delay_ms");
  if (d != NULL && !parse_number(d, 0, 600000, &delay))
    return respond_text(req, 400, "downstream_delay_ms: 0..600000\n");
  struct report r;
  char why[256] = "";
  /* --ignore-tokens drops the request from the chain too: no source of
   * the downstream call may hang on the request's token then. */
  int rc = build_report(s, s->cfg.ignore_tokens ? NULL : req, pass(s, tok), id,
                        delay, buggy, &r, why, sizeof why);
  if (rc == -ENOENT)
    return respond_text(req, 404, "no such report\n");
  if (rc == -ECONNREFUSED || rc == -EPROTO || rc == -EHOSTUNREACH ||
      rc == -EINVAL || rc == -EBADMSG) {
    CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "downstream failed",
               CANCEL_LOG_U64("id", cancel_http_request_id(req)),
               CANCEL_LOG_STRN("error", why, 300));
    return respond_text(req, 502, "downstream failed\n");
  }
  if (rc < 0)
    return rc; /* -ECANCELED and the rest: the edge answers */
  json_t *o = report_object(&r);
  free(r.title);
  return respond_json(req, 200, o);
}

static int h_report(cancel_http_request *req, const cancel_token *tok,
                    void *arg) {
  return report(req, tok, arg, false);
}

static int h_buggy_report(cancel_http_request *req, const cancel_token *tok,
                          void *arg) {
  return report(req, tok, arg, true);
}

/* Prometheus' text format: libcancel's metrics. */
static int h_metrics(cancel_http_request *req, const cancel_token *tok,
                     void *arg) {
  (void)tok;
  (void)arg;
  char *text = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&text, &len);
  if (f == NULL)
    return -ENOMEM;
  int rc = cancel_metrics_write_prometheus(f);
  if (fclose(f) != 0 && rc == 0)
    rc = -EIO;
  if (rc == 0)
    rc = cancel_http_respond(req, 200, "text/plain; version=0.0.4", text, len);
  free(text);
  return rc;
}

static int h_scan(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  struct service *s = arg;
  long n, count = 0;
  if (!param_number(req, "n", 1000000000000L, &n))
    return respond_text(req, 400, "n: a number\n");
  int rc = store_scan(s->db, pass(s, tok), n, &count);
  if (rc < 0)
    return rc;
  return respond_json(req, 200, json_pack("{s:I}", "count", (json_int_t)count));
}

static int h_health(cancel_http_request *req, const cancel_token *tok,
                    void *arg) {
  (void)tok;
  (void)arg;
  return respond_text(req, 200, "ok\n");
}

static int h_job_add(cancel_http_request *req, const cancel_token *tok,
                     void *arg) {
  struct service *s = arg;
  long report, job;
  if (!parse_number(cancel_http_request_query(req, "report"), 0, 1000000000,
                    &report))
    return respond_text(req, 400, "report: a number\n");
  int rc = store_job_add(s->db, pass(s, tok), report, &job);
  if (rc < 0)
    return rc;
  return respond_json(req, 202, json_pack("{s:I}", "job", (json_int_t)job));
}

/* A Unix time in milliseconds as RFC 3339 (UTC, milliseconds), or JSON
 * null for -1 (not recorded: a job from an older reportd). */
static json_t *timestamp(int64_t ms) {
  if (ms < 0)
    return json_null();
  time_t t = (time_t)(ms / 1000);
  struct tm tm;
  char text[40];
  if (gmtime_r(&t, &tm) == NULL)
    return json_null();
  size_t n = strftime(text, sizeof text, "%Y-%m-%dT%H:%M:%S", &tm);
  snprintf(text + n, sizeof text - n, ".%03dZ", (int)(ms % 1000));
  return json_string(text);
}

/* A text column as JSON: its string, or null (none, or not UTF-8). */
static json_t *text_or_null(const char *v) {
  json_t *j = v != NULL ? json_string(v) : NULL;
  return j != NULL ? j : json_null();
}

static int h_job_get(cancel_http_request *req, const cancel_token *tok,
                     void *arg) {
  struct service *s = arg;
  long id;
  if (!param_number(req, "job", 1000000000000L, &id))
    return respond_text(req, 400, "job: a number\n");
  struct store_job j;
  int rc = store_job_get(s->db, pass(s, tok), id, &j);
  if (rc == -ENOENT)
    return respond_text(req, 404, "no such job\n");
  if (rc < 0)
    return rc;
  bool pending = strcmp(j.state, "pending") == 0;
  json_t *result =
      j.result != NULL ? json_loads(j.result, JSON_ALLOW_NUL, NULL) : NULL;
  /* "o": each value's reference goes to the object (or is dropped when
   * the pack fails); a NULL value fails it: out of memory. */
  json_t *o = json_pack(
      "{s:I,s:I,s:s,s:I,s:I,s:o,s:o,s:o,s:o,s:o}", "job", (json_int_t)id,
      "report", (json_int_t)j.report, "state", j.state, "attempts",
      (json_int_t)j.attempts, "max_attempts", (json_int_t)s->cfg.job_attempts,
      "last_error", text_or_null(j.error), "created_at",
      timestamp(j.created_ms), "updated_at", timestamp(j.updated_ms),
      "next_attempt_at", pending ? timestamp(j.next_ms) : json_null(), "result",
      result != NULL ? result : json_null());
  store_job_clear(&j);
  return respond_json(req, 200, o);
}

static int h_in_flight(cancel_http_request *req, const cancel_token *tok,
                       void *arg) {
  (void)tok;
  struct service *s = arg;
  char text[32];
  size_t n = cancel_http_server_in_flight(s->http);
  snprintf(text, sizeof text, "%zu\n", n > 0 ? n - 1 : 0);
  return respond_text(req, 200, text);
}

/* ---- The jobs worker
 * ---------------------------------------------------------- */

/* An error that another attempt would meet again: the downstream does not
 * know the report (404) or refuses our request (another 4xx), sent what
 * is not a report's JSON, or there are no rows.  Everything else (a 5xx,
 * a refused connection, a timeout, the database) may pass. */
static bool permanent(int rc) {
  return rc == -ENOENT || rc == -EINVAL || rc == -EBADMSG;
}

/* The wait before attempt `attempts + 1`, after `attempts` failed ones:
 * the base doubled per failure, capped, then "equal jitter" (a uniform
 * draw from its upper half), so that jobs that failed together do not
 * all come back together, and none comes back sooner than half its
 * wait. */
static int64_t backoff_ms(const struct config *c, long attempts,
                          uint64_t *rng) {
  int64_t d = c->job_backoff_ms;
  for (long i = 1; i < attempts && d < c->job_backoff_max_ms; i++)
    d *= 2;
  if (d > c->job_backoff_max_ms)
    d = c->job_backoff_max_ms;
  /* xorshift64: jitter needs no more. */
  *rng ^= *rng << 13;
  *rng ^= *rng >> 7;
  *rng ^= *rng << 17;
  return d - d / 2 + (int64_t)(*rng % (uint64_t)(d / 2 + 1));
}

/* One attempt at job `job`, on a token of its own: the stopping token
 * with the attempt's timeout.  Returns 0 (done), -ECANCELED (stopping:
 * the job stays as it was, to be tried again after a restart), or the
 * attempt's error with `why` set (the attempt's timeout is -ETIMEDOUT). */
static int job_attempt(struct service *s, const cancel_token *stopping,
                       long job, long report, long attempt, char *why,
                       size_t whylen) {
  cancel_source *src = NULL;
  int rc = cancel_source_new_timeout(&src, "job attempt", stopping,
                                     CANCEL_MSEC(s->cfg.job_timeout_ms));
  if (rc < 0) {
    say(why, whylen, "cannot arm the attempt's timeout: %s",
        cancel_strerror(rc));
    return rc;
  }
  const cancel_token *tok = pass(s, cancel_source_token(src));
  struct report r;
  rc = build_report(s, NULL, tok, report, 0, false, &r, why, whylen);
  if (rc == 0) {
    json_t *o = report_object(&r);
    char *body = dump(o);
    json_decref(o);
    free(r.title);
    rc = body != NULL ? store_job_finish(s->db, tok, job, report, attempt, body)
                      : -ENOMEM;
    free(body);
    if (rc < 0 && rc != -ECANCELED)
      say(why, whylen, "database: %s", cancel_strerror(rc));
  }
  if (rc == -ECANCELED && !cancel_token_is_cancelled(stopping)) {
    rc = -ETIMEDOUT;
    say(why, whylen, "attempt timed out after %ld ms", s->cfg.job_timeout_ms);
  }
  cancel_source_unref(src);
  return rc;
}

static int jobs_worker(const cancel_token *stopping, void *arg) {
  struct service *s = arg;
  const struct config *c = &s->cfg;
  const cancel_token *tok = pass(s, stopping);
  uint64_t rng = (uint64_t)cancel_now() ^ ((uint64_t)getpid() << 32) ^ 1;
  for (;;) {
    long job, report, attempts;
    int64_t wait_ms = -1;
    int rc = store_job_next(s->db, tok, &job, &report, &attempts, &wait_ms);
    if (rc == -ENOENT) {
      /* Nothing due: sleep until the first job in its backoff is due, or
       * a poll's time for new ones.  The cancellable sleep is the whole
       * shutdown story of an idle worker, backoffs included. */
      if (wait_ms < 0 || wait_ms > c->poll_ms)
        wait_ms = c->poll_ms;
      rc = cancel_sleep(stopping, CANCEL_MSEC(wait_ms > 0 ? wait_ms : 1));
      if (rc == -ECANCELED)
        return -ECANCELED;
      continue;
    }
    if (rc == -ECANCELED)
      return -ECANCELED;
    if (rc < 0) {
      CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "jobs poll failed",
                 CANCEL_LOG_STR("error", cancel_strerror(rc)));
      if (cancel_sleep(stopping, CANCEL_MSEC(c->poll_ms)) == -ECANCELED)
        return -ECANCELED;
      continue;
    }
    int64_t t0 = cancel_now();
    long attempt = attempts + 1;
    char of[48]; /* "2/3": the attempt and how many there may be */
    snprintf(of, sizeof of, "%ld/%ld", attempt, c->job_attempts);
    CANCEL_LOG(CANCEL_LOG_INFO, "reportd", "job started",
               CANCEL_LOG_I64("job", job), CANCEL_LOG_I64("report", report),
               CANCEL_LOG_STR("attempt", of));
    char why[256] = "";
    rc = job_attempt(s, stopping, job, report, attempt, why, sizeof why);
    int64_t dur = cancel_now() - t0;
    if (rc == 0) {
      CANCEL_LOG(
          CANCEL_LOG_INFO, "reportd", "job committed",
          CANCEL_LOG_I64("job", job), CANCEL_LOG_I64("report", report),
          CANCEL_LOG_I64("attempt", attempt), CANCEL_LOG_MSD("dur_ms", dur, 1),
          CANCEL_LOG_I64("stopping", cancel_token_is_cancelled(stopping)));
      continue;
    }
    if (rc == -ECANCELED) {
      CANCEL_LOG(CANCEL_LOG_INFO, "reportd", "job cancelled",
                 CANCEL_LOG_I64("job", job), CANCEL_LOG_I64("report", report),
                 CANCEL_LOG_MSD("dur_ms", dur, 1),
                 CANCEL_LOG_STR("state", "pending"));
      return -ECANCELED;
    }
    /* A failed attempt: one warning each, the last one saying the job
     * failed.  The job is put back with the time of its next attempt, so
     * the worker goes on with the jobs behind it meanwhile. */
    bool final = permanent(rc) || attempt >= c->job_attempts;
    int64_t retry = final ? -1 : backoff_ms(c, attempt, &rng);
    if (final)
      CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "job failed",
                 CANCEL_LOG_I64("job", job), CANCEL_LOG_I64("report", report),
                 CANCEL_LOG_I64("attempts", attempt),
                 CANCEL_LOG_STRN("error", why, 300),
                 CANCEL_LOG_I64("permanent", permanent(rc)),
                 CANCEL_LOG_MSD("dur_ms", dur, 1));
    else
      CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "job attempt failed",
                 CANCEL_LOG_I64("job", job), CANCEL_LOG_I64("report", report),
                 CANCEL_LOG_STR("attempt", of),
                 CANCEL_LOG_STRN("error", why, 300),
                 CANCEL_LOG_I64("retry_in_ms", retry),
                 CANCEL_LOG_MSD("dur_ms", dur, 1));
    rc = store_job_attempt_failed(s->db, tok, job, attempt, why, retry);
    if (rc == -ECANCELED)
      return -ECANCELED;
    if (rc < 0) {
      CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "job state not stored",
                 CANCEL_LOG_I64("job", job),
                 CANCEL_LOG_STR("error", cancel_strerror(rc)));
      if (cancel_sleep(stopping, CANCEL_MSEC(c->poll_ms)) == -ECANCELED)
        return -ECANCELED;
    }
  }
}

/* ---- main
 * ------------------------------------------------------------------------ */

int main(int argc, char **argv) {
  /* Before any thread exists (libcurl, the HTTP server, the reactor):
   * every thread inherits the mask, so SIGTERM reaches the host. */
  cancel_signals_block();
  struct service svc = {.db = NULL};
  if (!configure(argc, argv, &svc.cfg))
    return 1;
  const struct config *c = &svc.cfg;
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    fprintf(stderr, "reportd: curl_global_init failed\n");
    return 1;
  }
  struct store_config sc = {.sqlite_path = c->db,
                            .pg_conninfo = c->pg,
                            .rows_per_report = c->rows,
                            .commit_delay_ms = c->commit_delay_ms};
  int rc = store_open(&svc.db, &sc);
  if (rc < 0) {
    fprintf(stderr, "reportd: database: %s\n", cancel_strerror(rc));
    cancel_curl_thread_cleanup();
    curl_global_cleanup();
    return 1;
  }

  cancel_host_options ho = {.shutdown_timeout_ns =
                                CANCEL_MSEC(c->shutdown_timeout_ms)};
  rc = cancel_host_new(&svc.host, "reportd", &ho);
  const cancel_http_route routes[] = {
      {"GET", "/reports/{id}", h_report, &svc,
       CANCEL_MSEC(c->route_timeout_ms)},
      {"GET", "/scan/{n}", h_scan, &svc, CANCEL_MSEC(c->route_timeout_ms)},
      {"GET", "/health", h_health, &svc, 0},
      {"POST", "/jobs", h_job_add, &svc, 0},
      {"GET", "/jobs/{job}", h_job_get, &svc, 0},
      {"GET", "/admin/in-flight", h_in_flight, &svc, 0},
      {"GET", "/metrics", h_metrics, &svc, 0},
      /* Last: matched only when asked for (see below). */
      {"GET", "/buggy/reports/{id}", h_buggy_report, &svc,
       CANCEL_MSEC(c->route_timeout_ms)},
  };
  size_t nroutes = sizeof routes / sizeof routes[0] - (c->seeded_bug ? 0 : 1);
  cancel_http_options hopt = {
      .name = "reportd",
      .bind_address = c->bind,
      .port = (uint16_t)c->port,
      .threads = (unsigned)c->threads,
      /* 0 unless --drain: the server then ends its drain a margin
       * before the host's shutdown deadline. */
      .drain_timeout_ns = CANCEL_MSEC(c->drain_ms),
      .host_shutdown_timeout_ns = cancel_host_shutdown_timeout(svc.host),
      .header_timeout_ns = CANCEL_MSEC(c->header_timeout_ms),
      .body_timeout_ns = CANCEL_MSEC(c->body_timeout_ms),
      .idle_timeout_ns = CANCEL_MSEC(c->idle_timeout_ms),
      .max_connections = (unsigned)c->max_conns,
      .max_connections_per_ip =
          c->max_conns_per_ip == 0 ? UINT_MAX : (unsigned)c->max_conns_per_ip,
      .no_cancellation = c->no_cancellation};
  if (rc == 0)
    rc = cancel_http_server_new(&svc.http, &hopt, routes, nroutes);
  if (c->no_diagnostics)
    cancel_scopes_enable(0);
  if (rc == 0 && c->watchdog_ms > 0) {
    cancel_watchdog_options wo = {.threshold_ns = CANCEL_MSEC(c->watchdog_ms)};
    rc = cancel_watchdog_start(&wo);
  }
  if (rc == 0)
    rc = cancel_http_server_start(svc.http, cancel_host_stopping(svc.host));
  if (rc == 0)
    rc = cancel_host_add_worker(svc.host, "http", cancel_http_server_run,
                                svc.http);
  if (rc == 0)
    rc = cancel_host_add_worker(svc.host, "jobs", jobs_worker, &svc);
  if (rc < 0) {
    fprintf(stderr, "reportd: cannot start: %s\n", cancel_strerror(rc));
    if (svc.http != NULL && cancel_http_server_port(svc.http) != 0)
      cancel_http_server_stop(svc.http, cancel_now());
    cancel_http_server_free(svc.http);
    cancel_host_free(svc.host);
    store_close(svc.db);
    cancel_curl_thread_cleanup();
    curl_global_cleanup();
    return 1;
  }
  long drain_ms =
      c->drain_ms > 0
          ? c->drain_ms
          : (long)((CANCEL_MSEC(c->shutdown_timeout_ms) -
                    CANCEL_HTTP_DRAIN_MARGIN(
                        CANCEL_MSEC(c->shutdown_timeout_ms))) /
                   CANCEL_MSEC(1));
  CANCEL_LOG(CANCEL_LOG_INFO, "reportd", "started",
             CANCEL_LOG_U64("port", cancel_http_server_port(svc.http)),
             CANCEL_LOG_STR("database", store_kind(svc.db)),
             CANCEL_LOG_I64("route_timeout_ms", c->route_timeout_ms),
             CANCEL_LOG_I64("downstream_timeout_ms", c->downstream_timeout_ms),
             CANCEL_LOG_I64("shutdown_timeout_ms", c->shutdown_timeout_ms),
             CANCEL_LOG_I64("drain_ms", drain_ms),
             CANCEL_LOG_I64("ignore_tokens", c->ignore_tokens),
             CANCEL_LOG_I64("watchdog_ms", c->watchdog_ms),
             CANCEL_LOG_I64("seeded_bug", c->seeded_bug));
  printf("listening port=%u\n", (unsigned)cancel_http_server_port(svc.http));
  fflush(stdout);

  int status = cancel_host_run(svc.host);
  if (status == CANCEL_HOST_EXIT_TIMEOUT) {
    /* Workers still run and use everything: exit without freeing. */
    fflush(stderr);
    _exit(status);
  }
  if (status < 0) {
    fprintf(stderr, "reportd: host: %s\n", cancel_strerror(status));
    status = 1;
  }
  if (c->watchdog_ms > 0)
    cancel_watchdog_stop();
  cancel_http_server_free(svc.http);
  cancel_host_free(svc.host);
  store_close(svc.db);
  cancel_curl_thread_cleanup(); /* this thread's connections, first */
  curl_global_cleanup();
  return status;
}
