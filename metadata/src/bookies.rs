//! The bookie registry, cookies and the cluster instance id.
//!
//! Registration is ephemeral: a bookie's key lives under its session's lease, so a bookie that
//! dies leaves the registry once its session times out. A bookie is listed either as writable
//! or as read-only, never both for long: on a switch it creates the new key before deleting the
//! old one, so it is never missing from both (readers treat "in both" as read-only).
//!
//! Cookies tie a bookie id to its directories and to the cluster (instance id); the bookie
//! compares the stored cookie with its local one at start-up.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::{
    self, BOOKIES_READONLY, BOOKIES_WRITABLE, COOKIES, INSTANCE_ID, check_bookie_id, decode, encode,
};
use crate::store::{DynStore, LeaseId, MetaError, Result, Watch, WatchTarget, list_all};

const INFO_MAGIC: &str = "QuireBookieInfo";
const COOKIE_MAGIC: &str = "QuireCookie";
const INSTANCE_MAGIC: &str = "QuireInstance";
const VERSION: u32 = 1;

/// What a bookie publishes about itself.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BookieInfo {
    /// gRPC address clients connect to.
    pub addr: String,
    /// HTTP admin address.
    pub http: String,
    /// Placement label (zone or rack), when set.
    pub zone: Option<String>,
}

/// A registered bookie.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RegisteredBookie {
    pub id: String,
    pub info: BookieInfo,
    pub read_only: bool,
}

#[derive(Clone)]
pub struct BookieRegistry {
    store: DynStore,
}

impl BookieRegistry {
    pub fn new(store: DynStore) -> Self {
        BookieRegistry { store }
    }

    fn key(read_only: bool, id: &str) -> String {
        format!(
            "{}{id}",
            if read_only {
                BOOKIES_READONLY
            } else {
                BOOKIES_WRITABLE
            }
        )
    }

    /// Registers `id` under `lease` in the list its mode names, and removes it from the other.
    /// A leftover key of this bookie from an older session (same list) is replaced.
    pub async fn register(
        &self,
        id: &str,
        info: &BookieInfo,
        read_only: bool,
        lease: LeaseId,
    ) -> Result<()> {
        check_bookie_id(id)?;
        let key = Self::key(read_only, id);
        let value = encode(INFO_MAGIC, VERSION, info);
        loop {
            match self.store.create(&key, value.clone(), Some(lease)).await {
                Ok(_) => break,
                Err(MetaError::AlreadyExists(_)) => match self.store.get(&key).await? {
                    Some(kv) if kv.lease == lease => break,
                    Some(kv) => {
                        // A previous incarnation's key, still waiting for its lease to expire.
                        match self.store.delete(&key, Some(kv.version)).await {
                            Ok(())
                            | Err(MetaError::NotFound(_))
                            | Err(MetaError::BadVersion { .. }) => continue,
                            Err(e) => return Err(e),
                        }
                    }
                    None => continue,
                },
                Err(e) => return Err(e),
            }
        }
        match self.store.delete(&Self::key(!read_only, id), None).await {
            Ok(()) | Err(MetaError::NotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }

    pub async fn unregister(&self, id: &str) -> Result<()> {
        for ro in [false, true] {
            match self.store.delete(&Self::key(ro, id), None).await {
                Ok(()) | Err(MetaError::NotFound(_)) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Every registered bookie; one listed in both lists counts as read-only.
    pub async fn list(&self) -> Result<Vec<RegisteredBookie>> {
        let mut out: BTreeMap<String, RegisteredBookie> = BTreeMap::new();
        for (prefix, read_only) in [(BOOKIES_WRITABLE, false), (BOOKIES_READONLY, true)] {
            for kv in list_all(self.store.as_ref(), prefix).await? {
                let id = kv.key[prefix.len()..].to_string();
                let info: BookieInfo = decode(INFO_MAGIC, VERSION, &kv.key, &kv.value)?;
                out.insert(
                    id.clone(),
                    RegisteredBookie {
                        id,
                        info,
                        read_only,
                    },
                );
            }
        }
        Ok(out.into_values().collect())
    }

    pub async fn writable(&self) -> Result<Vec<RegisteredBookie>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|b| !b.read_only)
            .collect())
    }

    pub async fn read_only(&self) -> Result<Vec<RegisteredBookie>> {
        Ok(self
            .list()
            .await?
            .into_iter()
            .filter(|b| b.read_only)
            .collect())
    }

    /// Follows registrations coming and going (both lists).
    pub async fn watch(&self) -> Result<Watch> {
        self.store
            .watch(WatchTarget::Prefix(format!("{}/bookies/", layout::ROOT)))
            .await
    }
}

/// The cookie kept in the metadata store for a bookie.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredCookie {
    pub bookie_id: String,
    pub instance_id: String,
    pub journal_dir: String,
    pub ledger_dirs: Vec<String>,
}

#[derive(Clone)]
pub struct CookieStore {
    store: DynStore,
}

impl CookieStore {
    pub fn new(store: DynStore) -> Self {
        CookieStore { store }
    }

