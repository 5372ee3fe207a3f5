/*
 * Peer scenarios: .NET's CancellationToken.
 *
 * The scenarios of dotnet/runtime's
 * src/libraries/System.Threading.Tasks/tests/CancellationTokenTests.cs that
 * map onto libcancel, written as our own tests.  Each case names the .NET
 * test it maps.  The mapping: CancellationTokenSource is a cancel_source,
 * Token its token, Register cancel_register, Dispose of a registration
 * cancel_unregister (which waits for a callback running on another thread,
 * as Dispose does), Dispose of a source cancel_source_unref,
 * CreateLinkedTokenSource cancel_source_new_linked, CancelAfter
 * cancel_source_cancel_after, WaitHandle cancel_token_fd polled.
 *
 * Scenarios that do not map, and why:
 *   - CancellationTokenEquality, CancellationToken_GetHashCode,
 *     CancellationToken_EqualityAndDispose,
 *     CancellationTokenRegistration_EqualityAndHashCode,
 *     CancellationTokenRegistration_Token_*: C tokens are pointers; there is
 *     no value type to compare or hash.
 *   - Cancel_ThrowOnFirstException, Cancel_DontThrowOnFirstException,
 *     SyncContextWithExceptionThrowingCallback and the other exception
 *     tests: C callbacks cannot throw; a callback has no failure to report.
 *   - EnlistWithSyncContext_*, EnlistWithExecutionContextSuppressed_*,
 *     Register_ExecutionContextFlowsIfExpected: there is no synchronisation
 *     or execution context; callbacks always run on the cancelling thread.
 *   - CancellationTokenRegistration_UnregisterWhileCallbackRunning_
 *     UnregisterDoesntWaitForCallbackToComplete: libcancel has only the
 *     waiting removal (Dispose's semantics); mapped as such below.
 *   - CancellationTokenSource_TryReset_*: a source cannot be reset; a new
 *     source costs one allocation (or none, on caller storage).
 *   - TokenSourceDispose_Negative: using a token after its source was torn
 *     down is a use after free in C (the header forbids it), not an
 *     ObjectDisposedException; the part that maps (a registration outliving
 *     its source) is in test_token_source_dispose.
 *   - CancellationTokenLinking_ODEinTarget: a callback throwing
 *     ObjectDisposedException into the linking code; no exceptions.
 *   - The WaitHandle's WaitAny over a token without a source: the NULL token
 *     has no descriptor (cancel_token_fd returns -EINVAL, documented): it
 *     never fires, so there is nothing to poll; checked below.
 */
#include "test_util.h"

#include <poll.h>

/* ---- Helpers ------------------------------------------------------------ */

/* Appends its tag to a shared order log (callbacks run one at a time). */
struct order_log {
  char seq[16];
  int n;
};
struct order_item {
  struct order_log *log;
  char tag;
};
static void log_cb(void *arg) {
  struct order_item *it = arg;
  it->log->seq[it->log->n++] = it->tag;
}

/* A callback that blocks until released, telling when it started and
 * when it ended. */
struct blocker {
  sem_t started;
  sem_t release;
  int running;
  int finished;
};
static void blocker_init(struct blocker *b) {
  memset(b, 0, sizeof *b);
  sem_init(&b->started, 0, 0);
  sem_init(&b->release, 0, 0);
}
static void blocker_destroy(struct blocker *b) {
  sem_destroy(&b->started);
  sem_destroy(&b->release);
}
static void blocker_cb(void *arg) {
  struct blocker *b = arg;
  __atomic_store_n(&b->running, 1, __ATOMIC_SEQ_CST);
  sem_post(&b->started);
  /* Bounded: a test that fails must not leave this thread hanging. */
  (void)test_sem_wait_ns(&b->release, CANCEL_SEC(10));
  __atomic_store_n(&b->running, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&b->finished, 1, __ATOMIC_SEQ_CST);
}

