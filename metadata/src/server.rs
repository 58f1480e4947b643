//! The `quire.metadata.v1.Metadata` gRPC service over a [`MetaNode`]: the client API (every node
//! answers; followers forward), cluster administration, and the raft transport between nodes.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::Stream;
use openraft::error::{InstallSnapshotError, RaftError};
use openraft::raft::{AppendEntriesRequest, InstallSnapshotRequest, VoteRequest};
use quire_proto::metadata as pb;
use quire_proto::metadata::metadata_server::{Metadata, MetadataServer};
use tokio::net::TcpListener;
use tonic::{Request, Response, Status};

use crate::local::LocalStore;
use crate::raft::network::MAX_MESSAGE;
use crate::raft::node::{MetaNode, NodeConfig};
use crate::raft::{NodeId, TypeConfig};
use crate::state::Command;
use crate::store::{MetaError, MetadataStore, WatchEvent, WatchTarget};
use crate::wire::{self, kv_to_pb, to_status};

/// Events sent per watch message at most.
const WATCH_BATCH: usize = 256;

pub struct MetadataService {
    store: LocalStore,
}

impl MetadataService {
    pub fn new(node: Arc<MetaNode>) -> Self {
        MetadataService {
            store: LocalStore { node },
        }
    }

    pub fn into_server(self) -> MetadataServer<Self> {
        MetadataServer::new(self)
            .max_decoding_message_size(MAX_MESSAGE)
            .max_encoding_message_size(MAX_MESSAGE)
    }

    fn node(&self) -> &MetaNode {
        &self.store.node
    }
}

fn st(e: MetaError) -> Status {
    to_status(&e)
}

fn decode<T: serde::de::DeserializeOwned>(payload: &[u8]) -> Result<T, Status> {
    wire::decode_internal(payload)
        .map_err(|e| Status::invalid_argument(format!("bad internal payload: {e}")))
}

