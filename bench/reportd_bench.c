/*
 * reportd_bench: the reference service, examples/reportd, measured from
 * the outside as its clients see it.  The program starts reportd itself
 * (a fresh SQLite database in a temporary directory, --port 0) and kills
 * and reaps every process it started when it ends, also on failure.
 *
 *   disconnect_to_stop_p50 / _p99 (us, impl libcancel): a client sends
 *     GET /scan/<n> (a recursive SQLite query that would run for minutes),
 *     waits until reportd says the request is in flight (GET
 *     /admin/in-flight on another connection) and 2-10 ms more, reads
 *     CLOCK_MONOTONIC and closes its socket.  A sample runs from that
 *     close to the handler's return: handler_end_mono_us of the request's
 *     access line on reportd's standard error (the same clock; n is
 *     unique per request, so the line is found by its path).  100 samples
 *     (20 with BENCH_QUICK).
 *   wasted_cpu_after_abort (ms of CPU, impl libcancel and ignores_token):
 *     the server's CPU time spent after its client left.  The request is
 *     a scan sized to take ~1 s of CPU; the client closes its socket
 *     100 ms after the request is in flight; the sample is the CPU time
 *     of the whole reportd process, every thread, from the close until
 *     the request's access line appears (the handler has returned), minus
 *     what the idle process uses in as much time.  reportd as is
 *     (libcancel), then a second process with --ignore-tokens (the same
 *     handler, no token passed anywhere); the median of 10 samples each
 *     (3 with BENCH_QUICK).  CPU time is the sum of one task-clock perf
 *     event per thread, read exactly; where perf_event_paranoid forbids
 *     them, the process's CPU clock (clock_getcpuclockid), which is only
 *     as fresh as the last scheduler tick of a thread running on another
 *     CPU: up to one tick (4 ms at HZ=250) of the query is then counted
 *     as wasted.
 *   throughput_cheap_route (req/s, impl libcancel and plain): GET /health
 *     on reportd as is and on reportd --no-cancellation (the HTTP server
 *     without its per-request sources and hang-up watch), both running,
 *     loaded in alternating turns of 20 ms by the bench's own closed-loop
 *     client (2 threads x 16 keep-alive connections per server, as wrk
 *     -t2 -c32), 1000 turns (200 with BENCH_QUICK); see throughput() for
 *     why turns and how the rows are estimated.
 *   throughput_watchdog (req/s, impl libcancel and plain): the same, on
 *     reportd as is (a work scope around every handler and every wait,
 *     the watchdog scanning every 25 ms) and on reportd --no-diagnostics
 *     (scopes that watch no token, no watchdog).
 *   throughput_watchdog_thread_cpu (%, impl libcancel): over those turns,
 *     the CPU time of reportd's watchdog thread ("cancel-watchdog") as a
 *     share of the whole process's (task clocks; n/a without them).
 *
 * The abandoned request is GET /scan/{n}, not GET /reports/{id}: /scan
 * is an SQLite query, CPU in reportd's own process, stopped by the SQLite
 * adapter, whose size the bench can choose.
 *
 * BENCH_VERBOSE=1 prints every sample with its access line on standard
 * error.
 *
 * reportd is the executable given as the first argument, else
 * $CANCEL_BENCH_REPORTD, else the one of this build (CANCEL_BENCH_REPORTD,
 * defined by bench/CMakeLists.txt).
 */
#define _GNU_SOURCE
#include "bench.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <ftw.h>
#include <linux/perf_event.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

#ifndef CANCEL_BENCH_REPORTD
#define CANCEL_BENCH_REPORTD ""
#endif

#define MAX_SERVERS 4
#define MAX_THREADS 256

/* One reportd process.  Its standard error goes to a file in the
 * temporary directory (a pipe would make the server wait for this
 * program under load); lines are read back from that file. */
struct server {
  const char *impl;
  pid_t pid;
  int out; /* reportd's standard output (the "listening" line) */
  int log; /* its log file, read side */
  uint16_t port;
  clockid_t cpu; /* the process's CPU clock (the fallback) */
  /* One task-clock perf event per thread, when the kernel lets us
   * (perf_event_paranoid): read exactly, where the process clock is only
   * as fresh as the last scheduler tick of a thread running elsewhere. */
  int ev[MAX_THREADS];
  pid_t tid[MAX_THREADS];
  size_t nev;
  bool perf;
  char logpath[320];
  char buf[16384]; /* log bytes read but not consumed yet */
  size_t len;
};

static char dir[256];
static const char *reportd;
/* The processes to kill and the files to remove on any exit; read by
 * the signal handler. */
#define MAX_CHILDREN 8
#define MAX_FILES 24
static volatile pid_t children[MAX_CHILDREN];
static char files[MAX_FILES][320];

static void cleanup(void);

