//! Autorecovery with real processes (DESIGN.md §5): a `quire metadata` node, `quire bookie`
//! processes (2 s registration sessions) and either the autorecovery each bookie runs by default
//! or `quire autorecovery` daemons; faults are kill -9.
//!
//! - A bookie killed for good: the in-bookie auditor marks its ledgers, the workers restore
//!   them (closed ledgers and one still being written), every replica checks out and every
//!   entry reads back as written.
//! - Daemons: the active auditor killed before the lost-bookie delay passes (the standby takes
//!   over and marks), then a worker killed mid-copy (its lock dies with its session and the
//!   other daemon finishes), with a throttle low enough for copies to take seconds.
//! - `quire bookie decommission` of a live bookie while readers and `quire ledger check` keep
//!   running: never a moment of under-replication, and the bookie gets no new ledgers.
//! - Refusals: an unknown bookie, and a bookie whose replicas no other bookie could take; a
//!   refusal changes nothing.
//!
//! Every wait is bounded; nothing asserts how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use quire_ledger_client::{Client, ClientConfig, CreateOptions, LedgerState, LedgerWriter};
use quire_metadata::DynStore;
use quire_tests::*;
use serde_json::Value;
use tokio::task::JoinHandle;

/// Longest a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// Longest one CLI command may take.
const CLI: Duration = Duration::from_secs(60);
/// Longest wait for one step (a registration, an election, a lock to show).
const WAIT: Duration = Duration::from_secs(60);
/// Longest wait for the replicas of a lost bookie to be restored.
const RESTORE: Duration = Duration::from_secs(120);
/// Seed of the payloads (see [`payload`]).
const SEED: u64 = 0x5eed_a07e_2ec0_7e2e;

async fn bounded(name: &str, body: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, body).await.is_err() {
        panic!("{name}: did not finish within {TEST_LIMIT:?}");
    }
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(WAIT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {WAIT:?}"),
    }
}

/// Polls `f` every 50 ms until it returns something; panics after `timeout`, naming `what`.
async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if std::time::Instant::now() >= deadline {
            panic!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock after 1970")
        .as_millis() as u64
}

// ------------------------------------------------------------------------------------------------
// What the tests wrote, recomputable instead of remembered.

#[derive(Clone, Debug)]
enum Content {
    /// Entry `e` is `payload(SEED, id, e, base + e % 61)`.
    Binary { base: usize },
    /// Entry `e` is line `e` of [`cli_lines`] (written with `quire ledger write`).
    Text,
}

#[derive(Clone, Debug)]
struct Written {
    id: u64,
    entries: u64,
    content: Content,
}

impl Written {
    fn expected(&self, e: u64) -> Vec<u8> {
        match self.content {
            Content::Binary { base } => payload(SEED, self.id, e, base + (e % 61) as usize),
            Content::Text => cli_line(e).into_bytes(),
        }
    }
}

fn cli_line(e: u64) -> String {
    format!("line {e} of a CLI ledger {}", "x".repeat((e % 50) as usize))
}

/// The stdin of `quire ledger write` for `n` entries.
fn cli_lines(n: u64) -> String {
    (0..n).map(|e| cli_line(e) + "\n").collect()
}

fn ids_of(ledgers: &[Written]) -> Vec<u64> {
    ledgers.iter().map(|w| w.id).collect()
}

/// Writes `n` entries to a new E3/Qw3/Qa2 ledger and closes it.
async fn write_closed(client: &Client, n: u64, base: usize) -> Written {
    let w = within("create a ledger", client.create(CreateOptions::default()))
        .await
        .expect("create a ledger");
    let id = w.id();
    let written = Written {
        id,
        entries: n,
        content: Content::Binary { base },
    };
    let mut acks = Vec::with_capacity(n as usize);
    for e in 0..n {
        let f = within("append", w.append_async(Bytes::from(written.expected(e))))
            .await
            .unwrap_or_else(|err| panic!("append {e} to ledger {id}: {err}"));
        acks.push(f);
    }
    for (e, f) in acks.into_iter().enumerate() {
        let got = within("an add acknowledgement", f)
            .await
            .unwrap_or_else(|err| panic!("entry {e} of ledger {id}: {err}"));
        assert_eq!(got, e as u64, "ledger {id}: acknowledgement out of order");
    }
    let meta = within("close", w.close())
        .await
        .unwrap_or_else(|err| panic!("close ledger {id}: {err}"));
    assert_eq!(meta.last_entry_id, n as i64 - 1);
    written
}

/// A writer appending to one ledger from a background task until told to stop.
struct BackgroundWriter {
    id: u64,
    base: usize,
    stop: Arc<AtomicBool>,
    failed: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    task: JoinHandle<Result<LedgerWriter, String>>,
}

