/* Ground truth: one thread (main) calls sleep_in_named_function() K times; each call makes one
 * inline nanosleep system call (an `asm` `syscall`, so frame-pointer unwinding keeps the
 * function: Debian's libc has no frame pointers) of M milliseconds. An off-CPU profile covering
 * the run therefore holds, in stacks containing sleep_in_named_function, K voluntary context
 * switches (plus a rare preemption) and K × M ms off CPU (plus timer slack and wake-up latency,
 * ~0.1 ms per sleep). Nothing else in the run blocks once the sleeps start.
 * Usage: sleeper K M_MS [START]
 *   START "-": wait for a byte on stdin before the first sleep (a test writes it once the
 *   profiler is attached, so the profile covers every sleep); a number: wait that many ms
 *   (in wait_for_start, through libc); absent: start at once.
 * At exit it prints "sleeps K sleep_ms M slept_ns X", X being the wall time measured around
 * the K system calls. */
#include <stdio.h>
#include <string.h>
#include <unistd.h>
#include "common.h"

__attribute__((noinline)) void sleep_in_named_function(long ms) {
    raw_nanosleep_ms(ms);
}

int main(int argc, char **argv) {
    long sleeps = argc > 1 ? atol(argv[1]) : 50;
    long sleep_ms = argc > 2 ? atol(argv[2]) : 20;
    if (sleeps < 1 || sleep_ms < 0) return 2;
    wait_for_start(argc, argv, 3);
    double start = now_seconds();
    for (long i = 0; i < sleeps; i++) sleep_in_named_function(sleep_ms);
    double slept = now_seconds() - start;
    printf("sleeps %ld sleep_ms %ld slept_ns %.0f\n", sleeps, sleep_ms, slept * 1e9);
    return 0;
}
