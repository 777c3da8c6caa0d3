//! Generates Rust from `proto/*.proto` into OUT_DIR (requires `protoc`), plus a file descriptor
//! set for gRPC server reflection.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/fathom.proto",
        "proto/inference.proto",
        "proto/admin.proto",
        "proto/worker.proto",
        "proto/registry.proto",
    ];
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("fathom_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}
