/*
 * The cleanup helpers of cancel.h (CANCEL_AUTO_SOURCE, CANCEL_AUTO_CANCEL,
 * CANCEL_AUTO_REG): what each releases when its block is left, on every
 * way out of it.
 *
 * The probe that a source was released: a registration on it, made
 * outside the block.  The source's last reference detaches its callbacks
 * (cancel.h): a cancel that comes later through the source's parent does
 * not run the probe, and cancel_unregister() on it answers 1.  While the
 * source lives, the same cancel runs it.
 */
#include "test_util.h"

#include <cancel.h>

/* ---- The probe ----------------------------------------------------------- */

struct probe {
  cancel_reg reg;
  int runs; /* atomic */
};

static void probe_cb(void *arg) {
  struct probe *p = arg;
  __atomic_add_fetch(&p->runs, 1, __ATOMIC_SEQ_CST);
}

static int runs(struct probe *p) {
  return __atomic_load_n(&p->runs, __ATOMIC_SEQ_CST);
}

/* Whether the source the probe was registered on has been released: its
 * parent's cancel (done by the caller before) did not run the probe, and
 * the registration was detached. */
static bool released(struct probe *p) {
  return runs(p) == 0 && cancel_unregister(&p->reg) == 1;
}

/* A heap source linked to parent, kept by the cleanup helper, probed. */
#define AUTO_CHILD(var, parent, probe)                                         \
  CANCEL_AUTO_SOURCE cancel_source *var = NULL;                                \
  assert_int_equal(cancel_source_new_linked(                                   \
                       &var, #var, (const cancel_token *[]){parent}, 1),       \
                   0);                                                         \
  assert_int_equal(                                                            \
      cancel_register(&(probe)->reg, TOK(var), probe_cb, (probe)), 0)

/* ---- CANCEL_AUTO_SOURCE ---------------------------------------------------
 */

/* Falling off the end of the block unrefs the source. */
static void test_source_unreffed_at_scope_exit(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  struct probe p = {0}, control = {0};
  {
    AUTO_CHILD(child, TOK(parent), &p);
  }
  /* The control: the same child kept alive by hand sees the cancel. */
  cancel_source *kept = NULL;
  assert_int_equal(cancel_source_new_linked(
                       &kept, "kept", (const cancel_token *[]){TOK(parent)}, 1),
                   0);
  assert_int_equal(cancel_register(&control.reg, TOK(kept), probe_cb, &control),
                   0);
  cancel_source_cancel(parent);
  assert_int_equal(runs(&control), 1);
  assert_true(released(&p));
  cancel_source_unref(kept);
  cancel_source_unref(parent);
}

/* Returns early (fail) or at the end: both release the source. */
static int early_return(const cancel_token *parent, struct probe *p,
                        bool fail) {
  AUTO_CHILD(call, parent, p);
  if (fail)
    return -EIO;
  return cancel_token_check(TOK(call));
}

static void test_source_unreffed_on_early_return(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  struct probe early = {0}, late = {0};
  assert_int_equal(early_return(TOK(parent), &early, true), -EIO);
  assert_int_equal(early_return(TOK(parent), &late, false), 0);
  cancel_source_cancel(parent);
  assert_true(released(&early));
  assert_true(released(&late));
  cancel_source_unref(parent);
}

/* A loop body's source goes at the end of each iteration, at a break and
 * at a continue; a goto out of the block releases it too. */
static void test_source_unreffed_on_break_continue_goto(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  struct probe p[4], jumped = {0};
  memset(p, 0, sizeof p);
  int made = 0;
  for (int i = 0; i < 4; i++) {
    AUTO_CHILD(item, TOK(parent), &p[i]);
    made++;
    if (i == 0)
      continue;
    if (i == 2)
      break;
  }
  assert_int_equal(made, 3);
  {
    AUTO_CHILD(item, TOK(parent), &jumped);
    if (cancel_token_check(TOK(item)) == 0)
      goto out;
    fail_msg("the child is not cancelled yet");
  }
out:
  cancel_source_cancel(parent);
  for (int i = 0; i < 3; i++)
    assert_true(released(&p[i]));
  assert_true(released(&jumped));
  /* The loop left before the fourth: never registered. */
  assert_int_equal(cancel_unregister(&p[3].reg), -EINVAL);
  cancel_source_unref(parent);
}

/* NULL (never created, or a creation that failed and left *srcp NULL) is
 * released as nothing; under ASan a leak or a bad free would show. */
static void test_null_safe(void **state) {
  (void)state;
  {
    CANCEL_AUTO_SOURCE cancel_source *none = NULL;
    CANCEL_AUTO_CANCEL cancel_source *none_either = NULL;
    (void)none;
    (void)none_either;
  }
  {
    CANCEL_AUTO_SOURCE cancel_source *failed = (cancel_source *)&failed;
    /* parents NULL with n > 0: -EINVAL, and *srcp NULL. */
    assert_int_equal(cancel_source_new_linked(&failed, "failed", NULL, 1),
                     -EINVAL);
    assert_null(failed);
  }
  {
    CANCEL_AUTO_CANCEL cancel_source *failed = (cancel_source *)&failed;
    assert_int_equal(cancel_source_new_timeout(&failed, "failed", NULL, -1),
                     -EINVAL);
    assert_null(failed);
  }
}

/* ---- CANCEL_AUTO_CANCEL ---------------------------------------------------
 */

struct worker {
  cancel_thread t;
  cancel_source *src; /* the worker's own reference */
  int rc;
  int kind;
};

static void *worker_main(void *arg) {
  struct worker *w = arg;
  w->rc = cancel_sleep(TOK(w->src), test_tol(CANCEL_SEC(30)));
  w->kind = cancel_token_kind(TOK(w->src));
  cancel_source_unref(w->src);
  return NULL;
}

/* Go's `defer cancel()`: a function that starts work on a source of its
 * own leaves, and the work (which holds a reference, so unref alone
 * would not stop it) sees the source cancelled. */
static int start_and_leave(struct worker *w) {
  CANCEL_AUTO_CANCEL cancel_source *group = NULL;
  int rc = cancel_source_new(&group, "group");
  if (rc < 0)
    return rc;
  w->src = cancel_source_ref(group);
  rc = cancel_thread_create(&w->t, NULL, worker_main, w);
  if (rc < 0)
    cancel_source_unref(w->src);
  return rc;
}

static void test_cancel_at_scope_exit(void **state) {
  (void)state;
  struct worker *w = test_shared(sizeof *w);
  int64_t t0 = cancel_now();
  assert_int_equal(start_and_leave(w), 0);
  assert_int_equal(cancel_thread_join(NULL, &w->t, NULL,
                                      cancel_now() + test_tol(CANCEL_SEC(5))),
                   0);
  assert_int_equal(w->rc, -ECANCELED);
  assert_int_equal(w->kind, CANCEL_REQUESTED);
  assert_i64_lt(test_since(t0), test_tol(CANCEL_SEC(5)));

  /* A source that fired before keeps its reason. */
  cancel_source *kept;
  {
    CANCEL_AUTO_CANCEL cancel_source *s = NULL;
    assert_int_equal(cancel_source_new(&s, "fired"), 0);
    kept = cancel_source_ref(s);
    cancel_source_cancel_with(s, CANCEL_TIMEOUT, "own deadline");
  }
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(kept), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.detail, "own deadline");
  cancel_source_unref(kept);
}

