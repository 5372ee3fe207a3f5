/*
 * Child processes: spawn, wait with a token, and on cancellation SIGTERM,
 * a grace period, SIGKILL, reap.
 *
 * The handle holds a pidfd.  The pid of an unreaped child cannot be reused,
 * and the handle is the child's only reaper, so between the spawn and the
 * reap the pid, the pidfd and the child's process group id all name the
 * child and nothing else.  The reap (waitid(P_PIDFD)) is the last thing
 * that touches them, and it closes the pidfd in the same step.
 *
 * Waiting is cancel_wait_fd() on the pidfd, which becomes readable when the
 * child exits; the grace period after SIGTERM is the same wait with no
 * token (the token has fired: it must not cut the grace short).
 *
 * Without pidfd_open (Linux before 5.3, or valgrind 3.19, which does not
 * know the call) the handle holds the pid alone: that is just as safe,
 * for the reason above, but there is nothing to poll, so the wait looks
 * with waitid(WNOHANG) between cancellable sleeps of 1 ms growing to
 * POLL_MAX.  A cancellation is still seen at once; an exit up to POLL_MAX
 * late.
 */
#define _GNU_SOURCE
#include "cancel/process.h"
#include "internal.h"

#include <signal.h>
#include <spawn.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

extern char **environ;

#define CHILD_LIVE 0x1u  /* a child is held: not reaped yet */
#define CHILD_GROUP 0x2u /* signals go to the process group -pid */

#define POLL_MIN CANCEL_MSEC(1) /* the no-pidfd fallback's first step */
#define POLL_MAX CANCEL_MSEC(20)

/* The tests set this to run the no-pidfd fallback on a kernel that has
 * pidfds.  Not exported (hidden like every internal symbol). */
int cancel__child_no_pidfd;

#define SPAWN_FLAGS (CANCEL_CHILD_SEARCH_PATH | CANCEL_CHILD_NEW_PGROUP)

/* ---- The handle ------------------------------------------------------- */

static void empty(cancel_child *c) {
  c->pid = 0;
  c->pidfd = -1;
  c->status = 0;
  c->flags = 0;
  st_relaxed(&c->busy, 0);
}

/* One thread per handle: the flag turns a second thread into a loud
 * -EBUSY instead of two reapers racing over one descriptor (the loser
 * would poll, or signal through, a descriptor number that may already
 * belong to something else). */
static bool enter(cancel_child *c, const char *func) {
  if (__atomic_exchange_n(&c->busy, 1, __ATOMIC_ACQUIRE) != 0) {
    cancel__misuse(func, "two threads use one cancel_child at once");
    return false;
  }
  return true;
}

static void leave(cancel_child *c) {
  st_release(&c->busy, 0);
}

/* A pidfd for pid, or -errno (-ENOSYS: the kernel has none). */
static int pidfd_open_(pid_t pid) {
  if (ld_relaxed(&cancel__child_no_pidfd))
    return -ENOSYS;
  long fd = syscall(SYS_pidfd_open, pid, 0);
  return fd < 0 ? -errno : (int)fd;
}

/* ---- Signals ---------------------------------------------------------- */

/* Sends sig to the child, or to its group.  ESRCH is not an error here: a
 * group whose members are all gone is what we wanted. */
static int send_sig(cancel_child *c, int sig) {
  long r;
  if (c->flags & CHILD_GROUP) {
    /* Safe: the leader is not reaped, so its id is still its group's. */
    r = kill(-c->pid, sig);
  } else if (c->pidfd >= 0) {
    r = syscall(SYS_pidfd_send_signal, c->pidfd, sig, NULL, 0);
  } else {
    r = kill(c->pid, sig); /* safe for the same reason */
  }
  if (r < 0 && errno != ESRCH)
    return -errno;
  return 0;
}

/* ---- Reaping ---------------------------------------------------------- */

