// Model ops that touch each element once or twice: embedding gather, LayerNorm with bias, YaRN
// RoPE in both layouts (bf16 and f32), SiLU(gate)·up, and greedy argmax. CPU twins:
// kernels/src/cpu/{norm,rope,activation}.rs. Launch shapes are set by kernels/src/cuda/ops_model.rs.

// out[i, :] = table[ids[i], :]. An id outside [0, vocab) writes a zero row and counts into *bad.
// Launch: grid = n, block = 256. vec8: dim % 8 == 0 (16-byte rows).
extern "C" __global__ void embedding_gather_bf16(const bf16_t* __restrict__ table,  // [vocab, dim]
                                                 const int* __restrict__ ids,       // [n]
                                                 bf16_t* __restrict__ out,          // [n, dim]
                                                 int dim, int vocab, int vec8,
                                                 int* __restrict__ bad) {
    const int id = ids[blockIdx.x];
    const bool ok = id >= 0 && id < vocab;
    if (!ok && threadIdx.x == 0) atomicAdd(bad, 1);
    bf16_t* o = out + (size_t)blockIdx.x * dim;
    if (vec8) {
        uint4* o4 = reinterpret_cast<uint4*>(o);
        const uint4* t4 = reinterpret_cast<const uint4*>(table + (size_t)(ok ? id : 0) * dim);
        for (int i = threadIdx.x; i < (dim >> 3); i += blockDim.x)
            o4[i] = ok ? t4[i] : make_uint4(0, 0, 0, 0);
    } else {
        const bf16_t* t = table + (size_t)(ok ? id : 0) * dim;
        for (int i = threadIdx.x; i < dim; i += blockDim.x) o[i] = ok ? t[i] : (bf16_t)0;
    }
}

__device__ __forceinline__ float fa_block_sum(float v, float* sh /* [33] */) {
    v = warp_sum(v);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // sh may still be read by a previous call
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        float t = lane < nw ? sh[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) sh[32] = t;
    }
    __syncthreads();
    return sh[32];
}

// y = (x - mean) / sqrt(var + eps) * w + b per row (biased variance), fp32 math.
// Launch: grid = rows, block = 128 (any multiple of 32 up to 1024).
extern "C" __global__ void layernorm_bf16(const bf16_t* __restrict__ x,  // [rows, dim]
                                          const float* __restrict__ w,   // [dim]
                                          const float* __restrict__ b,   // [dim]
                                          bf16_t* __restrict__ y,        // [rows, dim]
                                          int dim, float eps) {
    __shared__ float sh[33];
    const bf16_t* xr = x + (size_t)blockIdx.x * dim;
    bf16_t* yr = y + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += bf16_to_f32(xr[i]);
    const float mean = fa_block_sum(s, sh) / (float)dim;
    float v = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float d = bf16_to_f32(xr[i]) - mean;
        v += d * d;
    }
    const float inv = 1.0f / sqrtf(fa_block_sum(v, sh) / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x)
        yr[i] = f32_to_bf16((bf16_to_f32(xr[i]) - mean) * inv * w[i] + b[i]);
}

template <typename T> __device__ __forceinline__ float ld(const T* p);
template <> __device__ __forceinline__ float ld<float>(const float* p) { return *p; }
template <> __device__ __forceinline__ float ld<bf16_t>(const bf16_t* p) { return bf16_to_f32(*p); }
template <typename T> __device__ __forceinline__ void st(T* p, float v);
template <> __device__ __forceinline__ void st<float>(float* p, float v) { *p = v; }
template <> __device__ __forceinline__ void st<bf16_t>(bf16_t* p, float v) { *p = f32_to_bf16(v); }

