/* Prompt attention over the paged KV cache on the CPU, reading K and V in place (float32 arithmetic; the cache
 * float32, float16 or bfloat16).
 *
 * For every sequence b with more than one query row (a prefill chunk of q_len = starts[b + 1] - starts[b] rows,
 * the last q_len of its lens[b] positions), query row i attends to keys 0 .. lens[b] - q_len + i
 * (kernels/attention.py). Rows of other sequences (decodes) are left as they are.
 *
 * The order is FlashAttention's. A task is one tile of query positions of one sequence, for the query heads of
 * one KV head, stacked as ROWS rows (position-major). It walks that KV head's keys in tiles of up to KEYS tokens,
 * which never cross a block: the scores of a tile, a running maximum and sum per row, and the rows' outputs stay
 * in the thread's scratch. Keys past the task's last position are never read, and neither are slots past a
 * context (they may hold stale values or NaN).
 *
 * The task's rows lie along the vectors (run_task): each element of a key or value is broadcast from the cache
 * against a vector of rows (16 on AVX-512, 8 on AVX2), and the softmax runs across rows. A float32 cache is read
 * where it lies; a tile of float16 or bfloat16 keys or values is first widened to float32 in the thread's scratch.
 *
 *   kv:       [2, num_blocks, block_size, num_kv_heads, head_dim], contiguous, of kv_type (KV_F32, KV_F16 or
 *             KV_BF16, cpu_kernels.h); head_dim 64 or 128
 *   q, out:   [T, num_heads, head_dim], head_dim contiguous, strides in elements
 *   scratch:  pd_prefill_attention_scratch() floats for each of `threads` threads
 */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

#include "cpu_kernels.h"

#define KEYS 64 /* tokens in a key tile */
#define ROWS 64 /* query rows of a task (positions x the query heads of a KV head, padded) */
/* The inner loops keep KEYS_AT_ONCE keys' (or 4 dims') sums of BLOCK_VECS vectors of rows, and those rows'
 * queries (or probabilities), in registers: 20 of AVX-512's 32 vector registers, 14 of AVX2's 16. Blocks as wide
 * as AVX-512's on AVX2 spilled them: prompt attention ran at 6-7 GFLOP/s on a Zen 3 host, a tenth of torch's SDPA
 * there (services/bench/README.md, tenth stop). */
#if defined(__AVX512F__)
#define LANES 16
#define BLOCK_VECS 4
#define KEYS_AT_ONCE 4
#else
#define LANES 8
#define BLOCK_VECS 2
#define KEYS_AT_ONCE 6
#endif
#define ROW_VECS (ROWS / LANES)

typedef float vec __attribute__((vector_size(LANES * sizeof(float))));

static inline vec load(const float *p) {
    vec v;
    memcpy(&v, p, sizeof v);
    return v;
}

static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

typedef struct {
    const float *q;
    const void *k, *v;
    int kv_type;
    const int64_t *tables, *lens, *starts;
    float *out;
    long q_row, q_head, out_row, out_head, table_row;
    long block_size, num_heads, num_kv_heads, head_dim;
    float scale;
} job_t;

typedef struct {
    long seq, head, first, count; /* the KV head, and positions [first, first + count) of the chunk's rows */
    long keys; /* keys the task reads: its cost */
} task_t;

static long positions_per_task(long group) { return ROWS / group; }

long pd_prefill_attention_scratch(long head_dim) {
    /* the queries and the outputs [head_dim][ROWS], the scores [KEYS][ROWS], the last key, running maximum
     * and sum of each row, and one tile of keys or values widened [KEYS][head_dim] */
    return 2 * head_dim * ROWS + KEYS * ROWS + 3 * ROWS + KEYS * head_dim;
}

/* st[t][:] = sum_d key(t)[d] * qt[d][:] for `at_once` (1 to KEYS_AT_ONCE) keys, key(t) = keys + t * stride, BLOCK_VECS
 * vectors of rows at a time. */
static inline __attribute__((always_inline)) void key_scores(const float *restrict qt, const float *restrict keys,
                                                             long stride, float *restrict st, const int at_once,
                                                             const long dim) {
    for (int c0 = 0; c0 < ROW_VECS; c0 += BLOCK_VECS) {
        vec acc[KEYS_AT_ONCE][BLOCK_VECS];
        for (int i = 0; i < at_once; i++)
            for (int c = 0; c < BLOCK_VECS; c++) acc[i][c] = (vec){0};
        for (long d = 0; d < dim; d++) {
            vec query[BLOCK_VECS];
            for (int c = 0; c < BLOCK_VECS; c++) query[c] = load(qt + d * ROWS + (c0 + c) * LANES);
            for (int i = 0; i < at_once; i++) {
                const float x = keys[i * stride + d];
                for (int c = 0; c < BLOCK_VECS; c++) acc[i][c] += x * query[c];
            }
        }
        for (int i = 0; i < at_once; i++)
            for (int c = 0; c < BLOCK_VECS; c++) store(st + i * ROWS + (c0 + c) * LANES, acc[i][c]);
    }
}

