/*
 * A logfmt decoder for the tests, written here from go-logfmt's grammar
 * (the reader most log pipelines use), so the tests check libcancel's lines
 * the way a consumer reads them rather than by substring:
 *  - a record is one line; between fields any run of bytes <= ' ' (space,
 *    TAB, ...) is skipped;
 *  - a key runs to '=' or a byte <= ' '; a '"' in a key is an error; a key
 *    without '=' has no value;
 *  - a value after '=' is empty (a byte <= ' ' or the end follows), bare
 *    (up to a byte <= ' '; '=', '"' or '\'' inside is an error) or
 *    double-quoted, running to the first '"' not escaped by '\', and
 *    unquoted as a JSON string: \" \\ \/ \' \b \f \n \r \t \uXXXX
 *    (surrogate pairs joined); a raw control byte inside quotes, any
 *    other escape or a missing closing quote is an error.
 * Stricter than go-logfmt where the library promises more: bytes that are
 * not well-formed UTF-8 anywhere in the line are an error (go-logfmt would
 * coerce them), as is a control byte anywhere.
 *
 * No cmocka here: the callers assert on what lf_decode returns.
 */
#ifndef CANCEL_TEST_LOGFMT_H
#define CANCEL_TEST_LOGFMT_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define LF_FIELDS 64

struct lf_field {
  char *key;
  char *value; /* NUL-terminated, malloc'ed; "" when empty or absent */
  bool has_value;
};

struct lf_record {
  int n;
  struct lf_field f[LF_FIELDS];
  char error[128]; /* why lf_decode failed */
};

/* The length of the well-formed UTF-8 sequence at s (1-4), or 0: the
 * test's own reading of RFC 3629, independent of the library's. */
static inline size_t lf_utf8_len(const unsigned char *s, size_t left) {
  unsigned char c = s[0];
  if (c < 0x80)
    return 1;
  size_t n = c >= 0xc2 && c <= 0xdf   ? 2
             : c >= 0xe0 && c <= 0xef ? 3
             : c >= 0xf0 && c <= 0xf4 ? 4
                                      : 0;
  if (n == 0 || n > left)
    return 0;
  uint32_t cp = c & (0xff >> (n + 1));
  for (size_t i = 1; i < n; i++) {
    if ((s[i] & 0xc0) != 0x80)
      return 0;
    cp = (cp << 6) | (s[i] & 0x3f);
  }
  static const uint32_t least[5] = {0, 0, 0x80, 0x800, 0x10000};
  if (cp < least[n] || cp > 0x10ffff || (cp >= 0xd800 && cp <= 0xdfff))
    return 0;
  return n;
}

/* Whether s[0..n) is valid UTF-8. */
static inline bool lf_utf8_valid(const char *s, size_t n) {
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    size_t k = lf_utf8_len(u + i, n - i);
    if (k == 0)
      return false;
    i += k;
  }
  return true;
}

/* s with each byte that is not part of well-formed UTF-8 replaced by
 * U+FFFD: what a value must decode to.  Caller frees. */
static inline char *lf_norm(const char *s) {
  size_t n = strlen(s);
  char *out = malloc(3 * n + 1);
  size_t o = 0;
  const unsigned char *u = (const unsigned char *)s;
  for (size_t i = 0; i < n;) {
    size_t k = lf_utf8_len(u + i, n - i);
    if (k == 0) {
      memcpy(out + o, "\xef\xbf\xbd", 3);
      o += 3;
      i++;
      continue;
    }
    memcpy(out + o, s + i, k);
    o += k;
    i += k;
  }
  out[o] = '\0';
  return out;
}

static inline void lf_free(struct lf_record *r) {
  for (int i = 0; i < r->n; i++) {
    free(r->f[i].key);
    free(r->f[i].value);
  }
  r->n = 0;
}

static inline int lf_hex4(const char *s, uint32_t *v) {
  *v = 0;
  for (int i = 0; i < 4; i++) {
    char c = s[i];
    int d = c >= '0' && c <= '9'   ? c - '0'
            : c >= 'a' && c <= 'f' ? c - 'a' + 10
            : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                   : -1;
    if (d < 0)
      return -1;
    *v = (*v << 4) | (uint32_t)d;
  }
  return 0;
}

