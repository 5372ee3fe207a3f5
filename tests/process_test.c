/*
 * Child processes (include/cancel/process.h): spawn, wait with a token,
 * SIGTERM / grace / SIGKILL / reap on cancellation, deadlines, adoption,
 * process groups, bad input, signals during the waits, and many children
 * waited at once and cancelled in random order.
 *
 * Every child is a real program (sleep, sh).  The tests never sleep to
 * synchronise: a child that must be ready (its SIGTERM ignored) says so on
 * a pipe; cancellation comes from a timer (the library's thread) or from
 * another test thread; "no zombie" is waitpid() answering ECHILD.
 */
#include "test_util.h"

#include <dirent.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#include "cancel/process.h"

#if defined(__has_include)
#if __has_include(<valgrind/valgrind.h>)
#include <valgrind/valgrind.h>
#define ON_VALGRIND() RUNNING_ON_VALGRIND
#endif
#endif
#ifndef ON_VALGRIND
#define ON_VALGRIND() 0
#endif

/* process.c's switch to the no-pidfd fallback (the second run of the
 * suite sets it; valgrind 3.19 has no pidfd_open, so it always runs the
 * fallback). */
extern int cancel__child_no_pidfd;

static bool kernel_has_pidfd(void) {
  int fd = (int)syscall(SYS_pidfd_open, getpid(), 0);
  if (fd < 0)
    return false;
  close(fd);
  return true;
}

/* How long a child takes to be gone once signalled, and the wait to
 * notice: generous for a loaded machine, scaled for slow builds. */
static int64_t prompt(void) {
  return test_tol(CANCEL_MSEC(250));
}

/* When the token was cancelled (the timer thread's time of firing). */
static int64_t cancelled_at(const cancel_token *tok) {
  cancel_reason r;
  assert_int_equal(cancel_token_reason(tok, &r), 1);
  return r.time;
}

static void spawn_ok(cancel_child *c, char *const argv[]) {
  int rc = cancel_child_spawnp(c, argv[0], argv, NULL);
  if (rc != 0) {
    print_error("spawn %s: %s\n", argv[0], cancel_strerror(rc));
    fail();
  }
  assert_true(c->pid > 0);
  /* A descriptor, unless the fallback runs. */
  assert_int_equal(c->pidfd >= 0,
                   !cancel__child_no_pidfd && kernel_has_pidfd());
}

static void spawn_sleep30(cancel_child *c) {
  spawn_ok(c, (char *[]){"sleep", "30", NULL});
}

static void assert_signalled(int status, int sig) {
  if (!WIFSIGNALED(status) || WTERMSIG(status) != sig) {
    print_error("status %#x: expected death by signal %d\n", status, sig);
    fail();
  }
}

static void assert_exited(int status, int code) {
  if (!WIFEXITED(status) || WEXITSTATUS(status) != code) {
    print_error("status %#x: expected exit %d\n", status, code);
    fail();
  }
}

/* The pid is not ours to wait for any more: reaped, no zombie. */
static void assert_reaped(pid_t pid) {
  errno = 0;
  assert_int_equal(waitpid(pid, NULL, WNOHANG), -1);
  assert_int_equal(errno, ECHILD);
}

/* This process has no child at all (nothing leaked, nothing unreaped). */
static void assert_no_children(void) {
  errno = 0;
  assert_int_equal(waitpid(-1, NULL, WNOHANG), -1);
  assert_int_equal(errno, ECHILD);
}

/* The child is running: not exited, not reaped. */
static void assert_running(const cancel_child *c) {
  siginfo_t info;
  memset(&info, 0, sizeof info);
  assert_int_equal(
      waitid(P_PID, (id_t)c->pid, &info, WEXITED | WNOHANG | WNOWAIT), 0);
  assert_int_equal(info.si_pid, 0);
}

/* Blocks until the child has exited, leaving it to be reaped. */
static void wait_exited_unreaped(const cancel_child *c) {
  siginfo_t info;
  int rc;
  do {
    memset(&info, 0, sizeof info);
    rc = waitid(P_PID, (id_t)c->pid, &info, WEXITED | WNOWAIT);
  } while (rc < 0 && errno == EINTR);
  assert_int_equal(rc, 0);
  assert_int_equal(info.si_pid, c->pid);
}

/* posix_spawn reports a failed exec as its result; under valgrind, which
 * runs its vfork-style clone as a plain fork, the error is lost and the
 * child exits 127 instead. */
static void expect_exec_error(int rc, cancel_child *c, int err) {
  if (rc == 0 && ON_VALGRIND()) {
    int status = -1;
    assert_int_equal(cancel_child_wait(NULL, c, 0, CANCEL_NEVER, &status), 0);
    assert_exited(status, 127);
    return;
  }
  assert_int_equal(rc, err);
  assert_int_equal(c->pid, 0);
  assert_int_equal(c->pidfd, -1);
}

