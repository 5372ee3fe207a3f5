/*
 * The wait contract ("Waiting" in cancel.h), one table over every blocking
 * call of the public core: cancel_sleep, cancel_sleep_until, cancel_poll,
 * cancel_wait_fd, cancel_read, cancel_write, cancel_read_full,
 * cancel_write_full, cancel_recv, cancel_send, cancel_accept,
 * cancel_connect, cancel_cond_wait, cancel_sem_wait, cancel_thread_join and
 * cancel_child_wait.  Each goes through the same rows, each its own cmocka
 * test named "<wait>/<row>":
 *   completes         made ready while the waiter is blocked (the sleeps:
 *                     the time is up): its success, promptly, never early;
 *   cancelled_blocked cancelled (kind, detail) once the waiter is seen
 *                     asleep: -ECANCELED promptly, and the woken waiter
 *                     reads the reason the canceller gave;
 *   cancelled_before  the token fired before the call: -ECANCELED at once
 *                     although the call's deadline is a second away; where
 *                     the wait can be made ready and asked again, also
 *                     when it is ready, and then the readiness is still
 *                     there for the next call (nothing consumed);
 *   deadline          -ETIMEDOUT at the call's deadline (the sleeps: 0, the
 *                     time is up), not before and promptly, token live;
 *   eintr             a storm of SIGUSR1 (no SA_RESTART) aimed at the
 *                     blocked waiter does not end the wait: it returns only
 *                     once made ready (the sleeps: once the time is up).
 * Not here: cancel_token_settle (it blocks only near a token's deadline:
 * settle_test.c) and the adapters' waits, which need their library and a
 * server (curl_test, sqlite_test, pq_test).  The per-wait details live in
 * the files named after the sources: wait_test, io_test, cond_test,
 * sem_test, thread_test, process_test.
 *
 * CANCEL_TEST_FILTER / CANCEL_TEST_SKIP (cmocka globs on the test names)
 * run or skip a subset, e.g. CANCEL_TEST_SKIP='connect*'.
 */
#include "test_util.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>

#include "cancel/process.h"

/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)
#define AT_ONCE CANCEL_MSEC(20)
/* A connect made ready (its listener's queue freed) completes when the
 * kernel retries its SYN: 1 s after the first. */
#define CONNECT_LATE CANCEL_SEC(3)

/* How long the storm blows: long enough, on a slow or loaded machine too,
 * to land a few signals in the wait. */
static int64_t storm_window(void) {
  return test_tol(CANCEL_MSEC(40));
}

/* Everything one wait uses.  Allocated by ctx_new() and freed by
 * ctx_free(): a test that fails in between leaks it on purpose, since the
 * waiter, the joined thread or the child it holds may still use it (the
 * teardown stops the waiter; nothing may then reuse its memory). */
struct wctx {
  const struct waitop *op;
  const cancel_token *tok;
  int64_t deadline; /* the call's */
  int64_t ready_at; /* the sleeps: when the time is up */
  int fd[2];        /* pipe (read end, write end) or socket pair */
  int lfd;          /* accept, connect: the listener */
  int cfd;          /* accept: the client; connect: the connecting socket */
  int queued;       /* connect: the connection that fills the queue */
  struct sockaddr_in addr;
  pthread_mutex_t m;
  pthread_cond_t c;
  int flag; /* the condition's predicate, under m */
  cancel_sem sem;
  cancel_thread th;
  sem_t release;
  bool thread_live; /* started and not joined */
  cancel_child child;
  int status;
  char buf[64];
  size_t done;
  cancel_reason reason; /* as the waiter read it after -ECANCELED */
  int reason_rc;
};

struct waitop {
  const char *name;
  void (*setup)(struct wctx *x);
  int64_t (*call)(struct wctx *x);
  /* Makes the wait's condition true from another thread; NULL for the
   * sleeps, which complete at x->ready_at. */
  void (*ready)(struct wctx *x);
  /* Asserts that r is the success the ready condition gives. */
  void (*check_done)(struct wctx *x, int64_t r);
  void (*teardown)(struct wctx *x);
  int64_t late; /* how soon it completes once made ready */
  /* A ready wait may be asked again: a call that found the token
   * cancelled must have left the readiness for it. */
  bool repeatable;
};

/* ---- Helpers ------------------------------------------------------------ */

