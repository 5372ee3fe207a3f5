/*
 * libcancel: descriptor watches on the library's internal thread.
 *
 * Two things a server needs to learn without a thread of its own, both
 * handled on the one internal thread that also runs the timers (the
 * "reactor", started on first use, joined at exit):
 *
 *   - Hang-up watch: a connection's peer went away while the request is
 *     still being worked on (the work is not reading the socket, so it
 *     would not notice).  The request's source is cancelled with kind
 *     CANCEL_CLIENT_GONE.
 *   - Shutdown signals: SIGINT and SIGTERM, blocked in every thread and
 *     read on the reactor through a signalfd (never in a signal handler),
 *     cancel a source with kind CANCEL_SHUTDOWN; later signals are
 *     counted and reported so that the host can force the exit.
 *
 * Callbacks registered on the sources these cancel run on the reactor
 * thread: the rules of cancel.h apply (short, never blocking).
 *
 * Linux only (epoll, signalfd).  Link with -lcancel.
 */
#ifndef CANCEL_WATCH_H
#define CANCEL_WATCH_H

#include <cancel.h>

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

/* ======================================================================
 * Hang-up watch
 * ====================================================================== */

/* Private: the reactor's record of one watched descriptor (src/reactor.c).
 * It is public only so that a watch can live on the caller's storage. */
struct cancel__fdwatch {
  void (*fn)(void *arg, uint32_t events);
  void *arg;
  int fd;          /* the descriptor given to epoll */
  uint32_t events; /* epoll events asked for */
  uint32_t slot;   /* index in the reactor's table */
  uint32_t gen;    /* generation of that slot; 0 when not registered */
};

/* A hang-up watch.  Private layout: use only the functions below.  It is
 * caller storage (embed it in your connection or request structure):
 * watching allocates nothing per watch.  Zero it before its first use
 * (`cancel_watch w = {0};`, calloc or memset): a zeroed watch is unarmed.
 * After cancel_unwatch() it is unarmed again and may be re-armed. */
typedef struct cancel_watch {
  struct cancel__fdwatch rw; /* registration on the reactor */
  cancel_source *src;        /* referenced while armed */
  int fd;                    /* the watch's own duplicate of the socket */
  uint32_t state;            /* atomic: armed or not */
  uint32_t fired;            /* the hang-up was seen (reactor thread) */
  void (*fn)(void *arg, int reset); /* cancel_watch_hangup_fn's, or NULL */
  void *fn_arg;
} cancel_watch;

/* Watches `fd` (a connected socket; a pipe or any pollable descriptor
 * works too) for the peer going away, and cancels `src` when it does:
 *   - the peer closed or shut down its sending side (EPOLLRDHUP, EPOLLHUP):
 *     kind CANCEL_CLIENT_GONE, detail "peer closed";
 *   - the connection was reset or failed (EPOLLERR, e.g. an RST):
 *     kind CANCEL_CLIENT_GONE, detail "connection reset".
 * Data arriving is never taken for a hang-up: the watch does not ask for
 * EPOLLIN and never reads, so the socket's data and pending error are left
 * for the owner.  A peer that half-closes (shutdown(SHUT_WR)) after its
 * request counts as gone.  Do not watch a socket that gets error-queue
 * notifications (SO_ZEROCOPY, SO_TIMESTAMPING): they raise EPOLLERR and
 * would count as a reset.  A hang-up that happened before the call is seen
 * at once.  One-shot: the watch fires at most once; it stays armed until
 * cancel_unwatch() even after it fired.
 *
 * Descriptor reuse: the watch holds its own duplicate of fd
 * (F_DUPFD_CLOEXEC), so closing fd and getting the same number back for
 * another connection cannot make it act on that connection.  The
 * duplicate also keeps the connection open: closing fd alone does not
 * close the connection while the watch is armed; unwatch first.
 *
 * The watch takes a reference on src (cancel_source_ref) and drops it in
 * cancel_unwatch(): src stays alive while armed even if you drop yours
 * (a caller-storage source's storage MUST stay valid until then).
 * The cancel (and the callbacks registered on src) runs on the library's
 * internal thread.
 *
 * Unwatch (cancel_unwatch) before you resume normal I/O on the connection
 * (e.g. before MHD_resume_connection with libmicrohttpd) and before you
 * close it: a watch is for the time the connection sits idle while the
 * request is worked on.  A source that is cancelled already is watched
 * all the same (a hang-up then changes nothing).
 *
 * Returns:
 *   0        armed;
 *   -EBADF   fd is not an open descriptor (also for fd < 0);
 *   -EPERM   fd cannot be watched (a regular file or a directory);
 *   -EINVAL  w or src is NULL;
 *   -EBUSY   w is armed already (unwatch it first; also for a w that was
 *            never zeroed and happens to look armed);
 *   -EMFILE  no descriptor left for the duplicate (also -ENFILE);
 *   -ENOMEM  no memory (also -ENOSPC: the epoll watch limit,
 *            /proc/sys/fs/epoll/max_user_watches);
 *   -EAGAIN  the internal thread could not be started (or the process is
 *            exiting).
 * On error nothing is armed and no reference is kept.
 * Thread-safe for different watches; a watch MUST NOT be armed and
 * unwatched concurrently from two threads.  May be called from a
 * cancellation callback.
 *
 * After fork(): a watch armed before fork() is not armed in the child (the
 * child's reactor starts empty): it never fires there.  cancel_unwatch()
 * on it in the child releases the child's copies (the duplicate and the
 * reference) and returns 1 (0 if it had fired before the fork). */
