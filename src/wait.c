/*
 * The wake primitive and the basic waits.
 *
 * Each thread has one waiter: a word its wait's callback sets when done
 * (the futex a sleep on the NULL token sleeps on; a sleep on a token
 * sleeps on the token's own state word, shared by all its sleepers: see
 * wake_futex) and, created the first time the thread waits on
 * descriptors, one eventfd that is polled next to them.  A wait registers
 * a callback on the token that sets the word (or writes the eventfd) and
 * wakes the thread, blocks, and unregisters before it returns:
 * cancel_unregister() waits for a callback running on another thread, so
 * a late wake-up can never reach the next wait.  Nothing is allocated and
 * no descriptor is created per token or per wait.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

static __thread struct cancel__waiter self = {.efd = -1};
static pthread_key_t exit_key;
static bool have_key; /* exit_key was created (exit_setup) */
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;

/* Every thread's waiter, from its first wait to its exit: the child of a
 * fork() finds there the registrations of the threads that did not come
 * along.  Listing and unlisting are a thread's first wait and its exit,
 * never a wait's path. */
static pthread_mutex_t waiters_mu = PTHREAD_MUTEX_INITIALIZER;
static struct cancel__waiter *waiters; /* waiters_mu */

struct cancel__waiter *cancel__waiter_self(void) {
  return &self;
}

/* The previous wait may have returned while its canceller was still
 * finishing with the registration (see cancel__wait_end): let it land.
 * The canceller is past the callback and needs a few instructions. */
static void settle(struct cancel__waiter *w) {
  while ((ld_acquire(&w->reg.state) & REG_STATE_MASK) == REG_RUNNING) {
    cancel__cpu_relax();
    sched_yield();
  }
}

static void unlist_locked(struct cancel__waiter *w) {
  if (!w->listed)
    return;
  w->listed = false;
  if (w->prev != NULL)
    w->prev->next = w->next;
  else
    waiters = w->next;
  if (w->next != NULL)
    w->next->prev = w->prev;
  w->next = w->prev = NULL;
}

/* At thread exit: no canceller may still write to this thread's waiter,
 * and its eventfd goes with it.  A destructor that runs after this one
 * and waits again arms the hook anew (the keys are run again). */
static void waiter_exit(void *arg) {
  struct cancel__waiter *w = arg;
  settle(w);
  pthread_mutex_lock(&waiters_mu);
  unlist_locked(w);
  pthread_mutex_unlock(&waiters_mu);
  w->keyed = false;
  if (w->efd >= 0) {
    close(w->efd);
    w->efd = -1;
  }
  free(w->big);
  w->big = NULL;
  w->big_cap = 0;
}

/* fork(): no thread lists or unlists a waiter while the child is made. */
static void waiter_atfork_prepare(void) {
  pthread_mutex_lock(&waiters_mu);
}

static void waiter_atfork_parent(void) {
  pthread_mutex_unlock(&waiters_mu);
}

/* In the child, only the forking thread exists.  Every other thread's
 * waiter is a copy in memory the child's next pthread_create() reuses (the
 * dead threads' stacks and TLS, zeroed then): a registration of one left on
 * its source would send the child's next cancel of that source into
 * zeroed memory.  So each is taken off its source now, while the memory
 * still holds it, and its eventfd (the parent's, shared) closed.  The
 * forking thread's own eventfd is the parent's too, and the canceller of
 * its last wait, if one was still finishing, is gone. */
static void waiter_atfork_child(void) {
  struct cancel__waiter *w = waiters;
  while (w != NULL) {
    struct cancel__waiter *next = w->next;
    if (w != &self) {
      cancel__reg_forget(&w->reg);
      if (w->efd >= 0)
        close(w->efd);
      free(w->big);
      w->next = w->prev = NULL;
      w->listed = false;
    }
    w = next;
  }
  waiters = NULL;
  if (self.listed) {
    self.next = self.prev = NULL;
    waiters = &self;
  }
  if (self.efd >= 0) {
    close(self.efd);
    self.efd = -1;
  }
  /* A wait of this thread that is still registered (fork() from a signal
   * handler that interrupted it) goes on in the child; a callback that a
   * thread of the parent was finishing will never finish here. */
  if ((ld_relaxed(&self.reg.state) & REG_STATE_MASK) != REG_LISTED)
    st_relaxed(&self.reg.state, REG_IDLE);
  pthread_mutex_unlock(&waiters_mu);
}

static void exit_setup(void) {
  have_key = pthread_key_create(&exit_key, waiter_exit) == 0;
  pthread_atfork(waiter_atfork_prepare, waiter_atfork_parent,
                 waiter_atfork_child);
}

/* The thread's first wait: arm the exit hook and list the waiter (the
 * slow path, once per thread). */
static void __attribute__((noinline)) enlist(struct cancel__waiter *w) {
  pthread_once(&exit_once, exit_setup);
  w->keyed = true;
  /* Without a key (none left) the thread's eventfd outlives it, and its
   * waiter is not listed: the list must not keep a dead thread's. */
  if (!have_key || pthread_setspecific(exit_key, w) != 0)
    return;
  pthread_mutex_lock(&waiters_mu);
  w->prev = NULL;
  w->next = waiters;
  if (waiters != NULL)
    waiters->prev = w;
  waiters = w;
  w->listed = true;
  pthread_mutex_unlock(&waiters_mu);
}

