/*
 * cancel_token_fd: one descriptor per source, made on first use; not
 * readable while the token is live; readable once it is cancelled and for
 * ever after (level-triggered, in poll and in epoll); readable at once when
 * made after the cancel; woken from another thread and from a timer;
 * inherited through links; closed when the source is torn down; safe when
 * the first calls race each other or race the cancel; no descriptor leaks.
 */
#include "test_util.h"

#include <poll.h>
#include <sys/epoll.h>

/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)

/* poll(fd, POLLIN) with a timeout in ms: revents, 0 when not readable. */
static int readable(int fd, int ms) {
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int r;
  do
    r = poll(&p, 1, ms);
  while (r < 0 && errno == EINTR);
  assert_true(r >= 0);
  assert_false(p.revents & POLLNVAL);
  return r == 0 ? 0 : p.revents;
}

/* A timer far away keeps the library's reactor thread (and its descriptors)
 * alive, so that descriptor counts are not disturbed by it coming or going. */
static cancel_source *pin_reactor(void) {
  cancel_source *pin = new_src("pin");
  assert_int_equal(cancel_source_cancel_after(pin, CANCEL_SEC(3600)), 0);
  return pin;
}

/* ---- Identity, NULL ----------------------------------------------------- */

static void test_same_fd_each_call(void **state) {
  (void)state;
  cancel_source *a = new_src("a"), *b = new_src("b");
  int fa = cancel_token_fd(TOK(a));
  assert_true(fa >= 0);
  assert_true(test_fd_is_open(fa));
  for (int i = 0; i < 5; i++)
    assert_int_equal(cancel_token_fd(TOK(a)), fa);
  int fb = cancel_token_fd(TOK(b));
  assert_true(fb >= 0);
  assert_int_not_equal(fa, fb);
  assert_int_equal(cancel_token_fd(TOK(b)), fb);
  /* Still the same after the cancel. */
  assert_int_equal(cancel_source_cancel(a), 1);
  assert_int_equal(cancel_token_fd(TOK(a)), fa);
  cancel_source_unref(a);
  cancel_source_unref(b);
}

static void test_null_token_einval(void **state) {
  (void)state;
  assert_int_equal(cancel_token_fd(NULL), -EINVAL);
  assert_int_equal(cancel_token_fd(NULL), -EINVAL);
}

/* ---- Readability ------------------------------------------------------ */

static void test_not_readable_while_live(void **state) {
  (void)state;
  cancel_source *s = new_src("live");
  int fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  assert_int_equal(readable(fd, 0), 0);
  assert_int_equal(readable(fd, 10), 0);
  assert_int_equal(readable(fd, 0), 0);
  cancel_source_unref(s);
}

static void test_readable_after_cancel_and_stays(void **state) {
  (void)state;
  cancel_source *s = new_src("fired");
  int fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  assert_int_equal(readable(fd, 0), 0);
  assert_int_equal(cancel_source_cancel(s), 1);
  /* Level-triggered: every look sees it. */
  for (int i = 0; i < 3; i++)
    assert_true(readable(fd, 0) & POLLIN);
  assert_int_equal(cancel_source_cancel(s), 0);
  assert_true(readable(fd, 0) & POLLIN);
  cancel_source_unref(s);
}

static void test_readable_when_made_after_cancel(void **state) {
  (void)state;
  cancel_source *s = new_src("late");
  assert_int_equal(cancel_source_cancel(s), 1);
  int fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  assert_true(readable(fd, 0) & POLLIN);
  assert_true(readable(fd, 0) & POLLIN);
  cancel_source_unref(s);

  /* The same for a caller-storage source. */
  cancel_source local;
  assert_int_equal(cancel_source_init(&local, "local"), 0);
  assert_int_equal(cancel_source_cancel_with(&local, CANCEL_SHUTDOWN, "x"), 1);
  fd = cancel_token_fd(TOK(&local));
  assert_true(fd >= 0);
  assert_true(readable(fd, 0) & POLLIN);
  cancel_source_destroy(&local);
}

static void test_epoll_level_triggered(void **state) {
  (void)state;
  cancel_source *s = new_src("epoll");
  int fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  int ep = epoll_create1(EPOLL_CLOEXEC);
  assert_true(ep >= 0);
  struct epoll_event ev = {.events = EPOLLIN, .data.u64 = 42};
  assert_int_equal(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev), 0);

  struct epoll_event out[2];
  assert_int_equal(epoll_wait(ep, out, 2, 0), 0);
  assert_int_equal(epoll_wait(ep, out, 2, 10), 0);
  assert_int_equal(cancel_source_cancel(s), 1);
  for (int i = 0; i < 3; i++) {
    memset(out, 0, sizeof out);
    assert_int_equal(epoll_wait(ep, out, 2, 0), 1);
    assert_true(out[0].events & EPOLLIN);
    assert_int_equal(out[0].data.u64, 42);
  }
  close(ep);
  cancel_source_unref(s);
}

