/*
 * Helpers shared by the libcancel test programs.
 *
 * Include this header FIRST in every test file: it sets the feature macro
 * the POSIX calls need (the build may compile with -std=c11) and pulls in
 * cmocka in the order cmocka requires.
 *
 * Timing: every tolerance goes through test_tol(), which multiplies it by
 * CANCEL_TEST_TIME_SCALE (default 1.0) so that a slow machine, valgrind or a
 * sanitizer build can widen it without touching the tests.  Lower bounds
 * ("not before the deadline") are never scaled: they are the contract.
 *
 * Synchronisation: tests wait on real signals (semaphores, condition
 * variables, joins).  test_wait_until() polls and exists only to wait for
 * another thread's progress where the library offers no signal (e.g. "this
 * thread has seen the token cancelled").
 */
#ifndef CANCEL_TEST_UTIL_H
#define CANCEL_TEST_UTIL_H

#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <sched.h>
#include <semaphore.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cancel.h"

/* A source's token, shorter. */
#define TOK(s) cancel_source_token(s)

/* A heap source, or the test fails. */
static inline cancel_source *new_src(const char *name) {
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new(&s, name), 0);
  assert_non_null(s);
  return s;
}

/* ---- Time scale ------------------------------------------------------- */

/* CANCEL_TEST_TIME_SCALE from the environment, default 1.0.  Values that do
 * not parse as a positive number are ignored. */
static inline double test_time_scale(void) {
  /* 0 until read.  Threads may race to read it first: each computes the
   * same value, and the relaxed atomics keep that race defined (TSan). */
  static double scale;
  double s;
  __atomic_load(&scale, &s, __ATOMIC_RELAXED);
  if (s == 0.0) {
    s = 1.0;
    const char *env = getenv("CANCEL_TEST_TIME_SCALE");
    if (env != NULL && *env != '\0') {
      char *end = NULL;
      double v = strtod(env, &end);
      if (end != env && v > 0.0)
        s = v;
    }
    __atomic_store(&scale, &s, __ATOMIC_RELAXED);
  }
  return s;
}

/* A tolerance of `ns` nanoseconds, widened by the time scale. */
static inline int64_t test_tol(int64_t ns) {
  return (int64_t)((double)ns * test_time_scale());
}

/* Real time sleep (used only to assert that something did NOT happen, or to
 * give another thread a chance to reach a blocking call). */
static inline void test_sleep_ns(int64_t ns) {
  struct timespec ts;
  if (ns <= 0)
    return;
  ts.tv_sec = (time_t)(ns / 1000000000);
  ts.tv_nsec = (long)(ns % 1000000000);
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR) {
  }
}

/* ---- Assertions on 64-bit signed values (cmocka's are unsigned) ------- */

