//! Checkpointed per-directory state: the ledgers a directory holds (`LEDGERS`) and the journal
//! mark the checkpoint covers (`LASTMARK`). Both are replaced atomically at each checkpoint.
//!
//! ```text
//! LEDGERS   magic "QLGR" | version u32 | count u32 | ledger* | crc32c of all before
//!   ledger: id u64 | flags u8 (bit 0 fenced, bit 1 explicit LAC present) | lac i64 |
//!           key len u8 | key | [explicit lac i64 | body len u32 | body]
//! LASTMARK  magic "QMRK" | version u32 | journal file id u64 | offset u64 | crc32c of all before
//! ```
//! All integers little-endian.

use crate::journal::LogMark;
use crate::journal::record::MASTER_KEY_MAX;
use bytes::Bytes;
use std::path::Path;

const LEDGERS_MAGIC: &[u8; 4] = b"QLGR";
const MARK_MAGIC: &[u8; 4] = b"QMRK";
const VERSION: u32 = 1;
pub const LEDGERS_FILE: &str = "LEDGERS";
pub const MARK_FILE: &str = "LASTMARK";

/// What a checkpoint keeps of one ledger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LedgerMeta {
    pub ledger_id: u64,
    pub master_key: Bytes,
    pub fenced: bool,
    pub lac: i64,
    pub explicit_lac: Option<(i64, Bytes)>,
}

#[derive(Debug, thiserror::Error)]
#[error("{file} is corrupt: {reason}")]
pub struct MetaCorrupt {
    pub file: &'static str,
    pub reason: &'static str,
}

pub fn encode_ledgers(ledgers: &[LedgerMeta]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(LEDGERS_MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&(ledgers.len() as u32).to_le_bytes());
    for l in ledgers {
        v.extend_from_slice(&l.ledger_id.to_le_bytes());
        let flags = l.fenced as u8 | ((l.explicit_lac.is_some() as u8) << 1);
        v.push(flags);
        v.extend_from_slice(&l.lac.to_le_bytes());
        v.push(l.master_key.len() as u8);
        v.extend_from_slice(&l.master_key);
        if let Some((lac, body)) = &l.explicit_lac {
            v.extend_from_slice(&lac.to_le_bytes());
            v.extend_from_slice(&(body.len() as u32).to_le_bytes());
            v.extend_from_slice(body);
        }
    }
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

struct Cursor<'a>(&'a [u8]);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], MetaCorrupt> {
        if self.0.len() < n {
            return Err(MetaCorrupt {
                file: LEDGERS_FILE,
                reason: "truncated",
            });
        }
        let (a, b) = self.0.split_at(n);
        self.0 = b;
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8, MetaCorrupt> {
        Ok(self.take(1)?[0])
    }
    fn u32(&mut self) -> Result<u32, MetaCorrupt> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into().expect("4")))
    }
    fn u64(&mut self) -> Result<u64, MetaCorrupt> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8")))
    }
}

pub fn decode_ledgers(data: &[u8]) -> Result<Vec<LedgerMeta>, MetaCorrupt> {
    let bad = |reason| MetaCorrupt {
        file: LEDGERS_FILE,
        reason,
    };
    if data.len() < 16 {
        return Err(bad("too short"));
    }
    let (body, crc) = data.split_at(data.len() - 4);
    if crc32c::crc32c(body) != u32::from_le_bytes(crc.try_into().expect("4")) {
        return Err(bad("checksum mismatch"));
    }
    let mut c = Cursor(body);
    if c.take(4)? != LEDGERS_MAGIC {
        return Err(bad("bad magic"));
    }
    if c.u32()? != VERSION {
        return Err(bad("unsupported version"));
    }
    let count = c.u32()? as usize;
    let mut out = Vec::with_capacity(count.min(1 << 20));
    for _ in 0..count {
        let ledger_id = c.u64()?;
        let flags = c.u8()?;
        let lac = c.u64()? as i64;
        let klen = c.u8()? as usize;
        if klen > MASTER_KEY_MAX {
            return Err(bad("master key too long"));
        }
        let master_key = Bytes::copy_from_slice(c.take(klen)?);
        let explicit_lac = if flags & 2 != 0 {
            let elac = c.u64()? as i64;
            let n = c.u32()? as usize;
            Some((elac, Bytes::copy_from_slice(c.take(n)?)))
        } else {
            None
        };
        out.push(LedgerMeta {
            ledger_id,
            master_key,
            fenced: flags & 1 != 0,
            lac,
            explicit_lac,
        });
    }
    if !c.0.is_empty() {
        return Err(bad("trailing bytes"));
    }
    Ok(out)
}

