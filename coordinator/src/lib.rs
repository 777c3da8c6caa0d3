//! `fathom-coordinator`: the process users talk to.
//!
//! Owns: the Inference and Admin gRPC APIs (`api/`), the OpenAI-compatible HTTP API (`http/`,
//! off unless configured), the serving engine (`engine/`: step loop,
//! continuous batching, KV block accounting, streaming), the planner (`planner/`: plans from live
//! members), worker directories (`directory.rs`) and the server wiring (`server.rs`); membership
//! (etcd, in-memory) is integrated from its own module.
//!
//! Never depends on `fathom-kernels` or any GPU code: the coordinator only does bookkeeping and
//! messaging; activations never pass through it.

pub mod api;
pub mod directory;
pub mod engine;
pub mod http;
pub mod membership;
pub mod metrics;
pub mod planner;
pub mod server;
pub mod telemetry;
pub mod text;