#define TEST_CMP_I64(a, op, b)                                                 \
  do {                                                                         \
    int64_t test_a_ = (int64_t)(a);                                            \
    int64_t test_b_ = (int64_t)(b);                                            \
    if (!(test_a_ op test_b_)) {                                               \
      print_error("%s:%d: expected %s %s %s, got %" PRId64 " vs %" PRId64      \
                  "\n",                                                        \
                  __FILE__, __LINE__, #a, #op, #b, test_a_, test_b_);          \
      fail();                                                                  \
    }                                                                          \
  } while (0)

#define assert_i64_eq(a, b) TEST_CMP_I64(a, ==, b)
#define assert_i64_ne(a, b) TEST_CMP_I64(a, !=, b)
#define assert_i64_le(a, b) TEST_CMP_I64(a, <=, b)
#define assert_i64_lt(a, b) TEST_CMP_I64(a, <, b)
#define assert_i64_ge(a, b) TEST_CMP_I64(a, >=, b)
#define assert_i64_gt(a, b) TEST_CMP_I64(a, >, b)

/* ---- Threads ---------------------------------------------------------- */

typedef void *test_thread_fn(void *arg);

/* Starts fn(arg) on a new thread; aborts the test if that fails. */
static inline pthread_t test_thread_start(test_thread_fn *fn, void *arg) {
  pthread_t t;
  int rc = pthread_create(&t, NULL, fn, arg);
  if (rc != 0) {
    print_error("pthread_create: %s\n", strerror(rc));
    fail();
  }
  return t;
}

/* Joins t and returns what its function returned. */
static inline void *test_thread_join(pthread_t t) {
  void *ret = NULL;
  int rc = pthread_join(t, &ret);
  if (rc != 0) {
    print_error("pthread_join: %s\n", strerror(rc));
    fail();
  }
  return ret;
}

/* ---- Helper threads that a failed test stops ------------------------- *
 * cmocka ends a failed assertion with a longjmp out of the test function:
 * its frame is gone, and a helper thread still using what the test kept
 * there would crash the whole run later, far from the failure.  So a test
 * whose helpers outlive a possible failure shares with them only memory
 * from test_shared() (freed after the test), starts them with
 * test_helper_start() and a stop function, and joins them with
 * test_helper_join().  After every test, passed or failed, the teardown
 * below (cmocka_unit_test is redefined to run it) calls the stop function
 * of each helper still running, joins it, then frees the shared blocks:
 * a failing test reports, stops its helpers, and the next test runs. */

typedef void test_stop_fn(void *arg);

#define TEST_HELPERS_MAX 64
#define TEST_SHARED_MAX 64

static struct test_helper_slot {
  pthread_t thread;
  test_stop_fn *stop;
  void *arg;
  bool live;
} test_helpers_[TEST_HELPERS_MAX];
static void *test_shared_[TEST_SHARED_MAX];

/* Before one of the helpers below fails the test: lets the waiters it
 * just started reach their wait (see test_waiter_start). */
static inline void test_settle_waiters_(void);

/* A zeroed block that lives until the end of the running test (so helper
 * threads may use it after a failure).  Fails the test when memory or the
 * table runs out. */
static inline void *test_shared(size_t size) {
  for (int i = 0; i < TEST_SHARED_MAX; i++)
    if (test_shared_[i] == NULL) {
      void *p = calloc(1, size);
      if (p == NULL) {
        print_error("test_shared: out of memory\n");
        test_settle_waiters_();
        fail();
        __builtin_unreachable(); /* fail() longjmps or exits */
      }
      test_shared_[i] = p;
      return p;
    }
  print_error("test_shared: more than %d blocks in one test\n",
              TEST_SHARED_MAX);
  test_settle_waiters_();
  fail();
  __builtin_unreachable();
}

/* Frees a block of test_shared() before the end of the test (one that a
 * loop makes anew in each round: the table holds TEST_SHARED_MAX). */
static inline void test_shared_free(void *p) {
  for (int i = 0; i < TEST_SHARED_MAX; i++)
    if (p != NULL && test_shared_[i] == p) {
      free(p);
      test_shared_[i] = NULL;
      return;
    }
}

/* Starts fn(arg) as a helper of the running test.  stop(arg) MUST make fn
 * return soon whatever state the test left (set its quit flag and post
 * what it waits on, cancel its token); arg MUST NOT point into the test's
 * frame (use test_shared()).  Fails the test if the thread cannot start. */
static inline pthread_t test_helper_start(test_thread_fn *fn, void *arg,
                                          test_stop_fn *stop) {
  for (int i = 0; i < TEST_HELPERS_MAX; i++) {
    struct test_helper_slot *h = &test_helpers_[i];
    if (h->live)
      continue;
    int rc = pthread_create(&h->thread, NULL, fn, arg);
    if (rc != 0) {
      print_error("pthread_create: %s\n", strerror(rc));
      test_settle_waiters_();
      fail();
    }
    h->stop = stop;
    h->arg = arg;
    h->live = true;
    return h->thread;
  }
  print_error("test_helper_start: more than %d helpers\n", TEST_HELPERS_MAX);
  fail();
  return pthread_self();
}

/* The stop of a helper that ends by itself soon (a bounded loop). */
static inline void test_no_stop(void *arg) {
  (void)arg;
}

/* Joins a helper started by test_helper_start() and returns its result. */
static inline void *test_helper_join(pthread_t t) {
  for (int i = 0; i < TEST_HELPERS_MAX; i++) {
    struct test_helper_slot *h = &test_helpers_[i];
    if (h->live && pthread_equal(h->thread, t)) {
      h->live = false;
      void *ret = NULL;
      pthread_join(t, &ret);
      return ret;
    }
  }
  print_error("test_helper_join: not a helper of this test\n");
  fail();
  return NULL;
}

/* The teardown of every test: stops and joins what a failed test left
 * running, then frees its shared blocks. */
static inline int test_helpers_teardown(void **state) {
  (void)state;
  for (int i = 0; i < TEST_HELPERS_MAX; i++) {
    struct test_helper_slot *h = &test_helpers_[i];
    if (!h->live)
      continue;
    fprintf(stderr, "test teardown: stopping helper thread %d\n", i);
    h->stop(h->arg);
    pthread_join(h->thread, NULL);
    h->live = false;
  }
  for (int i = 0; i < TEST_SHARED_MAX; i++) {
    free(test_shared_[i]);
    test_shared_[i] = NULL;
  }
  return 0;
}

#undef cmocka_unit_test
#define cmocka_unit_test(f)                                                    \
  { #f, f, NULL, test_helpers_teardown, NULL }

/* A test that cannot go on safely (a thread it started cannot be stopped)
 * ends the program with a report instead of a crash: exit status 1, which
 * CTest counts as a failed test. */
static inline void test_give_up(const char *why) {
  fprintf(stderr, "test program ended: %s\n", why);
  fflush(NULL);
  _exit(1);
}

/* Runs fn(arg) on another thread and waits for it. */
static inline void *test_run_on_thread(test_thread_fn *fn, void *arg) {
  return test_thread_join(test_thread_start(fn, arg));
}

/* ---- Semaphores ------------------------------------------------------- */

/* Waits for sem at most timeout_ns.  Returns 0 when it was posted, -1 on
 * timeout. */
static inline int test_sem_wait_ns(sem_t *sem, int64_t timeout_ns) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  int64_t ns = (int64_t)ts.tv_nsec + timeout_ns % 1000000000;
  ts.tv_sec += (time_t)(timeout_ns / 1000000000 + ns / 1000000000);
  ts.tv_nsec = (long)(ns % 1000000000);
  for (;;) {
    if (sem_timedwait(sem, &ts) == 0)
      return 0;
    if (errno != EINTR)
      return -1;
  }
}

/* ---- A start gate for racing helpers ---------------------------------- *
 * Like a barrier that the helpers of a race pass together, but one that a
 * failed test (a helper that could not start) can open: helpers stuck at a
 * barrier of n could never be stopped.  The gate lives where the helpers'
 * state does (test_shared() or static storage). */

struct test_gate {
  sem_t arrived;
  int open; /* atomic */
};

static inline void test_gate_init(struct test_gate *g) {
  sem_init(&g->arrived, 0, 0);
  g->open = 0; /* before any helper runs */
}

/* Opens the gate: every helper at it goes on. */
static inline void test_gate_open(struct test_gate *g) {
  __atomic_store_n(&g->open, 1, __ATOMIC_RELEASE);
}

/* A helper's side: arrives, then waits (spinning, so that all leave at
 * once, as from a barrier) until the gate opens. */
static inline void test_gate_pass(struct test_gate *g) {
  sem_post(&g->arrived);
  while (!__atomic_load_n(&g->open, __ATOMIC_ACQUIRE))
    sched_yield();
}

/* The test's side: waits until n helpers arrived (at most timeout_ns for
 * each), then opens the gate.  Returns false when they did not all come
 * (the gate is open anyway). */
static inline bool test_gate_release(struct test_gate *g, int n,
                                     int64_t timeout_ns) {
  bool all = true;
  for (int i = 0; i < n && all; i++)
    all = test_sem_wait_ns(&g->arrived, timeout_ns) == 0;
  test_gate_open(g);
  return all;
}

static inline void test_gate_destroy(struct test_gate *g) {
  sem_destroy(&g->arrived);
}

/* ---- Counters --------------------------------------------------------- */

/* A cancel_fn that atomically increments the int that arg points to. */
static inline void test_count_cb(void *arg) {
  __atomic_add_fetch((int *)arg, 1, __ATOMIC_SEQ_CST);
}

static inline int test_load(const int *p) {
  return __atomic_load_n(p, __ATOMIC_SEQ_CST);
}

/* ---- Polling wait (only where no signal exists) ----------------------- */

typedef bool test_cond_fn(void *arg);

/* Polls cond(arg) until it holds or timeout_ns passed (yielding, then
 * sleeping 100 us between polls).  Returns true when cond held. */
static inline bool test_wait_until(test_cond_fn *cond, void *arg,
                                   int64_t timeout_ns) {
  int64_t end = cancel_now() + timeout_ns;
  for (unsigned i = 0;; i++) {
    if (cond(arg))
      return true;
    if (cancel_now() > end)
      return cond(arg);
    if (i < 100)
      sched_yield();
    else
      test_sleep_ns(CANCEL_USEC(100));
  }
}

/* A test_cond_fn: the token arg points to is cancelled. */
static inline bool test_token_cancelled(void *arg) {
  return cancel_token_is_cancelled((const cancel_token *)arg);
}

/* A callback's record: when it ran, on which thread, how often; the
 * semaphore is posted each time (the test waits on it, no sleeping). */
struct fire_rec {
  sem_t sem;
  int count;
  int64_t at;
  pthread_t tid;
};

static inline void fire_rec_init(struct fire_rec *f) {
  memset(f, 0, sizeof *f);
  sem_init(&f->sem, 0, 0);
}

static inline void fire_cb(void *arg) {
  struct fire_rec *f = arg;
  f->at = cancel_now();
  f->tid = pthread_self();
  __atomic_add_fetch(&f->count, 1, __ATOMIC_SEQ_CST);
  sem_post(&f->sem);
}

/* "Not cancelled yet": tok must not have fired unless `ns` have passed
 * since `since` (a slow or loaded machine may let a short grace or timeout
 * run out between the call and this check; that is not a failure). */
#define assert_not_fired_before(tok, since, ns)                                \
  do {                                                                         \
    bool fired_ = cancel_token_is_cancelled(tok);                              \
    if (fired_)                                                                \
      assert_true(cancel_now() >= (since) + (ns));                             \
  } while (0)

/* ======================================================================
 * Helpers for the tests of the waits (appended for issue 3).
 * ====================================================================== */

#include <dirent.h>
#include <fcntl.h>
#include <signal.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

/* ---- Thread identity and state ---------------------------------------- */

/* The kernel id of the calling thread (for /proc/self/task/<tid>). */
static inline pid_t test_gettid(void) {
  return (pid_t)syscall(SYS_gettid);
}

/* The scheduler state of thread tid as /proc shows it ('R' running, 'S'
 * sleeping interruptibly, 'D', 'T', ...), or 0 if it cannot be read. */
static inline char test_thread_state(pid_t tid) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/self/task/%d/stat", (int)tid);
  FILE *f = fopen(path, "r");
  if (f == NULL)
    return 0;
  size_t n = fread(buf, 1, sizeof buf - 1, f);
  fclose(f);
  buf[n] = '\0';
  /* "tid (comm) S ...": comm may hold spaces and parentheses, so look
   * after the last ')'. */
  char *p = strrchr(buf, ')');
  if (p == NULL || p[1] != ' ' || p[2] == '\0')
    return 0;
  return p[2];
}

