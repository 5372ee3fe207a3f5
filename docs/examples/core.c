/* docs/examples/core.c: the snippets of docs/core.md, as a program (built
 * and run by CTest as docs_core; exits 0 when every step behaved). */
#include <cancel.h>

#include <stdio.h>
#include <string.h>
#include <unistd.h>

static int failures;
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "core.c:%d: %s is false\n", __LINE__, #cond);            \
      failures++;                                                              \
    }                                                                          \
  } while (0)

/* A callback only wakes: it runs on the cancelling thread, short. */
static void note_cancel(void *arg) {
  *(int *)arg = 1;
}

static void sources_and_callbacks(void) {
  cancel_source job; /* caller storage: no allocation for a short name */
  if (cancel_source_init(&job, "job 42") < 0)
    return;
  int seen = 0;
  cancel_reg reg; /* caller storage too: registering never allocates */
  cancel_register(&reg, cancel_source_token(&job), note_cancel, &seen);
  int first = cancel_source_cancel_with(&job, CANCEL_USER + 1, "operator");
  int again = cancel_source_cancel(&job); /* the first cancel wins */
  cancel_reason why;
  char line[128];
  cancel_token_reason(cancel_source_token(&job), &why);
  cancel_reason_format(&why, line, sizeof line);
  printf("%s\n", line); /* user 101 (job 42 operator) */
  EXPECT(first == 1 && again == 0 && seen == 1);
  EXPECT(cancel_unregister(&reg) == 0); /* 0: it ran already */
  cancel_source_destroy(&job);
}

static void linked_with_a_timeout(void) {
  cancel_source *stopping, *request, *call;
  cancel_source_new(&stopping, "host");
  /* A request's scope: cancelled when the process stops or after 2 s. */
  cancel_source_new_timeout(&request, "GET /reports/42",
                            cancel_source_token(stopping), CANCEL_SEC(2));
  /* Deeper down: a call linked to the request, with a budget of its own. */
  const cancel_token *parents[] = {cancel_source_token(request)};
  cancel_source_new_linked(&call, "db query", parents, 1);
  int64_t left = cancel_token_remaining(cancel_source_token(call));
  printf("budget left: %lld ms\n", (long long)(left / CANCEL_MSEC(1)));
  cancel_source_cancel_with(stopping, CANCEL_SHUTDOWN, "SIGTERM");
  cancel_reason why;
  char line[160];
  cancel_token_reason(cancel_source_token(call), &why);
  cancel_reason_format(&why, line, sizeof line);
  printf("%s\n", line); /* shutdown (host SIGTERM) via GET /reports/42 -> db query */
  EXPECT(left > 0 && left <= CANCEL_SEC(2));
  EXPECT(why.kind == CANCEL_SHUTDOWN && strcmp(why.origin, "host") == 0);
  EXPECT(why.via_len == 2 && strcmp(why.via[1].name, "db query") == 0);
  cancel_source_unref(call); /* children first: each keeps its parents */
  cancel_source_unref(request);
  cancel_source_unref(stopping);
}

static void a_shield_for_the_commit(void) {
  cancel_source *request, *commit;
  cancel_source_new(&request, "POST /orders");
  /* From here on the work must finish: 50 ms at most after a cancel. */
  cancel_source_new_shield(&commit, "commit", cancel_source_token(request),
                           CANCEL_MSEC(50));
  cancel_source_cancel_with(request, CANCEL_CLIENT_GONE, "peer closed");
  int during = cancel_token_check(cancel_source_token(commit)); /* 0 */
  int slept = cancel_sleep(cancel_source_token(commit), CANCEL_SEC(10));
  cancel_reason why;
  char line[160];
  cancel_token_reason(cancel_source_token(commit), &why);
  cancel_reason_format(&why, line, sizeof line);
  printf("%s\n", line); /* client gone (...) via commit (grace 50ms expired) */
  EXPECT(during == 0 && slept == -ECANCELED && cancel_shields_open() == 1);
  cancel_source_unref(commit);
  cancel_source_unref(request);
}

/* Cleanup at scope exit (GCC, Clang): the registration goes first, then
 * the source, on every way out of the function. */
static int fetch_auto(const cancel_token *request, int *woken) {
  CANCEL_AUTO_SOURCE cancel_source *call = NULL;
  int rc = cancel_source_new_timeout(&call, "downstream call", request,
                                     CANCEL_MSEC(20));
  if (rc < 0)
    return rc;
  CANCEL_AUTO_REG cancel_reg reg = CANCEL_REG_INIT;
  cancel_register(&reg, cancel_source_token(call), note_cancel, woken);
  return cancel_sleep(cancel_source_token(call), CANCEL_SEC(10)); /* "call" */
}

/* The same in plain C: one exit label, starting values safe to release. */
static int fetch_plain(const cancel_token *request, int *woken) {
  cancel_source *call = NULL;
  cancel_reg reg = CANCEL_REG_INIT;
  int rc = cancel_source_new_timeout(&call, "downstream call", request,
                                     CANCEL_MSEC(20));
  if (rc < 0)
    goto out;
  cancel_register(&reg, cancel_source_token(call), note_cancel, woken);
  rc = cancel_sleep(cancel_source_token(call), CANCEL_SEC(10));
out:
  cancel_unregister(&reg);   /* -EINVAL when never registered: harmless */
  cancel_source_unref(call); /* NULL: a no-op */
  return rc;
}

/* Code of your own that turns the token's deadline into a timeout of its
 * own (poll(2)'s whole milliseconds here) can see it pass a moment before
 * the library's timer fires the token: settle first, so that the
 * -ECANCELED it returns comes with a readable reason, as libcancel's do. */
static int wait_readable(const cancel_token *tok, int fd) {
  int64_t left = cancel_token_remaining(tok);
  struct pollfd p = {.fd = fd, .events = POLLIN};
  int n = poll(&p, 1, left == CANCEL_NEVER ? -1 : (int)(left / CANCEL_MSEC(1)));
  if (n < 0)
    return -errno;
  if (n > 0)
    return 0;
  int rc = cancel_token_settle(tok, CANCEL_MSEC(1)); /* poll rounds down */
  return rc == 0 ? -ETIMEDOUT : rc; /* 0: the timeout was not the token's */
}

static void cleanup_and_settle(void) {
  /* Whether the callback ran before the cleanup unregistered it is the
   * timer thread's race (the sleep's own wake-up may come first): either
   * way it is not running once the function has returned. */
  int woken = 0, fds[2];
  EXPECT(fetch_auto(NULL, &woken) == -ECANCELED);
  EXPECT(fetch_plain(NULL, &woken) == -ECANCELED);
  cancel_source *budget;
  if (pipe(fds) < 0 || cancel_source_new_timeout(&budget, "read budget", NULL,
                                                 CANCEL_MSEC(30)) < 0)
    return;
  cancel_reason why;
  EXPECT(wait_readable(cancel_source_token(budget), fds[0]) == -ECANCELED);
  EXPECT(cancel_token_reason(cancel_source_token(budget), &why) == 1 &&
         why.kind == CANCEL_TIMEOUT);
  cancel_source_unref(budget);
  close(fds[0]);
  close(fds[1]);
}

int main(void) {
  sources_and_callbacks();
  linked_with_a_timeout();
  a_shield_for_the_commit();
  cleanup_and_settle();
  EXPECT(cancel_shields_open() == 0);
  printf("core: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
