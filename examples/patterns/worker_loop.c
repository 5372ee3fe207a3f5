/*
 * A background worker that sleeps between iterations WITH the token: the
 * classic "forgot to pass the token to the delay", fixed.
 *
 * The broken version checks the token, but only between sleeps:
 *
 *   while (!cancel_token_is_cancelled(tok)) {
 *     flush_metrics();
 *     sleep(5);   // deaf: a cancel that lands here waits up to 5 s
 *   }
 *
 * A shutdown that arrives during the sleep (and with a sleep of 5 s and
 * work of a millisecond, that is nearly always) is noticed only when the
 * sleep ends: every deploy takes up to one interval longer, and a host
 * with a shutdown timeout shorter than the interval reports the worker as
 * stuck, or kills it.  usleep, nanosleep, pthread_cond_timedwait and
 * poll(NULL, 0, ms) are all deaf the same way.  The fix is one word: the
 * delay takes the token, cancel_sleep(tok, interval), and returns
 * -ECANCELED the moment the token fires, whatever is left of the interval.
 *
 * Here the worker flushes every 500 ms; the process's stopping token is a
 * timeout source that fires after 600 ms, 100 ms into the worker's second
 * sleep.  The program prints how long the worker took to stop after the
 * cancel (microseconds; the broken version would take the 400 ms left of
 * its sleep) and exits 0 only when that was prompt.
 */
#include <cancel.h>

#include <stdio.h>

#define INTERVAL CANCEL_MSEC(500)
#define STOP_AFTER CANCEL_MSEC(600)
#define PROMPT CANCEL_MSEC(100) /* "at once", generously, for valgrind */

struct worker {
  cancel_source *stop; /* a reference owned by the worker thread */
  int flushes;
  int64_t sleep_end; /* when the interrupted sleep would have ended */
  int64_t stopped;   /* cancel_now() when the loop ended */
};

/* One unit of work.  Real work takes the token too and passes it down. */
static int flush_metrics(const cancel_token *tok, int n) {
  (void)tok;
  printf("worker: flush #%d\n", n);
  return 0;
}

static void *worker_main(void *arg) {
  struct worker *w = arg;
  const cancel_token *tok = cancel_source_token(w->stop);
  int rc;
  for (;;) {
    if ((rc = flush_metrics(tok, ++w->flushes)) < 0)
      break;
    w->sleep_end = cancel_now() + INTERVAL;
    rc = cancel_sleep(tok, INTERVAL); /* the fix: the delay takes the token */
    if (rc == -ECANCELED)
      break; /* normal control flow, not an error: stop here */
  }
  w->stopped = cancel_now();
  /* The thread kept the source beyond the call that lent it: it holds a
   * reference, and drops it when done. */
  cancel_source_unref(w->stop);
  return NULL;
}

int main(void) {
  static struct worker w; /* static: outlives main if the join gives up */
  static cancel_thread thread;
  /* main's reference, dropped on every return (cancel.h's cleanup
   * helpers); the worker holds one of its own. */
  CANCEL_AUTO_SOURCE cancel_source *stop = NULL;
  int rc;

  /* Stands in for the process's shutdown token (SIGTERM, a host). */
  if ((rc = cancel_source_new_timeout(&stop, "shutdown", NULL, STOP_AFTER)) <
      0) {
    fprintf(stderr, "cancel_source_new_timeout: %s\n", cancel_strerror(rc));
    return 1;
  }
  w.stop = cancel_source_ref(stop);
  if ((rc = cancel_thread_create(&thread, NULL, worker_main, &w)) < 0) {
    fprintf(stderr, "cancel_thread_create: %s\n", cancel_strerror(rc));
    cancel_source_unref(w.stop);
    return 1;
  }

  /* Shutdown waits for the worker, but not forever (a host's shutdown
   * timeout): -ETIMEDOUT would name a worker that ignored its token. */
  rc = cancel_thread_join(NULL, &thread, NULL, cancel_now() + CANCEL_SEC(5));
  if (rc < 0) {
    fprintf(stderr, "worker did not stop: %s\n", cancel_strerror(rc));
    return 1;
  }

  cancel_reason why;
  char line[160] = "";
  if (cancel_token_reason(cancel_source_token(stop), &why) != 1) {
    fprintf(stderr, "the worker stopped without a cancel\n");
    return 1;
  }
  cancel_reason_format(&why, line, sizeof line);
  int64_t took = w.stopped - why.time;
  int64_t left = w.sleep_end - why.time; /* what plain sleep() would add */
  printf("worker: stopped %lld us after \"%s\" (%lld ms before its sleep "
         "would have ended), after %d flushes\n",
         (long long)(took / 1000), line,
         (long long)(left > 0 ? left / 1000000 : 0), w.flushes);
  return took >= 0 && took < PROMPT ? 0 : 1;
}
