//! The collective conformance suite on `TcpComm`: each rank a thread owning its own TCP mesh
//! endpoint over real loopback sockets (the separate-process cases are in `comm_processes.rs`).

fathom_kernels::collective_conformance!(fathom_kernels::comm::conformance::TcpLoopbackFactory);
