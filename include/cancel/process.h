/*
 * libcancel: child processes, cancellable.
 *
 * Start a program, wait for it with a token, and when the token fires stop
 * it the way a service manager does: SIGTERM, a grace period, SIGKILL,
 * reap.  The child is held by a process descriptor (pidfd_open(2), Linux
 * 5.4 or later), so a signal can never reach another process that reused
 * the pid, waiting is a poll() on that descriptor next to the token, and no
 * SIGCHLD handler is needed.  Every call that returns a status has reaped
 * the child: nothing is left as a zombie.
 *
 * Where pidfd_open is missing (older kernels; valgrind 3.19 does not know
 * it) the handle holds the bare pid, which is as safe since only the
 * handle reaps it, and waits by checking the child between cancellable
 * sleeps (1 ms growing to 20 ms): cancellation and deadlines are seen as
 * promptly, an exit up to 20 ms late.
 *
 * What the process must allow:
 *   - SIGCHLD MUST NOT be ignored (SIG_IGN or SA_NOCLDWAIT make the kernel
 *     reap children by itself, and their status is lost: -ECHILD);
 *   - nothing else may reap the child (waitpid(-1, ...), a SIGCHLD handler
 *     that reaps everything): the handle is the child's only reaper.
 *
 * A cancel_child is caller storage, like a cancel_reg: no allocation.  One
 * handle is used by one thread at a time (a second thread calling into the
 * same handle meanwhile is misuse: it gets -EBUSY and a line on stderr).
 * Different handles are independent: any number of threads may spawn and
 * wait for their own children at once.
 */
#ifndef CANCEL_PROCESS_H
#define CANCEL_PROCESS_H

#include <cancel.h>

#include <spawn.h>
#include <stdint.h>
#include <sys/types.h>

