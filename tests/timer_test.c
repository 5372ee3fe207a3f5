/*
 * Timeouts: cancel_source_cancel_at/_after and the timeout sources.  Firing
 * time within tolerance, reasons, inline firing of passed deadlines,
 * disarming, re-arming, many timers, disposal, linked timeout sources, the
 * firing thread and fork safety.
 *
 * Waits use a semaphore posted by the callback; sleeps appear only where
 * the test asserts that something did NOT happen.
 */
#include "test_util.h"

#include <dlfcn.h>
#include <fcntl.h>
#include <sys/resource.h>
#include <sys/timerfd.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* ---- Injected timerfd_settime failures -------------------------------- *
 * The library calls timerfd_settime(2) itself (no wrapper of its own), so
 * this definition in the test program takes the place of libc's for the
 * statically linked library, and forwards to the real one unless a failure
 * is asked for: settime_fail > 0 fails that many calls, < 0 every call. */
static int settime_fail;   /* atomic */
static int settime_failed; /* atomic: calls failed so far */

int timerfd_settime(int fd, int flags, const struct itimerspec *new_value,
                    struct itimerspec *old_value) {
  static int (*real)(int, int, const struct itimerspec *, struct itimerspec *);
  if (real == NULL) {
    void *sym = dlsym(RTLD_NEXT, "timerfd_settime");
    memcpy(&real, &sym, sizeof real); /* POSIX: a function's address */
  }
  int f = __atomic_load_n(&settime_fail, __ATOMIC_SEQ_CST);
  while (f != 0) {
    if (f < 0 ||
        __atomic_compare_exchange_n(&settime_fail, &f, f - 1, false,
                                    __ATOMIC_SEQ_CST, __ATOMIC_SEQ_CST)) {
      __atomic_add_fetch(&settime_failed, 1, __ATOMIC_SEQ_CST);
      errno = ENOMEM;
      return -1;
    }
  }
  return real(fd, flags, new_value, old_value);
}

/* Generous upper bound for "it must fire eventually". */
static int64_t fire_wait(int64_t timeout_ns) {
  return timeout_ns + test_tol(CANCEL_SEC(5));
}

/* Lateness allowed after a deadline. */
static int64_t late_tol(void) {
  return test_tol(CANCEL_MSEC(50));
}

/* ---- Firing ----------------------------------------------------------- */

static void test_timeout_fires_within_tolerance(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *s = new_src("t50");
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);

  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(50)), 0);
  int64_t t1 = cancel_now();
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(50))), 0);

  assert_int_equal(test_load(&f.count), 1);
  assert_i64_ge(f.at, t0 + CANCEL_MSEC(50));
  assert_i64_le(f.at, t1 + CANCEL_MSEC(50) + late_tol());
  assert_true(cancel_token_is_cancelled(TOK(s)));
  /* The callback ran on the library's timer thread, not on ours. */
  assert_false(pthread_equal(f.tid, pthread_self()));

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "t50");
  assert_string_equal(r.detail, "50ms");
  assert_int_equal(r.via_len, 0);
  assert_i64_ge(r.time, t0 + CANCEL_MSEC(50));
  assert_i64_le(r.time, f.at);

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(s);
  sem_destroy(&f.sem);
}

static void test_timeout_details(void **state) {
  (void)state;
  static const int64_t timeouts[] = {CANCEL_MSEC(10), CANCEL_MSEC(30),
                                     CANCEL_USEC(1500), CANCEL_SEC(1)};
  enum { N = sizeof timeouts / sizeof timeouts[0] };
  /* Static: a failed assertion (no source for the next one) leaves the
   * armed timers to fire on these after this frame is gone. */
  static struct fire_rec f[N];
  cancel_source *s[N];
  static cancel_reg reg[N];
  for (int i = 0; i < N; i++) {
    fire_rec_init(&f[i]);
    s[i] = new_src("d");
    assert_int_equal(cancel_register(&reg[i], TOK(s[i]), fire_cb, &f[i]), 0);
    assert_int_equal(cancel_source_cancel_after(s[i], timeouts[i]), 0);
  }
  for (int i = 0; i < N; i++) {
    assert_int_equal(test_sem_wait_ns(&f[i].sem, fire_wait(timeouts[i])), 0);
    cancel_reason r;
    assert_int_equal(cancel_token_reason(TOK(s[i]), &r), 1);
    assert_int_equal(r.kind, CANCEL_TIMEOUT);
    size_t len = strlen(r.detail);
    /* A duration: starts with a digit, ends with a unit in seconds. */
    assert_true(len >= 2);
    assert_true(r.detail[0] >= '0' && r.detail[0] <= '9');
    assert_int_equal(r.detail[len - 1], 's');
    if (timeouts[i] == CANCEL_MSEC(10) || timeouts[i] == CANCEL_MSEC(30))
      assert_non_null(strstr(r.detail, "ms"));
    assert_int_equal(cancel_unregister(&reg[i]), 0);
    cancel_source_unref(s[i]);
    sem_destroy(&f[i].sem);
  }
}

