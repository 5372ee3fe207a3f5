/*
 * Hang-up watches (cancel_watch_hangup / cancel_unwatch) and the reactor's
 * descriptor watches under them, on real sockets: TCP over loopback and
 * Unix socket pairs.  Peer close, half-close and reset cancel; data never
 * does; unwatch before the hang-up keeps the source live; descriptor
 * reuse; 100 connections closed in random order; unwatch racing the
 * hang-up; the reactor's add / modify / remove and its firing protocol;
 * fork.
 *
 * Waits use a semaphore posted by the source's callback; sleeps appear only
 * where the test asserts that something did NOT happen.
 */
#include "test_util.h"

#include "cancel/diag.h"
#include "cancel/watch.h"
#include "internal.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <sys/wait.h>
#include <unistd.h>

/* "It must happen": generous, for a loaded machine. */
static int64_t must_wait(void) {
  return test_tol(CANCEL_SEC(5));
}

/* "Promptly": the hang-up is seen within this after the peer's close. */
static int64_t prompt_tol(void) {
  return test_tol(CANCEL_MSEC(50));
}

/* How long to look for something that must NOT happen. */
static int64_t quiet_ns(void) {
  return CANCEL_MSEC(50);
}

/* ---- Sockets ---------------------------------------------------------- */

static int tcp_listener(void) {
  int l = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(l >= 0);
  struct sockaddr_in a;
  memset(&a, 0, sizeof a);
  a.sin_family = AF_INET;
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(bind(l, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(listen(l, 128), 0);
  return l;
}

/* A connected TCP pair over loopback: *mine is the server's side (what a
 * server watches), *peer the client's. */
static void tcp_pair_on(int l, int *mine, int *peer) {
  struct sockaddr_in a;
  socklen_t len = sizeof a;
  assert_int_equal(getsockname(l, (struct sockaddr *)&a, &len), 0);
  *peer = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(*peer >= 0);
  assert_int_equal(connect(*peer, (struct sockaddr *)&a, sizeof a), 0);
  *mine = accept4(l, NULL, NULL, SOCK_CLOEXEC);
  assert_true(*mine >= 0);
}

static void tcp_pair(int *mine, int *peer) {
  int l = tcp_listener();
  tcp_pair_on(l, mine, peer);
  close(l);
}

static void unix_pair(int *mine, int *peer) {
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  *mine = sv[0];
  *peer = sv[1];
}

typedef void pair_fn(int *mine, int *peer);

/* Closes fd with an RST instead of a FIN (TCP). */
static void close_reset(int fd) {
  struct linger lg = {1, 0};
  assert_int_equal(setsockopt(fd, SOL_SOCKET, SO_LINGER, &lg, sizeof lg), 0);
  close(fd);
}

/* ---- A watched source ------------------------------------------------- */

struct watched {
  cancel_source *src;
  cancel_reg reg;
  cancel_watch w;
  sem_t sem;
  int count;
  int64_t at;
  bool on_reactor;
};

static void watched_cb(void *arg) {
  struct watched *x = arg;
  x->at = cancel_now();
  x->on_reactor = cancel__on_reactor();
  __atomic_add_fetch(&x->count, 1, __ATOMIC_SEQ_CST);
  sem_post(&x->sem);
}

static void watched_init(struct watched *x, const char *name) {
  memset(x, 0, sizeof *x);
  sem_init(&x->sem, 0, 0);
  assert_int_equal(cancel_source_new(&x->src, name), 0);
  assert_int_equal(cancel_register(&x->reg, TOK(x->src), watched_cb, x), 0);
}

static void watched_fini(struct watched *x) {
  cancel_unregister(&x->reg);
  cancel_source_unref(x->src);
  sem_destroy(&x->sem);
}

static void assert_gone(struct watched *x, const char *detail) {
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(x->src), &r), 1);
  assert_int_equal(r.kind, CANCEL_CLIENT_GONE);
  assert_string_equal(r.detail, detail);
  assert_string_equal(r.origin, cancel_source_name(x->src));
  assert_int_equal(test_load(&x->count), 1);
  assert_true(x->on_reactor);
}

/* Watch mine, run `hangup` on the peer, expect a cancel with `detail`
 * within the tolerance. */
