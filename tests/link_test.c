/*
 * Linked sources: propagation from 0, 1 and N parents, inherited reasons,
 * already-cancelled parents, NULL parents, diamonds, unhooking on destroy,
 * parents kept alive by children, caller-storage parents, and effective
 * deadlines along the ancestry.
 */
#include "test_util.h"

static cancel_source *new_child(const char *name,
                                const cancel_token *const *parents, size_t n) {
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_linked(&s, name, parents, n), 0);
  assert_non_null(s);
  return s;
}

/* ---- Propagation ------------------------------------------------------ */

static void test_zero_parents(void **state) {
  (void)state;
  cancel_source *c = new_child("orphan", NULL, 0);
  cancel_source *other = new_src("other");
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, TOK(c), test_count_cb, &count), 0);
  assert_int_equal(cancel_source_cancel(other), 1);
  assert_false(cancel_token_is_cancelled(TOK(c)));
  assert_i64_eq(cancel_token_deadline(TOK(c)), CANCEL_NEVER);

  assert_int_equal(cancel_source_cancel(c), 1);
  assert_int_equal(test_load(&count), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_string_equal(r.origin, "orphan");
  assert_int_equal(r.via_len, 0);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(c);
  cancel_source_unref(other);

  /* On caller storage too. */
  cancel_source local;
  assert_int_equal(cancel_source_init_linked(&local, "orphan2", NULL, 0), 0);
  assert_false(cancel_token_is_cancelled(TOK(&local)));
  assert_int_equal(cancel_source_cancel(&local), 1);
  cancel_source_destroy(&local);
}

static void test_one_parent(void **state) {
  (void)state;
  cancel_source *p = new_src("parent");
  const cancel_token *ps[] = {TOK(p)};
  cancel_source *c = new_child("child", ps, 1);
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, TOK(c), test_count_cb, &count), 0);
  assert_false(cancel_token_is_cancelled(TOK(c)));

  /* Cancelling the child does not touch the parent... */
  cancel_source *c2 = new_child("child2", ps, 1);
  assert_int_equal(cancel_source_cancel(c2), 1);
  assert_false(cancel_token_is_cancelled(TOK(p)));
  assert_false(cancel_token_is_cancelled(TOK(c)));

  /* ...cancelling the parent cancels the child before cancel returns. */
  assert_int_equal(cancel_source_cancel_with(p, CANCEL_TIMEOUT, "1s"), 1);
  assert_true(cancel_token_is_cancelled(TOK(c)));
  assert_int_equal(test_load(&count), 1);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "parent");
  assert_string_equal(r.detail, "1s");
  assert_int_equal(r.via_len, 1);
  assert_int_equal(r.via_skipped, 0);
  assert_string_equal(r.via[0].name, "child");
  assert_null(r.via[0].note);
  assert_int_equal(cancel_token_kind(TOK(c)), CANCEL_TIMEOUT);

  /* child2 cancelled itself first: its reason is its own. */
  assert_int_equal(cancel_token_reason(TOK(c2), &r), 1);
  assert_int_equal(r.kind, CANCEL_REQUESTED);
  assert_string_equal(r.origin, "child2");
  assert_int_equal(r.via_len, 0);

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(c2);
  cancel_source_unref(c);
  cancel_source_unref(p);
}

static void test_n_parents(void **state) {
  (void)state;
  enum { N = 5 };
  for (int k = 0; k < N; k++) {
    cancel_source *p[N];
    const cancel_token *ps[N];
    char name[16];
    for (int i = 0; i < N; i++) {
      snprintf(name, sizeof name, "p%d", i);
      p[i] = new_src(name);
      ps[i] = TOK(p[i]);
    }
    cancel_source *c = new_child("multi", ps, N);
    cancel_reg reg;
    int count = 0;
    assert_int_equal(cancel_register(&reg, TOK(c), test_count_cb, &count), 0);

    assert_int_equal(cancel_source_cancel_with(p[k], CANCEL_USER + k, NULL), 1);
    assert_true(cancel_token_is_cancelled(TOK(c)));
    assert_int_equal(test_load(&count), 1);
    for (int i = 0; i < N; i++)
      if (i != k)
        assert_false(cancel_token_is_cancelled(TOK(p[i])));

    cancel_reason r;
    assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
    snprintf(name, sizeof name, "p%d", k);
    assert_string_equal(r.origin, name);
    assert_int_equal(r.kind, CANCEL_USER + k);
    assert_int_equal(r.via_len, 1);
    assert_string_equal(r.via[0].name, "multi");

    /* Later parents change nothing: first parent wins, callback once. */
    for (int i = 0; i < N; i++)
      if (i != k)
        assert_int_equal(cancel_source_cancel(p[i]), 1);
    assert_int_equal(test_load(&count), 1);
    assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
    assert_string_equal(r.origin, name);

    assert_int_equal(cancel_unregister(&reg), 0);
    cancel_source_unref(c);
    for (int i = 0; i < N; i++)
      cancel_source_unref(p[i]);
  }
}

