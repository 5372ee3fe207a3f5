/*
 * libcancel-curl against a real HTTP server on loopback: a small server
 * thread in this file that answers at once, or never (it waits for the
 * client to go away and records when it did), and records the headers it
 * received.  The DNS test adds a name server on loopback that does not
 * answer, in network and mount namespaces of its own.
 */
#include "test_util.h"

#include "loopback.h"
#include "stall.h"

#include "cancel/curl.h"

#include <arpa/inet.h>
#include <net/if.h>
#include <netinet/in.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

enum mode { ANSWER, HANG };

struct server {
  int lfd;
  int port;
  enum mode mode;
  pthread_t thread;
  sem_t done;         /* posted when a connection ended */
  int64_t closed_at;  /* when the server saw the client's close */
  char request[4096]; /* what it received (headers) */
  int connections;
  int conn; /* atomic: the connection it serves, or -1 */
};

/* The server's stop (a failed test's teardown): ends its accept and the
 * connection it serves. */
static void stop_server(void *arg) {
  struct server *sv = arg;
  shutdown(sv->lfd, SHUT_RDWR);
  int c = __atomic_load_n(&sv->conn, __ATOMIC_SEQ_CST);
  if (c >= 0)
    shutdown(c, SHUT_RDWR);
}

static void *server_main(void *arg) {
  struct server *sv = arg;
  for (;;) {
    int c = accept(sv->lfd, NULL, NULL);
    if (c < 0)
      return NULL; /* listener shut down */
    __atomic_store_n(&sv->conn, c, __ATOMIC_SEQ_CST);
    __atomic_add_fetch(&sv->connections, 1, __ATOMIC_SEQ_CST);
    size_t got = 0;
    while (got < sizeof sv->request - 1) {
      ssize_t n = recv(c, sv->request + got, sizeof sv->request - 1 - got, 0);
      if (n <= 0)
        break;
      got += (size_t)n;
      sv->request[got] = '\0';
      if (strstr(sv->request, "\r\n\r\n") != NULL)
        break;
    }
    if (sv->mode == ANSWER) {
      const char *r = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                      "Connection: close\r\n\r\nok";
      ssize_t w = send(c, r, strlen(r), MSG_NOSIGNAL);
      (void)w;
    } else {
      char b[256];
      while (recv(c, b, sizeof b, 0) > 0) /* until the client goes */
        ;
      sv->closed_at = cancel_now();
    }
    __atomic_store_n(&sv->conn, -1, __ATOMIC_SEQ_CST);
    close(c);
    sem_post(&sv->done);
  }
}

static void server_start(struct server *sv, enum mode mode) {
  memset(sv, 0, sizeof *sv);
  sv->mode = mode;
  sv->conn = -1;
  sem_init(&sv->done, 0, 0);
  sv->lfd = loopback_socket(16, &sv->port);
  assert_true(sv->lfd >= 0);
  /* sv is test_shared(): a failed test leaves the thread to the teardown. */
  sv->thread = test_helper_start(server_main, sv, stop_server);
}

static void server_stop(struct server *sv) {
  shutdown(sv->lfd, SHUT_RDWR);
  close(sv->lfd);
  test_helper_join(sv->thread);
  sem_destroy(&sv->done);
}

static size_t sink(char *p, size_t size, size_t n, void *arg) {
  (void)p;
  (void)arg;
  return size * n;
}

static CURL *easy_for(const struct server *sv) {
  CURL *e = curl_easy_init();
  assert_non_null(e);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/reports/42", sv->port);
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  return e;
}

static void test_completes(void **state) {
  (void)state;
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, ANSWER);
  CURL *e = easy_for(sv);
  cancel_source *s = new_src("req");
  CURLcode code;
  assert_int_equal(cancel_curl_perform_ex(TOK(s), e, NULL, &code), 0);
  assert_int_equal(code, CURLE_OK);
  long status = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  assert_int_equal(status, 200);
  /* No deadline on the token: no deadline headers. */
  assert_null(strstr(sv->request, "grpc-timeout"));
  assert_null(strstr(sv->request, "X-Request-Timeout-Ms"));
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  server_stop(sv);
}

/* A server that never answers: the cancel abandons the transfer within
 * 5 ms (times the scale), and the server sees the connection close. */
static void test_cancel_abandons_slow_server(void **state) {
  (void)state;
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, HANG);
  CURL *e = easy_for(sv);
  for (int round = 0; round < 5; round++) {
    cancel_source *s = new_src("req");
    struct fire_rec f;
    fire_rec_init(&f);
    cancel_reg reg;
    assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
    /* 50 ms for the request to reach the server, widened by the time
     * scale: under valgrind the first round may not even have connected
     * by then, and the server would never see a connection close. */
    assert_int_equal(cancel_source_cancel_after(s, test_tol(CANCEL_MSEC(50))),
                     0);
    CURLcode code;
    int rc = cancel_curl_perform_ex(TOK(s), e, NULL, &code);
    int64_t back = cancel_now();
    /* The token's deadline also bounds curl's own timeout: on a slow
     * machine curl may give up a moment before the token's timer fires;
     * the call then waits for the timer: the token is cancelled on
     * return (its callbacks may still be running on the timer thread).
     * Asserted once the registration on this frame is gone. */
    bool fired_on_return = cancel_token_is_cancelled(TOK(s));
    int posted = test_sem_wait_ns(&f.sem, test_tol(CANCEL_SEC(2)));
    (void)cancel_unregister(&reg);
    sem_destroy(&f.sem);
    assert_int_equal(posted, 0);
    assert_true(fired_on_return);
    int64_t fired = f.at;
    assert_int_equal(rc, -ECANCELED);
    assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
    assert_int_equal(test_sem_wait_ns(&sv->done, test_tol(CANCEL_SEC(2))), 0);
    /* Round 0 runs curl's abort path for the first time: under valgrind,
     * translating that code took 10 to 280 ms (measured), beyond any sane
     * tolerance, so only the later rounds are timed. */
    if (round > 0) {
      assert_i64_lt(back - fired, test_tol(CANCEL_MSEC(5)));
      assert_i64_lt(sv->closed_at - fired, test_tol(CANCEL_MSEC(20)));
    }
    cancel_source_unref(s);
  }
  curl_easy_cleanup(e);
  server_stop(sv);
}

