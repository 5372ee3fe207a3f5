/*
 * libcancel: cooperative cancellation for C services.
 *
 * A cancel_source is the side that asks for cancellation; a cancel_token is
 * the read-only view of it that is passed down a call chain.  Work stops
 * because every wait it blocks in observes the token: nothing is interrupted
 * asynchronously.  Every cancellation carries a reason (what kind, which
 * source fired first, the link path it travelled, a detail and the time).
 *
 * Conventions used by every function in this header:
 *   - Errors are negative errno values.  0 (or a positive count or flag) is
 *     success.  -ECANCELED means "the token fired", whatever the reason,
 *     and only that: whenever a libcancel call (this header's or an
 *     adapter's) returns -ECANCELED, the token it was given is already
 *     cancelled when it returns: cancel_token_is_cancelled() is true and
 *     cancel_token_reason() returns 1, at once, on the calling thread.
 *     Also when the call stopped on a timeout it derived from the token's
 *     deadline (curl's timeout, PostgreSQL's statement_timeout) a moment
 *     before the library's timer fired the token: such a call settles
 *     with the timer first (cancel_token_settle()) and returns -ETIMEDOUT
 *     if the timer did not fire.  (A value that your own callback returns
 *     through a libcancel call, e.g. a transaction's work, is yours.)
 *   - Time is int64_t nanoseconds of CLOCK_MONOTONIC (cancel_now()).
 *     Deadlines are absolute; CANCEL_NEVER is "no deadline".
 *   - A function that takes a `const cancel_token *` borrows it for the
 *     duration of the call.  NULL is a token that is never cancelled.
 *   - A cancellation callback runs on the thread that cancels.  It MUST be
 *     short and MUST NOT block: it wakes a waiter, it does not do the
 *     waiter's cleanup.  It may cancel other sources, register and
 *     unregister callbacks (including itself) and drop references.
 */
#ifndef CANCEL_H
#define CANCEL_H

#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/socket.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================
 * Version and export
 * ====================================================================== */

#define CANCEL_VERSION_MAJOR 0
#define CANCEL_VERSION_MINOR 1
#define CANCEL_VERSION_PATCH 0
#define CANCEL_VERSION_STRING "0.1.0"
/* 0xMMmmpp: compare with CANCEL_VERSION_HEX >= 0x000100. */
#define CANCEL_VERSION_HEX                                                     \
  ((CANCEL_VERSION_MAJOR << 16) | (CANCEL_VERSION_MINOR << 8) |                \
   CANCEL_VERSION_PATCH)

#if defined(_WIN32)
#define CANCEL_API
#elif defined(__GNUC__)
#define CANCEL_API __attribute__((visibility("default")))
#else
#define CANCEL_API
#endif

/* The version of the library actually linked, e.g. "0.1.0". */
CANCEL_API const char *cancel_version(void);

/* ======================================================================
 * Platform
 *
 * Linux only: 2.6.28 or later has every required feature below, and the
 * later ones have fallbacks; the kernel headers must be installed
 * (Debian: linux-libc-dev).  The C library is glibc or musl (tested:
 * glibc 2.36 and musl 1.2.3, Debian 12's); the compiler gcc or clang
 * (tested: gcc 12, clang 14), in C11 with GNU extensions.  make check
 * builds and tests the core with each of gcc, clang and musl-gcc.  CMake checks all of this when it configures
 * (cmake/platform.cmake): what is required stops it with what is
 * missing, and its summary names the fallbacks the build uses.
 *
 * Kernel features, all required unless a fallback is named:
 *   futex(2) FUTEX_WAIT_BITSET on CLOCK_MONOTONIC (2.6.25): every wait.
 *   eventfd(2) with flags (2.6.27): descriptor waits, token descriptors.
 *   epoll_create1, timerfd (2.6.27): the library's thread (timers and
 *     descriptor watches); EPOLLRDHUP (2.6.17): hang-up watches.
 *   signalfd(2) (2.6.27): cancel_signals_watch; accept4 (2.6.28), dup3,
 *     ppoll: the I/O calls.
 *   preadv2/pwritev2 with RWF_NOWAIT (4.14): one system call for a ready
 *     descriptor.  Fallback, per descriptor: poll, then read, or write at
 *     most PIPE_BUF bytes (see cancel_read).
 *   membarrier(2) private expedited (4.14): scopes end with a compiler
 *     barrier.  Fallback (also under seccomp): a full fence per scope end.
 *   pidfd_open(2) (5.3): cancel/process.h waits poll the child's pidfd.
 *     Fallback: waitid(WNOHANG) between cancellable sleeps of 1 ms
 *     growing to 20 ms (an exit is seen up to that late; a cancel at once).
 *
 * C library functions beyond POSIX, each with its fallback (musl 1.2.3
 * has none of them; make check-musl tests every fallback):
 *   pthread_cond_clockwait (glibc 2.30): cancel_cond_wait's deadline.
 *     Fallback: pthread_cond_timedwait, first with the deadline as a
 *     CLOCK_MONOTONIC time, which is right for a condition on that clock;
 *     on CLOCK_REALTIME (the default) it is long past and times out at
 *     once, which says so, and the wait goes on with the deadline
 *     converted to the wall clock (re-converted if the clock is set).
 *   preadv2/pwritev2 wrappers (glibc 2.26): called as system calls.
 *   strerrordesc_np (glibc 2.32): cancel_strerror's text.  Fallback:
 *     strerror(), which is thread-safe in musl.
 *   strerrorname_np (glibc 2.32): errno names in log fields (ECANCELED).
 *     Fallback: a table of the errors libcancel returns; others are
 *     logged as their number.
 *   backtrace(3) (glibc): the watchdog's stacks (cancel/diag.h).
 *     Fallback: none possible; the report says "stack unavailable" where
 *     the frames would be.
 * The optional libraries (cancel/curl.h, sqlite.h, pq.h, http.h, host.h)
 * are built and tested with glibc only: Debian builds the libraries they
 * adapt for glibc.  The host uses sigabbrev_np (glibc 2.32).
 *
 * No internal field of a C library type is read: pthread types are used
 * through their functions only.
 * ====================================================================== */

