/*
 * fork(): what the child holds (cancel.h, section "fork()"), each kind
 * tested with a real fork() and a real child process.  The child never
 * calls cmocka: it reports through its exit status (0, or the number of
 * the step that failed), which the parent checks; a child that crashes or
 * hangs fails the test in the parent.
 *
 *   - Waits: a parent thread blocked in cancel_sleep, cancel_cond_wait,
 *     cancel_poll or cancel_read on a token; fork from another thread; the
 *     child starts threads (which reuse the dead thread's stack and zero
 *     its thread-locals), blocks threads of its own on the token, then
 *     cancels it: no crash, and its own waits return -ECANCELED.  (Before,
 *     the dead thread's registration stayed on the source: the child's
 *     cancel called through a zeroed function pointer, or, once a thread
 *     of the child registered the same thread-local anew, looped for
 *     ever.)
 *   - Timers: one armed before fork() does not fire in the child, even
 *     once the child's internal thread runs; its deadline is still
 *     reported, and re-armed in the child it fires there.
 *   - Token descriptors: the child's are its own, in both directions.
 *   - Hang-up watches: not armed in the child; its own work.
 *
 * Scopes after fork() are tested in diag_test (test_fork_child_scans_itself).
 * ThreadSanitizer cannot start threads in the child of a multi-threaded
 * process: the cases that need one are skipped there.
 */
#include "test_util.h"

#include "cancel/watch.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/wait.h>


#define LONG_WAIT CANCEL_SEC(60) /* longer than any test: only a cancel */

/* ---- The child -------------------------------------------------------- */

typedef int child_fn(void *arg);


/* Runs fn(arg) in a child and returns its exit status, or fails the test:
 * the child crashed (a signal), or did not exit in time (killed). */
static int run_child(child_fn *fn, void *arg) {
  /* No other thread may hold a lock the child needs (malloc's, with
   * gcc 12's ASan): fork only once they are all asleep. */
  assert_true(test_others_asleep(test_tol(CANCEL_SEC(5))));
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    test_child_enter();
    _exit(fn(arg));
  }
  int st = 0;
  int64_t give_up = cancel_now() + test_tol(CANCEL_SEC(20));
  pid_t r;
  while ((r = waitpid(pid, &st, WNOHANG)) == 0 && cancel_now() < give_up)
    test_sleep_ns(CANCEL_MSEC(2));
  if (r == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
    fail_msg("the child did not exit in time (a hang)");
  }
  assert_int_equal(r, pid);
  if (WIFSIGNALED(st))
    fail_msg("the child died of signal %d (%s)", WTERMSIG(st),
             strsignal(WTERMSIG(st)));
  assert_true(WIFEXITED(st));
  if (WEXITSTATUS(st) != 0)
    print_error("the child failed at step %d\n", WEXITSTATUS(st));
  return WEXITSTATUS(st);
}

/* In the child: start and join threads, so that their stacks (and
 * thread-locals, zeroed) are the parent's dead threads'.  0 or -1. */
static void *scribble_main(void *arg) {
  (void)arg;
  volatile char buf[16 * 1024];
  memset((char *)buf, 0xa5, sizeof buf);
  return NULL;
}

static int reuse_stacks(void) {
  for (int i = 0; i < 4; i++) {
    pthread_t t;
    if (pthread_create(&t, NULL, scribble_main, NULL) != 0)
      return -1;
    pthread_join(t, NULL);
  }
  return 0;
}

/* Waits (polling /proc) until thread tid sleeps in the kernel. */
static bool child_blocked(pid_t tid) {
  return test_wait_blocked(tid, test_tol(CANCEL_SEC(5)));
}

/* ---- A thread blocked in a wait --------------------------------------- */

enum wait_kind { W_SLEEP, W_COND, W_POLL, W_READ };

static const char *const kind_names[] = {"cancel_sleep", "cancel_cond_wait",
                                         "cancel_poll", "cancel_read"};

struct parked {
  int kind;
  const cancel_token *tok;
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int pipe[2]; /* never written: never readable */
  sem_t ready; /* posted just before the wait */
  pid_t tid;   /* atomic */
  int result;  /* atomic: INT32_MIN until the wait returned */
};