CANCEL_API int cancel_watch_hangup(cancel_watch *w, cancel_source *src, int fd);

/* Removes a watch armed by cancel_watch_hangup(), closes its duplicate of
 * the descriptor and drops its reference on the source (which may free
 * the source).  The caller's descriptor is not touched.
 * Returns:
 *   1        it was still armed: it did not fire and never will, so src
 *            was not cancelled by it;
 *   0        it fired: src was cancelled with CANCEL_CLIENT_GONE (by this
 *            watch, unless something else cancelled it first);
 *   -EINVAL  w is NULL or not armed (zeroed and never armed, or unwatched
 *            already: unwatching twice is caught here).
 * When the hang-up is being handled on the internal thread right now
 * (the cancel is running src's callbacks), this waits until that has
 * finished, so on return nothing touches w any more and w may be freed or
 * reused.  Called from a callback that the hang-up itself runs (on the
 * internal thread) it does not wait, and returns 0.
 * Thread-safe for different watches.  May be called from a cancellation
 * callback, with the one rule of cancel_unregister(): do not call it while
 * holding a lock that a callback of src takes. */
CANCEL_API int cancel_unwatch(cancel_watch *w);

/* The same watch, calling fn(arg, reset) on the library's internal thread
 * instead of cancelling a source: reset is 1 when the connection failed
 * (EPOLLERR, e.g. an RST), 0 when the peer closed or shut down its
 * sending side.  For a watch that lives longer than the work it guards
 * (a keep-alive connection's, armed once): fn decides whether there is
 * anything to cancel, so that a peer leaving an idle connection cancels
 * nothing.  fn follows the callback rules of cancel.h (short, never
 * blocking); it may cancel sources.  One-shot like cancel_watch_hangup;
 * cancel_unwatch() removes it (1: fn never ran and never will, 0: it ran
 * or is running; it waits for fn as it waits for a cancel).
 * Returns 0, -EBADF, -EPERM, -EINVAL (w or fn NULL), -EBUSY, -EMFILE,
 * -ENOMEM, -EAGAIN, as cancel_watch_hangup.  Thread-safety and fork() as
 * cancel_watch_hangup. */
CANCEL_API int cancel_watch_hangup_fn(cancel_watch *w, int fd,
                                      void (*fn)(void *arg, int reset),
                                      void *arg);

