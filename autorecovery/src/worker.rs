//! Replication workers: lock an under-replicated ledger, restore its lost replicas, release.
//!
//! For each fragment naming a bookie in the ledger's marker:
//! - the bookie is gone (unregistered), read-only or being decommissioned: pick a target by the
//!   placement policy, copy the fragment's entries of that position to it, verify, and swap it
//!   into the ensemble by CAS (an empty fragment is swapped without a copy);
//! - the bookie is writable and staying (the replica check found entries it lacks): copy the
//!   entries it lacks back to it, ensemble unchanged.
//!
//! The last fragment of a ledger that is not closed belongs to its writer, whose ensemble change
//! replaces a failed bookie. When a lost bookie is still there `open_ledger_grace` after it was
//! marked, the writer is taken for dead: the ledger is recovered (fenced and closed) with the
//! master key kept in its metadata, and then repaired like any closed ledger; it is fenced only
//! when a bookie is free to take the lost position. A bookie that is up (leaving, read-only)
//! never causes a fence: such a fragment waits for its writer to close the ledger.
//!
//! A marker is cleared by CAS on the version read before the work, so a ledger marked again
//! meanwhile (another bookie lost) stays marked. Locks are ephemeral: a worker killed mid-copy
//! loses its lock with its session, and the next worker starts that ledger over. The copy it
//! left on its target is never named by metadata, so no reader sees a torn fragment.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use quire_ledger_client::admin::{self, CopyStats, CopyTo, Throttle};
use quire_ledger_client::placement::choose_replacement;
use quire_ledger_client::{Client, LedgerError, LedgerState};
use quire_metadata::DynStore;
use quire_metadata::bookies::BookieRegistry;
use quire_metadata::replication::{ReplicationStore, WorkerInfo, now_ms};
use quire_metadata::session::Session;
use rand::seq::SliceRandom;
use tokio::sync::watch;

use crate::config::AutoRecoveryConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// A ledger whose replication failed is left alone this long before the next try.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// How often a ledger whose open tail waits on its writer (a leaving or read-only bookie) is
/// looked at again.
const TAIL_RECHECK: Duration = Duration::from_secs(10);
/// Longest back-off for a ledger whose replication keeps failing.
const RETRY_MAX: Duration = Duration::from_secs(300);
/// How often a worker republishes its counters while busy.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// What one pass over a ledger achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every lost replica is restored and the marker is cleared (or was already gone).
    Replicated { fragments: u64, stats: CopyStats },
    /// Earlier fragments may be restored, but the open last fragment still names a marked
    /// bookie: its writer has until `retry_at_ms` to replace a lost one, or is waited for.
    Deferred { retry_at_ms: u64 },
    /// Another worker holds the ledger's lock.
    Locked,
}

/// The replication steps, shared by the worker loop and `decommission`.
pub struct Replicator {
    client: Client,
    repl: ReplicationStore,
    registry: BookieRegistry,
    cfg: AutoRecoveryConfig,
    metrics: Arc<Metrics>,
    throttle: Option<Throttle>,
    counters: Mutex<WorkerInfo>,
}

impl Replicator {
    pub fn new(
        store: DynStore,
        client: Client,
        cfg: AutoRecoveryConfig,
        metrics: Arc<Metrics>,
    ) -> Self {
        Replicator {
            repl: ReplicationStore::new(store.clone()),
            registry: BookieRegistry::new(store),
            throttle: Throttle::new(cfg.throttle_bytes_per_sec),
            counters: Mutex::new(WorkerInfo {
                id: cfg.id.clone(),
                ..Default::default()
            }),
            client,
            cfg,
            metrics,
        }
    }

    pub fn counters(&self) -> WorkerInfo {
        let mut w = self.counters.lock().clone();
        w.updated_ms = now_ms();
        w
    }

