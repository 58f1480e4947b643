//! The entry index: for each ledger, a memory-mapped file of fixed-size slots, slot `e` giving
//! where entry `e` is stored.
//!
//! ```text
//! index/<ledger id as 16 hex digits>.idx
//!   0   64-byte header: magic "QIDX" | version u32 LE | ledger id u64 LE | crc32c(0..16) u32 LE |
//!       (at 24) highest entry id + 1, 0 when none, u64 LE | (at 32) crc32c(24..32) u32 LE | zeros
//!   64  slot e at 64 + 16*e: log id u32 | offset u32 | payload len u32 | crc32c(ledger|entry|first 12 bytes) u32
//! ```
//!
//! An all-zero slot is an absent entry (log ids start at 1). A slot whose checksum fails is
//! reported as corruption, never followed. Files grow sparsely; slots are written only at
//! checkpoints, after the entry log they point into is durable, and are synced before the
//! checkpoint's journal mark is persisted.

use super::entry_log::Location;
use memmap2::MmapMut;
use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

const HEADER_LEN: usize = 64;
const SLOT: usize = 16;
const MAGIC: &[u8; 4] = b"QIDX";
const VERSION: u32 = 1;
const INITIAL_SLOTS: usize = 1024;
/// Highest entry id a bookie stores: keeps a hostile entry id from creating a huge index file.
pub const ENTRY_ID_MAX: u64 = (1 << 32) - 1;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error(transparent)]
    Io(#[from] io::Error),
    #[error("index of ledger {ledger}: {reason}")]
    Corrupt { ledger: u64, reason: String },
}

pub fn index_path(dir: &Path, ledger: u64) -> PathBuf {
    dir.join(format!("{ledger:016x}.idx"))
}

/// Ledger ids that have an index file in `dir`.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let name = e?.file_name();
        let name = name.to_string_lossy();
        if let Some(hex) = name.strip_suffix(".idx")
            && let Ok(id) = u64::from_str_radix(hex, 16)
        {
            ids.push(id);
        }
    }
    Ok(ids)
}

fn slot_crc(ledger: u64, entry: u64, slot: &[u8]) -> u32 {
    let mut key = [0u8; 28];
    key[..8].copy_from_slice(&ledger.to_le_bytes());
    key[8..16].copy_from_slice(&entry.to_le_bytes());
    key[16..].copy_from_slice(&slot[..12]);
    crc32c::crc32c(&key)
}

pub struct LedgerIndex {
    ledger: u64,
    file: File,
    map: MmapMut,
    /// Slot byte range written since the last sync.
    dirty: Option<(usize, usize)>,
    header_dirty: bool,
}