/* Waits (polling) until thread tid has been seen sleeping in the kernel
 * ('S') on two looks 200 us apart, or timeout_ns passed.  Returns true
 * when it was.  Used to cancel or complete a wait only once the waiter is
 * really blocked: a thread that reported "about to wait" and is then seen
 * asleep is in the wait (or, under valgrind, possibly queued for the big
 * lock just before it: the test stays correct, only less sharp). */
static inline bool test_wait_blocked(pid_t tid, int64_t timeout_ns) {
  int64_t end = cancel_now() + timeout_ns;
  int seen = 0;
  for (;;) {
    if (test_thread_state(tid) == 'S') {
      if (++seen >= 2)
        return true;
    } else {
      seen = 0;
    }
    if (cancel_now() > end)
      return false;
    test_sleep_ns(CANCEL_USEC(200));
  }
}

/* ---- Descriptors ------------------------------------------------------ */

/* How many descriptors the process has open (entries of /proc/self/fd,
 * not counting the one used to list them), or -1. */
static inline int test_fd_count(void) {
  DIR *d = opendir("/proc/self/fd");
  if (d == NULL)
    return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(d);
  return n - 1;
}

/* True when fd is an open descriptor. */
static inline bool test_fd_is_open(int fd) {
  return fcntl(fd, F_GETFD) != -1 || errno != EBADF;
}