/* ======================================================================
 * Time
 * ====================================================================== */

/* A deadline that never comes. */
#define CANCEL_NEVER INT64_MAX

#define CANCEL_USEC(n) ((int64_t)(n)*1000)
#define CANCEL_MSEC(n) ((int64_t)(n)*1000000)
#define CANCEL_SEC(n) ((int64_t)(n)*1000000000)

/* CLOCK_MONOTONIC in nanoseconds.  Thread-safe, never fails. */
CANCEL_API int64_t cancel_now(void);

/* ======================================================================
 * Errors
 * ====================================================================== */

/* A static, human description of a negative errno value (or of a positive
 * one: the sign is ignored).  Never returns NULL.  Thread-safe. */
CANCEL_API const char *cancel_strerror(int err);

/* ======================================================================
 * Reasons
 * ====================================================================== */

/* The kind of a cancellation.  Values from CANCEL_USER up are the
 * application's own codes; values between CANCEL_SHUTDOWN and CANCEL_USER
 * are reserved. */
enum cancel_kind {
  CANCEL_NONE = 0,        /* not cancelled */
  CANCEL_REQUESTED = 1,   /* somebody called cancel */
  CANCEL_TIMEOUT = 2,     /* a deadline passed */
  CANCEL_CLIENT_GONE = 3, /* the peer we work for went away */
  CANCEL_SHUTDOWN = 4,    /* the process is stopping */
  CANCEL_USER = 100
};

/* How many hops of the link path a cancel_reason holds.  A longer path
 * keeps the hops nearest the queried token and counts the rest. */
#define CANCEL_VIA_MAX 8

typedef struct cancel_hop {
  const char *name; /* the source's name, "" when unnamed */
  const char *note; /* NULL, or e.g. "grace 2s expired" for a shield */
} cancel_hop;

/* A snapshot of why a token was cancelled.  The strings point into the
 * sources along the path: they stay valid while the queried token's source
 * is alive (a source keeps its ancestors alive). */
typedef struct cancel_reason {
  int kind;           /* enum cancel_kind or a user code */
  int64_t time;       /* cancel_now() when the origin fired */
  const char *origin; /* name of the source that fired first, or "" */
  const char *detail; /* "" or detail text, e.g. "2s" for a timeout */
  size_t via_len;     /* hops in via[], origin side first */
  size_t via_skipped; /* hops nearer the origin left out of via[] */
  cancel_hop via[CANCEL_VIA_MAX]; /* sources crossed after the origin, the
                                     queried one last */
} cancel_reason;

/* The lower-case name of a kind: "requested", "timeout", "client gone",
 * "shutdown", "user" for a user code, "none", "invalid".  Never NULL. */
CANCEL_API const char *cancel_kind_name(int kind);

/* Writes one human line for `r` into buf, snprintf style, e.g.
 * "timeout (db-query 2s) via request GET /reports/42".
 * Returns the length the full line needs (excluding the NUL), or -EINVAL
 * when r is NULL or buf is NULL with len > 0.  Truncates to len-1 bytes. */
CANCEL_API int cancel_reason_format(const cancel_reason *r, char *buf,
                                    size_t len);

/* ======================================================================
 * Tokens and sources
 * ====================================================================== */

/* Private layout: read and write only through the functions below.  The
 * structures are public so that sources and registrations can live on the
 * caller's storage (no allocation on hot paths). */
typedef struct cancel_token {
  uint32_t state; /* bit 0: cancelled; written only by the library */
} cancel_token;

typedef struct cancel_reg cancel_reg;
typedef struct cancel_source cancel_source;
struct cancel__link;
struct cancel__shield;
struct cancel__tokenfd;

/* A cancellation callback.  See the callback rules at the top. */
typedef void cancel_fn(void *arg);

struct cancel_reg {
  cancel_reg *next, *prev;
  cancel_fn *fn;
  void *arg;
  cancel_source *src;
  uint32_t state;
  uint32_t waiters;
};

#define CANCEL__NAME_INLINE 40
#define CANCEL__DETAIL_INLINE 24

struct cancel_source {
  cancel_token tok;              /* first member: a token is a source */
  uint32_t refs;                 /* atomic */
  uint32_t flags;                /* under the lock, or before publication */
  uint32_t seen;                 /* what it was ever used for; owners only */
  cancel_reg *head;              /* registered callbacks, newest first; lock */
  cancel_reg *running;           /* callback being run by cancel; lock */
  const void *running_tid;       /* thread running the cancel */
  uint32_t *unref_waiter;        /* a zombie's last unref, waiting for
                                    `running` to return; lock */
  struct cancel__link *children; /* links and shields hooked on us; lock */
  cancel_source *via;            /* the parent whose cancel reached us */
  cancel_source *free_next;      /* teardown work list */
  const char *name;              /* name_buf, heap copy or "" */
  const char *detail;            /* detail_buf, heap copy or "" */
  int kind;                      /* the reason, valid once cancelled */
  uint32_t nlinks;               /* parents */
  int64_t time;                  /* when the origin fired */
  struct cancel__link *links;    /* one per parent */
  struct cancel__shield *shield; /* shields only */
  struct cancel__tokenfd *fdrec; /* cancel_token_fd(), once SEEN_FD */
  int64_t deadline;       /* own deadline, CANCEL_NEVER if none; atomic */
  int64_t eff_deadline;   /* earliest of own and ancestry's; atomic */
  cancel_source *dl_next; /* deadline propagation work list */
  int64_t timeout;        /* duration behind the deadline, for the detail */
  int64_t timer_at;       /* key in the timer heap; timer lock */
  int64_t heap_idx;       /* position in the timer heap or -1; timer lock */
  char name_buf[CANCEL__NAME_INLINE];
  char detail_buf[CANCEL__DETAIL_INLINE];
};

