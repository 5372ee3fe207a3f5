/*
 * Linked sources: a child of N parents, cancelled when any parent is, with
 * the parent's reason and itself appended to the via path.  Each edge is a
 * cancel__link: a registration on the parent plus a place in the parent's
 * children list (which keeps a heap parent alive while it has children).
 */
#include "internal.h"

#include <stdlib.h>

void cancel__link_attach(struct cancel__link *link, cancel_source *parent,
                         cancel_fn *fn) {
  link->reg.fn = fn;
  link->reg.arg = link;
  link->reg.src = parent;
  link->parent = parent;
  uint32_t v = cancel__lock(parent);
  parent->seen |= SEEN_CHILD;
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
  src->nlinks = (uint32_t)n;
  for (size_t i = 0; i < n; i++) {
    struct cancel__link *link = &src->links[i];
    link->child = src;
    link->reg.state = REG_IDLE;
    link->parent = NULL;
    if (parents[i] != NULL)
      cancel__link_attach(link, (cancel_source *)parents[i],
                          cancel__link_fired);
  }
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

int64_t cancel_token_deadline(const cancel_token *tok) {
  if (tok == NULL)
    return CANCEL_NEVER;
  const cancel_source *src = (const cancel_source *)tok;
  int64_t d = cancel__own_deadline(src);
  for (uint32_t i = 0; i < src->nlinks; i++) {
    const cancel_source *parent = ld_acquire(&src->links[i].parent);
    if (parent != NULL) {
      int64_t pd = cancel_token_deadline(&parent->tok);
      if (pd < d)
        d = pd;
    }
  }
  return d;
}

int64_t cancel_token_remaining(const cancel_token *tok) {
  int64_t d = cancel_token_deadline(tok);
  if (d == CANCEL_NEVER)
    return CANCEL_NEVER;
  int64_t left = d - cancel_now();
  return left > 0 ? left : 0;
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
