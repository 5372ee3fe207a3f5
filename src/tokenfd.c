/*
 * cancel_token_fd: an eventfd that becomes readable when the token fires,
 * for event loops.  Made on first request, one per source, written once by
 * a registration on the source, closed at the source's teardown.
 */
#define _GNU_SOURCE
#include "internal.h"

#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct cancel__tokenfd {
  cancel_reg reg;
  int fd;
};

static void signal_fd(void *arg) {
  struct cancel__tokenfd *rec = arg;
  uint64_t one = 1;
  ssize_t n = write(rec->fd, &one, sizeof one);
  (void)n;
}

int cancel_token_fd(const cancel_token *tok) {
  if (tok == NULL)
    return -EINVAL;
  cancel_source *src = (cancel_source *)tok;
  uint32_t v = cancel__lock(src);
  if (src->seen & SEEN_FD) {
    int fd = src->fdrec->fd;
    cancel__unlock(src, v);
    return fd;
  }
  cancel__unlock(src, v);

  /* Made outside the lock (system calls), installed under it. */
  struct cancel__tokenfd *rec = malloc(sizeof *rec);
  if (rec == NULL)
    return -ENOMEM;
  rec->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (rec->fd < 0) {
    int err = errno;
    free(rec);
    return -err;
  }
  v = cancel__lock(src);
  if (src->seen & SEEN_FD) { /* another thread was first */
    int fd = src->fdrec->fd;
    cancel__unlock(src, v);
    close(rec->fd);
    free(rec);
    return fd;
  }
  src->fdrec = rec;
  src->seen |= SEEN_FD;
  rec->reg.fn = signal_fd;
  rec->reg.arg = rec;
  rec->reg.src = src;
  bool fired = (v & ST_CANCELLED) != 0;
  if (fired) {
    st_relaxed(&rec->reg.state, REG_DONE);
  } else {
    cancel__list_push(src, &rec->reg);
    st_relaxed(&rec->reg.state, REG_LISTED);
  }
  cancel__unlock(src, v);
  if (fired)
    signal_fd(rec);
  return rec->fd;
}

void cancel__tokenfd_free(cancel_source *src) {
  struct cancel__tokenfd *rec = src->fdrec;
  cancel_unregister(&rec->reg);
  close(rec->fd);
  free(rec);
}
