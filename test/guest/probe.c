/*
 * ftvm clock probe: answers UDP requests with the guest's clocks, steps/sets CLOCK_REALTIME on
 * request, and optionally runs a memory-dirtying workload with a continuity counter.
 * Wire format (little-endian, fixed size): see test/guest/README.md.
 *
 *   probe [--port N] [--workload MiBps] [--ready-file PATH]
 */
#define _GNU_SOURCE
#include <errno.h>
#include <netinet/in.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "FTVP"
#define VERSION 1
#define REQ_SIZE 24
#define REPLY_SIZE 64
#define REPLY_FLAG 0x80

enum { CMD_TIME = 1, CMD_STEP = 2, CMD_SET = 3, CMD_WORKLOAD = 4 };
enum { ST_OK = 0, ST_BAD_ARG = 1, ST_CLOCK_FAILED = 2 };

/* The workload cycles through at most this much memory, and at most a quarter of the guest's
 * RAM: a small guest (128 MiB) holds its kernel and initramfs beside it, and OOM-kills the probe
 * once a 64 MiB buffer is full. */
#define WORKLOAD_MAX_BYTES (64ull << 20)
#define PAGE 4096u
#define MAX_MIBPS 4096u

/* Shared with the workload thread; plain atomics, the reply path never blocks on a lock. */
static uint64_t workload_counter;
static uint32_t workload_mibps;
static uint32_t bad_packets;
static uint64_t boot_id;

