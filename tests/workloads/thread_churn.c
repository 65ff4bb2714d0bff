/* Ground truth: many short-lived threads. main creates THREADS threads (default 100), all at
 * once; each calls churn_sleep() SLEEPS times (default 3), each an inline nanosleep system call
 * (an `asm` `syscall`, so frame-pointer unwinding keeps the function) of MS milliseconds
 * (default 5), then exits; main joins them all and exits. An off-CPU profile covering the run
 * holds THREADS × SLEEPS voluntary switches in stacks containing churn_sleep (plus a rare
 * preemption), for about THREADS × SLEEPS × MS ms off CPU (plus wake-up latency). Every thread
 * is created and ends inside the run: per-thread state of a profiler must not outlive it.
 * Usage: thread_churn [THREADS] [SLEEPS] [MS] [START]
 *   START "-": wait for a byte on stdin before creating the threads; a number: wait that many
 *   ms first; absent: start at once.
 * At exit it prints "threads T sleeps_per_thread S sleep_ms M". */
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "common.h"

static long sleeps_per_thread = 3, sleep_ms = 5;

__attribute__((noinline)) void churn_sleep(long ms) {
    raw_nanosleep_ms(ms);
}

__attribute__((noinline)) void *churn_thread(void *unused) {
    (void)unused;
    for (long i = 0; i < sleeps_per_thread; i++) churn_sleep(sleep_ms);
    return NULL;
}

int main(int argc, char **argv) {
    long threads = argc > 1 ? atol(argv[1]) : 100;
    if (argc > 2) sleeps_per_thread = atol(argv[2]);
    if (argc > 3) sleep_ms = atol(argv[3]);
    if (threads < 1 || threads > 10000 || sleeps_per_thread < 0 || sleep_ms < 0) return 2;
    wait_for_start(argc, argv, 4);
    pthread_t *ids = calloc((size_t)threads, sizeof *ids);
    if (!ids) return 2;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setstacksize(&attr, 64 * 1024);
    for (long i = 0; i < threads; i++)
        if (pthread_create(&ids[i], &attr, churn_thread, NULL) != 0) return 2;
    for (long i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    printf("threads %ld sleeps_per_thread %ld sleep_ms %ld\n", threads, sleeps_per_thread,
           sleep_ms);
    return 0;
}
