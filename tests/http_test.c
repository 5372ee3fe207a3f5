/*
 * libcancel-http with real client sockets on loopback: every request's
 * token, the edge's answers by reason, deadline headers, graceful stop,
 * and the access lines it logs (captured through the log sink).
 */
#include "test_util.h"

#include "cancel/diag.h"
#include "cancel/http.h"
#include "cancel/log.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

/* The access lines, through the log sink: test_util.h's capture.  A
 * line is found within 2 s: it is written when libmicrohttpd has finished
 * the request. */
#define log_find(out, len, ...)                                                \
  test_log_find_within(out, len, test_tol(CANCEL_SEC(2)), __VA_ARGS__)
#define log_has_level(level) test_log_has_level(level)

/* ---- Handlers
 * ---------------------------------------------------------------- */

/* What a handler saw, for the test to check: written by handlers (on pool
 * threads, many at once) under seen_mu, read by the test through
 * seen_get(), a snapshot taken under the same lock. */
struct seen {
  int64_t returned; /* cancel_now() when it returned */
  int kind;         /* the token's kind when it returned */
  int64_t remaining;
  char origin[96];
  int calls;
};

static pthread_mutex_t seen_mu = PTHREAD_MUTEX_INITIALIZER;
static struct seen seen_w;
static sem_t entered; /* posted when a handler starts */
static sem_t release; /* a BLOCK handler waits for it (ignoring the token) */
/* Handler steps that failed: no cmocka assert on a server thread (it
 * cannot be reported there, only crash the run); the teardown fails the
 * test when this is not 0. */
static int handler_errors;

static const struct seen *seen_get(void) {
  static struct seen snap;
  pthread_mutex_lock(&seen_mu);
  snap = seen_w;
  pthread_mutex_unlock(&seen_mu);
  return &snap;
}

static void seen_reset(void) {
  sem_destroy(&entered);
  sem_destroy(&release);
  pthread_mutex_lock(&seen_mu);
  memset(&seen_w, 0, sizeof seen_w);
  pthread_mutex_unlock(&seen_mu);
  sem_init(&entered, 0, 0);
  sem_init(&release, 0, 0);
}

static void seen_start(const cancel_token *tok) {
  pthread_mutex_lock(&seen_mu);
  seen_w.calls++;
  seen_w.remaining = cancel_token_remaining(tok);
  pthread_mutex_unlock(&seen_mu);
}

static int finish(const cancel_token *tok, int rc) {
  pthread_mutex_lock(&seen_mu);
  seen_w.kind = cancel_token_kind(tok);
  cancel_reason r;
  if (cancel_token_reason(tok, &r) == 1)
    snprintf(seen_w.origin, sizeof seen_w.origin, "%s", r.origin);
  seen_w.returned = cancel_now();
  pthread_mutex_unlock(&seen_mu);
  return rc;
}

static int h_hello(cancel_http_request *req, const cancel_token *tok,
                   void *arg) {
  (void)arg;
  seen_start(tok);
  char body[512];
  size_t blen = 0;
  const void *b = cancel_http_request_body(req, &blen);
  const char *q = cancel_http_request_query(req, "fmt");
  const char *h = cancel_http_request_header(req, "x-test");
  snprintf(body, sizeof body, "id=%s fmt=%s x-test=%s route=%s body=%.*s",
           cancel_http_request_param(req, "id")
               ? cancel_http_request_param(req, "id")
               : "-",
           q ? q : "-", h ? h : "-", cancel_http_request_route(req), (int)blen,
           b ? (const char *)b : "");
  if (cancel_http_respond(req, 200, "text/plain", body, strlen(body)) != 0 ||
      cancel_http_respond_header(req, "X-Served-By", "test") != 0 ||
      cancel_http_respond_header(req, "Bad\r\n", "x") != -EINVAL)
    __atomic_add_fetch(&handler_errors, 1, __ATOMIC_SEQ_CST);
  return finish(tok, 0);
}

/* Waits on its token for up to 30 s: returns -ECANCELED when it fires. */
static int h_wait(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)arg;
  (void)req;
  seen_start(tok);
  sem_post(&entered);
  int rc = cancel_sleep(tok, CANCEL_SEC(30));
  if (rc == 0)
    cancel_http_respond(req, 200, NULL, "slept", 5);
  return finish(tok, rc);
}

