/*
 * libFuzzer harness: the Prometheus exposition with hostile source names.
 * Each input, split at 0xff bytes, names sources that are cancelled (the
 * origin counter keeps a series per name, up to its table's size, then one
 * overflow series); then the whole page is written and read back with the
 * text format's rules:
 *   - every line is a comment (# HELP / # TYPE) or `name{labels} value`;
 *   - label values are valid UTF-8 with only \\ \" \n escapes;
 *   - no series appears twice.
 * With METRICS_FUZZ_PAGE set, the last page is also written to that file
 * at exit, for `promtool check metrics` (tests/fuzz/run.sh does that).
 */
#include "cancel.h"
#include "cancel/diag.h"

#include "logfmt.h" /* its UTF-8 reader, independent of the library's */

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static char *last_page;
static size_t last_len;

static void fail(const char *what, const char *line, size_t len) {
  fprintf(stderr, "metrics_fuzz: %s: [%.*s]\n", what, (int)len, line);
  abort();
}

/* Checks one sample line; returns the length of its series (name and
 * labels), which must be unique on the page. */
static size_t check_sample(const char *line, size_t len) {
  size_t i = 0;
  while (i < len && (line[i] == '_' || line[i] == ':' ||
                     (line[i] >= 'a' && line[i] <= 'z') ||
                     (line[i] >= 'A' && line[i] <= 'Z') ||
                     (i > 0 && line[i] >= '0' && line[i] <= '9')))
    i++;
  if (i == 0)
    fail("metric name", line, len);
  if (i < len && line[i] == '{') {
    i++;
    while (i < len && line[i] != '}') {
      size_t k = i;
      while (i < len && (line[i] == '_' || (line[i] >= 'a' && line[i] <= 'z') ||
                         (line[i] >= 'A' && line[i] <= 'Z') ||
                         (i > k && line[i] >= '0' && line[i] <= '9')))
        i++;
      if (i == k || i + 1 >= len || line[i] != '=' || line[i + 1] != '"')
        fail("label name", line, len);
      i += 2;
      for (;;) {
        if (i >= len)
          fail("unterminated label value", line, len);
        unsigned char c = (unsigned char)line[i];
        if (c == '"')
          break;
        if (c == '\\') {
          if (i + 1 >= len ||
              (line[i + 1] != '\\' && line[i + 1] != '"' && line[i + 1] != 'n'))
            fail("label escape", line, len);
          i += 2;
          continue;
        }
        if (c == '\n')
          fail("raw newline in a label", line, len);
        size_t u = lf_utf8_len((const unsigned char *)line + i, len - i);
        if (u == 0)
          fail("label value is not UTF-8", line, len);
        i += u;
      }
      i++; /* the closing quote */
      if (i < len && line[i] == ',')
        i++;
    }
    if (i >= len)
      fail("unterminated labels", line, len);
    i++;
  }
  size_t series = i;
  if (i >= len || line[i] != ' ')
    fail("no value", line, len);
  char *end = NULL;
  char num[64];
  size_t vl = len - i - 1 < sizeof num - 1 ? len - i - 1 : sizeof num - 1;
  memcpy(num, line + i + 1, vl);
  num[vl] = '\0';
  (void)strtod(num, &end);
  if (end == num || (*end != '\0' && *end != ' '))
    fail("value", line, len);
  return series;
}

static int cmp_series(const void *a, const void *b) {
  const char *const *x = a, *const *y = b;
  return strcmp(*x, *y);
}

static void check_page(char *page, size_t len) {
  size_t cap = 256, n = 0;
  char **series = malloc(cap * sizeof *series);
  if (series == NULL)
    return;
  char *line = page;
  while (line < page + len) {
    char *nl = memchr(line, '\n', (size_t)(page + len - line));
    if (nl == NULL)
      fail("page does not end with a newline", line, strlen(line));
    size_t l = (size_t)(nl - line);
    if (l > 0 && line[0] == '#') {
      if (strncmp(line, "# HELP ", 7) != 0 && strncmp(line, "# TYPE ", 7) != 0)
        fail("comment", line, l);
    } else if (l > 0) {
      size_t s = check_sample(line, l);
      if (n == cap) {
        char **more = realloc(series, 2 * cap * sizeof *series);
        if (more == NULL)
          break;
        series = more;
        cap *= 2;
      }
      line[s] = '\0'; /* the page is ours: cut the series out */
      series[n++] = line;
    }
    line = nl + 1;
  }
  qsort(series, n, sizeof *series, cmp_series);
  for (size_t i = 1; i < n; i++)
    if (strcmp(series[i - 1], series[i]) == 0)
      fail("series twice", series[i], strlen(series[i]));
  free(series);
}

static void write_last_page(void) {
  const char *path = getenv("METRICS_FUZZ_PAGE");
  if (path == NULL || last_page == NULL)
    return;
  FILE *f = fopen(path, "w");
  if (f != NULL) {
    fwrite(last_page, 1, last_len, f);
    fclose(f);
  }
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  atexit(write_last_page);
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *buf = malloc(size + 1);
  if (buf == NULL)
    return 0;
  memcpy(buf, data, size);
  buf[size] = '\0';
  char *name = buf;
  for (size_t i = 0; i <= size; i++) {
    if (i < size && (unsigned char)buf[i] != 0xff)
      continue;
    buf[i] = '\0';
    cancel_source *s;
    if (cancel_source_new(&s, name) == 0) {
      cancel_source_cancel_with(s, 1 + (int)(i % 4), NULL);
      cancel_source_unref(s);
    }
    name = buf + i + 1;
  }
  free(buf);

  char *page = NULL;
  size_t len = 0;
  FILE *f = open_memstream(&page, &len);
  if (f == NULL)
    return 0;
  int rc = cancel_metrics_write_prometheus(f);
  fclose(f);
  if (rc != 0)
    fail("write failed", "", 0);
  char *copy = malloc(len + 1);
  if (copy != NULL) {
    memcpy(copy, page, len + 1);
    free(last_page);
    last_page = copy;
    last_len = len;
  }
  check_page(page, len);
  free(page);
  return 0;
}
