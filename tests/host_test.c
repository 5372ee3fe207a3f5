/*
 * The host (include/cancel/host.h): workers on real threads, the stopping
 * token fired by a real SIGTERM, by cancel_host_stop and by a failing
 * worker, the shutdown deadline with a worker that ignores its token, open
 * shields waited for, the forced exit on a second signal (in a child
 * process), and sd_notify datagrams on real AF_UNIX sockets.
 *
 * main() blocks SIGINT and SIGTERM before anything else, so that every
 * thread of the test (the library's, cmocka's, the workers) inherits the
 * mask and a kill(getpid(), SIGTERM) is read by the host's signalfd.
 *
 * Every test captures the host's log lines with cancel_log_set_sink and
 * asserts on their level and fields (HOST_TEST_VERBOSE=1 echoes them).
 * Shutdown timeouts are short (200 ms); upper bounds on durations go
 * through test_tol().
 */
#include "test_util.h"

#include "cancel/host.h"
#include "cancel/log.h"
#include "cancel/watch.h"

#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

#define SHORT_TIMEOUT CANCEL_MSEC(200)

/* ---- Captured log lines ------------------------------------------------ */

#define MAX_LINES 256
#define LINE_LEN 2048

static struct {
  pthread_mutex_t mu;
  size_t n;
  int level[MAX_LINES];
  char line[MAX_LINES][LINE_LEN];
} cap = {.mu = PTHREAD_MUTEX_INITIALIZER};

static void capture_sink(int level, const char *line, size_t len, void *arg) {
  (void)arg;
  (void)len;
  if (getenv("HOST_TEST_VERBOSE") != NULL)
    fprintf(stderr, "  | %s\n", line);
  pthread_mutex_lock(&cap.mu);
  if (cap.n < MAX_LINES) {
    cap.level[cap.n] = level;
    snprintf(cap.line[cap.n], LINE_LEN, "%s", line);
    cap.n++;
  }
  pthread_mutex_unlock(&cap.mu);
}

static int setup(void **state) {
  (void)state;
  pthread_mutex_lock(&cap.mu);
  cap.n = 0;
  pthread_mutex_unlock(&cap.mu);
  cancel_log_set_sink(capture_sink, NULL, CANCEL_LOG_DEBUG);
  return 0;
}

static int teardown(void **state) {
  (void)state;
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
  return 0;
}

/* The value of `key` in a logfmt line (unquoted, escapes resolved) into
 * buf.  Returns true when the key is there. */
static bool lf_get(const char *line, const char *key, char *buf, size_t len) {
  size_t kl = strlen(key);
  for (const char *p = strstr(line, key); p != NULL; p = strstr(p + 1, key)) {
    if ((p != line && p[-1] != ' ') || p[kl] != '=')
      continue;
    const char *v = p + kl + 1;
    size_t n = 0;
    if (*v == '"') {
      for (v++; *v != '\0' && *v != '"'; v++) {
        if (*v == '\\' && v[1] != '\0')
          v++;
        if (n + 1 < len)
          buf[n++] = *v;
      }
    } else {
      for (; *v != '\0' && *v != ' '; v++)
        if (n + 1 < len)
          buf[n++] = *v;
    }
    buf[n] = '\0';
    return true;
  }
  return false;
}

/* Does line have msg=`msg` and every "key=value" of the NULL-terminated
 * list? */
static bool line_matches(const char *line, const char *msg, va_list ap) {
  char v[LINE_LEN];
  if (!lf_get(line, "msg", v, sizeof v) || strcmp(v, msg) != 0)
    return false;
  const char *kv;
  while ((kv = va_arg(ap, const char *)) != NULL) {
    char key[64];
    const char *eq = strchr(kv, '=');
    size_t kl = (size_t)(eq - kv);
    memcpy(key, kv, kl);
    key[kl] = '\0';
    if (!lf_get(line, key, v, sizeof v) || strcmp(v, eq + 1) != 0)
      return false;
  }
  return true;
}

static void dump_lines(void) {
  pthread_mutex_lock(&cap.mu);
  for (size_t i = 0; i < cap.n; i++)
    print_message("  log[%zu] %s\n", i, cap.line[i]);
  pthread_mutex_unlock(&cap.mu);
}

/* The index of the first captured line with msg and the key=value pairs
 * (NULL-terminated), -1 if none; copies the line and its level out. */
static int find_line(int *level, char *out, const char *msg, ...) {
  int found = -1;
  pthread_mutex_lock(&cap.mu);
  for (size_t i = 0; i < cap.n && found < 0; i++) {
    va_list ap;
    va_start(ap, msg);
    if (line_matches(cap.line[i], msg, ap)) {
      found = (int)i;
      if (level != NULL)
        *level = cap.level[i];
      if (out != NULL)
        snprintf(out, LINE_LEN, "%s", cap.line[i]);
    }
    va_end(ap);
  }
  pthread_mutex_unlock(&cap.mu);
  return found;
}

/* Asserts that a line with msg and the pairs exists at `level`; copies it
 * into out (may be NULL). */
