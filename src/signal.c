/*
 * Shutdown signals: SIGINT and SIGTERM read from a signalfd on the reactor
 * thread, never in a handler.
 *
 * A handler may call almost nothing (no lock, no malloc, so no cancel with
 * a reason), runs on whichever thread the kernel picks, and interrupts
 * every blocking call that is not restarted.  With both signals blocked in
 * every thread, a process-directed signal stays pending on the process;
 * the reactor thread (which blocks everything) polls a signalfd that
 * becomes readable, reads the signals off it and acts on them as ordinary
 * code: the first cancels the host's source, every later one goes to the
 * repeat callback.
 *
 * State: under the reactor lock (which is fork-safe), except `received`,
 * an atomic counter.  The lock is never held across a call into the
 * reactor's watch functions (they take it) or into user code.
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/watch.h"

#include <signal.h>
#include <stdio.h>
#include <sys/epoll.h>
#include <sys/signalfd.h>
#include <unistd.h>

enum { SIG_IDLE, SIG_STARTING, SIG_WATCHING, SIG_STOPPING };

typedef void repeat_fn(int signo, unsigned count, void *arg);

static struct {
  int state;
  unsigned gen; /* bumped by every watch and unwatch */
  int sfd;
  cancel_source *src; /* referenced while watching */
  repeat_fn *repeat;
  void *repeat_arg;
  unsigned received; /* atomic */
  struct cancel__fdwatch rw;
} S = {SIG_IDLE, 0, -1, NULL, NULL, NULL, 0, {0}};

static void shutdown_set(sigset_t *set) {
  sigemptyset(set);
  sigaddset(set, SIGINT);
  sigaddset(set, SIGTERM);
}

int cancel_signals_block(void) {
  sigset_t set;
  shutdown_set(&set);
  int rc = pthread_sigmask(SIG_BLOCK, &set, NULL);
  return rc == 0 ? 0 : -rc;
}

static const char *signal_name(uint32_t signo, char *buf, size_t len) {
  switch (signo) {
  case SIGINT:
    return "SIGINT";
  case SIGTERM:
    return "SIGTERM";
  default:
    snprintf(buf, len, "signal %u", (unsigned)signo);
    return buf;
  }
}

/* Still the watch this callback was started for?  False once an unwatch
 * began: if it ran on this thread (from a callback we called), the
 * signalfd may be closed already and its number reused. */
static bool still_watching(unsigned gen) {
  cancel__reactor_lock();
  bool same =
      S.gen == gen && (S.state == SIG_STARTING || S.state == SIG_WATCHING);
  cancel__reactor_unlock();
  return same;
}

/* Reads the signalfd until it is empty (level-triggered: a signal left in
 * it would wake the reactor again at once), or until an unwatch began. */
static void read_signals(int sfd, cancel_source *src, unsigned gen) {
  for (;;) {
    struct signalfd_siginfo si;
    ssize_t n = read(sfd, &si, sizeof si);
    if (n != (ssize_t)sizeof si) {
      if (n < 0 && errno == EINTR)
        continue;
      return; /* EAGAIN: drained */
    }
    unsigned count = __atomic_add_fetch(&S.received, 1, __ATOMIC_ACQ_REL);
    if (count == 1) {
      char buf[24];
      cancel__fire(src, CANCEL_SHUTDOWN,
                   signal_name(si.ssi_signo, buf, sizeof buf), NULL,
                   cancel_now(), 0);
    } else {
      cancel__reactor_lock();
      repeat_fn *fn = S.repeat;
      void *fn_arg = S.repeat_arg;
      cancel__reactor_unlock();
      if (fn != NULL)
        fn((int)si.ssi_signo, count, fn_arg);
    }
    if (!still_watching(gen))
      return;
  }
}

/* Runs on the reactor thread when the signalfd is readable. */
static void signals_ready(void *arg, uint32_t events) {
  (void)arg;
  (void)events;
  /* The source with a reference of our own: a callback of the cancel
   * below may unwatch, dropping the watch's reference while the cancel
   * still runs here. */
  cancel__reactor_lock();
  unsigned gen = S.gen;
  int sfd = S.sfd;
  bool live = S.state == SIG_STARTING || S.state == SIG_WATCHING;
  cancel_source *src = live ? cancel_source_ref(S.src) : NULL;
  cancel__reactor_unlock();
  if (!live)
    return;
  read_signals(sfd, src, gen);
  cancel_source_unref(src);
}

int cancel_signals_watch(cancel_source *src) {
  if (src == NULL)
    return -EINVAL;
  cancel__reactor_lock();
  if (S.state != SIG_IDLE) {
    cancel__reactor_unlock();
    return -EBUSY;
  }
  S.state = SIG_STARTING;
  cancel__reactor_unlock();

  sigset_t set;
  shutdown_set(&set);
  pthread_sigmask(SIG_BLOCK, &set, NULL);
  int sfd = signalfd(-1, &set, SFD_NONBLOCK | SFD_CLOEXEC);
  if (sfd < 0) {
    int rc = -errno;
    cancel__reactor_lock();
    S.state = SIG_IDLE;
    cancel__reactor_unlock();
    return rc;
  }
  cancel_source_ref(src);
  /* Everything the callback reads is in place before the registration: a
   * signal already pending makes it run at once. */
  cancel__reactor_lock();
  S.sfd = sfd;
  S.src = src;
  S.gen++;
  st_relaxed(&S.received, 0);
  cancel__reactor_unlock();
  int rc = cancel__reactor_watch_add(&S.rw, sfd, EPOLLIN, signals_ready, NULL);
  cancel__reactor_lock();
  if (rc < 0) {
    S.sfd = -1;
    S.src = NULL;
    S.gen++;
    S.state = SIG_IDLE;
  } else {
    S.state = SIG_WATCHING;
  }
  cancel__reactor_unlock();
  if (rc < 0) {
    close(sfd);
    cancel_source_unref(src);
  }
  return rc;
}

int cancel_signals_on_repeat(repeat_fn *fn, void *arg) {
  cancel__reactor_lock();
  S.repeat = fn;
  S.repeat_arg = arg;
  cancel__reactor_unlock();
  return 0;
}

unsigned cancel_signals_received(void) {
  return __atomic_load_n(&S.received, __ATOMIC_ACQUIRE);
}

int cancel_signals_unwatch(void) {
  cancel__reactor_lock();
  if (S.state != SIG_WATCHING) {
    int rc = S.state == SIG_IDLE ? -EINVAL : -EBUSY;
    cancel__reactor_unlock();
    return rc;
  }
  S.state = SIG_STOPPING;
  S.gen++; /* a callback further up this stack must stop reading */
  int sfd = S.sfd;
  cancel_source *src = S.src;
  cancel__reactor_unlock();

  /* Waits for signals_ready if it runs on another thread (the reactor). */
  cancel__reactor_watch_del(&S.rw);
  close(sfd);
  cancel__reactor_lock();
  S.sfd = -1;
  S.src = NULL;
  S.state = SIG_IDLE;
  cancel__reactor_unlock();
  cancel_source_unref(src);
  return 0;
}
