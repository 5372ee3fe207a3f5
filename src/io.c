/*
 * Descriptor I/O that observes a token: read, write, recv, send, accept,
 * connect, and the loops that transfer a whole buffer.
 *
 * Each call first tries the operation without blocking, so a ready
 * descriptor costs one system call: preadv2/pwritev2 with RWF_NOWAIT for
 * read and write (pipes, sockets and regular files support it), and
 * MSG_DONTWAIT for recv and send.  Where the file says EOPNOTSUPP (a FIFO
 * opened by name, a tty, on this kernel) we poll first and then read, or
 * write at most PIPE_BUF bytes, which POLLOUT has room for: on a blocking
 * descriptor that another thread also reads or writes, the other thread
 * may take the data or the room between the two and this call then blocks
 * deaf to the token.  Give such shared descriptors O_NONBLOCK.  Only when the
 * descriptor is not ready does it wait, in cancel_wait_fd(), with the token.
 * The descriptor's blocking mode is never changed (connect excepted, and
 * restored).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <fcntl.h>
#include <limits.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#ifndef CANCEL_HAVE_PREADV2
#include <linux/fs.h> /* RWF_NOWAIT, without the C library's preadv2 */
#endif
#include <unistd.h>

/* preadv2/pwritev2 at the current position with RWF_NOWAIT (Linux 4.14).
 * glibc (2.26) has the wrappers; musl 1.2.3 has not, and gets the system
 * call itself, whose offset comes as two words (the high one ignored by a
 * 64-bit kernel): -1 in both is -1, "the current position" (cancel.h:
 * Platform). */
#ifdef CANCEL_HAVE_PREADV2
static ssize_t nowait_rw(long nr, int fd, struct iovec *iov) {
  return nr == SYS_preadv2 ? preadv2(fd, iov, 1, -1, RWF_NOWAIT)
                           : pwritev2(fd, iov, 1, -1, RWF_NOWAIT);
}
#else
static ssize_t nowait_rw(long nr, int fd, struct iovec *iov) {
  return syscall(nr, fd, iov, 1, -1L, -1L, RWF_NOWAIT);
}
#endif

typedef ssize_t attempt_fn(int fd, void *buf, size_t len, int flags,
                           bool nowait);

static ssize_t try_read(int fd, void *buf, size_t len, int flags, bool nowait) {
  (void)flags;
  if (!nowait)
    return read(fd, buf, len);
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  return nowait_rw(SYS_preadv2, fd, &iov);
}

static ssize_t try_write(int fd, void *buf, size_t len, int flags,
                         bool nowait) {
  (void)flags;
  /* Without RWF_NOWAIT we write after POLLOUT, which promises room for
   * PIPE_BUF bytes, not for len: a larger blocking write would wait for
   * the reader, deaf to the token. */
  if (!nowait)
    return write(fd, buf, len < PIPE_BUF ? len : PIPE_BUF);
  struct iovec iov = {.iov_base = buf, .iov_len = len};
  return nowait_rw(SYS_pwritev2, fd, &iov);
}

static ssize_t try_recv(int fd, void *buf, size_t len, int flags, bool nowait) {
  (void)nowait;
  return recv(fd, buf, len, flags | MSG_DONTWAIT);
}

static ssize_t try_send(int fd, void *buf, size_t len, int flags, bool nowait) {
  (void)nowait;
  return send(fd, buf, len, flags | MSG_DONTWAIT | MSG_NOSIGNAL);
}

/* The shared loop: attempt, and on "would block" wait for `events` with
 * the token.  `nowait` is whether the attempt may use RWF_NOWAIT: cleared
 * for good when the descriptor does not support it, after which the loop
 * waits for readiness before each (possibly blocking) attempt. */
static ssize_t transfer(const cancel_token *tok, int fd, void *buf, size_t len,
                        int flags, int64_t deadline, attempt_fn *attempt,
                        short events) {
  if (fd < 0)
    return -EBADF;
  if (len > SSIZE_MAX || (buf == NULL && len > 0))
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  bool nowait = true;
  bool ready = false;
  for (;;) {
    if (nowait || ready) {
      ssize_t n = attempt(fd, buf, len, flags, nowait);
      if (n >= 0)
        return n;
      if (errno == EINTR)
        continue;
      if ((errno == EOPNOTSUPP || errno == ENOSYS) && nowait) {
        /* No RWF_NOWAIT for this file, or no preadv2 at all (Linux before
         * 4.6): readiness first. */
        nowait = false;
      } else if (errno != EAGAIN && errno != EWOULDBLOCK) {
        return -errno;
      }
    }
    int rc = cancel_wait_fd(tok, fd, events, deadline);
    if (rc < 0)
      return rc;
    ready = true;
  }
}

