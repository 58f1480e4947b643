//! The range state machine, without I/O.
//!
//! - [`Store`] is the *committed* state: an ordered map of keys to entries, the range revision,
//!   and the memory it uses. It changes only by [`Store::apply`] of a resolved [`Effect`], whose
//!   revision must be exactly the next one (so a replay that skips or repeats a record is caught
//!   as corruption instead of silently diverging).
//! - [`Machine`] is the sequencer's view: the effects sent to the changelog but not acknowledged
//!   yet (the *pending overlay*: the newest pending value of each key, with the number of pending
//!   effects that touch it), the last revision handed out and the memory the range will use once
//!   they are all applied. [`Machine::evaluate`] turns a [`Command`] into an [`Effect`] (the
//!   final values of the keys it changes) and its [`Outcome`] (the reply), reading
//!   committed-then-pending state; it changes nothing, so bad input and refused commands leave no
//!   trace. [`Machine::sequence`] records an effect as pending; [`Machine::acked`] forgets it
//!   once it has been applied to the store.
//!
//! Invariants: `store.revision <= machine.revision`; the pending effects are exactly the
//! revisions `store.revision + 1 ..= machine.revision` (read-only outcomes carry no revision of
//! their own); for every key, committed state overlaid with the pending overlay equals the state
//! after applying every pending effect in order.
//!
//! Effects carry final values rather than commands, so replay never re-evaluates (an increment
//! replayed after a checkpoint cannot double-count) and a transaction is one record.

use std::collections::{BTreeMap, HashMap};
use std::ops::Bound;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::model::{
    CompareOp, CompareTarget, DeleteResult, ENTRY_OVERHEAD, Expect, KeyValue, OpResult, PutResult,
    SCAN_BYTES_MAX, SCAN_LIMIT_MAX, Txn, TxnOp, TxnResult, Value, check_key, check_txn,
    check_value,
};
use crate::error::{Error, Result};

/// A stored entry; its key is the map key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Entry {
    pub value: Value,
    pub version: u64,
    pub create_revision: u64,
    pub mod_revision: u64,
}

impl Entry {
    pub fn to_kv(&self, key: &Bytes) -> KeyValue {
        KeyValue {
            key: key.clone(),
            value: self.value.clone(),
            version: self.version,
            create_revision: self.create_revision,
            mod_revision: self.mod_revision,
        }
    }
}

/// Memory one stored key costs (for the range limit).
fn cost(key: &[u8], entry: Option<&Entry>) -> u64 {
    entry.map_or(0, |e| key.len() as u64 + e.value.size() + ENTRY_OVERHEAD)
}

/// A resolved update: the final value (`None`: deleted) of every key a command changed, at
/// `revision`. An effect without changes is a read-only outcome: it is not logged and carries
/// the revision it was evaluated at.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Effect {
    pub revision: u64,
    pub changes: Vec<(Bytes, Option<Entry>)>,
}

impl Effect {
    pub fn is_write(&self) -> bool {
        !self.changes.is_empty()
    }
}

/// An update command, as the sequencer receives it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    Put {
        key: Bytes,
        value: Value,
        expect: Option<Expect>,
        prev_kv: bool,
    },
    Delete {
        key: Bytes,
        expect: Option<Expect>,
        prev_kv: bool,
    },
    Increment {
        key: Bytes,
        amount: i64,
    },
    Txn(Txn),
}

impl Command {
    /// Every key the command names.
    pub fn keys(&self) -> Vec<&Bytes> {
        match self {
            Command::Put { key, .. }
            | Command::Delete { key, .. }
            | Command::Increment { key, .. } => {
                vec![key]
            }
            Command::Txn(t) => t.keys().collect(),
        }
    }

    /// Checks keys, values and shape (no state needed).
    pub fn check(&self) -> Result<()> {
        match self {
            Command::Put { key, value, .. } => {
                check_key(key)?;
                check_value(value)
            }
            Command::Delete { key, .. } | Command::Increment { key, .. } => check_key(key),
            Command::Txn(t) => check_txn(t),
        }
    }
}

/// The reply to a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Put(PutResult),
    Delete(DeleteResult),
    Increment(i64),
    Txn(TxnResult),
}

/// The committed state of a range.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Store {
    map: BTreeMap<Bytes, Entry>,
    revision: u64,
    bytes: u64,
}

impl Store {
    pub fn new() -> Store {
        Store::default()
    }

