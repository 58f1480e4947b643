//! Autorecovery errors.

use quire_ledger_client::LedgerError;
use quire_metadata::MetaError;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error("metadata: {0}")]
    Metadata(#[from] MetaError),
    #[error("unknown bookie {0:?}: not registered and named by no ledger")]
    UnknownBookie(String),
    /// Too few bookies would be left to hold the replicas.
    #[error("not enough bookies: {0}")]
    NotEnoughBookies(String),
    #[error("invalid configuration: {0}")]
    InvalidConfig(String),
    #[error("timed out: {0}")]
    Timeout(String),
}
