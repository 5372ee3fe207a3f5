/*
 * Sources: creation, references, cancellation, registrations, teardown.
 *
 * Invariants (the source lock is the ST_LOCKED bit of the state word):
 *   - head, running, running_*, children and flags change only under the
 *     lock; the reason fields (kind, time, via, detail) are written once,
 *     under the lock, before ST_CANCELLED is published with a release store.
 *   - A registration is in exactly one of the states of internal.h.  Only
 *     the canceller moves it RUNNING -> DONE, and after that store it never
 *     touches the registration again (the owner may free it at once).
 *   - Callbacks run outside the lock, one at a time, newest first.
 */
#include "internal.h"

#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------------
 * Setup
 * --------------------------------------------------------------------- */

/* Copies a name longer than "" into the source (inline when it fits). */
static int set_name(cancel_source *src, const char *name) {
  size_t n = strlen(name);
  if (n < sizeof src->name_buf) {
    memcpy(src->name_buf, name, n + 1);
    src->name = src->name_buf;
    return 0;
  }
  char *copy = malloc(n + 1);
  if (copy == NULL)
    return -ENOMEM;
  memcpy(copy, name, n + 1);
  src->name = copy;
  src->flags |= SF_NAME_OWNED;
  return 0;
}

static inline int setup(cancel_source *src, const char *name, uint32_t flags) {
  /* Field by field, and only what is read before a cancel, a first arm or
   * a first child sets the rest (reason fields, running*, timer fields):
   * on a 200-byte struct this is three times faster than memset. */
  src->tok.state = 0;
  src->refs = 1;
  src->flags = flags;
  src->seen = 0;
  src->head = NULL;
  src->children = NULL;
  src->via = NULL;
  src->nlinks = 0;
  src->links = NULL;
  src->shield = NULL;
  src->deadline = CANCEL_NEVER;
  src->name = "";
  return (name != NULL && name[0] != '\0') ? set_name(src, name) : 0;
}

int cancel__source_setup(cancel_source *src, const char *name, uint32_t flags) {
  return setup(src, name, flags);
}

int cancel_source_new(cancel_source **srcp, const char *name) {
  if (srcp == NULL)
    return -EINVAL;
  *srcp = NULL;
  cancel_source *src = malloc(sizeof *src);
  if (src == NULL)
    return -ENOMEM;
  int rc = setup(src, name, SF_HEAP);
  if (rc < 0) {
    free(src);
    return rc;
  }
  *srcp = src;
  return 0;
}

int cancel_source_init(cancel_source *src, const char *name) {
  if (src == NULL)
    return -EINVAL;
  return setup(src, name, 0);
}

const char *cancel_source_name(const cancel_source *src) {
  return src != NULL ? src->name : "";
}

cancel_source *cancel_source_ref(cancel_source *src) {
  if (src != NULL)
    __atomic_add_fetch(&src->refs, 1, __ATOMIC_RELAXED);
  return src;
}

/* ---------------------------------------------------------------------
 * Registration lists
 * --------------------------------------------------------------------- */

void cancel__list_push(cancel_source *src, cancel_reg *reg) {
  reg->prev = NULL;
  reg->next = src->head;
  if (src->head != NULL)
    src->head->prev = reg;
  src->head = reg;
}

static void list_unlink(cancel_source *src, cancel_reg *reg) {
  if (reg->prev != NULL)
    reg->prev->next = reg->next;
  else
    src->head = reg->next;
  if (reg->next != NULL)
    reg->next->prev = reg->prev;
}

