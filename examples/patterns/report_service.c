/*
 * A service method that passes ONE token to an HTTP call and a query:
 * fetch metadata over HTTP, load rows from the database, build the report.
 *
 * build_report() is what a request handler calls.  It takes the request's
 * token and hands the same token to every step that waits or runs long:
 * the call to a downstream service (cancel_curl_perform), the query
 * (cancel_sqlite_prepare, cancel_sqlite_step) and its own CPU loop (a look
 * at the token every few hundred rows).  It knows neither why it might be
 * cancelled nor how long it has: the token carries both, and the curl
 * adapter even tells the downstream how much time is left.
 *
 * The boundary, serve_request(), makes that token: the client's
 * connection linked with the route's timeout (cancel_source_init_timeout).
 * When build_report returns -ECANCELED, the boundary asks the token why
 * and answers accordingly: 504 and a warning naming the source for a
 * timeout; 499, logged at info, for a client that went away (nobody is
 * listening: it is not an error).
 *
 * The program needs nothing outside itself: it starts the downstream (a
 * metadata service answering a small JSON body after a delay set per case,
 * in a thread on loopback) and creates and seeds an SQLite database in a
 * temporary file.  Then three requests:
 *   a) a generous timeout: the report completes;
 *   b) a 200 ms timeout against a downstream that takes 5 s: the HTTP call
 *      returns -ECANCELED, the reason names the timeout, and the query
 *      never starts;
 *   c) a query over a range nobody should ask for (it would walk the
 *      calendar for minutes): the client goes away 100 ms into it and the
 *      query stops at once.
 * It prints a line for each and exits 0 only when each behaved so.
 *
 * Build (each adapter's pkg-config file brings the library it adapts):
 *   cc report_service.c $(pkg-config --cflags --libs cancel-curl cancel-sqlite)
 */
#define _POSIX_C_SOURCE 200809L

#include <cancel.h>
#include <cancel/curl.h>
#include <cancel/sqlite.h>

#include <arpa/inet.h>
#include <inttypes.h>
#include <netinet/in.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

/* The route, and the source that carries its timeout. */
#define ROUTE "GET /reports/sales"

/* Timing: margins wide enough for valgrind on a loaded machine. */
#define GENEROUS CANCEL_SEC(30)          /* a budget that never runs out */
#define SHORT_TIMEOUT CANCEL_MSEC(200)   /* case b's budget... */
#define SLOW_DOWNSTREAM CANCEL_SEC(5)    /* ...against this delay */
#define QUICK_DOWNSTREAM CANCEL_MSEC(20) /* the downstream's usual delay */
#define CLIENT_PATIENCE CANCEL_MSEC(100) /* case c: the client leaves then */
#define PROMPT CANCEL_MSEC(500)          /* "at once", generously */

/* The seeded data: SEED_DAYS days of sales in three regions. */
#define SEED_DAYS 90
#define SALES_PER_DAY 4

/* ======================================================================
 * The service method
 * ====================================================================== */

/* What build_report needs, set up once when the service starts. */
struct report_service {
  const char *metadata_url; /* the downstream's endpoint */
  sqlite3 *db;              /* one request at a time uses it */
};

#define MAX_REGIONS 8

struct region_total {
  char name[16];
  long sales;
  int64_t total_cents;
  int64_t median_cents;
};

struct report {
  char title[64];   /* from the downstream */
  char currency[8]; /* from the downstream */
  long rows;
  size_t nregions;
  struct region_total regions[MAX_REGIONS];
  const char *step; /* the step that returned: where it stopped, if it did */
};

/* ---- Step 1: the downstream's metadata, over HTTP --------------------- */

struct body {
  char buf[512];
  size_t len;
};

/* libcurl's write callback: keeps the body, refuses one that is too big
 * (returning less than given fails the transfer). */
static size_t body_append(char *data, size_t size, size_t n, void *arg) {
  struct body *b = arg;
  size_t len = size * n;
  if (len >= sizeof b->buf - b->len)
    return 0;
  memcpy(b->buf + b->len, data, len);
  b->len += len;
  b->buf[b->len] = '\0';
  return len;
}

/* Copies the string value of "key" in a flat JSON object into dst.  A real
 * service uses a JSON parser; this downstream sends one small object whose
 * strings have no escapes.  Returns 0 or -EPROTO. */
