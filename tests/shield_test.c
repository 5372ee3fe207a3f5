/*
 * Shields: the point of no return.  Grace 0 (never follows outer), bounded
 * grace (follows after grace_ns, with outer's reason and a "grace ...
 * expired" hop), shields on cancelled outers, early destruction, the open
 * shield count, deadlines and argument checks.
 */
#include "test_util.h"

#include <signal.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <unistd.h>

static int64_t fire_wait(int64_t ns) {
  return ns + test_tol(CANCEL_SEC(5));
}
static int64_t late_tol(void) {
  return test_tol(CANCEL_MSEC(50));
}

static cancel_source *new_shield(const char *name, const cancel_token *outer,
                                 int64_t grace) {
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_shield(&s, name, outer, grace), 0);
  assert_non_null(s);
  return s;
}

static void test_grace_zero_never_follows(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *outer = new_src("outer");
  cancel_source *sh = new_shield("commit", TOK(outer), 0);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);

  assert_int_equal(cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, NULL), 1);
  assert_false(cancel_token_is_cancelled(TOK(sh)));
  /* Asserting that nothing happens: a bounded wait is the test. */
  assert_int_equal(test_sem_wait_ns(&f.sem, CANCEL_MSEC(50)), -1);
  assert_false(cancel_token_is_cancelled(TOK(sh)));
  assert_int_equal(cancel_token_check(TOK(sh)), 0);
  assert_i64_eq(cancel_token_deadline(TOK(sh)), CANCEL_NEVER);

  /* Still cancellable directly. */
  assert_int_equal(cancel_source_cancel(sh), 1);
  assert_int_equal(test_load(&f.count), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_int_equal(r.kind, CANCEL_REQUESTED);
  assert_string_equal(r.origin, "commit");
  assert_int_equal(r.via_len, 0);

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh);
  cancel_source_unref(outer);
  sem_destroy(&f.sem);
}

static void check_grace_reason(const cancel_token *tok, const char *origin,
                               const char *detail, const char *shield_name) {
  cancel_reason r;
  assert_int_equal(cancel_token_reason(tok, &r), 1);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, origin);
  assert_string_equal(r.detail, detail);
  assert_true(r.via_len >= 1);
  const cancel_hop *last = &r.via[r.via_len - 1];
  assert_string_equal(last->name, shield_name);
  assert_non_null(last->note);
  assert_non_null(strstr(last->note, "grace"));
  assert_non_null(strstr(last->note, "expired"));
  assert_non_null(strstr(last->note, "30ms"));
  char buf[256];
  int n = cancel_reason_format(&r, buf, sizeof buf);
  assert_true(n > 0 && (size_t)n < sizeof buf);
  assert_non_null(strstr(buf, shield_name));
  assert_non_null(strstr(buf, "grace"));
}

static void test_bounded_grace(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *outer = new_src("host");
  cancel_source *sh = new_shield("commit", TOK(outer), CANCEL_MSEC(30));
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);

  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, "SIGTERM"),
                   1);
  int64_t t1 = cancel_now();
  assert_not_fired_before(TOK(sh), t0, CANCEL_MSEC(30)); /* grace began */

  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(30))), 0);
  assert_int_equal(test_load(&f.count), 1);
  assert_i64_ge(f.at, t0 + CANCEL_MSEC(30));
  assert_i64_le(f.at, t1 + CANCEL_MSEC(30) + late_tol());
  assert_false(pthread_equal(f.tid, pthread_self()));
  check_grace_reason(TOK(sh), "host", "SIGTERM", "commit");

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_int_equal(r.via_len, 1);
  cancel_reason ro;
  assert_int_equal(cancel_token_reason(TOK(outer), &ro), 1);
  assert_i64_eq(r.time, ro.time); /* when the origin fired */

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh);
  cancel_source_unref(outer);
  sem_destroy(&f.sem);
}

