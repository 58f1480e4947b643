//! The table data model (etcd and BookKeeper-table shaped): values, key-value records with their
//! version stamps, commands, transactions, their results, the input limits, and the key-to-range
//! hash.
//!
//! Every range has a `revision` counter that goes up by one per committed update command (a put,
//! a delete that removed something, an increment, a transaction that wrote anything). A key's
//! `version` is 1 when it is created and +1 per update; `create_revision` and `mod_revision` are
//! the revisions of the commands that created and last changed it. A deleted key starts over:
//! re-created, it is version 1 again (as in etcd).

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

/// Longest key, in bytes. Keys are 1 to 4096 bytes.
pub const KEY_MAX: usize = 4096;
/// Largest bytes value.
pub const VALUE_MAX: usize = 1 << 20;
/// Most compares, and most operations per branch, of one transaction (etcd's `max-txn-ops`).
pub const TXN_OPS_MAX: usize = 128;
/// Largest encoded changelog record (one command's effect). Below the ledger client's 5 MiB
/// entry limit, so a command that fits is never refused by the changelog after it was accepted.
pub const RECORD_MAX: usize = 4 << 20;
/// Most key-values one scan returns.
pub const SCAN_LIMIT_MAX: usize = 10_000;
/// A scan stops once it has gathered this many key and value bytes (at least one record), so a
/// page fits in a 4 MiB gRPC message together with its framing.
pub const SCAN_BYTES_MAX: usize = 3 << 20;
/// Bytes a stored key costs beyond its key and value bytes (map node, stamps), for the range
/// memory limit.
pub const ENTRY_OVERHEAD: u64 = 64;

/// A value: bytes, or a 64-bit number (what `increment` works on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Value {
    Bytes(Bytes),
    Number(i64),
}

impl Value {
    /// Bytes this value costs in memory (for the range limit).
    pub fn size(&self) -> u64 {
        match self {
            Value::Bytes(b) => b.len() as u64,
            Value::Number(_) => 8,
        }
    }
}

impl From<&[u8]> for Value {
    fn from(b: &[u8]) -> Value {
        Value::Bytes(Bytes::copy_from_slice(b))
    }
}

impl From<&str> for Value {
    fn from(s: &str) -> Value {
        Value::Bytes(Bytes::copy_from_slice(s.as_bytes()))
    }
}

impl From<i64> for Value {
    fn from(n: i64) -> Value {
        Value::Number(n)
    }
}

/// A stored key with its value and version stamps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: Bytes,
    pub value: Value,
    /// 1 at creation, +1 per update.
    pub version: u64,
    pub create_revision: u64,
    pub mod_revision: u64,
}

/// What a conditional put or delete expects of the key's current state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Expect {
    /// The key's version; 0 means the key must be absent (put-if-absent).
    Version(u64),
    /// The key's mod revision; 0 means the key must be absent.
    ModRevision(u64),
}

/// The outcome of a put.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PutResult {
    /// False when the expectation did not hold (nothing was written).
    pub succeeded: bool,
    /// The range revision after the command (the put's own revision when it succeeded).
    pub revision: u64,
    /// The key before the command, when asked for.
    pub prev_kv: Option<KeyValue>,
}

/// The outcome of a delete.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeleteResult {
    /// False when the expectation did not hold (nothing was deleted).
    pub succeeded: bool,
    /// Whether a key was removed.
    pub deleted: bool,
    /// The range revision after the command.
    pub revision: u64,
    /// The key before the command, when asked for.
    pub prev_kv: Option<KeyValue>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareOp {
    Equal,
    NotEqual,
    Greater,
    Less,
}

/// What a compare looks at. `Version(0)` and `ModRevision(0)` stand for an absent key (as in
/// etcd).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum CompareTarget {
    /// The value; bytes order lexicographically, numbers numerically. A compare against an absent
    /// key, or between a number and bytes, is false whatever the operator (etcd's rule for
    /// absent keys).
    Value(Value),
    Version(u64),
    ModRevision(u64),
    /// Whether the key exists (false < true for Greater/Less).
    Exists(bool),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Compare {
    pub key: Bytes,
    pub target: CompareTarget,
    pub op: CompareOp,
}

/// One operation of a transaction branch. Operations apply in order, each seeing the ones
/// before it (a `Get` after a `Put` of the same key sees the new value).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TxnOp {
    Put { key: Bytes, value: Value },
    Delete { key: Bytes },
    Get { key: Bytes },
    Increment { key: Bytes, amount: i64 },
}

impl TxnOp {
    pub fn key(&self) -> &Bytes {
        match self {
            TxnOp::Put { key, .. }
            | TxnOp::Delete { key }
            | TxnOp::Get { key }
            | TxnOp::Increment { key, .. } => key,
        }
    }
}

/// If every compare holds, the success branch runs, else the failure branch; all of it or
/// nothing (one changelog record).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Txn {
    pub compares: Vec<Compare>,
    pub success: Vec<TxnOp>,
    pub failure: Vec<TxnOp>,
}

impl Txn {
    /// Every key the transaction names, compares first.
    pub fn keys(&self) -> impl Iterator<Item = &Bytes> {
        self.compares
            .iter()
            .map(|c| &c.key)
            .chain(self.success.iter().map(TxnOp::key))
            .chain(self.failure.iter().map(TxnOp::key))
    }
}