static void *cancel_thread_fn(void *arg) {
  cancel_source_cancel(arg);
  return NULL;
}

/* ---- Listening ---------------------------------------------------------- */

/* CancellationTokenTests.CancellationTokenPassiveListening */
static void test_passive_listening(void **state) {
  (void)state;
  cancel_source *s = new_src("passive");
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(cancel_token_check(TOK(s)), 0);
  assert_int_equal(cancel_source_cancel(s), 1);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenActiveListening */
static void test_active_listening(void **state) {
  (void)state;
  cancel_source *s = new_src("active");
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, TOK(s), test_count_cb, &count), 0);
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(cancel_source_cancel(s), 1);
  assert_int_equal(test_load(&count), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(s);
}

/* CancellationTokenTests.ThrowIfCancellationRequested: the check is the
 * error value, forever after (level-triggered). */
static void test_throw_if_cancellation_requested(void **state) {
  (void)state;
  cancel_source *s = new_src("throwif");
  assert_int_equal(cancel_token_check(TOK(s)), 0);
  cancel_source_cancel(s);
  assert_int_equal(cancel_token_check(TOK(s)), -ECANCELED);
  assert_int_equal(cancel_token_check(TOK(s)), -ECANCELED);
  assert_int_equal(cancel_source_cancel(s), 0); /* the first cancel won */
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenLateEnlistment: registering on a
 * cancelled token runs the callback synchronously, on this thread. */
static void test_late_enlistment(void **state) {
  (void)state;
  cancel_source *s = new_src("late");
  cancel_source_cancel(s);
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 1);
  assert_int_equal(f.count, 1);
  assert_true(pthread_equal(f.tid, pthread_self()));
  assert_int_equal(cancel_unregister(&reg), 0);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
}

/* CancellationTokenTests.CallbacksOrderIsLifo */
static void test_callbacks_order_is_lifo(void **state) {
  (void)state;
  cancel_source *s = new_src("lifo");
  struct order_log log = {{0}, 0};
  struct order_item it[4] = {{&log, 'a'}, {&log, 'b'}, {&log, 'c'}, {&log, 'd'}};
  cancel_reg regs[4];
  for (int i = 0; i < 4; i++)
    assert_int_equal(cancel_register(&regs[i], TOK(s), log_cb, &it[i]), 0);
  cancel_source_cancel(s);
  assert_string_equal(log.seq, "dcba");
  for (int i = 0; i < 4; i++)
    assert_int_equal(cancel_unregister(&regs[i]), 0);
  cancel_source_unref(s);
}

/* CancellationTokenTests.Enlist_EarlyAndLate: one registration before the
 * cancel runs at the cancel, one after it runs at once. */
static void test_enlist_early_and_late(void **state) {
  (void)state;
  cancel_source *s = new_src("early-late");
  int early = 0, late = 0;
  cancel_reg r1, r2;
  assert_int_equal(cancel_register(&r1, TOK(s), test_count_cb, &early), 0);
  cancel_source_cancel(s);
  assert_int_equal(cancel_register(&r2, TOK(s), test_count_cb, &late), 1);
  assert_int_equal(early, 1);
  assert_int_equal(late, 1);
  assert_int_equal(cancel_unregister(&r1), 0);
  assert_int_equal(cancel_unregister(&r2), 0);
  cancel_source_unref(s);
}

/* ---- Registrations ------------------------------------------------------ */

/* CancellationTokenTests.CancellationTokenRegister_Exceptions: a missing
 * callback is refused (-EINVAL instead of ArgumentNullException), also on
 * the "none" token. */
static void test_register_exceptions(void **state) {
  (void)state;
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, NULL, NULL, NULL), -EINVAL);
  cancel_source *s = new_src("nullfn");
  assert_int_equal(cancel_register(&reg, TOK(s), NULL, NULL), -EINVAL);
  assert_int_equal(cancel_register(NULL, TOK(s), test_count_cb, NULL), -EINVAL);
  assert_int_equal(cancel_unregister(NULL), -EINVAL);
  cancel_source_unref(s);
}

