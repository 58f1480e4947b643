//! Seeded, deterministic simulation of the ledger protocol (DESIGN.md §2).
//!
//! One schedule = one ledger: a writer ([`WriteCore`]) appends entries while bookies crash and
//! restart, messages are delayed, reordered and lost, ensemble changes happen (or find no spare
//! bookie), and one or two recoveries ([`RecoveryCore`]) race to fence and close the ledger,
//! possibly while the old writer is still sending. Everything runs in-process on one seeded
//! `StdRng`, so a seed replays exactly. After each schedule the checker verifies the contract:
//!
//! 1. every entry the writer saw acknowledged is <= the closed ledger's last entry id
//!    (the TLA+ spec's `NoDivergenceBetweenClientAndMetaData`);
//! 2. every entry <= last entry id is stored, with the exact body the writer produced, on at
//!    least Qa bookies of its write set in the final metadata (`AllCommittedEntriesReachAckQuorum`,
//!    `AllAckedEntriesAreReadable`, checked also at the moment of each acknowledgement), and no
//!    bookie holds a body for an id other than the one the writer produced for it
//!    (`NoOutOfOrderEntries`);
//! 3. every recovery that completed reports the final metadata's last entry id;
//! 4. the metadata is valid; no CAS changed the fragment of an acknowledged entry, and recoveries
//!    and closes never changed the ensembles at all; recovery adds only go to the write set of
//!    the last fragment; every bookie's LAC is an acknowledged entry (`NoDirtyReads`);
//! 5. acknowledgements come in order 0, 1, 2, ... exactly once each;
//! 6. the closed length is the sum of the payload lengths of entries 0..=last.
//!
//! The model:
//! - **Bookies** keep (durably) the entries, a `fenced` flag and a LAC (the highest LAC
//!   piggybacked on an entry or written explicitly). Normal adds are rejected with Fenced once
//!   fenced; recovery adds are always accepted; a fence, and a read with `fence`, set `fenced`
//!   before answering; a read of an absent entry answers Missing. A crashed bookie answers
//!   nothing: requests to it end in a timeout for the sender. It restarts with its data.
//!   (Master keys are not modelled: every party uses the right one.)
//! - **Metadata store**: one versioned [`LedgerMetadata`] cell with CAS on the version; reads and
//!   CASes are messages too (reordered; a CAS answer may be lost, then the sender re-reads).
//!   Ensemble changes draw replacements from the bookies outside the ensemble that are up (the
//!   registry is stale now and then), and sometimes find none (`ChangeFailure::NoSpare`).
//! - **Network**: a bag of messages in flight, each due after its link's latency plus a random
//!   delay (some messages are very late); each step delivers the first one due, or now and then
//!   a random one. A lost request or a lost answer reaches the sender as a timeout (exactly one
//!   answer per request). Fence requests may be lost on purpose (the TLA+ spec's lost fencing
//!   request) and read answers may be corrupted in transit (a flipped bit: the digest must
//!   catch it). The writer's driver may also time out a slow bookie early
//!   ([`WriteCore::front_silent`]), whose real answer then still arrives later.
//! - **Writer**: appends N entries, sends explicit LACs, retries down bookies, may crash (it
//!   simply stops; its messages in flight still arrive), and sometimes closes the ledger itself.
//! - **Recovery**: read the metadata; if CLOSED accept it; else CAS to IN_RECOVERY (taking over
//!   another recovery if need be), run a `RecoveryCore`, CAS to CLOSED. A failed close CAS
//!   re-reads: CLOSED is accepted, anything else restarts from scratch (a bounded number of
//!   times, then the recovery gives up). After `RecoveryIncomplete` the recovery waits, an
//!   operator may restart a crashed bookie, and it tries again. After too many failures or steps
//!   the schedule "heals" (every bookie up, no more faults; a recovery attempt started then must
//!   not fail) and, if no recovery is left, an operator recovery runs, so that every schedule
//!   ends with a closed ledger. The schedule ends when nothing is in flight any more (late adds
//!   of the old writer included; it keeps appending until it is fenced) and the checker runs.
//!
//! A third of the schedules are pure races (no crashes, lost fences, slow links, a writer with
//! many entries in flight), half use a common E/Qw/Qa. The seeds were tuned so that the default
//! run catches, among other deliberate bugs in the cores, recovery reads that do not fence
//! (TLA+'s lost-fence truncation), a known-absent rule off by one, a LAC that moves during an
//! ensemble change and a recovery that starts before the last fragment;
//! [`a_fencing_read_stops_a_late_add_after_a_lost_fence`] scripts the first one.
//!
//! Replay: `QUIRE_SIM_SEED=<n>` runs only seed n with a trace on stderr;
//! `QUIRE_SIM_SEEDS=<count>` changes how many seeds run (from `QUIRE_SIM_SEED`, or 0);
//! `QUIRE_SIM_KEEP_GOING=1` runs them all and lists every failing seed.

use std::collections::{BTreeMap, VecDeque};
use std::time::Instant;

use bytes::Bytes;
use quire_ledger_client::LedgerError;
use quire_ledger_client::core::recovery::{
    FenceOutcome, ReadOutcome, RecoveryCore, RecoveryOutput,
};
use quire_ledger_client::core::write::{
    AddOutcome, ChangeFailure, EnsembleChange, WriteCore, WriteOutput,
};
use quire_metadata::ledgers::{DigestType, LedgerMetadata, LedgerState};
use quire_proto::entry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const LEDGER: u64 = 7;
/// Seeds run by default.
const DEFAULT_SEEDS: u64 = 12_000;
/// After this many steps the schedule heals: no more faults.
const HEAL_AT: u64 = 2_000;
/// A schedule that has not ended after this many steps is stuck.
const MAX_STEPS: u64 = 20_000;
/// Restarts from scratch (after a lost CAS answer or a CAS conflict) before a recovery gives up.
const MAX_RESTARTS: u32 = 3;
/// `RecoveryIncomplete` failures (over all recoveries) before the schedule heals.
const HEAL_AFTER_FAILURES: u32 = 4;
/// Recoveries in all (planned ones and operator ones) before the schedule is declared stuck.
const MAX_RECOVERIES: usize = 6;

#[derive(Debug, Clone, Copy, Default)]
struct Options {
    /// A deliberately broken recovery driver: it closes the ledger one entry early (to prove
    /// that the checker catches a truncation).
    truncate_close: bool,
    /// Keep a trace of every step (printed on stderr).
    trace: bool,
}

/// The knobs of one schedule, all drawn from the seed.
#[derive(Debug, Clone)]
struct Params {
    e: usize,
    qw: usize,
    qa: usize,
    spares: usize,
    entries: usize,
    p_loss: f64,
    p_crash: f64,
    p_restart: f64,
    p_nospare: f64,
    p_impatient: f64,
    p_writer_crash: f64,
    p_append: f64,
    writer_closes: bool,
    /// When each planned recovery starts (earlier if the system goes quiet).
    rec_starts: Vec<Trigger>,
    /// Probability that a message is slow (delivered up to `slow_delay` steps late).
    p_slow: f64,
    slow_delay: u64,
    /// Latency of each bookie's links (to the writer, to the recoveries), added to every
    /// message on them.
    latency: Vec<(u64, u64)>,
    /// Probability that a fence request is lost (the TLA+ spec's lost fencing request).
    p_fence_loss: f64,
    /// Probability that a read answer is corrupted in transit (one bit flipped).
    p_corrupt: f64,
    /// Probability that a step delivers a random message rather than the next one due.
    p_shuffle: f64,
}

#[derive(Debug, Clone, Copy)]
enum Trigger {
    /// At this step.
    Step(u64),
    /// Once the writer has appended this many entries.
    Appended(usize),
}

/// A link is fast (most), a little slow, or very slow.
fn link_latency(rng: &mut StdRng, slow_delay: u64) -> u64 {
    match rng.random_range(0..20) {
        0..12 => 0,
        12..17 => rng.random_range(1..=10),
        _ => rng.random_range(slow_delay / 2..=slow_delay),
    }
}

fn pick<T: Copy>(rng: &mut StdRng, xs: &[T]) -> T {
    xs[rng.random_range(0..xs.len())]
}

