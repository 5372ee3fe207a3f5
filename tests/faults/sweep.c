/*
 * Fault injection: every allocation and every system call of the core that
 * can fail, failed one at a time.
 *
 * The program is linked with the core's static library and
 * -Wl,--wrap=<function> for each function below (tests/faults/faults.cmake),
 * so the library's calls to malloc, eventfd, pthread_create... reach
 * __wrap_<function> here.  A wrapper counts the calls and makes the N-th
 * one fail with the errno a real failure gives (malloc: ENOMEM; a
 * descriptor: EMFILE; a thread: EAGAIN...).  Every scenario runs in a
 * child process, once without a fault to count its calls K, then once for
 * each N = 1..K (or a sample of them), and each run must end in one of:
 *   - the scenario's calls returned documented values only (the error the
 *     failed call caused, surfaced as a negative errno its header lists,
 *     or success when the library recovered), every callback that was
 *     registered ran exactly once, every wait that had to end ended;
 * and never in a crash (a signal), a hang (10 s), a leak (LeakSanitizer's
 * exit at the end of the child, under ASan) or a broken contract (the
 * scenario says which).
 *
 *   fault_sweep [--sample N] [--list] [scenario...]
 *
 * prints one line per scenario (fault points, outcomes) and the totals as
 * "N passed, M failed" (one run is one case); exits 1 on any failure.
 */
#define _GNU_SOURCE
#include "cancel.h"
#include "cancel/diag.h"
#include "cancel/log.h"
#include "cancel/process.h"
#include "cancel/watch.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <spawn.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/signalfd.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ---- The wrappers ------------------------------------------------------ */

static atomic_long calls;   /* faultable calls so far (while armed) */
static long fail_at;        /* the call to fail, 0 for none */
static atomic_int armed;    /* only the scenario's calls count */
static char failed_name[32]; /* which function was failed */
static __thread int own;    /* the harness's own calls: never failed */

/* Whether this call of `name` is the one to fail. */
static int inject(const char *name) {
  if (own || !atomic_load(&armed))
    return 0;
  long n = atomic_fetch_add(&calls, 1) + 1;
  if (n != fail_at)
    return 0;
  snprintf(failed_name, sizeof failed_name, "%s", name);
  return 1;
}

#define DECLARE_REAL(ret, name, params) ret __real_##name params;

DECLARE_REAL(void *, malloc, (size_t))
DECLARE_REAL(void *, calloc, (size_t, size_t))
DECLARE_REAL(void *, realloc, (void *, size_t))
DECLARE_REAL(char *, strdup, (const char *))
DECLARE_REAL(int, eventfd, (unsigned, int))
DECLARE_REAL(int, epoll_create1, (int))
DECLARE_REAL(int, epoll_ctl, (int, int, int, struct epoll_event *))
DECLARE_REAL(int, timerfd_create, (int, int))
DECLARE_REAL(int, timerfd_settime,
             (int, int, const struct itimerspec *, struct itimerspec *))
DECLARE_REAL(int, signalfd, (int, const sigset_t *, int))
DECLARE_REAL(int, pthread_create,
             (pthread_t *, const pthread_attr_t *, void *(*)(void *), void *))
DECLARE_REAL(int, pthread_key_create, (pthread_key_t *, void (*)(void *)))
DECLARE_REAL(int, fcntl, (int, int, ...))
DECLARE_REAL(int, posix_spawn,
             (pid_t *, const char *, const posix_spawn_file_actions_t *,
              const posix_spawnattr_t *, char *const[], char *const[]))
DECLARE_REAL(int, posix_spawnp,
             (pid_t *, const char *, const posix_spawn_file_actions_t *,
              const posix_spawnattr_t *, char *const[], char *const[]))

void *__wrap_malloc(size_t n) {
  if (inject("malloc")) {
    errno = ENOMEM;
    return NULL;
  }
  return __real_malloc(n);
}
void *__wrap_calloc(size_t a, size_t b) {
  if (inject("calloc")) {
    errno = ENOMEM;
    return NULL;
  }
  return __real_calloc(a, b);
}
void *__wrap_realloc(void *p, size_t n) {
  if (inject("realloc")) {
    errno = ENOMEM;
    return NULL;
  }
  return __real_realloc(p, n);
}
char *__wrap_strdup(const char *s) {
  if (inject("strdup")) {
    errno = ENOMEM;
    return NULL;
  }
  return __real_strdup(s);
}

