/*
 * The low-level synchronisation the core is built on: the calling thread's
 * identity, the slow path of the per-source spin lock, and the futex used
 * to wait for a callback that another thread is running.
 */
#include "internal.h"

#include <limits.h>
#include <linux/futex.h>
#include <sys/syscall.h>
#include <unistd.h>

__thread char cancel__self_anchor;

uint32_t cancel__lock_slow(cancel_source *src) {
  for (;;) {
    uint32_t v = ld_relaxed(&src->tok.state);
    if (!(v & ST_LOCKED) &&
        __atomic_compare_exchange_n(&src->tok.state, &v, v | ST_LOCKED, 0,
                                    __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
      return v | ST_LOCKED;
    /* Held: the holder needs a few nanoseconds, or it was preempted.
     * Yielding at once (as libstdc++'s stop_token does) measured 3-4x
     * better under contention than spinning on the line, which only keeps
     * it bouncing between the cores. */
    cancel__cpu_relax();
    sched_yield();
  }
}

void cancel__futex_wait(uint32_t *addr, uint32_t expected) {
  /* EINTR and EAGAIN (value changed) both mean "look again": the caller
   * loops on the value. */
  syscall(SYS_futex, addr, FUTEX_WAIT_PRIVATE, expected, NULL, NULL, 0);
}

void cancel__futex_wake_all(uint32_t *addr) {
  /* A private futex wake only uses the address as a key: it is safe even
   * if the waiter has already returned and reused the memory.  The kernel
   * walks the whole hash bucket of addr for it (16 buckets per process on
   * two CPUs, since Linux 6.16): many words with one waiter each, all
   * woken, cost the square of their number, one word shared by all its
   * waiters does not (see wait.c, wake_futex). */
  syscall(SYS_futex, addr, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
}
