/* The smallest user of an installed libcancel-host: built by run.sh
 * against the installed headers and libraries, with pkg-config and with
 * find_package(cancel).  One worker waits for the stopping token; another
 * asks the host to stop; the host stops cleanly. */
#include <cancel/host.h>
#include <cancel/log.h>

#include <stdio.h>

static int waiter(const cancel_token *stopping, void *arg) {
  (void)arg;
  return cancel_sleep(stopping, CANCEL_SEC(10)); /* -ECANCELED: normal */
}

static int stopper(const cancel_token *stopping, void *arg) {
  (void)stopping;
  cancel_host_stop(arg, "hello done");
  return 0;
}

int main(void) {
  cancel_host *h;
  cancel_host_options opts = {.no_signals = true};
  int rc;

  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_ERROR); /* quiet: errors only */
  if ((rc = cancel_host_new(&h, "hello", &opts)) != 0) {
    fprintf(stderr, "cancel_host_new: %s\n", cancel_strerror(rc));
    return 1;
  }
  if (cancel_host_add_worker(h, "waiter", waiter, NULL) != 0 ||
      cancel_host_add_worker(h, "stopper", stopper, h) != 0) {
    fprintf(stderr, "cancel_host_add_worker failed\n");
    cancel_host_free(h);
    return 1;
  }
  rc = cancel_host_run(h);
  cancel_reason why;
  cancel_token_reason(cancel_host_stopping(h), &why);
  int kind = why.kind;
  cancel_host_free(h);
  if (rc != CANCEL_HOST_EXIT_OK || kind != CANCEL_SHUTDOWN) {
    fprintf(stderr, "cancel_host_run returned %d, kind %d\n", rc, kind);
    return 1;
  }
  printf("OK\n");
  return 0;
}