__attribute__((noreturn, format(printf, 1, 2))) static void die(const char *fmt,
                                                                ...) {
  va_list ap;
  va_start(ap, fmt);
  fputs("reportd_bench: ", stderr);
  vfprintf(stderr, fmt, ap);
  fputc('\n', stderr);
  va_end(ap);
  exit(1); /* cleanup() runs from atexit */
}

/* BENCH_VERBOSE=1: every sample on standard error, with its log line. */
static bool verbose(void) {
  const char *v = getenv("BENCH_VERBOSE");
  return v != NULL && *v != '\0' && strcmp(v, "0") != 0;
}

static void sleep_ns(int64_t ns) {
  struct timespec ts = {.tv_sec = (time_t)(ns / 1000000000),
                        .tv_nsec = (long)(ns % 1000000000)};
  while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
    ;
}

/* ---- Processes ---------------------------------------------------------- */

/* SIGTERM or SIGINT (run.sh's timeout, ^C): kill what we started, at
 * once, and remove the files we made (unlink and rmdir are
 * async-signal-safe, nftw is not). */
static void on_signal(int sig) {
  for (int i = 0; i < MAX_CHILDREN; i++)
    if (children[i] > 0)
      kill(children[i], SIGKILL);
  for (int i = 0; i < MAX_FILES; i++)
    if (files[i][0] != '\0')
      unlink(files[i]);
  if (dir[0] != '\0')
    rmdir(dir);
  _exit(128 + sig);
}

/* Notes the files a server makes: its log and its database's. */
static void note_files(const char *impl) {
  static const char *const ext[] = {".log", ".db", ".db-wal", ".db-shm",
                                    ".db-journal"};
  for (size_t e = 0; e < sizeof ext / sizeof ext[0]; e++)
    for (int i = 0; i < MAX_FILES; i++)
      if (files[i][0] == '\0') {
        snprintf(files[i], sizeof files[i], "%s/%s%s", dir, impl, ext[e]);
        break;
      }
}

static void track(pid_t pid) {
  for (int i = 0; i < MAX_CHILDREN; i++)
    if (children[i] == 0) {
      children[i] = pid;
      return;
    }
}

static void untrack(pid_t pid) {
  for (int i = 0; i < MAX_CHILDREN; i++)
    if (children[i] == pid)
      children[i] = 0;
}

/* Waits up to timeout_ns for pid to exit; returns its status, -1 if it
 * still runs. */
static int reap(pid_t pid, int64_t timeout_ns) {
  int64_t end = bench_now() + timeout_ns;
  for (;;) {
    int st;
    pid_t r = waitpid(pid, &st, WNOHANG);
    if (r == pid || (r < 0 && errno == ECHILD))
      return r == pid ? st : 0;
    if (bench_now() > end)
      return -1;
    sleep_ns(2000000);
  }
}

/* Stops a server: SIGTERM, then SIGKILL when it has not exited in 10 s
 * (or at once when `force`). */
static void server_stop(struct server *s, bool force) {
  if (s->pid <= 0)
    return;
  int st = -1;
  if (!force) {
    kill(s->pid, SIGTERM);
    st = reap(s->pid, 10000000000);
    if (st == -1)
      fprintf(stderr,
              "reportd_bench: %s: reportd did not exit 10 s after "
              "SIGTERM, killed\n",
              s->impl);
    else if (!WIFEXITED(st) || WEXITSTATUS(st) != 0)
      fprintf(stderr,
              "reportd_bench: %s: reportd exited with status %d "
              "after SIGTERM (log: %s)\n",
              s->impl, WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st),
              s->logpath);
  }
  if (st == -1) {
    kill(s->pid, SIGKILL);
    (void)reap(s->pid, 10000000000);
  }
  untrack(s->pid);
  s->pid = 0;
  if (s->out >= 0)
    close(s->out);
  if (s->log >= 0)
    close(s->log);
  s->out = s->log = -1;
  for (size_t i = 0; i < s->nev; i++)
    close(s->ev[i]);
  s->nev = 0;
}

/* Prints the end of a server's log, for a failure's message. */
static void show_log(const struct server *s) {
  char tail[2048];
  int fd = open(s->logpath, O_RDONLY | O_CLOEXEC);
  if (fd < 0)
    return;
  off_t size = lseek(fd, 0, SEEK_END);
  off_t from =
      size > (off_t)sizeof tail - 1 ? size - (off_t)sizeof tail + 1 : 0;
  ssize_t n = pread(fd, tail, sizeof tail - 1, from);
  close(fd);
  if (n > 0) {
    tail[n] = '\0';
    fprintf(stderr, "reportd_bench: the end of %s:\n%s", s->logpath, tail);
  }
}

/* Opens a task-clock event on every thread of the server that has none
 * yet (threads started since the last call).  Returns false, with the
 * events closed, when the kernel refuses them. */
