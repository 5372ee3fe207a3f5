/*
 * Peer scenarios: C++20's std::stop_token as libstdc++ tests it.
 *
 * The scenarios of gcc-mirror/gcc's libstdc++-v3/testsuite/30_threads/
 * stop_token/ (stop_source.cc, stop_token.cc, stop_callback.cc and
 * stop_callback/{deadlock,deadlock-mt,destroy}.cc) that map onto libcancel,
 * written as our own tests.  Each case names the file (and test function)
 * it maps.  The mapping: stop_source is a cancel_source, get_token its
 * token, request_stop cancel_source_cancel (true/false is 1/0),
 * stop_requested the token check, a stop_callback's construction
 * cancel_register and its destruction cancel_unregister, an empty
 * stop_token (stop_possible() false) the NULL token.
 *
 * Scenarios that do not map, and why:
 *   - stop_source copy/move/assign/swap (stop_source.cc test02-04,
 *     stop_source/assign.cc) and the token's copy/move cases: a source is
 *     shared by reference counting (cancel_source_ref), not by value.
 *   - stop_token/stop_possible.cc and the "stop_possible() after the last
 *     source went" cases: a token is borrowed from a live source; using it
 *     after the source was torn down is a lifetime bug in C.  The part
 *     that maps, a registration outliving its source, is
 *     test_callback_outlives_source.
 *   - stop_callback/invoke.cc (invocation as rvalue or lvalue) and the
 *     destructible_neg / invocable_neg compile-time checks: C callbacks
 *     are a function and a pointer.
 *   - nostopstate construction: there is no empty source object; NULL is.
 *   - std::jthread's request_stop-on-destruction: libcancel's threads
 *     (cancel_thread_create) do not own a source.
 */
#include "test_util.h"

static void *cancel_thread_fn(void *arg) {
  cancel_source_cancel(arg);
  return NULL;
}

/* stop_source.cc test01: a new source can stop and has not; the first
 * request_stop returns true, later ones false. */
static void test_request_stop_once(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(cancel_source_cancel(s), 1);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(cancel_source_cancel(s), 0);
  assert_int_equal(cancel_source_cancel(s), 0);
  cancel_source_unref(s);
}

/* stop_source.cc (request_stop from several threads): exactly one of them
 * makes the request. */
struct stop_arg {
  cancel_source *src;
  sem_t *go;
  int rc;
};
static void *stop_thread_fn(void *arg) {
  struct stop_arg *a = arg;
  (void)test_sem_wait_ns(a->go, CANCEL_SEC(10));
  a->rc = cancel_source_cancel(a->src);
  return NULL;
}
static void test_request_stop_concurrent(void **state) {
  (void)state;
  for (int iter = 0; iter < 50; iter++) {
    cancel_source *s = new_src("ssrc");
    int count = 0;
    cancel_reg reg;
    cancel_register(&reg, TOK(s), test_count_cb, &count);
    sem_t go;
    sem_init(&go, 0, 0);
    enum { N = 4 };
    struct stop_arg a[N];
    pthread_t t[N];
    for (int i = 0; i < N; i++) {
      a[i] = (struct stop_arg){s, &go, -1};
      t[i] = test_thread_start(stop_thread_fn, &a[i]);
    }
    for (int i = 0; i < N; i++)
      sem_post(&go);
    int wins = 0;
    for (int i = 0; i < N; i++) {
      test_thread_join(t[i]);
      wins += a[i].rc;
    }
    assert_int_equal(wins, 1);
    assert_int_equal(test_load(&count), 1);
    cancel_unregister(&reg);
    sem_destroy(&go);
    cancel_source_unref(s);
  }
}

/* stop_token.cc: a token without a source never stops; callbacks on it
 * never run (stop_callback.cc test01, cb3 and cb4). */
static void test_empty_token(void **state) {
  (void)state;
  int count = 0;
  cancel_reg reg;
  assert_false(cancel_token_is_cancelled(NULL));
  assert_int_equal(cancel_register(&reg, NULL, test_count_cb, &count), 0);
  assert_int_equal(count, 0);
  assert_int_equal(cancel_unregister(&reg), 1);
}

