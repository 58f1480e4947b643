//! One owned table range: the sequencer task, the committed store readers share, restore and
//! background checkpoints.
//!
//! The sequencer is one task per range. It takes commands from a bounded channel, evaluates each
//! with the [`Machine`] against committed + pending state, encodes the effect and hands it to the
//! changelog writer (`append_async`, which waits for room: backpressure), then goes on with the
//! next command without waiting for the acknowledgement. Acknowledgements come back in order
//! (the writer resolves them in offset order); each is applied to the committed [`Store`] (under
//! a write lock held for that one apply) and only then answered. Read-only outcomes queue behind
//! the writes sequenced before them. At most [`IN_FLIGHT_MAX`] commands wait for the log.
//!
//! Failure: an append error (the writer was fenced, a ledger failed) or the loss of the owner's
//! session fails the range for good: commands in flight answer `Ambiguous`, queued and later ones
//! `Unavailable` (retryable: the server drops the range and the next request reopens it, which
//! restores from the log), and reads answer `Unavailable` too, since a new owner may be writing.
//!
//! Restore: after the lease is taken (`open_writer` has fenced and sealed the previous owner's
//! last segment, so everything up to `writer.end_offset()` is confirmed and final), load the
//! newest checkpoint, then replay changelog records from its offset to that end, skipping records
//! at or below the checkpoint's revision and refusing a gap.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::StreamExt;
use futures::future::BoxFuture;
use futures::stream::FuturesOrdered;
use parking_lot::{Mutex, RwLock};
use quire_metadata::MetaError;
use quire_metadata::session::Session;
use tokio::sync::{Notify, mpsc, oneshot, watch};

use super::checkpoint::{self, Checkpoint};
use super::codec;
use super::model::{
    DeleteResult, Expect, KeyValue, PutResult, RECORD_MAX, Txn, TxnResult, Value, check_key,
    range_of,
};
use super::state::{Command, Effect, Limits, Machine, Outcome, Store};
use super::{TableMeta, Tables};
use crate::error::{Error, Result};
use crate::names::Name;
use crate::stream::{StreamWriter, WriterInfo};

/// Commands queued for the sequencer.
const QUEUE_MAX: usize = 1024;
/// Commands sent to the changelog and not yet acknowledged (the writer bounds bytes too).
pub const IN_FLIGHT_MAX: usize = 8192;
/// How long a caller waits for its command's outcome. Past it the outcome is unknown.
const OP_TIMEOUT: Duration = Duration::from_secs(30);
/// Changelog records read per replay step, and their byte budget.
const REPLAY_BATCH: usize = 1000;
const REPLAY_BYTES: usize = 16 << 20;

/// What a range reports about itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RangeStats {
    pub table: Name,
    pub range: u32,
    /// Committed revision.
    pub revision: u64,
    pub keys: u64,
    /// Memory used by the committed state.
    pub bytes: u64,
    /// Commands sent to the changelog, not acknowledged yet.
    pub pending: u64,
    /// First changelog offset not applied.
    pub changelog_offset: u64,
    /// The newest checkpoint this owner knows of.
    pub checkpoint: Option<Checkpoint>,
    pub failed: bool,
}

/// The committed state and the changelog position it corresponds to.
struct Committed {
    store: Store,
    /// First changelog offset not applied.
    offset: u64,
}

enum Request {
    Command(Command, oneshot::Sender<Result<Outcome>>),
    /// Finish what is in flight, then stop.
    Drain(oneshot::Sender<()>),
}

struct Inner {
    tables: Tables,
    table: Name,
    changelog: Name,
    range: u32,
    meta: TableMeta,
    committed: RwLock<Committed>,
    writer: StreamWriter,
    /// Why the range stopped serving (failed or closed).
    stopped: Mutex<Option<Error>>,
    is_stopped: AtomicBool,
    /// Stopped by a failure (not by a close or by being dropped).
    failed: AtomicBool,
    /// `close` was called (by any clone).
    closing: AtomicBool,
    pending: AtomicU64,
    /// Serializes checkpoints.
    checkpointing: tokio::sync::Mutex<()>,
    last_checkpoint: Mutex<Option<Checkpoint>>,
    last_checkpoint_revision: AtomicU64,
    wake_checkpoint: Notify,
    /// Set once stopped; stops the background checkpointer.
    shutdown: watch::Sender<bool>,
}