#define assert_line(level, out, msg, ...)                                      \
  do {                                                                         \
    int lvl_ = -1;                                                             \
    if (find_line(&lvl_, (out), (msg), __VA_ARGS__, (const char *)NULL) < 0) { \
      dump_lines();                                                            \
      print_error("no log line msg=\"%s\" with %s\n", (msg), #__VA_ARGS__);    \
      fail();                                                                  \
    }                                                                          \
    if (lvl_ != (level)) {                                                     \
      dump_lines();                                                            \
      print_error("line msg=\"%s\" has level %s\n", (msg),                     \
                  cancel_log_level_name(lvl_));                                \
      fail();                                                                  \
    }                                                                          \
  } while (0)

#define assert_no_line(msg, ...)                                               \
  do {                                                                         \
    if (find_line(NULL, NULL, (msg), __VA_ARGS__, (const char *)NULL) >= 0) {  \
      dump_lines();                                                            \
      print_error("unexpected log line msg=\"%s\"\n", (msg));                  \
      fail();                                                                  \
    }                                                                          \
  } while (0)

/* How many captured lines have at least `level`. */
static size_t count_at_least(int level) {
  size_t n = 0;
  pthread_mutex_lock(&cap.mu);
  for (size_t i = 0; i < cap.n; i++)
    n += cap.level[i] >= level;
  pthread_mutex_unlock(&cap.mu);
  return n;
}

static void assert_no_warnings(void) {
  if (count_at_least(CANCEL_LOG_WARN) != 0) {
    dump_lines();
    fail_msg("a warning or an error was logged");
  }
}

/* An integer field of a line. */
static int64_t field_i64(const char *line, const char *key) {
  char v[64];
  assert_true(lf_get(line, key, v, sizeof v));
  return strtoll(v, NULL, 10);
}

/* A tolerance in milliseconds, as the log lines count. */
static int64_t ms_tol(int64_t ns) {
  return test_tol(ns) / CANCEL_MSEC(1);
}

/* ---- Hosts and workers --------------------------------------------------- */

static cancel_host *new_host(const char *name, const cancel_host_options *o) {
  cancel_host *h = NULL;
  assert_int_equal(cancel_host_new(&h, name, o), 0);
  assert_non_null(h);
  return h;
}

static cancel_host_options quiet_opts(int64_t timeout) {
  cancel_host_options o;
  memset(&o, 0, sizeof o);
  o.shutdown_timeout_ns = timeout;
  o.no_signals = true;
  return o;
}

static cancel_reason stop_reason(cancel_host *h) {
  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_host_stopping(h), &r), 1);
  return r;
}

/* Waits for the stop, returns what a well-behaved worker returns. */
static int wait_for_stop(const cancel_token *stopping, void *arg) {
  (void)arg;
  return cancel_sleep(stopping, CANCEL_SEC(3600));
}

/* A worker's record, for the workers below. */
struct rec {
  cancel_host *h;
  sem_t ready;   /* posted when the worker reached its wait */
  int64_t at;    /* when it did what it reports */
  int rc;        /* what its wait returned */
  int64_t sleep; /* how long it sleeps */
  int value;     /* what it returns */
  bool flag;     /* what it observed */
  sem_t *gate;   /* stop_later: wait for this first */
  int err;       /* a step that failed (no cmocka assert off the test's
                    thread): the test asserts it is 0 after the join */
};

static void rec_init(struct rec *r, cancel_host *h) {
  memset(r, 0, sizeof *r);
  r->h = h;
  sem_init(&r->ready, 0, 0);
}

/* Sends SIGTERM to the process, then waits for the stop like any worker. */
static int sigterm_sender(const cancel_token *stopping, void *arg) {
  struct rec *r = arg;
  r->at = cancel_now();
  if (kill(getpid(), SIGTERM) != 0)
    r->err = -errno;
  return cancel_sleep(stopping, CANCEL_SEC(3600));
}

/* Requests the stop, then returns 0 at once (it is done). */
static int stopper(const cancel_token *stopping, void *arg) {
  struct rec *r = arg;
  (void)stopping;
  r->at = cancel_now();
  r->rc = cancel_host_stop(r->h, "test done");
  return 0;
}

/* Returns r->value after r->sleep (with the token: returns early, with
 * -ECANCELED, on a stop). */
static int returns_value(const cancel_token *stopping, void *arg) {
  struct rec *r = arg;
  if (r->sleep > 0 && cancel_sleep(stopping, r->sleep) == -ECANCELED)
    return -ECANCELED;
  r->at = cancel_now();
  return r->value;
}

/* Ignores the token: a plain nanosleep for r->sleep, then returns 0. */
static int ignores_token(const cancel_token *stopping, void *arg) {
  struct rec *r = arg;
  (void)stopping;
  sem_post(&r->ready);
  test_sleep_ns(r->sleep);
  r->at = cancel_now();
  return 0;
}

/* A plain thread that stops the host r->sleep after r->gate was posted
 * (or after it started, without a gate). */
static void *stop_later(void *arg) {
  struct rec *r = arg;
  if (r->gate != NULL &&
      test_sem_wait_ns(r->gate, test_tol(CANCEL_SEC(5))) != 0)
    r->err = -ETIMEDOUT; /* stops all the same: run returns */
  test_sleep_ns(r->sleep);
  r->at = cancel_now();
  r->rc = cancel_host_stop(r->h, "admin request");
  return NULL;
}

/* ---- Stopping ------------------------------------------------------------ */

/* A real SIGTERM to the process stops the host: kind shutdown, origin the
 * host, detail "SIGTERM"; both workers stop with -ECANCELED, at info. */
