/*
 * libcancel-curl: a libcurl transfer that observes a token.
 *
 * The easy handle runs on a multi handle of its own, driven by
 * curl_multi_perform and curl_multi_poll.  The token's callback only calls
 * curl_multi_wakeup (documented as callable from any thread), which makes
 * the poll return at once; the waiting thread then removes the handle,
 * which aborts the transfer and closes its connection.  Nothing polls the
 * token on a timer.
 */
#include "internal.h"

#include "cancel/curl.h"

#include <inttypes.h>
#include <stdio.h>
#include <string.h>

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

static void set_quick_exit(CURL *easy) {
#if LIBCURL_VERSION_NUM >= 0x075700 /* 7.87.0 */
  curl_easy_setopt(easy, CURLOPT_QUICK_EXIT, 1L);
#else
  (void)easy;
#endif
}

/* Appends h to *list; returns false on ENOMEM (the list is kept). */
static bool append(struct curl_slist **list, const char *h) {
  struct curl_slist *l = curl_slist_append(*list, h);
  if (l == NULL)
    return false;
  *list = l;
  return true;
}

int cancel_curl_perform_ex(const cancel_token *tok, CURL *easy,
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
      return -ECANCELED; /* nothing left: send nothing */
    long ms = (long)((left + 999999) / 1000000); /* >= 1: 0 is "none" */
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
  CURLM *multi = curl_multi_init();
  if (multi == NULL)
    goto nomem;
#if LIBCURL_VERSION_NUM >= 0x081400
  /* From 8.20 the resolver threads belong to the multi handle, and
   * curl_multi_cleanup joins them unless told not to. */
  if (tok != NULL)
    curl_multi_setopt(multi, CURLMOPT_QUICK_EXIT, 1L);
#endif
  if (curl_multi_add_handle(multi, easy) != CURLM_OK) {
    curl_multi_cleanup(multi);
    rc = -EINVAL;
    goto out;
  }
  cancel_reg reg;
  cancel_register(&reg, tok, wake, multi);
  CURLcode code = CURLE_OK;
  bool finished = false;
  while (!cancel_token_is_cancelled(tok)) {
    int running = 0;
    CURLMcode mc = curl_multi_perform(multi, &running);
    if (mc != CURLM_OK) {
      code = CURLE_FAILED_INIT;
      finished = true;
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
   * before the handle goes. */
  cancel_unregister(&reg);
  curl_multi_remove_handle(multi, easy); /* aborts an unfinished transfer */
  curl_multi_cleanup(multi);
  if (!finished || cancel_token_is_cancelled(tok)) {
    /* Level-triggered: a fired token wins, also over curl's timeout that
     * we derived from its deadline. */
    rc = -ECANCELED;
    if (result != NULL)
      *result = finished ? code : CURLE_ABORTED_BY_CALLBACK;
  } else {
    if (result != NULL)
      *result = code;
    rc = map_curl(code);
    /* The token's deadline, its timer a hair behind.  curl counts its
     * timeout in whole milliseconds (truncating), so it may give up to a
     * millisecond before the deadline itself: a timeout that close to it
     * is the one we derived from it, not one of the caller's. */
    if (rc == -ETIMEDOUT && left != CANCEL_NEVER &&
        cancel_token_remaining(tok) < CANCEL_MSEC(2))
      rc = -ECANCELED;
  }
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

int cancel_curl_perform(const cancel_token *tok, CURL *easy) {
  return cancel_curl_perform_ex(tok, easy, NULL, NULL);
}