/* True when tok has been cancelled.  One acquire load: a caller that sees
 * true also sees everything written before the cancel.  NULL is never
 * cancelled.  Thread-safe, lock-free. */
static inline bool cancel_token_is_cancelled(const cancel_token *tok) {
  return tok != NULL && (__atomic_load_n(&tok->state, __ATOMIC_ACQUIRE) & 1u);
}

/* 0 while tok is live, -ECANCELED once it fired (level-triggered: forever
 * after).  Thread-safe, lock-free. */
static inline int cancel_token_check(const cancel_token *tok) {
  return cancel_token_is_cancelled(tok) ? -ECANCELED : 0;
}

/* The token of src (NULL for NULL).  Valid while src is alive. */
static inline const cancel_token *
cancel_source_token(const cancel_source *src) {
  return src != NULL ? &src->tok : NULL;
}

/* Creates a heap source with one reference.  `name` (may be NULL) is
 * copied; it names the source in reasons and logs.
 * Returns 0, -EINVAL (srcp NULL), -ENOMEM.  On error *srcp is NULL (when
 * srcp is not), as for every cancel_source_new*: a pointer that started
 * NULL can be unreffed whatever happened (see CANCEL_AUTO_SOURCE). */
CANCEL_API int cancel_source_new(cancel_source **srcp, const char *name);

/* Initialises a source on caller storage; no allocation unless the name is
 * longer than CANCEL__NAME_INLINE-1 bytes.  Tear down with
 * cancel_source_destroy(); the storage MUST stay valid until then.
 * Returns 0, -EINVAL (src NULL), -ENOMEM. */
CANCEL_API int cancel_source_init(cancel_source *src, const char *name);

/* Takes one more reference (for a thread or a queue that keeps the source
 * beyond the call that lent it).  Returns src.  Thread-safe. */
CANCEL_API cancel_source *cancel_source_ref(cancel_source *src);

/* Drops one reference.  The last one tears the source down:
 *   - it is unhooked from its parents and its timer is disarmed;
 *   - callbacks still registered on it are detached: they never run, and
 *     cancel_unregister() on them returns 1;
 *   - a heap source that still has linked children or shields stays alive
 *     (it can still be cancelled by its own parents or timer, and passes
 *     that on) until the last of them is destroyed: children keep their
 *     parents alive.  Its callbacks are detached all the same;
 *   - a caller-storage source cannot outlive its storage: its children are
 *     detached instead and will not be cancelled by it any more.
 * When the timer thread or a parent is cancelling src on another thread
 * right now, this waits until that cancel (its callbacks) has finished: on
 * return every callback registered on src has run or never will.  From a
 * callback running on src itself it returns at once and the teardown ends
 * when that cancel does (caller storage MUST stay valid until then).
 * NULL is a no-op.
 * Thread-safe against everything except a concurrent use of src by a
 * thread that holds no reference (a lifetime bug, like a use after free). */
CANCEL_API void cancel_source_unref(cancel_source *src);

/* The same as cancel_source_unref(), named for sources made with *_init. */
CANCEL_API void cancel_source_destroy(cancel_source *src);

/* The name given at creation, "" when none.  Valid while src is alive. */
CANCEL_API const char *cancel_source_name(const cancel_source *src);

/* Cancels src with kind CANCEL_REQUESTED.  The caller MUST hold a reference
 * to src (or borrow it from someone who does) for the whole call: the last
 * reference may otherwise go while this call is still running callbacks.
 * The first cancel wins: it records
 * the reason, publishes the cancelled state (a release), then runs the
 * registered callbacks one at a time, newest first, outside any lock, on
 * this thread, and cancels linked children.  Returns 1 when this call
 * cancelled src, 0 when it was already cancelled, -EINVAL for NULL.
 * Thread-safe; may be called from a callback. */
CANCEL_API int cancel_source_cancel(cancel_source *src);

/* The same with an explicit kind (CANCEL_REQUESTED..CANCEL_SHUTDOWN or a
 * code >= CANCEL_USER) and an optional detail, copied (dropped silently if
 * memory runs out: a cancellation never fails for lack of memory).
 * Returns 1, 0, or -EINVAL (NULL src, reserved or negative kind). */
CANCEL_API int cancel_source_cancel_with(cancel_source *src, int kind,
                                         const char *detail);

/* The kind tok was cancelled with, CANCEL_NONE while live (and for NULL).
 * Thread-safe, O(1). */
CANCEL_API int cancel_token_kind(const cancel_token *tok);

/* Fills *out with why tok was cancelled.  Returns 1 when cancelled, 0 when
 * not (out->kind is CANCEL_NONE), -EINVAL when out is NULL.  Thread-safe. */
CANCEL_API int cancel_token_reason(const cancel_token *tok, cancel_reason *out);