static void put_u16(uint8_t *p, uint16_t v) { for (int i = 0; i < 2; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint64_t get_u64(const uint8_t *p) {
  uint64_t v = 0;
  for (int i = 7; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}

static int64_t ts_ns(const struct timespec *ts) { return (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec; }
static int64_t now_ns(clockid_t clock) {
  struct timespec ts;
  clock_gettime(clock, &ts);
  return ts_ns(&ts);
}

/* Floor division so negative values normalise to tv_nsec in [0, 1e9), as the kernel requires. */
static struct timespec ns_to_ts(int64_t ns) {
  int64_t sec = ns / 1000000000LL, rem = ns % 1000000000LL;
  if (rem < 0) { sec -= 1; rem += 1000000000LL; }
  return (struct timespec){ .tv_sec = sec, .tv_nsec = rem };
}

/*
 * ADJ_SETOFFSET makes the kernel add the delta atomically under the timekeeping lock, so the step
 * is exact; gettime+settime (the fallback) loses the few microseconds between the two calls.
 */
static int step_realtime(int64_t delta_ns) {
  struct timespec d = ns_to_ts(delta_ns);
  struct timex tx = { .modes = ADJ_SETOFFSET | ADJ_NANO };
  tx.time.tv_sec = d.tv_sec;
  tx.time.tv_usec = d.tv_nsec; /* nanoseconds, because of ADJ_NANO */
  if (clock_adjtime(CLOCK_REALTIME, &tx) >= 0) return 0;
  struct timespec t = ns_to_ts(now_ns(CLOCK_REALTIME) + delta_ns);
  return clock_settime(CLOCK_REALTIME, &t);
}

static void *workload_main(void *arg) {
  (void)arg;
  /* Lowest priority: the reply path must preempt the workload on a single vCPU. */
  struct sched_param idle = { 0 };
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle);
  uint8_t *buf = NULL; /* mapped on first use, so an idle probe does not grow the guest's RAM image */
  uint64_t bytes = (uint64_t)sysconf(_SC_PHYS_PAGES) * (uint64_t)sysconf(_SC_PAGESIZE) / 4;
  if (bytes > WORKLOAD_MAX_BYTES || bytes < PAGE) bytes = WORKLOAD_MAX_BYTES;
  const uint64_t pages = bytes / PAGE;
  uint64_t page = 0;
  uint32_t rate = 0;
  int64_t t0 = 0;
  uint64_t done = 0; /* pages dirtied since t0 at the current rate */
  for (;;) {
    uint32_t want = __atomic_load_n(&workload_mibps, __ATOMIC_RELAXED);
    int64_t now = now_ns(CLOCK_MONOTONIC);
    if (want != rate) { rate = want; t0 = now; done = 0; }
    if (rate == 0) { usleep(20000); continue; }
    if (!buf) {
      buf = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
      if (buf == MAP_FAILED) { perror("probe: workload mmap"); return NULL; }
    }
    uint64_t due = (uint64_t)((now - t0) / 1000) * rate * (1048576 / PAGE) / 1000000;
    /* After a long stall (VM paused) do not burst to catch up: restart pacing from now. */
    if (due > done + (uint64_t)rate * (1048576 / PAGE) / 10) { t0 = now; done = 0; due = 0; }
    while (done < due) {
      uint64_t n = __atomic_add_fetch(&workload_counter, 1, __ATOMIC_RELAXED);
      memset(buf + page * PAGE, (int)(n & 0xff), PAGE);
      memcpy(buf + page * PAGE, &n, sizeof n);
      page = (page + 1) % pages;
      done++;
    }
    usleep(5000);
  }
  return NULL;
}

static int start_workload_thread(void) {
  pthread_t th;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, 256 << 10); /* the workload needs little stack, and the guest may be small */
  int err = pthread_create(&th, &attr, workload_main, NULL);
  pthread_attr_destroy(&attr);
  if (err) { fprintf(stderr, "probe: pthread_create: %s\n", strerror(err)); return -1; }
  pthread_detach(th);
  return 0;
}

/* Kernel receive timestamp (SO_TIMESTAMPNS) if present, else a userspace stamp taken now. */
static int64_t rx_stamp(struct msghdr *msg) {
  for (struct cmsghdr *c = CMSG_FIRSTHDR(msg); c; c = CMSG_NXTHDR(msg, c))
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_TIMESTAMPNS) {
      struct timespec ts;
      memcpy(&ts, CMSG_DATA(c), sizeof ts);
      return ts_ns(&ts);
    }
  return now_ns(CLOCK_REALTIME);
}

static uint16_t execute(uint8_t cmd, int64_t arg) {
  switch (cmd) {
  case CMD_TIME: return ST_OK;
  case CMD_STEP: return step_realtime(arg) == 0 ? ST_OK : ST_CLOCK_FAILED;
  case CMD_SET: {
    if (arg < 0) return ST_BAD_ARG;
    struct timespec t = ns_to_ts(arg);
    return clock_settime(CLOCK_REALTIME, &t) == 0 ? ST_OK : ST_CLOCK_FAILED;
  }
  case CMD_WORKLOAD:
    if (arg < 0 || arg > MAX_MIBPS) return ST_BAD_ARG;
    __atomic_store_n(&workload_mibps, (uint32_t)arg, __ATOMIC_RELAXED);
    return ST_OK;
  }
  return ST_BAD_ARG; /* unreachable: unknown commands are dropped before execute() */
}

/*
 * Clients retry a lost STEP/SET/WORKLOAD with the same id; running a step twice would corrupt a
 * validation, so a repeat of the last mutating request is answered without running it again.
 */
static uint64_t last_id;
static uint16_t last_status;
static int have_last;

static uint16_t execute_once(uint8_t cmd, uint64_t id, int64_t arg) {
  if (cmd == CMD_TIME) return ST_OK;
  if (have_last && id == last_id) return last_status;
  last_status = execute(cmd, arg);
  last_id = id;
  have_last = 1;
  return last_status;
}

static int valid_request(const uint8_t *req, ssize_t n) {
  return n == REQ_SIZE && memcmp(req, MAGIC, 4) == 0 && req[4] == VERSION && req[5] >= CMD_TIME &&
         req[5] <= CMD_WORKLOAD;
}

static void serve(int fd) {
  uint8_t req[256], reply[REPLY_SIZE];
  char control[256];
  struct sockaddr_in peer;
  for (;;) {
    struct iovec iov = { req, sizeof req };
    struct msghdr msg = { .msg_name = &peer, .msg_namelen = sizeof peer, .msg_iov = &iov, .msg_iovlen = 1,
                          .msg_control = control, .msg_controllen = sizeof control };
    ssize_t n = recvmsg(fd, &msg, 0);
    if (n < 0) {
      if (errno != EINTR) perror("probe: recvmsg");
      continue;
    }
    if (!valid_request(req, n)) {
      __atomic_add_fetch(&bad_packets, 1, __ATOMIC_RELAXED);
      continue;
    }
    int64_t rx = rx_stamp(&msg);
    uint16_t status = execute_once(req[5], get_u64(req + 8), (int64_t)get_u64(req + 16));

    memset(reply, 0, sizeof reply);
    memcpy(reply, MAGIC, 4);
    reply[4] = VERSION;
    reply[5] = req[5] | REPLY_FLAG;
    put_u16(reply + 6, status);
    memcpy(reply + 8, req + 8, 8); /* request id, echoed verbatim */
    put_u64(reply + 16, (uint64_t)rx);
    put_u64(reply + 40, __atomic_load_n(&workload_counter, __ATOMIC_RELAXED));
    put_u32(reply + 48, __atomic_load_n(&workload_mibps, __ATOMIC_RELAXED));
    put_u32(reply + 52, __atomic_load_n(&bad_packets, __ATOMIC_RELAXED));
    put_u64(reply + 56, boot_id);
    /* The stamps go last, right before sendto: monotonic, then realtime (the one offsets use). */
    put_u64(reply + 32, (uint64_t)now_ns(CLOCK_MONOTONIC));
    put_u64(reply + 24, (uint64_t)now_ns(CLOCK_REALTIME));
    if (sendto(fd, reply, sizeof reply, 0, (struct sockaddr *)&peer, msg.msg_namelen) < 0)
      perror("probe: sendto");
  }
}

static int open_socket(int port) {
  int fd = socket(AF_INET, SOCK_DGRAM, 0);
  if (fd < 0) { perror("probe: socket"); return -1; }
  int on = 1;
  setsockopt(fd, SOL_SOCKET, SO_TIMESTAMPNS, &on, sizeof on);
  struct sockaddr_in addr = { .sin_family = AF_INET, .sin_port = htons((uint16_t)port),
                              .sin_addr.s_addr = htonl(INADDR_ANY) };
  if (bind(fd, (struct sockaddr *)&addr, sizeof addr) < 0) { perror("probe: bind"); close(fd); return -1; }
  return fd;
}

int main(int argc, char **argv) {
  int port = 5555;
  long workload = 0;
  const char *ready_file = NULL;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--workload") && i + 1 < argc) workload = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--ready-file") && i + 1 < argc) ready_file = argv[++i];
    else { fprintf(stderr, "usage: %s [--port N] [--workload MiBps] [--ready-file PATH]\n", argv[0]); return 2; }
  }
  if (workload < 0 || workload > MAX_MIBPS) { fprintf(stderr, "probe: bad --workload %ld\n", workload); return 2; }
  if (getrandom(&boot_id, sizeof boot_id, GRND_NONBLOCK) != sizeof boot_id)
    boot_id = (uint64_t)now_ns(CLOCK_MONOTONIC) ^ ((uint64_t)now_ns(CLOCK_REALTIME) << 20);

  int fd = open_socket(port);
  if (fd < 0) return 1;
  /* Keep the reply path free of page faults and ahead of everything else in the guest. MCL_CURRENT
   * only, and before the workload thread exists: its buffer is meant to be dirtied page by page,
   * and locked it would be populated whole at once. */
  if (mlockall(MCL_CURRENT) < 0) perror("probe: mlockall");
  __atomic_store_n(&workload_mibps, (uint32_t)workload, __ATOMIC_RELAXED);
  if (start_workload_thread() < 0) return 1;
  struct sched_param fifo = { .sched_priority = 50 };
  if (sched_setscheduler(0, SCHED_FIFO, &fifo) < 0) perror("probe: SCHED_FIFO");
  if (ready_file) {
    FILE *f = fopen(ready_file, "w");
    if (f) fclose(f);
  }
  fprintf(stderr, "probe: listening on udp 0.0.0.0:%d, workload %ld MiB/s\n", port, workload);
  serve(fd);
  return 0;
}
