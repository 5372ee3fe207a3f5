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
 * source names and details) MUST reach a line as typed fields
 * (CANCEL_LOG and cancel_log_attrs below), which the library quotes
 * itself; never through a %s of cancel_log's format.
 *
 * The call to use:
 *   CANCEL_LOG(CANCEL_LOG_WARN, "reportd", "job failed",
 *              CANCEL_LOG_I64("job", job), CANCEL_LOG_STR("stage", stage),
 *              CANCEL_LOG_MS("dur_ms", cancel_now() - t0),
 *              CANCEL_LOG_ERRNO("error", rc), CANCEL_LOG_REASON(&why));
 * writes ... job=17 stage="risk model" dur_ms=12.345 error=ECANCELED
 * cancel_kind=timeout cancel_origin=... whatever bytes `stage` holds.
 */
#ifndef CANCEL_LOG_H
#define CANCEL_LOG_H

#include <cancel.h>

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

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
 * Superseded by CANCEL_LOG, and kept for the callers written before it:
 * the only values its format may take are ones no client controls and
 * that need no quoting (numbers, fixed words).  A %s of anything else
 * breaks the line for every decoder: "stage=%s" with "risk model" reads
 * as the field stage=risk and a key model without a value.
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
 * library quotes itself: the string-only form of cancel_log_attrs (which
 * new code uses, through CANCEL_LOG).
 * Each value is cut at CANCEL_LOG_VALUE_MAX bytes; a field that no longer
 * fits the line is left out with every later one, and the line ends with
 * truncated=true.  fields may be NULL when nfields is 0.
 * Thread-safe. */
CANCEL_API void cancel_log_fields(int level, const char *component,
                                  const char *msg,
                                  const cancel_log_field *fields,
                                  size_t nfields);

/* ---- Typed fields ------------------------------------------------------
 * A cancel_log_attr is one field of a line: a key and a typed value that
 * the library formats and quotes itself.  The CANCEL_LOG_* macros below
 * build them; CANCEL_LOG(level, component, msg, attr, ...) writes a line
 * of them (it counts them for you).
 *
 * Each type's output, as a decoder reads it:
 *   STR     the text (NULL reads as ""), quoted and escaped as above when
 *           it is not a bare word; cut to `arg` bytes, quotes included
 *           (0: CANCEL_LOG_VALUE_MAX), with "..." before the closing quote.
 *   I64     decimal, with '-' when negative:            attempt=-3
 *   U64     decimal:                                    bytes=4096
 *   F64     the shortest decimal that reads back as the same double
 *           (printf's %g form with 1 to 17 digits), NaN, +Inf, -Inf:
 *                                                        ratio=0.1 big=1e+300
 *   FIXED   a double with `arg` decimals (%.*f, at most 17), NaN, +Inf,
 *           -Inf:                                        ratio=0.25
 *   BOOL    true or false.
 *   MS      a duration in nanoseconds (int64) written as milliseconds
 *           with `arg` decimals: CANCEL_LOG_MS gives 3 (microseconds),
 *           CANCEL_LOG_MSD(key, ns, d) d (0 to 9):      dur_ms=12.345
 *   ERRNO   an errno value (the sign is ignored: libcancel's -ECANCELED
 *           and errno's ECANCELED read the same) as its symbolic name,
 *           or as the number given when the C library has no name for it:
 *                                                        error=ECANCELED
 *           0 is written as 0.
 *   REASON  the fields of cancel_logfmt_reason (cancel_kind, cancel_origin,
 *           cancel_detail, cancel_via); the key is not used.  A reason
 *           NULL or not cancelled writes no field.
 *   LOGFMT  text that is already whole logfmt fields, as
 *           cancel_logfmt_reason wrote them (for fields kept from a moment
 *           when the reason could be read); the key is not used.  The text
 *           is checked like cancel_log's fields (a control byte or a byte
 *           that is not UTF-8 becomes '?') and cut at a field boundary.
 *           Never a client's text: that is what STR is for.
 * Keys are the caller's fixed identifiers, written as cancel_log_fields
 * writes them.  A field that no longer fits the line is left out with
 * every later one, and the line ends with truncated=true.
 *
 * The struct is part of the ABI: new types are added at the end of the
 * enum, and the layout does not change.  Fill it through the macros. */
