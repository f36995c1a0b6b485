// Forward pass of the fused task-level KL over lockstep queues (COTS task level).
//
// CPU reference: crates/cots-ops/src/queue_fused.rs (QueueKlOp);
// Rust launcher: crates/cots-ops/src/queue_kl_cuda.rs, which compiles this
// file with NVRTC at run time. It must also compile with
// `nvcc -arch=sm_90 -ptx -Werror all-warnings` (see `cargo xtask kernels`),
// and it includes no header so that NVRTC needs no include path.
//
// For row i, with fs = f / tau and ts = t / tau:
//   a_j = fs_i . keyT_j, keyT_0 = t_m_i, keyT_j = queue_t_{j-1} (j = 1..K)
//   b_j = ts_i . keyI_j, keyI_0 = f_m_i, keyI_j = queue_i_{j-1}
//   P = softmax(a), Q = softmax(b), c = a - b, c_0 = a_0 - b_0
//   KL(P||Q) = E_P[c] - lse(a) + lse(b),  KL(Q||P) = -E_Q[c] - lse(b) + lse(a)
// The c-weighted sums are centred at the row's own pair, c - c_0 (only c
// minus its expectation reaches the gradients; see QueueKlOp).
// and the KL of the direction is w_pq KL(P||Q) + w_qp KL(Q||P) with
// (w_pq, w_qp) = (1, 0), (0, 1) or (1/2, 1/2). Output row i, 5 + n D floats:
//   [0] KL    [1] lse(a)    [2] lse(b)    [3] E_P[c] - c_0    [4] E_Q[c] - c_0
//   then n blocks of D floats, in this order:
//     sum_j P_j keyT_j, sum_j Q_j keyI_j,
//     if w_pq > 0: sum_j P_j (c_j - c_0) keyT_j, sum_j P_j keyI_j,
//     if w_qp > 0: sum_j Q_j keyT_j, sum_j Q_j (c_j - c_0) keyI_j
//   (n = 4 for one direction, 6 for both).
//
// The B x (1+K) logits are never stored. As in queue_contrastive.cu, the
// queue is cut into `splits` contiguous ranges; `queue_kl_partial` streams
// one range for a few rows with two online softmaxes (running maxima, sums of
// exp(logit - max), of exp(logit - max) (c - c_0), and exp-weighted key
// accumulators rescaled whenever a max grows, as in flash attention) and
// writes one partial state per (row, split) to a workspace; `queue_kl_combine`
// merges each row's partial states with column 0 and writes the output. The
// workspace is B * splits * (6 + n D) floats, independent of K.
//
// Partial state layout (floats), one record per (row, split), at
// work + (row * splits + split) * (6 + n D):
//   [0] m_a   running max of a (-inf when the range is empty)
//   [1] s_a   sum of exp(a - m_a)
//   [2] c_a   sum of exp(a - m_a) (c - c_0)
//   [3] m_b, [4] s_b, [5] c_b   the same for b
//   [6, 6 + n D)   the n blocks, unnormalised (weights exp(a - m_a) or exp(b - m_b))

#define WARP_SIZE 32
#define FULL_MASK 0xffffffffu

// One warp per row; a block holds this many rows (blockDim.x = 32 * ROWS).
#define ROWS_PER_BLOCK 8

// Each lane keeps dimensions lane, lane + 32, ... of both queries and of the
// (up to six) accumulators in registers, so D is at most 32 * DIMS_PER_LANE
// (MAX_DIM in the Rust launcher, which checks it). The loops over these
// arrays are fully unrolled, so that the arrays stay in registers, and stop
// early at `n_t = ceil(D / 32)`.
#define DIMS_PER_LANE 16

// Queue keys per shared-memory tile at most: one per lane, so that lane t
// can hold the logits of key t of the tile.
#define MAX_TILE_KEYS 32

#define STATS 6
#define HEAD 5

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP_SIZE / 2; o > 0; o /= 2) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Number of D-wide blocks for the direction's terms.
__device__ __forceinline__ int block_count(int pq, int qp) { return 2 + (pq ? 2 : 0) + (qp ? 2 : 0); }