static void expect_hangup(pair_fn *pair, void (*hangup)(int peer),
                          const char *detail) {
  struct watched x;
  watched_init(&x, "client 127.0.0.1");
  int mine, peer;
  pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_false(cancel_token_is_cancelled(TOK(x.src)));
  int64_t t0 = cancel_now();
  hangup(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_i64_le(x.at - t0, prompt_tol());
  assert_gone(&x, detail);
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(mine);
  watched_fini(&x);
}

static void do_close(int peer) {
  close(peer);
}

/* ---- Hang-ups that cancel --------------------------------------------- */

static void test_tcp_peer_close(void **state) {
  (void)state;
  expect_hangup(tcp_pair, do_close, "peer closed");
}

static void test_unix_peer_close(void **state) {
  (void)state;
  expect_hangup(unix_pair, do_close, "peer closed");
}

/* shutdown(SHUT_WR) alone (the peer keeps its socket open): EPOLLRDHUP. */
static void half_close(pair_fn *pair) {
  struct watched x;
  watched_init(&x, "half");
  int mine, peer;
  pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  int64_t t0 = cancel_now();
  assert_int_equal(shutdown(peer, SHUT_WR), 0);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_i64_le(x.at - t0, prompt_tol());
  assert_gone(&x, "peer closed");
  /* Our sending side still works: the watch read nothing, closed nothing. */
  assert_int_equal(send(mine, "x", 1, MSG_NOSIGNAL), 1);
  char c;
  assert_int_equal(recv(peer, &c, 1, 0), 1);
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(peer);
  close(mine);
  watched_fini(&x);
}

static void test_tcp_shutdown_wr(void **state) {
  (void)state;
  half_close(tcp_pair);
}

static void test_unix_shutdown_wr(void **state) {
  (void)state;
  half_close(unix_pair);
}

static void test_tcp_reset(void **state) {
  (void)state;
  expect_hangup(tcp_pair, close_reset, "connection reset");
}

/* A Unix peer that closes with our data unread resets the connection. */
static void test_unix_reset(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "unix-reset");
  int mine, peer;
  unix_pair(&mine, &peer);
  assert_int_equal(send(mine, "unread", 6, 0), 6);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_gone(&x, "connection reset");
  assert_int_equal(cancel_unwatch(&x.w), 0);
  /* The watch left the socket's pending error for its owner. */
  char c;
  assert_int_equal(recv(mine, &c, 1, 0), -1);
  assert_int_equal(errno, ECONNRESET);
  close(mine);
  watched_fini(&x);
}

/* A pipe's reading end: the writer closing is a hang-up too. */
static void test_pipe_writer_close(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "pipe");
  int p[2];
  assert_int_equal(pipe2(p, O_CLOEXEC), 0);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, p[0]), 0);
  close(p[1]);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_gone(&x, "peer closed");
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(p[0]);
  watched_fini(&x);
}

/* A peer that left before the watch was armed is seen at once. */
static void test_gone_before_watch(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "early");
  int mine, peer;
  tcp_pair(&mine, &peer);
  close(peer);
  char c;
  assert_int_equal(recv(mine, &c, 1, 0), 0); /* the FIN is here */
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_i64_le(x.at - t0, prompt_tol());
  assert_gone(&x, "peer closed");
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(mine);
  watched_fini(&x);
}

/* ---- Data is not a hang-up -------------------------------------------- */

static void data_keeps_live(pair_fn *pair) {
  struct watched x;
  watched_init(&x, "data");
  int mine, peer;
  pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_int_equal(send(peer, "GET / HTTP/1.1\r\n", 16, 0), 16);

  /* The data has arrived and sits unread: the socket is readable. */
  struct pollfd pfd = {mine, POLLIN, 0};
  assert_int_equal(poll(&pfd, 1, (int)(must_wait() / 1000000)), 1);
  assert_true(pfd.revents & POLLIN);
  test_sleep_ns(quiet_ns());
  assert_false(cancel_token_is_cancelled(TOK(x.src)));

  /* Received by us: still nothing. */
  char buf[64];
  assert_int_equal(recv(mine, buf, sizeof buf, 0), 16);
  assert_memory_equal(buf, "GET / HTTP/1.1\r\n", 16);
  assert_int_equal(send(peer, "more", 4, 0), 4);
  assert_int_equal(poll(&pfd, 1, (int)(must_wait() / 1000000)), 1);
  test_sleep_ns(quiet_ns());
  assert_false(cancel_token_is_cancelled(TOK(x.src)));
  assert_int_equal(test_load(&x.count), 0);

  /* The watch is still armed: the close is seen. */
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  /* With data unread on our side, a close is still "peer closed". */
  assert_gone(&x, "peer closed");
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(mine);
  watched_fini(&x);
}

static void test_tcp_data_is_not_hangup(void **state) {
  (void)state;
  data_keeps_live(tcp_pair);
}

static void test_unix_data_is_not_hangup(void **state) {
  (void)state;
  data_keeps_live(unix_pair);
}

/* ---- Unwatch ---------------------------------------------------------- */

static void test_unwatch_before_close(void **state) {
  (void)state;
  pair_fn *pairs[] = {tcp_pair, unix_pair};
  for (int i = 0; i < 2; i++) {
    struct watched x;
    watched_init(&x, "unwatched");
    int mine, peer;
    pairs[i](&mine, &peer);
    assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
    assert_int_equal(cancel_unwatch(&x.w), 1); /* still armed */
    close(peer);
    test_sleep_ns(quiet_ns());
    assert_false(cancel_token_is_cancelled(TOK(x.src)));
    assert_int_equal(test_load(&x.count), 0);
    /* The connection is ours again: its end of file is there to read. */
    char c;
    assert_int_equal(recv(mine, &c, 1, 0), 0);
    close(mine);
    watched_fini(&x);
  }
}

/* Open descriptors of the process. */
static int fd_count(void) {
  DIR *d = opendir("/proc/self/fd");
  assert_non_null(d);
  int n = 0;
  struct dirent *e;
  while ((e = readdir(d)) != NULL)
    n += e->d_name[0] != '.';
  closedir(d);
  return n;
}

