/* Ground truth: a thread that spends most of its time in write(2) to /dev/null, issued from
 * make_syscalls with an inline `syscall` instruction (libc here has no frame pointers, so a
 * libc wrapper would hide the caller). Usage: syscalls SECONDS */
#include <fcntl.h>
#include "common.h"

__attribute__((noinline)) void make_syscalls(int fd, const char *buffer, long length) {
    for (int i = 0; i < 1000; i++) {
        long result;
        __asm__ volatile("syscall"
                         : "=a"(result)
                         : "a"(1L /* SYS_write */), "D"((long)fd), "S"(buffer), "d"(length)
                         : "rcx", "r11", "memory");
        workload_sink += (uint64_t)result;
    }
}

int main(int argc, char **argv) {
    static char buffer[64 * 1024];
    int fd = open("/dev/zero", O_WRONLY);
    if (fd < 0) return 2;
    double end = now_seconds() + arg_seconds(argc, argv, 1, 5.0);
    while (now_seconds() < end) make_syscalls(fd, buffer, sizeof buffer);
    return 0;
}
