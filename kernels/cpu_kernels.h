/* The pieces the CPU kernels share (float32 arithmetic): the few-rows product's span, RMSNorm of a row, the rotary
 * embedding of a head, SwiGLU's gate over a range, the KV cache's element types (float32, float16, bfloat16:
 * --kv-cache-dtype) and their conversion to and from float32, and one sequence's decode attention over a range
 * of KV heads.
 * The entry points of cpu_rows.c, cpu_norm.c, cpu_rope.c, cpu_swiglu.c and cpu_decode.c run them over a whole
 * tensor; cpu_layers.c runs them in turn, for every layer of a decode step, inside one OpenMP region. */

#ifndef PDSERVE_CPU_KERNELS_H
#define PDSERVE_CPU_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

#if defined(__x86_64__)
/* glibc's vector expf (libmvec), which math.h declares only under __FAST_MATH__, and -fno-finite-math-only
 * leaves that undefined: declared here, GCC calls it for 16 lanes at a time. */
float expf(float) __attribute__((simd("notinbranch")));
#endif

#if defined(__AVX512F__)
#define SPAN_LANES 16
#else
#define SPAN_LANES 8
#endif
typedef float span_vec __attribute__((vector_size(SPAN_LANES * sizeof(float))));

static inline span_vec span_load(const float *p)
{
    span_vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

/* y[r, o] = sum_k x[r, k] * w[o, k] for the outputs o in [first, last): each output reads one contiguous row of
 * the weight ([out, in], nn.Linear's layout) and takes its dot product with each input row while that row is
 * still in L1. `rows` is a constant at each call (few_rows_span), so that the compiler unrolls the loop over
 * rows. Each row's sum runs in `chains` vectors side by side (4 for one row, 2 for more). With one vector per
 * row, every add waited for the one before, and on AVX2 a core summed slower than memory delivered
 * (services/bench/README.md, tenth stop). */
static inline __attribute__((always_inline)) void span(const float *restrict w, long in, const float *restrict x,
                                                       long x_stride, const int rows, float *restrict y,
                                                       long y_stride, long first, long last)
{
    enum { CHAINS_MAX = 4 };
    const int chains = rows == 1 ? 4 : 2;
    const long step = chains * SPAN_LANES, whole = in - in % step;
    for (long o = first; o < last; o++) {
        const float *restrict row = w + o * in;
        span_vec acc[4][CHAINS_MAX]; /* [row][chain]: at most 4 rows (FEW_ROWS_MAX) */
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < chains; c++) acc[r][c] = (span_vec){0};
        for (long k = 0; k < whole; k += step)
            for (int c = 0; c < chains; c++) {
                const span_vec wv = span_load(row + k + c * SPAN_LANES);
                for (int r = 0; r < rows; r++) acc[r][c] += wv * span_load(x + r * x_stride + k + c * SPAN_LANES);
            }
        for (int r = 0; r < rows; r++) {
            span_vec total = acc[r][0];
            for (int c = 1; c < chains; c++) total += acc[r][c];
            float sum = 0.0f;
            for (int l = 0; l < SPAN_LANES; l++) sum += total[l];
            for (long k = whole; k < in; k++) sum += row[k] * x[r * x_stride + k];
            y[r * y_stride + o] = sum;
        }
    }
}

#define FEW_ROWS_MAX 4

/* span() for 1 <= rows <= FEW_ROWS_MAX; other counts write nothing. */
static inline void few_rows_span(const float *w, long in, const float *x, long x_stride, long rows, float *y,
                                 long y_stride, long first, long last)
{
    switch (first < last ? rows : 0) {
    case 1: span(w, in, x, x_stride, 1, y, y_stride, first, last); break;
    case 2: span(w, in, x, x_stride, 2, y, y_stride, first, last); break;
    case 3: span(w, in, x, x_stride, 3, y, y_stride, first, last); break;
    case 4: span(w, in, x, x_stride, 4, y, y_stride, first, last); break;
    default: break;
    }
}

/* The share [*first, *last) of `total` items that thread `id` of `team` takes: contiguous, in order. */
static inline void share(long total, int id, int team, long *first, long *last)
{
    const long per = (total + team - 1) / team;
    *first = id * per < total ? id * per : total;
    *last = *first + per < total ? *first + per : total;
}

/* sum = x + residual (x alone when residual is NULL; sum is then not written), out = sum / rms(sum) * weight.
 * sum may be residual itself. */
