//! Ledger storage: where entries live once the journal has them.
//!
//! Ledgers are spread over the ledger directories by `ledger_id % dirs`. Each directory has its
//! own write cache, read cache, entry logs (`logs/`), index (`index/`) and checkpoint files
//! (`LEDGERS`, `LASTMARK`). Reads look in the write cache, then the read cache, then the index
//! and the entry log.
//!
//! A flush (part of a checkpoint) swaps the write cache, appends the entries to the current entry
//! log, syncs it, then writes and syncs their index slots, and only then drops them from memory:
//! an index slot never points at data that is not durable, and an entry is always readable from
//! one place or the other.

pub mod cache;
pub mod entry_log;
pub mod index;
pub mod meta;

use crate::config::StorageConfig;
use crate::error::{BookieError, Result};
use crate::metrics::Metrics;
use bytes::Bytes;
use cache::{ReadCache, WriteCache};
use entry_log::{Location, LogUsage};
use index::IndexSet;
use parking_lot::{Mutex, RwLock};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Decides whether a ledger still exists (deleted ledgers' entries are skipped and collected).
pub type IsLive<'a> = &'a dyn Fn(u64) -> bool;

const INDEX_OPEN_MAX: usize = 4096;

pub struct DirStorage {
    pub dir: PathBuf,
    logs_dir: PathBuf,
    cache: RwLock<WriteCache>,
    cache_half_bytes: usize,
    room: tokio::sync::Notify,
    read_cache: Mutex<ReadCache>,
    readers: RwLock<HashMap<u32, Arc<File>>>,
    usage: Mutex<BTreeMap<u32, LogUsage>>,
    /// Logs whose usage is not fully known: never garbage-collected.
    pinned: HashSet<u32>,
    indexes: Mutex<IndexSet>,
    /// The log being written; held for a whole flush, which also serializes flushes and deletes.
    writer: Mutex<Option<entry_log::Writer>>,
    next_log_id: Mutex<u32>,
    log_size_max: u64,
}

impl DirStorage {
    fn open(dir: &Path, cfg: &StorageConfig, n_dirs: usize) -> Result<DirStorage> {
        let logs_dir = dir.join("logs");
        let index_dir = dir.join("index");
        crate::durable::create_dir(&logs_dir)?;
        crate::durable::create_dir(&index_dir)?;
        crate::durable::remove_temp_files(dir)?;
        crate::durable::remove_temp_files(&logs_dir)?;
        crate::durable::remove_temp_files(&index_dir)?;
        let mut usage = BTreeMap::new();
        let mut pinned = HashSet::new();
        let mut readers = HashMap::new();
        let ids = entry_log::list(&logs_dir)?;
        for &id in &ids {
            let path = entry_log::log_path(&logs_dir, id);
            let file = File::open(&path)?;
            if file.metadata()?.len() == 0 {
                // Left by a crash of a bookie that created logs in place (before create_file).
                tracing::warn!(log = id, "removing an empty entry log");
                drop(file);
                crate::durable::remove_file(&path)?;
                continue;
            }
            entry_log::check_header(&file, id)
                .map_err(|e| BookieError::Corruption(e.to_string()))?;
            let summary = std::fs::read(entry_log::map_path(&logs_dir, id))
                .ok()
                .and_then(|d| entry_log::decode_usage(&d));
            let u = match summary {
                Some(u) => u,
                None => {
                    // The log being written at a crash: summarize it once and seal it, unless a
                    // corrupt record hides part of it; then it stays unsealed and is never
                    // collected (its live entries cannot all be known).
                    let scan = entry_log::scan(&path, id)
                        .map_err(|e| BookieError::Corruption(e.to_string()))?;
                    if scan.complete {
                        crate::durable::write_atomic(
                            &entry_log::map_path(&logs_dir, id),
                            &entry_log::encode_usage(&scan.usage),
                        )?;
                        tracing::info!(
                            log = id,
                            ledgers = scan.usage.len(),
                            "unsealed entry log summarized"
                        );
                    } else {
                        tracing::error!(
                            log = id,
                            "entry log has a corrupt record; it is kept out of garbage collection"
                        );
                        pinned.insert(id);
                    }
                    scan.usage
                }
            };
            usage.insert(id, u);
            readers.insert(id, Arc::new(file));
        }
        let next = ids.last().map_or(1, |l| l + 1);
        Ok(DirStorage {
            dir: dir.into(),
            logs_dir,
            cache: RwLock::new(WriteCache::default()),
            cache_half_bytes: cfg.write_cache_bytes_max / n_dirs / 2,
            room: tokio::sync::Notify::new(),
            read_cache: Mutex::new(ReadCache::new(cfg.read_cache_bytes_max / n_dirs)),
            readers: RwLock::new(readers),
            usage: Mutex::new(usage),
            pinned,
            indexes: Mutex::new(IndexSet::new(&index_dir, INDEX_OPEN_MAX)),
            writer: Mutex::new(None),
            next_log_id: Mutex::new(next),
            log_size_max: cfg.entry_log_size_max_bytes,
        })
    }

    fn is_full(&self) -> bool {
        self.cache.read().active_bytes >= self.cache_half_bytes
    }

    fn new_writer(&self) -> Result<entry_log::Writer> {
        let mut next = self.next_log_id.lock();
        let w = entry_log::Writer::create(&self.logs_dir, *next)?;
        *next += 1;
        let file = File::open(entry_log::log_path(&self.logs_dir, w.id))?;
        self.readers.write().insert(w.id, Arc::new(file));
        self.usage.lock().insert(w.id, LogUsage::new());
        Ok(w)
    }

    /// Writes the write cache out to the entry log and index (see the module doc for the order).
    fn flush(&self, is_live: IsLive) -> Result<usize> {
        let mut writer = self.writer.lock();
        let mut flushed = 0;
        // A batch left by a failed flush goes first, then the active half: a checkpoint's mark
        // covers both, so both must be in the entry log before it is saved.
        loop {
            let (snapshot, leftover) = self.cache.write().swap();
            if snapshot.is_empty() {
                return Ok(flushed);
            }
            // The active half is empty again: adds waiting for room may go on meanwhile.
            self.room.notify_waiters();
            let result = self.write_out(&mut writer, &snapshot, is_live);
            if result.is_err() {
                // The log's tail is unknown after an error: leave it (its records are checksummed
                // and unindexed) and start a new one on the next flush.
                *writer = None;
            }
            result?;
            self.cache.write().clear_flushing();
            self.room.notify_waiters();
            flushed += snapshot.len();
            if !leftover {
                return Ok(flushed);
            }
        }
    }

    fn write_out(
        &self,
        writer: &mut Option<entry_log::Writer>,
        snapshot: &BTreeMap<cache::Key, Bytes>,
        is_live: IsLive,
    ) -> Result<()> {
        let mut locations = Vec::with_capacity(snapshot.len());
        for (&(ledger, entry), body) in snapshot.iter() {
            if !is_live(ledger) {
                continue;
            }
            if writer
                .as_ref()
                .is_none_or(|w| w.size() >= self.log_size_max)
            {
                if let Some(old) = writer.take() {
                    let id = old.id;
                    let u = old.seal()?;
                    self.usage.lock().insert(id, u);
                }
                *writer = Some(self.new_writer()?);
            }
            let w = writer.as_mut().expect("set above");
            locations.push((ledger, entry, w.append(ledger, entry, body)?));
        }
        if let Some(w) = writer.as_mut() {
            w.sync()?;
            self.usage.lock().insert(w.id, w.usage.clone());
        }
        let mut idx = self.indexes.lock();
        for (ledger, entry, loc) in locations {
            if is_live(ledger) {
                idx.put(ledger, entry, loc).map_err(index_error)?;
            }
        }
        idx.sync()?;
        Ok(())
    }

    /// Seals the log being written (after a final flush), so the next start need not scan it.
    fn seal_current(&self) -> Result<()> {
        let mut writer = self.writer.lock();
        if let Some(w) = writer.take() {
            let id = w.id;
            let u = w.seal()?;
            self.usage.lock().insert(id, u);
        }
        Ok(())
    }

    fn get_cached(&self, key: cache::Key, metrics: &Metrics) -> Option<Bytes> {
        if let Some(b) = self.cache.read().get(&key) {
            metrics.write_cache_hits.inc();
            return Some(b);
        }
        let b = self.read_cache.lock().get(&key);
        if b.is_some() {
            metrics.read_cache_hits.inc();
        }
        b
    }

    fn read_stored(&self, ledger: u64, entry: u64, metrics: &Metrics) -> Result<Option<Bytes>> {
        let Some(loc) = self
            .indexes
            .lock()
            .get(ledger, entry)
            .map_err(index_error)?
        else {
            // The entry may have been flushed between the cache check and now.
            return Ok(self.cache.read().get(&(ledger, entry)));
        };
        metrics.read_cache_misses.inc();
        let file = self
            .readers
            .read()
            .get(&loc.log_id)
            .cloned()
            .ok_or_else(|| {
                BookieError::Corruption(format!(
                    "entry {ledger}/{entry} points at missing entry log {}",
                    loc.log_id
                ))
            })?;
        let body = entry_log::read(&file, loc, ledger, entry).map_err(|e| match e {
            entry_log::ReadError::Io(e) => BookieError::Io(e),
            e @ entry_log::ReadError::Corrupt { .. } => BookieError::Corruption(e.to_string()),
        })?;
        self.read_cache.lock().insert((ledger, entry), body.clone());
        Ok(Some(body))
    }

    fn delete_ledger(&self, ledger: u64) -> Result<()> {
        let _flush = self.writer.lock();
        self.cache.write().remove_ledger(ledger);
        self.indexes.lock().remove(ledger)?;
        self.room.notify_waiters();
        Ok(())
    }

    fn gc(&self, is_live: IsLive) -> Result<usize> {
        // Held for the whole pass: a flush cannot rotate to a new (empty, so "dead") log meanwhile.
        let writer = self.writer.lock();
        let current = writer.as_ref().map(|w| w.id);
        let dead = entry_log::collectable(self.usage.lock().iter(), current, &self.pinned, is_live);
        for &id in &dead {
            self.readers.write().remove(&id);
            crate::durable::remove_file(&entry_log::log_path(&self.logs_dir, id))?;
            crate::durable::remove_file(&entry_log::map_path(&self.logs_dir, id))?;
            self.usage.lock().remove(&id);
            tracing::info!(dir = %self.dir.display(), log = id, "entry log garbage-collected");
        }
        Ok(dead.len())
    }
}

fn index_error(e: index::IndexError) -> BookieError {
    match e {
        index::IndexError::Io(e) => BookieError::Io(e),
        e @ index::IndexError::Corrupt { .. } => BookieError::Corruption(e.to_string()),
    }
}

/// All ledger directories.
pub struct LedgerStorage {
    dirs: Vec<DirStorage>,
    metrics: Arc<Metrics>,
    throttle_max: Duration,
    /// Set when a write cache fills: the checkpointer should run now.
    pub flush_wanted: Arc<(Mutex<bool>, parking_lot::Condvar)>,
}

impl LedgerStorage {
    pub fn open(cfg: &StorageConfig, metrics: Arc<Metrics>) -> Result<LedgerStorage> {
        let n = cfg.ledger_dirs.len();
        let dirs = cfg
            .ledger_dirs
            .iter()
            .map(|d| DirStorage::open(d, cfg, n))
            .collect::<Result<Vec<_>>>()?;
        Ok(LedgerStorage {
            dirs,
            metrics,
            throttle_max: Duration::from_millis(cfg.add_throttle_max_ms),
            flush_wanted: Arc::new((Mutex::new(false), parking_lot::Condvar::new())),
        })
    }

    pub fn dirs(&self) -> &[DirStorage] {
        &self.dirs
    }

    pub fn dir_index(&self, ledger: u64) -> usize {
        (ledger % self.dirs.len() as u64) as usize
    }

    fn dir(&self, ledger: u64) -> &DirStorage {
        &self.dirs[self.dir_index(ledger)]
    }

    fn want_flush(&self) {
        let (m, cv) = &*self.flush_wanted;
        *m.lock() = true;
        cv.notify_all();
    }

    /// Waits (bounded) until the ledger's write cache has room: the write back-pressure.
    pub async fn wait_for_room(&self, ledger: u64) -> Result<()> {
        let d = self.dir(ledger);
        if !d.is_full() {
            return Ok(());
        }
        self.metrics.add_throttled.inc();
        let wait = async {
            loop {
                let notified = d.room.notified();
                tokio::pin!(notified);
                notified.as_mut().enable();
                if !d.is_full() {
                    return;
                }
                self.want_flush();
                notified.await;
            }
        };
        tokio::time::timeout(self.throttle_max, wait)
            .await
            .map_err(|_| BookieError::TooManyRequests("write cache full"))
    }

    /// Adds an entry to the write cache (readable at once; durable after the next checkpoint).
    pub fn insert(&self, ledger: u64, entry: u64, body: Bytes) {
        let d = self.dir(ledger);
        let mut c = d.cache.write();
        c.insert((ledger, entry), body);
        let full = c.active_bytes >= d.cache_half_bytes;
        drop(c);
        if full {
            self.want_flush();
        }
    }

    /// True when some write cache is over half full.
    pub fn needs_flush(&self) -> bool {
        self.dirs.iter().any(DirStorage::is_full)
    }

    pub fn cache_bytes(&self) -> usize {
        self.dirs.iter().map(|d| d.cache.read().bytes()).sum()
    }

    pub fn read_cache_bytes(&self) -> usize {
        self.dirs.iter().map(|d| d.read_cache.lock().bytes()).sum()
    }

    pub fn get_cached(&self, ledger: u64, entry: u64) -> Option<Bytes> {
        self.dir(ledger).get_cached((ledger, entry), &self.metrics)
    }

    /// Reads from the entry logs (blocking I/O). `Ok(None)`: not stored here.
    pub fn read_stored(&self, ledger: u64, entry: u64) -> Result<Option<Bytes>> {
        self.dir(ledger).read_stored(ledger, entry, &self.metrics)
    }

    /// The highest entry of a ledger in memory or on disk.
    pub fn last_entry(&self, ledger: u64) -> Result<Option<u64>> {
        let d = self.dir(ledger);
        let cached = d.cache.read().last_entry(ledger);
        let stored = d.indexes.lock().last_entry(ledger).map_err(index_error)?;
        Ok(cached.max(stored))
    }

    /// Flushes every directory's write cache (blocking).
    pub fn flush_all(&self, is_live: IsLive) -> Result<usize> {
        let mut n = 0;
        for d in &self.dirs {
            n += d.flush(is_live)?;
        }
        *self.flush_wanted.0.lock() = false;
        Ok(n)
    }

    /// Seals every directory's current entry log (at a clean shutdown, after the last flush).
    pub fn seal_logs(&self) -> Result<()> {
        for d in &self.dirs {
            d.seal_current()?;
        }
        Ok(())
    }

    /// Persists each directory's ledgers and the mark the checkpoint covers.
    pub fn save_checkpoint(
        &self,
        per_dir: Vec<Vec<meta::LedgerMeta>>,
        mark: crate::journal::LogMark,
    ) -> Result<()> {
        for (d, ledgers) in self.dirs.iter().zip(per_dir) {
            crate::durable::write_atomic(
                &d.dir.join(meta::LEDGERS_FILE),
                &meta::encode_ledgers(&ledgers),
            )?;
        }
        for d in &self.dirs {
            crate::durable::write_atomic(&d.dir.join(meta::MARK_FILE), &meta::encode_mark(mark))?;
        }
        Ok(())
    }

    pub fn delete_ledger(&self, ledger: u64) -> Result<()> {
        self.dir(ledger).delete_ledger(ledger)
    }

    /// Removes entry logs that hold no live ledger; returns how many.
    pub fn gc(&self, is_live: IsLive) -> Result<usize> {
        let mut n = 0;
        for d in &self.dirs {
            n += d.gc(is_live)?;
        }
        self.metrics.entry_logs_collected.inc_by(n as u64);
        Ok(n)
    }

    /// Removes index files of ledgers that no longer exist (left by a crash during a delete).
    pub fn remove_orphan_indexes(&self, is_live: IsLive) -> Result<()> {
        for d in &self.dirs {
            let ids = index::list(&d.dir.join("index"))?;
            let mut idx = d.indexes.lock();
            for l in ids.into_iter().filter(|l| !is_live(*l)) {
                tracing::info!(ledger = l, "removing index of a deleted ledger");
                idx.remove(l)?;
            }
        }
        Ok(())
    }

    /// The index location of an entry, for offline tools and tests.
    pub fn locate(&self, ledger: u64, entry: u64) -> Result<Option<(PathBuf, Location)>> {
        let d = self.dir(ledger);
        let loc = d.indexes.lock().get(ledger, entry).map_err(index_error)?;
        Ok(loc.map(|l| (entry_log::log_path(&d.logs_dir, l.log_id), l)))
    }
}
