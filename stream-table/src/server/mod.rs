//! The gRPC `StreamService` and `TableService` (`proto/quire/{stream,table}/v1/*.proto`),
//! served by `quire standalone` (on the ledger API port) and by the `quire stream-table` role.
//!
//! A server holds one metadata session. Under it, it registers itself at
//! `layout::server_key(id)` (so clients can find it) and holds the leases of the stream writers
//! and table ranges it has opened. Those are opened on demand, by the first request that needs
//! them, and cached:
//! - another live server holding the lease answers `NOT_OWNER` with its address, which clients
//!   follow;
//! - a writer or range that failed (fenced, lost its session, changelog error) is dropped from
//!   the cache, so the next request opens it again (a range restores from checkpoint +
//!   changelog);
//! - a lost session is replaced by a new one, and everything opened under the old one is
//!   dropped, since its leases are gone.
//!
//! Decisions:
//! - **Bounded caches.** At most [`ServerConfig::max_open_writers`] writers and
//!   [`ServerConfig::max_open_ranges`] ranges; beyond, requests for new ones get `UNAVAILABLE`.
//!   Nothing is closed for being idle: ownership moves only when a server stops or dies.
//! - **One opener per key.** Concurrent first requests for one range wait for the same open
//!   (a per-key async slot) instead of racing for the lease.
//! - **Scans are per range.** A table's ranges may be owned by different servers, so a
//!   `ScanRequest` names one range and the client merges ranges in key order; a server never
//!   proxies to another.
//! - **Every call is bounded** by [`ServerConfig::op_timeout`], and append streams by
//!   [`APPEND_IN_FLIGHT_MAX`] records waiting for acknowledgement.

mod status;
mod streams;
mod tables;

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use quire_ledger_client::ClientConfig;
use quire_metadata::session::Session;
use quire_metadata::{DynStore, WatchEvent, WatchTarget};
use quire_proto::stream::stream_service_server::StreamServiceServer;
use quire_proto::table::table_service_server::TableServiceServer;

pub use status::{CODE_KEY, OWNER_KEY, code_of, from_status, to_status};
pub(crate) use streams::{config_to as streams_config_to, pb_name as streams_pb_name};
pub(crate) use tables::{
    config_from as tables_config_from, config_to as tables_config_to, value_to as tables_value_to,
};

use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;
use crate::stream::{StreamWriter, Streams, WriterInfo};
use crate::table::{Range, TableMeta, Tables};

/// Records of one `Append` stream waiting for acknowledgement.
pub const APPEND_IN_FLIGHT_MAX: usize = 1024;
/// Largest gRPC message either way.
pub const MESSAGE_MAX: usize = 16 << 20;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// This server's id (its name in leases). Default `stream-table-<pid>`.
    pub id: String,
    /// Where clients reach this server (sent to them in redirects).
    pub advertised_addr: String,
    /// TTL of the metadata session holding the leases. Default 10 s: a dead server's streams
    /// and ranges move after about this long.
    pub session_ttl: Duration,
    /// Bound on each call. Default 30 s.
    pub op_timeout: Duration,
    pub max_open_ranges: usize,
    pub max_open_writers: usize,
}

impl ServerConfig {
    pub fn new(id: impl Into<String>, advertised_addr: impl Into<String>) -> Self {
        ServerConfig {
            id: id.into(),
            advertised_addr: advertised_addr.into(),
            session_ttl: Duration::from_secs(10),
            op_timeout: Duration::from_secs(30),
            max_open_ranges: 4096,
            max_open_writers: 4096,
        }
    }
}

/// The ledger client settings a stream-table server should run with: an idle writer publishes
/// its LAC at the ledger writer's next tick (every 100 ms) rather than after the client's default
/// 1 s, so that reads and tails see a stream's last records soon after they are acknowledged.
/// The cost is at most one LAC write per segment ledger and tick, and only when its LAC moved.
pub fn ledger_client_config(metadata: impl Into<String>) -> ClientConfig {
    ClientConfig {
        explicit_lac_interval: Some(Duration::ZERO),
        ..ClientConfig::new(metadata)
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self::new(format!("stream-table-{}", std::process::id()), "")
    }
}

