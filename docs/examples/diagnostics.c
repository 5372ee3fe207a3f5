/* docs/examples/diagnostics.c: the snippets of docs/diagnostics.md, as a
 * program (built and run by CTest as docs_diagnostics; exits 0 when the
 * scopes, metrics and log lines behaved). */
#include <cancel.h>
#include <cancel/diag.h>
#include <cancel/log.h>

#include <stdio.h>
#include <string.h>

static int failures;
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "diagnostics.c:%d: %s is false\n", __LINE__, #cond);     \
      failures++;                                                              \
    }                                                                          \
  } while (0)

/* The service's own logger: here, the last line kept for the checks. */
static char last[CANCEL_LOG_LINE_MAX + 1];

static void to_my_logger(int level, const char *line, size_t len, void *arg) {
  (void)arg;
  memcpy(last, line, len + 1); /* runs on the logging thread, serialised */
  fprintf(stderr, "[%s] %s\n", cancel_log_level_name(level), line);
}

/* Work done on the token's behalf, named for the watchdog and metrics. */
static int aggregate(const cancel_token *tok, long rows) {
  CANCEL_SCOPE(tok, "aggregate"); /* ends when the block is left */
  for (long i = 0; i < rows; i++)
    if (i % 1024 == 0 && cancel_token_is_cancelled(tok))
      return -ECANCELED;
  return 0;
}

static void log_cancelled(const char *path, int64_t t0,
                          const cancel_token *tok) {
  cancel_reason why;
  cancel_token_reason(tok, &why);
  CANCEL_LOG(CANCEL_LOG_INFO, "orders", "request cancelled",
             CANCEL_LOG_STR("path", path), /* the client's bytes: quoted */
             CANCEL_LOG_MS("dur_ms", cancel_now() - t0),
             CANCEL_LOG_ERRNO("error", -ECANCELED), CANCEL_LOG_REASON(&why));
}

int main(void) {
  cancel_log_set_sink(to_my_logger, NULL, CANCEL_LOG_DEBUG);
  cancel_metrics before, after;
  cancel_metrics_get(&before);

  cancel_source *req;
  int64_t t0 = cancel_now();
  cancel_source_new(&req, "client 10.0.0.7:5123");
  cancel_source_cancel_with(req, CANCEL_CLIENT_GONE, "peer closed");
  EXPECT(aggregate(cancel_source_token(req), 1L << 20) == -ECANCELED);
  log_cancelled("/orders/7 \"x=1\"", t0, cancel_source_token(req));
  cancel_source_unref(req);

  cancel_metrics_get(&after);
  EXPECT(after.cancellations[CANCEL_CLIENT_GONE] ==
         before.cancellations[CANCEL_CLIENT_GONE] + 1);
  EXPECT(after.overruns == before.overruns + 1); /* the scope ended late */
  EXPECT(strstr(last, "msg=\"request cancelled\" path=\"/orders/7 \\\"x=1\\\"\" "
                     "dur_ms=") != NULL);
  EXPECT(strstr(last, " error=ECANCELED cancel_kind=\"client gone\" "
                     "cancel_origin=\"client 10.0.0.7:5123\" "
                     "cancel_detail=\"peer closed\"") != NULL);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO); /* back to stderr */
  cancel_metrics_write_prometheus(stdout);
  printf("diagnostics: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