/* Ignores its token until the test releases it, then answers 200. */
static int h_block(cancel_http_request *req, const cancel_token *tok,
                   void *arg) {
  (void)arg;
  seen_start(tok);
  sem_post(&entered);
  while (sem_wait(&release) != 0) {
  }
  cancel_http_respond(req, 200, NULL, "done", 4);
  return finish(tok, 0);
}

static int h_fail(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)req;
  return finish(tok, (int)(intptr_t)arg);
}

static int h_nothing(cancel_http_request *req, const cancel_token *tok,
                     void *arg) {
  (void)req;
  (void)arg;
  return finish(tok, 0);
}

static const cancel_http_route routes[] = {
    {"GET", "/hello/{id}", h_hello, NULL, 0},
    {"POST", "/hello/{id}", h_hello, NULL, 0},
    {"GET", "/wait", h_wait, NULL, 0},
    {"GET", "/quick", h_wait, NULL, CANCEL_MSEC(100)},
    {"GET", "/block", h_block, NULL, 0},
    {"GET", "/fail", h_fail, (void *)(intptr_t)-EIO, 0},
    {"GET", "/fake-cancel", h_fail, (void *)(intptr_t)-ECANCELED, 0},
    {"GET", "/nothing", h_nothing, NULL, 0},
};
#define NROUTES (sizeof routes / sizeof routes[0])

/* ---- Server and client
 * --------------------------------------------------------- */

static cancel_http_server *start(const cancel_http_options *o,
                                 const cancel_token *stopping) {
  cancel_http_server *s = NULL;
  assert_int_equal(cancel_http_server_new(&s, o, routes, NROUTES), 0);
  assert_int_equal(cancel_http_server_start(s, stopping), 0);
  assert_true(cancel_http_server_port(s) > 0);
  return s;
}

static void stop(cancel_http_server *s) {
  assert_int_equal(
      cancel_http_server_stop(s, cancel_now() + test_tol(CANCEL_SEC(5))), 0);
  assert_int_equal(cancel_http_server_free(s), 0);
}

static int client_connect(uint16_t port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(fd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), 0);
  return fd;
}

static void send_all(int fd, const char *text) {
  size_t len = strlen(text), off = 0;
  while (off < len) {
    ssize_t n = send(fd, text + off, len - off, MSG_NOSIGNAL);
    assert_true(n > 0);
    off += (size_t)n;
  }
}

/* Reads until the server closes (or 10 s pass); returns the bytes. */
static size_t read_all(int fd, char *buf, size_t len) {
  size_t got = 0;
  int64_t end = cancel_now() + test_tol(CANCEL_SEC(10));
  while (got < len - 1) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int64_t left = (end - cancel_now()) / 1000000;
    if (left <= 0 || poll(&p, 1, (int)left) <= 0)
      break;
    ssize_t n = recv(fd, buf + got, len - 1 - got, 0);
    if (n <= 0)
      break;
    got += (size_t)n;
  }
  buf[got] = '\0';
  return got;
}

/* One request with Connection: close; returns the status, the whole
 * response in resp. */
static int request(uint16_t port, const char *req, char *resp, size_t len) {
  int fd = client_connect(port);
  send_all(fd, req);
  read_all(fd, resp, len);
  close(fd);
  int status = 0;
  if (sscanf(resp, "HTTP/1.%*d %d", &status) != 1)
    return -1;
  return status;
}

static int get(uint16_t port, const char *path, const char *extra, char *resp,
               size_t len) {
  char req[1024];
  snprintf(req, sizeof req,
           "GET %s HTTP/1.1\r\nHost: test\r\nConnection: close\r\n%s\r\n", path,
           extra != NULL ? extra : "");
  return request(port, req, resp, len);
}

static int setup(void **state) {
  (void)state;
  seen_reset();
  __atomic_store_n(&handler_errors, 0, __ATOMIC_SEQ_CST);
  test_log_capture();
  return 0;
}

