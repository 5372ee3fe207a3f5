/*
 * Sources, tokens and registrations: creation and teardown, names, the
 * cancel/check contract, callback semantics (once, LIFO, inline, removal,
 * re-entrancy, waiting), memory ordering, refcounts, errors and version.
 */
#include "test_util.h"

/* ---- Helpers ---------------------------------------------------------- */

/* Records the order in which callbacks ran. */
struct order_log {
  int seq[16];
  int n;
};

struct order_item {
  struct order_log *log;
  int id;
};

static void order_cb(void *arg) {
  struct order_item *it = arg;
  it->log->seq[it->log->n++] = it->id;
}

/* ---- Creation, names, teardown ---------------------------------------- */

static void test_new_unref(void **state) {
  (void)state;
  cancel_source *src = NULL;
  assert_int_equal(cancel_source_new(&src, "alpha"), 0);
  assert_non_null(src);
  assert_string_equal(cancel_source_name(src), "alpha");
  assert_false(cancel_token_is_cancelled(cancel_source_token(src)));
  assert_int_equal(cancel_token_check(cancel_source_token(src)), 0);
  assert_int_equal(cancel_token_kind(cancel_source_token(src)), CANCEL_NONE);
  cancel_source_unref(src);

  /* No name: "" (not NULL). */
  src = NULL;
  assert_int_equal(cancel_source_new(&src, NULL), 0);
  assert_non_null(src);
  assert_non_null(cancel_source_name(src));
  assert_string_equal(cancel_source_name(src), "");
  cancel_source_unref(src);
}

static void test_init_destroy(void **state) {
  (void)state;
  cancel_source src;
  memset(&src, 0xA5, sizeof src); /* init must not rely on zeroed storage */
  assert_int_equal(cancel_source_init(&src, "beta"), 0);
  assert_string_equal(cancel_source_name(&src), "beta");
  assert_false(cancel_token_is_cancelled(cancel_source_token(&src)));
  assert_int_equal(cancel_source_cancel(&src), 1);
  assert_true(cancel_token_is_cancelled(cancel_source_token(&src)));
  cancel_source_destroy(&src);

  assert_int_equal(cancel_source_init(&src, NULL), 0);
  assert_string_equal(cancel_source_name(&src), "");
  cancel_source_destroy(&src);
}

static void test_name_is_copied(void **state) {
  (void)state;
  char buf[32];
  cancel_source *heap = NULL;
  cancel_source local;

  strcpy(buf, "original");
  assert_int_equal(cancel_source_new(&heap, buf), 0);
  assert_int_equal(cancel_source_init(&local, buf), 0);
  memset(buf, 'X', sizeof buf - 1);
  buf[sizeof buf - 1] = '\0';
  assert_string_equal(cancel_source_name(heap), "original");
  assert_string_equal(cancel_source_name(&local), "original");

  /* The name also survives into the reason. */
  cancel_reason r;
  assert_int_equal(cancel_source_cancel(heap), 1);
  assert_int_equal(cancel_token_reason(cancel_source_token(heap), &r), 1);
  assert_string_equal(r.origin, "original");
  cancel_source_unref(heap);
  cancel_source_destroy(&local);
}

static void test_long_name_kept_whole(void **state) {
  (void)state;
  char name[201];
  for (int i = 0; i < 200; i++)
    name[i] = (char)('a' + i % 26);
  name[200] = '\0';

  /* Exactly at and around the inline limit, and far beyond it. */
  static const size_t lens[] = {CANCEL__NAME_INLINE - 1, CANCEL__NAME_INLINE,
                                CANCEL__NAME_INLINE + 1, 41, 200};
  for (size_t k = 0; k < sizeof lens / sizeof lens[0]; k++) {
    char want[201];
    memcpy(want, name, lens[k]);
    want[lens[k]] = '\0';
    char buf[201];
    strcpy(buf, want);

    cancel_source *heap = NULL;
    cancel_source local;
    assert_int_equal(cancel_source_new(&heap, buf), 0);
    assert_int_equal(cancel_source_init(&local, buf), 0);
    memset(buf, '#', lens[k]);
    assert_string_equal(cancel_source_name(heap), want);
    assert_string_equal(cancel_source_name(&local), want);

    cancel_reason r;
    assert_int_equal(cancel_source_cancel(&local), 1);
    assert_int_equal(cancel_token_reason(cancel_source_token(&local), &r), 1);
    assert_string_equal(r.origin, want);
    cancel_source_unref(heap);
    cancel_source_destroy(&local);
  }
}

