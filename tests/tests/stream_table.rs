//! Streams and tables with real processes (DESIGN.md §6): a `quire metadata` node, three
//! `quire bookie` processes and two `quire stream-table` servers (2 s sessions), driven through
//! the Rust client; faults are kill -9 of the server that writes the stream or owns the range.
//!
//! - A stream's writer killed mid-append: the other server takes over (fencing and sealing the
//!   last segment); every acknowledged record is there, in order, once, with contiguous offsets;
//!   a tail reader crosses the rollovers and the takeover; truncation removes whole segments.
//! - A table range's owner killed under load: the other server restores checkpoint + changelog;
//!   every acknowledged put is visible, counters are within what was acknowledged and what was
//!   in doubt, and no two-key transaction is half applied.
//! - Racing transactions through both servers: exactly one winner.
//!
//! Every wait is bounded; nothing asserts how long anything took.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use parking_lot::Mutex;
use quire_stream_table::client::Client;
use quire_stream_table::stream::StreamConfig;
use quire_stream_table::table::{
    Compare, CompareOp, CompareTarget, TableConfig, Txn, TxnOp, Value, range_of,
};
use quire_stream_table::{Error, Name};
use quire_tests::*;

/// Longest a whole test may take.
const TEST_LIMIT: Duration = Duration::from_secs(240);
/// Longest wait for one step.
const WAIT: Duration = Duration::from_secs(60);

async fn bounded(name: &str, body: impl Future<Output = ()>) {
    if tokio::time::timeout(TEST_LIMIT, body).await.is_err() {
        panic!("{name}: did not finish within {TEST_LIMIT:?}");
    }
}

struct Cluster {
    servers: Vec<StreamTableProcess>,
    /// The servers' addresses (kept after a kill, as a client would).
    addrs: Vec<String>,
    _bookies: Vec<BookieProcess>,
    // Dropped last.
    _meta: MetadataCluster,
}

impl Cluster {
    async fn start(name: &str) -> Cluster {
        let meta = MetadataCluster::start(1).await;
        let uri = meta.uri();
        let store = meta.store().await;
        let args: Vec<String> = vec![
            "--metadata".into(),
            uri.clone(),
            "--session-timeout-ms".into(),
            "2000".into(),
            "--no-autorecovery".into(),
        ];
        let bookies =
            futures::future::join_all((0..3).map(|i| {
                BookieProcess::start(BookieOpts::new(&format!("{name}-{i}")).args(&args))
            }))
            .await;
        for b in &bookies {
            wait_bookie_registered(&store, b, WAIT).await;
        }
        let mut servers = Vec::new();
        for id in ["st-a", "st-b"] {
            servers.push(StreamTableProcess::start(id, &uri, &["--session-timeout", "2s"]).await);
        }
        Cluster {
            addrs: servers.iter().map(|s| s.addr().to_string()).collect(),
            servers,
            _bookies: bookies,
            _meta: meta,
        }
    }

    fn addr(&self, i: usize) -> String {
        self.addrs[i].clone()
    }

    async fn client(&self, order: &[usize]) -> Client {
        Client::connect(order.iter().map(|&i| self.addr(i)).collect())
            .await
            .unwrap()
            .with_timeout(WAIT)
    }
}

fn n(s: &str) -> Name {
    s.parse().unwrap()
}

fn record(i: u64) -> Bytes {
    Bytes::from(format!("record-{i:06}"))
}