int cancel__reg_remove_locked(cancel_source *src, uint32_t v, cancel_reg *reg) {
  uint32_t st = ld_acquire(&reg->state);
  switch (st & REG_STATE_MASK) {
  case REG_LISTED:
    list_unlink(src, reg);
    st_relaxed(&reg->state, REG_IDLE);
    cancel__unlock(src, v);
    return 1;
  case REG_RUNNING:
    if (src->running == reg && src->running_tid == cancel__self()) {
      /* A callback removing itself (or a sibling call on the cancelling
       * thread): waiting would deadlock.  Tell the canceller not to touch
       * reg after the callback returns, since its owner may free it. */
      *src->running_gone = true;
      st_relaxed(&reg->state, REG_IDLE);
      cancel__unlock(src, v);
      return 0;
    }
    /* Announce a waiter under the lock: the canceller moves the state to
     * DONE under the same lock, sees the flag and wakes us. */
    st |= REG_WAITERS;
    st_relaxed(&reg->state, st);
    cancel__unlock(src, v);
    while ((st & REG_STATE_MASK) == REG_RUNNING) {
      cancel__futex_wait(&reg->state, st);
      st = ld_acquire(&reg->state);
    }
    st_relaxed(&reg->state, REG_IDLE);
    return 0;
  case REG_DONE:
    cancel__unlock(src, v);
    st_relaxed(&reg->state, REG_IDLE);
    return 0;
  default:
    cancel__unlock(src, v);
    st_relaxed(&reg->state, REG_IDLE);
    return 1;
  }
}

void cancel__reg_forget(cancel_reg *reg) {
  /* A registration whose callback a thread of the parent was running
   * stays the source's `running`: that cancel never finishes here. */
  if ((ld_relaxed(&reg->state) & REG_STATE_MASK) == REG_LISTED &&
      reg->src != NULL)
    list_unlink(reg->src, reg);
  st_relaxed(&reg->state, REG_IDLE);
}

int cancel_register(cancel_reg *reg, const cancel_token *tok, cancel_fn *fn,
                    void *arg) {
  if (reg == NULL || fn == NULL)
    return -EINVAL;
  reg->fn = fn;
  reg->arg = arg;
  if (tok == NULL) {
    reg->src = NULL;
    st_relaxed(&reg->state, REG_NULLTOK);
    return 0;
  }
  cancel_source *src = (cancel_source *)tok;
  reg->src = src;
  uint32_t v = cancel__lock(src);
  if (v & ST_CANCELLED) {
    cancel__unlock(src, v);
    st_relaxed(&reg->state, REG_DONE);
    fn(arg);
    return 1;
  }
  cancel__list_push(src, reg);
  st_relaxed(&reg->state, REG_LISTED);
  cancel__unlock(src, v);
  return 0;
}

int cancel_unregister(cancel_reg *reg) {
  if (reg == NULL)
    return -EINVAL;
  switch (ld_acquire(&reg->state) & REG_STATE_MASK) {
  case REG_LISTED:
  case REG_RUNNING: {
    cancel_source *src = reg->src;
    return cancel__reg_remove_locked(src, cancel__lock(src), reg);
  }
  case REG_DONE:
    st_relaxed(&reg->state, REG_IDLE);
    return 0;
  case REG_DETACHED:
  case REG_NULLTOK:
    st_relaxed(&reg->state, REG_IDLE);
    return 1;
  default:
    return -EINVAL;
  }
}

/* ---------------------------------------------------------------------
 * Cancelling
 * --------------------------------------------------------------------- */

static void teardown_list(cancel_source *src);

