/*
 * Linked sources: a child of N parents, cancelled when any parent is, with
 * the parent's reason and itself appended to the via path.  Each edge is a
 * cancel__link: a registration on the parent plus a place in the parent's
 * children list (which keeps a heap parent alive while it has children).
 */
#include "internal.h"

#include <pthread.h>
#include <stdlib.h>

void cancel__link_attach(struct cancel__link *link, cancel_source *parent,
                         cancel_fn *fn) {
  link->reg.fn = fn;
  link->reg.arg = link;
  link->reg.src = parent;
  link->parent = parent;
  uint32_t v = cancel__lock(parent);
  parent->seen |= SEEN_CHILD;
  if (fn != cancel__shield_outer_fired) {
    /* The child inherits the parent's effective deadline; a shield does
     * not (its deadline is its own).  Read under the parent's lock, which
     * a push holds while it walks the children: either the push sees this
     * child, or this reads what the push wrote. */
    cancel_source *child = link->child;
    uint32_t cv = cancel__lock(child); /* parent, then child */
    int64_t d = ld_relaxed(&parent->eff_deadline);
    st_relaxed(&link->eff, d);
    if (d < child->eff_deadline)
      st_relaxed(&child->eff_deadline, d);
    /* Links are attached while the child is being made: it has no child
     * of its own yet to pass this on to. */
    assert(child->children == NULL);
    cancel__unlock(child, cv);
  }
  link->cprev = NULL;
  link->cnext = parent->children;
  if (parent->children != NULL)
    parent->children->cprev = link;
  parent->children = link;
  if (v & ST_CANCELLED) {
    cancel__unlock(parent, v);
    st_relaxed(&link->reg.state, REG_DONE);
    fn(link);
    return;
  }
  cancel__list_push(parent, &link->reg);
  st_relaxed(&link->reg.state, REG_LISTED);
  cancel__unlock(parent, v);
}

cancel_source *cancel__link_detach(struct cancel__link *link) {
  cancel_source *parent = ld_acquire(&link->parent);
  if (parent == NULL) /* never attached, or its parent was destroyed */
    return NULL;
  uint32_t v = cancel__lock(parent);
  if (link->cprev != NULL)
    link->cprev->cnext = link->cnext;
  else
    parent->children = link->cnext;
  if (link->cnext != NULL)
    link->cnext->cprev = link->cprev;
  st_relaxed(&link->parent, NULL);

  cancel_source *zombie = NULL;
  if ((parent->flags & SF_ZOMBIE) && parent->children == NULL) {
    if (parent->flags & SF_FIRING) {
      parent->flags |= SF_PENDING; /* its canceller frees it when done */
    } else {
      parent->flags |= SF_DEAD;
      zombie = parent;
    }
  }
  cancel__reg_remove_locked(parent, v, &link->reg);
  return zombie;
}

/* The callback of a link registration, called only when the link is
 * attached to a parent that is already cancelled: the cancel loop
 * (cancel__fire) recognises this function in a list and descends into the
 * child itself instead of calling it, so that a chain is cancelled without
 * recursion. */
void cancel__link_fired(void *arg) {
  struct cancel__link *link = arg;
  cancel_source *parent = ld_relaxed(&link->parent);
  if (parent != NULL)
    cancel__fire(link->child, parent->kind, NULL, parent, parent->time, 0);
}

static int check_parents(const cancel_token *const *parents, size_t n) {
  if (n > 0 && parents == NULL)
    return -EINVAL;
  if (n > UINT32_MAX)
    return -EINVAL;
  return 0;
}

static void attach_all(cancel_source *src, const cancel_token *const *parents,
                       size_t n) {
  /* Every link is set up before the first is attached: from then on a
   * push through that parent may recompute src from all of them. */
  src->nlinks = (uint32_t)n;
  for (size_t i = 0; i < n; i++) {
    struct cancel__link *link = &src->links[i];
    link->child = src;
    link->reg.state = REG_IDLE;
    link->parent = NULL;
    link->eff = CANCEL_NEVER;
  }
  for (size_t i = 0; i < n; i++)
    if (parents[i] != NULL)
      cancel__link_attach(&src->links[i], (cancel_source *)parents[i],
                          cancel__link_fired);
}