static int parked_init(struct parked *p, int kind, const cancel_token *tok) {
  memset(p, 0, sizeof *p);
  p->kind = kind;
  p->tok = tok;
  p->result = INT32_MIN;
  if (pthread_mutex_init(&p->mu, NULL) != 0 ||
      pthread_cond_init(&p->cond, NULL) != 0 || sem_init(&p->ready, 0, 0) != 0 ||
      pipe2(p->pipe, O_CLOEXEC) != 0)
    return -1;
  return 0;
}

static void parked_destroy(struct parked *p) {
  close(p->pipe[0]);
  close(p->pipe[1]);
  sem_destroy(&p->ready);
  pthread_cond_destroy(&p->cond);
  pthread_mutex_destroy(&p->mu);
}

static void *parked_main(void *arg) {
  struct parked *p = arg;
  __atomic_store_n(&p->tid, test_gettid(), __ATOMIC_RELEASE);
  int64_t deadline = cancel_now() + LONG_WAIT;
  int rc = 0;
  switch (p->kind) {
  case W_SLEEP:
    sem_post(&p->ready);
    rc = cancel_sleep(p->tok, LONG_WAIT);
    break;
  case W_COND:
    pthread_mutex_lock(&p->mu);
    sem_post(&p->ready);
    do /* nobody signals the condition: 0 is a spurious wake-up */
      rc = cancel_cond_wait(p->tok, &p->cond, &p->mu, deadline);
    while (rc == 0);
    pthread_mutex_unlock(&p->mu);
    break;
  case W_POLL: {
    struct pollfd pfd = {.fd = p->pipe[0], .events = POLLIN};
    sem_post(&p->ready);
    rc = cancel_poll(p->tok, &pfd, 1, deadline);
    break;
  }
  case W_READ: {
    char c;
    sem_post(&p->ready);
    rc = (int)cancel_read(p->tok, p->pipe[0], &c, 1, deadline);
    break;
  }
  }
  __atomic_store_n(&p->result, rc, __ATOMIC_RELEASE);
  return NULL;
}

/* ---- Waits ------------------------------------------------------------ */

struct waits_case {
  int kind;
  cancel_source *src; /* the parent's parked thread waits on it */
  bool bare;          /* the child cancels with no wait of its own */
};

enum { CHILD_WAITERS = 2 };

static int child_waits(void *arg) {
  struct waits_case *c = arg;
#ifdef TEST_TSAN
  /* Only the bare case runs here, without threads: what it still checks
   * is that the child's cancel does not reach the dead thread's wait. */
#else
  if (reuse_stacks() != 0)
    return 10;
#endif
  if (cancel_token_is_cancelled(TOK(c->src)))
    return 11;
  if (c->bare) {
    /* Nothing of the child's on the token: the cancel finds only what
     * came from the parent (the dead thread's registration, zeroed). */
    if (cancel_source_cancel(c->src) != 1)
      return 20;
    return cancel_sleep(TOK(c->src), LONG_WAIT) == -ECANCELED ? 0 : 21;
  }
  /* The child's own waits on the inherited token: threads that reuse the
   * dead thread's stack once more. */
  struct parked mine[CHILD_WAITERS];
  pthread_t t[CHILD_WAITERS];
  for (int i = 0; i < CHILD_WAITERS; i++) {
    if (parked_init(&mine[i], c->kind, TOK(c->src)) != 0)
      return 12;
    if (pthread_create(&t[i], NULL, parked_main, &mine[i]) != 0)
      return 13;
    while (sem_wait(&mine[i].ready) != 0) {
    }
    if (!child_blocked(__atomic_load_n(&mine[i].tid, __ATOMIC_ACQUIRE)))
      return 14;
  }
  /* A wait of the child's main thread that ends by its deadline. */
  int64_t t0 = cancel_now();
  if (cancel_sleep(TOK(c->src), CANCEL_MSEC(5)) != 0 ||
      cancel_now() - t0 < CANCEL_MSEC(5))
    return 15;
  int64_t t_cancel = cancel_now();
  if (cancel_source_cancel(c->src) != 1)
    return 16;
  for (int i = 0; i < CHILD_WAITERS; i++) {
    pthread_join(t[i], NULL);
    if (__atomic_load_n(&mine[i].result, __ATOMIC_ACQUIRE) != -ECANCELED)
      return 17;
    parked_destroy(&mine[i]);
  }
  if (cancel_now() - t_cancel > test_tol(CANCEL_SEC(2)))
    return 18;
  /* Level-triggered in the child too. */
  if (cancel_sleep(TOK(c->src), LONG_WAIT) != -ECANCELED)
    return 19;
  return 0;
}

