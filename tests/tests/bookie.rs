//! End-to-end tests of one `quire bookie` process: durability across SIGTERM and SIGKILL,
//! corruption, disk-full and forced read-only modes, master keys and fencing, cookies, long-poll
//! LAC and bad input. Each test owns its bookie and directories and may run in parallel with the
//! others.

use bytes::Bytes;
use quire_proto::StatusCode;
use quire_proto::bookie::{
    AddEntry, AddRequest, BookieState, DeleteLedgerRequest, FenceRequest, InfoRequest,
    ReadEntryRequest, WriteLacRequest,
};
use quire_tests::*;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

const KEY: &[u8] = b"the-master-key";
const WAIT: Duration = Duration::from_secs(30);

fn seed() -> u64 {
    let s = rand::random::<u64>();
    eprintln!("payload seed: {s}");
    s
}

/// A payload length in 1..=max, derived from the ids (so it can be recomputed).
fn len_for(seed: u64, ledger: u64, entry: u64, max: usize) -> usize {
    let x = payload(seed ^ 0x5eed, ledger, entry, 8);
    1 + (u64::from_le_bytes(x.try_into().expect("8 bytes")) % max as u64) as usize
}

/// The body a test writes for (ledger, entry): deterministic, with the previous entry as LAC.
fn body_for(seed: u64, ledger: u64, entry: u64, max_len: usize) -> Bytes {
    let p = payload(seed, ledger, entry, len_for(seed, ledger, entry, max_len));
    body(ledger, entry, entry as i64 - 1, &p)
}

