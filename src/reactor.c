/*
 * The reactor: the library's one internal thread.  It sleeps in epoll_wait
 * on a timerfd set to the earliest timer, an eventfd for wake-ups and the
 * descriptors being watched; it fires due timers, runs the watches'
 * callbacks and the jobs posted to it (cancel__reactor_post).  It starts
 * on first use, blocks every signal (signals belong to the application's
 * threads, or to a signalfd it watches), exits after it has been idle for
 * a while (no timer, no watch and no job), and is joined at process exit
 * so that a clean exit leaves no thread behind.  After fork() the child
 * starts afresh: its first timer or watch starts a new thread with new
 * descriptors, and the parent's watches are not carried over.
 *
 * Watches are named in the epoll set by an id, not by a pointer: a slot in
 * a table and the slot's generation.  epoll_wait hands events out before
 * the thread takes the lock, and by then the watch may have been removed
 * and its (caller-owned) memory freed or reused for a new watch; a stale
 * pointer could not be told from a live one, a stale id can.  The table
 * grows like the timer heap (doubling, never shrinking): once grown,
 * watching allocates nothing.
 */
#include "internal.h"

#include "cancel/watch.h"

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/timerfd.h>
#include <unistd.h>

/* How long an idle reactor lingers before its thread exits: long enough
 * that a service arming timeouts steadily never pays for thread start. */
#define IDLE_LINGER_NS CANCEL_SEC(2)

enum { R_STOPPED, R_RUNNING, R_EXITED };

static struct {
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int state; /* R_*: R_EXITED is a finished thread not yet joined */
  bool quit; /* asked to exit (process exit) */
  pthread_t thread;
  int epfd, tfd, efd;
  int64_t programmed; /* what the timerfd is set to, CANCEL_NEVER if not */
  bool tfd_ok;        /* false after timerfd_settime failed: `programmed`
                         is not known, epoll_wait's timeout stands in */
} R = {PTHREAD_MUTEX_INITIALIZER,
       PTHREAD_COND_INITIALIZER,
       R_STOPPED,
       false,
       0,
       -1,
       -1,
       -1,
       CANCEL_NEVER,
       true};

/* The watch table.  Under the reactor lock. */
#define NO_SLOT UINT32_MAX

struct wslot {
  struct cancel__fdwatch *w; /* NULL when free */
  uint32_t gen;              /* bumped on every free; never 0 */
  uint32_t next_free;        /* free list, NO_SLOT at its end */
};

static struct {
  struct wslot *v;
  uint32_t cap, count;
  uint32_t free_head;
  struct cancel__fdwatch *firing; /* whose callback is running right now */
  unsigned waiters;               /* threads waiting for `firing` to change */
} W = {NULL, 0, 0, NO_SLOT, NULL, 0};

/* The jobs (cancel__reactor_post).  Under the reactor lock. */
static struct cancel__rjob *jobs;

static void job_link_locked(struct cancel__rjob *j) {
  j->prev = NULL;
  j->next = jobs;
  if (jobs != NULL)
    jobs->prev = j;
  jobs = j;
  j->queued = true;
}

static void job_unlink_locked(struct cancel__rjob *j) {
  if (j->prev != NULL)
    j->prev->next = j->next;
  else
    jobs = j->next;
  if (j->next != NULL)
    j->next->prev = j->prev;
  j->queued = false;
}

/* Runs every queued job once; returns true if some are left to retry.
 * A job is unlinked before it runs: the last step of one that succeeds
 * may let its owner return and reuse the record, or exit the thread whose
 * storage it is. */
static bool run_jobs_locked(void) {
  struct cancel__rjob *j = jobs;
  jobs = NULL;
  while (j != NULL) {
    struct cancel__rjob *next = j->next;
    j->queued = false;
    if (!j->fn(j))
      job_link_locked(j);
    j = next;
  }
  return jobs != NULL;
}

/* What the reactor's own descriptors carry in epoll_event.data: the fd
 * itself, with a zero generation (a watch's generation is never 0). */
static inline uint64_t watch_id(uint32_t slot, uint32_t gen) {
  return ((uint64_t)gen << 32) | slot;
}

static __thread bool on_reactor;
static pthread_once_t once = PTHREAD_ONCE_INIT;

void cancel__reactor_lock(void) {
  pthread_mutex_lock(&R.mu);
}
void cancel__reactor_unlock(void) {
  pthread_mutex_unlock(&R.mu);
}
void cancel__reactor_wait_locked(void) {
  pthread_cond_wait(&R.cond, &R.mu);
}
void cancel__reactor_broadcast_locked(void) {
  pthread_cond_broadcast(&R.cond);
}
bool cancel__on_reactor(void) {
  return on_reactor;
}

