/* docs/examples/waits.c: the snippets of docs/waits.md, as a program (built
 * and run by CTest as docs_waits; exits 0 when every wait behaved). */
#define _GNU_SOURCE
#include <cancel.h>
#include <cancel/process.h>

#include <poll.h>
#include <stdio.h>
#include <sys/wait.h>
#include <unistd.h>

static int failures;
#define EXPECT(cond)                                                           \
  do {                                                                         \
    if (!(cond)) {                                                             \
      fprintf(stderr, "waits.c:%d: %s is false\n", __LINE__, #cond);           \
      failures++;                                                              \
    }                                                                          \
  } while (0)

/* Reads one line-sized message from fd: the token, or 1 s, whichever first. */
static ssize_t read_message(const cancel_token *tok, int fd, char *buf,
                            size_t len) {
  ssize_t n = cancel_read(tok, fd, buf, len, cancel_now() + CANCEL_SEC(1));
  if (n == -ECANCELED)
    return n; /* the token fired: stop, whatever the reason */
  if (n == -ETIMEDOUT)
    fprintf(stderr, "no message within 1 s\n"); /* our own deadline */
  return n;
}

/* A queue of jobs: the consumer waits on the condition with the token. */
struct queue {
  pthread_mutex_t mu;
  pthread_cond_t cv;
  int jobs;
};

static int take_job(const cancel_token *tok, struct queue *q) {
  pthread_mutex_lock(&q->mu);
  int rc = cancel_token_check(tok); /* a cancelled caller takes nothing */
  while (q->jobs == 0 && rc == 0)
    rc = cancel_cond_wait(tok, &q->cv, &q->mu, CANCEL_NEVER);
  if (rc == 0)
    q->jobs--;
  pthread_mutex_unlock(&q->mu); /* locked again on every return */
  return rc; /* 0, or -ECANCELED */
}

/* Runs `sleep 30` as a child: the token stops it (TERM, 1 s, KILL). */
static int run_child(const cancel_token *tok) {
  char *argv[] = {"sleep", "30", NULL};
  cancel_child child;
  int status, rc = cancel_child_spawnp(&child, "sleep", argv, NULL);
  if (rc < 0)
    return rc; /* -ENOENT: not installed; nothing left behind */
  rc = cancel_child_wait(tok, &child, CANCEL_SEC(1), CANCEL_NEVER, &status);
  if (rc < 0)
    return rc; /* -ECANCELED: stopped and reaped, no zombie */
  return WIFEXITED(status) && WEXITSTATUS(status) == 0 ? 0 : -EIO;
}

static void *worker(void *arg) {
  /* The thread ends on its own token's cancel: cancel_sleep wakes at once. */
  return (void *)(intptr_t)cancel_sleep(arg, CANCEL_SEC(30));
}

int main(void) {
  cancel_source *req;
  char buf[64];
  int fds[2];
  if (cancel_source_new_timeout(&req, "request", NULL, CANCEL_MSEC(100)) < 0 ||
      pipe(fds) < 0)
    return 1;
  const cancel_token *tok = cancel_source_token(req);

  int64_t t0 = cancel_now();
  EXPECT(read_message(NULL, fds[0], buf, sizeof buf) == -ETIMEDOUT);
  EXPECT(read_message(tok, fds[0], buf, sizeof buf) == -ECANCELED);
  EXPECT(cancel_now() - t0 < CANCEL_SEC(2) + CANCEL_MSEC(900));

  struct queue q = {PTHREAD_MUTEX_INITIALIZER, PTHREAD_COND_INITIALIZER, 1};
  EXPECT(take_job(tok, &q) == -ECANCELED); /* fired: at once, even with a job */
  EXPECT(take_job(NULL, &q) == 0);

  cancel_source *stop;
  cancel_source_new_timeout(&stop, "child budget", NULL, CANCEL_MSEC(50));
  EXPECT(run_child(cancel_source_token(stop)) == -ECANCELED);
  cancel_source_unref(stop);

  /* A thread joined with a token: pthread_join cannot be woken, this can. */
  cancel_source *life;
  cancel_thread t;
  void *ret;
  cancel_source_new(&life, "worker");
  cancel_thread_create(&t, NULL, worker, (void *)cancel_source_token(life));
  int rc = cancel_thread_join(tok, &t, &ret, CANCEL_NEVER); /* -ECANCELED */
  cancel_source_cancel(life); /* now stop it, and join for real */
  EXPECT(rc == -ECANCELED);
  EXPECT(cancel_thread_join(NULL, &t, &ret, cancel_now() + CANCEL_SEC(5)) == 0);
  EXPECT((intptr_t)ret == -ECANCELED);
  cancel_source_unref(life);

  /* For an event loop: a descriptor readable once the token fired. */
  struct pollfd p = {.fd = cancel_token_fd(tok), .events = POLLIN};
  EXPECT(p.fd >= 0 && poll(&p, 1, 1000) == 1 && (p.revents & POLLIN));

  close(fds[0]);
  close(fds[1]);
  cancel_source_unref(req); /* closes the token's descriptor too */
  printf("waits: %s\n", failures ? "FAILED" : "ok");
  return failures ? 1 : 0;
}
