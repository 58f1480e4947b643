//! Reading a ledger: entries up to the LAC (or past it, explicitly), the LAC itself, long polls
//! and tailing.
//!
//! A read goes to the first bookie of the entry's write set; a failed, missing or corrupt answer
//! (digest checked here, end to end) moves on to the next replica at once, and a replica silent
//! for `speculative_read` gets company from the next one. The first good copy wins. Ranges of a
//! fragment whose every replica holds every entry (E = Qw) are read as runs, many entries per
//! call; whatever a run cannot serve falls back to the entry-by-entry path.

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use parking_lot::RwLock;
use quire_metadata::ledgers::{LedgerMetadata, LedgerState};
use quire_proto::entry;

use crate::client::Shared;
use crate::error::{LedgerError, Result};

/// Entries one read call may return at most.
pub const READ_BATCH_MAX: u64 = 10_000;
/// Entries read at once by a range read that goes entry by entry.
const READ_PARALLELISM: usize = 16;
/// Entries one run read (bookie `ReadEntries`) asks for.
const RUN_ENTRIES_MAX: u64 = 1000;
/// Bytes one run read asks for at most (the bookie may return one entry past it).
const RUN_BYTES_MAX: u64 = 4 << 20;
/// Longest long poll (bookies cap it at 60 s too).
const LONG_POLL_MAX: Duration = Duration::from_secs(60);
/// Long-poll length of a tail between metadata checks.
const TAIL_POLL: Duration = Duration::from_secs(2);
/// Pause of a tail whose long poll came back at once without progress.
const TAIL_IDLE: Duration = Duration::from_millis(100);
/// Entries a tail reads per step.
const TAIL_BATCH: u64 = 256;

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    pub entry_id: u64,
    pub payload: Bytes,
}

struct Inner {
    shared: Arc<Shared>,
    id: u64,
    meta: RwLock<LedgerMetadata>,
    lac: AtomicI64,
}

/// A ledger open for reading. Cheap to clone.
#[derive(Clone)]
pub struct LedgerReader {
    inner: Arc<Inner>,
}

impl LedgerReader {
    pub(crate) fn new(shared: Arc<Shared>, id: u64, meta: LedgerMetadata) -> Self {
        let lac = if meta.state == LedgerState::Closed {
            meta.last_entry_id
        } else {
            -1
        };
        LedgerReader {
            inner: Arc::new(Inner {
                shared,
                id,
                meta: RwLock::new(meta),
                lac: AtomicI64::new(lac),
            }),
        }
    }

    pub fn id(&self) -> u64 {
        self.inner.id
    }

    /// The metadata as last seen.
    pub fn metadata(&self) -> LedgerMetadata {
        self.inner.meta.read().clone()
    }

    /// The last known LAC; for a closed ledger its last entry id.
    pub fn lac(&self) -> i64 {
        self.inner.lac.load(Ordering::Acquire)
    }

    pub fn is_closed(&self) -> bool {
        self.inner.meta.read().state == LedgerState::Closed
    }

    fn raise_lac(&self, lac: i64) -> i64 {
        self.inner.lac.fetch_max(lac, Ordering::AcqRel).max(lac)
    }

    /// Re-reads the metadata (ensemble changes, close).
    async fn refresh(&self) -> Result<()> {
        let v = self.inner.shared.read_metadata(self.inner.id).await?;
        if v.value.state == LedgerState::Closed {
            self.raise_lac(v.value.last_entry_id);
        }
        *self.inner.meta.write() = v.value;
        Ok(())
    }

    fn check_range(&self, first: u64, last: u64) -> Result<()> {
        if first > last {
            return Err(LedgerError::InvalidArgument(format!(
                "first entry {first} is after last entry {last}"
            )));
        }
        if last - first >= READ_BATCH_MAX {
            return Err(LedgerError::InvalidArgument(format!(
                "at most {READ_BATCH_MAX} entries per read"
            )));
        }
        Ok(())
    }

