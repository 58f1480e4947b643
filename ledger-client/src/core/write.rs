//! The writer's state machine (DESIGN.md §2), free of I/O and of time: the driver
//! ([`crate::writer`]) or the simulation test feeds it appends, bookie results and metadata
//! outcomes, and carries out the [`WriteOutput`]s it returns.
//!
//! Invariants:
//! - `pending` holds the entries past the LAC, in id order, and every one of them belongs to the
//!   last ensemble (an ensemble change always starts at LAC + 1, the first pending entry).
//! - An entry's `acked` set (a bit per position of the last ensemble) only holds positions of its
//!   current write set; the bits of replaced positions are cleared when the ensemble changes, so
//!   a replaced bookie's acks never count towards Qa.
//! - The LAC only moves while no ensemble change is in flight (as BookKeeper's
//!   `sendAddSuccessCallbacks` does): an entry acknowledged with the help of a bookie that is
//!   about to be replaced would otherwise be acknowledged with fewer than Qa copies in metadata.
//! - Acknowledgements are emitted in entry order, each exactly once.

use std::collections::{BTreeSet, VecDeque};

use bytes::Bytes;
use quire_metadata::ledgers::{LedgerMetadata, LedgerState};
use quire_proto::entry::{self, EntryHeader};

use crate::core::quorum;
use crate::error::LedgerError;

/// A bookie's answer to one add, as the driver classifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AddOutcome {
    Ok,
    /// The ledger is fenced on that bookie: someone recovered it.
    Fenced,
    /// The bookie knows the ledger under another master key.
    Unauthorized,
    /// The bookie failed, timed out, went read-only or the connection broke: replace it.
    Failed(String),
}

/// What the driver must do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutput {
    /// Send the entry to a bookie (a normal add).
    Send {
        bookie: String,
        entry_id: u64,
        body: Bytes,
    },
    /// The entry (and every earlier one) is acknowledged: complete the application's append.
    Acked { entry_id: u64 },
    /// Pick replacements for `replace` (positions in `ensemble`), build the new metadata with
    /// [`WriteCore::propose`] and write it with a CAS on [`WriteCore::version`].
    ChangeEnsemble(EnsembleChange),
    /// The writer cannot go on: fail every pending and future append with this error.
    Failed(LedgerError),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnsembleChange {
    /// The new ensemble starts here (LAC + 1).
    pub first_entry: u64,
    /// Positions of the last ensemble to replace.
    pub replace: Vec<usize>,
    /// The last ensemble as it is now.
    pub ensemble: Vec<String>,
}

/// Why an ensemble change did not happen.
#[derive(Debug, Clone)]
pub enum ChangeFailure {
    /// No bookie outside the ensemble can take the place: go on without the failed ones as long
    /// as every write set keeps Qa live bookies.
    NoSpare(String),
    /// The metadata store failed in a way retries did not fix.
    Error(LedgerError),
}

#[derive(Debug, Clone)]
struct Pending {
    entry_id: u64,
    body: Bytes,
    /// Positions of the current write set that acknowledged the entry (bit p = position p; an
    /// ensemble has at most 64 bookies).
    acked: u64,
    /// Positions the entry was sent to that have not answered yet.
    sent: u64,
}

#[derive(Debug, Clone)]
pub struct WriteCore {
    ledger_id: u64,
    meta: LedgerMetadata,
    version: u64,
    next_entry: u64,
    /// Payload bytes of every entry appended so far.
    length: u64,
    lac: i64,
    /// Length of the ledger up to the LAC.
    lac_length: u64,
    /// Highest LAC piggybacked on a body sent (or written explicitly).
    published_lac: i64,
    pending: VecDeque<Pending>,
    /// Positions that failed and wait for the next ensemble change.
    failed: BTreeSet<usize>,
    /// Positions the change in flight replaces (empty when none is in flight).
    in_change: Vec<usize>,
    changing: bool,
    /// Positions that failed and could not be replaced: skipped by sends.
    down: BTreeSet<usize>,
    error: Option<LedgerError>,
    closed: bool,
}

impl WriteCore {
    /// A writer for a freshly created ledger (`meta` at `version`, OPEN, no entries).
    pub fn new(ledger_id: u64, meta: LedgerMetadata, version: u64) -> Self {
        WriteCore {
            ledger_id,
            meta,
            version,
            next_entry: 0,
            length: 0,
            lac: -1,
            lac_length: 0,
            published_lac: -1,
            pending: VecDeque::new(),
            failed: BTreeSet::new(),
            in_change: Vec::new(),
            changing: false,
            down: BTreeSet::new(),
            error: None,
            closed: false,
        }
    }

