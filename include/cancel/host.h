/*
 * libcancel-host: named background workers, a stopping token, graceful
 * shutdown.  The C counterpart of .NET's generic host with BackgroundService.
 *
 * A host owns a stopping token and a list of named workers.  Each worker
 * runs on a thread of its own until it is done or until the stopping token
 * fires.  The token fires (kind CANCEL_SHUTDOWN, origin the host's name)
 * when:
 *   - the process gets SIGINT or SIGTERM (detail "SIGTERM" / "SIGINT"; the
 *     signals are read from a signalfd on the library's thread, see
 *     cancel/watch.h: no signal handler is installed);
 *   - somebody calls cancel_host_stop(h, detail) (any thread: a worker, an
 *     admin endpoint, a test);
 *   - a worker fails (detail "worker <name> failed"), unless the host keeps
 *     running on failure;
 *   - every worker has returned (detail "all workers returned").
 * Then the host gives the workers, and the shields open in the process
 * (cancel_shields_open(): commits and cleanups past their point of no
 * return), until the shutdown deadline to finish: the moment the stop was
 * requested plus the shutdown timeout (30 s by default, the grace period
 * Kubernetes gives a pod).  Whatever is still running then is named in the
 * log ("worker=poller asked_ms=30012 state=running"), not a bare "timed
 * out", and cancel_host_run() returns CANCEL_HOST_EXIT_TIMEOUT.  A second
 * signal during the shutdown forces the exit at once.
 *
 * The usual main():
 *
 *   int main(void) {
 *     cancel_signals_block();   // first: before ANY thread is created
 *     cancel_host *h;
 *     if (cancel_host_new(&h, "reportd", NULL) < 0)
 *       return 1;
 *     cancel_host_add_worker(h, "poller", poll_jobs, &jobs);
 *     cancel_host_add_worker(h, "http", serve, &srv);
 *     int status = cancel_host_run(h);    // until SIGTERM and the drain
 *     cancel_host_free(h);  // -EBUSY after a timeout: the exit ends them
 *     return status < 0 ? CANCEL_HOST_EXIT_FAILED : status;
 *   }
 *
 * Every event is one logfmt line through the log API (cancel/log.h),
 * component "host": started, worker started / stopped (with its duration),
 * worker failed, stopping (with the reason's fields), the shutdown report,
 * forced exit, stopped.  Route them with cancel_log_set_sink().
 *
 * Under systemd (Type=notify), when NOTIFY_SOCKET is set, the host sends
 * READY=1 once every worker has started and STOPPING=1 when it begins to
 * stop, speaking sd_notify's documented datagram protocol itself (an
 * AF_UNIX SOCK_DGRAM socket; a name starting with '@' is in the abstract
 * namespace): it does not link libsystemd.  A notification that cannot be
 * sent (nobody listens, a "vsock:" address, which is not supported) is
 * logged as a warning and changes nothing else.
 *
 * Linux only.  Link with -lcancel-host -lcancel (pkg-config: cancel-host).
 */
#ifndef CANCEL_HOST_H
#define CANCEL_HOST_H

#include <cancel.h>

#include <stdbool.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================
 * Exit statuses: what cancel_host_run() returns, for main() to return
 * ====================================================================== */

/* Every worker stopped (or finished) cleanly and no shield was left open. */
#define CANCEL_HOST_EXIT_OK 0
/* A worker failed (returned an error, or could not be started); the others
 * stopped in time. */
#define CANCEL_HOST_EXIT_FAILED 1
/* The shutdown deadline passed with a worker still running or a shield
 * still open.  Those workers' threads are left running: exit the process
 * without joining them (cancel_host_free() returns -EBUSY). */
#define CANCEL_HOST_EXIT_TIMEOUT 2
/* A second SIGINT or SIGTERM during the shutdown ended the process at once
 * with _exit(128 + signo): 130 for SIGINT, 143 for SIGTERM, the status a
 * shell reports for a process those signals killed.  cancel_host_run()
 * never returns it: it is what the parent (systemd, a shell, a test) sees. */
#define CANCEL_HOST_EXIT_FORCED(signo) (128 + (signo))

/* The shutdown timeout when the options leave it 0. */
#define CANCEL_HOST_DEFAULT_SHUTDOWN_TIMEOUT CANCEL_SEC(30)

/* ======================================================================
 * Workers
 * ====================================================================== */

