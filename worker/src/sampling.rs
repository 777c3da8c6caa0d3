//! Token sampling: one next token from one row of logits.
//!
//! Owns: [`SamplingParams`] (and their validation), the pipeline greedy / temperature → top-k →
//! top-p → renormalize → draw, the counter-based random stream [`uniform`], and what a request
//! may ask back ([`Sampled`]: log-prob, kept-id mask, top log-probs).
//!
//! Does not own: logit processors that change logits (penalties, grammar masks, logit bias; a
//! caller applies them before calling [`sample`], writing `-inf` for forbidden ids), stop
//! conditions, or batching. Each call sees one request's one row, so nothing here can depend on
//! the batch it came in.
//!
//! # The pipeline (exact; a trainer can reproduce it)
//! Let `l` be the logits (f32, length V), `T = temperature`, `m = max_i l_i`.
//! All arithmetic below is in f64.
//!
//! * **Greedy** (`T == 0`): the token is the lowest id among those with `l_i == m`. Its `logprob`
//!   is `ln softmax(l)[token]` (raw logits, temperature 1), i.e. `-ln Σ_i exp(l_i - m)`. The mask
//!   is `[token]`.
//! * **Sampling** (`T > 0`):
//!   1. weights `e_i = exp((l_i - m) / T)` (so the top weight is exactly 1; `-inf` logits give
//!      `e_i = 0` and are never kept).
//!   2. the candidates (ids with `e_i > 0`) are ordered by `e_i` descending, ties by lower id.
//!   3. top-k (`top_k > 0`): keep the first `top_k` of that order.
//!   4. top-p (`top_p < 1`): with `S` the sum of the top-k survivors' weights (summed in that
//!      order), keep the shortest prefix of the order whose running sum is `>= top_p · S`. So top-p
//!      is measured on the distribution *after* top-k renormalization, as in HF `generate` and
//!      vLLM.
//!   5. the kept ids, re-sorted ascending, carry the renormalized distribution
//!      `q_i = e_i / K`, `K = Σ_kept e_i` summed in ascending id order.
//!   6. draw: `u = uniform(seed, step)`; the token is the first kept id (ascending) whose running
//!      sum of `e_i` is `> u · K` (inverse CDF). Since `u < 1` and the running sum ends at exactly
//!      `K` (same order), such an id always exists.
//!   7. `logprob = ln q_token = (l_token - m)/T - ln K`, which is `<= 0`.
//!
//! Reproducing this elsewhere (numpy, torch in float64) gives the same token except when `u · K`
//! falls within rounding (~1e-16 relative) of a cumulative boundary, or a top-p threshold equals a
//! cumulative sum to the last bit: `exp` is the platform's libm, not a bit-specified function.
//!
//! # The random stream
//! `uniform(seed, step)` is the `(step + 1)`-th output of the standard SplitMix64 generator whose
//! state starts at `seed`, mapped to `[0, 1)` with 53 bits:
//! ```text
//! z = seed + (step + 1) · 0x9E3779B97F4A7C15            (wrapping u64)
//! z = (z ^ (z >> 30)) · 0xBF58476D1CE4E5B9
//! z = (z ^ (z >> 27)) · 0x94D049BB133111EB
//! z =  z ^ (z >> 31)
//! u = (z >> 11) · 2^-53
//! ```
//! `step` is the index of the token being generated *within its request* (0 for the first
//! generated token), never a global or per-batch counter. So a draw depends only on
//! `(seed, step, logits, params)`: not on thread count, batch composition, preemption, or where
//! the request ran. A request's tokens are reproducible by anyone holding its seed.
//!
//! # Cost
//! A request that asks for neither `return_mask` nor `top_logprobs` pays one pass for greedy and
//! one pass plus a partial sort (a full sort only when `top_p < 1` and `top_k == 0`) for sampling;
//! the mask and top log-probs are built only when asked.

use serde::{Deserialize, Serialize};