/* A thread blocked in epoll_wait on the descriptor is woken by a cancel
 * from another thread, and by the timer. */
struct epwait {
  int ep;
  int timeout_ms;
};

static int64_t do_epoll_wait(void *arg) {
  struct epwait *e = arg;
  struct epoll_event ev;
  int r;
  do
    r = epoll_wait(e->ep, &ev, 1, e->timeout_ms);
  while (r < 0 && errno == EINTR);
  return r == 1 && (ev.events & EPOLLIN) ? 1 : r;
}

static void test_blocked_poller_woken(void **state) {
  (void)state;
  for (int k = 0; k < 2; k++) {
    cancel_source *s = new_src("wake");
    int fd = cancel_token_fd(TOK(s));
    assert_true(fd >= 0);
    int ep = epoll_create1(EPOLL_CLOEXEC);
    assert_true(ep >= 0);
    struct epoll_event ev = {.events = EPOLLIN};
    assert_int_equal(epoll_ctl(ep, EPOLL_CTL_ADD, fd, &ev), 0);
    struct epwait e = {ep, 10000};
    struct test_waiter w;
    int64_t t_cancel;
    if (k == 0) {
      test_waiter_block(&w, do_epoll_wait, &e);
      t_cancel = cancel_now();
      assert_int_equal(cancel_source_cancel(s), 1);
    } else {
      t_cancel = cancel_now() + CANCEL_MSEC(20);
      assert_int_equal(cancel_source_cancel_at(s, t_cancel), 0);
      test_waiter_start(&w, do_epoll_wait, &e);
    }
    test_waiter_end(&w, test_tol(CANCEL_SEC(2)), NULL, NULL);
    assert_i64_eq(w.result, 1);
    assert_elapsed_within(w.t_end - t_cancel, 0, LATE);
    close(ep);
    cancel_source_unref(s);
  }
}

static void test_linked_child_fd(void **state) {
  (void)state;
  cancel_source *parent = new_src("parent");
  const cancel_token *ptok = TOK(parent);
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "child", &ptok, 1), 0);
  int cfd = cancel_token_fd(TOK(child));
  int pfd = cancel_token_fd(TOK(parent));
  assert_true(cfd >= 0 && pfd >= 0);
  assert_int_not_equal(cfd, pfd);
  assert_int_equal(readable(cfd, 0), 0);
  assert_int_equal(cancel_source_cancel(parent), 1);
  assert_true(readable(cfd, 0) & POLLIN);
  assert_true(readable(pfd, 0) & POLLIN);
  cancel_source_unref(child);
  cancel_source_unref(parent);

  /* Cancelling the child does not make the parent's readable. */
  parent = new_src("parent2");
  ptok = TOK(parent);
  assert_int_equal(cancel_source_new_linked(&child, "child2", &ptok, 1), 0);
  pfd = cancel_token_fd(TOK(parent));
  cfd = cancel_token_fd(TOK(child));
  assert_int_equal(cancel_source_cancel(child), 1);
  assert_true(readable(cfd, 0) & POLLIN);
  assert_int_equal(readable(pfd, 0), 0);
  cancel_source_unref(child);
  cancel_source_unref(parent);
}

/* ---- Teardown closes it ----------------------------------------------- */

static void test_closed_at_teardown(void **state) {
  (void)state;
  /* Single-threaded, checked right after the teardown, so that nothing
   * can reuse the number in between (no timer is armed here). */
  for (int k = 0; k < 4; k++) {
    cancel_source *heap = NULL;
    cancel_source local;
    cancel_source *s;
    if (k < 2) {
      s = heap = new_src("heap");
    } else {
      assert_int_equal(cancel_source_init(&local, "local"), 0);
      s = &local;
    }
    if (k % 2 == 1)
      assert_int_equal(cancel_source_cancel(s), 1);
    int fd = cancel_token_fd(TOK(s));
    assert_true(fd >= 0);
    assert_true(test_fd_is_open(fd));
    if (heap != NULL)
      cancel_source_unref(heap);
    else
      cancel_source_destroy(&local);
    errno = 0;
    assert_int_equal(fcntl(fd, F_GETFD), -1);
    assert_int_equal(errno, EBADF);
  }

  /* A source with a second reference keeps it until the last unref. */
  cancel_source *s = new_src("refs");
  int fd = cancel_token_fd(TOK(s));
  assert_true(fd >= 0);
  cancel_source_ref(s);
  cancel_source_unref(s);
  assert_true(test_fd_is_open(fd));
  cancel_source_unref(s);
  errno = 0;
  assert_int_equal(fcntl(fd, F_GETFD), -1);
  assert_int_equal(errno, EBADF);
}

