/*
 * An HTTP server under a host: the drain follows the host's shutdown
 * deadline (issue 12, item 6).  Real sockets on loopback, a real host and
 * a real SIGTERM: main() blocks SIGINT and SIGTERM before any thread
 * starts, so the signal the test sends is read by the host's signalfd.
 *
 * The two libraries are linked together only here (CMakeLists.txt), so
 * this file holds the tests that need both.
 */
#include "test_util.h"

#include "cancel/host.h"
#include "cancel/http.h"
#include "cancel/log.h"
#include "cancel/watch.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

/* ---- Handlers ------------------------------------------------------------ */

/* What the handler saw: written on a pool thread before it returns, read
 * by the test after the host has stopped (the pool is joined by then). */
static struct {
  int64_t returned; /* cancel_now() when it returned */
  int kind;         /* its token's kind then */
} seen;
static sem_t entered; /* posted when a handler starts */
static sem_t release; /* h_block waits for it, ignoring its token */

/* Waits on its token for up to 30 s: -ECANCELED when it fires. */
static int h_wait(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)req;
  (void)arg;
  sem_post(&entered);
  int rc = cancel_sleep(tok, CANCEL_SEC(30));
  seen.kind = cancel_token_kind(tok);
  seen.returned = cancel_now();
  return rc;
}

/* Ignores its token until the test releases it. */
static int h_block(cancel_http_request *req, const cancel_token *tok,
                   void *arg) {
  (void)arg;
  sem_post(&entered);
  while (sem_wait(&release) != 0) {
  }
  seen.kind = cancel_token_kind(tok);
  seen.returned = cancel_now();
  return cancel_http_respond(req, 200, NULL, "late", 4);
}

static const cancel_http_route routes[] = {
    {"GET", "/wait", h_wait, NULL, 0},
    {"GET", "/block", h_block, NULL, 0},
};
#define NROUTES (sizeof routes / sizeof routes[0])

/* ---- A client that is a worker of the host ------------------------------- */

/* The client worker: sends `path`, waits until a handler has it, sends
 * SIGTERM to the process, then reads the answer.  Its fields are written
 * on the worker's thread and read by the test after cancel_host_run()
 * joined it. */
struct client {
  uint16_t port;
  const char *path;
  int64_t sigterm_at;
  bool no_read; /* leave after the SIGTERM without the answer */
  int status;   /* of the answer; 0 none */
  int err;      /* a step that failed: asserted by the test */
};

static int client_worker(const cancel_token *stopping, void *arg) {
  struct client *c = arg;
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(c->port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    c->err = -errno;
    if (fd >= 0)
      close(fd);
    return c->err;
  }
  char req[256], resp[4096];
  int n = snprintf(req, sizeof req,
                   "GET %s HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n",
                   c->path);
  if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n ||
      test_sem_wait_ns(&entered, test_tol(CANCEL_SEC(5))) != 0) {
    c->err = -EIO;
    close(fd);
    return c->err;
  }
  c->sigterm_at = cancel_now();
  if (kill(getpid(), SIGTERM) != 0)
    c->err = -errno;
  if (c->no_read) {
    /* The signal reaches the host on the library's thread: wait for the
     * stop, which makes -ECANCELED this worker's clean return. */
    int rc = cancel_sleep(stopping, test_tol(CANCEL_SEC(5)));
    close(fd);
    return rc == -ECANCELED ? rc : -EIO;
  }
  /* The answer comes after the drain, long after stopping fired: a plain
   * bounded read, not one on the (cancelled) stopping token. */
  size_t got = 0;
  int64_t end = cancel_now() + test_tol(CANCEL_SEC(10));
  while (got < sizeof resp - 1) {
    struct pollfd p = {.fd = fd, .events = POLLIN};
    int64_t left = (end - cancel_now()) / CANCEL_MSEC(1);
    if (left <= 0 || poll(&p, 1, (int)left) <= 0)
      break;
    ssize_t r = recv(fd, resp + got, sizeof resp - 1 - got, 0);
    if (r <= 0)
      break;
    got += (size_t)r;
  }
  resp[got] = '\0';
  close(fd);
  if (sscanf(resp, "HTTP/1.%*d %d", &c->status) != 1)
    c->status = 0;
  return cancel_token_is_cancelled(stopping) ? -ECANCELED : -EIO;
}

/* A host of `timeout` and a server under it, started on the host's
 * stopping token (main() does it so, to learn the port), its worker added
 * first.  The server's drain is left to the host. */
static cancel_http_server *server_under(cancel_host **hp, int64_t timeout) {
  cancel_host_options ho = {.shutdown_timeout_ns = timeout,
                            .no_force_exit = true};
  assert_int_equal(cancel_host_new(hp, "svc", &ho), 0);
  cancel_http_options so = {
      .threads = 2,
      .host_shutdown_timeout_ns = cancel_host_shutdown_timeout(*hp),
  };
  cancel_http_server *s = NULL;
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), 0);
  assert_int_equal(cancel_http_server_start(s, cancel_host_stopping(*hp)), 0);
  assert_int_equal(
      cancel_host_add_worker(*hp, "http", cancel_http_server_run, s), 0);
  return s;
}

