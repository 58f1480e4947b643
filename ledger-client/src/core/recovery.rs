//! Ledger recovery as a state machine (DESIGN.md §2), free of I/O and of time. The driver
//! ([`crate::recover`]) or the simulation test has already moved the metadata to IN_RECOVERY; the
//! core then decides, from bookie answers alone, where the ledger ends:
//!
//! 1. **Fence** every bookie of the last ensemble and collect their LACs until the answers cover
//!    every ack quorum ([`quorum::covers`]): from then on the old writer cannot complete an add.
//! 2. **Probe** the entry before the starting point, to learn the ledger length there.
//! 3. **Read forward** from max(LAC + 1, first entry of the last ensemble), one entry at a time,
//!    with fencing reads to the entry's whole write set (a bookie that says "no such entry" is
//!    then fenced and can never take that entry from the old writer later). An entry found is
//!    written back to its write set as a recovery add and needs Qa acks; an entry is absent once
//!    [`quorum::known_absent`] holds. Recovery never touches an earlier fragment.
//! 4. **Close** at the last entry found (the driver CASes IN_RECOVERY -> CLOSED).
//!
//! When the bookies answer too little to decide, the core fails with `RecoveryIncomplete` and the
//! driver may start over: every step is idempotent.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use quire_metadata::ledgers::LedgerMetadata;
use quire_proto::entry;

use crate::core::quorum;
use crate::error::LedgerError;

/// A bookie's answer to a fence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FenceOutcome {
    /// Fenced; the bookie's LAC for the ledger.
    Ok {
        lac: i64,
    },
    Unauthorized,
    Failed(String),
}

/// A bookie's answer to a read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadOutcome {
    Found(Bytes),
    /// No such entry (or no such ledger) on this bookie.
    Missing,
    Unauthorized,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecoveryOutput {
    /// Fence the ledger on `bookie` and report its LAC.
    Fence {
        bookie: String,
    },
    /// Read `entry_id` from `bookie`; with `fence`, the read fences the ledger first.
    Read {
        bookie: String,
        entry_id: u64,
        fence: bool,
    },
    /// Write the entry back to `bookie` as a recovery add.
    Write {
        bookie: String,
        entry_id: u64,
        body: Bytes,
    },
    /// Close the ledger at `last_entry_id` with `length`.
    Close {
        last_entry_id: i64,
        length: u64,
    },
    Failed(LedgerError),
}

#[derive(Debug, Clone)]
enum Phase {
    Fencing {
        answers: BTreeMap<usize, FenceOutcome>,
    },
    Probing {
        entry_id: u64,
        /// Write-set bookies still to try, in order.
        next: Vec<String>,
    },
    Reading {
        entry_id: u64,
        missing: BTreeSet<String>,
        failed: BTreeSet<String>,
    },
    Writing {
        entry_id: u64,
        acked: BTreeSet<String>,
        failed: BTreeSet<String>,
    },
    Done,
}

#[derive(Debug, Clone)]
pub struct RecoveryCore {
    ledger_id: u64,
    meta: LedgerMetadata,
    /// First entry of the last ensemble, and that ensemble.
    first: u64,
    ensemble: Vec<String>,
    /// Length of the ledger up to `last_found`.
    length: u64,
    last_found: i64,
    phase: Phase,
}

impl RecoveryCore {
    /// A recovery of `meta` (already IN_RECOVERY).
    pub fn new(ledger_id: u64, meta: LedgerMetadata) -> Self {
        let (first, ensemble) = meta
            .ensembles
            .iter()
            .next_back()
            .map(|(k, v)| (*k, v.clone()))
            .expect("validated metadata has an ensemble");
        RecoveryCore {
            ledger_id,
            meta,
            first,
            ensemble,
            length: 0,
            last_found: -1,
            phase: Phase::Fencing {
                answers: BTreeMap::new(),
            },
        }
    }

    pub fn is_done(&self) -> bool {
        matches!(self.phase, Phase::Done)
    }

    /// The first requests: a fence to every bookie of the last ensemble.
    pub fn start(&self) -> Vec<RecoveryOutput> {
        self.ensemble
            .iter()
            .map(|b| RecoveryOutput::Fence { bookie: b.clone() })
            .collect()
    }