#define FD_WRAPPER(name, params, args)                                        \
  int __wrap_##name params {                                                  \
    if (inject(#name)) {                                                      \
      errno = EMFILE;                                                         \
      return -1;                                                              \
    }                                                                         \
    return __real_##name args;                                                \
  }
FD_WRAPPER(eventfd, (unsigned v, int f), (v, f))
FD_WRAPPER(epoll_create1, (int f), (f))
FD_WRAPPER(timerfd_create, (int c, int f), (c, f))
FD_WRAPPER(signalfd, (int fd, const sigset_t *m, int f), (fd, m, f))

int __wrap_epoll_ctl(int ep, int op, int fd, struct epoll_event *ev) {
  /* Removing never fails for want of memory. */
  if (op != EPOLL_CTL_DEL && inject("epoll_ctl")) {
    errno = ENOMEM;
    return -1;
  }
  return __real_epoll_ctl(ep, op, fd, ev);
}

int __wrap_timerfd_settime(int fd, int flags, const struct itimerspec *n,
                           struct itimerspec *o) {
  if (inject("timerfd_settime")) {
    errno = ENOMEM;
    return -1;
  }
  return __real_timerfd_settime(fd, flags, n, o);
}

int __wrap_pthread_create(pthread_t *t, const pthread_attr_t *a,
                          void *(*fn)(void *), void *arg) {
  if (inject("pthread_create"))
    return EAGAIN;
  return __real_pthread_create(t, a, fn, arg);
}

int __wrap_pthread_key_create(pthread_key_t *k, void (*d)(void *)) {
  if (inject("pthread_key_create"))
    return EAGAIN;
  return __real_pthread_key_create(k, d);
}

int __wrap_fcntl(int fd, int cmd, ...) {
  va_list ap;
  va_start(ap, cmd);
  long arg = va_arg(ap, long);
  va_end(ap);
  /* Only the commands that make a descriptor can fail for want of one. */
  if ((cmd == F_DUPFD || cmd == F_DUPFD_CLOEXEC) && inject("fcntl(F_DUPFD)")) {
    errno = EMFILE;
    return -1;
  }
  return __real_fcntl(fd, cmd, arg);
}

int __wrap_posix_spawn(pid_t *pid, const char *path,
                       const posix_spawn_file_actions_t *fa,
                       const posix_spawnattr_t *at, char *const argv[],
                       char *const envp[]) {
  if (inject("posix_spawn"))
    return EAGAIN;
  return __real_posix_spawn(pid, path, fa, at, argv, envp);
}
int __wrap_posix_spawnp(pid_t *pid, const char *path,
                        const posix_spawn_file_actions_t *fa,
                        const posix_spawnattr_t *at, char *const argv[],
                        char *const envp[]) {
  if (inject("posix_spawnp"))
    return EAGAIN;
  return __real_posix_spawnp(pid, path, fa, at, argv, envp);
}

/* ---- Checking ------------------------------------------------------------ */

/* What a child reports through its pipe: "ok" or what broke. */
static int report_fd = -1;
static char verdict[512];

static void violation(const char *fmt, ...) {
  if (verdict[0] != '\0')
    return; /* the first one is what counts */
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(verdict, sizeof verdict, fmt, ap);
  va_end(ap);
}

/* rc must be one of the values after it. */
#define EXPECT(rc, ...)                                                       \
  expect_in(#rc, __LINE__, (long)(rc), (const long[]){__VA_ARGS__},          \
            sizeof((const long[]){__VA_ARGS__}) / sizeof(long))
static long expect_in(const char *what, int line, long rc, const long *ok,
                      size_t n) {
  for (size_t i = 0; i < n; i++)
    if (ok[i] == rc)
      return rc;
  violation("line %d: %s returned %ld (%s), not a documented value", line,
            what, rc, rc < 0 ? strerror((int)-rc) : "positive");
  return rc;
}

static int64_t ms_since(int64_t t0) {
  return (cancel_now() - t0) / 1000000;
}

