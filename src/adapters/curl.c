/*
 * libcancel-curl: a libcurl transfer that observes a token.
 *
 * The easy handle runs on a multi handle driven by curl_multi_perform and
 * curl_multi_poll.  The token's callback only calls curl_multi_wakeup
 * (documented as callable from any thread), which makes the poll return
 * at once; the waiting thread then removes the handle, which aborts the
 * transfer.  Nothing polls the token on a timer.
 *
 * The multi handle is the thread's own, kept from one call to the next:
 * the multi owns the connection cache (and the DNS cache), so a multi per
 * call meant a new TCP connection per call and a new wake-up socket pair
 * besides (measured: 2.2-3.3x a plain curl_easy_perform on a kept-alive
 * loopback connection).  Why one per thread, rather than one per process
 * or one the caller passes in:
 *   - a multi handle is not thread-safe (only curl_multi_wakeup is), and
 *     a call runs its transfer on the calling thread: one per thread needs
 *     no lock and is never contended;
 *   - a caller-passed multi would make every caller manage one per thread
 *     to get what this does by default, and get re-entrancy wrong;
 *   - what stays between calls is only idle connections (every call
 *     removes its easy handle before it returns), bounded by
 *     CURLMOPT_MAXCONNECTS, and curl reuses one only for a transfer whose
 *     options match it (host, port, TLS settings, proxy...), as in any
 *     multi handle.
 * The rules that keep it sound:
 *   - created on the first call, freed by a pthread key destructor when the
 *     thread exits, or by cancel_curl_thread_cleanup();
 *   - a call made while the thread's multi is in use (from a curl callback
 *     of a transfer that runs on it) gets a multi of its own for the call,
 *     as before: curl refuses recursive use of a multi handle;
 *   - after fork() the child's copy of the parent's multi shares the
 *     parent's sockets: it is neither used nor freed (curl_multi_cleanup
 *     could write to the parent's connections); the pid it was made in
 *     tells, and the child makes its own;
 *   - a call that abandons its transfer (the token fired, or curl's
 *     timeout taken from its deadline) frees the thread's multi handle
 *     before it returns, closing every connection in it, so the server
 *     sees the client go whatever the protocol.  curl_multi_remove_handle
 *     on an unfinished transfer (premature, in curl's multi_done) closes
 *     an HTTP/1.x connection, but keeps a multiplexed HTTP/2 one in the
 *     cache without even resetting the stream (measured, libcurl 7.88.1),
 *     and which protocol a connection speaks is not public;
 *   - a multi handle that failed (curl_multi_perform) is not kept.
 * tests/curl_test.c checks the reuse, the close after a cancel (HTTP/1.1
 * and HTTP/2), re-entrant calls, thread exit and fork.
 */
#include "internal.h"

#include "cancel/curl.h"
#include "cancel/diag.h"

#include <inttypes.h>
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

int cancel_curl_grpc_timeout(int64_t ns, char *buf, size_t len) {
  if (ns < 0 || buf == NULL)
    return -EINVAL;
  /* Milliseconds when they fit (what services usually speak), else the
   * next coarser unit; below a millisecond, microseconds.  Rounded down:
   * the callee must not believe it has more than we do. */
  static const struct {
    int64_t ns;
    char unit;
  } units[] = {{1000, 'u'},
               {1000000, 'm'},
               {1000000000, 'S'},
               {60 * (int64_t)1000000000, 'M'},
               {3600 * (int64_t)1000000000, 'H'}};
  size_t i = ns < 1000000 ? 0 : 1;
  for (; i < sizeof units / sizeof units[0]; i++) {
    int64_t v = ns / units[i].ns;
    if (v <= 99999999) {
      int n = snprintf(buf, len, "%" PRId64 "%c", v, units[i].unit);
      return n > 0 && (size_t)n < len ? n : -EINVAL;
    }
  }
  return -EINVAL; /* more than 99999999 hours */
}

