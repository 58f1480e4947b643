//! The Rust client of the stream and table services, used by the CLI and, later, by the broker
//! and functions.
//!
//! A [`Client`] knows a list of servers (given, or read from the metadata store's server
//! registry). Each call goes to a server, and:
//! - follows `NOT_OWNER` to the owner named in the answer;
//! - retries, with backoff (50 ms doubling to 1 s), errors that say the request had no effect
//!   ([`Error::is_retryable`]) and connection failures, on the next server;
//! - gives up at the call's deadline ([`Client::with_timeout`], default 30 s) with the last
//!   error.
//!
//! A write whose answer was lost after it was sent (a broken connection, a timeout) is
//! `Ambiguous`: it is never sent again behind the caller's back. Reads are retried freely.
//! Channels are cached per address.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::Stream;
use parking_lot::Mutex;
use quire_metadata::DynStore;
use quire_proto::stream as spb;
use quire_proto::stream::stream_service_client::StreamServiceClient;
use quire_proto::table as tpb;
use quire_proto::table::table_service_client::TableServiceClient;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};

use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;
use crate::server::{MESSAGE_MAX, from_status};
use crate::stream::{Record, Segment, StreamConfig, StreamInfo, WriterInfo};
use crate::table::{
    Compare, CompareOp, CompareTarget, DeleteResult, Expect, KeyValue, OpResult, PutResult,
    TableConfig, TableMeta, Txn, TxnOp, TxnResult, Value, range_of,
};

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
/// Requests queued ahead of an append stream.
const APPEND_QUEUE: usize = 1024;
/// Records buffered by a tail ahead of its consumer.
const TAIL_BUFFER: usize = 1024;

struct Inner {
    endpoints: Vec<String>,
    channels: Mutex<HashMap<String, Channel>>,
    /// The server that answered last (tried first).
    preferred: Mutex<Option<String>>,
}

/// A connection to the stream/table servers. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    timeout: Duration,
}

fn uri(addr: &str) -> String {
    if addr.contains("://") {
        addr.to_string()
    } else {
        format!("http://{addr}")
    }
}

/// Whether a status without a Quire code means the request certainly was not delivered.
fn not_sent(s: &Status) -> bool {
    let m = s.message().to_ascii_lowercase();
    s.code() == Code::Unavailable
        && (m.contains("connect") || m.contains("refused") || m.contains("dns"))
}

impl Client {
    /// A client of these servers (`host:port` or `http://host:port`). Fails only on a bad
    /// address; servers are connected on first use.
    pub async fn connect(endpoints: Vec<String>) -> Result<Client> {
        if endpoints.is_empty() {
            return Err(Error::InvalidArgument("no server address given".into()));
        }
        for e in &endpoints {
            Endpoint::from_shared(uri(e))
                .map_err(|err| Error::InvalidArgument(format!("server address {e:?}: {err}")))?;
        }
        Ok(Client {
            inner: Arc::new(Inner {
                endpoints,
                channels: Mutex::new(HashMap::new()),
                preferred: Mutex::new(None),
            }),
            timeout: DEFAULT_TIMEOUT,
        })
    }

    /// A client of the servers registered in the metadata store.
    pub async fn from_metadata(store: DynStore) -> Result<Client> {
        let kvs = quire_metadata::store::list_all(store.as_ref(), layout::SERVERS).await?;
        let addrs: Vec<String> = kvs
            .into_iter()
            .filter_map(|kv| String::from_utf8(kv.value.to_vec()).ok())
            .filter(|a| !a.is_empty())
            .collect();
        if addrs.is_empty() {
            return Err(Error::Unavailable(
                "no stream-table server is registered in the metadata store".into(),
            ));
        }
        Client::connect(addrs).await
    }

    /// The deadline of each call (redirects and retries included).
    pub fn with_timeout(mut self, d: Duration) -> Client {
        self.timeout = d;
        self
    }

    pub fn stream(&self, name: Name) -> StreamHandle {
        StreamHandle {
            client: self.clone(),
            name,
        }
    }

