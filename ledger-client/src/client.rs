//! The client: configuration, ledger creation with placement, open (with or without recovery),
//! delete and list.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use quire_metadata::DynStore;
use quire_metadata::bookies::BookieRegistry;
use quire_metadata::ledgers::{DigestType, LedgerMetadata, LedgerStore, Versioned};
use quire_metadata::replication::ReplicationStore;
use sha2::{Digest, Sha256};

use crate::error::{LedgerError, Result};
use crate::placement::{self, Candidate};
use crate::pool::BookiePool;
use crate::reader::LedgerReader;
use crate::writer::LedgerWriter;

/// Largest ensemble a ledger may have.
const ENSEMBLE_MAX: u32 = 64;

#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Metadata store URI (quire://, etcd://, file://, memory://).
    pub metadata: String,
    /// A bookie that has not answered an add this long is replaced. Default 5 s (BookKeeper's
    /// `addEntryTimeout`).
    pub add_timeout: Duration,
    /// Timeout of one read, fence or LAC call. Default 5 s.
    pub read_timeout: Duration,
    /// When a replica has not answered a read this long, the next one is asked too. Default 2 s
    /// (BookKeeper's `speculativeReadTimeout`); `None` turns it off.
    pub speculative_read: Option<Duration>,
    /// Appends in flight (sent, not acknowledged) per writer before `append` waits. Default 10000.
    pub max_in_flight_entries: usize,
    /// Payload bytes in flight per writer before `append` waits. Default 64 MiB.
    pub max_in_flight_bytes: usize,
    /// An idle writer sends its LAC explicitly after this long, so tailing readers see the last
    /// entries confirmed. Default 1 s; `None` turns it off.
    pub explicit_lac_interval: Option<Duration>,
    /// Largest payload accepted. Default 5 MiB - 1 KiB (a bookie's default entry limit, less the
    /// entry header).
    pub entry_size_max: usize,
}

impl ClientConfig {
    pub fn new(metadata: impl Into<String>) -> Self {
        ClientConfig {
            metadata: metadata.into(),
            add_timeout: Duration::from_secs(5),
            read_timeout: Duration::from_secs(5),
            speculative_read: Some(Duration::from_secs(2)),
            max_in_flight_entries: 10_000,
            max_in_flight_bytes: 64 << 20,
            explicit_lac_interval: Some(Duration::from_secs(1)),
            entry_size_max: (5 << 20) - 1024,
        }
    }
}

#[derive(Clone, Debug)]
pub struct CreateOptions {
    pub ensemble: u32,
    pub write_quorum: u32,
    pub ack_quorum: u32,
    pub digest: DigestType,
    pub password: Vec<u8>,
    pub custom: BTreeMap<String, String>,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            ensemble: 3,
            write_quorum: 3,
            ack_quorum: 2,
            digest: DigestType::Crc32c,
            password: Vec::new(),
            custom: BTreeMap::new(),
        }
    }
}

/// What the writer, readers and recoveries of one client share.
pub(crate) struct Shared {
    pub cfg: ClientConfig,
    pub ledgers: LedgerStore,
    pub registry: BookieRegistry,
    pub replication: ReplicationStore,
    pub pool: Arc<BookiePool>,
}

impl Shared {
    /// Read-write bookies that may join an ensemble: not those being decommissioned.
    pub async fn candidates(&self) -> Result<Vec<Candidate>> {
        let leaving = self.replication.decommissioning().await?;
        Ok(self
            .registry
            .writable()
            .await?
            .into_iter()
            .filter(|b| !leaving.contains(&b.id))
            .map(|b| Candidate {
                id: b.id,
                zone: b.info.zone,
            })
            .collect())
    }

    pub async fn read_metadata(&self, id: u64) -> Result<Versioned<LedgerMetadata>> {
        self.ledgers
            .read(id)
            .await
            .map_err(|e| LedgerError::from_meta(id, e))
    }
}

/// The hash of a ledger password kept in metadata (so a wrong password is refused at open).
pub(crate) fn password_hash(password: &[u8]) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(b"quire-ledger-password\0");
    h.update(password);
    h.finalize().to_vec()
}

/// The master key bookies tie a ledger to (derived from the password, 20 bytes like
/// BookKeeper's).
pub(crate) fn master_key(password: &[u8]) -> Bytes {
    let mut h = Sha256::new();
    h.update(b"quire-ledger-master-key\0");
    h.update(password);
    Bytes::copy_from_slice(&h.finalize()[..20])
}

/// Checks the password against the ledger's metadata.
pub(crate) fn check_password(id: u64, meta: &LedgerMetadata, password: &[u8]) -> Result<()> {
    if meta.password_hash != password_hash(password) {
        return Err(LedgerError::Unauthorized(id));
    }
    Ok(())
}

/// A ledger client. Cheap to clone; clones share connections.
#[derive(Clone)]
pub struct Client {
    shared: Arc<Shared>,
}

impl Client {
    /// Connects to the metadata store named by `cfg.metadata`.
    pub async fn connect(cfg: ClientConfig) -> Result<Client> {
        let store = quire_metadata::connect(&cfg.metadata).await?;
        Self::with_store(store, cfg).await
    }