static void test_deadline_headers(void **state) {
  (void)state;
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, ANSWER);
  CURL *e = easy_for(sv);
  cancel_source *s;
  assert_int_equal(
      cancel_source_new_timeout(&s, "budget", NULL, CANCEL_MSEC(1500)), 0);
  int64_t before = cancel_now();
  struct curl_slist *mine = curl_slist_append(NULL, "X-Mine: yes");
  cancel_curl_options o = {.headers = mine};
  assert_int_equal(cancel_curl_perform_ex(TOK(s), e, &o, NULL), 0);
  int64_t spent = cancel_now() - before;
  assert_non_null(strstr(sv->request, "X-Mine: yes"));
  const char *g = strstr(sv->request, "grpc-timeout: ");
  const char *x = strstr(sv->request, "X-Request-Timeout-Ms: ");
  assert_non_null(g);
  assert_non_null(x);
  long gms = strtol(g + strlen("grpc-timeout: "), NULL, 10);
  assert_int_equal(g[strlen("grpc-timeout: ") + (gms >= 1000 ? 4 : 3)], 'm');
  long xms = strtol(x + strlen("X-Request-Timeout-Ms: "), NULL, 10);
  /* What remained when it was sent: at most 1500, at least 1500 - spent. */
  assert_true(xms <= 1500 && xms >= 1500 - spent / 1000000 - 1);
  assert_true(gms <= 1500 && gms >= 1500 - spent / 1000000 - 1);
  /* Switched off. */
  o.no_grpc_timeout = true;
  o.no_request_timeout_ms = true;
  assert_int_equal(cancel_curl_perform_ex(TOK(s), e, &o, NULL), 0);
  assert_null(strstr(sv->request, "grpc-timeout"));
  assert_null(strstr(sv->request, "X-Request-Timeout-Ms"));
  curl_slist_free_all(mine);
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  server_stop(sv);
}

/* A deadline already passed (or a token cancelled before): nothing sent. */
static void test_nothing_sent_when_no_time_left(void **state) {
  (void)state;
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, ANSWER);
  CURL *e = easy_for(sv);
  cancel_source *s = new_src("late");
  /* A parent whose deadline is in the past but whose timer has not run. */
  cancel_source *p = new_src("parent");
  const cancel_token *pt = TOK(p);
  cancel_source *c;
  assert_int_equal(cancel_source_new_linked(&c, "child", &pt, 1), 0);
  assert_int_equal(cancel_source_cancel_at(p, cancel_now() - 1), 0);
  assert_int_equal(cancel_curl_perform(TOK(c), e), -ECANCELED);
  assert_int_equal(cancel_source_cancel(s), 1);
  assert_int_equal(cancel_curl_perform(TOK(s), e), -ECANCELED);
  assert_int_equal(sv->connections, 0);
  cancel_source_unref(c);
  cancel_source_unref(p);
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  server_stop(sv);
}

static void test_errors_are_not_cancellations(void **state) {
  (void)state;
  CURL *e = curl_easy_init();
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  CURLcode code;
  /* A malformed URL. */
  curl_easy_setopt(e, CURLOPT_URL, "http://[::1");
  assert_int_equal(cancel_curl_perform_ex(NULL, e, NULL, &code), -EINVAL);
  assert_int_not_equal(code, CURLE_OK);
  curl_easy_setopt(e, CURLOPT_URL, "nosuchscheme://x");
  assert_int_equal(cancel_curl_perform_ex(NULL, e, NULL, &code), -EINVAL);
  /* A refused connection: a port nobody listens on (bound, not listening). */
  int port = 0;
  int fd = loopback_socket(0, &port);
  assert_true(fd >= 0);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/", port);
  curl_easy_setopt(e, CURLOPT_URL, url);
  assert_int_equal(cancel_curl_perform_ex(NULL, e, NULL, &code), -ECONNREFUSED);
  assert_int_equal(code, CURLE_COULDNT_CONNECT);
  close(fd);
  assert_int_equal(cancel_curl_perform(NULL, NULL), -EINVAL);
  curl_easy_cleanup(e);
}

/* ---- Kept-alive connections ------------------------------------------- *
 * A server that keeps connections open and serves several at once (a
 * re-entrant call opens a second one while the first is busy): one thread
 * polling them with a stop token.  HTTP/1.1 with keep-alive, or HTTP/2
 * with prior knowledge, just enough of it to answer a GET: its SETTINGS,
 * the client's acknowledged, and one HEADERS frame with END_STREAM per
 * request (":status: 200", HPACK's static entry 8).  Every request is
 * answered at once, or never while `hang` is set.  It counts the
 * connections it accepted, and posts `gone` for each one the client
 * closed, noting when. */

#define KS_CONNS 8

struct kconn {
  int fd;
  bool preface; /* HTTP/2: the client's connection preface was read */
  size_t len;
  unsigned char buf[4096];
};

struct kserver {
  int lfd;
  int port;
  bool h2;
  cancel_source *stop;
  pthread_t thread;
  int hang;                     /* atomic: leave requests unanswered */
  int accepted;                 /* atomic: connections accepted */
  int closed;                   /* atomic: connections the client closed */
  int64_t closed_at;            /* atomic: when the last one of them was */
  sem_t gone;                   /* posted for each of them */
  struct kconn conns[KS_CONNS]; /* the server thread's */
};

static void ks_send(int fd, const void *b, size_t len) {
  ssize_t w = send(fd, b, len, MSG_NOSIGNAL);
  (void)w; /* a client that went is seen by the next recv */
}

/* Serves the complete requests in c's buffer (consumed). */
static void ks_serve(struct kserver *ks, struct kconn *c) {
  bool hang = __atomic_load_n(&ks->hang, __ATOMIC_SEQ_CST);
  if (!ks->h2) {
    static const char reply[] = "HTTP/1.1 200 OK\r\nContent-Length: 2\r\n"
                                "Content-Type: text/plain\r\n\r\nok";
    const unsigned char *end;
    while ((end = memmem(c->buf, c->len, "\r\n\r\n", 4)) != NULL) {
      size_t n = (size_t)(end + 4 - c->buf);
      memmove(c->buf, c->buf + n, c->len - n);
      c->len -= n;
      if (!hang)
        ks_send(c->fd, reply, sizeof reply - 1);
    }
    return;
  }
  if (!c->preface) {
    if (c->len < 24)
      return;
    memmove(c->buf, c->buf + 24, c->len - 24);
    c->len -= 24;
    c->preface = true;
  }
  while (c->len >= 9) {
    size_t flen = (size_t)c->buf[0] << 16 | (size_t)c->buf[1] << 8 | c->buf[2];
    if (c->len < 9 + flen)
      return;
    unsigned char type = c->buf[3], flags = c->buf[4];
    if (type == 4 && !(flags & 1)) { /* SETTINGS: acknowledged */
      static const unsigned char ack[9] = {0, 0, 0, 4, 1, 0, 0, 0, 0};
      ks_send(c->fd, ack, sizeof ack);
    } else if (type == 1 && !hang) { /* HEADERS: a request */
      unsigned char r[10] = {0, 0, 1, 1, 0x5 /* END_STREAM|END_HEADERS */};
      memcpy(r + 5, c->buf + 5, 4); /* its stream */
      r[9] = 0x88;                  /* :status: 200 */
      ks_send(c->fd, r, sizeof r);
    }
    memmove(c->buf, c->buf + 9 + flen, c->len - 9 - flen);
    c->len -= 9 + flen;
  }
}