/* The status word's layout on Linux, which <sys/wait.h>'s W* macros
 * decode: glibc names the encoders, musl only the decoders. */
#ifndef W_EXITCODE
#define W_EXITCODE(ret, sig) ((ret) << 8 | (sig))
#endif
#ifndef WCOREFLAG
#define WCOREFLAG 0x80
#endif

/* A waitid() result as the status word of waitpid(), so that WIFEXITED,
 * WEXITSTATUS, WIFSIGNALED, WTERMSIG and WCOREDUMP work on it. */
static int status_of(const siginfo_t *info) {
  switch (info->si_code) {
  case CLD_EXITED:
    return W_EXITCODE(info->si_status & 0xff, 0);
  case CLD_DUMPED:
    return (info->si_status & 0x7f) | WCOREFLAG;
  default: /* CLD_KILLED: WEXITED reports nothing else */
    return info->si_status & 0x7f;
  }
}

/* Closes the handle after the reap (or after somebody else reaped). */
static void closed(cancel_child *c, int status) {
  if (c->pidfd >= 0)
    close(c->pidfd);
  c->pidfd = -1;
  c->status = status;
  c->flags = 0;
}

/* waitid() on the child, EINTR retried.  Returns 1 when it has exited
 * (reaped, and the handle closed, unless options has WNOWAIT), 0 when it
 * is still running (WNOHANG only), -ECHILD when something else reaped it
 * (the handle is closed: its status is lost), -errno. */
static int reap(cancel_child *c, int options) {
  siginfo_t info;
  for (;;) {
    memset(&info, 0, sizeof info);
    int r = c->pidfd >= 0
                ? waitid(P_PIDFD, (id_t)c->pidfd, &info, WEXITED | options)
                : waitid(P_PID, (id_t)c->pid, &info, WEXITED | options);
    if (r == 0)
      break;
    if (errno == EINTR)
      continue;
    int err = -errno;
    if (err == -ECHILD)
      closed(c, 0);
    return err;
  }
  if (info.si_pid == 0)
    return 0; /* WNOHANG: still running */
  if (!(options & WNOWAIT))
    closed(c, status_of(&info));
  return 1;
}

/* Waits until the child may have exited (> 0: look with reap()), tok
 * fires (-ECANCELED) or deadline passes (-ETIMEDOUT); -errno.  *step is
 * the no-pidfd fallback's polling interval, grown on each call. */
static int wait_exit(const cancel_token *tok, cancel_child *c, int64_t deadline,
                     int64_t *step) {
  if (c->pidfd >= 0)
    return cancel_wait_fd(tok, c->pidfd, POLLIN, deadline);
  int64_t now = cancel_now();
  if (now >= deadline)
    return cancel_token_is_cancelled(tok) ? -ECANCELED : -ETIMEDOUT;
  int64_t until = cancel__deadline_after(now, *step);
  int rc = cancel_sleep_until(tok, until < deadline ? until : deadline);
  if (rc < 0)
    return rc;
  *step = *step >= POLL_MAX / 2 ? POLL_MAX : *step * 2;
  return 1;
}

/* The end of a cancelled wait and of cancel_child_kill(): SIGTERM, the
 * grace, SIGKILL, reap.  Returns 0 once reaped, or -errno. */
static int terminate(cancel_child *c, int64_t grace) {
  int gone = reap(c, WNOHANG | WNOWAIT);
  if (gone < 0)
    return gone;
  if (!gone && grace > 0) {
    int rc = send_sig(c, SIGTERM);
    if (rc < 0)
      return rc;
    /* A stopped child would hold SIGTERM until continued: continue it
     * (systemd does the same). */
    send_sig(c, SIGCONT);
    int64_t until = cancel__deadline_after(cancel_now(), grace);
    /* No token: the one that brought us here has fired, and must not cut
     * the grace short.  An error from the wait (none is expected) ends
     * the grace early rather than never. */
    int64_t step = POLL_MIN;
    for (;;) {
      if ((gone = reap(c, WNOHANG | WNOWAIT)) != 0)
        break;
      if (wait_exit(NULL, c, until, &step) <= 0) {
        gone = reap(c, WNOHANG | WNOWAIT); /* a last look */
        break;
      }
    }
    if (gone < 0)
      return gone;
  }
  /* Still running after the grace (or with none); for a group, whatever
   * is left of it, while the unreaped leader still holds the group id. */
  if (!gone || (c->flags & CHILD_GROUP)) {
    int rc = send_sig(c, SIGKILL);
    if (rc < 0)
      return rc;
  }
  int rc = reap(c, 0);
  return rc < 0 ? rc : 0;
}