/* ======================================================================
 * Registrations
 * ====================================================================== */

/* Registers fn(arg) to run when tok is cancelled.  reg is caller storage,
 * nothing is allocated; it MUST stay valid until cancel_unregister()
 * returns (or until the callback ran and will not be looked at again).
 * Returns:
 *   0        registered (for a NULL token: never runs);
 *   1        tok was already cancelled: fn(arg) ran on this thread before
 *            the call returned (a later cancel_unregister() returns 0, as
 *            for any callback that ran);
 *   -EINVAL  reg or fn is NULL.
 * Thread-safe.  Callable from a callback. */
CANCEL_API int cancel_register(cancel_reg *reg, const cancel_token *tok,
                               cancel_fn *fn, void *arg);

/* Removes a registration.  Returns:
 *   1        removed before it ran: it will never run (also for a NULL
 *            token and for a registration detached by its source's
 *            destruction);
 *   0        it already ran, or is running: if it is running on another
 *            thread this call waits until it has returned; if it is running
 *            on this thread (a callback removing itself) it does not wait;
 *   -EINVAL  reg is NULL, or not registered (never registered, or already
 *            unregistered: unregistering twice is caught here).
 * After it returns (except in the self-removal case) the callback is not
 * running and reg may be freed.  Thread-safe, but a registration holds no
 * reference: the source MUST NOT be torn down while this call runs on
 * another thread (after teardown the registration is detached, and this
 * returns 1). */
CANCEL_API int cancel_unregister(cancel_reg *reg);

/* ======================================================================
 * Linked sources
 * ====================================================================== */

/* Creates a source cancelled when any of the n parent tokens is (NULL
 * entries are never cancelled).  It inherits the reason of the first parent
 * that fires, with itself appended to the via path; a parent already
 * cancelled cancels it at once.  Its effective deadline is the earliest
 * along its ancestry.  Destroying it unhooks it from every parent; it keeps
 * its heap parents alive until then.  Allocates the link nodes (with the
 * source, for *_new).
 * Returns 0, -EINVAL (srcp/src NULL, parents NULL with n > 0), -ENOMEM. */
CANCEL_API int cancel_source_new_linked(cancel_source **srcp, const char *name,
                                        const cancel_token *const *parents,
                                        size_t n);
CANCEL_API int cancel_source_init_linked(cancel_source *src, const char *name,
                                         const cancel_token *const *parents,
                                         size_t n);

/* The effective deadline of tok: the earliest deadline armed on its source
 * or any ancestor, CANCEL_NEVER when none (and for NULL).  Use it to
 * propagate a budget downstream.  It is kept in the source and updated
 * when an ancestor is re-armed, so this is one load however deep or
 * shared the ancestry (a re-arm costs the descendants it changes).  While
 * a re-arm is being passed down on another thread the answer may still be
 * the value before it.  A deadline that could not be armed is never
 * reported.  Never fails; thread-safe, lock-free. */
CANCEL_API int64_t cancel_token_deadline(const cancel_token *tok);

/* The time left until cancel_token_deadline(tok): 0 when passed (however
 * long ago, down to INT64_MIN), CANCEL_NEVER when there is none, and less
 * than CANCEL_NEVER for every deadline there is.  Never fails;
 * thread-safe. */
CANCEL_API int64_t cancel_token_remaining(const cancel_token *tok);

/* How long after a token's deadline cancel_token_settle() waits for the
 * timer to fire it.  The timer thread is woken at the deadline and fires
 * it within microseconds on an idle machine; this bounds a timer thread
 * that a loaded machine (or a sanitizer, or valgrind) did not schedule. */
#define CANCEL_SETTLE_WAIT_NS CANCEL_SEC(1)

/* Settles the race between a timeout derived from tok's deadline and the
 * library's timer that fires tok at that deadline.  A call that gave some
 * component a timeout taken from cancel_token_deadline(tok) (curl's
 * CURLOPT_TIMEOUT_MS, PostgreSQL's statement_timeout, a budget sent to a
 * downstream service that answered "deadline exceeded") can see that
 * timeout expire a moment before the timer has cancelled tok: tok is then
 * still live and has no reason to read.  Such a call calls this before it
 * reports the timeout, and returns -ECANCELED only when this does.
 *   - tok already cancelled: returns -ECANCELED at once;
 *   - tok NULL, without a deadline, or with a deadline more than early_ns
 *     away: returns 0 at once (the timeout was not the token's: report
 *     it as your own);
 *   - otherwise (the deadline passed, or is at most early_ns away: e.g. a
 *     timeout rounded to whole milliseconds, or a downstream's own clock)
 *     it blocks, woken by the cancel (no polling), until tok is cancelled
 *     (by its timer, or by anything else meanwhile): -ECANCELED; or until
 *     CANCEL_SETTLE_WAIT_NS after the deadline: -ETIMEDOUT, tok still
 *     live.  That happens when nothing fires tok: in the child of fork(),
 *     where the timers armed before the fork do not run, or when the
 *     timer thread was not scheduled for that long.  A deadline moved
 *     later while it waits is seen when the wait ends: 0 if it is then
 *     more than early_ns away.
 * Returns -ECANCELED (then cancel_token_reason() returns 1), 0,
 * -ETIMEDOUT, or -EINVAL (early_ns < 0).  It never returns -ECANCELED
 * with tok live, so a call may return that value as it is.
 * Thread-safe; blocks at most early_ns + CANCEL_SETTLE_WAIT_NS; not from
 * a cancellation callback (it may block). */
CANCEL_API int cancel_token_settle(const cancel_token *tok, int64_t early_ns);

