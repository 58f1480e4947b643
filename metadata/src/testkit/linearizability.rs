//! A linearizability checker for histories of operations on one register: the value of a single
//! key, modelled as absent or `(value, version)` with `value: u64` (see [`encode_value`]).
//!
//! Record every operation with [`History::invoke`] just before sending it and
//! [`History::complete`] as soon as its answer arrives (wrap the history in a `Mutex` when several
//! tasks share it), then call [`History::check`].
//!
//! Outcomes:
//! - a definite answer ([`Outcome::Read`], [`Outcome::Created`], [`Outcome::CasOk`], ...) must be
//!   explained by a linearization point between invocation and completion;
//! - [`Outcome::Unknown`] (a timeout, `Ambiguous`, a lost connection, or no completion at all):
//!   the operation may have taken effect at any instant after its invocation, or never;
//! - [`Outcome::Aborted`] (`Unavailable`, `InvalidArgument`, ...): it certainly did nothing and
//!   observed nothing, so it is left out.
//!
//! The search is Wing & Gong's, with Lowe's just-in-time linearization and the memoization of
//! Knossos and Porcupine: events sorted by time in a doubly linked list; the first pending call
//! whose model step succeeds is linearized and lifted out of the list; reaching a completion that
//! was not linearized yet backtracks; a (linearized set, state) pair already explored is skipped.
//! Refinements, each of which keeps the search exact (no false verdicts either way):
//! - an operation that leaves the register unchanged (a read, a failed CAS) is placed as soon as
//!   it can be, and never tried later;
//! - an `Unknown` operation is only placed where it changes the register (anywhere else, or
//!   never, is the same thing), and after the known candidates;
//! - a configuration is skipped when one visited before had the same known operations placed,
//!   the same register, and a subset of the `Unknown` ones applied (applying one only removes
//!   options); identical `Unknown` operations count as interchangeable, and once no delete is
//!   left, those that can never apply again (CAS from a passed version) are forgotten;
//! - the memo key stores the linearized set compactly: the first operation not yet linearized
//!   plus the bits of the few after it that could have been (those invoked before it completed).
//!
//! Passing histories take about one step per operation. Refuting a history may be exponential in
//! the number of `Unknown` operations that stay able to apply (deletes in the workload keep every
//! CAS alive); [`History::check`] therefore gives up after a step budget, with an `Err` that
//! starts with "inconclusive". A definite failure starts with "not linearizable".

use std::collections::HashMap;
use std::fmt;
use std::time::Instant;

use bytes::Bytes;

use crate::store::{KeyValue, MetaError};

/// Who issued an operation; only used in reports.
pub type ClientId = u64;

/// The register: `None` when the key is absent, else `(value, version)`.
pub type State = Option<(u64, u64)>;

/// An operation on the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Op {
    /// `get`.
    Read,
    /// `create`: sets `(value, 1)` if the key is absent.
    Create { value: u64 },
    /// `compare_and_set`: sets `(new_value, version + 1)` if the key is at `expected_version`.
    Cas {
        expected_version: u64,
        new_value: u64,
    },
    /// `delete`: removes the key if present (and at `expected_version` when given).
    Delete { expected_version: Option<u64> },
}

/// What the client learnt about an operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A read returned this: `None` for a missing key, else `(value, version)`.
    Read(State),
    /// A create took effect (the key is now at version 1).
    Created,
    /// A create found the key present.
    AlreadyExists,
    /// A compare-and-set took effect, producing this version.
    CasOk { new_version: u64 },
    /// A delete took effect.
    Deleted,
    /// A compare-and-set or delete definitely did not apply: `BadVersion` or `NotFound`.
    Failed,
    /// The operation may or may not have taken effect, at any time after its invocation.
    Unknown,
    /// The operation certainly did not take effect and observed nothing; it is ignored.
    Aborted,
}

impl Outcome {
    /// Maps an error that carries no definite answer: `Unavailable` and the argument errors did
    /// nothing; anything else (`Ambiguous`, `Storage`, `Internal`) may have taken effect.
    fn of_error(e: &MetaError) -> Outcome {
        match e {
            MetaError::Unavailable(_)
            | MetaError::InvalidArgument(_)
            | MetaError::TooLarge(_)
            | MetaError::LeaseNotFound(_) => Outcome::Aborted,
            _ => Outcome::Unknown,
        }
    }

    /// The outcome of `get`; values must have been written with [`encode_value`].
    pub fn of_get(r: &Result<Option<KeyValue>, MetaError>) -> Outcome {
        match r {
            Ok(kv) => Outcome::Read(kv.as_ref().map(|kv| (decode_value(&kv.value), kv.version))),
            Err(MetaError::NotFound(_)) => Outcome::Read(None),
            Err(e) => match Outcome::of_error(e) {
                // A read that failed observed nothing, whether or not it reached the store.
                Outcome::Unknown => Outcome::Aborted,
                o => o,
            },
        }
    }

    /// The outcome of `create`.
    pub fn of_create(r: &Result<KeyValue, MetaError>) -> Outcome {
        match r {
            Ok(_) => Outcome::Created,
            Err(MetaError::AlreadyExists(_)) => Outcome::AlreadyExists,
            Err(e) => Outcome::of_error(e),
        }
    }

