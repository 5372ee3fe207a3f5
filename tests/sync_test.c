/*
 * Synchronisation waits: cancel_cond_wait (woken, cancelled, timed out,
 * always with the mutex held again; the lost-wake-up window; a canceller
 * that holds the mutex), cancel_sem_* (counts exact under concurrency,
 * cancelled and timed-out waits take nothing) and cancel_thread_create /
 * cancel_thread_join (joinable again after a cancelled or timed-out join).
 * Every wait also under a storm of signals (EINTR never ends it).
 */
#include "test_util.h"

#include <limits.h>

#define LATE CANCEL_MSEC(50)
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
    test_waiter_start(&w, do_cond_wait, &cw);
    assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
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
  test_waiter_start(&w, do_cond_wait, &cw);
  assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
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
  test_waiter_start(&w, do_cond_wait, &cw);
  assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
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
  assert_true(test_wait_blocked(wa.tid, CANCEL_SEC(5)));
  assert_true(test_wait_blocked(wb.tid, CANCEL_SEC(5)));
  assert_true(test_wait_blocked(wn.tid, CANCEL_SEC(5)));
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
    assert_true(test_wait_blocked(w[i].tid, CANCEL_SEC(5)));
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
    test_waiter_start(&w, do_cond_wait, cw);
    assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
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

/* ======================================================================
 * Semaphores
 * ====================================================================== */

static void test_sem_basic(void **state) {
  (void)state;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 2), 0);
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  assert_int_equal(cancel_sem_post(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  assert_int_equal(cancel_sem_init(&sem, 0), 0);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  for (int i = 0; i < 1000; i++)
    assert_int_equal(cancel_sem_post(&sem), 0);
  for (int i = 0; i < 1000; i++)
    assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
}

static void test_sem_invalid(void **state) {
  (void)state;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(NULL, 0), -EINVAL);
  assert_int_equal(cancel_sem_init(&sem, (unsigned)INT32_MAX + 1u), -EINVAL);
  assert_int_equal(cancel_sem_init(&sem, UINT_MAX), -EINVAL);
  assert_int_equal(cancel_sem_post(NULL), -EINVAL);
  assert_int_equal(cancel_sem_wait(NULL, NULL, CANCEL_NEVER), -EINVAL);

  /* The largest value: one more overflows and changes nothing. */
  assert_int_equal(cancel_sem_init(&sem, INT32_MAX), 0);
  assert_int_equal(cancel_sem_post(&sem), -EOVERFLOW);
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_post(&sem), 0);
  assert_int_equal(cancel_sem_post(&sem), -EOVERFLOW);
  assert_int_equal(cancel_sem_wait(NULL, &sem, CANCEL_NEVER), 0);
  assert_int_equal(cancel_sem_wait(NULL, &sem, CANCEL_NEVER), 0);
}

static void test_sem_ready_is_immediate(void **state) {
  (void)state;
  cancel_source *s = new_src("ready");
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 4), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, CANCEL_NEVER), 0);
  assert_int_equal(cancel_sem_wait(NULL, &sem, CANCEL_NEVER), 0);
  /* A deadline in the past is a poll: takes one if there is one. */
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, cancel_now() - 1), 0);
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, INT64_MIN), 0);
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, cancel_now() - 1), -ETIMEDOUT);
  assert_int_equal(cancel_sem_wait(NULL, &sem, 0), -ETIMEDOUT);
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, INT64_MIN), -ETIMEDOUT);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  cancel_source_unref(s);
}

struct sw {
  const cancel_token *tok;
  cancel_sem *sem;
  int64_t deadline;
};

static int64_t do_sem_wait(void *arg) {
  struct sw *w = arg;
  return cancel_sem_wait(w->tok, w->sem, w->deadline);
}

