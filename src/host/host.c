/*
 * libcancel-host: named workers on threads of their own, a stopping token
 * cancelled by SIGINT/SIGTERM, a request or a failure, and a shutdown
 * bounded by a deadline that names whatever did not stop.
 *
 * Built only on the public API (cancel.h, cancel/watch.h, cancel/log.h):
 * the host is a user of the library like any service, and lives in a
 * library of its own (libcancel-host) so that a program that has its own
 * main loop does not carry it.
 *
 * Threads and state.  The thread that calls cancel_host_run() (the "main"
 * thread) starts the workers and then waits on `cv`, under `mu`, first
 * with the stopping token (cancel_cond_wait returns -ECANCELED when it
 * fires), then with the shutdown deadline.  A worker's thread runs the
 * worker, logs how it ended, requests the stop if it failed (before it
 * takes `mu`: the cancel wakes the main thread's cancel_cond_wait, which
 * takes `mu` briefly), then records its end under `mu` and signals `cv`.
 * Shields have no notification when they close: while one is open the
 * main thread polls cancel_shields_open() every SHIELD_POLL.
 *
 * A worker that outlives the deadline keeps using the host (its token, `mu`
 * and `cv`), so cancel_host_free() refuses (-EBUSY) while one runs.
 *
 * The forced exit runs on the library's thread (the repeat callback of
 * cancel/watch.h): it logs and calls _exit().  cancel_host_run() stops
 * watching the signals and clears the callback before it returns, and
 * cancel_signals_unwatch() waits for a callback in progress, so the
 * callback never sees a freed host.
 */
#define _GNU_SOURCE
#include "cancel/host.h"
#include "deadline.h"

#include "cancel/log.h"
#include "cancel/watch.h"

#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <signal.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

/* How often the shutdown looks at cancel_shields_open() while a shield is
 * open: the delay a closing shield may add to the exit. */
#define SHIELD_POLL CANCEL_MSEC(5)

/* The longest name or detail in a log line, quotes included (the
 * library quotes and cuts it: CANCEL_LOG_STRN). */
#define QUOTED 159

enum worker_state {
  W_ADDED,    /* not started (yet, or never: the stop came before run) */
  W_RUNNING,  /* its thread runs fn */
  W_RETURNED, /* fn returned; the thread is ending and must be joined */
  W_JOINED,   /* joined */
  W_FAILED_TO_START
};

struct worker {
  struct worker *next; /* in the order added */
  cancel_host *host;
  cancel_worker_fn *fn;
  void *arg;
  cancel_thread thread;
  int state;       /* enum worker_state; mu */
  bool overdue;    /* still running at the deadline (main thread only) */
  int64_t started; /* cancel_now() when its thread was created */
  char name[];
};

enum host_state { H_NEW, H_RUNNING, H_RAN };

struct cancel_host {
  cancel_source *stopping;
  int64_t timeout;
  bool keep_running;
  bool no_signals;
  bool no_force_exit;
  pthread_mutex_t mu;
  pthread_cond_t cv;      /* a worker returned */
  struct worker *workers; /* fixed once run starts */
  struct worker **tail;
  size_t nworkers;
  size_t running; /* threads started whose fn has not returned; mu */
  bool failed;    /* a worker failed or did not start; mu */
  int state;      /* enum host_state; mu */
  char name[];
};

/* ---- Small helpers ---------------------------------------------------- */

static int64_t to_ms(int64_t ns) {
  return ns / CANCEL_MSEC(1);
}

static const cancel_token *stop_token(const cancel_host *h) {
  return cancel_source_token(h->stopping);
}

/* When the stop was requested, CANCEL_NEVER while it was not. */
static int64_t stop_time(const cancel_host *h) {
  cancel_reason r;
  if (cancel_token_reason(stop_token(h), &r) != 1)
    return CANCEL_NEVER;
  return r.time;
}

