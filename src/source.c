/*
 * Sources: creation, references, cancellation, registrations, teardown.
 *
 * Invariants (the source lock is the ST_LOCKED bit of the state word):
 *   - head, running, running_tid, children and flags change only under the
 *     lock; the reason fields (kind, time, via, detail) are written once,
 *     under the lock, before ST_CANCELLED is published with a release store.
 *   - A registration is in exactly one of the states of internal.h.  Only
 *     the canceller moves it RUNNING -> DONE, and after that store it never
 *     touches the registration again (the owner may free it at once).
 *   - Callbacks run outside the lock, one at a time, newest first; a linked
 *     child's callbacks run where its link sits in the parent's list.
 *   - The last unref of a source waits for a callback of it that runs on
 *     another thread (zombies included): then every callback registered
 *     on it has run or never will.
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
  src->unref_waiter = NULL;
  src->eff_deadline = CANCEL_NEVER;
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
      src->flags |= SF_GONE;
      st_relaxed(&reg->state, REG_IDLE);
      cancel__unlock(src, v);
      /* Another thread unregistering it too (a double unregister) waits
       * for DONE, which will not come now: let it see IDLE. */
      if (st & REG_WAITERS)
        cancel__futex_wake_all(&reg->state);
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
 *
 * One loop cancels a source and every source linked below it.  When it
 * pops the registration of a link it does not call the link's callback
 * (that would cancel the child by recursion, a stack frame per level, and
 * a deep chain would overflow the stack) but descends: the child becomes
 * the source the loop runs, and the child's `via`, which names the parent
 * in the reason anyway, is the way back.  When the child's list is empty
 * the loop climbs back to via and ends the link's registration there, just
 * where the recursive call returned.  So callbacks run in the same order
 * as before (depth first: a child's callbacks where its link sits in the
 * parent's list), and the loop's whole state lives in the sources it is
 * in: each one's `running` (in a parent: the link it descended through)
 * and SF_GONE.  A cancel never allocates, however deep the tree.
 *
 * The way back stays valid: a parent is being cancelled on this thread
 * until its loop has ended, and its teardown first waits for that (its
 * link detaches for the registration that reached it, its timer disarm
 * for the timer thread) before it cuts its children's via.
 * --------------------------------------------------------------------- */

static void teardown_list(cancel_source *src);

/* Ends the callback `reg` that src ran (src locked): RUNNING -> DONE under
 * the lock, where a waiter announced itself, so no read-modify-write is
 * needed; unless reg unregistered itself meanwhile (SF_GONE), when its
 * owner may have freed it.  reg may be freed as soon as a waiter sees
 * DONE; the wake only uses its address as a key. */
static inline void reg_done_locked(cancel_source *src, cancel_reg *reg) {
  if (src->flags & SF_GONE) {
    src->flags &= ~SF_GONE;
  } else {
    uint32_t old = ld_relaxed(&reg->state);
    st_release(&reg->state, REG_DONE);
    if (old & REG_WAITERS)
      cancel__futex_wake_all(&reg->state);
  }
  uint32_t *w = src->unref_waiter;
  if (w != NULL) {
    /* The zombie's last unref waits for this callback (wait_running): on
     * its own word, since reg may be freed by its callback.  Last: once
     * woken, the owner frees reg.  A wake only uses the word's address. */
    src->unref_waiter = NULL;
    st_release(w, 1);
    cancel__futex_wake_all(w);
  }
}

/* Runs the callbacks of root (locked as v, its reason written) and of the
 * sources linked below it.  Returns with root unlocked, telling whether
 * its last reference went meanwhile (its teardown is the caller's). */
__attribute__((noinline)) static bool run_tree(cancel_source *root, uint32_t v) {
  cancel_source *src = root; /* the source whose list runs, locked as v */
  for (;;) {
    cancel_reg *reg = src->head;
    if (reg != NULL) {
      list_unlink(src, reg);
      st_relaxed(&reg->state, REG_RUNNING);
      src->running = reg;
      cancel__unlock(src, v);
      if (reg->fn != cancel__link_fired) {
        reg->fn(reg->arg);
      } else {
        /* The link stays valid: the child's teardown, were it under way on
         * another thread, waits for this registration to be DONE. */
        cancel_source *child = ((struct cancel__link *)reg->arg)->child;
        uint32_t cv = cancel__lock(child);
        if (!(cv & ST_CANCELLED)) {
          /* Published by the child's unlock, before its callbacks run. */
          child->kind = src->kind;
          child->time = src->time;
          child->via = src;
          child->detail = "";
          child->flags |= SF_FIRING;
          child->running_tid = cancel__self();
          src = child;
          v = cv | ST_CANCELLED;
          continue;
        }
        cancel__unlock(child, cv); /* reached through another parent */
      }
      v = cancel__lock(src);
      reg_done_locked(src, reg);
      continue;
    }
    /* src's list is empty: its cancel is over. */
    cancel_source *up = src->via;
    src->running = NULL;
    src->flags &= ~SF_FIRING;
    bool pending = (src->flags & SF_PENDING) != 0;
    cancel__unlock(src, v);
    if (src == root)
      return pending;
    if (pending) /* its last reference went while we ran its callbacks */
      teardown_list(src); /* (which may mark up's link SF_GONE) */
    src = up;
    v = cancel__lock(src);
    reg_done_locked(src, src->running);
  }
}

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
  bool pending = run_tree(src, v | ST_CANCELLED);
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
    cancel__deadline_unlink_locked(l); /* and so is its deadline */
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
    if (src->children != NULL) {
      /* Children outlive it (caller storage): they lose its deadline,
       * which is pushed down to theirs under the deadline mutex (taken
       * before any source lock).  Nothing can link to a source being
       * torn down, so the list cannot change while the lock is dropped. */
      cancel__unlock(src, v);
      cancel__deadline_lock();
      v = cancel__lock(src);
      detach_everything_locked(src);
      cancel__unlock(src, v);
      cancel__deadline_unlock();
    } else {
      /* A deadline push may have queued it before its last child went:
       * it is freed only once that push is done with it. */
      bool queued = (src->flags & SF_DL_QUEUED) != 0;
      detach_everything_locked(src);
      cancel__unlock(src, v);
      if (queued)
        cancel__deadline_wait();
    }
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

/* An internal edge (a child's link, a shield's hook), not a callback of
 * the application's. */
static inline bool is_edge(const cancel_reg *reg) {
  return reg->fn == cancel__link_fired || reg->fn == cancel__shield_outer_fired;
}

/* The last reference to src, a zombie now (locked as v, being cancelled),
 * went: one of its own callbacks may be running on another thread (the
 * timer's cancel, or a parent's).  Waits for it, as for any source, so that
 * on return every callback of src has run or never will and may be freed.
 * Not on the cancelling thread (a callback dropping its own source), not
 * for a link or shield edge (the cancel is in a child: those are the
 * child's callbacks), and not for one that unregistered itself.  Unlocks.
 * Out of line: release() stays small for the common case. */
__attribute__((noinline)) static void wait_running(cancel_source *src,
                                                   uint32_t v) {
  cancel_reg *reg = src->running;
  if ((src->flags & SF_GONE) || reg == NULL || is_edge(reg) ||
      src->running_tid == cancel__self() ||
      (ld_relaxed(&reg->state) & REG_STATE_MASK) != REG_RUNNING) {
    cancel__unlock(src, v);
    return;
  }
  /* Announced under the lock on a word of our own, not on reg's state:
   * the callback may unregister itself and free reg while we wait (the
   * registration model, tests/model, found that use after free).  The
   * canceller sets the word under the same lock when the callback has
   * returned (reg_done_locked).  Only the last unref gets here: one
   * waiter at most. */
  uint32_t word = 0;
  src->unref_waiter = &word;
  cancel__unlock(src, v);
  while (ld_acquire(&word) == 0)
    cancel__futex_wait(&word, 0);
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
      if (!is_edge(reg)) {
        list_unlink(src, reg);
        reg->src = NULL;
        st_release(&reg->state, REG_DETACHED);
      }
      reg = next;
    }
    if (src->flags & SF_FIRING) {
      wait_running(src, v); /* unlocks */
      return;
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