    /// A client over an already connected metadata store.
    pub async fn with_store(store: DynStore, cfg: ClientConfig) -> Result<Client> {
        let registry = BookieRegistry::new(store.clone());
        let pool = BookiePool::new(registry.clone(), cfg.read_timeout, cfg.add_timeout);
        Ok(Client {
            shared: Arc::new(Shared {
                replication: ReplicationStore::new(store.clone()),
                ledgers: LedgerStore::new(store),
                registry,
                pool,
                cfg,
            }),
        })
    }

    pub(crate) fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    pub fn config(&self) -> &ClientConfig {
        &self.shared.cfg
    }

    /// Creates a ledger on an ensemble chosen by the placement policy and opens it for writing.
    pub async fn create(&self, opts: CreateOptions) -> Result<LedgerWriter> {
        let (e, qw, qa) = (opts.ensemble, opts.write_quorum, opts.ack_quorum);
        if !(e >= qw && qw >= qa && qa >= 1) || e > ENSEMBLE_MAX {
            return Err(LedgerError::InvalidArgument(format!(
                "need {ENSEMBLE_MAX} >= E >= Qw >= Qa >= 1, got E={e} Qw={qw} Qa={qa}"
            )));
        }
        let candidates = self.shared.candidates().await?;
        let ensemble =
            placement::choose_ensemble(&candidates, e as usize, qw as usize, &mut rand::rng())?;
        let meta = LedgerMetadata::new(
            ensemble,
            qw,
            qa,
            opts.digest,
            password_hash(&opts.password),
            master_key(&opts.password).to_vec(),
            opts.custom,
        )
        .map_err(|e| LedgerError::InvalidArgument(e.to_string()))?;
        let (id, v) = self.shared.ledgers.create(&meta).await?;
        tracing::debug!(ledger_id = id, ensemble = ?meta.ensembles[&0], "ledger created");
        Ok(LedgerWriter::start(
            self.shared.clone(),
            id,
            v,
            master_key(&opts.password),
        ))
    }

    /// Opens a ledger for reading without recovery: nothing is fenced, an open ledger's writer
    /// goes on, and reads stop at the LAC.
    pub async fn open(&self, id: u64, password: &[u8]) -> Result<LedgerReader> {
        let v = self.shared.read_metadata(id).await?;
        check_password(id, &v.value, password)?;
        let r = LedgerReader::new(self.shared.clone(), id, v.value);
        if !r.is_closed() {
            r.read_lac().await?;
        }
        Ok(r)
    }

    /// Opens a ledger with recovery: fences it (its writer can add no more), recovers the entries
    /// any writer may have seen acknowledged, and closes it. Idempotent; safe when several
    /// clients recover the same ledger at once (they agree through the metadata CAS).
    pub async fn recover(&self, id: u64, password: &[u8]) -> Result<LedgerReader> {
        let v = self.shared.read_metadata(id).await?;
        check_password(id, &v.value, password)?;
        let closed = crate::recover::recover(&self.shared, id, master_key(password)).await?;
        Ok(LedgerReader::new(self.shared.clone(), id, closed.value))
    }

    /// Deletes a ledger: its metadata first (so it is gone for everyone at once), then its data
    /// on every bookie that held a fragment (best effort: a bookie that is down keeps its copy).
    pub async fn delete(&self, id: u64) -> Result<()> {
        let v = self.shared.read_metadata(id).await?;
        self.shared
            .ledgers
            .delete(id, None)
            .await
            .map_err(|e| LedgerError::from_meta(id, e))?;
        let mut bookies: Vec<&String> = v.value.ensembles.values().flatten().collect();
        bookies.sort();
        bookies.dedup();
        let calls = bookies.iter().map(|b| async move {
            if let Err(e) = self.shared.pool.delete_ledger(b, id).await {
                tracing::warn!(ledger_id = id, bookie = %b, error = %e,
                    "could not delete the ledger's data on a bookie");
            }
        });
        futures::future::join_all(calls).await;
        Ok(())
    }

    /// Ledger ids in order after `start_after`, at most `limit`; `true` when more follow.
    pub async fn list(&self, start_after: Option<u64>, limit: u32) -> Result<(Vec<u64>, bool)> {
        Ok(self.shared.ledgers.list(start_after, limit).await?)
    }

    /// Checks every replica of every entry (up to the last entry of a closed ledger, or the LAC
    /// of an open one): which bookies miss an entry, hold a corrupt copy or cannot be reached.
    pub async fn check(&self, id: u64) -> Result<crate::check::CheckReport> {
        let v = self.shared.read_metadata(id).await?;
        let last = if v.value.state == quire_metadata::ledgers::LedgerState::Closed {
            v.value.last_entry_id
        } else {
            LedgerReader::new(self.shared.clone(), id, v.value.clone())
                .read_lac()
                .await?
        };
        crate::check::check(&self.shared, id, &v.value, last).await
    }

    pub async fn metadata(&self, id: u64) -> Result<Versioned<LedgerMetadata>> {
        self.shared.read_metadata(id).await
    }
}
