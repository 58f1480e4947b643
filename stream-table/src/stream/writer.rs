//! The stream writer: lease, takeover, the append pipeline and segment rolling.
//!
//! Opening: take the lease (an ephemeral key under the caller's session, re-entrant for the
//! same session), claim the stream by bumping its writer epoch (from then on the old writer's
//! segment-list changes are refused, even if it has not noticed its lease is gone), recover the
//! last segment if it is open (this fences its old writer), create a ledger for a new segment,
//! and add it by one CAS that also seals the recovered segment with its count (or replaces it
//! when it is empty). The writer is then positioned at the new segment's start.
//!
//! Appending: the current segment sits behind an async mutex. An append takes it, rolls the
//! segment if it is full or old, hands the payload to the segment's ledger writer (which waits
//! for room: that is the backpressure) and notes the offset, all before letting go, so offsets
//! follow call order. The ledger writer acknowledges in entry order, and a roll closes the old
//! ledger (every pending append answered) before the new one takes anything, so acknowledgements
//! follow offset order across segments too.
//!
//! Failure: a ledger error, a segment-list change by someone else, or a lost session makes the
//! writer *failed*: every later call returns that first error. Records whose futures failed may
//! or may not be in the stream (the next writer's recovery decides).

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire_ledger_client::{Client, CreateOptions, LedgerError, LedgerWriter};
use quire_metadata::layout::encode;
use quire_metadata::session::Session;
use quire_metadata::{DynStore, MetaError};
use tokio::sync::OwnedMutexGuard;

use super::meta::{self, Last, StreamConfig, WriterInfo, fenced};
use super::{Streams, ledger_error};
use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;

/// Attempts at taking the lease when its key vanishes between a create and a read.
const LEASE_ATTEMPTS: u32 = 8;
const LEASE_RETRY_PAUSE: Duration = Duration::from_millis(100);
/// After a failed attempt at creating the next segment, the current one takes appends past its
/// limits for this long before the next attempt.
const ROLL_RETRY_PAUSE: Duration = Duration::from_secs(1);

/// The segment being written.
struct Current {
    seq: u64,
    writer: LedgerWriter,
    start_offset: u64,
    /// Records handed to `writer` (its next entry id).
    entries: u64,
    bytes: u64,
    opened: Instant,
    /// No roll before this (after a failed one).
    roll_after: Option<Instant>,
}

struct Shared {
    name: Name,
    store: DynStore,
    client: Client,
    session: Arc<Session>,
    me: WriterInfo,
    config: StreamConfig,
    /// The writer epoch this writer claimed; its segment-list changes require it.
    epoch: u64,
    current: Arc<tokio::sync::Mutex<Current>>,
    /// The first fatal error (or the close); set once.
    failed: parking_lot::Mutex<Option<Error>>,
    /// Next offset to be assigned.
    end: AtomicU64,
    /// Every record below it is acknowledged (as seen through the append futures).
    confirmed: AtomicU64,
    /// The current segment's start and ledger writer, for `confirmed_offset` without the mutex.
    view: parking_lot::Mutex<(u64, LedgerWriter)>,
}

/// Writes one stream. Cheap to clone; clones share the pipeline.
#[derive(Clone)]
pub struct StreamWriter {
    shared: Arc<Shared>,
}

impl Shared {
    /// Makes the writer failed with `e` (unless it already is); returns the error that stands.
    fn fail(&self, e: Error) -> Error {
        let mut f = self.failed.lock();
        match f.as_ref() {
            Some(first) => first.clone(),
            None => {
                tracing::warn!(stream = %self.name, error = %e, "stream writer failed");
                *f = Some(e.clone());
                e
            }
        }
    }

    fn check(&self) -> Result<()> {
        if let Some(e) = self.failed.lock().as_ref() {
            return Err(e.clone());
        }
        if self.session.is_lost() {
            return Err(self.fail(fenced(&self.name, "the writer's session was lost")));
        }
        Ok(())
    }
}

