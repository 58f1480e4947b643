//! Raft messages between nodes, over the `Raft` RPC of the metadata gRPC service. Requests and
//! replies are postcard-encoded openraft types; a reply is `Result<response, RaftError>` so the
//! remote node's raft errors come back typed.

use std::time::Duration;

use openraft::error::{
    InstallSnapshotError, NetworkError, RPCError, RaftError, RemoteError, Unreachable,
};
use openraft::network::{RPCOption, RaftNetwork, RaftNetworkFactory};
use openraft::raft::{
    AppendEntriesRequest, AppendEntriesResponse, InstallSnapshotRequest, InstallSnapshotResponse,
    VoteRequest, VoteResponse,
};
use quire_proto::metadata as pb;
use quire_proto::metadata::metadata_client::MetadataClient;
use serde::Serialize;
use serde::de::DeserializeOwned;
use tonic::transport::Channel;

use super::{Node, NodeId, TypeConfig};

/// Largest gRPC message between nodes (snapshot chunks, entry batches).
pub const MAX_MESSAGE: usize = 64 << 20;

/// A lazily connecting client to `addr`.
pub fn channel(addr: &str) -> Result<Channel, tonic::transport::Error> {
    Ok(
        tonic::transport::Endpoint::from_shared(format!("http://{addr}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5))
            .connect_lazy(),
    )
}

pub fn client(addr: &str) -> Result<MetadataClient<Channel>, tonic::transport::Error> {
    Ok(MetadataClient::new(channel(addr)?)
        .max_decoding_message_size(MAX_MESSAGE)
        .max_encoding_message_size(MAX_MESSAGE))
}

#[derive(Clone, Default)]
pub struct Network;

pub struct PeerConn {
    target: NodeId,
    addr: String,
    client: Option<MetadataClient<Channel>>,
}

impl RaftNetworkFactory<TypeConfig> for Network {
    type Network = PeerConn;

    async fn new_client(&mut self, target: NodeId, node: &Node) -> PeerConn {
        PeerConn {
            target,
            addr: node.addr.clone(),
            client: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
struct Failure(String);

impl PeerConn {
    async fn call<
        Req: Serialize,
        Resp: DeserializeOwned,
        E: std::error::Error + DeserializeOwned,
    >(
        &mut self,
        kind: &str,
        req: &Req,
        timeout: Duration,
    ) -> Result<Resp, RPCError<NodeId, Node, RaftError<NodeId, E>>> {
        if self.client.is_none() {
            let c = client(&self.addr).map_err(|e| RPCError::Unreachable(Unreachable::new(&e)))?;
            self.client = Some(c);
        }
        let client = self.client.as_mut().expect("set above");
        let payload = crate::wire::encode_internal(req);
        let mut request = tonic::Request::new(pb::RaftRequest {
            kind: kind.to_string(),
            payload: payload.into(),
        });
        request.set_timeout(timeout);
        let reply = match client.raft(request).await {
            Ok(r) => r.into_inner(),
            Err(s) if s.code() == tonic::Code::Unavailable => {
                return Err(RPCError::Unreachable(Unreachable::new(&Failure(
                    s.to_string(),
                ))));
            }
            Err(s) => {
                return Err(RPCError::Network(NetworkError::new(&Failure(
                    s.to_string(),
                ))));
            }
        };
        let res: Result<Resp, RaftError<NodeId, E>> = crate::wire::decode_internal(&reply.payload)
            .map_err(|e| RPCError::Network(NetworkError::new(&Failure(e))))?;
        res.map_err(|e| RPCError::RemoteError(RemoteError::new(self.target, e)))
    }
}

impl RaftNetwork<TypeConfig> for PeerConn {
    async fn append_entries(
        &mut self,
        rpc: AppendEntriesRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<AppendEntriesResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("append", &rpc, option.hard_ttl()).await
    }

    async fn install_snapshot(
        &mut self,
        rpc: InstallSnapshotRequest<TypeConfig>,
        option: RPCOption,
    ) -> Result<
        InstallSnapshotResponse<NodeId>,
        RPCError<NodeId, Node, RaftError<NodeId, InstallSnapshotError>>,
    > {
        self.call("snapshot", &rpc, option.hard_ttl()).await
    }

    async fn vote(
        &mut self,
        rpc: VoteRequest<NodeId>,
        option: RPCOption,
    ) -> Result<VoteResponse<NodeId>, RPCError<NodeId, Node, RaftError<NodeId>>> {
        self.call("vote", &rpc, option.hard_ttl()).await
    }
}
