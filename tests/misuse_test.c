/*
 * Misuse: bad input gets a clear error (or the documented no-op) and
 * nothing crashes, leaks or corrupts memory (run under ASan/valgrind).
 */
#include "test_util.h"

/* Every function that requires a source (or an out pointer) rejects NULL. */
static void test_null_sources(void **state) {
  (void)state;
  cancel_source *live = new_src("live");
  const cancel_token *ps[] = {TOK(live)};
  cancel_source *out = NULL;

  assert_int_equal(cancel_source_new(NULL, "x"), -EINVAL);
  assert_int_equal(cancel_source_init(NULL, "x"), -EINVAL);
  assert_null(cancel_source_ref(NULL));
  cancel_source_unref(NULL);   /* documented no-op */
  cancel_source_destroy(NULL); /* documented no-op */
  assert_int_equal(cancel_source_cancel(NULL), -EINVAL);
  assert_int_equal(cancel_source_cancel_with(NULL, CANCEL_REQUESTED, NULL),
                   -EINVAL);
  assert_int_equal(cancel_source_cancel_at(NULL, 0), -EINVAL);
  assert_int_equal(cancel_source_cancel_at(NULL, CANCEL_NEVER), -EINVAL);
  assert_int_equal(cancel_source_cancel_after(NULL, 0), -EINVAL);

  assert_int_equal(cancel_source_new_linked(NULL, "x", ps, 1), -EINVAL);
  assert_int_equal(cancel_source_init_linked(NULL, "x", ps, 1), -EINVAL);
  assert_int_equal(cancel_source_new_linked(&out, "x", NULL, 3), -EINVAL);
  cancel_source local;
  assert_int_equal(cancel_source_init_linked(&local, "x", NULL, 2), -EINVAL);

  assert_int_equal(cancel_source_new_timeout(NULL, "x", ps[0], CANCEL_SEC(1)),
                   -EINVAL);
  assert_int_equal(cancel_source_init_timeout(NULL, "x", ps[0], CANCEL_SEC(1)),
                   -EINVAL);
  assert_int_equal(cancel_source_new_shield(NULL, "x", ps[0], 0), -EINVAL);
  assert_int_equal(cancel_source_init_shield(NULL, "x", ps[0], 0), -EINVAL);

  /* NULL token: "never cancelled" everywhere. */
  cancel_reason r;
  assert_false(cancel_token_is_cancelled(NULL));
  assert_int_equal(cancel_token_check(NULL), 0);
  assert_int_equal(cancel_token_kind(NULL), CANCEL_NONE);
  assert_int_equal(cancel_token_reason(NULL, &r), 0);
  assert_int_equal(r.kind, CANCEL_NONE);
  assert_i64_eq(cancel_token_deadline(NULL), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(NULL), CANCEL_NEVER);

  /* Out pointers. */
  assert_int_equal(cancel_token_reason(TOK(live), NULL), -EINVAL);
  assert_int_equal(cancel_token_reason(NULL, NULL), -EINVAL);
  assert_int_equal(cancel_reason_format(NULL, NULL, 0), -EINVAL);
  char buf[8];
  assert_int_equal(cancel_reason_format(NULL, buf, sizeof buf), -EINVAL);
  assert_int_equal(cancel_source_cancel(live), 1);
  assert_int_equal(cancel_token_reason(TOK(live), &r), 1);
  assert_int_equal(cancel_reason_format(&r, NULL, 1), -EINVAL);
  assert_int_equal(cancel_reason_format(&r, NULL, 100), -EINVAL);

  /* Registrations. */
  int count = 0;
  cancel_reg reg;
  assert_int_equal(cancel_register(NULL, TOK(live), test_count_cb, &count),
                   -EINVAL);
  assert_int_equal(cancel_register(&reg, TOK(live), NULL, &count), -EINVAL);
  assert_int_equal(cancel_unregister(NULL), -EINVAL);
  assert_int_equal(test_load(&count), 0); /* nothing ran */

  cancel_source_unref(live);
}

