/*
 * cancel_sleep and cancel_sleep_until: the time is up (0, never early),
 * cancelled while asleep (from a timer and from another thread, promptly),
 * cancelled before (at once, whatever the duration), past and far
 * deadlines, bad input, signals during the sleep (EINTR never ends it), a
 * shared token waking many sleepers, and no stale wake-up left behind for
 * the thread's next sleep.
 */
#include "test_util.h"

/* How late a wake-up may be: cancel (or deadline) to return. */
#define LATE CANCEL_MSEC(50)
/* How long "at once" may take. */
#define AT_ONCE CANCEL_MSEC(20)

/* ---- The time is up --------------------------------------------------- */

static void test_sleep_completes(void **state) {
  (void)state;
  cancel_source *s = new_src("sleep");
  /* NULL token and a live token: 0 when the time is up, never early. */
  for (int k = 0; k < 2; k++) {
    const cancel_token *tok = k == 0 ? NULL : TOK(s);
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sleep(tok, CANCEL_MSEC(30)), 0);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(30), LATE);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_sleep_until_completes(void **state) {
  (void)state;
  cancel_source *s = new_src("until");
  int64_t deadline = cancel_now() + CANCEL_MSEC(30);
  assert_int_equal(cancel_sleep_until(TOK(s), deadline), 0);
  int64_t now = cancel_now();
  assert_i64_ge(now, deadline);
  assert_i64_lt(now, deadline + test_tol(LATE));

  deadline = cancel_now() + CANCEL_MSEC(10);
  assert_int_equal(cancel_sleep_until(NULL, deadline), 0);
  assert_i64_ge(cancel_now(), deadline);
  cancel_source_unref(s);
}

static void test_sleep_zero_and_past(void **state) {
  (void)state;
  cancel_source *s = new_src("zero");
  static const int64_t past[] = {-1, 0, INT64_MIN};
  for (int k = 0; k < 2; k++) {
    const cancel_token *tok = k == 0 ? NULL : TOK(s);
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sleep(tok, 0), 0);
    assert_int_equal(cancel_sleep(tok, 1), 0);
    assert_int_equal(cancel_sleep_until(tok, cancel_now()), 0);
    assert_int_equal(cancel_sleep_until(tok, cancel_now() - CANCEL_SEC(1)), 0);
    for (size_t i = 0; i < sizeof past / sizeof past[0]; i++) {
      int64_t d = past[i] == -1 ? cancel_now() - 1 : past[i];
      assert_int_equal(cancel_sleep_until(tok, d), 0);
    }
    assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  }
  cancel_source_unref(s);
}

static void test_sleep_negative_is_einval(void **state) {
  (void)state;
  cancel_source *s = new_src("neg");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sleep(NULL, -1), -EINVAL);
  assert_int_equal(cancel_sleep(TOK(s), -1), -EINVAL);
  assert_int_equal(cancel_sleep(TOK(s), INT64_MIN), -EINVAL);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  cancel_source_unref(s);
}

/* ---- Cancelled while asleep ------------------------------------------- */

static void test_sleep_cancelled_by_timer(void **state) {
  (void)state;
  /* Both calls, with a long duration and with no deadline at all. */
  for (int k = 0; k < 2; k++) {
    cancel_source *s = new_src("timer");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    int r = k == 0 ? cancel_sleep(TOK(s), CANCEL_SEC(10))
                   : cancel_sleep_until(TOK(s), CANCEL_NEVER);
    int64_t el = test_since(t0);
    assert_int_equal(r, -ECANCELED);
    assert_elapsed_within(el, CANCEL_MSEC(20), LATE);
    cancel_source_unref(s);
  }
}

struct sleeper {
  const cancel_token *tok;
  int64_t ns;       /* for cancel_sleep, or */
  int64_t deadline; /* for cancel_sleep_until when ns < 0 */
};

static int64_t do_sleep(void *arg) {
  struct sleeper *sl = arg;
  return sl->ns >= 0 ? cancel_sleep(sl->tok, sl->ns)
                     : cancel_sleep_until(sl->tok, sl->deadline);
}

static void test_sleep_cancelled_from_thread(void **state) {
  (void)state;
  for (int k = 0; k < 2; k++) {
    cancel_source *s = new_src("thread");
    struct sleeper sl = {TOK(s), k == 0 ? CANCEL_SEC(30) : -1, CANCEL_NEVER};
    struct test_waiter w;
    test_waiter_start(&w, do_sleep, &sl);
    test_waiter_stop_with(&w, test_rescue_cancel, s);
    assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
    int64_t t_cancel = cancel_now();
    assert_int_equal(cancel_source_cancel(s), 1);
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w.result, -ECANCELED);
    assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
    cancel_source_unref(s);
  }
}

/* A child linked to a parent: cancelling the parent wakes a sleeper on the
 * child; the token's own timeout is a cancellation, not the sleep's time. */
