//! [`StepPhase`]: where a running forward is (layer and phase), readable from another thread
//! while the step runs — what the worker's step stream reports to the coordinator's watchdog
//! (`StepProgress`, issue 10), so a stalled step is named by the layer and phase it stalled in.
//!
//! Owns the phase vocabulary ([`Phase`]) and a lock-free cell. The forward writes it at each
//! phase boundary (one relaxed atomic store: nothing measurable next to a layer); a reporter
//! (`crate::executor::progress::report_while`) reads it. Does not own sending anything.
//!
//! Invariants: a reader sees a value some phase boundary of the current step wrote, or
//! [`Phase::Started`] after [`StepPhase::reset`]; layer and phase are always written together
//! (one word), so a reader never pairs one layer's index with another layer's phase.

use std::sync::atomic::{AtomicU64, Ordering};

/// A phase of one step on one rank. Layer phases come with the layer index.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// The step was handed to the executor (no layer yet).
    Started,
    /// The embedding lookup (and the vocabulary-parallel all-reduce when sharded).
    Embed,
    /// Attention of a layer (with its TP all-reduce when sharded).
    Attention,
    /// A dense FFN (with its TP all-reduce when sharded).
    Ffn,
    /// MoE routing and the dispatch all-to-all (sharded).
    Dispatch,
    /// Routed-expert compute (one rank: routing and experts).
    Experts,
    /// MoE combine all-to-all and weighted sum, the group all-gather (sharded).
    Combine,
    /// Final norm, LM head (and the vocabulary all-gather when sharded).
    Head,
    /// Sampling and result encoding.
    Sample,
}

impl Phase {
    const ALL: [Phase; 9] = [
        Phase::Started,
        Phase::Embed,
        Phase::Attention,
        Phase::Ffn,
        Phase::Dispatch,
        Phase::Experts,
        Phase::Combine,
        Phase::Head,
        Phase::Sample,
    ];

    /// The name reported in `StepProgress.phase`.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Started => "started",
            Phase::Embed => "embed",
            Phase::Attention => "attention",
            Phase::Ffn => "ffn",
            Phase::Dispatch => "dispatch",
            Phase::Experts => "experts",
            Phase::Combine => "combine",
            Phase::Head => "head",
            Phase::Sample => "sample",
        }
    }

    /// Whether the phase belongs to a layer (reported with its index).
    pub fn in_layer(self) -> bool {
        matches!(
            self,
            Phase::Attention | Phase::Ffn | Phase::Dispatch | Phase::Experts | Phase::Combine
        )
    }

    fn code(self) -> u64 {
        Self::ALL.iter().position(|&p| p == self).unwrap_or(0) as u64
    }

    fn from_code(c: u64) -> Phase {
        Self::ALL.get(c as usize).copied().unwrap_or(Phase::Started)
    }
}

/// Where the current step of one rank is. Share it with `Arc`.
#[derive(Debug)]
pub struct StepPhase {
    /// `layer + 1` (0: no layer) in the high 32 bits, the phase code in the low ones.
    word: AtomicU64,
}

impl Default for StepPhase {
    fn default() -> Self {
        Self { word: AtomicU64::new(Phase::Started.code()) }
    }
}

impl StepPhase {
    /// A new step begins: no layer, [`Phase::Started`].
    pub fn reset(&self) {
        self.word.store(Phase::Started.code(), Ordering::Relaxed);
    }

    /// The step entered `phase` of `layer` (`None`: a phase outside the layers).
    pub fn set(&self, layer: Option<usize>, phase: Phase) {
        let l = layer.map_or(0, |l| l as u64 + 1) & 0xffff_ffff;
        self.word.store((l << 32) | phase.code(), Ordering::Relaxed);
    }

    /// The layer (`-1`: none) and phase last set.
    pub fn get(&self) -> (i32, Phase) {
        let w = self.word.load(Ordering::Relaxed);
        ((w >> 32) as i32 - 1, Phase::from_code(w & 0xffff_ffff))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layer_and_phase_round_trip() {
        let p = StepPhase::default();
        assert_eq!(p.get(), (-1, Phase::Started));
        p.set(Some(0), Phase::Attention);
        assert_eq!(p.get(), (0, Phase::Attention));
        p.set(Some(60), Phase::Combine);
        assert_eq!(p.get(), (60, Phase::Combine));
        p.set(None, Phase::Head);
        assert_eq!(p.get(), (-1, Phase::Head));
        p.reset();
        assert_eq!(p.get(), (-1, Phase::Started));
        for ph in Phase::ALL {
            assert_eq!(Phase::from_code(ph.code()), ph);
        }
        assert!(Phase::Dispatch.in_layer() && !Phase::Sample.in_layer());
    }
}