/* A worker: runs on its own thread until it is done or `stopping` fires,
 * like BackgroundService.ExecuteAsync.  It passes `stopping` (or a source
 * linked to it) to every wait, and returns:
 *   0 (or a positive value)  done: logged at info;
 *   -ECANCELED               stopped because `stopping` fired: normal
 *                            control flow, logged at info.  -ECANCELED
 *                            while `stopping` has NOT fired (some other
 *                            token cancelled the worker) is a failure;
 *   any other negative errno a failure: logged at error with
 *                            cancel_strerror(); it stops the host unless
 *                            keep_running_on_failure is set, and the host
 *                            exits with CANCEL_HOST_EXIT_FAILED.
 * `stopping` is borrowed (it is the host's: cancel_host_stopping()): valid
 * until the host is freed; work that may outlive the host (another thread)
 * links a source of its own to it.  A worker may call cancel_host_stop()
 * on its own host. */
typedef int cancel_worker_fn(const cancel_token *stopping, void *arg);

/* ======================================================================
 * The host
 * ====================================================================== */

typedef struct cancel_host cancel_host;

/* Options.  A zero-initialised structure (or NULL) gives the defaults. */
typedef struct cancel_host_options {
  /* How long the workers and the open shields get to finish once the stop
   * was requested.  0: CANCEL_HOST_DEFAULT_SHUTDOWN_TIMEOUT (30 s). */
  int64_t shutdown_timeout_ns;
  /* A failing worker is logged and the others keep running (default: the
   * host stops).  cancel_host_run() still returns CANCEL_HOST_EXIT_FAILED
   * in the end. */
  bool keep_running_on_failure;
  /* Do not watch SIGINT/SIGTERM: for tests, and for a program that embeds
   * the host and watches signals itself (it then calls cancel_host_stop). */
  bool no_signals;
  /* A second signal during the shutdown does not force the exit (it is
   * counted and ignored), and the repeat callback of cancel/watch.h is left
   * alone. */
  bool no_force_exit;
} cancel_host_options;

/* Creates a host named `name` (NULL or "": "host"; copied): the stopping
 * token's source is named after it, and it names the host in every log line.
 * Nothing is started and no signal is touched until cancel_host_run().
 * Returns:
 *   0        *hp is the host;
 *   -EINVAL  hp NULL, or opts->shutdown_timeout_ns < 0;
 *   -ENOMEM  no memory.
 * On error *hp is NULL (when hp is not).  Thread-safe. */
CANCEL_API int cancel_host_new(cancel_host **hp, const char *name,
                               const cancel_host_options *opts);

/* Adds a worker named `name` (copied; it names the worker's thread, its
 * log lines and the shutdown report) that will run fn(stopping, arg).
 * Workers start in the order they were added.  Only before
 * cancel_host_run(), from the thread that owns the host.
 * Returns:
 *   0        added;
 *   -EINVAL  h, name or fn is NULL, or name is empty;
 *   -EEXIST  the host has a worker of that name already;
 *   -EBUSY   cancel_host_run() has been called;
 *   -ENOMEM  no memory. */
CANCEL_API int cancel_host_add_worker(cancel_host *h, const char *name,
                                      cancel_worker_fn *fn, void *arg);

/* The stopping token: cancelled with kind CANCEL_SHUTDOWN, origin the
 * host's name, and a detail saying why (see the top of this file).  Link
 * the service's other sources to it (an HTTP server's request sources).
 * Valid from cancel_host_new() until cancel_host_free() frees the host;
 * NULL for NULL.  Thread-safe, O(1). */
CANCEL_API const cancel_token *cancel_host_stopping(const cancel_host *h);

/* The host's shutdown timeout: opts->shutdown_timeout_ns, or
 * CANCEL_HOST_DEFAULT_SHUTDOWN_TIMEOUT when that was 0; 0 for NULL.  A
 * server that runs under the host is told it (cancel/http.h's
 * host_shutdown_timeout_ns), so that its drain follows the host's deadline
 * instead of a second number kept in step by hand.  Fixed at
 * cancel_host_new().  Thread-safe, O(1). */
CANCEL_API int64_t cancel_host_shutdown_timeout(const cancel_host *h);

/* CANCEL_NEVER until the stop is requested; then the absolute time
 * (cancel_now() clock) by which everything must have stopped: when the
 * stopping token fired plus the shutdown timeout.  A server sizes its
 * drain from it.  Set before any callback of the stopping token runs.
 * CANCEL_NEVER for NULL.  Thread-safe. */
CANCEL_API int64_t cancel_host_shutdown_deadline(const cancel_host *h);

