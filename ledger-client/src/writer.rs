//! The write handle and its driver: one task per open ledger owns the [`WriteCore`] and carries
//! out what it asks (sends through the bookie pool, ensemble changes through placement and a
//! metadata CAS, the close), feeding the answers back.
//!
//! Backpressure: an append first takes permits for one entry and its payload bytes (bounded by
//! `max_in_flight_entries` / `max_in_flight_bytes`); they are returned when the entry is
//! acknowledged or fails. That bound also bounds the driver's channels and the pool's queues.

use std::collections::{BTreeSet, VecDeque};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use quire_metadata::MetaError;
use quire_metadata::ledgers::{LedgerMetadata, LedgerState, Versioned};
use quire_proto::StatusCode;
use quire_proto::bookie as pb;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, oneshot};

use crate::client::Shared;
use crate::core::write::{AddOutcome, ChangeFailure, EnsembleChange, WriteCore, WriteOutput};
use crate::error::{LedgerError, Result};
use crate::placement;
use crate::pool::{AddReply, CallError};

/// How often the driver checks timeouts and idleness.
const TICK: Duration = Duration::from_millis(100);
/// How often a writer without a spare bookie tries again to replace the failed ones.
const DOWN_RETRY: Duration = Duration::from_secs(10);
/// How long metadata updates are retried through transient store errors.
const METADATA_RETRY_MAX: Duration = Duration::from_secs(30);
const COMMANDS_MAX: usize = 1024;
/// Commands taken in one turn of the driver at most.
const COMMAND_BATCH: usize = 256;

/// The in-flight permits of one append: its entry and its payload bytes.
type Permits = (OwnedSemaphorePermit, Option<OwnedSemaphorePermit>);

enum Command {
    Append {
        payload: Bytes,
        reply: oneshot::Sender<Result<u64>>,
        permits: Permits,
    },
    Close(oneshot::Sender<Result<LedgerMetadata>>),
}

enum Event {
    Replacements(Vec<(usize, String)>),
    Changed(Versioned<LedgerMetadata>),
    Conflict(Versioned<LedgerMetadata>),
    ChangeFailed(ChangeFailure),
    Closed(Result<Versioned<LedgerMetadata>>),
}

struct State {
    lac: AtomicI64,
    /// Set once closed (later closes return it) or failed.
    outcome: Mutex<Option<Result<LedgerMetadata>>>,
}

/// A ledger open for writing. Cheap to clone; appends from many tasks are ordered by arrival.
#[derive(Clone)]
pub struct LedgerWriter {
    id: u64,
    commands: mpsc::Sender<Command>,
    entries: Arc<Semaphore>,
    bytes: Arc<Semaphore>,
    max_bytes: usize,
    entry_size_max: usize,
    state: Arc<State>,
}

/// Resolves to the entry id once the entry is acknowledged.
pub struct AppendFuture {
    rx: oneshot::Receiver<Result<u64>>,
    id: u64,
    state: Arc<State>,
}

impl Future for AppendFuture {
    type Output = Result<u64>;
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        Pin::new(&mut self.rx)
            .poll(cx)
            .map(|r| r.unwrap_or_else(|_| Err(self.state.stopped(self.id))))
    }
}

impl State {
    /// Why a writer whose task ended refuses more: closed, its error, or just stopped.
    fn stopped(&self, id: u64) -> LedgerError {
        match self.outcome.lock().as_ref() {
            Some(Ok(_)) => LedgerError::Closed(id),
            Some(Err(e)) => e.clone(),
            None => LedgerError::WriterStopped("writer task ended".into()),
        }
    }
}