/* ---- Signal storm: EINTR for every wait ------------------------------- *
 * test_sigstorm_start(&s, pthread_self(), CANCEL_MSEC(1)) starts a thread
 * that sends SIGUSR1 to the target thread every `period` until
 * test_sigstorm_stop(&s).  The handler is a no-op installed WITHOUT
 * SA_RESTART, so every blocking system call the target is in returns EINTR.
 * A wait that survives the storm returns only for its real reason.
 *
 * The handler stays installed after stop (a signal still in flight must not
 * meet SIG_DFL, which would kill the process).  The target MUST outlive the
 * storm: stop it before the target thread exits. */

/* What the storm thread uses: test_shared() memory, so that a test that
 * fails during a storm leaves it to the teardown, which stops it. */
struct test_sigstorm_core {
  pthread_t target;
  int64_t period;
  int stop;  /* atomic */
  long sent; /* atomic: signals sent */
};

struct test_sigstorm {
  struct test_sigstorm_core *core;
  pthread_t thread;
  long hits_before;
};

/* Handler invocations in this process (all targets). */
static inline long *test_sigstorm_hits(void) {
  static long hits;
  return &hits;
}

static inline void test_sigstorm_handler(int sig) {
  (void)sig;
  __atomic_add_fetch(test_sigstorm_hits(), 1, __ATOMIC_RELAXED);
}

/* Installs the no-op SIGUSR1 handler without SA_RESTART and unblocks
 * SIGUSR1 in the calling thread.  Idempotent. */
