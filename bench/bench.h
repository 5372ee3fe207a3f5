/*
 * bench.h: the measuring loop, the latency percentiles and the output row
 * shared by the C benchmark programs.  The peers in bench/peers/ carry the
 * same loop and the same formatting, written once per language, so every
 * number in results.tsv is made the same way:
 *
 *   1. calibrate: run the batch with 1, 2, 4, ... operations until one batch
 *      takes a tenth of the target, then size it for the target (~60 ms, or
 *      ~6 ms with BENCH_QUICK=1).  Calibration doubles as the warm-up, and
 *      one more batch of the final size is run and thrown away;
 *   2. run BENCH_REPS timed batches of that size;
 *   3. report the median of the per-unit times.
 *
 * A batch function times itself and returns the nanoseconds of the part
 * that is measured: the whole loop for most scenarios, only the cancel for
 * the fan-out and chain scenarios (their setup and teardown run in the same
 * batch but outside the timed region; calibration sizes the batch on wall
 * time, so the untimed work still counts against the time budget).
 *
 * Output: one line per scenario, `scenario<TAB>impl<TAB>value<TAB>unit`,
 * value "n/a" when an implementation has no such feature.
 *
 * Instruction counts (BENCH_INSTR=<units>, run under valgrind
 * --tool=callgrind --collect-atstart=no by bench/run.sh): instead of timing,
 * bench_instr() runs each scenario's batch twice with enough operations for
 * about <units> units, the first as a warm-up (lazy binding, first
 * allocations, a library's lazy start), the second with callgrind counting
 * exactly the part the batch times: bench_now() switches the calling
 * thread's collection on after it reads the clock at the start of a timed
 * part and off before it reads it at the end.  Then it dumps the counts
 * under the scenario's name (CALLGRIND_DUMP_STATS_AT) and prints
 * `<scenario>_instr<TAB>impl<TAB><units run><TAB>units`; run.sh divides the
 * dump's total by that.  Callgrind counts per thread: work a timed call
 * hands to another thread (a timer thread) is not counted, as it is not
 * timed either.
 */
#ifndef CANCEL_BENCH_H
#define CANCEL_BENCH_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__has_include)
#if __has_include(<valgrind/callgrind.h>)
#include <valgrind/callgrind.h>
#define BENCH_HAVE_CALLGRIND 1
#endif
#endif

#define BENCH_REPS 7

/* Runs n operations, returns the nanoseconds spent in the measured part. */
typedef int64_t bench_batch_fn(void *ctx, uint64_t n);

/* Set while bench_instr() runs its counted batch; per thread, whether the
 * thread is inside a timed part (bench_now() calls come in pairs there). */
static int bench_instr_armed;
#ifdef BENCH_HAVE_CALLGRIND
static __thread int bench_instr_inside;
#endif