static void test_sem_posted_while_blocked(void **state) {
  (void)state;
  cancel_source *s = new_src("post");
  for (int k = 0; k < 2; k++) {
    cancel_sem sem;
    assert_int_equal(cancel_sem_init(&sem, 0), 0);
    struct sw sw = {k ? NULL : TOK(s), &sem,
                    k ? cancel_now() + CANCEL_SEC(30) : CANCEL_NEVER};
    struct test_waiter w;
    test_waiter_start(&w, do_sem_wait, &sw);
    assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sem_post(&sem), 0);
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w.result, 0);
    assert_i64_lt(w.t_end - t0, test_tol(LATE));
    assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  }
  cancel_source_unref(s);
}

static void test_sem_cancelled_while_blocked(void **state) {
  (void)state;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 0), 0);

  /* By the timer. */
  cancel_source *s = new_src("timer");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, CANCEL_NEVER), -ECANCELED);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
  cancel_source_unref(s);

  /* From another thread. */
  s = new_src("thread");
  struct sw sw = {TOK(s), &sem, cancel_now() + CANCEL_SEC(30)};
  struct test_waiter w;
  test_waiter_start(&w, do_sem_wait, &sw);
  assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(s), 1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
  cancel_source_unref(s);

  /* The cancelled waits took nothing: a post is still there to take. */
  assert_int_equal(cancel_sem_post(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
}

static void test_sem_cancelled_before(void **state) {
  (void)state;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 1), 0);
  cancel_source *s = new_src("before");
  assert_int_equal(cancel_source_cancel(s), 1);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, CANCEL_NEVER), -ECANCELED);
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, cancel_now() - 1), -ECANCELED);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  /* The count was not taken. */
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_wait(TOK(s), &sem, CANCEL_NEVER), -ECANCELED);
  cancel_source_unref(s);
}

static void test_sem_deadline(void **state) {
  (void)state;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 0), 0);
  cancel_source *s = new_src("deadline");
  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + CANCEL_MSEC(30);
    assert_int_equal(cancel_sem_wait(k ? NULL : TOK(s), &sem, d), -ETIMEDOUT);
    int64_t now = cancel_now();
    assert_i64_ge(now, d);
    assert_i64_lt(now, d + test_tol(LATE));
  }
  /* Far deadlines stay far: cancelled after 20 ms. */
  const int64_t far[] = {CANCEL_NEVER - 1, INT64_MAX / 2};
  for (size_t i = 0; i < 2; i++) {
    cancel_source *c = new_src("far");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(c, CANCEL_MSEC(20)), 0);
    assert_int_equal(cancel_sem_wait(TOK(c), &sem, far[i]), -ECANCELED);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
    cancel_source_unref(c);
  }
  assert_int_equal(cancel_sem_post(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), 0);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  cancel_source_unref(s);
}