static void test_stop_by_sigterm(void **state) {
  (void)state;
  cancel_host_options o = {.shutdown_timeout_ns = CANCEL_SEC(5)};
  cancel_host *h = new_host("svc", &o);
  struct rec *sender = test_shared(sizeof *sender);
  rec_init(sender, h);
  assert_int_equal(cancel_host_add_worker(h, "sender", sigterm_sender, sender),
                   0);
  assert_int_equal(cancel_host_add_worker(h, "waiter", wait_for_stop, NULL), 0);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  int64_t back = cancel_now();

  cancel_reason r = stop_reason(h);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "svc");
  assert_string_equal(r.detail, "SIGTERM");
  assert_int_equal(sender->err, 0);
  assert_i64_ge(r.time, sender->at);
  assert_i64_lt(back - sender->at, test_tol(CANCEL_SEC(1)));
  assert_i64_eq(cancel_host_shutdown_deadline(h), r.time + CANCEL_SEC(5));

  assert_line(CANCEL_LOG_INFO, NULL, "started", "host=svc", "workers=2",
              "signals=watched", "shutdown_timeout_ms=5000");
  assert_line(CANCEL_LOG_INFO, NULL, "worker started", "worker=sender");
  assert_line(CANCEL_LOG_INFO, NULL, "stopping", "host=svc",
              "cancel_kind=shutdown", "cancel_origin=svc",
              "cancel_detail=SIGTERM");
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=sender",
              "result=cancelled");
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=waiter",
              "result=cancelled");
  assert_line(CANCEL_LOG_INFO, NULL, "stopped", "host=svc", "status=0");
  assert_no_warnings();
  assert_int_equal(cancel_host_free(h), 0);
}

/* cancel_host_stop from another thread: the deadline appears with the
 * stop; the first request wins. */
static void test_stop_by_request(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  assert_int_equal(cancel_host_add_worker(h, "a", wait_for_stop, NULL), 0);
  assert_int_equal(cancel_host_add_worker(h, "b", wait_for_stop, NULL), 0);
  assert_i64_eq(cancel_host_shutdown_deadline(h), CANCEL_NEVER);
  assert_false(cancel_token_is_cancelled(cancel_host_stopping(h)));

  struct rec *admin = test_shared(sizeof *admin);
  rec_init(admin, h);
  admin->sleep = CANCEL_MSEC(50);
  pthread_t t = test_helper_start(stop_later, admin, test_no_stop);
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  int64_t back = cancel_now();
  test_helper_join(t);
  assert_int_equal(admin->err, 0);

  assert_int_equal(admin->rc, 1);
  assert_int_equal(cancel_host_stop(h, "too late"), 0);
  cancel_reason r = stop_reason(h);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.detail, "admin request");
  assert_i64_ge(r.time, admin->at);
  assert_i64_lt(back - r.time, test_tol(CANCEL_MSEC(500)));
  assert_i64_eq(cancel_host_shutdown_deadline(h), r.time + SHORT_TIMEOUT);
  assert_line(CANCEL_LOG_INFO, NULL, "started", "signals=off");
  assert_line(CANCEL_LOG_INFO, NULL, "stopping", "cancel_kind=shutdown",
              "cancel_detail=admin request", "timeout_ms=200");
  assert_no_warnings();
  assert_int_equal(cancel_host_free(h), 0);
}

/* -ECANCELED after the stop is normal control flow: "worker stopped" at
 * info with result=cancelled, and the time the worker took to honour the
 * stop (asked_ms); a worker that returns 0 is "done".  No warning, no
 * error.  The stop comes from a worker. */
static void test_cancelled_is_info(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  struct rec *stop = test_shared(sizeof *stop);
  rec_init(stop, h);
  assert_int_equal(cancel_host_add_worker(h, "cancelled", wait_for_stop, NULL),
                   0);
  assert_int_equal(cancel_host_add_worker(h, "stopper", stopper, stop), 0);
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  assert_int_equal(stop->rc, 1);

  char line[LINE_LEN];
  assert_line(CANCEL_LOG_INFO, line, "worker stopped", "worker=cancelled",
              "result=cancelled");
  assert_i64_ge(field_i64(line, "duration_ms"), 0);
  assert_i64_lt(field_i64(line, "asked_ms"), ms_tol(CANCEL_MSEC(500)));
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=stopper",
              "result=done");
  assert_line(CANCEL_LOG_INFO, NULL, "stopping", "cancel_detail=test done");
  assert_no_line("worker failed", "host=svc");
  assert_no_warnings();
  assert_int_equal(cancel_host_free(h), 0);
}

/* ---- Failures ------------------------------------------------------------ */

/* A worker that fails stops the host: an error line naming it with its
 * error, the stop's detail names it, the others stop normally, and the
 * exit status says a worker failed. */
static void test_failing_worker_stops_host(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  struct rec *broken = test_shared(sizeof *broken);
  rec_init(broken, h);
  broken->sleep = CANCEL_MSEC(20);
  broken->value = -EIO;
  assert_int_equal(cancel_host_add_worker(h, "steady", wait_for_stop, NULL), 0);
  assert_int_equal(cancel_host_add_worker(h, "broken", returns_value, broken),
                   0);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_FAILED);
  cancel_reason r = stop_reason(h);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "svc");
  assert_string_equal(r.detail, "worker broken failed");
  assert_i64_ge(r.time, broken->at);

  char line[LINE_LEN];
  assert_line(CANCEL_LOG_ERROR, line, "worker failed", "worker=broken",
              "code=-5", "error=Input/output error");
  assert_i64_ge(field_i64(line, "duration_ms"), 20);
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=steady",
              "result=cancelled");
  assert_line(CANCEL_LOG_INFO, NULL, "stopping",
              "cancel_detail=worker broken failed");
  assert_line(CANCEL_LOG_WARN, NULL, "stopped", "status=1");
  assert_int_equal(count_at_least(CANCEL_LOG_ERROR), 1);
  assert_int_equal(cancel_host_free(h), 0);
}

