/* Ground truth for continuous profiling's checkers: a process that uses PERCENT % of one core,
 * all of it in duty_cycle_burn, and has exactly 1 + IDLE_THREADS threads.
 * The main thread works in periods of 100 ms: it spins until its own CPU clock
 * (CLOCK_THREAD_CPUTIME_ID) has advanced PERCENT ms, then sleeps to the end of the period. Counting
 * its own CPU time, not wall time, keeps its share when it is preempted, as long as the host has
 * room for it. PERCENT 100 never sleeps. The IDLE_THREADS other threads only sleep.
 * Once the threads exist it prints "ready" on stdout; it exits after SECONDS.
 * Usage: duty_cycle PERCENT IDLE_THREADS SECONDS [TAG...] (tags, ignored, let a test's host rule
 * match this process alone) */
#include <pthread.h>
#include <stdio.h>
#include "common.h"

#define PERIOD_NS 100000000LL

__attribute__((noinline)) void *idle_thread(void *unused) {
    (void)unused;
    for (;;) pause();
    return NULL;
}

/* Spins until this thread has used `busy_ns` more CPU time. */
__attribute__((noinline)) void duty_cycle_burn(int64_t busy_ns) {
    int64_t end = clock_ns(CLOCK_THREAD_CPUTIME_ID) + busy_ns;
    while (clock_ns(CLOCK_THREAD_CPUTIME_ID) < end) {
        for (int i = 0; i < 2000; i++) workload_sink += (uint64_t)i * 7;
    }
}

int main(int argc, char **argv) {
    if (argc < 4) return 2;
    int percent = atoi(argv[1]);
    int idle_threads = atoi(argv[2]);
    double seconds = atof(argv[3]);
    if (percent < 0 || percent > 100 || idle_threads < 0 || idle_threads > 1000) return 2;
    for (int i = 0; i < idle_threads; i++) {
        pthread_t id;
        if (pthread_create(&id, NULL, idle_thread, NULL) != 0) return 3;
    }
    printf("ready\n");
    fflush(stdout);
    int64_t busy_ns = PERIOD_NS * percent / 100;
    int64_t start = clock_ns(CLOCK_MONOTONIC);
    int64_t end = start + (int64_t)(seconds * 1e9);
    int64_t next = start;
    while (clock_ns(CLOCK_MONOTONIC) < end) {
        if (busy_ns > 0) duty_cycle_burn(busy_ns);
        next += PERIOD_NS;
        int64_t now = clock_ns(CLOCK_MONOTONIC);
        if (next > now) {
            int64_t wait = next - now;
            struct timespec delay = {wait / 1000000000LL, wait % 1000000000LL};
            nanosleep(&delay, NULL);
        } else {
            /* Fell behind (a busy host): start afresh rather than catch up. */
            next = now;
        }
    }
    return 0;
}