static int setup(void **state) {
  (void)state;
  memset(&seen, 0, sizeof seen);
  sem_init(&entered, 0, 0);
  sem_init(&release, 0, 0);
  test_log_capture();
  return 0;
}

static int teardown(void **state) {
  test_helpers_teardown(state);
  test_log_release();
  sem_destroy(&entered);
  sem_destroy(&release);
  return 0;
}

/* ---- Tests --------------------------------------------------------------- */

/* The drain left 0 under a host of 1.2 s is 1.2 s less the margin (300
 * ms): a handler that waits on its token is cancelled 900 ms after the
 * SIGTERM, the margin before the host's deadline, answers 503, and the
 * host stops cleanly. */
static void test_drain_follows_host_deadline(void **state) {
  (void)state;
  const int64_t timeout = CANCEL_MSEC(1200);
  const int64_t margin = CANCEL_HTTP_DRAIN_MARGIN(timeout);
  assert_i64_eq(margin, CANCEL_MSEC(300));
  cancel_host *h;
  cancel_http_server *s = server_under(&h, timeout);
  struct client c = {.port = cancel_http_server_port(s), .path = "/wait"};
  assert_int_equal(cancel_host_add_worker(h, "client", client_worker, &c), 0);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  assert_int_equal(c.err, 0);
  assert_int_equal(c.status, 503);
  assert_int_equal(seen.kind, CANCEL_SHUTDOWN);
  int64_t deadline = cancel_host_shutdown_deadline(h);
  assert_i64_ne(deadline, CANCEL_NEVER);
  /* The deadline counts from the signal's arrival, a little after the
   * client sent it. */
  assert_i64_ge(deadline, c.sigterm_at + timeout);
  int64_t want = deadline - margin;
  print_message("handler cancelled %.1f ms after SIGTERM; host deadline - "
                "margin at %.1f ms; late by %.3f ms\n",
                (double)(seen.returned - c.sigterm_at) / 1e6,
                (double)(want - c.sigterm_at) / 1e6,
                (double)(seen.returned - want) / 1e6);
  /* Never before (the drain's lower bound is the contract), and within
   * the tolerance after. */
  assert_i64_ge(seen.returned, want);
  assert_i64_le(seen.returned - want, test_tol(CANCEL_MSEC(100)));
  char line[2048];
  assert_true(test_log_find_within(line, sizeof line, 0, "msg=stopping",
                                   "component=http", "drain_ms=900", NULL));
  assert_true(test_log_find_within(line, sizeof line, 0, "route=/wait",
                                   "status=503", "cancel_kind=shutdown", NULL));
  assert_false(test_log_has_level(CANCEL_LOG_ERROR));
  assert_int_equal(cancel_http_server_free(s), 0);
  assert_int_equal(cancel_host_free(h), 0);
}

/* An explicit drain that does not end the margin before the host's
 * deadline is refused with -EINVAL and a line naming both values; one that
 * ends exactly then is accepted. */
static void test_drain_outlasting_host_rejected(void **state) {
  (void)state;
  cancel_host *h;
  cancel_host_options ho = {.shutdown_timeout_ns = CANCEL_SEC(1)};
  assert_int_equal(cancel_host_new(&h, "svc", &ho), 0);
  assert_i64_eq(cancel_host_shutdown_timeout(h), CANCEL_SEC(1));
  cancel_http_options so = {
      .name = "api",
      .drain_timeout_ns = CANCEL_MSEC(800),
      .host_shutdown_timeout_ns = cancel_host_shutdown_timeout(h),
  };
  cancel_http_server *s = (cancel_http_server *)&so; /* overwritten */
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), -EINVAL);
  assert_null(s);
  char line[2048];
  assert_true(test_log_find_within(
      line, sizeof line, 0, "msg=\"drain outlasts the host's shutdown\"",
      "server=api", "drain_ms=800", "host_shutdown_timeout_ms=1000",
      "margin_ms=250", "max_drain_ms=750", NULL));
  assert_true(strncmp(line, "40 ", 3) == 0); /* CANCEL_LOG_ERROR */

  /* The host's whole timeout is no better. */
  so.drain_timeout_ns = CANCEL_SEC(1);
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), -EINVAL);
  /* Ending with the margin is fine, and so is ending sooner. */
  so.drain_timeout_ns = CANCEL_MSEC(750);
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), 0);
  assert_int_equal(cancel_http_server_free(s), 0);
  so.drain_timeout_ns = CANCEL_MSEC(10);
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), 0);
  assert_int_equal(cancel_http_server_free(s), 0);
  /* A negative host timeout is a negative time. */
  so.host_shutdown_timeout_ns = -1;
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), -EINVAL);
  assert_int_equal(cancel_host_free(h), 0);
  assert_i64_eq(cancel_host_shutdown_timeout(NULL), 0);
}

