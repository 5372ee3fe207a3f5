/*
 * Diagnostics: work scopes, their overruns, the watchdog catching work
 * that ignores its token (by name, with the reason and a stack naming the
 * offending function), and the metrics in Prometheus' text format.
 *
 * Built with ENABLE_EXPORTS (-rdynamic): the bad workers below are
 * non-static so that backtrace_symbols names them.
 */
#include "test_util.h"

#include "cancel/diag.h"
#include "cancel/log.h"

#include <regex.h>
#include <sys/wait.h>

/* log_wait(a, b, out, len, timeout): a line holding a and b (b may be
 * NULL), through test_util.h's capture. */
#define log_wait(a, b, out, len, timeout)                                      \
  test_log_find_within(out, len, timeout, a, b, NULL)

/* The report's stack names fn: a "msg=stack" line naming it.  Without
 * backtrace(3) (musl) the report has a "stack unavailable" line there
 * instead, and that is what is checked (cancel.h: Platform). */
#ifdef CANCEL_HAVE_BACKTRACE
#define stack_wait(fn, out, len, timeout)                                      \
  log_wait("msg=stack", fn, out, len, timeout)
#else
#define stack_wait(fn, out, len, timeout)                                      \
  ((void)(fn), log_wait("msg=\"stack unavailable\"", NULL, out, len, timeout))
#endif

static int setup(void **state) {
  (void)state;
  test_log_capture();
  return 0;
}

static int teardown(void **state) {
  /* Its helper threads first: they may hold scopes the watchdog sees. */
  test_helpers_teardown(state);
  /* A test that failed half-way leaves its watchdog running: not the
   * next test's problem. */
  (void)cancel_watchdog_stop();
  test_log_release();
  return 0;
}

/* ---- Scopes ----------------------------------------------------------------
 */

static void test_scope_not_cancelled(void **state) {
  (void)state;
  cancel_source *s = new_src("req");
  cancel_scope a, b;
  assert_null(cancel_scope_current());
  cancel_scope_begin(&a, TOK(s), "outer");
  cancel_scope_begin(&b, TOK(s), "inner");
  assert_ptr_equal(cancel_scope_current(), &b);
  assert_i64_eq(cancel_scope_end(&b), 0);
  assert_ptr_equal(cancel_scope_current(), &a);
  assert_i64_eq(cancel_scope_end(&a), 0);
  assert_null(cancel_scope_current());
  /* A NULL token: never cancelled. */
  cancel_scope_begin(&a, NULL, "none");
  assert_i64_eq(cancel_scope_end(&a), 0);
  cancel_scope_begin(NULL, TOK(s), "ignored");
  assert_i64_eq(cancel_scope_end(NULL), 0);
  /* Scopes switched off: named, never overdue. */
  cancel_scopes_enable(0);
  cancel_source *t = new_src("off");
  cancel_scope_begin(&a, TOK(t), "off");
  assert_string_equal(cancel_scope_current()->name, "off");
  cancel_source_cancel(t);
  assert_i64_eq(cancel_scope_end(&a), 0);
  cancel_scopes_enable(1);
  cancel_source_unref(t);
  cancel_source_unref(s);
}

static void test_scope_overrun(void **state) {
  (void)state;
  cancel_metrics before, after;
  cancel_metrics_get(&before);
  cancel_source *s = new_src("req");
  cancel_scope sc;
  cancel_scope_begin(&sc, TOK(s), "work");
  cancel_source_cancel(s);
  test_sleep_ns(CANCEL_MSEC(20)); /* the work ignores the cancel */
  int64_t over = cancel_scope_end(&sc);
  assert_i64_ge(over, CANCEL_MSEC(20));
  assert_i64_lt(over, CANCEL_MSEC(20) + test_tol(CANCEL_MSEC(200)));
  cancel_metrics_get(&after);
  assert_true(after.overruns == before.overruns + 1);

  /* Begun on a token that fired already: overdue from the cancel. */
  cancel_scope_begin(&sc, TOK(s), "late");
  assert_i64_ge(cancel_scope_end(&sc), CANCEL_MSEC(20));
  cancel_source_unref(s);
}

/* Misuse: ended out of order, or twice.  Reported (stderr), and the
 * thread's chain never keeps a scope that ended: the caller may free it. */
