/* Products of a few rows with a row-major weight on the CPU: y[r, o] = sum_k x[r, k] * w[o, k].
 *
 * A decode step at batch 1 to 4 reads every weight once per step and does almost no arithmetic with it, so
 * its time is the time to stream the weights from memory. Here each output reads one contiguous row of the
 * weight (nn.Linear's own [out, in] layout) and takes its dot product with each input row while the weight
 * row is still in L1 (span() in cpu_kernels.h): the weights stream once, in order, whatever the number of rows.
 * The threads of torch's OpenMP team take contiguous spans of the outputs. oneDNN's packed product, tuned for
 * more rows, streamed the tiny preset's projections at 12-13 GB/s on one thread and 18-22 on two on the Zen 4
 * host where this streamed 19-22 and 25-30 (services/bench/README.md).
 *
 *   w:  [out, in] float32, contiguous
 *   x:  [rows, in] float32, rows x_stride apart, contiguous within a row; 1 <= rows <= 4
 *   y:  [rows, out] float32, rows y_stride apart
 */

#include <omp.h>

#include "cpu_kernels.h"

void pd_few_rows(const float *w, long out, long in, const float *x, long x_stride, long rows, float *y,
                 long y_stride, int threads)
{
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        long first, last;
        share(out, omp_get_thread_num(), omp_get_num_threads(), &first, &last);
        few_rows_span(w, in, x, x_stride, rows, y, y_stride, first, last);
    }
}
