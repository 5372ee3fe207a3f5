/*
 * cancel_cond_wait (src/cond.c): woken, cancelled, timed out, always with
 * the mutex held again; the lost-wake-up window; a canceller that holds
 * the mutex; a storm of signals (EINTR never ends it).
 */
#include "test_util.h"

#include <limits.h>

/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)
#define AT_ONCE CANCEL_MSEC(20)

/* ======================================================================
 * Condition variables
 * ====================================================================== */

/* A condition, its mutex and a predicate.  Heap-allocated by the tests
 * that leave threads behind on failure (the memory must outlive them). */
struct cv {
  pthread_mutex_t m;
  pthread_cond_t c;
  int flag; /* the predicate, under m */
};

static void cv_init(struct cv *cv, int mutex_type, bool monotonic) {
  pthread_mutexattr_t ma;
  pthread_mutexattr_init(&ma);
  pthread_mutexattr_settype(&ma, mutex_type);
  assert_int_equal(pthread_mutex_init(&cv->m, &ma), 0);
  pthread_mutexattr_destroy(&ma);
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  if (monotonic)
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  assert_int_equal(pthread_cond_init(&cv->c, &ca), 0);
  pthread_condattr_destroy(&ca);
  cv->flag = 0;
}

static void cv_destroy(struct cv *cv) {
  pthread_cond_destroy(&cv->c);
  pthread_mutex_destroy(&cv->m);
}

static void cv_signal(struct cv *cv, bool broadcast) {
  pthread_mutex_lock(&cv->m);
  cv->flag = 1;
  if (broadcast)
    pthread_cond_broadcast(&cv->c);
  else
    pthread_cond_signal(&cv->c);
  pthread_mutex_unlock(&cv->m);
}

/* One waiter: waits for the predicate, returns the first non-zero result
 * (or 0 when the predicate came true).  With an error-checking mutex,
 * `held` is what unlocking it afterwards returned: 0 proves the wait
 * returned with the mutex locked by this thread. */
struct cw {
  struct cv *cv;
  const cancel_token *tok;
  int64_t deadline;
  int zeros; /* 0 returns without the predicate (spurious) */
  int held;
};

static int64_t do_cond_wait(void *arg) {
  struct cw *w = arg;
  int r = 0;
  pthread_mutex_lock(&w->cv->m);
  while (!w->cv->flag) {
    r = cancel_cond_wait(w->tok, &w->cv->c, &w->cv->m, w->deadline);
    if (r != 0)
      break;
    w->zeros++;
  }
  w->held = pthread_mutex_unlock(&w->cv->m);
  return r;
}

static void test_cond_signalled(void **state) {
  (void)state;
  /* Live token and NULL token; signal and broadcast; both clocks. */
  for (int k = 0; k < 4; k++) {
    struct cv cv;
    cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, k & 2);
    cancel_source *s = new_src("cond");
    struct cw cw = {&cv, k & 1 ? NULL : TOK(s), CANCEL_NEVER, 0, -1};
    struct test_waiter w;
    test_waiter_block(&w, do_cond_wait, &cw);
    int64_t t0 = cancel_now();
    cv_signal(&cv, k & 1);
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w.result, 0);
    assert_int_equal(cw.held, 0);
    assert_i64_lt(w.t_end - t0, test_tol(LATE));
    assert_false(cancel_token_is_cancelled(TOK(s)));
    cancel_source_unref(s);
    cv_destroy(&cv);
  }
}

static void test_cond_cancelled_by_timer(void **state) {
  (void)state;
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, false);
  cancel_source *s = new_src("timer");
  struct cw cw = {&cv, TOK(s), CANCEL_NEVER, 0, -1};
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  int r = (int)do_cond_wait(&cw);
  int64_t el = test_since(t0);
  assert_int_equal(r, -ECANCELED);
  assert_int_equal(cw.held, 0);
  assert_elapsed_within(el, CANCEL_MSEC(20), LATE);

  /* With a deadline further away than the cancel. */
  cancel_source_unref(s);
  s = new_src("timer2");
  cw.tok = TOK(s);
  cw.deadline = cancel_now() + CANCEL_SEC(10);
  t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  r = (int)do_cond_wait(&cw);
  el = test_since(t0);
  assert_int_equal(r, -ECANCELED);
  assert_int_equal(cw.held, 0);
  assert_elapsed_within(el, CANCEL_MSEC(20), LATE);
  cancel_source_unref(s);
  cv_destroy(&cv);
}

