//! The stream's records in the metadata store and the pure rules that change them.
//!
//! `StreamMeta` lives at [`layout::stream_key`] (magic `quire-stream`, version 1) and changes only
//! by compare-and-set. Every change is a function of the current value ([`seal_and_add`],
//! [`seal`], [`truncate_plan`]) that either applies the change, finds it already applied (so a
//! CAS whose outcome was unknown can be re-checked against a fresh read), or refuses it because
//! the stream moved on under the caller (another writer took over: [`Error::Fenced`]).
//!
//! Invariants of the segment list: segments are in `seq` order with `seq` +1 each; each starts
//! where the previous ends (`start_offset + count`); only the last may be open (`count: None`);
//! `start_offset` of the stream is the first segment's (or, with no segment yet, 0). The last
//! segment is never truncated away, so the next `seq` and the end offset are always known.

use std::time::Duration;

use quire_metadata::layout::{decode, encode};
use quire_metadata::{DynStore, KeyValue, MetaError};
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::layout;
use crate::names::Name;

pub(crate) const META_MAGIC: &str = "quire-stream";
pub(crate) const META_VERSION: u32 = 1;
pub(crate) const WRITER_MAGIC: &str = "quire-stream-writer";
pub(crate) const WRITER_VERSION: u32 = 1;

/// Largest ensemble a segment ledger may have (the ledger client's limit).
const ENSEMBLE_MAX: u32 = 64;
/// Compare-and-set attempts that lose to a concurrent change before giving up.
const CAS_CONFLICTS_MAX: u32 = 32;
/// How long transient metadata errors are retried.
const META_RETRY_MAX: Duration = Duration::from_secs(30);
const META_RETRY_PAUSE: Duration = Duration::from_millis(200);

/// Durations travel as milliseconds.
mod ms {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis().min(u64::MAX as u128) as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// How a stream's segments are rolled and replicated.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct StreamConfig {
    /// A segment is rolled before it would pass this many payload bytes. Default: 1 GiB.
    pub segment_max_bytes: u64,
    /// A segment is rolled at this many records. Default: 50 000 (Pulsar's
    /// `managedLedgerMaxEntriesPerLedger`).
    pub segment_max_entries: u64,
    /// A segment older than this is rolled at the next append. Default: 4 h.
    #[serde(rename = "segment_max_age_ms", with = "ms")]
    pub segment_max_age: Duration,
    /// Bookies per segment ledger. Default: 3.
    pub ensemble: u32,
    /// Copies of each record. Default: 3.
    pub write_quorum: u32,
    /// Copies acknowledged before a record is. Default: 2.
    pub ack_quorum: u32,
}

impl Default for StreamConfig {
    fn default() -> Self {
        StreamConfig {
            segment_max_bytes: 1 << 30,
            segment_max_entries: 50_000,
            segment_max_age: Duration::from_secs(4 * 3600),
            ensemble: 3,
            write_quorum: 3,
            ack_quorum: 2,
        }
    }
}

impl StreamConfig {
    /// The settings of a table range's changelog: segments small enough that truncation after a
    /// checkpoint frees space soon (64 MiB or 10 minutes), but a roll (which pauses the range's
    /// appends while the old segment is closed and sealed) rarely: at most once per 100 000
    /// updates, the default checkpoint spacing.
    pub fn changelog() -> Self {
        StreamConfig {
            segment_max_bytes: 64 << 20,
            segment_max_entries: 100_000,
            segment_max_age: Duration::from_secs(600),
            ..Default::default()
        }
    }

    pub fn check(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.segment_max_bytes == 0 {
            return bad("segment_max_bytes must be above 0".into());
        }
        if self.segment_max_entries == 0 {
            return bad("segment_max_entries must be above 0".into());
        }
        if self.segment_max_age.is_zero() {
            return bad("segment_max_age must be above 0".into());
        }
        let (e, qw, qa) = (self.ensemble, self.write_quorum, self.ack_quorum);
        if !(e >= qw && qw >= qa && qa >= 1) || e > ENSEMBLE_MAX {
            return bad(format!(
                "need {ENSEMBLE_MAX} >= ensemble >= write_quorum >= ack_quorum >= 1, got {e}/{qw}/{qa}"
            ));
        }
        Ok(())
    }
}

