// Lightning-indexer scoring, bf16 keys and queries, fp32 math (CPU twin:
// kernels/src/cpu/indexer.rs::indexer_scores): I[b, s] = sum_h w[b, h] * ReLU(q[b, h] . k[b, s]).
// Keys of sequence b are keys[b, 0 .. lens[b]) of a [batch, max_ctx, D] cache; positions at or past
// lens[b] get -inf (so a top-k over the row never picks them). The caller folds every positive
// constant into w. Two versions, same launch: grid = (ceil(max_ctx / 128), batch), block = 128;
// heads <= 64; D in {32, 64, 128}:
// - `indexer_scores_bf16_d*` (SIMT reference): one thread per key holds the key in registers,
//   q and w of the sequence in shared memory as fp32;
// - `indexer_mma_bf16_d*` (default): bf16 tensor-core MMA (mma.sync m16n8k16, fp32 accumulate);
//   keys are the M side (16 per tile, 2 tiles per warp), heads the N side (8 per tile), dims K;
//   ReLU, head weight and head sum in registers on the accumulator fragment, then two shuffles.

#define IX_THREADS 128
#define IX_MAX_H 64

template <int D>
__device__ void indexer_impl(const bf16_t* __restrict__ q,     // [batch, heads, D]
                             const float* __restrict__ w,      // [batch, heads]
                             const bf16_t* __restrict__ keys,  // [batch, max_ctx, D]
                             const int* __restrict__ lens,     // [batch]
                             float* __restrict__ out,          // [batch, max_ctx]
                             int heads, int max_ctx) {
    __shared__ __align__(16) float qs[IX_MAX_H * D];
    __shared__ float ws[IX_MAX_H];
    const int b = blockIdx.y;
    for (int i = threadIdx.x; i < heads * D; i += blockDim.x)
        qs[i] = bf16_to_f32(q[(size_t)b * heads * D + i]);
    for (int i = threadIdx.x; i < heads; i += blockDim.x) ws[i] = w[(size_t)b * heads + i];
    __syncthreads();
    const int s = blockIdx.x * IX_THREADS + threadIdx.x;
    if (s >= max_ctx) return;
    const int len = lens[b];
    float* o = out + (size_t)b * max_ctx + s;
    if (s >= len) { *o = -INFINITY; return; }
    float kf[D];
    const uint4* kp = reinterpret_cast<const uint4*>(keys + ((size_t)b * max_ctx + s) * D);
#pragma unroll
    for (int j = 0; j < D / 8; ++j) {
        const uint4 v = __ldg(kp + j);
        const u32 words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
        for (int h = 0; h < 4; ++h) {
            kf[8 * j + 2 * h] = bf16_to_f32((bf16_t)(words[h] & 0xffffu));
            kf[8 * j + 2 * h + 1] = bf16_to_f32((bf16_t)(words[h] >> 16));
        }
    }
    float acc = 0.0f;
    for (int h = 0; h < heads; ++h) {
        const float4* qh = reinterpret_cast<const float4*>(qs + h * D);
        float d0 = 0.0f, d1 = 0.0f;
#pragma unroll
        for (int j = 0; j < D / 4; j += 2) {
            const float4 a = qh[j], c = qh[j + 1];
            d0 += a.x * kf[4 * j] + a.y * kf[4 * j + 1] + a.z * kf[4 * j + 2] + a.w * kf[4 * j + 3];
            d1 += c.x * kf[4 * j + 4] + c.y * kf[4 * j + 5] + c.z * kf[4 * j + 6] +
                  c.w * kf[4 * j + 7];
        }
        acc += ws[h] * fmaxf(d0 + d1, 0.0f);
    }
    *o = acc;
}

extern "C" __global__ void __launch_bounds__(IX_THREADS)
indexer_scores_bf16_d128(const bf16_t* q, const float* w, const bf16_t* keys, const int* lens,
                         float* out, int heads, int max_ctx) {
    indexer_impl<128>(q, w, keys, lens, out, heads, max_ctx);
}
extern "C" __global__ void __launch_bounds__(IX_THREADS)
indexer_scores_bf16_d64(const bf16_t* q, const float* w, const bf16_t* keys, const int* lens,
                        float* out, int heads, int max_ctx) {
    indexer_impl<64>(q, w, keys, lens, out, heads, max_ctx);
}
extern "C" __global__ void __launch_bounds__(IX_THREADS)
indexer_scores_bf16_d32(const bf16_t* q, const float* w, const bf16_t* keys, const int* lens,
                        float* out, int heads, int max_ctx) {
    indexer_impl<32>(q, w, keys, lens, out, heads, max_ctx);
}

