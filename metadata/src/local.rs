//! The store API served by a [`MetaNode`] in this process: the in-memory and embedded
//! (`file:///path`) backends, and the implementation behind every gRPC server.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;

use crate::raft::node::MetaNode;
use crate::state::{Command, Output};
use crate::store::{
    KeyValue, LeaseId, ListPage, MAX_LIST_LIMIT, MetaError, MetadataStore, Result, Watch,
    WatchTarget, check_key, check_prefix, check_target, check_ttl, check_value,
};

/// A store backed by a metadata node in this process.
#[derive(Clone)]
pub struct LocalStore {
    pub node: Arc<MetaNode>,
}

impl LocalStore {
    /// A store kept in memory only (tests).
    pub async fn memory() -> Result<Self> {
        Ok(LocalStore {
            node: MetaNode::start_single(None).await?,
        })
    }

    /// The embedded durable store in `dir` (raft log + snapshots of a single-voter node).
    pub async fn open(dir: impl Into<PathBuf>) -> Result<Self> {
        Ok(LocalStore {
            node: MetaNode::start_single(Some(dir.into())).await?,
        })
    }

    pub async fn shutdown(&self) {
        self.node.shutdown().await;
    }
}

fn kv(out: Output) -> Result<KeyValue> {
    match out {
        Output::Kv(kv) => Ok(kv),
        other => Err(MetaError::Internal(format!(
            "expected a key, got {other:?}"
        ))),
    }
}

#[async_trait]
impl MetadataStore for LocalStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        self.node.read(|s| s.get(key)).await
    }

    async fn create(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<KeyValue> {
        check_key(key)?;
        check_value(&value)?;
        kv(self
            .node
            .write(Command::Create {
                key: key.into(),
                value,
                lease: lease.unwrap_or(0),
            })
            .await?)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> Result<KeyValue> {
        check_key(key)?;
        check_value(&value)?;
        kv(self
            .node
            .write(Command::Cas {
                key: key.into(),
                value,
                expected: expected_version,
            })
            .await?)
    }

    async fn delete(&self, key: &str, expected_version: Option<u64>) -> Result<()> {
        check_key(key)?;
        self.node
            .write(Command::Delete {
                key: key.into(),
                expected: expected_version,
            })
            .await
            .map(|_| ())
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<ListPage> {
        check_prefix(prefix)?;
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(MetaError::InvalidArgument(format!(
                "list limit {limit} outside 1..={MAX_LIST_LIMIT}"
            )));
        }
        self.node
            .read(|s| {
                let (kvs, more) = s.list(prefix, start_after, limit as usize);
                ListPage {
                    kvs,
                    more,
                    revision: s.revision(),
                }
            })
            .await
    }

    async fn watch(&self, target: WatchTarget) -> Result<Watch> {
        check_target(&target)?;
        // Catch up first: a lagging follower must not replay writes acknowledged before this
        // call as if they were new.
        self.node.read(|_| ()).await?;
        self.node.watch(target)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        check_ttl(ttl)?;
        Ok(self.node.grant_lease(ttl).await?.0)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        Ok(Duration::from_millis(self.node.keep_alive(lease).await?))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        self.node
            .write(Command::RevokeLease { lease })
            .await
            .map(|_| ())
    }

    async fn allocate_id(&self, counter: &str) -> Result<u64> {
        if counter.is_empty() || counter.len() > crate::store::MAX_KEY_LEN {
            return Err(MetaError::InvalidArgument(
                "counter name must be 1..=1024 bytes".into(),
            ));
        }
        match self
            .node
            .write(Command::AllocateId {
                counter: counter.into(),
            })
            .await?
        {
            Output::Id(id) => Ok(id),
            other => Err(MetaError::Internal(format!(
                "expected an id, got {other:?}"
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::WatchEvent;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_round_trip() {
        let s = LocalStore::memory().await.unwrap();
        let kv = s
            .create("/a", Bytes::from_static(b"1"), None)
            .await
            .unwrap();
        assert_eq!(kv.version, 1);
        let mut w = s.watch(WatchTarget::Prefix("/".into())).await.unwrap();
        let kv2 = s
            .compare_and_set("/a", Bytes::from_static(b"2"), 1)
            .await
            .unwrap();
        assert_eq!(kv2.version, 2);
        assert!(matches!(
            s.compare_and_set("/a", Bytes::from_static(b"3"), 1).await,
            Err(MetaError::BadVersion { .. })
        ));
        assert_eq!(
            s.get("/a").await.unwrap().unwrap().value,
            Bytes::from_static(b"2")
        );
        assert_eq!(w.next().await, Some(WatchEvent::Put(kv2)));
        assert_eq!(s.allocate_id("ledgers").await.unwrap(), 0);
        assert_eq!(s.allocate_id("ledgers").await.unwrap(), 1);
        s.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_store_survives_a_restart() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).await.unwrap();
        for i in 0..50 {
            s.create(&format!("/k/{i:03}"), Bytes::from(vec![i as u8]), None)
                .await
                .unwrap();
        }
        let id = s.allocate_id("c").await.unwrap();
        s.shutdown().await;
        drop(s);
        let s = LocalStore::open(dir.path()).await.unwrap();
        let page = s.list("/k/", None, 100).await.unwrap();
        assert_eq!(page.kvs.len(), 50);
        assert_eq!(page.kvs[7].value[0], 7);
        assert_eq!(
            s.allocate_id("c").await.unwrap(),
            id + 1,
            "ids are never handed out twice"
        );
        s.shutdown().await;
    }
}

#[cfg(test)]
mod conformance {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn memory_store_conforms() {
        let s = LocalStore::memory().await.unwrap();
        crate::testkit::conformance::run_all(&s, "/conformance/").await;
        s.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn embedded_store_conforms() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).await.unwrap();
        crate::testkit::conformance::run_all(&s, "/conformance/").await;
        s.shutdown().await;
    }
}

#[cfg(test)]
mod durability {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_directory_serves_one_process_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let s = LocalStore::open(dir.path()).await.unwrap();
        assert!(matches!(
            LocalStore::open(dir.path()).await,
            Err(MetaError::Storage(_))
        ));
        s.shutdown().await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn damage_inside_the_log_refuses_start_but_a_torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        {
            let s = LocalStore::open(dir.path()).await.unwrap();
            for i in 0..20 {
                s.create(&format!("/k/{i:02}"), Bytes::from(vec![7u8; 100]), None)
                    .await
                    .unwrap();
            }
            s.shutdown().await;
        }
        let log = dir.path().join("raft.log");
        let good = std::fs::read(&log).unwrap();
        // A torn tail: half a record of garbage at the end.
        let mut torn = good.clone();
        torn.extend_from_slice(&[0, 0, 0, 50, 1, 2, 3]);
        std::fs::write(&log, &torn).unwrap();
        {
            let s = LocalStore::open(dir.path()).await.unwrap();
            assert_eq!(s.list("/k/", None, 100).await.unwrap().kvs.len(), 20);
            s.shutdown().await;
        }
        // A flipped byte in the middle, with valid records after it.
        let mut bad = std::fs::read(&log).unwrap();
        let mid = bad.len() / 2;
        bad[mid] ^= 0xff;
        std::fs::write(&log, &bad).unwrap();
        match LocalStore::open(dir.path()).await {
            Err(MetaError::Storage(m)) => assert!(m.contains("damaged record"), "{m}"),
            Err(e) => panic!("unexpected error {e}"),
            Ok(_) => panic!("a damaged log must not start"),
        }
    }
}
