/*
 * Stress: 4 threads run at least 10^6 random operations in total over a
 * small shared pool of sources: register, unregister, cancel (also from
 * callbacks, chained), link (children of 1-2 pool sources, some of which
 * replace pool entries), destroy (replace a pool entry with a fresh
 * source), arm short timers, and read reasons.
 *
 * Lifetime rule (the header's: nobody may use a source concurrently with
 * its last unref): each pool source belongs to a `track` that owns its one
 * library reference and counts its users.  A thread becomes a user of a
 * pool entry under the pool mutex, and the last user to leave drops the
 * library reference under the track's mutex.  Unregistering also happens
 * under that mutex, so a registration is removed either before its source
 * is torn down or after (then it is detached: unregister returns 1), never
 * concurrently with the teardown.
 *
 * Invariants checked (per registration, with atomic counters):
 *   - a callback runs at most once, and never after its unregister returned;
 *   - register returns 1 iff the callback already ran inline; it returns 1
 *     whenever the source's cancel had completed before the call;
 *   - unregister 0 => the callback ran exactly once and has returned;
 *     unregister 1 => it never ran (and the source's cancel had not
 *     completed before the call: a completed cancel runs every listed
 *     callback);
 *   - a source whose cancel completed reads as cancelled, with a reason.
 *
 * CANCEL_STRESS_SCALE (default 1.0) scales the operation count; the default
 * is 10^6 operations.  Run under TSan to check the lock-free paths.
 */
#include "test_util.h"

enum { THREADS = 4, POOL = 8, MAX_LIVE = 32, MAX_DEPTH = 12 };

/* One per pool source ever created; outlives the source (freed at exit) so
 * that a registration can still look at it after the source was destroyed. */
struct track {
  pthread_mutex_t mu; /* serialises the teardown against unregisters */
  cancel_source *src; /* the track's library reference */
  int users;          /* threads, pool and registrations' targets */
  int destroyed;      /* under mu */
  int cancel_done;    /* set after a cancel of this source returned 1 */
  int depth;          /* link depth: bounds chains of pool children */
  struct track *all_next;
};

static struct track *pool[POOL];
static pthread_mutex_t pool_mu = PTHREAD_MUTEX_INITIALIZER;
static struct track *all_tracks;
static pthread_mutex_t tracks_mu = PTHREAD_MUTEX_INITIALIZER;

static long errors;
/* Outcome counts, to see that every path was taken. */
static long n_reg_inline, n_reg_listed, n_unreg_ran, n_unreg_removed,
    n_unreg_detached;
#define BUMP(x) __atomic_add_fetch(&(x), 1, __ATOMIC_RELAXED)

#define STRESS_ERROR(...)                                                      \
  do {                                                                         \
    if (__atomic_add_fetch(&errors, 1, __ATOMIC_SEQ_CST) <= 20) {              \
      fprintf(stderr, "stress_test: %s:%d: ", __FILE__, __LINE__);             \
      fprintf(stderr, __VA_ARGS__);                                            \
      fputc('\n', stderr);                                                     \
    }                                                                          \
  } while (0)

/* A track for src with one user (the caller), taking over its reference,
 * or NULL (an error counted; src is the caller's still) when memory ran
 * out: the run goes on and fails at its end. */
static struct track *track_new(cancel_source *src, int depth) {
  struct track *t = calloc(1, sizeof *t);
  if (t == NULL) {
    STRESS_ERROR("out of memory for a track");
    return NULL;
  }
  pthread_mutex_init(&t->mu, NULL);
  t->src = src;
  t->users = 1;
  t->depth = depth;
  pthread_mutex_lock(&tracks_mu);
  t->all_next = all_tracks;
  all_tracks = t;
  pthread_mutex_unlock(&tracks_mu);
  return t;
}

/* Leaves a track; the last user tears the source down. */
static void track_put(struct track *t) {
  if (__atomic_sub_fetch(&t->users, 1, __ATOMIC_ACQ_REL) == 0) {
    pthread_mutex_lock(&t->mu);
    t->destroyed = 1;
    cancel_source_unref(t->src);
    pthread_mutex_unlock(&t->mu);
  }
}

