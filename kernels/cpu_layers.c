/* Every decoder layer of a Llama decode step of a few rows on the CPU (float32; the KV cache float32, float16 or
 * bfloat16), and the final norm, in one call and one OpenMP region (kernels/cpu_layers.py has the Python side; the
 * model's modules are the reference).
 *
 * At one to four rows a step only streams the weights: the products run at the memory's pace and the other
 * operators (norms, the rotary embedding, attention, SwiGLU) do little arithmetic. Called one by one from
 * Python they cost about 0.15 ms per layer beyond the products on the 2-core host, in the interpreter, the
 * operators' dispatch and the team's wake-ups, more than the products of a layer take from memory. Here the
 * threads of torch's OpenMP team run every layer's operators in turn, with a barrier between two that depend on
 * each other, and the products split their outputs between the threads as pd_few_rows does. Each row is one
 * sequence's new token (a decode), at position positions[r], stored at slot slots[r] (-1: not stored), with
 * lens[r] tokens of context counting it.
 *
 *   x, out:   [rows, hidden]: the embeddings in, the final norm's output out
 *   cache:    [layers, 2, num_blocks, block_size, kv_heads, dim] contiguous, of kv_type (KV_F32, KV_F16 or
 *             KV_BF16, cpu_kernels.h): each layer's K plane then V plane; the new K and V are rounded to it
 *   tables:   [rows, table_row] block ids
 *   scratch:  pd_decode_layers_scratch(...) floats
 *
 * Returns 0; nothing is written but 1 where a position lies outside cos_sin, 2 where a slot lies outside the
 * cache, 3 where a context is empty or overruns its block table, 4 where a block id lies outside the cache,
 * 5 where rows is not 1 to FEW_ROWS_MAX.
 */

#include <omp.h>

#include "cpu_kernels.h"

typedef struct {
    /* [out, in] row-major weights; the biases may be NULL */
    const float *input_norm, *qkv, *qkv_bias, *o, *post_norm, *gate_up, *gate_up_bias, *down, *down_bias;
} layer_t;

typedef struct {
    long num_layers, hidden, heads, kv_heads, dim, intermediate, num_positions;
    float eps, scale;
    const float *cos_sin;  /* [num_positions, dim]: cos then sin of each position's angles */
    const float *final_norm;
    const layer_t *layers;
} model_t;

/* Where each of a step's intermediates lies in the scratch. */
typedef struct {
    float *residual, *normed, *qkv, *attn, *gate_up, *act, *hid, *scores;
    long qkv_row, q_size, kv_size, scores_per_thread;
} buffers_t;

static buffers_t lay_out(const model_t *m, long rows, long max_context, float *base) {
    buffers_t b;
    b.q_size = m->heads * m->dim;
    b.kv_size = m->kv_heads * m->dim;
    b.qkv_row = b.q_size + 2 * b.kv_size;
    /* one KV head's query heads over the longest context a table allows, then one token row (attend_heads) */
    b.scores_per_thread = (m->heads / m->kv_heads) * max_context + b.kv_size;
    b.residual = base;
    b.normed = b.residual + rows * m->hidden;
    b.qkv = b.normed + rows * m->hidden;
    b.attn = b.qkv + rows * b.qkv_row;
    b.gate_up = b.attn + rows * b.q_size;
    b.act = b.gate_up + rows * 2 * m->intermediate;
    b.hid = b.act + rows * m->intermediate;
    b.scores = b.hid + rows * m->hidden;
    return b;
}

long pd_decode_layers_scratch(const model_t *m, long rows, long max_context, int threads) {
    const buffers_t b = lay_out(m, rows, max_context, 0);
    return (long)(b.scores - (float *)0) + threads * b.scores_per_thread;
}

/* y[r, :] = x[r, :] @ w^T (+ bias) for this thread's share of the outputs. */
static void product(const float *w, const float *bias, long in, long out, const float *x, long rows, float *y,
                    int id, int team) {
    long first, last;
    share(out, id, team, &first, &last);
    few_rows_span(w, in, x, in, rows, y, out, first, last);
    if (bias != 0)
        for (long r = 0; r < rows; r++)
            for (long o = first; o < last; o++) y[r * out + o] += bias[o];
}

