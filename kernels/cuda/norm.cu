// RMSNorm: y = w * x / sqrt(mean(x^2) + eps), fp32 math, bf16 in and out, fp32 weight.
// Launch: grid = rows, block = 256 threads (any multiple of 32 up to 1024).

extern "C" __global__ void rmsnorm_bf16(const bf16_t* __restrict__ x,  // [rows, dim]
                                        const float* __restrict__ w,   // [dim]
                                        bf16_t* __restrict__ y,        // [rows, dim]
                                        int dim, float eps) {
    const bf16_t* xr = x + (size_t)blockIdx.x * dim;
    bf16_t* yr = y + (size_t)blockIdx.x * dim;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        float v = bf16_to_f32(xr[i]);
        ss += v * v;
    }
    __shared__ float partial[32];
    ss = warp_sum(ss);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        float t = lane < nwarps ? partial[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) partial[0] = t;
    }
    __syncthreads();
    const float inv = 1.0f / sqrtf(partial[0] / (float)dim + eps);
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        yr[i] = f32_to_bf16(bf16_to_f32(xr[i]) * inv * w[i]);
    }
}

// Vectorised RMSNorm for dim % 8 == 0 and dim <= 8 * 4 * blockDim.x: each thread keeps up to four
// 16-byte vectors (8 bf16 each) of its row in registers, so x is read once.
// Launch: grid = rows, block = 256 threads (dim <= 8192) or 1024 (dim <= 32768).
extern "C" __global__ void rmsnorm_bf16_v8(const bf16_t* __restrict__ x,  // [rows, dim]
                                           const float* __restrict__ w,   // [dim]
                                           bf16_t* __restrict__ y,        // [rows, dim]
                                           int dim, float eps) {
    const int nvec = dim >> 3;
    const uint4* xr = reinterpret_cast<const uint4*>(x + (size_t)blockIdx.x * dim);
    uint4* yr = reinterpret_cast<uint4*>(y + (size_t)blockIdx.x * dim);
    uint4 v[4];
    float ss = 0.0f;
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
            v[j] = xr[i];
            const u32 words[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const float a = bf16_to_f32((bf16_t)(words[h] & 0xffffu));
                const float b = bf16_to_f32((bf16_t)(words[h] >> 16));
                ss += a * a + b * b;
            }
        }
    }
    __shared__ float partial[32];
    ss = warp_sum(ss);
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) partial[warp] = ss;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        float t = lane < nwarps ? partial[lane] : 0.0f;
        t = warp_sum(t);
        if (lane == 0) partial[0] = t;
    }
    __syncthreads();
    const float inv = 1.0f / sqrtf(partial[0] / (float)dim + eps);
    const float4* w4 = reinterpret_cast<const float4*>(w);
#pragma unroll
    for (int j = 0; j < 4; ++j) {
        const int i = threadIdx.x + j * blockDim.x;
        if (i < nvec) {
            const float4 wa = w4[2 * i], wb = w4[2 * i + 1];
            const float ws[8] = {wa.x, wa.y, wa.z, wa.w, wb.x, wb.y, wb.z, wb.w};
            const u32 words[4] = {v[j].x, v[j].y, v[j].z, v[j].w};
            u32 out[4];
#pragma unroll
            for (int h = 0; h < 4; ++h) {
                const float a = bf16_to_f32((bf16_t)(words[h] & 0xffffu)) * inv * ws[2 * h];
                const float b = bf16_to_f32((bf16_t)(words[h] >> 16)) * inv * ws[2 * h + 1];
                out[h] = (u32)f32_to_bf16(a) | ((u32)f32_to_bf16(b) << 16);
            }
            yr[i] = make_uint4(out[0], out[1], out[2], out[3]);
        }
    }
}
