/*
 * core_bench: libcancel's side of the peer benchmark (see bench/run.sh).
 *
 * Prints one row per scenario, `scenario<TAB>libcancel<TAB>value<TAB>unit`,
 * measured with the loop in bench.h.  The peers in bench/peers/ run the same
 * scenarios; their files say how each one is emulated when the peer has no
 * direct equivalent.
 *
 * Environment: BENCH_QUICK=1 makes batches ~10x smaller (smoke tests);
 * BENCH_ONLY=check,chain_100 runs only the named scenarios; BENCH_INSTR=
 * <units> counts instructions under callgrind instead of timing (bench.h).
 */
#define _GNU_SOURCE
#include "bench.h"

#include <cancel/diag.h>

#include <cancel.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define IMPL "libcancel"
#define FANOUT 1000
#define CHAIN 100

/* Results land here so the compiler cannot drop the work. */
static volatile uint64_t sink;

/* ======================================================================
 * Allocation counting
 *
 * The bytes a register/unregister pair allocates are counted by replacing
 * malloc and friends for the whole process (glibc supports replacing them;
 * every replacement forwards to glibc's own allocator through the exported
 * __libc_* entry points, so memory is always owned by one allocator).
 * Counting is switched on only around the measured window.  Outside it the
 * cost is one relaxed load per allocation, which the timed scenarios that
 * allocate (source creation) pay too: well under 1 ns next to a malloc/free
 * pair.  Sanitizer builds and other C libraries get "n/a" instead.
 * ====================================================================== */

#if defined(__GLIBC__) && !defined(__SANITIZE_ADDRESS__) &&                    \
    !defined(__SANITIZE_THREAD__) && !defined(BENCH_NO_MALLOC_COUNT)
#define BENCH_COUNT_ALLOCS 1

extern void *__libc_malloc(size_t size);
extern void *__libc_calloc(size_t nmemb, size_t size);
extern void *__libc_realloc(void *ptr, size_t size);
extern void *__libc_memalign(size_t align, size_t size);
extern void __libc_free(void *ptr);

static int alloc_counting;
static uint64_t alloc_calls, alloc_bytes;

static inline void count_alloc(size_t size) {
  if (__atomic_load_n(&alloc_counting, __ATOMIC_RELAXED)) {
    __atomic_fetch_add(&alloc_calls, 1, __ATOMIC_RELAXED);
    __atomic_fetch_add(&alloc_bytes, (uint64_t)size, __ATOMIC_RELAXED);
  }
}

void *malloc(size_t size) {
  count_alloc(size);
  return __libc_malloc(size);
}

void *calloc(size_t nmemb, size_t size) {
  count_alloc(nmemb * size);
  return __libc_calloc(nmemb, size);
}

void *realloc(void *ptr, size_t size) {
  count_alloc(size);
  return __libc_realloc(ptr, size);
}

void free(void *ptr) {
  __libc_free(ptr);
}

void *memalign(size_t align, size_t size) {
  count_alloc(size);
  return __libc_memalign(align, size);
}

void *aligned_alloc(size_t align, size_t size) {
  count_alloc(size);
  return __libc_memalign(align, size);
}

int posix_memalign(void **out, size_t align, size_t size) {
  void *p;
  if (align < sizeof(void *) || (align & (align - 1)) != 0)
    return EINVAL;
  count_alloc(size);
  p = __libc_memalign(align, size);
  if (p == NULL)
    return ENOMEM;
  *out = p;
  return 0;
}
#endif

/* ======================================================================
 * Scenarios
 * ====================================================================== */

static void noop_cb(void *arg) {
  (void)arg;
}

static void count_cb(void *arg) {
  (*(uint64_t *)arg)++;
}

/* check: one acquire load per call.  The empty asm with a memory clobber
 * tells the compiler that memory may have changed, so the load is redone
 * on every iteration (it emits no instruction). */
static int64_t b_check(void *ctx, uint64_t n) {
  const cancel_token *tok = ctx;
  uint64_t hits = 0;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    BENCH_CLOBBER();
    hits += cancel_token_is_cancelled(tok);
  }
  int64_t t = bench_now() - t0;
  sink += hits;
  return t;
}

static int64_t b_register_unregister(void *ctx, uint64_t n) {
  const cancel_token *tok = ctx;
  cancel_reg reg;
  int rc;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_register(&reg, tok, noop_cb, NULL)) != 0)
      bench_die("cancel_register", rc);
    if ((rc = cancel_unregister(&reg)) != 1)
      bench_die("cancel_unregister", rc);
  }
  return bench_now() - t0;
}

