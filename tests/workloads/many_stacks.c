/* Ground truth: burns CPU at recursion depths 1..DEPTHS in turn, so that its samples spread
 * over about DEPTHS × (the instructions of burn's loop) distinct user stacks: more than small
 * stack maps hold in one drain interval.
 * Usage: many_stacks SECONDS DEPTHS */
#include "common.h"

__attribute__((noinline)) int descend(int depth) {
    if (depth == 0) {
        burn(0.0005);
        return 0;
    }
    return descend(depth - 1) + 1;
}

int main(int argc, char **argv) {
    double end = now_seconds() + arg_seconds(argc, argv, 1, 5.0);
    int depths = argc > 2 ? atoi(argv[2]) : 100;
    while (now_seconds() < end)
        for (int depth = 1; depth <= depths; depth++) descend(depth);
    return 0;
}
