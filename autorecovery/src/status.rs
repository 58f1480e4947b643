//! What `quire autorecovery status` reports: the active auditor, the under-replicated ledgers
//! and who works on them, the workers' counters, bookies being decommissioned.

use std::collections::BTreeMap;

use quire_metadata::DynStore;
use quire_metadata::replication::{AuditorInfo, ReplicationStore, WorkerInfo};
use serde::Serialize;

use crate::error::Result;

/// Under-replicated ledgers listed in a status at most (the count covers all).
pub const LISTED_MAX: usize = 1000;

#[derive(Clone, Debug, Serialize)]
pub struct UnderReplicatedLedger {
    pub ledger_id: u64,
    /// Bookies whose replicas are being restored.
    pub missing: Vec<String>,
    pub marked_ms: u64,
    /// The worker holding its lock, if any.
    pub locked_by: Option<String>,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    pub ledgers_replicated: u64,
    pub fragments_replicated: u64,
    pub entries_replicated: u64,
    pub bytes_replicated: u64,
    pub failures: u64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Status {
    pub auditor: Option<AuditorInfo>,
    /// How many ledgers are marked under-replicated.
    pub under_replicated: u64,
    /// The first [`LISTED_MAX`] of them.
    pub ledgers: Vec<UnderReplicatedLedger>,
    pub workers: Vec<WorkerInfo>,
    /// Sums over the live workers.
    pub totals: Totals,
    pub decommissioning: Vec<String>,
}

pub async fn status(store: &DynStore) -> Result<Status> {
    let repl = ReplicationStore::new(store.clone());
    let ids = repl.list().await?;
    let locks: BTreeMap<u64, String> = repl.locks().await?.into_iter().collect();
    let mut ledgers = Vec::new();
    for id in ids.iter().take(LISTED_MAX) {
        // A marker cleared since the listing is simply left out.
        if let Some(m) = repl.get(*id).await? {
            ledgers.push(UnderReplicatedLedger {
                ledger_id: *id,
                missing: m.value.missing.into_iter().collect(),
                marked_ms: m.value.ctime_ms,
                locked_by: locks.get(id).cloned(),
            });
        }
    }
    let workers = repl.workers().await?;
    let totals = workers.iter().fold(Totals::default(), |mut t, w| {
        t.ledgers_replicated += w.ledgers_replicated;
        t.fragments_replicated += w.fragments_replicated;
        t.entries_replicated += w.entries_replicated;
        t.bytes_replicated += w.bytes_replicated;
        t.failures += w.failures;
        t
    });
    Ok(Status {
        auditor: repl.auditor().await?,
        under_replicated: ids.len() as u64,
        ledgers,
        workers,
        totals,
        decommissioning: repl.decommissioning().await?.into_iter().collect(),
    })
}