/* ---- Check and cancel ------------------------------------------------- */

static void test_check_null_live_cancelled(void **state) {
  (void)state;
  assert_false(cancel_token_is_cancelled(NULL));
  assert_int_equal(cancel_token_check(NULL), 0);
  assert_null(cancel_source_token(NULL));
  assert_int_equal(cancel_token_kind(NULL), CANCEL_NONE);

  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "c"), 0);
  const cancel_token *tok = cancel_source_token(src);
  assert_non_null(tok);
  assert_false(cancel_token_is_cancelled(tok));
  assert_int_equal(cancel_token_check(tok), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_true(cancel_token_is_cancelled(tok));
  assert_int_equal(cancel_token_check(tok), -ECANCELED);
  /* Level-triggered: still cancelled on every later look. */
  for (int i = 0; i < 3; i++)
    assert_int_equal(cancel_token_check(tok), -ECANCELED);
  cancel_source_unref(src);
}

static void test_cancel_idempotent(void **state) {
  (void)state;
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "idem"), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(cancel_source_cancel(src), 0);
  assert_int_equal(cancel_source_cancel(src), 0);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_SHUTDOWN, "late"), 0);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 1);
  assert_int_equal(r.kind, CANCEL_REQUESTED);
  assert_string_equal(r.detail, "");
  assert_string_equal(r.origin, "idem");
  assert_int_equal(r.via_len, 0);
  assert_int_equal(cancel_token_kind(cancel_source_token(src)),
                   CANCEL_REQUESTED);
  cancel_source_unref(src);
}

static void test_cancel_with_first_wins(void **state) {
  (void)state;
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "fw"), 0);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_TIMEOUT, "first"), 1);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_SHUTDOWN, "second"),
                   0);
  assert_int_equal(cancel_source_cancel(src), 0);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.detail, "first");
  assert_int_equal(cancel_token_kind(cancel_source_token(src)), CANCEL_TIMEOUT);
  cancel_source_unref(src);
}

static void test_cancel_with_kinds(void **state) {
  (void)state;
  static const int kinds[] = {CANCEL_REQUESTED,   CANCEL_TIMEOUT,
                              CANCEL_CLIENT_GONE, CANCEL_SHUTDOWN,
                              CANCEL_USER,        CANCEL_USER + 42};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
    cancel_source *src;
    char detail[32];
    snprintf(detail, sizeof detail, "detail-%zu", i);
    assert_int_equal(cancel_source_new(&src, "k"), 0);
    assert_int_equal(cancel_source_cancel_with(src, kinds[i], detail), 1);
    memset(detail, 'Z', sizeof detail - 1); /* the detail was copied */
    detail[sizeof detail - 1] = '\0';
    assert_true(cancel_token_is_cancelled(cancel_source_token(src)));
    assert_int_equal(cancel_token_kind(cancel_source_token(src)), kinds[i]);
    cancel_reason r;
    assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 1);
    assert_int_equal(r.kind, kinds[i]);
    char want[32];
    snprintf(want, sizeof want, "detail-%zu", i);
    assert_string_equal(r.detail, want);
    cancel_source_unref(src);
  }

  /* A NULL detail reads back as "". */
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "k"), 0);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_CLIENT_GONE, NULL), 1);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 1);
  assert_int_equal(r.kind, CANCEL_CLIENT_GONE);
  assert_non_null(r.detail);
  assert_string_equal(r.detail, "");
  cancel_source_unref(src);

  /* A long detail (beyond the inline buffer) is kept whole. */
  char longd[120];
  memset(longd, 'd', sizeof longd - 1);
  longd[sizeof longd - 1] = '\0';
  assert_int_equal(cancel_source_new(&src, "k"), 0);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_USER + 1, longd), 1);
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 1);
  assert_string_equal(r.detail, longd);
  cancel_source_unref(src);
}

static void test_cancel_with_rejects_bad_kinds(void **state) {
  (void)state;
  /* Reserved (between SHUTDOWN and USER) and negative kinds. */
  static const int bad[] = {
      CANCEL_SHUTDOWN + 1, 50, CANCEL_USER - 1, -1, -100, INT32_MIN};
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "bad"), 0);
  for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
    assert_int_equal(cancel_source_cancel_with(src, bad[i], "x"), -EINVAL);
    assert_false(cancel_token_is_cancelled(cancel_source_token(src)));
  }
  /* Still cancellable properly afterwards. */
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_SHUTDOWN, NULL), 1);
  assert_int_equal(cancel_token_kind(cancel_source_token(src)),
                   CANCEL_SHUTDOWN);
  cancel_source_unref(src);
}

