/*
 * Reasons: cancel_token_reason, cancel_token_kind, cancel_kind_name and
 * cancel_reason_format, including the via path of linked sources.
 */
#include "test_util.h"

static void test_reason_live_token(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reason r;
  assert_int_equal(cancel_source_new(&src, "live"), 0);
  memset(&r, 0x33, sizeof r);
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 0);
  assert_int_equal(r.kind, CANCEL_NONE);
  memset(&r, 0x33, sizeof r);
  assert_int_equal(cancel_token_reason(NULL, &r), 0);
  assert_int_equal(r.kind, CANCEL_NONE);
  cancel_source_unref(src);
}

static void test_reason_null_out(void **state) {
  (void)state;
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "x"), 0);
  assert_int_equal(cancel_token_reason(cancel_source_token(src), NULL),
                   -EINVAL);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(cancel_token_reason(cancel_source_token(src), NULL),
                   -EINVAL);
  cancel_source_unref(src);
}

static void test_reason_fields(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reason r;
  assert_int_equal(cancel_source_new(&src, "db-query"), 0);
  int64_t before = cancel_now();
  assert_int_equal(cancel_source_cancel_with(src, CANCEL_TIMEOUT, "2s"), 1);
  int64_t after = cancel_now();
  memset(&r, 0x44, sizeof r);
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "db-query");
  assert_string_equal(r.detail, "2s");
  assert_i64_ge(r.time, before);
  assert_i64_le(r.time, after);
  assert_int_equal(r.via_len, 0);
  assert_int_equal(r.via_skipped, 0);

  /* Unnamed origin, no detail: "" for both (never NULL). */
  cancel_source *anon;
  assert_int_equal(cancel_source_new(&anon, NULL), 0);
  assert_int_equal(cancel_source_cancel(anon), 1);
  assert_int_equal(cancel_token_reason(cancel_source_token(anon), &r), 1);
  assert_int_equal(r.kind, CANCEL_REQUESTED);
  assert_non_null(r.origin);
  assert_non_null(r.detail);
  assert_string_equal(r.origin, "");
  assert_string_equal(r.detail, "");
  cancel_source_unref(anon);
  cancel_source_unref(src);
}

static void test_token_kind(void **state) {
  (void)state;
  static const int kinds[] = {CANCEL_REQUESTED, CANCEL_TIMEOUT,
                              CANCEL_CLIENT_GONE, CANCEL_SHUTDOWN,
                              CANCEL_USER + 9};
  for (size_t i = 0; i < sizeof kinds / sizeof kinds[0]; i++) {
    cancel_source *src;
    assert_int_equal(cancel_source_new(&src, "k"), 0);
    assert_int_equal(cancel_token_kind(cancel_source_token(src)), CANCEL_NONE);
    assert_int_equal(cancel_source_cancel_with(src, kinds[i], NULL), 1);
    assert_int_equal(cancel_token_kind(cancel_source_token(src)), kinds[i]);
    cancel_source_unref(src);
  }
  cancel_source *src;
  assert_int_equal(cancel_source_new(&src, "k"), 0);
  assert_int_equal(cancel_source_cancel(src), 1);
  assert_int_equal(cancel_token_kind(cancel_source_token(src)),
                   CANCEL_REQUESTED);
  cancel_source_unref(src);
  assert_int_equal(cancel_token_kind(NULL), CANCEL_NONE);
}

static void test_kind_name(void **state) {
  (void)state;
  assert_string_equal(cancel_kind_name(CANCEL_NONE), "none");
  assert_string_equal(cancel_kind_name(CANCEL_REQUESTED), "requested");
  assert_string_equal(cancel_kind_name(CANCEL_TIMEOUT), "timeout");
  assert_string_equal(cancel_kind_name(CANCEL_CLIENT_GONE), "client gone");
  assert_string_equal(cancel_kind_name(CANCEL_SHUTDOWN), "shutdown");
  assert_string_equal(cancel_kind_name(CANCEL_USER), "user");
  assert_string_equal(cancel_kind_name(CANCEL_USER + 1), "user");
  assert_string_equal(cancel_kind_name(INT32_MAX), "user");
  assert_string_equal(cancel_kind_name(CANCEL_SHUTDOWN + 1), "invalid");
  assert_string_equal(cancel_kind_name(50), "invalid");
  assert_string_equal(cancel_kind_name(CANCEL_USER - 1), "invalid");
  assert_string_equal(cancel_kind_name(-1), "invalid");
  assert_string_equal(cancel_kind_name(INT32_MIN), "invalid");
}

