//! `fathom-worker`: everything one rank runs.
//!
//! Owns: `weights/` (checkpoint reading and synthesis in the exact HF format), `model/`
//! (DeepSeek-V3.2 layers composed from `fathom-kernels` ops), `parallel/` (one rank of a sharded
//! TP×EP world over `Collective`), `kv/` (paged latent and indexer caches), `sampling`,
//! `model_cuda/` (the model on one GPU), `executor` and `service` (the Worker gRPC service that
//! prepares epochs and runs steps).
//!
//! Does not own: scheduling or KV block allocation (the coordinator decides; workers execute).

pub mod executor;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod model_cuda;
pub mod parallel;
pub mod sampling;
pub mod service;
pub mod telemetry;
pub mod weights;
