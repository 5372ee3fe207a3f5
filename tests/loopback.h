/*
 * A TCP socket on 127.0.0.1 with a port the kernel chose: the test servers
 * of the tests and the benchmarks start from it.  No cmocka: bench/ uses
 * it too.
 */
#ifndef CANCEL_TEST_LOOPBACK_H
#define CANCEL_TEST_LOOPBACK_H

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

/* A socket bound to 127.0.0.1, listening when backlog > 0 (bound only, a
 * port nobody accepts on, when backlog == 0).  Returns the descriptor
 * (close-on-exec) with *port set, or -errno. */
static inline int loopback_socket(int backlog, int *port) {
  int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  struct sockaddr_in a = {.sin_family = AF_INET};
  a.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  socklen_t len = sizeof a;
  if (bind(fd, (struct sockaddr *)&a, sizeof a) != 0 ||
      (backlog > 0 && listen(fd, backlog) != 0) ||
      getsockname(fd, (struct sockaddr *)&a, &len) != 0) {
    int e = errno;
    close(fd);
    return -e;
  }
  if (port != NULL)
    *port = ntohs(a.sin_port);
  return fd;
}

#endif /* CANCEL_TEST_LOOPBACK_H */
