/*
 * cancel_cond_wait: a pthread condition wait that a token ends.
 *
 * The callback must wake a waiter that may be anywhere between its token
 * check and its block inside pthread_cond_clockwait.  A broadcast made in
 * that window would be lost, so the callback takes the mutex first: the
 * waiter holds it through the whole window, and pthread_cond_clockwait
 * releases it only once the waiter is queued on the condition.  If the
 * cancelling thread itself holds the mutex, the waiter cannot be in the
 * window (it is queued, or it has not taken the mutex yet and will see
 * the token): broadcasting without the mutex is then enough.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <unistd.h>

static bool held_by_me(pthread_mutex_t *m) {
#ifdef __GLIBC__
  /* glibc records the owner's kernel thread id in the public structure. */
  return m->__data.__owner == gettid();
#else
  (void)m;
  return false;
#endif
}

static void cond_wake(void *arg) {
  struct cancel__waiter *w = arg;
  pthread_cond_t *cond = w->obj;
  pthread_mutex_t *mutex = w->obj2;
  /* Passing through the mutex is enough: once we hold it, the waiter is
   * either queued on the condition or has not looked at the token yet.
   * Broadcasting after the unlock spares the woken waiter a wait for the
   * mutex. */
  if (pthread_mutex_trylock(mutex) == 0) {
    pthread_mutex_unlock(mutex);
  } else if (!held_by_me(mutex)) {
    pthread_mutex_lock(mutex); /* maybe the waiter, inside its window */
    pthread_mutex_unlock(mutex);
  }
  pthread_cond_broadcast(cond);
  cancel__wait_done(w);
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
    struct timespec ts = cancel__abs_timespec(deadline);
    int r = deadline == CANCEL_NEVER
                ? pthread_cond_wait(cond, mutex)
                : pthread_cond_clockwait(cond, mutex, CLOCK_MONOTONIC, &ts);
    if (r == ETIMEDOUT)
      rc = -ETIMEDOUT;
    else if (r != 0)
      rc = -r;
  }
  if (ld_acquire(&w->woken)) {
    cancel__wait_end(w); /* nothing to unregister: no wait on the mutex */
  } else {
    /* The callback may be running, and blocked on the mutex we hold:
     * release it while unregistering (which waits for a running
     * callback).  Waiters must not assume the mutex stays held across a
     * wait anyway: pthread_cond_wait releases it too. */
    pthread_mutex_unlock(mutex);
    cancel__wait_end(w);
    pthread_mutex_lock(mutex);
  }
  return cancel_token_is_cancelled(tok) ? -ECANCELED : rc;
}