static void test_cond_cancelled_from_thread(void **state) {
  (void)state;
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, false);
  cancel_source *s = new_src("thread");
  struct cw cw = {&cv, TOK(s), CANCEL_NEVER, 0, -1};
  struct test_waiter w;
  test_waiter_block(&w, do_cond_wait, &cw);
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(s), 1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_int_equal(cw.held, 0);
  assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
  cancel_source_unref(s);

  /* Through a link: the parent's cancel reaches the waiter on the child. */
  cancel_source *parent = new_src("parent");
  const cancel_token *ptok = TOK(parent);
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", &ptok, 1), 0);
  cw.tok = TOK(child);
  test_waiter_block(&w, do_cond_wait, &cw);
  t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(parent), 1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_int_equal(cw.held, 0);
  assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
  cancel_source_unref(child);
  cancel_source_unref(parent);
  cv_destroy(&cv);
}

static void test_cond_cancelled_before(void **state) {
  (void)state;
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, false);
  cancel_source *s = new_src("before");
  assert_int_equal(cancel_source_cancel(s), 1);
  int64_t t0 = cancel_now();
  const int64_t deadlines[] = {CANCEL_NEVER, 0, INT64_MIN};
  for (size_t i = 0; i < 3; i++) {
    int64_t d = i == 1 ? cancel_now() - 1 : deadlines[i];
    pthread_mutex_lock(&cv.m);
    assert_int_equal(cancel_cond_wait(TOK(s), &cv.c, &cv.m, d), -ECANCELED);
    assert_int_equal(pthread_mutex_unlock(&cv.m), 0);
  }
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  cancel_source_unref(s);
  cv_destroy(&cv);
}

/* The deadline on a condition of either clock: the C library's
 * pthread_cond_clockwait, or where there is none (musl) the fallback that
 * finds the condition's clock (cancel.h: Platform). */
static void run_cond_deadline(bool monotonic) {
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, monotonic);
  cancel_source *s = new_src("deadline");
  for (int k = 0; k < 2; k++) {
    struct cw cw = {&cv, k ? NULL : TOK(s), cancel_now() + CANCEL_MSEC(30), 0,
                    -1};
    int r = (int)do_cond_wait(&cw);
    int64_t now = cancel_now();
    assert_int_equal(r, -ETIMEDOUT);
    assert_int_equal(cw.held, 0);
    assert_i64_ge(now, cw.deadline);
    assert_i64_lt(now, cw.deadline + test_tol(LATE));
  }
  /* A deadline already passed: -ETIMEDOUT at once, mutex held. */
  int64_t t0 = cancel_now();
  const int64_t past[] = {0, INT64_MIN, 1};
  for (size_t i = 0; i < 3; i++) {
    int64_t d = i == 0 ? cancel_now() - 1 : past[i];
    struct cw cw = {&cv, TOK(s), d, 0, -1};
    assert_int_equal(do_cond_wait(&cw), -ETIMEDOUT);
    assert_int_equal(cw.held, 0);
  }
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
  cv_destroy(&cv);
}

static void test_cond_deadline(void **state) {
  (void)state;
  run_cond_deadline(false);
}

static void test_cond_deadline_monotonic(void **state) {
  (void)state;
  run_cond_deadline(true);
}

static void test_cond_far_deadline(void **state) {
  (void)state;
  for (int monotonic = 0; monotonic < 2; monotonic++) {
    struct cv cv;
    cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, monotonic);
    const int64_t far[] = {CANCEL_NEVER - 1, INT64_MAX / 2,
                           cancel_now() + (CANCEL_SEC(1) << 30)};
    for (size_t i = 0; i < 3; i++) {
      cancel_source *s = new_src("far");
      struct cw cw = {&cv, TOK(s), far[i], 0, -1};
      int64_t t0 = cancel_now();
      assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
      assert_int_equal(do_cond_wait(&cw), -ECANCELED);
      assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
      assert_int_equal(cw.held, 0);
      cancel_source_unref(s);
    }
    cv_destroy(&cv);
  }
}

/* Waiters on one condition with different tokens: cancelling one token ends
 * that wait only; the others go on waiting and are then signalled. */
