/* The library's clock: CLOCK_MONOTONIC nanoseconds. */
#include "internal.h"

#include <inttypes.h>
#include <stdio.h>
#include <time.h>

int64_t cancel_now(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

void cancel__format_duration(char *buf, size_t len, int64_t ns) {
  /* The largest unit that divides the duration exactly: what a person
   * wrote ("2s", "250ms") comes back the way they wrote it. */
  if (ns != 0 && ns % 1000000000 == 0)
    snprintf(buf, len, "%" PRId64 "s", ns / 1000000000);
  else if (ns != 0 && ns % 1000000 == 0)
    snprintf(buf, len, "%" PRId64 "ms", ns / 1000000);
  else if (ns != 0 && ns % 1000 == 0)
    snprintf(buf, len, "%" PRId64 "us", ns / 1000);
  else
    snprintf(buf, len, "%" PRId64 "ns", ns);
}
