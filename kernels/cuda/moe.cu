// Token permutation for routed experts and the weighted combine (the expert GEMMs in between are
// cuBLAS calls, see kernels/src/cuda/ops_moe.rs).
//
// moe_plan: pairs p = t * top_k + slot carry expert ids (ids[p] < 0 or >= n_experts: not local,
// dropped on purpose, e.g. experts of another EP rank). Rows of the permuted buffer are grouped by
// expert, and inside an expert by pair order (deterministic). Writes counts[e], offsets[e]
// (offsets[n_experts] = rows used), pair_row[p] (-1 for dropped pairs), row_pair[r].
// One CTA, thread e owns expert e and scans the ids in order from shared memory (O(E * P)
// shared-memory reads: fine for decode batches; a parallel version is future work).
// Launch: grid = 1, block = 1024 (n_experts <= 1024).

#define MOE_CHUNK 4096

extern "C" __global__ void __launch_bounds__(1024)
moe_plan(const int* __restrict__ ids, int pairs, int n_experts, int* __restrict__ counts,
         int* __restrict__ offsets, int* __restrict__ pair_row, int* __restrict__ row_pair) {
    __shared__ int chunk[MOE_CHUNK];
    __shared__ int scan[1024];
    const int e = threadIdx.x;
    int cnt = 0;
    for (int base = 0; base < pairs; base += MOE_CHUNK) {
        const int n = min(MOE_CHUNK, pairs - base);
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = ids[base + i];
        __syncthreads();
        if (e < n_experts)
            for (int i = 0; i < n; ++i) cnt += chunk[i] == e;
    }
    // Exclusive scan of counts (Hillis-Steele over 1024 entries; tiny).
    scan[threadIdx.x] = e < n_experts ? cnt : 0;
    __syncthreads();
    for (int o = 1; o < 1024; o <<= 1) {
        const int v = threadIdx.x >= o ? scan[threadIdx.x - o] : 0;
        __syncthreads();
        scan[threadIdx.x] += v;
        __syncthreads();
    }
    const int start = scan[threadIdx.x] - (e < n_experts ? cnt : 0);
    if (e < n_experts) { counts[e] = cnt; offsets[e] = start; }
    if (threadIdx.x == 1023) offsets[n_experts] = scan[1023];
    int r = start;
    for (int base = 0; base < pairs; base += MOE_CHUNK) {
        const int n = min(MOE_CHUNK, pairs - base);
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) chunk[i] = ids[base + i];
        __syncthreads();
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            const int id = chunk[i];
            if (id < 0 || id >= n_experts) pair_row[base + i] = -1;
        }
        if (e < n_experts)
            for (int i = 0; i < n; ++i)
                if (chunk[i] == e) { pair_row[base + i] = r; row_pair[r] = base + i; ++r; }
    }
}

// x_perm[r, :] = x[row_pair[r] / top_k, :] for r < offsets[n_experts]; later rows untouched.
// Launch: grid = pairs (capacity), block = 128; dim % 8 == 0.
extern "C" __global__ void moe_gather_bf16(const bf16_t* __restrict__ x, const int* __restrict__ row_pair,
                                           const int* __restrict__ offsets, int n_experts, int top_k,
                                           bf16_t* __restrict__ x_perm, int dim) {
    const int r = blockIdx.x;
    if (r >= offsets[n_experts]) return;
    const int t = row_pair[r] / top_k;
    const uint4* src = reinterpret_cast<const uint4*>(x + (size_t)t * dim);
    uint4* dst = reinterpret_cast<uint4*>(x_perm + (size_t)r * dim);
    for (int i = threadIdx.x; i < dim / 8; i += blockDim.x) dst[i] = src[i];
}

// out[t, :] = sum_slot w[t, slot] * y_perm[pair_row[t * top_k + slot], :] in fp32 (slot order;
// dropped pairs contribute nothing). Launch: grid = tokens, block = 256.
extern "C" __global__ void moe_combine_bf16(const bf16_t* __restrict__ y_perm, const int* __restrict__ pair_row,
                                            const float* __restrict__ w, bf16_t* __restrict__ out,
                                            int top_k, int dim) {
    const int t = blockIdx.x;
    for (int c = threadIdx.x; c < dim; c += blockDim.x) {
        float a = 0.0f;
        for (int s = 0; s < top_k; ++s) {
            const int r = pair_row[t * top_k + s];
            if (r >= 0) a += w[t * top_k + s] * bf16_to_f32(y_perm[(size_t)r * dim + c]);
        }
        out[(size_t)t * dim + c] = f32_to_bf16(a);
    }
}
