/*
 * cancel_cond_wait: a pthread condition wait that a token ends.
 *
 * The callback must wake a waiter that may be anywhere between its token
 * check and its block inside the condition wait.  A broadcast made in that
 * window would be lost, so the broadcast must come after a pass through the
 * mutex: the waiter holds it through the whole window, and the condition
 * wait releases it only once the waiter is queued.
 *
 * The cancelling thread cannot always make that pass itself: it may hold
 * the mutex (cancelling from inside the critical section is common), and
 * POSIX gives no way to ask who owns a mutex.  So the callback tries the
 * mutex; if it is busy, the holder is the waiter inside its window, the
 * cancelling thread, or a third thread.  In the last two cases the waiter
 * is queued and a broadcast now wakes it; in the first the broadcast is
 * lost, and the pass is handed to the library's thread (the reactor),
 * which retries the mutex without ever blocking on it and broadcasts once
 * it got through.  The waiter, whatever woke it, takes the job back off
 * the reactor before it returns, so nothing refers to the condition or
 * the mutex after the call.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stddef.h>

static struct cancel__waiter *job_waiter(struct cancel__rjob *job) {
  return (
      struct cancel__waiter *)(void *)((char *)job -
                                       offsetof(struct cancel__waiter, job));
}

/* On the reactor thread, under its lock: never block. */
static bool pass_through(struct cancel__rjob *job) {
  struct cancel__waiter *w = job_waiter(job);
  pthread_mutex_t *mutex = w->obj2;
  if (pthread_mutex_trylock(mutex) != 0)
    return false;
  pthread_mutex_unlock(mutex);
  pthread_cond_broadcast(w->obj);
  cancel__wait_done(w); /* the last touch: the waiter may return now */
  return true;
}

static void cond_wake(void *arg) {
  struct cancel__waiter *w = arg;
  pthread_cond_t *cond = w->obj;
  pthread_mutex_t *mutex = w->obj2;
  if (w == cancel__waiter_self()) {
    /* Run inline by the waiter's own registration (the token fired just
     * before it): the waiter holds the mutex and is not waiting. */
    cancel__wait_done(w);
    return;
  }
  /* Broadcasting after the unlock spares the woken waiter a wait for the
   * mutex. */
  if (pthread_mutex_trylock(mutex) == 0) {
    pthread_mutex_unlock(mutex);
    pthread_cond_broadcast(cond);
    cancel__wait_done(w);
    return;
  }
  pthread_cond_broadcast(cond); /* held by us or a third thread */
  w->job.fn = pass_through;
  if (cancel__reactor_post(&w->job) == 0)
    return;
  /* No reactor thread (none could be started): pass through the mutex
   * here.  A normal mutex that this thread holds deadlocks then, as
   * cancel.h says; an error-checking one answers EDEADLK, and then the
   * waiter is queued and the broadcast above woke it. */
  if (pthread_mutex_lock(mutex) == 0)
    pthread_mutex_unlock(mutex);
  pthread_cond_broadcast(cond);
  cancel__wait_done(w);
}

/* The condition wait with an absolute CLOCK_MONOTONIC deadline.
 *
 * pthread_cond_clockwait (glibc 2.30) takes the clock.  Without it there
 * is only pthread_cond_timedwait, which reads the deadline on the clock
 * the condition was created with, and POSIX gives no way to read that
 * clock back.  The deadline is given as a CLOCK_MONOTONIC time first:
 * right for a condition on CLOCK_MONOTONIC, and for one on CLOCK_REALTIME
 * (the default) a time decades in the past, so it times out at once.  An
 * early time-out therefore says the condition is on CLOCK_REALTIME, and
 * the wait goes on with the deadline converted to that clock (re-converted
 * after each early return: the wall clock may be set). */
static int timed_wait(const cancel_token *tok, pthread_cond_t *cond,
                      pthread_mutex_t *mutex, int64_t deadline) {
#ifdef CANCEL_HAVE_PTHREAD_COND_CLOCKWAIT
  (void)tok;
  struct timespec ts = cancel__abs_timespec(deadline);
  return pthread_cond_clockwait(cond, mutex, CLOCK_MONOTONIC, &ts);
#else
  struct timespec ts = cancel__abs_timespec(deadline);
  int r = pthread_cond_timedwait(cond, mutex, &ts);
  while (r == ETIMEDOUT) {
    int64_t now = cancel_now();
    if (now >= deadline || cancel_token_is_cancelled(tok))
      break;
    struct timespec real;
    clock_gettime(CLOCK_REALTIME, &real);
    int64_t real_ns = real.tv_sec * CANCEL_SEC(1) + real.tv_nsec;
    ts = cancel__abs_timespec(cancel__add_sat(real_ns, deadline - now));
    r = pthread_cond_timedwait(cond, mutex, &ts);
  }
  return r;
#endif
}

int cancel_cond_wait(const cancel_token *tok, pthread_cond_t *cond,
                     pthread_mutex_t *mutex, int64_t deadline) {
  if (cond == NULL || mutex == NULL)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  struct cancel__waiter *w = cancel__waiter_self();
  w->obj = cond;
  w->obj2 = mutex;
  if (cancel__wait_begin(w, tok, cond_wake, "cancel_cond_wait") == 1)
    return -ECANCELED;
  int rc = 0;
  if (!cancel_token_is_cancelled(tok)) {
    int r = deadline == CANCEL_NEVER ? pthread_cond_wait(cond, mutex)
                                     : timed_wait(tok, cond, mutex, deadline);
    if (r == ETIMEDOUT)
      rc = -ETIMEDOUT;
    else if (r != 0)
      rc = -r;
  }
  if (ld_acquire(&w->woken)) {
    cancel__wait_end(w); /* nothing to unregister: no wait on the mutex */
  } else {
    /* The callback may be running, and the reactor may be retrying the
     * mutex we hold for it: release it while unregistering (which waits
     * for a running callback) and while taking the job back.  Waiters
     * must not assume the mutex stays held across a wait anyway:
     * pthread_cond_wait releases it too. */
    pthread_mutex_unlock(mutex);
    if (cancel__wait_end(w)) /* the callback ran: it may have posted */
      cancel__reactor_unpost(&w->job);
    pthread_mutex_lock(mutex);
  }
  return cancel_token_is_cancelled(tok) ? -ECANCELED : rc;
}