static void test_sleep_linked_and_timeout_source(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  const cancel_token *ptok = TOK(parent);
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", &ptok, 1), 0);
  struct sleeper sl = {TOK(child), CANCEL_SEC(30), 0};
  struct test_waiter w;
  test_waiter_start(&w, do_sleep, &sl);
  test_waiter_stop_with(&w, test_rescue_cancel, child);
  assert_true(test_wait_blocked(w.tid, CANCEL_SEC(5)));
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(parent), 1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
  cancel_source_unref(child);
  cancel_source_unref(parent);

  cancel_source *to = NULL;
  assert_int_equal(
      cancel_source_new_timeout(&to, "budget", NULL, CANCEL_MSEC(20)), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sleep(TOK(to), CANCEL_SEC(10)), -ECANCELED);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
  assert_int_equal(cancel_token_kind(TOK(to)), CANCEL_TIMEOUT);
  cancel_source_unref(to);
}

/* ---- Cancelled before ------------------------------------------------- */

static void test_sleep_cancelled_before(void **state) {
  (void)state;
  cancel_source *s = new_src("before");
  assert_int_equal(cancel_source_cancel(s), 1);
  int64_t t0 = cancel_now();
  /* Level-triggered: every call, every duration, forever. */
  for (int i = 0; i < 3; i++) {
    assert_int_equal(cancel_sleep(TOK(s), CANCEL_SEC(10)), -ECANCELED);
    assert_int_equal(cancel_sleep(TOK(s), 1), -ECANCELED);
    assert_int_equal(cancel_sleep(TOK(s), 0), -ECANCELED);
    assert_int_equal(cancel_sleep_until(TOK(s), CANCEL_NEVER), -ECANCELED);
    assert_int_equal(cancel_sleep_until(TOK(s), cancel_now() + CANCEL_SEC(5)),
                     -ECANCELED);
    assert_int_equal(cancel_sleep_until(TOK(s), cancel_now() - 1), -ECANCELED);
  }
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  cancel_source_unref(s);
}

/* ---- Deadlines far away: no overflow into "passed" -------------------- */

static void test_sleep_far_deadlines(void **state) {
  (void)state;
  /* Durations and deadlines whose sum with now overflows, or whose
   * conversion to a timespec or milliseconds would: the sleep must still be
   * a long one, ended here by the cancel after 20 ms. */
  const int64_t durations[] = {INT64_MAX, INT64_MAX - 1, CANCEL_SEC(1) << 30};
  for (size_t i = 0; i < sizeof durations / sizeof durations[0]; i++) {
    cancel_source *s = new_src("far");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    assert_int_equal(cancel_sleep(TOK(s), durations[i]), -ECANCELED);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
    cancel_source_unref(s);
  }
  const int64_t deadlines[] = {CANCEL_NEVER - 1, INT64_MAX / 2,
                               cancel_now() + (CANCEL_SEC(1) << 30)};
  for (size_t i = 0; i < sizeof deadlines / sizeof deadlines[0]; i++) {
    cancel_source *s = new_src("far");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    assert_int_equal(cancel_sleep_until(TOK(s), deadlines[i]), -ECANCELED);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
    cancel_source_unref(s);
  }
}

/* ---- Signals ---------------------------------------------------------- */

static void test_sleep_survives_signals(void **state) {
  (void)state;
  struct test_sigstorm storm;

  /* The time is up: 0, not early, not -EINTR; NULL and live tokens. */
  cancel_source *s = new_src("storm");
  for (int k = 0; k < 2; k++) {
    const cancel_token *tok = k == 0 ? NULL : TOK(s);
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    int64_t t0 = cancel_now();
    int r = cancel_sleep(tok, CANCEL_MSEC(60));
    int64_t el = test_since(t0);
    long hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, 0);
    assert_elapsed_within(el, CANCEL_MSEC(60), LATE);
    assert_true(hits >= 2);

    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    int64_t deadline = cancel_now() + CANCEL_MSEC(40);
    r = cancel_sleep_until(tok, deadline);
    int64_t now = cancel_now();
    hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, 0);
    assert_i64_ge(now, deadline);
    assert_i64_lt(now, deadline + test_tol(LATE));
    assert_true(hits >= 2);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);

  /* Cancelled during the storm: -ECANCELED at the cancel, not before. */
  for (int k = 0; k < 2; k++) {
    s = new_src("storm-cancel");
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(40)), 0);
    int r = k == 0 ? cancel_sleep(TOK(s), CANCEL_SEC(10))
                   : cancel_sleep_until(TOK(s), CANCEL_NEVER);
    int64_t el = test_since(t0);
    long hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, -ECANCELED);
    assert_elapsed_within(el, CANCEL_MSEC(40), LATE);
    assert_true(hits >= 2);
    cancel_source_unref(s);
  }
}

/* ---- Many sleepers, one token ------------------------------------------ */

enum { SLEEPERS = 8 };

