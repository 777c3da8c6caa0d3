// FP8 (e4m3fn) quantisation and dequantisation with DeepSeek's block scales.

// Activation quantisation, 1x128 groups, ue8m0 (power-of-two) scales:
//   amax = max(|x|, 1e-4); s = 2^ceil(log2(amax / 448)); q = sat_e4m3(x / s).
// x [rows, k] bf16 with k % 128 == 0. q [>= rows, k] e4m3. Scales are written either
// row-major [pitch, k/128] (token_major == 0) or token-contiguous [k/128, pitch] (token_major == 1),
// where pitch >= rows is the padded row count the GEMM runs with (pad entries are not written).
// Launch: one warp per group; block = 256 threads (8 groups), grid = ceil(rows * k/128 / 8).
extern "C" __global__ void act_quant_fp8(const bf16_t* __restrict__ x, fp8_t* __restrict__ q,
                                         float* __restrict__ s, int rows, int k,
                                         int token_major, int pitch) {
    const int groups_per_row = k >> 7;
    const long long group = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (group >= (long long)rows * groups_per_row) return;  // whole warp exits together
    const int lane = threadIdx.x & 31;
    const int row = (int)(group / groups_per_row);
    const int kb = (int)(group % groups_per_row);
    const size_t base = (size_t)row * k + (size_t)kb * 128 + lane * 4;
    const uint2 raw = *reinterpret_cast<const uint2*>(x + base);  // 4 bf16, 8-byte aligned
    float v[4] = {bf16_to_f32((bf16_t)(raw.x & 0xffffu)), bf16_to_f32((bf16_t)(raw.x >> 16)),
                  bf16_to_f32((bf16_t)(raw.y & 0xffffu)), bf16_to_f32((bf16_t)(raw.y >> 16))};
    float amax = fmaxf(fmaxf(fabsf(v[0]), fabsf(v[1])), fmaxf(fabsf(v[2]), fabsf(v[3])));
    amax = fmaxf(warp_max(amax), 1e-4f);
    const float scale = ceil_pow2(amax / E4M3_MAX);
    u32 packed = 0;
#pragma unroll
    for (int i = 0; i < 4; ++i) packed |= ((u32)f32_to_e4m3(v[i] / scale)) << (8 * i);
    *reinterpret_cast<u32*>(q + base) = packed;
    if (lane == 0) {
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