/* ---- sd_notify, spoken directly ---------------------------------------
 * The protocol (sd_notify(3), "Notes"): one datagram of newline-separated
 * VARIABLE=value lines sent to the AF_UNIX SOCK_DGRAM socket named by
 * $NOTIFY_SOCKET; a name starting with '@' is in the abstract namespace
 * (the '@' stands for the leading NUL byte, and the address length ends
 * the name).  Sent without waiting (MSG_DONTWAIT): a service manager whose
 * queue is full must not hold up a shutdown. */

static int notify_send(const char *path, const char *msg) {
  struct sockaddr_un sa;
  memset(&sa, 0, sizeof sa);
  sa.sun_family = AF_UNIX;
  size_t n = strlen(path);
  bool abstract = path[0] == '@';
  if (!abstract && path[0] != '/')
    return -EAFNOSUPPORT; /* e.g. "vsock:...": not supported */
  /* A path needs its NUL inside sun_path; an abstract name does not. */
  if (n < 2 || n > sizeof sa.sun_path - (abstract ? 0 : 1))
    return -ENAMETOOLONG;
  memcpy(sa.sun_path, path, n);
  if (abstract)
    sa.sun_path[0] = '\0';
  socklen_t len =
      (socklen_t)(offsetof(struct sockaddr_un, sun_path) + n + !abstract);
  int fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  int rc = 0;
  if (sendto(fd, msg, strlen(msg), MSG_NOSIGNAL | MSG_DONTWAIT,
             (const struct sockaddr *)&sa, len) < 0)
    rc = -errno;
  close(fd);
  return rc;
}

/* Tells the service manager `msg` when NOTIFY_SOCKET is set; logs a
 * failure (a warning: the service works without it). */
static void notify(const cancel_host *h, const char *msg) {
  const char *path = getenv("NOTIFY_SOCKET");
  if (path == NULL || path[0] == '\0')
    return;
  int rc = notify_send(path, msg);
  if (rc < 0) {
    CANCEL_LOG(CANCEL_LOG_WARN, "host", "sd_notify failed",
               CANCEL_LOG_STRN("host", h->name, QUOTED),
               CANCEL_LOG_STRN("socket", path, QUOTED),
               CANCEL_LOG_STRN("state", msg, QUOTED),
               CANCEL_LOG_STRN("error", cancel_strerror(rc), QUOTED));
  } else {
    CANCEL_LOG(CANCEL_LOG_DEBUG, "host", "sd_notify",
               CANCEL_LOG_STRN("host", h->name, QUOTED),
               CANCEL_LOG_STRN("socket", path, QUOTED),
               CANCEL_LOG_STRN("state", msg, QUOTED));
  }
}

/* ---- Creating ---------------------------------------------------------- */

int cancel_host_new(cancel_host **hp, const char *name,
                    const cancel_host_options *opts) {
  if (hp == NULL)
    return -EINVAL;
  *hp = NULL;
  cancel_host_options o;
  memset(&o, 0, sizeof o);
  if (opts != NULL)
    o = *opts;
  if (o.shutdown_timeout_ns < 0)
    return -EINVAL;
  if (name == NULL || name[0] == '\0')
    name = "host";
  size_t n = strlen(name);
  cancel_host *h = calloc(1, sizeof *h + n + 1);
  if (h == NULL)
    return -ENOMEM;
  memcpy(h->name, name, n + 1);
  int rc = cancel_source_new(&h->stopping, name);
  if (rc < 0) {
    free(h);
    return rc;
  }
  h->timeout = o.shutdown_timeout_ns != 0
                   ? o.shutdown_timeout_ns
                   : CANCEL_HOST_DEFAULT_SHUTDOWN_TIMEOUT;
  h->keep_running = o.keep_running_on_failure;
  h->no_signals = o.no_signals;
  h->no_force_exit = o.no_force_exit;
  pthread_mutex_init(&h->mu, NULL);
  pthread_cond_init(&h->cv, NULL); /* cancel_cond_wait: CLOCK_MONOTONIC */
  h->tail = &h->workers;
  h->state = H_NEW;
  *hp = h;
  return 0;
}

