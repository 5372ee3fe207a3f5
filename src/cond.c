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

struct condwait {
  pthread_cond_t *cond;
  pthread_mutex_t *mutex;
};

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
  struct condwait *c = arg;
  if (pthread_mutex_trylock(c->mutex) == 0) {
    pthread_cond_broadcast(c->cond);
    pthread_mutex_unlock(c->mutex);
  } else if (held_by_me(c->mutex)) {
    pthread_cond_broadcast(c->cond);
  } else {
    /* Held by another thread, maybe the waiter inside the window: wait
     * for it to queue itself (holders keep it briefly). */
    pthread_mutex_lock(c->mutex);
    pthread_cond_broadcast(c->cond);
    pthread_mutex_unlock(c->mutex);
  }
}

int cancel_cond_wait(const cancel_token *tok, pthread_cond_t *cond,
                     pthread_mutex_t *mutex, int64_t deadline) {
  if (cond == NULL || mutex == NULL)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  struct condwait c = {cond, mutex};
  cancel_reg reg;
  if (cancel_register(&reg, tok, cond_wake, &c) == 1)
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
  /* The callback may be blocked on the mutex we hold again: release it
   * while unregistering (which waits for a running callback), then take
   * it back.  Waiters must not assume the mutex stays held across a wait
   * anyway: pthread_cond_wait releases it too. */
  pthread_mutex_unlock(mutex);
  cancel_unregister(&reg);
  pthread_mutex_lock(mutex);
  return cancel_token_is_cancelled(tok) ? -ECANCELED : rc;
}