static void test_link_to_cancelled_parent(void **state) {
  (void)state;
  cancel_source *p = new_src("gone-parent");
  assert_int_equal(
      cancel_source_cancel_with(p, CANCEL_CLIENT_GONE, "peer reset"), 1);
  const cancel_token *ps[] = {TOK(p)};

  cancel_source *c = new_child("late-child", ps, 1);
  assert_true(cancel_token_is_cancelled(TOK(c)));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_CLIENT_GONE);
  assert_string_equal(r.origin, "gone-parent");
  assert_string_equal(r.detail, "peer reset");
  assert_int_equal(r.via_len, 1);
  assert_string_equal(r.via[0].name, "late-child");

  /* Caller storage, and a cancelled parent that is not the first entry. */
  cancel_source *live = new_src("live");
  const cancel_token *ps2[] = {TOK(live), TOK(p)};
  cancel_source local;
  assert_int_equal(cancel_source_init_linked(&local, "local", ps2, 2), 0);
  assert_true(cancel_token_is_cancelled(TOK(&local)));
  assert_int_equal(cancel_token_reason(TOK(&local), &r), 1);
  assert_string_equal(r.origin, "gone-parent");
  assert_int_equal(r.via_len, 1);
  assert_string_equal(r.via[0].name, "local");
  assert_false(cancel_token_is_cancelled(TOK(live)));

  /* A callback registered now runs inline. */
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, TOK(&local), test_count_cb, &count),
                   1);
  assert_int_equal(test_load(&count), 1);

  cancel_source_destroy(&local);
  cancel_source_unref(live);
  cancel_source_unref(c);
  cancel_source_unref(p);
}

static void test_null_parent_entries(void **state) {
  (void)state;
  cancel_source *p = new_src("real");
  const cancel_token *ps[] = {NULL, TOK(p), NULL};
  cancel_source *c = new_child("c", ps, 3);
  const cancel_token *nulls[] = {NULL, NULL};
  cancel_source *n = new_child("n", nulls, 2);
  assert_false(cancel_token_is_cancelled(TOK(c)));
  assert_false(cancel_token_is_cancelled(TOK(n)));
  assert_i64_eq(cancel_token_deadline(TOK(n)), CANCEL_NEVER);

  assert_int_equal(cancel_source_cancel(p), 1);
  assert_true(cancel_token_is_cancelled(TOK(c)));
  assert_false(cancel_token_is_cancelled(TOK(n)));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_string_equal(r.origin, "real");

  assert_int_equal(cancel_source_cancel(n), 1);
  cancel_source_unref(n);
  cancel_source_unref(c);
  cancel_source_unref(p);
}

static void test_diamond(void **state) {
  (void)state;
  cancel_source *g = new_src("G");
  const cancel_token *pg[] = {TOK(g)};
  cancel_source *a = new_child("A", pg, 1); /* linked to G first */
  cancel_source *b = new_child("B", pg, 1); /* linked to G last */
  const cancel_token *pab[] = {TOK(a), TOK(b)};
  cancel_source *c = new_child("child", pab, 2);
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, TOK(c), test_count_cb, &count), 0);

  assert_int_equal(cancel_source_cancel(g), 1);
  assert_true(cancel_token_is_cancelled(TOK(a)));
  assert_true(cancel_token_is_cancelled(TOK(b)));
  assert_true(cancel_token_is_cancelled(TOK(c)));
  assert_int_equal(test_load(&count), 1);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_string_equal(r.origin, "G");
  assert_int_equal(r.via_len, 2);
  /* G runs its callbacks newest first, so B (linked last) fires first and
   * its cancellation reaches the child. */
  assert_string_equal(r.via[0].name, "B");
  assert_string_equal(r.via[1].name, "child");

  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(c);
  cancel_source_unref(b);
  cancel_source_unref(a);
  cancel_source_unref(g);
}

