/*
 * The core practice in one program: accept a token at the boundary, link it
 * with a timeout, pass it all the way down, and classify the reason at the
 * boundary (a client that left is not an error; a timeout names its source).
 */
#include <cancel.h>

#include <stdio.h>

/* Deep in the call chain: CPU work that checks the token it was given. */
static int aggregate(const cancel_token *tok, long rows, long *sum) {
  for (long i = 0; i < rows; i++) {
    if ((i & 1023) == 0 && cancel_token_is_cancelled(tok))
      return -ECANCELED;
    *sum += i % 7;
  }
  return 0;
}

/* The boundary: the request's token, linked with the route's budget.
 * CANCEL_AUTO_SOURCE (cancel.h) drops the source on every way out of the
 * function, as Go's `defer cancel()` would; without GCC or Clang, unref
 * it before each return. */
static int serve(const cancel_token *request, long rows) {
  CANCEL_AUTO_SOURCE cancel_source *scope = NULL;
  int rc = cancel_source_new_timeout(&scope, "GET /reports/42", request,
                                     CANCEL_MSEC(200));
  if (rc < 0)
    return rc;
  long sum = 0;
  rc = aggregate(cancel_source_token(scope), rows, &sum);
  cancel_reason why;
  char line[160] = "";
  if (cancel_token_reason(cancel_source_token(scope), &why) == 1)
    cancel_reason_format(&why, line, sizeof line);
  if (rc == 0)
    printf("200 sum=%ld\n", sum);
  else if (rc == -ECANCELED && why.kind == CANCEL_CLIENT_GONE)
    printf("499 info: %s\n", line); /* not an error: nobody is listening */
  else if (rc == -ECANCELED && why.kind == CANCEL_TIMEOUT)
    printf("504 warning: %s\n", line);
  else
    printf("500 error: %s\n", cancel_strerror(rc));
  return rc;
}

int main(void) {
  cancel_source *client;
  if (cancel_source_new(&client, "client 10.0.0.7:5123") < 0)
    return 1;
  int fast = serve(cancel_source_token(client), 1000);
  int slow = serve(cancel_source_token(client), 1L << 40); /* budget ends */
  cancel_source_cancel_with(client, CANCEL_CLIENT_GONE, "peer closed");
  int gone = serve(cancel_source_token(client), 1L << 40);
  cancel_source_unref(client);
  /* Exit 0 only when each request ended the way it should. */
  return (fast == 0 && slow == -ECANCELED && gone == -ECANCELED) ? 0 : 1;
}
