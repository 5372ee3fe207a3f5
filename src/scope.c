/*
 * Work scopes: a per-thread chain of caller-owned markers, pushed and
 * popped with plain stores.  Nothing is registered on the token: the
 * watchdog and the metrics find overdue scopes by scanning the threads'
 * chains (cancel__scopes_scan), and a scope's end learns its overrun from
 * one load of its token's state.  See cancel/diag.h.
 *
 * The scan and a scope's end synchronise like a Dekker pair with the
 * fence taken off the fast side:
 *
 *   end:  top = s->up;   [barrier]  if (scanning) wait for the scan;
 *   scan: scanning = 1;  [barrier]  walk every thread's chain from top;
 *
 * so either the scan does not see s, or the end waits for the scan before
 * its caller may leave the frame s lives in (or free s's token).  The
 * end's barrier is a compiler barrier only when the process registered
 * for membarrier(2)'s private expedited command: then the scan's
 * membarrier() puts a full barrier on every running thread of the
 * process, which is the end's half of the pair (the scheme userspace RCU
 * uses for its readers).  Without membarrier (kernels before 4.14,
 * seccomp) the end's store and load are sequentially consistent (on x86
 * the store is an xchg: a full barrier).
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/diag.h"
#include "cancel/log.h"

#include <linux/membarrier.h>
#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

/* A thread that has opened a scope: listed until it exits. */
struct scope_thread {
  cancel_scope *top; /* innermost open scope; atomic (the scan reads it) */
  int tid;
  bool listed;
  struct scope_thread *next, *prev; /* threads; threads_mu */
};

static __thread struct scope_thread me
    __attribute__((tls_model("initial-exec")));

static pthread_mutex_t threads_mu = PTHREAD_MUTEX_INITIALIZER;
static struct scope_thread *threads; /* threads_mu */
static pthread_key_t exit_key;
static bool have_key; /* exit_key was created (setup) */
static pthread_once_t once = PTHREAD_ONCE_INIT;

static int scopes_on = 1; /* atomic */
static int asymmetric;    /* atomic: membarrier in use */
static int can_asym;      /* membarrier registered (setup) */
/* 0: no scan; 1: a scan is walking the chains; 2: and a scope's end
 * waits for it (futex). */
static uint32_t scanning;

void cancel_scopes_enable(int on) {
  st_relaxed(&scopes_on, on ? 1 : 0);
}

static void thread_exit(void *arg) {
  struct scope_thread *t = arg;
  pthread_mutex_lock(&threads_mu);
  if (t->prev != NULL)
    t->prev->next = t->next;
  else
    threads = t->next;
  if (t->next != NULL)
    t->next->prev = t->prev;
  t->listed = false;
  pthread_mutex_unlock(&threads_mu);
}

/* fork(): only the forking thread lives on in the child, and no scan. */
static void atfork_prepare(void) {
  pthread_mutex_lock(&threads_mu);
}

static void atfork_parent(void) {
  pthread_mutex_unlock(&threads_mu);
}

static void atfork_child(void) {
  /* The child is one thread: the mode may change.  Register anew (a new
   * address space), and fall back to barriers in the end if refused. */
  can_asym = syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                     0, 0) == 0;
  st_release(&asymmetric, can_asym);
  threads = NULL;
  if (me.listed) {
    me.next = me.prev = NULL;
    me.tid = (int)syscall(SYS_gettid);
    threads = &me;
  }
  pthread_mutex_unlock(&threads_mu);
}

static void setup(void) {
  have_key = pthread_key_create(&exit_key, thread_exit) == 0;
  pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
  if (syscall(SYS_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED, 0,
              0) == 0)
    can_asym = 1;
  st_release(&asymmetric, can_asym);
}

/* The thread's first scope: list the thread (the slow path, once). */
static void __attribute__((noinline)) enlist(struct scope_thread *t) {
  pthread_once(&once, setup);
  t->tid = (int)syscall(SYS_gettid);
  /* Without the exit hook the list would keep the thread's storage after
   * it ends: then the thread's scopes go unwatched (and this is tried
   * again at its next scope). */
  if (!have_key || pthread_setspecific(exit_key, t) != 0)
    return;
  pthread_mutex_lock(&threads_mu);
  t->prev = NULL;
  t->next = threads;
  if (threads != NULL)
    threads->prev = t;
  threads = t;
  t->listed = true;
  pthread_mutex_unlock(&threads_mu);
}

void cancel__scope_open(cancel_scope *s, const cancel_token *tok,
                        const char *name, int flags) {
  struct scope_thread *t = &me;
  if (__builtin_expect(!t->listed, 0))
    enlist(t);
  s->tok = ld_relaxed(&scopes_on) ? tok : NULL;
  s->name = name != NULL ? name : "";
  s->up = t->top;
  s->flags = flags;
  st_relaxed(&s->reported, 0);
  st_release(&t->top, s); /* publishes the fields to a scan */
}

void cancel_scope_begin(cancel_scope *s, const cancel_token *tok,
                        const char *name) {
  if (s != NULL)
    cancel__scope_open(s, tok, name, 0);
}

