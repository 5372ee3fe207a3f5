/*
 * cancel_token_fd: an eventfd that becomes readable when the token fires,
 * for event loops.  Made on first request, one per source, written once by
 * a registration on the source, closed at the source's teardown.
 *
 * fork(): the child's copy of a source is not the parent's, but an eventfd
 * inherited across fork() is one object in both processes, so a cancel in
 * either would make the other's token descriptor readable.  Every token
 * descriptor is listed, and the child puts a new eventfd of its own under
 * each one's number (readable if the child's copy of the token fired).
 */
#define _GNU_SOURCE
#include "internal.h"

#include <fcntl.h>
#include <pthread.h>
#include <stdlib.h>
#include <sys/eventfd.h>
#include <unistd.h>

struct cancel__tokenfd {
  cancel_reg reg;
  int fd;
  struct cancel__tokenfd *next, *prev; /* every token descriptor; recs_mu */
};

static pthread_mutex_t recs_mu = PTHREAD_MUTEX_INITIALIZER;
static struct cancel__tokenfd *recs; /* recs_mu */
static pthread_once_t once = PTHREAD_ONCE_INIT;

static void list_add(struct cancel__tokenfd *rec) {
  pthread_mutex_lock(&recs_mu);
  rec->prev = NULL;
  rec->next = recs;
  if (recs != NULL)
    recs->prev = rec;
  recs = rec;
  pthread_mutex_unlock(&recs_mu);
}

static void list_del(struct cancel__tokenfd *rec) {
  pthread_mutex_lock(&recs_mu);
  if (rec->prev != NULL)
    rec->prev->next = rec->next;
  else
    recs = rec->next;
  if (rec->next != NULL)
    rec->next->prev = rec->prev;
  pthread_mutex_unlock(&recs_mu);
}

static void atfork_prepare(void) {
  pthread_mutex_lock(&recs_mu);
}

static void atfork_parent(void) {
  pthread_mutex_unlock(&recs_mu);
}

/* A new eventfd under each token descriptor's number (dup3 replaces the
 * inherited one atomically), written if the child's token has fired.  If
 * the system refuses one, that descriptor stays shared with the parent. */
static void atfork_child(void) {
  for (struct cancel__tokenfd *rec = recs; rec != NULL; rec = rec->next) {
    int fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (fd < 0)
      continue;
    if (dup3(fd, rec->fd, O_CLOEXEC) >= 0 &&
        (ld_relaxed(&rec->reg.src->tok.state) & ST_CANCELLED)) {
      uint64_t one = 1;
      ssize_t n = write(rec->fd, &one, sizeof one);
      (void)n;
    }
    close(fd);
  }
  pthread_mutex_unlock(&recs_mu);
}

static void setup(void) {
  pthread_atfork(atfork_prepare, atfork_parent, atfork_child);
}

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

  /* Made outside the lock (system calls), installed under it.  Listed
   * first: a fork() in between finds it complete either way. */
  pthread_once(&once, setup);
  struct cancel__tokenfd *rec = malloc(sizeof *rec);
  if (rec == NULL)
    return -ENOMEM;
  rec->fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
  if (rec->fd < 0) {
    int err = errno;
    free(rec);
    return -err;
  }
  rec->reg.fn = signal_fd;
  rec->reg.arg = rec;
  rec->reg.src = src;
  list_add(rec);
  v = cancel__lock(src);
  if (src->seen & SEEN_FD) { /* another thread was first */
    int fd = src->fdrec->fd;
    cancel__unlock(src, v);
    list_del(rec);
    close(rec->fd);
    free(rec);
    return fd;
  }
  src->fdrec = rec;
  src->seen |= SEEN_FD;
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
  list_del(rec);
  close(rec->fd);
  free(rec);
}