/* Starts s on stopping, fires it and stops: the server's "stopping" line
 * says the drain it had. */
static void drain_logged(cancel_http_server *s, cancel_source *stopping,
                         const char *drain_ms) {
  assert_int_equal(cancel_http_server_start(s, cancel_source_token(stopping)),
                   0);
  cancel_source_cancel_with(stopping, CANCEL_SHUTDOWN, "test");
  assert_int_equal(
      cancel_http_server_stop(s, cancel_now() + test_tol(CANCEL_SEC(5))), 0);
  assert_true(test_log_find_within(NULL, 0, 0, "msg=stopping", "component=http",
                                   drain_ms, NULL));
  assert_int_equal(cancel_http_server_free(s), 0);
}

/* The defaults: a server without a host keeps its 20 s drain; under a
 * host with the default 30 s timeout the drain is 29 s. */
static void test_drain_defaults(void **state) {
  (void)state;
  cancel_http_server *s;
  cancel_source *stopping = new_src("process");
  assert_int_equal(cancel_http_server_new(&s, NULL, routes, NROUTES), 0);
  drain_logged(s, stopping, "drain_ms=20000");
  cancel_source_unref(stopping);

  test_log_forget();
  cancel_host *h;
  assert_int_equal(cancel_host_new(&h, "svc", NULL), 0);
  assert_i64_eq(cancel_host_shutdown_timeout(h),
                CANCEL_HOST_DEFAULT_SHUTDOWN_TIMEOUT);
  cancel_http_options so = {.host_shutdown_timeout_ns =
                                cancel_host_shutdown_timeout(h)};
  assert_int_equal(cancel_http_server_new(&s, &so, routes, NROUTES), 0);
  stopping = new_src("process");
  drain_logged(s, stopping, "drain_ms=29000");
  cancel_source_unref(stopping);
  assert_int_equal(cancel_host_free(h), 0);
}

/* The index of the first captured line holding every needle, -1. */
static int line_index(const char *a, const char *b) {
  struct test_log *l = test_log();
  int found = -1;
  pthread_mutex_lock(&l->mu);
  for (int i = 0; i < l->n && found < 0; i++)
    if (strstr(l->lines[i], a) != NULL && strstr(l->lines[i], b) != NULL)
      found = i;
  pthread_mutex_unlock(&l->mu);
  return found;
}

/* A handler that ignores its token: the server's worker gives up on it
 * half the margin before the host's deadline (1.05 s after the SIGTERM
 * for 1.2 s) and returns, so the server's own report (which handler
 * count, how long it waited) comes first, and the host's report at its
 * deadline names the drain shield the stuck request holds open, not a
 * worker "http" it could only call running. */
static void test_run_stops_before_host_deadline(void **state) {
  (void)state;
  const int64_t timeout = CANCEL_MSEC(1200);
  cancel_host *h;
  cancel_http_server *s = server_under(&h, timeout);
  struct client c = {
      .port = cancel_http_server_port(s), .path = "/block", .no_read = true};
  assert_int_equal(cancel_host_add_worker(h, "client", client_worker, &c), 0);

  /* The stuck handler keeps the server's drain shield open: the host
   * exits by its deadline. */
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_TIMEOUT);
  assert_int_equal(c.err, 0);
  int server = line_index("msg=\"stop timed out\"", "handlers_running=1");
  int failed = line_index("worker=http", "error=");
  int host = line_index("msg=\"shutdown timed out\"", "workers_running=0");
  assert_true(server >= 0);
  assert_true(failed > server);
  assert_true(host > failed);
  assert_int_equal(test_log_count("did not stop in time", NULL), 0);
  /* The handler still runs: the server cannot be freed until it is done. */
  assert_int_equal(cancel_http_server_free(s), -EBUSY);
  sem_post(&release);
  assert_int_equal(
      cancel_http_server_stop(s, cancel_now() + test_tol(CANCEL_SEC(5))), 0);
  /* Its client left at the SIGTERM: that is what its token says. */
  assert_int_equal(seen.kind, CANCEL_CLIENT_GONE);
  assert_int_equal(cancel_http_server_free(s), 0);
  assert_int_equal(cancel_host_free(h), 0);
}

int main(void) {
  /* Before any thread starts: every thread inherits the mask. */
  cancel_signals_block();
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_drain_follows_host_deadline, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_drain_outlasting_host_rejected,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_drain_defaults, setup, teardown),
      cmocka_unit_test_setup_teardown(test_run_stops_before_host_deadline,
                                      setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
