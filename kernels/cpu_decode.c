/* Decode attention over the paged KV cache on the CPU, reading K and V in place.
 *
 * For every sequence b whose query is a single row (query_start_loc[b + 1] - query_start_loc[b] == 1),
 * the query heads of each KV head attend to keys 0 .. context_lens[b] - 1 of the blocks named by
 * block_tables[b]: one pass over K for the scores, a softmax, one pass over V for the output. Nothing
 * is copied out of the cache and slots past a context are never read (they may hold stale values or NaN).
 * Rows of other sequences (prefill chunks, idle ones) are left as they are.
 *
 *   kv_layer:  [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous, of kv_type (KV_F32, KV_F16 or
 *              KV_BF16, cpu_kernels.h); the arithmetic is float32
 *   q, out:    [T, num_heads, head_dim] float32, head_dim contiguous, strides in elements
 *   scratch:   num_heads * max(context_lens) + num_kv_heads * head_dim floats per worker
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "cpu_kernels.h"

typedef struct {
    const float *q;
    const void *k, *v;
    int kv_type; /* KV_F32, KV_F16 or KV_BF16 */
    const int64_t *tables, *lens, *starts;
    float *out;
    long q_row, q_head, out_row, out_head, table_row;
    long block_size, num_heads, num_kv_heads, head_dim, batch;
    float scale;
    long first, last; /* the sequences this worker takes: [first, last) */
    long kv_first, kv_last; /* the KV heads it takes of each: [kv_first, kv_last) */
    float *scratch;
} job_t;

/* The n elements of a token row's K or V at `offset` (the KV heads a worker takes), widened to float32 for the
 * arithmetic; `widened` holds them when the cache is not float32. */
static inline const float *token_row(const job_t *j, const void *plane, long offset, long n, float *widened) {
    if (j->kv_type == KV_F32) return (const float *)plane + offset;
    widen_kv(j->kv_type, (const char *)plane + offset * kv_element_size(j->kv_type), widened, n);
    return widened;
}

/* Asks for the n elements of the token row at `offset` of `plane` to be brought to the caches. */
static inline void prefetch_row(const job_t *j, const void *plane, long offset, long n) {
    const long size = kv_element_size(j->kv_type);
    const char *p = (const char *)plane + offset * size;
    for (long b = 0; b < n * size; b += 64) __builtin_prefetch(p + b, 0, 3);
}

static inline __attribute__((always_inline)) float dot(const float *restrict a, const float *restrict b, long n) {
    float s = 0;
    for (long d = 0; d < n; d++) s += a[d] * b[d];
    return s;
}

/* One sequence, the query heads of KV heads [kv_first, kv_last): K and V are read token row by token row (every
 * KV head of a token is one contiguous row), block by block in the order of the block table. `dim` is a
 * constant in the callers below, so that each head's dot product and update compile to a fixed run of vector
 * instructions. While a block is read, each token row asks for the same row of the next block in the table:
 * the blocks of a sequence lie anywhere in the cache, and the hardware prefetcher, which follows addresses,
 * stalls at every jump. On 2 cores, 28 sequences of 700 tokens in blocks of 64 took 1.35-1.67 ms without
 * this and 0.92-1.14 ms with it (services/bench/README.md, "Decode attention asks for the next block"). */
static inline __attribute__((always_inline)) void sequence_of_dim(const job_t *j, long b, const long dim) {
    const long kv_heads = j->num_kv_heads, group = j->num_heads / kv_heads, len = j->lens[b];
    const long g0 = j->kv_first, g1 = j->kv_last, heads = (g1 - g0) * group, h0 = g0 * group;
    const long bs = j->block_size, row = kv_heads * dim, block_stride = bs * row;
    const long width = (g1 - g0) * dim; /* the elements of a token row this worker reads, from KV head g0 on */
    const int64_t *table = j->tables + b * j->table_row;
    const float *qb = j->q + j->starts[b] * j->q_row + h0 * j->q_head;
    float *ob = j->out + j->starts[b] * j->out_row + h0 * j->out_head;
    float *scores = j->scratch, *widened = j->scratch + heads * len; /* [heads][len], then one token row */
    for (long t0 = 0; t0 < len; t0 += bs) {
        const long base = table[t0 / bs] * block_stride, n = len - t0 < bs ? len - t0 : bs;
        const long next = t0 + bs < len ? table[t0 / bs + 1] * block_stride : -1;
        for (long i = 0; i < n; i++) {
            if (next >= 0) prefetch_row(j, j->k, next + i * row + g0 * dim, width);
            const float *key = token_row(j, j->k, base + i * row + g0 * dim, width, widened);
            for (long g = g0, h = 0; g < g1; g++)
                for (long m = 0; m < group; m++, h++)
                    scores[h * len + t0 + i] = dot(qb + h * j->q_head, key + (g - g0) * dim, dim) * j->scale;
        }
    }
    for (long h = 0; h < heads; h++) {
        float *sh = scores + h * len, top = -INFINITY, total = 0;
        for (long t = 0; t < len; t++) top = sh[t] > top ? sh[t] : top;
        for (long t = 0; t < len; t++) sh[t] = expf(sh[t] - top);
        for (long t = 0; t < len; t++) total += sh[t];
        const float inv = 1.0f / total;
        for (long t = 0; t < len; t++) sh[t] *= inv;
        float *o = ob + h * j->out_head;
        for (long d = 0; d < dim; d++) o[d] = 0;
    }
    for (long t0 = 0; t0 < len; t0 += bs) {
        const long base = table[t0 / bs] * block_stride, n = len - t0 < bs ? len - t0 : bs;
        const long next = t0 + bs < len ? table[t0 / bs + 1] * block_stride : -1;
        for (long i = 0; i < n; i++) {
            if (next >= 0) prefetch_row(j, j->v, next + i * row + g0 * dim, width);
            const float *value = token_row(j, j->v, base + i * row + g0 * dim, width, widened);
            for (long g = g0, h = 0; g < g1; g++)
                for (long m = 0; m < group; m++, h++) {
                    const float p = scores[h * len + t0 + i], *restrict vg = value + (g - g0) * dim;
                    float *restrict o = ob + h * j->out_head;
                    for (long d = 0; d < dim; d++) o[d] += p * vg[d];
                }
        }
    }
}