static int count_fds(void) {
  DIR *d = opendir("/proc/self/fd");
  assert_non_null(d);
  int n = 0;
  while (readdir(d) != NULL)
    n++;
  closedir(d);
  return n;
}

/* Reads until `want` bytes or end of file, retrying EINTR. */
static size_t read_all(int fd, char *buf, size_t want) {
  size_t got = 0;
  while (got < want) {
    ssize_t n = read(fd, buf + got, want - got);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    got += (size_t)n;
  }
  return got;
}

/* Spawns argv with its stdout on a pipe and returns the pipe's read end
 * (our copy of the write end is closed: end of file once the child and
 * everything it started have closed it). */
static int spawn_piped(cancel_child *c, char *const argv[], unsigned flags) {
  int p[2];
  assert_int_equal(pipe2(p, O_CLOEXEC), 0);
  posix_spawn_file_actions_t fa;
  assert_int_equal(posix_spawn_file_actions_init(&fa), 0);
  assert_int_equal(posix_spawn_file_actions_adddup2(&fa, p[1], 1), 0);
  int rc = cancel_child_spawn_ex(c, "/bin/sh", argv, NULL, &fa, NULL, flags);
  posix_spawn_file_actions_destroy(&fa);
  close(p[1]);
  assert_int_equal(rc, 0);
  return p[0];
}

/* A child that ignores SIGTERM, spawned and ready: it has ignored SIGTERM
 * when this returns (it said so).  exec keeps the ignored disposition, so
 * the sleep it becomes ignores SIGTERM too. */
static void spawn_term_ignorer(cancel_child *c) {
  int fd = spawn_piped(
      c,
      (char *[]){"sh", "-c", "trap '' TERM; echo ready; exec sleep 30", NULL},
      0);
  char buf[8] = "";
  assert_int_equal(read_all(fd, buf, 6), 6);
  assert_memory_equal(buf, "ready\n", 6);
  close(fd);
}

/* ---- Normal exits ----------------------------------------------------- */

static void test_exit_zero(void **state) {
  (void)state;
  cancel_source *s = new_src("job");
  cancel_child c;
  spawn_ok(&c, (char *[]){"sleep", "0.05", NULL});
  pid_t pid = c.pid;
  int64_t t0 = cancel_now();
  int status = -1;
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(1), CANCEL_NEVER, &status), 0);
  int64_t took = cancel_now() - t0;
  assert_exited(status, 0);
  assert_i64_lt(took, CANCEL_MSEC(50) + prompt());
  /* The handle is closed, the status kept, the pid kept for logs. */
  assert_int_equal(c.pidfd, -1);
  assert_int_equal(c.status, status);
  assert_int_equal(c.pid, pid);
  assert_reaped(pid);
  /* Reaped once: a second wait, a kill or a signal find no child. */
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(1), CANCEL_NEVER, &status),
      -ECHILD);
  assert_int_equal(cancel_child_kill(&c, 0, &status), -ECHILD);
  assert_int_equal(cancel_child_signal(&c, 0), -ECHILD);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_exit_code_and_env(void **state) {
  (void)state;
  cancel_child c;
  int status = -1;
  spawn_ok(&c, (char *[]){"sh", "-c", "exit 3", NULL});
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status), 0);
  assert_exited(status, 3);

  /* envp replaces the environment; status NULL is allowed. */
  char *env[] = {"CODE=42", NULL};
  assert_int_equal(
      cancel_child_spawn(&c, "/bin/sh",
                         (char *[]){"sh", "-c", "exit $CODE", NULL}, env),
      0);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, NULL), 0);
  assert_exited(c.status, 42);

  /* A child that dies of a signal of its own: the status says so. */
  spawn_ok(&c, (char *[]){"sh", "-c", "kill -USR2 $$", NULL});
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status), 0);
  assert_signalled(status, SIGUSR2);
  assert_no_children();
}

/* ---- Cancellation ----------------------------------------------------- */

static void test_cancel_running_child_sigterm(void **state) {
  (void)state;
  cancel_source *s = new_src("request");
  cancel_child c;
  spawn_sleep30(&c); /* running `sleep` once spawn returned */
  pid_t pid = c.pid;
  const int64_t grace = CANCEL_SEC(5);
  /* Cancelled by the library's timer thread while we wait. */
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(30)), 0);
  int status = -1;
  assert_int_equal(cancel_child_wait(TOK(s), &c, grace, CANCEL_NEVER, &status),
                   -ECANCELED);
  int64_t end = cancel_now();
  int64_t took = end - cancelled_at(TOK(s));
  assert_i64_ge(took, 0);
  assert_i64_lt(took, prompt()); /* SIGTERM was enough: far below grace */
  assert_signalled(status, SIGTERM);
  assert_int_equal(c.pidfd, -1);
  assert_reaped(pid);
  cancel_source_unref(s);
}

