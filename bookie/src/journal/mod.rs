//! The journal: the bookie's write-ahead log, on its own disk.
//!
//! Every state change (add, fence, explicit LAC, delete) is applied in memory first, then queued
//! here; a single writer thread gathers queued records into a batch (group commit), writes the
//! batch with one write and makes it durable with one fdatasync, and only then runs the records'
//! callbacks. A batch closes when it holds `max_batch_bytes`, when its first record has waited
//! `max_wait_us`, or (with `flush_when_idle`) as soon as nothing else is queued; records keep
//! arriving while a sync runs, so batches grow by themselves under load.
//!
//! Files are named `<id as 16 hex digits>.jnl`, ids increasing. Layout:
//!
//! ```text
//! 0     4096-byte header: magic "QJNL" | version u32 LE | file id u64 LE | crc32c(0..16) u32 LE | zeros
//! 4096  frames (see [`record`]) back to back, then zeros (the preallocated, unwritten part)
//! ```
//!
//! Invariants:
//! - A callback runs only after its record is durable (or with an error, after which the
//!   journal refuses every later record: a failed sync is fatal, nothing more is acknowledged).
//! - Every record before [`Journal::written_mark`] had its in-memory effect applied before it was
//!   queued, so a checkpoint that flushes memory after reading the mark covers everything before
//!   it, and replay can start there.
//! - Replay stops at the first frame that is zero, torn or fails its CRC: the durable prefix.

pub mod io;
pub mod record;

use crate::config::JournalConfig;
use crate::durable;
use crate::metrics::Metrics;
use bytes::Bytes;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TryRecvError};
use parking_lot::Mutex;
pub use record::Record;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub const HEADER_LEN: u64 = 4096;
const MAGIC: &[u8; 4] = b"QJNL";
const VERSION: u32 = 1;

/// A position in the journal: replay starts here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct LogMark {
    pub file_id: u64,
    pub offset: u64,
}

impl LogMark {
    pub const START: LogMark = LogMark {
        file_id: 0,
        offset: 0,
    };
}

/// Journal failures, cloneable so that one failed batch can fail many callbacks.
#[derive(Debug, Clone, thiserror::Error)]
pub enum JournalError {
    #[error("journal I/O error: {0}")]
    Io(Arc<std::io::Error>),
    #[error("journal has failed earlier and accepts no more records")]
    Failed,
    #[error("journal is shut down")]
    Closed,
    #[error("journal file {file} is corrupt: {reason}")]
    Corrupt { file: PathBuf, reason: String },
}

impl From<std::io::Error> for JournalError {
    fn from(e: std::io::Error) -> Self {
        JournalError::Io(Arc::new(e))
    }
}

/// Runs once the records it was queued with are durable, or failed.
pub type Callback = Box<dyn FnOnce(Result<(), JournalError>) + Send>;

struct Pending {
    frames: Vec<u8>,
    count: usize,
    /// Taken when run; a pending record dropped unrun (the channel dropped at shutdown) is told
    /// `Closed`, so every callback runs exactly once.
    callback: Option<Callback>,
    _permit: OwnedSemaphorePermit,
}

impl Pending {
    fn complete(mut self, r: Result<(), JournalError>) {
        if let Some(cb) = self.callback.take() {
            cb(r);
        }
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        if let Some(cb) = self.callback.take() {
            cb(Err(JournalError::Closed));
        }
    }
}

enum Msg {
    Write(Pending),
    Shutdown,
}

/// Room reserved in the journal queue for records about to be submitted (back-pressure).
pub struct Reservation {
    permit: OwnedSemaphorePermit,
    bytes: usize,
}

impl Reservation {
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

struct Shared {
    written: Mutex<LogMark>,
    failed: AtomicBool,
}

pub struct Journal {
    tx: Sender<Msg>,
    queue: Arc<Semaphore>,
    queue_bytes_max: usize,
    shared: Arc<Shared>,
    dir: PathBuf,
    io_name: &'static str,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

fn file_name(id: u64) -> String {
    format!("{id:016x}.jnl")
}

/// The journal file ids in `dir`, ascending.
pub fn list_files(dir: &Path) -> std::io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".jnl")
            && let Ok(id) = u64::from_str_radix(hex, 16)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn header(id: u64) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..16].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..16]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
    h
}