/* CANCEL_NONE is not in the accepted set (REQUESTED..SHUTDOWN, >= USER): a
 * token cancelled "with kind none" would report CANCEL_NONE while
 * cancelled. */
static void test_cancel_with_rejects_none(void **state) {
  (void)state;
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "none"), 0);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_NONE, NULL), -EINVAL);
  assert_false(cancel_token_is_cancelled(cancel_source_token(src)));
  cancel_source_unref(src);
}

/* Many threads race to cancel: exactly one wins, callbacks run once. */
struct race {
  cancel_source *src;
  struct test_gate bar;
  int wins;
};

static void stop_race(void *arg) {
  test_gate_open(&((struct race *)arg)->bar);
}

static void *race_cancel(void *arg) {
  struct race *r = arg;
  test_gate_pass(&r->bar);
  if (cancel_source_cancel(r->src) == 1)
    __atomic_add_fetch(&r->wins, 1, __ATOMIC_SEQ_CST);
  return NULL;
}

static void test_concurrent_cancel_one_winner(void **state) {
  (void)state;
  enum { THREADS = 4, ROUNDS = 50 };
  for (int round = 0; round < ROUNDS; round++) {
    /* Shared, and the registration too: a racer that cannot start fails
     * the test, and the teardown opens the gate for the others (whose
     * cancel runs the callback) and joins them. */
    struct race *rp = test_shared(sizeof *rp);
    int *count = test_shared(sizeof *count);
    cancel_reg *reg = test_shared(sizeof *reg);
    assert_int_equal(cancel_source_new(&rp->src, "race"), 0);
    assert_int_equal(cancel_register(reg, cancel_source_token(rp->src),
                                     test_count_cb, count),
                     0);
    test_gate_init(&rp->bar);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
      t[i] = test_helper_start(race_cancel, rp, stop_race);
    bool all = test_gate_release(&rp->bar, THREADS, test_tol(CANCEL_SEC(10)));
    for (int i = 0; i < THREADS; i++)
      test_helper_join(t[i]);
    test_gate_destroy(&rp->bar);
    assert_true(all);
    struct race r = *rp;
    assert_int_equal(r.wins, 1);
    assert_int_equal(test_load(count), 1);
    assert_int_equal(cancel_unregister(reg), 0);
    cancel_source_unref(r.src);
    test_shared_free(reg);
    test_shared_free(count);
    test_shared_free(rp);
  }
}

/* ---- Registrations ---------------------------------------------------- */

static void test_register_runs_once(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_source_new(&src, "once"), 0);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      0);
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(test_load(&count), 1); /* ran before cancel returned */
  assert_int_equal(cancel_source_cancel(src), 0);
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_TIMEOUT, NULL), 0);
  assert_int_equal(test_load(&count), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(test_load(&count), 1);
  cancel_source_unref(src);
}

static void test_callbacks_run_lifo(void **state) {
  (void)state;
  enum { N = 6 };
  cancel_source *src;
  cancel_reg regs[N];
  struct order_log log = {{0}, 0};
  struct order_item items[N];
  assert_int_equal(cancel_source_new(&src, "lifo"), 0);
  for (int i = 0; i < N; i++) {
    items[i].log = &log;
    items[i].id = i;
    assert_int_equal(cancel_register(&regs[i], cancel_source_token(src),
                                     order_cb, &items[i]),
                     0);
  }
  /* Remove one from the middle: the others keep their order. */
  assert_int_equal(cancel_unregister(&regs[2]), 1);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(log.n, N - 1);
  static const int want[] = {5, 4, 3, 1, 0};
  for (int i = 0; i < N - 1; i++)
    assert_int_equal(log.seq[i], want[i]);
  for (int i = 0; i < N; i++)
    if (i != 2)
      assert_int_equal(cancel_unregister(&regs[i]), 0);
  cancel_source_unref(src);
}

static void test_register_on_cancelled_runs_inline(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_source_new(&src, "inline"), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  memset(&reg, 0x5A, sizeof reg); /* register must not rely on zeroed reg */
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      1);
  assert_int_equal(test_load(&count), 1);
  /* As for any callback that ran: 0, then unregistering again is caught. */
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);
  assert_int_equal(test_load(&count), 1);
  cancel_source_unref(src);
}

struct tid_rec {
  pthread_t tid;
  int ran;
};

static void tid_cb(void *arg) {
  struct tid_rec *t = arg;
  t->tid = pthread_self();
  t->ran++;
}