/// A cache of things opened on demand, one async slot per key.
struct Cache<K, V> {
    slots: Mutex<HashMap<K, Arc<tokio::sync::Mutex<Option<V>>>>>,
    max: usize,
}

impl<K: Eq + Hash + Clone, V: Clone> Cache<K, V> {
    fn new(max: usize) -> Self {
        Cache {
            slots: Mutex::new(HashMap::new()),
            max,
        }
    }

    /// The cached value, or the one `open` makes (only one opener per key at a time).
    async fn get_or_open<F, Fut>(&self, key: &K, healthy: impl Fn(&V) -> bool, open: F) -> Result<V>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<V>>,
    {
        let slot = {
            let mut slots = self.slots.lock();
            if !slots.contains_key(key) && slots.len() >= self.max {
                return Err(Error::Unavailable(format!(
                    "this server has {} open; try another server",
                    self.max
                )));
            }
            slots.entry(key.clone()).or_default().clone()
        };
        // Fast path: the value is there and nobody is opening it.
        if let Ok(g) = slot.try_lock()
            && let Some(v) = g.as_ref()
            && healthy(v)
        {
            return Ok(v.clone());
        }
        let mut guard = slot.lock().await;
        if let Some(v) = guard.as_ref() {
            if healthy(v) {
                return Ok(v.clone());
            }
            *guard = None;
        }
        match open().await {
            Ok(v) => {
                *guard = Some(v.clone());
                Ok(v)
            }
            Err(e) => {
                drop(guard);
                self.remove_if_empty(key, &slot);
                Err(e)
            }
        }
    }

    fn remove_if_empty(&self, key: &K, slot: &Arc<tokio::sync::Mutex<Option<V>>>) {
        let mut slots = self.slots.lock();
        if let Some(s) = slots.get(key)
            && Arc::ptr_eq(s, slot)
            && s.try_lock().is_ok_and(|g| g.is_none())
        {
            slots.remove(key);
        }
    }

    /// Drops a key's value (the next request opens it again); returns it.
    fn evict(&self, key: &K) -> Option<V> {
        let slot = self.slots.lock().remove(key)?;
        slot.try_lock().ok().and_then(|mut g| g.take())
    }

    /// Takes every value out.
    fn drain(&self) -> Vec<V> {
        let slots: Vec<_> = self.slots.lock().drain().map(|(_, s)| s).collect();
        slots
            .into_iter()
            .filter_map(|s| s.try_lock().ok().and_then(|mut g| g.take()))
            .collect()
    }
}

pub(crate) struct Inner {
    pub(crate) cfg: ServerConfig,
    store: DynStore,
    pub(crate) streams: Streams,
    pub(crate) tables: Tables,
    /// The live session (read on every request); `renewing` serializes replacing a lost one.
    session: parking_lot::RwLock<Arc<Session>>,
    renewing: tokio::sync::Mutex<()>,
    writers: Cache<Name, StreamWriter>,
    ranges: Cache<(Name, u32), Range>,
    metas: Mutex<HashMap<Name, TableMeta>>,
    stopping: AtomicBool,
    /// The task that drops ranges of tables deleted or created again elsewhere.
    table_watch: Mutex<Option<tokio::task::AbortHandle>>,
}

/// Pause before watching the tables again after the watch failed or ended.
const TABLE_WATCH_RETRY: Duration = Duration::from_secs(1);