static void set_nonblock(int fd, bool on) {
  int fl = fcntl(fd, F_GETFL);
  assert_true(fl >= 0);
  fl = on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK;
  assert_int_equal(fcntl(fd, F_SETFL, fl), 0);
}

static void close_fd(int *fd) {
  if (*fd >= 0)
    close(*fd);
  *fd = -1;
}

static void close_pair(struct wctx *x) {
  close_fd(&x->fd[0]);
  close_fd(&x->fd[1]);
}

static void put4(int fd) {
  assert_int_equal(write(fd, "abcd", 4), 4);
}

/* A 4096-byte pipe, full: a write blocks until it is drained. */
static void setup_full_pipe(struct wctx *x) {
  assert_int_equal(pipe2(x->fd, O_CLOEXEC), 0);
  assert_true(fcntl(x->fd[1], F_SETPIPE_SZ, 4096) >= 4096);
  set_nonblock(x->fd[1], true);
  char chunk[512] = {0};
  while (write(x->fd[1], chunk, sizeof chunk) > 0) {
  }
  assert_int_equal(errno, EAGAIN);
  set_nonblock(x->fd[1], false);
}

static void drain(int fd) {
  char big[65536];
  set_nonblock(fd, true);
  while (read(fd, big, sizeof big) > 0) {
  }
  set_nonblock(fd, false);
}

static void setup_pipe(struct wctx *x) {
  assert_int_equal(pipe2(x->fd, O_CLOEXEC), 0);
}

static void setup_pair(struct wctx *x) {
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, x->fd),
                   0);
}

/* A socket pair whose x->fd[0] cannot send until x->fd[1] reads. */
static void setup_full_pair(struct wctx *x) {
  setup_pair(x);
  int small = 4096;
  assert_int_equal(
      setsockopt(x->fd[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small), 0);
  char chunk[512] = {0};
  while (send(x->fd[0], chunk, sizeof chunk, MSG_DONTWAIT) > 0) {
  }
  assert_int_equal(errno, EAGAIN);
}

static void ready_pipe(struct wctx *x) {
  put4(x->fd[1]);
}

static void ready_drain(struct wctx *x) {
  drain(x->fd[0]);
}

static void ready_drain_pair(struct wctx *x) {
  drain(x->fd[1]);
}

/* A TCP listener on 127.0.0.1 (a port of the kernel's choice). */
static void listen_local(struct wctx *x, int backlog) {
  x->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(x->lfd >= 0);
  x->addr = (struct sockaddr_in){.sin_family = AF_INET,
                                 .sin_addr.s_addr = htonl(INADDR_LOOPBACK)};
  assert_int_equal(bind(x->lfd, (struct sockaddr *)&x->addr, sizeof x->addr),
                   0);
  socklen_t len = sizeof x->addr;
  assert_int_equal(getsockname(x->lfd, (struct sockaddr *)&x->addr, &len), 0);
  assert_int_equal(listen(x->lfd, backlog), 0);
}

static int connect_local(const struct wctx *x) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(fd >= 0);
  assert_int_equal(
      connect(fd, (const struct sockaddr *)&x->addr, sizeof x->addr), 0);
  return fd;
}

static void teardown_pair(struct wctx *x) {
  close_pair(x);
}

/* ---- The waits ---------------------------------------------------------- */

static int64_t call_sleep(struct wctx *x) {
  int64_t ns = x->ready_at == CANCEL_NEVER ? CANCEL_NEVER - cancel_now()
                                           : x->ready_at - cancel_now();
  return cancel_sleep(x->tok, ns < 0 ? 0 : ns);
}

static int64_t call_sleep_until(struct wctx *x) {
  return cancel_sleep_until(x->tok, x->ready_at);
}

static void check_slept(struct wctx *x, int64_t r) {
  assert_i64_eq(r, 0);
  assert_i64_ge(cancel_now(), x->ready_at);
}

static int64_t call_poll(struct wctx *x) {
  struct pollfd p = {x->fd[0], POLLIN, 0};
  int r = cancel_poll(x->tok, &p, 1, x->deadline);
  if (r > 0 && !(p.revents & POLLIN))
    return -1000; /* ready for something else */
  return r;
}

static void check_one(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_eq(r, 1);
}

static int64_t call_wait_fd(struct wctx *x) {
  return cancel_wait_fd(x->tok, x->fd[0], POLLIN, x->deadline);
}