static void test_cancel_at_past_fires_inline(void **state) {
  (void)state;
  static const int64_t offsets[] = {-CANCEL_MSEC(1), -CANCEL_SEC(100)};
  for (size_t i = 0; i < 3; i++) {
    struct fire_rec f;
    fire_rec_init(&f);
    cancel_source *s = new_src("past");
    cancel_reg reg;
    assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
    int64_t at = i < 2 ? cancel_now() + offsets[i] : 0;
    assert_int_equal(cancel_source_cancel_at(s, at), 0);
    /* Fired before the call returned, on this thread. */
    assert_int_equal(test_load(&f.count), 1);
    assert_true(pthread_equal(f.tid, pthread_self()));
    assert_true(cancel_token_is_cancelled(TOK(s)));
    assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
    cancel_reason r;
    assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
    assert_string_equal(r.origin, "past");
    assert_int_equal(cancel_unregister(&reg), 0);
    cancel_source_unref(s);
    sem_destroy(&f.sem);
  }
}

static void test_never_disarms(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *s = new_src("disarm");
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(30)), 0);
  assert_int_equal(cancel_source_cancel_at(s, CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);

  /* Asserting that nothing happens: waiting is the test. */
  assert_int_equal(test_sem_wait_ns(&f.sem, CANCEL_MSEC(60)), -1);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(test_load(&f.count), 0);

  /* Still armable afterwards. */
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(5)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(5))), 0);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(s);
  sem_destroy(&f.sem);
}

static void test_rearm_earlier(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *s = new_src("earlier");
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_SEC(10)), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(30)), 0);
  int64_t t1 = cancel_now();
  assert_i64_ge(cancel_token_deadline(TOK(s)), t0 + CANCEL_MSEC(30));
  assert_i64_le(cancel_token_deadline(TOK(s)), t1 + CANCEL_MSEC(30));
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(30))), 0);
  assert_i64_ge(f.at, t0 + CANCEL_MSEC(30));
  assert_i64_le(f.at, t1 + CANCEL_MSEC(30) + late_tol());
  assert_int_equal(test_load(&f.count), 1);

  /* Re-arming with cancel_at, earlier again. */
  struct fire_rec g;
  fire_rec_init(&g);
  cancel_source *s2 = new_src("earlier-at");
  cancel_reg reg2;
  assert_int_equal(cancel_register(&reg2, TOK(s2), fire_cb, &g), 0);
  int64_t now = cancel_now();
  assert_int_equal(cancel_source_cancel_at(s2, now + CANCEL_SEC(10)), 0);
  assert_int_equal(cancel_source_cancel_at(s2, now + CANCEL_MSEC(20)), 0);
  assert_int_equal(test_sem_wait_ns(&g.sem, fire_wait(CANCEL_MSEC(20))), 0);
  assert_i64_ge(g.at, now + CANCEL_MSEC(20));
  assert_i64_le(g.at, now + CANCEL_MSEC(20) + late_tol());

  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(cancel_unregister(&reg2), 0);
  cancel_source_unref(s);
  cancel_source_unref(s2);
  sem_destroy(&f.sem);
  sem_destroy(&g.sem);
}

static void test_rearm_later(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *s = new_src("later");
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(30)), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(150)), 0);
  int64_t t1 = cancel_now();
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(150))), 0);
  /* Postponed: not at 30 ms but at 150 ms. */
  assert_i64_ge(f.at, t0 + CANCEL_MSEC(150));
  assert_i64_le(f.at, t1 + CANCEL_MSEC(150) + late_tol());
  assert_int_equal(test_load(&f.count), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
  assert_string_equal(r.detail, "150ms");
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(s);
  sem_destroy(&f.sem);
}

static void test_noop_once_cancelled(void **state) {
  (void)state;
  cancel_source *s = new_src("done");
  assert_int_equal(cancel_source_cancel_with(s, CANCEL_CLIENT_GONE, "x"), 1);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(1)), 1);
  assert_int_equal(cancel_source_cancel_at(s, cancel_now() + CANCEL_MSEC(1)),
                   1);
  assert_int_equal(cancel_source_cancel_at(s, cancel_now() - CANCEL_SEC(1)), 1);
  assert_int_equal(cancel_source_cancel_at(s, CANCEL_NEVER), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
  assert_int_equal(r.kind, CANCEL_CLIENT_GONE);
  assert_string_equal(r.detail, "x");
  cancel_source_unref(s);

  /* Also once the timer itself fired. */
  struct fire_rec f;
  fire_rec_init(&f);
  s = new_src("fired");
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(1))), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(1)), 1);
  assert_int_equal(cancel_source_cancel(s), 0);
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(test_load(&f.count), 1);
  cancel_source_unref(s);
  sem_destroy(&f.sem);
}

