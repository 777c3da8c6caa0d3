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
