//! The bookie core: ties the journal, ledger storage and ledger table together and implements the
//! operations the gRPC service exposes.
//!
//! Write path (add): check the request, wait for room in the journal queue and the write cache
//! (back-pressure), then under the ledger's lock check the master key and the fenced flag, put the
//! entry in the write cache and queue its journal record; the caller is told once the record is
//! durable. Doing the check, the cache insert and the queueing under one lock is what makes
//! fencing safe: a fence queued after an add is journaled after it, and an add that sees no fence
//! is visible to every read that follows the fence.
//!
//! Start-up: check cookies, load each directory's checkpoint (ledgers, journal mark), replay the
//! journal from the mark into memory, start a new journal file and checkpoint. Background threads
//! checkpoint (every `flush_interval_ms`, or when a write cache fills), collect garbage and watch
//! disk usage.

use crate::config::BookieConfig;
use crate::error::{BookieError, Result};
use crate::journal::{self, Journal, JournalError, LogMark, Record};
use crate::ledger::{LedgerState, Ledgers};
use crate::metrics::Metrics;
use crate::storage::LedgerStorage;
use crate::storage::index::ENTRY_ID_MAX;
use crate::storage::meta;
use crate::{cookie, durable};
use bytes::Bytes;
use parking_lot::{Condvar, Mutex};
use quire_proto::entry;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Longest wait for room in the journal queue, or for a journal write to become durable, before
/// a request fails (a healthy disk answers in milliseconds; this catches a dying one).
const JOURNAL_WAIT_MAX: Duration = Duration::from_secs(30);

/// One entry to add, as received.
#[derive(Debug, Clone)]
pub struct AddRequest {
    pub ledger_id: u64,
    pub entry_id: u64,
    pub master_key: Bytes,
    pub recovery: bool,
    pub body: Bytes,
}

/// Told the outcome of an add, once durable (or failed).
pub type AddDone = Box<dyn FnOnce(Result<()>) + Send>;

pub struct ReadResult {
    pub entry_id: u64,
    pub body: Bytes,
    pub lac: i64,
    pub fenced: bool,
}

pub struct LacResult {
    pub lac: i64,
    pub last_entry_body: Option<Bytes>,
    pub explicit_lac_body: Option<Bytes>,
    pub timed_out: bool,
}

/// Entries one [`Bookie::read_range`] returns at most.
pub const READ_ENTRIES_MAX: u32 = 1000;
/// Bytes after which [`Bookie::read_range`] stops adding entries.
pub const READ_BYTES_MAX: u64 = 8 << 20;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BookieInfo {
    pub bookie_id: String,
    pub read_only: bool,
    pub forced_read_only: bool,
    pub disk_full: bool,
    pub free_bytes: u64,
    pub total_bytes: u64,
    pub ledgers: usize,
    pub journal_io: &'static str,
    pub journal_failed: bool,
}

pub struct Bookie {
    cfg: BookieConfig,
    id: String,
    cookie: cookie::Cookie,
    journal: Journal,
    storage: LedgerStorage,
    ledgers: Ledgers,
    metrics: Arc<Metrics>,
    disk_full: AtomicBool,
    forced_read_only: AtomicBool,
    shutting_down: AtomicBool,
    checkpoint_lock: Mutex<()>,
    stop: Arc<(Mutex<bool>, Condvar)>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
}

fn journal_error(e: JournalError) -> BookieError {
    match e {
        JournalError::Io(e) => BookieError::Io(std::io::Error::new(e.kind(), e.to_string())),
        JournalError::Closed => BookieError::ShuttingDown,
        e => BookieError::Io(std::io::Error::other(e.to_string())),
    }
}

/// Records an explicit LAC unless a higher one is already known (it never goes back, live or
/// replayed).
fn set_explicit_lac(g: &mut crate::ledger::LedgerInner, lac: i64, body: Bytes) {
    if g.explicit_lac.as_ref().is_none_or(|(cur, _)| lac >= *cur) {
        g.explicit_lac = Some((lac, body));
    }
}

/// Applies one replayed journal record to memory (the same effects as the live path).
fn apply(ledgers: &Ledgers, storage: &LedgerStorage, rec: Record) -> Result<()> {
    match rec {
        Record::Add {
            ledger_id,
            entry_id,
            master_key,
            body,
        } => {
            let st = ledgers.get_or_create(ledger_id, &master_key);
            if let Ok(h) = entry::peek_header(&body) {
                st.advance_lac(h.lac);
            }
            let mut g = st.inner.lock();
            g.last_entry = g.last_entry.max(entry_id as i64);
            storage.insert(ledger_id, entry_id, body);
        }
        Record::Fence {
            ledger_id,
            master_key,
        } => {
            ledgers
                .get_or_create(ledger_id, &master_key)
                .inner
                .lock()
                .fenced = true;
        }
        Record::ExplicitLac {
            ledger_id,
            lac,
            master_key,
            body,
        } => {
            let st = ledgers.get_or_create(ledger_id, &master_key);
            set_explicit_lac(&mut st.inner.lock(), lac, body);
            st.advance_lac(lac);
        }
        Record::Delete { ledger_id } => {
            ledgers.remove(ledger_id);
            storage.delete_ledger(ledger_id)?;
        }
        Record::Batch { .. } => {}
    }
    Ok(())
}