/* ---- Teardown --------------------------------------------------------- */

static void test_destroy_child_unhooks(void **state) {
  (void)state;
  cancel_source *p = new_src("p");
  const cancel_token *ps[] = {TOK(p)};
  cancel_reg preg, creg;
  int pcount = 0, ccount = 0;
  assert_int_equal(cancel_register(&preg, TOK(p), test_count_cb, &pcount), 0);

  cancel_source *c = new_child("c", ps, 1);
  assert_int_equal(cancel_register(&creg, TOK(c), test_count_cb, &ccount), 0);
  cancel_source_unref(c);
  assert_int_equal(cancel_unregister(&creg), 1);

  /* Many short-lived children, heap and caller storage. */
  for (int i = 0; i < 500; i++) {
    cancel_source *h = new_child("h", ps, 1);
    cancel_source local;
    assert_int_equal(cancel_source_init_linked(&local, "l", ps, 1), 0);
    cancel_source_unref(h);
    cancel_source_destroy(&local);
    memset(&local, 0xDB, sizeof local); /* storage reused at once */
  }

  /* Cancelling the parent now must not touch freed children (ASan). */
  assert_int_equal(cancel_source_cancel(p), 1);
  assert_int_equal(test_load(&pcount), 1);
  assert_int_equal(test_load(&ccount), 0);
  assert_int_equal(cancel_unregister(&preg), 0);
  cancel_source_unref(p);
}

static void test_destroy_child_of_many_parents(void **state) {
  (void)state;
  enum { N = 4 };
  cancel_source *p[N];
  const cancel_token *ps[N];
  for (int i = 0; i < N; i++) {
    p[i] = new_src("p");
    ps[i] = TOK(p[i]);
  }
  for (int i = 0; i < 200; i++) {
    cancel_source *c = new_child("c", ps, N);
    cancel_source_unref(c);
  }
  for (int i = 0; i < N; i++) {
    assert_int_equal(cancel_source_cancel(p[i]), 1);
    cancel_source_unref(p[i]);
  }
}

struct sem_cb {
  sem_t sem;
  int count;
};

static void sem_count_cb(void *arg) {
  struct sem_cb *s = arg;
  __atomic_add_fetch(&s->count, 1, __ATOMIC_SEQ_CST);
  sem_post(&s->sem);
}

static void test_children_keep_heap_parents_alive(void **state) {
  (void)state;
  cancel_source *g = new_src("grand");
  const cancel_token *pg[] = {TOK(g)};
  cancel_source *p = new_child("parent", pg, 1);
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("child", pp, 1);
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, TOK(c), test_count_cb, &count), 0);

  cancel_source_unref(p); /* the child still needs it */
  assert_int_equal(cancel_source_cancel_with(g, CANCEL_SHUTDOWN, NULL), 1);
  assert_true(cancel_token_is_cancelled(TOK(c)));
  assert_int_equal(test_load(&count), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "grand");
  assert_int_equal(r.via_len, 2);
  assert_string_equal(r.via[0].name, "parent");
  assert_string_equal(r.via[1].name, "child");
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(c); /* frees child and parent */
  cancel_source_unref(g);

  /* A chain whose only holder is the leaf: the unreferenced root can still
   * be cancelled by its own timer, and it reaches the leaf. */
  struct sem_cb s;
  s.count = 0;
  sem_init(&s.sem, 0, 0);
  g = new_src("timed-root");
  const cancel_token *pg2[] = {TOK(g)};
  p = new_child("mid", pg2, 1);
  const cancel_token *pp2[] = {TOK(p)};
  c = new_child("leaf", pp2, 1);
  assert_int_equal(cancel_register(&reg, TOK(c), sem_count_cb, &s), 0);
  assert_int_equal(cancel_source_cancel_after(g, CANCEL_MSEC(20)), 0);
  cancel_source_unref(g);
  cancel_source_unref(p);
  assert_int_equal(test_sem_wait_ns(&s.sem, CANCEL_SEC(5)), 0);
  assert_int_equal(test_load(&s.count), 1);
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "timed-root");
  assert_int_equal(r.via_len, 2);
  assert_string_equal(r.via[0].name, "mid");
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(c);
  sem_destroy(&s.sem);
}

