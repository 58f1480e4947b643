//! `quire stream` and `quire table` against a `quire standalone` (port 0 everywhere): the
//! commands work end to end, print what they say, and report typed errors with their codes and
//! exit statuses.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

fn quire() -> Command {
    Command::new(env!("CARGO_BIN_EXE_quire"))
}

/// A standalone process, killed when dropped.
struct Standalone {
    child: Child,
    server: String,
}

impl Standalone {
    fn start(dir: &Path) -> Standalone {
        let addr_file = dir.join("addrs.json");
        let mut child = quire()
            .arg("standalone")
            .arg("--data-dir")
            .arg(dir.join("data"))
            .arg("--addr-file")
            .arg(&addr_file)
            .args([
                "--metadata-listen",
                "127.0.0.1:0",
                "--api-listen",
                "127.0.0.1:0",
            ])
            .args(["--bookie-listen-base", "127.0.0.1:0"])
            .args(["--bookie-http-base", "127.0.0.1:0"])
            .env("QUIRE_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok(text) = std::fs::read_to_string(&addr_file)
                && let Ok(v) = serde_json::from_str::<serde_json::Value>(&text)
            {
                let server = v["stream_table"].as_str().unwrap().to_string();
                assert_eq!(v["stream_table"], v["ledger_api"]);
                return Standalone { child, server };
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("standalone exited with {status}");
            }
            assert!(
                Instant::now() < deadline,
                "standalone did not serve in 60 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `quire ARGS --server ADDR` (the target flag goes after the subcommand's own).
    fn run(&self, args: &[&str], stdin: Option<&str>) -> Output {
        let mut cmd = quire();
        cmd.args(args)
            .args(["--server", &self.server])
            .env_remove("QUIRE_SERVER")
            .env_remove("QUIRE_METADATA")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().unwrap();
        {
            use std::io::Write;
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.unwrap_or("").as_bytes()).unwrap();
        }
        child.wait_with_output().unwrap()
    }

    /// Runs a command that must succeed; returns its stdout.
    fn ok(&self, args: &[&str]) -> String {
        self.ok_in(args, None)
    }

    fn ok_in(&self, args: &[&str], stdin: Option<&str>) -> String {
        let out = self.run(args, stdin);
        assert!(
            out.status.success(),
            "{args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }

    /// Runs a command that must fail with `status`; returns its stderr.
    fn fails(&self, args: &[&str], status: i32) -> String {
        let out = self.run(args, None);
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert_eq!(out.status.code(), Some(status), "{args:?}: {err}");
        err
    }
}

impl Drop for Standalone {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn tables_and_streams_from_the_command_line() {
    let dir = tempfile::tempdir().unwrap();
    let s = Standalone::start(dir.path());

    // Tables.
    let err = s.fails(&["table", "get", "t/missing", "k"], 1);
    assert!(err.contains("error: NO_SUCH_TABLE"), "{err}");
    s.ok(&["table", "create", "t/users", "--ranges", "2"]);
    let err = s.fails(&["table", "create", "t/users"], 1);
    assert!(err.contains("error: ALREADY_EXISTS"), "{err}");
    assert_eq!(s.ok(&["table", "list", "t"]), "t/users\n");

    s.ok(&["table", "put", "t/users", "alice", "hello"]);
    let out = s.ok(&["table", "get", "t/users", "alice"]);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("hello"));
    assert!(lines.next().unwrap().starts_with("version 1 mod_revision "));
    let j: serde_json::Value =
        serde_json::from_str(&s.ok(&["table", "get", "t/users", "alice", "--json"])).unwrap();
    assert_eq!(j["value"], "hello");
    assert_eq!(j["version"], 1);

    let err = s.fails(&["table", "get", "t/users", "nobody"], 2);
    assert!(err.contains("no key"), "{err}");
    assert_eq!(s.ok(&["table", "incr", "t/users", "n"]), "1\n");
    assert_eq!(s.ok(&["table", "incr", "t/users", "n", "41"]), "42\n");
    assert_eq!(s.ok(&["table", "incr", "t/users", "n", "-2"]), "40\n");
    let err = s.fails(&["table", "incr", "t/users", "alice"], 1);
    assert!(err.contains("error: WRONG_TYPE"), "{err}");
    let big = "x".repeat(5000);
    let err = s.fails(&["table", "put", "t/users", &big, "v"], 1);
    assert!(err.contains("error: "), "{err}");

    // Compare-and-set: only if absent, then at the version read.
    s.ok(&["table", "cas", "t/users", "bob", "0", "first"]);
    s.fails(&["table", "cas", "t/users", "bob", "0", "second"], 2);
    s.ok(&["table", "cas", "t/users", "bob", "1", "second"]);
    assert!(
        s.ok(&["table", "get", "t/users", "bob"])
            .starts_with("second\n")
    );

    let scan = s.ok(&["table", "scan", "t/users"]);
    assert_eq!(scan, "alice\thello\nbob\tsecond\nn\t40\n");
    let scan = s.ok(&["table", "scan", "t/users", "--start", "b", "--limit", "1"]);
    assert_eq!(scan, "bob\tsecond\n");
    assert_eq!(s.ok(&["table", "del", "t/users", "alice"]), "deleted\n");
    assert_eq!(s.ok(&["table", "del", "t/users", "alice"]), "absent\n");
    s.ok(&["table", "drop", "t/users"]);
    s.fails(&["table", "info", "t/users"], 1);

    // Streams.
    s.ok(&["stream", "create", "s/events"]);
    assert_eq!(
        s.ok_in(&["stream", "append", "s/events"], Some("a\nb\r\nc\n")),
        "0\n1\n2\n"
    );
    assert_eq!(
        s.ok(&["stream", "append", "s/events", "--data", "d"]),
        "3\n"
    );
    // A record is visible once confirmed (the last one maybe only after the writer's next LAC
    // update): tail waits for it, so it goes first.
    assert_eq!(
        s.ok(&["stream", "tail", "s/events", "--from", "2", "--max", "2"]),
        "c\nd\n"
    );
    assert_eq!(s.ok(&["stream", "read", "s/events"]), "a\nb\nc\nd\n");
    assert_eq!(
        s.ok(&[
            "stream",
            "read",
            "s/events",
            "--from",
            "1",
            "--max",
            "2",
            "--offsets"
        ]),
        "1\tb\n2\tc\n"
    );
    let line = s.ok(&["stream", "read", "s/events", "--from", "3", "--json"]);
    let j: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(j["offset"], 3);
    assert_eq!(j["text"], "d");
    let info: serde_json::Value =
        serde_json::from_str(&s.ok(&["stream", "info", "s/events", "--json"])).unwrap();
    assert_eq!(info["end_offset"], 4);
    assert_eq!(s.ok(&["stream", "list", "s"]), "s/events\n");
    s.ok(&["stream", "delete", "s/events"]);
    let err = s.fails(&["stream", "read", "s/events"], 1);
    assert!(err.contains("error: NO_SUCH_STREAM"), "{err}");
}
