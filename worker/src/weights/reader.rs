//! [`CheckpointReader`]: an HF DeepSeek-V3.2 checkpoint directory (`config.json` in either rope
//! form, `model.safetensors.index.json` + shards or a single `model.safetensors`), memory-mapped,
//! served as a [`TensorSource`].
//!
//! Invariants established by [`CheckpointReader::open`], before any load:
//! - every tensor of `fathom_common::tensors::checkpoint_tensors(config)` is present with its
//!   exact shape (MTP layers: all present or all absent, see [`CheckpointReader::has_mtp`]), and
//!   no other tensor is;
//! - dtypes are F32, BF16, F16, or F8_E4M3 for weights that may be FP8, each such weight with an
//!   F32 `weight_scale_inv` of shape `[ceil(out/b0), ceil(in/b1)]` whose values are finite and
//!   positive;
//! - every file the index names exists and is a well-formed safetensors file covering its data,
//!   and the index agrees with the files.
//!
//! So a model never half-loads: loads after `open` fail only on I/O. Every error names the
//! tensor and the file. Loads decode to f32 (FP8 dequantized per block, partial edge blocks
//! included); slices read only the bytes of the slice (whole contiguous rows for dim 0, a strided
//! run per row otherwise). Bytes read are counted per tensor ([`CheckpointReader::bytes_read_by_tensor`]).

use super::fp8::E4M3_TO_F32;
use super::{TensorSource, WeightsError};
use fathom_common::ModelConfig;
use fathom_common::tensors::{TensorSpec, checkpoint_tensors, fp8_block, scale_shape};
use fathom_kernels::Tensor;
use memmap2::Mmap;
use rayon::prelude::*;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

/// A stored tensor: where it lives and how.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredTensor {
    pub name: String,
    /// File name relative to the checkpoint directory.
    pub file: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    /// Byte range inside the mmap of its file (absolute).
    pub start: usize,
    pub len: usize,
}

impl StoredTensor {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

#[derive(Debug)]
struct Shard {
    name: String,
    mmap: Mmap,
}

/// A validated, memory-mapped checkpoint.
#[derive(Debug)]
pub struct CheckpointReader {
    dir: PathBuf,
    config: ModelConfig,
    shards: Vec<Shard>,
    /// Stored tensors (weights and scales), by name, with their shard index.
    stored: HashMap<String, (usize, StoredTensor)>,
    /// Expected tensors that are present (MTP ones only when `has_mtp`).
    specs: Vec<TensorSpec>,
    has_mtp: bool,
    block: [usize; 2],
    validation_bytes: u64,
    bytes_read: AtomicU64,
    per_tensor: Mutex<HashMap<String, u64>>,
}

fn err_file(file: &str, reason: impl Into<String>) -> WeightsError {
    WeightsError::File { file: file.into(), reason: reason.into() }
}

fn err_tensor(name: &str, file: &str, reason: impl Into<String>) -> WeightsError {
    WeightsError::Tensor { name: name.into(), file: file.into(), reason: reason.into() }
}

#[derive(serde::Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

fn map_file(dir: &Path, name: &str) -> Result<Mmap, WeightsError> {
    let path = dir.join(name);
    let file = std::fs::File::open(&path)
        .map_err(|source| WeightsError::Io { file: path.display().to_string(), source })?;
    // SAFETY: the mapping is read-only and private to this reader; a checkpoint file modified
    // while it is served is outside the contract (as for every mmap-based loader). Reads go
    // through bounds-checked slices of the map.
    unsafe { Mmap::map(&file) }
        .map_err(|source| WeightsError::Io { file: path.display().to_string(), source })
}

impl CheckpointReader {
    /// Opens and fully validates the checkpoint in `dir` (see the module doc).
    pub fn open(dir: &Path) -> Result<Self, WeightsError> {
        let cfg_path = dir.join("config.json");
        let config = ModelConfig::from_file(&cfg_path).map_err(|source| WeightsError::Config {
            file: cfg_path.display().to_string(),
            source,
        })?;
        let index_path = dir.join("model.safetensors.index.json");
        let (files, weight_map) = if index_path.exists() {
            let idx_name = index_path.display().to_string();
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| WeightsError::Io { file: idx_name.clone(), source })?;
            let index: IndexFile = serde_json::from_str(&text)
                .map_err(|e| err_file(&idx_name, format!("malformed index: {e}")))?;
            let mut files: Vec<String> = index.weight_map.values().cloned().collect();
            files.sort();
            files.dedup();
            for f in &files {
                if f.contains('/') || f.contains('\\') || f == ".." {
                    return Err(err_file(
                        &idx_name,
                        format!("names file {f:?} outside the checkpoint directory"),
                    ));
                }
                if !dir.join(f).is_file() {
                    let t = index
                        .weight_map
                        .iter()
                        .find(|(_, v)| *v == f)
                        .map(|(k, _)| k.as_str())
                        .unwrap_or("?");
                    return Err(err_file(
                        &idx_name,
                        format!("names missing file {f} (for tensor {t})"),
                    ));
                }
            }
            (files, Some(index.weight_map))
        } else if dir.join("model.safetensors").is_file() {
            (vec!["model.safetensors".to_string()], None)
        } else {
            return Err(err_file(
                &dir.display().to_string(),
                "no model.safetensors.index.json or model.safetensors",
            ));
        };

