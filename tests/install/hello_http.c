/* The smallest user of an installed libcancel-http: built by run.sh
 * against the installed headers and libraries, with pkg-config and with
 * find_package(cancel).  cancel/http.h names no libmicrohttpd type, so the
 * program never calls libmicrohttpd itself: the shared adapter needs it
 * only at run time, the static one brings it to the link (its object
 * calls MHD_*), which is what this program checks. */
#include <cancel/http.h>

#include <stdio.h>

int main(void) {
  int64_t ns = 0;

  if (cancel_http_parse_timeout("250m", true, &ns) != 0 ||
      ns != CANCEL_MSEC(250)) {
    fprintf(stderr, "cancel_http_parse_timeout(\"250m\"): %lld ns\n",
            (long long)ns);
    return 1;
  }
  if (cancel_http_parse_timeout("1500", false, &ns) != 0 ||
      ns != CANCEL_MSEC(1500)) {
    fprintf(stderr, "cancel_http_parse_timeout(\"1500\"): %lld ns\n",
            (long long)ns);
    return 1;
  }
  printf("OK\n");
  return 0;
}