static void test_cancel_term_ignored_gets_sigkill(void **state) {
  (void)state;
  cancel_source *s = new_src("request");
  cancel_child c;
  spawn_term_ignorer(&c);
  pid_t pid = c.pid;
  const int64_t grace = CANCEL_MSEC(300);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  int status = -1;
  assert_int_equal(cancel_child_wait(TOK(s), &c, grace, CANCEL_NEVER, &status),
                   -ECANCELED);
  int64_t took = cancel_now() - cancelled_at(TOK(s));
  assert_i64_ge(took, grace); /* the whole grace, not cut short */
  assert_i64_lt(took, grace + prompt());
  assert_signalled(status, SIGKILL);
  assert_reaped(pid);
  cancel_source_unref(s);
}

static void test_cancelled_before_the_call(void **state) {
  (void)state;
  cancel_source *s = new_src("gone");
  assert_int_equal(cancel_source_cancel(s), 1);
  cancel_child c;
  int status = -1;

  /* Level-triggered: the child is still stopped and reaped. */
  spawn_sleep30(&c);
  pid_t pid = c.pid;
  int64_t t0 = cancel_now();
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(5), CANCEL_NEVER, &status),
      -ECANCELED);
  assert_i64_lt(cancel_now() - t0, prompt());
  assert_signalled(status, SIGTERM);
  assert_reaped(pid);

  /* grace 0: SIGKILL straight away, even for a child that would obey. */
  spawn_sleep30(&c);
  assert_int_equal(cancel_child_wait(TOK(s), &c, 0, CANCEL_NEVER, &status),
                   -ECANCELED);
  assert_signalled(status, SIGKILL);

  /* A child that already exited is reaped with its own status, no signal;
   * the call still says -ECANCELED (the token fired). */
  spawn_ok(&c, (char *[]){"sh", "-c", "exit 6", NULL});
  wait_exited_unreaped(&c);
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(5), CANCEL_NEVER, &status),
      -ECANCELED);
  assert_exited(status, 6);
  assert_no_children();
  cancel_source_unref(s);
}

/* ---- Deadlines -------------------------------------------------------- */

static void test_deadline_leaves_child_running(void **state) {
  (void)state;
  cancel_source *s = new_src("live");
  cancel_child c;
  spawn_sleep30(&c);
  pid_t pid = c.pid;
  int status = 12345;
  int64_t t0 = cancel_now();
  int64_t deadline = t0 + CANCEL_MSEC(100);
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(1), deadline, &status),
      -ETIMEDOUT);
  int64_t end = cancel_now();
  assert_i64_ge(end, deadline);
  assert_i64_lt(end, deadline + prompt());
  assert_int_equal(status, 12345); /* untouched */
  assert_running(&c);
  assert_int_equal(cancel_child_signal(&c, 0), 0);

  /* A deadline already passed is a non-blocking check. */
  t0 = cancel_now();
  assert_int_equal(cancel_child_wait(TOK(s), &c, CANCEL_SEC(1), 0, &status),
                   -ETIMEDOUT);
  assert_i64_lt(cancel_now() - t0, prompt());
  assert_running(&c);

  /* Still ours: kill it. */
  t0 = cancel_now();
  assert_int_equal(cancel_child_kill(&c, CANCEL_SEC(5), &status), 0);
  assert_i64_lt(cancel_now() - t0, prompt());
  assert_signalled(status, SIGTERM);
  assert_reaped(pid);
  assert_int_equal(cancel_child_kill(&c, CANCEL_SEC(5), &status), -ECHILD);
  assert_false(cancel_token_is_cancelled(TOK(s)));
  cancel_source_unref(s);
}

static void test_deadline_passed_exited_child_is_reaped(void **state) {
  (void)state;
  cancel_child c;
  spawn_ok(&c, (char *[]){"sh", "-c", "exit 5", NULL});
  wait_exited_unreaped(&c);
  int status = -1;
  assert_int_equal(cancel_child_wait(NULL, &c, 0, 0, &status), 0);
  assert_exited(status, 5);
  assert_no_children();
}