/* ======================================================================
 * Timeouts
 * ====================================================================== */

/* Arms (or re-arms, earlier or later) src to cancel with kind CANCEL_TIMEOUT
 * at `deadline`.  CANCEL_NEVER disarms.  A deadline already passed cancels
 * at once on this thread.  A no-op once src is cancelled.  The timer lives
 * on the library's one internal thread (started on first use; a fired
 * timer's callbacks run there).
 * Any int64_t is a deadline: one at or before cancel_now() (INT64_MIN
 * included) fires now, one centuries away is armed like any other.
 * Returns:
 *   0        armed, disarmed (CANCEL_NEVER, which never fails) or fired;
 *   1        src was already cancelled: nothing done;
 *   -EINVAL  src is NULL;
 *   -ENOMEM  no memory for the timer queue or the timer thread;
 *   -EMFILE, -ENFILE  no descriptor left for the timer thread's first
 *            start (its epoll set, timerfd and eventfd);
 *   -EAGAIN  the timer thread could not be started (pthread_create), or
 *            the process is exiting (after its destructors ran).
 * On an error src keeps the deadline it had before the call (still armed,
 * or none): cancel_token_deadline() never reports a deadline that nobody
 * will enforce.  Thread-safe; concurrent re-arms of one source settle on
 * the last one made. */
CANCEL_API int cancel_source_cancel_at(cancel_source *src, int64_t deadline);

/* cancel_source_cancel_at(src, cancel_now() + timeout_ns); the reason's
 * detail is the duration ("250ms").  A timeout too long to end before
 * INT64_MAX (CANCEL_NEVER - 1, say) is no deadline: it disarms.  Returns
 * as cancel_source_cancel_at(), and -EINVAL also for timeout_ns < 0. */
CANCEL_API int cancel_source_cancel_after(cancel_source *src,
                                          int64_t timeout_ns);

/* A source linked to `parent` (may be NULL) that times out after
 * timeout_ns: the C spelling of Go's context.WithTimeout.  timeout_ns 0
 * gives a source cancelled already; one too long to end before INT64_MAX
 * gives a source without a deadline of its own.
 * Returns 0, -EINVAL (srcp/src NULL, timeout_ns < 0), -ENOMEM, -EMFILE,
 * -ENFILE, -EAGAIN (the timer could not be armed, as for
 * cancel_source_cancel_at(); nothing is left: *srcp is NULL, src needs no
 * destroy). */
CANCEL_API int cancel_source_new_timeout(cancel_source **srcp, const char *name,
                                         const cancel_token *parent,
                                         int64_t timeout_ns);
CANCEL_API int cancel_source_init_timeout(cancel_source *src, const char *name,
                                          const cancel_token *parent,
                                          int64_t timeout_ns);

/* ======================================================================
 * Shields: the point of no return
 * ====================================================================== */

/* A shield is a source whose token ignores the cancellation of `outer` for
 * a grace period: work that must not be cut in half (a COMMIT, a
 * compensation, cleanup) runs under its token.
 *   grace_ns == 0: the shield never follows outer; it finishes no matter
 *                  what (it is still cancellable directly);
 *   grace_ns  > 0: grace_ns after outer fired, the shield is cancelled with
 *                  outer's kind, origin and detail, itself appended to the
 *                  via path with the note "grace <d> expired".  If the
 *                  grace timer cannot be armed when outer fires (no
 *                  memory, descriptor or thread for it, or the process is
 *                  exiting), the grace ends at once instead, noted "grace
 *                  <d> cut short (no timer)": never later than outer's
 *                  cancel plus grace_ns.  A grace too long to end before
 *                  INT64_MAX never ends.
 * The shield's deadline is its own, not outer's: once outer fired, the
 * end of the grace is part of it.  Like any source it is
 * torn down with unref/destroy.
 * Returns 0, -EINVAL (srcp/src NULL, grace_ns < 0), -ENOMEM. */
CANCEL_API int cancel_source_new_shield(cancel_source **srcp, const char *name,
                                        const cancel_token *outer,
                                        int64_t grace_ns);
CANCEL_API int cancel_source_init_shield(cancel_source *src, const char *name,
                                         const cancel_token *outer,
                                         int64_t grace_ns);

/* How many shields are alive in the process (the host waits for them to
 * close before it exits).  Thread-safe. */
CANCEL_API size_t cancel_shields_open(void);

/* ======================================================================
 * Waiting: every blocking call, cancellable
 *
 * The same conventions everywhere: the token comes first; `deadline` is
 * absolute (CANCEL_NEVER for none; one already passed makes the call a
 * poll: it does what it can without blocking and returns); -ECANCELED as
 * soon as the token fires (at once, without touching the descriptor, when
 * it fired before the call), and only once it has: a token whose deadline
 * passed but whose timer has not yet fired it is still live, and a wait
 * goes on until the timer fires it (no wait takes a timeout from the
 * token's deadline); -ETIMEDOUT when the call's own deadline passed (also
 * when that deadline is the token's own and came first: pass CANCEL_NEVER
 * to be ended by the token alone); -errno for the system's errors.  EINTR is
 * handled inside: a signal never ends a wait early.  A blocked thread is woken
 * through a per-thread primitive (a futex, or one eventfd per thread for
 * descriptor waits) registered on the token for the duration of the wait: no
 * descriptor and no allocation per token or per wait.  cancel_sleep
 * sleeps on the token's own futex word, shared by all its sleepers, so
 * that one cancel wakes ten thousand of them in linear time.
 * ====================================================================== */