/* Two waiters, one post: exactly one takes it, the other waits on. */
static void test_sem_post_wakes_one(void **state) {
  (void)state;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 0), 0);
  cancel_source *a = new_src("a"), *b = new_src("b");
  struct sw sa = {TOK(a), &sem, CANCEL_NEVER},
            sb = {TOK(b), &sem, CANCEL_NEVER};
  struct test_waiter wa, wb;
  test_waiter_start(&wa, do_sem_wait, &sa);
  test_waiter_start(&wb, do_sem_wait, &sb);
  assert_true(test_wait_blocked(wa.tid, CANCEL_SEC(5)));
  assert_true(test_wait_blocked(wb.tid, CANCEL_SEC(5)));
  assert_int_equal(cancel_sem_post(&sem), 0);
  /* Whichever took it returns 0 soon. */
  int64_t end = cancel_now() + test_tol(CANCEL_SEC(2));
  int first = -1;
  while (first < 0 && cancel_now() < end) {
    if (sem_trywait(wa.finished) == 0)
      first = 0;
    else if (sem_trywait(wb.finished) == 0)
      first = 1;
    else
      test_sleep_ns(CANCEL_USEC(200));
  }
  assert_true(first >= 0);
  struct test_waiter *winner = first == 0 ? &wa : &wb;
  struct test_waiter *other = first == 0 ? &wb : &wa;
  sem_post(winner->finished); /* put back for test_waiter_end */
  test_waiter_end(winner, CANCEL_SEC(1), NULL, NULL);
  assert_i64_eq(winner->result, 0);
  test_sleep_ns(CANCEL_MSEC(20));
  assert_int_not_equal(sem_trywait(other->finished), 0);
  assert_int_equal(cancel_source_cancel(first == 0 ? b : a), 1);
  test_waiter_end(other, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(other->result, -ECANCELED);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

/* ---- Exact counts under concurrency ----------------------------------- *
 * Producers post N in total; consumers (each on its own token, some with
 * short deadlines that keep timing out) take until they are cancelled at
 * random moments, some while the producers still run.  Every post is taken
 * exactly once: by a consumer's successful wait, or left for the final
 * drain.  A cancelled or timed-out wait that took a count, or a success
 * that took none, breaks the sum. */

enum { PRODUCERS = 3, CONSUMERS = 5, PER_PRODUCER = 3000 };

struct pc {
  cancel_sem sem;
  cancel_source *src[CONSUMERS];
  long taken[CONSUMERS];
  long timeouts[CONSUMERS];
  int last[CONSUMERS];
  int post_errors;
};

struct pc_arg {
  struct pc *pc;
  int id;
};

static void *producer(void *arg) {
  struct pc *pc = ((struct pc_arg *)arg)->pc;
  for (int i = 0; i < PER_PRODUCER; i++) {
    /* No cmocka assert off the main thread: count the failure. */
    if (cancel_sem_post(&pc->sem) != 0)
      __atomic_add_fetch(&pc->post_errors, 1, __ATOMIC_RELAXED);
    if (i % 64 == 0)
      sched_yield();
  }
  return NULL;
}

static void *consumer(void *arg) {
  struct pc_arg *a = arg;
  struct pc *pc = a->pc;
  int id = a->id;
  const cancel_token *tok = TOK(pc->src[id]);
  bool timed = id % 2 == 1;
  for (;;) {
    int64_t d = timed ? cancel_now() + CANCEL_USEC(300) : CANCEL_NEVER;
    int r = cancel_sem_wait(tok, &pc->sem, d);
    if (r == 0) {
      pc->taken[id]++;
    } else if (r == -ETIMEDOUT && timed) {
      pc->timeouts[id]++;
    } else {
      pc->last[id] = r;
      return NULL;
    }
  }
}

/* A consumer's stop: cancel its token (a producer ends by itself). */
static void stop_consumer(void *arg) {
  struct pc_arg *a = arg;
  cancel_source_cancel(a->pc->src[a->id]);
}

static void test_sem_counts_exact(void **state) {
  (void)state;
  int rounds = (int)(6 * test_stress_scale());
  if (rounds < 1)
    rounds = 1;
  unsigned seed = 99;
  long total_taken = 0, total_timeouts = 0;
  for (int round = 0; round < rounds; round++) {
    struct pc *pc = calloc(1, sizeof *pc);
    assert_non_null(pc);
    assert_int_equal(cancel_sem_init(&pc->sem, 0), 0);
    /* pc is the heap's and stays there if the test fails, pa is shared:
     * a thread that cannot start fails the test, and the teardown cancels
     * the consumers and joins every thread. */
    struct pc_arg *pa = test_shared((PRODUCERS + CONSUMERS) * sizeof *pa);
    pthread_t pt[PRODUCERS], ct[CONSUMERS];
    for (int i = 0; i < CONSUMERS; i++) {
      pc->src[i] = new_src("consumer");
      pa[PRODUCERS + i] = (struct pc_arg){pc, i};
      ct[i] = test_helper_start(consumer, &pa[PRODUCERS + i], stop_consumer);
    }
    for (int i = 0; i < PRODUCERS; i++) {
      pa[i] = (struct pc_arg){pc, i};
      pt[i] = test_helper_start(producer, &pa[i], test_no_stop);
    }
    /* Cancel some consumers while production runs. */
    int order[CONSUMERS];
    for (int i = 0; i < CONSUMERS; i++)
      order[i] = i;
    for (int i = CONSUMERS - 1; i > 0; i--) {
      int j = (int)(rnd(&seed) % (unsigned)(i + 1));
      int tmp = order[i];
      order[i] = order[j];
      order[j] = tmp;
    }
    int early = 1 + (int)(rnd(&seed) % (CONSUMERS - 1));
    for (int i = 0; i < early; i++) {
      test_sleep_ns(CANCEL_USEC(rnd(&seed) % 2000));
      assert_int_equal(cancel_source_cancel(pc->src[order[i]]), 1);
    }
    for (int i = 0; i < PRODUCERS; i++)
      test_helper_join(pt[i]);
    /* Let the rest take a while, then cancel them too. */
    test_sleep_ns(CANCEL_MSEC(2));
    for (int i = early; i < CONSUMERS; i++)
      assert_int_equal(cancel_source_cancel(pc->src[order[i]]), 1);
    for (int i = 0; i < CONSUMERS; i++)
      test_helper_join(ct[i]);
    test_shared_free(pa);

    assert_int_equal(pc->post_errors, 0);
    long taken = 0;
    for (int i = 0; i < CONSUMERS; i++) {
      assert_int_equal(pc->last[i], -ECANCELED);
      taken += pc->taken[i];
      total_timeouts += pc->timeouts[i];
      cancel_source_unref(pc->src[i]);
    }
    long left = 0;
    while (cancel_sem_trywait(&pc->sem) == 0)
      left++;
    assert_int_equal(taken + left, (long)PRODUCERS * PER_PRODUCER);
    total_taken += taken;
    free(pc);
  }
  assert_true(total_taken > 0);
  print_message("      sem counts: %ld taken by waits over %d rounds, "
                "%ld timed-out waits\n",
                total_taken, rounds, total_timeouts);
}

static void *post_later(void *arg) {
  struct sw *w = arg;
  test_sleep_ns(storm_window());
  cancel_sem_post(w->sem);
  return NULL;
}

static void test_sem_survives_signals(void **state) {
  (void)state;
  struct test_sigstorm storm;
  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 0), 0);
  cancel_source *s = new_src("storm");

  /* Posted after 40 ms. */
  struct sw sw = {TOK(s), &sem, CANCEL_NEVER};
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  int64_t t0 = cancel_now();
  pthread_t t = test_thread_start(post_later, &sw);
  int r = cancel_sem_wait(TOK(s), &sem, CANCEL_NEVER);
  int64_t el = test_since(t0);
  long hits = test_sigstorm_stop(&storm);
  test_thread_join(t);
  assert_int_equal(r, 0);
  assert_i64_ge(el, storm_window());
  assert_true(hits >= 2);
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);

  /* Cancelled after 40 ms. */
  cancel_source *c = new_src("storm-cancel");
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(c, storm_window()), 0);
  r = cancel_sem_wait(TOK(c), &sem, CANCEL_NEVER);
  el = test_since(t0);
  hits = test_sigstorm_stop(&storm);
  assert_int_equal(r, -ECANCELED);
  assert_elapsed_within(el, storm_window(), LATE);
  assert_true(hits >= 2);
  cancel_source_unref(c);

  /* Deadline after 40 ms, live and NULL token. */
  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + storm_window();
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    r = cancel_sem_wait(k ? NULL : TOK(s), &sem, d);
    int64_t now = cancel_now();
    hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, -ETIMEDOUT);
    assert_i64_ge(now, d);
    assert_i64_lt(now, d + test_tol(LATE));
    assert_true(hits >= 2);
  }
  assert_int_equal(cancel_sem_trywait(&sem), -EAGAIN);
  cancel_source_unref(s);
}

