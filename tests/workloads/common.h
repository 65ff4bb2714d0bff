/* Shared by the test workloads: a monotonic clock and a CPU burner the compiler cannot elide.
 * Workloads are built with -O0 -fno-omit-frame-pointer: GCC drops the frame of leaf functions at
 * any optimization level, even with -mno-omit-leaf-frame-pointer, which hides their callers. */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

static volatile uint64_t workload_sink;

static int64_t clock_ns(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return (int64_t)t.tv_sec * 1000000000 + t.tv_nsec;
}

/* nanosleep(2) as a `syscall` instruction inlined into the caller: Debian's libc has no frame
 * pointers, so through its wrapper the caller's own frame would not be unwound. */
__attribute__((always_inline)) static inline void raw_nanosleep_ms(long ms) {
    struct timespec request = {ms / 1000, (ms % 1000) * 1000000L};
    long result;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(35L /* SYS_nanosleep */), "D"(&request), "S"(0L)
                     : "rcx", "r11", "memory");
    if (result != 0) exit(4);
}

static double now_seconds(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

/* Burns CPU for `seconds`, checking the clock every few microseconds. */
__attribute__((noinline)) static void burn(double seconds) {
    double end = now_seconds() + seconds;
    while (now_seconds() < end) {
        for (int i = 0; i < 2000; i++) workload_sink += (uint64_t)i * 7;
    }
}

static double arg_seconds(int argc, char **argv, int index, double fallback) {
    return argc > index ? atof(argv[index]) : fallback;
}

/* Waits for the start signal given as argument `index`: "-" waits for a byte on stdin (a test
 * writes it once the profiler is attached), a number waits that many ms, none starts at once. */
__attribute__((noinline)) static void wait_for_start(int argc, char **argv, int index) {
    if (argc <= index) return;
    if (strcmp(argv[index], "-") == 0) {
        char byte;
        if (read(0, &byte, 1) != 1) exit(3);
        return;
    }
    long ms = atol(argv[index]);
    struct timespec delay = {ms / 1000, (ms % 1000) * 1000000L};
    nanosleep(&delay, NULL);
}