static bool cpu_sync(struct server *s) {
  char path[64];
  snprintf(path, sizeof path, "/proc/%d/task", (int)s->pid);
  DIR *d = opendir(path);
  if (d == NULL)
    die("%s: %s: %s", s->impl, path, strerror(errno));
  struct dirent *e;
  bool ok = true;
  while (ok && (e = readdir(d)) != NULL) {
    pid_t tid = (pid_t)strtol(e->d_name, NULL, 10);
    bool known = tid <= 0;
    for (size_t i = 0; i < s->nev && !known; i++)
      known = s->tid[i] == tid;
    if (known)
      continue;
    struct perf_event_attr a = {.type = PERF_TYPE_SOFTWARE,
                                .size = sizeof a,
                                .config = PERF_COUNT_SW_TASK_CLOCK};
    long fd = s->nev < MAX_THREADS ? syscall(SYS_perf_event_open, &a, tid, -1,
                                             -1, PERF_FLAG_FD_CLOEXEC)
                                   : -1;
    if (fd < 0) {
      ok = errno == ESRCH; /* a thread that just ended */
      continue;
    }
    s->ev[s->nev] = (int)fd;
    s->tid[s->nev++] = tid;
  }
  closedir(d);
  if (!ok) {
    for (size_t i = 0; i < s->nev; i++)
      close(s->ev[i]);
    s->nev = 0;
  }
  return ok;
}

/* The CPU time of the whole server process (every thread), in ns: the sum
 * of the threads' task-clock events, else the process's CPU clock. */