static void mark_cancelled(struct track *t) {
  __atomic_store_n(&t->cancel_done, 1, __ATOMIC_RELEASE);
}

static int was_cancelled(struct track *t) {
  return __atomic_load_n(&t->cancel_done, __ATOMIC_ACQUIRE);
}

/* A new pool source, or NULL (an error counted). */
static cancel_source *fresh_source(void) {
  cancel_source *s = NULL;
  int ret = cancel_source_new(&s, "pool");
  if (ret != 0) {
    STRESS_ERROR("source_new returned %d", ret);
    return NULL;
  }
  return s;
}

/* Becomes a user of pool entry i. */
static struct track *pool_get(int i) {
  pthread_mutex_lock(&pool_mu);
  struct track *t = pool[i];
  __atomic_add_fetch(&t->users, 1, __ATOMIC_ACQ_REL);
  pthread_mutex_unlock(&pool_mu);
  return t;
}

/* Puts t at entry i (the pool takes over the caller's use of t) and leaves
 * the old entry. */
static void pool_put(int i, struct track *t) {
  pthread_mutex_lock(&pool_mu);
  struct track *old = pool[i];
  pool[i] = t;
  pthread_mutex_unlock(&pool_mu);
  track_put(old);
}

/* ---- Registrations ---------------------------------------------------- */

struct rec {
  cancel_reg reg;
  struct track *tr;     /* the source it is registered on (not a user) */
  struct track *target; /* cancelled by the callback; we are its user */
  int count;            /* callback entries */
  int finished;         /* callback exits */
  int live;             /* from before register until unregister returned */
  int in_use;           /* owned by the worker (not shared) */
};

static const int kinds[] = {CANCEL_REQUESTED, CANCEL_TIMEOUT,
                            CANCEL_CLIENT_GONE, CANCEL_SHUTDOWN,
                            CANCEL_USER + 7};

static void rec_cb(void *arg) {
  struct rec *r = arg;
  if (!__atomic_load_n(&r->live, __ATOMIC_SEQ_CST))
    STRESS_ERROR("callback ran after its unregister returned");
  if (__atomic_add_fetch(&r->count, 1, __ATOMIC_SEQ_CST) != 1)
    STRESS_ERROR("callback ran twice");
  if (r->target != NULL) {
    int ret =
        cancel_source_cancel_with(r->target->src, CANCEL_USER + 1, "chain");
    if (ret == 1)
      mark_cancelled(r->target);
    else if (ret != 0)
      STRESS_ERROR("chained cancel returned %d", ret);
  }
  __atomic_store_n(&r->finished, 1, __ATOMIC_SEQ_CST);
}

static void rec_arm(struct rec *r, struct track *tr) {
  r->tr = tr;
  __atomic_store_n(&r->count, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&r->finished, 0, __ATOMIC_SEQ_CST);
  __atomic_store_n(&r->live, 1, __ATOMIC_SEQ_CST);
}

/* Registers r on tr (the caller is a user of tr); returns true when r is
 * now registered. */
static bool register_check(struct rec *r, struct track *tr) {
  rec_arm(r, tr);
  int done_before = was_cancelled(tr);
  int ret = cancel_register(&r->reg, TOK(tr->src), rec_cb, r);
  BUMP(*(ret == 1 ? &n_reg_inline : &n_reg_listed));
  if (ret == 1) {
    if (__atomic_load_n(&r->count, __ATOMIC_SEQ_CST) != 1 ||
        !__atomic_load_n(&r->finished, __ATOMIC_SEQ_CST))
      STRESS_ERROR("register returned 1 but the callback did not run inline");
    int u = cancel_unregister(&r->reg); /* as for any callback that ran */
    if (u != 0)
      STRESS_ERROR("unregister after register returned 1 gave %d", u);
  } else if (ret != 0) {
    STRESS_ERROR("register returned %d", ret);
  } else if (done_before) {
    STRESS_ERROR("register returned 0 on a source whose cancel had returned");
  }
  if (ret != 0)
    __atomic_store_n(&r->live, 0, __ATOMIC_SEQ_CST);
  return ret == 0;
}

