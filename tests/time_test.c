/*
 * Deadline and duration arithmetic at the extremes (issue 11, item 3):
 * every public call that takes a deadline or a duration is called with
 * INT64_MIN, INT64_MIN+1, -1, 0, INT64_MAX-1, CANCEL_NEVER-1 and
 * CANCEL_NEVER.  A deadline that has passed makes a wait a poll
 * (-ETIMEDOUT at once), one that is centuries away or CANCEL_NEVER leaves
 * it to the token (cancelled 20 ms later); durations below 0
 * are -EINVAL.  None of it may overflow: the sanitizer build runs with
 * -fsanitize=undefined and halts on the first report.
 */
#include "test_util.h"

#include "deadline.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "cancel/process.h"

static const int64_t extremes[] = {INT64_MIN,   INT64_MIN + 1, -1,
                                   0,           INT64_MAX - 1, CANCEL_NEVER - 1,
                                   CANCEL_NEVER};
#define N_EXTREMES (sizeof extremes / sizeof extremes[0])

/* Every extreme deadline has either passed (<= 0: the monotonic clock is
 * positive) or lies centuries ahead. */
static bool passed(int64_t d) {
  return d <= 0;
}

/* A token that fires 20 ms from now, to end a wait that a
 * far deadline leaves blocked. */
static cancel_source *soon(void) {
  cancel_source *s = NULL;
  assert_int_equal(cancel_source_new_timeout(&s, "soon", NULL, CANCEL_MSEC(20)),
                   0);
  return s;
}

typedef int64_t wait_call(void *ctx, const cancel_token *tok, int64_t d);

/* Runs call with every extreme deadline: a passed one must give
 * `when_passed` without waiting for the token, a far one -ECANCELED. */
static void check_wait(const char *name, wait_call *call, void *ctx,
                       int64_t when_passed) {
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int64_t d = extremes[i];
    /* A passed deadline ends the wait at once: its token never fires (a
     * token that fired first would rightly win, on a slow machine). */
    cancel_source *s = passed(d) ? new_src("live") : soon();
    int64_t t0 = cancel_now();
    int64_t rc = call(ctx, TOK(s), d);
    int64_t took = cancel_now() - t0;
    if (passed(d)) {
      if (rc != when_passed)
        print_error("%s(deadline %" PRId64 ")\n", name, d);
      assert_i64_eq(rc, when_passed);
    } else {
      if (rc != -ECANCELED)
        print_error("%s(deadline %" PRId64 ")\n", name, d);
      assert_i64_eq(rc, -ECANCELED);
      assert_i64_lt(took, test_tol(CANCEL_SEC(2)));
    }
    cancel_source_unref(s);
  }
}

/* ---- Sources, timeouts, remaining ------------------------------------ */

static void test_cancel_at_extremes(void **state) {
  (void)state;
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int64_t d = extremes[i];
    cancel_source *s = new_src("at");
    const cancel_token *pt = TOK(s);
    cancel_source *child = NULL;
    assert_int_equal(cancel_source_new_linked(&child, "child", &pt, 1), 0);
    assert_int_equal(cancel_source_cancel_at(s, d), 0);
    assert_i64_eq(cancel_token_deadline(TOK(s)), d);
    assert_i64_eq(cancel_token_deadline(TOK(child)), d);
    int64_t left = cancel_token_remaining(TOK(s));
    if (passed(d)) {
      assert_true(cancel_token_is_cancelled(TOK(s)));
      assert_true(cancel_token_is_cancelled(TOK(child)));
      assert_i64_eq(left, 0);
      assert_i64_eq(cancel_token_remaining(TOK(child)), 0);
    } else if (d == CANCEL_NEVER) {
      assert_false(cancel_token_is_cancelled(TOK(s)));
      assert_i64_eq(left, CANCEL_NEVER);
    } else {
      assert_false(cancel_token_is_cancelled(TOK(s)));
      assert_i64_gt(left, CANCEL_SEC(3600LL * 24 * 365 * 200));
      assert_i64_le(left, d);
      assert_i64_lt(left, CANCEL_NEVER);
      int64_t cleft = cancel_token_remaining(TOK(child));
      assert_i64_gt(cleft, CANCEL_SEC(3600LL * 24 * 365 * 200));
      assert_i64_le(cleft, left);
    }
    cancel_source_unref(child);
    cancel_source_unref(s);
  }
}

static void test_cancel_after_extremes(void **state) {
  (void)state;
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int64_t ns = extremes[i];
    cancel_source *s = new_src("after");
    int rc = cancel_source_cancel_after(s, ns);
    if (ns < 0) {
      assert_int_equal(rc, -EINVAL);
      assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
    } else if (ns == 0) {
      assert_int_equal(rc, 0);
      assert_true(cancel_token_is_cancelled(TOK(s)));
      assert_i64_eq(cancel_token_remaining(TOK(s)), 0);
    } else {
      /* Past the end of time: saturates to "never". */
      assert_int_equal(rc, 0);
      assert_false(cancel_token_is_cancelled(TOK(s)));
      assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
      assert_i64_eq(cancel_token_remaining(TOK(s)), CANCEL_NEVER);
    }
    cancel_source_unref(s);
  }
}

