//! The collective conformance suite on `LocalComm` (ranks as threads of this process).

fathom_kernels::collective_conformance!(fathom_kernels::comm::conformance::LocalFactory);
