// Forward pass of the fused queue contrastive softmax (COTS instance level).
//
// CPU reference: crates/cots-ops/src/queue_fused.rs (QueueContrastiveOp);
// Rust launcher: crates/cots-ops/src/queue_cuda.rs, which compiles this file
// with NVRTC at run time. It must also compile with
// `nvcc -arch=sm_90 -ptx -Werror all-warnings` (see `cargo xtask kernels`),
// and it includes no header so that NVRTC needs no include path.
//
// For row i the logits are l_i0 = qs_i . k_i and l_ij = qs_i . queue_{j-1}
// (j = 1..K), where qs = q / tau. Column 0 and the queue slots whose id equals
// the row's id are the positives. Output row i, `3 + 2D` floats:
//   [0]            loss_i = lse_i - (sum of positive logits) / cnt_i
//   [1]            lse_i  = log sum_j exp(l_ij)
//   [2]            cnt_i  = number of positive columns (>= 1)
//   [3, 3+D)       sum_j p_ij key_j, with p_i = softmax(l_i)
//   [3+D, 3+2D)    sum of the positive keys (k_i plus the same-id queue keys)
//
// The B x (1+K) logits are never stored. The queue is cut into `splits`
// contiguous ranges; `queue_contrastive_partial` streams one range for a few
// rows with an online softmax (running max m, running sum s of exp(l - m),
// and the exp-weighted key accumulator rescaled whenever m grows, as in flash
// attention), and writes one partial state per (row, split) to a workspace.
// `queue_contrastive_combine` then merges the partial states of each row with
// column 0 and writes the output. The workspace is B * splits * (4 + 2D)
// floats, independent of K.
//
// Partial state layout (floats), one record per (row, split), at
// work + (row * splits + split) * (4 + 2D):
//   [0] m    running max of the logits seen (-inf when the range is empty)
//   [1] s    sum of exp(l - m)
//   [2] pos  sum of the positive logits
//   [3] cnt  number of positives
//   [4, 4+D)       sum of exp(l - m) key
//   [4+D, 4+2D)    sum of the positive keys

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// One warp per row; a block holds this many rows (blockDim.x = 32 * ROWS).
#define ROWS_PER_BLOCK 8

// Each lane keeps dimensions lane, lane + 32, ... of the query and of both
// accumulators in registers, so D is at most 32 * DIMS_PER_LANE. The Rust
// launcher checks this bound (MAX_DIM there). The loops over these arrays
// are fully unrolled (so that the arrays stay in registers) and stop early
// at `n_t = ceil(D / 32)`, so a small D does not pay for the bound.
#define DIMS_PER_LANE 32

// Queue keys per shared-memory tile: at most one per lane, so that lane t can
// hold the logit of key t of the tile.
#define MAX_TILE_KEYS 32

