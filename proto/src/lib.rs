//! `fathom-proto`: the generated gRPC types of package `fathom.v1` and the encoded file
//! descriptor set used for server reflection.
//!
//! Owns the wire contract only; no behaviour lives here.

#![allow(missing_debug_implementations)]
#![allow(clippy::all)]

/// Generated code for package `fathom.v1`.
pub mod v1 {
    tonic::include_proto!("fathom.v1");
}

/// Encoded `FileDescriptorSet` of every Fathom proto, for `tonic-reflection`.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("fathom_descriptor");
