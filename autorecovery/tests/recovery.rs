//! Autorecovery against an in-process cluster (embedded metadata store served on loopback, real
//! bookies with fsync on, ephemeral ports). Process-level faults (kill -9 of bookies, auditors
//! and workers) are in the `quire-tests` crate.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire_autorecovery::decommission::{self, DecommissionOptions};
use quire_autorecovery::{AutoRecovery, AutoRecoveryConfig, Error};
use quire_bookie::testkit::Cluster;
use quire_ledger_client::{Client, ClientConfig, CreateOptions, LedgerState};
use quire_metadata::replication::ReplicationStore;

async fn connect(c: &Cluster) -> Client {
    let mut cfg = ClientConfig::new(c.uri.clone());
    cfg.add_timeout = Duration::from_secs(2);
    cfg.explicit_lac_interval = Some(Duration::from_millis(100));
    Client::connect(cfg).await.unwrap()
}

/// Autorecovery `id` for tests: no delay, short sessions and grace, no throttle.
fn cfg(id: &str) -> AutoRecoveryConfig {
    AutoRecoveryConfig {
        id: id.into(),
        lost_bookie_recovery_delay: Duration::ZERO,
        session_timeout: Duration::from_secs(2),
        worker_poll_interval: Duration::from_millis(200),
        open_ledger_grace: Duration::from_secs(1),
        throttle_bytes_per_sec: 0,
        ..Default::default()
    }
}

