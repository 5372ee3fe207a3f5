/*
 * The waits of src/wait.c (cancel_token_settle has settle_test.c; the
 * descriptor table of io_test.c runs cancel_poll and cancel_wait_fd
 * through its scenarios too).
 *
 * cancel_sleep and cancel_sleep_until: the time is up (0, never early),
 * cancelled while asleep (from a timer and from another thread, promptly),
 * cancelled before (at once, whatever the duration), past and far
 * deadlines, bad input, signals during the sleep (EINTR never ends it), a
 * shared token waking many sleepers (ten thousand of them in linear time),
 * and no stale wake-up left behind for the thread's next sleep.
 *
 * cancel_poll: many entries (negative ones ignored, hang-ups reported
 * unasked), POLLNVAL counted, nfds 0 as a cancellable sleep, more entries
 * than fit on the stack beside the wake descriptor.
 */
#include "test_util.h"

#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <stdint.h>

/* How late a wake-up may be: cancel (or deadline) to return. */
/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)
/* How long "at once" may take. */
#define AT_ONCE CANCEL_MSEC(20)

/* ---- The time is up --------------------------------------------------- */

static void test_sleep_completes(void **state) {
  (void)state;
  cancel_source *s = new_src("sleep");
  /* NULL token and a live token: 0 when the time is up, never early. */
  for (int k = 0; k < 2; k++) {
    const cancel_token *tok = k == 0 ? NULL : TOK(s);
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sleep(tok, CANCEL_MSEC(30)), 0);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(30), LATE);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_sleep_until_completes(void **state) {
  (void)state;
  cancel_source *s = new_src("until");
  int64_t deadline = cancel_now() + CANCEL_MSEC(30);
  assert_int_equal(cancel_sleep_until(TOK(s), deadline), 0);
  int64_t now = cancel_now();
  assert_i64_ge(now, deadline);
  assert_i64_lt(now, deadline + test_tol(LATE));

  deadline = cancel_now() + CANCEL_MSEC(10);
  assert_int_equal(cancel_sleep_until(NULL, deadline), 0);
  assert_i64_ge(cancel_now(), deadline);
  cancel_source_unref(s);
}

static void test_sleep_zero_and_past(void **state) {
  (void)state;
  cancel_source *s = new_src("zero");
  static const int64_t past[] = {-1, 0, INT64_MIN};
  for (int k = 0; k < 2; k++) {
    const cancel_token *tok = k == 0 ? NULL : TOK(s);
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sleep(tok, 0), 0);
    assert_int_equal(cancel_sleep(tok, 1), 0);
    assert_int_equal(cancel_sleep_until(tok, cancel_now()), 0);
    assert_int_equal(cancel_sleep_until(tok, cancel_now() - CANCEL_SEC(1)), 0);
    for (size_t i = 0; i < sizeof past / sizeof past[0]; i++) {
      int64_t d = past[i] == -1 ? cancel_now() - 1 : past[i];
      assert_int_equal(cancel_sleep_until(tok, d), 0);
    }
    assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  }
  cancel_source_unref(s);
}

static void test_sleep_negative_is_einval(void **state) {
  (void)state;
  cancel_source *s = new_src("neg");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sleep(NULL, -1), -EINVAL);
  assert_int_equal(cancel_sleep(TOK(s), -1), -EINVAL);
  assert_int_equal(cancel_sleep(TOK(s), INT64_MIN), -EINVAL);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  cancel_source_unref(s);
}

/* ---- Cancelled while asleep ------------------------------------------- */

static void test_sleep_cancelled_by_timer(void **state) {
  (void)state;
  /* Both calls, with a long duration and with no deadline at all. */
  for (int k = 0; k < 2; k++) {
    cancel_source *s = new_src("timer");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    int r = k == 0 ? cancel_sleep(TOK(s), CANCEL_SEC(10))
                   : cancel_sleep_until(TOK(s), CANCEL_NEVER);
    int64_t el = test_since(t0);
    assert_int_equal(r, -ECANCELED);
    assert_elapsed_within(el, CANCEL_MSEC(20), LATE);
    cancel_source_unref(s);
  }
}

