/* The smallest user of an installed libcancel: built by run.sh against
 * the installed headers and library, with pkg-config and with CMake. */
#include <cancel.h>

#include <stdio.h>
#include <string.h>

static void on_cancel(void *arg) {
  int *ran = arg;
  *ran = 1;
}

int main(void) {
  cancel_source *src;
  cancel_reg reg;
  cancel_reason why;
  int ran = 0;

  if (strcmp(cancel_version(), CANCEL_VERSION_STRING) != 0) {
    fprintf(stderr, "header %s, library %s\n", CANCEL_VERSION_STRING,
            cancel_version());
    return 1;
  }
  if (cancel_source_new(&src, "hello") != 0) {
    fprintf(stderr, "cancel_source_new failed\n");
    return 1;
  }
  if (cancel_register(&reg, cancel_source_token(src), on_cancel, &ran) != 0) {
    fprintf(stderr, "cancel_register failed\n");
    return 1;
  }
  if (cancel_source_cancel(src) != 1 || !ran) {
    fprintf(stderr, "cancel did not run the callback\n");
    return 1;
  }
  if (cancel_token_reason(cancel_source_token(src), &why) != 1 ||
      why.kind != CANCEL_REQUESTED) {
    fprintf(stderr, "unexpected reason kind %d\n", why.kind);
    return 1;
  }
  cancel_unregister(&reg);
  cancel_source_unref(src);
  printf("OK\n");
  return 0;
}