/// Drops this server's ranges and cached metadata of a table as soon as the metadata store says
/// it was deleted or created again (by any server). Without it, a range owner elsewhere would
/// go on serving the old table's state from memory until its next write failed. Ends with the
/// server.
async fn watch_tables(inner: std::sync::Weak<Inner>) {
    loop {
        let Some(store) = inner.upgrade().map(|i| i.store.clone()) else {
            return;
        };
        match store
            .watch(WatchTarget::Prefix(layout::TABLES.to_string()))
            .await
        {
            Ok(mut w) => {
                // Anything that changed while there was no watch.
                match inner.upgrade() {
                    Some(i) => i.recheck_tables().await,
                    None => return,
                }
                while let Some(ev) = w.next().await {
                    let Some(i) = inner.upgrade() else {
                        return;
                    };
                    match ev {
                        // Nothing of a deleted table is valid, whatever a busy slot holds.
                        WatchEvent::Delete { key, .. } => {
                            if let Some(name) = table_of(&key) {
                                i.forget_table(&name);
                            }
                        }
                        // A creation follows a delete this watch saw, or a gap (`Resync`).
                        WatchEvent::Put(_) => {}
                        WatchEvent::Resync => i.recheck_tables().await,
                    }
                }
            }
            Err(e) => tracing::debug!(error = %e, "no watch on the tables; retrying"),
        }
        tokio::time::sleep(TABLE_WATCH_RETRY).await;
    }
}

fn table_of(key: &str) -> Option<Name> {
    key.strip_prefix(layout::TABLES)?.parse().ok()
}

/// A stream/table server. Cheap to clone.
#[derive(Clone)]
pub struct StreamTableServer {
    pub(crate) inner: Arc<Inner>,
}

impl StreamTableServer {
    /// Starts the session and registers this server.
    pub async fn start(
        store: DynStore,
        client: quire_ledger_client::Client,
        cfg: ServerConfig,
    ) -> Result<Self> {
        quire_metadata::layout::check_bookie_id(&cfg.id)
            .map_err(|_| Error::InvalidArgument(format!("bad server id {:?}", cfg.id)))?;
        let session = Arc::new(Session::start(store.clone(), cfg.session_ttl).await?);
        register(&store, &cfg, &session).await?;
        let streams = Streams::new(store.clone(), client);
        let tables = Tables::new(streams.clone());
        tracing::info!(id = %cfg.id, addr = %cfg.advertised_addr, "stream-table server started");
        let server = StreamTableServer {
            inner: Arc::new(Inner {
                writers: Cache::new(cfg.max_open_writers),
                ranges: Cache::new(cfg.max_open_ranges),
                cfg,
                store,
                streams,
                tables,
                session: parking_lot::RwLock::new(session),
                renewing: tokio::sync::Mutex::new(()),
                metas: Mutex::new(HashMap::new()),
                stopping: AtomicBool::new(false),
                table_watch: Mutex::new(None),
            }),
        };
        let task = tokio::spawn(watch_tables(Arc::downgrade(&server.inner)));
        *server.inner.table_watch.lock() = Some(task.abort_handle());
        Ok(server)
    }

    /// The two services, to add to any tonic server.
    pub fn routes(&self) -> tonic::service::Routes {
        let streams = StreamServiceServer::new(streams::StreamApi(self.clone()))
            .max_decoding_message_size(MESSAGE_MAX)
            .max_encoding_message_size(MESSAGE_MAX);
        let tables = TableServiceServer::new(tables::TableApi(self.clone()))
            .max_decoding_message_size(MESSAGE_MAX)
            .max_encoding_message_size(MESSAGE_MAX);
        tonic::service::Routes::new(streams).add_service(tables)
    }