/* ======================================================================
 * Threads
 * ====================================================================== */

/* The thread's body: posts `started`, waits for `release` (a plain POSIX
 * semaphore, so that only the test decides when it ends), returns `ret`. */
struct body {
  sem_t started, release;
  void *ret;
  bool wait_release;
  int ran;
  cancel_thread t; /* the thread that runs it */
};

static void *body_main(void *arg) {
  struct body *b = arg;
  __atomic_store_n(&b->ran, 1, __ATOMIC_RELEASE);
  sem_post(&b->started);
  if (b->wait_release)
    while (sem_wait(&b->release) != 0) {
    }
  return b->ret;
}

static void body_init(struct body *b, bool wait_release, void *ret) {
  memset(b, 0, sizeof *b);
  sem_init(&b->started, 0, 0);
  sem_init(&b->release, 0, 0);
  b->wait_release = wait_release;
  b->ret = ret;
}

/* A body on the heap, with its cancel_thread, freed by body_destroy(): a
 * test that fails leaves them (and the thread that waits on the release,
 * or has not even read its start routine yet) behind, never in a dead
 * frame. */
static struct body *body_alloc(void) {
  struct body *b = calloc(1, sizeof *b);
  assert_non_null(b);
  return b;
}

static void body_destroy(struct body *b) {
  sem_destroy(&b->started);
  sem_destroy(&b->release);
  free(b);
}

