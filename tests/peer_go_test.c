/*
 * Peer scenarios: Go's context package.
 *
 * The scenarios of golang/go's src/context/context_test.go (the XTest*
 * functions that x_test.go runs) that map onto libcancel, written as our
 * own tests.  Each case names the Go test it maps.  The mapping:
 * context.Background is the NULL token, WithCancel a source linked to its
 * parent, WithTimeout / WithDeadline cancel_source_new_timeout or a linked
 * source armed with cancel_source_cancel_at, Done / Err the token check,
 * DeadlineExceeded the CANCEL_TIMEOUT kind, Cause the reason (kind, origin,
 * detail), AfterFunc a registration (stop is cancel_unregister),
 * WithoutCancel a shield with grace 0.
 *
 * Scenarios that do not map, and why:
 *   - TestValues, TestWithValueChecksKey, value lookups through the tree:
 *     libcancel carries cancellation only, no request-scoped values.
 *   - TestAllocs: Go counts allocations per constructor; libcancel's
 *     budget (a registration never allocates, a source is one malloc or
 *     none) is the subject of the benchmarks, not of a peer scenario.
 *   - TestCustomContextPropagation, the custom Context implementations and
 *     the goroutine-count checks (TestCancelRemoves's goroutine part): a
 *     C source has one implementation and links never start a thread.
 *   - TestInvalidDerivedFail (a nil parent panics): a NULL parent is the
 *     "never cancelled" token, which is valid here.
 *   - The String() formats of contexts: the reason formatting has its own
 *     tests (reason_test.c).
 *   - AfterFunc's own goroutine: a libcancel callback runs on the
 *     cancelling thread (inline when already cancelled), by design.
 */
#include "test_util.h"

#include "internal.h" /* the parent's registration list, to see removals */

static cancel_source *linked1(const char *name, cancel_source *parent) {
  const cancel_token *ps[] = {TOK(parent)};
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_linked(&s, name, ps, 1), 0);
  return s;
}

static void *cancel_thread_fn(void *arg) {
  cancel_source_cancel(arg);
  return NULL;
}

/* XTestBackground, XTestTODO: the root is never cancelled and has no
 * deadline. */
static void test_background(void **state) {
  (void)state;
  assert_false(cancel_token_is_cancelled(NULL));
  assert_int_equal(cancel_token_check(NULL), 0);
  assert_i64_eq(cancel_token_deadline(NULL), CANCEL_NEVER);
  assert_int_equal(cancel_token_kind(NULL), CANCEL_NONE);
}

/* XTestWithCancel: a parent with two children; cancelling the parent
 * cancels all three with the parent's reason. */
static void test_with_cancel(void **state) {
  (void)state;
  cancel_source *c1 = new_src("c1");
  cancel_source *o = linked1("o", c1);
  cancel_source *c2 = linked1("c2", o);
  cancel_source *c3 = linked1("c3", o);
  assert_false(cancel_token_is_cancelled(TOK(c2)));
  assert_int_equal(cancel_source_cancel(c1), 1);
  cancel_source *all[] = {c1, o, c2, c3};
  for (int i = 0; i < 4; i++) {
    assert_int_equal(cancel_token_check(TOK(all[i])), -ECANCELED);
    assert_int_equal(cancel_token_kind(TOK(all[i])), CANCEL_REQUESTED);
  }
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c3), &r), 1);
  assert_string_equal(r.origin, "c1");
  cancel_source_unref(c3);
  cancel_source_unref(c2);
  cancel_source_unref(o);
  cancel_source_unref(c1);
}

/* XTestParentFinishesChild: cancelling the parent cancels the children,
 * which then leave the parent; the children's reason names the path. */
static void test_parent_finishes_child(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  cancel_source *cancel_child = linked1("cancelChild", parent);
  cancel_source *timer_child = NULL;
  assert_int_equal(cancel_source_new_timeout(&timer_child, "timerChild",
                                             TOK(parent), CANCEL_SEC(3600)),
                   0);
  assert_non_null(parent->children);
  cancel_source_cancel(parent);
  assert_true(cancel_token_is_cancelled(TOK(cancel_child)));
  assert_true(cancel_token_is_cancelled(TOK(timer_child)));
  assert_int_equal(cancel_token_kind(TOK(timer_child)), CANCEL_REQUESTED);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(cancel_child), &r), 1);
  assert_string_equal(r.origin, "parent");
  assert_int_equal(r.via_len, 1);
  assert_string_equal(r.via[0].name, "cancelChild");
  cancel_source_unref(cancel_child);
  cancel_source_unref(timer_child);
  assert_null(parent->children); /* both children left */
  cancel_source_unref(parent);
}