int cancel__fire(cancel_source *src, int kind, const char *detail,
                 cancel_source *via, int64_t time, uint32_t extra_flags) {
  /* A long detail is copied before taking the lock: no malloc while other
   * threads spin on it. */
  char *owned = NULL;
  size_t dlen = detail != NULL ? strlen(detail) : 0;
  if (dlen >= sizeof src->detail_buf)
    owned = strdup(detail); /* NULL on ENOMEM: the detail is dropped */

  uint32_t v = cancel__lock(src);
  if (v & ST_CANCELLED) {
    cancel__unlock(src, v);
    free(owned);
    return 0;
  }
  src->kind = kind;
  src->time = time;
  src->via = via;
  if (owned != NULL) {
    src->detail = owned;
    src->flags |= SF_DETAIL_OWNED;
  } else if (dlen > 0 && dlen < sizeof src->detail_buf) {
    memcpy(src->detail_buf, detail, dlen + 1);
    src->detail = src->detail_buf;
  } else {
    src->detail = "";
  }
  src->flags |= SF_FIRING | extra_flags;
  src->running_tid = cancel__self();
  /* Published by the next unlock (a release store), before any callback
   * runs: a reader that sees the bit sees the reason. */
  v |= ST_CANCELLED;

  cancel_reg *reg;
  while ((reg = src->head) != NULL) {
    list_unlink(src, reg);
    st_relaxed(&reg->state, REG_RUNNING);
    bool gone = false;
    src->running = reg;
    src->running_gone = &gone;
    cancel__unlock(src, v);
    reg->fn(reg->arg);
    v = cancel__lock(src);
    if (!gone) {
      /* RUNNING -> DONE under the lock, where a waiter announced itself:
       * no read-modify-write needed.  reg may be freed as soon as the
       * waiter sees DONE; the wake only uses its address as a key. */
      uint32_t old = ld_relaxed(&reg->state);
      st_release(&reg->state, REG_DONE);
      if (old & REG_WAITERS)
        cancel__futex_wake_all(&reg->state);
    }
  }
  src->running = NULL;
  src->running_gone = NULL;
  src->flags &= ~SF_FIRING;
  bool pending = (src->flags & SF_PENDING) != 0;
  cancel__unlock(src, v);
  /* Counted once, at the origin: the sources it reaches through links
   * (via != NULL) are the same cancellation. */
  if (via == NULL)
    cancel__metrics_cancelled(kind, src->name);
  if (pending) /* its last reference went while we ran its callbacks */
    teardown_list(src);
  return 1;
}

int cancel_source_cancel_with(cancel_source *src, int kind,
                              const char *detail) {
  if (src == NULL || kind <= CANCEL_NONE ||
      (kind > CANCEL_SHUTDOWN && kind < CANCEL_USER))
    return -EINVAL;
  return cancel__fire(src, kind, detail, NULL, cancel_now(), 0);
}

int cancel_source_cancel(cancel_source *src) {
  return cancel_source_cancel_with(src, CANCEL_REQUESTED, NULL);
}

int cancel_token_kind(const cancel_token *tok) {
  if (!cancel_token_is_cancelled(tok))
    return CANCEL_NONE;
  return ((const cancel_source *)tok)->kind;
}

/* ---------------------------------------------------------------------
 * Teardown
 * --------------------------------------------------------------------- */

/* Detaches what still hangs on a source being torn down (lock held): its
 * registrations never run, and its children (a caller-storage source only:
 * a heap one with children becomes a zombie instead) lose this parent. */
static void detach_everything_locked(cancel_source *src) {
  for (cancel_reg *reg = src->head; reg != NULL; reg = reg->next) {
    reg->src = NULL;
    st_release(&reg->state, REG_DETACHED);
  }
  src->head = NULL;
  if (src->children == NULL)
    return;
  cancel__misuse("cancel_source_destroy",
                 "source destroyed while linked children are alive: they "
                 "are detached from it");
  for (struct cancel__link *l = src->children; l != NULL; l = l->cnext) {
    st_release(&l->parent, NULL);
    cancel_source *child = l->child;
    uint32_t cv = cancel__lock(child); /* parent, then child: never back */
    if (child->via == src)             /* the reason's path is cut here */
      child->via = NULL;
    cancel__unlock(child, cv);
  }
  src->children = NULL;
}

/* Cuts src loose from everything that still points at it, then frees what
 * it owns.  Parents that were kept alive only by src are pushed on *todo. */
