/*
 * Cross-vCPU clock monotonicity checker for kvm-check.ts (runs in the probe guest, uploaded
 * through the guest agent; static, no library beyond libc).
 *
 *   kvm-check-mono <seconds>     (ends early, with its report, on SIGTERM)
 *
 * One thread per online CPU, each pinned to its CPU, reads CLOCK_MONOTONIC in a loop. A shared
 * value holds the largest reading published so far; each thread loads it *before* reading the
 * clock (seq_cst, and the vDSO orders its TSC read with lfence), so a reading below the loaded
 * value went backwards across CPUs: some CPU had already seen a later time. Also counts
 * CLOCK_REALTIME going backwards on one CPU (a clock step back), and the largest gap between two
 * readings of one thread (the pauses show up there, as they should).
 *
 * Prints one line: {"cpus":N,"reads":R,"backwards":B,"maxBackNs":M,"realtimeBackwards":Q,
 * "maxGapNs":G,"seconds":S}; exit 0 when it ran (the host judges the numbers), 2 on bad usage.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>
#include <unistd.h>

#define MAX_CPUS 64

static _Atomic int64_t published;
static _Atomic int stop;
static _Atomic uint64_t backwards, realtime_backwards, reads;
static _Atomic int64_t max_back_ns, max_gap_ns;
/* Self-test of the checker: CPU 1 reads this far behind (env KVM_CHECK_SKEW_NS) and must be caught. */
static int64_t skew_ns;

static int64_t now_ns(clockid_t clock)
{
    struct timespec ts;

    clock_gettime(clock, &ts);
    return (int64_t)ts.tv_sec * 1000000000 + ts.tv_nsec;
}

static void on_term(int sig)
{
    (void)sig;
    atomic_store(&stop, 1);
}

static void atomic_max(_Atomic int64_t *target, int64_t value)
{
    int64_t seen = atomic_load(target);

    while (value > seen && !atomic_compare_exchange_weak(target, &seen, value)) {
    }
}

static void *reader(void *arg)
{
    long cpu = (long)arg;
    cpu_set_t set;
    int64_t last = 0, last_real = 0;
    uint64_t n = 0;

    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    if (sched_setaffinity(0, sizeof(set), &set) != 0) {
        fprintf(stderr, "cannot pin to cpu %ld\n", cpu);
    }
    while (!atomic_load(&stop)) {
        int64_t before = atomic_load(&published);
        int64_t t = now_ns(CLOCK_MONOTONIC) - (cpu == 1 ? skew_ns : 0);
        int64_t real = now_ns(CLOCK_REALTIME);

        if (t < before) {
            atomic_fetch_add(&backwards, 1);
            atomic_max(&max_back_ns, before - t);
        }
        if (real < last_real) {
            atomic_fetch_add(&realtime_backwards, 1);
        }
        if (last && t - last > atomic_load(&max_gap_ns)) {
            atomic_max(&max_gap_ns, t - last);
        }
        atomic_max(&published, t);
        last = t;
        last_real = real;
        n++;
    }
    atomic_fetch_add(&reads, n);
    return NULL;
}

int main(int argc, char **argv)
{
    pthread_t threads[MAX_CPUS];
    long cpus = sysconf(_SC_NPROCESSORS_ONLN);
    double seconds = argc == 2 ? atof(argv[1]) : 0;
    int64_t start;

    if (seconds <= 0 || seconds > 3600) {
        fprintf(stderr, "usage: %s <seconds, 0 < s <= 3600>\n", argv[0]);
        return 2;
    }
    if (cpus < 1) {
        cpus = 1;
    }
    if (cpus > MAX_CPUS) {
        cpus = MAX_CPUS;
    }
    /* the threads inherit the mask: the signal goes to main, whose sleep it cuts short */
    sigset_t term;
    sigemptyset(&term);
    sigaddset(&term, SIGTERM);
    pthread_sigmask(SIG_BLOCK, &term, NULL);
    signal(SIGTERM, on_term);
    if (getenv("KVM_CHECK_SKEW_NS")) {
        skew_ns = atoll(getenv("KVM_CHECK_SKEW_NS"));
    }
    start = now_ns(CLOCK_MONOTONIC);
    for (long i = 0; i < cpus; i++) {
        pthread_create(&threads[i], NULL, reader, (void *)i);
    }
    /* sleeps in CLOCK_MONOTONIC: a pause the guest did not see stretches the run, as it should */
    pthread_sigmask(SIG_UNBLOCK, &term, NULL);
    struct timespec ts = { (time_t)seconds, (long)((seconds - (time_t)seconds) * 1e9) };
    while (!atomic_load(&stop) && nanosleep(&ts, &ts) != 0) {
    }
    atomic_store(&stop, 1);
    for (long i = 0; i < cpus; i++) {
        pthread_join(threads[i], NULL);
    }
    printf("{\"cpus\":%ld,\"reads\":%llu,\"backwards\":%llu,\"maxBackNs\":%lld,"
           "\"realtimeBackwards\":%llu,\"maxGapNs\":%lld,\"seconds\":%.3f}\n",
           cpus, (unsigned long long)reads, (unsigned long long)backwards,
           (long long)max_back_ns, (unsigned long long)realtime_backwards,
           (long long)max_gap_ns, (now_ns(CLOCK_MONOTONIC) - start) / 1e9);
    return 0;
}
