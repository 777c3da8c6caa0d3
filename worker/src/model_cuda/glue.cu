// Glue kernels of the GPU model forward (worker/src/model_cuda): the small steps between the
// shared ops of fathom_kernels::cuda that the op set does not have. Simple one-thread-per-output
// (or one-block-per-row) kernels: correctness first, sized for any shape.

// Block-wide sum over 256 threads (blockDim.x must be 256).
__device__ float block_sum_256(float v) {
    __shared__ float part[8];
    v = warp_sum(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = 0.0f;
    for (int i = 0; i < 8; ++i) t += part[i];
    __syncthreads();
    return t;
}

// RMSNorm of f32 rows into bf16 (and f32 when yf != 0). One block (256 threads) per row.
// x, yf: [rows, dim] f32; y: [rows, dim] bf16; w: [dim] f32.
extern "C" __global__ void rmsnorm_f32_rows(const float* x, const float* w, bf16_t* y, float* yf,
                                            int dim, float eps) {
    const float* xr = x + (u64)blockIdx.x * dim;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += 256) ss += xr[j] * xr[j];
    float r = rsqrtf(block_sum_256(ss) / (float)dim + eps);
    for (int j = threadIdx.x; j < dim; j += 256) {
        float v = w[j] * (xr[j] * r);
        y[(u64)blockIdx.x * dim + j] = f32_to_bf16(v);
        if (yf) yf[(u64)blockIdx.x * dim + j] = v;
    }
}

// In-place RMSNorm of the first `dim` elements of each bf16 row (row stride xs): the kv latent
// part of `[c | k_pe]` rows.
extern "C" __global__ void rmsnorm_bf16_inplace(bf16_t* x, int xs, const float* w, int dim,
                                                float eps) {
    bf16_t* xr = x + (u64)blockIdx.x * xs;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += 256) {
        float v = bf16_to_f32(xr[j]);
        ss += v * v;
    }
    float r = rsqrtf(block_sum_256(ss) / (float)dim + eps);
    for (int j = threadIdx.x; j < dim; j += 256) xr[j] = f32_to_bf16(w[j] * (bf16_to_f32(xr[j]) * r));
}

// h[i] += a[i] (residual add of a bf16 sub-layer output into the f32 stream).
extern "C" __global__ void add_bf16_into_f32(float* h, const bf16_t* a, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        h[i] += bf16_to_f32(a[i]);
}

// out[i] = a[i] as f32.
extern "C" __global__ void bf16_to_f32_k(const bf16_t* a, float* out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = bf16_to_f32(a[i]);
}

// out[i] = bf16(a[i]).
extern "C" __global__ void f32_to_bf16_k(const float* a, bf16_t* out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(a[i]);
}

// dst[rows[r]·ds + j] = src[r·ss + j] for j < width (cache writes; rows < 0 skipped).
extern "C" __global__ void scatter_rows_bf16(const bf16_t* src, int ss, bf16_t* dst, int ds,
                                             const int* rows, int n, int width) {
    u64 total = (u64)n * width;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int r = (int)(i / width), j = (int)(i % width);
        int d = rows[r];
        if (d >= 0) dst[(u64)d * ds + j] = src[(u64)r * ss + j];
    }
}

// The rope part of the absorbed query (the nope part is a batched GEMM, `CudaModel::absorb`):
// qa[r, h, kl + t] = q[r, h, nope + t] for h < nh; pad heads nh ≤ h < nh_pad get zeros in all
// kl + rope columns. q: [n, nh, nope+rope] bf16, qa: [n, nh_pad, kl+rope] bf16.
extern "C" __global__ void absorb_rope_pad(const bf16_t* q, bf16_t* qa, int n, int nh, int nh_pad,
                                           int nope, int rope, int kl) {
    int lat = kl + rope, qk = nope + rope;
    u64 total = (u64)n * nh_pad * lat;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int c = (int)(i % lat);
        u64 rh = i / lat;
        int h = (int)(rh % nh_pad);
        u64 r = rh / nh_pad;
        if (h >= nh) qa[i] = 0;
        else if (c >= kl) qa[i] = q[(r * nh + h) * qk + nope + (c - kl)];
    }
}

