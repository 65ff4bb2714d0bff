/* Ground truth: forks CHILDREN processes one after another (no exec); each burns CPU for MS
 * milliseconds in child_burns() and exits, while the parent waits for it. Nearly every sample
 * of a child (all but its fork and exit paths) is under child_burns. A child lives far less
 * than a drain interval: only a snapshot taken while it lives can symbolize it.
 * Usage: fork_churn CHILDREN MS [START]
 * At exit it prints "children C". */
#include <stdio.h>
#include <sys/wait.h>
#include "common.h"

__attribute__((noinline)) void child_burns(double seconds) {
    burn(seconds);
}

int main(int argc, char **argv) {
    long children = argc > 1 ? atol(argv[1]) : 200;
    double seconds = arg_seconds(argc, argv, 2, 40) / 1000.0;
    wait_for_start(argc, argv, 3);
    for (long i = 0; i < children; i++) {
        pid_t child = fork();
        if (child < 0) return 3;
        if (child == 0) {
            child_burns(seconds);
            _exit(0);
        }
        int status;
        if (waitpid(child, &status, 0) != child || status != 0) return 4;
    }
    printf("children %ld\n", children);
    return 0;
}