/// Reads every entry 0..n of each ledger and checks it is byte-identical to what was written.
async fn verify_ledgers(
    client: &Client,
    seed: u64,
    ledgers: &[u64],
    n: u64,
    max_len: usize,
    when: &str,
) {
    let mut tasks = Vec::new();
    for &l in ledgers {
        let mut c = client.clone();
        let when = when.to_string();
        tasks.push(tokio::spawn(async move {
            for e in 0..n {
                let got = read_entry(&mut c, l, e as i64)
                    .await
                    .unwrap_or_else(|err| panic!("{when}: read {l}/{e} failed: {err:?}"));
                assert_eq!(
                    got.entry_id, e,
                    "{when}: read {l}/{e} returned another entry"
                );
                assert!(
                    got.body == body_for(seed, l, e, max_len),
                    "{when}: entry {l}/{e} differs from what was written"
                );
            }
            let last = read_entry(&mut c, l, -1).await.expect("read last entry");
            assert_eq!(last.entry_id, n - 1, "{when}: last entry of ledger {l}");
        }));
    }
    for t in tasks {
        t.await.expect("verifier task");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_ledgers_read_back_identical_across_restarts() {
    let mut bookie =
        BookieProcess::start(BookieOpts::new("concurrent").ledger_dir_count(2).config(
            "[storage]\nflush_interval_ms = 200\nentry_log_size_max_bytes = 1048576\n\
                 gc_interval_ms = 100\n",
        ))
        .await;
    let seed = seed();
    const LEDGERS: u64 = 8;
    const ENTRIES: u64 = 400;
    const MAX_LEN: usize = 4096;
    const STREAMS: u64 = 4;

    // Each stream writes two ledgers, interleaved, in requests of varying size.
    let mut writers = Vec::new();
    for s in 0..STREAMS {
        let mut client = bookie.client().await;
        writers.push(tokio::spawn(async move {
            let mine = [s + 1, s + 1 + STREAMS];
            let mut entries = Vec::new();
            for e in 0..ENTRIES {
                for &l in &mine {
                    entries.push(add_entry(l, e, KEY, body_for(seed, l, e, MAX_LEN)));
                }
            }
            let batch = 1 + ((seed >> (s * 5)) % 32) as usize;
            let results = add_all(&mut client, entries, batch).await;
            assert_eq!(results.len() as u64, 2 * ENTRIES);
            assert_all_ok(&results);
        }));
    }
    for w in writers {
        w.await.expect("writer task");
    }

    let ledgers: Vec<u64> = (1..=LEDGERS).collect();
    let client = bookie.client().await;
    verify_ledgers(&client, seed, &ledgers, ENTRIES, MAX_LEN, "after writing").await;
    for &l in &ledgers {
        let lac = read_lac(&mut client.clone(), l, -1, 0)
            .await
            .expect("read lac");
        assert_eq!(lac.lac, ENTRIES as i64 - 2, "LAC of ledger {l}");
    }

    bookie.terminate().await;
    bookie.restart().await;
    let client = bookie.client().await;
    verify_ledgers(
        &client,
        seed,
        &ledgers,
        ENTRIES,
        MAX_LEN,
        "after SIGTERM restart",
    )
    .await;

    bookie.kill9();
    bookie.restart().await;
    let client = bookie.client().await;
    verify_ledgers(
        &client,
        seed,
        &ledgers,
        ENTRIES,
        MAX_LEN,
        "after kill -9 restart",
    )
    .await;
    for &l in &ledgers {
        let lac = read_lac(&mut client.clone(), l, -1, 0)
            .await
            .expect("read lac");
        assert_eq!(
            lac.lac,
            ENTRIES as i64 - 2,
            "LAC of ledger {l} after restarts"
        );
    }
}

/// What a writer that was cut off by a crash knows.
struct CutOff {
    /// Entries acknowledged OK.
    acked: HashSet<(u64, u64)>,
    /// Entries that got an error result, with the code.
    failed: Vec<((u64, u64), StatusCode, String)>,
    /// Per ledger, one past the highest entry id that may have been sent.
    next: HashMap<u64, u64>,
}

/// Shared between a test and its writer.
#[derive(Default)]
struct Progress {
    /// Entries acknowledged OK so far.
    acked: AtomicUsize,
    /// Entries refused so far.
    failed: AtomicUsize,
    /// Set by the test: send nothing more (the stream stays open).
    stop: AtomicBool,
}

impl Progress {
    fn acked(&self) -> usize {
        self.acked.load(Ordering::Relaxed)
    }

    fn failed(&self) -> usize {
        self.failed.load(Ordering::Relaxed)
    }
}

/// Streams entries round-robin over `ledgers` (starting at `next`) until the stream breaks.
async fn write_until_cut_off(
    mut client: Client,
    seed: u64,
    ledgers: Vec<u64>,
    next: HashMap<u64, u64>,
    progress: Arc<Progress>,
    max_len: usize,
) -> CutOff {
    let mut stream = AddStream::open(&mut client).await;
    let tx = stream.sender();
    stream.finish();
    let next = Arc::new(std::sync::Mutex::new(next));
    let sent = next.clone();
    let p = progress.clone();
    let sender = tokio::spawn(async move {
        // Stop sending when told to or at the first refusal (refusals come back fast enough to
        // flood the bookie), but keep the stream open: the bookie must cope with an idle
        // stream. The round cap is for a bookie that never stops.
        for round in 0..100_000u64 {
            if p.stop.load(Ordering::Relaxed) || p.failed.load(Ordering::Relaxed) > 0 {
                tx.closed().await;
                return;
            }
            let mut batch = Vec::new();
            {
                let mut next = sent.lock().expect("lock");
                for i in 0..16 {
                    let l = ledgers[((round * 16 + i) % ledgers.len() as u64) as usize];
                    let e = next.entry(l).or_insert(0);
                    batch.push(add_entry(l, *e, KEY, body_for(seed, l, *e, max_len)));
                    *e += 1;
                }
            }
            if tx.send(AddRequest { entries: batch }).await.is_err() {
                return;
            }
        }
    });
    let mut acked = HashSet::new();
    let mut failed = Vec::new();
    // Until the stream ends or breaks (the bookie went away).
    while let Ok(Some(results)) = stream.next().await {
        for r in results {
            let key = (r.ledger_id, r.entry_id);
            if code(&r) == StatusCode::Ok {
                assert!(acked.insert(key), "{key:?} acknowledged twice");
                progress.acked.fetch_add(1, Ordering::Relaxed);
            } else {
                failed.push((key, code(&r), r.message));
                progress.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    drop(stream);
    sender.abort();
    let _ = sender.await;
    let next = next.lock().expect("lock").clone();
    CutOff {
        acked,
        failed,
        next,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_survive_kill9_mid_stream() {
    crash_mid_stream("kill9", "auto", Stop::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_entries_survive_kill9_mid_stream_plain_journal_io() {
    crash_mid_stream("kill9-plain", "plain", Stop::Kill9).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_stream_exits_cleanly_and_keeps_acknowledged_entries() {
    crash_mid_stream("sigterm-mid-stream", "auto", Stop::Term).await;
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Stop {
    Kill9,
    Term,
}

/// Three rounds of: stream entries to four ledgers, stop the bookie mid-stream (`stop`), restart,
/// and check that every acknowledged entry reads back byte-identical and every other entry is
/// either identical or absent.
async fn crash_mid_stream(name: &str, io: &str, stop: Stop) {
    let mut bookie = BookieProcess::start(BookieOpts::new(name).config(&format!(
        "[storage]\nflush_interval_ms = 200\nentry_log_size_max_bytes = 2097152\n\
         [journal]\nio = \"{io}\"\nprealloc_bytes = 1048576\nfile_size_max_bytes = 4194304\n"
    )))
    .await;
    let seed = seed();
    const MAX_LEN: usize = 2048;
    let ledgers: Vec<u64> = vec![11, 12, 13, 14];
    let mut next: HashMap<u64, u64> = ledgers.iter().map(|&l| (l, 0)).collect();
    let mut acked_all: HashSet<(u64, u64)> = HashSet::new();

    for round in 0..3 {
        let progress = Arc::new(Progress::default());
        let writer = tokio::spawn(write_until_cut_off(
            bookie.client().await,
            seed,
            ledgers.clone(),
            next.clone(),
            progress.clone(),
            MAX_LEN,
        ));
        let target = 2000 + 1000 * round;
        wait_until(
            Duration::from_secs(120),
            "entries to be acknowledged",
            || {
                let n = progress.acked();
                async move { n >= target }
            },
        )
        .await;
        match stop {
            Stop::Kill9 => bookie.kill9(),
            Stop::Term => {
                // Entries are still in flight, and the stream stays open while the bookie
                // shuts down. `terminate` asserts a clean exit (status 0) in time.
                progress.stop.store(true, Ordering::Relaxed);
                bookie.terminate().await
            }
        }
        let cut = tokio::time::timeout(WAIT, writer)
            .await
            .expect("writer did not notice the stop")
            .expect("writer task");
        eprintln!(
            "round {round}: {} acknowledged, {} failed, sent up to {:?}",
            cut.acked.len(),
            cut.failed.len(),
            cut.next
        );
        for (key, code, msg) in &cut.failed {
            // Only a bookie going down may refuse an add here.
            assert!(
                stop == Stop::Term && *code == StatusCode::ShuttingDown,
                "round {round}: add {key:?} failed with {code:?}: {msg}"
            );
        }
        acked_all.extend(cut.acked);

        bookie.restart().await;
        let mut client = bookie.client().await;
        let mut present = 0;
        for &l in &ledgers {
            for e in 0..cut.next[&l] {
                match read_entry(&mut client, l, e as i64).await {
                    Ok(r) => {
                        present += 1;
                        assert!(
                            r.body == body_for(seed, l, e, MAX_LEN),
                            "round {round}: entry {l}/{e} read back different bytes"
                        );
                    }
                    Err(err) => {
                        assert!(
                            !acked_all.contains(&(l, e)),
                            "round {round}: acknowledged entry {l}/{e} lost: {err:?}"
                        );
                        assert_eq!(
                            err.code,
                            StatusCode::NoSuchEntry,
                            "round {round}: unacknowledged entry {l}/{e} must be absent, not {err:?}"
                        );
                    }
                }
            }
        }
        assert!(
            present >= acked_all.len(),
            "fewer entries present than acknowledged"
        );
        next = cut.next;
    }
}

/// Finds `needle` in the entry logs of `dir`; returns (file, offset) of its only occurrence.
fn find_in_entry_logs(dir: &Path, needle: &[u8]) -> (PathBuf, usize) {
    let mut hits = Vec::new();
    for e in std::fs::read_dir(dir.join("logs")).expect("logs directory") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "log") {
            let data = std::fs::read(&p).expect("read entry log");
            let mut from = 0;
            while let Some(i) = data[from..].windows(needle.len()).position(|w| w == needle) {
                hits.push((p.clone(), from + i));
                from += i + 1;
            }
        }
    }
    assert_eq!(
        hits.len(),
        1,
        "expected the entry exactly once in the entry logs: {hits:?}"
    );
    hits.pop().expect("one hit")
}

fn flip_byte(file: &Path, offset: usize) {
    let mut data = std::fs::read(file).expect("read");
    data[offset] ^= 0x5a;
    std::fs::write(file, data).expect("write");
}

/// Starts a bookie, writes `per_ledger` entries to ledgers 7 and 8, and stops it with SIGTERM
/// (whose final checkpoint puts everything into the entry log).
async fn ledgers_7_and_8_in_entry_logs(
    name: &str,
    config: &str,
    per_ledger: u64,
    max_len: usize,
) -> (BookieProcess, u64) {
    let mut bookie = BookieProcess::start(BookieOpts::new(name).config(config)).await;
    let seed = seed();
    let mut client = bookie.client().await;
    let mut entries = Vec::new();
    for l in [7u64, 8] {
        for e in 0..per_ledger {
            entries.push(add_entry(l, e, KEY, body_for(seed, l, e, max_len)));
        }
    }
    assert_all_ok(&add_all(&mut client, entries, 8).await);
    bookie.terminate().await;
    (bookie, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupted_entry_log_record_is_an_error_not_data() {
    const MAX_LEN: usize = 1000;
    let (mut bookie, seed) = ledgers_7_and_8_in_entry_logs(
        "corrupt",
        "[storage]\nflush_interval_ms = 200\n",
        20,
        MAX_LEN,
    )
    .await;

    let dir = bookie.ledger_dirs()[0].clone();
    // Payload byte of 7/5, stored checksum of 8/3, entry-id field of 8/4, and the index slot of
    // 8/10 (its offset field).
    let target = body_for(seed, 7, 5, MAX_LEN);
    let (f, at) = find_in_entry_logs(&dir, &target);
    flip_byte(&f, at + target.len() - 1);
    let (f, at) = find_in_entry_logs(&dir, &body_for(seed, 8, 3, MAX_LEN));
    flip_byte(&f, at - 20);
    let (f, at) = find_in_entry_logs(&dir, &body_for(seed, 8, 4, MAX_LEN));
    flip_byte(&f, at - 8);
    flip_byte(
        &dir.join("index").join(format!("{:016x}.idx", 8)),
        64 + 16 * 10 + 4,
    );
    const DAMAGED: [(u64, u64); 4] = [(7, 5), (8, 3), (8, 4), (8, 10)];

    bookie.restart().await;
    let mut client = bookie.client().await;
    for _ in 0..2 {
        for (l, e) in DAMAGED {
            let r = read_entry(&mut client, l, e as i64).await;
            match r {
                Err(err) => assert_eq!(err.code, StatusCode::Corruption, "read {l}/{e}: {err:?}"),
                Ok(_) => panic!("corrupted entry {l}/{e} was served as data"),
            }
        }
    }
    for l in [7u64, 8] {
        for e in 0..20 {
            if DAMAGED.contains(&(l, e)) {
                continue;
            }
            let r = read_entry(&mut client, l, e as i64)
                .await
                .unwrap_or_else(|err| panic!("intact entry {l}/{e} unreadable: {err:?}"));
            assert!(
                r.body == body_for(seed, l, e, MAX_LEN),
                "entry {l}/{e} differs"
            );
        }
        let last = read_entry(&mut client, l, -1).await.expect("read last");
        assert_eq!(last.entry_id, 19);
    }
    // The bookie keeps serving: new adds to the damaged ledger work.
    let mut entries = Vec::new();
    for e in 20..25 {
        entries.push(add_entry(7, e, KEY, body_for(seed, 7, e, MAX_LEN)));
    }
    assert_all_ok(&add_all(&mut client, entries, 5).await);
    for e in 20..25 {
        let r = read_entry(&mut client, 7, e).await.expect("read new entry");
        assert!(r.body == body_for(seed, 7, e as u64, MAX_LEN));
    }
    let (code, _) = bookie.http_get("/health");
    assert_eq!(code, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_does_not_let_gc_delete_live_entries() {
    // Only the final checkpoint flushes, so all entries land in one log, sorted by
    // (ledger, entry): ledger 7's records come first.
    const MAX_LEN: usize = 1000;
    let (mut bookie, seed) = ledgers_7_and_8_in_entry_logs(
        "corrupt-gc",
        "[storage]\nflush_interval_ms = 600000\n",
        10,
        MAX_LEN,
    )
    .await;

    // Make it the state a crash leaves: the log being written has no ledger summary
    // (`<id>.ledgers`) and is scanned at start-up. Then damage one payload byte of its first
    // record (7/0), so the scan cannot see the records after it.
    let dir = bookie.ledger_dirs()[0].clone();
    let target = body_for(seed, 7, 0, MAX_LEN);
    let (f, at) = find_in_entry_logs(&dir, &target);
    assert_eq!(at, 64 + 24, "7/0 should be the log's first record");
    let _ = std::fs::remove_file(f.with_extension("ledgers"));
    flip_byte(&f, at + target.len() - 1);

    // Now checkpoint often and collect garbage after every checkpoint, over two restarts.
    bookie.set_config("[storage]\nflush_interval_ms = 100\ngc_interval_ms = 1\n");
    for run in 0..2 {
        bookie.restart().await;
        let mut client = bookie.client().await;
        let err = read_entry(&mut client, 7, 0)
            .await
            .expect_err("corrupt entry served");
        assert_eq!(err.code, StatusCode::Corruption);
        let start = bookie
            .metric("quire_bookie_checkpoints_total")
            .unwrap_or(0.0);
        wait_until(WAIT, "a few checkpoint and GC passes", || {
            let n = bookie
                .metric("quire_bookie_checkpoints_total")
                .unwrap_or(0.0);
            async move { n >= start + 3.0 }
        })
        .await;
        for l in [7u64, 8] {
            for e in 0..10u64 {
                if (l, e) == (7, 0) {
                    continue;
                }
                let r = read_entry(&mut client, l, e as i64)
                    .await
                    .unwrap_or_else(|err| {
                        panic!("run {run}: live entry {l}/{e} lost after GC: {err:?}")
                    });
                assert!(
                    r.body == body_for(seed, l, e, MAX_LEN),
                    "entry {l}/{e} differs"
                );
            }
        }
        if run == 0 {
            bookie.kill9();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_above_threshold_turns_read_only_and_back() {
    let mount = match TmpfsMount::new("64m") {
        Ok(m) => m,
        Err(e) => {
            eprintln!("skipped: cannot mount a tmpfs here: {e}");
            return;
        }
    };
    let mut bookie = BookieProcess::start(
        BookieOpts::new("diskfull")
            .journal_dir(mount.path().join("journal"))
            .ledger_dirs(vec![mount.path().join("ledgers")])
            .config(
                "[journal]\nprealloc_bytes = 1048576\nfile_size_max_bytes = 4194304\n\
                 [storage]\nflush_interval_ms = 200\nwrite_cache_bytes_max = 16777216\n\
                 read_cache_bytes_max = 4194304\n\
                 [disk]\nusage_high = 0.5\nusage_low = 0.3\ncheck_interval_ms = 100\n",
            ),
    )
    .await;
    let seed = seed();
    const MAX_LEN: usize = 1000;
    let st = bookie.state();
    assert_eq!(
        st["read_only"], false,
        "fresh bookie on an empty tmpfs: {st}"
    );
    let mut client = bookie.client().await;
    let entries = (0..20)
        .map(|e| add_entry(1, e, KEY, body_for(seed, 1, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 4).await);

    // Fill the disk to 60%.
    let filler = mount.path().join("filler");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&filler).expect("create filler");
        let chunk = vec![0xabu8; 1 << 20];
        while mount.usage() < 0.6 {
            f.write_all(&chunk).expect("write filler");
            f.sync_data().expect("sync filler");
        }
    }
    eprintln!("disk usage with filler: {:.2}", mount.usage());
    wait_until(WAIT, "read-only after the disk filled", || {
        let st = bookie.state();
        async move { st["read_only"] == true && st["disk_full"] == true }
    })
    .await;
    let (code, msg) = add_one(
        &mut client,
        add_entry(1, 20, KEY, body_for(seed, 1, 20, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::ReadOnly, "add on a full disk: {msg}");
    let (code, msg) = add_one(
        &mut client,
        add_entry(2, 0, KEY, body_for(seed, 2, 0, MAX_LEN)),
    )
    .await;
    assert_eq!(
        code,
        StatusCode::ReadOnly,
        "add of a new ledger on a full disk: {msg}"
    );
    let info = rpc(client.info(InfoRequest {})).await.expect("info");
    assert_eq!(info.state, BookieState::ReadOnly as i32);
    assert!(!info.forced_read_only);
    for e in 0..20 {
        let r = read_entry(&mut client, 1, e)
            .await
            .expect("read while read-only");
        assert!(r.body == body_for(seed, 1, e as u64, MAX_LEN));
    }
    let err = read_entry(&mut client, 1, 20)
        .await
        .expect_err("rejected add was stored");
    assert_eq!(err.code, StatusCode::NoSuchEntry);

    std::fs::remove_file(&filler).expect("remove filler");
    wait_until(WAIT, "writable after the disk emptied", || {
        let st = bookie.state();
        async move { st["read_only"] == false && st["disk_full"] == false }
    })
    .await;
    let entries = (20..30)
        .map(|e| add_entry(1, e, KEY, body_for(seed, 1, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 4).await);
    for e in 0..30 {
        let r = read_entry(&mut client, 1, e)
            .await
            .expect("read after writable");
        assert!(r.body == body_for(seed, 1, e as u64, MAX_LEN));
    }
    bookie.terminate().await;
    drop(bookie);
    drop(mount);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_read_only_via_http_and_back() {
    let bookie = BookieProcess::start(BookieOpts::new("forced-ro")).await;
    let seed = seed();
    const MAX_LEN: usize = 500;
    let mut client = bookie.client().await;
    let st = bookie.state();
    assert_eq!(st["read_only"], false, "{st}");
    assert_eq!(st["forced_read_only"], false, "{st}");
    let (code, _) = add_one(
        &mut client,
        add_entry(3, 0, KEY, body_for(seed, 3, 0, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::Ok);

    let (http, body) = bookie.http_put("/api/v1/bookie/state", r#"{"read_only":true}"#);
    assert_eq!(http, 200, "{body}");
    let st: serde_json::Value = serde_json::from_str(&body).expect("JSON reply");
    assert_eq!(st["forced_read_only"], true, "{st}");
    assert_eq!(st["read_only"], true, "{st}");
    assert_eq!(bookie.state()["read_only"], true);
    assert_eq!(bookie.metric("quire_bookie_read_only"), Some(1.0));
    let info = rpc(client.info(InfoRequest {})).await.expect("info");
    assert_eq!(info.state, BookieState::ReadOnly as i32);
    assert!(info.forced_read_only);

    let (code, msg) = add_one(
        &mut client,
        add_entry(3, 1, KEY, body_for(seed, 3, 1, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::ReadOnly, "{msg}");
    let r = read_entry(&mut client, 3, 0)
        .await
        .expect("read while forced read-only");
    assert!(r.body == body_for(seed, 3, 0, MAX_LEN));
    let err = read_entry(&mut client, 3, 1)
        .await
        .expect_err("rejected add stored");
    assert_eq!(err.code, StatusCode::NoSuchEntry);

    // Garbage on the admin API is refused and changes nothing.
    let (http, _) = bookie.http_put("/api/v1/bookie/state", "{not json");
    assert!((400..500).contains(&http), "bad JSON got HTTP {http}");
    let (http, _) = bookie.http_put("/api/v1/bookie/state", r#"{"read_only":"nope"}"#);
    assert!((400..500).contains(&http), "wrong type got HTTP {http}");
    assert_eq!(bookie.state()["forced_read_only"], true);

    // BookKeeper's spelling works too.
    let (http, body) = bookie.http_put("/api/v1/bookie/state/readonly", r#"{"readOnly":false}"#);
    assert_eq!(http, 200, "{body}");
    let st = bookie.state();
    assert_eq!(st["read_only"], false, "{st}");
    assert_eq!(st["forced_read_only"], false, "{st}");
    assert_eq!(bookie.metric("quire_bookie_read_only"), Some(0.0));
    let (code, msg) = add_one(
        &mut client,
        add_entry(3, 1, KEY, body_for(seed, 3, 1, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::Ok, "{msg}");
    let r = read_entry(&mut client, 3, 1)
        .await
        .expect("read after writable");
    assert!(r.body == body_for(seed, 3, 1, MAX_LEN));
}

async fn fence(client: &mut Client, ledger_id: u64, key: &[u8]) -> Result<(i64, i64), RpcError> {
    rpc(client.fence(FenceRequest {
        ledger_id,
        master_key: Bytes::copy_from_slice(key),
    }))
    .await
    .map(|r| (r.lac, r.last_entry_id))
}

fn recovery(mut e: AddEntry) -> AddEntry {
    e.recovery = true;
    e
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn master_key_and_fencing_hold_across_kill9() {
    // A long flush interval: the fence lives only in the journal when the bookie is killed.
    let mut bookie = BookieProcess::start(
        BookieOpts::new("fence").config("[storage]\nflush_interval_ms = 600000\n"),
    )
    .await;
    let seed = seed();
    const MAX_LEN: usize = 300;
    const OTHER: &[u8] = b"someone-else";
    let b = |l: u64, e: u64| body_for(seed, l, e, MAX_LEN);
    let mut client = bookie.client().await;
    let entries = (0..6).map(|e| add_entry(3, e, KEY, b(3, e))).collect();
    assert_all_ok(&add_all(&mut client, entries, 3).await);

    // Wrong key: refused, nothing stored, nothing fenced.
    let (code, msg) = add_one(&mut client, add_entry(3, 6, OTHER, b(3, 6))).await;
    assert_eq!(code, StatusCode::Unauthorized, "{msg}");
    let err = read_entry(&mut client, 3, 6)
        .await
        .expect_err("unauthorized add stored");
    assert_eq!(err.code, StatusCode::NoSuchEntry);
    let err = fence(&mut client, 3, OTHER)
        .await
        .expect_err("fence with a wrong key");
    assert_eq!(err.code, StatusCode::Unauthorized, "{err:?}");
    let (code, msg) = add_one(&mut client, add_entry(3, 6, KEY, b(3, 6))).await;
    assert_eq!(
        code,
        StatusCode::Ok,
        "a wrong-key fence must not fence: {msg}"
    );

    // Fence: normal adds refused, recovery adds accepted (with the right key only).
    let (lac, last) = fence(&mut client, 3, KEY).await.expect("fence");
    assert_eq!((lac, last), (5, 6), "fence reports LAC and last entry");
    let (code, msg) = add_one(&mut client, add_entry(3, 7, KEY, b(3, 7))).await;
    assert_eq!(code, StatusCode::Fenced, "{msg}");
    let err = read_entry(&mut client, 3, 7)
        .await
        .expect_err("fenced add stored");
    assert_eq!(err.code, StatusCode::NoSuchEntry);
    let (code, msg) = add_one(&mut client, recovery(add_entry(3, 7, OTHER, b(3, 7)))).await;
    assert_eq!(
        code,
        StatusCode::Unauthorized,
        "recovery add with a wrong key: {msg}"
    );
    let (code, msg) = add_one(&mut client, recovery(add_entry(3, 7, KEY, b(3, 7)))).await;
    assert_eq!(
        code,
        StatusCode::Ok,
        "recovery add on a fenced ledger: {msg}"
    );
    let r = read_entry(&mut client, 3, 7)
        .await
        .expect("read recovered entry");
    assert!(r.body == b(3, 7));
    assert!(r.fenced, "read reports the fence");

    // A recovery read with fence=true fences too.
    let entries = (0..3).map(|e| add_entry(4, e, KEY, b(4, e))).collect();
    assert_all_ok(&add_all(&mut client, entries, 3).await);
    let r = rpc(client.read_entry(ReadEntryRequest {
        ledger_id: 4,
        entry_id: -1,
        fence: true,
        master_key: Bytes::from_static(KEY),
    }))
    .await
    .expect("fencing read");
    assert_eq!(r.entry_id, 2);
    assert!(r.fenced);
    let (code, msg) = add_one(&mut client, add_entry(4, 3, KEY, b(4, 3))).await;
    assert_eq!(code, StatusCode::Fenced, "after a fencing read: {msg}");

    // Fencing a ledger this bookie has never seen keys it: a stale writer cannot start it here.
    let (lac, last) = fence(&mut client, 5, KEY)
        .await
        .expect("fence unknown ledger");
    assert_eq!((lac, last), (-1, -1));
    let (code, msg) = add_one(&mut client, add_entry(5, 0, OTHER, b(5, 0))).await;
    assert_eq!(code, StatusCode::Unauthorized, "{msg}");
    let (code, msg) = add_one(&mut client, add_entry(5, 0, KEY, b(5, 0))).await;
    assert_eq!(code, StatusCode::Fenced, "{msg}");
    let err = read_entry(&mut client, 5, -1)
        .await
        .expect_err("last entry of an empty ledger");
    assert_eq!(err.code, StatusCode::NoSuchEntry, "{err:?}");

    bookie.kill9();
    bookie.restart().await;
    let mut client = bookie.client().await;
    for (l, next) in [(3u64, 8u64), (4, 3), (5, 0)] {
        let (code, msg) = add_one(&mut client, add_entry(l, next, KEY, b(l, next))).await;
        assert_eq!(code, StatusCode::Fenced, "ledger {l} after kill -9: {msg}");
        let (code, msg) = add_one(&mut client, add_entry(l, next, OTHER, b(l, next))).await;
        assert_eq!(
            code,
            StatusCode::Unauthorized,
            "ledger {l} key after kill -9: {msg}"
        );
    }
    for e in 0..8 {
        let r = read_entry(&mut client, 3, e)
            .await
            .expect("read after kill -9");
        assert!(r.body == b(3, e as u64));
        assert!(r.fenced);
    }
    let (code, msg) = add_one(&mut client, recovery(add_entry(3, 8, KEY, b(3, 8)))).await;
    assert_eq!(code, StatusCode::Ok, "recovery add after restart: {msg}");
    let r = read_entry(&mut client, 3, -1).await.expect("read last");
    assert_eq!(r.entry_id, 8);
    assert!(r.body == b(3, 8));
}

/// Moves everything in `from` into `to` (created), leaving `from` empty.
fn move_contents(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).expect("create");
    for e in std::fs::read_dir(from).expect("read dir") {
        let e = e.expect("dir entry");
        std::fs::rename(e.path(), to.join(e.file_name())).expect("move");
    }
}

fn is_empty_dir(d: &Path) -> bool {
    std::fs::read_dir(d).expect("read dir").next().is_none()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookie_refuses_changed_or_wiped_directories() {
    let mut bookie = BookieProcess::start(BookieOpts::new("cookie")).await;
    let seed = seed();
    const MAX_LEN: usize = 300;
    let mut client = bookie.client().await;
    let entries = (0..10)
        .map(|e| add_entry(9, e, KEY, body_for(seed, 9, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 5).await);
    fence(&mut client, 9, KEY).await.expect("fence");
    drop(client);
    bookie.terminate().await;

    let journal = bookie.journal_dir().to_path_buf();
    let ledgers = bookie.ledger_dirs().to_vec();
    let all_dirs = || -> Vec<PathBuf> {
        std::iter::once(journal.clone())
            .chain(ledgers.clone())
            .collect()
    };
    let snapshot = || {
        let dirs = all_dirs();
        snapshot_files(&dirs.iter().map(PathBuf::as_path).collect::<Vec<_>>())
    };
    let before = snapshot();
    assert!(!before.is_empty());

    let refused = |r: Result<(), StartFailure>, what: &str| {
        let f = r.expect_err(&format!("bookie started with {what}"));
        let status = f
            .status
            .unwrap_or_else(|| panic!("bookie hung with {what}: {f}"));
        assert!(!status.success(), "bookie exited 0 with {what}");
        assert!(
            f.stderr.contains("cookie"),
            "{what}: stderr does not mention the cookie:\n{}",
            f.stderr
        );
    };

    // (a) An extra ledger directory.
    let extra = bookie.root().join("ledgers-extra");
    std::fs::create_dir_all(&extra).expect("create");
    bookie.set_ledger_dirs(ledgers.iter().cloned().chain([extra.clone()]).collect());
    refused(bookie.try_restart().await, "an extra ledger directory");
    assert!(
        is_empty_dir(&extra),
        "the refused bookie wrote into the new directory"
    );
    assert!(before == snapshot(), "a refused start changed the data");

    // (a') A different ledger directory in place of the original.
    let other = bookie.root().join("ledgers-other");
    std::fs::create_dir_all(&other).expect("create");
    bookie.set_ledger_dirs(vec![other.clone()]);
    refused(bookie.try_restart().await, "a different ledger directory");
    assert!(
        is_empty_dir(&other),
        "the refused bookie wrote into the new directory"
    );
    assert!(before == snapshot(), "a refused start changed the data");
    bookie.set_ledger_dirs(ledgers.clone());

    // (b) A wiped journal directory.
    let saved_journal = bookie.root().join("journal-saved");
    move_contents(&journal, &saved_journal);
    refused(bookie.try_restart().await, "a wiped journal directory");
    assert!(
        is_empty_dir(&journal),
        "the refused bookie wrote into the wiped journal dir"
    );
    move_contents(&saved_journal, &journal);
    assert!(before == snapshot(), "a refused start changed the data");

    // (c) A wiped ledger directory.
    let saved_ledgers = bookie.root().join("ledgers-saved");
    move_contents(&ledgers[0], &saved_ledgers);
    refused(bookie.try_restart().await, "a wiped ledger directory");
    assert!(
        is_empty_dir(&ledgers[0]),
        "the refused bookie wrote into the wiped ledger dir"
    );
    move_contents(&saved_ledgers, &ledgers[0]);
    assert!(before == snapshot(), "a refused start changed the data");

    // (d) Another bookie id on the same directories.
    bookie.set_bookie_id("someone-else");
    refused(bookie.try_restart().await, "another bookie id");
    assert!(before == snapshot(), "a refused start changed the data");
    bookie.set_bookie_id("test-cookie");

    // The original directories still work, with everything in them.
    bookie.restart().await;
    let mut client = bookie.client().await;
    for e in 0..10 {
        let r = read_entry(&mut client, 9, e)
            .await
            .expect("read after the refusals");
        assert!(r.body == body_for(seed, 9, e as u64, MAX_LEN));
        assert!(r.fenced);
    }
    let (code, _) = add_one(
        &mut client,
        add_entry(9, 10, KEY, body_for(seed, 9, 10, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::Fenced);
}

async fn write_lac(
    client: &mut Client,
    ledger_id: u64,
    lac: i64,
    body: Bytes,
) -> Result<(), RpcError> {
    rpc(client.write_lac(WriteLacRequest {
        ledger_id,
        master_key: Bytes::from_static(KEY),
        lac,
        body,
    }))
    .await
    .map(|_| ())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_restart_keeps_entries_fence_and_explicit_lac() {
    let mut bookie = BookieProcess::start(
        BookieOpts::new("sigterm")
            .ledger_dir_count(2)
            .config("[storage]\nflush_interval_ms = 600000\n"),
    )
    .await;
    let seed = seed();
    const MAX_LEN: usize = 2000;
    let mut client = bookie.client().await;
    let mut entries = Vec::new();
    for l in [20u64, 21] {
        for e in 0..50 {
            entries.push(add_entry(l, e, KEY, body_for(seed, l, e, MAX_LEN)));
        }
    }
    assert_all_ok(&add_all(&mut client, entries, 10).await);
    let lac_body = body(20, 49, 49, b"explicit lac");
    write_lac(&mut client, 20, 49, lac_body.clone())
        .await
        .expect("write lac");
    fence(&mut client, 21, KEY).await.expect("fence");

    let check = |when: &'static str, client: Client, lac20: i64, lac_body: Bytes, n20: u64| async move {
        let mut client = client;
        let lac = read_lac(&mut client, 20, -1, 0).await.expect("read lac");
        assert_eq!(lac.lac, lac20, "{when}: LAC of ledger 20");
        assert!(
            lac.explicit_lac_body == lac_body,
            "{when}: explicit LAC body"
        );
        assert!(
            lac.last_entry_body == body_for(seed, 20, n20 - 1, MAX_LEN),
            "{when}: last entry body"
        );
        let lac = read_lac(&mut client, 21, -1, 0).await.expect("read lac");
        assert_eq!(lac.lac, 48, "{when}: LAC of ledger 21");
        assert!(
            lac.explicit_lac_body.is_empty(),
            "{when}: no explicit LAC on 21"
        );
        for (l, n) in [(20u64, n20), (21, 50)] {
            for e in 0..n {
                let r = read_entry(&mut client, l, e as i64)
                    .await
                    .unwrap_or_else(|err| panic!("{when}: read {l}/{e}: {err:?}"));
                assert!(
                    r.body == body_for(seed, l, e, MAX_LEN),
                    "{when}: {l}/{e} differs"
                );
                assert_eq!(r.fenced, l == 21, "{when}: fenced flag of {l}");
            }
        }
        let (code, msg) = add_one(
            &mut client,
            add_entry(21, 50, KEY, body_for(seed, 21, 50, MAX_LEN)),
        )
        .await;
        assert_eq!(code, StatusCode::Fenced, "{when}: {msg}");
    };
    check("before restart", client.clone(), 49, lac_body.clone(), 50).await;

    bookie.terminate().await;
    bookie.restart().await;
    check(
        "after SIGTERM",
        bookie.client().await,
        49,
        lac_body.clone(),
        50,
    )
    .await;

    // More after the restart, then a crash: the journal written since the restart is replayed.
    let mut client = bookie.client().await;
    let entries = (50..60)
        .map(|e| add_entry(20, e, KEY, body_for(seed, 20, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 10).await);
    let lac_body2 = body(20, 70, 70, b"explicit lac, later");
    write_lac(&mut client, 20, 70, lac_body2.clone())
        .await
        .expect("write lac");
    bookie.kill9();
    bookie.restart().await;
    check(
        "after kill -9",
        bookie.client().await,
        70,
        lac_body2.clone(),
        60,
    )
    .await;
    bookie.terminate().await;
    bookie.restart().await;
    check(
        "after a second SIGTERM",
        bookie.client().await,
        70,
        lac_body2,
        60,
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_read_lac_wakes_on_progress_and_times_out_when_idle() {
    let bookie = BookieProcess::start(BookieOpts::new("longpoll")).await;
    let seed = seed();
    const MAX_LEN: usize = 200;
    let mut client = bookie.client().await;
    let entries = (0..5)
        .map(|e| add_entry(30, e, KEY, body_for(seed, 30, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 5).await);
    let now = read_lac(&mut client, 30, -1, 0).await.expect("read lac");
    assert_eq!(now.lac, 3);
    assert!(!now.timed_out);

    // A long poll at the current LAC returns once an entry carrying a higher LAC is added.
    let mut poller = client.clone();
    let poll = tokio::spawn(async move { read_lac(&mut poller, 30, 3, 5000).await });
    // Give the poll a moment to reach the bookie (its outcome does not depend on it).
    tokio::time::sleep(Duration::from_millis(200)).await;
    let (code, msg) = add_one(
        &mut client,
        add_entry(30, 5, KEY, body_for(seed, 30, 5, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::Ok, "{msg}");
    let got = tokio::time::timeout(WAIT, poll)
        .await
        .expect("poll")
        .expect("task")
        .expect("read lac");
    assert!(
        !got.timed_out,
        "the poll timed out although the LAC advanced"
    );
    assert_eq!(got.lac, 4);
    assert!(got.last_entry_body == body_for(seed, 30, 5, MAX_LEN));

    // An explicit LAC wakes a poll too.
    let mut poller = client.clone();
    let poll = tokio::spawn(async move { read_lac(&mut poller, 30, 4, 5000).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    write_lac(&mut client, 30, 5, body(30, 5, 5, b"lac"))
        .await
        .expect("write lac");
    let got = tokio::time::timeout(WAIT, poll)
        .await
        .expect("poll")
        .expect("task")
        .expect("read lac");
    assert!(!got.timed_out);
    assert_eq!(got.lac, 5);

    // An idle ledger: the poll ends by timeout, reporting no progress.
    let got = read_lac(&mut client, 30, 5, 300).await.expect("read lac");
    assert!(got.timed_out, "idle poll must time out");
    assert_eq!(got.lac, 5);

    // A poll on an unknown ledger fails at once.
    let err = read_lac(&mut client, 31, -1, 1000)
        .await
        .expect_err("unknown ledger");
    assert_eq!(err.code, StatusCode::NoSuchLedger);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_typed_errors_and_changes_nothing() {
    let bookie =
        BookieProcess::start(BookieOpts::new("badinput").config("entry_size_max_bytes = 4096\n"))
            .await;
    let seed = seed();
    let mut client = bookie.client().await;

    // Header ids that do not match the request.
    let (code, msg) = add_one(&mut client, add_entry(40, 0, KEY, body(40, 1, -1, b"x"))).await;
    assert_eq!(code, StatusCode::BadRequest, "entry id mismatch: {msg}");
    let (code, msg) = add_one(&mut client, add_entry(40, 0, KEY, body(41, 0, -1, b"x"))).await;
    assert_eq!(code, StatusCode::BadRequest, "ledger id mismatch: {msg}");
    // A body shorter than the header.
    let (code, msg) = add_one(
        &mut client,
        add_entry(40, 0, KEY, Bytes::from_static(b"short")),
    )
    .await;
    assert_eq!(code, StatusCode::BadRequest, "truncated body: {msg}");
    // Too large.
    let big = body(40, 0, -1, &payload(seed, 40, 0, 8192));
    let (code, msg) = add_one(&mut client, add_entry(40, 0, KEY, big)).await;
    assert_eq!(code, StatusCode::TooLarge, "8 KiB entry: {msg}");
    // A master key longer than a journal record can hold.
    let (code, msg) = add_one(
        &mut client,
        add_entry(40, 0, &[7u8; 65], body(40, 0, -1, b"x")),
    )
    .await;
    assert_eq!(code, StatusCode::BadRequest, "65-byte master key: {msg}");
    let err = fence(&mut client, 42, &[7u8; 65])
        .await
        .expect_err("long key fence");
    assert_eq!(err.code, StatusCode::BadRequest);
    // None of that created the ledger.
    let err = read_entry(&mut client, 40, 0)
        .await
        .expect_err("rejected entry stored");
    assert_eq!(err.code, StatusCode::NoSuchLedger, "{err:?}");
    let err = read_lac(&mut client, 42, -1, 0)
        .await
        .expect_err("rejected fence created ledger");
    assert_eq!(err.code, StatusCode::NoSuchLedger, "{err:?}");

    // Reads of things that do not exist, and nonsense ids.
    let err = read_entry(&mut client, 999, 0)
        .await
        .expect_err("unknown ledger");
    assert_eq!(err.code, StatusCode::NoSuchLedger);
    let err = read_entry(&mut client, 999, -1)
        .await
        .expect_err("unknown ledger, last");
    assert_eq!(err.code, StatusCode::NoSuchLedger);

    // A bad entry does not close the stream: good ones in the same request still succeed.
    let good = |e: u64| {
        add_entry(
            43,
            e,
            KEY,
            body(43, e, e as i64 - 1, &payload(seed, 43, e, 100)),
        )
    };
    let mut stream = AddStream::open(&mut client).await;
    assert!(
        stream
            .send(vec![
                good(0),
                add_entry(43, 1, KEY, body(43, 2, 0, b"mismatch")),
                add_entry(43, 1, KEY, body(43, 1, 0, &payload(seed, 43, 1, 5000))),
                good(1),
            ])
            .await
    );
    let mut results = Vec::new();
    while results.len() < 4 {
        let batch = stream.next().await.expect("stream").expect("stream open");
        results.extend(batch);
    }
    let mut codes: Vec<(u64, i32)> = results.iter().map(|r| (r.entry_id, r.code)).collect();
    codes.sort();
    let mut want = vec![
        (0, StatusCode::Ok as i32),
        (1, StatusCode::Ok as i32),
        (1, StatusCode::TooLarge as i32),
        (1, StatusCode::BadRequest as i32),
    ];
    want.sort();
    assert_eq!(codes, want, "per-entry results of a mixed request");
    assert!(
        stream.send(vec![good(2)]).await,
        "stream closed after bad entries"
    );
    let r = stream.next().await.expect("stream").expect("stream open");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].code, StatusCode::Ok as i32, "{}", r[0].message);
    drop(stream);

    // Existing ledger: missing entries, absurd ids.
    for e in [3, 1 << 32, i64::MAX] {
        let err = read_entry(&mut client, 43, e)
            .await
            .expect_err("missing entry");
        assert_eq!(err.code, StatusCode::NoSuchEntry, "entry {e}: {err:?}");
    }
    let err = read_entry(&mut client, 43, -7)
        .await
        .expect_err("negative entry id");
    assert_eq!(err.code, StatusCode::BadRequest, "{err:?}");
    // An entry id past what the index can hold.
    let huge = 1u64 << 40;
    let (code, msg) = add_one(
        &mut client,
        add_entry(43, huge, KEY, body(43, huge, -1, b"far away")),
    )
    .await;
    assert_eq!(code, StatusCode::BadRequest, "entry id 2^40: {msg}");
    // An oversized explicit LAC body.
    let err = write_lac(&mut client, 43, 2, Bytes::from(vec![0u8; 8192]))
        .await
        .expect_err("oversized LAC body");
    assert_eq!(err.code, StatusCode::TooLarge);

    // Still serving.
    for e in 0..3 {
        let r = read_entry(&mut client, 43, e).await.expect("read");
        assert!(r.body == body(43, e as u64, e - 1, &payload(seed, 43, e as u64, 100)));
    }
    let (http, _) = bookie.http_get("/health");
    assert_eq!(http, 200);
    let info = rpc(client.info(InfoRequest {})).await.expect("info");
    assert_eq!(info.state, BookieState::ReadWrite as i32);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_ledger_stays_deleted_and_gc_keeps_live_entries() {
    let mut bookie = BookieProcess::start(
        BookieOpts::new("delete")
            .config("[storage]\nflush_interval_ms = 100\ngc_interval_ms = 1\nentry_log_size_max_bytes = 65536\n"),
    )
    .await;
    let seed = seed();
    const MAX_LEN: usize = 2000;
    let mut client = bookie.client().await;
    let mut entries = Vec::new();
    for e in 0..100 {
        for l in [50u64, 51, 52] {
            entries.push(add_entry(l, e, KEY, body_for(seed, l, e, MAX_LEN)));
        }
    }
    assert_all_ok(&add_all(&mut client, entries, 6).await);
    rpc(client.delete_ledger(DeleteLedgerRequest { ledger_id: 50 }))
        .await
        .expect("delete");
    // Deleting twice is fine.
    rpc(client.delete_ledger(DeleteLedgerRequest { ledger_id: 50 }))
        .await
        .expect("delete again");
    let err = read_entry(&mut client, 50, 0)
        .await
        .expect_err("deleted ledger readable");
    assert_eq!(err.code, StatusCode::NoSuchLedger);

    let checkpoints = |b: &BookieProcess| b.metric("quire_bookie_checkpoints_total").unwrap_or(0.0);
    let start = checkpoints(&bookie);
    wait_until(WAIT, "checkpoint and GC passes", || {
        let n = checkpoints(&bookie);
        async move { n >= start + 3.0 }
    })
    .await;
    verify_ledgers(
        &client,
        seed,
        &[51, 52],
        100,
        MAX_LEN,
        "after deleting 50 and GC",
    )
    .await;

    bookie.terminate().await;
    bookie.restart().await;
    let mut client = bookie.client().await;
    let err = read_entry(&mut client, 50, 0)
        .await
        .expect_err("deleted ledger back after restart");
    assert_eq!(err.code, StatusCode::NoSuchLedger);
    verify_ledgers(
        &client,
        seed,
        &[51, 52],
        100,
        MAX_LEN,
        "after SIGTERM restart",
    )
    .await;

    // A delete that only the journal knows about survives a crash.
    rpc(client.delete_ledger(DeleteLedgerRequest { ledger_id: 51 }))
        .await
        .expect("delete");
    bookie.kill9();
    bookie.restart().await;
    let mut client = bookie.client().await;
    for l in [50u64, 51] {
        let err = read_entry(&mut client, l, 0)
            .await
            .expect_err("deleted ledger back after crash");
        assert_eq!(err.code, StatusCode::NoSuchLedger);
    }
    let start = checkpoints(&bookie);
    wait_until(WAIT, "checkpoint and GC passes", || {
        let n = checkpoints(&bookie);
        async move { n >= start + 3.0 }
    })
    .await;
    verify_ledgers(
        &client,
        seed,
        &[52],
        100,
        MAX_LEN,
        "after deleting 51, crash and GC",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_adds() {
    let bookie = BookieProcess::start(BookieOpts::new("metrics")).await;
    let seed = seed();
    let mut client = bookie.client().await;
    let entries = (0..25)
        .map(|e| add_entry(60, e, KEY, body_for(seed, 60, e, 100)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 5).await);
    assert_eq!(bookie.metric("quire_bookie_adds_total"), Some(25.0));
    let (code, _) = add_one(
        &mut client,
        add_entry(60, 25, b"wrong", body_for(seed, 60, 25, 100)),
    )
    .await;
    assert_eq!(code, StatusCode::Unauthorized);
    assert_eq!(bookie.metric("quire_bookie_adds_total"), Some(25.0));
    assert_eq!(bookie.metric("quire_bookie_add_errors_total"), Some(1.0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn explicit_lac_never_goes_back_across_kill9() {
    // Only the start-up checkpoint: the explicit LACs live in the journal alone.
    let mut bookie = BookieProcess::start(
        BookieOpts::new("explicit-lac").config("[storage]\nflush_interval_ms = 600000\n"),
    )
    .await;
    let seed = seed();
    let mut client = bookie.client().await;
    let entries = (0..10)
        .map(|e| add_entry(80, e, KEY, body_for(seed, 80, e, 100)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 10).await);
    let newer = body(80, 9, 9, b"explicit lac 9");
    let older = body(80, 5, 5, b"explicit lac 5, arriving late");
    write_lac(&mut client, 80, 9, newer.clone())
        .await
        .expect("write lac 9");
    write_lac(&mut client, 80, 5, older)
        .await
        .expect("write lac 5");
    let before = read_lac(&mut client, 80, -1, 0).await.expect("read lac");
    assert_eq!(before.lac, 9);
    assert!(
        before.explicit_lac_body == newer,
        "a lower explicit LAC replaced a higher one"
    );

    bookie.kill9();
    bookie.restart().await;
    let mut client = bookie.client().await;
    let after = read_lac(&mut client, 80, -1, 0).await.expect("read lac");
    assert_eq!(after.lac, 9, "LAC went back across a crash");
    assert!(
        after.explicit_lac_body == newer,
        "explicit LAC body went back across a crash: {:?}",
        quire_proto::entry::peek_header(&after.explicit_lac_body)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fence_during_a_stream_cuts_it_cleanly() {
    let mut bookie = BookieProcess::start(
        BookieOpts::new("fence-race").config("[storage]\nflush_interval_ms = 200\n"),
    )
    .await;
    let seed = seed();
    const MAX_LEN: usize = 500;
    const L: u64 = 90;
    let progress = Arc::new(Progress::default());
    let writer = tokio::spawn(write_until_cut_off(
        bookie.client().await,
        seed,
        vec![L],
        HashMap::new(),
        progress.clone(),
        MAX_LEN,
    ));
    wait_until(
        Duration::from_secs(60),
        "entries to be acknowledged",
        || {
            let n = progress.acked();
            async move { n >= 500 }
        },
    )
    .await;
    let mut client = bookie.client().await;
    let (_, last) = fence(&mut client, L, KEY).await.expect("fence");
    assert!(
        last >= 499,
        "fence reports last entry {last} below what was acknowledged"
    );
    // Let the writer run into the fence, then end its stream with a crash.
    wait_until(
        Duration::from_secs(60),
        "adds after the fence to be refused",
        || {
            let n = progress.failed();
            async move { n > 0 }
        },
    )
    .await;
    let mut stream_client = bookie.client().await;
    let (code, msg) = add_one(
        &mut stream_client,
        add_entry(L, 1_000_000, KEY, body_for(seed, L, 1_000_000, MAX_LEN)),
    )
    .await;
    assert_eq!(code, StatusCode::Fenced, "{msg}");
    bookie.kill9();
    let cut = tokio::time::timeout(WAIT, writer)
        .await
        .expect("writer")
        .expect("writer task");
    let max_ok = cut.acked.iter().map(|&(_, e)| e as i64).max().unwrap_or(-1);
    assert!(
        max_ok <= last,
        "entry {max_ok} acknowledged although the fence saw only {last}"
    );
    assert!(!cut.failed.is_empty(), "the writer never hit the fence");
    for ((_, e), code, msg) in &cut.failed {
        assert_eq!(*code, StatusCode::Fenced, "entry {e}: {msg}");
        assert!(
            *e as i64 > last,
            "entry {e} refused although the fence counted it"
        );
    }

    bookie.restart().await;
    let mut client = bookie.client().await;
    for e in 0..=last as u64 {
        let r = read_entry(&mut client, L, e as i64)
            .await
            .unwrap_or_else(|err| panic!("entry {e} (<= fence's last {last}) lost: {err:?}"));
        assert!(r.body == body_for(seed, L, e, MAX_LEN), "entry {e} differs");
        assert!(r.fenced);
    }
    for ((_, e), _, _) in &cut.failed {
        let err = read_entry(&mut client, L, *e as i64)
            .await
            .expect_err("fenced add stored");
        assert_eq!(err.code, StatusCode::NoSuchEntry);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn entries_up_to_the_size_limit_round_trip() {
    let mut bookie = BookieProcess::start(BookieOpts::new("large").config(
        "entry_size_max_bytes = 4194304\n[storage]\nflush_interval_ms = 200\n\
         entry_log_size_max_bytes = 6291456\n",
    ))
    .await;
    let seed = seed();
    const MAX: usize = 4 << 20;
    let sizes = [0usize, 1, 511 << 10, 513 << 10, 1 << 20, 3 << 20, MAX - 36];
    let mut client = bookie.client().await;
    let make = |i: usize| {
        body(
            100,
            i as u64,
            i as i64 - 1,
            &payload(seed, 100, i as u64, sizes[i]),
        )
    };
    let entries = (0..sizes.len())
        .map(|i| add_entry(100, i as u64, KEY, make(i)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 2).await);
    let over = body(100, 99, -1, &payload(seed, 100, 99, MAX - 35));
    let (code, msg) = add_one(&mut client, add_entry(100, 99, KEY, over)).await;
    assert_eq!(code, StatusCode::TooLarge, "one byte over the limit: {msg}");

    for stop in [Stop::Term, Stop::Kill9] {
        for (i, size) in sizes.iter().enumerate() {
            let r = read_entry(&mut client, 100, i as i64)
                .await
                .expect("read large entry");
            assert!(
                r.body == make(i),
                "entry {i} of {size} bytes differs ({stop:?})"
            );
        }
        match stop {
            Stop::Term => bookie.terminate().await,
            Stop::Kill9 => bookie.kill9(),
        }
        bookie.restart().await;
        client = bookie.client().await;
    }
    for (i, size) in sizes.iter().enumerate() {
        let r = read_entry(&mut client, 100, i as i64)
            .await
            .expect("read large entry");
        assert!(
            r.body == make(i),
            "entry {i} of {size} bytes differs at the end"
        );
    }
}

/// The end of the written part of a journal file (it is preallocated with zeros).
fn journal_data_end(file: &Path) -> usize {
    let data = std::fs::read(file).expect("read journal");
    data.iter()
        .rposition(|b| *b != 0)
        .expect("journal has data")
        + 1
}

/// Writes entries 0..30 of ledger `l` (one per request, in order) to a bookie that only
/// checkpoints at start-up, then kills it with SIGKILL: the entries live in the journal alone.
async fn thirty_entries_only_in_the_journal(
    name: &str,
    l: u64,
    max_len: usize,
) -> (BookieProcess, u64) {
    let mut bookie = BookieProcess::start(
        BookieOpts::new(name).config("[storage]\nflush_interval_ms = 600000\n"),
    )
    .await;
    let seed = seed();
    let mut client = bookie.client().await;
    let entries = (0..30)
        .map(|e| add_entry(l, e, KEY, body_for(seed, l, e, max_len)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 1).await);
    bookie.kill9();
    (bookie, seed)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn torn_journal_tail_is_cut_off_not_served() {
    const MAX_LEN: usize = 700;
    const L: u64 = 110;
    let (mut bookie, seed) = thirty_entries_only_in_the_journal("torn-journal", L, MAX_LEN).await;

    // Tear the last record: damage its final byte, as a write cut short would.
    let mut files: Vec<PathBuf> = std::fs::read_dir(bookie.journal_dir())
        .expect("journal dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "jnl"))
        .collect();
    files.sort();
    let newest = files.last().expect("a journal file").clone();
    let end = journal_data_end(&newest);
    flip_byte(&newest, end - 1);

    bookie.restart().await;
    let mut client = bookie.client().await;
    for e in 0..29 {
        let r = read_entry(&mut client, L, e as i64)
            .await
            .unwrap_or_else(|err| panic!("entry {e} before the torn record lost: {err:?}"));
        assert!(r.body == body_for(seed, L, e, MAX_LEN), "entry {e} differs");
    }
    let err = read_entry(&mut client, L, 29)
        .await
        .expect_err("torn record served");
    assert_eq!(err.code, StatusCode::NoSuchEntry, "{err:?}");
    let last = read_entry(&mut client, L, -1).await.expect("read last");
    assert_eq!(last.entry_id, 28);

    // The writer can carry on, and all of it survives another crash.
    let entries = (29..40)
        .map(|e| add_entry(L, e, KEY, body_for(seed, L, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 1).await);
    bookie.kill9();
    bookie.restart().await;
    let client = bookie.client().await;
    verify_ledgers(
        &client,
        seed,
        &[L],
        40,
        MAX_LEN,
        "after the torn tail and another crash",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn corrupt_record_inside_the_journal_is_not_silently_truncated() {
    const MAX_LEN: usize = 700;
    const L: u64 = 120;
    let (mut bookie, seed) = thirty_entries_only_in_the_journal("journal-bitrot", L, MAX_LEN).await;

    // Rot one payload byte of entry 10; the records of entries 11..29 after it stay intact.
    let mut hits = Vec::new();
    let target = body_for(seed, L, 10, MAX_LEN);
    for e in std::fs::read_dir(bookie.journal_dir()).expect("journal dir") {
        let p = e.expect("dir entry").path();
        if p.extension().is_some_and(|x| x == "jnl") {
            let data = std::fs::read(&p).expect("read journal");
            if let Some(i) = data
                .windows(target.len())
                .position(|w| w == target.as_ref())
            {
                hits.push((p, i));
            }
        }
    }
    assert_eq!(hits.len(), 1, "entry 10 in the journal: {hits:?}");
    let (file, at) = hits.pop().expect("one hit");
    flip_byte(&file, at + target.len() - 1);

    match bookie.try_restart().await {
        Err(f) => {
            // Refusing to start is a fine answer, if it says why and keeps the evidence.
            assert!(
                f.stderr.to_lowercase().contains("corrupt"),
                "refused to start without naming the corruption: {f}"
            );
            assert!(file.exists(), "the damaged journal file was removed");
        }
        Ok(()) => {
            // Serving is fine too, but no acknowledged record after the damage may vanish.
            let mut client = bookie.client().await;
            for e in 11..30 {
                match read_entry(&mut client, L, e as i64).await {
                    Ok(r) => assert!(r.body == body_for(seed, L, e, MAX_LEN), "entry {e} differs"),
                    Err(err) => panic!(
                        "acknowledged entry {e}, journaled intact after a damaged record, is \
                         gone: {err:?}"
                    ),
                }
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crash_while_creating_an_entry_log_does_not_prevent_restart() {
    let mut bookie = BookieProcess::start(
        BookieOpts::new("empty-log").config("[storage]\nflush_interval_ms = 100\n"),
    )
    .await;
    let seed = seed();
    const MAX_LEN: usize = 1000;
    const L: u64 = 130;
    let mut client = bookie.client().await;
    let entries = (0..50)
        .map(|e| add_entry(L, e, KEY, body_for(seed, L, e, MAX_LEN)))
        .collect();
    assert_all_ok(&add_all(&mut client, entries, 10).await);
    let logs = bookie.ledger_dirs()[0].join("logs");
    let log_ids = |logs: &Path| -> Vec<u32> {
        std::fs::read_dir(logs)
            .expect("logs dir")
            .filter_map(|e| {
                let name = e.expect("dir entry").file_name();
                let name = name.to_string_lossy();
                u32::from_str_radix(name.strip_suffix(".log")?, 16).ok()
            })
            .collect()
    };
    wait_until(WAIT, "a checkpoint to write an entry log", || {
        let n = log_ids(&logs).len();
        async move { n > 0 }
    })
    .await;
    bookie.kill9();
    // The state a kill leaves between `create_new` of the next log and its header write.
    let next = log_ids(&logs).into_iter().max().expect("a log") + 1;
    std::fs::File::create(logs.join(format!("{next:08x}.log"))).expect("create empty log");

    if let Err(f) = bookie.try_restart().await {
        panic!("a bookie that crashed while creating an entry log cannot restart: {f}");
    }
    let client = bookie.client().await;
    verify_ledgers(&client, seed, &[L], 50, MAX_LEN, "after the crash").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn add_streams_beyond_the_limit_are_refused_and_freed_on_close() {
    let bookie =
        BookieProcess::start(BookieOpts::new("stream-limit").config("add_streams_max = 2\n")).await;
    let seed = seed();
    let mut client = bookie.client().await;
    let mut a = AddStream::open(&mut client).await;
    let b = AddStream::open(&mut client).await;
    // Each stream is really open on the bookie once an add on it has been answered.
    assert!(
        a.send(vec![add_entry(1, 0, KEY, body_for(seed, 1, 0, 100))])
            .await
    );
    let first = a.next().await.expect("result").expect("open");
    assert_eq!(code(&first[0]), StatusCode::Ok);
    assert!(
        b.send(vec![add_entry(2, 0, KEY, body_for(seed, 2, 0, 100))])
            .await
    );
    let mut b = b;
    let first = b.next().await.expect("result").expect("open");
    assert_eq!(code(&first[0]), StatusCode::Ok);

    let (tx, rx) = tokio::sync::mpsc::channel::<AddRequest>(1);
    let err = rpc(client.add(tokio_stream::wrappers::ReceiverStream::new(rx)))
        .await
        .expect_err("a third stream is refused");
    assert_eq!(err.code, StatusCode::TooManyRequests, "{err:?}");
    drop(tx);

    // Closing one frees its slot.
    a.finish();
    assert!(a.next().await.expect("clean end").is_none());
    let mut c = AddStream::open(&mut client).await;
    assert!(
        c.send(vec![add_entry(3, 0, KEY, body_for(seed, 3, 0, 100))])
            .await
    );
    let r = c.next().await.expect("result").expect("open");
    assert_eq!(code(&r[0]), StatusCode::Ok);
}