impl Bookie {
    /// Opens (or creates) a bookie on its directories and starts its background threads.
    pub fn open(cfg: BookieConfig) -> Result<Arc<Bookie>> {
        cfg.validate()
            .map_err(|e| BookieError::Startup(e.to_string()))?;
        durable::create_dir(&cfg.journal.dir)?;
        for d in &cfg.storage.ledger_dirs {
            durable::create_dir(d)?;
        }
        let cookie = cookie::check_or_create(
            cfg.bookie_id.as_deref(),
            &cfg.bookie_id(),
            &cfg.journal.dir,
            &cfg.storage.ledger_dirs,
        )
        .map_err(|e| BookieError::Startup(e.to_string()))?;
        let id = cookie.bookie_id.clone();
        durable::remove_temp_files(&cfg.journal.dir)?;

        let started = Instant::now();
        let metrics = Arc::new(Metrics::new());
        let storage = LedgerStorage::open(&cfg.storage, metrics.clone())?;
        let ledgers = Ledgers::default();
        let mut mark: Option<LogMark> = None;
        for d in storage.dirs() {
            let m = meta::read_mark(&d.dir)?.unwrap_or(LogMark::START);
            mark = Some(mark.map_or(m, |cur| cur.min(m)));
            for lm in meta::read_ledgers(&d.dir)? {
                let last = storage.last_entry(lm.ledger_id)?.map_or(-1, |e| e as i64);
                ledgers.load(lm, last);
            }
        }
        let mark = mark.unwrap_or(LogMark::START);
        let mut replayed = 0u64;
        let last_file = journal::replay(&cfg.journal.dir, mark, |rec, _| {
            replayed += 1;
            apply(&ledgers, &storage, rec)?;
            if storage.needs_flush() {
                storage.flush_all(&|l| ledgers.contains(l))?;
            }
            Ok(())
        })?;
        let next_file = last_file.max(mark.file_id) + 1;
        let journal =
            Journal::start(&cfg.journal, next_file, metrics.clone()).map_err(journal_error)?;
        let bookie = Arc::new(Bookie {
            id,
            cookie,
            journal,
            storage,
            ledgers,
            metrics,
            disk_full: AtomicBool::new(false),
            forced_read_only: AtomicBool::new(false),
            shutting_down: AtomicBool::new(false),
            checkpoint_lock: Mutex::new(()),
            stop: Arc::new((Mutex::new(false), Condvar::new())),
            threads: Mutex::new(Vec::new()),
            cfg,
        });
        bookie.checkpoint_at(LogMark {
            file_id: next_file,
            offset: journal::HEADER_LEN,
        })?;
        bookie
            .storage
            .remove_orphan_indexes(&|l| bookie.ledgers.contains(l))?;
        bookie.check_disks();
        bookie.spawn_background();
        tracing::info!(
            bookie_id = %bookie.id,
            ledgers = bookie.ledgers.len(),
            replayed,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "bookie opened"
        );
        Ok(bookie)
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The local cookie this bookie started with.
    pub fn cookie(&self) -> &cookie::Cookie {
        &self.cookie
    }

    pub fn config(&self) -> &BookieConfig {
        &self.cfg
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    pub fn storage(&self) -> &LedgerStorage {
        &self.storage
    }

    pub fn is_read_only(&self) -> bool {
        self.disk_full.load(Ordering::Acquire) || self.forced_read_only.load(Ordering::Acquire)
    }

    pub fn set_forced_read_only(&self, on: bool) {
        self.forced_read_only.store(on, Ordering::Release);
        tracing::info!(forced = on, "read-only mode forced by admin");
        self.metrics.read_only.set(self.is_read_only() as i64);
    }

    /// Healthy: serving, and the journal has not failed.
    pub fn is_healthy(&self) -> bool {
        !self.journal.has_failed() && !self.shutting_down.load(Ordering::Acquire)
    }

    fn check_key(st: &LedgerState, key: &Bytes) -> Result<()> {
        if st.inner.lock().master_key != *key {
            return Err(BookieError::Unauthorized(st.id));
        }
        Ok(())
    }

    fn check_master_key_len(key: &Bytes) -> Result<()> {
        if key.len() > journal::record::MASTER_KEY_MAX {
            return Err(BookieError::BadRequest(format!(
                "master key of {} bytes exceeds {}",
                key.len(),
                journal::record::MASTER_KEY_MAX
            )));
        }
        Ok(())
    }

    fn check_serving(&self) -> Result<()> {
        if self.shutting_down.load(Ordering::Acquire) {
            return Err(BookieError::ShuttingDown);
        }
        Ok(())
    }

    /// Adds an entry; `done` is called exactly once, after the entry is durable or with the
    /// reason it was not added.
    pub async fn add(&self, req: AddRequest, done: AddDone) {
        let started = Instant::now();
        let metrics = self.metrics.clone();
        let done: AddDone = Box::new(move |r: Result<()>| {
            if r.is_ok() {
                metrics.adds.inc();
                metrics.add_seconds.observe(started.elapsed().as_secs_f64());
            } else {
                metrics.add_errors.inc();
            }
            done(r)
        });
        match self.prepare_add(req).await {
            Ok(p) => self.submit_add(p, done),
            Err(e) => done(Err(e)),
        }
    }

    /// Checks an add and waits for room for it; takes no lock.
    async fn prepare_add(&self, req: AddRequest) -> Result<PreparedAdd> {
        self.check_serving()?;
        if self.is_read_only() {
            return Err(BookieError::ReadOnly);
        }
        if req.body.len() > self.cfg.entry_size_max_bytes {
            return Err(BookieError::TooLarge {
                size: req.body.len(),
                max: self.cfg.entry_size_max_bytes,
            });
        }
        Self::check_master_key_len(&req.master_key)?;
        if req.entry_id > ENTRY_ID_MAX {
            return Err(BookieError::BadRequest(format!(
                "entry id {} exceeds {ENTRY_ID_MAX}",
                req.entry_id
            )));
        }
        let header =
            entry::peek_header(&req.body).map_err(|e| BookieError::BadRequest(e.to_string()))?;
        if header.ledger_id != req.ledger_id || header.entry_id != req.entry_id {
            return Err(BookieError::BadRequest(format!(
                "entry body is for {}/{}, request for {}/{}",
                header.ledger_id, header.entry_id, req.ledger_id, req.entry_id
            )));
        }
        let record = Record::Add {
            ledger_id: req.ledger_id,
            entry_id: req.entry_id,
            master_key: req.master_key,
            body: req.body,
        };
        let reservation = self.reserve(record.frame_len()).await?;
        self.storage.wait_for_room(req.ledger_id).await?;
        // Only now, with room secured, may the add create the ledger (so a throttled add leaves
        // no keyed, empty ledger behind).
        let Record::Add { master_key, .. } = &record else {
            unreachable!("built above")
        };
        let ledger = self.ledgers.get_or_create(req.ledger_id, master_key);
        Ok(PreparedAdd {
            ledger,
            reservation,
            record,
            lac: header.lac,
            recovery: req.recovery,
        })
    }

    /// Under the ledger's lock: key and fence checks, cache insert, journal queueing.
    fn submit_add(&self, p: PreparedAdd, done: AddDone) {
        let Record::Add {
            ledger_id,
            entry_id,
            master_key,
            body,
        } = &p.record
        else {
            unreachable!("prepare_add builds an add record")
        };
        let st = p.ledger;
        let mut g = st.inner.lock();
        if g.master_key != *master_key {
            drop(g);
            return done(Err(BookieError::Unauthorized(*ledger_id)));
        }
        if g.fenced && !p.recovery {
            drop(g);
            return done(Err(BookieError::Fenced(*ledger_id)));
        }
        self.storage.insert(*ledger_id, *entry_id, body.clone());
        g.last_entry = g.last_entry.max(*entry_id as i64);
        let lac = p.lac;
        let st2 = st.clone();
        self.journal.submit(
            p.reservation,
            std::slice::from_ref(&p.record),
            Box::new(move |r| match r {
                Ok(()) => {
                    st2.advance_lac(lac);
                    done(Ok(()))
                }
                Err(e) => done(Err(journal_error(e))),
            }),
        );
        drop(g);
    }

    /// Applies a change to a ledger under its lock and journals it; returns once durable.
    async fn journaled(
        &self,
        st: &Arc<LedgerState>,
        record: Record,
        apply: impl FnOnce(&mut crate::ledger::LedgerInner),
    ) -> Result<()> {
        let reservation = self.reserve(record.frame_len()).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let mut g = st.inner.lock();
            apply(&mut g);
            self.journal.submit(
                reservation,
                std::slice::from_ref(&record),
                Box::new(move |r| {
                    let _ = tx.send(r);
                }),
            );
        }
        Self::durable(rx).await
    }

    /// Waits (bounded) for room in the journal queue.
    async fn reserve(&self, bytes: usize) -> Result<journal::Reservation> {
        tokio::time::timeout(JOURNAL_WAIT_MAX, self.journal.reserve(bytes))
            .await
            .map_err(|_| BookieError::TooManyRequests("journal queue full"))?
            .map_err(journal_error)
    }

    /// Waits (bounded) for a submitted journal write to become durable.
    async fn durable(
        rx: tokio::sync::oneshot::Receiver<std::result::Result<(), JournalError>>,
    ) -> Result<()> {
        match tokio::time::timeout(JOURNAL_WAIT_MAX, rx).await {
            Err(_) => Err(BookieError::Io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                "journal write not durable after 30 s",
            ))),
            Ok(Err(_)) => Err(BookieError::ShuttingDown),
            Ok(Ok(r)) => r.map_err(journal_error),
        }
    }

    /// Fences a ledger (creating it, keyed, when unknown, so a stale writer can never start it
    /// here later). Returns (LAC, last entry id or -1) once the fence is durable.
    pub async fn fence(&self, ledger_id: u64, master_key: Bytes) -> Result<(i64, i64)> {
        self.check_serving()?;
        Self::check_master_key_len(&master_key)?;
        let st = self.ledgers.get_or_create(ledger_id, &master_key);
        Self::check_key(&st, &master_key)?;
        let rec = Record::Fence {
            ledger_id,
            master_key,
        };
        self.journaled(&st, rec, |g| g.fenced = true).await?;
        let last = st.inner.lock().last_entry;
        Ok((st.lac(), last))
    }

    /// Stores an explicit LAC sent by the writer.
    pub async fn write_lac(
        &self,
        ledger_id: u64,
        master_key: Bytes,
        lac: i64,
        body: Bytes,
    ) -> Result<()> {
        self.check_serving()?;
        Self::check_master_key_len(&master_key)?;
        if body.len() > self.cfg.entry_size_max_bytes {
            return Err(BookieError::TooLarge {
                size: body.len(),
                max: self.cfg.entry_size_max_bytes,
            });
        }
        let st = self.ledgers.get_or_create(ledger_id, &master_key);
        Self::check_key(&st, &master_key)?;
        let rec = Record::ExplicitLac {
            ledger_id,
            lac,
            master_key,
            body: body.clone(),
        };
        self.journaled(&st, rec, |g| set_explicit_lac(g, lac, body))
            .await?;
        st.advance_lac(lac);
        Ok(())
    }

    /// Reads an entry (`entry_id` -1: the last one held). With `fence`, fences first.
    pub async fn read(
        self: &Arc<Self>,
        ledger_id: u64,
        entry_id: i64,
        fence: Option<Bytes>,
    ) -> Result<ReadResult> {
        let r = self.read_inner(ledger_id, entry_id, fence).await;
        match &r {
            Ok(_) => self.metrics.reads.inc(),
            Err(_) => self.metrics.read_errors.inc(),
        };
        r
    }

    async fn read_inner(
        self: &Arc<Self>,
        ledger_id: u64,
        entry_id: i64,
        fence: Option<Bytes>,
    ) -> Result<ReadResult> {
        self.check_serving()?;
        if entry_id < -1 {
            return Err(BookieError::BadRequest(format!(
                "entry id {entry_id} is negative"
            )));
        }
        if let Some(key) = fence {
            self.fence(ledger_id, key).await?;
        }
        let st = self
            .ledgers
            .get(ledger_id)
            .ok_or(BookieError::NoSuchLedger(ledger_id))?;
        let (last, fenced) = {
            let g = st.inner.lock();
            (g.last_entry, g.fenced)
        };
        let wanted = if entry_id == -1 { last } else { entry_id };
        if wanted < 0 {
            return Err(BookieError::NoSuchEntry(ledger_id, entry_id));
        }
        let body = self
            .read_body(ledger_id, wanted as u64)
            .await?
            .ok_or(BookieError::NoSuchEntry(ledger_id, wanted))?;
        Ok(ReadResult {
            entry_id: wanted as u64,
            body,
            lac: st.lac(),
            fenced,
        })
    }

    async fn read_body(self: &Arc<Self>, ledger_id: u64, entry_id: u64) -> Result<Option<Bytes>> {
        if let Some(b) = self.storage.get_cached(ledger_id, entry_id) {
            return Ok(Some(b));
        }
        // Entry-log reads are blocking file I/O: keep them off the async workers.
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.storage.read_stored(ledger_id, entry_id))
            .await
            .map_err(|e| BookieError::Io(std::io::Error::other(e.to_string())))?
    }

    /// The ledger's LAC; with `timeout`, waits until it passes `previous` first.
    /// Consecutive entries from `first` on: at most `max_entries` (at most
    /// [`READ_ENTRIES_MAX`]), and no more once `max_bytes` (at most [`READ_BYTES_MAX`]) are
    /// gathered, though the first always comes back. Stops before the first entry this bookie
    /// does not hold; fails like [`Bookie::read`] when it lacks `first`. Returns the bodies and
    /// the LAC.
    pub async fn read_range(
        self: &Arc<Self>,
        ledger_id: u64,
        first: u64,
        max_entries: u32,
        max_bytes: u64,
    ) -> Result<(Vec<Bytes>, i64)> {
        let first = i64::try_from(first)
            .map_err(|_| BookieError::BadRequest(format!("entry id {first} is out of range")))?;
        let max_entries = max_entries.clamp(1, READ_ENTRIES_MAX) as i64;
        let max_bytes = max_bytes.min(READ_BYTES_MAX);
        let (mut bodies, mut bytes, mut lac) = (Vec::new(), 0u64, -1);
        for entry in first..first.saturating_add(max_entries) {
            match self.read(ledger_id, entry, None).await {
                Ok(r) => {
                    bytes += r.body.len() as u64;
                    lac = r.lac;
                    bodies.push(r.body);
                    if bytes >= max_bytes {
                        break;
                    }
                }
                Err(e) if bodies.is_empty() => return Err(e),
                Err(_) => break,
            }
        }
        Ok((bodies, lac))
    }

    pub async fn read_lac(
        self: &Arc<Self>,
        ledger_id: u64,
        previous: i64,
        timeout: Option<Duration>,
    ) -> Result<LacResult> {
        self.check_serving()?;
        let st = self
            .ledgers
            .get(ledger_id)
            .ok_or(BookieError::NoSuchLedger(ledger_id))?;
        let mut timed_out = false;
        if let Some(t) = timeout {
            let mut rx = st.subscribe_lac();
            timed_out = tokio::time::timeout(t, rx.wait_for(|lac| *lac > previous))
                .await
                .is_err();
        }
        let (last, explicit) = {
            let g = st.inner.lock();
            (
                g.last_entry,
                g.explicit_lac.as_ref().map(|(_, b)| b.clone()),
            )
        };
        let last_entry_body = if last >= 0 {
            self.read_body(ledger_id, last as u64).await?
        } else {
            None
        };
        Ok(LacResult {
            lac: st.lac(),
            last_entry_body,
            explicit_lac_body: explicit,
            timed_out,
        })
    }

    /// Deletes a ledger's entries and state. Deleting an unknown ledger succeeds (idempotent).
    pub async fn delete(self: &Arc<Self>, ledger_id: u64) -> Result<()> {
        self.check_serving()?;
        if !self.ledgers.contains(ledger_id) {
            return Ok(());
        }
        // Durable first, then gone: a failed journal write leaves the ledger whole (a retry
        // journals again), and replay meets the Delete after the ledger's earlier records.
        let rec = Record::Delete { ledger_id };
        let reservation = self.reserve(rec.frame_len()).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.journal.submit(
            reservation,
            std::slice::from_ref(&rec),
            Box::new(move |r| drop(tx.send(r))),
        );
        Self::durable(rx).await?;
        self.ledgers.remove(ledger_id);
        let this = self.clone();
        tokio::task::spawn_blocking(move || this.storage.delete_ledger(ledger_id))
            .await
            .map_err(|e| BookieError::Io(std::io::Error::other(e.to_string())))??;
        tracing::info!(ledger_id, "ledger deleted");
        Ok(())
    }

    pub fn info(&self) -> BookieInfo {
        let (mut free, mut total) = (u64::MAX, 0);
        for d in self.all_dirs() {
            if let Ok((f, t)) = durable::disk_space(&d) {
                free = free.min(f);
                total = total.max(t);
            }
        }
        BookieInfo {
            bookie_id: self.id.clone(),
            read_only: self.is_read_only(),
            forced_read_only: self.forced_read_only.load(Ordering::Acquire),
            disk_full: self.disk_full.load(Ordering::Acquire),
            free_bytes: if free == u64::MAX { 0 } else { free },
            total_bytes: total,
            ledgers: self.ledgers.len(),
            journal_io: self.journal.io_name(),
            journal_failed: self.journal.has_failed(),
        }
    }

    fn all_dirs(&self) -> Vec<std::path::PathBuf> {
        std::iter::once(self.cfg.journal.dir.clone())
            .chain(self.cfg.storage.ledger_dirs.iter().cloned())
            .collect()
    }

    /// Flushes memory to the entry logs and records a journal mark from which replay starts.
    pub fn checkpoint(&self) -> Result<()> {
        let mark = self.journal.written_mark();
        self.checkpoint_at(mark)
    }

    fn checkpoint_at(&self, mark: LogMark) -> Result<()> {
        let _one = self.checkpoint_lock.lock();
        let started = Instant::now();
        let is_live = |l| self.ledgers.contains(l);
        let entries = self.storage.flush_all(&is_live)?;
        // Ledger state is read after the mark was taken: every change journaled before the
        // mark is already in memory, so it is in this snapshot.
        let mut per_dir = vec![Vec::new(); self.storage.dirs().len()];
        for st in self.ledgers.all() {
            per_dir[self.storage.dir_index(st.id)].push(st.meta());
        }
        self.storage.save_checkpoint(per_dir, mark)?;
        let removed = self.journal.remove_files_before(mark)?;
        self.metrics.checkpoints.inc();
        self.metrics
            .checkpoint_seconds
            .observe(started.elapsed().as_secs_f64());
        self.metrics.ledgers.set(self.ledgers.len() as i64);
        tracing::debug!(
            entries,
            journal_files_removed = removed,
            ?mark,
            "checkpoint done"
        );
        Ok(())
    }

    /// Brings the gauges (queue depths, cache sizes) up to date; called before metrics are read.
    pub fn refresh_gauges(&self) {
        let m = &self.metrics;
        m.journal_queue_bytes
            .set(self.journal.queued_bytes() as i64);
        m.write_cache_bytes.set(self.storage.cache_bytes() as i64);
        m.read_cache_bytes
            .set(self.storage.read_cache_bytes() as i64);
        m.ledgers.set(self.ledgers.len() as i64);
        m.read_only.set(self.is_read_only() as i64);
    }

    /// Removes entry logs that hold no live ledger.
    pub fn gc(&self) -> Result<usize> {
        self.storage.gc(&|l| self.ledgers.contains(l))
    }

    /// Re-evaluates disk usage against the thresholds.
    pub fn check_disks(&self) {
        let mut worst: f64 = 0.0;
        for d in self.all_dirs() {
            match durable::disk_space(&d) {
                Ok((free, total)) if total > 0 => {
                    worst = worst.max(1.0 - free as f64 / total as f64);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(dir = %d.display(), error = %e, "disk check failed"),
            }
        }
        let full = self.disk_full.load(Ordering::Acquire);
        if !full && worst >= self.cfg.disk.usage_high {
            self.disk_full.store(true, Ordering::Release);
            tracing::warn!(
                usage = worst,
                threshold = self.cfg.disk.usage_high,
                "disk above high-water mark: bookie is read-only"
            );
        } else if full && worst < self.cfg.disk.usage_low {
            self.disk_full.store(false, Ordering::Release);
            tracing::info!(
                usage = worst,
                threshold = self.cfg.disk.usage_low,
                "disk below low-water mark: bookie is writable"
            );
        }
        self.metrics.read_only.set(self.is_read_only() as i64);
    }

    fn wait_stop(&self, d: Duration) -> bool {
        let (m, cv) = &*self.stop;
        let mut stopped = m.lock();
        if !*stopped {
            cv.wait_for(&mut stopped, d);
        }
        *stopped
    }

    fn spawn_background(self: &Arc<Self>) {
        let weak = Arc::downgrade(self);
        let flush_wanted = self.storage.flush_wanted.clone();
        let stop = self.stop.clone();
        let interval = Duration::from_millis(self.cfg.storage.flush_interval_ms);
        let gc_interval = Duration::from_millis(self.cfg.storage.gc_interval_ms);
        let checkpointer = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || {
                let mut last_gc = Instant::now();
                loop {
                    {
                        let (m, cv) = &*flush_wanted;
                        let mut wanted = m.lock();
                        if !*wanted {
                            cv.wait_for(&mut wanted, interval);
                        }
                    }
                    if *stop.0.lock() {
                        return;
                    }
                    let Some(b) = weak.upgrade() else { return };
                    if let Err(e) = b.checkpoint() {
                        tracing::error!(error = %e, "checkpoint failed; will retry");
                        std::thread::sleep(Duration::from_millis(100));
                    }
                    if last_gc.elapsed() >= gc_interval {
                        last_gc = Instant::now();
                        if let Err(e) = b.gc() {
                            tracing::error!(error = %e, "garbage collection failed");
                        }
                    }
                    b.metrics
                        .write_cache_bytes
                        .set(b.storage.cache_bytes() as i64);
                    b.metrics
                        .read_cache_bytes
                        .set(b.storage.read_cache_bytes() as i64);
                }
            })
            .expect("spawn checkpoint thread");
        let weak = Arc::downgrade(self);
        let check = Duration::from_millis(self.cfg.disk.check_interval_ms);
        let disk = std::thread::Builder::new()
            .name("disk-check".into())
            .spawn(move || {
                loop {
                    let Some(b) = weak.upgrade() else { return };
                    if b.wait_stop(check) {
                        return;
                    }
                    b.check_disks();
                    b.metrics
                        .journal_queue_bytes
                        .set(b.journal.queued_bytes() as i64);
                    b.metrics
                        .write_cache_bytes
                        .set(b.storage.cache_bytes() as i64);
                }
            })
            .expect("spawn disk thread");
        self.threads.lock().extend([checkpointer, disk]);
    }

    /// Stops taking requests, writes out the journal queue, checkpoints and stops background
    /// threads. Idempotent.
    pub fn shutdown(&self) {
        if self.shutting_down.swap(true, Ordering::AcqRel) {
            return;
        }
        tracing::info!("bookie shutting down");
        self.journal.shutdown();
        {
            *self.stop.0.lock() = true;
            self.stop.1.notify_all();
            let (m, cv) = &*self.storage.flush_wanted;
            *m.lock() = true;
            cv.notify_all();
        }
        for t in self.threads.lock().drain(..) {
            let _ = t.join();
        }
        match self.checkpoint() {
            Ok(()) => {
                if let Err(e) = self.storage.seal_logs() {
                    tracing::warn!(error = %e, "sealing entry logs failed; they are scanned at start-up");
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "final checkpoint failed; the journal will be replayed")
            }
        }
        tracing::info!("bookie stopped");
    }
}