static int64_t server_cpu(const struct server *s) {
  if (s->perf) {
    int64_t sum = 0;
    for (size_t i = 0; i < s->nev; i++) {
      uint64_t v;
      if (read(s->ev[i], &v, sizeof v) != (ssize_t)sizeof v)
        die("%s: reading a task-clock event: %s", s->impl, strerror(errno));
      sum += (int64_t)v;
    }
    return sum;
  }
  struct timespec ts;
  if (clock_gettime(s->cpu, &ts) != 0)
    die("%s: reading reportd's CPU clock: %s", s->impl, strerror(errno));
  return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

/* Before a measurement: every thread counted. */
static void server_cpu_sync(struct server *s) {
  if (s->perf && !cpu_sync(s))
    die("%s: perf_event_open failed on a new thread", s->impl);
}

/* The kernel's perf_event_paranoid, for a message. */
static const char *paranoid(void) {
  static char v[16] = "?";
  FILE *f = fopen("/proc/sys/kernel/perf_event_paranoid", "r");
  if (f != NULL) {
    if (fgets(v, sizeof v, f) != NULL)
      v[strcspn(v, "\n")] = '\0';
    fclose(f);
  }
  return v;
}

/* Starts reportd with `extra` (NULL-terminated) after the common options
 * and waits for its "listening port=N" line. */
static void server_start(struct server *s, const char *impl,
                         const char *const *extra) {
  char db[320];
  *s = (struct server){.impl = impl, .out = -1, .log = -1};
  note_files(impl);
  snprintf(db, sizeof db, "%s/%s.db", dir, impl);
  snprintf(s->logpath, sizeof s->logpath, "%s/%s.log", dir, impl);
  /* The common options: a small database (only /scan and /health are
   * used), routes that never time out on their own, the jobs worker
   * asleep (its polls would be noise in the CPU samples). */
  const char *argv[32] = {reportd,   "--port",          "0",      "--db",
                          db,        "--rows",          "10",     "--poll",
                          "3600000", "--route-timeout", "3600000"};
  size_t argc = 11;
  for (size_t i = 0; extra[i] != NULL && argc < 31; i++)
    argv[argc++] = extra[i];
  argv[argc] = NULL;

  int p[2];
  if (pipe2(p, O_CLOEXEC) != 0)
    die("pipe: %s", strerror(errno));
  int logw = open(s->logpath, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0600);
  s->log = open(s->logpath, O_RDONLY | O_CLOEXEC);
  int devnull = open("/dev/null", O_RDONLY | O_CLOEXEC);
  if (logw < 0 || s->log < 0 || devnull < 0)
    die("%s: %s", s->logpath, strerror(errno));
  pid_t parent = getpid();
  pid_t pid = fork();
  if (pid < 0)
    die("fork: %s", strerror(errno));
  if (pid == 0) {
    /* The server dies with this program, however it ends. */
    prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (getppid() != parent)
      _exit(127);
    if (dup2(devnull, 0) < 0 || dup2(p[1], 1) < 0 || dup2(logw, 2) < 0)
      _exit(127);
    execv(reportd, (char *const *)argv);
    dprintf(2, "reportd_bench: cannot run %s: %s\n", reportd, strerror(errno));
    _exit(127);
  }
  track(pid);
  s->pid = pid;
  s->out = p[0];
  close(p[1]);
  close(logw);
  close(devnull);

  /* The "listening" line, within 30 s. */
  char line[256];
  size_t n = 0;
  int64_t end = bench_now() + 30000000000;
  for (;;) {
    char *nl = memchr(line, '\n', n);
    if (nl != NULL) {
      *nl = '\0';
      unsigned port;
      if (sscanf(line, "listening port=%u", &port) == 1 && port > 0 &&
          port < 65536) {
        s->port = (uint16_t)port;
        break;
      }
      show_log(s);
      die("%s: unexpected output from reportd: %s", impl, line);
    }
    int64_t left = end - bench_now();
    struct pollfd pfd = {.fd = s->out, .events = POLLIN};
    if (left <= 0 || poll(&pfd, 1, (int)(left / 1000000) + 1) == 0) {
      show_log(s);
      die("%s: reportd did not listen within 30 s", impl);
    }
    ssize_t r = read(s->out, line + n, sizeof line - 1 - n);
    if (r <= 0 || n + (size_t)r >= sizeof line - 1) {
      show_log(s);
      die("%s: reportd exited before listening", impl);
    }
    n += (size_t)r;
  }
  int rc = clock_getcpuclockid(pid, &s->cpu);
  if (rc != 0)
    die("clock_getcpuclockid: %s", strerror(rc));
  s->perf = cpu_sync(s);
  if (!s->perf)
    fprintf(stderr,
            "reportd_bench: warning: no perf events (perf_event_paranoid "
            "%s): CPU time from the process clock, which can miss up to "
            "one scheduler tick of a running thread\n",
            paranoid());
}

/* ---- HTTP, the client side ---------------------------------------------- */

/* A connection to the server with `GET path` sent on it. */
static int request_open(const struct server *s, const char *path) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    die("socket: %s", strerror(errno));
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(s->port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  struct timeval tv = {.tv_sec = 10};
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
    die("%s: connect to port %u: %s", s->impl, s->port, strerror(errno));
  char req[256];
  int n = snprintf(req, sizeof req,
                   "GET %s HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                   "Connection: close\r\n\r\n",
                   path);
  if (send(fd, req, (size_t)n, MSG_NOSIGNAL) != n)
    die("%s: send: %s", s->impl, strerror(errno));
  return fd;
}

/* GET path to the end; returns the status and copies the body. */
static int http_get(const struct server *s, const char *path, char *body,
                    size_t len) {
  int fd = request_open(s, path);
  char buf[4096];
  size_t n = 0;
  for (;;) {
    ssize_t r = recv(fd, buf + n, sizeof buf - 1 - n, 0);
    if (r < 0 && errno == EINTR)
      continue;
    if (r < 0)
      die("%s: GET %s: %s", s->impl, path, strerror(errno));
    if (r == 0 || n + (size_t)r >= sizeof buf - 1) {
      n += (size_t)r;
      break;
    }
    n += (size_t)r;
  }
  close(fd);
  buf[n] = '\0';
  int status = 0;
  if (sscanf(buf, "HTTP/1.%*d %d", &status) != 1)
    die("%s: GET %s: no HTTP answer", s->impl, path);
  const char *b = strstr(buf, "\r\n\r\n");
  snprintf(body, len, "%s", b != NULL ? b + 4 : "");
  return status;
}

/* GET /admin/in-flight: the requests in flight, that one excluded. */
static long in_flight(const struct server *s) {
  char body[64];
  if (http_get(s, "/admin/in-flight", body, sizeof body) != 200)
    die("%s: GET /admin/in-flight failed", s->impl);
  return strtol(body, NULL, 10);
}

/* Polls /admin/in-flight until it says `want` (with `at_least`: want or
 * more), for up to 10 s. */
static void wait_in_flight(const struct server *s, long want, bool at_least) {
  int64_t end = bench_now() + 10000000000;
  for (;;) {
    long n = in_flight(s);
    if (n == want || (at_least && n > want))
      return;
    if (bench_now() > end)
      die("%s: %ld requests in flight after 10 s, waiting for %ld", s->impl, n,
          want);
    sleep_ns(200000);
  }
}

/* ---- The access log ----------------------------------------------------- */

/* Waits up to timeout_ns for the access line (msg=request) that contains
 * `needle`, reading the server's log as it grows; copies it to `line`.
 * Lines before it are dropped. */
static void log_wait(struct server *s, const char *needle, int64_t timeout_ns,
                     char *line, size_t len) {
  int64_t end = bench_now() + timeout_ns;
  for (;;) {
    char *p = s->buf, *nl;
    while ((nl = memchr(p, '\n', s->len - (size_t)(p - s->buf))) != NULL) {
      *nl = '\0';
      if (strstr(p, "msg=request") != NULL && strstr(p, needle) != NULL) {
        size_t l = strlen(p) < len - 1 ? strlen(p) : len - 1;
        memcpy(line, p, l);
        line[l] = '\0';
        p = nl + 1;
        s->len -= (size_t)(p - s->buf);
        memmove(s->buf, p, s->len);
        return;
      }
      p = nl + 1;
    }
    s->len -= (size_t)(p - s->buf);
    memmove(s->buf, p, s->len);
    if (s->len == sizeof s->buf)
      s->len = 0; /* a line longer than the buffer: not ours */
    ssize_t r = read(s->log, s->buf + s->len, sizeof s->buf - s->len);
    if (r < 0)
      die("%s: reading %s: %s", s->impl, s->logpath, strerror(errno));
    if (r > 0) {
      s->len += (size_t)r;
      continue;
    }
    if (bench_now() > end) {
      show_log(s);
      die("%s: no access line with '%s' within %.0f s", s->impl, needle,
          (double)timeout_ns / 1e9);
    }
    sleep_ns(100000);
  }
}

/* Skips what the log holds so far (the lines of earlier requests). */
static void log_skip(struct server *s) {
  s->len = 0;
  if (lseek(s->log, 0, SEEK_END) < 0)
    die("%s: %s", s->logpath, strerror(errno));
}

/* ---- disconnect_to_stop ------------------------------------------------- */

static void disconnect_to_stop(struct server *s) {
  size_t n = bench_quick() ? 20 : 100;
  int64_t *lat = calloc(n, sizeof *lat);
  if (lat == NULL)
    die("out of memory");
  log_skip(s);
  for (size_t i = 0; i < n; i++) {
    /* n = 10^9 + i: minutes of query, and a path no other request has. */
    char path[64], needle[80], line[2048];
    snprintf(path, sizeof path, "/scan/%zu", (size_t)1000000000 + i);
    snprintf(needle, sizeof needle, " path=%s ", path);
    wait_in_flight(s, 0, false);
    int fd = request_open(s, path);
    wait_in_flight(s, 1, true);
    /* In the query by now (the handler goes straight to it); the extra
     * 2-10 ms spread the close over the query's steps. */
    sleep_ns(2000000 + (int64_t)(i % 9) * 1000000);
    int64_t closed = bench_now();
    close(fd);
    log_wait(s, needle, 10000000000, line, sizeof line);
    const char *end = strstr(line, " handler_end_mono_us=");
    if (end == NULL || strstr(line, " status=499 ") == NULL)
      die("%s: the request was not cancelled by its client's close: %s",
          s->impl, line);
    int64_t stop = strtoll(end + 21, NULL, 10) * 1000;
    if (stop < closed - 1000)
      die("%s: the handler returned before the client closed: %s", s->impl,
          line);
    /* handler_end_mono_us is whole microseconds: the sample can be up to
     * 1 us before the close. */
    lat[i] = stop > closed ? stop - closed : 0;
    if (verbose())
      fprintf(stderr, "reportd_bench: %s: %.1f us: %s\n", s->impl,
              (double)lat[i] / 1e3, line);
  }
  bench_latency_rows("disconnect_to_stop", "libcancel", lat, n);
  free(lat);
}

/* ---- wasted_cpu_after_abort --------------------------------------------- */

/* The server's CPU use when idle, in ns of CPU per ns of wall time,
 * measured over 300 ms with nothing in flight. */
static double idle_rate(struct server *s) {
  wait_in_flight(s, 0, false);
  server_cpu_sync(s);
  sleep_ns(20000000);
  int64_t c0 = server_cpu(s), t0 = bench_now();
  sleep_ns(300000000);
  int64_t c1 = server_cpu(s), t1 = bench_now();
  return (double)(c1 - c0) / (double)(t1 - t0);
}

/* The scan size that takes ~1 s of CPU: two full scans of 500000 rows
 * timed on the server's CPU clock, the cheaper one kept. */
static long scan_size(struct server *s) {
  const long probe = 500000;
  char path[64], body[128];
  double rate = idle_rate(s);
  int64_t cpu = INT64_MAX;
  (void)http_get(s, "/scan/1000", body, sizeof body); /* warm-up */
  for (int i = 0; i < 2; i++) {
    snprintf(path, sizeof path, "/scan/%ld", probe + i);
    int64_t c0 = server_cpu(s), t0 = bench_now();
    if (http_get(s, path, body, sizeof body) != 200)
      die("%s: GET %s failed: %s", s->impl, path, body);
    int64_t c =
        server_cpu(s) - c0 - (int64_t)(rate * (double)(bench_now() - t0));
    if (c < cpu)
      cpu = c;
  }
  if (cpu < 1000000)
    cpu = 1000000;
  double rows = (double)probe * 1e9 / (double)cpu;
  if (rows > 1e9)
    rows = 1e9;
  return (long)rows;
}

/* One impl's samples: requests of ~1 s of CPU, abandoned 100 ms in. */
static void wasted_cpu(struct server *s, long rows) {
  size_t n = bench_quick() ? 3 : 10;
  int64_t *w = calloc(n, sizeof *w);
  if (w == NULL)
    die("out of memory");
  double rate = idle_rate(s);
  log_skip(s);
  for (size_t i = 0; i < n; i++) {
    char path[64], needle[80], line[2048];
    /* + i: a path of its own, for the access line. */
    snprintf(path, sizeof path, "/scan/%ld", rows + (long)i);
    snprintf(needle, sizeof needle, " path=%s ", path);
    wait_in_flight(s, 0, false);
    server_cpu_sync(s);
    int fd = request_open(s, path);
    wait_in_flight(s, 1, true);
    sleep_ns(100000000);
    int64_t c0 = server_cpu(s), t0 = bench_now();
    close(fd);
    log_wait(s, needle, 120000000000, line, sizeof line);
    int64_t c1 = server_cpu(s), t1 = bench_now();
    int64_t v = c1 - c0 - (int64_t)(rate * (double)(t1 - t0));
    w[i] = v > 0 ? v : 0;
    if (verbose())
      fprintf(stderr,
              "reportd_bench: %s: cpu %.3f ms in %.3f ms (idle %.4f): %s\n",
              s->impl, (double)(c1 - c0) / 1e6, (double)(t1 - t0) / 1e6, rate,
              line);
  }
  /* bench_median_row prints microseconds: the row is in ms. */
  bench_row("wasted_cpu_after_abort", s->impl,
            (double)bench_percentile(w, n, 50) / 1e6, "ms");
  free(w);
}

/* ---- throughput_cheap_route, throughput_watchdog ------------------------ */

/* The two servers of a throughput row are loaded in turns of 20 ms, in
 * the order ABBA ABBA ..., by LOADERS threads with LOAD_CONNS keep-alive
 * connections each to each server: every connection has one GET /health
 * outstanding at a time (closed loop, as wrk).  Why turns: this machine's
 * speed drifts by 10-20 % within seconds (a shared VM), so whole runs of
 * wrk, one server after the other, measured the drift, not the servers;
 * in turns of 20 ms both servers run under the same drift.  The requests
 * still in flight when a turn ends are drained, uncounted, before the
 * other server's turn starts.
 *
 * Estimate: each ABBA block of four turns gives the pair of rates (A's
 * responses over A's two turns, B's over B's); the blocks are sorted by
 * the ratio of the pair and the 20 % at each end dropped (a block that a
 * stall of the VM hit is an outlier either way); a server's req/s is its
 * responses in the blocks kept over the time of its turns in them.  The
 * same blocks are kept for both servers, so the pair stays paired.  On
 * this machine two identical servers measured this way differed by at
 * most 2 % over 1000 turns. */
#define LOADERS 2
#define LOAD_CONNS 16
#define TURN_NS 20000000
#define MAX_TURNS 1000

struct lconn {
  int fd;
  size_t have;
  char buf[2048];
};

struct loader {
  struct server *s[2];
  int turns;
  uint32_t done[MAX_TURNS]; /* responses in turn i */
  int64_t span[MAX_TURNS];  /* length of turn i, ns */
  pthread_t thread;
  struct lconn c[2][LOAD_CONNS];
};

static const char health_req[] =
    "GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

/* The server turn i belongs to: 0 1 1 0, 0 1 1 0, ... */
static int turn_owner(int i) {
  return ((i >> 1) ^ i) & 1;
}

static int lconn_open(const struct server *s) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    die("socket: %s", strerror(errno));
  struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(s->port)};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  int one = 1;
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (struct sockaddr *)&a, sizeof a) != 0)
    die("%s: connect to port %u: %s", s->impl, s->port, strerror(errno));
  return fd;
}

