//! Streaming safetensors writer: the header (names, dtypes, shapes, offsets, and metadata
//! `{"format":"pt"}`) is written first from a plan, then each tensor's bytes are appended in
//! plan order, so no tensor (let alone the model) has to be held in memory.
//!
//! Invariant: `finish` succeeds only if exactly the planned bytes were written, tensor by tensor,
//! in order; otherwise the file is reported incomplete (never silently short).

use super::WeightsError;
use safetensors::Dtype;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

/// One tensor of a planned file.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTensor {
    pub name: String,
    pub dtype: Dtype,
    pub shape: Vec<usize>,
}

impl PlannedTensor {
    /// Bytes of its data.
    pub fn nbytes(&self) -> u64 {
        self.shape.iter().product::<usize>() as u64 * (self.dtype.bitsize() as u64 / 8)
    }
}

/// A safetensors file being written.
#[derive(Debug)]
pub struct StWriter {
    path: PathBuf,
    out: BufWriter<File>,
    plan: Vec<PlannedTensor>,
    /// Index of the tensor being written and bytes of it written so far.
    current: usize,
    written: u64,
}

fn io_err(path: &Path, source: std::io::Error) -> WeightsError {
    WeightsError::Io { file: path.display().to_string(), source }
}

/// The JSON header of `plan`, padded with spaces to a multiple of 8 bytes.
pub fn header_bytes(plan: &[PlannedTensor]) -> Vec<u8> {
    let mut map = serde_json::Map::new();
    map.insert("__metadata__".into(), serde_json::json!({ "format": "pt" }));
    let mut offset = 0u64;
    for t in plan {
        let end = offset + t.nbytes();
        map.insert(
            t.name.clone(),
            serde_json::json!({ "dtype": t.dtype.to_string(), "shape": t.shape, "data_offsets": [offset, end] }),
        );
        offset = end;
    }
    let mut header =
        serde_json::to_vec(&serde_json::Value::Object(map)).expect("header serializes");
    while header.len() % 8 != 0 {
        header.push(b' ');
    }
    header
}

impl StWriter {
    /// Creates `path` and writes the header of `plan`.
    pub fn create(path: &Path, plan: Vec<PlannedTensor>) -> Result<Self, WeightsError> {
        let file = File::create(path).map_err(|e| io_err(path, e))?;
        let mut out = BufWriter::with_capacity(8 << 20, file);
        let header = header_bytes(&plan);
        out.write_all(&(header.len() as u64).to_le_bytes()).map_err(|e| io_err(path, e))?;
        out.write_all(&header).map_err(|e| io_err(path, e))?;
        Ok(Self { path: path.to_owned(), out, plan, current: 0, written: 0 })
    }

    /// Appends bytes of tensor `name`, which must be the planned tensor being written.
    pub fn write(&mut self, name: &str, bytes: &[u8]) -> Result<(), WeightsError> {
        let file = self.path.display().to_string();
        let Some(t) = self.plan.get(self.current) else {
            return Err(WeightsError::Tensor {
                name: name.into(),
                file,
                reason: "written after the last planned tensor".into(),
            });
        };
        if t.name != name || self.written + bytes.len() as u64 > t.nbytes() {
            return Err(WeightsError::Tensor {
                name: name.into(),
                file,
                reason: format!(
                    "out of plan order: expected {} ({} of {} bytes written)",
                    t.name,
                    self.written,
                    t.nbytes()
                ),
            });
        }
        self.out.write_all(bytes).map_err(|e| io_err(&self.path, e))?;
        self.written += bytes.len() as u64;
        if self.written == t.nbytes() {
            self.current += 1;
            self.written = 0;
        }
        Ok(())
    }

    /// Flushes; fails unless every planned byte was written.
    pub fn finish(mut self) -> Result<(), WeightsError> {
        // Zero-sized tensors complete without any write.
        while self.plan.get(self.current).is_some_and(|t| t.nbytes() == 0) {
            self.current += 1;
        }
        if self.current != self.plan.len() {
            return Err(WeightsError::File {
                file: self.path.display().to_string(),
                reason: format!(
                    "incomplete: tensor {} not fully written",
                    self.plan[self.current].name
                ),
            });
        }
        self.out.flush().map_err(|e| io_err(&self.path, e))?;
        self.out.get_ref().sync_all().map_err(|e| io_err(&self.path, e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_a_file_the_safetensors_crate_reads() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("a.safetensors");
        let plan = vec![
            PlannedTensor { name: "x".into(), dtype: Dtype::F32, shape: vec![2, 3] },
            PlannedTensor { name: "y".into(), dtype: Dtype::U8, shape: vec![5] },
        ];
        let mut w = StWriter::create(&p, plan).unwrap();
        let xs: Vec<u8> = (0..6).flat_map(|i| (i as f32).to_le_bytes()).collect();
        w.write("x", &xs[..10]).unwrap();
        w.write("x", &xs[10..]).unwrap();
        assert!(w.write("x", &[0]).is_err(), "past the plan order");
        w.write("y", &[1, 2, 3, 4, 5]).unwrap();
        w.finish().unwrap();
        let buf = std::fs::read(&p).unwrap();
        let st = safetensors::SafeTensors::deserialize(&buf).unwrap();
        assert_eq!(st.tensor("x").unwrap().data(), &xs[..]);
        assert_eq!(st.tensor("y").unwrap().shape(), [5]);
        let (_, meta) = safetensors::SafeTensors::read_metadata(&buf).unwrap();
        assert_eq!(meta.metadata().as_ref().unwrap()["format"], "pt");
    }

    #[test]
    fn short_file_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("b.safetensors");
        let plan = vec![PlannedTensor { name: "x".into(), dtype: Dtype::F32, shape: vec![2] }];
        let mut w = StWriter::create(&p, plan).unwrap();
        w.write("x", &[0; 4]).unwrap();
        let e = w.finish().unwrap_err().to_string();
        assert!(e.contains("b.safetensors") && e.contains("x"), "{e}");
    }
}