static void test_invalid_arguments(void **state) {
  (void)state;
  cancel_source *s = new_src("neg");
  assert_int_equal(cancel_source_cancel_after(s, -1), -EINVAL);
  assert_int_equal(cancel_source_cancel_after(s, INT64_MIN), -EINVAL);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
  assert_int_equal(cancel_source_cancel_after(NULL, CANCEL_MSEC(1)), -EINVAL);
  assert_int_equal(cancel_source_cancel_at(NULL, cancel_now()), -EINVAL);

  cancel_source *t = NULL;
  assert_int_equal(cancel_source_new_timeout(&t, "x", NULL, -1), -EINVAL);
  assert_int_equal(cancel_source_new_timeout(NULL, "x", NULL, CANCEL_SEC(1)),
                   -EINVAL);
  cancel_source local;
  assert_int_equal(cancel_source_init_timeout(&local, "x", TOK(s), -5),
                   -EINVAL);
  assert_int_equal(cancel_source_init_timeout(NULL, "x", NULL, CANCEL_SEC(1)),
                   -EINVAL);
  cancel_source_unref(s);
}

/* ---- Many timers ------------------------------------------------------ */

struct many_rec {
  cancel_source *src;
  cancel_reg reg;
  int64_t deadline;
  int64_t fired_at;
  int64_t disposed_at;
  int count;
  long seq;
};

struct many_ctx {
  long next_seq;
  long fired;
  long want;
  sem_t all_done;
};

static struct many_ctx many;

static void many_cb(void *arg) {
  struct many_rec *m = arg;
  m->fired_at = cancel_now();
  m->seq = __atomic_fetch_add(&many.next_seq, 1, __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&m->count, 1, __ATOMIC_SEQ_CST);
  if (__atomic_add_fetch(&many.fired, 1, __ATOMIC_SEQ_CST) == many.want)
    sem_post(&many.all_done);
}

static uint64_t rng_state = 0x9E3779B97F4A7C15ull;

static uint64_t rng(void) {
  rng_state ^= rng_state << 13;
  rng_state ^= rng_state >> 7;
  rng_state ^= rng_state << 17;
  return rng_state;
}

static int by_seq(const void *a, const void *b) {
  const struct many_rec *x = *(struct many_rec *const *)a;
  const struct many_rec *y = *(struct many_rec *const *)b;
  return (x->seq > y->seq) - (x->seq < y->seq);
}

static void test_many_timers_fire_in_order(void **state) {
  (void)state;
  enum { N = 10000 };
  struct many_rec *recs = calloc(N, sizeof *recs);
  struct many_rec **order = calloc(N, sizeof *order);
  assert_non_null(recs);
  assert_non_null(order);
  memset(&many, 0, sizeof many);
  many.want = N;
  sem_init(&many.all_done, 0, 0);

  for (int i = 0; i < N; i++) {
    struct many_rec *m = &recs[i];
    m->src = new_src("many");
    assert_int_equal(cancel_register(&m->reg, TOK(m->src), many_cb, m), 0);
    /* Relative to the arming moment, so it is never already passed. */
    m->deadline = cancel_now() + CANCEL_MSEC(1) +
                  (int64_t)(rng() % (uint64_t)CANCEL_MSEC(200));
    assert_int_equal(cancel_source_cancel_at(m->src, m->deadline), 0);
  }
  assert_int_equal(
      test_sem_wait_ns(&many.all_done, fire_wait(CANCEL_MSEC(200))), 0);

  int64_t tol = late_tol();
  for (int i = 0; i < N; i++) {
    struct many_rec *m = &recs[i];
    assert_int_equal(test_load(&m->count), 1);
    assert_i64_ge(m->fired_at, m->deadline);
    assert_i64_le(m->fired_at, m->deadline + tol);
    order[i] = m;
  }
  /* Fired in deadline order, up to the lateness tolerance. */
  qsort(order, N, sizeof *order, by_seq);
  for (int i = 1; i < N; i++)
    assert_i64_ge(order[i]->deadline + tol, order[i - 1]->deadline);

  for (int i = 0; i < N; i++) {
    assert_int_equal(cancel_unregister(&recs[i].reg), 0);
    cancel_source_unref(recs[i].src);
  }
  /* Nothing fired twice meanwhile. */
  assert_int_equal(__atomic_load_n(&many.fired, __ATOMIC_SEQ_CST), N);
  sem_destroy(&many.all_done);
  free(order);
  free(recs);
}

