//! `quire.stream.v1.StreamService` over [`crate::stream`].

use std::pin::Pin;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::FuturesOrdered;
use futures::{Stream, StreamExt};
use quire_proto::stream as pb;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use super::{APPEND_IN_FLIGHT_MAX, StreamTableServer, to_status, user_name};
use crate::error::{Error, Result};
use crate::names::Name;
use crate::stream::{Record, StreamConfig, StreamInfo};

/// Records per read response, and their byte budget.
const READ_BATCH: usize = 256;
const READ_BATCH_BYTES: usize = 1 << 20;
/// How long one tail poll waits before checking that its caller is still there.
const TAIL_POLL: Duration = Duration::from_secs(5);
/// Responses queued per server stream.
const RESPONSES_MAX: usize = 16;

pub(crate) struct StreamApi(pub(crate) StreamTableServer);

type Resp<T> = std::result::Result<Response<T>, Status>;
type BoxStream<T> = Pin<Box<dyn Stream<Item = std::result::Result<T, Status>> + Send>>;

fn st(e: Error) -> Status {
    to_status(&e)
}

pub(crate) fn name_of(n: Option<&pb::StreamName>) -> Result<Name> {
    let n = n.ok_or_else(|| Error::InvalidArgument("a stream name is required".into()))?;
    user_name(&n.namespace, &n.name)
}

pub(crate) fn config_from(c: Option<&pb::StreamConfig>) -> StreamConfig {
    let d = StreamConfig::default();
    let Some(c) = c else { return d };
    let or = |v: u64, d: u64| if v == 0 { d } else { v };
    let or32 = |v: u32, d: u32| if v == 0 { d } else { v };
    StreamConfig {
        segment_max_bytes: or(c.segment_max_bytes, d.segment_max_bytes),
        segment_max_entries: or(c.segment_max_entries, d.segment_max_entries),
        segment_max_age: if c.segment_max_age_ms == 0 {
            d.segment_max_age
        } else {
            Duration::from_millis(c.segment_max_age_ms)
        },
        ensemble: or32(c.ensemble, d.ensemble),
        write_quorum: or32(c.write_quorum, d.write_quorum),
        ack_quorum: or32(c.ack_quorum, d.ack_quorum),
    }
}

pub(crate) fn config_to(c: &StreamConfig) -> pb::StreamConfig {
    pb::StreamConfig {
        segment_max_bytes: c.segment_max_bytes,
        segment_max_entries: c.segment_max_entries,
        segment_max_age_ms: c.segment_max_age.as_millis().min(u64::MAX as u128) as u64,
        ensemble: c.ensemble,
        write_quorum: c.write_quorum,
        ack_quorum: c.ack_quorum,
    }
}

pub(crate) fn pb_name(n: &Name) -> pb::StreamName {
    pb::StreamName {
        namespace: n.namespace.clone(),
        name: n.name.clone(),
    }
}

fn info_to(i: StreamInfo) -> pb::StreamInfo {
    let (writer_id, writer_addr) = i.writer.map(|w| (w.id, w.addr)).unwrap_or_default();
    pb::StreamInfo {
        name: Some(pb_name(&i.name)),
        config: Some(config_to(&i.config)),
        start_offset: i.start_offset,
        end_offset: i.end_offset,
        segments: i
            .segments
            .into_iter()
            .map(|s| pb::Segment {
                seq: s.seq,
                ledger: s.ledger,
                start_offset: s.start_offset,
                count: s.count,
            })
            .collect(),
        writer_id,
        writer_addr,
        created_ms: i.created_ms,
    }
}

fn records_to(rs: Vec<Record>) -> pb::ReadResponse {
    pb::ReadResponse {
        records: rs
            .into_iter()
            .map(|r| pb::Record {
                offset: r.offset,
                payload: r.payload,
            })
            .collect(),
    }
}

/// Whether an append error leaves the writer unusable (so it must be dropped and reopened).
fn fatal(e: &Error) -> bool {
    !matches!(e, Error::TooLarge(_) | Error::InvalidArgument(_))
}

