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
 *   cancel_origin="route GET /reports/{id}" cancel_detail=2s
 *   cancel_via="client 10.0.0.7:5123"
 * (one line, no newline inside; the sink gets it without the final '\n').
 *
 * The grammar is go-logfmt's, so any logfmt decoder reads exactly the
 * fields written, whatever bytes a client put into a value:
 *  - key=value pairs separated by one space; keys are the caller's fixed
 *    identifiers (a byte no key may hold is written as '_');
 *  - a value is bare when it is printable ASCII without '=', '"', '\''
 *    or '\' (and not empty), else double-quoted with the escapes of a JSON
 *    string: \" \\ \n \r \t, \u00XX for other control bytes and DEL,
 *    and \ufffd for each byte that is not part of well-formed UTF-8, so a
 *    line is always valid UTF-8;
 *  - a value too long for its room is cut inside its quotes, on a
 *    character boundary, and ends with "..." before the closing quote;
 *  - a line longer than CANCEL_LOG_LINE_MAX is cut at a field boundary
 *    and ends with the field truncated=true.
 * Values a client controls (paths, methods, header values, addresses,
 * source names and details) MUST reach a line through cancel_log_fields
 * or cancel_logfmt_quote, never through a bare %s.
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

/* The longest line a sink gets, in bytes (the NUL and newline not
 * counted). */
#define CANCEL_LOG_LINE_MAX 2047

/* The longest value cancel_log_fields writes, quotes included: a longer
 * one is cut (with "..."), so one huge value cannot push every later
 * field off the line. */
#define CANCEL_LOG_VALUE_MAX 1024

/* Writes `ts=... level=... component=<component> msg=<msg>` followed by
 * the fields that fields_fmt (printf-style, may be NULL) produces: a
 * space-separated list of key=value pairs whose values the caller quoted
 * (cancel_logfmt_quote) unless they are numbers or fixed words.
 * component and msg are quoted here (msg cut at 512 bytes).  A line longer
 * than CANCEL_LOG_LINE_MAX keeps the caller's fields that fit whole and
 * ends with truncated=true.  A control byte or a byte that is not UTF-8 in
 * the formatted fields (a value the caller forgot to quote) is written as
 * '?': it cannot end the line.
 * Thread-safe. */
CANCEL_API void cancel_log(int level, const char *component, const char *msg,
                           const char *fields_fmt, ...)
    __attribute__((format(printf, 4, 5)));

/* One field of cancel_log_fields: the value is any text (NULL reads as
 * ""); the library quotes and escapes it. */
typedef struct cancel_log_field {
  const char *key;
  const char *value;
} cancel_log_field;

/* Like cancel_log, with the fields given as key/value pairs that the
 * library quotes itself: the call to use for values a client controls.
 * Each value is cut at CANCEL_LOG_VALUE_MAX bytes; a field that no longer
 * fits the line is left out with every later one, and the line ends with
 * truncated=true.  fields may be NULL when nfields is 0.
 * Thread-safe. */
CANCEL_API void cancel_log_fields(int level, const char *component,
                                  const char *msg,
                                  const cancel_log_field *fields,
                                  size_t nfields);

/* Writes value as one logfmt value into buf (bare when it can be, else
 * quoted and escaped as above; `""` for NULL or empty), snprintf style:
 * returns the length the whole value needs.  When that is len or more,
 * the value written is cut inside its quotes on a character boundary and
 * ends with `..."`: buf always holds a complete value (with len of 6 or
 * more; 3 to 5 give `""`, 1 or 2 give an empty string).  buf may be NULL
 * when len is 0 (to measure). */
CANCEL_API int cancel_logfmt_quote(char *buf, size_t len, const char *value);

/* The fields of a cancellation reason, snprintf style:
 *   cancel_kind=shutdown cancel_origin=host cancel_detail=SIGTERM
 *   cancel_via="drain (grace 20s expired)>client 10.0.0.7:5123"
 * (detail and via only when not empty; via hops joined by '>', origin
 * side first, each with its note as cancel_reason_format writes it, and
 * "(N more)>" first when hops were left out of the reason).  r NULL or not cancelled: "" (returns 0).  Origin and
 * detail are cut at 256 bytes, via at 512 (quotes included, with "...").
 * Returns the length all the fields need; buf gets the whole fields that
 * fit in len-1 bytes, so it never ends inside a value. */
CANCEL_API int cancel_logfmt_reason(char *buf, size_t len,
                                    const cancel_reason *r);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_LOG_H */