static void test_sleep_shared_token_wakes_all(void **state) {
  (void)state;
  cancel_source *s = new_src("shared");
  struct sleeper sl = {TOK(s), CANCEL_SEC(30), 0};
  struct test_waiter w[SLEEPERS];
  for (int i = 0; i < SLEEPERS; i++) {
    test_waiter_start(&w[i], do_sleep, &sl);
    test_waiter_stop_with(&w[i], test_rescue_cancel, s);
  }
  for (int i = 0; i < SLEEPERS; i++)
    assert_true(test_wait_blocked(w[i].tid, CANCEL_SEC(5)));
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(s), 1);
  for (int i = 0; i < SLEEPERS; i++) {
    test_waiter_end(&w[i], test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w[i].result, -ECANCELED);
    assert_i64_lt(w[i].t_end - t_cancel, test_tol(LATE));
  }
  cancel_source_unref(s);
}

/* Sleepers on different tokens: cancelling one wakes that one only. */
static void test_sleep_cancel_wakes_only_its_sleeper(void **state) {
  (void)state;
  cancel_source *a = new_src("a"), *b = new_src("b");
  struct sleeper sa = {TOK(a), CANCEL_SEC(30), 0};
  struct sleeper sb = {TOK(b), CANCEL_SEC(30), 0};
  struct test_waiter wa, wb;
  test_waiter_start(&wa, do_sleep, &sa);
  test_waiter_stop_with(&wa, test_rescue_cancel, a);
  test_waiter_start(&wb, do_sleep, &sb);
  test_waiter_stop_with(&wb, test_rescue_cancel, b);
  assert_true(test_wait_blocked(wa.tid, CANCEL_SEC(5)));
  assert_true(test_wait_blocked(wb.tid, CANCEL_SEC(5)));
  assert_int_equal(cancel_source_cancel(a), 1);
  test_waiter_end(&wa, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(wa.result, -ECANCELED);
  /* b still sleeps. */
  test_sleep_ns(CANCEL_MSEC(20));
  assert_int_not_equal(sem_trywait(wb.finished), 0);
  assert_int_equal(cancel_source_cancel(b), 1);
  test_waiter_end(&wb, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(wb.result, -ECANCELED);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

/* ---- No stale wake-up ------------------------------------------------- */

/* The per-thread wake primitive is reused by the thread's next wait: a
 * wake-up meant for a finished wait (a cancel that fired while or just
 * after the sleep ended) must not end the next sleep early. */
static void test_sleep_no_stale_wakeup(void **state) {
  (void)state;
  int rounds = (int)(40 * test_stress_scale());
  for (int i = 0; i < rounds; i++) {
    cancel_source *s = new_src("stale");
    /* The timer fires around the end of the 2 ms sleep: either result is
     * fine, what matters is the next sleep. */
    assert_int_equal(
        cancel_source_cancel_after(s, CANCEL_USEC(1500 + 50 * (i % 20))), 0);
    int r = cancel_sleep(TOK(s), CANCEL_MSEC(2));
    assert_true(r == 0 || r == -ECANCELED);
    /* Let the cancel (if it had not fired yet) fire now, then sleep on a
     * live token and on none. */
    while (!cancel_token_is_cancelled(TOK(s)))
      test_sleep_ns(CANCEL_USEC(200));
    cancel_source *live = new_src("live");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sleep(TOK(live), CANCEL_MSEC(3)), 0);
    assert_i64_ge(test_since(t0), CANCEL_MSEC(3));
    t0 = cancel_now();
    assert_int_equal(cancel_sleep(NULL, CANCEL_MSEC(1)), 0);
    assert_i64_ge(test_since(t0), CANCEL_MSEC(1));
    cancel_source_unref(live);
    cancel_source_unref(s);
  }

  /* A cancel that woke a sleep; the same thread sleeps again at once. */
  cancel_source *s = new_src("woken");
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(5)), 0);
  assert_int_equal(cancel_sleep(TOK(s), CANCEL_SEC(10)), -ECANCELED);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sleep(NULL, CANCEL_MSEC(20)), 0);
  assert_i64_ge(test_since(t0), CANCEL_MSEC(20));
  cancel_source_unref(s);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sleep_completes),
      cmocka_unit_test(test_sleep_until_completes),
      cmocka_unit_test(test_sleep_zero_and_past),
      cmocka_unit_test(test_sleep_negative_is_einval),
      cmocka_unit_test(test_sleep_cancelled_by_timer),
      cmocka_unit_test(test_sleep_cancelled_from_thread),
      cmocka_unit_test(test_sleep_linked_and_timeout_source),
      cmocka_unit_test(test_sleep_cancelled_before),
      cmocka_unit_test(test_sleep_far_deadlines),
      cmocka_unit_test(test_sleep_survives_signals),
      cmocka_unit_test(test_sleep_shared_token_wakes_all),
      cmocka_unit_test(test_sleep_cancel_wakes_only_its_sleeper),
      cmocka_unit_test(test_sleep_no_stale_wakeup),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
