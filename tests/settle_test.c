/*
 * "-ECANCELED means the token fired, with its reason" (cancel.h's
 * conventions): cancel_token_settle(), the one helper that the calls
 * deriving a timeout from a token's deadline (curl, pq) settle with, and
 * every kind of wait, each raced N times against a short deadline.  The
 * waits take no timeout from the token's deadline: they are checked here
 * so that none starts to.  A late timer is made with tests/stall.h.
 */
#include "test_util.h"

#include "loopback.h"
#include "stall.h"

#include "cancel/process.h"

#include <fcntl.h>
#include <poll.h>
#include <sys/socket.h>

/* The reason is there, at once, and says timeout by `origin`. */
static void assert_timeout_reason(const cancel_token *tok, const char *origin) {
  assert_true(cancel_token_is_cancelled(tok));
  cancel_reason why;
  assert_int_equal(cancel_token_reason(tok, &why), 1);
  assert_int_equal(why.kind, CANCEL_TIMEOUT);
  assert_string_equal(why.origin, origin);
}

/* ---- The helper --------------------------------------------------------- */

static void test_settle_nothing_to_settle(void **state) {
  (void)state;
  assert_int_equal(cancel_token_settle(NULL, 0), 0);
  assert_int_equal(cancel_token_settle(NULL, CANCEL_SEC(1)), 0);
  assert_int_equal(cancel_token_settle(NULL, -1), -EINVAL);
  cancel_source *s = new_src("live");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_token_settle(TOK(s), 0), 0); /* no deadline */
  assert_int_equal(cancel_token_settle(TOK(s), CANCEL_SEC(100)), 0);
  /* A deadline further away than early_ns: not due, no wait. */
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_SEC(10)), 0);
  assert_int_equal(cancel_token_settle(TOK(s), 0), 0);
  assert_int_equal(cancel_token_settle(TOK(s), CANCEL_MSEC(2)), 0);
  assert_i64_lt(test_since(t0), test_tol(CANCEL_MSEC(50)));
  assert_false(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(cancel_token_settle(TOK(s), -1), -EINVAL);
  cancel_source_unref(s);
}

static void test_settle_already_cancelled(void **state) {
  (void)state;
  cancel_source *s = new_src("done");
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_SEC(10)), 0);
  assert_int_equal(cancel_source_cancel_with(s, CANCEL_SHUTDOWN, "test"), 1);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_token_settle(TOK(s), 0), -ECANCELED);
  assert_int_equal(cancel_token_settle(TOK(s), CANCEL_SEC(100)), -ECANCELED);
  assert_i64_lt(test_since(t0), test_tol(CANCEL_MSEC(50)));
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_SHUTDOWN);
  cancel_source_unref(s);
  /* A deadline already passed when armed fires at once. */
  s = new_src("past");
  assert_int_equal(cancel_source_cancel_at(s, cancel_now() - 1), 0);
  assert_int_equal(cancel_token_settle(TOK(s), 0), -ECANCELED);
  assert_timeout_reason(TOK(s), "past");
  cancel_source_unref(s);
}

/* The deadline passed, the timer has not fired (it is held): settle waits
 * for it, and returns with the reason there.  Through a link too: the
 * deadline is the parent's, the token the child's. */
static void test_settle_waits_for_late_timer(void **state) {
  (void)state;
  int64_t deadline = cancel_now() + CANCEL_MSEC(20);
  struct test_stall *st =
      test_stall_begin(deadline - CANCEL_MSEC(2), CANCEL_MSEC(100));
  cancel_source *p = new_src("route");
  assert_int_equal(cancel_source_cancel_at(p, deadline), 0);
  const cancel_token *pt = TOK(p);
  cancel_source *c = NULL;
  assert_int_equal(cancel_source_new_linked(&c, "call", &pt, 1), 0);
  test_stall_entered(st);
  while (cancel_now() < deadline)
    test_sleep_ns(deadline - cancel_now());
  /* The state under test: due, not fired. */
  assert_i64_eq(cancel_token_remaining(TOK(c)), 0);
  assert_false(cancel_token_is_cancelled(TOK(c)));
  assert_int_equal(cancel_token_settle(TOK(c), 0), -ECANCELED);
  int64_t back = cancel_now();
  assert_i64_ge(back, __atomic_load_n(&st->left_at, __ATOMIC_ACQUIRE));
  assert_timeout_reason(TOK(c), "route");
  cancel_reason why;
  assert_int_equal(cancel_token_reason(TOK(c), &why), 1);
  assert_int_equal(why.via_len, 1);
  assert_string_equal(why.via[0].name, "call");
  /* Woken by the cancel, not by polling: soon after the timer went on. */
  assert_i64_lt(back - __atomic_load_n(&st->left_at, __ATOMIC_ACQUIRE),
                test_tol(CANCEL_MSEC(20)));
  test_stall_end(st);
  cancel_source_unref(c);
  cancel_source_unref(p);
}

