/*
 * A late timer on demand: holds the library's timer thread inside a
 * callback for a while, so that a token's deadline passes with its timer
 * not yet run.  That is the state a loaded machine produces by chance (the
 * timer thread not scheduled at the deadline), made certain: a test of
 * "-ECANCELED means the token fired" needs it every time, not 3 runs in 40.
 *
 * The callback breaks the callback rules on purpose (it blocks): it is
 * registered on a source of its own, armed a little before the deadline
 * under test, and the timer thread runs due timers one at a time, so
 * every timer due while it blocks waits for it.  It blocks for at most
 * `hold_ns` (a failed test that never releases it cannot hang the run),
 * or until test_stall_release().  Include after test_util.h.
 */
#ifndef CANCEL_TEST_STALL_H
#define CANCEL_TEST_STALL_H

#include <semaphore.h>

struct test_stall {
  cancel_source *src;
  cancel_reg reg;
  sem_t entered; /* posted when the timer thread is held */
  sem_t release; /* posted to let it go early */
  int64_t hold_ns;
  int64_t left_at; /* when the timer thread went on; atomic */
};

static inline void test_stall_fn(void *arg) {
  struct test_stall *st = arg;
  sem_post(&st->entered);
  (void)test_sem_wait_ns(&st->release, st->hold_ns);
  __atomic_store_n(&st->left_at, cancel_now(), __ATOMIC_RELEASE);
}

/* Holds the timer thread from `at` for hold_ns.  The stall lives in
 * static storage, never freed: a test that fails while the timer thread
 * is held leaves the callback running on memory that stays valid (a
 * test's frame, or test_shared() memory, would be gone). */
#define TEST_STALL_SLOTS 16
static inline struct test_stall *test_stall_begin(int64_t at, int64_t hold_ns) {
  static struct test_stall slots[TEST_STALL_SLOTS];
  static unsigned next;
  struct test_stall *st = &slots[next++ % TEST_STALL_SLOTS];
  memset(st, 0, sizeof *st);
  sem_init(&st->entered, 0, 0);
  sem_init(&st->release, 0, 0);
  st->hold_ns = hold_ns;
  st->src = new_src("stall");
  assert_int_equal(cancel_register(&st->reg, TOK(st->src), test_stall_fn, st),
                   0);
  assert_int_equal(cancel_source_cancel_at(st->src, at), 0);
  return st;
}

/* Waits until the timer thread is held (the stall's deadline passed). */
static inline void test_stall_entered(struct test_stall *st) {
  assert_int_equal(test_sem_wait_ns(&st->entered, test_tol(CANCEL_SEC(5))), 0);
}

/* Lets the timer thread go (if it is still held) and frees the stall: the
 * unref waits for the callback to return. */
static inline void test_stall_end(struct test_stall *st) {
  sem_post(&st->release);
  cancel_source_unref(st->src);
  sem_destroy(&st->entered);
  sem_destroy(&st->release);
}

#endif /* CANCEL_TEST_STALL_H */
