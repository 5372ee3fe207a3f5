/*
 * wait_bench: what the cancellable waits cost (see bench/run.sh).
 *
 * wake_latency_{sleep,cond,poll}_{p50,p99}, in microseconds: one thread is
 * blocked on a token, another cancels it; a sample is the time from just
 * before the cancel call (the waker's cancel_now()) to the woken thread
 * running again (its cancel_now() right after the wait returned).  The
 * waiter is blocked in cancel_sleep, in cancel_cond_wait, or in cancel_poll
 * on a pipe that never becomes readable.  Every sample is a real wake-up
 * from sleep: the waker waits until the waiter says it is about to block,
 * then 200 us, then until /proc says the thread is asleep (state S), and
 * only then takes t0 and cancels.  Nothing is pinned.
 *
 * In the same run and scenario, interleaved sample by sample with the
 * libcancel samples (so that noise hits both alike), the floor: a raw
 * futex, one thread in FUTEX_WAIT, the other storing the word and calling
 * FUTEX_WAKE (impl futex_floor: no wait that sleeps in the kernel can be
 * woken faster).  The waker, after cancelling, yields the CPU until the
 * waiter reports (a waiter woken onto the waker's CPU runs at once).
 *
 * On a VM the numbers are bimodal: an idle vCPU that halted is woken
 * through the hypervisor (tens of microseconds), one that is still
 * polling or busy with another task in a few.  Both impls see the same
 * mix, sample by sample; compare them within one run, not across runs.
 *
 * poll_overhead, in ns per read: cancel_read of 1 byte from a pipe that
 * always has data (a blocking pipe, refilled 4096 bytes at a time outside
 * the timed region) with a live token, next to plain read(2) on the same
 * pipe (impl plain).  Measured with the loop in bench.h.
 *
 * cancel_wake_10000_threads, in milliseconds: 10,000 threads (64 KiB
 * stacks) are asleep in cancel_sleep on one token; a sample is the time
 * from just before the cancel to the last of them having returned
 * -ECANCELED (each counts itself out, the last wakes the main thread,
 * and they exit only after the sample).
 * Next to it, impl futex_floor: the same threads each in FUTEX_WAIT on a
 * word of its own, woken one FUTEX_WAKE each by the main thread (what a
 * wake of every thread costs the kernel, with no library around it).
 * BENCH_WAKE_THREADS=10000,20000,30000 adds cancel_wake_<n>_threads rows
 * for other counts.  A count the system refuses (pthread_create: EAGAIN,
 * ulimit -u, vm.max_map_count) prints n/a.
 *
 * Environment: BENCH_QUICK=1 (10x fewer samples, smaller batches),
 * BENCH_ONLY=wake_latency_cond,poll_overhead (a scenario's p50 or p99 name
 * selects it too).
 */
#define _GNU_SOURCE
#include "bench.h"

#include <cancel.h>

#include <fcntl.h>
#include <limits.h>
#include <linux/futex.h>
#include <poll.h>
#include <pthread.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define SAMPLES 3000     /* per impl and scenario (300 with BENCH_QUICK) */
#define WARMUP 30        /* samples of each kind thrown away first */
#define SETTLE_NS 200000 /* the waker's fixed delay before it checks */
#define ASLEEP_MAX_NS CANCEL_MSEC(100) /* then it gives up on one sample */
#define WAIT_LIMIT CANCEL_SEC(10)      /* any wait longer is a hang */
#define READ_CHUNK 4096

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_ia32_pause();
#elif defined(__aarch64__)
  __asm__ __volatile__("yield");
#endif
}

/* ======================================================================
 * wake_latency
 * ====================================================================== */

enum wait_kind { W_FUTEX, W_SLEEP, W_COND, W_POLL, W_CPP, W_QUIT };

#ifdef BENCH_HAVE_CPP
/* bench/peers/condvar_any.cpp: C++20 condition_variable_any + stop_token. */
struct cpp_stop;
struct cpp_stop *cpp_stop_new(void);
void cpp_stop_free(struct cpp_stop *s);
int cpp_stop_wait(struct cpp_stop *s, void (*before_block)(void *), void *arg);
void cpp_stop_request(struct cpp_stop *s);
#endif

