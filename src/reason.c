/*
 * Reasons: reading why a token fired, and saying it in one line.
 *
 * A source's reason is written once, before its cancelled bit is
 * published.  The origin holds kind, time and detail; every source the
 * cancellation crossed after it holds a copy of kind and time and a `via`
 * pointer to the parent it came from.  So the path is read by walking the
 * via pointers, and parents outlive their children, which keeps the walk
 * valid without copying strings on the hot path.
 */
#include "internal.h"

#include <stdarg.h>
#include <stdio.h>
#include <string.h>

const char *cancel_kind_name(int kind) {
  switch (kind) {
  case CANCEL_NONE:
    return "none";
  case CANCEL_REQUESTED:
    return "requested";
  case CANCEL_TIMEOUT:
    return "timeout";
  case CANCEL_CLIENT_GONE:
    return "client gone";
  case CANCEL_SHUTDOWN:
    return "shutdown";
  default:
    return kind >= CANCEL_USER ? "user" : "invalid";
  }
}

static const char *hop_note(const cancel_source *src) {
  /* A shield reached through its outer token was cut by its grace. */
  return (src->shield != NULL && src->via != NULL) ? src->shield->note : NULL;
}

int cancel_token_reason(const cancel_token *tok, cancel_reason *out) {
  if (out == NULL)
    return -EINVAL;
  memset(out, 0, sizeof *out);
  out->origin = "";
  out->detail = "";
  if (!cancel_token_is_cancelled(tok)) {
    out->kind = CANCEL_NONE;
    return 0;
  }
  const cancel_source *src = (const cancel_source *)tok;
  out->kind = src->kind;
  out->time = src->time;
  /* Walk towards the origin, keeping the CANCEL_VIA_MAX nearest hops. */
  cancel_hop near[CANCEL_VIA_MAX];
  size_t hops = 0;
  const cancel_source *cur = src;
  while (cur->via != NULL) {
    if (hops < CANCEL_VIA_MAX) {
      near[hops].name = cur->name;
      near[hops].note = hop_note(cur);
    }
    hops++;
    cur = cur->via;
  }
  out->origin = cur->name;
  out->detail = cur->detail;
  out->via_len = hops < CANCEL_VIA_MAX ? hops : CANCEL_VIA_MAX;
  out->via_skipped = hops - out->via_len;
  for (size_t i = 0; i < out->via_len; i++)
    out->via[i] = near[out->via_len - 1 - i];
  return 1;
}

/* snprintf that appends at *pos and keeps counting past the end. */
static void put(char *buf, size_t len, size_t *pos, const char *fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  size_t room = *pos < len ? len - *pos : 0;
  int n = vsnprintf(room > 0 ? buf + *pos : NULL, room, fmt, ap);
  va_end(ap);
  if (n > 0)
    *pos += (size_t)n;
}

size_t cancel__reason_via(const cancel_reason *r, const char *sep, char *buf,
                          size_t len, size_t pos) {
  if (r->via_skipped > 0)
    put(buf, len, &pos, "(%zu more)%s", r->via_skipped, sep);
  for (size_t i = 0; i < r->via_len && i < CANCEL_VIA_MAX; i++) {
    const cancel_hop *h = &r->via[i];
    put(buf, len, &pos, "%s%s", i > 0 ? sep : "",
        h->name && h->name[0] ? h->name : "?");
    if (h->note && h->note[0])
      put(buf, len, &pos, " (%s)", h->note);
  }
  return pos;
}

int cancel_reason_format(const cancel_reason *r, char *buf, size_t len) {
  if (r == NULL || (buf == NULL && len > 0))
    return -EINVAL;
  if (len > 0)
    buf[0] = '\0';
  size_t pos = 0;
  if (r->kind >= CANCEL_USER)
    put(buf, len, &pos, "user %d", r->kind);
  else
    put(buf, len, &pos, "%s", cancel_kind_name(r->kind));
  const char *origin = r->origin ? r->origin : "";
  const char *detail = r->detail ? r->detail : "";
  if (origin[0] && detail[0])
    put(buf, len, &pos, " (%s %s)", origin, detail);
  else if (origin[0] || detail[0])
    put(buf, len, &pos, " (%s)", origin[0] ? origin : detail);
  if (r->via_len > 0 || r->via_skipped > 0) {
    put(buf, len, &pos, " via ");
    pos = cancel__reason_via(r, " -> ", buf, len, pos);
  }
  return pos > INT32_MAX ? INT32_MAX : (int)pos;
}
