//! Errors on the wire: every failed call is a `tonic::Status` whose metadata key
//! [`CODE_KEY`] names the kind (a [`LedgerError::code`], or one of the gateway's own codes
//! below), with a matching gRPC code. The table is in `ledger.proto`.

use quire_ledger_client::LedgerError;
use quire_metadata::MetaError;
use tonic::{Code, Status};

/// Metadata key carrying the stable code name of a failed call.
pub const CODE_KEY: &str = "x-quire-ledger-code";

/// This gateway does not hold the ledger open for writing.
pub const NOT_WRITER: &str = "NOT_WRITER";
/// The gateway holds its maximum of open writers.
pub const TOO_MANY_WRITERS: &str = "TOO_MANY_WRITERS";
/// Too many streams at once.
pub const TOO_MANY_REQUESTS: &str = "TOO_MANY_REQUESTS";
/// The gateway is stopping.
pub const SHUTTING_DOWN: &str = "SHUTTING_DOWN";

/// The gRPC code that goes with a code name.
pub fn grpc_code(code: &str) -> Code {
    match code {
        "NO_SUCH_LEDGER" | "NO_SUCH_ENTRY" => Code::NotFound,
        "BEYOND_LAC" => Code::OutOfRange,
        "FENCED" | "CLOSED" | NOT_WRITER => Code::FailedPrecondition,
        "UNAUTHORIZED" => Code::PermissionDenied,
        "INVALID_ARGUMENT" | "TOO_LARGE" => Code::InvalidArgument,
        TOO_MANY_WRITERS | TOO_MANY_REQUESTS => Code::ResourceExhausted,
        "NOT_ENOUGH_BOOKIES"
        | "RECOVERY_INCOMPLETE"
        | "BOOKIE_ERROR"
        | "METADATA_ERROR"
        | SHUTTING_DOWN => Code::Unavailable,
        "TIMEOUT" => Code::DeadlineExceeded,
        "UNREADABLE" => Code::DataLoss,
        "WRITER_STOPPED" => Code::Aborted,
        _ => Code::Internal,
    }
}

/// A status with a code name and message.
pub fn status(code: &'static str, message: impl Into<String>) -> Status {
    let mut s = Status::new(grpc_code(code), message);
    s.metadata_mut()
        .insert(CODE_KEY, tonic::metadata::MetadataValue::from_static(code));
    s
}

/// The status for a ledger client error.
pub fn to_status(e: &LedgerError) -> Status {
    // A metadata error that is about bad input is the caller's, not the store's, fault.
    if let LedgerError::Metadata(m) = e {
        match m {
            MetaError::InvalidArgument(_) => return status("INVALID_ARGUMENT", e.to_string()),
            MetaError::TooLarge(_) => return status("TOO_LARGE", e.to_string()),
            _ => {}
        }
    }
    status(e.code(), e.to_string())
}

pub(crate) fn invalid(message: impl Into<String>) -> Status {
    status("INVALID_ARGUMENT", message)
}

/// The code name of a failed call (None for a status that has none, e.g. a transport error).
pub fn code_of(s: &Status) -> Option<&str> {
    s.metadata().get(CODE_KEY).and_then(|v| v.to_str().ok())
}

/// Why the gateway could not serve.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("I/O: {0}")]
    Io(#[from] std::io::Error),
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip() {
        for (e, grpc) in [
            (LedgerError::Fenced(1), Code::FailedPrecondition),
            (LedgerError::Closed(1), Code::FailedPrecondition),
            (LedgerError::NoSuchLedger(1), Code::NotFound),
            (LedgerError::Unauthorized(1), Code::PermissionDenied),
            (
                LedgerError::TooLarge { size: 10, max: 5 },
                Code::InvalidArgument,
            ),
            (LedgerError::NotEnoughBookies("x".into()), Code::Unavailable),
        ] {
            let s = to_status(&e);
            assert_eq!(s.code(), grpc, "{e}");
            assert_eq!(code_of(&s), Some(e.code()));
        }
        let s = status(TOO_MANY_WRITERS, "full");
        assert_eq!(s.code(), Code::ResourceExhausted);
        assert_eq!(code_of(&s), Some(TOO_MANY_WRITERS));
    }
}
