//! The Quire ledger client (DESIGN.md §2).

pub mod core;
pub mod error;

pub use error::{LedgerError, Result};
