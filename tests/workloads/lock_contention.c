/* Ground truth: THREADS threads (default 4, the main thread being one of them) contend on one
 * lock for SECONDS. The lock is a futex word (Drepper's "mutex2": 0 free, 1 locked, 2 locked
 * with waiters) whose waiting is an inline FUTEX_WAIT_PRIVATE system call in wait_for_lock()
 * (an `asm` `syscall`, so frame-pointer unwinding keeps the function); unlocking wakes one
 * waiter with FUTEX_WAKE_PRIVATE, which never blocks. Each holder spins 200 µs inside the lock
 * (in critical_section) and 20 µs outside it. So the lock is busy all the time and every thread
 * but the holder waits in wait_for_lock: practically all of the process's voluntary off-CPU
 * time (everything but thread start and the final joins) is in stacks
 * worker → lock_acquire → wait_for_lock → futex kernel frames. Off-CPU time that is
 * preemption (more threads than CPUs spinning) carries no voluntary blocking.
 * Usage: lock_contention [THREADS] [SECONDS]
 * At exit it prints "acquisitions N contended C". */
#include <pthread.h>
#include <stdio.h>
#include "common.h"

#define FUTEX_WAIT_PRIVATE 128
#define FUTEX_WAKE_PRIVATE 129

static int lock_word;
static double end_time;
static long acquisitions, contended;

/* futex(2) as a `syscall` instruction inlined into the caller, so that frame-pointer unwinding
 * keeps the calling function (Debian's libc has no frame pointers). */
__attribute__((always_inline)) static inline void raw_futex(int *word, long op, long value) {
    long result;
    register long timeout __asm__("r10") = 0;
    __asm__ volatile("syscall"
                     : "=a"(result)
                     : "a"(202L /* SYS_futex */), "D"(word), "S"(op), "d"(value), "r"(timeout)
                     : "rcx", "r11", "memory");
    (void)result;
}

__attribute__((noinline)) void wait_for_lock(int *word) {
    int seen = 2;
    while ((seen = __atomic_exchange_n(word, 2, __ATOMIC_ACQUIRE)) != 0) {
        raw_futex(word, FUTEX_WAIT_PRIVATE, 2);
    }
}

__attribute__((noinline)) void lock_acquire(int *word) {
    int expected = 0;
    if (__atomic_compare_exchange_n(word, &expected, 1, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return;
    __atomic_fetch_add(&contended, 1, __ATOMIC_RELAXED);
    wait_for_lock(word);
}

__attribute__((noinline)) void lock_release(int *word) {
    if (__atomic_fetch_sub(word, 1, __ATOMIC_RELEASE) != 1) {
        __atomic_store_n(word, 0, __ATOMIC_RELEASE);
        raw_futex(word, FUTEX_WAKE_PRIVATE, 1);
    }
}

__attribute__((noinline)) void critical_section(void) {
    burn(0.0002);
    acquisitions++;
}

__attribute__((noinline)) void *worker(void *unused) {
    (void)unused;
    while (now_seconds() < end_time) {
        lock_acquire(&lock_word);
        critical_section();
        lock_release(&lock_word);
        burn(0.00002);
    }
    return NULL;
}

int main(int argc, char **argv) {
    int threads = argc > 1 ? atoi(argv[1]) : 4;
    if (threads < 1 || threads > 64) return 2;
    end_time = now_seconds() + arg_seconds(argc, argv, 2, 5.0);
    pthread_t ids[64];
    for (int i = 1; i < threads; i++) pthread_create(&ids[i], NULL, worker, NULL);
    worker(NULL);
    for (int i = 1; i < threads; i++) pthread_join(ids[i], NULL);
    printf("acquisitions %ld contended %ld\n", acquisitions, contended);
    return 0;
}
