//! Under-replicated ledger markers and the locks replication workers take on them; the auditor's
//! election key, the workers' published counters and decommission marks.
//!
//! The auditor marks a ledger with the bookies whose replicas are missing (merging with an
//! existing marker by CAS). A worker locks the ledger with an ephemeral key under its session,
//! so a worker that dies releases its lock when the session expires. Clearing a marker is a CAS
//! on the version the worker read: a ledger re-marked meanwhile (another bookie lost) stays
//! marked.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::layout::{
    AUDITOR, DECOMMISSIONING, UNDER_REPLICATED, UNDER_REPLICATED_LOCKS, WORKERS, check_bookie_id,
    decode, encode,
};
use crate::ledgers::Versioned;
use crate::store::{DynStore, LeaseId, MetaError, Result, list_all};

const MARK_MAGIC: &str = "QuireUnderReplicated";
const LOCK_MAGIC: &str = "QuireReplicationLock";
const AUDITOR_MAGIC: &str = "QuireAuditor";
const WORKER_MAGIC: &str = "QuireReplicationWorker";
const DECOMMISSION_MAGIC: &str = "QuireDecommission";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderReplicated {
    /// Bookies whose replicas of this ledger are missing.
    pub missing: BTreeSet<String>,
    pub ctime_ms: u64,
    /// When each bookie of `missing` was added (ms); older markers lack it (use `ctime_ms`).
    #[serde(default)]
    pub since_ms: std::collections::BTreeMap<String, u64>,
}

impl UnderReplicated {
    /// When `bookie` was marked missing.
    pub fn marked_ms(&self, bookie: &str) -> u64 {
        self.since_ms.get(bookie).copied().unwrap_or(self.ctime_ms)
    }
}

/// The active auditor, as published under its election key.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditorInfo {
    pub id: String,
    /// When it became the active auditor, milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// Bookies it saw leave (or found referenced but unregistered), with when, in ms.
    #[serde(default)]
    pub lost_bookies: std::collections::BTreeMap<String, u64>,
    #[serde(default)]
    pub ledgers_marked: u64,
    /// Ledgers whose write sets break the zone rules, at the last placement check.
    #[serde(default)]
    pub placement_violations: u64,
    #[serde(default)]
    pub last_bookie_check_ms: u64,
    #[serde(default)]
    pub last_replica_check_ms: u64,
    #[serde(default)]
    pub last_placement_check_ms: u64,
}

/// A replication worker's counters, published under its session.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkerInfo {
    pub id: String,
    pub ledgers_replicated: u64,
    pub fragments_replicated: u64,
    pub entries_replicated: u64,
    pub bytes_replicated: u64,
    pub failures: u64,
    /// The ledger it is working on.
    pub current_ledger: Option<u64>,
    pub updated_ms: u64,
}

/// A bookie being emptied: placement gives it no new replicas; autorecovery moves its replicas.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Decommission {
    pub since_ms: u64,
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[derive(Clone)]
pub struct ReplicationStore {
    store: DynStore,
}

fn mark_key(ledger: u64) -> String {
    format!("{UNDER_REPLICATED}{ledger:020}")
}

fn lock_key(ledger: u64) -> String {
    format!("{UNDER_REPLICATED_LOCKS}{ledger:020}")
}

impl ReplicationStore {
    pub fn new(store: DynStore) -> Self {
        ReplicationStore { store }
    }