static inline int64_t bench_now(void) {
  struct timespec ts;
#ifdef BENCH_HAVE_CALLGRIND
  if (__builtin_expect(__atomic_load_n(&bench_instr_armed, __ATOMIC_RELAXED),
                       0)) {
    if (!bench_instr_inside) {
      clock_gettime(CLOCK_MONOTONIC, &ts);
      bench_instr_inside = 1;
      CALLGRIND_TOGGLE_COLLECT;
    } else {
      CALLGRIND_TOGGLE_COLLECT;
      bench_instr_inside = 0;
      clock_gettime(CLOCK_MONOTONIC, &ts);
    }
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
  }
#endif
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Keeps the compiler from proving anything about memory across this point
 * (no instruction is emitted).  Used so a load cannot be hoisted out of a
 * loop and a result cannot be dropped. */
#define BENCH_CLOBBER() __asm__ __volatile__("" ::: "memory")
#define BENCH_ESCAPE(p) __asm__ __volatile__("" : : "g"(p) : "memory")

static inline int bench_quick(void) {
  const char *q = getenv("BENCH_QUICK");
  return q != NULL && *q != '\0' && strcmp(q, "0") != 0;
}

/* The wall time one timed batch should take. */
static inline int64_t bench_target_ns(void) {
  return bench_quick() ? 6000000 : 60000000;
}

static int bench_cmp_double(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return (x > y) - (x < y);
}

/* The median time per unit of fn, in nanoseconds.  One operation of fn
 * counts as `units` units (e.g. 1000 for "per callback" of a 1000-callback
 * fan-out, 100 for "per hop" of a 100-deep chain). */
static inline double bench_measure(bench_batch_fn *fn, void *ctx,
                                   double units) {
  const int64_t target = bench_target_ns();
  uint64_t n = 1;
  int64_t wall;
  double per[BENCH_REPS];

  for (;;) {
    int64_t t0 = bench_now();
    fn(ctx, n);
    wall = bench_now() - t0;
    if (wall >= target / 10 || n >= (UINT64_C(1) << 40))
      break;
    n *= 2;
  }
  if (wall < 1)
    wall = 1;
  n = (uint64_t)((double)n * (double)target / (double)wall);
  if (n < 1)
    n = 1;
  fn(ctx, n); /* warm-up at the final size */
  for (int i = 0; i < BENCH_REPS; i++)
    per[i] = (double)fn(ctx, n) / ((double)n * units);
  qsort(per, BENCH_REPS, sizeof per[0], bench_cmp_double);
  return per[BENCH_REPS / 2];
}

/* The units BENCH_INSTR asks for, or 0 when the program times as usual. */
static inline double bench_instr_units(void) {
  const char *v = getenv("BENCH_INSTR");
  double u = v != NULL ? strtod(v, NULL) : 0;
  return u > 0 ? u : 0;
}

/* Runs fn for callgrind (see the top of this file) and prints the row
 * `<scenario>_instr<TAB>impl<TAB><units run><TAB>units`. */
static inline void bench_instr(const char *scenario, const char *impl,
                               bench_batch_fn *fn, void *ctx, double units) {
  uint64_t n = (uint64_t)(bench_instr_units() / units);
  if (n < 1)
    n = 1;
  fn(ctx, n); /* warm-up, not counted */
  __atomic_store_n(&bench_instr_armed, 1, __ATOMIC_SEQ_CST);
  fn(ctx, n);
  __atomic_store_n(&bench_instr_armed, 0, __ATOMIC_SEQ_CST);
#ifdef BENCH_HAVE_CALLGRIND
  CALLGRIND_DUMP_STATS_AT(scenario);
#endif
  printf("%s_instr\t%s\t%.0f\tunits\n", scenario, impl, (double)n * units);
  fflush(stdout);
}

/* The one number format of results.tsv: 2 decimals below 10, 1 below 1000,
 * none above (the same rule in every language). */
static inline void bench_format(char *buf, size_t len, double v) {
  if (v < 10)
    snprintf(buf, len, "%.2f", v);
  else if (v < 1000)
    snprintf(buf, len, "%.1f", v);
  else
    snprintf(buf, len, "%.0f", v);
}

static inline void bench_row(const char *scenario, const char *impl, double v,
                             const char *unit) {
  char buf[64];
  bench_format(buf, sizeof buf, v);
  printf("%s\t%s\t%s\t%s\n", scenario, impl, buf, unit);
  fflush(stdout);
}

static inline void bench_row_na(const char *scenario, const char *impl,
                                const char *unit) {
  printf("%s\t%s\tn/a\t%s\n", scenario, impl, unit);
  fflush(stdout);
}

/* ---- Latency samples -------------------------------------------------- *
 * Programs that time single events (a cancel, a request) keep one sample
 * per event, in nanoseconds, and report percentiles of them. */

static int bench_cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* The pct-th percentile (0..100) of the n > 0 samples: s[n * pct / 100]
 * once sorted (so p50 is s[n / 2]).  Sorts s in place. */
static inline int64_t bench_percentile(int64_t *s, size_t n, unsigned pct) {
  qsort(s, n, sizeof s[0], bench_cmp_i64);
  size_t i = n * pct / 100;
  return s[i < n ? i : n - 1];
}

/* The rows `<scenario>_p50` and `<scenario>_p99` for impl, in
 * microseconds, from n > 0 samples in nanoseconds (sorted in place). */
static inline void bench_latency_rows(const char *scenario, const char *impl,
                                      int64_t *s, size_t n) {
  char name[128];
  snprintf(name, sizeof name, "%s_p50", scenario);
  bench_row(name, impl, (double)bench_percentile(s, n, 50) / 1e3, "us");
  snprintf(name, sizeof name, "%s_p99", scenario);
  bench_row(name, impl, (double)bench_percentile(s, n, 99) / 1e3, "us");
}

/* The row `scenario` for impl: the median of n > 0 samples in
 * nanoseconds, in microseconds (sorts s in place). */
static inline void bench_median_row(const char *scenario, const char *impl,
                                    int64_t *s, size_t n) {
  bench_row(scenario, impl, (double)bench_percentile(s, n, 50) / 1e3, "us");
}

__attribute__((noreturn)) static inline void bench_die(const char *what,
                                                       int rc) {
  fprintf(stderr, "bench: %s failed: %d\n", what, rc);
  exit(1);
}

/* Whether BENCH_ONLY (a comma-separated list of scenario names) asks for
 * `scenario`; everything runs when it is unset or empty. */
static inline bool bench_wanted(const char *scenario) {
  const char *only = getenv("BENCH_ONLY");
  size_t len = strlen(scenario);
  if (only == NULL || *only == '\0')
    return true;
  for (const char *p = only; *p != '\0';) {
    size_t w = strcspn(p, ",");
    if (w == len && strncmp(p, scenario, len) == 0)
      return true;
    p += w;
    if (*p == ',')
      p++;
  }
  return false;
}

/* Whether BENCH_ONLY asks for the latency rows of `scenario`: by its own
 * name or by the name of its p50 or p99 row. */
static inline bool bench_wanted_latency(const char *scenario) {
  char name[128];
  if (bench_wanted(scenario))
    return true;
  snprintf(name, sizeof name, "%s_p50", scenario);
  if (bench_wanted(name))
    return true;
  snprintf(name, sizeof name, "%s_p99", scenario);
  return bench_wanted(name);
}

#endif /* CANCEL_BENCH_H */
