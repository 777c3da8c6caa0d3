//! Top-k selection with a fixed tie rule, shared by the indexer (keys) and the router (experts).
//!
//! Rule (KERNELS.md §4.1): larger score first; equal scores (−0.0 == +0.0) → lower position
//! first; NaN ranks below everything. Exactly `min(k, n)` indices come out, sorted ascending by
//! position, so every backend and every rank selects the same set.

use std::cmp::Ordering;

/// Descending by score, then ascending by index.
fn rank(scores: &[f32], a: usize, b: usize) -> Ordering {
    let (x, y) = (scores[a], scores[b]);
    let key = |v: f32| if v.is_nan() { f32::NEG_INFINITY } else { v };
    match key(y).partial_cmp(&key(x)).unwrap_or(Ordering::Equal) {
        Ordering::Equal => {
            // NaN below −∞.
            match (x.is_nan(), y.is_nan()) {
                (true, false) => Ordering::Greater,
                (false, true) => Ordering::Less,
                _ => a.cmp(&b),
            }
        }
        o => o,
    }
}

/// Indices of the `min(k, scores.len())` largest scores, sorted ascending by index.
pub fn topk_indices(scores: &[f32], k: usize) -> Vec<u32> {
    let mut out = topk_ranked(scores, k);
    out.sort_unstable();
    out
}

/// Indices of the `min(k, n)` largest scores in rank order (best first, ties by lower index).
pub fn topk_ranked(scores: &[f32], k: usize) -> Vec<u32> {
    let n = scores.len();
    let k = k.min(n);
    let mut idx: Vec<usize> = (0..n).collect();
    if k == 0 {
        return Vec::new();
    }
    if k < n {
        idx.select_nth_unstable_by(k - 1, |&a, &b| rank(scores, a, b));
        idx.truncate(k);
    }
    idx.sort_unstable_by(|&a, &b| rank(scores, a, b));
    idx.into_iter().map(|i| i as u32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cpu::testutil::rand_vec;

    fn naive(scores: &[f32], k: usize) -> Vec<u32> {
        let mut idx: Vec<usize> = (0..scores.len()).collect();
        idx.sort_by(|&a, &b| rank(scores, a, b));
        let mut v: Vec<u32> = idx.into_iter().take(k).map(|i| i as u32).collect();
        v.sort();
        v
    }

    #[test]
    fn ties_break_to_lower_position_and_output_is_sorted() {
        let s = [0.0, 1.0, 0.0, -0.0, 1.0, -1.0, 0.0];
        assert_eq!(topk_indices(&s, 3), vec![0, 1, 4]);
        assert_eq!(topk_indices(&s, 4), vec![0, 1, 2, 4]);
        // -0.0 ties with +0.0: position 3 comes before 6.
        assert_eq!(topk_indices(&s, 5), vec![0, 1, 2, 3, 4]);
        assert_eq!(topk_ranked(&s, 3), vec![1, 4, 0]);
        assert_eq!(topk_indices(&s, 100).len(), 7);
        assert!(topk_indices(&s, 0).is_empty());
    }

    #[test]
    fn nan_and_infinities_rank_last() {
        let s = [f32::NAN, f32::NEG_INFINITY, 2.0, f32::INFINITY];
        assert_eq!(topk_ranked(&s, 4), vec![3, 2, 1, 0]);
    }

    #[test]
    fn matches_full_sort_on_random_and_quantized_scores() {
        for seed in 0..20u64 {
            let n = 1 + (seed as usize * 37) % 200;
            let mut s = rand_vec(n, seed);
            if seed % 2 == 0 {
                for v in &mut s {
                    *v = (*v * 3.0).round(); // many ties
                }
            }
            for k in [1, n / 3, n / 2, n] {
                assert_eq!(topk_indices(&s, k), naive(&s, k), "seed {seed} k {k}");
            }
        }
    }
}