/// Checks a file header. `Ok(false)`: an all-zero header, left by a crash while the file was being
/// created (it holds no records).
fn check_header(path: &Path, h: &[u8], id: u64) -> Result<bool, JournalError> {
    let corrupt = |reason: String| JournalError::Corrupt {
        file: path.into(),
        reason,
    };
    if h.iter().all(|b| *b == 0) {
        return Ok(false);
    }
    if &h[0..4] != MAGIC {
        return Err(corrupt("bad magic".into()));
    }
    let crc = u32::from_le_bytes(h[16..20].try_into().expect("4"));
    if crc != crc32c::crc32c(&h[0..16]) {
        return Err(corrupt("header checksum mismatch".into()));
    }
    let version = u32::from_le_bytes(h[4..8].try_into().expect("4"));
    if version != VERSION {
        return Err(corrupt(format!("unsupported version {version}")));
    }
    let got = u64::from_le_bytes(h[8..16].try_into().expect("8"));
    if got != id {
        return Err(corrupt(format!("header names file {got}, expected {id}")));
    }
    Ok(true)
}

/// What one batch read found.
enum BatchRead {
    /// Zeros or the end of the file: nothing more was written.
    End,
    Ok {
        seq: u64,
        /// Each record with the offset just past it.
        records: Vec<(Record, u64)>,
        next: u64,
    },
    /// A damaged or incomplete batch: the records before the damage, where it is, and whether
    /// valid records follow the damage inside the batch (then it is corruption, not a torn tail).
    Bad {
        records: Vec<(Record, u64)>,
        at: u64,
        reason: String,
        valid_after: bool,
    },
}

fn read_at(file: &File, buf: &mut [u8], at: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    file.read_exact_at(buf, at)
}

/// True when a complete, valid record frame (not a batch header) starts anywhere in `data`.
fn contains_valid_record(data: &Bytes) -> bool {
    (0..data.len().saturating_sub(record::FRAME_HEADER)).any(|i| {
        let len = u32::from_le_bytes(data[i..i + 4].try_into().expect("4")) as usize;
        (9..=data.len() - i - record::FRAME_HEADER).contains(&len)
            && (1..=4).contains(&data[i + record::FRAME_HEADER])
            && Record::decode(&data.slice(i..)).is_ok()
    })
}

fn read_batch(file: &File, pos: u64, len: u64) -> std::io::Result<BatchRead> {
    let bad = |reason: String| BatchRead::Bad {
        records: Vec::new(),
        at: pos,
        reason,
        valid_after: false,
    };
    if pos + record::FRAME_HEADER as u64 > len {
        return Ok(BatchRead::End);
    }
    let mut fh = [0u8; record::FRAME_HEADER];
    read_at(file, &mut fh, pos)?;
    let (body_len, crc) = match Record::frame_body_len(&fh) {
        Ok(x) => x,
        Err(record::DecodeError::End) => return Ok(BatchRead::End),
        Err(e) => return Ok(bad(e.to_string())),
    };
    if body_len != record::BATCH_BODY || pos + record::BATCH_FRAME as u64 > len {
        return Ok(bad("no valid batch header".into()));
    }
    let mut body = vec![0u8; body_len];
    read_at(file, &mut body, pos + record::FRAME_HEADER as u64)?;
    let (seq, bytes) = match Record::decode_body(Bytes::from(body), crc) {
        Ok(Record::Batch { seq, bytes }) => (seq, bytes),
        Ok(_) => return Ok(bad("expected a batch header".into())),
        Err(e) => return Ok(bad(format!("batch header: {e}"))),
    };
    let start = pos + record::BATCH_FRAME as u64;
    let next = start.saturating_add(bytes);
    // A batch cut off by the end of the file is read as far as it goes.
    let have = next.min(len) - start;
    let mut data = vec![0u8; have as usize];
    read_at(file, &mut data, start)?;
    let mut data = Bytes::from(data);
    let mut records = Vec::new();
    let mut at = start;
    while !data.is_empty() {
        let err = match Record::decode(&data) {
            Ok((Record::Batch { .. }, _)) => "batch header inside a batch".to_string(),
            Ok((rec, n)) => {
                at += n as u64;
                records.push((rec, at));
                let _ = data.split_to(n);
                continue;
            }
            Err(e) => e.to_string(),
        };
        let valid_after = contains_valid_record(&data.slice(1..));
        return Ok(BatchRead::Bad {
            records,
            at,
            reason: err,
            valid_after,
        });
    }
    if next > len {
        return Ok(BatchRead::Bad {
            records,
            at,
            reason: "batch runs past the end of the file".into(),
            valid_after: false,
        });
    }
    Ok(BatchRead::Ok { seq, records, next })
}