    /// Entries `first..=last`, all confirmed (at or below the LAC).
    pub async fn read(&self, first: u64, last: u64) -> Result<Vec<Entry>> {
        self.check_range(first, last)?;
        if last as i64 > self.lac() && !self.is_closed() {
            // The LAC may have moved since we last looked.
            self.read_lac().await?;
        }
        let lac = self.lac();
        if last as i64 > lac {
            return Err(LedgerError::BeyondLac {
                ledger: self.inner.id,
                entry: last,
                lac,
            });
        }
        self.read_range(first, last).await
    }

    /// Entries `first..=last`, which may lie past the LAC (their writer may not have seen them
    /// acknowledged, and a recovery may still drop them).
    pub async fn read_unconfirmed(&self, first: u64, last: u64) -> Result<Vec<Entry>> {
        self.check_range(first, last)?;
        if self.is_closed() && last as i64 > self.lac() {
            return Err(LedgerError::NoSuchEntry(self.inner.id, last as i64));
        }
        self.read_range(first, last).await
    }

    async fn read_range(&self, first: u64, last: u64) -> Result<Vec<Entry>> {
        let mut out = Vec::new();
        let mut next = first;
        // Replicas that failed a run read: not asked again by this call.
        let mut skip: Vec<String> = Vec::new();
        while next <= last {
            // With E = Qw every replica of a fragment holds all of its entries, so one call
            // returns a run of them. Otherwise, or when no replica serves a run, the rest goes
            // entry by entry (speculative reads, metadata refresh, precise errors).
            let Some((replicas, end)) = self.run_replicas(next, last) else {
                break;
            };
            let want = (end - next + 1).min(RUN_ENTRIES_MAX) as u32;
            let mut got = Vec::new();
            for b in replicas {
                if skip.contains(&b) {
                    continue;
                }
                match self.read_run(&b, next, want).await {
                    Some(run) => {
                        got = run;
                        break;
                    }
                    None => skip.push(b),
                }
            }
            if got.is_empty() {
                out.push(self.read_entry(next).await?);
                next += 1;
            } else {
                next += got.len() as u64;
                out.extend(got);
            }
        }
        if next <= last {
            let rest: Vec<Result<Entry>> = futures::stream::iter(next..=last)
                .map(|e| self.read_entry(e))
                .buffered(READ_PARALLELISM)
                .collect()
                .await;
            for e in rest {
                out.push(e?);
            }
        }
        Ok(out)
    }

    /// For a run read from `next`: the replicas in their read order and the last entry of the
    /// run (its fragment's end, at most `last`); `None` when the fragment is striped (E > Qw).
    fn run_replicas(&self, next: u64, last: u64) -> Option<(Vec<String>, u64)> {
        let meta = self.inner.meta.read();
        if meta.ensemble_size != meta.write_quorum {
            return None;
        }
        let end = match meta.ensembles.range(next + 1..).next() {
            Some((start, _)) => (*start - 1).min(last),
            None => last,
        };
        let replicas = meta.write_set(next).into_iter().map(String::from).collect();
        Some((replicas, end))
    }

    /// Up to `want` entries from `next` on from `bookie`, in one call: the prefix that passes
    /// the digest and id checks; `None` when the bookie fails or serves none of them.
    async fn read_run(&self, bookie: &str, next: u64, want: u32) -> Option<Vec<Entry>> {
        let id = self.inner.id;
        let bodies = self
            .inner
            .shared
            .pool
            .read_entries(bookie, id, next, want, RUN_BYTES_MAX)
            .await
            .ok()?;
        let mut run = Vec::with_capacity(bodies.len());
        for (i, body) in bodies.iter().enumerate() {
            let entry_id = next + i as u64;
            match entry::decode(body) {
                Ok((h, payload)) if h.ledger_id == id && h.entry_id == entry_id => {
                    run.push(Entry { entry_id, payload })
                }
                _ => break,
            }
        }
        (!run.is_empty()).then_some(run)
    }

