//! The Quire ledger client (DESIGN.md §2): creates ledgers on ensembles of bookies, writes
//! entries to quorums with in-order acknowledgement, replaces failed bookies (ensemble change),
//! fences and recovers ledgers, and reads them (up to the LAC, unconfirmed, tailing).
//!
//! - [`core`]: the protocol logic as I/O-free state machines (writer, recovery, quorum rules),
//!   driven by a seeded simulation test as well as by the real drivers below.
//! - [`client`]: configuration, create/open/recover/delete/list.
//! - [`admin`]: fragments, fragment copies and bookie replacement (autorecovery's steps).
//! - [`check`]: the replica check (missing, corrupt, unreachable copies).
//! - [`writer`]: the write handle and its driver task.
//! - [`reader`]: reads, LAC, long polls, tailing.
//! - [`recover`]: the recovery driver.
//! - [`placement`]: ensemble placement (random, zone-aware).
//! - [`pool`]: connections and add streams to bookies.

pub mod admin;
pub mod check;
pub mod client;
pub mod core;
pub mod error;
pub mod placement;
pub mod pool;
pub mod reader;
mod recover;
pub mod writer;

pub use client::{Client, ClientConfig, CreateOptions};
pub use error::{LedgerError, Result};
pub use quire_metadata::ledgers::{DigestType, LedgerMetadata, LedgerState, Versioned};
pub use reader::{Entry, LedgerReader};
pub use writer::{AppendFuture, LedgerWriter};