/* CancellationTokenTests.AddAndRemoveDelegates: the same function
 * registered several times; removing some removes exactly those. */
static void test_add_and_remove_delegates(void **state) {
  (void)state;
  cancel_source *s = new_src("delegates");
  int a = 0, b = 0;
  cancel_reg reg1, reg2, reg3, reg4;
  cancel_register(&reg1, TOK(s), test_count_cb, &a);
  cancel_register(&reg2, TOK(s), test_count_cb, &b);
  cancel_register(&reg3, TOK(s), test_count_cb, &b);
  cancel_register(&reg4, TOK(s), test_count_cb, &a);
  assert_int_equal(cancel_unregister(&reg2), 1);
  assert_int_equal(cancel_unregister(&reg3), 1);
  assert_int_equal(cancel_unregister(&reg4), 1);
  cancel_source_cancel(s);
  assert_int_equal(a, 1);
  assert_int_equal(b, 0);
  assert_int_equal(cancel_unregister(&reg1), 0);
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenRegistration_UnregisterRemovesDelegate
 * and CancellationRegistration_RepeatDisposal: the first removal says it
 * removed the callback, a repeat is caught (-EINVAL; .NET returns false). */
static void test_unregister_removes_delegate(void **state) {
  (void)state;
  cancel_source *s = new_src("unreg");
  int count = 0;
  cancel_reg reg;
  cancel_register(&reg, TOK(s), test_count_cb, &count);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);
  cancel_source_cancel(s);
  assert_int_equal(count, 0);
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenRegistration_UnregisterOnDefaultIsNop:
 * a registration on the "none" token never runs and removes cleanly. */
static void test_unregister_on_default_is_nop(void **state) {
  (void)state;
  int count = 0;
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, NULL, test_count_cb, &count), 0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(count, 0);
}

/* CancellationTokenTests.TokenSourceDispose: removing a registration after
 * its source was disposed succeeds, and the callback never ran. */
static void test_token_source_dispose(void **state) {
  (void)state;
  cancel_source *s = new_src("disposed");
  int count = 0;
  cancel_reg reg;
  cancel_register(&reg, TOK(s), test_count_cb, &count);
  cancel_source_unref(s);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(count, 0);
}

/* CancellationTokenTests.Bug720327_DeregisterFromWithinACallbackIsSafe_BasicTest:
 * callbacks that remove other registrations of the token being cancelled
 * (already run, or not yet) complete without deadlock. */
struct dereg_arg {
  cancel_reg *victim;
  int rc;
};
static void dereg_cb(void *arg) {
  struct dereg_arg *d = arg;
  d->rc = cancel_unregister(d->victim);
}
static void test_deregister_from_within_callback(void **state) {
  (void)state;
  cancel_source *s = new_src("bug720327");
  int counts[4] = {0};
  cancel_reg plain[4], killers[4];
  struct dereg_arg d[4];
  for (int i = 0; i < 4; i++)
    cancel_register(&plain[i], TOK(s), test_count_cb, &counts[i]);
  for (int i = 0; i < 4; i++) {
    d[i].victim = &plain[i];
    d[i].rc = -1;
    cancel_register(&killers[i], TOK(s), dereg_cb, &d[i]);
  }
  cancel_source_cancel(s); /* the killers run first (LIFO) */
  for (int i = 0; i < 4; i++) {
    assert_int_equal(d[i].rc, 1); /* removed before it ran */
    assert_int_equal(counts[i], 0);
    assert_int_equal(cancel_unregister(&killers[i]), 0);
  }
  cancel_source_unref(s);
}

/* The late-enlistment rule from inside a callback (CancellationTokenTests
 * "Register from within a callback" scenarios): a callback registering on
 * the token being cancelled runs the new callback inline. */