impl LedgerIndex {
    /// Opens the index of `ledger`; with `create`, makes it when missing (`Ok(None)` otherwise).
    pub fn open(dir: &Path, ledger: u64, create: bool) -> Result<Option<LedgerIndex>, IndexError> {
        let path = index_path(dir, ledger);
        let file = match OpenOptions::new().read(true).write(true).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound && create => {
                let mut h = [0u8; HEADER_LEN];
                h[0..4].copy_from_slice(MAGIC);
                h[4..8].copy_from_slice(&VERSION.to_le_bytes());
                h[8..16].copy_from_slice(&ledger.to_le_bytes());
                let crc = crc32c::crc32c(&h[0..16]);
                h[16..20].copy_from_slice(&crc.to_le_bytes());
                let crc = crc32c::crc32c(&h[24..32]);
                h[32..36].copy_from_slice(&crc.to_le_bytes());
                crate::durable::create_file(&path, |f| {
                    f.set_len((HEADER_LEN + INITIAL_SLOTS * SLOT) as u64)?;
                    use std::os::unix::fs::FileExt;
                    f.write_all_at(&h, 0)
                })?
            }
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e.into()),
        };
        let corrupt = |reason: &str| IndexError::Corrupt {
            ledger,
            reason: reason.into(),
        };
        let len = file.metadata()?.len() as usize;
        if len < HEADER_LEN + SLOT {
            return Err(corrupt("file too short"));
        }
        // SAFETY: the file is private to this bookie (the cookie guards the directory) and only
        // this process maps it; nothing truncates it while mapped.
        let map = unsafe { MmapMut::map_mut(&file)? };
        if &map[0..4] != MAGIC {
            return Err(corrupt("bad magic"));
        }
        if u32::from_le_bytes(map[16..20].try_into().expect("4")) != crc32c::crc32c(&map[0..16]) {
            return Err(corrupt("header checksum mismatch"));
        }
        if u32::from_le_bytes(map[4..8].try_into().expect("4")) != VERSION {
            return Err(corrupt("unsupported version"));
        }
        if u64::from_le_bytes(map[8..16].try_into().expect("8")) != ledger {
            return Err(corrupt("header names another ledger"));
        }
        Ok(Some(LedgerIndex {
            ledger,
            file,
            map,
            dirty: None,
            header_dirty: false,
        }))
    }

    fn slots(&self) -> usize {
        (self.map.len() - HEADER_LEN) / SLOT
    }

    pub fn get(&self, entry: u64) -> Result<Option<Location>, IndexError> {
        if entry >= self.slots() as u64 {
            return Ok(None);
        }
        let at = HEADER_LEN + entry as usize * SLOT;
        let s = &self.map[at..at + SLOT];
        if s.iter().all(|b| *b == 0) {
            return Ok(None);
        }
        let u = |i: usize| u32::from_le_bytes(s[i..i + 4].try_into().expect("4"));
        if u(12) != slot_crc(self.ledger, entry, s) {
            return Err(IndexError::Corrupt {
                ledger: self.ledger,
                reason: format!("slot of entry {entry} fails its checksum"),
            });
        }
        Ok(Some(Location {
            log_id: u(0),
            offset: u(4),
            len: u(8),
        }))
    }

    pub fn put(&mut self, entry: u64, loc: Location) -> Result<(), IndexError> {
        assert!(
            entry <= ENTRY_ID_MAX,
            "entry id checked on the request path"
        );
        assert!(loc.log_id != 0, "log ids start at 1");
        if entry >= self.slots() as u64 {
            let want = (entry as usize + 1)
                .next_power_of_two()
                .max(self.slots() * 2);
            self.sync()?;
            self.file.set_len((HEADER_LEN + want * SLOT) as u64)?;
            // SAFETY: as in `open`; the old map is dropped on assignment.
            self.map = unsafe { MmapMut::map_mut(&self.file)? };
        }
        let at = HEADER_LEN + entry as usize * SLOT;
        if self.high_water().is_none_or(|h| entry >= h) {
            // Kept in the header so that finding the last entry never scans a sparse file.
            let h = entry + 1;
            self.map[24..32].copy_from_slice(&h.to_le_bytes());
            let crc = crc32c::crc32c(&self.map[24..32]);
            self.map[32..36].copy_from_slice(&crc.to_le_bytes());
            self.header_dirty = true;
        }
        let mut s = [0u8; SLOT];
        s[0..4].copy_from_slice(&loc.log_id.to_le_bytes());
        s[4..8].copy_from_slice(&loc.offset.to_le_bytes());
        s[8..12].copy_from_slice(&loc.len.to_le_bytes());
        let crc = slot_crc(self.ledger, entry, &s);
        s[12..16].copy_from_slice(&crc.to_le_bytes());
        self.map[at..at + SLOT].copy_from_slice(&s);
        self.dirty = Some(match self.dirty {
            None => (at, at + SLOT),
            Some((a, b)) => (a.min(at), b.max(at + SLOT)),
        });
        Ok(())
    }

    pub fn is_dirty(&self) -> bool {
        self.dirty.is_some() || self.header_dirty
    }

    /// Makes every slot written so far durable.
    pub fn sync(&mut self) -> io::Result<()> {
        if let Some((a, b)) = self.dirty.take() {
            self.map.flush_range(a, b - a)?;
        }
        if std::mem::take(&mut self.header_dirty) {
            self.map.flush_range(0, HEADER_LEN)?;
        }
        Ok(())
    }

    /// Highest entry id + 1 recorded in the header; `None` when that field fails its checksum.
    fn high_water(&self) -> Option<u64> {
        let v = &self.map[24..32];
        let crc = u32::from_le_bytes(self.map[32..36].try_into().expect("4"));
        (crc32c::crc32c(v) == crc).then(|| u64::from_le_bytes(v.try_into().expect("8")))
    }

    /// The highest entry id present: from the header, or (when the header field is damaged)
    /// by scanning back from the end.
    pub fn last_entry(&self) -> Option<u64> {
        match self.high_water() {
            Some(0) => return None,
            Some(h) if h <= self.slots() as u64 => return Some(h - 1),
            _ => {}
        }
        (0..self.slots())
            .rev()
            .find(|e| {
                let at = HEADER_LEN + e * SLOT;
                self.map[at..at + SLOT].iter().any(|b| *b != 0)
            })
            .map(|e| e as u64)
    }
}

