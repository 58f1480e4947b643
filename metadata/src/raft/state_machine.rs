//! The raft state machine: the [`KvState`] plus the applied log id and membership, with
//! snapshots kept in `snapshot.bin` (magic `QSNAPSHT`, u32 version, u32 crc32c, postcard body),
//! written atomically (temp + rename). Without a directory, snapshots live in memory only.
//!
//! Watchers are fed from here: each applied command's events go to the [`WatchHub`] in log order.
//! Installing a snapshot from the leader replaces the state wholesale, so every watcher is told
//! to re-list.

use std::io::Cursor;
use std::path::PathBuf;
use std::sync::Arc;

use openraft::storage::RaftStateMachine;
use openraft::{
    AnyError, EntryPayload, LogId, RaftSnapshotBuilder, Snapshot, SnapshotMeta, StorageError,
    StorageIOError, StoredMembership,
};
use parking_lot::{Mutex, RwLock};
use serde::{Deserialize, Serialize};

use super::{Entry, Node, NodeId, TypeConfig};
use crate::state::{KvState, Output, Response};
use crate::watch::WatchHub;

const MAGIC: &[u8; 8] = b"QSNAPSHT";
const VERSION: u32 = 1;

/// What a snapshot holds.
#[derive(Clone, Default, Serialize, Deserialize)]
pub struct SmData {
    pub kv: KvState,
    pub last_applied: Option<LogId<NodeId>>,
    pub membership: StoredMembership<NodeId, Node>,
}

struct StoredSnapshot {
    meta: SnapshotMeta<NodeId, Node>,
    data: Vec<u8>,
}

/// Shared between openraft (which applies) and the node (which reads).
pub struct Shared {
    pub data: RwLock<SmData>,
    pub hub: WatchHub,
    dir: Option<PathBuf>,
    snapshot: Mutex<Option<StoredSnapshot>>,
    snapshot_seq: std::sync::atomic::AtomicU64,
}

#[derive(Clone)]
pub struct StateMachine {
    pub shared: Arc<Shared>,
}

fn sm_err(e: impl std::fmt::Display) -> StorageError<NodeId> {
    StorageIOError::write_state_machine(AnyError::error(e.to_string())).into()
}

fn encode_snapshot(meta: &SnapshotMeta<NodeId, Node>, data: &SmData) -> Vec<u8> {
    let body = postcard::to_stdvec(&(meta, data)).expect("snapshots serialize");
    let mut out = Vec::with_capacity(body.len() + 16);
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_be_bytes());
    out.extend_from_slice(&crc32c::crc32c(&body).to_be_bytes());
    out.extend_from_slice(&body);
    out
}

fn decode_snapshot(buf: &[u8]) -> Result<(SnapshotMeta<NodeId, Node>, SmData), String> {
    if buf.len() < 16 || &buf[..8] != MAGIC {
        return Err("not a quire snapshot (bad magic)".into());
    }
    let version = u32::from_be_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != VERSION {
        return Err(format!(
            "snapshot format version {version}, this build reads {VERSION}"
        ));
    }
    let crc = u32::from_be_bytes(buf[12..16].try_into().expect("4 bytes"));
    if crc32c::crc32c(&buf[16..]) != crc {
        return Err("snapshot checksum mismatch".into());
    }
    postcard::from_bytes(&buf[16..]).map_err(|e| format!("snapshot body: {e}"))
}

impl StateMachine {
    /// Opens the state machine, restoring `dir/snapshot.bin` when present.
    pub fn open(dir: Option<PathBuf>) -> std::io::Result<Self> {
        let mut data = SmData::default();
        let mut snapshot = None;
        if let Some(d) = &dir {
            let path = d.join("snapshot.bin");
            if path.exists() {
                let buf = std::fs::read(&path)?;
                let (meta, restored) = decode_snapshot(&buf).map_err(|e| {
                    std::io::Error::new(
                        std::io::ErrorKind::InvalidData,
                        format!("{}: {e}", path.display()),
                    )
                })?;
                data = restored;
                snapshot = Some(StoredSnapshot { meta, data: buf });
            }
        }
        Ok(StateMachine {
            shared: Arc::new(Shared {
                data: RwLock::new(data),
                hub: WatchHub::default(),
                dir,
                snapshot: Mutex::new(snapshot),
                snapshot_seq: Default::default(),
            }),
        })
    }