struct sleeper {
  const cancel_token *tok;
  int64_t ns;       /* for cancel_sleep, or */
  int64_t deadline; /* for cancel_sleep_until when ns < 0 */
};

static int64_t do_sleep(void *arg) {
  struct sleeper *sl = arg;
  return sl->ns >= 0 ? cancel_sleep(sl->tok, sl->ns)
                     : cancel_sleep_until(sl->tok, sl->deadline);
}

static void test_sleep_cancelled_from_thread(void **state) {
  (void)state;
  for (int k = 0; k < 2; k++) {
    cancel_source *s = new_src("thread");
    struct sleeper sl = {TOK(s), k == 0 ? CANCEL_SEC(30) : -1, CANCEL_NEVER};
    struct test_waiter w;
    test_waiter_start(&w, do_sleep, &sl);
    test_waiter_stop_with(&w, test_rescue_cancel, s);
    test_waiter_blocked(&w);
    test_waiter_cancel(&w, s, LATE);
    cancel_source_unref(s);
  }
}

/* A child linked to a parent: cancelling the parent wakes a sleeper on the
 * child; the token's own timeout is a cancellation, not the sleep's time. */
static void test_sleep_linked_and_timeout_source(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  const cancel_token *ptok = TOK(parent);
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", &ptok, 1), 0);
  struct sleeper sl = {TOK(child), CANCEL_SEC(30), 0};
  struct test_waiter w;
  test_waiter_start(&w, do_sleep, &sl);
  test_waiter_stop_with(&w, test_rescue_cancel, child);
  test_waiter_blocked(&w);
  test_waiter_cancel(&w, parent, LATE);
  cancel_source_unref(child);
  cancel_source_unref(parent);

  /* The clock starts before the source: its timeout runs from its
   * creation (under valgrind, milliseconds before the next line). */
  cancel_source *to = NULL;
  int64_t t0 = cancel_now();
  assert_int_equal(
      cancel_source_new_timeout(&to, "budget", NULL, CANCEL_MSEC(20)), 0);
  assert_int_equal(cancel_sleep(TOK(to), CANCEL_SEC(10)), -ECANCELED);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
  assert_int_equal(cancel_token_kind(TOK(to)), CANCEL_TIMEOUT);
  cancel_source_unref(to);
}

/* ---- Cancelled before ------------------------------------------------- */

static void test_sleep_cancelled_before(void **state) {
  (void)state;
  cancel_source *s = new_src("before");
  assert_int_equal(cancel_source_cancel(s), 1);
  int64_t t0 = cancel_now();
  /* Level-triggered: every call, every duration, forever. */
  for (int i = 0; i < 3; i++) {
    assert_int_equal(cancel_sleep(TOK(s), CANCEL_SEC(10)), -ECANCELED);
    assert_int_equal(cancel_sleep(TOK(s), 1), -ECANCELED);
    assert_int_equal(cancel_sleep(TOK(s), 0), -ECANCELED);
    assert_int_equal(cancel_sleep_until(TOK(s), CANCEL_NEVER), -ECANCELED);
    assert_int_equal(cancel_sleep_until(TOK(s), cancel_now() + CANCEL_SEC(5)),
                     -ECANCELED);
    assert_int_equal(cancel_sleep_until(TOK(s), cancel_now() - 1), -ECANCELED);
  }
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  cancel_source_unref(s);
}

/* ---- Deadlines far away: no overflow into "passed" -------------------- */

static void test_sleep_far_deadlines(void **state) {
  (void)state;
  /* Durations and deadlines whose sum with now overflows, or whose
   * conversion to a timespec or milliseconds would: the sleep must still be
   * a long one, ended here by the cancel after 20 ms. */
  const int64_t durations[] = {INT64_MAX, INT64_MAX - 1, CANCEL_SEC(1) << 30};
  for (size_t i = 0; i < sizeof durations / sizeof durations[0]; i++) {
    cancel_source *s = new_src("far");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    assert_int_equal(cancel_sleep(TOK(s), durations[i]), -ECANCELED);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
    cancel_source_unref(s);
  }
  const int64_t deadlines[] = {CANCEL_NEVER - 1, INT64_MAX / 2,
                               cancel_now() + (CANCEL_SEC(1) << 30)};
  for (size_t i = 0; i < sizeof deadlines / sizeof deadlines[0]; i++) {
    cancel_source *s = new_src("far");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    assert_int_equal(cancel_sleep_until(TOK(s), deadlines[i]), -ECANCELED);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
    cancel_source_unref(s);
  }
}