static void test_negative_durations(void **state) {
  (void)state;
  cancel_source *s = new_src("neg");
  cancel_source *out = NULL;
  cancel_source local;
  static const int64_t bad[] = {-1, -CANCEL_SEC(1), INT64_MIN};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_equal(cancel_source_cancel_after(s, bad[i]), -EINVAL);
    assert_int_equal(cancel_source_new_timeout(&out, "t", NULL, bad[i]),
                     -EINVAL);
    assert_int_equal(cancel_source_init_timeout(&local, "t", TOK(s), bad[i]),
                     -EINVAL);
    assert_int_equal(cancel_source_new_shield(&out, "sh", TOK(s), bad[i]),
                     -EINVAL);
    assert_int_equal(cancel_source_init_shield(&local, "sh", TOK(s), bad[i]),
                     -EINVAL);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
  /* The rejected children did not hook onto s: cancelling it is clean. */
  assert_int_equal(cancel_source_cancel(s), 1);
  cancel_source_unref(s);
}

/* A huge (valid) timeout must not wrap around into the past. */
static void test_huge_timeout_does_not_overflow(void **state) {
  (void)state;
  cancel_source *s = new_src("huge");
  assert_int_equal(cancel_source_cancel_after(s, INT64_MAX), 0);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_i64_gt(cancel_token_deadline(TOK(s)), cancel_now() + CANCEL_SEC(3600));
  assert_i64_gt(cancel_token_remaining(TOK(s)), CANCEL_SEC(3600));
  cancel_source_unref(s);

  cancel_source *t = NULL;
  assert_int_equal(cancel_source_new_timeout(&t, "huge-t", NULL, INT64_MAX - 1),
                   0);
  assert_false(cancel_token_is_cancelled(TOK(t)));
  cancel_source_unref(t);

  /* And a deadline far in the past fires at once, not "never". */
  cancel_source *p = new_src("past");
  assert_int_equal(cancel_source_cancel_at(p, INT64_MIN), 0);
  assert_true(cancel_token_is_cancelled(TOK(p)));
  assert_int_equal(cancel_token_kind(TOK(p)), CANCEL_TIMEOUT);
  cancel_source_unref(p);
}

static void test_bad_kinds(void **state) {
  (void)state;
  cancel_source *s = new_src("k");
  static const int bad[] = {5, 50, 99, -1, INT32_MIN};
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_equal(cancel_source_cancel_with(s, bad[i], "x"), -EINVAL);
    assert_non_null(cancel_kind_name(bad[i]));
    assert_string_equal(cancel_kind_name(bad[i]), "invalid");
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_strerror_extremes(void **state) {
  (void)state;
  assert_non_null(cancel_strerror(INT32_MIN)); /* -INT_MIN overflows */
  assert_non_null(cancel_strerror(INT32_MAX));
  assert_non_null(cancel_strerror(0));
  assert_non_null(cancel_strerror(-4095));
}

static void test_unregister_misuse(void **state) {
  (void)state;
  cancel_source *s = new_src("u");
  int count = 0;
  cancel_reg reg;

  /* Twice. */
  assert_int_equal(cancel_register(&reg, TOK(s), test_count_cb, &count), 0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);

  /* After register said 1 (ran inline): 0 like any callback that ran,
   * then misuse. */
  assert_int_equal(cancel_source_cancel(s), 1);
  assert_int_equal(cancel_register(&reg, TOK(s), test_count_cb, &count), 1);
  assert_int_equal(test_load(&count), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);

  /* Never registered (zeroed storage). */
  cancel_reg zero;
  memset(&zero, 0, sizeof zero);
  assert_int_equal(cancel_unregister(&zero), -EINVAL);

  /* After a detaching destroy: 1 once, then misuse. */
  cancel_source *d = new_src("d");
  assert_int_equal(cancel_register(&reg, TOK(d), test_count_cb, &count), 0);
  cancel_source_unref(d);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);
  assert_int_equal(test_load(&count), 1);
  cancel_source_unref(s);
}