    fn persist(&self, meta: &SnapshotMeta<NodeId, Node>, bytes: &[u8]) -> std::io::Result<()> {
        if let Some(d) = &self.shared.dir {
            let tmp = d.join("snapshot.bin.tmp");
            std::fs::write(&tmp, bytes)?;
            std::fs::File::open(&tmp)?.sync_all()?;
            std::fs::rename(&tmp, d.join("snapshot.bin"))?;
            std::fs::File::open(d)?.sync_all()?;
        }
        *self.shared.snapshot.lock() = Some(StoredSnapshot {
            meta: meta.clone(),
            data: bytes.to_vec(),
        });
        Ok(())
    }
}

impl RaftSnapshotBuilder<TypeConfig> for StateMachine {
    async fn build_snapshot(&mut self) -> Result<Snapshot<TypeConfig>, StorageError<NodeId>> {
        let data = self.shared.data.read().clone();
        let seq = self
            .shared
            .snapshot_seq
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let meta = SnapshotMeta {
            last_log_id: data.last_applied,
            last_membership: data.membership.clone(),
            snapshot_id: match data.last_applied {
                Some(l) => format!("{}-{}-{seq}", l.leader_id.term, l.index),
                None => format!("0-0-{seq}"),
            },
        };
        let bytes = encode_snapshot(&meta, &data);
        self.persist(&meta, &bytes).map_err(sm_err)?;
        Ok(Snapshot {
            meta,
            snapshot: Box::new(Cursor::new(bytes)),
        })
    }
}

impl RaftStateMachine<TypeConfig> for StateMachine {
    type SnapshotBuilder = Self;

    async fn applied_state(
        &mut self,
    ) -> Result<(Option<LogId<NodeId>>, StoredMembership<NodeId, Node>), StorageError<NodeId>> {
        let d = self.shared.data.read();
        Ok((d.last_applied, d.membership.clone()))
    }

    async fn apply<I>(&mut self, entries: I) -> Result<Vec<Response>, StorageError<NodeId>>
    where
        I: IntoIterator<Item = Entry> + Send,
        I::IntoIter: Send,
    {
        let mut out = Vec::new();
        let mut d = self.shared.data.write();
        for e in entries {
            d.last_applied = Some(e.log_id);
            match e.payload {
                EntryPayload::Blank => out.push(Response::Ok(Output::Done)),
                EntryPayload::Normal(cmd) => {
                    let (res, events) = d.kv.apply(&cmd);
                    self.shared.hub.publish(&events);
                    out.push(res);
                }
                EntryPayload::Membership(m) => {
                    d.membership = StoredMembership::new(Some(e.log_id), m);
                    out.push(Response::Ok(Output::Done));
                }
            }
        }
        Ok(out)
    }

    async fn get_snapshot_builder(&mut self) -> Self::SnapshotBuilder {
        self.clone()
    }

    async fn begin_receiving_snapshot(
        &mut self,
    ) -> Result<Box<Cursor<Vec<u8>>>, StorageError<NodeId>> {
        Ok(Box::new(Cursor::new(Vec::new())))
    }

    async fn install_snapshot(
        &mut self,
        meta: &SnapshotMeta<NodeId, Node>,
        snapshot: Box<Cursor<Vec<u8>>>,
    ) -> Result<(), StorageError<NodeId>> {
        let bytes = snapshot.into_inner();
        let (_, data) = decode_snapshot(&bytes).map_err(sm_err)?;
        self.persist(meta, &bytes).map_err(sm_err)?;
        *self.shared.data.write() = data;
        self.shared.hub.resync_all();
        Ok(())
    }

    async fn get_current_snapshot(
        &mut self,
    ) -> Result<Option<Snapshot<TypeConfig>>, StorageError<NodeId>> {
        let g = self.shared.snapshot.lock();
        Ok(g.as_ref().map(|s| Snapshot {
            meta: s.meta.clone(),
            snapshot: Box::new(Cursor::new(s.data.clone())),
        }))
    }
}