static int json_string(const char *json, const char *key, char *dst,
                       size_t len) {
  char quoted[40];
  snprintf(quoted, sizeof quoted, "\"%s\"", key);
  const char *p = strstr(json, quoted);
  if (p == NULL)
    return -EPROTO;
  p += strlen(quoted);
  while (*p == ' ' || *p == ':')
    p++;
  if (*p++ != '"')
    return -EPROTO;
  const char *end = strchr(p, '"');
  if (end == NULL || (size_t)(end - p) >= len)
    return -EPROTO;
  memcpy(dst, p, (size_t)(end - p));
  dst[end - p] = '\0';
  return 0;
}

/* GET url with tok: the transfer stops the moment tok fires (and the
 * downstream is sent the time left, when tok has a deadline).  A service
 * would keep one easy handle per worker to reuse connections; a fresh one
 * keeps the example short. */
static int fetch_metadata(const cancel_token *tok, const char *url,
                          struct report *out) {
  CURL *easy = curl_easy_init();
  if (easy == NULL)
    return -ENOMEM;
  struct body body = {.len = 0};
  curl_easy_setopt(easy, CURLOPT_URL, url);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, body_append);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, &body);
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  int rc = cancel_curl_perform(tok, easy);
  if (rc == 0) {
    long status = 0;
    curl_easy_getinfo(easy, CURLINFO_RESPONSE_CODE, &status);
    if (status != 200)
      rc = -EPROTO;
    else if ((rc = json_string(body.buf, "title", out->title,
                               sizeof out->title)) == 0)
      rc = json_string(body.buf, "currency", out->currency,
                       sizeof out->currency);
  }
  curl_easy_cleanup(easy);
  return rc;
}

/* ---- Step 2: the rows, from SQLite ------------------------------------ */

struct row {
  char region[16];
  int64_t cents;
};

struct rows {
  struct row *v;
  size_t n, cap;
};

/* The sales of days [?1, ?2], ordered for the aggregation.  CROSS JOIN
 * keeps the calendar as the outer loop (an index lookup per day), so a
 * long period is a long walk, never a huge temporary table. */
static const char SALES_SQL[] =
    "WITH RECURSIVE period(day) AS ("
    " SELECT ?1 UNION ALL SELECT day + 1 FROM period WHERE day < ?2) "
    "SELECT s.region, s.amount_cents FROM period CROSS JOIN sales AS s "
    "WHERE s.day = period.day ORDER BY s.region, s.amount_cents";

/* Appends the rows of the period to *rows.  The statement observes tok
 * while SQLite runs it: the ORDER BY makes SQLite read the whole period
 * before the first row, so a long period is one long cancel_sqlite_step. */
static int load_rows(const cancel_token *tok, sqlite3 *db, int64_t first_day,
                     int64_t last_day, struct rows *rows) {
  sqlite3_stmt *stmt;
  int rc = cancel_sqlite_prepare(tok, db, SALES_SQL, -1, &stmt, NULL);
  if (rc < 0)
    return rc;
  sqlite3_bind_int64(stmt, 1, first_day);
  sqlite3_bind_int64(stmt, 2, last_day);
  while ((rc = cancel_sqlite_step(tok, stmt)) == 1) {
    if (rows->n == rows->cap) {
      size_t cap = rows->cap ? 2 * rows->cap : 256;
      struct row *v = realloc(rows->v, cap * sizeof *v);
      if (v == NULL) {
        rc = -ENOMEM;
        break;
      }
      rows->v = v;
      rows->cap = cap;
    }
    struct row *r = &rows->v[rows->n++];
    const unsigned char *region = sqlite3_column_text(stmt, 0);
    snprintf(r->region, sizeof r->region, "%s",
             region != NULL ? (const char *)region : "");
    r->cents = sqlite3_column_int64(stmt, 1);
  }
  sqlite3_finalize(stmt);
  return rc; /* 0 (done) or the error that ended the loop */
}

/* ---- Step 3: the aggregation, CPU only -------------------------------- */

/* Per region: sales, total and median, in one pass over rows ordered by
 * region, then amount.  A loop that can run long looks at the token every
 * few hundred rows: one atomic load each time. */
