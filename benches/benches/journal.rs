//! Journal group commit.
//!
//! - `journal_add/fsync=<bool>/single/size=<n>`: one add record written and awaited at a time,
//!   so each iteration is one whole group commit (write, then fdatasync when fsync is on).
//! - `journal_add/fsync=<bool>/batch=64/size=<n>`: 64 records submitted back to back, then all
//!   awaited: how well concurrent submissions share commits.
//!
//! The backend is the default (`auto`: io_uring when the kernel allows it); set
//! `QUIRE_BENCH_JOURNAL_IO=plain` or `io_uring` to pick one. The backend in use is printed.
//!
//! Each case gets a fresh journal in its own temporary directory; files the journal has rotated
//! away from are deleted between samples so that `fsync=false` runs do not fill the disk.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quire_bookie::config::{JournalConfig, JournalIoKind};
use quire_bookie::journal::{Journal, Record};
use quire_bookie::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

const SIZE_BYTES: usize = 1024;
const BATCH: usize = 64;

/// A journal in a temporary directory and the records to feed it.
struct Fixture {
    journal: Journal,
    body: Bytes,
    master_key: Bytes,
    next_entry: u64,
    // Declared last: the journal must stop before its directory goes.
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(sync: bool, size: usize, io: JournalIoKind) -> Fixture {
        let dir = tempfile::tempdir().expect("create journal directory");
        let cfg = JournalConfig {
            dir: dir.path().into(),
            io,
            sync,
            ..JournalConfig::default()
        };
        let journal = Journal::start(&cfg, 1, Arc::new(Metrics::new())).expect("start the journal");
        eprintln!("journal I/O backend: {}", journal.io_name());
        Fixture {
            journal,
            body: Bytes::from(vec![0x5a; size]),
            master_key: Bytes::from_static(b"quire-bench-master-key"),
            next_entry: 0,
            _dir: dir,
        }
    }

    fn record(&mut self) -> Record {
        let entry_id = self.next_entry;
        self.next_entry += 1;
        Record::Add {
            ledger_id: 1,
            entry_id,
            master_key: self.master_key.clone(),
            body: self.body.clone(),
        }
    }

    /// Deletes the files the journal has moved past (outside the timed part).
    fn trim(&self) {
        self.journal
            .remove_files_before(self.journal.written_mark())
            .expect("remove old journal files");
    }
}

/// Submits `records` one submission each, without waiting in between, then waits for all.
async fn write_concurrently(journal: &Journal, records: Vec<Record>) {
    let n = records.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    for r in records {
        let reservation = journal
            .reserve(r.frame_len())
            .await
            .expect("journal queue room");
        let tx = tx.clone();
        journal.submit(
            reservation,
            std::slice::from_ref(&r),
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
    }
    for _ in 0..n {
        rx.recv()
            .await
            .expect("every callback runs")
            .expect("journal write");
    }
}

/// The journal backend: `QUIRE_BENCH_JOURNAL_IO=auto|io_uring|plain`. Default: auto.
fn io_kind() -> JournalIoKind {
    match std::env::var("QUIRE_BENCH_JOURNAL_IO").as_deref() {
        Err(_) | Ok("" | "auto") => JournalIoKind::Auto,
        Ok("io_uring") => JournalIoKind::IoUring,
        Ok("plain") => JournalIoKind::Plain,
        Ok(other) => panic!("QUIRE_BENCH_JOURNAL_IO={other:?}: use auto, io_uring or plain"),
    }
}

fn journal_add(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let io = io_kind();
    let mut group = c.benchmark_group("journal_add");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));
    for sync in [true, false] {
        let size = SIZE_BYTES;

        // Criterion calls a bench closure once per sample, so fixtures live outside it, made on
        // first use (a case that the filter skips costs nothing).
        let mut fixture = None;
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(format!("fsync={sync}/single/size={size}"), |b| {
            let f = fixture.get_or_insert_with(|| Fixture::new(sync, size, io));
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let r = f.record();
                        f.journal.write(vec![r]).await.expect("journal write");
                    }
                    start.elapsed()
                });
                f.trim();
                elapsed
            });
        });
        drop(fixture);

        let mut fixture = None;
        group.throughput(Throughput::Bytes((BATCH * size) as u64));
        group.bench_function(format!("fsync={sync}/batch={BATCH}/size={size}"), |b| {
            let f = fixture.get_or_insert_with(|| Fixture::new(sync, size, io));
            b.iter_custom(|iters| {
                let elapsed = rt.block_on(async {
                    let start = Instant::now();
                    for _ in 0..iters {
                        let records = (0..BATCH).map(|_| f.record()).collect();
                        write_concurrently(&f.journal, records).await;
                    }
                    start.elapsed()
                });
                f.trim();
                elapsed
            });
        });
    }
    group.finish();
}

criterion_group!(benches, journal_add);
criterion_main!(benches);