/* Requests the stop: cancels the stopping token with kind CANCEL_SHUTDOWN
 * and `detail` (copied; NULL for none), e.g. "admin request".  The first
 * request wins (a signal, a failing worker or an earlier call); later ones
 * change nothing.  A stop requested before cancel_host_run() makes it
 * return at once, starting no worker.  Callbacks on the stopping token run
 * on this thread before it returns (cancel.h's rules).
 * Returns 1 when this call stopped the host, 0 when the stop was requested
 * already, -EINVAL for NULL.  Thread-safe: any thread, a worker, a
 * cancellation callback. */
CANCEL_API int cancel_host_stop(cancel_host *h, const char *detail);

/* Runs the host, blocking the calling thread until it has stopped:
 *   1. unless no_signals: blocks SIGINT and SIGTERM in the calling thread,
 *      watches them (cancel_signals_watch) and, unless no_force_exit, sets
 *      the repeat callback that forces the exit (no_signals touches no
 *      signal mask and no setting of cancel/watch.h);
 *   2. starts each worker on a thread of its own (cancel_thread_create),
 *      in the order they were added; the threads inherit the calling
 *      thread's signal mask.  Every worker runs once, also when the stop
 *      comes while they are being started (it then finds its token
 *      cancelled); a worker whose thread cannot be created is a failure;
 *   3. sends READY=1 to NOTIFY_SOCKET when it is set;
 *   4. waits until the stopping token fires, or every worker returned
 *      (the token is then cancelled with "all workers returned"); a host
 *      without workers waits for the stop (a service whose work runs on
 *      threads of its own, a server's, say);
 *   5. sends STOPPING=1, logs "stopping" with the reason, and waits until
 *      every worker returned AND no shield is open in the process, or
 *      until the shutdown deadline.  cancel_shields_open() counts every
 *      shield of the process (a request handler's commit as well as a
 *      worker's) and is polled every 5 ms while one is open; a shield that
 *      is never destroyed holds the exit until the deadline;
 *   6. past the deadline: logs the report ("shutdown timed out" with the
 *      number of workers running and shields open, then one line per
 *      worker still running with how long ago it was asked to stop);
 *   7. stops watching the signals, clears the repeat callback it set.
 * A second SIGINT/SIGTERM during 4-7 (after the first started the stop)
 * logs "forced exit" and ends the process with _exit(128 + signo) from the
 * library's thread, unless no_force_exit.
 *
 * Signals: a thread that does not block SIGINT/SIGTERM gets their default
 * action, which kills the process, and a thread inherits its creator's
 * mask.  So main() MUST call cancel_signals_block() before it creates ANY
 * thread (a thread pool, a library that starts one), or call
 * cancel_host_run() before any thread exists.  Threads the library starts
 * block every signal.
 *
 * Returns the exit status for main():
 *   CANCEL_HOST_EXIT_OK       everything stopped cleanly (or the stop was
 *                             requested before run: nothing was started);
 *   CANCEL_HOST_EXIT_FAILED   a worker failed or could not be started;
 *   CANCEL_HOST_EXIT_TIMEOUT  the deadline passed first (this wins over
 *                             FAILED): exit without waiting for the workers;
 * or, when nothing was started, a negative errno (the host may then be
 * run again, or freed):
 *   -EINVAL   h is NULL;
 *   -EBUSY    cancel_host_run() was called on this host before (and did
 *             not return a negative errno), or the process watches the
 *             signals already (another host, or cancel_signals_watch: use
 *             no_signals);
 *   -EMFILE, -ENFILE, -ENOMEM  no descriptor or memory for the signalfd;
 *   -EAGAIN   the library's thread could not be started.
 * Call it once per host, from the thread that owns the host (usually the
 * main thread).  Not from a worker. */
CANCEL_API int cancel_host_run(cancel_host *h);

/* Frees the host: its workers' records, their threads (joined), the
 * stopping source.  The stopping token is invalid after it: something that
 * outlives the host links a source of its own to the token (a linked
 * source keeps its parent alive) instead of keeping the token.
 * Returns:
 *   0        freed (also for NULL);
 *   -EBUSY   cancel_host_run() is running, or a worker is still running
 *            after a CANCEL_HOST_EXIT_TIMEOUT: nothing is freed, on
 *            purpose (the worker still uses the host and its token).  The
 *            host stays valid: call cancel_host_free() again once the
 *            workers have returned, or exit the process without freeing
 *            (the memory is then reachable from the worker's thread: a
 *            leak checker does not count it as lost).
 * Thread-safe against workers returning late; not against a concurrent
 * cancel_host_run() or cancel_host_add_worker() misuse on the same host. */
CANCEL_API int cancel_host_free(cancel_host *h);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_HOST_H */
