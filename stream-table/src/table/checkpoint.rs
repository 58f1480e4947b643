//! Checkpoints of a range: a snapshot of the committed store written to its own ledger, and the
//! pointer to the newest one in the metadata store.
//!
//! A checkpoint ledger holds a header entry, then the entries in key order in chunks of about
//! 1 MiB (formats in [`super::codec`]). The pointer at `layout::checkpoint_key(table, r)`
//! (magic `quire-checkpoint`, version 1) names the ledger, the snapshot's revision and the first
//! changelog offset not in it; it changes only by compare-and-set, and never to an older
//! revision, so a slow or stale owner cannot move it back.
//!
//! Order of a checkpoint, each step safe to crash after:
//! 1. write and close the new ledger (a crash leaves an orphan ledger nobody points to);
//! 2. CAS the pointer (from now on restores use it);
//! 3. delete the previous checkpoint ledger (best effort: a failure leaves an orphan);
//! 4. truncate the changelog before the snapshot's offset (whole segments only; best effort,
//!    the next checkpoint truncates again).
//!
//! Known limit: an owner that has lost its lease without noticing yet could still run steps 3-4
//! while a new owner restores from the pointer it had read; the new owner's read then fails
//! (missing ledger or truncated changelog) and its open is retried, reading the newer pointer.

use std::collections::BTreeMap;

use bytes::Bytes;
use quire_ledger_client::{Client, CreateOptions};
use quire_metadata::{DynStore, MetaError, layout as meta_layout};
use serde::{Deserialize, Serialize};

use super::codec::{self, CheckpointHeader};
use super::state::Store;
use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;
use crate::stream::StreamConfig;

pub const POINTER_MAGIC: &str = "quire-checkpoint";
pub const POINTER_VERSION: u32 = 1;
/// Checkpoint entries read per ledger read (each up to about 1 MiB).
const READ_BATCH: u64 = 16;

/// The pointer to a range's newest checkpoint.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The checkpoint ledger.
    pub ledger: u64,
    /// First changelog offset not in the checkpoint (replay starts here).
    pub offset: u64,
    /// The range revision of the snapshot.
    pub revision: u64,
    pub keys: u64,
    pub bytes: u64,
    /// Milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// The table incarnation the snapshot is of: its `TableMeta::created_ms` (0 in pointers
    /// written before it was recorded). A table deleted and created again under the same name is
    /// another incarnation, and never takes a checkpoint of the old one.
    #[serde(default)]
    pub table_created_ms: u64,
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Reads the pointer with its metadata version.
pub async fn read_pointer(
    store: &DynStore,
    table: &Name,
    range: u32,
) -> Result<Option<(Checkpoint, u64)>> {
    let key = layout::checkpoint_key(table, range);
    let Some(kv) = store.get(&key).await? else {
        return Ok(None);
    };
    let cp = meta_layout::decode(POINTER_MAGIC, POINTER_VERSION, &key, &kv.value)
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    Ok(Some((cp, kv.version)))
}

/// Writes a snapshot to a new, closed ledger; returns the pointer to store for it.
pub async fn write_ledger(
    client: &Client,
    changelog: &StreamConfig,
    table: &Name,
    range: u32,
    snapshot: &Store,
    offset: u64,
    table_created_ms: u64,
) -> Result<Checkpoint> {
    let mut custom = BTreeMap::new();
    custom.insert("quire.table".to_string(), table.path());
    custom.insert("quire.range".to_string(), range.to_string());
    custom.insert(
        "quire.checkpoint".to_string(),
        snapshot.revision().to_string(),
    );
    let writer = client
        .create(CreateOptions {
            ensemble: changelog.ensemble,
            write_quorum: changelog.write_quorum,
            ack_quorum: changelog.ack_quorum,
            password: Vec::new(),
            custom,
            ..CreateOptions::default()
        })
        .await?;
    let ledger = writer.id();
    let chunks: Vec<Vec<_>> = codec::chunks(snapshot.entries()).collect();
    let result = async {
        let header = CheckpointHeader {
            table: table.path(),
            range,
            revision: snapshot.revision(),
            offset,
            keys: snapshot.keys(),
            bytes: snapshot.bytes(),
            chunks: chunks.len() as u64,
        };
        let mut acks = Vec::with_capacity(chunks.len() + 1);
        acks.push(writer.append_async(codec::encode_header(&header)).await?);
        for c in &chunks {
            acks.push(writer.append_async(codec::encode_chunk(c)).await?);
        }
        for a in acks {
            a.await?;
        }
        writer.close().await?;
        Ok::<_, Error>(())
    }
    .await;
    if let Err(e) = result {
        discard(client, ledger).await;
        return Err(e);
    }
    Ok(Checkpoint {
        ledger,
        offset,
        revision: snapshot.revision(),
        keys: snapshot.keys(),
        bytes: snapshot.bytes(),
        created_ms: now_ms(),
        table_created_ms,
    })
}