/* The watch owns one descriptor (its dup) while armed, none after. */
static void test_watch_owns_one_descriptor(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "fds");
  int mine, peer;
  tcp_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_int_equal(cancel_unwatch(&x.w), 1); /* the reactor is running now */
  int before = fd_count();
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_int_equal(fd_count(), before + 1);
  assert_int_equal(cancel_unwatch(&x.w), 1);
  assert_int_equal(fd_count(), before);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_int_equal(fd_count(), before - 1 + 1); /* peer closed, dup open */
  assert_int_equal(cancel_unwatch(&x.w), 0);
  assert_int_equal(fd_count(), before - 1);
  close(mine);
  watched_fini(&x);
}

static void test_unwatch_results(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "results");
  int mine, peer;
  tcp_pair(&mine, &peer);

  cancel_watch zero = {0};
  assert_int_equal(cancel_unwatch(&zero), -EINVAL); /* never armed */
  assert_int_equal(cancel_unwatch(NULL), -EINVAL);

  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_int_equal(cancel_unwatch(&x.w), 1);
  assert_int_equal(cancel_unwatch(&x.w), -EINVAL); /* twice */

  /* Re-armed after an unwatch, fired, unwatched: 0. */
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_int_equal(cancel_unwatch(&x.w), 0);
  assert_int_equal(cancel_unwatch(&x.w), -EINVAL);
  close(mine);
  watched_fini(&x);
}

static void test_bad_arguments(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "bad");
  int mine, peer;
  unix_pair(&mine, &peer);
  cancel_watch w = {0};

  assert_int_equal(cancel_watch_hangup(NULL, x.src, mine), -EINVAL);
  assert_int_equal(cancel_watch_hangup(&w, NULL, mine), -EINVAL);
  assert_int_equal(cancel_watch_hangup(&w, x.src, -1), -EBADF);
  int closed = dup(mine);
  close(closed);
  assert_int_equal(cancel_watch_hangup(&w, x.src, closed), -EBADF);
  /* A regular file cannot be polled for a hang-up. */
  FILE *f = tmpfile();
  assert_non_null(f);
  assert_int_equal(cancel_watch_hangup(&w, x.src, fileno(f)), -EPERM);
  fclose(f);
  /* Nothing stayed armed after the failures. */
  assert_int_equal(cancel_unwatch(&w), -EINVAL);

  /* Arming an armed watch is refused, and the first watch still works. */
  assert_int_equal(cancel_watch_hangup(&w, x.src, mine), 0);
  assert_int_equal(cancel_watch_hangup(&w, x.src, mine), -EBUSY);
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_int_equal(cancel_unwatch(&w), 0);
  close(mine);
  watched_fini(&x);
}

/* The watch holds a reference: the owner may drop its own while armed. */
static void test_watch_keeps_source_alive(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "kept");
  int mine, peer;
  tcp_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  cancel_source *src = x.src;
  cancel_source_unref(cancel_source_ref(src)); /* balanced: still ours */
  /* Drop ours: the watch's keeps the source (and its callback) alive. */
  cancel_source_unref(src);
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_true(x.on_reactor);
  assert_int_equal(cancel_unregister(&x.reg), 0);
  /* The last reference goes here (ASan / valgrind check the rest). */
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(mine);
  sem_destroy(&x.sem);
}

/* A callback of the source unwatches from the reactor thread: no wait on
 * itself, and the result says the watch fired. */
struct self_unwatch {
  cancel_watch w;
  sem_t sem;
  int rc;
};

static void self_unwatch_cb(void *arg) {
  struct self_unwatch *s = arg;
  s->rc = cancel_unwatch(&s->w);
  sem_post(&s->sem);
}

/* Returns once the reactor thread has finished what it was doing: a timer
 * armed now fires on it after the callback it may be running. */
static void reactor_barrier(void) {
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_source *b;
  assert_int_equal(cancel_source_new(&b, "barrier"), 0);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(b), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(b, 1), 0);
  assert_int_equal(test_sem_wait_ns(&f.sem, must_wait()), 0);
  assert_int_equal(cancel_unregister(&reg), 0);
  cancel_source_unref(b);
  sem_destroy(&f.sem);
}

static void test_unwatch_from_callback(void **state) {
  (void)state;
  struct self_unwatch s;
  memset(&s, 0, sizeof s);
  sem_init(&s.sem, 0, 0);
  s.rc = 99;
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "self"), 0);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(src), self_unwatch_cb, &s), 0);
  int mine, peer;
  unix_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&s.w, src, mine), 0);
  close(peer);
  assert_int_equal(test_sem_wait_ns(&s.sem, must_wait()), 0);
  /* The callback may still be returning: unregister waits for it. */
  assert_int_equal(cancel_unregister(&reg), 0);
  assert_int_equal(s.rc, 0);
  assert_int_equal(cancel_unwatch(&s.w), -EINVAL);
  cancel_source_unref(src);
  close(mine);
  sem_destroy(&s.sem);
}

/* The same when the unwatch in the callback drops the source's last
 * reference while its cancel is running.  The cancel still touches the
 * registration after the callback returned, and nothing is left to
 * unregister it with: static storage, and a reactor barrier to know the
 * cancel (and the source's teardown) has finished. */
