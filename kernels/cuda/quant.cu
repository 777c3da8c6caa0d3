// FP8 (e4m3fn) quantisation and dequantisation with DeepSeek's block scales.

// Activation quantisation, 1x128 groups, ue8m0 (power-of-two) scales:
//   amax = max(|x|, 1e-4); s = 2^ceil(log2(amax / 448)); q = sat_e4m3(x / s).
// x [rows, k] bf16 with k % 128 == 0. q [>= rows, k] e4m3. Scales are written either
// row-major [pitch, k/128] (token_major == 0) or token-contiguous [k/128, pitch] (token_major == 1),
// where pitch >= rows is the padded row count the GEMM runs with (pad entries are not written).
// Groups are contiguous in memory (group g = row * k/128 + kb starts at element 128 g), so each
// half-warp takes one group: 16 lanes x 8 elements, one 16-byte load and one 8-byte store each.
// Launch: block = 256 threads (16 groups), grid = ceil(rows * k/128 / 16).
extern "C" __global__ void act_quant_fp8(const bf16_t* __restrict__ x, fp8_t* __restrict__ q,
                                         float* __restrict__ s, int rows, int k,
                                         int token_major, int pitch) {
    const int groups_per_row = k >> 7;
    const long long group = (long long)blockIdx.x * (blockDim.x >> 4) + (threadIdx.x >> 4);
    const long long total = (long long)rows * groups_per_row;
    // Both half-warps must reach the shuffles: clamp, and skip the stores when out of range.
    const bool live = group < total;
    const long long g = live ? group : total - 1;
    const int lane = threadIdx.x & 15;
    const size_t base = (size_t)g * 128 + lane * 8;
    const uint4 raw = *reinterpret_cast<const uint4*>(x + base);  // 8 bf16, 16-byte aligned
    const u32 words[4] = {raw.x, raw.y, raw.z, raw.w};
    float v[8];
#pragma unroll
    for (int h = 0; h < 4; ++h) {
        v[2 * h] = bf16_to_f32((bf16_t)(words[h] & 0xffffu));
        v[2 * h + 1] = bf16_to_f32((bf16_t)(words[h] >> 16));
    }
    float amax = 0.0f;
#pragma unroll
    for (int i = 0; i < 8; ++i) amax = fmaxf(amax, fabsf(v[i]));
#pragma unroll
    for (int o = 8; o > 0; o >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, o));
    amax = fmaxf(amax, 1e-4f);
    const float scale = ceil_pow2(amax / E4M3_MAX);
    u32 lo = 0, hi = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        lo |= ((u32)f32_to_e4m3(v[i] / scale)) << (8 * i);
        hi |= ((u32)f32_to_e4m3(v[i + 4] / scale)) << (8 * i);
    }
    if (!live) return;
    *reinterpret_cast<uint2*>(q + base) = make_uint2(lo, hi);
    if (lane == 0) {
        const int row = (int)(g / groups_per_row);
        const int kb = (int)(g % groups_per_row);
        const size_t si = token_major ? (size_t)kb * pitch + row : (size_t)row * groups_per_row + kb;
        s[si] = scale;
    }
}

// Weight dequantisation: out[i, j] = w[i, j] * s[i / 128, j / 128] as bf16.
// w [n, k] e4m3 (any n, k: partial edge blocks allowed), s [ceil(n/128), ceil(k/128)] fp32.
// Launch: grid-stride over n*k elements, e.g. block 256, grid min(ceil(n*k/256), 65535*4).
extern "C" __global__ void dequant_fp8_block(const fp8_t* __restrict__ w,
                                             const float* __restrict__ s,
                                             bf16_t* __restrict__ out, int n, int k) {
    const size_t total = (size_t)n * k;
    const int kblocks = (k + 127) >> 7;
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total;
         i += (size_t)gridDim.x * blockDim.x) {
        const int r = (int)(i / k), c = (int)(i % k);
        out[i] = f32_to_bf16(e4m3_to_f32(w[i]) * s[(size_t)(r >> 7) * kblocks + (c >> 7)]);
    }
}

// Vectorised weight dequantisation for k % 16 == 0: each thread converts 16 e4m3 values (one
// 16-byte load) into 16 bf16 (two 16-byte stores); a 16-group never crosses a 128-column block.
extern "C" __global__ void dequant_fp8_block_v16(const fp8_t* __restrict__ w,
                                                 const float* __restrict__ s,
                                                 bf16_t* __restrict__ out, int n, int k) {
    const size_t total16 = (size_t)n * k / 16;
    const int kblocks = (k + 127) >> 7;
    const uint4* w16 = reinterpret_cast<const uint4*>(w);
    uint4* o16 = reinterpret_cast<uint4*>(out);
    for (size_t i = (size_t)blockIdx.x * blockDim.x + threadIdx.x; i < total16;
         i += (size_t)gridDim.x * blockDim.x) {
        const size_t e = i * 16;
        const int r = (int)(e / k), c = (int)(e % k);
        const float sc = s[(size_t)(r >> 7) * kblocks + (c >> 7)];
        const uint4 q = w16[i];
        const u32 words[4] = {q.x, q.y, q.z, q.w};
        u32 o[8];
#pragma unroll
        for (int h = 0; h < 4; ++h) {
#pragma unroll
            for (int p = 0; p < 2; ++p) {
                const u32 pair = (words[h] >> (16 * p)) & 0xffffu;
                const float a = e4m3_to_f32((fp8_t)(pair & 0xffu)) * sc;
                const float b = e4m3_to_f32((fp8_t)(pair >> 8)) * sc;
                o[2 * h + p] = (u32)f32_to_bf16(a) | ((u32)f32_to_bf16(b) << 16);
            }
        }
        o16[2 * i] = make_uint4(o[0], o[1], o[2], o[3]);
        o16[2 * i + 1] = make_uint4(o[4], o[5], o[6], o[7]);
    }
}
