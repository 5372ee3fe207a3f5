/*
 * The cancel loop itself: deep link chains (a million sources cancelled
 * from a thread and from a timeout, then torn down), the order callbacks
 * run in over a tree (depth first: a child's callbacks run where its link
 * sits in the parent's list), and unref of a parent that only its children
 * keep alive while a cancel of it is in flight on another thread (from its
 * timer, or from its own parent's cancel): unref waits for the callback
 * that runs, and the callbacks still waiting are dropped.
 *
 * Run under ASan (its larger frames overflow a recursive cancel sooner)
 * and TSan (the unref races).
 */
#include "test_util.h"

static cancel_source *new_child(const char *name,
                                const cancel_token *const *parents, size_t n) {
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_linked(&s, name, parents, n), 0);
  assert_non_null(s);
  return s;
}

/* ---- Deep chains -------------------------------------------------------- */

enum { DEEP = 1000000 };

/* s[0] is the root "root"; s[i] ("c<i>") is linked to s[i-1] alone. */
struct chain {
  cancel_source **s;
  size_t n;
  struct fire_rec leaf_fired; /* a callback on the leaf */
  cancel_reg leaf_reg;
};

static void chain_build(struct chain *c, size_t n) {
  c->n = n;
  c->s = calloc(n, sizeof *c->s);
  assert_non_null(c->s);
  c->s[0] = new_src("root");
  for (size_t i = 1; i < n; i++) {
    char name[24];
    snprintf(name, sizeof name, "c%zu", i);
    const cancel_token *ps[] = {TOK(c->s[i - 1])};
    c->s[i] = new_child(name, ps, 1);
  }
  fire_rec_init(&c->leaf_fired);
  assert_int_equal(cancel_register(&c->leaf_reg, TOK(c->s[n - 1]), fire_cb,
                                   &c->leaf_fired),
                   0);
}

/* Source i's reason: the root's kind, time and detail, and the path
 * c1 -> ... -> ci, of which the last CANCEL_VIA_MAX hops are kept. */
static void chain_check_reason(const struct chain *c, size_t i, int kind,
                               const char *detail, int64_t time) {
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c->s[i]), &r), 1);
  assert_int_equal(r.kind, kind);
  assert_i64_eq(r.time, time);
  assert_string_equal(r.origin, "root");
  assert_string_equal(r.detail, detail);
  size_t len = i < CANCEL_VIA_MAX ? i : CANCEL_VIA_MAX;
  assert_int_equal(r.via_len, len);
  assert_int_equal(r.via_skipped, i - len);
  for (size_t h = 0; h < len; h++) {
    char name[24];
    snprintf(name, sizeof name, "c%zu", i - len + 1 + h);
    assert_string_equal(r.via[h].name, name);
    assert_null(r.via[h].note);
  }
}

static void chain_check(struct chain *c, int kind, const char *detail) {
  cancel_reason root;
  assert_int_equal(cancel_token_reason(TOK(c->s[0]), &root), 1);
  for (size_t i = 0; i < c->n; i++)
    if (cancel_token_kind(TOK(c->s[i])) != kind) {
      print_error("source %zu: kind %d, not %d\n", i,
                  cancel_token_kind(TOK(c->s[i])), kind);
      fail();
    }
  /* A reason walks its whole via path, so only samples are read in full:
   * the first hops, some depths in between, and the leaf (whose walk
   * crosses every source of the chain). */
  size_t samples[] = {0, 1, 2, 3, 7, 8, 9, 100, 4096, c->n / 2, c->n - 2,
                      c->n - 1};
  for (size_t k = 0; k < sizeof samples / sizeof samples[0]; k++)
    if (samples[k] < c->n)
      chain_check_reason(c, samples[k], kind, detail, root.time);
  assert_int_equal(test_load(&c->leaf_fired.count), 1);
  assert_int_equal(cancel_unregister(&c->leaf_reg), 0);
}

/* Drops the root first, then each source in turn: each is left a zombie
 * kept by its child, so the leaf's unref frees the whole chain (the
 * iterative teardown). */
static void chain_free(struct chain *c) {
  for (size_t i = 0; i < c->n; i++)
    cancel_source_unref(c->s[i]);
  sem_destroy(&c->leaf_fired.sem);
  free(c->s);
}

static void *cancel_on_thread(void *arg) {
  return (void *)(intptr_t)cancel_source_cancel(arg);
}

