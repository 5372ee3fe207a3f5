/*
 * Timeouts: a binary min-heap of sources keyed by their timer_at, fired on
 * the reactor thread.  A heap rather than a timing wheel: arming and
 * disarming are O(log n) with no per-tick work and exact deadlines, and the
 * common case (a timeout disposed long before it fires, many per second,
 * few alive at once) keeps the heap shallow.  Each source carries its own
 * heap index, so removal needs no search and no allocation.
 *
 * Everything here is under the reactor lock.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

static struct {
  cancel_source **v;
  size_t len, cap;
  cancel_source *firing; /* popped and being fired right now */
  unsigned waiters;      /* threads waiting for `firing` to change */
} heap;

static void place(size_t i, cancel_source *src) {
  heap.v[i] = src;
  src->heap_idx = (int64_t)i;
}

static void sift_up(size_t i) {
  cancel_source *src = heap.v[i];
  while (i > 0) {
    size_t up = (i - 1) / 2;
    if (heap.v[up]->timer_at <= src->timer_at)
      break;
    place(i, heap.v[up]);
    i = up;
  }
  place(i, src);
}

static void sift_down(size_t i) {
  cancel_source *src = heap.v[i];
  for (;;) {
    size_t l = 2 * i + 1, best = i;
    int64_t key = src->timer_at;
    if (l < heap.len && heap.v[l]->timer_at < key)
      best = l, key = heap.v[l]->timer_at;
    if (l + 1 < heap.len && heap.v[l + 1]->timer_at < key)
      best = l + 1;
    if (best == i)
      break;
    place(i, heap.v[best]);
    i = best;
  }
  place(i, src);
}

static void heap_remove(cancel_source *src) {
  size_t i = (size_t)src->heap_idx;
  src->heap_idx = -1;
  src->timer_at = CANCEL_NEVER;
  cancel_source *last = heap.v[--heap.len];
  if (last == src)
    return;
  place(i, last);
  sift_down(i);
  sift_up((size_t)last->heap_idx);
}

int cancel__timer_update(cancel_source *src) {
  int rc = 0;
  cancel__reactor_lock();
  int64_t at = cancel__own_deadline(src);
  if (at == CANCEL_NEVER) {
    if (src->heap_idx >= 0)
      heap_remove(src);
    goto out;
  }
  /* Everything that can fail comes first: a failed update leaves the
   * heap as it was, so that the caller can put the old deadline back and
   * find it still queued. */
  if ((rc = cancel__reactor_ensure_locked()) < 0)
    goto out;
  if (src->heap_idx < 0) {
    if (heap.len == heap.cap) {
      size_t cap = heap.cap ? 2 * heap.cap : 64;
      cancel_source **v = realloc(heap.v, cap * sizeof *v);
      if (v == NULL) {
        rc = -ENOMEM;
        goto out;
      }
      heap.v = v;
      heap.cap = cap;
    }
    src->timer_at = at;
    place(heap.len++, src);
    sift_up(heap.len - 1);
  } else {
    src->timer_at = at;
    sift_down((size_t)src->heap_idx);
    sift_up((size_t)src->heap_idx);
  }
  if (heap.v[0] == src)
    cancel__reactor_schedule_locked(at);
out:
  cancel__reactor_unlock();
  return rc;
}

void cancel__timer_disarm(cancel_source *src) {
  cancel__reactor_lock();
  if (src->heap_idx >= 0)
    heap_remove(src);
  while (heap.firing == src && !cancel__on_reactor()) {
    heap.waiters++;
    cancel__reactor_wait_locked();
    heap.waiters--;
  }
  cancel__reactor_unlock();
}

int64_t cancel__timer_run_locked(void) {
  int64_t now = cancel_now();
  while (heap.len > 0 && heap.v[0]->timer_at <= now) {
    cancel_source *src = heap.v[0];
    heap_remove(src);
    heap.firing = src;
    cancel__reactor_unlock();
    cancel__timer_fired(src);
    cancel__reactor_lock();
    heap.firing = NULL;
    if (heap.waiters > 0)
      cancel__reactor_broadcast_locked();
    now = cancel_now();
  }
  return heap.len > 0 ? heap.v[0]->timer_at : CANCEL_NEVER;
}

void cancel__timer_atfork_child(void) {
  /* The parent's timers are not armed in the child (cancel.h, "fork()"):
   * a source in the heap may live in a thread's memory that the child
   * does not have (a caller-storage source on a worker's stack), and a
   * timer fired there would write into whatever reuses it.  Their
   * sources keep their deadlines; the child re-arms what it wants. */
  for (size_t i = 0; i < heap.len; i++) {
    heap.v[i]->heap_idx = -1;
    heap.v[i]->timer_at = CANCEL_NEVER;
  }
  heap.len = 0;
  heap.firing = NULL;
  heap.waiters = 0;
}

void cancel__timer_fired(cancel_source *src) {
  int64_t now = cancel_now();
  if (cancel__shield_timer_fired(src, now))
    return;
  if (ld_relaxed(&src->deadline) > now)
    return; /* moved later meanwhile: the move re-queued it */
  char detail[CANCEL__DETAIL_INLINE];
  int64_t timeout = ld_relaxed(&src->timeout);
  if (timeout >= 0)
    cancel__format_duration(detail, sizeof detail, timeout);
  else
    snprintf(detail, sizeof detail, "deadline");
  cancel__fire(src, CANCEL_TIMEOUT, detail, NULL, now, 0);
}

/* Sets the source's own deadline (and the duration behind it, -1 for an
 * absolute deadline), updates the effective deadlines below it and queues
 * it.  When it cannot be queued, the deadline it had is put back: a
 * deadline nobody enforces must not be shown (and propagated downstream)
 * as the token's budget. */
static int arm(cancel_source *src, int64_t deadline, int64_t timeout) {
  if (src == NULL)
    return -EINVAL;
  uint32_t v = cancel__lock(src);
  if (v & ST_CANCELLED) {
    cancel__unlock(src, v);
    return 1;
  }
  if (!(src->seen & SEEN_TIMER)) {
    src->seen |= SEEN_TIMER;
    src->timeout = -1;       /* first arm: nothing to put back */
    if (src->shield == NULL) /* a shield's is set up with it */
      src->heap_idx = -1;    /* first arm: not in the heap yet */
  }
  int64_t old_deadline = src->deadline, old_timeout = src->timeout;
  st_relaxed(&src->deadline, deadline);
  st_relaxed(&src->timeout, timeout);
  bool push = cancel__deadline_update_locked(src);
  cancel__unlock(src, v);
  if (push)
    cancel__deadline_push(src);
  if (deadline != CANCEL_NEVER && deadline <= cancel_now()) {
    cancel__timer_fired(src);
    return 0;
  }
  int rc = cancel__timer_update(src);
  if (rc < 0) {
    v = cancel__lock(src);
    /* Unless another arm has been made since (its value is the one to
     * keep: the last written wins). */
    push = false;
    if (src->deadline == deadline && src->timeout == timeout) {
      st_relaxed(&src->deadline, old_deadline);
      st_relaxed(&src->timeout, old_timeout);
      push = cancel__deadline_update_locked(src);
    }
    cancel__unlock(src, v);
    if (push)
      cancel__deadline_push(src);
  }
  return rc;
}

int cancel_source_cancel_at(cancel_source *src, int64_t deadline) {
  return arm(src, deadline, -1);
}

int cancel_source_cancel_after(cancel_source *src, int64_t timeout_ns) {
  if (timeout_ns < 0)
    return -EINVAL;
  return arm(src, cancel__deadline_after(cancel_now(), timeout_ns), timeout_ns);
}