static inline void test_sigstorm_install(void) {
  struct sigaction sa;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = test_sigstorm_handler;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0; /* no SA_RESTART: blocking calls fail with EINTR */
  if (sigaction(SIGUSR1, &sa, NULL) != 0) {
    print_error("sigaction: %s\n", strerror(errno));
    fail();
  }
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_UNBLOCK, &set, NULL);
}

static inline void test_sigstorm_halt(void *arg) {
  __atomic_store_n(&((struct test_sigstorm_core *)arg)->stop, 1,
                   __ATOMIC_RELEASE);
}

static inline void *test_sigstorm_main(void *arg) {
  struct test_sigstorm_core *s = arg;
  /* The storm thread itself never takes the signal. */
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGUSR1);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  while (!__atomic_load_n(&s->stop, __ATOMIC_ACQUIRE)) {
    if (pthread_kill(s->target, SIGUSR1) == 0)
      __atomic_add_fetch(&s->sent, 1, __ATOMIC_RELAXED);
    test_sleep_ns(s->period);
  }
  return NULL;
}

/* Starts a storm of SIGUSR1 at `target` every period_ns.  Installs the
 * handler (and unblocks SIGUSR1 in the calling thread: call it from the
 * target, or make sure the target has SIGUSR1 unblocked). */
static inline void test_sigstorm_start(struct test_sigstorm *s,
                                       pthread_t target, int64_t period_ns) {
  memset(s, 0, sizeof *s);
  test_sigstorm_install();
  struct test_sigstorm_core *c = test_shared(sizeof *c);
  c->target = target;
  c->period = period_ns;
  s->core = c;
  s->hits_before = __atomic_load_n(test_sigstorm_hits(), __ATOMIC_RELAXED);
  s->thread = test_helper_start(test_sigstorm_main, c, test_sigstorm_halt);
  /* Return once the storm blows (its first signal sent: a loaded machine
   * may be slow to run the new thread), so that a wait started now is hit
   * by the next ones. */
  while (__atomic_load_n(&c->sent, __ATOMIC_RELAXED) == 0)
    test_sleep_ns(CANCEL_USEC(100));
}

/* Stops the storm and returns how many handler runs happened while it
 * blew (in this process).  The first signal may land before the wait
 * starts: hits >= 2 shows that the storm really hit the wait. */
static inline long test_sigstorm_stop(struct test_sigstorm *s) {
  test_sigstorm_halt(s->core);
  test_helper_join(s->thread);
  test_shared_free(s->core);
  s->core = NULL;
  return __atomic_load_n(test_sigstorm_hits(), __ATOMIC_RELAXED) -
         s->hits_before;
}

/* Waits until the storm has hit n times (handler runs since start) or
 * `until` (cancel_now() time) has come; returns the hits.  For a test
 * whose wait is still blocked: on a loaded machine the storm's thread may
 * get the CPU only a few times a window, and what must be shown is that
 * signals landed during the wait, not how many a millisecond. */
static inline long test_sigstorm_await(struct test_sigstorm *s, long n,
                                       int64_t until) {
  long hits;
  while ((hits = __atomic_load_n(test_sigstorm_hits(), __ATOMIC_RELAXED) -
                 s->hits_before) < n &&
         cancel_now() < until)
    test_sleep_ns(CANCEL_MSEC(1));
  return hits;
}

/* ---- Measured waits ---------------------------------------------------- */

/* The elapsed time since t0 (cancel_now() units). */
static inline int64_t test_since(int64_t t0) {
  return cancel_now() - t0;
}

/* Asserts that an event measured at `elapsed` after its trigger happened
 * no earlier than `lo` (never scaled: a contract) and no later than
 * lo + test_tol(slack). */
#define assert_elapsed_within(elapsed, lo, slack)                              \
  do {                                                                         \
    int64_t test_e_ = (int64_t)(elapsed);                                      \
    assert_i64_ge(test_e_, (int64_t)(lo));                                     \
    assert_i64_lt(test_e_, (int64_t)(lo) + test_tol(slack));                   \
  } while (0)

/* CANCEL_STRESS_SCALE from the environment (default 1.0), for the number
 * of rounds of a stress test. */
static inline double test_stress_scale(void) {
  const char *env = getenv("CANCEL_STRESS_SCALE");
  if (env != NULL && *env != '\0') {
    char *end = NULL;
    double v = strtod(env, &end);
    if (end != env && v > 0.0)
      return v;
  }
  return 1.0;
}

