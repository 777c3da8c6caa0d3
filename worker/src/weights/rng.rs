//! Counter-based SplitMix64: the value at index `i` of a stream is a pure function of
//! `(seed, stream name, i)`, so tensors (and chunks of one tensor) can be generated in any order
//! and in parallel with identical results.
//!
//! Not cryptographic; only for synthetic weights and tests.

const GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// SplitMix64's output mix (Steele, Lea, Flood 2014).
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// One random stream, keyed by a seed and a name (e.g. the tensor name).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream {
    key: u64,
}

impl Stream {
    pub fn new(seed: u64, name: &str) -> Self {
        // FNV-1a over the name, then mixed with the seed.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in name.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x0100_0000_01b3);
        }
        Self { key: mix64(mix64(seed) ^ h) }
    }

    /// The `i`-th 64-bit output.
    pub fn u64_at(&self, i: u64) -> u64 {
        mix64(self.key.wrapping_add(i.wrapping_add(1).wrapping_mul(GAMMA)))
    }

    /// The `i`-th output as a uniform f32 in `[-1, 1)` (24 random bits).
    pub fn uniform_at(&self, i: u64) -> f32 {
        let bits = (self.u64_at(i) >> 40) as u32; // 24 bits
        (bits as f32) * (2.0 / 16_777_216.0) - 1.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_differ_by_name_and_seed_and_are_uniform() {
        let a = Stream::new(1, "a");
        assert_eq!(a, Stream::new(1, "a"));
        assert_ne!(a.u64_at(0), Stream::new(2, "a").u64_at(0));
        assert_ne!(a.u64_at(0), Stream::new(1, "b").u64_at(0));
        let n = 100_000;
        let xs: Vec<f32> = (0..n).map(|i| a.uniform_at(i)).collect();
        assert!(xs.iter().all(|x| (-1.0..1.0).contains(x)));
        let mean = xs.iter().sum::<f32>() / n as f32;
        let var = xs.iter().map(|x| x * x).sum::<f32>() / n as f32;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0 / 3.0).abs() < 0.01, "var {var}");
    }
}