static int teardown(void **state) {
  test_helpers_teardown(state);
  test_log_release();
  int errors = __atomic_load_n(&handler_errors, __ATOMIC_SEQ_CST);
  if (errors != 0)
    print_error("%d handler step(s) failed (h_hello)\n", errors);
  return errors != 0 ? -1 : 0;
}

/* ---- Tests
 * ---------------------------------------------------------------------- */

static void test_request_completes(void **state) {
  (void)state;
  cancel_http_server *s = start(NULL, NULL);
  char resp[4096], line[2048];
  assert_int_equal(get(cancel_http_server_port(s), "/hello/42?fmt=json",
                       "X-Test: yes\r\n", resp, sizeof resp),
                   200);
  assert_non_null(strstr(resp, "id=42 fmt=json x-test=yes route=/hello/{id}"));
  assert_non_null(strstr(resp, "X-Served-By: test"));
  /* The route's default timeout is on the token: 30 s. */
  assert_i64_gt(seen_get()->remaining, CANCEL_SEC(29));
  assert_i64_le(seen_get()->remaining, CANCEL_SEC(30));
  assert_true(log_find(line, sizeof line, "msg=request", "status=200",
                       "route=/hello/{id}", "path=/hello/42", NULL));
  assert_true(strncmp(line, "20 ", 3) == 0); /* info */

  /* A body. */
  const char *post =
      "POST /hello/7 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
      "Content-Length: 5\r\n\r\nabcde";
  assert_int_equal(request(cancel_http_server_port(s), post, resp, sizeof resp),
                   200);
  assert_non_null(strstr(resp, "id=7 "));
  assert_non_null(strstr(resp, "body=abcde"));
  stop(s);
}

static void test_server_answers_itself(void **state) {
  (void)state;
  cancel_http_options o = {.max_body = 16};
  cancel_http_server *s = start(&o, NULL);
  uint16_t port = cancel_http_server_port(s);
  char resp[4096];
  assert_int_equal(get(port, "/nowhere", NULL, resp, sizeof resp), 404);
  assert_int_equal(get(port, "/hello/1/extra", NULL, resp, sizeof resp), 404);
  char req[512];
  snprintf(req, sizeof req,
           "DELETE /hello/1 HTTP/1.1\r\nHost: t\r\n"
           "Connection: close\r\n\r\n");
  assert_int_equal(request(port, req, resp, sizeof resp), 405);
  assert_non_null(strstr(resp, "Allow: GET, POST"));
  snprintf(
      req, sizeof req,
      "POST /hello/1 HTTP/1.1\r\nHost: t\r\nConnection: close\r\n"
      "Content-Length: 40\r\n\r\n0123456789012345678901234567890123456789");
  assert_int_equal(request(port, req, resp, sizeof resp), 413);
  /* Garbage: libmicrohttpd answers 400 (or closes), nothing crashes. */
  int st = request(port, "\x01\x02 NOT HTTP\r\n\r\n", resp, sizeof resp);
  assert_true(st == 400 || st == -1);
  /* Handler failures: 500, logged at error. */
  assert_int_equal(get(port, "/fail", NULL, resp, sizeof resp), 500);
  char line[2048];
  assert_true(
      log_find(line, sizeof line, "status=500", "route=/fail", "error=", NULL));
  assert_true(strncmp(line, "40 ", 3) == 0);
  assert_int_equal(get(port, "/fake-cancel", NULL, resp, sizeof resp), 500);
  assert_int_equal(get(port, "/nothing", NULL, resp, sizeof resp), 500);
  assert_true(log_find(line, sizeof line, "handler set no response", NULL));
  /* Still serving. */
  assert_int_equal(get(port, "/hello/2", NULL, resp, sizeof resp), 200);
  stop(s);
}

/* The client goes away mid-request: the handler's token fires with kind
 * client gone, nothing is answered, the log says 499 at info. */
