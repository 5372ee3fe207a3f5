/*
 * Shutdown signals (cancel_signals_*): real SIGTERM and SIGINT sent to the
 * process with kill(), read by the reactor through a signalfd.
 *
 * Every scenario runs in a child process, so the test runner's signal
 * mask and dispositions are never touched: a plain fork() (so that
 * valgrind follows the child), or under ThreadSanitizer, which cannot start
 * threads in the child of a multi-threaded fork, fork() + exec of this
 * program with "--child <scenario>".  The child checks with CHECK() (no
 * cmocka there) and reports through its exit status; an alarm bounds it.
 */
#include "test_util.h"

#include "cancel/watch.h"
#include "internal.h"

#include <dirent.h>
#include <poll.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

#if defined(__SANITIZE_THREAD__)
#define TEST_UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_UNDER_TSAN 1
#endif
#endif

#define CHECK(c)                                                               \
  do {                                                                         \
    if (!(c)) {                                                                \
      fprintf(stderr, "signal_test child: %s:%d: CHECK(%s) failed\n",          \
              __FILE__, __LINE__, #c);                                         \
      return 1;                                                                \
    }                                                                          \
  } while (0)

static int64_t must_wait(void) {
  return test_tol(CANCEL_SEC(5));
}

/* ---- Quiet threads before fork() -------------------------------------- */

/* ---- Records ---------------------------------------------------------- */

/* The host's source and what its callback saw. */
struct host {
  cancel_source *src;
  cancel_reg reg;
  sem_t sem;
  int count;
  int64_t at;
  bool on_reactor;
  pthread_t tid;
};

static void host_cb(void *arg) {
  struct host *h = arg;
  h->at = cancel_now();
  h->on_reactor = cancel__on_reactor();
  h->tid = pthread_self();
  __atomic_add_fetch(&h->count, 1, __ATOMIC_SEQ_CST);
  sem_post(&h->sem);
}

static int host_init(struct host *h, const char *name) {
  memset(h, 0, sizeof *h);
  sem_init(&h->sem, 0, 0);
  CHECK(cancel_source_new(&h->src, name) == 0);
  CHECK(cancel_register(&h->reg, TOK(h->src), host_cb, h) == 0);
  return 0;
}

static void host_fini(struct host *h) {
  cancel_unregister(&h->reg);
  cancel_source_unref(h->src);
  sem_destroy(&h->sem);
}

static int check_reason(struct host *h, const char *detail) {
  cancel_reason r;
  CHECK(cancel_token_reason(TOK(h->src), &r) == 1);
  CHECK(r.kind == CANCEL_SHUTDOWN);
  CHECK(strcmp(r.detail, detail) == 0);
  CHECK(strcmp(r.origin, cancel_source_name(h->src)) == 0);
  CHECK(test_load(&h->count) == 1);
  return 0;
}

/* What the repeat callback saw. */
struct repeat {
  sem_t sem;
  int calls;
  int signo;
  unsigned count;
  bool on_reactor;
  bool unwatch; /* call cancel_signals_unwatch() from the callback */
  int unwatch_rc;
};

/* Atomics: the test reads these before its next kill(), and TSan does not
 * see kill() -> signalfd as a happens-before edge. */
static void repeat_cb(int signo, unsigned count, void *arg) {
  struct repeat *r = arg;
  __atomic_store_n(&r->signo, signo, __ATOMIC_SEQ_CST);
  __atomic_store_n(&r->count, count, __ATOMIC_SEQ_CST);
  __atomic_store_n(&r->on_reactor, cancel__on_reactor(), __ATOMIC_SEQ_CST);
  if (r->unwatch)
    r->unwatch_rc = cancel_signals_unwatch();
  __atomic_add_fetch(&r->calls, 1, __ATOMIC_SEQ_CST);
  sem_post(&r->sem);
}

static bool is_default(int signo) {
  struct sigaction sa;
  return sigaction(signo, NULL, &sa) == 0 && sa.sa_handler == SIG_DFL &&
         !(sa.sa_flags & SA_SIGINFO);
}

/* Known dispositions to start from (a shell may have ignored SIGINT for a
 * background job). */
static void reset_dispositions(void) {
  signal(SIGINT, SIG_DFL);
  signal(SIGTERM, SIG_DFL);
}

/* ---- Scenarios (run in the child) ------------------------------------- */

/* SIGTERM cancels with kind shutdown and "SIGTERM", on the reactor, and no
 * handler is installed on the way. */
static int sc_term(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  struct host h;
  if (host_init(&h, "host"))
    return 1;
  CHECK(cancel_signals_received() == 0);
  CHECK(cancel_signals_watch(h.src) == 0);
  CHECK(is_default(SIGTERM) && is_default(SIGINT));
  CHECK(!cancel_token_is_cancelled(TOK(h.src)));

  int64_t t0 = cancel_now();
  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  if (check_reason(&h, "SIGTERM"))
    return 1;
  CHECK(h.on_reactor);
  CHECK(!pthread_equal(h.tid, pthread_self()));
  CHECK(cancel_signals_received() == 1);
  CHECK(is_default(SIGTERM) && is_default(SIGINT));
  char line[128];
  cancel_reason r;
  cancel_token_reason(TOK(h.src), &r);
  cancel_reason_format(&r, line, sizeof line);
  CHECK(strcmp(line, "shutdown (host SIGTERM)") == 0);
  fprintf(stderr, "signal latency (kill -> callback on the reactor): %.1f us\n",
          (double)(h.at - t0) / 1e3);

  CHECK(cancel_signals_unwatch() == 0);
  host_fini(&h);
  return 0;
}

static int sc_sigint(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  struct host h;
  if (host_init(&h, "svc"))
    return 1;
  CHECK(cancel_signals_watch(h.src) == 0);
  CHECK(kill(getpid(), SIGINT) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  if (check_reason(&h, "SIGINT"))
    return 1;
  CHECK(cancel_signals_unwatch() == 0);
  host_fini(&h);
  return 0;
}

static bool received_is(void *arg) {
  return cancel_signals_received() == *(unsigned *)arg;
}

/* Later signals go to the repeat callback with their count; the reason
 * stays the first signal's. */
static int sc_repeat(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  struct host h;
  if (host_init(&h, "host"))
    return 1;
  struct repeat rp;
  memset(&rp, 0, sizeof rp);
  sem_init(&rp.sem, 0, 0);
  CHECK(cancel_signals_on_repeat(repeat_cb, &rp) == 0);
  CHECK(cancel_signals_watch(h.src) == 0);

  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  CHECK(test_load(&rp.calls) == 0);

  CHECK(kill(getpid(), SIGINT) == 0);
  CHECK(test_sem_wait_ns(&rp.sem, must_wait()) == 0);
  CHECK(__atomic_load_n(&rp.signo, __ATOMIC_SEQ_CST) == SIGINT);
  CHECK(__atomic_load_n(&rp.count, __ATOMIC_SEQ_CST) == 2);
  CHECK(__atomic_load_n(&rp.on_reactor, __ATOMIC_SEQ_CST));
  if (check_reason(&h, "SIGTERM")) /* unchanged, callback ran once */
    return 1;

  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&rp.sem, must_wait()) == 0);
  CHECK(__atomic_load_n(&rp.signo, __ATOMIC_SEQ_CST) == SIGTERM);
  CHECK(__atomic_load_n(&rp.count, __ATOMIC_SEQ_CST) == 3);
  CHECK(cancel_signals_received() == 3);

  /* Cleared: still counted, nobody told. */
  CHECK(cancel_signals_on_repeat(NULL, NULL) == 0);
  CHECK(kill(getpid(), SIGINT) == 0);
  unsigned four = 4;
  CHECK(test_wait_until(received_is, &four, must_wait()));
  CHECK(test_load(&rp.calls) == 2);
  if (check_reason(&h, "SIGTERM"))
    return 1;

  CHECK(cancel_signals_unwatch() == 0);
  host_fini(&h);
  sem_destroy(&rp.sem);
  return 0;
}