static void test_scope_end_out_of_order(void **state) {
  (void)state;
  cancel_source *s = new_src("req");
  cancel_scope *a = malloc(sizeof *a), *b = malloc(sizeof *b);
  cancel_scope_begin(a, TOK(s), "outer");
  cancel_scope_begin(b, TOK(s), "inner");
  assert_i64_eq(cancel_scope_end(a), 0); /* inner still open: misuse */
  assert_null(cancel_scope_current());   /* a and b left the chain */
  free(a);
  cancel_source_cancel(s);
  cancel_metrics m;
  cancel_metrics_get(&m); /* a scan: must not read the freed scope */
  assert_int_equal(m.scopes_overdue, 0);
  assert_i64_eq(cancel_scope_end(b), 0); /* not in the chain: nothing */
  assert_i64_eq(cancel_scope_end(b), 0); /* twice */
  assert_null(cancel_scope_current());
  free(b);
  cancel_source_unref(s);
}

static int64_t scoped_block(cancel_source *s) {
  CANCEL_SCOPE(TOK(s), "block");
  assert_string_equal(cancel_scope_current()->name, "block");
  cancel_source_cancel(s);
  return 0;
}

static void test_scope_macro(void **state) {
  (void)state;
  cancel_metrics before, after;
  cancel_metrics_get(&before);
  cancel_source *s = new_src("req");
  scoped_block(s);
  assert_null(cancel_scope_current());
  cancel_metrics_get(&after);
  assert_true(after.overruns == before.overruns + 1);
  cancel_source_unref(s);
}

/* ---- The watchdog
 * ------------------------------------------------------------- */

struct bad {
  const cancel_token *tok;
  volatile int stop; /* the test ends the spinning one */
  sem_t in;
};

/* A bad worker's stop (the sleeping one ends by itself in 400 ms). */
static void stop_bad(void *p) {
  __atomic_store_n(&((struct bad *)p)->stop, 1, __ATOMIC_RELEASE);
}

/* Ignores its token: sleeps in plain nanosleep. */
__attribute__((noinline)) void bad_worker_sleeps(struct bad *b) {
  struct timespec ts = {0, 400 * 1000000};
  while (nanosleep(&ts, &ts) != 0) {
  }
  (void)b;
}

/* Ignores its token: spins. */
__attribute__((noinline)) void bad_worker_spins(struct bad *b) {
  /* The yield is for valgrind, which runs one thread at a time and would
   * let a pure spin starve the watchdog; it is still a busy loop. */
  while (!__atomic_load_n(&b->stop, __ATOMIC_ACQUIRE))
    sched_yield();
}

static void *sleeper_main(void *p) {
  struct bad *b = p;
  CANCEL_SCOPE(b->tok, "bad sleeper");
  sem_post(&b->in);
  bad_worker_sleeps(b);
  return NULL;
}

static void *spinner_main(void *p) {
  struct bad *b = p;
  cancel_scope outer;
  cancel_scope_begin(&outer, b->tok, "job 7");
  {
    CANCEL_SCOPE(b->tok, "bad spinner");
    sem_post(&b->in);
    bad_worker_spins(b);
  }
  cancel_scope_end(&outer);
  return NULL;
}