/* ---- Signals ---------------------------------------------------------- */

static void test_sleep_survives_signals(void **state) {
  (void)state;
  struct test_sigstorm storm;

  /* The time is up: 0, not early, not -EINTR; NULL and live tokens. */
  cancel_source *s = new_src("storm");
  for (int k = 0; k < 2; k++) {
    const cancel_token *tok = k == 0 ? NULL : TOK(s);
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    int64_t t0 = cancel_now();
    int r = cancel_sleep(tok, CANCEL_MSEC(60));
    int64_t el = test_since(t0);
    long hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, 0);
    assert_elapsed_within(el, CANCEL_MSEC(60), LATE);
    assert_true(hits >= 2);

    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    int64_t deadline = cancel_now() + CANCEL_MSEC(40);
    r = cancel_sleep_until(tok, deadline);
    int64_t now = cancel_now();
    hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, 0);
    assert_i64_ge(now, deadline);
    assert_i64_lt(now, deadline + test_tol(LATE));
    assert_true(hits >= 2);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);

  /* Cancelled during the storm: -ECANCELED at the cancel, not before. */
  for (int k = 0; k < 2; k++) {
    s = new_src("storm-cancel");
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(40)), 0);
    int r = k == 0 ? cancel_sleep(TOK(s), CANCEL_SEC(10))
                   : cancel_sleep_until(TOK(s), CANCEL_NEVER);
    int64_t el = test_since(t0);
    long hits = test_sigstorm_stop(&storm);
    assert_int_equal(r, -ECANCELED);
    assert_elapsed_within(el, CANCEL_MSEC(40), LATE);
    assert_true(hits >= 2);
    cancel_source_unref(s);
  }
}

/* ---- Many sleepers, one token ------------------------------------------ */

enum { SLEEPERS = 8 };

static void test_sleep_shared_token_wakes_all(void **state) {
  (void)state;
  cancel_source *s = new_src("shared");
  struct sleeper sl = {TOK(s), CANCEL_SEC(30), 0};
  struct test_waiter w[SLEEPERS];
  for (int i = 0; i < SLEEPERS; i++) {
    test_waiter_start(&w[i], do_sleep, &sl);
    test_waiter_stop_with(&w[i], test_rescue_cancel, s);
  }
  for (int i = 0; i < SLEEPERS; i++)
    test_waiter_blocked(&w[i]);
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel(s), 1);
  for (int i = 0; i < SLEEPERS; i++) {
    test_waiter_end(&w[i], test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w[i].result, -ECANCELED);
    assert_i64_lt(w[i].t_end - t_cancel, test_tol(LATE));
  }
  cancel_source_unref(s);
}

