/* Ground truth: one thread spends its CPU in hot_a and hot_b in the ratio 3:1.
 * Usage: cpu_split SECONDS */
#include "common.h"

__attribute__((noinline)) void hot_a(void) { burn(0.003); }
__attribute__((noinline)) void hot_b(void) { burn(0.001); }

int main(int argc, char **argv) {
    double end = now_seconds() + arg_seconds(argc, argv, 1, 5.0);
    while (now_seconds() < end) {
        hot_a();
        hot_b();
    }
    return 0;
}
