/* The rotary embedding of a step's new q and k, in place, and its new K and V written into one layer of the
 * paged cache, in one pass per token on the CPU (float32; the cache float32, float16 or bfloat16).
 *
 * Each head of q and k is rotated as the model's reference does (kernels/rotary.py, the "half" layout): with
 * x1, x2 the first and second half of the head and cos, sin the two halves of cos_sin[position],
 *     x1' = x1 cos - x2 sin,    x2' = x2 cos + x1 sin.
 * Then a token whose slot is not -1 has its rotated k and its v written to that slot of the cache, rounded to the
 * cache's type (kv_type: KV_F32, KV_F16 or KV_BF16, cpu_kernels.h) as torch's .to() rounds. This stands
 * for about a dozen torch operators per layer (a concatenation, the products and sums, the slot check, two
 * index copies), which at a decode step of a few rows cost microseconds each whatever their size.
 *
 *   q:        [tokens, q_heads, dim], rows q_row apart, heads q_head apart, each head contiguous (k, v alike)
 *   cos_sin:  [positions, dim] contiguous: cos then sin of each position's angles
 *   cache:    [2, slots, kv_heads, dim] contiguous, of kv_type: one layer's K plane then its V plane, a slot per
 *             token
 *
 * Returns 0; 1 where a position lies outside cos_sin, 2 where a slot lies outside the cache. Nothing is
 * written then.
 */

#include "cpu_kernels.h"

long pd_rope_store(float *q, long q_row, long q_head, long q_heads, float *k, long k_row, long k_head,
                   const float *v, long v_row, long v_head, long kv_heads, long dim, const int64_t *positions,
                   const float *cos_sin, long num_positions, void *cache, int kv_type, long num_slots,
                   const int64_t *slots, long tokens, int threads)
{
    for (long t = 0; t < tokens; t++) {
        if (positions[t] < 0 || positions[t] >= num_positions) return 1;
        if (slots[t] < -1 || slots[t] >= num_slots) return 2;
    }
    const long half = dim / 2, slot_size = kv_heads * dim, size = kv_element_size(kv_type);
    char *k_plane = cache, *v_plane = k_plane + num_slots * slot_size * size;
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(static)
    for (long t = 0; t < tokens; t++) {
        const float *cos = cos_sin + positions[t] * dim, *sin = cos + half;
        for (long h = 0; h < q_heads; h++) rotate(q + t * q_row + h * q_head, cos, sin, half);
        for (long h = 0; h < kv_heads; h++) {
            float *kh = k + t * k_row + h * k_head;
            rotate(kh, cos, sin, half);
            if (slots[t] >= 0) {
                const long at = (slots[t] * slot_size + h * dim) * size;
                narrow_kv(kv_type, kh, k_plane + at, dim);
                narrow_kv(kv_type, v + t * v_row + h * v_head, v_plane + at, dim);
            }
        }
    }
    return 0;
}
