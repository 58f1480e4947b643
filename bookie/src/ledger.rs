//! The bookie's in-memory view of each ledger it holds: master key, fenced flag, LAC, explicit
//! LAC and last entry. Changes are made here first and journaled right after, under the ledger's
//! lock, so that the journal's order is the order in which the changes took effect.
//!
//! Invariants: the master key never changes once set; `fenced` never goes back to false; the LAC
//! only grows.

use crate::storage::meta::LedgerMeta;
use bytes::Bytes;
use parking_lot::{Mutex, RwLock};
use std::collections::HashMap;
use std::sync::Arc;
use tokio::sync::watch;

pub struct LedgerState {
    pub id: u64,
    pub inner: Mutex<LedgerInner>,
    lac: watch::Sender<i64>,
}

pub struct LedgerInner {
    pub master_key: Bytes,
    pub fenced: bool,
    pub explicit_lac: Option<(i64, Bytes)>,
    /// Highest entry id held (in memory or on disk); -1 when none.
    pub last_entry: i64,
}

impl LedgerState {
    fn new(id: u64, master_key: Bytes, fenced: bool, lac: i64, last_entry: i64) -> Self {
        Self {
            id,
            inner: Mutex::new(LedgerInner {
                master_key,
                fenced,
                explicit_lac: None,
                last_entry,
            }),
            lac: watch::Sender::new(lac),
        }
    }

    pub fn lac(&self) -> i64 {
        *self.lac.borrow()
    }

    /// Raises the LAC (never lowers it) and wakes long polls.
    pub fn advance_lac(&self, lac: i64) {
        self.lac.send_if_modified(|cur| {
            if lac > *cur {
                *cur = lac;
                true
            } else {
                false
            }
        });
    }

    pub fn subscribe_lac(&self) -> watch::Receiver<i64> {
        self.lac.subscribe()
    }

    pub fn meta(&self) -> LedgerMeta {
        let g = self.inner.lock();
        LedgerMeta {
            ledger_id: self.id,
            master_key: g.master_key.clone(),
            fenced: g.fenced,
            lac: self.lac(),
            explicit_lac: g.explicit_lac.clone(),
        }
    }
}

#[derive(Default)]
pub struct Ledgers {
    map: RwLock<HashMap<u64, Arc<LedgerState>>>,
}

impl Ledgers {
    pub fn get(&self, id: u64) -> Option<Arc<LedgerState>> {
        self.map.read().get(&id).cloned()
    }

    pub fn contains(&self, id: u64) -> bool {
        self.map.read().contains_key(&id)
    }

    /// The ledger, created with `master_key` when new. The key is *not* checked here.
    pub fn get_or_create(&self, id: u64, master_key: &Bytes) -> Arc<LedgerState> {
        if let Some(l) = self.get(id) {
            return l;
        }
        self.map
            .write()
            .entry(id)
            .or_insert_with(|| Arc::new(LedgerState::new(id, master_key.clone(), false, -1, -1)))
            .clone()
    }

    pub fn load(&self, m: LedgerMeta, last_entry: i64) {
        let st = LedgerState::new(m.ledger_id, m.master_key, m.fenced, m.lac, last_entry);
        st.inner.lock().explicit_lac = m.explicit_lac;
        self.map.write().insert(m.ledger_id, Arc::new(st));
    }

    pub fn remove(&self, id: u64) -> Option<Arc<LedgerState>> {
        self.map.write().remove(&id)
    }

    pub fn len(&self) -> usize {
        self.map.read().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn all(&self) -> Vec<Arc<LedgerState>> {
        self.map.read().values().cloned().collect()
    }
}