/* Sleepers on different tokens: cancelling one wakes that one only. */
static void test_sleep_cancel_wakes_only_its_sleeper(void **state) {
  (void)state;
  cancel_source *a = new_src("a"), *b = new_src("b");
  struct sleeper sa = {TOK(a), CANCEL_SEC(30), 0};
  struct sleeper sb = {TOK(b), CANCEL_SEC(30), 0};
  struct test_waiter wa, wb;
  test_waiter_start(&wa, do_sleep, &sa);
  test_waiter_stop_with(&wa, test_rescue_cancel, a);
  test_waiter_start(&wb, do_sleep, &sb);
  test_waiter_stop_with(&wb, test_rescue_cancel, b);
  test_waiter_blocked(&wa);
  test_waiter_blocked(&wb);
  assert_int_equal(cancel_source_cancel(a), 1);
  test_waiter_end(&wa, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(wa.result, -ECANCELED);
  /* b still sleeps. */
  test_sleep_ns(CANCEL_MSEC(20));
  assert_int_not_equal(sem_trywait(wb.finished), 0);
  assert_int_equal(cancel_source_cancel(b), 1);
  test_waiter_end(&wb, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(wb.result, -ECANCELED);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

/* ---- No stale wake-up ------------------------------------------------- */

/* The per-thread wake primitive is reused by the thread's next wait: a
 * wake-up meant for a finished wait (a cancel that fired while or just
 * after the sleep ended) must not end the next sleep early. */
static void test_sleep_no_stale_wakeup(void **state) {
  (void)state;
  int rounds = (int)(40 * test_stress_scale());
  for (int i = 0; i < rounds; i++) {
    cancel_source *s = new_src("stale");
    /* The timer fires around the end of the 2 ms sleep: either result is
     * fine, what matters is the next sleep. */
    assert_int_equal(
        cancel_source_cancel_after(s, CANCEL_USEC(1500 + 50 * (i % 20))), 0);
    int r = cancel_sleep(TOK(s), CANCEL_MSEC(2));
    assert_true(r == 0 || r == -ECANCELED);
    /* Let the cancel (if it had not fired yet) fire now, then sleep on a
     * live token and on none. */
    while (!cancel_token_is_cancelled(TOK(s)))
      test_sleep_ns(CANCEL_USEC(200));
    cancel_source *live = new_src("live");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_sleep(TOK(live), CANCEL_MSEC(3)), 0);
    assert_i64_ge(test_since(t0), CANCEL_MSEC(3));
    t0 = cancel_now();
    assert_int_equal(cancel_sleep(NULL, CANCEL_MSEC(1)), 0);
    assert_i64_ge(test_since(t0), CANCEL_MSEC(1));
    cancel_source_unref(live);
    cancel_source_unref(s);
  }

  /* A cancel that woke a sleep; the same thread sleeps again at once. */
  cancel_source *s = new_src("woken");
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(5)), 0);
  assert_int_equal(cancel_sleep(TOK(s), CANCEL_SEC(10)), -ECANCELED);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_sleep(NULL, CANCEL_MSEC(20)), 0);
  assert_i64_ge(test_since(t0), CANCEL_MSEC(20));
  cancel_source_unref(s);
}

/* ---- Ten thousand sleepers, one token --------------------------------- *
 * Cancelling a token that 10,000 threads sleep on wakes every one of them
 * in time linear in their number: next to the floor, the same threads
 * each on a futex word of its own woken one FUTEX_WAKE each, in the order
 * they went to sleep (which the kernel finds at the head of its bucket).
 * The library woke each sleeper on a word of its own, newest first, each
 * wake walking a kernel hash bucket shared by all of them: 10x the floor
 * at 10,000 threads, 40x at 30,000. */

#if defined(__SANITIZE_THREAD__)
#define SLEEP_TEST_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define SLEEP_TEST_TSAN 1
#endif
#endif

#define CROWD_STACK (64 * 1024)

struct crowd {
  const cancel_token *tok; /* NULL: the floor, a futex word each */
  uint32_t *words;         /* the floor's words */
  pid_t *tids;             /* atomic: each thread's kernel id */
  uint32_t started;        /* atomic: threads about to block */
  uint32_t left;           /* atomic futex word: not returned yet */
  uint32_t release;        /* atomic futex word: 1 once they may exit */
  uint32_t wrong;          /* atomic: waits not ended by the cancel */
};

struct crowd_arg {
  struct crowd *c;
  uint32_t i;
};

static void futex_wake_n(uint32_t *w, int n) {
  syscall(SYS_futex, w, FUTEX_WAKE_PRIVATE, n, NULL, NULL, 0);
}

