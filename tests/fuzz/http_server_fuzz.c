/*
 * libFuzzer harness: libcancel-http fed raw bytes.  One server, started
 * once, with routes like reportd's (a parameter, a body, a slow handler
 * that watches its token); each input is written whole to a new loopback
 * connection, and the answer read until it is whole or the server closes
 * (its read deadlines, short here, end an incomplete request).  What must hold for any input:
 *   - nothing crashes or trips ASan/UBSan (the point of it);
 *   - an answer, when there is one, starts with a status line;
 *   - every line the server logs is valid logfmt with each of its own
 *     fields once: whatever the client sent cannot forge or swallow one;
 *   - the server keeps answering: every 64 inputs a well-formed request
 *     gets its 200.
 */
#define _GNU_SOURCE
#include "cancel/http.h"
#include "cancel/log.h"

#include "logfmt.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <unistd.h>

static cancel_http_server *srv;
static uint16_t port;

static int h_report(cancel_http_request *req, const cancel_token *tok,
                    void *arg) {
  (void)arg;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;
  const char *id = cancel_http_request_param(req, "id");
  char body[96];
  int n = snprintf(body, sizeof body, "{\"id\":\"%.40s\"}", id ? id : "");
  return cancel_http_respond(req, 200, "application/json", body, (size_t)n);
}

static int h_post(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)tok;
  (void)arg;
  size_t len = 0;
  (void)cancel_http_request_body(req, &len);
  (void)cancel_http_request_query(req, "report");
  (void)cancel_http_request_header(req, "Content-Type");
  return cancel_http_respond(req, 202, "text/plain", "queued\n", 7);
}

static int h_slow(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)req;
  (void)arg;
  /* Waits on its token: a client that closes, or a deadline header, ends
   * it; otherwise it answers after 5 ms. */
  int rc = cancel_sleep(tok, CANCEL_MSEC(5));
  if (rc < 0)
    return rc;
  return cancel_http_respond(req, 200, "text/plain", "ok\n", 3);
}

static int h_fail(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)req;
  (void)tok;
  (void)arg;
  return -EIO;
}

static const cancel_http_route routes[] = {
    {"GET", "/reports/{id}", h_report, NULL, 0},
    {"POST", "/jobs", h_post, NULL, 0},
    {NULL, "/slow/{x}", h_slow, NULL, CANCEL_MSEC(50)},
    {"GET", "/fail", h_fail, NULL, 0},
};

/* Every line must read back as logfmt with each key once: a client's
 * bytes cannot add a field (a forged level=error) or swallow one. */
static void sink(int level, const char *line, size_t len, void *arg) {
  (void)level;
  (void)arg;
  struct lf_record r;
  if (getenv("HTTP_FUZZ_VERBOSE") != NULL)
    fprintf(stderr, "%s\n", line);
  if (strlen(line) != len || lf_decode(line, &r) != 0) {
    fprintf(stderr, "log line is not logfmt (%s): %s\n",
                strlen(line) != len ? "NUL inside" : r.error, line);
    abort();
  }
  for (int i = 0; i < r.n; i++)
    for (int j = 0; j < i; j++)
      if (strcmp(r.f[i].key, r.f[j].key) == 0) {
        fprintf(stderr, "log line has %s twice: %s\n", r.f[i].key, line);
        abort();
      }
  lf_free(&r);
}

int LLVMFuzzerInitialize(int *argc, char ***argv) {
  (void)argc;
  (void)argv;
  cancel_log_set_sink(sink, NULL, CANCEL_LOG_DEBUG);
  /* Short read deadlines: every connection must end within them, which
   * the exchange below checks (3 s). */
  cancel_http_options o = {.threads = 2,
                           .max_body = 4096,
                           .drain_timeout_ns = CANCEL_MSEC(100),
                           .header_timeout_ns = CANCEL_MSEC(100),
                           .body_timeout_ns = CANCEL_MSEC(100),
                           .idle_timeout_ns = CANCEL_SEC(1)};
  if (cancel_http_server_new(&srv, &o, routes,
                             sizeof routes / sizeof routes[0]) != 0 ||
      cancel_http_server_start(srv, NULL) != 0) {
    fprintf(stderr, "http_fuzz: server did not start\n");
    abort();
  }
  port = cancel_http_server_port(srv);
  return 0;
}

/* Whether buf holds one whole response: headers, and as many body bytes
 * as Content-Length says (a response without one ends with the close). */
static bool response_complete(const char *buf, size_t len) {
  const char *end = memmem(buf, len, "\r\n\r\n", 4);
  if (end == NULL)
    return false;
  size_t head = (size_t)(end - buf) + 4;
  const char *cl = memmem(buf, head, "Content-Length: ", 16);
  if (cl == NULL)
    return false;
  return len >= head + strtoul(cl + 16, NULL, 10);
}

/* Sends data on a new connection, reads until the server closes or one
 * whole response came (a keep-alive connection stays open after it).  A connection
 * that neither ends nor answers within 3 s outlived every read deadline
 * of the server: a finding.  Returns the bytes read into buf (at most
 * cap), -1 when no connection could be made. */
static ssize_t exchange(const void *data, size_t size, char *buf, size_t cap) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -1;
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0) {
    close(fd);
    return -1;
  }
  const char *p = data;
  size_t left = size;
  while (left > 0) {
    ssize_t n = send(fd, p, left, MSG_NOSIGNAL);
    if (n <= 0)
      break; /* the server closed early: fine, it may refuse */
    p += n;
    left -= (size_t)n;
  }
  /* No half-close: the server reads one as the client gone (and answers
   * nothing, as it should); the read deadlines end what stays open. */
  size_t got = 0;
  for (;;) {
    struct pollfd pfd = {.fd = fd, .events = POLLIN};
    int pr = poll(&pfd, 1, 3000);
    if (pr == 0) {
      fprintf(stderr, "http_fuzz: no answer and no close within 3 s\n");
      abort();
    }
    char tmp[4096];
    ssize_t n = recv(fd, tmp, sizeof tmp, 0);
    if (n <= 0)
      break;
    size_t take = (size_t)n < cap - got ? (size_t)n : cap - got;
    memcpy(buf + got, tmp, take);
    got += take;
    if (response_complete(buf, got))
      break;
  }
  close(fd);
  return (ssize_t)got;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
  static unsigned runs;
  char buf[8192];
  ssize_t got = exchange(data, size, buf, sizeof buf);
  if (got > 0 && (got < 9 || memcmp(buf, "HTTP/1.", 7) != 0)) {
    fprintf(stderr, "http_fuzz: answer without a status line\n");
    abort();
  }
  if (++runs % 64 == 0) {
    static const char ok[] =
        "GET /reports/7 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n";
    got = exchange(ok, sizeof ok - 1, buf, sizeof buf);
    if (got < 12 || memcmp(buf + 9, "200", 3) != 0) {
      fprintf(stderr, "http_fuzz: the server stopped answering: [%.*s]\n",
              got > 0 ? (int)got : 0, buf);
      abort();
    }
  }
  return 0;
}