impl LedgerWriter {
    pub(crate) fn start(
        shared: Arc<Shared>,
        id: u64,
        meta: Versioned<LedgerMetadata>,
        master_key: Bytes,
    ) -> Self {
        let cfg = &shared.cfg;
        let (tx, rx) = mpsc::channel(COMMANDS_MAX);
        let state = Arc::new(State {
            lac: AtomicI64::new(-1),
            outcome: Mutex::new(None),
        });
        let writer = LedgerWriter {
            id,
            commands: tx,
            entries: Arc::new(Semaphore::new(cfg.max_in_flight_entries.max(1))),
            bytes: Arc::new(Semaphore::new(cfg.max_in_flight_bytes.max(1))),
            max_bytes: cfg.max_in_flight_bytes.max(1),
            entry_size_max: cfg.entry_size_max,
            state: state.clone(),
        };
        let (events_tx, events) = mpsc::unbounded_channel();
        let (replies_tx, replies) = mpsc::unbounded_channel();
        let driver = Driver {
            core: WriteCore::new(id, meta.value, meta.version),
            shared,
            master_key,
            state,
            waiting: VecDeque::new(),
            closing: Vec::new(),
            outbox: Vec::new(),
            events_tx,
            replies_tx,
            last_append: Instant::now(),
            last_down_retry: Instant::now(),
            close_started: false,
        };
        tokio::spawn(driver.run(rx, events, replies));
        writer
    }

    pub fn id(&self) -> u64 {
        self.id
    }

    /// The last add confirmed: every entry up to it is acknowledged.
    pub fn lac(&self) -> i64 {
        self.state.lac.load(Ordering::Acquire)
    }

    /// Appends and waits until the entry is acknowledged; returns its id.
    pub async fn append(&self, payload: Bytes) -> Result<u64> {
        self.append_async(payload).await?.await
    }

    /// Waits for room (backpressure), hands the entry to the writer and returns a future of its
    /// id. Entries are acknowledged in the order `append_async` returned.
    pub async fn append_async(&self, payload: Bytes) -> Result<AppendFuture> {
        if payload.len() > self.entry_size_max {
            return Err(LedgerError::TooLarge {
                size: payload.len(),
                max: self.entry_size_max,
            });
        }
        if let Some(r) = self.state.outcome.lock().as_ref() {
            return Err(match r {
                Ok(_) => LedgerError::Closed(self.id),
                Err(e) => e.clone(),
            });
        }
        let stopped = || LedgerError::WriterStopped("writer task ended".into());
        let entry = self
            .entries
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| stopped())?;
        let n = payload.len().min(self.max_bytes) as u32;
        let bytes = if n > 0 {
            Some(
                self.bytes
                    .clone()
                    .acquire_many_owned(n)
                    .await
                    .map_err(|_| stopped())?,
            )
        } else {
            None
        };
        let (reply, rx) = oneshot::channel();
        self.commands
            .send(Command::Append {
                payload,
                reply,
                permits: (entry, bytes),
            })
            .await
            .map_err(|_| self.state.stopped(self.id))?;
        Ok(AppendFuture {
            rx,
            id: self.id,
            state: self.state.clone(),
        })
    }

    /// Waits for every pending append, then closes the ledger at its LAC. Closing again returns
    /// the same metadata.
    pub async fn close(&self) -> Result<LedgerMetadata> {
        if let Some(r) = self.state.outcome.lock().as_ref() {
            return r.clone();
        }
        let (tx, rx) = oneshot::channel();
        let outcome = || match self.state.outcome.lock().as_ref() {
            Some(r) => r.clone(),
            None => Err(LedgerError::WriterStopped("writer task ended".into())),
        };
        if self.commands.send(Command::Close(tx)).await.is_err() {
            return outcome();
        }
        rx.await.unwrap_or_else(|_| outcome())
    }
}

struct Driver {
    core: WriteCore,
    shared: Arc<Shared>,
    master_key: Bytes,
    state: Arc<State>,
    /// Appends not acknowledged yet, in entry order.
    waiting: VecDeque<(u64, oneshot::Sender<Result<u64>>, Permits)>,
    closing: Vec<oneshot::Sender<Result<LedgerMetadata>>>,
    /// Sends of the current turn, per bookie (flushed at the end of the turn).
    outbox: Vec<(String, Vec<pb::AddEntry>)>,
    events_tx: mpsc::UnboundedSender<Event>,
    replies_tx: mpsc::UnboundedSender<AddReply>,
    last_append: Instant,
    last_down_retry: Instant,
    close_started: bool,
}