static void futex_wait_while(uint32_t *w, uint32_t v) {
  while (__atomic_load_n(w, __ATOMIC_ACQUIRE) == v)
    syscall(SYS_futex, w, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
}

static void *crowd_main(void *p) {
  struct crowd_arg *a = p;
  struct crowd *c = a->c;
  __atomic_store_n(&c->tids[a->i], test_gettid(), __ATOMIC_RELAXED);
  __atomic_add_fetch(&c->started, 1, __ATOMIC_RELEASE);
  if (c->tok != NULL) {
    if (cancel_sleep(c->tok, CANCEL_SEC(120)) != -ECANCELED)
      __atomic_add_fetch(&c->wrong, 1, __ATOMIC_RELAXED);
  } else {
    futex_wait_while(&c->words[a->i], 0);
  }
  if (__atomic_sub_fetch(&c->left, 1, __ATOMIC_ACQ_REL) == 0)
    futex_wake_n(&c->left, 1);
  /* Exiting (freeing the stack) is not part of the wake-up. */
  futex_wait_while(&c->release, 0);
  return NULL;
}

static void crowd_wake_floor(struct crowd *c, uint32_t n) {
  for (uint32_t i = 0; i < n; i++) {
    __atomic_store_n(&c->words[i], 1, __ATOMIC_RELEASE);
    futex_wake_n(&c->words[i], 1);
  }
}

/* n threads asleep, then woken (floor: one by one; else by one cancel).
 * Returns the ns from the first wake to the last return, or -1 when the
 * system refused a thread (EAGAIN: *made says how many it started). */
static int64_t crowd_run(uint32_t n, bool floor, uint32_t *made) {
  struct crowd c = {0};
  pthread_t *th = calloc(n, sizeof *th);
  struct crowd_arg *args = calloc(n, sizeof *args);
  c.tids = calloc(n, sizeof *c.tids);
  c.words = calloc(n, sizeof *c.words);
  assert_non_null(th);
  assert_non_null(args);
  assert_non_null(c.tids);
  assert_non_null(c.words);
  cancel_source *s = new_src("crowd");
  c.tok = floor ? NULL : TOK(s);
  c.left = n;
  pthread_attr_t attr;
  assert_int_equal(pthread_attr_init(&attr), 0);
  assert_int_equal(pthread_attr_setstacksize(&attr, CROWD_STACK), 0);
  int err = 0;
  uint32_t k = 0;
  for (; k < n; k++) {
    args[k].c = &c;
    args[k].i = k;
    if ((err = pthread_create(&th[k], &attr, crowd_main, &args[k])) != 0)
      break;
  }
  pthread_attr_destroy(&attr);
  *made = k;
  int64_t took = -1;
  if (k == n) {
    /* Every thread asleep in the kernel before the clock starts. */
    int64_t give_up = cancel_now() + test_tol(CANCEL_SEC(60));
    while (__atomic_load_n(&c.started, __ATOMIC_ACQUIRE) != n &&
           cancel_now() < give_up)
      test_sleep_ns(CANCEL_MSEC(1));
    for (uint32_t i = 0; i < n; i++)
      while (test_thread_state(__atomic_load_n(&c.tids[i], __ATOMIC_RELAXED)) !=
                 'S' &&
             cancel_now() < give_up)
        sched_yield();
    int64_t t0 = cancel_now();
    if (floor)
      crowd_wake_floor(&c, n);
    else
      assert_int_equal(cancel_source_cancel(s), 1);
    uint32_t v;
    while ((v = __atomic_load_n(&c.left, __ATOMIC_ACQUIRE)) != 0)
      futex_wait_while(&c.left, v);
    took = cancel_now() - t0;
  } else {
    /* Release the ones that started before reporting the refusal. */
    if (floor)
      crowd_wake_floor(&c, k);
    else
      cancel_source_cancel(s);
  }
  __atomic_store_n(&c.release, 1, __ATOMIC_RELEASE);
  futex_wake_n(&c.release, INT32_MAX);
  for (uint32_t i = 0; i < k; i++)
    assert_int_equal(pthread_join(th[i], NULL), 0);
  if (k == n)
    assert_int_equal(__atomic_load_n(&c.wrong, __ATOMIC_RELAXED), 0);
  else if (err != EAGAIN)
    fail_msg("pthread_create: %s", strerror(err));
  cancel_source_unref(s);
  free(th);
  free(args);
  free(c.tids);
  free(c.words);
  return took;
}

static void test_sleep_ten_thousand_sleepers(void **state) {
  (void)state;
  const char *pre = getenv("LD_PRELOAD");
  bool valgrind = pre != NULL && strstr(pre, "vgpreload") != NULL;
  uint32_t n = 10000;
  bool timed = true;
#ifdef SLEEP_TEST_TSAN
  n = 1000; /* ThreadSanitizer's limit is 8128 threads alive at once */
  timed = false;
#endif
  if (valgrind) { /* one thread at a time, and 500 threads at most */
    n = 200;
    timed = false;
  }
  for (int attempt = 0;; attempt++) {
    uint32_t made = 0;
    int64_t floor = timed ? crowd_run(n, true, &made) : 0;
    int64_t lib = floor >= 0 ? crowd_run(n, false, &made) : -1;
    if (lib < 0) {
      print_message("only %u threads could be started (EAGAIN: see ulimit "
                    "-u, kernel.threads-max, vm.max_map_count): skipped\n",
                    made);
      skip();
    }
    if (timed)
      print_message("%u sleepers woken by one cancel in %.1f ms (floor: "
                    "%.1f ms)\n",
                    n, (double)lib / 1e6, (double)floor / 1e6);
    else
      print_message("%u sleepers woken by one cancel (not timed here)\n", n);
    /* Linear: within a small factor of the floor, measured alike.  A
     * loaded machine may hit one of the two runs: one more try. */
    if (!timed || lib <= 4 * floor + test_tol(CANCEL_MSEC(100)))
      break;
    assert_true(attempt < 1);
  }
}

/* ---- Descriptors for the cancel_poll tests --------------------------- */

static void set_nonblock(int fd, bool on) {
  int fl = fcntl(fd, F_GETFL);
  assert_true(fl >= 0);
  fl = on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK;
  assert_int_equal(fcntl(fd, F_SETFL, fl), 0);
}

static void make_pipe(int p[2], bool rd_nb, bool wr_nb) {
  assert_int_equal(pipe2(p, O_CLOEXEC), 0);
  if (rd_nb)
    set_nonblock(p[0], true);
  if (wr_nb)
    set_nonblock(p[1], true);
}

/* The tests write a byte or two into an empty pipe: it never blocks. */
static void write_all(int fd, const void *buf, size_t len) {
  size_t put = 0;
  while (put < len) {
    ssize_t r = write(fd, (const char *)buf + put, len - put);
    if (r < 0 && errno == EINTR)
      continue;
    assert_true(r > 0);
    put += (size_t)r;
  }
}

/* ---- cancel_poll ------------------------------------------------------ */

static void test_poll_many_entries(void **state) {
  (void)state;
  int a[2], b[2];
  make_pipe(a, false, false);
  make_pipe(b, false, false);
  cancel_source *s = new_src("poll");
  struct pollfd p[4] = {{a[0], POLLIN, 0x7f},
                        {-1, POLLIN, 0x7f}, /* ignored, as in poll(2) */
                        {b[0], POLLIN, 0x7f},
                        {-5, POLLOUT, 0x7f}};
  assert_int_equal(cancel_poll(TOK(s), p, 4, cancel_now() - 1), -ETIMEDOUT);

  write_all(b[1], "x", 1);
  assert_int_equal(cancel_poll(TOK(s), p, 4, CANCEL_NEVER), 1);
  assert_int_equal(p[0].revents, 0);
  assert_int_equal(p[1].revents, 0);
  assert_true(p[2].revents & POLLIN);
  assert_int_equal(p[3].revents, 0);

  write_all(a[1], "y", 1);
  assert_int_equal(cancel_poll(TOK(s), p, 4, CANCEL_NEVER), 2);
  assert_true(p[0].revents & POLLIN);
  assert_true(p[2].revents & POLLIN);

  /* A hang-up is reported without being asked for. */
  char c;
  assert_int_equal(read(a[0], &c, 1), 1);
  assert_int_equal(read(b[0], &c, 1), 1);
  close(a[1]);
  struct pollfd q = {a[0], POLLIN, 0};
  assert_int_equal(cancel_poll(TOK(s), &q, 1, CANCEL_NEVER), 1);
  assert_true(q.revents & POLLHUP);
  q.events = 0;
  assert_int_equal(cancel_poll(TOK(s), &q, 1, CANCEL_NEVER), 1);
  assert_true(q.revents & POLLHUP);

  close(a[0]);
  close(b[0]);
  close(b[1]);
  cancel_source_unref(s);
}

static void test_poll_nval_counts(void **state) {
  (void)state;
  int a[2];
  make_pipe(a, false, false);
  int closed[2];
  make_pipe(closed, false, false);
  close(closed[0]);
  close(closed[1]);
  cancel_source *s = new_src("nval");
  struct pollfd p[3] = {
      {a[0], POLLIN, 0}, {closed[0], POLLIN, 0}, {99999, POLLIN, 0}};
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_poll(TOK(s), p, 3, CANCEL_NEVER), 2);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  assert_int_equal(p[0].revents, 0);
  assert_true(p[1].revents & POLLNVAL);
  assert_true(p[2].revents & POLLNVAL);
  close(a[0]);
  close(a[1]);
  cancel_source_unref(s);
}