#[tonic::async_trait]
impl pb::stream_service_server::StreamService for StreamApi {
    async fn create(&self, req: Request<pb::CreateRequest>) -> Resp<pb::StreamInfo> {
        let s = &self.0.inner;
        let req = req.into_inner();
        let name = name_of(req.name.as_ref()).map_err(st)?;
        let cfg = config_from(req.config.as_ref());
        let info = s
            .bounded("create", s.streams.create(&name, cfg))
            .await
            .map_err(st)?;
        Ok(Response::new(info_to(info)))
    }

    type AppendStream = BoxStream<pb::AppendResponse>;

    async fn append(&self, req: Request<Streaming<pb::AppendRequest>>) -> Resp<Self::AppendStream> {
        let inner = self.0.inner.clone();
        let mut requests = req.into_inner();
        let first = match requests.message().await? {
            Some(r) => r,
            None => return Err(st(Error::InvalidArgument("empty append stream".into()))),
        };
        let name = name_of(first.name.as_ref()).map_err(st)?;
        let writer = inner
            .bounded("opening the writer", inner.writer(&name))
            .await
            .map_err(st)?;
        let (tx, rx) = mpsc::channel(RESPONSES_MAX);
        let _ = tx.try_send(Ok(pb::AppendResponse { offsets: vec![] }));
        let timeout = inner.cfg.op_timeout;
        tokio::spawn(async move {
            let mut pending = FuturesOrdered::new();
            let mut queued: Vec<Bytes> = first.payloads;
            let mut input_done = false;
            let fail = |e: Error| {
                if fatal(&e) {
                    inner.drop_writer(&name);
                }
                st(e)
            };
            loop {
                // Hand queued payloads to the writer while there is room.
                while !queued.is_empty() && pending.len() < APPEND_IN_FLIGHT_MAX {
                    let p = queued.remove(0);
                    match tokio::time::timeout(timeout, writer.append_async(p)).await {
                        Ok(Ok(f)) => pending.push_back(tokio::time::timeout(timeout, f)),
                        Ok(Err(e)) => {
                            let _ = tx.send(Err(fail(e))).await;
                            return;
                        }
                        Err(_) => {
                            let _ = tx
                                .send(Err(st(Error::Timeout("waiting for room to append".into()))))
                                .await;
                            return;
                        }
                    }
                }
                if input_done && pending.is_empty() && queued.is_empty() {
                    return;
                }
                tokio::select! {
                    biased;
                    Some(r) = pending.next(), if !pending.is_empty() => {
                        let mut offsets = Vec::new();
                        let mut next = Some(r);
                        // Batch the acknowledgements that are already in.
                        while let Some(r) = next.take() {
                            match r {
                                Ok(Ok(o)) => offsets.push(o),
                                Ok(Err(e)) => {
                                    if !offsets.is_empty() {
                                        let _ = tx.send(Ok(pb::AppendResponse { offsets })).await;
                                    }
                                    let _ = tx.send(Err(fail(e))).await;
                                    return;
                                }
                                Err(_) => {
                                    let _ = tx.send(Err(st(Error::Ambiguous(
                                        "a record was not acknowledged in time".into())))).await;
                                    inner.drop_writer(&name);
                                    return;
                                }
                            }
                            if offsets.len() < 4096 {
                                next = futures::FutureExt::now_or_never(pending.next()).flatten();
                            }
                        }
                        if tx.send(Ok(pb::AppendResponse { offsets })).await.is_err() {
                            return;
                        }
                    }
                    m = requests.message(), if !input_done && queued.is_empty() => match m {
                        Ok(Some(r)) => queued = r.payloads,
                        Ok(None) => input_done = true,
                        Err(e) => {
                            tracing::debug!(error = %e, "append stream broke");
                            return;
                        }
                    },
                    _ = tx.closed() => return,
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type ReadStream = BoxStream<pb::ReadResponse>;

    async fn read(&self, req: Request<pb::ReadRequest>) -> Resp<Self::ReadStream> {
        let inner = self.0.inner.clone();
        let req = req.into_inner();
        let name = name_of(req.name.as_ref()).map_err(st)?;
        let mut reader = inner
            .bounded("opening a reader", inner.streams.reader(&name))
            .await
            .map_err(st)?;
        let end = inner
            .bounded("reading the end", reader.end_offset())
            .await
            .map_err(st)?;
        let stop = if req.max_records == 0 {
            end
        } else {
            end.min(req.from_offset.saturating_add(req.max_records))
        };
        // An offset past the end is an error at once; below the start too (the first read says).
        if req.from_offset > end {
            return Err(st(Error::OutOfRange {
                stream: name.to_string(),
                offset: req.from_offset,
                end,
            }));
        }
        let first = if req.from_offset < stop {
            let n = READ_BATCH.min((stop - req.from_offset) as usize);
            inner
                .bounded("read", reader.read(req.from_offset, n, READ_BATCH_BYTES))
                .await
                .map_err(st)?
        } else {
            vec![]
        };
        let (tx, rx) = mpsc::channel(RESPONSES_MAX);
        tokio::spawn(async move {
            let mut batch = first;
            loop {
                let Some(last) = batch.last().map(|r| r.offset) else {
                    return;
                };
                if tx.send(Ok(records_to(batch))).await.is_err() {
                    return;
                }
                let next = last + 1;
                if next >= stop {
                    return;
                }
                let n = READ_BATCH.min((stop - next) as usize);
                batch = match inner
                    .bounded("read", reader.read(next, n, READ_BATCH_BYTES))
                    .await
                {
                    Ok(b) => b,
                    Err(e) => {
                        let _ = tx.send(Err(st(e))).await;
                        return;
                    }
                };
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    type TailStream = BoxStream<pb::ReadResponse>;

    async fn tail(&self, req: Request<pb::TailRequest>) -> Resp<Self::TailStream> {
        let inner = self.0.inner.clone();
        let req = req.into_inner();
        let name = name_of(req.name.as_ref()).map_err(st)?;
        let mut reader = inner
            .bounded("opening a reader", inner.streams.reader(&name))
            .await
            .map_err(st)?;
        let (tx, rx) = mpsc::channel(RESPONSES_MAX);
        tokio::spawn(async move {
            let mut next = req.from_offset;
            loop {
                if inner.stopping.load(std::sync::atomic::Ordering::Acquire) {
                    let _ = tx
                        .send(Err(st(Error::Unavailable("the server is stopping".into()))))
                        .await;
                    return;
                }
                let r = tokio::select! {
                    r = reader.read_wait(next, READ_BATCH, READ_BATCH_BYTES, TAIL_POLL) => r,
                    _ = tx.closed() => return,
                };
                match r {
                    Ok(batch) if batch.is_empty() => {}
                    Ok(batch) => {
                        next = batch.last().map_or(next, |r| r.offset + 1);
                        if tx.send(Ok(records_to(batch))).await.is_err() {
                            return;
                        }
                    }
                    Err(e) => {
                        let _ = tx.send(Err(st(e))).await;
                        return;
                    }
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn truncate(&self, req: Request<pb::TruncateRequest>) -> Resp<pb::TruncateResponse> {
        let s = &self.0.inner;
        let req = req.into_inner();
        let name = name_of(req.name.as_ref()).map_err(st)?;
        let start = s
            .bounded("truncate", s.streams.truncate(&name, req.before_offset))
            .await
            .map_err(st)?;
        Ok(Response::new(pb::TruncateResponse {
            start_offset: start,
        }))
    }

    async fn delete(&self, req: Request<pb::DeleteRequest>) -> Resp<pb::DeleteResponse> {
        let s = &self.0.inner;
        let name = name_of(req.get_ref().name.as_ref()).map_err(st)?;
        s.drop_writer(&name);
        s.bounded("delete", s.streams.delete(&name))
            .await
            .map_err(st)?;
        Ok(Response::new(pb::DeleteResponse {}))
    }

    async fn info(&self, req: Request<pb::InfoRequest>) -> Resp<pb::StreamInfo> {
        let s = &self.0.inner;
        let name = name_of(req.get_ref().name.as_ref()).map_err(st)?;
        let info = s.bounded("info", s.streams.info(&name)).await.map_err(st)?;
        Ok(Response::new(info_to(info)))
    }

    async fn list(&self, req: Request<pb::ListRequest>) -> Resp<pb::ListResponse> {
        let s = &self.0.inner;
        let ns = &req.get_ref().namespace;
        // Checks the namespace as a user name part (internal ones are refused).
        user_name(ns, "x").map_err(st)?;
        let names = s.bounded("list", s.streams.list(ns)).await.map_err(st)?;
        Ok(Response::new(pb::ListResponse {
            names: names.iter().map(pb_name).collect(),
        }))
    }
}