static void test_disposed_timers_never_fire(void **state) {
  (void)state;
  enum { N = 1000 };
  struct many_rec *recs = calloc(N, sizeof *recs);
  assert_non_null(recs);
  memset(&many, 0, sizeof many);
  many.want = -1;
  sem_init(&many.all_done, 0, 0);

  int64_t base = test_tol(CANCEL_MSEC(100));
  int64_t last = 0;
  for (int i = 0; i < N; i++) {
    struct many_rec *m = &recs[i];
    m->src = new_src("disposed");
    assert_int_equal(cancel_register(&m->reg, TOK(m->src), many_cb, m), 0);
    m->deadline =
        cancel_now() + base + (int64_t)(rng() % (uint64_t)CANCEL_MSEC(100));
    if (m->deadline > last)
      last = m->deadline;
    assert_int_equal(cancel_source_cancel_at(m->src, m->deadline), 0);
  }
  for (int i = 0; i < N; i++) {
    cancel_source_unref(recs[i].src);
    recs[i].disposed_at = cancel_now();
  }
  /* Wait past every deadline: nothing may fire. */
  test_sleep_ns(last - cancel_now() + late_tol());

  int in_time = 0;
  for (int i = 0; i < N; i++) {
    struct many_rec *m = &recs[i];
    if (m->disposed_at < m->deadline) {
      in_time++;
      assert_int_equal(test_load(&m->count), 0);
      assert_int_equal(cancel_unregister(&m->reg), 1);
    } else {
      /* Disposed after its deadline (a very slow run): at most once. */
      int c = test_load(&m->count);
      assert_true(c == 0 || c == 1);
      assert_int_equal(cancel_unregister(&m->reg), c == 0 ? 1 : 0);
    }
  }
  if (in_time < N / 2) {
    print_error("only %d of %d timers disposed before their deadline: raise "
                "CANCEL_TEST_TIME_SCALE\n",
                in_time, N);
    fail();
  }
  sem_destroy(&many.all_done);
  free(recs);
}

/* ---- Timeout sources -------------------------------------------------- */

static void test_timeout_source_parent_wins(void **state) {
  (void)state;
  cancel_source *p = new_src("parent");
  cancel_source *c = NULL;
  int64_t before = cancel_now();
  assert_int_equal(cancel_source_new_timeout(&c, "req", TOK(p), CANCEL_SEC(10)),
                   0);
  int64_t after = cancel_now();
  assert_non_null(c);
  assert_false(cancel_token_is_cancelled(TOK(c)));
  assert_i64_ge(cancel_token_deadline(TOK(c)), before + CANCEL_SEC(10));
  assert_i64_le(cancel_token_deadline(TOK(c)), after + CANCEL_SEC(10));
  int64_t rem = cancel_token_remaining(TOK(c));
  assert_i64_gt(rem, 0);
  assert_i64_le(rem, CANCEL_SEC(10));
  assert_i64_eq(cancel_token_deadline(TOK(p)), CANCEL_NEVER);

  assert_int_equal(cancel_source_cancel_with(p, CANCEL_SHUTDOWN, NULL), 1);
  assert_true(cancel_token_is_cancelled(TOK(c)));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "parent");
  assert_int_equal(r.via_len, 1);
  assert_string_equal(r.via[0].name, "req");
  cancel_source_unref(c); /* disarms the 10 s timer */
  cancel_source_unref(p);
}