static void test_unwatch_from_callback_last_ref(void **state) {
  (void)state;
  static struct self_unwatch s;
  static cancel_reg reg;
  memset(&s, 0, sizeof s);
  sem_init(&s.sem, 0, 0);
  s.rc = 99;
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "self-last"), 0);
  assert_int_equal(cancel_register(&reg, TOK(src), self_unwatch_cb, &s), 0);
  int mine, peer;
  unix_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&s.w, src, mine), 0);
  cancel_source_unref(src); /* the watch's reference is the last */
  close(peer);
  assert_int_equal(test_sem_wait_ns(&s.sem, must_wait()), 0);
  reactor_barrier();
  assert_int_equal(s.rc, 0);
  assert_int_equal(cancel_unwatch(&s.w), -EINVAL);
  close(mine);
  sem_destroy(&s.sem);
}

/* ---- Descriptor reuse ------------------------------------------------- */

static void test_fd_reuse(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "first");
  int a, pa;
  tcp_pair(&a, &pa);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, a), 0);

  /* The caller closes its descriptor (while still watching: the misuse
   * this protects against) and the number comes back for another
   * connection. */
  int num = a;
  close(a);
  int b, pb;
  unix_pair(&b, &pb);
  if (b != num) {
    assert_int_equal(dup2(b, num), num);
    close(b);
    b = num;
  }

  /* The new connection's peer leaving is not the first one's. */
  close(pb);
  test_sleep_ns(quiet_ns());
  assert_false(cancel_token_is_cancelled(TOK(x.src)));

  /* The first connection's peer leaving is, through the watch's dup. */
  int64_t t0 = cancel_now();
  close(pa);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_i64_le(x.at - t0, prompt_tol());
  assert_gone(&x, "peer closed");

  /* Unwatch closes the watch's dup, not the number the caller reused. */
  assert_int_equal(cancel_unwatch(&x.w), 0);
  assert_true(fcntl(b, F_GETFD) >= 0);
  char c;
  assert_int_equal(recv(b, &c, 1, 0), 0); /* pb's close, still readable */
  close(b);
  watched_fini(&x);
}

/* The same with a live new connection: it stays usable after unwatch. */
static void test_fd_reuse_new_socket_usable(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "old");
  int a, pa;
  unix_pair(&a, &pa);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, a), 0);
  int num = a;
  close(a);
  int b, pb;
  tcp_pair(&b, &pb);
  if (b != num) {
    assert_int_equal(dup2(b, num), num);
    close(b);
    b = num;
  }
  close(pa);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_int_equal(cancel_unwatch(&x.w), 0);
  /* b works both ways. */
  assert_int_equal(send(b, "ping", 4, MSG_NOSIGNAL), 4);
  char buf[8];
  assert_int_equal(recv(pb, buf, sizeof buf, 0), 4);
  assert_int_equal(send(pb, "pong", 4, MSG_NOSIGNAL), 4);
  assert_int_equal(recv(b, buf, sizeof buf, 0), 4);
  assert_memory_equal(buf, "pong", 4);
  close(pb);
  close(b);
  watched_fini(&x);
}

/* ---- Many watches ----------------------------------------------------- */