/// One ledger of a stream.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// 0 for the stream's first segment, +1 for each next one.
    pub seq: u64,
    pub ledger: u64,
    /// Offset of the segment's entry 0.
    pub start_offset: u64,
    /// Records in the segment once sealed; `None` while open (only the last segment).
    pub count: Option<u64>,
}

impl Segment {
    /// First offset after the segment, once sealed.
    pub fn end_offset(&self) -> Option<u64> {
        self.count.map(|c| self.start_offset + c)
    }
}

/// A stream's record in the metadata store.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamMeta {
    pub config: StreamConfig,
    pub segments: Vec<Segment>,
    /// First retained offset.
    pub start_offset: u64,
    /// Creation time, milliseconds since the Unix epoch.
    pub created_ms: u64,
    /// Bumped by each writer as it opens (after taking the lease). A writer changes the segment
    /// list only while the epoch is still its own, so once a new writer has claimed the stream
    /// its predecessor can no longer roll under it, even before it learns its lease is gone.
    #[serde(default)]
    pub writer_epoch: u64,
}

impl StreamMeta {
    /// The end of the sealed segments: where a segment added now starts. `None` when the last
    /// segment is open.
    pub fn sealed_end(&self) -> Option<u64> {
        match self.segments.last() {
            None => Some(self.start_offset),
            Some(s) => s.end_offset(),
        }
    }

    /// The `seq` of the next segment.
    pub fn next_seq(&self) -> u64 {
        self.segments.last().map_or(0, |s| s.seq + 1)
    }

    pub(crate) fn encode(&self) -> bytes::Bytes {
        encode(META_MAGIC, META_VERSION, self)
    }
}

/// The writer lease's value: who writes the stream and where it serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WriterInfo {
    pub id: String,
    pub addr: String,
}

/// What a caller sees of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StreamInfo {
    pub name: Name,
    pub config: StreamConfig,
    pub start_offset: u64,
    /// Next offset after the last confirmed record, as known from the metadata and the open
    /// segment's LAC.
    pub end_offset: u64,
    pub segments: Vec<Segment>,
    pub writer: Option<WriterInfo>,
    pub created_ms: u64,
}

/// One record of a stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    pub offset: u64,
    pub payload: bytes::Bytes,
}

/// Which segment a writer found last before it added its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Last {
    /// No segment yet.
    None,
    /// Segment `ledger` is last; it is open and holds `count` records (its writer is fenced and
    /// the ledger closed), or already sealed with that count.
    Segment { ledger: u64, count: u64 },
}

pub(crate) fn fenced(name: &Name, why: &str) -> Error {
    Error::Fenced(format!("stream {name}: {why}"))
}

/// Seals the last segment (`last`) and adds segment `seq` on `ledger` after it. `Ok(true)`: `meta`
/// changed and must be written; `Ok(false)`: already done. Refuses with `Fenced` when the
/// segment list is not the one the caller saw (another writer got there).
///
/// A last segment that holds no record is *replaced* when `seq` is its own: the new segment
/// takes its `seq` and start instead of following it, so that writers that open and fail again
/// and again do not grow the list. The caller deletes the replaced ledger.
pub(crate) fn seal_and_add(
    name: &Name,
    meta: &mut StreamMeta,
    epoch: u64,
    last: Last,
    seq: u64,
    ledger: u64,
) -> Result<bool> {
    if meta.segments.last().is_some_and(|s| s.ledger == ledger) {
        return Ok(false);
    }
    check_epoch(name, meta, epoch)?;
    match (last, meta.segments.last_mut()) {
        (Last::None, None) => {}
        (Last::Segment { ledger: l, count }, Some(s)) if s.ledger == l => match s.count {
            None => s.count = Some(count),
            Some(c) if c == count => {}
            Some(c) => {
                return Err(Error::Internal(format!(
                    "stream {name}: segment {} (ledger {l}) sealed with {c} records, the ledger holds {count}",
                    s.seq
                )));
            }
        },
        _ => return Err(fenced(name, "another writer changed the segment list")),
    }
    if let Some(s) = meta.segments.last_mut()
        && s.count == Some(0)
        && s.seq == seq
    {
        *s = Segment {
            seq,
            ledger,
            start_offset: s.start_offset,
            count: None,
        };
        return Ok(true);
    }
    if meta.next_seq() != seq {
        return Err(fenced(name, "another writer changed the segment list"));
    }
    let start_offset = meta.sealed_end().unwrap_or(meta.start_offset);
    meta.segments.push(Segment {
        seq,
        ledger,
        start_offset,
        count: None,
    });
    Ok(true)
}

