// Sparse MLA decode in the absorbed (MQA) form, bf16 latent, fp32 math (CPU twin:
// kernels/src/cpu/attention.rs::mla_sparse_attention). For query token b and head h:
//   logit[j] = scale * q[b, h, :] . kv[idx[b, j], :]   (width = kv_lora + rope)
//   out[b, h, :] = sum_j softmax(logit)[j] * kv[idx[b, j], :kv_lora]
// An index < 0 or >= n_rows is an invalid slot (skipped); a row with no valid key gives zeros.
//
// CTA = (token b, group of 16 heads, split s of the index list); 256 threads. Keys arrive in
// tiles of 16 gathered into shared memory (rows padded by one word: conflict-free column reads).
// QK: thread (h = t / 16, j = t % 16) computes one logit; online softmax per head inside its
// half-warp (finite running max, no inf - inf). PV: thread t owns columns 2t, 2t+1 for all 16
// heads (32 fp32 accumulators). splits == 1 writes bf16 output directly; otherwise fp32 partial
// O (unnormalised) and (max, sum) go to the workspace and `mla_combine` merges the splits.
// CUDA cores only (no MMA yet). Limits (wrapper-checked): kv_lora even and <= 512,
// kv_lora + rope <= 576 and even, heads % 16 == 0.
// Launch: grid = (heads / 16, batch, splits), block = 256.

#define MLA_HG 16
#define MLA_TILE 16
#define MLA_MAXW 576
#define MLA_ROWW (MLA_MAXW / 2 + 1)  // u32 words per padded smem row