/* A deadline at most early_ns away counts as due: settle waits for it. */
static void test_settle_early_window(void **state) {
  (void)state;
  cancel_source *s = NULL;
  assert_int_equal(
      cancel_source_new_timeout(&s, "budget", NULL, CANCEL_MSEC(30)), 0);
  int64_t deadline = cancel_token_deadline(TOK(s));
  assert_int_equal(cancel_token_settle(TOK(s), CANCEL_MSEC(500)), -ECANCELED);
  assert_i64_ge(cancel_now(), deadline);
  assert_timeout_reason(TOK(s), "budget");
  cancel_source_unref(s);
}

/* Cancelled otherwise while it waits: -ECANCELED with that reason. */
static void *cancel_soon(void *arg) {
  test_sleep_ns(CANCEL_MSEC(20));
  cancel_source_cancel_with(arg, CANCEL_CLIENT_GONE, "test");
  return NULL;
}

static void test_settle_cancelled_meanwhile(void **state) {
  (void)state;
  int64_t deadline = cancel_now() + CANCEL_MSEC(10);
  struct test_stall *st =
      test_stall_begin(deadline - CANCEL_MSEC(2), CANCEL_SEC(2));
  cancel_source *s = new_src("request");
  assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
  test_stall_entered(st);
  while (cancel_now() < deadline)
    test_sleep_ns(deadline - cancel_now());
  pthread_t t = test_thread_start(cancel_soon, s);
  assert_int_equal(cancel_token_settle(TOK(s), 0), -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_CLIENT_GONE);
  test_thread_join(t);
  test_stall_end(st);
  cancel_source_unref(s);
}

/* Nothing fires the token: settle gives up CANCEL_SETTLE_WAIT_NS after the
 * deadline, -ETIMEDOUT, the token still live (never a lying -ECANCELED). */
static void test_settle_gives_up(void **state) {
  (void)state;
  int64_t deadline = cancel_now() + CANCEL_MSEC(10);
  struct test_stall *st = test_stall_begin(
      deadline - CANCEL_MSEC(2), CANCEL_SETTLE_WAIT_NS + CANCEL_SEC(5));
  cancel_source *s = new_src("orphan");
  assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
  test_stall_entered(st);
  while (cancel_now() < deadline)
    test_sleep_ns(deadline - cancel_now());
  assert_int_equal(cancel_token_settle(TOK(s), 0), -ETIMEDOUT);
  assert_i64_ge(cancel_now(), deadline + CANCEL_SETTLE_WAIT_NS);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  /* The timer goes on and fires the token; settle says so (its bound is
   * long past: it no longer waits, it looks). */
  test_stall_end(st);
  assert_int_equal(cancel_sleep(TOK(s), test_tol(CANCEL_SEC(2))), -ECANCELED);
  assert_int_equal(cancel_token_settle(TOK(s), 0), -ECANCELED);
  assert_timeout_reason(TOK(s), "orphan");
  cancel_source_unref(s);
}

/* In the child of fork() no timer armed before the fork runs: settle is
 * bounded there too. */
static cancel_source *g_forked;

static int settle_in_child(void) {
  test_child_enter();
  if (cancel_token_is_cancelled(TOK(g_forked)))
    return 1;
  int64_t deadline = cancel_token_deadline(TOK(g_forked));
  while (cancel_now() < deadline)
    test_sleep_ns(deadline - cancel_now());
  if (cancel_token_settle(TOK(g_forked), 0) != -ETIMEDOUT)
    return 2;
  if (cancel_now() < deadline + CANCEL_SETTLE_WAIT_NS)
    return 3;
  return cancel_token_is_cancelled(TOK(g_forked)) ? 4 : 0;
}