static void test_kill_variants(void **state) {
  (void)state;
  cancel_child c;
  int status = -1;
  /* grace 0: SIGKILL at once. */
  spawn_sleep30(&c);
  assert_int_equal(cancel_child_kill(&c, 0, &status), 0);
  assert_signalled(status, SIGKILL);
  /* A term-ignoring child: killed after the grace. */
  spawn_term_ignorer(&c);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_child_kill(&c, CANCEL_MSEC(100), NULL), 0);
  int64_t took = cancel_now() - t0;
  assert_i64_ge(took, CANCEL_MSEC(100));
  assert_i64_lt(took, CANCEL_MSEC(100) + prompt());
  assert_signalled(c.status, SIGKILL);
  /* A stopped child still gets to act on SIGTERM (SIGCONT follows it)
   * instead of waiting out the grace. */
  spawn_sleep30(&c);
  assert_int_equal(kill(c.pid, SIGSTOP), 0);
  siginfo_t info;
  memset(&info, 0, sizeof info);
  assert_int_equal(waitid(P_PID, (id_t)c.pid, &info, WSTOPPED | WNOWAIT), 0);
  assert_int_equal(info.si_code, CLD_STOPPED);
  t0 = cancel_now();
  assert_int_equal(cancel_child_kill(&c, CANCEL_SEC(5), &status), 0);
  assert_i64_lt(cancel_now() - t0, prompt());
  assert_signalled(status, SIGTERM);
  /* cancel_child_signal: an ordinary signal, through the pidfd. */
  spawn_sleep30(&c);
  assert_int_equal(cancel_child_signal(&c, SIGUSR1), 0);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status), 0);
  assert_signalled(status, SIGUSR1);
  assert_no_children();
}

/* ---- Signals during the waits ----------------------------------------- */

static volatile sig_atomic_t usr1_seen;
static void on_usr1(int sig) {
  (void)sig;
  usr1_seen = 1;
}

struct firer {
  pthread_t target;
  int stop;
  int sent;
};

static void stop_firer(void *arg) {
  __atomic_store_n(&((struct firer *)arg)->stop, 1, __ATOMIC_RELEASE);
}

static void *fire_signals(void *arg) {
  struct firer *f = arg;
  while (!__atomic_load_n(&f->stop, __ATOMIC_ACQUIRE)) {
    pthread_kill(f->target, SIGUSR1);
    f->sent++;
    test_sleep_ns(CANCEL_USEC(200)); /* pacing, not synchronisation */
  }
  return NULL;
}

static void test_signals_do_not_end_waits(void **state) {
  (void)state;
  struct sigaction sa, old;
  memset(&sa, 0, sizeof sa);
  sa.sa_handler = on_usr1;
  sigemptyset(&sa.sa_mask);
  sa.sa_flags = 0; /* no SA_RESTART: every blocking call sees EINTR */
  assert_int_equal(sigaction(SIGUSR1, &sa, &old), 0);

  /* Spawned before the signals start (the pipe read is plain). */
  cancel_child normal, ignorer, late;
  int64_t t0 = cancel_now();
  spawn_ok(&normal, (char *[]){"sleep", "0.2", NULL});
  spawn_term_ignorer(&ignorer);
  spawn_sleep30(&late);

  /* Shared: if an assertion below fails, the teardown stops the firer
   * after this frame is gone. */
  struct firer *f = test_shared(sizeof *f);
  f->target = pthread_self();
  usr1_seen = 0;
  pthread_t th = test_helper_start(fire_signals, f, stop_firer);
  int status = -1;

  /* A normal exit: not ended early by EINTR. */
  assert_int_equal(
      cancel_child_wait(NULL, &normal, CANCEL_SEC(1), CANCEL_NEVER, &status),
      0);
  assert_i64_ge(cancel_now() - t0, CANCEL_MSEC(200)); /* sleep 0.2 ran */
  assert_exited(status, 0);

  /* A deadline: not before it. */
  int64_t deadline = cancel_now() + CANCEL_MSEC(100);
  assert_int_equal(
      cancel_child_wait(NULL, &late, CANCEL_SEC(1), deadline, &status),
      -ETIMEDOUT);
  assert_i64_ge(cancel_now(), deadline);

  /* The grace after SIGTERM and the final reap: not cut short either. */
  cancel_source *s = new_src("sig");
  const int64_t grace = CANCEL_MSEC(200);
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  assert_int_equal(
      cancel_child_wait(TOK(s), &ignorer, grace, CANCEL_NEVER, &status),
      -ECANCELED);
  assert_i64_ge(cancel_now() - cancelled_at(TOK(s)), grace);
  assert_signalled(status, SIGKILL);
  assert_int_equal(cancel_child_kill(&late, CANCEL_SEC(1), &status), 0);
  assert_signalled(status, SIGTERM);

  stop_firer(f);
  test_helper_join(th);
  assert_true(usr1_seen);
  assert_true(f->sent > 10);
  assert_int_equal(sigaction(SIGUSR1, &old, NULL), 0);
  cancel_source_unref(s);
  assert_no_children();
}

