//! Journal records and their framing.
//!
//! ```text
//! frame:  len u32 LE | crc32c(body) u32 LE | body (len bytes)
//! body:   kind u8 | ledger id u64 LE | kind-specific fields
//!   1 add            entry id u64 | key len u8 | master key | entry body (rest)
//!   2 fence          key len u8 | master key
//!   3 explicit LAC   lac i64 | key len u8 | master key | LAC body (rest)
//!   4 delete         (nothing)
//!   5 batch header   (the u64 is the batch's sequence number in its file) | records' bytes u64
//! ```
//!
//! Every write of the journal is one batch: a batch header frame, then the frames of its records.
//! The header's length field is checksummed, so replay can find where the next batch starts even
//! when a record inside this one is damaged; that is how it tells a torn tail from corruption.
//!
//! A zero length marks the end of the written part of a (preallocated, zero-filled) file. A frame
//! whose length is over [`RECORD_BODY_MAX`], that runs past the end of the data, or whose CRC does
//! not match is a torn or corrupt tail: replay stops before it.

use bytes::{BufMut, Bytes};

/// Upper bound on a record body: the largest entry plus the fixed fields, with room to spare.
pub const RECORD_BODY_MAX: usize = (64 << 20) + 1024;
/// Bytes of a frame before its body.
pub const FRAME_HEADER: usize = 8;
/// Longest master key accepted.
pub const MASTER_KEY_MAX: usize = 64;

const ADD: u8 = 1;
const FENCE: u8 = 2;
const EXPLICIT_LAC: u8 = 3;
const DELETE: u8 = 4;
const BATCH: u8 = 5;
/// Body length of a batch header frame.
pub const BATCH_BODY: usize = 17;
/// Frame length of a batch header.
pub const BATCH_FRAME: usize = FRAME_HEADER + BATCH_BODY;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    Add {
        ledger_id: u64,
        entry_id: u64,
        master_key: Bytes,
        body: Bytes,
    },
    Fence {
        ledger_id: u64,
        master_key: Bytes,
    },
    ExplicitLac {
        ledger_id: u64,
        lac: i64,
        master_key: Bytes,
        body: Bytes,
    },
    Delete {
        ledger_id: u64,
    },
    /// Opens a batch of `bytes` bytes of record frames (journal framing, never applied).
    Batch {
        seq: u64,
        bytes: u64,
    },
}

/// Why a frame could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    #[error("end of records")]
    End,
    #[error("frame length {0} is out of range")]
    BadLength(usize),
    #[error("frame runs past the end of the data")]
    Truncated,
    #[error("frame checksum mismatch")]
    Checksum,
    #[error("malformed record body: {0}")]
    Malformed(&'static str),
}

impl Record {
    /// Size of the encoded frame.
    pub fn frame_len(&self) -> usize {
        FRAME_HEADER
            + 9
            + match self {
                Record::Add {
                    master_key, body, ..
                } => 8 + 1 + master_key.len() + body.len(),
                Record::Fence { master_key, .. } => 1 + master_key.len(),
                Record::ExplicitLac {
                    master_key, body, ..
                } => 8 + 1 + master_key.len() + body.len(),
                Record::Delete { .. } => 0,
                Record::Batch { .. } => 8,
            }
    }

    /// Appends the framed record to `out`. Master keys must be at most [`MASTER_KEY_MAX`] bytes
    /// (checked by the caller on the request path; asserted here).
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        let start = out.len();
        out.put_u32_le(0);
        out.put_u32_le(0);
        let key = |out: &mut Vec<u8>, k: &Bytes| {
            assert!(k.len() <= MASTER_KEY_MAX, "master key too long");
            out.put_u8(k.len() as u8);
            out.put_slice(k);
        };
        match self {
            Record::Add {
                ledger_id,
                entry_id,
                master_key,
                body,
            } => {
                out.put_u8(ADD);
                out.put_u64_le(*ledger_id);
                out.put_u64_le(*entry_id);
                key(out, master_key);
                out.put_slice(body);
            }
            Record::Fence {
                ledger_id,
                master_key,
            } => {
                out.put_u8(FENCE);
                out.put_u64_le(*ledger_id);
                key(out, master_key);
            }
            Record::ExplicitLac {
                ledger_id,
                lac,
                master_key,
                body,
            } => {
                out.put_u8(EXPLICIT_LAC);
                out.put_u64_le(*ledger_id);
                out.put_i64_le(*lac);
                key(out, master_key);
                out.put_slice(body);
            }
            Record::Delete { ledger_id } => {
                out.put_u8(DELETE);
                out.put_u64_le(*ledger_id);
            }
            Record::Batch { seq, bytes } => {
                out.put_u8(BATCH);
                out.put_u64_le(*seq);
                out.put_u64_le(*bytes);
            }
        }
        let body_len = out.len() - start - FRAME_HEADER;
        let crc = crc32c::crc32c(&out[start + FRAME_HEADER..]);
        out[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(self.frame_len());
        self.encode_into(&mut v);
        v
    }

    /// Reads a frame header: the body length, checked against the limit.
    pub fn frame_body_len(header: &[u8; FRAME_HEADER]) -> Result<(usize, u32), DecodeError> {
        let len = u32::from_le_bytes(header[0..4].try_into().expect("4")) as usize;
        let crc = u32::from_le_bytes(header[4..8].try_into().expect("4"));
        if len == 0 {
            return Err(DecodeError::End);
        }
        if !(9..=RECORD_BODY_MAX).contains(&len) {
            return Err(DecodeError::BadLength(len));
        }
        Ok((len, crc))
    }

