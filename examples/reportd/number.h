/* A decimal number from a flag, a route capture or a query argument:
 * shared by reportd and its downstream. */
#ifndef REPORTD_NUMBER_H
#define REPORTD_NUMBER_H

#include <errno.h>
#include <stdbool.h>
#include <stdlib.h>

/* Parses all of text as a non-negative decimal number in lo..hi (lo >= 0)
 * into *out: digits only, since strtol alone would take " 5", "+5" and
 * trailing garbage is checked but leading space and signs are not.
 * Returns false for NULL, empty, malformed or out of range. */
static inline bool parse_number(const char *text, long lo, long hi, long *out) {
  if (text == NULL || *text < '0' || *text > '9')
    return false;
  char *end = NULL;
  errno = 0;
  long v = strtol(text, &end, 10);
  if (errno != 0 || *end != '\0' || v < lo || v > hi)
    return false;
  *out = v;
  return true;
}

#endif /* REPORTD_NUMBER_H */