static void test_many_watches_random_close(void **state) {
  (void)state;
  enum { N = 100 };
  struct watched *x = calloc(N, sizeof *x);
  int mine[N], peer[N], order[N];
  assert_non_null(x);
  int l = tcp_listener();
  for (int i = 0; i < N; i++) {
    char name[16];
    snprintf(name, sizeof name, "conn%d", i);
    watched_init(&x[i], name);
    tcp_pair_on(l, &mine[i], &peer[i]);
    assert_int_equal(cancel_watch_hangup(&x[i].w, x[i].src, mine[i]), 0);
    order[i] = i;
  }
  close(l);
  unsigned seed = 12345;
  for (int i = N - 1; i > 0; i--) {
    int j = (int)(rand_r(&seed) % (unsigned)(i + 1));
    int t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  bool closed[N] = {false};
  for (int k = 0; k < N; k++) {
    int i = order[k];
    close(peer[i]);
    closed[i] = true;
    assert_int_equal(test_sem_wait_ns(&x[i].sem, must_wait()), 0);
    assert_gone(&x[i], "peer closed");
    /* Exactly the closed ones are cancelled, each once. */
    for (int j = 0; j < N; j++) {
      assert_int_equal(cancel_token_is_cancelled(TOK(x[j].src)), closed[j]);
      assert_int_equal(test_load(&x[j].count), closed[j] ? 1 : 0);
    }
  }
  for (int i = 0; i < N; i++) {
    assert_int_equal(cancel_unwatch(&x[i].w), 0);
    close(mine[i]);
    watched_fini(&x[i]);
  }
  free(x);
}

/* ---- Unwatch racing the hang-up --------------------------------------- */

struct racer {
  sem_t go, done;
  int fd;
  unsigned spin;
  bool quit;
};

static void stop_racer(void *arg) {
  struct racer *r = arg;
  r->quit = true;
  sem_post(&r->go);
}

static void *racer_main(void *arg) {
  struct racer *r = arg;
  for (;;) {
    sem_wait(&r->go);
    if (r->quit)
      return NULL;
    for (unsigned i = 0; i < r->spin; i++)
      cancel__cpu_relax();
    close(r->fd);
    sem_post(&r->done);
  }
}

static void test_unwatch_races_hangup(void **state) {
  (void)state;
  int rounds = test_time_scale() > 1.0 ? 1000 : 4000;
  /* Shared: a failed assertion leaves the racer to the teardown. */
  struct racer *rp = test_shared(sizeof *rp);
  sem_init(&rp->go, 0, 0);
  sem_init(&rp->done, 0, 0);
  pthread_t t = test_helper_start(racer_main, rp, stop_racer);
  unsigned seed = 42;
  int armed = 0, fired = 0;
  for (int i = 0; i < rounds; i++) {
    struct watched x;
    watched_init(&x, "race");
    int mine, peer;
    unix_pair(&mine, &peer);
    assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
    rp->fd = peer;
    rp->spin = rand_r(&seed) % 4000;
    unsigned my_spin = rand_r(&seed) % 4000;
    sem_post(&rp->go);
    for (unsigned k = 0; k < my_spin; k++)
      cancel__cpu_relax();
    int rc = cancel_unwatch(&x.w);
    /* Decided on return: 1 means it never fires, 0 that it has fired and
     * its cancel (with the source's callbacks) has finished. */
    if (rc == 1) {
      armed++;
      assert_false(cancel_token_is_cancelled(TOK(x.src)));
      assert_int_equal(test_load(&x.count), 0);
    } else {
      assert_int_equal(rc, 0);
      fired++;
      assert_int_equal(cancel_token_kind(TOK(x.src)), CANCEL_CLIENT_GONE);
      assert_int_equal(test_load(&x.count), 1);
    }
    sem_wait(&rp->done);
    assert_int_equal(test_load(&x.count), rc == 0 ? 1 : 0);
    assert_int_equal(cancel_token_is_cancelled(TOK(x.src)), rc == 0);
    close(mine);
    watched_fini(&x);
  }
  stop_racer(rp);
  test_helper_join(t);
  sem_destroy(&rp->go);
  sem_destroy(&rp->done);
  print_message("unwatch race: %d rounds, %d unwatched armed, %d after the "
                "hang-up\n",
                rounds, armed, fired);
  assert_int_equal(armed + fired, rounds);
}

/* ---- Latency ---------------------------------------------------------- */

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

/* Peer close to the source's callback on the reactor, TCP over loopback:
 * printed (p50, p99, max), and the p50 bounded by the tolerance. */
static void test_hangup_latency(void **state) {
  (void)state;
  enum { N = 200 };
  int64_t lat[N];
  int l = tcp_listener();
  for (int i = 0; i < N; i++) {
    struct watched x;
    watched_init(&x, "lat");
    int mine, peer;
    tcp_pair_on(l, &mine, &peer);
    assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
    int64_t t0 = cancel_now();
    close(peer);
    assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
    lat[i] = x.at - t0;
    assert_int_equal(cancel_unwatch(&x.w), 0);
    close(mine);
    watched_fini(&x);
  }
  close(l);
  qsort(lat, N, sizeof lat[0], cmp_i64);
  print_message("hang-up latency (TCP loopback close -> callback): p50 %.1f "
                "us, p99 %.1f us, max %.1f us\n",
                (double)lat[N / 2] / 1e3, (double)lat[N * 99 / 100] / 1e3,
                (double)lat[N - 1] / 1e3);
  assert_i64_le(lat[N / 2], prompt_tol());
}

/* ---- The reactor keeps running while watches exist -------------------- */

static void test_reactor_stays_for_watches(void **state) {
  (void)state;
  struct watched x;
  watched_init(&x, "idle");
  int mine, peer;
  unix_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  /* Longer than the reactor's idle linger (2 s) with no timer armed: an
   * idle exit would leave the watch unserved. */
  test_sleep_ns(CANCEL_MSEC(2600));
  int64_t t0 = cancel_now();
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_i64_le(x.at - t0, prompt_tol());
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(mine);
  watched_fini(&x);
}

/* ---- The reactor's watch API ------------------------------------------ */

struct rwatch {
  struct cancel__fdwatch rw;
  sem_t entered, release;
  int calls;
  uint32_t events;
  bool block;       /* wait on `release` inside the callback */
  bool drain;       /* read the eventfd */
  bool self_remove; /* remove itself from inside the callback */
  int self_rc;
  bool on_reactor;
  bool returned;
};

static void rwatch_cb(void *arg, uint32_t events) {
  /* Atomics: the test orders its reads before the next callback through
   * an eventfd write, a happens-before that TSan does not model. */
  struct rwatch *r = arg;
  __atomic_store_n(&r->events, events, __ATOMIC_SEQ_CST);
  __atomic_store_n(&r->on_reactor, cancel__on_reactor(), __ATOMIC_SEQ_CST);
  __atomic_add_fetch(&r->calls, 1, __ATOMIC_SEQ_CST);
  if (r->drain) {
    uint64_t v;
    ssize_t n = read(r->rw.fd, &v, sizeof v);
    (void)n;
  }
  if (r->self_remove)
    r->self_rc = cancel__reactor_watch_del(&r->rw);
  sem_post(&r->entered);
  if (r->block)
    sem_wait(&r->release);
  __atomic_store_n(&r->returned, true, __ATOMIC_SEQ_CST);
}

static void rwatch_init(struct rwatch *r) {
  memset(r, 0, sizeof *r);
  sem_init(&r->entered, 0, 0);
  sem_init(&r->release, 0, 0);
}

static void efd_post(int efd) {
  uint64_t one = 1;
  assert_int_equal(write(efd, &one, sizeof one), (ssize_t)sizeof one);
}

static void test_reactor_watch_level_and_oneshot(void **state) {
  (void)state;
  struct rwatch r;
  rwatch_init(&r);
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  assert_true(efd >= 0);

  /* Level-triggered, drained by the callback: one call per post. */
  r.drain = true;
  assert_int_equal(
      cancel__reactor_watch_add(&r.rw, efd, EPOLLIN, rwatch_cb, &r), 0);
  for (int i = 1; i <= 3; i++) {
    efd_post(efd);
    assert_int_equal(test_sem_wait_ns(&r.entered, must_wait()), 0);
    assert_int_equal(test_load(&r.calls), i);
    assert_true(__atomic_load_n(&r.events, __ATOMIC_SEQ_CST) & EPOLLIN);
    assert_true(__atomic_load_n(&r.on_reactor, __ATOMIC_SEQ_CST));
  }
  /* Registered twice: epoll's -EEXIST. */
  struct rwatch r2;
  rwatch_init(&r2);
  assert_int_equal(
      cancel__reactor_watch_add(&r2.rw, efd, EPOLLIN, rwatch_cb, &r2), -EEXIST);

  /* One-shot, not drained: one call, then silence until re-armed. */
  r.drain = false;
  assert_int_equal(cancel__reactor_watch_mod(&r.rw, EPOLLIN | EPOLLONESHOT), 0);
  efd_post(efd);
  assert_int_equal(test_sem_wait_ns(&r.entered, must_wait()), 0);
  test_sleep_ns(quiet_ns());
  assert_int_equal(test_load(&r.calls), 4);
  assert_int_equal(cancel__reactor_watch_mod(&r.rw, EPOLLIN | EPOLLONESHOT),
                   0); /* still readable: fires again */
  assert_int_equal(test_sem_wait_ns(&r.entered, must_wait()), 0);
  assert_int_equal(test_load(&r.calls), 5);

  assert_int_equal(cancel__reactor_watch_del(&r.rw), 0);
  assert_int_equal(cancel__reactor_watch_del(&r.rw), -ENOENT);
  assert_int_equal(cancel__reactor_watch_mod(&r.rw, EPOLLIN), -ENOENT);
  /* Removed: a re-armed descriptor stays silent. */
  efd_post(efd);
  test_sleep_ns(quiet_ns());
  assert_int_equal(test_load(&r.calls), 5);

  assert_int_equal(cancel__reactor_watch_add(&r.rw, -1, EPOLLIN, rwatch_cb, &r),
                   -EBADF);
  FILE *f = tmpfile();
  assert_non_null(f);
  assert_int_equal(
      cancel__reactor_watch_add(&r.rw, fileno(f), EPOLLIN, rwatch_cb, &r),
      -EPERM);
  fclose(f);
  close(efd);
  sem_destroy(&r.entered);
  sem_destroy(&r.release);
  sem_destroy(&r2.entered);
  sem_destroy(&r2.release);
}

struct del_arg {
  struct rwatch *r;
  int rc;
  bool callback_returned; /* what del saw when it returned */
  bool done;
};

static void *del_thread(void *arg) {
  struct del_arg *d = arg;
  d->rc = cancel__reactor_watch_del(&d->r->rw);
  d->callback_returned = __atomic_load_n(&d->r->returned, __ATOMIC_SEQ_CST);
  __atomic_store_n(&d->done, true, __ATOMIC_SEQ_CST);
  return NULL;
}

/* Remove waits for a callback running on the reactor, like a timer disarm
 * waits for a firing timer. */
static void test_reactor_del_waits_for_callback(void **state) {
  (void)state;
  struct rwatch r;
  rwatch_init(&r);
  r.block = true;
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  assert_int_equal(cancel__reactor_watch_add(&r.rw, efd, EPOLLIN | EPOLLONESHOT,
                                             rwatch_cb, &r),
                   0);
  efd_post(efd);
  assert_int_equal(test_sem_wait_ns(&r.entered, must_wait()), 0);

  struct del_arg d = {&r, 99, false, false};
  pthread_t t = test_thread_start(del_thread, &d);
  test_sleep_ns(quiet_ns());
  assert_false(__atomic_load_n(&d.done, __ATOMIC_SEQ_CST)); /* waiting */
  sem_post(&r.release);
  test_thread_join(t);
  assert_int_equal(d.rc, 0);
  assert_true(d.callback_returned);
  close(efd);
  sem_destroy(&r.entered);
  sem_destroy(&r.release);
}

/* A callback removing its own watch does not wait for itself. */
static void test_reactor_del_from_callback(void **state) {
  (void)state;
  struct rwatch r;
  rwatch_init(&r);
  r.self_remove = true;
  r.self_rc = 99;
  int efd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  assert_int_equal(
      cancel__reactor_watch_add(&r.rw, efd, EPOLLIN, rwatch_cb, &r), 0);
  efd_post(efd); /* level-triggered, never drained */
  assert_int_equal(test_sem_wait_ns(&r.entered, must_wait()), 0);
  /* Removed from the first call: no second one although still readable. */
  test_sleep_ns(quiet_ns());
  assert_int_equal(test_load(&r.calls), 1);
  assert_int_equal(r.self_rc, 0);
  assert_int_equal(cancel__reactor_watch_del(&r.rw), -ENOENT);
  close(efd);
  sem_destroy(&r.entered);
  sem_destroy(&r.release);
}

/* ---- Quiet threads before fork() -------------------------------------- */

/* An event that epoll_wait handed out for a watch removed before its
 * dispatch must not reach the watch that took over its slot.  D holds the
 * reactor while C and A become ready, so that the next epoll_wait returns
 * C and A in one batch (the ready list is in order); C then holds the
 * reactor while A is removed and B takes A's slot (the free list is LIFO).
 * Released, the reactor finds A's event: it must be dropped, not run B. */
static void test_reactor_stale_event_after_reuse(void **state) {
  (void)state;
  struct rwatch a, b, c, d;
  rwatch_init(&a);
  rwatch_init(&b);
  rwatch_init(&c);
  rwatch_init(&d);
  c.block = d.block = true;
  int ea = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  int eb = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  int ec = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  int ed = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  uint32_t os = EPOLLIN | EPOLLONESHOT;
  assert_int_equal(cancel__reactor_watch_add(&d.rw, ed, os, rwatch_cb, &d), 0);
  assert_int_equal(cancel__reactor_watch_add(&c.rw, ec, os, rwatch_cb, &c), 0);
  assert_int_equal(cancel__reactor_watch_add(&a.rw, ea, os, rwatch_cb, &a), 0);

  efd_post(ed);
  assert_int_equal(test_sem_wait_ns(&d.entered, must_wait()), 0);
  efd_post(ec);
  efd_post(ea);
  sem_post(&d.release);
  assert_int_equal(test_sem_wait_ns(&c.entered, must_wait()), 0);

  uint32_t a_slot = a.rw.slot;
  assert_int_equal(cancel__reactor_watch_del(&a.rw), 0);
  assert_int_equal(cancel__reactor_watch_add(&b.rw, eb, EPOLLIN, rwatch_cb, &b),
                   0);
  assert_int_equal(b.rw.slot, a_slot); /* the case under test */
  sem_post(&c.release);

  test_sleep_ns(quiet_ns());
  assert_int_equal(test_load(&b.calls), 0); /* eb was never readable */
  assert_int_equal(test_load(&a.calls), 0); /* removed before dispatch */
  assert_int_equal(cancel__reactor_watch_del(&b.rw), 0);
  assert_int_equal(cancel__reactor_watch_del(&c.rw), 0);
  assert_int_equal(cancel__reactor_watch_del(&d.rw), 0);
  close(ea);
  close(eb);
  close(ec);
  close(ed);
  struct rwatch *all[] = {&a, &b, &c, &d};
  for (int i = 0; i < 4; i++) {
    sem_destroy(&all[i]->entered);
    sem_destroy(&all[i]->release);
  }
}

/* ---- fork ------------------------------------------------------------- */

#if defined(__SANITIZE_THREAD__)
#define TEST_UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define TEST_UNDER_TSAN 1
#endif
#endif

/* In the child: the parent's watch is not armed here (unwatch returns 1 at
 * once and closes only the child's copies); a new watch works.  No cmocka
 * calls: the result is the exit status. */
static int child_after_fork(cancel_watch *inherited) {
  if (cancel_unwatch(inherited) != 1)
    return 2;
  cancel_source *s;
  if (cancel_source_new(&s, "child") != 0)
    return 3;
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  if (cancel_register(&reg, TOK(s), fire_cb, &f) != 0)
    return 4;
  int sv[2];
  if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0)
    return 5;
  cancel_watch w = {0};
  if (cancel_watch_hangup(&w, s, sv[0]) != 0)
    return 6;
  close(sv[1]);
  if (test_sem_wait_ns(&f.sem, CANCEL_SEC(5)) != 0)
    return 7;
  if (cancel_token_kind(TOK(s)) != CANCEL_CLIENT_GONE)
    return 8;
  if (cancel_unwatch(&w) != 0)
    return 9;
  cancel_unregister(&reg);
  cancel_source_unref(s);
  close(sv[0]);
  return 0;
}

