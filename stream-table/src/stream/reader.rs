//! The stream reader: confirmed records by offset, and long polls that follow rollovers.
//!
//! A reader keeps the stream's metadata as last read and re-reads it only when it must: at the
//! end of what it knows (the open segment may have been sealed and a new one added), past it, or
//! when a segment's ledger is gone (truncated). A sealed segment is read up to its count, the
//! open one up to its LAC. Ledger readers of the last two segments used are kept open.
//!
//! A long poll waits on two things at once: the open segment's LAC (new records) and a watch on
//! the stream's key (a roll, which seals the segment without moving its LAC on the bookies).

use std::collections::VecDeque;
use std::time::Duration;

use quire_ledger_client::{Client, LedgerError, LedgerReader};
use quire_metadata::{DynStore, Watch, WatchEvent, WatchTarget};
use tokio::time::Instant;

use super::Streams;
use super::meta::{self, Record, Segment, StreamMeta};
use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;

/// Ledger readers kept open.
const READERS_CACHED: usize = 2;
/// Entries asked for by the first ledger read of a call (then sized by the bytes seen).
const FIRST_BATCH: u64 = 16;
/// Entries asked for by one ledger read at most.
const BATCH_MAX: u64 = 1000;
/// Longest single LAC long poll within a wait.
const POLL_MAX: Duration = Duration::from_secs(10);
/// First pause after a long poll that came back at once without news (bookies that do not know
/// a new ledger yet answer at once); it doubles up to `IDLE_PAUSE_MAX` while that goes on.
const IDLE_PAUSE: Duration = Duration::from_millis(100);
const IDLE_PAUSE_MAX: Duration = Duration::from_secs(1);
/// Between metadata checks of a long poll without a watch.
const NO_WATCH_POLL: Duration = Duration::from_secs(1);

/// Where an offset falls.
enum Pos {
    Truncated,
    /// In `segment`, whose confirmed records end before `end`.
    In {
        segment: Segment,
        reader: LedgerReader,
        end: u64,
    },
    /// At the end; with the open segment's reader and LAC when there is one.
    AtEnd(Option<(LedgerReader, i64)>),
    Past(u64),
}

/// How a LAC long poll ended.
enum Poll {
    Progress,
    /// At once, without news.
    Quick,
    TimedOut,
}

enum Outcome {
    Records(Vec<Record>),
    AtEnd(Option<(LedgerReader, i64)>),
}

/// Reads one stream. Not shared: one per consumer.
pub struct StreamReader {
    name: Name,
    store: DynStore,
    client: Client,
    meta: StreamMeta,
    readers: VecDeque<(u64, LedgerReader)>,
    watch: Option<Watch>,
}

impl StreamReader {
    pub(super) async fn open(streams: &Streams, name: &Name) -> Result<StreamReader> {
        let (meta, _) = meta::load(&streams.store, name).await?;
        Ok(StreamReader {
            name: name.clone(),
            store: streams.store.clone(),
            client: streams.client.clone(),
            meta,
            readers: VecDeque::new(),
            watch: None,
        })
    }

    pub async fn read(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
    ) -> Result<Vec<Record>> {
        match self.read_some(from, max_records, max_bytes, true).await? {
            Outcome::Records(r) => Ok(r),
            Outcome::AtEnd(_) => Ok(Vec::new()),
        }
    }

