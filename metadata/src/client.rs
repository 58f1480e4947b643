//! [`RemoteStore`]: the store API over gRPC to `quire metadata` nodes (or any process serving
//! the metadata service, such as `quire standalone`), for `quire://host:port[,host:port...]`.
//!
//! Any node serves any request (followers forward), so "leader discovery" is finding a node that
//! answers: on a connection failure or a retryable error the client moves to the next endpoint
//! and retries with backoff until its deadline. Reads are always retried; a write is retried only
//! when it certainly did not take effect (refused connection, or the server said so). A write
//! whose connection broke after sending fails with `Ambiguous`, never silently twice.

use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use bytes::Bytes;
use quire_proto::metadata as pb;
use quire_proto::metadata::metadata_client::MetadataClient;
use tonic::Status;
use tonic::transport::Channel;

use crate::raft::network;
use crate::store::{
    KeyValue, LeaseId, ListPage, MAX_LIST_LIMIT, MetaError, MetadataStore, Result, Watch,
    WatchTarget, check_key, check_prefix, check_target, check_ttl, check_value, watch_channel,
};
use crate::wire::{event_from_pb, from_status, kv_from_pb, never_sent};

/// How long one call keeps trying other endpoints before it gives up.
pub const CALL_DEADLINE: Duration = Duration::from_secs(15);
/// Per-attempt timeout.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(12);

pub struct RemoteStore {
    endpoints: Vec<String>,
    clients: Vec<MetadataClient<Channel>>,
    current: AtomicUsize,
}

impl RemoteStore {
    /// A client for these `host:port` endpoints; connects lazily.
    pub fn connect(endpoints: &[String]) -> Result<Self> {
        if endpoints.is_empty() {
            return Err(MetaError::InvalidArgument(
                "no metadata endpoints given".into(),
            ));
        }
        let clients = endpoints
            .iter()
            .map(|e| {
                network::client(e)
                    .map_err(|err| MetaError::InvalidArgument(format!("endpoint {e:?}: {err}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(RemoteStore {
            endpoints: endpoints.to_vec(),
            clients,
            current: AtomicUsize::new(0),
        })
    }

    pub fn endpoints(&self) -> &[String] {
        &self.endpoints
    }

    /// A raw client to the endpoint currently in use (for admin commands).
    pub fn raw(&self) -> MetadataClient<Channel> {
        self.clients[self.current.load(Ordering::Relaxed) % self.clients.len()].clone()
    }

    /// Runs `f` against the endpoints until it succeeds, fails for good, or the deadline passes.
    pub async fn call<T, F, Fut>(&self, write: bool, f: F) -> Result<T>
    where
        F: Fn(MetadataClient<Channel>) -> Fut,
        Fut: Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + CALL_DEADLINE;
        let mut backoff = Duration::from_millis(20);
        loop {
            let cur = self.current.load(Ordering::Relaxed);
            let i = cur % self.clients.len();
            let res = tokio::time::timeout(ATTEMPT_TIMEOUT, f(self.clients[i].clone())).await;
            let err = match res {
                Ok(Ok(r)) => return Ok(r.into_inner()),
                Ok(Err(s)) => {
                    // Reads are retried even when sent; writes only when never sent.
                    let e = from_status(&s, !never_sent(&s));
                    if matches!(e, MetaError::Unavailable(_) | MetaError::Ambiguous(_)) {
                        // Try another node next time.
                        let _ = self.current.compare_exchange(
                            cur,
                            (i + 1) % self.clients.len(),
                            Ordering::Relaxed,
                            Ordering::Relaxed,
                        );
                    }
                    e
                }
                Err(_) if write => {
                    return Err(MetaError::Ambiguous("metadata request timed out".into()));
                }
                Err(_) => MetaError::Unavailable("metadata request timed out".into()),
            };
            let retry = err.is_retryable() || (!write && matches!(err, MetaError::Ambiguous(_)));
            if !retry || Instant::now() + backoff > deadline {
                return Err(err);
            }
            tracing::debug!(endpoint = %self.endpoints[i], error = %err, "metadata call failed, retrying");
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(500));
        }
    }
}

/// Calls one RPC through [`RemoteStore::call`], cloning the request for each attempt.
macro_rules! rpc {
    ($store:expr, $write:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $store
            .call($write, move |mut c| {
                let req = req.clone();
                async move { c.$method(req).await }
            })
            .await
    }};
}