static void check_pollin(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_gt(r, 0);
  assert_true(r & POLLIN);
}

static int64_t call_read(struct wctx *x) {
  return cancel_read(x->tok, x->fd[0], x->buf, 4, x->deadline);
}

static void check_four(struct wctx *x, int64_t r) {
  assert_i64_eq(r, 4);
  assert_memory_equal(x->buf, "abcd", 4);
  memset(x->buf, 0, sizeof x->buf);
}

static int64_t call_read_full(struct wctx *x) {
  x->done = 99;
  return cancel_read_full(x->tok, x->fd[0], x->buf, 4, x->deadline, &x->done);
}

static void check_full_four(struct wctx *x, int64_t r) {
  assert_int_equal(x->done, 4);
  check_four(x, r);
}

static int64_t call_write(struct wctx *x) {
  return cancel_write(x->tok, x->fd[1], "wxyz", 4, x->deadline);
}

static void check_wrote(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_eq(r, 4);
}

static int64_t call_write_full(struct wctx *x) {
  x->done = 99;
  return cancel_write_full(x->tok, x->fd[1], "wxyz", 4, x->deadline, &x->done);
}

static void check_wrote_full(struct wctx *x, int64_t r) {
  assert_i64_eq(r, 4);
  assert_int_equal(x->done, 4);
}

static int64_t call_recv(struct wctx *x) {
  return cancel_recv(x->tok, x->fd[0], x->buf, 4, 0, x->deadline);
}

static int64_t call_send(struct wctx *x) {
  return cancel_send(x->tok, x->fd[0], "wxyz", 4, MSG_NOSIGNAL, x->deadline);
}

static void check_sent(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_gt(r, 0);
}

static void setup_accept(struct wctx *x) {
  listen_local(x, 8);
  x->cfd = -1;
}

static int64_t call_accept(struct wctx *x) {
  return cancel_accept(x->tok, x->lfd, NULL, NULL, SOCK_CLOEXEC, x->deadline);
}

static void ready_accept(struct wctx *x) {
  x->cfd = connect_local(x);
}

static void check_accepted(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_ge(r, 0);
  close((int)r);
}

static void teardown_accept(struct wctx *x) {
  close_fd(&x->cfd);
  close_fd(&x->lfd);
}

/* A listener with a backlog of 0 and one connection queued: the next SYN
 * is dropped (no traffic leaves loopback), so a connect stays in progress
 * until the queue is freed and the SYN retried. */
static void setup_connect(struct wctx *x) {
  listen_local(x, 0);
  x->queued = connect_local(x);
  struct pollfd p = {x->lfd, POLLIN, 0};
  assert_int_equal(poll(&p, 1, 5000), 1);
  x->cfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(x->cfd >= 0);
}

static int64_t call_connect(struct wctx *x) {
  return cancel_connect(x->tok, x->cfd, (const struct sockaddr *)&x->addr,
                        sizeof x->addr, x->deadline);
}

static void ready_connect(struct wctx *x) {
  int a = accept4(x->lfd, NULL, NULL, SOCK_CLOEXEC);
  assert_true(a >= 0);
  close(a);
}

static void check_connected(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_eq(r, 0);
}

static void teardown_connect(struct wctx *x) {
  close_fd(&x->cfd);
  close_fd(&x->queued);
  close_fd(&x->lfd);
}

static void setup_cond(struct wctx *x) {
  pthread_condattr_t ca;
  pthread_condattr_init(&ca);
  pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
  assert_int_equal(pthread_cond_init(&x->c, &ca), 0);
  pthread_condattr_destroy(&ca);
  assert_int_equal(pthread_mutex_init(&x->m, NULL), 0);
}

/* Waits at least once (a predicate already true would skip the call the
 * contract is about), then until the predicate holds. */
static int64_t call_cond(struct wctx *x) {
  pthread_mutex_lock(&x->m);
  int r;
  do
    r = cancel_cond_wait(x->tok, &x->c, &x->m, x->deadline);
  while (r == 0 && !x->flag);
  pthread_mutex_unlock(&x->m);
  return r;
}

static void ready_cond(struct wctx *x) {
  pthread_mutex_lock(&x->m);
  x->flag = 1;
  pthread_cond_signal(&x->c);
  pthread_mutex_unlock(&x->m);
}

