//! Errors on the wire: an [`Error`] travels as a `tonic::Status` whose metadata key [`CODE_KEY`]
//! holds [`Error::code`] and whose message holds the error's detail; structured kinds carry
//! their fields in more metadata keys, so the client rebuilds the same kind.
//!
//! `LEDGER_ERROR` and `METADATA_ERROR` come back as [`Error::Internal`] with the code in the
//! message: the client cannot rebuild the lower layer's error, and Internal is never retried, so
//! nothing that may have taken effect is sent twice.

use tonic::metadata::MetadataValue;
use tonic::{Code, Status};

use crate::error::Error;

/// The stable code name of a failed call.
pub const CODE_KEY: &str = "x-quire-code";
/// NOT_OWNER: the address of the server that owns the stream or range.
pub const OWNER_KEY: &str = "x-quire-owner";
/// NOT_OWNER: the id of that server.
pub const HOLDER_KEY: &str = "x-quire-holder";
/// NOT_OWNER: what is held (stream or range).
pub const WHAT_KEY: &str = "x-quire-what";
/// TRUNCATED: the stream's start; OUT_OF_RANGE: its end.
pub const START_KEY: &str = "x-quire-start";
pub const END_KEY: &str = "x-quire-end";
pub const OFFSET_KEY: &str = "x-quire-offset";
pub const STREAM_KEY: &str = "x-quire-stream";

fn grpc_code(e: &Error) -> Code {
    match e {
        Error::InvalidArgument(_) | Error::TooLarge(_) | Error::CrossRange(_) => {
            Code::InvalidArgument
        }
        Error::NoSuchStream(_) | Error::NoSuchTable(_) => Code::NotFound,
        Error::AlreadyExists(_) => Code::AlreadyExists,
        Error::LeaseHeld { .. } | Error::Unavailable(_) => Code::Unavailable,
        Error::Ledger(_) | Error::Metadata(_) => Code::Unavailable,
        Error::Fenced(_) | Error::WrongType(_) => Code::FailedPrecondition,
        Error::Truncated { .. } | Error::OutOfRange { .. } | Error::Overflow(_) => Code::OutOfRange,
        Error::RangeFull(_) => Code::ResourceExhausted,
        Error::Ambiguous(_) => Code::Unknown,
        Error::Timeout(_) => Code::DeadlineExceeded,
        Error::Corrupt(_) => Code::DataLoss,
        Error::Internal(_) => Code::Internal,
    }
}

fn put(s: &mut Status, key: &'static str, value: &str) {
    if let Ok(v) = MetadataValue::try_from(value) {
        s.metadata_mut().insert(key, v);
    }
}

/// The status for an error.
pub fn to_status(e: &Error) -> Status {
    let detail = match e {
        Error::InvalidArgument(m)
        | Error::TooLarge(m)
        | Error::NoSuchStream(m)
        | Error::NoSuchTable(m)
        | Error::AlreadyExists(m)
        | Error::Fenced(m)
        | Error::WrongType(m)
        | Error::Overflow(m)
        | Error::CrossRange(m)
        | Error::RangeFull(m)
        | Error::Ambiguous(m)
        | Error::Timeout(m)
        | Error::Unavailable(m)
        | Error::Corrupt(m)
        | Error::Internal(m) => m.clone(),
        other => other.to_string(),
    };
    let mut s = Status::new(grpc_code(e), detail);
    s.metadata_mut()
        .insert(CODE_KEY, MetadataValue::from_static(e.code()));
    match e {
        Error::LeaseHeld { what, holder, addr } => {
            put(&mut s, OWNER_KEY, addr);
            put(&mut s, HOLDER_KEY, holder);
            put(&mut s, WHAT_KEY, what);
        }
        Error::Truncated {
            stream,
            offset,
            start,
        } => {
            put(&mut s, STREAM_KEY, stream);
            put(&mut s, OFFSET_KEY, &offset.to_string());
            put(&mut s, START_KEY, &start.to_string());
        }
        Error::OutOfRange {
            stream,
            offset,
            end,
        } => {
            put(&mut s, STREAM_KEY, stream);
            put(&mut s, OFFSET_KEY, &offset.to_string());
            put(&mut s, END_KEY, &end.to_string());
        }
        _ => {}
    }
    s
}

