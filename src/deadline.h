/*
 * Deadline arithmetic: the one place where the library adds, subtracts and
 * converts CLOCK_MONOTONIC nanoseconds.  Deadlines and durations come from
 * callers (and from clients, through deadline headers), so any of them may
 * be INT64_MIN or CANCEL_NEVER; plain `+` and `-` on them is signed
 * overflow, which is undefined behaviour and in practice turns a deadline
 * 292 years away into one 292 years ago.  Everything here saturates
 * instead: a sum past the end of time is CANCEL_NEVER (INT64_MAX), one
 * before its start is INT64_MIN, and both stay ordered correctly against
 * every real time.
 *
 * Static inline and free of any other internal declaration, so that the
 * optional libraries built on the core (adapters, host) can use the same
 * helpers rather than their own copies.
 */
#ifndef CANCEL_DEADLINE_H
#define CANCEL_DEADLINE_H

#include "cancel.h"

#include <limits.h>
#include <stdint.h>
#include <time.h>

/* a + b, clamped to [INT64_MIN, INT64_MAX]. */
static inline int64_t cancel__add_sat(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_add_overflow(a, b, &r))
    return b > 0 ? INT64_MAX : INT64_MIN;
  return r;
}

/* a - b, clamped to [INT64_MIN, INT64_MAX]. */
static inline int64_t cancel__sub_sat(int64_t a, int64_t b) {
  int64_t r;
  if (__builtin_sub_overflow(a, b, &r))
    return b < 0 ? INT64_MAX : INT64_MIN;
  return r;
}

/* The deadline `ns` after `t`: CANCEL_NEVER when that is past the end of
 * time (a duration of CANCEL_NEVER is "never", whatever t is). */
static inline int64_t cancel__deadline_after(int64_t t, int64_t ns) {
  if (ns == CANCEL_NEVER)
    return CANCEL_NEVER;
  return cancel__add_sat(t, ns);
}

/* The time from `now` until `deadline`: 0 when it has passed, CANCEL_NEVER
 * for no deadline, and below CANCEL_NEVER for every real deadline (so
 * that the answer can never be mistaken for "none"). */
static inline int64_t cancel__time_left(int64_t deadline, int64_t now) {
  if (deadline == CANCEL_NEVER)
    return CANCEL_NEVER;
  int64_t left = cancel__sub_sat(deadline, now);
  if (left <= 0)
    return 0;
  return left == CANCEL_NEVER ? CANCEL_NEVER - 1 : left;
}

/* A non-negative duration in whole milliseconds, rounded up (a wait that
 * ends early is a wait that has to be repeated), at most `max`. */
static inline int64_t cancel__ns_to_ms_ceil(int64_t ns, int64_t max) {
  if (ns <= 0)
    return 0;
  int64_t ms = ns / 1000000 + (ns % 1000000 != 0);
  return ms > max ? max : ms;
}

/* An absolute deadline as a timespec for the calls that take one (futex,
 * pthread_cond_clockwait): one that has passed is the clock's origin (a
 * negative tv_nsec is EINVAL, which would make a wait loop spin). */
static inline struct timespec cancel__timespec_at(int64_t deadline) {
  struct timespec ts;
  if (deadline < 0)
    deadline = 0;
  ts.tv_sec = (time_t)(deadline / 1000000000);
  ts.tv_nsec = (long)(deadline % 1000000000);
  return ts;
}

#endif /* CANCEL_DEADLINE_H */
