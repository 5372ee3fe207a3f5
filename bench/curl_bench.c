/*
 * curl_bench: libcancel-curl against HTTP servers on loopback (threads of
 * this program: nothing leaves the machine).
 *
 *   curl_cancel_latency_p50 / _p99 (us): a GET through cancel_curl_perform
 *     to a server that accepts, reads the request and never answers.  Once
 *     the server has read the request it posts a semaphore; a canceller
 *     thread waiting on it takes t0 and calls cancel_source_cancel.  A
 *     sample runs from t0 to cancel_curl_perform returning on the main
 *     thread.  200 samples (40 with BENCH_QUICK), after 5 thrown away.
 *   curl_uncancelled (us per request): one small GET (a 2-byte body) to a
 *     server that answers at once, on a kept-alive connection: through
 *     cancel_curl_perform with a live token that has no deadline (impl
 *     libcancel) and through curl_easy_perform (impl plain).  Each impl
 *     has its own easy handle and its own server thread, both reused for
 *     every request, so connection setup is paid once (plain: in the easy
 *     handle's own multi handle; libcancel: in the thread's multi handle,
 *     which the adapter keeps between calls).  The two are interleaved
 *     sample by sample, their order alternating, so that noise hits both
 *     alike; the row is the median.  2000 samples each (200 with
 *     BENCH_QUICK), after 100 thrown away.
 *
 * Environment: BENCH_QUICK=1, BENCH_ONLY=curl_cancel_latency,curl_uncancelled
 * (a latency row's p50 or p99 name selects it too).
 */
#define _GNU_SOURCE
#include "bench.h"

#include "../tests/loopback.h"

#include <cancel.h>
#include <cancel/curl.h>

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <semaphore.h>
#include <sys/socket.h>
#include <unistd.h>

#include <curl/curl.h>

/* ======================================================================
 * The servers
 * ====================================================================== */

enum mode { ANSWER, HANG };

struct server {
  int lfd;
  int port;
  enum mode mode;
  pthread_t thread;
  sem_t request_read; /* HANG: posted once a request has been read */
};

/* Reads from c until the end of a request's headers (the GETs here have
 * no body).  Returns false when the client closed or failed. */
static bool read_request(int c) {
  char buf[2048];
  size_t got = 0;
  for (;;) {
    ssize_t n = recv(c, buf + got, sizeof buf - 1 - got, 0);
    if (n <= 0)
      return false;
    got += (size_t)n;
    buf[got] = '\0';
    if (strstr(buf, "\r\n\r\n") != NULL)
      return true;
    if (got == sizeof buf - 1)
      return false; /* not a request of ours */
  }
}

/* One connection at a time.  ANSWER: every request on it is answered at
 * once (HTTP/1.1 keep-alive) until the client closes.  HANG: the request
 * is read and never answered; the connection ends when the client, its
 * transfer abandoned, closes it. */