static void test_shield_on_cancelled_outer(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *outer = new_src("host");
  assert_int_equal(cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, "SIGINT"),
                   1);
  cancel_reason ro;
  assert_int_equal(cancel_token_reason(TOK(outer), &ro), 1);

  cancel_source sh; /* caller storage */
  int64_t t_init = cancel_now();
  assert_int_equal(
      cancel_source_init_shield(&sh, "cleanup", TOK(outer), CANCEL_MSEC(30)),
      0);
  int64_t t1 = cancel_now();
  /* Unlike a linked source, not cancelled at once: the grace starts. */
  assert_not_fired_before(TOK(&sh), t_init, CANCEL_MSEC(30));
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(&sh), fire_cb, &f), 0);

  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(30))), 0);
  assert_i64_ge(f.at, ro.time + CANCEL_MSEC(30));
  assert_i64_le(f.at, t1 + CANCEL_MSEC(30) + late_tol());
  check_grace_reason(TOK(&sh), "host", "SIGINT", "cleanup");

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_destroy(&sh);
  cancel_source_unref(outer);
  sem_destroy(&f.sem);
}

static void test_grace_through_linked_outer(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *root = new_src("root");
  const cancel_token *pr[] = {TOK(root)};
  cancel_source *req = NULL;
  assert_int_equal(cancel_source_new_linked(&req, "req", pr, 1), 0);
  cancel_source *sh = new_shield("tx", TOK(req), CANCEL_MSEC(30));
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);

  /* The shield keeps its heap outer alive. */
  cancel_source_unref(req);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_with(root, CANCEL_SHUTDOWN, "stop"), 1);
  assert_not_fired_before(TOK(sh), t0, CANCEL_MSEC(30));
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(30))), 0);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "root");
  assert_string_equal(r.detail, "stop");
  assert_int_equal(r.via_len, 2);
  assert_string_equal(r.via[0].name, "req");
  assert_null(r.via[0].note);
  assert_string_equal(r.via[1].name, "tx");
  assert_non_null(r.via[1].note);
  assert_non_null(strstr(r.via[1].note, "grace"));

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh); /* frees the shield and req */
  cancel_source_unref(root);
  sem_destroy(&f.sem);
}

static void test_direct_cancel_during_grace(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *outer = new_src("outer");
  cancel_source *sh = new_shield("sh", TOK(outer), CANCEL_MSEC(30));
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, NULL), 1);
  assert_int_equal(cancel_source_cancel_with(sh, CANCEL_USER + 1, "done"), 1);
  assert_int_equal(test_load(&f.count), 1);
  /* Past the grace: the expiry must not fire again or rewrite the reason. */
  assert_int_equal(test_sem_wait_ns(&f.sem, 0), 0); /* our own post */
  assert_int_equal(test_sem_wait_ns(&f.sem, CANCEL_MSEC(30) + late_tol()), -1);
  assert_int_equal(test_load(&f.count), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_int_equal(r.kind, CANCEL_USER + 1);
  assert_string_equal(r.origin, "sh");
  assert_int_equal(r.via_len, 0);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh);
  cancel_source_unref(outer);
  sem_destroy(&f.sem);
}

static void test_shield_destroyed_during_grace(void **state) {
  (void)state;
  int count = 0, lcount = 0;
  cancel_source *outer = new_src("outer");
  cancel_source *sh = new_shield("heap-sh", TOK(outer), CANCEL_MSEC(30));
  cancel_source local;
  assert_int_equal(cancel_source_init_shield(&local, "local-sh", TOK(outer),
                                             CANCEL_MSEC(30)),
                   0);
  cancel_reg reg, lreg;
  assert_int_equal(cancel_register(&reg, TOK(sh), test_count_cb, &count), 0);
  assert_int_equal(cancel_register(&lreg, TOK(&local), test_count_cb, &lcount),
                   0);

  assert_int_equal(cancel_source_cancel(outer), 1);
  cancel_source_unref(sh);
  cancel_source_destroy(&local);
  memset(&local, 0xAB, sizeof local); /* storage reused at once */

  /* Past the grace: nothing fires, nothing touches freed memory (ASan). */
  test_sleep_ns(CANCEL_MSEC(30) + late_tol());
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(test_load(&lcount), 0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_unregister(&lreg), 1);
  cancel_source_unref(outer);
}