    /// Marks `ledger` as missing replicas on `bookies` (merged into any existing marker).
    pub async fn mark(&self, ledger: u64, bookies: &[String]) -> Result<()> {
        let key = mark_key(ledger);
        loop {
            match self.store.get(&key).await? {
                None => {
                    let now = now_ms();
                    let m = UnderReplicated {
                        missing: bookies.iter().cloned().collect(),
                        ctime_ms: now,
                        since_ms: bookies.iter().map(|b| (b.clone(), now)).collect(),
                    };
                    match self
                        .store
                        .create(&key, encode(MARK_MAGIC, VERSION, &m), None)
                        .await
                    {
                        Err(MetaError::AlreadyExists(_)) => continue,
                        other => return other.map(|_| ()),
                    }
                }
                Some(kv) => {
                    let mut m: UnderReplicated = decode(MARK_MAGIC, VERSION, &key, &kv.value)?;
                    let before = m.missing.len();
                    let now = now_ms();
                    for b in bookies {
                        if m.missing.insert(b.clone()) {
                            m.since_ms.insert(b.clone(), now);
                        }
                    }
                    if m.missing.len() == before {
                        return Ok(());
                    }
                    match self
                        .store
                        .compare_and_set(&key, encode(MARK_MAGIC, VERSION, &m), kv.version)
                        .await
                    {
                        Err(MetaError::BadVersion { .. }) | Err(MetaError::NotFound(_)) => continue,
                        other => return other.map(|_| ()),
                    }
                }
            }
        }
    }

    pub async fn get(&self, ledger: u64) -> Result<Option<Versioned<UnderReplicated>>> {
        let key = mark_key(ledger);
        Ok(match self.store.get(&key).await? {
            Some(kv) => Some(Versioned {
                value: decode(MARK_MAGIC, VERSION, &key, &kv.value)?,
                version: kv.version,
            }),
            None => None,
        })
    }

    /// Every marked ledger id, in order.
    pub async fn list(&self) -> Result<Vec<u64>> {
        Ok(list_all(self.store.as_ref(), UNDER_REPLICATED)
            .await?
            .iter()
            .filter_map(|kv| kv.key[UNDER_REPLICATED.len()..].parse().ok())
            .collect())
    }

    /// Creates an ephemeral `key` under `lease`; true when it exists under that lease afterwards
    /// (also when an ambiguous earlier attempt of ours created it), false when another lease
    /// holds it.
    async fn create_owned(&self, key: &str, value: bytes::Bytes, lease: LeaseId) -> Result<bool> {
        match self.store.create(key, value, Some(lease)).await {
            Ok(_) => Ok(true),
            Err(MetaError::AlreadyExists(_)) | Err(MetaError::Ambiguous(_)) => Ok(self
                .store
                .get(key)
                .await?
                .is_some_and(|kv| kv.lease == lease)),
            Err(e) => Err(e),
        }
    }

    /// Takes the ledger's lock for `owner` under `lease`; false when someone else holds it.
    pub async fn try_lock(&self, ledger: u64, owner: &str, lease: LeaseId) -> Result<bool> {
        self.create_owned(
            &lock_key(ledger),
            encode(LOCK_MAGIC, VERSION, &owner),
            lease,
        )
        .await
    }