static void test_register_inline_runs_on_caller_thread(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  struct tid_rec t = {0};
  assert_int_equal(cancel_source_new(&src, "inline-thread"), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(cancel_register(&reg, cancel_source_token(src), tid_cb, &t),
                   1);
  assert_int_equal(t.ran, 1);
  assert_true(pthread_equal(t.tid, pthread_self()));
  cancel_source_unref(src);
}

static void test_register_null_token(void **state) {
  (void)state;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_register(&reg, NULL, test_count_cb, &count), 0);
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(test_load(&count), 0);
}

static void test_unregister_before_cancel(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_source_new(&src, "unreg"), 0);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(test_load(&count), 0);
  cancel_source_unref(src);
}

static void test_unregister_after_ran(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_source_new(&src, "ran"), 0);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(test_load(&count), 1);
  assert_int_equal(cancel_unregister(&reg), -EINVAL); /* already removed */
  cancel_source_unref(src);
}

static void test_unregister_never_registered(void **state) {
  (void)state;
  static cancel_reg never; /* zero-initialised, never registered */
  assert_int_equal(cancel_unregister(&never), -EINVAL);
}

static void test_unregister_twice(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_source_new(&src, "twice"), 0);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(test_load(&count), 0);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);

  /* Also on the NULL token. */
  assert_int_equal(cancel_register(&reg, NULL, test_count_cb, &count), 0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(cancel_unregister(&reg), -EINVAL);
  cancel_source_unref(src);
}

