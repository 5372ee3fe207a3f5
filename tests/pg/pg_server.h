/*
 * A throwaway PostgreSQL server for the tests and the benchmarks, through
 * tests/pg/server.sh (initdb in a temporary directory, a Unix socket
 * only, as the postgres user when run as root).  Header-only: included by
 * tests/pq_test.c and bench/pq_bench.c.
 */
#ifndef CANCEL_PG_SERVER_H
#define CANCEL_PG_SERVER_H

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

struct pg_server {
  char dir[256];      /* the server's directory, "" for an outside one */
  char conninfo[512]; /* how to connect */
};

/* Runs `server.sh CMD DIR` from the repository at root; its standard
 * output (the conninfo for start, trailing newlines cut) goes to out. */
static inline int pg_server_cmd(const struct pg_server *s, const char *root,
                                const char *cmd, char *out, size_t len) {
  char line[1024];
  snprintf(line, sizeof line, "sh '%s/tests/pg/server.sh' %s '%s'", root, cmd,
           s->dir);
  FILE *p = popen(line, "r");
  if (p == NULL)
    return -1;
  if (out != NULL) {
    size_t n = fread(out, 1, len - 1, p);
    while (n > 0 && (out[n - 1] == '\n' || out[n - 1] == '\r'))
      n--;
    out[n] = '\0';
  }
  return pclose(p) == 0 ? 0 : -1;
}

/* Uses the server the environment variable env names (a conninfo) when it
 * is set, else starts one in a new directory named after tag.  Returns 0,
 * or -1 with a message on standard error (nothing left running). */
static inline int pg_server_start(struct pg_server *s, const char *root,
                                  const char *env, const char *tag) {
  memset(s, 0, sizeof *s);
  const char *given = env != NULL ? getenv(env) : NULL;
  if (given != NULL && *given != '\0') {
    snprintf(s->conninfo, sizeof s->conninfo, "%s", given);
    return 0;
  }
  const char *tmp = getenv("TMPDIR");
  snprintf(s->dir, sizeof s->dir, "%s/%s.XXXXXX",
           tmp != NULL && *tmp != '\0' ? tmp : "/tmp", tag);
  if (mkdtemp(s->dir) == NULL) {
    perror("mkdtemp");
    s->dir[0] = '\0';
    return -1;
  }
  if (pg_server_cmd(s, root, "start", s->conninfo, sizeof s->conninfo) != 0) {
    fprintf(stderr, "%s: could not start PostgreSQL (see above)\n", tag);
    (void)pg_server_cmd(s, root, "stop", NULL, 0);
    s->dir[0] = '\0';
    return -1;
  }
  return 0;
}

/* Stops and removes a server pg_server_start started (not an outside one). */
static inline void pg_server_stop(struct pg_server *s, const char *root) {
  if (s->dir[0] != '\0')
    (void)pg_server_cmd(s, root, "stop", NULL, 0);
  s->dir[0] = '\0';
}

#endif /* CANCEL_PG_SERVER_H */
