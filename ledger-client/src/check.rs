//! Replica check: asks every bookie of every entry's write set for its copy and verifies the
//! digest, so that missing, corrupt or unreachable replicas are found (what BookKeeper's
//! `LedgerChecker` does per fragment; used by `quire ledger check` and by autorecovery).

use futures::StreamExt;
use quire_metadata::ledgers::LedgerMetadata;
use quire_proto::entry;

use crate::client::Shared;
use crate::error::Result;

/// Replica reads in flight at once.
const PARALLELISM: usize = 32;
/// Issues kept in a report at most (the count goes on): a ledger with a dead bookie has one per
/// entry.
pub const ISSUES_KEPT_MAX: usize = 10_000;

/// What is wrong with one replica of one entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplicaProblem {
    /// The bookie answered that it does not hold the entry.
    Missing,
    /// The bookie's copy failed its checksum or the client's digest.
    Corrupt(String),
    /// The bookie could not be asked (down, unregistered, timed out).
    Unreachable(String),
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReplicaIssue {
    pub entry_id: u64,
    pub bookie: String,
    pub problem: ReplicaProblem,
}

/// The outcome of a check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CheckReport {
    pub ledger_id: u64,
    /// Entries checked: 0..=last (the last entry of a closed ledger, else the LAC).
    pub last_entry_id: i64,
    /// Replica copies asked for.
    pub replicas_checked: u64,
    /// Problems found, in (entry, bookie) order: the first [`ISSUES_KEPT_MAX`] of them.
    pub issues: Vec<ReplicaIssue>,
    /// How many problems were found in all.
    pub issues_total: u64,
}

impl CheckReport {
    pub fn is_healthy(&self) -> bool {
        self.issues_total == 0
    }
}

/// Checks every replica of entries `0..=last` of ledger `id` (described by `meta`).
pub(crate) async fn check(
    shared: &Shared,
    id: u64,
    meta: &LedgerMetadata,
    last: i64,
) -> Result<CheckReport> {
    let replicas_checked = (last + 1).max(0) as u64 * meta.write_quorum as u64;
    let asks = (0..=last).flat_map(|e| {
        let e = e as u64;
        meta.write_set(e)
            .into_iter()
            .map(move |b| (e, b.to_string()))
            .collect::<Vec<_>>()
    });
    let pool = &shared.pool;
    let mut found = Box::pin(
        futures::stream::iter(asks)
            .map(|(entry_id, bookie)| async move {
                let problem = match pool.read(&bookie, id, entry_id, None).await {
                    Ok(resp) => match entry::decode(&resp.body) {
                        Ok((h, _)) if h.ledger_id == id && h.entry_id == entry_id => None,
                        Ok((h, _)) => Some(ReplicaProblem::Corrupt(format!(
                            "holds entry {}/{} instead",
                            h.ledger_id, h.entry_id
                        ))),
                        Err(e) => Some(ReplicaProblem::Corrupt(e.to_string())),
                    },
                    Err(e) if e.is_missing() => Some(ReplicaProblem::Missing),
                    Err(e) if e.code == quire_proto::StatusCode::Corruption => {
                        Some(ReplicaProblem::Corrupt(e.message))
                    }
                    Err(e) => Some(ReplicaProblem::Unreachable(e.to_string())),
                };
                problem.map(|problem| ReplicaIssue {
                    entry_id,
                    bookie,
                    problem,
                })
            })
            .buffered(PARALLELISM)
            .filter_map(|i| async move { i }),
    );
    let (mut issues, mut issues_total) = (Vec::new(), 0u64);
    while let Some(i) = found.next().await {
        issues_total += 1;
        if issues.len() < ISSUES_KEPT_MAX {
            issues.push(i);
        }
    }
    Ok(CheckReport {
        ledger_id: id,
        last_entry_id: last,
        replicas_checked,
        issues,
        issues_total,
    })
}