/* The same storage can be registered again after it was removed. */
static void test_reg_reuse(void **state) {
  (void)state;
  cancel_source *a, *b;
  cancel_reg reg;
  int ca = 0, cb = 0;
  assert_int_equal(cancel_source_new(&a, "a"), 0);
  assert_int_equal(cancel_source_new(&b, "b"), 0);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(a), test_count_cb, &ca), 0);
  assert_int_equal(cancel_unregister(&reg), 1);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(b), test_count_cb, &cb), 0);
  assert_int_equal(cancel_source_cancel(a), 1);
  assert_int_equal(test_load(&ca), 0);
  assert_int_equal(test_load(&cb), 0);
  assert_int_equal(cancel_source_cancel(b), 1);
  assert_int_equal(test_load(&cb), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

/* ---- Re-entrancy: what a callback may do ------------------------------ */

struct self_unreg {
  cancel_reg reg;
  int ran;
  int unreg_ret;
};

static void self_unreg_cb(void *arg) {
  struct self_unreg *s = arg;
  s->ran++;
  s->unreg_ret = cancel_unregister(&s->reg);
}

static void test_callback_unregisters_itself(void **state) {
  (void)state;
  cancel_source *src;
  struct self_unreg s = {.ran = 0, .unreg_ret = 99};
  assert_int_equal(cancel_source_new(&src, "self"), 0);
  assert_int_equal(
      cancel_register(&s.reg, cancel_source_token(src), self_unreg_cb, &s), 0);
  assert_int_equal(cancel_source_cancel(src), 1); /* must not deadlock */
  assert_int_equal(s.ran, 1);
  assert_int_equal(s.unreg_ret, 0);
  /* It removed itself: removing it again is unregistering twice. */
  assert_int_equal(cancel_unregister(&s.reg), -EINVAL);
  cancel_source_unref(src);
}

struct sibling {
  cancel_reg older, newer;
  int older_ran, newer_ran;
  int unreg_ret;
};

static void sibling_older_cb(void *arg) {
  struct sibling *s = arg;
  s->older_ran++;
}

static void sibling_newer_cb(void *arg) {
  struct sibling *s = arg;
  s->newer_ran++;
  s->unreg_ret = cancel_unregister(&s->older);
}

static void test_callback_unregisters_sibling(void **state) {
  (void)state;
  cancel_source *src;
  struct sibling s = {.unreg_ret = 99};
  assert_int_equal(cancel_source_new(&src, "sib"), 0);
  const cancel_token *tok = cancel_source_token(src);
  assert_int_equal(cancel_register(&s.older, tok, sibling_older_cb, &s), 0);
  assert_int_equal(cancel_register(&s.newer, tok, sibling_newer_cb, &s), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(s.newer_ran, 1);
  assert_int_equal(s.unreg_ret, 1); /* removed before it ran */
  assert_int_equal(s.older_ran, 0);
  assert_int_equal(cancel_unregister(&s.newer), 0);
  assert_int_equal(cancel_unregister(&s.older), -EINVAL); /* already removed */
  assert_int_equal(s.older_ran, 0);
  cancel_source_unref(src);
}

struct chain {
  cancel_source *next;
  int ret;
};

static void chain_cb(void *arg) {
  struct chain *c = arg;
  c->ret = cancel_source_cancel_with(c->next, CANCEL_USER + 3, "chained");
}

static void test_callback_cancels_other_source(void **state) {
  (void)state;
  cancel_source *a, *b;
  cancel_reg ra, rb;
  int count_b = 0;
  struct chain c = {NULL, 99};
  assert_int_equal(cancel_source_new(&a, "a"), 0);
  assert_int_equal(cancel_source_new(&b, "b"), 0);
  c.next = b;
  assert_int_equal(cancel_register(&ra, cancel_source_token(a), chain_cb, &c),
                   0);
  assert_int_equal(
      cancel_register(&rb, cancel_source_token(b), test_count_cb, &count_b), 0);
  assert_int_equal(cancel_source_cancel(a), 1);
  assert_int_equal(c.ret, 1);
  assert_int_equal(test_load(&count_b), 1);
  assert_true(cancel_token_is_cancelled(cancel_source_token(b)));
  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(b), &r), 1);
  assert_int_equal(r.kind, CANCEL_USER + 3);
  assert_string_equal(r.origin, "b"); /* not linked: b is its own origin */
  assert_string_equal(r.detail, "chained");
  assert_int_equal(cancel_unregister(&ra), 0);
  assert_int_equal(cancel_unregister(&rb), 0);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

struct reg_in_cb {
  const cancel_token *tok;
  cancel_reg inner;
  int inner_count;
  int reg_ret;
  int inner_count_at_return;
};

static void reg_in_cb(void *arg) {
  struct reg_in_cb *s = arg;
  s->reg_ret =
      cancel_register(&s->inner, s->tok, test_count_cb, &s->inner_count);
  s->inner_count_at_return = test_load(&s->inner_count);
}

static void test_callback_registers_on_same_token(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg outer;
  struct reg_in_cb s = {.reg_ret = 99};
  assert_int_equal(cancel_source_new(&src, "reg-in-cb"), 0);
  s.tok = cancel_source_token(src);
  assert_int_equal(cancel_register(&outer, s.tok, reg_in_cb, &s), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(s.reg_ret, 1);
  assert_int_equal(s.inner_count_at_return, 1);
  assert_int_equal(test_load(&s.inner_count), 1);
  assert_int_equal(cancel_unregister(&outer), 0);
  cancel_source_unref(src);
}

/* A callback that drops the last reference to the source running it. */
struct drop_ref {
  cancel_source *src;
  int ran;
};

static void drop_ref_cb(void *arg) {
  struct drop_ref *d = arg;
  d->ran++;
  cancel_source_unref(d->src);
}

static void test_callback_drops_last_reference(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  struct drop_ref d = {NULL, 0};
  assert_int_equal(cancel_source_new(&src, "drop"), 0);
  d.src = src;
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), drop_ref_cb, &d), 0);
  assert_int_equal(cancel_source_cancel(src),
                   1); /* src freed by its callback */
  assert_int_equal(d.ran, 1);
  /* The callback ran; reg was not detached before running. */
  assert_int_equal(cancel_unregister(&reg), 0);
}

/* ---- Unregister waits for a callback running elsewhere ---------------- */

struct blocking {
  cancel_source *src;
  sem_t started, go;
  int done;
};

static void blocking_cb(void *arg) {
  struct blocking *b = arg;
  sem_post(&b->started);
  sem_wait(&b->go);
  __atomic_store_n(&b->done, 1, __ATOMIC_SEQ_CST);
}

static void *canceller_thread(void *arg) {
  struct blocking *b = arg;
  return (void *)(intptr_t)cancel_source_cancel(b->src);
}

/* The stop of both threads below: the callback returns. */
static void release_blocking(void *arg) {
  sem_post(&((struct blocking *)arg)->go);
}

static void *post_go_later(void *arg) {
  struct blocking *b = arg;
  /* Gives the test thread time to enter cancel_unregister() and block. */
  test_sleep_ns(CANCEL_MSEC(50));
  sem_post(&b->go);
  return NULL;
}