/* The last unref of a heap parent detaches its registrations at once, even
 * though its children keep it alive: they never run, also when the parent
 * is later cancelled through its own parent. */
static void test_unreferenced_parent_detaches_registrations(void **state) {
  (void)state;
  cancel_source *g = new_src("grand");
  const cancel_token *pg[] = {TOK(g)};
  cancel_source *p = new_child("parent", pg, 1);
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("child", pp, 1);
  cancel_reg preg, creg;
  int pcount = 0, ccount = 0;
  assert_int_equal(cancel_register(&preg, TOK(p), test_count_cb, &pcount), 0);
  assert_int_equal(cancel_register(&creg, TOK(c), test_count_cb, &ccount), 0);

  cancel_source_unref(p); /* last reference: preg is detached now */
  assert_int_equal(cancel_source_cancel(g), 1);
  assert_int_equal(test_load(&ccount), 1); /* the child still follows */
  assert_int_equal(test_load(&pcount), 0); /* the detached one never runs */
  assert_int_equal(cancel_unregister(&preg), 1);
  assert_int_equal(cancel_unregister(&creg), 0);
  cancel_source_unref(c);
  cancel_source_unref(g);
}

/* The last unref of a parent racing with the destruction of its child (the
 * child unhooks itself from the parent while the parent's teardown looks
 * at its children).  Run under TSan/ASan to see the races. */
enum { RACE_ROUNDS = 2000 };

struct unref_race {
  pthread_barrier_t start, end;
  cancel_source *victim[2];
};

static void *unref_racer(void *arg) {
  struct unref_race *u = arg;
  static int next_id;
  int id = __atomic_fetch_add(&next_id, 1, __ATOMIC_SEQ_CST) % 2;
  for (int i = 0; i < RACE_ROUNDS; i++) {
    pthread_barrier_wait(&u->start);
    cancel_source_unref(u->victim[id]);
    pthread_barrier_wait(&u->end);
  }
  return NULL;
}

static void test_concurrent_parent_child_unref(void **state) {
  (void)state;
  struct unref_race u;
  pthread_barrier_init(&u.start, NULL, 3);
  pthread_barrier_init(&u.end, NULL, 3);
  pthread_t t[2];
  for (int i = 0; i < 2; i++)
    if (pthread_create(&t[i], NULL, unref_racer, &u) != 0) {
      if (i == 0)
        fail_msg("pthread_create failed");
      /* The first racer waits at a barrier of three in this frame. */
      test_give_up("no thread for the second racer");
    }
  /* No assertion until the racers are joined: they wait for this thread
   * at the barriers in this frame, which a failed assertion would leave.
   * A source that cannot be made is counted (the racers unref NULL). */
  int failed = 0;
  for (int i = 0; i < RACE_ROUNDS; i++) {
    cancel_source *p = NULL, *c = NULL;
    if (cancel_source_new(&p, "p") == 0) {
      const cancel_token *ps[] = {TOK(p)};
      failed += cancel_source_new_linked(&c, "c", ps, 1) != 0;
    } else {
      failed++;
    }
    u.victim[0] = p;
    u.victim[1] = c;
    pthread_barrier_wait(&u.start); /* both unref now */
    pthread_barrier_wait(&u.end);
  }
  for (int i = 0; i < 2; i++)
    test_thread_join(t[i]);
  pthread_barrier_destroy(&u.start);
  pthread_barrier_destroy(&u.end);
  assert_int_equal(failed, 0);
}