pub(super) async fn open(
    streams: &Streams,
    name: &Name,
    session: &Arc<Session>,
    me: WriterInfo,
) -> Result<StreamWriter> {
    if session.is_lost() {
        return Err(fenced(name, "the writer's session was lost"));
    }
    let (store, client) = (streams.store.clone(), streams.client.clone());
    // NoSuchStream before LeaseHeld.
    meta::load(&store, name).await?;
    take_lease(&store, name, session, &me).await?;
    let (claimed, _) = meta::update(&store, name, |m| {
        m.writer_epoch = m.writer_epoch.wrapping_add(1);
        Ok(true)
    })
    .await?;
    let epoch = claimed.writer_epoch;

    // Once claimed, only this writer (or a newer one, which fences it) changes the segment
    // list, so the takeover needs no retry.
    let (m, writer, seq) = take_over(&store, &client, name, epoch).await?;
    let id = writer.id();
    let start_offset = match m.segments.last() {
        Some(s) if s.ledger == id => s.start_offset,
        _ => {
            return Err(Error::Internal(format!(
                "stream {name}: segment {seq} not added"
            )));
        }
    };
    tracing::info!(stream = %name, segment = seq, ledger = id, start_offset, writer = %me.id,
        "stream writer open");
    let current = Current {
        seq,
        writer: writer.clone(),
        start_offset,
        entries: 0,
        bytes: 0,
        opened: Instant::now(),
        roll_after: None,
    };
    Ok(StreamWriter {
        shared: Arc::new(Shared {
            name: name.clone(),
            store,
            client,
            session: session.clone(),
            me,
            config: m.config,
            epoch,
            current: Arc::new(tokio::sync::Mutex::new(current)),
            failed: parking_lot::Mutex::new(None),
            end: AtomicU64::new(start_offset),
            confirmed: AtomicU64::new(start_offset),
            view: parking_lot::Mutex::new((start_offset, writer)),
        }),
    })
}

/// Recovers (fences and closes) the last segment if its writer left it open, creates the ledger
/// of the next segment and adds it with one CAS that also seals the recovered one.
async fn take_over(
    store: &DynStore,
    client: &Client,
    name: &Name,
    epoch: u64,
) -> Result<(meta::StreamMeta, LedgerWriter, u64)> {
    let (m, _) = meta::load(store, name).await?;
    // A newer writer claimed the stream: recovering now would fence its segment.
    if m.writer_epoch != epoch {
        return Err(fenced(name, "another writer took over"));
    }
    let last = match m.segments.last() {
        None => Last::None,
        Some(s) => match s.count {
            Some(count) => Last::Segment {
                ledger: s.ledger,
                count,
            },
            None => {
                let r = client
                    .recover(s.ledger, &[])
                    .await
                    .map_err(|e| ledger_error(name, e))?;
                let count = (r.lac() + 1) as u64;
                tracing::info!(stream = %name, segment = s.seq, ledger = s.ledger, count,
                    "recovered the open segment of the previous writer");
                Last::Segment {
                    ledger: s.ledger,
                    count,
                }
            }
        },
    };
    // An empty last segment (a writer that opened and wrote nothing) is replaced, not followed.
    let (seq, replaced) = match (last, m.segments.last()) {
        (Last::Segment { ledger, count: 0 }, Some(s)) => (s.seq, Some(ledger)),
        _ => (m.next_seq(), None),
    };
    let writer = create_ledger(client, name, &m.config, seq).await?;
    let id = writer.id();
    match meta::update(store, name, |m| {
        meta::seal_and_add(name, m, epoch, last, seq, id)
    })
    .await
    {
        Ok((m, _)) => {
            if let Some(old) = replaced
                && !m.segments.iter().any(|s| s.ledger == old)
            {
                super::delete_ledger(client, name, old).await;
            }
            Ok((m, writer, seq))
        }
        Err(e) => {
            abandon(client, name, writer, &e).await;
            Err(e)
        }
    }
}

/// Creates the ephemeral lease key, or finds it held by this session already.
async fn take_lease(
    store: &DynStore,
    name: &Name,
    session: &Arc<Session>,
    me: &WriterInfo,
) -> Result<()> {
    let key = layout::writer_key(name);
    let value = encode(meta::WRITER_MAGIC, meta::WRITER_VERSION, me);
    for _ in 0..LEASE_ATTEMPTS {
        match store
            .create(&key, value.clone(), Some(session.lease()))
            .await
        {
            Ok(_) => return Ok(()),
            Err(MetaError::AlreadyExists(_)) => {}
            Err(MetaError::LeaseNotFound(_)) => {
                return Err(fenced(name, "the writer's session was lost"));
            }
            // An unknown outcome shows up as AlreadyExists under our own lease next time.
            Err(MetaError::Unavailable(_) | MetaError::Ambiguous(_)) => {
                tokio::time::sleep(LEASE_RETRY_PAUSE).await;
                continue;
            }
            Err(e) => return Err(e.into()),
        }
        match meta::retry_transient(|| store.get(&key)).await? {
            Some(kv) if kv.lease == session.lease() => {
                // A re-open under the same session: the lease is ours; name the new writer.
                if kv.value != value
                    && let Err(e) = store.compare_and_set(&key, value.clone(), kv.version).await
                {
                    tracing::debug!(stream = %name, error = %e, "writer lease value not updated");
                }
                return Ok(());
            }
            Some(kv) => {
                let (holder, addr) = match meta::decode_writer(&kv) {
                    Ok(w) => (w.id, w.addr),
                    Err(_) => (format!("lease {}", kv.lease), String::new()),
                };
                return Err(Error::LeaseHeld {
                    what: format!("stream {name}"),
                    holder,
                    addr,
                });
            }
            // Released in between: try again.
            None => tokio::time::sleep(LEASE_RETRY_PAUSE).await,
        }
    }
    Err(Error::Unavailable(format!(
        "stream {name}: the writer lease keeps changing hands"
    )))
}