static void test_unregister_waits_for_running_callback(void **state) {
  (void)state;
  /* Shared, and the registration too: a failed assertion leaves the
   * threads (and the callback they run) to the teardown. */
  struct blocking *bp = test_shared(sizeof *bp);
  cancel_reg *reg = test_shared(sizeof *reg);
  sem_init(&bp->started, 0, 0);
  sem_init(&bp->go, 0, 0);
  assert_int_equal(cancel_source_new(&bp->src, "block"), 0);
  assert_int_equal(
      cancel_register(reg, cancel_source_token(bp->src), blocking_cb, bp), 0);

  pthread_t canceller =
      test_helper_start(canceller_thread, bp, release_blocking);
  assert_int_equal(test_sem_wait_ns(&bp->started, CANCEL_SEC(10)), 0);
  /* The callback now runs on `canceller` and blocks until go is posted. */
  pthread_t poster = test_helper_start(post_go_later, bp, release_blocking);
  int ret = cancel_unregister(reg);
  int done_at_return = __atomic_load_n(&bp->done, __ATOMIC_SEQ_CST);
  assert_int_equal(ret, 0);
  assert_int_equal(done_at_return, 1);

  test_helper_join(poster);
  assert_int_equal((intptr_t)test_helper_join(canceller), 1);
  cancel_source_unref(bp->src);
  sem_destroy(&bp->started);
  sem_destroy(&bp->go);
}

/* ---- Memory ordering: cancel is a release, checking an acquire -------- */

static int plain_payload; /* deliberately not atomic */

struct observer {
  const cancel_token *tok;
  int seen;
  bool saw_cancel;
};

static void *observe_thread(void *arg) {
  struct observer *o = arg;
  o->saw_cancel =
      test_wait_until(test_token_cancelled, (void *)o->tok, CANCEL_SEC(10));
  if (o->saw_cancel)
    o->seen = plain_payload;
  return NULL;
}

struct cb_reader {
  int seen;
  int ran;
};

static void read_payload_cb(void *arg) {
  struct cb_reader *r = arg;
  r->seen = plain_payload;
  r->ran++;
}

/* Registers (and removes) in a loop until registering finds the token
 * cancelled: the inline callback must then see the payload. */
struct late_register {
  const cancel_token *tok;
  struct cb_reader rd;
  int bad_unreg;
};

static void *late_register_thread(void *arg) {
  struct late_register *l = arg;
  int64_t end = cancel_now() + CANCEL_SEC(10);
  while (cancel_now() < end) {
    cancel_reg reg;
    int r = cancel_register(&reg, l->tok, read_payload_cb, &l->rd);
    if (r == 1)
      break;
    if (r != 0 || cancel_unregister(&reg) != 1) {
      /* Ran between register and unregister: fine only if cancelled. */
      if (!cancel_token_is_cancelled(l->tok))
        l->bad_unreg++;
      break;
    }
    sched_yield();
  }
  return NULL;
}

/* What a round shares with its threads (test_shared(): a thread that
 * cannot start fails the test, and the teardown cancels the source). */
struct publish {
  cancel_source *src;
  cancel_reg reg;
  struct cb_reader cbr;
  struct observer o;
  struct late_register l;
};

static void stop_publish(void *arg) {
  cancel_source_cancel(((struct publish *)arg)->src);
}

static void *publish_observe(void *arg) {
  return observe_thread(&((struct publish *)arg)->o);
}

static void *publish_late_register(void *arg) {
  return late_register_thread(&((struct publish *)arg)->l);
}

static void test_cancel_publishes_prior_writes(void **state) {
  (void)state;
  for (int round = 0; round < 20; round++) {
    struct publish *p = test_shared(sizeof *p);
    assert_int_equal(cancel_source_new(&p->src, "mo"), 0);
    cancel_source *src = p->src;
    const cancel_token *tok = cancel_source_token(src);
    p->o.tok = tok;
    p->l.tok = tok;
    assert_int_equal(cancel_register(&p->reg, tok, read_payload_cb, &p->cbr),
                     0);

    pthread_t t1 = test_helper_start(publish_observe, p, stop_publish);
    pthread_t t2 = test_helper_start(publish_late_register, p, stop_publish);
    plain_payload = 1000 + round; /* written before cancel, no other sync */
    assert_int_equal(cancel_source_cancel(src), 1);
    test_helper_join(t1);
    test_helper_join(t2);
    struct cb_reader cbr = p->cbr;
    struct observer o = p->o;
    struct late_register l = p->l;

    assert_int_equal(cbr.ran, 1);
    assert_int_equal(cbr.seen, 1000 + round);
    assert_true(o.saw_cancel);
    assert_int_equal(o.seen, 1000 + round);
    assert_int_equal(l.bad_unreg, 0);
    assert_int_equal(l.rd.ran, 1);
    assert_int_equal(l.rd.seen, 1000 + round);
    assert_int_equal(cancel_unregister(&p->reg), 0);
    cancel_source_unref(src);
    test_shared_free(p);
  }
}

