//! Entry logs: append-only files holding the entries of many ledgers, interleaved, written at
//! checkpoints from the write cache.
//!
//! ```text
//! <id as 8 hex digits>.log
//!   0   64-byte header: magic "QLOG" | version u32 LE | log id u32 LE | zeros | crc32c(0..12) u32 LE at 60
//!   64  records: payload len u32 LE | crc32c(ledger|entry|payload) u32 LE | ledger u64 LE | entry u64 LE | payload
//! <id>.ledgers   written when a log is sealed: which ledgers it holds and how many bytes each,
//!   magic "QLMP" | version u32 | count u32 | (ledger u64, bytes u64)* | crc32c of all before, all LE
//! ```
//!
//! Garbage collection reads the `.ledgers` summaries, not the logs; the per-ledger byte counts
//! are what a future compaction needs to pick half-empty logs. A log without a summary (the one
//! being written at a crash) is scanned once at start-up, up to its first torn record, and sealed.
//! Data is never overwritten: a log is removed whole once none of its ledgers is alive.

use crate::durable;
use bytes::Bytes;
use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

pub const HEADER_LEN: u64 = 64;
pub const RECORD_HEADER: usize = 24;
const MAGIC: &[u8; 4] = b"QLOG";
const MAP_MAGIC: &[u8; 4] = b"QLMP";
const VERSION: u32 = 1;
const WRITE_BUFFER: usize = 1 << 20;

/// Where an entry is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub log_id: u32,
    /// Offset of the record header.
    pub offset: u32,
    /// Payload length.
    pub len: u32,
}

/// Bytes held per ledger in one log.
pub type LogUsage = HashMap<u64, u64>;

#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("entry log {log}: {reason}")]
    Corrupt { log: u32, reason: String },
}

pub fn log_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.log"))
}

pub fn map_path(dir: &Path, id: u32) -> PathBuf {
    dir.join(format!("{id:08x}.ledgers"))
}

/// Entry log ids in `dir`, ascending.
pub fn list(dir: &Path) -> io::Result<Vec<u32>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".log")
            && let Ok(id) = u32::from_str_radix(hex, 16)
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

fn header(id: u32) -> [u8; HEADER_LEN as usize] {
    let mut h = [0u8; HEADER_LEN as usize];
    h[0..4].copy_from_slice(MAGIC);
    h[4..8].copy_from_slice(&VERSION.to_le_bytes());
    h[8..12].copy_from_slice(&id.to_le_bytes());
    let crc = crc32c::crc32c(&h[0..12]);
    h[60..64].copy_from_slice(&crc.to_le_bytes());
    h
}

fn record_crc(ledger: u64, entry: u64, payload: &[u8]) -> u32 {
    let mut key = [0u8; 16];
    key[..8].copy_from_slice(&ledger.to_le_bytes());
    key[8..].copy_from_slice(&entry.to_le_bytes());
    crc32c::crc32c_append(crc32c::crc32c(&key), payload)
}

/// Checks a log's header; refuses foreign or unknown-version files.
pub fn check_header(file: &File, id: u32) -> Result<(), ReadError> {
    let mut h = [0u8; HEADER_LEN as usize];
    file.read_exact_at(&mut h, 0)?;
    let corrupt = |reason: &str| ReadError::Corrupt {
        log: id,
        reason: reason.into(),
    };
    if &h[0..4] != MAGIC {
        return Err(corrupt("bad magic"));
    }
    if u32::from_le_bytes(h[60..64].try_into().expect("4")) != crc32c::crc32c(&h[0..12]) {
        return Err(corrupt("header checksum mismatch"));
    }
    if u32::from_le_bytes(h[4..8].try_into().expect("4")) != VERSION {
        return Err(corrupt("unsupported version"));
    }
    if u32::from_le_bytes(h[8..12].try_into().expect("4")) != id {
        return Err(corrupt("header names another log"));
    }
    Ok(())
}

/// Reads the entry at `loc`, checking that it is the record of (`ledger`, `entry`) and that its
/// checksum holds. Never returns data that failed a check.
pub fn read(file: &File, loc: Location, ledger: u64, entry: u64) -> Result<Bytes, ReadError> {
    let mut buf = vec![0u8; RECORD_HEADER + loc.len as usize];
    file.read_exact_at(&mut buf, loc.offset as u64)
        .map_err(|e| match e.kind() {
            io::ErrorKind::UnexpectedEof => ReadError::Corrupt {
                log: loc.log_id,
                reason: format!("record at {} runs past the end of the file", loc.offset),
            },
            _ => ReadError::Io(e),
        })?;
    let u32_at = |i: usize| u32::from_le_bytes(buf[i..i + 4].try_into().expect("4"));
    let u64_at = |i: usize| u64::from_le_bytes(buf[i..i + 8].try_into().expect("8"));
    let corrupt = |reason: String| ReadError::Corrupt {
        log: loc.log_id,
        reason,
    };
    if u32_at(0) != loc.len || u64_at(8) != ledger || u64_at(16) != entry {
        return Err(corrupt(format!(
            "record at {} is not entry {ledger}/{entry}",
            loc.offset
        )));
    }
    let payload = &buf[RECORD_HEADER..];
    if record_crc(ledger, entry, payload) != u32_at(4) {
        return Err(corrupt(format!(
            "checksum mismatch for entry {ledger}/{entry} at {}",
            loc.offset
        )));
    }
    Ok(Bytes::from(buf).slice(RECORD_HEADER..))
}

