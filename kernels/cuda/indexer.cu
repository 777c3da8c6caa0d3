// Lightning-indexer scoring, bf16 keys and queries, fp32 math (CPU twin:
// kernels/src/cpu/indexer.rs::indexer_scores): I[b, s] = sum_h w[b, h] * ReLU(q[b, h] . k[b, s]).
// Keys of sequence b are keys[b, 0 .. lens[b]) of a [batch, max_ctx, D] cache; positions at or past
// lens[b] get -inf (so a top-k over the row never picks them). The caller folds every positive
// constant into w. One thread per key holds the key in registers; q and w of the sequence sit in
// shared memory as fp32. CUDA cores (no MMA yet). Launch: grid = (ceil(max_ctx / 128), batch),
// block = 128; heads <= 64; D in {32, 64, 128}.

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