/* stop_callback.cc test01 and test02: a callback constructed after
 * request_stop runs at once, in the constructor, on this thread. */
static void test_callback_after_request_stop_runs_inline(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  cancel_source_cancel(s);
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg cb1, cb2;
  assert_int_equal(cancel_register(&cb1, TOK(s), fire_cb, &f), 1);
  assert_int_equal(f.count, 1);
  assert_true(pthread_equal(f.tid, pthread_self()));
  assert_int_equal(cancel_register(&cb2, TOK(s), fire_cb, &f), 1);
  assert_int_equal(f.count, 2);
  assert_int_equal(cancel_unregister(&cb1), 0);
  assert_int_equal(cancel_unregister(&cb2), 0);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
}

/* stop_callback.cc test03: callbacks on the source's token run at
 * request_stop, those on an empty token do not. */
static void test_callbacks_run_at_request_stop(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  int called[4] = {0};
  cancel_reg cb[4];
  cancel_register(&cb[0], TOK(s), test_count_cb, &called[0]);
  cancel_register(&cb[1], TOK(s), test_count_cb, &called[1]);
  cancel_register(&cb[2], NULL, test_count_cb, &called[2]);
  cancel_register(&cb[3], NULL, test_count_cb, &called[3]);
  assert_int_equal(called[0] + called[1] + called[2] + called[3], 0);
  cancel_source_cancel(s);
  assert_int_equal(called[0], 1);
  assert_int_equal(called[1], 1);
  assert_int_equal(called[2], 0);
  assert_int_equal(called[3], 0);
  assert_int_equal(cancel_unregister(&cb[0]), 0);
  assert_int_equal(cancel_unregister(&cb[1]), 0);
  assert_int_equal(cancel_unregister(&cb[2]), 1);
  assert_int_equal(cancel_unregister(&cb[3]), 1);
  cancel_source_unref(s);
}

/* stop_callback.cc (a callback destroyed before the stop): it never runs. */
static void test_callback_destroyed_before_stop(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  int count = 0;
  cancel_reg reg;
  cancel_register(&reg, TOK(s), test_count_cb, &count);
  assert_int_equal(cancel_unregister(&reg), 1);
  cancel_source_cancel(s);
  assert_int_equal(count, 0);
  cancel_source_unref(s);
}

/* The callback sees the stop requested: the state is published before any
 * callback runs. */
struct seen_arg {
  const cancel_token *tok;
  int seen;
};
static void seen_cb(void *arg) {
  struct seen_arg *a = arg;
  a->seen = cancel_token_is_cancelled(a->tok);
}
static void test_callback_sees_stop_requested(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  struct seen_arg a = {TOK(s), 0};
  cancel_reg reg;
  cancel_register(&reg, TOK(s), seen_cb, &a);
  cancel_source_cancel(s);
  assert_int_equal(a.seen, 1);
  cancel_unregister(&reg);
  cancel_source_unref(s);
}

/* stop_token's synchronisation: request_stop synchronises with a
 * stop_requested that returns true (a release and an acquire).  Run under
 * TSan, a missing edge shows as a race on `payload`. */
struct pub_arg {
  cancel_source *src;
  int payload;
};
static void *publish_fn(void *arg) {
  struct pub_arg *p = arg;
  p->payload = 42; /* plain store, ordered only by the cancel */
  cancel_source_cancel(p->src);
  return NULL;
}
static void test_request_stop_synchronises(void **state) {
  (void)state;
  struct pub_arg p = {new_src("ssrc"), 0};
  pthread_t t = test_thread_start(publish_fn, &p);
  assert_true(test_wait_until(test_token_cancelled, (void *)TOK(p.src), CANCEL_SEC(10)));
  assert_int_equal(p.payload, 42);
  test_thread_join(t);
  cancel_source_unref(p.src);
}

/* stop_callback/destroy.cc (PR libstdc++/92895): the destructor of a
 * stop_callback whose callback runs on another thread blocks until the
 * callback has returned. */