static void test_client_gone(void **state) {
  (void)state;
  cancel_http_server *s = start(NULL, NULL);
  int fd = client_connect(cancel_http_server_port(s));
  send_all(fd, "GET /wait HTTP/1.1\r\nHost: t\r\n\r\n");
  assert_int_equal(test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(5))), 0);
  int64_t t0 = cancel_now();
  close(fd);
  char line[2048];
  assert_true(log_find(line, sizeof line, "route=/wait", "status=499", NULL));
  assert_int_equal(seen_get()->kind, CANCEL_CLIENT_GONE);
  assert_true(strncmp(seen_get()->origin, "client 127.0.0.1:", 17) == 0);
  assert_i64_lt(seen_get()->returned - t0, test_tol(CANCEL_MSEC(50)));
  assert_true(strncmp(line, "20 ", 3) == 0); /* info, not an error */
  assert_non_null(strstr(line, "cancel_kind=\"client gone\""));
  assert_non_null(strstr(line, "after_cancel_ms="));
  assert_false(log_has_level(CANCEL_LOG_ERROR));
  assert_int_equal(cancel_http_server_in_flight(s), 0);
  stop(s);
}

/* The route's timeout: 504 and a warning naming the source. */
static void test_route_timeout(void **state) {
  (void)state;
  cancel_http_server *s = start(NULL, NULL);
  char resp[4096], line[2048];
  int64_t t0 = cancel_now();
  assert_int_equal(
      get(cancel_http_server_port(s), "/quick", NULL, resp, sizeof resp), 504);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(100), CANCEL_MSEC(400));
  assert_non_null(strstr(resp, "timeout: route timeout"));
  assert_int_equal(seen_get()->kind, CANCEL_TIMEOUT);
  assert_string_equal(seen_get()->origin, "route timeout");
  assert_true(log_find(line, sizeof line, "status=504",
                       "cancel_origin=\"route timeout\"", NULL));
  assert_true(strncmp(line, "30 ", 3) == 0); /* warn */
  assert_false(log_has_level(CANCEL_LOG_ERROR));
  stop(s);
}

/* The caller's deadline header, shorter than the route's timeout. */
static void test_deadline_headers(void **state) {
  (void)state;
  cancel_http_options o = {.max_deadline_ns = CANCEL_MSEC(300)};
  cancel_http_server *s = start(&o, NULL);
  uint16_t port = cancel_http_server_port(s);
  char resp[4096], line[2048];
  int64_t t0 = cancel_now();
  assert_int_equal(
      get(port, "/wait", "grpc-timeout: 80m\r\n", resp, sizeof resp), 504);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(80), CANCEL_MSEC(400));
  assert_string_equal(seen_get()->origin, "deadline header grpc-timeout");
  assert_i64_le(seen_get()->remaining, CANCEL_MSEC(80));
  assert_true(log_find(line, sizeof line,
                       "cancel_origin=\"deadline header grpc-timeout\"", NULL));

  /* Both headers: the smaller wins. */
  seen_reset();
  assert_int_equal(get(port, "/wait",
                       "grpc-timeout: 5S\r\nX-Request-Timeout-Ms: 60\r\n", resp,
                       sizeof resp),
                   504);
  assert_string_equal(seen_get()->origin,
                      "deadline header X-Request-Timeout-Ms");

  /* Over the cap: capped (300 ms). */
  seen_reset();
  t0 = cancel_now();
  assert_int_equal(
      get(port, "/wait", "grpc-timeout: 10S\r\n", resp, sizeof resp), 504);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(300), CANCEL_MSEC(500));

  /* Malformed: ignored with a warning, the request runs normally. */
  seen_reset();
  assert_int_equal(
      get(port, "/hello/5", "grpc-timeout: 12x\r\n", resp, sizeof resp), 200);
  assert_true(log_find(line, sizeof line, "malformed deadline header",
                       "value=12x", NULL));
  assert_i64_gt(seen_get()->remaining, CANCEL_SEC(29));
  assert_int_equal(
      get(port, "/hello/5",
          "X-Request-Timeout-Ms: -5\r\ngrpc-timeout: 123456789S\r\n", resp,
          sizeof resp),
      200);
  /* Already expired: 504 at once. */
  assert_int_equal(
      get(port, "/wait", "grpc-timeout: 0m\r\n", resp, sizeof resp), 504);
  stop(s);
}

