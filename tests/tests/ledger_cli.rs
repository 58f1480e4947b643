//! `quire ledger ...` end to end: a `quire metadata` node and three `quire bookie` processes
//! registered in it (ephemeral ports, journal fsync on), driven only through the CLI: write
//! stdin as a ledger, read it back, show its metadata, create and close by recovery, list,
//! delete, tail, and the errors a user sees for bad input.

use std::io::Write;
use std::process::Stdio;
use std::time::{Duration, Instant};

use quire_metadata::bookies::BookieRegistry;
use quire_tests::*;

/// Longest a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(180);
/// Longest one CLI command may take.
const CLI: Duration = Duration::from_secs(60);

/// A metadata node and three bookies registered in it.
struct Cluster {
    meta: MetadataCluster,
    bookies: Vec<BookieProcess>,
}

impl Cluster {
    async fn start(name: &str) -> Cluster {
        let meta = MetadataCluster::start(1).await;
        let uri = meta.uri();
        let mut bookies = Vec::new();
        for i in 0..3 {
            let opts = BookieOpts::new(&format!("{name}-{i}")).config(&format!(
                "metadata = \"{uri}\"\nsession_timeout_ms = 3000\n"
            ));
            bookies.push(BookieProcess::start(opts).await);
        }
        let registry = BookieRegistry::new(meta.store().await);
        wait_until(START_TIMEOUT, "three writable bookies", || {
            let registry = registry.clone();
            async move { registry.writable().await.is_ok_and(|w| w.len() == 3) }
        })
        .await;
        Cluster { meta, bookies }
    }

    fn uri(&self) -> String {
        self.meta.uri()
    }

    /// `quire ledger <args> --metadata URI`.
    async fn ledger(&self, args: &[&str]) -> CliOutput {
        self.ledger_stdin(args, b"").await
    }

    /// `quire ledger <args> --metadata URI` with `input` on stdin.
    async fn ledger_stdin(&self, args: &[&str], input: &[u8]) -> CliOutput {
        let uri = self.uri();
        let mut all = vec!["ledger"];
        all.extend_from_slice(args);
        all.extend_from_slice(&["--metadata", &uri]);
        run_quire_input(&all, input, CLI).await
    }
}

fn ok(what: &str, out: &CliOutput) {
    assert!(
        out.status.success(),
        "{what} failed ({}): stdout {:?} stderr {:?}",
        out.status,
        out.stdout,
        out.stderr
    );
}

fn fails_with(what: &str, out: &CliOutput, message: &str) {
    assert!(
        !out.status.success(),
        "{what} succeeded but should have failed: stdout {:?}",
        out.stdout
    );
    assert!(
        out.stderr.contains(message),
        "{what}: the error does not say {message:?}: {:?}",
        out.stderr
    );
}

fn parse_id(what: &str, out: &CliOutput) -> u64 {
    ok(what, out);
    out.stdout
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{what} printed {:?}, not only a ledger id", out.stdout))
}

fn json(what: &str, out: &CliOutput) -> serde_json::Value {
    ok(what, out);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {:?}", out.stdout))
}