/// The result of one transaction operation, in branch order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum OpResult {
    Put {
        revision: u64,
    },
    Delete {
        deleted: bool,
    },
    Get(Option<KeyValue>),
    /// The new total.
    Increment(i64),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxnResult {
    pub succeeded: bool,
    /// The range revision after the transaction (its own revision when it wrote anything).
    pub revision: u64,
    pub results: Vec<OpResult>,
}

/// The range a key belongs to among `ranges` (>= 1): crc32c of the key scaled onto
/// `0..ranges`, so ranges are contiguous slices of the hash space.
pub fn range_of(key: &[u8], ranges: u32) -> u32 {
    ((crc32c::crc32c(key) as u64 * ranges.max(1) as u64) >> 32) as u32
}

/// The one range all of `keys` belong to: `CrossRange` when they span several. `None` for no
/// keys.
pub fn common_range<'a>(
    keys: impl IntoIterator<Item = &'a Bytes>,
    ranges: u32,
) -> Result<Option<u32>> {
    let mut found: Option<u32> = None;
    for k in keys {
        let r = range_of(k, ranges);
        match found {
            None => found = Some(r),
            Some(f) if f != r => {
                return Err(Error::CrossRange(format!(
                    "the transaction's keys fall in ranges {f} and {r} of {ranges}"
                )));
            }
            Some(_) => {}
        }
    }
    Ok(found)
}

/// Checks a key: 1 to [`KEY_MAX`] bytes.
pub fn check_key(key: &[u8]) -> Result<()> {
    if key.is_empty() {
        return Err(Error::InvalidArgument("empty key".into()));
    }
    if key.len() > KEY_MAX {
        return Err(Error::TooLarge(format!(
            "key of {} bytes; at most {KEY_MAX}",
            key.len()
        )));
    }
    Ok(())
}

/// Checks a value: bytes values at most [`VALUE_MAX`].
pub fn check_value(value: &Value) -> Result<()> {
    if let Value::Bytes(b) = value
        && b.len() > VALUE_MAX
    {
        return Err(Error::TooLarge(format!(
            "value of {} bytes; at most {VALUE_MAX}",
            b.len()
        )));
    }
    Ok(())
}

/// Checks a transaction's shape and every key and value in it.
pub fn check_txn(txn: &Txn) -> Result<()> {
    for (what, n) in [
        ("compares", txn.compares.len()),
        ("success operations", txn.success.len()),
        ("failure operations", txn.failure.len()),
    ] {
        if n > TXN_OPS_MAX {
            return Err(Error::InvalidArgument(format!(
                "{n} {what} in a transaction; at most {TXN_OPS_MAX}"
            )));
        }
    }
    for c in &txn.compares {
        check_key(&c.key)?;
        if let CompareTarget::Value(v) = &c.target {
            check_value(v)?;
        }
    }
    for op in txn.success.iter().chain(&txn.failure) {
        check_key(op.key())?;
        if let TxnOp::Put { value, .. } = op {
            check_value(value)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn range_of_spreads_and_stays_in_bounds() {
        assert_eq!(range_of(b"anything", 1), 0);
        let mut seen = [0u32; 8];
        for i in 0..4000 {
            let r = range_of(format!("key-{i}").as_bytes(), 8);
            assert!(r < 8);
            seen[r as usize] += 1;
        }
        assert!(seen.iter().all(|&n| n > 300), "{seen:?}");
        // Fixed values: the hash is part of the format (a key must stay in its range).
        assert_eq!(
            range_of(b"a", 256),
            ((crc32c::crc32c(b"a") as u64 * 256) >> 32) as u32
        );
    }

    #[test]
    fn limits() {
        assert!(matches!(check_key(b""), Err(Error::InvalidArgument(_))));
        assert!(check_key(&[1; KEY_MAX]).is_ok());
        assert!(matches!(
            check_key(&[1; KEY_MAX + 1]),
            Err(Error::TooLarge(_))
        ));
        assert!(check_value(&Value::Bytes(Bytes::from(vec![0; VALUE_MAX]))).is_ok());
        assert!(matches!(
            check_value(&Value::Bytes(Bytes::from(vec![0; VALUE_MAX + 1]))),
            Err(Error::TooLarge(_))
        ));
        let op = TxnOp::Get {
            key: Bytes::from_static(b"k"),
        };
        let txn = Txn {
            success: vec![op; TXN_OPS_MAX + 1],
            ..Default::default()
        };
        assert!(matches!(check_txn(&txn), Err(Error::InvalidArgument(_))));
        let keys = [Bytes::from_static(b"a"), Bytes::from_static(b"b")];
        assert_eq!(common_range(&keys, 1).unwrap(), Some(0));
        let mut i = 0;
        let split = loop {
            let k = Bytes::from(format!("k{i}"));
            if range_of(&k, 4) != range_of(b"a", 4) {
                break k;
            }
            i += 1;
        };
        assert!(matches!(
            common_range(&[keys[0].clone(), split], 4),
            Err(Error::CrossRange(_))
        ));
    }
}