/* ---- A waiter thread ---------------------------------------------------- *
 * Runs one wait on its own thread and records when it started and ended,
 * its kernel id (to see it blocked) and its result:
 *
 *   struct test_waiter w;
 *   test_waiter_start(&w, my_wait, &ctx);   // returns once it runs
 *   test_waiter_blocked(&w);                // seen asleep in the kernel
 *   ... cancel or complete ...
 *   test_waiter_end(&w, test_tol(CANCEL_SEC(2)), rescue, &ctx);
 *   assert_i64_eq(w.result, -ECANCELED);
 *
 * test_waiter_end() joins; if the waiter does not return in time (a lost
 * wake-up) it reports, runs rescue(arg) to unblock it, and fails the test
 * once it is joined, or ends the program (test_give_up) if even that did
 * not unblock it (the waiter's memory may not be released while it runs).
 *
 * What the waiter thread writes lives in test_shared() memory, not in the
 * caller's struct: a test that fails between start and end leaves the
 * waiter to the teardown, which runs the stop given to
 * test_waiter_stop_with() (if any), waits a while for the waiter to
 * return, joins it, or ends the program when it does not return.  fn's arg
 * is the caller's: fn should read it before it blocks, not write it after.
 * A waiter just started may not have read it yet: when a helper of this
 * header fails the test (no memory for the next waiter, no thread), it
 * first waits until every waiter was seen blocked or has returned, so that
 * none reads its arg from the frame the failure abandons. */

typedef int64_t test_wait_fn(void *arg);

struct test_waiter_core {
  test_wait_fn *fn;
  void *arg;
  void (*stop)(void *); /* the teardown's way to end fn, or NULL */
  void *stop_arg;
  pid_t tid;
  sem_t started, finished;
  int64_t result;
  int64_t t_start, t_end;
};

struct test_waiter {
  struct test_waiter_core *core;
  pthread_t thread;
  pid_t tid;
  sem_t *finished;        /* posted when fn returned */
  int64_t result;         /* set by test_waiter_end() */
  int64_t t_start, t_end; /* cancel_now() just before and after fn */
};

static inline void *test_waiter_main(void *p) {
  struct test_waiter_core *w = p;
  w->tid = test_gettid();
  w->t_start = cancel_now();
  sem_post(&w->started);
  w->result = w->fn(w->arg);
  w->t_end = cancel_now();
  sem_post(&w->finished);
  return NULL;
}

/* The teardown's stop of a waiter a failed test left: its stop, then a
 * bounded wait for fn to return (the join follows). */
static inline void test_waiter_halt(void *p) {
  struct test_waiter_core *w = p;
  if (w->stop != NULL)
    w->stop(w->stop_arg);
  if (test_sem_wait_ns(&w->finished, test_tol(CANCEL_SEC(2))) != 0)
    test_give_up("a failed test left a waiter thread blocked");
}

static inline void test_waiter_start(struct test_waiter *w, test_wait_fn *fn,
                                     void *arg) {
  memset(w, 0, sizeof *w);
  struct test_waiter_core *c = test_shared(sizeof *c);
  c->fn = fn;
  c->arg = arg;
  sem_init(&c->started, 0, 0);
  sem_init(&c->finished, 0, 0);
  w->core = c;
  w->finished = &c->finished;
  w->thread = test_helper_start(test_waiter_main, c, test_waiter_halt);
  while (sem_wait(&c->started) != 0) {
  }
  w->tid = c->tid;
  w->t_start = c->t_start;
}

static inline void test_settle_waiters_(void) {
  for (int i = 0; i < TEST_HELPERS_MAX; i++) {
    struct test_helper_slot *h = &test_helpers_[i];
    if (!h->live || h->stop != test_waiter_halt)
      continue;
    struct test_waiter_core *c = h->arg;
    int v = 0;
    sem_getvalue(&c->finished, &v);
    if (v == 0)
      (void)test_wait_blocked(c->tid, test_tol(CANCEL_SEC(1)));
  }
}

/* How the teardown ends this waiter if the test fails before
 * test_waiter_end(): stop(arg), e.g. test_rescue_cancel and a source
 * (arg must outlive the test's frame). */
static inline void test_waiter_stop_with(struct test_waiter *w,
                                         void (*stop)(void *), void *arg) {
  w->core->stop_arg = arg;
  w->core->stop = stop;
}

static inline void test_waiter_end(struct test_waiter *w, int64_t timeout_ns,
                                   void (*rescue)(void *), void *rescue_arg) {
  struct test_waiter_core *c = w->core;
  bool late = test_sem_wait_ns(&c->finished, timeout_ns) != 0;
  if (late) {
    print_error("waiter did not return within %" PRId64 " ms\n",
                timeout_ns / 1000000);
    if (rescue != NULL)
      rescue(rescue_arg);
    if (test_sem_wait_ns(&c->finished, CANCEL_SEC(10)) != 0)
      test_give_up("a waiter thread is still blocked after its rescue");
  }
  test_helper_join(w->thread);
  w->result = c->result;
  w->t_end = c->t_end;
  sem_destroy(&c->started);
  sem_destroy(&c->finished);
  test_shared_free(c);
  w->core = NULL;
  w->finished = NULL;
  if (late)
    fail();
}