/* -ECANCELED while the host has not been asked to stop means something
 * else cancelled the worker: a failure, not a stop. */
static int cancelled_by_other(const cancel_token *stopping, void *arg) {
  (void)stopping;
  (void)arg;
  /* Not new_src(): no cmocka assert on a worker's thread.  A source that
   * cannot be made is this worker's failure, which the test sees. */
  cancel_source *mine = NULL;
  int made = cancel_source_new(&mine, "mine");
  if (made != 0)
    return made;
  cancel_source_cancel(mine);
  int rc = cancel_sleep(TOK(mine), CANCEL_SEC(10));
  cancel_source_unref(mine);
  return rc;
}

static void test_cancelled_before_stop_is_failure(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  assert_int_equal(
      cancel_host_add_worker(h, "confused", cancelled_by_other, NULL), 0);
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_FAILED);
  assert_string_equal(stop_reason(h).detail, "worker confused failed");
  assert_line(CANCEL_LOG_ERROR, NULL, "worker failed", "worker=confused",
              "code=-125");
  assert_int_equal(cancel_host_free(h), 0);
}

static bool failure_logged(void *arg) {
  return find_line(NULL, NULL, "worker failed", (const char *)arg,
                   (const char *)NULL) >= 0;
}

/* The steady worker of the next test: waits until the failure was logged,
 * a moment more, notes whether the host was stopped, then is done. */
static int outlives_failure(const cancel_token *stopping, void *arg) {
  struct rec *r = arg;
  r->rc =
      test_wait_until(failure_logged, "worker=broken", test_tol(CANCEL_SEC(5)))
          ? 0
          : -ETIMEDOUT;
  /* The stop, if the host wrongly asked for it, follows the log line. */
  test_sleep_ns(CANCEL_MSEC(50));
  r->flag = cancel_token_is_cancelled(stopping);
  return 0;
}

/* keep_running_on_failure: the failure is logged, the others keep
 * running; once they are done the status still says a worker failed. */
static void test_keep_running_on_failure(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  o.keep_running_on_failure = true;
  cancel_host *h = new_host("svc", &o);
  struct rec *broken = test_shared(sizeof *broken),
             *steady = test_shared(sizeof *steady);
  rec_init(broken, h);
  rec_init(steady, h);
  broken->value = -EIO;
  assert_int_equal(cancel_host_add_worker(h, "broken", returns_value, broken),
                   0);
  assert_int_equal(
      cancel_host_add_worker(h, "steady", outlives_failure, steady), 0);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_FAILED);
  assert_int_equal(steady->rc, 0);
  assert_false(steady->flag); /* still running after the failure */
  assert_string_equal(stop_reason(h).detail, "all workers returned");
  assert_line(CANCEL_LOG_ERROR, NULL, "worker failed", "worker=broken");
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=steady",
              "result=done");
  assert_line(CANCEL_LOG_INFO, NULL, "stopping",
              "cancel_detail=all workers returned");
  assert_int_equal(cancel_host_free(h), 0);
}

/* ---- The shutdown deadline ----------------------------------------------- */

static bool host_freed(void *arg) {
  return cancel_host_free(arg) == 0;
}

/* A worker that ignores the token (a plain nanosleep) is named in the
 * report with how long ago it was asked to stop; run returns at the
 * deadline with CANCEL_HOST_EXIT_TIMEOUT, and the host cannot be freed
 * until the worker returns. */
static void test_stuck_worker_reported(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  struct rec *poller = test_shared(sizeof *poller),
             *admin = test_shared(sizeof *admin);
  rec_init(poller, h);
  rec_init(admin, h);
  /* Longer than run takes to give up, even when that is late. */
  poller->sleep = SHORT_TIMEOUT + test_tol(CANCEL_MSEC(600));
  admin->gate = &poller->ready;
  assert_int_equal(cancel_host_add_worker(h, "poller", ignores_token, poller),
                   0);
  assert_int_equal(cancel_host_add_worker(h, "good", wait_for_stop, NULL), 0);
  pthread_t t = test_helper_start(stop_later, admin, test_no_stop);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_TIMEOUT);
  int64_t back = cancel_now();
  test_helper_join(t);
  assert_int_equal(admin->err, 0);
  int64_t asked = stop_reason(h).time;
  assert_elapsed_within(back - asked, SHORT_TIMEOUT, CANCEL_MSEC(300));

  char line[LINE_LEN];
  assert_line(CANCEL_LOG_ERROR, line, "shutdown timed out", "host=svc",
              "timeout_ms=200", "workers_running=1", "shields_open=0");
  assert_line(CANCEL_LOG_ERROR, line, "worker did not stop in time",
              "worker=poller", "state=running");
  int64_t asked_ms = field_i64(line, "asked_ms");
  assert_i64_ge(asked_ms, 200);
  assert_i64_lt(asked_ms, 200 + ms_tol(CANCEL_MSEC(300)));
  assert_no_line("worker did not stop in time", "worker=good");
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=good",
              "result=cancelled");
  assert_line(CANCEL_LOG_WARN, NULL, "stopped", "status=2",
              "workers_running=1");

  /* The worker still uses the host: it is not freed until it returns. */
  assert_int_equal(cancel_host_free(h), -EBUSY);
  assert_true(
      test_wait_until(host_freed, h, poller->sleep + test_tol(CANCEL_SEC(5))));
  /* It said so when it came back, late. */
  assert_line(CANCEL_LOG_INFO, NULL, "worker stopped", "worker=poller",
              "result=done", "late=true");
}