    fn replicas(&self, entry_id: u64) -> Vec<String> {
        let meta = self.inner.meta.read();
        meta.write_set(entry_id)
            .into_iter()
            .map(String::from)
            .collect()
    }

    /// One entry; when no replica has it, looks at the metadata again and, if the writer has
    /// moved the entry to other bookies since (an ensemble change), reads it there.
    async fn read_entry(&self, entry_id: u64) -> Result<Entry> {
        let replicas = self.replicas(entry_id);
        match self.read_from(entry_id, &replicas).await {
            Err(e @ (LedgerError::NoSuchEntry(..) | LedgerError::Unreadable(..))) => {
                self.refresh().await?;
                let now = self.replicas(entry_id);
                if now == replicas {
                    return Err(e);
                }
                self.read_from(entry_id, &now).await
            }
            r => r,
        }
    }

    /// One entry from `replicas` (its write set): in order, the next on failure or after the
    /// speculative delay; digest verified.
    async fn read_from(&self, entry_id: u64, replicas: &[String]) -> Result<Entry> {
        let id = self.inner.id;
        let pool = &self.inner.shared.pool;
        let spec = self.inner.shared.cfg.speculative_read;
        let mut next = 0usize;
        let mut running = FuturesUnordered::new();
        let mut missing = 0usize;
        let mut errors: Vec<String> = Vec::new();
        let ask = |b: String| async move {
            let r = pool.read(&b, id, entry_id, None).await;
            (b, r)
        };
        running.push(ask(replicas[0].clone()));
        next += 1;
        loop {
            let answer = match spec.filter(|_| next < replicas.len()) {
                Some(d) => match tokio::time::timeout(d, running.next()).await {
                    Ok(a) => a,
                    Err(_) => {
                        running.push(ask(replicas[next].clone()));
                        next += 1;
                        continue;
                    }
                },
                None => running.next().await,
            };
            let Some((bookie, r)) = answer else {
                break;
            };
            match r {
                Ok(resp) => match entry::decode(&resp.body) {
                    Ok((h, payload)) if h.ledger_id == id && h.entry_id == entry_id => {
                        return Ok(Entry { entry_id, payload });
                    }
                    Ok((h, _)) => errors.push(format!(
                        "{bookie}: returned entry {}/{} instead",
                        h.ledger_id, h.entry_id
                    )),
                    Err(e) => {
                        tracing::warn!(ledger_id = id, entry_id, %bookie, error = %e,
                            "corrupt entry copy; reading another replica");
                        errors.push(format!("{bookie}: {e}"));
                    }
                },
                Err(e) if e.is_missing() => {
                    missing += 1;
                    errors.push(format!("{bookie}: {e}"));
                }
                Err(e) => errors.push(format!("{bookie}: {e}")),
            }
            if next < replicas.len() {
                running.push(ask(replicas[next].clone()));
                next += 1;
            } else if running.is_empty() {
                break;
            }
        }
        if missing == replicas.len() {
            return Err(LedgerError::NoSuchEntry(id, entry_id as i64));
        }
        Err(LedgerError::Unreadable(id, entry_id, errors.join("; ")))
    }

    /// Asks the bookies of the last ensemble for the LAC (the highest any of them knows; every
    /// value a bookie reports was confirmed by the writer). A closed ledger's is its last entry.
    pub async fn read_lac(&self) -> Result<i64> {
        self.poll_lac(-1, None).await
    }

    /// Waits until the LAC passes `previous` (or `timeout`, at most 60 s, elapses); returns the
    /// LAC then.
    pub async fn wait_lac(&self, previous: i64, timeout: Duration) -> Result<i64> {
        self.poll_lac(previous, Some(timeout.min(LONG_POLL_MAX)))
            .await
    }