static atomic_int fired;
static void count_cb(void *arg) {
  (void)arg;
  atomic_fetch_add(&fired, 1);
}

/* ---- Scenarios ------------------------------------------------------------ */

/* Sources, links, registrations, a cancel with a long detail (copied with
 * an allocation that may fail: the cancel must still happen). */
static void sc_sources(void) {
  cancel_source *root = NULL, *kid = NULL, *big = NULL;
  cancel_source stack;
  char longname[200];
  memset(longname, 'n', sizeof longname - 1);
  longname[sizeof longname - 1] = '\0';
  if (EXPECT(cancel_source_new(&root, "root"), 0, -ENOMEM) < 0)
    return;
  const cancel_token *parents[2] = {cancel_source_token(root), NULL};
  long rk = EXPECT(cancel_source_new_linked(&kid, longname, parents, 2), 0,
                   -ENOMEM);
  long rs = EXPECT(cancel_source_init_linked(&stack, "stack", parents, 1), 0,
                   -ENOMEM);
  long rb = EXPECT(cancel_source_new(&big, longname), 0, -ENOMEM);
  cancel_reg r1, r2;
  int want = 0;
  if (rk == 0 && EXPECT(cancel_register(&r1, cancel_source_token(kid),
                                        count_cb, NULL), 0) == 0)
    want++;
  if (rs == 0 && EXPECT(cancel_register(&r2, cancel_source_token(&stack),
                                        count_cb, NULL), 0) == 0)
    want++;
  char detail[300];
  memset(detail, 'd', sizeof detail - 1);
  detail[sizeof detail - 1] = '\0';
  EXPECT(cancel_source_cancel_with(root, CANCEL_USER, detail), 1);
  if (atomic_load(&fired) != want)
    violation("%d callbacks ran, %d were registered", atomic_load(&fired),
              want);
  if (rk == 0 && !cancel_token_is_cancelled(cancel_source_token(kid)))
    violation("a linked child was not cancelled");
  if (rk == 0)
    EXPECT(cancel_unregister(&r1), 0);
  if (rs == 0) {
    EXPECT(cancel_unregister(&r2), 0);
    cancel_source_destroy(&stack);
  }
  if (rb == 0)
    cancel_source_unref(big);
  cancel_source_unref(kid);
  cancel_source_unref(root);
}

/* A timeout must fire, or its creation must fail with a documented error
 * and leave no deadline behind; a later timeout fires whatever an earlier
 * failure did to the timer thread. */
static void sc_timeouts(void) {
  for (int round = 0; round < 3; round++) {
    cancel_source *t = NULL;
    long rc = EXPECT(cancel_source_new_timeout(&t, "t", NULL, CANCEL_MSEC(2)),
                     0, -ENOMEM, -EAGAIN, -EMFILE, -ENFILE);
    if (rc < 0)
      continue;
    int64_t t0 = cancel_now();
    rc = EXPECT(cancel_sleep(cancel_source_token(t), CANCEL_SEC(3)),
                -ECANCELED, 0);
    if (rc == 0)
      violation("round %d: a 2 ms timeout did not fire within 3 s", round);
    else if (ms_since(t0) > 1000)
      violation("round %d: a 2 ms timeout fired after %lld ms", round,
                (long long)ms_since(t0));
    cancel_source_unref(t);
  }
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "s"), 0, -ENOMEM) < 0)
    return;
  long rc = EXPECT(cancel_source_cancel_after(s, CANCEL_SEC(5)), 0, -ENOMEM,
                   -EAGAIN, -EMFILE, -ENFILE);
  if (rc < 0 && cancel_token_remaining(cancel_source_token(s)) != CANCEL_NEVER)
    violation("a timeout that was not armed shows as the deadline");
  cancel_source_unref(s);
}

/* A bounded shield is cancelled no later than outer + grace, also when its
 * grace timer cannot be armed (then at once). */