static void test_timeout_source_fires(void **state) {
  (void)state;
  cancel_source *p = new_src("parent");
  struct fire_rec f, g;
  fire_rec_init(&f);
  fire_rec_init(&g);

  /* Heap, linked to a live parent: the timer wins. */
  cancel_source *c = NULL;
  int64_t t0 = cancel_now();
  assert_int_equal(
      cancel_source_new_timeout(&c, "req", TOK(p), CANCEL_MSEC(20)), 0);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(c), fire_cb, &f), 0);

  /* Caller storage, no parent. */
  cancel_source local;
  assert_int_equal(
      cancel_source_init_timeout(&local, "lt", NULL, CANCEL_MSEC(20)), 0);
  cancel_reg lreg;
  assert_int_equal(cancel_register(&lreg, TOK(&local), fire_cb, &g), 0);
  /* A child of the timeout source sees its deadline. */
  const cancel_token *pl[] = {TOK(&local)};
  cancel_source *gc = NULL;
  assert_int_equal(cancel_source_new_linked(&gc, "gc", pl, 1), 0);
  assert_i64_eq(cancel_token_deadline(TOK(gc)),
                cancel_token_deadline(TOK(&local)));
  assert_i64_ge(cancel_token_deadline(TOK(gc)), t0 + CANCEL_MSEC(20));

  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(20))), 0);
  assert_int_equal(test_sem_wait_ns(&g.sem, fire_wait(CANCEL_MSEC(20))), 0);
  assert_i64_ge(f.at, t0 + CANCEL_MSEC(20));
  assert_i64_ge(g.at, t0 + CANCEL_MSEC(20));
  assert_false(cancel_token_is_cancelled(TOK(p)));

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "req");
  assert_string_equal(r.detail, "20ms");
  assert_int_equal(r.via_len, 0);
  assert_int_equal(cancel_token_reason(TOK(&local), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "lt");
  assert_int_equal(cancel_token_reason(TOK(gc), &r), 1);
  assert_string_equal(r.origin, "lt");
  assert_int_equal(r.via_len, 1);
  assert_string_equal(r.via[0].name, "gc");

  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(cancel_unregister(&lreg), 0);
  cancel_source_unref(gc);
  cancel_source_destroy(&local);
  cancel_source_unref(c);
  cancel_source_unref(p);
  sem_destroy(&f.sem);
  sem_destroy(&g.sem);
}

/* A timeout source on an already-cancelled parent is cancelled at once. */
static void test_timeout_source_cancelled_parent(void **state) {
  (void)state;
  cancel_source *p = new_src("p");
  assert_int_equal(cancel_source_cancel(p), 1);
  cancel_source *c = NULL;
  assert_int_equal(cancel_source_new_timeout(&c, "c", TOK(p), CANCEL_SEC(10)),
                   0);
  assert_true(cancel_token_is_cancelled(TOK(c)));
  assert_int_equal(cancel_token_kind(TOK(c)), CANCEL_REQUESTED);
  cancel_source_unref(c);
  cancel_source_unref(p);
}

/* ---- The timer thread ------------------------------------------------- */

static void test_timers_share_one_thread(void **state) {
  (void)state;
  struct fire_rec f[3];
  cancel_source *s[3];
  cancel_reg reg[3];
  for (int i = 0; i < 3; i++) {
    fire_rec_init(&f[i]);
    s[i] = new_src("shared");
    assert_int_equal(cancel_register(&reg[i], TOK(s[i]), fire_cb, &f[i]), 0);
    assert_int_equal(cancel_source_cancel_after(s[i], CANCEL_MSEC(5 + 5 * i)),
                     0);
  }
  for (int i = 0; i < 3; i++)
    assert_int_equal(test_sem_wait_ns(&f[i].sem, fire_wait(CANCEL_MSEC(20))),
                     0);
  for (int i = 0; i < 3; i++) {
    assert_false(pthread_equal(f[i].tid, pthread_self()));
    assert_true(pthread_equal(f[i].tid, f[0].tid));
    assert_int_equal(cancel_unregister(&reg[i]), 0);
    cancel_source_unref(s[i]);
    sem_destroy(&f[i].sem);
  }
}

/* Callbacks running on the timer thread may arm timers, disarm and destroy
 * other timed sources, and drop the last reference to their own source. */
struct reentrant {
  cancel_source *self;   /* dropped by the callback */
  cancel_source *victim; /* armed far away, destroyed by the callback */
  cancel_source *next;   /* armed by the callback */
  int arm_ret;
  struct fire_rec done;
};

static void reentrant_cb(void *arg) {
  struct reentrant *r = arg;
  cancel_source_unref(r->victim);
  r->arm_ret = cancel_source_cancel_after(r->next, CANCEL_MSEC(5));
  cancel_source_unref(r->self);
}

static void test_timer_callback_reentrancy(void **state) {
  (void)state;
  struct reentrant r;
  memset(&r, 0, sizeof r);
  fire_rec_init(&r.done);
  r.self = new_src("self");
  r.victim = new_src("victim");
  r.next = new_src("next");
  int victim_count = 0;
  cancel_reg reg_self, reg_victim, reg_next;
  assert_int_equal(cancel_register(&reg_self, TOK(r.self), reentrant_cb, &r),
                   0);
  assert_int_equal(
      cancel_register(&reg_victim, TOK(r.victim), test_count_cb, &victim_count),
      0);
  assert_int_equal(cancel_register(&reg_next, TOK(r.next), fire_cb, &r.done),
                   0);
  assert_int_equal(cancel_source_cancel_after(r.victim, CANCEL_SEC(10)), 0);
  assert_int_equal(cancel_source_cancel_after(r.self, CANCEL_MSEC(5)), 0);

  assert_int_equal(test_sem_wait_ns(&r.done.sem, fire_wait(CANCEL_MSEC(10))),
                   0);
  assert_int_equal(r.arm_ret, 0);
  assert_int_equal(cancel_token_kind(TOK(r.next)), CANCEL_TIMEOUT);
  assert_int_equal(cancel_unregister(&reg_self), 0);
  assert_int_equal(cancel_unregister(&reg_victim), 1);
  assert_int_equal(victim_count, 0);
  assert_int_equal(cancel_unregister(&reg_next), 0);
  cancel_source_unref(r.next);
  sem_destroy(&r.done.sem);
}

