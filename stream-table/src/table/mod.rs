//! Tables: key-value stores split into hash ranges, each range a state machine fed by its own
//! changelog stream and checkpointed to ledgers (DESIGN.md §6; BookKeeper's table service,
//! REFERENCE.md §5).
//!
//! Layout: [`TableMeta`] at `layout::table_key` (magic `quire-table`, version 1); range `r`'s
//! changelog is the stream `Name::changelog(table, r)` and its newest checkpoint pointer is at
//! `layout::checkpoint_key(table, r)` ([`checkpoint`]). A key belongs to range
//! [`range_of`]`(key, ranges)`; the range count is fixed at creation.
//!
//! Decisions (why):
//! - **Owning a range is holding its changelog's writer lease.** [`Tables::open_range`] takes the
//!   lease (`LeaseHeld` tells the caller whom to redirect to), which also fences the previous
//!   owner's last segment, so everything in the changelog afterwards is final. Only then does it
//!   restore the newest checkpoint and replay the changelog after it.
//! - **Effects, not commands, are logged** ([`state`]): the single sequencer of a range
//!   evaluates each command against committed state overlaid with the pending (sent, not yet
//!   acknowledged) effects, and logs the resolved final values with the command's revision. Replay
//!   never re-evaluates, a transaction is one record (all or nothing), and each record carries its
//!   revision so a replay that skips or repeats is caught as corruption.
//! - **Pipelined, reply after apply** ([`range`]): the sequencer does not wait for one record's
//!   acknowledgement before evaluating the next; acknowledgements arrive in order, and each is
//!   applied to the committed store before its caller gets the reply. Reads (get, scan) see
//!   committed state only, so they never show a write that could still be lost, and a caller
//!   sees its own acknowledged writes.
//! - **A changelog failure fails the range.** Its pending commands answer `Ambiguous` (they may
//!   or may not be in the log), everything later answers `Unavailable`, and the server reopens
//!   the range (restore + replay) on the next request; reopening needs no special repair.
//! - **Read-only outcomes** (a failed expectation, a transaction that wrote nothing) are not
//!   logged and take no revision, but still answer only after the writes sequenced before them,
//!   so they never reveal unacknowledged state.
//! - **Memory is the limit** (`max_bytes`, key + value + 64 bytes of overhead per key): the state
//!   lives in memory (an ordered map) like etcd's; puts and increments that would grow a full
//!   range are refused with `RangeFull`, deletes always work.
//! - **Checkpoints** copy the map structure (keys and values are shared `Bytes`) under a short
//!   read lock, then write it out in the background; see [`checkpoint`] for the order of steps.
//! - **Scans are per range**: keys are hashed to ranges, so a table-wide ordered scan merges the
//!   ranges' scans (the service's job).
//! - **Transactions stay in one range** (`CrossRange` otherwise), so they are one record of one
//!   changelog; operations in a branch apply in order, each seeing the previous ones.

pub mod checkpoint;
pub mod codec;
pub mod model;
pub mod range;
pub mod state;

use std::sync::Arc;
use std::time::Duration;

use quire_ledger_client::Client;
use quire_metadata::session::Session;
use quire_metadata::{DynStore, MetaError, layout as meta_layout};
use serde::{Deserialize, Serialize};

pub use checkpoint::Checkpoint;
pub use model::{
    Compare, CompareOp, CompareTarget, DeleteResult, Expect, KEY_MAX, KeyValue, OpResult,
    PutResult, RECORD_MAX, SCAN_BYTES_MAX, SCAN_LIMIT_MAX, TXN_OPS_MAX, Txn, TxnOp, TxnResult,
    VALUE_MAX, Value, range_of,
};
pub use range::{Range, RangeStats};

use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;
use crate::stream::{StreamConfig, Streams, WriterInfo};

pub const META_MAGIC: &str = "quire-table";
pub const META_VERSION: u32 = 1;
/// Most ranges a table may have.
pub const RANGES_MAX: u32 = 256;