#ifdef __cplusplus
extern "C" {
#endif

/* A child process held by the caller.  Read `pid` and `status`; the other
 * fields are private.  A zero-filled handle holds no child (waiting on it
 * returns -ECHILD). */
typedef struct cancel_child {
  pid_t pid;      /* the child's process id, kept after the reap (for logs);
                     0 when spawning failed */
  int pidfd;      /* the process descriptor; -1 when no child is held, or
                     when the kernel has no pidfd_open */
  int status;     /* waitpid(2)-style status, valid once reaped */
  uint32_t flags; /* private */
  uint32_t busy;  /* private: a thread is using the handle; atomic */
} cancel_child;

/* Flags for cancel_child_spawn_ex(). */
enum {
  /* Look `path` up in PATH when it has no slash (posix_spawnp). */
  CANCEL_CHILD_SEARCH_PATH = 1u << 0,
  /* The child leads a new process group, and every signal this API sends
   * goes to the whole group: a shell script and the programs it started
   * are stopped together.  On cancellation, whatever is left of the group
   * once the leader has exited (or the grace period ended) gets SIGKILL
   * before the leader is reaped, so nothing of it keeps running.  A member
   * that moved to another group or session is not reached. */
  CANCEL_CHILD_NEW_PGROUP = 1u << 1
};

/* Starts `path` with posix_spawn(3) and holds it in *c.  argv is the
 * argument vector (NULL-terminated, argv[0] the program's name); envp the
 * environment (NULL-terminated), or NULL for the caller's `environ`.
 * The child starts with an empty signal mask and with SIGTERM, SIGPIPE and
 * SIGXFSZ at their default action, whatever the parent blocked or ignored
 * (a service that blocks SIGTERM for its signal thread, or ignores
 * SIGPIPE, must not pass that on: cancellation relies on SIGTERM).  Its
 * descriptors are the caller's, except those marked close-on-exec; the
 * process descriptor itself is close-on-exec.
 * Returns:
 *   0        started; c->pid and the handle are set (the program has been
 *            executed: an exec failure is reported here, not as exit 127);
 *   -EINVAL  c, path or argv is NULL;
 *   -ENOENT, -EACCES, -ENOEXEC, ...  the exec failed (nothing is left
 *            behind: no child, no descriptor);
 *   -EAGAIN, -ENOMEM  no process could be made;
 *   -EMFILE, -ENFILE, -ENOMEM  no process descriptor for the child: it
 *            was killed and reaped again.
 * On every error c holds no child.  Thread-safe (for different handles). */
CANCEL_API int cancel_child_spawn(cancel_child *c, const char *path,
                                  char *const argv[], char *const envp[]);

/* cancel_child_spawn() looking `file` up in PATH when it has no slash. */
CANCEL_API int cancel_child_spawnp(cancel_child *c, const char *file,
                                   char *const argv[], char *const envp[]);

/* cancel_child_spawn() with posix_spawn's file actions (redirect the
 * child's stdin/stdout to pipes, close descriptors; may be NULL) and
 * attributes, and CANCEL_CHILD_* flags.
 * attr NULL gives the defaults described at cancel_child_spawn().  A
 * caller's attr is used as it is: its signal mask and defaults are the
 * caller's choice (set POSIX_SPAWN_SETSIGMASK with an empty mask if the
 * calling thread blocks SIGTERM).  With CANCEL_CHILD_NEW_PGROUP and a
 * caller's attr, that attr MUST set POSIX_SPAWN_SETPGROUP with group 0.
 * Returns as cancel_child_spawn(), and -EINVAL also for an unknown flag or
 * an attr that contradicts CANCEL_CHILD_NEW_PGROUP. */
CANCEL_API int cancel_child_spawn_ex(cancel_child *c, const char *path,
                                     char *const argv[], char *const envp[],
                                     const posix_spawn_file_actions_t *actions,
                                     const posix_spawnattr_t *attr,
                                     unsigned flags);

/* Takes over a child the caller started itself (fork(2), vfork, clone):
 * `pid` MUST be a child of this process that nobody has reaped yet.  From
 * now on only the handle reaps it.
 * Returns:
 *   0        held;
 *   -EINVAL  c NULL or pid <= 0;
 *   -ESRCH   no such process (already reaped; -ECHILD without pidfds);
 *   -ECHILD  pid is not a child of this process;
 *   -EMFILE, -ENFILE, -ENOMEM  from pidfd_open (the child is left alone:
 *            it is still the caller's).
 * On every error c holds no child.  Thread-safe (for different handles). */
CANCEL_API int cancel_child_adopt(cancel_child *c, pid_t pid);

/* Waits until the child exits, observing `tok` and `deadline`.
 *   - The child exits: it is reaped, its status goes to *status (may be
 *     NULL) and c->status, the handle is closed; returns 0.
 *   - tok fires (also when it had fired before the call): the child is
 *     stopped: SIGTERM (then SIGCONT, so that a stopped child can act on
 *     it), up to grace_ns for it to exit, then SIGKILL if it is still
 *     there (grace_ns == 0: SIGKILL at once, no SIGTERM), and reaped;
 *     *status says how it ended (WIFSIGNALED with WTERMSIG SIGTERM or
 *     SIGKILL, or its own exit if it handled SIGTERM).  Returns
 *     -ECANCELED.  This part observes neither tok (it has fired) nor
 *     deadline: it takes up to grace_ns, plus the time the kernel needs to
 *     end the killed process.  A child that has already exited is just
 *     reaped, without signals (with CANCEL_CHILD_NEW_PGROUP, the rest of
 *     its group still gets SIGKILL).
 *   - deadline passes first: returns -ETIMEDOUT and the child is left
 *     running and held: wait again, or cancel_child_kill() it.  A deadline
 *     already passed makes this a non-blocking check (0 if it has exited).
 * Signals delivered to the calling thread never end the wait early.
 * Returns 0, -ECANCELED, -ETIMEDOUT, and:
 *   -EINVAL  c NULL, grace_ns < 0 (CANCEL_NEVER waits for ever);
 *   -ECHILD  the handle holds no child (never spawned, spawn failed, or
 *            already reaped by an earlier call), or something other than
 *            this handle reaped it (SIGCHLD ignored, waitpid(-1)): the
 *            status is lost and the handle is closed;
 *   -EBUSY   another thread is using this handle (misuse, reported);
 *   -EPERM   the child may not be signalled any more (it became a
 *            set-user-ID program): it is still held;
 *   -errno   from poll(2) (-ENOMEM), or -EMFILE / -ENFILE: no
 *            descriptor for the calling thread's wake eventfd (see
 *            "Waiting" in cancel.h); the child is still held.
 * *status is written only for 0 and -ECANCELED.  One thread at a time per
 * handle; cancelling tok from any thread (or a callback) is the way for
 * another thread to stop the child. */
CANCEL_API int cancel_child_wait(const cancel_token *tok, cancel_child *c,
                                 int64_t grace_ns, int64_t deadline,
                                 int *status);

/* Stops the child now: the cancellation part of cancel_child_wait()
 * (SIGTERM, up to grace_ns, SIGKILL, reap; grace_ns == 0: SIGKILL at
 * once), with no token.  A child that has already exited is just reaped
 * (its group, with CANCEL_CHILD_NEW_PGROUP, still gets SIGKILL).
 * Returns 0 (reaped; *status, may be NULL, says how it ended), -EINVAL (c
 * NULL, grace_ns < 0), -ECHILD, -EBUSY, -EPERM as cancel_child_wait().
 * One thread at a time per handle. */
CANCEL_API int cancel_child_kill(cancel_child *c, int64_t grace_ns,
                                 int *status);

/* Sends signal `sig` to the child (its group with CANCEL_CHILD_NEW_PGROUP),
 * through its process descriptor: never to a process that reused its pid.
 * sig 0 checks that it has not been reaped.  Returns 0 (also when it has
 * exited but is not reaped yet), -EINVAL (c NULL, bad sig), -ECHILD (no
 * child held), -EBUSY (another thread is in a call on this handle, e.g.
 * waiting: it may reap the child at any moment; cancel its token
 * instead), -EPERM.  One thread at a time per handle. */
CANCEL_API int cancel_child_signal(cancel_child *c, int sig);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_PROCESS_H */
