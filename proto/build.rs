//! Compiles `proto/fedq/v1/fedq.proto` (this crate's `fedq/v1/fedq.proto`,
//! where other languages' tools look for it too) with a vendored `protoc`, so that a
//! fresh machine needs nothing beyond cargo.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc);
    tonic_prost_build::configure().compile_with_config(config, &["fedq/v1/fedq.proto"], &["."])?;
    println!("cargo:rerun-if-changed=fedq/v1/fedq.proto");
    Ok(())
}