async fn bounded(name: &str, body: impl std::future::Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, body).await.is_err() {
        panic!("{name}: did not finish within {TEST_LIMIT:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_info_tail_list_delete() {
    bounded("write_read_info_tail_list_delete", async {
        let c = Cluster::start("lcli-rw").await;

        let id = parse_id(
            "ledger write",
            &c.ledger_stdin(&["write"], b"a\nb\r\nc\n").await,
        );
        let out = c.ledger(&["read", &id.to_string()]).await;
        ok("ledger read", &out);
        assert_eq!(out.stdout, "a\nb\nc\n");

        let out = c
            .ledger(&["read", &id.to_string(), "--from", "1", "--to", "1", "--ids"])
            .await;
        ok("ledger read --from 1 --to 1", &out);
        assert_eq!(out.stdout, "1\tb\n");

        let info = json(
            "ledger info --json",
            &c.ledger(&["info", &id.to_string(), "--json"]).await,
        );
        assert_eq!(info["ledger_id"], id);
        assert_eq!(info["state"], "CLOSED");
        assert_eq!(info["last_entry_id"], 2);
        assert_eq!(info["length"], 3);
        assert_eq!(
            (
                &info["ensemble_size"],
                &info["write_quorum"],
                &info["ack_quorum"]
            ),
            (&3.into(), &3.into(), &2.into())
        );
        assert_eq!(info["digest"], "CRC32C");
        let ensembles = info["ensembles"].as_array().expect("ensembles array");
        assert_eq!(ensembles.len(), 1, "{info}");
        assert_eq!(ensembles[0]["first_entry"], 0);
        let mut bookies: Vec<String> = ensembles[0]["bookies"]
            .as_array()
            .expect("bookies array")
            .iter()
            .map(|b| b.as_str().expect("bookie id").to_string())
            .collect();
        bookies.sort();
        let mut ours: Vec<String> = c.bookies.iter().map(|b| b.bookie_id().into()).collect();
        ours.sort();
        assert_eq!(bookies, ours);

        let out = c.ledger(&["info", &id.to_string()]).await;
        ok("ledger info", &out);
        assert!(out.stdout.contains("CLOSED"), "{}", out.stdout);

        // A tail of a closed ledger prints what is left and ends.
        let out = c.ledger(&["tail", &id.to_string(), "--from", "1"]).await;
        ok("ledger tail", &out);
        assert_eq!(out.stdout, "b\nc\n");

        // An empty input makes an empty, closed ledger.
        let empty = parse_id(
            "ledger write (empty)",
            &c.ledger_stdin(&["write"], b"").await,
        );
        let out = c.ledger(&["read", &empty.to_string()]).await;
        ok("ledger read (empty)", &out);
        assert_eq!(out.stdout, "");

        let out = c.ledger(&["list"]).await;
        ok("ledger list", &out);
        let listed: Vec<u64> = out
            .stdout
            .lines()
            .map(|l| l.trim().parse().expect("an id per line"))
            .collect();
        assert!(
            listed.contains(&id) && listed.contains(&empty),
            "{listed:?}"
        );
        let out = c.ledger(&["list", "--limit", "1"]).await;
        ok("ledger list --limit 1", &out);
        assert_eq!(out.stdout.lines().count(), 1, "{:?}", out.stdout);

        ok(
            "ledger delete",
            &c.ledger(&["delete", &id.to_string()]).await,
        );
        let gone = format!("ledger {id} does not exist");
        fails_with(
            "read of a deleted ledger",
            &c.ledger(&["read", &id.to_string()]).await,
            &gone,
        );
        fails_with(
            "info of a deleted ledger",
            &c.ledger(&["info", &id.to_string()]).await,
            &gone,
        );
        let out = c.ledger(&["list"]).await;
        ok("ledger list after delete", &out);
        assert!(
            !out.stdout.lines().any(|l| l.trim() == id.to_string()),
            "{:?}",
            out.stdout
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_close_and_bad_input() {
    bounded("create_close_and_bad_input", async {
        let c = Cluster::start("lcli-cc").await;

        // `create` leaves an open ledger (its writer died with the process); `close` recovers it.
        let id = parse_id(
            "ledger create",
            &c.ledger(&[
                "create",
                "--ensemble",
                "3",
                "--write-quorum",
                "2",
                "--ack-quorum",
                "2",
            ])
            .await,
        );
        let info = json(
            "ledger info --json (open)",
            &c.ledger(&["info", &id.to_string(), "--json"]).await,
        );
        assert_eq!(info["state"], "OPEN");
        assert_eq!(info["write_quorum"], 2);
        let out = c.ledger(&["close", &id.to_string()]).await;
        ok("ledger close", &out);
        let info = json(
            "ledger info --json (closed)",
            &c.ledger(&["info", &id.to_string(), "--json"]).await,
        );
        assert_eq!(info["state"], "CLOSED");
        assert_eq!(info["last_entry_id"], -1);
        assert_eq!(info["length"], 0);
        ok(
            "ledger close (again)",
            &c.ledger(&["close", &id.to_string()]).await,
        );
        let out = c.ledger(&["read", &id.to_string()]).await;
        ok("ledger read (empty)", &out);
        assert_eq!(out.stdout, "");

        // A password protects reads.
        let pw = parse_id(
            "ledger write --password",
            &c.ledger_stdin(&["write", "--password", "s3cret"], b"x\n")
                .await,
        );
        fails_with(
            "read with the wrong password",
            &c.ledger(&["read", &pw.to_string()]).await,
            "wrong password",
        );
        let out = c
            .ledger(&["read", &pw.to_string(), "--password", "s3cret"])
            .await;
        ok("read with the password", &out);
        assert_eq!(out.stdout, "x\n");
        fails_with(
            "read past the end",
            &c.ledger(&["read", &pw.to_string(), "--password", "s3cret", "--to", "5"])
                .await,
            "no entry 5",
        );

        // Bad input: a clear message and a non-zero exit.
        fails_with(
            "read of an unknown ledger",
            &c.ledger(&["read", "987654321"]).await,
            "ledger 987654321 does not exist",
        );
        fails_with(
            "close of an unknown ledger",
            &c.ledger(&["close", "987654321"]).await,
            "ledger 987654321 does not exist",
        );
        fails_with(
            "delete of an unknown ledger",
            &c.ledger(&["delete", "987654321"]).await,
            "ledger 987654321 does not exist",
        );
        fails_with(
            "E < Qw",
            &c.ledger_stdin(&["write", "--ensemble", "2", "--write-quorum", "3"], b"x\n")
                .await,
            "--ensemble >= --write-quorum >= --ack-quorum",
        );
        fails_with(
            "Qw < Qa",
            &c.ledger(&["create", "--write-quorum", "2", "--ack-quorum", "3"])
                .await,
            "--ensemble >= --write-quorum >= --ack-quorum",
        );
        fails_with(
            "more bookies than there are",
            &c.ledger(&["create", "--ensemble", "4"]).await,
            "not enough bookies",
        );
        fails_with(
            "a ledger id that is not a number",
            &c.ledger(&["read", "abc"]).await,
            "invalid value 'abc'",
        );
        let out = run_quire_input(&["ledger", "list"], b"", CLI).await;
        assert!(!out.status.success(), "list without --metadata succeeded");
        assert!(out.stderr.contains("--metadata"), "{:?}", out.stderr);
    })
    .await;
}

/// A tail started before the entries exist prints them as they are confirmed and ends when the
/// writer closes the ledger.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_a_writer() {
    bounded("tail_follows_a_writer", async {
        let c = Cluster::start("lcli-tail").await;
        // A writer whose stdin we feed slowly, so that the tail starts while the ledger is open.
        let mut cmd = quire_command(Stdio::piped(), Stdio::piped());
        cmd.args(["ledger", "write", "--metadata", &c.uri()])
            .env("QUIRE_LOG", "warn")
            .env_remove("QUIRE_LEDGER_PASSWORD")
            .stdin(Stdio::piped());
        let mut writer = cmd.spawn().expect("spawn quire ledger write");
        let mut stdin = writer.stdin.take().expect("piped stdin");
        stdin.write_all(b"first\n").expect("write stdin");
        stdin.flush().expect("flush stdin");
        // The ledger appears in the list once the writer created it.
        let mut id = None;
        let deadline = Instant::now() + CLI;
        while id.is_none() {
            assert!(
                Instant::now() < deadline,
                "the writer never created a ledger"
            );
            let out = c.ledger(&["list"]).await;
            ok("ledger list", &out);
            id = out
                .stdout
                .lines()
                .last()
                .and_then(|l| l.trim().parse::<u64>().ok());
            if id.is_none() {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        let id = id.expect("found above").to_string();
        let mut tail = quire_command(Stdio::piped(), Stdio::piped());
        tail.args(["ledger", "tail", &id, "--metadata", &c.uri()])
            .env("QUIRE_LOG", "warn")
            .env_remove("QUIRE_LEDGER_PASSWORD");
        let tail = tail.spawn().expect("spawn quire ledger tail");
        let tail_pid = tail.id();
        let tail_out = tokio::task::spawn_blocking(move || tail.wait_with_output());
        tokio::time::sleep(Duration::from_millis(500)).await;
        stdin.write_all(b"second\nthird\n").expect("write stdin");
        drop(stdin);
        let out = tokio::task::spawn_blocking(move || writer.wait_with_output())
            .await
            .expect("waiter task")
            .expect("wait for the writer");
        assert!(
            out.status.success(),
            "writer failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), id);
        let out = match tokio::time::timeout(CLI, tail_out).await {
            Ok(r) => r.expect("waiter task").expect("wait for the tail"),
            Err(_) => {
                send_signal(tail_pid, libc::SIGKILL);
                panic!("the tail did not end after the ledger was closed");
            }
        };
        assert!(
            out.status.success(),
            "tail failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "first\nsecond\nthird\n"
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_finds_the_replicas_of_a_dead_bookie() {
    bounded("check_finds_the_replicas_of_a_dead_bookie", async {
        let mut c = Cluster::start("lcli-check").await;
        let id = parse_id(
            "ledger write",
            &c.ledger_stdin(&["write"], b"a\nb\nc\n").await,
        );
        let report = json(
            "ledger check --json",
            &c.ledger(&["check", &id.to_string(), "--json"]).await,
        );
        assert_eq!(report["healthy"], true, "{report}");
        assert_eq!(report["replicas_checked"], 9, "3 entries x Qw 3: {report}");
        assert_eq!(report["issues_total"], 0, "{report}");

        c.bookies[1].kill9();
        let dead = c.bookies[1].bookie_id().to_string();
        let out = c.ledger(&["check", &id.to_string(), "--json"]).await;
        assert!(!out.status.success(), "check must fail: {:?}", out.stdout);
        let report: serde_json::Value =
            serde_json::from_str(out.stdout.trim()).expect("JSON on stdout");
        assert_eq!(report["healthy"], false, "{report}");
        assert_eq!(report["issues_total"], 3, "one per entry: {report}");
        for issue in report["issues"].as_array().expect("issues") {
            assert_eq!(issue["bookie"], dead.as_str(), "{report}");
            assert_eq!(issue["problem"], "unreachable", "{report}");
        }
        fails_with(
            "ledger check",
            &c.ledger(&["check", &id.to_string()]).await,
            "replica problems",
        );
        fails_with(
            "ledger check of an unknown ledger",
            &c.ledger(&["check", "999999"]).await,
            "does not exist",
        );
    })
    .await;
}