/* Programs the timerfd for `at`.  Returns false when the kernel refused
 * (timerfd_settime can fail, if only under fault injection): then the
 * timerfd's state is unknown, and until a later call succeeds the thread
 * sleeps in epoll_wait with a timeout of its own instead, rounded up to
 * the millisecond.  One failure must not stop every timer for good. */
static bool set_timerfd(int64_t at) {
  struct itimerspec its;
  memset(&its, 0, sizeof its);
  if (at != CANCEL_NEVER) {
    if (at <= 0)
      at = 1; /* 0 would disarm: "already due" is the earliest instant */
    its.it_value.tv_sec = at / 1000000000;
    its.it_value.tv_nsec = at % 1000000000;
  }
  if (timerfd_settime(R.tfd, TFD_TIMER_ABSTIME, &its, NULL) != 0) {
    R.tfd_ok = false;
    R.programmed = CANCEL_NEVER;
    return false;
  }
  R.tfd_ok = true;
  R.programmed = at;
  return true;
}

/* Wakes the thread from epoll_wait (it then recomputes its timeout). */
static void kick_locked(void) {
  uint64_t one = 1;
  /* Fails only when the counter is full, i.e. a wake-up is pending. */
  ssize_t w = write(R.efd, &one, sizeof one);
  (void)w;
}

void cancel__reactor_schedule_locked(int64_t at) {
  /* Only an earlier deadline needs the kernel: a later one is found when
   * the thread wakes for the earlier one and re-programs.  Without a
   * working timerfd the thread must be woken to shorten its own wait. */
  if (R.tfd_ok && at >= R.programmed)
    return;
  if (!set_timerfd(at))
    kick_locked();
}

static void drain(int fd) {
  uint64_t n;
  while (read(fd, &n, sizeof n) > 0)
    ;
}

/* Runs the callbacks of the watches in ev[0..n) (reactor lock held,
 * dropped around each callback).  An event whose watch was removed after
 * epoll_wait returned it carries a generation that no longer matches. */
static void dispatch_locked(const struct epoll_event *ev, int n) {
  for (int i = 0; i < n; i++) {
    uint64_t id = ev[i].data.u64;
    uint32_t gen = (uint32_t)(id >> 32), slot = (uint32_t)id;
    if (gen == 0 || slot >= W.cap || W.v[slot].gen != gen ||
        W.v[slot].w == NULL)
      continue;
    struct cancel__fdwatch *w = W.v[slot].w;
    cancel__watch_fn *fn = w->fn;
    void *arg = w->arg;
    W.firing = w;
    cancel__reactor_unlock();
    fn(arg, ev[i].events);
    cancel__reactor_lock();
    W.firing = NULL;
    if (W.waiters > 0)
      cancel__reactor_broadcast_locked();
  }
}

static void *reactor_main(void *arg) {
  (void)arg;
  on_reactor = true;
  int64_t idle_since = CANCEL_NEVER;
  cancel__reactor_lock();
  for (;;) {
    int64_t next = cancel__timer_run_locked();
    if (R.quit)
      break;
    bool retry = run_jobs_locked();
    if (!R.tfd_ok || next != R.programmed)
      set_timerfd(next); /* after a failure: try again every round */
    int timeout_ms = -1;
    if (next == CANCEL_NEVER && W.count == 0 && !retry) {
      int64_t now = cancel_now();
      if (idle_since == CANCEL_NEVER)
        idle_since = now;
      int64_t left = idle_since + IDLE_LINGER_NS - now;
      if (left <= 0)
        break;
      timeout_ms = (int)(left / 1000000) + 1;
    } else {
      idle_since = CANCEL_NEVER;
      /* Watches only: look again after a linger period, so that the idle
       * countdown starts soon after the last watch goes (removing a watch
       * does not wake the thread). */
      if (next == CANCEL_NEVER)
        timeout_ms = (int)(IDLE_LINGER_NS / 1000000);
      else if (!R.tfd_ok) /* the timerfd will not wake us: wake ourselves */
        timeout_ms = (int)cancel__ns_to_ms_ceil(
            cancel__time_left(next, cancel_now()), INT32_MAX);
    }
    if (retry && (timeout_ms < 0 || timeout_ms > 1))
      timeout_ms = 1; /* a job waits for a mutex: look again soon */
    cancel__reactor_unlock();
    struct epoll_event ev[32];
    int n = epoll_wait(R.epfd, ev, 32, timeout_ms);
    if (n < 0)
      n = 0; /* EINTR (a debugger): every signal is blocked here */
    for (int i = 0; i < n; i++)
      if ((ev[i].data.u64 >> 32) == 0) /* the timerfd or the eventfd */
        drain((int)(uint32_t)ev[i].data.u64);
    cancel__reactor_lock();
    dispatch_locked(ev, n);
  }
  R.state = R_EXITED;
  cancel__reactor_unlock();
  return NULL;
}