static void test_cond_cancel_is_per_token(void **state) {
  (void)state;
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, false);
  cancel_source *a = new_src("a"), *b = new_src("b");
  struct cw ca = {&cv, TOK(a), CANCEL_NEVER, 0, -1};
  struct cw cb = {&cv, TOK(b), CANCEL_NEVER, 0, -1};
  struct cw cn = {&cv, NULL, CANCEL_NEVER, 0, -1};
  struct test_waiter wa, wb, wn;
  test_waiter_start(&wa, do_cond_wait, &ca);
  test_waiter_start(&wb, do_cond_wait, &cb);
  test_waiter_start(&wn, do_cond_wait, &cn);
  test_waiter_blocked(&wa);
  test_waiter_blocked(&wb);
  test_waiter_blocked(&wn);
  assert_int_equal(cancel_source_cancel(a), 1);
  test_waiter_end(&wa, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(wa.result, -ECANCELED);
  assert_int_equal(ca.held, 0);
  /* The others may have seen a spurious 0 (a broadcast) but wait on. */
  test_sleep_ns(CANCEL_MSEC(20));
  assert_int_not_equal(sem_trywait(wb.finished), 0);
  assert_int_not_equal(sem_trywait(wn.finished), 0);
  cv_signal(&cv, true);
  test_waiter_end(&wb, test_tol(CANCEL_SEC(2)), NULL, NULL);
  test_waiter_end(&wn, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(wb.result, 0);
  assert_i64_eq(wn.result, 0);
  assert_int_equal(cb.held, 0);
  assert_int_equal(cn.held, 0);
  cancel_source_unref(a);
  cancel_source_unref(b);
  cv_destroy(&cv);
}

enum { COND_SHARERS = 6 };

static void test_cond_shared_token_wakes_all(void **state) {
  (void)state;
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, false);
  cancel_source *s = new_src("shared");
  struct cw cw[COND_SHARERS];
  struct test_waiter w[COND_SHARERS];
  for (int i = 0; i < COND_SHARERS; i++) {
    cw[i] = (struct cw){&cv, TOK(s), CANCEL_NEVER, 0, -1};
    test_waiter_start(&w[i], do_cond_wait, &cw[i]);
  }
  for (int i = 0; i < COND_SHARERS; i++)
    test_waiter_blocked(&w[i]);
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(s), 1);
  for (int i = 0; i < COND_SHARERS; i++) {
    test_waiter_end(&w[i], test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w[i].result, -ECANCELED);
    assert_int_equal(cw[i].held, 0);
    assert_i64_lt(w[i].t_end - t_cancel, test_tol(LATE));
  }
  cancel_source_unref(s);
  cv_destroy(&cv);
}

/* ---- A canceller that holds the mutex --------------------------------- */

struct holder {
  struct cv *cv;
  cancel_source *src;
  sem_t done;
  int rc;
};

static void *cancel_holding_mutex(void *arg) {
  struct holder *h = arg;
  pthread_mutex_lock(&h->cv->m);
  h->rc = cancel_source_cancel(h->src);
  pthread_mutex_unlock(&h->cv->m);
  sem_post(&h->done);
  return NULL;
}

static void test_cond_canceller_holds_mutex(void **state) {
  (void)state;
  const int types[] = {PTHREAD_MUTEX_NORMAL, PTHREAD_MUTEX_ERRORCHECK,
                       PTHREAD_MUTEX_RECURSIVE, PTHREAD_MUTEX_DEFAULT};
  for (size_t k = 0; k < sizeof types / sizeof types[0]; k++) {
    /* On the heap: a deadlocked canceller keeps it (the test fails). */
    struct cv *cv = calloc(1, sizeof *cv);
    struct holder *h = calloc(1, sizeof *h);
    struct cw *cw = calloc(1, sizeof *cw);
    assert_non_null(cv);
    assert_non_null(h);
    assert_non_null(cw);
    cv_init(cv, types[k], false);
    h->cv = cv;
    h->src = new_src("holder");
    sem_init(&h->done, 0, 0);
    *cw = (struct cw){cv, TOK(h->src), CANCEL_NEVER, 0, -1};
    struct test_waiter w;
    test_waiter_block(&w, do_cond_wait, cw);
    pthread_t t = test_thread_start(cancel_holding_mutex, h);
    if (test_sem_wait_ns(&h->done, test_tol(CANCEL_SEC(2))) != 0) {
      print_error("mutex type %d: the canceller holding the mutex "
                  "deadlocked in cancel\n",
                  types[k]);
      fail();
    }
    test_thread_join(t);
    assert_int_equal(h->rc, 1);
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w.result, -ECANCELED);
    if (types[k] == PTHREAD_MUTEX_ERRORCHECK)
      assert_int_equal(cw->held, 0);

    /* The canceller is the thread that then waits: it cancels while it
     * holds the mutex (nobody waits yet), then waits: -ECANCELED at once. */
    cancel_source_unref(h->src);
    h->src = new_src("holder2");
    pthread_mutex_lock(&cv->m);
    assert_int_equal(cancel_source_cancel(h->src), 1);
    assert_int_equal(
        cancel_cond_wait(TOK(h->src), &cv->c, &cv->m, CANCEL_NEVER),
        -ECANCELED);
    pthread_mutex_unlock(&cv->m);

    cancel_source_unref(h->src);
    sem_destroy(&h->done);
    cv_destroy(cv);
    free(cv);
    free(h);
    free(cw);
  }
}