static inline void norm_row(const float *x, const float *residual, const float *restrict weight, long hidden,
                            float eps, float *sum, float *restrict out)
{
    if (residual != 0)
        for (long h = 0; h < hidden; h++) sum[h] = x[h] + residual[h];
    const float *s = residual != 0 ? sum : x;
    float squares = 0.0f;
    for (long h = 0; h < hidden; h++) squares += s[h] * s[h];
    const float scale = 1.0f / sqrtf(squares / (float)hidden + eps);
    for (long h = 0; h < hidden; h++) out[h] = s[h] * scale * weight[h];
}

/* The rotary embedding of one head in the "half" layout (kernels/rotary.py): x1, x2 the halves of the head,
 * cos, sin the halves of cos_sin[position]: x1' = x1 cos - x2 sin, x2' = x2 cos + x1 sin. */
static inline void rotate(float *restrict x, const float *restrict cos, const float *restrict sin, long half)
{
    float *restrict x2 = x + half;
    for (long d = 0; d < half; d++) {
        const float a = x[d], b = x2[d];
        x[d] = a * cos[d] - b * sin[d];
        x2[d] = b * cos[d] + a * sin[d];
    }
}

/* out[i] = silu(gate[i]) * up[i] for i in [first, last), silu(g) = g / (1 + exp(-g)). */
static inline void silu_mul_span(const float *restrict gate, const float *restrict up, float *restrict out,
                                 long first, long last)
{
    for (long i = first; i < last; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
}

/* The element types of a KV cache; the arithmetic is float32 whatever the cache holds. */
enum { KV_F32, KV_F16, KV_BF16 };

static inline long kv_element_size(int kv_type) { return kv_type == KV_F32 ? 4 : 2; }

/* out[0 .. n) = the n elements of a cache of kv_type at src, as float32. float16 converts 16 or 8 at a time where
 * the CPU converts vectors (GCC leaves a plain loop over _Float16 to one element per instruction). */
static inline void widen_kv(int kv_type, const void *src, float *restrict out, long n)
{
    long d = 0;
    if (kv_type == KV_F32) {
        memcpy(out, src, n * sizeof(float));
    } else if (kv_type == KV_F16) {
        const _Float16 *h = src;
#if defined(__AVX512F__)
        for (; d + 16 <= n; d += 16)
            _mm512_storeu_ps(out + d, _mm512_cvtph_ps(_mm256_loadu_si256((const void *)(h + d))));
#endif
#if defined(__F16C__)
        for (; d + 8 <= n; d += 8) _mm256_storeu_ps(out + d, _mm256_cvtph_ps(_mm_loadu_si128((const void *)(h + d))));
#endif
        for (; d < n; d++) out[d] = (float)h[d];
    } else {
        const uint16_t *h = src;
        for (; d < n; d++) {
            const uint32_t bits = (uint32_t)h[d] << 16;
            memcpy(out + d, &bits, sizeof bits);
        }
    }
}

/* The n float32 values at src written to a cache of kv_type at dst, rounded to the nearest even as torch's .to()
 * rounds. */
static inline void narrow_kv(int kv_type, const float *restrict src, void *dst, long n)
{
    long d = 0;
    if (kv_type == KV_F32) {
        memcpy(dst, src, n * sizeof(float));
    } else if (kv_type == KV_F16) {
        _Float16 *h = dst;
#if defined(__AVX512F__)
        for (; d + 16 <= n; d += 16)
            _mm256_storeu_si256((void *)(h + d), _mm512_cvtps_ph(_mm512_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
#endif
#if defined(__F16C__)
        for (; d + 8 <= n; d += 8)
            _mm_storeu_si128((void *)(h + d), _mm256_cvtps_ph(_mm256_loadu_ps(src + d), _MM_FROUND_TO_NEAREST_INT));
#endif
        for (; d < n; d++) h[d] = (_Float16)src[d];
    } else {
        uint16_t *h = dst;
        for (; d < n; d++) {
            uint32_t bits;
            memcpy(&bits, src + d, sizeof bits);
            const int nan = (bits & 0x7fffffffu) > 0x7f800000u;
            h[d] = nan ? (uint16_t)((bits >> 16) | 0x40) : (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1)) >> 16);
        }
    }
}

/* One sequence's decode attention for its query heads of the KV heads [kv_first, kv_last) (cpu_decode.c): q and
 * out [num_heads, head_dim] float32 with heads q_head and out_head apart; k and v the layer's planes
 * [num_blocks * block_size, num_kv_heads, head_dim] of kv_type; `scratch` holds (kv_last - kv_first) *
 * (num_heads / num_kv_heads) * len + num_kv_heads * head_dim floats. */
void attend_heads(const float *q, long q_head, const void *k, const void *v, int kv_type, const int64_t *table,
                  long len, long block_size, long num_heads, long num_kv_heads, long head_dim, float scale,
                  float *out, long out_head, long kv_first, long kv_last, float *scratch);

#endif