    fn last_ensemble(&self) -> Vec<String> {
        self.inner
            .meta
            .read()
            .ensembles
            .values()
            .next_back()
            .cloned()
            .unwrap_or_default()
    }

    async fn poll_lac(&self, previous: i64, wait: Option<Duration>) -> Result<i64> {
        let bookies = self.last_ensemble();
        match self.poll_lac_on(&bookies, previous, wait).await {
            // Nobody answered: the ensemble may have changed, or the ledger closed, under us.
            Err(e) => {
                self.refresh().await?;
                if self.is_closed() {
                    return Ok(self.lac());
                }
                let now = self.last_ensemble();
                if now == bookies {
                    return Err(e);
                }
                self.poll_lac_on(&now, previous, wait).await
            }
            r => r,
        }
    }

    async fn poll_lac_on(
        &self,
        bookies: &[String],
        previous: i64,
        wait: Option<Duration>,
    ) -> Result<i64> {
        if self.is_closed() || self.lac() > previous && wait.is_some() {
            return Ok(self.lac());
        }
        let id = self.inner.id;
        let pool = &self.inner.shared.pool;
        let mut calls: FuturesUnordered<_> = bookies
            .iter()
            .map(|b| async move { (b, pool.read_lac(b, id, previous, wait).await) })
            .collect();
        let mut answered = 0usize;
        let mut errors = Vec::new();
        while let Some((b, r)) = calls.next().await {
            match r {
                Ok(resp) => {
                    answered += 1;
                    let lac = self.raise_lac(resp.lac);
                    if wait.is_some() && lac > previous {
                        return Ok(lac);
                    }
                }
                // A bookie that has not seen the ledger yet knows no LAC: a valid answer.
                Err(e) if e.is_missing() => answered += 1,
                Err(e) => errors.push(format!("{b}: {e}")),
            }
        }
        if answered == 0 {
            return Err(LedgerError::Unreadable(
                id,
                (previous + 1) as u64,
                format!("no bookie answered the LAC read: {}", errors.join("; ")),
            ));
        }
        Ok(self.lac())
    }

    /// Entries from `from` on, as they are confirmed. The stream ends after the last entry of a
    /// closed ledger, or with the first error.
    pub fn tail(&self, from: u64) -> impl futures::Stream<Item = Result<Entry>> + Send + 'static {
        let reader = self.clone();
        futures::stream::unfold(
            (
                reader,
                from,
                std::collections::VecDeque::<Entry>::new(),
                false,
            ),
            |(r, next, mut buf, done)| async move {
                if done {
                    return None;
                }
                let mut next = next;
                loop {
                    if let Some(e) = buf.pop_front() {
                        return Some((Ok(e), (r, next, buf, false)));
                    }
                    let lac = r.lac();
                    if (next as i64) <= lac {
                        let last = (lac as u64).min(next + TAIL_BATCH - 1);
                        match r.read_range(next, last).await {
                            Ok(es) => {
                                next = last + 1;
                                buf.extend(es);
                                continue;
                            }
                            Err(e) => return Some((Err(e), (r, next, buf, true))),
                        }
                    }
                    if r.is_closed() {
                        return None;
                    }
                    let asked = std::time::Instant::now();
                    match r.wait_lac(lac, TAIL_POLL).await {
                        Ok(l) if l > lac => continue,
                        Ok(_) => {
                            // Bookies that do not know the ledger yet answer at once: do not
                            // spin on them.
                            if asked.elapsed() < TAIL_IDLE {
                                tokio::time::sleep(TAIL_IDLE).await;
                            }
                            // No progress: the writer may have closed the ledger or changed
                            // ensembles; look at the metadata again.
                            if let Err(e) = r.refresh().await {
                                return Some((Err(e), (r, next, buf, true)));
                            }
                        }
                        Err(e) => return Some((Err(e), (r, next, buf, true))),
                    }
                }
            },
        )
    }
}
