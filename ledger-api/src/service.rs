//! The `LedgerService` implementation (see the crate docs for its decisions).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::FutureExt;
use futures::stream::{FuturesOrdered, Stream, StreamExt};
use parking_lot::Mutex;
use quire_ledger_client::{
    Client, CreateOptions, DigestType, Entry, LedgerError, LedgerMetadata, LedgerReader,
    LedgerState, LedgerWriter,
};
use quire_proto::ledger as pb;
use quire_proto::ledger::ledger_service_server::{LedgerService, LedgerServiceServer};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::GatewayConfig;
use crate::error::{
    NOT_WRITER, SHUTTING_DOWN, TOO_MANY_REQUESTS, TOO_MANY_WRITERS, invalid, status, to_status,
};

/// Responses queued per stream before the producer waits for the caller to read.
const STREAM_QUEUE: usize = 8;
/// Entry ids in one append response at most.
const IDS_PER_RESPONSE: usize = 4096;
/// How long an append stream may wait for its first request (the one naming the ledger).
const FIRST_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);
/// Default and longest LAC long poll.
const LAC_WAIT_DEFAULT: Duration = Duration::from_secs(10);
const LAC_WAIT_MAX: Duration = Duration::from_secs(60);
/// List page size: default and cap.
const LIST_DEFAULT: u32 = 100;
const LIST_MAX: u32 = 1000;

/// What an append stream does next.
enum Step<A> {
    Acked(Option<A>),
    Request(Option<pb::AppendRequest>),
}

/// A writer held open for `Append` and `Close`.
struct Held {
    writer: LedgerWriter,
    password: Vec<u8>,
    _slot: OwnedSemaphorePermit,
}

struct Inner {
    client: Client,
    cfg: GatewayConfig,
    writers: Mutex<HashMap<u64, Held>>,
    writer_slots: Arc<Semaphore>,
    streams: Arc<Semaphore>,
    stopping: watch::Sender<bool>,
}

/// The gateway: cheap to clone; all clones share the writers held open.
#[derive(Clone)]
pub struct LedgerGateway {
    inner: Arc<Inner>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

fn shutting_down() -> Status {
    status(SHUTTING_DOWN, "the ledger API is shutting down")
}

fn timed_out(what: &str, after: Duration) -> Status {
    status("TIMEOUT", format!("{what} did not finish within {after:?}"))
}

/// Errors after which a held writer can never append again.
fn writer_is_dead(e: &LedgerError) -> bool {
    matches!(
        e,
        LedgerError::Fenced(_)
            | LedgerError::Closed(_)
            | LedgerError::WriterStopped(_)
            | LedgerError::NoSuchLedger(_)
    )
}

fn digest_to_pb(d: DigestType) -> pb::DigestType {
    match d {
        DigestType::Crc32c => pb::DigestType::Crc32c,
        DigestType::Dummy => pb::DigestType::Dummy,
    }
}

fn state_to_pb(s: LedgerState) -> pb::LedgerState {
    match s {
        LedgerState::Open => pb::LedgerState::Open,
        LedgerState::InRecovery => pb::LedgerState::InRecovery,
        LedgerState::Closed => pb::LedgerState::Closed,
    }
}

fn info_of(id: u64, m: &LedgerMetadata, version: u64) -> pb::LedgerInfo {
    pb::LedgerInfo {
        ledger_id: id,
        state: state_to_pb(m.state) as i32,
        ensemble_size: m.ensemble_size,
        write_quorum: m.write_quorum,
        ack_quorum: m.ack_quorum,
        digest: digest_to_pb(m.digest) as i32,
        last_entry_id: m.last_entry_id,
        length: m.length,
        ensembles: m
            .ensembles
            .iter()
            .map(|(first, bookies)| pb::Ensemble {
                first_entry: *first,
                bookies: bookies.clone(),
            })
            .collect(),
        custom: m.custom.clone().into_iter().collect(),
        ctime_ms: m.ctime_ms,
        version,
    }
}

fn to_pb_entry(e: Entry) -> pb::Entry {
    pb::Entry {
        entry_id: e.entry_id,
        payload: e.payload,
    }
}

/// Splits entries into responses of at most `max_entries` entries and about `max_bytes` bytes.
fn batches(entries: Vec<Entry>, max_entries: usize, max_bytes: usize) -> Vec<pb::ReadResponse> {
    let mut out = Vec::new();
    let mut cur = Vec::new();
    let mut bytes = 0usize;
    for e in entries {
        let len = e.payload.len() + 16;
        if !cur.is_empty() && (cur.len() >= max_entries || bytes + len > max_bytes) {
            out.push(pb::ReadResponse {
                entries: std::mem::take(&mut cur),
            });
            bytes = 0;
        }
        bytes += len;
        cur.push(to_pb_entry(e));
    }
    if !cur.is_empty() {
        out.push(pb::ReadResponse { entries: cur });
    }
    out
}

impl LedgerGateway {
    pub fn new(client: Client, cfg: GatewayConfig) -> Self {
        let (stopping, _) = watch::channel(false);
        LedgerGateway {
            inner: Arc::new(Inner {
                client,
                writer_slots: Arc::new(Semaphore::new(cfg.max_writers)),
                streams: Arc::new(Semaphore::new(cfg.max_streams)),
                cfg,
                writers: Mutex::new(HashMap::new()),
                stopping,
            }),
        }
    }

