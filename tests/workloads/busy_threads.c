/* Ground truth: THREADS threads that never block, each in spin_thread.
 * Usage: busy_threads THREADS SECONDS */
#include <pthread.h>
#include "common.h"

static double run_seconds;

__attribute__((noinline)) void *spin_thread(void *unused) {
    (void)unused;
    burn(run_seconds);
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 2;
    run_seconds = arg_seconds(argc, argv, 2, 5.0);
    pthread_t ids[64];
    if (threads < 1 || threads > 64) return 2;
    for (int i = 0; i < threads; i++) pthread_create(&ids[i], NULL, spin_thread, NULL);
    for (int i = 0; i < threads; i++) pthread_join(ids[i], NULL);
    return 0;
}