static void test_deep_chain_cancel_from_thread(void **state) {
  (void)state;
  struct chain c;
  chain_build(&c, DEEP);
  /* On a thread of its own: a default 8 MiB stack, like the application's
   * threads. */
  void *rc = test_run_on_thread(cancel_on_thread, c.s[0]);
  assert_int_equal((intptr_t)rc, 1);
  chain_check(&c, CANCEL_REQUESTED, "");
  chain_free(&c);
}

static void test_deep_chain_cancel_from_timeout(void **state) {
  (void)state;
  struct chain c;
  chain_build(&c, DEEP);
  assert_int_equal(cancel_source_cancel_after(c.s[0], CANCEL_MSEC(1)), 0);
  /* The leaf is the last source the timer thread reaches. */
  assert_int_equal(test_sem_wait_ns(&c.leaf_fired.sem, test_tol(CANCEL_SEC(60))),
                   0);
  chain_check(&c, CANCEL_TIMEOUT, "1ms");
  chain_free(&c);
}

/* The same chain, dropped (all but the leaf) before its timeout fires: the
 * timer thread cancels a chain of zombies while the leaf is torn down. */
static void test_deep_zombie_chain_timeout(void **state) {
  (void)state;
  struct chain c;
  chain_build(&c, DEEP);
  assert_int_equal(cancel_source_cancel_after(c.s[0], CANCEL_MSEC(1)), 0);
  for (size_t i = 0; i < c.n - 1; i++)
    cancel_source_unref(c.s[i]);
  assert_int_equal(test_sem_wait_ns(&c.leaf_fired.sem, test_tol(CANCEL_SEC(60))),
                   0);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c.s[c.n - 1]), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "root");
  assert_int_equal(r.via_len + r.via_skipped, c.n - 1);
  assert_int_equal(cancel_unregister(&c.leaf_reg), 0);
  cancel_source_unref(c.s[c.n - 1]);
  sem_destroy(&c.leaf_fired.sem);
  free(c.s);
}

/* ---- Callback order over a tree ----------------------------------------- */

/* Each callback appends its name to `trace`, followed by '+' or '-' when it
 * has a token to peek at (cancelled or not yet). */
static char trace[256];
static size_t trace_len;

struct step {
  const char *name;
  const cancel_token *peek;
  cancel_reg *unreg; /* unregistered by this callback (itself or another) */
  int unreg_rc;
  cancel_reg *reg_inline; /* registered by this callback on `inline_tok` */
  const cancel_token *inline_tok;
  struct step *inline_step;
  int reg_rc;
};

static void trace_put(const char *s) {
  size_t n = strlen(s);
  assert_true(trace_len + n + 1 < sizeof trace);
  if (trace_len > 0)
    trace[trace_len++] = ' ';
  memcpy(trace + trace_len, s, n + 1);
  trace_len += n;
}

static void step_cb(void *arg) {
  struct step *s = arg;
  char buf[16];
  snprintf(buf, sizeof buf, "%s%s", s->name,
           s->peek == NULL                    ? ""
           : cancel_token_is_cancelled(s->peek) ? "+"
                                                : "-");
  trace_put(buf);
  if (s->unreg != NULL)
    s->unreg_rc = cancel_unregister(s->unreg);
  if (s->reg_inline != NULL)
    s->reg_rc =
        cancel_register(s->reg_inline, s->inline_tok, step_cb, s->inline_step);
}

/* R -> A -> AA, R -> B, D linked to A and B, E linked to D, a shield S on A
 * with no grace (it never follows A) and a shield S2 on AA with a 1 ms
 * grace.  Registrations on several levels, made in this order:
 *   R:  r1, [A], r2 (unregisters itself), [B], r3 (peeks at B)
 *   A:  a1 (peeks at AA), [AA], a2 (peeks at AA), [S], [D]
 *   AA: aa1, [S2]     B: b1, b2 (unregisters b1), [D]
 *   D:  d1 (registers x on the cancelled R: runs inline), [E], d2 (peeks
 *       at A)         E: e1     S: s1     S2: s2
 * Lists run newest first, and a link runs its child's whole list where it
 * sits.  This is the order the recursive cancel loop produced. */
static const char *const expected_trace =
    "r3- d2- e1 d1 x b2 r2- a2- aa1 a1+ r1";

