//! Streams and tables on ledgers (DESIGN.md §6): the storage services that topics and function
//! state are built on.
//!
//! - [`stream`]: a *stream* (`namespace/name`) is an unbounded log made of ledger *segments*,
//!   rolled by size, age or entry count. The segment list lives in the metadata store and changes
//!   only by compare-and-set. One writer at a time holds the stream's writer lease (an ephemeral
//!   key under its session); a new writer fences and recovers the last segment before it writes.
//!   Every record gets a contiguous offset: a segment's first offset plus the entry id.
//! - [`table`]: a *table* is a key-value store split into hash ranges. Each range is a state
//!   machine owned by one server at a time: updates are appended to the range's changelog stream
//!   (owning a range *is* holding its changelog's writer lease), applied in order to an
//!   in-memory store, and checkpointed to ledgers; a new owner restores the newest checkpoint and
//!   replays the changelog after it.
//! - [`server`]: the gRPC `StreamService` and `TableService`, served by `quire standalone` and
//!   by the `quire stream-table` role.
//! - [`client`]: the Rust client library for both services.

pub mod client;
pub mod error;
pub mod layout;
pub mod names;
pub mod server;
pub mod stream;
pub mod table;

pub use error::{Error, Result};
pub use names::Name;