impl Params {
    fn draw(rng: &mut StdRng) -> Params {
        // Half the schedules use a common configuration (mostly Qa < Qw, where the known-absent
        // and coverage rules matter most), the others any E >= Qw >= Qa >= 1 with E <= 5.
        let (e, qw, qa) = if rng.random_bool(0.5) {
            pick(
                rng,
                &[
                    (3, 3, 2),
                    (3, 2, 2),
                    (4, 3, 2),
                    (5, 3, 2),
                    (5, 5, 3),
                    (4, 4, 2),
                    (5, 4, 2),
                    (2, 2, 2),
                    (3, 3, 3),
                ],
            )
        } else {
            let e = rng.random_range(1..=5);
            let qw = rng.random_range(1..=e);
            (e, qw, rng.random_range(1..=qw))
        };
        let entries = rng.random_range(0..=12);
        let spares = rng.random_range(0..=3);
        let slow_delay = pick(rng, &[10, 30, 80]);
        let mut rec_starts = Vec::new();
        for _ in 0..if rng.random_bool(0.4) { 2 } else { 1 } {
            rec_starts.push(if rng.random_bool(0.7) {
                Trigger::Appended(rng.random_range(0..=entries))
            } else {
                Trigger::Step(rng.random_range(0..=150))
            });
        }
        let mut p = Params {
            e,
            qw,
            qa,
            spares,
            entries,
            p_loss: pick(rng, &[0.0, 0.01, 0.05, 0.12]),
            p_crash: pick(rng, &[0.0, 0.005, 0.02, 0.05]),
            p_restart: pick(rng, &[0.02, 0.1]),
            p_nospare: pick(rng, &[0.0, 0.0, 0.1, 0.5]),
            p_impatient: pick(rng, &[0.0, 0.0, 0.03]),
            p_writer_crash: pick(rng, &[0.0, 0.0, 0.0, 0.01]),
            p_append: pick(rng, &[0.1, 0.3, 0.8]),
            writer_closes: rng.random_bool(0.2),
            rec_starts,
            latency: (0..e + spares)
                .map(|_| (link_latency(rng, slow_delay), link_latency(rng, slow_delay)))
                .collect(),
            p_fence_loss: pick(rng, &[0.0, 0.0, 0.2, 0.5]),
            p_corrupt: pick(rng, &[0.0, 0.0, 0.05]),
            p_slow: pick(rng, &[0.0, 0.2, 0.4]),
            slow_delay,
            p_shuffle: pick(rng, &[0.0, 0.1, 0.5]),
        };
        if rng.random_bool(0.35) {
            // A pure race between the old writer and the recovery: no crashes, but lost fences
            // and slow links, and a writer that keeps many entries in flight.
            p.p_crash = 0.0;
            p.p_nospare = 0.0;
            p.p_writer_crash = 0.0;
            p.p_loss = pick(rng, &[0.0, 0.01]);
            p.p_fence_loss = pick(rng, &[0.3, 0.6]);
            p.p_append = pick(rng, &[0.5, 1.0]);
            for l in &mut p.latency {
                if rng.random_bool(0.4) {
                    l.0 = rng.random_range(5..=p.slow_delay);
                }
            }
        }
        p
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Actor {
    Writer,
    /// Recovery index and attempt (answers to an earlier attempt are dropped).
    Rec(usize, u32),
}

#[derive(Debug, Clone)]
enum AddAnswer {
    Ok,
    Fenced,
    Failed(String),
}

#[derive(Debug, Clone)]
enum CasResult {
    Ok(u64),
    Conflict(Box<LedgerMetadata>, u64),
    /// The answer was lost: the sender does not know whether the CAS happened.
    Unknown,
}

#[derive(Debug, Clone)]
enum Msg {
    Add {
        from: Actor,
        bookie: usize,
        entry_id: u64,
        body: Bytes,
        recovery: bool,
    },
    Fence {
        from: Actor,
        bookie: usize,
    },
    Read {
        from: Actor,
        bookie: usize,
        entry_id: u64,
        fence: bool,
    },
    WriteLac {
        bookie: usize,
        lac: i64,
    },
    AddDone {
        to: Actor,
        bookie: usize,
        entry_id: u64,
        answer: AddAnswer,
    },
    FenceDone {
        to: Actor,
        bookie: usize,
        outcome: FenceOutcome,
    },
    ReadDone {
        to: Actor,
        bookie: usize,
        entry_id: u64,
        outcome: ReadOutcome,
    },
    MetaRead {
        from: Actor,
    },
    MetaReadDone {
        to: Actor,
        meta: Box<LedgerMetadata>,
        version: u64,
    },
    MetaCas {
        from: Actor,
        meta: Box<LedgerMetadata>,
        expected: u64,
    },
    MetaCasDone {
        to: Actor,
        result: CasResult,
    },
}

impl Msg {
    /// What the sender sees when this request (or answer) is lost or its bookie is down: a
    /// timeout. `None` for messages nobody waits on.
    fn timed_out(&self) -> Option<Msg> {
        let why = || "timeout".to_string();
        match self {
            Msg::Add {
                from: to,
                bookie,
                entry_id,
                ..
            }
            | Msg::AddDone {
                to,
                bookie,
                entry_id,
                ..
            } => Some(Msg::AddDone {
                to: *to,
                bookie: *bookie,
                entry_id: *entry_id,
                answer: AddAnswer::Failed(why()),
            }),
            Msg::Fence { from: to, bookie } | Msg::FenceDone { to, bookie, .. } => {
                Some(Msg::FenceDone {
                    to: *to,
                    bookie: *bookie,
                    outcome: FenceOutcome::Failed(why()),
                })
            }
            Msg::Read {
                from: to,
                bookie,
                entry_id,
                ..
            }
            | Msg::ReadDone {
                to,
                bookie,
                entry_id,
                ..
            } => Some(Msg::ReadDone {
                to: *to,
                bookie: *bookie,
                entry_id: *entry_id,
                outcome: ReadOutcome::Failed(why()),
            }),
            _ => None,
        }
    }

    fn short(&self) -> String {
        match self {
            Msg::Add {
                from,
                bookie,
                entry_id,
                recovery,
                ..
            } => format!("{from:?} add e{entry_id} -> b{bookie} recovery={recovery}"),
            Msg::Fence { from, bookie } => format!("{from:?} fence -> b{bookie}"),
            Msg::Read {
                from,
                bookie,
                entry_id,
                fence,
            } => format!("{from:?} read e{entry_id} fence={fence} -> b{bookie}"),
            Msg::WriteLac { bookie, lac } => format!("writer lac {lac} -> b{bookie}"),
            Msg::AddDone {
                to,
                bookie,
                entry_id,
                answer,
            } => format!("b{bookie} add e{entry_id} {answer:?} -> {to:?}"),
            Msg::FenceDone {
                to,
                bookie,
                outcome,
            } => format!("b{bookie} fence {outcome:?} -> {to:?}"),
            Msg::ReadDone {
                to,
                bookie,
                entry_id,
                outcome,
            } => {
                let o = match outcome {
                    ReadOutcome::Found(_) => "Found".to_string(),
                    o => format!("{o:?}"),
                };
                format!("b{bookie} read e{entry_id} {o} -> {to:?}")
            }
            Msg::MetaRead { from } => format!("{from:?} meta read"),
            Msg::MetaReadDone { to, meta, version } => {
                format!("meta v{version} {:?} -> {to:?}", meta.state)
            }
            Msg::MetaCas {
                from,
                meta,
                expected,
            } => format!(
                "{from:?} meta cas at v{expected}: {:?} last {} ensembles {:?}",
                meta.state, meta.last_entry_id, meta.ensembles
            ),
            Msg::MetaCasDone { to, result } => {
                let r = match result {
                    CasResult::Ok(v) => format!("ok v{v}"),
                    CasResult::Conflict(m, v) => format!("conflict (v{v} {:?})", m.state),
                    CasResult::Unknown => "unknown".into(),
                };
                format!("meta cas {r} -> {to:?}")
            }
        }
    }
}

#[derive(Debug, Clone, Default)]
struct Bookie {
    up: bool,
    entries: BTreeMap<u64, Bytes>,
    fenced: bool,
    lac: i64,
    /// Entries this bookie said it lacked to a recovery read (for the statistics).
    said_missing: std::collections::BTreeSet<u64>,
}

#[derive(Debug, Clone)]
enum WMeta {
    None,
    Change(LedgerMetadata),
    ChangeResolving(LedgerMetadata),
    Close(LedgerMetadata),
    CloseResolving,
}

struct Writer {
    core: WriteCore,
    alive: bool,
    payloads: Vec<Vec<u8>>,
    appended: usize,
    /// The body the writer produced for each entry id (from its sends).
    bodies: BTreeMap<u64, Bytes>,
    acked: Vec<u64>,
    meta_op: WMeta,
    closing: bool,
    closed: bool,
    /// Stopped by the driver (its close lost the race).
    stopped: bool,
    error: Option<LedgerError>,
}

impl Writer {
    fn active(&self) -> bool {
        self.alive && self.error.is_none() && !self.stopped && !self.closing && !self.closed
    }
}

enum RState {
    NotStarted,
    WaitRetry,
    ReadMeta,
    TakeOver(LedgerMetadata),
    Running {
        core: Box<RecoveryCore>,
        meta: LedgerMetadata,
        version: u64,
    },
    Closing(LedgerMetadata),
    Done,
    GaveUp,
}

struct Rec {
    attempt: u32,
    state: RState,
    /// The last entry id it reports, once completed.
    result: Option<i64>,
    /// Whether it closed the ledger itself (rather than accepting another's close).
    closed_it: bool,
    restarts: u32,
    /// The current attempt started after the schedule healed: every bookie answers it.
    healthy: bool,
}

impl Rec {
    fn new() -> Rec {
        Rec {
            attempt: 0,
            state: RState::NotStarted,
            result: None,
            closed_it: false,
            restarts: 0,
            healthy: false,
        }
    }
    fn active(&self) -> bool {
        !matches!(
            self.state,
            RState::NotStarted | RState::Done | RState::GaveUp
        )
    }
}

/// What one schedule did, summed over all schedules for the report.
#[derive(Debug, Default, Clone)]
struct Stats {
    schedules: u64,
    steps: u64,
    entries_acked: u64,
    closed_nonempty: u64,
    writer_fenced: u64,
    writer_closed: u64,
    ensemble_changes: u64,
    no_spare: u64,
    two_recoveries: u64,
    /// IN_RECOVERY -> IN_RECOVERY by another recovery than the one that moved it there.
    takeovers: u64,
    recovery_incomplete: u64,
    recoveries_accepting: u64,
    healed: u64,
    operator_recoveries: u64,
    /// Recovery adds sent.
    recovery_writes: u64,
    /// Normal adds that reached a bookie after it told a recovery it lacked that entry (the
    /// race that fencing reads exist for).
    late_adds_after_missing: u64,
    /// Schedules that closed past the last entry the writer saw acknowledged.
    closed_past_acked: u64,
    /// Schedules that closed with more than one fragment.
    multi_fragment: u64,
    /// Writer failures by kind.
    writer_failures: BTreeMap<&'static str, u64>,
}

impl Stats {
    fn add(&mut self, o: &Stats) {
        self.schedules += o.schedules;
        self.steps += o.steps;
        self.entries_acked += o.entries_acked;
        self.closed_nonempty += o.closed_nonempty;
        self.writer_fenced += o.writer_fenced;
        self.writer_closed += o.writer_closed;
        self.ensemble_changes += o.ensemble_changes;
        self.no_spare += o.no_spare;
        self.two_recoveries += o.two_recoveries;
        self.takeovers += o.takeovers;
        self.recovery_incomplete += o.recovery_incomplete;
        self.recoveries_accepting += o.recoveries_accepting;
        self.healed += o.healed;
        self.operator_recoveries += o.operator_recoveries;
        self.recovery_writes += o.recovery_writes;
        self.late_adds_after_missing += o.late_adds_after_missing;
        self.closed_past_acked += o.closed_past_acked;
        self.multi_fragment += o.multi_fragment;
        for (k, v) in &o.writer_failures {
            *self.writer_failures.entry(k).or_default() += v;
        }
    }
}

struct Sim {
    rng: StdRng,
    p: Params,
    opts: Options,
    names: Vec<String>,
    bookies: Vec<Bookie>,
    meta: LedgerMetadata,
    version: u64,
    /// Messages in flight, each with the step it is due at.
    bag: Vec<(u64, Msg)>,
    step: u64,
    heal: bool,
    writer: Writer,
    recs: Vec<Rec>,
    incomplete: u32,
    /// The recovery that last moved the ledger to IN_RECOVERY.
    recovering: Option<usize>,
    violations: Vec<String>,
    trace: Vec<String>,
    stats: Stats,
}

impl Sim {
    fn new(seed: u64, opts: Options) -> Sim {
        let mut rng = StdRng::seed_from_u64(seed);
        let p = Params::draw(&mut rng);
        let n = p.e + p.spares;
        let names: Vec<String> = (0..n).map(|i| format!("b{i}")).collect();
        let bookies = vec![
            Bookie {
                up: true,
                lac: -1,
                ..Bookie::default()
            };
            n
        ];
        let mut meta = LedgerMetadata::new(
            names[..p.e].to_vec(),
            p.qw as u32,
            p.qa as u32,
            DigestType::Crc32c,
            vec![],
            vec![],
            BTreeMap::new(),
        )
        .expect("E >= Qw >= Qa >= 1 by construction");
        meta.ctime_ms = 0;
        let payloads = (0..p.entries)
            .map(|_| {
                let len = rng.random_range(0..=8);
                (0..len).map(|_| rng.random::<u8>()).collect()
            })
            .collect();
        let version = 1;
        let writer = Writer {
            core: WriteCore::new(LEDGER, meta.clone(), version),
            alive: true,
            payloads,
            appended: 0,
            bodies: BTreeMap::new(),
            acked: Vec::new(),
            meta_op: WMeta::None,
            closing: false,
            closed: false,
            stopped: false,
            error: None,
        };
        let recs = p.rec_starts.iter().map(|_| Rec::new()).collect();
        let stats = Stats {
            schedules: 1,
            two_recoveries: (p.rec_starts.len() > 1) as u64,
            ..Stats::default()
        };
        Sim {
            rng,
            p,
            opts,
            names,
            bookies,
            meta,
            version,
            bag: Vec::new(),
            step: 0,
            heal: false,
            writer,
            recs,
            incomplete: 0,
            recovering: None,
            violations: Vec::new(),
            trace: Vec::new(),
            stats,
        }
    }

    fn t(&mut self, f: impl FnOnce() -> String) {
        if self.opts.trace {
            let line = format!("[{}] {}", self.step, f());
            self.trace.push(line);
        }
    }

    fn violation(&mut self, what: String) {
        self.t(|| format!("VIOLATION: {what}"));
        self.violations.push(what);
    }

    fn send(&mut self, m: Msg) {
        let link = match &m {
            Msg::Add { from, bookie, .. }
            | Msg::Fence { from, bookie }
            | Msg::Read { from, bookie, .. }
            | Msg::AddDone {
                to: from, bookie, ..
            }
            | Msg::FenceDone {
                to: from, bookie, ..
            }
            | Msg::ReadDone {
                to: from, bookie, ..
            } => Some((*from == Actor::Writer, *bookie)),
            Msg::WriteLac { bookie, .. } => Some((true, *bookie)),
            _ => None,
        };
        let base = link.map_or(0, |(writer, b)| {
            let (w, r) = self.p.latency[b];
            if writer { w } else { r }
        });
        let delay = base
            + if self.p.p_slow > 0.0 && self.rng.random_bool(self.p.p_slow) {
                self.rng.random_range(0..=self.p.slow_delay)
            } else {
                self.rng.random_range(0..=2)
            };
        self.bag.push((self.step + delay, m));
    }

    fn bookie_index(&mut self, name: &str) -> Option<usize> {
        let i = self.names.iter().position(|n| n == name);
        if i.is_none() {
            self.violation(format!("a core named an unknown bookie {name:?}"));
        }
        i
    }

    fn loss(&mut self) -> bool {
        !self.heal && self.p.p_loss > 0.0 && self.rng.random_bool(self.p.p_loss)
    }

    // ---------------------------------------------------------------- the main loop

    fn run(mut self) -> (Result<(), String>, Stats, Vec<String>) {
        let outcome = self.run_inner();
        let result = match outcome {
            Err(e) => Err(e),
            Ok(()) => {
                self.check();
                if self.violations.is_empty() {
                    Ok(())
                } else {
                    Err(self.violations.join("\n"))
                }
            }
        };
        self.stats.steps = self.step;
        self.stats.entries_acked = self.writer.acked.len() as u64;
        self.stats.closed_nonempty = (self.meta.last_entry_id >= 0) as u64;
        self.stats.writer_fenced = matches!(self.writer.error, Some(LedgerError::Fenced(_))) as u64;
        if let Some(e) = &self.writer.error {
            self.stats.writer_failures.insert(e.code(), 1);
        }
        let max_acked = self.writer.acked.last().map_or(-1, |a| *a as i64);
        self.stats.closed_past_acked = (self.meta.last_entry_id > max_acked) as u64;
        self.stats.multi_fragment = (self.meta.ensembles.len() > 1) as u64;
        self.stats.writer_closed = self.writer.closed as u64;
        self.stats.recoveries_accepting = self
            .recs
            .iter()
            .filter(|r| r.result.is_some() && !r.closed_it)
            .count() as u64;
        let result = result.map_err(|e| format!("{e}\nparams: {:?}", self.p));
        (result, self.stats, self.trace)
    }

    fn run_inner(&mut self) -> Result<(), String> {
        loop {
            self.step += 1;
            if self.step > MAX_STEPS {
                return Err(format!(
                    "(liveness) no end after {MAX_STEPS} steps (ledger {:?}, {} messages in flight)",
                    self.meta.state,
                    self.bag.len()
                ));
            }
            if !self.heal && self.step > HEAL_AT {
                self.enter_heal("too many steps");
            }
            self.random_actions();
            if !self.bag.is_empty() {
                let n = self.bag.len();
                let i = if self.p.p_shuffle > 0.0 && self.rng.random_bool(self.p.p_shuffle) {
                    self.rng.random_range(0..n)
                } else {
                    // The first message due (the bag is in sending order: FIFO among equals).
                    (0..n).min_by_key(|i| self.bag[*i].0).unwrap_or(0)
                };
                let (_, m) = self.bag.remove(i);
                self.deliver(m);
            } else if !self.quiesce() {
                return Ok(());
            }
            if !self.violations.is_empty() {
                return Ok(());
            }
        }
    }

    fn enter_heal(&mut self, why: &str) {
        if self.heal {
            return;
        }
        self.t(|| format!("HEAL: {why}: every bookie up, no more faults"));
        self.heal = true;
        self.stats.healed = 1;
        for b in &mut self.bookies {
            b.up = true;
        }
    }

    fn random_actions(&mut self) {
        for i in 0..self.recs.len() {
            let due = match self.p.rec_starts.get(i) {
                Some(Trigger::Step(s)) => *s <= self.step,
                Some(Trigger::Appended(k)) => *k <= self.writer.appended,
                None => false,
            };
            if matches!(self.recs[i].state, RState::NotStarted) && due {
                self.rec_start(i);
            }
        }
        if !self.heal {
            if self.p.p_crash > 0.0 && self.rng.random_bool(self.p.p_crash) {
                let up: Vec<usize> = (0..self.bookies.len())
                    .filter(|b| self.bookies[*b].up)
                    .collect();
                if !up.is_empty() {
                    let b = up[self.rng.random_range(0..up.len())];
                    self.bookies[b].up = false;
                    self.t(|| format!("b{b} crashes"));
                }
            }
            if self.rng.random_bool(self.p.p_restart) {
                self.restart_one();
            }
        }
        if self.writer.active() {
            if self.writer.appended < self.writer.payloads.len()
                && self.rng.random_bool(self.p.p_append)
            {
                self.writer_append();
            }
            if !self.heal && self.p.p_impatient > 0.0 && self.rng.random_bool(self.p.p_impatient) {
                self.writer_impatient();
            }
            if self.rng.random_bool(0.03) {
                let outs = self.writer.core.retry_down();
                self.writer_outputs(outs);
            }
            if self.rng.random_bool(0.05) {
                self.writer_explicit_lac();
            }
            if self.rng.random_bool(0.1) {
                self.writer_try_close();
            }
            if !self.heal
                && self.p.p_writer_crash > 0.0
                && self.rng.random_bool(self.p.p_writer_crash)
            {
                self.t(|| "writer crashes".into());
                self.writer.alive = false;
            }
        }
        for i in 0..self.recs.len() {
            if matches!(self.recs[i].state, RState::WaitRetry)
                && (self.heal || self.rng.random_bool(0.1))
            {
                self.rec_retry(i);
            }
        }
    }

    fn restart_one(&mut self) {
        let down: Vec<usize> = (0..self.bookies.len())
            .filter(|b| !self.bookies[*b].up)
            .collect();
        if !down.is_empty() {
            let b = down[self.rng.random_range(0..down.len())];
            self.bookies[b].up = true;
            self.t(|| format!("b{b} restarts"));
        }
    }

    /// Nothing is in flight: force progress, or report that the schedule is over.
    fn quiesce(&mut self) -> bool {
        if self.writer.active() && self.writer.appended < self.writer.payloads.len() {
            self.writer_append();
            return true;
        }
        if self.writer.active()
            && self.p.writer_closes
            && self.writer.appended == self.writer.payloads.len()
            && self.writer.core.can_close()
        {
            self.writer_try_close();
            if self.writer.closing {
                return true;
            }
        }
        if let Some(i) = self
            .recs
            .iter()
            .position(|r| matches!(r.state, RState::WaitRetry))
        {
            self.rec_retry(i);
            return true;
        }
        if let Some(i) = self
            .recs
            .iter()
            .position(|r| matches!(r.state, RState::NotStarted))
        {
            self.rec_start(i);
            return true;
        }
        if let Some(i) = self.recs.iter().position(Rec::active) {
            self.violation(format!(
                "(liveness) recovery {i} waits for an answer but nothing is in flight (stuck core)"
            ));
            return false;
        }
        if self.meta.state != LedgerState::Closed {
            if self.recs.len() >= MAX_RECOVERIES {
                self.violation(format!(
                    "(liveness) the ledger is still {:?} after {} recoveries",
                    self.meta.state,
                    self.recs.len()
                ));
                return false;
            }
            self.enter_heal("every recovery gave up");
            self.t(|| "an operator starts another recovery".into());
            self.stats.operator_recoveries += 1;
            self.recs.push(Rec::new());
            let i = self.recs.len() - 1;
            self.rec_start(i);
            return true;
        }
        false
    }

    fn deliver(&mut self, m: Msg) {
        self.t(|| m.short());
        match m {
            Msg::Add { bookie, .. }
            | Msg::Fence { bookie, .. }
            | Msg::Read { bookie, .. }
            | Msg::WriteLac { bookie, .. } => self.at_bookie(bookie, m),
            Msg::AddDone {
                to,
                bookie,
                entry_id,
                answer,
            } => {
                let name = self.names[bookie].clone();
                match to {
                    Actor::Writer => {
                        if self.writer.alive {
                            let outcome = match answer {
                                AddAnswer::Ok => AddOutcome::Ok,
                                AddAnswer::Fenced => AddOutcome::Fenced,
                                AddAnswer::Failed(why) => AddOutcome::Failed(why),
                            };
                            let outs = self.writer.core.on_add_result(&name, entry_id, outcome);
                            self.writer_outputs(outs);
                        }
                    }
                    Actor::Rec(i, att) => {
                        let result = match answer {
                            AddAnswer::Ok => Ok(()),
                            AddAnswer::Fenced => {
                                self.violation(format!(
                                    "b{bookie} rejected a recovery add as fenced"
                                ));
                                Err("fenced".into())
                            }
                            AddAnswer::Failed(why) => Err(why),
                        };
                        self.rec_answer(i, att, |c| c.on_write(&name, entry_id, result));
                    }
                }
            }
            Msg::FenceDone {
                to,
                bookie,
                outcome,
            } => {
                let name = self.names[bookie].clone();
                if let Actor::Rec(i, att) = to {
                    self.rec_answer(i, att, |c| c.on_fence(&name, outcome));
                }
            }
            Msg::ReadDone {
                to,
                bookie,
                entry_id,
                outcome,
            } => {
                let name = self.names[bookie].clone();
                if let Actor::Rec(i, att) = to {
                    self.rec_answer(i, att, |c| c.on_read(&name, entry_id, outcome));
                }
            }
            Msg::MetaRead { from } => {
                let m = Msg::MetaReadDone {
                    to: from,
                    meta: Box::new(self.meta.clone()),
                    version: self.version,
                };
                self.send(m);
            }
            Msg::MetaCas {
                from,
                meta,
                expected,
            } => {
                let result = if self.loss() {
                    if self.rng.random_bool(0.5) {
                        self.apply_cas(from, *meta, expected);
                        self.t(|| "  (applied, answer lost)".into());
                    } else {
                        self.t(|| "  (request lost)".into());
                    }
                    CasResult::Unknown
                } else {
                    self.apply_cas(from, *meta, expected)
                };
                self.send(Msg::MetaCasDone { to: from, result });
            }
            Msg::MetaReadDone { to, meta, version } => match to {
                Actor::Writer => self.writer_meta_read(*meta, version),
                Actor::Rec(i, att) => self.rec_meta_read(i, att, *meta, version),
            },
            Msg::MetaCasDone { to, result } => match to {
                Actor::Writer => self.writer_cas_done(result),
                Actor::Rec(i, att) => self.rec_cas_done(i, att, result),
            },
        }
    }

    // ---------------------------------------------------------------- bookies

    fn at_bookie(&mut self, b: usize, m: Msg) {
        let fence_lost = matches!(m, Msg::Fence { .. })
            && !self.heal
            && self.p.p_fence_loss > 0.0
            && self.rng.random_bool(self.p.p_fence_loss);
        let down = !self.bookies[b].up;
        if down || fence_lost || self.loss() {
            self.t(|| {
                let why = if down { "bookie down" } else { "request lost" };
                format!("  ({why}: timeout)")
            });
            if let Some(a) = m.timed_out() {
                self.send(a);
            }
            return;
        }
        let answer = match m {
            Msg::Add {
                from,
                bookie,
                entry_id,
                body,
                recovery,
            } => {
                if !recovery && self.bookies[b].said_missing.contains(&entry_id) {
                    self.stats.late_adds_after_missing += 1;
                }
                let answer = if self.bookies[b].fenced && !recovery {
                    AddAnswer::Fenced
                } else {
                    let lac = match entry::peek_header(&body) {
                        Ok(h) => h.lac,
                        Err(e) => {
                            self.violation(format!("an add of e{entry_id} has no header: {e}"));
                            -1
                        }
                    };
                    let bk = &mut self.bookies[b];
                    let old = bk.entries.insert(entry_id, body.clone());
                    bk.lac = bk.lac.max(lac);
                    if old.is_some_and(|o| o != body) {
                        self.violation(format!(
                            "(2) b{b} got two different bodies for e{entry_id}"
                        ));
                    }
                    AddAnswer::Ok
                };
                Some(Msg::AddDone {
                    to: from,
                    bookie,
                    entry_id,
                    answer,
                })
            }
            Msg::Fence { from, bookie } => {
                let bk = &mut self.bookies[b];
                bk.fenced = true;
                Some(Msg::FenceDone {
                    to: from,
                    bookie,
                    outcome: FenceOutcome::Ok { lac: bk.lac },
                })
            }
            Msg::Read {
                from,
                bookie,
                entry_id,
                fence,
            } => {
                let bk = &mut self.bookies[b];
                if fence {
                    bk.fenced = true;
                }
                let outcome = match bk.entries.get(&entry_id) {
                    Some(body)
                        if !self.heal
                            && self.p.p_corrupt > 0.0
                            && self.rng.random_bool(self.p.p_corrupt) =>
                    {
                        let mut bad = body.to_vec();
                        let bit = self.rng.random_range(0..bad.len() * 8);
                        bad[bit / 8] ^= 1 << (bit % 8);
                        ReadOutcome::Found(Bytes::from(bad))
                    }
                    Some(body) => ReadOutcome::Found(body.clone()),
                    None => {
                        if matches!(from, Actor::Rec(..)) {
                            bk.said_missing.insert(entry_id);
                        }
                        ReadOutcome::Missing
                    }
                };
                Some(Msg::ReadDone {
                    to: from,
                    bookie,
                    entry_id,
                    outcome,
                })
            }
            Msg::WriteLac { lac, .. } => {
                let bk = &mut self.bookies[b];
                bk.lac = bk.lac.max(lac);
                None
            }
            _ => None,
        };
        if let Some(a) = answer {
            if self.loss() {
                self.t(|| "  (answer lost: timeout)".into());
                if let Some(t) = a.timed_out() {
                    self.send(t);
                }
            } else {
                self.send(a);
            }
        }
    }

    // ---------------------------------------------------------------- metadata store

    fn apply_cas(&mut self, from: Actor, new: LedgerMetadata, expected: u64) -> CasResult {
        if expected != self.version {
            return CasResult::Conflict(Box::new(self.meta.clone()), self.version);
        }
        if let Err(e) = new.validate() {
            self.violation(format!("(4) {from:?} proposed invalid metadata: {e}"));
            return CasResult::Conflict(Box::new(self.meta.clone()), self.version);
        }
        use LedgerState::*;
        let legal = matches!(
            (self.meta.state, new.state),
            (Open, Open)
                | (Open, InRecovery)
                | (Open, Closed)
                | (InRecovery, InRecovery)
                | (InRecovery, Closed)
        );
        if !legal {
            self.violation(format!(
                "(4) {from:?} moved the ledger {:?} -> {:?}",
                self.meta.state, new.state
            ));
        }
        if new.state == Open {
            // An ensemble change: only the writer makes them, and only past the LAC.
            if from != Actor::Writer {
                self.violation(format!("(4) {from:?} changed an open ledger's ensembles"));
            }
            let first = new.ensembles.keys().next_back().copied().unwrap_or(0);
            let max_acked = self.writer.acked.last().map(|a| *a as i64).unwrap_or(-1);
            if first as i64 <= max_acked {
                self.violation(format!(
                    "(4) an ensemble change starts at {first}, within the acknowledged entries 0..={max_acked}"
                ));
            }
            let kept_old: Vec<_> = self.meta.ensembles.range(..first).collect();
            let kept_new: Vec<_> = new.ensembles.range(..first).collect();
            if kept_old != kept_new {
                self.violation(format!(
                    "(4) an ensemble change rewrote earlier fragments: {:?} -> {:?}",
                    self.meta.ensembles, new.ensembles
                ));
            }
            self.stats.ensemble_changes += 1;
        } else if new.ensembles != self.meta.ensembles {
            self.violation(format!(
                "(4) {from:?} changed the ensembles while moving to {:?}: {:?} -> {:?}",
                new.state, self.meta.ensembles, new.ensembles
            ));
        }
        if let Actor::Rec(i, _) = from
            && new.state == InRecovery
        {
            if self.meta.state == InRecovery && self.recovering != Some(i) {
                self.stats.takeovers += 1;
            }
            self.recovering = Some(i);
        }
        self.meta = new;
        self.version += 1;
        CasResult::Ok(self.version)
    }

    // ---------------------------------------------------------------- the writer's driver

    fn writer_append(&mut self) {
        let i = self.writer.appended;
        let payload = self.writer.payloads[i].clone();
        match self.writer.core.append(&payload) {
            Ok((id, outs)) => {
                self.t(|| format!("writer appends e{id} ({} bytes)", payload.len()));
                if id != i as u64 {
                    self.violation(format!("append {i} got entry id {id}"));
                }
                self.writer.appended += 1;
                self.writer_outputs(outs);
            }
            Err(e) => {
                self.t(|| format!("writer append refused: {e}"));
                self.writer.error.get_or_insert(e);
            }
        }
    }

    fn writer_impatient(&mut self) {
        let Some((entry_id, silent)) = self.writer.core.front_silent() else {
            return;
        };
        if silent.is_empty() {
            return;
        }
        let b = silent[self.rng.random_range(0..silent.len())].clone();
        self.t(|| format!("writer times out {b} on e{entry_id} early"));
        let outs = self
            .writer
            .core
            .on_add_result(&b, entry_id, AddOutcome::Failed("slow".into()));
        self.writer_outputs(outs);
    }

    fn writer_explicit_lac(&mut self) {
        if let Some((lac, to)) = self.writer.core.explicit_lac() {
            self.t(|| format!("writer sends explicit LAC {lac} to {to:?}"));
            for b in to {
                if let Some(bookie) = self.bookie_index(&b) {
                    self.send(Msg::WriteLac { bookie, lac });
                }
            }
        }
    }

    fn writer_try_close(&mut self) {
        if !self.p.writer_closes
            || !self.writer.active()
            || self.writer.appended < self.writer.payloads.len()
            || !self.writer.core.can_close()
            || !matches!(self.writer.meta_op, WMeta::None)
        {
            return;
        }
        match self.writer.core.closed_metadata() {
            Ok(m) => {
                self.t(|| format!("writer closes at {}", m.last_entry_id));
                self.writer.closing = true;
                let expected = self.writer.core.version();
                self.writer.meta_op = WMeta::Close(m.clone());
                self.send(Msg::MetaCas {
                    from: Actor::Writer,
                    meta: Box::new(m),
                    expected,
                });
            }
            Err(e) => self.violation(format!("closed_metadata failed when can_close: {e}")),
        }
    }

    fn writer_outputs(&mut self, outs: Vec<WriteOutput>) {
        let mut queue: VecDeque<WriteOutput> = outs.into();
        while let Some(o) = queue.pop_front() {
            match o {
                WriteOutput::Send {
                    bookie,
                    entry_id,
                    body,
                } => {
                    match self.writer.bodies.get(&entry_id) {
                        Some(b) if *b != body => self.violation(format!(
                            "(2) the writer sent two different bodies for e{entry_id}"
                        )),
                        Some(_) => {}
                        None => {
                            self.writer.bodies.insert(entry_id, body.clone());
                        }
                    }
                    if let Some(b) = self.bookie_index(&bookie) {
                        self.send(Msg::Add {
                            from: Actor::Writer,
                            bookie: b,
                            entry_id,
                            body,
                            recovery: false,
                        });
                    }
                }
                WriteOutput::Acked { entry_id } => self.on_acked(entry_id),
                WriteOutput::ChangeEnsemble(ch) => queue.extend(self.writer_change(ch)),
                WriteOutput::Failed(e) => {
                    self.t(|| format!("writer fails: {e}"));
                    if matches!(e, LedgerError::Fenced(_))
                        && !self.bookies.iter().any(|b| b.fenced)
                        && self.meta.state == LedgerState::Open
                    {
                        self.violation(format!("the writer failed with {e} but nobody fenced"));
                    }
                    self.writer.error = Some(e);
                }
            }
        }
    }

    fn on_acked(&mut self, entry_id: u64) {
        self.t(|| format!("writer ACKS e{entry_id}"));
        let expected = self.writer.acked.len() as u64;
        if entry_id != expected {
            self.violation(format!(
                "(5) acknowledged e{entry_id} when e{expected} was next (acks so far {:?})",
                self.writer.acked
            ));
        }
        if entry_id >= self.writer.appended as u64 {
            self.violation(format!("(5) acknowledged e{entry_id}, never appended"));
        }
        // AllAckedEntriesAreReadable, at the moment of the acknowledgement.
        let copies = self.copies(&self.meta, entry_id);
        if copies < self.p.qa {
            self.violation(format!(
                "(2) e{entry_id} acknowledged with {copies} copies in its write set {:?} (Qa {})",
                self.meta.write_set(entry_id),
                self.p.qa
            ));
        }
        self.writer.acked.push(entry_id);
    }

    /// Bookies of `entry_id`'s write set in `meta` that hold the writer's body for it.
    fn copies(&self, meta: &LedgerMetadata, entry_id: u64) -> usize {
        let Some(body) = self.writer.bodies.get(&entry_id) else {
            return 0;
        };
        meta.write_set(entry_id)
            .into_iter()
            .filter(|name| {
                self.names
                    .iter()
                    .position(|n| n == name)
                    .is_some_and(|b| self.bookies[b].entries.get(&entry_id) == Some(body))
            })
            .count()
    }

    /// Carries out a `ChangeEnsemble`: picks replacements (or finds none) and CASes.
    fn writer_change(&mut self, ch: EnsembleChange) -> Vec<WriteOutput> {
        self.t(|| {
            format!(
                "writer wants to replace positions {:?} of {:?} from e{}",
                ch.replace, ch.ensemble, ch.first_entry
            )
        });
        if self.writer.closing {
            return Vec::new(); // the writer is done; its close decides
        }
        if !matches!(self.writer.meta_op, WMeta::None) {
            self.violation(format!(
                "a second ensemble change was requested while {:?} is in flight",
                self.writer.meta_op
            ));
            return Vec::new();
        }
        let lac = self.writer.core.lac();
        if ch.first_entry as i64 != lac + 1 {
            self.violation(format!(
                "an ensemble change from e{} with LAC {lac}",
                ch.first_entry
            ));
        }
        if !self.heal && self.rng.random_bool(0.01) {
            return self
                .writer
                .core
                .on_change_failed(ChangeFailure::Error(LedgerError::Timeout(
                    "metadata store unavailable".into(),
                )));
        }
        // Spares: bookies outside the ensemble that are up (the registry may be stale and
        // offer a crashed one now and then).
        let mut candidates: Vec<String> = self
            .names
            .iter()
            .enumerate()
            .filter(|(i, n)| {
                !ch.ensemble.contains(n) && (self.bookies[*i].up || self.rng.random_bool(0.1))
            })
            .map(|(_, n)| n.clone())
            .collect();
        let unlucky =
            !self.heal && self.p.p_nospare > 0.0 && self.rng.random_bool(self.p.p_nospare);
        if candidates.len() < ch.replace.len() || unlucky {
            self.stats.no_spare += 1;
            self.t(|| "  no spare bookie".into());
            return self
                .writer
                .core
                .on_change_failed(ChangeFailure::NoSpare("no spare bookie".into()));
        }
        let mut replacements = Vec::new();
        for pos in &ch.replace {
            let b = candidates.remove(self.rng.random_range(0..candidates.len()));
            replacements.push((*pos, b));
        }
        let proposed = self.writer.core.propose(&replacements);
        let expected = self.writer.core.version();
        self.writer.meta_op = WMeta::Change(proposed.clone());
        self.send(Msg::MetaCas {
            from: Actor::Writer,
            meta: Box::new(proposed),
            expected,
        });
        Vec::new()
    }

    fn writer_cas_done(&mut self, result: CasResult) {
        if !self.writer.alive {
            return;
        }
        let op = std::mem::replace(&mut self.writer.meta_op, WMeta::None);
        let outs = match (op, result) {
            (WMeta::Change(p), CasResult::Ok(v)) => self.writer.core.on_ensemble_changed(p, v),
            (WMeta::Change(_), CasResult::Conflict(cur, v)) => {
                self.writer.core.on_change_conflict(*cur, v)
            }
            (WMeta::Change(p), CasResult::Unknown) => {
                self.writer.meta_op = WMeta::ChangeResolving(p);
                self.send(Msg::MetaRead {
                    from: Actor::Writer,
                });
                Vec::new()
            }
            (WMeta::Close(p), CasResult::Ok(v)) => {
                self.writer.core.on_closed(p, v);
                self.writer.closed = true;
                Vec::new()
            }
            (WMeta::Close(_), CasResult::Conflict(cur, v)) => {
                self.writer_close_resolved(*cur, v);
                Vec::new()
            }
            (WMeta::Close(_), CasResult::Unknown) => {
                self.writer.meta_op = WMeta::CloseResolving;
                self.send(Msg::MetaRead {
                    from: Actor::Writer,
                });
                Vec::new()
            }
            (op, r) => {
                self.violation(format!("writer got CAS result {r:?} while {op:?}"));
                Vec::new()
            }
        };
        self.writer_outputs(outs);
    }

    fn writer_close_resolved(&mut self, cur: LedgerMetadata, v: u64) {
        if cur.state == LedgerState::Closed && cur.last_entry_id == self.writer.core.lac() {
            self.writer.core.on_closed(cur, v);
            self.writer.closed = true;
        } else {
            self.t(|| "writer's close lost: it stops".into());
            self.writer.stopped = true;
        }
    }

    fn writer_meta_read(&mut self, cur: LedgerMetadata, v: u64) {
        if !self.writer.alive {
            return;
        }
        let op = std::mem::replace(&mut self.writer.meta_op, WMeta::None);
        let outs = match op {
            WMeta::ChangeResolving(p) if p == cur => self.writer.core.on_ensemble_changed(cur, v),
            WMeta::ChangeResolving(_) => self.writer.core.on_change_conflict(cur, v),
            WMeta::CloseResolving => {
                self.writer_close_resolved(cur, v);
                Vec::new()
            }
            op => {
                self.violation(format!("writer got a metadata read while {op:?}"));
                Vec::new()
            }
        };
        self.writer_outputs(outs);
    }

    // ---------------------------------------------------------------- the recoveries' driver

    fn rec_start(&mut self, i: usize) {
        let r = &mut self.recs[i];
        r.attempt += 1;
        r.state = RState::ReadMeta;
        r.healthy = self.heal;
        let att = r.attempt;
        self.t(|| format!("recovery {i} attempt {att} reads the metadata"));
        self.send(Msg::MetaRead {
            from: Actor::Rec(i, att),
        });
    }

    /// Starts over after a lost CAS answer or a lost race (bounded).
    fn rec_restart(&mut self, i: usize) {
        self.recs[i].restarts += 1;
        if self.recs[i].restarts > MAX_RESTARTS {
            self.t(|| format!("recovery {i} gives up"));
            self.recs[i].state = RState::GaveUp;
            return;
        }
        self.rec_start(i);
    }

    fn rec_retry(&mut self, i: usize) {
        // The operator restarts a crashed bookie now and then before retrying.
        if self.rng.random_bool(0.5) {
            self.restart_one();
        }
        self.rec_start(i);
    }

    fn current(&self, i: usize, att: u32) -> bool {
        self.recs.get(i).is_some_and(|r| r.attempt == att)
    }

    fn rec_meta_read(&mut self, i: usize, att: u32, cur: LedgerMetadata, version: u64) {
        if !self.current(i, att) || !matches!(self.recs[i].state, RState::ReadMeta) {
            return;
        }
        if cur.state == LedgerState::Closed {
            self.rec_done(i, cur.last_entry_id, false);
            return;
        }
        let mut proposed = cur;
        if let Err(e) = proposed.transition(LedgerState::InRecovery) {
            self.violation(format!("recovery {i}: {e}"));
            return;
        }
        self.recs[i].state = RState::TakeOver(proposed.clone());
        self.send(Msg::MetaCas {
            from: Actor::Rec(i, att),
            meta: Box::new(proposed),
            expected: version,
        });
    }

    fn rec_done(&mut self, i: usize, last: i64, closed_it: bool) {
        self.t(|| format!("recovery {i} completes: last entry {last} (closed it: {closed_it})"));
        let r = &mut self.recs[i];
        r.state = RState::Done;
        r.result = Some(last);
        r.closed_it = closed_it;
    }

    fn rec_cas_done(&mut self, i: usize, att: u32, result: CasResult) {
        if !self.current(i, att) {
            return;
        }
        let state = std::mem::replace(&mut self.recs[i].state, RState::GaveUp);
        match (state, result) {
            (RState::TakeOver(meta), CasResult::Ok(version)) => {
                let core = RecoveryCore::new(LEDGER, meta.clone());
                let outs = core.start();
                self.recs[i].state = RState::Running {
                    core: Box::new(core),
                    meta,
                    version,
                };
                self.rec_outputs(i, att, outs);
            }
            (RState::TakeOver(_) | RState::Closing(_), CasResult::Conflict(cur, _))
                if cur.state == LedgerState::Closed =>
            {
                self.rec_done(i, cur.last_entry_id, false)
            }
            (RState::Closing(meta), CasResult::Ok(_)) => self.rec_done(i, meta.last_entry_id, true),
            (RState::TakeOver(_) | RState::Closing(_), _) => self.rec_restart(i),
            (state, r) => {
                self.recs[i].state = state;
                self.violation(format!("recovery {i} got an unexpected CAS result {r:?}"));
            }
        }
    }

    fn rec_answer(
        &mut self,
        i: usize,
        att: u32,
        f: impl FnOnce(&mut RecoveryCore) -> Vec<RecoveryOutput>,
    ) {
        if !self.current(i, att) {
            return;
        }
        let RState::Running { core, .. } = &mut self.recs[i].state else {
            return;
        };
        let outs = f(core);
        self.rec_outputs(i, att, outs);
    }

    fn rec_outputs(&mut self, i: usize, att: u32, outs: Vec<RecoveryOutput>) {
        let (meta, version) = match &self.recs[i].state {
            RState::Running { meta, version, .. } => (meta.clone(), *version),
            _ => return,
        };
        let from = Actor::Rec(i, att);
        for o in outs {
            match o {
                RecoveryOutput::Fence { bookie } => {
                    if let Some(b) = self.bookie_index(&bookie) {
                        self.send(Msg::Fence { from, bookie: b });
                    }
                }
                RecoveryOutput::Read {
                    bookie,
                    entry_id,
                    fence,
                } => {
                    if !meta.write_set(entry_id).contains(&bookie.as_str()) {
                        self.violation(format!(
                            "recovery {i} reads e{entry_id} from {bookie}, outside its write set"
                        ));
                    }
                    if let Some(b) = self.bookie_index(&bookie) {
                        self.send(Msg::Read {
                            from,
                            bookie: b,
                            entry_id,
                            fence,
                        });
                    }
                }
                RecoveryOutput::Write {
                    bookie,
                    entry_id,
                    body,
                } => {
                    let first = meta.ensembles.keys().next_back().copied().unwrap_or(0);
                    if entry_id < first {
                        self.violation(format!(
                            "(4) recovery {i} rewrites e{entry_id} of an earlier fragment (last starts at {first})"
                        ));
                    }
                    if !meta.write_set(entry_id).contains(&bookie.as_str()) {
                        self.violation(format!(
                            "(4) recovery {i} writes e{entry_id} to {bookie}, outside its write set"
                        ));
                    }
                    self.stats.recovery_writes += 1;
                    if let Some(b) = self.bookie_index(&bookie) {
                        self.send(Msg::Add {
                            from,
                            bookie: b,
                            entry_id,
                            body,
                            recovery: true,
                        });
                    }
                }
                RecoveryOutput::Close {
                    last_entry_id,
                    length,
                } => {
                    let (mut last, mut length) = (last_entry_id, length);
                    if self.opts.truncate_close && last >= 0 {
                        // The deliberately broken recovery: one entry short.
                        let dropped = self
                            .writer
                            .payloads
                            .get(last as usize)
                            .map_or(0, |p| p.len() as u64);
                        last -= 1;
                        length = length.saturating_sub(dropped);
                    }
                    self.t(|| format!("recovery {i} closes at {last} length {length}"));
                    let mut proposed = meta.clone();
                    if let Err(e) = proposed.close(last, length) {
                        self.violation(format!("recovery {i} cannot close: {e}"));
                        return;
                    }
                    self.recs[i].state = RState::Closing(proposed.clone());
                    self.send(Msg::MetaCas {
                        from,
                        meta: Box::new(proposed),
                        expected: version,
                    });
                }
                RecoveryOutput::Failed(e) => {
                    self.t(|| format!("recovery {i} fails: {e}"));
                    if self.recs[i].healthy {
                        // Every bookie is up and no message is lost: nothing excuses it.
                        self.violation(format!(
                            "(liveness) recovery {i} failed although every bookie answers: {e}"
                        ));
                        self.recs[i].state = RState::GaveUp;
                    } else if matches!(e, LedgerError::RecoveryIncomplete(..)) {
                        self.stats.recovery_incomplete += 1;
                        self.incomplete += 1;
                        self.recs[i].state = RState::WaitRetry;
                        if self.incomplete >= HEAL_AFTER_FAILURES {
                            self.enter_heal("recoveries keep failing");
                        }
                    } else {
                        self.violation(format!("recovery {i} failed unexpectedly: {e}"));
                        self.recs[i].state = RState::GaveUp;
                    }
                }
            }
        }
    }

    // ---------------------------------------------------------------- the checker

    fn check(&mut self) {
        let m = self.meta.clone();
        if m.state != LedgerState::Closed {
            self.violation(format!(
                "(liveness) the schedule ended with the ledger {:?}",
                m.state
            ));
            return;
        }
        if let Err(e) = m.validate() {
            self.violation(format!("(4) final metadata invalid: {e}"));
        }
        let last = m.last_entry_id;
        // (1) NoDivergenceBetweenClientAndMetaData.
        if let Some(&a) = self.writer.acked.last()
            && a as i64 > last
        {
            self.violation(format!(
                "(1) e{a} was acknowledged to the writer but the ledger closed at {last}"
            ));
        }
        // (5) acknowledgements in order, once each.
        if self
            .writer
            .acked
            .iter()
            .enumerate()
            .any(|(i, a)| *a != i as u64)
        {
            self.violation(format!(
                "(5) acknowledgements out of order: {:?}",
                self.writer.acked
            ));
        }
        // (2) every entry up to the end: the writer's body on Qa bookies of its write set.
        let mut length = 0u64;
        for e in 0..=last.max(-1) {
            let e = e as u64;
            let Some(body) = self.writer.bodies.get(&e).cloned() else {
                self.violation(format!(
                    "(2) the ledger closed at {last} includes e{e}, which the writer never sent"
                ));
                break;
            };
            let copies = self.copies(&m, e);
            if copies < self.p.qa {
                self.violation(format!(
                    "(2) e{e} <= last {last} has {copies} copies in its write set {:?}, Qa is {}",
                    m.write_set(e),
                    self.p.qa
                ));
            }
            let payload = &self.writer.payloads[e as usize];
            length += payload.len() as u64;
            match entry::decode(&body) {
                Ok((h, p))
                    if h.ledger_id == LEDGER
                        && h.entry_id == e
                        && h.length == length
                        && p[..] == payload[..] => {}
                other => self.violation(format!(
                    "(2) the writer's body for e{e} does not decode to its payload: {other:?}"
                )),
            }
        }
        // (6) the length.
        if m.length != length {
            self.violation(format!(
                "(6) closed length {} but entries 0..={last} hold {length} bytes",
                m.length
            ));
        }
        let mut found = Vec::new();
        // (3) every recovery that completed agrees with the metadata.
        for (i, r) in self.recs.iter().enumerate() {
            if let Some(x) = r.result
                && x != last
            {
                found.push(format!(
                    "(3) recovery {i} reported last entry {x}, the ledger closed at {last}"
                ));
            }
        }
        // NoOutOfOrderEntries and NoDirtyReads, on every bookie.
        let max_acked = self.writer.acked.last().map_or(-1, |a| *a as i64);
        for (b, bk) in self.bookies.iter().enumerate() {
            for (e, body) in &bk.entries {
                if self.writer.bodies.get(e) != Some(body) {
                    found.push(format!(
                        "(2) b{b} holds a body for e{e} that the writer did not produce"
                    ));
                }
            }
            if bk.lac > max_acked {
                found.push(format!(
                    "(4) b{b} has LAC {} but only 0..={max_acked} were acknowledged",
                    bk.lac
                ));
            }
        }
        for v in found {
            self.violation(v);
        }
        if matches!(self.writer.error, Some(LedgerError::Unauthorized(_))) {
            self.violation("the writer failed with Unauthorized (keys are not modelled)".into());
        }
    }
}

/// The TLA+ spec's scenario, scripted: the fence to one bookie is lost, the recovery decides
/// that entry 0 is absent from two "no such entry" answers, and only then does the old writer's
/// add of entry 0 reach the bookie that missed the fence. The recovery's fencing read must have
/// fenced it, or the writer would see entry 0 acknowledged in a ledger closed at -1.
#[test]
fn a_fencing_read_stops_a_late_add_after_a_lost_fence() {
    let names: Vec<String> = (0..3).map(|i| format!("b{i}")).collect();
    let meta = LedgerMetadata::new(
        names.clone(),
        3,
        2,
        DigestType::Crc32c,
        vec![],
        vec![],
        BTreeMap::new(),
    )
    .expect("valid");
    let mut bookies = vec![
        Bookie {
            up: true,
            lac: -1,
            ..Bookie::default()
        };
        3
    ];
    let mut writer = WriteCore::new(LEDGER, meta.clone(), 1);
    let (_, sends) = writer
        .append(b"acknowledged?")
        .expect("a fresh writer appends");
    let mut adds = BTreeMap::new();
    for o in sends {
        if let WriteOutput::Send { bookie, body, .. } = o {
            adds.insert(bookie, body);
        }
    }
    // b2 stores entry 0 and acknowledges it; the adds to b0 and b1 are slow.
    bookies[2].entries.insert(0, adds["b2"].clone());
    assert!(writer.on_add_result("b2", 0, AddOutcome::Ok).is_empty());

    let mut in_recovery = meta;
    in_recovery
        .transition(LedgerState::InRecovery)
        .expect("OPEN -> IN_RECOVERY");
    let mut rec = RecoveryCore::new(LEDGER, in_recovery);
    assert_eq!(rec.start().len(), 3);
    bookies[0].fenced = true;
    assert!(rec.on_fence("b0", FenceOutcome::Ok { lac: -1 }).is_empty());
    // The fence to b1 is lost; b2's fence answer makes the coverage.
    let reads = rec.on_fence("b2", FenceOutcome::Ok { lac: -1 });
    bookies[2].fenced = true;
    let mut close = Vec::new();
    for o in reads {
        let RecoveryOutput::Read {
            bookie,
            entry_id: 0,
            fence,
        } = o
        else {
            panic!("expected reads of entry 0, got {o:?}");
        };
        if bookie == "b2" {
            continue; // its answer (Found) is slow
        }
        let b = &mut bookies[names.iter().position(|n| *n == bookie).expect("known")];
        if fence {
            b.fenced = true;
        }
        assert!(!b.entries.contains_key(&0));
        close = rec.on_read(&bookie, 0, ReadOutcome::Missing);
    }
    assert_eq!(
        close,
        vec![RecoveryOutput::Close {
            last_entry_id: -1,
            length: 0
        }]
    );
    // Now the old writer's add reaches b1: it must be refused.
    let answer = if bookies[1].fenced {
        AddOutcome::Fenced
    } else {
        bookies[1].entries.insert(0, adds["b1"].clone());
        AddOutcome::Ok
    };
    let outs = writer.on_add_result("b1", 0, answer);
    assert!(
        !outs.contains(&WriteOutput::Acked { entry_id: 0 }),
        "entry 0 was acknowledged but the recovery closed the ledger at -1"
    );
}

fn run_seed(seed: u64, opts: Options) -> (Result<(), String>, Stats, Vec<String>) {
    Sim::new(seed, opts).run()
}

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.trim().parse().ok())
}