impl BackgroundWriter {
    async fn start(client: &Client, base: usize) -> BackgroundWriter {
        let w = within("create a ledger", client.create(CreateOptions::default()))
            .await
            .expect("create a ledger");
        let id = w.id();
        let (stop, failed, acked) = (
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicBool::new(false)),
            Arc::new(AtomicU64::new(0)),
        );
        let content = Written {
            id,
            entries: 0,
            content: Content::Binary { base },
        };
        let task = tokio::spawn({
            let (stop, failed, acked) = (stop.clone(), failed.clone(), acked.clone());
            async move {
                let mut e = 0u64;
                while !stop.load(Ordering::Acquire) {
                    let r = tokio::time::timeout(WAIT, w.append(Bytes::from(content.expected(e))))
                        .await;
                    match r {
                        Ok(Ok(got)) if got == e => {}
                        Ok(Ok(got)) => {
                            failed.store(true, Ordering::Release);
                            return Err(format!("entry {e} was acknowledged as {got}"));
                        }
                        Ok(Err(err)) => {
                            failed.store(true, Ordering::Release);
                            return Err(format!("append of entry {e} failed: {err}"));
                        }
                        Err(_) => {
                            failed.store(true, Ordering::Release);
                            return Err(format!("append of entry {e}: no ack within {WAIT:?}"));
                        }
                    }
                    e += 1;
                    acked.store(e, Ordering::Release);
                    // A steady trickle, not a flood: the test verifies every entry.
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok(w)
            }
        });
        BackgroundWriter {
            id,
            base,
            stop,
            failed,
            acked,
            task,
        }
    }

    fn acked(&self) -> u64 {
        self.acked.load(Ordering::Acquire)
    }

    fn failed(&self) -> bool {
        self.failed.load(Ordering::Acquire)
    }

    /// Stops appending and closes the ledger; panics if an append or the close failed.
    async fn finish(self) -> Written {
        self.stop.store(true, Ordering::Release);
        let w = within("the background writer", self.task)
            .await
            .expect("writer task")
            .unwrap_or_else(|e| panic!("background writer of ledger {}: {e}", self.id));
        let n = self.acked.load(Ordering::Acquire);
        let meta = within("close", w.close())
            .await
            .unwrap_or_else(|e| panic!("close of the written ledger {}: {e}", self.id));
        assert_eq!(
            meta.last_entry_id,
            n as i64 - 1,
            "ledger {} closed at another entry than the last acknowledged",
            self.id
        );
        Written {
            id: self.id,
            entries: n,
            content: Content::Binary { base: self.base },
        }
    }
}

// ------------------------------------------------------------------------------------------------
// The cluster: one metadata node, bookies, optional autorecovery daemons.

struct Cluster {
    bookies: Vec<BookieProcess>,
    daemons: Vec<AutoRecoveryProcess>,
    name: String,
    bookie_args: Vec<String>,
    store: DynStore,
    uri: String,
    // Dropped last: the others go first, so none of them logs a lost metadata store at the end.
    _meta: MetadataCluster,
}

impl Cluster {
    /// A one-node metadata cluster and `n` bookies (2 s sessions, plus `args`) registered in it.
    async fn start(name: &str, n: usize, args: &[&str]) -> Cluster {
        let meta = MetadataCluster::start(1).await;
        let uri = meta.uri();
        let store = meta.store().await;
        let mut bookie_args: Vec<String> = vec![
            "--metadata".into(),
            uri.clone(),
            "--session-timeout-ms".into(),
            "2000".into(),
        ];
        bookie_args.extend(args.iter().map(|a| a.to_string()));
        let starts = (0..n).map(|i| {
            BookieProcess::start(BookieOpts::new(&format!("{name}-{i}")).args(&bookie_args))
        });
        let bookies = futures::future::join_all(starts).await;
        let c = Cluster {
            bookies,
            daemons: Vec::new(),
            name: name.into(),
            bookie_args,
            store,
            uri,
            _meta: meta,
        };
        for i in 0..n {
            c.wait_registered(i).await;
        }
        c
    }

    /// Starts one more bookie like the others; returns its index.
    async fn add_bookie(&mut self) -> usize {
        let i = self.bookies.len();
        let opts = BookieOpts::new(&format!("{}-{i}", self.name)).args(&self.bookie_args);
        self.bookies.push(BookieProcess::start(opts).await);
        self.wait_registered(i).await;
        i
    }

    async fn wait_registered(&self, i: usize) {
        wait_bookie_registered(&self.store, &self.bookies[i], WAIT).await;
    }

    fn bookie_index(&self, id: &str) -> usize {
        self.bookies
            .iter()
            .position(|b| b.bookie_id() == id)
            .unwrap_or_else(|| panic!("no bookie {id} in this cluster"))
    }

    fn daemon_index(&self, id: &str) -> usize {
        self.daemons
            .iter()
            .position(|d| d.id() == id)
            .unwrap_or_else(|| panic!("no autorecovery daemon {id} in this cluster"))
    }