static long check(const model_t *m, long rows, const int64_t *positions, const int64_t *slots,
                  const int64_t *tables, long table_row, const int64_t *lens, long num_blocks, long block_size) {
    if (rows < 1 || rows > FEW_ROWS_MAX) return 5;
    for (long r = 0; r < rows; r++) {
        if (positions[r] < 0 || positions[r] >= m->num_positions) return 1;
        if (slots[r] < -1 || slots[r] >= num_blocks * block_size) return 2;
        if (lens[r] < 1 || lens[r] > table_row * block_size) return 3;
        for (long i = 0; i < (lens[r] + block_size - 1) / block_size; i++)
            if (tables[r * table_row + i] < 0 || tables[r * table_row + i] >= num_blocks) return 4;
    }
    return 0;
}

long pd_decode_layers(const model_t *m, const float *x, long rows, const int64_t *positions, const int64_t *slots,
                      const int64_t *tables, long table_row, const int64_t *lens, void *cache, int kv_type,
                      long num_blocks, long block_size, float *out, float *scratch, int threads) {
    const long failed = check(m, rows, positions, slots, tables, table_row, lens, num_blocks, block_size);
    if (failed) return failed;
    const buffers_t b = lay_out(m, rows, table_row * block_size, scratch);
    const long hidden = m->hidden, dim = m->dim, half = dim / 2, inter = m->intermediate;
    const long size = kv_element_size(kv_type), plane = num_blocks * block_size * b.kv_size * size; /* bytes */
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        const int id = omp_get_thread_num(), team = omp_get_num_threads();
        float *scores = b.scores + id * b.scores_per_thread;
        for (long n = 0; n < m->num_layers; n++) {
            const layer_t *l = m->layers + n;
            char *k_plane = (char *)cache + n * 2 * plane, *v_plane = k_plane + plane;
#pragma omp single
            for (long r = 0; r < rows; r++) {
                float *residual = b.residual + r * hidden;
                if (n == 0) /* the residual stream starts as the embeddings */
                    memcpy(residual, x + r * hidden, hidden * sizeof(float));
                norm_row(n == 0 ? residual : b.hid + r * hidden, n == 0 ? 0 : residual, l->input_norm, hidden,
                         m->eps, residual, b.normed + r * hidden);
            }
            product(l->qkv, l->qkv_bias, hidden, b.qkv_row, b.normed, rows, b.qkv, id, team);
#pragma omp barrier
#pragma omp single
            for (long r = 0; r < rows; r++) {
                float *q = b.qkv + r * b.qkv_row, *k = q + b.q_size, *v = k + b.kv_size;
                const float *cos = m->cos_sin + positions[r] * dim, *sin = cos + half;
                for (long h = 0; h < m->heads; h++) rotate(q + h * dim, cos, sin, half);
                for (long h = 0; h < m->kv_heads; h++) rotate(k + h * dim, cos, sin, half);
                if (slots[r] >= 0) {
                    const long at = slots[r] * b.kv_size * size;
                    narrow_kv(kv_type, k, k_plane + at, b.kv_size);
                    narrow_kv(kv_type, v, v_plane + at, b.kv_size);
                }
            }
            long first, last; /* this thread's (row, KV head) pairs */
            share(rows * m->kv_heads, id, team, &first, &last);
            for (long item = first; item < last; item++) {
                const long r = item / m->kv_heads, g = item % m->kv_heads;
                attend_heads(b.qkv + r * b.qkv_row, dim, k_plane, v_plane, kv_type, tables + r * table_row,
                             lens[r], block_size, m->heads, m->kv_heads, dim, m->scale, b.attn + r * b.q_size, dim,
                             g, g + 1, scores);
            }
#pragma omp barrier
            product(l->o, 0, b.q_size, hidden, b.attn, rows, b.hid, id, team);
#pragma omp barrier
#pragma omp single
            for (long r = 0; r < rows; r++)
                norm_row(b.hid + r * hidden, b.residual + r * hidden, l->post_norm, hidden, m->eps,
                         b.residual + r * hidden, b.normed + r * hidden);
            product(l->gate_up, l->gate_up_bias, hidden, 2 * inter, b.normed, rows, b.gate_up, id, team);
#pragma omp barrier
            share(inter, id, team, &first, &last);
            for (long r = 0; r < rows; r++) {
                const float *gate = b.gate_up + r * 2 * inter;
                silu_mul_span(gate, gate + inter, b.act + r * inter, first, last);
            }
#pragma omp barrier
            product(l->down, l->down_bias, inter, hidden, b.act, rows, b.hid, id, team);
#pragma omp barrier
        }
#pragma omp single
        for (long r = 0; r < rows; r++)
            norm_row(b.hid + r * hidden, b.residual + r * hidden, m->final_norm, hidden, m->eps,
                     b.residual + r * hidden, out + r * hidden);
    }
    return 0;
}
