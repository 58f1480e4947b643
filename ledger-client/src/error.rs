//! The ledger client's errors: one typed enum, with a stable code per kind so the gRPC ledger API
//! and the CLI can report them without parsing messages.

use quire_metadata::MetaError;
use quire_proto::StatusCode;

pub type Result<T, E = LedgerError> = std::result::Result<T, E>;

#[derive(Debug, Clone, thiserror::Error)]
pub enum LedgerError {
    /// Someone opened the ledger with recovery (or closed it): this writer may not add any more.
    /// An append that failed with this may or may not have been stored.
    #[error("ledger {0} is fenced: it was recovered or closed by another client")]
    Fenced(u64),
    #[error("ledger {0} does not exist")]
    NoSuchLedger(u64),
    #[error("entry {1} of ledger {0} does not exist")]
    NoSuchEntry(u64, i64),
    /// A read asked for entries past the last add confirmed (use an unconfirmed read for those).
    #[error("entry {entry} of ledger {ledger} is past the last confirmed entry {lac}")]
    BeyondLac { ledger: u64, entry: u64, lac: i64 },
    #[error("wrong password for ledger {0}")]
    Unauthorized(u64),
    #[error("ledger {0} is closed")]
    Closed(u64),
    #[error("not enough bookies: {0}")]
    NotEnoughBookies(String),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("entry of {size} bytes exceeds the limit of {max}")]
    TooLarge { size: usize, max: usize },
    /// Every replica of an entry failed its digest check or could not be read.
    #[error("entry {1} of ledger {0} could not be read from any replica: {2}")]
    Unreadable(u64, u64, String),
    /// Recovery could not decide where the ledger ends (too few bookies answered); retry later.
    #[error("recovery of ledger {0} incomplete: {1}")]
    RecoveryIncomplete(u64, String),
    #[error("timed out: {0}")]
    Timeout(String),
    /// A bookie answered with an error the client cannot work around.
    #[error("bookie {bookie}: {code:?}: {message}")]
    Bookie {
        bookie: String,
        code: StatusCode,
        message: String,
    },
    #[error("metadata: {0}")]
    Metadata(#[from] MetaError),
    /// The writer stopped (its task ended after an earlier error, or the client shut down).
    #[error("ledger writer stopped: {0}")]
    WriterStopped(String),
}

/// Errors compare by kind and message (what tests and the simulation need).
impl PartialEq for LedgerError {
    fn eq(&self, other: &Self) -> bool {
        self.code() == other.code() && self.to_string() == other.to_string()
    }
}
impl Eq for LedgerError {}

impl LedgerError {
    /// A stable name for the kind, used by the gRPC API (`x-quire-ledger-code`) and the CLI.
    pub fn code(&self) -> &'static str {
        match self {
            LedgerError::Fenced(_) => "FENCED",
            LedgerError::NoSuchLedger(_) => "NO_SUCH_LEDGER",
            LedgerError::NoSuchEntry(..) => "NO_SUCH_ENTRY",
            LedgerError::BeyondLac { .. } => "BEYOND_LAC",
            LedgerError::Unauthorized(_) => "UNAUTHORIZED",
            LedgerError::Closed(_) => "CLOSED",
            LedgerError::NotEnoughBookies(_) => "NOT_ENOUGH_BOOKIES",
            LedgerError::InvalidArgument(_) => "INVALID_ARGUMENT",
            LedgerError::TooLarge { .. } => "TOO_LARGE",
            LedgerError::Unreadable(..) => "UNREADABLE",
            LedgerError::RecoveryIncomplete(..) => "RECOVERY_INCOMPLETE",
            LedgerError::Timeout(_) => "TIMEOUT",
            LedgerError::Bookie { .. } => "BOOKIE_ERROR",
            LedgerError::Metadata(_) => "METADATA_ERROR",
            LedgerError::WriterStopped(_) => "WRITER_STOPPED",
        }
    }

    /// Maps a metadata error about ledger `id`: a missing key is a missing ledger.
    pub(crate) fn from_meta(id: u64, e: MetaError) -> Self {
        match e {
            MetaError::NotFound(_) => LedgerError::NoSuchLedger(id),
            e => LedgerError::Metadata(e),
        }
    }
}