static int aggregate(const cancel_token *tok, const struct rows *rows,
                     struct report *out) {
  struct region_total *t = NULL;
  size_t first = 0; /* t's first row */
  for (size_t i = 0; i < rows->n; i++) {
    if (i % 256 == 0 && cancel_token_is_cancelled(tok))
      return -ECANCELED;
    const struct row *r = &rows->v[i];
    if (t == NULL || strcmp(t->name, r->region) != 0) {
      if (t != NULL)
        t->median_cents = rows->v[first + (i - first) / 2].cents;
      if (out->nregions == MAX_REGIONS)
        return -E2BIG;
      t = &out->regions[out->nregions++];
      snprintf(t->name, sizeof t->name, "%s", r->region);
      first = i;
    }
    t->sales++;
    t->total_cents += r->cents;
  }
  if (t != NULL)
    t->median_cents = rows->v[first + (rows->n - first) / 2].cents;
  out->rows = (long)rows->n;
  return 0;
}

/* Builds the sales report of days [first_day, last_day]: the downstream's
 * metadata (title, currency), then the period's sales from the database,
 * aggregated per region.
 *
 * tok is the request's token, borrowed for the call and given, the same
 * one, to every step; NULL means "never cancelled".  Nothing here decides
 * how long the work may take or interprets why it stopped: the boundary
 * does, from the token.
 *
 * Returns 0 with *out filled, or:
 *   -ECANCELED  tok fired, whatever the reason; out->step names the step
 *               that stopped ("fetch metadata", "load rows", "aggregate")
 *               and the steps after it did not start;
 *   -EPROTO     the downstream answered something else than a 200 with the
 *               expected JSON;
 *   -E2BIG      more regions than a report holds;
 *   -ENOMEM, or an error of cancel_curl_perform (-ECONNREFUSED, -EIO...)
 *               or of the SQLite adapter (-EIO: sqlite3_errmsg(svc->db)).
 * Thread-safety: one call at a time per service (it uses one SQLite
 * connection); tok may be cancelled from any thread. */
int build_report(const cancel_token *tok, const struct report_service *svc,
                 int64_t first_day, int64_t last_day, struct report *out) {
  memset(out, 0, sizeof *out);
  out->step = "fetch metadata";
  int rc = fetch_metadata(tok, svc->metadata_url, out);
  if (rc < 0)
    return rc;

  struct rows rows = {.n = 0};
  out->step = "load rows";
  rc = load_rows(tok, svc->db, first_day, last_day, &rows);
  if (rc == 0) {
    out->step = "aggregate";
    rc = aggregate(tok, &rows, out);
  }
  free(rows.v);
  return rc;
}

/* ======================================================================
 * The boundary
 * ====================================================================== */

/* What a request came to, for main's checks. */
struct outcome {
  int rc;
  int kind;             /* the reason's kind; CANCEL_NONE if not cancelled */
  char origin[64];      /* the source that fired first */
  int64_t elapsed;      /* request start to build_report's return */
  int64_t after_cancel; /* the cancel to build_report's return */
  struct report report;
};

static void post(void *arg) {
  cancel_sem_post(arg);
}

/* Why tok was cancelled (cancel_token_reason), for a call that returned
 * -ECANCELED.  A transfer bounded by the token's deadline may end a moment
 * before the token's own timer fires (curl's timeout comes from the same
 * deadline, see cancel/curl.h): then wait, briefly, for the cancellation
 * itself.  Returns 1, or 0 if tok never fired. */
static int reason_of(const cancel_token *tok, cancel_reason *why) {
  cancel_sem fired;
  cancel_sem_init(&fired, 0);
  /* Unregistered when the function returns (cancel.h's CANCEL_AUTO_REG),
   * before `fired`, declared first, goes: the callback is then not
   * running and never will. */
  CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
  if (cancel_register(&reg, tok, post, &fired) == 0)
    cancel_sem_wait(NULL, &fired, cancel_now() + GENEROUS);
  return cancel_token_reason(tok, why);
}

/* One request: the client's token linked with the route's timeout, the
 * report built under it, and the outcome logged by its reason. */