// idx[r, j] += base[r] where idx[r, j] ≥ 0 (sequence-local positions → cache rows).
extern "C" __global__ void add_base(int* idx, const int* base, int n, int k) {
    u64 total = (u64)n * k;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        if (idx[i] >= 0) idx[i] += base[i / k];
    }
}

// LayerNorm (biased variance) of f32 rows: y = (x − mean) / sqrt(var + eps) · w + b.
// One block (256 threads) per row. x, y: [rows, dim]; w, b: [dim].
extern "C" __global__ void layernorm_f32_rows(const float* x, const float* w, const float* b,
                                              float* y, int dim, float eps) {
    const float* xr = x + (u64)blockIdx.x * dim;
    float s = 0.0f;
    for (int j = threadIdx.x; j < dim; j += 256) s += xr[j];
    float mean = block_sum_256(s) / (float)dim;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += 256) {
        float d = xr[j] - mean;
        ss += d * d;
    }
    float r = rsqrtf(block_sum_256(ss) / (float)dim + eps);
    for (int j = threadIdx.x; j < dim; j += 256)
        y[(u64)blockIdx.x * dim + j] = (xr[j] - mean) * r * w[j] + b[j];
}

// dst[rows[r]·width + j] = src[r·width + j] (f32 rows; rows < 0 skipped).
extern "C" __global__ void scatter_rows_f32(const float* src, float* dst, const int* rows, int n,
                                            int width) {
    u64 total = (u64)n * width;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int r = (int)(i / width), j = (int)(i % width);
        int d = rows[r];
        if (d >= 0) dst[(u64)d * width + j] = src[i];
    }
}

// Indexer scores of query row r over its own sequence's cached keys (any head dim), f32:
// out[r, s] = Σ_h w[r, h] · ReLU(q[r, h, :] · keys[base[r] + s, :]) for s < lens[r], −∞ for
// lens[r] ≤ s < max_ctx. q: [n, H, D], w: [n, H], keys: [*, D]. Grid (ctx/128, n).
extern "C" __global__ void indexer_scores_rows_f32(const float* q, const float* w,
                                                   const float* keys, const int* base,
                                                   const int* lens, float* out, int H, int D,
                                                   int max_ctx) {
    int r = blockIdx.y;
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= max_ctx) return;
    int len = min(lens[r], max_ctx);
    float* o = out + (u64)r * max_ctx;
    if (s >= len) { o[s] = -__int_as_float(0x7f800000); return; }
    const float* k = keys + ((u64)base[r] + s) * D;
    float acc = 0.0f;
    for (int h = 0; h < H; ++h) {
        const float* qh = q + ((u64)r * H + h) * D;
        float d = 0.0f;
        for (int t = 0; t < D; ++t) d += qh[t] * k[t];
        acc += w[(u64)r * H + h] * fmaxf(d, 0.0f);
    }
    o[s] = acc;
}

// ---------------------------------------------------------------------------------------------
// f32 path (Precision::F32: an f32 checkpoint runs at its own precision, every op in fp32).

// out[r, :] = table[ids[r], :] (f32); ids outside [0, vocab) give zeros and count in *bad.
extern "C" __global__ void gather_rows_f32(const float* table, const int* ids, float* out,
                                           int* bad, int n, int dim, int vocab) {
    u64 total = (u64)n * dim;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int r = (int)(i / dim), j = (int)(i % dim);
        int id = ids[r];
        if (id < 0 || id >= vocab) {
            out[i] = 0.0f;
            if (j == 0) atomicAdd(bad, 1);
        } else {
            out[i] = table[(u64)id * dim + j];
        }
    }
}

