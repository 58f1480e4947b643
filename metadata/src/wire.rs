//! Conversions between the store's types and the `quire.metadata.v1` wire types, and the one
//! place where [`MetaError`] is mapped to and from `tonic::Status`.

use quire_proto::metadata as pb;
use tonic::{Code, Status};

use crate::store::{KeyValue, MetaError, WatchEvent};

/// Metadata key carrying the stable error code.
pub const CODE_HEADER: &str = "x-quire-meta-code";

/// Internal payloads (raft messages, forwarded commands) are framed: magic `QR`, a version byte,
/// a CRC32C of the body, then the postcard body, which must be consumed exactly. A stray or
/// damaged request is refused instead of being decoded into some command by chance.
const INTERNAL_MAGIC: &[u8; 2] = b"QR";
const INTERNAL_VERSION: u8 = 1;

pub fn encode_internal<T: serde::Serialize>(v: &T) -> Vec<u8> {
    let body = postcard::to_stdvec(v).expect("internal messages serialize");
    let mut out = Vec::with_capacity(body.len() + 7);
    out.extend_from_slice(INTERNAL_MAGIC);
    out.push(INTERNAL_VERSION);
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

pub fn decode_internal<T: serde::de::DeserializeOwned>(b: &[u8]) -> Result<T, String> {
    if b.len() < 7 || &b[..2] != INTERNAL_MAGIC {
        return Err("not a quire internal message (bad magic)".into());
    }
    if b[2] != INTERNAL_VERSION {
        return Err(format!(
            "internal message version {}, this build speaks {INTERNAL_VERSION}",
            b[2]
        ));
    }
    let crc = u32::from_be_bytes(b[3..7].try_into().expect("4 bytes"));
    if crc32c::crc32c(&b[7..]) != crc {
        return Err("internal message checksum mismatch".into());
    }
    match postcard::take_from_bytes(&b[7..]) {
        Ok((v, [])) => Ok(v),
        Ok(_) => Err("internal message has trailing bytes".into()),
        Err(e) => Err(format!("internal message: {e}")),
    }
}

/// Whether a status comes from failing to connect (so the request was never sent).
pub fn never_sent(s: &Status) -> bool {
    let mut src: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(s);
    while let Some(e) = src {
        if let Some(io) = e.downcast_ref::<std::io::Error>()
            && matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionRefused | std::io::ErrorKind::AddrNotAvailable
            )
        {
            return true;
        }
        src = e.source();
    }
    let m = s.message();
    m.contains("tcp connect error") || m.contains("Connection refused")
}

pub fn to_status(e: &MetaError) -> Status {
    let code = match e {
        MetaError::NotFound(_) | MetaError::LeaseNotFound(_) => Code::NotFound,
        MetaError::AlreadyExists(_) => Code::AlreadyExists,
        MetaError::BadVersion { .. } => Code::FailedPrecondition,
        MetaError::InvalidArgument(_) => Code::InvalidArgument,
        MetaError::TooLarge(_) => Code::OutOfRange,
        MetaError::Unavailable(_) => Code::Unavailable,
        MetaError::Ambiguous(_) => Code::DeadlineExceeded,
        MetaError::Storage(_) | MetaError::Internal(_) => Code::Internal,
    };
    let mut s = Status::new(code, e.to_string());
    let detail = match e {
        MetaError::BadVersion {
            key,
            expected,
            actual,
        } => format!("{}:{expected}:{actual}:{key}", e.code()),
        MetaError::LeaseNotFound(l) => format!("{}:{l}", e.code()),
        _ => e.code().to_string(),
    };
    if let Ok(v) = detail.parse() {
        s.metadata_mut().insert(CODE_HEADER, v);
    }
    s
}

