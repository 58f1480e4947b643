//! A metadata node: one openraft member plus what the store API needs around it.
//!
//! - Writes go through the raft log; a follower forwards them to the leader (`Propose`), once:
//!   the leader never forwards again, so a leader change mid-request surfaces as a retryable or
//!   ambiguous error rather than a loop.
//! - Reads are linearizable on every node (ReadIndex): the node learns the leader's commit index
//!   after the leader confirmed its leadership with a heartbeat round, waits until it has applied
//!   that far, then reads its own state.
//! - Leases: the leader alone keeps their deadlines, in memory. A new leader gives every lease a
//!   full TTL from the moment it takes over (as etcd does), so a leader change never expires a
//!   live session early; an expired lease is revoked through the log, deleting its keys on every
//!   replica at the same point.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use openraft::error::{ClientWriteError, RaftError};
use openraft::{ChangeMembers, Config, ServerState, SnapshotPolicy};
use parking_lot::Mutex;
use quire_proto::metadata as pb;
use quire_proto::metadata::metadata_client::MetadataClient;
use tonic::transport::Channel;

use super::log_store::LogStore;
use super::network::{self, Network};
use super::state_machine::{Shared, StateMachine};
use super::{Node, NodeId, Raft};
use crate::state::{Command, KvState, Output, Response};
use crate::store::{LeaseId, MetaError, Result, Watch, WatchTarget};
use crate::wire;
use tokio::sync::mpsc;

/// How long a write or read waits for the cluster before giving up.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the leader checks lease deadlines.
const LEASE_TICK: Duration = Duration::from_millis(100);

#[derive(Clone, Debug)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Where this node listens for peers (empty for a node without network).
    pub addr: String,
    /// Every member of the initial cluster (including this node): used by `init`.
    pub peers: BTreeMap<NodeId, String>,
    /// Log and snapshot directory; `None` keeps everything in memory.
    pub dir: Option<PathBuf>,
    pub heartbeat_ms: u64,
    pub election_timeout_ms: (u64, u64),
    /// Build a snapshot (and purge the log) after this many entries.
    pub snapshot_every: u64,
    /// Entries kept in the log behind a snapshot, for followers that lag a little.
    pub keep_logs: u64,
}

impl NodeConfig {
    /// A member of a cluster, with the timing used between processes.
    pub fn member(id: NodeId, peers: BTreeMap<NodeId, String>, dir: PathBuf) -> Self {
        NodeConfig {
            id,
            peers,
            election_timeout_ms: (500, 1000),
            ..Self::single(Some(dir))
        }
    }

    pub fn single(dir: Option<PathBuf>) -> Self {
        NodeConfig {
            id: 1,
            addr: String::new(),
            peers: BTreeMap::from([(1, String::new())]),
            dir,
            heartbeat_ms: 100,
            election_timeout_ms: (300, 600),
            snapshot_every: 20_000,
            keep_logs: 1000,
        }
    }
}

pub struct MetaNode {
    pub id: NodeId,
    pub raft: Raft,
    sm: Arc<Shared>,
    log: LogStore,
    peers: BTreeMap<NodeId, String>,
    /// Lease deadlines, kept by the leader only.
    deadlines: Mutex<HashMap<LeaseId, Instant>>,
    clients: Mutex<HashMap<String, MetadataClient<Channel>>>,
    ticker: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Writes waiting for the batcher (bounded: callers wait when it is full).
    proposals: mpsc::Sender<Proposal>,
    batcher: tokio::task::JoinHandle<()>,
    /// Held for the node's life: two processes must never share a data directory.
    _lock: Option<std::fs::File>,
}