static void lconn_send(struct lconn *c, const struct server *s) {
  ssize_t n = send(c->fd, health_req, sizeof health_req - 1, MSG_NOSIGNAL);
  if (n != (ssize_t)(sizeof health_req - 1))
    die("%s: send: %s", s->impl, n < 0 ? strerror(errno) : "short");
}

/* Reads what c has (epoll said readable); returns 1 when that completed
 * the response (one request is outstanding at a time), else 0. */
static int lconn_read(struct lconn *c, const struct server *s) {
  ssize_t r = recv(c->fd, c->buf + c->have, sizeof c->buf - 1 - c->have, 0);
  if (r < 0 && errno == EINTR)
    return 0;
  if (r <= 0)
    die("%s: GET /health: %s", s->impl, r < 0 ? strerror(errno) : "closed");
  c->have += (size_t)r;
  c->buf[c->have] = '\0';
  const char *end = strstr(c->buf, "\r\n\r\n");
  if (end == NULL)
    return 0;
  if (strncmp(c->buf, "HTTP/1.1 200", 12) != 0)
    die("%s: GET /health: %.40s", s->impl, c->buf);
  const char *cl = strcasestr(c->buf, "\r\nContent-Length:");
  if (cl == NULL || cl > end)
    die("%s: GET /health: no Content-Length", s->impl);
  size_t total = (size_t)(end + 4 - c->buf) + strtoul(cl + 17, NULL, 10);
  if (c->have < total)
    return 0;
  if (c->have > total)
    die("%s: GET /health: an answer nobody asked for", s->impl);
  c->have = 0;
  return 1;
}

