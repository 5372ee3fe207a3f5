/*
 * downstream: the metadata service reportd calls, with a latency of its
 * own.  It is a libcancel service too: it waits on its request token, so
 * when reportd gives up on a call (its client left, its timeout fired) the
 * downstream stops as well, and it logs the deadline headers it was sent.
 *
 *   downstream [--port N] [--latency MS]
 *   GET /meta/{id}[?delay_ms=N]  -> {"id":N,"title":"Report N"} after the
 *                                   delay; 404 for ids outside 1..100
 *   PUT /meta/{id}/title         the body (any bytes, valid UTF-8) becomes
 *                                report id's title; 400 when it is not
 *                                UTF-8, unless ?unchecked=1: then its
 *                                bytes go between the quotes as they are,
 *                                unescaped (a broken downstream's JSON)
 *   PUT /meta/{id}/status        the body (a number, 100..599) is the
 *                                status GET /meta/{id} answers from now
 *                                on (200: back to normal)
 *
 * The PUT routes are the tests' way to make the downstream hostile: a
 * title that holds quotes, backslashes, control bytes, a megabyte; a
 * report whose metadata is unavailable (503) for a while.  Every JSON
 * body is built with jansson, which escapes what JSON requires.
 */
#define _GNU_SOURCE
#include <cancel.h>
#include <cancel/host.h>
#include <cancel/http.h>
#include <cancel/log.h>
#include <cancel/watch.h>

#include <errno.h>
#include <inttypes.h>
#include <jansson.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "number.h"

#define NREPORTS 100

static long latency_ms = 20;

/* What the PUT routes changed, per report id (1..NREPORTS); guarded by mu.
 * A title is held as a jansson string (its bytes and length), so that a
 * reader takes a reference under the lock and dumps it outside. */
static struct meta {
  json_t *title; /* NULL: "Report <id>" */
  char *raw;     /* set by ?unchecked=1 instead of title */
  size_t raw_len;
  long status; /* 0: 200 */
} metas[NREPORTS + 1];
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;

static int respond_text(cancel_http_request *req, unsigned status,
                        const char *text) {
  return cancel_http_respond(req, status, "text/plain; charset=utf-8", text,
                             strlen(text));
}

/* Answers obj (a reference this call takes over) as JSON. */
static int respond_json(cancel_http_request *req, unsigned status,
                        json_t *obj) {
  char *text = obj != NULL ? json_dumps(obj, JSON_COMPACT) : NULL;
  json_decref(obj);
  if (text == NULL)
    return -ENOMEM;
  size_t n = strlen(text);
  /* One more byte: the newline the bodies have always ended with. */
  char *body = realloc(text, n + 2);
  if (body == NULL) {
    free(text);
    return -ENOMEM;
  }
  body[n] = '\n';
  body[n + 1] = '\0';
  int rc = cancel_http_respond(req, status, "application/json", body, n + 1);
  free(body);
  return rc;
}

static int h_meta(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)arg;
  long id, delay = latency_ms;
  uint64_t id64;
  if (cancel_http_request_param_u64(req, "id", 1000000000, &id64) < 0)
    return respond_text(req, 400, "id\n");
  id = (long)id64;
  const char *d = cancel_http_request_query(req, "delay_ms");
  if (d != NULL && !parse_number(d, 0, 600000, &delay))
    return respond_text(req, 400, "delay_ms\n");
  const char *g = cancel_http_request_header(req, "grpc-timeout");
  const char *x = cancel_http_request_header(req, "X-Request-Timeout-Ms");
  CANCEL_LOG(CANCEL_LOG_INFO, "downstream", "meta", CANCEL_LOG_I64("id", id),
             CANCEL_LOG_I64("delay_ms", delay),
             CANCEL_LOG_STRN("grpc_timeout", g != NULL ? g : "-", 64),
             CANCEL_LOG_STRN("x_request_timeout_ms", x != NULL ? x : "-", 64));
  int rc = cancel_sleep(tok, CANCEL_MSEC(delay));
  if (rc < 0)
    return rc;
  if (id < 1 || id > NREPORTS)
    return respond_text(req, 404, "no such report\n");
  pthread_mutex_lock(&mu);
  json_t *title = json_incref(metas[id].title);
  long status = metas[id].status;
  char *raw = NULL;
  size_t raw_len = metas[id].raw_len;
  if (metas[id].raw != NULL && (raw = malloc(raw_len + 64)) != NULL) {
    /* The broken downstream: its title's bytes pasted between quotes,
     * which is what writing JSON by hand does.  Only ?unchecked=1 asks
     * for it; reportd must not pass it on. */
    int n = snprintf(raw, 64, "{\"id\":%ld,\"title\":\"", id);
    memcpy(raw + n, metas[id].raw, raw_len);
    memcpy(raw + (size_t)n + raw_len, "\"}\n", 3);
    raw_len += (size_t)n + 3;
  }
  pthread_mutex_unlock(&mu);
  if (status != 0 && status != 200) {
    json_decref(title);
    free(raw);
    return respond_text(req, (unsigned)status, "unavailable\n");
  }
  if (raw != NULL) {
    rc = cancel_http_respond(req, 200, "application/json", raw, raw_len);
    free(raw);
    return rc;
  }
  if (title == NULL) {
    char text[32];
    snprintf(text, sizeof text, "Report %ld", id);
    title = json_string(text);
  }
  /* "o": the object takes the title's reference, even when it fails. */
  return respond_json(
      req, 200, json_pack("{s:I,s:o}", "id", (json_int_t)id, "title", title));
}

