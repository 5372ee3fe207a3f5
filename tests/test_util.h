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
#include <time.h>

#include <setjmp.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include <cmocka.h>

#include "cancel.h"

/* ---- Time scale ------------------------------------------------------- */

/* CANCEL_TEST_TIME_SCALE from the environment, default 1.0.  Values that do
 * not parse as a positive number are ignored. */
static inline double test_time_scale(void) {
  static double scale; /* 0 until read; benign if two threads race here */
  if (scale == 0.0) {
    double s = 1.0;
    const char *env = getenv("CANCEL_TEST_TIME_SCALE");
    if (env != NULL && *env != '\0') {
      char *end = NULL;
      double v = strtod(env, &end);
      if (end != env && v > 0.0)
        s = v;
    }
    scale = s;
  }
  return scale;
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
      print_error("%s:%d: expected %s %s %s, got %" PRId64 " vs %" PRId64     \
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

#endif /* CANCEL_TEST_UTIL_H */