    pub async fn read(&self, bookie_id: &str) -> Result<Option<(StoredCookie, u64)>> {
        check_bookie_id(bookie_id)?;
        let key = format!("{COOKIES}{bookie_id}");
        match self.store.get(&key).await? {
            Some(kv) => Ok(Some((
                decode(COOKIE_MAGIC, VERSION, &key, &kv.value)?,
                kv.version,
            ))),
            None => Ok(None),
        }
    }

    /// Stores a new bookie's cookie; `AlreadyExists` if that id is taken.
    pub async fn create(&self, cookie: &StoredCookie) -> Result<()> {
        check_bookie_id(&cookie.bookie_id)?;
        let key = format!("{COOKIES}{}", cookie.bookie_id);
        self.store
            .create(&key, encode(COOKIE_MAGIC, VERSION, cookie), None)
            .await
            .map(|_| ())
    }

    /// Removes a decommissioned bookie's cookie.
    pub async fn delete(&self, bookie_id: &str, version: Option<u64>) -> Result<()> {
        check_bookie_id(bookie_id)?;
        self.store
            .delete(&format!("{COOKIES}{bookie_id}"), version)
            .await
    }
}

/// The cluster's instance id, created by whoever asks first.
pub async fn instance_id(store: &DynStore) -> Result<String> {
    if let Some(kv) = store.get(INSTANCE_ID).await? {
        return decode(INSTANCE_MAGIC, VERSION, INSTANCE_ID, &kv.value);
    }
    let id = format!("{:032x}", rand::random::<u128>());
    match store
        .create(INSTANCE_ID, encode(INSTANCE_MAGIC, VERSION, &id), None)
        .await
    {
        Ok(_) => Ok(id),
        Err(MetaError::AlreadyExists(_)) => {
            let kv = store
                .get(INSTANCE_ID)
                .await?
                .ok_or(MetaError::NotFound(INSTANCE_ID.into()))?;
            decode(INSTANCE_MAGIC, VERSION, INSTANCE_ID, &kv.value)
        }
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_moves_between_lists_and_follows_sessions() {
        let store: DynStore = Arc::new(crate::local::LocalStore::memory().await.unwrap());
        let reg = BookieRegistry::new(store.clone());
        let info = BookieInfo {
            addr: "127.0.0.1:1".into(),
            http: "127.0.0.1:2".into(),
            zone: Some("z1".into()),
        };
        let lease = store.grant_lease(Duration::from_secs(5)).await.unwrap();
        reg.register("b1", &info, false, lease).await.unwrap();
        assert_eq!(reg.writable().await.unwrap().len(), 1);
        reg.register("b1", &info, true, lease).await.unwrap();
        assert!(reg.writable().await.unwrap().is_empty());
        assert_eq!(reg.read_only().await.unwrap()[0].info, info);
        // A new session replaces the old registration.
        let lease2 = store.grant_lease(Duration::from_secs(5)).await.unwrap();
        reg.register("b1", &info, true, lease2).await.unwrap();
        store.revoke_lease(lease).await.unwrap();
        assert_eq!(
            reg.list().await.unwrap().len(),
            1,
            "the new session's key survives the old lease"
        );
        store.revoke_lease(lease2).await.unwrap();
        assert!(reg.list().await.unwrap().is_empty());
        assert!(reg.register("a/b", &info, false, lease2).await.is_err());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn instance_id_is_created_once_and_cookies_are_unique() {
        let store: DynStore = Arc::new(crate::local::LocalStore::memory().await.unwrap());
        let a = instance_id(&store).await.unwrap();
        assert_eq!(instance_id(&store).await.unwrap(), a);
        let cookies = CookieStore::new(store);
        let c = StoredCookie {
            bookie_id: "b1".into(),
            instance_id: a,
            journal_dir: "/j".into(),
            ledger_dirs: vec!["/l".into()],
        };
        cookies.create(&c).await.unwrap();
        assert!(matches!(
            cookies.create(&c).await,
            Err(MetaError::AlreadyExists(_))
        ));
        assert_eq!(cookies.read("b1").await.unwrap().unwrap().0, c);
        assert!(cookies.read("b2").await.unwrap().is_none());
    }
}