static void test_caller_storage_parent_destroyed_first(void **state) {
  (void)state;
  cancel_source *g = new_src("grand");
  const cancel_token *pg[] = {TOK(g)};
  cancel_source p;
  assert_int_equal(cancel_source_init_linked(&p, "storage-parent", pg, 1), 0);
  const cancel_token *pp[] = {TOK(&p)};
  cancel_source *c = new_child("child", pp, 1);
  cancel_source local_child;
  assert_int_equal(cancel_source_init_linked(&local_child, "lchild", pp, 1), 0);
  cancel_reg reg, lreg;
  int count = 0, lcount = 0;
  assert_int_equal(cancel_register(&reg, TOK(c), test_count_cb, &count), 0);
  assert_int_equal(
      cancel_register(&lreg, TOK(&local_child), test_count_cb, &lcount), 0);

  cancel_source_destroy(&p); /* the children are detached */
  memset(&p, 0xCD, sizeof p);

  assert_int_equal(cancel_source_cancel(g), 1);
  assert_false(cancel_token_is_cancelled(TOK(c)));
  assert_false(cancel_token_is_cancelled(TOK(&local_child)));
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(test_load(&lcount), 0);

  /* The children still work on their own. */
  assert_int_equal(cancel_source_cancel(c), 1);
  assert_int_equal(test_load(&count), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_string_equal(r.origin, "child");
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(cancel_unregister(&lreg), 1);

  cancel_source_unref(c);
  cancel_source_destroy(&local_child);
  cancel_source_unref(g);
}

/* ---- Deadlines -------------------------------------------------------- */

static void test_deadline_basics(void **state) {
  (void)state;
  assert_i64_eq(cancel_token_deadline(NULL), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(NULL), CANCEL_NEVER);

  cancel_source *s = new_src("d");
  assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(TOK(s)), CANCEL_NEVER);

  int64_t at = cancel_now() + CANCEL_SEC(10);
  assert_int_equal(cancel_source_cancel_at(s, at), 0);
  assert_i64_eq(cancel_token_deadline(TOK(s)), at);
  int64_t rem = cancel_token_remaining(TOK(s));
  assert_i64_gt(rem, 0);
  assert_i64_le(rem, CANCEL_SEC(10));
  assert_i64_ge(rem, CANCEL_SEC(10) - CANCEL_SEC(1) - test_tol(CANCEL_SEC(1)));

  int64_t before = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_SEC(5)), 0);
  int64_t after = cancel_now();
  assert_i64_ge(cancel_token_deadline(TOK(s)), before + CANCEL_SEC(5));
  assert_i64_le(cancel_token_deadline(TOK(s)), after + CANCEL_SEC(5));

  assert_int_equal(cancel_source_cancel_at(s, CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(TOK(s)), CANCEL_NEVER);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_deadline_earliest_of_parents(void **state) {
  (void)state;
  int64_t now = cancel_now();
  int64_t d1 = now + CANCEL_SEC(10), d2 = now + CANCEL_SEC(5);
  cancel_source *p1 = new_src("p1");
  cancel_source *p2 = new_src("p2");
  cancel_source *p3 = new_src("p3"); /* no deadline */
  assert_int_equal(cancel_source_cancel_at(p1, d1), 0);
  assert_int_equal(cancel_source_cancel_at(p2, d2), 0);
  const cancel_token *ps[] = {TOK(p1), NULL, TOK(p2), TOK(p3)};
  cancel_source *c = new_child("c", ps, 4);
  assert_i64_eq(cancel_token_deadline(TOK(c)), d2);
  int64_t rem = cancel_token_remaining(TOK(c));
  assert_i64_gt(rem, 0);
  assert_i64_le(rem, d2 - now);

  /* A grandchild sees the same; its own earlier deadline wins. */
  const cancel_token *pc[] = {TOK(c)};
  cancel_source *gc = new_child("gc", pc, 1);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d2);
  int64_t d_own = now + CANCEL_SEC(2);
  assert_int_equal(cancel_source_cancel_at(gc, d_own), 0);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d_own);
  assert_i64_eq(cancel_token_deadline(TOK(c)), d2); /* not upwards */
  /* An own deadline later than the inherited one does not win. */
  assert_int_equal(cancel_source_cancel_at(gc, now + CANCEL_SEC(60)), 0);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d2);

  /* Re-arming a parent later changes the child's effective deadline. */
  int64_t d2_later = now + CANCEL_SEC(20);
  assert_int_equal(cancel_source_cancel_at(p2, d2_later), 0);
  assert_i64_eq(cancel_token_deadline(TOK(p2)), d2_later);
  assert_i64_eq(cancel_token_deadline(TOK(c)), d1);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d1);

  /* ...and earlier. */
  int64_t d3 = now + CANCEL_SEC(3);
  assert_int_equal(cancel_source_cancel_at(p3, d3), 0);
  assert_i64_eq(cancel_token_deadline(TOK(c)), d3);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d3);

  /* Disarming everything: none left. */
  assert_int_equal(cancel_source_cancel_at(p1, CANCEL_NEVER), 0);
  assert_int_equal(cancel_source_cancel_at(p2, CANCEL_NEVER), 0);
  assert_int_equal(cancel_source_cancel_at(p3, CANCEL_NEVER), 0);
  assert_int_equal(cancel_source_cancel_at(gc, CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(c)), CANCEL_NEVER);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(TOK(gc)), CANCEL_NEVER);

  cancel_source_unref(gc);
  cancel_source_unref(c);
  cancel_source_unref(p3);
  cancel_source_unref(p2);
  cancel_source_unref(p1);
}