/// The code name of a status, when it has one (a transport failure has none).
pub fn code_of(s: &Status) -> Option<&str> {
    s.metadata().get(CODE_KEY).and_then(|v| v.to_str().ok())
}

fn get(s: &Status, key: &str) -> String {
    s.metadata()
        .get(key)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_string()
}

fn get_u64(s: &Status, key: &str) -> u64 {
    get(s, key).parse().unwrap_or(0)
}

/// The error a status stands for. `None` when it carries no Quire code (a transport failure or
/// a status from something else), which the caller must judge itself.
pub fn from_status(s: &Status) -> Option<Error> {
    let m = s.message().to_string();
    Some(match code_of(s)? {
        "INVALID_ARGUMENT" => Error::InvalidArgument(m),
        "TOO_LARGE" => Error::TooLarge(m),
        "NO_SUCH_STREAM" => Error::NoSuchStream(m),
        "NO_SUCH_TABLE" => Error::NoSuchTable(m),
        "ALREADY_EXISTS" => Error::AlreadyExists(m),
        "NOT_OWNER" => Error::LeaseHeld {
            what: get(s, WHAT_KEY),
            holder: get(s, HOLDER_KEY),
            addr: get(s, OWNER_KEY),
        },
        "FENCED" => Error::Fenced(m),
        "TRUNCATED" => Error::Truncated {
            stream: get(s, STREAM_KEY),
            offset: get_u64(s, OFFSET_KEY),
            start: get_u64(s, START_KEY),
        },
        "OUT_OF_RANGE" => Error::OutOfRange {
            stream: get(s, STREAM_KEY),
            offset: get_u64(s, OFFSET_KEY),
            end: get_u64(s, END_KEY),
        },
        "WRONG_TYPE" => Error::WrongType(m),
        "OVERFLOW" => Error::Overflow(m),
        "CROSS_RANGE" => Error::CrossRange(m),
        "RANGE_FULL" => Error::RangeFull(m),
        "AMBIGUOUS" => Error::Ambiguous(m),
        "TIMEOUT" => Error::Timeout(m),
        "UNAVAILABLE" => Error::Unavailable(m),
        "CORRUPT" => Error::Corrupt(m),
        "INTERNAL" => Error::Internal(m),
        code => Error::Internal(format!("{code}: {m}")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_round_trip() {
        let all = [
            Error::InvalidArgument("a".into()),
            Error::TooLarge("b".into()),
            Error::NoSuchStream("ns/s".into()),
            Error::NoSuchTable("ns/t".into()),
            Error::AlreadyExists("x".into()),
            Error::LeaseHeld {
                what: "stream ns/s".into(),
                holder: "st-1".into(),
                addr: "127.0.0.1:4181".into(),
            },
            Error::Fenced("f".into()),
            Error::Truncated {
                stream: "ns/s".into(),
                offset: 3,
                start: 10,
            },
            Error::OutOfRange {
                stream: "ns/s".into(),
                offset: 30,
                end: 10,
            },
            Error::WrongType("w".into()),
            Error::Overflow("o".into()),
            Error::CrossRange("c".into()),
            Error::RangeFull("r".into()),
            Error::Ambiguous("m".into()),
            Error::Timeout("t".into()),
            Error::Unavailable("u".into()),
            Error::Corrupt("c".into()),
            Error::Internal("i".into()),
        ];
        for e in all {
            let s = to_status(&e);
            assert_eq!(code_of(&s), Some(e.code()));
            assert_eq!(from_status(&s), Some(e.clone()), "{e}");
        }
        let s = to_status(&Error::Metadata(quire_metadata::MetaError::Unavailable(
            "down".into(),
        )));
        assert_eq!(s.code(), Code::Unavailable);
        let back = from_status(&s).unwrap();
        assert!(matches!(back, Error::Internal(ref m) if m.starts_with("METADATA_ERROR")));
        assert!(!back.is_retryable());
        assert_eq!(from_status(&Status::unavailable("transport")), None);
    }
}
