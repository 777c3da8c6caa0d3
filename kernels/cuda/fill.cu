// Device-side pseudo-random fills for benchmarks (tests upload host data instead).
// Values are uniform in [-scale, scale) from a per-element hash: never all zero.

__device__ __forceinline__ float hash_uniform(u64 i, u32 seed) {
    u64 z = i * 0x9E3779B97F4A7C15ull + ((u64)seed << 32 | seed);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (float)(z >> 40) * (1.0f / 16777216.0f) * 2.0f - 1.0f;  // [-1, 1)
}

extern "C" __global__ void fill_uniform_bf16(bf16_t* __restrict__ out, u64 n, u32 seed,
                                             float scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        out[i] = f32_to_bf16(hash_uniform(i, seed) * scale);
}

extern "C" __global__ void fill_uniform_e4m3(fp8_t* __restrict__ out, u64 n, u32 seed,
                                             float scale) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        out[i] = f32_to_e4m3(hash_uniform(i, seed) * scale);
}

extern "C" __global__ void fill_uniform_f32(float* __restrict__ out, u64 n, u32 seed,
                                            float lo, float hi) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n;
         i += (u64)gridDim.x * blockDim.x)
        out[i] = lo + (hi - lo) * (hash_uniform(i, seed) * 0.5f + 0.5f);
}

// 16-byte vector copy (bandwidth ceiling measurement): dst[i] = src[i] for i < n16.
extern "C" __global__ void copy_16b(const uint4* __restrict__ src, uint4* __restrict__ dst, u64 n16) {
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < n16;
         i += (u64)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
