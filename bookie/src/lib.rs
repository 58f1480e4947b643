//! The Quire bookie: stores ledger entries durably and serves them.
//!
//! - [`journal`]: the write-ahead log (group commit, io_uring or plain I/O).
//! - [`storage`]: write cache, entry logs, index, read cache, checkpoints, garbage collection.
//! - [`ledger`]: per-ledger state (master key, fenced, LAC).
//! - [`bookie`]: the operations, tying the above together.
//! - [`cookie`]: the identity check of the bookie's directories.
//! - [`server`] and [`http`]: the gRPC service and the HTTP admin/metrics endpoints.

pub mod bookie;
pub mod config;
pub mod cookie;
pub mod durable;
pub mod error;
pub mod journal;
pub mod ledger;
pub mod metrics;
pub mod storage;

pub use bookie::Bookie;
pub use config::BookieConfig;
pub use error::BookieError;