int cancel__waiter_efd(struct cancel__waiter *w) {
  if (w->efd >= 0)
    return w->efd;
  int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (fd < 0)
    return -errno;
  w->efd = fd;
  return fd;
}

int cancel__wait_begin(struct cancel__waiter *w, const cancel_token *tok,
                       cancel_fn *fn, const char *name) {
  if (__builtin_expect(!w->keyed, 0))
    enlist(w);
  settle(w);
  st_relaxed(&w->woken, 0);
  cancel__scope_open(&w->scope, tok, name, CANCEL__SCOPE_WAIT);
  int rc = cancel_register(&w->reg, tok, fn, w);
  if (rc == 1)
    (void)cancel_scope_end(&w->scope);
  return rc;
}

int cancel__wait_end(struct cancel__waiter *w) {
  int ran;
  if (ld_acquire(&w->woken)) {
    /* Woken by the cancel: the wake-up latency, from the origin's cancel
     * (the source is the one waited on: borrowed for the wait). */
    cancel__metrics_wake(cancel_now() - ld_relaxed(&w->reg.src->time));
    ran = 1; /* the callback is done with everything we own */
  } else {
    ran = cancel_unregister(&w->reg) == 0;
  }
  (void)cancel_scope_end(&w->scope);
  return ran;
}

/* ---- Waking ----------------------------------------------------------- */

/* The sleepers of a token all sleep on one futex word, the token's own
 * state word, rather than each on its own: the kernel finds a futex's
 * waiters by walking a hash bucket, and since Linux 6.16 a process's
 * private futexes share a table sized by the CPU count (16 buckets on two
 * CPUs), whatever the number of threads.  Waking 30,000 sleepers one word
 * each walked a bucket of ~1,900 waiters 30,000 times (7-10 s); waking
 * them all on one word is one walk, and the later callbacks of the same
 * cancel find the bucket empty (the woken sleepers unregister themselves
 * meanwhile, so the canceller has fewer callbacks to run).  cancel__fire
 * publishes ST_CANCELLED before it runs the first callback, so a sleeper
 * that compares the word after that store does not sleep, and one queued
 * before it is woken here. */
static void wake_futex(void *arg) {
  struct cancel__waiter *w = arg;
  /* Read before `woken` is published: after it, w may be reused. */
  uint32_t *word = &w->reg.src->tok.state;
  cancel__wait_done(w);
  cancel__futex_wake_all(word); /* the source is alive: it is firing */
}

static void wake_efd(void *arg) {
  struct cancel__waiter *w = arg;
  uint64_t one = 1;
  /* Non-blocking: a full counter (never, in practice) is still readable. */
  ssize_t n = write(w->efd, &one, sizeof one);
  (void)n;
  cancel__wait_done(w);
}

static void drain_efd(int fd) {
  uint64_t n;
  while (read(fd, &n, sizeof n) > 0)
    ;
}

/* ---- Deadlines -------------------------------------------------------- */

struct timespec cancel__abs_timespec(int64_t deadline) {
  return cancel__timespec_at(deadline);
}

/* Time left until deadline as a relative timespec for ppoll: NULL for
 * none, zero when passed. */
static struct timespec *relative(int64_t deadline, struct timespec *ts) {
  if (deadline == CANCEL_NEVER)
    return NULL;
  int64_t left = cancel__time_left(deadline, cancel_now());
  ts->tv_sec = left / 1000000000;
  ts->tv_nsec = left % 1000000000;
  return ts;
}

/* ---- Sleeping --------------------------------------------------------- */

/* Sleeps until tok fires or deadline passes; `name` names the wait's
 * scope for the watchdog. */
static int sleep_until(const cancel_token *tok, int64_t deadline,
                       const char *name) {
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  struct cancel__waiter *w = &self;
  if (cancel__wait_begin(w, tok, wake_futex, name) == 1)
    return -ECANCELED;
  struct timespec ts = cancel__abs_timespec(deadline);
  /* The token's state word (see wake_futex), or for the NULL token, which
   * nothing wakes, the thread's own word. */
  uint32_t *word = tok != NULL ? (uint32_t *)&tok->state : &w->woken;
  for (;;) {
    uint32_t v = ld_acquire(word);
    if ((v & ST_CANCELLED) || ld_acquire(&w->woken))
      break;
    if (deadline != CANCEL_NEVER && cancel_now() >= deadline)
      break;
    /* FUTEX_WAIT_BITSET takes an absolute CLOCK_MONOTONIC deadline.  A
     * word that changed meanwhile (the source lock taken or released),
     * EINTR and spurious returns just go round the loop. */
    syscall(SYS_futex, word, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, v,
            deadline == CANCEL_NEVER ? NULL : &ts, NULL,
            FUTEX_BITSET_MATCH_ANY);
  }
  cancel__wait_end(w);
  return cancel_token_is_cancelled(tok) ? -ECANCELED : 0;
}

