/*
 * Stress: many threads blocked in mixed waits (sleep, poll on its own
 * pipe, wait_fd, cond wait on one shared condition, sem wait on one shared
 * semaphore, read on its own pipe, write to its own full pipe, thread join),
 * on their own sources, on sources they share, and on a child linked to a
 * shared parent; the sources are cancelled in random order from the main
 * thread, with random gaps, in some rounds while the waiters are still
 * entering their waits.  Every waiter must wake exactly once with
 * -ECANCELED, within a bounded time of its source's cancel, and find the
 * token still cancelled on a second call (level-triggered); the joined
 * threads are still joinable; nothing leaks (descriptors are counted).
 *
 * Rounds: 300 * CANCEL_STRESS_SCALE (default 1.0), stopped early (after at
 * least 20) when the run passes 15 s, so that sanitizer and valgrind runs
 * stay bounded.  Run under TSan to check the wake paths.
 */
#include "test_util.h"

#include <fcntl.h>
#include <poll.h>

enum kind {
  K_SLEEP,
  K_POLL,
  K_WAITFD,
  K_COND,
  K_SEM,
  K_READ,
  K_WRITE,
  K_JOIN,
  K_COUNT
};
static const char *const kind_names[] = {"sleep", "poll", "wait_fd", "cond",
                                         "sem",   "read", "write",   "join"};

enum { WAITERS = 16, SOURCES = 12 };

struct round;

struct waiter {
  struct round *rd;
  int id;
  enum kind kind;
  int src;              /* index into rd->src */
  int p[2];             /* K_POLL, K_WAITFD, K_READ, K_WRITE */
  cancel_thread target; /* K_JOIN */
  pthread_t thread;
  int64_t result, again;
  int64_t t_end;
  int wakes;
};

struct round {
  cancel_source *src[SOURCES];
  int64_t t_cancel[SOURCES]; /* when the cancel of src (or its parent) began */
  struct waiter w[WAITERS];
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int pred; /* never set: only a cancel ends the cond waits */
  cancel_sem sem;
  sem_t ready, done;
  sem_t release; /* ends the joined threads */
};

static unsigned rnd(unsigned *seed) {
  *seed = *seed * 1103515245u + 12345u;
  return (*seed >> 16) & 0x7fff;
}

static void *target_main(void *arg) {
  struct round *rd = arg;
  while (sem_wait(&rd->release) != 0) {
  }
  return (void *)(uintptr_t)0xabc;
}

static int64_t wait_once(struct waiter *w, const cancel_token *tok) {
  struct round *rd = w->rd;
  char c;
  static const char junk[64];
  switch (w->kind) {
  case K_SLEEP:
    return cancel_sleep(tok, CANCEL_SEC(60));
  case K_POLL: {
    struct pollfd p = {w->p[0], POLLIN, 0};
    return cancel_poll(tok, &p, 1, CANCEL_NEVER);
  }
  case K_WAITFD:
    return cancel_wait_fd(tok, w->p[0], POLLIN, CANCEL_NEVER);
  case K_COND: {
    int r = 0;
    pthread_mutex_lock(&rd->mu);
    while (!rd->pred && r == 0)
      r = cancel_cond_wait(tok, &rd->cond, &rd->mu, CANCEL_NEVER);
    pthread_mutex_unlock(&rd->mu);
    return r;
  }
  case K_SEM:
    return cancel_sem_wait(tok, &rd->sem, CANCEL_NEVER);
  case K_READ:
    return cancel_read(tok, w->p[0], &c, 1, CANCEL_NEVER);
  case K_WRITE:
    return cancel_write(tok, w->p[1], junk, sizeof junk, CANCEL_NEVER);
  case K_JOIN: {
    void *ret = NULL;
    return cancel_thread_join(tok, &w->target, &ret, CANCEL_NEVER);
  }
  case K_COUNT:
    break;
  }
  return -9999;
}

static void *waiter_main(void *arg) {
  struct waiter *w = arg;
  const cancel_token *tok = TOK(w->rd->src[w->src]);
  sem_post(&w->rd->ready);
  w->result = wait_once(w, tok);
  w->t_end = cancel_now();
  __atomic_add_fetch(&w->wakes, 1, __ATOMIC_SEQ_CST);
  /* Level-triggered: a second wait returns at once. */
  w->again = wait_once(w, tok);
  sem_post(&w->rd->done);
  return NULL;
}