/// Creates `dir` and takes an exclusive lock on `dir/LOCK`.
fn lock_dir(dir: &std::path::Path) -> Result<std::fs::File> {
    use std::os::fd::AsRawFd;
    let io = |e: std::io::Error| MetaError::Storage(format!("{}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join("LOCK"))
        .map_err(io)?;
    // SAFETY: flock on a file descriptor we own; no memory is involved.
    let rc = unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        return Err(MetaError::Storage(format!(
            "{} is in use by another process (its LOCK is held)",
            dir.display()
        )));
    }
    Ok(f)
}

fn storage_err(e: impl std::fmt::Display) -> MetaError {
    MetaError::Storage(e.to_string())
}

impl MetaNode {
    pub async fn start(cfg: NodeConfig) -> Result<Arc<Self>> {
        let lock = match &cfg.dir {
            Some(d) => Some(lock_dir(d)?),
            None => None,
        };
        let log = match &cfg.dir {
            Some(d) => LogStore::open(d).map_err(storage_err)?,
            None => LogStore::memory(),
        };
        let sm = StateMachine::open(cfg.dir.clone()).map_err(storage_err)?;
        let shared = sm.shared.clone();
        let config = Config {
            cluster_name: "quire-metadata".into(),
            heartbeat_interval: cfg.heartbeat_ms,
            election_timeout_min: cfg.election_timeout_ms.0,
            election_timeout_max: cfg.election_timeout_ms.1,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(cfg.snapshot_every),
            max_in_snapshot_log_to_keep: cfg.keep_logs,
            max_payload_entries: 1000,
            install_snapshot_timeout: 5000,
            ..Default::default()
        }
        .validate()
        .map_err(|e| MetaError::InvalidArgument(format!("raft config: {e}")))?;
        let raft = Raft::new(cfg.id, Arc::new(config), Network, log.clone(), sm)
            .await
            .map_err(|e| MetaError::Internal(format!("raft start: {e}")))?;
        let (proposals, rx) = mpsc::channel(PROPOSAL_QUEUE);
        let batcher = tokio::spawn(run_batcher(raft.clone(), rx));
        let node = Arc::new(MetaNode {
            id: cfg.id,
            raft,
            sm: shared,
            log,
            peers: cfg.peers,
            deadlines: Mutex::new(HashMap::new()),
            clients: Mutex::new(HashMap::new()),
            ticker: Mutex::new(None),
            proposals,
            batcher,
            _lock: lock,
        });
        let weak = Arc::downgrade(&node);
        *node.ticker.lock() = Some(tokio::spawn(async move {
            let mut tick = tokio::time::interval(LEASE_TICK);
            loop {
                tick.tick().await;
                let Some(node) = weak.upgrade() else { return };
                node.expire_leases().await;
            }
        }));
        Ok(node)
    }

    /// Starts a single-voter node (embedded or in-memory store) and waits until it leads.
    pub async fn start_single(dir: Option<PathBuf>) -> Result<Arc<Self>> {
        let node = Self::start(NodeConfig::single(dir)).await?;
        if !node
            .raft
            .is_initialized()
            .await
            .map_err(|e| MetaError::Internal(e.to_string()))?
        {
            node.init().await?;
        }
        node.raft
            .wait(Some(REQUEST_TIMEOUT))
            .current_leader(node.id, "single node elects itself")
            .await
            .map_err(|e| MetaError::Unavailable(format!("embedded store did not start: {e}")))?;
        Ok(node)
    }

    /// Creates the cluster from the configured peers. Run once, on one node.
    pub async fn init(&self) -> Result<()> {
        let members: BTreeMap<NodeId, Node> = self
            .peers
            .iter()
            .map(|(id, addr)| (*id, Node { addr: addr.clone() }))
            .collect();
        self.raft.initialize(members).await.map_err(|e| match e {
            RaftError::APIError(e) => MetaError::InvalidArgument(format!("init: {e}")),
            RaftError::Fatal(e) => MetaError::Unavailable(format!("init: {e}")),
        })
    }

    pub async fn shutdown(&self) {
        if let Some(t) = self.ticker.lock().take() {
            t.abort();
        }
        self.batcher.abort();
        let _ = self.raft.shutdown().await;
    }

    fn leader_client(&self, addr: &str) -> Result<MetadataClient<Channel>> {
        let mut g = self.clients.lock();
        if let Some(c) = g.get(addr) {
            return Ok(c.clone());
        }
        let c = network::client(addr)
            .map_err(|e| MetaError::Unavailable(format!("leader {addr}: {e}")))?;
        g.insert(addr.to_string(), c.clone());
        Ok(c)
    }

    fn is_leader(&self) -> bool {
        let m = self.raft.metrics();
        let m = m.borrow();
        m.state == ServerState::Leader && m.current_leader == Some(self.id)
    }

    /// The leader's address, when known and not this node.
    fn leader_addr(&self) -> Result<String> {
        let m = self.raft.metrics().borrow().clone();
        let leader = m
            .current_leader
            .ok_or_else(|| MetaError::Unavailable("no leader elected".into()))?;
        if leader == self.id {
            return Err(MetaError::Unavailable("leadership changing".into()));
        }
        m.membership_config
            .nodes()
            .find(|(id, _)| **id == leader)
            .map(|(_, n)| n.addr.clone())
            .filter(|a| !a.is_empty())
            .ok_or_else(|| MetaError::Unavailable(format!("leader {leader} has no address")))
    }

    /// Applies a command through the log, forwarding to the leader when needed.
    pub async fn write(&self, cmd: Command) -> Result<Output> {
        match self.write_local(cmd.clone()).await {
            Err(MetaError::Unavailable(m)) if m == NOT_LEADER => self.forward(cmd).await,
            other => other,
        }
    }

    /// Applies a command if this node leads; `Unavailable(NOT_LEADER)` otherwise.
    pub async fn write_local(&self, cmd: Command) -> Result<Output> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.proposals
            .send(Proposal { cmd, tx })
            .await
            .map_err(|_| MetaError::Unavailable("metadata node stopped".into()))?;
        match tokio::time::timeout(REQUEST_TIMEOUT, rx).await {
            Err(_) => Err(MetaError::Ambiguous("raft write timed out".into())),
            Ok(Err(_)) => Err(MetaError::Ambiguous(
                "metadata node stopped during a write".into(),
            )),
            Ok(Ok(r)) => r,
        }
    }

    async fn forward(&self, cmd: Command) -> Result<Output> {
        let addr = self.leader_addr()?;
        let mut c = self.leader_client(&addr)?;
        let payload = wire::encode_internal(&cmd);
        let mut req = tonic::Request::new(pb::RaftRequest {
            kind: "command".into(),
            payload: payload.into(),
        });
        req.set_timeout(REQUEST_TIMEOUT);
        let reply = c
            .propose(req)
            .await
            .map_err(|s| wire::from_status(&s, !wire::never_sent(&s)))?
            .into_inner();
        wire::decode_internal::<Output>(&reply.payload)
            .map_err(|e| MetaError::Internal(format!("forwarded reply: {e}")))
    }

    /// The index a linearizable read must wait for; asks the leader when this node follows.
    pub async fn read_index(&self) -> Result<u64> {
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map(|l| l.index).unwrap_or(0)),
            Err(RaftError::APIError(_)) => {
                let addr = self.leader_addr()?;
                let mut c = self.leader_client(&addr)?;
                let mut req = tonic::Request::new(pb::RaftRequest {
                    kind: "read_index".into(),
                    payload: Default::default(),
                });
                req.set_timeout(REQUEST_TIMEOUT);
                let reply = c
                    .propose(req)
                    .await
                    .map_err(|s| wire::from_status(&s, false))?
                    .into_inner();
                wire::decode_internal::<u64>(&reply.payload)
                    .map_err(|e| MetaError::Internal(e.to_string()))
            }
            Err(RaftError::Fatal(e)) => Err(MetaError::Unavailable(format!("raft stopped: {e}"))),
        }
    }

    /// The leader's read index, without forwarding (served to followers).
    pub async fn leader_read_index(&self) -> Result<u64> {
        match self.raft.get_read_log_id().await {
            Ok((read, _)) => Ok(read.map(|l| l.index).unwrap_or(0)),
            Err(_) => Err(MetaError::Unavailable(NOT_LEADER.into())),
        }
    }

    /// Runs `f` on the state once everything committed before the call is applied here.
    pub async fn read<T>(&self, f: impl FnOnce(&KvState) -> T) -> Result<T> {
        let index = self.read_index().await?;
        if index > 0 {
            self.raft
                .wait(Some(REQUEST_TIMEOUT))
                .applied_index_at_least(Some(index), "linearizable read")
                .await
                .map_err(|e| MetaError::Unavailable(format!("read: {e}")))?;
        }
        Ok(f(&self.sm.data.read().kv))
    }

    pub fn watch(&self, target: WatchTarget) -> Result<Watch> {
        self.sm.hub.subscribe(target)
    }

    pub async fn grant_lease(&self, ttl: Duration) -> Result<(LeaseId, u64)> {
        let ttl_ms = ttl.as_millis() as u64;
        match self.write(Command::GrantLease { ttl_ms }).await? {
            Output::Lease { id, ttl_ms } => {
                if self.is_leader() {
                    self.deadlines
                        .lock()
                        .insert(id, Instant::now() + Duration::from_millis(ttl_ms));
                }
                Ok((id, ttl_ms))
            }
            other => Err(MetaError::Internal(format!(
                "grant lease returned {other:?}"
            ))),
        }
    }

    /// Renews a lease on the leader (forwarding if needed); returns its TTL in milliseconds.
    pub async fn keep_alive(&self, lease: LeaseId) -> Result<u64> {
        match self.keep_alive_local(lease).await {
            Err(MetaError::Unavailable(m)) if m == NOT_LEADER => {
                let addr = self.leader_addr()?;
                let mut c = self.leader_client(&addr)?;
                let mut req = tonic::Request::new(pb::RaftRequest {
                    kind: "keepalive".into(),
                    payload: wire::encode_internal(&lease).into(),
                });
                req.set_timeout(REQUEST_TIMEOUT);
                let reply = c
                    .propose(req)
                    .await
                    .map_err(|s| wire::from_status(&s, false))?
                    .into_inner();
                wire::decode_internal::<u64>(&reply.payload)
                    .map_err(|e| MetaError::Internal(e.to_string()))
            }
            other => other,
        }
    }

    pub async fn keep_alive_local(&self, lease: LeaseId) -> Result<u64> {
        // Confirms leadership and that everything committed (the grant) is applied here.
        let index = self.leader_read_index().await?;
        self.raft
            .wait(Some(REQUEST_TIMEOUT))
            .applied_index_at_least(Some(index), "keep-alive")
            .await
            .map_err(|e| MetaError::Unavailable(format!("keep-alive: {e}")))?;
        let ttl_ms = self
            .sm
            .data
            .read()
            .kv
            .lease_ttl_ms(lease)
            .ok_or(MetaError::LeaseNotFound(lease))?;
        self.deadlines
            .lock()
            .insert(lease, Instant::now() + Duration::from_millis(ttl_ms));
        Ok(ttl_ms)
    }

    async fn expire_leases(&self) {
        if !self.is_leader() {
            self.deadlines.lock().clear();
            return;
        }
        let now = Instant::now();
        let leases: Vec<(LeaseId, u64)> = self.sm.data.read().kv.leases().collect();
        let expired: Vec<LeaseId> = {
            let mut dl = self.deadlines.lock();
            let live: BTreeSet<LeaseId> = leases.iter().map(|(id, _)| *id).collect();
            dl.retain(|id, _| live.contains(id));
            leases
                .iter()
                .filter(|(id, ttl)| {
                    *dl.entry(*id).or_insert(now + Duration::from_millis(*ttl)) <= now
                })
                .map(|(id, _)| *id)
                .collect()
        };
        for lease in expired {
            tracing::info!(lease, "lease expired");
            match self.write_local(Command::RevokeLease { lease }).await {
                Ok(_) | Err(MetaError::LeaseNotFound(_)) => {
                    self.deadlines.lock().remove(&lease);
                }
                Err(e) => tracing::warn!(lease, error = %e, "could not revoke an expired lease"),
            }
        }
    }

    pub async fn add_node(&self, id: NodeId, addr: String) -> Result<()> {
        let map_err = |e: RaftError<NodeId, ClientWriteError<NodeId, Node>>| match e {
            RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                MetaError::Unavailable(NOT_LEADER.into())
            }
            RaftError::APIError(e) => MetaError::InvalidArgument(e.to_string()),
            RaftError::Fatal(e) => MetaError::Unavailable(e.to_string()),
        };
        self.raft
            .add_learner(id, Node { addr }, true)
            .await
            .map_err(map_err)?;
        self.raft
            .change_membership(ChangeMembers::AddVoterIds(BTreeSet::from([id])), false)
            .await
            .map_err(map_err)?;
        Ok(())
    }

    pub async fn remove_node(&self, id: NodeId) -> Result<()> {
        self.raft
            .change_membership(ChangeMembers::RemoveVoters(BTreeSet::from([id])), false)
            .await
            .map_err(|e| match e {
                RaftError::APIError(ClientWriteError::ForwardToLeader(_)) => {
                    MetaError::Unavailable(NOT_LEADER.into())
                }
                RaftError::APIError(e) => MetaError::InvalidArgument(e.to_string()),
                RaftError::Fatal(e) => MetaError::Unavailable(e.to_string()),
            })?;
        Ok(())
    }

    /// The leader's address for forwarding admin requests (None when this node leads).
    pub fn admin_leader(&self) -> Result<Option<MetadataClient<Channel>>> {
        if self.is_leader() {
            return Ok(None);
        }
        let addr = self.leader_addr()?;
        Ok(Some(self.leader_client(&addr)?))
    }

    pub fn status(&self) -> pb::StatusResponse {
        let m = self.raft.metrics().borrow().clone();
        let voters: BTreeSet<NodeId> = m.membership_config.voter_ids().collect();
        let members = m
            .membership_config
            .nodes()
            .map(|(id, n)| pb::Member {
                id: *id,
                addr: n.addr.clone(),
                voter: voters.contains(id),
            })
            .collect();
        let (revision, keys) = {
            let d = self.sm.data.read();
            (d.kv.revision(), d.kv.len() as u64)
        };
        pb::StatusResponse {
            id: self.id,
            leader: m.current_leader,
            term: m.current_term,
            members,
            last_applied: m.last_applied.map(|l| l.index).unwrap_or(0),
            last_log_index: m.last_log_index.unwrap_or(self.log.last_index()),
            state: format!("{:?}", m.state),
            revision,
            keys,
        }
    }
}