    /// A store restored from a checkpoint's entries at `revision`.
    pub fn from_entries(
        entries: impl IntoIterator<Item = (Bytes, Entry)>,
        revision: u64,
    ) -> Result<Store> {
        let mut s = Store {
            revision,
            ..Store::default()
        };
        for (k, e) in entries {
            if k.is_empty() || e.mod_revision > revision || e.version == 0 {
                return Err(Error::Corrupt(format!(
                    "checkpoint entry {k:?} (version {}, mod revision {}) at revision {revision}",
                    e.version, e.mod_revision
                )));
            }
            s.bytes += cost(&k, Some(&e));
            if s.map.insert(k.clone(), e).is_some() {
                return Err(Error::Corrupt(format!("checkpoint holds key {k:?} twice")));
            }
        }
        Ok(s)
    }

    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn keys(&self) -> u64 {
        self.map.len() as u64
    }

    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    pub fn entry(&self, key: &[u8]) -> Option<&Entry> {
        self.map.get(key)
    }

    pub fn get(&self, key: &Bytes) -> Option<KeyValue> {
        self.map.get(key).map(|e| e.to_kv(key))
    }

    /// Keys in `[start, end)` (`end` None: to the last key), in key order, at most `limit`
    /// (0: [`SCAN_LIMIT_MAX`]) and about [`SCAN_BYTES_MAX`] of keys and values; `more` says
    /// whether keys follow in the interval.
    pub fn scan(&self, start: &[u8], end: Option<&[u8]>, limit: usize) -> (Vec<KeyValue>, bool) {
        let limit = if limit == 0 {
            SCAN_LIMIT_MAX
        } else {
            limit.min(SCAN_LIMIT_MAX)
        };
        if let Some(e) = end
            && e <= start
        {
            return (Vec::new(), false);
        }
        let upper = end.map_or(Bound::Unbounded, Bound::Excluded);
        let mut iter = self
            .map
            .range::<[u8], _>((Bound::Included(start), upper))
            .peekable();
        let mut out = Vec::new();
        let mut size = 0usize;
        while let Some((k, e)) = iter.peek() {
            if out.len() >= limit || (!out.is_empty() && size >= SCAN_BYTES_MAX) {
                return (out, true);
            }
            size += k.len() + e.value.size() as usize;
            out.push(e.to_kv(k));
            iter.next();
        }
        (out, false)
    }

    /// Every entry, in key order (for checkpoints).
    pub fn entries(&self) -> impl Iterator<Item = (&Bytes, &Entry)> {
        self.map.iter()
    }

    /// A copy for a checkpoint (keys and values are shared, not copied).
    pub fn snapshot(&self) -> Store {
        self.clone()
    }

    /// Applies a logged effect; it must be the next revision.
    pub fn apply(&mut self, effect: &Effect) -> Result<()> {
        if Some(effect.revision) != self.revision.checked_add(1) {
            return Err(Error::Corrupt(format!(
                "changelog record of revision {} follows revision {}",
                effect.revision, self.revision
            )));
        }
        for (k, v) in &effect.changes {
            let old = match v {
                Some(e) => {
                    self.bytes += cost(k, Some(e));
                    self.map.insert(k.clone(), e.clone())
                }
                None => self.map.remove(k),
            };
            self.bytes = self.bytes.saturating_sub(cost(k, old.as_ref()));
        }
        self.revision = effect.revision;
        Ok(())
    }
}

/// Limits the machine enforces beyond the per-key ones.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Memory the range may use; puts and increments beyond it are refused.
    pub max_bytes: u64,
}

/// An evaluated command, not yet sequenced.
#[derive(Debug)]
pub struct Evaluated {
    pub effect: Effect,
    pub outcome: Outcome,
    /// Memory the range uses once this effect is applied after every pending one.
    bytes_after: u64,
}

/// The sequencer's state above the committed store: the pending overlay.
#[derive(Debug)]
pub struct Machine {
    /// Newest pending value of each key with the number of pending effects touching it.
    overlay: HashMap<Bytes, (Option<Entry>, u32)>,
    /// Last revision handed out.
    revision: u64,
    /// Memory once every pending effect is applied.
    bytes: u64,
    /// Pending effects (write effects sequenced, not acked).
    pending: u64,
    limits: Limits,
}

/// The keys a command has touched so far, in first-touch order, with their current values.
struct View<'a> {
    store: &'a Store,
    machine: &'a Machine,
    touched: Vec<(Bytes, Option<Entry>)>,
    changed: Vec<bool>,
}

