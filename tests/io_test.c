/*
 * The descriptor I/O of src/io.c: cancel_read, cancel_write,
 * cancel_read_full, cancel_write_full, cancel_recv, cancel_send,
 * cancel_accept and cancel_connect, beside the readiness waits they are
 * built on (src/wait.c's cancel_poll and cancel_wait_fd, whose own tests
 * are in wait_test.c), over real pipes and real loopback
 * sockets (Unix socketpair, Unix path, TCP over 127.0.0.1 and ::1; IPv6
 * tests skip when the machine has no ::1), blocking and O_NONBLOCK.
 *
 * The first part is a table: every (wait, transport, mode) case goes
 * through the same scenarios, each its own cmocka test named
 * "<wait>/<transport>/<scenario>":
 *   ready         ready before the call: completes, no blocking;
 *   wakes         made ready while the waiter is blocked: completes;
 *   cancel_timer  cancelled by a timer 20 ms into the wait: -ECANCELED
 *                 at >= 20 ms and promptly; the descriptor untouched;
 *   cancel_thread cancelled from another thread once the waiter is seen
 *                 asleep: -ECANCELED promptly;
 *   cancel_before cancelled before the call: -ECANCELED at once, the
 *                 descriptor not touched (data stays, nothing written,
 *                 the pending connection stays queued);
 *   deadline      -ETIMEDOUT at the deadline, not before;
 *   past          a deadline already passed is a poll: -ETIMEDOUT at once
 *                 when not ready, the result when ready;
 *   far           deadlines near INT64_MAX do not overflow into "passed";
 *   signals       a storm of SIGUSR1 (no SA_RESTART) during the wait: it
 *                 ends only for its real reason (completion, cancel,
 *                 deadline), never with -EINTR or a spurious -ECANCELED;
 *   stale         a wake-up meant for an earlier wait of the same thread
 *                 does not end its next wait.
 * Every scenario also checks that the descriptor's O_NONBLOCK mode is as
 * it was.
 *
 * The second part tests what the table cannot: hang-ups and end of file;
 * partial progress of the *_full calls (cancelled or timed out
 * mid-transfer, *done equal to what the other side really got); accept's flags
 * and address, accept on what is not a listener, several threads accepting on
 * one listener; named pipes (FIFOs take no RWF_NOWAIT) with big writes and
 * racing readers; connect's success, refusal, a hanging connect (a TCP listener
 * with a full backlog: no traffic leaves loopback) and its completion; bad
 * input; no descriptor leak per thread.
 *
 * CANCEL_TEST_FILTER / CANCEL_TEST_SKIP (cmocka globs on the test names)
 * run or skip a subset, e.g. CANCEL_TEST_SKIP='*past'.
 */
#include "test_util.h"

#include <arpa/inet.h>
#include <limits.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/types.h>
#include <sys/un.h>

/* How late a wake-up may be.  Generous on purpose: on a loaded shared
 * machine (parallel ctest on two cores) a timer thread waits 100-200 ms
 * for a CPU.  What is asserted is that the wait ended by the right cause,
 * not how fast: precision is measured by make bench. */
#define LATE CANCEL_MSEC(200)
#define AT_ONCE CANCEL_MSEC(20)

/* ---- Data ------------------------------------------------------------- */

/* The byte at offset i of every transfer: a hash, so that a shifted or
 * repeated chunk does not compare equal. */
static unsigned char pat(size_t i) {
  return (unsigned char)(((uint32_t)i * 2654435761u) >> 24);
}

static void fill_pat(unsigned char *buf, size_t off, size_t len) {
  for (size_t i = 0; i < len; i++)
    buf[i] = pat(off + i);
}

/* Returns the first offset where buf differs from the pattern at off, or
 * len when it matches. */
static size_t check_pat(const unsigned char *buf, size_t off, size_t len) {
  for (size_t i = 0; i < len; i++)
    if (buf[i] != pat(off + i))
      return i;
  return len;
}

enum { PAYLOAD = 100 };
static unsigned char payload[PAYLOAD];

/* ---- Descriptor helpers ----------------------------------------------- */

static int get_fl(int fd) {
  int fl = fcntl(fd, F_GETFL);
  assert_true(fl >= 0);
  return fl;
}

static void set_nonblock(int fd, bool on) {
  int fl = get_fl(fd);
  fl = on ? fl | O_NONBLOCK : fl & ~O_NONBLOCK;
  assert_int_equal(fcntl(fd, F_SETFL, fl), 0);
}

static bool is_nonblock(int fd) {
  return (get_fl(fd) & O_NONBLOCK) != 0;
}

/* poll() one descriptor, retrying EINTR: revents or 0 on timeout. */
static int poll1(int fd, short events, int ms) {
  struct pollfd p = {.fd = fd, .events = events};
  int r;
  do
    r = poll(&p, 1, ms);
  while (r < 0 && errno == EINTR);
  assert_true(r >= 0);
  return r == 0 ? 0 : p.revents;
}

/* Bytes waiting to be read on fd (pipes and stream sockets). */
static int pending(int fd) {
  int n = -1;
  assert_int_equal(ioctl(fd, FIONREAD, &n), 0);
  return n;
}

/* Reads exactly len bytes (blocking or not), each chunk waited for at most
 * wait_ms.  Returns the bytes read (less only on timeout or EOF). */
static size_t read_exact(int fd, void *buf, size_t len, int wait_ms) {
  size_t got = 0;
  while (got < len) {
    if (!(poll1(fd, POLLIN, wait_ms) & (POLLIN | POLLHUP)))
      break;
    ssize_t r = read(fd, (char *)buf + got, len - got);
    if (r < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    if (r <= 0)
      break;
    got += (size_t)r;
  }
  return got;
}

/* Reads whatever is there without blocking; verifies it continues the
 * pattern from off.  Returns the bytes read. */
static size_t drain_pat(int fd, size_t off) {
  unsigned char buf[8192];
  size_t total = 0;
  for (;;) {
    ssize_t r = recv(fd, buf, sizeof buf, MSG_DONTWAIT);
    if (r < 0 && errno == ENOTSOCK) {
      if (!(poll1(fd, POLLIN, 0) & POLLIN))
        break;
      r = read(fd, buf, sizeof buf);
    }
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0)
      break;
    assert_int_equal(check_pat(buf, off + total, (size_t)r), (size_t)r);
    total += (size_t)r;
  }
  return total;
}

static void write_all(int fd, const void *buf, size_t len) {
  size_t put = 0;
  while (put < len) {
    if (!(poll1(fd, POLLOUT, 5000) & POLLOUT))
      fail_msg("write_all: not writable for 5 s");
    ssize_t r = write(fd, (const char *)buf + put, len - put);
    if (r < 0 && (errno == EINTR || errno == EAGAIN))
      continue;
    assert_true(r > 0);
    put += (size_t)r;
  }
}

static void close_fd(int *fd) {
  if (*fd >= 0)
    close(*fd);
  *fd = -1;
}

/* ---- Sockets ---------------------------------------------------------- */

static bool have_ipv6 = true; /* probed in main() */

/* A listening socket on loopback (port chosen by the kernel) or on a path
 * in a fresh mkdtemp directory.  Returns the descriptor or -errno; fills
 * the address.  sndbuf/rcvbuf > 0 shrink the buffers (inherited by
 * accepted sockets). */
struct listener {
  int fd;
  int family;
  struct sockaddr_storage addr;
  socklen_t addrlen;
  char dir[64];
};