static void sequence_64(const job_t *j, long b) { sequence_of_dim(j, b, 64); }
static void sequence_128(const job_t *j, long b) { sequence_of_dim(j, b, 128); }
static void sequence_any(const job_t *j, long b) { sequence_of_dim(j, b, j->head_dim); }

static void one_sequence(const job_t *j, long b) {
    if (j->head_dim == 64) sequence_64(j, b);
    else if (j->head_dim == 128) sequence_128(j, b);
    else sequence_any(j, b);
}

void attend_heads(const float *q, long q_head, const void *k, const void *v, int kv_type, const int64_t *table,
                  long len, long block_size, long num_heads, long num_kv_heads, long head_dim, float scale,
                  float *out, long out_head, long kv_first, long kv_last, float *scratch) {
    const int64_t lens[1] = {len}, starts[2] = {0, 1};
    const job_t j = {q, k, v, kv_type, table, lens, starts, out, 0, q_head, 0, out_head, 0, block_size, num_heads,
                     num_kv_heads, head_dim, 1, scale, 0, 1, kv_first, kv_last, scratch};
    one_sequence(&j, 0);
}

static void *run(void *arg) {
    const job_t *j = arg;
    for (long b = j->first; b < j->last; b++)
        if (j->starts[b + 1] - j->starts[b] == 1 && j->lens[b] > 0) one_sequence(j, b);
    return NULL;
}

/* bounds[w] .. bounds[w + 1]: the sequences of worker w of `threads`, cut where the running sum of their
 * decode contexts passes w / threads of the total, so that each worker reads about as much KV. */
static void split_by_kv(const int64_t *lens, const int64_t *starts, long batch, int threads, long *bounds) {
    long total = 0;
    for (long b = 0; b < batch; b++)
        if (starts[b + 1] - starts[b] == 1) total += lens[b];
    long b = 0, sum = 0;
    for (int w = 0; w < threads; w++) {
        for (; b < batch && sum < total * w / threads; b++)
            if (starts[b + 1] - starts[b] == 1) sum += lens[b];
        bounds[w] = b;
    }
    bounds[threads] = batch;
}

/* `threads` > 1 splits the sequences between that many threads of the OpenMP team; `scratch` holds
 * `threads` slices of `scratch_per_thread` (>= num_heads * max(context_lens) + num_kv_heads * head_dim)
 * floats. `kv` holds elements of `kv_type`. */
void pd_decode_attention(const float *q, long q_row, long q_head, const void *kv, int kv_type, long num_blocks,
                         const int64_t *tables, long table_row, const int64_t *lens, const int64_t *starts,
                         long batch, long block_size, long num_heads, long num_kv_heads, long head_dim,
                         float scale, float *out, long out_row, long out_head, float *scratch,
                         long scratch_per_thread, int threads) {
    const size_t plane = (size_t)num_blocks * block_size * num_kv_heads * head_dim;
    const void *k = kv, *v = (const char *)kv + plane * kv_element_size(kv_type);
    const long seqs = batch;
    if (threads < 1) threads = 1;
    if (threads > seqs) threads = seqs > 0 ? (int)seqs : 1;
    job_t jobs[64];
    if (threads > 64) threads = 64;
    long bounds[65];
    split_by_kv(lens, starts, batch, threads, bounds);
    for (int w = 0; w < threads; w++) {
        jobs[w] = (job_t){q, k, v, kv_type, tables, lens, starts, out, q_row, q_head, out_row, out_head, table_row,
                          block_size, num_heads, num_kv_heads, head_dim, batch, scale, bounds[w], bounds[w + 1], 0,
                          num_kv_heads, scratch + w * scratch_per_thread};
    }
    /* The threads are the process's OpenMP team, torch's own (the library links the libgomp torch has
     * loaded): they are the ones spinning on the cores between torch's operators, so they start at once and
     * no thread of ours competes with them for a core. */
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int team = omp_get_num_threads();
        for (int w = omp_get_thread_num(); w < threads; w += team) run(&jobs[w]);
    }
}