/* ---- Formatting ------------------------------------------------------- */

/* Formats tok's reason into a fresh buffer and checks the snprintf
 * contract on the way: the return value is the string's length. */
static void format_token(const cancel_token *tok, char *buf, size_t len) {
  cancel_reason r;
  assert_int_equal(cancel_token_reason(tok, &r), 1);
  int n = cancel_reason_format(&r, buf, len);
  assert_true(n >= 0);
  assert_true((size_t)n < len);
  assert_int_equal(strlen(buf), (size_t)n);
}

static void test_format_timeout_via_request(void **state) {
  (void)state;
  cancel_source *db, *req;
  char buf[256];
  assert_int_equal(cancel_source_new(&db, "db-query"), 0);
  assert_int_equal(cancel_source_cancel_with(db, CANCEL_TIMEOUT, "2s"), 1);
  const cancel_token *parents[] = {cancel_source_token(db)};
  assert_int_equal(
      cancel_source_new_linked(&req, "request GET /reports/42", parents, 1), 0);
  assert_true(cancel_token_is_cancelled(cancel_source_token(req)));

  format_token(cancel_source_token(req), buf, sizeof buf);
  assert_string_equal(buf, "timeout (db-query 2s) via request GET /reports/42");
  format_token(cancel_source_token(db), buf, sizeof buf);
  assert_string_equal(buf, "timeout (db-query 2s)");

  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(req), &r), 1);
  assert_int_equal(r.kind, CANCEL_TIMEOUT);
  assert_string_equal(r.origin, "db-query");
  assert_string_equal(r.detail, "2s");
  assert_int_equal(r.via_len, 1);
  assert_int_equal(r.via_skipped, 0);
  assert_string_equal(r.via[0].name, "request GET /reports/42");
  assert_null(r.via[0].note);
  cancel_source_unref(req);
  cancel_source_unref(db);
}

static void test_format_no_detail(void **state) {
  (void)state;
  cancel_source *named, *anon;
  char buf[128];
  assert_int_equal(cancel_source_new(&named, "name"), 0);
  assert_int_equal(cancel_source_cancel(named), 1);
  format_token(cancel_source_token(named), buf, sizeof buf);
  assert_string_equal(buf, "requested (name)");

  assert_int_equal(cancel_source_new(&anon, NULL), 0);
  assert_int_equal(cancel_source_cancel(anon), 1);
  format_token(cancel_source_token(anon), buf, sizeof buf);
  assert_string_equal(buf, "requested");

  /* Other kinds use their kind name the same way. */
  cancel_source *sd;
  assert_int_equal(cancel_source_new(&sd, "host"), 0);
  assert_int_equal(cancel_source_cancel_with(sd, CANCEL_SHUTDOWN, NULL), 1);
  format_token(cancel_source_token(sd), buf, sizeof buf);
  assert_string_equal(buf, "shutdown (host)");

  cancel_source *cg;
  assert_int_equal(cancel_source_new(&cg, "conn"), 0);
  assert_int_equal(
      cancel_source_cancel_with(cg, CANCEL_CLIENT_GONE, "peer reset"), 1);
  format_token(cancel_source_token(cg), buf, sizeof buf);
  assert_string_equal(buf, "client gone (conn peer reset)");

  cancel_source_unref(cg);
  cancel_source_unref(sd);
  cancel_source_unref(anon);
  cancel_source_unref(named);
}