    pub fn table(&self, name: Name) -> TableHandle {
        TableHandle {
            client: self.clone(),
            name,
            ranges: Arc::new(Mutex::new(None)),
        }
    }

    pub async fn list_streams(&self, namespace: &str) -> Result<Vec<Name>> {
        let req = spb::ListRequest {
            namespace: namespace.into(),
        };
        let r = self
            .call(true, |ch| {
                let req = req.clone();
                async move { StreamServiceClient::new(ch).list(req).await }
            })
            .await?;
        Ok(r.names
            .into_iter()
            .map(|n| name_from(n.namespace, n.name))
            .collect())
    }

    pub async fn list_tables(&self, namespace: &str) -> Result<Vec<Name>> {
        let req = tpb::ListTablesRequest {
            namespace: namespace.into(),
        };
        let r = self
            .call(true, |ch| {
                let req = req.clone();
                async move { TableServiceClient::new(ch).list_tables(req).await }
            })
            .await?;
        Ok(r.names
            .into_iter()
            .map(|n| name_from(n.namespace, n.name))
            .collect())
    }

    fn channel(&self, addr: &str) -> Result<Channel> {
        let mut chans = self.inner.channels.lock();
        if let Some(c) = chans.get(addr) {
            return Ok(c.clone());
        }
        let ch = Endpoint::from_shared(uri(addr))
            .map_err(|e| Error::InvalidArgument(format!("server address {addr:?}: {e}")))?
            .connect_timeout(Duration::from_secs(3))
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        chans.insert(addr.to_string(), ch.clone());
        Ok(ch)
    }

    /// The servers to try, the preferred one first.
    fn order(&self) -> Vec<String> {
        let mut v = Vec::with_capacity(self.inner.endpoints.len() + 1);
        if let Some(p) = self.inner.preferred.lock().clone() {
            v.push(p);
        }
        for e in &self.inner.endpoints {
            if !v.contains(e) {
                v.push(e.clone());
            }
        }
        v
    }

