/* needs: curl sqlite */
/* docs/examples/adapters.c: the snippets of docs/adapters.md, as a program
 * (built and run by CTest as docs_adapters; exits 0 when each behaved).
 * The first line tells CMakeLists.txt which adapters it links. */
#include <cancel.h>
#include <cancel/curl.h>
#include <cancel/sqlite.h>

#include <arpa/inet.h>
#include <netinet/in.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static int failures;
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "adapters.c:%d: %s is false\n", __LINE__, #cond);        \
      failures++;                                                              \
    }                                                                          \
  } while (0)

static int add_order(const cancel_token *tok, sqlite3 *db, void *arg) {
  (void)arg;
  int rc = cancel_sqlite_exec(tok, db, "INSERT INTO orders VALUES (42)");
  if (rc < 0)
    return rc; /* -ECANCELED: rolled back */
  return cancel_sqlite_exec(tok, db, "UPDATE stock SET n = n - 1");
}

/* A query that would run for minutes: the token stops it. */
static int count_forever(const cancel_token *tok, sqlite3 *db) {
  sqlite3_stmt *st;
  int rc = cancel_sqlite_prepare(tok, db,
                                 "WITH RECURSIVE c(i) AS (SELECT 1 UNION ALL"
                                 " SELECT i + 1 FROM c) SELECT max(i) FROM c",
                                 -1, &st, NULL);
  if (rc < 0)
    return rc;
  rc = cancel_sqlite_step(tok, st); /* -ECANCELED within microseconds */
  sqlite3_finalize(st);
  return rc;
}

static int fetch(const cancel_token *tok, const char *url) {
  CURL *easy = curl_easy_init();
  if (easy == NULL)
    return -ENOMEM;
  curl_easy_setopt(easy, CURLOPT_URL, url);
  CURLcode code;
  int rc = cancel_curl_perform_ex(tok, easy, NULL, &code);
  /* 0: done; -ECANCELED: the token fired (the connection was closed);
   * -ECONNREFUSED, -EHOSTUNREACH, -EINVAL, -EIO: their failure, code says
   * more */
  curl_easy_cleanup(easy);
  return rc;
}

int main(void) {
  sqlite3 *db;
  if (sqlite3_open(":memory:", &db) != SQLITE_OK ||
      cancel_sqlite_exec(NULL, db, "CREATE TABLE orders(id INTEGER);"
                                   "CREATE TABLE stock(n INTEGER);"
                                   "INSERT INTO stock VALUES (10)") < 0)
    return 1;
  cancel_source *req;
  cancel_source_new(&req, "POST /orders");
  const cancel_token *req_tok = cancel_source_token(req);

  /* BEGIN and the work stop when the token fires; once work returned,
   * COMMIT runs under a shield: the point of no return. */
  int rc = cancel_sqlite_transaction(req_tok, db, add_order, NULL, 0);
  EXPECT(rc == 0);
  cancel_source_cancel_with(req, CANCEL_CLIENT_GONE, "peer closed");
  EXPECT(cancel_sqlite_transaction(req_tok, db, add_order, NULL, 0) ==
         -ECANCELED);
  EXPECT(sqlite3_get_autocommit(db) == 1); /* no transaction left open */
  cancel_source_unref(req);

  cancel_source *budget;
  cancel_source_new_timeout(&budget, "report query", NULL, CANCEL_MSEC(100));
  int64_t t0 = cancel_now();
  EXPECT(count_forever(cancel_source_token(budget), db) == -ECANCELED);
  EXPECT(cancel_now() - t0 < CANCEL_SEC(5));
  cancel_source_unref(budget);
  sqlite3_close(db);

  /* A server that accepts connections and never answers: the kernel
   * completes the handshake from the backlog. */
  struct sockaddr_in a = {.sin_family = AF_INET};
  socklen_t alen = sizeof a;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int lfd = socket(AF_INET, SOCK_STREAM, 0);
  if (lfd < 0 || bind(lfd, (struct sockaddr *)&a, sizeof a) < 0 ||
      listen(lfd, 8) < 0 || getsockname(lfd, (struct sockaddr *)&a, &alen) < 0)
    return 1;
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/slow", ntohs(a.sin_port));
  curl_global_init(CURL_GLOBAL_DEFAULT);
  cancel_source *call;
  cancel_source_new_timeout(&call, "metadata call", NULL, CANCEL_MSEC(100));
  t0 = cancel_now();
  rc = fetch(cancel_source_token(call), url);
  /* -ECANCELED from an adapter: the token fired and its reason is there,
   * also when curl's own timeout (taken from the deadline) went first. */
  cancel_reason why;
  EXPECT(rc == -ECANCELED &&
         cancel_token_reason(cancel_source_token(call), &why) == 1 &&
         why.kind == CANCEL_TIMEOUT && strcmp(why.origin, "metadata call") == 0);
  EXPECT(cancel_now() - t0 < CANCEL_SEC(5));
  cancel_source_unref(call);
  cancel_curl_thread_cleanup(); /* this thread's connections, before: */
  curl_global_cleanup();
  close(lfd);
  printf("adapters: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