int cancel_host_add_worker(cancel_host *h, const char *name,
                           cancel_worker_fn *fn, void *arg) {
  if (h == NULL || name == NULL || name[0] == '\0' || fn == NULL)
    return -EINVAL;
  pthread_mutex_lock(&h->mu);
  int state = h->state;
  pthread_mutex_unlock(&h->mu);
  if (state != H_NEW)
    return -EBUSY;
  for (struct worker *w = h->workers; w != NULL; w = w->next)
    if (strcmp(w->name, name) == 0)
      return -EEXIST;
  size_t n = strlen(name);
  struct worker *w = calloc(1, sizeof *w + n + 1);
  if (w == NULL)
    return -ENOMEM;
  memcpy(w->name, name, n + 1);
  w->host = h;
  w->fn = fn;
  w->arg = arg;
  w->state = W_ADDED;
  *h->tail = w;
  h->tail = &w->next;
  h->nworkers++;
  return 0;
}

const cancel_token *cancel_host_stopping(const cancel_host *h) {
  return h != NULL ? stop_token(h) : NULL;
}

int64_t cancel_host_shutdown_timeout(const cancel_host *h) {
  return h != NULL ? h->timeout : 0;
}

int64_t cancel_host_shutdown_deadline(const cancel_host *h) {
  if (h == NULL)
    return CANCEL_NEVER;
  int64_t t = stop_time(h);
  return t == CANCEL_NEVER ? CANCEL_NEVER : cancel__add_sat(t, h->timeout);
}

int cancel_host_stop(cancel_host *h, const char *detail) {
  if (h == NULL)
    return -EINVAL;
  return cancel_source_cancel_with(h->stopping, CANCEL_SHUTDOWN, detail);
}

/* Stops the host because worker w failed (or did not start), unless it
 * keeps running on failure. */
static void stop_for(cancel_host *h, const struct worker *w, const char *what) {
  if (h->keep_running)
    return;
  char detail[256];
  snprintf(detail, sizeof detail, "worker %s %s", w->name, what);
  cancel_host_stop(h, detail);
}

/* ---- A worker's thread -------------------------------------------------- */

static void *worker_main(void *arg) {
  struct worker *w = arg;
  cancel_host *h = w->host;

  /* The thread's name shows in top, gdb and /proc (15 bytes at most). */
  char tname[16];
  snprintf(tname, sizeof tname, "%s", w->name);
  pthread_setname_np(pthread_self(), tname);

  CANCEL_LOG(CANCEL_LOG_INFO, "host", "worker started",
             CANCEL_LOG_STRN("host", h->name, QUOTED),
             CANCEL_LOG_STRN("worker", w->name, QUOTED));
  int rc = w->fn(stop_token(h), w->arg);
  int64_t end = cancel_now();
  int64_t asked = stop_time(h);
  int64_t took = to_ms(end - w->started);
  /* -ECANCELED is the normal answer to the stop, and only to the stop: a
   * worker cancelled by a token of its own while the host runs failed. */
  bool ok = rc >= 0 || (rc == -ECANCELED && asked != CANCEL_NEVER);

  cancel_log_attr a[8];
  size_t n = 0;
  a[n++] = CANCEL_LOG_STRN("host", h->name, QUOTED);
  a[n++] = CANCEL_LOG_STRN("worker", w->name, QUOTED);
  if (ok) {
    a[n++] = CANCEL_LOG_STR("result", rc == -ECANCELED ? "cancelled" : "done");
  } else {
    a[n++] = CANCEL_LOG_I64("code", rc);
    a[n++] = CANCEL_LOG_STRN("error", cancel_strerror(rc), QUOTED);
  }
  a[n++] = CANCEL_LOG_I64("duration_ms", took);
  if (asked != CANCEL_NEVER) {
    a[n++] = CANCEL_LOG_I64("asked_ms", to_ms(end - asked));
    if (end > cancel__add_sat(asked, h->timeout))
      a[n++] = CANCEL_LOG_BOOL("late", true);
  }
  if (ok) {
    cancel_log_attrs(CANCEL_LOG_INFO, "host", "worker stopped", a, n);
  } else {
    cancel_log_attrs(CANCEL_LOG_ERROR, "host", "worker failed", a, n);
    stop_for(h, w, "failed"); /* before taking mu: see the top */
  }

  pthread_mutex_lock(&h->mu);
  w->state = W_RETURNED;
  h->running--;
  if (!ok)
    h->failed = true;
  pthread_cond_broadcast(&h->cv);
  pthread_mutex_unlock(&h->mu);
  return NULL;
}