/* ---- What the child inherits ------------------------------------------ */

static void test_child_signal_defaults(void **state) {
  (void)state;
  cancel_child c;
  int status = -1;
  /* This thread blocks SIGTERM (as a service with a signal thread does):
   * the child must not inherit that, or cancelling it would always wait
   * out the grace. */
  sigset_t term, oldmask;
  sigemptyset(&term);
  sigaddset(&term, SIGTERM);
  assert_int_equal(pthread_sigmask(SIG_BLOCK, &term, &oldmask), 0);
  spawn_sleep30(&c);
  int64_t t0 = cancel_now();
  assert_int_equal(cancel_child_kill(&c, CANCEL_SEC(5), &status), 0);
  assert_i64_lt(cancel_now() - t0, prompt());
  assert_signalled(status, SIGTERM);
  assert_int_equal(pthread_sigmask(SIG_SETMASK, &oldmask, NULL), 0);

  /* A process that ignores SIGPIPE does not pass that on. */
  struct sigaction ign, old;
  memset(&ign, 0, sizeof ign);
  ign.sa_handler = SIG_IGN;
  assert_int_equal(sigaction(SIGPIPE, &ign, &old), 0);
  spawn_ok(&c, (char *[]){"sh", "-c", "kill -PIPE $$; exit 0", NULL});
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status), 0);
  assert_signalled(status, SIGPIPE);
  assert_int_equal(sigaction(SIGPIPE, &old, NULL), 0);
}

/* ---- Process groups --------------------------------------------------- */

/* Spawns `sh -c 'sleep 30 & echo $!; exec sleep 30'` and returns the
 * background sleep's pid.  The leader becomes a sleep, which never reaps:
 * when it is gone its orphan comes to us, dead or alive. */
static pid_t spawn_with_grandchild(cancel_child *c, unsigned flags) {
  int fd = spawn_piped(
      c, (char *[]){"sh", "-c", "sleep 30 & echo $!; exec sleep 30", NULL},
      flags);
  char buf[32] = "";
  size_t n = 0;
  while (n < sizeof buf - 1) { /* one line */
    ssize_t r = read(fd, buf + n, 1);
    if (r < 0 && errno == EINTR)
      continue;
    if (r <= 0 || buf[n] == '\n')
      break;
    n++;
  }
  close(fd);
  pid_t gpid = (pid_t)atoi(buf);
  assert_true(gpid > 0);
  return gpid;
}

static bool orphan_exited(void *arg) {
  siginfo_t info;
  memset(&info, 0, sizeof info);
  return waitid(P_PID, (id_t) * (pid_t *)arg, &info,
                WEXITED | WNOHANG | WNOWAIT) == 0 &&
         info.si_pid != 0;
}

/* Waits (bounded) for an orphan reparented to us and reaps it: its status,
 * or -1 if it did not exit within the time (it is killed then).  Polls:
 * nothing signals the exit of a process that is not our own child yet. */
static int reap_orphan(pid_t pid, int64_t timeout_ns) {
  bool exited = test_wait_until(orphan_exited, &pid, timeout_ns);
  if (!exited)
    kill(pid, SIGKILL);
  int st = -1;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  return exited ? st : -1;
}

static void test_process_group(void **state) {
  (void)state;
  /* Orphans come to us, so that we can see how they ended. */
  assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0), 0);
  cancel_source *s = new_src("group");
  assert_int_equal(cancel_source_cancel(s), 1);
  cancel_child c;
  int status = -1;

  /* With the flag, the shell's own child goes too. */
  pid_t gpid = spawn_with_grandchild(&c, CANCEL_CHILD_NEW_PGROUP);
  assert_int_equal(getpgid(c.pid), c.pid);
  assert_int_equal(getpgid(gpid), c.pid);
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(5), CANCEL_NEVER, &status),
      -ECANCELED);
  assert_signalled(status, SIGTERM);
  int gst = reap_orphan(gpid, prompt());
  assert_true(gst != -1);
  assert_true(WIFSIGNALED(gst));
  assert_true(WTERMSIG(gst) == SIGTERM || WTERMSIG(gst) == SIGKILL);

  /* Without it, only the shell is stopped: the sleep is orphaned alive. */
  gpid = spawn_with_grandchild(&c, 0);
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(5), CANCEL_NEVER, &status),
      -ECANCELED);
  assert_signalled(status, SIGTERM);
  assert_int_equal(reap_orphan(gpid, CANCEL_MSEC(50)), -1);

  /* A caller's attr must agree with the flag. */
  posix_spawnattr_t attr;
  assert_int_equal(posix_spawnattr_init(&attr), 0);
  char *const argv[] = {"sleep", "30", NULL};
  assert_int_equal(cancel_child_spawn_ex(&c, "/bin/sleep", argv, NULL, NULL,
                                         &attr, CANCEL_CHILD_NEW_PGROUP),
                   -EINVAL);
  assert_int_equal(posix_spawnattr_setflags(&attr, POSIX_SPAWN_SETPGROUP), 0);
  assert_int_equal(posix_spawnattr_setpgroup(&attr, 0), 0);
  assert_int_equal(cancel_child_spawn_ex(&c, "/bin/sleep", argv, NULL, NULL,
                                         &attr, CANCEL_CHILD_NEW_PGROUP),
                   0);
  assert_int_equal(getpgid(c.pid), c.pid);
  assert_int_equal(cancel_child_kill(&c, CANCEL_SEC(5), &status), 0);
  assert_signalled(status, SIGTERM);
  posix_spawnattr_destroy(&attr);

  assert_int_equal(prctl(PR_SET_CHILD_SUBREAPER, 0, 0, 0, 0), 0);
  cancel_source_unref(s);
  assert_no_children();
}

