/* Log lines in logfmt, written to a sink the application chooses. */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/log.h"

#include <errno.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES (CANCEL_LOG_LINE_MAX + 1)

/* The sink and its level.  The mutex also serialises the sink's calls, so
 * a sink needs no lock of its own and lines never interleave. */
static pthread_mutex_t sink_mu = PTHREAD_MUTEX_INITIALIZER;
static cancel_log_sink *sink_fn;
static void *sink_arg;
static int sink_level = CANCEL_LOG_INFO;

static void stderr_sink(int level, const char *line, size_t len, void *arg) {
  (void)level;
  (void)arg;
  /* One write for the line and its newline: the caller left room. */
  char *p = (char *)line;
  p[len] = '\n';
  size_t off = 0;
  while (off < len + 1) {
    ssize_t n = write(STDERR_FILENO, p + off, len + 1 - off);
    if (n < 0 && errno == EINTR)
      continue;
    if (n <= 0)
      break;
    off += (size_t)n;
  }
  p[len] = '\0';
}

void cancel_log_set_sink(cancel_log_sink *fn, void *arg, int min_level) {
  pthread_mutex_lock(&sink_mu);
  sink_fn = fn;
  sink_arg = arg;
  st_relaxed(&sink_level, min_level);
  pthread_mutex_unlock(&sink_mu);
}

int cancel_log_enabled(int level) {
  return level >= ld_relaxed(&sink_level);
}

const char *cancel_log_level_name(int level) {
  switch (level) {
  case CANCEL_LOG_DEBUG:
    return "debug";
  case CANCEL_LOG_INFO:
    return "info";
  case CANCEL_LOG_WARN:
    return "warn";
  case CANCEL_LOG_ERROR:
    return "error";
  default:
    return "level";
  }
}

/* ---- Values -------------------------------------------------------------- *
 * The grammar is go-logfmt's: key=value pairs separated by spaces; a value
 * is bare (printable ASCII, no '=', '"', '\'' or '\\') or a double-quoted
 * string that a decoder unquotes like a JSON string.  So a quoted value
 * uses only the escapes JSON has: \" \\ \n \r \t, \u00XX for the other
 * control bytes and DEL, and \ufffd for a byte that is not UTF-8 (what
 * go-logfmt's own encoder writes).  The line stays valid UTF-8, and no
 * byte a client sent can end a value, a field or the line. */

/* The marker of a value cut short, inside its quotes. */
#define CUT_MARK "..."
#define CUT_MARK_LEN 3

/* A value written bare needs no decoding at all; anything else is quoted.
 * Non-ASCII text is quoted too: it keeps bare values to the bytes every
 * logfmt reader agrees on. */
static bool bare_ok(const char *s) {
  if (*s == '\0')
    return false;
  for (; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    if (c <= 0x20 || c >= 0x7f || c == '=' || c == '"' || c == '\'' ||
        c == '\\')
      return false;
  }
  return true;
}

static const char hexd[] = "0123456789abcdef";

/* The escaped form of the character at *s (1-6 bytes into e) and its
 * length; *s moves past it.  A character is the unit a cut respects: an
 * escape or a UTF-8 sequence is written whole or not at all. */
static size_t next_unit(const unsigned char **s, char e[6]) {
  unsigned char c = **s;
  if (c < 0x80) {
    (*s)++;
    switch (c) {
    case '"':
    case '\\':
      e[0] = '\\';
      e[1] = (char)c;
      return 2;
    case '\n':
      memcpy(e, "\\n", 2);
      return 2;
    case '\r':
      memcpy(e, "\\r", 2);
      return 2;
    case '\t':
      memcpy(e, "\\t", 2);
      return 2;
    default:
      break;
    }
    if (c < 0x20 || c == 0x7f) {
      memcpy(e, "\\u00", 4);
      e[4] = hexd[c >> 4];
      e[5] = hexd[c & 0xf];
      return 6;
    }
    e[0] = (char)c;
    return 1;
  }
  size_t n = cancel__utf8_seq(*s);
  if (n == 0) {
    (*s)++;
    memcpy(e, "\\ufffd", 6);
    return 6;
  }
  memcpy(e, *s, n);
  *s += n;
  return n;
}

/* Writes v as one logfmt value into out, which has room bytes (the NUL
 * included); out NULL only measures.  A value that does not fit is cut
 * inside its quotes on a character boundary and ends with CUT_MARK, so the
 * closing quote is always there; with room for less than `"..."` it is
 * written as "" (or as nothing when even that does not fit: `key=` reads
 * as an empty value).  Returns the bytes written (or that would be);
 * *need (may be NULL) gets the length of the whole value. */
