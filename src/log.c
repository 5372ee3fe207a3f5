/* Log lines in logfmt, written to a sink the application chooses. */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/log.h"

#include <errno.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define LINE_MAX_BYTES 2048

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

static bool needs_quotes(const char *s) {
  if (*s == '\0')
    return true;
  for (; *s != '\0'; s++)
    if (*s == ' ' || *s == '=' || *s == '"' || *s == '\\' ||
        (unsigned char)*s < 0x20 || *s == 0x7f)
      return true;
  return false;
}

int cancel_logfmt_quote(char *buf, size_t len, const char *value) {
  if (value == NULL)
    value = "";
  if (!needs_quotes(value))
    return snprintf(buf, len, "%s", value);
  /* Count the whole escaped length, write what fits. */
  size_t need = 0;
  char esc[8];
#define PUT(c)                                                                 \
  do {                                                                         \
    if (need + 1 < len)                                                        \
      buf[need] = (c);                                                         \
    need++;                                                                    \
  } while (0)
  PUT('"');
  for (const char *s = value; *s != '\0'; s++) {
    unsigned char c = (unsigned char)*s;
    const char *e = NULL;
    if (c == '"')
      e = "\\\"";
    else if (c == '\\')
      e = "\\\\";
    else if (c == '\n')
      e = "\\n";
    else if (c == '\t')
      e = "\\t";
    else if (c < 0x20 || c == 0x7f) {
      snprintf(esc, sizeof esc, "\\x%02x", c);
      e = esc;
    }
    if (e != NULL)
      for (; *e != '\0'; e++)
        PUT(*e);
    else
      PUT((char)c);
  }
  PUT('"');
#undef PUT
  if (len > 0)
    buf[need < len ? need : len - 1] = '\0';
  return (int)need;
}

int cancel_logfmt_reason(char *buf, size_t len, const cancel_reason *r) {
  if (len > 0)
    buf[0] = '\0';
  if (r == NULL || r->kind == CANCEL_NONE)
    return 0;
  char q[256], via[512] = "";
  size_t vl = 0;
  for (size_t i = 0; i < r->via_len && vl < sizeof via; i++) {
    int n = snprintf(via + vl, sizeof via - vl, "%s%s", i > 0 ? ">" : "",
                     r->via[i].name);
    if (n < 0)
      break;
    vl += (size_t)n;
  }
  cancel_logfmt_quote(q, sizeof q, r->origin);
  char kind[64];
  cancel_logfmt_quote(kind, sizeof kind, cancel_kind_name(r->kind));
  int n = snprintf(buf, len, "cancel_kind=%s cancel_origin=%s", kind, q);
  size_t used = n > 0 ? (size_t)n : 0;
  if (r->detail != NULL && r->detail[0] != '\0') {
    cancel_logfmt_quote(q, sizeof q, r->detail);
    n = snprintf(used < len ? buf + used : NULL, used < len ? len - used : 0,
                 " cancel_detail=%s", q);
    used += n > 0 ? (size_t)n : 0;
  }
  if (via[0] != '\0') {
    char vq[600];
    cancel_logfmt_quote(vq, sizeof vq, via);
    n = snprintf(used < len ? buf + used : NULL, used < len ? len - used : 0,
                 " cancel_via=%s", vq);
    used += n > 0 ? (size_t)n : 0;
  }
  return (int)used;
}

void cancel_log(int level, const char *component, const char *msg,
                const char *fields_fmt, ...) {
  if (!cancel_log_enabled(level))
    return;
  char line[LINE_MAX_BYTES + 1]; /* +1: room for the sink's newline */
  struct timespec ts;
  clock_gettime(CLOCK_REALTIME, &ts);
  struct tm tm;
  gmtime_r(&ts.tv_sec, &tm);
  char m[512], c[128];
  cancel_logfmt_quote(m, sizeof m, msg);
  cancel_logfmt_quote(c, sizeof c, component);
  int n = snprintf(line, LINE_MAX_BYTES,
                   "ts=%04d-%02d-%02dT%02d:%02d:%02d.%03ldZ level=%s "
                   "component=%s msg=%s",
                   tm.tm_year + 1900, tm.tm_mon + 1, tm.tm_mday, tm.tm_hour,
                   tm.tm_min, tm.tm_sec, ts.tv_nsec / 1000000,
                   cancel_log_level_name(level), c, m);
  size_t used = n < 0                        ? 0
                : (size_t)n < LINE_MAX_BYTES ? (size_t)n
                                             : LINE_MAX_BYTES - 1;
  if (fields_fmt != NULL && fields_fmt[0] != '\0' &&
      used + 1 < LINE_MAX_BYTES) {
    line[used++] = ' ';
    va_list ap;
    va_start(ap, fields_fmt);
    n = vsnprintf(line + used, LINE_MAX_BYTES - used, fields_fmt, ap);
    va_end(ap);
    if (n > 0)
      used += (size_t)n < LINE_MAX_BYTES - used ? (size_t)n
                                                : LINE_MAX_BYTES - used - 1;
  }
  line[used] = '\0';
  pthread_mutex_lock(&sink_mu);
  if (sink_fn != NULL)
    sink_fn(level, line, used, sink_arg);
  else
    stderr_sink(level, line, used, NULL);
  pthread_mutex_unlock(&sink_mu);
}