static int add_fd(int fd) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = EPOLLIN;
  ev.data.u64 = (uint32_t)fd; /* generation 0: not a watch */
  return epoll_ctl(R.epfd, EPOLL_CTL_ADD, fd, &ev);
}

static void close_fds(void) {
  if (R.epfd >= 0)
    close(R.epfd);
  if (R.tfd >= 0)
    close(R.tfd);
  if (R.efd >= 0)
    close(R.efd);
  R.epfd = R.tfd = R.efd = -1;
  R.programmed = CANCEL_NEVER;
  R.tfd_ok = true;
}

/* Opens the epoll set, the timerfd and the eventfd.  Returns 0, -EMFILE,
 * -ENFILE, -ENOMEM, or -EAGAIN for anything else the calls can say
 * (-ENOSPC from epoll_ctl, -ENODEV...): the header documents these four. */
static int open_fds(void) {
  int err = 0;
  if ((R.epfd = epoll_create1(EPOLL_CLOEXEC)) < 0 ||
      (R.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC)) <
          0 ||
      (R.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)) < 0 ||
      add_fd(R.tfd) < 0 || add_fd(R.efd) < 0)
    err = errno;
  if (err == 0)
    return 0;
  close_fds();
  return (err == EMFILE || err == ENFILE || err == ENOMEM) ? -err : -EAGAIN;
}

static void atfork_prepare(void) {
  pthread_mutex_lock(&R.mu);
}
static void atfork_parent(void) {
  pthread_mutex_unlock(&R.mu);
}
static void slot_free(uint32_t slot) {
  struct wslot *s = &W.v[slot];
  s->w = NULL;
  if (++s->gen == 0)
    s->gen = 1;
  s->next_free = W.free_head;
  W.free_head = slot;
}

static void atfork_child(void) {
  /* Only the forking thread exists here.  The descriptors are shared with
   * the parent's epoll instance, so the child must not use them. */
  pthread_mutex_init(&R.mu, NULL);
  pthread_cond_init(&R.cond, NULL);
  close_fds();
  R.state = R_STOPPED;
  R.quit = false;
  on_reactor = false;
  cancel__timer_atfork_child();
  /* The parent's watches live in the parent's epoll set: in the child they
   * are not registered.  Freeing their slots (new generations) makes a
   * later remove of one of them a harmless -ENOENT. */
  for (uint32_t i = 0; i < W.cap; i++)
    if (W.v[i].w != NULL)
      slot_free(i);
  W.count = 0;
  W.firing = NULL;
  W.waiters = 0;
  /* A job belongs to a waiting thread, and only the forking thread came
   * along (it is not waiting: it forked). */
  jobs = NULL;
}