    /// The tonic service, with the configured message size limits.
    pub fn into_server(self) -> LedgerServiceServer<Self> {
        let max = self.inner.cfg.message_size_max;
        LedgerServiceServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }

    /// Ends the streams in progress (with `SHUTTING_DOWN`), refuses new work and drops the
    /// writers held open. Idempotent.
    pub fn shut_down(&self) {
        self.inner.stopping.send_replace(true);
        let dropped: Vec<Held> = self.inner.writers.lock().drain().map(|(_, h)| h).collect();
        if !dropped.is_empty() {
            tracing::info!(
                writers = dropped.len(),
                "ledger API stopped: dropping the open writers (their ledgers stay open)"
            );
        }
    }

    /// How many writers are held open.
    pub fn open_writers(&self) -> usize {
        self.inner.writers.lock().len()
    }

    fn cfg(&self) -> &GatewayConfig {
        &self.inner.cfg
    }

    fn is_stopping(&self) -> bool {
        *self.inner.stopping.borrow()
    }

    fn check_running(&self) -> Result<(), Status> {
        if self.is_stopping() {
            Err(shutting_down())
        } else {
            Ok(())
        }
    }

    /// Runs a client call with the unary timeout.
    async fn timed<T>(
        &self,
        what: &str,
        fut: impl Future<Output = Result<T, LedgerError>>,
    ) -> Result<T, Status> {
        match tokio::time::timeout(self.cfg().op_timeout, fut).await {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(to_status(&e)),
            Err(_) => Err(timed_out(what, self.cfg().op_timeout)),
        }
    }

    fn stream_slot(&self) -> Result<OwnedSemaphorePermit, Status> {
        self.check_running()?;
        self.inner.streams.clone().try_acquire_owned().map_err(|_| {
            status(
                TOO_MANY_REQUESTS,
                format!(
                    "the ledger API serves {} streams at most; retry later",
                    self.cfg().max_streams
                ),
            )
        })
    }

    /// The metadata version, for answers built from metadata the client returned without it.
    async fn version_of(&self, id: u64) -> u64 {
        match tokio::time::timeout(self.cfg().op_timeout, self.inner.client.metadata(id)).await {
            Ok(Ok(v)) => v.version,
            _ => 0,
        }
    }

    async fn open_reader(&self, id: u64, password: &[u8]) -> Result<LedgerReader, Status> {
        self.timed("open", self.inner.client.open(id, password))
            .await
    }

    /// The held writer of ledger `id`, when the password matches.
    fn held_writer(&self, id: u64, password: &[u8]) -> Result<Option<LedgerWriter>, Status> {
        let writers = self.inner.writers.lock();
        match writers.get(&id) {
            Some(h) if h.password == password => Ok(Some(h.writer.clone())),
            Some(_) => Err(to_status(&LedgerError::Unauthorized(id))),
            None => Ok(None),
        }
    }