/* XTestChildFinishesFirst: cancelling a child leaves the parent alone; the
 * child removes itself from the parent when it goes. */
static void test_child_finishes_first(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  cancel_source *child = linked1("child", parent);
  assert_non_null(parent->head); /* the link's registration */
  assert_int_equal(cancel_source_cancel(child), 1);
  assert_false(cancel_token_is_cancelled(TOK(parent)));
  cancel_source_unref(child);
  assert_null(parent->head);
  assert_null(parent->children);
  assert_int_equal(cancel_source_cancel(parent), 1);
  cancel_source_unref(parent);
}

/* XTestCancelRemoves: a child and an AfterFunc leave the parent's lists
 * when they are cancelled or stopped. */
static void test_cancel_removes(void **state) {
  (void)state;
  cancel_source *root = new_src("root");
  cancel_source *c = linked1("c", root);
  assert_non_null(root->head);
  cancel_source_unref(c);
  assert_null(root->head);
  cancel_reg after;
  int count = 0;
  cancel_register(&after, TOK(root), test_count_cb, &count);
  assert_non_null(root->head);
  assert_int_equal(cancel_unregister(&after), 1);
  assert_null(root->head);
  cancel_source_unref(root);
}

/* XTestWithCancelCanceledParent: a child of a cancelled parent is
 * cancelled at once, with the parent's cause. */
static void test_with_cancel_canceled_parent(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  cancel_source_cancel_with(parent, CANCEL_USER + 7, "because");
  cancel_source *child = linked1("child", parent);
  assert_int_equal(cancel_token_check(TOK(child)), -ECANCELED);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(child), &r), 1);
  assert_int_equal(r.kind, CANCEL_USER + 7);
  assert_string_equal(r.detail, "because");
  cancel_source_unref(child);
  cancel_source_unref(parent);
}

/* XTestDeadline (and the WithDeadline cases of XTestLayersTimeout): a
 * child's deadline is the earlier of its own and its parent's. */
static void test_deadline_is_min_of_parent(void **state) {
  (void)state;
  int64_t now = cancel_now();
  cancel_source *parent = new_src("parent");
  assert_int_equal(cancel_source_cancel_at(parent, now + CANCEL_SEC(100)), 0);
  cancel_source *later = linked1("later", parent);
  assert_int_equal(cancel_source_cancel_at(later, now + CANCEL_SEC(200)), 0);
  cancel_source *sooner = linked1("sooner", parent);
  assert_int_equal(cancel_source_cancel_at(sooner, now + CANCEL_SEC(50)), 0);
  assert_i64_eq(cancel_token_deadline(TOK(later)), now + CANCEL_SEC(100));
  assert_i64_eq(cancel_token_deadline(TOK(sooner)), now + CANCEL_SEC(50));
  assert_i64_eq(cancel_token_deadline(TOK(parent)), now + CANCEL_SEC(100));
  cancel_source_unref(later);
  cancel_source_unref(sooner);
  cancel_source_unref(parent);
}

/* XTestDeadline: a deadline fires with DeadlineExceeded, not before. */
static void test_deadline_fires(void **state) {
  (void)state;
  cancel_source *s = new_src("deadline");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_at(s, t0 + CANCEL_MSEC(30)), 0);
  assert_int_equal(cancel_sleep(TOK(s), CANCEL_SEC(10)), -ECANCELED);
  assert_i64_ge(cancel_now() - t0, CANCEL_MSEC(30));
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  cancel_source_unref(s);
}

/* XTestTimeout and XTestDeadlineExceededSupportsTimeout: WithTimeout fires
 * with the timeout kind, and its cause says the duration. */
static void test_timeout(void **state) {
  (void)state;
  cancel_source *s = NULL;
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_new_timeout(&s, "to", NULL, CANCEL_MSEC(25)), 0);
  assert_int_equal(cancel_sleep(TOK(s), CANCEL_SEC(10)), -ECANCELED);
  assert_i64_ge(cancel_now() - t0, CANCEL_MSEC(25));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(s), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.detail, "25ms");
  cancel_source_unref(s);
}

/* XTestCanceledTimeout: a timeout context cancelled before its time says
 * Canceled, and keeps saying it after the time passed. */
static void test_canceled_timeout(void **state) {
  (void)state;
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_timeout(&s, "to", NULL, CANCEL_MSEC(10)), 0);
  assert_int_equal(cancel_source_cancel(s), 1);
  test_sleep_ns(CANCEL_MSEC(30));
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_REQUESTED);
  cancel_source_unref(s);
}

/* XTestLayersCancel and XTestLayersTimeout: cancel, timeout and plain
 * layers mixed; the cancel of a middle layer reaches the layers below it,
 * not those above. */