static size_t put_value(char *out, size_t room, const char *v, size_t *need) {
  if (v == NULL)
    v = "";
  bool bare = bare_ok(v);
  size_t full = 0;
  char e[6];
  if (bare) {
    full = strlen(v);
  } else {
    full = 2;
    for (const unsigned char *s = (const unsigned char *)v; *s != '\0';)
      full += next_unit(&s, e);
  }
  if (need != NULL)
    *need = full;
  if (room == 0)
    return 0;
  size_t w = 0;
#define PUT(p, n)                                                              \
  do {                                                                         \
    if (out != NULL)                                                           \
      memcpy(out + w, (p), (n));                                               \
    w += (n);                                                                  \
  } while (0)
  if (full < room && bare) {
    PUT(v, full);
  } else if (full < room) {
    PUT("\"", 1);
    for (const unsigned char *s = (const unsigned char *)v; *s != '\0';) {
      size_t n = next_unit(&s, e);
      PUT(e, n);
    }
    PUT("\"", 1);
  } else if (room >= 2 + CUT_MARK_LEN + 1) {
    PUT("\"", 1);
    for (const unsigned char *s = (const unsigned char *)v; *s != '\0';) {
      size_t n = next_unit(&s, e);
      if (w + n + CUT_MARK_LEN + 1 + 1 > room)
        break;
      PUT(e, n);
    }
    PUT(CUT_MARK "\"", CUT_MARK_LEN + 1);
  } else if (room >= 3) {
    PUT("\"\"", 2);
  }
#undef PUT
  if (out != NULL)
    out[w] = '\0';
  return w;
}

int cancel_logfmt_quote(char *buf, size_t len, const char *value) {
  size_t need;
  put_value(buf, buf != NULL ? len : 0, value, &need);
  return need > INT_MAX ? INT_MAX : (int)need;
}

/* ---- Fields ---------------------------------------------------------------
 * A writer of whole fields into a caller's buffer, snprintf style: `need`
 * counts what the unlimited output takes, `used` what was written.  Once a
 * field does not fit, no later one is written either, so what the buffer
 * holds always ends at a field boundary. */

struct fields {
  char *buf;
  size_t cap; /* bytes for text, the NUL not counted */
  size_t used;
  size_t need;
  bool full;
};

static void fields_init(struct fields *f, char *buf, size_t len) {
  f->buf = buf;
  f->cap = buf != NULL && len > 0 ? len - 1 : 0;
  f->used = f->need = 0;
  f->full = buf == NULL || len == 0;
  if (!f->full)
    buf[0] = '\0';
}

/* A key is the caller's identifier; a byte no logfmt key may hold (space,
 * '=', '"', control, non-ASCII) is written as '_' so a wrong key can
 * never split the line into other fields. */
static size_t put_key(char *out, const char *key) {
  size_t n = 0;
  if (key == NULL || *key == '\0')
    key = "_";
  for (; key[n] != '\0'; n++) {
    unsigned char c = (unsigned char)key[n];
    if (out != NULL)
      out[n] = c <= 0x20 || c >= 0x7f || c == '=' || c == '"' || c == '\''
                   ? '_'
                   : (char)c;
  }
  return n;
}

/* Adds " key=value" (no space before the first field), the value quoted
 * and cut to at most max bytes. */
static void fields_add(struct fields *f, const char *key, const char *value,
                       size_t max) {
  size_t sep = f->need > 0 ? 1 : 0;
  size_t klen = put_key(NULL, key);
  size_t vlen = put_value(NULL, max + 1, value, NULL);
  f->need += sep + klen + 1 + vlen;
  if (f->full)
    return;
  /* The value written is exactly vlen bytes: it is cut only to max,
   * never to what happens to be left in the buffer. */
  if (f->used + sep + klen + 1 + vlen > f->cap) {
    f->full = true;
    return;
  }
  char *p = f->buf + f->used;
  if (sep)
    *p++ = ' ';
  p += put_key(p, key);
  *p++ = '=';
  put_value(p, max + 1, value, NULL);
  f->used += sep + klen + 1 + vlen;
  f->buf[f->used] = '\0';
}

/* The longest value of a reason's field: a long origin leaves room for the
 * via path after it. */
#define REASON_VALUE_MAX 256

