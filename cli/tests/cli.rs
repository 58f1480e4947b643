//! The `quire` binary's own checks: flags and configuration errors are reported clearly and
//! nothing starts. (Having integration tests here also makes `cargo test --workspace` build the
//! binary that the `tests/` crate drives.)

use std::process::Command;

fn quire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quire"))
}

#[test]
fn version_is_printed() {
    let out = quire().arg("--version").output().unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("quire "));
}

#[test]
fn missing_config_file_is_a_clear_error() {
    let out = quire()
        .args(["bookie", "--config", "/nonexistent/quire.toml"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("cannot read config file"), "{err}");
}

#[test]
fn journal_and_ledger_dir_must_differ() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().to_str().unwrap();
    let out = quire()
        .args(["bookie", "--journal-dir", d, "--ledger-dir", d])
        .args(["--listen", "127.0.0.1:0", "--http", "127.0.0.1:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("is also the journal directory"), "{err}");
    assert_eq!(
        std::fs::read_dir(t.path()).unwrap().count(),
        0,
        "nothing written"
    );
}

#[test]
fn dump_journal_of_an_empty_directory() {
    let t = tempfile::tempdir().unwrap();
    let out = quire()
        .args(["bookie", "dump-journal"])
        .arg(t.path())
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(String::from_utf8_lossy(&out.stdout).contains("0 records"));
}

#[test]
fn bench_needs_a_reachable_bookie() {
    let out = quire()
        .args([
            "bench",
            "bookie",
            "--addr",
            "127.0.0.1:1",
            "--duration",
            "1s",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to bookie"), "{err}");
}

#[test]
fn bench_metadata_on_an_in_memory_store() {
    let out = quire()
        .args(["bench", "metadata", "--metadata", "memory://"])
        .args(["--clients", "4", "--ops", "400", "--json"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let v: serde_json::Value = serde_json::from_str(stdout.trim()).expect("one JSON object");
    for key in [
        "ops_per_sec",
        "p50_us",
        "p99_us",
        "ledger_creates_per_sec",
        "create_p50_us",
        "create_p99_us",
    ] {
        let x = v[key]
            .as_f64()
            .unwrap_or_else(|| panic!("{key} missing: {v}"));
        assert!(x > 0.0, "{key} = {x}");
    }
    assert_eq!(v["ops"], 400, "{v}");
    assert_eq!(v["clients"], 4, "{v}");
    assert_eq!(v["errors"], 0, "{v}");
}

#[test]
fn bench_metadata_needs_a_reachable_store() {
    let out = quire()
        .args(["bench", "metadata", "--metadata", "zk://127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("connecting to metadata store"), "{err}");
}