static void test_via_three_deep(void **state) {
  (void)state;
  cancel_source *grand, *mid, *leaf;
  assert_int_equal(cancel_source_new(&grand, "grand"), 0);
  const cancel_token *p1[] = {cancel_source_token(grand)};
  assert_int_equal(cancel_source_new_linked(&mid, "mid", p1, 1), 0);
  const cancel_token *p2[] = {cancel_source_token(mid)};
  assert_int_equal(cancel_source_new_linked(&leaf, "leaf", p2, 1), 0);

  int64_t before = cancel_now();
  assert_int_equal(cancel_source_cancel_with(grand, CANCEL_SHUTDOWN, "sig"), 1);
  int64_t after = cancel_now();
  assert_true(cancel_token_is_cancelled(cancel_source_token(leaf)));

  cancel_reason r, rg, rm;
  assert_int_equal(cancel_token_reason(cancel_source_token(grand), &rg), 1);
  assert_int_equal(rg.via_len, 0);
  assert_int_equal(cancel_token_reason(cancel_source_token(mid), &rm), 1);
  assert_int_equal(rm.via_len, 1);
  assert_string_equal(rm.via[0].name, "mid");

  assert_int_equal(cancel_token_reason(cancel_source_token(leaf), &r), 1);
  assert_int_equal(r.kind, CANCEL_SHUTDOWN);
  assert_string_equal(r.origin, "grand");
  assert_string_equal(r.detail, "sig");
  assert_int_equal(r.via_len, 2);
  assert_int_equal(r.via_skipped, 0);
  assert_string_equal(r.via[0].name, "mid");  /* the origin's child */
  assert_string_equal(r.via[1].name, "leaf"); /* the queried one, last */
  assert_null(r.via[0].note);
  assert_null(r.via[1].note);
  /* The time is when the origin fired, the same along the path. */
  assert_i64_ge(r.time, before);
  assert_i64_le(r.time, after);
  assert_i64_eq(r.time, rg.time);
  assert_i64_eq(rm.time, rg.time);
  assert_int_equal(cancel_token_kind(cancel_source_token(leaf)),
                   CANCEL_SHUTDOWN);

  char buf[256];
  format_token(cancel_source_token(leaf), buf, sizeof buf);
  const char *prefix = "shutdown (grand sig) via ";
  assert_memory_equal(buf, prefix, strlen(prefix));
  const char *m = strstr(buf + strlen(prefix), "mid");
  const char *l = strstr(buf + strlen(prefix), "leaf");
  assert_non_null(m);
  assert_non_null(l);
  assert_true(m < l); /* origin side first */

  cancel_source_unref(leaf);
  cancel_source_unref(mid);
  cancel_source_unref(grand);
}

static void test_via_longer_than_max(void **state) {
  (void)state;
  enum { HOPS = CANCEL_VIA_MAX + 4 };
  cancel_source *chain[HOPS + 1];
  char names[HOPS + 1][16];
  for (int i = 0; i <= HOPS; i++)
    snprintf(names[i], sizeof names[i], "hop%d", i);
  assert_int_equal(cancel_source_new(&chain[0], names[0]), 0);
  for (int i = 1; i <= HOPS; i++) {
    const cancel_token *p[] = {cancel_source_token(chain[i - 1])};
    assert_int_equal(cancel_source_new_linked(&chain[i], names[i], p, 1), 0);
  }
  assert_int_equal(cancel_source_cancel(chain[0]), 1);

  for (int q = 1; q <= HOPS; q++) {
    cancel_reason r;
    assert_int_equal(cancel_token_reason(cancel_source_token(chain[q]), &r), 1);
    assert_string_equal(r.origin, "hop0");
    size_t total = (size_t)q; /* hops crossed after the origin */
    size_t want_len = total < CANCEL_VIA_MAX ? total : CANCEL_VIA_MAX;
    assert_int_equal(r.via_len, want_len);
    assert_int_equal(r.via_skipped, total - want_len);
    /* The hops nearest the queried token are kept, origin side first. */
    for (size_t k = 0; k < want_len; k++) {
      size_t hop = (size_t)q - want_len + 1 + k;
      assert_string_equal(r.via[k].name, names[hop]);
    }
    char buf[512];
    int n = cancel_reason_format(&r, buf, sizeof buf);
    assert_true(n > 0 && (size_t)n < sizeof buf);
    assert_non_null(strstr(buf, names[q]));
  }
  for (int i = HOPS; i >= 0; i--)
    cancel_source_unref(chain[i]);
}

static void test_format_truncates(void **state) {
  (void)state;
  cancel_source *db, *req;
  assert_int_equal(cancel_source_new(&db, "db-query"), 0);
  assert_int_equal(cancel_source_cancel_with(db, CANCEL_TIMEOUT, "2s"), 1);
  const cancel_token *parents[] = {cancel_source_token(db)};
  assert_int_equal(
      cancel_source_new_linked(&req, "request GET /reports/42", parents, 1), 0);
  const char *full = "timeout (db-query 2s) via request GET /reports/42";
  const int full_len = (int)strlen(full);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(req), &r), 1);

  char buf[64];
  for (size_t len = 1; len <= (size_t)full_len + 1; len++) {
    memset(buf, '@', sizeof buf);
    assert_int_equal(cancel_reason_format(&r, buf, len), full_len);
    assert_int_equal(buf[len - 1], '\0');
    assert_memory_equal(buf, full, len - 1);
    assert_int_equal(buf[len], '@'); /* nothing written past len */
  }
  /* Measuring only. */
  assert_int_equal(cancel_reason_format(&r, NULL, 0), full_len);
  /* len 0 with a buffer: nothing written. */
  memset(buf, '@', sizeof buf);
  assert_int_equal(cancel_reason_format(&r, buf, 0), full_len);
  assert_int_equal(buf[0], '@');

  cancel_source_unref(req);
  cancel_source_unref(db);
}