int cancel_source_new_linked(cancel_source **srcp, const char *name,
                             const cancel_token *const *parents, size_t n) {
  if (srcp == NULL)
    return -EINVAL;
  *srcp = NULL;
  int rc = check_parents(parents, n);
  if (rc < 0)
    return rc;
  /* One block: the source, then its links. */
  cancel_source *src = malloc(sizeof *src + n * sizeof(struct cancel__link));
  if (src == NULL)
    return -ENOMEM;
  rc = cancel__source_setup(src, name, SF_HEAP);
  if (rc < 0) {
    free(src);
    return rc;
  }
  src->links = (struct cancel__link *)(src + 1);
  attach_all(src, parents, n);
  *srcp = src;
  return 0;
}

int cancel_source_init_linked(cancel_source *src, const char *name,
                              const cancel_token *const *parents, size_t n) {
  if (src == NULL)
    return -EINVAL;
  int rc = check_parents(parents, n);
  if (rc < 0)
    return rc;
  struct cancel__link *links = NULL;
  if (n > 0 && (links = malloc(n * sizeof *links)) == NULL)
    return -ENOMEM;
  rc = cancel__source_setup(src, name, n > 0 ? SF_LINKS_OWNED : 0);
  if (rc < 0) {
    free(links);
    return rc;
  }
  src->links = links;
  attach_all(src, parents, n);
  return 0;
}

int64_t cancel__own_deadline(const cancel_source *src) {
  int64_t d = ld_relaxed(&src->deadline);
  if (src->shield != NULL) {
    int64_t g = ld_relaxed(&src->shield->grace_at);
    if (g < d)
      d = g;
  }
  return d;
}

/* ---------------------------------------------------------------------
 * Effective deadlines
 *
 * The effective deadline of a source is the earliest of its own (timer,
 * grace) and of its parents' effective deadlines.  A query walking the
 * ancestry would visit every path, which is exponential when ancestors are
 * shared (a ladder of sources each linked to both of the level above), and
 * recursive.  Instead, as Go's context stores the deadline when it is made,
 * each source keeps its effective deadline, each link keeps the value its
 * parent last passed down it, and a change is pushed down the children:
 * a query is one load, a link costs nothing more, and a re-arm costs the
 * descendants it changes (each at most once per distinct value that
 * reaches it), never a path count.
 *
 * A push walks a work list threaded through the sources (dl_next,
 * SF_DL_QUEUED), so it recurses nowhere and allocates nothing.  One mutex
 * serialises the pushes, which keeps the work list single and lets a
 * teardown wait until no push holds a pointer to the source going away.
 * Only sources with children are ever queued, and only changes that can
 * reach a child take the mutex: arming a leaf (the common timeout) or
 * linking never does.
 *
 * Every write of a source's eff_deadline and of its links' eff is under
 * the source's lock and recomputes from the current values, so racing
 * pushes settle on the last values written.
 * --------------------------------------------------------------------- */

static pthread_mutex_t dl_mu = PTHREAD_MUTEX_INITIALIZER;
static cancel_source *dl_work; /* dl_mu */
static pthread_once_t dl_once = PTHREAD_ONCE_INIT;

static void dl_prepare(void) {
  pthread_mutex_lock(&dl_mu);
}
static void dl_release(void) {
  pthread_mutex_unlock(&dl_mu);
}
static void dl_setup(void) {
  /* A fork while another thread pushes must not leave the mutex held in
   * the child. */
  pthread_atfork(dl_prepare, dl_release, dl_release);
}

bool cancel__deadline_update_locked(cancel_source *src) {
  int64_t d = cancel__own_deadline(src);
  for (uint32_t i = 0; i < src->nlinks; i++) {
    int64_t e = ld_relaxed(&src->links[i].eff);
    if (e < d)
      d = e;
  }
  if (d == src->eff_deadline)
    return false;
  st_relaxed(&src->eff_deadline, d);
  return src->children != NULL;
}