/* A rescue for test_waiter_end(): cancels the source arg points to. */
static inline void test_rescue_cancel(void *src) {
  cancel_source_cancel((cancel_source *)src);
}

/* ---- The blocked waiter ------------------------------------------------- *
 * Most tests of a wait have the same shape: a waiter thread enters the
 * wait, the test waits until it is seen blocked in the kernel, then makes
 * the wait's condition true or cancels its token and checks how and how
 * soon it returned:
 *
 *   struct test_waiter w;
 *   test_waiter_block(&w, my_wait, &ctx);
 *   test_waiter_cancel(&w, src, LATE);   // or: make ready, test_waiter_end
 *
 * Cancelling or completing before the waiter blocks would test the fast
 * path instead of the wake-up, and pass for the wrong reason. */

/* Fails the test unless the waiter w is seen blocked in the kernel within
 * test_tol(5 s).  A waiter that returned already counts as a failure too:
 * it did not block. */
static inline void test_waiter_blocked(struct test_waiter *w) {
  if (!test_wait_blocked(w->tid, test_tol(CANCEL_SEC(5)))) {
    int done = 0;
    sem_getvalue(w->finished, &done);
    print_error("the waiter %s\n", done ? "returned instead of blocking"
                                        : "was not seen blocked within 5 s");
    fail();
  }
}

/* test_waiter_start(), then test_waiter_blocked(). */
static inline void test_waiter_block(struct test_waiter *w, test_wait_fn *fn,
                                     void *arg) {
  test_waiter_start(w, fn, arg);
  test_waiter_blocked(w);
}

/* Cancels src under the blocked waiter w (src must not have been cancelled
 * before) and ends w: its wait MUST return -ECANCELED within test_tol(late)
 * of the cancel.  w.result and w.t_end are set as by test_waiter_end(). */
static inline void test_waiter_cancel(struct test_waiter *w, cancel_source *src,
                                      int64_t late) {
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(src), 1);
  test_waiter_end(w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w->result, -ECANCELED);
  assert_i64_lt(w->t_end - t_cancel, test_tol(late));
}

/* Waits until every other thread of the process has been seen asleep in
 * the kernel on two looks 200 us apart.  fork() copies the locks that
 * other threads hold, and gcc 12's ASan allocator takes no lock around
 * fork: a child forked while the reactor thread is inside malloc (it
 * allocates while it starts) deadlocks or gets a corrupt heap. */
static inline bool test_others_asleep(int64_t timeout_ns) {
  pid_t self = (pid_t)syscall(SYS_gettid);
  int64_t end = cancel_now() + timeout_ns;
  int seen = 0;
  for (;;) {
    bool all = true;
    DIR *d = opendir("/proc/self/task");
    if (d == NULL)
      return false;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
      pid_t tid = (pid_t)atoi(e->d_name);
      if (tid > 0 && tid != self && test_thread_state(tid) != 'S')
        all = false;
    }
    closedir(d);
    seen = all ? seen + 1 : 0;
    if (seen >= 2)
      return true;
    if (cancel_now() > end)
      return false;
    test_sleep_ns(CANCEL_USEC(200));
  }
}

/* ---- Captured log lines (cancel/log.h) ---------------------------------- *
 * test_log_capture() routes libcancel's log lines (every level) here;
 * test_log_release() restores standard error and forgets them.  Lines are
 * kept as "<level> <line>".  The find functions take NULL-terminated lists
 * of substrings that one line must all hold. */

#include <stdarg.h>

#include "cancel/log.h"

#define TEST_LOG_MAX 1024

struct test_log {
  pthread_mutex_t mu;
  char *lines[TEST_LOG_MAX];
  int n;
};

/* The one capture of the process (in a function: no unused static in the
 * tests that do not capture). */
static inline struct test_log *test_log(void) {
  static struct test_log log = {.mu = PTHREAD_MUTEX_INITIALIZER};
  return &log;
}

static inline void test_log_sink(int level, const char *line, size_t len,
                                 void *arg) {
  (void)len;
  (void)arg;
  struct test_log *l = test_log();
  pthread_mutex_lock(&l->mu);
  if (l->n < TEST_LOG_MAX) {
    size_t n = strlen(line) + 16;
    char *copy = malloc(n);
    if (copy != NULL) {
      snprintf(copy, n, "%d %s", level, line);
      l->lines[l->n++] = copy;
    }
  }
  pthread_mutex_unlock(&l->mu);
}