static void sc_shield(void) {
  cancel_source *outer = NULL, *sh = NULL;
  if (EXPECT(cancel_source_new(&outer, "outer"), 0, -ENOMEM) < 0)
    return;
  if (EXPECT(cancel_source_new_shield(&sh, "commit",
                                      cancel_source_token(outer),
                                      CANCEL_MSEC(5)),
             0, -ENOMEM) < 0) {
    cancel_source_unref(outer);
    return;
  }
  int64_t t0 = cancel_now();
  cancel_source_cancel(outer);
  long rc = EXPECT(cancel_sleep(cancel_source_token(sh), CANCEL_SEC(3)),
                   -ECANCELED, 0);
  if (rc == 0)
    violation("the shield was not cancelled 3 s after outer + 5 ms grace");
  else if (ms_since(t0) > 1000)
    violation("the shield was cancelled %lld ms after outer (grace 5 ms)",
              (long long)ms_since(t0));
  cancel_source_unref(sh);
  cancel_source_unref(outer);
}

struct later {
  cancel_source *src;
  int64_t after;
};
static void *cancel_later(void *arg) {
  struct later *l = arg;
  own = 1;
  struct timespec ts = {0, (long)l->after};
  nanosleep(&ts, NULL);
  cancel_source_cancel(l->src);
  return NULL;
}

/* Descriptor and futex waits woken by a cancel from another thread (the
 * harness's own thread: never failed). */
static void sc_waits(void) {
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "w"), 0, -ENOMEM) < 0)
    return;
  int p[2];
  own = 1;
  int prc = pipe2(p, O_CLOEXEC);
  own = 0;
  if (prc != 0) {
    violation("pipe2 (the harness's)");
    cancel_source_unref(s);
    return;
  }
  struct later l = {s, CANCEL_MSEC(3)};
  pthread_t th;
  own = 1;
  int trc = __real_pthread_create(&th, NULL, cancel_later, &l);
  own = 0;
  if (trc != 0) {
    violation("pthread_create (the harness's)");
    return;
  }
  char c;
  EXPECT(cancel_read(cancel_source_token(s), p[0], &c, 1, CANCEL_NEVER),
         -ECANCELED, -ENOMEM, -EMFILE, -ENFILE);
  EXPECT(cancel_sleep(cancel_source_token(s), CANCEL_SEC(3)), -ECANCELED);
  struct pollfd pfd = {.fd = p[0], .events = POLLIN};
  EXPECT(cancel_poll(cancel_source_token(s), &pfd, 1, CANCEL_NEVER),
         -ECANCELED, -ENOMEM, -EMFILE, -ENFILE);
  long fd = EXPECT(cancel_token_fd(cancel_source_token(s)), -EMFILE, -ENFILE,
                   -ENOMEM, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12);
  if (fd >= 0) {
    struct pollfd tf = {.fd = (int)fd, .events = POLLIN};
    if (poll(&tf, 1, 0) != 1)
      violation("the token descriptor of a cancelled token is not readable");
  }
  pthread_join(th, NULL);
  close(p[0]);
  close(p[1]);
  cancel_source_unref(s);
}

static void *worker(void *arg) {
  return arg;
}

/* Threads that can be joined with a token, condition variables, sems. */
static void sc_threads(void) {
  cancel_thread t;
  long rc = EXPECT(cancel_thread_create(&t, NULL, worker, &t), 0, -EAGAIN);
  if (rc == 0) {
    void *ret = NULL;
    EXPECT(cancel_thread_join(NULL, &t, &ret, CANCEL_NEVER), 0);
    if (ret != &t)
      violation("cancel_thread_join lost the result");
  }
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "c"), 0, -ENOMEM) < 0)
    return;
  cancel_source_cancel(s);
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
  pthread_mutex_lock(&mu);
  EXPECT(cancel_cond_wait(cancel_source_token(s), &cv, &mu, CANCEL_NEVER),
         -ECANCELED);
  pthread_mutex_unlock(&mu);
  cancel_sem sem;
  cancel_sem_init(&sem, 0);
  EXPECT(cancel_sem_wait(cancel_source_token(s), &sem, CANCEL_NEVER),
         -ECANCELED);
  cancel_source_unref(s);
}

/* A hang-up watch on the reactor: fires, or fails with its documented
 * errors, and leaves no reference behind. */
