/* The README's demo: a toy request handler whose time splits between parsing, hashing and
 * logging (the last through write(2), so the flame graph shows kernel frames too).
 * Usage: demo SECONDS */
#include <fcntl.h>
#include <unistd.h>
#include "common.h"

__attribute__((noinline)) void parse_request(void) { burn(0.0004); }

__attribute__((noinline)) uint64_t checksum_block(uint64_t seed) {
    uint64_t hash = seed;
    for (int i = 0; i < 200000; i++) hash = (hash ^ (uint64_t)i) * 0x100000001b3ULL;
    return hash;
}

__attribute__((noinline)) void compute_checksum(void) {
    workload_sink += checksum_block(workload_sink);
}

__attribute__((noinline)) void write_log(int fd) {
    static char line[16 * 1024];
    for (int i = 0; i < 40; i++) workload_sink += (uint64_t)write(fd, line, sizeof line);
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