    /// The outcome of `compare_and_set`.
    pub fn of_cas(r: &Result<KeyValue, MetaError>) -> Outcome {
        match r {
            Ok(kv) => Outcome::CasOk {
                new_version: kv.version,
            },
            Err(MetaError::BadVersion { .. } | MetaError::NotFound(_)) => Outcome::Failed,
            Err(e) => Outcome::of_error(e),
        }
    }

    /// The outcome of `delete`.
    pub fn of_delete(r: &Result<(), MetaError>) -> Outcome {
        match r {
            Ok(()) => Outcome::Deleted,
            Err(MetaError::BadVersion { .. } | MetaError::NotFound(_)) => Outcome::Failed,
            Err(e) => Outcome::of_error(e),
        }
    }
}

/// The bytes stored for a register value: 8 bytes, big-endian.
pub fn encode_value(v: u64) -> Bytes {
    Bytes::copy_from_slice(&v.to_be_bytes())
}

/// Reads a value written by [`encode_value`]. Panics on anything else.
pub fn decode_value(b: &[u8]) -> u64 {
    let arr: [u8; 8] = b
        .try_into()
        .unwrap_or_else(|_| panic!("register value {b:?} is not an encoded u64"));
    u64::from_be_bytes(arr)
}

/// Handle of a recorded operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct OpId(usize);

#[derive(Clone, Debug)]
struct Record {
    client: ClientId,
    op: Op,
    /// Nanoseconds since the history began.
    invoke: u64,
    complete: Option<u64>,
    outcome: Outcome,
}

/// A recorded concurrent history of operations on one register.
#[derive(Clone, Debug)]
pub struct History {
    start: Instant,
    initial: State,
    records: Vec<Record>,
}

impl Default for History {
    fn default() -> Self {
        History::new()
    }
}

impl History {
    /// An empty history of a register that starts absent.
    pub fn new() -> History {
        History::with_initial(None)
    }

    /// An empty history of a register that starts in `initial`.
    pub fn with_initial(initial: State) -> History {
        History {
            start: Instant::now(),
            initial,
            records: Vec::new(),
        }
    }

    fn now(&self) -> u64 {
        u64::try_from(self.start.elapsed().as_nanos()).unwrap_or(u64::MAX - 1)
    }

    /// Records that `client` is about to send `op`; call it before sending.
    pub fn invoke(&mut self, client: ClientId, op: Op) -> OpId {
        let now = self.now();
        self.invoke_at(client, op, now)
    }

    /// Records an invocation at an explicit time (nanoseconds on any clock shared by the whole
    /// history).
    pub fn invoke_at(&mut self, client: ClientId, op: Op, at: u64) -> OpId {
        assert!(at < u64::MAX, "invocation time u64::MAX is reserved");
        self.records.push(Record {
            client,
            op,
            invoke: at,
            complete: None,
            outcome: Outcome::Unknown,
        });
        OpId(self.records.len() - 1)
    }

    /// Records the answer to an operation; call it as soon as the answer arrives. An operation
    /// never completed counts as [`Outcome::Unknown`].
    pub fn complete(&mut self, id: OpId, outcome: Outcome) {
        let now = self.now();
        self.complete_at(id, outcome, now);
    }

    /// Records an answer at an explicit time.
    pub fn complete_at(&mut self, id: OpId, outcome: Outcome, at: u64) {
        let r = &mut self.records[id.0];
        assert!(r.complete.is_none(), "op#{} completed twice", id.0);
        assert!(
            at >= r.invoke,
            "op#{} completed at {at} before its invocation at {}",
            id.0,
            r.invoke
        );
        r.complete = Some(at);
        r.outcome = outcome;
    }

    /// Number of recorded operations.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Whether some order of the operations, each placed between its invocation and completion
    /// (or anywhere after its invocation, or nowhere, for `Unknown` ones), explains every outcome
    /// in a sequential register. `Err` describes where the search got stuck.
    ///
    /// The search is exponential in the worst case: a failing history with many `Unknown`
    /// operations that could still apply (deletes in the workload keep every CAS alive) may take
    /// long to be refuted. It gives up after [`History::DEFAULT_BUDGET`] steps or 200 per
    /// operation, whichever is more, with an `Err` that says so; see [`History::check_within`].
    pub fn check(&self) -> Result<(), String> {
        let budget = Self::DEFAULT_BUDGET.max(200 * self.records.len() as u64);
        self.check_within(budget)
    }

    /// Steps [`History::check`] takes before it gives up (a step is one operation placed).
    pub const DEFAULT_BUDGET: u64 = 2_000_000;

    /// [`History::check`], giving up after `budget` steps with an `Err` that starts with
    /// "inconclusive".
    pub fn check_within(&self, budget: u64) -> Result<(), String> {
        for (i, r) in self.records.iter().enumerate() {
            if !fits(r.op, r.outcome) {
                return Err(format!(
                    "op#{i} (client {}): outcome {:?} does not answer {:?}",
                    r.client, r.outcome, r.op
                ));
            }
        }
        Checker::new(self).run(budget)
    }
}

/// Whether an outcome is a possible answer to an operation.
fn fits(op: Op, outcome: Outcome) -> bool {
    matches!(
        (op, outcome),
        (_, Outcome::Unknown | Outcome::Aborted)
            | (Op::Read, Outcome::Read(_))
            | (Op::Create { .. }, Outcome::Created | Outcome::AlreadyExists)
            | (Op::Cas { .. }, Outcome::CasOk { .. } | Outcome::Failed)
            | (Op::Delete { .. }, Outcome::Deleted | Outcome::Failed)
    )
}

