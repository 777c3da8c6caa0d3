// DeepSeek-V3.2 router selection (noaux_tc), one warp per token. CPU twin:
// kernels/src/cpu/router.rs::route_token. Sigmoid scores, + bias for selection only, group score
// = sum of the group's top-2 selection scores, keep the topk_group best groups, top_k experts of
// the kept groups, weights = sigmoid scores (normalised over the selection + 1e-20 when norm),
// times scale. Ties: lower index first; NaN ranks below -inf. Output in rank order (best first).
// Limits (checked by the wrapper): n_experts <= 256, n_group <= 32, n_experts % n_group == 0,
// top_k <= 32, topk_group <= n_group. Launch: block = 128 (4 tokens), grid = ceil(tokens / 4).

#define RT_MAX_E 256
#define RT_WARPS 4

__device__ __forceinline__ bool rt_better(float v, int i, float bv, int bi) {
    const bool n = isnan(v), bn = isnan(bv);
    if (n != bn) return bn;
    if (!n && v != bv) return v > bv;
    return i < bi;
}

__device__ __forceinline__ void rt_warp_best(float& bv, int& bi) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, bv, o);
        const int oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (rt_better(ov, oi, bv, bi)) { bv = ov; bi = oi; }
    }
}

extern "C" __global__ void router_select(const float* __restrict__ logits,  // [tokens, E]
                                         const float* __restrict__ bias,    // [E]
                                         int* __restrict__ out_ids,         // [tokens, top_k]
                                         float* __restrict__ out_w,         // [tokens, top_k]
                                         int tokens, int n_experts, int n_group, int topk_group,
                                         int top_k, float scale, int norm) {
    __shared__ float s_score[RT_WARPS][RT_MAX_E];
    __shared__ float s_choice[RT_WARPS][RT_MAX_E];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int t = blockIdx.x * RT_WARPS + warp;
    if (t >= tokens) return;  // whole warp leaves together
    const float NAN_ = __int_as_float(0x7fffffff);
    float* score = s_score[warp];
    float* choice = s_choice[warp];
    const float* lr = logits + (size_t)t * n_experts;
    for (int e = lane; e < n_experts; e += 32) {
        const float s = 1.0f / (1.0f + expf(-lr[e]));
        score[e] = s;
        choice[e] = s + bias[e];
    }
    __syncwarp();
    const int per = n_experts / n_group;
    // Group scores: lane g owns group g.
    float gs = NAN_;
    if (lane < n_group) {
        float b1 = NAN_, b2 = NAN_;
        int i1 = 0x7fffffff, i2 = 0x7fffffff;
        for (int j = 0; j < per; ++j) {
            const float v = choice[lane * per + j];
            if (rt_better(v, j, b1, i1)) { b2 = b1; i2 = i1; b1 = v; i1 = j; }
            else if (rt_better(v, j, b2, i2)) { b2 = v; i2 = j; }
        }
        gs = per >= 2 ? b1 + b2 : b1;
    }
    // Keep the topk_group best groups.
    bool keep = false;
    for (int r = 0; r < topk_group; ++r) {
        float bv = (lane < n_group && !keep) ? gs : NAN_;
        int bi = (lane < n_group && !keep) ? lane : 0x7fffffff;
        rt_warp_best(bv, bi);
        if (lane == bi) keep = true;
    }
    const unsigned kept = __ballot_sync(0xffffffffu, keep);
    for (int e = lane; e < n_experts; e += 32)
        if (!((kept >> (e / per)) & 1u)) choice[e] = -INFINITY;
    __syncwarp();
    // top_k experts: repeated warp argmax; a chosen expert's choice becomes NaN.
    int my_id = -1;
    float my_w = 0.0f;
    for (int r = 0; r < top_k; ++r) {
        float bv = NAN_;
        int bi = 0x7fffffff;
        for (int e = lane; e < n_experts; e += 32)
            if (rt_better(choice[e], e, bv, bi)) { bv = choice[e]; bi = e; }
        rt_warp_best(bv, bi);
        if (lane == r) { my_id = bi; my_w = score[bi]; }
        __syncwarp();
        if (lane == 0) choice[bi] = NAN_;
        __syncwarp();
    }
    // Normalise in rank order, as the CPU twin sums.
    float denom = 0.0f;
    for (int r = 0; r < top_k; ++r) denom += __shfl_sync(0xffffffffu, my_w, r);
    if (lane < top_k) {
        float w = my_w;
        if (norm) w = w / (denom + 1e-20f);
        out_ids[(size_t)t * top_k + lane] = my_id;
        out_w[(size_t)t * top_k + lane] = w * scale;
    }
}
