/*
 * The watchdog: a thread that reports scopes still open a threshold after
 * their token fired, with the thread's stack.  See cancel/diag.h for why
 * a signal and backtrace(3), and why a thread of its own.
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/diag.h"
#include "cancel/log.h"

#include <errno.h>
#include <linux/futex.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

/* The stack of a thread, from its signal handler: backtrace(3), which
 * glibc has.  musl has none: the report then says "stack unavailable"
 * where the frames would be (cancel.h: Platform). */
#ifdef CANCEL_HAVE_BACKTRACE
#include <execinfo.h>
static int frames_of(void **frames, int max) {
  return backtrace(frames, max);
}
static char **symbols_of(void *const *frames, int n) {
  return backtrace_symbols(frames, n);
}
#else
static int frames_of(void **frames, int max) {
  (void)frames;
  (void)max;
  return 0;
}
static char **symbols_of(void *const *frames, int n) {
  (void)frames;
  (void)n;
  return NULL;
}
#endif

#define MAX_FRAMES 64
#define MAX_REPORTS 16 /* per look; the rest wait for the next */

static pthread_mutex_t wd_mu = PTHREAD_MUTEX_INITIALIZER;
static bool running;
static pthread_t thread;
static cancel_source stop;
static cancel_watchdog_options opt;
static struct sigaction old_action; /* restored only if start fails */
static int64_t threshold;           /* atomic: read by the metrics */

/* The stack being captured: one at a time, by the watchdog's thread. */
static struct {
  int tid;       /* atomic: the thread asked; the handler claims it (-> 0) */
  uint32_t done; /* atomic; a futex word */
  int n;
  void *frames[MAX_FRAMES];
} cap;

static void on_stack_signal(int sig, siginfo_t *si, void *uc) {
  (void)sig;
  (void)si;
  (void)uc;
  int saved = errno;
  int me = (int)syscall(SYS_gettid);
  int want = me;
  /* Claim the capture only if it is for this thread and still wanted. */
  if (__atomic_compare_exchange_n(&cap.tid, &want, 0, false, __ATOMIC_ACQ_REL,
                                  __ATOMIC_ACQUIRE)) {
    int max = opt.max_frames < MAX_FRAMES ? opt.max_frames : MAX_FRAMES;
    cap.n = frames_of(cap.frames, max);
    __atomic_store_n(&cap.done, 1, __ATOMIC_RELEASE);
    cancel__futex_wake_all(&cap.done); /* a syscall: safe here */
  }
  errno = saved;
}

/* Asks thread tid for its stack; returns the number of frames, or -1 when
 * it did not answer within 100 ms (it blocks the signal, or it ended). */
static int capture(int tid) {
  __atomic_store_n(&cap.done, 0, __ATOMIC_RELAXED);
  cap.n = 0;
  __atomic_store_n(&cap.tid, tid, __ATOMIC_RELEASE);
  if (syscall(SYS_tgkill, getpid(), tid, opt.stack_signal) != 0) {
    __atomic_store_n(&cap.tid, 0, __ATOMIC_RELAXED);
    return -1;
  }
  int64_t end = cancel_now() + CANCEL_MSEC(100);
  for (;;) {
    if (__atomic_load_n(&cap.done, __ATOMIC_ACQUIRE))
      return cap.n;
    if (cancel_now() > end) {
      int want = tid;
      if (__atomic_compare_exchange_n(&cap.tid, &want, 0, false,
                                      __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE))
        return -1;             /* withdrawn before the handler took it */
      end += CANCEL_MSEC(100); /* taken: it is writing, wait for it */
    }
    /* Woken by the handler's store, else at the deadline. */
    struct timespec ts = cancel__abs_timespec(end);
    syscall(SYS_futex, &cap.done, FUTEX_WAIT_BITSET | FUTEX_PRIVATE_FLAG, 0,
            &ts, NULL, FUTEX_BITSET_MATCH_ANY);
  }
}

static void thread_name(int tid, char *buf, size_t len) {
  char path[64];
  snprintf(path, sizeof path, "/proc/self/task/%d/comm", tid);
  FILE *f = fopen(path, "r");
  buf[0] = '\0';
  if (f == NULL)
    return;
  if (fgets(buf, (int)len, f) != NULL)
    buf[strcspn(buf, "\n")] = '\0';
  fclose(f);
}