static void test_settle_in_fork_child(void **state) {
  (void)state;
  TEST_SKIP_UNDER_TSAN();
  assert_int_equal(
      cancel_source_new_timeout(&g_forked, "forked", NULL, CANCEL_MSEC(200)),
      0);
  assert_int_equal(test_in_child(settle_in_child, test_tol(CANCEL_SEC(10))), 0);
  cancel_source_unref(g_forked);
}

/* ---- Every wait, raced against a short deadline -------------------------- *
 * Each wait is given a token that times out after 2 ms and no deadline of
 * its own (CANCEL_NEVER), then the same with the token's deadline as its
 * own: whenever it returns -ECANCELED, the token is cancelled with its
 * timeout reason, at once. */

#define ROUNDS_WAIT 40

struct waitctx {
  int fds[2]; /* a pipe nobody writes */
  int sp[2];  /* a socket pair nobody writes */
  int lfd;    /* a listener nobody connects to */
  pthread_mutex_t mu;
  pthread_cond_t cv;
  cancel_sem sem;
  cancel_thread th;
  sem_t th_go;
};

typedef int wait_fn(const cancel_token *tok, struct waitctx *w,
                    int64_t deadline);

static int w_sleep(const cancel_token *tok, struct waitctx *w, int64_t d) {
  (void)w;
  int rc = cancel_sleep_until(tok, d);
  return rc == 0 ? -ETIMEDOUT : rc;
}

static int w_poll(const cancel_token *tok, struct waitctx *w, int64_t d) {
  struct pollfd p = {.fd = w->fds[0], .events = POLLIN};
  return cancel_poll(tok, &p, 1, d);
}

static int w_read(const cancel_token *tok, struct waitctx *w, int64_t d) {
  char b[8];
  return (int)cancel_read(tok, w->fds[0], b, sizeof b, d);
}

static int w_recv(const cancel_token *tok, struct waitctx *w, int64_t d) {
  char b[8];
  return (int)cancel_recv(tok, w->sp[0], b, sizeof b, 0, d);
}

static int w_accept(const cancel_token *tok, struct waitctx *w, int64_t d) {
  return cancel_accept(tok, w->lfd, NULL, NULL, SOCK_CLOEXEC, d);
}

static int w_cond(const cancel_token *tok, struct waitctx *w, int64_t d) {
  pthread_mutex_lock(&w->mu);
  int rc;
  do /* nobody signals: a wake-up is spurious */
    rc = cancel_cond_wait(tok, &w->cv, &w->mu, d);
  while (rc == 0);
  pthread_mutex_unlock(&w->mu);
  return rc;
}

static int w_sem(const cancel_token *tok, struct waitctx *w, int64_t d) {
  return cancel_sem_wait(tok, &w->sem, d);
}

static int w_join(const cancel_token *tok, struct waitctx *w, int64_t d) {
  return cancel_thread_join(tok, &w->th, NULL, d);
}

static int w_child(const cancel_token *tok, struct waitctx *w, int64_t d) {
  (void)w;
  cancel_child c;
  char *argv[] = {"sleep", "10", NULL};
  int rc = cancel_child_spawnp(&c, argv[0], argv, NULL);
  if (rc < 0)
    return rc;
  int status;
  rc = cancel_child_wait(tok, &c, 0, d, &status);
  if (rc == -ETIMEDOUT) /* still ours: stop it */
    (void)cancel_child_kill(&c, 0, &status);
  return rc;
}

static void *parked(void *arg) {
  struct waitctx *w = arg;
  (void)test_sem_wait_ns(&w->th_go, test_tol(CANCEL_SEC(30)));
  return NULL;
}

static const struct {
  const char *name;
  wait_fn *fn;
} waits[] = {
    {"cancel_sleep_until", w_sleep}, {"cancel_poll", w_poll},
    {"cancel_read", w_read},         {"cancel_recv", w_recv},
    {"cancel_accept", w_accept},     {"cancel_cond_wait", w_cond},
    {"cancel_sem_wait", w_sem},      {"cancel_thread_join", w_join},
    {"cancel_child_wait", w_child},
};

