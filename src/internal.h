/*
 * Internal declarations shared by the core's source files.  Nothing here is
 * exported: names are cancel__* (or static), visibility is hidden.
 */
#ifndef CANCEL_INTERNAL_H
#define CANCEL_INTERNAL_H

#include "cancel.h"
#include "cancel/diag.h"
#include "deadline.h"

#include <assert.h>
#include <poll.h>
#include <sched.h>
#include <stdint.h>
#include <time.h>

/* ---- Atomics: thin names over the GCC/Clang builtins ------------------ */

#define ld_relaxed(p) __atomic_load_n((p), __ATOMIC_RELAXED)
#define ld_acquire(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define st_relaxed(p, v) __atomic_store_n((p), (v), __ATOMIC_RELAXED)
#define st_release(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)

/* ---- Source state word (cancel_token.state) --------------------------- */

#define ST_CANCELLED 1u /* the public bit: see cancel_token_is_cancelled() */
#define ST_LOCKED 2u    /* the source's spin lock */

/* ---- Source flags (cancel_source.flags, under the source lock) -------- */

#define SF_HEAP 0x001u       /* allocated by *_new: free() at teardown */
#define SF_NAME_OWNED 0x002u /* name is a heap copy */
#define SF_DETAIL_OWNED 0x004u
#define SF_LINKS_OWNED 0x008u /* links array allocated apart (init_linked) */
#define SF_SHIELD_OWNED 0x010u
#define SF_FIRING 0x020u    /* cancel() is running the callbacks */
#define SF_ZOMBIE 0x040u    /* no references left, children keep it */
#define SF_PENDING 0x080u   /* torn down while firing: finish after */
#define SF_DEAD 0x100u      /* teardown started */
#define SF_DL_QUEUED 0x200u /* on the deadline work list (link.c) */
#define SF_GONE 0x400u      /* `running` unregistered itself: never touch it */
#define SF_OWNED_MASK                                                          \
  (SF_NAME_OWNED | SF_DETAIL_OWNED | SF_LINKS_OWNED | SF_SHIELD_OWNED)

/* ---- What a source was ever used for (cancel_source.seen) ------------ *
 * Set under the lock by threads that own or borrow the source, never by a
 * canceller: the last owner can read it without the lock (its reference
 * count or the end of the borrow orders it after those writes), and learn
 * whether another thread may still reach the source. */

#define SEEN_TIMER 0x1u /* armed: the timer thread may fire it */
#define SEEN_CHILD 0x2u /* had a child or shield: they may detach from it */
#define SEEN_FD 0x4u    /* has a token descriptor (fdrec) to close */

/* ---- Registration states (cancel_reg.state, low byte) ----------------- */

enum {
  REG_IDLE = 0,     /* not registered (never, or unregistered) */
  REG_LISTED = 1,   /* in its source's list */
  REG_RUNNING = 2,  /* popped by cancel, callback running */
  REG_DONE = 3,     /* the callback ran */
  REG_DETACHED = 4, /* its source was destroyed first: will never run */
  REG_NULLTOK = 5   /* registered on the NULL token: will never run */
};
#define REG_STATE_MASK 0xffu
#define REG_WAITERS 0x100u /* a thread sleeps on the futex until DONE */

/* A parent -> child edge.  The registration lives in the parent's callback
 * list; the link itself also sits in the parent's children list so that a
 * heap parent knows it is still needed, and so that a caller-storage parent
 * can detach its children when it is destroyed. */
struct cancel__link {
  cancel_reg reg;             /* on the parent's token */
  cancel_source *child;       /* the source this edge cancels */
  cancel_source *parent;      /* NULL once detached; atomic */
  struct cancel__link *cnext; /* in parent->children; parent lock */
  struct cancel__link *cprev;
  int64_t eff; /* the parent's effective deadline as last passed down
                  (CANCEL_NEVER when detached); child lock, atomic */
};

struct cancel__shield {
  struct cancel__link link; /* on the outer token */
  int64_t grace;            /* 0: never follow outer */
  int64_t grace_at;         /* CANCEL_NEVER until outer fired; atomic */
  char note[40];            /* "grace 2s expired" */
};