static void test_fork(void **state) {
  (void)state;
#ifdef TEST_UNDER_TSAN
  print_message("fork test skipped under ThreadSanitizer\n");
  skip();
#endif
  struct watched x;
  watched_init(&x, "parent");
  int mine, peer;
  unix_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup(&x.w, x.src, mine), 0);
  assert_true(test_others_asleep(must_wait()));
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    alarm((unsigned)(must_wait() / CANCEL_SEC(1)) + 5); /* not inherited */
    _exit(child_after_fork(&x.w));
  }
  int status = 0;
  assert_int_equal(waitpid(pid, &status, 0), pid);
  assert_true(WIFEXITED(status));
  assert_int_equal(WEXITSTATUS(status), 0);
  /* The child's unwatch did not disturb the parent's watch. */
  assert_false(cancel_token_is_cancelled(TOK(x.src)));
  close(peer);
  assert_int_equal(test_sem_wait_ns(&x.sem, must_wait()), 0);
  assert_gone(&x, "peer closed");
  assert_int_equal(cancel_unwatch(&x.w), 0);
  close(mine);
  watched_fini(&x);
}

/* ---- cancel_watch_hangup_fn: a callback instead of a cancel ----------- */

struct hup_rec {
  sem_t sem;
  int count, reset;
  bool on_reactor;
};

