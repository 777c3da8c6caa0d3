//! `fathom-coordinator`: the process users talk to.
//!
//! Owns: the Inference and Admin gRPC APIs, the scheduler (continuous batching, KV block
//! accounting), the planner (plans from live members) and membership (etcd, in-memory).
//!
//! Never depends on `fathom-kernels` or any GPU code: the coordinator only does bookkeeping and
//! messaging; activations never pass through it.

pub mod membership;
pub mod scheduler;