// Grid: (ceil(B / ROWS_PER_BLOCK), splits). Block: 32 * ROWS_PER_BLOCK threads.
// Dynamic shared memory: 2 * tile_keys * D floats.
//
// fs, ts             [B, D]  queries divided by the temperature
// t_m, f_m           [B, D]  the rows' own momentum keys (for c_0 only)
// queue_t, queue_i   [K, D]  the lockstep queues
// work               [B, splits, 6 + n D]  partial states (written, every record)
// pq, qp             whether KL(P||Q), KL(Q||P) is part of the direction
// Split `split` covers queue slots [split * keys_per_split, min(K, (split + 1) * keys_per_split)).
extern "C" __global__ void __launch_bounds__(WARP_SIZE * ROWS_PER_BLOCK)
queue_kl_partial(
    const float* __restrict__ fs,
    const float* __restrict__ ts,
    const float* __restrict__ t_m,
    const float* __restrict__ f_m,
    const float* __restrict__ queue_t,
    const float* __restrict__ queue_i,
    float* __restrict__ work,
    int B, int K, int D, int splits, int keys_per_split, int tile_keys, int pq, int qp)
{
    extern __shared__ float smem[];  // [tile_keys, D] text keys, then [tile_keys, D] image keys
    float* tile_t = smem;
    float* tile_i = smem + tile_keys * D;

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
    float f[DIMS_PER_LANE], t[DIMS_PER_LANE];
    // p_kt: sum P keyT; q_ki: sum Q keyI; pc_kt: sum P c keyT; p_ki: sum P keyI;
    // q_kt: sum Q keyT; qc_ki: sum Q c keyI (all with unnormalised weights).
    float p_kt[DIMS_PER_LANE], q_ki[DIMS_PER_LANE], pc_kt[DIMS_PER_LANE], p_ki[DIMS_PER_LANE];
    float q_kt[DIMS_PER_LANE], qc_ki[DIMS_PER_LANE];
#pragma unroll
    for (int u = 0; u < DIMS_PER_LANE; ++u) {
        const int x = lane + WARP_SIZE * u;
        f[u] = (active && x < D) ? fs[(long long)row * D + x] : 0.0f;
        t[u] = (active && x < D) ? ts[(long long)row * D + x] : 0.0f;
        p_kt[u] = 0.0f;
        q_ki[u] = 0.0f;
        pc_kt[u] = 0.0f;
        p_ki[u] = 0.0f;
        q_kt[u] = 0.0f;
        qc_ki[u] = 0.0f;
    }

    // c_0 = fs_i . t_m_i - ts_i . f_m_i, the shift of c.
    float a0 = 0.0f, b0 = 0.0f;
#pragma unroll
    for (int u = 0; u < DIMS_PER_LANE; ++u) {
        if (u >= n_t) break;
        const int x = lane + WARP_SIZE * u;
        if (active && x < D) {
            a0 += f[u] * t_m[(long long)row * D + x];
            b0 += t[u] * f_m[(long long)row * D + x];
        }
    }
    const float c0 = warp_sum(a0) - warp_sum(b0);

    float m_a = neg_inf(), s_a = 0.0f, c_a = 0.0f;
    float m_b = neg_inf(), s_b = 0.0f, c_b = 0.0f;

    for (int t0 = j_begin; t0 < j_end; t0 += tile_keys) {
        const int tn = min(tile_keys, j_end - t0);

        // Stage keys t0 .. t0 + tn of both queues in shared memory (every
        // thread of the block helps). The first barrier keeps the previous
        // tile alive until every warp is done with it.
        __syncthreads();
        const float* src_t = queue_t + (long long)t0 * D;
        const float* src_i = queue_i + (long long)t0 * D;
        for (int e = threadIdx.x; e < tn * D; e += blockDim.x) {
            tile_t[e] = src_t[e];
            tile_i[e] = src_i[e];
        }
        __syncthreads();

        if (active) {
            // Lane jj ends up holding the logits of key jj of the tile.
            float my_a = neg_inf(), my_b = neg_inf();
            for (int jj = 0; jj < tn; ++jj) {
                const float* kt = tile_t + jj * D;
                const float* ki = tile_i + jj * D;
                float da = 0.0f, db = 0.0f;
#pragma unroll
                for (int u = 0; u < DIMS_PER_LANE; ++u) {
                    if (u >= n_t) break;
                    const int x = lane + WARP_SIZE * u;
                    if (x < D) {
                        da += f[u] * kt[x];
                        db += t[u] * ki[x];
                    }
                }
                da = warp_sum(da);
                db = warp_sum(db);
                if (lane == jj) {
                    my_a = da;
                    my_b = db;
                }
            }

            // Online softmaxes: rescale the old state once per tile.
            const float ma_new = fmaxf(m_a, warp_max(my_a));
            const float mb_new = fmaxf(m_b, warp_max(my_b));
            const float scale_a = expf(m_a - ma_new);  // 0 while m_a is -inf
            const float scale_b = expf(m_b - mb_new);
            const bool live = lane < tn;
            const float my_c = live ? (my_a - my_b) - c0 : 0.0f;
            const float my_wa = live ? expf(my_a - ma_new) : 0.0f;
            const float my_wb = live ? expf(my_b - mb_new) : 0.0f;
            s_a = s_a * scale_a + warp_sum(my_wa);
            s_b = s_b * scale_b + warp_sum(my_wb);
            c_a = c_a * scale_a + warp_sum(my_wa * my_c);
            c_b = c_b * scale_b + warp_sum(my_wb * my_c);
            m_a = ma_new;
            m_b = mb_new;

#pragma unroll
            for (int u = 0; u < DIMS_PER_LANE; ++u) {
                if (u >= n_t) break;
                p_kt[u] *= scale_a;
                pc_kt[u] *= scale_a;
                p_ki[u] *= scale_a;
                q_ki[u] *= scale_b;
                q_kt[u] *= scale_b;
                qc_ki[u] *= scale_b;
            }
            for (int jj = 0; jj < tn; ++jj) {
                const float wa = __shfl_sync(FULL_MASK, my_wa, jj);
                const float wb = __shfl_sync(FULL_MASK, my_wb, jj);
                const float c = __shfl_sync(FULL_MASK, my_c, jj);
                const float wac = wa * c, wbc = wb * c;
                const float* kt = tile_t + jj * D;
                const float* ki = tile_i + jj * D;
#pragma unroll
                for (int u = 0; u < DIMS_PER_LANE; ++u) {
                    if (u >= n_t) break;
                    const int x = lane + WARP_SIZE * u;
                    if (x < D) {
                        const float vt = kt[x], vi = ki[x];
                        p_kt[u] += wa * vt;
                        q_ki[u] += wb * vi;
                        if (pq) {
                            pc_kt[u] += wac * vt;
                            p_ki[u] += wa * vi;
                        }
                        if (qp) {
                            q_kt[u] += wb * vt;
                            qc_ki[u] += wbc * vi;
                        }
                    }
                }
            }
        }
    }

    if (!active) return;
    const int n = block_count(pq, qp);
    float* rec = work + ((long long)row * splits + split) * (STATS + n * (long long)D);
    if (lane == 0) {
        rec[0] = m_a;
        rec[1] = s_a;
        rec[2] = c_a;
        rec[3] = m_b;
        rec[4] = s_b;
        rec[5] = c_b;
    }
    float* blocks = rec + STATS;
#pragma unroll
    for (int u = 0; u < DIMS_PER_LANE; ++u) {
        const int x = lane + WARP_SIZE * u;
        if (x < D) {
            int slot = 0;
            blocks[(slot++) * D + x] = p_kt[u];
            blocks[(slot++) * D + x] = q_ki[u];
            if (pq) {
                blocks[(slot++) * D + x] = pc_kt[u];
                blocks[(slot++) * D + x] = p_ki[u];
            }
            if (qp) {
                blocks[(slot++) * D + x] = q_kt[u];
                blocks[(slot++) * D + x] = qc_ki[u];
            }
        }
    }
}

