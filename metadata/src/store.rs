//! The metadata store contract that every backend implements.
//!
//! Keys are UTF-8 paths starting with `/`; values are bytes. Each key carries a `version` (1 when
//! created, +1 per update) and the store-wide `revision` of its creation and last change, as in
//! etcd. Every mutation is a compare-and-set, so no writer overwrites another blindly.
//!
//! Watches: start the watch, then list; events with `mod_revision` above the list's revision are
//! news. A watcher that falls behind is never dropped silently: its stream ends with
//! [`WatchEvent::Resync`], after which it must re-list.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 1024;
/// Largest value, in bytes (etcd's default request cap is 1.5 MiB).
pub const MAX_VALUE_LEN: usize = 1024 * 1024;
/// Most keys one list call returns.
pub const MAX_LIST_LIMIT: u32 = 10_000;
/// Shortest and longest lease time-to-live.
pub const MIN_LEASE_TTL: Duration = Duration::from_millis(500);
pub const MAX_LEASE_TTL: Duration = Duration::from_secs(3600);
/// Events buffered per watcher before it is told to re-list.
pub const WATCH_BUFFER: usize = 4096;

/// A lease (session) id; keys created under a lease vanish when it expires.
pub type LeaseId = u64;

/// One key with its value and version stamps.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyValue {
    pub key: String,
    pub value: Bytes,
    /// 1 at creation, +1 per update.
    pub version: u64,
    pub create_revision: u64,
    pub mod_revision: u64,
    /// 0 when the key is not bound to a lease.
    pub lease: LeaseId,
}

/// One page of a prefix listing, ordered by key.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ListPage {
    pub kvs: Vec<KeyValue>,
    /// More keys follow the last one returned.
    pub more: bool,
    /// The store revision the page was read at.
    pub revision: u64,
}

/// What a watch follows.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchTarget {
    Key(String),
    Prefix(String),
}

impl WatchTarget {
    pub fn matches(&self, key: &str) -> bool {
        match self {
            WatchTarget::Key(k) => k == key,
            WatchTarget::Prefix(p) => key.starts_with(p.as_str()),
        }
    }

    pub fn path(&self) -> &str {
        match self {
            WatchTarget::Key(k) | WatchTarget::Prefix(k) => k,
        }
    }
}

/// A change seen by a watcher.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum WatchEvent {
    Put(KeyValue),
    Delete {
        key: String,
        mod_revision: u64,
    },
    /// Events were lost (the watcher fell behind, or its connection broke): re-list.
    Resync,
}

/// Errors of the metadata API. Each has a stable code for the wire ([`MetaError::code`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MetaError {
    #[error("key not found: {0}")]
    NotFound(String),
    #[error("key already exists: {0}")]
    AlreadyExists(String),
    #[error("version mismatch on {key}: expected {expected}, found {actual}")]
    BadVersion {
        key: String,
        expected: u64,
        actual: u64,
    },
    #[error("lease {0} not found (expired or revoked)")]
    LeaseNotFound(LeaseId),
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    #[error("too large: {0}")]
    TooLarge(String),
    /// Transient: no leader, node starting, connection refused. Safe to retry.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// The request may or may not have taken effect (timeout or a connection lost after sending).
    #[error("outcome unknown: {0}")]
    Ambiguous(String),
    #[error("storage error: {0}")]
    Storage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl MetaError {
    /// Stable numeric codes, shared with `quire.metadata.v1.ErrorCode`.
    pub fn code(&self) -> i32 {
        match self {
            MetaError::NotFound(_) => 1,
            MetaError::AlreadyExists(_) => 2,
            MetaError::BadVersion { .. } => 3,
            MetaError::LeaseNotFound(_) => 4,
            MetaError::InvalidArgument(_) => 5,
            MetaError::TooLarge(_) => 6,
            MetaError::Unavailable(_) => 7,
            MetaError::Ambiguous(_) => 8,
            MetaError::Storage(_) => 9,
            MetaError::Internal(_) => 10,
        }
    }

    /// Whether the request certainly did not take effect and may be sent again.
    pub fn is_retryable(&self) -> bool {
        matches!(self, MetaError::Unavailable(_))
    }
}

pub type Result<T, E = MetaError> = std::result::Result<T, E>;

/// The versioned key-value store that coordinates Quire.
#[async_trait]
pub trait MetadataStore: Send + Sync + 'static {
    /// Reads a key (linearizable).
    async fn get(&self, key: &str) -> Result<Option<KeyValue>>;
    /// Creates a key; fails with `AlreadyExists` if present. With a lease, the key is ephemeral.
    async fn create(&self, key: &str, value: Bytes, lease: Option<LeaseId>) -> Result<KeyValue>;
    /// Replaces the value if the key is at `expected_version`; keeps the key's lease.
    async fn compare_and_set(
        &self,
        key: &str,
        value: Bytes,
        expected_version: u64,
    ) -> Result<KeyValue>;
    /// Deletes a key, only at `expected_version` when one is given.
    async fn delete(&self, key: &str, expected_version: Option<u64>) -> Result<()>;
    /// Keys starting with `prefix`, in order, after `start_after`, at most `limit` of them.
    async fn list(&self, prefix: &str, start_after: Option<&str>, limit: u32) -> Result<ListPage>;
    /// Follows changes to a key or a prefix from now on.
    async fn watch(&self, target: WatchTarget) -> Result<Watch>;
    /// Starts a lease that lives `ttl` past its last keep-alive.
    async fn grant_lease(&self, ttl: Duration) -> Result<LeaseId>;
    /// Renews a lease; returns its time-to-live. `LeaseNotFound` once it has expired.
    async fn keep_alive(&self, lease: LeaseId) -> Result<Duration>;
    /// Ends a lease now, deleting its keys.
    async fn revoke_lease(&self, lease: LeaseId) -> Result<()>;
    /// The next value of a named counter: 0, 1, 2, ... Never hands out a value twice, even across
    /// crashes and leader changes.
    async fn allocate_id(&self, counter: &str) -> Result<u64>;
}