static void test_every_wait_cancelled_with_reason(void **state) {
  (void)state;
  struct waitctx *w = test_shared(sizeof *w);
  assert_int_equal(pipe2(w->fds, O_CLOEXEC), 0);
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, w->sp),
                   0);
  int port;
  w->lfd = loopback_socket(4, &port);
  assert_true(w->lfd >= 0);
  pthread_mutex_init(&w->mu, NULL);
  pthread_cond_init(&w->cv, NULL);
  assert_int_equal(cancel_sem_init(&w->sem, 0), 0);
  sem_init(&w->th_go, 0, 0);
  assert_int_equal(cancel_thread_create(&w->th, NULL, parked, w), 0);

  for (size_t k = 0; k < sizeof waits / sizeof waits[0]; k++) {
    int cancelled = 0, timedout = 0;
    for (int round = 0; round < 2 * ROUNDS_WAIT; round++) {
      cancel_source *s = NULL;
      assert_int_equal(
          cancel_source_new_timeout(&s, "wait budget", NULL, CANCEL_MSEC(2)),
          0);
      /* First rounds: the token alone; then its deadline as the wait's. */
      bool own = round >= ROUNDS_WAIT;
      int64_t d = own ? cancel_token_deadline(TOK(s)) : CANCEL_NEVER;
      int rc = waits[k].fn(TOK(s), w, d);
      bool fired = cancel_token_is_cancelled(TOK(s));
      cancel_reason why;
      int have = cancel_token_reason(TOK(s), &why);
      if (rc == -ECANCELED) {
        if (!fired || have != 1 || why.kind != CANCEL_TIMEOUT)
          print_error("%s: -ECANCELED with the token %s (round %d)\n",
                      waits[k].name, fired ? "fired" : "live", round);
        assert_true(fired);
        assert_int_equal(have, 1);
        assert_int_equal(why.kind, CANCEL_TIMEOUT);
        assert_string_equal(why.origin, "wait budget");
        cancelled++;
      } else {
        if (rc != -ETIMEDOUT || !own)
          print_error("%s: %d (%s), round %d\n", waits[k].name, rc,
                      cancel_strerror(rc), round);
        assert_true(own);
        assert_int_equal(rc, -ETIMEDOUT);
        timedout++;
      }
      cancel_source_unref(s);
    }
    print_message("%s: %d -ECANCELED with the reason, %d -ETIMEDOUT (its own "
                  "deadline, the token's)\n",
                  waits[k].name, cancelled, timedout);
  }

  sem_post(&w->th_go);
  assert_int_equal(cancel_thread_join(NULL, &w->th, NULL, CANCEL_NEVER), 0);
  sem_destroy(&w->th_go);
  pthread_cond_destroy(&w->cv);
  pthread_mutex_destroy(&w->mu);
  close(w->lfd);
  close(w->sp[0]);
  close(w->sp[1]);
  close(w->fds[0]);
  close(w->fds[1]);
}

/* With the timer held past the deadline, a wait on the token alone goes on
 * until the timer fires it: no wait reads the deadline itself. */
static void test_waits_wait_for_late_timer(void **state) {
  (void)state;
  int fds[2];
  assert_int_equal(pipe2(fds, O_CLOEXEC), 0);
  for (int k = 0; k < 2; k++) {
    int64_t deadline = cancel_now() + CANCEL_MSEC(10);
    struct test_stall *st =
        test_stall_begin(deadline - CANCEL_MSEC(2), CANCEL_MSEC(100));
    cancel_source *s = new_src("wait budget");
    assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
    int rc;
    if (k == 0) {
      rc = cancel_sleep_until(TOK(s), CANCEL_NEVER);
    } else {
      struct pollfd p = {.fd = fds[0], .events = POLLIN};
      rc = cancel_poll(TOK(s), &p, 1, CANCEL_NEVER);
    }
    assert_int_equal(rc, -ECANCELED);
    assert_i64_ge(cancel_now(),
                  __atomic_load_n(&st->left_at, __ATOMIC_ACQUIRE));
    assert_timeout_reason(TOK(s), "wait budget");
    test_stall_end(st);
    cancel_source_unref(s);
  }
  close(fds[0]);
  close(fds[1]);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_settle_nothing_to_settle),
      cmocka_unit_test(test_settle_already_cancelled),
      cmocka_unit_test(test_settle_waits_for_late_timer),
      cmocka_unit_test(test_settle_early_window),
      cmocka_unit_test(test_settle_cancelled_meanwhile),
      cmocka_unit_test(test_settle_gives_up),
      cmocka_unit_test(test_settle_in_fork_child),
      cmocka_unit_test(test_every_wait_cancelled_with_reason),
      cmocka_unit_test(test_waits_wait_for_late_timer),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