/* ot[d][:] += sum_t value(t)[d] * pt[t][:] over the tile's first n keys, value(t) = values + t * stride, 4 dims and
 * BLOCK_VECS vectors of rows at a time. */
static inline __attribute__((always_inline)) void tile_outputs(const float *restrict pt, const float *restrict values,
                                                               long stride, long n, float *restrict ot,
                                                               const long dim) {
    for (long d = 0; d < dim; d += 4)
        for (int c0 = 0; c0 < ROW_VECS; c0 += BLOCK_VECS) {
            vec acc[4][BLOCK_VECS];
            for (int i = 0; i < 4; i++)
                for (int c = 0; c < BLOCK_VECS; c++) acc[i][c] = load(ot + (d + i) * ROWS + (c0 + c) * LANES);
            for (long t = 0; t < n; t++) {
                vec p[BLOCK_VECS];
                for (int c = 0; c < BLOCK_VECS; c++) p[c] = load(pt + t * ROWS + (c0 + c) * LANES);
                const float *value = values + t * stride + d;
                for (int i = 0; i < 4; i++)
                    for (int c = 0; c < BLOCK_VECS; c++) acc[i][c] += value[i] * p[c];
            }
            for (int i = 0; i < 4; i++)
                for (int c = 0; c < BLOCK_VECS; c++) store(ot + (d + i) * ROWS + (c0 + c) * LANES, acc[i][c]);
        }
}

/* The n token rows of one KV head from `offset` (in elements) of `plane`, as float32, *stride elements apart: where
 * they lie in a float32 cache, else widened into `tile` ([n][dim]). */
static inline const float *tile_rows(const job_t *j, const void *plane, long offset, long n, long dim, float *tile,
                                     long *stride)
{
    const long row = j->num_kv_heads * dim, size = kv_element_size(j->kv_type);
    if (j->kv_type == KV_F32) {
        *stride = row;
        return (const float *)plane + offset;
    }
    for (long t = 0; t < n; t++)
        widen_kv(j->kv_type, (const char *)plane + (offset + t * row) * size, tile + t * dim, dim);
    *stride = dim;
    return tile;
}

/* One task, transposed: the rows lie along the vectors ([head_dim][ROWS] queries and outputs, [KEYS][ROWS]
 * scores), so that each key's and value's elements are broadcast from the cache as they lie, and the softmax runs
 * across rows with no horizontal step. */