fn encode<T: serde::Serialize>(v: &T) -> Result<Response<pb::RaftResponse>, Status> {
    Ok(Response::new(pb::RaftResponse {
        payload: wire::encode_internal(v).into(),
    }))
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Metadata for MetadataService {
    async fn get(&self, req: Request<pb::GetRequest>) -> Result<Response<pb::GetResponse>, Status> {
        let kv = self.store.get(&req.into_inner().key).await.map_err(st)?;
        Ok(Response::new(pb::GetResponse {
            kv: kv.map(kv_to_pb),
        }))
    }

    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::KvResponse>, Status> {
        let r = req.into_inner();
        let lease = (r.lease != 0).then_some(r.lease);
        let kv = self
            .store
            .create(&r.key, r.value, lease)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::KvResponse {
            kv: Some(kv_to_pb(kv)),
        }))
    }

    async fn compare_and_set(
        &self,
        req: Request<pb::CompareAndSetRequest>,
    ) -> Result<Response<pb::KvResponse>, Status> {
        let r = req.into_inner();
        let kv = self
            .store
            .compare_and_set(&r.key, r.value, r.expected_version)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::KvResponse {
            kv: Some(kv_to_pb(kv)),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        let r = req.into_inner();
        self.store
            .delete(&r.key, r.expected_version)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        let r = req.into_inner();
        let page = self
            .store
            .list(&r.prefix, r.start_after.as_deref(), r.limit)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::ListResponse {
            kvs: page.kvs.into_iter().map(kv_to_pb).collect(),
            more: page.more,
            revision: page.revision,
        }))
    }

    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<pb::WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let r = req.into_inner();
        let target = if r.prefix {
            WatchTarget::Prefix(r.key)
        } else {
            WatchTarget::Key(r.key)
        };
        let mut watch = self.store.watch(target).await.map_err(st)?;
        let stream = async_stream(move |tx| async move {
            while let Some(ev) = watch.next().await {
                let resync = ev == WatchEvent::Resync;
                let mut events = vec![wire::event_to_pb(ev)];
                // Batch whatever else is ready, without waiting.
                while events.len() < WATCH_BATCH && !resync {
                    match futures::FutureExt::now_or_never(watch.next()) {
                        Some(Some(ev)) => {
                            let stop = ev == WatchEvent::Resync;
                            events.push(wire::event_to_pb(ev));
                            if stop {
                                break;
                            }
                        }
                        _ => break,
                    }
                }
                if tx.send(Ok(pb::WatchResponse { events })).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn grant_lease(
        &self,
        req: Request<pb::GrantLeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let ttl = Duration::from_millis(req.into_inner().ttl_ms);
        crate::store::check_ttl(ttl).map_err(st)?;
        let (lease, ttl_ms) = self.node().grant_lease(ttl).await.map_err(st)?;
        Ok(Response::new(pb::LeaseResponse { lease, ttl_ms }))
    }

    async fn keep_alive(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::LeaseResponse>, Status> {
        let lease = req.into_inner().lease;
        let ttl_ms = self.node().keep_alive(lease).await.map_err(st)?;
        Ok(Response::new(pb::LeaseResponse { lease, ttl_ms }))
    }

    async fn revoke_lease(
        &self,
        req: Request<pb::LeaseRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.store
            .revoke_lease(req.into_inner().lease)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn allocate_id(
        &self,
        req: Request<pb::AllocateIdRequest>,
    ) -> Result<Response<pb::AllocateIdResponse>, Status> {
        let id = self
            .store
            .allocate_id(&req.into_inner().counter)
            .await
            .map_err(st)?;
        Ok(Response::new(pb::AllocateIdResponse { id }))
    }

    async fn init(
        &self,
        _req: Request<pb::InitRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        self.node().init().await.map_err(st)?;
        self.node()
            .raft
            .wait(Some(Duration::from_secs(10)))
            .metrics(|m| m.current_leader.is_some(), "a leader is elected")
            .await
            .map_err(|e| st(MetaError::Unavailable(format!("no leader after init: {e}"))))?;
        Ok(Response::new(self.node().status()))
    }

    async fn add_node(
        &self,
        req: Request<pb::AddNodeRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        if let Some(mut leader) = self.node().admin_leader().map_err(st)? {
            return leader.add_node(req).await;
        }
        let r = req.into_inner();
        if r.addr.parse::<SocketAddr>().is_err() {
            return Err(st(MetaError::InvalidArgument(format!(
                "node address {:?} is not host:port",
                r.addr
            ))));
        }
        self.node().add_node(r.id, r.addr).await.map_err(st)?;
        Ok(Response::new(self.node().status()))
    }

    async fn remove_node(
        &self,
        req: Request<pb::RemoveNodeRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        if let Some(mut leader) = self.node().admin_leader().map_err(st)? {
            return leader.remove_node(req).await;
        }
        self.node()
            .remove_node(req.into_inner().id)
            .await
            .map_err(st)?;
        Ok(Response::new(self.node().status()))
    }

    async fn status(
        &self,
        _req: Request<pb::StatusRequest>,
    ) -> Result<Response<pb::StatusResponse>, Status> {
        Ok(Response::new(self.node().status()))
    }

    async fn raft(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let r = req.into_inner();
        let raft = &self.node().raft;
        match r.kind.as_str() {
            "append" => {
                let rpc: AppendEntriesRequest<TypeConfig> = decode(&r.payload)?;
                encode(&raft.append_entries(rpc).await)
            }
            "vote" => {
                let rpc: VoteRequest<NodeId> = decode(&r.payload)?;
                encode(&raft.vote(rpc).await)
            }
            "snapshot" => {
                let rpc: InstallSnapshotRequest<TypeConfig> = decode(&r.payload)?;
                let res: Result<_, RaftError<NodeId, InstallSnapshotError>> =
                    raft.install_snapshot(rpc).await;
                encode(&res)
            }
            other => Err(Status::invalid_argument(format!(
                "unknown raft message {other:?}"
            ))),
        }
    }

    async fn propose(
        &self,
        req: Request<pb::RaftRequest>,
    ) -> Result<Response<pb::RaftResponse>, Status> {
        let r = req.into_inner();
        let node = self.node();
        match r.kind.as_str() {
            "command" => {
                let cmd: Command = decode(&r.payload)?;
                encode(&node.write_local(cmd).await.map_err(st)?)
            }
            "read_index" => encode(&node.leader_read_index().await.map_err(st)?),
            "keepalive" => {
                let lease: u64 = decode(&r.payload)?;
                encode(&node.keep_alive_local(lease).await.map_err(st)?)
            }
            other => Err(Status::invalid_argument(format!(
                "unknown proposal {other:?}"
            ))),
        }
    }
}

/// A server-streaming response fed by a task through a bounded channel.
fn async_stream<F, Fut>(f: F) -> WatchStream
where
    F: FnOnce(tokio::sync::mpsc::Sender<Result<pb::WatchResponse, Status>>) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    tokio::spawn(f(tx));
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

/// A running metadata server (a raft node, or an embedded store served over gRPC).
pub struct MetadataServerHandle {
    pub node: Arc<MetaNode>,
    pub addr: SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl MetadataServerHandle {
    pub fn store(&self) -> LocalStore {
        LocalStore {
            node: self.node.clone(),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(5), &mut self.task).await;
        self.node.shutdown().await;
    }
}

/// Serves `node` on an already bound listener.
pub fn serve(node: Arc<MetaNode>, listener: TcpListener) -> std::io::Result<MetadataServerHandle> {
    let addr = listener.local_addr()?;
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let svc = MetadataService::new(node.clone()).into_server();
    // Accepted sockets need TCP_NODELAY set here: the builder's `tcp_nodelay` only applies to
    // listeners tonic binds itself, and Nagle + delayed ACKs add ~40 ms to small replies.
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let task = tokio::spawn(async move {
        let res = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(Duration::from_secs(10)))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async {
                let _ = rx.await;
            })
            .await;
        if let Err(e) = res {
            tracing::error!(error = %e, "metadata server failed");
        }
    });
    Ok(MetadataServerHandle {
        node,
        addr,
        shutdown: Some(tx),
        task,
    })
}

/// Starts a raft node listening on `listen` (port 0 allowed). `cfg.peers` maps the initial
/// members (used by `init`); this node's own entry and `cfg.addr` become the bound address.
pub async fn start_node(
    listen: SocketAddr,
    mut cfg: NodeConfig,
) -> Result<MetadataServerHandle, MetaError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| MetaError::Unavailable(format!("bind {listen}: {e}")))?;
    let addr = listener
        .local_addr()
        .map_err(|e| MetaError::Internal(e.to_string()))?;
    cfg.peers.insert(cfg.id, addr.to_string());
    cfg.addr = addr.to_string();
    let node = MetaNode::start(cfg).await?;
    serve(node, listener).map_err(|e| MetaError::Internal(e.to_string()))
}

/// Serves an embedded store (a single-voter node in `dir`) over gRPC, as `quire standalone` does.
pub async fn serve_embedded(
    listen: SocketAddr,
    dir: std::path::PathBuf,
) -> Result<MetadataServerHandle, MetaError> {
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|e| MetaError::Unavailable(format!("bind {listen}: {e}")))?;
    let node = MetaNode::start_single(Some(dir)).await?;
    serve(node, listener).map_err(|e| MetaError::Internal(e.to_string()))
}