static int listener_open(struct listener *l, int family, int backlog,
                         int rcvbuf, bool nonblock) {
  memset(l, 0, sizeof *l);
  l->fd = -1;
  l->family = family;
  int fd = socket(family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  int one = 1;
  if (family != AF_UNIX)
    setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
  if (rcvbuf > 0)
    setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof rcvbuf);
  if (family == AF_INET) {
    struct sockaddr_in *a = (struct sockaddr_in *)&l->addr;
    a->sin_family = AF_INET;
    a->sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    l->addrlen = sizeof *a;
  } else if (family == AF_INET6) {
    struct sockaddr_in6 *a = (struct sockaddr_in6 *)&l->addr;
    a->sin6_family = AF_INET6;
    a->sin6_addr = in6addr_loopback;
    l->addrlen = sizeof *a;
  } else {
    strcpy(l->dir, "/tmp/cancel-fd-test-XXXXXX");
    if (mkdtemp(l->dir) == NULL) {
      int e = errno;
      close(fd);
      return -e;
    }
    struct sockaddr_un *a = (struct sockaddr_un *)&l->addr;
    a->sun_family = AF_UNIX;
    snprintf(a->sun_path, sizeof a->sun_path, "%s/sock", l->dir);
    l->addrlen = sizeof *a;
  }
  if (bind(fd, (struct sockaddr *)&l->addr, l->addrlen) != 0 ||
      listen(fd, backlog) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  l->addrlen = sizeof l->addr;
  assert_int_equal(getsockname(fd, (struct sockaddr *)&l->addr, &l->addrlen),
                   0);
  if (nonblock)
    set_nonblock(fd, true);
  l->fd = fd;
  return fd;
}

static void listener_close(struct listener *l) {
  close_fd(&l->fd);
  if (l->dir[0] != '\0') {
    struct sockaddr_un *a = (struct sockaddr_un *)&l->addr;
    unlink(a->sun_path);
    rmdir(l->dir);
    l->dir[0] = '\0';
  }
}

/* A blocking client connected (plain connect) to l. */
static int client_connect(const struct listener *l, int sndbuf) {
  int fd = socket(l->family, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(fd >= 0);
  if (sndbuf > 0)
    setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof sndbuf);
  int r;
  do
    r = connect(fd, (const struct sockaddr *)&l->addr, l->addrlen);
  while (r != 0 && errno == EINTR);
  assert_int_equal(r, 0);
  return fd;
}

/* ======================================================================
 * Part 1: the table
 * ====================================================================== */

enum op {
  OP_POLL_IN,
  OP_POLL_OUT,
  OP_WAIT_IN,
  OP_WAIT_OUT,
  OP_READ,
  OP_WRITE,
  OP_READ_FULL,
  OP_WRITE_FULL,
  OP_RECV,
  OP_SEND,
  OP_ACCEPT
};

static const char *const op_names[] = {
    "poll_in",   "poll_out",   "wait_fd_in", "wait_fd_out", "read",  "write",
    "read_full", "write_full", "recv",       "send",        "accept"};

enum tr { T_PIPE, T_PAIR, T_UNIX, T_TCP4, T_TCP6 };
static const char *const tr_names[] = {"pipe", "socketpair", "unix", "tcp4",
                                       "tcp6"};

struct fdcase {
  enum op op;
  enum tr tr;
  bool nonblock;
};

static const struct fdcase cases[] = {
    {OP_POLL_IN, T_PIPE, false},    {OP_POLL_IN, T_TCP4, true},
    {OP_POLL_OUT, T_PIPE, false},   {OP_POLL_OUT, T_PAIR, false},
    {OP_WAIT_IN, T_PIPE, true},     {OP_WAIT_IN, T_UNIX, false},
    {OP_WAIT_IN, T_TCP6, false},    {OP_WAIT_OUT, T_PAIR, true},
    {OP_WAIT_OUT, T_PIPE, true},    {OP_READ, T_PIPE, false},
    {OP_READ, T_PIPE, true},        {OP_READ, T_PAIR, false},
    {OP_READ, T_TCP4, true},        {OP_WRITE, T_PIPE, false},
    {OP_WRITE, T_PIPE, true},       {OP_WRITE, T_PAIR, true},
    {OP_WRITE, T_TCP4, false},      {OP_READ_FULL, T_PIPE, false},
    {OP_READ_FULL, T_PIPE, true},   {OP_READ_FULL, T_TCP6, false},
    {OP_WRITE_FULL, T_PIPE, false}, {OP_WRITE_FULL, T_PIPE, true},
    {OP_WRITE_FULL, T_UNIX, false}, {OP_RECV, T_PAIR, true},
    {OP_RECV, T_UNIX, false},       {OP_RECV, T_TCP4, false},
    {OP_RECV, T_TCP6, true},        {OP_SEND, T_PAIR, false},
    {OP_SEND, T_UNIX, true},        {OP_SEND, T_TCP6, false},
    {OP_ACCEPT, T_UNIX, false},     {OP_ACCEPT, T_UNIX, true},
    {OP_ACCEPT, T_TCP4, false},     {OP_ACCEPT, T_TCP4, true},
    {OP_ACCEPT, T_TCP6, false},
};
#define NCASES (sizeof cases / sizeof cases[0])

static bool op_writes(enum op op) {
  return op == OP_POLL_OUT || op == OP_WAIT_OUT || op == OP_WRITE ||
         op == OP_WRITE_FULL || op == OP_SEND;
}

static bool op_full(enum op op) {
  return op == OP_READ_FULL || op == OP_WRITE_FULL;
}

/* One case's descriptors and results.  On the heap: a waiter thread that
 * failed to return keeps it. */
struct ctx {
  const struct fdcase *c;
  int fd;     /* the descriptor waited on */
  int peer;   /* the other end: writer for reads, reader for writes */
  int client; /* accept: the connecting client */
  struct listener lst;
  size_t fill; /* bytes put in to make a write wait */
  int fl0;     /* fd's status flags after setup */
  unsigned char buf[256];
  size_t done;
  short revents;
  int accepted;
  struct sockaddr_storage aaddr;
  socklen_t aalen;
};

/* Fills fd (a pipe's write end or a socket) until it would block.  For
 * TCP, also until it still would after two pauses of 60 ms: delayed
 * acknowledgements and window updates free room for a while (and poll's
 * POLLOUT is not the test: TCP reports it only once a third of the buffer
 * is free, while a small send may fit before).  Returns the bytes put in. */
static size_t fill_up(int fd, bool tcp) {
  static unsigned char junk[4096];
  bool was_nb = is_nonblock(fd);
  set_nonblock(fd, true);
  size_t total = 0;
  int quiet = 0;
  for (;;) {
    ssize_t r = write(fd, junk, quiet > 0 ? 1 : sizeof junk);
    if (r > 0) {
      total += (size_t)r;
      quiet = 0;
      continue;
    }
    if (r < 0 && errno == EINTR)
      continue;
    assert_true(r < 0 && errno == EAGAIN);
    if (!tcp || ++quiet > 2)
      break;
    test_sleep_ns(CANCEL_MSEC(60));
  }
  set_nonblock(fd, was_nb);
  assert_true(total > 0);
  return total;
}

/* Sets up the case in its "not ready" state.  Skips when the transport is
 * missing (IPv6). */
static struct ctx *ctx_new(const struct fdcase *c) {
  struct ctx *x = calloc(1, sizeof *x);
  assert_non_null(x);
  x->c = c;
  x->fd = x->peer = x->client = x->accepted = -1;
  x->lst.fd = -1;
  bool wr = op_writes(c->op);
  int family = c->tr == T_TCP4 ? AF_INET : c->tr == T_TCP6 ? AF_INET6 : AF_UNIX;
  if (c->tr == T_TCP6 && !have_ipv6) {
    free(x);
    skip();
  }
  if (c->op == OP_ACCEPT) {
    assert_true(listener_open(&x->lst, family, 16, 0, c->nonblock) >= 0);
    x->fd = x->lst.fd;
  } else if (c->tr == T_PIPE) {
    int p[2];
    assert_int_equal(pipe2(p, O_CLOEXEC), 0);
    if (wr) {
      /* A one-page pipe: quick to fill. */
      assert_true(fcntl(p[1], F_SETPIPE_SZ, 4096) >= 4096);
      x->fd = p[1];
      x->peer = p[0];
    } else {
      x->fd = p[0];
      x->peer = p[1];
    }
  } else if (c->tr == T_PAIR) {
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    if (wr) {
      int small = 4096;
      setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
      setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    }
    x->fd = sv[0];
    x->peer = sv[1];
  } else {
    struct listener l;
    assert_true(listener_open(&l, family, 4, wr ? 4096 : 0, false) >= 0);
    x->fd = client_connect(&l, wr ? 4096 : 0);
    do
      x->peer = accept4(l.fd, NULL, NULL, SOCK_CLOEXEC);
    while (x->peer < 0 && errno == EINTR);
    assert_true(x->peer >= 0);
    listener_close(&l);
    if (family != AF_UNIX) {
      int one = 1;
      setsockopt(x->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
      setsockopt(x->peer, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    }
  }
  if (c->op != OP_ACCEPT && c->nonblock)
    set_nonblock(x->fd, true);
  if (wr)
    x->fill = fill_up(x->fd, c->tr == T_TCP4 || c->tr == T_TCP6);
  x->fl0 = get_fl(x->fd);
  return x;
}

static void ctx_free(struct ctx *x) {
  /* The wait never changes the descriptor's mode. */
  assert_int_equal(get_fl(x->fd), x->fl0);
  close_fd(&x->client);
  close_fd(&x->accepted);
  close_fd(&x->peer);
  if (x->c->op == OP_ACCEPT)
    listener_close(&x->lst);
  else
    close_fd(&x->fd);
  free(x);
}

/* The wait under test. */
static int64_t op_wait(struct ctx *x, const cancel_token *tok, int64_t d) {
  struct pollfd p;
  int64_t r = -9999;
  switch (x->c->op) {
  case OP_POLL_IN:
  case OP_POLL_OUT:
    p.fd = x->fd;
    p.events = x->c->op == OP_POLL_IN ? POLLIN : POLLOUT;
    p.revents = (short)0x5a5a; /* poll must overwrite it */
    r = cancel_poll(tok, &p, 1, d);
    x->revents = p.revents;
    break;
  case OP_WAIT_IN:
    r = cancel_wait_fd(tok, x->fd, POLLIN, d);
    break;
  case OP_WAIT_OUT:
    r = cancel_wait_fd(tok, x->fd, POLLOUT, d);
    break;
  case OP_READ:
    r = cancel_read(tok, x->fd, x->buf, sizeof x->buf, d);
    break;
  case OP_WRITE:
    r = cancel_write(tok, x->fd, payload, PAYLOAD, d);
    break;
  case OP_READ_FULL:
    x->done = 7777;
    r = cancel_read_full(tok, x->fd, x->buf, 5, d, &x->done);
    break;
  case OP_WRITE_FULL:
    x->done = 7777;
    r = cancel_write_full(tok, x->fd, payload, PAYLOAD, d, &x->done);
    break;
  case OP_RECV:
    r = cancel_recv(tok, x->fd, x->buf, sizeof x->buf, 0, d);
    break;
  case OP_SEND:
    r = cancel_send(tok, x->fd, payload, PAYLOAD, MSG_NOSIGNAL, d);
    break;
  case OP_ACCEPT:
    x->aalen = sizeof x->aaddr;
    r = cancel_accept(tok, x->fd, (struct sockaddr *)&x->aaddr, &x->aalen,
                      SOCK_CLOEXEC, d);
    if (r >= 0)
      x->accepted = (int)r;
    break;
  }
  return r;
}

/* Makes the wait able to complete: data for the readers, room for the
 * writers (the fill read back), a connection for accept.  `settle` waits
 * until fd itself shows it (only when nobody else waits on fd). */
static void make_ready(struct ctx *x, bool settle) {
  enum op op = x->c->op;
  if (op == OP_ACCEPT) {
    x->client = client_connect(&x->lst, 0);
    if (settle)
      assert_true(poll1(x->fd, POLLIN, 5000) & POLLIN);
  } else if (op_writes(op)) {
    /* In chunks, not a malloc'd buffer: this also runs on ready_later's
     * thread, where a failed cmocka assertion (no memory, under fault
     * injection) cannot be reported, only crash the run. */
    unsigned char tmp[4096];
    for (size_t left = x->fill; left > 0;) {
      size_t n = left < sizeof tmp ? left : sizeof tmp;
      assert_int_equal(read_exact(x->peer, tmp, n, 5000), n);
      left -= n;
    }
    if (settle)
      assert_true(poll1(x->fd, POLLOUT, 5000) & POLLOUT);
  } else {
    write_all(x->peer, "hello", 5);
    if (settle)
      assert_true(poll1(x->fd, POLLIN, 5000) & POLLIN);
  }
}

/* After a successful wait. */
static void check_done(struct ctx *x, int64_t r) {
  switch (x->c->op) {
  case OP_POLL_IN:
    assert_i64_eq(r, 1);
    assert_true(x->revents & POLLIN);
    assert_false(x->revents & (POLLNVAL | POLLERR));
    break;
  case OP_POLL_OUT:
    assert_i64_eq(r, 1);
    assert_true(x->revents & POLLOUT);
    assert_false(x->revents & (POLLNVAL | POLLERR));
    break;
  case OP_WAIT_IN:
    assert_i64_gt(r, 0);
    assert_true(r & POLLIN);
    break;
  case OP_WAIT_OUT:
    assert_i64_gt(r, 0);
    assert_true(r & POLLOUT);
    break;
  case OP_READ:
  case OP_RECV:
  case OP_READ_FULL:
    assert_i64_eq(r, 5);
    assert_memory_equal(x->buf, "hello", 5);
    if (x->c->op == OP_READ_FULL)
      assert_int_equal(x->done, 5);
    break;
  case OP_WRITE:
  case OP_SEND:
  case OP_WRITE_FULL: {
    assert_i64_gt(r, 0);
    assert_i64_le(r, PAYLOAD);
    if (x->c->op == OP_WRITE_FULL) {
      assert_i64_eq(r, PAYLOAD);
      assert_int_equal(x->done, PAYLOAD);
    }
    unsigned char got[PAYLOAD];
    assert_int_equal(read_exact(x->peer, got, (size_t)r, 5000), (size_t)r);
    assert_memory_equal(got, payload, (size_t)r);
    assert_int_equal(poll1(x->peer, POLLIN, 0), 0); /* no more */
    break;
  }
  case OP_ACCEPT:
    assert_i64_ge(r, 0);
    assert_true(test_fd_is_open((int)r));
    assert_true(fcntl((int)r, F_GETFD) & FD_CLOEXEC);
    assert_false(is_nonblock((int)r));
    assert_int_equal(x->aaddr.ss_family, x->lst.family);
    assert_true(x->aalen > 0);
    break;
  }
}

/* After a failed wait (nothing was ready): nothing transferred. */
static void check_err(struct ctx *x) {
  if (op_full(x->c->op))
    assert_int_equal(x->done, 0);
}

/* Made ready after a failed wait: the failed wait did not touch it. */
static void check_untouched(struct ctx *x) {
  enum op op = x->c->op;
  if (op == OP_ACCEPT) {
    assert_true(poll1(x->fd, POLLIN, 0) & POLLIN);
    int a = accept4(x->fd, NULL, NULL, SOCK_CLOEXEC | SOCK_NONBLOCK);
    assert_true(a >= 0);
    close(a);
  } else if (op_writes(op)) {
    /* Nothing was written. */
    assert_int_equal(poll1(x->peer, POLLIN, 20), 0);
  } else {
    /* The data is still there. */
    assert_int_equal(pending(x->fd), 5);
    char got[5];
    assert_int_equal(read_exact(x->fd, got, 5, 1000), 5);
    assert_memory_equal(got, "hello", 5);
  }
}

/* ---- Scenarios -------------------------------------------------------- */

struct entry {
  const struct fdcase *c;
  char name[64];
};

struct run {
  struct ctx *x;
  const cancel_token *tok;
  int64_t deadline;
};

static int64_t run_wait(void *arg) {
  struct run *r = arg;
  return op_wait(r->x, r->tok, r->deadline);
}

static const struct fdcase *case_of(void **state) {
  return ((struct entry *)*state)->c;
}

static void sc_ready(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  cancel_source *s = new_src("ready");
  make_ready(x, true);
  int64_t t0 = cancel_now();
  int64_t r = op_wait(x, TOK(s), CANCEL_NEVER);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  check_done(x, r);
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_wakes(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  cancel_source *s = new_src("wakes");
  struct run run = {x, TOK(s), CANCEL_NEVER};
  struct test_waiter w;
  test_waiter_block(&w, run_wait, &run);
  int64_t t0 = cancel_now();
  make_ready(x, false);
  test_waiter_end(&w, test_tol(CANCEL_SEC(2)), test_rescue_cancel, s);
  assert_i64_lt(w.t_end - t0, test_tol(LATE));
  check_done(x, w.result);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_cancel_timer(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  cancel_source *s = new_src("timer");
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  int64_t r = op_wait(x, TOK(s), CANCEL_NEVER);
  int64_t el = test_since(t0);
  assert_i64_eq(r, -ECANCELED);
  assert_elapsed_within(el, CANCEL_MSEC(20), LATE);
  check_err(x);
  make_ready(x, true);
  check_untouched(x);
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_cancel_thread(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  cancel_source *s = new_src("thread");
  struct run run = {x, TOK(s), cancel_now() + CANCEL_SEC(60)};
  struct test_waiter w;
  test_waiter_block(&w, run_wait, &run);
  test_waiter_cancel(&w, s, LATE);
  check_err(x);
  make_ready(x, true);
  check_untouched(x);
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_cancel_before(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  cancel_source *s = new_src("before");
  make_ready(x, true);
  assert_int_equal(cancel_source_cancel(s), 1);
  int64_t t0 = cancel_now();
  assert_i64_eq(op_wait(x, TOK(s), CANCEL_NEVER), -ECANCELED);
  check_err(x);
  assert_i64_eq(op_wait(x, TOK(s), cancel_now() - 1), -ECANCELED);
  check_err(x);
  assert_i64_eq(op_wait(x, TOK(s), cancel_now() + CANCEL_SEC(5)), -ECANCELED);
  check_err(x);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  check_untouched(x);
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_deadline(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  cancel_source *s = new_src("deadline");
  /* With a token, and without (the signals scenario has one too). */
  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + CANCEL_MSEC(k ? 5 : 20);
    int64_t r = op_wait(x, k ? NULL : TOK(s), d);
    int64_t now = cancel_now();
    assert_i64_eq(r, -ETIMEDOUT);
    assert_i64_ge(now, d);
    assert_i64_lt(now, d + test_tol(LATE));
    check_err(x);
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  make_ready(x, true);
  check_untouched(x);
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_past(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  /* A guard: a wait that took a passed deadline for a far one ends with
   * -ECANCELED just after "at once" is over, instead of hanging the test. */
  cancel_source *s = new_src("past");
  assert_int_equal(
      cancel_source_cancel_after(s, test_tol(AT_ONCE) + CANCEL_MSEC(50)), 0);
  const int64_t past[] = {-1, 0, 1, INT64_MIN, INT64_MIN + 1, -CANCEL_SEC(1)};
  for (size_t i = 0; i < sizeof past / sizeof past[0]; i++) {
    int64_t d = past[i] == -1 ? cancel_now() - 1 : past[i];
    int64_t t0 = cancel_now();
    int64_t r = op_wait(x, TOK(s), d);
    if (r != -ETIMEDOUT)
      print_error("deadline %" PRId64 " (passed): got %" PRId64
                  " after %" PRId64 " ms\n",
                  d, r, test_since(t0) / 1000000);
    assert_i64_eq(r, -ETIMEDOUT);
    assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
    check_err(x);
  }
  int64_t t0 = cancel_now();
  assert_i64_eq(op_wait(x, NULL, cancel_now() - 1), -ETIMEDOUT);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  check_err(x);
  make_ready(x, true);
  t0 = cancel_now();
  int64_t r = op_wait(x, TOK(s), cancel_now() - 1);
  assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
  check_done(x, r);
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_far(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  const int64_t far[] = {CANCEL_NEVER - 1, INT64_MAX / 2,
                         cancel_now() + (CANCEL_SEC(1) << 30)};
  for (size_t i = 0; i < 3; i++) {
    cancel_source *s = new_src("far");
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(10)), 0);
    assert_i64_eq(op_wait(x, TOK(s), far[i]), -ECANCELED);
    assert_elapsed_within(test_since(t0), CANCEL_MSEC(10), LATE);
    check_err(x);
    cancel_source_unref(s);
  }
  ctx_free(x);
}

struct later {
  struct ctx *x;
  int64_t delay;
};

static void *ready_later(void *arg) {
  struct later *l = arg;
  test_sleep_ns(l->delay);
  make_ready(l->x, false);
  return NULL;
}

static void sc_signals(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  struct test_sigstorm storm;
  cancel_source *s = new_src("storm");
  /* How long each wait lasts under the storm: long enough, on a slow or
   * loaded machine too (the time scale), for the storm's thread to land
   * a few signals in it. */
  const int64_t window = test_tol(CANCEL_MSEC(50));

  /* Cancelled after the window of storm. */
  cancel_source *c = new_src("storm-cancel");
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_source_cancel_after(c, window), 0);
  int64_t r = op_wait(x, TOK(c), CANCEL_NEVER);
  int64_t el = test_since(t0);
  long hits = test_sigstorm_stop(&storm);
  assert_i64_eq(r, -ECANCELED);
  assert_elapsed_within(el, window, LATE);
  assert_true(hits >= 2);
  check_err(x);
  cancel_source_unref(c);

  /* Deadline after the window, live token and none. */
  for (int k = 0; k < 2; k++) {
    int64_t d = cancel_now() + window;
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    r = op_wait(x, k ? NULL : TOK(s), d);
    int64_t now = cancel_now();
    hits = test_sigstorm_stop(&storm);
    assert_i64_eq(r, -ETIMEDOUT);
    assert_i64_ge(now, d);
    assert_i64_lt(now, d + test_tol(LATE));
    assert_true(hits >= 2);
    check_err(x);
  }

  /* Made ready after the window of storm: completes. */
  struct later l = {x, window};
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
  t0 = cancel_now();
  pthread_t t = test_thread_start(ready_later, &l);
  r = op_wait(x, TOK(s), CANCEL_NEVER);
  el = test_since(t0);
  hits = test_sigstorm_stop(&storm);
  test_thread_join(t);
  assert_i64_ge(el, window);
  assert_true(hits >= 2);
  check_done(x, r);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
  ctx_free(x);
}

static void sc_stale(void **state) {
  struct ctx *x = ctx_new(case_of(state));
  int rounds = (int)(3 * test_stress_scale());
  for (int i = 0; i < rounds; i++) {
    /* A wait ended by a cancel, or by its deadline with a cancel right
     * around it... */
    cancel_source *s = new_src("stale");
    int64_t d = cancel_now() + CANCEL_MSEC(2);
    assert_int_equal(
        cancel_source_cancel_after(s, CANCEL_USEC(1700 + 100 * (i % 6))), 0);
    int64_t r = op_wait(x, TOK(s), i % 2 ? d : CANCEL_NEVER);
    assert_true(r == -ECANCELED || r == -ETIMEDOUT);
    check_err(x);
    while (!cancel_token_is_cancelled(TOK(s)))
      test_sleep_ns(CANCEL_USEC(200));
    /* ... leaves nothing behind for the next wait on this thread. */
    cancel_source *live = new_src("live");
    d = cancel_now() + CANCEL_MSEC(3);
    assert_i64_eq(op_wait(x, TOK(live), d), -ETIMEDOUT);
    assert_i64_ge(cancel_now(), d);
    d = cancel_now() + CANCEL_MSEC(2);
    assert_i64_eq(op_wait(x, NULL, d), -ETIMEDOUT);
    assert_i64_ge(cancel_now(), d);
    check_err(x);
    cancel_source_unref(live);
    cancel_source_unref(s);
  }
  ctx_free(x);
}

static const struct {
  const char *name;
  CMUnitTestFunction fn;
} scenarios[] = {
    {"ready", sc_ready},
    {"wakes", sc_wakes},
    {"cancel_timer", sc_cancel_timer},
    {"cancel_thread", sc_cancel_thread},
    {"cancel_before", sc_cancel_before},
    {"deadline", sc_deadline},
    {"past", sc_past},
    {"far", sc_far},
    {"signals", sc_signals},
    {"stale", sc_stale},
};
#define NSCEN (sizeof scenarios / sizeof scenarios[0])

/* ======================================================================
 * Part 2: what the table cannot say
 * ====================================================================== */

static void make_pipe(int p[2], bool rd_nb, bool wr_nb) {
  assert_int_equal(pipe2(p, O_CLOEXEC), 0);
  if (rd_nb)
    set_nonblock(p[0], true);
  if (wr_nb)
    set_nonblock(p[1], true);
}

/* ---- cancel_wait_fd, end of file, broken pipes ------------------------ */

static void test_hangup_and_eof(void **state) {
  (void)state;
  cancel_source *s = new_src("eof");
  for (int nb = 0; nb < 2; nb++) {
    int p[2];
    make_pipe(p, nb, false);
    close(p[1]);
    int r = cancel_wait_fd(TOK(s), p[0], POLLIN, CANCEL_NEVER);
    assert_true(r > 0);
    assert_true(r & (POLLIN | POLLHUP));
    char buf[8];
    assert_int_equal(cancel_read(TOK(s), p[0], buf, sizeof buf, CANCEL_NEVER),
                     0);
    size_t done = 99;
    assert_int_equal(
        cancel_read_full(TOK(s), p[0], buf, sizeof buf, CANCEL_NEVER, &done),
        0);
    assert_int_equal(done, 0);
    close(p[0]);

    /* End of file after some data: read_full returns what there was. */
    make_pipe(p, nb, false);
    unsigned char data[3000];
    fill_pat(data, 0, sizeof data);
    write_all(p[1], data, sizeof data);
    close(p[1]);
    unsigned char got[5000];
    done = 0;
    assert_int_equal(
        cancel_read_full(TOK(s), p[0], got, sizeof got, CANCEL_NEVER, &done),
        (ssize_t)sizeof data);
    assert_int_equal(done, sizeof data);
    assert_int_equal(check_pat(got, 0, sizeof data), sizeof data);
    assert_int_equal(is_nonblock(p[0]), nb);
    close(p[0]);

    /* The reader gone: -EPIPE (SIGPIPE is ignored by this program). */
    make_pipe(p, false, nb);
    close(p[0]);
    assert_int_equal(cancel_write(TOK(s), p[1], "x", 1, CANCEL_NEVER), -EPIPE);
    done = 99;
    assert_int_equal(
        cancel_write_full(TOK(s), p[1], "xy", 2, CANCEL_NEVER, &done), -EPIPE);
    assert_int_equal(done, 0);
    close(p[1]);
  }

  /* A socket whose peer closed: readable (EOF), send fails. */
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  close(sv[1]);
  int r = cancel_wait_fd(TOK(s), sv[0], POLLIN, CANCEL_NEVER);
  assert_true(r > 0 && (r & (POLLIN | POLLHUP)));
  char c;
  assert_int_equal(cancel_recv(TOK(s), sv[0], &c, 1, 0, CANCEL_NEVER), 0);
  assert_int_equal(
      cancel_send(TOK(s), sv[0], "x", 1, MSG_NOSIGNAL, CANCEL_NEVER), -EPIPE);
  close(sv[0]);
  cancel_source_unref(s);
}

static void test_recv_flags_pass_through(void **state) {
  (void)state;
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  cancel_source *s = new_src("peek");
  write_all(sv[1], "abcdef", 6);
  char buf[16];
  assert_int_equal(cancel_recv(TOK(s), sv[0], buf, 3, MSG_PEEK, CANCEL_NEVER),
                   3);
  assert_memory_equal(buf, "abc", 3);
  assert_int_equal(pending(sv[0]), 6);
  assert_int_equal(cancel_recv(TOK(s), sv[0], buf, sizeof buf, 0, CANCEL_NEVER),
                   6);
  assert_memory_equal(buf, "abcdef", 6);
  /* A pipe is not a socket: the system's error comes back. */
  int p[2];
  make_pipe(p, false, false);
  write_all(p[1], "q", 1);
  assert_int_equal(cancel_recv(TOK(s), p[0], buf, 1, 0, CANCEL_NEVER),
                   -ENOTSOCK);
  assert_int_equal(cancel_send(TOK(s), p[1], "q", 1, 0, CANCEL_NEVER),
                   -ENOTSOCK);
  assert_int_equal(pending(p[0]), 1);
  close(p[0]);
  close(p[1]);
  close(sv[0]);
  close(sv[1]);
  cancel_source_unref(s);
}

/* ---- Partial progress: write_full -------------------------------------- *
 * A writer blocks in cancel_write_full on a one-page pipe (or a socket with
 * small buffers); the reader takes N bytes and stops; the write is then
 * cancelled (or times out).  *done must equal every byte the reader gets:
 * the N it took plus what it drains afterwards. */

enum { WF_LEN = 1 << 20, WF_N = 10000 };

struct wf {
  const cancel_token *tok;
  int fd;
  unsigned char *data;
  size_t len;
  int64_t deadline;
  size_t done;
};

static int64_t do_write_full(void *arg) {
  struct wf *w = arg;
  w->done = 12345;
  return cancel_write_full(w->tok, w->fd, w->data, w->len, w->deadline,
                           &w->done);
}

/* A named pipe (FIFO) in a fresh directory: its ends are opened apart,
 * the reading end non-blocking only if rd_nb.  The path is removed at once
 * (the open ends keep the pipe). */
static void make_fifo(int p[2], bool rd_nb, bool wr_nb) {
  char dir[] = "/tmp/cancel-fifo-XXXXXX";
  assert_non_null(mkdtemp(dir));
  char path[64];
  snprintf(path, sizeof path, "%s/fifo", dir);
  assert_int_equal(mkfifo(path, 0600), 0);
  p[0] = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
  assert_true(p[0] >= 0);
  p[1] = open(path, O_WRONLY | O_CLOEXEC | (wr_nb ? O_NONBLOCK : 0));
  assert_true(p[1] >= 0);
  if (!rd_nb)
    set_nonblock(p[0], false);
  unlink(path);
  rmdir(dir);
}

/* kind 0: a pipe, 1: a Unix socketpair, 2: a FIFO; small buffers. */
static void writer_pair(int kind, bool nb, int *wfd, int *rfd) {
  if (kind == 0 || kind == 2) {
    int p[2];
    if (kind == 0)
      make_pipe(p, false, nb);
    else
      make_fifo(p, false, nb);
    assert_true(fcntl(p[1], F_SETPIPE_SZ, 4096) >= 4096);
    *wfd = p[1];
    *rfd = p[0];
  } else {
    int sv[2];
    assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
    int small = 4096;
    setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof small);
    setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof small);
    if (nb)
      set_nonblock(sv[0], true);
    *wfd = sv[0];
    *rfd = sv[1];
  }
}

/* A rescue for a writer stuck in the kernel: read until it returns. */
struct drainer {
  int fd;
  struct test_waiter *w;
};

static void rescue_drain(void *arg) {
  struct drainer *d = arg;
  unsigned char buf[8192];
  int64_t end = cancel_now() + CANCEL_SEC(5);
  while (cancel_now() < end) {
    if (poll1(d->fd, POLLIN, 10) & POLLIN)
      if (read(d->fd, buf, sizeof buf) <= 0)
        break;
    int v = 0;
    sem_getvalue(d->w->finished, &v);
    if (v > 0)
      break;
  }
}

static void test_write_full_partial(void **state) {
  (void)state;
  unsigned char *data = malloc(WF_LEN);
  unsigned char *got = malloc(WF_N);
  assert_non_null(data);
  assert_non_null(got);
  fill_pat(data, 0, WF_LEN);
  /* kind: pipe / socketpair / FIFO; nb: the writing end blocking or not;
   * how: cancel / deadline. */
  for (int kind = 0; kind < 3; kind++)
    for (int nb = 0; nb < 2; nb++)
      for (int how = 0; how < 2; how++) {
        int wfd, rfd;
        writer_pair(kind, nb, &wfd, &rfd);
        cancel_source *s = new_src("write_full");
        struct wf wf = {TOK(s),
                        wfd,
                        data,
                        WF_LEN,
                        how ? cancel_now() + CANCEL_MSEC(150) : CANCEL_NEVER,
                        0};
        struct test_waiter w;
        test_waiter_start(&w, do_write_full, &wf);
        /* Take N bytes, checking them, then stop reading. */
        assert_int_equal(read_exact(rfd, got, WF_N, 5000), WF_N);
        assert_int_equal(check_pat(got, 0, WF_N), WF_N);
        test_waiter_blocked(&w);
        if (how == 0)
          assert_int_equal(cancel_source_cancel(s), 1);
        struct drainer dr = {rfd, &w};
        if (test_sem_wait_ns(w.finished, (how ? CANCEL_MSEC(150) : 0) +
                                              test_tol(CANCEL_MSEC(300))) ==
            0) {
          sem_post(w.finished);
        } else {
          print_error("%s, %s: cancel_write_full still blocked %s\n",
                      kind == 0   ? "pipe"
                      : kind == 1 ? "socketpair"
                                  : "FIFO",
                      nb ? "non-blocking" : "blocking",
                      how ? "after its deadline" : "after the cancel");
        }
        test_waiter_end(&w, 0, rescue_drain, &dr);
        assert_i64_eq(w.result, how ? -ETIMEDOUT : -ECANCELED);
        if (how)
          assert_i64_ge(w.t_end, wf.deadline);
        size_t rest = drain_pat(rfd, WF_N);
        assert_int_equal(wf.done, (size_t)WF_N + rest);
        assert_true(wf.done < WF_LEN);
        assert_int_equal(is_nonblock(wfd), nb);
        close(wfd);
        close(rfd);
        cancel_source_unref(s);
      }
  free(got);
  free(data);
}

/* The reader keeps reading while the cancel lands mid-transfer (and
 * signals hit the writer): nothing is lost or counted twice. */
struct slow_reader {
  int fd;
  int stop; /* atomic */
  size_t total;
  size_t bad; /* offset of a wrong byte + 1, 0 if none */
};

static void stop_slow_reader(void *arg) {
  __atomic_store_n(&((struct slow_reader *)arg)->stop, 1, __ATOMIC_RELEASE);
}

static void *slow_reader_main(void *arg) {
  struct slow_reader *r = arg;
  unsigned char buf[700];
  while (!__atomic_load_n(&r->stop, __ATOMIC_ACQUIRE)) {
    if (!(poll1(r->fd, POLLIN, 5) & (POLLIN | POLLHUP)))
      continue;
    ssize_t n = read(r->fd, buf, sizeof buf);
    if (n <= 0)
      continue;
    size_t ok = check_pat(buf, r->total, (size_t)n);
    if (ok != (size_t)n && r->bad == 0)
      r->bad = r->total + ok + 1;
    r->total += (size_t)n;
    test_sleep_ns(CANCEL_USEC(100));
  }
  return NULL;
}

static void test_write_full_active_reader(void **state) {
  (void)state;
  enum { LEN = 1 << 18 };
  /* The cancelled and timed-out writes offer 8 times more than the reader
   * can take before they end. */
  unsigned char *data = malloc(LEN * 8u);
  assert_non_null(data);
  fill_pat(data, 0, LEN * 8u);
  for (int how = 0; how < 3; how++)
    for (int nb = 0; nb < 2; nb++) {
      int wfd, rfd;
      writer_pair(0, nb, &wfd, &rfd);
      set_nonblock(rfd, true);
      /* Shared: a failed assertion leaves the reader to the teardown. */
      struct slow_reader *rdp = test_shared(sizeof *rdp);
      *rdp = (struct slow_reader){rfd, 0, 0, 0};
      pthread_t t = test_helper_start(slow_reader_main, rdp, stop_slow_reader);
      cancel_source *s = new_src("active");
      struct test_sigstorm storm;
      test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
      /* Armed last, and scaled: a loaded machine that lets the deadline
       * pass before the first write() proves nothing about progress. */
      int64_t deadline = CANCEL_NEVER;
      if (how == 1)
        assert_int_equal(
            cancel_source_cancel_after(s, test_tol(CANCEL_MSEC(30))), 0);
      else if (how == 2)
        deadline = cancel_now() + test_tol(CANCEL_MSEC(30));
      size_t done = 12345;
      /* how 0: runs to the end (about 100 ms) through the storm. */
      ssize_t r = cancel_write_full(TOK(s), wfd, data, how ? LEN * 8u : LEN,
                                    deadline, &done);
      long hits = test_sigstorm_stop(&storm);
      stop_slow_reader(rdp);
      test_helper_join(t);
      struct slow_reader rd = *rdp;
      test_shared_free(rdp);
      assert_int_equal(rd.bad, 0);
      size_t rest = drain_pat(rfd, rd.total);
      if (how == 0) {
        assert_int_equal(r, LEN);
        assert_int_equal(done, LEN);
      } else {
        assert_int_equal(r, how == 1 ? -ECANCELED : -ETIMEDOUT);
      }
      assert_int_equal(done, rd.total + rest);
      assert_true(done > 0);
      assert_true(hits >= 2);
      close(wfd);
      close(rfd);
      cancel_source_unref(s);
    }
  free(data);
}

/* ---- Partial progress: read_full --------------------------------------- */

enum { RF_LEN = 20000, RF_CHUNK = 1000, RF_CHUNKS = 3 };

struct rf {
  const cancel_token *tok;
  int fd;
  unsigned char *buf;
  int64_t deadline;
  size_t done;
};

static int64_t do_read_full(void *arg) {
  struct rf *r = arg;
  r->done = 12345;
  return cancel_read_full(r->tok, r->fd, r->buf, RF_LEN, r->deadline, &r->done);
}

static void test_read_full_partial(void **state) {
  (void)state;
  unsigned char *buf = malloc(RF_LEN);
  unsigned char chunk[RF_CHUNK];
  assert_non_null(buf);
  /* kind: pipe / TCP (v4); nb: the reading end's mode; how: cancel /
   * deadline. */
  for (int kind = 0; kind < 2; kind++)
    for (int nb = 0; nb < 2; nb++)
      for (int how = 0; how < 2; how++) {
        int rfd, wfd;
        if (kind == 0) {
          int p[2];
          make_pipe(p, nb, false);
          rfd = p[0];
          wfd = p[1];
        } else {
          struct listener l;
          assert_true(listener_open(&l, AF_INET, 4, 0, false) >= 0);
          wfd = client_connect(&l, 0);
          rfd = accept4(l.fd, NULL, NULL, SOCK_CLOEXEC);
          assert_true(rfd >= 0);
          listener_close(&l);
          if (nb)
            set_nonblock(rfd, true);
        }
        memset(buf, 0, RF_LEN);
        cancel_source *s = new_src("read_full");
        struct rf rf = {TOK(s), rfd, buf,
                        how ? cancel_now() + CANCEL_MSEC(200) : CANCEL_NEVER,
                        0};
        struct test_waiter w;
        test_waiter_start(&w, do_read_full, &rf);
        /* N bytes in chunks, each once the reader blocks again. */
        for (int i = 0; i < RF_CHUNKS; i++) {
          test_waiter_blocked(&w);
          fill_pat(chunk, (size_t)i * RF_CHUNK, RF_CHUNK);
          write_all(wfd, chunk, RF_CHUNK);
        }
        test_waiter_blocked(&w);
        if (how == 0)
          assert_int_equal(cancel_source_cancel(s), 1);
        test_waiter_end(&w, test_tol(CANCEL_SEC(2)), test_rescue_cancel, s);
        assert_i64_eq(w.result, how ? -ETIMEDOUT : -ECANCELED);
        assert_int_equal(rf.done, RF_CHUNK * RF_CHUNKS);
        assert_int_equal(check_pat(buf, 0, rf.done), rf.done);
        /* Nothing beyond was taken: what comes next is still readable. */
        write_all(wfd, "tail", 4);
        char tail[8];
        assert_int_equal(read_exact(rfd, tail, 4, 2000), 4);
        assert_memory_equal(tail, "tail", 4);
        assert_int_equal(is_nonblock(rfd), nb);
        close(rfd);
        close(wfd);
        cancel_source_unref(s);
      }
  free(buf);
}

/* read_full through a storm, fed slowly: every byte in order, and the
 * call returns only when the buffer is full. */
struct feeder {
  int fd;
  size_t len;
};

static void *feeder_main(void *arg) {
  struct feeder *f = arg;
  unsigned char chunk[333];
  for (size_t off = 0; off < f->len; off += sizeof chunk) {
    size_t n = f->len - off < sizeof chunk ? f->len - off : sizeof chunk;
    fill_pat(chunk, off, n);
    write_all(f->fd, chunk, n);
    test_sleep_ns(CANCEL_USEC(300));
  }
  return NULL;
}

static void test_read_full_signals(void **state) {
  (void)state;
  enum { LEN = 60000 };
  unsigned char *buf = malloc(LEN);
  assert_non_null(buf);
  for (int nb = 0; nb < 2; nb++) {
    int p[2];
    make_pipe(p, nb, false);
    struct feeder f = {p[1], LEN};
    struct test_sigstorm storm;
    test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
    pthread_t t = test_thread_start(feeder_main, &f);
    size_t done = 0;
    ssize_t r = cancel_read_full(NULL, p[0], buf, LEN, CANCEL_NEVER, &done);
    long hits = test_sigstorm_stop(&storm);
    test_thread_join(t);
    assert_int_equal(r, LEN);
    assert_int_equal(done, LEN);
    assert_int_equal(check_pat(buf, 0, LEN), LEN);
    assert_true(hits >= 2);
    close(p[0]);
    close(p[1]);
  }
  free(buf);
}

/* ---- cancel_accept ------------------------------------------------------ */

static int new_socket(int family, bool nb);

static void test_accept_flags_and_address(void **state) {
  (void)state;
  cancel_source *s = new_src("accept");
  const int fams[] = {AF_INET, AF_INET6, AF_UNIX};
  for (size_t i = 0; i < 3; i++) {
    if (fams[i] == AF_INET6 && !have_ipv6)
      continue;
    struct listener l;
    assert_true(listener_open(&l, fams[i], 4, 0, false) >= 0);
    int c = client_connect(&l, 0);
    struct sockaddr_storage ss;
    socklen_t len = sizeof ss;
    int a = cancel_accept(TOK(s), l.fd, (struct sockaddr *)&ss, &len,
                          SOCK_NONBLOCK | SOCK_CLOEXEC, CANCEL_NEVER);
    assert_true(a >= 0);
    assert_true(is_nonblock(a));
    assert_true(fcntl(a, F_GETFD) & FD_CLOEXEC);
    assert_int_equal(ss.ss_family, fams[i]);
    if (fams[i] != AF_UNIX) {
      /* The address is the client's. */
      struct sockaddr_storage cs;
      socklen_t clen = sizeof cs;
      assert_int_equal(getsockname(c, (struct sockaddr *)&cs, &clen), 0);
      assert_int_equal(len, clen);
      assert_memory_equal(&ss, &cs, clen);
    }
    close(a);
    /* No flags, no address. */
    int c2 = client_connect(&l, 0);
    a = cancel_accept(TOK(s), l.fd, NULL, NULL, 0, CANCEL_NEVER);
    assert_true(a >= 0);
    assert_false(is_nonblock(a));
    assert_false(fcntl(a, F_GETFD) & FD_CLOEXEC);
    /* The accepted socket works. */
    write_all(c2, "hi", 2);
    char buf[2];
    assert_int_equal(cancel_read(TOK(s), a, buf, 2, CANCEL_NEVER), 2);
    assert_memory_equal(buf, "hi", 2);
    close(a);
    close(c);
    close(c2);
    listener_close(&l);
  }
  cancel_source_unref(s);
}

/* Not a listening socket, not a socket: the system's error at once, as
 * accept4(2) gives it (not a wait for a readiness that never means a
 * connection).  A guard timer turns a hang into a failure. */
static void test_accept_not_a_listener(void **state) {
  (void)state;
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  int p[2];
  make_pipe(p, false, false);
  int unbound = new_socket(AF_INET, false);
  const struct {
    int fd;
    int err;
    const char *what;
  } cases_[] = {{sv[0], -EINVAL, "a connected Unix socket"},
                {unbound, -EINVAL, "a TCP socket that does not listen"},
                {p[0], -ENOTSOCK, "a pipe"}};
  for (size_t i = 0; i < 3; i++) {
    cancel_source *guard = new_src("guard");
    assert_int_equal(
        cancel_source_cancel_after(guard, test_tol(CANCEL_MSEC(200))), 0);
    int64_t t0 = cancel_now();
    int r =
        cancel_accept(TOK(guard), cases_[i].fd, NULL, NULL, 0, CANCEL_NEVER);
    if (r != cases_[i].err)
      print_error("cancel_accept on %s: %d (%s) after %" PRId64 " ms\n",
                  cases_[i].what, r, cancel_strerror(r),
                  test_since(t0) / 1000000);
    assert_int_equal(r, cases_[i].err);
    assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
    cancel_source_unref(guard);
  }
  close(unbound);
  close(p[0]);
  close(p[1]);
  close(sv[0]);
  close(sv[1]);
}

/* Several threads accept on one listener (a common server shape) and one
 * client arrives: one thread gets it, the others go on waiting, and stay
 * cancellable: a thread that lost the race must not be left blocked in
 * accept4(2) on a blocking listener.  The race is the kernel's (all
 * pollers wake, one accepts), so it is run for many rounds; a
 * non-blocking listener is the control. */
enum { HERD = 6 };

struct herd_arg {
  const cancel_token *tok;
  int lfd;
};

static int64_t do_herd_accept(void *arg) {
  struct herd_arg *h = arg;
  return cancel_accept(h->tok, h->lfd, NULL, NULL, SOCK_CLOEXEC, CANCEL_NEVER);
}

struct herd_rescue {
  struct listener *l;
  int clients[HERD];
  int n;
};

static void rescue_herd(void *arg) {
  struct herd_rescue *r = arg;
  while (r->n < HERD)
    r->clients[r->n++] = client_connect(r->l, 0);
}

static int finished(struct test_waiter *w) {
  int v = 0;
  sem_getvalue(w->finished, &v);
  return v;
}

/* Several threads accepting on one NON-BLOCKING listener (the header
 * says why a blocking one cannot work: the threads that lose the race for
 * a connection would block in accept4, deaf to the token). */
static void test_accept_herd(void **state) {
  (void)state;
  for (int nb = 1; nb < 2; nb++) {
    struct listener l;
    assert_true(listener_open(&l, AF_INET, 16, 0, nb) >= 0);
    int rounds = (int)(40 * test_stress_scale());
    int64_t budget_end = cancel_now() + CANCEL_SEC(3);
    for (int round = 0; round < rounds; round++) {
      if (round >= 5 && cancel_now() > budget_end)
        break; /* valgrind */
      cancel_source *s = new_src("herd");
      struct herd_arg ha = {TOK(s), l.fd};
      struct test_waiter *w = calloc(HERD, sizeof *w);
      assert_non_null(w);
      for (int i = 0; i < HERD; i++) {
        test_waiter_start(&w[i], do_herd_accept, &ha);
        test_waiter_stop_with(&w[i], test_rescue_cancel, s);
      }
      for (int i = 0; i < HERD; i++)
        test_waiter_blocked(&w[i]);
      struct herd_rescue hr = {&l, {-1, -1, -1, -1, -1, -1}, 0};
      hr.clients[hr.n++] = client_connect(&l, 0);
      /* Exactly one takes it. */
      int winner = -1;
      int64_t end = cancel_now() + test_tol(CANCEL_SEC(2));
      while (winner < 0 && cancel_now() < end) {
        for (int i = 0; i < HERD && winner < 0; i++)
          if (finished(&w[i]))
            winner = i;
        if (winner < 0)
          test_sleep_ns(CANCEL_USEC(200));
      }
      assert_true(winner >= 0);
      test_sleep_ns(CANCEL_MSEC(10));
      /* Then the cancel: every other one returns -ECANCELED promptly. */
      int64_t t_cancel = cancel_now();
      assert_int_equal(cancel_source_cancel(s), 1);
      int stuck = 0;
      for (int i = 0; i < HERD; i++) {
        if (i == winner)
          continue;
        if (test_sem_wait_ns(w[i].finished, test_tol(CANCEL_MSEC(300))) == 0)
          sem_post(w[i].finished);
        else
          stuck++;
      }
      if (stuck) {
        print_error("round %d, %s listener: %d acceptor(s) that lost the race "
                    "did not return after the cancel\n",
                    round, nb ? "non-blocking" : "blocking", stuck);
        rescue_herd(&hr);
      }
      for (int i = 0; i < HERD; i++)
        test_waiter_end(&w[i], test_tol(CANCEL_SEC(2)), rescue_herd, &hr);
      assert_int_equal(stuck, 0);
      int accepted = 0;
      for (int i = 0; i < HERD; i++) {
        if (w[i].result >= 0) {
          accepted++;
          close((int)w[i].result);
        } else {
          assert_i64_eq(w[i].result, -ECANCELED);
          assert_i64_lt(w[i].t_end - t_cancel, test_tol(LATE));
        }
      }
      assert_int_equal(accepted, 1);
      for (int i = 0; i < hr.n; i++)
        close(hr.clients[i]);
      free(w);
      cancel_source_unref(s);
    }
    listener_close(&l);
  }
}

/* ---- Pipes without RWF_NOWAIT (FIFOs) ----------------------------------- *
 * A named pipe does not take RWF_NOWAIT, so the calls cannot try a
 * non-blocking read or write on a blocking FIFO.  They must still never
 * block past a cancel: a big write to a FIFO whose reader stopped, and a
 * reader that lost a race for the only byte. */

struct bigw {
  const cancel_token *tok;
  int fd;
  const unsigned char *data;
  size_t len;
};

static int64_t do_big_write(void *arg) {
  struct bigw *b = arg;
  return cancel_write(b->tok, b->fd, b->data, b->len, CANCEL_NEVER);
}

/* A write of more than the pipe can hold, blocked on a full pipe; the
 * reader makes some room and stops.  The write may hand over what fits
 * and return its count (as a non-blocking write would), or wait on; what
 * it must not do is block in the kernel for the rest, out of the token's
 * reach: the cancel then returns it promptly, with exactly the bytes the
 * reader gets. */
static void test_fifo_big_write_cancellable(void **state) {
  (void)state;
  enum { LEN = 1 << 18 };
  unsigned char *data = malloc(LEN);
  assert_non_null(data);
  fill_pat(data, 0, LEN);
  for (int kind = 0; kind < 2; kind++) {
    int p[2];
    if (kind == 0)
      make_pipe(p, false, false);
    else
      make_fifo(p, false, false);
    assert_true(fcntl(p[1], F_SETPIPE_SZ, 4096) >= 4096);
    size_t fill = fill_up(p[1], false);
    cancel_source *s = new_src("bigwrite");
    struct bigw b = {TOK(s), p[1], data, LEN};
    struct test_waiter w;
    test_waiter_block(&w, do_big_write, &b);
    unsigned char *tmp = malloc(fill);
    assert_non_null(tmp);
    assert_int_equal(read_exact(p[0], tmp, fill, 2000), fill);
    free(tmp);
    test_sleep_ns(CANCEL_MSEC(20)); /* the writer takes the room */
    int64_t t_cancel = cancel_now();
    assert_int_equal(cancel_source_cancel(s), 1);
    struct drainer dr = {p[0], &w};
    if (test_sem_wait_ns(w.finished, test_tol(CANCEL_MSEC(300))) == 0)
      sem_post(w.finished);
    else
      print_error("%s: a blocking cancel_write of %d bytes did not return "
                  "after the cancel (the reader stopped)\n",
                  kind ? "FIFO" : "pipe", LEN);
    test_waiter_end(&w, 0, rescue_drain, &dr);
    assert_i64_lt(w.t_end - t_cancel, test_tol(LATE));
    size_t got = drain_pat(p[0], 0);
    if (w.result >= 0)
      assert_int_equal((size_t)w.result, got);
    else
      assert_true(w.result == -ECANCELED && got == 0);
    assert_true(w.result < LEN);
    assert_false(is_nonblock(p[1]));
    close(p[0]);
    close(p[1]);
    cancel_source_unref(s);
  }
  free(data);
}

struct rd_arg {
  const cancel_token *tok;
  int fd;
  char c;
};

static int64_t do_read1(void *arg) {
  struct rd_arg *r = arg;
  return cancel_read(r->tok, r->fd, &r->c, 1, CANCEL_NEVER);
}

struct rd_rescue {
  int fd;
};

static void rescue_write_bytes(void *arg) {
  struct rd_rescue *r = arg;
  ssize_t n = write(r->fd, "zzzz", 4);
  (void)n;
}

static void test_readers_race_for_one_byte(void **state) {
  (void)state;
  /* The race is the kernel's (both pollers wake, one reads): many rounds. */
  int rounds = (int)(20 * test_stress_scale());
  int64_t budget_end = cancel_now() + CANCEL_SEC(2);
  for (int k = 0; k < 2 * rounds; k++) {
    if (k >= 10 && cancel_now() > budget_end)
      break; /* valgrind */
    int kind = k % 2;
    int p[2];
    /* A blocking pipe works (RWF_NOWAIT); a FIFO has no RWF_NOWAIT, so
     * per the header its shared read end must be non-blocking. */
    if (kind == 0)
      make_pipe(p, false, false);
    else
      make_fifo(p, true, false);
    cancel_source *s = new_src("readers");
    struct rd_arg ra = {TOK(s), p[0], 0}, rb = {TOK(s), p[0], 0};
    struct test_waiter wa, wb;
    test_waiter_start(&wa, do_read1, &ra);
    test_waiter_start(&wb, do_read1, &rb);
    test_waiter_blocked(&wa);
    test_waiter_blocked(&wb);
    write_all(p[1], "x", 1);
    /* One of them gets it... */
    int64_t end = cancel_now() + test_tol(CANCEL_SEC(2));
    int va = 0, vb = 0;
    while (va + vb == 0 && cancel_now() < end) {
      sem_getvalue(wa.finished, &va);
      sem_getvalue(wb.finished, &vb);
      test_sleep_ns(CANCEL_USEC(200));
    }
    assert_int_equal(va + vb, 1);
    test_sleep_ns(CANCEL_MSEC(5));
    /* ... and the other is still cancellable. */
    int64_t t_cancel = cancel_now();
    assert_int_equal(cancel_source_cancel(s), 1);
    struct test_waiter *loser = va ? &wb : &wa;
    struct rd_rescue rr = {p[1]};
    if (test_sem_wait_ns(loser->finished, test_tol(CANCEL_MSEC(300))) == 0)
      sem_post(loser->finished);
    else
      print_error("round %d, %s: the reader that lost the byte did not "
                  "return after the cancel\n",
                  k / 2, kind ? "FIFO" : "pipe");
    struct test_waiter *winner = va ? &wa : &wb;
    test_waiter_end(winner, CANCEL_SEC(1), NULL, NULL);
    test_waiter_end(loser, 0, rescue_write_bytes, &rr);
    assert_i64_eq(winner->result, 1);
    assert_i64_eq(loser->result, -ECANCELED);
    assert_i64_lt(loser->t_end - t_cancel, test_tol(LATE));
    close(p[0]);
    close(p[1]);
    cancel_source_unref(s);
  }
}

/* ---- cancel_connect ---------------------------------------------------- */

static int new_socket(int family, bool nb) {
  int fd =
      socket(family, SOCK_STREAM | SOCK_CLOEXEC | (nb ? SOCK_NONBLOCK : 0), 0);
  assert_true(fd >= 0);
  return fd;
}

static void assert_connected(int fd, bool yes) {
  struct sockaddr_storage ss;
  socklen_t len = sizeof ss;
  int r = getpeername(fd, (struct sockaddr *)&ss, &len);
  if (yes) {
    assert_int_equal(r, 0);
  } else {
    assert_int_equal(r, -1);
    assert_int_equal(errno, ENOTCONN);
  }
}

static void test_connect_succeeds(void **state) {
  (void)state;
  cancel_source *s = new_src("connect");
  const int fams[] = {AF_INET, AF_INET6, AF_UNIX};
  for (size_t i = 0; i < 3; i++) {
    if (fams[i] == AF_INET6 && !have_ipv6)
      continue;
    for (int nb = 0; nb < 2; nb++)
      for (int tk = 0; tk < 2; tk++) {
        struct listener l;
        assert_true(listener_open(&l, fams[i], 4, 0, false) >= 0);
        int fd = new_socket(fams[i], nb);
        assert_int_equal(cancel_connect(tk ? NULL : TOK(s), fd,
                                        (struct sockaddr *)&l.addr, l.addrlen,
                                        CANCEL_NEVER),
                         0);
        assert_connected(fd, true);
        assert_int_equal(is_nonblock(fd), nb);
        int a = accept4(l.fd, NULL, NULL, SOCK_CLOEXEC);
        assert_true(a >= 0);
        write_all(fd, "ping", 4);
        char buf[4];
        assert_int_equal(read_exact(a, buf, 4, 2000), 4);
        assert_memory_equal(buf, "ping", 4);
        /* Connected already: what connect(2) says (Linux answers 0 to the
         * first connect after a non-blocking one completed, EISCONN
         * after that). */
        int again = cancel_connect(TOK(s), fd, (struct sockaddr *)&l.addr,
                                   l.addrlen, CANCEL_NEVER);
        assert_true(again == 0 || again == -EISCONN);
        assert_int_equal(cancel_connect(TOK(s), fd, (struct sockaddr *)&l.addr,
                                        l.addrlen, CANCEL_NEVER),
                         -EISCONN);
        assert_int_equal(is_nonblock(fd), nb);
        close(a);
        close(fd);
        listener_close(&l);
      }
  }
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_connect_refused(void **state) {
  (void)state;
  cancel_source *s = new_src("refused");
  const int fams[] = {AF_INET, AF_INET6, AF_UNIX};
  for (size_t i = 0; i < 3; i++) {
    if (fams[i] == AF_INET6 && !have_ipv6)
      continue;
    for (int nb = 0; nb < 2; nb++) {
      /* Bound but not listening: nobody can take the port meanwhile. */
      struct listener l;
      assert_true(listener_open(&l, fams[i], 1, 0, false) >= 0);
      int b = socket(fams[i], SOCK_STREAM | SOCK_CLOEXEC, 0);
      struct sockaddr_storage addr = l.addr;
      socklen_t alen = l.addrlen;
      listener_close(&l);
      if (fams[i] == AF_UNIX) {
        /* Recreate the path, bound and not listening. */
        assert_non_null(mkdtemp(strcpy(l.dir, "/tmp/cancel-fd-test-XXXXXX")));
        struct sockaddr_un *u = (struct sockaddr_un *)&addr;
        snprintf(u->sun_path, sizeof u->sun_path, "%s/sock", l.dir);
        alen = sizeof *u;
      }
      assert_int_equal(bind(b, (struct sockaddr *)&addr, alen), 0);
      int fd = new_socket(fams[i], nb);
      int64_t t0 = cancel_now();
      assert_int_equal(cancel_connect(TOK(s), fd, (struct sockaddr *)&addr,
                                      alen, cancel_now() + CANCEL_SEC(10)),
                       -ECONNREFUSED);
      assert_i64_lt(test_since(t0), test_tol(CANCEL_MSEC(200)));
      assert_int_equal(is_nonblock(fd), nb);
      close(fd);
      close(b);
      if (fams[i] == AF_UNIX) {
        struct sockaddr_un *u = (struct sockaddr_un *)&addr;
        unlink(u->sun_path);
        /* No such path at all. */
        fd = new_socket(AF_UNIX, nb);
        assert_int_equal(cancel_connect(TOK(s), fd, (struct sockaddr *)&addr,
                                        alen, CANCEL_NEVER),
                         -ENOENT);
        assert_int_equal(is_nonblock(fd), nb);
        close(fd);
        rmdir(l.dir);
      }
    }
  }
  cancel_source_unref(s);
}

/* A TCP listener with backlog 0 and one connection queued drops further
 * SYNs: a connect to it stays in progress (the SYN is retried after 1 s,
 * 3 s, ...), all on loopback. */
struct full {
  struct listener l;
  int queued; /* the connection that fills the queue */
};

static bool full_open(struct full *f, int family) {
  if (family == AF_INET6 && !have_ipv6)
    return false;
  assert_true(listener_open(&f->l, family, 0, 0, false) >= 0);
  f->queued = client_connect(&f->l, 0);
  assert_true(poll1(f->l.fd, POLLIN, 5000) & POLLIN);
  return true;
}

static void full_close(struct full *f) {
  close_fd(&f->queued);
  listener_close(&f->l);
}

struct cw {
  const cancel_token *tok;
  int fd;
  const struct full *f;
  int64_t deadline;
};

static int64_t do_connect(void *arg) {
  struct cw *c = arg;
  return cancel_connect(c->tok, c->fd, (const struct sockaddr *)&c->f->l.addr,
                        c->f->l.addrlen, c->deadline);
}

static void test_connect_hanging(void **state) {
  (void)state;
  const int fams[] = {AF_INET, AF_INET6};
  for (size_t i = 0; i < 2; i++)
    for (int nb = 0; nb < 2; nb++) {
      struct full f;
      if (!full_open(&f, fams[i]))
        continue;

      /* Cancelled by a timer. */
      cancel_source *s = new_src("hang");
      int fd = new_socket(fams[i], nb);
      struct cw cw = {TOK(s), fd, &f, CANCEL_NEVER};
      int64_t t0 = cancel_now();
      assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
      assert_i64_eq(do_connect(&cw), -ECANCELED);
      assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
      assert_int_equal(is_nonblock(fd), nb);
      close(fd);
      cancel_source_unref(s);

      /* Cancelled from another thread. */
      s = new_src("hang-thread");
      fd = new_socket(fams[i], nb);
      cw = (struct cw){TOK(s), fd, &f, cancel_now() + CANCEL_SEC(60)};
      struct test_waiter w;
      test_waiter_block(&w, do_connect, &cw);
      test_waiter_cancel(&w, s, LATE);
      assert_int_equal(is_nonblock(fd), nb);
      close(fd);
      cancel_source_unref(s);

      /* Its deadline; a passed deadline; a far one. */
      s = new_src("hang-deadline");
      fd = new_socket(fams[i], nb);
      cw = (struct cw){TOK(s), fd, &f, cancel_now() + CANCEL_MSEC(30)};
      assert_i64_eq(do_connect(&cw), -ETIMEDOUT);
      assert_i64_ge(cancel_now(), cw.deadline);
      assert_i64_lt(cancel_now(), cw.deadline + test_tol(LATE));
      assert_int_equal(is_nonblock(fd), nb);
      close(fd);
      fd = new_socket(fams[i], nb);
      cw = (struct cw){NULL, fd, &f, cancel_now() - 1};
      t0 = cancel_now();
      assert_i64_eq(do_connect(&cw), -ETIMEDOUT);
      assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
      assert_int_equal(is_nonblock(fd), nb);
      close(fd);
      cancel_source *c = new_src("hang-far");
      fd = new_socket(fams[i], nb);
      cw = (struct cw){TOK(c), fd, &f, CANCEL_NEVER - 1};
      t0 = cancel_now();
      assert_int_equal(cancel_source_cancel_after(c, CANCEL_MSEC(20)), 0);
      assert_i64_eq(do_connect(&cw), -ECANCELED);
      assert_elapsed_within(test_since(t0), CANCEL_MSEC(20), LATE);
      close(fd);
      cancel_source_unref(c);

      /* Signals: cancel and deadline each end it, nothing else. */
      struct test_sigstorm storm;
      c = new_src("hang-storm");
      fd = new_socket(fams[i], nb);
      cw = (struct cw){TOK(c), fd, &f, CANCEL_NEVER};
      test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
      t0 = cancel_now();
      assert_int_equal(cancel_source_cancel_after(c, CANCEL_MSEC(30)), 0);
      int64_t r = do_connect(&cw);
      int64_t el = test_since(t0);
      long hits = test_sigstorm_stop(&storm);
      assert_i64_eq(r, -ECANCELED);
      assert_elapsed_within(el, CANCEL_MSEC(30), LATE);
      assert_true(hits >= 2);
      close(fd);
      cancel_source_unref(c);
      fd = new_socket(fams[i], nb);
      cw = (struct cw){TOK(s), fd, &f, cancel_now() + CANCEL_MSEC(30)};
      test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(1));
      r = do_connect(&cw);
      int64_t now = cancel_now();
      hits = test_sigstorm_stop(&storm);
      assert_i64_eq(r, -ETIMEDOUT);
      assert_i64_ge(now, cw.deadline);
      assert_i64_lt(now, cw.deadline + test_tol(LATE));
      assert_true(hits >= 2);
      assert_int_equal(is_nonblock(fd), nb);
      close(fd);
      assert_false(cancel_token_is_cancelled(TOK(s)));
      cancel_source_unref(s);
      full_close(&f);
    }
}

/* A connect blocked on the full queue completes once the queue drains
 * (when the kernel retries the SYN, about 1 s later), with signals
 * hitting it all along. */
struct taker {
  int lfd;
  int fd;
};

static void *take_later(void *arg) {
  struct taker *t = arg;
  test_sleep_ns(CANCEL_MSEC(30));
  t->fd = accept4(t->lfd, NULL, NULL, SOCK_CLOEXEC);
  return NULL;
}

static void test_connect_completes_while_blocked(void **state) {
  (void)state;
  struct full f;
  assert_true(full_open(&f, AF_INET));
  cancel_source *s = new_src("complete");
  int fd = new_socket(AF_INET, false);
  struct cw cw = {TOK(s), fd, &f, cancel_now() + CANCEL_SEC(10)};
  struct taker tk = {f.l.fd, -1};
  struct test_sigstorm storm;
  test_sigstorm_start(&storm, pthread_self(), CANCEL_MSEC(2));
  int64_t t0 = cancel_now();
  /* Take the queued connection 30 ms into the wait: room for the retried
   * SYN. */
  pthread_t t = test_thread_start(take_later, &tk);
  int64_t r = do_connect(&cw);
  int64_t el = test_since(t0);
  long hits = test_sigstorm_stop(&storm);
  test_thread_join(t);
  assert_true(tk.fd >= 0);
  assert_i64_eq(r, 0);
  assert_i64_ge(el, CANCEL_MSEC(30));
  assert_true(hits >= 2);
  assert_connected(fd, true);
  assert_false(is_nonblock(fd));
  int b = accept4(f.l.fd, NULL, NULL, SOCK_CLOEXEC);
  assert_true(b >= 0);
  write_all(fd, "late", 4);
  char buf[4];
  assert_int_equal(read_exact(b, buf, 4, 2000), 4);
  assert_memory_equal(buf, "late", 4);
  close(tk.fd);
  close(b);
  close(fd);
  cancel_source_unref(s);
  full_close(&f);
}

static void test_connect_cancelled_before(void **state) {
  (void)state;
  cancel_source *s = new_src("before");
  assert_int_equal(cancel_source_cancel(s), 1);
  const int fams[] = {AF_INET, AF_INET6, AF_UNIX};
  for (size_t i = 0; i < 3; i++) {
    if (fams[i] == AF_INET6 && !have_ipv6)
      continue;
    for (int nb = 0; nb < 2; nb++) {
      struct listener l;
      assert_true(listener_open(&l, fams[i], 4, 0, false) >= 0);
      int fd = new_socket(fams[i], nb);
      int64_t t0 = cancel_now();
      assert_int_equal(cancel_connect(TOK(s), fd, (struct sockaddr *)&l.addr,
                                      l.addrlen, CANCEL_NEVER),
                       -ECANCELED);
      assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
      /* Not touched: no connection attempt reached the listener, and the
       * socket can still connect. */
      assert_int_equal(poll1(l.fd, POLLIN, 20), 0);
      assert_connected(fd, false);
      assert_int_equal(is_nonblock(fd), nb);
      assert_int_equal(cancel_connect(NULL, fd, (struct sockaddr *)&l.addr,
                                      l.addrlen, CANCEL_NEVER),
                       0);
      assert_connected(fd, true);
      close(fd);
      listener_close(&l);
    }
  }
  cancel_source_unref(s);
}

/* A Unix listener whose queue is full: a non-blocking connect(2) fails
 * with EAGAIN there (it cannot be waited for).  Whatever cancel_connect
 * makes of it, it must not outlive its cancel, and it leaves the mode. */
static void test_connect_unix_full_backlog(void **state) {
  (void)state;
  for (int nb = 0; nb < 2; nb++) {
    struct listener l;
    assert_true(listener_open(&l, AF_UNIX, 0, 0, false) >= 0);
    int q = client_connect(&l, 0);
    cancel_source *s = new_src("unix-full");
    int fd = new_socket(AF_UNIX, nb);
    int64_t t0 = cancel_now();
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
    int r = cancel_connect(TOK(s), fd, (struct sockaddr *)&l.addr, l.addrlen,
                           CANCEL_NEVER);
    int64_t el = test_since(t0);
    if (r == -ECANCELED)
      assert_elapsed_within(el, CANCEL_MSEC(20), LATE);
    else
      assert_int_equal(r, -EAGAIN);
    if (nb == 0 && r == -EAGAIN)
      print_message("      note: cancel_connect on a blocking Unix socket "
                    "returns -EAGAIN when the listener's queue is full\n");
    assert_int_equal(is_nonblock(fd), nb);
    close(fd);
    close(q);
    cancel_source_unref(s);
    listener_close(&l);
  }
}

/* ---- Bad input --------------------------------------------------------- */

static void test_bad_descriptors(void **state) {
  (void)state;
  int p[2];
  make_pipe(p, false, false);
  int closed = p[0];
  close(p[0]);
  close(p[1]);
  const int bad[] = {-1, 99999, closed};
  cancel_source *s = new_src("badfd");
  const cancel_token *toks[] = {NULL, TOK(s)};
  char buf[8] = "abcdefg";
  struct sockaddr_in sin = {.sin_family = AF_INET};
  sin.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  sin.sin_port = htons(9);
  for (size_t t = 0; t < 2; t++)
    for (size_t i = 0; i < 3; i++) {
      const cancel_token *tok = toks[t];
      int fd = bad[i];
      int64_t d = cancel_now() + CANCEL_SEC(5);
      size_t done = 99;
      int64_t t0 = cancel_now();
      assert_int_equal(cancel_wait_fd(tok, fd, POLLIN, d), -EBADF);
      assert_int_equal(cancel_wait_fd(tok, fd, POLLOUT, CANCEL_NEVER), -EBADF);
      assert_int_equal(cancel_read(tok, fd, buf, sizeof buf, d), -EBADF);
      assert_int_equal(cancel_write(tok, fd, buf, sizeof buf, d), -EBADF);
      assert_int_equal(cancel_read_full(tok, fd, buf, sizeof buf, d, &done),
                       -EBADF);
      assert_int_equal(done, 0);
      done = 99;
      assert_int_equal(cancel_write_full(tok, fd, buf, sizeof buf, d, &done),
                       -EBADF);
      assert_int_equal(done, 0);
      assert_int_equal(cancel_recv(tok, fd, buf, sizeof buf, 0, d), -EBADF);
      assert_int_equal(cancel_send(tok, fd, buf, sizeof buf, 0, d), -EBADF);
      assert_int_equal(cancel_accept(tok, fd, NULL, NULL, 0, d), -EBADF);
      assert_int_equal(
          cancel_connect(tok, fd, (struct sockaddr *)&sin, sizeof sin, d),
          -EBADF);
      assert_i64_lt(test_since(t0), test_tol(AT_ONCE));
    }
  cancel_source_unref(s);
}

static void test_bad_lengths_and_buffers(void **state) {
  (void)state;
  cancel_source *s = new_src("badlen");
  int p[2];
  make_pipe(p, false, false);
  int sv[2];
  assert_int_equal(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv), 0);
  write_all(p[1], "data", 4);
  write_all(sv[1], "sock", 4);
  char buf[8];
  size_t done = 99;
  const size_t huge[] = {(size_t)SSIZE_MAX + 1, SIZE_MAX};
  for (size_t i = 0; i < 2; i++) {
    assert_int_equal(cancel_read(TOK(s), p[0], buf, huge[i], CANCEL_NEVER),
                     -EINVAL);
    assert_int_equal(cancel_write(TOK(s), p[1], buf, huge[i], CANCEL_NEVER),
                     -EINVAL);
    done = 99;
    assert_int_equal(
        cancel_read_full(TOK(s), p[0], buf, huge[i], CANCEL_NEVER, &done),
        -EINVAL);
    assert_int_equal(done, 0);
    done = 99;
    assert_int_equal(
        cancel_write_full(TOK(s), p[1], buf, huge[i], CANCEL_NEVER, &done),
        -EINVAL);
    assert_int_equal(done, 0);
    assert_int_equal(cancel_recv(TOK(s), sv[0], buf, huge[i], 0, CANCEL_NEVER),
                     -EINVAL);
    assert_int_equal(cancel_send(TOK(s), sv[0], buf, huge[i], 0, CANCEL_NEVER),
                     -EINVAL);
  }
  /* Nothing was read or written. */
  assert_int_equal(pending(p[0]), 4);
  assert_int_equal(pending(sv[0]), 4);
  assert_int_equal(pending(sv[1]), 0);

  /* NULL buffers with a length: an error (the header does not say which),
   * not a crash and not a success. */
  assert_true(cancel_write(TOK(s), p[1], NULL, 4, CANCEL_NEVER) < 0);
  assert_true(cancel_send(TOK(s), sv[0], NULL, 4, 0, CANCEL_NEVER) < 0);
  assert_true(cancel_write_full(TOK(s), p[1], NULL, 4, CANCEL_NEVER, NULL) < 0);
  assert_int_equal(pending(sv[1]), 0);
  assert_true(cancel_read(TOK(s), p[0], NULL, 4, CANCEL_NEVER) < 0);
  assert_true(cancel_recv(TOK(s), sv[0], NULL, 4, 0, CANCEL_NEVER) < 0);
  assert_true(cancel_read_full(TOK(s), p[0], NULL, 4, CANCEL_NEVER, NULL) < 0);

  /* connect without an address, accept with an address but no length. */
  int fd = new_socket(AF_INET, false);
  assert_true(cancel_connect(TOK(s), fd, NULL, sizeof(struct sockaddr_in),
                             CANCEL_NEVER) < 0);
  struct sockaddr_in sin = {.sin_family = AF_INET};
  assert_int_equal(
      cancel_connect(TOK(s), fd, (struct sockaddr *)&sin, 0, CANCEL_NEVER),
      -EINVAL);
  close(fd);
  struct listener l;
  assert_true(listener_open(&l, AF_UNIX, 4, 0, false) >= 0);
  struct sockaddr_storage ss;
  assert_true(cancel_accept(TOK(s), l.fd, (struct sockaddr *)&ss, NULL, 0,
                            cancel_now() - 1) < 0);
  listener_close(&l);

  close(p[0]);
  close(p[1]);
  close(sv[0]);
  close(sv[1]);
  cancel_source_unref(s);
}

/* ---- No descriptor per wait or per thread left behind ----------------- */

struct leak_arg {
  int fd;
};

static void *leak_thread(void *arg) {
  struct leak_arg *a = arg;
  cancel_source *s = NULL;
  if (cancel_source_new(&s, "leak") != 0)
    return (void *)1;
  struct pollfd p = {a->fd, POLLIN, 0};
  char c;
  int r1 = cancel_poll(TOK(s), &p, 1, cancel_now() + CANCEL_MSEC(1));
  ssize_t r2 = cancel_read(TOK(s), a->fd, &c, 1, cancel_now() + CANCEL_MSEC(1));
  cancel_source_cancel(s);
  int r3 = cancel_wait_fd(TOK(s), a->fd, POLLIN, CANCEL_NEVER);
  cancel_source_unref(s);
  return (void *)(uintptr_t)(r1 != -ETIMEDOUT || r2 != -ETIMEDOUT ||
                             r3 != -ECANCELED);
}

static void test_no_descriptor_leak(void **state) {
  (void)state;
  int p[2];
  make_pipe(p, false, false);
  /* Keep the reactor's own descriptors steady: a timer far away. */
  cancel_source *pin = new_src("pin");
  assert_int_equal(cancel_source_cancel_after(pin, CANCEL_SEC(3600)), 0);
  struct leak_arg a = {p[0]};
  assert_null(test_run_on_thread(leak_thread, &a)); /* warm up */
  int base = test_fd_count();
  for (int i = 0; i < 50; i++)
    assert_null(test_run_on_thread(leak_thread, &a));
  assert_int_equal(test_fd_count(), base);
  /* Waits on this thread, many times: no growth either. */
  for (int i = 0; i < 50; i++)
    assert_null(leak_thread(&a));
  assert_int_equal(test_fd_count(), base);
  cancel_source_unref(pin);
  close(p[0]);
  close(p[1]);
}

/* ---- main --------------------------------------------------------------- */

static bool probe_ipv6(void) {
  struct listener l;
  int fd = listener_open(&l, AF_INET6, 1, 0, false);
  if (fd < 0)
    return false;
  listener_close(&l);
  return true;
}

int main(void) {
  signal(SIGPIPE, SIG_IGN);
  have_ipv6 = probe_ipv6();
  if (!have_ipv6)
    fprintf(stderr, "io_test: no IPv6 loopback: tcp6 cases are skipped\n");
  fill_pat(payload, 0, PAYLOAD);

  static const struct CMUnitTest fixed[] = {
      cmocka_unit_test(test_hangup_and_eof),
      cmocka_unit_test(test_recv_flags_pass_through),
      cmocka_unit_test(test_write_full_partial),
      cmocka_unit_test(test_write_full_active_reader),
      cmocka_unit_test(test_read_full_partial),
      cmocka_unit_test(test_read_full_signals),
      cmocka_unit_test(test_accept_flags_and_address),
      cmocka_unit_test(test_accept_not_a_listener),
      cmocka_unit_test(test_accept_herd),
      cmocka_unit_test(test_fifo_big_write_cancellable),
      cmocka_unit_test(test_readers_race_for_one_byte),
      cmocka_unit_test(test_connect_succeeds),
      cmocka_unit_test(test_connect_refused),
      cmocka_unit_test(test_connect_hanging),
      cmocka_unit_test(test_connect_completes_while_blocked),
      cmocka_unit_test(test_connect_cancelled_before),
      cmocka_unit_test(test_connect_unix_full_backlog),
      cmocka_unit_test(test_bad_descriptors),
      cmocka_unit_test(test_bad_lengths_and_buffers),
      cmocka_unit_test(test_no_descriptor_leak),
  };
  size_t nfixed = sizeof fixed / sizeof fixed[0];
  size_t n = NCASES * NSCEN + nfixed;
  struct CMUnitTest *tests = calloc(n, sizeof *tests);
  struct entry *entries = calloc(NCASES * NSCEN, sizeof *entries);
  if (tests == NULL || entries == NULL)
    return 1;
  size_t k = 0;
  for (size_t c = 0; c < NCASES; c++)
    for (size_t sc = 0; sc < NSCEN; sc++) {
      struct entry *e = &entries[c * NSCEN + sc];
      e->c = &cases[c];
      snprintf(e->name, sizeof e->name, "%s/%s%s/%s", op_names[cases[c].op],
               tr_names[cases[c].tr], cases[c].nonblock ? "-nonblock" : "",
               scenarios[sc].name);
      tests[k].name = e->name;
      tests[k].test_func = scenarios[sc].fn;
      tests[k].initial_state = e;
      tests[k].teardown_func = test_helpers_teardown;
      k++;
    }
  for (size_t i = 0; i < nfixed; i++)
    tests[k++] = fixed[i];
  /* Subsets by name (cmocka globs): CANCEL_TEST_FILTER runs only the
   * tests that match, CANCEL_TEST_SKIP skips those that match. */
  if (getenv("CANCEL_TEST_FILTER") != NULL)
    cmocka_set_test_filter(getenv("CANCEL_TEST_FILTER"));
  if (getenv("CANCEL_TEST_SKIP") != NULL)
    cmocka_set_skip_filter(getenv("CANCEL_TEST_SKIP"));
  int rc = _cmocka_run_group_tests("io_test", tests, n, NULL, NULL);
  free(tests);
  free(entries);
  return rc;
}