// In-place RMSNorm of the first `dim` elements of f32 rows of stride xs (kv latent part).
// One block (256 threads) per row.
extern "C" __global__ void rmsnorm_f32_inplace(float* x, int xs, const float* w, int dim,
                                               float eps) {
    float* xr = x + (u64)blockIdx.x * xs;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < dim; j += 256) ss += xr[j] * xr[j];
    float r = rsqrtf(block_sum_256(ss) / (float)dim + eps);
    for (int j = threadIdx.x; j < dim; j += 256) xr[j] = w[j] * (xr[j] * r);
}

// h[i] += a[i], f32.
extern "C" __global__ void add_f32_into(float* h, const float* a, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        h[i] += a[i];
}

__device__ __forceinline__ float silu_f32(float x) { return x / (1.0f + expf(-x)); }

// act[r, i] = SiLU(gu[r, i]) · gu[r, inner + i]. gu: [n, 2·inner] (gate | up), act: [n, inner].
extern "C" __global__ void swiglu_f32(const float* gu, float* act, int n, int inner) {
    u64 total = (u64)n * inner;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 r = i / inner;
        int j = (int)(i % inner);
        const float* g = gu + r * 2 * inner;
        act[i] = silu_f32(g[j]) * g[inner + j];
    }
}

// absorb_q in f32 without head padding: qa[r, h, c] = Σ_t q[r, h, t] · kv_b[h·(nope+v) + t, c]
// (c < kl), qa[r, h, kl + t] = q[r, h, nope + t]. q: [n, nh, nope+rope], qa: [n, nh, kl+rope].
extern "C" __global__ void absorb_q_f32(const float* q, const float* kv_b, float* qa, int n,
                                        int nh, int nope, int rope, int v, int kl) {
    int lat = kl + rope, qk = nope + rope;
    u64 total = (u64)n * nh * lat;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int c = (int)(i % lat);
        u64 rh = i / lat;
        int h = (int)(rh % nh);
        const float* qr = q + rh * qk;
        float acc;
        if (c < kl) {
            acc = 0.0f;
            for (int t = 0; t < nope; ++t) acc += qr[t] * kv_b[((u64)h * (nope + v) + t) * kl + c];
        } else {
            acc = qr[nope + (c - kl)];
        }
        qa[i] = acc;
    }
}

// oh[r, h, j] = Σ_c ol[r, h, c] · kv_b[h·(nope+v) + nope + j, c]; ol: [n, nh, kl], oh: [n, nh, v].
extern "C" __global__ void unabsorb_o_f32(const float* ol, const float* kv_b, float* oh, int n,
                                          int nh, int nope, int v, int kl) {
    u64 total = (u64)n * nh * v;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int j = (int)(i % v);
        u64 rh = i / v;
        int h = (int)(rh % nh);
        const float* o = ol + rh * kl;
        const float* wr = kv_b + ((u64)h * (nope + v) + nope + j) * kl;
        float acc = 0.0f;
        for (int c = 0; c < kl; ++c) acc += o[c] * wr[c];
        oh[i] = acc;
    }
}

// Block-wide max over 256 threads.
__device__ float block_max_256(float v) {
    __shared__ float part[8];
    v = warp_max(v);
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) part[warp] = v;
    __syncthreads();
    float t = part[0];
    for (int i = 1; i < 8; ++i) t = fmaxf(t, part[i]);
    __syncthreads();
    return t;
}