    pub fn ledger_id(&self) -> u64 {
        self.ledger_id
    }
    pub fn metadata(&self) -> &LedgerMetadata {
        &self.meta
    }
    pub fn version(&self) -> u64 {
        self.version
    }
    pub fn lac(&self) -> i64 {
        self.lac
    }
    pub fn pending_len(&self) -> usize {
        self.pending.len()
    }
    pub fn error(&self) -> Option<&LedgerError> {
        self.error.as_ref()
    }
    pub fn is_changing(&self) -> bool {
        self.changing
    }
    pub fn has_down(&self) -> bool {
        !self.down.is_empty()
    }

    fn last_ensemble(&self) -> (u64, &Vec<String>) {
        let (k, v) = self
            .meta
            .ensembles
            .iter()
            .next_back()
            .expect("validated metadata has an ensemble");
        (*k, v)
    }

    fn position(&self, bookie: &str) -> Option<usize> {
        self.last_ensemble().1.iter().position(|b| b == bookie)
    }

    fn unusable(&self, pos: usize) -> bool {
        self.failed.contains(&pos) || self.down.contains(&pos) || self.in_change.contains(&pos)
    }

    /// Positions of `entry_id`'s write set in the last ensemble.
    fn write_set(&self, entry_id: u64) -> impl Iterator<Item = usize> + use<> {
        let e = self.meta.ensemble_size as u64;
        (0..self.meta.write_quorum as u64).map(move |i| ((entry_id + i) % e) as usize)
    }

    fn in_write_set(&self, entry_id: u64, pos: usize) -> bool {
        let e = self.meta.ensemble_size as u64;
        (pos as u64 + e - entry_id % e) % e < self.meta.write_quorum as u64
    }

    /// Assigns the next entry id, encodes the entry (piggybacking the LAC) and sends it.
    pub fn append(&mut self, payload: &[u8]) -> Result<(u64, Vec<WriteOutput>), LedgerError> {
        if let Some(e) = &self.error {
            return Err(e.clone());
        }
        if self.closed {
            return Err(LedgerError::Closed(self.ledger_id));
        }
        let entry_id = self.next_entry;
        self.next_entry += 1;
        self.length += payload.len() as u64;
        let header = EntryHeader {
            ledger_id: self.ledger_id,
            entry_id,
            lac: self.lac,
            length: self.length,
        };
        self.published_lac = self.published_lac.max(self.lac);
        let body = entry::encode(&header, payload);
        let mut p = Pending {
            entry_id,
            body,
            acked: 0,
            sent: 0,
        };
        let mut out = Vec::with_capacity(self.meta.write_quorum as usize);
        let ens = self.last_ensemble().1;
        for pos in self.write_set(entry_id) {
            if !self.unusable(pos) {
                p.sent |= 1 << pos;
                out.push(WriteOutput::Send {
                    bookie: ens[pos].clone(),
                    entry_id,
                    body: p.body.clone(),
                });
            }
        }
        self.pending.push_back(p);
        Ok((entry_id, out))
    }

    /// A bookie's answer to an add of `entry_id`.
    pub fn on_add_result(
        &mut self,
        bookie: &str,
        entry_id: u64,
        outcome: AddOutcome,
    ) -> Vec<WriteOutput> {
        if self.error.is_some() {
            return Vec::new();
        }
        let Some(pos) = self.position(bookie) else {
            return Vec::new(); // a bookie replaced since: its answers no longer count
        };
        let in_write_set = self.in_write_set(entry_id, pos);
        let idx = self
            .pending
            .front()
            .and_then(|f| entry_id.checked_sub(f.entry_id))
            .map(|i| i as usize)
            .filter(|i| *i < self.pending.len());
        match outcome {
            AddOutcome::Ok => {
                if let (Some(i), true) = (idx, in_write_set) {
                    let p = &mut self.pending[i];
                    p.sent &= !(1 << pos);
                    p.acked |= 1 << pos;
                }
                self.advance()
            }
            AddOutcome::Fenced => self.fail(LedgerError::Fenced(self.ledger_id)),
            AddOutcome::Unauthorized => self.fail(LedgerError::Unauthorized(self.ledger_id)),
            AddOutcome::Failed(_) => {
                if let Some(i) = idx {
                    self.pending[i].sent &= !(1 << pos);
                }
                self.fail_position(pos)
            }
        }
    }