/// The most top log-probs one request may ask for.
pub const MAX_TOP_LOGPROBS: u32 = 64;

const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// How to pick the next token of one request. `Default` is plain sampling at temperature 1
/// with no truncation and nothing extra returned.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SamplingParams {
    /// `0` means greedy; otherwise logits are divided by it. Finite, `>= 0`.
    pub temperature: f32,
    /// Nucleus mass in `(0, 1]`; `1` disables top-p.
    pub top_p: f32,
    /// Keep at most this many ids; `0` disables top-k.
    pub top_k: u32,
    /// Seed of the request's random stream (see the module doc).
    pub seed: u64,
    /// Return the sorted kept ids in [`Sampled::mask`].
    pub return_mask: bool,
    /// Return this many most probable ids with their log-probs (`0`: none), at most
    /// [`MAX_TOP_LOGPROBS`].
    pub top_logprobs: u32,
}

impl Default for SamplingParams {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            return_mask: false,
            top_logprobs: 0,
        }
    }
}

impl SamplingParams {
    /// Greedy decoding, nothing extra returned.
    pub fn greedy() -> Self {
        Self { temperature: 0.0, ..Self::default() }
    }

    /// True when `temperature == 0`.
    pub fn is_greedy(&self) -> bool {
        self.temperature == 0.0
    }

    /// Checks every field; the error names the first bad one and its value.
    pub fn validate(&self) -> Result<(), SamplingError> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(SamplingError::InvalidTemperature { value: self.temperature });
        }
        // `!(x > 0)` also rejects NaN.
        if !(self.top_p > 0.0 && self.top_p <= 1.0) {
            return Err(SamplingError::InvalidTopP { value: self.top_p });
        }
        if self.top_logprobs > MAX_TOP_LOGPROBS {
            return Err(SamplingError::TooManyTopLogprobs {
                requested: self.top_logprobs,
                max: MAX_TOP_LOGPROBS,
            });
        }
        Ok(())
    }
}

/// What [`sample`] picked.
#[derive(Debug, Clone, PartialEq)]
pub struct Sampled {
    pub token: u32,
    /// Log-probability of `token` under the distribution it was drawn from (after truncation and
    /// renormalization); for greedy, under `softmax(logits)`. Always `<= 0`.
    pub logprob: f32,
    /// The kept ids, ascending (greedy: just the token). Only when `return_mask`.
    pub mask: Option<Vec<u32>>,
    /// The `top_logprobs` most probable ids under the same distribution as `logprob`, most
    /// probable first, ties by lower id. When sampling, only kept ids are listed, so fewer may
    /// come back. Only when `top_logprobs > 0`.
    pub top_logprobs: Option<Vec<(u32, f32)>>,
}

/// Why a sample could not be taken.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SamplingError {
    #[error("temperature must be finite and >= 0, got {value}")]
    InvalidTemperature { value: f32 },
    #[error("top_p must be in (0, 1], got {value}")]
    InvalidTopP { value: f32 },
    #[error("top_logprobs must be at most {max}, got {requested}")]
    TooManyTopLogprobs { requested: u32, max: u32 },
    #[error("logits row is empty")]
    EmptyLogits,
    #[error("logits row has {len} entries, more than token ids can address")]
    TooManyLogits { len: usize },
    #[error("logit of token {id} is {value}: NaN and +inf are not allowed (-inf masks a token)")]
    BadLogit { id: u32, value: f32 },
    #[error("every logit is -inf: no token can be chosen")]
    AllMasked,
}

