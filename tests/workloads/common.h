/* Shared by the test workloads: a monotonic clock and a CPU burner the compiler cannot elide.
 * Workloads are built with -O0 -fno-omit-frame-pointer: GCC drops the frame of leaf functions at
 * any optimization level, even with -mno-omit-leaf-frame-pointer, which hides their callers. */
#include <stdint.h>
#include <stdlib.h>
#include <time.h>

static volatile uint64_t workload_sink;

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
