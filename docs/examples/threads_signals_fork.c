/* docs/examples/threads_signals_fork.c: the snippets of
 * docs/threads-signals-fork.md, as a program (built and run by CTest as
 * docs_threads_signals_fork; exits 0 when each step behaved). */
#include <cancel.h>
#include <cancel/watch.h>

#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

/* ThreadSanitizer cannot start threads in the child of a multi-threaded
 * fork (the child's timer needs the library's thread): that part is
 * skipped under it. */
#if defined(__SANITIZE_THREAD__)
#define UNDER_TSAN 1
#elif defined(__has_feature)
#if __has_feature(thread_sanitizer)
#define UNDER_TSAN 1
#endif
#endif

static int failures;
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "threads_signals_fork.c:%d: %s is false\n", __LINE__,   \
              #cond);                                                          \
      failures++;                                                              \
    }                                                                          \
  } while (0)

/* A thread that keeps a token past the call that lent it takes a reference
 * on the source, and drops it when done. */
static void *poller(void *arg) {
  cancel_source *src = arg; /* the reference main took for us */
  int rc = cancel_sleep(cancel_source_token(src), CANCEL_SEC(30));
  cancel_source_unref(src);
  return (void *)(intptr_t)rc;
}

static int child_part(cancel_source *job) {
  /* The child's copy of job: independent, and its timer is not armed. */
  if (cancel_token_is_cancelled(cancel_source_token(job)))
    return 1;
  cancel_source_cancel_at(job, cancel_token_deadline(cancel_source_token(job)));
  int rc = cancel_sleep(cancel_source_token(job), CANCEL_SEC(30));
  return rc == -ECANCELED ? 0 : 2; /* enforced again, in the child */
}

int main(void) {
  cancel_signals_block(); /* first: before ANY thread is created */
  cancel_source *stopping;
  cancel_source_new(&stopping, "host");
  cancel_signals_watch(stopping); /* SIGTERM -> "shutdown (host SIGTERM)" */

  cancel_thread t;
  void *ret;
  cancel_thread_create(&t, NULL, poller, cancel_source_ref(stopping));
  kill(getpid(), SIGTERM); /* what systemd, docker stop or Ctrl-C send */
  EXPECT(cancel_thread_join(NULL, &t, &ret, cancel_now() + CANCEL_SEC(10)) == 0);
  EXPECT((intptr_t)ret == -ECANCELED);
  cancel_reason why;
  cancel_token_reason(cancel_source_token(stopping), &why);
  EXPECT(why.kind == CANCEL_SHUTDOWN && strcmp(why.detail, "SIGTERM") == 0);
  cancel_signals_unwatch();
  cancel_source_unref(stopping);

#ifndef UNDER_TSAN
  cancel_source *job;
  cancel_source_new_timeout(&job, "job", NULL, CANCEL_MSEC(500));
  pid_t pid = fork();
  if (pid == 0)
    _exit(child_part(job));
  cancel_source_cancel(job); /* the parent's copy only */
  int status = 0;
  EXPECT(pid > 0 && waitpid(pid, &status, 0) == pid);
  EXPECT(WIFEXITED(status) && WEXITSTATUS(status) == 0);
  cancel_source_unref(job);
#else
  (void)child_part;
  printf("fork: skipped under ThreadSanitizer\n");
#endif
  printf("threads, signals, fork: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
