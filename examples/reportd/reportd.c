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
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

/* ---- Configuration --------------------------------------------------------
 */

struct config {
  long port;
  const char *bind;
  const char *db;
  const char *pg;
  const char *downstream;
  long route_timeout_ms, shutdown_timeout_ms, drain_ms, threads, poll_ms;
  long rows, work, commit_delay_ms, watchdog_ms;
  long header_timeout_ms, body_timeout_ms, idle_timeout_ms, max_conns,
      max_conns_per_ip;
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
    "  --shutdown-timeout MS REPORTD_SHUTDOWN_TIMEOUT_MS (30000)\n"
    "  --drain MS            REPORTD_DRAIN_MS (shutdown timeout - 2000)\n"
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
                       .drain_ms = -1,
                       .threads = 16,
                       .poll_ms = 500,
                       .rows = 2000,
                       .work = 20000,
                       .watchdog_ms = 100,
                       .header_timeout_ms = 10000,
                       .body_timeout_ms = 60000,
                       .idle_timeout_ms = 60000,
                       .max_conns = 4096,
                       .max_conns_per_ip = 256};
  /* The environment first, the flags over it. */
  static const struct {
    const char *env, *flag;
    long lo, hi;
    size_t off;
  } nums[] = {
      {"REPORTD_PORT", "port", 0, 65535, offsetof(struct config, port)},
      {"REPORTD_ROUTE_TIMEOUT_MS", "route-timeout", 1, 3600000,
       offsetof(struct config, route_timeout_ms)},
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
  if (c->drain_ms < 0)
    c->drain_ms =
        c->shutdown_timeout_ms > 2100 ? c->shutdown_timeout_ms - 2000 : 100;
  if (c->drain_ms >= c->shutdown_timeout_ms) {
    fprintf(stderr,
            "reportd: --drain (%ld) must be below --shutdown-timeout "
            "(%ld)\n",
            c->drain_ms, c->shutdown_timeout_ms);
    return false;
  }
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

struct body {
  char buf[4096];
  size_t len;
};

static size_t body_write(char *p, size_t size, size_t n, void *arg) {
  struct body *b = arg;
  size_t len = size * n;
  if (len > sizeof b->buf - 1 - b->len)
    return 0; /* too large: curl fails the transfer */
  memcpy(b->buf + b->len, p, len);
  b->len += len;
  b->buf[b->len] = '\0';
  return len;
}

/* GET <downstream>/meta/<id>: the report's title.  -ENOENT for 404,
 * -EPROTO for another status, the adapter's errors otherwise. */
static int fetch_metadata(const struct service *s, const cancel_token *tok,
                          long id, long delay_ms, char *title, size_t tlen) {
  CURL *e = curl_easy_init();
  if (e == NULL)
    return -ENOMEM;
  char url[512];
  snprintf(url, sizeof url, "%s/meta/%ld?delay_ms=%ld", s->cfg.downstream, id,
           delay_ms);
  struct body b = {.len = 0};
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, body_write);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, &b);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  int rc = cancel_curl_perform(tok, e);
  long status = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(e);
  if (rc < 0)
    return rc;
  if (status == 404)
    return -ENOENT;
  if (status == 504 && cancel_token_remaining(tok) < CANCEL_MSEC(50)) {
    /* The downstream gave up on the budget we sent it, which is ours:
     * our own deadline is a moment away.  Let it fire, so that the edge
     * names our timeout, not a downstream failure. */
    return cancel_sleep(tok, CANCEL_MSEC(100)) == -ECANCELED ? -ECANCELED
                                                             : -EPROTO;
  }
  if (status != 200)
    return -EPROTO;
  /* {"id":42,"title":"Report 42"}: the title's value. */
  const char *t = strstr(b.buf, "\"title\":\"");
  if (t == NULL)
    return -EPROTO;
  t += 9;
  size_t n = strcspn(t, "\"");
  snprintf(title, tlen, "%.*s", (int)n, t);
  return 0;
}

