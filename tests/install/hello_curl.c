/* The smallest user of an installed libcancel-curl: built by run.sh
 * against the installed headers and libraries, with pkg-config and with
 * find_package(cancel).  A transfer given a token that already fired
 * fails at once with -ECANCELED, before any connection is made (the URL
 * names the discard port of loopback: nothing needs to listen there). */
#include <cancel/curl.h>

#include <stdio.h>
#include <string.h>

int main(void) {
  cancel_source *src;
  char budget[16] = "";
  int rc;

  if (curl_global_init(CURL_GLOBAL_DEFAULT) != CURLE_OK) {
    fprintf(stderr, "curl_global_init failed\n");
    return 1;
  }
  CURL *easy = curl_easy_init();
  if (easy == NULL || cancel_source_new(&src, "hello") != 0) {
    fprintf(stderr, "curl_easy_init or cancel_source_new failed\n");
    return 1;
  }
  curl_easy_setopt(easy, CURLOPT_URL, "http://127.0.0.1:9/");
  curl_easy_setopt(easy, CURLOPT_NOSIGNAL, 1L);
  cancel_source_cancel(src);
  rc = cancel_curl_perform(cancel_source_token(src), easy);
  cancel_source_unref(src);
  curl_easy_cleanup(easy);
  curl_global_cleanup();
  if (rc != -ECANCELED) {
    fprintf(stderr, "cancelled transfer returned %d, not -ECANCELED\n", rc);
    return 1;
  }
  if (cancel_curl_grpc_timeout(CANCEL_MSEC(250), budget, sizeof budget) != 4 ||
      strcmp(budget, "250m") != 0) {
    fprintf(stderr, "cancel_curl_grpc_timeout: \"%s\"\n", budget);
    return 1;
  }
  printf("OK\n");
  return 0;
}
