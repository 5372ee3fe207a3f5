/*
 * A service's main() on libcancel-host: named workers, one stopping token,
 * a graceful shutdown that finishes what must not be cut in half.
 *
 *   - "ticker" does a small unit of work every 100 ms and waits WITH the
 *     stopping token (cancel_sleep): it stops the moment the host does.
 *   - "flusher" collects records while the service runs.  When the host
 *     stops, it writes the last batch under a shield: a token that ignores
 *     the stop, for no longer than the host's shutdown deadline
 *     (cancel_host_shutdown_deadline), so the batch is written whole or the
 *     worker says it was not.
 *
 * In production SIGTERM starts the shutdown (systemd, Kubernetes, docker
 * stop, Ctrl-C); a second one forces the exit.  Here the ticker asks for
 * the stop itself after five ticks (cancel_host_stop), so the program ends
 * on its own.  The host's log lines (logfmt, standard error) show each
 * worker starting and stopping and why the host stopped.  The program
 * exits 0 only when both workers stopped cleanly and the batch was
 * written whole.
 */
#include <cancel.h>
#include <cancel/host.h>
#include <cancel/watch.h>

#include <stdbool.h>
#include <stdio.h>

struct ticker {
  cancel_host *host;
  int ticks;
};

static int ticker(const cancel_token *stopping, void *arg) {
  struct ticker *t = arg;
  for (;;) {
    int rc = cancel_sleep(stopping, CANCEL_MSEC(100));
    if (rc < 0)
      return rc; /* -ECANCELED: the host is stopping; normal, not an error */
    printf("ticker: tick %d\n", ++t->ticks);
    if (t->ticks == 5)
      cancel_host_stop(t->host, "demo over"); /* stands in for SIGTERM */
  }
}

struct flusher {
  cancel_host *host;
  int pending; /* records collected, not yet written */
  int written;
  bool whole; /* the last batch was written whole */
};

/* Writes the pending records, 10 ms each, every write observing tok. */
static int write_batch(const cancel_token *tok, struct flusher *f) {
  while (f->pending > 0) {
    int rc = cancel_sleep(tok, CANCEL_MSEC(10)); /* stands in for a write */
    if (rc < 0)
      return rc;
    f->pending--;
    f->written++;
  }
  return 0;
}

static int flusher(const cancel_token *stopping, void *arg) {
  struct flusher *f = arg;
  /* Collect a record every 30 ms until the host stops. */
  while (cancel_sleep(stopping, CANCEL_MSEC(30)) == 0)
    f->pending++;

  /* The point of no return: the batch is written under a shield, whose
   * token ignores the stop for the time the host still gives us. */
  int64_t grace = cancel_host_shutdown_deadline(f->host) - cancel_now();
  cancel_source *shield;
  int rc = cancel_source_new_shield(&shield, "last batch", stopping,
                                    grace > 0 ? grace : 1);
  if (rc < 0)
    return rc;
  printf("flusher: stopping; writing the last %d records under a shield "
         "(grace %lld ms)\n",
         f->pending, (long long)(grace / CANCEL_MSEC(1)));
  rc = write_batch(cancel_source_token(shield), f);
  cancel_source_unref(shield);
  if (rc < 0) {
    /* The grace ran out: records are lost.  That is a failure (logged at
     * error by the host), not the normal end of a stop. */
    fprintf(stderr, "flusher: %d records not written\n", f->pending);
    return -ETIMEDOUT;
  }
  f->whole = true;
  printf("flusher: last batch written (%d records in all)\n", f->written);
  return -ECANCELED; /* stopped because the host stopped */
}

int main(void) {
  /* First, before any thread exists: every thread inherits the mask, and
   * SIGINT/SIGTERM are read by the host instead of killing the process. */
  cancel_signals_block();

  /* Static: they must outlive main() if a worker outlived the deadline. */
  static struct ticker t;
  static struct flusher f;
  cancel_host *h;
  cancel_host_options opts = {.shutdown_timeout_ns = CANCEL_SEC(5)};
  int rc = cancel_host_new(&h, "host_worker", &opts);
  if (rc < 0) {
    fprintf(stderr, "cancel_host_new: %s\n", cancel_strerror(rc));
    return 1;
  }
  t.host = h;
  f.host = h;
  if ((rc = cancel_host_add_worker(h, "ticker", ticker, &t)) < 0 ||
      (rc = cancel_host_add_worker(h, "flusher", flusher, &f)) < 0) {
    fprintf(stderr, "cancel_host_add_worker: %s\n", cancel_strerror(rc));
    cancel_host_free(h);
    return 1;
  }

  int status = cancel_host_run(h); /* until the stop and the drain */
  if (status < 0) {
    fprintf(stderr, "cancel_host_run: %s\n", cancel_strerror(status));
    cancel_host_free(h);
    return 1;
  }
  if (cancel_host_free(h) == -EBUSY)
    return status; /* a worker is stuck (TIMEOUT): exit without it */

  printf("exit status %d: %d ticks, %d records written, last batch %s\n",
         status, t.ticks, f.written, f.whole ? "whole" : "cut");
  if (status == CANCEL_HOST_EXIT_OK && !f.whole)
    return 1;
  return status;
}