    /// One call with redirects and retries until the deadline. `idempotent` calls are retried
    /// after any transport failure; others only when the request certainly was not sent.
    async fn call<T, F, Fut>(&self, idempotent: bool, mut f: F) -> Result<T>
    where
        F: FnMut(Channel) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<tonic::Response<T>, Status>>,
    {
        let deadline = Instant::now() + self.timeout;
        let mut servers = self.order();
        let mut i = 0usize;
        let mut redirect: Option<String> = None;
        let mut backoff = BACKOFF_MIN;
        let mut last: Option<Error> = None;
        loop {
            let addr = match redirect.take() {
                Some(a) => a,
                None => {
                    let a = servers[i % servers.len()].clone();
                    i += 1;
                    a
                }
            };
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(last.unwrap_or_else(|| Error::Timeout("no server answered".into())));
            }
            let ch = self.channel(&addr)?;
            let err = match tokio::time::timeout(left, f(ch)).await {
                Ok(Ok(r)) => {
                    *self.inner.preferred.lock() = Some(addr);
                    return Ok(r.into_inner());
                }
                Ok(Err(s)) => match from_status(&s) {
                    Some(Error::LeaseHeld {
                        what,
                        holder,
                        addr: owner,
                    }) => {
                        let e = Error::LeaseHeld {
                            what,
                            holder,
                            addr: owner.clone(),
                        };
                        if !owner.is_empty() && owner != addr {
                            if !servers.contains(&owner) {
                                servers.push(owner.clone());
                            }
                            redirect = Some(owner);
                            last = Some(e);
                            continue;
                        }
                        e
                    }
                    Some(e) => e,
                    None if idempotent || not_sent(&s) => {
                        Error::Unavailable(format!("server {addr}: {}", s.message()))
                    }
                    None => {
                        return Err(Error::Ambiguous(format!(
                            "server {addr}: {} (the request may or may not have taken effect)",
                            s.message()
                        )));
                    }
                },
                Err(_) if idempotent => Error::Timeout(format!("no answer within {left:?}")),
                Err(_) => {
                    return Err(Error::Ambiguous(format!(
                        "server {addr} did not answer within {:?}",
                        self.timeout
                    )));
                }
            };
            if !err.is_retryable() {
                return Err(err);
            }
            last = Some(err);
            let left = deadline.saturating_duration_since(Instant::now());
            tokio::time::sleep(backoff.min(left)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

fn name_from(namespace: String, name: String) -> Name {
    Name { namespace, name }
}

// ---- streams ----

/// One stream, through the services.
#[derive(Clone)]
pub struct StreamHandle {
    client: Client,
    name: Name,
}

fn spb_name(n: &Name) -> Option<spb::StreamName> {
    Some(crate::server::streams_pb_name(n))
}

fn info_from(i: spb::StreamInfo) -> StreamInfo {
    let c = i.config.unwrap_or_default();
    let n = i.name.unwrap_or_default();
    StreamInfo {
        name: name_from(n.namespace, n.name),
        config: StreamConfig {
            segment_max_bytes: c.segment_max_bytes,
            segment_max_entries: c.segment_max_entries,
            segment_max_age: Duration::from_millis(c.segment_max_age_ms),
            ensemble: c.ensemble,
            write_quorum: c.write_quorum,
            ack_quorum: c.ack_quorum,
        },
        start_offset: i.start_offset,
        end_offset: i.end_offset,
        segments: i
            .segments
            .into_iter()
            .map(|s| Segment {
                seq: s.seq,
                ledger: s.ledger,
                start_offset: s.start_offset,
                count: s.count,
            })
            .collect(),
        writer: (!i.writer_id.is_empty()).then_some(WriterInfo {
            id: i.writer_id,
            addr: i.writer_addr,
        }),
        created_ms: i.created_ms,
    }
}

impl StreamHandle {
    pub fn name(&self) -> &Name {
        &self.name
    }

    pub async fn create(&self, cfg: StreamConfig) -> Result<StreamInfo> {
        cfg.check()?;
        let req = spb::CreateRequest {
            name: spb_name(&self.name),
            config: Some(crate::server::streams_config_to(&cfg)),
        };
        let r = self
            .client
            .call(false, |ch| {
                let req = req.clone();
                async move { StreamServiceClient::new(ch).create(req).await }
            })
            .await?;
        Ok(info_from(r))
    }

    pub async fn info(&self) -> Result<StreamInfo> {
        let req = spb::InfoRequest {
            name: spb_name(&self.name),
        };
        let r = self
            .client
            .call(true, |ch| {
                let req = req.clone();
                async move { StreamServiceClient::new(ch).info(req).await }
            })
            .await?;
        Ok(info_from(r))
    }

    pub async fn delete(&self) -> Result<()> {
        let req = spb::DeleteRequest {
            name: spb_name(&self.name),
        };
        self.client
            .call(false, |ch| {
                let req = req.clone();
                async move { StreamServiceClient::new(ch).delete(req).await }
            })
            .await?;
        Ok(())
    }

    /// Deletes whole segments ending at or before `before`; returns the new start offset.
    pub async fn truncate(&self, before: u64) -> Result<u64> {
        let req = spb::TruncateRequest {
            name: spb_name(&self.name),
            before_offset: before,
        };
        let r = self
            .client
            .call(true, |ch| {
                let req = req.clone();
                async move { StreamServiceClient::new(ch).truncate(req).await }
            })
            .await?;
        Ok(r.start_offset)
    }

    /// Appends one record; returns its offset.
    pub async fn append(&self, payload: Bytes) -> Result<u64> {
        let mut a = self.appender().await?;
        a.send(payload).await?;
        let o = a.next_offset().await?;
        a.finish().await?;
        Ok(o)
    }

    /// Opens an append stream on the stream's writer (following redirects until one server
    /// holds the writer lease).
    pub async fn appender(&self) -> Result<Appender> {
        let name = self.name.clone();
        let (tx, responses) = self
            .client
            .call(true, |ch| {
                let name = name.clone();
                async move {
                    let (tx, rx) = mpsc::channel(APPEND_QUEUE);
                    let _ = tx
                        .send(spb::AppendRequest {
                            name: spb_name(&name),
                            payloads: vec![],
                        })
                        .await;
                    let mut c = StreamServiceClient::new(ch)
                        .max_decoding_message_size(MESSAGE_MAX)
                        .max_encoding_message_size(MESSAGE_MAX);
                    let resp = c.append(ReceiverStream::new(rx)).await?;
                    let mut stream = resp.into_inner();
                    // The server answers once it holds the writer.
                    match stream.message().await? {
                        Some(_) => Ok(tonic::Response::new((tx, stream))),
                        None => Err(Status::unavailable("append stream ended at once")),
                    }
                }
            })
            .await?;
        Ok(Appender {
            tx: Some(tx),
            responses,
            acked: std::collections::VecDeque::new(),
            sent: 0,
            received: 0,
            failed: None,
        })
    }

    /// Confirmed records from `from`, at most `max_records` (0: up to the current end).
    pub async fn read(&self, from: u64, max_records: usize) -> Result<Vec<Record>> {
        let req = spb::ReadRequest {
            name: spb_name(&self.name),
            from_offset: from,
            max_records: max_records as u64,
        };
        self.client
            .call(true, |ch| {
                let req = req.clone();
                async move {
                    let mut s = StreamServiceClient::new(ch)
                        .max_decoding_message_size(MESSAGE_MAX)
                        .read(req)
                        .await?
                        .into_inner();
                    let mut out = Vec::new();
                    while let Some(r) = s.message().await? {
                        out.extend(r.records.into_iter().map(|r| Record {
                            offset: r.offset,
                            payload: r.payload,
                        }));
                    }
                    Ok(tonic::Response::new(out))
                }
            })
            .await
    }

    /// Records from `from` on as they are confirmed, across rollovers and server changes
    /// (reconnecting after the last record seen), until dropped. Ends after an error that is
    /// not transient.
    pub fn tail(&self, from: u64) -> impl Stream<Item = Result<Record>> + Send + 'static {
        let (tx, rx) = mpsc::channel(TAIL_BUFFER);
        let this = self.clone();
        tokio::spawn(async move {
            let mut next = from;
            let mut backoff = BACKOFF_MIN;
            loop {
                let req = spb::TailRequest {
                    name: spb_name(&this.name),
                    from_offset: next,
                };
                let opened = tokio::select! {
                    r = this.client.call(true, |ch| {
                        let req = req.clone();
                        async move {
                            StreamServiceClient::new(ch)
                                .max_decoding_message_size(MESSAGE_MAX)
                                .tail(req)
                                .await
                        }
                    }) => r,
                    _ = tx.closed() => return,
                };
                let mut stream = match opened {
                    Ok(s) => s,
                    Err(e) if e.is_retryable() || matches!(e, Error::Timeout(_)) => {
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        continue;
                    }
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                loop {
                    let m = tokio::select! {
                        m = stream.message() => m,
                        _ = tx.closed() => return,
                    };
                    match m {
                        Ok(Some(batch)) => {
                            backoff = BACKOFF_MIN;
                            for r in batch.records {
                                next = r.offset + 1;
                                let rec = Record {
                                    offset: r.offset,
                                    payload: r.payload,
                                };
                                if tx.send(Ok(rec)).await.is_err() {
                                    return;
                                }
                            }
                        }
                        // The server went away or is stopping: resume elsewhere.
                        Ok(None) => break,
                        Err(s) => match from_status(&s) {
                            Some(e) if !e.is_retryable() => {
                                let _ = tx.send(Err(e)).await;
                                return;
                            }
                            _ => break,
                        },
                    }
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
            }
        });
        ReceiverStream::new(rx)
    }
}

/// An open append stream: send payloads, then take their offsets in the same order.
pub struct Appender {
    tx: Option<mpsc::Sender<spb::AppendRequest>>,
    responses: tonic::Streaming<spb::AppendResponse>,
    acked: std::collections::VecDeque<u64>,
    sent: u64,
    received: u64,
    failed: Option<Error>,
}

impl Appender {
    /// Queues one record (waits when the queue is full).
    pub async fn send(&mut self, payload: Bytes) -> Result<()> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let tx = self
            .tx
            .as_ref()
            .ok_or_else(|| Error::InvalidArgument("the appender is finished".into()))?;
        tx.send(spb::AppendRequest {
            name: None,
            payloads: vec![payload],
        })
        .await
        .map_err(|_| Error::Ambiguous("the append stream broke".into()))?;
        self.sent += 1;
        Ok(())
    }

    /// The offset of the oldest record sent and not yet returned here, once acknowledged.
    pub async fn next_offset(&mut self) -> Result<u64> {
        if let Some(o) = self.acked.pop_front() {
            return Ok(o);
        }
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        if self.received >= self.sent {
            return Err(Error::InvalidArgument(
                "no record is waiting for its offset".into(),
            ));
        }
        loop {
            match self.responses.message().await {
                Ok(Some(r)) => {
                    self.received += r.offsets.len() as u64;
                    self.acked.extend(r.offsets);
                    if let Some(o) = self.acked.pop_front() {
                        return Ok(o);
                    }
                }
                Ok(None) => {
                    let e = Error::Ambiguous("the append stream ended early".into());
                    self.failed = Some(e.clone());
                    return Err(e);
                }
                Err(s) => {
                    let e = match from_status(&s) {
                        // Records in flight may or may not be stored whatever the cause.
                        Some(e @ (Error::TooLarge(_) | Error::InvalidArgument(_))) => e,
                        Some(Error::Fenced(m)) => Error::Fenced(m),
                        Some(e) => Error::Ambiguous(format!("append failed: {e}")),
                        None => Error::Ambiguous(format!("append stream broke: {}", s.message())),
                    };
                    self.failed = Some(e.clone());
                    return Err(e);
                }
            }
        }
    }

    /// Waits for every record sent to be acknowledged, then closes the stream.
    pub async fn finish(mut self) -> Result<()> {
        self.tx = None;
        while self.received < self.sent {
            self.next_offset().await?;
        }
        Ok(())
    }
}

// ---- tables ----

/// One table, through the services.
#[derive(Clone)]
pub struct TableHandle {
    client: Client,
    name: Name,
    ranges: Arc<Mutex<Option<u32>>>,
}

fn tpb_name(n: &Name) -> Option<tpb::TableName> {
    Some(tpb::TableName {
        namespace: n.namespace.clone(),
        name: n.name.clone(),
    })
}

fn value_from(v: Option<tpb::Value>) -> Value {
    match v.and_then(|v| v.kind) {
        Some(tpb::value::Kind::Number(n)) => Value::Number(n),
        Some(tpb::value::Kind::Bytes(b)) => Value::Bytes(b),
        None => Value::Bytes(Bytes::new()),
    }
}

fn kv_from(kv: tpb::KeyValue) -> KeyValue {
    KeyValue {
        key: kv.key,
        value: value_from(kv.value),
        version: kv.version,
        create_revision: kv.create_revision,
        mod_revision: kv.mod_revision,
    }
}

fn meta_from(i: tpb::TableInfo) -> TableMeta {
    let n = i.name.unwrap_or_default();
    TableMeta {
        name: name_from(n.namespace, n.name),
        config: crate::server::tables_config_from(i.config.as_ref()),
        created_ms: i.created_ms,
    }
}

fn expect_to(e: Option<Expect>) -> Option<tpb::Expect> {
    e.map(|e| tpb::Expect {
        kind: Some(match e {
            Expect::Version(v) => tpb::expect::Kind::Version(v),
            Expect::ModRevision(r) => tpb::expect::Kind::ModRevision(r),
        }),
    })
}

fn txn_to(name: &Name, t: &Txn) -> tpb::TxnRequest {
    let v = |v: &Value| Some(crate::server::tables_value_to(v));
    let op = |o: &TxnOp| tpb::TxnOp {
        op: Some(match o {
            TxnOp::Put { key, value } => tpb::txn_op::Op::Put(tpb::txn_op::Put {
                key: key.clone(),
                value: v(value),
            }),
            TxnOp::Delete { key } => tpb::txn_op::Op::Delete(key.clone()),
            TxnOp::Get { key } => tpb::txn_op::Op::Get(key.clone()),
            TxnOp::Increment { key, amount } => {
                tpb::txn_op::Op::Increment(tpb::txn_op::Increment {
                    key: key.clone(),
                    amount: *amount,
                })
            }
        }),
    };
    let cmp = |c: &Compare| tpb::Compare {
        key: c.key.clone(),
        op: match c.op {
            CompareOp::Equal => tpb::compare::Op::Equal,
            CompareOp::NotEqual => tpb::compare::Op::NotEqual,
            CompareOp::Greater => tpb::compare::Op::Greater,
            CompareOp::Less => tpb::compare::Op::Less,
        } as i32,
        target: Some(match &c.target {
            CompareTarget::Value(x) => {
                tpb::compare::Target::Value(crate::server::tables_value_to(x))
            }
            CompareTarget::Version(x) => tpb::compare::Target::Version(*x),
            CompareTarget::ModRevision(x) => tpb::compare::Target::ModRevision(*x),
            CompareTarget::Exists(x) => tpb::compare::Target::Exists(*x),
        }),
    };
    tpb::TxnRequest {
        table: tpb_name(name),
        compares: t.compares.iter().map(cmp).collect(),
        success: t.success.iter().map(op).collect(),
        failure: t.failure.iter().map(op).collect(),
    }
}

macro_rules! table_call {
    ($self:ident, $idem:expr, $method:ident, $req:expr) => {{
        let req = $req;
        $self
            .client
            .call($idem, |ch| {
                let req = req.clone();
                async move {
                    TableServiceClient::new(ch)
                        .max_decoding_message_size(MESSAGE_MAX)
                        .max_encoding_message_size(MESSAGE_MAX)
                        .$method(req)
                        .await
                }
            })
            .await
    }};
}

impl TableHandle {
    pub fn name(&self) -> &Name {
        &self.name
    }

    pub async fn create(&self, cfg: TableConfig) -> Result<TableMeta> {
        cfg.check()?;
        let r = table_call!(
            self,
            false,
            create_table,
            tpb::CreateTableRequest {
                table: tpb_name(&self.name),
                config: Some(crate::server::tables_config_to(&cfg)),
            }
        )?;
        Ok(meta_from(r))
    }

    pub async fn info(&self) -> Result<TableMeta> {
        let r = table_call!(
            self,
            true,
            get_table,
            tpb::GetTableRequest {
                table: tpb_name(&self.name),
            }
        )?;
        let m = meta_from(r);
        *self.ranges.lock() = Some(m.config.ranges);
        Ok(m)
    }

    pub async fn delete_table(&self) -> Result<()> {
        table_call!(
            self,
            false,
            delete_table,
            tpb::DeleteTableRequest {
                table: tpb_name(&self.name),
            }
        )?;
        Ok(())
    }

    pub async fn get(&self, key: impl Into<Bytes>) -> Result<Option<KeyValue>> {
        let r = table_call!(
            self,
            true,
            get,
            tpb::GetRequest {
                table: tpb_name(&self.name),
                key: key.into(),
            }
        )?;
        Ok(r.kv.map(kv_from))
    }

    pub async fn put(&self, key: impl Into<Bytes>, value: Value) -> Result<PutResult> {
        self.put_inner(key.into(), value, None).await
    }

    /// Puts only if the key's version (or mod revision) is as expected (0: absent).
    pub async fn put_expect(
        &self,
        key: impl Into<Bytes>,
        value: Value,
        expect: Expect,
    ) -> Result<PutResult> {
        self.put_inner(key.into(), value, Some(expect)).await
    }

    async fn put_inner(
        &self,
        key: Bytes,
        value: Value,
        expect: Option<Expect>,
    ) -> Result<PutResult> {
        let r = table_call!(
            self,
            false,
            put,
            tpb::PutRequest {
                table: tpb_name(&self.name),
                key,
                value: Some(crate::server::tables_value_to(&value)),
                expect: expect_to(expect),
                prev_kv: false,
            }
        )?;
        Ok(PutResult {
            succeeded: r.succeeded,
            revision: r.revision,
            prev_kv: r.prev_kv.map(kv_from),
        })
    }

    pub async fn delete(&self, key: impl Into<Bytes>) -> Result<DeleteResult> {
        let r = table_call!(
            self,
            false,
            delete,
            tpb::DeleteRequest {
                table: tpb_name(&self.name),
                key: key.into(),
                expect: None,
                prev_kv: false,
            }
        )?;
        Ok(DeleteResult {
            succeeded: r.succeeded,
            deleted: r.deleted,
            revision: r.revision,
            prev_kv: r.prev_kv.map(kv_from),
        })
    }

    pub async fn increment(&self, key: impl Into<Bytes>, amount: i64) -> Result<i64> {
        let r = table_call!(
            self,
            false,
            increment,
            tpb::IncrementRequest {
                table: tpb_name(&self.name),
                key: key.into(),
                amount,
            }
        )?;
        Ok(r.total)
    }

    pub async fn txn(&self, txn: Txn) -> Result<TxnResult> {
        let r = table_call!(self, false, txn, txn_to(&self.name, &txn))?;
        let mut results = Vec::with_capacity(r.results.len());
        for o in r.results {
            use tpb::op_result::Result as R;
            results.push(match o.result {
                Some(R::PutRevision(rev)) => OpResult::Put { revision: rev },
                Some(R::Deleted(d)) => OpResult::Delete { deleted: d },
                Some(R::Get(g)) => OpResult::Get(g.kv.map(kv_from)),
                Some(R::Total(t)) => OpResult::Increment(t),
                None => return Err(Error::Internal("a txn result without a kind".into())),
            });
        }
        Ok(TxnResult {
            succeeded: r.succeeded,
            revision: r.revision,
            results,
        })
    }

    /// Keys in `[start, end)` in order across every range, at most `limit` (0: 1000); `more`
    /// says whether keys follow (the next page starts after the last key returned). Each range
    /// is read consistently; ranges are read one after the other.
    pub async fn scan(
        &self,
        start: Bytes,
        end: Option<Bytes>,
        limit: u32,
    ) -> Result<(Vec<KeyValue>, bool)> {
        let limit = if limit == 0 { 1000 } else { limit };
        let ranges = self.ranges.lock().unwrap_or_default();
        let ranges = if ranges == 0 {
            self.info().await?.config.ranges
        } else {
            ranges
        };
        let mut all = Vec::new();
        // The smallest last key of a range that has more: keys above it may be missing from
        // this page, so the page stops there.
        let mut cut: Option<Bytes> = None;
        for r in 0..ranges {
            let resp = table_call!(
                self,
                true,
                scan,
                tpb::ScanRequest {
                    table: tpb_name(&self.name),
                    range: r,
                    start: start.clone(),
                    end: end.clone(),
                    limit,
                }
            )?;
            if resp.more
                && let Some(last) = resp.kvs.last()
                && cut.as_ref().is_none_or(|c| last.key < *c)
            {
                cut = Some(last.key.clone());
            }
            all.extend(resp.kvs.into_iter().map(kv_from));
        }
        all.sort_by(|a, b| a.key.cmp(&b.key));
        let mut more = false;
        if let Some(c) = &cut {
            more = true;
            all.retain(|kv| kv.key <= *c);
        }
        if all.len() > limit as usize {
            all.truncate(limit as usize);
            more = true;
        }
        Ok((all, more))
    }

    /// The range a key belongs to (after `info` has been fetched once).
    pub fn range_of(&self, key: &[u8]) -> Option<u32> {
        self.ranges.lock().map(|n| range_of(key, n))
    }
}
