//! The bookie's error type. Each variant says what the caller should do, and maps to exactly one
//! stable wire code.

use quire_proto::StatusCode;

#[derive(Debug, thiserror::Error)]
pub enum BookieError {
    #[error("no such ledger {0}")]
    NoSuchLedger(u64),
    #[error("no such entry {1} in ledger {0}")]
    NoSuchEntry(u64, i64),
    #[error("ledger {0} is fenced")]
    Fenced(u64),
    #[error("wrong master key for ledger {0}")]
    Unauthorized(u64),
    #[error("bookie is read-only")]
    ReadOnly,
    #[error("entry of {size} bytes exceeds the limit of {max} bytes")]
    TooLarge { size: usize, max: usize },
    #[error("bad request: {0}")]
    BadRequest(String),
    #[error("too many requests: {0}")]
    TooManyRequests(&'static str),
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("corruption: {0}")]
    Corruption(String),
    #[error("bookie is shutting down")]
    ShuttingDown,
    /// The bookie cannot start on this configuration or these directories.
    #[error("{0}")]
    Startup(String),
}

impl BookieError {
    pub fn code(&self) -> StatusCode {
        match self {
            Self::NoSuchLedger(_) => StatusCode::NoSuchLedger,
            Self::NoSuchEntry(..) => StatusCode::NoSuchEntry,
            Self::Fenced(_) => StatusCode::Fenced,
            Self::Unauthorized(_) => StatusCode::Unauthorized,
            Self::ReadOnly => StatusCode::ReadOnly,
            Self::TooLarge { .. } => StatusCode::TooLarge,
            Self::BadRequest(_) => StatusCode::BadRequest,
            Self::TooManyRequests(_) => StatusCode::TooManyRequests,
            Self::Io(_) => StatusCode::IoError,
            Self::Corruption(_) => StatusCode::Corruption,
            Self::ShuttingDown | Self::Startup(_) => StatusCode::ShuttingDown,
        }
    }

    pub fn to_status(&self) -> tonic::Status {
        quire_proto::status::to_status(self.code(), self.to_string())
    }
}

pub type Result<T, E = BookieError> = std::result::Result<T, E>;