// RoPE in place on x[t, h, offset .. offset + 2*half]. Angle = (float)pos * freq in fp32 and
// accurate cosf/sinf (no fast intrinsics: angles reach 163,839 * f). half_split = 0: pairs
// (2i, 2i+1) (MLA); 1: pairs (i, i + half) (indexer). Launch: grid = tokens, block = 256.
template <typename T>
__device__ void rope_impl(T* __restrict__ x, const int* __restrict__ pos,
                          const float* __restrict__ freqs, int heads, int head_dim, int offset,
                          int half, float attn_factor, int half_split) {
    const int t = blockIdx.x;
    const float p = (float)pos[t];
    for (int e = threadIdx.x; e < heads * half; e += blockDim.x) {
        const int h = e / half, i = e % half;
        const float angle = p * freqs[i];
        const float c = cosf(angle) * attn_factor, s = sinf(angle) * attn_factor;
        T* v = x + ((size_t)t * heads + h) * head_dim + offset;
        const int ia = half_split ? i : 2 * i, ib = half_split ? i + half : 2 * i + 1;
        const float a = ld(v + ia), b = ld(v + ib);
        st(v + ia, __fsub_rn(__fmul_rn(a, c), __fmul_rn(b, s)));
        st(v + ib, __fadd_rn(__fmul_rn(b, c), __fmul_rn(a, s)));
    }
}

extern "C" __global__ void rope_bf16(bf16_t* x, const int* pos, const float* freqs, int heads,
                                     int head_dim, int offset, int half, float attn_factor,
                                     int half_split) {
    rope_impl(x, pos, freqs, heads, head_dim, offset, half, attn_factor, half_split);
}

extern "C" __global__ void rope_f32(float* x, const int* pos, const float* freqs, int heads,
                                    int head_dim, int offset, int half, float attn_factor,
                                    int half_split) {
    rope_impl(x, pos, freqs, heads, head_dim, offset, half, attn_factor, half_split);
}

// out[r, c] = SiLU(gate[r, c]) * up[r, c] with row strides (elements), so a fused [rows, 2I]
// gate|up GEMM output is read in place. Launch: grid-stride, block = 256.
template <typename T>
__device__ void silu_mul_impl(const T* gate, int gs, const T* up, int us, T* out, int os,
                              int rows, int cols) {
    const size_t n = (size_t)rows * cols;
    for (size_t e = (size_t)blockIdx.x * blockDim.x + threadIdx.x; e < n;
         e += (size_t)gridDim.x * blockDim.x) {
        const size_t r = e / cols, c = e % cols;
        const float g = ld(gate + r * gs + c), u = ld(up + r * us + c);
        st(out + r * os + c, g / (1.0f + expf(-g)) * u);
    }
}

extern "C" __global__ void silu_mul_bf16(const bf16_t* gate, int gs, const bf16_t* up, int us,
                                         bf16_t* out, int os, int rows, int cols) {
    silu_mul_impl(gate, gs, up, us, out, os, rows, cols);
}

extern "C" __global__ void silu_mul_f32(const float* gate, int gs, const float* up, int us,
                                        float* out, int os, int rows, int cols) {
    silu_mul_impl(gate, gs, up, us, out, os, rows, cols);
}

// (value, index) order for argmax: larger value first, NaN below everything, then lower index.
__device__ __forceinline__ bool am_better(float v, int i, float bv, int bi) {
    const bool n = isnan(v), bn = isnan(bv);
    if (n != bn) return bn;
    if (!n && v != bv) return v > bv;
    return i < bi;
}

// out[r] = the lowest index of the largest logit of row r (-0.0 == +0.0; NaN ranks last).
// Launch: grid = rows, block = 1024.
extern "C" __global__ void argmax_f32(const float* __restrict__ logits,  // [rows, vocab]
                                      int* __restrict__ out,             // [rows]
                                      int vocab) {
    const float* row = logits + (size_t)blockIdx.x * vocab;
    float bv = __int_as_float(0x7fffffff);  // NaN: worst
    int bi = 0x7fffffff;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = row[i];
        if (am_better(v, i, bv, bi)) { bv = v; bi = i; }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (am_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
    __shared__ float sv[32];
    __shared__ int si[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { sv[warp] = bv; si[warp] = bi; }
    __syncthreads();
    if (warp == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        bv = lane < nw ? sv[lane] : __int_as_float(0x7fffffff);
        bi = lane < nw ? si[lane] : 0x7fffffff;
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
            const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (am_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
        }
        if (lane == 0) out[blockIdx.x] = bi;
    }
}