async fn wait_for<F, Fut>(what: &str, mut f: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = Instant::now() + Duration::from_secs(60);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn payload(l: u64, i: u64) -> Bytes {
    Bytes::from(format!(
        "ledger-{l}-entry-{i}-{}",
        "y".repeat((i % 300) as usize)
    ))
}

/// Writes `n` entries to a new E3/Qw3/Qa2 ledger; returns its writer.
async fn write(client: &Client, n: u64) -> quire_ledger_client::LedgerWriter {
    let w = client.create(CreateOptions::default()).await.unwrap();
    for i in 0..n {
        w.append(payload(w.id(), i)).await.unwrap();
    }
    w
}

/// Every ledger is fully replicated on live bookies and reads back as written.
async fn assert_restored(client: &Client, ids: &[u64], n: u64, dead: &str) {
    for id in ids {
        let meta = client.metadata(*id).await.unwrap().value;
        assert!(
            meta.ensembles.values().flatten().all(|b| b != dead),
            "ledger {id} still names {dead}: {:?}",
            meta.ensembles
        );
        let report = client.check(*id).await.unwrap();
        assert!(report.is_healthy(), "ledger {id}: {:?}", report.issues);
        assert_eq!(report.last_entry_id, n as i64 - 1);
        let r = client.open(*id, b"").await.unwrap();
        for (i, e) in r.read(0, n - 1).await.unwrap().into_iter().enumerate() {
            assert_eq!(e.payload, payload(*id, i as u64), "ledger {id} entry {i}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_bookie_is_replaced_in_every_ledger() {
    let mut c = Cluster::start(4).await;
    let client = connect(&c).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let w = write(&client, 120).await;
        w.close().await.unwrap();
        ids.push(w.id());
    }
    // One open ledger, written across the loss, so its writer changes ensemble itself.
    let open = write(&client, 60).await;
    let victim = client.metadata(ids[0]).await.unwrap().value.ensembles[&0][0].clone();
    c.stop_bookie(&victim).await;

    let ar = AutoRecovery::start(c.store.clone(), cfg("ar-1"))
        .await
        .unwrap();
    for i in 60..120 {
        open.append(payload(open.id(), i)).await.unwrap();
    }
    let repl = ReplicationStore::new(c.store.clone());
    let store = c.store.clone();
    wait_for("no ledger to name the lost bookie", || async {
        let mut named = false;
        quire_autorecovery::auditor::scan_ledgers(&store, |_, m| {
            named |= m.ensembles.values().flatten().any(|b| *b == victim);
        })
        .await
        .unwrap();
        !named && repl.list().await.unwrap().is_empty()
    })
    .await;
    open.close().await.unwrap();
    ids.push(open.id());
    assert_restored(&client, &ids, 120, &victim).await;

    // Workers publish their counters after each ledger.
    let store = c.store.clone();
    wait_for("the worker's counters", || async {
        let s = quire_autorecovery::status::status(&store).await.unwrap();
        s.auditor.is_some_and(|a| {
            a.ledgers_marked > 0 && s.totals.ledgers_replicated == a.ledgers_marked
        })
    })
    .await;
    let status = quire_autorecovery::status::status(&c.store).await.unwrap();
    assert_eq!(status.auditor.as_ref().unwrap().id, "ar-1");
    assert_eq!(status.under_replicated, 0);
    let marked = status.auditor.as_ref().unwrap().ledgers_marked;
    assert!(marked >= 1, "ledger {} named the victim", ids[0]);
    assert_eq!(status.workers.len(), 1);
    assert_eq!(status.totals.ledgers_replicated, marked, "{status:?}");
    assert!(status.totals.fragments_replicated >= marked);
    assert!(status.totals.bytes_replicated > 0);
    let metrics = ar.metrics().render();
    assert!(metrics.contains("quire_autorecovery_fragments_replicated_total"));
    ar.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_open_ledger_on_a_lost_bookie_is_recovered_after_the_grace() {
    let mut c = Cluster::start(4).await;
    let client = connect(&c).await;
    let w = write(&client, 50).await;
    let victim = client.metadata(w.id()).await.unwrap().value.ensembles[&0][1].clone();
    c.stop_bookie(&victim).await;
    let ar = AutoRecovery::start(c.store.clone(), cfg("ar-1"))
        .await
        .unwrap();
    wait_for("the idle ledger to be recovered and moved", || async {
        let m = client.metadata(w.id()).await.unwrap().value;
        m.state == LedgerState::Closed && m.ensembles.values().flatten().all(|b| *b != victim)
    })
    .await;
    assert_eq!(
        w.append(payload(w.id(), 50)).await.unwrap_err().code(),
        "FENCED",
        "the writer that stayed silent past the grace was fenced"
    );
    assert_restored(&client, &[w.id()], 50, &victim).await;
    ar.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_replica_check_puts_back_lost_copies_in_place() {
    let c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = write(&client, 100).await;
    w.close().await.unwrap();
    let id = w.id();
    // One bookie loses the ledger (a disk replaced, say) but stays up.
    c.bookie("bookie-2").bookie.delete(id).await.unwrap();
    let before = client.check(id).await.unwrap();
    assert_eq!(before.issues_total, 100, "{:?}", &before.issues[..3]);
    let cfg = AutoRecoveryConfig {
        replica_check_interval: Duration::from_secs(1),
        ..cfg("ar-1")
    };
    let ar = AutoRecovery::start(c.store.clone(), cfg).await.unwrap();
    wait_for("the lost copies to be back", || async {
        client.check(id).await.unwrap().is_healthy()
    })
    .await;
    let meta = client.metadata(id).await.unwrap().value;
    assert_eq!(
        meta.ensembles.len(),
        1,
        "repaired in place, ensemble unchanged"
    );
    ar.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_moves_every_replica_while_reads_go_on() {
    let c = Cluster::start(4).await;
    let client = connect(&c).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let w = write(&client, 80).await;
        w.close().await.unwrap();
        ids.push(w.id());
    }
    let leaving = &client.metadata(ids[0]).await.unwrap().value.ensembles[&0][0].clone();
    let mut naming = 0;
    for id in &ids {
        let m = client.metadata(*id).await.unwrap().value;
        naming += m.ensembles[&0].contains(leaving) as u64;
    }
    // Readers keep reading every entry of every ledger the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (client, ids, stop) = (client.clone(), ids.clone(), stop.clone());
        tokio::spawn(async move {
            let mut rounds = 0;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                for id in &ids {
                    let r = client.open(*id, b"").await.unwrap();
                    let entries = r.read(0, 79).await.unwrap();
                    for (i, e) in entries.iter().enumerate() {
                        assert_eq!(e.payload, payload(*id, i as u64));
                    }
                    // No moment with fewer intact replicas than the write quorum.
                    let report = client.check(*id).await.unwrap();
                    assert!(report.is_healthy(), "ledger {id}: {:?}", report.issues);
                }
                rounds += 1;
            }
            rounds
        })
    };
    let opts = DecommissionOptions {
        timeout: Duration::from_secs(60),
        open_ledger_grace: Duration::from_secs(1),
        throttle_bytes_per_sec: 0,
    };
    let report =
        decommission::decommission(c.store.clone(), client.clone(), leaving, opts, |_, _| {})
            .await
            .unwrap();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    assert!(reader.await.unwrap() >= 1);
    assert_eq!(report.ledgers, naming);
    assert_eq!(report.ledgers_moved, naming);
    assert!(report.entries_copied > 0 && report.bytes_copied > 0);
    assert_restored(&client, &ids, 80, leaving).await;
    // New ledgers avoid it.
    for _ in 0..5 {
        let w = client.create(CreateOptions::default()).await.unwrap();
        let m = client.metadata(w.id()).await.unwrap().value;
        assert!(!m.ensembles[&0].iter().any(|b| b == leaving));
    }
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_refuses_what_it_cannot_do_and_changes_nothing() {
    let c = Cluster::start(3).await;
    let client = connect(&c).await;
    let w = write(&client, 10).await;
    w.close().await.unwrap();
    let opts = DecommissionOptions {
        timeout: Duration::from_secs(10),
        open_ledger_grace: Duration::from_secs(1),
        throttle_bytes_per_sec: 0,
    };
    let err = decommission::decommission(
        c.store.clone(),
        client.clone(),
        "no-such-bookie",
        opts.clone(),
        |_, _| {},
    )
    .await
    .unwrap_err();
    assert!(matches!(err, Error::UnknownBookie(_)), "{err}");
    // Three bookies, E=3: nobody could take bookie-0's replicas.
    let err =
        decommission::decommission(c.store.clone(), client.clone(), "bookie-0", opts, |_, _| {})
            .await
            .unwrap_err();
    assert!(matches!(err, Error::NotEnoughBookies(_)), "{err}");
    assert!(err.to_string().contains("Add a bookie first"), "{err}");
    let repl = ReplicationStore::new(c.store.clone());
    assert!(repl.decommissioning().await.unwrap().is_empty());
    assert!(repl.list().await.unwrap().is_empty());
    let all: BTreeSet<String> = client
        .candidates()
        .await
        .unwrap()
        .into_iter()
        .map(|c| c.id)
        .collect();
    assert_eq!(all.len(), 3);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_auditor_takes_over() {
    let c = Cluster::start(3).await;
    let mut cfg1 = cfg("ar-1");
    cfg1.worker = false;
    let mut cfg2 = cfg("ar-2");
    cfg2.worker = false;
    let a1 = AutoRecovery::start(c.store.clone(), cfg1).await.unwrap();
    let repl = ReplicationStore::new(c.store.clone());
    wait_for("ar-1 to be elected", || async {
        repl.auditor()
            .await
            .unwrap()
            .is_some_and(|a| a.id == "ar-1")
    })
    .await;
    let a2 = AutoRecovery::start(c.store.clone(), cfg2).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        repl.auditor().await.unwrap().unwrap().id,
        "ar-1",
        "one at a time"
    );
    a1.stop().await;
    wait_for("ar-2 to take over", || async {
        repl.auditor()
            .await
            .unwrap()
            .is_some_and(|a| a.id == "ar-2")
    })
    .await;
    a2.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn decommission_waits_for_an_open_ledgers_writer_instead_of_fencing_it() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicU64, Ordering};
    let c = Cluster::start(4).await;
    let client = connect(&c).await;
    let w = write(&client, 20).await;
    let leaving = client.metadata(w.id()).await.unwrap().value.ensembles[&0][0].clone();
    let waiting = Arc::new(AtomicU64::new(0));
    let task = {
        let (store, client, leaving, waiting) = (
            c.store.clone(),
            client.clone(),
            leaving.clone(),
            waiting.clone(),
        );
        tokio::spawn(async move {
            let opts = DecommissionOptions {
                timeout: Duration::from_secs(60),
                open_ledger_grace: Duration::from_millis(100),
                throttle_bytes_per_sec: 0,
            };
            decommission::decommission(store, client, &leaving, opts, |_, n| {
                waiting.fetch_max(n, Ordering::Relaxed);
            })
            .await
        })
    };
    wait_for("the decommission to report the open ledger", || async {
        waiting.load(Ordering::Relaxed) == 1
    })
    .await;
    // Well past the grace: the writer on the healthy, leaving bookie is not fenced.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in 20..40 {
        w.append(payload(w.id(), i)).await.unwrap();
    }
    assert!(
        !task.is_finished(),
        "it cannot finish while the ledger is open on the bookie"
    );
    w.close().await.unwrap();
    let report = task.await.unwrap().unwrap();
    assert_eq!((report.ledgers, report.ledgers_moved), (1, 1));
    assert_restored(&client, &[w.id()], 40, &leaving).await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_auditor_counts_write_sets_that_break_the_zone_rules() {
    let c = Cluster::start_zoned(&[Some("a"), Some("a"), Some("b"), Some("b")]).await;
    let client = connect(&c).await;
    let opts = CreateOptions {
        ensemble: 2,
        write_quorum: 2,
        ack_quorum: 2,
        ..Default::default()
    };
    let good = client.create(opts.clone()).await.unwrap();
    let bad = client.create(opts).await.unwrap();
    // Zone-aware placement spans both zones; then one ledger is moved onto zone a alone.
    let g = client.metadata(good.id()).await.unwrap().value;
    assert_ne!(
        g.ensembles[&0][0].as_str() < "bookie-2",
        g.ensembles[&0][1].as_str() < "bookie-2"
    );
    let v = client.metadata(bad.id()).await.unwrap();
    let mut m = v.value.clone();
    m.ensembles
        .insert(0, vec!["bookie-0".into(), "bookie-1".into()]);
    quire_metadata::ledgers::LedgerStore::new(c.store.clone())
        .update(bad.id(), &m, v.version)
        .await
        .unwrap();
    let cfg = AutoRecoveryConfig {
        placement_check_interval: Duration::from_millis(500),
        worker: false,
        ..cfg("ar-1")
    };
    let ar = AutoRecovery::start(c.store.clone(), cfg).await.unwrap();
    let repl = ReplicationStore::new(c.store.clone());
    wait_for("a placement check", || async {
        repl.auditor()
            .await
            .unwrap()
            .is_some_and(|a| a.last_placement_check_ms > 0)
    })
    .await;
    let a = repl.auditor().await.unwrap().unwrap();
    assert_eq!(a.placement_violations, 1, "{a:?}");
    assert!(
        ar.metrics()
            .render()
            .contains("quire_autorecovery_placement_violations 1")
    );
    ar.stop().await;
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_striped_ledger_loses_a_bookie() {
    // E > Qw: each bookie holds only some entries, so the copy goes entry by entry.
    let mut c = Cluster::start(5).await;
    let client = connect(&c).await;
    let opts = CreateOptions {
        ensemble: 4,
        write_quorum: 2,
        ack_quorum: 2,
        ..Default::default()
    };
    let w = client.create(opts).await.unwrap();
    for i in 0..90 {
        w.append(payload(w.id(), i)).await.unwrap();
    }
    w.close().await.unwrap();
    let victim = client.metadata(w.id()).await.unwrap().value.ensembles[&0][2].clone();
    c.stop_bookie(&victim).await;
    let ar = AutoRecovery::start(c.store.clone(), cfg("ar-1"))
        .await
        .unwrap();
    wait_for("the striped ledger to move off the lost bookie", || async {
        let m = client.metadata(w.id()).await.unwrap().value;
        m.ensembles.values().flatten().all(|b| *b != victim)
    })
    .await;
    assert_restored(&client, &[w.id()], 90, &victim).await;
    ar.stop().await;
    c.stop().await;
}
