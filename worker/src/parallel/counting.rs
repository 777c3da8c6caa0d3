//! [`CountingSource`]: a [`TensorSource`] wrapper that records how many values of which tensor
//! a loader asked for — the check that a rank reads only its own shard (tests, `fathom`
//! diagnostics). Counts what the wrapped source delivered (f32 values × 4 bytes), per tensor.

use crate::weights::{TensorSource, WeightsError};
use fathom_kernels::Tensor;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// Wraps a source (borrowed); every successful `load`/`load_slice` adds the delivered bytes to its tensor.
pub struct CountingSource<'a> {
    inner: &'a dyn TensorSource,
    bytes: Mutex<BTreeMap<String, u64>>,
}

impl std::fmt::Debug for CountingSource<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingSource").field("total_bytes", &self.total_bytes()).finish()
    }
}

impl<'a> CountingSource<'a> {
    pub fn new(inner: &'a dyn TensorSource) -> Self {
        Self { inner, bytes: Mutex::new(BTreeMap::new()) }
    }

    /// Delivered bytes (4 per f32 value) by tensor name.
    pub fn bytes_by_tensor(&self) -> BTreeMap<String, u64> {
        self.bytes.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Total delivered bytes.
    pub fn total_bytes(&self) -> u64 {
        self.bytes_by_tensor().values().sum()
    }

    fn count(&self, name: &str, t: &Tensor) {
        let mut map = self.bytes.lock().unwrap_or_else(|e| e.into_inner());
        *map.entry(name.to_string()).or_default() += 4 * t.len() as u64;
    }
}

impl TensorSource for CountingSource<'_> {
    fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        let t = self.inner.load(name)?;
        self.count(name, &t);
        Ok(t)
    }

    fn load_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, WeightsError> {
        let t = self.inner.load_slice(name, dim, start, end)?;
        self.count(name, &t);
        Ok(t)
    }

    fn contains(&self, name: &str) -> bool {
        self.inner.contains(name)
    }
}