static void sc_hangup(void) {
  int sv[2];
  own = 1;
  int r = socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv);
  own = 0;
  if (r != 0)
    return;
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "client"), 0, -ENOMEM) == 0) {
    cancel_watch w;
    memset(&w, 0, sizeof w);
    long rc = EXPECT(cancel_watch_hangup(&w, s, sv[0]), 0, -EMFILE, -ENFILE,
                     -ENOMEM, -ENOSPC, -EAGAIN);
    close(sv[1]);
    if (rc == 0) {
      long st = EXPECT(cancel_sleep(cancel_source_token(s), CANCEL_SEC(3)),
                       -ECANCELED, 0);
      if (st == 0)
        violation("the hang-up did not cancel within 3 s");
      EXPECT(cancel_unwatch(&w), 0);
    }
    cancel_source_unref(s);
  } else {
    close(sv[1]);
  }
  close(sv[0]);
}

/* SIGTERM through the signalfd watch. */
static void sc_signals(void) {
  EXPECT(cancel_signals_block(), 0);
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "host"), 0, -ENOMEM) < 0)
    return;
  long rc = EXPECT(cancel_signals_watch(s), 0, -EMFILE, -ENFILE, -ENOMEM,
                   -EAGAIN);
  if (rc == 0) {
    kill(getpid(), SIGTERM);
    if (EXPECT(cancel_sleep(cancel_source_token(s), CANCEL_SEC(3)),
               -ECANCELED, 0) == 0)
      violation("SIGTERM did not cancel within 3 s");
    EXPECT(cancel_signals_unwatch(), 0);
  }
  cancel_source_unref(s);
}

/* A child process spawned, cancelled, killed and reaped. */
static void sc_process(void) {
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "job"), 0, -ENOMEM) < 0)
    return;
  cancel_child c;
  char *argv[] = {"sleep", "5", NULL};
  long rc = EXPECT(cancel_child_spawnp(&c, "sleep", argv, NULL), 0, -EAGAIN,
                   -ENOMEM, -EMFILE, -ENFILE);
  if (rc == 0) {
    struct later l = {s, CANCEL_MSEC(3)};
    pthread_t th;
    own = 1;
    __real_pthread_create(&th, NULL, cancel_later, &l);
    own = 0;
    int status = 0;
    EXPECT(cancel_child_wait(cancel_source_token(s), &c, CANCEL_MSEC(100),
                             CANCEL_NEVER, &status),
           -ECANCELED, -ENOMEM, -EMFILE, -ENFILE);
    pthread_join(th, NULL);
  }
  cancel_source_unref(s);
}

/* Waits woken from another thread: a condition variable, a semaphore, a
 * thread join, and many linked parents (their link nodes are one
 * allocation). */
struct cond_wake {
  cancel_source *src;
  pthread_mutex_t mu;
  pthread_cond_t cv;
};

static void sc_wakes(void) {
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "wake"), 0, -ENOMEM) < 0)
    return;
  struct later l = {s, CANCEL_MSEC(3)};
  pthread_t th;
  own = 1;
  int trc = __real_pthread_create(&th, NULL, cancel_later, &l);
  own = 0;
  if (trc != 0) {
    violation("pthread_create (the harness's)");
    cancel_source_unref(s);
    return;
  }
  pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
  pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
  pthread_mutex_lock(&mu);
  EXPECT(cancel_cond_wait(cancel_source_token(s), &cv, &mu, CANCEL_NEVER),
         -ECANCELED, 0);
  pthread_mutex_unlock(&mu);
  pthread_join(th, NULL);
  cancel_sem sem;
  cancel_sem_init(&sem, 0);
  EXPECT(cancel_sem_wait(cancel_source_token(s), &sem, CANCEL_NEVER),
         -ECANCELED);

  enum { NP = 40 };
  cancel_source *ps[NP] = {NULL};
  const cancel_token *toks[NP];
  int made = 0;
  for (int i = 0; i < NP; i++)
    if (EXPECT(cancel_source_new(&ps[i], "parent"), 0, -ENOMEM) == 0)
      toks[made++] = cancel_source_token(ps[i]);
  cancel_source *kid = NULL;
  if (made > 0 &&
      EXPECT(cancel_source_new_linked(&kid, "fan-in", toks, (size_t)made), 0,
             -ENOMEM) == 0) {
    cancel_reg r;
    atomic_store(&fired, 0);
    EXPECT(cancel_register(&r, cancel_source_token(kid), count_cb, NULL), 0);
    cancel_source_cancel(ps[made / 2] != NULL ? ps[made / 2] : ps[0]);
    for (int i = 0; i < NP; i++)
      if (ps[i] != NULL)
        cancel_source_cancel(ps[i]);
    if (atomic_load(&fired) != 1)
      violation("a fan-in child's callback ran %d times", atomic_load(&fired));
    EXPECT(cancel_unregister(&r), 0);
    cancel_source_unref(kid);
  }
  for (int i = 0; i < NP; i++)
    cancel_source_unref(ps[i]);
  cancel_source_unref(s);
}