/* ---- Spawning --------------------------------------------------------- */

int cancel_child_spawn_ex(cancel_child *c, const char *path, char *const argv[],
                          char *const envp[],
                          const posix_spawn_file_actions_t *actions,
                          const posix_spawnattr_t *attr, unsigned flags) {
  if (c == NULL)
    return -EINVAL;
  empty(c);
  if (path == NULL || argv == NULL || (flags & ~(unsigned)SPAWN_FLAGS) != 0)
    return -EINVAL;

  posix_spawnattr_t own;
  int err;
  if (attr == NULL) {
    /* The defaults: a child that SIGTERM can stop, whatever this thread
     * blocks (a service's signal thread blocks SIGTERM everywhere) or the
     * process ignores (SIGPIPE, SIGXFSZ: as Python's restore_signals). */
    sigset_t none, dfl;
    sigemptyset(&none);
    sigemptyset(&dfl);
    sigaddset(&dfl, SIGTERM);
    sigaddset(&dfl, SIGPIPE);
    sigaddset(&dfl, SIGXFSZ);
    short sflags = POSIX_SPAWN_SETSIGMASK | POSIX_SPAWN_SETSIGDEF;
    if (flags & CANCEL_CHILD_NEW_PGROUP)
      sflags |= POSIX_SPAWN_SETPGROUP; /* group 0: its own */
    if ((err = posix_spawnattr_init(&own)) != 0)
      return -err;
    posix_spawnattr_setflags(&own, sflags);
    posix_spawnattr_setsigmask(&own, &none);
    posix_spawnattr_setsigdefault(&own, &dfl);
    posix_spawnattr_setpgroup(&own, 0);
  } else if (flags & CANCEL_CHILD_NEW_PGROUP) {
    short sflags = 0;
    pid_t pgroup = -1;
    posix_spawnattr_getflags(attr, &sflags);
    posix_spawnattr_getpgroup(attr, &pgroup);
    if (!(sflags & POSIX_SPAWN_SETPGROUP) || pgroup != 0)
      return -EINVAL;
  }

  pid_t pid = 0;
  char *const *env = envp != NULL ? envp : environ;
  const posix_spawnattr_t *use = attr != NULL ? attr : &own;
  /* glibc reports a failed exec here (and reaps that short-lived child
   * itself): on success the program is running. */
  if (flags & CANCEL_CHILD_SEARCH_PATH)
    err = posix_spawnp(&pid, path, actions, use, argv, env);
  else
    err = posix_spawn(&pid, path, actions, use, argv, env);
  if (attr == NULL)
    posix_spawnattr_destroy(&own);
  if (err != 0)
    return -err;

  int fd = pidfd_open_(pid);
  if (fd < 0 && fd != -ENOSYS) {
    /* We cannot hold it, and must not leave it running unowned or as a
     * zombie.  The pid is safe to use: only we can reap it. */
    kill(pid, SIGKILL);
    while (waitpid(pid, NULL, 0) < 0 && errno == EINTR) {
    }
    return fd;
  }
  c->pid = pid;
  c->pidfd = fd < 0 ? -1 : fd; /* -1: the fallback, by pid alone */
  c->flags = CHILD_LIVE | ((flags & CANCEL_CHILD_NEW_PGROUP) ? CHILD_GROUP : 0);
  return 0;
}

