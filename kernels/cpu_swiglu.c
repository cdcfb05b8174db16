/* SwiGLU's gate on the CPU (float32): out[t, i] = silu(x[t, i]) * x[t, half + i], silu(g) = g / (1 + exp(-g)),
 * for the fused gate and up projection's output x [tokens, 2 * half]. One pass in place of torch's split, SiLU
 * and product, which write and read an intermediate of the gate's size.
 *
 *   x:    [tokens, 2 * half], rows x_row apart, contiguous within a row
 *   out:  [tokens, half], rows out_row apart
 */

#include "cpu_kernels.h"

void pd_silu_mul(const float *x, long x_row, long tokens, long half, float *out, long out_row, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long t = 0; t < tokens; t++) silu_mul_span(x + t * x_row, x + t * x_row + half, out + t * out_row, 0, half);
}