impl<'a> View<'a> {
    fn current(&self, key: &Bytes) -> Option<Entry> {
        if let Some((_, v)) = self.touched.iter().find(|(k, _)| k == key) {
            return v.clone();
        }
        self.machine.lookup(self.store, key)
    }

    fn set(&mut self, key: &Bytes, value: Option<Entry>) {
        match self.touched.iter().position(|(k, _)| k == key) {
            Some(i) => {
                self.touched[i].1 = value;
                self.changed[i] = true;
            }
            None => {
                self.touched.push((key.clone(), value));
                self.changed.push(true);
            }
        }
    }

    fn put(&mut self, key: &Bytes, value: Value, revision: u64) {
        let cur = self.current(key);
        let entry = match cur {
            Some(e) => Entry {
                value,
                // Stored versions come from disk: never overflow on a corrupt one.
                version: e.version.saturating_add(1),
                create_revision: e.create_revision,
                mod_revision: revision,
            },
            None => Entry {
                value,
                version: 1,
                create_revision: revision,
                mod_revision: revision,
            },
        };
        self.set(key, Some(entry));
    }

    /// Whether a key was removed.
    fn delete(&mut self, key: &Bytes) -> bool {
        if self.current(key).is_some() {
            self.set(key, None);
            true
        } else {
            false
        }
    }

    fn increment(&mut self, key: &Bytes, amount: i64, revision: u64) -> Result<i64> {
        let total = match self.current(key).map(|e| e.value) {
            None => amount,
            Some(Value::Number(n)) => n.checked_add(amount).ok_or_else(|| {
                Error::Overflow(format!("{n} + {amount} overflows a 64-bit number"))
            })?,
            Some(Value::Bytes(_)) => {
                return Err(Error::WrongType(format!(
                    "increment of key {key:?}, which holds bytes"
                )));
            }
        };
        self.put(key, Value::Number(total), revision);
        Ok(total)
    }

    fn expect_holds(&self, key: &Bytes, expect: Option<Expect>) -> bool {
        let cur = self.current(key);
        match expect {
            None => true,
            Some(Expect::Version(v)) => cur.map_or(0, |e| e.version) == v,
            Some(Expect::ModRevision(r)) => cur.map_or(0, |e| e.mod_revision) == r,
        }
    }

    fn kv(&self, key: &Bytes) -> Option<KeyValue> {
        self.current(key).map(|e| e.to_kv(key))
    }

    /// The changes (final values of keys actually written).
    fn into_changes(self) -> Vec<(Bytes, Option<Entry>)> {
        self.touched
            .into_iter()
            .zip(self.changed)
            .filter_map(|(kv, c)| c.then_some(kv))
            .collect()
    }
}

fn compare(cur: Option<&Entry>, target: &CompareTarget, op: CompareOp) -> bool {
    use std::cmp::Ordering;
    let ord: Ordering = match target {
        CompareTarget::Value(want) => match (cur.map(|e| &e.value), want) {
            (Some(Value::Bytes(a)), Value::Bytes(b)) => a.cmp(b),
            (Some(Value::Number(a)), Value::Number(b)) => a.cmp(b),
            _ => return false,
        },
        CompareTarget::Version(v) => cur.map_or(0, |e| e.version).cmp(v),
        CompareTarget::ModRevision(r) => cur.map_or(0, |e| e.mod_revision).cmp(r),
        CompareTarget::Exists(b) => cur.is_some().cmp(b),
    };
    match op {
        CompareOp::Equal => ord == Ordering::Equal,
        CompareOp::NotEqual => ord != Ordering::Equal,
        CompareOp::Greater => ord == Ordering::Greater,
        CompareOp::Less => ord == Ordering::Less,
    }
}

impl Machine {
    /// A machine above `store`, nothing pending.
    pub fn new(store: &Store, limits: Limits) -> Machine {
        Machine {
            overlay: HashMap::new(),
            revision: store.revision(),
            bytes: store.bytes(),
            pending: 0,
            limits,
        }
    }

    /// Last revision handed out.
    pub fn revision(&self) -> u64 {
        self.revision
    }

    /// Write effects sequenced and not acknowledged.
    pub fn pending(&self) -> u64 {
        self.pending
    }

    /// Memory once every pending effect is applied.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// A key's state after every pending effect.
    pub fn lookup(&self, store: &Store, key: &Bytes) -> Option<Entry> {
        match self.overlay.get(key) {
            Some((v, _)) => v.clone(),
            None => store.entry(key).cloned(),
        }
    }