/* ---- Deadlines over shared ancestry (issue 11, item 2) ----------------- */

/* The time one cancel_token_deadline() call takes, and its answer. */
static int64_t timed_deadline(const cancel_token *tok, int64_t *ns) {
  int64_t t0 = cancel_now();
  int64_t d = cancel_token_deadline(tok);
  *ns = cancel_now() - t0;
  return d;
}

/* A ladder: a[i] and b[i] both link to a[i-1] and b[i-1], so the leaf has
 * 2^levels paths to the roots but only 2*levels+2 ancestors.  A query that
 * walks paths doubles in cost with every level (24 levels took 0.1 s); it
 * must cost what the ancestry costs at most.  Built one level at a time and
 * queried at each level, so that a path walk fails at ~20 levels at once
 * instead of running for years at 60. */
#define LADDER 60
static void test_deadline_ladder(void **state) {
  (void)state;
  cancel_source *a[LADDER + 1], *b[LADDER + 1];
  int64_t now = cancel_now();
  int64_t da = now + CANCEL_SEC(50), db = now + CANCEL_SEC(40);
  a[0] = new_src("a0");
  b[0] = new_src("b0");
  assert_int_equal(cancel_source_cancel_at(a[0], da), 0);
  assert_int_equal(cancel_source_cancel_at(b[0], db), 0);
  int64_t worst = 0;
  for (int i = 1; i <= LADDER; i++) {
    const cancel_token *ps[] = {TOK(a[i - 1]), TOK(b[i - 1])};
    a[i] = new_child("a", ps, 2);
    b[i] = new_child("b", ps, 2);
    int64_t ns;
    assert_i64_eq(timed_deadline(TOK(a[i]), &ns), db);
    if (ns > worst)
      worst = ns;
    assert_i64_lt(ns, test_tol(CANCEL_MSEC(1)));
  }
  print_message("ladder of %d levels: slowest query %" PRId64 " ns\n", LADDER,
                worst);

  /* Re-arming a root earlier reaches both leaves... */
  int64_t d_early = now + CANCEL_SEC(30);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_at(a[0], d_early), 0);
  int64_t rearm_ns = cancel_now() - t0;
  int64_t ns;
  assert_i64_eq(timed_deadline(TOK(a[LADDER]), &ns), d_early);
  assert_i64_lt(ns, test_tol(CANCEL_MSEC(1)));
  assert_i64_eq(timed_deadline(TOK(b[LADDER]), &ns), d_early);
  assert_i64_lt(ns, test_tol(CANCEL_MSEC(1)));
  /* ...and so does re-arming it later (the other root wins again), and
   * disarming (only the other root is left), with the re-arm itself
   * bounded by the ancestry too. */
  assert_int_equal(cancel_source_cancel_at(a[0], now + CANCEL_SEC(90)), 0);
  assert_i64_eq(timed_deadline(TOK(a[LADDER]), &ns), db);
  assert_i64_lt(ns, test_tol(CANCEL_MSEC(1)));
  assert_int_equal(cancel_source_cancel_at(a[0], CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(b[LADDER])), db);
  assert_int_equal(cancel_source_cancel_at(b[0], CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(b[LADDER])), CANCEL_NEVER);
  assert_i64_eq(cancel_token_remaining(TOK(a[LADDER])), CANCEL_NEVER);
  assert_i64_lt(rearm_ns, test_tol(CANCEL_MSEC(10)));
  /* A deadline armed in the middle reaches everything below it only. */
  int64_t dm = now + CANCEL_SEC(20);
  assert_int_equal(cancel_source_cancel_at(b[LADDER / 2], dm), 0);
  assert_i64_eq(cancel_token_deadline(TOK(a[LADDER])), dm);
  assert_i64_eq(cancel_token_deadline(TOK(a[LADDER / 2])), CANCEL_NEVER);
  assert_i64_eq(cancel_token_deadline(TOK(a[LADDER / 2 + 1])), dm);
  for (int i = LADDER; i >= 0; i--) {
    cancel_source_unref(a[i]);
    cancel_source_unref(b[i]);
  }
}