    /// Closes the writers (sealing their segments) and ranges (final checkpoints), each bounded
    /// by the op timeout, then ends the session. Idempotent.
    pub async fn shutdown(&self) {
        let inner = &self.inner;
        if inner.stopping.swap(true, Ordering::AcqRel) {
            return;
        }
        if let Some(task) = inner.table_watch.lock().take() {
            task.abort();
        }
        let t = inner.cfg.op_timeout;
        let writers = inner.writers.drain();
        let ranges = inner.ranges.drain();
        let closes = writers
            .into_iter()
            .map(|w| {
                Box::pin(async move {
                    if let Err(e) = w.close().await {
                        tracing::warn!(error = %e, "closing a stream writer");
                    }
                }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
            })
            .chain(ranges.into_iter().map(|r| {
                Box::pin(async move {
                    if let Err(e) = r.close().await {
                        tracing::warn!(error = %e, "closing a table range");
                    }
                }) as std::pin::Pin<Box<dyn Future<Output = ()> + Send>>
            }));
        if tokio::time::timeout(t, futures::future::join_all(closes))
            .await
            .is_err()
        {
            tracing::warn!("writers and ranges not closed within {t:?}; their leases lapse");
        }
        let session = inner.session.read().clone();
        let _ = inner
            .store
            .delete(&layout::server_key(&inner.cfg.id), None)
            .await;
        match Arc::try_unwrap(session) {
            Ok(s) => {
                let _ = s.close().await;
            }
            // Still referenced by something being dropped: end the lease itself.
            Err(s) => {
                let _ = inner.store.revoke_lease(s.lease()).await;
            }
        }
        tracing::info!(id = %inner.cfg.id, "stream-table server stopped");
    }
}

async fn register(store: &DynStore, cfg: &ServerConfig, session: &Session) -> Result<()> {
    let key = layout::server_key(&cfg.id);
    let value = bytes::Bytes::from(cfg.advertised_addr.clone());
    match store
        .create(&key, value.clone(), Some(session.lease()))
        .await
    {
        Ok(_) => Ok(()),
        Err(quire_metadata::MetaError::AlreadyExists(_)) => {
            // A previous run's key, still under its old lease: replace it.
            store.delete(&key, None).await?;
            store.create(&key, value, Some(session.lease())).await?;
            Ok(())
        }
        Err(e) => Err(e.into()),
    }
}

impl Inner {
    fn me(&self) -> WriterInfo {
        WriterInfo {
            id: self.cfg.id.clone(),
            addr: self.cfg.advertised_addr.clone(),
        }
    }

    fn check_running(&self) -> Result<()> {
        if self.stopping.load(Ordering::Acquire) {
            return Err(Error::Unavailable("the server is stopping".into()));
        }
        Ok(())
    }

    /// The live session; a lost one is replaced, and what it held is dropped.
    async fn session(&self) -> Result<Arc<Session>> {
        let current = self.session.read().clone();
        if !current.is_lost() {
            return Ok(current);
        }
        let _renewing = self.renewing.lock().await;
        let current = self.session.read().clone();
        if !current.is_lost() {
            return Ok(current); // another request replaced it meanwhile
        }
        tracing::warn!(id = %self.cfg.id, "session lost: dropping its writers and ranges");
        self.writers.drain();
        self.ranges.drain();
        let fresh = Arc::new(Session::start(self.store.clone(), self.cfg.session_ttl).await?);
        register(&self.store, &self.cfg, &fresh).await?;
        *self.session.write() = fresh.clone();
        Ok(fresh)
    }

    pub(crate) async fn writer(&self, name: &Name) -> Result<StreamWriter> {
        self.check_running()?;
        let session = self.session().await?;
        self.writers
            .get_or_open(
                name,
                |_| !session.is_lost(),
                || self.streams.open_writer(name, &session, self.me()),
            )
            .await
    }

    pub(crate) fn drop_writer(&self, name: &Name) {
        if let Some(w) = self.writers.evict(name) {
            tokio::spawn(async move {
                let _ = w.close().await;
            });
        }
    }

    /// A table's metadata (cached; the range count never changes).
    pub(crate) async fn table_meta(&self, name: &Name) -> Result<TableMeta> {
        if let Some(m) = self.metas.lock().get(name) {
            return Ok(m.clone());
        }
        let m = self.tables.info(name).await?;
        let mut metas = self.metas.lock();
        if metas.len() >= self.cfg.max_open_ranges {
            metas.clear();
        }
        metas.insert(name.clone(), m.clone());
        Ok(m)
    }