static void check_fork_during_wait(int kind, bool bare) {
  if (!bare)
    TEST_SKIP_UNDER_TSAN();
  cancel_source *s = new_src("forked");
  struct parked p;
  assert_int_equal(parked_init(&p, kind, TOK(s)), 0);
  pthread_t t = test_thread_start(parked_main, &p);
  assert_int_equal(test_sem_wait_ns(&p.ready, test_tol(CANCEL_SEC(5))), 0);
  assert_true(test_wait_blocked(__atomic_load_n(&p.tid, __ATOMIC_ACQUIRE),
                                test_tol(CANCEL_SEC(5))));
  print_message("a parent thread blocked in %s\n", kind_names[kind]);
  struct waits_case c = {kind, s, bare};
  int status = run_child(child_waits, &c);
  /* Whatever the child did, the parent's thread is woken by the parent's
   * cancel, and only by it. */
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(__atomic_load_n(&p.result, __ATOMIC_ACQUIRE), INT32_MIN);
  assert_int_equal(cancel_source_cancel(s), 1);
  test_thread_join(t);
  assert_int_equal(p.result, -ECANCELED);
  parked_destroy(&p);
  cancel_source_unref(s);
  assert_int_equal(status, 0);
}

static void test_fork_during_sleep(void **state) {
  (void)state;
  check_fork_during_wait(W_SLEEP, false);
}

static void test_fork_during_cond_wait(void **state) {
  (void)state;
  check_fork_during_wait(W_COND, false);
}

static void test_fork_during_poll(void **state) {
  (void)state;
  check_fork_during_wait(W_POLL, false);
}

static void test_fork_during_read(void **state) {
  (void)state;
  check_fork_during_wait(W_READ, false);
}

/* The child cancels the token at once, after its threads have reused the
 * dead thread's stack (before: SIGSEGV, a call through a zeroed pointer). */
static void test_fork_during_sleep_child_cancels(void **state) {
  (void)state;
  check_fork_during_wait(W_SLEEP, true);
}

/* ---- Timers ------------------------------------------------------------ */

#define TIMER_AFTER CANCEL_MSEC(200)

struct timer_case {
  cancel_source *armed; /* armed TIMER_AFTER before the fork */
  int64_t deadline;     /* its deadline */
};

static int child_timers(void *arg) {
  struct timer_case *c = arg;
  if (reuse_stacks() != 0)
    return 10;
  /* The child's internal thread runs (a timer of its own, far off): the
   * parent's timer must not come back with it. */
  cancel_source *own = NULL;
  if (cancel_source_new(&own, "child's") != 0)
    return 11;
  if (cancel_source_cancel_after(own, CANCEL_SEC(30)) != 0)
    return 12;
  /* Well past the parent's deadline: not cancelled here. */
  int64_t t0 = cancel_now();
  int rc = cancel_sleep(TOK(c->armed), 3 * TIMER_AFTER);
  if (rc != 0)
    return rc == -ECANCELED ? 13 : 14;
  if (cancel_now() - t0 < 3 * TIMER_AFTER || cancel_now() < c->deadline)
    return 15;
  /* The deadline is still reported (nothing enforces it). */
  if (cancel_token_deadline(TOK(c->armed)) != c->deadline)
    return 16;
  /* Re-armed in the child, it fires there. */
  if (cancel_source_cancel_at(c->armed, cancel_now() + CANCEL_MSEC(20)) != 0)
    return 17;
  t0 = cancel_now();
  if (cancel_sleep(TOK(c->armed), test_tol(CANCEL_SEC(5))) != -ECANCELED)
    return 18;
  if (cancel_token_kind(TOK(c->armed)) != CANCEL_TIMEOUT)
    return 19;
  if (cancel_token_is_cancelled(TOK(own)))
    return 20;
  cancel_source_unref(own);
  return 0;
}

/* A worker with a caller-storage source on its stack, armed, waiting on
 * it: in the child that memory is another thread's. */
static void *stack_timer_main(void *arg) {
  sem_t *ready = arg;
  cancel_source s;
  assert_int_equal(cancel_source_init(&s, "on a stack"), 0);
  assert_int_equal(cancel_source_cancel_after(&s, TIMER_AFTER), 0);
  sem_post(ready);
  int rc = cancel_sleep(TOK(&s), LONG_WAIT);
  cancel_source_destroy(&s);
  return (void *)(intptr_t)rc;
}