/* A chain 10^6 deep: the query must not recurse (it overflowed the stack
 * at 10^5 under ASan), and neither may pushing a re-armed root's deadline
 * down to the leaf. */
#define DEEP 1000000
static void test_deadline_deep_chain(void **state) {
  (void)state;
  cancel_source **c = malloc((DEEP + 1) * sizeof *c);
  assert_non_null(c);
  int64_t d = cancel_now() + CANCEL_SEC(60);
  c[0] = new_src("root");
  assert_int_equal(cancel_source_cancel_at(c[0], d), 0);
  for (int i = 1; i <= DEEP; i++) {
    const cancel_token *p = TOK(c[i - 1]);
    assert_int_equal(cancel_source_new_linked(&c[i], NULL, &p, 1), 0);
  }
  int64_t ns;
  assert_i64_eq(timed_deadline(TOK(c[DEEP]), &ns), d);
  assert_i64_lt(ns, test_tol(CANCEL_MSEC(1)));
  int64_t d2 = d - CANCEL_SEC(30);
  assert_int_equal(cancel_source_cancel_at(c[0], d2), 0);
  assert_i64_eq(cancel_token_deadline(TOK(c[DEEP])), d2);
  assert_int_equal(cancel_source_cancel_at(c[0], CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(c[DEEP])), CANCEL_NEVER);
  assert_i64_eq(cancel_token_deadline(TOK(c[DEEP / 2])), CANCEL_NEVER);
  /* Unreferenced from the root down: each becomes a zombie kept by its
   * child, and the leaf's unref frees the whole chain (iteratively). */
  for (int i = 0; i <= DEEP; i++)
    cancel_source_unref(c[i]);
  free(c);
}

/* Re-arms on the roots race with children being linked and destroyed
 * below them and with queries: once everything settles, every survivor
 * reports the earliest deadline of its ancestry (run under TSan too). */
struct rearm_race {
  cancel_source *root[2];
  cancel_source *mid; /* linked to both roots */
  int64_t base;
  int bad; /* atomic: what a thread saw wrong (no cmocka asserts there) */
};

static void *rearm_thread(void *arg) {
  struct rearm_race *r = arg;
  unsigned x = 12345;
  for (int i = 0; i < 4000; i++) {
    x = x * 1103515245u + 12345u;
    cancel_source *s = r->root[(x >> 8) & 1];
    int64_t at = (x >> 9) % 7 == 0 ? CANCEL_NEVER
                                   : r->base + CANCEL_SEC((x >> 12) % 100);
    if (cancel_source_cancel_at(s, at) < 0)
      __atomic_add_fetch(&r->bad, 1, __ATOMIC_RELAXED);
  }
  return NULL;
}

static void *churn_thread(void *arg) {
  struct rearm_race *r = arg;
  const cancel_token *p = TOK(r->mid);
  for (int i = 0; i < 2000; i++) {
    cancel_source *c, *gc;
    if (cancel_source_new_linked(&c, "c", &p, 1) != 0) {
      __atomic_add_fetch(&r->bad, 1, __ATOMIC_RELAXED);
      break;
    }
    const cancel_token *pc = TOK(c);
    if (cancel_source_new_linked(&gc, "gc", &pc, 1) != 0) {
      cancel_source_unref(c);
      __atomic_add_fetch(&r->bad, 1, __ATOMIC_RELAXED);
      break;
    }
    int64_t d = cancel_token_deadline(TOK(gc));
    if (d != CANCEL_NEVER && d < r->base)
      __atomic_add_fetch(&r->bad, 1, __ATOMIC_RELAXED);
    (void)cancel_token_remaining(TOK(gc));
    if (i & 1) {
      cancel_source_unref(c); /* a zombie kept by gc */
      cancel_source_unref(gc);
    } else {
      cancel_source_unref(gc);
      cancel_source_unref(c);
    }
  }
  return NULL;
}