    /// A ledger client with short timeouts (a silent bookie is replaced after 2 s).
    async fn client(&self) -> Client {
        let mut cfg = ClientConfig::new(self.uri.clone());
        cfg.add_timeout = Duration::from_secs(2);
        cfg.read_timeout = Duration::from_secs(3);
        cfg.speculative_read = Some(Duration::from_secs(1));
        cfg.explicit_lac_interval = Some(Duration::from_millis(100));
        within("connect a ledger client", Client::connect(cfg))
            .await
            .expect("connect a ledger client")
    }

    /// `quire <args>` with `input` on stdin (the environment's metadata URI and password
    /// removed).
    async fn cli(&self, args: &[&str], input: &[u8]) -> CliOutput {
        run_quire_input(args, input, CLI).await
    }

    /// `quire autorecovery status --json`, parsed.
    async fn status(&self) -> Value {
        status(&self.uri).await
    }

    /// Writes `n` lines with `quire ledger write` (E3/Qw3/Qa2); returns the ledger.
    async fn write_cli(&self, n: u64) -> Written {
        let out = self
            .cli(
                &["ledger", "write", "--metadata", &self.uri],
                cli_lines(n).as_bytes(),
            )
            .await;
        ok("quire ledger write", &out);
        let id = out
            .stdout
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("ledger write printed {:?}, not an id", out.stdout));
        Written {
            id,
            entries: n,
            content: Content::Text,
        }
    }
}

async fn status(uri: &str) -> Value {
    let out = run_quire_input(
        &["autorecovery", "status", "--metadata", uri, "--json"],
        b"",
        CLI,
    )
    .await;
    json("quire autorecovery status --json", &out)
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

fn json(what: &str, out: &CliOutput) -> Value {
    ok(what, out);
    serde_json::from_str(out.stdout.trim())
        .unwrap_or_else(|e| panic!("{what} printed no JSON ({e}): {:?}", out.stdout))
}

fn under_replicated(s: &Value) -> u64 {
    s["under_replicated"]
        .as_u64()
        .unwrap_or_else(|| panic!("status without under_replicated: {s}"))
}

fn auditor_id(s: &Value) -> Option<String> {
    s["auditor"]["id"].as_str().map(String::from)
}

fn decommissioning(s: &Value) -> Vec<String> {
    s["decommissioning"]
        .as_array()
        .unwrap_or_else(|| panic!("status without decommissioning: {s}"))
        .iter()
        .map(|b| b.as_str().expect("bookie id").to_string())
        .collect()
}

/// The worker `id`'s published counters, if it is listed.
fn worker<'a>(s: &'a Value, id: &str) -> Option<&'a Value> {
    s["workers"].as_array()?.iter().find(|w| w["id"] == id)
}

async fn ensembles(client: &Client, id: u64) -> BTreeMap<u64, Vec<String>> {
    within("ledger metadata", client.metadata(id))
        .await
        .unwrap_or_else(|e| panic!("metadata of ledger {id}: {e}"))
        .value
        .ensembles
}

async fn names(client: &Client, id: u64, bookie: &str) -> bool {
    ensembles(client, id)
        .await
        .values()
        .flatten()
        .any(|b| b == bookie)
}

/// The ledgers of `ids` naming `bookie` in some ensemble.
async fn naming(client: &Client, ids: &[u64], bookie: &str) -> Vec<u64> {
    let mut out = Vec::new();
    for id in ids {
        if names(client, *id, bookie).await {
            out.push(*id);
        }
    }
    out
}

// ------------------------------------------------------------------------------------------------
// Checks of a ledger: metadata, every replica (`quire ledger check`), every entry read back.

/// Reads every entry of `w` through the client and compares it with what was written.
async fn read_back(client: &Client, w: &Written) -> Result<(), String> {
    let id = w.id;
    let r = tokio::time::timeout(WAIT, client.open(id, b""))
        .await
        .map_err(|_| format!("open ledger {id}: no answer within {WAIT:?}"))?
        .map_err(|e| format!("open ledger {id}: {e}"))?;
    if !r.is_closed() || r.lac() != w.entries as i64 - 1 {
        return Err(format!(
            "ledger {id}: closed {} at LAC {}, expected closed at {}",
            r.is_closed(),
            r.lac(),
            w.entries as i64 - 1
        ));
    }
    let mut first = 0u64;
    while first < w.entries {
        let last = (first + 499).min(w.entries - 1);
        let entries = tokio::time::timeout(WAIT, r.read(first, last))
            .await
            .map_err(|_| format!("ledger {id}: read {first}..={last}: no answer"))?
            .map_err(|e| format!("ledger {id}: read {first}..={last}: {e}"))?;
        if entries.len() as u64 != last - first + 1 {
            return Err(format!(
                "ledger {id}: read {first}..={last} returned {} entries",
                entries.len()
            ));
        }
        for (i, entry) in entries.iter().enumerate() {
            let e = first + i as u64;
            if entry.entry_id != e {
                return Err(format!(
                    "ledger {id}: entry {e} came back as {}",
                    entry.entry_id
                ));
            }
            if entry.payload.as_ref() != w.expected(e).as_slice() {
                return Err(format!(
                    "ledger {id}: entry {e} differs from what was written ({} bytes read, {} \
                     written)",
                    entry.payload.len(),
                    w.expected(e).len()
                ));
            }
        }
        first = last + 1;
    }
    Ok(())
}