/* The last unref racing with the timer thread firing the same source: the
 * teardown must not touch the source while the timer thread cancels it,
 * and must not free it under the timer thread (TSan/ASan see it). */
static void test_unref_races_timer_fire(void **state) {
  (void)state;
  enum { ROUNDS = 2000 };
  int fired = 0;
  for (int i = 0; i < ROUNDS; i++) {
    cancel_source *s = new_src("race");
    cancel_reg reg;
    int count = 0;
    int64_t delay = CANCEL_USEC(4 * (i % 50));
    assert_int_equal(cancel_register(&reg, TOK(s), test_count_cb, &count), 0);
    assert_int_equal(cancel_source_cancel_after(s, delay), 0);
    /* Spin (not a synchronisation: aiming at the race window). */
    int64_t until = cancel_now() + delay;
    while (cancel_now() < until) {
    }
    cancel_source_unref(s);
    /* After the last unref the callback has either run or never will. */
    int after_unref = test_load(&count);
    int ret = cancel_unregister(&reg);
    assert_int_equal(test_load(&count), after_unref);
    assert_int_equal(ret, after_unref == 1 ? 0 : 1);
    assert_true(after_unref == 0 || after_unref == 1);
    fired += after_unref;
  }
  print_message("timer won %d of %d races\n", fired, ROUNDS);
}

/* ---- Fork ------------------------------------------------------------- */

/* In a forked child: arm a 20 ms timeout and wait for it.  Only async-signal
 * safe habits here are not required (the child is single-threaded after
 * fork and we test that the library restarts its timer thread), but no
 * cmocka calls: the result is the exit status. */
static int child_timer_check(void) {
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *s = NULL;
  if (cancel_source_new(&s, "child") != 0)
    return 2;
  cancel_reg reg;
  if (cancel_register(&reg, TOK(s), fire_cb, &f) != 0)
    return 3;
  if (cancel_source_cancel_after(s, CANCEL_MSEC(20)) != 0)
    return 4;
  if (test_sem_wait_ns(&f.sem, CANCEL_SEC(2)) != 0)
    return 5;
  if (cancel_token_kind(TOK(s)) != CANCEL_TIMEOUT)
    return 6;
  if (cancel_unregister(&reg) != 0)
    return 7;
  cancel_source_unref(s);
  return 0;
}

#if defined(__SANITIZE_THREAD__)
#define TEST_UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_UNDER_TSAN 1
#endif
#endif

static void test_fork_safety(void **state) {
  (void)state;
#ifdef TEST_UNDER_TSAN
  /* TSan cannot start threads in the child of a multi-threaded fork. */
  print_message("fork test skipped under ThreadSanitizer\n");
  skip();
#endif
  /* Use the timer thread first. */
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *s = new_src("pre-fork");
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(1))), 0);

  /* Fork while the timer thread is busy with pending timers. */
  enum { BUSY = 200, FORKS = 4 };
  cancel_source *busy[BUSY];
  int busy_count = 0;
  cancel_reg busy_reg[BUSY];
  for (int i = 0; i < BUSY; i++) {
    busy[i] = new_src("busy");
    assert_int_equal(
        cancel_register(&busy_reg[i], TOK(busy[i]), test_count_cb, &busy_count),
        0);
    assert_int_equal(
        cancel_source_cancel_after(busy[i], CANCEL_USEC(100 * (i % 100))), 0);
  }

  for (int k = 0; k < FORKS; k++) {
    fflush(NULL);
    pid_t pid = fork();
    assert_true(pid >= 0);
    if (pid == 0)
      _exit(child_timer_check());
    int status = 0;
    assert_int_equal(waitpid(pid, &status, 0), pid);
    assert_true(WIFEXITED(status));
    if (WEXITSTATUS(status) != 0)
      print_error("child failed at step %d\n", WEXITSTATUS(status));
    assert_int_equal(WEXITSTATUS(status), 0);
  }

  /* The parent's timers are unaffected. */
  for (int i = 0; i < BUSY; i++) {
    cancel_source_cancel_at(busy[i], cancel_now() + CANCEL_MSEC(1));
  }
  struct fire_rec g;
  fire_rec_init(&g);
  cancel_source *after = new_src("post-fork");
  cancel_reg reg2;
  assert_int_equal(cancel_register(&reg2, TOK(after), fire_cb, &g), 0);
  assert_int_equal(cancel_source_cancel_after(after, CANCEL_MSEC(20)), 0);
  assert_int_equal(test_sem_wait_ns(&g.sem, fire_wait(CANCEL_MSEC(20))), 0);
  for (int i = 0; i < BUSY; i++) {
    /* Every busy timer fired (deadline <= 21 ms ago) exactly once. */
    assert_int_equal(cancel_unregister(&busy_reg[i]), 0);
    cancel_source_unref(busy[i]);
  }
  assert_int_equal(test_load(&busy_count), BUSY);

  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(cancel_unregister(&reg2), 0);
  cancel_source_unref(s);
  cancel_source_unref(after);
  sem_destroy(&f.sem);
  sem_destroy(&g.sem);
}