#[test]
fn simulation_keeps_the_ledger_contract() {
    let only = env_u64("QUIRE_SIM_SEED");
    let start = only.unwrap_or(0);
    let count =
        env_u64("QUIRE_SIM_SEEDS").unwrap_or(if only.is_some() { 1 } else { DEFAULT_SEEDS });
    let opts = Options {
        truncate_close: false,
        trace: only.is_some() && count == 1,
    };
    // QUIRE_SIM_KEEP_GOING=1: run every seed and list all failing ones (for triage).
    let keep_going = std::env::var_os("QUIRE_SIM_KEEP_GOING").is_some();
    let began = Instant::now();
    let mut total = Stats::default();
    let mut failed = Vec::new();
    for seed in start..start + count {
        let (result, stats, trace) = run_seed(seed, opts);
        if opts.trace {
            for line in &trace {
                eprintln!("{line}");
            }
        }
        total.add(&stats);
        if let Err(e) = result {
            let msg = format!(
                "simulation seed {seed} broke the ledger contract:\n{e}\n\
                 replay with QUIRE_SIM_SEED={seed} cargo test -p quire-ledger-client --test simulation -- --nocapture"
            );
            if !keep_going {
                panic!("{msg}");
            }
            eprintln!("{msg}");
            failed.push(seed);
        }
    }
    eprintln!(
        "simulation: {count} schedules from seed {start} in {:.1?}: {total:?}",
        began.elapsed()
    );
    assert!(failed.is_empty(), "failing seeds: {failed:?}");
    if only.is_none() && count >= 1000 {
        // The schedules must actually exercise the interesting paths.
        assert!(total.writer_fenced > count / 20, "{total:?}");
        assert!(total.ensemble_changes > count / 10, "{total:?}");
        assert!(total.no_spare > 0 && total.takeovers > 0, "{total:?}");
        assert!(
            total.recovery_incomplete > 0 && total.closed_nonempty > count / 4,
            "{total:?}"
        );
        assert!(
            total.writer_closed > 0 && total.recoveries_accepting > 0,
            "{total:?}"
        );
        assert!(
            total.late_adds_after_missing > 0
                && total.multi_fragment > 0
                && total.closed_past_acked > 0,
            "{total:?}"
        );
    }
}

/// The checker is not vacuous: a recovery that closes one entry early is caught.
#[test]
fn the_checker_catches_a_recovery_that_closes_one_entry_early() {
    let opts = Options {
        truncate_close: true,
        trace: false,
    };
    let mut caught = Vec::new();
    for seed in 0..300 {
        if let (Err(e), _, _) = run_seed(seed, opts) {
            caught.push((seed, e));
        }
    }
    assert!(
        caught.iter().any(|(_, e)| e.contains("(1)")),
        "the truncating recovery went unnoticed on every seed"
    );
    assert!(
        caught.len() > 30,
        "only {} of 300 seeds caught the truncation",
        caught.len()
    );
    eprintln!(
        "the truncating recovery was caught on {} of 300 seeds, first: seed {} ({})",
        caught.len(),
        caught[0].0,
        caught[0].1.lines().next().unwrap_or_default()
    );
}