static void *ks_main(void *arg) {
  struct kserver *ks = arg;
  struct kconn *conns = ks->conns;
  struct pollfd p[1 + KS_CONNS];
  int n = 0;
  for (;;) {
    p[0] = (struct pollfd){.fd = ks->lfd, .events = POLLIN};
    for (int i = 0; i < n; i++)
      p[1 + i] = (struct pollfd){.fd = conns[i].fd, .events = POLLIN};
    int r = cancel_poll(TOK(ks->stop), p, (nfds_t)(1 + n), CANCEL_NEVER);
    if (r == -ECANCELED)
      break; /* stopped */
    if (r < 0) {
      /* -ENOMEM (fault injection): the server is not stopped, and a
       * client with no timeout would wait for it for ever. */
      test_sleep_ns(CANCEL_MSEC(1));
      continue;
    }
    /* Downwards: a closed connection is replaced by the last one, which
     * has been handled already. */
    for (int i = n - 1; i >= 0; i--) {
      struct kconn *c = &conns[i];
      if (p[1 + i].revents == 0)
        continue;
      ssize_t got = 0;
      if (c->len < sizeof c->buf)
        got = recv(c->fd, c->buf + c->len, sizeof c->buf - c->len, 0);
      if (got > 0) {
        c->len += (size_t)got;
        ks_serve(ks, c);
        continue;
      }
      if (got < 0 && (errno == EINTR || errno == EAGAIN))
        continue;
      /* The client closed it (or sent more than a request can be). */
      __atomic_store_n(&ks->closed_at, cancel_now(), __ATOMIC_SEQ_CST);
      __atomic_add_fetch(&ks->closed, 1, __ATOMIC_SEQ_CST);
      close(c->fd);
      *c = conns[--n];
      sem_post(&ks->gone);
    }
    if ((p[0].revents & POLLIN) && n < KS_CONNS) {
      int fd = accept4(ks->lfd, NULL, NULL, SOCK_CLOEXEC);
      if (fd >= 0) {
        conns[n].fd = fd;
        conns[n].len = 0;
        conns[n].preface = false;
        n++;
        __atomic_add_fetch(&ks->accepted, 1, __ATOMIC_SEQ_CST);
        if (ks->h2) { /* the server's preface: its (empty) SETTINGS */
          static const unsigned char settings[9] = {0, 0, 0, 4};
          ks_send(fd, settings, sizeof settings);
        }
      }
    }
  }
  for (int i = 0; i < n; i++)
    close(conns[i].fd);
  return NULL;
}

/* The server's stop (a failed test's teardown). */
static void stop_kserver(void *arg) {
  cancel_source_cancel(((struct kserver *)arg)->stop);
}

static void kserver_start(struct kserver *ks, bool h2) {
  memset(ks, 0, sizeof *ks);
  ks->h2 = h2;
  sem_init(&ks->gone, 0, 0);
  ks->stop = new_src("server stop");
  ks->lfd = loopback_socket(16, &ks->port);
  assert_true(ks->lfd >= 0);
  /* ks is test_shared(): a failed test leaves the thread to the teardown. */
  ks->thread = test_helper_start(ks_main, ks, stop_kserver);
}

static void kserver_stop(struct kserver *ks) {
  cancel_source_cancel(ks->stop);
  test_helper_join(ks->thread);
  close(ks->lfd);
  cancel_source_unref(ks->stop);
  sem_destroy(&ks->gone);
}

static CURL *ks_easy(const struct kserver *ks) {
  CURL *e = curl_easy_init();
  assert_non_null(e);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/reports/42", ks->port);
  curl_easy_setopt(e, CURLOPT_URL, url);
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  if (ks->h2)
    curl_easy_setopt(e, CURLOPT_HTTP_VERSION,
                     (long)CURL_HTTP_VERSION_2_PRIOR_KNOWLEDGE);
  return e;
}

/* One GET through the adapter that must succeed with a 200; adds the
 * connections it opened to *opened. */
static void ks_get(const cancel_token *tok, CURL *e, long *opened) {
  assert_int_equal(cancel_curl_perform(tok, e), 0);
  long status = 0, n = -1;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &n);
  assert_int_equal(status, 200);
  assert_true(n == 0 || n == 1);
  *opened += n;
}

/* A request the server leaves unanswered, cancelled 50 ms (times the
 * scale) in: the call returns -ECANCELED, and the server sees the
 * connection close within 20 ms of the cancel.  (How soon the call
 * returns is test_cancel_abandons_slow_server's business.) */
static void cancel_unanswered(struct kserver *ks, CURL *e) {
  __atomic_store_n(&ks->hang, 1, __ATOMIC_SEQ_CST);
  cancel_source *s = new_src("req");
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
  assert_int_equal(cancel_source_cancel_after(s, test_tol(CANCEL_MSEC(50))), 0);
  int closed = test_load(&ks->closed);
  int rc = cancel_curl_perform(TOK(s), e);
  assert_int_equal(test_sem_wait_ns(&f.sem, test_tol(CANCEL_SEC(2))), 0);
  assert_int_equal(cancel_unregister(&reg), 0);
  sem_destroy(&f.sem);
  assert_int_equal(rc, -ECANCELED);
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  assert_int_equal(test_load(&ks->closed), closed + 1);
  assert_i64_lt(__atomic_load_n(&ks->closed_at, __ATOMIC_SEQ_CST) - f.at,
                test_tol(CANCEL_MSEC(20)));
  cancel_source_unref(s);
  __atomic_store_n(&ks->hang, 0, __ATOMIC_SEQ_CST);
}

/* Sequential calls on one thread share one connection, whatever easy
 * handle and token they use; a cancelled transfer's connection is closed
 * (the server sees the client go), also when it was a kept one, and the
 * next call works, on a new connection that is kept in turn. */