pub fn encode_mark(m: LogMark) -> Vec<u8> {
    let mut v = Vec::with_capacity(28);
    v.extend_from_slice(MARK_MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&m.file_id.to_le_bytes());
    v.extend_from_slice(&m.offset.to_le_bytes());
    let crc = crc32c::crc32c(&v);
    v.extend_from_slice(&crc.to_le_bytes());
    v
}

pub fn decode_mark(data: &[u8]) -> Result<LogMark, MetaCorrupt> {
    let bad = |reason| MetaCorrupt {
        file: MARK_FILE,
        reason,
    };
    if data.len() != 28 {
        return Err(bad("wrong size"));
    }
    if crc32c::crc32c(&data[..24]) != u32::from_le_bytes(data[24..28].try_into().expect("4")) {
        return Err(bad("checksum mismatch"));
    }
    if &data[0..4] != MARK_MAGIC {
        return Err(bad("bad magic"));
    }
    if u32::from_le_bytes(data[4..8].try_into().expect("4")) != VERSION {
        return Err(bad("unsupported version"));
    }
    Ok(LogMark {
        file_id: u64::from_le_bytes(data[8..16].try_into().expect("8")),
        offset: u64::from_le_bytes(data[16..24].try_into().expect("8")),
    })
}

/// Reads a directory's mark; `None` when it has never checkpointed.
pub fn read_mark(dir: &Path) -> Result<Option<LogMark>, crate::BookieError> {
    match std::fs::read(dir.join(MARK_FILE)) {
        Ok(d) => {
            Ok(Some(decode_mark(&d).map_err(|e| {
                crate::BookieError::Corruption(e.to_string())
            })?))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.into()),
    }
}

/// Reads a directory's ledgers; empty when it has never checkpointed.
pub fn read_ledgers(dir: &Path) -> Result<Vec<LedgerMeta>, crate::BookieError> {
    match std::fs::read(dir.join(LEDGERS_FILE)) {
        Ok(d) => decode_ledgers(&d).map_err(|e| crate::BookieError::Corruption(e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e.into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn arb_meta() -> impl Strategy<Value = LedgerMeta> {
        let bytes = |n| proptest::collection::vec(any::<u8>(), 0..n).prop_map(Bytes::from);
        (
            any::<u64>(),
            bytes(MASTER_KEY_MAX + 1),
            any::<bool>(),
            any::<i64>(),
            proptest::option::of((any::<i64>(), bytes(200))),
        )
            .prop_map(
                |(ledger_id, master_key, fenced, lac, explicit_lac)| LedgerMeta {
                    ledger_id,
                    master_key,
                    fenced,
                    lac,
                    explicit_lac,
                },
            )
    }

    proptest! {
        #[test]
        fn any_ledger_list_round_trips(ls in proptest::collection::vec(arb_meta(), 0..20)) {
            prop_assert_eq!(decode_ledgers(&encode_ledgers(&ls)).unwrap(), ls);
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_ledgers(&raw);
            let _ = decode_mark(&raw);
        }
    }

    #[test]
    fn ledgers_round_trip_and_damage_is_caught() {
        let ls = vec![
            LedgerMeta {
                ledger_id: 1,
                master_key: Bytes::from_static(b"k1"),
                fenced: true,
                lac: 41,
                explicit_lac: Some((42, Bytes::from_static(b"body"))),
            },
            LedgerMeta {
                ledger_id: u64::MAX,
                master_key: Bytes::new(),
                fenced: false,
                lac: -1,
                explicit_lac: None,
            },
        ];
        let enc = encode_ledgers(&ls);
        assert_eq!(decode_ledgers(&enc).unwrap(), ls);
        for i in 0..enc.len() {
            let mut bad = enc.clone();
            bad[i] ^= 0x01;
            assert!(decode_ledgers(&bad).is_err(), "flip at {i}");
        }
        assert!(decode_ledgers(&enc[..enc.len() - 1]).is_err());
    }

    #[test]
    fn mark_round_trips() {
        let m = LogMark {
            file_id: 7,
            offset: 4096 + 33,
        };
        assert_eq!(decode_mark(&encode_mark(m)).unwrap(), m);
        let mut bad = encode_mark(m);
        bad[9] ^= 4;
        assert!(decode_mark(&bad).is_err());
    }
}