/// The offset of the first valid batch header after `from`, if any: proof that what is damaged
/// at `from` is not the torn tail of the last write.
fn find_batch_after(file: &File, from: u64, len: u64) -> std::io::Result<Option<u64>> {
    const CHUNK: usize = 1 << 20;
    let mut buf = vec![0u8; CHUNK + record::BATCH_FRAME];
    let mut base = from + 1;
    while base + record::BATCH_FRAME as u64 <= len {
        let n = ((len - base) as usize).min(buf.len());
        read_at(file, &mut buf[..n], base)?;
        for i in 0..n.saturating_sub(record::BATCH_FRAME - 1) {
            // Cheap filters first: a batch header frame has a fixed length and kind.
            if buf[i..i + 4] != (record::BATCH_BODY as u32).to_le_bytes() || buf[i + 8] != 5 {
                continue;
            }
            if let Ok((Record::Batch { .. }, _)) =
                Record::decode(&Bytes::copy_from_slice(&buf[i..i + record::BATCH_FRAME]))
            {
                return Ok(Some(base + i as u64));
            }
        }
        base += (n - (record::BATCH_FRAME - 1)) as u64;
    }
    Ok(None)
}

/// Where valid journal data follows `pos` in `file` or in any later file, if anywhere. A later
/// file's batches are proof as well: a file is only rotated after its last batch was synced, and
/// the start-up checkpoint removes older files before a new one gets any batch.
fn valid_data_after(
    dir: &Path,
    file: &File,
    pos: u64,
    len: u64,
    later_files: &[u64],
) -> std::io::Result<Option<String>> {
    if let Some(at) = find_batch_after(file, pos, len)? {
        return Ok(Some(format!("a batch at offset {at}")));
    }
    for &id in later_files {
        let f = File::open(dir.join(file_name(id)))?;
        let flen = f.metadata()?.len();
        if flen >= HEADER_LEN && matches!(read_batch(&f, HEADER_LEN, flen)?, BatchRead::Ok { .. }) {
            return Ok(Some(format!("batches in journal file {}", file_name(id))));
        }
    }
    Ok(None)
}

fn corrupt_error(path: &Path, at: u64, reason: &str, later: &str) -> crate::BookieError {
    crate::BookieError::Corruption(format!(
        "journal file {} is corrupt at offset {at} ({reason}), and valid records follow \
         ({later}): refusing to start rather than drop acknowledged records; restore the file, \
         or move it away to accept the loss",
        path.display()
    ))
}