/// Durations travel as milliseconds.
mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// How a table is split, logged, checkpointed and bounded.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct TableConfig {
    /// Hash ranges (1 to 256), fixed at creation. Default: 4.
    pub ranges: u32,
    /// The settings of each range's changelog stream. Default: `StreamConfig::changelog()`.
    pub changelog: StreamConfig,
    /// A range is checkpointed at least this often while it changes. Default: 5 min.
    #[serde(rename = "checkpoint_interval_ms", with = "ms")]
    pub checkpoint_interval: Duration,
    /// A range is checkpointed after this many updates. Default: 100 000.
    pub checkpoint_every: u64,
    /// Memory one range may use (keys, values, 64 bytes per key). Default: 1 GiB.
    pub max_bytes: u64,
}

impl Default for TableConfig {
    fn default() -> Self {
        TableConfig {
            ranges: 4,
            changelog: StreamConfig::changelog(),
            checkpoint_interval: Duration::from_secs(300),
            checkpoint_every: 100_000,
            max_bytes: 1 << 30,
        }
    }
}

impl TableConfig {
    pub fn check(&self) -> Result<()> {
        if !(1..=RANGES_MAX).contains(&self.ranges) {
            return Err(Error::InvalidArgument(format!(
                "ranges must be 1 to {RANGES_MAX}, got {}",
                self.ranges
            )));
        }
        self.changelog.check()?;
        if self.checkpoint_interval < Duration::from_secs(1) {
            return Err(Error::InvalidArgument(
                "checkpoint_interval must be at least 1 s".into(),
            ));
        }
        if self.checkpoint_every == 0 {
            return Err(Error::InvalidArgument(
                "checkpoint_every must be above 0".into(),
            ));
        }
        if self.max_bytes == 0 {
            return Err(Error::InvalidArgument("max_bytes must be above 0".into()));
        }
        Ok(())
    }
}

/// A table's metadata record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableMeta {
    pub name: Name,
    pub config: TableConfig,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
}

/// A table's record as the metadata store holds it.
pub(crate) fn decode_meta(kv: &quire_metadata::KeyValue) -> Result<TableMeta> {
    meta_layout::decode(META_MAGIC, META_VERSION, &kv.key, &kv.value)
        .map_err(|e| Error::Corrupt(e.to_string()))
}

/// Creates, inspects and deletes tables, and opens their ranges. Cheap to clone.
#[derive(Clone)]
pub struct Tables {
    streams: Streams,
    store: DynStore,
    client: Client,
}

impl Tables {
    pub fn new(streams: Streams) -> Self {
        let store = streams.store().clone();
        let client = streams.client().clone();
        Tables {
            streams,
            store,
            client,
        }
    }

    pub fn streams(&self) -> &Streams {
        &self.streams
    }

    /// Creates the table record, then the ranges' changelog streams. A create interrupted
    /// between the two is completed by creating again (`AlreadyExists` comes back, and
    /// [`Tables::open_range`] creates a missing changelog).
    pub async fn create(&self, name: &Name, cfg: TableConfig) -> Result<TableMeta> {
        cfg.check()?;
        if self.store.get(&layout::table_key(name)).await?.is_none() {
            self.remove_leftovers(name).await?;
        }
        let meta = TableMeta {
            name: name.clone(),
            config: cfg,
            created_ms: checkpoint::now_ms(),
        };
        let value = meta_layout::encode(META_MAGIC, META_VERSION, &meta);
        match self
            .store
            .create(&layout::table_key(name), value, None)
            .await
        {
            Ok(_) => {}
            Err(MetaError::AlreadyExists(_)) => {
                return Err(Error::AlreadyExists(format!("table {name}")));
            }
            Err(e) => return Err(e.into()),
        }
        for r in 0..meta.config.ranges {
            self.ensure_changelog(name, r, &meta.config).await?;
        }
        tracing::info!(table = %name, ranges = meta.config.ranges, "table created");
        Ok(meta)
    }