/* A shield's own timeout and its grace share one timer slot: whichever
 * comes first wins, and the reason says which (an own timeout armed on a
 * shield must not disturb a grace timer already running, and back). */
static void test_own_timeout_and_grace(void **state) {
  (void)state;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *outer = new_src("host");
  cancel_source *sh = new_shield("commit", TOK(outer), CANCEL_SEC(60));
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);
  /* Grace starts (60 s), then the shield's own 20 ms timeout is armed. */
  assert_int_equal(cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, NULL), 1);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(sh, CANCEL_MSEC(20)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(20))), 0);
  assert_i64_ge(f.at, t0 + CANCEL_MSEC(20));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "commit");
  assert_string_equal(r.detail, "20ms");
  assert_int_equal(r.via_len, 0);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh);

  /* The other way round: own timeout first (60 s), then a 20 ms grace. */
  cancel_source_unref(outer);
  outer = new_src("host2");
  sh = new_shield("commit2", TOK(outer), CANCEL_MSEC(20));
  assert_int_equal(cancel_source_cancel_after(sh, CANCEL_SEC(60)), 0);
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, NULL), 1);
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(20))), 0);
  assert_int_equal(cancel_token_kind(TOK(sh)), CANCEL_SHUTDOWN);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh);
  cancel_source_unref(outer);
  sem_destroy(&f.sem);
}

static void test_shields_open_count(void **state) {
  (void)state;
  size_t n0 = cancel_shields_open();
  cancel_source *outer = new_src("outer");
  cancel_source *a = new_shield("a", TOK(outer), 0);
  assert_int_equal(cancel_shields_open(), n0 + 1);
  cancel_source b;
  assert_int_equal(
      cancel_source_init_shield(&b, "b", TOK(outer), CANCEL_MSEC(10)), 0);
  assert_int_equal(cancel_shields_open(), n0 + 2);
  cancel_source *c = new_shield("c", NULL, 0);
  assert_int_equal(cancel_shields_open(), n0 + 3);

  /* Ordinary and linked sources are not shields. */
  cancel_source *plain = new_src("plain");
  assert_int_equal(cancel_shields_open(), n0 + 3);

  /* A failed creation changes nothing. */
  cancel_source *bad = NULL;
  assert_int_equal(cancel_source_new_shield(&bad, "bad", TOK(outer), -1),
                   -EINVAL);
  assert_int_equal(cancel_shields_open(), n0 + 3);

  /* Cancelled shields are still open until destroyed. */
  assert_int_equal(cancel_source_cancel(a), 1);
  assert_int_equal(cancel_shields_open(), n0 + 3);
  cancel_source_unref(a);
  assert_int_equal(cancel_shields_open(), n0 + 2);
  cancel_source_destroy(&b);
  assert_int_equal(cancel_shields_open(), n0 + 1);
  cancel_source_unref(c);
  assert_int_equal(cancel_shields_open(), n0);
  cancel_source_unref(plain);
  cancel_source_unref(outer);
}

static void test_invalid_arguments(void **state) {
  (void)state;
  cancel_source *outer = new_src("outer");
  cancel_source *s = NULL;
  cancel_source local;
  assert_int_equal(cancel_source_new_shield(&s, "x", TOK(outer), -1), -EINVAL);
  assert_int_equal(cancel_source_new_shield(&s, "x", TOK(outer), INT64_MIN),
                   -EINVAL);
  assert_int_equal(cancel_source_init_shield(&local, "x", TOK(outer), -1),
                   -EINVAL);
  assert_int_equal(cancel_source_new_shield(NULL, "x", TOK(outer), 0), -EINVAL);
  assert_int_equal(cancel_source_init_shield(NULL, "x", TOK(outer), 0),
                   -EINVAL);
  /* The rejected calls did not hook anything on outer. */
  assert_int_equal(cancel_source_cancel(outer), 1);
  cancel_source_unref(outer);
}