/* The signal reaches no thread as a delivery: not the worker threads (they
 * inherited the mask and keep blocking in their calls, uninterrupted), not
 * a handler (one is installed to prove it, and never runs). */
static int handler_calls;
static void counting_handler(int signo) {
  (void)signo;
  __atomic_add_fetch(&handler_calls, 1, __ATOMIC_SEQ_CST);
}

struct worker {
  int rfd;
  int rc;
  int err;
  bool done;
  bool term_blocked;
};

static void *worker_main(void *arg) {
  struct worker *w = arg;
  sigset_t cur;
  pthread_sigmask(SIG_SETMASK, NULL, &cur);
  w->term_blocked =
      sigismember(&cur, SIGTERM) == 1 && sigismember(&cur, SIGINT) == 1;
  struct pollfd p = {w->rfd, POLLIN, 0};
  w->rc = poll(&p, 1, -1); /* a signal delivered here would end it: EINTR */
  w->err = w->rc < 0 ? errno : 0;
  __atomic_store_n(&w->done, true, __ATOMIC_SEQ_CST);
  return NULL;
}

static int sc_threads(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0); /* before any thread */
  int p[2];
  CHECK(pipe(p) == 0);
  /* Static: a CHECK that fails returns from here while the workers still
   * block in poll(); they must not be left writing into a dead frame. */
  static struct worker wk[3];
  static pthread_t t[3];
  for (int i = 0; i < 3; i++) {
    memset(&wk[i], 0, sizeof wk[i]);
    wk[i].rfd = p[0];
    CHECK(pthread_create(&t[i], NULL, worker_main, &wk[i]) == 0);
  }
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = counting_handler;
  sigemptyset(&sa.sa_mask);
  CHECK(sigaction(SIGTERM, &sa, NULL) == 0);
  CHECK(sigaction(SIGINT, &sa, NULL) == 0);

  struct host h;
  if (host_init(&h, "host"))
    return 1;
  CHECK(cancel_signals_watch(h.src) == 0);
  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  if (check_reason(&h, "SIGTERM"))
    return 1;
  CHECK(h.on_reactor);
  CHECK(kill(getpid(), SIGINT) == 0);
  unsigned two = 2;
  CHECK(test_wait_until(received_is, &two, must_wait()));

  CHECK(test_load(&handler_calls) == 0);
  for (int i = 0; i < 3; i++) {
    CHECK(!pthread_equal(h.tid, t[i]));
    CHECK(!__atomic_load_n(&wk[i].done, __ATOMIC_SEQ_CST));
  }
  /* Wake the workers the ordinary way: their poll saw data, not EINTR. */
  CHECK(write(p[1], "x", 1) == 1);
  for (int i = 0; i < 3; i++) {
    CHECK(pthread_join(t[i], NULL) == 0);
    CHECK(wk[i].term_blocked);
    CHECK(wk[i].rc == 1);
    CHECK(wk[i].err == 0);
  }
  CHECK(test_load(&handler_calls) == 0);
  CHECK(cancel_signals_unwatch() == 0);
  reset_dispositions();
  host_fini(&h);
  close(p[0]);
  close(p[1]);
  return 0;
}

