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
