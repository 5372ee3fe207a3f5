/*
 * cancel_sem: a counting semaphore a token can interrupt.  Posts and
 * cancellation wake-ups both bump `seq`, the futex word waiters sleep on,
 * so neither can be lost between a waiter's last look and its sleep.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

int cancel_sem_init(cancel_sem *sem, unsigned value) {
  if (sem == NULL || value > INT32_MAX)
    return -EINVAL;
  sem->value = value;
  sem->waiters = 0;
  sem->seq = 0;
  return 0;
}

int cancel_sem_trywait(cancel_sem *sem) {
  if (sem == NULL)
    return -EINVAL;
  uint32_t v = ld_relaxed(&sem->value);
  while (v > 0) {
    if (__atomic_compare_exchange_n(&sem->value, &v, v - 1, 1, __ATOMIC_ACQUIRE,
                                    __ATOMIC_RELAXED))
      return 0;
  }
  return -EAGAIN;
}

int cancel_sem_post(cancel_sem *sem) {
  if (sem == NULL)
    return -EINVAL;
  uint32_t v = ld_relaxed(&sem->value);
  do {
    if (v >= INT32_MAX)
      return -EOVERFLOW;
  } while (!__atomic_compare_exchange_n(&sem->value, &v, v + 1, 1,
                                        __ATOMIC_RELEASE, __ATOMIC_RELAXED));
  __atomic_add_fetch(&sem->seq, 1, __ATOMIC_SEQ_CST);
  if (__atomic_load_n(&sem->waiters, __ATOMIC_SEQ_CST) > 0)
    cancel__futex_wake_all(&sem->seq);
  return 0;
}

static void sem_kick(void *arg) {
  struct cancel__waiter *w = arg;
  cancel_sem *sem = w->obj;
  __atomic_add_fetch(&sem->seq, 1, __ATOMIC_SEQ_CST);
  cancel__wait_done(w);
  cancel__futex_wake_all(&sem->seq); /* by address only */
}

int cancel_sem_wait(const cancel_token *tok, cancel_sem *sem,
                    int64_t deadline) {
  if (sem == NULL)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  if (cancel_sem_trywait(sem) == 0)
    return 0;
  struct cancel__waiter *w = cancel__waiter_self();
  w->obj = sem;
  if (cancel__wait_begin(w, tok, sem_kick, "cancel_sem_wait") == 1)
    return -ECANCELED;
  __atomic_add_fetch(&sem->waiters, 1, __ATOMIC_SEQ_CST);
  struct timespec ts = cancel__abs_timespec(deadline);
  int rc;
  for (;;) {
    /* Read seq before looking: a post or a kick after this changes it,
     * and the futex then refuses to sleep. */
    uint32_t seq = __atomic_load_n(&sem->seq, __ATOMIC_SEQ_CST);
    if (cancel_token_is_cancelled(tok)) {
      rc = -ECANCELED;
      break;
    }
    if (cancel_sem_trywait(sem) == 0) {
      rc = 0;
      break;
    }
    if (deadline != CANCEL_NEVER && cancel_now() >= deadline) {
      rc = -ETIMEDOUT;
      break;
    }
    syscall(SYS_futex, &sem->seq, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, seq,
            deadline == CANCEL_NEVER ? NULL : &ts, NULL,
            FUTEX_BITSET_MATCH_ANY);
  }
  __atomic_sub_fetch(&sem->waiters, 1, __ATOMIC_SEQ_CST);
  cancel__wait_end(w);
  return rc;
}
