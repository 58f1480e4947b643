//! The auditor: one active at a time (the holder of an ephemeral election key), it decides
//! which ledgers are under-replicated and marks them for the workers.
//!
//! - Every second it compares the bookie registry with the bookies it has seen: a bookie that
//!   left is lost from then on; once lost for `lost_bookie_recovery_delay` (and not back), every
//!   ledger naming it is marked. Bookies being decommissioned are marked for at once.
//! - Bookie check (at election, then every `bookie_check_interval`): scans all ledger metadata
//!   for bookies that are not registered (lost while no auditor watched) and treats them the same.
//! - Replica check (every `replica_check_interval`): reads every replica of closed ledgers and
//!   marks those with missing or corrupt copies for the bookies that lack them.
//! - Placement check (every `placement_check_interval`): counts ledgers whose write sets repeat
//!   a zone while enough zones exist; reported, not repaired (as BookKeeper does by default).
//!
//! A standby keeps trying the election key each second; the key vanishes with the active
//! auditor's session, so a standby takes over one session timeout after the active one dies. Its
//! clock for lost bookies starts when it takes over (it cannot know when they left).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use quire_ledger_client::check::ReplicaProblem;
use quire_ledger_client::{Client, LedgerMetadata, LedgerState};
use quire_metadata::bookies::BookieRegistry;
use quire_metadata::layout::LEDGERS;
use quire_metadata::replication::{AuditorInfo, ReplicationStore, now_ms};
use quire_metadata::session::Session;
use quire_metadata::{DynStore, MetaError};
use rand::Rng;
use tokio::sync::watch;

use crate::config::AutoRecoveryConfig;
use crate::error::Result;
use crate::metrics::Metrics;
use crate::worker::wait_or_stop;

const TICK: Duration = Duration::from_secs(1);
/// The under-replicated gauge lists every marker: every this many ticks only.
const GAUGE_EVERY: u64 = 10;
/// Ledger metadata read per page of a scan.
const SCAN_PAGE: u32 = 500;

/// Calls `f` with every ledger's id and metadata, in id order (one paged scan of the ledger
/// keys; unreadable values are skipped with a warning).
pub async fn scan_ledgers(
    store: &DynStore,
    mut f: impl FnMut(u64, LedgerMetadata),
) -> Result<(), MetaError> {
    let mut after: Option<String> = None;
    loop {
        let page = store.list(LEDGERS, after.as_deref(), SCAN_PAGE).await?;
        for kv in &page.kvs {
            let Some(id) = quire_metadata::layout::ledger_id_of(&kv.key) else {
                continue;
            };
            match LedgerMetadata::decode(&kv.key, &kv.value) {
                Ok(m) => f(id, m),
                Err(e) => tracing::warn!(key = %kv.key, error = %e, "unreadable ledger metadata"),
            }
        }
        match (page.more, page.kvs.last()) {
            (true, Some(last)) => after = Some(last.key.clone()),
            _ => return Ok(()),
        }
    }
}

/// Bookies `meta` names in any fragment.
pub fn bookies_of(meta: &LedgerMetadata) -> BTreeSet<&str> {
    meta.ensembles
        .values()
        .flatten()
        .map(String::as_str)
        .collect()
}

/// Runs the election and, while elected, the audit, until `stop`.
pub async fn run(
    store: DynStore,
    client: Client,
    cfg: AutoRecoveryConfig,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let repl = ReplicationStore::new(store.clone());
    while !*stop.borrow() {
        let session = match Session::start(store.clone(), cfg.session_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "auditor: no metadata session; retrying");
                if wait_or_stop(&mut stop, TICK).await {
                    return;
                }
                continue;
            }
        };
        let mut elected = false;
        while !*stop.borrow() && !session.is_lost() {
            match repl.try_become_auditor(&cfg.id, session.lease()).await {
                Ok(true) => {
                    elected = true;
                    break;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "auditor election failed; retrying"),
            }
            if wait_or_stop(&mut stop, TICK).await {
                break;
            }
        }
        if elected {
            tracing::info!(id = %cfg.id, "elected auditor");
            metrics.auditor_active.set(1);
            let mut a = Auditor::new(store.clone(), client.clone(), cfg.clone(), metrics.clone());
            a.run(&session, &mut stop).await;
            metrics.auditor_active.set(0);
            tracing::info!(id = %cfg.id, "no longer the auditor");
        }
        let _ = session.close().await;
    }
}

struct Auditor {
    store: DynStore,
    client: Client,
    repl: ReplicationStore,
    registry: BookieRegistry,
    cfg: AutoRecoveryConfig,
    metrics: Arc<Metrics>,
    info: AuditorInfo,
    /// Every bookie seen registered since the election.
    known: BTreeSet<String>,
    /// Lost bookies whose ledgers were marked (until they come back).
    marked: BTreeSet<String>,
    ticks: u64,
}

