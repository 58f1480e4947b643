//! Tables against an in-process cluster (embedded metadata store on loopback, three real
//! bookies): the operations through an owned range, concurrent increments and racing
//! transactions, restore by a new owner after the old one vanished, changelog truncation by
//! checkpoints, fencing of a stale owner, and table administration.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire_bookie::testkit::Cluster;
use quire_ledger_client::{Client, ClientConfig, LedgerError};
use quire_metadata::session::Session;
use quire_stream_table::stream::{StreamConfig, Streams, WriterInfo};
use quire_stream_table::table::{
    Compare, CompareOp, CompareTarget, Expect, KeyValue, OpResult, Range, TableConfig, Tables, Txn,
    TxnOp, VALUE_MAX, Value, range_of,
};
use quire_stream_table::{Error, Name};

async fn tables(c: &Cluster) -> Tables {
    let mut cfg = ClientConfig::new(c.uri.clone());
    cfg.add_timeout = Duration::from_secs(2);
    cfg.explicit_lac_interval = Some(Duration::from_millis(100));
    let client = Client::connect(cfg).await.unwrap();
    Tables::new(Streams::new(c.store.clone(), client))
}

async fn session(c: &Cluster) -> Arc<Session> {
    Arc::new(
        Session::start(c.store.clone(), Duration::from_secs(2))
            .await
            .unwrap(),
    )
}

fn me(id: &str) -> WriterInfo {
    WriterInfo {
        id: id.into(),
        addr: format!("{id}:4181"),
    }
}