    /// Why ledger `id` cannot be written here: it does not exist, is closed or being recovered,
    /// or another gateway (or client) holds its writer.
    async fn not_writer(&self, id: u64) -> Status {
        match self
            .timed("metadata read", self.inner.client.metadata(id))
            .await
        {
            Err(s) => s,
            Ok(m) => match m.value.state {
                LedgerState::Closed => to_status(&LedgerError::Closed(id)),
                LedgerState::InRecovery => to_status(&LedgerError::Fenced(id)),
                LedgerState::Open => status(
                    NOT_WRITER,
                    format!(
                        "ledger {id} is not open for writing on this gateway (only the gateway \
                         that created it can append, until it is closed)"
                    ),
                ),
            },
        }
    }

    fn forget_writer(&self, id: u64) {
        if self.inner.writers.lock().remove(&id).is_some() {
            tracing::debug!(ledger_id = id, "writer dropped");
        }
    }

    fn on_writer_error(&self, id: u64, e: &LedgerError) {
        if writer_is_dead(e) {
            self.forget_writer(id);
        }
    }

    /// Checks one append request whole, before any of it is appended.
    fn check_append(&self, id: u64, m: &pb::AppendRequest) -> Result<(), Status> {
        if m.ledger_id != 0 && m.ledger_id != id {
            return Err(invalid(format!(
                "this append stream writes ledger {id}, not {}",
                m.ledger_id
            )));
        }
        if m.payloads.is_empty() {
            return Err(invalid("an append request needs at least one payload"));
        }
        if m.payloads.len() > self.cfg().payloads_per_request_max {
            return Err(invalid(format!(
                "{} payloads in one request; at most {}",
                m.payloads.len(),
                self.cfg().payloads_per_request_max
            )));
        }
        let max = self.cfg().entry_size_max;
        if let Some(p) = m.payloads.iter().find(|p| p.len() > max) {
            return Err(to_status(&LedgerError::TooLarge { size: p.len(), max }));
        }
        Ok(())
    }

    /// Sends on a stream unless the caller went away or the gateway stops. Ok(false): the
    /// caller is gone.
    async fn send<T>(
        &self,
        tx: &mpsc::Sender<Result<T, Status>>,
        stop: &mut watch::Receiver<bool>,
        item: T,
    ) -> Result<bool, Status> {
        tokio::select! {
            r = tx.send(Ok(item)) => Ok(r.is_ok()),
            _ = stop.wait_for(|s| *s) => Err(shutting_down()),
        }
    }

