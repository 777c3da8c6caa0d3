//! Paged KV caches of one DP group: the MLA latent cache (`kv_lora_rank + qk_rope_head_dim`
//! floats per token per layer: `[c | k_pe]`, k_pe already rotated) and the indexer key cache
//! (`index_head_dim` floats per token per layer, normalised and rotated), stored in fixed-size
//! blocks.
//!
//! Owns: block storage and addressing through a per-sequence block table supplied by the caller
//! (token position `p` lives in block `table[p / block_size]` at offset `p % block_size`), and a
//! small free-list [`BlockAllocator`] for single-process use (`fathom generate`).
//! Does not own: deciding which sequence gets which blocks (the coordinator does), eviction,
//! prefix sharing.
//!
//! Invariant: storage is `[layers, num_blocks, block_size, dim]` per cache; every access is
//! bounds-checked against the table and the block count and fails with a [`KvError`].

/// Default tokens per block (matches the 64-token pages of the production kernels).
pub const DEFAULT_BLOCK_SIZE: usize = 64;

/// Why a cache access failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KvError {
    #[error("position {pos} needs block {index} of the block table, which has only {len} blocks")]
    TableTooShort { pos: usize, index: usize, len: usize },
    #[error("block id {block} is out of range: the cache has {num_blocks} blocks")]
    BlockOutOfRange { block: u32, num_blocks: usize },
    #[error("layer {layer} is out of range: the cache has {layers} layers")]
    LayerOutOfRange { layer: usize, layers: usize },
    #[error("out of KV blocks: {requested} requested, {free} free")]
    OutOfBlocks { requested: usize, free: usize },
    #[error("invalid cache config: {0}")]
    Config(String),
}

/// Sizes of a [`PagedKvCache`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheConfig {
    /// Layers with attention (main layers + MTP layers).
    pub num_layers: usize,
    pub block_size: usize,
    pub num_blocks: usize,
    /// `kv_lora_rank + qk_rope_head_dim`.
    pub latent_dim: usize,
    /// `index_head_dim`.
    pub index_dim: usize,
}

impl CacheConfig {
    /// The cache shape a model config needs (main + MTP layers).
    pub fn for_model(
        cfg: &fathom_common::ModelConfig,
        block_size: usize,
        num_blocks: usize,
    ) -> Self {
        Self {
            num_layers: cfg.num_hidden_layers + cfg.num_nextn_predict_layers,
            block_size,
            num_blocks,
            latent_dim: cfg.kv_lora_rank + cfg.qk_rope_head_dim,
            index_dim: cfg.index_head_dim,
        }
    }
}

/// Number of blocks that hold `tokens` tokens.
pub fn blocks_for(tokens: usize, block_size: usize) -> usize {
    tokens.div_ceil(block_size)
}

/// Latent and indexer-key caches in f32 (the CPU reference keeps no FP8 simulation).
#[derive(Debug, Clone)]
pub struct PagedKvCache {
    cfg: CacheConfig,
    /// `[layers, num_blocks, block_size, latent_dim]`
    latent: Vec<f32>,
    /// `[layers, num_blocks, block_size, index_dim]`
    index: Vec<f32>,
}

impl PagedKvCache {
    pub fn new(cfg: CacheConfig) -> Result<Self, KvError> {
        if cfg.block_size == 0 || cfg.num_blocks == 0 || cfg.latent_dim == 0 || cfg.index_dim == 0 {
            return Err(KvError::Config(format!("all sizes must be > 0: {cfg:?}")));
        }
        let slots = cfg.num_layers * cfg.num_blocks * cfg.block_size;
        Ok(Self {
            cfg,
            latent: vec![0.0; slots * cfg.latent_dim],
            index: vec![0.0; slots * cfg.index_dim],
        })
    }

    pub fn config(&self) -> &CacheConfig {
        &self.cfg
    }

    /// Slot number (within a layer) of position `pos` under `table`.
    fn slot(&self, table: &[u32], pos: usize) -> Result<usize, KvError> {
        let index = pos / self.cfg.block_size;
        let block =
            *table.get(index).ok_or(KvError::TableTooShort { pos, index, len: table.len() })?;
        if block as usize >= self.cfg.num_blocks {
            return Err(KvError::BlockOutOfRange { block, num_blocks: self.cfg.num_blocks });
        }
        Ok(block as usize * self.cfg.block_size + pos % self.cfg.block_size)
    }

    fn layer_base(&self, layer: usize) -> Result<usize, KvError> {
        if layer >= self.cfg.num_layers {
            return Err(KvError::LayerOutOfRange { layer, layers: self.cfg.num_layers });
        }
        Ok(layer * self.cfg.num_blocks * self.cfg.block_size)
    }

    /// Checks that `table` covers positions `[0, end)` with valid block ids.
    pub fn check_table(&self, table: &[u32], end: usize) -> Result<(), KvError> {
        for i in 0..blocks_for(end, self.cfg.block_size) {
            self.slot(table, i * self.cfg.block_size)?;
        }
        Ok(())
    }