static void *server_main(void *arg) {
  struct server *sv = arg;
  static const char reply[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                              "Content-Type: text/plain\r\n\r\nok";
  for (;;) {
    int c = accept4(sv->lfd, NULL, NULL, SOCK_CLOEXEC);
    if (c < 0) {
      if (errno == EINTR || errno == ECONNABORTED)
        continue;
      return NULL; /* listener shut down */
    }
    if (sv->mode == ANSWER) {
      while (read_request(c))
        if (send(c, reply, sizeof reply - 1, MSG_NOSIGNAL) < 0)
          break;
    } else if (read_request(c)) {
      sem_post(&sv->request_read);
      char b[256];
      while (recv(c, b, sizeof b, 0) > 0) /* until the client goes */
        ;
    }
    close(c);
  }
}

static void server_start(struct server *sv, enum mode mode) {
  memset(sv, 0, sizeof *sv);
  sv->mode = mode;
  sem_init(&sv->request_read, 0, 0);
  sv->lfd = loopback_socket(16, &sv->port);
  if (sv->lfd < 0)
    bench_die("listen on loopback", sv->lfd);
  if (pthread_create(&sv->thread, NULL, server_main, sv) != 0)
    bench_die("pthread_create", 0);
}

static void server_stop(struct server *sv) {
  shutdown(sv->lfd, SHUT_RDWR);
  close(sv->lfd);
  pthread_join(sv->thread, NULL);
  sem_destroy(&sv->request_read);
}

static size_t sink(char *p, size_t size, size_t n, void *arg) {
  (void)p;
  (void)arg;
  return size * n;
}

static CURL *easy_for(const struct server *sv) {
  CURL *e = curl_easy_init();
  if (e == NULL)
    bench_die("curl_easy_init", 0);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/reports/42", sv->port);
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  return e;
}

/* ======================================================================
 * curl_cancel_latency
 * ====================================================================== */

struct canceller {
  struct server *sv;
  cancel_source *cur; /* atomic: the request in flight, NULL to stop */
  int64_t t0;         /* just before the cancel call */
  sem_t done;         /* posted after each cancel */
};

/* Waits for the server to have read a request, then cancels it. */
static void *canceller_main(void *arg) {
  struct canceller *k = arg;
  for (;;) {
    while (sem_wait(&k->sv->request_read) != 0) {
    }
    cancel_source *src = __atomic_load_n(&k->cur, __ATOMIC_ACQUIRE);
    if (src == NULL)
      return NULL;
    k->t0 = cancel_now();
    cancel_source_cancel(src);
    sem_post(&k->done);
  }
}

static void cancel_latency(void) {
  const size_t warmup = 5, n = bench_quick() ? 40 : 200;
  int64_t *s = calloc(n, sizeof *s);
  if (s == NULL)
    bench_die("calloc", -ENOMEM);
  struct server sv;
  server_start(&sv, HANG);
  struct canceller k = {.sv = &sv};
  sem_init(&k.done, 0, 0);
  pthread_t kt;
  if (pthread_create(&kt, NULL, canceller_main, &k) != 0)
    bench_die("pthread_create", 0);
  CURL *e = easy_for(&sv);
  for (size_t i = 0; i < warmup + n; i++) {
    cancel_source *src;
    int rc = cancel_source_new(&src, "request");
    if (rc < 0)
      bench_die("cancel_source_new", rc);
    __atomic_store_n(&k.cur, src, __ATOMIC_RELEASE);
    rc = cancel_curl_perform(cancel_source_token(src), e);
    int64_t back = cancel_now();
    if (rc != -ECANCELED)
      bench_die("the request was not cancelled", rc);
    /* The canceller has returned from the cancel: src may go. */
    while (sem_wait(&k.done) != 0) {
    }
    if (i >= warmup)
      s[i - warmup] = back - k.t0;
    cancel_source_unref(src);
  }
  __atomic_store_n(&k.cur, NULL, __ATOMIC_RELEASE);
  sem_post(&sv.request_read); /* wakes the canceller to see NULL */
  pthread_join(kt, NULL);
  curl_easy_cleanup(e); /* closes nothing: the last transfer was aborted */
  server_stop(&sv);
  sem_destroy(&k.done);
  bench_latency_rows("curl_cancel_latency", "libcancel", s, n);
  free(s);
}

/* ======================================================================
 * curl_uncancelled
 * ====================================================================== */

/* One GET; adds the connections it opened to *conns. */
static int64_t one_get(CURL *e, const cancel_token *live, long *conns) {
  int64_t t0 = bench_now();
  int rc = live != NULL ? cancel_curl_perform(live, e)
                        : (curl_easy_perform(e) == CURLE_OK ? 0 : -EIO);
  int64_t t = bench_now() - t0;
  long status = 0, opened = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &opened);
  if (rc != 0 || status != 200)
    bench_die(live != NULL ? "cancel_curl_perform" : "curl_easy_perform",
              rc != 0 ? rc : (int)status);
  *conns += opened;
  return t;
}

static void uncancelled(void) {
  const size_t warmup = 100, n = bench_quick() ? 200 : 2000;
  int64_t *lib = calloc(n, sizeof *lib), *plain = calloc(n, sizeof *plain);
  if (lib == NULL || plain == NULL)
    bench_die("calloc", -ENOMEM);
  cancel_source *live;
  int rc = cancel_source_new(&live, "live");
  if (rc < 0)
    bench_die("cancel_source_new", rc);
  const cancel_token *tok = cancel_source_token(live);
  struct server sl, sp;
  server_start(&sl, ANSWER);
  server_start(&sp, ANSWER);
  CURL *el = easy_for(&sl), *ep = easy_for(&sp);
  long conns_l = 0, conns_p = 0;
  for (size_t i = 0; i < warmup + n; i++) {
    int64_t tl, tp;
    if (i % 2 == 0) {
      tl = one_get(el, tok, &conns_l);
      tp = one_get(ep, NULL, &conns_p);
    } else {
      tp = one_get(ep, NULL, &conns_p);
      tl = one_get(el, tok, &conns_l);
    }
    if (i >= warmup) {
      lib[i - warmup] = tl;
      plain[i - warmup] = tp;
    }
  }
  /* Says whether the kept-alive connection was really reused. */
  fprintf(stderr,
          "curl_bench: curl_uncancelled: connections opened for %zu "
          "requests: libcancel %ld, plain %ld\n",
          warmup + n, conns_l, conns_p);
  curl_easy_cleanup(el);
  curl_easy_cleanup(ep);
  /* The adapter's connection belongs to this thread's multi handle, not to
   * el: close it, or sl's thread would wait for its next request. */
  cancel_curl_thread_cleanup();
  server_stop(&sl);
  server_stop(&sp);
  cancel_source_unref(live);
  bench_median_row("curl_uncancelled", "libcancel", lib, n);
  bench_median_row("curl_uncancelled", "plain", plain, n);
  free(plain);
  free(lib);
}

int main(void) {
  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK)
    bench_die("curl_global_init", 0);
  fprintf(stderr, "curl_bench: libcancel %s, %s%s\n", cancel_version(),
          curl_version(), bench_quick() ? " (BENCH_QUICK)" : "");
  if (bench_wanted_latency("curl_cancel_latency"))
    cancel_latency();
  if (bench_wanted("curl_uncancelled"))
    uncancelled();
  cancel_curl_thread_cleanup(); /* before curl_global_cleanup */
  curl_global_cleanup();
  return 0;
}
