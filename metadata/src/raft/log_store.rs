//! The raft log: entries, vote and commit index, in memory and (optionally) in one append-only
//! file `raft.log` in the node's directory.
//!
//! File format: an 8-byte magic `QRAFTLOG`, a u32 format version, then records
//! `[len u32][crc32c u32][postcard payload]` (big-endian). Replay applies the records in order;
//! a record cut short or failing its CRC with nothing valid after it is a torn tail (never
//! synced, never acknowledged) and is cut off; damage followed by valid records refuses to start.
//! The file is rewritten (temp file + rename) once purges have
//! left most of it dead.
//!
//! Durability: appended entries are written at once and fdatasync'd by a flusher thread that
//! groups the syncs of everything written meanwhile (group commit); openraft learns of the
//! flush through the `LogFlushed` callback, only after the sync. Votes are synced before
//! `save_vote` returns.

use std::collections::BTreeMap;
use std::fmt::Debug;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use openraft::storage::{LogFlushed, LogState, RaftLogStorage};
use openraft::{AnyError, LogId, RaftLogReader, StorageError, StorageIOError, Vote};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::{Entry, NodeId, TypeConfig};

const MAGIC: &[u8; 8] = b"QRAFTLOG";
const VERSION: u32 = 1;
const HEADER_LEN: u64 = 12;
/// Largest record accepted on replay (a batch of entries); larger lengths are damage.
const MAX_RECORD: usize = 256 << 20;
/// Rewrite the file once it holds this many bytes beyond the live entries.
const REWRITE_DEAD_BYTES: u64 = 64 << 20;

#[derive(Serialize, Deserialize)]
enum LogRecord {
    Entries(Vec<Entry>),
    /// Entries at and after this index are gone (conflict with a new leader).
    Truncate(u64),
    /// Entries up to and including this log id were compacted into a snapshot.
    Purge(LogId<NodeId>),
    Vote(Vote<NodeId>),
    Committed(Option<LogId<NodeId>>),
}

#[derive(Default)]
struct Inner {
    vote: Option<Vote<NodeId>>,
    committed: Option<LogId<NodeId>>,
    last_purged: Option<LogId<NodeId>>,
    entries: BTreeMap<u64, Entry>,
    file: Option<LogFile>,
}

struct LogFile {
    path: PathBuf,
    file: Arc<File>,
    len: u64,
    /// File length right after the last rewrite: what was live then.
    live_hint: u64,
    flusher: std::sync::mpsc::SyncSender<Flush>,
}

enum Flush {
    Sync(Arc<File>, LogFlushed<TypeConfig>),
}

/// The raft log store; clones share the same log (the reader is a clone).
#[derive(Clone)]
pub struct LogStore {
    inner: Arc<Mutex<Inner>>,
}

fn io_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_logs(AnyError::error(e.to_string())).into()
}

impl LogStore {
    /// A log kept only in memory (for tests and the in-memory backend).
    pub fn memory() -> Self {
        LogStore {
            inner: Arc::new(Mutex::new(Inner::default())),
        }
    }

    /// Opens (or creates) `dir/raft.log`, replaying it.
    pub fn open(dir: &Path) -> std::io::Result<Self> {
        let path = dir.join("raft.log");
        let mut inner = Inner::default();
        let file = if path.exists() {
            let valid = replay(&path, &mut inner)?;
            let f = OpenOptions::new().read(true).write(true).open(&path)?;
            if f.metadata()?.len() > valid {
                tracing::warn!(path = %path.display(), valid, "cutting a torn tail off the raft log");
                f.set_len(valid)?;
                f.sync_all()?;
            }
            f
        } else {
            write_fresh(&path, &inner)?;
            OpenOptions::new().read(true).write(true).open(&path)?
        };
        let len = file.metadata()?.len();
        inner.file = Some(LogFile {
            path,
            file: Arc::new(file),
            len,
            live_hint: len,
            flusher: spawn_flusher(),
        });
        Ok(LogStore {
            inner: Arc::new(Mutex::new(inner)),
        })
    }

    /// Highest log index present (for status).
    pub fn last_index(&self) -> u64 {
        let g = self.inner.lock();
        g.entries
            .keys()
            .next_back()
            .copied()
            .or(g.last_purged.map(|l| l.index))
            .unwrap_or(0)
    }
}