/* A plain thread that holds a shield on the stopping token across the
 * stop, and closes it r->sleep after the stop. */
static void *shield_holder(void *arg) {
  struct rec *r = arg;
  const cancel_token *stopping = cancel_host_stopping(r->h);
  cancel_source *shield = NULL;
  r->err = cancel_source_new_shield(&shield, "commit", stopping, 0);
  sem_post(&r->ready);
  if (r->err != 0)
    return NULL;
  r->rc = cancel_sleep(stopping, CANCEL_SEC(3600));
  /* The commit: the shield's token does not follow the stop. */
  r->err = cancel_sleep(TOK(shield), r->sleep);
  r->at = cancel_now();
  cancel_source_unref(shield);
  return NULL;
}

/* A shield holder's stop (a failed test's teardown): stop the host. */
static void stop_host(void *arg) {
  (void)cancel_host_stop(((struct rec *)arg)->h, "test teardown");
}

/* An open shield delays the exit until it closes, within the timeout. */
static void test_shield_delays_stop(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(test_tol(CANCEL_SEC(5)));
  cancel_host *h = new_host("svc", &o);
  assert_int_equal(cancel_host_add_worker(h, "w", wait_for_stop, NULL), 0);
  struct rec *holder = test_shared(sizeof *holder),
             *admin = test_shared(sizeof *admin);
  rec_init(holder, h);
  rec_init(admin, h);
  holder->sleep = CANCEL_MSEC(100);
  admin->gate = &holder->ready;
  pthread_t ht = test_helper_start(shield_holder, holder, stop_host);
  pthread_t at = test_helper_start(stop_later, admin, test_no_stop);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  int64_t back = cancel_now();
  test_helper_join(at);
  test_helper_join(ht);
  assert_int_equal(admin->err, 0);
  assert_int_equal(holder->err, 0);
  assert_int_equal(holder->rc, -ECANCELED);
  /* Not before the shield closed, and soon after. */
  assert_i64_ge(back, holder->at);
  assert_i64_lt(back - holder->at, test_tol(CANCEL_MSEC(100)));
  assert_i64_ge(back - stop_reason(h).time, CANCEL_MSEC(100));
  assert_no_warnings();
  assert_int_equal(cancel_host_free(h), 0);
}

/* A shield that stays open past the deadline: TIMEOUT, and the report
 * says a shield was open. */
static void test_shield_past_deadline(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  assert_int_equal(cancel_host_add_worker(h, "w", wait_for_stop, NULL), 0);
  struct rec *holder = test_shared(sizeof *holder),
             *admin = test_shared(sizeof *admin);
  rec_init(holder, h);
  rec_init(admin, h);
  holder->sleep = SHORT_TIMEOUT + test_tol(CANCEL_MSEC(400));
  admin->gate = &holder->ready;
  pthread_t ht = test_helper_start(shield_holder, holder, stop_host);
  pthread_t at = test_helper_start(stop_later, admin, test_no_stop);

  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_TIMEOUT);
  int64_t back = cancel_now();
  assert_elapsed_within(back - stop_reason(h).time, SHORT_TIMEOUT,
                        CANCEL_MSEC(300));
  assert_line(CANCEL_LOG_ERROR, NULL, "shutdown timed out", "shields_open=1",
              "workers_running=0");
  assert_no_line("worker did not stop in time", "host=svc");
  test_helper_join(at);
  test_helper_join(ht);
  assert_int_equal(admin->err, 0);
  assert_int_equal(holder->err, 0);
  /* Every worker returned: the host can be freed at once. */
  assert_int_equal(cancel_host_free(h), 0);
}

/* ---- Lifecycle and misuse ------------------------------------------------ */

static int must_not_run(const cancel_token *stopping, void *arg) {
  (void)stopping;
  __atomic_store_n((bool *)arg, true, __ATOMIC_SEQ_CST);
  return 0;
}

static void test_misuse_and_lifecycle(void **state) {
  (void)state;
  cancel_host *h = NULL;
  cancel_host_options bad = {.shutdown_timeout_ns = -1};
  assert_int_equal(cancel_host_new(NULL, "x", NULL), -EINVAL);
  assert_int_equal(cancel_host_new(&h, "x", &bad), -EINVAL);
  assert_null(h);
  assert_int_equal(cancel_host_run(NULL), -EINVAL);
  assert_int_equal(cancel_host_stop(NULL, "x"), -EINVAL);
  assert_null(cancel_host_stopping(NULL));
  assert_i64_eq(cancel_host_shutdown_deadline(NULL), CANCEL_NEVER);
  assert_int_equal(cancel_host_free(NULL), 0);

  /* Defaults: a NULL name is "host", the timeout 30 s. */
  h = new_host(NULL, NULL);
  bool ran = false;
  assert_int_equal(cancel_host_add_worker(NULL, "w", must_not_run, &ran),
                   -EINVAL);
  assert_int_equal(cancel_host_add_worker(h, NULL, must_not_run, &ran),
                   -EINVAL);
  assert_int_equal(cancel_host_add_worker(h, "", must_not_run, &ran), -EINVAL);
  assert_int_equal(cancel_host_add_worker(h, "w", NULL, &ran), -EINVAL);
  assert_int_equal(cancel_host_add_worker(h, "w", must_not_run, &ran), 0);
  assert_int_equal(cancel_host_add_worker(h, "w", must_not_run, &ran), -EEXIST);
  /* A stop before run: nothing starts, the status is OK. */
  assert_int_equal(cancel_host_stop(h, NULL), 1);
  cancel_reason r = stop_reason(h);
  assert_string_equal(r.origin, "host");
  assert_string_equal(r.detail, "");
  assert_i64_eq(cancel_host_shutdown_deadline(h), r.time + CANCEL_SEC(30));
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  assert_false(__atomic_load_n(&ran, __ATOMIC_SEQ_CST));
  assert_no_line("started", "host=host");
  assert_line(CANCEL_LOG_INFO, NULL, "stopping", "host=host",
              "cancel_origin=host");
  /* A host runs once. */
  assert_int_equal(cancel_host_run(h), -EBUSY);
  assert_int_equal(cancel_host_add_worker(h, "late", must_not_run, &ran),
                   -EBUSY);
  assert_int_equal(cancel_host_free(h), 0);
}