        let mut shards = Vec::with_capacity(files.len());
        let mut stored: HashMap<String, (usize, StoredTensor)> = HashMap::new();
        for (si, f) in files.iter().enumerate() {
            let mmap = map_file(dir, f)?;
            let (n, meta) = SafeTensors::read_metadata(&mmap).map_err(|e| {
                err_file(
                    &dir.join(f).display().to_string(),
                    format!("not a valid safetensors file (truncated or corrupt?): {e}"),
                )
            })?;
            let base = 8 + n;
            for (name, info) in meta.tensors() {
                let (s, e) = info.data_offsets;
                let t = StoredTensor {
                    name: name.clone(),
                    file: f.clone(),
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: base + s,
                    len: e - s,
                };
                if let Some(wm) = &weight_map {
                    match wm.get(&name) {
                        Some(g) if g == f => {}
                        Some(g) => {
                            return Err(err_tensor(&name, f, format!("the index maps it to {g}")));
                        }
                        None => {
                            return Err(err_tensor(
                                &name,
                                f,
                                "not listed in model.safetensors.index.json",
                            ));
                        }
                    }
                }
                if let Some((_, prev)) = stored.get(&name) {
                    return Err(err_tensor(&name, f, format!("also stored in {}", prev.file)));
                }
                stored.insert(name, (si, t));
            }
            shards.push(Shard { name: f.clone(), mmap });
        }
        if let Some(wm) = &weight_map {
            for (name, f) in wm {
                if !stored.contains_key(name) {
                    return Err(err_tensor(
                        name,
                        f,
                        "listed in the index but absent from the file",
                    ));
                }
            }
        }

        let block = fp8_block(&config);
        let all = checkpoint_tensors(&config);
        let has_mtp = all.iter().any(|t| t.is_mtp(&config) && stored.contains_key(&t.name));
        let specs: Vec<TensorSpec> =
            all.into_iter().filter(|t| has_mtp || !t.is_mtp(&config)).collect();
        let mut reader = Self {
            dir: dir.to_owned(),
            config,
            shards,
            stored,
            specs,
            has_mtp,
            block,
            validation_bytes: 0,
            bytes_read: AtomicU64::new(0),
            per_tensor: Mutex::new(HashMap::new()),
        };
        reader.validate()?;
        Ok(reader)
    }

    fn where_missing(&self) -> String {
        if self.shards.len() == 1 && self.shards[0].name == "model.safetensors" {
            self.dir.join("model.safetensors").display().to_string()
        } else {
            self.dir.join("model.safetensors.index.json").display().to_string()
        }
    }