/// One thread per log syncs everything written so far, then completes the waiting callbacks.
fn spawn_flusher() -> std::sync::mpsc::SyncSender<Flush> {
    let (tx, rx) = std::sync::mpsc::sync_channel::<Flush>(65536);
    std::thread::Builder::new()
        .name("raft-log-sync".into())
        .spawn(move || {
            while let Ok(first) = rx.recv() {
                let mut batch = vec![first];
                while let Ok(more) = rx.try_recv() {
                    batch.push(more);
                }
                let Flush::Sync(file, _) = batch.last().expect("non-empty batch");
                let res = file.sync_data();
                for Flush::Sync(_, cb) in batch {
                    cb.log_io_completed(
                        res.as_ref()
                            .map(|_| ())
                            .map_err(|e| std::io::Error::new(e.kind(), e.to_string())),
                    );
                }
            }
        })
        .expect("spawn raft-log-sync thread");
    tx
}

fn encode(rec: &LogRecord) -> Vec<u8> {
    let payload = postcard::to_stdvec(rec).expect("raft records serialize");
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&payload).to_be_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Applies the file's records to `inner`; returns the length of the valid prefix.
fn replay(path: &Path, inner: &mut Inner) -> std::io::Result<u64> {
    let mut buf = Vec::new();
    File::open(path)?.read_to_end(&mut buf)?;
    if buf.len() < HEADER_LEN as usize || &buf[..8] != MAGIC {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("{}: not a quire raft log (bad magic)", path.display()),
        ));
    }
    let version = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: raft log format version {version}, this build reads {VERSION}",
                path.display()
            ),
        ));
    }
    let mut pos = HEADER_LEN as usize;
    while let Some((rec, next)) = record_at(&buf, pos) {
        apply_record(inner, rec);
        pos = next;
    }
    // Damage with a valid record after it is not a torn tail: records this node synced (and
    // may have acknowledged to a leader) would be lost by cutting there.
    if let Some(later) = (pos + 1..buf.len()).find(|p| record_at(&buf, *p).is_some()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!(
                "{}: damaged record at offset {pos} followed by a valid one at {later}: refusing to \
                 start (restore the node from its peers: remove its data directory and add it again)",
                path.display()
            ),
        ));
    }
    Ok(pos as u64)
}

/// The record at `pos` and the offset after it, if a whole, valid one is there.
fn record_at(buf: &[u8], pos: usize) -> Option<(LogRecord, usize)> {
    let header = buf.get(pos..pos + 8)?;
    let len = u32::from_be_bytes(header[..4].try_into().expect("4 bytes")) as usize;
    let crc = u32::from_be_bytes(header[4..].try_into().expect("4 bytes"));
    if len == 0 || len > MAX_RECORD {
        return None;
    }
    let payload = buf.get(pos + 8..pos + 8 + len)?;
    if crc32c::crc32c(payload) != crc {
        return None;
    }
    let rec = postcard::from_bytes::<LogRecord>(payload).ok()?;
    Some((rec, pos + 8 + len))
}

fn apply_record(inner: &mut Inner, rec: LogRecord) {
    match rec {
        LogRecord::Entries(es) => {
            for e in es {
                inner.entries.insert(e.log_id.index, e);
            }
        }
        LogRecord::Truncate(idx) => {
            inner.entries.split_off(&idx);
        }
        LogRecord::Purge(id) => {
            inner.entries = inner.entries.split_off(&(id.index + 1));
            inner.last_purged = Some(id);
        }
        LogRecord::Vote(v) => inner.vote = Some(v),
        LogRecord::Committed(c) => inner.committed = c,
    }
}

/// Writes a new log file holding the live state of `inner`, atomically (temp + rename).
fn write_fresh(path: &Path, inner: &Inner) -> std::io::Result<u64> {
    let tmp = path.with_extension("log.tmp");
    let mut f = File::create(&tmp)?;
    let mut buf = Vec::new();
    buf.extend_from_slice(MAGIC);
    buf.extend_from_slice(&VERSION.to_be_bytes());
    if let Some(v) = inner.vote {
        buf.extend(encode(&LogRecord::Vote(v)));
    }
    if inner.committed.is_some() {
        buf.extend(encode(&LogRecord::Committed(inner.committed)));
    }
    if let Some(p) = inner.last_purged {
        buf.extend(encode(&LogRecord::Purge(p)));
    }
    let entries: Vec<Entry> = inner.entries.values().cloned().collect();
    for chunk in entries.chunks(1024) {
        buf.extend(encode(&LogRecord::Entries(chunk.to_vec())));
    }
    f.write_all(&buf)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent() {
        File::open(dir)?.sync_all()?;
    }
    Ok(buf.len() as u64)
}