/* One waiter thread, driven sample by sample by the main thread (the
 * waker).  The handshake words are only touched with atomics; the rest is
 * written by one side before a release store of a handshake word and read
 * by the other after the acquire load that saw it. */
struct waiter {
  pthread_t thread;
  int tid;        /* atomic: the waiter's kernel thread id */
  uint32_t go;    /* atomic: sample number the waiter should run */
  uint32_t ready; /* atomic: sample it is about to block for */
  uint32_t done;  /* atomic: sample it finished */
  uint32_t futex; /* the floor's futex word: 0 wait, 1 woken */
  int kind;       /* enum wait_kind of the sample `go` names */
  const cancel_token *tok;
  struct cpp_stop *cpp; /* W_CPP: the C++ stop source and condition */
  int64_t t1;           /* cancel_now() right after the wait returned */
  int rc;               /* what the wait returned */
  pthread_mutex_t mu;
  pthread_cond_t cond;
  int pipe_rd; /* never written to: never readable */
};

/* Waits until *word == want, yielding the CPU while it spins (a thread
 * woken onto this CPU gets it at once), and dies after WAIT_LIMIT. */
static void await_word(const uint32_t *word, uint32_t want, const char *what) {
  int64_t t0 = cancel_now();
  while (__atomic_load_n(word, __ATOMIC_ACQUIRE) != want) {
    sched_yield();
    if (cancel_now() - t0 > WAIT_LIMIT)
      bench_die(what, (int)want);
  }
}

static uint32_t current_seq; /* the sample being run, for mark_ready */

static void mark_ready(void *arg) {
  struct waiter *w = arg;
  __atomic_store_n(&w->ready, current_seq, __ATOMIC_RELEASE);
}

