/*
 * Hang-up watches: cancel a request's source when its connection's peer
 * goes away, from the reactor thread.
 *
 * The watch registers its own duplicate of the socket, one-shot, for
 * EPOLLRDHUP (EPOLLHUP and EPOLLERR come without asking) and never for
 * EPOLLIN: data the client sends (a pipelined request, a body the handler
 * has not read yet) keeps the socket readable, and must not look like a
 * departure.  It never reads the socket either, not even SO_ERROR (that
 * would clear the error the owner's next recv() should see), so the reason
 * is told from the events alone: EPOLLERR means the connection failed (a
 * reset, in practice), anything else that the peer closed.
 *
 * Lifetime: the watch holds a reference on its source while armed, so the
 * reactor can cancel it whatever the owner does with its own reference.
 * cancel_unwatch() unregisters (waiting for a callback running on the
 * reactor), then closes the duplicate, then drops the reference.
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/watch.h"

#include <fcntl.h>
#include <sys/epoll.h>
#include <unistd.h>

/* cancel_watch.state when armed (0 when not): a value that stray memory
 * is unlikely to hold, so that a stray cancel_unwatch() is caught. */
#define WATCH_ARMED 0x68757021u

/* Runs on the reactor thread, once (EPOLLONESHOT). */
static void hangup(void *arg, uint32_t events) {
  cancel_watch *w = arg;
  const char *detail = (events & EPOLLERR) ? "connection reset" : "peer closed";
  /* A reference of our own for the cancel: one of src's callbacks may
   * unwatch, dropping the watch's reference while the cancel still runs
   * here, and the owner may drop the last one on another thread at once
   * (it learned from the callback that the source is cancelled, not that
   * the cancel has finished). */
  cancel_source *src = cancel_source_ref(w->src);
  /* Before the cancel: one of src's callbacks may unwatch (and free) w,
   * and must then learn that the watch fired.  w is not touched after. */
  st_relaxed(&w->fired, 1);
  cancel__fire(src, CANCEL_CLIENT_GONE, detail, NULL, cancel_now(), 0);
  cancel_source_unref(src);
}

/* cancel_watch_hangup_fn's callback on the reactor, once. */
static void hangup_fn(void *arg, uint32_t events) {
  cancel_watch *w = arg;
  /* Before fn: fn may unwatch (and free) w, and must then learn that the
   * watch fired.  w is not touched after. */
  void (*fn)(void *, int) = w->fn;
  void *fn_arg = w->fn_arg;
  st_relaxed(&w->fired, 1);
  fn(fn_arg, (events & EPOLLERR) ? 1 : 0);
}

static int arm(cancel_watch *w, cancel_source *src, int fd,
               void (*fn)(void *, int), void *arg) {
  if (fd < 0)
    return -EBADF;
  if (ld_acquire(&w->state) == WATCH_ARMED)
    return -EBUSY;
  int dup = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  if (dup < 0)
    return -errno; /* EBADF, EMFILE */
  w->fd = dup;
  w->src = src != NULL ? cancel_source_ref(src) : NULL;
  w->fn = fn;
  w->fn_arg = arg;
  st_relaxed(&w->fired, 0);
  st_relaxed(&w->state, WATCH_ARMED);
  /* The callback may run before this returns (a peer gone already): every
   * field it reads is set above. */
  int rc = cancel__reactor_watch_add(&w->rw, dup, EPOLLRDHUP | EPOLLONESHOT,
                                     fn != NULL ? hangup_fn : hangup, w);
  if (rc < 0) {
    st_relaxed(&w->state, 0);
    close(dup);
    w->fd = -1;
    w->src = NULL;
    cancel_source_unref(src);
    return rc;
  }
  return 0;
}

int cancel_watch_hangup(cancel_watch *w, cancel_source *src, int fd) {
  if (w == NULL || src == NULL)
    return -EINVAL;
  return arm(w, src, fd, NULL, NULL);
}

int cancel_watch_hangup_fn(cancel_watch *w, int fd,
                           void (*fn)(void *arg, int reset), void *arg) {
  if (w == NULL || fn == NULL)
    return -EINVAL;
  return arm(w, NULL, fd, fn, arg);
}

int cancel_unwatch(cancel_watch *w) {
  if (w == NULL)
    return -EINVAL;
  uint32_t armed = WATCH_ARMED;
  if (!__atomic_compare_exchange_n(&w->state, &armed, 0, 0, __ATOMIC_ACQUIRE,
                                   __ATOMIC_RELAXED))
    return -EINVAL; /* never armed, or unwatched already */
  /* After this the callback has run to its end or never will (except when
   * we are inside it, on the reactor: then it set `fired` already). */
  cancel__reactor_watch_del(&w->rw);
  int fired = (int)ld_relaxed(&w->fired);
  cancel_source *src = w->src;
  close(w->fd);
  w->fd = -1;
  w->src = NULL;
  cancel_source_unref(src);
  return fired ? 0 : 1;
}