/// Replays, in order, every durable record at or after `from`, calling `apply` with each record
/// and the mark just past it. Returns the highest file id seen (0 when none).
///
/// A batch is written (and synced) only after the previous one was synced, so damage with
/// nothing valid after it in its file is the torn tail of a crash: the valid records before the
/// damage are replayed and the rest, never acknowledged, is cut. Damage *followed* by valid
/// records (in the same batch or a later one) is corruption: replay fails with
/// [`crate::BookieError::Corruption`] naming the file and offset, so the bookie refuses to start
/// rather than silently drop acknowledged records, and the file is left as it is.
pub fn replay(
    dir: &Path,
    from: LogMark,
    mut apply: impl FnMut(Record, LogMark) -> Result<(), crate::BookieError>,
) -> Result<u64, crate::BookieError> {
    let ids = list_files(dir)?;
    let last = ids.last().copied().unwrap_or(0);
    let replayed: Vec<u64> = ids.into_iter().filter(|id| *id >= from.file_id).collect();
    for (i, &id) in replayed.iter().enumerate() {
        let path = dir.join(file_name(id));
        let f = File::open(&path)?;
        let len = f.metadata()?.len();
        if len < HEADER_LEN {
            tracing::warn!(file = %path.display(), "journal file shorter than its header; skipped");
            continue;
        }
        let mut h = vec![0u8; HEADER_LEN as usize];
        read_at(&f, &mut h, 0)?;
        if !check_header(&path, &h, id)
            .map_err(|e| crate::BookieError::Corruption(e.to_string()))?
        {
            tracing::warn!(file = %path.display(), "journal file with an empty header; skipped");
            continue;
        }
        let mut pos = if id == from.file_id {
            from.offset.max(HEADER_LEN)
        } else {
            HEADER_LEN
        };
        let mut count = 0u64;
        let mut expected: Option<u64> = None;
        let mut apply_all = |records: Vec<(Record, u64)>| -> Result<u64, crate::BookieError> {
            let n = records.len() as u64;
            for (rec, end) in records {
                let at = LogMark {
                    file_id: id,
                    offset: end,
                };
                apply(rec, at)?;
            }
            Ok(n)
        };
        loop {
            match read_batch(&f, pos, len)? {
                BatchRead::End => {
                    // Zeros where a batch header should be: the end of this file's data (later
                    // files are expected after a rotation), unless a valid batch follows in this
                    // file: then a batch was lost, a hole, not the end.
                    if let Some(later) = find_batch_after(&f, pos, len)? {
                        let later = format!("a batch at offset {later}");
                        return Err(corrupt_error(&path, pos, "zeroed batch header", &later));
                    }
                    break;
                }
                BatchRead::Ok { seq, records, next } => {
                    if expected.is_some_and(|e| e != seq) {
                        return Err(crate::BookieError::Corruption(format!(
                            "journal file {} has batch {seq} at offset {pos} where batch {} was \
                             expected",
                            path.display(),
                            expected.unwrap_or_default()
                        )));
                    }
                    expected = Some(seq + 1);
                    count += apply_all(records)?;
                    pos = next;
                }
                BatchRead::Bad {
                    records,
                    at,
                    reason,
                    valid_after,
                } => {
                    let later = if valid_after {
                        Some("in the same batch".to_string())
                    } else {
                        valid_data_after(dir, &f, pos, len, &replayed[i + 1..])?
                    };
                    if let Some(later) = later {
                        return Err(corrupt_error(&path, at, &reason, &later));
                    }
                    count += apply_all(records)?;
                    tracing::warn!(file = %path.display(), offset = at, %reason, "torn journal tail cut");
                    break;
                }
            }
        }
        tracing::info!(file = %path.display(), records = count, "journal file replayed");
    }
    Ok(last)
}

struct Writer {
    cfg: JournalConfig,
    dir: PathBuf,
    io: Box<dyn io::JournalIo>,
    file: File,
    file_id: u64,
    offset: u64,
    allocated: u64,
    /// Sequence number of the next batch in the current file.
    batch_seq: u64,
    shared: Arc<Shared>,
    metrics: Arc<Metrics>,
}

impl Writer {
    fn create_file(dir: &Path, id: u64, prealloc: u64) -> std::io::Result<File> {
        durable::create_file(&dir.join(file_name(id)), |f| {
            durable::preallocate(f, 0, HEADER_LEN + prealloc)?;
            use std::os::unix::fs::FileExt;
            f.write_all_at(&header(id), 0)
        })
    }

