//! Ledger storage (no journal, no network).
//!
//! - `storage/add/size=<n>`: one insert into the write cache (in entry order, as adds arrive).
//! - `storage/flush/entries=<k>/size=<n>`: `flush_all` of `k` cached entries: entry-log append
//!   and sync, index update and sync. The inserts before it are not timed.
//! - `storage/read_cached/{write_cache,read_cache}/size=<n>`: `get_cached` hits.
//! - `storage/read_stored/size=<n>`: `read_stored` of flushed entries: index lookup, entry-log
//!   read and checksum. The read cache is tiny, but the OS page cache still holds the entry
//!   log, so this measures the bookie's read path, not the disk.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quire_bookie::config::StorageConfig;
use quire_bookie::metrics::Metrics;
use quire_bookie::storage::LedgerStorage;
use std::hint::black_box;
use std::sync::Arc;
use std::time::{Duration, Instant};

const SIZE_BYTES: usize = 1024;
/// Entries in the read benchmarks' ledger (16 MiB at 1 KiB).
const READ_ENTRIES: u64 = 16 * 1024;
/// Inserts between two (untimed) clean-ups of the write cache in `storage/add`.
const ADD_CHUNK: u64 = 64 * 1024;

struct Fixture {
    storage: LedgerStorage,
    // Declared last: dropped after the storage.
    _dir: tempfile::TempDir,
}

impl Fixture {
    fn new(read_cache_bytes_max: usize) -> Fixture {
        let dir = tempfile::tempdir().expect("create ledger directory");
        let cfg = StorageConfig {
            ledger_dirs: vec![dir.path().into()],
            read_cache_bytes_max,
            ..StorageConfig::default()
        };
        let storage =
            LedgerStorage::open(&cfg, Arc::new(Metrics::new())).expect("open ledger storage");
        Fixture { storage, _dir: dir }
    }

    /// Inserts entries `0..n` of `ledger`, each a distinct buffer as if received from the network.
    fn fill(&self, ledger: u64, n: u64, size: usize) {
        for e in 0..n {
            self.storage
                .insert(ledger, e, Bytes::from(vec![(e % 251) as u8; size]));
        }
    }

    fn flush(&self) {
        self.storage.flush_all(&|_| true).expect("flush");
    }
}

/// Visits every entry of `0..n` once per `n` steps, in a scattered order.
fn scattered(i: u64, n: u64) -> u64 {
    (i * 7919) % n
}

fn storage(c: &mut Criterion) {
    let size = SIZE_BYTES;
    let mut group = c.benchmark_group("storage");
    group
        .sample_size(30)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    group.throughput(Throughput::Bytes(size as u64));
    // Criterion calls a bench closure once per sample, so state lives outside it, made on first
    // use (a case that the filter skips costs nothing).
    let mut state = None;
    group.bench_function(format!("add/size={size}"), |b| {
        // One shared buffer: this measures the cache, not the allocator.
        let (f, body, ledger, next_entry) = state
            .get_or_insert_with(|| (Fixture::new(128 << 20), Bytes::from(vec![0x5a; size]), 1, 0));
        b.iter_custom(|iters| {
            let mut elapsed = Duration::ZERO;
            let mut left = iters;
            while left > 0 {
                let n = left.min(ADD_CHUNK - *next_entry);
                let start = Instant::now();
                for e in *next_entry..*next_entry + n {
                    f.storage.insert(*ledger, e, body.clone());
                }
                elapsed += start.elapsed();
                left -= n;
                *next_entry += n;
                if *next_entry == ADD_CHUNK {
                    // Keep the cache at a realistic size rather than growing for the whole run.
                    f.storage.delete_ledger(*ledger).expect("delete ledger");
                    *ledger += 1;
                    *next_entry = 0;
                }
            }
            elapsed
        });
    });

    for entries in [64u64, 1024] {
        group.throughput(Throughput::Bytes(entries * size as u64));
        let mut state = None;
        group.bench_function(format!("flush/entries={entries}/size={size}"), |b| {
            let (f, body, next_entry) = state
                .get_or_insert_with(|| (Fixture::new(128 << 20), Bytes::from(vec![0x5a; size]), 0));
            b.iter_custom(|iters| {
                let mut elapsed = Duration::ZERO;
                for _ in 0..iters {
                    for e in *next_entry..*next_entry + entries {
                        f.storage.insert(1, e, body.clone());
                    }
                    *next_entry += entries;
                    let start = Instant::now();
                    f.flush();
                    elapsed += start.elapsed();
                }
                elapsed
            });
        });
    }

    group.throughput(Throughput::Bytes(size as u64));
    let mut state = None;
    group.bench_function(format!("read_cached/write_cache/size={size}"), |b| {
        let (f, i) = state.get_or_insert_with(|| {
            let f = Fixture::new(128 << 20);
            f.fill(1, READ_ENTRIES, size);
            (f, 0)
        });
        b.iter(|| {
            let e = scattered(*i, READ_ENTRIES);
            *i += 1;
            black_box(f.storage.get_cached(1, e).expect("entry is cached"))
        });
    });

    let mut state = None;
    group.bench_function(format!("read_cached/read_cache/size={size}"), |b| {
        let (f, i) = state.get_or_insert_with(|| {
            let f = Fixture::new(128 << 20);
            f.fill(1, READ_ENTRIES, size);
            f.flush();
            for e in 0..READ_ENTRIES {
                f.storage.read_stored(1, e).expect("read").expect("stored");
            }
            (f, 0)
        });
        b.iter(|| {
            let e = scattered(*i, READ_ENTRIES);
            *i += 1;
            black_box(
                f.storage
                    .get_cached(1, e)
                    .expect("entry is in the read cache"),
            )
        });
    });

    let mut state = None;
    group.bench_function(format!("read_stored/size={size}"), |b| {
        let (f, i) = state.get_or_insert_with(|| {
            let f = Fixture::new(64 << 10);
            f.fill(1, READ_ENTRIES, size);
            f.flush();
            (f, 0)
        });
        b.iter(|| {
            let e = scattered(*i, READ_ENTRIES);
            *i += 1;
            black_box(f.storage.read_stored(1, e).expect("read").expect("stored"))
        });
    });

    group.finish();
}

criterion_group!(benches, storage);
criterion_main!(benches);