__device__ __forceinline__ void ix_mma(float* c, const u32* a, u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D>
__device__ void indexer_mma_impl(const bf16_t* __restrict__ q, const float* __restrict__ w,
                                 const bf16_t* __restrict__ keys, const int* __restrict__ lens,
                                 float* __restrict__ out, int heads, int max_ctx) {
    constexpr int QW = D / 2 + 4;  // u32 words per padded q row: conflict-free B fragments
    __shared__ u32 qs[IX_MAX_H * QW];
    __shared__ float ws[IX_MAX_H];
    const int b = blockIdx.y;
    const int ntiles = (heads + 7) / 8;
    const u32* qg = reinterpret_cast<const u32*>(q + (size_t)b * heads * D);
    for (int e = threadIdx.x; e < ntiles * 8 * (D / 2); e += blockDim.x) {
        const int h = e / (D / 2), c = e % (D / 2);
        qs[h * QW + c] = h < heads ? qg[h * (D / 2) + c] : 0u;
    }
    for (int h = threadIdx.x; h < ntiles * 8; h += blockDim.x)
        ws[h] = h < heads ? w[(size_t)b * heads + h] : 0.0f;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    const int len = min(lens[b], max_ctx);
    const u32* kb = reinterpret_cast<const u32*>(keys + (size_t)b * max_ctx * D);
#pragma unroll 1
    for (int mt = 0; mt < 2; ++mt) {
        const int key0 = blockIdx.x * IX_THREADS + warp * 32 + mt * 16;
        if (key0 >= max_ctx) break;
        const int r0 = key0 + g, r1 = key0 + g + 8;
        const bool v0 = r0 < len, v1 = r1 < len;
        u32 a[D / 16][4];
#pragma unroll
        for (int kt = 0; kt < D / 16; ++kt) {
            a[kt][0] = v0 ? __ldg(kb + (size_t)r0 * (D / 2) + kt * 8 + tq) : 0u;
            a[kt][1] = v1 ? __ldg(kb + (size_t)r1 * (D / 2) + kt * 8 + tq) : 0u;
            a[kt][2] = v0 ? __ldg(kb + (size_t)r0 * (D / 2) + kt * 8 + 4 + tq) : 0u;
            a[kt][3] = v1 ? __ldg(kb + (size_t)r1 * (D / 2) + kt * 8 + 4 + tq) : 0u;
        }
        float acc0 = 0.0f, acc1 = 0.0f;
        for (int nt = 0; nt < ntiles; ++nt) {
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const u32* qr = qs + (nt * 8 + g) * QW;
#pragma unroll
            for (int kt = 0; kt < D / 16; ++kt) ix_mma(c, a[kt], qr[kt * 8 + tq], qr[kt * 8 + 4 + tq]);
            const float w0 = ws[nt * 8 + 2 * tq], w1 = ws[nt * 8 + 2 * tq + 1];
            acc0 += w0 * fmaxf(c[0], 0.0f) + w1 * fmaxf(c[1], 0.0f);
            acc1 += w0 * fmaxf(c[2], 0.0f) + w1 * fmaxf(c[3], 0.0f);
        }
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 1);
        acc0 += __shfl_xor_sync(0xffffffffu, acc0, 2);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 1);
        acc1 += __shfl_xor_sync(0xffffffffu, acc1, 2);
        if (tq == 0) {
            float* o = out + (size_t)b * max_ctx;
            if (r0 < max_ctx) o[r0] = v0 ? acc0 : -INFINITY;
            if (r1 < max_ctx) o[r1] = v1 ? acc1 : -INFINITY;
        }
    }
}

extern "C" __global__ void __launch_bounds__(IX_THREADS)
indexer_mma_bf16_d128(const bf16_t* q, const float* w, const bf16_t* keys, const int* lens,
                      float* out, int heads, int max_ctx) {
    indexer_mma_impl<128>(q, w, keys, lens, out, heads, max_ctx);
}
extern "C" __global__ void __launch_bounds__(IX_THREADS)
indexer_mma_bf16_d64(const bf16_t* q, const float* w, const bf16_t* keys, const int* lens,
                     float* out, int heads, int max_ctx) {
    indexer_mma_impl<64>(q, w, keys, lens, out, heads, max_ctx);
}
extern "C" __global__ void __launch_bounds__(IX_THREADS)
indexer_mma_bf16_d32(const bf16_t* q, const float* w, const bf16_t* keys, const int* lens,
                     float* out, int heads, int max_ctx) {
    indexer_mma_impl<32>(q, w, keys, lens, out, heads, max_ctx);
}