/* A host without workers waits for the stop (its service runs on threads
 * of its own). */
static void test_no_workers_waits_for_stop(void **state) {
  (void)state;
  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  struct rec *admin = test_shared(sizeof *admin);
  rec_init(admin, h);
  admin->sleep = CANCEL_MSEC(50);
  int64_t t0 = cancel_now();
  pthread_t t = test_helper_start(stop_later, admin, test_no_stop);
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  assert_i64_ge(cancel_now() - t0, CANCEL_MSEC(50));
  test_helper_join(t);
  assert_int_equal(admin->err, 0);
  assert_string_equal(stop_reason(h).detail, "admin request");
  assert_int_equal(cancel_host_free(h), 0);
}

/* The process watches the signals already: run refuses, starting nothing,
 * and the host can still be freed (or run once the watch is gone). */
static void test_signals_watched_elsewhere(void **state) {
  (void)state;
  cancel_source *other = new_src("other");
  assert_int_equal(cancel_signals_watch(other), 0);
  cancel_host_options o = {.shutdown_timeout_ns = SHORT_TIMEOUT};
  cancel_host *h = new_host("svc", &o);
  bool ran = false;
  assert_int_equal(cancel_host_add_worker(h, "w", must_not_run, &ran), 0);
  assert_int_equal(cancel_host_run(h), -EBUSY);
  assert_false(__atomic_load_n(&ran, __ATOMIC_SEQ_CST));
  assert_line(CANCEL_LOG_ERROR, NULL, "cannot watch signals", "host=svc");
  assert_int_equal(cancel_signals_unwatch(), 0);
  cancel_source_unref(other);
  /* Now it can: the worker returns at once, so the host stops. */
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  assert_true(__atomic_load_n(&ran, __ATOMIC_SEQ_CST));
  assert_int_equal(cancel_host_free(h), 0);
}

/* ---- sd_notify ----------------------------------------------------------- */

struct notified {
  cancel_host *h;
  int fd;
  ssize_t len;
  char ready[256];
};

/* Reads the datagram the host sends once every worker started, then asks
 * the host to stop. */
static int reads_ready(const cancel_token *stopping, void *arg) {
  struct notified *n = arg;
  n->len = cancel_recv(stopping, n->fd, n->ready, sizeof n->ready - 1, 0,
                       cancel_now() + test_tol(CANCEL_SEC(5)));
  if (n->len > 0)
    n->ready[n->len] = '\0';
  cancel_host_stop(n->h, "ready seen");
  return cancel_sleep(stopping, CANCEL_SEC(3600));
}

/* Is `want` one of the newline-separated lines of msg? */
static bool has_line(const char *msg, const char *want) {
  size_t wl = strlen(want);
  for (const char *p = msg; p != NULL && *p != '\0';) {
    const char *nl = strchr(p, '\n');
    size_t l = nl != NULL ? (size_t)(nl - p) : strlen(p);
    if (l == wl && memcmp(p, want, l) == 0)
      return true;
    p = nl != NULL ? nl + 1 : NULL;
  }
  return false;
}

/* Binds a datagram socket at sa, points NOTIFY_SOCKET at it (env), runs a
 * host and checks READY=1 then STOPPING=1 arrive, in that order, alone. */
static void check_notify(const struct sockaddr_un *sa, socklen_t salen,
                         const char *env) {
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  assert_true(fd >= 0);
  assert_int_equal(bind(fd, (const struct sockaddr *)sa, salen), 0);
  assert_int_equal(setenv("NOTIFY_SOCKET", env, 1), 0);

  cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
  cancel_host *h = new_host("svc", &o);
  struct notified n = {.h = h, .fd = fd};
  assert_int_equal(cancel_host_add_worker(h, "listener", reads_ready, &n), 0);
  assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
  assert_int_equal(unsetenv("NOTIFY_SOCKET"), 0);

  assert_true(n.len > 0);
  assert_true(has_line(n.ready, "READY=1"));
  assert_false(has_line(n.ready, "STOPPING=1"));
  char buf[1024];
  ssize_t len = recv(fd, buf, sizeof buf - 1, MSG_DONTWAIT);
  assert_true(len > 0);
  buf[len] = '\0';
  assert_true(has_line(buf, "STOPPING=1"));
  assert_true(has_line(buf, "STATUS=stopping: shutdown (svc ready seen)"));
  /* Nothing else. */
  assert_int_equal(recv(fd, buf, sizeof buf, MSG_DONTWAIT), -1);
  assert_int_equal(errno, EAGAIN);
  assert_no_warnings();
  close(fd);
  assert_int_equal(cancel_host_free(h), 0);
}

