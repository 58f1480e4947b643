//! Binary formats of a range's changelog records and checkpoint ledgers.
//!
//! Every record is `magic (4 bytes) | format version (1 byte) | postcard body`:
//!
//! ```text
//! changelog record   "QTCL" 1  Effect { revision, changes: [(key, Option<Entry>)] }
//! checkpoint header  "QTCH" 1  CheckpointHeader { table, range, revision, offset, keys, bytes, chunks }
//! checkpoint chunk   "QTCC" 1  [(key, Entry)]   (keys ascending, about CHUNK_BYTES each)
//! ```
//!
//! A checkpoint ledger is entry 0 = the header, then `chunks` chunk entries. Integrity of each
//! entry is the ledger's business (entries carry a CRC32C digest checked on read); these formats
//! catch records of another kind or version, truncated or garbled bodies, and trailing bytes, all
//! as [`Error::Corrupt`]. An unknown version is refused, never guessed.

use bytes::Bytes;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use super::state::{Effect, Entry};
use crate::error::{Error, Result};

pub const CHANGELOG_MAGIC: &[u8; 4] = b"QTCL";
pub const HEADER_MAGIC: &[u8; 4] = b"QTCH";
pub const CHUNK_MAGIC: &[u8; 4] = b"QTCC";
pub const VERSION: u8 = 1;
/// Key and value bytes per checkpoint chunk entry (a chunk holds at least one key).
pub const CHUNK_BYTES: usize = 1 << 20;

/// The first entry of a checkpoint ledger.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointHeader {
    /// `namespace/name` of the table.
    pub table: String,
    pub range: u32,
    /// The revision of the snapshot.
    pub revision: u64,
    /// First changelog offset not in the snapshot.
    pub offset: u64,
    pub keys: u64,
    pub bytes: u64,
    /// Chunk entries following the header.
    pub chunks: u64,
}

fn encode<T: Serialize>(magic: &[u8; 4], value: &T, size_hint: usize) -> Bytes {
    let mut out = Vec::with_capacity(5 + size_hint);
    out.extend_from_slice(magic);
    out.push(VERSION);
    // Serializing plain data into a Vec cannot fail.
    let out = postcard::to_extend(value, out).expect("postcard encodes into a Vec");
    Bytes::from(out)
}

fn decode<T: DeserializeOwned>(magic: &[u8; 4], what: &str, data: &[u8]) -> Result<T> {
    if data.len() < 5 || &data[..4] != magic {
        return Err(Error::Corrupt(format!(
            "{what}: expected magic {:?}",
            String::from_utf8_lossy(magic)
        )));
    }
    if data[4] != VERSION {
        return Err(Error::Corrupt(format!(
            "{what}: format version {}, this build reads version {VERSION}",
            data[4]
        )));
    }
    let (v, rest) = postcard::take_from_bytes::<T>(&data[5..])
        .map_err(|e| Error::Corrupt(format!("{what}: {e}")))?;
    if !rest.is_empty() {
        return Err(Error::Corrupt(format!(
            "{what}: {} trailing bytes",
            rest.len()
        )));
    }
    Ok(v)
}

/// Sum of key and value bytes of an effect, for a capacity hint.
fn effect_size(e: &Effect) -> usize {
    e.changes
        .iter()
        .map(|(k, v)| k.len() + 32 + v.as_ref().map_or(0, |e| e.value.size() as usize))
        .sum()
}

pub fn encode_effect(e: &Effect) -> Bytes {
    encode(CHANGELOG_MAGIC, e, effect_size(e) + 16)
}

pub fn decode_effect(data: &[u8]) -> Result<Effect> {
    let e: Effect = decode(CHANGELOG_MAGIC, "changelog record", data)?;
    if e.changes.is_empty() {
        return Err(Error::Corrupt(format!(
            "changelog record of revision {} changes nothing",
            e.revision
        )));
    }
    Ok(e)
}

pub fn encode_header(h: &CheckpointHeader) -> Bytes {
    encode(HEADER_MAGIC, h, 64 + h.table.len())
}

pub fn decode_header(data: &[u8]) -> Result<CheckpointHeader> {
    decode(HEADER_MAGIC, "checkpoint header", data)
}

pub fn encode_chunk(entries: &[(Bytes, Entry)]) -> Bytes {
    let size = entries
        .iter()
        .map(|(k, e)| k.len() + e.value.size() as usize + 32)
        .sum();
    encode(CHUNK_MAGIC, &entries, size)
}

pub fn decode_chunk(data: &[u8]) -> Result<Vec<(Bytes, Entry)>> {
    decode(CHUNK_MAGIC, "checkpoint chunk", data)
}

