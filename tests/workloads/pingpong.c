/* Ground truth at a high context-switch rate: the process pins itself to CPU 0, then two
 * threads bounce one byte over two pipes for SECONDS: ping_bounce() writes to pipe A and reads
 * pipe B, pong_bounce() reads A and writes B, with inline read/write system calls (an `asm`
 * `syscall`, so frame-pointer unwinding keeps the functions: Debian's libc has none). Each
 * bounce function holds its thread's whole measured loop, clock checks included, so every
 * context switch of that thread during the measurement happens in a stack containing it.
 * Each thread measures its own truth over its loop, as deltas from just before to just after:
 *   off_cpu_ns = wall time (CLOCK_MONOTONIC) − its CPU time (CLOCK_THREAD_CPUTIME_ID)
 *   switches   = ru_nvcsw + ru_nivcsw of getrusage(RUSAGE_THREAD)
 * Usage: pingpong SECONDS [START]
 *   START "-": wait for a byte on stdin before the loops (a test writes it once the profiler is
 *   attached, so the profile covers exactly the measured loops); a number: wait that many ms
 *   first; absent: start at once. Before the start the threads wait on a barrier.
 * At exit it prints exactly (`cargo xtask bench offcpu` reads the first line):
 *   round_trips N seconds S
 *   thread ping off_cpu_ns X switches Y
 *   thread pong off_cpu_ns X switches Y
 * S being ping's measured loop time. */
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include "common.h"

#define RAW_SYSCALL3(result, number, a, b, c)                                                  \
    __asm__ volatile("syscall"                                                                 \
                     : "=a"(result)                                                            \
                     : "a"((long)(number)), "D"((long)(a)), "S"((long)(b)), "d"((long)(c))     \
                     : "rcx", "r11", "memory")

struct truth {
    int64_t off_cpu_ns;
    long switches;
};

static int ping_to_pong[2], pong_to_ping[2];
static double run_seconds;
static long round_trips;
static double ping_seconds;
static struct truth ping_truth, pong_truth;
static pthread_barrier_t start_barrier;

/* Bounces until `seconds` have passed, then sends 'q' and waits for its echo. */
__attribute__((noinline)) long ping_bounce(double seconds) {
    double end = now_seconds() + seconds;
    long trips = 0;
    char byte = 'x';
    long result;
    for (;;) {
        int last = now_seconds() >= end;
        byte = last ? 'q' : 'x';
        RAW_SYSCALL3(result, 1 /* SYS_write */, ping_to_pong[1], &byte, 1);
        if (result != 1) exit(5);
        RAW_SYSCALL3(result, 0 /* SYS_read */, pong_to_ping[0], &byte, 1);
        if (result != 1) exit(5);
        trips++;
        if (last) return trips;
    }
}

/* Echoes every byte until it echoed 'q'. */
__attribute__((noinline)) void pong_bounce(void) {
    char byte;
    long result;
    do {
        RAW_SYSCALL3(result, 0 /* SYS_read */, ping_to_pong[0], &byte, 1);
        if (result != 1) exit(5);
        RAW_SYSCALL3(result, 1 /* SYS_write */, pong_to_ping[1], &byte, 1);
        if (result != 1) exit(5);
    } while (byte != 'q');
}

static void measure_start(struct rusage *usage, int64_t *cpu, int64_t *wall) {
    getrusage(RUSAGE_THREAD, usage);
    *cpu = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    *wall = clock_ns(CLOCK_MONOTONIC);
}

static struct truth measure_end(const struct rusage *before, int64_t cpu0, int64_t wall0) {
    int64_t wall1 = clock_ns(CLOCK_MONOTONIC);
    int64_t cpu1 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    struct rusage after;
    getrusage(RUSAGE_THREAD, &after);
    struct truth truth = {
        (wall1 - wall0) - (cpu1 - cpu0),
        (after.ru_nvcsw - before->ru_nvcsw) + (after.ru_nivcsw - before->ru_nivcsw),
    };
    return truth;
}

static void *ping_thread(void *unused) {
    (void)unused;
    pthread_barrier_wait(&start_barrier);
    struct rusage usage;
    int64_t cpu0, wall0;
    measure_start(&usage, &cpu0, &wall0);
    round_trips = ping_bounce(run_seconds);
    ping_truth = measure_end(&usage, cpu0, wall0);
    ping_seconds = (double)(clock_ns(CLOCK_MONOTONIC) - wall0) / 1e9;
    return NULL;
}

static void *pong_thread(void *unused) {
    (void)unused;
    pthread_barrier_wait(&start_barrier);
    struct rusage usage;
    int64_t cpu0, wall0;
    measure_start(&usage, &cpu0, &wall0);
    pong_bounce();
    pong_truth = measure_end(&usage, cpu0, wall0);
    return NULL;
}

int main(int argc, char **argv) {
    run_seconds = arg_seconds(argc, argv, 1, 3.0);
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(0, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) return 2;
    if (pipe(ping_to_pong) != 0 || pipe(pong_to_ping) != 0) return 2;
    pthread_barrier_init(&start_barrier, NULL, 3);
    pthread_t ping, pong;
    pthread_create(&pong, NULL, pong_thread, NULL);
    pthread_create(&ping, NULL, ping_thread, NULL);
    wait_for_start(argc, argv, 2);
    pthread_barrier_wait(&start_barrier);
    pthread_join(ping, NULL);
    pthread_join(pong, NULL);
    printf("round_trips %ld seconds %.6f\n", round_trips, ping_seconds);
    printf("thread ping off_cpu_ns %lld switches %ld\n", (long long)ping_truth.off_cpu_ns,
           ping_truth.switches);
    printf("thread pong off_cpu_ns %lld switches %ld\n", (long long)pong_truth.off_cpu_ns,
           pong_truth.switches);
    return 0;
}
