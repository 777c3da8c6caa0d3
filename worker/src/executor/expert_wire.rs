//! The wire form of a rank's per-step expert counters in `StepResult` (worker.proto fields
//! `expert_tokens`, `expert_token_runs`, `expert_token_cells`).
//!
//! Owns the encoder (and a reference decoder for round-trip tests; the coordinator decodes in
//! `coordinator/src/experts.rs`). The counters are `[moe_layers][experts]` flattened u32 cells
//! (58 × 256 = 14 848 at full size). Two encodings, and a rank sends exactly one of them:
//! - dense: every cell as a packed varint (`expert_tokens`; one byte per zero cell);
//! - sparse: one `(gap, count)` varint pair per non-zero cell, ascending, where a cell's index is
//!   the previous pair's index + 1 + gap (the first pair's: gap), plus the cell count
//!   (`expert_token_runs`, `expert_token_cells`).
//!
//! [`encode`] computes both sizes exactly (protobuf varint lengths) and picks the smaller, so a
//! decode batch of one (8 of 256 experts per layer) sends ~1 KB instead of ~15 KB, and a full
//! batch (almost every cell non-zero) still sends the dense form. A step that routed no token
//! sends neither.
//!
//! Invariants: sparse pairs never carry a zero count, indices are strictly ascending and below
//! `cells`.

use fathom_proto::v1::StepResult;

/// Tag of field 5 (`expert_tokens`), field 12 (`expert_token_runs`), field 13 (cells): one byte
/// each.
const TAG_BYTES: usize = 1;

/// Bytes of `v` as a protobuf varint.
pub fn varint_len(v: u64) -> usize {
    (64 - (v | 1).leading_zeros() as usize).div_ceil(7)
}

/// Bytes of a packed repeated field with `payload` bytes (tag, length, payload).
fn packed_len(payload: usize) -> usize {
    if payload == 0 { 0 } else { TAG_BYTES + varint_len(payload as u64) + payload }
}

/// One rank's counters of one step, in the encoding [`encode`] picked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WireCounts {
    /// No token routed (or no MoE layers): nothing is sent.
    Empty,
    /// Every cell (`expert_tokens`).
    Dense(Vec<u32>),
    /// `(gap, count)` pairs (`expert_token_runs`) over `cells` cells.
    Sparse { runs: Vec<u32>, cells: u32 },
}

impl WireCounts {
    /// Bytes these fields add to an encoded `StepResult`.
    pub fn encoded_len(&self) -> usize {
        match self {
            WireCounts::Empty => 0,
            WireCounts::Dense(c) => packed_len(c.iter().map(|&v| varint_len(u64::from(v))).sum()),
            WireCounts::Sparse { runs, cells } => {
                packed_len(runs.iter().map(|&v| varint_len(u64::from(v))).sum())
                    + TAG_BYTES
                    + varint_len(u64::from(*cells))
            }
        }
    }

    /// Writes the fields into `result` (clearing the other encoding's).
    pub fn fill(self, result: &mut StepResult) {
        result.expert_tokens.clear();
        result.expert_token_runs.clear();
        result.expert_token_cells = 0;
        match self {
            WireCounts::Empty => {}
            WireCounts::Dense(c) => result.expert_tokens = c,
            WireCounts::Sparse { runs, cells } => {
                result.expert_token_runs = runs;
                result.expert_token_cells = cells;
            }
        }
    }
}

/// The `(gap, count)` pairs of the non-zero cells of `counts`.
pub fn sparse_runs(counts: &[u32]) -> Vec<u32> {
    let mut runs = Vec::new();
    let mut next = 0usize; // index the next gap is measured from
    for (i, &c) in counts.iter().enumerate() {
        if c != 0 {
            runs.push((i - next) as u32);
            runs.push(c);
            next = i + 1;
        }
    }
    runs
}