    async fn append_loop(
        &self,
        inbound: &mut Streaming<pb::AppendRequest>,
        tx: &mpsc::Sender<Result<pb::AppendResponse, Status>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let first = tokio::select! {
            m = tokio::time::timeout(FIRST_REQUEST_TIMEOUT, inbound.message()) => match m {
                Ok(m) => m?,
                Err(_) => return Err(timed_out("the first append request", FIRST_REQUEST_TIMEOUT)),
            },
            _ = stop.wait_for(|s| *s) => return Err(shutting_down()),
        };
        let Some(first) = first else {
            return Ok(());
        };
        let id = first.ledger_id;
        let writer = match self.held_writer(id, &first.password)? {
            Some(w) => w,
            None => return Err(self.not_writer(id).await),
        };
        let append_timeout = self.cfg().append_timeout;
        let max_in_flight = self.cfg().append_in_flight_max.max(1);
        let mut pending = FuturesOrdered::new();
        let mut next = Some(first);
        let mut inbound_open = true;
        loop {
            if let Some(m) = next.take() {
                self.check_append(id, &m)?;
                for payload in m.payloads {
                    let fut = tokio::select! {
                        r = tokio::time::timeout(append_timeout, writer.append_async(payload)) => r,
                        _ = stop.wait_for(|s| *s) => return Err(shutting_down()),
                    };
                    match fut {
                        Ok(Ok(f)) => pending.push_back(tokio::time::timeout(append_timeout, f)),
                        Ok(Err(e)) => {
                            self.on_writer_error(id, &e);
                            return Err(to_status(&e));
                        }
                        Err(_) => {
                            return Err(timed_out("waiting for room to append", append_timeout));
                        }
                    }
                }
            }
            if !inbound_open && pending.is_empty() {
                return Ok(());
            }
            let step = tokio::select! {
                biased;
                _ = stop.wait_for(|s| *s) => return Err(shutting_down()),
                r = pending.next(), if !pending.is_empty() => Step::Acked(r),
                m = inbound.message(), if inbound_open && pending.len() < max_in_flight => {
                    Step::Request(m?)
                }
            };
            match step {
                Step::Request(Some(m)) => next = Some(m),
                Step::Request(None) => inbound_open = false,
                Step::Acked(r) => {
                    let mut ids = Vec::new();
                    let mut failure = None;
                    let mut r = r;
                    while let Some(res) = r {
                        match res {
                            Ok(Ok(entry_id)) => ids.push(entry_id),
                            Ok(Err(e)) => {
                                self.on_writer_error(id, &e);
                                failure = Some(to_status(&e));
                                break;
                            }
                            Err(_) => {
                                failure =
                                    Some(timed_out("an append's acknowledgement", append_timeout));
                                break;
                            }
                        }
                        if ids.len() >= IDS_PER_RESPONSE {
                            break;
                        }
                        r = match pending.next().now_or_never() {
                            Some(x) => x,
                            None => break,
                        };
                    }
                    if !ids.is_empty()
                        && !self
                            .send(tx, stop, pb::AppendResponse { entry_ids: ids })
                            .await?
                    {
                        return Ok(());
                    }
                    if let Some(f) = failure {
                        return Err(f);
                    }
                }
            }
        }
    }

    async fn read_loop(
        &self,
        reader: LedgerReader,
        first: u64,
        last: u64,
        unconfirmed: bool,
        tx: &mpsc::Sender<Result<pb::ReadResponse, Status>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let chunk = self.cfg().read_batch_entries.max(1) as u64;
        let mut from = first;
        while from <= last {
            let to = last.min(from.saturating_add(chunk - 1));
            let entries = tokio::select! {
                r = async {
                    if unconfirmed {
                        self.timed("read", reader.read_unconfirmed(from, to)).await
                    } else {
                        self.timed("read", reader.read(from, to)).await
                    }
                } => r?,
                _ = stop.wait_for(|s| *s) => return Err(shutting_down()),
                _ = tx.closed() => return Ok(()),
            };
            if entries.is_empty() {
                // Defensive: a read that returns nothing would loop forever.
                return Err(to_status(&LedgerError::NoSuchEntry(
                    reader.id(),
                    from as i64,
                )));
            }
            let got_last = entries.last().map(|e| e.entry_id).unwrap_or(from);
            if got_last < from || got_last > to {
                return Err(status(
                    "UNREADABLE",
                    format!("read {from}..={to} returned entry {got_last}"),
                ));
            }
            for batch in batches(
                entries,
                self.cfg().read_batch_entries,
                self.cfg().read_batch_bytes,
            ) {
                if !self.send(tx, stop, batch).await? {
                    return Ok(());
                }
            }
            if got_last == u64::MAX {
                break;
            }
            from = got_last + 1;
        }
        Ok(())
    }