/* ---- Adoption --------------------------------------------------------- */

static void test_adopt_forked_child(void **state) {
  (void)state;
  cancel_child c;
  int status = -1;

  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0)
    _exit(7);
  assert_int_equal(cancel_child_adopt(&c, pid), 0);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status), 0);
  assert_exited(status, 7);
  assert_reaped(pid);
  /* Reaped: adopting it again finds no process (or, were the pid reused
   * meanwhile, a process that is not our child). */
  int rc = cancel_child_adopt(&c, pid);
  assert_true(rc == -ESRCH || rc == -ECHILD);

  /* A child that is a zombie already is adopted and reaped. */
  pid = fork();
  assert_true(pid >= 0);
  if (pid == 0)
    _exit(9);
  siginfo_t info;
  memset(&info, 0, sizeof info);
  assert_int_equal(waitid(P_PID, (id_t)pid, &info, WEXITED | WNOWAIT), 0);
  assert_int_equal(cancel_child_adopt(&c, pid), 0);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status), 0);
  assert_exited(status, 9);

  /* A forked child that waits for ever: cancelled like a spawned one. */
  pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    for (;;)
      pause();
  }
  assert_int_equal(cancel_child_adopt(&c, pid), 0);
  cancel_source *s = new_src("adopted");
  assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(20)), 0);
  assert_int_equal(
      cancel_child_wait(TOK(s), &c, CANCEL_SEC(5), CANCEL_NEVER, &status),
      -ECANCELED);
  assert_signalled(status, SIGTERM);
  cancel_source_unref(s);

  /* Not our child: our parent. */
  assert_int_equal(cancel_child_adopt(&c, getppid()), -ECHILD);
  assert_int_equal(c.pidfd, -1);
  assert_no_children();
}

/* ---- Bad input -------------------------------------------------------- */

static void test_nonexistent_program(void **state) {
  (void)state;
  int fds = count_fds();
  cancel_child c;
  char *const argv[] = {"x", NULL};
  expect_exec_error(cancel_child_spawn(&c, "/nonexistent/prog", argv, NULL), &c,
                    -ENOENT);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, NULL), -ECHILD);
  expect_exec_error(
      cancel_child_spawnp(&c, "libcancel-no-such-program", argv, NULL), &c,
      -ENOENT);
  /* Not executable, a directory. */
  expect_exec_error(cancel_child_spawn(&c, "/etc/passwd", argv, NULL), &c,
                    -EACCES);
  expect_exec_error(cancel_child_spawn(&c, "/", argv, NULL), &c, -EACCES);
  /* Without SEARCH_PATH a bare name is not looked up. */
  expect_exec_error(cancel_child_spawn(&c, "sleep", argv, NULL), &c, -ENOENT);
  /* Nothing left behind: no child, no descriptor. */
  assert_no_children();
  assert_int_equal(count_fds(), fds);
}