    fn qw(&self) -> usize {
        self.meta.write_quorum as usize
    }
    fn qa(&self) -> usize {
        self.meta.ack_quorum as usize
    }

    fn write_set(&self, entry_id: u64) -> Vec<String> {
        quorum::write_set(entry_id, self.ensemble.len(), self.qw())
            .into_iter()
            .map(|p| self.ensemble[p].clone())
            .collect()
    }

    fn fail(&mut self, why: String) -> Vec<RecoveryOutput> {
        self.phase = Phase::Done;
        vec![RecoveryOutput::Failed(LedgerError::RecoveryIncomplete(
            self.ledger_id,
            why,
        ))]
    }

    fn unauthorized(&mut self) -> Vec<RecoveryOutput> {
        self.phase = Phase::Done;
        vec![RecoveryOutput::Failed(LedgerError::Unauthorized(
            self.ledger_id,
        ))]
    }

    pub fn on_fence(&mut self, bookie: &str, outcome: FenceOutcome) -> Vec<RecoveryOutput> {
        let Some(pos) = self.ensemble.iter().position(|b| b == bookie) else {
            return Vec::new();
        };
        let (qw, qa) = (self.qw(), self.qa());
        let Phase::Fencing { answers } = &mut self.phase else {
            return Vec::new(); // a late answer: coverage was reached without it
        };
        if outcome == FenceOutcome::Unauthorized {
            return self.unauthorized();
        }
        answers.insert(pos, outcome);
        let heard: Vec<bool> = (0..self.ensemble.len())
            .map(|p| matches!(answers.get(&p), Some(FenceOutcome::Ok { .. })))
            .collect();
        if quorum::covers(&heard, qw, qa) {
            let lac = answers
                .values()
                .filter_map(|a| match a {
                    FenceOutcome::Ok { lac } => Some(*lac),
                    _ => None,
                })
                .max()
                .unwrap_or(-1);
            let start = ((lac + 1) as u64).max(self.first);
            return self.begin_from(start);
        }
        if answers.len() == self.ensemble.len() {
            let n = heard.iter().filter(|h| **h).count();
            return self.fail(format!(
                "only {n} of {} bookies could be fenced, too few to cover every ack quorum",
                self.ensemble.len()
            ));
        }
        Vec::new()
    }

    /// Starts reading at `start`, probing `start - 1` first for the length.
    fn begin_from(&mut self, start: u64) -> Vec<RecoveryOutput> {
        if start == 0 {
            return self.read_entry(0);
        }
        let probe = start - 1;
        let mut next: Vec<String> = self
            .meta
            .write_set(probe)
            .into_iter()
            .map(String::from)
            .collect();
        next.reverse();
        let first = next.pop().expect("a write set is never empty");
        self.phase = Phase::Probing {
            entry_id: probe,
            next,
        };
        vec![RecoveryOutput::Read {
            bookie: first,
            entry_id: probe,
            fence: false,
        }]
    }

    fn read_entry(&mut self, entry_id: u64) -> Vec<RecoveryOutput> {
        self.phase = Phase::Reading {
            entry_id,
            missing: BTreeSet::new(),
            failed: BTreeSet::new(),
        };
        self.write_set(entry_id)
            .into_iter()
            .map(|bookie| RecoveryOutput::Read {
                bookie,
                entry_id,
                fence: true,
            })
            .collect()
    }