/* Return codes, a second watch, re-watching, a pending signal. */
static int sc_errors(void) {
  reset_dispositions();
  CHECK(cancel_signals_unwatch() == -EINVAL);
  CHECK(cancel_signals_watch(NULL) == -EINVAL);
  struct host a, b;
  if (host_init(&a, "first") || host_init(&b, "second"))
    return 1;
  /* watch blocks the signals in the calling thread by itself. */
  CHECK(cancel_signals_watch(a.src) == 0);
  sigset_t cur;
  pthread_sigmask(SIG_SETMASK, NULL, &cur);
  CHECK(sigismember(&cur, SIGTERM) == 1 && sigismember(&cur, SIGINT) == 1);
  CHECK(cancel_signals_watch(b.src) == -EBUSY);
  CHECK(cancel_signals_unwatch() == 0);
  CHECK(cancel_signals_unwatch() == -EINVAL);

  /* Not watching: the signal stays pending (blocked, default action). */
  CHECK(kill(getpid(), SIGTERM) == 0);
  sigset_t pend;
  CHECK(sigpending(&pend) == 0);
  CHECK(sigismember(&pend, SIGTERM) == 1);
  CHECK(!cancel_token_is_cancelled(TOK(a.src)));

  /* A new watch reads it at once, for its own source. */
  CHECK(cancel_signals_watch(b.src) == 0);
  CHECK(test_sem_wait_ns(&b.sem, must_wait()) == 0);
  if (check_reason(&b, "SIGTERM"))
    return 1;
  CHECK(!cancel_token_is_cancelled(TOK(a.src)));
  CHECK(cancel_signals_received() == 1);
  CHECK(sigpending(&pend) == 0);
  CHECK(sigismember(&pend, SIGTERM) == 0);
  CHECK(cancel_signals_unwatch() == 0);

  /* The watch held its own reference: dropping ours first is fine. */
  CHECK(cancel_signals_watch(a.src) == 0);
  host_fini(&a); /* ours goes; the watch's keeps the source alive */
  CHECK(cancel_signals_received() == 0);
  CHECK(kill(getpid(), SIGINT) == 0);
  unsigned one = 1;
  CHECK(test_wait_until(received_is, &one, must_wait()));
  CHECK(cancel_signals_unwatch() == 0); /* drops the last reference */
  host_fini(&b);
  return 0;
}