static void test_keeps_connection_alive(void **state) {
  (void)state;
  struct kserver *ks = test_shared(sizeof *ks);
  kserver_start(ks, false);
  CURL *e = ks_easy(ks);
  cancel_source *live = new_src("live");
  long opened = 0;
  for (int i = 0; i < 4; i++)
    ks_get(i % 2 == 0 ? TOK(live) : NULL, e, &opened);
  assert_int_equal(opened, 1);
  assert_int_equal(test_load(&ks->accepted), 1);
  /* Another easy handle: the cache is the thread's, not the handle's; and
   * cleaning that handle up closes nothing. */
  CURL *e2 = ks_easy(ks);
  opened = 0;
  ks_get(TOK(live), e2, &opened);
  assert_int_equal(opened, 0);
  curl_easy_cleanup(e2);
  assert_int_equal(test_load(&ks->closed), 0);

  /* Cancelled on the kept connection. */
  cancel_unanswered(ks, e);
  assert_int_equal(test_load(&ks->accepted), 1); /* it was the kept one */

  /* The next calls: one new connection, kept. */
  opened = 0;
  for (int i = 0; i < 3; i++)
    ks_get(TOK(live), e, &opened);
  assert_int_equal(opened, 1);
  assert_int_equal(test_load(&ks->accepted), 2);
  assert_int_equal(test_load(&ks->closed), 1);

  /* Closed on request. */
  assert_int_equal(cancel_curl_thread_cleanup(), 0);
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  assert_int_equal(test_load(&ks->closed), 2);
  assert_int_equal(cancel_curl_thread_cleanup(), 0); /* nothing left */
  cancel_source_unref(live);
  curl_easy_cleanup(e);
  kserver_stop(ks);
}

/* HTTP/2: removing an unfinished transfer's handle leaves its connection
 * open in curl's cache (a multiplexed connection outlives a stream), so
 * the adapter frees the thread's multi handle after a cancel: the server
 * must see the client go all the same. */
static void test_http2_cancel_closes_connection(void **state) {
  (void)state;
  const curl_version_info_data *v = curl_version_info(CURLVERSION_NOW);
  if (!(v->features & CURL_VERSION_HTTP2)) {
    print_message("HTTP/2 test skipped: libcurl built without HTTP/2\n");
    skip();
  }
  struct kserver *ks = test_shared(sizeof *ks);
  kserver_start(ks, true);
  CURL *e = ks_easy(ks);
  cancel_source *live = new_src("live");
  long opened = 0, version = 0;
  ks_get(TOK(live), e, &opened);
  curl_easy_getinfo(e, CURLINFO_HTTP_VERSION, &version);
  assert_int_equal(version, CURL_HTTP_VERSION_2_0);
  if (v->version_num >= 0x080000) {
    /* Kept, and the cancel below comes on the kept connection. */
    ks_get(TOK(live), e, &opened);
    assert_int_equal(opened, 1);
  } else {
    /* Before 8.0.0 libcurl cannot reuse a prior-knowledge HTTP/2
     * connection (curl issue 10634: "Error in the HTTP2 framing layer",
     * with curl_easy_perform too): start over on a new one. */
    assert_int_equal(cancel_curl_thread_cleanup(), 0);
    assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  }
  cancel_unanswered(ks, e);
  ks_get(TOK(live), e, &opened); /* works, on a new connection */
  assert_int_equal(cancel_curl_thread_cleanup(), 0);
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  cancel_source_unref(live);
  curl_easy_cleanup(e);
  kserver_stop(ks);
}

/* A call from inside a curl callback of a transfer the adapter runs on the
 * same thread: the thread's multi handle is busy, so the inner call runs
 * on one of its own (a connection of its own, closed when it returns), and
 * the thread's cache cannot be freed from there. */
struct reenter {
  const struct kserver *ks;
  bool done;
  int cleanup_rc;
  int inner_rc;
  long inner_opened;
};

static size_t reenter_sink(char *p, size_t size, size_t n, void *arg) {
  struct reenter *r = arg;
  (void)p;
  if (!r->done) {
    r->done = true;
    r->cleanup_rc = cancel_curl_thread_cleanup();
    CURL *inner = curl_easy_init();
    char url[64];
    snprintf(url, sizeof url, "http://127.0.0.1:%d/inner", r->ks->port);
    curl_easy_setopt(inner, CURLOPT_URL, url);
    curl_easy_setopt(inner, CURLOPT_WRITEFUNCTION, sink);
    curl_easy_setopt(inner, CURLOPT_NOSIGNAL, 1L);
    r->inner_rc = cancel_curl_perform(NULL, inner);
    curl_easy_getinfo(inner, CURLINFO_NUM_CONNECTS, &r->inner_opened);
    curl_easy_cleanup(inner);
  }
  return size * n;
}

static void test_reentrant_call(void **state) {
  (void)state;
  struct kserver *ks = test_shared(sizeof *ks);
  kserver_start(ks, false);
  CURL *e = ks_easy(ks);
  long opened = 0;
  ks_get(NULL, e, &opened); /* the thread's multi handle exists */
  struct reenter r = {.ks = ks};
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, reenter_sink);
  curl_easy_setopt(e, CURLOPT_WRITEDATA, &r);
  ks_get(NULL, e, &opened);
  assert_true(r.done);
  assert_int_equal(r.cleanup_rc, -EBUSY);
  assert_int_equal(r.inner_rc, 0);
  assert_int_equal(r.inner_opened, 1);
  assert_int_equal(test_load(&ks->accepted), 2);
  /* The inner call's multi handle went with it, and its connection. */
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  /* The outer connection is still the thread's. */
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
  ks_get(NULL, e, &opened);
  assert_int_equal(opened, 1);
  assert_int_equal(cancel_curl_thread_cleanup(), 0);
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  curl_easy_cleanup(e);
  kserver_stop(ks);
}

/* Another thread has a multi handle (and connections) of its own, freed
 * when the thread exits. */
static void *get_on_thread(void *arg) {
  const struct kserver *ks = arg;
  CURL *e = ks_easy(ks);
  intptr_t rc = cancel_curl_perform(NULL, e);
  long status = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  curl_easy_cleanup(e);
  return (void *)(rc == 0 && status == 200 ? 0 : rc != 0 ? rc : -1);
}