    /// Removes what a deleted table of this name may have left behind (an interrupted delete, or
    /// an owner that was still running): checkpoint pointers and changelog streams. Deleting a
    /// changelog fences its old writer. Without this, a table created again under the name
    /// would restore the old table's state.
    async fn remove_leftovers(&self, name: &Name) -> Result<()> {
        let pointers = format!("{}{}/", layout::TABLE_CHECKPOINTS, name.path());
        for kv in quire_metadata::store::list_all(&*self.store, &pointers).await? {
            if let Some(r) = kv
                .key
                .strip_prefix(&pointers)
                .and_then(|t| t.parse::<u32>().ok())
            {
                tracing::warn!(table = %name, range = r, "removing a checkpoint left by a deleted table");
                checkpoint::remove(&self.client, &self.store, name, r).await?;
            }
        }
        let prefix = format!(
            "{}{}/{}.{}.",
            layout::STREAMS,
            crate::names::INTERNAL_NAMESPACE,
            name.namespace,
            name.name
        );
        let kvs = quire_metadata::store::list_all(&*self.store, &prefix).await?;
        for kv in kvs {
            let Some(tail) = kv.key.strip_prefix(&prefix) else {
                continue;
            };
            // Only this table's changelogs: `<ns>.<name>.<range>`, not `<ns>.<name>.x.<range>`.
            let Ok(r) = tail.parse::<u32>() else { continue };
            tracing::warn!(table = %name, range = r, "removing a changelog left by a deleted table");
            match self.streams.delete(&Name::changelog(name, r)).await {
                Ok(()) | Err(Error::NoSuchStream(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    async fn ensure_changelog(&self, name: &Name, r: u32, cfg: &TableConfig) -> Result<()> {
        match self
            .streams
            .create(&Name::changelog(name, r), cfg.changelog.clone())
            .await
        {
            Ok(_) | Err(Error::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn info(&self, name: &Name) -> Result<TableMeta> {
        let key = layout::table_key(name);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or_else(|| Error::NoSuchTable(name.to_string()))?;
        decode_meta(&kv)
    }

    /// The tables of `namespace`, in name order.
    pub async fn list(&self, namespace: &str) -> Result<Vec<Name>> {
        let prefix = format!("{}{namespace}/", layout::TABLES);
        let kvs = quire_metadata::store::list_all(&*self.store, &prefix).await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| layout::name_of(layout::TABLES, &kv.key))
            .filter(|n| n.namespace == namespace)
            .collect())
    }

    /// Deletes the table record first (no range opens after that), then each range's checkpoint
    /// and changelog (whose deletion fences a live owner). Leftovers of an interrupted delete are
    /// orphans, not a table.
    pub async fn delete(&self, name: &Name) -> Result<()> {
        let meta = self.info(name).await?;
        match self.store.delete(&layout::table_key(name), None).await {
            Ok(()) => {}
            Err(MetaError::NotFound(_)) => return Err(Error::NoSuchTable(name.to_string())),
            Err(e) => return Err(e.into()),
        }
        for r in 0..meta.config.ranges {
            checkpoint::remove(&self.client, &self.store, name, r).await?;
            match self.streams.delete(&Name::changelog(name, r)).await {
                Ok(()) | Err(Error::NoSuchStream(_)) => {}
                Err(e) => return Err(e),
            }
        }
        tracing::info!(table = %name, "table deleted");
        Ok(())
    }

    /// Becomes the owner of one range: opens its changelog writer (lease; `LeaseHeld` -> the
    /// caller redirects), restores the newest checkpoint, replays the changelog after it.
    pub async fn open_range(
        &self,
        name: &Name,
        range: u32,
        session: &Arc<Session>,
        me: WriterInfo,
    ) -> Result<Range> {
        let meta = self.info(name).await?;
        if range >= meta.config.ranges {
            return Err(Error::InvalidArgument(format!(
                "table {name} has {} ranges, no range {range}",
                meta.config.ranges
            )));
        }
        self.ensure_changelog(name, range, &meta.config).await?;
        range::Range::open(self.clone(), meta, range, session.clone(), me).await
    }

    pub(crate) fn store(&self) -> &DynStore {
        &self.store
    }

    pub(crate) fn client(&self) -> &Client {
        &self.client
    }
}