// Sparse MLA attention (absorbed form), f32: one block (256 threads) per (row r, head h).
// logit_j = scale · qa[r, h, :] · kv[sel[r, j], :] over the selected rows (sel < 0: skipped),
// softmax over j, out[r, h, c] = Σ_j p_j · kv[sel[r, j], c] for c < kl. No valid key: zeros.
// qa: [n, nh, kl+rope], kv: [rows, kl+rope], sel: [n, topk], out: [n, nh, kl].
// Dynamic shared memory: topk floats.
extern "C" __global__ void mla_sparse_f32(const float* qa, const float* kv, const int* sel,
                                          float* out, int nh, int kl, int rope, int topk,
                                          float scale) {
    extern __shared__ float p[];
    int lat = kl + rope;
    u64 rh = blockIdx.x;
    u64 r = rh / nh;
    const float* q = qa + rh * lat;
    const int* s = sel + r * topk;
    float m = -__int_as_float(0x7f800000);
    for (int j = threadIdx.x; j < topk; j += 256) {
        int row = s[j];
        float l = -__int_as_float(0x7f800000);
        if (row >= 0) {
            const float* k = kv + (u64)row * lat;
            float d = 0.0f;
            for (int c = 0; c < lat; ++c) d += q[c] * k[c];
            l = scale * d;
        }
        p[j] = l;
        m = fmaxf(m, l);
    }
    m = block_max_256(m);
    float* o = out + rh * kl;
    if (m == -__int_as_float(0x7f800000)) {
        for (int c = threadIdx.x; c < kl; c += 256) o[c] = 0.0f;
        return;
    }
    float z = 0.0f;
    for (int j = threadIdx.x; j < topk; j += 256) {
        float e = s[j] >= 0 ? expf(p[j] - m) : 0.0f;
        p[j] = e;
        z += e;
    }
    z = block_sum_256(z); // its barriers also publish p[] to the whole block
    float inv = 1.0f / z;
    for (int c = threadIdx.x; c < kl; c += 256) {
        float acc = 0.0f;
        for (int j = 0; j < topk; ++j) {
            int row = s[j];
            if (row >= 0) acc += (p[j] * inv) * kv[(u64)row * lat + c];
        }
        o[c] = acc;
    }
}

// Routed experts, f32, step 1: act[t, j, i] = SiLU(x[t]·w13[e, i]) · (x[t]·w13[e, inner + i])
// with e = ids[t, j]; ids outside [0, E) (another rank's experts) give 0.
// x: [n, dim], ids: [n, k], w13: [E, 2·inner, dim], act: [n, k, inner].
extern "C" __global__ void moe_up_f32(const float* x, const int* ids, const float* w13,
                                      float* act, int n, int k, int dim, int inner, int n_exp) {
    u64 total = (u64)n * k * inner;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int ii = (int)(i % inner);
        u64 tj = i / inner;
        u64 t = tj / k;
        int e = ids[tj];
        if (e < 0 || e >= n_exp) { act[i] = 0.0f; continue; }
        const float* xr = x + t * dim;
        const float* wg = w13 + ((u64)e * 2 * inner + ii) * dim;
        const float* wu = w13 + ((u64)e * 2 * inner + inner + ii) * dim;
        float g = 0.0f, u = 0.0f;
        for (int c = 0; c < dim; ++c) {
            g += xr[c] * wg[c];
            u += xr[c] * wu[c];
        }
        act[i] = silu_f32(g) * u;
    }
}

// Step 2: out[t, d] = Σ_j wts[t, j] · Σ_i act[t, j, i] · w2[e, d, i] (j in routing order;
// foreign ids contribute nothing). w2: [E, dim, inner], out: [n, dim].
extern "C" __global__ void moe_down_f32(const float* act, const int* ids, const float* wts,
                                        const float* w2, float* out, int n, int k, int dim,
                                        int inner, int n_exp) {
    u64 total = (u64)n * dim;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int d = (int)(i % dim);
        u64 t = i / dim;
        float acc = 0.0f;
        for (int j = 0; j < k; ++j) {
            int e = ids[t * k + j];
            if (e < 0 || e >= n_exp) continue;
            const float* a = act + (t * k + j) * inner;
            const float* w = w2 + ((u64)e * dim + d) * inner;
            float y = 0.0f;
            for (int c = 0; c < inner; ++c) y += a[c] * w[c];
            acc += wts[t * k + j] * y;
        }
        out[i] = acc;
    }
}
