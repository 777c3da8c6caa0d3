//! `fathom-kernels`: the op set the DeepSeek-V3.2 model is written against, and collectives.
//!
//! Owns: [`Tensor`] (host storage), the CPU reference ops in [`cpu`] (always built; the oracle
//! every other backend is tested against), and [`comm`] (the `Collective` trait and its
//! implementations).
//!
//! Does not own: model structure (the worker crate composes ops into layers), weight loading,
//! scheduling. Nothing here reads environment variables.

pub mod comm;
pub mod cpu;
pub mod cuda;
pub mod tensor;

pub use tensor::Tensor;