fn check_epoch(name: &Name, meta: &StreamMeta, epoch: u64) -> Result<()> {
    if meta.writer_epoch == epoch {
        Ok(())
    } else {
        Err(fenced(name, "another writer took over"))
    }
}

/// Seals the open last segment on `ledger` with `count` records (a writer closing).
pub(crate) fn seal(
    name: &Name,
    meta: &mut StreamMeta,
    epoch: u64,
    ledger: u64,
    count: u64,
) -> Result<bool> {
    let current = meta.writer_epoch;
    match meta.segments.last_mut() {
        Some(s) if s.ledger == ledger => match s.count {
            None if current != epoch => Err(fenced(name, "another writer took over")),
            None => {
                s.count = Some(count);
                Ok(true)
            }
            Some(c) if c == count => Ok(false),
            Some(_) => Err(fenced(name, "another writer sealed the segment")),
        },
        _ => Err(fenced(name, "another writer changed the segment list")),
    }
}

/// Removes the sealed segments that end at or before `before`, never the last one. Returns the
/// removed segments (empty: nothing to write).
pub(crate) fn truncate_plan(meta: &mut StreamMeta, before: u64) -> Vec<Segment> {
    let keep_from = meta
        .segments
        .iter()
        .position(|s| s.end_offset().is_none_or(|e| e > before))
        .unwrap_or(meta.segments.len())
        .min(meta.segments.len().saturating_sub(1));
    let removed: Vec<Segment> = meta.segments.drain(..keep_from).collect();
    if let Some(first) = meta.segments.first() {
        meta.start_offset = first.start_offset;
    }
    removed
}

/// The stream's metadata and its version.
pub(crate) async fn load(store: &DynStore, name: &Name) -> Result<(StreamMeta, u64)> {
    let key = layout::stream_key(name);
    let kv = retry_transient(|| store.get(&key))
        .await?
        .ok_or_else(|| Error::NoSuchStream(name.to_string()))?;
    Ok((decode_meta(&kv)?, kv.version))
}

pub(crate) fn decode_meta(kv: &KeyValue) -> Result<StreamMeta> {
    let m: StreamMeta = decode(META_MAGIC, META_VERSION, &kv.key, &kv.value)
        .map_err(|e| Error::Corrupt(e.to_string()))?;
    check_shape(&kv.key, &m)?;
    Ok(m)
}

/// Offsets far below `u64::MAX`, so the sums code makes of stored offsets (a segment's start
/// plus an entry id or its count, `seq + 1`) cannot overflow.
const OFFSET_LIMIT: u64 = 1 << 62;

