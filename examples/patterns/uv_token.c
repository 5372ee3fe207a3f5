/*
 * A token in a libuv event loop: cancel_token_fd() watched by a uv_poll.
 *
 * An event loop blocks in one place, epoll_wait inside uv_run, and nothing
 * else in the loop can observe a token.  Checking the token from a timer
 * callback (the tempting fix) notices the cancel one tick late, and an
 * idle loop with no timer never notices at all.  Instead, give the loop
 * the token as a descriptor: cancel_token_fd(tok) becomes readable the
 * moment the token fires (from any thread: a timeout on the library's
 * timer thread, a signal, a request's client going away), so uv_run wakes
 * at once and the poll callback stops the loop's work and closes the
 * handles; uv_run then returns because nothing is left to run.
 *
 * The rules that come with the descriptor:
 *   - it belongs to the source: never close it, and close the uv_poll
 *     handle (stop watching) before the last reference to the source is
 *     dropped, which closes the descriptor;
 *   - it stays readable once the token fired (level-triggered): the poll
 *     callback must stop or close the watch, or it is called again on
 *     every loop iteration;
 *   - the callback runs on the loop's thread, so unlike a cancellation
 *     callback it may do the cleanup itself.
 *
 * Here a periodic job ticks every 250 ms under a token with a 600 ms
 * budget; the program prints each tick and how long after the cancel the
 * loop noticed (a tick that checks the token would notice 150 ms late, at
 * the third tick), and exits 0 only when that was prompt.
 *
 * Build: cc uv_token.c $(pkg-config --cflags --libs cancel libuv)
 */
#include <cancel.h>
#include <uv.h>

#include <stdbool.h>
#include <stdio.h>

#define TICK_MS 250
#define BUDGET CANCEL_MSEC(600)
#define PROMPT CANCEL_MSEC(100) /* "at once", generously, for valgrind */

struct job {
  const cancel_token *tok;
  uv_timer_t tick;
  uv_poll_t watch; /* on cancel_token_fd(tok) */
  int ticks;
  int64_t noticed; /* cancel_now() in the poll callback; 0 until then */
};

/* One unit of periodic work.  Work that blocks or loops takes the token
 * too (here it only prints). */
static void on_tick(uv_timer_t *t) {
  struct job *job = t->data;
  printf("tick %d\n", ++job->ticks);
}

/* The token fired: stop the work and close every handle, so that uv_run
 * has nothing left and returns. */
static void on_cancel(uv_poll_t *w, int status, int events) {
  struct job *job = w->data;
  (void)events;
  if (status < 0)
    fprintf(stderr, "uv_poll: %s\n", uv_strerror(status));
  if (job->noticed == 0)
    job->noticed = cancel_now();
  uv_timer_stop(&job->tick);
  uv_close((uv_handle_t *)&job->tick, NULL);
  uv_close((uv_handle_t *)w, NULL); /* also stops the watch */
}

int main(void) {
  struct job job = {0};
  /* Dropped on every return (cancel.h's CANCEL_AUTO_SOURCE): after the
   * loop below is closed, so never under a watch of its descriptor. */
  CANCEL_AUTO_SOURCE cancel_source *src = NULL;
  uv_loop_t loop;
  int rc, fd;

  if ((rc = cancel_source_new_timeout(&src, "nightly-report", NULL, BUDGET)) <
      0) {
    fprintf(stderr, "cancel_source_new_timeout: %s\n", cancel_strerror(rc));
    return 1;
  }
  job.tok = cancel_source_token(src);
  if ((fd = cancel_token_fd(job.tok)) < 0) {
    fprintf(stderr, "cancel_token_fd: %s\n", cancel_strerror(fd));
    return 1;
  }

  if ((rc = uv_loop_init(&loop)) < 0) {
    fprintf(stderr, "uv_loop_init: %s\n", uv_strerror(rc));
    return 1;
  }
  job.tick.data = &job;
  job.watch.data = &job;
  if ((rc = uv_timer_init(&loop, &job.tick)) < 0 ||
      (rc = uv_timer_start(&job.tick, on_tick, TICK_MS, TICK_MS)) < 0 ||
      (rc = uv_poll_init(&loop, &job.watch, fd)) < 0 ||
      (rc = uv_poll_start(&job.watch, UV_READABLE, on_cancel)) < 0) {
    fprintf(stderr, "libuv: %s\n", uv_strerror(rc));
    return 1;
  }

  rc = uv_run(&loop, UV_RUN_DEFAULT); /* returns once every handle closed */
  int closed = uv_loop_close(&loop);

  bool prompt = false;
  cancel_reason why;
  if (rc == 0 && closed == 0 && job.noticed != 0 &&
      cancel_token_reason(job.tok, &why) == 1) {
    char line[160];
    cancel_reason_format(&why, line, sizeof line);
    int64_t took = job.noticed - why.time;
    printf("loop stopped %lld us after \"%s\", after %d ticks\n",
           (long long)(took / 1000), line, job.ticks);
    prompt = took >= 0 && took < PROMPT;
  } else {
    fprintf(stderr,
            "the loop did not end on the cancel (uv_run %d, "
            "uv_loop_close %d)\n",
            rc, closed);
  }
  /* Only now, with the watch closed, may the source (and its descriptor)
   * go: at this return. */
  return prompt ? 0 : 1;
}
