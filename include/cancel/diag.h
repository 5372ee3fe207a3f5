/*
 * Diagnostics: which work kept running after its caller stopped caring,
 * and metrics of every cancellation.  Part of the core library (-lcancel).
 *
 * Work scopes.  A scope marks "this thread is doing work on behalf of this
 * token":
 *
 *   cancel_scope s;
 *   cancel_scope_begin(&s, tok, "load rows");
 *   ... the work ...
 *   cancel_scope_end(&s);
 *
 * or CANCEL_SCOPE(tok, "load rows"); at the top of a block, which ends the
 * scope when the block is left (GCC/Clang cleanup attribute).  A scope
 * lives on the caller's stack and is pushed on, and popped off, a chain of
 * the thread's own with plain stores: no allocation, no lock, no atomic
 * read-modify-write, nothing registered on the token (`make bench`:
 * scope_begin_end).  The token MUST stay valid while the scope is open.
 * When the token has fired by the time the scope ends, the end records the
 * overrun: how long the work went on after the cancel (from the cancel,
 * also when the token had fired before the scope began).  Scopes nest
 * and MUST end in the reverse order they began, on the thread that began
 * them.  A NULL token makes a scope that is never cancelled (it still
 * names the work for the scopes around it).
 *
 * The library opens scopes by itself where work happens on someone's
 * behalf: the HTTP server around each handler ("GET /reports/{id}"), the
 * adapters around each call ("curl perform", "sqlite exec", "pq exec"; not
 * around each SQLite step, which its progress handler keeps in check),
 * and every blocking wait of the core, named by its function
 * ("cancel_sleep", "cancel_poll" (which the socket, pipe and process waits
 * go through), "cancel_cond_wait", "cancel_sem_wait",
 * "cancel_thread_join").  A wait's scope is what makes a dropped token
 * visible: when the work around it was cancelled and the thread still
 * waits, the report's `inner` names the wait and marks it "[no token]" or
 * "[token not cancelled]".  A wait's scope does not count in the overrun
 * histogram (its wake-up has a histogram of its own).  The host opens no
 * scope around its workers: after the stop, a worker draining requests or
 * finishing a shielded commit is doing what it should, and the host's own
 * shutdown report names a worker that overruns the shutdown timeout.
 *
 * How overdue scopes are found: a scan walks every thread's chain (the
 * watchdog's, every interval; the gauge's, when metrics are read).  A
 * scope's end that meets a scan waits for it (microseconds), so a scan
 * never reads a scope whose frame is gone.  The ordering this needs costs
 * the scan one membarrier(2) and the end nothing; where membarrier is
 * refused, the end takes one full barrier.  The scan looks at the
 * innermost 64 scopes of each thread.
 *
 * The watchdog.  cancel_watchdog_start() starts a thread that looks, every
 * interval, at the open scopes whose token has fired.  One still open
 * `threshold` after the cancel is reported while it runs, once: at warn,
 * component "watchdog", msg="scope still running after cancel", with the
 * scope's name, the enclosing scopes (`outer`, innermost first), the
 * scopes opened inside it (`inner`, outermost first), the thread (id and
 * name),
 * the token's reason (kind, origin, via) and the time since the cancel,
 * followed by one line per frame of that thread's stack.  When the scope
 * ends at last, one more line gives its total overrun.
 *
 * Stacks: the watchdog sends the scope's thread a signal (stack_signal,
 * a real-time signal by default); its handler, on that thread, records the
 * frames with backtrace(3) into the watchdog's buffer, and the watchdog
 * formats them with backtrace_symbols(3) on its own thread.  Why this and
 * not libunwind: glibc's backtrace needs no extra dependency, and a signal
 * is the only way to see where another thread is *now*.  Function names
 * come from the dynamic symbol table: link programs with -rdynamic (CMake:
 * ENABLE_EXPORTS) to see their own functions by name; static functions
 * show as module+offset (addr2line resolves them).  A thread that blocks
 * the signal (the library's own threads) is reported without a stack, and
 * so is, under ThreadSanitizer, a thread in a loop that makes no call
 * TSan intercepts (TSan delivers signals only at such calls).
 * The watchdog runs on a thread of its own, not on the library's reactor
 * thread, because collecting a stack may wait for the target thread
 * (bounded by 100 ms) and timers must not wait for that.
 *
 * Metrics are always collected (relaxed atomic counters):
 *   cancel_cancellations_total{kind}        cancellations by kind (each
 *                                            origin that fired counts once;
 *                                            the sources it reached through
 *                                            links do not)
 *   cancel_cancellations_by_origin_total{origin}
 *                                            the same by the origin's name,
 *                                            cut at its first digit so that
 *                                            per-request names ("client
 *                                            10.0.0.7:5123") do not make a
 *                                            series each; at most 47
 *                                            bytes, cut between UTF-8
 *                                            characters, each byte that is
 *                                            not well-formed UTF-8 written
 *                                            as U+FFFD, so a label is valid
 *                                            UTF-8 whatever the name holds
 *                                            (names that differ only there
 *                                            share a series).  At most 128
 *                                            labels; cancellations of later
 *                                            ones count in the series
 *                                            {origin="",overflow="true"}:
 *                                            no origin's series carries an
 *                                            `overflow` label, so it cannot
 *                                            collide with a source named
 *                                            "other" (or "")
 *   cancel_scope_overrun_seconds             histogram: cancel -> scope end
 *   cancel_wake_latency_seconds              histogram: cancel -> a blocked
 *                                            wait of the core returning
 *   cancel_scopes_overdue                    gauge: open scopes (waits
 *                                            included) whose token fired
 *                                            more than the watchdog's
 *                                            threshold ago (or, without a
 *                                            watchdog, at all)
 *   cancel_watchdog_reports_total            scopes reported
 */