struct slow_cb {
  sem_t started;
  sem_t release;
  int finished;
};
static void slow_fn(void *arg) {
  struct slow_cb *c = arg;
  sem_post(&c->started);
  (void)test_sem_wait_ns(&c->release, CANCEL_SEC(10));
  test_sleep_ns(CANCEL_MSEC(20)); /* still running after the release */
  __atomic_store_n(&c->finished, 1, __ATOMIC_SEQ_CST);
}
static void test_destroy_waits_for_running_callback(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  struct slow_cb c;
  memset(&c, 0, sizeof c);
  sem_init(&c.started, 0, 0);
  sem_init(&c.release, 0, 0);
  cancel_reg reg;
  cancel_register(&reg, TOK(s), slow_fn, &c);
  pthread_t t = test_thread_start(cancel_thread_fn, s);
  assert_int_equal(test_sem_wait_ns(&c.started, CANCEL_SEC(10)), 0);
  sem_post(&c.release);
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(__atomic_load_n(&c.finished, __ATOMIC_SEQ_CST), 1);
  test_thread_join(t);
  sem_destroy(&c.started);
  sem_destroy(&c.release);
  cancel_source_unref(s);
}

/* stop_callback/deadlock.cc: a callback that destroys its own stop_callback
 * while it runs does not deadlock (and its storage may go at once). */
struct self_cb {
  cancel_reg reg;
  int rc;
};
static void self_fn(void *arg) {
  struct self_cb *c = arg;
  c->rc = cancel_unregister(&c->reg);
}
static void test_self_deregistration_does_not_deadlock(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  struct self_cb *c = calloc(1, sizeof *c);
  assert_non_null(c);
  c->rc = -1;
  cancel_register(&c->reg, TOK(s), self_fn, c);
  cancel_source_cancel(s);
  assert_int_equal(c->rc, 0);
  free(c);
  cancel_source_unref(s);

  /* The same on another thread's cancel: no wait for itself there either. */
  s = new_src("ssrc2");
  c = calloc(1, sizeof *c);
  assert_non_null(c);
  c->rc = -1;
  cancel_register(&c->reg, TOK(s), self_fn, c);
  test_run_on_thread(cancel_thread_fn, s);
  assert_int_equal(c->rc, 0);
  free(c);
  cancel_source_unref(s);
}

/* stop_callback/deadlock-mt.cc: two callbacks each destroy a third
 * registration of the same source (whichever runs first does it) during
 * request_stop; no deadlock, and the third never runs. */
struct shared_victim {
  cancel_reg *victim; /* NULL once destroyed */
  int rc;
};
static void destroy_victim_fn(void *arg) {
  struct shared_victim *v = arg;
  if (v->victim != NULL) {
    v->rc = cancel_unregister(v->victim);
    free(v->victim);
    v->victim = NULL;
  }
}
static void test_deregister_other_during_request_stop(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  struct shared_victim v = {malloc(sizeof(cancel_reg)), -1};
  assert_non_null(v.victim);
  int victim_count = 0;
  cancel_reg cb1, cb2;
  cancel_register(&cb1, TOK(s), destroy_victim_fn, &v);
  cancel_register(v.victim, TOK(s), test_count_cb, &victim_count);
  cancel_register(&cb2, TOK(s), destroy_victim_fn, &v);
  cancel_source_cancel(s);
  assert_null(v.victim);
  assert_int_equal(v.rc, 1); /* cb2 ran first and removed it */
  assert_int_equal(victim_count, 0);
  assert_int_equal(cancel_unregister(&cb1), 0);
  assert_int_equal(cancel_unregister(&cb2), 0);
  cancel_source_unref(s);
}

/* stop_callback destroyed on another thread during request_stop, before
 * its turn: removed, and it never runs (the destroy.cc setting with the
 * callback not yet started). */
