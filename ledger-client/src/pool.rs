//! Connections to bookies, shared by every ledger of a client: one gRPC channel per bookie, one
//! pipelined add stream per bookie, addresses resolved through the bookie registry.
//!
//! Add results are routed back to whoever sent the add through the `reply` channel given with it.
//! Those channels and the outbound add queues are unbounded channels (a writer's driver must never
//! block on one slow bookie while others answer), but what they hold is bounded: a stream takes
//! at most [`OUTSTANDING_MAX`] adds or [`OUTSTANDING_BYTES_MAX`] bytes unanswered (more fail at
//! once, and the writer replaces the bookie), and an add unanswered for the add timeout fails.
//! That matters with Qa < Qw, where a slow bookie never holds the writer back by itself.
//!
//! A bookie that answers TOO_MANY_REQUESTS gets the same add again after a short pause; every
//! other failure goes back to the sender. When an add stream breaks, every add outstanding on it
//! fails, the connection is dropped and the next add resolves the bookie's address again (a
//! restarted bookie may listen elsewhere).

use std::collections::{HashMap, VecDeque};
use std::hash::BuildHasherDefault;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use quire_metadata::bookies::BookieRegistry;
use quire_proto::StatusCode;
use quire_proto::bookie as pb;
use quire_proto::bookie::bookie_client::BookieClient;
use tokio::sync::mpsc;
use tonic::transport::Channel;

/// Entries packed into one add-stream message at most.
const BATCH_MAX: usize = 256;
/// Body bytes packed into one add-stream message at most (bookies cap a message at their largest
/// entry plus 1 MiB).
const BATCH_BYTES_MAX: usize = 512 << 10;
/// Pause before resending an add the bookie refused with TOO_MANY_REQUESTS.
const BUSY_RETRY: Duration = Duration::from_millis(20);
/// Gives up resending a refused add after this many tries.
const BUSY_RETRIES_MAX: u32 = 200;
const MESSAGE_MAX: usize = 64 << 20;
/// Unanswered adds one add stream holds at most.
pub const OUTSTANDING_MAX: usize = 100_000;
/// Unanswered add bytes one add stream holds at most.
pub const OUTSTANDING_BYTES_MAX: usize = 256 << 20;
/// How often a stream looks for adds unanswered past the add timeout.
const SWEEP: Duration = Duration::from_millis(500);

/// A failed bookie call: the Quire code and the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CallError {
    pub code: StatusCode,
    pub message: String,
}

impl CallError {
    fn io(message: impl Into<String>) -> Self {
        CallError {
            code: StatusCode::IoError,
            message: message.into(),
        }
    }
    fn from_status(s: &tonic::Status) -> Self {
        CallError {
            code: quire_proto::status::code_of(s),
            message: s.message().to_string(),
        }
    }
    pub fn is_missing(&self) -> bool {
        matches!(
            self.code,
            StatusCode::NoSuchEntry | StatusCode::NoSuchLedger
        )
    }
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.code, self.message)
    }
}

/// The answer to one add, as delivered to the sender's reply channel.
#[derive(Debug)]
pub struct AddReply {
    pub bookie: Arc<str>,
    pub ledger_id: u64,
    pub entry_id: u64,
    pub result: Result<(), CallError>,
}

pub type ReplyTx = mpsc::UnboundedSender<AddReply>;

struct Waiter {
    entry: pb::AddEntry,
    reply: ReplyTx,
    tries: u32,
    sent: Instant,
}

/// Adds sent on one stream and not answered yet. Once `closed`, the stream's task has failed
/// everything in it and nothing may be added (checked under the same lock, so no add can slip
/// in after the final drain and wait forever).
///
/// Answers name only (ledger, entry), so one entry is never outstanding twice on a stream: a
/// second add of it (a recovery write-back racing the writer) waits in `held`, unsent, until the
/// first is answered.
#[derive(Default)]
struct WaiterMap {
    closed: bool,
    map: HashMap<(u64, u64), Waiter, BuildHasherDefault<rustc_hash::FxHasher>>,
    held: Vec<Waiter>,
    bytes: usize,
}

