/* quickstart: the README's service.  usage: quickstart PORT DB STOCK-URL */
#include <cancel/curl.h>
#include <cancel/host.h>
#include <cancel/http.h>
#include <cancel/log.h>
#include <cancel/sqlite.h>
#include <cancel/watch.h>

#include <stdio.h>
#include <stdlib.h>

#define COUNT_SQL "SELECT count(*) FROM orders WHERE ?1 < 0 OR customer = ?1"

/* A connection per call: the adapter takes its progress handler meanwhile. */
static int count_orders(const cancel_token *tok, const char *path,
                        int64_t customer, long *n) {
  sqlite3 *db;
  sqlite3_stmt *st = NULL;
  int rc = sqlite3_open_v2(path, &db, SQLITE_OPEN_READONLY, NULL) ? -EIO : 0;
  if (rc == 0 &&
      (rc = cancel_sqlite_prepare(tok, db, COUNT_SQL, -1, &st, NULL)) == 0 &&
      (rc = sqlite3_bind_int64(st, 1, customer) ? -EIO : 0) == 0 &&
      (rc = cancel_sqlite_step(tok, st)) == 1)
    *n = (long)sqlite3_column_int64(st, 0);
  sqlite3_finalize(st);
  sqlite3_close(db);
  return rc < 0 ? rc : 0; /* or -ECANCELED (the token fired), -EIO... */
}

static int get_orders(cancel_http_request *req, const cancel_token *tok,
                      void *arg) {
  char **argv = arg; /* the route's arg: main()'s */
  char url[256], stock[32] = "", body[128];
  uint64_t id;
  long orders = 0;
  if (cancel_http_request_param_u64(req, "customer", 1000000, &id) < 0)
    return cancel_http_respond(req, 400, "text/plain", "bad customer\n", 13);
  int rc = count_orders(tok, argv[2], (int64_t)id, &orders);
  if (rc < 0)
    return rc; /* -ECANCELED: the edge answers by the reason (499/504/503) */
  snprintf(url, sizeof url, "%s/stock/%llu", argv[3], (unsigned long long)id);
  CURL *easy = curl_easy_init();
  FILE *out = fmemopen(stock, sizeof stock - 1, "w"); /* curl fwrite()s to it */
  rc = -ENOMEM;
  if (easy != NULL && out != NULL) {
    curl_easy_setopt(easy, CURLOPT_URL, url);
    curl_easy_setopt(easy, CURLOPT_WRITEDATA, out);
    rc = cancel_curl_perform(tok, easy); /* sends the budget: grpc-timeout */
  }
  if (out != NULL)
    fclose(out);
  curl_easy_cleanup(easy);
  uint64_t h = id; /* CPU work: a look at the token every 4096 rounds */
  for (long i = 1; rc == 0 && i <= (1L << 24); i++) {
    h = h * 6364136223846793005u + 1442695040888963407u;
    rc = (i & 4095) ? 0 : cancel_token_check(tok);
  }
  if (rc < 0)
    return rc;
  int len = snprintf(body, sizeof body,
                     "{\"orders\":%ld,\"stock\":%ld,\"hash\":%llu}\n", orders,
                     strtol(stock, NULL, 10), (unsigned long long)(h >> 40));
  return cancel_http_respond(req, 200, "application/json", body, (size_t)len);
}

/* The background worker: every second, all orders counted within 500 ms.
 * CANCEL_AUTO_SOURCE unrefs `round` at its '}', as Go's `defer cancel()`. */
static int tally(const cancel_token *stopping, void *arg) {
  while (cancel_sleep(stopping, CANCEL_SEC(1)) == 0) {
    CANCEL_AUTO_SOURCE cancel_source *round = NULL;
    long n = 0;
    int rc =
        cancel_source_new_timeout(&round, "tally", stopping, CANCEL_MSEC(500));
    if (rc == 0)
      rc = count_orders(cancel_source_token(round), arg, -1, &n);
    CANCEL_LOG(CANCEL_LOG_INFO, "quickstart", "tally",
               CANCEL_LOG_I64("orders", n), CANCEL_LOG_ERRNO("error", rc));
  }
  return -ECANCELED; /* the host is stopping: a normal end */
}

int main(int argc, char **argv) {
  cancel_signals_block(); /* first: every thread inherits the mask */
  if (argc != 4 || curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    return 2; /* usage: quickstart PORT DATABASE STOCK-URL */
  cancel_host *host = NULL;
  cancel_http_server *srv = NULL;
  cancel_host_options ho = {.shutdown_timeout_ns = CANCEL_SEC(10)};
  int rc = cancel_host_new(&host, "quickstart", &ho);
  cancel_http_route routes[] = {
      {"GET", "/orders/{customer}", get_orders, argv, CANCEL_SEC(1)}};
  cancel_http_options so = {.name = "quickstart", .port = atoi(argv[1])};
  /* The drain follows the host: its 10 s less CANCEL_HTTP_DRAIN_MARGIN. */
  so.host_shutdown_timeout_ns = cancel_host_shutdown_timeout(host);
  if (rc == 0 && (rc = cancel_http_server_new(&srv, &so, routes, 1)) == 0 &&
      (rc = cancel_host_add_worker(host, "http", cancel_http_server_run,
                                   srv)) == 0)
    rc = cancel_host_add_worker(host, "tally", tally, argv[2]);
  int status = rc < 0 ? rc : cancel_host_run(host); /* until SIGTERM */
  if (status < 0)
    fprintf(stderr, "quickstart: %s\n", cancel_strerror(status));
  /* Users first: the host joins its workers, the server's free ends its
   * handler threads (and their curl handles), then curl goes. */
  if (cancel_host_free(host) == -EBUSY)
    return status; /* a worker ignored the stop: exit without it */
  cancel_http_server_free(srv);
  curl_global_cleanup();
  return status < 0 ? 1 : status;
}
