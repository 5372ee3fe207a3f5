/*
 * libcancel-curl: outbound HTTP with libcurl that stops when the token
 * says so, and tells the server how long it has.
 *
 * Link with -lcancel-curl -lcancel -lcurl (pkg-config: cancel-curl).
 */
#ifndef CANCEL_CURL_H
#define CANCEL_CURL_H

#include <cancel.h>

#include <curl/curl.h>

#ifdef __cplusplus
extern "C" {
#endif

/* Options for cancel_curl_perform_ex(); zero-initialise, then set what you
 * need.  A NULL options pointer means the defaults. */
typedef struct cancel_curl_options {
  /* Headers of your own: libcurl cannot hand back a CURLOPT_HTTPHEADER
   * list, so give it here and the adapter sends it with its own deadline
   * headers (and puts it back on the handle afterwards).  Not copied, not
   * freed. */
  struct curl_slist *headers;
  /* Do NOT send the remaining budget downstream (by default it goes as
   * `grpc-timeout: <n>m` (gRPC's format) and `X-Request-Timeout-Ms: <n>`
   * whenever the token has a deadline). */
  bool no_grpc_timeout;
  bool no_request_timeout_ms;
} cancel_curl_options;

/* Runs the transfer configured on `easy`, observing tok.  The transfer runs
 * on a multi handle polled with curl_multi_poll; the token's callback
 * wakes it with curl_multi_wakeup the moment it fires (never the
 * once-a-second progress callback), and the handle is then removed, which
 * aborts the transfer; its connection is closed before the call returns
 * (HTTP/1.x and HTTP/2 alike), so the server sees the client go.
 *
 * Connections are kept alive between calls.  The multi handle is the
 * calling thread's own, made on its first call and kept (with the
 * connection and DNS caches it owns) until the thread exits or calls
 * cancel_curl_thread_cleanup(); every call removes `easy` from it before
 * returning.  So a completed transfer's connection stays open, idle, for
 * the next call on the same thread, with the same easy handle or another
 * one whose options match it (curl decides, as in any multi handle): at
 * most 8 idle connections per thread, the oldest closed first; one idle
 * for longer than CURLOPT_MAXAGE_CONN is not reused.  A call that
 * abandons its transfer (the token fired, or curl's timeout taken from its
 * deadline expired, with the transfer in flight) frees the thread's multi
 * handle and every idle connection in it: curl keeps an abandoned HTTP/2
 * connection in its cache, open, and that is the one way to close it.  A call
 * made while the thread's multi handle is busy (from inside a curl callback of
 * a transfer this function runs on the same thread) runs on a multi handle of
 * its own, freed when it returns.  After fork() the child does not use (or
 * free) the multi handle it inherited: it makes its own.  Consequences:
 *   - connections outlive the call and the easy handle: a
 *     CURLOPT_CLOSESOCKETFUNCTION may run after curl_easy_cleanup(easy),
 *     on a later call or at the thread's cleanup, with the
 *     CURLOPT_CLOSESOCKETDATA it was given: keep that valid until then;
 *   - to close the connection at the end of every call instead, set
 *     CURLOPT_FORBID_REUSE on the handle.
 * Calls on different threads never share a connection.
 *
 * When the token has a deadline (cancel_token_deadline), the transfer's
 * CURLOPT_TIMEOUT_MS is set from the time remaining (at least 1 ms: 0
 * would mean "none" to curl; the option stays set on the handle: set it
 * again if you reuse the handle) and the budget is sent downstream in the
 * headers above; with no time left it fails at once, sending nothing.
 *
 * Returns:
 *   0             the transfer completed: check the response code yourself;
 *   -ECANCELED    the token fired (the transfer was abandoned).  Also when
 *                 its deadline left no time, or curl's timeout taken from
 *                 that deadline expired first: the call then waits for the
 *                 token's timer (cancel_token_settle()), so that on return
 *                 the token is cancelled and its reason readable, always;
 *   -ETIMEDOUT    a timeout you set on the handle yourself; or the token's
 *                 deadline passed (curl's timeout taken from it expired, or
 *                 no time was left) and the token was still not cancelled
 *                 CANCEL_SETTLE_WAIT_NS after it (nothing fires it: the
 *                 child of a fork(), or a timer thread not scheduled);
 *   -EINVAL       NULL easy, a malformed or unsupported URL;
 *   -ECONNREFUSED, -EHOSTUNREACH (the host could not be resolved or
 *                 reached), -ENOMEM;
 *   -EIO          any other curl failure.
 * *result (may be NULL) receives curl's own CURLcode, so "our timeout"
 * (-ECANCELED with a timeout reason on the token) is never confused with
 * "their failure".
 *
 * Name resolution with the threaded resolver (Debian's libcurl): the
 * lookup runs getaddrinfo on a thread of libcurl's, and nothing interrupts
 * getaddrinfo.  By default, removing a handle that is still resolving
 * joins that thread, so a cancel would return only when the lookup ends
 * (measured: 3.0 s against a name server that never answers, with
 * `options timeout:3 attempts:1`).  So, with a token (non-NULL), the
 * adapter sets CURLOPT_QUICK_EXIT to 1 on the handle before the transfer
 * (it stays set, and only changes what an abandoned lookup does): the
 * thread is detached instead, and the call returns at once, whether the
 * token is cancelled or its deadline (or curl's timeout taken from it)
 * expires mid-lookup (measured: under 1 ms after the cancel, valgrind
 * aside).  The detached thread frees everything it holds and ends when
 * getaddrinfo returns, as bounded by resolv.conf's timeout and attempts;
 * until then each abandoned lookup costs a thread and a socket pair.
 * libcurl before 7.87.0 has no such option and joins.  From libcurl 8.20,
 * whose resolver threads belong to the multi handle, CURLMOPT_QUICK_EXIT
 * is set on the thread's multi handle too, for the calls with a token
 * (the same multi handle serves calls without one, which join as before)
 * and before the multi handle is freed.
 *
 * Thread-safety: one call per easy handle at a time; the handle must not
 * be in another multi handle.  Any thread may call; each keeps its own
 * multi handle (see above), so no lock is taken.  Allocates a multi handle
 * on a thread's first call (and on each call made from a curl callback of
 * another). */
CANCEL_API int cancel_curl_perform_ex(const cancel_token *tok, CURL *easy,
                                      const cancel_curl_options *opts,
                                      CURLcode *result);

/* cancel_curl_perform_ex(tok, easy, NULL, NULL). */
CANCEL_API int cancel_curl_perform(const cancel_token *tok, CURL *easy);

/* Frees the calling thread's multi handle and closes the idle connections
 * it keeps; the thread's next call makes a new one.  Optional: a thread's
 * multi handle is freed when the thread exits (a pthread key destructor),
 * but not on a thread that ends the process (the main thread calling
 * exit() or returning from main: key destructors do not run there).  Call
 * it on such a thread before curl_global_cleanup(), which no multi handle
 * may outlive, and wherever the thread's idle connections should go now
 * (a server that must see them close).  In a child after fork() the
 * parent's multi handle is only forgotten.
 * Returns 0, or -EBUSY when called from inside a curl callback of a
 * transfer that cancel_curl_perform_ex() runs on this thread's multi
 * handle (nothing is freed).  Affects the calling thread only. */
CANCEL_API int cancel_curl_thread_cleanup(void);

/* Writes the gRPC form of a timeout ("250m", "30S": at most 8 digits and
 * the largest exact unit that fits) into buf.  Returns its length, or
 * -EINVAL (ns < 0, buf too small). */
CANCEL_API int cancel_curl_grpc_timeout(int64_t ns, char *buf, size_t len);

#ifdef __cplusplus
}
#endif

#endif /* CANCEL_CURL_H */