impl WaiterMap {
    fn len(&self) -> usize {
        self.map.len() + self.held.len()
    }

    /// Registers an add; returns the entry when it is to be sent now.
    fn insert(&mut self, w: Waiter) -> Option<pb::AddEntry> {
        self.bytes += w.entry.body.len();
        let key = (w.entry.ledger_id, w.entry.entry_id);
        match self.map.entry(key) {
            std::collections::hash_map::Entry::Occupied(_) => {
                self.held.push(w);
                None
            }
            std::collections::hash_map::Entry::Vacant(v) => Some(v.insert(w).entry.clone()),
        }
    }

    /// Removes the add answered for `key`; returns it, and a held add of the same entry to send
    /// now.
    fn take(&mut self, key: (u64, u64)) -> (Option<Waiter>, Option<pb::AddEntry>) {
        let Some(w) = self.map.remove(&key) else {
            return (None, None);
        };
        self.bytes -= w.entry.body.len();
        let next = self
            .held
            .iter()
            .position(|d| (d.entry.ledger_id, d.entry.entry_id) == key)
            .map(|i| {
                let mut d = self.held.swap_remove(i);
                d.sent = Instant::now();
                let e = d.entry.clone();
                self.map.insert(key, d);
                e
            });
        (Some(w), next)
    }

    /// Removes the adds sent before `deadline`; returns them, and held adds to send now.
    fn expire(&mut self, deadline: Instant) -> (Vec<Waiter>, Vec<pb::AddEntry>) {
        let keys: Vec<(u64, u64)> = self
            .map
            .iter()
            .filter(|(_, w)| w.sent < deadline)
            .map(|(k, _)| *k)
            .collect();
        let mut expired = Vec::with_capacity(keys.len());
        let mut resend = Vec::new();
        for k in keys {
            let (w, next) = self.take(k);
            expired.extend(w);
            resend.extend(next);
        }
        (expired, resend)
    }
}

type Waiters = Arc<Mutex<WaiterMap>>;

struct AddStream {
    tx: mpsc::UnboundedSender<Vec<pb::AddEntry>>,
    waiters: Waiters,
}

struct Conn {
    addr: String,
    client: BookieClient<Channel>,
    adds: Option<AddStream>,
}

pub struct BookiePool {
    registry: BookieRegistry,
    conns: Mutex<HashMap<String, Conn>>,
    call_timeout: Duration,
    add_timeout: Duration,
}

impl BookiePool {
    /// `call_timeout` bounds unary calls; an add unanswered for `add_timeout` fails.
    pub fn new(
        registry: BookieRegistry,
        call_timeout: Duration,
        add_timeout: Duration,
    ) -> Arc<Self> {
        Arc::new(BookiePool {
            registry,
            conns: Mutex::new(HashMap::new()),
            call_timeout,
            add_timeout,
        })
    }

    async fn resolve(&self, bookie: &str) -> Result<String, CallError> {
        let all = self
            .registry
            .list()
            .await
            .map_err(|e| CallError::io(format!("bookie registry: {e}")))?;
        all.into_iter()
            .find(|b| b.id == bookie)
            .map(|b| b.info.addr)
            .ok_or_else(|| CallError::io(format!("bookie {bookie} is not registered")))
    }

