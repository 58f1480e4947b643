//! Quire's metadata service (DESIGN.md §4): one versioned key-value contract
//! ([`store::MetadataStore`]) with several backends, and typed layers above it.
//!
//! Backends:
//! - in-memory and embedded (`file:///path`): a single-voter raft node in this process, its log
//!   and snapshots in memory or in a directory (so the embedded store is crash-safe the same way
//!   the cluster is);
//! - raft (`quire://host:port,...`): `quire metadata` servers forming an openraft cluster, reached
//!   through [`client::RemoteStore`];
//! - etcd (`etcd://host:port,...`, cargo feature `etcd`): the same contract over etcd v3.

pub mod bookies;
pub mod client;
#[cfg(feature = "etcd")]
pub mod etcd;
pub mod layout;
pub mod ledgers;
pub mod local;
pub mod raft;
pub mod replication;
pub mod server;
pub mod session;
pub mod state;
pub mod store;
#[cfg(any(test, feature = "testkit"))]
pub mod testkit;
pub mod uri;
pub mod watch;
pub mod wire;

pub use store::{
    DynStore, KeyValue, LeaseId, ListPage, MetaError, MetadataStore, Watch, WatchEvent, WatchTarget,
};
pub use uri::{MetadataUri, connect};