    fn validate(&mut self) -> Result<(), WeightsError> {
        let mut known: HashMap<&str, ()> = HashMap::new();
        for spec in &self.specs {
            known.insert(&spec.name, ());
            let Some((_, t)) = self.stored.get(&spec.name) else {
                let what =
                    if spec.is_mtp(&self.config) { " (the MTP layer is incomplete)" } else { "" };
                return Err(err_tensor(
                    &spec.name,
                    &self.where_missing(),
                    format!("missing{what}"),
                ));
            };
            if t.shape != spec.shape {
                return Err(err_tensor(
                    &spec.name,
                    &t.file,
                    format!("shape {:?}, expected {:?} from config.json", t.shape, spec.shape),
                ));
            }
            let scale_name = spec.scale_name();
            let scale = self.stored.get(&scale_name).map(|(_, s)| s);
            match t.dtype {
                Dtype::F32 | Dtype::BF16 | Dtype::F16 => {
                    if let Some(s) = scale {
                        return Err(err_tensor(
                            &scale_name,
                            &s.file,
                            format!("present but {} is {}, not F8_E4M3", spec.name, t.dtype),
                        ));
                    }
                }
                Dtype::F8_E4M3 if spec.fp8_allowed() => {
                    let Some(s) = scale else {
                        return Err(err_tensor(
                            &spec.name,
                            &t.file,
                            format!("F8_E4M3 without {scale_name}"),
                        ));
                    };
                    let want = scale_shape(&spec.shape, self.block);
                    if s.dtype != Dtype::F32 || s.shape != want {
                        return Err(err_tensor(
                            &scale_name,
                            &s.file,
                            format!("{} {:?}, expected F32 {want:?}", s.dtype, s.shape),
                        ));
                    }
                    known.insert(&s.name, ());
                }
                Dtype::F8_E4M3 => {
                    return Err(err_tensor(
                        &spec.name,
                        &t.file,
                        "F8_E4M3, but this tensor is never quantized",
                    ));
                }
                other => {
                    return Err(err_tensor(
                        &spec.name,
                        &t.file,
                        format!("unsupported dtype {other} (F32, BF16, F16 or F8_E4M3)"),
                    ));
                }
            }
        }
        if let Some((_, t)) =
            self.stored.values().find(|(_, t)| !known.contains_key(t.name.as_str()))
        {
            return Err(err_tensor(
                &t.name,
                &t.file,
                "not a tensor of this config's DeepSeek-V3.2 layout",
            ));
        }
        // Scale values, all of them now: a NaN scale must not surface halfway through a load.
        let mut checked = 0u64;
        for (si, t) in self.stored.values().filter(|(_, t)| t.name.ends_with("_scale_inv")) {
            let bytes = &self.shards[*si].mmap[t.start..t.start + t.len];
            checked += t.len as u64;
            if let Some((i, v)) = bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .enumerate()
                .find(|(_, v)| !(v.is_finite() && *v > 0.0))
            {
                return Err(err_tensor(
                    &t.name,
                    &t.file,
                    format!("scale {v} at element {i} is not finite and positive"),
                ));
            }
        }
        self.validation_bytes = checked;
        Ok(())
    }

    /// The parsed, validated `config.json`.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// The checkpoint directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the MTP layer(s) are stored (HF `save_pretrained` drops them).
    pub fn has_mtp(&self) -> bool {
        self.has_mtp
    }

    /// The expected tensors present in this checkpoint, in canonical order.
    pub fn specs(&self) -> &[TensorSpec] {
        &self.specs
    }

    /// How tensor `name` (a weight or a scale) is stored.
    pub fn stored(&self, name: &str) -> Option<&StoredTensor> {
        self.stored.get(name).map(|(_, t)| t)
    }

    /// Names of the shard files, sorted.
    pub fn files(&self) -> Vec<&str> {
        self.shards.iter().map(|s| s.name.as_str()).collect()
    }