    async fn client(&self, bookie: &str) -> Result<BookieClient<Channel>, CallError> {
        if let Some(c) = self.conns.lock().get(bookie) {
            return Ok(c.client.clone());
        }
        let addr = self.resolve(bookie).await?;
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| CallError::io(format!("bad address {addr}: {e}")))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_timeout(Duration::from_secs(5));
        let client = BookieClient::new(endpoint.connect_lazy())
            .max_decoding_message_size(MESSAGE_MAX)
            .max_encoding_message_size(MESSAGE_MAX);
        let mut conns = self.conns.lock();
        let c = conns.entry(bookie.to_string()).or_insert(Conn {
            addr,
            client,
            adds: None,
        });
        Ok(c.client.clone())
    }

    /// Forgets a bookie's connection after a transport failure (its address is looked up again).
    fn forget(&self, bookie: &str, addr: &str) {
        let mut conns = self.conns.lock();
        if conns.get(bookie).is_some_and(|c| c.addr == addr) {
            conns.remove(bookie);
        }
    }

    /// Sends an add; its result goes to `reply` exactly once.
    pub async fn send_add(self: &Arc<Self>, bookie: &str, entry: pb::AddEntry, reply: ReplyTx) {
        self.send_adds(bookie, vec![entry], &reply).await;
    }

    /// Sends adds to one bookie in one go; each result goes to `reply` exactly once.
    pub async fn send_adds(
        self: &Arc<Self>,
        bookie: &str,
        entries: Vec<pb::AddEntry>,
        reply: &ReplyTx,
    ) {
        let waiters = entries
            .into_iter()
            .map(|entry| Waiter {
                entry,
                reply: reply.clone(),
                tries: 0,
                sent: Instant::now(),
            })
            .collect();
        self.submit(bookie, waiters).await;
    }

    async fn submit(self: &Arc<Self>, bookie: &str, ws: Vec<Waiter>) {
        if !self.conns.lock().contains_key(bookie)
            && let Err(e) = self.client(bookie).await
        {
            return fail_all(bookie, ws, e);
        }
        let mut conns = self.conns.lock();
        let Some(conn) = conns.get_mut(bookie) else {
            drop(conns);
            return fail_all(bookie, ws, CallError::io("connection dropped"));
        };
        if conn
            .adds
            .as_ref()
            .is_none_or(|s| s.tx.is_closed() || s.waiters.lock().closed)
        {
            conn.adds = Some(self.open_stream(bookie, conn));
        }
        let s = conn.adds.as_ref().expect("just opened");
        let mut g = s.waiters.lock();
        if g.closed || s.tx.is_closed() {
            drop(g);
            drop(conns);
            return fail_all(bookie, ws, CallError::io("add stream closed"));
        }
        let bytes: usize = ws.iter().map(|w| w.entry.body.len()).sum();
        if g.len() + ws.len() > OUTSTANDING_MAX || g.bytes + bytes > OUTSTANDING_BYTES_MAX {
            let why = format!(
                "bookie {bookie} has {} adds ({} bytes) unanswered",
                g.len(),
                g.bytes
            );
            drop(g);
            drop(conns);
            return fail_all(bookie, ws, CallError::io(why));
        }
        let entries: Vec<pb::AddEntry> = ws.into_iter().filter_map(|w| g.insert(w)).collect();
        // Sent under the lock, so a stream's adds go out in the order they were registered.
        if !entries.is_empty() {
            let _ = s.tx.send(entries); // a closed stream fails them all in its final drain
        }
    }

    /// Opens the add stream of a bookie; its task routes results until the stream ends.
    fn open_stream(self: &Arc<Self>, bookie: &str, conn: &Conn) -> AddStream {
        let (tx, rx) = mpsc::unbounded_channel::<Vec<pb::AddEntry>>();
        let waiters: Waiters = Arc::default();
        let mut client = conn.client.clone();
        // The task holds the pool and the stream's sender weakly: once the client is dropped,
        // the pool and its senders go, the request stream ends and so does the task.
        let (pool, sender) = (Arc::downgrade(self), tx.downgrade());
        let (bookie, addr, w) = (bookie.to_string(), conn.addr.clone(), waiters.clone());
        let add_timeout = self.add_timeout;
        tokio::spawn(async move {
            let batcher = Batcher {
                rx,
                carry: VecDeque::new(),
                closed: false,
            };
            let bookie: Arc<str> = bookie.into();
            let resend = |entries: Vec<pb::AddEntry>| {
                if let (false, Some(tx)) = (entries.is_empty(), sender.upgrade()) {
                    let _ = tx.send(entries);
                }
            };
            let why = match client.add(batcher).await {
                Err(s) => CallError::from_status(&s),
                Ok(resp) => {
                    let mut responses = resp.into_inner();
                    let mut sweep = tokio::time::interval(SWEEP);
                    loop {
                        tokio::select! {
                            m = responses.message() => match (m, pool.upgrade()) {
                                (Ok(Some(msg)), Some(pool)) => resend(pool.route(&bookie, &w, msg)),
                                (Ok(Some(_)), None) => break CallError::io("client dropped"),
                                (Ok(None), _) => break CallError::io("add stream ended"),
                                (Err(s), _) => break CallError::io(format!("add stream failed: {}", s.message())),
                            },
                            _ = sweep.tick() => {
                                let Some(deadline) = Instant::now().checked_sub(add_timeout) else {
                                    continue;
                                };
                                let (expired, again) = w.lock().expire(deadline);
                                let e = CallError::io(format!("no answer within {add_timeout:?}"));
                                fail_all(&bookie, expired, e);
                                resend(again);
                            }
                        }
                    }
                }
            };
            tracing::debug!(%bookie, %why, "add stream closed");
            if let Some(pool) = pool.upgrade() {
                pool.forget(&bookie, &addr);
            }
            drain(&bookie, &w, why);
        });
        AddStream { tx, waiters }
    }

    /// Hands each result to its sender; returns held adds to send now.
    fn route(
        self: &Arc<Self>,
        bookie: &Arc<str>,
        waiters: &Waiters,
        msg: pb::AddResponse,
    ) -> Vec<pb::AddEntry> {
        let mut resend = Vec::new();
        for r in msg.results {
            let (w, next) = waiters.lock().take((r.ledger_id, r.entry_id));
            resend.extend(next);
            let Some(w) = w else {
                continue;
            };
            let code = StatusCode::try_from(r.code).unwrap_or(StatusCode::IoError);
            if code == StatusCode::TooManyRequests && w.tries < BUSY_RETRIES_MAX {
                let (pool, bookie) = (self.clone(), bookie.to_string());
                tokio::spawn(async move {
                    tokio::time::sleep(BUSY_RETRY).await;
                    let w = Waiter {
                        tries: w.tries + 1,
                        sent: Instant::now(),
                        ..w
                    };
                    pool.submit(&bookie, vec![w]).await;
                });
                continue;
            }
            let result = if code == StatusCode::Ok {
                Ok(())
            } else {
                Err(CallError {
                    code,
                    message: r.message,
                })
            };
            let _ = w.reply.send(AddReply {
                bookie: bookie.clone(),
                ledger_id: r.ledger_id,
                entry_id: r.entry_id,
                result,
            });
        }
        resend
    }

    async fn unary<T, F, Fut>(&self, bookie: &str, call: F) -> Result<T, CallError>
    where
        F: FnOnce(BookieClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client(bookie).await?;
        match tokio::time::timeout(self.call_timeout, call(client)).await {
            Err(_) => Err(CallError::io(format!(
                "no answer from bookie {bookie} within {:?}",
                self.call_timeout
            ))),
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => {
                let e = CallError::from_status(&s);
                if s.metadata().get(quire_proto::status::CODE_KEY).is_none() {
                    // A transport failure, not an answer: look the address up again next time.
                    let addr = self.conns.lock().get(bookie).map(|c| c.addr.clone());
                    if let Some(a) = addr {
                        self.forget(bookie, &a);
                    }
                }
                Err(e)
            }
        }
    }

    /// Fences a ledger on a bookie; returns its LAC.
    pub async fn fence(&self, bookie: &str, ledger_id: u64, key: Bytes) -> Result<i64, CallError> {
        self.unary(bookie, |mut c| async move {
            c.fence(pb::FenceRequest {
                ledger_id,
                master_key: key,
            })
            .await
        })
        .await
        .map(|r| r.lac)
    }

    /// Reads one entry (with `fence`, a recovery read that fences first).
    pub async fn read(
        &self,
        bookie: &str,
        ledger_id: u64,
        entry_id: u64,
        fence: Option<Bytes>,
    ) -> Result<pb::ReadEntryResponse, CallError> {
        self.unary(bookie, |mut c| async move {
            c.read_entry(pb::ReadEntryRequest {
                ledger_id,
                entry_id: entry_id as i64,
                fence: fence.is_some(),
                master_key: fence.unwrap_or_default(),
            })
            .await
        })
        .await
    }

    /// Consecutive entries from `first` on, in one call (see the bookie's `ReadEntries`).
    pub async fn read_entries(
        &self,
        bookie: &str,
        ledger_id: u64,
        first: u64,
        max_entries: u32,
        max_bytes: u64,
    ) -> Result<Vec<Bytes>, CallError> {
        self.unary(bookie, |mut c| async move {
            c.read_entries(pb::ReadEntriesRequest {
                ledger_id,
                first_entry_id: first,
                max_entries,
                max_bytes,
            })
            .await
        })
        .await
        .map(|r| r.bodies)
    }

    /// A bookie's LAC of a ledger; with `wait`, long-polls until it passes `previous`.
    pub async fn read_lac(
        &self,
        bookie: &str,
        ledger_id: u64,
        previous: i64,
        wait: Option<Duration>,
    ) -> Result<pb::ReadLacResponse, CallError> {
        let timeout_ms = wait.map_or(0, |w| w.as_millis().min(u32::MAX as u128) as u32);
        let call = |mut c: BookieClient<Channel>| async move {
            c.read_lac(pb::ReadLacRequest {
                ledger_id,
                previous_lac: previous,
                timeout_ms,
            })
            .await
        };
        match wait {
            // The long poll itself may take `wait`: allow for it on top of the call timeout.
            Some(w) => {
                let client = self.client(bookie).await?;
                match tokio::time::timeout(w + self.call_timeout, call(client)).await {
                    Err(_) => Err(CallError::io("long poll timed out")),
                    Ok(r) => r
                        .map(|r| r.into_inner())
                        .map_err(|s| CallError::from_status(&s)),
                }
            }
            None => self.unary(bookie, call).await,
        }
    }

    pub async fn write_lac(
        &self,
        bookie: &str,
        ledger_id: u64,
        key: Bytes,
        lac: i64,
    ) -> Result<(), CallError> {
        self.unary(bookie, |mut c| async move {
            c.write_lac(pb::WriteLacRequest {
                ledger_id,
                master_key: key,
                lac,
                body: Bytes::new(),
            })
            .await
        })
        .await
        .map(|_| ())
    }

    pub async fn delete_ledger(&self, bookie: &str, ledger_id: u64) -> Result<(), CallError> {
        self.unary(bookie, |mut c| async move {
            c.delete_ledger(pb::DeleteLedgerRequest { ledger_id }).await
        })
        .await
        .map(|_| ())
    }
}

