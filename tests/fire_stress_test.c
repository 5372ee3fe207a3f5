/*
 * Stress for the cancel loop: chains of linked sources (mostly short, some
 * thousands deep) cancelled from a thread, from a timer, or both at once
 * (the timer at the root, a thread in the middle), while another thread
 * drops the references to the chain's sources, each of which is then a
 * zombie kept alive by its child (or, for the leaf, torn down with every
 * zombie above it).  Sometimes the chain hangs under a grandparent whose
 * own cancel reaches it.
 *
 * Invariants checked, per application callback (heap registrations, freed
 * as soon as the unref of their source returned, as the header allows):
 *   - it runs at most once;
 *   - it never starts after the unref of its source returned, and is not
 *     still running when that unref returns (unref waits for a callback in
 *     flight on another thread, and the callbacks still waiting are
 *     dropped);
 *   - at the end of a round, every one that started has finished;
 *   - the leaf (when the test keeps it) is cancelled with the reason of one
 *     of the sources that were cancelled, the path counting every hop.
 * ASan sees any touch of a freed registration or source, TSan the races.
 *
 * CANCEL_STRESS_SCALE (default 1.0) scales the number of rounds (20,000,
 * 4,000 under TSan).
 */
#include "test_util.h"

enum { MAX_REGS = 2, DEEP_MIN = 1000, DEEP_SPAN = 2000 };

/* TSan runs this about ten times slower: fewer rounds keep it near the
 * other stress tests' time (CANCEL_STRESS_SCALE still scales them). */
#if defined(__SANITIZE_THREAD__)
#define ROUNDS 4000
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define ROUNDS 4000
#endif
#endif
#ifndef ROUNDS
#define ROUNDS 20000
#endif

struct rec {
  int started;  /* atomic: how often the callback started */
  int finished; /* atomic */
  int freed;    /* atomic: the unref of its source returned */
  int spin;     /* how long the callback takes (yields) */
};

struct node {
  cancel_source *src;
  int nregs;
  cancel_reg *regs[MAX_REGS];
  struct rec recs[MAX_REGS];
};

struct round {
  struct node *nodes; /* [0] is the chain's root, [n-1] its leaf */
  size_t n;
  cancel_source *grand; /* a parent of the root, or NULL */
  cancel_source *mid;   /* C's reference: cancelled by C, or NULL */
  size_t mid_idx;       /* its node (SIZE_MAX: none), whose callbacks the
                         * main thread frees once C has dropped it */
  cancel_source *root_cancel; /* cancelled by C from a thread, or NULL */
  bool keep_leaf;   /* the main thread keeps the leaf and checks it */
  bool root_first;  /* U drops root to leaf; else in a shuffled order */
  size_t *order;    /* U's order */
};

static struct round rnd;
static pthread_barrier_t start_bar, end_bar;
static int violations; /* atomic */
static int stop;       /* atomic: no more rounds */
static long overlaps;  /* U only: unrefs that found a callback running */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

static uint64_t rng(void) { /* xorshift64*, main thread only */
  rng_state ^= rng_state >> 12;
  rng_state ^= rng_state << 25;
  rng_state ^= rng_state >> 27;
  return rng_state * 0x2545f4914f6cdd1du;
}

static void violation(const char *what, size_t i) {
  __atomic_add_fetch(&violations, 1, __ATOMIC_SEQ_CST);
  print_error("violation: %s (source %zu)\n", what, i);
}

static void rec_cb(void *arg) {
  struct rec *r = arg;
  if (__atomic_load_n(&r->freed, __ATOMIC_SEQ_CST))
    violation("callback started after its source's unref returned", 0);
  if (__atomic_add_fetch(&r->started, 1, __ATOMIC_SEQ_CST) != 1)
    violation("callback ran twice", 0);
  for (int k = 0; k < r->spin; k++)
    sched_yield();
  __atomic_store_n(&r->finished, 1, __ATOMIC_SEQ_CST);
}

/* C: the canceller thread. */
static void *canceller(void *arg) {
  (void)arg;
  for (;;) {
    pthread_barrier_wait(&start_bar);
    if (__atomic_load_n(&stop, __ATOMIC_SEQ_CST))
      return NULL;
    if (rnd.root_cancel != NULL && cancel_source_cancel(rnd.root_cancel) < 0)
      violation("cancel failed", 0);
    if (rnd.mid != NULL) {
      if (cancel_source_cancel(rnd.mid) < 0)
        violation("cancel failed", 0);
      cancel_source_unref(rnd.mid); /* C's own reference */
    }
    pthread_barrier_wait(&end_bar);
  }
}

