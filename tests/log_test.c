/*
 * The log sink: logfmt lines, quoting, reasons, levels, the sink switch.
 */
#include "test_util.h"

#include "cancel/log.h"
#include "logfmt.h"

#include <float.h>
#include <limits.h>
#include <math.h>

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

/* ---- Typed fields (CANCEL_LOG, cancel_log_attrs) ------------------------ */

/* The fields after msg=..., as the line holds them. */
static const char *after_msg(const char *line, const char *msg) {
  char head[128];
  snprintf(head, sizeof head, "msg=%s ", msg);
  const char *p = strstr(line, head);
  assert_non_null(p);
  return p + strlen(head);
}

/* The line: a value with a space through cancel_log's format is
 * two fields to every decoder (stage=risk and a key `model`); the same
 * value as a typed field is one field that reads back as written. */
static void test_attrs_stage_risk_model(void **state) {
  (void)state;
  log_capture();
  const char *stage = "risk model";
  cancel_log(CANCEL_LOG_WARN, "reportd", "stage failed", "stage=%s attempt=%d",
             stage, 2);
  struct lf_record r;
  decode_ok(cap.line, &r);
  /* The old path: the decoder reads a field nobody wrote. */
  assert_string_equal(lf_get(&r, "stage"), "risk");
  assert_non_null(lf_get(&r, "model"));
  lf_free(&r);
  CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "stage failed",
             CANCEL_LOG_STR("stage", stage), CANCEL_LOG_I64("attempt", 2));
  assert_string_equal(after_msg(cap.line, "\"stage failed\""),
                      "stage=\"risk model\" attempt=2");
  decode_ok(cap.line, &r);
  assert_true(
      lf_keys_are(&r, (const char *const[]){"ts", "level", "component", "msg",
                                            "stage", "attempt", NULL}));
  assert_string_equal(lf_get(&r, "stage"), stage);
  lf_free(&r);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* Every type's text, exactly as log.h documents it. */