/// `quire ledger check ID --json`: every replica of every entry, healthy, exit 0.
async fn replica_check(uri: &str, w: &Written) -> Result<(), String> {
    let id = w.id.to_string();
    let out = run_quire_input(
        &["ledger", "check", &id, "--metadata", uri, "--json"],
        b"",
        CLI,
    )
    .await;
    let report: Value = serde_json::from_str(out.stdout.trim()).map_err(|e| {
        format!(
            "ledger check {id} ({}) printed no JSON ({e}): {:?} {:?}",
            out.status, out.stdout, out.stderr
        )
    })?;
    let want_replicas = w.entries * 3;
    if !out.status.success()
        || report["healthy"] != true
        || report["issues_total"] != 0
        || report["replicas_checked"] != want_replicas
        || report["last_entry"] != w.entries as i64 - 1
    {
        return Err(format!(
            "ledger check {id} ({}), expected healthy with {want_replicas} replicas: {report} \
             {:?}",
            out.status, out.stderr
        ));
    }
    Ok(())
}

/// Everything about one restored ledger: closed at its last entry, three distinct bookies per
/// ensemble, none of them in `gone`, every replica checks out, every entry reads back as written.
async fn assert_ledger_ok(uri: &str, client: &Client, w: &Written, gone: &[&str]) {
    let meta = within("ledger metadata", client.metadata(w.id))
        .await
        .unwrap_or_else(|e| panic!("metadata of ledger {}: {e}", w.id))
        .value;
    assert_eq!(meta.state, LedgerState::Closed, "ledger {}", w.id);
    assert_eq!(meta.last_entry_id, w.entries as i64 - 1, "ledger {}", w.id);
    for (first, ens) in &meta.ensembles {
        let distinct: BTreeSet<&String> = ens.iter().collect();
        assert!(
            ens.len() == 3 && distinct.len() == 3,
            "ledger {}: the ensemble at entry {first} does not name three distinct bookies: \
             {:?}",
            w.id,
            meta.ensembles
        );
        for g in gone {
            assert!(
                !ens.iter().any(|b| b == g),
                "ledger {} still names {g}: {:?}",
                w.id,
                meta.ensembles
            );
        }
    }
    if let Err(e) = replica_check(uri, w).await {
        panic!("{e}");
    }
    if let Err(e) = read_back(client, w).await {
        panic!("{e}");
    }
}