/* ---- Teardown with registrations, refcounts --------------------------- */

static void test_destroy_detaches_registrations(void **state) {
  (void)state;
  enum { N = 3 };
  int count = 0;
  cancel_reg regs[N];

  cancel_source *heap;
  assert_int_equal(cancel_source_new(&heap, "detach"), 0);
  for (int i = 0; i < N; i++)
    assert_int_equal(cancel_register(&regs[i], cancel_source_token(heap),
                                     test_count_cb, &count),
                     0);
  cancel_source_unref(heap); /* the last reference */
  for (int i = 0; i < N; i++)
    assert_int_equal(cancel_unregister(&regs[i]), 1);
  assert_int_equal(test_load(&count), 0);

  cancel_source local;
  assert_int_equal(cancel_source_init(&local, "detach-local"), 0);
  for (int i = 0; i < N; i++)
    assert_int_equal(cancel_register(&regs[i], cancel_source_token(&local),
                                     test_count_cb, &count),
                     0);
  cancel_source_destroy(&local);
  /* The storage is reusable at once: scribble over it. */
  memset(&local, 0xEE, sizeof local);
  for (int i = 0; i < N; i++)
    assert_int_equal(cancel_unregister(&regs[i]), 1);
  assert_int_equal(test_load(&count), 0);
}

static void test_refcount(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  assert_int_equal(cancel_source_new(&src, "rc"), 0);
  assert_ptr_equal(cancel_source_ref(src), src);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      0);
  cancel_source_unref(src); /* one reference left: still fully alive */
  assert_string_equal(cancel_source_name(src), "rc");
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(test_load(&count), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(src); /* frees; ASan/valgrind catch a double free */

  /* Many references taken and dropped from several threads. */
  assert_int_equal(cancel_source_new(&src, "rc2"), 0);
  for (int i = 0; i < 100; i++)
    cancel_source_ref(src);
  for (int i = 0; i < 100; i++)
    cancel_source_unref(src);
  assert_string_equal(cancel_source_name(src), "rc2");
  cancel_source_unref(src);
}

static void *ref_unref_thread(void *arg) {
  cancel_source *src = arg;
  for (int i = 0; i < 10000; i++) {
    cancel_source_ref(src);
    cancel_source_unref(src);
  }
  cancel_source_unref(src); /* the reference handed to this thread */
  return NULL;
}

static void test_refcount_threads(void **state) {
  (void)state;
  enum { THREADS = 4 };
  cancel_source *src;
  int count = 0;
  cancel_reg reg;
  assert_int_equal(cancel_source_new(&src, "rc-mt"), 0);
  assert_int_equal(
      cancel_register(&reg, cancel_source_token(src), test_count_cb, &count),
      0);
  pthread_t t[THREADS];
  for (int i = 0; i < THREADS; i++)
    t[i] = test_helper_start(ref_unref_thread, cancel_source_ref(src),
                             test_no_stop);
  for (int i = 0; i < THREADS; i++)
    test_helper_join(t[i]);
  /* Our own reference is the only one left: the source is alive. */
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(test_load(&count), 1);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(src);
}

static void test_unref_null_is_noop(void **state) {
  (void)state;
  cancel_source_unref(NULL);
  cancel_source_destroy(NULL);
}

/* ---- Errors, version, time -------------------------------------------- */

static void test_strerror(void **state) {
  (void)state;
  static const int codes[] = {ECANCELED, ETIMEDOUT, EINVAL, ENOMEM, EAGAIN};
  for (size_t i = 0; i < sizeof codes / sizeof codes[0]; i++) {
    const char *neg = cancel_strerror(-codes[i]);
    const char *pos = cancel_strerror(codes[i]);
    assert_non_null(neg);
    assert_non_null(pos);
    assert_true(strlen(neg) > 0);
    assert_string_equal(neg, pos); /* the sign is ignored */
  }
  assert_string_not_equal(cancel_strerror(-ECANCELED),
                          cancel_strerror(-ETIMEDOUT));
  assert_string_not_equal(cancel_strerror(-EINVAL), cancel_strerror(-ENOMEM));
  assert_non_null(cancel_strerror(0));
  assert_non_null(cancel_strerror(-123456));
  assert_non_null(cancel_strerror(987654));
  assert_non_null(cancel_strerror(INT32_MAX));
}

static void test_version(void **state) {
  (void)state;
  assert_non_null(cancel_version());
  assert_string_equal(cancel_version(), CANCEL_VERSION_STRING);
  assert_int_equal(CANCEL_VERSION_HEX, 0x000100);
}