    async fn tail_loop(
        &self,
        reader: LedgerReader,
        from: u64,
        tx: &mpsc::Sender<Result<pb::ReadResponse, Status>>,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<(), Status> {
        let mut tail = Box::pin(reader.tail(from));
        let max_entries = self.cfg().read_batch_entries.max(1);
        let max_bytes = self.cfg().read_batch_bytes;
        loop {
            let item = tokio::select! {
                it = tail.next() => it,
                _ = stop.wait_for(|s| *s) => return Err(shutting_down()),
                _ = tx.closed() => return Ok(()),
            };
            let Some(item) = item else {
                return Ok(());
            };
            let mut entries = vec![item.map_err(|e| to_status(&e))?];
            let mut bytes = entries[0].payload.len();
            let mut failure = None;
            let mut ended = false;
            while entries.len() < max_entries && bytes < max_bytes {
                match tail.next().now_or_never() {
                    Some(Some(Ok(e))) => {
                        bytes += e.payload.len();
                        entries.push(e);
                    }
                    Some(Some(Err(e))) => {
                        failure = Some(to_status(&e));
                        break;
                    }
                    Some(None) => {
                        ended = true;
                        break;
                    }
                    None => break,
                }
            }
            let resp = pb::ReadResponse {
                entries: entries.into_iter().map(to_pb_entry).collect(),
            };
            if !self.send(tx, stop, resp).await? {
                return Ok(());
            }
            if let Some(f) = failure {
                return Err(f);
            }
            if ended {
                return Ok(());
            }
        }
    }
}

/// Runs a stream's producer on its own task; its error ends the stream.
fn spawn_stream<T, F, Fut>(slot: OwnedSemaphorePermit, f: F) -> ResponseStream<T>
where
    T: Send + 'static,
    F: FnOnce(mpsc::Sender<Result<T, Status>>) -> Fut,
    Fut: Future<Output = Result<(), Status>> + Send + 'static,
{
    let (tx, rx) = mpsc::channel(STREAM_QUEUE);
    let fut = f(tx.clone());
    tokio::spawn(async move {
        let _slot = slot;
        if let Err(s) = fut.await {
            let _ = tx.send(Err(s)).await;
        }
    });
    Box::pin(ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl LedgerService for LedgerGateway {
    async fn create(
        &self,
        req: Request<pb::CreateRequest>,
    ) -> Result<Response<pb::CreateResponse>, Status> {
        self.check_running()?;
        let r = req.into_inner();
        let ensemble = if r.ensemble_size == 0 {
            3
        } else {
            r.ensemble_size
        };
        let write_quorum = if r.write_quorum == 0 {
            ensemble.min(3)
        } else {
            r.write_quorum
        };
        let ack_quorum = if r.ack_quorum == 0 {
            write_quorum.min(2)
        } else {
            r.ack_quorum
        };
        if !(ensemble >= write_quorum && write_quorum >= ack_quorum && ack_quorum >= 1) {
            return Err(invalid(format!(
                "need ensemble >= write quorum >= ack quorum >= 1, got {ensemble}/{write_quorum}/{ack_quorum}"
            )));
        }
        let digest = match pb::DigestType::try_from(r.digest) {
            Ok(pb::DigestType::Unspecified | pb::DigestType::Crc32c) => DigestType::Crc32c,
            Ok(pb::DigestType::Dummy) => DigestType::Dummy,
            Err(_) => return Err(invalid(format!("unknown digest type {}", r.digest))),
        };
        let slot = self
            .inner
            .writer_slots
            .clone()
            .try_acquire_owned()
            .map_err(|_| {
                status(
                    TOO_MANY_WRITERS,
                    format!(
                        "this gateway holds {} open writers, its maximum: close some ledgers first",
                        self.cfg().max_writers
                    ),
                )
            })?;
        let opts = CreateOptions {
            ensemble,
            write_quorum,
            ack_quorum,
            digest,
            password: r.password.to_vec(),
            custom: r.custom.into_iter().collect(),
        };
        let writer = self.timed("create", self.inner.client.create(opts)).await?;
        let id = writer.id();
        if self.is_stopping() {
            // Raced with shutdown: do not keep a writer that nothing will drop.
            return Err(shutting_down());
        }
        self.inner.writers.lock().insert(
            id,
            Held {
                writer,
                password: r.password.to_vec(),
                _slot: slot,
            },
        );
        tracing::debug!(ledger_id = id, "ledger created; writer held open");
        Ok(Response::new(pb::CreateResponse { ledger_id: id }))
    }

    type AppendStream = ResponseStream<pb::AppendResponse>;

    async fn append(
        &self,
        req: Request<Streaming<pb::AppendRequest>>,
    ) -> Result<Response<Self::AppendStream>, Status> {
        let slot = self.stream_slot()?;
        let mut inbound = req.into_inner();
        let this = self.clone();
        Ok(Response::new(spawn_stream(slot, move |tx| async move {
            let mut stop = this.inner.stopping.subscribe();
            this.append_loop(&mut inbound, &tx, &mut stop).await
        })))
    }

    async fn open(
        &self,
        req: Request<pb::OpenRequest>,
    ) -> Result<Response<pb::OpenResponse>, Status> {
        self.check_running()?;
        let r = req.into_inner();
        let id = r.ledger_id;
        let reader = if r.recover {
            let reader = self
                .timed(
                    "open with recovery",
                    self.inner.client.recover(id, &r.password),
                )
                .await?;
            // Recovery fenced our own writer too, if we held it: it can never append again.
            self.forget_writer(id);
            reader
        } else {
            self.open_reader(id, &r.password).await?
        };
        let lac = if reader.is_closed() {
            reader.lac()
        } else {
            self.timed("LAC read", reader.read_lac()).await?
        };
        let version = self.version_of(id).await;
        Ok(Response::new(pb::OpenResponse {
            info: Some(info_of(id, &reader.metadata(), version)),
            lac,
        }))
    }

    type ReadStream = ResponseStream<pb::ReadResponse>;

    async fn read(
        &self,
        req: Request<pb::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let slot = self.stream_slot()?;
        let r = req.into_inner();
        if r.last_entry < -1 {
            return Err(invalid(format!(
                "last_entry {} (use -1 to read up to the LAC)",
                r.last_entry
            )));
        }
        let reader = self.open_reader(r.ledger_id, &r.password).await?;
        let last = if r.last_entry == -1 {
            let lac = if reader.is_closed() {
                reader.lac()
            } else {
                self.timed("LAC read", reader.read_lac()).await?
            };
            if lac < r.first_entry as i64 {
                // Nothing up to the LAC from there: an empty stream.
                return Ok(Response::new(Box::pin(futures::stream::empty())));
            }
            lac as u64
        } else {
            let last = r.last_entry as u64;
            if last < r.first_entry {
                return Err(invalid(format!(
                    "last_entry {last} is before first_entry {}",
                    r.first_entry
                )));
            }
            last
        };
        let this = self.clone();
        Ok(Response::new(spawn_stream(slot, move |tx| async move {
            let mut stop = this.inner.stopping.subscribe();
            this.read_loop(reader, r.first_entry, last, r.unconfirmed, &tx, &mut stop)
                .await
        })))
    }

    async fn read_lac(
        &self,
        req: Request<pb::ReadLacRequest>,
    ) -> Result<Response<pb::ReadLacResponse>, Status> {
        self.check_running()?;
        let r = req.into_inner();
        let reader = self.open_reader(r.ledger_id, &r.password).await?;
        if reader.is_closed() {
            return Ok(Response::new(pb::ReadLacResponse {
                lac: reader.lac(),
                closed: true,
            }));
        }
        let lac = match r.previous_lac {
            None => self.timed("LAC read", reader.read_lac()).await?,
            Some(previous) => {
                let wait = if r.timeout_ms == 0 {
                    LAC_WAIT_DEFAULT
                } else {
                    Duration::from_millis(u64::from(r.timeout_ms)).min(LAC_WAIT_MAX)
                };
                let bound = wait + self.cfg().op_timeout;
                let mut stop = self.inner.stopping.subscribe();
                tokio::select! {
                    res = tokio::time::timeout(bound, reader.wait_lac(previous, wait)) => match res {
                        Ok(Ok(lac)) => lac,
                        Ok(Err(e)) => return Err(to_status(&e)),
                        Err(_) => return Err(timed_out("LAC long poll", bound)),
                    },
                    _ = stop.wait_for(|s| *s) => return Err(shutting_down()),
                }
            }
        };
        Ok(Response::new(pb::ReadLacResponse { lac, closed: false }))
    }

    type TailStream = ResponseStream<pb::ReadResponse>;

    async fn tail(
        &self,
        req: Request<pb::TailRequest>,
    ) -> Result<Response<Self::TailStream>, Status> {
        let slot = self.stream_slot()?;
        let r = req.into_inner();
        let reader = self.open_reader(r.ledger_id, &r.password).await?;
        let this = self.clone();
        Ok(Response::new(spawn_stream(slot, move |tx| async move {
            let mut stop = this.inner.stopping.subscribe();
            this.tail_loop(reader, r.from_entry, &tx, &mut stop).await
        })))
    }

    async fn close(
        &self,
        req: Request<pb::CloseRequest>,
    ) -> Result<Response<pb::CloseResponse>, Status> {
        self.check_running()?;
        let r = req.into_inner();
        let id = r.ledger_id;
        let meta = match self.held_writer(id, &r.password)? {
            Some(writer) => match self.timed("close", writer.close()).await {
                Ok(m) => {
                    self.forget_writer(id);
                    m
                }
                Err(s) => {
                    if matches!(
                        crate::error::code_of(&s),
                        Some("FENCED" | "CLOSED" | "WRITER_STOPPED" | "NO_SUCH_LEDGER")
                    ) {
                        self.forget_writer(id);
                    }
                    return Err(s);
                }
            },
            None => {
                // Not ours: fine when it is already closed (Close is idempotent), after a
                // password check.
                let reader = self.open_reader(id, &r.password).await?;
                if !reader.is_closed() {
                    return Err(self.not_writer(id).await);
                }
                reader.metadata()
            }
        };
        let version = self.version_of(id).await;
        Ok(Response::new(pb::CloseResponse {
            info: Some(info_of(id, &meta, version)),
        }))
    }

    async fn delete(
        &self,
        req: Request<pb::DeleteRequest>,
    ) -> Result<Response<pb::DeleteResponse>, Status> {
        self.check_running()?;
        let id = req.into_inner().ledger_id;
        self.forget_writer(id);
        self.timed("delete", self.inner.client.delete(id)).await?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn list(
        &self,
        req: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ListResponse>, Status> {
        self.check_running()?;
        let r = req.into_inner();
        let limit = if r.limit == 0 {
            LIST_DEFAULT
        } else {
            r.limit.min(LIST_MAX)
        };
        let (ledger_ids, more) = self
            .timed("list", self.inner.client.list(r.start_after, limit))
            .await?;
        Ok(Response::new(pb::ListResponse { ledger_ids, more }))
    }

    async fn info(
        &self,
        req: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        self.check_running()?;
        let id = req.into_inner().ledger_id;
        let m = self
            .timed("metadata read", self.inner.client.metadata(id))
            .await?;
        Ok(Response::new(pb::InfoResponse {
            info: Some(info_of(id, &m.value, m.version)),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn entry(id: u64, len: usize) -> Entry {
        Entry {
            entry_id: id,
            payload: Bytes::from(vec![0u8; len]),
        }
    }

    #[test]
    fn batches_respect_both_limits() {
        let entries: Vec<Entry> = (0..10).map(|i| entry(i, 100)).collect();
        let b = batches(entries, 4, 1 << 20);
        assert_eq!(
            b.iter().map(|r| r.entries.len()).collect::<Vec<_>>(),
            vec![4, 4, 2]
        );
        let entries: Vec<Entry> = (0..5).map(|i| entry(i, 600)).collect();
        let b = batches(entries, 100, 1000);
        assert_eq!(b.len(), 5, "one 600-byte entry per 1000-byte batch");
        // A single entry above the byte limit still travels, alone.
        let b = batches(vec![entry(0, 5000), entry(1, 1)], 100, 1000);
        assert_eq!(b.len(), 2);
        let ids: Vec<u64> = b
            .iter()
            .flat_map(|r| r.entries.iter().map(|e| e.entry_id))
            .collect();
        assert_eq!(ids, vec![0, 1]);
        assert!(batches(Vec::new(), 4, 4).is_empty());
    }
}