    pub async fn read_wait(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
        wait: Duration,
    ) -> Result<Vec<Record>> {
        let deadline = Instant::now() + wait;
        // Whether the metadata must be read again before deciding that `from` is the end.
        let mut stale = true;
        let mut pause = IDLE_PAUSE;
        loop {
            if self.watch.is_none() {
                // Watch first, then read: a roll after this read is seen.
                match self
                    .store
                    .watch(WatchTarget::Key(layout::stream_key(&self.name)))
                    .await
                {
                    Ok(w) => {
                        self.watch = Some(w);
                        stale = true;
                    }
                    Err(e) => tracing::debug!(stream = %self.name, error = %e,
                        "no watch on the stream; polling its metadata"),
                }
            }
            let open = match self.read_some(from, max_records, max_bytes, stale).await? {
                Outcome::Records(r) => return Ok(r),
                Outcome::AtEnd(open) => open,
            };
            stale = false;
            let now = Instant::now();
            if now >= deadline {
                return Ok(Vec::new());
            }
            let remaining = deadline - now;
            let lac_poll = async {
                match &open {
                    Some((r, lac)) => {
                        let asked = Instant::now();
                        let l = match r.wait_lac(*lac, remaining.min(POLL_MAX)).await {
                            Ok(l) => l,
                            // An empty open segment replaced by a new writer's: look again.
                            Err(LedgerError::NoSuchLedger(_)) => return Ok(Poll::TimedOut),
                            Err(e) => return Err(e),
                        };
                        if l > *lac {
                            return Ok(Poll::Progress);
                        }
                        if asked.elapsed() < IDLE_PAUSE {
                            // Bookies that do not know the segment's ledger yet (nothing
                            // written to it) answer at once: back off instead of spinning.
                            tokio::time::sleep(pause.min(remaining)).await;
                            return Ok(Poll::Quick);
                        }
                        Ok(Poll::TimedOut)
                    }
                    None => std::future::pending::<Result<Poll, LedgerError>>().await,
                }
            };
            let meta_news = async {
                match self.watch.as_mut() {
                    // Any event (a roll, a truncation) or the end of the watch: look again.
                    Some(w) => match w.next().await {
                        Some(WatchEvent::Put(_) | WatchEvent::Delete { .. }) => true,
                        Some(WatchEvent::Resync) | None => false,
                    },
                    None => {
                        tokio::time::sleep(NO_WATCH_POLL.min(remaining)).await;
                        true
                    }
                }
            };
            tokio::select! {
                r = lac_poll => match r.map_err(Error::from)? {
                    Poll::Progress => pause = IDLE_PAUSE,
                    Poll::Quick => pause = (pause * 2).min(IDLE_PAUSE_MAX),
                    // A safety net: a long poll without news looks at the metadata again.
                    Poll::TimedOut => stale = true,
                },
                keep = meta_news => {
                    stale = true;
                    if !keep {
                        self.watch = None;
                    }
                }
                _ = tokio::time::sleep(remaining) => return Ok(Vec::new()),
            }
        }
    }

    pub async fn end_offset(&mut self) -> Result<u64> {
        self.reload().await?;
        match self.meta.segments.last().cloned() {
            Some(s) if s.count.is_none() => {
                let r = self.segment_reader(&s).await?;
                let lac = r.read_lac().await?;
                Ok(s.start_offset + (lac + 1) as u64)
            }
            _ => Ok(self.sealed_end()),
        }
    }

    pub fn start_offset(&self) -> u64 {
        self.meta.start_offset
    }

    fn sealed_end(&self) -> u64 {
        self.meta.sealed_end().unwrap_or(self.meta.start_offset)
    }

    fn truncated(&self, offset: u64) -> Error {
        Error::Truncated {
            stream: self.name.to_string(),
            offset,
            start: self.meta.start_offset,
        }
    }

    async fn reload(&mut self) -> Result<()> {
        let (m, _) = meta::load(&self.store, &self.name).await?;
        self.meta = m;
        Ok(())
    }

