//! Compiles the csi-addons protos (and this project's admin proto) with
//! protox, a protobuf compiler written in Rust, so no `protoc` has to be
//! installed, and generates tonic servers and clients. The served services'
//! file descriptor set is kept for gRPC server reflection.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Served by the sidecar itself: these make up the reflection descriptor.
    // admin.proto is this project's own API (pool operations, migration).
    let served = [
        "proto/identity.proto",
        "proto/replication.proto",
        "proto/volumegroup.proto",
        "proto/admin.proto",
    ];
    // Forwarded to ceph-csi (`serve --forward-endpoint`): generated for the
    // tests' stand-in and for metric labels, not offered by reflection.
    let forwarded = ["proto/fence.proto", "proto/reclaimspace.proto"];
    for p in served.iter().chain(&forwarded) {
        println!("cargo:rerun-if-changed={p}");
    }
    println!(
        "cargo:rerun-if-changed=proto/github.com/container-storage-interface/spec/lib/go/csi/csi.proto"
    );

    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let served_fds = protox::compile(served, ["proto"])?;
    std::fs::write(
        out.join("csi_addons_descriptor.bin"),
        prost::Message::encode_to_vec(&served_fds),
    )?;
    let fds = protox::compile(served.iter().chain(&forwarded), ["proto"])?;
    std::fs::write(
        out.join("csi_addons_all_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    Ok(())
}
