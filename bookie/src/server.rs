//! The bookie gRPC service (`quire.bookie.v1.Bookie`).
//!
//! The add stream is pipelined: a reader task takes requests off the stream and hands each entry
//! to the bookie, which answers through a callback once the entry is durable; the response stream
//! packs whatever results are ready into one message. At most `stream_in_flight_max` entries
//! per stream are between the two; past that the reader stops reading, so a client that floods or
//! never reads responses is held back by HTTP/2 flow control instead of growing our memory.

use crate::bookie::{AddRequest, Bookie};
use crate::error::BookieError;
use quire_proto::StatusCode;
use quire_proto::bookie as pb;
use quire_proto::bookie::bookie_server::{Bookie as BookieApi, BookieServer};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tonic::{Request, Response, Status, Streaming};

/// Longest long poll a client may ask for.
const LONG_POLL_MAX: Duration = Duration::from_secs(60);
/// Results packed into one add response at most.
const RESULTS_PER_RESPONSE: usize = 4096;

pub struct BookieService {
    bookie: Arc<Bookie>,
    /// One permit per open add stream.
    streams: Arc<Semaphore>,
    /// Turns true when the server stops: add streams then stop reading and end once their
    /// in-flight adds are answered (a client's stream never ends by itself, and graceful
    /// shutdown would otherwise wait for it).
    stopping: tokio::sync::watch::Receiver<bool>,
}

impl BookieService {
    pub fn new(bookie: Arc<Bookie>) -> Self {
        let streams = Arc::new(Semaphore::new(bookie.config().add_streams_max));
        let (_, stopping) = tokio::sync::watch::channel(false);
        Self {
            bookie,
            streams,
            stopping,
        }
    }

    /// Ends add streams when `stopping` turns true.
    pub fn with_shutdown(mut self, stopping: tokio::sync::watch::Receiver<bool>) -> Self {
        self.stopping = stopping;
        self
    }

    /// The tonic server for this service. One request message carries at most the largest entry
    /// plus 1 MiB (clients split bigger batches), which bounds what a stream holds while it waits.
    pub fn into_server(self) -> BookieServer<Self> {
        let max = self.bookie.config().entry_size_max_bytes + (1 << 20);
        BookieServer::new(self)
            .max_decoding_message_size(max)
            .max_encoding_message_size(max)
    }
}

fn result(ledger_id: u64, entry_id: u64, r: Result<(), BookieError>) -> pb::AddResult {
    match r {
        Ok(()) => pb::AddResult {
            ledger_id,
            entry_id,
            code: StatusCode::Ok as i32,
            message: String::new(),
        },
        Err(e) => pb::AddResult {
            ledger_id,
            entry_id,
            code: e.code() as i32,
            message: e.to_string(),
        },
    }
}

/// The add stream's responses: every result ready when the transport asks for the next message,
/// packed into one response. Polled directly by the connection, so a result goes from the
/// journal's callback to the socket without another task in between. An entry's in-flight permit
/// is released once its result has been handed to the transport.
pub struct AddResults {
    rx: mpsc::UnboundedReceiver<(pb::AddResult, OwnedSemaphorePermit)>,
}

impl tokio_stream::Stream for AddResults {
    type Item = Result<pb::AddResponse, Status>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let first = match self.rx.poll_recv(cx) {
            Poll::Ready(Some((r, _permit))) => r,
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        let mut results = vec![first];
        while results.len() < RESULTS_PER_RESPONSE {
            match self.rx.try_recv() {
                Ok((r, _permit)) => results.push(r),
                Err(_) => break,
            }
        }
        Poll::Ready(Some(Ok(pb::AddResponse { results })))
    }
}

#[tonic::async_trait]
impl BookieApi for BookieService {
    type AddStream = AddResults;

