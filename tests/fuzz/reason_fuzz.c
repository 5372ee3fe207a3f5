/*
 * libFuzzer harness: reasons and their formatting with hostile names.
 * The input is split at 0xff bytes into up to five strings: the names of a
 * chain of sources (origin first, linked one to the next, the middle one a
 * shield with a zero grace so that its hop carries a note when cancelled
 * directly... or not) and the detail of the cancel.  Then:
 *   - cancel_reason_format, at every buffer size up to the full length, is
 *     snprintf-like: the same length needed every time, output a prefix of
 *     the full line, always NUL-terminated;
 *   - cancel_logfmt_quote and cancel_logfmt_reason produce valid logfmt
 *     (one value; pairs with each key once), also when cut;
 *   - cancel_log with those fields writes one valid logfmt line.
 */
#include "cancel.h"
#include "cancel/log.h"

#include "logfmt.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define PARTS 5

static void check(bool ok, const char *what, const char *text) {
  if (!ok) {
    fprintf(stderr, "reason_fuzz: %s: [%s]\n", what, text);
    abort();
  }
}

/* A line decoded: valid logfmt, every key once.  Returns the record (the
 * caller frees it). */
static struct lf_record decode(const char *line, const char *what) {
  struct lf_record r;
  if (lf_decode(line, &r) != 0) {
    fprintf(stderr, "reason_fuzz: %s is not logfmt (%s): [%s]\n", what,
            r.error, line);
    abort();
  }
  for (int i = 0; i < r.n; i++)
    for (int j = 0; j < i; j++)
      check(strcmp(r.f[i].key, r.f[j].key) != 0, "a key twice", line);
  return r;
}

static void sink(int level, const char *line, size_t len, void *arg) {
  (void)level;
  (void)arg;
  check(strlen(line) == len, "log line length", line);
  struct lf_record r = decode(line, "log line");
  lf_free(&r);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  cancel_log_set_sink(sink, NULL, CANCEL_LOG_DEBUG);
  return 0;
}

/* cancel_logfmt_quote: the whole value reads back as the input (invalid
 * UTF-8 as U+FFFD); at a small size, a complete value cut with "...". */
static void check_quote(const char *value) {
  static const size_t sizes[] = {17, 4096};
  for (size_t k = 0; k < 2; k++) {
    char *q = malloc(sizes[k]);
    if (q == NULL)
      return;
    int need = cancel_logfmt_quote(q, sizes[k], value);
    check(need >= 0, "quote length", value);
    check(cancel_logfmt_quote(NULL, 0, value) == need, "quote measure", value);
    size_t ll = strlen(q) + 3;
    char *line = malloc(ll);
    if (line != NULL) {
      snprintf(line, ll, "k=%s", q);
      struct lf_record r = decode(line, "a quoted value");
      check(r.n == 1, "one field", line);
      const char *got = lf_get(&r, "k");
      check(got != NULL && lf_value_ok(got, value), "value round trip", line);
      if ((size_t)need < sizes[k])
        check(!lf_value_cut(got, value), "value cut though it fit", line);
      lf_free(&r);
      free(line);
    }
    free(q);
  }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *buf = malloc(size + 1);
  if (buf == NULL)
    return 0;
  memcpy(buf, data, size);
  buf[size] = '\0';
  const char *part[PARTS] = {"", "", "", "", ""};
  int np = 0;
  char *p = buf;
  part[np++] = p;
  for (size_t i = 0; i < size && np < PARTS; i++)
    if ((unsigned char)buf[i] == 0xff) {
      buf[i] = '\0';
      part[np++] = buf + i + 1;
    }

  cancel_source *src[4] = {NULL, NULL, NULL, NULL};
  if (cancel_source_new(&src[0], part[0]) != 0)
    goto out;
  for (int i = 1; i < 4; i++) {
    const cancel_token *parent = cancel_source_token(src[i - 1]);
    int rc = i == 2 ? cancel_source_new_shield(&src[i], part[i], parent, 1)
                    : cancel_source_new_linked(&src[i], part[i], &parent, 1);
    if (rc != 0)
      goto out;
  }
  cancel_source_cancel_with(src[0], CANCEL_USER + (int)(size % 7), part[4]);
  /* The shield's grace (1 ns) runs on the timer thread: cancel the rest of
   * the chain directly too, so the formatted reason has its hops now. */
  cancel_source_cancel_with(src[2], CANCEL_TIMEOUT, part[4]);
  /* If the timer thread won, it may still be passing the cancel on to the
   * last source: wait for it (the wait ends at once when it is done). */
  (void)cancel_sleep(cancel_source_token(src[3]), CANCEL_SEC(5));

  cancel_reason r;
  check(cancel_token_reason(cancel_source_token(src[3]), &r) == 1, "reason",
        part[0]);
  char full[4096];
  int need = cancel_reason_format(&r, full, sizeof full);
  check(need >= 0, "format length", part[0]);
  if ((size_t)need < sizeof full) {
    check(strlen(full) == (size_t)need, "format length vs text", full);
    for (size_t len = 1; len <= (size_t)need + 1; len++) {
      char *cut = malloc(len);
      if (cut == NULL)
        break;
      int n = cancel_reason_format(&r, cut, len);
      check(n == need, "format length at a smaller size", full);
      check(strlen(cut) == (len - 1 < (size_t)need ? len - 1 : (size_t)need),
            "format cut", cut);
      check(strncmp(cut, full, strlen(cut)) == 0, "format prefix", cut);
      free(cut);
    }
  }
  char fields[2048];
  int fl = cancel_logfmt_reason(fields, sizeof fields, &r);
  check(fl >= 0, "logfmt_reason length", part[0]);
  {
    struct lf_record fr = decode(fields, "cancel_logfmt_reason");
    const char *origin = lf_get(&fr, "cancel_origin");
    check(lf_get(&fr, "cancel_kind") != NULL, "no cancel_kind", fields);
    /* The origin is the root, or the shield when its direct cancel came
     * before its 1 ns grace ran out on the timer thread. */
    if (origin != NULL)
      check(lf_value_ok(origin, part[0]) || lf_value_ok(origin, part[2]),
            "origin round trip", fields);
    lf_free(&fr);
  }
  for (int i = 0; i < PARTS; i++)
    check_quote(part[i]);
  char q[256];
  cancel_logfmt_quote(q, sizeof q, part[1]);
  cancel_log(CANCEL_LOG_INFO, "fuzz", part[0], "name=%s %s", q, fields);
  cancel_log_field lf[] = {{"name", part[1]}, {"detail", part[4]}};
  cancel_log_fields(CANCEL_LOG_WARN, part[2], part[3], lf, 2);
  /* Typed fields: every string a client's, the reason both live and kept
   * (the sink decodes each line and finds every key once). */
  CANCEL_LOG(CANCEL_LOG_WARN, part[0], part[1], CANCEL_LOG_STR("name", part[2]),
             CANCEL_LOG_STRN("short", part[3], 24),
             CANCEL_LOG_I64("len", (int64_t)size),
             CANCEL_LOG_MS("dur_ms", (int64_t)size * 1000),
             CANCEL_LOG_REASON(&r), CANCEL_LOG_STR("detail", part[4]));
  CANCEL_LOG(CANCEL_LOG_WARN, part[2], part[3], CANCEL_LOG_STR("name", part[4]),
             CANCEL_LOG_LOGFMT(fields), CANCEL_LOG_BOOL("end", true));
out:
  for (int i = 3; i >= 0; i--)
    cancel_source_unref(src[i]);
  free(buf);
  return 0;
}