    pub fn on_read(
        &mut self,
        bookie: &str,
        entry_id: u64,
        outcome: ReadOutcome,
    ) -> Vec<RecoveryOutput> {
        if outcome == ReadOutcome::Unauthorized {
            return self.unauthorized();
        }
        let (qw, qa, ledger_id) = (self.qw(), self.qa(), self.ledger_id);
        match &mut self.phase {
            Phase::Probing { entry_id: e, .. } if *e == entry_id => {
                if let ReadOutcome::Found(body) = &outcome {
                    let body = body.clone();
                    if let Some(len) = valid(self.ledger_id, entry_id, &body) {
                        self.length = len;
                        self.last_found = entry_id as i64;
                        return self.read_entry(entry_id + 1);
                    }
                }
                let Phase::Probing { next, .. } = &mut self.phase else {
                    unreachable!()
                };
                match next.pop() {
                    Some(b) => vec![RecoveryOutput::Read {
                        bookie: b,
                        entry_id,
                        fence: false,
                    }],
                    None => self.fail(format!(
                        "confirmed entry {entry_id} could not be read from any replica"
                    )),
                }
            }
            Phase::Reading {
                entry_id: e,
                missing,
                failed,
            } if *e == entry_id => {
                match outcome {
                    ReadOutcome::Found(body) => {
                        if let Some(len) = valid(ledger_id, entry_id, &body) {
                            self.length = len;
                            return self.write_back(entry_id, body);
                        }
                        failed.insert(bookie.to_string());
                    }
                    ReadOutcome::Missing => {
                        missing.insert(bookie.to_string());
                    }
                    ReadOutcome::Failed(_) | ReadOutcome::Unauthorized => {
                        failed.insert(bookie.to_string());
                    }
                }
                let (m, f) = (missing.len(), failed.len());
                if quorum::known_absent(m, qw, qa) {
                    self.phase = Phase::Done;
                    return vec![RecoveryOutput::Close {
                        last_entry_id: self.last_found,
                        length: self.length,
                    }];
                }
                if m + f == qw {
                    return self.fail(format!(
                        "entry {entry_id}: {m} bookies lack it and {f} failed; cannot tell whether it was acknowledged"
                    ));
                }
                Vec::new()
            }
            _ => Vec::new(), // late answer to an earlier step
        }
    }

    fn write_back(&mut self, entry_id: u64, body: Bytes) -> Vec<RecoveryOutput> {
        self.phase = Phase::Writing {
            entry_id,
            acked: BTreeSet::new(),
            failed: BTreeSet::new(),
        };
        self.write_set(entry_id)
            .into_iter()
            .map(|bookie| RecoveryOutput::Write {
                bookie,
                entry_id,
                body: body.clone(),
            })
            .collect()
    }

    /// A bookie's answer to a recovery add; `Err` carries why it failed.
    pub fn on_write(
        &mut self,
        bookie: &str,
        entry_id: u64,
        result: Result<(), String>,
    ) -> Vec<RecoveryOutput> {
        let (qw, qa) = (self.qw(), self.qa());
        let Phase::Writing {
            entry_id: e,
            acked,
            failed,
        } = &mut self.phase
        else {
            return Vec::new();
        };
        if *e != entry_id {
            return Vec::new();
        }
        match result {
            Ok(()) => acked.insert(bookie.to_string()),
            Err(_) => failed.insert(bookie.to_string()),
        };
        if acked.len() >= qa {
            self.last_found = entry_id as i64;
            return self.read_entry(entry_id + 1);
        }
        if qw - failed.len() < qa {
            let f = failed.len();
            return self.fail(format!(
                "entry {entry_id}: {f} of {qw} recovery writes failed, fewer than {qa} can succeed"
            ));
        }
        Vec::new()
    }
}