/* A work scope opened and closed on a live token (cancel/diag.h). */
static int64_t b_scope(void *ctx, uint64_t n) {
  const cancel_token *tok = ctx;
  cancel_scope sc;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    cancel_scope_begin(&sc, tok, "bench");
    BENCH_CLOBBER();
    if (cancel_scope_end(&sc) != 0)
      bench_die("cancel_scope_end", -1);
  }
  return bench_now() - t0;
}

static int64_t b_source_new_unref(void *ctx, uint64_t n) {
  cancel_source *s;
  int rc;
  (void)ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_source_new(&s, NULL)) != 0)
      bench_die("cancel_source_new", rc);
    cancel_source_unref(s);
  }
  return bench_now() - t0;
}

static int64_t b_source_init_destroy(void *ctx, uint64_t n) {
  cancel_source s;
  int rc;
  (void)ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_source_init(&s, NULL)) != 0)
      bench_die("cancel_source_init", rc);
    cancel_source_destroy(&s);
  }
  return bench_now() - t0;
}

static int64_t b_link2(void *ctx, uint64_t n) {
  const cancel_token *const *parents = ctx;
  cancel_source *c;
  int rc;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_source_new_linked(&c, NULL, parents, 2)) != 0)
      bench_die("cancel_source_new_linked", rc);
    cancel_source_unref(c);
  }
  return bench_now() - t0;
}

static int64_t b_timeout(void *ctx, uint64_t n) {
  cancel_source *s;
  int rc;
  (void)ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_source_new_timeout(&s, NULL, NULL, CANCEL_SEC(3600))) != 0)
      bench_die("cancel_source_new_timeout", rc);
    cancel_source_unref(s);
  }
  return bench_now() - t0;
}

/* The callback ran by the time cancel returns, so the registration is not
 * unregistered (the contract allows reg to be dropped once it ran). */
static int64_t b_create_register_cancel(void *ctx, uint64_t n) {
  uint64_t ran = 0;
  cancel_source *s;
  cancel_reg reg;
  int rc;
  (void)ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_source_new(&s, NULL)) != 0)
      bench_die("cancel_source_new", rc);
    if ((rc = cancel_register(&reg, cancel_source_token(s), count_cb, &ran)) !=
        0)
      bench_die("cancel_register", rc);
    if ((rc = cancel_source_cancel(s)) != 1)
      bench_die("cancel_source_cancel", rc);
    cancel_source_unref(s);
  }
  int64_t t = bench_now() - t0;
  if (ran != n)
    bench_die("create_register_cancel: callbacks run", (int)(n - ran));
  return t;
}

/* cancel_fanout_1000: only the cancel is timed; registering the 1000
 * callbacks and destroying the source happen outside the timed region. */
static int64_t b_fanout(void *ctx, uint64_t n) {
  cancel_reg *regs = ctx;
  int64_t timed = 0;
  int rc;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t ran = 0;
    cancel_source *s;
    if ((rc = cancel_source_new(&s, NULL)) != 0)
      bench_die("cancel_source_new", rc);
    for (int k = 0; k < FANOUT; k++)
      if ((rc = cancel_register(&regs[k], cancel_source_token(s), count_cb,
                                &ran)) != 0)
        bench_die("cancel_register", rc);
    int64_t t0 = bench_now();
    if ((rc = cancel_source_cancel(s)) != 1)
      bench_die("cancel_source_cancel", rc);
    timed += bench_now() - t0;
    if (ran != FANOUT)
      bench_die("cancel_fanout_1000: callbacks run", (int)ran);
    cancel_source_unref(s);
  }
  return timed;
}

/* chain_100: a root and 100 sources, each linked to the previous one.
 * Timed: cancel(root) until the leaf reads cancelled (the wait loop only
 * matters if propagation were ever asynchronous).  Building and destroying
 * the chain happen outside the timed region. */
static int64_t b_chain(void *ctx, uint64_t n) {
  cancel_source **chain = ctx; /* CHAIN + 1 slots, [0] is the root */
  int64_t timed = 0;
  int rc;
  for (uint64_t i = 0; i < n; i++) {
    if ((rc = cancel_source_new(&chain[0], NULL)) != 0)
      bench_die("cancel_source_new", rc);
    for (int k = 1; k <= CHAIN; k++) {
      const cancel_token *parent = cancel_source_token(chain[k - 1]);
      if ((rc = cancel_source_new_linked(&chain[k], NULL, &parent, 1)) != 0)
        bench_die("cancel_source_new_linked", rc);
    }
    const cancel_token *leaf = cancel_source_token(chain[CHAIN]);
    int64_t t0 = bench_now();
    if ((rc = cancel_source_cancel(chain[0])) != 1)
      bench_die("cancel_source_cancel", rc);
    while (!cancel_token_is_cancelled(leaf))
      if (bench_now() - t0 > CANCEL_SEC(10))
        bench_die("chain_100: leaf never cancelled", 0);
    timed += bench_now() - t0;
    for (int k = CHAIN; k >= 0; k--)
      cancel_source_unref(chain[k]);
  }
  return timed;
}

