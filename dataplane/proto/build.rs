//! Compiles proto/ with protox (a pure-Rust protobuf compiler, so no `protoc` is needed) and
//! generates the tonic client and server.
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/mantle/runner/v1/runner.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto"])?;
    // Our codec answers malformed requests with INVALID_ARGUMENT (see src/codec.rs).
    tonic_prost_build::configure().codec_path("crate::codec::ProtoCodec").compile_fds(descriptors)?;
    Ok(())
}