static void teardown_one(cancel_source *src, cancel_source **todo) {
  for (uint32_t i = 0; i < src->nlinks; i++) {
    cancel_source *zombie = cancel__link_detach(&src->links[i]);
    if (zombie != NULL) {
      zombie->free_next = *todo;
      *todo = zombie;
    }
  }
  if (src->shield != NULL) {
    cancel_source *zombie = cancel__shield_teardown(src);
    if (zombie != NULL) {
      zombie->free_next = *todo;
      *todo = zombie;
    }
  }
  if ((src->seen & SEEN_TIMER) || src->shield != NULL)
    cancel__timer_disarm(src);

  if (src->seen & SEEN_FD)
    cancel__tokenfd_free(src);

  /* Nothing reaches src any more but its children (detaching, under its
   * lock): without any, and with no registration left, skip the lock. */
  if ((src->seen & SEEN_CHILD) || src->head != NULL) {
    uint32_t v = cancel__lock(src);
    detach_everything_locked(src);
    cancel__unlock(src, v);
  }
  if (src->flags & SF_NAME_OWNED)
    free((char *)src->name);
  if (src->flags & SF_DETAIL_OWNED)
    free((char *)src->detail);
  if (src->flags & SF_LINKS_OWNED)
    free(src->links);
  if (src->flags & SF_SHIELD_OWNED)
    free(src->shield);
  if (src->flags & SF_HEAP)
    free(src);
}

/* Tears down src and every zombie ancestor it was the last child of,
 * iteratively: a long chain must not recurse down the stack. */
static void teardown_list(cancel_source *src) {
  cancel_source *todo = src;
  src->free_next = NULL;
  while (todo != NULL) {
    cancel_source *next = todo;
    todo = next->free_next;
    teardown_one(next, &todo);
  }
}

void cancel__source_free(cancel_source *src) {
  teardown_list(src);
}

/* The last reference is gone: decide whether the source dies now. */
static void release(cancel_source *src) {
  /* A source that was never linked, armed or given a child can only be
   * reached through references and borrows, and this was the last: no
   * other thread can touch it, so it needs no lock.  (A parent, the timer
   * thread or a child could reach it without a reference.) */
  uint32_t v;
  if (src->nlinks == 0 && src->shield == NULL && src->seen == 0 &&
      src->head == NULL && !(src->flags & (SF_FIRING | SF_OWNED_MASK))) {
    if (src->flags & SF_HEAP)
      free(src);
    return;
  }
  v = cancel__lock(src);
  if ((src->flags & SF_HEAP) && src->children != NULL) {
    /* Children keep their parents alive: it can still be cancelled by its
     * own parents or timer, and must pass that on.  The application's own
     * callbacks go now, as they would without children. */
    src->flags |= SF_ZOMBIE;
    cancel_reg *reg = src->head;
    while (reg != NULL) {
      cancel_reg *next = reg->next;
      if (reg->fn != cancel__link_fired &&
          reg->fn != cancel__shield_outer_fired) {
        list_unlink(src, reg);
        reg->src = NULL;
        st_release(&reg->state, REG_DETACHED);
      }
      reg = next;
    }
    cancel__unlock(src, v);
    return;
  }
  if ((src->flags & SF_FIRING) && src->running_tid == cancel__self()) {
    /* Dropped from one of its own callbacks: the cancel loop further up
     * this stack finishes the teardown when it ends.  (A cancel running on
     * another thread, from its timer or a parent, is waited for below by
     * the timer disarm or the link detach.) */
    src->flags |= SF_PENDING;
    cancel__unlock(src, v);
    return;
  }
  src->flags |= SF_DEAD;
  cancel__unlock(src, v);
  teardown_list(src);
}

void cancel_source_unref(cancel_source *src) {
  if (src == NULL)
    return;
  uint32_t refs = ld_acquire(&src->refs);
  if (refs == 0) {
    cancel__misuse("cancel_source_unref", "no reference left (released twice)");
    return;
  }
  /* The sole owner needs no read-modify-write: nobody else can take a
   * reference without already holding one. */
  if (refs == 1)
    st_relaxed(&src->refs, 0);
  else if (__atomic_sub_fetch(&src->refs, 1, __ATOMIC_ACQ_REL) != 0)
    return;
  release(src);
}

/* The same function under its caller-storage name (no extra call). */
void cancel_source_destroy(cancel_source *src)
    __attribute__((alias("cancel_source_unref")));