// ------------------------------------------------------------------------------------------------
// 1. A bookie killed for good, with the autorecovery every bookie runs.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_bookie_is_restored_by_in_bookie_autorecovery() {
    bounded("lost_bookie_is_restored_by_in_bookie_autorecovery", async {
        let mut c = Cluster::start(
            "ar-lost",
            4,
            &[
                "--lost-bookie-recovery-delay",
                "0s",
                "--open-ledger-grace",
                "5s",
            ],
        )
        .await;
        let bookie_ids: BTreeSet<String> = c
            .bookies
            .iter()
            .map(|b| b.bookie_id().to_string())
            .collect();
        let auditor = wait_for(WAIT, "an auditor among the bookies", || async {
            auditor_id(&c.status().await)
        })
        .await;
        assert!(
            bookie_ids.contains(&auditor),
            "the auditor {auditor} is not one of the bookies {bookie_ids:?}"
        );

        let client = c.client().await;
        let mut closed = futures::future::join_all([
            write_closed(&client, 300, 700),
            write_closed(&client, 250, 1500),
            write_closed(&client, 400, 300),
        ])
        .await;
        closed.push(c.write_cli(200).await);
        let writer = BackgroundWriter::start(&client, 400).await;
        wait_until(WAIT, "the background writer to get going", || {
            let (acked, failed) = (writer.acked(), writer.failed());
            async move { acked >= 100 || failed }
        })
        .await;
        assert!(
            !writer.failed(),
            "the background writer failed before any fault"
        );

        // The victim: a bookie of the open ledger (so its writer meets the fault), not the
        // auditor (which the daemon test kills), and among those the one most closed ledgers
        // name (each ledger leaves out one of four bookies, so that is at least two).
        let open_ens = ensembles(&client, writer.id).await;
        let mut victim: Option<(usize, String)> = None;
        for b in open_ens.values().next().expect("an ensemble") {
            if *b == auditor {
                continue;
            }
            let n = naming(&client, &ids_of(&closed), b).await.len();
            if victim.as_ref().is_none_or(|(m, _)| n > *m) {
                victim = Some((n, b.clone()));
            }
        }
        let (named_by, dead) = victim.expect("a victim");
        assert!(
            named_by >= 2,
            "{dead} is named by {named_by} closed ledgers"
        );
        let mut all_ids = ids_of(&closed);
        all_ids.push(writer.id);
        let affected = naming(&client, &all_ids, &dead).await;
        eprintln!(
            "kill -9 bookie {dead}: named by ledgers {affected:?} of {all_ids:?}; auditor \
             {auditor}"
        );
        let victim_index = c.bookie_index(&dead);
        c.bookies[victim_index].kill9();

        // Restored: nothing marked any more and no ledger names the dead bookie; the writer
        // goes on meanwhile.
        wait_until(
            RESTORE,
            &format!("every ledger restored off {dead}"),
            || async {
                if writer.failed() {
                    return true;
                }
                if under_replicated(&c.status().await) != 0 {
                    return false;
                }
                naming(&client, &all_ids, &dead).await.is_empty()
            },
        )
        .await;
        assert!(
            !writer.failed(),
            "the background writer failed during the recovery"
        );
        let acked_at_restore = writer.acked();
        wait_until(WAIT, "the writer to append after the recovery", || {
            let (acked, failed) = (writer.acked(), writer.failed());
            async move { acked > acked_at_restore + 20 || failed }
        })
        .await;
        let open = writer.finish().await;
        eprintln!("the background writer wrote {} entries", open.entries);
        // Its writer replaced the dead bookie in its last fragment itself (an ensemble change);
        // autorecovery restored the fragment before it.
        let open_ens = ensembles(&client, open.id).await;
        assert!(
            open_ens.len() >= 2,
            "the written ledger has no ensemble change: {open_ens:?}"
        );
        closed.push(open);

        for w in &closed {
            assert_ledger_ok(&c.uri, &client, w, &[&dead]).await;
        }
        // The CLI ledger reads back through the CLI too.
        let cli_ledger = &closed[3];
        let out = c
            .cli(
                &[
                    "ledger",
                    "read",
                    &cli_ledger.id.to_string(),
                    "--metadata",
                    &c.uri,
                ],
                b"",
            )
            .await;
        ok("quire ledger read", &out);
        assert_eq!(out.stdout, cli_lines(cli_ledger.entries));

        // The auditor (still alive) marked every affected ledger, the workers replicated them.
        let last = wait_for(WAIT, "the workers' counters to show the work", || async {
            let s = c.status().await;
            s["totals"]["ledgers_replicated"]
                .as_u64()
                .is_some_and(|n| n >= affected.len() as u64)
                .then_some(s)
        })
        .await;
        assert_eq!(
            auditor_id(&last).as_deref(),
            Some(auditor.as_str()),
            "{last}"
        );
        assert!(
            last["auditor"]["ledgers_marked"]
                .as_u64()
                .is_some_and(|n| n >= affected.len() as u64),
            "the auditor marked fewer than the {} affected ledgers: {last}",
            affected.len()
        );
        assert!(
            last["totals"]["bytes_replicated"]
                .as_u64()
                .is_some_and(|n| n > 0),
            "{last}"
        );
        assert!(
            last["totals"]["fragments_replicated"]
                .as_u64()
                .is_some_and(|n| n >= affected.len() as u64),
            "fewer fragments replicated than ledgers affected ({}): {last}",
            affected.len()
        );
        assert_eq!(under_replicated(&last), 0, "{last}");
        // The bookie's own /metrics carries its autorecovery's: the auditor's says so.
        let ab = &c.bookies[c.bookie_index(&auditor)];
        wait_until(WAIT, "the auditor's gauge", || async {
            ab.metric("quire_autorecovery_auditor_active") == Some(1.0)
        })
        .await;
        assert!(ab.metric("quire_bookie_adds_total").is_some());
        // The dead bookie's worker leaves the list with its autorecovery session.
        wait_until(
            WAIT,
            "the dead bookie's worker to leave the list",
            || async { worker(&c.status().await, &dead).is_none() },
        )
        .await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------
// 2. Autorecovery daemons: the active auditor, then a worker mid-copy, killed.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemons_survive_auditor_and_worker_kills() {
    bounded("daemons_survive_auditor_and_worker_kills", async {
        let mut c = Cluster::start("ar-daemons", 3, &["--no-autorecovery"]).await;
        let daemon_args = [
            "--lost-bookie-recovery-delay",
            "3s",
            "--throttle-bytes-per-sec",
            "100000",
        ];
        for id in ["ar-a", "ar-b"] {
            let d = AutoRecoveryProcess::start(id, &c.uri, &daemon_args).await;
            // It says where it serves (printed just after the address file is written).
            let line = format!("autorecovery {id} serving HTTP on {}", d.http_addr());
            wait_until(WAIT, &format!("{id} to print {line:?}"), || {
                let printed = d.last_stdout().contains(&line);
                async move { printed }
            })
            .await;
            c.daemons.push(d);
        }
        let first_auditor = wait_for(WAIT, "a daemon to become the auditor", || async {
            auditor_id(&c.status().await)
        })
        .await;
        let ai = c.daemon_index(&first_auditor);
        let standby = c.daemons[1 - ai].id().to_string();
        // The gauge is set just after the election key is won.
        wait_until(WAIT, "the auditor's gauge", || async {
            c.daemons[ai].metric("quire_autorecovery_auditor_active") == Some(1.0)
        })
        .await;
        assert_eq!(
            c.daemons[1 - ai].metric("quire_autorecovery_auditor_active"),
            Some(0.0)
        );
        // The bookies run no autorecovery of their own: only the two daemons work.
        let s = c.status().await;
        let workers: BTreeSet<&str> = s["workers"]
            .as_array()
            .expect("workers")
            .iter()
            .map(|w| w["id"].as_str().expect("worker id"))
            .collect();
        assert_eq!(workers, BTreeSet::from(["ar-a", "ar-b"]), "{s}");

        // ~1.5 MB over three ledgers on the three bookies: at 100 kB/s a copy takes seconds.
        let client = c.client().await;
        let ledgers = futures::future::join_all([
            write_closed(&client, 500, 970),
            write_closed(&client, 500, 970),
            write_closed(&client, 500, 970),
        ])
        .await;
        let ids = ids_of(&ledgers);
        let spare = c.add_bookie().await;
        let spare = c.bookies[spare].bookie_id().to_string();
        let dead = c.bookies[0].bookie_id().to_string();
        assert_eq!(naming(&client, &ids, &dead).await, ids);

        // The bookie dies, and so does the auditor before the lost-bookie delay (3 s after the
        // bookie's 2 s session ends) has passed.
        let s = c.status().await;
        assert_eq!(under_replicated(&s), 0, "{s}");
        eprintln!("kill -9 bookie {dead} and the auditor {first_auditor}");
        c.bookies[0].kill9();
        let killed_ms = now_ms();
        c.daemons[ai].kill9();

        // The standby takes over once the dead auditor's session (10 s) ends, and finds the
        // lost bookie itself.
        let s = wait_for(
            WAIT,
            &format!("{standby} to become the auditor"),
            || async {
                let s = c.status().await;
                (auditor_id(&s).as_deref() == Some(standby.as_str())
                    && s["auditor"]["lost_bookies"].get(&dead).is_some())
                .then_some(s)
            },
        )
        .await;
        assert!(
            s["auditor"]["since_ms"]
                .as_u64()
                .is_some_and(|t| t >= killed_ms),
            "the new auditor's term started before the old one was killed: {s}"
        );
        let si = c.daemon_index(&standby);
        wait_until(WAIT, "the new auditor's gauge", || async {
            c.daemons[si].metric("quire_autorecovery_auditor_active") == Some(1.0)
        })
        .await;
        // Its HTTP status says the same as the CLI.
        let http = c.daemons[si].status();
        assert_eq!(
            auditor_id(&http).as_deref(),
            Some(standby.as_str()),
            "{http}"
        );

        // The crashed daemon comes back (same id) as a standby and a second worker.
        c.daemons[ai].restart().await;

        // A worker mid-copy dies: it holds a ledger's lock, and the ledger still names the
        // dead bookie (the copy is not swapped in yet).
        let live: BTreeSet<String> = c.daemons.iter().map(|d| d.id().to_string()).collect();
        let (locked, victim): (u64, String) =
            wait_for(WAIT, "a worker to lock a marked ledger", || async {
                let s = c.status().await;
                s["ledgers"].as_array().and_then(|ls| {
                    ls.iter().find_map(|l| {
                        let by = l["locked_by"].as_str()?;
                        live.contains(by)
                            .then(|| (l["ledger_id"].as_u64().expect("ledger id"), by.into()))
                    })
                })
            })
            .await;
        let vi = c.daemon_index(&victim);
        let survivor = c.daemons[1 - vi].id().to_string();
        eprintln!("kill -9 worker {victim} while it copies ledger {locked}");
        c.daemons[vi].kill9();
        assert!(
            names(&client, locked, &dead).await,
            "ledger {locked} no longer names {dead}: its worker finished before the kill"
        );
        // Its lock outlives it until its session ends.
        let s = c.status().await;
        let entry = s["ledgers"]
            .as_array()
            .expect("ledgers")
            .iter()
            .find(|l| l["ledger_id"] == locked)
            .unwrap_or_else(|| panic!("ledger {locked} is no longer marked: {s}"));
        assert_eq!(entry["locked_by"], victim.as_str(), "{s}");
        assert!(
            entry["missing"]
                .as_array()
                .is_some_and(|m| m.iter().any(|b| *b == dead.as_str())),
            "{s}"
        );

        // The survivor finishes everything, the dead worker's ledger included.
        wait_until(
            RESTORE,
            &format!("every ledger restored off {dead}"),
            || async {
                under_replicated(&c.status().await) == 0
                    && naming(&client, &ids, &dead).await.is_empty()
            },
        )
        .await;
        for w in &ledgers {
            assert_ledger_ok(&c.uri, &client, w, &[&dead]).await;
            // The only bookie outside the old ensemble took the replicas.
            assert!(
                names(&client, w.id, &spare).await,
                "ledger {} does not name the spare bookie {spare}",
                w.id
            );
        }

        // The survivor is the only daemon left: it is (or becomes) the auditor, and its
        // counters and metrics show the copies.
        let si = c.daemon_index(&survivor);
        wait_until(WAIT, &format!("{survivor} to be the auditor"), || async {
            let s = c.status().await;
            auditor_id(&s).as_deref() == Some(survivor.as_str())
                && worker(&s, &victim).is_none()
                && worker(&s, &survivor).is_some_and(|w| {
                    w["ledgers_replicated"].as_u64().is_some_and(|n| n >= 1)
                        && w["bytes_replicated"].as_u64().is_some_and(|n| n > 0)
                        && w["current_ledger"].is_null()
                })
        })
        .await;
        // The gauges follow the auditor's next tick.
        let d = &c.daemons[si];
        wait_until(
            WAIT,
            &format!("{survivor}'s metrics to show the copies"),
            || async {
                d.metric("quire_autorecovery_auditor_active") == Some(1.0)
                    && d.metric("quire_autorecovery_bytes_replicated_total")
                        .is_some_and(|b| b > 0.0)
                    && d.metric("quire_autorecovery_under_replicated_ledgers") == Some(0.0)
            },
        )
        .await;

        // A clean stop gives up the auditor role and the worker's entry at once.
        c.daemons[si].terminate().await;
        wait_until(
            WAIT,
            "no auditor and no worker after the clean stop",
            || async {
                let s = c.status().await;
                s["auditor"].is_null() && s["workers"].as_array().is_some_and(|w| w.is_empty())
            },
        )
        .await;
    })
    .await;
}

// ------------------------------------------------------------------------------------------------
// 3. Decommissioning a live bookie under readers.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_moves_replicas_under_readers() {
    bounded("decommission_moves_replicas_under_readers", async {
        let c = Cluster::start("ar-decom", 4, &["--throttle-bytes-per-sec", "100000"]).await;
        let client = c.client().await;
        let ledgers = futures::future::join_all([
            write_closed(&client, 250, 900),
            write_closed(&client, 250, 900),
            write_closed(&client, 250, 900),
            write_closed(&client, 250, 900),
        ])
        .await;
        let ids = ids_of(&ledgers);
        // The bookie most ledgers name (each leaves out one of four: at least three do).
        let mut leaving: Option<(usize, String)> = None;
        for b in &c.bookies {
            let n = naming(&client, &ids, b.bookie_id()).await.len();
            if leaving.as_ref().is_none_or(|(m, _)| n > *m) {
                leaving = Some((n, b.bookie_id().to_string()));
            }
        }
        let (named_by, leaving) = leaving.expect("a bookie");
        assert!(named_by >= 3, "{leaving} is named by {named_by} ledgers");

        // Readers: every entry of every ledger read back, and every replica checked, over and
        // over; each round must succeed.
        let stop = Arc::new(AtomicBool::new(false));
        let rounds = Arc::new(AtomicU64::new(0));
        let readers = tokio::spawn({
            let (stop, rounds, uri, client, ledgers) = (
                stop.clone(),
                rounds.clone(),
                c.uri.clone(),
                client.clone(),
                ledgers.clone(),
            );
            async move {
                loop {
                    for w in &ledgers {
                        let n = rounds.load(Ordering::Acquire);
                        read_back(&client, w)
                            .await
                            .map_err(|e| format!("round {n}: {e}"))?;
                        replica_check(&uri, w)
                            .await
                            .map_err(|e| format!("round {n}: {e}"))?;
                    }
                    rounds.fetch_add(1, Ordering::AcqRel);
                    if stop.load(Ordering::Acquire) {
                        return Ok::<u64, String>(rounds.load(Ordering::Acquire));
                    }
                }
            }
        });
        wait_until(WAIT, "a first round of readers", || {
            let (n, done) = (rounds.load(Ordering::Acquire), readers.is_finished());
            async move { n >= 1 || done }
        })
        .await;

        eprintln!("decommission {leaving}, named by {named_by} ledgers");
        let started_round = rounds.load(Ordering::Acquire);
        let out = c
            .cli(
                &[
                    "bookie",
                    "decommission",
                    &leaving,
                    "--metadata",
                    &c.uri,
                    "--json",
                    "--timeout",
                    "90s",
                    "--throttle-bytes-per-sec",
                    "100000",
                ],
                b"",
            )
            .await;
        let report = json("quire bookie decommission --json", &out);
        let ended_round = rounds.load(Ordering::Acquire);
        eprintln!(
            "decommission report {report}; reader rounds {started_round}..{ended_round} ran \
             meanwhile"
        );
        assert_eq!(report["bookie"], leaving.as_str(), "{report}");
        assert_eq!(report["ledgers"], named_by, "{report}");
        for k in [
            "ledgers_moved",
            "fragments_moved",
            "entries_copied",
            "bytes_copied",
            "elapsed_ms",
        ] {
            assert!(report[k].is_u64(), "report without {k}: {report}");
        }
        assert!(
            report["ledgers_moved"]
                .as_u64()
                .is_some_and(|n| n <= named_by as u64),
            "{report}"
        );

        // One more full round of readers after it, then they stop: none may have failed.
        wait_until(WAIT, "a round of readers after the decommission", || {
            let (n, done) = (rounds.load(Ordering::Acquire), readers.is_finished());
            async move { n > ended_round || done }
        })
        .await;
        stop.store(true, Ordering::Release);
        let total = within("the readers", readers)
            .await
            .expect("reader task")
            .unwrap_or_else(|e| panic!("a reader saw a problem during the decommission: {e}"));
        eprintln!("{total} reader rounds, all clean");

        assert_eq!(naming(&client, &ids, &leaving).await, Vec::<u64>::new());
        for w in &ledgers {
            assert_ledger_ok(&c.uri, &client, w, &[&leaving]).await;
        }
        let s = wait_for(WAIT, "no ledger marked after the decommission", || async {
            let s = c.status().await;
            (under_replicated(&s) == 0).then_some(s)
        })
        .await;
        assert_eq!(decommissioning(&s), vec![leaving.clone()], "{s}");

        // The emptied bookie gets no new ledgers.
        let w = write_closed(&client, 10, 100).await;
        assert!(
            !names(&client, w.id, &leaving).await,
            "a new ledger was placed on the decommissioned {leaving}: {:?}",
            ensembles(&client, w.id).await
        );

        // --cancel ends the decommission.
        let out = c
            .cli(
                &[
                    "bookie",
                    "decommission",
                    &leaving,
                    "--metadata",
                    &c.uri,
                    "--cancel",
                ],
                b"",
            )
            .await;
        ok("quire bookie decommission --cancel", &out);
        let s = c.status().await;
        assert!(decommissioning(&s).is_empty(), "{s}");
    })
    .await;
}

