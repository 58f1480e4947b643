//! Adds through the gRPC add stream of an in-process bookie on loopback, journal fsync on.
//!
//! - `grpc_add/in_flight=1/size=<n>`: one add sent, its result awaited: one round trip plus one
//!   group commit.
//! - `grpc_add/in_flight=64/size=<n>`: 64 adds sent as 64 stream messages without waiting, then
//!   all 64 results awaited (pipelining over one stream).
//! - `grpc_add/batch=64/size=<n>`: 64 adds in one stream message, then all results awaited.
//!
//! Each case writes its own ledger; the bookie's checkpoints run as they would in production.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quire_bookie::config::{BookieConfig, JournalConfig, StorageConfig};
use quire_proto::StatusCode;
use quire_proto::bookie::bookie_client::BookieClient;
use quire_proto::bookie::{AddEntry, AddRequest, AddResponse};
use quire_proto::entry::{self, EntryHeader};
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

const SIZE_BYTES: usize = 1024;
const IN_FLIGHT: usize = 64;

/// One add stream writing one ledger.
struct AddStream {
    tx: mpsc::Sender<AddRequest>,
    responses: tonic::Streaming<AddResponse>,
    ledger_id: u64,
    next_entry: u64,
    master_key: Bytes,
    payload: Vec<u8>,
}

impl AddStream {
    async fn open(addr: std::net::SocketAddr, ledger_id: u64, size: usize) -> AddStream {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .expect("valid URL")
            .tcp_nodelay(true)
            .connect()
            .await
            .expect("connect to the bookie");
        let mut client = BookieClient::new(channel);
        let (tx, rx) = mpsc::channel(4 * IN_FLIGHT);
        let responses = client
            .add(tokio_stream::wrappers::ReceiverStream::new(rx))
            .await
            .expect("open the add stream")
            .into_inner();
        AddStream {
            tx,
            responses,
            ledger_id,
            next_entry: 0,
            master_key: Bytes::from_static(b"quire-bench-master-key"),
            payload: vec![0x5a; size],
        }
    }

    fn entry(&mut self) -> AddEntry {
        let entry_id = self.next_entry;
        self.next_entry += 1;
        let header = EntryHeader {
            ledger_id: self.ledger_id,
            entry_id,
            lac: entry_id as i64 - 1,
            length: (entry_id + 1) * self.payload.len() as u64,
        };
        AddEntry {
            ledger_id: self.ledger_id,
            entry_id,
            master_key: self.master_key.clone(),
            recovery: false,
            body: entry::encode(&header, &self.payload),
        }
    }

    async fn send(&self, entries: Vec<AddEntry>) {
        self.tx
            .send(AddRequest { entries })
            .await
            .expect("add stream open");
    }

    /// Waits for `n` results, all of which must be OK.
    async fn results(&mut self, n: usize) {
        let mut got = 0;
        while got < n {
            let msg = self
                .responses
                .message()
                .await
                .expect("add stream healthy")
                .expect("add stream still open");
            for r in &msg.results {
                assert_eq!(
                    r.code,
                    StatusCode::Ok as i32,
                    "add {}/{} failed: {}",
                    r.ledger_id,
                    r.entry_id,
                    r.message
                );
            }
            got += msg.results.len();
        }
    }
}

fn grpc_add(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let dir = tempfile::tempdir().expect("create bookie directory");
    let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("valid address");
    let defaults = BookieConfig::default();
    let cfg = BookieConfig {
        listen: loopback,
        http: loopback,
        journal: JournalConfig {
            dir: dir.path().join("journal"),
            ..defaults.journal
        },
        storage: StorageConfig {
            ledger_dirs: vec![dir.path().join("ledgers")],
            ..defaults.storage
        },
        ..defaults
    };
    let running = rt
        .block_on(quire_bookie::start(cfg))
        .expect("start the bookie");
    let addr = running.grpc_addr;
    let size = SIZE_BYTES;

    let mut group = c.benchmark_group("grpc_add");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5));

    // Criterion calls a bench closure once per sample, so each stream lives outside it, opened on
    // first use (a case that the filter skips costs nothing) and closed before the next case.
    group.throughput(Throughput::Elements(1));
    let mut stream = None;
    group.bench_function(format!("in_flight=1/size={size}"), |b| {
        let s = stream.get_or_insert_with(|| rt.block_on(AddStream::open(addr, 1, size)));
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let e = s.entry();
                    s.send(vec![e]).await;
                    s.results(1).await;
                }
                start.elapsed()
            })
        });
    });
    drop(stream);

    group.throughput(Throughput::Elements(IN_FLIGHT as u64));
    let mut stream = None;
    group.bench_function(format!("in_flight={IN_FLIGHT}/size={size}"), |b| {
        let s = stream.get_or_insert_with(|| rt.block_on(AddStream::open(addr, 2, size)));
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    for _ in 0..IN_FLIGHT {
                        let e = s.entry();
                        s.send(vec![e]).await;
                    }
                    s.results(IN_FLIGHT).await;
                }
                start.elapsed()
            })
        });
    });
    drop(stream);

    let mut stream = None;
    group.bench_function(format!("batch={IN_FLIGHT}/size={size}"), |b| {
        let s = stream.get_or_insert_with(|| rt.block_on(AddStream::open(addr, 3, size)));
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let entries = (0..IN_FLIGHT).map(|_| s.entry()).collect();
                    s.send(entries).await;
                    s.results(IN_FLIGHT).await;
                }
                start.elapsed()
            })
        });
    });
    drop(stream);

    group.finish();
    rt.block_on(running.stop());
}

criterion_group!(benches, grpc_add);
criterion_main!(benches);