int cancel_logfmt_reason(char *buf, size_t len, const cancel_reason *r) {
  if (buf != NULL && len > 0)
    buf[0] = '\0';
  if (r == NULL || r->kind == CANCEL_NONE)
    return 0;
  struct fields f;
  fields_init(&f, buf, len);
  fields_add(&f, "cancel_kind", cancel_kind_name(r->kind), REASON_VALUE_MAX);
  fields_add(&f, "cancel_origin", r->origin != NULL ? r->origin : "",
             REASON_VALUE_MAX);
  if (r->detail != NULL && r->detail[0] != '\0')
    fields_add(&f, "cancel_detail", r->detail, REASON_VALUE_MAX);
  if (r->via_len > 0 || r->via_skipped > 0) {
    /* The path as cancel_reason_format says it (hops, the shield's grace
     * note, the hops left out), joined by '>': the quoting below escapes
     * the names' bytes once, for the whole path. */
    size_t vl = cancel__reason_via(r, ">", NULL, 0, 0);
    char stack[512];
    char *via = vl < sizeof stack ? stack : malloc(vl + 1);
    if (via != NULL) {
      (void)cancel__reason_via(r, ">", via, vl + 1, 0);
      fields_add(&f, "cancel_via", via, 2 * REASON_VALUE_MAX);
      if (via != stack)
        free(via);
    }
  }
  return f.need > INT_MAX ? INT_MAX : (int)f.need;
}

/* ---- Lines ----------------------------------------------------------------
 */

/* The field a line cut short ends with. */
#define TRUNC_FIELD " truncated=true"
#define TRUNC_LEN (sizeof TRUNC_FIELD - 1)

/* The caller's fields are text it formatted, with values it quoted: make
 * sure no byte of theirs breaks the line.  A control byte or a byte that is
 * not UTF-8 (both impossible in a value cancel_logfmt_quote wrote) becomes
 * '?', in place: the line is one line of valid UTF-8 whatever was passed. */
static void scrub(char *s, size_t n) {
  size_t i = 0;
  while (i < n) {
    unsigned char c = (unsigned char)s[i];
    if (c < 0x80) {
      if (c < 0x20 || c == 0x7f)
        s[i] = '?';
      i++;
      continue;
    }
    size_t k = cancel__utf8_seq((const unsigned char *)s + i);
    if (k == 0 || i + k > n) {
      s[i++] = '?';
      continue;
    }
    i += k;
  }
}

/* The end of the last field of s[0..n) that is whole: followed by a space
 * inside s (the text went on after n, so a field that reaches n may be cut).
 * Fields are read as a decoder reads them: a quoted value runs to its
 * closing unescaped quote, whatever spaces it holds. */
static size_t last_whole_field(const char *s, size_t n) {
  size_t i = 0, end = 0;
  while (i < n) {
    while (i < n && s[i] == ' ')
      i++;
    while (i < n && s[i] != ' ' && s[i] != '=')
      i++;
    if (i < n && s[i] == '=') {
      i++;
      if (i < n && s[i] == '"') {
        i++;
        while (i < n && s[i] != '"')
          i += s[i] == '\\' ? 2 : 1;
        if (i >= n)
          break;
        i++;
      }
      while (i < n && s[i] != ' ')
        i++;
    }
    if (i >= n)
      break;
    end = i; /* s[i] == ' ': the field before it is whole */
  }
  return end;
}

/* The line's head: ts, level, component and msg.  Returns its length. */
static size_t line_head(char *line, size_t cap, int level,
                        const char *component, const char *msg) {
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  int n = snprintf(
      line, cap + 1, "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s",
      tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour, tm.tm_min,
      tm.tm_sec, ts.tv_nsec / 1000000, cancel_log_level_name(level));
  struct fields f;
  fields_init(&f, line + n, cap + 1 - (size_t)n);
  f.need = 1; /* a space before the first field too */
  fields_add(&f, "component", component, 128);
  fields_add(&f, "msg", msg, 512);
  return (size_t)n + f.used;
}

static void line_emit(int level, char *line, size_t used) {
  line[used] = '\0';
  pthread_mutex_lock(&sink_mu);
  if (sink_fn != NULL)
    sink_fn(level, line, used, sink_arg);
  else
    stderr_sink(level, line, used, NULL);
  pthread_mutex_unlock(&sink_mu);
}