/* One turn on server k: every connection busy until the turn ends, then
 * drained. */
static void load_turn(struct loader *l, int ep, int k, int i) {
  const struct server *s = l->s[k];
  int64_t start = bench_now(), end = start + TURN_NS;
  for (int j = 0; j < LOAD_CONNS; j++)
    lconn_send(&l->c[k][j], s);
  int busy = LOAD_CONNS;
  bool open = true;
  l->done[i] = 0;
  while (busy > 0) {
    struct epoll_event ev[LOAD_CONNS];
    int n = epoll_wait(ep, ev, LOAD_CONNS, 1);
    if (n < 0 && errno != EINTR)
      die("epoll_wait: %s", strerror(errno));
    int64_t now = bench_now();
    if (open && now >= end) {
      open = false;
      l->span[i] = now - start;
    }
    for (int e = 0; e < n; e++) {
      struct lconn *c = ev[e].data.ptr;
      if (lconn_read(c, s) == 0)
        continue;
      if (open) {
        l->done[i]++;
        lconn_send(c, s);
      } else {
        busy--;
      }
    }
  }
}

static void *loader_main(void *arg) {
  struct loader *l = arg;
  int ep[2];
  for (int k = 0; k < 2; k++) {
    ep[k] = epoll_create1(EPOLL_CLOEXEC);
    if (ep[k] < 0)
      die("epoll_create1: %s", strerror(errno));
    for (int i = 0; i < LOAD_CONNS; i++) {
      struct lconn *c = &l->c[k][i];
      c->fd = lconn_open(l->s[k]);
      c->have = 0;
      struct epoll_event ev = {.events = EPOLLIN, .data.ptr = c};
      if (epoll_ctl(ep[k], EPOLL_CTL_ADD, c->fd, &ev) != 0)
        die("epoll_ctl: %s", strerror(errno));
    }
  }
  for (int i = 0; i < l->turns; i++)
    load_turn(l, ep[turn_owner(i)], turn_owner(i), i);
  for (int k = 0; k < 2; k++) {
    for (int i = 0; i < LOAD_CONNS; i++)
      close(l->c[k][i].fd);
    close(ep[k]);
  }
  return NULL;
}

