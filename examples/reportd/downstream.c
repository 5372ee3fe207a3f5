/*
 * downstream: the metadata service reportd calls, with a latency of its
 * own.  It is a libcancel service too: it waits on its request token, so
 * when reportd gives up on a call (its client left, its timeout fired) the
 * downstream stops as well, and it logs the deadline headers it was sent.
 *
 *   downstream [--port N] [--latency MS]
 *   GET /meta/{id}[?delay_ms=N]  -> {"id":N,"title":"Report N"} after the
 *                                   delay; 404 for ids outside 1..100
 */
#define _GNU_SOURCE
#include <cancel.h>
#include <cancel/host.h>
#include <cancel/http.h>
#include <cancel/log.h>
#include <cancel/watch.h>

#include <errno.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "number.h"

static long latency_ms = 20;

static int h_meta(cancel_http_request *req, const cancel_token *tok,
                  void *arg) {
  (void)arg;
  long id, delay = latency_ms;
  uint64_t id64;
  if (cancel_http_request_param_u64(req, "id", 1000000000, &id64) < 0)
    return cancel_http_respond(req, 400, "text/plain", "id\n", 3);
  id = (long)id64;
  const char *d = cancel_http_request_query(req, "delay_ms");
  if (d != NULL && !parse_number(d, 0, 600000, &delay))
    return cancel_http_respond(req, 400, "text/plain", "delay_ms\n", 9);
  const char *g = cancel_http_request_header(req, "grpc-timeout");
  const char *x = cancel_http_request_header(req, "X-Request-Timeout-Ms");
  cancel_log(CANCEL_LOG_INFO, "downstream", "meta",
             "id=%ld delay_ms=%ld "
             "grpc_timeout=%s x_request_timeout_ms=%s",
             id, delay, g != NULL ? g : "-", x != NULL ? x : "-");
  int rc = cancel_sleep(tok, CANCEL_MSEC(delay));
  if (rc < 0)
    return rc;
  if (id < 1 || id > 100)
    return cancel_http_respond(req, 404, "text/plain", "no such report\n", 15);
  char json[96];
  int n = snprintf(json, sizeof json, "{\"id\":%ld,\"title\":\"Report %ld\"}\n",
                   id, id);
  return cancel_http_respond(req, 200, "application/json", json, (size_t)n);
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
      {"GET", "/meta/{id}", h_meta, NULL, CANCEL_SEC(600)}};
  cancel_http_options o = {.name = "downstream",
                           .port = (uint16_t)port,
                           .threads = 64,
                           .drain_timeout_ns = CANCEL_SEC(2)};
  int rc = cancel_host_new(&host, "downstream", &ho);
  if (rc == 0)
    rc = cancel_http_server_new(&srv, &o, routes, 1);
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
  return status < 0 ? 1 : status;
}