/* ---- Forced exit (the library's thread) -------------------------------- */

static void force_exit(int signo, unsigned count, void *arg) {
  cancel_host *h = arg;
  char names[512] = "";
  size_t used = 0;
  pthread_mutex_lock(&h->mu);
  for (struct worker *w = h->workers; w != NULL; w = w->next) {
    if (w->state != W_RUNNING || used >= sizeof names)
      continue;
    int n = snprintf(names + used, sizeof names - used, "%s%s",
                     used > 0 ? "," : "", w->name);
    used += n > 0 ? (size_t)n : 0;
  }
  pthread_mutex_unlock(&h->mu);
  int status = CANCEL_HOST_EXIT_FORCED(signo);
  int64_t asked = stop_time(h);
  const char *abbrev = sigabbrev_np(signo);
  char sig[16];
  snprintf(sig, sizeof sig, "SIG%s", abbrev != NULL ? abbrev : "?");
  /* The operator's choice, not a failure of ours: a warning. */
  CANCEL_LOG(
      CANCEL_LOG_WARN, "host", "forced exit",
      CANCEL_LOG_STRN("host", h->name, QUOTED), CANCEL_LOG_STR("signal", sig),
      CANCEL_LOG_U64("signals", count), CANCEL_LOG_I64("status", status),
      CANCEL_LOG_I64("asked_ms",
                     asked == CANCEL_NEVER ? 0 : to_ms(cancel_now() - asked)),
      CANCEL_LOG_STRN("workers_running", names, QUOTED));
  _exit(status);
}

/* ---- Running ------------------------------------------------------------ */

/* Starts every worker, in order, even when the stop comes meanwhile (a
 * worker started then sees its token cancelled and returns at once): each
 * worker added runs once.  Returns how many were started. */
static size_t start_workers(cancel_host *h) {
  size_t started = 0;
  for (struct worker *w = h->workers; w != NULL; w = w->next) {
    pthread_mutex_lock(&h->mu);
    w->state = W_RUNNING;
    h->running++;
    pthread_mutex_unlock(&h->mu);
    w->started = cancel_now();
    int rc = cancel_thread_create(&w->thread, NULL, worker_main, w);
    if (rc == 0) {
      started++;
      continue;
    }
    pthread_mutex_lock(&h->mu);
    w->state = W_FAILED_TO_START;
    h->running--;
    h->failed = true;
    pthread_mutex_unlock(&h->mu);
    CANCEL_LOG(CANCEL_LOG_ERROR, "host", "worker did not start",
               CANCEL_LOG_STRN("host", h->name, QUOTED),
               CANCEL_LOG_STRN("worker", w->name, QUOTED),
               CANCEL_LOG_I64("code", rc),
               CANCEL_LOG_STRN("error", cancel_strerror(rc), QUOTED));
    stop_for(h, w, "did not start");
  }
  return started;
}

/* Waits, under mu, until the stop is requested or no worker runs any more.
 * A host without workers waits for the stop (its service runs on threads
 * of its own, a server's, say). */
static void wait_for_stop(cancel_host *h) {
  const cancel_token *stop = stop_token(h);
  while (h->running > 0 || h->nworkers == 0) {
    if (cancel_cond_wait(stop, &h->cv, &h->mu, CANCEL_NEVER) == -ECANCELED)
      return;
  }
}

/* Waits, under mu, until no worker runs and no shield is open, or until
 * the deadline.  Returns true when the deadline came first, with each
 * worker still running marked overdue. */