/* Sleeps for ns (>= 0), or until `deadline`.  Returns 0 when the time is
 * up, -ECANCELED, -EINVAL (ns < 0). */
CANCEL_API int cancel_sleep(const cancel_token *tok, int64_t ns);
CANCEL_API int cancel_sleep_until(const cancel_token *tok, int64_t deadline);

/* poll(2) with a token.  Returns the number of entries with revents set
 * (> 0; POLLNVAL for an invalid descriptor counts, as in poll), -ETIMEDOUT,
 * -ECANCELED, -EINVAL (fds NULL with nfds > 0), -ENOMEM (more than 64
 * entries need a copy with the wake descriptor appended: made once per
 * thread, grown when needed, kept until the thread exits), -EMFILE,
 * -ENFILE, -ENOMEM (with a token: the thread's wake eventfd, made on its
 * first descriptor wait, could not be created).  Every call below that
 * waits for a descriptor (cancel_wait_fd, cancel_read, ..., cancel_connect)
 * can return these three too. */
CANCEL_API int cancel_poll(const cancel_token *tok, struct pollfd *fds,
                           nfds_t nfds, int64_t deadline);

/* Waits until fd is ready for `events` (POLLIN, POLLOUT...).  Returns the
 * revents (> 0), -ETIMEDOUT, -ECANCELED, -EBADF. */
CANCEL_API int cancel_wait_fd(const cancel_token *tok, int fd, short events,
                              int64_t deadline);

/* read(2) / write(2) that wait for the descriptor with the token.  They try
 * the operation without blocking first (a ready descriptor costs one system
 * call); blocking or not, the descriptor's own mode is left as it is.
 * Descriptors without RWF_NOWAIT support (FIFOs opened by name, ttys) are
 * polled, then read, or written PIPE_BUF bytes at a time: if such a
 * descriptor is blocking and another thread reads or writes it too, that
 * thread may take the data (or the room) in between and this call then
 * blocks without seeing the token: give shared descriptors O_NONBLOCK.
 * Return the bytes transferred, which may be fewer than len, as with
 * read(2) and write(2) (read: 0 at end of file; use the _full variants to
 * move everything), -ECANCELED, -ETIMEDOUT, -EINVAL (len > SSIZE_MAX, or
 * buf NULL with len > 0), -EBADF, -errno. */
CANCEL_API ssize_t cancel_read(const cancel_token *tok, int fd, void *buf,
                               size_t len, int64_t deadline);
CANCEL_API ssize_t cancel_write(const cancel_token *tok, int fd,
                                const void *buf, size_t len, int64_t deadline);

/* Loop until len bytes are transferred (read: or end of file).  Partial
 * progress is never lost: *done (may be NULL) always holds the bytes
 * transferred, also when the call returns an error.  Returns the bytes
 * transferred (== len, or less at end of file for a read), or -ECANCELED /
 * -ETIMEDOUT / -errno with *done saying how far it got. */
CANCEL_API ssize_t cancel_read_full(const cancel_token *tok, int fd, void *buf,
                                    size_t len, int64_t deadline, size_t *done);
CANCEL_API ssize_t cancel_write_full(const cancel_token *tok, int fd,
                                     const void *buf, size_t len,
                                     int64_t deadline, size_t *done);

/* recv(2) / send(2) with a token (MSG_DONTWAIT is added: the socket's mode
 * is left as it is).  Returns as cancel_read / cancel_write. */
CANCEL_API ssize_t cancel_recv(const cancel_token *tok, int fd, void *buf,
                               size_t len, int flags, int64_t deadline);
CANCEL_API ssize_t cancel_send(const cancel_token *tok, int fd, const void *buf,
                               size_t len, int flags, int64_t deadline);

/* accept4(2) with a token; flags as accept4 (SOCK_NONBLOCK, SOCK_CLOEXEC).
 * It waits for a connection, then accepts it: on a BLOCKING listener that
 * several threads accept on, the threads that lose the race for a
 * connection block in accept4, deaf to the token, so give a shared
 * listener SOCK_NONBLOCK.  Returns the new descriptor, -ECANCELED,
 * -ETIMEDOUT, -EINVAL (not listening), -ENOTSOCK, -errno. */
CANCEL_API int cancel_accept(const cancel_token *tok, int fd,
                             struct sockaddr *addr, socklen_t *addrlen,
                             int flags, int64_t deadline);

/* connect(2) finished with the token observed: TCP or Unix, IPv4 or IPv6.
 * A blocking socket is switched to non-blocking for the call and switched
 * back.  Returns 0 when connected, -ECANCELED, -ETIMEDOUT (the socket is
 * then unusable: close it), -ECONNREFUSED and the other connect errors,
 * -EAGAIN for a Unix socket whose listener's queue is full. */
CANCEL_API int cancel_connect(const cancel_token *tok, int fd,
                              const struct sockaddr *addr, socklen_t addrlen,
                              int64_t deadline);

/* pthread_cond_clockwait(CLOCK_MONOTONIC) with a token.  The mutex MUST be
 * locked by the caller; it is locked again on every return.  Returns 0 when
 * woken (spurious wake-ups happen, as with pthread: re-check your
 * predicate), -ETIMEDOUT, -ECANCELED.  There is no lost wake-up between
 * the token check and the wait: the broadcast that ends the wait comes
 * after a pass through the mutex.  The cancelling thread tries the mutex;
 * if it is busy (POSIX cannot say by whom: the cancelling thread may hold
 * it itself, which is allowed, with a mutex of any type), it broadcasts
 * at once and the library's thread passes through the mutex, retrying it
 * every millisecond, and broadcasts again.  Only if that thread cannot be
 * started (no threads left) does the cancelling thread wait for the
 * mutex itself: then a canceller holding a normal mutex deadlocks.  The
 * condition may use CLOCK_MONOTONIC or CLOCK_REALTIME (see Platform for
 * a C library without pthread_cond_clockwait).
 *
 * Why there is no cancel_mutex_lock: a mutex guards a short critical
 * section and waiting for it is not a wait that should observe
 * cancellation; and pthread offers no way to wake a thread blocked in
 * pthread_mutex_lock short of polling.  Hold mutexes briefly; wait on
 * conditions (cancel_cond_wait) instead. */
