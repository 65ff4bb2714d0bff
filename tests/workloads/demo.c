/* The README's demo: a toy request handler whose time splits between parsing, hashing and
 * logging (the last through write(2), so the flame graph shows kernel frames too; issued with
 * an inline `syscall` because Debian's libc keeps no frame pointers and would hide write_log).
 * Usage: demo SECONDS */
#include <fcntl.h>
#include "common.h"

__attribute__((noinline)) void parse_request(void) { burn(0.00025); }

__attribute__((noinline)) uint64_t checksum_block(uint64_t seed) {
    uint64_t hash = seed;
    for (int i = 0; i < 200000; i++) hash = (hash ^ (uint64_t)i) * 0x100000001b3ULL;
    return hash;
}

__attribute__((noinline)) void compute_checksum(void) {
    workload_sink += checksum_block(workload_sink);
}

__attribute__((noinline)) void write_log(int fd) {
    static char line[64];
    for (int i = 0; i < 1000; i++) {
        long written;
        __asm__ volatile("syscall"
                         : "=a"(written)
                         : "a"(1L /* SYS_write */), "D"((long)fd), "S"(line), "d"(sizeof line)
                         : "rcx", "r11", "memory");
        workload_sink += (uint64_t)written;
    }
}

__attribute__((noinline)) void handle_request(int log_fd) {
    parse_request();
    compute_checksum();
    write_log(log_fd);
}

int main(int argc, char **argv) {
    int log_fd = open("/dev/null", O_WRONLY);
    if (log_fd < 0) return 2;
    double end = now_seconds() + arg_seconds(argc, argv, 1, 10.0);
    while (now_seconds() < end) handle_request(log_fd);
    return 0;
}
