//! Replication workers: lock an under-replicated ledger, restore its lost replicas, release.
//!
//! For each fragment naming a bookie in the ledger's marker:
//! - the bookie is gone (unregistered) or being decommissioned: pick a target by the placement
//!   policy, copy the fragment's entries of that position to it, verify, and swap it into the
//!   ensemble by CAS (an empty fragment is swapped without a copy);
//! - the bookie is registered and staying (the replica check found entries it lacks): copy the
//!   entries it lacks back to it, ensemble unchanged.
//!
//! The last fragment of a ledger that is not closed belongs to its writer, whose ensemble change
//! replaces a failed bookie. When that has not happened `open_ledger_grace` after the marker was
//! made, the writer is taken for dead: the ledger is recovered (fenced and closed) with the
//! master key kept in its metadata, and then repaired like any closed ledger.
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
use quire_metadata::bookies::BookieRegistry;
use quire_metadata::replication::{ReplicationStore, WorkerInfo, now_ms};
use quire_metadata::session::Session;
use quire_metadata::{DynStore, LeaseId};
use rand::seq::SliceRandom;
use tokio::sync::watch;

use crate::config::AutoRecoveryConfig;
use crate::error::{Error, Result};
use crate::metrics::Metrics;

/// A ledger whose replication failed is left alone this long before the next try.
const RETRY_AFTER_FAILURE: Duration = Duration::from_secs(5);
/// How often a worker republishes its counters while busy.
const PUBLISH_EVERY: Duration = Duration::from_secs(2);

/// What one pass over a ledger achieved.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every lost replica is restored and the marker is cleared (or was already gone).
    Replicated { fragments: u64, stats: CopyStats },
    /// Earlier fragments may be restored, but the open last fragment still names a lost bookie
    /// and its writer has until `retry_at_ms` to replace it.
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

    /// Locks `ledger` under `lease`, replicates it, unlocks.
    pub async fn process(&self, ledger: u64, lease: LeaseId) -> Result<Outcome> {
        if !self.repl.try_lock(ledger, &self.cfg.id, lease).await? {
            return Ok(Outcome::Locked);
        }
        self.counters.lock().current_ledger = Some(ledger);
        let r = self.replicate(ledger).await;
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
        if let Err(e) = self.repl.unlock(ledger).await {
            // The lock goes with the session at the latest.
            tracing::warn!(ledger_id = ledger, error = %e, "could not release a ledger lock");
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
            let live: BTreeSet<String> = self
                .registry
                .list()
                .await?
                .into_iter()
                .map(|b| b.id)
                .collect();
            let leaving = self.repl.decommissioning().await?;
            let moving = |b: &String| !live.contains(b) || leaving.contains(b);
            let mut tail_waits = false;
            for mut frag in admin::fragments(&meta, -1) {
                for pos in 0..frag.ensemble.len() {
                    let b = &frag.ensemble[pos].clone();
                    if !bad.contains(b) {
                        continue;
                    }
                    if frag.open_tail {
                        // The writer's, unless it stayed on a lost bookie past the grace.
                        tail_waits |= moving(b);
                        continue;
                    }
                    let s = if moving(b) {
                        let (s, target) = self
                            .move_replica(ledger, &meta, &frag, pos, &leaving)
                            .await?;
                        // So a second lost bookie of this fragment picks another target.
                        frag.ensemble[pos] = target;
                        s
                    } else {
                        // Staying: put back the entries it lacks.
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
            if !tail_waits {
                break;
            }
            let retry_at_ms = mark.value.ctime_ms + self.cfg.open_ledger_grace.as_millis() as u64;
            if now_ms() < retry_at_ms || recovered || meta.state == LedgerState::Closed {
                return Ok(Outcome::Deferred { retry_at_ms });
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
        let target = choose_replacement(
            &candidates,
            &frag.ensemble,
            pos,
            meta.write_quorum as usize,
            leaving,
            &mut rand::rng(),
        )
        .ok_or_else(|| {
            Error::NotEnoughBookies(format!(
                "no writable bookie outside {:?} to take {old}'s replicas of ledger {ledger} \
                 (fragment at entry {})",
                frag.ensemble, frag.first
            ))
        })?;
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
            let mut worked = false;
            for id in ids {
                if *stop.borrow() || session.is_lost() {
                    break;
                }
                if not_before.contains_key(&id) {
                    continue;
                }
                match worker.process(id, session.lease()).await {
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
                        not_before.insert(id, Instant::now() + RETRY_AFTER_FAILURE);
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