/* Which source waiter i uses: 0..7 their own, 8..15 two per source on
 * 8..10, and 11 (a child of 10) for the last two. */
static int source_of(int i) {
  if (i < 8)
    return i;
  if (i < 14)
    return 8 + (i - 8) / 2;
  return 11;
}

static void pipe_setup(struct waiter *w) {
  if (pipe2(w->p, O_CLOEXEC) != 0)
    fail_msg("pipe2: %s", strerror(errno));
  if (w->kind == K_WRITE) {
    /* A full one-page pipe. */
    fcntl(w->p[1], F_SETPIPE_SZ, 4096);
    int fl = fcntl(w->p[1], F_GETFL);
    fcntl(w->p[1], F_SETFL, fl | O_NONBLOCK);
    static const char junk[4096];
    while (write(w->p[1], junk, sizeof junk) > 0) {
    }
    fcntl(w->p[1], F_SETFL, fl); /* a blocking descriptor */
  }
}

/* A waiter's stop (a failed round's teardown): cancel its source.  rd is
 * the heap's and stays there when the test fails. */
static void stop_waiter(void *arg) {
  struct waiter *w = arg;
  cancel_source_cancel(w->rd->src[w->src]);
}

static void test_mixed_waits_cancelled_in_random_order(void **state) {
  (void)state;
  /* Keep the reactor's descriptors steady for the count. */
  cancel_source *pin = NULL;
  assert_int_equal(cancel_source_new(&pin, "pin"), 0);
  assert_int_equal(cancel_source_cancel_after(pin, CANCEL_SEC(3600)), 0);

  int rounds = (int)(300 * test_stress_scale());
  if (rounds < 1)
    rounds = 1;
  int64_t budget_end = cancel_now() + CANCEL_SEC(15);
  int64_t bound = test_tol(CANCEL_SEC(1));
  int64_t worst = 0;
  unsigned seed = 20261125u;
  int base_fds = -1;
  int done_rounds = 0;
  struct round *rd = calloc(1, sizeof *rd);
  assert_non_null(rd);

  for (int round = 0; round < rounds; round++) {
    memset(rd, 0, sizeof *rd);
    pthread_mutex_init(&rd->mu, NULL);
    pthread_cond_init(&rd->cond, NULL);
    assert_int_equal(cancel_sem_init(&rd->sem, 0), 0);
    sem_init(&rd->ready, 0, 0);
    sem_init(&rd->done, 0, 0);
    sem_init(&rd->release, 0, 0);
    for (int s = 0; s < SOURCES - 1; s++)
      assert_int_equal(cancel_source_new(&rd->src[s], "stress"), 0);
    const cancel_token *parent = TOK(rd->src[10]);
    assert_int_equal(
        cancel_source_new_linked(&rd->src[11], "child", &parent, 1), 0);

    for (int i = 0; i < WAITERS; i++) {
      struct waiter *w = &rd->w[i];
      w->rd = rd;
      w->id = i;
      /* Every kind on its own and on shared sources; rotate per round. */
      w->kind = (enum kind)((i + round) % K_COUNT);
      w->src = source_of(i);
      w->p[0] = w->p[1] = -1;
      if (w->kind == K_POLL || w->kind == K_WAITFD || w->kind == K_READ ||
          w->kind == K_WRITE)
        pipe_setup(w);
      if (w->kind == K_JOIN)
        assert_int_equal(
            cancel_thread_create(&w->target, NULL, target_main, rd), 0);
    }
    for (int i = 0; i < WAITERS; i++)
      rd->w[i].thread = test_helper_start(waiter_main, &rd->w[i], stop_waiter);

    /* Half the rounds: cancel once every waiter is on its way into its
     * wait; the others: at once, racing their entry. */
    if (round % 2 == 0) {
      for (int i = 0; i < WAITERS; i++)
        assert_int_equal(test_sem_wait_ns(&rd->ready, CANCEL_SEC(10)), 0);
      if (round % 4 == 0)
        test_sleep_ns(CANCEL_USEC(500)); /* most are asleep by now */
    }

    int order[SOURCES];
    for (int s = 0; s < SOURCES; s++)
      order[s] = s;
    for (int s = SOURCES - 1; s > 0; s--) {
      int j = (int)(rnd(&seed) % (unsigned)(s + 1));
      int t = order[s];
      order[s] = order[j];
      order[j] = t;
    }
    for (int k = 0; k < SOURCES; k++) {
      int s = order[k];
      int64_t now = cancel_now();
      if (rd->t_cancel[s] == 0)
        rd->t_cancel[s] = now;
      if (s == 10 && rd->t_cancel[11] == 0)
        rd->t_cancel[11] = now; /* the child follows its parent */
      int r = cancel_source_cancel(rd->src[s]);
      assert_true(r == 1 || (r == 0 && s == 11));
      unsigned gap = rnd(&seed) % 8;
      if (gap == 0)
        sched_yield();
      else if (gap == 1)
        test_sleep_ns(CANCEL_USEC(rnd(&seed) % 200));
    }

    /* Every waiter wakes, in bounded time. */
    for (int i = 0; i < WAITERS; i++) {
      if (test_sem_wait_ns(&rd->done, bound + CANCEL_SEC(1)) != 0) {
        for (int j = 0; j < WAITERS; j++)
          if (__atomic_load_n(&rd->w[j].wakes, __ATOMIC_SEQ_CST) == 0)
            print_error("round %d: waiter %d (%s, source %d) never woke\n",
                        round, j, kind_names[rd->w[j].kind], rd->w[j].src);
        /* The blocked threads use rd: no way back. */
        test_give_up("wait_stress_test: lost wake-up");
      }
    }
    for (int i = 0; i < WAITERS; i++)
      test_helper_join(rd->w[i].thread);
    for (int i = 0; i < WAITERS; i++) {
      struct waiter *w = &rd->w[i];
      if (w->result != -ECANCELED || w->again != -ECANCELED || w->wakes != 1)
        print_error("round %d: waiter %d (%s, source %d): %" PRId64
                    ", then %" PRId64 ", %d wakes\n",
                    round, i, kind_names[w->kind], w->src, w->result, w->again,
                    w->wakes);
      assert_i64_eq(w->result, -ECANCELED);
      assert_i64_eq(w->again, -ECANCELED);
      assert_int_equal(w->wakes, 1);
      int64_t late = w->t_end - rd->t_cancel[w->src];
      if (late > worst)
        worst = late;
      assert_i64_lt(late, bound);
    }

    /* The joined threads are still joinable; release and reap. */
    for (int i = 0; i < WAITERS; i++)
      if (rd->w[i].kind == K_JOIN)
        sem_post(&rd->release);
    for (int i = 0; i < WAITERS; i++) {
      struct waiter *w = &rd->w[i];
      if (w->kind == K_JOIN) {
        void *ret = NULL;
        assert_int_equal(
            cancel_thread_join(NULL, &w->target, &ret, CANCEL_NEVER), 0);
        assert_ptr_equal(ret, (void *)(uintptr_t)0xabc);
      }
      if (w->p[0] >= 0) {
        /* The cancelled read took nothing, the write wrote nothing. */
        if (w->kind != K_WRITE) {
          struct pollfd p = {w->p[0], POLLIN, 0};
          assert_int_equal(poll(&p, 1, 0), 0);
        }
        close(w->p[0]);
        close(w->p[1]);
      }
    }
    assert_int_equal(cancel_sem_trywait(&rd->sem), -EAGAIN);
    for (int s = SOURCES - 1; s >= 0; s--)
      cancel_source_unref(rd->src[s]);
    pthread_mutex_destroy(&rd->mu);
    pthread_cond_destroy(&rd->cond);
    sem_destroy(&rd->ready);
    sem_destroy(&rd->done);
    sem_destroy(&rd->release);

    /* The first round warms up the per-thread primitives' machinery. */
    if (round == 0)
      base_fds = test_fd_count();
    else
      assert_int_equal(test_fd_count(), base_fds);
    done_rounds++;
    if (done_rounds >= 20 && cancel_now() > budget_end)
      break;
  }
  free(rd);
  cancel_source_unref(pin);
  print_message("      %d rounds of %d waiters, worst cancel-to-wake %.1f ms\n",
                done_rounds, WAITERS, (double)worst / 1e6);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_mixed_waits_cancelled_in_random_order),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
