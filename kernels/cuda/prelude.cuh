// Prepended to every Fathom kernel source before NVRTC compiles it (see kernels/src/cuda/nvrtc.rs).
// No headers: NVRTC's built-in headers vary between releases, so bf16 and e4m3 are handled as raw
// bits here, with PTX conversions (sm_89+) for FP8.

typedef unsigned short bf16_t;  // bfloat16 bits
typedef unsigned char fp8_t;    // e4m3fn bits
typedef unsigned int u32;
typedef unsigned long long u64;

#define E4M3_MAX 448.0f

__device__ __forceinline__ float bf16_to_f32(bf16_t v) {
    return __uint_as_float(((u32)v) << 16);
}

// Round to nearest even; NaN stays NaN (quiet).
__device__ __forceinline__ bf16_t f32_to_bf16(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

// Saturating round-to-nearest-even conversion to e4m3fn (|x| > 448 -> ±448).
__device__ __forceinline__ fp8_t f32_to_e4m3(float f) {
    unsigned short r;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(r) : "f"(0.0f), "f"(f));
    return (fp8_t)(r & 0xffu);
}

__device__ __forceinline__ float e4m3_to_f32(fp8_t v) {
    u32 h2;
    unsigned short in = (unsigned short)v;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(in));
    unsigned short h = (unsigned short)(h2 & 0xffffu);
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Smallest power of two >= r, for positive normal r: the exponent comes from the fp32 bits
// (log2f + ceilf is off by one at exact powers of two).
__device__ __forceinline__ float ceil_pow2(float r) {
    u32 bits = __float_as_uint(r);
    u32 e = (bits >> 23) & 0xffu;
    if (bits & 0x7fffffu) e += 1u;
    return __uint_as_float(e << 23);
}

#ifndef INFINITY
#define INFINITY __int_as_float(0x7f800000)
#endif