pub type DynStore = Arc<dyn MetadataStore>;

/// Lists every key under a prefix, page by page.
pub async fn list_all(store: &dyn MetadataStore, prefix: &str) -> Result<Vec<KeyValue>> {
    let mut out = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list(prefix, after.as_deref(), 1000).await?;
        after = page.kvs.last().map(|kv| kv.key.clone());
        out.extend(page.kvs);
        if !page.more || after.is_none() {
            return Ok(out);
        }
    }
}

pub fn check_key(key: &str) -> Result<()> {
    if !key.starts_with('/') {
        return Err(MetaError::InvalidArgument(format!(
            "key {key:?} must start with '/'"
        )));
    }
    if key.len() > MAX_KEY_LEN {
        return Err(MetaError::TooLarge(format!(
            "key of {} bytes (max {MAX_KEY_LEN})",
            key.len()
        )));
    }
    if key.contains('\0') {
        return Err(MetaError::InvalidArgument("key contains a NUL byte".into()));
    }
    Ok(())
}

pub fn check_prefix(prefix: &str) -> Result<()> {
    if prefix.is_empty() {
        return Ok(());
    }
    check_key(prefix)
}

/// A key watch needs a valid key; a prefix watch may follow everything ("").
pub fn check_target(target: &WatchTarget) -> Result<()> {
    match target {
        WatchTarget::Key(k) => check_key(k),
        WatchTarget::Prefix(p) => check_prefix(p),
    }
}

pub fn check_value(value: &[u8]) -> Result<()> {
    if value.len() > MAX_VALUE_LEN {
        return Err(MetaError::TooLarge(format!(
            "value of {} bytes (max {MAX_VALUE_LEN})",
            value.len()
        )));
    }
    Ok(())
}

pub fn check_ttl(ttl: Duration) -> Result<()> {
    if ttl < MIN_LEASE_TTL || ttl > MAX_LEASE_TTL {
        return Err(MetaError::InvalidArgument(format!(
            "lease ttl {ttl:?} outside {MIN_LEASE_TTL:?}..={MAX_LEASE_TTL:?}"
        )));
    }
    Ok(())
}

/// Receiving end of a watch. Yields events in revision order; after a [`WatchEvent::Resync`] the
/// stream ends and the watcher must list and watch again.
pub struct Watch {
    rx: mpsc::Receiver<WatchEvent>,
    lagged: Arc<AtomicBool>,
    resync_sent: bool,
}

/// Sending end of a watch, held by the backend.
pub struct WatchSender {
    tx: mpsc::Sender<WatchEvent>,
    lagged: Arc<AtomicBool>,
}

/// A bounded watch channel.
pub fn watch_channel() -> (WatchSender, Watch) {
    let (tx, rx) = mpsc::channel(WATCH_BUFFER);
    let lagged = Arc::new(AtomicBool::new(false));
    (
        WatchSender {
            tx,
            lagged: lagged.clone(),
        },
        Watch {
            rx,
            lagged,
            resync_sent: false,
        },
    )
}

impl WatchSender {
    /// Queues an event without waiting. Returns false when the watcher is gone or fell behind;
    /// the caller then drops this sender and the watcher sees `Resync` after its buffered events.
    pub fn send(&self, event: WatchEvent) -> bool {
        match self.tx.try_send(event) {
            Ok(()) => true,
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.lagged.store(true, Ordering::Release);
                false
            }
            Err(mpsc::error::TrySendError::Closed(_)) => false,
        }
    }

    /// Queues an event, waiting for room (for forwarders that apply their own back-pressure).
    pub async fn send_wait(&self, event: WatchEvent) -> bool {
        self.tx.send(event).await.is_ok()
    }

    /// Marks the stream as broken: the watcher gets `Resync` when it reaches the end.
    pub fn fail(self) {
        self.lagged.store(true, Ordering::Release);
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// Resolves once the watcher has dropped its `Watch`.
    pub async fn closed(&self) {
        self.tx.closed().await
    }
}

impl Watch {
    /// The next event; `None` once the watch has ended (after `Resync` if events were lost).
    pub async fn next(&mut self) -> Option<WatchEvent> {
        if self.resync_sent {
            return None;
        }
        match self.rx.recv().await {
            Some(WatchEvent::Resync) => {
                self.resync_sent = true;
                Some(WatchEvent::Resync)
            }
            Some(ev) => Some(ev),
            None if self.lagged.load(Ordering::Acquire) => {
                self.resync_sent = true;
                Some(WatchEvent::Resync)
            }
            None => None,
        }
    }
}