#ifndef CANCEL_DIAG_H
#define CANCEL_DIAG_H

#include <cancel.h>

#include <stdint.h>
#include <stdio.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Private layout: caller storage, touched only through the functions. */
typedef struct cancel_scope {
  const cancel_token *tok;
  const char *name;
  struct cancel_scope *up; /* the enclosing scope of this thread */
  int flags;
  int reported; /* the watchdog reported it; atomic */
} cancel_scope;

/* Opens scope s for work on tok's behalf, named `name` (not copied: it
 * MUST outlive the scope; a string literal usually).  s and tok MUST stay
 * valid until cancel_scope_end(s).  Never fails; a NULL s is ignored.  A
 * token that fired already makes the scope overdue at once (its overrun
 * counts from the token's cancel). */
CANCEL_API void cancel_scope_begin(cancel_scope *s, const cancel_token *tok,
                                   const char *name);

/* Closes s, the innermost open scope of the calling thread.  Anything
 * else is a misuse, reported on stderr: s and the scopes opened after it
 * are then dropped from the thread's chain, unmeasured (the watchdog never
 * reads a scope that ended), and their own ends change nothing.  Returns
 * the overrun in nanoseconds: the time from tok's cancel to now when tok
 * has fired, else 0.  The overrun is recorded in the histogram and,
 * when the watchdog reported s, logged. */
CANCEL_API int64_t cancel_scope_end(cancel_scope *s);

/* Scopes on (the default) or off for the whole process: off, a scope
 * still names the work but forgets its token, so it is never overdue (for
 * measuring what watching costs).  Takes effect for scopes begun after it.
 * Thread-safe. */
CANCEL_API void cancel_scopes_enable(int on);

/* The calling thread's innermost open scope, or NULL. */
CANCEL_API const cancel_scope *cancel_scope_current(void);

/* For CANCEL_SCOPE: ends the scope a cleanup attribute hands over. */
CANCEL_API void cancel__scope_cleanup(cancel_scope *s);

#define CANCEL__SCOPE_CAT2(a, b) a##b
#define CANCEL__SCOPE_CAT(a, b) CANCEL__SCOPE_CAT2(a, b)
/* A scope from here to the end of the enclosing block. */
#define CANCEL_SCOPE(tok, name)                                                \
  cancel_scope CANCEL__SCOPE_CAT(cancel__scope_, __LINE__)                     \
      __attribute__((cleanup(cancel__scope_cleanup)));                         \
  cancel_scope_begin(&CANCEL__SCOPE_CAT(cancel__scope_, __LINE__), (tok),      \
                     (name))

typedef struct cancel_watchdog_options {
  int64_t threshold_ns; /* report a scope this long after its cancel; 0:
                           100 ms */
  int64_t interval_ns;  /* how often to look; 0: threshold / 4 (>= 1 ms) */
  int stack_signal;     /* 0: SIGRTMIN + 4; -1: no stacks */
  int max_frames;       /* 0: 32 */
} cancel_watchdog_options;

/* Starts the watchdog (one per process).  Installs a handler for
 * stack_signal (SA_RESTART) unless stacks are off; the signal MUST NOT be
 * used by the program.
 * Returns 0, -EBUSY (running already), -EINVAL (bad options, or the
 * signal has a handler already), -EAGAIN (no thread).  Thread-safe. */
CANCEL_API int cancel_watchdog_start(const cancel_watchdog_options *opts);

/* Stops the watchdog.  Its signal handler stays installed (a capture
 * signal still pending somewhere must not take the signal's default
 * action, which ends the process); a later start reuses it.  Returns 0,
 * -EINVAL (not running).  Thread-safe. */
CANCEL_API int cancel_watchdog_stop(void);

/* Writes every metric in the Prometheus text exposition format (0.0.4).
 * Returns 0, -EINVAL (NULL), -EIO (a write failed).  Thread-safe. */
CANCEL_API int cancel_metrics_write_prometheus(FILE *f);

/* A few numbers for programs and tests. */
typedef struct cancel_metrics {
  uint64_t cancellations[5]; /* by kind: [CANCEL_REQUESTED..SHUTDOWN], [0]
                                for user kinds */
  uint64_t overruns;         /* scopes that ended after their cancel */
  uint64_t wakes;            /* core waits woken by a cancel */
  uint64_t scopes_overdue;   /* now */
  uint64_t watchdog_reports;
} cancel_metrics;

/* Fills *m with the counters now (each read on its own: they are not one
 * snapshot).  NULL is ignored.  Thread-safe. */
CANCEL_API void cancel_metrics_get(cancel_metrics *m);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_DIAG_H */