struct report {
  long id, rows;
  double sum, max;
  uint64_t digest;
  char title[128];
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

/* The service method: one token, passed to every step. */
static int build_report_ex(const struct service *s, const cancel_token *tok,
                           long id, long delay_ms, bool buggy,
                           struct report *out);

static int build_report(const struct service *s, const cancel_token *tok,
                        long id, long delay_ms, struct report *out) {
  return build_report_ex(s, tok, id, delay_ms, false, out);
}

static int build_report_ex(const struct service *s, const cancel_token *tok,
                           long id, long delay_ms, bool buggy,
                           struct report *out) {
  out->id = id;
  int rc = fetch_metadata(s, tok, id, delay_ms, out->title, sizeof out->title);
  if (rc < 0)
    return rc;
  double *v = NULL;
  size_t n = 0;
  rc = store_load_rows(s->db, tok, id, &v, &n);
  if (rc < 0)
    return rc;
  rc = buggy ? aggregate_ignoring_token(v, n, s->cfg.work, out)
             : aggregate(tok, v, n, s->cfg.work, out);
  free(v);
  return rc;
}

static int report_json(const struct report *r, char *buf, size_t len) {
  return snprintf(buf, len,
                  "{\"id\":%ld,\"title\":\"%s\",\"rows\":%ld,\"sum\":%.2f,"
                  "\"max\":%.2f,\"digest\":\"%016" PRIx64 "\"}\n",
                  r->id, r->title, r->rows, r->sum, r->max, r->digest);
}

static int respond_json(cancel_http_request *req, unsigned status,
                        const char *json) {
  return cancel_http_respond(req, status, "application/json", json,
                             strlen(json));
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
  int rc = build_report_ex(s, pass(s, tok), id, delay, buggy, &r);
  if (rc == -ENOENT)
    return respond_text(req, 404, "no such report\n");
  if (rc == -ECONNREFUSED || rc == -EPROTO || rc == -EHOSTUNREACH) {
    cancel_log(CANCEL_LOG_WARN, "reportd", "downstream failed",
               "id=%" PRIu64 " error=\"%s\"", cancel_http_request_id(req),
               cancel_strerror(rc));
    return respond_text(req, 502, "downstream failed\n");
  }
  if (rc < 0)
    return rc; /* -ECANCELED and the rest: the edge answers */
  char json[512];
  report_json(&r, json, sizeof json);
  return respond_json(req, 200, json);
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
  char json[64];
  snprintf(json, sizeof json, "{\"count\":%ld}\n", count);
  return respond_json(req, 200, json);
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
  char json[64];
  snprintf(json, sizeof json, "{\"job\":%ld}\n", job);
  return respond_json(req, 202, json);
}

static int h_job_get(cancel_http_request *req, const cancel_token *tok,
                     void *arg) {
  struct service *s = arg;
  long job;
  char state[32];
  if (!param_number(req, "job", 1000000000000L, &job))
    return respond_text(req, 400, "job: a number\n");
  int rc = store_job_state(s->db, pass(s, tok), job, state, sizeof state);
  if (rc == -ENOENT)
    return respond_text(req, 404, "no such job\n");
  if (rc < 0)
    return rc;
  char json[96];
  snprintf(json, sizeof json, "{\"job\":%ld,\"state\":\"%s\"}\n", job, state);
  return respond_json(req, 200, json);
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

static int jobs_worker(const cancel_token *stopping, void *arg) {
  struct service *s = arg;
  const cancel_token *tok = pass(s, stopping);
  for (;;) {
    long job, report;
    int rc = store_job_next(s->db, tok, &job, &report);
    if (rc == -ENOENT) {
      /* Nothing to do: the cancellable sleep is the whole shutdown story
       * of an idle worker. */
      rc = cancel_sleep(stopping, CANCEL_MSEC(s->cfg.poll_ms));
      if (rc == -ECANCELED)
        return -ECANCELED;
      continue;
    }
    if (rc == -ECANCELED)
      return -ECANCELED;
    if (rc < 0) {
      cancel_log(CANCEL_LOG_WARN, "reportd", "jobs poll failed", "error=\"%s\"",
                 cancel_strerror(rc));
      if (cancel_sleep(stopping, CANCEL_MSEC(s->cfg.poll_ms)) == -ECANCELED)
        return -ECANCELED;
      continue;
    }
    int64_t t0 = cancel_now();
    cancel_log(CANCEL_LOG_INFO, "reportd", "job started", "job=%ld report=%ld",
               job, report);
    struct report r;
    char json[512];
    rc = build_report(s, tok, report, 0, &r);
    if (rc == 0) {
      report_json(&r, json, sizeof json);
      rc = store_job_finish(s->db, tok, job, report, json);
    }
    double ms = (double)(cancel_now() - t0) / 1e6;
    if (rc == 0) {
      cancel_log(CANCEL_LOG_INFO, "reportd", "job committed",
                 "job=%ld report=%ld dur_ms=%.1f stopping=%d", job, report, ms,
                 cancel_token_is_cancelled(stopping));
    } else if (rc == -ECANCELED) {
      cancel_log(CANCEL_LOG_INFO, "reportd", "job cancelled",
                 "job=%ld report=%ld dur_ms=%.1f state=pending", job, report,
                 ms);
      return -ECANCELED;
    } else {
      cancel_log(CANCEL_LOG_WARN, "reportd", "job failed",
                 "job=%ld report=%ld error=\"%s\"", job, report,
                 cancel_strerror(rc));
      if (cancel_sleep(stopping, CANCEL_MSEC(s->cfg.poll_ms)) == -ECANCELED)
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
      .drain_timeout_ns = CANCEL_MSEC(c->drain_ms),
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
  cancel_log(CANCEL_LOG_INFO, "reportd", "started",
             "port=%u database=%s route_timeout_ms=%ld "
             "shutdown_timeout_ms=%ld drain_ms=%ld ignore_tokens=%d "
             "watchdog_ms=%ld seeded_bug=%d",
             (unsigned)cancel_http_server_port(svc.http), store_kind(svc.db),
             c->route_timeout_ms, c->shutdown_timeout_ms, c->drain_ms,
             c->ignore_tokens, c->watchdog_ms, c->seeded_bug);
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
