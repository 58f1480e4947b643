//! Compiles `proto/*.proto` with protox, a pure-Rust protobuf compiler, so that building Quire
//! needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/quire/bookie/v1/bookie.proto",
        "proto/quire/metadata/v1/metadata.proto",
        "proto/quire/ledger/v1/ledger.proto",
        "proto/quire/stream/v1/stream.proto",
        "proto/quire/table/v1/table.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure().bytes(".").compile_fds(fds)?;
    Ok(())
}