/* ---- Timers the kernel cannot be told about (issue 11, items 6, 8) ---- */


/* Lowers the descriptor limit and opens descriptors until there are none
 * left: the next timerfd_create/epoll_create1/eventfd gets EMFILE. */
static int exhaust_fds(void) {
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return -1;
  rl.rlim_cur = 32;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
    return -1;
  while (dup(0) >= 0 || errno == EINTR) {
  }
  return errno == EMFILE ? 0 : -1;
}

static cancel_source *armed_before_fork;

/* In the child: the reactor is not running (fork resets it) and cannot
 * start, so no timeout can be armed.  A failed arm must say so with a
 * documented error and leave no deadline behind: the one before the call,
 * or none. */
static int child_no_descriptors(void) {
  cancel_source *s = NULL, *t = NULL;
  if (cancel_source_new(&s, "budget") != 0)
    return 2;
  if (exhaust_fds() != 0)
    return 3;
  int rc = cancel_source_cancel_after(s, CANCEL_SEC(5));
  if (rc != -EMFILE)
    return 4;
  if (cancel_token_deadline(TOK(s)) != CANCEL_NEVER ||
      cancel_token_remaining(TOK(s)) != CANCEL_NEVER)
    return 5; /* a budget nobody enforces */
  const cancel_token *ps = TOK(s);
  cancel_source *child = NULL;
  if (cancel_source_new_linked(&child, "child", &ps, 1) != 0)
    return 6;
  if (cancel_source_cancel_at(s, cancel_now() + CANCEL_SEC(3)) != -EMFILE)
    return 7;
  if (cancel_token_deadline(TOK(child)) != CANCEL_NEVER)
    return 8;
  if (cancel_source_new_timeout(&t, "t", NULL, CANCEL_SEC(5)) != -EMFILE ||
      t != NULL)
    return 9;
  cancel_source local;
  if (cancel_source_init_timeout(&local, "t", NULL, CANCEL_SEC(5)) != -EMFILE)
    return 10;
  /* Re-arming a source armed before the fork: the failed re-arm leaves its
   * earlier deadline, still queued. */
  int64_t before = cancel_token_deadline(TOK(armed_before_fork));
  if (cancel_source_cancel_at(armed_before_fork,
                              cancel_now() + CANCEL_SEC(1)) != -EMFILE)
    return 11;
  if (cancel_token_deadline(TOK(armed_before_fork)) != before)
    return 12;
  /* Disarming needs no thread and succeeds. */
  if (cancel_source_cancel_at(armed_before_fork, CANCEL_NEVER) != 0 ||
      cancel_token_deadline(TOK(armed_before_fork)) != CANCEL_NEVER)
    return 13;
  /* A passed deadline fires inline, thread or not. */
  if (cancel_source_cancel_at(s, 1) != 0 || !cancel_token_is_cancelled(TOK(s)))
    return 14;
  if (!cancel_token_is_cancelled(TOK(child)))
    return 15;
  cancel_source_unref(child);
  cancel_source_unref(s);
  return 0;
}

static void test_failed_arm_leaves_no_deadline(void **state) {
  (void)state;
  armed_before_fork = new_src("armed");
  assert_int_equal(
      cancel_source_cancel_at(armed_before_fork, cancel_now() + CANCEL_SEC(60)),
      0);
  assert_true(test_others_asleep(test_tol(CANCEL_SEC(2))));
  int rc = test_in_child(child_no_descriptors, test_tol(CANCEL_SEC(10)));
  if (rc != 0)
    print_error("child failed at step %d\n", rc);
  assert_int_equal(rc, 0);
  cancel_source_unref(armed_before_fork);
}