/* ======================================================================
 * Shutdown signals: SIGINT and SIGTERM through signalfd
 *
 * The usual shape of main():
 *
 *   cancel_signals_block();            // first, before any thread starts
 *   cancel_source *stopping;
 *   cancel_source_new(&stopping, "host");
 *   cancel_signals_on_repeat(force_exit, NULL);   // optional
 *   cancel_signals_watch(stopping);    // SIGTERM -> "shutdown (host SIGTERM)"
 *   ... start workers, pass them cancel_source_token(stopping) ...
 *   ... wait for the workers ...
 *   cancel_signals_unwatch();
 *   cancel_source_unref(stopping);
 *
 * No signal handler is installed, and the signals' dispositions are not
 * changed: the signals stay blocked and the library's thread reads them
 * from a signalfd.  The mask is per thread and inherited by the threads a
 * thread creates: a thread that does not block SIGINT/SIGTERM (one
 * created before cancel_signals_block(), or one that unblocks them) gets
 * the default action, which ends the process.  Signals sent to one thread
 * (pthread_kill, tgkill) stay pending on that thread and are not seen;
 * those sent to the process (kill, Ctrl-C, systemd, docker stop) are.
 * ====================================================================== */

/* Blocks SIGINT and SIGTERM in the calling thread (pthread_sigmask).
 * Call it in main() before creating any thread, so that every thread
 * inherits the mask.  The library's own thread blocks every signal.
 * Returns 0, or -EINVAL (not expected).  Thread-safe (it changes the
 * calling thread's mask only). */
CANCEL_API int cancel_signals_block(void);

/* Starts watching SIGINT and SIGTERM: a signalfd for both is read on the
 * library's internal thread (also blocks them in the calling thread, as
 * cancel_signals_block() does).  The first signal cancels src with kind
 * CANCEL_SHUTDOWN and the signal's name as detail ("SIGTERM", "SIGINT"):
 * "shutdown (host SIGTERM)".  Every signal after the first is counted and
 * reported to the cancel_signals_on_repeat() callback, if one is set; src's
 * reason does not change.  A signal already pending when this is called is
 * handled at once.  The watch takes a reference on src, dropped by
 * cancel_signals_unwatch() (a caller-storage source's storage MUST stay
 * valid until then).  One watch per process.
 * Returns:
 *   0        watching;
 *   -EINVAL  src is NULL;
 *   -EBUSY   already watching (or a watch / unwatch is under way on
 *            another thread);
 *   -EMFILE, -ENFILE, -ENOMEM  no descriptor or memory for the signalfd
 *            or the registration;
 *   -EAGAIN  the internal thread could not be started.
 * The counter of cancel_signals_received() restarts at 0.  Thread-safe.
 *
 * After fork(): the child is not watching (its internal thread starts
 * afresh and the registration is gone), but the library still thinks it
 * is: call cancel_signals_unwatch() in the child (it releases the child's
 * copies and returns 0), then cancel_signals_watch() again if the child
 * wants it. */
CANCEL_API int cancel_signals_watch(cancel_source *src);

/* Sets (fn != NULL) or clears (fn == NULL) the callback told about every
 * signal after the first: fn(signo, count, arg) with count the number of
 * signals received so far including this one (2 for the second).  The
 * host's usual use: a second Ctrl-C forces the exit.  fn runs on the
 * library's internal thread, one call at a time; it MUST be short and MUST
 * NOT block; it may call _exit() or exit() (the library's exit-time
 * cleanup does not wait for its own thread), and cancel_signals_unwatch().
 * The setting survives unwatch and watch.  Returns 0.  Thread-safe. */
CANCEL_API int cancel_signals_on_repeat(void (*fn)(int signo, unsigned count,
                                                   void *arg),
                                        void *arg);

/* The number of SIGINT/SIGTERM signals read since the last
 * cancel_signals_watch() (0 before any).  Standard signals do not queue:
 * two SIGTERMs sent before the first was read count once.  Thread-safe. */
CANCEL_API unsigned cancel_signals_received(void);

/* Stops watching: unregisters and closes the signalfd and drops the
 * reference on the source.  The signals stay blocked (a signal arriving
 * later stays pending; unblock them with pthread_sigmask to restore their
 * default action, which a pending signal then takes at once).  When the
 * internal thread is reading a signal right now (running src's callbacks
 * or the repeat callback) this waits until it has finished, except when
 * called from one of those callbacks.
 * Returns 0, -EINVAL (not watching), -EBUSY (a watch or unwatch is under
 * way on another thread).  Thread-safe. */
CANCEL_API int cancel_signals_unwatch(void);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_WATCH_H */
