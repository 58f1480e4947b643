//! One error type for streams, tables, the services and the client. Each kind has a stable code
//! name ([`Error::code`]) that travels on the wire in the `x-quire-code` metadata key, so a
//! client gets back the same kind the server saw.

use quire_ledger_client::LedgerError;
use quire_metadata::MetaError;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("no such stream: {0}")]
    NoSuchStream(String),
    #[error("no such table: {0}")]
    NoSuchTable(String),
    #[error("already exists: {0}")]
    AlreadyExists(String),
    /// Another live writer (or range owner) holds the lease; `addr` is where it serves.
    #[error("{what} is held by {holder} at {addr}")]
    LeaseHeld {
        what: String,
        holder: String,
        addr: String,
    },
    /// This writer or owner lost its lease (its session expired, or another took over and
    /// fenced it). An append that failed with this may or may not be stored.
    #[error("fenced: {0}")]
    Fenced(String),
    /// The offset is below the stream's first retained offset.
    #[error("offset {offset} of {stream} was truncated; the stream starts at {start}")]
    Truncated {
        stream: String,
        offset: u64,
        start: u64,
    },
    /// The offset is past the end of the stream (reads may wait for it, not skip to it).
    #[error("offset {offset} of {stream} is past its end {end}")]
    OutOfRange {
        stream: String,
        offset: u64,
        end: u64,
    },
    /// An increment on a key holding bytes, or a number read as bytes.
    #[error("wrong type: {0}")]
    WrongType(String),
    #[error("overflow: {0}")]
    Overflow(String),
    /// A transaction whose keys fall in more than one range of the table.
    #[error("keys in more than one range: {0}")]
    CrossRange(String),
    /// The table range is at its memory limit; deletes are still accepted.
    #[error("range full: {0}")]
    RangeFull(String),
    /// The request may or may not have taken effect (the writer failed or a timeout hit after
    /// it was sent).
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// Transient: try again (a range being restored, a server starting or stopping).
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// Stored data that does not decode (a bad magic, version or checksum).
    #[error("corrupt: {0}")]
    Corrupt(String),
    #[error("ledger: {0}")]
    Ledger(#[from] LedgerError),
    #[error("metadata: {0}")]
    Metadata(#[from] MetaError),
    #[error("internal: {0}")]
    Internal(String),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable code name of this kind.
    pub fn code(&self) -> &'static str {
        match self {
            Error::InvalidArgument(_) => "INVALID_ARGUMENT",
            Error::TooLarge(_) => "TOO_LARGE",
            Error::NoSuchStream(_) => "NO_SUCH_STREAM",
            Error::NoSuchTable(_) => "NO_SUCH_TABLE",
            Error::AlreadyExists(_) => "ALREADY_EXISTS",
            Error::LeaseHeld { .. } => "NOT_OWNER",
            Error::Fenced(_) => "FENCED",
            Error::Truncated { .. } => "TRUNCATED",
            Error::OutOfRange { .. } => "OUT_OF_RANGE",
            Error::WrongType(_) => "WRONG_TYPE",
            Error::Overflow(_) => "OVERFLOW",
            Error::CrossRange(_) => "CROSS_RANGE",
            Error::RangeFull(_) => "RANGE_FULL",
            Error::Ambiguous(_) => "AMBIGUOUS",
            Error::Timeout(_) => "TIMEOUT",
            Error::Unavailable(_) => "UNAVAILABLE",
            Error::Corrupt(_) => "CORRUPT",
            Error::Ledger(_) => "LEDGER_ERROR",
            Error::Metadata(_) => "METADATA_ERROR",
            Error::Internal(_) => "INTERNAL",
        }
    }

    /// Whether the request certainly did not take effect and may be sent again (to the same or
    /// another server).
    pub fn is_retryable(&self) -> bool {
        match self {
            Error::LeaseHeld { .. } | Error::Unavailable(_) => true,
            Error::Metadata(m) => m.is_retryable(),
            _ => false,
        }
    }
}
