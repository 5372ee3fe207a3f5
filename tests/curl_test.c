/*
 * libcancel-curl against a real HTTP server on loopback: a small server
 * thread in this file that answers at once, or never (it waits for the
 * client to go away and records when it did), and records the headers it
 * received.
 */
#include "test_util.h"

#include "cancel/curl.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
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
};

static void *server_main(void *arg) {
  struct server *sv = arg;
  for (;;) {
    int c = accept(sv->lfd, NULL, NULL);
    if (c < 0)
      return NULL; /* listener shut down */
    sv->connections++;
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
    close(c);
    sem_post(&sv->done);
  }
}

static void server_start(struct server *sv, enum mode mode) {
  memset(sv, 0, sizeof *sv);
  sv->mode = mode;
  sem_init(&sv->done, 0, 0);
  sv->lfd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  assert_true(sv->lfd >= 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(bind(sv->lfd, (struct sockaddr *)&a, sizeof a), 0);
  assert_int_equal(listen(sv->lfd, 16), 0);
  socklen_t len = sizeof a;
  assert_int_equal(getsockname(sv->lfd, (struct sockaddr *)&a, &len), 0);
  sv->port = ntohs(a.sin_port);
  assert_int_equal(pthread_create(&sv->thread, NULL, server_main, sv), 0);
}

static void server_stop(struct server *sv) {
  shutdown(sv->lfd, SHUT_RDWR);
  close(sv->lfd);
  pthread_join(sv->thread, NULL);
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
  struct server sv;
  server_start(&sv, ANSWER);
  CURL *e = easy_for(&sv);
  cancel_source *s = new_src("req");
  CURLcode code;
  assert_int_equal(cancel_curl_perform_ex(TOK(s), e, NULL, &code), 0);
  assert_int_equal(code, CURLE_OK);
  long status = 0;
  curl_easy_getinfo(e, CURLINFO_RESPONSE_CODE, &status);
  assert_int_equal(status, 200);
  /* No deadline on the token: no deadline headers. */
  assert_null(strstr(sv.request, "grpc-timeout"));
  assert_null(strstr(sv.request, "X-Request-Timeout-Ms"));
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  server_stop(&sv);
}

/* A server that never answers: the cancel abandons the transfer within
 * 5 ms (times the scale), and the server sees the connection close. */
static void test_cancel_abandons_slow_server(void **state) {
  (void)state;
  struct server sv;
  server_start(&sv, HANG);
  CURL *e = easy_for(&sv);
  for (int round = 0; round < 5; round++) {
    cancel_source *s = new_src("req");
    struct fire_rec f;
    fire_rec_init(&f);
    cancel_reg reg;
    assert_int_equal(cancel_register(&reg, TOK(s), fire_cb, &f), 0);
    assert_int_equal(cancel_source_cancel_after(s, CANCEL_MSEC(50)), 0);
    CURLcode code;
    int rc = cancel_curl_perform_ex(TOK(s), e, NULL, &code);
    int64_t back = cancel_now();
    /* The token's deadline also bounds curl's own timeout: on a slow
     * machine curl may give up a moment before the token's timer fires,
     * and that is reported as the token's cancellation too. */
    assert_int_equal(test_sem_wait_ns(&f.sem, test_tol(CANCEL_SEC(2))), 0);
    assert_int_equal(cancel_unregister(&reg), 0);
    sem_destroy(&f.sem);
    int64_t fired = f.at;
    assert_int_equal(rc, -ECANCELED);
    assert_int_equal(cancel_token_kind(TOK(s)), CANCEL_TIMEOUT);
    assert_i64_lt(back - fired, test_tol(CANCEL_MSEC(5)));
    assert_int_equal(test_sem_wait_ns(&sv.done, test_tol(CANCEL_SEC(2))), 0);
    assert_i64_lt(sv.closed_at - fired, test_tol(CANCEL_MSEC(20)));
    cancel_source_unref(s);
  }
  curl_easy_cleanup(e);
  server_stop(&sv);
}

static void test_deadline_headers(void **state) {
  (void)state;
  struct server sv;
  server_start(&sv, ANSWER);
  CURL *e = easy_for(&sv);
  cancel_source *s;
  assert_int_equal(
      cancel_source_new_timeout(&s, "budget", NULL, CANCEL_MSEC(1500)), 0);
  int64_t before = cancel_now();
  struct curl_slist *mine = curl_slist_append(NULL, "X-Mine: yes");
  cancel_curl_options o = {.headers = mine};
  assert_int_equal(cancel_curl_perform_ex(TOK(s), e, &o, NULL), 0);
  int64_t spent = cancel_now() - before;
  assert_non_null(strstr(sv.request, "X-Mine: yes"));
  const char *g = strstr(sv.request, "grpc-timeout: ");
  const char *x = strstr(sv.request, "X-Request-Timeout-Ms: ");
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
  assert_null(strstr(sv.request, "grpc-timeout"));
  assert_null(strstr(sv.request, "X-Request-Timeout-Ms"));
  curl_slist_free_all(mine);
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  server_stop(&sv);
}

/* A deadline already passed (or a token cancelled before): nothing sent. */
static void test_nothing_sent_when_no_time_left(void **state) {
  (void)state;
  struct server sv;
  server_start(&sv, ANSWER);
  CURL *e = easy_for(&sv);
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
  assert_int_equal(sv.connections, 0);
  cancel_source_unref(c);
  cancel_source_unref(p);
  cancel_source_unref(s);
  curl_easy_cleanup(e);
  server_stop(&sv);
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
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  assert_int_equal(bind(fd, (struct sockaddr *)&a, sizeof a), 0);
  socklen_t len = sizeof a;
  getsockname(fd, (struct sockaddr *)&a, &len);
  char url[64];
  snprintf(url, sizeof url, "http://127.0.0.1:%d/", ntohs(a.sin_port));
  curl_easy_setopt(e, CURLOPT_URL, url);
  assert_int_equal(cancel_curl_perform_ex(NULL, e, NULL, &code), -ECONNREFUSED);
  assert_int_equal(code, CURLE_COULDNT_CONNECT);
  close(fd);
  assert_int_equal(cancel_curl_perform(NULL, NULL), -EINVAL);
  curl_easy_cleanup(e);
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
      cmocka_unit_test(test_grpc_format),
  };
  int rc = cmocka_run_group_tests(tests, NULL, NULL);
  curl_global_cleanup();
  return rc;
}