extern "C" __global__ void __launch_bounds__(256)
mla_sparse_decode_bf16(const bf16_t* __restrict__ q,     // [batch, heads, width]
                       const bf16_t* __restrict__ kv,    // [n_rows, width]
                       const int* __restrict__ idx,      // [batch, topk]
                       bf16_t* __restrict__ out,         // [batch, heads, kv_lora]
                       float* __restrict__ ws_o,         // [batch, splits, heads, kv_lora]
                       float* __restrict__ ws_ml,        // [batch, splits, heads, 2]
                       int heads, int kv_lora, int rope, int topk, int n_rows, float scale) {
    __shared__ u32 qs[MLA_HG * MLA_ROWW];
    __shared__ u32 ks[MLA_TILE * MLA_ROWW];
    __shared__ __align__(16) float pt[MLA_TILE][MLA_HG];  // p transposed: [key][head]
    __shared__ float alpha_s[MLA_HG];
    __shared__ float l_s[MLA_HG], m_s[MLA_HG];
    __shared__ int rows_s[MLA_TILE];
    const int width = kv_lora + rope, ww = width / 2;
    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x;
    // Load the 16 heads' queries (as u32 pairs of bf16).
    const u32* qg = reinterpret_cast<const u32*>(q + ((size_t)b * heads + hg * MLA_HG) * width);
    for (int e = tid; e < MLA_HG * ww; e += 256) qs[(e / ww) * MLA_ROWW + e % ww] = qg[e % ww + (e / ww) * ww];
    // This split's share of the index list.
    const int per = (topk + splits - 1) / splits;
    const int j0 = split * per, j1 = min(topk, j0 + per);
    const int* ib = idx + (size_t)b * topk;
    const int h = tid / MLA_TILE, jj = tid % MLA_TILE;  // QK role
    float m_run = -1e30f, l_run = 0.0f;                   // replicated over the half-warp
    const int c0 = 2 * tid;                               // PV role: columns c0, c0 + 1
    float acc0[MLA_HG], acc1[MLA_HG];
#pragma unroll
    for (int i = 0; i < MLA_HG; ++i) { acc0[i] = 0.0f; acc1[i] = 0.0f; }
    for (int t0 = j0; t0 < j1; t0 += MLA_TILE) {
        __syncthreads();  // previous tile fully consumed (and qs loaded on the first pass)
        if (tid < MLA_TILE) {
            const int j = t0 + tid;
            int r = j < j1 ? ib[j] : -1;
            rows_s[tid] = (r >= 0 && r < n_rows) ? r : -1;
        }
        __syncthreads();
        for (int e = tid; e < MLA_TILE * ww; e += 256) {
            const int kr = e / ww, c = e % ww;
            const int r = rows_s[kr];
            ks[kr * MLA_ROWW + c] = r >= 0 ? reinterpret_cast<const u32*>(kv + (size_t)r * width)[c] : 0u;
        }
        __syncthreads();
        // QK: one logit per thread.
        float logit = -INFINITY;
        if (rows_s[jj] >= 0) {
            const u32* qr = qs + h * MLA_ROWW;
            const u32* kr = ks + jj * MLA_ROWW;
            float d0 = 0.0f, d1 = 0.0f;
            for (int c = 0; c < ww; ++c) {
                const u32 a = qr[c], k = kr[c];
                d0 += bf16_to_f32((bf16_t)(a & 0xffffu)) * bf16_to_f32((bf16_t)(k & 0xffffu));
                d1 += bf16_to_f32((bf16_t)(a >> 16)) * bf16_to_f32((bf16_t)(k >> 16));
            }
            logit = scale * (d0 + d1);
        }
        float tmax = logit;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) tmax = fmaxf(tmax, __shfl_xor_sync(0xffffffffu, tmax, o));
        const float m_new = fmaxf(m_run, tmax);  // finite: m_run starts at -1e30
        const float p = logit == -INFINITY ? 0.0f : expf(logit - m_new);
        const float alpha = expf(m_run - m_new);
        float psum = p;
#pragma unroll
        for (int o = 8; o > 0; o >>= 1) psum += __shfl_xor_sync(0xffffffffu, psum, o);
        l_run = l_run * alpha + psum;
        m_run = m_new;
        pt[jj][h] = p;
        if (jj == 0) alpha_s[h] = alpha;
        __syncthreads();
        // PV.
        if (c0 < kv_lora) {
#pragma unroll
            for (int i = 0; i < MLA_HG; ++i) { acc0[i] *= alpha_s[i]; acc1[i] *= alpha_s[i]; }
            for (int j = 0; j < MLA_TILE; ++j) {
                const u32 v = ks[j * MLA_ROWW + tid];
                const float v0 = bf16_to_f32((bf16_t)(v & 0xffffu));
                const float v1 = bf16_to_f32((bf16_t)(v >> 16));
                const float4* pr = reinterpret_cast<const float4*>(pt[j]);
#pragma unroll
                for (int g = 0; g < MLA_HG / 4; ++g) {
                    const float4 pp = pr[g];
                    acc0[4 * g] += pp.x * v0; acc1[4 * g] += pp.x * v1;
                    acc0[4 * g + 1] += pp.y * v0; acc1[4 * g + 1] += pp.y * v1;
                    acc0[4 * g + 2] += pp.z * v0; acc1[4 * g + 2] += pp.z * v1;
                    acc0[4 * g + 3] += pp.w * v0; acc1[4 * g + 3] += pp.w * v1;
                }
            }
        }
    }
    __syncthreads();
    if (jj == 0) { l_s[h] = l_run; m_s[h] = m_run; }
    __syncthreads();
    if (c0 >= kv_lora) return;
    if (splits == 1) {
#pragma unroll
        for (int i = 0; i < MLA_HG; ++i) {
            const float l = l_s[i];
            const float inv = l > 0.0f ? 1.0f / l : 0.0f;
            const u32 packed = (u32)f32_to_bf16(acc0[i] * inv) | ((u32)f32_to_bf16(acc1[i] * inv) << 16);
            reinterpret_cast<u32*>(out + ((size_t)b * heads + hg * MLA_HG + i) * kv_lora)[tid] = packed;
        }
    } else {
#pragma unroll
        for (int i = 0; i < MLA_HG; ++i) {
            const size_t row = (((size_t)b * splits + split) * heads + hg * MLA_HG + i);
            reinterpret_cast<float2*>(ws_o + row * kv_lora)[tid] = make_float2(acc0[i], acc1[i]);
            if (tid == 0) { ws_ml[2 * row] = m_s[i]; ws_ml[2 * row + 1] = l_s[i]; }
        }
    }
}