/// The sequential register: the state after `op` answered `outcome`, or `None` if it cannot
/// answer that in `state`. `Unknown` takes whichever answer the state gives.
fn step(state: State, op: Op, outcome: Outcome) -> Option<State> {
    let unknown = outcome == Outcome::Unknown;
    match op {
        Op::Read => (outcome == Outcome::Read(state)).then_some(state),
        Op::Create { value } => match state {
            None if unknown || outcome == Outcome::Created => Some(Some((value, 1))),
            Some(_) if unknown || outcome == Outcome::AlreadyExists => Some(state),
            _ => None,
        },
        Op::Cas {
            expected_version,
            new_value,
        } => match state {
            Some((_, v)) if v == expected_version => {
                let ok = unknown || outcome == Outcome::CasOk { new_version: v + 1 };
                ok.then_some(Some((new_value, v + 1)))
            }
            _ => (unknown || outcome == Outcome::Failed).then_some(state),
        },
        Op::Delete { expected_version } => match state {
            Some((_, v)) if expected_version.is_none_or(|e| e == v) => {
                (unknown || outcome == Outcome::Deleted).then_some(None)
            }
            _ => (unknown || outcome == Outcome::Failed).then_some(state),
        },
    }
}

/// Records a configuration about to be explored; false if it need not be.
///
/// Applying more `Unknown` operations only removes options (each may always be left out), so a
/// configuration is covered by one visited before with the same known operations and state and a
/// subset of its `Unknown` operations: that one either failed already, or is an ancestor of this
/// one in the search, which reaches everything reachable from here by other branches.
fn remember(
    cache: &mut HashMap<Vec<u64>, Vec<Box<[u64]>>>,
    key: Vec<u64>,
    unknown: &[u64],
) -> bool {
    let seen = cache.entry(key).or_default();
    let subset = |a: &[u64], b: &[u64]| a.iter().zip(b).all(|(x, y)| x & !y == 0);
    if seen.iter().any(|u| subset(u, unknown)) {
        return false;
    }
    seen.retain(|u| !subset(unknown, u));
    seen.push(unknown.into());
    true
}

fn fmt_state(s: State) -> String {
    match s {
        None => "absent".to_string(),
        Some((value, version)) => format!("{value}@v{version}"),
    }
}

/// One operation taking part in the search.
struct COp {
    record: usize,
    op: Op,
    outcome: Outcome,
}

const NIL: usize = usize::MAX;

/// A search frame: the choice made and what it replaced.
struct Frame {
    /// The call entry linearized.
    call: usize,
    state: State,
    low: usize,
    /// The operation left the state unchanged, so no other choice is tried here.
    forced: bool,
    /// The completion that bounded the scan of `Unknown` calls, when the choice was one of them.
    blocking: usize,
}

struct Checker<'a> {
    history: &'a History,
    /// Operations with a definite outcome, by invocation time, then those with `Unknown`.
    ops: Vec<COp>,
    known: usize,
    /// For known op `i`: how many known ops were invoked no later than `i` completed.
    limit: Vec<usize>,
    /// List entries: (op index, is_call, time). Entries `0..main` hold the calls and completions of
    /// the known operations by time; the rest the calls of the `Unknown` ones by time. The two
    /// lists start at the sentinels `entries.len()` and `entries.len() + 1`.
    entries: Vec<(usize, bool, u64)>,
    /// For a call entry of a known op, the entry of its completion.
    ret_of: Vec<usize>,
    next: Vec<usize>,
    prev: Vec<usize>,
}

impl<'a> Checker<'a> {
    fn new(history: &'a History) -> Checker<'a> {
        let mut known = Vec::new();
        let mut unknown = Vec::new();
        for (i, r) in history.records.iter().enumerate() {
            let outcome = if r.complete.is_none() {
                Outcome::Unknown
            } else {
                r.outcome
            };
            let c = COp {
                record: i,
                op: r.op,
                outcome,
            };
            match (outcome, r.op) {
                (Outcome::Aborted, _) | (Outcome::Unknown, Op::Read) => {}
                (Outcome::Unknown, _) => unknown.push(c),
                _ => known.push(c),
            }
        }
        let invoke = |c: &COp| history.records[c.record].invoke;
        known.sort_by_key(|c| (invoke(c), c.record));
        unknown.sort_by_key(|c| (invoke(c), c.record));
        let n_known = known.len();
        let invokes: Vec<u64> = known.iter().map(invoke).collect();
        let limit = known
            .iter()
            .map(|c| {
                let done = history.records[c.record].complete.unwrap_or(u64::MAX);
                invokes.partition_point(|&t| t <= done)
            })
            .collect();
        let mut ops = known;
        ops.extend(unknown);

        // Known events by time; at equal times calls come first (the operations count as
        // concurrent).
        let mut events: Vec<(u64, bool, usize)> = Vec::new();
        for (i, c) in ops.iter().enumerate().take(n_known) {
            let r = &history.records[c.record];
            events.push((r.invoke, false, i));
            events.push((r.complete.unwrap_or(u64::MAX), true, i));
        }
        events.sort_unstable();
        let main = events.len();
        let mut entries: Vec<(usize, bool, u64)> =
            events.iter().map(|&(t, ret, i)| (i, !ret, t)).collect();
        entries.extend((n_known..ops.len()).map(|i| (i, true, invoke(&ops[i]))));
        let m = entries.len();
        let mut call_entry = vec![NIL; ops.len()];
        let mut ret_of = vec![NIL; m];
        for (e, &(i, is_call, _)) in entries.iter().enumerate().take(main) {
            if is_call {
                call_entry[i] = e;
            } else {
                ret_of[call_entry[i]] = e;
            }
        }
        let mut next = vec![NIL; m + 2];
        let mut prev = vec![NIL; m + 2];
        for (head, range) in [(m, 0..main), (m + 1, main..m)] {
            let mut last = head;
            for e in range {
                next[last] = e;
                prev[e] = last;
                last = e;
            }
        }
        Checker {
            history,
            ops,
            known: n_known,
            limit,
            entries,
            ret_of,
            next,
            prev,
        }
    }

    fn unlink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = n;
        if n != NIL {
            self.prev[n] = p;
        }
    }