struct gate_cb {
  sem_t started;
  sem_t release;
};
static void gate_fn(void *arg) {
  struct gate_cb *g = arg;
  sem_post(&g->started);
  (void)test_sem_wait_ns(&g->release, CANCEL_SEC(10));
}
static void test_destroy_pending_callback_during_request_stop(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  struct gate_cb g;
  sem_init(&g.started, 0, 0);
  sem_init(&g.release, 0, 0);
  int later = 0;
  cancel_reg pending, gate;
  cancel_register(&pending, TOK(s), test_count_cb, &later);
  cancel_register(&gate, TOK(s), gate_fn, &g); /* runs first */
  pthread_t t = test_thread_start(cancel_thread_fn, s);
  assert_int_equal(test_sem_wait_ns(&g.started, CANCEL_SEC(10)), 0);
  assert_int_equal(cancel_unregister(&pending), 1);
  sem_post(&g.release);
  test_thread_join(t);
  assert_int_equal(later, 0);
  assert_int_equal(cancel_unregister(&gate), 0);
  sem_destroy(&g.started);
  sem_destroy(&g.release);
  cancel_source_unref(s);
}

/* stop_callback outliving its stop_source (the shared stop state): here
 * the registration is detached when the source goes, never runs, and its
 * removal says so. */
static void test_callback_outlives_source(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  int count = 0;
  cancel_reg reg;
  cancel_register(&reg, TOK(s), test_count_cb, &count);
  cancel_source_unref(s);
  assert_int_equal(count, 0);
  assert_int_equal(cancel_unregister(&reg), 1);
}

/* stop_source.cc: stop_requested stays true (level-triggered), and a
 * callback registered on another thread after the stop also runs inline
 * there. */
struct late_arg {
  const cancel_token *tok;
  struct fire_rec *f;
  int rc;
  cancel_reg reg;
};
static void *late_register_fn(void *arg) {
  struct late_arg *a = arg;
  a->rc = cancel_register(&a->reg, a->tok, fire_cb, a->f);
  return NULL;
}
static void test_late_callback_on_other_thread(void **state) {
  (void)state;
  cancel_source *s = new_src("ssrc");
  cancel_source_cancel(s);
  struct fire_rec f;
  fire_rec_init(&f);
  struct late_arg a = {TOK(s), &f, -1, {0}};
  pthread_t t = test_thread_start(late_register_fn, &a);
  test_thread_join(t);
  assert_int_equal(a.rc, 1);
  assert_int_equal(f.count, 1);
  assert_true(pthread_equal(f.tid, t));
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(cancel_unregister(&a.reg), 0);
  sem_destroy(&f.sem);
  cancel_source_unref(s);
}

/* stop_callback/destroy.cc with the callback on a linked child's token,
 * the parent's request_stop reaching it: the destructor still waits. */
static void test_destroy_waits_through_link(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  const cancel_token *ps[] = {TOK(parent)};
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", ps, 1), 0);
  struct slow_cb c;
  memset(&c, 0, sizeof c);
  sem_init(&c.started, 0, 0);
  sem_init(&c.release, 0, 0);
  cancel_reg reg;
  cancel_register(&reg, TOK(child), slow_fn, &c);
  pthread_t t = test_thread_start(cancel_thread_fn, parent);
  assert_int_equal(test_sem_wait_ns(&c.started, CANCEL_SEC(10)), 0);
  sem_post(&c.release);
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(__atomic_load_n(&c.finished, __ATOMIC_SEQ_CST), 1);
  test_thread_join(t);
  sem_destroy(&c.started);
  sem_destroy(&c.release);
  cancel_source_unref(child);
  cancel_source_unref(parent);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_request_stop_once),
      cmocka_unit_test(test_request_stop_concurrent),
      cmocka_unit_test(test_empty_token),
      cmocka_unit_test(test_callback_after_request_stop_runs_inline),
      cmocka_unit_test(test_callbacks_run_at_request_stop),
      cmocka_unit_test(test_callback_destroyed_before_stop),
      cmocka_unit_test(test_callback_sees_stop_requested),
      cmocka_unit_test(test_request_stop_synchronises),
      cmocka_unit_test(test_destroy_waits_for_running_callback),
      cmocka_unit_test(test_self_deregistration_does_not_deadlock),
      cmocka_unit_test(test_deregister_other_during_request_stop),
      cmocka_unit_test(test_destroy_pending_callback_during_request_stop),
      cmocka_unit_test(test_callback_outlives_source),
      cmocka_unit_test(test_late_callback_on_other_thread),
      cmocka_unit_test(test_destroy_waits_through_link),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
