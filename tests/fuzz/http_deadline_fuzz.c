/*
 * libFuzzer harness: the deadline-header parser (cancel_http_parse_timeout)
 * against a reference reading of the two grammars written here, the slow
 * and obvious way (128-bit arithmetic, no early exits):
 *   grpc-timeout          1-8 ASCII digits, then one unit of H M S m u n
 *   X-Request-Timeout-Ms  1-12 ASCII digits of milliseconds
 * A valid value too large for int64_t nanoseconds reads as INT64_MAX.
 * The input is used whole as one header value (a NUL inside ends it, as it
 * would for a C string), once per grammar.
 */
#include "cancel/http.h"

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int reference(const char *v, int grpc, int64_t *out) {
  size_t len = strlen(v), digits = 0;
  while (digits < len && v[digits] >= '0' && v[digits] <= '9')
    digits++;
  if (digits == 0 || digits > (grpc ? 8u : 12u))
    return -EINVAL;
  unsigned __int128 n = 0;
  for (size_t i = 0; i < digits; i++)
    n = n * 10 + (unsigned)(v[i] - '0');
  unsigned __int128 unit;
  if (!grpc) {
    if (digits != len)
      return -EINVAL;
    unit = 1000000;
  } else {
    if (len != digits + 1)
      return -EINVAL;
    switch (v[digits]) {
    case 'H': unit = (unsigned __int128)3600 * 1000000000; break;
    case 'M': unit = (unsigned __int128)60 * 1000000000; break;
    case 'S': unit = 1000000000; break;
    case 'm': unit = 1000000; break;
    case 'u': unit = 1000; break;
    case 'n': unit = 1; break;
    default: return -EINVAL;
    }
  }
  unsigned __int128 ns = n * unit;
  *out = ns > INT64_MAX ? INT64_MAX : (int64_t)ns;
  return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  char *v = malloc(size + 1);
  if (v == NULL)
    return 0;
  memcpy(v, data, size);
  v[size] = '\0';
  for (int grpc = 0; grpc <= 1; grpc++) {
    int64_t got = -42, want = -42;
    int rc = cancel_http_parse_timeout(v, grpc, &got);
    int ref = reference(v, grpc, &want);
    if (rc != ref || (rc == 0 && got != want)) {
      fprintf(stderr, "parse(\"%s\", grpc=%d): rc %d ns %lld, want rc %d ns %lld\n",
              v, grpc, rc, (long long)got, ref, (long long)want);
      abort();
    }
    if (rc == 0 && got < 0)
      abort(); /* a budget is never negative */
  }
  free(v);
  return 0;
}