static void serve_request(const char *label, const struct report_service *svc,
                          const cancel_token *client, int64_t timeout,
                          int64_t first_day, int64_t last_day,
                          struct outcome *o) {
  cancel_source request;
  memset(o, 0, sizeof *o);
  int64_t start = cancel_now();
  o->rc = cancel_source_init_timeout(&request, ROUTE, client, timeout);
  if (o->rc < 0) {
    printf("%s 500 error: %s\n", label, cancel_strerror(o->rc));
    return;
  }
  const cancel_token *tok = cancel_source_token(&request);
  o->rc = build_report(tok, svc, first_day, last_day, &o->report);
  int64_t back = cancel_now();
  o->elapsed = back - start;

  cancel_reason why;
  char line[256] = "";
  if (o->rc == -ECANCELED && reason_of(tok, &why) == 1) {
    o->kind = why.kind;
    snprintf(o->origin, sizeof o->origin, "%s", why.origin);
    o->after_cancel = back - why.time;
    cancel_reason_format(&why, line, sizeof line);
  }
  long ms = (long)(o->elapsed / 1000000);
  if (o->rc == 0) {
    const struct report *r = &o->report;
    printf("%s 200 in %ld ms: \"%s\", %ld sales\n", label, ms, r->title,
           r->rows);
    for (size_t i = 0; i < r->nregions; i++) {
      const struct region_total *t = &r->regions[i];
      printf("     %-6s %4ld sales, total %" PRId64 ".%02d %s, median "
             "%" PRId64 ".%02d\n",
             t->name, t->sales, t->total_cents / 100,
             (int)(t->total_cents % 100), r->currency, t->median_cents / 100,
             (int)(t->median_cents % 100));
    }
  } else if (o->kind == CANCEL_TIMEOUT) {
    printf("%s 504 in %ld ms, warning: %s; stopped in \"%s\"\n", label, ms,
           line, o->report.step);
  } else if (o->kind == CANCEL_CLIENT_GONE) {
    printf("%s 499 in %ld ms, info: %s; stopped in \"%s\" %" PRId64
           " us after the cancel\n",
           label, ms, line, o->report.step, o->after_cancel / 1000);
  } else {
    printf("%s 500 in %ld ms, error: %s in \"%s\" %s\n", label, ms,
           cancel_strerror(o->rc), o->report.step, line);
  }
  cancel_source_destroy(&request);
}

/* ======================================================================
 * The downstream: a metadata service on loopback, in a thread
 * ====================================================================== */

static const char METADATA[] =
    "{\"title\": \"Sales by region\", \"currency\": \"EUR\"}";

struct downstream {
  int lfd;
  int port;
  cancel_source stop; /* cancelled to stop the server */
  cancel_thread thread;
  pthread_mutex_t lock; /* guards the fields below */
  int64_t delay;        /* how long it takes to answer */
  long budget_ms; /* X-Request-Timeout-Ms of the last request, -1 if none */
  int answered;   /* requests answered */
  int abandoned;  /* requests whose client left before the answer */
};

/* One request: read it, take `delay` to answer, and give up as soon as the
 * client goes away (work for nobody is wasted work).  Every wait observes
 * the server's stop token. */
static void downstream_serve(struct downstream *ds, const cancel_token *stop,
                             int c) {
  char req[2048] = "";
  size_t got = 0;
  int64_t arrived = cancel_now();
  int64_t io_deadline = arrived + GENEROUS;
  while (strstr(req, "\r\n\r\n") == NULL) {
    if (got == sizeof req - 1)
      return; /* headers too large for us */
    ssize_t n =
        cancel_recv(stop, c, req + got, sizeof req - 1 - got, 0, io_deadline);
    if (n <= 0)
      return; /* stopping, too slow, or the client left */
    got += (size_t)n;
    req[got] = '\0';
  }
  const char *h = strstr(req, "X-Request-Timeout-Ms: ");
  long budget =
      h != NULL ? strtol(h + strlen("X-Request-Timeout-Ms: "), NULL, 10) : -1;
  pthread_mutex_lock(&ds->lock);
  ds->budget_ms = budget;
  int64_t delay = ds->delay;
  pthread_mutex_unlock(&ds->lock);

  /* The delay, watching the connection: it becomes readable when the
   * client closes it. */
  int rc = cancel_wait_fd(stop, c, POLLIN, arrived + delay);
  if (rc != -ETIMEDOUT) {
    if (rc > 0) {
      pthread_mutex_lock(&ds->lock);
      ds->abandoned++;
      pthread_mutex_unlock(&ds->lock);
    }
    return;
  }
  char resp[256];
  int len = snprintf(resp, sizeof resp,
                     "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                     "Content-Length: %zu\r\nConnection: close\r\n\r\n%s",
                     strlen(METADATA), METADATA);
  for (int off = 0; off < len;) {
    ssize_t n = cancel_send(stop, c, resp + off, (size_t)(len - off),
                            MSG_NOSIGNAL, io_deadline);
    if (n < 0)
      return;
    off += (int)n;
  }
  pthread_mutex_lock(&ds->lock);
  ds->answered++;
  pthread_mutex_unlock(&ds->lock);
}