/// The invariants every stored segment list keeps, checked once when it is read so that no
/// later arithmetic on it can overflow or go backwards: segments in `seq` order, each
/// starting where the previous one ended, only the last one open, the start offset within the
/// list.
fn check_shape(key: &str, m: &StreamMeta) -> Result<()> {
    let bad = |why: String| Err(Error::Corrupt(format!("{key}: {why}")));
    let mut expected_start = m
        .segments
        .first()
        .map_or(m.start_offset, |s| s.start_offset);
    if m.start_offset != expected_start {
        return bad(format!(
            "start offset {} is not the first segment's {expected_start}",
            m.start_offset
        ));
    }
    let mut prev_seq: Option<u64> = None;
    for (i, s) in m.segments.iter().enumerate() {
        if s.seq >= OFFSET_LIMIT {
            return bad(format!("segment number {} is past {OFFSET_LIMIT}", s.seq));
        }
        if s.start_offset != expected_start {
            return bad(format!(
                "segment {} starts at {}, expected {expected_start}",
                s.seq, s.start_offset
            ));
        }
        if prev_seq.is_some_and(|p| s.seq <= p) {
            return bad(format!("segment {} follows segment {prev_seq:?}", s.seq));
        }
        prev_seq = Some(s.seq);
        match s.count {
            Some(c) => expected_start = s.start_offset.saturating_add(c),
            None if i + 1 == m.segments.len() => {}
            None => return bad(format!("segment {} is open but not the last", s.seq)),
        }
        if expected_start >= OFFSET_LIMIT {
            return bad(format!("segment {} ends past {OFFSET_LIMIT}", s.seq));
        }
    }
    Ok(())
}

/// Reads the metadata, applies `change` and writes it by CAS, again from a fresh read when
/// another change got in first or the outcome of a write is unknown (`change` then tells
/// whether it is already applied). Returns the metadata as written (or found) and its version.
pub(crate) async fn update<F>(
    store: &DynStore,
    name: &Name,
    mut change: F,
) -> Result<(StreamMeta, u64)>
where
    F: FnMut(&mut StreamMeta) -> Result<bool>,
{
    let key = layout::stream_key(name);
    let deadline = tokio::time::Instant::now() + META_RETRY_MAX;
    let mut conflicts = 0;
    loop {
        let (mut meta, version) = load(store, name).await?;
        if !change(&mut meta)? {
            return Ok((meta, version));
        }
        match store.compare_and_set(&key, meta.encode(), version).await {
            Ok(kv) => return Ok((meta, kv.version)),
            Err(MetaError::BadVersion { .. }) if conflicts < CAS_CONFLICTS_MAX => conflicts += 1,
            Err(MetaError::NotFound(_)) => return Err(Error::NoSuchStream(name.to_string())),
            Err(e @ (MetaError::Unavailable(_) | MetaError::Ambiguous(_)))
                if tokio::time::Instant::now() < deadline =>
            {
                tracing::debug!(stream = %name, error = %e, "stream metadata update retried");
                tokio::time::sleep(META_RETRY_PAUSE).await;
            }
            Err(e) => return Err(e.into()),
        }
    }
}

