//! Quorum adds through the ledger client against an in-process cluster on loopback: an embedded
//! metadata store served over gRPC and three bookies (journal fsync on), all in this process.
//!
//! - `ledger_add/E=3,Qw=3,Qa=2/in_flight=1/size=1024`: one append, awaited until acknowledged
//!   (two of the three bookies have it in their journals): the quorum-add latency.
//! - `ledger_add/E=1,Qw=1,Qa=1/in_flight=1/size=1024`: the same on a one-bookie ledger, for
//!   comparison (what the quorum costs over a single replica through the same client).
//!
//! Each case writes its own ledger, created on first use and closed after the case.

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use quire_bookie::config::{BookieConfig, JournalConfig, StorageConfig};
use quire_ledger_client::{Client, ClientConfig, CreateOptions, LedgerWriter};
use quire_metadata::bookies::BookieRegistry;
use std::time::{Duration, Instant};
use tokio::runtime::Runtime;

const SIZE_BYTES: usize = 1024;
const BOOKIES: usize = 3;

struct Cluster {
    _dir: tempfile::TempDir,
    meta: quire_metadata::server::MetadataServerHandle,
    bookies: Vec<quire_bookie::Running>,
    client: Client,
}

impl Cluster {
    async fn start() -> Cluster {
        let dir = tempfile::tempdir().expect("create the cluster directory");
        let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("valid address");
        let meta = quire_metadata::server::serve_embedded(loopback, dir.path().join("meta"))
            .await
            .expect("serve the embedded metadata store");
        let uri = format!("quire://{}", meta.addr);
        let mut bookies = Vec::new();
        for i in 0..BOOKIES {
            let defaults = BookieConfig::default();
            let cfg = BookieConfig {
                listen: loopback,
                http: loopback,
                bookie_id: Some(format!("bench-bookie-{i}")),
                metadata: Some(uri.clone()),
                journal: JournalConfig {
                    dir: dir.path().join(format!("b{i}/journal")),
                    ..defaults.journal
                },
                storage: StorageConfig {
                    ledger_dirs: vec![dir.path().join(format!("b{i}/ledgers"))],
                    ..defaults.storage
                },
                ..defaults
            };
            bookies.push(quire_bookie::start(cfg).await.expect("start a bookie"));
        }
        let store = quire_metadata::connect(&uri)
            .await
            .expect("connect to the metadata store");
        let registry = BookieRegistry::new(store);
        let deadline = Instant::now() + Duration::from_secs(30);
        while registry.writable().await.map_or(0, |w| w.len()) < BOOKIES {
            assert!(Instant::now() < deadline, "the bookies never registered");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let client = Client::connect(ClientConfig::new(uri))
            .await
            .expect("ledger client");
        Cluster {
            _dir: dir,
            meta,
            bookies,
            client,
        }
    }

    async fn stop(self) {
        drop(self.client);
        for b in self.bookies {
            b.stop().await;
        }
        self.meta.stop().await;
    }
}

fn ledger_add(c: &mut Criterion) {
    let rt = Runtime::new().expect("tokio runtime");
    let cluster = rt.block_on(Cluster::start());
    let payload = Bytes::from(vec![0x5au8; SIZE_BYTES]);

    let mut group = c.benchmark_group("ledger_add");
    group
        .sample_size(20)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(1));
    for (e, qw, qa) in [(3, 3, 2), (1, 1, 1)] {
        // Criterion calls the closure once per sample: the ledger lives outside it, created on
        // first use (a case the filter skips costs nothing).
        let mut writer: Option<LedgerWriter> = None;
        group.bench_function(
            format!("E={e},Qw={qw},Qa={qa}/in_flight=1/size={SIZE_BYTES}"),
            |b| {
                let w = writer.get_or_insert_with(|| {
                    rt.block_on(cluster.client.create(CreateOptions {
                        ensemble: e,
                        write_quorum: qw,
                        ack_quorum: qa,
                        ..CreateOptions::default()
                    }))
                    .expect("create a ledger")
                });
                b.iter_custom(|iters| {
                    rt.block_on(async {
                        let start = Instant::now();
                        for _ in 0..iters {
                            w.append(payload.clone()).await.expect("append");
                        }
                        start.elapsed()
                    })
                });
            },
        );
        if let Some(w) = writer {
            rt.block_on(w.close()).expect("close the ledger");
        }
    }
    group.finish();
    rt.block_on(cluster.stop());
}

criterion_group!(benches, ledger_add);
criterion_main!(benches);
