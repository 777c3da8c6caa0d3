//! [`BlockPool`]: the KV cache blocks of one attention group, as pure bookkeeping, and
//! [`BlockTable`], one sequence's blocks in position order.
//!
//! Design (after mistral.rs `paged_attention/block_pool.rs` and vLLM's block manager): a LIFO
//! free list plus an allocation bitmap. `allocate(n)` is all-or-nothing; `free` validates every
//! id (known, allocated, not repeated in the call) before changing anything, so a double free is
//! an error that leaves the pool untouched. No prefix sharing yet (no reference counts).
//! Complexity: O(n) for n blocks allocated or freed; O(1) counts.
//!
//! Invariant: `free_count() + allocated blocks == total()`, and a block is either on the free
//! list or marked allocated, never both.

use super::SchedulerError;

/// Index of a block in a group's pool (what the worker's paged cache is addressed by).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct BlockId(pub u32);

/// The KV blocks of one attention group.
#[derive(Debug, Clone)]
pub struct BlockPool {
    block_size: usize,
    free: Vec<u32>,
    allocated: Vec<bool>,
}

impl BlockPool {
    /// A pool of `num_blocks` blocks of `block_size` tokens (both >= 1).
    pub fn new(num_blocks: usize, block_size: usize) -> Result<Self, SchedulerError> {
        if num_blocks == 0 || block_size == 0 || num_blocks > u32::MAX as usize {
            return Err(SchedulerError::InvalidConfig {
                what: "kv blocks",
                reason: format!("{num_blocks} blocks of {block_size} tokens"),
            });
        }
        // Reverse so that the first allocations get low ids (easier to read in traces).
        let free = (0..num_blocks as u32).rev().collect();
        Ok(Self { block_size, free, allocated: vec![false; num_blocks] })
    }

    /// Tokens per block.
    pub fn block_size(&self) -> usize {
        self.block_size
    }

    /// Blocks in the pool.
    pub fn total(&self) -> usize {
        self.allocated.len()
    }

    /// Blocks not allocated.
    pub fn free_count(&self) -> usize {
        self.free.len()
    }

    /// Blocks allocated.
    pub fn used(&self) -> usize {
        self.total() - self.free_count()
    }

    /// Blocks needed to hold `tokens` tokens.
    pub fn blocks_for(&self, tokens: usize) -> usize {
        tokens.div_ceil(self.block_size)
    }

    /// Allocates `n` blocks, or none (error) if fewer are free.
    pub fn allocate(&mut self, n: usize) -> Result<Vec<BlockId>, SchedulerError> {
        if n > self.free.len() {
            return Err(SchedulerError::OutOfBlocks { requested: n, free: self.free.len() });
        }
        let out: Vec<BlockId> =
            self.free.split_off(self.free.len() - n).into_iter().rev().map(BlockId).collect();
        for b in &out {
            debug_assert!(!self.allocated[b.0 as usize]);
            self.allocated[b.0 as usize] = true;
        }
        Ok(out)
    }

    /// Returns `blocks` to the pool. Fails without changing anything if any id is out of range,
    /// not allocated, or repeated.
    pub fn free(&mut self, blocks: &[BlockId]) -> Result<(), SchedulerError> {
        let mut seen = std::collections::HashSet::with_capacity(blocks.len());
        for b in blocks {
            let i = b.0 as usize;
            if i >= self.allocated.len() {
                return Err(SchedulerError::UnknownBlock { block: b.0, total: self.total() });
            }
            if !self.allocated[i] || !seen.insert(i) {
                return Err(SchedulerError::DoubleFree { block: b.0 });
            }
        }
        for b in blocks {
            self.allocated[b.0 as usize] = false;
            self.free.push(b.0);
        }
        Ok(())
    }
}

/// One sequence's blocks, in position order: position p is in `blocks()[p / block_size]`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BlockTable {
    blocks: Vec<BlockId>,
}

impl BlockTable {
    /// The blocks, in position order.
    pub fn blocks(&self) -> &[BlockId] {
        &self.blocks
    }

    /// Extra blocks needed so the table holds `tokens` tokens.
    pub fn missing_for(&self, pool: &BlockPool, tokens: usize) -> usize {
        pool.blocks_for(tokens).saturating_sub(self.blocks.len())
    }

