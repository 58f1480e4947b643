//! Streams against an in-process cluster (embedded metadata store on loopback, three real
//! bookies): contiguous offsets across rollovers, tailing reads across rollovers, takeover with
//! fencing, the writer lease, truncation by whole segments, deletion, config checks.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire_bookie::testkit::Cluster;
use quire_ledger_client::{Client, ClientConfig, LedgerError};
use quire_metadata::session::Session;
use quire_stream_table::stream::{StreamConfig, Streams, WriterInfo};
use quire_stream_table::{Error, Name};

async fn streams(c: &Cluster) -> Streams {
    let mut cfg = ClientConfig::new(c.uri.clone());
    cfg.add_timeout = Duration::from_secs(2);
    cfg.explicit_lac_interval = Some(Duration::from_millis(100));
    let client = Client::connect(cfg).await.unwrap();
    Streams::new(c.store.clone(), client)
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

fn small(entries: u64) -> StreamConfig {
    StreamConfig {
        segment_max_entries: entries,
        ..Default::default()
    }
}

fn payload(i: u64) -> Bytes {
    Bytes::from(format!("record-{i}-{}", "x".repeat((i % 50) as usize)))
}

/// Waits until readers see `end` as the stream's end: the last record of an idle writer is
/// confirmed to readers by its explicit LAC, a moment after its acknowledgement.
async fn wait_visible(s: &Streams, name: &Name, end: u64) {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut r = s.reader(name).await.unwrap();
    while r.end_offset().await.unwrap() < end {
        assert!(Instant::now() < deadline, "{end} never became visible");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Reads every confirmed record from `from` to the end.
async fn read_all(s: &Streams, name: &Name, from: u64) -> Vec<(u64, Bytes)> {
    let mut r = s.reader(name).await.unwrap();
    let mut out = Vec::new();
    let mut next = from;
    loop {
        let recs = r.read(next, 7, 1 << 20).await.unwrap();
        if recs.is_empty() {
            return out;
        }
        for rec in recs {
            assert_eq!(rec.offset, next, "offsets are contiguous");
            next += 1;
            out.push((rec.offset, rec.payload));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn appends_get_contiguous_offsets_across_rollovers() {
    let c = Cluster::start(3).await;
    let s = streams(&c).await;
    let name = Name::new("ns", "events").unwrap();
    s.create(&name, small(10)).await.unwrap();
    assert!(matches!(
        s.create(&name, small(10)).await,
        Err(Error::AlreadyExists(_))
    ));
    let sess = session(&c).await;
    let w = s.open_writer(&name, &sess, me("w1")).await.unwrap();
    assert_eq!(w.end_offset(), 0);
    // Pipelined appends: offsets in call order, futures resolve in that order.
    let mut futs = Vec::new();
    for i in 0..35 {
        futs.push(w.append_async(payload(i)).await.unwrap());
    }
    for (i, f) in futs.into_iter().enumerate() {
        assert_eq!(f.await.unwrap(), i as u64);
    }
    for i in 35..47 {
        assert_eq!(w.append(payload(i)).await.unwrap(), i);
    }
    assert_eq!(w.end_offset(), 47);
    assert_eq!(w.confirmed_offset(), 47);
    wait_visible(&s, &name, 47).await;

    let info = s.info(&name).await.unwrap();
    assert_eq!(info.writer, Some(me("w1")));
    assert_eq!(info.start_offset, 0);
    assert_eq!(info.segments.len(), 5, "{:?}", info.segments);
    for (i, seg) in info.segments.iter().enumerate() {
        assert_eq!(seg.seq, i as u64);
        assert_eq!(seg.start_offset, 10 * i as u64);
        let expect = if i < 4 { Some(10) } else { None };
        assert_eq!(seg.count, expect);
    }
    let got = read_all(&s, &name, 0).await;
    assert_eq!(got.len(), 47);
    for (o, p) in &got {
        assert_eq!(*p, payload(*o));
    }
    // Reading from the middle, bounded by bytes: at least one record.
    let mut r = s.reader(&name).await.unwrap();
    let one = r.read(13, 100, 1).await.unwrap();
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].offset, 13);
    let many = r.read(13, 100, 1 << 20).await.unwrap();
    assert_eq!(many.first().unwrap().offset, 13);
    assert_eq!(many.last().unwrap().offset, 46);
    assert!(r.read(47, 10, 1 << 20).await.unwrap().is_empty());
    assert!(matches!(
        r.read(48, 10, 1 << 20).await,
        Err(Error::OutOfRange { end: 47, .. })
    ));
    assert_eq!(r.end_offset().await.unwrap(), 47);

    // A clean close seals the segment and releases the lease.
    w.close().await.unwrap();
    let info = s.info(&name).await.unwrap();
    assert_eq!(info.writer, None);
    assert_eq!(info.segments.last().unwrap().count, Some(7));
    assert_eq!(info.end_offset, 47);
    // The next writer goes on from the end.
    let w2 = s.open_writer(&name, &sess, me("w2")).await.unwrap();
    assert_eq!(w2.append(payload(47)).await.unwrap(), 47);
    wait_visible(&s, &name, 48).await;
    assert_eq!(read_all(&s, &name, 40).await.len(), 8);
    assert_eq!(
        s.list("ns").await.unwrap(),
        vec![Name::new("ns", "events").unwrap()]
    );
    assert!(s.list("other").await.unwrap().is_empty());
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_tail_follows_the_writer_across_rollovers() {
    let c = Cluster::start(3).await;
    let s = streams(&c).await;
    let name = Name::new("ns", "tail").unwrap();
    s.create(&name, small(5)).await.unwrap();
    let sess = session(&c).await;
    let w = s.open_writer(&name, &sess, me("w")).await.unwrap();
    const N: u64 = 60;
    let tail = {
        let s = s.clone();
        let name = name.clone();
        tokio::spawn(async move {
            let mut r = s.reader(&name).await.unwrap();
            let mut next = 0;
            let deadline = Instant::now() + Duration::from_secs(120);
            while next < N {
                assert!(Instant::now() < deadline, "tail stuck at {next}");
                let recs = r
                    .read_wait(next, 100, 1 << 20, Duration::from_secs(5))
                    .await
                    .unwrap();
                for rec in recs {
                    assert_eq!(rec.offset, next);
                    assert_eq!(rec.payload, payload(next));
                    next += 1;
                }
            }
            next
        })
    };
    for i in 0..N {
        assert_eq!(w.append(payload(i)).await.unwrap(), i);
        if i % 7 == 0 {
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
    }
    assert_eq!(tail.await.unwrap(), N);
    // A long poll at the end times out empty.
    let mut r = s.reader(&name).await.unwrap();
    assert!(
        r.read_wait(N, 10, 1 << 20, Duration::from_millis(300))
            .await
            .unwrap()
            .is_empty()
    );
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_takeover_keeps_every_acknowledged_record_and_fences_the_old_writer() {
    let c = Cluster::start(3).await;
    let s = streams(&c).await;
    let name = Name::new("ns", "takeover").unwrap();
    s.create(&name, small(8)).await.unwrap();
    let sa = session(&c).await;
    let sb = session(&c).await;
    let a = s.open_writer(&name, &sa, me("a")).await.unwrap();
    // The lease is held while A lives; re-entrant for A's own session.
    match s.open_writer(&name, &sb, me("b")).await {
        Err(Error::LeaseHeld { holder, addr, .. }) => {
            assert_eq!(holder, "a");
            assert_eq!(addr, "a:4181");
        }
        Err(e) => panic!("expected LeaseHeld, got {e}"),
        Ok(_) => panic!("expected LeaseHeld, got a writer"),
    }

    // A appends from several tasks at once, as fast as it can, until it fails.
    let mut tasks = Vec::new();
    for t in 0..3u64 {
        let a = a.clone();
        tasks.push(tokio::spawn(async move {
            let mut acked = Vec::new();
            let mut err = None;
            for i in 0..10_000u64 {
                let p = Bytes::from(format!("a-{t}-{i}"));
                match a.append(p.clone()).await {
                    Ok(o) => acked.push((o, p)),
                    Err(e) => {
                        err = Some(e);
                        break;
                    }
                }
            }
            (acked, err)
        }));
    }
    // Let A write a few segments' worth, then end its lease and take over with B.
    let deadline = Instant::now() + Duration::from_secs(60);
    while a.confirmed_offset() < 30 {
        assert!(Instant::now() < deadline, "A never got to 30 records");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    c.store.revoke_lease(sa.lease()).await.unwrap();
    let b = s.open_writer(&name, &sb, me("b")).await.unwrap();
    let b_start = b.end_offset();

    let mut acked = Vec::new();
    for t in tasks {
        let (mut got, err) = t.await.unwrap();
        let err = err.expect("A fails once B took over");
        assert!(matches!(err, Error::Fenced(_)), "A failed with {err}");
        acked.append(&mut got);
    }
    assert!(matches!(
        a.append(Bytes::from_static(b"late")).await,
        Err(Error::Fenced(_))
    ));
    assert!(
        acked.len() >= 30,
        "A had {} records acknowledged",
        acked.len()
    );
    // B's records follow A's.
    for i in 0..5 {
        assert_eq!(b.append(payload(i)).await.unwrap(), b_start + i);
    }

    wait_visible(&s, &name, b_start + 5).await;
    let all = read_all(&s, &name, 0).await;
    assert_eq!(all.len() as u64, b_start + 5, "offsets are contiguous");
    // Every record A saw acknowledged is there, at its offset; no payload twice.
    for (o, p) in &acked {
        assert_eq!(&all[*o as usize].1, p, "offset {o}");
    }
    let distinct: BTreeSet<&Bytes> = all.iter().map(|(_, p)| p).collect();
    assert_eq!(distinct.len(), all.len(), "no duplicates");
    // Per task, A's records are in order.
    for t in 0..3u64 {
        let idx: Vec<u64> = all
            .iter()
            .filter_map(|(_, p)| {
                let s = std::str::from_utf8(p).ok()?;
                let rest = s.strip_prefix(&format!("a-{t}-"))?;
                rest.parse().ok()
            })
            .collect();
        assert!(
            idx.windows(2).all(|w| w[1] == w[0] + 1),
            "task {t}: {idx:?}"
        );
    }
    let info = s.info(&name).await.unwrap();
    assert_eq!(info.writer, Some(me("b")));
    assert_eq!(info.end_offset, b_start + 5);
    assert!(info.segments.len() >= 5, "A rolled: {:?}", info.segments);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn writers_that_write_nothing_do_not_grow_the_segment_list() {
    let c = Cluster::start(3).await;
    let s = streams(&c).await;
    let name = Name::new("ns", "reopen").unwrap();
    s.create(&name, small(100)).await.unwrap();
    let first = session(&c).await;
    let w = s.open_writer(&name, &first, me("w0")).await.unwrap();
    for i in 0..3 {
        assert_eq!(w.append(payload(i)).await.unwrap(), i);
    }
    wait_visible(&s, &name, 3).await;
    // A tail reader waits at the end while writers come and go.
    let mut r = s.reader(&name).await.unwrap();
    let tail =
        tokio::spawn(async move { r.read_wait(3, 10, 1 << 20, Duration::from_secs(60)).await });
    c.store.revoke_lease(first.lease()).await.unwrap();

    // Writers that open and die without writing: each one's empty segment is replaced by the
    // next one's, whose ledger takes its place; the replaced ledger is deleted.
    let mut replaced = Vec::new();
    let mut last = None;
    let mut writer = None;
    for k in 1..=4 {
        let sess = session(&c).await;
        let w = s
            .open_writer(&name, &sess, me(&format!("w{k}")))
            .await
            .unwrap();
        assert_eq!(w.end_offset(), 3);
        let info = s.info(&name).await.unwrap();
        assert_eq!(info.segments.len(), 2, "{:?}", info.segments);
        assert_eq!(info.segments[0].count, Some(3));
        assert_eq!(info.segments[1].seq, 1);
        assert_eq!(info.segments[1].start_offset, 3);
        assert_eq!(info.segments[1].count, None);
        replaced.extend(last.replace(info.segments[1].ledger));
        if k < 4 {
            c.store.revoke_lease(sess.lease()).await.unwrap();
        } else {
            writer = Some((w, sess));
        }
    }
    // The last one writes: the reader that waited through it all gets the record.
    let (w, _sess) = writer.unwrap();
    assert_eq!(w.append(payload(3)).await.unwrap(), 3);
    let got = tokio::time::timeout(Duration::from_secs(30), tail)
        .await
        .expect("the tail never returned")
        .unwrap()
        .unwrap();
    assert_eq!(got.first().map(|r| r.offset), Some(3), "{got:?}");
    assert_eq!(got[0].payload, payload(3));
    assert_eq!(replaced.len(), 3);
    for l in replaced {
        assert!(
            matches!(
                s.client().metadata(l).await,
                Err(LedgerError::NoSuchLedger(_))
            ),
            "the replaced ledger {l} is still there"
        );
    }
    assert_eq!(read_all(&s, &name, 0).await.len(), 4);
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn truncation_removes_whole_segments_and_delete_removes_the_ledgers() {
    let c = Cluster::start(3).await;
    let s = streams(&c).await;
    let name = Name::new("ns", "trunc").unwrap();
    s.create(&name, small(10)).await.unwrap();
    let sess = session(&c).await;
    let w = s.open_writer(&name, &sess, me("w")).await.unwrap();
    for i in 0..35 {
        w.append(payload(i)).await.unwrap();
    }
    wait_visible(&s, &name, 35).await;
    let before = s.info(&name).await.unwrap();
    let ledgers: Vec<u64> = before.segments.iter().map(|s| s.ledger).collect();
    assert_eq!(ledgers.len(), 4);
    // 25 falls inside the third segment: only the first two go.
    assert_eq!(s.truncate(&name, 25).await.unwrap(), 20);
    let info = s.info(&name).await.unwrap();
    assert_eq!(info.start_offset, 20);
    assert_eq!(info.segments.len(), 2);
    assert_eq!(info.segments[0].start_offset, 20);
    for l in &ledgers[..2] {
        assert!(matches!(
            s.client().metadata(*l).await,
            Err(LedgerError::NoSuchLedger(_))
        ));
    }
    let mut r = s.reader(&name).await.unwrap();
    assert_eq!(r.start_offset(), 20);
    match r.read(19, 10, 1 << 20).await {
        Err(Error::Truncated { offset, start, .. }) => assert_eq!((offset, start), (19, 20)),
        other => panic!("expected Truncated, got {other:?}"),
    }
    assert_eq!(
        r.read(20, 1, 1 << 20).await.unwrap()[0].payload,
        payload(20)
    );
    // A reader that knew the old start learns of the truncation.
    let mut old = s.reader(&name).await.unwrap();
    assert_eq!(s.truncate(&name, 30).await.unwrap(), 30);
    assert!(matches!(
        old.read(25, 10, 1 << 20).await,
        Err(Error::Truncated { start: 30, .. })
    ));
    // Never the open segment.
    assert_eq!(s.truncate(&name, 1000).await.unwrap(), 30);
    assert_eq!(read_all(&s, &name, 30).await.len(), 5);

    s.delete(&name).await.unwrap();
    assert!(matches!(s.info(&name).await, Err(Error::NoSuchStream(_))));
    for l in &ledgers {
        assert!(matches!(
            s.client().metadata(*l).await,
            Err(LedgerError::NoSuchLedger(_))
        ));
    }
    // The old writer is done for at its next roll at the latest (its segment ledger was fenced
    // and deleted, but a bookie takes adds to a ledger it no longer knows).
    let mut failed = None;
    for i in 0..20 {
        if let Err(e) = w.append(payload(100 + i)).await {
            failed = Some(e);
            break;
        }
    }
    assert!(
        matches!(failed, Some(Error::Fenced(_))),
        "the writer of a deleted stream went on: {failed:?}"
    );
    assert!(matches!(s.delete(&name).await, Err(Error::NoSuchStream(_))));
    c.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_are_refused() {
    let c = Cluster::start(3).await;
    let s = streams(&c).await;
    let name = Name::new("ns", "bad").unwrap();
    for cfg in [
        StreamConfig {
            segment_max_entries: 0,
            ..Default::default()
        },
        StreamConfig {
            ack_quorum: 3,
            write_quorum: 2,
            ..Default::default()
        },
    ] {
        assert!(matches!(
            s.create(&name, cfg).await,
            Err(Error::InvalidArgument(_))
        ));
    }
    assert!(matches!(s.info(&name).await, Err(Error::NoSuchStream(_))));
    let sess = session(&c).await;
    assert!(matches!(
        s.open_writer(&name, &sess, me("w")).await,
        Err(Error::NoSuchStream(_))
    ));
    assert!(matches!(s.reader(&name).await, Err(Error::NoSuchStream(_))));
    // Internal names are allowed through this API.
    let internal = Name::changelog(&name, 0);
    s.create(&internal, StreamConfig::changelog())
        .await
        .unwrap();
    let w = s.open_writer(&internal, &sess, me("w")).await.unwrap();
    let big = Bytes::from(vec![0u8; 6 << 20]);
    assert!(matches!(w.append(big).await, Err(Error::TooLarge(_))));
    // Not fatal.
    assert_eq!(w.append(payload(0)).await.unwrap(), 0);
    c.stop().await;
}