impl Inner {
    fn stop(&self, why: Error) {
        let mut s = self.stopped.lock();
        if s.is_none() {
            *s = Some(why);
            self.is_stopped.store(true, Ordering::Release);
        }
        self.shutdown.send_replace(true);
    }

    /// The error later requests get once stopped.
    fn check(&self) -> Result<()> {
        if !self.is_stopped.load(Ordering::Acquire) {
            return Ok(());
        }
        let why = self
            .stopped
            .lock()
            .as_ref()
            .map_or_else(|| "stopped".to_string(), ToString::to_string);
        Err(Error::Unavailable(format!(
            "range {} of {} is not served here any more ({why}); retry",
            self.range, self.table
        )))
    }
}

/// An owned range of a table. Cheap to clone; the range stops (after finishing what is in
/// flight) when the last clone is dropped, keeping its lease until [`Range::close`] or the
/// session ends.
#[derive(Clone)]
pub struct Range {
    inner: Arc<Inner>,
    /// The sequencer stops once every sender (every clone of the range) is gone.
    tx: mpsc::Sender<Request>,
}

impl Range {
    pub(crate) async fn open(
        tables: Tables,
        meta: TableMeta,
        range: u32,
        session: Arc<Session>,
        me: WriterInfo,
    ) -> Result<Range> {
        let table = meta.name.clone();
        let changelog = Name::changelog(&table, range);
        let writer = tables
            .streams()
            .open_writer(&changelog, &session, me)
            .await?;
        let restored = restore(&tables, &meta, range, &changelog, &writer).await;
        let (store, offset, cp) = match restored {
            Ok(r) => r,
            Err(e) => {
                // Give the lease back so that a retry (here or elsewhere) can take it at once.
                if let Err(ce) = writer.close().await {
                    tracing::warn!(table = %table, range, error = %ce,
                        "could not release the changelog after a failed restore");
                }
                return Err(e);
            }
        };
        tracing::info!(table = %table, range, revision = store.revision(), keys = store.keys(),
            offset, "range restored");
        let machine = Machine::new(
            &store,
            Limits {
                max_bytes: meta.config.max_bytes,
            },
        );
        let (tx, rx) = mpsc::channel(QUEUE_MAX);
        let inner = Arc::new(Inner {
            tables,
            table,
            changelog,
            range,
            last_checkpoint_revision: AtomicU64::new(cp.as_ref().map_or(0, |c| c.revision)),
            last_checkpoint: Mutex::new(cp),
            meta,
            committed: RwLock::new(Committed { store, offset }),
            writer: writer.clone(),
            stopped: Mutex::new(None),
            is_stopped: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            closing: AtomicBool::new(false),
            pending: AtomicU64::new(0),
            checkpointing: tokio::sync::Mutex::new(()),
            wake_checkpoint: Notify::new(),
            shutdown: watch::channel(false).0,
        });
        let seq = Sequencer {
            inner: inner.clone(),
            machine,
            writer,
            in_flight: FuturesOrdered::new(),
            waiting: VecDeque::new(),
        };
        tokio::spawn(seq.run(rx, session));
        tokio::spawn(checkpointer(inner.clone()));
        Ok(Range { inner, tx })
    }

    pub fn table(&self) -> &Name {
        &self.inner.table
    }

    pub fn range(&self) -> u32 {
        self.inner.range
    }

    pub fn meta(&self) -> &TableMeta {
        &self.inner.meta
    }

    /// Whether the range stopped serving (failed or closed): drop it and reopen.
    pub fn is_failed(&self) -> bool {
        self.inner.is_stopped.load(Ordering::Acquire)
    }

    fn check_own_key(&self, key: &[u8]) -> Result<()> {
        check_key(key)?;
        let ranges = self.inner.meta.config.ranges;
        let r = range_of(key, ranges);
        if r != self.inner.range {
            return Err(Error::InvalidArgument(format!(
                "key belongs to range {r} of table {}, not range {}",
                self.inner.table, self.inner.range
            )));
        }
        Ok(())
    }

    fn check_keys(&self, cmd: &Command) -> Result<()> {
        let keys = cmd.keys();
        let ranges = self.inner.meta.config.ranges;
        match super::model::common_range(keys.iter().copied(), ranges)? {
            Some(r) if r != self.inner.range => Err(Error::InvalidArgument(format!(
                "keys belong to range {r} of table {}, not range {}",
                self.inner.table, self.inner.range
            ))),
            _ => Ok(()),
        }
    }