static bool wait_for_drain(cancel_host *h, int64_t deadline) {
  for (;;) {
    size_t shields = cancel_shields_open();
    if (h->running == 0 && shields == 0)
      return false;
    int64_t now = cancel_now();
    if (now >= deadline)
      break;
    int64_t until = deadline;
    if (shields > 0 && until - now > SHIELD_POLL)
      until = now + SHIELD_POLL;
    cancel_cond_wait(NULL, &h->cv, &h->mu, until);
  }
  for (struct worker *w = h->workers; w != NULL; w = w->next)
    w->overdue = w->state == W_RUNNING;
  return true;
}

/* The shutdown report: what was still running at the deadline. */
static void report_overdue(cancel_host *h, size_t running, int64_t asked) {
  int64_t now = cancel_now();
  CANCEL_LOG(CANCEL_LOG_ERROR, "host", "shutdown timed out",
             CANCEL_LOG_STRN("host", h->name, QUOTED),
             CANCEL_LOG_I64("timeout_ms", to_ms(h->timeout)),
             CANCEL_LOG_I64("asked_ms", to_ms(now - asked)),
             CANCEL_LOG_U64("workers_running", running),
             CANCEL_LOG_U64("shields_open", cancel_shields_open()));
  for (struct worker *w = h->workers; w != NULL; w = w->next) {
    if (!w->overdue)
      continue;
    CANCEL_LOG(CANCEL_LOG_ERROR, "host", "worker did not stop in time",
               CANCEL_LOG_STRN("host", h->name, QUOTED),
               CANCEL_LOG_STRN("worker", w->name, QUOTED),
               CANCEL_LOG_I64("asked_ms", to_ms(now - asked)),
               CANCEL_LOG_STR("state", "running"),
               CANCEL_LOG_I64("running_ms", to_ms(now - w->started)));
  }
}

/* Sets up the signals (unless no_signals).  Returns 0 or a negative errno
 * from cancel_signals_watch(). */
static int watch_signals(cancel_host *h) {
  if (h->no_signals)
    return 0;
  cancel_signals_block();
  int rc = cancel_signals_watch(h->stopping);
  if (rc < 0)
    return rc;
  /* After the watch succeeded: a host that cannot watch (somebody else
   * does) must not take over that somebody's repeat callback. */
  if (!h->no_force_exit)
    cancel_signals_on_repeat(force_exit, h);
  return 0;
}

static void unwatch_signals(cancel_host *h) {
  if (h->no_signals)
    return;
  /* Unwatch first: it waits for a signal being read right now, after which
   * no repeat callback can start. */
  cancel_signals_unwatch();
  if (!h->no_force_exit)
    cancel_signals_on_repeat(NULL, NULL);
}