/// Maps a status back. `sent` says whether the request may have reached the server: transport
/// failures after sending make the outcome unknown.
pub fn from_status(s: &Status, sent: bool) -> MetaError {
    let msg = s.message().to_string();
    let detail = s
        .metadata()
        .get(CODE_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let Some(detail) = detail else {
        return match s.code() {
            Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded
                if sent =>
            {
                MetaError::Ambiguous(format!("{:?}: {msg}", s.code()))
            }
            Code::Unavailable => MetaError::Unavailable(msg),
            Code::InvalidArgument => MetaError::InvalidArgument(msg),
            Code::OutOfRange | Code::ResourceExhausted => MetaError::TooLarge(msg),
            _ => MetaError::Internal(format!("{:?}: {msg}", s.code())),
        };
    };
    let mut parts = detail.splitn(4, ':');
    let code: i32 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
    // The message is `Display` of the original error; strip its fixed prefix back off.
    let tail = |prefix: &str| msg.strip_prefix(prefix).unwrap_or(&msg).to_string();
    match code {
        1 => MetaError::NotFound(tail("key not found: ")),
        2 => MetaError::AlreadyExists(tail("key already exists: ")),
        3 => {
            let expected = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let actual = parts.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            let key = parts.next().unwrap_or_default().to_string();
            MetaError::BadVersion {
                key,
                expected,
                actual,
            }
        }
        4 => MetaError::LeaseNotFound(parts.next().and_then(|v| v.parse().ok()).unwrap_or(0)),
        5 => MetaError::InvalidArgument(tail("invalid argument: ")),
        6 => MetaError::TooLarge(tail("too large: ")),
        7 => MetaError::Unavailable(tail("unavailable: ")),
        8 => MetaError::Ambiguous(tail("outcome unknown: ")),
        9 => MetaError::Storage(tail("storage error: ")),
        _ => MetaError::Internal(tail("internal error: ")),
    }
}

pub fn kv_to_pb(kv: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: kv.key,
        value: kv.value,
        version: kv.version,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

pub fn kv_from_pb(kv: pb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: kv.value,
        version: kv.version,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
        lease: kv.lease,
    }
}

pub fn event_to_pb(ev: WatchEvent) -> pb::WatchEvent {
    use pb::watch_event::Event;
    let event = match ev {
        WatchEvent::Put(kv) => Event::Put(kv_to_pb(kv)),
        WatchEvent::Delete { key, mod_revision } => {
            Event::Delete(pb::Deleted { key, mod_revision })
        }
        WatchEvent::Resync => Event::Resync(true),
    };
    pb::WatchEvent { event: Some(event) }
}

pub fn event_from_pb(ev: pb::WatchEvent) -> Option<WatchEvent> {
    use pb::watch_event::Event;
    Some(match ev.event? {
        Event::Put(kv) => WatchEvent::Put(kv_from_pb(kv)),
        Event::Delete(d) => WatchEvent::Delete {
            key: d.key,
            mod_revision: d.mod_revision,
        },
        Event::Resync(_) => WatchEvent::Resync,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_frames_refuse_garbage() {
        let f = encode_internal(&(7u64, "x".to_string()));
        assert_eq!(
            decode_internal::<(u64, String)>(&f).unwrap(),
            (7, "x".to_string())
        );
        let mut longer = f.clone();
        longer.push(0);
        assert!(decode_internal::<(u64, String)>(&longer).is_err());
        let mut flipped = f.clone();
        *flipped.last_mut().unwrap() ^= 1;
        assert!(decode_internal::<(u64, String)>(&flipped).is_err());
        assert!(decode_internal::<u8>(&[4, 1]).is_err());
    }

    #[test]
    fn every_error_survives_the_wire() {
        let errs = [
            MetaError::NotFound("/a".into()),
            MetaError::AlreadyExists("/a".into()),
            MetaError::BadVersion {
                key: "/a:b".into(),
                expected: 3,
                actual: 4,
            },
            MetaError::LeaseNotFound(9),
            MetaError::InvalidArgument("x".into()),
            MetaError::TooLarge("y".into()),
            MetaError::Unavailable("z".into()),
            MetaError::Ambiguous("w".into()),
            MetaError::Storage("s".into()),
            MetaError::Internal("i".into()),
        ];
        for e in errs {
            assert_eq!(from_status(&to_status(&e), true), e);
        }
    }
}
