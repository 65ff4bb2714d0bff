/* Ground truth: recurse() calls itself DEPTH times and burns CPU at the bottom, for SECONDS
 * in all. With DEPTH above the deepest user stack the agent records (127 frames), every
 * sample's user stack is cut at its root end: the profile marks it `[truncated]`.
 * Usage: deep_recursion SECONDS DEPTH */
#include "common.h"

__attribute__((noinline)) int recurse(int depth, double seconds) {
    if (depth == 0) {
        burn(seconds);
        return 0;
    }
    return recurse(depth - 1, seconds) + 1;
}

int main(int argc, char **argv) {
    double end = now_seconds() + arg_seconds(argc, argv, 1, 5.0);
    int depth = argc > 2 ? atoi(argv[2]) : 200;
    while (now_seconds() < end) recurse(depth, 0.01);
    return 0;
}