// ------------------------------------------------------------------------------------------------
// 4. Refusals change nothing.

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_refusals_change_nothing() {
    bounded("decommission_refusals_change_nothing", async {
        let c = Cluster::start("ar-refuse", 3, &[]).await;
        let client = c.client().await;
        let w = c.write_cli(50).await;
        let before = within("ledger metadata", client.metadata(w.id))
            .await
            .expect("metadata");

        let out = c
            .cli(
                &[
                    "bookie",
                    "decommission",
                    "test-no-such-bookie",
                    "--metadata",
                    &c.uri,
                ],
                b"",
            )
            .await;
        assert!(
            !out.status.success(),
            "decommissioning an unknown bookie succeeded: {:?}",
            out.stdout
        );
        assert!(
            out.stderr.contains("unknown bookie") && out.stderr.contains("test-no-such-bookie"),
            "the refusal does not name the unknown bookie: {:?}",
            out.stderr
        );

        // Three bookies, E=3: no bookie could take the replicas.
        let target = c.bookies[1].bookie_id().to_string();
        let out = c
            .cli(
                &["bookie", "decommission", &target, "--metadata", &c.uri],
                b"",
            )
            .await;
        assert!(
            !out.status.success(),
            "decommissioning {target} with no spare bookie succeeded: {:?}",
            out.stdout
        );
        assert!(
            out.stderr.contains("not enough bookies") && out.stderr.contains("Add a bookie first"),
            "the refusal does not say why: {:?}",
            out.stderr
        );

        let s = c.status().await;
        assert!(decommissioning(&s).is_empty(), "{s}");
        assert_eq!(under_replicated(&s), 0, "{s}");
        let after = within("ledger metadata", client.metadata(w.id))
            .await
            .expect("metadata");
        assert_eq!(
            after.version, before.version,
            "the refusal changed the ledger"
        );
        assert_eq!(after.value.ensembles, before.value.ensembles);
        assert_ledger_ok(&c.uri, &client, &w, &[]).await;
        // The bookie still takes new ledgers (E=3 of three bookies needs it).
        let again = c.write_cli(5).await;
        assert!(names(&client, again.id, &target).await);
        assert_ledger_ok(&c.uri, &client, &again, &[]).await;
    })
    .await;
}
