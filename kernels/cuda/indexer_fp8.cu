// The lightning indexer's FP8 path (spec §2.3 steps 4–5, as DeepSeek's inference runs it; CPU
// twin: kernels/src/cpu/indexer_fp8.rs).
//
// `indexer_rotate_quant_fp8*`: each vector of D fp32 values is rotated by the normalised
// Sylvester Hadamard matrix (in-place fast Walsh–Hadamard transform, natural order, then times
// `inv_sqrt_d` = 1/sqrt(D) passed from the host), then quantised to e4m3 with one ue8m0 scale:
// amax = max(|v|, 1e-4), s = 2^ceil(log2(amax / 448)), code = sat_e4m3(v / s). One thread per
// vector (D <= 128 values in registers/local memory): q vectors are (token, head), k vectors are
// tokens. `_rows` writes vector v to row dst[v] of the output (the key cache; dst[v] < 0 or
// >= n_out skips it), the plain form to row v.
//
// `indexer_mma_fp8_rows_d*`: scores over a shared e4m3 key cache, the layout of
// `indexer_mma_bf16_d*` (indexer.cu) with e4m3 tensor-core MMA (mma.sync m16n8k32, fp32 accumulate):
//   I[b, s] = ks[first + s] * sum_h (w[b, h] * sq[b, h]) * ReLU(q8[b, h] . k8[first + s])
// (the scales are positive powers of two, so ReLU(sq * sk * d) = sq * sk * ReLU(d)). Row b's keys
// are rows [first, first + lens[b]) with first = base[b]; a negative base or a max_ctx block past
// n_rows scores nothing (all -inf). D in {16, 32, 64, 128}: D = 16 fills the upper half of the
// k32 fragments with zeros. grid = (ceil(max_ctx / 128), batch), block = 128; heads <= 64.

#define IXF_THREADS 128
#define IXF_MAX_H 64
#define IXF_E4M3_MAX 448.0f

__device__ __forceinline__ void rotate_quant(const float* __restrict__ x, int d, float inv_sqrt_d,
                                             fp8_t* __restrict__ codes, float* __restrict__ scale) {
    float v[128];
    for (int i = 0; i < d; ++i) v[i] = x[i];
    for (int h = 1; h < d; h <<= 1)
        for (int i = 0; i < d; i += 2 * h)
            for (int j = i; j < i + h; ++j) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
    float amax = 0.0f;
    for (int i = 0; i < d; ++i) {
        v[i] = v[i] * inv_sqrt_d;
        amax = fmaxf(amax, fabsf(v[i]));
    }
    const float s = ceil_pow2(fmaxf(amax, 1e-4f) / IXF_E4M3_MAX);
    for (int i = 0; i < d; ++i) codes[i] = f32_to_e4m3(v[i] / s);
    *scale = s;
}

extern "C" __global__ void indexer_rotate_quant_fp8(const float* x, fp8_t* codes, float* scales,
                                                    int n, int d, float inv_sqrt_d) {
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n) return;
    rotate_quant(x + (size_t)v * d, d, inv_sqrt_d, codes + (size_t)v * d, scales + v);
}

extern "C" __global__ void indexer_rotate_quant_fp8_rows(const float* x, const int* dst,
                                                         fp8_t* codes, float* scales, int n,
                                                         int d, float inv_sqrt_d, long long n_out) {
    const int v = blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= n) return;
    const long long r = dst[v];
    if (r < 0 || r >= n_out) return;
    rotate_quant(x + (size_t)v * d, d, inv_sqrt_d, codes + (size_t)r * d, scales + r);
}