/// What a scan of an unsealed log found.
pub struct Scan {
    pub usage: LogUsage,
    /// False when a corrupt record stopped the scan before the end of the data: records after it
    /// cannot be located, so the usage may be missing live ledgers.
    pub complete: bool,
}

/// Scans a log's records up to its end or its first torn/corrupt record, returning the bytes
/// held per ledger. Used for a log that was never sealed (the one being written at a crash). Only
/// a scan that reaches the end of the data cleanly is complete: a damaged length field cannot be
/// told from a torn tail, so both leave the rest of the log unknown.
pub fn scan(path: &Path, id: u32) -> Result<Scan, ReadError> {
    let file = File::open(path)?;
    check_header(&file, id)?;
    let len = file.metadata()?.len();
    let mut r = io::BufReader::with_capacity(1 << 20, file);
    io::copy(&mut (&mut r).take(HEADER_LEN), &mut io::sink())?;
    let mut pos = HEADER_LEN;
    let mut usage = LogUsage::new();
    let mut complete = true;
    let mut head = [0u8; RECORD_HEADER];
    let mut payload = Vec::new();
    while pos + RECORD_HEADER as u64 <= len {
        r.read_exact(&mut head)?;
        let plen = u32::from_le_bytes(head[0..4].try_into().expect("4")) as u64;
        let crc = u32::from_le_bytes(head[4..8].try_into().expect("4"));
        let ledger = u64::from_le_bytes(head[8..16].try_into().expect("8"));
        let entry = u64::from_le_bytes(head[16..24].try_into().expect("8"));
        if plen == 0 && crc == 0 && ledger == 0 {
            break;
        }
        if pos + RECORD_HEADER as u64 + plen > len {
            tracing::warn!(
                log = id,
                offset = pos,
                "entry log scan stopped at a torn record"
            );
            complete = false;
            break;
        }
        payload.resize(plen as usize, 0);
        r.read_exact(&mut payload)?;
        if record_crc(ledger, entry, &payload) != crc {
            tracing::warn!(
                log = id,
                offset = pos,
                "entry log scan stopped at a corrupt record"
            );
            complete = false;
            break;
        }
        *usage.entry(ledger).or_default() += RECORD_HEADER as u64 + plen;
        pos += RECORD_HEADER as u64 + plen;
    }
    if pos < len && pos + (RECORD_HEADER as u64) > len {
        // A few bytes of a header at the very end.
        complete = false;
    }
    Ok(Scan { usage, complete })
}

