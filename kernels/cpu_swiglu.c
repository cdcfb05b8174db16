/* SwiGLU's gate on the CPU (float32): out[t, i] = silu(x[t, i]) * x[t, half + i], silu(g) = g / (1 + exp(-g)),
 * for the fused gate and up projection's output x [tokens, 2 * half]. One pass in place of torch's split, SiLU
 * and product, which write and read an intermediate of the gate's size.
 *
 *   x:    [tokens, 2 * half], rows x_row apart, contiguous within a row
 *   out:  [tokens, half], rows out_row apart
 */

#include <math.h>

#if defined(__x86_64__)
/* glibc's vector expf (libmvec), which math.h declares only under __FAST_MATH__, and -fno-finite-math-only
 * leaves that undefined: declared here, GCC calls it for 16 lanes at a time. */
float expf(float) __attribute__((simd("notinbranch")));
#endif

void pd_silu_mul(const float *x, long x_row, long tokens, long half, float *out, long out_row, int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long t = 0; t < tokens; t++) {
        const float *restrict gate = x + t * x_row, *restrict up = gate + half;
        float *restrict o = out + t * out_row;
        for (long i = 0; i < half; i++) o[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
    }
}