CANCEL_API int cancel_cond_wait(const cancel_token *tok, pthread_cond_t *cond,
                                pthread_mutex_t *mutex, int64_t deadline);

/* A counting semaphore that a token can interrupt.  POSIX sem_t cannot be:
 * the only way to wake a sem_wait is to post it, which another waiter may
 * take.  Private layout; no allocation; usable between threads of one
 * process. */
typedef struct cancel_sem {
  uint32_t value;   /* atomic: the count */
  uint32_t waiters; /* atomic: threads blocked in cancel_sem_wait */
  uint32_t seq;     /* atomic: the futex word, bumped by posts and wakes */
} cancel_sem;

/* Initialises with `value` (<= INT32_MAX).  Returns 0 or -EINVAL. */
CANCEL_API int cancel_sem_init(cancel_sem *sem, unsigned value);
/* Adds one and wakes a waiter.  Returns 0, -EINVAL, -EOVERFLOW. */
CANCEL_API int cancel_sem_post(cancel_sem *sem);
/* Takes one if there is one: 0, or -EAGAIN. */
CANCEL_API int cancel_sem_trywait(cancel_sem *sem);
/* Takes one, waiting with the token.  0, -ECANCELED, -ETIMEDOUT, -EINVAL. */
CANCEL_API int cancel_sem_wait(const cancel_token *tok, cancel_sem *sem,
                               int64_t deadline);

/* A thread that can be joined with a token.  pthread_join cannot be woken,
 * so the thread is started through cancel_thread_create, which marks its
 * end where a waiter can see it. */
typedef struct cancel_thread {
  pthread_t thread;
  uint32_t done; /* atomic futex word: bit 0 the start routine ended,
                    the rest counts wake-ups of a waiter */
  void *(*fn)(void *);
  void *arg;
  void *ret;
} cancel_thread;

/* pthread_create(&t->thread, attr, fn, arg) with the end marked.  `t` MUST
 * stay valid until joined.  Returns 0, -EAGAIN, -EINVAL, -errno. */
CANCEL_API int cancel_thread_create(cancel_thread *t,
                                    const pthread_attr_t *attr,
                                    void *(*fn)(void *), void *arg);
/* Waits for t to finish, then joins it (*ret gets its result).  Returns 0,
 * -ECANCELED or -ETIMEDOUT (t is still running and still joinable: call
 * again later), -EINVAL. */
CANCEL_API int cancel_thread_join(const cancel_token *tok, cancel_thread *t,
                                  void **ret, int64_t deadline);

/* ======================================================================
 * A pollable token
 * ====================================================================== */

/* A descriptor that becomes readable (and stays readable) once tok is
 * cancelled, for event loops: epoll, libuv's uv_poll, curl_multi_poll's
 * extra_fds.  Created on first call (an eventfd), the same one for later
 * calls; owned by the source: do not close it; it is closed when the source
 * is torn down.  Returns the descriptor, -EINVAL (NULL token: it never
 * fires, there is nothing to poll), -EMFILE, -ENFILE, -ENOMEM. */
CANCEL_API int cancel_token_fd(const cancel_token *tok);

/* ======================================================================
 * Cleanup at scope exit
 *
 * Go writes `defer cancel()`; with GCC and Clang the cleanup attribute
 * does the same in C, the way GLib's g_autoptr does: a variable declared
 * with one of these is released when its block is left, by a return, a
 * break, a goto out of the block or falling off its end (not by longjmp
 * or a thread's exit, which skip cleanups).
 *
 *   CANCEL_AUTO_SOURCE cancel_source *src = NULL;
 *       cancel_source_unref(src) at scope exit: a heap source from any
 *       cancel_source_new* (each sets *srcp to NULL on error, so a failed
 *       creation leaves nothing to drop).  It does not cancel: the timer
 *       is disarmed and the source unhooked from its parents, and work
 *       that took a reference of its own keeps running.
 *   CANCEL_AUTO_CANCEL cancel_source *src = NULL;
 *       cancel_source_cancel(src), then cancel_source_unref(src): Go's
 *       `defer cancel()` exactly.  Threads and linked children that still
 *       hold the source see it cancelled (kind CANCEL_REQUESTED), so work
 *       started on its behalf stops with the function that started it.
 *       A source that fired already keeps its reason.
 *   CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
 *       cancel_unregister(&reg) at scope exit, when it is registered; a
 *       registration never made (still CANCEL_REG_INIT), one whose
 *       callback ran and one unregistered by hand already are left as
 *       they are.  As cancel_unregister(), it waits when the callback is
 *       running on another thread, so the callback is not running, and
 *       never will, once the block is left: what it points to may be
 *       local.  The initialiser is required (an uninitialised cancel_reg
 *       holds garbage).
 *   CANCEL_SCOPE(tok, name) (cancel/diag.h) ends a work scope the same
 *       way.
 *
 * Both pointers start NULL, and every one is NULL-safe.  Cleanups run in
 * the reverse order of the declarations: declare a registration after the
 * source it is registered on, so that it goes first.  (The other order is
 * safe too: the source's teardown detaches the registration, which then
 * needs nothing.)  Sources on caller storage (cancel_source_init*) have
 * no helper: whether one was initialised is the caller's to know.
 *
 *   int fetch(const cancel_token *request) {
 *     CANCEL_AUTO_SOURCE cancel_source *call = NULL;
 *     int rc = cancel_source_new_timeout(&call, "downstream call",
 *                                        request, CANCEL_MSEC(800));
 *     if (rc < 0)
 *       return rc;
 *     CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
 *     cancel_register(&reg, cancel_source_token(call), wake, &waiter);
 *     return call_downstream(cancel_source_token(call), &waiter);
 *   }
 *
 * Without GCC or Clang the macros are not defined (nor CANCEL_SCOPE's
 * attribute: use cancel_scope_begin/end).  The plain-C spelling of the
 * same function is one exit label that releases in reverse order, which
 * works because the starting values are safe to release:
 *
 *   int fetch(const cancel_token *request) {
 *     cancel_source *call = NULL;
 *     cancel_reg reg = CANCEL_REG_INIT;
 *     int rc = cancel_source_new_timeout(&call, "downstream call",
 *                                        request, CANCEL_MSEC(800));
 *     if (rc < 0)
 *       goto out;
 *     cancel_register(&reg, cancel_source_token(call), wake, &waiter);
 *     rc = call_downstream(cancel_source_token(call), &waiter);
 *   out:
 *     cancel_unregister(&reg);   // -EINVAL when never registered: harmless
 *     cancel_source_unref(call); // NULL: a no-op
 *     return rc;
 *   }
 * ====================================================================== */

