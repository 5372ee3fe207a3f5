/*
 * Work scopes: a registration on the token that, when the token fires
 * while the scope is open, puts the scope on the process's overdue list
 * (the watchdog's input); the scope's end takes it off and records the
 * overrun.  See cancel/diag.h.
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/diag.h"
#include "cancel/log.h"

#include <pthread.h>
#include <stdio.h>
#include <sys/syscall.h>
#include <unistd.h>

static pthread_mutex_t overdue_mu = PTHREAD_MUTEX_INITIALIZER;
static cancel_scope *overdue; /* newest first; overdue_mu */

static __thread cancel_scope *top; /* the thread's innermost open scope */
static int scopes_on = 1;          /* atomic */

void cancel_scopes_enable(int on) {
  st_relaxed(&scopes_on, on ? 1 : 0);
}
static __thread int my_tid;

static int thread_id(void) {
  if (my_tid == 0)
    my_tid = (int)syscall(SYS_gettid);
  return my_tid;
}

/* The token fired while the scope was open: runs on the cancelling thread
 * (or inline in begin).  Only links the scope: callbacks only wake. */
static void on_cancel(void *arg) {
  cancel_scope *s = arg;
  int64_t t = ld_relaxed(&((const cancel_source *)s->tok)->time);
  pthread_mutex_lock(&overdue_mu);
  s->cancelled_at = t > 0 ? t : cancel_now();
  s->prev = NULL;
  s->next = overdue;
  if (overdue != NULL)
    overdue->prev = s;
  overdue = s;
  pthread_mutex_unlock(&overdue_mu);
}

void cancel_scope_begin(cancel_scope *s, const cancel_token *tok,
                        const char *name) {
  if (s == NULL)
    return;
  if (!ld_relaxed(&scopes_on))
    tok = NULL; /* named, never observed: nothing registered */
  s->tok = tok;
  s->name = name != NULL ? name : "";
  s->up = top;
  s->next = s->prev = NULL;
  s->cancelled_at = 0;
  s->reported = 0;
  s->begun = 0;
  s->tid = thread_id();
  top = s;
  (void)cancel_register(&s->reg, tok, on_cancel, s);
}

int64_t cancel_scope_end(cancel_scope *s) {
  if (s == NULL)
    return 0;
  /* Scopes end innermost first: a scope ended out of order would leave the
   * thread's chain pointing at a dead frame. */
  if (top != s)
    cancel__misuse(__func__, "scopes must end in the reverse order they "
                             "began, on the thread that began them");
  top = s->up;
  if (cancel_unregister(&s->reg) != 0)
    return 0; /* removed before it ran, or a NULL token: no overrun */
  pthread_mutex_lock(&overdue_mu);
  if (s->prev != NULL)
    s->prev->next = s->next;
  else
    overdue = s->next;
  if (s->next != NULL)
    s->next->prev = s->prev;
  int64_t over = cancel_now() - s->cancelled_at;
  bool reported = s->reported != 0;
  pthread_mutex_unlock(&overdue_mu);
  if (over < 0)
    over = 0;
  cancel__metrics_overrun(over);
  if (reported) {
    char n[160];
    cancel_logfmt_quote(n, sizeof n, s->name);
    cancel_log(CANCEL_LOG_WARN, "watchdog", "scope ended after cancel",
               "scope=%s thread=%d overrun_ms=%.1f", n, s->tid,
               (double)over / 1e6);
  }
  return over;
}

const cancel_scope *cancel_scope_current(void) {
  return top;
}

void cancel__scope_cleanup(cancel_scope *s) {
  (void)cancel_scope_end(s);
}

/* ---- For the watchdog and the metrics --------------------------------- */

void cancel__overdue_lock(void) {
  pthread_mutex_lock(&overdue_mu);
}

void cancel__overdue_unlock(void) {
  pthread_mutex_unlock(&overdue_mu);
}

cancel_scope *cancel__overdue_first(void) {
  return overdue;
}

uint64_t cancel__overdue_count(int64_t older_than_ns) {
  int64_t now = cancel_now();
  uint64_t n = 0;
  pthread_mutex_lock(&overdue_mu);
  for (cancel_scope *s = overdue; s != NULL; s = s->next)
    if (now - s->cancelled_at >= older_than_ns)
      n++;
  pthread_mutex_unlock(&overdue_mu);
  return n;
}