static void test_poll_no_entries(void **state) {
  (void)state;
  /* nfds 0 (fds may be NULL): a cancellable sleep until the deadline. */
  cancel_source *s = new_src("empty");
  struct pollfd dummy;
  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + CANCEL_MSEC(20);
    assert_int_equal(cancel_poll(TOK(s), k ? &dummy : NULL, 0, d), -ETIMEDOUT);
    assert_i64_ge(cancel_now(), d);
    assert_i64_lt(cancel_now(), d + test_tol(LATE));
  }
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  assert_int_equal(cancel_poll(TOK(s), NULL, 0, CANCEL_NEVER), -ECANCELED);
  assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
  cancel_source_unref(s);

  /* fds NULL with entries: -EINVAL. */
  assert_int_equal(cancel_poll(NULL, NULL, 1, CANCEL_NEVER), -EINVAL);
  assert_int_equal(cancel_poll(NULL, NULL, 100, cancel_now() - 1), -EINVAL);
}

/* More entries than fit beside the wake descriptor on the stack. */
enum { BIG = 100 };

struct bigpoll {
  struct pollfd p[BIG];
  const cancel_token *tok;
};

static int64_t do_bigpoll(void *arg) {
  struct bigpoll *b = arg;
  return cancel_poll(b->tok, b->p, BIG, CANCEL_NEVER);
}

