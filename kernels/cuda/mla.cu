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