    /// Who holds the ledger's lock, if anyone.
    pub async fn lock_owner(&self, ledger: u64) -> Result<Option<String>> {
        let key = lock_key(ledger);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(decode(LOCK_MAGIC, VERSION, &key, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Releases the ledger's lock if `lease` still holds it (a lock that expired and was taken
    /// by another worker is left alone).
    pub async fn unlock(&self, ledger: u64, lease: LeaseId) -> Result<()> {
        let key = lock_key(ledger);
        match self.store.get(&key).await? {
            Some(kv) if kv.lease == lease => {
                match self.store.delete(&key, Some(kv.version)).await {
                    Ok(()) | Err(MetaError::NotFound(_)) | Err(MetaError::BadVersion { .. }) => {
                        Ok(())
                    }
                    Err(e) => Err(e),
                }
            }
            _ => Ok(()),
        }
    }

    /// Clears the marker if it is still at `version` (nothing was added since it was read).
    pub async fn mark_replicated(&self, ledger: u64, version: u64) -> Result<()> {
        self.store.delete(&mark_key(ledger), Some(version)).await
    }

    /// Locked ledgers and their owners, in ledger order.
    pub async fn locks(&self) -> Result<Vec<(u64, String)>> {
        let mut out = Vec::new();
        for kv in list_all(self.store.as_ref(), UNDER_REPLICATED_LOCKS).await? {
            if let Ok(id) = kv.key[UNDER_REPLICATED_LOCKS.len()..].parse() {
                out.push((id, decode(LOCK_MAGIC, VERSION, &kv.key, &kv.value)?));
            }
        }
        Ok(out)
    }

    /// Tries to become the active auditor under `lease`; false while another one is.
    pub async fn try_become_auditor(&self, id: &str, lease: LeaseId) -> Result<bool> {
        let info = AuditorInfo {
            id: id.to_string(),
            since_ms: now_ms(),
            lost_bookies: Default::default(),
            ledgers_marked: 0,
            placement_violations: 0,
            last_bookie_check_ms: 0,
            last_replica_check_ms: 0,
            last_placement_check_ms: 0,
        };
        self.create_owned(AUDITOR, encode(AUDITOR_MAGIC, VERSION, &info), lease)
            .await
    }

    /// The active auditor, if any.
    pub async fn auditor(&self) -> Result<Option<AuditorInfo>> {
        match self.store.get(AUDITOR).await? {
            Some(kv) => Ok(Some(decode(AUDITOR_MAGIC, VERSION, AUDITOR, &kv.value)?)),
            None => Ok(None),
        }
    }

    /// Replaces the published state of the active auditor `info.id`; false when another
    /// auditor holds the key (this one lost its election).
    pub async fn update_auditor(&self, info: &AuditorInfo) -> Result<bool> {
        let Some(kv) = self.store.get(AUDITOR).await? else {
            return Ok(false);
        };
        let cur: AuditorInfo = decode(AUDITOR_MAGIC, VERSION, AUDITOR, &kv.value)?;
        if cur.id != info.id {
            return Ok(false);
        }
        match self
            .store
            .compare_and_set(AUDITOR, encode(AUDITOR_MAGIC, VERSION, info), kv.version)
            .await
        {
            Ok(_) => Ok(true),
            Err(MetaError::BadVersion { .. }) | Err(MetaError::NotFound(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Publishes a worker's counters under `lease` (created on first call, then replaced).
    pub async fn publish_worker(&self, info: &WorkerInfo, lease: LeaseId) -> Result<()> {
        let key = format!("{WORKERS}{}", info.id);
        let value = encode(WORKER_MAGIC, VERSION, info);
        match self.store.get(&key).await? {
            Some(kv) if kv.lease == lease => self
                .store
                .compare_and_set(&key, value, kv.version)
                .await
                .map(|_| ()),
            Some(kv) => {
                // A previous session of the same worker id: replace it.
                self.store.delete(&key, Some(kv.version)).await?;
                self.store
                    .create(&key, value, Some(lease))
                    .await
                    .map(|_| ())
            }
            None => self
                .store
                .create(&key, value, Some(lease))
                .await
                .map(|_| ()),
        }
    }

    /// Every live worker's counters.
    pub async fn workers(&self) -> Result<Vec<WorkerInfo>> {
        list_all(self.store.as_ref(), WORKERS)
            .await?
            .iter()
            .map(|kv| decode(WORKER_MAGIC, VERSION, &kv.key, &kv.value))
            .collect()
    }

    /// Marks `bookie` as being decommissioned (idempotent).
    pub async fn start_decommission(&self, bookie: &str) -> Result<()> {
        check_bookie_id(bookie)?;
        let d = Decommission { since_ms: now_ms() };
        match self
            .store
            .create(
                &format!("{DECOMMISSIONING}{bookie}"),
                encode(DECOMMISSION_MAGIC, VERSION, &d),
                None,
            )
            .await
        {
            Ok(_) | Err(MetaError::AlreadyExists(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Bookies being decommissioned.
    pub async fn decommissioning(&self) -> Result<BTreeSet<String>> {
        Ok(list_all(self.store.as_ref(), DECOMMISSIONING)
            .await?
            .into_iter()
            .map(|kv| kv.key[DECOMMISSIONING.len()..].to_string())
            .collect())
    }

    /// Removes a decommission mark (the bookie is empty, or the operator gave up).
    pub async fn end_decommission(&self, bookie: &str) -> Result<()> {
        check_bookie_id(bookie)?;
        match self
            .store
            .delete(&format!("{DECOMMISSIONING}{bookie}"), None)
            .await
        {
            Ok(()) | Err(MetaError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn markers_merge_and_locks_are_exclusive() {
        let store: DynStore = Arc::new(crate::local::LocalStore::memory().await.unwrap());
        let r = ReplicationStore::new(store.clone());
        r.mark(7, &["b1".into()]).await.unwrap();
        r.mark(7, &["b2".into()]).await.unwrap();
        r.mark(3, &["b1".into()]).await.unwrap();
        assert_eq!(r.list().await.unwrap(), vec![3, 7]);
        let m = r.get(7).await.unwrap().unwrap();
        assert_eq!(m.value.missing.len(), 2);
        let l1 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
        let l2 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
        assert!(r.try_lock(7, "w1", l1).await.unwrap());
        assert!(!r.try_lock(7, "w2", l2).await.unwrap());
        assert_eq!(r.lock_owner(7).await.unwrap().as_deref(), Some("w1"));
        assert!(r.try_lock(7, "w1", l1).await.unwrap(), "held by us already");
        r.unlock(7, l2).await.unwrap();
        assert_eq!(
            r.lock_owner(7).await.unwrap().as_deref(),
            Some("w1"),
            "only the holder unlocks"
        );
        store.revoke_lease(l1).await.unwrap();
        assert!(
            r.try_lock(7, "w2", l2).await.unwrap(),
            "a dead worker's lock goes with its session"
        );
        r.unlock(7, l2).await.unwrap();
        assert_eq!(r.lock_owner(7).await.unwrap(), None);
        r.mark(7, &["b3".into()]).await.unwrap();
        assert!(matches!(
            r.mark_replicated(7, m.version).await,
            Err(MetaError::BadVersion { .. })
        ));
        let m = r.get(7).await.unwrap().unwrap();
        r.mark_replicated(7, m.version).await.unwrap();
        assert_eq!(r.list().await.unwrap(), vec![3]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn one_auditor_at_a_time_and_workers_publish() {
        let store: DynStore = Arc::new(crate::local::LocalStore::memory().await.unwrap());
        let r = ReplicationStore::new(store.clone());
        let l1 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
        let l2 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
        assert!(r.try_become_auditor("a1", l1).await.unwrap());
        assert!(!r.try_become_auditor("a2", l2).await.unwrap());
        assert_eq!(r.auditor().await.unwrap().unwrap().id, "a1");
        store.revoke_lease(l1).await.unwrap();
        assert!(r.try_become_auditor("a2", l2).await.unwrap());
        let mut a = r.auditor().await.unwrap().unwrap();
        a.ledgers_marked = 3;
        assert!(r.update_auditor(&a).await.unwrap());
        assert_eq!(r.auditor().await.unwrap().unwrap().ledgers_marked, 3);
        a.id = "a1".into();
        assert!(
            !r.update_auditor(&a).await.unwrap(),
            "not the active auditor"
        );

        let mut w = WorkerInfo {
            id: "w1".into(),
            ..Default::default()
        };
        r.publish_worker(&w, l2).await.unwrap();
        w.bytes_replicated = 42;
        r.publish_worker(&w, l2).await.unwrap();
        assert_eq!(r.workers().await.unwrap(), vec![w]);

        r.start_decommission("b1").await.unwrap();
        r.start_decommission("b1").await.unwrap();
        assert_eq!(r.decommissioning().await.unwrap().len(), 1);
        r.end_decommission("b1").await.unwrap();
        assert!(r.decommissioning().await.unwrap().is_empty());
        assert!(r.start_decommission("a/b").await.is_err());
    }
}
