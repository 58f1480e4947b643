//! Streams: named, unbounded logs made of ledger segments (DESIGN.md §6).
//!
//! A stream's metadata ([`StreamMeta`], at `layout::stream_key`) holds its config, its segment
//! list and its first retained offset, and changes only by compare-and-set. A record's offset is
//! its segment's `start_offset` plus its entry id, so offsets are contiguous across segments.
//!
//! Decisions:
//! - **One writer, by lease and by fencing.** A writer holds an ephemeral key (the lease, under
//!   its metadata session) so that others know whom to ask; correctness does not rest on it. A
//!   new writer *recovers* the last open segment (fencing its ledger: the old writer can add no
//!   more) and seals it in the metadata with the recovered count before it adds a segment of its
//!   own. Every segment-list change checks that the list is still the one its writer left; if
//!   not, the writer was replaced and stops with [`Error::Fenced`]. A new writer also bumps the
//!   stream's writer epoch before it recovers anything, and every segment-list change requires
//!   the writer's own epoch, so a replaced writer cannot roll under its successor. So every
//!   record a writer saw acknowledged stays in the stream, in order, exactly once.
//! - **A fresh segment per writer.** A takeover never appends to the recovered ledger (a ledger
//!   has one writer for life). When the recovered segment is empty, the new segment replaces it
//!   (same `seq`, same start) and its ledger is deleted, so that writers that open and fail
//!   again and again do not grow the list; a reader waiting on the replaced ledger looks again.
//! - **Rolling in the append path.** A segment is rolled by entries, bytes or age when the next
//!   append arrives: create the next ledger, close the current one (its pending appends finish
//!   first, so acknowledgements stay in offset order), then one CAS seals it and adds the new
//!   one. An idle segment is rolled by age only when written again.
//! - **Readers see confirmed records only:** a sealed segment up to its count, the open one up
//!   to its LAC. The LAC travels on the next append, so the last record of an idle writer shows
//!   up when its explicit LAC goes out (`ClientConfig::explicit_lac_interval`; servers use
//!   [`crate::server::ledger_client_config`], about 100 ms) or when its segment is sealed. A
//!   tailing reader follows rollovers through a watch on the stream key.
//! - **Deletion** removes the metadata first, then fences and deletes the ledgers. A writer of
//!   a deleted stream fails at its next roll at the latest (a bookie takes adds to a ledger it
//!   no longer knows, so fencing alone does not stop it).
//! - **Truncation by whole segments,** never the open one nor the last one (it carries the next
//!   `seq` and the end offset). Ledgers are deleted after the CAS; one left behind by a crash is
//!   an orphan, not an inconsistency.
//! - **Internal names** (`Name::changelog`) go through this API unchecked: the services refuse
//!   them from users.
//! - **Bounded metadata.** The segment list lives in one metadata value (at most 1 MiB, about
//!   10 000 segments); streams are expected to be truncated well before that.

mod meta;
mod reader;
mod writer;

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use quire_ledger_client::{Client, LedgerError};
use quire_metadata::session::Session;
use quire_metadata::{DynStore, MetaError};

pub use meta::{Record, Segment, StreamConfig, StreamInfo, StreamMeta, WriterInfo};
pub use reader::StreamReader;
pub use writer::StreamWriter;

use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;

/// How long one ledger recovery or delete done on behalf of a delete may take.
const DELETE_STEP_TIMEOUT: Duration = Duration::from_secs(30);

/// Creates, inspects, writes, reads, truncates and deletes streams. Cheap to clone.
#[derive(Clone)]
pub struct Streams {
    store: DynStore,
    client: Client,
}

impl Streams {
    pub fn new(store: DynStore, client: Client) -> Self {
        Streams { store, client }
    }

    /// The metadata store (for the table layer, which shares it).
    pub fn store(&self) -> &DynStore {
        &self.store
    }

    /// The ledger client (for the table layer's checkpoints).
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Creates an empty stream (its first segment comes with its first writer).
    pub async fn create(&self, name: &Name, cfg: StreamConfig) -> Result<StreamInfo> {
        cfg.check()?;
        let meta = StreamMeta {
            config: cfg,
            segments: Vec::new(),
            start_offset: 0,
            created_ms: now_ms(),
            writer_epoch: 0,
        };
        let key = layout::stream_key(name);
        match meta::retry_transient(|| self.store.create(&key, meta.encode(), None)).await {
            Ok(_) => {}
            Err(Error::Metadata(MetaError::AlreadyExists(_))) => {
                return Err(Error::AlreadyExists(format!("stream {name}")));
            }
            Err(e) => return Err(e),
        }
        tracing::info!(stream = %name, "stream created");
        Ok(StreamInfo {
            name: name.clone(),
            config: meta.config,
            start_offset: 0,
            end_offset: 0,
            segments: Vec::new(),
            writer: None,
            created_ms: meta.created_ms,
        })
    }