/* Destroying a heap source that still has registrations, children and a
 * shield: registrations are detached, the children keep it alive (and are
 * NOT cancelled by the teardown), and it can still reach them through its
 * own parent. */
static void test_destroy_heap_with_everything_attached(void **state) {
  (void)state;
  cancel_source *root = new_src("root");
  const cancel_token *pr[] = {TOK(root)};
  cancel_source *mid = NULL;
  assert_int_equal(cancel_source_new_linked(&mid, "mid", pr, 1), 0);
  const cancel_token *pm[] = {TOK(mid)};
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", pm, 1), 0);
  cancel_source *sh = NULL;
  assert_int_equal(cancel_source_new_shield(&sh, "sh", TOK(mid), 0), 0);

  int mid_count = 0, child_count = 0;
  cancel_reg mreg[3], creg;
  for (int i = 0; i < 3; i++)
    assert_int_equal(
        cancel_register(&mreg[i], TOK(mid), test_count_cb, &mid_count), 0);
  assert_int_equal(
      cancel_register(&creg, TOK(child), test_count_cb, &child_count), 0);

  cancel_source_unref(mid); /* last reference; children keep it */
  for (int i = 0; i < 3; i++)
    assert_int_equal(cancel_unregister(&mreg[i]), 1);
  assert_false(cancel_token_is_cancelled(TOK(child)));
  assert_false(cancel_token_is_cancelled(TOK(sh)));

  assert_int_equal(cancel_source_cancel(root), 1);
  assert_true(cancel_token_is_cancelled(TOK(child)));
  assert_false(cancel_token_is_cancelled(TOK(sh))); /* grace 0 */
  assert_int_equal(test_load(&mid_count), 0);
  assert_int_equal(test_load(&child_count), 1);
  assert_int_equal(cancel_unregister(&creg), 0);

  cancel_source_unref(child);
  cancel_source_unref(sh); /* the last holder of mid */
  cancel_source_unref(root);
}

/* The same with caller storage: children and shields are detached. */
static void test_destroy_storage_with_everything_attached(void **state) {
  (void)state;
  cancel_source *root = new_src("root");
  const cancel_token *pr[] = {TOK(root)};
  cancel_source mid;
  assert_int_equal(cancel_source_init_linked(&mid, "mid", pr, 1), 0);
  const cancel_token *pm[] = {TOK(&mid)};
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", pm, 1), 0);
  cancel_source *sh = NULL;
  assert_int_equal(
      cancel_source_new_shield(&sh, "sh", TOK(&mid), CANCEL_MSEC(1)), 0);
  /* Its timer must be disarmed by the destroy (it would fire on storage
   * we scribble over).  Long enough not to fire before the destroy on a
   * slow machine (TSan). */
  const int64_t timer = test_tol(CANCEL_MSEC(50));
  assert_int_equal(cancel_source_cancel_after(&mid, timer), 0);

  int count = 0;
  cancel_reg mreg, creg, sreg;
  assert_int_equal(cancel_register(&mreg, TOK(&mid), test_count_cb, &count), 0);
  assert_int_equal(cancel_register(&creg, TOK(child), test_count_cb, &count),
                   0);
  assert_int_equal(cancel_register(&sreg, TOK(sh), test_count_cb, &count), 0);

  cancel_source_destroy(&mid);
  memset(&mid, 0x99, sizeof mid);
  assert_int_equal(cancel_unregister(&mreg), 1);
  assert_false(cancel_token_is_cancelled(TOK(child)));
  assert_false(cancel_token_is_cancelled(TOK(sh)));

  assert_int_equal(cancel_source_cancel(root), 1);
  test_sleep_ns(timer + test_tol(CANCEL_MSEC(20)));
  assert_false(cancel_token_is_cancelled(TOK(child)));
  assert_false(cancel_token_is_cancelled(TOK(sh)));
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(cancel_unregister(&creg), 1);
  assert_int_equal(cancel_unregister(&sreg), 1);
  cancel_source_unref(sh);
  cancel_source_unref(child);
  cancel_source_unref(root);
}

