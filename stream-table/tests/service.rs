//! The gRPC services through the Rust client, against an in-process cluster (embedded metadata
//! store on loopback, three real bookies) and stream-table servers on loopback ports: streams
//! and tables end to end, typed errors for bad input, redirects between two servers,
//! concurrent increments, and a table dropped and created again while another server owns it.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use quire_bookie::testkit::Cluster;
use quire_ledger_client::ClientConfig;
use quire_stream_table::client::Client;
use quire_stream_table::server::{ServerConfig, StreamTableServer, serve};
use quire_stream_table::stream::StreamConfig;
use quire_stream_table::table::{
    Compare, CompareOp, CompareTarget, TableConfig, Txn, TxnOp, Value, range_of,
};
use quire_stream_table::{Error, Name};

struct Server {
    addr: String,
    server: StreamTableServer,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Server {
    async fn start(c: &Cluster, id: &str) -> Server {
        let mut cfg = ClientConfig::new(c.uri.clone());
        cfg.explicit_lac_interval = Some(Duration::from_millis(50));
        let client = quire_ledger_client::Client::connect(cfg).await.unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let mut scfg = ServerConfig::new(id, addr.clone());
        scfg.session_ttl = Duration::from_secs(2);
        let server = StreamTableServer::start(c.store.clone(), client, scfg)
            .await
            .unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel();
        let s = server.clone();
        let task = tokio::spawn(async move {
            serve(s, listener, async move {
                let _ = rx.await;
            })
            .await
            .unwrap();
        });
        Server {
            addr,
            server,
            stop: Some(tx),
            task,
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(60), self.task)
            .await
            .expect("the server stops")
            .unwrap();
        self.server.shutdown().await;
    }
}

fn n(s: &str) -> Name {
    s.parse().unwrap()
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_end_to_end() {
    let c = Cluster::start(3).await;
    let srv = Server::start(&c, "st-1").await;
    let client = Client::connect(vec![srv.addr.clone()]).await.unwrap();
    let s = client.stream(n("app/events"));
    assert!(matches!(s.info().await, Err(Error::NoSuchStream(_))));
    let cfg = StreamConfig {
        segment_max_entries: 10,
        ..Default::default()
    };
    s.create(cfg.clone()).await.unwrap();
    assert!(matches!(s.create(cfg).await, Err(Error::AlreadyExists(_))));

    // A tail from 0 follows the writes across rollovers.
    let mut tail = Box::pin(s.tail(0));
    let mut a = s.appender().await.unwrap();
    for i in 0..35 {
        a.send(Bytes::from(format!("r{i}"))).await.unwrap();
    }
    for i in 0..35u64 {
        assert_eq!(a.next_offset().await.unwrap(), i);
    }
    a.finish().await.unwrap();
    assert_eq!(s.append(b("last")).await.unwrap(), 35);
    for i in 0..36u64 {
        let r = tokio::time::timeout(Duration::from_secs(30), tail.next())
            .await
            .expect("the tail delivers")
            .unwrap()
            .unwrap();
        assert_eq!(r.offset, i);
        let want = if i == 35 {
            "last".into()
        } else {
            format!("r{i}")
        };
        assert_eq!(r.payload, Bytes::from(want));
    }
    drop(tail);

    let info = s.info().await.unwrap();
    assert!(info.segments.len() >= 4, "{info:?}");
    let all = s.read(0, 0).await.unwrap();
    assert_eq!(
        all.iter().map(|r| r.offset).collect::<Vec<_>>(),
        (0..36).collect::<Vec<_>>()
    );
    assert_eq!(s.read(30, 3).await.unwrap().len(), 3);

    // Truncation by whole segments.
    let start = s.truncate(25).await.unwrap();
    assert!(start <= 25 && start % 10 == 0 && start > 0, "start {start}");
    assert!(matches!(s.read(0, 1).await, Err(Error::Truncated { start: st, .. }) if st == start));
    assert!(matches!(
        s.read(1000, 1).await,
        Err(Error::OutOfRange { .. })
    ));

    // Internal names are refused; delete removes the stream.
    assert!(Name::new("_system", "x").is_err());
    assert_eq!(
        client.list_streams("app").await.unwrap(),
        vec![n("app/events")]
    );
    s.delete().await.unwrap();
    assert!(matches!(s.info().await, Err(Error::NoSuchStream(_))));
    srv.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tables_end_to_end_with_typed_errors() {
    let c = Cluster::start(3).await;
    let srv = Server::start(&c, "st-1").await;
    let client = Client::connect(vec![srv.addr.clone()]).await.unwrap();
    let t = client.table(n("app/state"));
    assert!(matches!(t.get("k").await, Err(Error::NoSuchTable(_))));
    t.create(TableConfig {
        ranges: 3,
        ..Default::default()
    })
    .await
    .unwrap();

    for i in 0..50 {
        let r = t
            .put(
                format!("key-{i:03}"),
                Value::Bytes(Bytes::from(format!("v{i}"))),
            )
            .await
            .unwrap();
        assert!(r.succeeded);
    }
    let kv = t.get("key-007").await.unwrap().unwrap();
    assert_eq!((kv.value.clone(), kv.version), (Value::Bytes(b("v7")), 1));
    t.put("key-007", Value::Bytes(b("again"))).await.unwrap();
    let kv2 = t.get("key-007").await.unwrap().unwrap();
    assert_eq!(kv2.version, 2);
    assert!(kv2.mod_revision > kv.mod_revision);

    // A scan across the three ranges is ordered and pages without gaps or repeats.
    let mut seen = Vec::new();
    let mut from = b("key-");
    loop {
        let (page, more) = t.scan(from.clone(), Some(b("key-~")), 7).await.unwrap();
        assert!(page.len() <= 7);
        seen.extend(page.iter().map(|kv| kv.key.clone()));
        if !more {
            break;
        }
        let mut next = page.last().unwrap().key.to_vec();
        next.push(0);
        from = next.into();
    }
    let want: Vec<Bytes> = (0..50)
        .map(|i| Bytes::from(format!("key-{i:03}")))
        .collect();
    assert_eq!(seen, want);

    // Increments, a put-if-absent transaction, deletes.
    assert_eq!(t.increment("n", 5).await.unwrap(), 5);
    assert_eq!(t.increment("n", -2).await.unwrap(), 3);
    let txn = |v: &str| Txn {
        compares: vec![Compare {
            key: b("once"),
            target: CompareTarget::Version(0),
            op: CompareOp::Equal,
        }],
        success: vec![TxnOp::Put {
            key: b("once"),
            value: Value::Bytes(b(v)),
        }],
        failure: vec![TxnOp::Get { key: b("once") }],
    };
    assert!(t.txn(txn("first")).await.unwrap().succeeded);
    assert!(!t.txn(txn("second")).await.unwrap().succeeded);
    assert_eq!(
        t.get("once").await.unwrap().unwrap().value,
        Value::Bytes(b("first"))
    );
    assert!(t.delete("key-000").await.unwrap().deleted);
    assert_eq!(t.get("key-000").await.unwrap(), None);

    // Bad input: typed errors, nothing changed.
    assert!(matches!(
        t.increment("key-001", 1).await,
        Err(Error::WrongType(_))
    ));
    assert_eq!(
        t.get("key-001").await.unwrap().unwrap().value,
        Value::Bytes(b("v1"))
    );
    assert!(matches!(
        t.put(vec![b'k'; 5000], Value::Bytes(b("x"))).await,
        Err(Error::TooLarge(_))
    ));
    assert!(matches!(
        t.put("big", Value::Bytes(Bytes::from(vec![0u8; 2 << 20])))
            .await,
        Err(Error::TooLarge(_))
    ));
    assert_eq!(t.get("big").await.unwrap(), None);
    assert!(matches!(
        t.increment("n", i64::MAX).await,
        Err(Error::Overflow(_))
    ));
    assert_eq!(t.get("n").await.unwrap().unwrap().value, Value::Number(3));
    // Keys in different ranges cannot share a transaction.
    let (k1, k2) = {
        let mut k2 = 1;
        while range_of(format!("x{k2}").as_bytes(), 3) == range_of(b"x0", 3) {
            k2 += 1;
        }
        (b("x0"), Bytes::from(format!("x{k2}")))
    };
    let cross = Txn {
        compares: vec![],
        success: vec![
            TxnOp::Put {
                key: k1,
                value: Value::Number(1),
            },
            TxnOp::Put {
                key: k2,
                value: Value::Number(1),
            },
        ],
        failure: vec![],
    };
    assert!(matches!(t.txn(cross).await, Err(Error::CrossRange(_))));
    assert_eq!(t.get("x0").await.unwrap(), None);
    assert_eq!(
        client.list_tables("app").await.unwrap(),
        vec![n("app/state")]
    );
    srv.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_servers_redirect_and_increments_sum_exactly() {
    let c = Cluster::start(3).await;
    let a = Server::start(&c, "st-a").await;
    let bsrv = Server::start(&c, "st-b").await;
    let via_a = Client::connect(vec![a.addr.clone()]).await.unwrap();
    let via_b = Client::connect(vec![bsrv.addr.clone()]).await.unwrap();
    let t = via_a.table(n("app/counters"));
    t.create(TableConfig {
        ranges: 1,
        ..Default::default()
    })
    .await
    .unwrap();
    // A opens the range; B then redirects its clients to A.
    t.put("k", Value::Number(0)).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..8 {
        let t = if i % 2 == 0 { &via_a } else { &via_b }.table(n("app/counters"));
        tasks.push(tokio::spawn(async move {
            let mut last = 0;
            for _ in 0..25 {
                last = t.increment("hits", 1).await.unwrap();
            }
            last
        }));
    }
    for task in tasks {
        assert!(task.await.unwrap() <= 200);
    }
    assert_eq!(
        via_b
            .table(n("app/counters"))
            .get("hits")
            .await
            .unwrap()
            .unwrap()
            .value,
        Value::Number(200)
    );
    // A stream first written through B is owned by B; A's client is redirected there. (A
    // fresh client: `via_b` now goes to A first, the server that answered it last.)
    let via_b = Client::connect(vec![bsrv.addr.clone()]).await.unwrap();
    let s = via_b.stream(n("app/log"));
    s.create(StreamConfig::default()).await.unwrap();
    assert_eq!(s.append(b("one")).await.unwrap(), 0);
    assert_eq!(
        via_a.stream(n("app/log")).append(b("two")).await.unwrap(),
        1
    );
    let info = s.info().await.unwrap();
    assert_eq!(info.writer.map(|w| w.id), Some("st-b".to_string()));
    a.stop().await;
    bsrv.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_table_dropped_and_created_again_elsewhere_is_not_served_from_the_old_state() {
    let c = Cluster::start(3).await;
    let a = Server::start(&c, "st-a").await;
    let bsrv = Server::start(&c, "st-b").await;
    let via_a = Client::connect(vec![a.addr.clone()]).await.unwrap();
    let via_b = Client::connect(vec![bsrv.addr.clone()]).await.unwrap();
    let one = TableConfig {
        ranges: 1,
        ..Default::default()
    };
    let name = n("app/again");
    via_a.table(name.clone()).create(one.clone()).await.unwrap();
    via_a
        .table(name.clone())
        .put("k", Value::Bytes(b("old")))
        .await
        .unwrap();
    // A owns the range and holds its state in memory; B drops the table and creates it again.
    via_b.table(name.clone()).delete_table().await.unwrap();
    via_b.table(name.clone()).create(one).await.unwrap();

    // A learns of it from its watch on the tables and stops serving the old state.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        match via_a.table(name.clone()).get("k").await {
            Ok(None) => break,
            Ok(Some(kv)) => assert!(
                std::time::Instant::now() < deadline,
                "A still serves the dropped table's {kv:?}"
            ),
            Err(e) => assert!(e.is_retryable(), "{e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    via_a
        .table(name.clone())
        .put("k", Value::Bytes(b("new")))
        .await
        .unwrap();
    let kv = via_b.table(name.clone()).get("k").await.unwrap().unwrap();
    assert_eq!(kv.value, Value::Bytes(b("new")));
    assert_eq!(kv.version, 1);
    a.stop().await;
    bsrv.stop().await;
    c.stop().await;
}