static void test_callback_order_over_tree(void **state) {
  (void)state;
  trace_len = 0;
  trace[0] = '\0';
  cancel_source *R = new_src("R");
  const cancel_token *pr[] = {TOK(R)};
  cancel_reg r1, r2, r3, a1, a2, aa1, b1, b2, d1, d2, e1, s1, x;
  struct step sr1 = {.name = "r1"}, sr2 = {.name = "r2", .unreg = &r2};
  struct step sr3 = {.name = "r3"}, sa1 = {.name = "a1"}, sa2 = {.name = "a2"};
  struct step saa1 = {.name = "aa1"}, sb1 = {.name = "b1"};
  struct step sb2 = {.name = "b2", .unreg = &b1};
  struct step sx = {.name = "x"}, sd2 = {.name = "d2"}, se1 = {.name = "e1"};
  struct step ss1 = {.name = "s1"};
  struct step sd1 = {.name = "d1",
                     .reg_inline = &x,
                     .inline_tok = TOK(R),
                     .inline_step = &sx};

  assert_int_equal(cancel_register(&r1, TOK(R), step_cb, &sr1), 0);
  cancel_source *A = new_child("A", pr, 1);
  sr2.peek = TOK(A);
  assert_int_equal(cancel_register(&r2, TOK(R), step_cb, &sr2), 0);
  cancel_source *B = new_child("B", pr, 1);
  sr3.peek = TOK(B);
  assert_int_equal(cancel_register(&r3, TOK(R), step_cb, &sr3), 0);

  const cancel_token *pa[] = {TOK(A)};
  assert_int_equal(cancel_register(&a1, TOK(A), step_cb, &sa1), 0);
  cancel_source *AA = new_child("AA", pa, 1);
  sa1.peek = sa2.peek = TOK(AA);
  assert_int_equal(cancel_register(&a2, TOK(A), step_cb, &sa2), 0);
  cancel_source *S = NULL, *S2 = NULL;
  assert_int_equal(cancel_source_new_shield(&S, "S", TOK(A), 0), 0);
  assert_int_equal(cancel_register(&s1, TOK(S), step_cb, &ss1), 0);
  assert_int_equal(cancel_register(&aa1, TOK(AA), step_cb, &saa1), 0);
  assert_int_equal(
      cancel_source_new_shield(&S2, "S2", TOK(AA), CANCEL_MSEC(1)), 0);
  struct fire_rec s2;
  fire_rec_init(&s2);
  cancel_reg s2reg;
  assert_int_equal(cancel_register(&s2reg, TOK(S2), fire_cb, &s2), 0);

  assert_int_equal(cancel_register(&b1, TOK(B), step_cb, &sb1), 0);
  assert_int_equal(cancel_register(&b2, TOK(B), step_cb, &sb2), 0);
  const cancel_token *pab[] = {TOK(A), TOK(B)};
  cancel_source *D = new_child("D", pab, 2);
  assert_int_equal(cancel_register(&d1, TOK(D), step_cb, &sd1), 0);
  const cancel_token *pd[] = {TOK(D)};
  cancel_source *E = new_child("E", pd, 1);
  sd2.peek = TOK(A);
  assert_int_equal(cancel_register(&d2, TOK(D), step_cb, &sd2), 0);
  assert_int_equal(cancel_register(&e1, TOK(E), step_cb, &se1), 0);

  assert_int_equal(cancel_source_cancel(R), 1);
  assert_string_equal(trace, expected_trace);

  assert_int_equal(sr2.unreg_rc, 0); /* itself, while running */
  assert_int_equal(sb2.unreg_rc, 1); /* b1, still listed: never runs */
  assert_int_equal(sd1.reg_rc, 1);   /* x on a cancelled token: inline */

  /* Reasons: D was reached through B first (B's list ran before A's). */
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(E), &r), 1);
  assert_string_equal(r.origin, "R");
  assert_int_equal(r.via_len, 3);
  assert_string_equal(r.via[0].name, "B");
  assert_string_equal(r.via[1].name, "D");
  assert_string_equal(r.via[2].name, "E");
  assert_int_equal(cancel_token_reason(TOK(AA), &r), 1);
  assert_int_equal(r.via_len, 2);
  assert_string_equal(r.via[0].name, "A");
  assert_string_equal(r.via[1].name, "AA");

  /* The shields: S does not follow A; S2 follows AA after its grace, on
   * the timer thread, with AA's reason and a note on its own hop. */
  assert_false(cancel_token_is_cancelled(TOK(S)));
  assert_int_equal(test_sem_wait_ns(&s2.sem, test_tol(CANCEL_SEC(5))), 0);
  assert_int_equal(cancel_token_reason(TOK(S2), &r), 1);
  assert_int_equal(r.kind, CANCEL_REQUESTED);
  assert_string_equal(r.origin, "R");
  assert_int_equal(r.via_len, 3);
  assert_string_equal(r.via[2].name, "S2");
  assert_non_null(r.via[2].note);
  assert_string_equal(r.via[2].note, "grace 1ms expired");

  int done[] = {cancel_unregister(&r1), cancel_unregister(&r3),
                cancel_unregister(&a1), cancel_unregister(&a2),
                cancel_unregister(&aa1), cancel_unregister(&b2),
                cancel_unregister(&d1), cancel_unregister(&d2),
                cancel_unregister(&e1), cancel_unregister(&x),
                cancel_unregister(&s2reg)};
  for (size_t i = 0; i < sizeof done / sizeof done[0]; i++)
    assert_int_equal(done[i], 0);
  assert_int_equal(cancel_unregister(&s1), 1);
  sem_destroy(&s2.sem);
  cancel_source_unref(E);
  cancel_source_unref(D);
  cancel_source_unref(S2);
  cancel_source_unref(S);
  cancel_source_unref(AA);
  cancel_source_unref(B);
  cancel_source_unref(A);
  cancel_source_unref(R);
}