#define EMPTY_SLOT 0xffffffffu

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Grid: (ceil(B / ROWS_PER_BLOCK), splits). Block: 32 * ROWS_PER_BLOCK threads.
// Dynamic shared memory: tile_keys * D floats.
//
// qs     [B, D]  queries divided by the temperature
// queue  [K, D]  negative keys (and same-id positives)
// rows   [B]     row ids, read only when use_ids != 0
// slots  [K]     slot ids (EMPTY_SLOT: never a positive), read only when use_ids != 0
// work   [B, splits, 4 + 2D]  partial states (written, every record)
// Split `split` covers queue slots [split * keys_per_split, min(K, (split + 1) * keys_per_split)).
extern "C" __global__ void __launch_bounds__(WARP_SIZE * ROWS_PER_BLOCK)
queue_contrastive_partial(
    const float* __restrict__ qs,
    const float* __restrict__ queue,
    const unsigned int* __restrict__ rows,
    const unsigned int* __restrict__ slots,
    float* __restrict__ work,
    int B, int K, int D, int splits, int keys_per_split, int tile_keys, int use_ids)
{
    extern __shared__ float tile[];  // [tile_keys, D]

    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE;
    const int split = blockIdx.y;
    // Whole warps are active or not, so the shuffles below see full warps.
    const bool active = row < B;

    const long long start = (long long)split * keys_per_split;
    const long long stop_ll = start + keys_per_split < K ? start + keys_per_split : K;
    const int j_begin = (int)(start < K ? start : K);
    const int j_end = (int)stop_ll;

    const int n_t = (D + WARP_SIZE - 1) / WARP_SIZE;
    float q[DIMS_PER_LANE], acc[DIMS_PER_LANE], pos_acc[DIMS_PER_LANE];
#pragma unroll
    for (int t = 0; t < DIMS_PER_LANE; ++t) {
        const int x = lane + WARP_SIZE * t;
        q[t] = (active && x < D) ? qs[(long long)row * D + x] : 0.0f;
        acc[t] = 0.0f;
        pos_acc[t] = 0.0f;
    }
    const unsigned int row_id = (active && use_ids) ? rows[row] : EMPTY_SLOT;

    float m = neg_inf();  // running max
    float s = 0.0f;       // sum of exp(l - m)
    float pos = 0.0f;     // sum of positive logits
    float cnt = 0.0f;     // number of positives

    for (int t0 = j_begin; t0 < j_end; t0 += tile_keys) {
        const int tn = min(tile_keys, j_end - t0);

        // Stage keys t0 .. t0 + tn in shared memory (every thread of the block
        // helps, active row or not). The first barrier keeps the previous tile
        // alive until every warp is done with it.
        __syncthreads();
        const float* src = queue + (long long)t0 * D;
        for (int e = threadIdx.x; e < tn * D; e += blockDim.x) tile[e] = src[e];
        __syncthreads();

        if (active) {
            // Lane jj ends up holding the logit of key jj of the tile.
            float my_logit = neg_inf();
            for (int jj = 0; jj < tn; ++jj) {
                const float* key = tile + jj * D;
                float d = 0.0f;
#pragma unroll
                for (int t = 0; t < DIMS_PER_LANE; ++t) {
                    if (t >= n_t) break;
                    const int x = lane + WARP_SIZE * t;
                    if (x < D) d += q[t] * key[x];
                }
                d = warp_sum(d);
                if (lane == jj) my_logit = d;
            }

            // Positives of this tile: one bit per key.
            bool my_pos = false;
            if (use_ids && lane < tn) {
                const unsigned int id = slots[t0 + lane];
                my_pos = id != EMPTY_SLOT && id == row_id;
            }
            const unsigned int pos_mask = __ballot_sync(FULL_MASK, my_pos);
            pos += warp_sum(my_pos ? my_logit : 0.0f);
            cnt += (float)__popc(pos_mask);

            // Online softmax: rescale the old state once per tile.
            const float m_new = fmaxf(m, warp_max(my_logit));
            const float scale = expf(m - m_new);  // 0 while m is -inf
            const float my_p = lane < tn ? expf(my_logit - m_new) : 0.0f;
            s = s * scale + warp_sum(my_p);
            m = m_new;

#pragma unroll
            for (int t = 0; t < DIMS_PER_LANE; ++t) {
                if (t >= n_t) break;
                acc[t] *= scale;
            }
            for (int jj = 0; jj < tn; ++jj) {
                const float p = __shfl_sync(FULL_MASK, my_p, jj);
                const bool is_pos = (pos_mask >> jj) & 1u;
                const float* key = tile + jj * D;
#pragma unroll
                for (int t = 0; t < DIMS_PER_LANE; ++t) {
                    if (t >= n_t) break;
                    const int x = lane + WARP_SIZE * t;
                    if (x < D) {
                        acc[t] += p * key[x];
                        if (is_pos) pos_acc[t] += key[x];
                    }
                }
            }
        }
    }

    if (!active) return;
    float* rec = work + ((long long)row * splits + split) * (4 + 2 * (long long)D);
    if (lane == 0) {
        rec[0] = m;
        rec[1] = s;
        rec[2] = pos;
        rec[3] = cnt;
    }
#pragma unroll
    for (int t = 0; t < DIMS_PER_LANE; ++t) {
        const int x = lane + WARP_SIZE * t;
        if (x < D) {
            rec[4 + x] = acc[t];
            rec[4 + D + x] = pos_acc[t];
        }
    }
}

// Grid: ceil(B / ROWS_PER_BLOCK). Block: 32 * ROWS_PER_BLOCK threads.
//
// qs, k  [B, D]; work as written by queue_contrastive_partial;
// out    [B, 3 + 2D] (layout in the file header).
extern "C" __global__ void __launch_bounds__(WARP_SIZE * ROWS_PER_BLOCK)
queue_contrastive_combine(
    const float* __restrict__ qs,
    const float* __restrict__ k,
    const float* __restrict__ work,
    float* __restrict__ out,
    int B, int D, int splits)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE;
    if (row >= B) return;  // whole warps leave together

    const float* q = qs + (long long)row * D;
    const float* key0 = k + (long long)row * D;
    const long long rec_len = 4 + 2 * (long long)D;
    const float* recs = work + (long long)row * splits * rec_len;

    // Column 0, the row's own positive key.
    float l0 = 0.0f;
    for (int x = lane; x < D; x += WARP_SIZE) l0 += q[x] * key0[x];
    l0 = warp_sum(l0);

    // The global max over column 0 and every split (empty splits hold -inf).
    float m = l0;
    for (int sp = 0; sp < splits; ++sp) m = fmaxf(m, recs[sp * rec_len + 0]);

    // m is finite (it is at least l0), so exp(-inf - m) = 0 drops empty splits.
    const float w0 = expf(l0 - m);
    float s = w0;
    float pos = l0;
    float cnt = 1.0f;
    for (int sp = 0; sp < splits; ++sp) {
        const float* rec = recs + sp * rec_len;
        s += rec[1] * expf(rec[0] - m);
        pos += rec[2];
        cnt += rec[3];
    }
    const float lse = m + logf(s);

    float* o = out + (long long)row * (3 + 2 * (long long)D);
    if (lane == 0) {
        o[0] = lse - pos / cnt;
        o[1] = lse;
        o[2] = cnt;
    }
    const float inv_s = 1.0f / s;
    for (int x = lane; x < D; x += WARP_SIZE) {
        float a = w0 * key0[x];
        float pk = key0[x];
        for (int sp = 0; sp < splits; ++sp) {
            const float* rec = recs + sp * rec_len;
            a += expf(rec[0] - m) * rec[4 + x];
            pk += rec[4 + D + x];
        }
        o[3 + x] = a * inv_s;
        o[3 + D + x] = pk;
    }
}
