//! Under-replicated ledger markers and the locks replication workers take on them.
//!
//! The auditor marks a ledger with the bookies whose replicas are missing (merging with an
//! existing marker by CAS). A worker locks the ledger with an ephemeral key under its session,
//! so a worker that dies releases its lock when the session expires. Clearing a marker is a CAS
//! on the version the worker read: a ledger re-marked meanwhile (another bookie lost) stays
//! marked.

use std::collections::BTreeSet;

use serde::{Deserialize, Serialize};

use crate::layout::{UNDER_REPLICATED, UNDER_REPLICATED_LOCKS, decode, encode};
use crate::ledgers::Versioned;
use crate::store::{DynStore, LeaseId, MetaError, Result, list_all};

const MARK_MAGIC: &str = "QuireUnderReplicated";
const LOCK_MAGIC: &str = "QuireReplicationLock";
const VERSION: u32 = 1;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnderReplicated {
    /// Bookies whose replicas of this ledger are missing.
    pub missing: BTreeSet<String>,
    pub ctime_ms: u64,
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
                    let m = UnderReplicated {
                        missing: bookies.iter().cloned().collect(),
                        ctime_ms: std::time::SystemTime::now()
                            .duration_since(std::time::UNIX_EPOCH)
                            .map(|d| d.as_millis() as u64)
                            .unwrap_or(0),
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
                    m.missing.extend(bookies.iter().cloned());
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

    /// Takes the ledger's lock for `owner` under `lease`; false when someone else holds it.
    pub async fn try_lock(&self, ledger: u64, owner: &str, lease: LeaseId) -> Result<bool> {
        match self
            .store
            .create(
                &lock_key(ledger),
                encode(LOCK_MAGIC, VERSION, &owner),
                Some(lease),
            )
            .await
        {
            Ok(_) => Ok(true),
            Err(MetaError::AlreadyExists(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// Who holds the ledger's lock, if anyone.
    pub async fn lock_owner(&self, ledger: u64) -> Result<Option<String>> {
        let key = lock_key(ledger);
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some(decode(LOCK_MAGIC, VERSION, &key, &kv.value)?)),
            None => Ok(None),
        }
    }

    pub async fn unlock(&self, ledger: u64) -> Result<()> {
        match self.store.delete(&lock_key(ledger), None).await {
            Ok(()) | Err(MetaError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    /// Clears the marker if it is still at `version` (nothing was added since it was read).
    pub async fn mark_replicated(&self, ledger: u64, version: u64) -> Result<()> {
        self.store.delete(&mark_key(ledger), Some(version)).await
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
        store.revoke_lease(l1).await.unwrap();
        assert!(
            r.try_lock(7, "w2", l2).await.unwrap(),
            "a dead worker's lock goes with its session"
        );
        r.mark(7, &["b3".into()]).await.unwrap();
        assert!(matches!(
            r.mark_replicated(7, m.version).await,
            Err(MetaError::BadVersion { .. })
        ));
        let m = r.get(7).await.unwrap().unwrap();
        r.mark_replicated(7, m.version).await.unwrap();
        assert_eq!(r.list().await.unwrap(), vec![3]);
    }
}