/* U: drops the chain's references; after each unref the source's
 * callbacks have run or never will, so it checks and frees them. */
static void *unreffer(void *arg) {
  (void)arg;
  for (;;) {
    pthread_barrier_wait(&start_bar);
    if (__atomic_load_n(&stop, __ATOMIC_SEQ_CST))
      return NULL;
    size_t n = rnd.keep_leaf ? rnd.n - 1 : rnd.n;
    for (size_t k = 0; k < n; k++) {
      size_t i = rnd.root_first ? k : rnd.order[k];
      struct node *nd = &rnd.nodes[i];
      for (int j = 0; j < nd->nregs; j++)
        if (__atomic_load_n(&nd->recs[j].started, __ATOMIC_SEQ_CST) &&
            !__atomic_load_n(&nd->recs[j].finished, __ATOMIC_SEQ_CST))
          overlaps++; /* this unref races a callback in flight */
      cancel_source_unref(nd->src);
      if (i == rnd.mid_idx)
        continue; /* C may hold the last reference: not ours to check */
      for (int j = 0; j < nd->nregs; j++) {
        struct rec *r = &nd->recs[j];
        __atomic_store_n(&r->freed, 1, __ATOMIC_SEQ_CST);
        if (__atomic_load_n(&r->started, __ATOMIC_SEQ_CST) &&
            !__atomic_load_n(&r->finished, __ATOMIC_SEQ_CST))
          violation("unref returned while a callback of its source ran", i);
        free(nd->regs[j]);
        nd->regs[j] = NULL;
      }
    }
    pthread_barrier_wait(&end_bar);
  }
}

static cancel_source *build_link(const char *name, cancel_source *parent) {
  cancel_source *s = NULL;
  const cancel_token *ps[] = {TOK(parent)};
  int rc = parent != NULL ? cancel_source_new_linked(&s, name, ps, 1)
                          : cancel_source_new(&s, name);
  assert_int_equal(rc, 0);
  return s;
}

static void round_setup(void) {
  uint64_t x = rng();
  size_t n = (x & 15) == 0 ? DEEP_MIN + (size_t)(rng() % DEEP_SPAN)
                           : 1 + (size_t)(rng() % 8);
  rnd.n = n;
  rnd.nodes = calloc(n, sizeof *rnd.nodes);
  rnd.order = calloc(n, sizeof *rnd.order);
  assert_non_null(rnd.nodes);
  assert_non_null(rnd.order);
  rnd.grand = (x >> 4) & 1 ? build_link("grand", NULL) : NULL;
  cancel_source *parent = rnd.grand;
  for (size_t i = 0; i < n; i++) {
    char name[24];
    snprintf(name, sizeof name, "s%zu", i);
    struct node *nd = &rnd.nodes[i];
    nd->src = build_link(name, parent);
    parent = nd->src;
    nd->nregs = (int)(rng() % (MAX_REGS + 1));
    for (int j = 0; j < nd->nregs; j++) {
      nd->recs[j].spin = (int)(rng() % 4);
      nd->regs[j] = malloc(sizeof(cancel_reg));
      assert_non_null(nd->regs[j]);
      assert_int_equal(
          cancel_register(nd->regs[j], TOK(nd->src), rec_cb, &nd->recs[j]), 0);
    }
    rnd.order[i] = i;
  }
  for (size_t i = n - 1; i > 0; i--) { /* Fisher-Yates */
    size_t j = (size_t)(rng() % (i + 1));
    size_t t = rnd.order[i];
    rnd.order[i] = rnd.order[j];
    rnd.order[j] = t;
  }
  rnd.keep_leaf = (x >> 5) & 1;
  rnd.root_first = (x >> 6) & 1;
  if (rnd.keep_leaf) { /* U's shuffled order leaves the leaf out */
    size_t k = 0;
    for (size_t i = 0; i < n; i++)
      if (rnd.order[i] != n - 1)
        rnd.order[k++] = rnd.order[i];
  }

  /* Who cancels: C from a thread, the root's timer, or both (the timer at
   * the top, C somewhere in the chain).  C cancels the grandparent (which
   * the main thread keeps) on the main thread's reference, and a source of
   * the chain (which U drops) on a reference of its own. */
  cancel_source *top = rnd.grand != NULL ? rnd.grand : rnd.nodes[0].src;
  rnd.root_cancel = NULL;
  rnd.mid = NULL;
  rnd.mid_idx = SIZE_MAX;
  switch ((x >> 7) % 3) {
  case 0:
    if (rnd.grand != NULL) {
      rnd.root_cancel = rnd.grand;
    } else {
      rnd.mid_idx = 0;
      rnd.mid = cancel_source_ref(rnd.nodes[0].src);
    }
    break;
  case 1:
    assert_true(cancel_source_cancel_after(top, (int64_t)(rng() % 100000)) >=
                0);
    break;
  default:
    assert_true(cancel_source_cancel_after(top, (int64_t)(rng() % 100000)) >=
                0);
    rnd.mid_idx = (size_t)(rng() % n);
    rnd.mid = cancel_source_ref(rnd.nodes[rnd.mid_idx].src);
    break;
  }
}