static int map_curl(CURLcode c) {
  switch (c) {
  case CURLE_OK:
    return 0;
  case CURLE_URL_MALFORMAT:
  case CURLE_UNSUPPORTED_PROTOCOL:
    return -EINVAL;
  case CURLE_COULDNT_CONNECT:
    return -ECONNREFUSED;
  case CURLE_COULDNT_RESOLVE_HOST:
  case CURLE_COULDNT_RESOLVE_PROXY:
    return -EHOSTUNREACH;
  case CURLE_OPERATION_TIMEDOUT:
    return -ETIMEDOUT;
  case CURLE_OUT_OF_MEMORY:
    return -ENOMEM;
  default:
    return -EIO;
  }
}

static void wake(void *arg) {
  curl_multi_wakeup((CURLM *)arg);
}

/* ---- Transfers in flight, for fork() ------------------------------------ *
 * A transfer's registration on its token lives on the stack of the thread
 * that runs it.  In the child of fork() that thread does not exist and the
 * child's first threads reuse its stack, so a cancel in the child must not
 * reach the registration (cancel.h, "fork()": the waits of other threads
 * are dropped).  Transfers with a token are listed here (a lock per
 * transfer: nothing next to one), and the child unregisters every one. */
struct inflight {
  cancel_reg reg;
  struct inflight *next, *prev;
};

static pthread_mutex_t inflight_mu = PTHREAD_MUTEX_INITIALIZER;
static struct inflight *inflight_head;
static pthread_once_t inflight_once = PTHREAD_ONCE_INIT;

static void inflight_prepare(void) {
  pthread_mutex_lock(&inflight_mu);
}
static void inflight_parent(void) {
  pthread_mutex_unlock(&inflight_mu);
}
static void inflight_child(void) {
  /* Only the forking thread is left, and it is not inside a transfer. */
  for (struct inflight *f = inflight_head; f != NULL; f = f->next)
    (void)cancel_unregister(&f->reg);
  inflight_head = NULL;
  pthread_mutex_init(&inflight_mu, NULL);
}
static void inflight_setup(void) {
  pthread_atfork(inflight_prepare, inflight_parent, inflight_child);
}

static void inflight_add(struct inflight *f, const cancel_token *tok,
                         CURLM *multi) {
  pthread_once(&inflight_once, inflight_setup);
  pthread_mutex_lock(&inflight_mu);
  /* Registered under the list's lock: a fork sees it listed once it is
   * registered, and the child's unregister finds it in place. */
  cancel_register(&f->reg, tok, wake, multi);
  f->prev = NULL;
  f->next = inflight_head;
  if (inflight_head != NULL)
    inflight_head->prev = f;
  inflight_head = f;
  pthread_mutex_unlock(&inflight_mu);
}

/* Unregisters (waiting for a wake running on another thread: a wake
 * takes no lock of ours) and unlists, under the list's lock: a fork never
 * sees it registered but unlisted. */
static void inflight_del(struct inflight *f) {
  pthread_mutex_lock(&inflight_mu);
  cancel_unregister(&f->reg);
  if (f->prev != NULL)
    f->prev->next = f->next;
  else
    inflight_head = f->next;
  if (f->next != NULL)
    f->next->prev = f->prev;
  pthread_mutex_unlock(&inflight_mu);
}

static void set_quick_exit(CURL *easy) {
#if LIBCURL_VERSION_NUM >= 0x075700 /* 7.87.0 */
  curl_easy_setopt(easy, CURLOPT_QUICK_EXIT, 1L);
#else
  (void)easy;
#endif
}

/* ---- The thread's multi handle ---------------------------------------- */

/* Idle connections a thread's multi handle keeps.  Without a bound curl
 * keeps 4 per easy handle added, which here means 4 (one transfer at a
 * time): a thread talking to more upstreams than that would reconnect.
 * Plain curl_easy_perform keeps 5 per easy handle (CURLOPT_MAXCONNECTS);
 * the adapter's cache serves every easy handle of the thread, so it keeps
 * a few more.  Each costs a descriptor while idle: threads times this. */