/* Unregisters r (under its track's mutex: never concurrently with the
 * source's teardown) and checks the result against its counters. */
static void unregister_check(struct rec *r) {
  pthread_mutex_lock(&r->tr->mu);
  int destroyed = r->tr->destroyed;
  int done_before = was_cancelled(r->tr);
  int ret = cancel_unregister(&r->reg);
  pthread_mutex_unlock(&r->tr->mu);
  int count = __atomic_load_n(&r->count, __ATOMIC_SEQ_CST);
  int finished = __atomic_load_n(&r->finished, __ATOMIC_SEQ_CST);
  if (ret == 0)
    BUMP(n_unreg_ran);
  else if (ret == 1)
    BUMP(*(destroyed ? &n_unreg_detached : &n_unreg_removed));
  if (ret == 0) {
    if (count != 1 || !finished)
      STRESS_ERROR("unregister returned 0 but count=%d finished=%d", count,
                   finished);
  } else if (ret == 1) {
    if (count != 0)
      STRESS_ERROR("unregister returned 1 but the callback ran (%d)", count);
    if (done_before)
      STRESS_ERROR("unregister returned 1 after the source's cancel returned");
  } else {
    STRESS_ERROR("unregister returned %d (destroyed=%d)", ret, destroyed);
  }
  __atomic_store_n(&r->live, 0, __ATOMIC_SEQ_CST);
}

static void rec_release(struct rec *r) {
  if (r->target != NULL)
    track_put(r->target);
  r->target = NULL;
  r->in_use = 0;
}

/* ---- Workers ---------------------------------------------------------- */

struct worker {
  uint64_t rng;
  long ops;
  long done;
  long stat[8];
  struct rec recs[MAX_LIVE];
};

static uint64_t next_rand(struct worker *w) {
  w->rng ^= w->rng << 13;
  w->rng ^= w->rng >> 7;
  w->rng ^= w->rng << 17;
  return w->rng;
}

static int pick(struct worker *w, int n) {
  return (int)(next_rand(w) % (uint64_t)n);
}

static void op_unregister(struct worker *w) {
  int start = pick(w, MAX_LIVE);
  for (int k = 0; k < MAX_LIVE; k++) {
    struct rec *r = &w->recs[(start + k) % MAX_LIVE];
    if (r->in_use) {
      unregister_check(r);
      rec_release(r);
      return;
    }
  }
}

static void op_register(struct worker *w) {
  struct rec *r = NULL;
  int start = pick(w, MAX_LIVE);
  for (int k = 0; k < MAX_LIVE && r == NULL; k++)
    if (!w->recs[(start + k) % MAX_LIVE].in_use)
      r = &w->recs[(start + k) % MAX_LIVE];
  if (r == NULL) {
    op_unregister(w);
    return;
  }
  struct track *t = pool_get(pick(w, POOL));
  r->in_use = 1;
  r->target = pick(w, 8) == 0 ? pool_get(pick(w, POOL)) : NULL;
  if (!register_check(r, t))
    rec_release(r);
  track_put(t);
}

static void op_cancel(struct worker *w) {
  struct track *t = pool_get(pick(w, POOL));
  int kind = kinds[pick(w, (int)(sizeof kinds / sizeof kinds[0]))];
  int ret =
      cancel_source_cancel_with(t->src, kind, pick(w, 2) ? "stress" : NULL);
  if (ret == 1)
    mark_cancelled(t);
  else if (ret != 0)
    STRESS_ERROR("cancel returned %d", ret);
  if (!cancel_token_is_cancelled(TOK(t->src)))
    STRESS_ERROR("not cancelled after cancel");
  track_put(t);
}