impl Inner {
    /// Appends a record to the file (if any); returns the file handle for a later sync.
    fn write(&mut self, rec: &LogRecord) -> std::io::Result<Option<Arc<File>>> {
        let Some(lf) = self.file.as_mut() else {
            return Ok(None);
        };
        let bytes = encode(rec);
        use std::os::unix::fs::FileExt;
        lf.file.write_all_at(&bytes, lf.len)?;
        lf.len += bytes.len() as u64;
        Ok(Some(lf.file.clone()))
    }

    fn maybe_rewrite(&mut self) -> std::io::Result<()> {
        let Some(lf) = self.file.as_ref() else {
            return Ok(());
        };
        if lf.len < lf.live_hint + REWRITE_DEAD_BYTES {
            return Ok(());
        }
        let path = lf.path.clone();
        let len = write_fresh(&path, self)?;
        let file = OpenOptions::new().read(true).write(true).open(&path)?;
        let lf = self.file.as_mut().expect("checked above");
        lf.file = Arc::new(file);
        lf.len = len;
        lf.live_hint = len;
        Ok(())
    }
}

impl RaftLogReader<TypeConfig> for LogStore {
    async fn try_get_log_entries<RB: RangeBounds<u64> + Clone + Debug + Send>(
        &mut self,
        range: RB,
    ) -> Result<Vec<Entry>, StorageError<NodeId>> {
        let g = self.inner.lock();
        Ok(g.entries.range(range).map(|(_, e)| e.clone()).collect())
    }
}

impl RaftLogStorage<TypeConfig> for LogStore {
    type LogReader = Self;

    async fn get_log_state(&mut self) -> Result<LogState<TypeConfig>, StorageError<NodeId>> {
        let g = self.inner.lock();
        let last = g
            .entries
            .values()
            .next_back()
            .map(|e| e.log_id)
            .or(g.last_purged);
        Ok(LogState {
            last_purged_log_id: g.last_purged,
            last_log_id: last,
        })
    }

    async fn get_log_reader(&mut self) -> Self::LogReader {
        self.clone()
    }

    async fn save_vote(&mut self, vote: &Vote<NodeId>) -> Result<(), StorageError<NodeId>> {
        let file = {
            let mut g = self.inner.lock();
            g.vote = Some(*vote);
            g.write(&LogRecord::Vote(*vote)).map_err(io_err)?
        };
        if let Some(f) = file {
            f.sync_data().map_err(io_err)?;
        }
        Ok(())
    }

    async fn read_vote(&mut self) -> Result<Option<Vote<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().vote)
    }

    async fn save_committed(
        &mut self,
        committed: Option<LogId<NodeId>>,
    ) -> Result<(), StorageError<NodeId>> {
        // Not synced: after a crash the commit index is relearned from the leader, or
        // recomputed; saving it only lets a restarted node apply sooner.
        let mut g = self.inner.lock();
        g.committed = committed;
        g.write(&LogRecord::Committed(committed)).map_err(io_err)?;
        Ok(())
    }

    async fn read_committed(&mut self) -> Result<Option<LogId<NodeId>>, StorageError<NodeId>> {
        Ok(self.inner.lock().committed)
    }

    async fn append<I>(
        &mut self,
        entries: I,
        callback: LogFlushed<TypeConfig>,
    ) -> Result<(), StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let entries: Vec<Entry> = entries.into_iter().collect();
        let (file, flusher) = {
            let mut g = self.inner.lock();
            let file = g
                .write(&LogRecord::Entries(entries.clone()))
                .map_err(io_err)?;
            for e in entries {
                g.entries.insert(e.log_id.index, e);
            }
            (file, g.file.as_ref().map(|f| f.flusher.clone()))
        };
        match (file, flusher) {
            (Some(f), Some(tx)) => tx.send(Flush::Sync(f, callback)).map_err(io_err)?,
            _ => callback.log_io_completed(Ok(())),
        }
        Ok(())
    }

    async fn truncate(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut g = self.inner.lock();
        g.write(&LogRecord::Truncate(log_id.index))
            .map_err(io_err)?;
        g.entries.split_off(&log_id.index);
        Ok(())
    }

    async fn purge(&mut self, log_id: LogId<NodeId>) -> Result<(), StorageError<NodeId>> {
        let mut g = self.inner.lock();
        g.write(&LogRecord::Purge(log_id)).map_err(io_err)?;
        apply_record(&mut g, LogRecord::Purge(log_id));
        g.maybe_rewrite().map_err(io_err)?;
        Ok(())
    }
}