/* The report id of a PUT route, or 0 (and a 404 sent) when it has none. */
static long put_id(cancel_http_request *req) {
  long id;
  if (!parse_number(cancel_http_request_param(req, "id"), 1, NREPORTS, &id)) {
    respond_text(req, 404, "no such report\n");
    return 0;
  }
  return id;
}

static int h_put_title(cancel_http_request *req, const cancel_token *tok,
                       void *arg) {
  (void)tok;
  (void)arg;
  long id = put_id(req);
  if (id == 0)
    return 0;
  size_t len = 0;
  const char *body = cancel_http_request_body(req, &len);
  const char *u = cancel_http_request_query(req, "unchecked");
  bool unchecked = u != NULL && strcmp(u, "1") == 0;
  /* json_stringn refuses what is not UTF-8: the title is rejected here,
   * at the boundary where it comes in, not sent on to break a client.
   * It keeps NUL bytes (JSON escapes them as \u0000). */
  json_t *title = NULL;
  char *raw = NULL;
  if (unchecked) {
    if ((raw = malloc(len + 1)) == NULL)
      return -ENOMEM;
    if (len > 0)
      memcpy(raw, body, len);
  } else if ((title = json_stringn(body != NULL ? body : "", len)) == NULL) {
    return respond_text(req, 400, "title: not UTF-8\n");
  }
  pthread_mutex_lock(&mu);
  json_t *old = metas[id].title;
  char *old_raw = metas[id].raw;
  metas[id].title = title;
  metas[id].raw = raw;
  metas[id].raw_len = len;
  pthread_mutex_unlock(&mu);
  json_decref(old);
  free(old_raw);
  CANCEL_LOG(CANCEL_LOG_INFO, "downstream", "title set",
             CANCEL_LOG_I64("id", id), CANCEL_LOG_U64("bytes", len),
             CANCEL_LOG_I64("unchecked", unchecked));
  return respond_json(
      req, 200,
      json_pack("{s:I,s:I}", "id", (json_int_t)id, "bytes", (json_int_t)len));
}

static int h_put_status(cancel_http_request *req, const cancel_token *tok,
                        void *arg) {
  (void)tok;
  (void)arg;
  long id = put_id(req);
  if (id == 0)
    return 0;
  size_t len = 0;
  const char *body = cancel_http_request_body(req, &len);
  char text[8];
  long status;
  if (body == NULL || len == 0 || len >= sizeof text)
    return respond_text(req, 400, "status: 100..599\n");
  memcpy(text, body, len);
  text[len] = '\0';
  if (len > 0 && text[len - 1] == '\n')
    text[len - 1] = '\0';
  if (!parse_number(text, 100, 599, &status))
    return respond_text(req, 400, "status: 100..599\n");
  pthread_mutex_lock(&mu);
  metas[id].status = status;
  pthread_mutex_unlock(&mu);
  CANCEL_LOG(CANCEL_LOG_INFO, "downstream", "status set",
             CANCEL_LOG_I64("id", id), CANCEL_LOG_I64("status", status));
  return respond_json(req, 200,
                      json_pack("{s:I,s:I}", "id", (json_int_t)id, "status",
                                (json_int_t)status));
}

int main(int argc, char **argv) {
  cancel_signals_block();
  long port = 8081;
  for (int i = 1; i < argc; i++) {
    if (strcmp(argv[i], "--port") == 0 && i + 1 < argc &&
        parse_number(argv[i + 1], 0, 65535, &port)) {
      i++;
    } else if (strcmp(argv[i], "--latency") == 0 && i + 1 < argc &&
               parse_number(argv[i + 1], 0, 600000, &latency_ms)) {
      i++;
    } else {
      fprintf(stderr, "usage: downstream [--port N] [--latency MS]\n");
      return strcmp(argv[i], "--help") == 0 ? 0 : 1;
    }
  }
  cancel_host *host = NULL;
  cancel_http_server *srv = NULL;
  cancel_host_options ho = {.shutdown_timeout_ns = CANCEL_SEC(5)};
  const cancel_http_route routes[] = {
      {"GET", "/meta/{id}", h_meta, NULL, CANCEL_SEC(600)},
      {"PUT", "/meta/{id}/title", h_put_title, NULL, 0},
      {"PUT", "/meta/{id}/status", h_put_status, NULL, 0},
  };
  /* Room for a title of a few megabytes (the tests send one of 1 MiB). */
  cancel_http_options o = {.name = "downstream",
                           .port = (uint16_t)port,
                           .threads = 64,
                           .drain_timeout_ns = CANCEL_SEC(2),
                           .max_body = 8u << 20};
  int rc = cancel_host_new(&host, "downstream", &ho);
  if (rc == 0)
    rc = cancel_http_server_new(&srv, &o, routes,
                                sizeof routes / sizeof routes[0]);
  if (rc == 0)
    rc = cancel_http_server_start(srv, cancel_host_stopping(host));
  if (rc == 0)
    rc = cancel_host_add_worker(host, "http", cancel_http_server_run, srv);
  if (rc < 0) {
    fprintf(stderr, "downstream: %s\n", cancel_strerror(rc));
    return 1;
  }
  printf("listening port=%u\n", (unsigned)cancel_http_server_port(srv));
  fflush(stdout);
  int status = cancel_host_run(host);
  if (status == CANCEL_HOST_EXIT_TIMEOUT)
    _exit(status);
  cancel_http_server_free(srv);
  cancel_host_free(host);
  for (size_t i = 0; i <= NREPORTS; i++) {
    json_decref(metas[i].title);
    free(metas[i].raw);
  }
  return status < 0 ? 1 : status;
}
