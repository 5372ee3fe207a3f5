/*
 * glib_bench: the GLib peer (GIO's GCancellable, GLib 2.74 on Debian 12) of
 * bench/core_bench.c, the C library most C developers would reach for
 * instead.  Built by bench/CMakeLists.txt when pkg-config finds gio-2.0
 * (Debian libglib2.0-dev).
 *
 * Prints `scenario<TAB>glib_cancellable<TAB>value<TAB>unit` rows, measured
 * with the loop in bench.h (the same file core_bench uses): calibrate to
 * ~60 ms batches, warm up, median of 7; BENCH_QUICK=1, BENCH_ONLY=a,b and
 * BENCH_INSTR=<units> (instruction counts under callgrind) as there.
 *
 * How each scenario maps (GCancellable has a flag, a "cancelled" signal
 * and nothing else):
 *   check: g_cancellable_is_cancelled();
 *   register_unregister: g_cancellable_connect() of a handler, then
 *     g_cancellable_disconnect() (a GSignal handler under GLib's global
 *     cancellable mutex and signal lock);
 *   source_create_destroy: g_cancellable_new() and g_object_unref();
 *   link2_create_destroy: GLib has no links.  Emulated: a child
 *     cancellable and, on each of the two parents, g_cancellable_connect()
 *     of a handler that cancels the child; both handlers disconnected, then
 *     the child unreferenced;
 *   timeout_create_dispose: GCancellable has no deadline.  Emulated the
 *     way a GLib program does it: a cancellable plus a GSource timeout of
 *     one hour whose callback cancels it, attached to a GMainContext that a
 *     thread of its own runs (libcancel's timers run on its reactor
 *     thread); disposed with g_source_destroy(), g_source_unref() and
 *     g_object_unref();
 *   create_register_cancel: new, connect a counting handler, cancel (the
 *     handler runs inside g_cancellable_cancel()), unref;
 *   cancel_fanout_1000: 1000 handlers connected (not timed), then the
 *     timed g_cancellable_cancel(); per handler;
 *   chain_100: 101 cancellables, each with a handler on the previous one
 *     that cancels it (the link emulation above); timed: cancelling the
 *     root until the leaf reads cancelled; per hop;
 *   register_unregister_contended: 2 threads connecting and disconnecting
 *     on one shared cancellable, per pair of one thread (wall time), as in
 *     core_bench.
 * GLib has no deadline to query or re-arm (deadline_*_chain_100), no
 * inline storage and no work scopes: those rows are libcancel's alone.
 */
#define _GNU_SOURCE
#include "bench.h"

#include <gio/gio.h>

#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#define IMPL "glib_cancellable"
#define FANOUT 1000
#define CHAIN 100
#define THREADS 2

static volatile uint64_t sink;

/* ---- Handlers (the "cancelled" signal's signature) ------------------- */

static void noop_cb(GCancellable *c, gpointer data) {
  (void)c;
  (void)data;
}

static void count_cb(GCancellable *c, gpointer data) {
  (void)c;
  (*(uint64_t *)data)++;
}

/* The link emulation: a parent's handler cancels the child. */
static void cancel_child_cb(GCancellable *c, gpointer child) {
  (void)c;
  g_cancellable_cancel(child);
}

static gboolean timeout_cb(gpointer c) {
  g_cancellable_cancel(c);
  return G_SOURCE_REMOVE;
}

static gulong connect_or_die(GCancellable *c, GCallback cb, gpointer data) {
  gulong id = g_cancellable_connect(c, cb, data, NULL);
  if (id == 0)
    bench_die("g_cancellable_connect (already cancelled?)", 0);
  return id;
}

/* ---- Scenarios -------------------------------------------------------- */

static int64_t b_check(void *ctx, uint64_t n) {
  GCancellable *c = ctx;
  uint64_t hits = 0;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    BENCH_CLOBBER();
    hits += (uint64_t)g_cancellable_is_cancelled(c);
  }
  int64_t t = bench_now() - t0;
  sink += hits;
  return t;
}

static int64_t b_register_unregister(void *ctx, uint64_t n) {
  GCancellable *c = ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    gulong id = connect_or_die(c, G_CALLBACK(noop_cb), NULL);
    g_cancellable_disconnect(c, id);
  }
  return bench_now() - t0;
}

