//! Build script: turns the mesh's `.proto` files (mesh-core/proto) into Rust
//! message types plus proto3-JSON serde impls.
//!
//! Parsing uses protox, a pure-Rust protobuf compiler, so building the crate
//! needs no system `protoc`. The descriptor set it produces feeds both
//! prost-build (binary codec) and pbjson-build (JSON mapping), which keeps the
//! two views of every message generated from one parse.

use std::error::Error;
use std::path::PathBuf;

/// Every file here is a root; imports between them and of Google's
/// well-known types are resolved by protox.
const PROTOS: &[&str] = &[
    "workload.proto",
    "authorization.proto",
    "zds.proto",
    "ca.proto",
    "xds_node.proto",
    "rpc_status.proto",
    "discovery.proto",
    "waypoint.proto",
];

/// Well-known types come from pbjson-types rather than prost-types, because
/// only the former carry the proto3 JSON forms (e.g. `Struct` as a plain JSON
/// object, `UInt32Value` as a bare number).
const WELL_KNOWN: (&str, &str) = (".google.protobuf", "::pbjson_types");

fn main() -> Result<(), Box<dyn Error>> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?);
    let proto_dir = manifest_dir.join("proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);

    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed={}", proto_dir.display());
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={}", proto_dir.join(proto).display());
    }

    let mut compiler = protox::Compiler::new([&proto_dir])?;
    compiler.include_imports(true).include_source_info(true);
    compiler.open_files(PROTOS)?;
    let descriptor_set = compiler.file_descriptor_set();
    let descriptor_bytes = compiler.encode_file_descriptor_set();
    // Kept in OUT_DIR so code that needs reflection can include_bytes! it.
    std::fs::write(out_dir.join("mesh_descriptor.bin"), &descriptor_bytes)?;

    prost_build::Config::new()
        .out_dir(&out_dir)
        .compile_well_known_types()
        .extern_path(WELL_KNOWN.0, WELL_KNOWN.1)
        // gRPC stubs for services (delta ADS) come from the same parse; the
        // client and server halves both live in mesh-core.
        .service_generator(
            tonic_prost_build::configure()
                .build_client(true)
                .build_server(true)
                .service_generator(),
        )
        .compile_fds(descriptor_set)?;

    pbjson_build::Builder::new()
        .out_dir(&out_dir)
        .register_descriptors(&descriptor_bytes)?
        .extern_path(WELL_KNOWN.0, WELL_KNOWN.1)
        .build(&[".istio", ".ambient"])?;

    Ok(())
}