/// Runs a metadata call again through transient errors (for a bounded time).
pub(crate) async fn retry_transient<T, F, Fut>(mut call: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, MetaError>>,
{
    let deadline = tokio::time::Instant::now() + META_RETRY_MAX;
    loop {
        match call().await {
            Err(MetaError::Unavailable(m)) if tokio::time::Instant::now() < deadline => {
                tracing::debug!(error = %m, "metadata unavailable, retrying");
                tokio::time::sleep(META_RETRY_PAUSE).await;
            }
            r => return r.map_err(Error::from),
        }
    }
}

pub(crate) fn decode_writer(kv: &KeyValue) -> Result<WriterInfo> {
    decode(WRITER_MAGIC, WRITER_VERSION, &kv.key, &kv.value)
        .map_err(|e| Error::Corrupt(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name() -> Name {
        Name::new("ns", "s").unwrap()
    }

    fn meta(segments: Vec<Segment>) -> StreamMeta {
        StreamMeta {
            config: StreamConfig::default(),
            start_offset: segments.first().map_or(0, |s| s.start_offset),
            segments,
            created_ms: 1,
            writer_epoch: 0,
        }
    }

    fn seg(seq: u64, ledger: u64, start_offset: u64, count: Option<u64>) -> Segment {
        Segment {
            seq,
            ledger,
            start_offset,
            count,
        }
    }

    #[test]
    fn config_checks() {
        StreamConfig::default().check().unwrap();
        StreamConfig::changelog().check().unwrap();
        for bad in [
            StreamConfig {
                segment_max_bytes: 0,
                ..Default::default()
            },
            StreamConfig {
                segment_max_entries: 0,
                ..Default::default()
            },
            StreamConfig {
                segment_max_age: Duration::ZERO,
                ..Default::default()
            },
            StreamConfig {
                ack_quorum: 4,
                ..Default::default()
            },
            StreamConfig {
                ensemble: 2,
                ..Default::default()
            },
            StreamConfig {
                ack_quorum: 0,
                write_quorum: 0,
                ..Default::default()
            },
        ] {
            assert!(
                matches!(bad.check(), Err(Error::InvalidArgument(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn a_segment_list_that_breaks_its_invariants_is_corrupt() {
        let kv = |m: &StreamMeta| KeyValue {
            key: "/k".into(),
            value: m.encode(),
            version: 1,
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        };
        for bad in [
            // Offsets near u64::MAX: later sums would overflow.
            meta(vec![seg(0, 7, u64::MAX - 1, Some(3))]),
            // A gap between segments.
            meta(vec![seg(0, 7, 0, Some(3)), seg(1, 9, 5, None)]),
            // An open segment that is not the last.
            meta(vec![seg(0, 7, 0, None), seg(1, 9, 0, None)]),
            // Sequence numbers going backwards.
            meta(vec![seg(3, 7, 0, Some(3)), seg(1, 9, 3, None)]),
        ] {
            let mut bad = bad;
            bad.start_offset = bad.segments[0].start_offset;
            assert!(
                matches!(decode_meta(&kv(&bad)), Err(Error::Corrupt(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn meta_round_trips_with_durations_in_ms() {
        let m = meta(vec![seg(0, 7, 0, Some(3)), seg(1, 9, 3, None)]);
        let bytes = m.encode();
        let text = std::str::from_utf8(&bytes).unwrap();
        assert!(text.starts_with("quire-stream\t1\n"), "{text}");
        assert!(text.contains("\"segment_max_age_ms\":14400000"), "{text}");
        let kv = KeyValue {
            key: "/k".into(),
            value: bytes,
            version: 1,
            create_revision: 1,
            mod_revision: 1,
            lease: 0,
        };
        assert_eq!(decode_meta(&kv).unwrap(), m);
        let bad = KeyValue {
            value: encode("quire-stream", 2, &m),
            ..kv
        };
        assert!(matches!(decode_meta(&bad), Err(Error::Corrupt(_))));
    }

    #[test]
    fn first_segment_and_takeover() {
        let n = name();
        let mut m = meta(vec![]);
        assert!(seal_and_add(&n, &mut m, 0, Last::None, 0, 10).unwrap());
        assert_eq!(m.segments, vec![seg(0, 10, 0, None)]);
        // Applied already (a CAS whose answer was lost): nothing to do.
        assert!(!seal_and_add(&n, &mut m, 0, Last::None, 0, 10).unwrap());
        // A takeover seals the open segment with the recovered count.
        let mut t = m.clone();
        let last = Last::Segment {
            ledger: 10,
            count: 5,
        };
        assert!(seal_and_add(&n, &mut t, 0, last, 1, 11).unwrap());
        assert_eq!(
            t.segments,
            vec![seg(0, 10, 0, Some(5)), seg(1, 11, 5, None)]
        );
        // A writer that saw the old list is fenced.
        let mut u = t.clone();
        assert!(matches!(
            seal_and_add(&n, &mut u, 0, last, 1, 12),
            Err(Error::Fenced(_))
        ));
        assert!(matches!(
            seal_and_add(&n, &mut u, 0, Last::None, 0, 12),
            Err(Error::Fenced(_))
        ));
        // Sealed already (a clean close) with the same count: only the new segment goes in.
        let mut c = meta(vec![seg(0, 10, 0, Some(5))]);
        assert!(seal_and_add(&n, &mut c, 0, last, 1, 11).unwrap());
        assert_eq!(c.segments[1], seg(1, 11, 5, None));
    }

    #[test]
    fn an_empty_last_segment_is_replaced() {
        let n = name();
        let mut m = meta(vec![seg(0, 10, 0, Some(5)), seg(1, 11, 5, None)]);
        let empty = Last::Segment {
            ledger: 11,
            count: 0,
        };
        // The new segment takes the empty one's place: same seq, same start.
        assert!(seal_and_add(&n, &mut m, 0, empty, 1, 12).unwrap());
        assert_eq!(
            m.segments,
            vec![seg(0, 10, 0, Some(5)), seg(1, 12, 5, None)]
        );
        assert!(check_shape("/k", &m).is_ok());
        // Applied already: nothing to do.
        assert!(!seal_and_add(&n, &mut m, 0, empty, 1, 12).unwrap());
        // A segment that holds records is never replaced.
        let mut full = meta(vec![seg(0, 10, 0, None)]);
        let last = Last::Segment {
            ledger: 10,
            count: 5,
        };
        assert!(matches!(
            seal_and_add(&n, &mut full, 0, last, 0, 12),
            Err(Error::Fenced(_))
        ));
        // Following an empty segment (instead of replacing it) is still allowed.
        let mut after = meta(vec![seg(0, 10, 0, None)]);
        let empty = Last::Segment {
            ledger: 10,
            count: 0,
        };
        assert!(seal_and_add(&n, &mut after, 0, empty, 1, 12).unwrap());
        assert_eq!(
            after.segments,
            vec![seg(0, 10, 0, Some(0)), seg(1, 12, 0, None)]
        );
    }

    #[test]
    fn a_writer_whose_epoch_was_taken_changes_nothing() {
        let n = name();
        let mut m = meta(vec![seg(0, 10, 0, None)]);
        m.writer_epoch = 2;
        let before = m.clone();
        let last = Last::Segment {
            ledger: 10,
            count: 5,
        };
        // The old writer (epoch 1) can neither roll nor seal.
        assert!(matches!(
            seal_and_add(&n, &mut m, 1, last, 1, 11),
            Err(Error::Fenced(_))
        ));
        assert!(matches!(seal(&n, &mut m, 1, 10, 5), Err(Error::Fenced(_))));
        assert_eq!(m, before);
        // The writer holding the epoch can.
        assert!(seal_and_add(&n, &mut m, 2, last, 1, 11).unwrap());
    }

    #[test]
    fn seal_only_own_segment() {
        let n = name();
        let mut m = meta(vec![seg(0, 10, 0, Some(5)), seg(1, 11, 5, None)]);
        assert!(matches!(seal(&n, &mut m, 0, 10, 5), Err(Error::Fenced(_))));
        assert!(seal(&n, &mut m, 0, 11, 2).unwrap());
        assert!(!seal(&n, &mut m, 0, 11, 2).unwrap());
        assert_eq!(m.sealed_end(), Some(7));
        assert_eq!(m.next_seq(), 2);
    }

    #[test]
    fn truncation_takes_whole_sealed_segments_and_keeps_the_last() {
        let base = meta(vec![
            seg(0, 10, 0, Some(5)),
            seg(1, 11, 5, Some(5)),
            seg(2, 12, 10, None),
        ]);
        let mut m = base.clone();
        assert!(truncate_plan(&mut m, 4).is_empty());
        assert_eq!(m, base);
        let mut m = base.clone();
        let removed = truncate_plan(&mut m, 9);
        assert_eq!(removed, vec![seg(0, 10, 0, Some(5))]);
        assert_eq!(m.start_offset, 5);
        // Never the open segment.
        let mut m = base.clone();
        assert_eq!(truncate_plan(&mut m, 1000).len(), 2);
        assert_eq!(m.start_offset, 10);
        assert_eq!(m.segments.len(), 1);
        // Never the last segment, even sealed.
        let mut m = meta(vec![seg(0, 10, 0, Some(5)), seg(1, 11, 5, Some(5))]);
        assert_eq!(truncate_plan(&mut m, 1000).len(), 1);
        assert_eq!(m.start_offset, 5);
        assert_eq!(m.sealed_end(), Some(10));
    }
}