impl Driver {
    async fn run(
        mut self,
        mut commands: mpsc::Receiver<Command>,
        mut events: mpsc::UnboundedReceiver<Event>,
        mut replies: mpsc::UnboundedReceiver<AddReply>,
    ) {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands_open = true;
        loop {
            tokio::select! {
                c = commands.recv(), if commands_open => match c {
                    Some(c) => {
                        self.command(c);
                        // Take what else is queued, so sends to a bookie go out together.
                        for _ in 0..COMMAND_BATCH {
                            match commands.try_recv() {
                                Ok(c) => self.command(c),
                                Err(_) => break,
                            }
                        }
                    }
                    None => commands_open = false,
                },
                Some(r) = replies.recv() => {
                    let outcome = classify(&r.result);
                    let out = self.core.on_add_result(&r.bookie, r.entry_id, outcome);
                    self.exec(out);
                    // Drain what else is ready before checking timers (batches of results).
                    while let Ok(r) = replies.try_recv() {
                        let out = self.core.on_add_result(&r.bookie, r.entry_id, classify(&r.result));
                        self.exec(out);
                    }
                }
                Some(e) = events.recv() => self.event(e),
                _ = tick.tick() => self.tick(),
            }
            self.flush().await;
            self.maybe_close();
            if self.state.outcome.lock().is_some()
                && self.closing.is_empty()
                && self.waiting.is_empty()
            {
                break;
            }
            if !commands_open && self.waiting.is_empty() && self.closing.is_empty() {
                // Every handle is gone and nothing is pending: the ledger stays open (a reader
                // or a recovery will deal with it), as with a BookKeeper handle never closed.
                break;
            }
        }
    }

    fn command(&mut self, c: Command) {
        match c {
            Command::Append {
                payload,
                reply,
                permits,
            } => {
                // Appends queued before a close still go in; later ones are refused, so a close
                // cannot be held off forever by another task that keeps appending.
                if self.close_started || !self.closing.is_empty() {
                    let _ = reply.send(Err(LedgerError::Closed(self.core.ledger_id())));
                    return;
                }
                self.last_append = Instant::now();
                match self.core.append(&payload) {
                    Ok((id, out)) => {
                        self.waiting.push_back((id, reply, permits));
                        self.exec(out);
                    }
                    Err(e) => {
                        let _ = reply.send(Err(e));
                    }
                }
            }
            Command::Close(tx) => {
                if let Some(r) = self.state.outcome.lock().as_ref() {
                    let _ = tx.send(r.clone());
                    return;
                }
                self.closing.push(tx);
            }
        }
    }

    fn exec(&mut self, outputs: Vec<WriteOutput>) {
        for o in outputs {
            match o {
                WriteOutput::Send {
                    bookie,
                    entry_id,
                    body,
                } => {
                    let entry = pb::AddEntry {
                        ledger_id: self.core.ledger_id(),
                        entry_id,
                        master_key: self.master_key.clone(),
                        recovery: false,
                        body,
                    };
                    match self.outbox.iter_mut().find(|(b, _)| *b == bookie) {
                        Some((_, v)) => v.push(entry),
                        None => self.outbox.push((bookie, vec![entry])),
                    }
                }
                WriteOutput::Acked { entry_id } => {
                    self.state.lac.store(entry_id as i64, Ordering::Release);
                    if let Some((id, reply, _permits)) = self.waiting.pop_front() {
                        debug_assert_eq!(id, entry_id, "acks come in entry order");
                        let _ = reply.send(Ok(id));
                    }
                }
                WriteOutput::ChangeEnsemble(ch) => self.start_change(ch),
                WriteOutput::Failed(e) => {
                    tracing::warn!(ledger_id = self.core.ledger_id(), error = %e, "writer failed");
                    *self.state.outcome.lock() = Some(Err(e.clone()));
                    for (_, reply, _) in self.waiting.drain(..) {
                        let _ = reply.send(Err(e.clone()));
                    }
                    for tx in self.closing.drain(..) {
                        let _ = tx.send(Err(e.clone()));
                    }
                }
            }
        }
    }

