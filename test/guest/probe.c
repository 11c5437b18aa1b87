/*
 * ftvm clock probe: answers UDP requests with the guest's clocks, steps/sets CLOCK_REALTIME on
 * request, and optionally runs a memory-dirtying workload with a continuity counter, a disk counter
 * ring (O_DIRECT|O_DSYNC sector writes every ms), a file-system workload (create, append, fsync,
 * rename) and a service on the guest's service NIC (the counter in a UDP datagram every ms, and a
 * TCP server answering with it), each in its own thread, and, switched on by request, a CPU-bound
 * spin worker whose iteration counter measures guest throughput. Wire and disk formats
 * (little-endian, fixed size): see test/guest/README.md.
 *
 *   probe [--port N] [--workload MiBps] [--ready-file PATH] [--ring DEV] [--fs-dir DIR] [--fs-kib N]
 *         [--svc-ip ADDR --svc-peer ADDR:PORT [--svc-port N]]
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/futex.h>
#include <sys/mman.h>
#include <sys/random.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/statfs.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <sys/timex.h>
#include <time.h>
#include <unistd.h>

#define MAGIC "FTVP"
#define VERSION 1
#define REQ_SIZE 24
#define REPLY_SIZE 128 /* 64 before the disk fields; the first 64 bytes are unchanged */
#define REPLY_FLAG 0x80

enum { CMD_TIME = 1, CMD_STEP = 2, CMD_SET = 3, CMD_WORKLOAD = 4, CMD_SPIN = 5 };
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

/* Disk workloads: states as reported in the reply. */
enum { DISK_OFF = 0, DISK_RUNNING = 1, DISK_FAILED = 2 };
static uint64_t ring_issued;    /* counter of the write in flight (or the last one), set before pwrite */
static uint64_t ring_completed; /* counter of the last write whose pwrite (O_DSYNC) returned */
static uint64_t ring_write_ns;  /* summed pwrite durations of the completed writes */
static uint32_t ring_state, ring_errno, ring_slots;
static uint32_t ring_checks;     /* read-back checks of the ring done (see ring_check) */
static uint32_t ring_violations; /* checks that found the disk older or newer than this RAM */
static uint64_t fs_cycles; /* fs cycles whose every fsync returned */
static uint64_t fs_bytes;  /* bytes written by the fs workload */
static uint32_t fs_state, fs_errno;