/* deadline_chain_100: cancel_token_deadline() at the leaf of a chain of
 * 100 linked sources below an armed root (the effective deadline is kept
 * in each source, so this is one load however deep).  deadline_rearm_
 * chain_100: re-arming that root, alternately earlier and later, which
 * passes the new value down all 100 (per re-arm).  The chain is built
 * once, outside the timed region. */
static int64_t b_deadline_query(void *ctx, uint64_t n) {
  cancel_source **chain = ctx;
  const cancel_token *leaf = cancel_source_token(chain[CHAIN]);
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    sink += (uint64_t)cancel_token_deadline(leaf);
    BENCH_CLOBBER();
  }
  return bench_now() - t0;
}

static int64_t b_deadline_rearm(void *ctx, uint64_t n) {
  cancel_source **chain = ctx;
  int64_t base = cancel_now() + CANCEL_SEC(3600);
  int rc;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++)
    if ((rc = cancel_source_cancel_at(chain[0], base + (int64_t)(i & 1))) != 0)
      bench_die("cancel_source_cancel_at", rc);
  int64_t timed = bench_now() - t0;
  if (cancel_token_deadline(cancel_source_token(chain[CHAIN])) !=
      base + (int64_t)((n - 1) & 1))
    bench_die("deadline_rearm_chain_100: leaf has the wrong deadline", 0);
  return timed;
}

static void deadline_chain(cancel_source **chain, bool build) {
  int rc;
  if (!build) {
    for (int k = CHAIN; k >= 0; k--)
      cancel_source_unref(chain[k]);
    return;
  }
  if ((rc = cancel_source_new(&chain[0], "deadline-root")) != 0 ||
      (rc = cancel_source_cancel_after(chain[0], CANCEL_SEC(3600))) != 0)
    bench_die("deadline root", rc);
  for (int k = 1; k <= CHAIN; k++) {
    const cancel_token *parent = cancel_source_token(chain[k - 1]);
    if ((rc = cancel_source_new_linked(&chain[k], NULL, &parent, 1)) != 0)
      bench_die("cancel_source_new_linked", rc);
  }
}

/* register_unregister_contended: 2 threads on one shared live token, each
 * doing n register/unregister pairs.  Reported per pair of one thread:
 * wall time (first thread's start to last thread's end) / n.  With no
 * contention at all this equals the uncontended number; perfect
 * serialisation doubles it. */
struct contended {
  const cancel_token *tok;
  uint64_t n;
  pthread_barrier_t start;
  int64_t t_start, t_end;
};