/* What is logged about one scope, copied while the scan pins it. */
struct report {
  int tid;
  /* The names as they are (the log quotes them), cut to what a line says
   * of them: a longer scope name than 255 bytes is still longer than the
   * 160 the line keeps, so its cut is marked there. */
  char scope[256];
  char outer[300];
  char inner[300];
  char reason[640]; /* cancel_logfmt_reason's fields */
  int64_t since_ns;
};

/* What a line keeps of each name, quotes included. */
#define SCOPE_MAX 160
#define CHAIN_MAX 320

static void log_report(const struct report *r) {
  char tname[32];
  thread_name(r->tid, tname, sizeof tname);
  CANCEL_LOG(CANCEL_LOG_WARN, "watchdog", "scope still running after cancel",
             CANCEL_LOG_STRN("scope", r->scope, SCOPE_MAX),
             CANCEL_LOG_STRN("outer", r->outer, CHAIN_MAX),
             CANCEL_LOG_STRN("inner", r->inner, CHAIN_MAX),
             CANCEL_LOG_I64("thread", r->tid),
             CANCEL_LOG_STRN("thread_name", tname, 48),
             CANCEL_LOG_MSD("since_cancel_ms", r->since_ns, 1),
             CANCEL_LOG_LOGFMT(r->reason));
  cancel__metrics_reported();
  if (opt.stack_signal < 0)
    return;
  int n = capture(r->tid);
  if (n <= 0) {
    CANCEL_LOG(CANCEL_LOG_WARN, "watchdog", "stack unavailable",
               CANCEL_LOG_STRN("scope", r->scope, SCOPE_MAX),
               CANCEL_LOG_I64("thread", r->tid));
    return;
  }
  /* Frames 0 and 1 are the handler and the signal trampoline. */
  int skip = n > 2 ? 2 : 0;
  char **sym = symbols_of(cap.frames + skip, n - skip);
  for (int i = 0; i < n - skip; i++) {
    char raw[32];
    snprintf(raw, sizeof raw, "%p", cap.frames[skip + i]);
    CANCEL_LOG(CANCEL_LOG_WARN, "watchdog", "stack",
               CANCEL_LOG_STRN("scope", r->scope, SCOPE_MAX),
               CANCEL_LOG_I64("thread", r->tid), CANCEL_LOG_I64("frame", i),
               CANCEL_LOG_STRN("at", sym != NULL ? sym[i] : raw, 320));
  }
  free(sym);
}

/* Names chain[from..to) joined by sep, each scope whose token is not the
 * cancelled one marked: "[no token]" or "[token not cancelled]" is what a
 * dropped token looks like from inside.  The text is the names' own bytes,
 * cut to len: the log line quotes it. */
static void name_chain(char *buf, size_t len, cancel_scope **chain, int from,
                       int to, int step, const char *sep) {
  size_t bl = 0;
  buf[0] = '\0';
  for (int i = from; i != to && bl < len; i += step) {
    const cancel_scope *u = chain[i];
    const char *mark = u->tok == NULL ? "[no token]"
                       : cancel__scope_fired_at(u) == 0
                           ? "[token not cancelled]"
                           : "";
    int k =
        snprintf(buf + bl, len - bl, "%s%s%s", bl ? sep : "", u->name, mark);
    if (k < 0)
      break;
    bl += (size_t)k;
  }
}

struct look {
  int64_t now;
  int n;
  struct report reps[MAX_REPORTS];
};

/* Under the scan: picks the scopes to report and copies what is said of
 * them (the scopes and their tokens are pinned only until we return). */
static void look_thread(void *ctx, int tid, cancel_scope **chain, int n) {
  struct look *lk = ctx;
  for (int i = n - 1; i >= 0 && lk->n < MAX_REPORTS; i--) {
    cancel_scope *s = chain[i];
    int64_t at = cancel__scope_fired_at(s);
    if (at == 0 || ld_relaxed(&s->reported) || lk->now - at < opt.threshold_ns)
      continue;
    st_relaxed(&s->reported, 1);
    struct report *r = &lk->reps[lk->n++];
    r->tid = tid;
    r->since_ns = lk->now - at;
    snprintf(r->scope, sizeof r->scope, "%s", s->name);
    name_chain(r->outer, sizeof r->outer, chain, i + 1, n, 1, "<");
    name_chain(r->inner, sizeof r->inner, chain, i - 1, -1, -1, ">");
    cancel_reason why;
    r->reason[0] = '\0';
    if (cancel_token_reason(s->tok, &why) == 1)
      cancel_logfmt_reason(r->reason, sizeof r->reason, &why);
  }
}