    /// Confirmed records from `from` (at least one when any is there), or where the end is.
    async fn read_some(
        &mut self,
        from: u64,
        max_records: usize,
        max_bytes: usize,
        reload_at_end: bool,
    ) -> Result<Outcome> {
        let max_records = max_records.max(1) as u64;
        let mut out: Vec<Record> = Vec::new();
        let mut bytes = 0usize;
        let mut next = from;
        let mut reloaded = false;
        loop {
            let pos = match self.locate(next).await {
                Err(Error::Ledger(LedgerError::NoSuchLedger(_))) if !reloaded => {
                    // Truncated (or deleted) under us.
                    self.reload().await?;
                    reloaded = true;
                    continue;
                }
                r => r?,
            };
            match pos {
                Pos::In {
                    segment,
                    reader,
                    end,
                } => {
                    let left = max_records - out.len() as u64;
                    let batch = if out.is_empty() {
                        FIRST_BATCH
                    } else {
                        let avg = (bytes / out.len()).max(1);
                        (max_bytes.saturating_sub(bytes) / avg) as u64
                    };
                    let n = batch.clamp(1, BATCH_MAX).min(left).min(end - next);
                    let first = next - segment.start_offset;
                    let entries = match reader.read(first, first + n - 1).await {
                        Ok(es) => es,
                        Err(LedgerError::NoSuchLedger(_)) if out.is_empty() && !reloaded => {
                            self.reload().await?;
                            reloaded = true;
                            continue;
                        }
                        Err(e) => return Err(e.into()),
                    };
                    for e in entries {
                        bytes += e.payload.len();
                        out.push(Record {
                            offset: segment.start_offset + e.entry_id,
                            payload: e.payload,
                        });
                        next += 1;
                        if out.len() as u64 >= max_records || bytes >= max_bytes {
                            return Ok(Outcome::Records(out));
                        }
                    }
                }
                _ if !out.is_empty() => return Ok(Outcome::Records(out)),
                Pos::Truncated if !reloaded => {
                    self.reload().await?;
                    reloaded = true;
                }
                Pos::Truncated => return Err(self.truncated(from)),
                // The open segment may have been sealed and a new one added.
                Pos::AtEnd(_) if !reloaded && reload_at_end => {
                    self.reload().await?;
                    reloaded = true;
                }
                Pos::Past(_) if !reloaded => {
                    self.reload().await?;
                    reloaded = true;
                }
                Pos::AtEnd(open) => return Ok(Outcome::AtEnd(open)),
                Pos::Past(end) => {
                    return Err(Error::OutOfRange {
                        stream: self.name.to_string(),
                        offset: from,
                        end,
                    });
                }
            }
        }
    }

    async fn locate(&mut self, offset: u64) -> Result<Pos> {
        if offset < self.meta.start_offset {
            return Ok(Pos::Truncated);
        }
        let found = self
            .meta
            .segments
            .iter()
            .rev()
            .find(|s| s.start_offset <= offset)
            .cloned();
        let Some(s) = found else {
            return Ok(self.after_sealed(offset));
        };
        match s.end_offset() {
            Some(end) if offset < end => {
                let reader = self.segment_reader(&s).await?;
                Ok(Pos::In {
                    segment: s,
                    reader,
                    end,
                })
            }
            Some(_) => Ok(self.after_sealed(offset)),
            None => {
                let reader = self.segment_reader(&s).await?;
                let mut lac = reader.lac();
                if offset >= s.start_offset + (lac + 1) as u64 {
                    lac = reader.read_lac().await?;
                }
                let end = s.start_offset + (lac + 1) as u64;
                Ok(if offset < end {
                    Pos::In {
                        segment: s,
                        reader,
                        end,
                    }
                } else if offset == end {
                    Pos::AtEnd(Some((reader, lac)))
                } else {
                    Pos::Past(end)
                })
            }
        }
    }

    fn after_sealed(&self, offset: u64) -> Pos {
        let end = self.sealed_end();
        if offset == end {
            Pos::AtEnd(None)
        } else {
            Pos::Past(end)
        }
    }

    /// A reader of the segment's ledger, from the cache unless the segment was sealed since
    /// (a reader opened on an open ledger does not learn of its close by itself).
    async fn segment_reader(&mut self, s: &Segment) -> Result<LedgerReader> {
        if let Some(i) = self.readers.iter().position(|(l, _)| *l == s.ledger) {
            let r = &self.readers[i].1;
            if s.count.is_none() || r.is_closed() {
                return Ok(r.clone());
            }
            self.readers.remove(i);
        }
        let r = self.client.open(s.ledger, &[]).await?;
        if self.readers.len() >= READERS_CACHED {
            self.readers.pop_front();
        }
        self.readers.push_back((s.ledger, r.clone()));
        Ok(r)
    }
}