static void op_link(struct worker *w) {
  int n = 1 + pick(w, 2);
  struct track *p[2];
  const cancel_token *toks[2];
  int done_before = 0, depth = 0;
  for (int i = 0; i < n; i++) {
    p[i] = pool_get(pick(w, POOL));
    toks[i] = TOK(p[i]->src);
    done_before |= was_cancelled(p[i]);
    if (p[i]->depth > depth)
      depth = p[i]->depth;
  }
  cancel_source *child = NULL;
  int ret = cancel_source_new_linked(&child, "child", toks, (size_t)n);
  if (ret != 0) {
    STRESS_ERROR("new_linked returned %d", ret);
    goto out;
  }
  if (done_before && !cancel_token_is_cancelled(TOK(child)))
    STRESS_ERROR("child of a cancelled parent is live");
  /* A parent's completed cancel cancelled the child inside our call. */
  struct track *ct = track_new(child, depth + 1);
  if (ct == NULL) {
    cancel_source_unref(child);
    goto out;
  }
  if (done_before)
    mark_cancelled(ct);

  struct rec r;
  memset(&r, 0, sizeof r);
  bool registered = register_check(&r, ct);
  if (pick(w, 2) == 0) {
    int cret = cancel_source_cancel(p[0]->src);
    if (cret == 1) {
      mark_cancelled(p[0]);
      if (!cancel_token_is_cancelled(TOK(child)))
        STRESS_ERROR("parent cancel did not reach the child");
      /* With one parent nobody else can cancel the child: it was cancelled
       * and its callback ran inside our cancel. */
      if (n == 1) {
        mark_cancelled(ct);
        if (registered && __atomic_load_n(&r.count, __ATOMIC_SEQ_CST) != 1)
          STRESS_ERROR("child callback did not run within parent cancel");
      }
    } else if (cret != 0) {
      STRESS_ERROR("cancel returned %d", cret);
    }
  }
  if (registered)
    unregister_check(&r);

  if (depth + 1 <= MAX_DEPTH && pick(w, 4) == 0)
    pool_put(pick(w, POOL), ct); /* the pool takes over our use */
  else
    track_put(ct);
out:
  for (int i = 0; i < n; i++)
    track_put(p[i]);
}

static void op_refresh(struct worker *w) {
  cancel_source *s = fresh_source();
  struct track *t = s != NULL ? track_new(s, 0) : NULL;
  if (t != NULL)
    pool_put(pick(w, POOL), t);
  else if (s != NULL)
    cancel_source_unref(s);
}

static void op_check(struct worker *w) {
  struct track *t = pool_get(pick(w, POOL));
  const cancel_token *tok = TOK(t->src);
  int done = was_cancelled(t);
  bool c = cancel_token_is_cancelled(tok);
  if (done && !c)
    STRESS_ERROR("cancel returned but the token reads live");
  cancel_reason r;
  int ret = cancel_token_reason(tok, &r);
  if (c && ret != 1)
    STRESS_ERROR("cancelled token, reason returned %d", ret);
  if (ret == 1) {
    if (r.kind == CANCEL_NONE || r.origin == NULL || r.detail == NULL ||
        r.via_len > CANCEL_VIA_MAX)
      STRESS_ERROR("bad reason kind=%d via_len=%zu", r.kind, r.via_len);
    if (cancel_token_kind(tok) != r.kind)
      STRESS_ERROR("kind %d != reason kind %d", cancel_token_kind(tok), r.kind);
    char buf[64];
    if (cancel_reason_format(&r, buf, sizeof buf) < 0)
      STRESS_ERROR("format failed");
  } else if (ret != 0) {
    STRESS_ERROR("reason returned %d", ret);
  }
  (void)cancel_token_deadline(tok);
  track_put(t);
}

static void op_timer(struct worker *w) {
  struct track *t = pool_get(pick(w, POOL));
  int ret = cancel_source_cancel_after(t->src, CANCEL_USEC(pick(w, 10000)));
  if (ret != 0 && ret != 1)
    STRESS_ERROR("cancel_after returned %d", ret);
  track_put(t);
}

/* Set by the teardown of a test that failed with workers running. */
static int quit;

static void stop_workers(void *arg) {
  (void)arg;
  __atomic_store_n(&quit, 1, __ATOMIC_RELAXED);
}