static void test_poll_over_64_entries(void **state) {
  (void)state;
  int a[2];
  make_pipe(a, false, false);
  struct bigpoll *b = calloc(1, sizeof *b);
  assert_non_null(b);
  for (int i = 0; i < BIG; i++)
    b->p[i] = (struct pollfd){i == BIG - 1 ? a[0] : -1, POLLIN, 0};
  cancel_source *s = new_src("big");
  b->tok = TOK(s);

  /* Cancelled while blocked. */
  struct test_waiter w;
  test_waiter_block(&w, do_bigpoll, b);
  test_waiter_cancel(&w, s, LATE);
  cancel_source_unref(s);

  /* Woken by the last entry. */
  s = new_src("big2");
  b->tok = TOK(s);
  test_waiter_block(&w, do_bigpoll, b);
  write_all(a[1], "z", 1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), test_rescue_cancel, s);
  assert_i64_eq(w.result, 1);
  assert_true(b->p[BIG - 1].revents & POLLIN);
  for (int i = 0; i < BIG - 1; i++)
    assert_int_equal(b->p[i].revents, 0);
  cancel_source_unref(s);
  close(a[0]);
  close(a[1]);
  free(b);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_sleep_completes),
      cmocka_unit_test(test_sleep_until_completes),
      cmocka_unit_test(test_sleep_zero_and_past),
      cmocka_unit_test(test_sleep_negative_is_einval),
      cmocka_unit_test(test_sleep_cancelled_by_timer),
      cmocka_unit_test(test_sleep_cancelled_from_thread),
      cmocka_unit_test(test_sleep_linked_and_timeout_source),
      cmocka_unit_test(test_sleep_cancelled_before),
      cmocka_unit_test(test_sleep_far_deadlines),
      cmocka_unit_test(test_sleep_survives_signals),
      cmocka_unit_test(test_sleep_shared_token_wakes_all),
      cmocka_unit_test(test_sleep_cancel_wakes_only_its_sleeper),
      cmocka_unit_test(test_sleep_no_stale_wakeup),
      cmocka_unit_test(test_sleep_ten_thousand_sleepers),
      cmocka_unit_test(test_poll_many_entries),
      cmocka_unit_test(test_poll_nval_counts),
      cmocka_unit_test(test_poll_no_entries),
      cmocka_unit_test(test_poll_over_64_entries),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