static inline size_t lf_put_cp(char *o, uint32_t cp) {
  if (cp < 0x80) {
    o[0] = (char)cp;
    return 1;
  }
  if (cp < 0x800) {
    o[0] = (char)(0xc0 | (cp >> 6));
    o[1] = (char)(0x80 | (cp & 0x3f));
    return 2;
  }
  if (cp < 0x10000) {
    o[0] = (char)(0xe0 | (cp >> 12));
    o[1] = (char)(0x80 | ((cp >> 6) & 0x3f));
    o[2] = (char)(0x80 | (cp & 0x3f));
    return 3;
  }
  o[0] = (char)(0xf0 | (cp >> 18));
  o[1] = (char)(0x80 | ((cp >> 12) & 0x3f));
  o[2] = (char)(0x80 | ((cp >> 6) & 0x3f));
  o[3] = (char)(0x80 | (cp & 0x3f));
  return 4;
}

/* Unquotes q[0..n) (the text between the quotes) into a new string. */
static inline char *lf_unquote(const char *q, size_t n, char *err,
                               size_t elen) {
  char *out = malloc(n + 1);
  size_t o = 0;
  for (size_t i = 0; i < n;) {
    unsigned char c = (unsigned char)q[i];
    if (c < 0x20) {
      snprintf(err, elen, "raw control byte 0x%02x in quotes", c);
      free(out);
      return NULL;
    }
    if (c != '\\') {
      out[o++] = (char)c;
      i++;
      continue;
    }
    if (i + 1 >= n) {
      snprintf(err, elen, "escape at the end of a value");
      free(out);
      return NULL;
    }
    char e = q[i + 1];
    i += 2;
    switch (e) {
    case '"':
    case '\\':
    case '/':
    case '\'':
      out[o++] = e;
      continue;
    case 'b':
      out[o++] = '\b';
      continue;
    case 'f':
      out[o++] = '\f';
      continue;
    case 'n':
      out[o++] = '\n';
      continue;
    case 'r':
      out[o++] = '\r';
      continue;
    case 't':
      out[o++] = '\t';
      continue;
    case 'u':
      break;
    default:
      snprintf(err, elen, "unknown escape \\%c", e);
      free(out);
      return NULL;
    }
    uint32_t cp;
    if (i + 4 > n || lf_hex4(q + i, &cp) != 0) {
      snprintf(err, elen, "bad \\u escape");
      free(out);
      return NULL;
    }
    i += 4;
    if (cp >= 0xd800 && cp <= 0xdbff && i + 6 <= n && q[i] == '\\' &&
        q[i + 1] == 'u') {
      uint32_t lo;
      if (lf_hex4(q + i + 2, &lo) == 0 && lo >= 0xdc00 && lo <= 0xdfff) {
        cp = 0x10000 + ((cp - 0xd800) << 10) + (lo - 0xdc00);
        i += 6;
      }
    }
    if (cp >= 0xd800 && cp <= 0xdfff)
      cp = 0xfffd;
    /* \u0000 cannot be told from the end of a C string: the library
     * never writes it (its values are C strings). */
    if (cp == 0) {
      snprintf(err, elen, "\\u0000 in a value");
      free(out);
      return NULL;
    }
    o += lf_put_cp(out + o, cp);
  }
  out[o] = '\0';
  return out;
}

/* Decodes one line.  Returns 0 with r filled (lf_free it), or -1 with
 * r->error set (and nothing to free). */