static void setup_once(void) {
  pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

int cancel__reactor_ensure_locked(void) {
  if (R.state == R_RUNNING)
    return 0;
  if (R.quit)
    return -EAGAIN;
  pthread_once(&once, setup_once);
  if (R.state == R_EXITED) {
    pthread_join(R.thread, NULL);
    R.state = R_STOPPED;
  }
  if (R.epfd < 0) {
    int rc = open_fds();
    if (rc < 0)
      return rc;
  }
  /* The thread inherits a full signal mask: a signal sent to the process
   * is never delivered to the library's thread. */
  sigset_t all, old;
  sigfillset(&all);
  pthread_sigmask(SIG_SETMASK, &all, &old);
  int rc = pthread_create(&R.thread, NULL, reactor_main, NULL);
  pthread_sigmask(SIG_SETMASK, &old, NULL);
  if (rc != 0)
    return -EAGAIN;
  R.state = R_RUNNING;
  R.programmed = CANCEL_NEVER; /* make the new thread program the timerfd */
  set_timerfd(CANCEL_NEVER);
  return 0;
}

/* At process exit: stop and join the thread, close the descriptors.  A
 * timer armed after this point fails with -EAGAIN. */
__attribute__((destructor)) static void reactor_shutdown(void) {
  if (on_reactor) /* exit() called from a callback: nothing to join */
    return;
  cancel__reactor_lock();
  R.quit = true;
  if (R.state == R_RUNNING) {
    uint64_t one = 1;
    ssize_t w = write(R.efd, &one, sizeof one);
    (void)w;
  }
  bool join = R.state != R_STOPPED;
  cancel__reactor_unlock();
  if (join)
    pthread_join(R.thread, NULL);
  cancel__reactor_lock();
  R.state = R_STOPPED;
  close_fds();
  if (W.count == 0) { /* else a late remove still needs the table */
    free(W.v);
    W.v = NULL;
    W.cap = 0;
    W.free_head = NO_SLOT;
  }
  cancel__reactor_unlock();
}

/* ---------------------------------------------------------------------
 * Descriptor watches
 * --------------------------------------------------------------------- */

/* Doubles the table and puts the new slots on the free list. */
static int grow_locked(void) {
  uint32_t cap = W.cap ? 2 * W.cap : 64;
  if (cap <= W.cap || cap == NO_SLOT)
    return -ENOMEM;
  struct wslot *v = realloc(W.v, (size_t)cap * sizeof *v);
  if (v == NULL)
    return -ENOMEM;
  for (uint32_t i = cap; i-- > W.cap;) {
    v[i].w = NULL;
    v[i].gen = 1;
    v[i].next_free = W.free_head;
    W.free_head = i;
  }
  W.v = v;
  W.cap = cap;
  return 0;
}

static bool registered_locked(const struct cancel__fdwatch *w) {
  return w->gen != 0 && w->slot < W.cap && W.v[w->slot].w == w &&
         W.v[w->slot].gen == w->gen;
}

int cancel__reactor_watch_add(struct cancel__fdwatch *w, int fd,
                              uint32_t events, cancel__watch_fn *fn,
                              void *arg) {
  if (fd < 0)
    return -EBADF;
  cancel__reactor_lock();
  int rc = cancel__reactor_ensure_locked();
  if (rc < 0)
    goto out;
  if (W.free_head == NO_SLOT && (rc = grow_locked()) < 0)
    goto out;
  uint32_t slot = W.free_head;
  W.free_head = W.v[slot].next_free;
  w->fn = fn;
  w->arg = arg;
  w->fd = fd;
  w->events = events;
  w->slot = slot;
  w->gen = W.v[slot].gen;
  W.v[slot].w = w;
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = events;
  ev.data.u64 = watch_id(slot, w->gen);
  /* Under the lock: the thread cannot be deciding to exit on idle now, and
   * a descriptor that is ready already wakes it at once. */
  if (epoll_ctl(R.epfd, EPOLL_CTL_ADD, fd, &ev) < 0) {
    rc = -errno;
    slot_free(slot);
    w->gen = 0;
    goto out;
  }
  W.count++;
out:
  cancel__reactor_unlock();
  return rc;
}

int cancel__reactor_watch_mod(struct cancel__fdwatch *w, uint32_t events) {
  int rc = 0;
  cancel__reactor_lock();
  if (!registered_locked(w) || R.epfd < 0) {
    rc = -ENOENT;
  } else {
    struct epoll_event ev;
    memset(&ev, 0, sizeof ev);
    ev.events = events;
    ev.data.u64 = watch_id(w->slot, w->gen);
    if (epoll_ctl(R.epfd, EPOLL_CTL_MOD, w->fd, &ev) < 0)
      rc = -errno;
    else
      w->events = events;
  }
  cancel__reactor_unlock();
  return rc;
}

int cancel__reactor_watch_del(struct cancel__fdwatch *w) {
  int rc = -ENOENT;
  cancel__reactor_lock();
  if (registered_locked(w)) {
    /* An error here means the descriptor was closed first (misuse) or the
     * epoll set is gone (process exit): either way the slot goes, and a
     * stale event will not match its generation. */
    if (R.epfd >= 0)
      (void)epoll_ctl(R.epfd, EPOLL_CTL_DEL, w->fd, NULL);
    slot_free(w->slot);
    w->gen = 0;
    W.count--;
    rc = 0;
  }
  /* The callback may have been picked before the removal: wait for it, as
   * cancel__timer_disarm does, unless we are that callback's thread. */
  while (W.firing == w && !on_reactor) {
    W.waiters++;
    cancel__reactor_wait_locked();
    W.waiters--;
  }
  cancel__reactor_unlock();
  return rc;
}

/* ---------------------------------------------------------------------
 * Jobs
 * --------------------------------------------------------------------- */

int cancel__reactor_post(struct cancel__rjob *job) {
  cancel__reactor_lock();
  int rc = cancel__reactor_ensure_locked();
  if (rc == 0) {
    job_link_locked(job);
    kick_locked();
  }
  cancel__reactor_unlock();
  return rc < 0 ? -EAGAIN : 0;
}

void cancel__reactor_unpost(struct cancel__rjob *job) {
  cancel__reactor_lock();
  if (job->queued)
    job_unlink_locked(job);
  cancel__reactor_unlock();
}