    /// Bookies that have not answered the oldest pending entry. The real driver needs no such
    /// view (its pool fails each add unanswered for the add timeout); the simulation times these
    /// out to model a slow bookie.
    pub fn front_silent(&self) -> Option<(u64, Vec<String>)> {
        let ens = self.last_ensemble().1;
        self.pending.front().map(|p| {
            let silent = (0..ens.len())
                .filter(|pos| p.sent & (1 << pos) != 0)
                .map(|pos| ens[pos].clone())
                .collect();
            (p.entry_id, silent)
        })
    }

    fn fail_position(&mut self, pos: usize) -> Vec<WriteOutput> {
        if self.unusable(pos) {
            return Vec::new();
        }
        self.failed.insert(pos);
        if self.changing {
            return Vec::new();
        }
        self.start_change()
    }

    fn start_change(&mut self) -> Vec<WriteOutput> {
        self.changing = true;
        self.in_change = std::mem::take(&mut self.failed).into_iter().collect();
        vec![WriteOutput::ChangeEnsemble(self.change_request())]
    }

    fn change_request(&self) -> EnsembleChange {
        EnsembleChange {
            first_entry: (self.lac + 1) as u64,
            replace: self.in_change.clone(),
            ensemble: self.last_ensemble().1.clone(),
        }
    }

    /// The metadata with the new ensemble: the last ensemble with `replacements` (position,
    /// bookie) swapped in, starting at LAC + 1 (replacing the last ensemble when it starts there).
    pub fn propose(&self, replacements: &[(usize, String)]) -> LedgerMetadata {
        let mut ens = self.last_ensemble().1.clone();
        for (pos, b) in replacements {
            ens[*pos] = b.clone();
        }
        let mut meta = self.meta.clone();
        meta.ensembles.insert((self.lac + 1) as u64, ens);
        meta
    }

    /// The CAS of the new ensemble succeeded.
    pub fn on_ensemble_changed(&mut self, meta: LedgerMetadata, version: u64) -> Vec<WriteOutput> {
        if self.error.is_some() {
            return Vec::new();
        }
        let old = self.last_ensemble().1.clone();
        self.meta = meta;
        self.version = version;
        self.changing = false;
        self.in_change.clear();
        // Positions that were replaced are fine again; a position that failed during the change
        // and is still the same bookie stays in `failed`. Acks and sends of replaced positions
        // no longer count.
        let ens = self.last_ensemble().1.clone();
        let replaced: u64 = (0..ens.len())
            .filter(|p| old.get(*p) != Some(&ens[*p]))
            .fold(0, |m, p| m | 1 << p);
        let usable: u64 = (0..ens.len())
            .filter(|p| !self.unusable(*p))
            .fold(0, |m, p| m | 1 << p);
        let mut out = Vec::new();
        for i in 0..self.pending.len() {
            let positions: Vec<usize> = self.write_set(self.pending[i].entry_id).collect();
            let p = &mut self.pending[i];
            p.acked &= !replaced;
            p.sent &= !replaced;
            for pos in positions {
                let bit = 1 << pos;
                if usable & bit != 0 && (p.acked | p.sent) & bit == 0 {
                    p.sent |= bit;
                    out.push(WriteOutput::Send {
                        bookie: ens[pos].clone(),
                        entry_id: p.entry_id,
                        body: p.body.clone(),
                    });
                }
            }
        }
        if !self.failed.is_empty() {
            out.extend(self.start_change());
            return out;
        }
        out.extend(self.advance());
        out.extend(self.check_stuck());
        out
    }

    /// The CAS found other metadata. A ledger no longer OPEN was recovered or closed: fenced.
    /// Otherwise, when the last ensemble is still ours (another party changed only earlier
    /// fragments), the change is retried on top of `current`.
    pub fn on_change_conflict(
        &mut self,
        current: LedgerMetadata,
        version: u64,
    ) -> Vec<WriteOutput> {
        if self.error.is_some() {
            return Vec::new();
        }
        if current.state != LedgerState::Open {
            return self.fail(LedgerError::Fenced(self.ledger_id));
        }
        if current.ensembles.iter().next_back() != self.meta.ensembles.iter().next_back() {
            return self.fail(LedgerError::WriterStopped(format!(
                "the last ensemble of ledger {} was changed by another client",
                self.ledger_id
            )));
        }
        self.meta = current;
        self.version = version;
        vec![WriteOutput::ChangeEnsemble(self.change_request())]
    }