/* ---- CANCEL_AUTO_REG ------------------------------------------------------
 */

/* Registers p on tok and leaves: the registration is gone. */
static void register_and_leave(const cancel_token *tok, int *count,
                               bool by_hand) {
  CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
  assert_int_equal(cancel_register(&reg, tok, test_count_cb, count), 0);
  if (by_hand)
    assert_int_equal(cancel_unregister(&reg), 1);
}

static void test_reg_unregistered_at_scope_exit(void **state) {
  (void)state;
  cancel_source *src = new_src("src");
  int count = 0, hand = 0;
  register_and_leave(TOK(src), &count, false);
  /* Unregistered by hand first: the helper leaves it alone. */
  register_and_leave(TOK(src), &hand, true);
  {
    /* Never registered: nothing to do. */
    CANCEL_AUTO_REG cancel_reg unused = CANCEL_REG_INIT;
    (void)unused;
  }
  {
    /* On the NULL token: registered, never runs. */
    CANCEL_AUTO_REG cancel_reg null_tok = CANCEL_REG_INIT;
    assert_int_equal(cancel_register(&null_tok, NULL, test_count_cb, &count),
                     0);
  }
  /* The control: one still registered runs. */
  int control = 0;
  cancel_reg kept = CANCEL_REG_INIT;
  assert_int_equal(cancel_register(&kept, TOK(src), test_count_cb, &control),
                   0);
  cancel_source_cancel(src);
  assert_int_equal(test_load(&control), 1);
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(test_load(&hand), 0);
  assert_int_equal(cancel_unregister(&kept), 0);
  {
    /* On a cancelled token: it ran inline, and the exit is fine. */
    CANCEL_AUTO_REG cancel_reg ran = CANCEL_REG_INIT;
    assert_int_equal(cancel_register(&ran, TOK(src), test_count_cb, &count), 1);
  }
  assert_int_equal(test_load(&count), 1);
  cancel_source_unref(src);
}