static void check_zero(struct wctx *x, int64_t r) {
  (void)x;
  assert_i64_eq(r, 0);
}

static void teardown_cond(struct wctx *x) {
  pthread_cond_destroy(&x->c);
  pthread_mutex_destroy(&x->m);
}

static void setup_sem(struct wctx *x) {
  assert_int_equal(cancel_sem_init(&x->sem, 0), 0);
}

static int64_t call_sem(struct wctx *x) {
  return cancel_sem_wait(x->tok, &x->sem, x->deadline);
}

static void ready_sem(struct wctx *x) {
  assert_int_equal(cancel_sem_post(&x->sem), 0);
}

static void check_took(struct wctx *x, int64_t r) {
  assert_i64_eq(r, 0);
  assert_int_equal(cancel_sem_trywait(&x->sem), -EAGAIN);
}

/* The joined thread: ends when the test posts `release`. */
static void *held_thread(void *arg) {
  struct wctx *x = arg;
  while (sem_wait(&x->release) != 0) {
  }
  return x;
}

static void setup_thread(struct wctx *x) {
  sem_init(&x->release, 0, 0);
  assert_int_equal(cancel_thread_create(&x->th, NULL, held_thread, x), 0);
  x->thread_live = true;
}

static int64_t call_join(struct wctx *x) {
  void *ret = NULL;
  int r = cancel_thread_join(x->tok, &x->th, &ret, x->deadline);
  if (r == 0) {
    x->thread_live = false;
    if (ret != x)
      return -1000; /* joined, with the wrong result */
  }
  return r;
}

static void ready_thread(struct wctx *x) {
  sem_post(&x->release);
}

static void teardown_thread(struct wctx *x) {
  if (x->thread_live) {
    sem_post(&x->release);
    assert_int_equal(cancel_thread_join(NULL, &x->th, NULL, CANCEL_NEVER), 0);
  }
  sem_destroy(&x->release);
}

static void setup_child(struct wctx *x) {
  assert_int_equal(cancel_child_spawnp(&x->child, "sleep",
                                       (char *[]){"sleep", "30", NULL}, NULL),
                   0);
}

static int64_t call_child(struct wctx *x) {
  x->status = -1;
  return cancel_child_wait(x->tok, &x->child, CANCEL_SEC(5), x->deadline,
                           &x->status);
}

/* The child "completes" by dying of a signal the library never sends. */
static void ready_child(struct wctx *x) {
  assert_int_equal(kill(x->child.pid, SIGUSR2), 0);
}

static void check_reaped(struct wctx *x, int64_t r) {
  assert_i64_eq(r, 0);
  assert_true(WIFSIGNALED(x->status));
  assert_int_equal(WTERMSIG(x->status), SIGUSR2);
}

static void teardown_child(struct wctx *x) {
  /* -ECHILD when a wait reaped it already. */
  int r = cancel_child_kill(&x->child, 0, NULL);
  assert_true(r == 0 || r == -ECHILD);
}

static const struct waitop ops[] = {
    {"sleep", NULL, call_sleep, NULL, check_slept, NULL, LATE, false},
    {"sleep_until", NULL, call_sleep_until, NULL, check_slept, NULL, LATE,
     false},
    {"poll", setup_pipe, call_poll, ready_pipe, check_one, teardown_pair, LATE,
     true},
    {"wait_fd", setup_pipe, call_wait_fd, ready_pipe, check_pollin,
     teardown_pair, LATE, true},
    {"read", setup_pipe, call_read, ready_pipe, check_four, teardown_pair, LATE,
     true},
    {"write", setup_full_pipe, call_write, ready_drain, check_wrote,
     teardown_pair, LATE, true},
    {"read_full", setup_pipe, call_read_full, ready_pipe, check_full_four,
     teardown_pair, LATE, true},
    {"write_full", setup_full_pipe, call_write_full, ready_drain,
     check_wrote_full, teardown_pair, LATE, true},
    {"recv", setup_pair, call_recv, ready_pipe, check_four, teardown_pair, LATE,
     true},
    {"send", setup_full_pair, call_send, ready_drain_pair, check_sent,
     teardown_pair, LATE, true},
    {"accept", setup_accept, call_accept, ready_accept, check_accepted,
     teardown_accept, LATE, true},
    /* Not repeatable: the connect made ready needs the SYN's retry. */
    {"connect", setup_connect, call_connect, ready_connect, check_connected,
     teardown_connect, CONNECT_LATE, false},
    /* Not repeatable: the predicate, not the wait, keeps the readiness. */
    {"cond_wait", setup_cond, call_cond, ready_cond, check_zero, teardown_cond,
     LATE, false},
    {"sem_wait", setup_sem, call_sem, ready_sem, check_took, NULL, LATE, true},
    {"thread_join", setup_thread, call_join, ready_thread, check_zero,
     teardown_thread, LATE, true},
    /* Not repeatable: a cancelled wait reaps a child that exited. */
    {"child_wait", setup_child, call_child, ready_child, check_reaped,
     teardown_child, LATE, false},
};
#define NOPS (sizeof ops / sizeof ops[0])