static int64_t b_source_create_destroy(void *ctx, uint64_t n) {
  (void)ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    GCancellable *c = g_cancellable_new();
    BENCH_ESCAPE(c);
    g_object_unref(c);
  }
  return bench_now() - t0;
}

static int64_t b_link2(void *ctx, uint64_t n) {
  GCancellable **parents = ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    GCancellable *child = g_cancellable_new();
    gulong id1 = connect_or_die(parents[0], G_CALLBACK(cancel_child_cb), child);
    gulong id2 = connect_or_die(parents[1], G_CALLBACK(cancel_child_cb), child);
    g_cancellable_disconnect(parents[0], id1);
    g_cancellable_disconnect(parents[1], id2);
    g_object_unref(child);
  }
  return bench_now() - t0;
}

static int64_t b_timeout(void *ctx, uint64_t n) {
  GMainContext *mc = ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    GCancellable *c = g_cancellable_new();
    GSource *src = g_timeout_source_new(3600 * 1000);
    g_source_set_callback(src, timeout_cb, c, NULL);
    g_source_attach(src, mc);
    g_source_destroy(src);
    g_source_unref(src);
    g_object_unref(c);
  }
  return bench_now() - t0;
}

static int64_t b_create_register_cancel(void *ctx, uint64_t n) {
  uint64_t ran = 0;
  (void)ctx;
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < n; i++) {
    GCancellable *c = g_cancellable_new();
    connect_or_die(c, G_CALLBACK(count_cb), &ran);
    g_cancellable_cancel(c);
    g_object_unref(c);
  }
  int64_t t = bench_now() - t0;
  if (ran != n)
    bench_die("create_register_cancel: handlers run", (int)(n - ran));
  return t;
}

/* Only the cancel is timed; connecting the 1000 handlers and dropping the
 * cancellable (which drops its handlers) are not. */
static int64_t b_fanout(void *ctx, uint64_t n) {
  int64_t timed = 0;
  (void)ctx;
  for (uint64_t i = 0; i < n; i++) {
    uint64_t ran = 0;
    GCancellable *c = g_cancellable_new();
    for (int k = 0; k < FANOUT; k++)
      connect_or_die(c, G_CALLBACK(count_cb), &ran);
    int64_t t0 = bench_now();
    g_cancellable_cancel(c);
    timed += bench_now() - t0;
    if (ran != FANOUT)
      bench_die("cancel_fanout_1000: handlers run", (int)ran);
    g_object_unref(c);
  }
  return timed;
}

static int64_t b_chain(void *ctx, uint64_t n) {
  GCancellable **chain = ctx; /* CHAIN + 1 slots, [0] is the root */
  int64_t timed = 0;
  for (uint64_t i = 0; i < n; i++) {
    chain[0] = g_cancellable_new();
    for (int k = 1; k <= CHAIN; k++) {
      chain[k] = g_cancellable_new();
      connect_or_die(chain[k - 1], G_CALLBACK(cancel_child_cb), chain[k]);
    }
    GCancellable *leaf = chain[CHAIN];
    int64_t t0 = bench_now();
    g_cancellable_cancel(chain[0]);
    while (!g_cancellable_is_cancelled(leaf))
      if (bench_now() - t0 > 10 * INT64_C(1000000000))
        bench_die("chain_100: leaf never cancelled", 0);
    timed += bench_now() - t0;
    /* Root first: once a parent is gone no handler can reach its child. */
    for (int k = 0; k <= CHAIN; k++)
      g_object_unref(chain[k]);
  }
  return timed;
}

struct contended {
  GCancellable *c;
  uint64_t n;
  pthread_barrier_t start;
  int64_t t_start, t_end;
};

