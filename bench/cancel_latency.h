/*
 * cancel_latency.h: "the token fires -> the call returns", measured the
 * same way for every adapter's benchmark (sqlite_bench, pq_bench).
 *
 * A sample: a call that blocks or works until its token fires is started
 * with a token that a timer cancels 2 to 10 ms in (varied, so that the
 * cancel lands at different points of the work); it runs from the token's
 * callback (on the timer thread: the moment of the cancel) to the call's
 * return.  200 samples (40 with BENCH_QUICK), reported as the rows
 * <scenario>_p50 and _p99 in microseconds.
 */
#ifndef CANCEL_BENCH_CANCEL_LATENCY_H
#define CANCEL_BENCH_CANCEL_LATENCY_H

#include "bench.h"

#include <cancel.h>

#include <errno.h>

/* The call under test: MUST return -ECANCELED once tok fired. */
typedef int bench_cancellable_fn(const cancel_token *tok, void *ctx);

static void bench_stamp(void *arg) {
  *(int64_t *)arg = cancel_now();
}

static inline void bench_cancel_latency(const char *scenario,
                                        bench_cancellable_fn *call, void *ctx) {
  size_t n = bench_quick() ? 40 : 200;
  int64_t *s = calloc(n, sizeof *s);
  if (s == NULL)
    bench_die("calloc", -ENOMEM);
  for (size_t i = 0; i < n; i++) {
    cancel_source *src;
    int rc = cancel_source_new(&src, scenario);
    if (rc < 0)
      bench_die("cancel_source_new", rc);
    int64_t fired = 0;
    cancel_reg reg;
    cancel_register(&reg, cancel_source_token(src), bench_stamp, &fired);
    cancel_source_cancel_after(src, CANCEL_MSEC(2 + (int64_t)(i % 9)));
    rc = call(cancel_source_token(src), ctx);
    int64_t back = cancel_now();
    cancel_unregister(&reg);
    if (rc != -ECANCELED)
      bench_die("the call was not cancelled", rc);
    s[i] = back - fired;
    cancel_source_unref(src);
  }
  bench_latency_rows(scenario, "libcancel", s, n);
  free(s);
}

#endif /* CANCEL_BENCH_CANCEL_LATENCY_H */