void cancel_log(int level, const char *component, const char *msg,
                const char *fields_fmt, ...) {
  if (!cancel_log_enabled(level))
    return;
  char line[LINE_MAX_BYTES + 1]; /* +1: room for the sink's newline */
  const size_t cap = LINE_MAX_BYTES - 1;
  size_t used = line_head(line, cap, level, component, msg);
  if (fields_fmt != NULL && fields_fmt[0] != '\0' && used + 1 < cap) {
    line[used++] = ' ';
    va_list ap;
    va_start(ap, fields_fmt);
    int n = vsnprintf(line + used, cap + 1 - used, fields_fmt, ap);
    va_end(ap);
    size_t got = n < 0 ? 0 : (size_t)n;
    if (used + got <= cap) {
      scrub(line + used, got);
      used += got;
    } else {
      /* Too long: keep the whole fields that leave room for the marker
       * (a field boundary, never inside a value or an escape). */
      size_t room = cap - used;
      size_t keep = room > TRUNC_LEN
                        ? last_whole_field(line + used, room - TRUNC_LEN)
                        : 0;
      scrub(line + used, keep);
      used += keep;
      if (keep == 0)
        used--; /* no field of the caller's: drop the space too */
      memcpy(line + used, TRUNC_FIELD, TRUNC_LEN);
      used += TRUNC_LEN;
    }
  }
  line_emit(level, line, used);
}

void cancel_log_fields(int level, const char *component, const char *msg,
                       const cancel_log_field *fields, size_t nfields) {
  if (!cancel_log_enabled(level))
    return;
  char line[LINE_MAX_BYTES + 1];
  const size_t cap = LINE_MAX_BYTES - 1;
  size_t used = line_head(line, cap, level, component, msg);
  struct fields f;
  fields_init(&f, line + used, cap - TRUNC_LEN - used + 1);
  f.need = 1;
  for (size_t i = 0; i < nfields && fields != NULL; i++)
    fields_add(&f, fields[i].key, fields[i].value, CANCEL_LOG_VALUE_MAX);
  used += f.used;
  if (f.full) {
    memcpy(line + used, TRUNC_FIELD, TRUNC_LEN);
    used += TRUNC_LEN;
  }
  line_emit(level, line, used);
}

/* ---- Typed fields -------------------------------------------------------- */

/* A double as logfmt text: the shortest %g that reads back as the same
 * value (what Go's strconv.FormatFloat(x, 'g', -1, 64) gives, in C's
 * spelling of the exponent), or with a fixed number of decimals. */
static void put_double(char *out, size_t len, double x, int decimals) {
  if (isnan(x)) {
    snprintf(out, len, "NaN");
    return;
  }
  if (isinf(x)) {
    snprintf(out, len, "%s", x > 0 ? "+Inf" : "-Inf");
    return;
  }
  if (decimals >= 0) {
    snprintf(out, len, "%.*f", decimals, x);
    return;
  }
  for (int p = 1; p <= 17; p++) {
    snprintf(out, len, "%.*g", p, x);
    if (strtod(out, NULL) == x)
      return;
  }
}

/* The symbolic name of an errno value, or NULL.  glibc has the table
 * (strerrorname_np, 2.32); without it (musl) a table of our own names the
 * errors libcancel returns, and others are logged as their number
 * (cancel.h: Platform). */
static const char *errno_name(int e) {
#ifdef CANCEL_HAVE_STRERRORNAME_NP
  return strerrorname_np(e);
#else
  /* The errors libcancel and the calls it wraps return; the others are
   * logged as their number. */
  switch (e) {
#define NAME(x)                                                                \
  case x:                                                                      \
    return #x
    NAME(EPERM); NAME(ENOENT); NAME(ESRCH); NAME(EINTR); NAME(EIO);
    NAME(EBADF); NAME(ECHILD); NAME(EAGAIN); NAME(ENOMEM); NAME(EACCES);
    NAME(EFAULT); NAME(EBUSY); NAME(EEXIST); NAME(EINVAL); NAME(ENFILE);
    NAME(EMFILE); NAME(ENOSPC); NAME(EPIPE); NAME(ERANGE); NAME(EDEADLK);
    NAME(ENOSYS); NAME(EOVERFLOW); NAME(ENOTSOCK); NAME(EMSGSIZE);
    NAME(EOPNOTSUPP); NAME(EADDRINUSE); NAME(ENETUNREACH); NAME(ECONNABORTED);
    NAME(ECONNRESET); NAME(ENOBUFS); NAME(ENOTCONN); NAME(ETIMEDOUT);
    NAME(ECONNREFUSED); NAME(EHOSTUNREACH); NAME(EALREADY); NAME(EINPROGRESS);
    NAME(EPROTO); NAME(ECANCELED);
#undef NAME
  default:
    return NULL;
  }
#endif
}

/* Adds text that is already whole fields (cancel_logfmt_reason's): scrubbed
 * as cancel_log's fields are, and cut at the last field boundary that fits. */
