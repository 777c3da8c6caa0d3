//! `fathom-common`: the pure data types every other Fathom crate shares.
//!
//! Owns: [`ModelConfig`] (a typed mirror of a Hugging Face DeepSeek-V3.2 `config.json`, its
//! validation, derived quantities and named presets), the canonical checkpoint tensor list
//! ([`tensors`]), the cluster config file read by
//! `fathom coordinator|worker --config` ([`cluster`]), small id newtypes ([`ids`]), and the
//! parallel layout and expert placement of a plan epoch ([`plan`]).
//!
//! Does not own: anything that performs I/O beyond reading a config file, anything async, and
//! anything device-specific. This crate depends on no runtime (no tokio, tonic or cudarc), so
//! the coordinator can use it without pulling in kernels.

pub mod cluster;
pub mod config;
pub mod ids;
pub mod plan;
pub mod tensors;

pub use config::{ConfigError, ModelConfig};
