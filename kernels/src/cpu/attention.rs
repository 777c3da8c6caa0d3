//! Sparse MLA attention in the absorbed (MQA) form (spec §2.4): every head of one query token
//! attends over the selected rows of the shared latent `[c | k_pe]` (`kv_lora + rope` wide):
//! `logit[h, j] = scale · q[h] · kv[idx_j]`, softmax over j, `out[h] = Σ_j p[h, j] · c[idx_j]`.
//! The query is already absorbed (`q[h] = [W_UK[h]ᵀ q_nope[h] | q_pe[h]]`); un-absorbing the
//! output through `W_UV` is the caller's. An empty index list gives zeros (never NaN).

use super::activation::softmax_rows;
use super::gemm::dot;
use rayon::prelude::*;

/// One query token: `q` `[heads, kv_lora + rope]`, `kv` `[n_ctx, kv_lora + rope]`, `indices`
/// into `kv` rows (each `< n_ctx`); writes `out` `[heads, kv_lora]`.
pub fn mla_sparse_attention(
    q: &[f32],
    kv: &[f32],
    indices: &[u32],
    heads: usize,
    kv_lora: usize,
    rope: usize,
    scale: f32,
    out: &mut [f32],
) {
    let width = kv_lora + rope;
    assert_eq!(q.len(), heads * width, "mla_sparse_attention: q is not [{heads}, {width}]");
    assert!(kv.len() % width == 0, "mla_sparse_attention: kv is not [n, {width}]");
    assert_eq!(out.len(), heads * kv_lora, "mla_sparse_attention: out is not [{heads}, {kv_lora}]");
    let n_ctx = kv.len() / width;
    assert!(
        indices.iter().all(|&i| (i as usize) < n_ctx),
        "mla_sparse_attention: an index is outside the {n_ctx} context rows"
    );
    let head = |h: usize, o: &mut [f32]| {
        let qh = &q[h * width..(h + 1) * width];
        let mut p: Vec<f32> = indices
            .iter()
            .map(|&i| scale * dot(qh, &kv[i as usize * width..(i as usize + 1) * width]))
            .collect();
        o.fill(0.0);
        if p.is_empty() {
            return;
        }
        softmax_rows(&mut p, indices.len());
        for (&i, &pj) in indices.iter().zip(&p) {
            let c = &kv[i as usize * width..i as usize * width + kv_lora];
            for (a, b) in o.iter_mut().zip(c) {
                *a += pj * b;
            }
        }
    };
    if heads * indices.len() * width >= 1 << 17 {
        out.par_chunks_mut(kv_lora).enumerate().for_each(|(h, o)| head(h, o));
    } else {
        out.chunks_mut(kv_lora).enumerate().for_each(|(h, o)| head(h, o));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::{assert_close, rand_vec};

    /// Naive MHA form: expand k = [W_UK c | k_pe], v = W_UV c per head and attend.
    #[test]
    fn absorbed_form_equals_expanded_mha_form() {
        let (heads, lora, rope, nope, vdim, n) = (3, 8, 4, 5, 6, 7);
        let width = lora + rope;
        let kv = rand_vec(n * width, 1);
        let wuk = rand_vec(heads * nope * lora, 2); // [h, nope, lora]
        let wuv = rand_vec(heads * vdim * lora, 3); // [h, v, lora]
        let q_nope = rand_vec(heads * nope, 4);
        let q_pe = rand_vec(heads * rope, 5);
        let idx = [0u32, 2, 3, 6];
        let scale = 0.3;
        // Absorbed query.
        let mut q = vec![0.0; heads * width];
        for h in 0..heads {
            for c in 0..lora {
                q[h * width + c] =
                    (0..nope).map(|i| q_nope[h * nope + i] * wuk[(h * nope + i) * lora + c]).sum();
            }
            q[h * width + lora..(h + 1) * width].copy_from_slice(&q_pe[h * rope..(h + 1) * rope]);
        }
        let mut o_lat = vec![0.0; heads * lora];
        mla_sparse_attention(&q, &kv, &idx, heads, lora, rope, scale, &mut o_lat);
        for h in 0..heads {
            let o: Vec<f32> = (0..vdim)
                .map(|j| {
                    (0..lora).map(|c| wuv[(h * vdim + j) * lora + c] * o_lat[h * lora + c]).sum()
                })
                .collect();
            // Expanded.
            let mut logits = Vec::new();
            let mut vs = Vec::new();
            for &s in &idx {
                let c = &kv[s as usize * width..s as usize * width + lora];
                let kpe = &kv[s as usize * width + lora..(s as usize + 1) * width];
                let knope: Vec<f32> = (0..nope)
                    .map(|i| (0..lora).map(|cc| wuk[(h * nope + i) * lora + cc] * c[cc]).sum())
                    .collect();
                let l: f32 = (0..nope).map(|i| q_nope[h * nope + i] * knope[i]).sum::<f32>()
                    + (0..rope).map(|i| q_pe[h * rope + i] * kpe[i]).sum::<f32>();
                logits.push(scale * l);
                vs.push(
                    (0..vdim)
                        .map(|j| {
                            (0..lora).map(|cc| wuv[(h * vdim + j) * lora + cc] * c[cc]).sum::<f32>()
                        })
                        .collect::<Vec<f32>>(),
                );
            }
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max);
            let e: Vec<f32> = logits.iter().map(|l| (l - m).exp()).collect();
            let z: f32 = e.iter().sum();
            let want: Vec<f32> =
                (0..vdim).map(|j| (0..idx.len()).map(|s| e[s] / z * vs[s][j]).sum()).collect();
            assert_close(&o, &want, 1e-5);
        }
    }

    #[test]
    fn empty_index_list_gives_zeros() {
        let mut out = vec![1.0; 2 * 4];
        mla_sparse_attention(&rand_vec(2 * 6, 1), &rand_vec(3 * 6, 2), &[], 2, 4, 2, 1.0, &mut out);
        assert!(out.iter().all(|&v| v == 0.0));
    }
}
