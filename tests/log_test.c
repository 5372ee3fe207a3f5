/*
 * The log sink: logfmt lines, quoting, reasons, levels, the sink switch.
 */
#include "test_util.h"

#include "cancel/log.h"
#include "logfmt.h"

struct captured {
  int n;
  int level;
  char line[8192];
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
  /* The escapes of a JSON string: \u00XX, not \x01 (no decoder reads it). */
  assert_string_equal(b, "\"a=\\\"b\\\"\\\\\\n\\u0001\"");
  cancel_logfmt_quote(b, sizeof b, "\x7f\xff");
  assert_string_equal(b, "\"\\u007f\\ufffd\"");
  /* Truncation: returns the length needed, writes a whole value. */
  char s[6];
  assert_int_equal(cancel_logfmt_quote(s, sizeof s, "x y z w"), 9);
  assert_string_equal(s, "\"...\"");
  char t[10];
  assert_int_equal(cancel_logfmt_quote(t, sizeof t, "abcdefghijkl"), 12);
  assert_string_equal(t, "\"abcd...\"");
  assert_int_equal(cancel_logfmt_quote(NULL, 0, "a b"), 5);
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

/* A reason that came through a shield whose grace expired: the log line
 * keeps the shield's note, as cancel_reason_format does, and both say the
 * same path (issue 12: the logfmt fields dropped the note). */
static void test_reason_fields_keep_grace_note(void **state) {
  (void)state;
  cancel_source *host = new_src("host");
  cancel_source *drain = NULL;
  assert_int_equal(
      cancel_source_new_shield(&drain, "drain", TOK(host), CANCEL_MSEC(20)), 0);
  const cancel_token *d = TOK(drain);
  cancel_source *client = NULL;
  assert_int_equal(cancel_source_new_linked(&client, "client 10.0.0.7:5123",
                                            &d, 1),
                   0);
  cancel_source_cancel_with(host, CANCEL_SHUTDOWN, "SIGTERM");
  assert_int_equal(cancel_sleep(TOK(client), test_tol(CANCEL_SEC(5))),
                   -ECANCELED);
  cancel_reason r;
  assert_int_equal(cancel_token_reason(TOK(client), &r), 1);
  char b[512], human[512];
  int n = cancel_logfmt_reason(b, sizeof b, &r);
  assert_int_equal((size_t)n, strlen(b));
  assert_string_equal(b, "cancel_kind=shutdown cancel_origin=host "
                         "cancel_detail=SIGTERM cancel_via=\"drain (grace "
                         "20ms expired)>client 10.0.0.7:5123\"");
  assert_true(cancel_reason_format(&r, human, sizeof human) > 0);
  assert_string_equal(human, "shutdown (host SIGTERM) via drain (grace 20ms "
                             "expired) -> client 10.0.0.7:5123");
  cancel_source_unref(client);
  cancel_source_unref(drain);
  cancel_source_unref(host);
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

/* ---- Hostile values, read back by a logfmt decoder (tests/logfmt.h) ---- */

/* The values a client can put into a line: each one must decode to itself
 * (invalid UTF-8 bytes as U+FFFD), or to a prefix of itself and "...". */
static char *hostile[16];
static int nhostile;

static void hostile_init(void) {
  if (nhostile > 0)
    return;
  static char quotes[301], ctl[40], big[10 * 1024 + 1], cut4[64];
  memset(quotes, '"', 300);
  /* Every control byte but NUL, and DEL. */
  int k = 0;
  for (int c = 1; c < 0x20; c++)
    ctl[k++] = (char)c;
  ctl[k++] = 0x7f;
  ctl[k] = '\0';
  /* 10 KB of everything at once. */
  static const char piece[] =
      "a\t\"b\\=\n\x01\xff\xe2\x9c\x93 \xf0\x9f\x98\x80";
  size_t o = 0;
  while (o + sizeof piece < sizeof big) {
    memcpy(big + o, piece, sizeof piece - 1);
    o += sizeof piece - 1;
  }
  big[o] = '\0';
  /* 4-byte characters after one ASCII byte: every cut lands inside one
   * for some room. */
  strcpy(cut4, "x");
  for (int j = 0; j < 12; j++)
    strcat(cut4, "\xf0\x9f\x98\x80");
  char *v[] = {
      "GET\tlevel=error\tstatus=200",
      "line one\nts=now level=error msg=forged",
      "a=b c=d",
      quotes,
      "back\\slash\\\\ and \\\" escaped quote",
      ctl,
      /* invalid UTF-8: a lone continuation, an overlong NUL, a surrogate,
       * a cut 3-byte sequence, beyond U+10FFFF, 0xff */
      "\x80 \xc0\x80 \xed\xa0\x80 \xe2\x82 \xf4\x90\x80\x80 \xff",
      "h\xc3\xa9llo \xe2\x9c\x93 \xf0\x9f\x98\x80",
      big,
      cut4,
      "",
      "plain",
      "it's",
  };
  for (size_t j = 0; j < sizeof v / sizeof v[0]; j++)
    hostile[nhostile++] = v[j];
}

/* Decodes line into r, failing the test with the decoder's reason. */
static void decode_ok(const char *line, struct lf_record *r) {
  if (lf_decode(line, r) != 0)
    fail_msg("not logfmt (%s): %.300s", r->error, line);
}

/* Every hostile value quoted with room to spare decodes to itself; with
 * less room it is cut inside its quotes, on a character boundary, with
 * the marker, and the buffer always holds one whole value. */
static void test_quote_hostile(void **state) {
  (void)state;
  hostile_init();
  static char b[64 * 1024], line[64 * 1024 + 8];
  for (int h = 0; h < nhostile; h++) {
    const char *v = hostile[h];
    int need = cancel_logfmt_quote(b, sizeof b, v);
    assert_int_equal((size_t)need, strlen(b));
    snprintf(line, sizeof line, "k=%s x=1", b);
    struct lf_record r;
    decode_ok(line, &r);
    assert_true(lf_keys_are(&r, (const char *const[]){"k", "x", NULL}));
    char *want = lf_norm(v);
    if (strcmp(r.f[0].value, want) != 0)
      fail_msg("value %d does not round-trip: %.300s", h, b);
    free(want);
    lf_free(&r);
    /* Every room from 6 up to past the whole value. */
    size_t upto = (size_t)need + 2 < 400 ? (size_t)need + 2 : 400;
    for (size_t room = 6; room <= upto; room++) {
      char *small = malloc(room);
      int n = cancel_logfmt_quote(small, room, v);
      assert_int_equal(n, need);
      assert_true(strlen(small) < room);
      snprintf(line, sizeof line, "k=%s x=1", small);
      if (lf_decode(line, &r) != 0)
        fail_msg("value %d in %zu bytes is not logfmt (%s): %s", h, room,
                 r.error, small);
      assert_true(lf_keys_are(&r, (const char *const[]){"k", "x", NULL}));
      if ((size_t)need < room)
        assert_string_equal(small, b);
      else if (!lf_value_cut(r.f[0].value, v))
        fail_msg("value %d in %zu bytes: not a marked cut: %s", h, room, small);
      lf_free(&r);
      free(small);
    }
  }
}

/* The 4-byte character at the limit: the cut keeps it whole or drops it,
 * never a part of it. */
static void test_quote_cut_utf8(void **state) {
  (void)state;
  const char *v = "x \xf0\x9f\x98\x80\xf0\x9f\x98\x80"; /* quoted: space */
  char b[16];
  /* `"x ` is 3 bytes, each emoji 4, the marker and quote 4, the NUL 1. */
  cancel_logfmt_quote(b, 12, v);
  assert_string_equal(b, "\"x \xf0\x9f\x98\x80...\"");
  cancel_logfmt_quote(b, 11, v);
  assert_string_equal(b, "\"x ...\"");
  assert_int_equal(cancel_logfmt_quote(b, 13, v), 12);
  assert_string_equal(b, v[0] == 'x' ? "\"x \xf0\x9f\x98\x80\xf0\x9f\x98\x80\""
                                     : "");
}

static struct captured cap;

static void log_capture(void) {
  memset(&cap, 0, sizeof cap);
  cancel_log_set_sink(capture, &cap, CANCEL_LOG_DEBUG);
}

/* cancel_log with hostile component, msg and (quoted) field values: the
 * decoder reads back exactly the fields written. */
static void test_log_hostile(void **state) {
  (void)state;
  hostile_init();
  log_capture();
  /* 128 + 512 + 1024 bytes of values: the line holds them all. */
  static char q[1024];
  for (int h = 0; h < nhostile; h++) {
    const char *v = hostile[h];
    cancel_logfmt_quote(q, sizeof q, v);
    cancel_log(CANCEL_LOG_WARN, v, v, "id=7 path=%s status=200", q);
    struct lf_record r;
    decode_ok(cap.line, &r);
    assert_true(
        lf_keys_are(&r, (const char *const[]){"ts", "level", "component", "msg",
                                              "id", "path", "status", NULL}));
    assert_string_equal(lf_get(&r, "level"), "warn");
    assert_true(lf_value_ok(lf_get(&r, "component"), v));
    assert_true(lf_value_ok(lf_get(&r, "msg"), v));
    assert_true(lf_value_ok(lf_get(&r, "path"), v));
    assert_string_equal(lf_get(&r, "status"), "200");
    lf_free(&r);
  }
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* A caller that forgot to quote cannot end the line: its control bytes and
 * bytes that are not UTF-8 reach the sink as '?'. */
static void test_log_unquoted_scrubbed(void **state) {
  (void)state;
  log_capture();
  cancel_log(CANCEL_LOG_WARN, "test", "careless", "k=%s z=1",
             "a\nts=x\rb\x01\xff\xe2\x82");
  assert_string_equal(strstr(cap.line, " k="), " k=a?ts=x?b???? z=1");
  struct lf_record r;
  decode_ok(strstr(cap.line, " z="), &r);
  lf_free(&r);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* A line longer than the sink's buffer is cut at a field boundary, with
 * truncated=true: never inside a quoted value or an escape. */
static void test_log_line_cut(void **state) {
  (void)state;
  hostile_init();
  log_capture();
  static char a[1024], b[1024], c[1024];
  const char *v = hostile[8]; /* 10 KB */
  cancel_logfmt_quote(a, sizeof a, v);
  cancel_logfmt_quote(b, sizeof b, v);
  cancel_logfmt_quote(c, sizeof c, v);
  /* Three 1 KB fields: the third cannot fit in 2047 bytes. */
  cancel_log(CANCEL_LOG_ERROR, "test", "big", "a=%s b=%s c=%s end=1", a, b, c);
  assert_true(strlen(cap.line) <= CANCEL_LOG_LINE_MAX);
  struct lf_record r;
  decode_ok(cap.line, &r);
  assert_true(
      lf_keys_are(&r, (const char *const[]){"ts", "level", "component", "msg",
                                            "a", "truncated", NULL}));
  assert_true(lf_value_cut(lf_get(&r, "a"), v));
  assert_string_equal(lf_get(&r, "truncated"), "true");
  lf_free(&r);
  /* For every cut point the line stays logfmt: shift the fields by one
   * byte at a time. */
  static char pad[2100];
  for (size_t p = 1500; p < 2060; p += 7) {
    memset(pad, 'p', p);
    pad[p] = '\0';
    cancel_log(CANCEL_LOG_ERROR, "test", "shift", "pad=%s q=%s z=1", pad, b);
    assert_true(strlen(cap.line) <= CANCEL_LOG_LINE_MAX);
    if (lf_decode(cap.line, &r) != 0)
      fail_msg("pad %zu: not logfmt (%s)", p, r.error);
    const char *t = lf_get(&r, "truncated");
    assert_non_null(t);
    assert_string_equal(r.f[r.n - 1].key, "truncated");
    const char *pv = lf_get(&r, "pad");
    if (pv != NULL)
      assert_int_equal(strlen(pv), p);
    assert_null(lf_get(&r, "z"));
    lf_free(&r);
  }
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* cancel_log_fields quotes for the caller: hostile values, a hostile key,
 * 10 KB values cut at CANCEL_LOG_VALUE_MAX, a line cut at a field. */
static void test_log_fields(void **state) {
  (void)state;
  hostile_init();
  log_capture();
  for (int h = 0; h < nhostile; h++) {
    const char *v = hostile[h];
    cancel_log_field f[] = {
        {"method", v}, {"path", v}, {"bad key=x\t", "k"}, {"n", NULL}};
    cancel_log_fields(CANCEL_LOG_INFO, "http", "request", f, 4);
    struct lf_record r;
    decode_ok(cap.line, &r);
    if (strlen(v) > CANCEL_LOG_VALUE_MAX) {
      /* Two values of 1 KB do not fit in one line: the second is left
       * out, with every later field. */
      assert_true(lf_keys_are(
          &r, (const char *const[]){"ts", "level", "component", "msg", "method",
                                    "truncated", NULL}));
      assert_true(lf_value_cut(lf_get(&r, "method"), v));
      assert_true(strlen(cap.line) <= CANCEL_LOG_LINE_MAX);
      lf_free(&r);
      continue;
    }
    assert_true(lf_keys_are(
        &r, (const char *const[]){"ts", "level", "component", "msg", "method",
                                  "path", "bad_key_x_", "n", NULL}));
    assert_true(lf_value_ok(lf_get(&r, "method"), v));
    assert_true(lf_value_ok(lf_get(&r, "path"), v));
    assert_string_equal(lf_get(&r, "n"), "");
    lf_free(&r);
  }
  const char *big = hostile[8];
  cancel_log_field f[] = {{"a", big}, {"b", big}, {"c", big}};
  cancel_log_fields(CANCEL_LOG_INFO, "http", "request", f, 3);
  struct lf_record r;
  decode_ok(cap.line, &r);
  assert_true(
      lf_keys_are(&r, (const char *const[]){"ts", "level", "component", "msg",
                                            "a", "truncated", NULL}));
  lf_free(&r);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* A reason whose names and detail are hostile (a source named after a
 * client's path, a detail from a header): its fields decode to exactly
 * cancel_kind, cancel_origin, cancel_detail and cancel_via, values whole
 * or cut with the marker; a small buffer holds whole fields only. */
static void test_reason_hostile(void **state) {
  (void)state;
  hostile_init();
  for (int h = 0; h < nhostile; h++) {
    const char *v = hostile[h];
    if (v[0] == '\0')
      continue; /* an empty detail is no detail */
    cancel_source *parent = new_src(v);
    const cancel_token *p = TOK(parent);
    cancel_source *child = NULL;
    assert_int_equal(cancel_source_new_linked(&child, v, &p, 1), 0);
    cancel_source_cancel_with(parent, CANCEL_TIMEOUT, v);
    cancel_reason why;
    assert_int_equal(cancel_token_reason(TOK(child), &why), 1);
    static char b[4096], line[4200];
    int n = cancel_logfmt_reason(b, sizeof b, &why);
    assert_int_equal((size_t)n, strlen(b));
    snprintf(line, sizeof line, "%s after=1", b);
    struct lf_record r;
    decode_ok(line, &r);
    assert_true(
        lf_keys_are(&r, (const char *const[]){"cancel_kind", "cancel_origin",
                                              "cancel_detail", "cancel_via",
                                              "after", NULL}));
    assert_string_equal(lf_get(&r, "cancel_kind"), "timeout");
    assert_true(lf_value_ok(lf_get(&r, "cancel_origin"), v));
    assert_true(lf_value_ok(lf_get(&r, "cancel_detail"), v));
    assert_true(lf_value_ok(lf_get(&r, "cancel_via"), v));
    lf_free(&r);
    /* Every buffer size: whole fields, never a cut one. */
    for (size_t len = 1; len <= (size_t)n + 1; len += 5) {
      char *sb = malloc(len);
      assert_int_equal(cancel_logfmt_reason(sb, len, &why), n);
      assert_true(strlen(sb) < len);
      snprintf(line, sizeof line, "%s after=1", sb);
      if (lf_decode(line, &r) != 0)
        fail_msg("value %d, reason in %zu bytes: not logfmt (%s): %s", h, len,
                 r.error, sb);
      assert_string_equal(r.f[r.n - 1].key, "after");
      lf_free(&r);
      free(sb);
    }
    cancel_source_unref(child);
    cancel_source_unref(parent);
  }
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_quote),
      cmocka_unit_test(test_reason_fields),
      cmocka_unit_test(test_reason_fields_keep_grace_note),
      cmocka_unit_test(test_sink_and_levels),
      cmocka_unit_test(test_default_sink_stderr),
      cmocka_unit_test(test_quote_hostile),
      cmocka_unit_test(test_quote_cut_utf8),
      cmocka_unit_test(test_log_hostile),
      cmocka_unit_test(test_log_line_cut),
      cmocka_unit_test(test_log_unquoted_scrubbed),
      cmocka_unit_test(test_log_fields),
      cmocka_unit_test(test_reason_hostile),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
