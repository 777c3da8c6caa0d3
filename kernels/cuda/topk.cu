// Top-k over rows (indexer keys), exact, with the Fathom tie rule (KERNELS.md §4.1; CPU twin
// kernels/src/cpu/topk.rs::topk_indices): larger score first, -0.0 == +0.0, NaN below -inf, equal
// scores -> lower position first; exactly min(k, len) indices out, ascending by position, then -1.
//
// Radix select over order-preserving 32-bit keys, 4 passes of 8 bits: each pass histograms the
// next digit of the keys that match the prefix found so far (per-warp histograms; lanes with the
// same digit add once) and picks the digit holding the k-th largest. The result is the k-th key T
// and `need`, how many keys equal to T to take (the lowest positions); a pass whose boundary bin
// is taken whole ends the search early (T is then a prefix and keys compare on those bits). A
// final ordered pass emits key > T, and key == T while fewer than `need` equal keys came before
// (one packed block scan per 1024 positions), so output is ascending. One CTA per row: long rows
// at small batch leave most SMs idle (KERNELS.md speed pitfall 1; multi-CTA rows are future work).
// Launch: grid = rows, block = 1024.

#define TK_THREADS 1024

__device__ __forceinline__ u32 tk_key(float v) {
    u32 u = __float_as_uint(v);
    if (isnan(v)) return 0u;               // below -inf (whose key is 0x007fffff)
    if (u == 0x80000000u) u = 0u;          // -0.0 -> +0.0
    return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

// Inclusive block scan of v over TK_THREADS threads; returns inclusive value, *total the sum.
__device__ __forceinline__ u32 tk_block_scan(u32 v, u32* sh /* [33] */, u32* total) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int o = 1; o < 32; o <<= 1) {
        const u32 n = __shfl_up_sync(0xffffffffu, v, o);
        if (lane >= o) v += n;
    }
    __syncthreads();
    if (lane == 31) sh[warp] = v;
    __syncthreads();
    if (warp == 0) {
        u32 w = sh[lane];
#pragma unroll
        for (int o = 1; o < 32; o <<= 1) {
            const u32 n = __shfl_up_sync(0xffffffffu, w, o);
            if (lane >= o) w += n;
        }
        sh[lane] = w;  // inclusive over warps
    }
    __syncthreads();
    *total = sh[31];
    return v + (warp > 0 ? sh[warp - 1] : 0u);
}

extern "C" __global__ void __launch_bounds__(TK_THREADS)
topk_rows_f32(const float* __restrict__ scores,  // [rows, stride]
              const int* __restrict__ lens,      // [rows]: valid keys of each row (clamped)
              int* __restrict__ out,             // [rows, k]
              int stride, int k) {
    __shared__ u32 hist_w[TK_THREADS / 32][256];  // per-warp histograms: no inter-warp contention
    __shared__ u32 hist[256];
    __shared__ u32 sh[33];
    __shared__ u32 s_digit, s_above, s_count;
    const float* row = scores + (size_t)blockIdx.x * stride;
    int* o = out + (size_t)blockIdx.x * k;
    int len = lens[blockIdx.x];
    len = len < 0 ? 0 : (len > stride ? stride : len);
    if (len <= k) {
        for (int i = threadIdx.x; i < k; i += blockDim.x) o[i] = i < len ? i : -1;
        return;
    }
    u32 prefix = 0, mask = 0, need = (u32)k;
    for (int shift = 24; shift >= 0; shift -= 8) {
        for (int i = threadIdx.x; i < (TK_THREADS / 32) * 256; i += blockDim.x)
            (&hist_w[0][0])[i] = 0;
        __syncthreads();
        // Warp-uniform loop (full-mask match_any), 4 loads in flight per thread; lanes with
        // the same digit add once into their warp's own histogram (the leading digits of real
        // scores are few: shared atomics from all warps on 2-3 bins serialise).
        for (int b0 = 0; b0 < len; b0 += 4 * TK_THREADS) {
            u32 keys[4];
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = b0 + u * TK_THREADS + threadIdx.x;
                keys[u] = i < len ? tk_key(row[i]) : 0u;
            }
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                const int i = b0 + u * TK_THREADS + threadIdx.x;
                const u32 key = keys[u];
                const u32 d = (i < len && (key & mask) == prefix) ? ((key >> shift) & 255u) : 256u;
                const unsigned peers = __match_any_sync(0xffffffffu, d);
                if (d < 256u && (int)(threadIdx.x & 31) == __ffs(peers) - 1)
                    atomicAdd(&hist_w[threadIdx.x >> 5][d], (u32)__popc(peers));
            }
        }
        __syncthreads();
        if (threadIdx.x < 256) {
            u32 t = 0;
#pragma unroll 8
            for (int w = 0; w < TK_THREADS / 32; ++w) t += hist_w[w][threadIdx.x];
            hist[threadIdx.x] = t;
        }
        __syncthreads();
        // Suffix sums over digits (descending): thread r < 256 holds digit 255 - r.
        u32 c = threadIdx.x < 256 ? hist[255 - threadIdx.x] : 0u;
        u32 tot;
        const u32 incl = tk_block_scan(c, sh, &tot);  // count of digits >= 255 - r
        if (threadIdx.x < 256) {
            const u32 above = incl - c;               // count of digits > 255 - r
            if (above < need && need <= incl) {
                s_digit = 255u - threadIdx.x;
                s_above = above;
                s_count = c;
            }
        }
        __syncthreads();
        prefix |= s_digit << shift;
        mask |= 255u << shift;
        need -= s_above;
        const bool done = s_count == need;  // the whole boundary bin is taken: stop early
        __syncthreads();
        if (done) break;
    }
    // Keys compare on the resolved prefix bits only (all 32 unless the loop stopped early).
    const u32 T = prefix;
    // Ordered emission. Scan value packs (gt count) << 16 | (eq count); <= 1024 each per chunk.
    u32 eq_base = 0, out_base = 0;
    for (int base = 0; base < len; base += TK_THREADS) {
        const int i = base + threadIdx.x;
        u32 key = 0;
        bool gt = false, eq = false;
        if (i < len) {
            key = tk_key(row[i]) & mask;
            gt = key > T;
            eq = key == T;
        }
        const u32 v = ((u32)gt << 16) | (u32)eq;
        u32 tot;
        const u32 incl = tk_block_scan(v, sh, &tot);
        const u32 ex = incl - v;
        const u32 gt_before = ex >> 16, eq_before = eq_base + (ex & 0xffffu);
        const u32 sel_eq_before = min(eq_before, need) - min(eq_base, need);
        if (gt || (eq && eq_before < need)) o[out_base + gt_before + sel_eq_before] = i;
        const u32 eq_tot = eq_base + (tot & 0xffffu);
        out_base += (tot >> 16) + (min(eq_tot, need) - min(eq_base, need));
        eq_base = eq_tot;
    }
}
