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

#include "cpu_kernels.h"

void pd_rms_norm(const float *x, long x_stride, const float *residual, long residual_stride, const float *weight,
                 long rows, long hidden, float eps, float *sum, long sum_stride, float *out, long out_stride,
                 int threads)
{
#pragma omp parallel for num_threads(threads) if (threads > 1)
    for (long t = 0; t < rows; t++)
        norm_row(x + t * x_stride, residual != 0 ? residual + t * residual_stride : 0, weight, hidden, eps,
                 sum + t * sum_stride, out + t * out_stride);
}