/// Splits sorted entries into chunks of about [`CHUNK_BYTES`] (at least one entry each).
pub fn chunks<'a, I>(entries: I) -> impl Iterator<Item = Vec<(Bytes, Entry)>> + 'a
where
    I: Iterator<Item = (&'a Bytes, &'a Entry)> + 'a,
{
    let mut it = entries.peekable();
    std::iter::from_fn(move || {
        let mut chunk = Vec::new();
        let mut size = 0usize;
        while let Some((k, e)) = it.peek() {
            if !chunk.is_empty() && size + k.len() + e.value.size() as usize > CHUNK_BYTES {
                break;
            }
            size += k.len() + e.value.size() as usize;
            chunk.push(((*k).clone(), (*e).clone()));
            it.next();
        }
        (!chunk.is_empty()).then_some(chunk)
    })
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;
    use crate::table::model::Value;

    fn entry() -> impl Strategy<Value = Entry> {
        (
            prop_oneof![
                proptest::collection::vec(any::<u8>(), 0..64).prop_map(|v| Value::Bytes(v.into())),
                any::<i64>().prop_map(Value::Number),
            ],
            any::<u64>(),
            any::<u64>(),
            any::<u64>(),
        )
            .prop_map(|(value, version, create_revision, mod_revision)| Entry {
                value,
                version,
                create_revision,
                mod_revision,
            })
    }

    fn key() -> impl Strategy<Value = Bytes> {
        proptest::collection::vec(any::<u8>(), 1..32).prop_map(Bytes::from)
    }

    proptest! {
        #[test]
        fn effect_round_trip(
            revision in any::<u64>(),
            changes in proptest::collection::vec((key(), proptest::option::of(entry())), 1..8),
        ) {
            let e = Effect { revision, changes };
            let b = encode_effect(&e);
            prop_assert_eq!(decode_effect(&b).unwrap(), e);
            // Every strict prefix is refused, never a panic.
            for n in 0..b.len() {
                prop_assert!(matches!(decode_effect(&b[..n]), Err(Error::Corrupt(_))));
            }
        }

        #[test]
        fn chunk_round_trip(entries in proptest::collection::vec((key(), entry()), 0..20)) {
            let b = encode_chunk(&entries);
            prop_assert_eq!(decode_chunk(&b).unwrap(), entries);
        }

        #[test]
        fn garbage_never_panics(data in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = decode_effect(&data);
            let _ = decode_chunk(&data);
            let _ = decode_header(&data);
            let mut tagged = CHANGELOG_MAGIC.to_vec();
            tagged.push(VERSION);
            tagged.extend_from_slice(&data);
            let _ = decode_effect(&tagged);
        }
    }

    #[test]
    fn header_round_trip_and_refusals() {
        let h = CheckpointHeader {
            table: "ns/t".into(),
            range: 3,
            revision: 10,
            offset: 42,
            keys: 5,
            bytes: 500,
            chunks: 1,
        };
        let b = encode_header(&h);
        assert_eq!(decode_header(&b).unwrap(), h);
        // A header is not a chunk or a changelog record.
        assert!(matches!(decode_chunk(&b), Err(Error::Corrupt(_))));
        assert!(matches!(decode_effect(&b), Err(Error::Corrupt(_))));
        // Another version is refused.
        let mut v2 = b.to_vec();
        v2[4] = 2;
        assert!(matches!(decode_header(&v2), Err(Error::Corrupt(_))));
        // Trailing bytes are refused.
        let mut long = b.to_vec();
        long.push(0);
        assert!(matches!(decode_header(&long), Err(Error::Corrupt(_))));
        // An effect without changes is not a valid record.
        let empty = encode_effect(&Effect {
            revision: 1,
            changes: vec![],
        });
        assert!(matches!(decode_effect(&empty), Err(Error::Corrupt(_))));
    }

    #[test]
    fn chunking() {
        let big = Entry {
            value: Value::Bytes(vec![0; CHUNK_BYTES / 2 + 1].into()),
            version: 1,
            create_revision: 1,
            mod_revision: 1,
        };
        let keys: Vec<Bytes> = (0..5u8).map(|i| Bytes::from(vec![i + 1])).collect();
        let map: Vec<(Bytes, Entry)> = keys.iter().map(|k| (k.clone(), big.clone())).collect();
        let cs: Vec<_> = chunks(map.iter().map(|(k, e)| (k, e))).collect();
        assert_eq!(cs.len(), 5);
        assert_eq!(cs.iter().map(Vec::len).sum::<usize>(), 5);
        assert_eq!(chunks(std::iter::empty()).count(), 0);
    }
}