int cancel_child_spawn(cancel_child *c, const char *path, char *const argv[],
                       char *const envp[]) {
  return cancel_child_spawn_ex(c, path, argv, envp, NULL, NULL, 0);
}

int cancel_child_spawnp(cancel_child *c, const char *file, char *const argv[],
                        char *const envp[]) {
  return cancel_child_spawn_ex(c, file, argv, envp, NULL, NULL,
                               CANCEL_CHILD_SEARCH_PATH);
}

int cancel_child_adopt(cancel_child *c, pid_t pid) {
  if (c == NULL)
    return -EINVAL;
  empty(c);
  if (pid <= 0)
    return -EINVAL;
  int fd = pidfd_open_(pid);
  if (fd < 0 && fd != -ENOSYS)
    return fd;
  /* Ours and not reaped?  WNOWAIT leaves an exited child reapable. */
  siginfo_t info;
  int rc;
  do {
    memset(&info, 0, sizeof info);
    rc = fd >= 0 ? waitid(P_PIDFD, (id_t)fd, &info, WEXITED | WNOHANG | WNOWAIT)
                 : waitid(P_PID, (id_t)pid, &info, WEXITED | WNOHANG | WNOWAIT);
  } while (rc < 0 && errno == EINTR);
  if (rc < 0) {
    int err = -errno;
    if (fd >= 0)
      close(fd);
    return err;
  }
  c->pid = pid;
  c->pidfd = fd < 0 ? -1 : fd;
  c->flags = CHILD_LIVE;
  return 0;
}

/* ---- Waiting and stopping --------------------------------------------- */

int cancel_child_wait(const cancel_token *tok, cancel_child *c,
                      int64_t grace_ns, int64_t deadline, int *status) {
  if (c == NULL || grace_ns < 0)
    return -EINVAL;
  if (!enter(c, "cancel_child_wait"))
    return -EBUSY;
  int rc;
  if (!(c->flags & CHILD_LIVE)) {
    rc = -ECHILD;
  } else if (cancel_token_is_cancelled(tok)) {
    /* Level-triggered: a token that fired before the call stops the
     * child all the same. */
    rc = terminate(c, grace_ns);
    if (rc == 0)
      rc = -ECANCELED;
  } else {
    int64_t step = POLL_MIN;
    for (;;) {
      /* First (and after every wake-up) see whether it has exited: a
       * child that is gone is reaped even when the deadline has passed. */
      rc = reap(c, WNOHANG);
      if (rc != 0) {
        rc = rc < 0 ? rc : 0;
        break;
      }
      rc = wait_exit(tok, c, deadline, &step);
      if (rc > 0)
        continue;
      if (rc == -ECANCELED) {
        rc = terminate(c, grace_ns);
        if (rc == 0)
          rc = -ECANCELED;
      }
      break; /* -ETIMEDOUT or an error: the child is still held */
    }
  }
  if ((rc == 0 || rc == -ECANCELED) && status != NULL)
    *status = c->status;
  leave(c);
  return rc;
}

int cancel_child_kill(cancel_child *c, int64_t grace_ns, int *status) {
  if (c == NULL || grace_ns < 0)
    return -EINVAL;
  if (!enter(c, "cancel_child_kill"))
    return -EBUSY;
  int rc = (c->flags & CHILD_LIVE) ? terminate(c, grace_ns) : -ECHILD;
  if (rc == 0 && status != NULL)
    *status = c->status;
  leave(c);
  return rc;
}

int cancel_child_signal(cancel_child *c, int sig) {
  if (c == NULL || sig < 0 || sig >= NSIG)
    return -EINVAL;
  if (!enter(c, "cancel_child_signal"))
    return -EBUSY;
  int rc = (c->flags & CHILD_LIVE) ? send_sig(c, sig) : -ECHILD;
  leave(c);
  return rc;
}
