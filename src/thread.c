/*
 * cancel_thread: a thread that can be joined with a token.  pthread_join
 * cannot be woken, so the start routine runs inside a trampoline that
 * marks its end (bit 0 of `done`, also on pthread_exit through a cleanup
 * handler) and wakes waiters; a token kicks a waiter by adding 2.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

static void mark_done(void *arg) {
  cancel_thread *t = arg;
  __atomic_or_fetch(&t->done, 1, __ATOMIC_RELEASE);
  cancel__futex_wake_all(&t->done);
}

static void *trampoline(void *arg) {
  cancel_thread *t = arg;
  void *ret;
  pthread_cleanup_push(mark_done, t);
  ret = t->fn(t->arg);
  pthread_cleanup_pop(1);
  return ret;
}

int cancel_thread_create(cancel_thread *t, const pthread_attr_t *attr,
                         void *(*fn)(void *), void *arg) {
  if (t == NULL || fn == NULL)
    return -EINVAL;
  t->done = 0;
  t->fn = fn;
  t->arg = arg;
  t->ret = NULL;
  int rc = pthread_create(&t->thread, attr, trampoline, t);
  return rc == 0 ? 0 : -rc;
}

static void kick(void *arg) {
  struct cancel__waiter *w = arg;
  cancel_thread *t = w->obj;
  __atomic_add_fetch(&t->done, 2, __ATOMIC_RELEASE);
  cancel__wait_done(w);
  cancel__futex_wake_all(&t->done); /* by address only */
}

int cancel_thread_join(const cancel_token *tok, cancel_thread *t, void **ret,
                       int64_t deadline) {
  if (t == NULL)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  struct cancel__waiter *w = cancel__waiter_self();
  w->obj = t;
  if (cancel__wait_begin(w, tok, kick, "cancel_thread_join") == 1)
    return -ECANCELED;
  struct timespec ts = cancel__abs_timespec(deadline);
  int rc = 0;
  for (;;) {
    uint32_t d = ld_acquire(&t->done);
    if (d & 1)
      break;
    if (cancel_token_is_cancelled(tok)) {
      rc = -ECANCELED;
      break;
    }
    if (deadline != CANCEL_NEVER && cancel_now() >= deadline) {
      rc = -ETIMEDOUT;
      break;
    }
    syscall(SYS_futex, &t->done, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, d,
            deadline == CANCEL_NEVER ? NULL : &ts, NULL,
            FUTEX_BITSET_MATCH_ANY);
  }
  cancel__wait_end(w);
  if (rc < 0)
    return rc;
  /* The start routine has ended: the join waits at most for the thread's
   * own exit to finish. */
  int r = pthread_join(t->thread, ret);
  return r == 0 ? 0 : -r;
}