static void test_parse_timeout(void **state) {
  (void)state;
  int64_t ns;
  assert_int_equal(cancel_http_parse_timeout("250m", true, &ns), 0);
  assert_i64_eq(ns, CANCEL_MSEC(250));
  assert_int_equal(cancel_http_parse_timeout("2H", true, &ns), 0);
  assert_i64_eq(ns, CANCEL_SEC(7200));
  assert_int_equal(cancel_http_parse_timeout("99999999H", true, &ns), 0);
  assert_int_equal(cancel_http_parse_timeout("7n", true, &ns), 0);
  assert_i64_eq(ns, 7);
  assert_int_equal(cancel_http_parse_timeout("150", false, &ns), 0);
  assert_i64_eq(ns, CANCEL_MSEC(150));
  const char *bad_grpc[] = {"",     "m",   "123456789m", "10",  "10x",
                            "10mm", "-1m", " 1m",        "1.5S"};
  for (size_t i = 0; i < sizeof bad_grpc / sizeof bad_grpc[0]; i++)
    assert_int_equal(cancel_http_parse_timeout(bad_grpc[i], true, &ns),
                     -EINVAL);
  const char *bad_ms[] = {"", "1m", "-3", "1234567890123", "12 "};
  for (size_t i = 0; i < sizeof bad_ms / sizeof bad_ms[0]; i++)
    assert_int_equal(cancel_http_parse_timeout(bad_ms[i], false, &ns), -EINVAL);
  assert_int_equal(cancel_http_parse_timeout(NULL, false, &ns), -EINVAL);
}

/* Graceful stop: a request in flight finishes within the drain; one that
 * waits on its token is answered 503 when the drain ends; new requests on
 * an open connection get 503 with Connection: close. */
struct client {
  uint16_t port;
  const char *path;
  int status;
  char resp[2048];
};

static void *client_main(void *p) {
  struct client *c = p;
  c->status = get(c->port, c->path, NULL, c->resp, sizeof c->resp);
  return NULL;
}

/* A client's stop (a failed test's teardown): a BLOCK handler returns;
 * the client's read is bounded anyway. */
static void stop_client(void *p) {
  (void)p;
  sem_post(&release);
}

/* A client thread on test_shared() memory: a failed test leaves it to the
 * teardown. */
static struct client *client_start(uint16_t port, const char *path,
                                   pthread_t *t) {
  struct client *c = test_shared(sizeof *c);
  c->port = port;
  c->path = path;
  *t = test_helper_start(client_main, c, stop_client);
  return c;
}

static void test_graceful_stop(void **state) {
  (void)state;
  cancel_source *stopping = new_src("host");
  cancel_http_options o = {.drain_timeout_ns = CANCEL_MSEC(200)};
  cancel_http_server *s = start(&o, TOK(stopping));
  uint16_t port = cancel_http_server_port(s);

  /* A keep-alive connection that is open before the stop. */
  int ka = client_connect(port);
  send_all(ka, "GET /hello/1 HTTP/1.1\r\nHost: t\r\n\r\n");
  char buf[4096];
  struct pollfd p = {.fd = ka, .events = POLLIN};
  assert_int_equal(poll(&p, 1, (int)(test_tol(CANCEL_SEC(5)) / 1000000)), 1);
  assert_true(recv(ka, buf, sizeof buf, 0) > 0);

  pthread_t t;
  struct client *waiting = client_start(port, "/wait", &t);
  assert_int_equal(test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(5))), 0);

  int64_t t0 = cancel_now();
  cancel_source_cancel_with(stopping, CANCEL_SHUTDOWN, "SIGTERM");
  /* New request on the open connection: 503, Connection: close. */
  send_all(ka, "GET /hello/2 HTTP/1.1\r\nHost: t\r\n\r\n");
  size_t n = read_all(ka, buf, sizeof buf);
  assert_true(n > 0);
  assert_non_null(strstr(buf, "HTTP/1.1 503"));
  assert_non_null(strstr(buf, "Connection: close"));
  close(ka);

  assert_int_equal(
      cancel_http_server_stop(s, cancel_now() + test_tol(CANCEL_SEC(5))), 0);
  int64_t took = test_since(t0);
  test_helper_join(t);
  assert_int_equal(waiting->status, 503);
  assert_non_null(strstr(waiting->resp, "Connection: close"));
  assert_int_equal(seen_get()->kind, CANCEL_SHUTDOWN);
  assert_string_equal(seen_get()->origin, "host");
  assert_elapsed_within(took, CANCEL_MSEC(200), CANCEL_MSEC(800));
  char line[2048];
  assert_true(log_find(line, sizeof line, "route=/wait", "status=503",
                       "cancel_kind=shutdown", NULL));
  assert_true(strncmp(line, "20 ", 3) == 0);
  assert_false(log_has_level(CANCEL_LOG_ERROR));
  /* No new connections after the stop. */
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(connect(fd, (struct sockaddr *)&a, sizeof a), -1);
  close(fd);
  assert_int_equal(cancel_http_server_free(s), 0);
  cancel_source_unref(stopping);
}