    fn relink(&mut self, e: usize) {
        let (p, n) = (self.prev[e], self.next[e]);
        self.next[p] = e;
        if n != NIL {
            self.prev[n] = e;
        }
    }

    fn lift(&mut self, call: usize) {
        self.unlink(call);
        let r = self.ret_of[call];
        if r != NIL {
            self.unlink(r);
        }
    }

    fn unlift(&mut self, call: usize) {
        let r = self.ret_of[call];
        if r != NIL {
            self.relink(r);
        }
        self.relink(call);
    }

    fn describe(&self, i: usize) -> String {
        let c = &self.ops[i];
        let r = &self.history.records[c.record];
        let done = match r.complete {
            Some(t) if c.outcome != Outcome::Unknown => format!("{:.6} ms", t as f64 / 1e6),
            _ => "never".to_string(),
        };
        format!(
            "op#{} (client {}: {:?} -> {:?}, invoked {:.6} ms, completed {done})",
            c.record,
            r.client,
            c.op,
            c.outcome,
            r.invoke as f64 / 1e6,
        )
    }

    fn run(mut self, budget: u64) -> Result<(), String> {
        let main_head = self.entries.len();
        let unknown_head = main_head + 1;
        let n_unknown = self.ops.len() - self.known;
        let known_words = self.known.div_ceil(64);
        let mut known_bits = vec![0u64; known_words];
        let mut low = 0usize;
        let mut remaining = self.known;
        let mut state = self.history.initial;
        let mut unknown = UnknownSet::new(self.ops[self.known..].iter().map(|c| c.op));
        let mut deletes_left = self
            .ops
            .iter()
            .filter(|c| matches!(c.op, Op::Delete { .. }))
            .count();
        let mut stack: Vec<Frame> = Vec::new();
        // Configurations visited: (known part, state) -> the sets of `Unknown` ops applied.
        let mut cache: HashMap<Vec<u64>, Vec<Box<[u64]>>> = HashMap::new();
        // Deepest point reached: (depth, blocking op, state there, pending calls before it).
        let mut stuck: Option<(usize, usize, State, Vec<usize>)> = None;

        // The candidates at a configuration: the known calls before the first pending
        // completion (`blocking`), then the `Unknown` calls invoked no later than it. Trying the
        // known ones first visits the configurations with the fewest `Unknown` ops applied
        // first, and those cover the rest (see `remember`).
        let mut entry = self.next[main_head];
        let mut blocking = NIL;
        let mut steps = 0u64;
        let mut gave_up = false;
        'search: loop {
            if remaining == 0 {
                return Ok(());
            }
            let mut exhausted = false;
            if blocking == NIL {
                assert!(entry != NIL, "checker: ran off the event list");
                if !self.entries[entry].1 {
                    blocking = entry;
                    entry = self.next[unknown_head];
                    continue;
                }
            } else if entry == NIL || self.entries[entry].2 > self.entries[blocking].2 {
                exhausted = true;
            }
            if !exhausted {
                let i = self.entries[entry].0;
                let c = &self.ops[i];
                let new_state = step(state, c.op, c.outcome)
                    .filter(|s| c.outcome != Outcome::Unknown || *s != state);
                let Some(new_state) = new_state else {
                    entry = self.next[entry];
                    continue;
                };
                // An operation that leaves the state as it is (a read, a failed CAS) and can go
                // here may as well go here: if any order from this point works, so does the
                // one with this operation first. So it is never tried elsewhere.
                let preserving = new_state == state;
                let is_delete = matches!(c.op, Op::Delete { .. });
                let old_low = low;
                if i < self.known {
                    known_bits[i / 64] |= 1 << (i % 64);
                    while low < self.known && known_bits[low / 64] & (1 << (low % 64)) != 0 {
                        low += 1;
                    }
                } else {
                    unknown.apply(i - self.known);
                }
                if is_delete {
                    deletes_left -= 1;
                }
                let hi = if low < self.known {
                    self.limit[low]
                } else {
                    self.known
                };
                let mut key = Vec::with_capacity(8);
                key.push(low as u64);
                match new_state {
                    None => key.extend([0, 0, 0]),
                    Some((v, ver)) => key.extend([1, v, ver]),
                }
                key.extend_from_slice(&known_bits[(low / 64).min(known_words)..hi.div_ceil(64)]);
                if remember(&mut cache, key, &unknown.live(new_state, deletes_left == 0)) {
                    steps += 1;
                    if steps > budget {
                        gave_up = true;
                        break 'search;
                    }
                    stack.push(Frame {
                        call: entry,
                        state,
                        low: old_low,
                        forced: preserving,
                        blocking,
                    });
                    state = new_state;
                    if i < self.known {
                        remaining -= 1;
                    }
                    self.lift(entry);
                    entry = self.next[main_head];
                    blocking = NIL;
                    continue;
                }
                // Explored before, without success.
                if i < self.known {
                    known_bits[i / 64] &= !(1 << (i % 64));
                } else {
                    unknown.unapply(i - self.known);
                }
                if is_delete {
                    deletes_left += 1;
                }
                low = old_low;
                if !preserving {
                    entry = self.next[entry];
                    continue;
                }
                // ... and by the argument above, neither can this point succeed.
            } else if stuck.as_ref().is_none_or(|s| stack.len() > s.0) {
                // The op completing at `blocking` cannot be placed before its completion.
                let mut pending = Vec::new();
                let mut e = self.next[main_head];
                while e != blocking && pending.len() < 8 {
                    if self.entries[e].1 {
                        pending.push(self.entries[e].0);
                    }
                    e = self.next[e];
                }
                stuck = Some((stack.len(), self.entries[blocking].0, state, pending));
            }
            // Backtrack: undo the last choice, and try the next candidate after it.
            loop {
                let Some(f) = stack.pop() else {
                    break 'search;
                };
                let j = self.entries[f.call].0;
                if j < self.known {
                    known_bits[j / 64] &= !(1 << (j % 64));
                    remaining += 1;
                } else {
                    unknown.unapply(j - self.known);
                }
                if matches!(self.ops[j].op, Op::Delete { .. }) {
                    deletes_left += 1;
                }
                state = f.state;
                low = f.low;
                self.unlift(f.call);
                if !f.forced {
                    entry = self.next[f.call];
                    blocking = f.blocking;
                    continue 'search;
                }
            }
        }