static void test_thread_exit_closes(void **state) {
  (void)state;
  struct kserver *ks = test_shared(sizeof *ks);
  kserver_start(ks, false);
  CURL *e = ks_easy(ks);
  long opened = 0;
  ks_get(NULL, e, &opened);
  assert_int_equal(test_run_on_thread(get_on_thread, ks), NULL);
  assert_int_equal(test_load(&ks->accepted), 2); /* not shared */
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  assert_int_equal(test_load(&ks->closed), 1);
  ks_get(NULL, e, &opened); /* this thread's is still there */
  assert_int_equal(opened, 1);
  assert_int_equal(cancel_curl_thread_cleanup(), 0);
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  curl_easy_cleanup(e);
  kserver_stop(ks);
}

/* After fork() the child does not touch the multi handle it inherited (its
 * connection is the parent's too): it opens its own, and the parent's
 * connection is still there, intact, for the parent's next call. */
static void test_fork_child_has_its_own(void **state) {
  (void)state;
  struct kserver *ks = test_shared(sizeof *ks);
  kserver_start(ks, false);
  CURL *e = ks_easy(ks);
  long opened = 0;
  ks_get(NULL, e, &opened);
  fflush(NULL);
  pid_t pid = fork();
  assert_true(pid >= 0);
  if (pid == 0) {
    /* No cmocka here: the exit status says what went wrong (1 is
     * valgrind's, for errors it found in the child).  A request that
     * never ends is ended by SIGALRM, which the parent reports. */
    alarm((unsigned)(test_tol(CANCEL_SEC(30)) / CANCEL_SEC(1)) + 1);
    int rc = cancel_curl_perform(NULL, e);
    long n = -1, status = 0;
    curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &n);
    curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
    int again = cancel_curl_perform(NULL, e);
    long n2 = -1;
    curl_easy_getinfo(e, CURLINFO_NUM_CONNECTS, &n2);
    /* Frees the child's own multi handle, not the inherited one; and what
     * else the child owns, for valgrind, which checks the child too. */
    int cleaned = cancel_curl_thread_cleanup();
    curl_easy_cleanup(e);
    int ex = 0;
    if (rc != 0 || status != 200)
      ex = 10; /* the child's call failed */
    else if (n != 1)
      ex = 11; /* it used the parent's connection */
    else if (again != 0 || n2 != 0)
      ex = 12; /* it did not keep its own */
    else if (cleaned != 0)
      ex = 13;
    _exit(ex);
  }
  int st = 0;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  assert_true(WIFEXITED(st));
  assert_int_equal(WEXITSTATUS(st), 0);
  assert_int_equal(test_load(&ks->accepted), 2);
  /* The child's connection, closed by the child's cleanup. */
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  ks_get(NULL, e, &opened);
  assert_int_equal(opened, 1);
  assert_int_equal(cancel_curl_thread_cleanup(), 0);
  assert_int_equal(test_sem_wait_ns(&ks->gone, test_tol(CANCEL_SEC(2))), 0);
  curl_easy_cleanup(e);
  kserver_stop(ks);
}

/* fork() while another thread is inside cancel_curl_perform: in the child
 * that thread is gone, and its stack (which held the transfer's
 * registration on the token) is reused by the child's first threads.  A
 * cancel of the token in the child must not reach that registration
 * (cancel.h, "fork()": the waits of other threads are dropped). */
struct performer {
  const cancel_token *tok;
  CURL *easy;
  int rc;
};

static void *perform_main(void *arg) {
  struct performer *p = arg;
  p->rc = cancel_curl_perform(p->tok, p->easy);
  return NULL;
}

static void *scribble_main(void *arg) {
  (void)arg;
  volatile unsigned char junk[48 * 1024];
  for (size_t i = 0; i < sizeof junk; i++)
    junk[i] = 0xa5;
  return NULL;
}

/* The transfer connected: its registration is in place by then. */
static bool server_has_request(void *arg) {
  struct server *sv = arg;
  return __atomic_load_n(&sv->connections, __ATOMIC_SEQ_CST) > 0;
}

static void test_fork_during_perform(void **state) {
  (void)state;
  TEST_SKIP_UNDER_TSAN();
  /* Shared: a failed assertion leaves the server to the teardown. */
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, HANG);
  CURL *e = easy_for(sv);
  cancel_source *s = new_src("req");
  struct performer pf = {TOK(s), e, 1};
  pthread_t t = test_thread_start(perform_main, &pf);
  bool sent = test_wait_until(server_has_request, sv, test_tol(CANCEL_SEC(5)));
  /* The child says it cancelled through a pipe: under valgrind its exit
   * status is valgrind's (1: the parent's other threads' memory, gone in
   * the child, shows as leaked), and only a signal means it crashed. */
  int ok[2];
  assert_int_equal(pipe(ok), 0);
  fflush(NULL);
  pid_t pid = sent ? fork() : -1;
  if (pid == 0) {
    test_child_enter();
    close(ok[0]);
    /* The parent's performer's stack, reused and overwritten. */
    for (int i = 0; i < 4; i++) {
      pthread_t k;
      if (pthread_create(&k, NULL, scribble_main, NULL) != 0)
        _exit(20);
      pthread_join(k, NULL);
    }
    if (cancel_source_cancel(s) != 1)
      _exit(21);
    _exit(write(ok[1], "k", 1) == 1 ? 0 : 22);
  }
  close(ok[1]);
  char said = 0;
  ssize_t nr = pid > 0 ? read(ok[0], &said, 1) : 0;
  close(ok[0]);
  cancel_source_cancel(s); /* the parent's performer stops */
  test_thread_join(t);
  assert_true(sent);
  assert_true(pid > 0);
  int st = 0;
  assert_int_equal(waitpid(pid, &st, 0), pid);
  if (WIFSIGNALED(st))
    fail_msg("the child died of signal %d cancelling the token",
             WTERMSIG(st));
  assert_true(WIFEXITED(st));
  if (nr != 1 || said != 'k')
    fail_msg("the child did not cancel (exit %d)", WEXITSTATUS(st));
  assert_int_equal(pf.rc, -ECANCELED);
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  assert_int_equal(cancel_curl_thread_cleanup(), 0);
  server_stop(sv);
}

/* ---- A name server that does not answer ------------------------------- *
 * The threaded resolver runs getaddrinfo on a thread of its own, and
 * nothing interrupts getaddrinfo.  To make a lookup that is really slow,
 * a thread moves itself into new network and mount namespaces (root
 * only: skipped otherwise), brings loopback up, bind-mounts a resolv.conf
 * that names 127.0.0.1 as the only server (3 s timeout, one attempt)
 * over /etc/resolv.conf, and listens on 127.0.0.1:53.  Namespaces belong
 * to a thread and are inherited by the threads it creates, so curl's
 * resolver thread, started by the transfer on that thread, asks our
 * server; the rest of the process is not affected.  The server holds
 * the queries until told to answer them (REFUSED), so that the resolver
 * thread abandoned by a cancel ends, and the test can see it go. */