static void test_sd_notify_path(void **state) {
  (void)state;
  char dir[] = "/tmp/host_test.XXXXXX";
  assert_non_null(mkdtemp(dir));
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  snprintf(sa.sun_path, sizeof sa.sun_path, "%s/notify", dir);
  check_notify(&sa, (socklen_t)sizeof sa, sa.sun_path);
  unlink(sa.sun_path);
  rmdir(dir);
}

static void test_sd_notify_abstract(void **state) {
  (void)state;
  char env[64];
  snprintf(env, sizeof env, "@libcancel/host_test/%d", (int)getpid());
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t n = strlen(env);
  memcpy(sa.sun_path, env, n);
  sa.sun_path[0] = '\0'; /* '@' is the leading NUL of an abstract name */
  check_notify(&sa, (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n),
               env);
}

/* A NOTIFY_SOCKET nobody listens on, or of an unsupported kind, is a
 * warning: the host runs all the same. */
static void test_sd_notify_failures_warn(void **state) {
  (void)state;
  const char *bad[] = {"/nonexistent/host_test/notify", "vsock:2:9999"};
  for (size_t i = 0; i < 2; i++) {
    setup(NULL);
    assert_int_equal(setenv("NOTIFY_SOCKET", bad[i], 1), 0);
    cancel_host_options o = quiet_opts(SHORT_TIMEOUT);
    cancel_host *h = new_host("svc", &o);
    struct rec *stop = test_shared(sizeof *stop);
    rec_init(stop, h);
    assert_int_equal(cancel_host_add_worker(h, "stopper", stopper, stop), 0);
    assert_int_equal(cancel_host_run(h), CANCEL_HOST_EXIT_OK);
    assert_int_equal(unsetenv("NOTIFY_SOCKET"), 0);
    char sock[128];
    snprintf(sock, sizeof sock, "socket=%s", bad[i]);
    assert_line(CANCEL_LOG_WARN, NULL, "sd_notify failed", sock);
    assert_int_equal(cancel_host_free(h), 0);
  }
}

/* ---- The forced exit, in a child process ---------------------------------- *
 * The child is this program run again (fork + exec: ThreadSanitizer does
 * not allow threads in the child of a multi-threaded fork) as
 * `host_test --force-child MODE`.  It runs a host with the default sink
 * (standard error, a pipe the parent reads) and one worker: "stubborn"
 * ignores its token (MODE force), "slow" takes 500 ms to clean up after the
 * stop (MODE no-force, with no_force_exit).  The parent sends the real
 * signals once the child's log lines say it is ready for them. */

static int stubborn(const cancel_token *stopping, void *arg) {
  (void)stopping;
  (void)arg;
  test_sleep_ns(CANCEL_SEC(60));
  return 0;
}

static int slow_cleanup(const cancel_token *stopping, void *arg) {
  (void)arg;
  int rc = cancel_sleep(stopping, CANCEL_SEC(3600));
  test_sleep_ns(test_tol(CANCEL_MSEC(500)));
  return rc;
}

static int force_child(const char *mode) {
  alarm(60); /* a hang ends in SIGALRM, which the parent reports */
  cancel_signals_block();
  bool no_force = strcmp(mode, "no-force") == 0;
  cancel_host_options o = {.shutdown_timeout_ns = CANCEL_SEC(30),
                           .no_force_exit = no_force};
  cancel_host *h = NULL;
  if (cancel_host_new(&h, "svc", &o) != 0)
    return 100;
  if (cancel_host_add_worker(h, no_force ? "slow" : "stubborn",
                             no_force ? slow_cleanup : stubborn, NULL) != 0)
    return 101;
  int status = cancel_host_run(h);
  if (cancel_host_free(h) != 0)
    return 102;
  return status;
}

struct child {
  pid_t pid;
  int fd; /* its standard error */
  size_t len;
  char out[32768];
};

static void child_start(struct child *c, const char *mode) {
  memset(c, 0, sizeof *c);
  int p[2];
  assert_int_equal(pipe2(p, O_CLOEXEC), 0);
  /* The program's path, not /proc/self/exe itself: under valgrind that
   * would start valgrind's tool instead. */
  char self[4096];
  ssize_t n = readlink("/proc/self/exe", self, sizeof self - 1);
  assert_true(n > 0);
  self[n] = '\0';
  fflush(NULL);
  c->pid = fork();
  assert_true(c->pid >= 0);
  if (c->pid == 0) {
    dup2(p[1], STDERR_FILENO); /* async-signal-safe calls only until exec */
    execl(self, "host_test", "--force-child", mode, (char *)NULL);
    _exit(127);
  }
  close(p[1]);
  c->fd = p[0];
}

/* Reads the child's standard error until it holds `needle` (true), or
 * until the end or the timeout (false). */
static bool child_wait_for(struct child *c, const char *needle,
                           int64_t timeout) {
  int64_t end = cancel_now() + timeout;
  for (;;) {
    c->out[c->len] = '\0';
    if (needle != NULL && strstr(c->out, needle) != NULL)
      return true;
    int64_t left = end - cancel_now();
    if (left <= 0 || c->len + 1 >= sizeof c->out)
      return false;
    struct pollfd pfd = {.fd = c->fd, .events = POLLIN};
    int rc = poll(&pfd, 1, (int)(left / CANCEL_MSEC(1)) + 1);
    if (rc < 0 && errno == EINTR)
      continue;
    if (rc <= 0)
      return false;
    ssize_t r = read(c->fd, c->out + c->len, sizeof c->out - 1 - c->len);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      return false;
    c->len += (size_t)r;
  }
}