        let Some((depth, blocked, at, pending)) = stuck else {
            assert!(gave_up, "checker: failed without getting stuck");
            return Err(format!(
                "inconclusive: gave up after {budget} steps, before meeting any operation that \
                 could not be placed"
            ));
        };
        let verdict = if gave_up {
            format!("inconclusive: gave up after {budget} steps; the furthest the search got")
        } else {
            "not linearizable".to_string()
        };
        let mut msg = format!(
            "{verdict}: {} operations with a definite outcome, {} unknown; at best {depth} could \
             be ordered before {} had to be, with the register {} at that point",
            self.known,
            n_unknown,
            self.describe(blocked),
            fmt_state(at),
        );
        if pending.iter().any(|&p| p != blocked) {
            msg.push_str("; other candidates there:");
            for p in pending {
                if p != blocked {
                    msg.push_str("\n  ");
                    msg.push_str(&self.describe(p));
                }
            }
        }
        Err(msg)
    }
}

/// Which `Unknown` operations have been applied, up to what cannot matter any more.
///
/// Identical operations are interchangeable once invoked, and every one applied was invoked
/// before the current frontier; so only how many of each group were applied is recorded, as the
/// bits of the group's first members. And once no delete is left, versions only grow: a group
/// that can never apply again (a CAS from a version already passed, a create of a key that
/// exists) no longer counts.
struct UnknownSet {
    /// Per group: its operation, its first bit, how many of it have been applied.
    groups: Vec<(Op, usize, usize)>,
    /// Per `Unknown` op: its group.
    group_of: Vec<usize>,
    bits: Vec<u64>,
}

impl UnknownSet {
    fn new(ops: impl Iterator<Item = Op>) -> UnknownSet {
        let mut index: HashMap<Op, usize> = HashMap::new();
        let mut sizes: Vec<(Op, usize)> = Vec::new();
        let mut group_of = Vec::new();
        for op in ops {
            let g = *index.entry(op).or_insert_with(|| {
                sizes.push((op, 0));
                sizes.len() - 1
            });
            sizes[g].1 += 1;
            group_of.push(g);
        }
        let mut groups = Vec::with_capacity(sizes.len());
        let mut first = 0;
        for (op, size) in sizes {
            groups.push((op, first, 0));
            first += size;
        }
        UnknownSet {
            groups,
            group_of,
            bits: vec![0; first.div_ceil(64)],
        }
    }

    fn apply(&mut self, u: usize) {
        let g = &mut self.groups[self.group_of[u]];
        let b = g.1 + g.2;
        g.2 += 1;
        self.bits[b / 64] |= 1 << (b % 64);
    }

    fn unapply(&mut self, u: usize) {
        let g = &mut self.groups[self.group_of[u]];
        g.2 -= 1;
        let b = g.1 + g.2;
        self.bits[b / 64] &= !(1 << (b % 64));
    }