    /// The change could not be made.
    pub fn on_change_failed(&mut self, why: ChangeFailure) -> Vec<WriteOutput> {
        if self.error.is_some() {
            return Vec::new();
        }
        match why {
            ChangeFailure::NoSpare(reason) => {
                tracing::warn!(ledger_id = self.ledger_id, %reason,
                    "no replacement bookie: writing on without the failed ones");
                self.down.extend(self.in_change.drain(..));
                self.down.extend(std::mem::take(&mut self.failed));
                self.changing = false;
                let mut out = self.advance();
                out.extend(self.check_stuck());
                out
            }
            ChangeFailure::Error(e) => self.fail(e),
        }
    }

    /// Tries again to replace the bookies that could not be replaced before.
    pub fn retry_down(&mut self) -> Vec<WriteOutput> {
        if self.error.is_some() || self.changing || self.down.is_empty() {
            return Vec::new();
        }
        self.failed.extend(std::mem::take(&mut self.down));
        self.start_change()
    }

    /// Fails the writer when some write set of the last ensemble has fewer than Qa usable
    /// bookies left (no change in flight could fix it).
    fn check_stuck(&mut self) -> Vec<WriteOutput> {
        if self.changing || !self.failed.is_empty() {
            return Vec::new();
        }
        let e = self.last_ensemble().1.len();
        let (qw, qa) = (
            self.meta.write_quorum as usize,
            self.meta.ack_quorum as usize,
        );
        let stuck = (0..e as u64).any(|start| {
            quorum::write_set(start, e, qw)
                .into_iter()
                .filter(|p| !self.down.contains(p))
                .count()
                < qa
        });
        if stuck {
            return self.fail(LedgerError::NotEnoughBookies(format!(
                "ledger {}: fewer than {qa} writable bookies left in a write set and no replacement",
                self.ledger_id
            )));
        }
        Vec::new()
    }

    fn advance(&mut self) -> Vec<WriteOutput> {
        let mut out = Vec::new();
        if self.changing {
            return out;
        }
        let qa = self.meta.ack_quorum as usize;
        while self
            .pending
            .front()
            .is_some_and(|p| p.acked.count_ones() as usize >= qa)
        {
            let p = self.pending.pop_front().expect("front exists");
            self.lac = p.entry_id as i64;
            self.lac_length = entry::peek_header(&p.body)
                .map(|h| h.length)
                .unwrap_or(self.lac_length);
            out.push(WriteOutput::Acked {
                entry_id: p.entry_id,
            });
        }
        out
    }

    fn fail(&mut self, e: LedgerError) -> Vec<WriteOutput> {
        self.error = Some(e.clone());
        vec![WriteOutput::Failed(e)]
    }

    /// When the LAC has moved past what the last body carried, the LAC to write explicitly and
    /// the bookies to send it to (the usable ones of the last ensemble).
    pub fn explicit_lac(&mut self) -> Option<(i64, Vec<String>)> {
        if self.error.is_some() || self.lac <= self.published_lac {
            return None;
        }
        self.published_lac = self.lac;
        let ens = self.last_ensemble().1.clone();
        let to = ens
            .into_iter()
            .enumerate()
            .filter(|(p, _)| !self.unusable(*p))
            .map(|(_, b)| b)
            .collect();
        Some((self.lac, to))
    }

    /// True once every append is acknowledged and no change is in flight: the ledger can close.
    pub fn can_close(&self) -> bool {
        self.pending.is_empty() && !self.changing && self.error.is_none()
    }

    /// The metadata that closes the ledger at the LAC (valid when [`Self::can_close`]).
    pub fn closed_metadata(&self) -> Result<LedgerMetadata, LedgerError> {
        let mut m = self.meta.clone();
        m.close(self.lac, self.lac_length)
            .map_err(|e| LedgerError::from_meta(self.ledger_id, e))?;
        Ok(m)
    }

    /// The close CAS succeeded (or found the ledger already closed at our LAC).
    pub fn on_closed(&mut self, meta: LedgerMetadata, version: u64) {
        self.meta = meta;
        self.version = version;
        self.closed = true;
    }
}
