//! Test tools shared by every metadata backend: a conformance suite for the
//! [`MetadataStore`](crate::store::MetadataStore) contract and a linearizability checker for
//! histories of operations on one key. Compiled for tests and with the `testkit` cargo feature.

pub mod conformance;
pub mod linearizability;