static inline __attribute__((always_inline)) void run_task(const job_t *j, const task_t *task, float *scratch,
                                                           const long dim) {
    const long b = task->seq, g = task->head, kv_heads = j->num_kv_heads, group = j->num_heads / kv_heads;
    const long q_len = j->starts[b + 1] - j->starts[b], offset = j->lens[b] - q_len, count = task->count;
    const long bs = j->block_size, row = kv_heads * dim, block_stride = bs * row;
    const int64_t *table = j->tables + b * j->table_row;
    float *qt = scratch, *ot = qt + dim * ROWS, *st = ot + dim * ROWS, *last = st + KEYS * ROWS;
    float *top = last + ROWS, *sum = top + ROWS, *tile = sum + ROWS;
    /* Row r is position first + r / group (the last one again for the padding rows), query head g * group +
     * r % group. */
    for (long r = 0; r < ROWS; r++) {
        const long i = r / group < count ? r / group : count - 1, h = g * group + r % group;
        const float *x = j->q + (j->starts[b] + task->first + i) * j->q_row + h * j->q_head;
        for (long d = 0; d < dim; d++) qt[d * ROWS + r] = x[d] * j->scale;
        last[r] = (float)(offset + task->first + i);
        top[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    memset(ot, 0, dim * ROWS * sizeof *ot);
    for (long t0 = 0, n; t0 < task->keys; t0 += n) {
        const long in_block = bs - t0 % bs, left = task->keys - t0;
        n = in_block < KEYS ? in_block : KEYS; /* the tile's keys: to the block's end, at most KEYS */
        n = left < n ? left : n;
        const long base = table[t0 / bs] * block_stride + (t0 % bs) * row + g * dim;
        long stride, t = 0;
        const float *keys = tile_rows(j, j->k, base, n, dim, tile, &stride);
        for (; t + KEYS_AT_ONCE <= n; t += KEYS_AT_ONCE)
            key_scores(qt, keys + t * stride, stride, st + t * ROWS, KEYS_AT_ONCE, dim);
        for (; t < n; t++) key_scores(qt, keys + t * stride, stride, st + t * ROWS, 1, dim);
        /* The tile's last key may lie past some rows' positions: those scores are masked. Every row sees key 0,
         * so after the first tile each row's maximum is finite. */
        float best[ROWS], total[ROWS], rescale[ROWS];
        memcpy(best, top, sizeof best);
        for (t = 0; t < n; t++) {
            float *s = st + t * ROWS;
            const float key = (float)(t0 + t);
            for (long r = 0; r < ROWS; r++) {
                s[r] = key <= last[r] ? s[r] : -INFINITY;
                best[r] = s[r] > best[r] ? s[r] : best[r];
            }
        }
        memset(total, 0, sizeof total);
        for (t = 0; t < n; t++) {
            float *s = st + t * ROWS;
            for (long r = 0; r < ROWS; r++) {
                s[r] = expf(s[r] - best[r]);
                total[r] += s[r];
            }
        }
        for (long r = 0; r < ROWS; r++) {
            rescale[r] = expf(top[r] - best[r]);
            sum[r] = sum[r] * rescale[r] + total[r];
            top[r] = best[r];
        }
        if (t0 > 0)
            for (long d = 0; d < dim; d++)
                for (long r = 0; r < ROWS; r++) ot[d * ROWS + r] *= rescale[r];
        const float *values = tile_rows(j, j->v, base, n, dim, tile, &stride);
        tile_outputs(st, values, stride, n, ot, dim);
    }
    for (long r = 0; r < count * group; r++) {
        const long i = r / group, h = g * group + r % group;
        float *y = j->out + (j->starts[b] + task->first + i) * j->out_row + h * j->out_head;
        const float inv = 1.0f / sum[r];
        for (long d = 0; d < dim; d++) y[d] = ot[d * ROWS + r] * inv;
    }
}

static void task_64(const job_t *j, const task_t *t, float *scratch) { run_task(j, t, scratch, 64); }
static void task_128(const job_t *j, const task_t *t, float *scratch) { run_task(j, t, scratch, 128); }

static int by_cost(const void *a, const void *b) {
    const long x = ((const task_t *)a)->keys, y = ((const task_t *)b)->keys;
    return (x < y) - (x > y);
}

/* Returns 0, or (nothing written) 1 for a chunk longer than its context, 2 for a context past its block table, 3
 * for a block id outside the cache, 4 for a head size other than 64 or 128, 5 for query heads not a multiple of
 * the KV heads, 6 when out of memory. */
long pd_prefill_attention(const float *q, long q_row, long q_head, const void *kv, int kv_type, long num_blocks,
                          const int64_t *tables, long table_row, const int64_t *lens, const int64_t *starts,
                          long batch, long block_size, long num_heads, long num_kv_heads, long head_dim, float scale,
                          float *out, long out_row, long out_head, float *scratch, long scratch_per_thread,
                          int threads) {
    if (head_dim != 64 && head_dim != 128) return 4;
    if (num_kv_heads < 1 || num_heads % num_kv_heads || num_heads / num_kv_heads > ROWS) return 5;
    const long per_task = positions_per_task(num_heads / num_kv_heads);
    long tasks = 0;
    for (long b = 0; b < batch; b++) {
        const long q_len = starts[b + 1] - starts[b], len = lens[b];
        if (q_len < 2) continue;
        if (q_len > len) return 1;
        if (len > table_row * block_size) return 2;
        for (long k = 0; k < (len + block_size - 1) / block_size; k++)
            if (tables[b * table_row + k] < 0 || tables[b * table_row + k] >= num_blocks) return 3;
        tasks += (q_len + per_task - 1) / per_task * num_kv_heads;
    }
    if (tasks == 0) return 0;
    task_t *list = malloc(tasks * sizeof *list);
    if (list == NULL) return 6;
    long n = 0;
    for (long b = 0; b < batch; b++) {
        const long q_len = starts[b + 1] - starts[b];
        if (q_len < 2) continue;
        for (long first = 0; first < q_len; first += per_task)
            for (long g = 0; g < num_kv_heads; g++) {
                const long count = q_len - first < per_task ? q_len - first : per_task;
                list[n++] = (task_t){b, g, first, count, lens[b] - q_len + first + count};
            }
    }
    qsort(list, tasks, sizeof *list, by_cost); /* the costliest first, so that the last ones taken are short */
    const size_t plane = (size_t)num_blocks * block_size * num_kv_heads * head_dim;
    const job_t j = {q, kv, (const char *)kv + plane * kv_element_size(kv_type), kv_type, tables, lens, starts, out,
                     q_row, q_head, out_row, out_head, table_row, block_size, num_heads, num_kv_heads, head_dim,
                     scale};
    if (threads < 1) threads = 1;
    if (threads > tasks) threads = (int)tasks;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *mine = scratch + omp_get_thread_num() * scratch_per_thread;
#pragma omp for schedule(dynamic, 1)
        for (long t = 0; t < tasks; t++) {
            if (head_dim == 64) task_64(&j, &list[t], mine);
            else task_128(&j, &list[t], mine);
        }
    }
    free(list);
    return 0;
}