static void *contended_thread(void *arg) {
  struct contended *ct = arg;
  pthread_barrier_wait(&ct->start);
  int64_t t0 = bench_now();
  for (uint64_t i = 0; i < ct->n; i++) {
    gulong id = connect_or_die(ct->c, G_CALLBACK(noop_cb), NULL);
    g_cancellable_disconnect(ct->c, id);
  }
  int64_t t1 = bench_now();
  int64_t cur = __atomic_load_n(&ct->t_start, __ATOMIC_RELAXED);
  while ((cur == 0 || t0 < cur) &&
         !__atomic_compare_exchange_n(&ct->t_start, &cur, t0, false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
  cur = __atomic_load_n(&ct->t_end, __ATOMIC_RELAXED);
  while (t1 > cur &&
         !__atomic_compare_exchange_n(&ct->t_end, &cur, t1, false,
                                      __ATOMIC_RELAXED, __ATOMIC_RELAXED))
    ;
  return NULL;
}

static int64_t b_contended(void *ctx, uint64_t n) {
  struct contended ct = {.c = ctx, .n = n, .t_start = 0, .t_end = 0};
  pthread_t th[THREADS];
  pthread_barrier_init(&ct.start, NULL, THREADS);
  for (int i = 0; i < THREADS; i++)
    if (pthread_create(&th[i], NULL, contended_thread, &ct) != 0)
      bench_die("pthread_create", 0);
  for (int i = 0; i < THREADS; i++)
    pthread_join(th[i], NULL);
  pthread_barrier_destroy(&ct.start);
  return ct.t_end - ct.t_start;
}

/* ---- Driver ----------------------------------------------------------- */

/* instr_units: what one operation counts in instructions (the contended
 * row: one pair in each thread, the threads' counts added). */
static void run(const char *scenario, bench_batch_fn *fn, void *ctx,
                double units, double instr_units) {
  if (!bench_wanted(scenario))
    return;
  if (bench_instr_units() > 0)
    bench_instr(scenario, IMPL, fn, ctx, instr_units);
  else
    bench_row(scenario, IMPL, bench_measure(fn, ctx, units), "ns");
}

static gpointer timer_thread(gpointer loop) {
  g_main_context_push_thread_default(g_main_loop_get_context(loop));
  g_main_loop_run(loop);
  g_main_context_pop_thread_default(g_main_loop_get_context(loop));
  return NULL;
}

static gboolean quit_cb(gpointer loop) {
  g_main_loop_quit(loop);
  return G_SOURCE_REMOVE;
}

int main(void) {
  GCancellable *live = g_cancellable_new();
  GCancellable *parents[2] = {g_cancellable_new(), g_cancellable_new()};
  GCancellable **chain = calloc(CHAIN + 1, sizeof *chain);
  GMainContext *mc = g_main_context_new();
  GMainLoop *loop = g_main_loop_new(mc, FALSE);
  GThread *timers = g_thread_new("bench-timers", timer_thread, loop);
  if (chain == NULL)
    bench_die("calloc", -ENOMEM);

  fprintf(stderr, "glib_bench: GLib %u.%u.%u%s\n", glib_major_version,
          glib_minor_version, glib_micro_version,
          bench_quick() ? " (BENCH_QUICK)" : "");

  run("check", b_check, live, 1, 1);
  run("register_unregister", b_register_unregister, live, 1, 1);
  run("source_create_destroy", b_source_create_destroy, NULL, 1, 1);
  run("link2_create_destroy", b_link2, parents, 1, 1);
  run("timeout_create_dispose", b_timeout, mc, 1, 1);
  run("create_register_cancel", b_create_register_cancel, NULL, 1, 1);
  run("cancel_fanout_1000", b_fanout, NULL, FANOUT, FANOUT);
  run("chain_100", b_chain, chain, CHAIN, CHAIN);
  run("register_unregister_contended", b_contended, live, 1, THREADS);

  /* Stop the timer thread from inside its own loop. */
  GSource *quit = g_idle_source_new();
  g_source_set_callback(quit, quit_cb, loop, NULL);
  g_source_attach(quit, mc);
  g_source_unref(quit);
  g_thread_join(timers);

  if (g_cancellable_is_cancelled(live) ||
      g_cancellable_is_cancelled(parents[0]) ||
      g_cancellable_is_cancelled(parents[1]))
    bench_die("a live cancellable was cancelled", 0);
  g_main_loop_unref(loop);
  g_main_context_unref(mc);
  free(chain);
  g_object_unref(parents[1]);
  g_object_unref(parents[0]);
  g_object_unref(live);
  return 0;
}