/// Checks that a body really is `entry_id` of `ledger_id` (digest included); returns its length
/// field.
fn valid(ledger_id: u64, entry_id: u64, body: &Bytes) -> Option<u64> {
    match entry::decode(body) {
        Ok((h, _)) if h.ledger_id == ledger_id && h.entry_id == entry_id => Some(h.length),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use quire_metadata::ledgers::DigestType;
    use quire_proto::entry::EntryHeader;

    fn meta(e: usize, qw: u32, qa: u32) -> LedgerMetadata {
        let ens = (0..e).map(|i| format!("b{i}")).collect();
        let mut m = LedgerMetadata::new(
            ens,
            qw,
            qa,
            DigestType::Crc32c,
            vec![],
            vec![],
            Default::default(),
        )
        .unwrap();
        m.transition(quire_metadata::ledgers::LedgerState::InRecovery)
            .unwrap();
        m
    }

    fn body(entry_id: u64, length: u64) -> Bytes {
        entry::encode(
            &EntryHeader {
                ledger_id: 9,
                entry_id,
                lac: entry_id as i64 - 1,
                length,
            },
            b"x",
        )
    }

    #[test]
    fn empty_ledger_closes_at_minus_one() {
        let mut r = RecoveryCore::new(9, meta(3, 3, 2));
        assert_eq!(r.start().len(), 3);
        assert!(r.on_fence("b0", FenceOutcome::Ok { lac: -1 }).is_empty());
        let reads = r.on_fence("b1", FenceOutcome::Ok { lac: -1 });
        assert_eq!(reads.len(), 3, "coverage reached with 2 of 3: read entry 0");
        assert!(r.on_read("b0", 0, ReadOutcome::Missing).is_empty());
        let out = r.on_read("b2", 0, ReadOutcome::Missing);
        assert_eq!(
            out,
            vec![RecoveryOutput::Close {
                last_entry_id: -1,
                length: 0
            }]
        );
    }

    #[test]
    fn found_entry_is_written_back_then_reading_goes_on() {
        let mut r = RecoveryCore::new(9, meta(3, 3, 2));
        r.on_fence("b0", FenceOutcome::Ok { lac: 0 });
        let probe = r.on_fence("b1", FenceOutcome::Ok { lac: 0 });
        assert!(matches!(
            &probe[..],
            [RecoveryOutput::Read {
                entry_id: 0,
                fence: false,
                ..
            }]
        ));
        let reads = r.on_read("b0", 0, ReadOutcome::Found(body(0, 1)));
        assert_eq!(reads.len(), 3);
        let writes = r.on_read("b1", 1, ReadOutcome::Found(body(1, 2)));
        assert_eq!(writes.len(), 3);
        assert!(r.on_write("b0", 1, Ok(())).is_empty());
        let next = r.on_write("b2", 1, Ok(()));
        assert!(matches!(
            &next[0],
            RecoveryOutput::Read {
                entry_id: 2,
                fence: true,
                ..
            }
        ));
        r.on_read("b0", 2, ReadOutcome::Missing);
        let close = r.on_read("b1", 2, ReadOutcome::Missing);
        assert_eq!(
            close,
            vec![RecoveryOutput::Close {
                last_entry_id: 1,
                length: 2
            }]
        );
    }

    #[test]
    fn corrupt_copy_is_not_evidence_either_way() {
        let mut r = RecoveryCore::new(9, meta(3, 3, 2));
        r.on_fence("b0", FenceOutcome::Ok { lac: -1 });
        r.on_fence("b1", FenceOutcome::Ok { lac: -1 });
        let mut bad = body(0, 1).to_vec();
        bad[36] ^= 1; // the payload byte
        assert!(
            r.on_read("b0", 0, ReadOutcome::Found(bad.into()))
                .is_empty()
        );
        assert!(r.on_read("b1", 0, ReadOutcome::Missing).is_empty());
        let out = r.on_read("b2", 0, ReadOutcome::Failed("down".into()));
        assert!(matches!(
            &out[..],
            [RecoveryOutput::Failed(LedgerError::RecoveryIncomplete(..))]
        ));
    }

    #[test]
    fn too_few_fences_fail() {
        let mut r = RecoveryCore::new(9, meta(3, 3, 2));
        r.on_fence("b0", FenceOutcome::Ok { lac: -1 });
        r.on_fence("b1", FenceOutcome::Failed("x".into()));
        let out = r.on_fence("b2", FenceOutcome::Failed("y".into()));
        assert!(matches!(
            &out[..],
            [RecoveryOutput::Failed(LedgerError::RecoveryIncomplete(..))]
        ));
    }

    #[test]
    fn recovery_starts_at_the_last_fragment() {
        let mut m = meta(3, 3, 2);
        m.ensembles
            .insert(5, vec!["b0".into(), "b3".into(), "b2".into()]);
        let mut r = RecoveryCore::new(9, m);
        r.on_fence("b0", FenceOutcome::Ok { lac: 2 });
        let out = r.on_fence("b3", FenceOutcome::Ok { lac: 1 });
        // LAC 2 < first entry 5 of the last ensemble: probe entry 4 in the earlier fragment.
        assert!(matches!(
            &out[..],
            [RecoveryOutput::Read {
                entry_id: 4,
                fence: false,
                ..
            }]
        ));
    }
}
