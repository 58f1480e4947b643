//! Decommissioning a bookie: move every replica it holds to other bookies while it is still up,
//! so readers never see a ledger with fewer replicas than its write quorum.
//!
//! 1. Refuse, changing nothing, when the bookie is unknown or when some fragment naming it has
//!    no writable bookie outside its ensemble to move to.
//! 2. Mark the bookie as decommissioning (placement gives it nothing new from then on) and mark
//!    every ledger naming it under-replicated: if this command dies, autorecovery workers finish.
//! 3. Work as a replication worker on those ledgers (copy from any replica, the leaving bookie
//!    included, then swap by CAS) until no ledger names the bookie.
//!
//! An open ledger with the bookie in its last ensemble is left to its writer: the bookie is
//! healthy, so nothing forces an ensemble change, and fencing a working writer would be worse
//! than waiting. The decommission finishes once such ledgers are closed (Pulsar rolls ledgers
//! regularly) or the timeout passes; progress reports how many wait.
//!
//! The decommission mark stays afterwards so the empty bookie gets no new ledgers until it is
//! stopped; [`cancel`] removes it.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use quire_ledger_client::Client;
use quire_ledger_client::admin::CopyStats;
use quire_metadata::DynStore;
use quire_metadata::bookies::{BookieRegistry, CookieStore};
use quire_metadata::layout::check_bookie_id;
use quire_metadata::replication::ReplicationStore;
use quire_metadata::session::Session;
use serde::Serialize;

use crate::auditor::{bookies_of, scan_ledgers};
use crate::config::AutoRecoveryConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;
use crate::worker::{Outcome, Replicator};