struct nested_arg {
  const cancel_token *tok;
  cancel_reg inner;
  int inner_count;
  int rc;
};
static void nested_register_cb(void *arg) {
  struct nested_arg *n = arg;
  n->rc = cancel_register(&n->inner, n->tok, test_count_cb, &n->inner_count);
}
static void test_register_from_within_callback(void **state) {
  (void)state;
  cancel_source *s = new_src("nested");
  struct nested_arg n = {TOK(s), {0}, 0, -1};
  cancel_reg outer;
  cancel_register(&outer, TOK(s), nested_register_cb, &n);
  cancel_source_cancel(s);
  assert_int_equal(n.rc, 1);
  assert_int_equal(n.inner_count, 1);
  assert_int_equal(cancel_unregister(&n.inner), 0);
  assert_int_equal(cancel_unregister(&outer), 0);
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenRegistration_DisposeDuringCancellation_
 * SuccessfullyRemovedIfNotYetInvoked (and its Unregister twin): while the
 * newest callback runs on another thread, an older one is removed and never
 * runs, the oldest still runs; removing the running one waits for it
 * (Dispose's semantics). */
struct unreg_arg {
  cancel_reg *reg;
  struct blocker *b;
  int rc;
  int finished_when_returned;
};
static void *unreg_thread_fn(void *arg) {
  struct unreg_arg *u = arg;
  u->rc = cancel_unregister(u->reg);
  u->finished_when_returned = __atomic_load_n(&u->b->finished, __ATOMIC_SEQ_CST);
  return NULL;
}
static void test_dispose_during_cancellation(void **state) {
  (void)state;
  cancel_source *s = new_src("during");
  struct fire_rec f0;
  fire_rec_init(&f0);
  int ctr1_count = 0;
  struct blocker b;
  blocker_init(&b);
  cancel_reg ctr0, ctr1, ctr2;
  cancel_register(&ctr0, TOK(s), fire_cb, &f0);
  cancel_register(&ctr1, TOK(s), test_count_cb, &ctr1_count);
  cancel_register(&ctr2, TOK(s), blocker_cb, &b);

  pthread_t canceller = test_thread_start(cancel_thread_fn, s);
  assert_int_equal(test_sem_wait_ns(&b.started, CANCEL_SEC(10)), 0);
  assert_int_equal(cancel_unregister(&ctr1), 1);

  struct unreg_arg u = {&ctr2, &b, -1, 0};
  pthread_t remover = test_thread_start(unreg_thread_fn, &u);
  sem_post(&b.release);
  test_thread_join(remover);
  assert_int_equal(u.rc, 0);
  assert_int_equal(u.finished_when_returned, 1); /* it waited */

  assert_int_equal(test_sem_wait_ns(&f0.sem, CANCEL_SEC(10)), 0);
  test_thread_join(canceller);
  assert_int_equal(ctr1_count, 0);
  assert_int_equal(cancel_unregister(&ctr0), 0);
  blocker_destroy(&b);
  sem_destroy(&f0.sem);
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenRegistration_ConcurrentUnregisterWithCancel_
 * ReturnsFalseOrCallbackInvoked: racing a removal with the cancel, exactly
 * one of "removed" and "ran" holds, every time. */
struct race_arg {
  cancel_source *src;
  sem_t go;
};
static void *race_cancel_fn(void *arg) {
  struct race_arg *r = arg;
  (void)test_sem_wait_ns(&r->go, CANCEL_SEC(10));
  cancel_source_cancel(r->src);
  return NULL;
}
static void test_concurrent_unregister_with_cancel(void **state) {
  (void)state;
  for (int i = 0; i < 500; i++) {
    struct race_arg r;
    r.src = new_src("race");
    sem_init(&r.go, 0, 0);
    int count = 0;
    cancel_reg reg;
    cancel_register(&reg, TOK(r.src), test_count_cb, &count);
    pthread_t t = test_thread_start(race_cancel_fn, &r);
    sem_post(&r.go);
    int rc = cancel_unregister(&reg);
    test_thread_join(t);
    assert_true(rc == 0 || rc == 1);
    assert_int_equal(rc + test_load(&count), 1);
    sem_destroy(&r.go);
    cancel_source_unref(r.src);
  }
}

/* ---- Linked sources ----------------------------------------------------- */

/* CancellationTokenTests.CreateLinkedTokenSource_OneToken */
static void test_linked_one_token(void **state) {
  (void)state;
  cancel_source *orig = new_src("original");
  const cancel_token *ps[] = {TOK(orig)};
  cancel_source *linked = NULL;
  assert_int_equal(cancel_source_new_linked(&linked, "linked", ps, 1), 0);
  assert_false(cancel_token_is_cancelled(TOK(linked)));
  cancel_source_cancel(orig);
  assert_true(cancel_token_is_cancelled(TOK(linked)));
  cancel_source_unref(linked);
  cancel_source_unref(orig);

  /* And cancelling the linked source leaves the original alone. */
  orig = new_src("original");
  ps[0] = TOK(orig);
  assert_int_equal(cancel_source_new_linked(&linked, "linked", ps, 1), 0);
  cancel_source_cancel(linked);
  assert_false(cancel_token_is_cancelled(TOK(orig)));
  cancel_source_unref(linked);
  cancel_source_unref(orig);
}

/* CancellationTokenTests.CreateLinkedTokenSource_Simple_TwoToken and
 * CreateLinkedTokenSource_Simple_MultiToken: any one of many parents
 * cancels the linked source, and only it. */
static void test_linked_multi_token(void **state) {
  (void)state;
  enum { N = 16 };
  for (int which = 0; which < N; which += 5) {
    cancel_source *parents[N];
    const cancel_token *toks[N];
    for (int i = 0; i < N; i++) {
      parents[i] = new_src("p");
      toks[i] = TOK(parents[i]);
    }
    cancel_source *linked = NULL;
    assert_int_equal(cancel_source_new_linked(&linked, "many", toks, N), 0);
    cancel_source_cancel(parents[which]);
    assert_true(cancel_token_is_cancelled(TOK(linked)));
    for (int i = 0; i < N; i++)
      assert_int_equal(cancel_token_is_cancelled(toks[i]), i == which);
    cancel_source_unref(linked);
    for (int i = 0; i < N; i++)
      cancel_source_unref(parents[i]);
  }
}

/* CancellationTokenTests.CreateLinkedToken_SourceTokenAlreadySignalled */
static void test_linked_source_already_signalled(void **state) {
  (void)state;
  cancel_source *a = new_src("a"), *b = new_src("b");
  cancel_source_cancel(a);
  const cancel_token *ps[] = {TOK(a), TOK(b)};
  cancel_source *linked = NULL;
  assert_int_equal(cancel_source_new_linked(&linked, "linked", ps, 2), 0);
  assert_true(cancel_token_is_cancelled(TOK(linked)));
  cancel_source_unref(linked);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

/* CancellationTokenTests.CreateLinkedToken_MultistepComposition_SourceTokenAlreadySignalled */
static void test_linked_multistep_already_signalled(void **state) {
  (void)state;
  cancel_source *root = new_src("root");
  cancel_source_cancel(root);
  const cancel_token *ps[] = {TOK(root)};
  cancel_source *mid = NULL, *leaf = NULL;
  assert_int_equal(cancel_source_new_linked(&mid, "mid", ps, 1), 0);
  ps[0] = TOK(mid);
  assert_int_equal(cancel_source_new_linked(&leaf, "leaf", ps, 1), 0);
  assert_true(cancel_token_is_cancelled(TOK(leaf)));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(leaf), &r), 1);
  assert_string_equal(r.origin, "root");
  cancel_source_unref(leaf);
  cancel_source_unref(mid);
  cancel_source_unref(root);
}

/* ---- Timers ------------------------------------------------------------- */

/* CancellationTokenTests.CancellationTokenSourceWithTimer: CancelAfter
 * fires on the timer thread with the timeout kind, not before. */
static void test_source_with_timer(void **state) {
  (void)state;
  cancel_source *s = new_src("timer");
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  cancel_register(&reg, TOK(s), fire_cb, &f);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, CANCEL_SEC(5) + test_tol(CANCEL_SEC(5))), 0);
  assert_i64_ge(f.at - t0, CANCEL_MSEC(20));
  assert_false(pthread_equal(f.tid, pthread_self()));
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_int_equal(cancel_unregister(&reg), 0);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
}

