/*
 * cancel_thread_create and cancel_thread_join (src/thread.c): joinable
 * again after a cancelled or timed-out join, a storm of signals (EINTR
 * never ends the join).
 */
#include "test_util.h"

/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)
#define AT_ONCE CANCEL_MSEC(20)

/* How long a wait lasts under a signal storm: long enough, on a slow or
 * loaded machine too (the time scale), for the storm's thread to land a
 * few signals in it. */
static int64_t storm_window(void) {
  return test_tol(CANCEL_MSEC(40));
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
      test_waiter_block(&w, do_join, &j);
      test_waiter_cancel(&w, s, LATE);
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