/* Ends the child's story: waits for its exit, reads the rest of its
 * output, returns its exit status. */
static int child_end(struct child *c) {
  int status = 0;
  assert_int_equal(waitpid(c->pid, &status, 0), c->pid);
  child_wait_for(c, NULL, test_tol(CANCEL_SEC(5))); /* to the end */
  close(c->fd);
  if (WIFSIGNALED(status)) {
    print_error("child killed by signal %d; its output:\n%s\n",
                WTERMSIG(status), c->out);
    fail();
  }
  assert_true(WIFEXITED(status));
  return WEXITSTATUS(status);
}

/* The child's line with msg=`msg` (quoted as logfmt does), into line. */
static bool child_line(const struct child *c, const char *msg, char *line,
                       size_t len) {
  char want[128];
  cancel_logfmt_quote(want, sizeof want, msg);
  char key[140];
  snprintf(key, sizeof key, "msg=%s", want);
  const char *p = strstr(c->out, key);
  if (p == NULL)
    return false;
  while (p > c->out && p[-1] != '\n')
    p--;
  const char *e = strchr(p, '\n');
  size_t l = e != NULL ? (size_t)(e - p) : strlen(p);
  if (l >= len)
    l = len - 1;
  memcpy(line, p, l);
  line[l] = '\0';
  return true;
}

static void test_second_signal_forces_exit(void **state) {
  (void)state;
  struct child c;
  child_start(&c, "force");
  assert_true(child_wait_for(&c, "msg=started", test_tol(CANCEL_SEC(10))));
  assert_int_equal(kill(c.pid, SIGTERM), 0);
  assert_true(child_wait_for(&c, "msg=stopping", test_tol(CANCEL_SEC(10))));
  int64_t t0 = cancel_now();
  assert_int_equal(kill(c.pid, SIGTERM), 0);
  int status = child_end(&c);
  int64_t took = test_since(t0);
  if (status != CANCEL_HOST_EXIT_FORCED(SIGTERM))
    print_error("child output:\n%s\n", c.out);
  assert_int_equal(status, 143);
  /* At once: not at the 30 s deadline. */
  assert_i64_lt(took, test_tol(CANCEL_SEC(2)));
  char line[LINE_LEN], v[64];
  assert_true(child_line(&c, "forced exit", line, sizeof line));
  assert_true(lf_get(line, "level", v, sizeof v));
  assert_string_equal(v, "warn"); /* the operator's choice, not a failure */
  assert_true(lf_get(line, "signal", v, sizeof v));
  assert_string_equal(v, "SIGTERM");
  assert_true(lf_get(line, "status", v, sizeof v));
  assert_string_equal(v, "143");
  assert_true(lf_get(line, "signals", v, sizeof v));
  assert_string_equal(v, "2");
  assert_true(lf_get(line, "workers_running", v, sizeof v));
  assert_string_equal(v, "stubborn");
  assert_false(child_line(&c, "stopped", line, sizeof line));
}

static void test_no_force_exit(void **state) {
  (void)state;
  struct child c;
  child_start(&c, "no-force");
  assert_true(child_wait_for(&c, "msg=started", test_tol(CANCEL_SEC(10))));
  assert_int_equal(kill(c.pid, SIGTERM), 0);
  assert_true(child_wait_for(&c, "msg=stopping", test_tol(CANCEL_SEC(10))));
  assert_int_equal(kill(c.pid, SIGTERM), 0);
  int status = child_end(&c);
  if (status != CANCEL_HOST_EXIT_OK)
    print_error("child output:\n%s\n", c.out);
  assert_int_equal(status, CANCEL_HOST_EXIT_OK);
  char line[LINE_LEN], v[64];
  assert_false(child_line(&c, "forced exit", line, sizeof line));
  assert_true(child_line(&c, "worker stopped", line, sizeof line));
  assert_true(lf_get(line, "worker", v, sizeof v));
  assert_string_equal(v, "slow");
  assert_true(child_line(&c, "stopped", line, sizeof line));
  assert_true(lf_get(line, "status", v, sizeof v));
  assert_string_equal(v, "0");
}

#define T(fn) cmocka_unit_test_setup_teardown(fn, setup, teardown)

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--force-child") == 0)
    return force_child(argv[2]);
  /* Before any thread starts: every thread inherits the mask, so the
   * SIGTERM a test sends is read by the host, never acted on by default. */
  cancel_signals_block();
  const struct CMUnitTest tests[] = {
      T(test_stop_by_sigterm),
      T(test_stop_by_request),
      T(test_cancelled_is_info),
      T(test_failing_worker_stops_host),
      T(test_cancelled_before_stop_is_failure),
      T(test_keep_running_on_failure),
      T(test_stuck_worker_reported),
      T(test_shield_delays_stop),
      T(test_shield_past_deadline),
      T(test_misuse_and_lifecycle),
      T(test_no_workers_waits_for_stop),
      T(test_signals_watched_elsewhere),
      T(test_sd_notify_path),
      T(test_sd_notify_abstract),
      T(test_sd_notify_failures_warn),
      T(test_second_signal_forces_exit),
      T(test_no_force_exit),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