static inline void test_log_forget(void) {
  struct test_log *l = test_log();
  pthread_mutex_lock(&l->mu);
  for (int i = 0; i < l->n; i++)
    free(l->lines[i]);
  l->n = 0;
  pthread_mutex_unlock(&l->mu);
}

static inline void test_log_capture(void) {
  test_log_forget();
  cancel_log_set_sink(test_log_sink, NULL, CANCEL_LOG_DEBUG);
}

static inline void test_log_release(void) {
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
  test_log_forget();
}

/* Whether line holds every needle of ap. */
static inline bool test_log_line_has(const char *line, va_list ap) {
  const char *n;
  while ((n = va_arg(ap, const char *)) != NULL)
    if (strstr(line, n) == NULL)
      return false;
  return true;
}

/* Waits up to timeout_ns for a line holding every needle (NULL-ended);
 * copies it into out (may be NULL).  Returns whether one came. */
static inline bool test_log_find_within(char *out, size_t len,
                                        int64_t timeout_ns, ...) {
  struct test_log *l = test_log();
  int64_t end = cancel_now() + timeout_ns;
  for (;;) {
    pthread_mutex_lock(&l->mu);
    for (int i = 0; i < l->n; i++) {
      va_list ap;
      va_start(ap, timeout_ns);
      bool all = test_log_line_has(l->lines[i], ap);
      va_end(ap);
      if (all) {
        if (out != NULL)
          snprintf(out, len, "%s", l->lines[i]);
        pthread_mutex_unlock(&l->mu);
        return true;
      }
    }
    pthread_mutex_unlock(&l->mu);
    if (cancel_now() > end)
      return false;
    test_sleep_ns(CANCEL_MSEC(1));
  }
}

/* How many lines hold every needle (NULL-ended). */
static inline int test_log_count(const char *first, ...) {
  struct test_log *l = test_log();
  int count = 0;
  pthread_mutex_lock(&l->mu);
  for (int i = 0; i < l->n; i++) {
    if (strstr(l->lines[i], first) == NULL)
      continue;
    va_list ap;
    va_start(ap, first);
    count += test_log_line_has(l->lines[i], ap);
    va_end(ap);
  }
  pthread_mutex_unlock(&l->mu);
  return count;
}

/* Whether a line of that level was logged. */
static inline bool test_log_has_level(int level) {
  struct test_log *l = test_log();
  char prefix[16];
  int n = snprintf(prefix, sizeof prefix, "%d ", level);
  bool found = false;
  pthread_mutex_lock(&l->mu);
  for (int i = 0; i < l->n && !found; i++)
    found = strncmp(l->lines[i], prefix, (size_t)n) == 0;
  pthread_mutex_unlock(&l->mu);
  return found;
}

/* ---- Children ------------------------------------------------------- */

/* In a forked child, first: cmocka's handlers for the crash signals would
 * resume the copy of the test runner in the child; a crash must end the
 * child, for the parent to see. */
static inline void test_child_enter(void) {
  static const int sigs[] = {SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGABRT, SIGSYS};
  for (size_t i = 0; i < sizeof sigs / sizeof sigs[0]; i++)
    signal(sigs[i], SIG_DFL);
}

/* Runs fn in a forked child (no cmocka there: its exit status is the
 * result) and returns that status, or -1 if it did not end within
 * timeout_ns (it is killed).  100 + N: it died of signal N. */
static inline int test_in_child(int (*fn)(void), int64_t timeout_ns) {
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0)
    _exit(fn());
  int64_t end = cancel_now() + timeout_ns;
  int status = 0;
  for (;;) {
    pid_t r = waitpid(pid, &status, WNOHANG);
    if (r == pid)
      break;
    if (cancel_now() > end) {
      kill(pid, SIGKILL);
      waitpid(pid, &status, 0);
      return -1;
    }
    test_sleep_ns(CANCEL_MSEC(1));
  }
  return WIFEXITED(status) ? WEXITSTATUS(status) : 100 + WTERMSIG(status);
}

/* ---- ThreadSanitizer --------------------------------------------------- */

#if defined(__SANITIZE_THREAD__)
#define TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_TSAN 1
#endif
#endif

/* TSan cannot follow threads in the child of a multi-threaded fork():
 * a test that needs them skips there, saying so. */
#ifdef TEST_TSAN
#define TEST_SKIP_UNDER_TSAN()                                                 \
  do {                                                                         \
    print_message("skipped under ThreadSanitizer (no threads in the child "    \
                  "of a multi-threaded fork)\n");                              \
    skip();                                                                    \
  } while (0)
#else
#define TEST_SKIP_UNDER_TSAN() ((void)0)
#endif

#endif /* CANCEL_TEST_UTIL_H */
