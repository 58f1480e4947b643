//! With cargo feature `etcd`, compiles the etcd v3 API subset in `proto/etcd/*.proto` into gRPC
//! client stubs. protox is a pure-Rust protobuf compiler, so building Quire needs no `protoc`
//! (which the `etcd-client` crate's build script would require). Without the feature there is
//! nothing to generate.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_ETCD").is_none() {
        return Ok(());
    }
    let files = ["proto/etcd/kv.proto", "proto/etcd/rpc.proto"];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let fds = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_server(false)
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