/* ---- The lost-wake-up window ------------------------------------------ *
 * A waiter thread enters cancel_cond_wait round after round while the main
 * thread cancels at a random moment near its entry (before the token
 * check, between the check and the wait, inside the wait).  Every round's
 * waiter must come back with -ECANCELED (a lost wake-up leaves it blocked
 * for ever: bounded here by a tolerance, then rescued by a broadcast). */

struct race {
  struct cv cv;
  sem_t go, done;
  cancel_source *src; /* this round's */
  int result;
  int held;
  int quit;
};

static void *race_waiter(void *arg) {
  struct race *rc = arg;
  for (;;) {
    while (sem_wait(&rc->go) != 0) {
    }
    if (__atomic_load_n(&rc->quit, __ATOMIC_ACQUIRE))
      return NULL;
    struct cw cw = {&rc->cv, TOK(rc->src), CANCEL_NEVER, 0, -1};
    rc->result = (int)do_cond_wait(&cw);
    rc->held = cw.held;
    sem_post(&rc->done);
  }
}

/* The waiter's stop (a failed round's teardown): quit at the next go. */
static void stop_race_waiter(void *arg) {
  struct race *rc = arg;
  __atomic_store_n(&rc->quit, 1, __ATOMIC_RELEASE);
  sem_post(&rc->go);
}

static void race_rescue(struct race *rc) {
  /* A waiter that missed its wake-up: a broadcast makes it look at the
   * (cancelled) token again. */
  pthread_mutex_lock(&rc->cv.m);
  pthread_cond_broadcast(&rc->cv.c);
  pthread_mutex_unlock(&rc->cv.m);
}

static unsigned rnd(unsigned *seed) {
  *seed = *seed * 1103515245u + 12345u;
  return (*seed >> 16) & 0x7fff;
}

static void spin(unsigned n) {
  for (volatile unsigned i = 0; i < n; i++) {
  }
}

static void run_cond_race(bool holding) {
  struct race *rc = calloc(1, sizeof *rc);
  assert_non_null(rc);
  cv_init(&rc->cv, PTHREAD_MUTEX_ERRORCHECK, false);
  sem_init(&rc->go, 0, 0);
  sem_init(&rc->done, 0, 0);
  /* rc is the heap's and stays there if the test fails: the teardown stops
   * the waiter, which then still reads it. */
  pthread_t t = test_helper_start(race_waiter, rc, stop_race_waiter);
  unsigned seed = 12345u + (holding ? 7u : 0u);
  int rounds = (int)(3000 * test_stress_scale());
  int64_t budget_end = cancel_now() + CANCEL_SEC(8);
  int done_rounds = 0;
  for (int i = 0; i < rounds; i++) {
    rc->src = new_src("race");
    sem_post(&rc->go);
    unsigned r = rnd(&seed);
    if (r % 4 == 0)
      sched_yield();
    else
      spin(r); /* 0 to ~30 us: before, at and after its entry */
    if (holding)
      pthread_mutex_lock(&rc->cv.m);
    int c = cancel_source_cancel(rc->src);
    if (holding)
      pthread_mutex_unlock(&rc->cv.m);
    assert_int_equal(c, 1);
    if (test_sem_wait_ns(&rc->done, test_tol(CANCEL_SEC(1))) != 0) {
      print_error("round %d: waiter still blocked after the cancel "
                  "(lost wake-up)\n",
                  i);
      race_rescue(rc);
      if (test_sem_wait_ns(&rc->done, CANCEL_SEC(5)) != 0)
        test_give_up("the cond waiter is blocked even after a broadcast");
      fail();
    }
    assert_int_equal(rc->result, -ECANCELED);
    assert_int_equal(rc->held, 0);
    cancel_source_unref(rc->src);
    done_rounds++;
    if (done_rounds >= 100 && cancel_now() > budget_end)
      break;
  }
  stop_race_waiter(rc);
  test_helper_join(t);
  sem_destroy(&rc->go);
  sem_destroy(&rc->done);
  cv_destroy(&rc->cv);
  free(rc);
}