/// The request's uniform in `[0, 1)` for generated-token index `step` (see the module doc).
pub fn uniform(seed: u64, step: u64) -> f64 {
    (splitmix64_output(seed, step) >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
}

/// The `(step + 1)`-th output of SplitMix64 started at state `seed`.
pub fn splitmix64_output(seed: u64, step: u64) -> u64 {
    let mut z = seed.wrapping_add(step.wrapping_add(1).wrapping_mul(GOLDEN_GAMMA));
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Picks the next token from `logits` (`[vocab]`, f32) for generated-token index `step` of a
/// request. Deterministic in `(logits, params, step)`.
pub fn sample(
    logits: &[f32],
    params: &SamplingParams,
    step: u64,
) -> Result<Sampled, SamplingError> {
    params.validate()?;
    let (max_id, max) = checked_max(logits)?;
    if params.is_greedy() {
        return Ok(greedy(logits, params, max_id, max));
    }
    let inv_t = 1.0 / f64::from(params.temperature);
    let max = f64::from(max);
    // [vocab] unnormalized weights, top weight exactly 1.
    let weights: Vec<f64> = logits.iter().map(|&l| ((f64::from(l) - max) * inv_t).exp()).collect();

    let kept = truncate(&weights, params);
    // Ascending ids, the order of both the normalizer and the draw.
    let total: f64 = kept.iter().map(|&i| weights[i as usize]).sum();
    let target = uniform(params.seed, step) * total;
    let mut running = 0.0;
    // `kept` is non-empty (it holds at least the max id) and the running sum ends at `total`
    // > target, so the loop always finds a token; the fallback is unreachable but harmless.
    let mut token = *kept.last().unwrap_or(&(max_id as u32));
    for &i in &kept {
        running += weights[i as usize];
        if running > target {
            token = i;
            break;
        }
    }
    let ln_total = total.ln();
    let logprob_of = |i: u32| ((f64::from(logits[i as usize]) - max) * inv_t - ln_total) as f32;

    let top_logprobs = (params.top_logprobs > 0).then(|| {
        let mut order = kept.clone();
        order.sort_by(|&a, &b| weights[b as usize].total_cmp(&weights[a as usize]).then(a.cmp(&b)));
        order.truncate(params.top_logprobs as usize);
        order.into_iter().map(|i| (i, logprob_of(i))).collect()
    });
    Ok(Sampled {
        token,
        logprob: logprob_of(token),
        mask: params.return_mask.then_some(kept),
        top_logprobs,
    })
}

/// Index and value of the largest logit (lowest id on ties), rejecting NaN, +inf, an empty row
/// and a row that is all `-inf`.
fn checked_max(logits: &[f32]) -> Result<(usize, f32), SamplingError> {
    if logits.is_empty() {
        return Err(SamplingError::EmptyLogits);
    }
    if u32::try_from(logits.len()).is_err() {
        return Err(SamplingError::TooManyLogits { len: logits.len() });
    }
    let mut best = (0usize, f32::NEG_INFINITY);
    for (i, &l) in logits.iter().enumerate() {
        if l.is_nan() || l == f32::INFINITY {
            return Err(SamplingError::BadLogit { id: i as u32, value: l });
        }
        if l > best.1 {
            best = (i, l);
        }
    }
    if best.1 == f32::NEG_INFINITY {
        return Err(SamplingError::AllMasked);
    }
    Ok(best)
}

fn greedy(logits: &[f32], params: &SamplingParams, max_id: usize, max: f32) -> Sampled {
    let max = f64::from(max);
    let ln_z = logits.iter().map(|&l| (f64::from(l) - max).exp()).sum::<f64>().ln();
    let logprob_of = |i: usize| (f64::from(logits[i]) - max - ln_z) as f32;
    let top_logprobs = (params.top_logprobs > 0).then(|| {
        let n = (params.top_logprobs as usize).min(logits.len());
        let mut ids: Vec<u32> = (0..logits.len() as u32).collect();
        let by_prob =
            |a: &u32, b: &u32| logits[*b as usize].total_cmp(&logits[*a as usize]).then(a.cmp(b));
        if n < ids.len() {
            ids.select_nth_unstable_by(n - 1, by_prob);
            ids.truncate(n);
        }
        ids.sort_by(by_prob);
        ids.into_iter().map(|i| (i, logprob_of(i as usize))).collect()
    });
    Sampled {
        token: max_id as u32,
        logprob: logprob_of(max_id),
        mask: params.return_mask.then(|| vec![max_id as u32]),
        top_logprobs,
    }
}

/// The kept ids, ascending, after top-k then top-p on `weights` (`[vocab]`, max exactly 1).
fn truncate(weights: &[f64], params: &SamplingParams) -> Vec<u32> {
    let candidates = || (0..weights.len() as u32).filter(|&i| weights[i as usize] > 0.0);
    let top_k = params.top_k as usize;
    let use_top_k = top_k > 0 && top_k < weights.len();
    let use_top_p = params.top_p < 1.0;
    if !use_top_k && !use_top_p {
        return candidates().collect();
    }
    let by_weight =
        |a: &u32, b: &u32| weights[*b as usize].total_cmp(&weights[*a as usize]).then(a.cmp(b));
    let mut order: Vec<u32> = candidates().collect();
    if use_top_k && top_k < order.len() {
        order.select_nth_unstable_by(top_k - 1, by_weight);
        order.truncate(top_k);
    }
    if use_top_p {
        order.sort_by(by_weight);
        let mass: f64 = order.iter().map(|&i| weights[i as usize]).sum();
        let need = f64::from(params.top_p) * mass;
        let mut running = 0.0;
        let mut keep = order.len();
        for (n, &i) in order.iter().enumerate() {
            running += weights[i as usize];
            if running >= need {
                keep = n + 1;
                break;
            }
        }
        order.truncate(keep);
    }
    order.sort_unstable();
    order
}

#[cfg(test)]
mod tests {
    use super::*;

    fn params(temperature: f32, top_p: f32, top_k: u32, seed: u64) -> SamplingParams {
        SamplingParams { temperature, top_p, top_k, seed, return_mask: true, top_logprobs: 0 }
    }

    /// Logits whose softmax at temperature 1 is exactly proportional to `probs`.
    fn logits_of(probs: &[f64]) -> Vec<f32> {
        probs.iter().map(|&p| p.ln() as f32).collect()
    }

    #[test]
    fn splitmix64_matches_published_sequence() {
        // The reference SplitMix64 outputs for seed 1234567 (also used by java.util.SplittableRandom
        // test suites): a trainer with any SplitMix64 gets the same stream.
        let expected: [u64; 5] = [
            6457827717110365317,
            3203168211198807973,
            9817491932198370423,
            4593380528125082431,
            16408922859458223821,
        ];
        for (step, &want) in expected.iter().enumerate() {
            assert_eq!(splitmix64_output(1234567, step as u64), want, "step {step}");
        }
        assert_eq!(splitmix64_output(0, 0), 0xE220_A839_7B1D_CDAF);
        let u = uniform(1234567, 0);
        assert_eq!(u, (6457827717110365317u64 >> 11) as f64 / (1u64 << 53) as f64);
        assert!((0.0..1.0).contains(&u));
    }

    #[test]
    fn uniform_is_spread_and_in_range() {
        let n = 10_000;
        let mean = (0..n)
            .map(|s| uniform(42, s))
            .inspect(|u| assert!((0.0..1.0).contains(u)))
            .sum::<f64>()
            / n as f64;
        assert!((mean - 0.5).abs() < 0.01, "mean {mean}");
        assert_ne!(uniform(1, 0), uniform(2, 0));
        assert_ne!(uniform(1, 0), uniform(1, 1));
    }

    #[test]
    fn seeded_sampling_is_reproducible_and_seed_dependent() {
        let logits: Vec<f32> = (0..100).map(|i| ((i * 37 % 101) as f32) * 0.05).collect();
        let p = params(0.8, 0.9, 50, 7);
        let run = |p: &SamplingParams| -> Vec<u32> {
            (0..64).map(|step| sample(&logits, p, step).unwrap().token).collect()
        };
        let a = run(&p);
        assert_eq!(a, run(&p));
        // Out-of-order evaluation gives the same per-step draws (counter-based stream).
        for step in (0..64).rev() {
            assert_eq!(sample(&logits, &p, step).unwrap().token, a[step as usize]);
        }
        let b = run(&SamplingParams { seed: 8, ..p });
        assert_ne!(a, b, "a different seed must change the draws");
    }

    #[test]
    fn greedy_takes_lowest_id_on_ties() {
        let logits = [0.5, 2.0, -1.0, 2.0, 2.0];
        let s =
            sample(&logits, &SamplingParams { return_mask: true, ..SamplingParams::greedy() }, 3)
                .unwrap();
        assert_eq!(s.token, 1);
        assert_eq!(s.mask, Some(vec![1]));
        // logprob under softmax of the raw logits.
        let z: f64 = logits.iter().map(|&l| (f64::from(l) - 2.0).exp()).sum();
        assert!((f64::from(s.logprob) + z.ln()).abs() < 1e-6, "{}", s.logprob);
        // Greedy ignores seed and step.
        for step in 0..10 {
            let p = SamplingParams { seed: step * 31, ..SamplingParams::greedy() };
            assert_eq!(sample(&logits, &p, step).unwrap().token, 1);
        }
    }

    #[test]
    fn greedy_top_logprobs_sorted_with_id_ties() {
        let logits = [1.0, 3.0, 3.0, -2.0, 0.0];
        let p = SamplingParams { top_logprobs: 3, ..SamplingParams::greedy() };
        let s = sample(&logits, &p, 0).unwrap();
        let top = s.top_logprobs.unwrap();
        let ids: Vec<u32> = top.iter().map(|t| t.0).collect();
        assert_eq!(ids, vec![1, 2, 0]);
        assert_eq!(top[0].1, top[1].1);
        assert_eq!(top[0].1, s.logprob);
        assert!(top[2].1 < top[1].1);
        assert_eq!(s.mask, None, "mask not asked for");
    }

    #[test]
    fn top_k_mask_is_the_k_largest_with_id_ties() {
        // Weights: ids 2 and 4 tie for 2nd place; k=2 keeps the lower id.
        let logits = logits_of(&[0.1, 0.4, 0.2, 0.05, 0.2, 0.05]);
        for step in 0..50 {
            let s = sample(&logits, &params(1.0, 1.0, 2, 3), step).unwrap();
            assert_eq!(s.mask.as_deref(), Some(&[1u32, 2][..]));
            assert!(s.token == 1 || s.token == 2);
        }
        // top_k >= vocab keeps every id.
        let s = sample(&logits, &params(1.0, 1.0, 6, 3), 0).unwrap();
        assert_eq!(s.mask, Some((0..6).collect()));
        let s = sample(&logits, &params(1.0, 1.0, 600, 3), 0).unwrap();
        assert_eq!(s.mask, Some((0..6).collect()));
    }

    #[test]
    fn top_p_keeps_smallest_prefix_reaching_the_mass() {
        // Sorted: id3 0.5, id0 0.3, id2 0.15, id1 0.05.
        let logits = logits_of(&[0.3, 0.05, 0.15, 0.5]);
        let mask =
            |top_p: f32| sample(&logits, &params(1.0, top_p, 0, 1), 0).unwrap().mask.unwrap();
        // (Thresholds sit away from the exact cumulative sums 0.5, 0.8, 0.95: those compare
        // f32 top_p against rounded sums and could go either way.)
        assert_eq!(mask(0.1), vec![3]);
        assert_eq!(mask(0.49), vec![3]);
        assert_eq!(mask(0.51), vec![0, 3]);
        assert_eq!(mask(0.79), vec![0, 3]);
        assert_eq!(mask(0.81), vec![0, 2, 3]);
        assert_eq!(mask(0.96), vec![0, 1, 2, 3]);
        assert_eq!(mask(1.0), vec![0, 1, 2, 3]);
        // Top-p after top-k is measured on the top-k renormalized mass: with k=2 the survivors are
        // 0.5/0.8 = 0.625 and 0.375, so top_p 0.6 keeps only id 3 and 0.7 keeps both.
        let both =
            |top_p: f32| sample(&logits, &params(1.0, top_p, 2, 1), 0).unwrap().mask.unwrap();
        assert_eq!(both(0.6), vec![3]);
        assert_eq!(both(0.7), vec![0, 3]);
    }

    #[test]
    fn top_p_ties_prefer_lower_id() {
        let logits = logits_of(&[0.25, 0.25, 0.25, 0.25]);
        let s = sample(&logits, &params(1.0, 0.5, 0, 9), 0).unwrap();
        assert_eq!(s.mask, Some(vec![0, 1]));
    }

    #[test]
    fn sampled_token_inside_mask_and_logprob_consistent() {
        let logits: Vec<f32> =
            (0..257).map(|i| ((i * 7919 % 257) as f32 / 40.0).sin() * 3.0).collect();
        for (step, (t, top_p, top_k)) in
            [(0.3f32, 0.5f32, 0u32), (1.0, 0.9, 20), (2.0, 1.0, 5), (0.7, 0.95, 0), (1.3, 1.0, 0)]
                .into_iter()
                .cycle()
                .take(200)
                .enumerate()
        {
            let p = SamplingParams { top_logprobs: 4, ..params(t, top_p, top_k, 11) };
            let s = sample(&logits, &p, step as u64).unwrap();
            let mask = s.mask.as_ref().unwrap();
            assert!(mask.windows(2).all(|w| w[0] < w[1]), "mask sorted and unique");
            assert!(mask.binary_search(&s.token).is_ok(), "token {} outside mask", s.token);
            if top_k > 0 {
                assert!(mask.len() <= top_k as usize);
            }
            assert!(s.logprob <= 0.0 && s.logprob.is_finite(), "logprob {}", s.logprob);
            // Renormalized probabilities over the mask sum to 1.
            let m = logits.iter().cloned().fold(f32::NEG_INFINITY, f32::max) as f64;
            let w: Vec<f64> =
                mask.iter().map(|&i| ((logits[i as usize] as f64 - m) / t as f64).exp()).collect();
            let total: f64 = w.iter().sum();
            let idx = mask.binary_search(&s.token).unwrap();
            assert!(((w[idx] / total).ln() - s.logprob as f64).abs() < 1e-5);
            let top = s.top_logprobs.unwrap();
            assert!(top.len() <= 4 && !top.is_empty());
            assert!(top.windows(2).all(|w| w[0].1 >= w[1].1));
            assert!(top.iter().all(|(i, lp)| mask.binary_search(i).is_ok() && *lp <= 0.0));
        }
    }

    #[test]
    fn empirical_frequencies_match_probabilities() {
        let probs = [0.2, 0.5, 0.3];
        let logits = logits_of(&probs);
        let n = 20_000u64;
        let mut counts = [0u64; 3];
        let p = SamplingParams { seed: 2024, ..SamplingParams::default() };
        for step in 0..n {
            counts[sample(&logits, &p, step).unwrap().token as usize] += 1;
        }
        for (i, &c) in counts.iter().enumerate() {
            let freq = c as f64 / n as f64;
            let sigma = (probs[i] * (1.0 - probs[i]) / n as f64).sqrt();
            assert!((freq - probs[i]).abs() < 4.0 * sigma, "id {i}: freq {freq}, p {}", probs[i]);
        }
        // Temperature 2 flattens: p ∝ sqrt(probs).
        let flat: Vec<f64> = probs.iter().map(|p: &f64| p.sqrt()).collect();
        let z: f64 = flat.iter().sum();
        let p2 = SamplingParams { temperature: 2.0, ..p };
        let mut counts = [0u64; 3];
        for step in 0..n {
            counts[sample(&logits, &p2, step).unwrap().token as usize] += 1;
        }
        for i in 0..3 {
            let q = flat[i] / z;
            let freq = counts[i] as f64 / n as f64;
            assert!(
                (freq - q).abs() < 4.0 * (q * (1.0 - q) / n as f64).sqrt(),
                "T=2 id {i}: {freq} vs {q}"
            );
        }
    }

    #[test]
    fn masked_logits_are_never_drawn() {
        let logits = [f32::NEG_INFINITY, 0.0, f32::NEG_INFINITY, 0.0];
        for step in 0..100 {
            let s = sample(&logits, &params(1.0, 1.0, 0, 5), step).unwrap();
            assert!(s.token == 1 || s.token == 3);
            assert_eq!(s.mask, Some(vec![1, 3]));
        }
    }

    #[test]
    fn tiny_temperature_behaves_like_greedy_without_nan() {
        let logits = [1.0, 1.5, 1.4999];
        let s = sample(&logits, &params(1e-30, 1.0, 0, 5), 0).unwrap();
        assert_eq!(s.token, 1);
        assert_eq!(s.logprob, 0.0);
        assert_eq!(s.mask, Some(vec![1]));
    }

    #[test]
    fn nothing_extra_unless_asked() {
        let s = sample(&[0.0, 1.0], &SamplingParams::default(), 0).unwrap();
        assert_eq!(s.mask, None);
        assert_eq!(s.top_logprobs, None);
    }

    #[test]
    fn invalid_params_and_logits_give_named_errors() {
        let l = [0.0f32, 1.0];
        let bad = |p: SamplingParams| sample(&l, &p, 0).unwrap_err();
        let d = SamplingParams::default();
        assert_eq!(
            bad(SamplingParams { temperature: -0.1, ..d }),
            SamplingError::InvalidTemperature { value: -0.1 }
        );
        assert!(matches!(
            bad(SamplingParams { temperature: f32::NAN, ..d }),
            SamplingError::InvalidTemperature { .. }
        ));
        assert!(matches!(
            bad(SamplingParams { temperature: f32::INFINITY, ..d }),
            SamplingError::InvalidTemperature { .. }
        ));
        assert_eq!(
            bad(SamplingParams { top_p: 0.0, ..d }),
            SamplingError::InvalidTopP { value: 0.0 }
        );
        assert_eq!(
            bad(SamplingParams { top_p: 1.5, ..d }),
            SamplingError::InvalidTopP { value: 1.5 }
        );
        assert!(matches!(
            bad(SamplingParams { top_p: f32::NAN, ..d }),
            SamplingError::InvalidTopP { .. }
        ));
        assert_eq!(
            bad(SamplingParams { top_logprobs: 65, ..d }),
            SamplingError::TooManyTopLogprobs { requested: 65, max: MAX_TOP_LOGPROBS }
        );
        assert_eq!(sample(&[], &d, 0).unwrap_err(), SamplingError::EmptyLogits);
        let nan = sample(&[0.0, f32::NAN], &d, 0).unwrap_err();
        assert!(matches!(nan, SamplingError::BadLogit { id: 1, .. }), "{nan:?}");
        assert!(nan.to_string().contains("token 1"), "{nan}");
        assert!(matches!(
            sample(&[f32::INFINITY], &d, 0).unwrap_err(),
            SamplingError::BadLogit { id: 0, .. }
        ));
        assert_eq!(sample(&[f32::NEG_INFINITY; 3], &d, 0).unwrap_err(), SamplingError::AllMasked);
        let msg = bad(SamplingParams { top_p: 1.5, ..d }).to_string();
        assert!(msg.contains("top_p") && msg.contains("1.5"), "{msg}");
    }

    #[test]
    fn params_deserialize_with_defaults_and_reject_unknown_fields() {
        let p: SamplingParams = serde_json::from_str(r#"{"temperature":0.7,"seed":9}"#).unwrap();
        assert_eq!(p, SamplingParams { temperature: 0.7, seed: 9, ..SamplingParams::default() });
        assert!(serde_json::from_str::<SamplingParams>(r#"{"temprature":0.7}"#).is_err());
        assert!(serde_json::from_str::<SamplingParams>(r#"{"top_k":-1}"#).is_err());
    }
}