/* One ABBA block: both servers' responses and turn time (ns), summed over
 * the loaders (whose turns run side by side). */
struct block {
  double ratio; /* A's rate over B's */
  double done[2], span[2];
};

static int block_cmp(const void *x, const void *y) {
  double a = ((const struct block *)x)->ratio;
  double b = ((const struct block *)y)->ratio;
  return (a > b) - (a < b);
}

/* The task clock of s's thread named comm, in ns; -1 without one (or
 * without task-clock events). */
static int64_t thread_cpu(const struct server *s, const char *comm) {
  for (size_t i = 0; s->perf && i < s->nev; i++) {
    char path[96], name[32] = "";
    snprintf(path, sizeof path, "/proc/%d/task/%d/comm", (int)s->pid,
             (int)s->tid[i]);
    FILE *f = fopen(path, "r");
    if (f == NULL)
      continue;
    if (fgets(name, sizeof name, f) != NULL)
      name[strcspn(name, "\n")] = '\0';
    fclose(f);
    uint64_t v;
    if (strcmp(name, comm) == 0 &&
        read(s->ev[i], &v, sizeof v) == (ssize_t)sizeof v)
      return (int64_t)v;
  }
  return -1;
}

/* scenario: req/s on GET /health of ours and of plain (the same reportd
 * with something switched off), in alternating turns.  With watchdog,
 * also the row <scenario>_thread_cpu: the watchdog thread's share of
 * ours's CPU time over the measured turns (what the watchdog itself
 * costs, apart from the scopes, which core_bench measures). */
static void throughput(const char *scenario, struct server *ours,
                       struct server *plain, bool watchdog) {
  static struct loader l[LOADERS];
  static struct block b[MAX_TURNS / 4];
  int turns = bench_quick() ? 200 : MAX_TURNS;
  /* A few turns first, unmeasured: the connections' and threads' first
   * use. */
  int64_t wd0 = -1, cpu0 = 0;
  for (int pass = 0; pass < 2; pass++) {
    if (pass == 1 && watchdog) {
      server_cpu_sync(ours);
      wd0 = thread_cpu(ours, "cancel-watchdog");
      cpu0 = server_cpu(ours);
    }
    for (int t = 0; t < LOADERS; t++) {
      l[t].s[0] = ours;
      l[t].s[1] = plain;
      l[t].turns = pass == 0 ? 8 : turns;
      if (pthread_create(&l[t].thread, NULL, loader_main, &l[t]) != 0)
        die("pthread_create failed");
    }
    for (int t = 0; t < LOADERS; t++)
      pthread_join(l[t].thread, NULL);
  }
  if (watchdog) {
    char row[96];
    snprintf(row, sizeof row, "%s_thread_cpu", scenario);
    int64_t wd1 = thread_cpu(ours, "cancel-watchdog");
    int64_t cpu = server_cpu(ours) - cpu0;
    if (wd0 >= 0 && wd1 >= wd0 && cpu > 0)
      bench_row(row, ours->impl, 100.0 * (double)(wd1 - wd0) / (double)cpu,
                "%");
    else
      bench_row_na(row, ours->impl, "%");
  }
  int nb = turns / 4;
  for (int m = 0; m < nb; m++) {
    b[m] = (struct block){0};
    for (int i = 4 * m; i < 4 * m + 4; i++)
      for (int t = 0; t < LOADERS; t++) {
        b[m].done[turn_owner(i)] += l[t].done[i];
        b[m].span[turn_owner(i)] += (double)l[t].span[i] / LOADERS;
      }
    b[m].ratio = b[m].done[1] > 0 ? (b[m].done[0] / b[m].span[0]) /
                                        (b[m].done[1] / b[m].span[1])
                                  : 0;
  }
  qsort(b, (size_t)nb, sizeof *b, block_cmp);
  double done[2] = {0, 0}, span[2] = {0, 0};
  for (int m = nb / 5; m < nb - nb / 5; m++)
    for (int k = 0; k < 2; k++) {
      done[k] += b[m].done[k];
      span[k] += b[m].span[k];
    }
  struct server *s[2] = {ours, plain};
  for (int k = 0; k < 2; k++) {
    if (span[k] > 0 && done[k] > 0)
      bench_row(scenario, s[k]->impl, done[k] / (span[k] / 1e9), "req/s");
    else
      bench_row_na(scenario, s[k]->impl, "req/s");
  }
}