    /// Locks `ledger` under `session`, replicates it, unlocks. The work stops if the session
    /// is lost meanwhile (the lock may then be someone else's).
    pub async fn process(&self, ledger: u64, session: &Session) -> Result<Outcome> {
        let lease = session.lease();
        if !self.repl.try_lock(ledger, &self.cfg.id, lease).await? {
            return Ok(Outcome::Locked);
        }
        self.counters.lock().current_ledger = Some(ledger);
        let r = tokio::select! {
            r = self.replicate(ledger) => r,
            _ = session.lost() => Err(Error::Timeout(format!(
                "the session holding the lock of ledger {ledger} was lost"
            ))),
        };
        self.counters.lock().current_ledger = None;
        match &r {
            // Fragments are counted as they are done; a ledger only when it needed work.
            Ok(Outcome::Replicated { fragments, .. }) if *fragments > 0 => {
                self.metrics.ledgers_replicated.inc();
                self.counters.lock().ledgers_replicated += 1;
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(ledger_id = ledger, error = %e, "replication failed; will retry");
                self.metrics.replication_failures.inc();
                self.counters.lock().failures += 1;
            }
        }
        for attempt in 0..3 {
            match self.repl.unlock(ledger, lease).await {
                Ok(()) => break,
                // The lock goes with the session at the latest.
                Err(e) if attempt == 2 => {
                    tracing::warn!(ledger_id = ledger, error = %e, "could not release a ledger lock")
                }
                Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
            }
        }
        r
    }

    /// Restores the replicas the marker of `ledger` names (the caller holds the lock).
    async fn replicate(&self, ledger: u64) -> Result<Outcome> {
        let Some(mark) = self.repl.get(ledger).await? else {
            return Ok(Outcome::Replicated {
                fragments: 0,
                stats: CopyStats::default(),
            });
        };
        let bad = &mark.value.missing;
        let (mut fragments, mut stats) = (0u64, CopyStats::default());
        let mut recovered = false;
        loop {
            let meta = match self.client.metadata(ledger).await {
                Ok(v) => v.value,
                Err(LedgerError::NoSuchLedger(_)) => {
                    // Deleted: nothing to restore.
                    self.clear(ledger, mark.version).await?;
                    return Ok(Outcome::Replicated { fragments, stats });
                }
                Err(e) => return Err(e.into()),
            };
            let registered = self.registry.list().await?;
            let leaving = self.repl.decommissioning().await?;
            // Staying bookies get lost copies back in place; the others' replicas move.
            let staying: BTreeSet<String> = registered
                .iter()
                .filter(|b| !b.read_only && !leaving.contains(&b.id))
                .map(|b| b.id.clone())
                .collect();
            let lost = |b: &String| !registered.iter().any(|r| r.id == *b);
            // The open tail: positions on lost bookies, and when the newest was marked.
            let mut tail_lost: Vec<(usize, u64)> = Vec::new();
            let mut tail_live = false;
            let frags = admin::fragments(&meta, -1);
            for mut frag in frags.iter().cloned() {
                for pos in 0..frag.ensemble.len() {
                    let b = &frag.ensemble[pos].clone();
                    if !bad.contains(b) {
                        continue;
                    }
                    if frag.open_tail {
                        // The writer's. A lost bookie it has not replaced by the end of the
                        // grace means the writer is gone too; a live one (leaving, read-only)
                        // waits for the writer to close or roll the ledger.
                        if lost(b) {
                            tail_lost.push((pos, mark.value.marked_ms(b)));
                        } else {
                            tail_live |= !staying.contains(b);
                        }
                        continue;
                    }
                    let s = if staying.contains(b) {
                        // Put back the entries it lacks.
                        self.client
                            .copy_fragment(
                                ledger,
                                &meta,
                                &frag,
                                pos,
                                CopyTo::SameBookie,
                                self.throttle.as_ref(),
                            )
                            .await?
                    } else {
                        let (s, target) = self
                            .move_replica(ledger, &meta, &frag, pos, &leaving)
                            .await?;
                        // So a second lost bookie of this fragment picks another target.
                        frag.ensemble[pos] = target;
                        s
                    };
                    stats.entries += s.entries;
                    stats.bytes += s.bytes;
                    self.metrics.entries_replicated.inc_by(s.entries);
                    self.metrics.bytes_replicated.inc_by(s.bytes);
                    {
                        let mut c = self.counters.lock();
                        c.fragments_replicated += 1;
                        c.entries_replicated += s.entries;
                        c.bytes_replicated += s.bytes;
                    }
                    fragments += 1;
                    self.metrics.fragments_replicated.inc();
                }
            }
            if tail_lost.is_empty() {
                if tail_live {
                    return Ok(Outcome::Deferred {
                        retry_at_ms: now_ms() + TAIL_RECHECK.as_millis() as u64,
                    });
                }
                break;
            }
            let newest = tail_lost.iter().map(|(_, t)| *t).max().unwrap_or(0);
            let retry_at_ms = newest + self.cfg.open_ledger_grace.as_millis() as u64;
            if now_ms() < retry_at_ms || recovered || meta.state == LedgerState::Closed {
                return Ok(Outcome::Deferred { retry_at_ms });
            }
            // Fence only when the repair can follow: a bookie must be free for each position.
            let tail = frags.last().expect("a ledger has a fragment");
            let candidates = self.client.candidates().await?;
            for (pos, _) in &tail_lost {
                self.pick_target(ledger, &meta, tail, *pos, &leaving, &candidates)?;
            }
            tracing::info!(
                ledger_id = ledger,
                "the open ledger's last fragment still names a lost bookie past the grace \
                 period: recovering it"
            );
            self.client.recover_with_stored_key(ledger).await?;
            recovered = true;
        }
        self.clear(ledger, mark.version).await?;
        tracing::info!(
            ledger_id = ledger,
            fragments,
            entries = stats.entries,
            bytes = stats.bytes,
            "ledger replicated"
        );
        Ok(Outcome::Replicated { fragments, stats })
    }