__device__ __forceinline__ void ixf_mma(float c[4], const u32 a[4], u32 b0, u32 b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
        "{%8,%9}, {%0,%1,%2,%3};"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <int D>
__device__ void indexer_fp8_impl(const fp8_t* __restrict__ q, const float* __restrict__ sq,
                                 const float* __restrict__ w, const fp8_t* __restrict__ keys,
                                 const float* __restrict__ ks, const int* __restrict__ base,
                                 const int* __restrict__ lens, float* __restrict__ out, int heads,
                                 int max_ctx, long long n_rows) {
    constexpr int WR = D / 4;            // u32 words (4 codes each) per vector
    constexpr int QW = WR + 4;           // padded shared row: conflict-free B fragments
    constexpr int KT = (D + 31) / 32;    // k32 tiles
    constexpr bool HALF = (D % 32) != 0; // D = 16: upper half of each k32 tile is zero
    __shared__ u32 qs[IXF_MAX_H * QW];
    __shared__ float ws[IXF_MAX_H];
    const int b = blockIdx.y;
    const int ntiles = (heads + 7) / 8;
    const u32* qg = reinterpret_cast<const u32*>(q + (size_t)b * heads * D);
    for (int e = threadIdx.x; e < ntiles * 8 * WR; e += blockDim.x) {
        const int h = e / WR, c = e % WR;
        qs[h * QW + c] = h < heads ? qg[h * WR + c] : 0u;
    }
    for (int h = threadIdx.x; h < ntiles * 8; h += blockDim.x)
        ws[h] = h < heads ? w[(size_t)b * heads + h] * sq[(size_t)b * heads + h] : 0.0f;
    __syncthreads();
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int g = lane >> 2, tq = lane & 3;
    int len = min(lens[b], max_ctx);
    long long first = base[b];
    if (first < 0 || first + max_ctx > n_rows) len = 0;
    if (len <= 0) first = 0;
    const u32* kb = reinterpret_cast<const u32*>(keys + first * D);
#pragma unroll 1
    for (int mt = 0; mt < 2; ++mt) {
        const int key0 = blockIdx.x * IXF_THREADS + warp * 32 + mt * 16;
        if (key0 >= max_ctx) break;
        const int r0 = key0 + g, r1 = key0 + g + 8;
        const bool v0 = r0 < len, v1 = r1 < len;
        u32 a[KT][4];
#pragma unroll
        for (int kt = 0; kt < KT; ++kt) {
            a[kt][0] = v0 ? __ldg(kb + (size_t)r0 * WR + kt * 8 + tq) : 0u;
            a[kt][1] = v1 ? __ldg(kb + (size_t)r1 * WR + kt * 8 + tq) : 0u;
            a[kt][2] = (!HALF && v0) ? __ldg(kb + (size_t)r0 * WR + kt * 8 + 4 + tq) : 0u;
            a[kt][3] = (!HALF && v1) ? __ldg(kb + (size_t)r1 * WR + kt * 8 + 4 + tq) : 0u;
        }
        float acc0 = 0.0f, acc1 = 0.0f;
        for (int nt = 0; nt < ntiles; ++nt) {
            float c[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            const u32* qr = qs + (nt * 8 + g) * QW;
#pragma unroll
            for (int kt = 0; kt < KT; ++kt)
                ixf_mma(c, a[kt], qr[kt * 8 + tq], HALF ? 0u : qr[kt * 8 + 4 + tq]);
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
            if (r0 < max_ctx) o[r0] = v0 ? acc0 * ks[first + r0] : -INFINITY;
            if (r1 < max_ctx) o[r1] = v1 ? acc1 * ks[first + r1] : -INFINITY;
        }
    }
}

#define IXF_KERNEL(D)                                                                            \
    extern "C" __global__ void __launch_bounds__(IXF_THREADS) indexer_mma_fp8_rows_d##D(          \
        const fp8_t* q, const float* sq, const float* w, const fp8_t* keys, const float* ks,     \
        const int* base, const int* lens, float* out, int heads, int max_ctx, long long n_rows) { \
        indexer_fp8_impl<D>(q, sq, w, keys, ks, base, lens, out, heads, max_ctx, n_rows);        \
    }
IXF_KERNEL(128)
IXF_KERNEL(64)
IXF_KERNEL(32)
IXF_KERNEL(16)
