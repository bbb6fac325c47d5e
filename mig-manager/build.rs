//! Generates the kubelet gRPC code: the device-plugin API (`proto/deviceplugin.proto`) and the
//! PodResources API (`proto/podresources.proto`). `protox` parses the files in pure Rust, so no
//! `protoc` is needed.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/deviceplugin.proto");
    println!("cargo:rerun-if-changed=proto/podresources.proto");
    let fds = protox::compile(["proto/deviceplugin.proto", "proto/podresources.proto"], ["proto"])?;
    tonic_prost_build::configure().build_client(true).build_server(true).compile_fds(fds)?;
    Ok(())
}