/* The repeat callback unwatches from the reactor thread: no deadlock, and
 * later signals stay pending. */
static int sc_unwatch_from_repeat(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  struct host h;
  if (host_init(&h, "host"))
    return 1;
  struct repeat rp;
  memset(&rp, 0, sizeof rp);
  sem_init(&rp.sem, 0, 0);
  rp.unwatch = true;
  rp.unwatch_rc = 99;
  CHECK(cancel_signals_on_repeat(repeat_cb, &rp) == 0);
  CHECK(cancel_signals_watch(h.src) == 0);
  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  CHECK(kill(getpid(), SIGINT) == 0);
  CHECK(test_sem_wait_ns(&rp.sem, must_wait()) == 0);
  CHECK(rp.unwatch_rc == 0);
  CHECK(cancel_signals_unwatch() == -EINVAL);
  CHECK(kill(getpid(), SIGTERM) == 0);
  sigset_t pend;
  CHECK(sigpending(&pend) == 0);
  CHECK(sigismember(&pend, SIGTERM) == 1);
  CHECK(cancel_signals_received() == 2);
  CHECK(cancel_signals_on_repeat(NULL, NULL) == 0);
  host_fini(&h);
  sem_destroy(&rp.sem);
  return 0;
}

/* exit() while watching: the library's exit-time join does not hang. */
static int sc_exit_watching(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  cancel_source *s;
  CHECK(cancel_source_new(&s, "host") == 0);
  CHECK(cancel_signals_watch(s) == 0);
  cancel_source_unref(s);
  exit(0);
}

/* The repeat callback forces the exit, as a host does on a second Ctrl-C. */
static void force_exit(int signo, unsigned count, void *arg) {
  (void)arg;
  exit(count == 2 && signo == SIGINT ? 42 : 3);
}

static int sc_force_exit(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  struct host h;
  if (host_init(&h, "host"))
    return 1;
  CHECK(cancel_signals_on_repeat(force_exit, NULL) == 0);
  CHECK(cancel_signals_watch(h.src) == 0);
  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  CHECK(kill(getpid(), SIGINT) == 0);
  for (;;)
    pause(); /* nothing unblocked arrives: the reactor calls exit(42) */
}

/* fork() while watching: the child is not watching until it unwatches
 * (releasing its copies) and watches again. */