// Grid: ceil(B / ROWS_PER_BLOCK). Block: 32 * ROWS_PER_BLOCK threads.
//
// fs, ts, t_m, f_m  [B, D]; work as written by queue_kl_partial;
// out               [B, 5 + n D] (layout in the file header).
extern "C" __global__ void __launch_bounds__(WARP_SIZE * ROWS_PER_BLOCK)
queue_kl_combine(
    const float* __restrict__ fs,
    const float* __restrict__ ts,
    const float* __restrict__ t_m,
    const float* __restrict__ f_m,
    const float* __restrict__ work,
    float* __restrict__ out,
    int B, int D, int splits, int pq, int qp)
{
    const int lane = threadIdx.x % WARP_SIZE;
    const int row = blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / WARP_SIZE;
    if (row >= B) return;  // whole warps leave together

    const int n = block_count(pq, qp);
    const float* f = fs + (long long)row * D;
    const float* t = ts + (long long)row * D;
    const float* kt0 = t_m + (long long)row * D;
    const float* ki0 = f_m + (long long)row * D;
    const long long rec_len = STATS + n * (long long)D;
    const float* recs = work + (long long)row * splits * rec_len;

    // Column 0, the row's own momentum keys.
    float a0 = 0.0f, b0 = 0.0f;
    for (int x = lane; x < D; x += WARP_SIZE) {
        a0 += f[x] * kt0[x];
        b0 += t[x] * ki0[x];
    }
    a0 = warp_sum(a0);
    b0 = warp_sum(b0);
    const float c0 = a0 - b0;

    // The global maxima over column 0 and every split (empty splits hold -inf).
    float m_a = a0, m_b = b0;
    for (int sp = 0; sp < splits; ++sp) {
        m_a = fmaxf(m_a, recs[sp * rec_len + 0]);
        m_b = fmaxf(m_b, recs[sp * rec_len + 3]);
    }

    // The maxima are finite (at least a0, b0), so exp(-inf - m) = 0 drops
    // empty splits. Column 0's centred c is 0.
    const float w0a = expf(a0 - m_a), w0b = expf(b0 - m_b);
    float s_a = w0a, c_a = 0.0f, s_b = w0b, c_b = 0.0f;
    for (int sp = 0; sp < splits; ++sp) {
        const float* rec = recs + sp * rec_len;
        const float fa = expf(rec[0] - m_a), fb = expf(rec[3] - m_b);
        s_a += rec[1] * fa;
        c_a += rec[2] * fa;
        s_b += rec[4] * fb;
        c_b += rec[5] * fb;
    }
    const float lse_a = m_a + logf(s_a), lse_b = m_b + logf(s_b);
    // Centred: E_P[c] - c_0 and E_Q[c] - c_0.
    const float e_p = c_a / s_a, e_q = c_b / s_b;
    const float w_pq = pq ? (qp ? 0.5f : 1.0f) : 0.0f;
    const float w_qp = qp ? (pq ? 0.5f : 1.0f) : 0.0f;

    float* o = out + (long long)row * (HEAD + n * (long long)D);
    if (lane == 0) {
        o[0] = w_pq * (e_p + c0 - lse_a + lse_b) + w_qp * (-(e_q + c0) - lse_b + lse_a);
        o[1] = lse_a;
        o[2] = lse_b;
        o[3] = e_p;
        o[4] = e_q;
    }
    const float inv_a = 1.0f / s_a, inv_b = 1.0f / s_b;
    float* blocks = o + HEAD;
    for (int blk = 0; blk < n; ++blk) {
        // Which block: 0 P keyT, 1 Q keyI, 2 P c keyT, 3 P keyI, 4 Q keyT, 5 Q c keyI.
        const int kind = blk < 2 ? blk : (pq ? blk : blk + 2);
        const bool under_p = kind == 0 || kind == 2 || kind == 3;
        const bool text_keys = kind == 0 || kind == 2 || kind == 4;
        // Column 0 adds nothing to the centred blocks (c_0 - c_0 = 0).
        const float w0 = (kind == 2 || kind == 5) ? 0.0f : (under_p ? w0a : w0b);
        const float m = under_p ? m_a : m_b;
        const float inv = under_p ? inv_a : inv_b;
        const float* key0 = text_keys ? kt0 : ki0;
        for (int x = lane; x < D; x += WARP_SIZE) {
            float acc = w0 * key0[x];
            for (int sp = 0; sp < splits; ++sp) {
                const float* rec = recs + sp * rec_len;
                acc += expf(rec[under_p ? 0 : 3] - m) * rec[STATS + blk * D + x];
            }
            blocks[blk * D + x] = acc * inv;
        }
    }
}