static void test_shield_deadline_is_its_own(void **state) {
  (void)state;
  cancel_source *outer = new_src("outer");
  assert_int_equal(cancel_source_cancel_after(outer, CANCEL_SEC(10)), 0);
  assert_i64_ne(cancel_token_deadline(TOK(outer)), CANCEL_NEVER);
  cancel_source *sh = new_shield("sh", TOK(outer), CANCEL_MSEC(500));
  assert_i64_eq(cancel_token_deadline(TOK(sh)), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(TOK(sh)), CANCEL_NEVER);

  int64_t at = cancel_now() + CANCEL_SEC(20);
  assert_int_equal(cancel_source_cancel_at(sh, at), 0);
  assert_i64_eq(cancel_token_deadline(TOK(sh)), at);

  /* Its own timer fires even while outer is live. */
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(sh), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(sh, CANCEL_MSEC(10)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, fire_wait(CANCEL_MSEC(10))), 0);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(sh), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "sh");
  assert_false(cancel_token_is_cancelled(TOK(outer)));

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(sh);
  cancel_source_unref(outer);
  sem_destroy(&f.sem);
}

static void test_shield_null_outer(void **state) {
  (void)state;
  cancel_source *sh = new_shield("lonely", NULL, CANCEL_MSEC(10));
  assert_false(cancel_token_is_cancelled(TOK(sh)));
  assert_i64_eq(cancel_token_deadline(TOK(sh)), CANCEL_NEVER);
  assert_int_equal(cancel_source_cancel(sh), 1);
  cancel_source_unref(sh);
}

/* ---- A grace timer that cannot be armed (issue 11, item 5) ------------ */


/* In the child the reactor is not running (fork resets it), and with the
 * descriptors used up it cannot start: the grace timer cannot be armed,
 * so the shield must end its grace at once instead of never. */
static int child_unarmable_grace(void) {
  cancel_source *outer = NULL, *sh = NULL;
  if (cancel_source_new(&outer, "outer") != 0 ||
      cancel_source_new_shield(&sh, "commit", TOK(outer), CANCEL_SEC(10)) != 0)
    return 2;
  struct rlimit rl;
  if (getrlimit(RLIMIT_NOFILE, &rl) != 0)
    return 3;
  rl.rlim_cur = 32;
  if (setrlimit(RLIMIT_NOFILE, &rl) != 0)
    return 3;
  while (dup(0) >= 0) {
  }
  if (cancel_source_cancel_with(outer, CANCEL_SHUTDOWN, "stop") != 1)
    return 4;
  if (!cancel_token_is_cancelled(TOK(sh)))
    return 5; /* never, in the old code */
  cancel_reason r;
  if (cancel_token_reason(TOK(sh), &r) != 1 || r.kind != CANCEL_SHUTDOWN ||
      strcmp(r.origin, "outer") != 0 || r.via_len != 1 ||
      strcmp(r.via[0].name, "commit") != 0 || r.via[0].note == NULL ||
      strstr(r.via[0].note, "grace 10s") == NULL)
    return 6;
  /* Its deadline says what happened: the grace ended now, not in 10 s. */
  if (cancel_token_remaining(TOK(sh)) != 0)
    return 7;
  cancel_source_unref(sh);
  cancel_source_unref(outer);
  return 0;
}

static void test_unarmable_grace_ends_at_once(void **state) {
  (void)state;
  assert_true(test_others_asleep(test_tol(CANCEL_SEC(2))));
  int rc = test_in_child(child_unarmable_grace, test_tol(CANCEL_SEC(10)));
  if (rc != 0)
    print_error("child failed at step %d\n", rc);
  assert_int_equal(rc, 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_grace_zero_never_follows),
      cmocka_unit_test(test_bounded_grace),
      cmocka_unit_test(test_shield_on_cancelled_outer),
      cmocka_unit_test(test_grace_through_linked_outer),
      cmocka_unit_test(test_direct_cancel_during_grace),
      cmocka_unit_test(test_shield_destroyed_during_grace),
      cmocka_unit_test(test_own_timeout_and_grace),
      cmocka_unit_test(test_shields_open_count),
      cmocka_unit_test(test_invalid_arguments),
      cmocka_unit_test(test_shield_deadline_is_its_own),
      cmocka_unit_test(test_shield_null_outer),
      cmocka_unit_test(test_unarmable_grace_ends_at_once),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