/// Most writes waiting for the batcher.
const PROPOSAL_QUEUE: usize = 65_536;
/// Most commands in one log entry.
const MAX_BATCH: usize = 512;
/// Batches proposed and not yet applied at once. While they are in flight, new writes queue and
/// form the next batch, so under load each log append (one fsync) carries many writes.
const MAX_BATCHES_IN_FLIGHT: usize = 2;

struct Proposal {
    cmd: Command,
    tx: tokio::sync::oneshot::Sender<Result<Output>>,
}

/// Groups queued writes into `Command::Batch` log entries. openraft appends (and syncs) one
/// client write at a time, so without this every write would pay its own fsync on the leader.
async fn run_batcher(raft: Raft, mut rx: mpsc::Receiver<Proposal>) {
    let in_flight = Arc::new(tokio::sync::Semaphore::new(MAX_BATCHES_IN_FLIGHT));
    while let Some(first) = rx.recv().await {
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let raft = raft.clone();
        tokio::spawn(async move {
            let _permit = permit;
            propose(&raft, batch).await;
        });
    }
}

async fn propose(raft: &Raft, mut batch: Vec<Proposal>) {
    if batch.len() == 1 {
        let p = batch.pop().expect("one proposal");
        let res = client_write(raft, p.cmd)
            .await
            .and_then(Response::into_result);
        let _ = p.tx.send(res);
        return;
    }
    let (cmds, txs): (Vec<Command>, Vec<_>) = batch.into_iter().map(|p| (p.cmd, p.tx)).unzip();
    match client_write(raft, Command::Batch(cmds)).await {
        Ok(Response::Batch(results)) if results.len() == txs.len() => {
            for (r, tx) in results.into_iter().zip(txs) {
                let _ = tx.send(r.into_result());
            }
        }
        Ok(other) => {
            for tx in txs {
                let _ = tx.send(Err(MetaError::Internal(format!(
                    "batch answered with {other:?}"
                ))));
            }
        }
        Err(e) => {
            for tx in txs {
                let _ = tx.send(Err(e.clone()));
            }
        }
    }
}

async fn client_write(raft: &Raft, cmd: Command) -> Result<Response> {
    // Bounded, so that a stalled cluster cannot hold a batch slot forever.
    let Ok(res) = tokio::time::timeout(REQUEST_TIMEOUT, raft.client_write(cmd)).await else {
        return Err(MetaError::Ambiguous("raft write timed out".into()));
    };
    match res {
        Ok(r) => Ok(r.data),
        Err(RaftError::APIError(ClientWriteError::ForwardToLeader(_))) => {
            Err(MetaError::Unavailable(NOT_LEADER.into()))
        }
        Err(RaftError::APIError(ClientWriteError::ChangeMembershipError(e))) => {
            Err(MetaError::InvalidArgument(e.to_string()))
        }
        Err(RaftError::Fatal(e)) => Err(MetaError::Unavailable(format!("raft stopped: {e}"))),
    }
}

/// The message of `Unavailable` when a request reached a node that does not lead.
pub const NOT_LEADER: &str = "this node is not the leader";