/* CancellationTokenTests.CancellationTokenSourceWithTimer (the re-arms):
 * CancelAfter again moves the deadline either way; infinite disarms. */
static void test_cancel_after_rearm(void **state) {
  (void)state;
  /* Far, then near: fires near. */
  cancel_source *s = new_src("rearm");
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  cancel_register(&reg, TOK(s), fire_cb, &f);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_SEC(3600)), 0);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(10)), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, CANCEL_SEC(5) + test_tol(CANCEL_SEC(5))), 0);
  cancel_unregister(&reg);
  sem_destroy(&f.sem);
  cancel_source_unref(s);

  /* Near, then far: not at the near one.  Near, then never: disarmed. */
  for (int never = 0; never < 2; never++) {
    s = new_src("rearm2");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    if (never)
      assert_int_equal(cancel_source_cancel_at(s, CANCEL_NEVER), 0);
    else
      assert_int_equal(cancel_source_cancel_after(s, CANCEL_SEC(3600)), 0);
    test_sleep_ns(CANCEL_MSEC(60));
    assert_not_fired_before(TOK(s), t0, CANCEL_SEC(3600));
    assert_false(cancel_token_is_cancelled(TOK(s)));
    cancel_source_unref(s);
  }
}

/* CancellationTokenTests.CancellationTokenSourceWithTimer_Negative */
static void test_source_with_timer_negative(void **state) {
  (void)state;
  cancel_source *s = new_src("neg");
  assert_int_equal(cancel_source_cancel_after(s, -1), -EINVAL);
  assert_int_equal(cancel_source_cancel_after(NULL, 1), -EINVAL);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_cancel(s);
  /* CancelAfter on a cancelled source is a no-op. */
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(1)), 1);
  cancel_source_unref(s);
}