struct dns_server {
  int fd;
  cancel_source *release; /* cancelled: answer from now on */
  cancel_source *stop;    /* cancelled: the server returns */
  cancel_source *victim;  /* cancelled on the first query, or NULL */
  sem_t asked;            /* posted on the first query */
  int64_t asked_at;       /* when the first query arrived */
  int64_t fired;          /* when the victim was cancelled */
  struct dns_query {
    unsigned char b[512];
    size_t len;
    struct sockaddr_in from;
  } held[8];
  int nheld;
};

/* Answers query q with REFUSED: its header and question, QR set. */
static void dns_refuse(int fd, const struct dns_query *q) {
  unsigned char r[512];
  size_t end = 12; /* the header; then the question's name and 4 bytes */
  while (end < q->len && q->b[end] != 0)
    end += 1u + q->b[end];
  end += 5;
  if (q->len < 12 || end > q->len)
    return;
  memcpy(r, q->b, end);
  r[2] = (unsigned char)(0x80 | (q->b[2] & 0x79)); /* QR, opcode, RD */
  r[3] = 0x80 | 5;                                 /* RA, REFUSED */
  memset(r + 6, 0, 6); /* no answer, authority or additional records */
  sendto(fd, r, end, MSG_NOSIGNAL, (const struct sockaddr *)&q->from,
         sizeof q->from);
}

/* Receives one query into q, observing tok.  0, or the error. */
static int dns_recv(struct dns_server *d, const cancel_token *tok,
                    struct dns_query *q) {
  for (;;) {
    int rc = cancel_wait_fd(tok, d->fd, POLLIN, CANCEL_NEVER);
    if (rc < 0)
      return rc;
    socklen_t alen = sizeof q->from;
    ssize_t n = recvfrom(d->fd, q->b, sizeof q->b, MSG_DONTWAIT,
                         (struct sockaddr *)&q->from, &alen);
    if (n >= 0) {
      q->len = (size_t)n;
      return 0;
    }
    if (errno != EAGAIN && errno != EINTR)
      return -errno;
  }
}

static void *dns_server_main(void *arg) {
  struct dns_server *d = arg;
  struct dns_query q;
  /* Holding: nothing is answered, the lookup hangs. */
  while (dns_recv(d, TOK(d->release), &q) == 0) {
    if (d->nheld == 0) {
      d->asked_at = cancel_now();
      if (d->victim != NULL) {
        d->fired = cancel_now();
        cancel_source_cancel(d->victim);
      }
      sem_post(&d->asked);
    }
    if (d->nheld < (int)(sizeof d->held / sizeof d->held[0]))
      d->held[d->nheld++] = q;
  }
  /* Released: refuse what was held and whatever comes next. */
  for (int i = 0; i < d->nheld; i++)
    dns_refuse(d->fd, &d->held[i]);
  while (dns_recv(d, TOK(d->stop), &q) == 0)
    dns_refuse(d->fd, &q);
  return NULL;
}

/* Threads of this process (entries of /proc/self/task), or -1. */
static int task_count(void) {
  DIR *dir = opendir("/proc/self/task");
  if (dir == NULL)
    return -1;
  int n = 0;
  struct dirent *e;
  while ((e = readdir(dir)) != NULL)
    if (e->d_name[0] != '.')
      n++;
  closedir(dir);
  return n;
}

struct task_goal {
  int n;
};

static bool tasks_down_to(void *arg) {
  int n = task_count();
  return n >= 0 && n <= ((struct task_goal *)arg)->n;
}

/* One transfer to a name that never resolves, cancelled by the server's
 * thread the moment the query arrives (by_deadline false) or by the
 * token's own deadline, 200 ms (times the scale: the query must reach the
 * server first). */
struct dns_result {
  int rc;
  CURLcode code;
  int kind;
  bool token_fired;   /* the token's callback ran */
  bool asked;         /* the query reached the server */
  int64_t asked_at;   /* when it did */
  int64_t fired;      /* when the token fired (or its deadline passed) */
  int64_t back;       /* when cancel_curl_perform returned */
  bool resolver_gone; /* the abandoned resolver thread ended, answered */
  int64_t gone_after; /* how long after release it took */
};

struct dns_run {
  int unshare_errno; /* unshare failed: the test is skipped */
  char failed[96];   /* the setup step that failed, "" if none */
  struct dns_result r[2];
};

static bool dns_step(struct dns_run *run, bool ok, const char *what) {
  if (!ok && run->failed[0] == '\0')
    snprintf(run->failed, sizeof run->failed, "%s: %s", what, strerror(errno));
  return ok;
}

/* Makes this thread's view of the world: loopback up, our resolv.conf.
 * Returns the server's socket, or -1 (run->failed says why). */
static int dns_isolate(struct dns_run *run) {
  int s = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (!dns_step(run, s >= 0, "socket"))
    return -1;
  struct ifreq ifr;
  memset(&ifr, 0, sizeof ifr);
  snprintf(ifr.ifr_name, sizeof ifr.ifr_name, "lo");
  bool up = ioctl(s, SIOCGIFFLAGS, &ifr) == 0;
  ifr.ifr_flags |= IFF_UP;
  up = up && ioctl(s, SIOCSIFFLAGS, &ifr) == 0;
  if (!dns_step(run, up, "bringing lo up")) {
    close(s);
    return -1;
  }
  /* Our bind mount must not propagate back to the parent namespace. */
  if (!dns_step(run, mount("none", "/", "none", MS_REC | MS_PRIVATE, NULL) == 0,
                "mount --make-rprivate /")) {
    close(s);
    return -1;
  }
  char path[] = "/tmp/cancel-curl-resolv-XXXXXX";
  int fd = mkstemp(path);
  if (!dns_step(run, fd >= 0, "mkstemp")) {
    close(s);
    return -1;
  }
  const char conf[] = "nameserver 127.0.0.1\noptions timeout:3 attempts:1\n";
  bool ok = write(fd, conf, sizeof conf - 1) == (ssize_t)(sizeof conf - 1);
  close(fd);
  ok =
      dns_step(run, ok, "writing resolv.conf") &&
      dns_step(run, mount(path, "/etc/resolv.conf", "none", MS_BIND, NULL) == 0,
               "bind-mounting resolv.conf");
  unlink(path); /* the mount keeps the file while it exists */
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(53)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (!ok || !dns_step(run, bind(s, (struct sockaddr *)&a, sizeof a) == 0,
                       "bind 127.0.0.1:53")) {
    close(s);
    return -1;
  }
  return s;
}