/* A request that completes inside the drain is answered normally. */
static void test_stop_lets_in_flight_finish(void **state) {
  (void)state;
  cancel_source *stopping = new_src("host");
  cancel_http_options o = {.drain_timeout_ns = CANCEL_SEC(5)};
  cancel_http_server *s = start(&o, TOK(stopping));
  pthread_t t;
  struct client *c = client_start(cancel_http_server_port(s), "/block", &t);
  assert_int_equal(test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_cancel_with(stopping, CANCEL_SHUTDOWN, "SIGTERM");
  sem_post(&release);
  assert_int_equal(
      cancel_http_server_stop(s, cancel_now() + test_tol(CANCEL_SEC(5))), 0);
  test_helper_join(t);
  assert_int_equal(c->status, 200);
  assert_int_equal(cancel_http_server_free(s), 0);
  cancel_source_unref(stopping);
}

/* A handler that ignores its token: the stop times out and says so; the
 * server cannot be freed until it is stopped after the handler returns. */
static void test_stop_times_out_on_stuck_handler(void **state) {
  (void)state;
  cancel_http_options o = {.drain_timeout_ns = CANCEL_MSEC(50)};
  cancel_http_server *s = start(&o, NULL);
  pthread_t t;
  struct client *c = client_start(cancel_http_server_port(s), "/block", &t);
  assert_int_equal(test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(5))), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_http_server_stop(s, t0 + CANCEL_MSEC(100)),
                   -ETIMEDOUT);
  assert_i64_ge(test_since(t0), CANCEL_MSEC(100));
  assert_int_equal(cancel_http_server_free(s), -EBUSY);
  char line[2048];
  assert_true(log_find(line, sizeof line, "stop timed out",
                       "handlers_running=1", NULL));
  sem_post(&release);
  test_helper_join(t);
  assert_int_equal(c->status, 200);
  stop(s);
}

/* 100 clients leave mid-request: every handler stops, none is left busy. */
struct leaver {
  uint16_t port;
  int fd;
};

static void test_many_clients_gone(void **state) {
  (void)state;
  cancel_http_options o = {.threads = 100};
  cancel_http_server *s = start(&o, NULL);
  enum { N = 100 };
  static int fds[N];
  for (int i = 0; i < N; i++) {
    fds[i] = client_connect(cancel_http_server_port(s));
    send_all(fds[i], "GET /wait HTTP/1.1\r\nHost: t\r\n\r\n");
  }
  for (int i = 0; i < N; i++)
    assert_int_equal(test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(10))), 0);
  assert_int_equal(cancel_http_server_in_flight(s), N);
  int64_t t0 = cancel_now();
  for (int i = 0; i < N; i++)
    close(fds[i]);
  int64_t end = t0 + test_tol(CANCEL_MSEC(50)) + CANCEL_MSEC(50);
  while (cancel_http_server_in_flight(s) > 0 && cancel_now() < end)
    test_sleep_ns(CANCEL_USEC(200));
  print_message("100 clients gone: in flight %zu after %.1f ms\n",
                cancel_http_server_in_flight(s), (double)test_since(t0) / 1e6);
  assert_int_equal(cancel_http_server_in_flight(s), 0);
  stop(s);
}