#define THREAD_MAXCONNECTS 8L

struct thread_multi {
  CURLM *multi;     /* NULL until the thread's first call */
  CURLM *inherited; /* the parent's, in a child after fork: never touched */
  pid_t pid;        /* the process multi was made in */
  bool busy;        /* a call on this thread is running on multi */
  bool keyed;       /* exit_key holds this thread's &self */
};

static __thread struct thread_multi self;
static pthread_key_t exit_key;
static pthread_once_t exit_once = PTHREAD_ONCE_INIT;
static bool exit_key_ok;

/* Frees t's multi handle and the connections it keeps, unless it belongs
 * to the parent of a fork: that one shares the parent's sockets, and
 * curl_multi_cleanup may write to them (a TLS close_notify), so the child
 * leaves it alone.  Not while a call uses it (t->busy). */
static void thread_multi_close(struct thread_multi *t) {
  if (t->multi == NULL || t->busy)
    return;
  if (t->pid != getpid()) {
    t->inherited = t->multi; /* kept reachable: a deliberate leak */
  } else {
#if LIBCURL_VERSION_NUM >= 0x081400
    /* Nothing is in flight, but a lookup abandoned earlier may still own a
     * resolver thread: do not make the thread's exit wait for it. */
    curl_multi_setopt(t->multi, CURLMOPT_QUICK_EXIT, 1L);
#endif
    curl_multi_cleanup(t->multi);
  }
  t->multi = NULL;
}

static void thread_exit(void *arg) {
  struct thread_multi *t = arg;
  thread_multi_close(t);
  /* The key's value is gone: a call from a later destructor of the same
   * thread sets it again, so its multi handle is freed too. */
  t->keyed = false;
}

static void exit_setup(void) {
  exit_key_ok = pthread_key_create(&exit_key, thread_exit) == 0;
}

static CURLM *multi_new(void) {
  CURLM *m = curl_multi_init();
  if (m != NULL)
    curl_multi_setopt(m, CURLMOPT_MAXCONNECTS, THREAD_MAXCONNECTS);
  return m;
}

/* The multi handle for one call: the thread's own (made on first use), or
 * a new one, *fresh set, when the thread's is busy (this call comes from a
 * curl callback of a transfer running on it) or cannot be kept (no key to
 * free it at thread exit).  NULL when out of memory. */
static CURLM *multi_get(bool *fresh) {
  struct thread_multi *t = &self;
  *fresh = true;
  if (t->busy)
    return multi_new();
  if (!t->keyed) {
    pthread_once(&exit_once, exit_setup);
    if (!exit_key_ok || pthread_setspecific(exit_key, t) != 0)
      return multi_new();
    t->keyed = true;
  }
  if (t->multi != NULL && t->pid != getpid())
    thread_multi_close(t); /* made by the parent of a fork: dropped */
  if (t->multi == NULL) {
    t->multi = multi_new();
    if (t->multi == NULL)
      return NULL;
    t->pid = getpid();
  }
  *fresh = false;
  t->busy = true;
  return t->multi;
}

/* Ends a call's use of multi (its easy handle already removed).  A fresh
 * one is freed; the thread's too when `drop` says its connections must go
 * (see the end of cancel_curl_perform_ex) or it failed (curl_multi_perform
 * returned an error: a multi handle in an unknown state is not kept). */
static void multi_put(CURLM *multi, bool fresh, bool drop) {
  if (fresh) {
    curl_multi_cleanup(multi);
    return;
  }
  self.busy = false;
  if (drop)
    thread_multi_close(&self);
}

int cancel_curl_thread_cleanup(void) {
  if (self.busy)
    return -EBUSY;
  thread_multi_close(&self);
  return 0;
}

/* Appends h to *list; returns false on ENOMEM (the list is kept). */
static bool append(struct curl_slist **list, const char *h) {
  struct curl_slist *l = curl_slist_append(*list, h);
  if (l == NULL)
    return false;
  *list = l;
  return true;
}