static void test_watchdog_reports_sleeper(void **state) {
  (void)state;
  cancel_watchdog_options o = {.threshold_ns = CANCEL_MSEC(50)};
  assert_int_equal(cancel_watchdog_start(&o), 0);
  assert_int_equal(cancel_watchdog_start(&o), -EBUSY);
  cancel_metrics before;
  cancel_metrics_get(&before);
  cancel_source *s = new_src("host");
  /* Shared: a failed assertion leaves the worker to the teardown. */
  struct bad *bp = test_shared(sizeof *bp);
  bp->tok = TOK(s);
  sem_init(&bp->in, 0, 0);
  pthread_t t = test_helper_start(sleeper_main, bp, stop_bad);
  assert_int_equal(test_sem_wait_ns(&bp->in, test_tol(CANCEL_SEC(5))), 0);
  int64_t t0 = cancel_now();
  cancel_source_cancel_with(s, CANCEL_SHUTDOWN, "SIGTERM");
  char line[2048];
  assert_true(log_wait("scope still running after cancel",
                       "scope=\"bad sleeper\"", line, sizeof line,
                       test_tol(CANCEL_SEC(2))));
  int64_t took = test_since(t0);
  print_message("reported after %.1f ms: %s\n", (double)took / 1e6, line);
  assert_i64_ge(took, CANCEL_MSEC(50));
  assert_i64_lt(took, CANCEL_MSEC(50) + test_tol(CANCEL_MSEC(200)));
  assert_non_null(strstr(line, "cancel_kind=shutdown"));
  assert_non_null(strstr(line, "cancel_origin=host"));
  assert_non_null(strstr(line, "cancel_detail=SIGTERM"));
  assert_non_null(strstr(line, "since_cancel_ms="));
  /* The stack names the function that ignores the token. */
  assert_true(stack_wait("bad_worker_sleeps", line, sizeof line,
                         test_tol(CANCEL_SEC(2))));
  test_helper_join(t);
  assert_true(log_wait("scope ended after cancel", "scope=\"bad sleeper\"",
                       line, sizeof line, test_tol(CANCEL_SEC(2))));
  assert_non_null(strstr(line, "overrun_ms="));
  cancel_metrics after;
  cancel_metrics_get(&after);
  assert_true(after.watchdog_reports == before.watchdog_reports + 1);
  assert_int_equal(after.scopes_overdue, 0);
  assert_int_equal(cancel_watchdog_stop(), 0);
  assert_int_equal(cancel_watchdog_stop(), -EINVAL);
  sem_destroy(&bp->in);
  cancel_source_unref(s);
}

