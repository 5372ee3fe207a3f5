/*
 * libcancel's log lines: one logfmt line per event, written to a sink the
 * application chooses.
 *
 * The host, the HTTP server side and the diagnostics write through here, so
 * a service routes all of libcancel's lines into its own logger with one
 * call.  The default sink writes each line to standard error with a single
 * write(2) (lines of concurrent threads never interleave).
 *
 * A line looks like
 *   ts=2026-11-29T12:00:00.123Z level=warn component=http msg="request
 *   timed out" id=17 route=/reports/{id} status=504 cancel_kind=timeout
 *   cancel_origin="route timeout" cancel_via="request 17"
 * (one line, no newline inside; the sink gets it without the final '\n').
 * Keys are fixed identifiers; values that hold spaces, '=', '"' or
 * nothing are quoted, with '"', '\' and control characters escaped.
 */
#ifndef CANCEL_LOG_H
#define CANCEL_LOG_H

#include <cancel.h>

#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

enum cancel_log_level {
  CANCEL_LOG_DEBUG = 10,
  CANCEL_LOG_INFO = 20,
  CANCEL_LOG_WARN = 30,
  CANCEL_LOG_ERROR = 40
};

/* Receives one complete line (len bytes, NUL-terminated, no newline).  It
 * runs on the thread that logs, one call at a time (calls are serialised
 * by the library); it MUST NOT log through cancel_log itself. */
typedef void cancel_log_sink(int level, const char *line, size_t len,
                             void *arg);

/* Routes lines of at least min_level to fn(level, line, len, arg); fn NULL
 * restores the default sink (standard error).
 * Thread-safe: a line being written when the sink changes goes to one of
 * the two, whole. */
CANCEL_API void cancel_log_set_sink(cancel_log_sink *fn, void *arg,
                                    int min_level);

/* Whether a line of `level` would be written (to skip costly fields). */
CANCEL_API int cancel_log_enabled(int level);

/* "debug", "info", "warn", "error" (or "level<N>").  Never NULL. */
CANCEL_API const char *cancel_log_level_name(int level);

/* Writes `ts=... level=... component=<component> msg=<msg>` followed by
 * the fields that fields_fmt (printf-style, may be NULL) produces: a
 * space-separated list of key=value pairs whose values the caller quoted
 * (cancel_logfmt_quote) where needed.  A line longer than 2 KiB is cut.
 * Thread-safe. */
CANCEL_API void cancel_log(int level, const char *component, const char *msg,
                           const char *fields_fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* Writes value as a logfmt value into buf (quoted and escaped when it
 * needs to be; "" for NULL), snprintf style: returns the length the whole
 * value needs, truncating to len-1 bytes. */
CANCEL_API int cancel_logfmt_quote(char *buf, size_t len, const char *value);

/* The fields of a cancellation reason, snprintf style:
 *   cancel_kind=timeout cancel_origin="route timeout" cancel_detail=2s
 *   cancel_via="request 17>GET /reports/{id}"
 * (detail and via only when not empty; via hops joined by '>', origin
 * side first).  r NULL or not cancelled: "" (returns 0). */
CANCEL_API int cancel_logfmt_reason(char *buf, size_t len,
                                    const cancel_reason *r);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_LOG_H */
