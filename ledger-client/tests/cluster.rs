//! The client against an in-process cluster: an embedded metadata store served on loopback and
//! real bookies (journal fsync on), all on ephemeral ports. Process-level faults (kill -9) are in
//! the `quire-tests` crate; these check the protocol paths quickly.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use quire_bookie::testkit::Cluster;
use quire_ledger_client::{Client, ClientConfig, CreateOptions, LedgerError, LedgerState};

async fn connect(c: &Cluster) -> Client {
    let mut cfg = ClientConfig::new(c.uri.clone());
    cfg.add_timeout = Duration::from_secs(2);
    cfg.explicit_lac_interval = Some(Duration::from_millis(100));
    Client::connect(cfg).await.unwrap()
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("entry-{i}-{}", "x".repeat((i % 7) as usize)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_close_read_back() {
    let c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    let mut futs = Vec::new();
    for i in 0..200u64 {
        futs.push(w.append_async(payload(i)).await.unwrap());
    }
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(
            f.await.unwrap(),
            i as u64,
            "entry ids are assigned in order"
        );
    }
    let meta = w.close().await.unwrap();
    assert_eq!(meta.state, LedgerState::Closed);
    assert_eq!(meta.last_entry_id, 199);
    let total: u64 = (0..200).map(|i| payload(i).len() as u64).sum();
    assert_eq!(meta.length, total);
    assert_eq!(w.close().await.unwrap(), meta, "close is idempotent");
    let err = w.append(payload(0)).await.unwrap_err();
    assert_eq!(err.code(), "CLOSED");

    let r = client.open(w.id(), b"").await.unwrap();
    assert_eq!(r.lac(), 199);
    let entries = r.read(0, 199).await.unwrap();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.entry_id, i as u64);
        assert_eq!(e.payload, payload(i as u64));
    }
    assert!(matches!(
        r.read(0, 200).await,
        Err(LedgerError::BeyondLac { .. })
    ));
    assert!(matches!(
        client.open(w.id(), b"wrong").await,
        Err(LedgerError::Unauthorized(_))
    ));
    // Recovering a closed ledger changes nothing.
    let rr = client.recover(w.id(), b"").await.unwrap();
    assert_eq!(rr.metadata(), meta);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recovery_fences_the_writer_and_keeps_every_acknowledged_entry() {
    let c = Cluster::start(3).await;
    let a = connect(&c).await;
    let b = connect(&c).await;
    let pw = b"secret".to_vec();
    let w = a
        .create(CreateOptions {
            password: pw.clone(),
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..20 {
        w.append(payload(i)).await.unwrap();
    }
    let r = b.recover(w.id(), &pw).await.unwrap();
    let meta = r.metadata();
    assert_eq!(meta.state, LedgerState::Closed);
    assert_eq!(meta.last_entry_id, 19, "every acknowledged entry survives");
    let err = w.append(payload(20)).await.unwrap_err();
    assert_eq!(err.code(), "FENCED", "{err}");
    let entries = r.read(0, 19).await.unwrap();
    assert_eq!(entries.len(), 20);
    assert_eq!(entries[19].payload, payload(19));
    // Two more recoveries agree.
    let (x, y) = tokio::join!(a.recover(w.id(), &pw), b.recover(w.id(), &pw));
    assert_eq!(x.unwrap().metadata().last_entry_id, 19);
    assert_eq!(y.unwrap().metadata().last_entry_id, 19);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_recoveries_of_an_open_ledger_agree() {
    let c = Cluster::start(3).await;
    let a = connect(&c).await;
    let w = a.create(CreateOptions::default()).await.unwrap();
    for i in 0..50 {
        w.append(payload(i)).await.unwrap();
    }
    let (b1, b2) = (connect(&c).await, connect(&c).await);
    let (x, y) = tokio::join!(b1.recover(w.id(), b""), b2.recover(w.id(), b""));
    let (x, y) = (x.unwrap().metadata(), y.unwrap().metadata());
    assert_eq!(x, y);
    assert_eq!(x.last_entry_id, 49);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_bookie_is_replaced_and_nothing_acknowledged_is_lost() {
    let mut c = Cluster::start(4).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    for i in 0..50 {
        w.append(payload(i)).await.unwrap();
    }
    let victim = client.metadata(w.id()).await.unwrap().value.ensembles[&0][1].clone();
    c.stop_bookie(&victim).await;
    for i in 50..100 {
        w.append(payload(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    assert_eq!(meta.last_entry_id, 99);
    assert_eq!(
        meta.ensembles.len(),
        2,
        "one ensemble change: {:?}",
        meta.ensembles
    );
    let (first, ens) = meta.ensembles.iter().next_back().unwrap();
    assert!(
        *first >= 50 && *first <= 51,
        "new ensemble starts at LAC+1: {first}"
    );
    assert!(!ens.contains(&victim));
    let r = client.open(w.id(), b"").await.unwrap();
    let entries = r.read(0, 99).await.unwrap();
    for (i, e) in entries.iter().enumerate() {
        assert_eq!(e.payload, payload(i as u64));
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_spare_writes_go_on_with_the_ack_quorum() {
    let mut c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    for i in 0..10 {
        w.append(payload(i)).await.unwrap();
    }
    c.stop_bookie("bookie-2").await;
    for i in 10..30 {
        w.append(payload(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    assert_eq!(meta.last_entry_id, 29);
    let r = client.open(w.id(), b"").await.unwrap();
    assert_eq!(r.read(0, 29).await.unwrap().len(), 30);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn striped_ledger_survives_any_one_bookie_down() {
    let mut c = Cluster::start(5).await;
    let client = connect(&c).await;
    let w = client
        .create(CreateOptions {
            ensemble: 5,
            write_quorum: 3,
            ack_quorum: 2,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..40 {
        w.append(payload(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    c.stop_bookie("bookie-3").await;
    let r = client.open(w.id(), b"").await.unwrap();
    let entries = r.read(0, 39).await.unwrap();
    assert_eq!(entries.len(), 40);
    assert_eq!(meta.ensembles.len(), 1);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tail_follows_the_writer_and_ends_at_close() {
    let c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    let r = client.open(w.id(), b"").await.unwrap();
    let tail = tokio::spawn(async move {
        let mut s = Box::pin(r.tail(0));
        let mut got = Vec::new();
        while let Some(e) = s.next().await {
            got.push(e.unwrap());
        }
        got
    });
    for i in 0..30 {
        w.append(payload(i)).await.unwrap();
        if i % 10 == 0 {
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    }
    w.close().await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(30), tail)
        .await
        .expect("tail ends once the ledger is closed")
        .unwrap();
    assert_eq!(got.len(), 30);
    for (i, e) in got.iter().enumerate() {
        assert_eq!(e.entry_id, i as u64);
        assert_eq!(e.payload, payload(i as u64));
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn close_completes_while_another_task_keeps_appending() {
    let c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    let w2 = w.clone();
    let appender = tokio::spawn(async move {
        let mut acked = Vec::new();
        for i in 0.. {
            match w2.append(payload(i)).await {
                Ok(id) => acked.push(id),
                Err(e) => return (acked, e),
            }
        }
        unreachable!()
    });
    while w.lac() < 20 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let meta = tokio::time::timeout(Duration::from_secs(30), w.close())
        .await
        .expect("close is not held off by a busy appender")
        .unwrap();
    let (acked, err) = appender.await.unwrap();
    assert_eq!(err.code(), "CLOSED", "{err}");
    assert_eq!(*acked.last().unwrap() as i64, meta.last_entry_id);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_follows_an_ensemble_change_it_did_not_see() {
    let mut c = Cluster::start(2).await;
    let client = connect(&c).await;
    let w = client
        .create(CreateOptions {
            ensemble: 1,
            write_quorum: 1,
            ack_quorum: 1,
            ..Default::default()
        })
        .await
        .unwrap();
    for i in 0..5 {
        w.append(payload(i)).await.unwrap();
    }
    // The reader caches the first ensemble; then its only bookie goes and the writer moves on.
    let r = connect(&c).await.open(w.id(), b"").await.unwrap();
    let first = client.metadata(w.id()).await.unwrap().value.ensembles[&0][0].clone();
    c.stop_bookie(&first).await;
    for i in 5..10 {
        w.append(payload(i)).await.unwrap();
    }
    assert_eq!(
        r.read_lac().await.unwrap(),
        8,
        "the LAC is read from the new ensemble"
    );
    let got = r.read(5, 8).await.unwrap();
    assert_eq!(got[0].payload, payload(5));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn check_reports_missing_and_unreachable_replicas() {
    use quire_ledger_client::check::ReplicaProblem;
    let mut c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    for i in 0..10 {
        w.append(payload(i)).await.unwrap();
    }
    let meta = w.close().await.unwrap();
    let report = client.check(w.id()).await.unwrap();
    assert!(report.is_healthy(), "{report:?}");
    assert_eq!(report.replicas_checked, 30);

    // One bookie loses the ledger: every entry is missing there.
    let ens = meta.ensembles[&0].clone();
    let addr = c.bookie(&ens[0]).grpc_addr;
    let mut b = quire_proto::bookie::bookie_client::BookieClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    b.delete_ledger(quire_proto::bookie::DeleteLedgerRequest { ledger_id: w.id() })
        .await
        .unwrap();
    let report = client.check(w.id()).await.unwrap();
    assert_eq!(report.issues_total, 10, "{report:?}");
    assert!(
        report
            .issues
            .iter()
            .all(|x| x.bookie == ens[0] && x.problem == ReplicaProblem::Missing),
        "{report:?}"
    );

    // Another is down: unreachable for every entry too.
    c.stop_bookie(&ens[1]).await;
    let report = client.check(w.id()).await.unwrap();
    assert_eq!(report.issues_total, 20, "{report:?}");
    assert!(
        report
            .issues
            .iter()
            .any(|x| x.bookie == ens[1] && matches!(x.problem, ReplicaProblem::Unreachable(_)))
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_reads_fall_back_when_a_replica_lacks_entries() {
    let c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = client.create(CreateOptions::default()).await.unwrap();
    for i in 0..300u64 {
        w.append(payload(i)).await.unwrap();
    }
    w.close().await.unwrap();
    // Two of the three replicas lose the ledger: every run read but one fails, and entries
    // whose write set starts there are read from the third.
    let ens = client.metadata(w.id()).await.unwrap().value.ensembles[&0].clone();
    for b in &ens[..2] {
        c.bookie(b).bookie.delete(w.id()).await.unwrap();
    }
    let r = client.open(w.id(), b"").await.unwrap();
    let entries = r.read(0, 299).await.unwrap();
    assert_eq!(entries.len(), 300);
    for (i, e) in entries.iter().enumerate() {
        assert_eq!((e.entry_id, &e.payload), (i as u64, &payload(i as u64)));
    }
    c.stop().await;
}
