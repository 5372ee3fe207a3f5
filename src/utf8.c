/*
 * UTF-8 validation for the text the diagnostics write out (log lines,
 * Prometheus labels).  Names and details of sources may come from clients
 * (a request's path, a peer's address text), so both writers check every
 * sequence and replace what is not UTF-8 rather than copy it through.
 */
#include "internal.h"

/* RFC 3629's well-formed sequences: no overlong forms, no surrogates
 * (U+D800..U+DFFF), nothing above U+10FFFF.  The second byte's range
 * depends on the first; the later ones are always 0x80..0xBF.  A NUL
 * is never a continuation byte, so reading stops at the string's end. */
size_t cancel__utf8_seq(const unsigned char *s) {
  unsigned char c = s[0];
  if (c < 0x80)
    return 1;
  size_t n;
  unsigned char lo = 0x80, hi = 0xbf;
  if (c >= 0xc2 && c <= 0xdf) {
    n = 2;
  } else if (c >= 0xe0 && c <= 0xef) {
    n = 3;
    if (c == 0xe0)
      lo = 0xa0;
    else if (c == 0xed)
      hi = 0x9f;
  } else if (c >= 0xf0 && c <= 0xf4) {
    n = 4;
    if (c == 0xf0)
      lo = 0x90;
    else if (c == 0xf4)
      hi = 0x8f;
  } else {
    return 0;
  }
  if (s[1] < lo || s[1] > hi)
    return 0;
  for (size_t i = 2; i < n; i++)
    if (s[i] < 0x80 || s[i] > 0xbf)
      return 0;
  return n;
}
