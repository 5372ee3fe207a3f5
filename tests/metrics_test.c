/*
 * The Prometheus page with hostile source names: names come from clients
 * (a peer's address text, a request's path), so whatever they hold the
 * page must parse (`promtool check metrics`, when installed) and hold
 * valid UTF-8 labels and unique series (the test's own reading of the
 * text format, which also catches what promtool lets through).
 */
#include "test_util.h"

#include "cancel/diag.h"

#include <sys/stat.h>
#include <sys/wait.h>

/* The page, written to a temporary file; returned as a malloc'ed string. */
static char *page(char *path, size_t plen) {
  snprintf(path, plen, "%s/metrics_test.XXXXXX",
           getenv("TMPDIR") ? getenv("TMPDIR") : "/tmp");
  int fd = mkstemp(path);
  assert_true(fd >= 0);
  FILE *f = fdopen(fd, "w+");
  assert_non_null(f);
  assert_int_equal(cancel_metrics_write_prometheus(f), 0);
  long n = ftell(f);
  assert_true(n > 0);
  rewind(f);
  char *text = malloc((size_t)n + 1);
  assert_int_equal(fread(text, 1, (size_t)n, f), (size_t)n);
  text[n] = '\0';
  fclose(f);
  return text;
}

/* The UTF-8 rules of RFC 3629, written here apart from the library's. */
static bool utf8_valid(const unsigned char *s, size_t n) {
  for (size_t i = 0; i < n;) {
    unsigned char c = s[i];
    size_t k = c < 0x80                 ? 1
               : c >= 0xc2 && c <= 0xdf ? 2
               : c >= 0xe0 && c <= 0xef ? 3
               : c >= 0xf0 && c <= 0xf4 ? 4
                                        : 0;
    if (k == 0 || i + k > n)
      return false;
    uint32_t cp = c & (0xff >> (k + 1));
    for (size_t j = 1; j < k; j++) {
      if ((s[i + j] & 0xc0) != 0x80)
        return false;
      cp = (cp << 6) | (s[i + j] & 0x3f);
    }
    static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
    if (cp < least[k] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
      return false;
    i += k;
  }
  return true;
}

#define MAX_SERIES 1024

struct series {
  char *key[MAX_SERIES]; /* name{label="value",...} unescaped, sorted */
  uint64_t value[MAX_SERIES];
  int n;
  int not_utf8;   /* label values that are not valid UTF-8 */
  int duplicates; /* series written more than once */
};

static int cmp_str(const void *a, const void *b) {
  return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Reads one sample line: name, labels (escapes \\ \" \n, each value valid
 * UTF-8), value.  Adds its identity to *out: the name and its labels sorted
 * by name, labels with an empty value left out (Prometheus treats them as
 * absent).  Fails the test on a line it cannot read. */
static void read_sample(const char *line, struct series *out) {
  const char *p = line;
  char key[2048];
  size_t kn = 0;
  while (*p != '\0' && *p != '{' && *p != ' ')
    key[kn++] = *p++;
  key[kn] = '\0';
  char *labels[16];
  int nl = 0;
  if (*p == '{') {
    p++;
    while (*p != '}') {
      if (*p == ',') {
        p++;
        continue;
      }
      char lab[1024];
      size_t ln = 0;
      while (*p != '=' && *p != '\0')
        lab[ln++] = *p++;
      if (*p != '=' || p[1] != '"')
        fail_msg("bad label in: %s", line);
      lab[ln++] = '=';
      p += 2;
      size_t v0 = ln;
      while (*p != '"') {
        if (*p == '\0' || *p == '\n')
          fail_msg("unterminated label value in: %s", line);
        if (*p == '\\') {
          char e = p[1];
          if (e != '\\' && e != '"' && e != 'n')
            fail_msg("bad escape \\%c in: %s", e, line);
          lab[ln++] = e == 'n' ? '\n' : e;
          p += 2;
          continue;
        }
        lab[ln++] = *p++;
      }
      p++;
      lab[ln] = '\0';
      if (!utf8_valid((const unsigned char *)lab + v0, ln - v0)) {
        print_message("label value is not UTF-8: %s\n", line);
        out->not_utf8++;
      }
      if (ln > v0) /* an empty value is no label */
        labels[nl++] = strdup(lab);
    }
    p++;
  }
  if (*p != ' ')
    fail_msg("no value in: %s", line);
  qsort(labels, (size_t)nl, sizeof labels[0], cmp_str);
  kn += (size_t)snprintf(key + kn, sizeof key - kn, "{");
  for (int i = 0; i < nl; i++) {
    kn += (size_t)snprintf(key + kn, sizeof key - kn, "%s%s", i ? "," : "",
                           labels[i]);
    free(labels[i]);
  }
  snprintf(key + kn, sizeof key - kn, "}");
  assert_true(out->n < MAX_SERIES);
  out->key[out->n] = strdup(key);
  out->value[out->n] = strtoull(p + 1, NULL, 10);
  out->n++;
}

/* Every sample of the page, each series checked unique. */
static void read_page(const char *text, struct series *out) {
  out->n = out->not_utf8 = out->duplicates = 0;
  char *copy = strdup(text);
  char *save = NULL;
  for (char *l = strtok_r(copy, "\n", &save); l != NULL;
       l = strtok_r(NULL, "\n", &save)) {
    if (l[0] == '#')
      continue;
    read_sample(l, out);
  }
  free(copy);
  for (int i = 0; i < out->n; i++)
    for (int j = i + 1; j < out->n; j++)
      if (strcmp(out->key[i], out->key[j]) == 0) {
        print_message("series written twice: %s\n", out->key[i]);
        out->duplicates++;
      }
}

static void series_free(struct series *s) {
  for (int i = 0; i < s->n; i++)
    free(s->key[i]);
  s->n = 0;
}

/* The count of series key, or -1 when the page has none. */
static int64_t series_value(const struct series *s, const char *key) {
  for (int i = 0; i < s->n; i++)
    if (strcmp(s->key[i], key) == 0)
      return (int64_t)s->value[i];
  return -1;
}

/* promtool's verdict on the file: 1 accepted, 0 rejected, -1 absent. */
static int promtool_check(const char *path) {
  if (system("command -v promtool >/dev/null 2>&1") != 0)
    return -1;
  char cmd[512];
  snprintf(cmd, sizeof cmd, "promtool check metrics < '%s' 2>&1", path);
  FILE *p = popen(cmd, "r");
  assert_non_null(p);
  char out[4096];
  size_t n = fread(out, 1, sizeof out - 1, p);
  out[n] = '\0';
  int st = pclose(p);
  if (!WIFEXITED(st) || WEXITSTATUS(st) != 0) {
    print_message("promtool check metrics: %s\n", out);
    return 0;
  }
  return 1;
}

static void cancel_named(const char *name) {
  cancel_source *s = new_src(name);
  assert_int_equal(cancel_source_cancel(s), 1);
  cancel_source_unref(s);
}

static void test_hostile_origin_names(void **state) {
  (void)state;
  /* 46 ASCII bytes, then a 3-byte character across byte 47 (the label's
   * limit); the same with a 4-byte one. */
  char cut3[64], cut4[64];
  memset(cut3, 'a', 46);
  strcpy(cut3 + 46, "\xe2\x9c\x93tail");
  memset(cut4, 'b', 45);
  strcpy(cut4 + 45, "\xf0\x9f\x98\x80tail");
  const char *names[] = {
      "bad \xff\xfe utf-8",
      "cut \xe2\x82",
      "surrogate \xed\xa0\x80",
      cut3,
      cut4,
      "say \"hi\"",
      "back\\slash\\",
      "two\nlines",
      "tab\there",
      "other",
      "",
  };
  for (size_t i = 0; i < sizeof names / sizeof names[0]; i++)
    cancel_named(names[i]);
  /* Overflow the table (128 names): 200 more, letters only (a digit would
   * end the label). */
  for (int i = 0; i < 200; i++) {
    char n[32];
    snprintf(n, sizeof n, "overflow %c%c", 'a' + i / 26, 'a' + i % 26);
    cancel_named(n);
  }

  char path[256];
  char *text = page(path, sizeof path);
  /* Every check first, each saying what it found; then the verdicts. */
  int verdict = promtool_check(path);
  if (verdict < 0)
    print_message("promtool not installed: page checked by this test only\n");
  struct series s;
  read_page(text, &s);
  assert_int_equal(s.not_utf8, 0);
  assert_int_equal(s.duplicates, 0);
  if (verdict >= 0)
    assert_int_equal(verdict, 1);
  /* The source named "other" has its own series, with its one count; the
   * overflow has another, which no name can produce. */
  assert_int_equal(
      series_value(&s, "cancel_cancellations_by_origin_total{origin=other}"),
      1);
  assert_true(
      series_value(&s, "cancel_cancellations_by_origin_total{overflow=true}") >
      0);
  /* The cut fell before the character, not through it. */
  char want[128];
  snprintf(want, sizeof want,
           "cancel_cancellations_by_origin_total{origin=%.46s}", cut3);
  assert_int_equal(series_value(&s, want), 1);
  snprintf(want, sizeof want,
           "cancel_cancellations_by_origin_total{origin=%.45s}", cut4);
  assert_int_equal(series_value(&s, want), 1);
  /* A byte that is not UTF-8 reads as U+FFFD (the name is cut at its
   * digit, as every name is). */
  assert_int_equal(series_value(&s, "cancel_cancellations_by_origin_total{"
                                    "origin=bad \xef\xbf\xbd\xef\xbf\xbd "
                                    "utf-}"),
                   1);
  assert_int_equal(
      series_value(&s, "cancel_cancellations_by_origin_total{origin=two\n"
                       "lines}"),
      1);
  series_free(&s);
  unlink(path);
  free(text);
}

int main(void) {
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_hostile_origin_names),
  };
  return cmocka_run_group_tests(tests, NULL, NULL);
}
