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

#include "logfmt_check.h"

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

static void sink(int level, const char *line, size_t len, void *arg) {
  (void)level;
  (void)arg;
  check(strlen(line) == len, "log line length", line);
  static const char *const keys[] = {"ts", "level", "component", "msg",
                                     "name", "cancel_kind", "cancel_origin"};
  for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++) {
    int hits = 0;
    check(logfmt_fields(line, len, keys[i], &hits) >= 0, "log line logfmt",
          line);
    check(hits <= 1, "log line key twice", line);
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  cancel_log_set_sink(sink, NULL, CANCEL_LOG_DEBUG);
  return 0;
}

static void check_quote(const char *value) {
  char small[17], big[512];
  int need = cancel_logfmt_quote(big, sizeof big, value);
  check(need >= 0, "quote length", value);
  if ((size_t)need < sizeof big) {
    check(logfmt_fields("k=", 2, NULL, NULL) == 1, "self", "");
    char line[600];
    int n = snprintf(line, sizeof line, "k=%s", big);
    check(logfmt_fields(line, (size_t)n, "k", NULL) == 1, "quoted value",
          line);
  }
  int n2 = cancel_logfmt_quote(small, sizeof small, value);
  check(n2 == need, "quote length at a small size", value);
  char line[64];
  int n = snprintf(line, sizeof line, "k=%s", small);
  check(logfmt_fields(line, (size_t)n, "k", NULL) == 1, "cut quoted value",
        line);
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
  if ((size_t)fl < sizeof fields) {
    int hits = 0;
    check(logfmt_fields(fields, strlen(fields), "cancel_kind", &hits) >= 0,
          "logfmt_reason", fields);
    check(hits == 1, "logfmt_reason kind once", fields);
  }
  for (int i = 0; i < PARTS; i++)
    check_quote(part[i]);
  char q[256];
  cancel_logfmt_quote(q, sizeof q, part[1]);
  cancel_log(CANCEL_LOG_INFO, "fuzz", part[0], "name=%s %s", q,
             (size_t)fl < sizeof fields ? fields : "");
out:
  for (int i = 3; i >= 0; i--)
    cancel_source_unref(src[i]);
  free(buf);
  return 0;
}