/* ---- main --------------------------------------------------------------- */

static struct server servers[MAX_SERVERS];

static int remove_entry(const char *path, const struct stat *st, int flag,
                        struct FTW *ftw) {
  (void)st;
  (void)flag;
  (void)ftw;
  return remove(path);
}

static void cleanup(void) {
  /* On failure (die), servers still run: kill them at once. */
  for (int i = 0; i < MAX_SERVERS; i++)
    server_stop(&servers[i], true);
  if (dir[0] != '\0')
    (void)nftw(dir, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
}

int main(int argc, char **argv) {
  bool latency = bench_wanted_latency("disconnect_to_stop");
  bool wasted = bench_wanted("wasted_cpu_after_abort");
  bool tput = bench_wanted("throughput_cheap_route");
  bool tput_wd = bench_wanted("throughput_watchdog");
  if (!latency && !wasted && !tput && !tput_wd)
    return 0;

  reportd = argc > 1 ? argv[1] : getenv("CANCEL_BENCH_REPORTD");
  if (reportd == NULL || *reportd == '\0')
    reportd = CANCEL_BENCH_REPORTD;
  if (*reportd == '\0' || access(reportd, X_OK) != 0)
    die("reportd not found ('%s'): build examples/reportd, or give its "
        "path as the first argument or in CANCEL_BENCH_REPORTD",
        reportd);

  struct sigaction sa = {.sa_handler = on_signal};
  sigaction(SIGTERM, &sa, NULL);
  sigaction(SIGINT, &sa, NULL);
  sigaction(SIGHUP, &sa, NULL);
  signal(SIGPIPE, SIG_IGN);
  const char *tmp = getenv("TMPDIR");
  snprintf(dir, sizeof dir, "%s/cancel-reportd-bench.XXXXXX",
           tmp != NULL && *tmp != '\0' ? tmp : "/tmp");
  if (mkdtemp(dir) == NULL) {
    dir[0] = '\0';
    die("mkdtemp: %s", strerror(errno));
  }
  for (int i = 0; i < MAX_SERVERS; i++)
    servers[i] = (struct server){.out = -1, .log = -1};
  atexit(cleanup);

  static const char *const none[] = {NULL};
  static const char *const ignore[] = {"--ignore-tokens", NULL};
  static const char *const plain[] = {"--no-cancellation", NULL};
  static const char *const nodiag[] = {"--no-diagnostics", NULL};
  struct server *ours = &servers[0];
  server_start(ours, "libcancel", none);
  if (latency)
    disconnect_to_stop(ours);
  if (wasted) {
    long rows = scan_size(ours);
    wasted_cpu(ours, rows);
    /* The second process only now: it would idle through the above. */
    server_start(&servers[1], "ignores_token", ignore);
    wasted_cpu(&servers[1], rows);
    server_stop(&servers[1], false);
  }
  if ((tput || tput_wd) && (latency || wasted)) {
    /* The throughput rows compare two servers with the same history: a
     * fresh one, not the one that ran the scans above. */
    server_stop(ours, false);
    server_start(ours, "libcancel", none);
  }
  if (tput) {
    server_start(&servers[2], "plain", plain);
    throughput("throughput_cheap_route", ours, &servers[2], false);
    server_stop(&servers[2], false);
  }
  if (tput_wd) {
    /* Scopes (one per handler) and the watchdog on, as reportd runs by
     * default, against both off. */
    server_start(&servers[3], "plain", nodiag);
    throughput("throughput_watchdog", ours, &servers[3], true);
    server_stop(&servers[3], false);
  }
  server_stop(ours, false);
  return 0;
}