static bool leaf_cancelled(void *arg) {
  (void)arg;
  return cancel_token_is_cancelled(TOK(rnd.nodes[rnd.n - 1].src));
}

/* How far below the top (the grandparent, or s0) the source `name` is. */
static size_t depth_of(const char *name) {
  if (strcmp(name, "grand") == 0)
    return 0;
  return (size_t)atol(name + 1) + (rnd.grand != NULL ? 1 : 0);
}

static void round_check_and_free(void) {
  if (rnd.keep_leaf) {
    cancel_source *leaf = rnd.nodes[rnd.n - 1].src;
    /* Every round cancels the top or a source of the chain. */
    if (!test_wait_until(leaf_cancelled, NULL, test_tol(CANCEL_SEC(30))))
      violation("leaf never cancelled", rnd.n - 1);
    cancel_reason r;
    assert_int_equal(cancel_token_reason(TOK(leaf), &r), 1);
    if (r.kind == CANCEL_TIMEOUT) {
      if (depth_of(r.origin) != 0)
        violation("a timeout not from the top", rnd.n - 1);
    } else if (r.kind != CANCEL_REQUESTED) {
      violation("wrong kind", rnd.n - 1);
    }
    /* The path counts every hop from the origin down to the leaf. */
    size_t hops = r.via_len + r.via_skipped;
    if (hops != depth_of(cancel_source_name(leaf)) - depth_of(r.origin))
      violation("via path length", rnd.n - 1);
    cancel_source_unref(leaf); /* and every zombie above it */
  }
  if (rnd.grand != NULL)
    cancel_source_unref(rnd.grand);
  /* Every reference is gone: every callback has run or never will. */
  for (size_t i = 0; i < rnd.n; i++)
    for (int j = 0; j < rnd.nodes[i].nregs; j++) {
      struct rec *r = &rnd.nodes[i].recs[j];
      if (__atomic_load_n(&r->started, __ATOMIC_SEQ_CST) &&
          !__atomic_load_n(&r->finished, __ATOMIC_SEQ_CST))
        violation("callback still running at the end", i);
      __atomic_store_n(&r->freed, 1, __ATOMIC_SEQ_CST);
      free(rnd.nodes[i].regs[j]); /* what U left: the leaf's, C's source's */
    }
  /* After a violation a callback may still run on the records: the test
   * stops, and leaves them to it rather than crash in its own code. */
  if (test_load(&violations) == 0)
    free(rnd.nodes);
  free(rnd.order);
}

static void test_fire_stress(void **state) {
  (void)state;
  double scale = 1.0;
  const char *env = getenv("CANCEL_STRESS_SCALE");
  if (env != NULL && atof(env) > 0)
    scale = atof(env);
  int rounds = (int)(ROUNDS * scale);
  pthread_barrier_init(&start_bar, NULL, 3);
  pthread_barrier_init(&end_bar, NULL, 3);
  pthread_t c = test_thread_start(canceller, NULL);
  pthread_t u = test_thread_start(unreffer, NULL);
  for (int i = 0; i < rounds && test_load(&violations) == 0; i++) {
    round_setup();
    pthread_barrier_wait(&start_bar);
    pthread_barrier_wait(&end_bar);
    round_check_and_free();
  }
  __atomic_store_n(&stop, 1, __ATOMIC_SEQ_CST);
  pthread_barrier_wait(&start_bar);
  test_thread_join(c);
  test_thread_join(u);
  pthread_barrier_destroy(&start_bar);
  pthread_barrier_destroy(&end_bar);
  printf("%d rounds, %ld unrefs raced a running callback\n", rounds, overlaps);
  assert_int_equal(test_load(&violations), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fire_stress),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