static void test_layers(void **state) {
  (void)state;
  cancel_source *l[6];
  l[0] = new_src("l0");
  for (int i = 1; i < 6; i++) {
    if (i % 2)
      assert_int_equal(cancel_source_new_timeout(&l[i], "t", TOK(l[i - 1]),
                                                 CANCEL_SEC(3600)),
                       0);
    else
      l[i] = linked1("c", l[i - 1]);
  }
  cancel_source_cancel(l[3]);
  for (int i = 0; i < 6; i++)
    assert_int_equal(cancel_token_is_cancelled(TOK(l[i])), i >= 3);
  cancel_source_cancel(l[0]);
  for (int i = 0; i < 6; i++)
    assert_true(cancel_token_is_cancelled(TOK(l[i])));
  /* l[3]'s reason is its own cancel; l[1]'s the root's. */
  cancel_reason r;
  cancel_token_reason(TOK(l[5]), &r);
  assert_string_equal(r.origin, "t");
  for (int i = 5; i >= 0; i--)
    cancel_source_unref(l[i]);
}

/* XTestCause: WithCancelCause's cause reaches the children; a deadline's
 * cause is the timeout. */
static void test_cause(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  cancel_source *child = linked1("child", parent);
  cancel_source *grandchild = linked1("grandchild", child);
  cancel_source_cancel_with(parent, CANCEL_SHUTDOWN, "draining");
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(grandchild), &r), 1);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "parent");
  assert_string_equal(r.detail, "draining");
  assert_int_equal(r.via_len, 2);
  /* A later cancel of the child does not change its cause. */
  assert_int_equal(cancel_source_cancel_with(child, CANCEL_USER, "late"), 0);
  assert_int_equal(cancel_token_kind(TOK(child)), CANCEL_SHUTDOWN);
  cancel_source_unref(grandchild);
  cancel_source_unref(child);
  cancel_source_unref(parent);
}

/* XTestCauseRace: concurrent cancels with different causes; the cause
 * read is the winner's, and it does not change. */
struct cause_arg {
  cancel_source *src;
  int kind;
  int rc;
  sem_t *go;
};
static void *cause_thread_fn(void *arg) {
  struct cause_arg *c = arg;
  (void)test_sem_wait_ns(c->go, CANCEL_SEC(10));
  c->rc = cancel_source_cancel_with(c->src, c->kind, NULL);
  return NULL;
}
static void test_cause_race(void **state) {
  (void)state;
  for (int iter = 0; iter < 50; iter++) {
    cancel_source *s = new_src("race");
    sem_t go;
    sem_init(&go, 0, 0);
    enum { N = 4 };
    struct cause_arg args[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
      args[i] = (struct cause_arg){s, CANCEL_USER + i, -1, &go};
      t[i] = test_thread_start(cause_thread_fn, &args[i]);
    }
    for (int i = 0; i < N; i++)
      sem_post(&go);
    for (int i = 0; i < N; i++)
      test_thread_join(t[i]);
    int winners = 0, kind = -1;
    for (int i = 0; i < N; i++) {
      assert_true(args[i].rc == 0 || args[i].rc == 1);
      if (args[i].rc == 1) {
        winners++;
        kind = args[i].kind;
      }
    }
    assert_int_equal(winners, 1);
    assert_int_equal(cancel_token_kind(TOK(s)), kind);
    sem_destroy(&go);
    cancel_source_unref(s);
  }
}

/* XTestSimultaneousCancels: a tree cancelled from its root while other
 * threads cancel its leaves; every source ends cancelled once. */
static void test_simultaneous_cancels(void **state) {
  (void)state;
  cancel_source *root = new_src("root");
  enum { N = 8 };
  cancel_source *mid[N], *leaf[N];
  int counts[N] = {0};
  cancel_reg regs[N];
  for (int i = 0; i < N; i++) {
    mid[i] = linked1("mid", root);
    leaf[i] = linked1("leaf", mid[i]);
    cancel_register(&regs[i], TOK(leaf[i]), test_count_cb, &counts[i]);
  }
  pthread_t t[N];
  for (int i = 0; i < N; i++)
    t[i] = test_thread_start(cancel_thread_fn, i % 2 ? leaf[i] : mid[i]);
  cancel_source_cancel(root);
  for (int i = 0; i < N; i++)
    test_thread_join(t[i]);
  for (int i = 0; i < N; i++) {
    assert_true(cancel_token_is_cancelled(TOK(leaf[i])));
    assert_int_equal(test_load(&counts[i]), 1);
    assert_int_equal(cancel_unregister(&regs[i]), 0);
    cancel_source_unref(leaf[i]);
    cancel_source_unref(mid[i]);
  }
  cancel_source_unref(root);
}