static void test_timeout_sources_extremes(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int64_t ns = extremes[i];
    cancel_source *s = NULL;
    int rc = cancel_source_new_timeout(&s, "t", TOK(parent), ns);
    cancel_source local;
    int lrc = cancel_source_init_timeout(&local, "t", TOK(parent), ns);
    if (ns < 0) {
      assert_int_equal(rc, -EINVAL);
      assert_null(s);
      assert_int_equal(lrc, -EINVAL);
      continue;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(lrc, 0);
    bool fired = ns == 0;
    assert_int_equal(cancel_token_is_cancelled(TOK(s)), fired);
    assert_int_equal(cancel_token_is_cancelled(TOK(&local)), fired);
    if (!fired) {
      assert_i64_eq(cancel_token_deadline(TOK(s)), CANCEL_NEVER);
      assert_i64_eq(cancel_token_remaining(TOK(&local)), CANCEL_NEVER);
    }
    cancel_source_destroy(&local);
    cancel_source_unref(s);
  }
  cancel_source_unref(parent);
}

/* The overflow of the report: cancel_at(INT64_MIN + 1) then remaining
 * said ~292 years. */
static void test_remaining_after_min_deadline(void **state) {
  (void)state;
  cancel_source *s = new_src("min");
  assert_int_equal(cancel_source_cancel_at(s, INT64_MIN + 1), 0);
  assert_i64_eq(cancel_token_remaining(TOK(s)), 0);
  cancel_source_unref(s);
  s = new_src("min");
  assert_int_equal(cancel_source_cancel_at(s, INT64_MIN), 0);
  assert_i64_eq(cancel_token_remaining(TOK(s)), 0);
  cancel_source_unref(s);
}

static void test_shield_grace_extremes(void **state) {
  (void)state;
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int64_t g = extremes[i];
    cancel_source *outer = new_src("outer");
    cancel_source *sh = NULL;
    int rc = cancel_source_new_shield(&sh, "shield", TOK(outer), g);
    cancel_source local;
    int lrc = cancel_source_init_shield(&local, "shield", TOK(outer), g);
    if (g < 0) {
      assert_int_equal(rc, -EINVAL);
      assert_int_equal(lrc, -EINVAL);
      cancel_source_unref(outer);
      continue;
    }
    assert_int_equal(rc, 0);
    assert_int_equal(lrc, 0);
    assert_int_equal(cancel_source_cancel(outer), 1);
    /* Grace 0 never follows; a grace of centuries does not follow now
     * (an overflowing now + grace was a grace that had already ended). */
    test_sleep_ns(CANCEL_MSEC(20));
    assert_false(cancel_token_is_cancelled(TOK(sh)));
    assert_false(cancel_token_is_cancelled(TOK(&local)));
    int64_t d = cancel_token_deadline(TOK(sh));
    assert_true(d == CANCEL_NEVER || d > cancel_now());
    assert_i64_gt(cancel_token_remaining(TOK(&local)), CANCEL_SEC(1));
    cancel_source_destroy(&local);
    cancel_source_unref(sh);
    cancel_source_unref(outer);
  }
}

/* ---- Waits ------------------------------------------------------------ */

static int64_t call_sleep_until(void *ctx, const cancel_token *tok, int64_t d) {
  (void)ctx;
  return cancel_sleep_until(tok, d);
}

static void test_sleep_extremes(void **state) {
  (void)state;
  check_wait("cancel_sleep_until", call_sleep_until, NULL, 0);
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int64_t ns = extremes[i];
    cancel_source *s = soon();
    int rc = cancel_sleep(TOK(s), ns);
    assert_int_equal(rc, ns < 0 ? -EINVAL : ns == 0 ? 0 : -ECANCELED);
    cancel_source_unref(s);
  }
}

static int64_t call_poll(void *ctx, const cancel_token *tok, int64_t d) {
  (void)ctx;
  return cancel_poll(tok, NULL, 0, d);
}

static int64_t call_wait_fd(void *ctx, const cancel_token *tok, int64_t d) {
  return cancel_wait_fd(tok, *(int *)ctx, POLLIN, d);
}

static int64_t call_read(void *ctx, const cancel_token *tok, int64_t d) {
  char c;
  return cancel_read(tok, *(int *)ctx, &c, 1, d);
}