pub fn encode_usage(usage: &LogUsage) -> Vec<u8> {
    let mut v = Vec::with_capacity(16 + usage.len() * 16);
    v.extend_from_slice(MAP_MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(usage.len() as u32).to_le_bytes());
    let mut items: Vec<_> = usage.iter().collect();
    items.sort_unstable();
    for (l, b) in items {
        v.extend_from_slice(&l.to_le_bytes());
        v.extend_from_slice(&b.to_le_bytes());
    }
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

pub fn decode_usage(data: &[u8]) -> Option<LogUsage> {
    if data.len() < 16 || &data[0..4] != MAP_MAGIC {
        return None;
    }
    let (body, crc) = data.split_at(data.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().ok()?) {
        return None;
    }
    if u32::from_le_bytes(body[4..8].try_into().ok()?) != VERSION {
        return None;
    }
    let count = u32::from_le_bytes(body[8..12].try_into().ok()?) as usize;
    if body.len() != 12 + count * 16 {
        return None;
    }
    let mut usage = LogUsage::with_capacity(count);
    for c in body[12..].chunks_exact(16) {
        usage.insert(
            u64::from_le_bytes(c[0..8].try_into().ok()?),
            u64::from_le_bytes(c[8..16].try_into().ok()?),
        );
    }
    Some(usage)
}

/// The log being appended to.
pub struct Writer {
    dir: PathBuf,
    pub id: u32,
    file: File,
    buf: Vec<u8>,
    /// Logical end: flushed bytes plus `buf`.
    end: u64,
    pub usage: LogUsage,
}

impl Writer {
    pub fn create(dir: &Path, id: u32) -> io::Result<Writer> {
        let file = durable::create_file(&log_path(dir, id), |f| f.write_all_at(&header(id), 0))?;
        Ok(Writer {
            dir: dir.into(),
            id,
            file,
            buf: Vec::with_capacity(WRITE_BUFFER),
            end: HEADER_LEN,
            usage: LogUsage::new(),
        })
    }

    pub fn size(&self) -> u64 {
        self.end
    }

    /// Buffers a record; its location is valid for readers once [`Writer::sync`] returns.
    pub fn append(&mut self, ledger: u64, entry: u64, payload: &[u8]) -> io::Result<Location> {
        let offset = self.end;
        if offset + (RECORD_HEADER + payload.len()) as u64 > u32::MAX as u64 {
            return Err(io::Error::other("entry log past 4 GiB"));
        }
        self.buf
            .extend_from_slice(&(payload.len() as u32).to_le_bytes());
        self.buf
            .extend_from_slice(&record_crc(ledger, entry, payload).to_le_bytes());
        self.buf.extend_from_slice(&ledger.to_le_bytes());
        self.buf.extend_from_slice(&entry.to_le_bytes());
        self.buf.extend_from_slice(payload);
        self.end += (RECORD_HEADER + payload.len()) as u64;
        *self.usage.entry(ledger).or_default() += (RECORD_HEADER + payload.len()) as u64;
        if self.buf.len() >= WRITE_BUFFER {
            self.write_buffer()?;
        }
        Ok(Location {
            log_id: self.id,
            offset: offset as u32,
            len: payload.len() as u32,
        })
    }

    fn write_buffer(&mut self) -> io::Result<()> {
        let start = self.end - self.buf.len() as u64;
        self.file.write_all_at(&self.buf, start)?;
        // Start writeback of this chunk now: the sync at the end of the flush then has little
        // left to do, instead of pushing the whole flush to the disk at once, which would stall
        // the journal's small syncs queued behind it (the journal often shares the disk).
        use std::os::fd::AsRawFd;
        // SAFETY: plain syscall on a valid fd with integer arguments.
        unsafe {
            libc::sync_file_range(
                self.file.as_raw_fd(),
                start as i64,
                self.buf.len() as i64,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
        self.buf.clear();
        Ok(())
    }

    /// Writes buffered records and makes them durable.
    pub fn sync(&mut self) -> io::Result<()> {
        self.write_buffer()?;
        self.file.sync_data()
    }

    /// Syncs and writes the ledger summary: the log is then immutable.
    pub fn seal(mut self) -> io::Result<LogUsage> {
        self.sync()?;
        durable::write_atomic(&map_path(&self.dir, self.id), &encode_usage(&self.usage))?;
        Ok(self.usage)
    }
}

/// The logs to delete: sealed logs (neither `current` nor `pinned`) none of whose ledgers is
/// alive. Pinned logs have an incomplete summary (see [`Scan`]) and are never collected.
pub fn collectable<'a>(
    logs: impl IntoIterator<Item = (&'a u32, &'a LogUsage)>,
    current: Option<u32>,
    pinned: &std::collections::HashSet<u32>,
    is_live: &dyn Fn(u64) -> bool,
) -> Vec<u32> {
    logs.into_iter()
        .filter(|(id, _)| Some(**id) != current && !pinned.contains(*id))
        .filter(|(_, usage)| !usage.keys().any(|l| is_live(*l)))
        .map(|(id, _)| *id)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs::OpenOptions;

    #[test]
    fn written_entries_read_back_and_corruption_is_detected() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path(), 1).unwrap();
        let a = w.append(7, 0, b"alpha").unwrap();
        let b = w.append(8, 0, b"beta!").unwrap();
        w.sync().unwrap();
        let f = File::open(log_path(dir.path(), 1)).unwrap();
        check_header(&f, 1).unwrap();
        assert_eq!(&read(&f, a, 7, 0).unwrap()[..], b"alpha");
        assert_eq!(&read(&f, b, 8, 0).unwrap()[..], b"beta!");
        // Asking for the wrong entry at a location is corruption, not data.
        assert!(matches!(read(&f, a, 7, 1), Err(ReadError::Corrupt { .. })));
        // Flip one payload byte.
        let rw = OpenOptions::new()
            .write(true)
            .open(log_path(dir.path(), 1))
            .unwrap();
        rw.write_all_at(b"X", b.offset as u64 + RECORD_HEADER as u64 + 1)
            .unwrap();
        assert!(matches!(read(&f, b, 8, 0), Err(ReadError::Corrupt { .. })));
        assert_eq!(&read(&f, a, 7, 0).unwrap()[..], b"alpha");
    }

    #[test]
    fn scan_rebuilds_usage_and_stops_at_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path(), 3).unwrap();
        w.append(1, 0, &[1; 100]).unwrap();
        w.append(2, 0, &[2; 50]).unwrap();
        let last = w.append(1, 1, &[3; 10]).unwrap();
        w.sync().unwrap();
        let path = log_path(dir.path(), 3);
        let full = scan(&path, 3).unwrap();
        assert!(full.complete);
        assert_eq!(full.usage, w.usage);
        // Tear the last record.
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(last.offset as u64 + 5).unwrap();
        let torn = scan(&path, 3).unwrap();
        assert!(!torn.complete, "what follows a torn record is unknown");
        assert_eq!(torn.usage.get(&1), Some(&(RECORD_HEADER as u64 + 100)));
        assert_eq!(torn.usage.get(&2), Some(&(RECORD_HEADER as u64 + 50)));
    }

    #[test]
    fn corrupt_record_mid_log_makes_the_scan_incomplete() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = Writer::create(dir.path(), 4).unwrap();
        let first = w.append(1, 0, &[1; 100]).unwrap();
        w.append(2, 0, &[2; 50]).unwrap();
        w.sync().unwrap();
        let path = log_path(dir.path(), 4);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(b"Z", first.offset as u64 + RECORD_HEADER as u64 + 3)
            .unwrap();
        let s = scan(&path, 4).unwrap();
        assert!(!s.complete);
        assert!(s.usage.is_empty());
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
        /// Whatever is written reads back, and a log cut anywhere scans to exactly the usage of
        /// the records that end before the cut.
        #[test]
        fn records_read_back_and_cut_logs_scan_to_their_prefix(
            recs in proptest::collection::vec(
                (0u64..4, 0u64..1000, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..300)),
                1..30,
            ),
            cut in proptest::prelude::any::<proptest::sample::Index>(),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let mut w = Writer::create(dir.path(), 9).unwrap();
            let locs: Vec<Location> = recs.iter().map(|(l, e, p)| w.append(*l, *e, p).unwrap()).collect();
            w.sync().unwrap();
            let path = log_path(dir.path(), 9);
            let f = File::open(&path).unwrap();
            for ((l, e, p), loc) in recs.iter().zip(&locs) {
                proptest::prop_assert_eq!(&read(&f, *loc, *l, *e).unwrap()[..], &p[..]);
            }
            let end = w.size();
            let at = HEADER_LEN + cut.index((end - HEADER_LEN + 1) as usize) as u64;
            OpenOptions::new().write(true).open(&path).unwrap().set_len(at).unwrap();
            let mut want = LogUsage::new();
            for ((l, _, p), loc) in recs.iter().zip(&locs) {
                let rec_end = loc.offset as u64 + (RECORD_HEADER + p.len()) as u64;
                if rec_end <= at {
                    *want.entry(*l).or_default() += (RECORD_HEADER + p.len()) as u64;
                }
            }
            let s = scan(&path, 9).unwrap();
            proptest::prop_assert_eq!(s.usage, want);
            let clean = at == end || locs.iter().any(|l| l.offset as u64 == at);
            proptest::prop_assert_eq!(s.complete, clean);
        }
    }

    #[test]
    fn usage_summary_round_trips_and_rejects_damage() {
        let mut u = LogUsage::new();
        u.insert(5, 100);
        u.insert(9, 7);
        let enc = encode_usage(&u);
        assert_eq!(decode_usage(&enc), Some(u));
        let mut bad = enc.clone();
        bad[13] ^= 1;
        assert_eq!(decode_usage(&bad), None);
        assert_eq!(decode_usage(&enc[..10]), None);
    }

    #[test]
    fn gc_collects_only_sealed_logs_without_live_ledgers() {
        let mut logs = std::collections::BTreeMap::new();
        logs.insert(1u32, LogUsage::from([(10, 5), (11, 5)]));
        logs.insert(2, LogUsage::from([(11, 5)]));
        logs.insert(3, LogUsage::from([(12, 5)]));
        logs.insert(4, LogUsage::new());
        logs.insert(5, LogUsage::from([(13, 5)]));
        let live = |l: u64| l == 10 || l == 13;
        let mut got = collectable(&logs, Some(5), &Default::default(), &live);
        got.sort();
        assert_eq!(got, vec![2, 3, 4]);
        let pinned = std::collections::HashSet::from([3]);
        let mut got = collectable(&logs, Some(5), &pinned, &live);
        got.sort();
        assert_eq!(got, vec![2, 4]);
    }
}