/* The answer when the token's deadline ended the call (it left no time,
 * or curl's timeout taken from it expired): -ECANCELED once the timer has
 * fired the token, so that its reason is there to read (cancel.h's
 * conventions), -ETIMEDOUT when it did not (cancel_token_settle). */
static int deadline_ended(const cancel_token *tok, int64_t early) {
  return cancel_token_settle(tok, early) == -ECANCELED ? -ECANCELED
                                                       : -ETIMEDOUT;
}

static int perform(const cancel_token *tok, CURL *easy,
                   const cancel_curl_options *opts, CURLcode *result) {
  static const cancel_curl_options defaults;
  if (opts == NULL)
    opts = &defaults;
  if (result != NULL)
    *result = CURLE_OK;
  if (easy == NULL)
    return -EINVAL;
  if (cancel_token_is_cancelled(tok))
    return -ECANCELED;

  /* The budget: curl's own timeout from what remains, and downstream. */
  struct curl_slist *ours = NULL;
  bool own_headers = false;
  int64_t left = cancel_token_remaining(tok);
  if (left != CANCEL_NEVER) {
    if (left <= 0)
      return deadline_ended(tok, 0); /* nothing left: send nothing */
    /* Rounded up, so >= 1: 0 would be "none". */
    long ms = (long)cancel__ns_to_ms_ceil(left, LONG_MAX);
    curl_easy_setopt(easy, CURLOPT_TIMEOUT_MS, ms);
    if (!opts->no_grpc_timeout || !opts->no_request_timeout_ms) {
      own_headers = true;
      for (struct curl_slist *h = opts->headers; h != NULL; h = h->next)
        if (!append(&ours, h->data))
          goto nomem;
      char line[64], v[16];
      if (!opts->no_grpc_timeout &&
          cancel_curl_grpc_timeout(left, v, sizeof v) > 0) {
        snprintf(line, sizeof line, "grpc-timeout: %s", v);
        if (!append(&ours, line))
          goto nomem;
      }
      if (!opts->no_request_timeout_ms) {
        snprintf(line, sizeof line, "X-Request-Timeout-Ms: %" PRId64,
                 left / 1000000);
        if (!append(&ours, line))
          goto nomem;
      }
      curl_easy_setopt(easy, CURLOPT_HTTPHEADER, ours);
    }
  }

  /* Cancelled while the host name is still being resolved: with the
   * threaded resolver, removing the handle would join the thread blocked
   * in getaddrinfo (which nothing can interrupt), so the cancel would wait
   * for the lookup to end: seconds when a name server does not answer.
   * Quick exit makes libcurl detach that thread instead; it frees what it
   * holds when getaddrinfo returns.  Set before the transfer starts, not
   * only when the token fires: curl's own timeout, taken from the token's
   * deadline, may abandon the lookup inside curl_multi_perform too.  An
   * older libcurl ignores the option (CURLE_UNKNOWN_OPTION) and joins. */
  if (tok != NULL)
    set_quick_exit(easy);

  int rc;
  bool fresh;
  CURLM *multi = multi_get(&fresh);
  if (multi == NULL)
    goto nomem;
#if LIBCURL_VERSION_NUM >= 0x081400
  /* From 8.20 the resolver threads belong to the multi handle, and
   * curl_multi_cleanup joins them unless told not to.  Per call: the
   * thread's multi serves calls with and without a token. */
  curl_multi_setopt(multi, CURLMOPT_QUICK_EXIT, tok != NULL ? 1L : 0L);
#endif
  if (curl_multi_add_handle(multi, easy) != CURLM_OK) {
    multi_put(multi, fresh, false);
    rc = -EINVAL;
    goto out;
  }
  struct inflight reg;
  inflight_add(&reg, tok, multi);
  CURLcode code = CURLE_OK;
  bool finished = false, failed = false;
  while (!cancel_token_is_cancelled(tok)) {
    int running = 0;
    CURLMcode mc = curl_multi_perform(multi, &running);
    if (mc != CURLM_OK) {
      code = CURLE_FAILED_INIT;
      finished = failed = true;
      break;
    }
    int queued;
    CURLMsg *msg;
    while ((msg = curl_multi_info_read(multi, &queued)) != NULL)
      if (msg->msg == CURLMSG_DONE) {
        code = msg->data.result;
        finished = true;
      }
    if (finished || running == 0)
      break;
    /* Wakes on socket activity, curl's own timers, or the token. */
    curl_multi_poll(multi, NULL, 0, 1000, NULL);
  }
  /* The callback may be waking the multi handle right now: wait for it
   * before the next call (or the cleanup) gets the handle.  A wake-up it
   * made after the transfer ended only makes the next poll on this multi
   * return once (curl_multi_poll drains the wake-up socket). */
  inflight_del(&reg);
  /* Every call, finished or not: an unfinished transfer is aborted (an
   * HTTP/1.x connection closed at once); a finished one's connection,
   * already back in the cache, stays there for the next call. */
  curl_multi_remove_handle(multi, easy);
  bool derived = false; /* curl's timeout, taken from the deadline */
  if (cancel_token_is_cancelled(tok)) {
    /* Level-triggered: a fired token wins, also over curl's timeout that
     * we derived from its deadline. */
    rc = -ECANCELED;
    if (result != NULL)
      *result = finished ? code : CURLE_ABORTED_BY_CALLBACK;
  } else if (!finished) {
    /* curl stopped running the transfer without a result for it. */
    rc = -EIO;
    if (result != NULL)
      *result = CURLE_FAILED_INIT;
  } else {
    if (result != NULL)
      *result = code;
    rc = map_curl(code);
    /* The token's deadline, its timer a hair behind (or late).  A timeout
     * close to the deadline is the one we derived from it: settle with the
     * timer, so that -ECANCELED comes with the reason.  curl counts its
     * timeout in whole milliseconds, hence the 2 ms; a timeout of the
     * caller's own ends further from the deadline and stays -ETIMEDOUT. */
    if (rc == -ETIMEDOUT && left != CANCEL_NEVER) {
      rc = deadline_ended(tok, CANCEL_MSEC(2));
      derived = rc == -ECANCELED || cancel_token_remaining(tok) == 0;
    }
  }
  /* A transfer we abandoned (or that curl's timeout, taken from the
   * token's deadline, cut short) must not leave its connection open: the
   * server has to see the client go.  Removing the handle closes an
   * HTTP/1.x connection, but curl keeps a multiplexed (HTTP/2) one in the
   * cache, its stream not even reset (measured with libcurl 7.88.1: the
   * server saw nothing until the multi handle was freed).  Which protocol
   * the connection spoke is not public, so the thread's multi handle goes,
   * with every connection it holds.  Cancellation is the rare path; the
   * next call makes a new one. */
  bool abandoned =
      !finished || derived || (rc == -ECANCELED && code != CURLE_OK);
  multi_put(multi, fresh, failed || abandoned);
out:
  if (own_headers) {
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, opts->headers);
    curl_slist_free_all(ours);
  }
  return rc;
nomem:
  curl_slist_free_all(ours);
  if (own_headers)
    curl_easy_setopt(easy, CURLOPT_HTTPHEADER, opts->headers);
  return -ENOMEM;
}

int cancel_curl_perform_ex(const cancel_token *tok, CURL *easy,
                           const cancel_curl_options *opts, CURLcode *result) {
  /* The transfer is work on tok's behalf: the watchdog names one that goes
   * on after the cancel ("curl perform": a resolver, a callback). */
  cancel_scope scope;
  cancel_scope_begin(&scope, tok, "curl perform");
  int rc = perform(tok, easy, opts, result);
  cancel_scope_end(&scope);
  return rc;
}

int cancel_curl_perform(const cancel_token *tok, CURL *easy) {
  return cancel_curl_perform_ex(tok, easy, NULL, NULL);
}