static int64_t call_read_full(void *ctx, const cancel_token *tok, int64_t d) {
  char c[2];
  size_t done = 7;
  int64_t rc = cancel_read_full(tok, *(int *)ctx, c, sizeof c, d, &done);
  assert_int_equal(done, 0);
  return rc;
}

static int64_t call_write(void *ctx, const cancel_token *tok, int64_t d) {
  return cancel_write(tok, *(int *)ctx, "x", 1, d);
}

static int64_t call_write_full(void *ctx, const cancel_token *tok, int64_t d) {
  size_t done = 7;
  int64_t rc = cancel_write_full(tok, *(int *)ctx, "xy", 2, d, &done);
  assert_int_equal(done, 0);
  return rc;
}

static int64_t call_recv(void *ctx, const cancel_token *tok, int64_t d) {
  char c;
  return cancel_recv(tok, *(int *)ctx, &c, 1, 0, d);
}

static int64_t call_send(void *ctx, const cancel_token *tok, int64_t d) {
  return cancel_send(tok, *(int *)ctx, "x", 1, 0, d);
}

static int64_t call_accept(void *ctx, const cancel_token *tok, int64_t d) {
  return cancel_accept(tok, *(int *)ctx, NULL, NULL, SOCK_CLOEXEC, d);
}

/* Fills a non-blocking descriptor's buffer until a write would block. */
static void fill(int fd) {
  static char junk[65536];
  int fl = fcntl(fd, F_GETFL);
  fcntl(fd, F_SETFL, fl | O_NONBLOCK);
  while (write(fd, junk, sizeof junk) > 0)
    ;
  while (write(fd, junk, 1) > 0)
    ;
}

static void test_fd_waits_extremes(void **state) {
  (void)state;
  int p[2], q[2], sp[2], full[2];
  assert_int_equal(pipe(p), 0);
  assert_int_equal(pipe(q), 0);
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, sp), 0);
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM, 0, full), 0);
  fill(q[1]);
  fill(full[0]);

  check_wait("cancel_poll", call_poll, NULL, -ETIMEDOUT);
  check_wait("cancel_wait_fd", call_wait_fd, &p[0], -ETIMEDOUT);
  check_wait("cancel_read", call_read, &p[0], -ETIMEDOUT);
  check_wait("cancel_read_full", call_read_full, &p[0], -ETIMEDOUT);
  check_wait("cancel_write", call_write, &q[1], -ETIMEDOUT);
  check_wait("cancel_write_full", call_write_full, &q[1], -ETIMEDOUT);
  check_wait("cancel_recv", call_recv, &sp[0], -ETIMEDOUT);
  check_wait("cancel_send", call_send, &full[0], -ETIMEDOUT);

  int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(l >= 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t alen = sizeof a;
  assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(listen(l, 64), 0);
  assert_int_equal(getsockname(l, (struct sockaddr *)&a, &alen), 0);
  check_wait("cancel_accept", call_accept, &l, -ETIMEDOUT);

  /* connect to a listener on loopback completes at once or is in progress
   * when a passed deadline is looked at: either answer is right, and
   * neither may overflow. */
  for (size_t i = 0; i < N_EXTREMES; i++) {
    int c = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    assert_true(c >= 0);
    int rc =
        cancel_connect(NULL, c, (struct sockaddr *)&a, sizeof a, extremes[i]);
    if (passed(extremes[i]))
      assert_true(rc == 0 || rc == -ETIMEDOUT);
    else
      assert_int_equal(rc, 0);
    close(c);
  }
  close(l);
  for (int i = 0; i < 2; i++) {
    close(p[i]);
    close(q[i]);
    close(sp[i]);
    close(full[i]);
  }
}

struct condctx {
  pthread_mutex_t mu;
  pthread_cond_t cond;
};

static int64_t call_cond(void *ctx, const cancel_token *tok, int64_t d) {
  struct condctx *c = ctx;
  pthread_mutex_lock(&c->mu);
  int rc = cancel_cond_wait(tok, &c->cond, &c->mu, d);
  pthread_mutex_unlock(&c->mu);
  return rc;
}

static int64_t call_sem(void *ctx, const cancel_token *tok, int64_t d) {
  return cancel_sem_wait(tok, ctx, d);
}

static void *held_thread(void *arg) {
  sem_t *release = arg;
  while (sem_wait(release) != 0) {
  }
  return NULL;
}

static int64_t call_join(void *ctx, const cancel_token *tok, int64_t d) {
  return cancel_thread_join(tok, ctx, NULL, d);
}

