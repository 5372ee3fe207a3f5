/* The smallest user of an installed libcancel-pq: built by run.sh against
 * the installed headers and libraries, with pkg-config and with
 * find_package(cancel).  It calls libpq itself (PQlibVersion, PQfinish),
 * as every user of the adapter does; a connection attempt given a token
 * that already fired is abandoned at once with -ECANCELED (the address is
 * the discard port of loopback: no server needs to run). */
#include <cancel/pq.h>

#include <stdio.h>

int main(void) {
  cancel_source *src;
  PGconn *conn = NULL;
  int rc;

  if (PQlibVersion() < 90000) {
    fprintf(stderr, "PQlibVersion() is %d\n", PQlibVersion());
    return 1;
  }
  if (cancel_source_new(&src, "hello") != 0) {
    fprintf(stderr, "cancel_source_new failed\n");
    return 1;
  }
  cancel_source_cancel(src);
  rc = cancel_pq_connect(cancel_source_token(src),
                         "host=127.0.0.1 port=9 connect_timeout=5", &conn);
  PQfinish(conn);
  cancel_source_unref(src);
  if (rc != -ECANCELED) {
    fprintf(stderr, "cancelled connect returned %d, not -ECANCELED\n", rc);
    return 1;
  }
  printf("OK\n");
  return 0;
}