/* Puts src (locked, with children) on the work list. */
static void queue_locked(cancel_source *src) {
  if (src->flags & SF_DL_QUEUED)
    return; /* it will be looked at with its latest value */
  src->flags |= SF_DL_QUEUED;
  src->dl_next = dl_work;
  dl_work = src;
}

static bool is_shield_link(const struct cancel__link *l) {
  const cancel_source *c = l->child;
  return c->shield != NULL && &c->shield->link == l;
}

/* Drains the work list (dl_mu held): each source passes its value down to
 * its children and queues those whose value changed and that have
 * children of their own.  A source off the list is never touched again by
 * this push: its teardown waits only while it is queued. */
static void run_work(void) {
  cancel_source *src;
  while ((src = dl_work) != NULL) {
    uint32_t v = cancel__lock(src);
    dl_work = src->dl_next;
    src->flags &= ~SF_DL_QUEUED;
    int64_t d = src->eff_deadline;
    for (struct cancel__link *l = src->children; l != NULL; l = l->cnext) {
      if (is_shield_link(l))
        continue; /* a shield's deadline is its own */
      cancel_source *child = l->child;
      uint32_t cv = cancel__lock(child); /* parent, then child */
      st_relaxed(&l->eff, d);
      if (cancel__deadline_update_locked(child))
        queue_locked(child);
      cancel__unlock(child, cv);
    }
    cancel__unlock(src, v);
  }
}

void cancel__deadline_lock(void) {
  pthread_once(&dl_once, dl_setup);
  pthread_mutex_lock(&dl_mu);
}

void cancel__deadline_unlock(void) {
  run_work();
  pthread_mutex_unlock(&dl_mu);
}

void cancel__deadline_wait(void) {
  pthread_mutex_lock(&dl_mu); /* the push that queued it has finished */
  pthread_mutex_unlock(&dl_mu);
}

void cancel__deadline_push(cancel_source *src) {
  cancel__deadline_lock();
  uint32_t v = cancel__lock(src);
  if (src->children != NULL)
    queue_locked(src);
  cancel__unlock(src, v);
  cancel__deadline_unlock();
}

void cancel__deadline_unlink_locked(struct cancel__link *l) {
  if (is_shield_link(l))
    return;
  st_relaxed(&l->eff, CANCEL_NEVER);
  if (cancel__deadline_update_locked(l->child))
    queue_locked(l->child);
}

int64_t cancel_token_deadline(const cancel_token *tok) {
  if (tok == NULL)
    return CANCEL_NEVER;
  return ld_relaxed(&((const cancel_source *)tok)->eff_deadline);
}

int64_t cancel_token_remaining(const cancel_token *tok) {
  return cancel__time_left(cancel_token_deadline(tok), cancel_now());
}

static int arm_timeout(cancel_source *src, int64_t timeout_ns) {
  int rc = cancel_source_cancel_after(src, timeout_ns);
  return rc == 1 ? 0 : rc; /* already cancelled by its parent: fine */
}

int cancel_source_new_timeout(cancel_source **srcp, const char *name,
                              const cancel_token *parent, int64_t timeout_ns) {
  if (srcp == NULL)
    return -EINVAL;
  *srcp = NULL;
  if (timeout_ns < 0)
    return -EINVAL;
  cancel_source *src;
  int rc = cancel_source_new_linked(&src, name, &parent, parent ? 1 : 0);
  if (rc < 0)
    return rc;
  if ((rc = arm_timeout(src, timeout_ns)) < 0) {
    cancel_source_unref(src);
    return rc;
  }
  *srcp = src;
  return 0;
}

int cancel_source_init_timeout(cancel_source *src, const char *name,
                               const cancel_token *parent, int64_t timeout_ns) {
  if (src == NULL || timeout_ns < 0)
    return -EINVAL;
  int rc = cancel_source_init_linked(src, name, &parent, parent ? 1 : 0);
  if (rc < 0)
    return rc;
  if ((rc = arm_timeout(src, timeout_ns)) < 0) {
    cancel_source_destroy(src);
    return rc;
  }
  return 0;
}