static void *downstream_main(void *arg) {
  struct downstream *ds = arg;
  const cancel_token *stop = cancel_source_token(&ds->stop);
  for (;;) {
    int c =
        cancel_accept(stop, ds->lfd, NULL, NULL, SOCK_CLOEXEC, CANCEL_NEVER);
    if (c == -ECANCELED)
      return NULL;
    if (c < 0) {
      if (c == -ECONNABORTED)
        continue;
      fprintf(stderr, "downstream: accept: %s\n", cancel_strerror(c));
      return NULL;
    }
    downstream_serve(ds, stop, c);
    close(c);
  }
}

/* Listens on 127.0.0.1 (a port the kernel picks) and starts the thread.
 * Returns 0 or a negative errno value (nothing left to tear down). */
static int downstream_start(struct downstream *ds) {
  memset(ds, 0, sizeof *ds);
  ds->budget_ms = -1;
  ds->delay = QUICK_DOWNSTREAM;
  ds->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (ds->lfd < 0)
    return -errno;
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  int rc = 0;
  if (bind(ds->lfd, (struct sockaddr *)&a, sizeof a) < 0 ||
      listen(ds->lfd, 16) < 0 ||
      getsockname(ds->lfd, (struct sockaddr *)&a, &alen) < 0)
    rc = -errno;
  else if ((rc = cancel_source_init(&ds->stop, "downstream stop")) == 0) {
    pthread_mutex_init(&ds->lock, NULL);
    ds->port = ntohs(a.sin_port);
    rc = cancel_thread_create(&ds->thread, NULL, downstream_main, ds);
    if (rc < 0) {
      pthread_mutex_destroy(&ds->lock);
      cancel_source_destroy(&ds->stop);
    }
  }
  if (rc < 0)
    close(ds->lfd);
  return rc;
}

static void downstream_set_delay(struct downstream *ds, int64_t delay) {
  pthread_mutex_lock(&ds->lock);
  ds->delay = delay;
  pthread_mutex_unlock(&ds->lock);
}

static long downstream_budget_ms(struct downstream *ds) {
  pthread_mutex_lock(&ds->lock);
  long b = ds->budget_ms;
  pthread_mutex_unlock(&ds->lock);
  return b;
}

static void downstream_stop(struct downstream *ds) {
  cancel_source_cancel(&ds->stop);
  /* Every wait of the thread observes the stop token: it ends now. */
  cancel_thread_join(NULL, &ds->thread, NULL, CANCEL_NEVER);
  printf("downstream: %d answered, %d abandoned by their client\n",
         ds->answered, ds->abandoned);
  close(ds->lfd);
  cancel_source_destroy(&ds->stop);
  pthread_mutex_destroy(&ds->lock);
}

/* ======================================================================
 * The database
 * ====================================================================== */

/* Creates a database in a temporary file (its name in path) with
 * SEED_DAYS days of sales.  Returns 0 or a negative errno value (the file
 * is then removed). */