/// The open indexes of one ledger directory, at most `open_max` mapped at a time.
pub struct IndexSet {
    dir: PathBuf,
    open: HashMap<u64, LedgerIndex>,
    open_max: usize,
}

impl IndexSet {
    pub fn new(dir: &Path, open_max: usize) -> Self {
        Self {
            dir: dir.into(),
            open: HashMap::new(),
            open_max,
        }
    }

    fn get_or_open(
        &mut self,
        ledger: u64,
        create: bool,
    ) -> Result<Option<&mut LedgerIndex>, IndexError> {
        if !self.open.contains_key(&ledger) {
            let Some(idx) = LedgerIndex::open(&self.dir, ledger, create)? else {
                return Ok(None);
            };
            if self.open.len() >= self.open_max {
                // Close clean indexes to stay under the limit (dirty ones wait for the sync).
                let clean: Vec<u64> = self
                    .open
                    .iter()
                    .filter(|(_, i)| !i.is_dirty())
                    .map(|(l, _)| *l)
                    .take(self.open_max / 4 + 1)
                    .collect();
                for l in clean {
                    self.open.remove(&l);
                }
            }
            self.open.insert(ledger, idx);
        }
        Ok(self.open.get_mut(&ledger))
    }

    pub fn get(&mut self, ledger: u64, entry: u64) -> Result<Option<Location>, IndexError> {
        match self.get_or_open(ledger, false)? {
            Some(idx) => idx.get(entry),
            None => Ok(None),
        }
    }

    pub fn put(&mut self, ledger: u64, entry: u64, loc: Location) -> Result<(), IndexError> {
        self.get_or_open(ledger, true)?
            .expect("created")
            .put(entry, loc)
    }

    pub fn last_entry(&mut self, ledger: u64) -> Result<Option<u64>, IndexError> {
        Ok(self
            .get_or_open(ledger, false)?
            .and_then(|i| i.last_entry()))
    }

    /// Syncs every index written since the last call.
    pub fn sync(&mut self) -> io::Result<()> {
        for idx in self.open.values_mut() {
            idx.sync()?;
        }
        Ok(())
    }

    pub fn remove(&mut self, ledger: u64) -> io::Result<()> {
        self.open.remove(&ledger);
        crate::durable::remove_file(&index_path(&self.dir, ledger))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loc(n: u32) -> Location {
        Location {
            log_id: n,
            offset: n * 100,
            len: n + 1,
        }
    }

    #[test]
    fn lookups_grow_and_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = IndexSet::new(dir.path(), 2);
        assert_eq!(set.get(5, 0).unwrap(), None);
        set.put(5, 0, loc(1)).unwrap();
        set.put(5, 5000, loc(2)).unwrap();
        set.put(6, 3, loc(3)).unwrap();
        set.put(7, 1, loc(4)).unwrap(); // exceeds open_max: clean ones are closed
        set.sync().unwrap();
        drop(set);
        let mut set = IndexSet::new(dir.path(), 8);
        assert_eq!(set.get(5, 0).unwrap(), Some(loc(1)));
        assert_eq!(set.get(5, 1).unwrap(), None);
        assert_eq!(set.get(5, 5000).unwrap(), Some(loc(2)));
        assert_eq!(set.get(5, 1 << 40).unwrap(), None);
        assert_eq!(set.last_entry(5).unwrap(), Some(5000));
        assert_eq!(set.last_entry(6).unwrap(), Some(3));
        assert_eq!(set.last_entry(99).unwrap(), None);
        let mut l = list(dir.path()).unwrap();
        l.sort();
        assert_eq!(l, vec![5, 6, 7]);
        set.remove(6).unwrap();
        assert_eq!(set.get(6, 3).unwrap(), None);
    }

    #[test]
    fn damaged_slot_is_corruption() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = IndexSet::new(dir.path(), 8);
        set.put(9, 2, loc(1)).unwrap();
        set.sync().unwrap();
        drop(set);
        let path = index_path(dir.path(), 9);
        let mut data = std::fs::read(&path).unwrap();
        data[HEADER_LEN + 2 * SLOT + 5] ^= 0x10;
        std::fs::write(&path, data).unwrap();
        let mut set = IndexSet::new(dir.path(), 8);
        assert!(matches!(set.get(9, 2), Err(IndexError::Corrupt { .. })));
    }
}
