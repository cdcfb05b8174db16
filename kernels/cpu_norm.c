/* RMSNorm fused with the residual add on the CPU, for float32 rows (kernels/rmsnorm.py has the reference):
 *
 *   sum[t, :] = x[t, :] + residual[t, :]          (x alone when residual is NULL)
 *   out[t, :] = sum[t, :] / sqrt(mean(sum[t, :]^2) + eps) * weight
 *
 * One pass per row instead of the reference's six torch operators, each a few microseconds at a decode's few
 * rows. Rows split over torch's OpenMP team when there are enough of them (a prompt's chunk).
 *
 *   x, residual, sum, out:  [rows, hidden], rows `*_stride` floats apart, contiguous within a row
 */

#include <math.h>
#include <omp.h>

void pd_rms_norm(const float *x, long x_stride, const float *residual, long residual_stride, const float *weight,
                 long rows, long hidden, float eps, float *sum, long sum_stride, float *out, long out_stride,
                 int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (long t = 0; t < rows; t++) {
        const float *restrict xt = x + t * x_stride;
        float *restrict st = sum + t * sum_stride;
        float *restrict ot = out + t * out_stride;
        if (residual != 0) {
            const float *restrict rt = residual + t * residual_stride;
            for (long h = 0; h < hidden; h++) st[h] = xt[h] + rt[h];
        }
        const float *restrict s = residual != 0 ? st : xt;
        float squares = 0.0f;
        for (long h = 0; h < hidden; h++) squares += s[h] * s[h];
        float scale = 1.0f / sqrtf(squares / (float)hidden + eps);
        for (long h = 0; h < hidden; h++) ot[h] = s[h] * scale * weight[h];
    }
}