static void test_no_descriptor_leak(void **state) {
  (void)state;
  cancel_source *pin = pin_reactor();
  int base = test_fd_count();
  assert_true(base > 0);
  for (int i = 0; i < 200; i++) {
    cancel_source *s = new_src("leak");
    assert_true(cancel_token_fd(TOK(s)) >= 0);
    if (i % 2)
      cancel_source_cancel(s);
    cancel_source_unref(s);
  }
  /* Sources that never asked for a descriptor have none. */
  for (int i = 0; i < 50; i++) {
    cancel_source *s = new_src("none");
    cancel_source_cancel(s);
    cancel_source_unref(s);
  }
  assert_int_equal(test_fd_count(), base);
  /* One descriptor per source, however many calls. */
  cancel_source *s = new_src("one");
  for (int i = 0; i < 10; i++)
    assert_true(cancel_token_fd(TOK(s)) >= 0);
  assert_int_equal(test_fd_count(), base + 1);
  cancel_source_unref(s);
  assert_int_equal(test_fd_count(), base);
  cancel_source_unref(pin);
}

/* ---- Races ------------------------------------------------------------ */

enum { RACERS = 6 };

struct race {
  struct test_gate go;
  cancel_source *src;
  int fds[RACERS];
  bool cancel_too; /* racer 0 cancels instead of asking */
};

struct racer {
  struct race *race;
  int id;
};

/* A racer's stop: open its gate (it then runs its one call and returns). */
static void stop_racer(void *arg) {
  test_gate_open(&((struct racer *)arg)->race->go);
}

static void *racer_main(void *arg) {
  struct racer *r = arg;
  test_gate_pass(&r->race->go);
  if (r->race->cancel_too && r->id == 0)
    r->race->fds[0] = cancel_source_cancel(r->race->src) == 1 ? -1 : -2;
  else
    r->race->fds[r->id] = cancel_token_fd(TOK(r->race->src));
  return NULL;
}

/* First calls racing each other: one descriptor, the same for all, none
 * leaked; racing the cancel: readable afterwards whoever won. */
static void test_first_calls_race(void **state) {
  (void)state;
  cancel_source *pin = pin_reactor();
  int base = test_fd_count();
  int rounds = (int)(100 * test_stress_scale());
  int64_t budget_end = cancel_now() + CANCEL_SEC(3);
  for (int round = 0; round < rounds; round++) {
    if (round >= 10 && cancel_now() > budget_end)
      break; /* valgrind: threads are slow to start */
    /* Shared: a racer that cannot start fails the test, and the teardown
     * opens the gate for the others and joins them. */
    struct race *rp = test_shared(sizeof *rp);
    struct race race;
    test_gate_init(&rp->go);
    rp->src = new_src("race");
    rp->cancel_too = round % 2 == 1;
    struct racer *rs = test_shared(RACERS * sizeof *rs);
    pthread_t th[RACERS];
    for (int i = 0; i < RACERS; i++) {
      rs[i].race = rp;
      rs[i].id = i;
      th[i] = test_helper_start(racer_main, &rs[i], stop_racer);
    }
    bool all = test_gate_release(&rp->go, RACERS, test_tol(CANCEL_SEC(10)));
    for (int i = 0; i < RACERS; i++)
      test_helper_join(th[i]);
    assert_true(all);
    race = *rp;
    test_gate_destroy(&rp->go);
    test_shared_free(rs);
    test_shared_free(rp);
    int fd = race.fds[1];
    assert_true(fd >= 0);
    for (int i = race.cancel_too ? 1 : 0; i < RACERS; i++)
      assert_int_equal(race.fds[i], fd);
    assert_int_equal(test_fd_count(), base + 1);
    if (race.cancel_too) {
      assert_int_equal(race.fds[0], -1);
      assert_true(readable(fd, 0) & POLLIN);
    } else {
      assert_int_equal(readable(fd, 0), 0);
    }
    cancel_source_unref(race.src);
    assert_int_equal(test_fd_count(), base);
  }
  cancel_source_unref(pin);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_closed_at_teardown),
      cmocka_unit_test(test_same_fd_each_call),
      cmocka_unit_test(test_null_token_einval),
      cmocka_unit_test(test_not_readable_while_live),
      cmocka_unit_test(test_readable_after_cancel_and_stays),
      cmocka_unit_test(test_readable_when_made_after_cancel),
      cmocka_unit_test(test_epoll_level_triggered),
      cmocka_unit_test(test_blocked_poller_woken),
      cmocka_unit_test(test_linked_child_fd),
      cmocka_unit_test(test_no_descriptor_leak),
      cmocka_unit_test(test_first_calls_race),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