static void test_sync_waits_extremes(void **state) {
  (void)state;
  struct condctx c = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER};
  check_wait("cancel_cond_wait", call_cond, &c, -ETIMEDOUT);

  cancel_sem sem;
  assert_int_equal(cancel_sem_init(&sem, 0), 0);
  check_wait("cancel_sem_wait", call_sem, &sem, -ETIMEDOUT);

  sem_t release;
  sem_init(&release, 0, 0);
  cancel_thread t;
  assert_int_equal(cancel_thread_create(&t, NULL, held_thread, &release), 0);
  check_wait("cancel_thread_join", call_join, &t, -ETIMEDOUT);
  sem_post(&release);
  assert_int_equal(cancel_thread_join(NULL, &t, NULL, CANCEL_NEVER), 0);
  sem_destroy(&release);
}

static int64_t call_child_wait(void *ctx, const cancel_token *tok, int64_t d) {
  (void)ctx;
  cancel_child c;
  char *argv[] = {"sleep", "10", NULL};
  assert_int_equal(cancel_child_spawnp(&c, "sleep", argv, NULL), 0);
  int status;
  int rc = cancel_child_wait(tok, &c, CANCEL_SEC(5), d, &status);
  if (rc == -ETIMEDOUT)
    assert_int_equal(cancel_child_kill(&c, 0, NULL), 0);
  return rc;
}

static void test_child_extremes(void **state) {
  (void)state;
  check_wait("cancel_child_wait", call_child_wait, NULL, -ETIMEDOUT);
  /* Grace periods: SIGTERM ends `sleep` at once, so even a grace of
   * centuries returns promptly. */
  for (size_t i = 0; i < N_EXTREMES; i++) {
    cancel_child c;
    char *argv[] = {"sleep", "10", NULL};
    assert_int_equal(cancel_child_spawnp(&c, "sleep", argv, NULL), 0);
    int rc = cancel_child_kill(&c, extremes[i], NULL);
    if (extremes[i] < 0) {
      assert_int_equal(rc, -EINVAL);
      assert_int_equal(cancel_child_kill(&c, 0, NULL), 0);
    } else {
      assert_int_equal(rc, 0);
    }
  }
}

/* ---- The helpers themselves ------------------------------------------- */

static void test_saturating_helpers(void **state) {
  (void)state;
  assert_i64_eq(cancel__add_sat(INT64_MAX, 1), INT64_MAX);
  assert_i64_eq(cancel__add_sat(INT64_MIN, -1), INT64_MIN);
  assert_i64_eq(cancel__add_sat(INT64_MAX, INT64_MIN), -1);
  assert_i64_eq(cancel__add_sat(5, -7), -2);
  assert_i64_eq(cancel__sub_sat(INT64_MIN + 1, 5), INT64_MIN);
  assert_i64_eq(cancel__sub_sat(5, INT64_MIN), INT64_MAX);
  assert_i64_eq(cancel__sub_sat(INT64_MAX, INT64_MAX), 0);
  assert_i64_eq(cancel__deadline_after(10, CANCEL_NEVER - 1), CANCEL_NEVER);
  assert_i64_eq(cancel__deadline_after(INT64_MIN, CANCEL_NEVER), CANCEL_NEVER);
  assert_i64_eq(cancel__deadline_after(10, 5), 15);
  assert_i64_eq(cancel__time_left(CANCEL_NEVER, 10), CANCEL_NEVER);
  assert_i64_eq(cancel__time_left(INT64_MIN, 10), 0);
  assert_i64_eq(cancel__time_left(CANCEL_NEVER - 1, -5), CANCEL_NEVER - 1);
  assert_i64_eq(cancel__time_left(15, 10), 5);
  assert_i64_eq(cancel__ns_to_ms_ceil(1, 100), 1);
  assert_i64_eq(cancel__ns_to_ms_ceil(CANCEL_MSEC(2), 100), 2);
  assert_i64_eq(cancel__ns_to_ms_ceil(CANCEL_MSEC(2) + 1, 100), 3);
  assert_i64_eq(cancel__ns_to_ms_ceil(INT64_MAX, 100), 100);
  assert_i64_eq(cancel__ns_to_ms_ceil(INT64_MIN, 100), 0);
}

int main(void) {
  /* The first wait of the process registers for membarrier(2) (the
   * watchdog's scopes), which can take longer than soon()'s 20 ms: pay
   * for it here, not inside a measured call. */
  cancel_source *warm = NULL;
  if (cancel_source_new(&warm, "warm") == 0) {
    (void)cancel_sleep_until(cancel_source_token(warm), 0);
    cancel_source_unref(warm);
  }
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_saturating_helpers),
      cmocka_unit_test(test_cancel_at_extremes),
      cmocka_unit_test(test_cancel_after_extremes),
      cmocka_unit_test(test_timeout_sources_extremes),
      cmocka_unit_test(test_remaining_after_min_deadline),
      cmocka_unit_test(test_shield_grace_extremes),
      cmocka_unit_test(test_sleep_extremes),
      cmocka_unit_test(test_fd_waits_extremes),
      cmocka_unit_test(test_sync_waits_extremes),
      cmocka_unit_test(test_child_extremes),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