/* ---- Wait handle -------------------------------------------------------- */

/* CancellationTokenTests.CancellationTokenWaitHandle_SignalAfterWait,
 * _SignalBeforeWait and _WaitAny (the descriptor is the wait handle). */
static void test_wait_handle(void **state) {
  (void)state;
  /* Before: readable at once. */
  cancel_source *s = new_src("wh-before");
  cancel_source_cancel(s);
  int fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  struct pollfd pfd = {fd, POLLIN, 0};
  assert_int_equal(poll(&pfd, 1, 0), 1);
  cancel_source_unref(s);

  /* After: a wait that blocks until another thread cancels. */
  s = new_src("wh-after");
  fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  pfd.fd = fd;
  pfd.revents = 0;
  assert_int_equal(poll(&pfd, 1, 0), 0);
  pthread_t t = test_thread_start(cancel_thread_fn, s);
  assert_int_equal(poll(&pfd, 1, 10000), 1);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  test_thread_join(t);
  cancel_source_unref(s);

  /* WaitAny with a token that has no source: there is no handle for it. */
  assert_int_equal(cancel_token_fd(NULL), -EINVAL);
}

/* ---- Disposing a source while it is cancelled ------------------------- */

/* CancellationTokenTests "dispose while cancelling" (the source disposed
 * while its timer's cancel runs the callbacks on the timer thread): the
 * header promises that unref waits until that cancel's callbacks have
 * finished.  Without children, it does. */
