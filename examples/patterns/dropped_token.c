/*
 * Finding a dropped token: the watchdog names the work that kept running
 * after its caller stopped caring, and the wait inside it that did not
 * watch the token.
 *
 * handle_order() gets the request's token and opens a work scope on it
 * ("GET /orders/{id}"); load_order() passes the token on, but
 * fetch_page(), two calls down, waits for the next page with a wait of
 * its own that watches no token: the token was dropped.  When the client
 * goes away (the request's source is cancelled as "client gone"), the
 * handler goes on waiting for the page.
 *
 * The watchdog (threshold 50 ms) reports the request's scope while it
 * still runs.  `inner="cancel_sleep[no token]"` is the library's own wait
 * scope saying "the wait in here watches no token", and the stack, taken
 * on the handler's thread, names fetch_page.  Then the fixed version,
 * whose fetch_page_fixed() waits on the token it was given, stops at once
 * and is not reported.
 *
 * The program reads the library's log lines through a log sink
 * (cancel_log_set_sink), prints them, and exits 0 only when the dropped
 * token was reported with its wait and its function, and the fixed
 * version was not.  Built with -rdynamic (CMake ENABLE_EXPORTS), and its
 * functions are not static, so that the stack names them.
 */
#include <cancel.h>
#include <cancel/diag.h>
#include <cancel/log.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>

/* What the sink saw (the sink runs on the logging thread). */
static pthread_mutex_t seen_mu = PTHREAD_MUTEX_INITIALIZER;
static int reports;       /* "scope still running after cancel" */
static bool named_wait;   /* ... with inner="cancel_sleep[no token]" */
static bool named_caller; /* a stack frame naming fetch_page */
static bool no_stack;     /* "stack unavailable" */

/* glibc has backtrace(3); musl has none, and there the report says "stack
 * unavailable" where the frames would be (cancel.h: Platform). */
#ifdef __GLIBC__
static const bool has_stacks = true;
#else
static const bool has_stacks = false;
#endif

static void sink(int level, const char *line, size_t len, void *arg) {
  (void)level;
  (void)arg;
  printf("  %.*s\n", (int)len, line);
  pthread_mutex_lock(&seen_mu);
  if (strstr(line, "msg=\"scope still running after cancel\"") != NULL) {
    reports++;
    if (strstr(line, "inner=\"cancel_sleep[no token]\"") != NULL)
      named_wait = true;
  }
  if (strstr(line, "msg=stack") != NULL && strstr(line, "(fetch_page+") != NULL)
    named_caller = true;
  if (strstr(line, "msg=\"stack unavailable\"") != NULL)
    no_stack = true;
  pthread_mutex_unlock(&seen_mu);
}

/* THE BUG: the page wait was written without the token (say it came from
 * a helper that predates cancellation).  Not a tail call, so that this
 * frame is on the stack when the watchdog looks. */
__attribute__((noinline)) int fetch_page(const cancel_token *tok, int page) {
  (void)tok;                                  /* dropped */
  int rc = cancel_sleep(NULL, CANCEL_SEC(1)); /* the page "arrives" */
  return rc < 0 ? rc : page;
}

/* The fix: the wait watches the token it was given. */
__attribute__((noinline)) int fetch_page_fixed(const cancel_token *tok,
                                               int page) {
  int rc = cancel_sleep(tok, CANCEL_SEC(1));
  return rc < 0 ? rc : page;
}

__attribute__((noinline)) int load_order(const cancel_token *tok, bool fixed) {
  int rc = fixed ? fetch_page_fixed(tok, 1) : fetch_page(tok, 1);
  return rc < 0 ? rc : cancel_token_check(tok);
}

struct request {
  cancel_source *src;
  bool fixed;
  cancel_sem in; /* the handler is in its scope */
  int rc;
  int64_t ended;
};

static void *handle_order(void *arg) {
  struct request *r = arg;
  const cancel_token *tok = cancel_source_token(r->src);
  {
    CANCEL_SCOPE(tok, "GET /orders/{id}");
    cancel_sem_post(&r->in);
    r->rc = load_order(tok, r->fixed);
  }
  r->ended = cancel_now();
  return NULL;
}

/* One request whose client leaves 20 ms in; returns the time from the
 * cancel to the handler's return, in ms, or -1. */
static double run(bool fixed) {
  struct request r = {.fixed = fixed};
  if (cancel_source_new(&r.src, "client 10.0.0.7:51234") != 0 ||
      cancel_sem_init(&r.in, 0) != 0)
    return -1;
  pthread_t t;
  if (pthread_create(&t, NULL, handle_order, &r) != 0)
    return -1;
  (void)cancel_sem_wait(NULL, &r.in, CANCEL_NEVER);
  (void)cancel_sleep(NULL, CANCEL_MSEC(20));
  int64_t cancelled = cancel_now();
  cancel_source_cancel_with(r.src, CANCEL_CLIENT_GONE, "peer closed");
  pthread_join(t, NULL);
  cancel_source_unref(r.src);
  return (double)(r.ended - cancelled) / 1e6;
}

int main(void) {
  cancel_log_set_sink(sink, NULL, CANCEL_LOG_INFO);
  cancel_watchdog_options o = {.threshold_ns = CANCEL_MSEC(50)};
  if (cancel_watchdog_start(&o) != 0) {
    fprintf(stderr, "dropped_token: the watchdog did not start\n");
    return 1;
  }

  printf("dropped token: the client leaves, fetch_page waits on\n");
  double bad = run(false);
  pthread_mutex_lock(&seen_mu);
  int after_bad = reports;
  pthread_mutex_unlock(&seen_mu);
  printf("  -> handler returned %.1f ms after the cancel\n\n", bad);

  printf("fixed: fetch_page_fixed waits on the request's token\n");
  double good = run(true);
  printf("  -> handler returned %.3f ms after the cancel\n", good);

  cancel_watchdog_stop();
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
  pthread_mutex_lock(&seen_mu);
  bool stack_ok = has_stacks ? named_caller : no_stack && !named_caller;
  bool ok = after_bad == 1 && named_wait && stack_ok && reports == after_bad &&
            bad > 50 && good >= 0 && good < 50;
  printf("\n%s: the dropped token was %sreported%s%s; the fixed version "
         "was %sreported\n",
         ok ? "ok" : "FAILED", after_bad == 1 ? "" : "not ",
         named_wait ? ", with its wait" : "",
         named_caller ? " and its function"
         : no_stack   ? " (no stack: no backtrace(3) here)"
                      : "",
         reports == after_bad ? "not " : "");
  pthread_mutex_unlock(&seen_mu);
  return ok ? 0 : 1;
}