static void dns_case(struct dns_run *run, int fd, bool by_deadline,
                     struct dns_result *r) {
  struct dns_server d;
  memset(&d, 0, sizeof d);
  d.fd = fd;
  sem_init(&d.asked, 0, 0);
  if (cancel_source_new(&d.release, "release") != 0 ||
      cancel_source_new(&d.stop, "stop") != 0) {
    dns_step(run, false, "cancel_source_new");
    return;
  }
  cancel_source *s;
  int rc = by_deadline ? cancel_source_new_timeout(&s, "req", NULL,
                                                   test_tol(CANCEL_MSEC(200)))
                       : cancel_source_new(&s, "req");
  if (!dns_step(run, rc == 0, "request source"))
    return;
  if (!by_deadline)
    d.victim = s;
  pthread_t server;
  if (pthread_create(&server, NULL, dns_server_main, &d) != 0) {
    dns_step(run, false, "pthread_create");
    return;
  }
  /* Everything but curl's resolver thread runs now (the timer thread
   * too: the deadline armed it). */
  struct task_goal goal = {task_count()};

  CURL *e = curl_easy_init();
  curl_easy_setopt(e, CURLOPT_URL, "http://slow-dns.example.test/");
  curl_easy_setopt(e, CURLOPT_WRITEFUNCTION, sink);
  curl_easy_setopt(e, CURLOPT_NOSIGNAL, 1L);
  struct fire_rec f;
  fire_rec_init(&f);
  cancel_reg reg;
  cancel_register(&reg, TOK(s), fire_cb, &f);
  r->rc = cancel_curl_perform_ex(TOK(s), e, NULL, &r->code);
  r->back = cancel_now();
  /* curl's timeout, taken from the deadline, may beat the token's timer:
   * wait for the token's own callback before reading its reason. */
  r->token_fired = test_sem_wait_ns(&f.sem, test_tol(CANCEL_SEC(2))) == 0;
  cancel_unregister(&reg);
  sem_destroy(&f.sem);
  r->kind = cancel_token_kind(TOK(s));
  /* The server may still be inside the cancel it made: its semaphore
   * comes after. */
  r->asked = test_sem_wait_ns(&d.asked, test_tol(CANCEL_SEC(2))) == 0;
  r->asked_at = d.asked_at;
  r->fired = by_deadline ? cancel_token_deadline(TOK(s)) : d.fired;
  curl_easy_cleanup(e);

  /* The server answers now: the detached resolver thread gets its
   * (refused) answer, frees what it holds and ends. */
  int64_t released = cancel_now();
  cancel_source_cancel(d.release);
  r->resolver_gone =
      test_wait_until(tasks_down_to, &goal, test_tol(CANCEL_SEC(10)));
  r->gone_after = cancel_now() - released;
  cancel_source_cancel(d.stop);
  pthread_join(server, NULL);
  cancel_source_unref(s);
  cancel_source_unref(d.stop);
  cancel_source_unref(d.release);
  sem_destroy(&d.asked);
}

static int64_t dns_main(void *arg) {
  struct dns_run *run = arg;
  if (unshare(CLONE_NEWNS | CLONE_NEWNET) != 0) {
    run->unshare_errno = errno;
    return 0;
  }
  int fd = dns_isolate(run);
  if (fd < 0)
    return 0;
  dns_case(run, fd, false, &run->r[0]);
  if (run->failed[0] == '\0')
    dns_case(run, fd, true, &run->r[1]);
  close(fd);
  return 0;
}

/* A cancel while the host name is still being resolved returns at once:
 * the adapter sets CURLOPT_QUICK_EXIT, so libcurl detaches the resolver
 * thread instead of joining it (which would take the 3 s of the lookup's
 * timeout).  The detached thread ends by itself once the server answers.
 * Both ways a token fires: cancelled by another thread, and its deadline
 * (which curl's own timeout, taken from it, races). */
static void test_cancel_during_slow_dns(void **state) {
  (void)state;
  struct dns_run run;
  memset(&run, 0, sizeof run);
  struct test_waiter w;
  /* The namespaces are entered by a thread of its own, which ends with
   * them: the test's own thread stays where it is. */
  test_waiter_start(&w, dns_main, &run);
  test_waiter_end(&w, test_tol(CANCEL_SEC(30)), NULL, NULL);
  if (run.unshare_errno != 0) {
    print_message("slow DNS test skipped: unshare(CLONE_NEWNS|CLONE_NEWNET) "
                  "failed (%s): it needs root (CAP_SYS_ADMIN)\n",
                  strerror(run.unshare_errno));
    skip();
  }
  if (run.failed[0] != '\0') {
    print_error("slow DNS test setup: %s\n", run.failed);
    fail();
  }
  for (int i = 0; i < 2; i++) {
    const struct dns_result *r = &run.r[i];
    print_message("slow DNS, %s: returned %.2f ms after the token fired; "
                  "the abandoned resolver thread ended %.2f ms after the "
                  "server answered\n",
                  i == 0 ? "cancelled" : "deadline",
                  (double)(r->back - r->fired) / 1e6,
                  (double)r->gone_after / 1e6);
    assert_true(r->asked); /* the lookup was in flight */
    assert_int_equal(r->rc, -ECANCELED);
    assert_true(r->token_fired);
    assert_int_equal(r->kind, i == 0 ? CANCEL_REQUESTED : CANCEL_TIMEOUT);
    if (i == 0)
      assert_int_equal(r->code, CURLE_ABORTED_BY_CALLBACK);
    else
      assert_i64_lt(r->asked_at, r->fired); /* asked before the deadline */
    /* Joining the resolver would take the lookup's 3 s.  curl's own
     * timeout, taken from the deadline, counts whole milliseconds and may
     * end the call a little before the deadline itself. */
    assert_i64_ge(r->back - r->fired, i == 0 ? 0 : -CANCEL_MSEC(2));
    assert_i64_lt(r->back - r->fired, test_tol(CANCEL_MSEC(20)));
    assert_true(r->resolver_gone);
  }
}

