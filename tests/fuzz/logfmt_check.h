/*
 * A logfmt line reader for the fuzz harnesses, our own, after the grammar
 * go-logfmt decodes: pairs separated by spaces; a key is a run of bytes
 * above ' ' other than '=' and '"'; a value is bare (bytes above ' ' other
 * than '=' and '"') or a double-quoted string whose escapes are JSON's
 * (\" \\ \/ \b \f \n \r \t \uXXXX) and which holds no raw control byte.
 * logfmt_fields() splits a whole line and reports whether it is valid and
 * how many times `key` occurs, which is all a harness needs to see that a
 * client-controlled value could not forge or swallow a field.
 */
#ifndef CANCEL_FUZZ_LOGFMT_CHECK_H
#define CANCEL_FUZZ_LOGFMT_CHECK_H

#include <stdbool.h>
#include <stddef.h>
#include <string.h>

static inline bool logfmt_key_byte(unsigned char c) {
  return c > ' ' && c != '=' && c != '"' && c != 0x7f;
}

static inline int logfmt_hex(unsigned char c) {
  if (c >= '0' && c <= '9')
    return c - '0';
  if (c >= 'a' && c <= 'f')
    return c - 'a' + 10;
  if (c >= 'A' && c <= 'F')
    return c - 'A' + 10;
  return -1;
}

/* Skips a quoted value starting at line[i] == '"'; returns the index after
 * its closing quote, or 0 when it is malformed. */
static inline size_t logfmt_skip_quoted(const char *line, size_t len,
                                        size_t i) {
  for (i++; i < len; i++) {
    unsigned char c = (unsigned char)line[i];
    if (c == '"')
      return i + 1;
    if (c < ' ')
      return 0;
    if (c != '\\')
      continue;
    if (++i >= len)
      return 0;
    switch (line[i]) {
    case '"': case '\\': case '/': case 'b': case 'f': case 'n': case 'r':
    case 't':
      break;
    case 'u':
      if (i + 4 >= len)
        return 0;
      for (int k = 1; k <= 4; k++)
        if (logfmt_hex((unsigned char)line[i + k]) < 0)
          return 0;
      i += 4;
      break;
    default:
      return 0;
    }
  }
  return 0;
}

/* Reads the line: returns the number of pairs, or -1 when it is not valid
 * logfmt.  *count_key gets how many pairs have the key `key` (may be NULL). */
static inline int logfmt_fields(const char *line, size_t len, const char *key,
                                int *count_key) {
  int pairs = 0, hits = 0;
  size_t klen = key != NULL ? strlen(key) : 0;
  size_t i = 0;
  while (i < len) {
    while (i < len && line[i] == ' ')
      i++;
    if (i >= len)
      break;
    size_t k0 = i;
    while (i < len && logfmt_key_byte((unsigned char)line[i]))
      i++;
    if (i == k0)
      return -1;
    if (key != NULL && i - k0 == klen && memcmp(line + k0, key, klen) == 0)
      hits++;
    pairs++;
    if (i < len && line[i] == '=') {
      i++;
      if (i < len && line[i] == '"') {
        if ((i = logfmt_skip_quoted(line, len, i)) == 0)
          return -1;
      } else {
        while (i < len && logfmt_key_byte((unsigned char)line[i]))
          i++;
      }
    }
    if (i < len && line[i] != ' ')
      return -1;
  }
  if (count_key != NULL)
    *count_key = hits;
  return pairs;
}

#endif /* CANCEL_FUZZ_LOGFMT_CHECK_H */
