/*
 * cancel_sem_* (src/sem.c): counts exact under concurrency, cancelled and
 * timed-out waits take nothing, a storm of signals (EINTR never ends a
 * wait).
 */
#include "test_util.h"

#include <limits.h>

/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)
#define AT_ONCE CANCEL_MSEC(20)

static unsigned rnd(unsigned *seed) {
  *seed = *seed * 1103515245u + 12345u;
  return (*seed >> 16) & 0x7fff;
}

/* How long a wait lasts under a signal storm: long enough, on a slow or
 * loaded machine too (the time scale), for the storm's thread to land a
 * few signals in it. */
static int64_t storm_window(void) {
  return test_tol(CANCEL_MSEC(40));
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
    test_waiter_block(&w, do_sem_wait, &sw);
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
  test_waiter_block(&w, do_sem_wait, &sw);
  test_waiter_cancel(&w, s, LATE);
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
  test_waiter_blocked(&wa);
  test_waiter_blocked(&wb);
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

int main(void) {
  const struct CMUnitTest tests[] = {
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
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