static void test_fork_timer_not_armed_in_child(void **state) {
  (void)state;
  TEST_SKIP_UNDER_TSAN();
  cancel_source *a = new_src("pre-fork timer");
  sem_t ready;
  sem_init(&ready, 0, 0);
  pthread_t t = test_thread_start(stack_timer_main, &ready);
  assert_int_equal(test_sem_wait_ns(&ready, test_tol(CANCEL_SEC(5))), 0);
  assert_int_equal(cancel_source_cancel_after(a, TIMER_AFTER), 0);
  struct timer_case c = {a, cancel_token_deadline(TOK(a))};
  assert_true(c.deadline != CANCEL_NEVER);
  int status = run_child(child_timers, &c);
  /* In the parent both fired as armed. */
  assert_int_equal(cancel_sleep(TOK(a), test_tol(CANCEL_SEC(5))), -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(a)), CANCEL_TIMEOUT);
  assert_int_equal((int)(intptr_t)test_thread_join(t), -ECANCELED);
  sem_destroy(&ready);
  cancel_source_unref(a);
  assert_int_equal(status, 0);
}

/* ---- Token descriptors ------------------------------------------------- */

static bool readable(int fd, int ms) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  return poll(&p, 1, ms) == 1 && (p.revents & POLLIN);
}

struct tokenfd_case {
  cancel_source *x, *y, *z; /* z fired before the fork */
  int fx, fy, fz;
  int to_parent[2], to_child[2];
};

static int child_tokenfds(void *arg) {
  struct tokenfd_case *c = arg;
  close(c->to_parent[0]);
  close(c->to_child[1]);
  if (cancel_token_fd(TOK(c->x)) != c->fx || cancel_token_fd(TOK(c->y)) != c->fy)
    return 10; /* the same numbers */
  if (readable(c->fx, 0) || readable(c->fy, 0))
    return 11;
  if (!readable(c->fz, 0))
    return 12; /* fired before: readable in the child too */
  /* The child cancels y: its descriptor, not the parent's. */
  if (cancel_source_cancel(c->y) != 1 || !readable(c->fy, 0))
    return 13;
  char b = 1;
  if (write(c->to_parent[1], &b, 1) != 1)
    return 14;
  /* The parent cancels x meanwhile: not ours. */
  if (read(c->to_child[0], &b, 1) != 1)
    return 15;
  if (readable(c->fx, 50) || cancel_token_is_cancelled(TOK(c->x)))
    return 16;
  if (cancel_source_cancel(c->x) != 1 || !readable(c->fx, 0))
    return 17;
  return 0;
}

static void test_fork_token_fd_is_the_childs(void **state) {
  (void)state;
  struct tokenfd_case c;
  c.x = new_src("x");
  c.y = new_src("y");
  c.z = new_src("z");
  c.fx = cancel_token_fd(TOK(c.x));
  c.fy = cancel_token_fd(TOK(c.y));
  c.fz = cancel_token_fd(TOK(c.z));
  assert_true(c.fx >= 0 && c.fy >= 0 && c.fz >= 0);
  assert_int_equal(cancel_source_cancel(c.z), 1);
  assert_int_equal(pipe2(c.to_parent, O_CLOEXEC), 0);
  assert_int_equal(pipe2(c.to_child, O_CLOEXEC), 0);
  /* The parent's side of the exchange runs on a thread, while run_child
   * waits for the child on this one. */
  struct pollfd p = {.fd = c.to_parent[0], .events = POLLIN};
  assert_true(test_others_asleep(test_tol(CANCEL_SEC(5))));
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    test_child_enter();
    _exit(child_tokenfds(&c));
  }
  close(c.to_parent[1]);
  close(c.to_child[0]);
  bool got = poll(&p, 1, (int)(test_tol(CANCEL_SEC(10)) / 1000000)) == 1;
  char b = 0;
  if (got)
    got = read(c.to_parent[0], &b, 1) == 1;
  bool y_leaked = false, x_ok = false;
  if (got) {
    /* The child's cancel of y did not reach the parent's descriptor. */
    y_leaked = readable(c.fy, 20) || cancel_token_is_cancelled(TOK(c.y));
    x_ok = cancel_source_cancel(c.x) == 1 && readable(c.fx, 0);
    b = 2;
    assert_int_equal(write(c.to_child[1], &b, 1), 1);
  }
  close(c.to_child[1]);
  close(c.to_parent[0]);
  int st = 0;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  assert_true(got);
  assert_false(y_leaked);
  assert_true(x_ok);
  if (WIFSIGNALED(st))
    fail_msg("the child died of signal %d", WTERMSIG(st));
  assert_true(WIFEXITED(st));
  if (WEXITSTATUS(st) != 0)
    print_error("the child failed at step %d\n", WEXITSTATUS(st));
  assert_int_equal(WEXITSTATUS(st), 0);
  /* The child's cancel of x did not reach us either: still readable (it
   * fired here), and y still is not. */
  assert_false(readable(c.fy, 0));
  cancel_source_unref(c.x);
  cancel_source_unref(c.y);
  cancel_source_unref(c.z);
}