static void test_thread_join_after_finish(void **state) {
  (void)state;
  cancel_source *s = new_src("join");
  for (int k = 0; k < 3; k++) {
    struct body *b = body_alloc();
    body_init(b, false, (void *)(uintptr_t)(0x1234 + k));
    assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
    while (sem_wait(&b->started) != 0) {
    }
    void *ret = NULL;
    if (k == 0) {
      assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER),
                       0);
      assert_ptr_equal(ret, (void *)(uintptr_t)0x1234);
    } else if (k == 1) {
      assert_int_equal(cancel_thread_join(NULL, &b->t, &ret, CANCEL_NEVER), 0);
      assert_ptr_equal(ret, (void *)(uintptr_t)0x1235);
    } else {
      /* ret may be NULL, as for pthread_join. */
      assert_int_equal(cancel_thread_join(TOK(s), &b->t, NULL, CANCEL_NEVER),
                       0);
    }
    body_destroy(b);
  }

  /* With attributes (a small stack). */
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 * 1024);
  struct body *b = body_alloc();
  body_init(b, false, b);
  assert_int_equal(cancel_thread_create(&b->t, &attr, body_main, b), 0);
  pthread_attr_destroy(&attr);
  void *ret = NULL;
  assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER), 0);
  assert_ptr_equal(ret, b);
  body_destroy(b);
  cancel_source_unref(s);
}

/* A finished thread, joined with a deadline already passed: a poll that
 * joins it (after its function returned, the end is marked very soon). */
static void test_thread_join_poll(void **state) {
  (void)state;
  struct body *b = body_alloc();
  body_init(b, true, (void *)(uintptr_t)77);
  assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
  while (sem_wait(&b->started) != 0) {
  }
  void *ret = NULL;
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_thread_join(NULL, &b->t, &ret, cancel_now() - 1),
                   -ETIMEDOUT);
  assert_int_equal(cancel_thread_join(NULL, &b->t, &ret, INT64_MIN),
                   -ETIMEDOUT);
  assert_int_equal(cancel_thread_join(NULL, &b->t, &ret, 0), -ETIMEDOUT);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  sem_post(&b->release);
  int64_t end = cancel_now() + test_tol(CANCEL_SEC(2));
  int r = cancel_thread_join(NULL, &b->t, &ret, cancel_now() - 1);
  while (r == -ETIMEDOUT && cancel_now() < end) {
    test_sleep_ns(CANCEL_USEC(200));
    r = cancel_thread_join(NULL, &b->t, &ret, cancel_now() - 1);
  }
  assert_int_equal(r, 0);
  assert_ptr_equal(ret, (void *)(uintptr_t)77);
  body_destroy(b);
}

struct jw {
  const cancel_token *tok;
  cancel_thread *t;
  int64_t deadline;
  void *ret;
};