// Merges the splits: out = sum_s e^(m_s - M) O_s / sum_s e^(m_s - M) l_s (zeros when no key).
// Launch: grid = (heads, batch), block = 256.
extern "C" __global__ void mla_combine(const float* __restrict__ ws_o, const float* __restrict__ ws_ml,
                                       bf16_t* __restrict__ out, int heads, int kv_lora,
                                       int splits) {
    const int h = blockIdx.x, b = blockIdx.y;
    float M = -1e30f;
    for (int s = 0; s < splits; ++s) {
        const size_t row = ((size_t)b * splits + s) * heads + h;
        if (ws_ml[2 * row + 1] > 0.0f) M = fmaxf(M, ws_ml[2 * row]);
    }
    float L = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const size_t row = ((size_t)b * splits + s) * heads + h;
        const float l = ws_ml[2 * row + 1];
        if (l > 0.0f) L += expf(ws_ml[2 * row] - M) * l;
    }
    const float inv = L > 0.0f ? 1.0f / L : 0.0f;
    for (int c = threadIdx.x; c < kv_lora; c += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const size_t row = ((size_t)b * splits + s) * heads + h;
            const float l = ws_ml[2 * row + 1];
            if (l > 0.0f) a += expf(ws_ml[2 * row] - M) * ws_o[row * kv_lora + c];
        }
        out[((size_t)b * heads + h) * kv_lora + c] = f32_to_bf16(a * inv);
    }
}

// Tensor-core version (default): same math, grid and workspace as above, bf16 MMA
// (mma.sync m16n8k16, fp32 accumulate). CTA = 4 warps for 16 heads; per tile of 16 keys:
// QK as [16 heads x width] . [width x 16 keys] with the K dimension split over the 4 warps
// (partials summed through shared memory), online softmax by 8 threads per head (P rounded
// to bf16 for the PV MMA, the row sums kept in fp32), PV as [16 heads x 16 keys] . [16 keys x
// kv_lora] with each warp owning kv_lora / 4 output columns (<= 16 n-tiles, 64 fp32 registers).
// Limits (wrapper-checked): width % 16 == 0, kv_lora % 32 == 0, kv_lora <= 512, width <= 576.
// Launch: grid = (heads / 16, batch, splits), block = 128.

#define MM_W 292  // u32 words per padded row (576 / 2 + 4): conflict-free fragment loads
#define MM_PW 12  // u32 words per padded P row (16 keys / 2 + 4)
#define MM_PRE 9  // 16-byte chunks per thread of a 16-key tile (16 * 72 / 128)