    pub async fn info(&self, name: &Name) -> Result<StreamInfo> {
        let (meta, _) = meta::load(&self.store, name).await?;
        let end_offset = match meta.segments.last() {
            Some(s) if s.count.is_none() => {
                let r = self.client.open(s.ledger, &[]).await?;
                s.start_offset + (r.lac() + 1) as u64
            }
            _ => meta.sealed_end().unwrap_or(meta.start_offset),
        };
        let key = layout::writer_key(name);
        let writer = match meta::retry_transient(|| self.store.get(&key)).await? {
            Some(kv) => Some(meta::decode_writer(&kv)?),
            None => None,
        };
        Ok(StreamInfo {
            name: name.clone(),
            start_offset: meta.start_offset,
            end_offset,
            segments: meta.segments,
            writer,
            created_ms: meta.created_ms,
            config: meta.config,
        })
    }

    /// The streams of `namespace`, in name order.
    pub async fn list(&self, namespace: &str) -> Result<Vec<Name>> {
        let prefix = format!("{}{namespace}/", layout::STREAMS);
        let kvs = meta::retry_transient(|| quire_metadata::store::list_all(&*self.store, &prefix))
            .await?;
        Ok(kvs
            .iter()
            .filter_map(|kv| layout::name_of(layout::STREAMS, &kv.key))
            .filter(|n| n.namespace == namespace)
            .collect())
    }

    /// Deletes the metadata (by CAS: gone for everyone at once), then fences the open segment
    /// (a live writer stops) and deletes every segment ledger. A ledger that cannot be deleted
    /// now is logged and left behind as an orphan.
    pub async fn delete(&self, name: &Name) -> Result<()> {
        let key = layout::stream_key(name);
        let meta = loop {
            let (meta, version) = meta::load(&self.store, name).await?;
            match self.store.delete(&key, Some(version)).await {
                Ok(()) => break meta,
                Err(MetaError::BadVersion { .. }) => continue,
                Err(MetaError::NotFound(_)) => {
                    return Err(Error::NoSuchStream(name.to_string()));
                }
                Err(e) => return Err(e.into()),
            }
        };
        // The writer's lease names a writer of a stream that is gone: drop it so that a stream
        // created again under this name can be written at once.
        if let Err(e) = self.store.delete(&layout::writer_key(name), None).await
            && !matches!(e, MetaError::NotFound(_))
        {
            tracing::warn!(stream = %name, error = %e, "could not remove the writer lease");
        }
        for s in &meta.segments {
            if s.count.is_none() {
                match tokio::time::timeout(DELETE_STEP_TIMEOUT, self.client.recover(s.ledger, &[]))
                    .await
                {
                    Ok(Ok(_)) | Ok(Err(LedgerError::NoSuchLedger(_))) => {}
                    Ok(Err(e)) => tracing::warn!(stream = %name, ledger = s.ledger, error = %e,
                        "could not fence the open segment of a deleted stream"),
                    Err(_) => tracing::warn!(stream = %name, ledger = s.ledger,
                        "timed out fencing the open segment of a deleted stream"),
                }
            }
            delete_ledger(&self.client, name, s.ledger).await;
        }
        tracing::info!(stream = %name, segments = meta.segments.len(), "stream deleted");
        Ok(())
    }

    pub async fn open_writer(
        &self,
        name: &Name,
        session: &Arc<Session>,
        me: WriterInfo,
    ) -> Result<StreamWriter> {
        writer::open(self, name, session, me).await
    }

    pub async fn truncate(&self, name: &Name, before: u64) -> Result<u64> {
        let mut removed = Vec::new();
        let (meta, _) = meta::update(&self.store, name, |m| {
            removed = meta::truncate_plan(m, before);
            Ok(!removed.is_empty())
        })
        .await?;
        for s in &removed {
            delete_ledger(&self.client, name, s.ledger).await;
        }
        if !removed.is_empty() {
            tracing::info!(stream = %name, segments = removed.len(), start_offset = meta.start_offset,
                "stream truncated");
        }
        Ok(meta.start_offset)
    }

    pub async fn reader(&self, name: &Name) -> Result<StreamReader> {
        StreamReader::open(self, name).await
    }
}

/// Deletes a segment ledger; a failure leaves an orphan ledger behind (logged).
async fn delete_ledger(client: &Client, name: &Name, ledger: u64) {
    match tokio::time::timeout(DELETE_STEP_TIMEOUT, client.delete(ledger)).await {
        Ok(Ok(())) | Ok(Err(LedgerError::NoSuchLedger(_))) => {}
        Ok(Err(e)) => {
            tracing::warn!(stream = %name, ledger, error = %e, "could not delete a segment ledger")
        }
        Err(_) => tracing::warn!(stream = %name, ledger, "timed out deleting a segment ledger"),
    }
}

/// Maps a ledger error of the stream's writer: fencing means another writer took over.
pub(crate) fn ledger_error(name: &Name, e: LedgerError) -> Error {
    match e {
        LedgerError::Fenced(l) => meta::fenced(
            name,
            &format!("segment ledger {l} was fenced: another writer took over"),
        ),
        // A writer's own segment ledger vanishes only when the stream is deleted.
        LedgerError::NoSuchLedger(l) => meta::fenced(
            name,
            &format!("segment ledger {l} is gone: the stream was deleted"),
        ),
        LedgerError::TooLarge { size, max } => {
            Error::TooLarge(format!("record of {size} bytes, the limit is {max}"))
        }
        e => Error::Ledger(e),
    }
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