static void *contended_thread(void *arg) {
  struct contended *c = arg;
  cancel_reg reg;
  int rc;
  pthread_barrier_wait(&c->start);
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < c->n; i++) {
    if ((rc = cancel_register(&reg, c->tok, noop_cb, NULL)) != 0)
      bench_die("cancel_register", rc);
    if ((rc = cancel_unregister(&reg)) != 1)
      bench_die("cancel_unregister", rc);
  }
  int64_t t1 = bench_now();
  /* First start and last end over both threads. */
  int64_t cur = __atomic_load_n(&c->t_start, __ATOMIC_RELAXED);
  while ((cur == 0 || t0 < cur) &&
         !__atomic_compare_exchange_n(&c->t_start, &cur, t0, false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
  cur = __atomic_load_n(&c->t_end, __ATOMIC_RELAXED);
  while (t1 > cur &&
         !__atomic_compare_exchange_n(&c->t_end, &cur, t1, false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
  return NULL;
}

static int64_t b_contended(void *ctx, uint64_t n) {
  struct contended c = {.tok = ctx, .n = n, .t_start = 0, .t_end = 0};
  pthread_t th[2];
  pthread_barrier_init(&c.start, NULL, 2);
  for (int i = 0; i < 2; i++)
    if (pthread_create(&th[i], NULL, contended_thread, &c) != 0)
      bench_die("pthread_create", 0);
  for (int i = 0; i < 2; i++)
    pthread_join(th[i], NULL);
  pthread_barrier_destroy(&c.start);
  return c.t_end - c.t_start;
}

/* ======================================================================
 * Driver
 * ====================================================================== */

static void run(const char *scenario, bench_batch_fn *fn, void *ctx,
                double units) {
  if (!bench_wanted(scenario))
    return;
  if (bench_instr_units() > 0)
    bench_instr(scenario, IMPL, fn, ctx, units);
  else
    bench_row(scenario, IMPL, bench_measure(fn, ctx, units), "ns");
}

/* The contended row: per pair of one thread in time (wall time, the two
 * threads side by side), per pair of either thread in instructions (the
 * two threads' counts added). */
static void run_contended(const char *scenario, const cancel_token *tok) {
  if (!bench_wanted(scenario))
    return;
  if (bench_instr_units() > 0)
    bench_instr(scenario, IMPL, b_contended, (void *)tok, 2);
  else
    bench_row(scenario, IMPL, bench_measure(b_contended, (void *)tok, 1), "ns");
}

/* Bytes allocated per register/unregister pair, after a warm-up. */
static void run_allocs(const char *scenario, const cancel_token *tok) {
  if (!bench_wanted(scenario) || bench_instr_units() > 0)
    return;
#ifdef BENCH_COUNT_ALLOCS
  const uint64_t pairs = 10000;
  b_register_unregister((void *)tok, 1000);
  __atomic_store_n(&alloc_calls, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&alloc_bytes, 0, __ATOMIC_RELAXED);
  __atomic_store_n(&alloc_counting, 1, __ATOMIC_SEQ_CST);
  b_register_unregister((void *)tok, pairs);
  __atomic_store_n(&alloc_counting, 0, __ATOMIC_SEQ_CST);
  if (alloc_calls != 0)
    fprintf(stderr, "core_bench: %s: %llu allocations in %llu pairs\n",
            scenario, (unsigned long long)alloc_calls,
            (unsigned long long)pairs);
  bench_row(scenario, IMPL, (double)alloc_bytes / (double)pairs, "B");
#else
  (void)tok;
  bench_row_na(scenario, IMPL, "B");
#endif
}

int main(void) {
  cancel_source *live = NULL, *p1 = NULL, *p2 = NULL;
  int rc;

  if ((rc = cancel_source_new(&live, "bench-live")) != 0 ||
      (rc = cancel_source_new(&p1, "bench-parent-1")) != 0 ||
      (rc = cancel_source_new(&p2, "bench-parent-2")) != 0)
    bench_die("cancel_source_new", rc);
  const cancel_token *tok = cancel_source_token(live);
  const cancel_token *parents[2] = {cancel_source_token(p1),
                                    cancel_source_token(p2)};
  cancel_reg *regs = calloc(FANOUT, sizeof *regs);
  cancel_source **chain = calloc(CHAIN + 1, sizeof *chain);
  if (regs == NULL || chain == NULL)
    bench_die("calloc", -ENOMEM);

  fprintf(stderr, "core_bench: libcancel %s%s\n", cancel_version(),
          bench_quick() ? " (BENCH_QUICK)" : "");

  run("check", b_check, (void *)tok, 1);
  run("register_unregister", b_register_unregister, (void *)tok, 1);
  run_allocs("register_unregister_allocs", tok);
  run("source_create_destroy", b_source_new_unref, NULL, 1);
  run("source_create_destroy_inline", b_source_init_destroy, NULL, 1);
  run("link2_create_destroy", b_link2, (void *)parents, 1);
  run("timeout_create_dispose", b_timeout, NULL, 1);
  run("create_register_cancel", b_create_register_cancel, NULL, 1);
  run("cancel_fanout_1000", b_fanout, regs, FANOUT);
  run("chain_100", b_chain, chain, CHAIN);
  if (bench_wanted("deadline_chain_100") ||
      bench_wanted("deadline_rearm_chain_100")) {
    deadline_chain(chain, true);
    run("deadline_chain_100", b_deadline_query, chain, 1);
    run("deadline_rearm_chain_100", b_deadline_rearm, chain, 1);
    deadline_chain(chain, false);
  }
  run_contended("register_unregister_contended", tok);
  run("scope_begin_end", b_scope, (void *)tok, 1);

  if (cancel_token_is_cancelled(tok) || cancel_token_is_cancelled(parents[0]) ||
      cancel_token_is_cancelled(parents[1]))
    bench_die("a live token was cancelled", 0);
  free(chain);
  free(regs);
  cancel_source_unref(p2);
  cancel_source_unref(p1);
  cancel_source_unref(live);
  return 0;
}