static void test_deadline_concurrent_rearm(void **state) {
  (void)state;
  struct rearm_race r;
  memset(&r, 0, sizeof r);
  r.base = cancel_now() + CANCEL_SEC(100);
  r.root[0] = new_src("r0");
  r.root[1] = new_src("r1");
  const cancel_token *ps[] = {TOK(r.root[0]), TOK(r.root[1])};
  r.mid = new_child("mid", ps, 2);
  const cancel_token *pm = TOK(r.mid);
  cancel_source *leaf = new_child("leaf", &pm, 1);
  pthread_t t1 = test_thread_start(rearm_thread, &r);
  pthread_t t2 = test_thread_start(churn_thread, &r);
  pthread_t t3 = test_thread_start(churn_thread, &r);
  test_thread_join(t1);
  test_thread_join(t2);
  test_thread_join(t3);
  assert_int_equal(r.bad, 0);
  int64_t d0 = cancel_token_deadline(TOK(r.root[0]));
  int64_t d1 = cancel_token_deadline(TOK(r.root[1]));
  int64_t want = d0 < d1 ? d0 : d1;
  assert_i64_eq(cancel_token_deadline(TOK(r.mid)), want);
  assert_i64_eq(cancel_token_deadline(TOK(leaf)), want);
  /* One more re-arm each way after the race still lands. */
  assert_int_equal(cancel_source_cancel_at(r.root[0], r.base - CANCEL_SEC(1)),
                   0);
  assert_i64_eq(cancel_token_deadline(TOK(leaf)), r.base - CANCEL_SEC(1));
  assert_int_equal(cancel_source_cancel_at(r.root[0], CANCEL_NEVER), 0);
  assert_i64_eq(cancel_token_deadline(TOK(leaf)), d1);
  cancel_source_unref(leaf);
  cancel_source_unref(r.mid);
  cancel_source_unref(r.root[1]);
  cancel_source_unref(r.root[0]);
}

/* A caller-storage parent destroyed first (misuse, but survivable): its
 * children lose its deadline along with the link. */
static void test_deadline_parent_destroyed_first(void **state) {
  (void)state;
  cancel_source p;
  assert_int_equal(cancel_source_init(&p, "p"), 0);
  int64_t d = cancel_now() + CANCEL_SEC(30);
  assert_int_equal(cancel_source_cancel_at(&p, d), 0);
  cancel_source *other = new_src("other");
  int64_t d_other = d + CANCEL_SEC(10);
  assert_int_equal(cancel_source_cancel_at(other, d_other), 0);
  const cancel_token *ps[] = {TOK(&p), TOK(other)};
  cancel_source *c = new_child("c", ps, 2);
  const cancel_token *pc = TOK(c);
  cancel_source *gc = new_child("gc", &pc, 1);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d);
  cancel_source_destroy(&p); /* reports the misuse on stderr */
  assert_i64_eq(cancel_token_deadline(TOK(c)), d_other);
  assert_i64_eq(cancel_token_deadline(TOK(gc)), d_other);
  cancel_source_unref(gc);
  cancel_source_unref(c);
  cancel_source_unref(other);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_zero_parents),
      cmocka_unit_test(test_one_parent),
      cmocka_unit_test(test_n_parents),
      cmocka_unit_test(test_link_to_cancelled_parent),
      cmocka_unit_test(test_null_parent_entries),
      cmocka_unit_test(test_diamond),
      cmocka_unit_test(test_destroy_child_unhooks),
      cmocka_unit_test(test_destroy_child_of_many_parents),
      cmocka_unit_test(test_children_keep_heap_parents_alive),
      cmocka_unit_test(test_unreferenced_parent_detaches_registrations),
      cmocka_unit_test(test_concurrent_parent_child_unref),
      cmocka_unit_test(test_caller_storage_parent_destroyed_first),
      cmocka_unit_test(test_deadline_basics),
      cmocka_unit_test(test_deadline_earliest_of_parents),
      cmocka_unit_test(test_deadline_ladder),
      cmocka_unit_test(test_deadline_deep_chain),
      cmocka_unit_test(test_deadline_concurrent_rearm),
      cmocka_unit_test(test_deadline_parent_destroyed_first),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