fn fail_all(bookie: &str, ws: Vec<Waiter>, e: CallError) {
    let bookie: Arc<str> = bookie.into();
    for w in ws {
        let _ = w.reply.send(AddReply {
            bookie: bookie.clone(),
            ledger_id: w.entry.ledger_id,
            entry_id: w.entry.entry_id,
            result: Err(e.clone()),
        });
    }
}

/// Fails every add still waiting on a stream that ended.
fn drain(bookie: &str, waiters: &Waiters, why: CallError) {
    let all: Vec<Waiter> = {
        let mut g = waiters.lock();
        g.closed = true;
        g.bytes = 0;
        let mut all: Vec<Waiter> = g.map.drain().map(|(_, w)| w).collect();
        all.append(&mut g.held);
        all
    };
    fail_all(bookie, all, why);
}

/// The outbound side of an add stream: packs whatever entries are queued into one message, up to
/// [`BATCH_MAX`] entries and [`BATCH_BYTES_MAX`] bytes (at least one entry).
struct Batcher {
    rx: mpsc::UnboundedReceiver<Vec<pb::AddEntry>>,
    /// Entries received and not sent yet.
    carry: VecDeque<pb::AddEntry>,
    closed: bool,
}

impl tokio_stream::Stream for Batcher {
    type Item = pb::AddRequest;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        while !self.closed && self.carry.len() < BATCH_MAX {
            match self.rx.poll_recv(cx) {
                Poll::Ready(Some(v)) => self.carry.extend(v),
                Poll::Ready(None) => self.closed = true,
                Poll::Pending => break,
            }
        }
        if self.carry.is_empty() {
            return if self.closed {
                Poll::Ready(None)
            } else {
                Poll::Pending
            };
        }
        let mut bytes = 0;
        let mut entries = Vec::with_capacity(self.carry.len().min(BATCH_MAX));
        while entries.len() < BATCH_MAX && (entries.is_empty() || bytes < BATCH_BYTES_MAX) {
            let Some(e) = self.carry.pop_front() else {
                break;
            };
            bytes += e.body.len();
            entries.push(e);
        }
        Poll::Ready(Some(pb::AddRequest { entries }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waiter(ledger_id: u64, entry_id: u64, sent: Instant, reply: &ReplyTx) -> Waiter {
        Waiter {
            entry: pb::AddEntry {
                ledger_id,
                entry_id,
                body: Bytes::from_static(b"0123456789"),
                ..Default::default()
            },
            reply: reply.clone(),
            tries: 0,
            sent,
        }
    }

    #[test]
    fn a_second_add_of_one_entry_waits_for_the_first_answer() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let mut m = WaiterMap::default();
        assert!(m.insert(waiter(1, 5, now, &tx)).is_some(), "sent at once");
        assert!(m.insert(waiter(1, 5, now, &tx)).is_none(), "held, not sent");
        assert!(m.insert(waiter(1, 6, now, &tx)).is_some());
        assert_eq!((m.len(), m.bytes), (3, 30));
        let (first, next) = m.take((1, 5));
        assert!(first.is_some());
        assert_eq!(
            next.map(|e| e.entry_id),
            Some(5),
            "the held add goes out now"
        );
        let (second, next) = m.take((1, 5));
        assert!(second.is_some() && next.is_none());
        assert_eq!(m.take((1, 5)).0.map(|w| w.entry.entry_id), None);
        assert_eq!((m.len(), m.bytes), (1, 10));
    }

    #[test]
    fn adds_sent_before_the_deadline_expire_and_release_held_ones() {
        let (tx, _rx) = mpsc::unbounded_channel();
        let now = Instant::now();
        let old = now - Duration::from_secs(10);
        let mut m = WaiterMap::default();
        m.insert(waiter(1, 1, old, &tx));
        m.insert(waiter(1, 1, now, &tx)); // held behind the old one
        m.insert(waiter(1, 2, now, &tx));
        let (expired, resend) = m.expire(now - Duration::from_secs(5));
        let ids: Vec<u64> = expired.iter().map(|w| w.entry.entry_id).collect();
        assert_eq!(ids, vec![1], "only the old add expires");
        assert_eq!(
            resend.iter().map(|e| e.entry_id).collect::<Vec<_>>(),
            vec![1]
        );
        assert_eq!(m.len(), 2, "the promoted add and entry 2 remain");
        let (expired, resend) = m.expire(now - Duration::from_secs(5));
        assert!(
            expired.is_empty() && resend.is_empty(),
            "the promoted add is fresh"
        );
    }
}