struct timed {
  cancel_source *s;
  cancel_reg reg;
  struct fire_rec f;
  int64_t at;
};

static void timed_arm(struct timed *t, const char *name, int64_t in) {
  fire_rec_init(&t->f);
  t->s = new_src(name);
  assert_int_equal(cancel_register(&t->reg, TOK(t->s), fire_cb, &t->f), 0);
  t->at = cancel_now() + in;
  assert_int_equal(cancel_source_cancel_at(t->s, t->at), 0);
}

/* Waits for t's timer; returns how late it fired, or -1 if it did not
 * fire within a generous bound (then it is cancelled by hand, so that
 * nothing is left running). */
static int64_t timed_end(struct timed *t) {
  int64_t late = -1;
  if (test_sem_wait_ns(&t->f.sem, fire_wait(t->at - cancel_now())) == 0)
    late = t->f.at - t->at;
  else
    cancel_source_cancel(t->s);
  cancel_unregister(&t->reg);
  cancel_source_unref(t->s);
  sem_destroy(&t->f.sem);
  return late;
}

static void check_on_time(const char *what, int64_t late) {
  if (late < 0)
    print_error("%s: never fired\n", what);
  else
    print_message("%s: %" PRId64 " us late\n", what, late / 1000);
  assert_i64_ge(late, 0);
  /* The fallback rounds up to whole milliseconds. */
  assert_i64_lt(late, late_tol() + CANCEL_MSEC(1));
}

static void test_timerfd_settime_failure(void **state) {
  (void)state;
  /* The reactor is up and idle. */
  struct timed warm;
  timed_arm(&warm, "warm", CANCEL_MSEC(1));
  assert_i64_ge(timed_end(&warm), 0);

  /* Every timerfd_settime fails: the reactor falls back on epoll_wait's
   * own timeout, and an earlier timer armed while it sleeps wakes it. */
  __atomic_store_n(&settime_failed, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&settime_fail, -1, __ATOMIC_SEQ_CST);
  struct timed a, b;
  timed_arm(&a, "a", CANCEL_MSEC(120));
  timed_arm(&b, "b", CANCEL_MSEC(60));
  int64_t late_b = timed_end(&b);
  int64_t late_a = timed_end(&a);
  __atomic_store_n(&settime_fail, 0, __ATOMIC_SEQ_CST);
  assert_true(__atomic_load_n(&settime_failed, __ATOMIC_SEQ_CST) > 0);
  check_on_time("b (timerfd broken)", late_b);
  check_on_time("a (timerfd broken)", late_a);

  /* One failure while a far timer is programmed: the next timer must not
   * wait for the far one. */
  struct timed far, near;
  timed_arm(&far, "far", CANCEL_SEC(30));
  __atomic_store_n(&settime_failed, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&settime_fail, 1, __ATOMIC_SEQ_CST);
  timed_arm(&near, "near", CANCEL_MSEC(50));
  int64_t late_near = timed_end(&near);
  __atomic_store_n(&settime_fail, 0, __ATOMIC_SEQ_CST);
  assert_int_equal(__atomic_load_n(&settime_failed, __ATOMIC_SEQ_CST), 1);
  check_on_time("near (one failure)", late_near);
  assert_int_equal(cancel_source_cancel(far.s), 1); /* done with it */
  (void)timed_end(&far);

  /* And later timeouts still fire on time. */
  struct timed after;
  timed_arm(&after, "after", CANCEL_MSEC(40));
  check_on_time("after recovery", timed_end(&after));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_timeout_fires_within_tolerance),
      cmocka_unit_test(test_timeout_details),
      cmocka_unit_test(test_cancel_at_past_fires_inline),
      cmocka_unit_test(test_never_disarms),
      cmocka_unit_test(test_rearm_earlier),
      cmocka_unit_test(test_rearm_later),
      cmocka_unit_test(test_noop_once_cancelled),
      cmocka_unit_test(test_invalid_arguments),
      cmocka_unit_test(test_many_timers_fire_in_order),
      cmocka_unit_test(test_disposed_timers_never_fire),
      cmocka_unit_test(test_timeout_source_parent_wins),
      cmocka_unit_test(test_timeout_source_fires),
      cmocka_unit_test(test_timeout_source_cancelled_parent),
      cmocka_unit_test(test_timers_share_one_thread),
      cmocka_unit_test(test_timer_callback_reentrancy),
      cmocka_unit_test(test_unref_races_timer_fire),
      cmocka_unit_test(test_fork_safety),
      cmocka_unit_test(test_failed_arm_leaves_no_deadline),
      cmocka_unit_test(test_timerfd_settime_failure),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