    fn write_batch(&mut self, buf: &[u8]) -> std::io::Result<()> {
        let end = self.offset + buf.len() as u64;
        if end > self.allocated {
            let grow = (end - self.allocated).max(self.cfg.prealloc_bytes);
            durable::preallocate(&self.file, self.allocated, grow)?;
            self.allocated += grow;
        }
        let t = Instant::now();
        self.io
            .write_at(&self.file, buf, self.offset, self.cfg.sync)?;
        self.metrics
            .journal_sync_seconds
            .observe(t.elapsed().as_secs_f64());
        self.offset = end;
        self.batch_seq += 1;
        if self.offset >= self.cfg.file_size_max_bytes {
            let id = self.file_id + 1;
            let f = Self::create_file(&self.dir, id, self.cfg.prealloc_bytes)?;
            self.file = f;
            self.file_id = id;
            self.offset = HEADER_LEN;
            self.batch_seq = 0;
            self.allocated = HEADER_LEN + self.cfg.prealloc_bytes;
            tracing::info!(file_id = id, "journal rotated");
        }
        *self.shared.written.lock() = LogMark {
            file_id: self.file_id,
            offset: self.offset,
        };
        Ok(())
    }

    /// Waits for the next message, polling for up to `spin` before sleeping: a request that
    /// arrives soon after the last batch then skips a thread wake-up (tens of microseconds on
    /// virtual machines). Yielding while polling leaves the core to any thread that needs it.
    fn next(rx: &Receiver<Msg>, spin: Duration) -> Result<Msg, crossbeam_channel::RecvError> {
        if !spin.is_zero() {
            let until = Instant::now() + spin;
            loop {
                match rx.try_recv() {
                    Ok(m) => return Ok(m),
                    Err(TryRecvError::Disconnected) => return Err(crossbeam_channel::RecvError),
                    Err(TryRecvError::Empty) if Instant::now() < until => std::thread::yield_now(),
                    Err(TryRecvError::Empty) => break,
                }
            }
        }
        rx.recv()
    }

    fn run(mut self, rx: Receiver<Msg>) {
        let max_wait = Duration::from_micros(self.cfg.max_wait_us);
        let mut batch: Vec<Pending> = Vec::new();
        let mut buf: Vec<u8> = Vec::with_capacity(self.cfg.max_batch_bytes * 2);
        let mut stop = false;
        let spin = Duration::from_micros(self.cfg.spin_us);
        while !stop {
            match Self::next(&rx, spin) {
                Ok(Msg::Write(p)) => batch.push(p),
                Ok(Msg::Shutdown) | Err(_) => break,
            }
            let started = Instant::now();
            let mut bytes = batch[0].frames.len();
            while bytes < self.cfg.max_batch_bytes {
                let next = match rx.try_recv() {
                    Ok(m) => Some(m),
                    Err(TryRecvError::Disconnected) => None,
                    Err(TryRecvError::Empty) => {
                        let left = max_wait.saturating_sub(started.elapsed());
                        if self.cfg.flush_when_idle || left.is_zero() {
                            break;
                        }
                        match rx.recv_timeout(left) {
                            Ok(m) => Some(m),
                            Err(RecvTimeoutError::Timeout) => break,
                            Err(RecvTimeoutError::Disconnected) => None,
                        }
                    }
                };
                match next {
                    Some(Msg::Write(p)) => {
                        bytes += p.frames.len();
                        batch.push(p);
                    }
                    Some(Msg::Shutdown) | None => {
                        stop = true;
                        break;
                    }
                }
                if started.elapsed() >= max_wait {
                    break;
                }
            }
            buf.clear();
            let frames: usize = batch.iter().map(|p| p.frames.len()).sum();
            Record::Batch {
                seq: self.batch_seq,
                bytes: frames as u64,
            }
            .encode_into(&mut buf);
            let mut records = 0;
            for p in &batch {
                buf.extend_from_slice(&p.frames);
                records += p.count;
            }
            let result = if self.shared.failed.load(Ordering::Acquire) {
                Err(JournalError::Failed)
            } else {
                self.write_batch(&buf).map_err(|e| {
                    tracing::error!(error = %e, "journal write or sync failed; refusing all further records");
                    self.shared.failed.store(true, Ordering::Release);
                    JournalError::from(e)
                })
            };
            self.metrics.journal_batch_records.observe(records as f64);
            self.metrics.journal_batch_bytes.observe(buf.len() as f64);
            for p in batch.drain(..) {
                p.complete(result.clone());
            }
            if buf.capacity() > self.cfg.max_batch_bytes * 4 {
                buf = Vec::with_capacity(self.cfg.max_batch_bytes * 2);
            }
        }
        // Whatever is still queued after a shutdown request fails rather than hanging.
        while let Ok(m) = rx.try_recv() {
            if let Msg::Write(p) = m {
                p.complete(Err(JournalError::Closed));
            }
        }
        if let Err(e) = self.file.sync_all() {
            tracing::error!(error = %e, "journal sync at shutdown failed");
        }
    }
}