static void hup_cb(void *arg, int reset) {
  struct hup_rec *h = arg;
  h->reset = reset;
  h->on_reactor = cancel__on_reactor();
  __atomic_add_fetch(&h->count, 1, __ATOMIC_SEQ_CST);
  sem_post(&h->sem);
}

static void test_hangup_fn(void **state) {
  (void)state;
  cancel_metrics m0, m1;
  cancel_metrics_get(&m0);
  /* Peer closed: reset 0; reset: 1; on the reactor, once; nothing is
   * cancelled, so no "client gone" is counted. */
  for (int rst = 0; rst < 2; rst++) {
    struct hup_rec h = {0};
    sem_init(&h.sem, 0, 0);
    cancel_watch w = {0};
    int mine, peer;
    tcp_pair(&mine, &peer);
    assert_int_equal(cancel_watch_hangup_fn(&w, mine, hup_cb, &h), 0);
    if (rst)
      close_reset(peer);
    else
      close(peer);
    assert_int_equal(test_sem_wait_ns(&h.sem, must_wait()), 0);
    assert_int_equal(h.reset, rst);
    assert_true(h.on_reactor);
    assert_int_equal(cancel_unwatch(&w), 0);
    assert_int_equal(test_load(&h.count), 1);
    close(mine);
    sem_destroy(&h.sem);
  }
  cancel_metrics_get(&m1);
  assert_int_equal(m1.cancellations[CANCEL_CLIENT_GONE],
                   m0.cancellations[CANCEL_CLIENT_GONE]);
  /* Never fired: unwatch says 1.  Bad arguments. */
  struct hup_rec h = {0};
  cancel_watch w = {0};
  int mine, peer;
  unix_pair(&mine, &peer);
  assert_int_equal(cancel_watch_hangup_fn(&w, mine, hup_cb, &h), 0);
  assert_int_equal(cancel_watch_hangup_fn(&w, mine, hup_cb, &h), -EBUSY);
  assert_int_equal(cancel_unwatch(&w), 1);
  assert_int_equal(test_load(&h.count), 0);
  assert_int_equal(cancel_watch_hangup_fn(&w, mine, NULL, &h), -EINVAL);
  assert_int_equal(cancel_watch_hangup_fn(NULL, mine, hup_cb, &h), -EINVAL);
  assert_int_equal(cancel_watch_hangup_fn(&w, -1, hup_cb, &h), -EBADF);
  close(mine);
  close(peer);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_tcp_peer_close),
      cmocka_unit_test(test_hangup_fn),
      cmocka_unit_test(test_unix_peer_close),
      cmocka_unit_test(test_tcp_shutdown_wr),
      cmocka_unit_test(test_unix_shutdown_wr),
      cmocka_unit_test(test_tcp_reset),
      cmocka_unit_test(test_unix_reset),
      cmocka_unit_test(test_pipe_writer_close),
      cmocka_unit_test(test_gone_before_watch),
      cmocka_unit_test(test_tcp_data_is_not_hangup),
      cmocka_unit_test(test_unix_data_is_not_hangup),
      cmocka_unit_test(test_unwatch_before_close),
      cmocka_unit_test(test_unwatch_results),
      cmocka_unit_test(test_watch_owns_one_descriptor),
      cmocka_unit_test(test_bad_arguments),
      cmocka_unit_test(test_watch_keeps_source_alive),
      cmocka_unit_test(test_unwatch_from_callback),
      cmocka_unit_test(test_unwatch_from_callback_last_ref),
      cmocka_unit_test(test_fd_reuse),
      cmocka_unit_test(test_fd_reuse_new_socket_usable),
      cmocka_unit_test(test_many_watches_random_close),
      cmocka_unit_test(test_unwatch_races_hangup),
      cmocka_unit_test(test_hangup_latency),
      cmocka_unit_test(test_reactor_stays_for_watches),
      cmocka_unit_test(test_reactor_watch_level_and_oneshot),
      cmocka_unit_test(test_reactor_del_waits_for_callback),
      cmocka_unit_test(test_reactor_del_from_callback),
      cmocka_unit_test(test_reactor_stale_event_after_reuse),
      cmocka_unit_test(test_fork),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
