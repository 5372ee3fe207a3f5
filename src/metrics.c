/*
 * Metrics of cancellation: counters by kind and by origin, histograms of
 * overruns and wake latencies, written in Prometheus' text format.
 * Everything is a relaxed atomic: a metric never orders anything.
 */
#define _GNU_SOURCE
#include "internal.h"

#include "cancel/diag.h"

#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>

/* ---- Counters by kind and origin -------------------------------------- */

static uint64_t by_kind[5]; /* [0] user kinds, [1..4] the library's */

#define ORIGINS 128
#define ORIGIN_LEN 48

struct origin {
  char name[ORIGIN_LEN];
  uint32_t used; /* atomic: name is complete once this is 1 */
  uint64_t count;
};

static struct origin origins[ORIGINS];
static uint64_t origin_other;
static pthread_mutex_t origin_mu = PTHREAD_MUTEX_INITIALIZER;

/* The origin's name up to its first digit, trailing spaces and ':' cut:
 * "client 10.0.0.7:5123" -> "client", "request 17" -> "request".  Names
 * may come from clients, so the label is made valid UTF-8 here, once, for
 * the page: a byte that is not part of a well-formed sequence becomes
 * U+FFFD, and the cut at ORIGIN_LEN - 1 bytes falls between characters.
 * Names that differ only in such bytes share a label (and a series). */
static size_t label_of(const char *name, char *out) {
  static const char repl[] = "\xef\xbf\xbd"; /* U+FFFD */
  const unsigned char *s = (const unsigned char *)name;
  size_t n = 0;
  while (*s != '\0' && !(*s >= '0' && *s <= '9')) {
    size_t k = cancel__utf8_seq(s);
    const char *from = k > 0 ? (const char *)s : repl;
    size_t w = k > 0 ? k : 3;
    if (n + w > ORIGIN_LEN - 1)
      break;
    memcpy(out + n, from, w);
    n += w;
    s += k > 0 ? k : 1;
  }
  while (n > 0 && (out[n - 1] == ' ' || out[n - 1] == ':'))
    n--;
  out[n] = '\0';
  return n;
}

static uint32_t hash(const char *s) {
  uint32_t h = 2166136261u;
  for (; *s != '\0'; s++)
    h = (h ^ (unsigned char)*s) * 16777619u;
  return h;
}

void cancel__metrics_cancelled(int kind, const char *origin) {
  int k = kind >= CANCEL_REQUESTED && kind <= CANCEL_SHUTDOWN ? kind : 0;
  __atomic_add_fetch(&by_kind[k], 1, __ATOMIC_RELAXED);
  char label[ORIGIN_LEN];
  label_of(origin != NULL ? origin : "", label);
  uint32_t h = hash(label);
  /* Open addressing; slots are only ever added.  The lock is taken only
   * to add a name. */
  for (int pass = 0; pass < 2; pass++) {
    for (uint32_t i = 0; i < ORIGINS; i++) {
      struct origin *o = &origins[(h + i) % ORIGINS];
      if (!__atomic_load_n(&o->used, __ATOMIC_ACQUIRE)) {
        if (pass == 0)
          break; /* not there: add it under the lock */
        strcpy(o->name, label);
        __atomic_store_n(&o->used, 1, __ATOMIC_RELEASE);
        __atomic_add_fetch(&o->count, 1, __ATOMIC_RELAXED);
        pthread_mutex_unlock(&origin_mu);
        return;
      }
      if (strcmp(o->name, label) == 0) {
        __atomic_add_fetch(&o->count, 1, __ATOMIC_RELAXED);
        if (pass == 1)
          pthread_mutex_unlock(&origin_mu);
        return;
      }
    }
    if (pass == 0)
      pthread_mutex_lock(&origin_mu); /* look again, then add */
  }
  pthread_mutex_unlock(&origin_mu);
  __atomic_add_fetch(&origin_other, 1, __ATOMIC_RELAXED);
}

/* ---- Histograms ------------------------------------------------------- */

#define BUCKETS 11
static const int64_t bounds_ns[BUCKETS - 1] = {
    100000,   500000,    1000000,   5000000,    10000000,
    50000000, 100000000, 500000000, 1000000000, 5000000000};
static const char *const bounds_txt[BUCKETS] = {
    "0.0001", "0.0005", "0.001", "0.005", "0.01", "0.05",
    "0.1",    "0.5",    "1",     "5",     "+Inf"};

struct histogram {
  uint64_t bucket[BUCKETS]; /* not cumulative */
  uint64_t count;
  uint64_t sum_ns;
};

static struct histogram overruns, wakes;
static uint64_t reports;

