/* Error strings, version, and the loud reporting of API misuse. */
#define _GNU_SOURCE
#include "internal.h"

#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

const char *cancel_version(void) {
  return CANCEL_VERSION_STRING;
}

const char *cancel_strerror(int err) {
  if (err < 0)
    err = err == INT_MIN ? INT_MAX : -err; /* -INT_MIN overflows */
  switch (err) {
  case 0:
    return "success";
  case ECANCELED:
    return "operation cancelled: the token fired";
  case ETIMEDOUT:
    return "the call's own deadline passed";
  case EINVAL:
    return "invalid argument";
  case ENOMEM:
    return "out of memory";
  case EAGAIN:
    return "resource temporarily unavailable";
  default:
    break;
  }
#ifdef CANCEL_HAVE_STRERRORDESC_NP
  /* glibc's description table (2.32): static strings, thread-safe. */
  const char *s = strerrordesc_np(err);
#else
  /* musl's strerror() returns the same kind of string, from a constant
   * table, and is thread-safe there (cancel.h: Platform). */
  const char *s = strerror(err);
#endif
  return s != NULL ? s : "unknown error";
}

void cancel__misuse(const char *func, const char *what) {
  fprintf(stderr, "libcancel: misuse in %s: %s\n", func, what);
  if (getenv("CANCEL_ABORT_ON_MISUSE") != NULL)
    abort();
}