static int sc_fork(void) {
  reset_dispositions();
  CHECK(cancel_signals_block() == 0);
  struct host h;
  if (host_init(&h, "parent"))
    return 1;
  CHECK(cancel_signals_watch(h.src) == 0);
  CHECK(test_others_asleep(must_wait()));
  pid_t pid = fork();
  CHECK(pid >= 0);
  if (pid == 0) {
    alarm((unsigned)(must_wait() / CANCEL_SEC(1)) + 5); /* not inherited */
    CHECK(cancel_signals_watch(h.src) == -EBUSY);
    CHECK(cancel_signals_unwatch() == 0);
    struct host c;
    if (host_init(&c, "child"))
      return 1;
    CHECK(cancel_signals_watch(c.src) == 0);
    CHECK(kill(getpid(), SIGTERM) == 0);
    CHECK(test_sem_wait_ns(&c.sem, must_wait()) == 0);
    if (check_reason(&c, "SIGTERM"))
      return 1;
    CHECK(cancel_signals_unwatch() == 0);
    host_fini(&c);
    host_fini(&h);
    exit(0);
  }
  int status = 0;
  CHECK(waitpid(pid, &status, 0) == pid);
  CHECK(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  /* The child's signal was the child's. */
  CHECK(!cancel_token_is_cancelled(TOK(h.src)));
  CHECK(cancel_signals_received() == 0);
  CHECK(kill(getpid(), SIGTERM) == 0);
  CHECK(test_sem_wait_ns(&h.sem, must_wait()) == 0);
  if (check_reason(&h, "SIGTERM"))
    return 1;
  CHECK(cancel_signals_unwatch() == 0);
  host_fini(&h);
  return 0;
}

static const struct {
  const char *name;
  int (*fn)(void);
} scenarios[] = {
    {"term", sc_term},
    {"sigint", sc_sigint},
    {"repeat", sc_repeat},
    {"threads", sc_threads},
    {"errors", sc_errors},
    {"unwatch_from_repeat", sc_unwatch_from_repeat},
    {"exit_watching", sc_exit_watching},
    {"force_exit", sc_force_exit},
    {"fork", sc_fork},
};

static int run_scenario(const char *name) {
  /* A hang ends in SIGALRM, which the parent reports. */
  alarm((unsigned)(test_tol(CANCEL_SEC(30)) / CANCEL_SEC(1)) + 1);
  for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
    if (strcmp(scenarios[i].name, name) == 0)
      return scenarios[i].fn();
  fprintf(stderr, "signal_test: no scenario %s\n", name);
  return 127;
}

/* ---- Parent side ------------------------------------------------------ */

static int run_child(const char *name) {
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
#ifdef TEST_UNDER_TSAN
    execl("/proc/self/exe", "signal_test", "--child", name, (char *)NULL);
    _exit(126);
#else
    exit(run_scenario(name));
#endif
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  if (WIFSIGNALED(status)) {
    print_error("scenario %s: killed by signal %d\n", name, WTERMSIG(status));
    fail();
  }
  assert_true(WIFEXITED(status));
  return WEXITSTATUS(status);
}

static void test_term(void **state) {
  (void)state;
  assert_int_equal(run_child("term"), 0);
}
static void test_sigint(void **state) {
  (void)state;
  assert_int_equal(run_child("sigint"), 0);
}
static void test_repeat(void **state) {
  (void)state;
  assert_int_equal(run_child("repeat"), 0);
}
static void test_threads_see_no_signal(void **state) {
  (void)state;
  assert_int_equal(run_child("threads"), 0);
}
static void test_errors(void **state) {
  (void)state;
  assert_int_equal(run_child("errors"), 0);
}
static void test_unwatch_from_repeat(void **state) {
  (void)state;
  assert_int_equal(run_child("unwatch_from_repeat"), 0);
}
static void test_exit_while_watching(void **state) {
  (void)state;
  assert_int_equal(run_child("exit_watching"), 0);
}
static void test_force_exit(void **state) {
  (void)state;
  assert_int_equal(run_child("force_exit"), 42);
}
static void test_fork(void **state) {
  (void)state;
#ifdef TEST_UNDER_TSAN
  print_message("fork scenario skipped under ThreadSanitizer (the child of "
                "a multi-threaded fork cannot start threads)\n");
  skip();
#endif
  assert_int_equal(run_child("fork"), 0);
}

int main(int argc, char **argv) {
  if (argc == 3 && strcmp(argv[1], "--child") == 0)
    return run_scenario(argv[2]);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_term),
      cmocka_unit_test(test_sigint),
      cmocka_unit_test(test_repeat),
      cmocka_unit_test(test_threads_see_no_signal),
      cmocka_unit_test(test_errors),
      cmocka_unit_test(test_unwatch_from_repeat),
      cmocka_unit_test(test_exit_while_watching),
      cmocka_unit_test(test_force_exit),
      cmocka_unit_test(test_fork),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