static void fields_add_logfmt(struct fields *f, const char *text) {
  size_t len = text != NULL ? strlen(text) : 0;
  if (len == 0)
    return;
  size_t sep = f->need > 0 ? 1 : 0;
  f->need += sep + len;
  if (f->full)
    return;
  size_t room = f->cap - f->used;
  size_t keep = len;
  if (sep + len > room) {
    /* The field that ends right at the room's end is whole when a space
     * follows it in text: let last_whole_field see that space. */
    keep = room > sep ? last_whole_field(text, room - sep + 1) : 0;
    f->full = true;
    if (keep == 0)
      return;
  }
  char *p = f->buf + f->used;
  if (sep)
    *p++ = ' ';
  memcpy(p, text, keep);
  scrub(p, keep);
  f->used += sep + keep;
  f->buf[f->used] = '\0';
}

/* Adds a reason's fields, written by cancel_logfmt_reason straight into the
 * room that is left: it writes only whole fields, so a reason that does not
 * fit leaves some of them out and the line is cut after them. */
static void fields_add_reason(struct fields *f, const cancel_reason *r) {
  if (r == NULL || r->kind == CANCEL_NONE)
    return;
  size_t sep = f->need > 0 ? 1 : 0;
  if (f->full)
    return;
  size_t room = f->cap - f->used;
  if (room <= sep) {
    f->full = true;
    return;
  }
  char *p = f->buf + f->used + sep;
  int need = cancel_logfmt_reason(p, room - sep + 1, r);
  size_t got = strlen(p);
  f->need += sep + (size_t)need;
  if (got < (size_t)need)
    f->full = true;
  if (got == 0) {
    f->buf[f->used] = '\0';
    return;
  }
  if (sep)
    f->buf[f->used] = ' ';
  f->used += sep + got;
}

static void fields_add_attr(struct fields *f, const cancel_log_attr *a) {
  char num[352]; /* a FIXED 1e308 with 17 decimals */
  const char *v = num;
  size_t max = CANCEL_LOG_VALUE_MAX;
  switch (a->type) {
  case CANCEL_LOG_T_STR:
    v = a->v.s;
    if (a->arg > 0 && a->arg < max)
      max = a->arg;
    break;
  case CANCEL_LOG_T_I64:
    snprintf(num, sizeof num, "%" PRId64, a->v.i);
    break;
  case CANCEL_LOG_T_U64:
    snprintf(num, sizeof num, "%" PRIu64, a->v.u);
    break;
  case CANCEL_LOG_T_F64:
    put_double(num, sizeof num, a->v.d, -1);
    break;
  case CANCEL_LOG_T_FIXED:
    /* More than 17 decimals say nothing a double holds; the cap keeps
     * a huge value's text inside num. */
    put_double(num, sizeof num, a->v.d, a->arg > 17 ? 17 : a->arg);
    break;
  case CANCEL_LOG_T_BOOL:
    v = a->v.b ? "true" : "false";
    break;
  case CANCEL_LOG_T_MS:
    /* The division as cancel_log's callers wrote it ("%.1f", ns / 1e6),
     * so a converted line reads as it did. */
    put_double(num, sizeof num, (double)a->v.i / 1e6, a->arg > 9 ? 9 : a->arg);
    break;
  case CANCEL_LOG_T_ERRNO: {
    int e = a->v.err;
    const char *name = NULL;
    if (e != 0 && e != INT_MIN)
      name = errno_name(e < 0 ? -e : e);
    if (name != NULL)
      v = name;
    else
      snprintf(num, sizeof num, "%d", e);
    break;
  }
  case CANCEL_LOG_T_REASON:
    fields_add_reason(f, a->v.r);
    return;
  case CANCEL_LOG_T_LOGFMT:
    fields_add_logfmt(f, a->v.s);
    return;
  default:
    v = "";
    break;
  }
  fields_add(f, a->key, v, max);
}

void cancel_log_attrs(int level, const char *component, const char *msg,
                      const cancel_log_attr *attrs, size_t nattrs) {
  if (!cancel_log_enabled(level))
    return;
  char line[LINE_MAX_BYTES + 1];
  const size_t cap = LINE_MAX_BYTES - 1;
  size_t used = line_head(line, cap, level, component, msg);
  struct fields f;
  fields_init(&f, line + used, cap - TRUNC_LEN - used + 1);
  f.need = 1;
  for (size_t i = 0; i < nattrs && attrs != NULL; i++)
    fields_add_attr(&f, &attrs[i]);
  used += f.used;
  if (f.full) {
    memcpy(line + used, TRUNC_FIELD, TRUNC_LEN);
    used += TRUNC_LEN;
  }
  line_emit(level, line, used);
}