fn one_range() -> TableConfig {
    TableConfig {
        ranges: 1,
        ..Default::default()
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn bytes_of(kv: &KeyValue) -> &[u8] {
    match &kv.value {
        Value::Bytes(b) => b,
        Value::Number(_) => panic!("{kv:?} holds a number"),
    }
}

/// Every key-value of a range, paging through scans.
async fn dump(r: &Range) -> Vec<KeyValue> {
    let mut out = Vec::new();
    let mut from = Bytes::new();
    loop {
        let (page, more) = r.scan(&from, None, 7).await.unwrap();
        let last = page.last().map(|kv| kv.key.clone());
        out.extend(page);
        match (more, last) {
            (true, Some(k)) => {
                let mut next = k.to_vec();
                next.push(0);
                from = next.into();
            }
            _ => return out,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operations_through_a_range() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "kv").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let sess = session(&c).await;
    let r = t.open_range(&name, 0, &sess, me("s1")).await.unwrap();

    // Put, then read your own write with its stamps.
    let p = r.put(b("a"), "1".into(), None, false).await.unwrap();
    assert!(p.succeeded);
    assert_eq!(p.revision, 1);
    let kv = r.get(&b("a")).await.unwrap().unwrap();
    assert_eq!(
        (
            bytes_of(&kv),
            kv.version,
            kv.create_revision,
            kv.mod_revision
        ),
        (&b"1"[..], 1, 1, 1)
    );
    let p = r.put(b("a"), "2".into(), None, true).await.unwrap();
    assert_eq!(p.revision, 2);
    assert_eq!(p.prev_kv.as_ref().map(bytes_of), Some(&b"1"[..]));
    let kv = r.get(&b("a")).await.unwrap().unwrap();
    assert_eq!((kv.version, kv.create_revision, kv.mod_revision), (2, 1, 2));

    // Conditional puts: put-if-absent fails on a present key, a matching version succeeds.
    let p = r
        .put(b("a"), "x".into(), Some(Expect::Version(0)), false)
        .await
        .unwrap();
    assert!(!p.succeeded);
    assert_eq!(p.revision, 2);
    let p = r
        .put(b("a"), "3".into(), Some(Expect::Version(2)), false)
        .await
        .unwrap();
    assert!(p.succeeded);
    assert_eq!(p.revision, 3);
    let p = r
        .put(b("b"), "b".into(), Some(Expect::Version(0)), false)
        .await
        .unwrap();
    assert!(p.succeeded);

    // Increments.
    assert_eq!(r.increment(b("n"), 5).await.unwrap(), 5);
    assert_eq!(r.increment(b("n"), -7).await.unwrap(), -2);
    assert_eq!(
        r.get(&b("n")).await.unwrap().unwrap().value,
        Value::Number(-2)
    );

    // Scan order and paging.
    for k in ["c", "d", "e"] {
        r.put(b(k), k.into(), None, false).await.unwrap();
    }
    let (page, more) = r.scan(&b("b"), Some(&b("e")), 2).await.unwrap();
    assert_eq!(
        page.iter().map(|kv| kv.key.clone()).collect::<Vec<_>>(),
        vec![b("b"), b("c")]
    );
    assert!(more);
    let (page, more) = r.scan(&b("c\0"), Some(&b("e")), 2).await.unwrap();
    assert_eq!(page.len(), 1);
    assert!(!more);
    let keys: Vec<Bytes> = dump(&r).await.into_iter().map(|kv| kv.key).collect();
    assert_eq!(keys, vec![b("a"), b("b"), b("c"), b("d"), b("e"), b("n")]);

    // Delete, with an expectation that fails first.
    let d = r
        .delete(b("c"), Some(Expect::Version(9)), false)
        .await
        .unwrap();
    assert!(!d.succeeded && !d.deleted);
    let d = r.delete(b("c"), None, true).await.unwrap();
    assert!(d.succeeded && d.deleted);
    assert_eq!(d.prev_kv.as_ref().map(bytes_of), Some(&b"c"[..]));
    assert!(r.get(&b("c")).await.unwrap().is_none());
    let rev = r.stats().revision;
    let d = r.delete(b("c"), None, false).await.unwrap();
    assert!(!d.deleted);
    assert_eq!(d.revision, rev, "deleting nothing takes no revision");

    // A transaction: compare, then a branch whose operations see each other.
    let txn = Txn {
        compares: vec![Compare {
            key: b("a"),
            target: CompareTarget::Value("3".into()),
            op: CompareOp::Equal,
        }],
        success: vec![
            TxnOp::Put {
                key: b("a"),
                value: "4".into(),
            },
            TxnOp::Increment {
                key: b("n"),
                amount: 10,
            },
            TxnOp::Get { key: b("a") },
            TxnOp::Delete { key: b("d") },
        ],
        failure: vec![TxnOp::Get { key: b("a") }],
    };
    let res = r.txn(txn.clone()).await.unwrap();
    assert!(res.succeeded);
    assert_eq!(res.revision, rev + 1);
    assert_eq!(res.results[0], OpResult::Put { revision: rev + 1 });
    assert_eq!(res.results[1], OpResult::Increment(8));
    match &res.results[2] {
        OpResult::Get(Some(kv)) => assert_eq!(bytes_of(kv), b"4"),
        o => panic!("{o:?}"),
    }
    assert_eq!(res.results[3], OpResult::Delete { deleted: true });
    // Again: the compare fails now, the failure branch only reads.
    let res = r.txn(txn).await.unwrap();
    assert!(!res.succeeded);
    assert_eq!(res.revision, rev + 1);

    // Bad input gets typed errors and changes nothing.
    let before = dump(&r).await;
    let rev = r.stats().revision;
    let errs = [
        r.put(Bytes::new(), "x".into(), None, false)
            .await
            .unwrap_err(),
        r.put(
            b("big"),
            Value::Bytes(vec![0; VALUE_MAX + 1].into()),
            None,
            false,
        )
        .await
        .unwrap_err(),
        r.put(Bytes::from(vec![1; 4097]), "x".into(), None, false)
            .await
            .unwrap_err(),
        r.increment(b("a"), 1).await.unwrap_err(),
        r.increment(b("n"), i64::MAX).await.unwrap_err(),
        r.txn(Txn {
            success: vec![TxnOp::Get { key: b("a") }; 129],
            ..Default::default()
        })
        .await
        .unwrap_err(),
        r.txn(Txn {
            success: vec![
                TxnOp::Put {
                    key: b("z"),
                    value: "z".into(),
                },
                TxnOp::Increment {
                    key: b("a"),
                    amount: 1,
                },
            ],
            ..Default::default()
        })
        .await
        .unwrap_err(),
    ];
    let codes: Vec<&str> = errs.iter().map(Error::code).collect();
    assert_eq!(
        codes,
        [
            "INVALID_ARGUMENT",
            "TOO_LARGE",
            "TOO_LARGE",
            "WRONG_TYPE",
            "OVERFLOW",
            "INVALID_ARGUMENT",
            "WRONG_TYPE"
        ]
    );
    assert_eq!(dump(&r).await, before);
    assert_eq!(r.stats().revision, rev);
    assert_eq!(r.stats().pending, 0);
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn keys_stay_in_their_range_and_full_ranges_refuse_growth() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "split").unwrap();
    t.create(
        &name,
        TableConfig {
            ranges: 4,
            max_bytes: 4096,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let sess = session(&c).await;
    let r = t.open_range(&name, 2, &sess, me("s1")).await.unwrap();
    let key_in = |range: u32| {
        (0..)
            .map(|i| Bytes::from(format!("k{i}")))
            .find(|k| range_of(k, 4) == range)
            .unwrap()
    };
    let mine = key_in(2);
    let other = key_in(1);
    assert!(matches!(
        r.put(other.clone(), "x".into(), None, false).await,
        Err(Error::InvalidArgument(_))
    ));
    assert!(matches!(
        r.txn(Txn {
            success: vec![
                TxnOp::Put {
                    key: mine.clone(),
                    value: "x".into()
                },
                TxnOp::Put {
                    key: other,
                    value: "x".into()
                },
            ],
            ..Default::default()
        })
        .await,
        Err(Error::CrossRange(_))
    ));
    // Fill the range: puts are refused once full, deletes still work and make room.
    r.put(
        mine.clone(),
        Value::Bytes(vec![0; 3000].into()),
        None,
        false,
    )
    .await
    .unwrap();
    let mine2 = (0..)
        .map(|i| Bytes::from(format!("m{i}")))
        .find(|k| range_of(k, 4) == 2)
        .unwrap();
    assert!(matches!(
        r.put(
            mine2.clone(),
            Value::Bytes(vec![0; 2000].into()),
            None,
            false
        )
        .await,
        Err(Error::RangeFull(_))
    ));
    assert!(r.delete(mine.clone(), None, false).await.unwrap().deleted);
    r.put(mine2, Value::Bytes(vec![0; 2000].into()), None, false)
        .await
        .unwrap();
    assert!(matches!(
        t.open_range(&name, 4, &sess, me("s1")).await,
        Err(Error::InvalidArgument(_))
    ));
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_increments_sum_exactly() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "counters").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let sess = session(&c).await;
    let r = t.open_range(&name, 0, &sess, me("s1")).await.unwrap();
    let mut tasks = Vec::new();
    for i in 0..16 {
        let r = r.clone();
        tasks.push(tokio::spawn(async move {
            let mut seen = Vec::new();
            for _ in 0..100 {
                seen.push(r.increment(b("total"), 1).await.unwrap());
                // Every task also bumps its own key, interleaved.
                r.increment(Bytes::from(format!("task-{i}")), 2)
                    .await
                    .unwrap();
            }
            seen
        }));
    }
    let mut all = Vec::new();
    for t in tasks {
        all.extend(t.await.unwrap());
    }
    // Each increment saw a distinct total: 1..=1600.
    all.sort();
    assert_eq!(all, (1..=1600).collect::<Vec<i64>>());
    let kv = r.get(&b("total")).await.unwrap().unwrap();
    assert_eq!(kv.value, Value::Number(1600));
    assert_eq!(kv.version, 1600);
    for i in 0..16 {
        let kv = r
            .get(&Bytes::from(format!("task-{i}")))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(kv.value, Value::Number(200));
    }
    assert_eq!(r.stats().revision, 3200);
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn racing_transactions_have_one_winner() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "locks").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let sess = session(&c).await;
    let r = t.open_range(&name, 0, &sess, me("s1")).await.unwrap();
    for round in 0..5 {
        let key = Bytes::from(format!("lock-{round}"));
        let mut tasks = Vec::new();
        for i in 0..12 {
            let (r, key) = (r.clone(), key.clone());
            tasks.push(tokio::spawn(async move {
                let res = r
                    .txn(Txn {
                        compares: vec![Compare {
                            key: key.clone(),
                            target: CompareTarget::Version(0),
                            op: CompareOp::Equal,
                        }],
                        success: vec![TxnOp::Put {
                            key: key.clone(),
                            value: Value::Number(i),
                        }],
                        failure: vec![TxnOp::Get { key }],
                    })
                    .await
                    .unwrap();
                (i, res)
            }));
        }
        let mut winners = Vec::new();
        let mut seen_holder = Vec::new();
        for t in tasks {
            let (i, res) = t.await.unwrap();
            if res.succeeded {
                winners.push(i);
            } else {
                match &res.results[0] {
                    OpResult::Get(Some(kv)) => seen_holder.push(kv.value.clone()),
                    o => panic!("a loser must see the holder: {o:?}"),
                }
            }
        }
        assert_eq!(winners.len(), 1, "{winners:?}");
        let winner = Value::Number(winners[0]);
        assert!(seen_holder.iter().all(|v| *v == winner));
        let kv = r.get(&key).await.unwrap().unwrap();
        assert_eq!((kv.value, kv.version), (winner, 1));
    }
    r.close().await.unwrap();
}

/// Writes a mix of updates and returns what the range holds afterwards.
async fn write_batch(r: &Range, round: u32, n: u32) -> BTreeMap<Bytes, KeyValue> {
    for i in 0..n {
        let k = Bytes::from(format!("key-{:03}", i % 37));
        match i % 4 {
            0 | 1 => {
                r.put(k, Value::Bytes(format!("v{round}-{i}").into()), None, false)
                    .await
                    .unwrap();
            }
            2 => {
                r.increment(Bytes::from(format!("num-{}", i % 5)), i as i64)
                    .await
                    .unwrap();
            }
            _ => {
                r.delete(k, None, false).await.unwrap();
            }
        }
    }
    dump(r)
        .await
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_owner_restores_every_acknowledged_write() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "restore").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let s1 = session(&c).await;
    let r1 = t.open_range(&name, 0, &s1, me("s1")).await.unwrap();
    write_batch(&r1, 1, 120).await;
    let cp = r1.checkpoint().await.unwrap();
    assert_eq!(cp.revision, r1.stats().revision);
    let want = write_batch(&r1, 2, 90).await;
    let want_rev = r1.stats().revision;
    assert!(want_rev > cp.revision);

    // Another server cannot take the range while the owner's session lives.
    let s2 = session(&c).await;
    match t.open_range(&name, 0, &s2, me("s2")).await {
        Err(Error::LeaseHeld { holder, addr, .. }) => {
            assert_eq!((holder.as_str(), addr.as_str()), ("s1", "s1:4181"))
        }
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("two owners"),
    }

    // The owner vanishes without a final checkpoint: its handle is dropped and its lease ends.
    drop(r1);
    c.store.revoke_lease(s1.lease()).await.unwrap();
    let r2 = t.open_range(&name, 0, &s2, me("s2")).await.unwrap();
    let got: BTreeMap<Bytes, KeyValue> = dump(&r2)
        .await
        .into_iter()
        .map(|kv| (kv.key.clone(), kv))
        .collect();
    assert_eq!(got, want, "same values, versions and revisions");
    assert_eq!(r2.stats().revision, want_rev);
    assert_eq!(r2.stats().checkpoint, Some(cp));
    // It goes on from there.
    let p = r2.put(b("after"), "x".into(), None, false).await.unwrap();
    assert_eq!(p.revision, want_rev + 1);
    r2.close().await.unwrap();

    // A clean close leaves a final checkpoint: the next owner has nothing to replay.
    let s3 = session(&c).await;
    let r3 = t.open_range(&name, 0, &s3, me("s3")).await.unwrap();
    let st = r3.stats();
    assert_eq!(st.revision, want_rev + 1);
    assert_eq!(st.checkpoint.map(|c| c.revision), Some(want_rev + 1));
    assert!(r3.get(&b("after")).await.unwrap().is_some());
    r3.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_fenced_owner_fails_and_answers_ambiguous_or_unavailable() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "fenced").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let s1 = session(&c).await;
    let r1 = t.open_range(&name, 0, &s1, me("s1")).await.unwrap();
    r1.put(b("a"), "1".into(), None, false).await.unwrap();
    // The lease goes away behind the owner's back and another server takes over (fencing the
    // changelog segment the old owner writes to).
    c.store.revoke_lease(s1.lease()).await.unwrap();
    let s2 = session(&c).await;
    let r2 = t.open_range(&name, 0, &s2, me("s2")).await.unwrap();
    assert_eq!(r2.get(&b("a")).await.unwrap().map(|kv| kv.version), Some(1));
    match r1.put(b("a"), "stale".into(), None, false).await {
        Err(Error::Ambiguous(_)) | Err(Error::Unavailable(_)) | Err(Error::Fenced(_)) => {}
        o => panic!("a fenced owner must not acknowledge: {o:?}"),
    }
    assert!(r1.is_failed());
    assert!(matches!(r1.get(&b("a")).await, Err(Error::Unavailable(_))));
    assert!(matches!(
        r1.increment(b("n"), 1).await,
        Err(Error::Unavailable(_))
    ));
    // The new owner never sees the stale write.
    let kv = r2.get(&b("a")).await.unwrap().unwrap();
    assert_eq!((bytes_of(&kv), kv.version), (&b"1"[..], 1));
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn checkpoints_truncate_whole_changelog_segments() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "trunc").unwrap();
    let cfg = TableConfig {
        ranges: 1,
        changelog: StreamConfig {
            segment_max_entries: 10,
            ..StreamConfig::changelog()
        },
        ..Default::default()
    };
    t.create(&name, cfg).await.unwrap();
    let s1 = session(&c).await;
    let r = t.open_range(&name, 0, &s1, me("s1")).await.unwrap();
    let changelog = Name::changelog(&name, 0);
    for i in 0..55 {
        r.put(
            Bytes::from(format!("k{}", i % 20)),
            Value::Number(i),
            None,
            false,
        )
        .await
        .unwrap();
    }
    let cp1 = r.checkpoint().await.unwrap();
    assert_eq!((cp1.revision, cp1.offset, cp1.keys), (55, 55, 20));
    let info = t.streams().info(&changelog).await.unwrap();
    assert_eq!(
        info.start_offset, 50,
        "whole segments of 10 before offset 55"
    );
    assert!(info.segments.iter().all(|s| s.start_offset >= 50));
    // Nothing changed: the same checkpoint.
    assert_eq!(r.checkpoint().await.unwrap(), cp1);
    for i in 55..80 {
        r.put(
            Bytes::from(format!("k{}", i % 20)),
            Value::Number(i),
            None,
            false,
        )
        .await
        .unwrap();
    }
    let cp2 = r.checkpoint().await.unwrap();
    assert_eq!((cp2.revision, cp2.offset), (80, 80));
    assert_ne!(cp2.ledger, cp1.ledger);
    // The segment [70, 80) is full but still the last one (segments roll on the next append),
    // so it stays.
    assert_eq!(t.streams().info(&changelog).await.unwrap().start_offset, 70);
    // The replaced checkpoint ledger is gone.
    let client = Client::connect(ClientConfig::new(c.uri.clone()))
        .await
        .unwrap();
    assert!(matches!(
        client.open(cp1.ledger, b"").await,
        Err(LedgerError::NoSuchLedger(_))
    ));
    let want = dump(&r).await;
    drop(r);
    c.store.revoke_lease(s1.lease()).await.unwrap();
    let s2 = session(&c).await;
    let r2 = t.open_range(&name, 0, &s2, me("s2")).await.unwrap();
    assert_eq!(dump(&r2).await, want);
    assert_eq!(r2.stats().revision, 80);
    r2.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn background_checkpoints_after_enough_updates() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "auto").unwrap();
    t.create(
        &name,
        TableConfig {
            ranges: 1,
            checkpoint_every: 20,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let s1 = session(&c).await;
    let r = t.open_range(&name, 0, &s1, me("s1")).await.unwrap();
    for i in 0..25 {
        r.increment(b("n"), i).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    let cp = loop {
        if let Some(cp) = r.stats().checkpoint {
            break cp;
        }
        assert!(Instant::now() < deadline, "no background checkpoint");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(cp.revision >= 20);
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn table_administration() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let a = Name::new("ns", "a").unwrap();
    let bn = Name::new("ns", "b").unwrap();
    assert!(matches!(
        t.create(
            &a,
            TableConfig {
                ranges: 0,
                ..Default::default()
            }
        )
        .await,
        Err(Error::InvalidArgument(_))
    ));
    let meta = t
        .create(
            &a,
            TableConfig {
                ranges: 2,
                ..Default::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(t.info(&a).await.unwrap(), meta);
    assert!(matches!(
        t.create(&a, TableConfig::default()).await,
        Err(Error::AlreadyExists(_))
    ));
    t.create(&bn, one_range()).await.unwrap();
    assert_eq!(t.list("ns").await.unwrap(), vec![a.clone(), bn.clone()]);
    assert!(t.list("other").await.unwrap().is_empty());
    // Changelogs exist per range.
    for r in 0..2 {
        t.streams().info(&Name::changelog(&a, r)).await.unwrap();
    }
    // Write and checkpoint a range, then delete the table: metadata, checkpoint, changelogs.
    let s = session(&c).await;
    let key = (0..)
        .map(|i| Bytes::from(format!("k{i}")))
        .find(|k| range_of(k, 2) == 1)
        .unwrap();
    let r = t.open_range(&a, 1, &s, me("s1")).await.unwrap();
    r.put(key, "v".into(), None, false).await.unwrap();
    let cp = r.checkpoint().await.unwrap();
    r.close().await.unwrap();
    t.delete(&a).await.unwrap();
    assert!(matches!(t.info(&a).await, Err(Error::NoSuchTable(_))));
    assert!(matches!(t.delete(&a).await, Err(Error::NoSuchTable(_))));
    assert!(matches!(
        t.open_range(&a, 0, &s, me("s1")).await,
        Err(Error::NoSuchTable(_))
    ));
    for r in 0..2 {
        assert!(matches!(
            t.streams().info(&Name::changelog(&a, r)).await,
            Err(Error::NoSuchStream(_))
        ));
    }
    let client = Client::connect(ClientConfig::new(c.uri.clone()))
        .await
        .unwrap();
    assert!(matches!(
        client.open(cp.ledger, b"").await,
        Err(LedgerError::NoSuchLedger(_))
    ));
    assert_eq!(t.list("ns").await.unwrap(), vec![bn]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn replay_refuses_a_gap_or_garbage_in_the_changelog() {
    use quire_stream_table::table::codec::encode_effect;
    use quire_stream_table::table::state::{Effect, Entry};

    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let s = session(&c).await;
    let effect = |revision: u64| Effect {
        revision,
        changes: vec![(
            b("k"),
            Some(Entry {
                value: Value::Number(7),
                version: 1,
                create_revision: revision,
                mod_revision: revision,
            }),
        )],
    };
    for (table, bad) in [
        ("gap", encode_effect(&effect(3))),
        ("garbage", Bytes::from_static(b"not a changelog record")),
    ] {
        let name = Name::new("ns", table).unwrap();
        t.create(&name, one_range()).await.unwrap();
        let r = t.open_range(&name, 0, &s, me("s1")).await.unwrap();
        r.put(b("a"), "1".into(), None, false).await.unwrap();
        r.close().await.unwrap();
        // Someone else writes to the changelog behind the table's back.
        let w = t
            .streams()
            .open_writer(&Name::changelog(&name, 0), &s, me("intruder"))
            .await
            .unwrap();
        w.append(bad).await.unwrap();
        w.close().await.unwrap();
        match t.open_range(&name, 0, &s, me("s1")).await {
            Err(Error::Corrupt(_)) => {}
            Err(e) => panic!("{table}: {e}"),
            Ok(_) => panic!("{table}: a corrupt changelog was replayed"),
        }
    }
    // A record at or below the checkpoint's revision is skipped (a replay overlap), not refused.
    let name = Name::new("ns", "overlap").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let r = t.open_range(&name, 0, &s, me("s1")).await.unwrap();
    r.put(b("a"), "1".into(), None, false).await.unwrap();
    r.close().await.unwrap();
    let w = t
        .streams()
        .open_writer(&Name::changelog(&name, 0), &s, me("intruder"))
        .await
        .unwrap();
    w.append(encode_effect(&effect(1))).await.unwrap();
    w.close().await.unwrap();
    let r = t.open_range(&name, 0, &s, me("s1")).await.unwrap();
    assert!(r.get(&b("k")).await.unwrap().is_none());
    assert_eq!(r.stats().revision, 1);
    r.close().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_created_again_does_not_inherit_a_deleted_tables_leftovers() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "again").unwrap();
    t.create(&name, one_range()).await.unwrap();
    let s1 = session(&c).await;
    let r1 = t.open_range(&name, 0, &s1, me("s1")).await.unwrap();
    write_batch(&r1, 1, 30).await;
    r1.checkpoint().await.unwrap();
    write_batch(&r1, 2, 10).await;
    // An interrupted delete: only the table record went; the owner then vanished.
    c.store
        .delete(&quire_stream_table::layout::table_key(&name), None)
        .await
        .unwrap();
    drop(r1);
    c.store.revoke_lease(s1.lease()).await.unwrap();

    t.create(&name, one_range()).await.unwrap();
    let s2 = session(&c).await;
    let r2 = t.open_range(&name, 0, &s2, me("s2")).await.unwrap();
    assert_eq!(dump(&r2).await, vec![], "the new table starts empty");
    assert_eq!(r2.stats().revision, 0);
    r2.put(b("k"), Value::Number(7), None, false).await.unwrap();
    assert_eq!(r2.get(&b("k")).await.unwrap().unwrap().version, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_left_from_a_deleted_table_cannot_checkpoint_into_the_new_one() {
    let c = Cluster::start(3).await;
    let t = tables(&c).await;
    let name = Name::new("ns", "incarnation").unwrap();
    let pointer = quire_stream_table::layout::checkpoint_key(&name, 0);
    t.create(&name, one_range()).await.unwrap();
    let s1 = session(&c).await;
    let old = t.open_range(&name, 0, &s1, me("s1")).await.unwrap();
    write_batch(&old, 1, 30).await;
    // Deleted and created again (by another server) while the old owner still runs.
    t.delete(&name).await.unwrap();
    t.create(&name, one_range()).await.unwrap();

    // Its checkpoint does not become the new table's first one ...
    assert!(
        matches!(old.checkpoint().await, Err(Error::NoSuchTable(_))),
        "a checkpoint of the deleted table was published"
    );
    assert!(c.store.get(&pointer).await.unwrap().is_none());

    // ... nor replaces the new table's own, although its revision is higher.
    let s2 = session(&c).await;
    let new = t.open_range(&name, 0, &s2, me("s2")).await.unwrap();
    new.put(b("k"), Value::Number(7), None, false)
        .await
        .unwrap();
    let cp = new.checkpoint().await.unwrap();
    assert!(old.stats().revision > cp.revision);
    let before = c.store.get(&pointer).await.unwrap().unwrap();
    assert!(matches!(old.checkpoint().await, Err(Error::NoSuchTable(_))));
    let after = c.store.get(&pointer).await.unwrap().unwrap();
    assert_eq!(
        (after.version, &after.value),
        (before.version, &before.value)
    );
    drop(old);
    new.close().await.unwrap();

    // The next owner restores the new table only.
    let s3 = session(&c).await;
    let next = t.open_range(&name, 0, &s3, me("s3")).await.unwrap();
    let all = dump(&next).await;
    assert_eq!(all.len(), 1, "{all:?}");
    assert_eq!(all[0].key, b("k"));
    assert_eq!(all[0].value, Value::Number(7));
}