async fn create_ledger(
    client: &Client,
    name: &Name,
    cfg: &StreamConfig,
    seq: u64,
) -> Result<LedgerWriter> {
    let opts = CreateOptions {
        ensemble: cfg.ensemble,
        write_quorum: cfg.write_quorum,
        ack_quorum: cfg.ack_quorum,
        password: Vec::new(),
        custom: [
            ("quire.stream".to_string(), name.path()),
            ("quire.segment".to_string(), seq.to_string()),
        ]
        .into(),
        ..Default::default()
    };
    client.create(opts).await.map_err(|e| ledger_error(name, e))
}

/// Deletes the ledger of a segment that was never added, when the metadata certainly does not
/// name it (an unknown outcome leaves it: an orphan ledger is harmless, a deleted segment not).
async fn abandon(client: &Client, name: &Name, writer: LedgerWriter, why: &Error) {
    let sure = matches!(
        why,
        Error::Fenced(_) | Error::Internal(_) | Error::NoSuchStream(_) | Error::Corrupt(_)
    ) || matches!(why, Error::Metadata(MetaError::BadVersion { .. }));
    if sure {
        let _ = writer.close().await;
        super::delete_ledger(client, name, writer.id()).await;
    } else {
        tracing::warn!(stream = %name, ledger = writer.id(), error = %why,
            "a segment ledger may be left behind (the metadata update's outcome is unknown)");
    }
}

impl StreamWriter {
    pub async fn append_async(
        &self,
        payload: Bytes,
    ) -> Result<impl Future<Output = Result<u64>> + Send + 'static + use<>> {
        let shared = &self.shared;
        shared.check()?;
        let max = shared.client.config().entry_size_max;
        if payload.len() > max {
            return Err(Error::TooLarge(format!(
                "record of {} bytes, the limit is {max}",
                payload.len()
            )));
        }
        let mut cur = shared.current.clone().lock_owned().await;
        shared.check()?;
        if needs_roll(&shared.config, &cur, payload.len() as u64) {
            let task = tokio::spawn(roll(shared.clone(), cur));
            let (guard, r) = task
                .await
                .map_err(|e| shared.fail(Error::Internal(format!("segment roll failed: {e}"))))?;
            cur = guard;
            r?;
        }
        let len = payload.len() as u64;
        let fut = match cur.writer.append_async(payload).await {
            Ok(f) => f,
            Err(e @ LedgerError::TooLarge { .. }) => return Err(ledger_error(&shared.name, e)),
            Err(e) => return Err(shared.fail(ledger_error(&shared.name, e))),
        };
        let entry = cur.entries;
        cur.entries += 1;
        cur.bytes += len;
        let offset = cur.start_offset + entry;
        shared.end.store(offset + 1, Ordering::Release);
        drop(cur);
        let shared = shared.clone();
        Ok(async move {
            match fut.await {
                Ok(id) if id == entry => {
                    shared.confirmed.fetch_max(offset + 1, Ordering::AcqRel);
                    Ok(offset)
                }
                Ok(id) => Err(shared.fail(Error::Internal(format!(
                    "stream {}: the ledger gave entry id {id}, expected {entry}",
                    shared.name
                )))),
                Err(e) => Err(shared.fail(ledger_error(&shared.name, e))),
            }
        })
    }

    pub async fn append(&self, payload: Bytes) -> Result<u64> {
        self.append_async(payload).await?.await
    }

    pub fn end_offset(&self) -> u64 {
        self.shared.end.load(Ordering::Acquire)
    }

    pub fn confirmed_offset(&self) -> u64 {
        let (start, lac) = {
            let v = self.shared.view.lock();
            (v.0, v.1.lac())
        };
        self.shared
            .confirmed
            .load(Ordering::Acquire)
            .max(start + (lac + 1) as u64)
    }

    pub async fn close(self) -> Result<()> {
        let shared = &self.shared;
        let cur = shared.current.clone().lock_owned().await;
        shared.check()?;
        let name = &shared.name;
        let sealed = async {
            let closed = cur
                .writer
                .close()
                .await
                .map_err(|e| ledger_error(name, e))?;
            let count = (closed.last_entry_id + 1) as u64;
            let ledger = cur.writer.id();
            meta::update(&shared.store, name, |m| {
                meta::seal(name, m, shared.epoch, ledger, count)
            })
            .await?;
            Ok::<u64, Error>(count)
        }
        .await;
        let count = sealed.map_err(|e| shared.fail(e))?;
        *shared.failed.lock() = Some(fenced(name, "the writer was closed"));
        release_lease(shared).await;
        tracing::info!(stream = %name, segment = cur.seq, count, "stream writer closed");
        Ok(())
    }
}