fn need_kv(kv: Option<pb::KeyValue>) -> Result<KeyValue> {
    kv.map(kv_from_pb)
        .ok_or_else(|| MetaError::Internal("reply without a key".into()))
}

#[async_trait]
impl MetadataStore for RemoteStore {
    async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        check_key(key)?;
        let r = rpc!(
            self,
            false,
            get,
            pb::GetRequest {
                key: key.to_string()
            }
        )?;
        Ok(r.kv.map(kv_from_pb))
    }

    async fn create(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<KeyValue> {
        check_key(key)?;
        check_value(&value)?;
        let req = pb::CreateRequest {
            key: key.to_string(),
            value,
            lease: lease.unwrap_or(0),
        };
        need_kv(rpc!(self, true, create, req)?.kv)
    }

    async fn compare_and_set(
        &self,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> Result<KeyValue> {
        check_key(key)?;
        check_value(&value)?;
        let req = pb::CompareAndSetRequest {
            key: key.to_string(),
            value,
            expected_version,
        };
        need_kv(rpc!(self, true, compare_and_set, req)?.kv)
    }

    async fn delete(&self, key: &str, expected_version: Option<u64>) -> Result<()> {
        check_key(key)?;
        let req = pb::DeleteRequest {
            key: key.to_string(),
            expected_version,
        };
        rpc!(self, true, delete, req).map(|_| ())
    }

    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<ListPage> {
        check_prefix(prefix)?;
        if limit == 0 || limit > MAX_LIST_LIMIT {
            return Err(MetaError::InvalidArgument(format!(
                "list limit {limit} outside 1..={MAX_LIST_LIMIT}"
            )));
        }
        let req = pb::ListRequest {
            prefix: prefix.to_string(),
            start_after: start_after.map(str::to_string),
            limit,
        };
        let r = rpc!(self, false, list, req)?;
        Ok(ListPage {
            kvs: r.kvs.into_iter().map(kv_from_pb).collect(),
            more: r.more,
            revision: r.revision,
        })
    }

    async fn watch(&self, target: WatchTarget) -> Result<Watch> {
        check_target(&target)?;
        let req = match &target {
            WatchTarget::Key(k) => pb::WatchRequest {
                key: k.clone(),
                prefix: false,
            },
            WatchTarget::Prefix(p) => pb::WatchRequest {
                key: p.clone(),
                prefix: true,
            },
        };
        // The server subscribes before it answers, so events after this call are not missed.
        let mut stream = rpc!(self, false, watch, req)?;
        let (tx, rx) = watch_channel();
        tokio::spawn(async move {
            loop {
                let msg = tokio::select! {
                    m = stream.message() => m,
                    // The watcher is gone: end the server's stream now, not at the next event.
                    _ = tx.closed() => return,
                };
                match msg {
                    Ok(Some(msg)) => {
                        for ev in msg.events.into_iter().filter_map(event_from_pb) {
                            if !tx.send(ev) {
                                return;
                            }
                        }
                    }
                    // The stream broke or the server went away: the watcher must re-list.
                    Ok(None) | Err(_) => {
                        tx.fail();
                        return;
                    }
                }
            }
        });
        Ok(rx)
    }

    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId> {
        check_ttl(ttl)?;
        let req = pb::GrantLeaseRequest {
            ttl_ms: ttl.as_millis() as u64,
        };
        // An ambiguous grant leaves at most an orphan lease, which expires by itself.
        Ok(rpc!(self, true, grant_lease, req)?.lease)
    }

    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration> {
        let r = rpc!(self, false, keep_alive, pb::LeaseRequest { lease })?;
        Ok(Duration::from_millis(r.ttl_ms))
    }

    async fn revoke_lease(&self, lease: LeaseId) -> Result<()> {
        rpc!(self, true, revoke_lease, pb::LeaseRequest { lease }).map(|_| ())
    }

    async fn allocate_id(&self, counter: &str) -> Result<u64> {
        let req = pb::AllocateIdRequest {
            counter: counter.to_string(),
        };
        Ok(rpc!(self, true, allocate_id, req)?.id)
    }
}