/* ---- The rows ----------------------------------------------------------- */

static int64_t run_call(void *arg) {
  struct wctx *x = arg;
  int64_t r = x->op->call(x);
  /* Read by the woken waiter itself: the cancel's reason is published
   * before the wake-up (release, then acquire). */
  if (r == -ECANCELED)
    x->reason_rc = cancel_token_reason(x->tok, &x->reason);
  return r;
}

struct row {
  const char *name;
  void (*fn)(void **state);
};

struct entry {
  const struct waitop *op;
  char name[64];
};

static struct wctx *ctx_new(void **state, cancel_source **src) {
  const struct waitop *op = ((struct entry *)*state)->op;
  struct wctx *x = calloc(1, sizeof *x);
  assert_non_null(x);
  x->op = op;
  x->fd[0] = x->fd[1] = x->lfd = x->cfd = x->queued = -1;
  x->deadline = CANCEL_NEVER;
  x->ready_at = CANCEL_NEVER;
  if (op->setup != NULL)
    op->setup(x);
  *src = new_src(op->name);
  x->tok = TOK(*src);
  return x;
}

static void ctx_free(struct wctx *x, cancel_source *src) {
  if (x->op->teardown != NULL)
    x->op->teardown(x);
  cancel_source_unref(src);
  free(x);
}

static void row_completes(void **state) {
  cancel_source *s;
  struct wctx *x = ctx_new(state, &s);
  struct test_waiter w;
  if (x->op->ready == NULL) {
    x->ready_at = cancel_now() + CANCEL_MSEC(30);
    test_waiter_start(&w, run_call, x);
    test_waiter_stop_with(&w, test_rescue_cancel, s);
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), test_rescue_cancel, s);
    assert_elapsed_within(w.t_end - x->ready_at, 0, x->op->late);
  } else {
    test_waiter_block(&w, run_call, x);
    test_waiter_stop_with(&w, test_rescue_cancel, s);
    int64_t t0 = cancel_now();
    x->op->ready(x);
    test_waiter_end(&w, test_tol(x->op->late + CANCEL_SEC(2)),
                    test_rescue_cancel, s);
    assert_i64_lt(w.t_end - t0, test_tol(x->op->late));
  }
  x->op->check_done(x, w.result);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  ctx_free(x, s);
}

static void row_cancelled_blocked(void **state) {
  cancel_source *s;
  struct wctx *x = ctx_new(state, &s);
  struct test_waiter w;
  test_waiter_block(&w, run_call, x);
  test_waiter_stop_with(&w, test_rescue_cancel, s);
  int64_t t_cancel = cancel_now();
  assert_int_equal(cancel_source_cancel_with(s, CANCEL_SHUTDOWN, "contract"),
                   1);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
  assert_int_equal(x->reason_rc, 1);
  assert_int_equal(x->reason.kind, CANCEL_SHUTDOWN);
  assert_string_equal(x->reason.origin, x->op->name);
  assert_string_equal(x->reason.detail, "contract");
  assert_i64_ge(x->reason.time, t_cancel);
  assert_i64_le(x->reason.time, w.t_end);
  ctx_free(x, s);
}