struct PreparedAdd {
    ledger: Arc<LedgerState>,
    reservation: journal::Reservation,
    record: Record,
    lac: i64,
    recovery: bool,
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_proto::entry::EntryHeader;

    fn config(root: &std::path::Path) -> BookieConfig {
        let mut c = BookieConfig::default();
        c.journal.dir = root.join("journal");
        c.journal.prealloc_bytes = 1 << 20;
        c.storage.ledger_dirs = vec![root.join("l1"), root.join("l2")];
        c.storage.write_cache_bytes_max = 32 << 20;
        c.storage.entry_log_size_max_bytes = 64 << 10;
        c.storage.flush_interval_ms = 3_600_000;
        c.storage.gc_interval_ms = 3_600_000;
        c.entry_size_max_bytes = 1 << 20;
        c.journal.queue_bytes_max = 8 << 20;
        c
    }

    fn body(ledger: u64, entry: u64, n: usize) -> Bytes {
        let h = EntryHeader {
            ledger_id: ledger,
            entry_id: entry,
            lac: entry as i64 - 1,
            length: 0,
        };
        entry::encode(&h, &vec![(ledger * 31 + entry) as u8; n])
    }

    async fn add(
        b: &Bookie,
        ledger: u64,
        entry: u64,
        key: &'static [u8],
        recovery: bool,
    ) -> Result<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = AddRequest {
            ledger_id: ledger,
            entry_id: entry,
            master_key: Bytes::from_static(key),
            recovery,
            body: body(ledger, entry, 3000),
        };
        b.add(req, Box::new(move |r| drop(tx.send(r)))).await;
        rx.await.expect("callback runs")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn entries_survive_checkpoint_and_reopen() {
        let t = tempfile::tempdir().unwrap();
        let b = Bookie::open(config(t.path())).unwrap();
        for l in 1..=3 {
            for e in 0..20 {
                add(&b, l, e, b"k", false).await.unwrap();
            }
        }
        b.checkpoint().unwrap();
        // Served from entry logs now (several, since logs rotate at 64 KiB).
        assert!(b.storage.locate(2, 7).unwrap().is_some());
        add(&b, 1, 20, b"k", false).await.unwrap(); // only in the journal + write cache
        b.shutdown();
        drop(b);
        let b = Bookie::open(config(t.path())).unwrap();
        for l in 1..=3 {
            for e in 0..20 {
                let r = b.read(l, e as i64, None).await.unwrap();
                assert_eq!(r.body, body(l, e, 3000));
            }
        }
        let last = b.read(1, -1, None).await.unwrap();
        assert_eq!(last.entry_id, 20);
        assert_eq!(last.lac, 19);
        assert!(matches!(
            b.read(9, 0, None).await,
            Err(BookieError::NoSuchLedger(9))
        ));
        assert!(matches!(
            b.read(1, 21, None).await,
            Err(BookieError::NoSuchEntry(1, 21))
        ));
        b.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn range_reads_stop_at_limits_and_gaps() {
        let t = tempfile::tempdir().unwrap();
        let b = Bookie::open(config(t.path())).unwrap();
        for e in (0..10).chain(11..15) {
            add(&b, 4, e, b"k", false).await.unwrap();
        }
        let (bodies, lac) = b.read_range(4, 2, 100, u64::MAX).await.unwrap();
        assert_eq!(bodies.len(), 8, "entries 2..=9, then the gap at 10");
        for (i, body) in bodies.iter().enumerate() {
            assert_eq!(*body, super::tests::body(4, 2 + i as u64, 3000));
        }
        assert_eq!(lac, 13, "the bookie's LAC: entry 14 carried 13");
        assert_eq!(b.read_range(4, 0, 3, u64::MAX).await.unwrap().0.len(), 3);
        // 3000-byte payloads: the byte limit stops after the entry that reaches it; the first
        // entry comes back even over the limit.
        assert_eq!(b.read_range(4, 0, 100, 6000).await.unwrap().0.len(), 2);
        assert_eq!(b.read_range(4, 0, 100, 1).await.unwrap().0.len(), 1);
        assert_eq!(b.read_range(4, 11, 100, u64::MAX).await.unwrap().0.len(), 4);
        assert!(matches!(
            b.read_range(4, 10, 100, u64::MAX).await,
            Err(BookieError::NoSuchEntry(4, 10))
        ));
        assert!(matches!(
            b.read_range(5, 0, 100, u64::MAX).await,
            Err(BookieError::NoSuchLedger(5))
        ));
        assert!(matches!(
            b.read_range(4, u64::MAX, 1, 1).await,
            Err(BookieError::BadRequest(_))
        ));
        b.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fencing_and_keys() {
        let t = tempfile::tempdir().unwrap();
        let b = Bookie::open(config(t.path())).unwrap();
        add(&b, 5, 0, b"right", false).await.unwrap();
        assert!(matches!(
            add(&b, 5, 1, b"wrong", false).await,
            Err(BookieError::Unauthorized(5))
        ));
        assert!(matches!(
            b.fence(5, Bytes::from_static(b"wrong")).await,
            Err(BookieError::Unauthorized(5))
        ));
        let (lac, last) = b.fence(5, Bytes::from_static(b"right")).await.unwrap();
        assert_eq!((lac, last), (-1, 0));
        assert!(matches!(
            add(&b, 5, 1, b"right", false).await,
            Err(BookieError::Fenced(5))
        ));
        add(&b, 5, 1, b"right", true).await.unwrap();
        // Fencing an unknown ledger creates it fenced: a late writer cannot start it here.
        b.fence(6, Bytes::from_static(b"k6")).await.unwrap();
        assert!(matches!(
            add(&b, 6, 0, b"k6", false).await,
            Err(BookieError::Fenced(6))
        ));
        // A fencing read fences too.
        add(&b, 7, 0, b"k7", false).await.unwrap();
        b.read(7, 0, Some(Bytes::from_static(b"k7"))).await.unwrap();
        assert!(matches!(
            add(&b, 7, 1, b"k7", false).await,
            Err(BookieError::Fenced(7))
        ));
        b.shutdown();
        drop(b);
        let b = Bookie::open(config(t.path())).unwrap();
        assert!(matches!(
            add(&b, 5, 2, b"right", false).await,
            Err(BookieError::Fenced(5))
        ));
        assert!(matches!(
            add(&b, 6, 0, b"k6", false).await,
            Err(BookieError::Fenced(6))
        ));
        b.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn delete_then_gc_removes_dead_entry_logs() {
        let t = tempfile::tempdir().unwrap();
        let mut c = config(t.path());
        c.storage.ledger_dirs.truncate(1);
        let b = Bookie::open(c.clone()).unwrap();
        for e in 0..60 {
            add(&b, 1, e, b"k", false).await.unwrap();
        }
        b.checkpoint().unwrap();
        for e in 0..5 {
            add(&b, 2, e, b"k", false).await.unwrap();
        }
        b.checkpoint().unwrap();
        let logs =
            |dir: &std::path::Path| crate::storage::entry_log::list(&dir.join("logs")).unwrap();
        let before = logs(&c.storage.ledger_dirs[0]);
        assert!(before.len() > 2, "{before:?}");
        assert_eq!(b.gc().unwrap(), 0, "nothing dead yet");
        b.delete(1).await.unwrap();
        assert!(matches!(
            b.read(1, 0, None).await,
            Err(BookieError::NoSuchLedger(1))
        ));
        let removed = b.gc().unwrap();
        assert!(removed >= 1);
        let after = logs(&c.storage.ledger_dirs[0]);
        assert_eq!(after.len(), before.len() - removed);
        for e in 0..5 {
            assert_eq!(
                b.read(2, e as i64, None).await.unwrap().body,
                body(2, e, 3000)
            );
        }
        b.shutdown();
        drop(b);
        // The delete is durable: after a restart the ledger stays gone.
        let b = Bookie::open(c).unwrap();
        assert!(matches!(
            b.read(1, 0, None).await,
            Err(BookieError::NoSuchLedger(1))
        ));
        assert_eq!(b.read(2, 4, None).await.unwrap().body, body(2, 4, 3000));
        b.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn long_poll_wakes_on_progress_and_bad_input_changes_nothing() {
        let t = tempfile::tempdir().unwrap();
        let b = Bookie::open(config(t.path())).unwrap();
        add(&b, 3, 0, b"k", false).await.unwrap();
        add(&b, 3, 1, b"k", false).await.unwrap();
        let r = b
            .read_lac(3, 0, Some(Duration::from_millis(50)))
            .await
            .unwrap();
        assert!(r.timed_out);
        assert_eq!(r.lac, 0);
        let b2 = b.clone();
        let poll =
            tokio::spawn(async move { b2.read_lac(3, 0, Some(Duration::from_secs(30))).await });
        add(&b, 3, 2, b"k", false).await.unwrap();
        let r = poll.await.unwrap().unwrap();
        assert!(!r.timed_out);
        assert_eq!(r.lac, 1);
        assert_eq!(r.last_entry_body, Some(body(3, 2, 3000)));
        b.write_lac(3, Bytes::from_static(b"k"), 2, Bytes::from_static(b"lac"))
            .await
            .unwrap();
        assert_eq!(b.read_lac(3, -1, None).await.unwrap().lac, 2);

        // A body for another entry, an oversized body, a long key: refused, nothing stored.
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = AddRequest {
            ledger_id: 3,
            entry_id: 9,
            master_key: Bytes::from_static(b"k"),
            recovery: false,
            body: body(3, 8, 10),
        };
        b.add(req, Box::new(move |r| drop(tx.send(r)))).await;
        assert!(matches!(rx.await.unwrap(), Err(BookieError::BadRequest(_))));
        let (tx, rx) = tokio::sync::oneshot::channel();
        let req = AddRequest {
            ledger_id: 3,
            entry_id: 9,
            master_key: Bytes::from_static(b"k"),
            recovery: false,
            body: body(3, 9, 2 << 20),
        };
        b.add(req, Box::new(move |r| drop(tx.send(r)))).await;
        assert!(matches!(
            rx.await.unwrap(),
            Err(BookieError::TooLarge { .. })
        ));
        assert!(matches!(
            b.fence(3, Bytes::from(vec![0; 65])).await,
            Err(BookieError::BadRequest(_))
        ));
        assert!(matches!(
            b.read(3, 9, None).await,
            Err(BookieError::NoSuchEntry(3, 9))
        ));
        assert!(matches!(
            b.read(3, -2, None).await,
            Err(BookieError::BadRequest(_))
        ));
        assert!(b.is_healthy());
        b.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn checkpoint_after_a_failed_flush_covers_every_entry() {
        let t = tempfile::tempdir().unwrap();
        let mut c = config(t.path());
        c.storage.ledger_dirs.truncate(1);
        let logs = c.storage.ledger_dirs[0].join("logs");
        let b = Bookie::open(c).unwrap();
        add(&b, 1, 0, b"k", false).await.unwrap();
        b.checkpoint().unwrap();
        // Hide the logs directory: the flush fails when it rotates to a new log.
        std::fs::rename(&logs, logs.with_extension("away")).unwrap();
        for e in 1..40 {
            add(&b, 1, e, b"k", false).await.unwrap();
        }
        assert!(b.checkpoint().is_err());
        std::fs::rename(logs.with_extension("away"), &logs).unwrap();
        for e in 40..50 {
            add(&b, 1, e, b"k", false).await.unwrap();
        }
        b.checkpoint().unwrap();
        // Every entry the mark covers is in an entry log, not only in memory.
        for e in 0..50 {
            assert!(
                b.storage.locate(1, e).unwrap().is_some(),
                "entry {e} not flushed"
            );
        }
        b.shutdown();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn forced_read_only_rejects_adds_but_serves_reads() {
        let t = tempfile::tempdir().unwrap();
        let b = Bookie::open(config(t.path())).unwrap();
        add(&b, 4, 0, b"k", false).await.unwrap();
        b.set_forced_read_only(true);
        assert!(matches!(
            add(&b, 4, 1, b"k", false).await,
            Err(BookieError::ReadOnly)
        ));
        assert!(b.read(4, 0, None).await.is_ok());
        b.set_forced_read_only(false);
        add(&b, 4, 1, b"k", false).await.unwrap();
        b.shutdown();
    }
}