fn number_of(p: &[u8]) -> u64 {
    std::str::from_utf8(p)
        .ok()
        .and_then(|s| s.strip_prefix("record-"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("unexpected payload {p:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_writer_killed_and_taken_over() {
    bounded("stream_writer_killed_and_taken_over", async {
        let mut c = Cluster::start("stw").await;
        let via_a = c.client(&[0, 1]).await;
        let s = via_a.stream(n("app/log"));
        s.create(StreamConfig {
            segment_max_entries: 40,
            ..Default::default()
        })
        .await
        .unwrap();

        // A tail through server B, from the start.
        let via_b = c.client(&[1]).await;
        let tailed = Arc::new(Mutex::new(Vec::new()));
        let tail_task = {
            let tailed = tailed.clone();
            let mut tail = Box::pin(via_b.stream(n("app/log")).tail(0));
            tokio::spawn(async move {
                while let Some(r) = tail.next().await {
                    let r = r.expect("tail");
                    tailed.lock().push((r.offset, r.payload));
                }
            })
        };

        // Phase 1: server A writes (it takes the lease with the first append).
        let mut acked: BTreeMap<u64, u64> = BTreeMap::new(); // offset -> record number
        let mut unknown: BTreeSet<u64> = BTreeSet::new();
        let mut appender = s.appender().await.unwrap();
        let mut next = 0u64;
        let mut in_flight = std::collections::VecDeque::new();
        while acked.len() < 300 {
            while in_flight.len() < 32 {
                appender.send(record(next)).await.unwrap();
                in_flight.push_back(next);
                next += 1;
            }
            let off = appender.next_offset().await.unwrap();
            acked.insert(off, in_flight.pop_front().unwrap());
        }
        let info = s.info().await.unwrap();
        assert_eq!(info.writer.as_ref().map(|w| w.id.as_str()), Some("st-a"));
        c.servers[0].kill9();
        // The records in flight at the kill: outcome unknown, never re-sent.
        while let Some(r) = in_flight.pop_front() {
            match appender.next_offset().await {
                Ok(off) => {
                    acked.insert(off, r);
                }
                Err(_) => {
                    unknown.insert(r);
                    unknown.extend(in_flight.drain(..));
                }
            }
        }

        // Phase 2: the client reaches B, which takes over once A's lease has expired.
        let via_b2 = c.client(&[0, 1]).await;
        let s2 = via_b2.stream(n("app/log"));
        let mut phase2 = Vec::new();
        for _ in 0..100 {
            let off = s2
                .append(record(next))
                .await
                .expect("append after the takeover");
            acked.insert(off, next);
            phase2.push(off);
            next += 1;
        }
        assert!(phase2.windows(2).all(|w| w[1] == w[0] + 1), "{phase2:?}");
        let info = s2.info().await.unwrap();
        assert_eq!(info.writer.as_ref().map(|w| w.id.as_str()), Some("st-b"));

        // Everything from 0: contiguous, every acknowledged record at its offset, no repeats.
        // Readers see confirmed records only: the last ones show once the writer's LAC goes out.
        let last_acked = *acked.keys().next_back().unwrap();
        let deadline = std::time::Instant::now() + WAIT;
        let all = loop {
            let all = s2.read(0, 0).await.unwrap();
            if all.len() as u64 > last_acked {
                break all;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "offset {last_acked} never readable"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        let offsets: Vec<u64> = all.iter().map(|r| r.offset).collect();
        assert_eq!(offsets, (0..all.len() as u64).collect::<Vec<_>>());
        let mut seen = BTreeSet::new();
        for r in &all {
            let num = number_of(&r.payload);
            assert!(seen.insert(num), "record {num} appears twice");
            if let Some(want) = acked.get(&r.offset) {
                assert_eq!(*want, num, "offset {}", r.offset);
            } else {
                assert!(
                    unknown.contains(&num),
                    "record {num} was never sent or was acked elsewhere"
                );
            }
        }
        for (off, num) in &acked {
            assert!(
                (*off as usize) < all.len(),
                "acked record {num} at {off} is missing"
            );
        }
        // Acknowledged records of each phase are in send order.
        let nums: Vec<u64> = all.iter().map(|r| number_of(&r.payload)).collect();
        let acked_nums: Vec<u64> = nums
            .iter()
            .copied()
            .filter(|x| !unknown.contains(x))
            .collect();
        assert!(acked_nums.windows(2).all(|w| w[0] < w[1]));

        // The tail saw the same sequence, across the rollovers and the takeover.
        let end = all.len();
        let deadline = std::time::Instant::now() + WAIT;
        while tailed.lock().len() < end {
            assert!(
                std::time::Instant::now() < deadline,
                "the tail is stuck at {}",
                tailed.lock().len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        {
            let t = tailed.lock();
            for (i, (off, p)) in t.iter().take(end).enumerate() {
                assert_eq!(*off, i as u64);
                assert_eq!(p, &all[i].payload);
            }
        }
        tail_task.abort();
        assert!(info.segments.len() > 5, "{} segments", info.segments.len());

        // Truncation removes whole segments only.
        let start = s2.truncate(150).await.unwrap();
        let info = s2.info().await.unwrap();
        assert_eq!(info.start_offset, start);
        assert!(start <= 150 && start > 0);
        assert_eq!(info.segments.first().map(|s| s.start_offset), Some(start));
        assert!(matches!(s2.read(0, 1).await, Err(Error::Truncated { .. })));
        assert_eq!(
            s2.read(start, 1).await.unwrap()[0].payload,
            all[start as usize].payload
        );
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn table_owner_killed_under_load() {
    bounded("table_owner_killed_under_load", async {
        let mut c = Cluster::start("tbl").await;
        let client = c.client(&[0, 1]).await;
        let t = client.table(n("app/state"));
        t.create(TableConfig {
            ranges: 2,
            checkpoint_every: 200,
            ..Default::default()
        })
        .await
        .unwrap();
        t.put("warm", Value::Number(0)).await.unwrap();

        #[derive(Default)]
        struct Log {
            puts: BTreeMap<String, String>,
            /// Puts that failed: they may or may not have been applied.
            put_doubt: BTreeSet<String>,
            incr_acked: BTreeMap<String, i64>,
            incr_doubt: BTreeMap<String, i64>,
            txns: Vec<(String, String)>,
        }
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for task in 0..8u64 {
            let (t, log, stop) = (client.table(n("app/state")), log.clone(), stop.clone());
            tasks.push(tokio::spawn(async move {
                let mut i = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    let key = format!("k-{task}-{i}");
                    let val = format!("v-{task}-{i}");
                    match t
                        .put(key.clone(), Value::Bytes(Bytes::from(val.clone())))
                        .await
                    {
                        Ok(_) => {
                            log.lock().puts.insert(key, val);
                        }
                        Err(_) => {
                            log.lock().put_doubt.insert(key);
                        }
                    }
                    let counter = format!("c-{}", i % 3);
                    match t.increment(counter.clone(), 1).await {
                        Ok(_) => *log.lock().incr_acked.entry(counter).or_default() += 1,
                        Err(_) => *log.lock().incr_doubt.entry(counter).or_default() += 1,
                    }
                    // A pair of keys in one range, written together.
                    let a = format!("t-{task}-{i}-a");
                    let mut j = 0u32;
                    let bkey = loop {
                        let k = format!("t-{task}-{i}-b{j}");
                        if range_of(k.as_bytes(), 2) == range_of(a.as_bytes(), 2) {
                            break k;
                        }
                        j += 1;
                    };
                    let txn = Txn {
                        compares: vec![Compare {
                            key: Bytes::from(a.clone()),
                            target: CompareTarget::Exists(false),
                            op: CompareOp::Equal,
                        }],
                        success: vec![
                            TxnOp::Put {
                                key: Bytes::from(a.clone()),
                                value: Value::Number(1),
                            },
                            TxnOp::Put {
                                key: Bytes::from(bkey.clone()),
                                value: Value::Number(2),
                            },
                        ],
                        failure: vec![],
                    };
                    let _ = t.txn(txn).await;
                    log.lock().txns.push((a, bkey));
                    i += 1;
                }
            }));
        }
        // Let the load run, then kill the server that owns the ranges.
        let deadline = std::time::Instant::now() + WAIT;
        while log.lock().puts.len() < 400 {
            assert!(std::time::Instant::now() < deadline, "the load is stuck");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        c.servers[0].kill9();
        let before = log.lock().puts.len();
        let deadline = std::time::Instant::now() + WAIT;
        while log.lock().puts.len() < before + 400 {
            assert!(
                std::time::Instant::now() < deadline,
                "no progress after the kill"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        stop.store(true, Ordering::Relaxed);
        for task in tasks {
            task.await.unwrap();
        }

        let check = c.client(&[1]).await.table(n("app/state"));
        let log = std::mem::take(&mut *log.lock());
        for (k, v) in &log.puts {
            let kv = check
                .get(k.clone())
                .await
                .unwrap()
                .unwrap_or_else(|| panic!("{k} is lost"));
            assert_eq!(kv.value, Value::Bytes(Bytes::from(v.clone())), "{k}");
        }
        for (counter, acked) in &log.incr_acked {
            let doubt = log.incr_doubt.get(counter).copied().unwrap_or(0);
            let got = match check.get(counter.clone()).await.unwrap() {
                Some(kv) => match kv.value {
                    Value::Number(x) => x,
                    other => panic!("{counter} holds {other:?}"),
                },
                None => 0,
            };
            assert!(
                got >= *acked && got <= acked + doubt,
                "{counter}: {got} not in {acked}..={}",
                acked + doubt
            );
        }
        for (a, b) in &log.txns {
            let ka = check.get(a.clone()).await.unwrap();
            let kb = check.get(b.clone()).await.unwrap();
            assert_eq!(ka.is_some(), kb.is_some(), "txn {a}/{b} half applied");
        }
        // Every key reads back through a table-wide scan as well.
        let (page, _) = check
            .scan(
                Bytes::from_static(b"k-"),
                Some(Bytes::from_static(b"k-~")),
                10_000,
            )
            .await
            .unwrap();
        // ... and a key there was either acknowledged or in doubt (never invented).
        let scanned: BTreeSet<String> = page
            .iter()
            .map(|kv| String::from_utf8_lossy(&kv.key).into_owned())
            .collect();
        for k in log.puts.keys() {
            assert!(scanned.contains(k), "{k} missing from the scan");
        }
        for k in &scanned {
            assert!(
                log.puts.contains_key(k) || log.put_doubt.contains(k),
                "{k} was never written"
            );
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_txns_have_one_winner() {
    bounded("racing_txns_have_one_winner", async {
        let c = Cluster::start("race").await;
        let first = c.client(&[0]).await;
        first
            .table(n("app/locks"))
            .create(TableConfig::default())
            .await
            .unwrap();
        let mut tasks = Vec::new();
        for round in 0..3 {
            for task in 0..10u64 {
                let client = c.client(&[(task % 2) as usize]).await;
                tasks.push(tokio::spawn(async move {
                    let t = client.table(n("app/locks"));
                    let key = Bytes::from(format!("lock-{round}"));
                    let txn = Txn {
                        compares: vec![Compare {
                            key: key.clone(),
                            target: CompareTarget::Version(0),
                            op: CompareOp::Equal,
                        }],
                        success: vec![TxnOp::Put {
                            key,
                            value: Value::Number(task as i64),
                        }],
                        failure: vec![],
                    };
                    (round, task, t.txn(txn).await.unwrap().succeeded)
                }));
            }
        }
        let mut winners: BTreeMap<u32, Vec<u64>> = BTreeMap::new();
        for t in tasks {
            let (round, task, won) = t.await.unwrap();
            if won {
                winners.entry(round).or_default().push(task);
            }
        }
        let t = first.table(n("app/locks"));
        for round in 0..3u32 {
            let w = winners.get(&round).cloned().unwrap_or_default();
            assert_eq!(w.len(), 1, "round {round}: winners {w:?}");
            let kv = t.get(format!("lock-{round}")).await.unwrap().unwrap();
            assert_eq!(kv.value, Value::Number(w[0] as i64));
            assert_eq!(kv.version, 1);
        }
    })
    .await;
}