static void __attribute__((noinline)) wait_for_scan(void) {
  uint32_t v = ld_acquire(&scanning);
  while (v != 0) {
    if (v == 2 ||
        __atomic_compare_exchange_n(&scanning, &v, 2, false, __ATOMIC_ACQUIRE,
                                    __ATOMIC_ACQUIRE))
      cancel__futex_wait(&scanning, 2);
    v = ld_acquire(&scanning);
  }
}

/* The token's cancel time when it fired, else 0. */
static int64_t fired_at(const cancel_token *tok) {
  if (!cancel_token_is_cancelled(tok))
    return 0;
  int64_t t = ld_relaxed(&((const cancel_source *)tok)->time);
  return t > 0 ? t : 1;
}

static int64_t __attribute__((noinline)) overran(cancel_scope *s) {
  int64_t over = cancel_now() - fired_at(s->tok);
  if (over < 0)
    over = 0;
  if (!(s->flags & CANCEL__SCOPE_WAIT))
    cancel__metrics_overrun(over);
  if (ld_relaxed(&s->reported)) {
    CANCEL_LOG(CANCEL_LOG_WARN, "watchdog", "scope ended after cancel",
               CANCEL_LOG_STRN("scope", s->name, 160),
               CANCEL_LOG_I64("thread", me.tid),
               CANCEL_LOG_MSD("overrun_ms", over, 1));
  }
  return over;
}

/* Sets the thread's innermost scope to up, so that no scan reads the
 * scopes above it from here on (they may be gone once we return). */
static inline void pop_to(struct scope_thread *t, cancel_scope *up) {
  uint32_t scan;
  if (__builtin_expect(ld_relaxed(&asymmetric), 1)) {
    st_release(&t->top, up);
    __atomic_signal_fence(__ATOMIC_SEQ_CST); /* the scan's membarrier */
    scan = ld_acquire(&scanning);
  } else {
    /* Store then load, both in the single total order of seq_cst
     * operations, as the scan's are: the Dekker pair in plain C11. */
    __atomic_store_n(&t->top, up, __ATOMIC_SEQ_CST);
    scan = __atomic_load_n(&scanning, __ATOMIC_SEQ_CST);
  }
  if (__builtin_expect(scan != 0, 0))
    wait_for_scan();
}

/* s is not the innermost scope: a misuse.  The chain must never point at
 * a scope that ended (its frame may be gone), so when s is in it, s and
 * every scope opened after it leave the chain (their own ends, later, are
 * misuses too, and change nothing). */
static void __attribute__((noinline))
end_out_of_order(struct scope_thread *t, cancel_scope *s) {
  cancel__misuse("cancel_scope_end",
                 "scopes must end in the reverse order they began, on the "
                 "thread that began them");
  for (cancel_scope *u = t->top; u != NULL; u = u->up)
    if (u == s) {
      pop_to(t, s->up);
      return;
    }
}

int64_t cancel_scope_end(cancel_scope *s) {
  if (s == NULL)
    return 0;
  struct scope_thread *t = &me;
  if (__builtin_expect(t->top != s, 0)) {
    end_out_of_order(t, s);
    return 0;
  }
  pop_to(t, s->up);
  if (__builtin_expect(!cancel_token_is_cancelled(s->tok), 1))
    return 0;
  return overran(s);
}

const cancel_scope *cancel_scope_current(void) {
  return me.top;
}

void cancel__scope_cleanup(cancel_scope *s) {
  (void)cancel_scope_end(s);
}

/* ---- The scan: for the watchdog and the metrics ----------------------- */

/* For the tests: the fallback path (a fence in every end, no membarrier)
 * on a machine that has membarrier.  Only while no scope is open. */
void cancel__scopes_force_fence(int on) {
  pthread_once(&once, setup);
  st_release(&asymmetric, on ? 0 : can_asym);
}

int64_t cancel__scope_fired_at(const cancel_scope *s) {
  return fired_at(s->tok);
}

void cancel__scopes_scan(cancel__scope_visit *fn, void *ctx) {
  pthread_mutex_lock(&threads_mu);
  __atomic_store_n(&scanning, 1, __ATOMIC_SEQ_CST);
  if (ld_acquire(&asymmetric))
    (void)syscall(SYS_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
  for (struct scope_thread *t = threads; t != NULL; t = t->next) {
    cancel_scope *chain[CANCEL__SCAN_DEPTH];
    int n = 0;
    for (cancel_scope *s = __atomic_load_n(&t->top, __ATOMIC_SEQ_CST);
         s != NULL && n < CANCEL__SCAN_DEPTH; s = s->up)
      chain[n++] = s;
    if (n > 0)
      fn(ctx, t->tid, chain, n);
  }
  if (__atomic_exchange_n(&scanning, 0, __ATOMIC_RELEASE) == 2)
    cancel__futex_wake_all(&scanning);
  pthread_mutex_unlock(&threads_mu);
}

struct count {
  int64_t now, older_than;
  uint64_t n;
};

static void count_one(void *ctx, int tid, cancel_scope **chain, int n) {
  (void)tid;
  struct count *c = ctx;
  for (int i = 0; i < n; i++) {
    int64_t at = fired_at(chain[i]->tok);
    if (at != 0 && c->now - at >= c->older_than)
      c->n++;
  }
}

uint64_t cancel__overdue_count(int64_t older_than_ns) {
  struct count c = {cancel_now(), older_than_ns, 0};
  cancel__scopes_scan(count_one, &c);
  return c.n;
}