/// Deletes the lease key if this writer's session still holds it under this writer's name.
async fn release_lease(shared: &Shared) {
    let key = layout::writer_key(&shared.name);
    match shared.store.get(&key).await {
        Ok(Some(kv)) if kv.lease == shared.session.lease() => {
            if meta::decode_writer(&kv).is_ok_and(|w| w == shared.me)
                && let Err(e) = shared.store.delete(&key, Some(kv.version)).await
            {
                tracing::warn!(stream = %shared.name, error = %e, "could not release the writer lease");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::warn!(stream = %shared.name, error = %e, "could not release the writer lease")
        }
    }
}

fn needs_roll(cfg: &StreamConfig, cur: &Current, len: u64) -> bool {
    if cur.entries == 0 || cur.roll_after.is_some_and(|t| Instant::now() < t) {
        return false;
    }
    cur.entries >= cfg.segment_max_entries
        || cur.bytes + len > cfg.segment_max_bytes
        || cur.opened.elapsed() >= cfg.segment_max_age
}

/// Rolls to the next segment: create its ledger, close the current one (its pending appends
/// finish first), then seal the current and add the next in one CAS. Runs as its own task, so
/// that an append dropped halfway does not leave the roll half done; hands the guard back.
async fn roll(
    shared: Arc<Shared>,
    mut cur: OwnedMutexGuard<Current>,
) -> (OwnedMutexGuard<Current>, Result<()>) {
    let name = &shared.name;
    let seq = cur.seq + 1;
    let next = match create_ledger(&shared.client, name, &shared.config, seq).await {
        Ok(w) => w,
        Err(e) => {
            // Not fatal: the current segment goes on past its limits for a while.
            tracing::warn!(stream = %name, error = %e,
                "could not create the next segment; the current one goes on");
            cur.roll_after = Some(Instant::now() + ROLL_RETRY_PAUSE);
            return (cur, Ok(()));
        }
    };
    let old = cur.writer.id();
    let count = match cur.writer.close().await {
        Ok(m) => (m.last_entry_id + 1) as u64,
        Err(e) => {
            let e = shared.fail(ledger_error(name, e));
            abandon(&shared.client, name, next, &e).await;
            return (cur, Err(e));
        }
    };
    if count != cur.entries {
        let e = shared.fail(Error::Internal(format!(
            "stream {name}: segment {} closed with {count} records, {} were written",
            cur.seq, cur.entries
        )));
        abandon(&shared.client, name, next, &e).await;
        return (cur, Err(e));
    }
    let last = Last::Segment { ledger: old, count };
    let id = next.id();
    let r = meta::update(&shared.store, name, |m| {
        meta::seal_and_add(name, m, shared.epoch, last, seq, id)
    })
    .await;
    let start_offset = match r {
        Ok((m, _)) => match m.segments.last() {
            Some(s) if s.ledger == id => s.start_offset,
            _ => {
                let e = Error::Internal(format!("stream {name}: segment {seq} not added"));
                return (cur, Err(shared.fail(e)));
            }
        },
        Err(e) => {
            let e = match e {
                Error::NoSuchStream(_) => fenced(name, "the stream was deleted"),
                e => e,
            };
            let e = shared.fail(e);
            abandon(&shared.client, name, next, &e).await;
            return (cur, Err(e));
        }
    };
    tracing::debug!(stream = %name, segment = seq, ledger = id, start_offset,
        sealed = cur.seq, count, "segment rolled");
    *cur = Current {
        seq,
        writer: next.clone(),
        start_offset,
        entries: 0,
        bytes: 0,
        opened: Instant::now(),
        roll_after: None,
    };
    *shared.view.lock() = (start_offset, next);
    (cur, Ok(()))
}