static inline int lf_decode(const char *line, struct lf_record *r) {
  size_t n = strlen(line);
  r->n = 0;
  r->error[0] = '\0';
  if (!lf_utf8_valid(line, n)) {
    snprintf(r->error, sizeof r->error, "line is not valid UTF-8");
    return -1;
  }
  for (size_t i = 0; i < n; i++)
    if ((unsigned char)line[i] < 0x20 || line[i] == 0x7f) {
      snprintf(r->error, sizeof r->error, "control byte 0x%02x at %zu",
               (unsigned char)line[i], i);
      return -1;
    }
  size_t i = 0;
  for (;;) {
    while (i < n && (unsigned char)line[i] <= ' ')
      i++;
    if (i >= n)
      return 0;
    if (r->n == LF_FIELDS) {
      snprintf(r->error, sizeof r->error, "more than %d fields", LF_FIELDS);
      goto fail;
    }
    size_t k0 = i;
    while (i < n && line[i] != '=' && (unsigned char)line[i] > ' ') {
      if (line[i] == '"' || line[i] == '\'') {
        snprintf(r->error, sizeof r->error, "quote in a key at %zu", i);
        goto fail;
      }
      i++;
    }
    if (i == k0) {
      snprintf(r->error, sizeof r->error, "empty key at %zu", i);
      goto fail;
    }
    struct lf_field *f = &r->f[r->n];
    f->key = strndup(line + k0, i - k0);
    f->value = NULL;
    f->has_value = false;
    r->n++;
    if (i >= n || line[i] != '=') {
      f->value = strdup("");
      continue;
    }
    i++;
    f->has_value = true;
    if (i >= n || (unsigned char)line[i] <= ' ') {
      f->value = strdup("");
      continue;
    }
    if (line[i] == '"') {
      size_t q0 = ++i;
      while (i < n && line[i] != '"')
        i += line[i] == '\\' ? 2 : 1;
      if (i >= n) {
        snprintf(r->error, sizeof r->error, "unterminated quoted value of %s",
                 f->key);
        goto fail;
      }
      f->value = lf_unquote(line + q0, i - q0, r->error, sizeof r->error);
      if (f->value == NULL)
        goto fail;
      i++;
      if (i < n && (unsigned char)line[i] > ' ') {
        snprintf(r->error, sizeof r->error,
                 "no separator after the value of %s", f->key);
        goto fail;
      }
      continue;
    }
    size_t v0 = i;
    while (i < n && (unsigned char)line[i] > ' ') {
      if (line[i] == '=' || line[i] == '"' || line[i] == '\'') {
        snprintf(r->error, sizeof r->error,
                 "unexpected '%c' in the bare value of %s at %zu", line[i],
                 f->key, i);
        goto fail;
      }
      i++;
    }
    f->value = strndup(line + v0, i - v0);
  }
fail:
  lf_free(r);
  return -1;
}

/* The value of key (the first field of that name), or NULL. */
static inline const char *lf_get(const struct lf_record *r, const char *key) {
  for (int i = 0; i < r->n; i++)
    if (strcmp(r->f[i].key, key) == 0)
      return r->f[i].value;
  return NULL;
}

/* Whether the record's keys are exactly keys (a NULL-ended list of key
 * names), in order: no field added, none lost. */
static inline bool lf_keys_are(const struct lf_record *r,
                               const char *const *keys) {
  int i = 0;
  for (; keys[i] != NULL; i++)
    if (i >= r->n || strcmp(r->f[i].key, keys[i]) != 0)
      return false;
  return i == r->n;
}

/* Whether got is what a value written from `written` must decode to:
 * written itself (invalid UTF-8 bytes as U+FFFD), or a prefix of it cut
 * on a character boundary followed by the marker "...". */
static inline bool lf_value_ok(const char *got, const char *written) {
  char *want = lf_norm(written);
  bool ok = strcmp(got, want) == 0;
  size_t g = strlen(got);
  if (!ok && g >= 3 && strcmp(got + g - 3, "...") == 0)
    ok = strncmp(got, want, g - 3) == 0;
  free(want);
  return ok;
}

/* Whether got is a cut value (ends with the marker, shorter than want). */
static inline bool lf_value_cut(const char *got, const char *written) {
  char *want = lf_norm(written);
  size_t g = strlen(got);
  bool cut = g >= 3 && strcmp(got + g - 3, "...") == 0 &&
             strncmp(got, want, g - 3) == 0 && strcmp(got, want) != 0;
  free(want);
  return cut;
}

#endif /* CANCEL_TEST_LOGFMT_H */