/* Diagnostics: the watchdog (a thread, a signal for stacks), scopes, the
 * metrics page. */
static void sc_diag(void) {
  cancel_watchdog_options o = {.threshold_ns = CANCEL_MSEC(5)};
  long rc = EXPECT(cancel_watchdog_start(&o), 0, -EAGAIN, -ENOMEM);
  cancel_source *s = NULL;
  if (EXPECT(cancel_source_new(&s, "scoped"), 0, -ENOMEM) == 0) {
    cancel_scope sc;
    cancel_scope_begin(&sc, cancel_source_token(s), "work");
    cancel_source_cancel(s);
    struct timespec ts = {0, 20000000};
    nanosleep(&ts, NULL); /* overdue: the watchdog may report it */
    (void)cancel_scope_end(&sc);
    cancel_source_unref(s);
  }
  if (rc == 0)
    EXPECT(cancel_watchdog_stop(), 0);
  own = 1;
  FILE *f = fopen("/dev/null", "w");
  own = 0;
  if (f != NULL) {
    EXPECT(cancel_metrics_write_prometheus(f), 0, -EIO, -ENOMEM);
    fclose(f);
  }
}

struct scenario {
  const char *name;
  void (*fn)(void);
};
static const struct scenario scenarios[] = {
    {"sources", sc_sources}, {"timeouts", sc_timeouts},
    {"shield", sc_shield},   {"waits", sc_waits},
    {"threads", sc_threads}, {"hangup", sc_hangup},
    {"signals", sc_signals}, {"process", sc_process},
    {"wakes", sc_wakes},     {"diag", sc_diag},
};

/* ---- The sweep ------------------------------------------------------------ */

enum outcome { OK, VIOLATION, CRASH, HANG, LEAK, NOT_REACHED, NOUTCOMES };
static const char *const outcome_name[] = {"ok",   "violation", "crash",
                                           "hang", "leak",      "not reached"};

/* Runs one scenario in a child with call `n` failing.  *total gets the
 * number of faultable calls the child made. */
static enum outcome run_one(const struct scenario *sc, long n, long *total,
                            char *why, size_t whylen) {
  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0)
    return CRASH;
  fflush(NULL);
  pid_t pid = fork();
  if (pid == 0) {
    close(p[0]);
    report_fd = p[1];
    fail_at = n;
    atomic_store(&armed, 1);
    sc->fn();
    atomic_store(&armed, 0);
    char msg[640];
    int len = snprintf(msg, sizeof msg, "%ld %s|%s", atomic_load(&calls),
                       failed_name[0] ? failed_name : "-",
                       verdict[0] ? verdict : "ok");
    if (write(report_fd, msg, (size_t)len) < 0)
      _exit(3);
    close(report_fd);
    exit(0); /* LeakSanitizer checks here, under ASan */
  }
  close(p[1]);
  char msg[640] = "";
  size_t got = 0;
  int64_t deadline = cancel_now() + CANCEL_SEC(10);
  enum outcome o = OK;
  for (;;) {
    int64_t left = deadline - cancel_now();
    if (left <= 0) {
      kill(pid, SIGKILL);
      o = HANG;
      break;
    }
    struct pollfd pfd = {.fd = p[0], .events = POLLIN};
    if (poll(&pfd, 1, (int)(left / 1000000) + 1) <= 0)
      continue;
    ssize_t r = read(p[0], msg + got, sizeof msg - 1 - got);
    if (r <= 0)
      break;
    got += (size_t)r;
  }
  msg[got] = '\0';
  close(p[0]);
  int status = 0;
  waitpid(pid, &status, 0);
  char *bar = strchr(msg, '|');
  *total = atol(msg);
  char failed[40] = "-";
  const char *sp = strchr(msg, ' ');
  if (bar != NULL && sp != NULL && sp < bar)
    snprintf(failed, sizeof failed, "%.*s", (int)(bar - sp - 1), sp + 1);
  if (o == HANG) {
    snprintf(why, whylen, "hang (fault %ld)", n);
  } else if (WIFSIGNALED(status)) {
    o = CRASH;
    snprintf(why, whylen, "signal %d with %s failed", WTERMSIG(status), failed);
  } else if (WEXITSTATUS(status) == 23) {
    o = LEAK;
    snprintf(why, whylen, "leak with %s failed", failed);
  } else if (bar == NULL || WEXITSTATUS(status) != 0) {
    o = CRASH;
    snprintf(why, whylen, "exit %d with no report", WEXITSTATUS(status));
  } else if (strcmp(bar + 1, "ok") != 0) {
    o = VIOLATION;
    snprintf(why, whylen, "%s failed: %s", failed, bar + 1);
  } else if (n > 0 && strcmp(failed, "-") == 0) {
    o = NOT_REACHED; /* fewer calls this time (threads race) */
  }
  return o;
}