/* A registration that is not registered: what CANCEL_AUTO_REG needs, and
 * what cancel_unregister() answers -EINVAL for. */
#define CANCEL_REG_INIT                                                        \
  { NULL, NULL, NULL, NULL, NULL, 0, 0 }

#if defined(__GNUC__) || defined(__clang__)
static inline void cancel__auto_source(cancel_source **srcp) {
  cancel_source_unref(*srcp);
}
static inline void cancel__auto_cancel(cancel_source **srcp) {
  if (*srcp != NULL) {
    (void)cancel_source_cancel(*srcp);
    cancel_source_unref(*srcp);
  }
}
static inline void cancel__auto_reg(cancel_reg *reg) {
  /* -EINVAL (never registered, or unregistered by hand) is the case the
   * helper exists to make safe. */
  (void)cancel_unregister(reg);
}
#define CANCEL_AUTO_SOURCE __attribute__((cleanup(cancel__auto_source)))
#define CANCEL_AUTO_CANCEL __attribute__((cleanup(cancel__auto_cancel)))
#define CANCEL_AUTO_REG __attribute__((cleanup(cancel__auto_reg)))
#endif

/* ======================================================================
 * fork()
 *
 * The child of fork() has one thread, the one that called fork(), and a
 * copy of the parent's memory: the library's state comes along as a copy,
 * and what belonged to the parent's other threads (their stacks and
 * thread-locals, which the child's next pthread_create() reuses, and the
 * library's internal thread) does not.  In the child:
 *
 *   Sources and tokens are copies, independent from then on: a cancel in
 *     one process is not seen in the other.  Each keeps its state (fired
 *     or not, the reason, links, references, deadline).
 *   Waits: those of the parent's other threads (every wait of this
 *     header: cancel_sleep, cancel_poll, cancel_read..., cancel_cond_wait,
 *     cancel_sem_wait, cancel_thread_join) are dropped: their threads do
 *     not exist, and no cancel in the child reaches their registrations.
 *     The child's own waits work on every token it holds, old or new.
 *   Registrations (cancel_register) of the application are copies, still
 *     registered.  The library cannot tell which thread owned one: a
 *     registration (or a source) that lived in another thread's memory
 *     (its stack, its thread-locals) MUST NOT be reached in the child, so
 *     the child MUST NOT cancel, unregister from or destroy a source that
 *     such a registration is on.  Heap and static ones are the child's.
 *   Timers (cancel_source_cancel_after, cancel_source_cancel_at, shields'
 *     grace periods) armed before fork() are not armed in the child: a
 *     source keeps its deadline (cancel_token_deadline() and
 *     cancel_token_remaining() report it), but nothing fires it.  Call
 *     cancel_source_cancel_at() in the child to have it enforced there.
 *     Timers the child arms work as in any process (the internal thread
 *     starts afresh).
 *   Hang-up watches (cancel/watch.h) are not armed in the child, and the
 *     signal watch is not watching: see cancel_watch_hangup() and
 *     cancel_signals_watch() for how the child releases its copies.
 *   Token descriptors (cancel_token_fd) are the child's own: the same
 *     number, now an eventfd of the child's, readable once the child's
 *     copy of the token has fired (at once if it had fired before the
 *     fork).  Cancels in the parent do not reach it, and the child's do
 *     not reach the parent's.
 *   Scopes (cancel/diag.h): only the forking thread's; the child's
 *     watchdog and metrics see no other.
 *
 * Not made safe: a source that another thread was cancelling, registering
 * on, unregistering from or destroying at the moment of fork() stays as
 * that thread left it (half-cancelled, or its lock held for good): the
 * child MUST NOT use it.  POSIX allows only async-signal-safe calls in the
 * child of a multi-threaded process; the above holds on glibc, where the
 * child may start threads.  A child that only calls exec needs none of it.
 * ====================================================================== */

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_H */