    /// Evaluates a command against committed-then-pending state. Changes nothing.
    pub fn evaluate(&self, store: &Store, cmd: &Command) -> Result<Evaluated> {
        cmd.check()?;
        let rev = self.revision.checked_add(1).ok_or_else(|| {
            Error::Corrupt(format!("range revision {} cannot grow", self.revision))
        })?;
        let mut view = View {
            store,
            machine: self,
            touched: Vec::new(),
            changed: Vec::new(),
        };
        let outcome = match cmd {
            Command::Put {
                key,
                value,
                expect,
                prev_kv,
            } => {
                let prev = prev_kv.then(|| view.kv(key)).flatten();
                let ok = view.expect_holds(key, *expect);
                if ok {
                    view.put(key, value.clone(), rev);
                }
                Outcome::Put(PutResult {
                    succeeded: ok,
                    revision: if ok { rev } else { self.revision },
                    prev_kv: prev,
                })
            }
            Command::Delete {
                key,
                expect,
                prev_kv,
            } => {
                let prev = prev_kv.then(|| view.kv(key)).flatten();
                let ok = view.expect_holds(key, *expect);
                let deleted = ok && view.delete(key);
                Outcome::Delete(DeleteResult {
                    succeeded: ok,
                    deleted,
                    revision: if deleted { rev } else { self.revision },
                    prev_kv: prev,
                })
            }
            Command::Increment { key, amount } => {
                Outcome::Increment(view.increment(key, *amount, rev)?)
            }
            Command::Txn(txn) => {
                let succeeded = txn
                    .compares
                    .iter()
                    .all(|c| compare(view.current(&c.key).as_ref(), &c.target, c.op));
                let ops = if succeeded {
                    &txn.success
                } else {
                    &txn.failure
                };
                let mut results = Vec::with_capacity(ops.len());
                for op in ops {
                    results.push(match op {
                        TxnOp::Put { key, value } => {
                            view.put(key, value.clone(), rev);
                            OpResult::Put { revision: rev }
                        }
                        TxnOp::Delete { key } => OpResult::Delete {
                            deleted: view.delete(key),
                        },
                        TxnOp::Get { key } => OpResult::Get(view.kv(key)),
                        TxnOp::Increment { key, amount } => {
                            OpResult::Increment(view.increment(key, *amount, rev)?)
                        }
                    });
                }
                let wrote = view.changed.iter().any(|c| *c);
                Outcome::Txn(TxnResult {
                    succeeded,
                    revision: if wrote { rev } else { self.revision },
                    results,
                })
            }
        };
        let mut grow: i128 = 0;
        let changes = view.into_changes();
        for (k, v) in &changes {
            let before = self.lookup(store, k);
            grow += cost(k, v.as_ref()) as i128 - cost(k, before.as_ref()) as i128;
        }
        let bytes_after = (self.bytes as i128 + grow).max(0) as u64;
        if grow > 0 && bytes_after > self.limits.max_bytes {
            return Err(Error::RangeFull(format!(
                "the range would hold {bytes_after} bytes; its limit is {}",
                self.limits.max_bytes
            )));
        }
        let effect = if changes.is_empty() {
            Effect {
                revision: self.revision,
                changes,
            }
        } else {
            Effect {
                revision: rev,
                changes,
            }
        };
        Ok(Evaluated {
            effect,
            outcome,
            bytes_after,
        })
    }

    /// Records an evaluated write as pending (it is being sent to the changelog). Must be the
    /// last command evaluated. Read-only outcomes are not recorded.
    pub fn sequence(&mut self, ev: &Evaluated) {
        if !ev.effect.is_write() {
            return;
        }
        debug_assert_eq!(ev.effect.revision, self.revision + 1);
        for (k, v) in &ev.effect.changes {
            let slot = self.overlay.entry(k.clone()).or_insert((None, 0));
            slot.0 = v.clone();
            slot.1 += 1;
        }
        self.revision = ev.effect.revision;
        self.bytes = ev.bytes_after;
        self.pending += 1;
    }

    /// Forgets a pending effect that has been applied to the store (acknowledged effects are
    /// applied in sequence order).
    pub fn acked(&mut self, effect: &Effect) {
        if !effect.is_write() {
            return;
        }
        for (k, _) in &effect.changes {
            if let Some(slot) = self.overlay.get_mut(k) {
                slot.1 -= 1;
                if slot.1 == 0 {
                    self.overlay.remove(k);
                }
            }
        }
        self.pending = self.pending.saturating_sub(1);
    }
}

#[cfg(test)]
mod tests;