/* Declared before its source (the other order): the source's teardown
 * detached the registration, and the helper then finds nothing to do. */
static void test_reg_declared_before_its_source(void **state) {
  (void)state;
  int count = 0;
  {
    CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
    CANCEL_AUTO_SOURCE cancel_source *src = NULL;
    assert_int_equal(cancel_source_new(&src, "src"), 0);
    assert_int_equal(cancel_register(&reg, TOK(src), test_count_cb, &count), 0);
  }
  assert_int_equal(test_load(&count), 0);
}

/* The callback runs on another thread when the block is left: the exit
 * waits for it, so what it touches may live in the block. */
struct slow_cb {
  sem_t entered, go;
  int done; /* atomic: the callback returned */
  pid_t leaver;
  cancel_source *src;
};

static void slow_cb(void *arg) {
  struct slow_cb *c = arg;
  sem_post(&c->entered);
  (void)test_sem_wait_ns(&c->go, test_tol(CANCEL_SEC(10)));
  __atomic_store_n(&c->done, 1, __ATOMIC_SEQ_CST);
}

static void *canceller(void *arg) {
  struct slow_cb *c = arg;
  cancel_source_cancel(c->src);
  return NULL;
}

/* Lets the callback go once the leaving thread is blocked (in the
 * helper's unregister). */
static void *releaser(void *arg) {
  struct slow_cb *c = arg;
  (void)test_wait_blocked(c->leaver, test_tol(CANCEL_SEC(5)));
  sem_post(&c->go);
  return NULL;
}

static void release_stop(void *arg) {
  struct slow_cb *c = arg;
  sem_post(&c->go);
}

static void test_reg_exit_waits_for_running_callback(void **state) {
  (void)state;
  cancel_source *src = new_src("src");
  struct slow_cb *c = test_shared(sizeof *c);
  sem_init(&c->entered, 0, 0);
  sem_init(&c->go, 0, 0);
  c->leaver = test_gettid();
  c->src = src;
  pthread_t cancel_t, release_t;
  {
    CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
    assert_int_equal(cancel_register(&reg, TOK(src), slow_cb, c), 0);
    cancel_t = test_helper_start(canceller, c, release_stop);
    assert_int_equal(test_sem_wait_ns(&c->entered, test_tol(CANCEL_SEC(5))), 0);
    release_t = test_helper_start(releaser, c, release_stop);
  }
  assert_int_equal(__atomic_load_n(&c->done, __ATOMIC_SEQ_CST), 1);
  test_helper_join(release_t);
  test_helper_join(cancel_t);
  sem_destroy(&c->entered);
  sem_destroy(&c->go);
  cancel_source_unref(src);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_source_unreffed_at_scope_exit),
      cmocka_unit_test(test_source_unreffed_on_early_return),
      cmocka_unit_test(test_source_unreffed_on_break_continue_goto),
      cmocka_unit_test(test_null_safe),
      cmocka_unit_test(test_cancel_at_scope_exit),
      cmocka_unit_test(test_reg_unregistered_at_scope_exit),
      cmocka_unit_test(test_reg_declared_before_its_source),
      cmocka_unit_test(test_reg_exit_waits_for_running_callback),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