static void quiet(int level, const char *line, size_t len, void *arg) {
  (void)level;
  (void)line;
  (void)len;
  (void)arg;
}

int main(int argc, char **argv) {
  long sample = 0;
  int first = 1;
  if (argc > 2 && strcmp(argv[1], "--sample") == 0) {
    sample = atol(argv[2]);
    first = 3;
  }
  if (argc > first && strcmp(argv[first], "--list") == 0) {
    for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++)
      printf("%s\n", scenarios[i].name);
    return 0;
  }
  /* A signal the scenario raises must not end the sweep itself. */
  signal(SIGPIPE, SIG_IGN);
  /* The library's lines (the watchdog's reports) are not the sweep's. */
  cancel_log_set_sink(quiet, NULL, CANCEL_LOG_ERROR);
  long passed = 0, failed = 0, points = 0;
  long totals[NOUTCOMES] = {0};
  for (size_t i = 0; i < sizeof scenarios / sizeof scenarios[0]; i++) {
    const struct scenario *sc = &scenarios[i];
    if (argc > first) {
      int want = 0;
      for (int a = first; a < argc; a++)
        want |= strcmp(argv[a], sc->name) == 0;
      if (!want)
        continue;
    }
    char why[700];
    long k = 0;
    enum outcome o = run_one(sc, 0, &k, why, sizeof why);
    if (o != OK) {
      printf("faults %s: FAILED without a fault: %s\n", sc->name, why);
      failed++;
      continue;
    }
    long step = sample > 0 && k > sample ? (k + sample - 1) / sample : 1;
    long counts[NOUTCOMES] = {0};
    for (long n = 1; n <= k; n += step) {
      long t = 0;
      o = run_one(sc, n, &t, why, sizeof why);
      counts[o]++;
      totals[o]++;
      points++;
      if (o == OK || o == NOT_REACHED) {
        passed++;
      } else {
        failed++;
        printf("faults %s: fault %ld of %ld: %s: %s\n", sc->name, n, k,
               outcome_name[o], why);
      }
    }
    printf("faults %s: %ld calls, %ld failed one at a time: %ld ok, %ld not "
           "reached, %ld violations, %ld crashes, %ld hangs, %ld leaks\n",
           sc->name, k, (k + step - 1) / step, counts[OK], counts[NOT_REACHED],
           counts[VIOLATION], counts[CRASH], counts[HANG], counts[LEAK]);
  }
  printf("faults: %ld fault points: %ld ok, %ld not reached, %ld violations, "
         "%ld crashes, %ld hangs, %ld leaks\n",
         points, totals[OK], totals[NOT_REACHED], totals[VIOLATION],
         totals[CRASH], totals[HANG], totals[LEAK]);
  printf("%ld passed, %ld failed\n", passed, failed);
  return failed > 0;
}