#[derive(Clone, Debug)]
pub struct DecommissionOptions {
    /// Give up (leaving the marks for the workers) after this long.
    pub timeout: Duration,
    /// See [`AutoRecoveryConfig::open_ledger_grace`].
    pub open_ledger_grace: Duration,
    /// Copy bandwidth in bytes per second; 0 is unlimited.
    pub throttle_bytes_per_sec: u64,
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct DecommissionReport {
    pub bookie: String,
    /// Ledgers that named the bookie when the decommission started.
    pub ledgers: u64,
    /// Ledgers this command moved off the bookie (others may have been moved by workers).
    pub ledgers_moved: u64,
    pub fragments_moved: u64,
    pub entries_copied: u64,
    pub bytes_copied: u64,
    pub elapsed_ms: u64,
}

/// A ledger naming the bookie being decommissioned.
struct Naming {
    id: u64,
    /// The ensembles that name it.
    ensembles: Vec<Vec<String>>,
    /// Its metadata keeps the master key (written by a client that stores it).
    has_key: bool,
    /// Not closed, with the bookie in its last ensemble: waits for its writer.
    open_tail: bool,
}

/// Ledgers naming `bookie`.
async fn ledgers_naming(store: &DynStore, bookie: &str) -> Result<Vec<Naming>> {
    let mut out = Vec::new();
    scan_ledgers(store, |id, m| {
        if bookies_of(&m).contains(bookie) {
            let open_tail = m.state != quire_ledger_client::LedgerState::Closed
                && m.ensembles
                    .values()
                    .next_back()
                    .is_some_and(|e| e.iter().any(|b| b == bookie));
            out.push(Naming {
                id,
                ensembles: m
                    .ensembles
                    .values()
                    .filter(|e| e.iter().any(|b| b == bookie))
                    .cloned()
                    .collect(),
                has_key: !m.master_key.is_empty(),
                open_tail,
            });
        }
    })
    .await?;
    Ok(out)
}

/// Pause between rounds (each scans all ledger metadata).
const ROUND_PAUSE: Duration = Duration::from_secs(2);

/// Empties `bookie`; `progress` is told, each round, how many ledgers still name it and how
/// many of those wait for their writer (open, with the bookie in their last ensemble).
pub async fn decommission(
    store: DynStore,
    client: Client,
    bookie: &str,
    opts: DecommissionOptions,
    progress: impl Fn(u64, u64),
) -> Result<DecommissionReport> {
    check_bookie_id(bookie)?;
    let started = Instant::now();
    let repl = ReplicationStore::new(store.clone());
    let registered = BookieRegistry::new(store.clone())
        .list()
        .await?
        .iter()
        .any(|b| b.id == bookie);
    let naming = ledgers_naming(&store, bookie).await?;
    let has_cookie = CookieStore::new(store.clone())
        .read(bookie)
        .await?
        .is_some();
    if !registered && naming.is_empty() && !has_cookie {
        return Err(Error::UnknownBookie(bookie.to_string()));
    }
    // Every fragment naming the bookie needs a writable bookie outside its ensemble.
    let others: BTreeSet<String> = client
        .candidates()
        .await?
        .into_iter()
        .map(|c| c.id)
        .filter(|c| c != bookie)
        .collect();
    let keyless: Vec<u64> = naming.iter().filter(|n| !n.has_key).map(|n| n.id).collect();
    if !keyless.is_empty() {
        return Err(Error::Ledger(
            quire_ledger_client::LedgerError::InvalidArgument(format!(
                "ledgers {keyless:?} keep no master key in their metadata (written by an older \
             client): their replicas cannot be copied without their passwords"
            )),
        ));
    }
    for Naming { id, ensembles, .. } in &naming {
        for ens in ensembles {
            if !others.iter().any(|c| !ens.contains(c)) {
                return Err(Error::NotEnoughBookies(format!(
                    "ledger {id} keeps replicas on {ens:?}; no other writable bookie could take \
                     {bookie}'s (writable bookies left: {others:?}). Add a bookie first"
                )));
            }
        }
    }
    repl.start_decommission(bookie).await?;
    for n in &naming {
        repl.mark(n.id, &[bookie.to_string()]).await?;
    }
    tracing::info!(bookie, ledgers = naming.len(), "decommissioning");

    let cfg = AutoRecoveryConfig {
        id: format!("decommission-{bookie}-{}", std::process::id()),
        open_ledger_grace: opts.open_ledger_grace,
        throttle_bytes_per_sec: opts.throttle_bytes_per_sec,
        ..AutoRecoveryConfig::default()
    };
    let session = Session::start(store.clone(), cfg.session_timeout).await?;
    let worker = Replicator::new(store.clone(), client, cfg, Arc::new(Metrics::new()));
    let mut report = DecommissionReport {
        bookie: bookie.to_string(),
        ledgers: naming.len() as u64,
        ..Default::default()
    };
    let result = move_all(
        &store,
        bookie,
        &session,
        &worker,
        &mut report,
        started + opts.timeout,
        &progress,
    )
    .await;
    let _ = session.close().await;
    report.elapsed_ms = started.elapsed().as_millis() as u64;
    result.map(|()| report)
}

/// Rounds of moves until no ledger names `bookie`, or `deadline`.
async fn move_all(
    store: &DynStore,
    bookie: &str,
    session: &Session,
    worker: &Replicator,
    report: &mut DecommissionReport,
    deadline: Instant,
    progress: &impl Fn(u64, u64),
) -> Result<()> {
    let repl = ReplicationStore::new(store.clone());
    loop {
        let left = ledgers_naming(store, bookie).await?;
        let waiting = left.iter().filter(|n| n.open_tail).count() as u64;
        progress(left.len() as u64, waiting);
        if left.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(Error::Timeout(format!(
                "{} ledgers still name {bookie} ({waiting} of them open with it in their last \
                 ensemble, waiting for their writers to close or roll them); the autorecovery \
                 workers go on with them",
                left.len(),
            )));
        }
        if session.is_lost() {
            return Err(Error::Timeout("the metadata session was lost".into()));
        }
        for n in left {
            if Instant::now() >= deadline {
                break;
            }
            // A ledger created before the mark was seen, or whose marker a worker cleared
            // before a later fragment was added: marked again.
            repl.mark(n.id, &[bookie.to_string()]).await?;
            match worker.process(n.id, session).await {
                Ok(Outcome::Replicated { fragments, stats }) if fragments > 0 => {
                    report.ledgers_moved += 1;
                    report.fragments_moved += fragments;
                    add(report, stats);
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(ledger_id = n.id, error = %e, "move failed; retrying"),
            }
        }
        tokio::time::sleep(ROUND_PAUSE).await;
    }
}

fn add(r: &mut DecommissionReport, s: CopyStats) {
    r.entries_copied += s.entries;
    r.bytes_copied += s.bytes;
}

/// Ends a decommission: the bookie may receive new replicas again.
pub async fn cancel(store: DynStore, bookie: &str) -> Result<()> {
    Ok(ReplicationStore::new(store)
        .end_decommission(bookie)
        .await?)
}