    /// Grows the table to hold `tokens` tokens (all-or-nothing).
    pub fn grow_to(&mut self, pool: &mut BlockPool, tokens: usize) -> Result<(), SchedulerError> {
        let missing = self.missing_for(pool, tokens);
        let new = pool.allocate(missing)?;
        self.blocks.extend(new);
        Ok(())
    }

    /// Returns every block to the pool and empties the table.
    pub fn release(&mut self, pool: &mut BlockPool) -> Result<(), SchedulerError> {
        pool.free(&self.blocks)?;
        self.blocks.clear();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn allocate_is_all_or_nothing() {
        let mut p = BlockPool::new(4, 16).unwrap();
        let a = p.allocate(3).unwrap();
        assert_eq!(a, [BlockId(0), BlockId(1), BlockId(2)]);
        let e = p.allocate(2).unwrap_err();
        assert_eq!(e, SchedulerError::OutOfBlocks { requested: 2, free: 1 });
        assert_eq!(p.free_count(), 1);
        assert_eq!(p.allocate(0).unwrap(), []);
    }

    #[test]
    fn double_free_and_unknown_blocks_are_errors_that_change_nothing() {
        let mut p = BlockPool::new(4, 16).unwrap();
        let a = p.allocate(2).unwrap();
        p.free(&a[..1]).unwrap();
        assert_eq!(p.free(&a), Err(SchedulerError::DoubleFree { block: a[0].0 }));
        assert_eq!(p.used(), 1, "the valid block in a failed free stays allocated");
        assert_eq!(p.free(&[a[1], a[1]]), Err(SchedulerError::DoubleFree { block: a[1].0 }));
        assert_eq!(p.free(&[BlockId(9)]), Err(SchedulerError::UnknownBlock { block: 9, total: 4 }));
        p.free(&a[1..]).unwrap();
        assert_eq!(p.free_count(), 4);
    }

    #[test]
    fn table_grows_only_at_block_boundaries() {
        let mut p = BlockPool::new(8, 4).unwrap();
        let mut t = BlockTable::default();
        t.grow_to(&mut p, 1).unwrap();
        assert_eq!(t.blocks().len(), 1);
        t.grow_to(&mut p, 4).unwrap();
        assert_eq!(t.blocks().len(), 1);
        assert_eq!(t.missing_for(&p, 5), 1);
        t.grow_to(&mut p, 9).unwrap();
        assert_eq!(t.blocks().len(), 3);
        assert_eq!(p.used(), 3);
        t.release(&mut p).unwrap();
        assert_eq!(p.used(), 0);
        assert!(t.blocks().is_empty());
    }

    #[test]
    fn zero_sized_pools_are_rejected() {
        assert!(BlockPool::new(0, 16).is_err());
        assert!(BlockPool::new(4, 0).is_err());
    }

    proptest! {
        /// Random allocate/free (including invalid frees): counts add up, no block is handed out
        /// twice, and invalid frees change nothing.
        #[test]
        fn pool_invariants_hold(ops in proptest::collection::vec((0u8..3, 0usize..6), 1..200)) {
            let mut p = BlockPool::new(16, 8).unwrap();
            let mut held: Vec<BlockId> = Vec::new();
            let mut freed: Vec<BlockId> = Vec::new();
            for (op, n) in ops {
                match op {
                    0 => match p.allocate(n) {
                        Ok(got) => {
                            for b in &got {
                                prop_assert!(!held.contains(b), "block {b:?} handed out twice");
                            }
                            freed.retain(|b| !got.contains(b));
                            held.extend(got);
                        }
                        Err(_) => prop_assert!(n > p.free_count()),
                    },
                    1 if !held.is_empty() => {
                        let k = n.min(held.len());
                        let out: Vec<BlockId> = held.drain(..k).collect();
                        p.free(&out).unwrap();
                        freed.extend(out);
                    }
                    _ => {
                        if let Some(b) = freed.first().copied() {
                            let before = p.free_count();
                            prop_assert_eq!(p.free(&[b]), Err(SchedulerError::DoubleFree { block: b.0 }));
                            prop_assert_eq!(p.free_count(), before);
                        }
                    }
                }
                prop_assert_eq!(p.used(), held.len());
                prop_assert_eq!(p.free_count() + held.len(), p.total());
            }
        }
    }
}