/// Picks the smaller of the dense and the sparse encoding of `counts` (`[moe_layers][experts]`
/// flattened); [`WireCounts::Empty`] when every cell is zero.
pub fn encode(counts: Vec<u32>) -> WireCounts {
    if counts.iter().all(|&c| c == 0) {
        return WireCounts::Empty;
    }
    let sparse = WireCounts::Sparse { runs: sparse_runs(&counts), cells: counts.len() as u32 };
    let dense = WireCounts::Dense(counts);
    if sparse.encoded_len() <= dense.encoded_len() { sparse } else { dense }
}

/// Why the counters of a `StepResult` could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("both dense expert_tokens and sparse expert_token_runs are set")]
    Both,
    #[error("expert_token_runs has an odd length {0} (pairs expected)")]
    OddRuns(usize),
    #[error("expert_token_runs pair {pair} has count 0")]
    ZeroCount { pair: usize },
    #[error("expert_token_runs pair {pair} indexes cell {index}, not below {cells}")]
    OutOfRange { pair: usize, index: u64, cells: u32 },
}

/// Reference decoder: the dense cells of `result` (`None` when it carries no counters).
pub fn decode(result: &StepResult) -> Result<Option<Vec<u32>>, WireError> {
    match (result.expert_tokens.is_empty(), result.expert_token_runs.is_empty()) {
        (true, true) => Ok(None),
        (false, true) => Ok(Some(result.expert_tokens.clone())),
        (false, false) => Err(WireError::Both),
        (true, false) => {
            let runs = &result.expert_token_runs;
            if runs.len() % 2 != 0 {
                return Err(WireError::OddRuns(runs.len()));
            }
            let cells = result.expert_token_cells;
            let mut out = vec![0u32; cells as usize];
            let mut next = 0u64;
            for (pair, gc) in runs.chunks_exact(2).enumerate() {
                let index = next + u64::from(gc[0]);
                if index >= u64::from(cells) {
                    return Err(WireError::OutOfRange { pair, index, cells });
                }
                if gc[1] == 0 {
                    return Err(WireError::ZeroCount { pair });
                }
                out[index as usize] = gc[1];
                next = index + 1;
            }
            Ok(Some(out))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fathom_common::ModelConfig;
    use prost::Message;

    /// splitmix64: a deterministic stream for synthetic routing.
    fn mix(x: &mut u64) -> u64 {
        *x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Counters of a decode step of `batch` tokens: each token picks `top_k` distinct experts
    /// uniformly in every MoE layer (no skew: the most non-zero cells for a batch size).
    fn uniform_step(cfg: &ModelConfig, batch: usize, seed: u64) -> Vec<u32> {
        let (layers, e, k) = (cfg.num_moe_layers(), cfg.n_routed_experts, cfg.num_experts_per_tok);
        let mut counts = vec![0u32; layers * e];
        let mut s = seed;
        for l in 0..layers {
            for _ in 0..batch {
                let mut picked = Vec::with_capacity(k);
                while picked.len() < k {
                    let x = (mix(&mut s) % e as u64) as usize;
                    if !picked.contains(&x) {
                        picked.push(x);
                    }
                }
                for x in picked {
                    counts[l * e + x] += 1;
                }
            }
        }
        counts
    }

    fn result_with(w: WireCounts) -> StepResult {
        let mut r = StepResult::default();
        w.fill(&mut r);
        r
    }

    #[test]
    fn varint_lengths_match_prost() {
        for v in [0u64, 1, 127, 128, 16_383, 16_384, u64::from(u32::MAX)] {
            assert_eq!(varint_len(v), prost::encoding::encoded_len_varint(v), "{v}");
        }
    }

    #[test]
    fn round_trips_and_picks_the_smaller() {
        let cfg = ModelConfig::tiny();
        for batch in [1usize, 3, 64, 500] {
            let counts = uniform_step(&cfg, batch, batch as u64);
            let w = encode(counts.clone());
            let r = result_with(w.clone());
            assert_eq!(decode(&r).unwrap(), Some(counts.clone()), "batch {batch}");
            // The estimate is the real encoded size of the fields.
            assert_eq!(w.encoded_len(), r.encoded_len(), "batch {batch}");
            let dense = WireCounts::Dense(counts.clone()).encoded_len();
            let sparse =
                WireCounts::Sparse { runs: sparse_runs(&counts), cells: counts.len() as u32 }
                    .encoded_len();
            assert_eq!(w.encoded_len(), dense.min(sparse), "batch {batch}");
            assert!(r.expert_tokens.is_empty() || r.expert_token_runs.is_empty(), "never both");
        }
        assert_eq!(encode(vec![0; 40]), WireCounts::Empty);
        assert_eq!(decode(&result_with(WireCounts::Empty)).unwrap(), None);
        // A cell far from the previous one, and the last cell.
        let mut c = vec![0u32; 1000];
        (c[0], c[700], c[999]) = (5, 70_000, 1);
        assert_eq!(sparse_runs(&c), vec![0, 5, 699, 70_000, 298, 1]);
        assert_eq!(decode(&result_with(encode(c.clone()))).unwrap(), Some(c));
    }

    #[test]
    fn malformed_counters_are_named() {
        let bad = |runs: Vec<u32>, cells: u32| {
            decode(&StepResult {
                expert_token_runs: runs,
                expert_token_cells: cells,
                ..Default::default()
            })
            .unwrap_err()
        };
        assert_eq!(bad(vec![1, 2, 3], 10), WireError::OddRuns(3));
        assert_eq!(bad(vec![1, 0], 10), WireError::ZeroCount { pair: 0 });
        assert_eq!(
            bad(vec![4, 1, 5, 1], 10),
            WireError::OutOfRange { pair: 1, index: 10, cells: 10 }
        );
        let both = StepResult {
            expert_tokens: vec![1],
            expert_token_runs: vec![0, 1],
            expert_token_cells: 1,
            ..Default::default()
        };
        assert_eq!(decode(&both).unwrap_err(), WireError::Both);
    }

    /// The measurement of docs/perf/2026-11-30-expert-counters.md: bytes per rank per step at
    /// the full model's shape (58 MoE layers × 256 experts, top-8) for decode batches 1, 64 and
    /// 256, uniform routing, against the dense encoding and the floor of 2 bytes (a 1-byte gap
    /// and a 1-byte count) per non-zero cell. Prints a table (`--nocapture`).
    #[test]
    fn full_model_bytes_per_step() {
        let cfg = ModelConfig::preset("full").unwrap();
        let cells = cfg.num_moe_layers() * cfg.n_routed_experts;
        assert_eq!(cells, 58 * 256);
        println!(
            "batch | non-zero cells | dense u32 (4 B/cell) | dense varint | sparse | sent | floor (2 B/non-zero)"
        );
        for batch in [1usize, 64, 256] {
            let counts = uniform_step(&cfg, batch, 42 + batch as u64);
            let total: u64 = counts.iter().map(|&c| u64::from(c)).sum();
            assert_eq!(total, (batch * 8 * 58) as u64);
            let nz = counts.iter().filter(|&&c| c > 0).count();
            let dense = WireCounts::Dense(counts.clone()).encoded_len();
            let sparse = WireCounts::Sparse { runs: sparse_runs(&counts), cells: cells as u32 }
                .encoded_len();
            let sent = result_with(encode(counts)).encoded_len();
            let floor = nz * 2;
            println!("{batch} | {nz} | {} | {dense} | {sparse} | {sent} | {floor}", cells * 4);
            assert_eq!(sent, dense.min(sparse));
            assert!(sent <= dense);
            if batch == 1 {
                // 8 experts × 58 layers: within a few bytes per entry of the floor and an order
                // of magnitude under the dense form.
                assert_eq!(nz, 8 * 58);
                assert!(sent <= floor + floor / 2 + 8, "batch 1: {sent} B vs floor {floor} B");
                assert!(sent * 10 < dense, "batch 1: {sent} B vs dense {dense} B");
            }
        }
    }
}