impl Journal {
    /// Starts writing a new journal file `next_id` in `cfg.dir` (call after [`replay`]).
    pub fn start(
        cfg: &JournalConfig,
        next_id: u64,
        metrics: Arc<Metrics>,
    ) -> Result<Journal, JournalError> {
        if !cfg.sync {
            tracing::warn!(
                "journal fsync is OFF: acknowledged entries can be lost on a crash; use for benchmarks only"
            );
        }
        let io = io::open(cfg.io, cfg.sync)?;
        let io_name = io.name();
        let file = Writer::create_file(&cfg.dir, next_id, cfg.prealloc_bytes)?;
        let shared = Arc::new(Shared {
            written: Mutex::new(LogMark {
                file_id: next_id,
                offset: HEADER_LEN,
            }),
            failed: AtomicBool::new(false),
        });
        let writer = Writer {
            cfg: cfg.clone(),
            dir: cfg.dir.clone(),
            io,
            file,
            file_id: next_id,
            offset: HEADER_LEN,
            allocated: HEADER_LEN + cfg.prealloc_bytes,
            batch_seq: 0,
            shared: shared.clone(),
            metrics,
        };
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || writer.run(rx))
            .map_err(JournalError::from)?;
        tracing::info!(dir = %cfg.dir.display(), io = io_name, file_id = next_id, "journal started");
        Ok(Journal {
            tx,
            queue: Arc::new(Semaphore::new(cfg.queue_bytes_max)),
            queue_bytes_max: cfg.queue_bytes_max,
            shared,
            dir: cfg.dir.clone(),
            io_name,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Waits for room for `bytes` of records in the queue (the journal's back-pressure).
    pub async fn reserve(&self, bytes: usize) -> Result<Reservation, JournalError> {
        if self.shared.failed.load(Ordering::Acquire) {
            return Err(JournalError::Failed);
        }
        let n = bytes.min(self.queue_bytes_max) as u32;
        let permit = self
            .queue
            .clone()
            .acquire_many_owned(n)
            .await
            .map_err(|_| JournalError::Closed)?;
        Ok(Reservation { permit, bytes })
    }

    /// Queues records (never blocks); `callback` runs once they are all durable, or failed.
    pub fn submit(&self, reservation: Reservation, records: &[Record], callback: Callback) {
        let mut frames = Vec::with_capacity(records.iter().map(Record::frame_len).sum());
        for r in records {
            r.encode_into(&mut frames);
        }
        let msg = Msg::Write(Pending {
            frames,
            count: records.len(),
            callback: Some(callback),
            _permit: reservation.permit,
        });
        if let Err(crossbeam_channel::SendError(Msg::Write(p))) = self.tx.send(msg) {
            p.complete(Err(JournalError::Closed));
        }
    }

    /// Convenience for rare records: reserve, submit and wait until durable.
    pub async fn write(&self, records: Vec<Record>) -> Result<(), JournalError> {
        let bytes = records.iter().map(Record::frame_len).sum();
        let r = self.reserve(bytes).await?;
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.submit(
            r,
            &records,
            Box::new(move |res| {
                let _ = tx.send(res);
            }),
        );
        rx.await.map_err(|_| JournalError::Closed)?
    }

    /// The position just past the last written batch.
    pub fn written_mark(&self) -> LogMark {
        *self.shared.written.lock()
    }

    /// Bytes currently queued and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.queue_bytes_max - self.queue.available_permits()
    }

    pub fn has_failed(&self) -> bool {
        self.shared.failed.load(Ordering::Acquire)
    }

    pub fn io_name(&self) -> &'static str {
        self.io_name
    }

    /// Deletes journal files wholly before `mark` (a checkpoint has made them unnecessary).
    pub fn remove_files_before(&self, mark: LogMark) -> std::io::Result<usize> {
        let mut n = 0;
        for id in list_files(&self.dir)? {
            if id < mark.file_id {
                durable::remove_file(&self.dir.join(file_name(id)))?;
                n += 1;
            }
        }
        Ok(n)
    }

    /// Writes out everything queued so far, then stops the writer thread.
    pub fn shutdown(&self) {
        let _ = self.tx.send(Msg::Shutdown);
        if let Some(t) = self.thread.lock().take() {
            let _ = t.join();
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        self.shutdown();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn cfg(dir: &Path) -> JournalConfig {
        JournalConfig {
            dir: dir.into(),
            prealloc_bytes: 64 << 10,
            ..JournalConfig::default()
        }
    }

    fn add(l: u64, e: u64, n: usize) -> Record {
        Record::Add {
            ledger_id: l,
            entry_id: e,
            master_key: Bytes::from_static(b"key"),
            body: Bytes::from(vec![e as u8; n]),
        }
    }

    fn replay_all(dir: &Path, from: LogMark) -> Vec<Record> {
        let mut out = Vec::new();
        replay(dir, from, |r, _| {
            out.push(r);
            Ok(())
        })
        .unwrap();
        out
    }

    #[tokio::test]
    async fn records_written_are_replayed_in_order_and_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.file_size_max_bytes = 20_000;
        let j = Journal::start(&c, 1, Arc::new(Metrics::new())).unwrap();
        let recs: Vec<Record> = (0..100).map(|e| add(1, e, 500)).collect();
        for r in &recs {
            j.write(vec![r.clone()]).await.unwrap();
        }
        let mark = j.written_mark();
        j.shutdown();
        assert!(list_files(dir.path()).unwrap().len() > 1, "rotated");
        assert_eq!(replay_all(dir.path(), LogMark::START), recs);
        // Replay from the mark yields nothing; from the middle yields the tail.
        assert!(replay_all(dir.path(), mark).is_empty());
    }

    #[tokio::test]
    async fn removing_files_before_a_mark_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = cfg(dir.path());
        c.file_size_max_bytes = 10_000;
        let j = Journal::start(&c, 1, Arc::new(Metrics::new())).unwrap();
        for e in 0..50 {
            j.write(vec![add(2, e, 1000)]).await.unwrap();
        }
        let mark = j.written_mark();
        assert!(j.remove_files_before(mark).unwrap() > 0);
        assert_eq!(list_files(dir.path()).unwrap()[0], mark.file_id);
    }

    #[test]
    fn bad_header_is_refused_but_an_empty_one_is_skipped() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(file_name(1)), vec![0u8; 8192]).unwrap();
        assert!(replay_all(dir.path(), LogMark::START).is_empty());
        let mut h = header(2);
        h[0] = b'X';
        std::fs::write(dir.path().join(file_name(2)), h).unwrap();
        assert!(replay(dir.path(), LogMark::START, |_, _| Ok(())).is_err());
    }

    /// Writes each record as its own batch; returns the file and each batch's end offset.
    fn write_file(dir: &Path, recs: &[Record]) -> (PathBuf, Vec<u64>) {
        let path = dir.join(file_name(1));
        let mut data = header(1);
        let mut ends = Vec::new();
        for (i, r) in recs.iter().enumerate() {
            Record::Batch {
                seq: i as u64,
                bytes: r.frame_len() as u64,
            }
            .encode_into(&mut data);
            r.encode_into(&mut data);
            ends.push(data.len() as u64);
        }
        data.extend_from_slice(&[0u8; 100]);
        std::fs::write(&path, &data).unwrap();
        (path, ends)
    }

    #[test]
    fn a_zeroed_batch_before_valid_ones_is_a_hole_not_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<Record> = (0..5).map(|e| add(1, e, 50)).collect();
        let (path, ends) = write_file(dir.path(), &recs);
        let mut data = std::fs::read(&path).unwrap();
        let (a, b) = (ends[1] as usize, ends[2] as usize);
        data[a..b].fill(0);
        std::fs::write(&path, &data).unwrap();
        let err = replay(dir.path(), LogMark::START, |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("zeroed batch header"), "{err}");
    }

    #[test]
    fn damage_at_the_end_of_a_file_with_later_files_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let recs: Vec<Record> = (0..3).map(|e| add(1, e, 50)).collect();
        let (path, ends) = write_file(dir.path(), &recs);
        let mut data = std::fs::read(&path).unwrap();
        data[ends[2] as usize - 3] ^= 1;
        std::fs::write(&path, &data).unwrap();
        // Alone, it is a torn tail: the first two records replay.
        assert_eq!(replay_all(dir.path(), LogMark::START), recs[..2].to_vec());
        // With a later file holding batches, it cannot be a torn tail.
        let mut next = header(2);
        Record::Batch {
            seq: 0,
            bytes: recs[0].frame_len() as u64,
        }
        .encode_into(&mut next);
        recs[0].encode_into(&mut next);
        std::fs::write(dir.path().join(file_name(2)), &next).unwrap();
        let err = replay(dir.path(), LogMark::START, |_, _| Ok(())).unwrap_err();
        assert!(err.to_string().contains("refusing to start"), "{err}");
    }

    #[tokio::test]
    async fn corruption_before_later_batches_refuses_replay_and_keeps_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let j = Journal::start(&cfg(dir.path()), 1, Arc::new(Metrics::new())).unwrap();
        for e in 0..20 {
            j.write(vec![add(3, e, 200)]).await.unwrap();
        }
        j.shutdown();
        let path = dir.path().join(file_name(1));
        let mut data = std::fs::read(&path).unwrap();
        let needle = vec![5u8; 200];
        let at = data
            .windows(200)
            .position(|w| w == needle.as_slice())
            .unwrap();
        data[at + 10] ^= 0xff;
        std::fs::write(&path, &data).unwrap();
        let err = replay(dir.path(), LogMark::START, |_, _| Ok(())).unwrap_err();
        assert!(matches!(err, crate::BookieError::Corruption(_)), "{err}");
        assert!(err.to_string().contains("refusing to start"), "{err}");
        assert!(path.exists());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Cutting the file anywhere replays exactly the records that end before the cut.
        #[test]
        fn truncated_tail_replays_durable_prefix(
            recs in proptest::collection::vec(record::tests::arb_record(), 1..20),
            cut in any::<prop::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (path, ends) = write_file(dir.path(), &recs);
            let end = *ends.last().unwrap();
            let at = HEADER_LEN + cut.index((end - HEADER_LEN + 1) as usize) as u64;
            let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
            f.set_len(at).unwrap();
            let want = ends.iter().filter(|e| **e <= at).count();
            prop_assert_eq!(replay_all(dir.path(), LogMark::START), recs[..want].to_vec());
        }

        /// Corrupting any byte of the last batch replays exactly the batches before it; any
        /// earlier batch is corruption, refused.
        #[test]
        fn corrupted_record_replays_durable_prefix(
            recs in proptest::collection::vec(record::tests::arb_record(), 1..20),
            at in any::<prop::sample::Index>(),
            flip in 1u8..=255,
        ) {
            let dir = tempfile::tempdir().unwrap();
            let (path, ends) = write_file(dir.path(), &recs);
            let end = *ends.last().unwrap();
            let pos = HEADER_LEN + at.index((end - HEADER_LEN) as usize) as u64;
            let mut data = std::fs::read(&path).unwrap();
            data[pos as usize] ^= flip;
            std::fs::write(&path, &data).unwrap();
            let damaged = ends.iter().position(|e| pos < *e).unwrap();
            if damaged == recs.len() - 1 {
                prop_assert_eq!(replay_all(dir.path(), LogMark::START), recs[..damaged].to_vec());
            } else {
                let r = replay(dir.path(), LogMark::START, |_, _| Ok(()));
                prop_assert!(matches!(r, Err(crate::BookieError::Corruption(_))));
            }
        }
    }
}