static void test_bad_arguments(void **state) {
  (void)state;
  char *const argv[] = {"true", NULL};
  cancel_child c;
  int status;
  assert_int_equal(cancel_child_spawn(NULL, "/bin/true", argv, NULL), -EINVAL);
  assert_int_equal(cancel_child_spawnp(NULL, "true", argv, NULL), -EINVAL);
  assert_int_equal(
      cancel_child_spawn_ex(NULL, "/bin/true", argv, NULL, NULL, NULL, 0),
      -EINVAL);
  /* A handle full of garbage is emptied by a failed spawn. */
  memset(&c, 0xa5, sizeof c);
  assert_int_equal(cancel_child_spawn(&c, NULL, argv, NULL), -EINVAL);
  assert_int_equal(c.pidfd, -1);
  assert_int_equal(cancel_child_spawn(&c, "/bin/true", NULL, NULL), -EINVAL);
  assert_int_equal(
      cancel_child_spawn_ex(&c, "/bin/true", argv, NULL, NULL, NULL, 0x100),
      -EINVAL);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status),
                   -ECHILD);
  assert_int_equal(cancel_child_adopt(NULL, 1), -EINVAL);
  assert_int_equal(cancel_child_adopt(&c, 0), -EINVAL);
  assert_int_equal(cancel_child_adopt(&c, -1), -EINVAL);
  assert_int_equal(cancel_child_wait(NULL, NULL, 0, CANCEL_NEVER, &status),
                   -EINVAL);
  assert_int_equal(cancel_child_kill(NULL, 0, &status), -EINVAL);
  assert_int_equal(cancel_child_signal(NULL, 0), -EINVAL);

  /* A zero-filled handle holds no child (and is not descriptor 0). */
  memset(&c, 0, sizeof c);
  assert_int_equal(cancel_child_wait(NULL, &c, 0, CANCEL_NEVER, &status),
                   -ECHILD);
  assert_int_equal(cancel_child_kill(&c, 0, &status), -ECHILD);
  assert_int_equal(cancel_child_signal(&c, SIGTERM), -ECHILD);

  /* Bad values on a live child leave it alone. */
  spawn_sleep30(&c);
  assert_int_equal(cancel_child_wait(NULL, &c, -1, CANCEL_NEVER, &status),
                   -EINVAL);
  assert_int_equal(cancel_child_kill(&c, -1, &status), -EINVAL);
  assert_int_equal(cancel_child_signal(&c, -1), -EINVAL);
  assert_int_equal(cancel_child_signal(&c, 100000), -EINVAL);
  assert_running(&c);
  assert_int_equal(cancel_child_kill(&c, CANCEL_SEC(5), &status), 0);
  assert_signalled(status, SIGTERM);
  assert_no_children();
}

/* ---- One thread per handle -------------------------------------------- */

struct waiter {
  cancel_child *c;
  const cancel_token *tok;
  int status;
};

static int64_t wait_child(void *arg) {
  struct waiter *w = arg;
  return cancel_child_wait(w->tok, w->c, CANCEL_SEC(5), CANCEL_NEVER,
                           &w->status);
}

static bool handle_busy(void *arg) {
  return __atomic_load_n(&((cancel_child *)arg)->busy, __ATOMIC_ACQUIRE) != 0;
}

static void test_second_thread_is_busy(void **state) {
  (void)state;
  unsetenv("CANCEL_ABORT_ON_MISUSE"); /* the misuse line is expected */
  cancel_source *s = new_src("owner");
  /* Shared with the waiter, which a failed assertion leaves running. */
  cancel_child *c = test_shared(sizeof *c);
  spawn_sleep30(c);
  struct waiter *w = test_shared(sizeof *w);
  *w = (struct waiter){.c = c, .tok = TOK(s), .status = -1};
  struct test_waiter tw;
  test_waiter_start(&tw, wait_child, w);
  test_waiter_stop_with(&tw, test_rescue_cancel, s);
  /* No signal exists for "the other thread is inside the call". */
  assert_true(test_wait_until(handle_busy, c, test_tol(CANCEL_SEC(5))));
  int status;
  assert_int_equal(cancel_child_wait(NULL, c, 0, 0, &status), -EBUSY);
  assert_int_equal(cancel_child_kill(c, 0, &status), -EBUSY);
  assert_int_equal(cancel_child_signal(c, SIGKILL), -EBUSY);
  /* The way to stop it from here: cancel the waiter's token. */
  cancel_source_cancel(s);
  test_waiter_end(&tw, test_tol(CANCEL_SEC(5)), NULL, NULL);
  assert_i64_eq(tw.result, -ECANCELED);
  assert_signalled(w->status, SIGTERM);
  cancel_source_unref(s);
  assert_no_children();
}

/* ---- Many children at once -------------------------------------------- */

enum { MANY = 20 };

struct worker {
  int idx;
  cancel_source *src;
  sem_t *spawned;
  cancel_child c;
  pid_t pid;
  int spawn_rc;
  int rc;
  int status;
};

static void *worker_thread(void *arg) {
  struct worker *w = arg;
  char code[16];
  snprintf(code, sizeof code, "exit %d", w->idx);
  /* Every fourth child exits by itself; the others wait to be stopped.
   * Spawned from this thread: spawning is concurrent too. */
  if (w->idx % 4 == 0)
    w->spawn_rc = cancel_child_spawnp(&w->c, "sh",
                                      (char *[]){"sh", "-c", code, NULL}, NULL);
  else
    w->spawn_rc = cancel_child_spawnp(&w->c, "sleep",
                                      (char *[]){"sleep", "30", NULL}, NULL);
  w->pid = w->c.pid;
  sem_post(w->spawned);
  if (w->spawn_rc != 0)
    return NULL;
  w->rc = cancel_child_wait(TOK(w->src), &w->c, CANCEL_SEC(10), CANCEL_NEVER,
                            &w->status);
  return NULL;
}