/* ---- Hang-up watches ---------------------------------------------------- */

struct watch_case {
  cancel_watch *w; /* armed in the parent on s, socket a */
  cancel_source *s;
  int a, b; /* a socket pair: b is the peer */
};

static int child_watch(void *arg) {
  struct watch_case *c = arg;
  close(c->b); /* the parent closes its copy too: the peer is gone */
  /* Once the hang-up shows on the socket, the parent's watch, not armed
   * here, has had its chance: the child's copy is not cancelled. */
  struct pollfd p = {.fd = c->a, .events = POLLRDHUP};
  if (poll(&p, 1, (int)(test_tol(CANCEL_SEC(5)) / 1000000)) != 1)
    return 8;
  if (cancel_sleep(TOK(c->s), CANCEL_MSEC(50)) != 0)
    return 9;
#ifndef TEST_TSAN
  cancel_watch mine = {0};
  if (cancel_watch_hangup(&mine, c->s, c->a) != 0)
    return 10;
  /* Ours fires (once the parent's copy of the peer is closed too). */
  if (cancel_sleep(TOK(c->s), test_tol(CANCEL_SEC(5))) != -ECANCELED)
    return 11;
  if (cancel_token_kind(TOK(c->s)) != CANCEL_CLIENT_GONE)
    return 12;
  if (cancel_unwatch(&mine) != 0)
    return 13; /* it fired */
#endif
  /* The parent's watch: released here, and it did not fire here. */
  if (cancel_unwatch(c->w) != 1)
    return 14;
  return 0;
}

static void test_fork_hangup_watch_not_armed_in_child(void **state) {
  (void)state;
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  cancel_source *s = new_src("request");
  cancel_watch w = {0};
  assert_int_equal(cancel_watch_hangup(&w, s, sv[0]), 0);
  struct watch_case c = {&w, s, sv[0], sv[1]};
  /* The parent closes its copy of the peer while the child runs: after
   * the fork, before waiting. */
  assert_true(test_others_asleep(test_tol(CANCEL_SEC(5))));
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    test_child_enter();
    _exit(child_watch(&c));
  }
  close(sv[1]);
  int st = 0;
  int64_t give_up = cancel_now() + test_tol(CANCEL_SEC(20));
  pid_t r;
  while ((r = waitpid(pid, &st, WNOHANG)) == 0 && cancel_now() < give_up)
    test_sleep_ns(CANCEL_MSEC(2));
  if (r == 0) {
    kill(pid, SIGKILL);
    waitpid(pid, &st, 0);
  }
  /* The parent's watch fired in the parent. */
  assert_int_equal(cancel_sleep(TOK(s), test_tol(CANCEL_SEC(5))), -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_CLIENT_GONE);
  assert_int_equal(cancel_unwatch(&w), 0);
  close(sv[0]);
  cancel_source_unref(s);
  assert_int_equal(r, pid);
  if (WIFSIGNALED(st))
    fail_msg("the child died of signal %d", WTERMSIG(st));
  assert_true(WIFEXITED(st));
  if (WEXITSTATUS(st) != 0)
    print_error("the child failed at step %d\n", WEXITSTATUS(st));
  assert_int_equal(WEXITSTATUS(st), 0);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_fork_during_sleep),
      cmocka_unit_test(test_fork_during_cond_wait),
      cmocka_unit_test(test_fork_during_poll),
      cmocka_unit_test(test_fork_during_read),
      cmocka_unit_test(test_fork_during_sleep_child_cancels),
      cmocka_unit_test(test_fork_timer_not_armed_in_child),
      cmocka_unit_test(test_fork_token_fd_is_the_childs),
      cmocka_unit_test(test_fork_hangup_watch_not_armed_in_child),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