static void *worker_main(void *arg) {
  struct worker *w = arg;
  /* Percentages of each operation, in the order of stat[]. */
  static const int mix[] = {25, 22, 4, 10, 14, 20, 5};
  for (long i = 0; i < w->ops && !__atomic_load_n(&quit, __ATOMIC_RELAXED);
       i++) {
    int x = pick(w, 100), op = 0;
    while (x >= mix[op])
      x -= mix[op++];
    switch (op) {
    case 0:
      op_register(w);
      break;
    case 1:
      op_unregister(w);
      break;
    case 2:
      op_cancel(w);
      break;
    case 3:
      op_link(w);
      break;
    case 4:
      op_refresh(w);
      break;
    case 5:
      op_check(w);
      break;
    default:
      op_timer(w);
      break;
    }
    w->stat[op]++;
    w->done++;
  }
  return NULL;
}

static double stress_scale(void) {
  const char *env = getenv("CANCEL_STRESS_SCALE");
  if (env != NULL && *env != '\0') {
    char *end = NULL;
    double v = strtod(env, &end);
    if (end != env && v > 0.0)
      return v;
  }
  return 1.0;
}

static void test_stress(void **state) {
  (void)state;
  long total = (long)(1000000.0 * stress_scale());
  if (total < THREADS)
    total = THREADS;
  for (int i = 0; i < POOL; i++) {
    cancel_source *s = fresh_source();
    assert_non_null(s);
    pool[i] = track_new(s, 0);
    assert_non_null(pool[i]);
  }
  struct worker *w = calloc(THREADS, sizeof *w);
  assert_non_null(w);
  pthread_t t[THREADS];
  int64_t t0 = cancel_now();
  for (int i = 0; i < THREADS; i++) {
    w[i].rng = UINT64_C(0x2545F4914F6CDD1D) * (uint64_t)(i + 1);
    w[i].ops = total / THREADS + (i < total % THREADS ? 1 : 0);
    /* w is the heap's: a worker that cannot start fails the test, and the
     * teardown stops the others. */
    t[i] = test_helper_start(worker_main, &w[i], stop_workers);
  }
  for (int i = 0; i < THREADS; i++)
    test_helper_join(t[i]);
  int64_t elapsed = cancel_now() - t0;

  /* Remove what is still registered (same checks), then tear down. */
  long done = 0, stat[8] = {0};
  for (int i = 0; i < THREADS; i++) {
    for (int k = 0; k < MAX_LIVE; k++) {
      if (w[i].recs[k].in_use) {
        unregister_check(&w[i].recs[k]);
        rec_release(&w[i].recs[k]);
      }
    }
    done += w[i].done;
    for (int k = 0; k < 8; k++)
      stat[k] += w[i].stat[k];
  }
  for (int i = 0; i < POOL; i++) {
    track_put(pool[i]);
    pool[i] = NULL;
  }
  print_message("stress: %ld ops in %.2f s (register %ld, unregister %ld, "
                "cancel %ld, link %ld, refresh %ld, check %ld, timer %ld)\n",
                done, (double)elapsed / 1e9, stat[0], stat[1], stat[2], stat[3],
                stat[4], stat[5], stat[6]);
  print_message("stress: register inline %ld / listed %ld; unregister ran %ld"
                " / removed %ld / detached %ld\n",
                n_reg_inline, n_reg_listed, n_unreg_ran, n_unreg_removed,
                n_unreg_detached);
  free(w);
  long leaked = 0;
  while (all_tracks != NULL) {
    struct track *n = all_tracks->all_next;
    if (all_tracks->users != 0 || !all_tracks->destroyed)
      leaked++; /* a bug in this test's bookkeeping */
    pthread_mutex_destroy(&all_tracks->mu);
    free(all_tracks);
    all_tracks = n;
  }
  assert_int_equal(leaked, 0);
  assert_int_equal(done, total);
  assert_int_equal(__atomic_load_n(&errors, __ATOMIC_SEQ_CST), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_stress),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
