/*
 * The reactor: the library's one internal thread.  It sleeps in epoll_wait
 * on a timerfd set to the earliest timer and an eventfd for wake-ups, fires
 * due timers, and will watch descriptors too.  It starts on first use,
 * blocks every signal (signals belong to the application's threads), exits
 * after it has been idle for a while, and is joined at process exit so that
 * a clean exit leaves no thread behind.  After fork() the child starts
 * afresh: its first timer starts a new thread with new descriptors.
 */
#include "internal.h"

#include <pthread.h>
#include <signal.h>
#include <stdint.h>
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
} R = {PTHREAD_MUTEX_INITIALIZER,
       PTHREAD_COND_INITIALIZER,
       R_STOPPED,
       false,
       0,
       -1,
       -1,
       -1,
       CANCEL_NEVER};

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

static void set_timerfd(int64_t at) {
  struct itimerspec its;
  memset(&its, 0, sizeof its);
  if (at != CANCEL_NEVER) {
    if (at <= 0)
      at = 1; /* 0 would disarm: "already due" is the earliest instant */
    its.it_value.tv_sec = at / 1000000000;
    its.it_value.tv_nsec = at % 1000000000;
  }
  timerfd_settime(R.tfd, TFD_TIMER_ABSTIME, &its, NULL);
  R.programmed = at;
}

void cancel__reactor_schedule_locked(int64_t at) {
  /* Only an earlier deadline needs the kernel: a later one is found when
   * the thread wakes for the earlier one and re-programs. */
  if (at < R.programmed)
    set_timerfd(at);
}

static void drain(int fd) {
  uint64_t n;
  while (read(fd, &n, sizeof n) > 0)
    ;
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
    if (next != R.programmed)
      set_timerfd(next);
    int timeout_ms = -1;
    if (next == CANCEL_NEVER) {
      int64_t now = cancel_now();
      if (idle_since == CANCEL_NEVER)
        idle_since = now;
      int64_t left = idle_since + IDLE_LINGER_NS - now;
      if (left <= 0)
        break;
      timeout_ms = (int)(left / 1000000) + 1;
    } else {
      idle_since = CANCEL_NEVER;
    }
    cancel__reactor_unlock();
    struct epoll_event ev[8];
    int n = epoll_wait(R.epfd, ev, 8, timeout_ms);
    for (int i = 0; i < n; i++)
      drain(ev[i].data.fd);
    cancel__reactor_lock();
  }
  R.state = R_EXITED;
  cancel__reactor_unlock();
  return NULL;
}

static int add_fd(int fd) {
  struct epoll_event ev;
  memset(&ev, 0, sizeof ev);
  ev.events = EPOLLIN;
  ev.data.fd = fd;
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
}

static int open_fds(void) {
  R.epfd = epoll_create1(EPOLL_CLOEXEC);
  R.tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
  R.efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (R.epfd < 0 || R.tfd < 0 || R.efd < 0 || add_fd(R.tfd) < 0 ||
      add_fd(R.efd) < 0) {
    int err = errno;
    close_fds();
    return -err;
  }
  return 0;
}

static void atfork_prepare(void) {
  pthread_mutex_lock(&R.mu);
}
static void atfork_parent(void) {
  pthread_mutex_unlock(&R.mu);
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
  cancel__reactor_unlock();
}
