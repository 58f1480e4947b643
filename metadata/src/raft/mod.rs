//! The raft layer (openraft): log store, state machine, network, and [`node::MetaNode`], which
//! serves the store API on top of them. The embedded and in-memory backends are single-voter
//! nodes of the same kind.

use std::io::Cursor;

use crate::state::{Command, Response};

pub mod log_store;
pub mod network;
pub mod node;
pub mod state_machine;

pub type NodeId = u64;
pub type Node = openraft::BasicNode;

openraft::declare_raft_types!(
    /// Quire's raft types: commands in, responses out, snapshots as byte buffers.
    pub TypeConfig:
        D = Command,
        R = Response,
        NodeId = NodeId,
        Node = Node,
        Entry = openraft::Entry<TypeConfig>,
        SnapshotData = Cursor<Vec<u8>>,
        AsyncRuntime = openraft::TokioRuntime,
);

pub type Entry = openraft::Entry<TypeConfig>;
pub type Raft = openraft::Raft<TypeConfig>;