/* XTestInterlockedCancels: the parent's cancel, through a callback,
 * cancels an unrelated context; the second is done when the first's
 * cancel returns. */
static void cancel_cb(void *arg) {
  cancel_source_cancel(arg);
}
static void test_interlocked_cancels(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  cancel_source *other = new_src("other");
  cancel_source *child = linked1("child", other);
  cancel_reg reg;
  cancel_register(&reg, TOK(parent), cancel_cb, other);
  cancel_source_cancel(parent);
  assert_true(cancel_token_is_cancelled(TOK(child)));
  cancel_unregister(&reg);
  cancel_source_unref(child);
  cancel_source_unref(other);
  cancel_source_unref(parent);
}

/* XTestAfterFuncCalledAfterCancel and XTestAfterFuncNotCalledAfterStop:
 * the function runs at the cancel; stopped first, it never runs; stop
 * after it ran says it did not stop it. */
static void test_after_func(void **state) {
  (void)state;
  cancel_source *s = new_src("after");
  int count = 0;
  cancel_reg reg;
  cancel_register(&reg, TOK(s), test_count_cb, &count);
  cancel_source_cancel(s);
  assert_int_equal(count, 1);
  assert_int_equal(cancel_unregister(&reg), 0); /* stop() == false */
  cancel_source_unref(s);

  s = new_src("stopped");
  count = 0;
  cancel_register(&reg, TOK(s), test_count_cb, &count);
  assert_int_equal(cancel_unregister(&reg), 1); /* stop() == true */
  cancel_source_cancel(s);
  assert_int_equal(count, 0);
  cancel_source_unref(s);
}

/* XTestAfterFuncCalledImmediately: on a context already done it runs at
 * once (inline here, in its own goroutine in Go). */
static void test_after_func_called_immediately(void **state) {
  (void)state;
  cancel_source *s = new_src("done");
  cancel_source_cancel(s);
  int count = 0;
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), test_count_cb, &count), 1);
  assert_int_equal(count, 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(s);
}

/* XTestAfterFuncCalledAfterTimeout: it runs when the timeout fires, on
 * another thread than the one that registered. */
static void test_after_func_called_after_timeout(void **state) {
  (void)state;
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_timeout(&s, "to", NULL, CANCEL_MSEC(5)), 0);
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  cancel_register(&reg, TOK(s), fire_cb, &f);
  assert_int_equal(test_sem_wait_ns(&f.sem, CANCEL_SEC(5) + test_tol(CANCEL_SEC(5))), 0);
  assert_false(pthread_equal(f.tid, pthread_self()));
  assert_int_equal(cancel_unregister(&reg), 0);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
}

/* XTestWithoutCancel: a shield with grace 0 is not cancelled by its
 * parent and has no deadline of its parent's; it is still cancellable
 * itself. */
static void test_without_cancel(void **state) {
  (void)state;
  cancel_source *parent = NULL;
  assert_int_equal(cancel_source_new_timeout(&parent, "parent", NULL, CANCEL_SEC(3600)), 0);
  cancel_source *shield = NULL;
  assert_int_equal(cancel_source_new_shield(&shield, "without", TOK(parent), 0), 0);
  assert_i64_eq(cancel_token_deadline(TOK(shield)), CANCEL_NEVER);
  cancel_source_cancel(parent);
  assert_false(cancel_token_is_cancelled(TOK(shield)));
  assert_int_equal(cancel_source_cancel(shield), 1);
  cancel_source_unref(shield);
  cancel_source_unref(parent);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_background),
      cmocka_unit_test(test_with_cancel),
      cmocka_unit_test(test_parent_finishes_child),
      cmocka_unit_test(test_child_finishes_first),
      cmocka_unit_test(test_cancel_removes),
      cmocka_unit_test(test_with_cancel_canceled_parent),
      cmocka_unit_test(test_deadline_is_min_of_parent),
      cmocka_unit_test(test_deadline_fires),
      cmocka_unit_test(test_timeout),
      cmocka_unit_test(test_canceled_timeout),
      cmocka_unit_test(test_layers),
      cmocka_unit_test(test_cause),
      cmocka_unit_test(test_cause_race),
      cmocka_unit_test(test_simultaneous_cancels),
      cmocka_unit_test(test_interlocked_cancels),
      cmocka_unit_test(test_after_func),
      cmocka_unit_test(test_after_func_called_immediately),
      cmocka_unit_test(test_after_func_called_after_timeout),
      cmocka_unit_test(test_without_cancel),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