static int open_seeded(char *path, size_t len, sqlite3 **dbp) {
  const char *tmp = getenv("TMPDIR");
  snprintf(path, len, "%s/report_service.XXXXXX",
           tmp != NULL && *tmp != '\0' ? tmp : "/tmp");
  int fd = mkstemp(path);
  if (fd < 0)
    return -errno;
  close(fd); /* SQLite makes an empty file a new database */
  sqlite3 *db = NULL;
  int rc = sqlite3_open(path, &db) == SQLITE_OK ? 0 : -EIO;
  sqlite3_stmt *ins = NULL;
  if (rc == 0)
    rc = cancel_sqlite_exec(NULL, db,
                            "BEGIN;"
                            "CREATE TABLE sales(day INTEGER NOT NULL,"
                            " region TEXT NOT NULL,"
                            " amount_cents INTEGER NOT NULL);"
                            "CREATE INDEX sales_day ON sales(day)");
  if (rc == 0)
    rc = cancel_sqlite_prepare(NULL, db, "INSERT INTO sales VALUES (?, ?, ?)",
                               -1, &ins, NULL);
  static const char *const regions[] = {"north", "south", "west"};
  uint32_t x = 2024; /* a fixed pseudo-random sequence: the same report */
  for (int day = 1; rc == 0 && day <= SEED_DAYS; day++)
    for (size_t r = 0; rc == 0 && r < 3; r++)
      for (int k = 0; rc == 0 && k < SALES_PER_DAY; k++) {
        x = x * 1103515245u + 12345u;
        sqlite3_bind_int(ins, 1, day);
        sqlite3_bind_text(ins, 2, regions[r], -1, SQLITE_STATIC);
        sqlite3_bind_int(ins, 3, 500 + (int)((x >> 8) % 49500));
        rc = cancel_sqlite_step(NULL, ins);
        sqlite3_reset(ins);
      }
  sqlite3_finalize(ins);
  if (rc == 0)
    rc = cancel_sqlite_exec(NULL, db, "COMMIT");
  if (rc < 0) {
    fprintf(stderr, "seeding %s: %s\n", path, sqlite3_errmsg(db));
    sqlite3_close(db);
    unlink(path);
    return rc;
  }
  *dbp = db;
  return 0;
}

/* Counts the statements SQLite starts on the connection, and posts `sem`
 * for each: how main knows the query runs (case c), or never ran (b). */
struct statements {
  long started;
  cancel_sem sem;
};

static int on_statement(unsigned type, void *ctx, void *p, void *x) {
  struct statements *st = ctx;
  (void)type, (void)p, (void)x;
  st->started++;
  cancel_sem_post(&st->sem);
  return 0;
}

/* ======================================================================
 * The three cases
 * ====================================================================== */

static int check(const char *label, int ok, const char *what) {
  if (!ok)
    printf("%s FAILED: %s\n", label, what);
  return ok;
}

static int stopped_in(const struct outcome *o, const char *step) {
  return o->report.step != NULL && strcmp(o->report.step, step) == 0;
}

/* a) Enough time: the report completes, and the downstream was told the
 * budget. */
static int case_completes(const struct report_service *svc,
                          struct downstream *ds) {
  const char *l = "a)";
  CANCEL_AUTO_SOURCE cancel_source *client = NULL; /* cancel.h */
  struct outcome o;
  if (cancel_source_new(&client, "client 192.0.2.7:5123") < 0)
    return check(l, 0, "cancel_source_new");
  downstream_set_delay(ds, QUICK_DOWNSTREAM);
  serve_request(l, svc, cancel_source_token(client), GENEROUS, 1, SEED_DAYS,
                &o);
  long budget = downstream_budget_ms(ds);
  printf("   the downstream was given %ld ms of the %lld s budget\n", budget,
         (long long)(GENEROUS / CANCEL_SEC(1)));
  return check(l, o.rc == 0, "the report did not complete") &&
         check(l, o.report.rows == SEED_DAYS * 3 * SALES_PER_DAY,
               "wrong row count") &&
         check(l, budget > 0 && budget <= GENEROUS / CANCEL_MSEC(1),
               "the budget was not sent downstream");
}

/* b) The request's timeout is shorter than the downstream's delay: the HTTP
 * call ends when the budget does, the reason names the timeout, and the
 * query never starts. */
static int case_timeout(const struct report_service *svc, struct downstream *ds,
                        struct statements *st) {
  const char *l = "b)";
  CANCEL_AUTO_SOURCE cancel_source *client = NULL; /* cancel.h */
  struct outcome o;
  if (cancel_source_new(&client, "client 192.0.2.7:5124") < 0)
    return check(l, 0, "cancel_source_new");
  downstream_set_delay(ds, SLOW_DOWNSTREAM);
  long before = st->started;
  serve_request(l, svc, cancel_source_token(client), SHORT_TIMEOUT, 1,
                SEED_DAYS, &o);
  printf("   statements started: %ld\n", st->started - before);
  return check(l, o.rc == -ECANCELED, "not -ECANCELED") &&
         check(l, stopped_in(&o, "fetch metadata"),
               "not stopped in the HTTP call") &&
         check(l, o.kind == CANCEL_TIMEOUT && strcmp(o.origin, ROUTE) == 0,
               "the reason is not the route's timeout") &&
         check(l, st->started == before, "the query started") &&
         check(l, o.elapsed < SLOW_DOWNSTREAM, "it waited for the downstream");
}