/* A worker's stop: cancel its token (its child is then stopped). */
static void stop_worker(void *arg) {
  cancel_source_cancel(((struct worker *)arg)->src);
}

static void test_many_children_random_cancel(void **state) {
  (void)state;
  /* Static: what the workers use outlives a failed assertion here; the
   * teardown cancels and joins them. */
  static struct worker w[MANY];
  static sem_t spawned;
  pthread_t th[MANY];
  sem_init(&spawned, 0, 0);
  for (int i = 0; i < MANY; i++) {
    memset(&w[i], 0, sizeof w[i]);
    w[i].idx = i;
    w[i].src = new_src("child");
    w[i].spawned = &spawned;
    w[i].rc = 1;
    th[i] = test_helper_start(worker_thread, &w[i], stop_worker);
  }
  for (int i = 0; i < MANY; i++)
    assert_int_equal(test_sem_wait_ns(&spawned, test_tol(CANCEL_SEC(10))), 0);

  unsigned seed = (unsigned)cancel_now();
  int order[MANY];
  for (int i = 0; i < MANY; i++)
    order[i] = i;
  for (int i = MANY - 1; i > 0; i--) {
    int j = (int)(rand_r(&seed) % (unsigned)(i + 1));
    int t = order[i];
    order[i] = order[j];
    order[j] = t;
  }
  for (int i = 0; i < MANY; i++)
    cancel_source_cancel(w[order[i]].src);
  int64_t last = cancel_now();
  for (int i = 0; i < MANY; i++)
    test_helper_join(th[i]);
  assert_i64_lt(cancel_now() - last, prompt() * 4);

  for (int i = 0; i < MANY; i++) {
    assert_int_equal(w[i].spawn_rc, 0);
    for (int j = 0; j < i; j++)
      assert_int_not_equal(w[i].pid, w[j].pid);
    if (i % 4 == 0) {
      /* Reaped before its token fired, or after (exited by itself in
       * the grace), or stopped by SIGTERM before it got to its exit. */
      if (w[i].rc == 0)
        assert_exited(w[i].status, i);
      else if (w[i].rc == -ECANCELED && WIFSIGNALED(w[i].status))
        assert_signalled(w[i].status, SIGTERM);
      else {
        assert_int_equal(w[i].rc, -ECANCELED);
        assert_exited(w[i].status, i);
      }
    } else {
      assert_int_equal(w[i].rc, -ECANCELED);
      assert_signalled(w[i].status, SIGTERM);
    }
    /* Reaped exactly once: the handle is closed, the pid is not ours. */
    assert_int_equal(w[i].c.pidfd, -1);
    assert_int_equal(cancel_child_wait(NULL, &w[i].c, 0, 0, NULL), -ECHILD);
    assert_reaped(w[i].pid);
    cancel_source_unref(w[i].src);
  }
  assert_no_children();
  sem_destroy(&spawned);
}

static int use_fallback(void **state) {
  (void)state;
  cancel__child_no_pidfd = 1;
  return 0;
}

static int use_pidfd(void **state) {
  (void)state;
  cancel__child_no_pidfd = 0;
  return 0;
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_exit_zero),
      cmocka_unit_test(test_exit_code_and_env),
      cmocka_unit_test(test_cancel_running_child_sigterm),
      cmocka_unit_test(test_cancel_term_ignored_gets_sigkill),
      cmocka_unit_test(test_cancelled_before_the_call),
      cmocka_unit_test(test_deadline_leaves_child_running),
      cmocka_unit_test(test_deadline_passed_exited_child_is_reaped),
      cmocka_unit_test(test_kill_variants),
      cmocka_unit_test(test_signals_do_not_end_waits),
      cmocka_unit_test(test_child_signal_defaults),
      cmocka_unit_test(test_process_group),
      cmocka_unit_test(test_adopt_forked_child),
      cmocka_unit_test(test_nonexistent_program),
      cmocka_unit_test(test_bad_arguments),
      cmocka_unit_test(test_second_thread_is_busy),
      cmocka_unit_test(test_many_children_random_cancel),
  };
  /* Once with pidfds (where the kernel has them), once with the fallback
   * that holds the bare pid. */
  int failed = cmocka_run_group_tests_name("pidfd", tests, use_pidfd, NULL);
  failed +=
      cmocka_run_group_tests_name("no_pidfd", tests, use_fallback, use_pidfd);
  return failed;
}
