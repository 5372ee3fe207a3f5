/*
 * Shields: the deliberate point of no return.  A shield hangs on its outer
 * token like a linked child (so a heap outer stays alive), but when outer
 * fires it does not follow: with a grace period it arms its own timer for
 * the grace, and only when that expires is it cancelled, with outer's
 * reason and a note on its own hop.
 */
#include "internal.h"

#include <stdio.h>
#include <stdlib.h>

static size_t open_shields; /* atomic */

size_t cancel_shields_open(void) {
  return ld_acquire(&open_shields);
}

/* Sets when the grace ends (src's own deadline, as far as its token and
 * its children can see) and passes it down. */
static void set_grace_at(cancel_source *src, int64_t at) {
  uint32_t v = cancel__lock(src);
  st_relaxed(&src->shield->grace_at, at);
  bool push = cancel__deadline_update_locked(src);
  cancel__unlock(src, v);
  if (push)
    cancel__deadline_push(src);
}

/* Cancels the shield with outer's reason, its own hop noted "grace <d>
 * <how>".  Returns 0 when outer is gone (nothing to follow). */
static int end_grace(cancel_source *src, const char *how) {
  struct cancel__shield *sh = src->shield;
  cancel_source *outer = ld_relaxed(&sh->link.parent);
  if (outer == NULL)
    return 0;
  if (!cancel_token_is_cancelled(&src->tok)) {
    char d[24];
    cancel__format_duration(d, sizeof d, sh->grace);
    snprintf(sh->note, sizeof sh->note, "grace %s %s", d, how);
  }
  cancel__fire(src, outer->kind, NULL, outer, outer->time, 0);
  return 1;
}

void cancel__shield_outer_fired(void *arg) {
  struct cancel__link *link = arg;
  cancel_source *src = link->child;
  struct cancel__shield *sh = src->shield;
  if (sh->grace == 0)
    return; /* finish no matter what */
  int64_t now = cancel_now();
  /* A grace too long to end before the end of time never ends. */
  set_grace_at(src, cancel__deadline_after(now, sh->grace));
  /* Callbacks must not fail: if the timer cannot be armed (no memory, no
   * descriptor or thread for the reactor, the process exiting), the grace
   * ends now rather than never, and the deadline says so. */
  if (cancel__timer_update(src) < 0) {
    set_grace_at(src, now);
    end_grace(src, "cut short (no timer)");
  }
}

int cancel__shield_timer_fired(cancel_source *src, int64_t now) {
  struct cancel__shield *sh = src->shield;
  if (sh == NULL)
    return 0;
  int64_t grace_at = ld_relaxed(&sh->grace_at);
  if (grace_at > now || ld_relaxed(&src->deadline) <= grace_at)
    return 0; /* not due, or its own timeout came first */
  end_grace(src, "expired");
  return 1;
}

cancel_source *cancel__shield_teardown(cancel_source *src) {
  __atomic_sub_fetch(&open_shields, 1, __ATOMIC_RELEASE);
  return cancel__link_detach(&src->shield->link);
}

static void setup_shield(cancel_source *src, struct cancel__shield *sh,
                         const cancel_token *outer, int64_t grace_ns) {
  sh->grace = grace_ns;
  sh->grace_at = CANCEL_NEVER;
  sh->note[0] = '\0';
  sh->link.child = src;
  sh->link.parent = NULL;
  sh->link.reg.state = REG_IDLE;
  src->shield = sh;
  src->heap_idx = -1; /* its grace timer may be armed by outer's canceller */
  __atomic_add_fetch(&open_shields, 1, __ATOMIC_RELAXED);
  if (outer != NULL)
    cancel__link_attach(&sh->link, (cancel_source *)outer,
                        cancel__shield_outer_fired);
}

int cancel_source_new_shield(cancel_source **srcp, const char *name,
                             const cancel_token *outer, int64_t grace_ns) {
  if (srcp == NULL)
    return -EINVAL;
  *srcp = NULL;
  if (grace_ns < 0)
    return -EINVAL;
  cancel_source *src = malloc(sizeof *src + sizeof(struct cancel__shield));
  if (src == NULL)
    return -ENOMEM;
  int rc = cancel__source_setup(src, name, SF_HEAP);
  if (rc < 0) {
    free(src);
    return rc;
  }
  setup_shield(src, (struct cancel__shield *)(src + 1), outer, grace_ns);
  *srcp = src;
  return 0;
}

int cancel_source_init_shield(cancel_source *src, const char *name,
                              const cancel_token *outer, int64_t grace_ns) {
  if (src == NULL || grace_ns < 0)
    return -EINVAL;
  struct cancel__shield *sh = malloc(sizeof *sh);
  if (sh == NULL)
    return -ENOMEM;
  int rc = cancel__source_setup(src, name, SF_SHIELD_OWNED);
  if (rc < 0) {
    free(sh);
    return rc;
  }
  setup_shield(src, sh, outer, grace_ns);
  return 0;
}
