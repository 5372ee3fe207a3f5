/*
 * The log sink: logfmt lines, quoting, reasons, levels, the sink switch.
 */
#include "test_util.h"

#include "cancel/log.h"

struct captured {
  int n;
  int level;
  char line[4096];
};

static void capture(int level, const char *line, size_t len, void *arg) {
  struct captured *c = arg;
  c->n++;
  c->level = level;
  assert_int_equal(strlen(line), len);
  snprintf(c->line, sizeof c->line, "%s", line);
}

static void test_quote(void **state) {
  (void)state;
  char b[128];
  assert_int_equal(cancel_logfmt_quote(b, sizeof b, "plain"), 5);
  assert_string_equal(b, "plain");
  cancel_logfmt_quote(b, sizeof b, "two words");
  assert_string_equal(b, "\"two words\"");
  cancel_logfmt_quote(b, sizeof b, "");
  assert_string_equal(b, "\"\"");
  cancel_logfmt_quote(b, sizeof b, NULL);
  assert_string_equal(b, "\"\"");
  cancel_logfmt_quote(b, sizeof b, "a=\"b\"\\\n\x01");
  assert_string_equal(b, "\"a=\\\"b\\\"\\\\\\n\\x01\"");
  /* Truncation: returns the length needed, writes what fits. */
  char s[6];
  assert_int_equal(cancel_logfmt_quote(s, sizeof s, "x y z w"), 9);
  assert_string_equal(s, "\"x y ");
}

static void test_reason_fields(void **state) {
  (void)state;
  char b[512];
  assert_int_equal(cancel_logfmt_reason(b, sizeof b, NULL), 0);
  assert_string_equal(b, "");
  cancel_source *parent = new_src("route timeout");
  const cancel_token *p = TOK(parent);
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, "request 17", &p, 1), 0);
  cancel_source_cancel_with(parent, CANCEL_TIMEOUT, "2s");
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(child), &r), 1);
  int n = cancel_logfmt_reason(b, sizeof b, &r);
  assert_int_equal((size_t)n, strlen(b));
  assert_string_equal(b, "cancel_kind=timeout cancel_origin=\"route timeout\" "
                         "cancel_detail=2s cancel_via=\"request 17\"");
  cancel_source_unref(child);
  cancel_source_unref(parent);
}

static void test_sink_and_levels(void **state) {
  (void)state;
  struct captured c = {0};
  cancel_log_set_sink(capture, &c, CANCEL_LOG_INFO);
  assert_false(cancel_log_enabled(CANCEL_LOG_DEBUG));
  assert_true(cancel_log_enabled(CANCEL_LOG_WARN));
  cancel_log(CANCEL_LOG_DEBUG, "test", "hidden", NULL);
  assert_int_equal(c.n, 0);
  cancel_log(CANCEL_LOG_WARN, "http", "request timed out", "id=%d status=%d",
             17, 504);
  assert_int_equal(c.n, 1);
  assert_int_equal(c.level, CANCEL_LOG_WARN);
  assert_true(strncmp(c.line, "ts=", 3) == 0);
  assert_non_null(strstr(c.line, " level=warn component=http "
                                 "msg=\"request timed out\" id=17 status=504"));
  assert_null(strchr(c.line, '\n'));
  /* A line far too long is cut, not overflowed. */
  char big[5000];
  memset(big, 'x', sizeof big - 1);
  big[sizeof big - 1] = '\0';
  cancel_log(CANCEL_LOG_ERROR, "test", "big", "v=%s", big);
  assert_int_equal(c.n, 2);
  assert_true(strlen(c.line) <= 2048);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
  assert_string_equal(cancel_log_level_name(CANCEL_LOG_ERROR), "error");
  assert_string_equal(cancel_log_level_name(7), "level");
}

/* The default sink writes whole lines to standard error. */
static void test_default_sink_stderr(void **state) {
  (void)state;
  int p[2];
  assert_int_equal(pipe(p), 0);
  int saved = dup(STDERR_FILENO);
  assert_true(saved >= 0);
  assert_int_equal(dup2(p[1], STDERR_FILENO), STDERR_FILENO);
  cancel_log(CANCEL_LOG_INFO, "test", "to stderr", "k=v");
  assert_int_equal(dup2(saved, STDERR_FILENO), STDERR_FILENO);
  close(saved);
  close(p[1]);
  char buf[512];
  ssize_t n = read(p[0], buf, sizeof buf - 1);
  close(p[0]);
  assert_true(n > 0);
  buf[n] = '\0';
  assert_non_null(strstr(buf, "msg=\"to stderr\" k=v\n"));
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_quote),
      cmocka_unit_test(test_reason_fields),
      cmocka_unit_test(test_sink_and_levels),
      cmocka_unit_test(test_default_sink_stderr),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
