//! The coordinator's public gRPC surface: `fathom.v1.Inference` (`inference.rs`, with request
//! validation in `validate.rs`) and `fathom.v1.Admin` (`admin.rs`), and the single error → status
//! mapping (`status.rs`). Health and reflection are standard services wired in `server.rs`.
//!
//! Does not own: scheduling or streaming mechanics (the engine).

pub mod admin;
pub mod inference;
pub mod status;
pub mod validate;