    /// Stores one token's latent (`[latent_dim]`) and indexer key (`[index_dim]`) at `pos`.
    pub fn write(
        &mut self,
        layer: usize,
        table: &[u32],
        pos: usize,
        latent: &[f32],
        index_key: &[f32],
    ) -> Result<(), KvError> {
        assert_eq!(latent.len(), self.cfg.latent_dim, "kv write: latent width");
        assert_eq!(index_key.len(), self.cfg.index_dim, "kv write: index key width");
        let s = self.layer_base(layer)? + self.slot(table, pos)?;
        let (ld, id) = (self.cfg.latent_dim, self.cfg.index_dim);
        self.latent[s * ld..(s + 1) * ld].copy_from_slice(latent);
        self.index[s * id..(s + 1) * id].copy_from_slice(index_key);
        Ok(())
    }

    /// Latent rows of positions `[0, len)`, gathered contiguous: `[len, latent_dim]`.
    pub fn read_latent(
        &self,
        layer: usize,
        table: &[u32],
        len: usize,
    ) -> Result<Vec<f32>, KvError> {
        self.gather(&self.latent, self.cfg.latent_dim, layer, table, len)
    }

    /// Indexer keys of positions `[0, len)`, gathered contiguous: `[len, index_dim]`.
    pub fn read_index(&self, layer: usize, table: &[u32], len: usize) -> Result<Vec<f32>, KvError> {
        self.gather(&self.index, self.cfg.index_dim, layer, table, len)
    }

    fn gather(
        &self,
        store: &[f32],
        dim: usize,
        layer: usize,
        table: &[u32],
        len: usize,
    ) -> Result<Vec<f32>, KvError> {
        let base = self.layer_base(layer)?;
        let bs = self.cfg.block_size;
        let mut out = Vec::with_capacity(len * dim);
        let mut pos = 0;
        while pos < len {
            let s = base + self.slot(table, pos)?;
            let run = (bs - pos % bs).min(len - pos);
            out.extend_from_slice(&store[s * dim..(s + run) * dim]);
            pos += run;
        }
        Ok(out)
    }
}

/// A free list of block ids `[0, num_blocks)`, for single-process use.
#[derive(Debug, Clone)]
pub struct BlockAllocator {
    free: Vec<u32>,
}

impl BlockAllocator {
    pub fn new(num_blocks: usize) -> Self {
        Self { free: (0..num_blocks as u32).rev().collect() }
    }

    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Takes `n` blocks.
    pub fn alloc(&mut self, n: usize) -> Result<Vec<u32>, KvError> {
        if n > self.free.len() {
            return Err(KvError::OutOfBlocks { requested: n, free: self.free.len() });
        }
        Ok(self.free.split_off(self.free.len() - n).into_iter().rev().collect())
    }

    /// Extends `table` so it covers `[0, tokens)`.
    pub fn grow(
        &mut self,
        table: &mut Vec<u32>,
        tokens: usize,
        block_size: usize,
    ) -> Result<(), KvError> {
        let need = blocks_for(tokens, block_size).saturating_sub(table.len());
        table.extend(self.alloc(need)?);
        Ok(())
    }

    /// Returns blocks to the free list.
    pub fn release(&mut self, blocks: &[u32]) {
        self.free.extend(blocks.iter().rev());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> CacheConfig {
        CacheConfig { num_layers: 2, block_size: 4, num_blocks: 8, latent_dim: 3, index_dim: 2 }
    }

    #[test]
    fn writes_land_in_table_blocks_and_gather_in_order() {
        let mut c = PagedKvCache::new(cfg()).unwrap();
        let table = [5u32, 2, 7];
        for p in 0..10 {
            let v = p as f32;
            c.write(1, &table, p, &[v, v + 0.1, v + 0.2], &[-v, -v - 0.5]).unwrap();
        }
        let lat = c.read_latent(1, &table, 10).unwrap();
        assert_eq!(lat.len(), 30);
        for p in 0..10 {
            assert_eq!(lat[p * 3], p as f32);
        }
        let idx = c.read_index(1, &table, 6).unwrap();
        assert_eq!(idx[5 * 2 + 1], -5.5);
        // Layer 0 untouched.
        assert!(c.read_latent(0, &table, 10).unwrap().iter().all(|&v| v == 0.0));
        // Position 8 is block 7 slot 0.
        assert_eq!(c.latent[(8 * 4 + 7 * 4) * 3], 8.0);
    }

    #[test]
    fn bad_tables_are_errors() {
        let mut c = PagedKvCache::new(cfg()).unwrap();
        assert_eq!(
            c.write(0, &[1], 4, &[0.0; 3], &[0.0; 2]),
            Err(KvError::TableTooShort { pos: 4, index: 1, len: 1 })
        );
        assert_eq!(
            c.read_latent(0, &[9], 1),
            Err(KvError::BlockOutOfRange { block: 9, num_blocks: 8 })
        );
        assert!(matches!(c.read_index(2, &[0], 1), Err(KvError::LayerOutOfRange { .. })));
        assert!(c.check_table(&[0, 1], 9).is_err());
        assert!(c.check_table(&[0, 1, 2], 9).is_ok());
    }

    #[test]
    fn allocator_hands_out_distinct_blocks_and_reports_exhaustion() {
        let mut a = BlockAllocator::new(4);
        let mut t = Vec::new();
        a.grow(&mut t, 9, 4).unwrap();
        assert_eq!(t, vec![0, 1, 2]);
        a.grow(&mut t, 12, 4).unwrap();
        assert_eq!(t.len(), 3);
        assert_eq!(a.alloc(2), Err(KvError::OutOfBlocks { requested: 2, free: 1 }));
        a.release(&t);
        assert_eq!(a.free_blocks(), 4);
    }
}