struct unref_arg {
  cancel_source *src;
  struct blocker *b;
  int finished_when_returned;
  int returned;
};
static void *unref_thread_fn(void *arg) {
  struct unref_arg *u = arg;
  cancel_source_unref(u->src);
  u->finished_when_returned = __atomic_load_n(&u->b->finished, __ATOMIC_SEQ_CST);
  __atomic_store_n(&u->returned, 1, __ATOMIC_SEQ_CST);
  return NULL;
}
static bool unref_returned(void *arg) {
  return __atomic_load_n(&((struct unref_arg *)arg)->returned, __ATOMIC_SEQ_CST);
}
static void dispose_while_cancelling(bool with_child) {
  cancel_source *p = new_src("disposed-while-cancelling");
  cancel_source *c = NULL;
  if (with_child) {
    const cancel_token *ps[] = {TOK(p)};
    assert_int_equal(cancel_source_new_linked(&c, "child", ps, 1), 0);
  }
  struct blocker b;
  blocker_init(&b);
  cancel_reg reg;
  cancel_register(&reg, TOK(p), blocker_cb, &b);
  assert_int_equal(cancel_source_cancel_after(p, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&b.started, CANCEL_SEC(10)), 0);

  /* The last reference goes while the callback runs on the timer thread. */
  struct unref_arg u = {p, &b, 0, 0};
  pthread_t owner = test_thread_start(unref_thread_fn, &u);
  /* Give a wrong implementation the chance to return early. */
  (void)test_wait_until(unref_returned, &u, CANCEL_MSEC(50));
  sem_post(&b.release);
  test_thread_join(owner);
  assert_int_equal(u.finished_when_returned, 1);
  /* The callback has run: reg may go (it is on this stack) once the child
   * that may still hold the zombie is gone. */
  cancel_source_unref(c);
  blocker_destroy(&b);
}
static void test_dispose_while_cancelling(void **state) {
  (void)state;
  dispose_while_cancelling(false);
}

/* The same with a linked child keeping the source alive (the zombie path). */
static void test_dispose_while_cancelling_with_child(void **state) {
  (void)state;
  /* Failed before issue 11 item 4 was fixed: unref of a source kept
   * alive by a child returned while its callback still ran. */
  dispose_while_cancelling(true);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_passive_listening),
      cmocka_unit_test(test_active_listening),
      cmocka_unit_test(test_throw_if_cancellation_requested),
      cmocka_unit_test(test_late_enlistment),
      cmocka_unit_test(test_callbacks_order_is_lifo),
      cmocka_unit_test(test_enlist_early_and_late),
      cmocka_unit_test(test_register_exceptions),
      cmocka_unit_test(test_add_and_remove_delegates),
      cmocka_unit_test(test_unregister_removes_delegate),
      cmocka_unit_test(test_unregister_on_default_is_nop),
      cmocka_unit_test(test_token_source_dispose),
      cmocka_unit_test(test_deregister_from_within_callback),
      cmocka_unit_test(test_register_from_within_callback),
      cmocka_unit_test(test_dispose_during_cancellation),
      cmocka_unit_test(test_concurrent_unregister_with_cancel),
      cmocka_unit_test(test_linked_one_token),
      cmocka_unit_test(test_linked_multi_token),
      cmocka_unit_test(test_linked_source_already_signalled),
      cmocka_unit_test(test_linked_multistep_already_signalled),
      cmocka_unit_test(test_source_with_timer),
      cmocka_unit_test(test_cancel_after_rearm),
      cmocka_unit_test(test_source_with_timer_negative),
      cmocka_unit_test(test_wait_handle),
      cmocka_unit_test(test_dispose_while_cancelling),
      cmocka_unit_test(test_dispose_while_cancelling_with_child),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