    /// Moves position `pos` of `frag` to a new bookie: copy, verify, CAS.
    async fn move_replica(
        &self,
        ledger: u64,
        meta: &quire_ledger_client::LedgerMetadata,
        frag: &admin::Fragment,
        pos: usize,
        leaving: &BTreeSet<String>,
    ) -> Result<(CopyStats, String)> {
        let old = &frag.ensemble[pos];
        let candidates = self.client.candidates().await?;
        let target = self.pick_target(ledger, meta, frag, pos, leaving, &candidates)?;
        let stats = self
            .client
            .copy_fragment(
                ledger,
                meta,
                frag,
                pos,
                CopyTo::NewBookie(&target),
                self.throttle.as_ref(),
            )
            .await?;
        self.client
            .replace_bookie(ledger, frag.first, old, &target)
            .await?;
        tracing::info!(ledger_id = ledger, fragment = frag.first, from = %old, to = %target,
            entries = stats.entries, bytes = stats.bytes, "fragment replica moved");
        Ok((stats, target))
    }

    /// A bookie to take position `pos` of `frag`, by the placement policy.
    fn pick_target(
        &self,
        ledger: u64,
        meta: &quire_ledger_client::LedgerMetadata,
        frag: &admin::Fragment,
        pos: usize,
        leaving: &BTreeSet<String>,
        candidates: &[quire_ledger_client::placement::Candidate],
    ) -> Result<String> {
        choose_replacement(
            candidates,
            &frag.ensemble,
            pos,
            meta.write_quorum as usize,
            leaving,
            &mut rand::rng(),
        )
        .ok_or_else(|| {
            Error::NotEnoughBookies(format!(
                "no writable bookie outside {:?} to take {}'s replicas of ledger {ledger} \
                 (fragment at entry {})",
                frag.ensemble, frag.ensemble[pos], frag.first
            ))
        })
    }