    async fn add(
        &self,
        request: Request<Streaming<pb::AddRequest>>,
    ) -> Result<Response<Self::AddStream>, Status> {
        let stream_permit = self.streams.clone().try_acquire_owned().map_err(|_| {
            quire_proto::status::to_status(
                StatusCode::TooManyRequests,
                "too many add streams open on this bookie",
            )
        })?;
        let mut inbound = request.into_inner();
        let in_flight = Arc::new(Semaphore::new(self.bookie.config().stream_in_flight_max));
        let (done_tx, done_rx) = mpsc::unbounded_channel::<(pb::AddResult, OwnedSemaphorePermit)>();
        let bookie = self.bookie.clone();
        let mut stopping = self.stopping.clone();
        tokio::spawn(async move {
            let _stream_permit = stream_permit;
            loop {
                let next = tokio::select! {
                    m = inbound.message() => m,
                    _ = async {
                        // A dropped sender means "never stopping" (a service without shutdown).
                        if stopping.wait_for(|s| *s).await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    } => break,
                };
                let msg = match next {
                    Ok(Some(m)) => m,
                    Ok(None) => break,
                    Err(e) => {
                        tracing::debug!(error = %e, "add stream ended with an error");
                        break;
                    }
                };
                for e in msg.entries {
                    let Ok(permit) = in_flight.clone().acquire_owned().await else {
                        return;
                    };
                    let tx = done_tx.clone();
                    let (ledger_id, entry_id) = (e.ledger_id, e.entry_id);
                    let req = AddRequest {
                        ledger_id,
                        entry_id,
                        master_key: e.master_key,
                        recovery: e.recovery,
                        body: e.body,
                    };
                    bookie
                        .add(
                            req,
                            Box::new(move |r| {
                                let _ = tx.send((result(ledger_id, entry_id, r), permit));
                            }),
                        )
                        .await;
                }
            }
        });
        Ok(Response::new(AddResults { rx: done_rx }))
    }

    async fn read_entry(
        &self,
        request: Request<pb::ReadEntryRequest>,
    ) -> Result<Response<pb::ReadEntryResponse>, Status> {
        let r = request.into_inner();
        let fence = r.fence.then_some(r.master_key);
        let out = self
            .bookie
            .read(r.ledger_id, r.entry_id, fence)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ReadEntryResponse {
            entry_id: out.entry_id,
            body: out.body,
            lac: out.lac,
            fenced: out.fenced,
        }))
    }

    async fn read_entries(
        &self,
        request: Request<pb::ReadEntriesRequest>,
    ) -> Result<Response<pb::ReadEntriesResponse>, Status> {
        let r = request.into_inner();
        let (bodies, lac) = self
            .bookie
            .read_range(r.ledger_id, r.first_entry_id, r.max_entries, r.max_bytes)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ReadEntriesResponse { bodies, lac }))
    }

    async fn read_lac(
        &self,
        request: Request<pb::ReadLacRequest>,
    ) -> Result<Response<pb::ReadLacResponse>, Status> {
        let r = request.into_inner();
        let timeout = (r.timeout_ms > 0)
            .then(|| Duration::from_millis(r.timeout_ms as u64).min(LONG_POLL_MAX));
        let out = self
            .bookie
            .read_lac(r.ledger_id, r.previous_lac, timeout)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::ReadLacResponse {
            lac: out.lac,
            last_entry_body: out.last_entry_body.unwrap_or_default(),
            explicit_lac_body: out.explicit_lac_body.unwrap_or_default(),
            timed_out: out.timed_out,
        }))
    }

    async fn fence(
        &self,
        request: Request<pb::FenceRequest>,
    ) -> Result<Response<pb::FenceResponse>, Status> {
        let r = request.into_inner();
        let (lac, last_entry_id) = self
            .bookie
            .fence(r.ledger_id, r.master_key)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::FenceResponse { lac, last_entry_id }))
    }

    async fn write_lac(
        &self,
        request: Request<pb::WriteLacRequest>,
    ) -> Result<Response<pb::WriteLacResponse>, Status> {
        let r = request.into_inner();
        self.bookie
            .write_lac(r.ledger_id, r.master_key, r.lac, r.body)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::WriteLacResponse {}))
    }

    async fn delete_ledger(
        &self,
        request: Request<pb::DeleteLedgerRequest>,
    ) -> Result<Response<pb::DeleteLedgerResponse>, Status> {
        self.bookie
            .delete(request.into_inner().ledger_id)
            .await
            .map_err(|e| e.to_status())?;
        Ok(Response::new(pb::DeleteLedgerResponse {}))
    }

    async fn info(
        &self,
        _request: Request<pb::InfoRequest>,
    ) -> Result<Response<pb::InfoResponse>, Status> {
        let i = self.bookie.info();
        Ok(Response::new(pb::InfoResponse {
            bookie_id: i.bookie_id,
            state: if i.read_only {
                pb::BookieState::ReadOnly as i32
            } else {
                pb::BookieState::ReadWrite as i32
            },
            forced_read_only: i.forced_read_only,
            free_bytes: i.free_bytes,
            total_bytes: i.total_bytes,
            ledger_count: i.ledgers as u64,
            journal_io: i.journal_io.into(),
        }))
    }
}