static void test_now_monotonic(void **state) {
  (void)state;
  int64_t prev = cancel_now();
  assert_i64_gt(prev, 0);
  for (int i = 0; i < 1000; i++) {
    int64_t t = cancel_now();
    assert_i64_ge(t, prev);
    prev = t;
  }
  int64_t a = cancel_now();
  test_sleep_ns(CANCEL_MSEC(5));
  int64_t b = cancel_now();
  assert_i64_ge(b - a, CANCEL_MSEC(5));
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  int64_t mono = (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
  int64_t c = cancel_now();
  assert_i64_ge(c, mono); /* the same clock */
  assert_i64_le(c - mono, CANCEL_MSEC(100) + test_tol(CANCEL_MSEC(100)));
}

static void test_null_arguments_einval(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reg reg;
  int count = 0;
  cancel_reason r;

  assert_int_equal(cancel_source_new(NULL, "x"), -EINVAL);
  assert_int_equal(cancel_source_init(NULL, "x"), -EINVAL);
  assert_int_equal(cancel_source_cancel(NULL), -EINVAL);
  assert_int_equal(cancel_source_cancel_with(NULL, CANCEL_TIMEOUT, "x"),
                   -EINVAL);
  assert_int_equal(cancel_unregister(NULL), -EINVAL);

  assert_int_equal(cancel_source_new(&src, "x"), 0);
  const cancel_token *tok = cancel_source_token(src);
  assert_int_equal(cancel_register(NULL, tok, test_count_cb, &count), -EINVAL);
  assert_int_equal(cancel_register(&reg, tok, NULL, &count), -EINVAL);
  assert_int_equal(cancel_register(NULL, NULL, test_count_cb, &count), -EINVAL);
  assert_int_equal(cancel_register(&reg, NULL, NULL, &count), -EINVAL);
  assert_int_equal(cancel_token_reason(tok, NULL), -EINVAL);
  assert_int_equal(cancel_token_reason(NULL, NULL), -EINVAL);

  /* A NULL token reports "not cancelled". */
  memset(&r, 0x77, sizeof r);
  assert_int_equal(cancel_token_reason(NULL, &r), 0);
  assert_int_equal(r.kind, CANCEL_NONE);

  /* None of the rejected calls cancelled or registered anything. */
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(test_load(&count), 0);
  cancel_source_unref(src);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_new_unref),
      cmocka_unit_test(test_init_destroy),
      cmocka_unit_test(test_name_is_copied),
      cmocka_unit_test(test_long_name_kept_whole),
      cmocka_unit_test(test_check_null_live_cancelled),
      cmocka_unit_test(test_cancel_idempotent),
      cmocka_unit_test(test_cancel_with_first_wins),
      cmocka_unit_test(test_cancel_with_kinds),
      cmocka_unit_test(test_cancel_with_rejects_bad_kinds),
      cmocka_unit_test(test_cancel_with_rejects_none),
      cmocka_unit_test(test_concurrent_cancel_one_winner),
      cmocka_unit_test(test_register_runs_once),
      cmocka_unit_test(test_callbacks_run_lifo),
      cmocka_unit_test(test_register_on_cancelled_runs_inline),
      cmocka_unit_test(test_register_inline_runs_on_caller_thread),
      cmocka_unit_test(test_register_null_token),
      cmocka_unit_test(test_unregister_before_cancel),
      cmocka_unit_test(test_unregister_after_ran),
      cmocka_unit_test(test_unregister_never_registered),
      cmocka_unit_test(test_unregister_twice),
      cmocka_unit_test(test_reg_reuse),
      cmocka_unit_test(test_callback_unregisters_itself),
      cmocka_unit_test(test_callback_unregisters_sibling),
      cmocka_unit_test(test_callback_cancels_other_source),
      cmocka_unit_test(test_callback_registers_on_same_token),
      cmocka_unit_test(test_callback_drops_last_reference),
      cmocka_unit_test(test_unregister_waits_for_running_callback),
      cmocka_unit_test(test_cancel_publishes_prior_writes),
      cmocka_unit_test(test_destroy_detaches_registrations),
      cmocka_unit_test(test_refcount),
      cmocka_unit_test(test_refcount_threads),
      cmocka_unit_test(test_unref_null_is_noop),
      cmocka_unit_test(test_strerror),
      cmocka_unit_test(test_version),
      cmocka_unit_test(test_now_monotonic),
      cmocka_unit_test(test_null_arguments_einval),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