static void put_u16(uint8_t *p, uint16_t v) { for (int i = 0; i < 2; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u32(uint8_t *p, uint32_t v) { for (int i = 0; i < 4; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static void put_u64(uint8_t *p, uint64_t v) { for (int i = 0; i < 8; i++) p[i] = (uint8_t)(v >> (8 * i)); }
static uint32_t get_u32(const uint8_t *p) {
  uint32_t v = 0;
  for (int i = 3; i >= 0; i--) v = (v << 8) | p[i];
  return v;
}
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

/* ---- spin worker ---------------------------------------------------------------------------------
 * CPU throughput for benchmarks (e.g. protected vs unprotected): while switched on, a SCHED_IDLE
 * thread (every other thread of the guest preempts it on one vCPU) runs a dependent
 * multiply/xorshift chain in registers and publishes its iteration count every SPIN_BATCH
 * iterations with a relaxed store. It writes nothing but its own cache line, so it adds no
 * dirty-page traffic: the count measures CPU work, not memory. Off by default; while off it sleeps
 * on a futex, with no wake-ups at all. */
#define SPIN_BATCH 4096u
#define SPIN_COUNT_MASK ((1ull << 56) - 1) /* the reply carries 56 bits: years at any TCG or KVM rate */
#define SPIN_PRESENT 1u /* reply flag bits (byte 127) */
#define SPIN_ON 2u

static struct {
  uint64_t count; /* iterations since boot; only grows, kept across off/on */
  uint64_t sink;  /* the chain's value, stored so the compiler must compute it */
} spin_line __attribute__((aligned(64)));
static uint32_t spin_on; /* 0/1, the futex word */

static void *spin_main(void *arg) {
  (void)arg;
  struct sched_param idle = { 0 };
  pthread_setschedparam(pthread_self(), SCHED_IDLE, &idle);
  uint64_t x = boot_id | 1;
  for (;;) {
    while (!__atomic_load_n(&spin_on, __ATOMIC_ACQUIRE))
      syscall(SYS_futex, &spin_on, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0); /* returns at once if no longer 0 */
    uint64_t n = __atomic_load_n(&spin_line.count, __ATOMIC_RELAXED);
    while (__atomic_load_n(&spin_on, __ATOMIC_RELAXED)) {
      for (uint32_t i = 0; i < SPIN_BATCH; i++) {
        x = x * 6364136223846793005ull + 1442695040888963407ull;
        x ^= x >> 29;
      }
      n += SPIN_BATCH;
      __atomic_store_n(&spin_line.sink, x, __ATOMIC_RELAXED);
      __atomic_store_n(&spin_line.count, n, __ATOMIC_RELAXED);
    }
  }
  return NULL;
}

static void spin_set(uint32_t on) {
  __atomic_store_n(&spin_on, on, __ATOMIC_RELEASE);
  if (on) syscall(SYS_futex, &spin_on, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0);
}

/* ---- disk counter ring ------------------------------------------------------------------------
 * Sector 0 of the ring disk is a header (made by the host, test/support/disk-check.ts, or here if
 * it is missing); sectors 1..slots hold records. Counter c goes to slot (c - 1) % slots. One write
 * is in flight at a time and each returns only once durable (O_DSYNC), so after any crash the
 * records of this boot are exactly the counters newest-slots+2 .. newest, plus perhaps one torn
 * slot (the write in flight), which its crc exposes. */
#define SECTOR 4096u
#define RING_HEADER_MAGIC "FTVMRDSK"
#define RING_RECORD_MAGIC "FTVMRING"
#define RING_VERSION 1u
#define RING_DEFAULT_SLOTS 256u
#define RING_PERIOD_NS 1000000LL
#define CRC_OFFSET (SECTOR - 4)

static uint32_t crc_table[256];
static void crc32_init(void) {
  for (uint32_t i = 0; i < 256; i++) {
    uint32_t c = i;
    for (int k = 0; k < 8; k++) c = c & 1 ? 0xEDB88320u ^ (c >> 1) : c >> 1;
    crc_table[i] = c;
  }
}
/* zlib's crc32 (IEEE, reflected), so the host checks it with zlib.crc32. */
static uint32_t crc32_of(const uint8_t *p, size_t n) {
  uint32_t c = 0xFFFFFFFFu;
  while (n--) c = crc_table[(c ^ *p++) & 0xff] ^ (c >> 8);
  return c ^ 0xFFFFFFFFu;
}

static void seal(uint8_t *sector) { put_u32(sector + CRC_OFFSET, crc32_of(sector, CRC_OFFSET)); }

static uint8_t *ring_buf; /* one sector, aligned for O_DIRECT, allocated (and locked) before the thread */
static const char *ring_dev;

static int full_pio(int write, int fd, uint8_t *buf, off_t off) {
  for (;;) {
    ssize_t n = write ? pwrite(fd, buf, SECTOR, off) : pread(fd, buf, SECTOR, off);
    if (n == (ssize_t)SECTOR) return 0;
    if (n < 0 && errno == EINTR) continue;
    if (n >= 0) errno = EIO; /* a short transfer on a block device with O_DIRECT: treat as I/O error */
    return -1;
  }
}

static void ring_fail(const char *what, int err) {
  fprintf(stderr, "probe: ring %s: %s: %s\n", ring_dev, what, strerror(err));
  __atomic_store_n(&ring_errno, (uint32_t)err, __ATOMIC_RELAXED);
  __atomic_store_n(&ring_state, DISK_FAILED, __ATOMIC_RELEASE);
}

/* Reads the header; writes a fresh one if there is none (init only hands us disks named ftvm-ring
 * or carrying the header). Then stamps this boot's id into it, durably, before the first record. */
static int ring_open(uint32_t *slots) {
  int fd = open(ring_dev, O_RDWR | O_DIRECT | O_DSYNC | O_CLOEXEC);
  if (fd < 0) { ring_fail("open", errno); return -1; }
  off_t size = lseek(fd, 0, SEEK_END);
  uint8_t *h = ring_buf;
  if (size < 0 || full_pio(0, fd, h, 0) < 0) { ring_fail("read header", errno); close(fd); return -1; }
  int valid = memcmp(h, RING_HEADER_MAGIC, 8) == 0 && get_u32(h + 8) == RING_VERSION && get_u32(h + 12) == SECTOR &&
              get_u32(h + 16) >= 2 && get_u32(h + 16) <= 65535 && get_u32(h + CRC_OFFSET) == crc32_of(h, CRC_OFFSET);
  *slots = valid ? get_u32(h + 16) : RING_DEFAULT_SLOTS;
  if ((uint64_t)size < (uint64_t)(*slots + 1) * SECTOR) { ring_fail("device too small for the ring", ENOSPC); close(fd); return -1; }
  if (!valid) fprintf(stderr, "probe: ring %s: no valid header, writing one (%u slots)\n", ring_dev, *slots);
  memset(h, 0, SECTOR);
  memcpy(h, RING_HEADER_MAGIC, 8);
  put_u32(h + 8, RING_VERSION);
  put_u32(h + 12, SECTOR);
  put_u32(h + 16, *slots);
  put_u64(h + 24, boot_id); /* records of other boots are stale: readRing skips them */
  seal(h);
  if (full_pio(1, fd, h, 0) < 0) { ring_fail("write header", errno); close(fd); return -1; }
  return fd;
}

/* The guest's own view of disk/RAM consistency, read back before writing `next`: the last completed
 * counter must be on disk (a disk older than RAM fails this), and the slot `next` goes to must not
 * hold `next` or newer already (a disk newer than RAM fails this). Run after every gap in the write
 * loop (a failover's resume: the guest clock jumps over the outage) and every 64th write. */
static void ring_check(int fd, uint8_t *r, uint32_t slots, uint64_t next) {
  uint64_t last = next - 1;
  int bad = 0;
  if (full_pio(0, fd, r, (off_t)(1 + (uint32_t)((last - 1) % slots)) * SECTOR) < 0) { ring_fail("read back", errno); return; }
  if (memcmp(r, RING_RECORD_MAGIC, 8) != 0 || get_u64(r + 8) != boot_id || get_u64(r + 16) != last ||
      get_u32(r + CRC_OFFSET) != crc32_of(r, CRC_OFFSET)) {
    fprintf(stderr, "probe: ring check: counter %llu not on disk\n", (unsigned long long)last);
    bad = 1;
  }
  if (full_pio(0, fd, r, (off_t)(1 + (uint32_t)((next - 1) % slots)) * SECTOR) < 0) { ring_fail("read back", errno); return; }
  if (memcmp(r, RING_RECORD_MAGIC, 8) == 0 && get_u64(r + 8) == boot_id && get_u64(r + 16) >= next) {
    fprintf(stderr, "probe: ring check: slot of %llu holds %llu, written after this RAM\n", (unsigned long long)next, (unsigned long long)get_u64(r + 16));
    bad = 1;
  }
  __atomic_add_fetch(&ring_checks, 1, __ATOMIC_RELAXED);
  if (bad) __atomic_add_fetch(&ring_violations, 1, __ATOMIC_RELAXED);
}

static void *ring_main(void *arg) {
  (void)arg;
  struct sched_param other = { 0 };
  pthread_setschedparam(pthread_self(), SCHED_OTHER, &other);
  uint32_t slots;
  int fd = ring_open(&slots);
  if (fd < 0) return NULL;
  __atomic_store_n(&ring_slots, slots, __ATOMIC_RELAXED);
  uint8_t *r = ring_buf;
  /* Ticks at start + k ms, at most one write per tick, missed ticks skipped (no catch-up burst):
   * so the counter never exceeds 1 + (ms since start), which the host uses as an upper bound. */
  int64_t tick = now_ns(CLOCK_MONOTONIC);
  int64_t last_done = tick;
  for (uint64_t counter = 1;; counter++) {
    uint32_t slot = (uint32_t)((counter - 1) % slots);
    if (counter > 1 && (now_ns(CLOCK_MONOTONIC) - last_done > 100 * RING_PERIOD_NS || counter % 64 == 0)) {
      ring_check(fd, r, slots, counter);
      if (__atomic_load_n(&ring_state, __ATOMIC_ACQUIRE) == DISK_FAILED) break;
    }
    for (uint32_t i = 48; i < CRC_OFFSET; i++) r[i] = (uint8_t)(counter + i); /* a torn write shows in the crc */
    memcpy(r, RING_RECORD_MAGIC, 8);
    put_u64(r + 8, boot_id);
    put_u64(r + 16, counter);
    put_u32(r + 24, slot);
    put_u32(r + 28, RING_VERSION);
    put_u64(r + 32, (uint64_t)now_ns(CLOCK_MONOTONIC));
    put_u64(r + 40, (uint64_t)now_ns(CLOCK_REALTIME));
    seal(r);
    __atomic_store_n(&ring_issued, counter, __ATOMIC_RELEASE);
    int64_t t0 = now_ns(CLOCK_MONOTONIC);
    if (full_pio(1, fd, r, (off_t)(1 + slot) * SECTOR) < 0) { ring_fail("write", errno); break; }
    int64_t t1 = now_ns(CLOCK_MONOTONIC);
    __atomic_add_fetch(&ring_write_ns, (uint64_t)(t1 - t0), __ATOMIC_RELAXED);
    __atomic_store_n(&ring_completed, counter, __ATOMIC_RELEASE);
    last_done = t1;
    tick += RING_PERIOD_NS;
    if (tick <= t1) tick += ((t1 - tick) / RING_PERIOD_NS + 1) * RING_PERIOD_NS;
    struct timespec ts = ns_to_ts(tick);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
  }
  close(fd);
  return NULL;
}

/* ---- file-system workload ----------------------------------------------------------------------
 * Every 50 ms in DIR (an ext4 mount): write tmp, fsync, rename over `current`, fsync DIR; replace
 * one of 32 small files f-NN (unlink + create, no fsync: delayed allocation in flight); append a
 * line to `log` and fsync it; rotate log to log.1 past 256 KiB. A cycle counts once all of that
 * returned, so after any crash `current` and `log` hold at least the last counted cycle. */
#define FS_PERIOD_NS 50000000LL
#define FS_CURRENT_DEFAULT_BYTES 16384u
#define FS_CURRENT_MAX_BYTES (4u << 20)
static uint32_t fs_current_bytes = FS_CURRENT_DEFAULT_BYTES; /* --fs-kib: the disk write load */
#define FS_SMALL_BYTES 4096u
#define FS_SMALL_FILES 32u
#define FS_LOG_ROTATE 262144
#define EXT4_MAGIC 0xEF53

static const char *fs_dir;

static void fs_fail(const char *what, int err) {
  fprintf(stderr, "probe: fs %s: %s: %s\n", fs_dir, what, strerror(err));
  __atomic_store_n(&fs_errno, (uint32_t)err, __ATOMIC_RELAXED);
  __atomic_store_n(&fs_state, DISK_FAILED, __ATOMIC_RELEASE);
}

static int write_all(int fd, const uint8_t *p, size_t n) {
  while (n) {
    ssize_t w = write(fd, p, n);
    if (w < 0 && errno == EINTR) continue;
    if (w <= 0) { if (w == 0) errno = EIO; return -1; }
    p += w;
    n -= (size_t)w;
  }
  return 0;
}

/* Creates (or truncates) name in dirfd with len bytes from buf, fsynced if asked. */
static int put_file(int dirfd, const char *name, int flags, const uint8_t *buf, size_t len, int sync) {
  int fd = openat(dirfd, name, O_WRONLY | O_CREAT | O_CLOEXEC | flags, 0644);
  if (fd < 0) return -1;
  if (write_all(fd, buf, len) < 0 || (sync && fsync(fd) < 0)) { int e = errno; close(fd); errno = e; return -1; }
  return close(fd);
}

static int open_log(int dirfd, off_t *size) {
  int fd = openat(dirfd, "log", O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
  if (fd >= 0) *size = lseek(fd, 0, SEEK_END);
  return fd;
}

static void *fs_main(void *arg) {
  (void)arg;
  struct sched_param other = { 0 };
  pthread_setschedparam(pthread_self(), SCHED_OTHER, &other);
  struct statfs st;
  if (statfs(fs_dir, &st) < 0) { fs_fail("statfs", errno); return NULL; }
  /* init mounts the disk here; if that failed this is the initramfs, and writing there tests nothing */
  if (st.f_type != EXT4_MAGIC) { fs_fail("not an ext4 mount", ENODEV); return NULL; }
  int dirfd = open(fs_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
  if (dirfd < 0) { fs_fail("open", errno); return NULL; }
  uint8_t *data = malloc(fs_current_bytes);
  if (!data) { fs_fail("allocate", ENOMEM); return NULL; }
  off_t log_size = 0;
  int logfd = open_log(dirfd, &log_size);
  if (logfd < 0) { fs_fail("open log", errno); return NULL; }
  int64_t tick = now_ns(CLOCK_MONOTONIC);
  for (uint64_t cycle = 1;; cycle++) {
    const char *what;
    char line[64], small[16];
    char head[64];
    int head_len = snprintf(head, sizeof head, "ftvm-fs %016" PRIx64 " %" PRIu64 "\n", boot_id, cycle);
    for (size_t i = 0; i < fs_current_bytes; i++) data[i] = (uint8_t)('a' + (cycle + i) % 26);
    memcpy(data, head, (size_t)head_len); /* first line: what the host reads back from `current` */
    int line_len = snprintf(line, sizeof line, "%" PRIu64 " %016" PRIx64 "\n", cycle, boot_id);
    snprintf(small, sizeof small, "f-%02u", (unsigned)(cycle % FS_SMALL_FILES));
    what = "write tmp";
    if (put_file(dirfd, "tmp", O_TRUNC, data, fs_current_bytes, 1) < 0) goto fail;
    what = "rename tmp current";
    if (renameat(dirfd, "tmp", dirfd, "current") < 0) goto fail;
    what = "fsync dir";
    if (fsync(dirfd) < 0) goto fail;
    what = "replace small file";
    if (unlinkat(dirfd, small, 0) < 0 && errno != ENOENT) goto fail;
    if (put_file(dirfd, small, O_EXCL, data, FS_SMALL_BYTES, 0) < 0) goto fail;
    what = "append log";
    if (write_all(logfd, (const uint8_t *)line, (size_t)line_len) < 0 || fsync(logfd) < 0) goto fail;
    log_size += line_len;
    __atomic_add_fetch(&fs_bytes, fs_current_bytes + FS_SMALL_BYTES + (uint64_t)line_len, __ATOMIC_RELAXED);
    __atomic_store_n(&fs_cycles, cycle, __ATOMIC_RELEASE);
    if (log_size > FS_LOG_ROTATE) {
      what = "rotate log";
      /* closed before the rename: the old log.1 it replaces is freed at once, never an orphan */
      if (close(logfd) < 0 || renameat(dirfd, "log", dirfd, "log.1") < 0 || fsync(dirfd) < 0) goto fail;
      if ((logfd = open_log(dirfd, &log_size)) < 0) goto fail;
    }
    tick += FS_PERIOD_NS;
    int64_t now = now_ns(CLOCK_MONOTONIC);
    if (tick <= now) tick += ((now - tick) / FS_PERIOD_NS + 1) * FS_PERIOD_NS;
    struct timespec ts = ns_to_ts(tick);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
    continue;
  fail:
    fs_fail(what, errno);
    return NULL;
  }
}

/* ---- service ------------------------------------------------------------------------------------
 * What a client of the guest sees, on the service NIC (the one output commit holds back, unlike the
 * probe's): every SVC_PERIOD_NS a datagram to the peer with the workload counter, and a TCP server
 * answering each fixed-size request with the counter at that moment. The sequence number lives in
 * guest RAM, so it rolls back with a restored checkpoint just like the counter. */
#define SVC_MAGIC "FTVS"
#define SVC_REQ_MAGIC "FTVQ"
#define SVC_RESP_MAGIC "FTVR"
#define SVC_VERSION 1
#define SVC_DATAGRAM_SIZE 40
#define SVC_REQ_SIZE 16
#define SVC_RESP_SIZE 40
#define SVC_PERIOD_NS 1000000LL
#define SVC_DEFAULT_PORT 7002
#define SVC_MAX_CLIENTS 16
#define SVC_CLIENT_BUF (SVC_REQ_SIZE * 64)

static int svc_udp_fd = -1, svc_listen_fd = -1;
static struct sockaddr_in svc_peer_addr;
static uint64_t svc_seq;

static void *svc_udp_main(void *arg) {
  (void)arg;
  /* Real-time below the clock probe's replies (50): a tick's wake-up must not wait behind the TCP
   * server or the kernel's network work under TCG's slow vCPU. It sleeps almost all the time. */
  struct sched_param fifo = { .sched_priority = 40 };
  if (pthread_setschedparam(pthread_self(), SCHED_FIFO, &fifo) != 0) fprintf(stderr, "probe: service datagrams: no SCHED_FIFO\n");
  uint8_t d[SVC_DATAGRAM_SIZE];
  uint64_t failures = 0;
  /* Ticks at start + k ms, missed ticks skipped (a paused or restored VM does not burst). */
  int64_t tick = now_ns(CLOCK_MONOTONIC);
  for (;;) {
    memset(d, 0, sizeof d);
    memcpy(d, SVC_MAGIC, 4);
    d[4] = SVC_VERSION;
    d[5] = 1; /* kind: counter */
    put_u64(d + 8, boot_id);
    put_u64(d + 16, ++svc_seq);
    put_u64(d + 24, __atomic_load_n(&workload_counter, __ATOMIC_RELAXED));
    put_u64(d + 32, (uint64_t)now_ns(CLOCK_REALTIME));
    /* unconnected on purpose: ICMP errors (no listener yet) are not reported back to the sender.
     * The console is slow under TCG: the first failure is printed, later ones only counted. */
    if (sendto(svc_udp_fd, d, sizeof d, 0, (struct sockaddr *)&svc_peer_addr, sizeof svc_peer_addr) < 0 && failures++ == 0)
      fprintf(stderr, "probe: service datagram: %s (further failures not reported)\n", strerror(errno));
    tick += SVC_PERIOD_NS;
    int64_t now = now_ns(CLOCK_MONOTONIC);
    if (tick <= now) tick += ((now - tick) / SVC_PERIOD_NS + 1) * SVC_PERIOD_NS;
    struct timespec ts = ns_to_ts(tick);
    while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &ts, NULL) == EINTR) {}
  }
  return NULL;
}

struct svc_client {
  int fd; /* -1: free slot */
  uint32_t have;
  uint8_t buf[SVC_CLIENT_BUF];
};

/* Answers every whole request in c->buf; -1 if the client must go (bad request, not reading). */
static int svc_answer(struct svc_client *c) {
  uint8_t resp[SVC_RESP_SIZE];
  uint32_t off = 0;
  for (; c->have - off >= SVC_REQ_SIZE; off += SVC_REQ_SIZE) {
    const uint8_t *q = c->buf + off;
    if (memcmp(q, SVC_REQ_MAGIC, 4) != 0 || q[4] != SVC_VERSION) {
      __atomic_add_fetch(&bad_packets, 1, __ATOMIC_RELAXED);
      return -1;
    }
    memset(resp, 0, sizeof resp);
    memcpy(resp, SVC_RESP_MAGIC, 4);
    resp[4] = SVC_VERSION;
    memcpy(resp + 8, q + 8, 8); /* request id, echoed */
    put_u64(resp + 16, __atomic_load_n(&workload_counter, __ATOMIC_RELAXED));
    put_u64(resp + 24, boot_id);
    put_u64(resp + 32, (uint64_t)now_ns(CLOCK_REALTIME));
    /* non-blocking: a client that stops reading loses its connection, never stalls the others */
    if (send(c->fd, resp, sizeof resp, MSG_NOSIGNAL) != (ssize_t)sizeof resp) return -1;
  }
  memmove(c->buf, c->buf + off, c->have - off);
  c->have -= off;
  return 0;
}

static void *svc_tcp_main(void *arg) {
  (void)arg;
  struct sched_param other = { 0 };
  pthread_setschedparam(pthread_self(), SCHED_OTHER, &other);
  static struct svc_client clients[SVC_MAX_CLIENTS];
  struct pollfd pfd[SVC_MAX_CLIENTS + 1];
  for (int i = 0; i < SVC_MAX_CLIENTS; i++) clients[i].fd = -1;
  for (;;) {
    pfd[0] = (struct pollfd){ .fd = svc_listen_fd, .events = POLLIN };
    for (int i = 0; i < SVC_MAX_CLIENTS; i++) pfd[i + 1] = (struct pollfd){ .fd = clients[i].fd, .events = POLLIN };
    if (poll(pfd, SVC_MAX_CLIENTS + 1, -1) < 0) {
      if (errno != EINTR) { perror("probe: service poll"); usleep(10000); }
      continue;
    }
    if (pfd[0].revents & POLLIN) {
      int fd = accept4(svc_listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
      int slot = -1;
      for (int i = 0; fd >= 0 && i < SVC_MAX_CLIENTS && slot < 0; i++) if (clients[i].fd < 0) slot = i;
      if (fd >= 0 && slot < 0) close(fd); /* full: the client sees the connection closed */
      else if (fd >= 0) {
        int on = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &on, sizeof on);
        clients[slot].fd = fd;
        clients[slot].have = 0;
      }
    }
    for (int i = 0; i < SVC_MAX_CLIENTS; i++) {
      struct svc_client *c = &clients[i];
      if (c->fd < 0 || !(pfd[i + 1].revents & (POLLIN | POLLHUP | POLLERR))) continue;
      ssize_t n = recv(c->fd, c->buf + c->have, sizeof c->buf - c->have, 0);
      if (n < 0 && (errno == EAGAIN || errno == EINTR)) continue;
      if (n > 0) c->have += (uint32_t)n;
      if (n <= 0 || svc_answer(c) < 0) {
        close(c->fd);
        c->fd = -1;
      }
    }
  }
  return NULL;
}

/* The service's sockets, made before the probe says it is ready: "ip:port" of the peer. */
static int svc_open(const char *ip, const char *peer, int port) {
  struct sockaddr_in local = { .sin_family = AF_INET }, *to = &svc_peer_addr;
  char host[64];
  const char *colon = strrchr(peer, ':');
  if (inet_pton(AF_INET, ip, &local.sin_addr) != 1) { fprintf(stderr, "probe: bad --svc-ip %s\n", ip); return -1; }
  if (!colon || (size_t)(colon - peer) >= sizeof host || atoi(colon + 1) <= 0 || atoi(colon + 1) > 65535) {
    fprintf(stderr, "probe: bad --svc-peer %s (want ADDR:PORT)\n", peer);
    return -1;
  }
  memcpy(host, peer, (size_t)(colon - peer));
  host[colon - peer] = 0;
  to->sin_family = AF_INET;
  if (inet_pton(AF_INET, host, &to->sin_addr) != 1) { fprintf(stderr, "probe: bad --svc-peer address %s\n", host); return -1; }
  to->sin_port = htons((uint16_t)atoi(colon + 1));
  svc_udp_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (svc_udp_fd < 0 || bind(svc_udp_fd, (struct sockaddr *)&local, sizeof local) < 0) {
    perror("probe: service udp socket");
    return -1;
  }
  svc_listen_fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  int on = 1;
  local.sin_port = htons((uint16_t)port);
  if (svc_listen_fd < 0 || setsockopt(svc_listen_fd, SOL_SOCKET, SO_REUSEADDR, &on, sizeof on) < 0 ||
      bind(svc_listen_fd, (struct sockaddr *)&local, sizeof local) < 0 || listen(svc_listen_fd, SVC_MAX_CLIENTS) < 0) {
    perror("probe: service tcp socket");
    return -1;
  }
  return 0;
}

static int start_thread(void *(*fn)(void *), size_t stack) {
  pthread_t th;
  pthread_attr_t attr;
  pthread_attr_init(&attr);
  pthread_attr_setstacksize(&attr, stack); /* the guest may be small */
  int err = pthread_create(&th, &attr, fn, NULL);
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
  case CMD_SPIN:
    if (arg != 0 && arg != 1) return ST_BAD_ARG;
    spin_set((uint32_t)arg);
    return ST_OK;
  }
  return ST_BAD_ARG; /* unreachable: unknown commands are dropped before execute() */
}

/*
 * Clients retry a lost STEP/SET/WORKLOAD/SPIN with the same id; running a step twice would corrupt a
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
         req[5] <= CMD_SPIN;
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
    /* completed before issued: completed <= issued always holds, and issued only grows */
    uint64_t completed = __atomic_load_n(&ring_completed, __ATOMIC_ACQUIRE);
    put_u64(reply + 72, completed);
    put_u64(reply + 64, __atomic_load_n(&ring_issued, __ATOMIC_ACQUIRE));
    put_u64(reply + 80, __atomic_load_n(&ring_write_ns, __ATOMIC_RELAXED));
    put_u64(reply + 88, __atomic_load_n(&fs_cycles, __ATOMIC_ACQUIRE));
    put_u64(reply + 96, __atomic_load_n(&fs_bytes, __ATOMIC_RELAXED));
    reply[104] = (uint8_t)__atomic_load_n(&ring_state, __ATOMIC_ACQUIRE);
    reply[105] = (uint8_t)__atomic_load_n(&fs_state, __ATOMIC_ACQUIRE);
    put_u16(reply + 106, (uint16_t)__atomic_load_n(&ring_slots, __ATOMIC_RELAXED));
    put_u16(reply + 108, (uint16_t)__atomic_load_n(&ring_errno, __ATOMIC_RELAXED));
    put_u16(reply + 110, (uint16_t)__atomic_load_n(&fs_errno, __ATOMIC_RELAXED));
    put_u32(reply + 112, __atomic_load_n(&ring_checks, __ATOMIC_RELAXED));
    put_u32(reply + 116, __atomic_load_n(&ring_violations, __ATOMIC_RELAXED));
    /* 56-bit count, then the flags byte over its top: "present" tells new hosts this probe has it */
    put_u64(reply + 120, __atomic_load_n(&spin_line.count, __ATOMIC_RELAXED) & SPIN_COUNT_MASK);
    reply[127] = (uint8_t)(SPIN_PRESENT | (__atomic_load_n(&spin_on, __ATOMIC_RELAXED) ? SPIN_ON : 0));
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
  const char *svc_ip = NULL, *svc_peer = NULL;
  int svc_port = SVC_DEFAULT_PORT;
  for (int i = 1; i < argc; i++) {
    if (!strcmp(argv[i], "--port") && i + 1 < argc) port = atoi(argv[++i]);
    else if (!strcmp(argv[i], "--workload") && i + 1 < argc) workload = strtol(argv[++i], NULL, 10);
    else if (!strcmp(argv[i], "--ready-file") && i + 1 < argc) ready_file = argv[++i];
    else if (!strcmp(argv[i], "--ring") && i + 1 < argc) ring_dev = argv[++i];
    else if (!strcmp(argv[i], "--fs-kib") && i + 1 < argc) {
      long kib = strtol(argv[++i], NULL, 10);
      if (kib < 1 || (uint64_t)kib * 1024 > FS_CURRENT_MAX_BYTES) { fprintf(stderr, "probe: --fs-kib must be 1..%u\n", FS_CURRENT_MAX_BYTES >> 10); return 2; }
      fs_current_bytes = (uint32_t)kib * 1024;
    }
    else if (!strcmp(argv[i], "--fs-dir") && i + 1 < argc) fs_dir = argv[++i];
    else if (!strcmp(argv[i], "--svc-ip") && i + 1 < argc) svc_ip = argv[++i];
    else if (!strcmp(argv[i], "--svc-peer") && i + 1 < argc) svc_peer = argv[++i];
    else if (!strcmp(argv[i], "--svc-port") && i + 1 < argc) svc_port = atoi(argv[++i]);
    else {
      fprintf(stderr, "usage: %s [--port N] [--workload MiBps] [--ready-file PATH] [--ring DEV] [--fs-dir DIR] [--fs-kib N]"
                      " [--svc-ip ADDR --svc-peer ADDR:PORT [--svc-port N]]\n", argv[0]);
      return 2;
    }
  }
  if (!svc_ip != !svc_peer || svc_port <= 0 || svc_port > 65535) { fprintf(stderr, "probe: --svc-ip and --svc-peer go together (and --svc-port is 1..65535)\n"); return 2; }
  if (workload < 0 || workload > MAX_MIBPS) { fprintf(stderr, "probe: bad --workload %ld\n", workload); return 2; }
  if (getrandom(&boot_id, sizeof boot_id, GRND_NONBLOCK) != sizeof boot_id)
    boot_id = (uint64_t)now_ns(CLOCK_MONOTONIC) ^ ((uint64_t)now_ns(CLOCK_REALTIME) << 20);

  int fd = open_socket(port);
  if (fd < 0) return 1;
  crc32_init();
  if (ring_dev && posix_memalign((void **)&ring_buf, SECTOR, SECTOR) != 0) { fprintf(stderr, "probe: ring buffer\n"); return 1; }
  /* Keep the reply path free of page faults and ahead of everything else in the guest. MCL_CURRENT
   * only, and before the workload thread exists: its buffer is meant to be dirtied page by page,
   * and locked it would be populated whole at once. */
  if (mlockall(MCL_CURRENT) < 0) perror("probe: mlockall");
  __atomic_store_n(&workload_mibps, (uint32_t)workload, __ATOMIC_RELAXED);
  if (start_thread(workload_main, 256 << 10) < 0) return 1;
  if (start_thread(spin_main, 64 << 10) < 0) return 1; /* asleep until a SPIN 1 request */
  /* Each disk workload in its own thread: a slow disk must never delay a clock reply. */
  if (ring_dev) {
    __atomic_store_n(&ring_state, DISK_RUNNING, __ATOMIC_RELEASE);
    if (start_thread(ring_main, 256 << 10) < 0) return 1;
  }
  if (fs_dir) {
    __atomic_store_n(&fs_state, DISK_RUNNING, __ATOMIC_RELEASE);
    if (start_thread(fs_main, 256 << 10) < 0) return 1;
  }
  /* A service that cannot open its sockets is reported and left out: the clock probe still runs. */
  int svc = svc_ip && svc_open(svc_ip, svc_peer, svc_port) == 0;
  if (svc && (start_thread(svc_udp_main, 64 << 10) < 0 || start_thread(svc_tcp_main, 64 << 10) < 0)) return 1;
  struct sched_param fifo = { .sched_priority = 50 };
  if (sched_setscheduler(0, SCHED_FIFO, &fifo) < 0) perror("probe: SCHED_FIFO");
  if (ready_file) {
    FILE *f = fopen(ready_file, "w");
    if (f) fclose(f);
  }
  fprintf(stderr, "probe: listening on udp 0.0.0.0:%d, workload %ld MiB/s, ring %s, fs %s\n", port, workload,
          ring_dev ? ring_dev : "none", fs_dir ? fs_dir : "none");
  if (svc) fprintf(stderr, "probe: service on tcp %s:%d, counter datagrams to %s every %lld us\n", svc_ip, svc_port, svc_peer, SVC_PERIOD_NS / 1000);
  else if (svc_ip) fprintf(stderr, "probe: service on %s FAILED to start\n", svc_ip);
  serve(fd);
  return 0;
}