static void observe(struct histogram *h, int64_t ns) {
  if (ns < 0)
    ns = 0;
  int b = 0;
  while (b < BUCKETS - 1 && ns > bounds_ns[b])
    b++;
  __atomic_add_fetch(&h->bucket[b], 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&h->count, 1, __ATOMIC_RELAXED);
  __atomic_add_fetch(&h->sum_ns, (uint64_t)ns, __ATOMIC_RELAXED);
}

void cancel__metrics_overrun(int64_t ns) {
  observe(&overruns, ns);
}

void cancel__metrics_wake(int64_t ns) {
  observe(&wakes, ns);
}

void cancel__metrics_reported(void) {
  __atomic_add_fetch(&reports, 1, __ATOMIC_RELAXED);
}

static uint64_t get(const uint64_t *p) {
  return __atomic_load_n(p, __ATOMIC_RELAXED);
}

static uint64_t overdue_now(void) {
  return cancel__overdue_count(cancel__watchdog_threshold());
}

void cancel_metrics_get(cancel_metrics *m) {
  if (m == NULL)
    return;
  for (int k = 0; k < 5; k++)
    m->cancellations[k] = get(&by_kind[k]);
  m->overruns = get(&overruns.count);
  m->wakes = get(&wakes.count);
  m->scopes_overdue = overdue_now();
  m->watchdog_reports = get(&reports);
}

/* ---- The text format ---------------------------------------------------- */

/* A label value: backslash, double quote and newline escaped, the escapes
 * of the exposition format.  The value is valid UTF-8 already (label_of). */
static void put_label(FILE *f, const char *s) {
  for (; *s != '\0'; s++) {
    if (*s == '\\' || *s == '"')
      fputc('\\', f);
    if (*s == '\n') {
      fputs("\\n", f);
      continue;
    }
    fputc(*s, f);
  }
}

static void put_histogram(FILE *f, const char *name, const char *help,
                          const struct histogram *h) {
  fprintf(f, "# HELP %s %s\n# TYPE %s histogram\n", name, help, name);
  uint64_t cum = 0;
  for (int b = 0; b < BUCKETS; b++) {
    cum += get(&h->bucket[b]);
    fprintf(f, "%s_bucket{le=\"%s\"} %llu\n", name, bounds_txt[b],
            (unsigned long long)cum);
  }
  fprintf(f, "%s_sum %.9f\n%s_count %llu\n", name,
          (double)get(&h->sum_ns) / 1e9, name, (unsigned long long)cum);
}

int cancel_metrics_write_prometheus(FILE *f) {
  if (f == NULL)
    return -EINVAL;
  static const char *const kinds[5] = {"user", "requested", "timeout",
                                       "client gone", "shutdown"};
  fputs("# HELP cancel_cancellations_total Cancellations by kind (each "
        "origin once).\n# TYPE cancel_cancellations_total counter\n",
        f);
  for (int k = 1; k <= 5; k++)
    fprintf(f, "cancel_cancellations_total{kind=\"%s\"} %llu\n", kinds[k % 5],
            (unsigned long long)get(&by_kind[k % 5]));
  fputs("# HELP cancel_cancellations_by_origin_total Cancellations by the "
        "origin's name, cut at its first digit.\n"
        "# TYPE cancel_cancellations_by_origin_total counter\n",
        f);
  for (int i = 0; i < ORIGINS; i++) {
    if (!__atomic_load_n(&origins[i].used, __ATOMIC_ACQUIRE))
      continue;
    fputs("cancel_cancellations_by_origin_total{origin=\"", f);
    put_label(f, origins[i].name);
    fprintf(f, "\"} %llu\n", (unsigned long long)get(&origins[i].count));
  }
  /* Origins beyond the table: a label set no origin's series has (those
   * never carry `overflow`), so it cannot collide with a source named
   * "other" or "" (diag.h). */
  if (get(&origin_other) > 0)
    fprintf(f,
            "cancel_cancellations_by_origin_total{origin=\"\","
            "overflow=\"true\"} %llu\n",
            (unsigned long long)get(&origin_other));
  put_histogram(f, "cancel_scope_overrun_seconds",
                "Time from a token's cancel to the end of a scope open on "
                "its behalf.",
                &overruns);
  put_histogram(f, "cancel_wake_latency_seconds",
                "Time from a token's cancel to a blocked wait returning.",
                &wakes);
  fprintf(f,
          "# HELP cancel_scopes_overdue Open scopes whose token fired more "
          "than the watchdog's threshold ago.\n"
          "# TYPE cancel_scopes_overdue gauge\ncancel_scopes_overdue %llu\n",
          (unsigned long long)overdue_now());
  fprintf(f,
          "# HELP cancel_watchdog_reports_total Scopes the watchdog "
          "reported still running after their cancel.\n"
          "# TYPE cancel_watchdog_reports_total counter\n"
          "cancel_watchdog_reports_total %llu\n",
          (unsigned long long)get(&reports));
  return ferror(f) ? -EIO : 0;
}