static void test_attrs_types(void **state) {
  (void)state;
  log_capture();
  CANCEL_LOG(CANCEL_LOG_INFO, "test", "types", CANCEL_LOG_STR("s", "plain"),
             CANCEL_LOG_STR("q", "a b"), CANCEL_LOG_STR("e", ""),
             CANCEL_LOG_STR("n", NULL), CANCEL_LOG_I64("i", -42),
             CANCEL_LOG_I64("imin", INT64_MIN), CANCEL_LOG_U64("u", UINT64_MAX),
             CANCEL_LOG_F64("f", 0.1), CANCEL_LOG_F64("g", 1e300),
             CANCEL_LOG_F64("h", -2.5), CANCEL_LOG_F64("z", 0.0),
             CANCEL_LOG_F64("nan", NAN), CANCEL_LOG_F64("inf", -INFINITY),
             CANCEL_LOG_FIXED("x", 3.14159, 2), CANCEL_LOG_FIXED("x0", 2.5, 0),
             CANCEL_LOG_BOOL("t", 7), CANCEL_LOG_BOOL("b", 0),
             CANCEL_LOG_MS("ms", 1234567), CANCEL_LOG_MSD("ms1", 400277000, 1),
             CANCEL_LOG_MSD("ms0", CANCEL_SEC(2), 0),
             CANCEL_LOG_MS("neg", -1500000));
  assert_string_equal(after_msg(cap.line, "types"),
                      "s=plain q=\"a b\" e=\"\" n=\"\" i=-42 "
                      "imin=-9223372036854775808 u=18446744073709551615 "
                      "f=0.1 g=1e+300 h=-2.5 z=0 nan=NaN inf=-Inf x=3.14 x0=2 "
                      "t=true b=false ms=1.235 ms1=400.3 ms0=2000 neg=-1.500");
  CANCEL_LOG(CANCEL_LOG_INFO, "test", "errno",
             CANCEL_LOG_ERRNO("a", -ECANCELED),
             CANCEL_LOG_ERRNO("b", ETIMEDOUT), CANCEL_LOG_ERRNO("c", 0),
             CANCEL_LOG_ERRNO("d", -99999), CANCEL_LOG_ERRNO("e", INT_MIN));
  char want[128];
  snprintf(want, sizeof want, "a=ECANCELED b=ETIMEDOUT c=0 d=-99999 e=%d",
           INT_MIN);
  assert_string_equal(after_msg(cap.line, "errno"), want);
  /* A reason: its fields, the key unused; none when not cancelled. */
  cancel_source *src = new_src("route timeout");
  cancel_reason why;
  cancel_token_reason(TOK(src), &why);
  CANCEL_LOG(CANCEL_LOG_INFO, "test", "reason", CANCEL_LOG_I64("a", 1),
             CANCEL_LOG_REASON(&why), CANCEL_LOG_REASON(NULL),
             CANCEL_LOG_I64("b", 2));
  assert_string_equal(after_msg(cap.line, "reason"), "a=1 b=2");
  cancel_source_cancel_with(src, CANCEL_TIMEOUT, "2s");
  assert_int_equal(cancel_token_reason(TOK(src), &why), 1);
  CANCEL_LOG(CANCEL_LOG_INFO, "test", "reason", CANCEL_LOG_I64("a", 1),
             CANCEL_LOG_REASON(&why), CANCEL_LOG_I64("b", 2));
  assert_string_equal(after_msg(cap.line, "reason"),
                      "a=1 cancel_kind=timeout cancel_origin=\"route timeout\" "
                      "cancel_detail=2s b=2");
  /* Fields kept from cancel_logfmt_reason, as they were written. */
  char kept[256];
  cancel_logfmt_reason(kept, sizeof kept, &why);
  CANCEL_LOG(CANCEL_LOG_INFO, "test", "kept", CANCEL_LOG_LOGFMT(kept),
             CANCEL_LOG_LOGFMT(""), CANCEL_LOG_LOGFMT(NULL),
             CANCEL_LOG_I64("b", 2));
  assert_string_equal(after_msg(cap.line, "kept"),
                      "cancel_kind=timeout cancel_origin=\"route timeout\" "
                      "cancel_detail=2s b=2");
  cancel_source_unref(src);
  /* STRN's own limit, quotes included; an unknown type: key, no value. */
  cancel_log_attr odd[] = {
      CANCEL_LOG_STRN("k", "abcdefghijklmnopqrstuvwxyz", 12),
      {.key = "future", .type = 999},
      CANCEL_LOG_STRN("w", "whole", 12)};
  cancel_log_attrs(CANCEL_LOG_INFO, "test", "odd", odd, 3);
  assert_string_equal(after_msg(cap.line, "odd"),
                      "k=\"abcdefg...\" future=\"\" w=whole");
  /* No fields at all. */
  cancel_log_attrs(CANCEL_LOG_INFO, "test", "none", NULL, 0);
  assert_non_null(strstr(cap.line, " msg=none"));
  assert_string_equal(strstr(cap.line, " msg=none"), " msg=none");
  /* Below the sink's level: nothing. */
  int n = cap.n;
  cancel_log_set_sink(capture, &cap, CANCEL_LOG_INFO);
  CANCEL_LOG(CANCEL_LOG_DEBUG, "test", "hidden", CANCEL_LOG_I64("a", 1));
  assert_int_equal(cap.n, n);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* A double of every magnitude reads back as the same double. */
static void test_attrs_f64_round_trip(void **state) {
  (void)state;
  log_capture();
  const double xs[] = {1.0 / 3,
                       2.0 / 3,
                       1e-310,
                       5e-324,
                       DBL_MAX,
                       -DBL_MIN,
                       123456789012345678.0,
                       0.30000000000000004,
                       100,
                       1e21};
  for (size_t i = 0; i < sizeof xs / sizeof xs[0]; i++) {
    CANCEL_LOG(CANCEL_LOG_INFO, "test", "f", CANCEL_LOG_F64("x", xs[i]),
               CANCEL_LOG_FIXED("y", xs[i], 17));
    struct lf_record r;
    decode_ok(cap.line, &r);
    assert_true(
        lf_keys_are(&r, (const char *const[]){"ts", "level", "component", "msg",
                                              "x", "y", NULL}));
    char *end = NULL;
    assert_true(strtod(lf_get(&r, "x"), &end) == xs[i]);
    assert_int_equal(*end, '\0');
    assert_true(strlen(lf_get(&r, "x")) <= 24);
    lf_free(&r);
  }
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* Hostile text in every string a line takes (component, msg, values,
 * keys): the decoder reads exactly the fields written, each value whole
 * or cut with the marker. */
static void test_attrs_hostile(void **state) {
  (void)state;
  hostile_init();
  log_capture();
  for (int h = 0; h < nhostile; h++) {
    const char *v = hostile[h];
    CANCEL_LOG(CANCEL_LOG_WARN, v, v, CANCEL_LOG_I64("id", 7),
               CANCEL_LOG_STR("path", v), CANCEL_LOG_STRN("short", v, 40),
               CANCEL_LOG_STR("bad key=\"x\"\n", "k"),
               CANCEL_LOG_ERRNO("error", -ECANCELED),
               CANCEL_LOG_BOOL("ok", true));
    struct lf_record r;
    decode_ok(cap.line, &r);
    assert_true(strlen(cap.line) <= CANCEL_LOG_LINE_MAX);
    if (!lf_keys_are(&r, (const char *const[]){
                             "ts", "level", "component", "msg", "id", "path",
                             "short", "bad_key__x__", "error", "ok", NULL}))
      fail_msg("value %d: fields not as written: %.400s", h, cap.line);
    assert_true(lf_value_ok(lf_get(&r, "component"), v));
    assert_true(lf_value_ok(lf_get(&r, "msg"), v));
    assert_true(lf_value_ok(lf_get(&r, "path"), v));
    assert_true(lf_value_ok(lf_get(&r, "short"), v));
    assert_string_equal(lf_get(&r, "id"), "7");
    assert_string_equal(lf_get(&r, "error"), "ECANCELED");
    assert_string_equal(lf_get(&r, "ok"), "true");
    if (strlen(v) > CANCEL_LOG_VALUE_MAX)
      assert_true(lf_value_cut(lf_get(&r, "path"), v));
    lf_free(&r);
    /* The same value in a reason and in kept fields. */
    if (v[0] == '\0')
      continue;
    cancel_source *src = new_src(v);
    cancel_source_cancel_with(src, CANCEL_CLIENT_GONE, v);
    cancel_reason why;
    assert_int_equal(cancel_token_reason(TOK(src), &why), 1);
    static char kept[2048];
    cancel_logfmt_reason(kept, sizeof kept, &why);
    CANCEL_LOG(CANCEL_LOG_INFO, "http", "request", CANCEL_LOG_REASON(&why),
               CANCEL_LOG_LOGFMT(kept), CANCEL_LOG_I64("end", 1));
    decode_ok(cap.line, &r);
    assert_true(strlen(cap.line) <= CANCEL_LOG_LINE_MAX);
    assert_true(lf_keys_are(
        &r,
        (const char *const[]){"ts", "level", "component", "msg", "cancel_kind",
                              "cancel_origin", "cancel_detail", "cancel_kind",
                              "cancel_origin", "cancel_detail", "end", NULL}));
    assert_true(lf_value_ok(lf_get(&r, "cancel_origin"), v));
    assert_true(lf_value_ok(lf_get(&r, "cancel_detail"), v));
    lf_free(&r);
    cancel_source_unref(src);
  }
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
}

/* A line too long for the sink is cut between fields, with
 * truncated=true, wherever the cut falls: in a string, a reason's fields
 * or kept fields. */
static void test_attrs_line_cut(void **state) {
  (void)state;
  hostile_init();
  log_capture();
  const char *big = hostile[8]; /* 10 KB */
  CANCEL_LOG(CANCEL_LOG_ERROR, "test", "big", CANCEL_LOG_STR("a", big),
             CANCEL_LOG_STR("b", big), CANCEL_LOG_STR("c", big),
             CANCEL_LOG_I64("end", 1));
  struct lf_record r;
  decode_ok(cap.line, &r);
  assert_true(
      lf_keys_are(&r, (const char *const[]){"ts", "level", "component", "msg",
                                            "a", "truncated", NULL}));
  assert_true(lf_value_cut(lf_get(&r, "a"), big));
  lf_free(&r);
  /* A reason whose origin, detail and via are long and hostile. */
  cancel_source *parent = new_src(big);
  const cancel_token *p = TOK(parent);
  cancel_source *child = NULL;
  assert_int_equal(cancel_source_new_linked(&child, big, &p, 1), 0);
  cancel_source_cancel_with(parent, CANCEL_TIMEOUT, big);
  cancel_reason why;
  assert_int_equal(cancel_token_reason(TOK(child), &why), 1);
  static char kept[2048];
  cancel_logfmt_reason(kept, sizeof kept, &why);
  static char pad[2100];
  /* Per kind: lines whole, and lines cut after some of the fields that
   * follow pad (the cut inside the reason's or the kept fields). */
  int whole[3] = {0}, inside[3] = {0};
  for (size_t n = 1; n < 2000; n += 3) {
    memset(pad, 'p', n);
    pad[n] = '\0';
    for (int k = 0; k < 3; k++) {
      if (k == 0)
        CANCEL_LOG(CANCEL_LOG_ERROR, "test", "shift",
                   CANCEL_LOG_STR("pad", pad), CANCEL_LOG_REASON(&why),
                   CANCEL_LOG_I64("z", 1));
      else if (k == 1)
        CANCEL_LOG(CANCEL_LOG_ERROR, "test", "shift",
                   CANCEL_LOG_STR("pad", pad), CANCEL_LOG_LOGFMT(kept),
                   CANCEL_LOG_I64("z", 1));
      else
        CANCEL_LOG(CANCEL_LOG_ERROR, "test", "shift",
                   CANCEL_LOG_STR("pad", pad), CANCEL_LOG_STR("q", big),
                   CANCEL_LOG_I64("z", 1));
      assert_true(strlen(cap.line) <= CANCEL_LOG_LINE_MAX);
      if (lf_decode(cap.line, &r) != 0)
        fail_msg("pad %zu, kind %d: not logfmt (%s)", n, k, r.error);
      const char *last = r.f[r.n - 1].key;
      /* Either the whole line, or every field up to the cut then the
       * marker: never a key cut short or a field split. */
      if (strcmp(last, "z") != 0) {
        assert_string_equal(last, "truncated");
        assert_null(lf_get(&r, "z"));
        if (lf_get(&r, "pad") != NULL && r.n > 6)
          inside[k]++;
      } else {
        whole[k]++;
      }
      const char *pv = lf_get(&r, "pad");
      if (pv != NULL && n <= CANCEL_LOG_VALUE_MAX - 2)
        assert_int_equal(strlen(pv), n);
      for (int i = 4; i < r.n - 1; i++) {
        const char *key = r.f[i].key;
        assert_true(strcmp(key, "pad") == 0 || strcmp(key, "q") == 0 ||
                    strncmp(key, "cancel_", 7) == 0);
        if (strcmp(key, "q") == 0 || strcmp(key, "cancel_origin") == 0 ||
            strcmp(key, "cancel_detail") == 0)
          assert_true(lf_value_ok(r.f[i].value, big));
      }
      lf_free(&r);
    }
  }
  for (int k = 0; k < 3; k++) {
    assert_true(whole[k] > 0);
    assert_true(k == 2 || inside[k] > 0); /* a STR is whole or left out */
  }
  cancel_source_unref(child);
  cancel_source_unref(parent);
  cancel_log_set_sink(NULL, NULL, CANCEL_LOG_INFO);
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
      cmocka_unit_test(test_attrs_stage_risk_model),
      cmocka_unit_test(test_attrs_types),
      cmocka_unit_test(test_attrs_f64_round_trip),
      cmocka_unit_test(test_attrs_hostile),
      cmocka_unit_test(test_attrs_line_cut),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