/* A callback drops the last reference to the source that is running it
 * while older registrations are still pending: whatever the library does
 * with them, each unregister result must agree with whether it ran. */
struct dropper {
  cancel_source *src;
};

static void drop_cb(void *arg) {
  struct dropper *d = arg;
  cancel_source_unref(d->src);
}

static void test_unref_from_callback_with_pending(void **state) {
  (void)state;
  enum { N = 4 };
  struct dropper d;
  d.src = new_src("drop");
  int counts[N] = {0};
  cancel_reg regs[N], dreg;
  for (int i = 0; i < N; i++)
    assert_int_equal(
        cancel_register(&regs[i], TOK(d.src), test_count_cb, &counts[i]), 0);
  assert_int_equal(cancel_register(&dreg, TOK(d.src), drop_cb, &d), 0);
  assert_int_equal(cancel_source_cancel(d.src), 1); /* frees src */
  assert_int_equal(cancel_unregister(&dreg), 0);
  for (int i = 0; i < N; i++) {
    int c = test_load(&counts[i]);
    assert_true(c == 0 || c == 1);
    assert_int_equal(cancel_unregister(&regs[i]), c == 1 ? 0 : 1);
    assert_int_equal(test_load(&counts[i]), c);
  }
}

/* A shield whose caller-storage outer is destroyed first. */
static void test_shield_outer_destroyed(void **state) {
  (void)state;
  cancel_source outer;
  assert_int_equal(cancel_source_init(&outer, "outer"), 0);
  cancel_source *sh = NULL;
  assert_int_equal(
      cancel_source_new_shield(&sh, "sh", TOK(&outer), CANCEL_MSEC(1)), 0);
  cancel_source_destroy(&outer);
  memset(&outer, 0x42, sizeof outer);
  assert_false(cancel_token_is_cancelled(TOK(sh)));
  assert_int_equal(cancel_source_cancel(sh), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_string_equal(r.origin, "sh");
  cancel_source_unref(sh);
}

/* Names and details at odd lengths and contents. */
static void test_odd_strings(void **state) {
  (void)state;
  cancel_source *s = new_src("");
  assert_string_equal(cancel_source_name(s), "");
  assert_int_equal(cancel_source_cancel_with(s, CANCEL_TIMEOUT, ""), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
  assert_string_equal(r.detail, "");
  char buf[64];
  int n = cancel_reason_format(&r, buf, sizeof buf);
  assert_true(n > 0 && (size_t)n < sizeof buf);
  cancel_source_unref(s);

  /* A detail exactly at and around the inline size. */
  for (size_t len = CANCEL__DETAIL_INLINE - 2; len <= CANCEL__DETAIL_INLINE + 1;
       len++) {
    char d[64];
    memset(d, 'q', len);
    d[len] = '\0';
    s = new_src("d");
    assert_int_equal(cancel_source_cancel_with(s, CANCEL_USER, d), 1);
    assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
    assert_string_equal(r.detail, d);
    cancel_source_unref(s);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_null_sources),
      cmocka_unit_test(test_negative_durations),
      cmocka_unit_test(test_huge_timeout_does_not_overflow),
      cmocka_unit_test(test_bad_kinds),
      cmocka_unit_test(test_strerror_extremes),
      cmocka_unit_test(test_unregister_misuse),
      cmocka_unit_test(test_destroy_heap_with_everything_attached),
      cmocka_unit_test(test_destroy_storage_with_everything_attached),
      cmocka_unit_test(test_unref_from_callback_with_pending),
      cmocka_unit_test(test_shield_outer_destroyed),
      cmocka_unit_test(test_odd_strings),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