/* One look at every thread's scopes. */
static void look(void) {
  static struct look lk; /* the watchdog's thread only */
  lk.now = cancel_now();
  lk.n = 0;
  cancel__scopes_scan(look_thread, &lk);
  for (int i = 0; i < lk.n; i++)
    log_report(&lk.reps[i]);
}

static void *watchdog_main(void *arg) {
  (void)arg;
  /* Other signals are not ours to take (SIGINT/SIGTERM go to the host). */
  sigset_t all;
  sigfillset(&all);
  pthread_sigmask(SIG_BLOCK, &all, NULL);
  pthread_setname_np(pthread_self(), "cancel-watchdog");
  while (cancel_sleep(cancel_source_token(&stop), opt.interval_ns) == 0)
    look();
  return NULL;
}

int64_t cancel__watchdog_threshold(void) {
  return __atomic_load_n(&threshold, __ATOMIC_RELAXED);
}

int cancel_watchdog_start(const cancel_watchdog_options *o) {
  static const cancel_watchdog_options defaults;
  if (o == NULL)
    o = &defaults;
  if (o->threshold_ns < 0 || o->interval_ns < 0 || o->max_frames < 0)
    return -EINVAL;
  pthread_mutex_lock(&wd_mu);
  if (running) {
    pthread_mutex_unlock(&wd_mu);
    return -EBUSY;
  }
  opt = *o;
  if (opt.threshold_ns == 0)
    opt.threshold_ns = CANCEL_MSEC(100);
  if (opt.interval_ns == 0)
    opt.interval_ns = opt.threshold_ns / 4;
  if (opt.interval_ns < CANCEL_MSEC(1))
    opt.interval_ns = CANCEL_MSEC(1);
  if (opt.max_frames == 0 || opt.max_frames > MAX_FRAMES)
    opt.max_frames = MAX_FRAMES;
  if (opt.stack_signal == 0)
    opt.stack_signal = SIGRTMIN + 4;
  if (opt.stack_signal > 0) {
    if (opt.stack_signal >= NSIG) {
      pthread_mutex_unlock(&wd_mu);
      return -EINVAL;
    }
    struct sigaction cur;
    sigaction(opt.stack_signal, NULL, &cur);
    bool ours =
        (cur.sa_flags & SA_SIGINFO) && cur.sa_sigaction == on_stack_signal;
    if (!ours && ((cur.sa_flags & SA_SIGINFO) || cur.sa_handler != SIG_DFL)) {
      pthread_mutex_unlock(&wd_mu);
      return -EINVAL; /* the program uses this signal */
    }
    /* The first backtrace() loads libgcc's unwinder (it allocates): do it
     * here, not in a signal handler. */
    void *warm[2];
    (void)frames_of(warm, 2);
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_stack_signal;
    sa.sa_flags = SA_SIGINFO | SA_RESTART;
    sigemptyset(&sa.sa_mask);
    sigaction(opt.stack_signal, &sa, &old_action);
  }
  int rc = cancel_source_init(&stop, "watchdog stop");
  if (rc == 0 && pthread_create(&thread, NULL, watchdog_main, NULL) != 0) {
    cancel_source_destroy(&stop);
    rc = -EAGAIN;
  }
  if (rc < 0) {
    if (opt.stack_signal > 0)
      sigaction(opt.stack_signal, &old_action, NULL);
    pthread_mutex_unlock(&wd_mu);
    return rc;
  }
  __atomic_store_n(&threshold, opt.threshold_ns, __ATOMIC_RELAXED);
  running = true;
  pthread_mutex_unlock(&wd_mu);
  return 0;
}

int cancel_watchdog_stop(void) {
  pthread_mutex_lock(&wd_mu);
  if (!running) {
    pthread_mutex_unlock(&wd_mu);
    return -EINVAL;
  }
  cancel_source_cancel(&stop);
  pthread_join(thread, NULL);
  cancel_source_destroy(&stop);
  /* The handler stays: a signal sent for a capture that timed out may
   * still be pending on a thread that blocks it, and the signal's default
   * action would end the process when that thread unblocks it. */
  __atomic_store_n(&threshold, 0, __ATOMIC_RELAXED);
  running = false;
  pthread_mutex_unlock(&wd_mu);
  return 0;
}