int cancel_host_run(cancel_host *h) {
  if (h == NULL)
    return -EINVAL;
  pthread_mutex_lock(&h->mu);
  if (h->state != H_NEW) {
    pthread_mutex_unlock(&h->mu);
    return -EBUSY;
  }
  h->state = H_RUNNING;
  pthread_mutex_unlock(&h->mu);

  int rc = watch_signals(h);
  if (rc < 0) {
    CANCEL_LOG(CANCEL_LOG_ERROR, "host", "cannot watch signals",
               CANCEL_LOG_STRN("host", h->name, QUOTED),
               CANCEL_LOG_I64("code", rc),
               CANCEL_LOG_STRN("error", cancel_strerror(rc), QUOTED));
    pthread_mutex_lock(&h->mu);
    h->state = H_NEW;
    pthread_mutex_unlock(&h->mu);
    return rc;
  }

  /* A stop requested before run starts nothing.  Otherwise the host is
   * "started" even if a worker stops it at once: READY=1 then STOPPING=1
   * is what the service manager expects to see. */
  const cancel_token *stop = stop_token(h);
  if (!cancel_token_is_cancelled(stop)) {
    size_t started = start_workers(h);
    notify(h, "READY=1\nSTATUS=running");
    CANCEL_LOG(CANCEL_LOG_INFO, "host", "started",
               CANCEL_LOG_STRN("host", h->name, QUOTED),
               CANCEL_LOG_U64("workers", started),
               CANCEL_LOG_I64("shutdown_timeout_ms", to_ms(h->timeout)),
               CANCEL_LOG_STR("signals", h->no_signals ? "off" : "watched"));
  }

  pthread_mutex_lock(&h->mu);
  wait_for_stop(h);
  pthread_mutex_unlock(&h->mu);
  /* Every worker returned by itself: the host has nothing left to run,
   * and whatever else watches the token (a server) stops too. */
  cancel_host_stop(h, "all workers returned");

  cancel_reason why;
  cancel_token_reason(stop, &why);
  int64_t deadline = cancel__add_sat(why.time, h->timeout);
  char reason[512], status_msg[600];
  cancel_reason_format(&why, reason, sizeof reason);
  snprintf(status_msg, sizeof status_msg, "STOPPING=1\nSTATUS=stopping: %s",
           reason);
  notify(h, status_msg);
  pthread_mutex_lock(&h->mu);
  size_t running = h->running;
  pthread_mutex_unlock(&h->mu);
  CANCEL_LOG(CANCEL_LOG_INFO, "host", "stopping",
             CANCEL_LOG_STRN("host", h->name, QUOTED), CANCEL_LOG_REASON(&why),
             CANCEL_LOG_I64("timeout_ms", to_ms(h->timeout)),
             CANCEL_LOG_U64("workers_running", running));

  pthread_mutex_lock(&h->mu);
  bool timed_out = wait_for_drain(h, deadline);
  running = h->running;
  bool failed = h->failed;
  pthread_mutex_unlock(&h->mu);
  if (timed_out)
    report_overdue(h, running, why.time);

  /* Join the threads that have ended; the overdue ones are left running
   * (cancel_host_free joins them if they ever return). */
  for (struct worker *w = h->workers; w != NULL; w = w->next) {
    pthread_mutex_lock(&h->mu);
    bool returned = w->state == W_RETURNED;
    pthread_mutex_unlock(&h->mu);
    if (returned &&
        cancel_thread_join(NULL, &w->thread, NULL, CANCEL_NEVER) == 0) {
      pthread_mutex_lock(&h->mu);
      w->state = W_JOINED;
      pthread_mutex_unlock(&h->mu);
    }
  }
  unwatch_signals(h);

  int status = timed_out ? CANCEL_HOST_EXIT_TIMEOUT
               : failed  ? CANCEL_HOST_EXIT_FAILED
                         : CANCEL_HOST_EXIT_OK;
  CANCEL_LOG(status == CANCEL_HOST_EXIT_OK ? CANCEL_LOG_INFO : CANCEL_LOG_WARN,
             "host", "stopped", CANCEL_LOG_STRN("host", h->name, QUOTED),
             CANCEL_LOG_I64("status", status),
             CANCEL_LOG_I64("stop_ms", to_ms(cancel_now() - why.time)),
             CANCEL_LOG_U64("workers_running", running));
  pthread_mutex_lock(&h->mu);
  h->state = H_RAN;
  pthread_mutex_unlock(&h->mu);
  return status;
}

/* ---- Freeing ------------------------------------------------------------ */

int cancel_host_free(cancel_host *h) {
  if (h == NULL)
    return 0;
  pthread_mutex_lock(&h->mu);
  bool busy = h->state == H_RUNNING || h->running > 0;
  pthread_mutex_unlock(&h->mu);
  if (busy)
    return -EBUSY;
  struct worker *w = h->workers;
  while (w != NULL) {
    struct worker *next = w->next;
    /* A worker that returned after the deadline: its thread ends (or has
     * ended) without touching the host again. */
    if (w->state == W_RETURNED)
      cancel_thread_join(NULL, &w->thread, NULL, CANCEL_NEVER);
    free(w);
    w = next;
  }
  pthread_cond_destroy(&h->cv);
  pthread_mutex_destroy(&h->mu);
  cancel_source_unref(h->stopping);
  free(h);
  return 0;
}