    /// The applied set, without the groups that can never apply again from `state`.
    fn live(&self, state: State, no_deletes_left: bool) -> Vec<u64> {
        let mut bits = self.bits.clone();
        if !no_deletes_left {
            return bits;
        }
        for &(op, first, applied) in &self.groups {
            // Versions start at 1 and, with no delete left, never go back.
            let dead = match (op, state) {
                (Op::Create { .. }, Some(_)) => true,
                (
                    Op::Cas {
                        expected_version: 0,
                        ..
                    },
                    _,
                ) => true,
                (
                    Op::Cas {
                        expected_version, ..
                    },
                    Some((_, v)),
                ) => v > expected_version,
                _ => false,
            };
            if dead {
                for b in first..first + applied {
                    bits[b / 64] &= !(1 << (b % 64));
                }
            }
        }
        bits
    }
}

impl fmt::Display for OpId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "op#{}", self.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    /// Records an operation spanning `[from, to]`.
    fn op(h: &mut History, client: ClientId, op: Op, from: u64, to: u64, out: Outcome) -> OpId {
        let id = h.invoke_at(client, op, from);
        h.complete_at(id, out, to);
        id
    }

    fn cas(expected_version: u64, new_value: u64) -> Op {
        Op::Cas {
            expected_version,
            new_value,
        }
    }

    fn cas_ok(new_version: u64) -> Outcome {
        Outcome::CasOk { new_version }
    }

    #[test]
    fn a_sequential_history_passes() {
        let mut h = History::new();
        op(&mut h, 1, Op::Read, 0, 1, Outcome::Read(None));
        op(&mut h, 1, Op::Create { value: 10 }, 2, 3, Outcome::Created);
        op(
            &mut h,
            2,
            Op::Create { value: 11 },
            4,
            5,
            Outcome::AlreadyExists,
        );
        op(&mut h, 1, Op::Read, 6, 7, Outcome::Read(Some((10, 1))));
        op(&mut h, 2, cas(1, 20), 8, 9, cas_ok(2));
        op(&mut h, 1, cas(1, 21), 10, 11, Outcome::Failed);
        op(&mut h, 1, Op::Read, 12, 13, Outcome::Read(Some((20, 2))));
        let del = Op::Delete {
            expected_version: Some(1),
        };
        op(&mut h, 2, del, 14, 15, Outcome::Failed);
        let del = Op::Delete {
            expected_version: Some(2),
        };
        op(&mut h, 2, del, 16, 17, Outcome::Deleted);
        op(&mut h, 1, cas(2, 22), 18, 19, Outcome::Failed);
        op(&mut h, 1, Op::Read, 20, 21, Outcome::Read(None));
        op(
            &mut h,
            1,
            Op::Create { value: 30 },
            22,
            23,
            Outcome::Created,
        );
        op(&mut h, 2, Op::Read, 24, 25, Outcome::Read(Some((30, 1))));
        assert_eq!(h.check(), Ok(()));
    }

    #[test]
    fn an_empty_history_passes() {
        assert_eq!(History::new().check(), Ok(()));
    }

    #[test]
    fn two_cas_from_the_same_version_cannot_both_succeed() {
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        op(&mut h, 1, cas(1, 2), 20, 30, cas_ok(2));
        op(&mut h, 2, cas(1, 3), 25, 35, cas_ok(2));
        let err = h.check().unwrap_err();
        assert!(err.contains("not linearizable"), "{err}");
        assert!(err.contains("op#"), "{err}");
    }

    #[test]
    fn a_stale_read_after_a_completed_write_fails() {
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        op(&mut h, 1, cas(1, 2), 20, 30, cas_ok(2));
        op(&mut h, 2, Op::Read, 40, 50, Outcome::Read(Some((1, 1))));
        let err = h.check().unwrap_err();
        assert!(
            err.contains("op#2"),
            "the read is the op that cannot be placed: {err}"
        );
    }

    #[test]
    fn a_read_cannot_go_back_after_seeing_a_newer_value() {
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        // The write is concurrent with both reads, but the reads are ordered.
        op(&mut h, 1, cas(1, 2), 20, 100, cas_ok(2));
        op(&mut h, 2, Op::Read, 30, 40, Outcome::Read(Some((2, 2))));
        op(&mut h, 3, Op::Read, 50, 60, Outcome::Read(Some((1, 1))));
        assert!(h.check().is_err());
    }

    #[test]
    fn concurrent_operations_may_take_effect_in_either_order() {
        for seen in [Some((1, 1)), Some((2, 2))] {
            let mut h = History::new();
            op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
            op(&mut h, 1, cas(1, 2), 20, 40, cas_ok(2));
            op(&mut h, 2, Op::Read, 25, 35, Outcome::Read(seen));
            assert_eq!(h.check(), Ok(()), "read saw {seen:?}");
        }
        // Two racing CAS from the same version: one wins, the other fails, whichever was first
        // to be invoked.
        for (a, b) in [(cas_ok(2), Outcome::Failed), (Outcome::Failed, cas_ok(2))] {
            let mut h = History::new();
            op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
            op(&mut h, 1, cas(1, 2), 20, 40, a);
            op(&mut h, 2, cas(1, 3), 21, 39, b);
            let winner = if a == Outcome::Failed { 3 } else { 2 };
            op(
                &mut h,
                3,
                Op::Read,
                50,
                60,
                Outcome::Read(Some((winner, 2))),
            );
            assert_eq!(h.check(), Ok(()));
        }
        // ... but the read after them must agree with the winner.
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        op(&mut h, 1, cas(1, 2), 20, 40, cas_ok(2));
        op(&mut h, 2, cas(1, 3), 21, 39, Outcome::Failed);
        op(&mut h, 3, Op::Read, 50, 60, Outcome::Read(Some((3, 2))));
        assert!(h.check().is_err());
    }

    #[test]
    fn touching_intervals_count_as_concurrent() {
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        op(&mut h, 2, Op::Read, 10, 20, Outcome::Read(None));
        assert_eq!(h.check(), Ok(()));
    }

    #[test]
    fn an_unknown_cas_may_or_may_not_have_applied() {
        for (applied, seen) in [(true, Some((2, 2))), (false, Some((1, 1)))] {
            let mut h = History::new();
            op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
            op(&mut h, 1, cas(1, 2), 20, 30, Outcome::Unknown);
            op(&mut h, 2, Op::Read, 100, 110, Outcome::Read(seen));
            assert_eq!(h.check(), Ok(()), "applied: {applied}");
        }
        // Never completed at all: the same.
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        h.invoke_at(1, cas(1, 2), 20);
        op(&mut h, 2, Op::Read, 100, 110, Outcome::Read(Some((1, 1))));
        op(&mut h, 2, Op::Read, 200, 210, Outcome::Read(Some((2, 2))));
        op(&mut h, 2, cas(2, 3), 300, 310, cas_ok(3));
        assert_eq!(h.check(), Ok(()));
    }

    #[test]
    fn an_unknown_cas_cannot_apply_before_its_invocation_or_twice() {
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        op(&mut h, 2, Op::Read, 12, 15, Outcome::Read(Some((2, 2))));
        op(&mut h, 1, cas(1, 2), 20, 30, Outcome::Unknown);
        assert!(h.check().is_err(), "seen before it was sent");

        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Created);
        op(&mut h, 1, cas(1, 2), 20, 30, Outcome::Unknown);
        op(&mut h, 2, Op::Read, 40, 50, Outcome::Read(Some((2, 2))));
        op(&mut h, 2, Op::Read, 60, 70, Outcome::Read(Some((1, 1))));
        assert!(h.check().is_err(), "applied, then undone");
    }

    #[test]
    fn aborted_operations_are_ignored_and_mismatched_outcomes_rejected() {
        let mut h = History::new();
        op(&mut h, 1, Op::Create { value: 1 }, 0, 10, Outcome::Aborted);
        op(&mut h, 1, Op::Read, 20, 30, Outcome::Read(None));
        assert_eq!(h.check(), Ok(()));

        let mut h = History::new();
        op(&mut h, 1, Op::Read, 0, 10, Outcome::Created);
        assert!(h.check().unwrap_err().contains("does not answer"));

        let mut h = History::new();
        op(
            &mut h,
            1,
            Op::Create { value: 1 },
            0,
            10,
            Outcome::AlreadyExists,
        );
        assert!(h.check().is_err(), "nothing existed");
    }

    #[test]
    fn outcomes_map_from_store_results() {
        let kv = |v: u64, version: u64| KeyValue {
            key: "/r".into(),
            value: encode_value(v),
            version,
            create_revision: 1,
            mod_revision: version,
            lease: 0,
        };
        assert_eq!(
            Outcome::of_get(&Ok(Some(kv(7, 3)))),
            Outcome::Read(Some((7, 3)))
        );
        assert_eq!(Outcome::of_get(&Ok(None)), Outcome::Read(None));
        assert_eq!(
            Outcome::of_get(&Err(MetaError::Ambiguous("t".into()))),
            Outcome::Aborted
        );
        assert_eq!(Outcome::of_create(&Ok(kv(1, 1))), Outcome::Created);
        assert_eq!(
            Outcome::of_create(&Err(MetaError::AlreadyExists("/r".into()))),
            Outcome::AlreadyExists
        );
        assert_eq!(Outcome::of_cas(&Ok(kv(1, 4))), cas_ok(4));
        let bad = MetaError::BadVersion {
            key: "/r".into(),
            expected: 1,
            actual: 2,
        };
        assert_eq!(Outcome::of_cas(&Err(bad)), Outcome::Failed);
        assert_eq!(
            Outcome::of_cas(&Err(MetaError::Ambiguous("t".into()))),
            Outcome::Unknown
        );
        assert_eq!(
            Outcome::of_cas(&Err(MetaError::Unavailable("no leader".into()))),
            Outcome::Aborted
        );
        assert_eq!(Outcome::of_delete(&Ok(())), Outcome::Deleted);
        assert_eq!(
            Outcome::of_delete(&Err(MetaError::Internal("x".into()))),
            Outcome::Unknown
        );
        assert_eq!(decode_value(&encode_value(u64::MAX - 3)), u64::MAX - 3);
    }

    #[test]
    fn real_time_invoke_and_complete() {
        let mut h = History::new();
        let a = h.invoke(1, Op::Create { value: 5 });
        h.complete(a, Outcome::Created);
        let b = h.invoke(2, Op::Read);
        h.complete(b, Outcome::Read(Some((5, 1))));
        assert_eq!(h.len(), 2);
        assert_eq!(h.check(), Ok(()));
        let c = h.invoke(2, Op::Read);
        h.complete(c, Outcome::Read(None));
        assert!(h.check().is_err());
    }

    /// Simulates `n` operations on a real register: each takes effect at its own instant, spaced
    /// 100 ns apart in that order, and is invoked and completed up to `spread` ns around it.
    /// Some outcomes are lost (`Unknown`), in which case the operation applied or not at random.
    fn simulate(
        seed: u64,
        clients: u64,
        n: usize,
        spread: u64,
        unknown_pct: u32,
        deletes: bool,
    ) -> History {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut h = History::new();
        let mut reg: State = None;
        for i in 0..n {
            let at = 1_000_000 + 100 * i as u64;
            let from = at - rng.random_range(0..=spread);
            let to = at + rng.random_range(0..=spread);
            let version = reg.map_or(0, |(_, v)| v);
            let next_value = i as u64 + 1;
            let op = match rng.random_range(0..100) {
                0..40 => Op::Read,
                40..50 => Op::Create { value: next_value },
                50..60 if deletes => Op::Delete {
                    expected_version: rng.random_bool(0.5).then(|| {
                        if rng.random_bool(0.7) {
                            version
                        } else {
                            rng.random_range(0..version + 2)
                        }
                    }),
                },
                _ => Op::Cas {
                    expected_version: if rng.random_bool(0.7) {
                        version
                    } else {
                        rng.random_range(0..version + 2)
                    },
                    new_value: next_value,
                },
            };
            let lost = rng.random_range(0..100) < unknown_pct;
            let applies = !lost || rng.random_bool(0.5);
            let (outcome, after) = match op {
                Op::Read => (Outcome::Read(reg), reg),
                _ => {
                    let out = real_outcome(reg, op);
                    (out, step(reg, op, out).expect("the model answers itself"))
                }
            };
            if applies {
                reg = after;
            }
            let client = rng.random_range(0..clients);
            let id = h.invoke_at(client, op, from);
            if lost {
                if rng.random_bool(0.5) {
                    h.complete_at(id, Outcome::Unknown, to);
                }
            } else {
                h.complete_at(id, outcome, to);
            }
        }
        h
    }

    /// The definite answer of the sequential register.
    fn real_outcome(reg: State, op: Op) -> Outcome {
        match (op, reg) {
            (Op::Read, _) => Outcome::Read(reg),
            (Op::Create { .. }, None) => Outcome::Created,
            (Op::Create { .. }, Some(_)) => Outcome::AlreadyExists,
            (
                Op::Cas {
                    expected_version, ..
                },
                Some((_, v)),
            ) if v == expected_version => cas_ok(v + 1),
            (Op::Cas { .. }, _) => Outcome::Failed,
            (Op::Delete { expected_version }, Some((_, v)))
                if expected_version.is_none_or(|e| e == v) =>
            {
                Outcome::Deleted
            }
            (Op::Delete { .. }, _) => Outcome::Failed,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]

        /// Histories of a real register always pass, whatever the overlap and lost answers.
        #[test]
        fn histories_of_a_real_register_pass(
            seed in any::<u64>(),
            clients in 1u64..8,
            n in 0usize..300,
            spread in 0u64..600,
            unknown_pct in 0u32..25,
            deletes in any::<bool>(),
        ) {
            let h = simulate(seed, clients, n, spread, unknown_pct, deletes);
            prop_assert_eq!(h.check(), Ok(()));
        }

        /// Making one definite read see a value never written is always caught.
        #[test]
        fn a_corrupted_read_is_caught(
            seed in any::<u64>(),
            n in 1usize..300,
            spread in 0u64..600,
            unknown_pct in 0u32..10,
            deletes in any::<bool>(),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut h = simulate(seed, 4, n, spread, unknown_pct, deletes);
            prop_assume!(corrupt_a_read(&mut h, pick.index(usize::MAX)));
            let err = h.check().unwrap_err();
            prop_assert!(err.starts_with("not linearizable"), "{}", err);
        }
    }

    /// Makes one completed read see a value never written; false if there is no such read.
    fn corrupt_a_read(h: &mut History, pick: usize) -> bool {
        let reads: Vec<usize> = (0..h.records.len())
            .filter(|&i| {
                matches!(h.records[i].outcome, Outcome::Read(_)) && h.records[i].complete.is_some()
            })
            .collect();
        if reads.is_empty() {
            return false;
        }
        h.records[reads[pick % reads.len()]].outcome = Outcome::Read(Some((u64::MAX, 1)));
        true
    }

    #[test]
    fn thousands_of_operations_check_quickly() {
        for (seed, unknown_pct, deletes) in [(0, 3, true), (1, 5, false), (2, 0, true)] {
            let mut h = simulate(seed, 8, 4000, 400, unknown_pct, deletes);
            let started = Instant::now();
            assert_eq!(h.check(), Ok(()));
            let took = started.elapsed();
            assert!(took.as_secs() < 10, "checking 4000 ops took {took:?}");
            if !deletes || unknown_pct == 0 {
                assert!(corrupt_a_read(&mut h, 3001));
                let started = Instant::now();
                assert!(h.check().is_err());
                let took = started.elapsed();
                assert!(took.as_secs() < 10, "refuting 4000 ops took {took:?}");
            }
        }
    }

    #[test]
    fn the_search_gives_up_when_over_budget() {
        let mut h = simulate(7, 8, 2000, 400, 5, true);
        assert!(corrupt_a_read(&mut h, 1999));
        let err = h.check_within(50).unwrap_err();
        assert!(err.starts_with("inconclusive"), "{err}");
    }
}