__device__ __forceinline__ void mm_mma(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

extern "C" __global__ void __launch_bounds__(128)
mla_sparse_decode_mma_bf16(const bf16_t* __restrict__ q, const bf16_t* __restrict__ kv,
                           const int* __restrict__ idx, bf16_t* __restrict__ out,
                           float* __restrict__ ws_o, float* __restrict__ ws_ml, int heads,
                           int kv_lora, int rope, int topk, int n_rows, float scale) {
    __shared__ __align__(16) u32 qs[MLA_HG * MM_W];
    __shared__ __align__(16) u32 ks[MLA_TILE * MM_W];
    __shared__ float part[4][MLA_HG][MLA_TILE];
    __shared__ u32 ps[MLA_HG * MM_PW];
    __shared__ float alpha_s[MLA_HG], m_s[MLA_HG], l_s[MLA_HG];
    __shared__ int rows_s[MLA_TILE];
    const int width = kv_lora + rope, w16 = width / 8;  // 16-byte chunks per row
    const int hg = blockIdx.x, b = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int g = lane >> 2, tq = lane & 3;
    {
        const uint4* qg = reinterpret_cast<const uint4*>(q + ((size_t)b * heads + hg * MLA_HG) * width);
        for (int e = tid; e < MLA_HG * w16; e += 128)
            reinterpret_cast<uint4*>(qs + (e / w16) * MM_W)[e % w16] = qg[e];
    }
    if (tid < MLA_HG) { m_s[tid] = -1e30f; l_s[tid] = 0.0f; }
    const int per = (topk + splits - 1) / splits;
    const int j0 = split * per, j1 = min(topk, j0 + per);
    const int* ib = idx + (size_t)b * topk;
    const int nk = width / 16;              // QK k-tiles
    const int cols = kv_lora / 4;           // PV columns of this warp
    const int ntw = cols / 8;               // PV n-tiles of this warp (<= 16)
    const int cbase = warp * cols;
    float acc[16][4];
#pragma unroll
    for (int i = 0; i < 16; ++i) { acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.0f; }
    const unsigned short* ks16 = reinterpret_cast<const unsigned short*>(ks);
    // Software pipeline: the next tile's rows are gathered into registers (MM_PRE 16-byte chunks
    // per thread) while the current tile is computed.
    uint4 pre[MM_PRE];
#define MM_FETCH(T0)                                                                          \
    _Pragma("unroll") for (int u = 0; u < MM_PRE; ++u) {                                       \
        const int e = tid + 128 * u;                                                           \
        pre[u] = make_uint4(0, 0, 0, 0);                                                       \
        if (e < MLA_TILE * w16) {                                                              \
            const int j = (T0) + e / w16;                                                      \
            const int r = j < j1 ? __ldg(ib + j) : -1;                                         \
            if (r >= 0 && r < n_rows)                                                          \
                pre[u] = __ldg(reinterpret_cast<const uint4*>(kv + (size_t)r * width) + e % w16); \
        }                                                                                      \
    }
    if (j0 < j1) { MM_FETCH(j0) }
    for (int t0 = j0; t0 < j1; t0 += MLA_TILE) {
        __syncthreads();  // the previous tile is consumed
        if (tid < MLA_TILE) {
            const int j = t0 + tid;
            const int r = j < j1 ? ib[j] : -1;
            rows_s[tid] = (r >= 0 && r < n_rows) ? r : -1;
        }
#pragma unroll
        for (int u = 0; u < MM_PRE; ++u) {
            const int e = tid + 128 * u;
            if (e < MLA_TILE * w16) reinterpret_cast<uint4*>(ks + (e / w16) * MM_W)[e % w16] = pre[u];
        }
        __syncthreads();
        if (t0 + MLA_TILE < j1) { MM_FETCH(t0 + MLA_TILE) }
        // QK partials over this warp's k-tiles (kt = warp, warp + 4, ...).
        float c0[4] = {0.0f, 0.0f, 0.0f, 0.0f}, c1[4] = {0.0f, 0.0f, 0.0f, 0.0f};
        for (int kt = warp; kt < nk; kt += 4) {
            const int o = kt * 8 + tq;
            const u32 a0 = qs[g * MM_W + o], a1 = qs[(g + 8) * MM_W + o];
            const u32 a2 = qs[g * MM_W + o + 4], a3 = qs[(g + 8) * MM_W + o + 4];
            mm_mma(c0, a0, a1, a2, a3, ks[g * MM_W + o], ks[g * MM_W + o + 4]);
            mm_mma(c1, a0, a1, a2, a3, ks[(8 + g) * MM_W + o], ks[(8 + g) * MM_W + o + 4]);
        }
        part[warp][g][2 * tq] = c0[0];
        part[warp][g][2 * tq + 1] = c0[1];
        part[warp][g + 8][2 * tq] = c0[2];
        part[warp][g + 8][2 * tq + 1] = c0[3];
        part[warp][g][8 + 2 * tq] = c1[0];
        part[warp][g][8 + 2 * tq + 1] = c1[1];
        part[warp][g + 8][8 + 2 * tq] = c1[2];
        part[warp][g + 8][8 + 2 * tq + 1] = c1[3];
        __syncthreads();
        {
            // Online softmax: 8 threads per head, 2 keys each.
            const int h = tid >> 3, jp = tid & 7, ja = 2 * jp, jb = ja + 1;
            const float la = rows_s[ja] >= 0
                ? scale * (part[0][h][ja] + part[1][h][ja] + part[2][h][ja] + part[3][h][ja])
                : -INFINITY;
            const float lb = rows_s[jb] >= 0
                ? scale * (part[0][h][jb] + part[1][h][jb] + part[2][h][jb] + part[3][h][jb])
                : -INFINITY;
            float mx = fmaxf(la, lb);
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, o));
            const float m_old = m_s[h];
            const float m_new = fmaxf(m_old, mx);  // finite: m starts at -1e30
            const float alpha = expf(m_old - m_new);
            const float p0 = la == -INFINITY ? 0.0f : expf(la - m_new);
            const float p1 = lb == -INFINITY ? 0.0f : expf(lb - m_new);
            float sum = p0 + p1;
#pragma unroll
            for (int o = 4; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
            ps[h * MM_PW + jp] = (u32)f32_to_bf16(p0) | ((u32)f32_to_bf16(p1) << 16);
            if (jp == 0) {
                m_s[h] = m_new;
                l_s[h] = l_s[h] * alpha + sum;
                alpha_s[h] = alpha;
            }
        }
        __syncthreads();
        // PV.
        const float al0 = alpha_s[g], al1 = alpha_s[g + 8];
        const u32 a0 = ps[g * MM_PW + tq], a1 = ps[(g + 8) * MM_PW + tq];
        const u32 a2 = ps[g * MM_PW + 4 + tq], a3 = ps[(g + 8) * MM_PW + 4 + tq];
#pragma unroll
        for (int nt = 0; nt < 16; ++nt) {
            if (nt < ntw) {
                acc[nt][0] *= al0; acc[nt][1] *= al0; acc[nt][2] *= al1; acc[nt][3] *= al1;
                const int c = cbase + nt * 8 + g;
                const u32 b0 = (u32)ks16[(2 * tq) * 2 * MM_W + c] | ((u32)ks16[(2 * tq + 1) * 2 * MM_W + c] << 16);
                const u32 b1 = (u32)ks16[(2 * tq + 8) * 2 * MM_W + c] | ((u32)ks16[(2 * tq + 9) * 2 * MM_W + c] << 16);
                mm_mma(acc[nt], a0, a1, a2, a3, b0, b1);
            }
        }
    }
    __syncthreads();
    const float l0 = l_s[g], l1 = l_s[g + 8];
#pragma unroll
    for (int nt = 0; nt < 16; ++nt) {
        if (nt < ntw) {
            const int c = cbase + nt * 8 + 2 * tq;
            const int h0 = hg * MLA_HG + g, h1 = h0 + 8;
            if (splits == 1) {
                const float i0 = l0 > 0.0f ? 1.0f / l0 : 0.0f, i1 = l1 > 0.0f ? 1.0f / l1 : 0.0f;
                *reinterpret_cast<u32*>(out + ((size_t)b * heads + h0) * kv_lora + c) =
                    (u32)f32_to_bf16(acc[nt][0] * i0) | ((u32)f32_to_bf16(acc[nt][1] * i0) << 16);
                *reinterpret_cast<u32*>(out + ((size_t)b * heads + h1) * kv_lora + c) =
                    (u32)f32_to_bf16(acc[nt][2] * i1) | ((u32)f32_to_bf16(acc[nt][3] * i1) << 16);
            } else {
                const size_t row0 = ((size_t)b * splits + split) * heads + h0, row1 = row0 + 8;
                *reinterpret_cast<float2*>(ws_o + row0 * kv_lora + c) = make_float2(acc[nt][0], acc[nt][1]);
                *reinterpret_cast<float2*>(ws_o + row1 * kv_lora + c) = make_float2(acc[nt][2], acc[nt][3]);
            }
        }
    }
    if (splits > 1 && tid < MLA_HG) {
        const size_t row = ((size_t)b * splits + split) * heads + hg * MLA_HG + tid;
        ws_ml[2 * row] = m_s[tid];
        ws_ml[2 * row + 1] = l_s[tid];
    }
}