enum cancel_log_type {
  CANCEL_LOG_T_STR = 1,
  CANCEL_LOG_T_I64 = 2,
  CANCEL_LOG_T_U64 = 3,
  CANCEL_LOG_T_F64 = 4,
  CANCEL_LOG_T_FIXED = 5,
  CANCEL_LOG_T_BOOL = 6,
  CANCEL_LOG_T_MS = 7,
  CANCEL_LOG_T_ERRNO = 8,
  CANCEL_LOG_T_REASON = 9,
  CANCEL_LOG_T_LOGFMT = 10
};

typedef struct cancel_log_attr {
  const char *key;
  unsigned short type; /* enum cancel_log_type */
  unsigned short arg;  /* STR: longest value; FIXED, MS: decimals */
  union {
    const char *s;          /* STR, LOGFMT */
    int64_t i;              /* I64, MS (nanoseconds) */
    uint64_t u;             /* U64 */
    double d;               /* F64, FIXED */
    bool b;                 /* BOOL */
    int err;                /* ERRNO */
    const cancel_reason *r; /* REASON */
  } v;
} cancel_log_attr;

/* The fields' constructors (compound literals: C99 and later, not C++).
 * Each evaluates its arguments once and converts the value to the type's
 * member, so CANCEL_LOG_I64("n", an_int) and CANCEL_LOG_U64("bytes",
 * a_size_t) need no cast; a pointer given where a number belongs (or the
 * reverse) is a compile-time diagnostic. */
#define CANCEL_LOG_ATTR_(k, t, a, m, x)                                        \
  ((cancel_log_attr){.key = (k), .type = (t), .arg = (a), .v = {.m = (x)}})
#define CANCEL_LOG_STR(key, text)                                              \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_STR, 0, s, text)
#define CANCEL_LOG_STRN(key, text, max)                                        \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_STR, max, s, text)
#define CANCEL_LOG_I64(key, value)                                             \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_I64, 0, i, value)
#define CANCEL_LOG_U64(key, value)                                             \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_U64, 0, u, value)
#define CANCEL_LOG_F64(key, value)                                             \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_F64, 0, d, value)
#define CANCEL_LOG_FIXED(key, value, decimals)                                 \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_FIXED, decimals, d, value)
#define CANCEL_LOG_BOOL(key, value)                                            \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_BOOL, 0, b, (value) != 0)
#define CANCEL_LOG_MS(key, ns) CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_MS, 3, i, ns)
#define CANCEL_LOG_MSD(key, ns, decimals)                                      \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_MS, decimals, i, ns)
#define CANCEL_LOG_ERRNO(key, value)                                           \
  CANCEL_LOG_ATTR_(key, CANCEL_LOG_T_ERRNO, 0, err, value)
#define CANCEL_LOG_REASON(reason)                                              \
  CANCEL_LOG_ATTR_(NULL, CANCEL_LOG_T_REASON, 0, r, reason)
#define CANCEL_LOG_LOGFMT(fields)                                              \
  CANCEL_LOG_ATTR_(NULL, CANCEL_LOG_T_LOGFMT, 0, s, fields)

/* Writes `ts=... level=... component=<component> msg=<msg>` followed by
 * the nattrs fields of attrs, each formatted and quoted by the library as
 * the table above says.  component and msg are quoted (msg cut at 512
 * bytes); a line longer than CANCEL_LOG_LINE_MAX keeps the fields that
 * fit whole and ends with truncated=true.  attrs may be NULL when nattrs
 * is 0.  An attr of a type this library does not know is written as its
 * key with an empty value.
 * Thread-safe. */
CANCEL_API void cancel_log_attrs(int level, const char *component,
                                 const char *msg, const cancel_log_attr *attrs,
                                 size_t nattrs);

/* cancel_log_attrs with the fields as arguments, counted for you:
 *   CANCEL_LOG(CANCEL_LOG_INFO, "reportd", "job started",
 *              CANCEL_LOG_I64("job", job), CANCEL_LOG_STR("stage", s));
 * At least one field (a line without fields: cancel_log_attrs with
 * NULL, 0).  The fields are evaluated once, even when the level is not
 * enabled: a costly value is computed behind cancel_log_enabled. */
#define CANCEL_LOG(level, component, msg, ...)                                 \
  cancel_log_attrs((level), (component), (msg),                                \
                   (const cancel_log_attr[]){__VA_ARGS__},                     \
                   sizeof((const cancel_log_attr[]){__VA_ARGS__}) /            \
                       sizeof(cancel_log_attr))

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