static void test_watchdog_reports_spinner_once(void **state) {
  (void)state;
  cancel_watchdog_options o = {.threshold_ns = CANCEL_MSEC(30)};
  assert_int_equal(cancel_watchdog_start(&o), 0);
  cancel_source *parent = new_src("route timeout");
  const cancel_token *p = TOK(parent);
  cancel_source *req = NULL;
  assert_int_equal(cancel_source_new_linked(&req, "request 9", &p, 1), 0);
  struct bad *bp = test_shared(sizeof *bp);
  bp->tok = TOK(req);
  sem_init(&bp->in, 0, 0);
  pthread_t t = test_helper_start(spinner_main, bp, stop_bad);
  assert_int_equal(test_sem_wait_ns(&bp->in, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_cancel_with(parent, CANCEL_TIMEOUT, "2s");
  char line[2048];
  assert_true(log_wait("scope still running after cancel",
                       "scope=\"bad spinner\"", line, sizeof line,
                       test_tol(CANCEL_SEC(2))));
  assert_non_null(strstr(line, "outer=\"job 7\""));
  assert_non_null(strstr(line, "cancel_origin=\"route timeout\""));
  assert_non_null(strstr(line, "cancel_via=\"request 9\""));
  assert_true(stack_wait("bad_worker_spins", NULL, 0, test_tol(CANCEL_SEC(2))));
  /* Let several more looks pass: reported once per scope. */
  test_sleep_ns(CANCEL_MSEC(100));
  assert_int_equal(
      test_log_count("scope still running", "scope=\"bad spinner\"", NULL), 1);
  /* The outer scope is overdue too and reported on its own, naming the
   * scope inside it. */
  assert_true(log_wait("scope still running after cancel", "scope=\"job 7\"",
                       line, sizeof line, test_tol(CANCEL_SEC(2))));
  assert_non_null(strstr(line, "inner=\"bad spinner\""));
  stop_bad(bp);
  test_helper_join(t);
  assert_int_equal(cancel_watchdog_stop(), 0);
  sem_destroy(&bp->in);
  cancel_source_unref(req);
  cancel_source_unref(parent);
}

/* A scope that ends within the threshold is never reported. */
static void test_watchdog_quiet_when_work_stops(void **state) {
  (void)state;
  cancel_watchdog_options o = {.threshold_ns = CANCEL_MSEC(50)};
  assert_int_equal(cancel_watchdog_start(&o), 0);
  cancel_source *s = new_src("req");
  cancel_scope sc;
  cancel_scope_begin(&sc, TOK(s), "good work");
  cancel_source_cancel(s);
  cancel_scope_end(&sc); /* it stopped at once */
  test_sleep_ns(CANCEL_MSEC(150));
  assert_false(log_wait("scope still running", "good work", NULL, 0, 0));
  assert_int_equal(cancel_watchdog_stop(), 0);
  cancel_watchdog_options bad = {.threshold_ns = -1};
  assert_int_equal(cancel_watchdog_start(&bad), -EINVAL);
  cancel_source_unref(s);
}

static int64_t waiter_sleep(void *arg) {
  return cancel_sleep((const cancel_token *)arg, CANCEL_SEC(30));
}

/* The bug the watchdog exists for: the work was handed a token, and a
 * wait two calls down uses another one (or none).  The wait's own scope,
 * opened by the core, shows in the report as the place the token was
 * dropped. */
struct dropped {
  const cancel_token *tok;   /* the request's: cancelled by the test */
  const cancel_token *other; /* a live one the wait uses by mistake */
  cancel_source *other_src;  /* its source */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int done;
  sem_t in;
};

__attribute__((noinline)) void wait_on_wrong_token(struct dropped *d) {
  int rc = cancel_sleep(d->other, CANCEL_SEC(30));
  /* Not a tail call: this frame must be on the stack the report shows. */
  __atomic_store_n(&d->done, rc, __ATOMIC_RELEASE);
}

__attribute__((noinline)) void wait_on_no_token(struct dropped *d) {
  pthread_mutex_lock(&d->mu);
  while (!d->done)
    (void)cancel_cond_wait(NULL, &d->cv, &d->mu, CANCEL_NEVER);
  pthread_mutex_unlock(&d->mu);
}

static void *dropped_main(void *p) {
  struct dropped *d = p;
  CANCEL_SCOPE(d->tok, "load rows");
  sem_post(&d->in);
  if (d->other != NULL)
    wait_on_wrong_token(d);
  else
    wait_on_no_token(d);
  return NULL;
}

/* Releases the thread: cancels the token it waits on, or ends its loop. */
static void release_dropped(void *p) {
  struct dropped *d = p;
  if (d->other_src != NULL) {
    cancel_source_cancel(d->other_src);
  } else {
    pthread_mutex_lock(&d->mu);
    d->done = 1;
    pthread_cond_broadcast(&d->cv);
    pthread_mutex_unlock(&d->mu);
  }
}

static void check_dropped(cancel_source *other, const char *inner,
                          const char *fn) {
  cancel_watchdog_options o = {.threshold_ns = CANCEL_MSEC(30)};
  assert_int_equal(cancel_watchdog_start(&o), 0);
  cancel_source *req = new_src("client 10.0.0.9:4000");
  /* Shared: a failed assertion leaves the thread to the teardown. */
  struct dropped *d = test_shared(sizeof *d);
  d->tok = TOK(req);
  d->other = other != NULL ? TOK(other) : NULL;
  d->other_src = other;
  pthread_mutex_init(&d->mu, NULL);
  pthread_cond_init(&d->cv, NULL);
  sem_init(&d->in, 0, 0);
  pthread_t t = test_helper_start(dropped_main, d, release_dropped);
  assert_int_equal(test_sem_wait_ns(&d->in, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_cancel_with(req, CANCEL_CLIENT_GONE, NULL);
  char line[2048];
  assert_true(log_wait("scope still running after cancel",
                       "scope=\"load rows\"", line, sizeof line,
                       test_tol(CANCEL_SEC(2))));
  print_message("%s\n", line);
  assert_non_null(strstr(line, inner));
  assert_non_null(strstr(line, "cancel_kind=\"client gone\""));
  assert_true(stack_wait(fn, NULL, 0, test_tol(CANCEL_SEC(2))));
  /* The wait itself is not overdue: its token did not fire. */
  assert_int_equal(test_log_count("scope still running", "scope=cancel_", NULL),
                   0);
  release_dropped(d);
  test_helper_join(t);
  assert_int_equal(cancel_watchdog_stop(), 0);
  pthread_cond_destroy(&d->cv);
  pthread_mutex_destroy(&d->mu);
  sem_destroy(&d->in);
  cancel_source_unref(req);
}

static void test_watchdog_names_wrong_token(void **state) {
  (void)state;
  cancel_source *other = new_src("someone else's");
  check_dropped(other, "inner=\"cancel_sleep[token not cancelled]\"",
                "wait_on_wrong_token");
  cancel_source_unref(other);
}

static void test_watchdog_names_no_token(void **state) {
  (void)state;
  check_dropped(NULL, "inner=\"cancel_cond_wait[no token]\"",
                "wait_on_no_token");
}

/* A wait woken by its cancel counts a wake-up, not an overrun. */
static void test_wait_scope_is_not_an_overrun(void **state) {
  (void)state;
  cancel_metrics before, after;
  cancel_metrics_get(&before);
  cancel_source *s = new_src("req");
  struct test_waiter tw;
  test_waiter_start(&tw, waiter_sleep, (void *)TOK(s));
  test_waiter_stop_with(&tw, test_rescue_cancel, s);
  test_waiter_blocked(&tw);
  cancel_source_cancel(s);
  test_waiter_end(&tw, test_tol(CANCEL_SEC(5)), NULL, NULL);
  assert_i64_eq(tw.result, -ECANCELED);
  cancel_metrics_get(&after);
  assert_true(after.wakes == before.wakes + 1);
  assert_true(after.overruns == before.overruns);
  assert_null(cancel_scope_current());
  cancel_source_unref(s);
}

/* fork(): the child is one thread, and its scans see only its own scopes
 * (the parent's other threads' chains are copied memory, not threads). */
struct parked {
  const cancel_token *tok;
  cancel_sem in, out;
};

static void *parked_main(void *p) {
  struct parked *k = p;
  CANCEL_SCOPE(k->tok, "parent worker");
  cancel_sem_post(&k->in);
  (void)cancel_sem_wait(NULL, &k->out, CANCEL_NEVER);
  return NULL;
}

static void release_parked(void *p) {
  (void)cancel_sem_post(&((struct parked *)p)->out);
}

static void test_fork_child_scans_itself(void **state) {
  (void)state;
  cancel_source *s = new_src("req");
  cancel_source_cancel(s);
  /* Shared: a failed assertion leaves the worker to the teardown. */
  struct parked *k = test_shared(sizeof *k);
  k->tok = TOK(s);
  assert_int_equal(cancel_sem_init(&k->in, 0), 0);
  assert_int_equal(cancel_sem_init(&k->out, 0), 0);
  pthread_t t = test_helper_start(parked_main, k, release_parked);
  assert_int_equal(cancel_sem_wait(NULL, &k->in, CANCEL_NEVER), 0);
  cancel_metrics m;
  cancel_metrics_get(&m);
  assert_int_equal(m.scopes_overdue, 1); /* the worker's, not its wait's */
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    int bad = 0;
    cancel_metrics_get(&m);
    bad |= m.scopes_overdue != 0;
    cancel_scope mine;
    cancel_scope_begin(&mine, TOK(s), "child work");
    cancel_metrics_get(&m);
    bad |= (m.scopes_overdue != 1) << 1;
    bad |= (cancel_scope_end(&mine) <= 0) << 2;
    _exit(bad);
  }
  int st = 0;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);
  assert_int_equal(cancel_sem_post(&k->out), 0);
  test_helper_join(t);
  cancel_source_unref(s);
}

/* ---- The scan against scopes ending: the racy path --------------------- */

void cancel__scopes_force_fence(int on); /* internal: the fallback path */
void cancel__scopes_scan(void (*fn)(void *, int, cancel_scope **, int),
                         void *ctx);

struct churn {
  int stop; /* atomic */
  uint64_t iters;
  int failed; /* atomic: sources that could not be made */
};

static void stop_churn(void *p) {
  __atomic_store_n(&((struct churn *)p)->stop, 1, __ATOMIC_RELEASE);
}

/* Scopes on tokens that die right after the scope ends: a scan that read
 * a scope after its end would touch a freed token (ASan) or race with the
 * frame's next use (TSan). */
static void *churn_main(void *p) {
  struct churn *c = p;
  uint64_t n = 0;
  while (!__atomic_load_n(&c->stop, __ATOMIC_ACQUIRE)) {
    cancel_source *s = NULL;
    if (cancel_source_new(&s, "churn") != 0) {
      /* Counted, asserted by the test once it joined the threads. */
      __atomic_add_fetch(&c->failed, 1, __ATOMIC_RELAXED);
      break;
    }
    cancel_scope a, b;
    cancel_scope_begin(&a, cancel_source_token(s), "churn outer");
    cancel_scope_begin(&b, NULL, "churn inner");
    if (n % 3 == 0)
      cancel_source_cancel_with(s, CANCEL_TIMEOUT, "churn");
    (void)cancel_sleep(cancel_source_token(s), 0);
    cancel_scope_end(&b);
    cancel_scope_end(&a);
    cancel_source_unref(s);
    n++;
  }
  __atomic_add_fetch(&c->iters, n, __ATOMIC_RELEASE);
  return NULL;
}

static void read_chain(void *ctx, int tid, cancel_scope **chain, int n) {
  (void)tid;
  uint64_t *seen = ctx;
  for (int i = 0; i < n; i++) {
    cancel_reason why;
    if (strlen(chain[i]->name) > 0 &&
        cancel_token_reason(chain[i]->tok, &why) == 1)
      (*seen)++;
  }
}

static void churn(int fence) {
  cancel__scopes_force_fence(fence);
  /* Shared: a thread that cannot start fails the test, and the teardown
   * stops the others. */
  struct churn *c = test_shared(sizeof *c);
  pthread_t t[3];
  for (int i = 0; i < 3; i++)
    t[i] = test_helper_start(churn_main, c, stop_churn);
  uint64_t scans = 0, seen = 0;
  int64_t end = cancel_now() + CANCEL_MSEC(300);
  while (cancel_now() < end) {
    cancel__scopes_scan(read_chain, &seen);
    scans++;
  }
  stop_churn(c);
  for (int i = 0; i < 3; i++)
    test_helper_join(t[i]);
  cancel__scopes_force_fence(0);
  assert_int_equal(__atomic_load_n(&c->failed, __ATOMIC_RELAXED), 0);
  uint64_t iters = __atomic_load_n(&c->iters, __ATOMIC_ACQUIRE);
  print_message("fence=%d: %llu scans, %llu scopes, %llu cancelled scopes "
                "seen\n",
                fence, (unsigned long long)scans, (unsigned long long)iters,
                (unsigned long long)seen);
  /* Both sides went on: no end stayed blocked on a scan, no scan on the
   * ends. */
  assert_true(scans > 0);
  assert_true(iters > 0);
}

static void test_scan_races_scope_end(void **state) {
  (void)state;
  churn(0);
  churn(1);
  cancel_metrics m;
  cancel_metrics_get(&m);
  assert_int_equal(m.scopes_overdue, 0);
}

/* ---- Metrics ---------------------------------------------------------------
 */

/* Every line of the text format 0.0.4, checked against its grammar:
 * comments (# HELP name text, # TYPE name type) and samples
 * name{label="value",...} value.  Returns the number of samples. */
static int check_exposition(const char *text) {
  regex_t help, type, sample;
  assert_int_equal(
      regcomp(&help, "^# HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*$", REG_EXTENDED), 0);
  assert_int_equal(regcomp(&type,
                           "^# TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                           "(counter|gauge|histogram|summary|untyped)$",
                           REG_EXTENDED),
                   0);
  assert_int_equal(
      regcomp(&sample,
              "^[a-zA-Z_:][a-zA-Z0-9_:]*"
              "(\\{([a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\]|\\\\.)*\""
              "(,[a-zA-Z_][a-zA-Z0-9_]*=\"([^\"\\\\]|\\\\.)*\")*)?\\})?"
              " [-+]?([0-9.eE+-]+|Inf|NaN)$",
              REG_EXTENDED),
      0);
  int samples = 0;
  char *copy = strdup(text), *save = NULL;
  for (char *l = strtok_r(copy, "\n", &save); l != NULL;
       l = strtok_r(NULL, "\n", &save)) {
    bool ok = regexec(&help, l, 0, NULL, 0) == 0 ||
              regexec(&type, l, 0, NULL, 0) == 0;
    if (!ok && regexec(&sample, l, 0, NULL, 0) == 0) {
      ok = true;
      samples++;
    }
    if (!ok)
      print_error("not in the text format: '%s'\n", l);
    assert_true(ok);
  }
  free(copy);
  regfree(&help);
  regfree(&type);
  regfree(&sample);
  return samples;
}

static uint64_t sample_value(const char *text, const char *series) {
  const char *p = strstr(text, series);
  if (p == NULL)
    return 0;
  return strtoull(p + strlen(series), NULL, 10);
}

static void test_metrics_prometheus(void **state) {
  (void)state;
  char *before = NULL, *after = NULL;
  size_t blen = 0, alen = 0;
  FILE *f = open_memstream(&before, &blen);
  assert_int_equal(cancel_metrics_write_prometheus(f), 0);
  fclose(f);

  /* Two timeouts from per-request names, a client gone, a woken wait. */
  cancel_source *a = new_src("client 10.0.0.7:5123");
  cancel_source *b = new_src("request 17");
  cancel_source *c = new_src("request 18");
  cancel_source_cancel_with(a, CANCEL_CLIENT_GONE, "peer closed");
  cancel_source_cancel_with(b, CANCEL_TIMEOUT, NULL);
  cancel_source_cancel_with(c, CANCEL_TIMEOUT, NULL);
  cancel_source *w = new_src("with \"quotes\" \\ and\nnewline");
  struct test_waiter tw;
  test_waiter_start(&tw, waiter_sleep, (void *)TOK(w));
  test_waiter_stop_with(&tw, test_rescue_cancel, w);
  test_waiter_blocked(&tw);
  cancel_source_cancel(w);
  test_waiter_end(&tw, test_tol(CANCEL_SEC(5)), NULL, NULL);
  assert_i64_eq(tw.result, -ECANCELED);

  f = open_memstream(&after, &alen);
  assert_int_equal(cancel_metrics_write_prometheus(f), 0);
  fclose(f);
  assert_int_equal(cancel_metrics_write_prometheus(NULL), -EINVAL);
  assert_true(check_exposition(before) > 10);
  assert_true(check_exposition(after) > 10);

  assert_true(
      sample_value(after, "cancel_cancellations_total{kind=\"timeout\"} ") ==
      sample_value(before, "cancel_cancellations_total{kind=\"timeout\"} ") +
          2);
  assert_true(sample_value(
                  after, "cancel_cancellations_total{kind=\"client gone\"} ") ==
              sample_value(
                  before, "cancel_cancellations_total{kind=\"client gone\"} ") +
                  1);
  /* Per-request names share one series. */
  assert_true(
      sample_value(
          after, "cancel_cancellations_by_origin_total{origin=\"request\"} ") >=
      2);
  assert_true(
      sample_value(
          after, "cancel_cancellations_by_origin_total{origin=\"client\"} ") >=
      1);
  assert_non_null(
      strstr(after, "origin=\"with \\\"quotes\\\" \\\\ and\\nnewline\""));
  assert_true(sample_value(after, "cancel_wake_latency_seconds_count ") >=
              sample_value(before, "cancel_wake_latency_seconds_count ") + 1);
  assert_non_null(
      strstr(after, "cancel_wake_latency_seconds_bucket{le=\"+Inf\"}"));
  assert_non_null(strstr(after, "cancel_scopes_overdue 0"));
  free(before);
  free(after);
  cancel_source_unref(a);
  cancel_source_unref(b);
  cancel_source_unref(c);
  cancel_source_unref(w);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test_setup_teardown(test_scope_not_cancelled, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_scope_overrun, setup, teardown),
      cmocka_unit_test_setup_teardown(test_scope_macro, setup, teardown),
      cmocka_unit_test_setup_teardown(test_scope_end_out_of_order, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_watchdog_reports_sleeper, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_watchdog_reports_spinner_once, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_watchdog_quiet_when_work_stops,
                                      setup, teardown),
      cmocka_unit_test_setup_teardown(test_watchdog_names_wrong_token, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_watchdog_names_no_token, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_wait_scope_is_not_an_overrun, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_fork_child_scans_itself, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_scan_races_scope_end, setup,
                                      teardown),
      cmocka_unit_test_setup_teardown(test_metrics_prometheus, setup, teardown),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