impl Auditor {
    fn new(
        store: DynStore,
        client: Client,
        cfg: AutoRecoveryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Auditor {
            repl: ReplicationStore::new(store.clone()),
            registry: BookieRegistry::new(store.clone()),
            info: AuditorInfo {
                id: cfg.id.clone(),
                since_ms: now_ms(),
                lost_bookies: BTreeMap::new(),
                ledgers_marked: 0,
                placement_violations: 0,
                last_bookie_check_ms: 0,
                last_replica_check_ms: 0,
                last_placement_check_ms: 0,
            },
            known: BTreeSet::new(),
            marked: BTreeSet::new(),
            ticks: 0,
            store,
            client,
            cfg,
            metrics,
        }
    }

    async fn run(&mut self, session: &Session, stop: &mut watch::Receiver<bool>) {
        let mut next_bookie_check = Some(Instant::now());
        let mut next_placement_check = after(self.cfg.placement_check_interval);
        let mut next_replica_check = after(self.cfg.replica_check_interval);
        let mut replica_check: Option<tokio::task::JoinHandle<u64>> = None;
        let mut published = self.info.clone();
        while !*stop.borrow() && !session.is_lost() {
            if let Err(e) = self.tick().await {
                tracing::warn!(error = %e, "audit round failed; retrying");
            }
            if next_bookie_check.is_some_and(|t| Instant::now() >= t) {
                match self.bookie_check().await {
                    Ok(()) => next_bookie_check = after(self.cfg.bookie_check_interval),
                    Err(e) => tracing::warn!(error = %e, "bookie check failed; retrying"),
                }
            }
            if next_placement_check.is_some_and(|t| Instant::now() >= t) {
                match self.placement_check().await {
                    Ok(()) => next_placement_check = after(self.cfg.placement_check_interval),
                    Err(e) => tracing::warn!(error = %e, "placement check failed; retrying"),
                }
            }
            if let Some(h) = replica_check.as_mut().filter(|h| h.is_finished()) {
                if let Ok(n) = h.await {
                    self.info.ledgers_marked += n;
                }
                self.info.last_replica_check_ms = now_ms();
                replica_check = None;
            }
            if replica_check.is_none() && next_replica_check.is_some_and(|t| Instant::now() >= t) {
                // Reads every replica: off the tick, so lost bookies are still noticed.
                replica_check = Some(tokio::spawn(replica_check_round(
                    self.store.clone(),
                    self.client.clone(),
                    self.cfg.replica_check_percent,
                    self.metrics.clone(),
                )));
                next_replica_check = after(self.cfg.replica_check_interval);
            }
            if self.info != published {
                match self.repl.update_auditor(&self.info).await {
                    Ok(true) => published = self.info.clone(),
                    Ok(false) => {
                        tracing::warn!("the auditor key is gone or taken: stepping down");
                        break;
                    }
                    Err(e) => tracing::debug!(error = %e, "could not publish auditor state"),
                }
            }
            if wait_or_stop(stop, TICK).await {
                break;
            }
        }
        if let Some(h) = replica_check {
            h.abort();
        }
    }

    /// Follows the registry; marks the ledgers of bookies lost past the delay and of bookies
    /// being decommissioned.
    async fn tick(&mut self) -> Result<()> {
        let live: BTreeSet<String> = self
            .registry
            .list()
            .await?
            .into_iter()
            .map(|b| b.id)
            .collect();
        let leaving = self.repl.decommissioning().await?;
        let now = now_ms();
        for b in self.known.difference(&live) {
            if !self.info.lost_bookies.contains_key(b) {
                tracing::warn!(bookie = %b, "bookie left the registry");
                self.info.lost_bookies.insert(b.clone(), now);
            }
        }
        for b in &live {
            if self.info.lost_bookies.remove(b).is_some() {
                tracing::info!(bookie = %b, "lost bookie is back");
            }
            // A bookie being decommissioned stays marked while live (the bookie check re-marks).
            if !leaving.contains(b) {
                self.marked.remove(b);
            }
        }
        self.known.extend(live.iter().cloned());
        let delay = self.cfg.lost_bookie_recovery_delay.as_millis() as u64;
        let mut due: BTreeSet<String> = self
            .info
            .lost_bookies
            .iter()
            .filter(|(b, since)| now >= *since + delay && !self.marked.contains(*b))
            .map(|(b, _)| b.clone())
            .collect();
        for b in leaving {
            if !self.marked.contains(&b) {
                due.insert(b);
            }
        }
        if !due.is_empty() {
            self.mark_ledgers_naming(&due).await?;
            self.marked.extend(due);
        }
        self.ticks += 1;
        if self.ticks % GAUGE_EVERY == 1 {
            self.metrics
                .under_replicated_ledgers
                .set(self.repl.list().await?.len() as i64);
        }
        Ok(())
    }