    async fn clear(&self, ledger: u64, version: u64) -> Result<()> {
        match self.repl.mark_replicated(ledger, version).await {
            Ok(()) | Err(quire_metadata::MetaError::NotFound(_)) => Ok(()),
            // Marked again meanwhile: the next pass handles the new bookies.
            Err(quire_metadata::MetaError::BadVersion { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// The worker loop: until `stop`, repeatedly takes the marked ledgers no one holds.
pub async fn run(
    store: DynStore,
    client: Client,
    cfg: AutoRecoveryConfig,
    metrics: Arc<Metrics>,
    mut stop: watch::Receiver<bool>,
) {
    let worker = Replicator::new(store.clone(), client, cfg.clone(), metrics);
    let repl = ReplicationStore::new(store.clone());
    let mut not_before: HashMap<u64, Instant> = HashMap::new();
    let mut failures: HashMap<u64, u32> = HashMap::new();
    while !*stop.borrow() {
        let session = match Session::start(store.clone(), cfg.session_timeout).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "replication worker: no metadata session; retrying");
                if wait_or_stop(&mut stop, Duration::from_secs(1)).await {
                    return;
                }
                continue;
            }
        };
        let mut published = Instant::now() - PUBLISH_EVERY;
        while !*stop.borrow() && !session.is_lost() {
            if published.elapsed() >= PUBLISH_EVERY {
                if let Err(e) = repl
                    .publish_worker(&worker.counters(), session.lease())
                    .await
                {
                    tracing::debug!(error = %e, "could not publish worker counters");
                }
                published = Instant::now();
            }
            let mut ids = match repl.list().await {
                Ok(ids) => ids,
                Err(e) => {
                    tracing::warn!(error = %e, "replication worker: cannot list markers");
                    Vec::new()
                }
            };
            // Workers take ledgers in different orders, so they rarely meet on a lock.
            ids.shuffle(&mut rand::rng());
            let now = Instant::now();
            not_before.retain(|_, t| *t > now);
            failures.retain(|id, _| ids.contains(id));
            let mut worked = false;
            for id in ids {
                if *stop.borrow() || session.is_lost() {
                    break;
                }
                if not_before.contains_key(&id) {
                    continue;
                }
                let r = worker.process(id, &session).await;
                if !matches!(r, Err(_) | Ok(Outcome::Locked)) {
                    failures.remove(&id);
                }
                match r {
                    Ok(Outcome::Replicated { .. }) => {
                        worked = true;
                        // Progress shows in `quire autorecovery status` at once.
                        published = Instant::now() - PUBLISH_EVERY;
                    }
                    Ok(Outcome::Deferred { retry_at_ms }) => {
                        let wait = retry_at_ms.saturating_sub(now_ms()).clamp(500, 10_000);
                        not_before.insert(id, Instant::now() + Duration::from_millis(wait));
                    }
                    Ok(Outcome::Locked) => {}
                    Err(_) => {
                        // Doubling back-off: some failures last (no spare bookie, an entry
                        // no replica can serve) and should not cost a copy attempt every 5 s.
                        let n = failures.entry(id).or_insert(0);
                        let wait = (RETRY_AFTER_FAILURE * 2u32.pow((*n).min(6))).min(RETRY_MAX);
                        *n += 1;
                        not_before.insert(id, Instant::now() + wait);
                    }
                }
                if published.elapsed() >= PUBLISH_EVERY {
                    let _ = repl
                        .publish_worker(&worker.counters(), session.lease())
                        .await;
                    published = Instant::now();
                }
            }
            if !worked && wait_or_stop(&mut stop, cfg.worker_poll_interval).await {
                break;
            }
        }
        let _ = repl
            .publish_worker(&worker.counters(), session.lease())
            .await;
        let _ = session.close().await;
    }
}

/// Sleeps `d`; true when asked to stop meanwhile.
pub(crate) async fn wait_or_stop(stop: &mut watch::Receiver<bool>, d: Duration) -> bool {
    // Ok: asked to stop, or the sender is gone (its owner stopped).
    tokio::time::timeout(d, stop.wait_for(|s| *s)).await.is_ok()
}