static void test_cond_lost_wakeup_race(void **state) {
  (void)state;
  run_cond_race(false);
}

static void test_cond_lost_wakeup_race_holding(void **state) {
  (void)state;
  run_cond_race(true);
}

/* ---- Signals ---------------------------------------------------------- */

struct later {
  int64_t delay;
  struct cv *cv;
};

static void *signal_later(void *arg) {
  struct later *l = arg;
  test_sleep_ns(l->delay);
  cv_signal(l->cv, false);
  return NULL;
}

/* How long a wait lasts under a signal storm: long enough, on a slow or
 * loaded machine too (the time scale), for the storm's thread to land a
 * few signals in it. */
static int64_t storm_window(void) {
  return test_tol(CANCEL_MSEC(40));
}

static void test_cond_survives_signals(void **state) {
  (void)state;
  struct test_sigstorm storm;
  struct cv cv;
  cv_init(&cv, PTHREAD_MUTEX_ERRORCHECK, false);
  cancel_source *s = new_src("storm");

  /* Signalled after 40 ms of storm: 0, predicate true. */
  struct later l = {storm_window(), &cv};
  struct cw cw = {&cv, TOK(s), CANCEL_NEVER, 0, -1};
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  int64_t t0 = cancel_now();
  pthread_t t = test_thread_start(signal_later, &l);
  int r = (int)do_cond_wait(&cw);
  int64_t el = test_since(t0);
  long hits = test_sigstorm_stop(&storm);
  test_thread_join(t);
  assert_int_equal(r, 0);
  assert_int_equal(cw.held, 0);
  assert_i64_ge(el, storm_window());
  assert_true(hits >= 2);
  cv.flag = 0;

  /* Cancelled after 40 ms. */
  cancel_source *c = new_src("storm-cancel");
  cw = (struct cw){&cv, TOK(c), CANCEL_NEVER, 0, -1};
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(c, storm_window()), 0);
  r = (int)do_cond_wait(&cw);
  el = test_since(t0);
  hits = test_sigstorm_stop(&storm);
  assert_int_equal(r, -ECANCELED);
  assert_int_equal(cw.held, 0);
  assert_elapsed_within(el, storm_window(), LATE);
  assert_true(hits >= 2);
  cancel_source_unref(c);

  /* Deadline after 40 ms; live token and NULL token. */
  for (int k = 0; k < 2; k++) {
    cw = (struct cw){&cv, k ? NULL : TOK(s), cancel_now() + storm_window(), 0,
                     -1};
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    r = (int)do_cond_wait(&cw);
    int64_t now = cancel_now();
    hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, -ETIMEDOUT);
    assert_int_equal(cw.held, 0);
    assert_i64_ge(now, cw.deadline);
    assert_i64_lt(now, cw.deadline + test_tol(LATE));
    assert_true(hits >= 2);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
  cv_destroy(&cv);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_cond_signalled),
      cmocka_unit_test(test_cond_cancelled_by_timer),
      cmocka_unit_test(test_cond_cancelled_from_thread),
      cmocka_unit_test(test_cond_cancelled_before),
      cmocka_unit_test(test_cond_deadline),
      cmocka_unit_test(test_cond_deadline_monotonic),
      cmocka_unit_test(test_cond_far_deadline),
      cmocka_unit_test(test_cond_cancel_is_per_token),
      cmocka_unit_test(test_cond_shared_token_wakes_all),
      cmocka_unit_test(test_cond_canceller_holds_mutex),
      cmocka_unit_test(test_cond_lost_wakeup_race),
      cmocka_unit_test(test_cond_lost_wakeup_race_holding),
      cmocka_unit_test(test_cond_survives_signals),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
