//! The two entry caches of a ledger directory.
//!
//! The write cache holds entries not yet in an entry log, in two halves: `active` takes new
//! entries; at a checkpoint it becomes `flushing` (immutable while it is written out) and a fresh
//! `active` starts. Entries are kept sorted by (ledger, entry) so that a flush writes each ledger's
//! entries together, which makes later sequential reads cheap. The read cache keeps recently read
//! entries, evicting the oldest first; both are bounded in bytes.

use bytes::Bytes;
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;

pub type Key = (u64, u64);

#[derive(Default)]
pub struct WriteCache {
    pub active: BTreeMap<Key, Bytes>,
    pub active_bytes: usize,
    pub flushing: Arc<BTreeMap<Key, Bytes>>,
    pub flushing_bytes: usize,
}

impl WriteCache {
    pub fn insert(&mut self, key: Key, body: Bytes) {
        self.active_bytes += body.len();
        if let Some(old) = self.active.insert(key, body) {
            self.active_bytes -= old.len();
        }
    }

    pub fn get(&self, key: &Key) -> Option<Bytes> {
        self.active
            .get(key)
            .or_else(|| self.flushing.get(key))
            .cloned()
    }

    /// Highest entry of `ledger` in either half.
    pub fn last_entry(&self, ledger: u64) -> Option<u64> {
        let last = |m: &BTreeMap<Key, Bytes>| {
            m.range((ledger, 0)..=(ledger, u64::MAX))
                .next_back()
                .map(|((_, e), _)| *e)
        };
        last(&self.active).max(last(&self.flushing))
    }

    /// Moves `active` to `flushing`, unless a previous flush failed and its entries are still
    /// there: then those are returned first, with `true` (the caller must swap again after).
    /// Returns what to flush.
    pub fn swap(&mut self) -> (Arc<BTreeMap<Key, Bytes>>, bool) {
        if !self.flushing.is_empty() {
            return (self.flushing.clone(), true);
        }
        self.flushing = Arc::new(std::mem::take(&mut self.active));
        self.flushing_bytes = std::mem::take(&mut self.active_bytes);
        (self.flushing.clone(), false)
    }

    pub fn clear_flushing(&mut self) {
        self.flushing = Arc::default();
        self.flushing_bytes = 0;
    }

    pub fn remove_ledger(&mut self, ledger: u64) {
        let keys: Vec<Key> = self
            .active
            .range((ledger, 0)..=(ledger, u64::MAX))
            .map(|(k, _)| *k)
            .collect();
        for k in keys {
            if let Some(b) = self.active.remove(&k) {
                self.active_bytes -= b.len();
            }
        }
        // `flushing` is immutable; the flush skips ledgers that are gone.
    }

    pub fn bytes(&self) -> usize {
        self.active_bytes + self.flushing_bytes
    }
}

pub struct ReadCache {
    map: HashMap<Key, Bytes>,
    order: VecDeque<Key>,
    bytes: usize,
    max_bytes: usize,
}

impl ReadCache {
    pub fn new(max_bytes: usize) -> Self {
        Self {
            map: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_bytes,
        }
    }

    pub fn get(&self, key: &Key) -> Option<Bytes> {
        self.map.get(key).cloned()
    }

    pub fn insert(&mut self, key: Key, body: Bytes) {
        if body.len() > self.max_bytes {
            return;
        }
        let len = body.len();
        if let Some(old) = self.map.insert(key, body) {
            self.bytes -= old.len();
        } else {
            self.order.push_back(key);
        }
        self.bytes += len;
        while self.bytes > self.max_bytes {
            let Some(k) = self.order.pop_front() else {
                break;
            };
            if let Some(b) = self.map.remove(&k) {
                self.bytes -= b.len();
            }
        }
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn write_cache_swaps_and_keeps_failed_flushes() {
        let mut c = WriteCache::default();
        c.insert((1, 0), Bytes::from_static(b"aa"));
        c.insert((1, 1), Bytes::from_static(b"bbb"));
        c.insert((2, 0), Bytes::from_static(b"c"));
        assert_eq!(c.last_entry(1), Some(1));
        let (f, leftover) = c.swap();
        assert_eq!((f.len(), leftover), (3, false));
        c.insert((1, 2), Bytes::from_static(b"d"));
        assert_eq!(c.get(&(1, 0)).as_deref(), Some(&b"aa"[..]));
        assert_eq!(c.last_entry(1), Some(2));
        // A second swap before clearing returns the same (failed) flush, flagged.
        let (f, leftover) = c.swap();
        assert_eq!((f.len(), leftover), (3, true));
        c.clear_flushing();
        assert_eq!(c.bytes(), 1);
        c.remove_ledger(1);
        assert_eq!(c.bytes(), 0);
    }

    #[test]
    fn read_cache_evicts_oldest_within_budget() {
        let mut c = ReadCache::new(10);
        c.insert((1, 0), Bytes::from(vec![0; 4]));
        c.insert((1, 1), Bytes::from(vec![0; 4]));
        c.insert((1, 2), Bytes::from(vec![0; 4]));
        assert!(c.get(&(1, 0)).is_none());
        assert!(c.get(&(1, 2)).is_some());
        assert!(c.bytes() <= 10);
        c.insert((1, 3), Bytes::from(vec![0; 11]));
        assert!(c.get(&(1, 3)).is_none());
    }
}