    pub(crate) fn forget_table(&self, name: &Name) {
        self.metas.lock().remove(name);
        let keys: Vec<_> = self
            .ranges
            .slots
            .lock()
            .keys()
            .filter(|(n, _)| n == name)
            .cloned()
            .collect();
        for k in keys {
            if let Some(r) = self.ranges.evict(&k) {
                tokio::spawn(async move {
                    let _ = r.close().await;
                });
            }
        }
    }

    /// The tables this server holds ranges or metadata of.
    fn open_tables(&self) -> Vec<Name> {
        let mut names: Vec<Name> = self.metas.lock().keys().cloned().collect();
        names.extend(self.ranges.slots.lock().keys().map(|(n, _)| n.clone()));
        names.sort();
        names.dedup();
        names
    }

    /// The creation times of the table incarnations this server holds ranges or metadata of.
    fn held_incarnations(&self, name: &Name) -> Vec<u64> {
        let mut held: Vec<u64> = self
            .metas
            .lock()
            .get(name)
            .map(|m| m.created_ms)
            .into_iter()
            .collect();
        let slots: Vec<_> = self
            .ranges
            .slots
            .lock()
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|(_, slot)| slot.clone())
            .collect();
        for slot in slots {
            // A slot in use is being opened (with the current metadata) or read: skip it.
            if let Ok(g) = slot.try_lock()
                && let Some(r) = g.as_ref()
            {
                held.push(r.meta().created_ms);
            }
        }
        held
    }

    /// Forgets a table's ranges and metadata unless all of them belong to the incarnation
    /// created at `current`.
    fn forget_other_incarnations(&self, name: &Name, current: u64) {
        let held = self.held_incarnations(name);
        if held.iter().any(|c| *c != current) {
            tracing::info!(table = %name, "table deleted or created again elsewhere; dropping its ranges");
            self.forget_table(name);
        }
    }

    /// Checks every open table against the metadata store (after a gap in the table watch).
    async fn recheck_tables(&self) {
        for name in self.open_tables() {
            match self.tables.info(&name).await {
                Ok(m) => self.forget_other_incarnations(&name, m.created_ms),
                Err(Error::NoSuchTable(_)) => self.forget_table(&name),
                Err(e) => tracing::debug!(table = %name, error = %e, "table not checked"),
            }
        }
    }

    pub(crate) async fn range(&self, name: &Name, range: u32) -> Result<Range> {
        self.check_running()?;
        let session = self.session().await?;
        let key = (name.clone(), range);
        self.ranges
            .get_or_open(
                &key,
                |r| !r.is_failed() && !session.is_lost(),
                || self.tables.open_range(name, range, &session, self.me()),
            )
            .await
    }

    /// Called after an operation on a range failed: a failed range is dropped.
    pub(crate) fn check_range(&self, r: &Range) {
        if r.is_failed() {
            self.ranges.evict(&(r.table().clone(), r.range()));
        }
    }

    /// Runs `f` within the op timeout.
    pub(crate) async fn bounded<T>(
        &self,
        what: &str,
        f: impl Future<Output = Result<T>>,
    ) -> Result<T> {
        match tokio::time::timeout(self.cfg.op_timeout, f).await {
            Ok(r) => r,
            Err(_) => Err(Error::Timeout(format!(
                "{what} took more than {:?}",
                self.cfg.op_timeout
            ))),
        }
    }
}

/// Serves the two services on `listener` until `shutdown` completes, then shuts the server
/// down (the `quire stream-table` role).
pub async fn serve(
    server: StreamTableServer,
    listener: tokio::net::TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let r = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(1024))
        .add_routes(server.routes())
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await;
    server.shutdown().await;
    r.map_err(|e| Error::Internal(format!("gRPC server: {e}")))
}

/// A user-facing name from the wire (internal names are refused).
pub(crate) fn user_name(namespace: &str, name: &str) -> Result<Name> {
    Name::new(namespace, name)
}