ssize_t cancel_read(const cancel_token *tok, int fd, void *buf, size_t len,
                    int64_t deadline) {
  return transfer(tok, fd, buf, len, 0, deadline, try_read, POLLIN);
}

ssize_t cancel_write(const cancel_token *tok, int fd, const void *buf,
                     size_t len, int64_t deadline) {
  return transfer(tok, fd, (void *)buf, len, 0, deadline, try_write, POLLOUT);
}

ssize_t cancel_recv(const cancel_token *tok, int fd, void *buf, size_t len,
                    int flags, int64_t deadline) {
  return transfer(tok, fd, buf, len, flags, deadline, try_recv, POLLIN);
}

ssize_t cancel_send(const cancel_token *tok, int fd, const void *buf,
                    size_t len, int flags, int64_t deadline) {
  return transfer(tok, fd, (void *)buf, len, flags, deadline, try_send,
                  POLLOUT);
}

/* Repeats transfers until len bytes moved (or, reading, end of file);
 * *done always says how far it got. */
static ssize_t full(const cancel_token *tok, int fd, char *buf, size_t len,
                    int64_t deadline, size_t *done, attempt_fn *attempt,
                    short events) {
  size_t moved = 0;
  ssize_t rc = 0;
  if (done != NULL)
    *done = 0;
  if (len > SSIZE_MAX)
    return -EINVAL;
  while (moved < len) {
    rc = transfer(tok, fd, buf + moved, len - moved, 0, deadline, attempt,
                  events);
    if (rc <= 0)
      break; /* an error, or end of file */
    moved += (size_t)rc;
    if (done != NULL)
      *done = moved;
  }
  return rc < 0 ? rc : (ssize_t)moved;
}

ssize_t cancel_read_full(const cancel_token *tok, int fd, void *buf, size_t len,
                         int64_t deadline, size_t *done) {
  return full(tok, fd, buf, len, deadline, done, try_read, POLLIN);
}

ssize_t cancel_write_full(const cancel_token *tok, int fd, const void *buf,
                          size_t len, int64_t deadline, size_t *done) {
  return full(tok, fd, (char *)buf, len, deadline, done, try_write, POLLOUT);
}

int cancel_accept(const cancel_token *tok, int fd, struct sockaddr *addr,
                  socklen_t *addrlen, int flags, int64_t deadline) {
  if (fd < 0)
    return -EBADF;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  /* Readiness comes first below, and a socket that does not listen would
   * never become ready: ask it once. */
  int listening = 0;
  socklen_t optlen = sizeof listening;
  if (getsockopt(fd, SOL_SOCKET, SO_ACCEPTCONN, &listening, &optlen) < 0)
    return -errno; /* ENOTSOCK, EBADF */
  if (!listening)
    return -EINVAL;
  for (;;) {
    /* Readiness first: accept4 has no per-call "don't block" flag, and on
     * a blocking listener it could block if another thread took the
     * connection between the poll and the accept (use a non-blocking
     * listener when several threads accept). */
    int rc = cancel_wait_fd(tok, fd, POLLIN, deadline);
    if (rc < 0)
      return rc;
    int c = accept4(fd, addr, addrlen, flags);
    if (c >= 0)
      return c;
    if (errno != EAGAIN && errno != EWOULDBLOCK && errno != EINTR &&
        errno != ECONNABORTED)
      return -errno;
  }
}

int cancel_connect(const cancel_token *tok, int fd, const struct sockaddr *addr,
                   socklen_t addrlen, int64_t deadline) {
  if (fd < 0)
    return -EBADF;
  if (addr == NULL)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  int fl = fcntl(fd, F_GETFL);
  if (fl < 0)
    return -errno;
  if (!(fl & O_NONBLOCK) && fcntl(fd, F_SETFL, fl | O_NONBLOCK) < 0)
    return -errno;
  int rc = 0;
  if (connect(fd, addr, addrlen) < 0) {
    if (errno != EINPROGRESS && errno != EINTR) {
      rc = -errno;
    } else {
      rc = cancel_wait_fd(tok, fd, POLLOUT, deadline);
      if (rc >= 0) {
        int err = 0;
        socklen_t elen = sizeof err;
        if (getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &elen) < 0)
          rc = -errno;
        else
          rc = -err;
      }
    }
  }
  if (!(fl & O_NONBLOCK))
    fcntl(fd, F_SETFL, fl);
  return rc;
}