    /// The committed value of a key.
    pub async fn get(&self, key: &Bytes) -> Result<Option<KeyValue>> {
        self.check_own_key(key)?;
        self.inner.check()?;
        Ok(self.inner.committed.read().store.get(key))
    }

    /// Committed keys of this range in `[start, end)` (end `None`: to the last), in key order,
    /// at most `limit` (0 or above [`super::SCAN_LIMIT_MAX`]: that maximum) and about
    /// [`super::SCAN_BYTES_MAX`] bytes; `more` says whether keys follow.
    pub async fn scan(
        &self,
        start: &Bytes,
        end: Option<&Bytes>,
        limit: usize,
    ) -> Result<(Vec<KeyValue>, bool)> {
        self.inner.check()?;
        Ok(self
            .inner
            .committed
            .read()
            .store
            .scan(start, end.map(|e| &e[..]), limit))
    }

    pub async fn put(
        &self,
        key: Bytes,
        value: Value,
        expect: Option<Expect>,
        prev_kv: bool,
    ) -> Result<PutResult> {
        match self
            .submit(Command::Put {
                key,
                value,
                expect,
                prev_kv,
            })
            .await?
        {
            Outcome::Put(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    pub async fn delete(
        &self,
        key: Bytes,
        expect: Option<Expect>,
        prev_kv: bool,
    ) -> Result<DeleteResult> {
        match self
            .submit(Command::Delete {
                key,
                expect,
                prev_kv,
            })
            .await?
        {
            Outcome::Delete(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    /// Adds `amount` to a number (an absent key counts as 0); returns the new total.
    pub async fn increment(&self, key: Bytes, amount: i64) -> Result<i64> {
        match self.submit(Command::Increment { key, amount }).await? {
            Outcome::Increment(n) => Ok(n),
            o => Err(unexpected(o)),
        }
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        match self.submit(Command::Txn(txn)).await? {
            Outcome::Txn(r) => Ok(r),
            o => Err(unexpected(o)),
        }
    }

    async fn submit(&self, cmd: Command) -> Result<Outcome> {
        // Cheap checks here, so bad input never queues.
        cmd.check()?;
        self.check_keys(&cmd)?;
        self.inner.check()?;
        let (reply, rx) = oneshot::channel();
        let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
        match tokio::time::timeout_at(deadline, self.tx.send(Request::Command(cmd, reply))).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => return Err(self.stopped_error()),
            Err(_) => {
                return Err(Error::Timeout(format!(
                    "range {} of {} is too busy to take the command",
                    self.inner.range, self.inner.table
                )));
            }
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Ok(Ok(r)) => r,
            // The sequencer dropped the command unanswered: it stopped before evaluating it.
            Ok(Err(_)) => Err(self.stopped_error()),
            Err(_) => Err(Error::Ambiguous(format!(
                "no outcome within {OP_TIMEOUT:?} on range {} of {}",
                self.inner.range, self.inner.table
            ))),
        }
    }

    fn stopped_error(&self) -> Error {
        self.inner.check().err().unwrap_or_else(|| {
            Error::Unavailable(format!(
                "range {} of {} stopped; retry",
                self.inner.range, self.inner.table
            ))
        })
    }

    /// Checkpoints the committed state now (see [`checkpoint`] for the steps); returns the
    /// pointer that is current afterwards. Without changes since the last one, returns it.
    pub async fn checkpoint(&self) -> Result<Checkpoint> {
        self.inner.check()?;
        run_checkpoint(&self.inner).await
    }

    pub fn stats(&self) -> RangeStats {
        let (revision, keys, bytes, offset) = {
            let c = self.inner.committed.read();
            (
                c.store.revision(),
                c.store.keys(),
                c.store.bytes(),
                c.offset,
            )
        };
        RangeStats {
            table: self.inner.table.clone(),
            range: self.inner.range,
            revision,
            keys,
            bytes,
            pending: self.inner.pending.load(Ordering::Relaxed),
            changelog_offset: offset,
            checkpoint: self.inner.last_checkpoint.lock().clone(),
            failed: self.is_failed(),
        }
    }

    /// Stops taking commands, finishes those in flight, writes a final checkpoint and releases
    /// the lease (closing the changelog's segment). Other clones answer `Unavailable` after.
    pub async fn close(self) -> Result<()> {
        let inner = &self.inner;
        if inner.closing.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        if !inner.is_stopped.load(Ordering::Acquire) {
            let (tx, rx) = oneshot::channel();
            let deadline = tokio::time::Instant::now() + OP_TIMEOUT;
            if let Ok(Ok(())) =
                tokio::time::timeout_at(deadline, self.tx.send(Request::Drain(tx))).await
            {
                let _ = tokio::time::timeout_at(deadline, rx).await;
            }
        }
        let failed = inner.failed.load(Ordering::Acquire);
        inner.stop(Error::Unavailable("the range was closed".into()));
        if failed {
            // The changelog writer already failed (or was fenced): nothing to checkpoint or
            // release cleanly; the lease goes with the writer or the session.
            if let Err(e) = inner.writer.clone().close().await {
                tracing::debug!(table = %inner.table, range = inner.range, error = %e,
                    "closing the changelog of a failed range");
            }
            return Ok(());
        }
        // A final checkpoint makes the next open fast; the lease is released either way.
        if let Err(e) = run_checkpoint(inner).await {
            tracing::warn!(table = %inner.table, range = inner.range, error = %e,
                "final checkpoint failed");
        }
        inner.writer.clone().close().await
    }
}

fn unexpected(o: Outcome) -> Error {
    Error::Internal(format!("unexpected outcome {o:?}"))
}

/// Loads the newest checkpoint and replays the changelog to the writer's end. Returns the store,
/// the first offset not applied and the checkpoint.
async fn restore(
    tables: &Tables,
    meta: &TableMeta,
    range: u32,
    changelog: &Name,
    writer: &StreamWriter,
) -> Result<(Store, u64, Option<Checkpoint>)> {
    let table = &meta.name;
    let pointer = checkpoint::read_pointer(tables.store(), table, range).await?;
    let (mut store, mut from, cp) = match pointer {
        // Publishing checks the incarnation, and creating a table removes the pointers left
        // over from a deleted one; a pointer of another incarnation means those were raced.
        Some((cp, _)) if cp.table_created_ms != 0 && cp.table_created_ms != meta.created_ms => {
            return Err(Error::Corrupt(format!(
                "the checkpoint pointer of {table} range {range} belongs to the table of that name \
                 created at {} ms, not to this one (created at {} ms)",
                cp.table_created_ms, meta.created_ms
            )));
        }
        Some((cp, _)) => {
            let store = checkpoint::load(tables.client(), table, range, &cp).await?;
            (store, cp.offset, Some(cp))
        }
        None => (Store::new(), 0, None),
    };
    let end = writer.end_offset();
    if from > end {
        return Err(Error::Corrupt(format!(
            "the checkpoint of {table} range {range} starts at changelog offset {from}, past \
             its end {end}"
        )));
    }
    let mut reader = tables.streams().reader(changelog).await?;
    let mut replayed = 0u64;
    while from < end {
        let records = reader.read(from, REPLAY_BATCH, REPLAY_BYTES).await?;
        if records.is_empty() {
            return Err(Error::Unavailable(format!(
                "changelog {changelog} ends at {from}, before {end}"
            )));
        }
        for rec in records {
            if rec.offset != from {
                return Err(Error::Corrupt(format!(
                    "changelog {changelog} gave offset {} where {from} was expected",
                    rec.offset
                )));
            }
            if from >= end {
                break;
            }
            let effect = codec::decode_effect(&rec.payload)?;
            if effect.revision > store.revision() {
                store.apply(&effect)?;
                replayed += 1;
            }
            from += 1;
        }
    }
    tracing::debug!(table = %table, range, replayed, "changelog replayed");
    Ok((store, end, cp))
}

type Ack = BoxFuture<'static, Result<Option<u64>>>;

/// A command waiting for its changelog acknowledgement (or, read-only, for those before it).
struct Waiting {
    effect: Effect,
    outcome: Outcome,
    reply: oneshot::Sender<Result<Outcome>>,
}

struct Sequencer {
    inner: Arc<Inner>,
    machine: Machine,
    writer: StreamWriter,
    /// Changelog acknowledgements (offsets) in sequence order; `None` for read-only outcomes.
    in_flight: FuturesOrdered<Ack>,
    /// The commands of `in_flight`, in the same order.
    waiting: VecDeque<Waiting>,
}

impl Sequencer {
    async fn run(mut self, mut rx: mpsc::Receiver<Request>, session: Arc<Session>) {
        let lost = session.lost();
        tokio::pin!(lost);
        let mut draining = false;
        let mut drained = Vec::new();
        let failure = loop {
            if draining && self.in_flight.is_empty() {
                break None;
            }
            tokio::select! {
                biased;
                Some(ack) = self.in_flight.next(), if !self.in_flight.is_empty() => {
                    if let Err(e) = self.acked(ack) {
                        break Some(e);
                    }
                }
                _ = &mut lost => {
                    break Some(Error::Fenced(format!(
                        "the metadata session owning {} was lost", self.inner.changelog
                    )));
                }
                req = rx.recv(), if !draining && self.in_flight.len() < IN_FLIGHT_MAX => match req {
                    // Every handle is gone: finish what is in flight, then stop.
                    None => draining = true,
                    Some(Request::Drain(done)) => {
                        draining = true;
                        drained.push(done);
                    }
                    Some(Request::Command(cmd, reply)) => {
                        if let Err(e) = self.sequence(cmd, reply).await {
                            break Some(e);
                        }
                    }
                },
            }
        };
        match failure {
            Some(e) => {
                tracing::warn!(table = %self.inner.table, range = self.inner.range, error = %e,
                    "range failed; it must be reopened");
                self.inner.failed.store(true, Ordering::Release);
                self.inner.stop(e.clone());
                for w in self.waiting.drain(..) {
                    let err = if w.effect.is_write() {
                        Error::Ambiguous(format!("the changelog failed: {e}"))
                    } else {
                        Error::Unavailable(format!("the changelog failed: {e}; retry"))
                    };
                    let _ = w.reply.send(Err(err));
                }
            }
            None => {
                if drained.is_empty() {
                    self.inner.stop(Error::Unavailable(
                        "every handle of the range was dropped".into(),
                    ));
                }
            }
        }
        self.inner.pending.store(0, Ordering::Relaxed);
        // Queued commands were never evaluated: dropping their reply channels answers them
        // `Unavailable` (retryable).
        rx.close();
        for done in drained {
            let _ = done.send(());
        }
    }

    /// Evaluates one command and sends its effect to the changelog. An error fails the range.
    async fn sequence(
        &mut self,
        cmd: Command,
        reply: oneshot::Sender<Result<Outcome>>,
    ) -> Result<()> {
        let ev = {
            let c = self.inner.committed.read();
            self.machine.evaluate(&c.store, &cmd)
        };
        let ev = match ev {
            Ok(ev) => ev,
            Err(e) => {
                let _ = reply.send(Err(e));
                return Ok(());
            }
        };
        if !ev.effect.is_write() {
            if self.in_flight.is_empty() {
                let _ = reply.send(Ok(ev.outcome));
            } else {
                self.in_flight
                    .push_back(futures::future::ready(Ok(None)).boxed());
                self.waiting.push_back(Waiting {
                    effect: ev.effect,
                    outcome: ev.outcome,
                    reply,
                });
            }
            return Ok(());
        }
        let record = codec::encode_effect(&ev.effect);
        if record.len() > RECORD_MAX {
            let _ = reply.send(Err(Error::TooLarge(format!(
                "the command's changelog record would be {} bytes; at most {RECORD_MAX}",
                record.len()
            ))));
            return Ok(());
        }
        let appended = self.writer.append_async(record).await;
        self.machine.sequence(&ev);
        self.waiting.push_back(Waiting {
            effect: ev.effect,
            outcome: ev.outcome,
            reply,
        });
        let ack = appended?;
        self.in_flight.push_back(ack.map(|r| r.map(Some)).boxed());
        self.inner.pending.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Handles the next acknowledgement: apply, then answer. An error fails the range.
    fn acked(&mut self, ack: Result<Option<u64>>) -> Result<()> {
        let Some(w) = self.waiting.pop_front() else {
            return Err(Error::Internal(
                "an acknowledgement without a command".into(),
            ));
        };
        let offset = match ack {
            Ok(None) => {
                let _ = w.reply.send(Ok(w.outcome));
                return Ok(());
            }
            Ok(Some(offset)) => offset,
            Err(e) => {
                self.waiting.push_front(w);
                return Err(e);
            }
        };
        let revision = {
            let mut c = self.inner.committed.write();
            let applied = if offset != c.offset {
                Err(Error::Corrupt(format!(
                    "changelog {} acknowledged offset {offset} where {} was expected",
                    self.inner.changelog, c.offset
                )))
            } else {
                c.store.apply(&w.effect)
            };
            if let Err(e) = applied {
                drop(c);
                self.waiting.push_front(w);
                return Err(e);
            }
            c.offset = offset + 1;
            c.store.revision()
        };
        self.machine.acked(&w.effect);
        self.inner.pending.fetch_sub(1, Ordering::Relaxed);
        let _ = w.reply.send(Ok(w.outcome));
        let since =
            revision.saturating_sub(self.inner.last_checkpoint_revision.load(Ordering::Relaxed));
        if since >= self.inner.meta.config.checkpoint_every {
            self.inner.wake_checkpoint.notify_one();
        }
        Ok(())
    }
}

/// Pause after a failed background checkpoint.
const CHECKPOINT_RETRY: Duration = Duration::from_secs(5);
/// Longest a checkpoint may take.
const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);

/// Checkpoints in the background every interval, or sooner after `checkpoint_every` updates,
/// until the range stops.
async fn checkpointer(inner: Arc<Inner>) {
    let mut stop = inner.shutdown.subscribe();
    let interval = inner.meta.config.checkpoint_interval;
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = inner.wake_checkpoint.notified() => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        if inner.is_stopped.load(Ordering::Acquire) {
            return;
        }
        let revision = inner.committed.read().store.revision();
        if revision <= inner.last_checkpoint_revision.load(Ordering::Relaxed)
            && inner.last_checkpoint.lock().is_some()
        {
            continue;
        }
        if let Err(e) = run_checkpoint(&inner).await {
            tracing::warn!(table = %inner.table, range = inner.range, error = %e,
                "checkpoint failed; retrying later");
            tokio::select! {
                _ = tokio::time::sleep(CHECKPOINT_RETRY) => {}
                _ = stop.wait_for(|s| *s) => return,
            }
        }
    }
}

/// Snapshot, write, publish, then drop what the checkpoint made obsolete.
async fn run_checkpoint(inner: &Inner) -> Result<Checkpoint> {
    let _one = inner.checkpointing.lock().await;
    let (snapshot, offset) = {
        let c = inner.committed.read();
        (c.store.snapshot(), c.offset)
    };
    if let Some(last) = inner.last_checkpoint.lock().clone()
        && last.revision == snapshot.revision()
    {
        return Ok(last);
    }
    let work = async {
        let tables = &inner.tables;
        let cp = checkpoint::write_ledger(
            tables.client(),
            &inner.meta.config.changelog,
            &inner.table,
            inner.range,
            &snapshot,
            offset,
            inner.meta.created_ms,
        )
        .await?;
        drop(snapshot);
        let (current, replaced) =
            match checkpoint::publish(tables.store(), &inner.table, inner.range, &cp).await {
                Ok(r) => r,
                // Certainly not published (a CAS or create that lost): ours is not needed.
                Err(
                    e @ Error::Metadata(
                        MetaError::BadVersion { .. }
                        | MetaError::AlreadyExists(_)
                        | MetaError::NotFound(_),
                    ),
                ) => {
                    checkpoint::discard(tables.client(), cp.ledger).await;
                    return Err(e);
                }
                // The outcome is unknown (the update may have gone through): look before
                // deleting anything, and when in doubt keep the ledger (an orphan is harmless,
                // a pointer to a deleted ledger is not).
                Err(e) => {
                    match checkpoint::read_pointer(tables.store(), &inner.table, inner.range).await
                    {
                        Ok(Some((cur, _))) if cur.ledger == cp.ledger => (cur, None),
                        Ok(_) => {
                            checkpoint::discard(tables.client(), cp.ledger).await;
                            return Err(e);
                        }
                        Err(_) => return Err(e),
                    }
                }
            };
        if current.ledger != cp.ledger {
            // A newer checkpoint is already published (by a newer owner): ours is not needed.
            checkpoint::discard(tables.client(), cp.ledger).await;
        }
        if let Some(old) = replaced {
            checkpoint::discard(tables.client(), old).await;
        }
        match tables
            .streams()
            .truncate(&inner.changelog, current.offset)
            .await
        {
            Ok(start) => tracing::debug!(table = %inner.table, range = inner.range,
                revision = current.revision, changelog_start = start, "checkpoint written"),
            Err(e) => tracing::warn!(table = %inner.table, range = inner.range, error = %e,
                "could not truncate the changelog after a checkpoint"),
        }
        Ok(current)
    };
    let current = tokio::time::timeout(CHECKPOINT_TIMEOUT, work)
        .await
        .map_err(|_| Error::Timeout(format!("checkpoint took over {CHECKPOINT_TIMEOUT:?}")))??;
    inner
        .last_checkpoint_revision
        .fetch_max(current.revision, Ordering::Relaxed);
    *inner.last_checkpoint.lock() = Some(current.clone());
    Ok(current)
}
