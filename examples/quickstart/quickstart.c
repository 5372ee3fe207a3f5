/* quickstart: a whole service on libcancel (the README quotes it).
 * usage: quickstart PORT DATABASE DOWNSTREAM-URL   (PORT 0: any free port)
 * GET /orders/{customer}: counts the customer's orders in SQLite, asks the
 * downstream for its stock over curl, then does CPU work; every step takes
 * the request's token (client gone, the route's 1 s, or shutdown).  A worker
 * tallies all orders every second.  SIGTERM: graceful stop, exit 0. */
#include <cancel.h>
#include <cancel/curl.h>
#include <cancel/host.h>
#include <cancel/http.h>
#include <cancel/log.h>
#include <cancel/sqlite.h>
#include <cancel/watch.h>

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static const char *db_path, *downstream; /* from argv, read-only after */

/* One connection per call: the adapter owns its progress handler meanwhile. */
static int count_orders(const cancel_token *tok, int64_t customer, long *n) {
  sqlite3 *db;
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_open_v2(db_path, &db, SQLITE_OPEN_READONLY, NULL) == 0
               ? cancel_sqlite_prepare(tok, db, "SELECT count(*) FROM orders"
                                       " WHERE ?1 < 0 OR customer = ?1",
                                       -1, &st, NULL)
               : -EIO;
  if (rc == 0 && sqlite3_bind_int64(st, 1, customer) == 0 &&
      (rc = cancel_sqlite_step(tok, st)) == 1) {
    *n = (long)sqlite3_column_int64(st, 0);
    rc = 0;
  }
  sqlite3_finalize(st);
  sqlite3_close(db);
  return rc; /* 0, -ECANCELED, -EIO... */
}

static size_t keep(char *p, size_t size, size_t n, void *buf) {
  size_t len = strlen(buf), add = size * n;
  if (len + add >= 32)
    return 0; /* too long: fails the transfer */
  memcpy((char *)buf + len, p, add);
  ((char *)buf)[len + add] = '\0';
  return add;
}

static int get_orders(cancel_http_request *req, const cancel_token *tok,
                      void *arg) {
  uint64_t id;
  long orders = 0;
  char url[256], stock[32] = "";
  (void)arg;
  if (cancel_http_request_param_u64(req, "customer", 1000000, &id) < 0)
    return cancel_http_respond(req, 400, "text/plain", "bad customer\n", 13);
  int rc = count_orders(tok, (int64_t)id, &orders);
  if (rc < 0)
    return rc; /* -ECANCELED: the edge answers by the reason (499/504/503) */
  CURL *easy = curl_easy_init();
  if (easy == NULL)
    return -ENOMEM;
  snprintf(url, sizeof url, "%s/stock/%llu", downstream, (unsigned long long)id);
  curl_easy_setopt(easy, CURLOPT_URL, url);
  curl_easy_setopt(easy, CURLOPT_WRITEFUNCTION, keep);
  curl_easy_setopt(easy, CURLOPT_WRITEDATA, stock);
  rc = cancel_curl_perform(tok, easy); /* sends grpc-timeout: the budget */
  curl_easy_cleanup(easy);
  if (rc < 0)
    return rc;
  uint64_t h = id; /* CPU work: a look at the token every 4096 rounds */
  for (long i = 0; i < (1L << 24); i++) {
    if ((i & 4095) == 0 && cancel_token_is_cancelled(tok))
      return -ECANCELED;
    h = h * 6364136223846793005u + 1442695040888963407u;
  }
  char body[128];
  int len = snprintf(body, sizeof body, "{\"orders\":%ld,\"stock\":%ld,"
                     "\"hash\":%llu}\n", orders, strtol(stock, NULL, 10),
                     (unsigned long long)(h >> 40));
  return cancel_http_respond(req, 200, "application/json", body, (size_t)len);
}

static int tally(const cancel_token *stopping, void *arg) {
  long n = 0;
  (void)arg;
  for (;;) {
    int rc = cancel_sleep(stopping, CANCEL_SEC(1));
    if (rc == 0)
      rc = count_orders(stopping, -1, &n);
    if (rc < 0)
      return rc; /* -ECANCELED: the host is stopping, a normal end */
    cancel_log(CANCEL_LOG_INFO, "quickstart", "tally", "orders=%ld", n);
  }
}

int main(int argc, char **argv) {
  if (argc != 4) {
    fprintf(stderr, "usage: quickstart PORT DATABASE DOWNSTREAM-URL\n");
    return 2;
  }
  cancel_signals_block(); /* first: every thread inherits the mask */
  db_path = argv[2];
  downstream = argv[3];
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return 1;
  cancel_host_options ho = {.shutdown_timeout_ns = CANCEL_SEC(10)};
  cancel_http_route routes[] = {
      {"GET", "/orders/{customer}", get_orders, NULL, CANCEL_SEC(1)}};
  cancel_http_options so = {.name = "quickstart",
                            .port = (uint16_t)atoi(argv[1]),
                            .drain_timeout_ns = CANCEL_SEC(5)};
  cancel_host *host = NULL;
  cancel_http_server *srv = NULL;
  int rc = cancel_host_new(&host, "quickstart", &ho);
  if (rc == 0 && (rc = cancel_http_server_new(&srv, &so, routes, 1)) == 0 &&
      (rc = cancel_host_add_worker(host, "http", cancel_http_server_run,
                                   srv)) == 0)
    rc = cancel_host_add_worker(host, "tally", tally, NULL);
  int status = rc < 0 ? rc : cancel_host_run(host); /* SIGTERM, drain */
  if (status < 0)
    fprintf(stderr, "quickstart: %s\n", cancel_strerror(status));
  /* Teardown, users first: the host joins its workers, the server's free
   * ends its handler threads (and their curl handles), then curl itself. */
  if (cancel_host_free(host) == -EBUSY)
    return status; /* a worker ignored the stop: exit without it */
  cancel_http_server_free(srv);
  curl_global_cleanup();
  return status < 0 ? 1 : status;
}