    /// Marks every ledger naming a bookie of `bookies`.
    async fn mark_ledgers_naming(&mut self, bookies: &BTreeSet<String>) -> Result<()> {
        let mut found: Vec<(u64, Vec<String>)> = Vec::new();
        scan_ledgers(&self.store, |id, m| {
            let named: Vec<String> = bookies_of(&m)
                .into_iter()
                .filter(|b| bookies.contains(*b))
                .map(String::from)
                .collect();
            if !named.is_empty() {
                found.push((id, named));
            }
        })
        .await?;
        for (id, named) in &found {
            // One failed marking must not stop the others (nor trigger a rescan every tick):
            // the next bookie check marks it again.
            if let Err(e) = self.repl.mark(*id, named).await {
                tracing::warn!(ledger_id = id, error = %e, "could not mark a ledger");
            }
        }
        if !found.is_empty() {
            tracing::info!(bookies = ?bookies, ledgers = found.len(), "marked ledgers under-replicated");
        }
        self.info.ledgers_marked += found.len() as u64;
        self.metrics.ledgers_marked.inc_by(found.len() as u64);
        Ok(())
    }

    /// Finds bookies that ledgers name but the registry does not hold (lost while no auditor
    /// watched) and starts their clock; re-marks the ledgers of lost bookies already past it.
    async fn bookie_check(&mut self) -> Result<()> {
        let live: BTreeSet<String> = self
            .registry
            .list()
            .await?
            .into_iter()
            .map(|b| b.id)
            .collect();
        let mut named = BTreeSet::new();
        scan_ledgers(&self.store, |_, m| {
            named.extend(bookies_of(&m).into_iter().map(String::from));
        })
        .await?;
        let now = now_ms();
        // A lost bookie no ledger names any more has nothing left to restore.
        self.info.lost_bookies.retain(|b, _| named.contains(b));
        self.known.retain(|b| named.contains(b) || live.contains(b));
        for b in named.difference(&live) {
            self.info.lost_bookies.entry(b.clone()).or_insert(now);
        }
        // Marked before: their ledgers are marked again, in case a marking was missed.
        self.marked.clear();
        self.info.last_bookie_check_ms = now;
        self.tick().await
    }

    /// Counts ledgers whose write sets repeat a zone when the registry has enough zones.
    async fn placement_check(&mut self) -> Result<()> {
        let zone_of: BTreeMap<String, String> = self
            .registry
            .list()
            .await?
            .into_iter()
            .filter_map(|b| b.info.zone.map(|z| (b.id, z)))
            .collect();
        let zones = zone_of.values().collect::<BTreeSet<_>>().len();
        let mut violations = 0u64;
        if zones > 1 {
            scan_ledgers(&self.store, |id, m| {
                let want = (m.write_quorum as usize).min(zones);
                let bad = m.ensembles.values().any(|ens| {
                    (0..ens.len() as u64).any(|e| {
                        let z: BTreeSet<&String> = quire_ledger_client::core::quorum::write_set(
                            e,
                            ens.len(),
                            m.write_quorum as usize,
                        )
                        .into_iter()
                        .filter_map(|p| zone_of.get(&ens[p]))
                        .collect();
                        z.len() < want && !ens.iter().any(|b| !zone_of.contains_key(b))
                    })
                });
                if bad {
                    violations += 1;
                    tracing::warn!(ledger_id = id, "write set breaks the zone rules");
                }
            })
            .await?;
        }
        self.info.placement_violations = violations;
        self.info.last_placement_check_ms = now_ms();
        self.metrics.placement_violations.set(violations as i64);
        Ok(())
    }
}

fn after(d: Duration) -> Option<Instant> {
    (!d.is_zero()).then(|| Instant::now() + d)
}

/// Checks every replica of (a sample of) the closed ledgers; marks those with missing or
/// corrupt copies. Returns how many it marked. Open ledgers are skipped: their last entries may
/// still be on their way to some replicas.
async fn replica_check_round(
    store: DynStore,
    client: Client,
    percent: u8,
    metrics: Arc<Metrics>,
) -> u64 {
    let repl = ReplicationStore::new(store.clone());
    let mut closed = Vec::new();
    let scanned = scan_ledgers(&store, |id, m| {
        if m.state == LedgerState::Closed && rand::rng().random_range(0..100u8) < percent {
            closed.push(id);
        }
    })
    .await;
    if let Err(e) = scanned {
        tracing::warn!(error = %e, "replica check: cannot scan ledgers");
        return 0;
    }
    let mut marked = 0;
    for id in closed {
        let report = match client.check(id).await {
            Ok(r) => r,
            Err(e) => {
                tracing::debug!(ledger_id = id, error = %e, "replica check skipped a ledger");
                continue;
            }
        };
        let lacking: BTreeSet<String> = report
            .issues
            .iter()
            .filter(|i| {
                matches!(
                    i.problem,
                    ReplicaProblem::Missing | ReplicaProblem::Corrupt(_)
                )
            })
            .map(|i| i.bookie.clone())
            .collect();
        if lacking.is_empty() {
            continue;
        }
        tracing::warn!(ledger_id = id, bookies = ?lacking, "replica check: copies missing or corrupt");
        let lacking: Vec<String> = lacking.into_iter().collect();
        match repl.mark(id, &lacking).await {
            Ok(()) => {
                marked += 1;
                metrics.ledgers_marked.inc();
            }
            Err(e) => tracing::warn!(ledger_id = id, error = %e, "could not mark a ledger"),
        }
    }
    marked
}