/// Deletes a checkpoint ledger nobody points to (best effort).
pub async fn discard(client: &Client, ledger: u64) {
    if let Err(e) = client.delete(ledger).await {
        tracing::warn!(ledger_id = ledger, error = %e, "could not delete a checkpoint ledger");
    }
}

/// Points the range at `cp` unless the pointer already names a newer revision. Returns the
/// pointer that is current afterwards and the ledger it replaced (to delete).
pub async fn publish(
    store: &DynStore,
    table: &Name,
    range: u32,
    cp: &Checkpoint,
) -> Result<(Checkpoint, Option<u64>)> {
    // Only while the checkpoint's table incarnation exists: an owner left over from a deleted
    // table must not leave a pointer that a table created again under the same name would pick
    // up, nor replace that table's own.
    check_incarnation(store, table, cp.table_created_ms).await?;
    let key = layout::checkpoint_key(table, range);
    let value = meta_layout::encode(POINTER_MAGIC, POINTER_VERSION, cp);
    match read_pointer(store, table, range).await? {
        Some((cur, _))
            if cur.table_created_ms == cp.table_created_ms
                && (cur.revision > cp.revision || cur.offset > cp.offset) =>
        {
            Ok((cur, None))
        }
        // Older, or left over from another incarnation (whatever its revision).
        Some((cur, version)) => {
            store.compare_and_set(&key, value, version).await?;
            Ok((cp.clone(), (cur.ledger != cp.ledger).then_some(cur.ledger)))
        }
        None => {
            store.create(&key, value, None).await?;
            Ok((cp.clone(), None))
        }
    }
}

/// Refuses with `NoSuchTable` unless the table exists as the incarnation created at
/// `created_ms`.
async fn check_incarnation(store: &DynStore, table: &Name, created_ms: u64) -> Result<()> {
    match store.get(&layout::table_key(table)).await? {
        Some(kv) if super::decode_meta(&kv)?.created_ms == created_ms => Ok(()),
        _ => Err(Error::NoSuchTable(format!(
            "{table} (the incarnation created at {created_ms} ms)"
        ))),
    }
}

/// Loads the checkpoint `cp` points to, checking it against the pointer.
pub async fn load(client: &Client, table: &Name, range: u32, cp: &Checkpoint) -> Result<Store> {
    let reader = client.open(cp.ledger, b"").await?;
    if !reader.is_closed() {
        return Err(Error::Corrupt(format!(
            "checkpoint ledger {} of {table} range {range} is not closed",
            cp.ledger
        )));
    }
    let last = reader.lac();
    let bad = |why: String| {
        Error::Corrupt(format!(
            "checkpoint ledger {} of {table} range {range}: {why}",
            cp.ledger
        ))
    };
    if last < 0 {
        return Err(bad("empty".into()));
    }
    let last = last as u64;
    let first = reader.read(0, 0).await?;
    let header = codec::decode_header(
        &first
            .first()
            .ok_or_else(|| bad("no header entry".into()))?
            .payload,
    )?;
    if header.table != table.path()
        || header.range != range
        || header.revision != cp.revision
        || header.offset != cp.offset
        || header.chunks != last
    {
        return Err(bad(format!(
            "header {header:?} does not match the pointer {cp:?} and {} chunks",
            last
        )));
    }
    let mut entries: Vec<(Bytes, super::state::Entry)> = Vec::new();
    let mut next = 1;
    while next <= last {
        let to = (next + READ_BATCH - 1).min(last);
        for e in reader.read(next, to).await? {
            if e.entry_id != next {
                return Err(bad(format!(
                    "entry {} where {next} was expected",
                    e.entry_id
                )));
            }
            let chunk = codec::decode_chunk(&e.payload)?;
            if let (Some((prev, _)), Some((first, _))) = (entries.last(), chunk.first())
                && first <= prev
            {
                return Err(bad("keys out of order".into()));
            }
            entries.extend(chunk);
            next += 1;
        }
    }
    let store = Store::from_entries(entries, cp.revision)?;
    if store.keys() != header.keys || store.bytes() != header.bytes {
        return Err(bad(format!(
            "{} keys and {} bytes, the header says {} and {}",
            store.keys(),
            store.bytes(),
            header.keys,
            header.bytes
        )));
    }
    Ok(store)
}

/// Removes a range's checkpoint pointer and ledger (table deletion).
pub async fn remove(client: &Client, store: &DynStore, table: &Name, range: u32) -> Result<()> {
    let Some((cp, version)) = read_pointer(store, table, range).await? else {
        return Ok(());
    };
    match store
        .delete(&layout::checkpoint_key(table, range), Some(version))
        .await
    {
        Ok(()) | Err(MetaError::NotFound(_)) => {}
        Err(e) => return Err(e.into()),
    }
    discard(client, cp.ledger).await;
    Ok(())
}