/* ---- Unref of a zombie while it is being cancelled ---------------------- */

/* A callback that says it started, then takes its time (the scenario is a
 * callback that is still running when the owner drops the source; the
 * sleep stands for its work, not for synchronisation). */
struct slow {
  sem_t started;
  int finished;
  int64_t ns;
};

static void slow_init(struct slow *s, int64_t ns) {
  sem_init(&s->started, 0, 0);
  s->finished = 0;
  s->ns = ns;
}

static void slow_cb(void *arg) {
  struct slow *s = arg;
  sem_post(&s->started);
  test_sleep_ns(s->ns);
  __atomic_store_n(&s->finished, 1, __ATOMIC_SEQ_CST);
}

/* p, kept alive by its child c, is cancelled by its timer; its callback is
 * running when the last reference to p goes.  unref must return only once
 * that callback has returned: then the registration may be freed. */
static void test_zombie_unref_waits_for_timer_cancel(void **state) {
  (void)state;
  cancel_source *p = new_src("p");
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("c", pp, 1);
  struct fire_rec cf;
  fire_rec_init(&cf);
  cancel_reg creg;
  assert_int_equal(cancel_register(&creg, TOK(c), fire_cb, &cf), 0);
  struct slow s;
  slow_init(&s, CANCEL_MSEC(50));
  cancel_reg *reg = malloc(sizeof *reg);
  assert_non_null(reg);
  assert_int_equal(cancel_register(reg, TOK(p), slow_cb, &s), 0);

  assert_int_equal(cancel_source_cancel_after(p, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&s.started, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_unref(p);
  int finished = __atomic_load_n(&s.finished, __ATOMIC_SEQ_CST);
  free(reg); /* allowed: unref returned, the callback has run */

  /* The cancel goes on to the child, on the timer thread (and on the old
   * code, that is after the slow callback: assert once it is over, so a
   * failure leaves no thread behind on this frame). */
  assert_int_equal(test_sem_wait_ns(&cf.sem, test_tol(CANCEL_SEC(5))), 0);
  assert_int_equal(finished, 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "p");
  assert_int_equal(cancel_unregister(&creg), 0);
  cancel_source_unref(c); /* and with it the zombie p */
  sem_destroy(&cf.sem);
  sem_destroy(&s.started);
}

/* The same, when the running callback unregisters itself and frees its
 * own registration while unref waits: unref must not wait on the
 * registration's memory (the registration model in tests/model found
 * that use after free in the first fix), and must still return once the
 * callback has. */
struct self_freeing {
  struct slow s;
  cancel_reg *reg;
};

static void self_freeing_cb(void *arg) {
  struct self_freeing *f = arg;
  sem_post(&f->s.started);
  test_sleep_ns(f->s.ns); /* unref is waiting by now */
  assert_int_equal(cancel_unregister(f->reg), 0);
  free(f->reg);
  __atomic_store_n(&f->s.finished, 1, __ATOMIC_SEQ_CST);
}

static void test_zombie_unref_callback_frees_itself(void **state) {
  (void)state;
  cancel_source *p = new_src("p");
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("c", pp, 1);
  struct fire_rec cf;
  fire_rec_init(&cf);
  cancel_reg creg;
  assert_int_equal(cancel_register(&creg, TOK(c), fire_cb, &cf), 0);
  struct self_freeing f;
  slow_init(&f.s, CANCEL_MSEC(50));
  f.reg = malloc(sizeof *f.reg);
  assert_non_null(f.reg);
  assert_int_equal(cancel_register(f.reg, TOK(p), self_freeing_cb, &f), 0);

  assert_int_equal(cancel_source_cancel_after(p, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&f.s.started, test_tol(CANCEL_SEC(5))),
                   0);
  cancel_source_unref(p);
  int finished = __atomic_load_n(&f.s.finished, __ATOMIC_SEQ_CST);
  assert_int_equal(test_sem_wait_ns(&cf.sem, test_tol(CANCEL_SEC(5))), 0);
  assert_int_equal(finished, 1);
  assert_int_equal(cancel_unregister(&creg), 0);
  cancel_source_unref(c);
  sem_destroy(&cf.sem);
  sem_destroy(&f.s.started);
}

struct canceller {
  cancel_source *src;
  int rc;
};

static void *canceller_main(void *arg) {
  struct canceller *k = arg;
  k->rc = cancel_source_cancel(k->src);
  return NULL;
}

/* The same when the cancel reaches p through its own parent g, cancelled
 * on another thread. */
static void test_zombie_unref_waits_for_grandparent_cancel(void **state) {
  (void)state;
  cancel_source *g = new_src("g");
  const cancel_token *pg[] = {TOK(g)};
  cancel_source *p = new_child("p", pg, 1);
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("c", pp, 1);
  struct slow s;
  slow_init(&s, CANCEL_MSEC(50));
  cancel_reg *reg = malloc(sizeof *reg);
  assert_non_null(reg);
  assert_int_equal(cancel_register(reg, TOK(p), slow_cb, &s), 0);

  struct canceller k = {.src = g, .rc = -1};
  pthread_t t = test_thread_start(canceller_main, &k);
  assert_int_equal(test_sem_wait_ns(&s.started, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_unref(p);
  int finished = __atomic_load_n(&s.finished, __ATOMIC_SEQ_CST);
  free(reg);
  test_thread_join(t);
  assert_int_equal(finished, 1);
  assert_int_equal(k.rc, 1);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(c), &r), 1);
  assert_string_equal(r.origin, "g");
  assert_int_equal(r.via_len, 2);
  assert_string_equal(r.via[0].name, "p");
  assert_string_equal(r.via[1].name, "c");
  cancel_source_unref(c);
  cancel_source_unref(g);
  sem_destroy(&s.started);
}

/* The other orders.  p has two callbacks: the newest (slow) is running on
 * the timer thread, the older one waits for its turn, when p's last
 * reference goes: unref waits for the running one and drops the waiting
 * one (it never runs, unregister says so), as for any zombie. */
static void test_zombie_unref_drops_waiting_callbacks(void **state) {
  (void)state;
  cancel_source *p = new_src("p");
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("c", pp, 1);
  int later = 0;
  cancel_reg *waiting = malloc(sizeof *waiting);
  cancel_reg *running = malloc(sizeof *running);
  assert_non_null(waiting);
  assert_non_null(running);
  struct slow s;
  slow_init(&s, CANCEL_MSEC(50));
  assert_int_equal(cancel_register(waiting, TOK(p), test_count_cb, &later), 0);
  assert_int_equal(cancel_register(running, TOK(p), slow_cb, &s), 0);

  assert_int_equal(cancel_source_cancel_after(p, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&s.started, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_unref(p);
  int finished = __atomic_load_n(&s.finished, __ATOMIC_SEQ_CST);
  assert_int_equal(cancel_unregister(waiting), 1);
  free(running);
  free(waiting);
  assert_true(test_wait_until(test_token_cancelled, (void *)TOK(c),
                              test_tol(CANCEL_SEC(5))));
  assert_int_equal(finished, 1);
  assert_int_equal(test_load(&later), 0);
  cancel_source_unref(c);
  sem_destroy(&s.started);
}

/* While p's cancel is inside its child (c's callback runs), p's own
 * callbacks that wait for their turn are dropped by unref, which does not
 * wait for the child's callbacks: they are not p's. */
static void test_zombie_unref_while_cancel_is_in_child(void **state) {
  (void)state;
  cancel_source *p = new_src("p");
  int later = 0;
  cancel_reg *waiting = malloc(sizeof *waiting);
  assert_non_null(waiting);
  assert_int_equal(cancel_register(waiting, TOK(p), test_count_cb, &later), 0);
  const cancel_token *pp[] = {TOK(p)};
  cancel_source *c = new_child("c", pp, 1);
  struct slow s;
  slow_init(&s, CANCEL_MSEC(50));
  cancel_reg creg;
  assert_int_equal(cancel_register(&creg, TOK(c), slow_cb, &s), 0);

  assert_int_equal(cancel_source_cancel_after(p, CANCEL_MSEC(1)), 0);
  assert_int_equal(test_sem_wait_ns(&s.started, test_tol(CANCEL_SEC(5))), 0);
  cancel_source_unref(p);
  assert_int_equal(cancel_unregister(waiting), 1);
  free(waiting);
  assert_int_equal(cancel_unregister(&creg), 0); /* waits for it */
  assert_int_equal(__atomic_load_n(&s.finished, __ATOMIC_SEQ_CST), 1);
  assert_int_equal(test_load(&later), 0);
  cancel_source_unref(c);
  sem_destroy(&s.started);
}

/* From a callback of p itself, unref of the zombie p returns at once (it
 * must not wait for the callback it is called from), and the cancel goes
 * on to the child. */
struct self_unref {
  cancel_source *p;
  int ran;
};

static void self_unref_cb(void *arg) {
  struct self_unref *u = arg;
  cancel_source_unref(u->p);
  __atomic_store_n(&u->ran, 1, __ATOMIC_SEQ_CST);
}

static void test_zombie_unref_from_own_callback(void **state) {
  (void)state;
  for (int timer = 0; timer < 2; timer++) {
    cancel_source *p = new_src("p");
    const cancel_token *pp[] = {TOK(p)};
    cancel_source *c = new_child("c", pp, 1);
    struct fire_rec cf;
    fire_rec_init(&cf);
    cancel_reg creg, preg;
    assert_int_equal(cancel_register(&creg, TOK(c), fire_cb, &cf), 0);
    struct self_unref u = {.p = p, .ran = 0};
    assert_int_equal(cancel_register(&preg, TOK(p), self_unref_cb, &u), 0);
    /* The callback owns p's reference from here on. */
    if (timer)
      assert_int_equal(cancel_source_cancel_after(p, CANCEL_MSEC(1)), 0);
    else
      assert_int_equal(cancel_source_cancel(p), 1);
    assert_int_equal(test_sem_wait_ns(&cf.sem, test_tol(CANCEL_SEC(5))), 0);
    assert_int_equal(__atomic_load_n(&u.ran, __ATOMIC_SEQ_CST), 1);
    assert_int_equal(cancel_unregister(&creg), 0);
    cancel_source_unref(c);
    /* preg was detached or had run: either way it is not touched again. */
    sem_destroy(&cf.sem);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_callback_order_over_tree),
      cmocka_unit_test(test_zombie_unref_waits_for_timer_cancel),
      cmocka_unit_test(test_zombie_unref_waits_for_grandparent_cancel),
      cmocka_unit_test(test_zombie_unref_callback_frees_itself),
      cmocka_unit_test(test_zombie_unref_drops_waiting_callbacks),
      cmocka_unit_test(test_zombie_unref_while_cancel_is_in_child),
      cmocka_unit_test(test_zombie_unref_from_own_callback),
      cmocka_unit_test(test_deep_chain_cancel_from_thread),
      cmocka_unit_test(test_deep_chain_cancel_from_timeout),
      cmocka_unit_test(test_deep_zombie_chain_timeout),
  };
  /* Subsets by name (cmocka globs), as in io_test: CANCEL_TEST_FILTER runs
   * only the tests that match, CANCEL_TEST_SKIP skips those that match. */
  if (getenv("CANCEL_TEST_FILTER") != NULL)
    cmocka_set_test_filter(getenv("CANCEL_TEST_FILTER"));
  if (getenv("CANCEL_TEST_SKIP") != NULL)
    cmocka_set_skip_filter(getenv("CANCEL_TEST_SKIP"));
  return cmocka_run_group_tests(tests, NULL, NULL);
}