    /// Bytes read by loads since open (or the last reset), scales included.
    pub fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }

    /// Bytes read per tensor (a weight's scale bytes count under the weight's name).
    pub fn bytes_read_by_tensor(&self) -> BTreeMap<String, u64> {
        self.per_tensor.lock().expect("counter lock").iter().map(|(k, v)| (k.clone(), *v)).collect()
    }

    /// Bytes `open` read to validate scales (not counted in `bytes_read`).
    pub fn validation_bytes(&self) -> u64 {
        self.validation_bytes
    }

    pub fn reset_counters(&self) {
        self.bytes_read.store(0, Ordering::Relaxed);
        self.per_tensor.lock().expect("counter lock").clear();
    }

    fn count(&self, name: &str, bytes: u64) {
        self.bytes_read.fetch_add(bytes, Ordering::Relaxed);
        *self.per_tensor.lock().expect("counter lock").entry(name.to_string()).or_default() +=
            bytes;
    }

    fn entry(&self, name: &str) -> Result<(&Shard, &StoredTensor), WeightsError> {
        self.stored
            .get(name)
            .map(|(si, t)| (&self.shards[*si], t))
            .ok_or_else(|| WeightsError::Missing { name: name.into() })
    }

    /// The stored bytes of rows `[start, end)` of `name` as they are in the file (e4m3 bytes of an
    /// FP8 weight, without its scale): for device paths that consume FP8 directly. Counted like
    /// a load.
    pub fn raw_rows(&self, name: &str, start: usize, end: usize) -> Result<&[u8], WeightsError> {
        let (shard, t) = self.entry(name)?;
        let rows = t.shape.first().copied().unwrap_or(0);
        if start > end || end > rows {
            return Err(err_tensor(
                name,
                &t.file,
                format!("rows [{start}, {end}) outside shape {:?}", t.shape),
            ));
        }
        let row_bytes = t.len / rows.max(1);
        self.count(name, ((end - start) * row_bytes) as u64);
        Ok(&shard.mmap[t.start + start * row_bytes..t.start + end * row_bytes])
    }

    /// Decodes `[start, end)` of `dim` of `name` to f32 (scales applied for F8).
    fn read(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, WeightsError> {
        let (shard, t) = self.entry(name)?;
        if dim >= t.shape.len() || start > end || end > t.shape[dim] {
            return Err(err_tensor(
                name,
                &t.file,
                format!("slice [{start}, {end}) of dim {dim} is outside shape {:?}", t.shape),
            ));
        }
        let outer: usize = t.shape[..dim].iter().product();
        let inner: usize = t.shape[dim + 1..].iter().product();
        let n = t.shape[dim];
        let seg = (end - start) * inner; // contiguous elements per outer index
        let esize = t.dtype.bitsize() / 8;
        let data = &shard.mmap[t.start..t.start + t.len];
        // Element d of the output lives at source element src(d).
        let src = |d: usize| (d / seg.max(1)) * n * inner + start * inner + d % seg.max(1);
        let total = outer * seg;
        let mut out = vec![0.0f32; total];
        let mut bytes = (total * esize) as u64;
        const CHUNK: usize = 1 << 16;
        match t.dtype {
            Dtype::F32 => out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    let s = src(k * CHUNK + j) * 4;
                    *v = f32::from_le_bytes([data[s], data[s + 1], data[s + 2], data[s + 3]]);
                }
            }),
            Dtype::BF16 => out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    let s = src(k * CHUNK + j) * 2;
                    *v = half::bf16::from_le_bytes([data[s], data[s + 1]]).to_f32();
                }
            }),
            Dtype::F16 => out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                for (j, v) in o.iter_mut().enumerate() {
                    let s = src(k * CHUNK + j) * 2;
                    *v = half::f16::from_le_bytes([data[s], data[s + 1]]).to_f32();
                }
            }),
            Dtype::F8_E4M3 => {
                let (sshard, st) = self.entry(&format!("{name}_scale_inv"))?;
                let sdata = &sshard.mmap[st.start..st.start + st.len];
                let cols = t.shape[1];
                let sc = st.shape[1];
                let [b0, b1] = self.block;
                let scale = |r: usize, c: usize| {
                    let s = ((r / b0) * sc + c / b1) * 4;
                    f32::from_le_bytes([sdata[s], sdata[s + 1], sdata[s + 2], sdata[s + 3]])
                };
                out.par_chunks_mut(CHUNK).enumerate().for_each(|(k, o)| {
                    for (j, v) in o.iter_mut().enumerate() {
                        let s = src(k * CHUNK + j);
                        *v = E4M3_TO_F32[data[s] as usize] * scale(s / cols, s % cols);
                    }
                });
                // Scale blocks the slice touches.
                let (r0, r1, c0, c1) =
                    if dim == 0 { (start, end, 0, cols) } else { (0, t.shape[0], start, end) };
                if r1 > r0 && c1 > c0 {
                    bytes +=
                        (((r1 - 1) / b0 - r0 / b0 + 1) * ((c1 - 1) / b1 - c0 / b1 + 1) * 4) as u64;
                }
            }
            other => return Err(err_tensor(name, &t.file, format!("unsupported dtype {other}"))),
        }
        self.count(name, bytes);
        let mut shape = t.shape.clone();
        shape[dim] = end - start;
        Ok(Tensor::new(shape, out))
    }
}

impl TensorSource for CheckpointReader {
    fn load(&self, name: &str) -> Result<Tensor, WeightsError> {
        let (_, t) = self.entry(name)?;
        // Validation admits no scalars; an empty shape is reported as an out-of-range slice.
        let rows = t.shape.first().copied().unwrap_or(0);
        self.read(name, 0, 0, rows)
    }

    fn load_slice(
        &self,
        name: &str,
        dim: usize,
        start: usize,
        end: usize,
    ) -> Result<Tensor, WeightsError> {
        self.read(name, dim, start, end)
    }

    fn contains(&self, name: &str) -> bool {
        self.stored.contains_key(name)
    }
}