int cancel_sleep_until(const cancel_token *tok, int64_t deadline) {
  return sleep_until(tok, deadline, "cancel_sleep");
}

int cancel_sleep(const cancel_token *tok, int64_t ns) {
  if (ns < 0)
    return -EINVAL;
  return cancel_sleep_until(tok, cancel__deadline_after(cancel_now(), ns));
}

/* ---- Settling a deadline ---------------------------------------------- *
 * The token's deadline passed (or is about to), and whoever noticed it
 * must not report the token's cancellation before the timer made it: the
 * reason is the timer's to write.  So this waits for the timer, on the
 * token's futex like any sleeper, bounded in case nothing will ever fire
 * it (see cancel.h).  Waiting rather than firing the source here: the
 * deadline belongs to whichever ancestor armed it, and its timer, its
 * reason and its callbacks are the timer thread's. */

int cancel_token_settle(const cancel_token *tok, int64_t early_ns) {
  if (early_ns < 0)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  int64_t deadline = cancel_token_deadline(tok); /* NEVER for NULL */
  if (deadline == CANCEL_NEVER ||
      cancel__time_left(deadline, cancel_now()) > early_ns)
    return 0;
  int rc = sleep_until(tok, cancel__add_sat(deadline, CANCEL_SETTLE_WAIT_NS),
                       "cancel_settle");
  if (rc == -ECANCELED)
    return -ECANCELED;
  /* Not fired: unless the deadline was moved away meanwhile, nothing is
   * going to fire it. */
  deadline = cancel_token_deadline(tok);
  if (deadline == CANCEL_NEVER ||
      cancel__time_left(deadline, cancel_now()) > early_ns)
    return 0;
  return -ETIMEDOUT;
}

/* ---- Descriptors ------------------------------------------------------ */

#define POLL_STACK 64

/* A set larger than the stack copy lives in the thread's waiter, grown as
 * needed and kept: a thread that polls many descriptors allocates once,
 * not per wait (freed at thread exit). */
static struct pollfd *big_set(struct cancel__waiter *w, nfds_t n) {
  if (n > w->big_cap) {
    struct pollfd *p = realloc(w->big, n * sizeof *p);
    if (p == NULL)
      return NULL;
    w->big = p;
    w->big_cap = n;
  }
  return w->big;
}

int cancel_poll(const cancel_token *tok, struct pollfd *fds, nfds_t nfds,
                int64_t deadline) {
  if (fds == NULL && nfds > 0)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  struct cancel__waiter *w = &self;
  int efd = -1;
  if (tok != NULL && (efd = cancel__waiter_efd(w)) < 0)
    return efd;

  /* The caller's entries plus our wake descriptor, last. */
  struct pollfd stack[POLL_STACK + 1];
  struct pollfd *set = stack;
  if (nfds > POLL_STACK && (set = big_set(w, nfds + 1)) == NULL)
    return -ENOMEM;
  if (nfds > 0)
    memcpy(set, fds, nfds * sizeof *set);
  nfds_t n = nfds;
  if (efd >= 0) {
    set[n].fd = efd;
    set[n].events = POLLIN;
    set[n].revents = 0;
    n++;
  }

  int rc;
  if (cancel__wait_begin(w, tok, wake_efd, "cancel_poll") == 1) {
    drain_efd(efd); /* it ran inline: leave the eventfd quiet */
    rc = -ECANCELED;
    goto out;
  }
  for (;;) {
    struct timespec ts;
    int r = ppoll(set, n, relative(deadline, &ts), NULL);
    if (r < 0) {
      if (errno == EINTR)
        continue;
      rc = -errno;
      break;
    }
    if (efd >= 0 && set[nfds].revents != 0) {
      r--; /* woken by the token */
      if (r == 0) {
        if (cancel_token_is_cancelled(tok)) {
          rc = -ECANCELED;
          break;
        }
        drain_efd(efd); /* a stale wake-up is never a reason to return */
        continue;
      }
    }
    if (r > 0) {
      for (nfds_t i = 0; i < nfds; i++)
        fds[i].revents = set[i].revents;
      rc = r;
      break;
    }
    if (deadline != CANCEL_NEVER && cancel_now() >= deadline) {
      rc = -ETIMEDOUT;
      break;
    }
  }
  if (cancel__wait_end(w) && efd >= 0)
    drain_efd(efd); /* the callback wrote it: leave it quiet */
  /* Level-triggered: whatever woke us, a fired token wins (nothing was
   * consumed from the caller's descriptors). */
  if (cancel_token_is_cancelled(tok))
    rc = -ECANCELED;
out:
  return rc;
}

int cancel_wait_fd(const cancel_token *tok, int fd, short events,
                   int64_t deadline) {
  if (fd < 0)
    return -EBADF;
  struct pollfd p = {.fd = fd, .events = events, .revents = 0};
  int rc = cancel_poll(tok, &p, 1, deadline);
  if (rc < 0)
    return rc;
  if (p.revents & POLLNVAL)
    return -EBADF;
  return p.revents;
}