    /// Picks replacements (off the driver task) and reports them as an event.
    fn start_change(&self, ch: EnsembleChange) {
        let (shared, events) = (self.shared.clone(), self.events_tx.clone());
        let qw = self.core.metadata().write_quorum as usize;
        let id = self.core.ledger_id();
        tracing::info!(ledger_id = id, first_entry = ch.first_entry, replace = ?ch.replace,
            ensemble = ?ch.ensemble, "ensemble change");
        tokio::spawn(async move {
            let candidates = match retry_metadata(|| shared.candidates()).await {
                Ok(c) => c,
                Err(e) => {
                    let _ = events.send(Event::ChangeFailed(ChangeFailure::Error(e)));
                    return;
                }
            };
            let mut rng = rand::rng();
            let mut chosen: Vec<(usize, String)> = Vec::new();
            let mut ensemble = ch.ensemble.clone();
            let failed: BTreeSet<String> =
                ch.replace.iter().map(|p| ch.ensemble[*p].clone()).collect();
            for pos in &ch.replace {
                match placement::choose_replacement(
                    &candidates,
                    &ensemble,
                    *pos,
                    qw,
                    &failed,
                    &mut rng,
                ) {
                    Some(b) => {
                        ensemble[*pos] = b.clone();
                        chosen.push((*pos, b));
                    }
                    None => {
                        let why = format!(
                            "no writable bookie outside the ensemble {:?} to replace {}",
                            ch.ensemble, ch.ensemble[*pos]
                        );
                        let _ = events.send(Event::ChangeFailed(ChangeFailure::NoSpare(why)));
                        return;
                    }
                }
            }
            let _ = events.send(Event::Replacements(chosen));
        });
    }

    fn event(&mut self, e: Event) {
        let out = match e {
            Event::Replacements(r) => {
                let proposed = self.core.propose(&r);
                let version = self.core.version();
                let (shared, events) = (self.shared.clone(), self.events_tx.clone());
                let id = self.core.ledger_id();
                tokio::spawn(async move {
                    let ev = match cas(&shared, id, &proposed, version).await {
                        Ok(v) => Event::Changed(v),
                        Err(CasError::Conflict(cur)) => Event::Conflict(cur),
                        Err(CasError::Failed(e)) => Event::ChangeFailed(ChangeFailure::Error(e)),
                    };
                    let _ = events.send(ev);
                });
                Vec::new()
            }
            Event::Changed(v) => {
                tracing::info!(ledger_id = self.core.ledger_id(), ensembles = ?v.value.ensembles,
                    "ensemble changed");
                self.core.on_ensemble_changed(v.value, v.version)
            }
            Event::Conflict(cur) => self.core.on_change_conflict(cur.value, cur.version),
            Event::ChangeFailed(f) => self.core.on_change_failed(f),
            Event::Closed(r) => {
                let r = r.map(|v| {
                    self.core.on_closed(v.value.clone(), v.version);
                    v.value
                });
                *self.state.outcome.lock() = Some(r.clone());
                for tx in self.closing.drain(..) {
                    let _ = tx.send(r.clone());
                }
                Vec::new()
            }
        };
        self.exec(out);
    }

    fn tick(&mut self) {
        let lac_interval = self.shared.cfg.explicit_lac_interval;
        // Add timeouts need nothing here: the pool fails every add unanswered for the add
        // timeout, and that failure replaces the bookie like any other.
        if self.core.has_down() && self.last_down_retry.elapsed() >= DOWN_RETRY {
            self.last_down_retry = Instant::now();
            let out = self.core.retry_down();
            self.exec(out);
        }
        if let Some(interval) = lac_interval
            && self.last_append.elapsed() >= interval
            && self.core.pending_len() == 0
            && let Some((lac, bookies)) = self.core.explicit_lac()
        {
            let (pool, key, id) = (
                self.shared.pool.clone(),
                self.master_key.clone(),
                self.core.ledger_id(),
            );
            tokio::spawn(async move {
                for b in bookies {
                    if let Err(e) = pool.write_lac(&b, id, key.clone(), lac).await {
                        tracing::debug!(ledger_id = id, bookie = %b, error = %e, "explicit LAC not written");
                    }
                }
            });
        }
    }

    /// Hands the sends collected during this turn to the pool, one batch per bookie.
    async fn flush(&mut self) {
        for (bookie, entries) in std::mem::take(&mut self.outbox) {
            self.shared
                .pool
                .send_adds(&bookie, entries, &self.replies_tx)
                .await;
        }
    }