static int64_t do_join(void *arg) {
  struct jw *j = arg;
  return cancel_thread_join(j->tok, j->t, &j->ret, j->deadline);
}

static void test_thread_join_cancelled_then_joinable(void **state) {
  (void)state;
  for (int k = 0; k < 2; k++) {
    struct body *b = body_alloc();
    body_init(b, true, (void *)(uintptr_t)(99 + k));
    assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
    while (sem_wait(&b->started) != 0) {
    }
    cancel_source *s = new_src("join-cancel");
    void *ret = (void *)1;
    if (k == 0) {
      /* By the timer, on this thread. */
      int64_t t0 = cancel_now();
      assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
      assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER),
                       -ECANCELED);
      assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
    } else {
      /* From another thread, the joiner on a thread of its own. */
      struct jw j = {TOK(s), &b->t, cancel_now() + CANCEL_SEC(30), (void *)1};
      struct test_waiter w;
      test_waiter_start(&w, do_join, &j);
      assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
      int64_t t_cancel = cancel_now();
      assert_int_equal(cancel_source_cancel(s), 1);
      test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
      assert_i64_eq(w.result, -ECANCELED);
      assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
      ret = j.ret;
    }
    assert_ptr_equal(ret, (void *)1); /* untouched */
    /* Level-triggered: again -ECANCELED at once; the thread still runs. */
    assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER),
                     -ECANCELED);
    /* Still joinable. */
    sem_post(&b->release);
    assert_int_equal(cancel_thread_join(NULL, &b->t, &ret, CANCEL_NEVER), 0);
    assert_ptr_equal(ret, (void *)(uintptr_t)(99 + k));
    cancel_source_unref(s);
    body_destroy(b);
  }
}

static void test_thread_join_cancelled_before(void **state) {
  (void)state;
  cancel_source *s = new_src("before");
  assert_int_equal(cancel_source_cancel(s), 1);
  /* Running, and finished: -ECANCELED at once either way, not joined. */
  for (int k = 0; k < 2; k++) {
    struct body *b = body_alloc();
    body_init(b, k == 0, (void *)(uintptr_t)(5 + k));
    assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
    while (sem_wait(&b->started) != 0) {
    }
    if (k == 1)
      test_sleep_ns(CANCEL_MSEC(5)); /* let it end */
    void *ret = (void *)1;
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER),
                     -ECANCELED);
    assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, cancel_now() - 1),
                     -ECANCELED);
    assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
    assert_ptr_equal(ret, (void *)1);
    sem_post(&b->release);
    assert_int_equal(cancel_thread_join(NULL, &b->t, &ret, CANCEL_NEVER), 0);
    assert_ptr_equal(ret, (void *)(uintptr_t)(5 + k));
    body_destroy(b);
  }
  cancel_source_unref(s);
}

static void test_thread_join_deadline(void **state) {
  (void)state;
  struct body *b = body_alloc();
  body_init(b, true, (void *)(uintptr_t)11);
  assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
  cancel_source *s = new_src("deadline");
  void *ret = (void *)1;
  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + CANCEL_MSEC(30);
    assert_int_equal(cancel_thread_join(k ? NULL : TOK(s), &b->t, &ret, d),
                     -ETIMEDOUT);
    int64_t now = cancel_now();
    assert_i64_ge(now, d);
    assert_i64_lt(now, d + test_tol(LATE));
  }
  /* Far deadlines: still cancellable. */
  cancel_source *c = new_src("far");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(c, CANCEL_MSEC(20)), 0);
  assert_int_equal(cancel_thread_join(TOK(c), &b->t, &ret, CANCEL_NEVER - 1),
                   -ECANCELED);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
  cancel_source_unref(c);
  assert_ptr_equal(ret, (void *)1);
  sem_post(&b->release);
  assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER), 0);
  assert_ptr_equal(ret, (void *)(uintptr_t)11);
  cancel_source_unref(s);
  body_destroy(b);
}