static void test_format_einval(void **state) {
  (void)state;
  char buf[16];
  cancel_reason r;
  memset(&r, 0, sizeof r);
  r.origin = "";
  r.detail = "";
  assert_int_equal(cancel_reason_format(NULL, buf, sizeof buf), -EINVAL);
  assert_int_equal(cancel_reason_format(NULL, NULL, 0), -EINVAL);
  assert_int_equal(cancel_reason_format(&r, NULL, 5), -EINVAL);
}

static void test_format_live_and_user(void **state) {
  (void)state;
  cancel_source *src;
  cancel_reason r;
  char buf[128];
  assert_int_equal(cancel_source_new(&src, "u"), 0);
  assert_int_equal(cancel_token_reason(cancel_source_token(src), &r), 0);
  int n = cancel_reason_format(&r, buf, sizeof buf); /* a live reason */
  assert_true(n >= 0 && (size_t)n < sizeof buf);
  assert_int_equal(strlen(buf), (size_t)n);

  assert_int_equal(cancel_source_cancel_with(src, CANCEL_USER + 7, "quota"), 1);
  format_token(cancel_source_token(src), buf, sizeof buf);
  assert_non_null(strstr(buf, "u"));
  assert_non_null(strstr(buf, "quota"));
  cancel_source_unref(src);
}

/* The strings of a reason point into the sources on the path; the queried
 * source keeps its ancestors alive, so they stay valid after the caller
 * dropped its references to the ancestors (ASan checks the reads). */
static void test_reason_strings_outlive_ancestor_refs(void **state) {
  (void)state;
  cancel_source *grand, *mid, *leaf;
  char gname[64], mname[64];
  memset(gname, 'g', sizeof gname - 1);
  gname[sizeof gname - 1] = '\0'; /* long: heap copies, not inline */
  memset(mname, 'm', sizeof mname - 1);
  mname[sizeof mname - 1] = '\0';
  char detail[64];
  memset(detail, 'd', sizeof detail - 1);
  detail[sizeof detail - 1] = '\0';

  assert_int_equal(cancel_source_new(&grand, gname), 0);
  const cancel_token *p1[] = {cancel_source_token(grand)};
  assert_int_equal(cancel_source_new_linked(&mid, mname, p1, 1), 0);
  const cancel_token *p2[] = {cancel_source_token(mid)};
  assert_int_equal(cancel_source_new_linked(&leaf, "leaf", p2, 1), 0);
  assert_int_equal(cancel_source_cancel_with(grand, CANCEL_TIMEOUT, detail), 1);
  cancel_source_unref(grand);
  cancel_source_unref(mid);

  cancel_reason r;
  assert_int_equal(cancel_token_reason(cancel_source_token(leaf), &r), 1);
  assert_string_equal(r.origin, gname);
  assert_string_equal(r.detail, detail);
  assert_int_equal(r.via_len, 2);
  assert_string_equal(r.via[0].name, mname);
  assert_string_equal(r.via[1].name, "leaf");
  int n = cancel_reason_format(&r, NULL, 0);
  assert_true(n > 0);
  char *buf = malloc((size_t)n + 1);
  assert_non_null(buf);
  assert_int_equal(cancel_reason_format(&r, buf, (size_t)n + 1), n);
  assert_non_null(strstr(buf, gname));
  assert_non_null(strstr(buf, mname));
  free(buf);
  cancel_source_unref(leaf); /* frees all three */
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_reason_live_token),
      cmocka_unit_test(test_reason_null_out),
      cmocka_unit_test(test_reason_fields),
      cmocka_unit_test(test_token_kind),
      cmocka_unit_test(test_kind_name),
      cmocka_unit_test(test_format_timeout_via_request),
      cmocka_unit_test(test_format_no_detail),
      cmocka_unit_test(test_via_three_deep),
      cmocka_unit_test(test_via_longer_than_max),
      cmocka_unit_test(test_format_truncates),
      cmocka_unit_test(test_format_einval),
      cmocka_unit_test(test_format_live_and_user),
      cmocka_unit_test(test_reason_strings_outlive_ancestor_refs),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