/* ---- Thread identity -------------------------------------------------- */

/* A cheap unique id of the calling thread: the address of a thread-local
 * (initial-exec: one add to the thread pointer, no call). */
extern __thread char cancel__self_anchor
    __attribute__((tls_model("initial-exec")));
static inline const void *cancel__self(void) {
  return &cancel__self_anchor;
}

/* ---- Spin lock on the state word -------------------------------------- */

/* Locks src and returns the state word as locked.  Critical sections are a
 * few pointer writes long and never call user code, so a test-and-set lock
 * that yields when it finds the lock held beats a futex lock here. */
uint32_t cancel__lock_slow(cancel_source *src);

static inline uint32_t cancel__lock(cancel_source *src) {
  uint32_t v = ld_relaxed(&src->tok.state);
  if (!(v & ST_LOCKED) &&
      __atomic_compare_exchange_n(&src->tok.state, &v, v | ST_LOCKED, 1,
                                  __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
    return v | ST_LOCKED;
  return cancel__lock_slow(src);
}

/* Unlocks with the value the holder knows (only lock holders write the
 * word), so unlocking is a plain release store, not a read-modify-write. */
static inline void cancel__unlock(cancel_source *src, uint32_t locked) {
  st_release(&src->tok.state, locked & ~ST_LOCKED);
}

static inline void cancel__cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* ---- Futex ------------------------------------------------------------ */

void cancel__futex_wait(uint32_t *addr, uint32_t expected);
void cancel__futex_wake_all(uint32_t *addr);

/* ---- Cancelling (source.c) -------------------------------------------- */

/* Cancels src with the given reason.  `detail` is copied (may be NULL),
 * `via` is the parent whose cancellation reached src (NULL at the origin).
 * The linked children are cancelled by the same loop, depth first, without
 * recursion and without allocating: a source being cancelled keeps its
 * loop's state (`running`, SF_GONE) and its way back (`via`) in itself.
 * Returns 1 if this call cancelled src, 0 if it was already cancelled. */
int cancel__fire(cancel_source *src, int kind, const char *detail,
                 cancel_source *via, int64_t time, uint32_t extra_flags);

/* Sets up the fields common to every source.  Returns 0 or -ENOMEM. */
int cancel__source_setup(cancel_source *src, const char *name, uint32_t flags);

/* Hooks `link` (with its child set) on `parent`: it joins the parent's
 * children and its callback list.  If the parent is already cancelled the
 * callback runs now, on this thread. */
void cancel__link_attach(struct cancel__link *link, cancel_source *parent,
                         cancel_fn *fn);

/* Removes reg from src, which the caller has locked (v); unlocks.  Returns
 * 1 if it was removed before running, 0 if it ran or is running (waiting
 * for it unless it runs on this thread). */
int cancel__reg_remove_locked(cancel_source *src, uint32_t v, cancel_reg *reg);
void cancel__list_push(cancel_source *src, cancel_reg *reg);

/* After fork(), in the child (one thread): makes reg, a registration that
 * a thread of the parent owned, as if it had been unregistered: off its
 * source's list, without the source lock (whoever held it did not come
 * along), so that no cancel in the child reaches it. */
void cancel__reg_forget(cancel_reg *reg);

/* Unhooks a link from its parent: waits for its callback if another thread
 * runs it.  Returns the parent if this was the last child of a zombie that
 * must now be torn down, else NULL. */
cancel_source *cancel__link_detach(struct cancel__link *link);

/* The callbacks of internal edges (a link, a shield's hook on its outer):
 * a zombie keeps these registrations and drops the application's.  The
 * cancel loop never calls cancel__link_fired: it descends into the child
 * itself.  It runs only when a link is attached to a cancelled parent. */
void cancel__link_fired(void *arg);
void cancel__shield_outer_fired(void *arg);

/* Finishes the teardown of a source whose last reference (or child) went. */
void cancel__source_free(cancel_source *src);

/* ---- Timers (timer.c) ------------------------------------------------- */

/* Puts src in the timer heap at cancel__own_deadline(src), moves it, or
 * takes it out when that is CANCEL_NEVER.  The key is read under the timer
 * lock, so concurrent re-arms settle on the last value written.  Returns 0,
 * -ENOMEM, -EAGAIN when the timer thread cannot start. */
int cancel__timer_update(cancel_source *src);

/* Takes src out of the heap.  If the timer thread is firing src right now,
 * waits for it to finish (unless called on the timer thread itself). */
void cancel__timer_disarm(cancel_source *src);

/* Called on the timer thread when src's timer_at passed (timer.c calls it,
 * source.c / shield.c decide what it means). */
void cancel__timer_fired(cancel_source *src);

/* Formats a duration as "2s", "250ms", "40us" or "7ns". */
void cancel__format_duration(char *buf, size_t len, int64_t ns);

/* Writes the via path of r at buf + pos, snprintf style (counting past
 * len), and returns the new position: "(N more)<sep>" when hops nearer
 * the origin were left out, then each hop's name ("?" when unnamed) with
 * its note, " (grace 2s expired)", joined by sep.  cancel_reason_format
 * (" -> ") and cancel_logfmt_reason (">") both say the path with it, so
 * the human line and the log line never disagree on a hop or a note. */
size_t cancel__reason_via(const cancel_reason *r, const char *sep, char *buf,
                          size_t len, size_t pos);

/* ---- Reactor (reactor.c): the one internal thread ---------------------- */

void cancel__reactor_lock(void);
void cancel__reactor_unlock(void);
/* Blocks on the reactor's condition variable (reactor lock held). */
void cancel__reactor_wait_locked(void);
void cancel__reactor_broadcast_locked(void);
/* Starts the thread (and its descriptors) if it is not running. */
int cancel__reactor_ensure_locked(void);
/* Makes sure the thread wakes by `at` (the earliest timer). */
void cancel__reactor_schedule_locked(int64_t at);
/* True on the reactor thread. */
bool cancel__on_reactor(void);

/* Timer side of the reactor loop (timer.c), reactor lock held: fires every
 * due timer (dropping the lock around each) and returns the next key. */
int64_t cancel__timer_run_locked(void);
/* After fork(), in the child: nothing is being fired any more. */
void cancel__timer_atfork_child(void);

/* Descriptor watches on the reactor.  The record is caller storage; its
 * layout is in include/cancel/watch.h (a public cancel_watch embeds it).
 * fn(arg, events) runs on the reactor thread, one watch at a time, with the
 * epoll events that were reported; it follows the callback rules (short,
 * never blocking).  A watch keeps the reactor thread from exiting on idle.
 * Watches registered before fork() are gone in the child (its reactor
 * starts with an empty epoll set): they never fire there, and removing one
 * returns -ENOENT. */
struct cancel__fdwatch;
typedef void cancel__watch_fn(void *arg, uint32_t events);

/* Registers fd with epoll for `events` (EPOLLIN, EPOLLRDHUP, EPOLLONESHOT,
 * EPOLLET...; EPOLLHUP and EPOLLERR are always reported), starting the
 * reactor if needed.  fd MUST stay open until cancel__reactor_watch_del()
 * returns.  Returns 0, -EAGAIN (the reactor could not start, or the process
 * is exiting), -ENOMEM, or epoll_ctl's error: -EBADF, -EPERM (not
 * pollable), -EEXIST (fd is registered already), -ENOSPC. */
int cancel__reactor_watch_add(struct cancel__fdwatch *w, int fd,
                              uint32_t events, cancel__watch_fn *fn, void *arg);

/* Changes the events of a registered watch (re-arms an EPOLLONESHOT one).
 * Returns 0, -ENOENT (not registered), or epoll_ctl's error. */
int cancel__reactor_watch_mod(struct cancel__fdwatch *w, uint32_t events);

/* Unregisters w: once it returns, fn will not be called again, and w may be
 * freed (then close the fd).  If fn is running on another thread it waits
 * until fn has returned; from the reactor thread (fn removing itself or
 * another watch) it does not wait.  Returns 0, or -ENOENT when w was not
 * registered (never, already removed, or registered before fork()). */
int cancel__reactor_watch_del(struct cancel__fdwatch *w);

/* A job for the reactor thread: fn(job) runs there, reactor lock held, so
 * it MUST NOT block (a trylock, never a lock); it returns true when the
 * job is done (it is then off the list and the reactor never touches it
 * again), false to be run again about a millisecond later.  The record is
 * caller storage.  cancel_cond_wait uses it to pass through a mutex that
 * the cancelling thread may hold itself (cond.c). */
struct cancel__rjob {
  struct cancel__rjob *next, *prev;
  bool (*fn)(struct cancel__rjob *job);
  bool queued; /* reactor lock */
};
/* Queues job, starting the reactor if needed.  Returns 0, or -EAGAIN when
 * the reactor cannot start (out of threads or descriptors, or the process
 * is exiting): the job is then not queued. */
int cancel__reactor_post(struct cancel__rjob *job);
/* Takes job off the list if it is still there: once it returns, fn is not
 * running and will not run again.  Not from fn itself. */
void cancel__reactor_unpost(struct cancel__rjob *job);

/* ---- Waiting (wait.c) ------------------------------------------------ */

/* The calling thread's wake primitive.  A wait registers `reg` (in the
 * thread's own storage, not on its stack) with a callback that wakes it
 * and, as its very last access to anything but a futex address, sets
 * `woken`.  So a waiter that sees `woken` may return at once, without
 * waiting for the cancelling thread to finish its loop: that thread's
 * remaining write (the registration's DONE state) lands in this thread's
 * storage, and the next wait (or thread exit) lets it land first.  That
 * saves a second wake-up per cancellation. */
struct cancel__waiter {
  uint32_t woken;     /* 1 once the callback is done (a sleep waits on the
                         token's state word, see wait.c) */
  int efd;            /* eventfd for descriptor waits, -1 until needed */
  bool keyed;         /* the thread-exit destructor is armed */
  bool listed;        /* in wait.c's list of every thread's waiter */
  struct cancel__waiter *next, *prev; /* that list (for fork) */
  cancel_reg reg;     /* the wait's registration */
  void *obj;          /* what the callback wakes (a cond, a sem...) */
  void *obj2;         /* and its mutex, for a condition */
  struct cancel__rjob job; /* cond.c: the pass through a busy mutex */
  struct pollfd *big; /* cancel_poll's set beyond 64 descriptors */
  nfds_t big_cap;
  cancel_scope scope; /* the wait, for the watchdog (cancel/diag.h) */
};
struct cancel__waiter *cancel__waiter_self(void);
/* The waiter's eventfd, created if needed: a descriptor or -errno. */
int cancel__waiter_efd(struct cancel__waiter *w);
/* Registers fn(w) on tok for a wait (after the previous wait's callback,
 * if any, has finished with the registration) and opens the wait's scope,
 * `name`: a wait that sleeps on through a cancel of the work around it is
 * what the watchdog reports.  Returns 0, or 1 when tok had fired: fn ran
 * inline and the scope is closed again. */
int cancel__wait_begin(struct cancel__waiter *w, const cancel_token *tok,
                       cancel_fn *fn, const char *name);
/* Ends a wait (and its scope): returns at once if the callback has set
 * `woken`, else unregisters (waiting for a callback that is running).  Returns
 * 1 if the callback ran (or is done), 0 if it was removed before it ran. */
int cancel__wait_end(struct cancel__waiter *w);
/* The callback's last step: publishes `woken` (then only futex wakes by
 * address may follow). */
static inline void cancel__wait_done(struct cancel__waiter *w) {
  st_release(&w->woken, 1);
}
/* An absolute CLOCK_MONOTONIC deadline as a timespec. */
struct timespec cancel__abs_timespec(int64_t deadline);

/* ---- Token descriptors (tokenfd.c) ----------------------------------- */

/* Closes and frees src's token descriptor (teardown, registrations
 * already detached). */
void cancel__tokenfd_free(cancel_source *src);

/* ---- Misuse ------------------------------------------------------------ */

/* Reports a misuse of the API on stderr (always: misuse must be loud), and
 * aborts when the environment variable CANCEL_ABORT_ON_MISUSE is set. */
void cancel__misuse(const char *func, const char *what);

/* ---- Shields (shield.c) ----------------------------------------------- */

/* The shield's side of a timer expiry: 1 if it handled it. */
int cancel__shield_timer_fired(cancel_source *src, int64_t now);

/* The shield's teardown: unhook from outer (returns a zombie to free, or
 * NULL) and count it closed. */
cancel_source *cancel__shield_teardown(cancel_source *src);

/* The earliest deadline of src itself (own timer, shield grace). */
int64_t cancel__own_deadline(const cancel_source *src);

/* ---- Effective deadlines (link.c) -------------------------------------- *
 * Every source keeps its effective deadline (eff_deadline: the earliest of
 * its own and of its parents' effective ones, each link holding the value
 * last passed down it), so that cancel_token_deadline() is one load.  A
 * change is pushed down to the children, iteratively, under one global
 * mutex that orders the pushes (never taken with a source lock held; a
 * push takes parent then child locks, the order used everywhere). */

/* After src's own deadline (or grace) changed, src locked: recomputes its
 * effective deadline.  Returns true when it changed and src has children:
 * then call cancel__deadline_push(src) once unlocked. */
bool cancel__deadline_update_locked(cancel_source *src);
/* Pushes src's effective deadline down to its descendants.  Never fails,
 * allocates nothing. */
void cancel__deadline_push(cancel_source *src);
/* Teardown side: the deadline mutex, for a source whose children must be
 * told it is gone (cancel__deadline_unlink_locked under it), and a wait
 * for the push that has src queued to finish with it. */
void cancel__deadline_lock(void);
void cancel__deadline_unlock(void); /* finishes the pushes queued, unlocks */
void cancel__deadline_wait(void);
/* l's parent is going (deadline mutex held, parent and child locked): the
 * child forgets the parent's deadline and is queued if that changed it. */
void cancel__deadline_unlink_locked(struct cancel__link *l);

/* ---- Diagnostics (scope.c, watchdog.c, metrics.c) ---------------------- */

struct cancel_scope;
#define CANCEL__SCOPE_WAIT 1  /* a wait of the core: no overrun metric */
#define CANCEL__SCAN_DEPTH 64 /* scopes per thread a scan looks at */
void cancel__scope_open(struct cancel_scope *s, const cancel_token *tok,
                        const char *name, int flags);
/* fn sees one thread's open scopes, innermost first (chain[0]); the scopes
 * and their tokens stay valid until fn returns, and fn MUST NOT block. */
typedef void cancel__scope_visit(void *ctx, int tid,
                                 struct cancel_scope **chain, int n);
void cancel__scopes_scan(cancel__scope_visit *fn, void *ctx);
/* When the scope's token fired (its cancel time), else 0. */
int64_t cancel__scope_fired_at(const struct cancel_scope *s);
uint64_t cancel__overdue_count(int64_t older_than_ns);
void cancel__scopes_force_fence(int on); /* tests */
/* The watchdog's threshold while it runs, else 0 (for the gauge). */
int64_t cancel__watchdog_threshold(void);
void cancel__metrics_cancelled(int kind, const char *origin);
void cancel__metrics_overrun(int64_t ns);
void cancel__metrics_wake(int64_t ns);
void cancel__metrics_reported(void);

/* ---- UTF-8 (utf8.c) ---------------------------------------------------- */

/* The length (1-4) of the well-formed UTF-8 sequence at s, or 0 when the
 * byte at s does not start one (a stray continuation byte, an overlong
 * form, a surrogate, a cut sequence).  s is NUL-terminated: a NUL is
 * ASCII (length 1) and ends any sequence it interrupts. */
size_t cancel__utf8_seq(const unsigned char *s);

#endif /* CANCEL_INTERNAL_H */