static void test_thread_invalid(void **state) {
  (void)state;
  struct body *b = body_alloc();
  body_init(b, false, NULL);
  assert_int_equal(cancel_thread_create(NULL, NULL, body_main, b), -EINVAL);
  assert_int_equal(cancel_thread_create(&b->t, NULL, NULL, b), -EINVAL);
  assert_int_equal(cancel_thread_join(NULL, NULL, NULL, CANCEL_NEVER), -EINVAL);
  assert_int_equal(__atomic_load_n(&b->ran, __ATOMIC_ACQUIRE), 0);
  body_destroy(b);
}

static void *release_later(void *arg) {
  struct body *b = arg;
  test_sleep_ns(storm_window());
  sem_post(&b->release);
  return NULL;
}

static void test_thread_join_survives_signals(void **state) {
  (void)state;
  struct test_sigstorm storm;

  /* The thread ends after 40 ms of storm: 0. */
  struct body *b = body_alloc();
  body_init(b, true, (void *)(uintptr_t)3);
  assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
  cancel_source *s = new_src("storm");
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  int64_t t0 = cancel_now();
  pthread_t rel = test_thread_start(release_later, b);
  void *ret = NULL;
  int r = cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER);
  int64_t el = test_since(t0);
  long hits = test_sigstorm_stop(&storm);
  test_thread_join(rel);
  assert_int_equal(r, 0);
  assert_ptr_equal(ret, (void *)(uintptr_t)3);
  assert_i64_ge(el, storm_window());
  assert_true(hits >= 2);
  body_destroy(b);

  /* Cancelled after 40 ms, then a deadline after 40 ms, then joined. */
  b = body_alloc();
  body_init(b, true, (void *)(uintptr_t)4);
  assert_int_equal(cancel_thread_create(&b->t, NULL, body_main, b), 0);
  cancel_source *c = new_src("storm-cancel");
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(c, storm_window()), 0);
  r = cancel_thread_join(TOK(c), &b->t, &ret, CANCEL_NEVER);
  el = test_since(t0);
  hits = test_sigstorm_stop(&storm);
  assert_int_equal(r, -ECANCELED);
  assert_elapsed_within(el, storm_window(), LATE);
  assert_true(hits >= 2);
  cancel_source_unref(c);

  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + storm_window();
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    r = cancel_thread_join(k ? NULL : TOK(s), &b->t, &ret, d);
    int64_t now = cancel_now();
    hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, -ETIMEDOUT);
    assert_i64_ge(now, d);
    assert_i64_lt(now, d + test_tol(LATE));
    assert_true(hits >= 2);
  }
  sem_post(&b->release);
  assert_int_equal(cancel_thread_join(TOK(s), &b->t, &ret, CANCEL_NEVER), 0);
  assert_ptr_equal(ret, (void *)(uintptr_t)4);
  body_destroy(b);
  cancel_source_unref(s);
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
      cmocka_unit_test(test_sem_basic),
      cmocka_unit_test(test_sem_invalid),
      cmocka_unit_test(test_sem_ready_is_immediate),
      cmocka_unit_test(test_sem_posted_while_blocked),
      cmocka_unit_test(test_sem_cancelled_while_blocked),
      cmocka_unit_test(test_sem_cancelled_before),
      cmocka_unit_test(test_sem_deadline),
      cmocka_unit_test(test_sem_post_wakes_one),
      cmocka_unit_test(test_sem_counts_exact),
      cmocka_unit_test(test_sem_survives_signals),
      cmocka_unit_test(test_thread_join_after_finish),
      cmocka_unit_test(test_thread_join_poll),
      cmocka_unit_test(test_thread_join_cancelled_then_joinable),
      cmocka_unit_test(test_thread_join_cancelled_before),
      cmocka_unit_test(test_thread_join_deadline),
      cmocka_unit_test(test_thread_invalid),
      cmocka_unit_test(test_thread_join_survives_signals),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