static void *waiter_main(void *arg) {
  struct waiter *w = arg;
  uint32_t seq = 0;
  __atomic_store_n(&w->tid, (int)syscall(SYS_gettid), __ATOMIC_RELEASE);
  for (;;) {
    await_word(&w->go, ++seq, "waiter: no next sample");
    __atomic_store_n(&current_seq, seq, __ATOMIC_RELAXED);
    int rc = 0;
    switch (w->kind) {
    case W_QUIT:
      return NULL;
    case W_FUTEX:
      __atomic_store_n(&w->ready, seq, __ATOMIC_RELEASE);
      while (__atomic_load_n(&w->futex, __ATOMIC_ACQUIRE) == 0)
        syscall(SYS_futex, &w->futex, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
      break;
    case W_SLEEP:
      __atomic_store_n(&w->ready, seq, __ATOMIC_RELEASE);
      rc = cancel_sleep(w->tok, WAIT_LIMIT);
      break;
    case W_COND:
      pthread_mutex_lock(&w->mu);
      __atomic_store_n(&w->ready, seq, __ATOMIC_RELEASE);
      do /* nobody signals the condition: 0 is a spurious wake-up */
        rc = cancel_cond_wait(w->tok, &w->cond, &w->mu,
                              cancel_now() + WAIT_LIMIT);
      while (rc == 0);
      break;
#ifdef BENCH_HAVE_CPP
    case W_CPP:
      /* "ready" is published with the lock held, as for W_COND. */
      rc = cpp_stop_wait(w->cpp, mark_ready, w) ? -ECANCELED : 0;
      break;
#endif
    case W_POLL: {
      struct pollfd pfd = {.fd = w->pipe_rd, .events = POLLIN};
      __atomic_store_n(&w->ready, seq, __ATOMIC_RELEASE);
      rc = cancel_poll(w->tok, &pfd, 1, cancel_now() + WAIT_LIMIT);
      break;
    }
    }
    w->t1 = cancel_now();
    if (w->kind == W_COND)
      pthread_mutex_unlock(&w->mu);
    w->rc = rc;
    __atomic_store_n(&w->done, seq, __ATOMIC_RELEASE);
  }
}

/* True when thread `tid` of this process is asleep in the kernel (state S,
 * which futex, poll and timed waits are).  Without /proc, trusts the delay. */
static bool thread_asleep(int tid) {
  char path[64], buf[512];
  snprintf(path, sizeof path, "/proc/self/task/%d/stat", tid);
  int fd = open(path, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return true;
  ssize_t n = read(fd, buf, sizeof buf - 1);
  close(fd);
  if (n <= 0)
    return true;
  buf[n] = '\0';
  const char *p = strrchr(buf, ')'); /* the name may hold spaces and ')' */
  return p != NULL && p[1] == ' ' && p[2] == 'S';
}

static void spin_until(int64_t t) {
  while (cancel_now() < t)
    cpu_relax();
}

static uint64_t late_samples; /* not asleep yet after SETTLE_NS */

/* Runs one sample of `kind` on w and returns its latency in ns. */
static int64_t one_sample(struct waiter *w, uint32_t seq, int kind) {
  cancel_source src;
  int rc;
  if (kind == W_FUTEX) {
    __atomic_store_n(&w->futex, 0, __ATOMIC_RELAXED);
#ifdef BENCH_HAVE_CPP
  } else if (kind == W_CPP) {
    w->cpp = cpp_stop_new();
#endif
  } else {
    if ((rc = cancel_source_init(&src, "wake_latency")) != 0)
      bench_die("cancel_source_init", rc);
    w->tok = cancel_source_token(&src);
  }
  w->kind = kind;
  __atomic_store_n(&w->go, seq, __ATOMIC_RELEASE);

  await_word(&w->ready, seq, "waiter never got ready");
  int64_t settled = cancel_now() + SETTLE_NS;
  spin_until(settled);
  if (!thread_asleep(w->tid)) {
    late_samples++;
    while (!thread_asleep(w->tid)) {
      if (cancel_now() - settled > ASLEEP_MAX_NS)
        bench_die("waiter never fell asleep, kind", kind);
      spin_until(cancel_now() + CANCEL_USEC(20));
    }
  }

  int64_t t0 = cancel_now();
  if (kind == W_FUTEX) {
    __atomic_store_n(&w->futex, 1, __ATOMIC_RELEASE);
    syscall(SYS_futex, &w->futex, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
#ifdef BENCH_HAVE_CPP
  } else if (kind == W_CPP) {
    cpp_stop_request(w->cpp);
#endif
  } else if ((rc = cancel_source_cancel(&src)) != 1) {
    bench_die("cancel_source_cancel", rc);
  }
  await_word(&w->done, seq, "waiter never woke up, kind");

#ifdef BENCH_HAVE_CPP
  if (kind == W_CPP) {
    if (w->rc != -ECANCELED)
      bench_die("condition_variable_any::wait did not stop", w->rc);
    cpp_stop_free(w->cpp);
    return w->t1 - t0;
  }
#endif
  if (kind != W_FUTEX) {
    if (w->rc != -ECANCELED)
      bench_die("the wait did not return -ECANCELED but", w->rc);
    cancel_source_destroy(&src);
  }
  return w->t1 - t0;
}

static int cmp_i64(const void *a, const void *b) {
  int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
  return (x > y) - (x < y);
}

static void report(const char *scenario, const char *impl, int64_t *s,
                   size_t n) {
  char name[64];
  qsort(s, n, sizeof s[0], cmp_i64);
  snprintf(name, sizeof name, "%s_p50", scenario);
  bench_row(name, impl, (double)s[n / 2] / 1e3, "us");
  snprintf(name, sizeof name, "%s_p99", scenario);
  bench_row(name, impl, (double)s[(n * 99) / 100] / 1e3, "us");
}

/* Alternates libcancel samples of `kind` with futex floor samples. */
static void wake_latency(struct waiter *w, uint32_t *seq, const char *scenario,
                         int kind) {
  char p50[64], p99[64];
  snprintf(p50, sizeof p50, "%s_p50", scenario);
  snprintf(p99, sizeof p99, "%s_p99", scenario);
  if (!bench_wanted(scenario) && !bench_wanted(p50) && !bench_wanted(p99) &&
      !bench_wanted("wake_latency"))
    return;
  const size_t n = bench_quick() ? SAMPLES / 10 : SAMPLES;
  int64_t *lib = calloc(n, sizeof *lib), *base = calloc(n, sizeof *base);
  int64_t *cpp = calloc(n, sizeof *cpp);
  if (lib == NULL || base == NULL || cpp == NULL)
    bench_die("calloc", -ENOMEM);
  /* The C++ peer, where it has the same wait (a condition), takes its
   * turn in the same rotation. */
  bool with_cpp = false;
#ifdef BENCH_HAVE_CPP
  with_cpp = kind == W_COND;
#endif
  for (size_t i = 0; i < WARMUP; i++) {
    one_sample(w, ++*seq, kind);
    one_sample(w, ++*seq, W_FUTEX);
    if (with_cpp)
      one_sample(w, ++*seq, W_CPP);
  }
  late_samples = 0;
  for (size_t i = 0; i < n; i++) {
    lib[i] = one_sample(w, ++*seq, kind);
    base[i] = one_sample(w, ++*seq, W_FUTEX);
    if (with_cpp)
      cpp[i] = one_sample(w, ++*seq, W_CPP);
  }
  if (late_samples > 0)
    fprintf(stderr,
            "wait_bench: %s: %llu of %zu samples were not asleep after "
            "%d us (waited longer)\n",
            scenario, (unsigned long long)late_samples, 2 * n,
            SETTLE_NS / 1000);
  report(scenario, "libcancel", lib, n);
  report(scenario, "futex_floor", base, n);
  if (with_cpp)
    report(scenario, "cpp_stop_token", cpp, n);
  free(cpp);
  free(base);
  free(lib);
}

/* ======================================================================
 * poll_overhead
 * ====================================================================== */

struct pipe_ctx {
  int rd, wr;
  const cancel_token *tok;
  char fill[READ_CHUNK];
};

static void refill(struct pipe_ctx *c, size_t k) {
  for (size_t off = 0; off < k;) {
    ssize_t r = write(c->wr, c->fill + off, k - off);
    if (r <= 0)
      bench_die("write", r < 0 ? -errno : 0);
    off += (size_t)r;
  }
}

static int64_t b_cancel_read(void *ctx, uint64_t n) {
  struct pipe_ctx *c = ctx;
  int64_t timed = 0;
  char b;
  while (n > 0) {
    size_t k = n < READ_CHUNK ? (size_t)n : READ_CHUNK;
    refill(c, k);
    int64_t t0 = bench_now();
    for (size_t i = 0; i < k; i++) {
      ssize_t r = cancel_read(c->tok, c->rd, &b, 1, CANCEL_NEVER);
      if (r != 1)
        bench_die("cancel_read", (int)r);
    }
    timed += bench_now() - t0;
    n -= k;
  }
  BENCH_ESCAPE(&b);
  return timed;
}

static int64_t b_plain_read(void *ctx, uint64_t n) {
  struct pipe_ctx *c = ctx;
  int64_t timed = 0;
  char b;
  while (n > 0) {
    size_t k = n < READ_CHUNK ? (size_t)n : READ_CHUNK;
    refill(c, k);
    int64_t t0 = bench_now();
    for (size_t i = 0; i < k; i++) {
      ssize_t r = read(c->rd, &b, 1);
      if (r != 1)
        bench_die("read", r < 0 ? -errno : 0);
    }
    timed += bench_now() - t0;
    n -= k;
  }
  BENCH_ESCAPE(&b);
  return timed;
}

static void poll_overhead(const cancel_token *tok) {
  if (!bench_wanted("poll_overhead"))
    return;
  static struct pipe_ctx c;
  int fds[2];
  if (pipe2(fds, O_CLOEXEC) != 0) /* blocking, as most users have it */
    bench_die("pipe2", -errno);
  c.rd = fds[0];
  c.wr = fds[1];
  c.tok = tok;
  memset(c.fill, 'x', sizeof c.fill);
  bench_row("poll_overhead", "libcancel", bench_measure(b_cancel_read, &c, 1),
            "ns");
  bench_row("poll_overhead", "plain", bench_measure(b_plain_read, &c, 1), "ns");
  close(c.rd);
  close(c.wr);
}

/* ======================================================================
 * cancel_wake_<n>_threads
 * ====================================================================== */

#define MASS_STACK (64 * 1024)
#define MASS_ROUNDS 3 /* samples per count and impl (the median is kept) */

struct mass {
  const cancel_token *tok; /* NULL: the futex floor */
  uint32_t *words;         /* the floor's words, one per thread */
  int *tids;               /* atomic: each thread's kernel id */
  uint32_t started;        /* atomic: threads that are about to block */
  uint32_t left;           /* atomic futex word: threads not yet returned */
  uint32_t release;        /* atomic futex word: 1 once they may exit */
  uint32_t bad;            /* atomic: waits that did not return -ECANCELED */
};

struct mass_arg {
  struct mass *m;
  uint32_t i;
};

static void *mass_main(void *p) {
  struct mass_arg *a = p;
  struct mass *m = a->m;
  __atomic_store_n(&m->tids[a->i], (int)syscall(SYS_gettid), __ATOMIC_RELAXED);
  __atomic_add_fetch(&m->started, 1, __ATOMIC_RELEASE);
  if (m->tok != NULL) {
    if (cancel_sleep(m->tok, WAIT_LIMIT) != -ECANCELED)
      __atomic_add_fetch(&m->bad, 1, __ATOMIC_RELAXED);
  } else {
    uint32_t *w = &m->words[a->i];
    while (__atomic_load_n(w, __ATOMIC_ACQUIRE) == 0)
      syscall(SYS_futex, w, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
  }
  if (__atomic_sub_fetch(&m->left, 1, __ATOMIC_ACQ_REL) == 0)
    syscall(SYS_futex, &m->left, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
  /* Thread exit (freeing the stack: madvise, TLB shootdowns) is not part
   * of the wake-up: the threads wait until every one has been counted. */
  while (__atomic_load_n(&m->release, __ATOMIC_ACQUIRE) == 0)
    syscall(SYS_futex, &m->release, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0);
  return NULL;
}

/* One sample: n threads blocked, then woken.  Returns the ns from the
 * cancel (or the first wake) to the last thread's return, 0 when the
 * system could not start n threads, and dies on a wrong result. */
static int64_t mass_sample(uint32_t n, bool floor) {
  struct mass m = {0};
  pthread_t *th = calloc(n, sizeof *th);
  struct mass_arg *args = calloc(n, sizeof *args);
  m.tids = calloc(n, sizeof *m.tids);
  m.words = floor ? calloc(n, sizeof *m.words) : NULL;
  if (th == NULL || args == NULL || m.tids == NULL || (floor && !m.words))
    bench_die("calloc", -ENOMEM);
  cancel_source src;
  int rc = cancel_source_init(&src, "bench-mass");
  if (rc != 0)
    bench_die("cancel_source_init", rc);
  m.tok = floor ? NULL : cancel_source_token(&src);
  m.left = n;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, MASS_STACK);
  uint32_t made = 0;
  for (; made < n; made++) {
    args[made].m = &m;
    args[made].i = made;
    if (pthread_create(&th[made], &attr, mass_main, &args[made]) != 0)
      break;
  }
  pthread_attr_destroy(&attr);
  int64_t t = 0;
  if (made == n) {
    await_word(&m.started, n, "mass: threads did not start");
    for (uint32_t i = 0; i < n; i++) {
      int64_t t0 = cancel_now();
      while (!thread_asleep(__atomic_load_n(&m.tids[i], __ATOMIC_RELAXED))) {
        sched_yield();
        if (cancel_now() - t0 > WAIT_LIMIT)
          bench_die("mass: a thread never fell asleep", (int)i);
      }
    }
    int64_t t0 = cancel_now();
    if (floor) {
      for (uint32_t i = 0; i < n; i++) {
        __atomic_store_n(&m.words[i], 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, &m.words[i], FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
      }
    } else if ((rc = cancel_source_cancel(&src)) != 1) {
      bench_die("cancel_source_cancel", rc);
    }
    uint32_t v;
    while ((v = __atomic_load_n(&m.left, __ATOMIC_ACQUIRE)) != 0)
      syscall(SYS_futex, &m.left, FUTEX_WAIT_PRIVATE, v, NULL, NULL, 0);
    t = cancel_now() - t0;
    if (__atomic_load_n(&m.bad, __ATOMIC_RELAXED) != 0)
      bench_die("mass: waits that did not return -ECANCELED",
                (int)m.bad);
  } else {
    /* Release the ones that started, then report the count as refused. */
    if (floor)
      for (uint32_t i = 0; i < made; i++) {
        __atomic_store_n(&m.words[i], 1, __ATOMIC_RELEASE);
        syscall(SYS_futex, &m.words[i], FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
      }
    else
      cancel_source_cancel(&src);
  }
  __atomic_store_n(&m.release, 1, __ATOMIC_RELEASE);
  syscall(SYS_futex, &m.release, FUTEX_WAKE_PRIVATE, INT_MAX, NULL, NULL, 0);
  for (uint32_t i = 0; i < made; i++)
    pthread_join(th[i], NULL);
  cancel_source_destroy(&src);
  free(th);
  free(args);
  free(m.tids);
  free(m.words);
  return t;
}

static void mass_wake_row(uint32_t n) {
  char name[64];
  snprintf(name, sizeof name, "cancel_wake_%u_threads", n);
  if (!bench_wanted(name) && !bench_wanted("cancel_wake"))
    return;
  const int rounds = bench_quick() ? 1 : MASS_ROUNDS;
  int64_t lib[MASS_ROUNDS], flo[MASS_ROUNDS];
  bool refused = false;
  for (int r = 0; r < rounds && !refused; r++) { /* interleaved */
    lib[r] = mass_sample(n, false);
    flo[r] = mass_sample(n, true);
    refused = lib[r] == 0 || flo[r] == 0;
  }
  if (refused) {
    fprintf(stderr, "wait_bench: %s: the system refused %u threads\n", name,
            n);
    bench_row_na(name, "libcancel", "ms");
    bench_row_na(name, "futex_floor", "ms");
    return;
  }
  bench_row(name, "libcancel",
            (double)bench_percentile(lib, (size_t)rounds, 50) / 1e6, "ms");
  bench_row(name, "futex_floor",
            (double)bench_percentile(flo, (size_t)rounds, 50) / 1e6, "ms");
}

static void mass_wake(void) {
  mass_wake_row(10000);
  const char *more = getenv("BENCH_WAKE_THREADS");
  for (const char *p = more; p != NULL && *p != '\0';) {
    char *end;
    unsigned long n = strtoul(p, &end, 10);
    if (end == p)
      break;
    if (n > 0 && n <= 1000000 && n != 10000)
      mass_wake_row((uint32_t)n);
    p = *end == ',' ? end + 1 : end;
  }
}

/* ======================================================================
 * Driver
 * ====================================================================== */

int main(void) {
  static struct waiter w;
  cancel_source *live;
  uint32_t seq = 0;
  int fds[2], rc;

  fprintf(stderr, "wait_bench: libcancel %s%s\n", cancel_version(),
          bench_quick() ? " (BENCH_QUICK)" : "");
  if ((rc = cancel_source_new(&live, "bench-live")) != 0)
    bench_die("cancel_source_new", rc);
  if (pipe2(fds, O_CLOEXEC) != 0)
    bench_die("pipe2", -errno);
  w.pipe_rd = fds[0];
  pthread_mutex_init(&w.mu, NULL);
  pthread_cond_init(&w.cond, NULL);
  if (pthread_create(&w.thread, NULL, waiter_main, &w) != 0)
    bench_die("pthread_create", 0);
  while (__atomic_load_n(&w.tid, __ATOMIC_ACQUIRE) == 0)
    sched_yield();

  wake_latency(&w, &seq, "wake_latency_sleep", W_SLEEP);
  wake_latency(&w, &seq, "wake_latency_cond", W_COND);
  wake_latency(&w, &seq, "wake_latency_poll", W_POLL);

  w.kind = W_QUIT;
  __atomic_store_n(&w.go, ++seq, __ATOMIC_RELEASE);
  pthread_join(w.thread, NULL);
  pthread_cond_destroy(&w.cond);
  pthread_mutex_destroy(&w.mu);
  close(fds[0]);
  close(fds[1]);

  poll_overhead(cancel_source_token(live));
  mass_wake();

  if (cancel_token_is_cancelled(cancel_source_token(live)))
    bench_die("a live token was cancelled", 0);
  cancel_source_unref(live);
  return 0;
}