/* The client of case c: it leaves (its connection's source is cancelled
 * with CANCEL_CLIENT_GONE, as a server's hang-up watch would) 100 ms into
 * the query. */
struct client {
  cancel_source *conn; /* a reference owned by the thread */
  cancel_sem *query_started;
};

static void *client_main(void *arg) {
  struct client *c = arg;
  /* The query's start is a real signal; the 100 ms after it are the
   * scenario (the moment this client gives up), not a wait for anything. */
  if (cancel_sem_wait(NULL, c->query_started, cancel_now() + GENEROUS) == 0)
    cancel_sleep(NULL, CLIENT_PATIENCE);
  cancel_source_cancel_with(c->conn, CANCEL_CLIENT_GONE,
                            "connection reset by peer");
  cancel_source_unref(c->conn);
  return NULL;
}

/* c) A query that would run for minutes; the client leaves while it runs:
 * it stops at once, and the reason says the client went away. */
static int case_client_gone(const struct report_service *svc,
                            struct downstream *ds, struct statements *st) {
  const char *l = "c)";
  const char *name = "client 192.0.2.7:5125";
  cancel_source *conn;
  struct client c;
  cancel_thread thread;
  struct outcome o;
  if (cancel_source_new(&conn, name) < 0)
    return check(l, 0, "cancel_source_new");
  downstream_set_delay(ds, QUICK_DOWNSTREAM);
  cancel_sem_init(&st->sem, 0); /* count from here */
  long before = st->started;
  c.conn = cancel_source_ref(conn); /* the thread keeps it: a reference */
  c.query_started = &st->sem;
  if (cancel_thread_create(&thread, NULL, client_main, &c) < 0) {
    cancel_source_unref(c.conn);
    cancel_source_unref(conn);
    return check(l, 0, "cancel_thread_create");
  }
  serve_request(l, svc, cancel_source_token(conn), GENEROUS, 1, 2000000000, &o);
  cancel_sem_post(&st->sem); /* the client, if the query never started */
  cancel_thread_join(NULL, &thread, NULL, CANCEL_NEVER);
  cancel_source_unref(conn);
  return check(l, o.rc == -ECANCELED, "not -ECANCELED") &&
         check(l, st->started > before, "the query did not start") &&
         check(l, stopped_in(&o, "load rows"), "not stopped in the query") &&
         check(l, o.kind == CANCEL_CLIENT_GONE && strcmp(o.origin, name) == 0,
               "the reason is not the client's") &&
         check(l, o.after_cancel < PROMPT, "the query did not stop promptly");
}

int main(void) {
  struct downstream ds;
  struct statements st = {.started = 0};
  char path[512], url[64];
  sqlite3 *db = NULL;
  int rc;

  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    fprintf(stderr, "curl_global_init failed\n");
    return 1;
  }
  if ((rc = downstream_start(&ds)) < 0) {
    fprintf(stderr, "downstream: %s\n", cancel_strerror(rc));
    cancel_curl_thread_cleanup();
    curl_global_cleanup();
    return 1;
  }
  if ((rc = open_seeded(path, sizeof path, &db)) < 0) {
    downstream_stop(&ds);
    cancel_curl_thread_cleanup();
    curl_global_cleanup();
    return 1;
  }
  cancel_sem_init(&st.sem, 0);
  sqlite3_trace_v2(db, SQLITE_TRACE_STMT, on_statement, &st);

  snprintf(url, sizeof url, "http://127.0.0.1:%d/metadata/sales", ds.port);
  struct report_service svc = {.metadata_url = url, .db = db};
  /* Every case runs, whatever the previous one did. */
  int ok = case_completes(&svc, &ds);
  ok &= case_timeout(&svc, &ds, &st);
  ok &= case_client_gone(&svc, &ds, &st);

  sqlite3_close(db);
  unlink(path);
  downstream_stop(&ds);
  cancel_curl_thread_cleanup(); /* this thread's connections, first */
  curl_global_cleanup();
  printf("report_service: %s\n",
         ok ? "every case behaved" : "a case misbehaved");
  return ok ? 0 : 1;
}