/* ---- -ECANCELED means the token fired ---------------------------------- *
 * curl's own timeout is taken from the token's deadline, and it races the
 * library's timer that fires the token at that same deadline.  Whoever
 * wins, a call that returns -ECANCELED has a cancelled token whose reason
 * can be read at once (cancel.h's conventions): the edge answers by it. */

/* Transfers of 20 ms in the natural race (see the report printed). */
#define ROUNDS_RACE 200

static void test_deadline_cancel_has_reason(void **state) {
  (void)state;
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, HANG);
  CURL *e = easy_for(sv);
  int lies = 0, cancelled = 0, timedout = 0;
  for (int round = 0; round < ROUNDS_RACE; round++) {
    cancel_source *s = NULL;
    assert_int_equal(
        cancel_source_new_timeout(&s, "downstream call", NULL, CANCEL_MSEC(20)),
        0);
    CURLcode code;
    int rc = cancel_curl_perform_ex(TOK(s), e, NULL, &code);
    /* At once: no waiting for the timer here. */
    bool fired = cancel_token_is_cancelled(TOK(s));
    cancel_reason why;
    int have = cancel_token_reason(TOK(s), &why);
    if (rc == -ECANCELED && (!fired || have != 1)) {
      lies++;
    } else if (rc == -ECANCELED) {
      cancelled++;
      assert_int_equal(why.kind, CANCEL_TIMEOUT);
      assert_string_equal(why.origin, "downstream call");
    } else {
      /* The timer did not fire the token long after its deadline: an
       * honest answer, but a machine far too loaded for this test. */
      assert_int_equal(rc, -ETIMEDOUT);
      assert_false(fired);
      timedout++;
    }
    /* The server saw the client go: the next round gets the server. */
    assert_int_equal(test_sem_wait_ns(&sv->done, test_tol(CANCEL_SEC(2))), 0);
    cancel_source_unref(s);
  }
  print_message("curl deadline race: %d rounds, %d -ECANCELED with the "
                "reason, %d -ECANCELED on a live token, %d -ETIMEDOUT\n",
                ROUNDS_RACE, cancelled, lies, timedout);
  assert_int_equal(lies, 0);
  assert_int_equal(timedout, 0);
  curl_easy_cleanup(e);
  server_stop(sv);
}

/* The same race lost every time: the timer thread is held while the
 * deadline passes (tests/stall.h), so curl's timeout always comes first;
 * the call waits for the timer rather than return -ECANCELED on a live
 * token.  Also the call that finds the deadline already passed (nothing
 * is sent). */
static void test_deadline_cancel_waits_for_late_timer(void **state) {
  (void)state;
  struct server *sv = test_shared(sizeof *sv);
  server_start(sv, HANG);
  CURL *e = easy_for(sv);
  const int64_t hold = CANCEL_MSEC(200);

  /* curl's timeout fires while the timer is held. */
  int64_t deadline = cancel_now() + CANCEL_MSEC(40);
  struct test_stall *st = test_stall_begin(deadline - CANCEL_MSEC(2), hold);
  cancel_source *s = new_src("downstream call");
  assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
  CURLcode code;
  int rc = cancel_curl_perform_ex(TOK(s), e, NULL, &code);
  int64_t back = cancel_now();
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(rc, -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_int_equal(code, CURLE_OPERATION_TIMEDOUT); /* curl's came first */
  /* Not before the timer went on: the call waited for it. */
  assert_i64_ge(back, __atomic_load_n(&st->left_at, __ATOMIC_ACQUIRE));
  assert_int_equal(test_sem_wait_ns(&sv->done, test_tol(CANCEL_SEC(2))), 0);
  test_stall_end(st);
  cancel_source_unref(s);

  /* The deadline passed before the call, the timer held: nothing is sent,
   * and the call returns once the token fired. */
  int before = __atomic_load_n(&sv->connections, __ATOMIC_SEQ_CST);
  deadline = cancel_now() + CANCEL_MSEC(10);
  st = test_stall_begin(deadline - CANCEL_MSEC(2), hold);
  s = new_src("downstream call");
  assert_int_equal(cancel_source_cancel_at(s, deadline), 0);
  test_stall_entered(st);
  while (cancel_now() < deadline)
    test_sleep_ns(deadline - cancel_now());
  rc = cancel_curl_perform(TOK(s), e);
  assert_true(cancel_token_is_cancelled(TOK(s)));
  assert_int_equal(rc, -ECANCELED);
  assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
  assert_int_equal(__atomic_load_n(&sv->connections, __ATOMIC_SEQ_CST), before);
  test_stall_end(st);
  cancel_source_unref(s);

  curl_easy_cleanup(e);
  server_stop(sv);
}

static void test_grpc_format(void **state) {
  (void)state;
  char b[16];
  assert_int_equal(cancel_curl_grpc_timeout(CANCEL_MSEC(250), b, sizeof b), 4);
  assert_string_equal(b, "250m");
  cancel_curl_grpc_timeout(CANCEL_USEC(300), b, sizeof b);
  assert_string_equal(b, "300u");
  cancel_curl_grpc_timeout(CANCEL_SEC(200000), b, sizeof b);
  assert_string_equal(b, "200000S");
  assert_int_equal(cancel_curl_grpc_timeout(-1, b, sizeof b), -EINVAL);
  assert_int_equal(cancel_curl_grpc_timeout(CANCEL_SEC(2), b, 3), -EINVAL);
}

int main(void) {
  curl_global_init(CURL_GLOBAL_DEFAULT);
  const struct CMUnitTest tests[] = {
      cmocka_unit_test(test_completes),
      cmocka_unit_test(test_cancel_abandons_slow_server),
      cmocka_unit_test(test_deadline_headers),
      cmocka_unit_test(test_nothing_sent_when_no_time_left),
      cmocka_unit_test(test_errors_are_not_cancellations),
      cmocka_unit_test(test_keeps_connection_alive),
      cmocka_unit_test(test_http2_cancel_closes_connection),
      cmocka_unit_test(test_reentrant_call),
      cmocka_unit_test(test_thread_exit_closes),
      cmocka_unit_test(test_fork_child_has_its_own),
      cmocka_unit_test(test_fork_during_perform),
      cmocka_unit_test(test_deadline_cancel_has_reason),
      cmocka_unit_test(test_deadline_cancel_waits_for_late_timer),
      cmocka_unit_test(test_grpc_format),
      cmocka_unit_test(test_cancel_during_slow_dns),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  /* This thread ends the process: its multi handle is not freed at exit,
   * and no multi handle may outlive curl_global_cleanup. */
  cancel_curl_thread_cleanup();
  curl_global_cleanup();
  return rc;
}
