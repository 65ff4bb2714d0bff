/* Ground truth: one thread (main) that never blocks: spin_forever() burns CPU for SECONDS. All
 * of its off-CPU time is preemption (an off-CPU profile puts it under a `[preempted]` leaf);
 * it has none at all when nothing competes for its CPU. The test adds competing load on the
 * same CPU (pin with CPU), so it is preempted for a known share of the time: with one
 * competing busy thread pinned there too, about half of the wall time.
 * Usage: cpu_bound SECONDS [START [CPU]]
 *   START "-": wait for a byte on stdin before spinning (a test writes it once the profiler is
 *   attached); a number: wait that many ms first; "0": start at once.
 *   CPU: pin to that CPU (sched_setaffinity) before spinning.
 * At exit it prints its own truth over spin_forever (deltas from just before to just after):
 *   "spin_seconds S off_cpu_ns X voluntary V involuntary I"
 * off_cpu_ns = wall time − thread CPU time (CLOCK_THREAD_CPUTIME_ID); V and I are
 * getrusage(RUSAGE_THREAD) ru_nvcsw and ru_nivcsw. */
#define _GNU_SOURCE
#include <sched.h>
#include <stdio.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>
#include "common.h"

__attribute__((noinline)) void spin_forever(double seconds) {
    double end = now_seconds() + seconds;
    while (now_seconds() < end) {
        for (int i = 0; i < 2000; i++) workload_sink += (uint64_t)i * 7;
    }
}

int main(int argc, char **argv) {
    double seconds = arg_seconds(argc, argv, 1, 5.0);
    if (argc > 3) {
        cpu_set_t set;
        CPU_ZERO(&set);
        CPU_SET(atoi(argv[3]), &set);
        if (sched_setaffinity(0, sizeof set, &set) != 0) return 2;
    }
    wait_for_start(argc, argv, 2);
    struct rusage before, after;
    getrusage(RUSAGE_THREAD, &before);
    int64_t cpu0 = clock_ns(CLOCK_THREAD_CPUTIME_ID), wall0 = clock_ns(CLOCK_MONOTONIC);
    spin_forever(seconds);
    int64_t wall1 = clock_ns(CLOCK_MONOTONIC), cpu1 = clock_ns(CLOCK_THREAD_CPUTIME_ID);
    getrusage(RUSAGE_THREAD, &after);
    printf("spin_seconds %.6f off_cpu_ns %lld voluntary %ld involuntary %ld\n",
           (double)(wall1 - wall0) / 1e9, (long long)((wall1 - wall0) - (cpu1 - cpu0)),
           after.ru_nvcsw - before.ru_nvcsw, after.ru_nivcsw - before.ru_nivcsw);
    return 0;
}