/* A handler that ignores its token after the client left: the watchdog
 * names it by its route, as the server opens a scope around handlers. */
static void test_watchdog_names_handler(void **state) {
  (void)state;
  cancel_watchdog_options wo = {.threshold_ns = CANCEL_MSEC(50),
                                .stack_signal = -1};
  assert_int_equal(cancel_watchdog_start(&wo), 0);
  cancel_http_server *s = start(NULL, NULL);
  int fd = client_connect(cancel_http_server_port(s));
  send_all(fd, "GET /block HTTP/1.1\r\nHost: t\r\n\r\n");
  assert_int_equal(test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(5))), 0);
  close(fd);
  char line[2048];
  assert_true(log_find(line, sizeof line, "scope still running after cancel",
                       "scope=\"GET /block\"", "cancel_kind=\"client gone\"",
                       NULL));
  sem_post(&release);
  assert_true(log_find(line, sizeof line, "scope ended after cancel",
                       "scope=\"GET /block\"", NULL));
  assert_true(log_find(line, sizeof line, "route=/block", "status=499", NULL));
  assert_int_equal(cancel_watchdog_stop(), 0);
  stop(s);
}

/* The plumbing off: handlers get NULL, everything else works. */
static void test_no_cancellation(void **state) {
  (void)state;
  cancel_http_options o = {.no_cancellation = true};
  cancel_http_server *s = start(&o, NULL);
  char resp[2048];
  assert_int_equal(
      get(cancel_http_server_port(s), "/hello/3", NULL, resp, sizeof resp),
      200);
  assert_int_equal(seen_get()->remaining, CANCEL_NEVER);
  stop(s);
}

static void test_bad_arguments(void **state) {
  (void)state;
  cancel_http_server *s = NULL;
  cancel_http_route bad[] = {{"GET", "nope", h_hello, NULL, 0}};
  assert_int_equal(cancel_http_server_new(&s, NULL, bad, 1), -EINVAL);
  bad[0].pattern = "/x";
  bad[0].handler = NULL;
  assert_int_equal(cancel_http_server_new(&s, NULL, bad, 1), -EINVAL);
  assert_int_equal(cancel_http_server_new(NULL, NULL, routes, 1), -EINVAL);
  assert_int_equal(cancel_http_server_new(&s, NULL, NULL, 1), -EINVAL);
  cancel_http_options o = {.bind_address = "localhost"};
  assert_int_equal(cancel_http_server_new(&s, &o, routes, 1), -EINVAL);
  o.bind_address = NULL;
  o.drain_timeout_ns = -1;
  assert_int_equal(cancel_http_server_new(&s, &o, routes, 1), -EINVAL);
  assert_int_equal(cancel_http_server_stop(NULL, 0), -EINVAL);
  assert_int_equal(cancel_http_server_free(NULL), 0);

  /* A port in use. */
  cancel_http_server *a = start(NULL, NULL);
  cancel_http_options same = {.port = cancel_http_server_port(a)};
  assert_int_equal(cancel_http_server_new(&s, &same, routes, NROUTES), 0);
  assert_int_equal(cancel_http_server_start(s, NULL), -EADDRINUSE);
  assert_int_equal(cancel_http_server_stop(s, 0), -EINVAL);
  assert_int_equal(cancel_http_server_free(s), 0);
  assert_int_equal(cancel_http_server_start(a, NULL), -EALREADY);
  stop(a);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_request_completes, setup, teardown),
      cmocka_unit_test_setup_teardown(test_server_answers_itself, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_client_gone, setup, teardown),
      cmocka_unit_test_setup_teardown(test_route_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_deadline_headers, setup, teardown),
      cmocka_unit_test_setup_teardown(test_parse_timeout, setup, teardown),
      cmocka_unit_test_setup_teardown(test_graceful_stop, setup, teardown),
      cmocka_unit_test_setup_teardown(test_stop_lets_in_flight_finish, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_stop_times_out_on_stuck_handler,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_many_clients_gone, setup, teardown),
      cmocka_unit_test_setup_teardown(test_watchdog_names_handler, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_no_cancellation, setup, teardown),
      cmocka_unit_test_setup_teardown(test_bad_arguments, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