    /// Starts the close CAS once a close was asked for and nothing is pending.
    fn maybe_close(&mut self) {
        if self.closing.is_empty() || self.close_started || self.state.outcome.lock().is_some() {
            return;
        }
        if !self.waiting.is_empty() || !self.core.can_close() {
            return;
        }
        self.close_started = true;
        let closed = match self.core.closed_metadata() {
            Ok(m) => m,
            Err(e) => {
                let _ = self.events_tx.send(Event::Closed(Err(e)));
                return;
            }
        };
        let (shared, events) = (self.shared.clone(), self.events_tx.clone());
        let (id, version, lac) = (self.core.ledger_id(), self.core.version(), self.core.lac());
        tokio::spawn(async move {
            let (mut closed, mut version) = (closed, version);
            let r = loop {
                match cas(&shared, id, &closed, version).await {
                    Ok(v) => break Ok(v),
                    // Someone else closed it: fine when at our LAC (an earlier attempt of ours
                    // whose answer was lost, or a recovery that found exactly our entries).
                    Err(CasError::Conflict(cur))
                        if cur.value.state == LedgerState::Closed
                            && cur.value.last_entry_id == lac =>
                    {
                        break Ok(cur);
                    }
                    // Still OPEN with our last ensemble: another party changed only earlier
                    // fragments (autorecovery); close on top of its version.
                    Err(CasError::Conflict(cur))
                        if cur.value.state == LedgerState::Open
                            && cur.value.ensembles.iter().next_back()
                                == closed.ensembles.iter().next_back() =>
                    {
                        let mut m = cur.value.clone();
                        if let Err(e) = m.close(lac, closed.length) {
                            break Err(LedgerError::from_meta(id, e));
                        }
                        (closed, version) = (m, cur.version);
                    }
                    Err(CasError::Conflict(_)) => break Err(LedgerError::Fenced(id)),
                    Err(CasError::Failed(e)) => break Err(e),
                }
            };
            let _ = events.send(Event::Closed(r));
        });
    }
}

fn classify(r: &std::result::Result<(), CallError>) -> AddOutcome {
    match r {
        Ok(()) => AddOutcome::Ok,
        Err(e) if e.code == StatusCode::Fenced => AddOutcome::Fenced,
        Err(e) if e.code == StatusCode::Unauthorized => AddOutcome::Unauthorized,
        Err(e) => AddOutcome::Failed(e.to_string()),
    }
}

pub(crate) enum CasError {
    /// The ledger's metadata is not at the expected version: here it is.
    Conflict(Versioned<LedgerMetadata>),
    Failed(LedgerError),
}

/// Compare-and-sets ledger metadata, retrying through transient store errors. An ambiguous
/// outcome is settled by reading the metadata back: ours if it is exactly what we wrote.
pub(crate) async fn cas(
    shared: &Shared,
    id: u64,
    meta: &LedgerMetadata,
    version: u64,
) -> std::result::Result<Versioned<LedgerMetadata>, CasError> {
    let deadline = Instant::now() + METADATA_RETRY_MAX;
    let mut backoff = Duration::from_millis(50);
    loop {
        let err = match shared.ledgers.update(id, meta, version).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        match err {
            MetaError::BadVersion { .. } | MetaError::Ambiguous(_) => {
                let cur = retry_metadata(|| shared.read_metadata(id))
                    .await
                    .map_err(CasError::Failed)?;
                if matches!(err, MetaError::Ambiguous(_)) && cur.value == *meta {
                    return Ok(cur);
                }
                return Err(CasError::Conflict(cur));
            }
            MetaError::Unavailable(_) if Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            e => return Err(CasError::Failed(LedgerError::from_meta(id, e))),
        }
    }
}

/// Retries a metadata read through `Unavailable` errors for a bounded time.
pub(crate) async fn retry_metadata<T, F, Fut>(mut f: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T>>,
{
    let deadline = Instant::now() + METADATA_RETRY_MAX;
    let mut backoff = Duration::from_millis(50);
    loop {
        match f().await {
            Err(LedgerError::Metadata(MetaError::Unavailable(_))) if Instant::now() < deadline => {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            r => return r,
        }
    }
}
