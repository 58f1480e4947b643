//! The entry format: what a writer sends for each entry and what bookies store and return.
//!
//! ```text
//! offset  size  field
//!      0     8  ledger id              (big-endian)
//!      8     8  entry id               (big-endian)
//!     16     8  LAC piggybacked by the writer (big-endian, -1 = none)
//!     24     8  ledger length: bytes of payload in entries 0..=entry id (big-endian)
//!     32     4  digest: CRC32C over bytes 0..32 and the payload (big-endian)
//!     36     n  payload
//! ```
//!
//! The digest is computed by the writer and verified by readers, end to end; bookies only read
//! the header (to learn the LAC) and add checksums of their own to what they store.

use bytes::{BufMut, Bytes, BytesMut};

/// Bytes before the payload.
pub const HEADER_LEN: usize = 36;

/// Why an entry body could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntryError {
    #[error("entry body of {0} bytes is shorter than the {HEADER_LEN}-byte header")]
    Truncated(usize),
    #[error("entry digest mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    DigestMismatch { stored: u32, computed: u32 },
}

/// The fixed-size part of an entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EntryHeader {
    pub ledger_id: u64,
    pub entry_id: u64,
    pub lac: i64,
    pub length: u64,
}

fn digest(head: &[u8], payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(head), payload)
}

/// Encodes an entry with its digest.
pub fn encode(header: &EntryHeader, payload: &[u8]) -> Bytes {
    let mut buf = BytesMut::with_capacity(HEADER_LEN + payload.len());
    buf.put_u64(header.ledger_id);
    buf.put_u64(header.entry_id);
    buf.put_i64(header.lac);
    buf.put_u64(header.length);
    let d = digest(&buf[..32], payload);
    buf.put_u32(d);
    buf.put_slice(payload);
    buf.freeze()
}

/// Reads the header without checking the digest (what a bookie does).
pub fn peek_header(body: &[u8]) -> Result<EntryHeader, EntryError> {
    if body.len() < HEADER_LEN {
        return Err(EntryError::Truncated(body.len()));
    }
    let u = |i: usize| u64::from_be_bytes(body[i..i + 8].try_into().expect("8 bytes"));
    Ok(EntryHeader {
        ledger_id: u(0),
        entry_id: u(8),
        lac: u(16) as i64,
        length: u(24),
    })
}

/// Decodes an entry and verifies its digest (what a reader does). Returns the header and the
/// payload, which shares `body`'s memory.
pub fn decode(body: &Bytes) -> Result<(EntryHeader, Bytes), EntryError> {
    let header = peek_header(body)?;
    let stored = u32::from_be_bytes(body[32..36].try_into().expect("4 bytes"));
    let computed = digest(&body[..32], &body[HEADER_LEN..]);
    if stored != computed {
        return Err(EntryError::DigestMismatch { stored, computed });
    }
    Ok((header, body.slice(HEADER_LEN..)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn round_trip(ledger in any::<u64>(), entry in any::<u64>(), lac in any::<i64>(),
                      length in any::<u64>(), payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let h = EntryHeader { ledger_id: ledger, entry_id: entry, lac, length };
            let body = encode(&h, &payload);
            let (h2, p2) = decode(&body).unwrap();
            prop_assert_eq!(h, h2);
            prop_assert_eq!(&p2[..], &payload[..]);
        }

        #[test]
        fn any_flipped_bit_is_caught(payload in proptest::collection::vec(any::<u8>(), 1..256),
                                     bit in any::<prop::sample::Index>()) {
            let h = EntryHeader { ledger_id: 7, entry_id: 3, lac: 2, length: 99 };
            let mut raw = encode(&h, &payload).to_vec();
            let i = bit.index(raw.len() * 8);
            raw[i / 8] ^= 1 << (i % 8);
            prop_assert!(decode(&Bytes::from(raw)).is_err());
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode(&Bytes::from(raw));
        }
    }

    #[test]
    fn short_body_is_truncated() {
        assert_eq!(peek_header(&[0u8; 10]), Err(EntryError::Truncated(10)));
    }
}