    /// Decodes a body whose CRC is `crc`.
    pub fn decode_body(body: Bytes, crc: u32) -> Result<Record, DecodeError> {
        if crc32c::crc32c(&body) != crc {
            return Err(DecodeError::Checksum);
        }
        let mut r = Reader(body);
        let kind = r.u8()?;
        let ledger_id = r.u64()?;
        let rec = match kind {
            ADD => {
                let entry_id = r.u64()?;
                let master_key = r.key()?;
                Record::Add {
                    ledger_id,
                    entry_id,
                    master_key,
                    body: r.rest(),
                }
            }
            FENCE => Record::Fence {
                ledger_id,
                master_key: r.key()?,
            },
            EXPLICIT_LAC => {
                let lac = r.u64()? as i64;
                let master_key = r.key()?;
                Record::ExplicitLac {
                    ledger_id,
                    lac,
                    master_key,
                    body: r.rest(),
                }
            }
            DELETE => Record::Delete { ledger_id },
            BATCH => Record::Batch {
                seq: ledger_id,
                bytes: r.u64()?,
            },
            _ => return Err(DecodeError::Malformed("unknown record kind")),
        };
        Ok(rec)
    }

    /// Decodes one frame from the front of `data`, returning the record and the frame length.
    pub fn decode(data: &Bytes) -> Result<(Record, usize), DecodeError> {
        let header: &[u8; FRAME_HEADER] = data
            .get(..FRAME_HEADER)
            .and_then(|h| h.try_into().ok())
            .ok_or(DecodeError::Truncated)?;
        let (len, crc) = Self::frame_body_len(header)?;
        if data.len() < FRAME_HEADER + len {
            return Err(DecodeError::Truncated);
        }
        let rec = Self::decode_body(data.slice(FRAME_HEADER..FRAME_HEADER + len), crc)?;
        Ok((rec, FRAME_HEADER + len))
    }
}

struct Reader(Bytes);

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, DecodeError> {
        if self.0.len() < n {
            return Err(DecodeError::Malformed("record body too short"));
        }
        Ok(self.0.split_to(n))
    }
    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, DecodeError> {
        Ok(u64::from_le_bytes(self.take(8)?[..].try_into().expect("8")))
    }
    fn key(&mut self) -> Result<Bytes, DecodeError> {
        let n = self.u8()? as usize;
        if n > MASTER_KEY_MAX {
            return Err(DecodeError::Malformed("master key too long"));
        }
        self.take(n)
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.0)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub fn arb_record() -> impl Strategy<Value = Record> {
        let key = proptest::collection::vec(any::<u8>(), 0..=MASTER_KEY_MAX).prop_map(Bytes::from);
        let body = proptest::collection::vec(any::<u8>(), 0..300).prop_map(Bytes::from);
        prop_oneof![
            (any::<u64>(), any::<u64>(), key.clone(), body.clone()).prop_map(|(l, e, k, b)| {
                Record::Add {
                    ledger_id: l,
                    entry_id: e,
                    master_key: k,
                    body: b,
                }
            }),
            (any::<u64>(), key.clone()).prop_map(|(l, k)| Record::Fence {
                ledger_id: l,
                master_key: k
            }),
            (any::<u64>(), any::<i64>(), key, body).prop_map(|(l, lac, k, b)| {
                Record::ExplicitLac {
                    ledger_id: l,
                    lac,
                    master_key: k,
                    body: b,
                }
            }),
            any::<u64>().prop_map(|l| Record::Delete { ledger_id: l }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(rec in arb_record()) {
            let enc = rec.encode();
            prop_assert_eq!(enc.len(), rec.frame_len());
            let (dec, n) = Record::decode(&Bytes::from(enc)).unwrap();
            prop_assert_eq!(n, rec.frame_len());
            prop_assert_eq!(dec, rec);
        }

        #[test]
        fn batch_header_round_trips(seq in any::<u64>(), bytes in any::<u64>()) {
            let rec = Record::Batch { seq, bytes };
            let enc = rec.encode();
            prop_assert_eq!(enc.len(), BATCH_FRAME);
            prop_assert_eq!(Record::decode(&Bytes::from(enc)).unwrap(), (rec, BATCH_FRAME));
        }

        #[test]
        fn garbage_never_panics(raw in proptest::collection::vec(any::<u8>(), 0..128)) {
            let _ = Record::decode(&Bytes::from(raw));
        }
    }

    #[test]
    fn zero_length_is_end_and_crc_mismatch_is_caught() {
        assert_eq!(
            Record::decode(&Bytes::from(vec![0u8; 32])),
            Err(DecodeError::End)
        );
        let mut enc = Record::Delete { ledger_id: 9 }.encode();
        let last = enc.len() - 1;
        enc[last] ^= 0x40;
        assert_eq!(
            Record::decode(&Bytes::from(enc)),
            Err(DecodeError::Checksum)
        );
    }

    #[test]
    fn huge_length_is_rejected_before_allocating() {
        let mut enc = Record::Delete { ledger_id: 9 }.encode();
        enc[0..4].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Record::decode(&Bytes::from(enc)),
            Err(DecodeError::BadLength(_))
        ));
    }
}