static void row_cancelled_before(void **state) {
  cancel_source *s;
  struct wctx *x = ctx_new(state, &s);
  assert_int_equal(cancel_source_cancel(s), 1);
  /* Not ready: a call that missed the token would block for a second
   * (the sleeps too: the time is up then). */
  x->deadline = cancel_now() + CANCEL_SEC(1);
  x->ready_at = x->deadline;
  struct test_waiter w;
  int64_t t0 = cancel_now();
  test_waiter_start(&w, run_call, x);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
  assert_i64_eq(w.result, -ECANCELED);
  assert_i64_lt(w.t_end - t0, test_tol(AT_ONCE));
  if (x->op->ready != NULL && x->op->repeatable) {
    /* Ready: still -ECANCELED, and the readiness is left for the next
     * call (no token; a thread made ready still has to end). */
    x->op->ready(x);
    t0 = cancel_now();
    assert_i64_eq(x->op->call(x), -ECANCELED);
    assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
    x->tok = NULL;
    x->deadline = cancel_now() + test_tol(CANCEL_SEC(2));
    x->op->check_done(x, x->op->call(x));
  }
  ctx_free(x, s);
}

static void row_deadline(void **state) {
  cancel_source *s;
  struct wctx *x = ctx_new(state, &s);
  int64_t d = cancel_now() + CANCEL_MSEC(20);
  x->deadline = d;
  bool sleeps = x->op->ready == NULL;
  if (sleeps)
    x->ready_at = d; /* a sleep's deadline is the time it is up */
  int64_t r = x->op->call(x);
  int64_t now = cancel_now();
  assert_i64_eq(r, sleeps ? 0 : -ETIMEDOUT);
  assert_i64_ge(now, d);
  assert_i64_lt(now, d + test_tol(LATE));
  assert_false(cancel_token_is_cancelled(TOK(s)));
  ctx_free(x, s);
}

static void row_eintr(void **state) {
  cancel_source *s;
  struct wctx *x = ctx_new(state, &s);
  bool sleeps = x->op->ready == NULL;
  struct test_waiter w;
  struct test_sigstorm storm;
  if (sleeps) {
    /* Up only well after the storm is over: a sleep that a signal ended
     * early returns before ready_at. */
    x->ready_at = cancel_now() + 4 * storm_window() + test_tol(LATE);
    test_waiter_start(&w, run_call, x);
  } else {
    test_waiter_block(&w, run_call, x);
  }
  test_waiter_stop_with(&w, test_rescue_cancel, s);
  test_sigstorm_start(&storm, w.thread, CANCEL_MSEC(1));
  test_sleep_ns(storm_window()); /* to see the wait NOT end */
  /* The storm lands its signals while the wait stays blocked: before a
   * sleep's end, else within a bound a loaded machine meets. */
  (void)test_sigstorm_await(&storm, 2,
                            sleeps ? x->ready_at - storm_window() -
                                         test_tol(LATE)
                                   : cancel_now() + test_tol(CANCEL_SEC(5)));
  int ended = 0;
  sem_getvalue(w.finished, &ended);
  long hits = test_sigstorm_stop(&storm);
  assert_int_equal(ended, 0);
  assert_true(hits >= 2);
  if (sleeps) {
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), test_rescue_cancel, s);
  } else {
    x->op->ready(x);
    test_waiter_end(&w, test_tol(x->op->late + CANCEL_SEC(2)),
                    test_rescue_cancel, s);
  }
  x->op->check_done(x, w.result);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  ctx_free(x, s);
}

static const struct row rows[] = {
    {"completes", row_completes},
    {"cancelled_blocked", row_cancelled_blocked},
    {"cancelled_before", row_cancelled_before},
    {"deadline", row_deadline},
    {"eintr", row_eintr},
};
#define NROWS (sizeof rows / sizeof rows[0])

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  static struct CMUnitTest tests[NOPS * NROWS];
  static struct entry entries[NOPS * NROWS];
  size_t k = 0;
  for (size_t o = 0; o < NOPS; o++)
    for (size_t r = 0; r < NROWS; r++, k++) {
      entries[k].op = &ops[o];
      snprintf(entries[k].name, sizeof entries[k].name, "%s/%s", ops[o].name,
               rows[r].name);
      tests[k].name = entries[k].name;
      tests[k].test_func = rows[r].fn;
      tests[k].initial_state = &entries[k];
      tests[k].teardown_func = test_helpers_teardown;
    }
  if (getenv("CANCEL_TEST_FILTER") != NULL)
    cmocka_set_test_filter(getenv("CANCEL_TEST_FILTER"));
  if (getenv("CANCEL_TEST_SKIP") != NULL)
    cmocka_set_skip_filter(getenv("CANCEL_TEST_SKIP"));
  return _cmocka_run_group_tests("wait_contract_test", tests, k, NULL, NULL);
}
