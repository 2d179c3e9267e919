/* The microVM guest's small-request client (busybox has none): built with
 * `gcc -static` by bench/microvm/run and put in the guest's initramfs.
 *
 *   rr HOST PORT rr  COUNT MAX_SECONDS   1-byte request/response on one
 *       connection (TCP_NODELAY): 50 warm-ups, then COUNT round trips or
 *       MAX_SECONDS, whichever ends first. Prints
 *       "n=N p50_us=X p90_us=X p99_us=X mean_us=X".
 *   rr HOST PORT crr SECONDS MAX_COUNT   connect, send 64 bytes, read the
 *       64-byte echo, close; one after another. Prints
 *       "n=N errors=E seconds=S per_second=R".
 *
 * Every socket has 5 s send/receive timeouts, so a stalled path ends the
 * run with an error (exit 1) instead of hanging. */
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_s(void) {
  struct timespec ts;
  clock_gettime(CLOCK_MONOTONIC, &ts);
  return ts.tv_sec + ts.tv_nsec / 1e9;
}

static int dial(const struct sockaddr_in *sa) {
  int fd = socket(AF_INET, SOCK_STREAM, 0);
  if (fd < 0) return -1;
  struct timeval tv = {5, 0};
  int one = 1;
  setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
  setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
  setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
  if (connect(fd, (const struct sockaddr *)sa, sizeof *sa) < 0) {
    int e = errno;
    close(fd);
    errno = e;
    return -1;
  }
  return fd;
}

static int exchange(int fd, const char *req, size_t n) {
  char buf[256];
  size_t got = 0;
  if (send(fd, req, n, 0) != (ssize_t)n) return -1;
  while (got < n) {
    ssize_t r = recv(fd, buf, sizeof buf, 0);
    if (r <= 0) {
      if (r == 0) errno = ECONNRESET;
      return -1;
    }
    got += (size_t)r;
  }
  return 0;
}

static int cmp(const void *a, const void *b) {
  double x = *(const double *)a, y = *(const double *)b;
  return x < y ? -1 : x > y;
}

int main(int argc, char **argv) {
  if (argc != 6) {
    fprintf(stderr, "usage: rr HOST PORT rr COUNT MAX_SECONDS | rr HOST PORT crr SECONDS MAX_COUNT\n");
    return 2;
  }
  struct sockaddr_in sa = {.sin_family = AF_INET, .sin_port = htons(atoi(argv[2]))};
  if (inet_pton(AF_INET, argv[1], &sa.sin_addr) != 1) {
    fprintf(stderr, "rr: bad address %s\n", argv[1]);
    return 2;
  }
  if (strcmp(argv[3], "rr") == 0) {
    long count = atol(argv[4]);
    double max_s = atof(argv[5]);
    double *t = calloc((size_t)count, sizeof *t);
    int fd = dial(&sa);
    if (fd < 0 || !t) {
      fprintf(stderr, "rr: connect: %s\n", strerror(errno));
      return 1;
    }
    for (int i = 0; i < 50; i++)
      if (exchange(fd, "x", 1) < 0) {
        fprintf(stderr, "rr: warm-up %d: %s\n", i, strerror(errno));
        return 1;
      }
    long n = 0;
    double start = now_s(), sum = 0;
    while (n < count && now_s() - start < max_s) {
      double t0 = now_s();
      if (exchange(fd, "x", 1) < 0) {
        fprintf(stderr, "rr: round trip %ld: %s\n", n, strerror(errno));
        return 1;
      }
      t[n] = (now_s() - t0) * 1e6;
      sum += t[n++];
    }
    close(fd);
    qsort(t, (size_t)n, sizeof *t, cmp);
    printf("n=%ld p50_us=%.1f p90_us=%.1f p99_us=%.1f mean_us=%.1f\n", n, t[n / 2],
           t[(n * 9) / 10], t[(n * 99) / 100], sum / n);
    return 0;
  }
  if (strcmp(argv[3], "crr") == 0) {
    double secs = atof(argv[4]);
    long max = atol(argv[5]), n = 0, errors = 0;
    char req[64];
    memset(req, 'q', sizeof req);
    double start = now_s();
    while (n < max && now_s() - start < secs) {
      int fd = dial(&sa);
      if (fd < 0 || exchange(fd, req, sizeof req) < 0) {
        if (++errors == 1) fprintf(stderr, "rr: connection %ld: %s\n", n, strerror(errno));
        if (fd >= 0) close(fd);
        if (errors > 20) break;
        continue;
      }
      close(fd);
      n++;
    }
    double took = now_s() - start;
    printf("n=%ld errors=%ld seconds=%.3f per_second=%.1f\n", n, errors, took, n / took);
    return errors ? 1 : 0;
  }
  fprintf(stderr, "rr: unknown mode %s\n", argv[3]);
  return 2;
}
