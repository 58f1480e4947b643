//! Model-based test of the state machine: random commands run against a plain `BTreeMap` model
//! executed one at a time, while the machine sequences several commands before their effects are
//! acknowledged (so evaluation goes through the pending overlay). Outcomes, errors, reads, scans
//! and the final state must agree, and replaying the logged effects into a fresh store must give
//! the same store.

use std::collections::{BTreeMap, VecDeque};

use proptest::prelude::*;

use super::*;
use crate::table::model::{Compare, KEY_MAX};

#[derive(Clone, Debug, PartialEq)]
struct MEntry {
    value: Value,
    version: u64,
    create: u64,
    modr: u64,
}

/// The obviously-correct model: each command runs on a copy of the whole map.
struct Model {
    map: BTreeMap<Bytes, MEntry>,
    rev: u64,
    max_bytes: u64,
}

fn mcost(k: &Bytes, e: &MEntry) -> u64 {
    k.len() as u64
        + match &e.value {
            Value::Bytes(b) => b.len() as u64,
            Value::Number(_) => 8,
        }
        + ENTRY_OVERHEAD
}

impl Model {
    fn bytes_of(map: &BTreeMap<Bytes, MEntry>) -> u64 {
        map.iter().map(|(k, e)| mcost(k, e)).sum()
    }

    fn kv(map: &BTreeMap<Bytes, MEntry>, k: &Bytes) -> Option<KeyValue> {
        map.get(k).map(|e| KeyValue {
            key: k.clone(),
            value: e.value.clone(),
            version: e.version,
            create_revision: e.create,
            mod_revision: e.modr,
        })
    }

    fn put(map: &mut BTreeMap<Bytes, MEntry>, k: &Bytes, v: Value, rev: u64) {
        let (version, create) = match map.get(k) {
            Some(e) => (e.version + 1, e.create),
            None => (1, rev),
        };
        map.insert(
            k.clone(),
            MEntry {
                value: v,
                version,
                create,
                modr: rev,
            },
        );
    }

    fn incr(map: &mut BTreeMap<Bytes, MEntry>, k: &Bytes, a: i64, rev: u64) -> Result<i64> {
        let n = match map.get(k).map(|e| &e.value) {
            None => a,
            Some(Value::Number(n)) => n
                .checked_add(a)
                .ok_or_else(|| Error::Overflow(String::new()))?,
            Some(Value::Bytes(_)) => return Err(Error::WrongType(String::new())),
        };
        Self::put(map, k, Value::Number(n), rev);
        Ok(n)
    }

    fn expect_ok(map: &BTreeMap<Bytes, MEntry>, k: &Bytes, x: Option<Expect>) -> bool {
        match x {
            None => true,
            Some(Expect::Version(v)) => map.get(k).map_or(0, |e| e.version) == v,
            Some(Expect::ModRevision(r)) => map.get(k).map_or(0, |e| e.modr) == r,
        }
    }

    fn cmp(map: &BTreeMap<Bytes, MEntry>, c: &Compare) -> bool {
        let e = map.get(&c.key);
        let ord = match &c.target {
            CompareTarget::Value(w) => match (e.map(|e| &e.value), w) {
                (Some(Value::Bytes(a)), Value::Bytes(b)) => a.cmp(b),
                (Some(Value::Number(a)), Value::Number(b)) => a.cmp(b),
                _ => return false,
            },
            CompareTarget::Version(v) => e.map_or(0, |e| e.version).cmp(v),
            CompareTarget::ModRevision(v) => e.map_or(0, |e| e.modr).cmp(v),
            CompareTarget::Exists(b) => e.is_some().cmp(b),
        };
        match c.op {
            CompareOp::Equal => ord.is_eq(),
            CompareOp::NotEqual => ord.is_ne(),
            CompareOp::Greater => ord.is_gt(),
            CompareOp::Less => ord.is_lt(),
        }
    }

    fn exec(&mut self, cmd: &Command) -> Result<Outcome> {
        cmd.check()?;
        let rev = self.rev + 1;
        let mut m = self.map.clone();
        let (out, wrote) = match cmd {
            Command::Put {
                key,
                value,
                expect,
                prev_kv,
            } => {
                let prev = if *prev_kv { Self::kv(&m, key) } else { None };
                let ok = Self::expect_ok(&m, key, *expect);
                if ok {
                    Self::put(&mut m, key, value.clone(), rev);
                }
                (
                    Outcome::Put(PutResult {
                        succeeded: ok,
                        revision: if ok { rev } else { self.rev },
                        prev_kv: prev,
                    }),
                    ok,
                )
            }
            Command::Delete {
                key,
                expect,
                prev_kv,
            } => {
                let prev = if *prev_kv { Self::kv(&m, key) } else { None };
                let ok = Self::expect_ok(&m, key, *expect);
                let deleted = ok && m.remove(key).is_some();
                (
                    Outcome::Delete(DeleteResult {
                        succeeded: ok,
                        deleted,
                        revision: if deleted { rev } else { self.rev },
                        prev_kv: prev,
                    }),
                    deleted,
                )
            }
            Command::Increment { key, amount } => (
                Outcome::Increment(Self::incr(&mut m, key, *amount, rev)?),
                true,
            ),
            Command::Txn(t) => {
                let ok = t.compares.iter().all(|c| Self::cmp(&m, c));
                let mut wrote = false;
                let mut results = Vec::new();
                for op in if ok { &t.success } else { &t.failure } {
                    results.push(match op {
                        TxnOp::Put { key, value } => {
                            Self::put(&mut m, key, value.clone(), rev);
                            wrote = true;
                            OpResult::Put { revision: rev }
                        }
                        TxnOp::Delete { key } => {
                            let d = m.remove(key).is_some();
                            wrote |= d;
                            OpResult::Delete { deleted: d }
                        }
                        TxnOp::Get { key } => OpResult::Get(Self::kv(&m, key)),
                        TxnOp::Increment { key, amount } => {
                            wrote = true;
                            OpResult::Increment(Self::incr(&mut m, key, *amount, rev)?)
                        }
                    });
                }
                (
                    Outcome::Txn(TxnResult {
                        succeeded: ok,
                        revision: if wrote { rev } else { self.rev },
                        results,
                    }),
                    wrote,
                )
            }
        };
        if wrote {
            let (before, after) = (Self::bytes_of(&self.map), Self::bytes_of(&m));
            if after > before && after > self.max_bytes {
                return Err(Error::RangeFull(String::new()));
            }
            self.map = m;
            self.rev = rev;
        }
        Ok(out)
    }

    fn scan(&self, start: &Bytes, end: &Option<Bytes>, limit: usize) -> (Vec<KeyValue>, bool) {
        let all: Vec<KeyValue> = self
            .map
            .keys()
            .filter(|k| *k >= start && end.as_ref().is_none_or(|e| *k < e))
            .map(|k| Self::kv(&self.map, k).unwrap())
            .collect();
        let limit = if limit == 0 { SCAN_LIMIT_MAX } else { limit };
        let more = all.len() > limit;
        (all.into_iter().take(limit).collect(), more)
    }
}

#[derive(Clone, Debug)]
enum Step {
    Cmd(Command),
    /// Acknowledge (apply) up to this many pending effects, oldest first.
    Ack(usize),
    Get(Bytes),
    Scan(Bytes, Option<Bytes>, usize),
}

fn key() -> impl Strategy<Value = Bytes> {
    prop_oneof![
        8 => (0u8..6).prop_map(|i| Bytes::from(vec![b'a' + i])),
        1 => Just(Bytes::new()),
        1 => Just(Bytes::from(vec![b'z'; KEY_MAX + 1])),
    ]
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..40).prop_map(|v| Value::Bytes(v.into())),
        (-3i64..4).prop_map(Value::Number),
    ]
}

fn amount() -> impl Strategy<Value = i64> {
    prop_oneof![
        6 => -5i64..6,
        1 => Just(i64::MAX),
        1 => Just(i64::MIN),
    ]
}

fn expect() -> impl Strategy<Value = Option<Expect>> {
    prop_oneof![
        3 => Just(None),
        1 => (0u64..3).prop_map(|v| Some(Expect::Version(v))),
        1 => (0u64..8).prop_map(|v| Some(Expect::ModRevision(v))),
    ]
}

fn txn_op() -> impl Strategy<Value = TxnOp> {
    prop_oneof![
        (key(), value()).prop_map(|(key, value)| TxnOp::Put { key, value }),
        key().prop_map(|key| TxnOp::Delete { key }),
        key().prop_map(|key| TxnOp::Get { key }),
        (key(), amount()).prop_map(|(key, amount)| TxnOp::Increment { key, amount }),
    ]
}

fn compare_s() -> impl Strategy<Value = Compare> {
    let target = prop_oneof![
        value().prop_map(CompareTarget::Value),
        (0u64..3).prop_map(CompareTarget::Version),
        (0u64..8).prop_map(CompareTarget::ModRevision),
        any::<bool>().prop_map(CompareTarget::Exists),
    ];
    let op = prop_oneof![
        Just(CompareOp::Equal),
        Just(CompareOp::NotEqual),
        Just(CompareOp::Greater),
        Just(CompareOp::Less),
    ];
    (key(), target, op).prop_map(|(key, target, op)| Compare { key, target, op })
}

fn command() -> impl Strategy<Value = Command> {
    prop_oneof![
        3 => (key(), value(), expect(), any::<bool>()).prop_map(|(key, value, expect, prev_kv)| {
            Command::Put { key, value, expect, prev_kv }
        }),
        2 => (key(), expect(), any::<bool>())
            .prop_map(|(key, expect, prev_kv)| Command::Delete { key, expect, prev_kv }),
        2 => (key(), amount()).prop_map(|(key, amount)| Command::Increment { key, amount }),
        2 => (
            proptest::collection::vec(compare_s(), 0..3),
            proptest::collection::vec(txn_op(), 0..4),
            proptest::collection::vec(txn_op(), 0..4),
        )
            .prop_map(|(compares, success, failure)| Command::Txn(Txn { compares, success, failure })),
    ]
}

fn step() -> impl Strategy<Value = Step> {
    prop_oneof![
        8 => command().prop_map(Step::Cmd),
        3 => (0usize..4).prop_map(Step::Ack),
        1 => key().prop_map(Step::Get),
        1 => (key(), proptest::option::of(key()), 0usize..4)
            .prop_map(|(s, e, l)| Step::Scan(s, e, l)),
    ]
}

struct Harness {
    store: Store,
    machine: Machine,
    queue: VecDeque<Effect>,
    log: Vec<Effect>,
}

impl Harness {
    fn ack(&mut self, n: usize) {
        for _ in 0..n {
            let Some(e) = self.queue.pop_front() else {
                return;
            };
            self.store.apply(&e).expect("effects apply in order");
            self.machine.acked(&e);
            self.log.push(e);
        }
    }
}

fn run(steps: Vec<Step>, max_bytes: u64) -> std::result::Result<(), TestCaseError> {
    let mut model = Model {
        map: BTreeMap::new(),
        rev: 0,
        max_bytes,
    };
    let store = Store::new();
    let machine = Machine::new(&store, Limits { max_bytes });
    let mut h = Harness {
        store,
        machine,
        queue: VecDeque::new(),
        log: Vec::new(),
    };
    for s in steps {
        match s {
            Step::Cmd(c) => {
                let want = model.exec(&c);
                let got = h.machine.evaluate(&h.store, &c);
                match (want, got) {
                    (Ok(w), Ok(ev)) => {
                        prop_assert_eq!(&w, &ev.outcome, "{:?}", c);
                        h.machine.sequence(&ev);
                        if ev.effect.is_write() {
                            prop_assert_eq!(ev.effect.revision, model.rev);
                            h.queue.push_back(ev.effect);
                        } else {
                            prop_assert_eq!(ev.effect.revision, model.rev);
                        }
                    }
                    (Err(w), Err(g)) => prop_assert_eq!(w.code(), g.code(), "{:?}: {}", c, g),
                    (w, g) => prop_assert!(false, "{:?}: model {:?}, machine {:?}", c, w, g),
                }
                prop_assert_eq!(h.machine.revision(), model.rev);
                prop_assert_eq!(h.machine.pending() as usize, h.queue.len());
            }
            Step::Ack(n) => h.ack(n),
            Step::Get(k) => {
                h.ack(usize::MAX);
                prop_assert_eq!(h.store.get(&k), Model::kv(&model.map, &k));
            }
            Step::Scan(start, end, limit) => {
                h.ack(usize::MAX);
                let got = h.store.scan(&start, end.as_deref(), limit);
                prop_assert_eq!(got, model.scan(&start, &end, limit));
                // Paging through with `more` visits every key once, in order.
                let mut from = start.clone();
                let mut all = Vec::new();
                loop {
                    let (page, more) = h.store.scan(&from, end.as_deref(), 1);
                    all.extend(page.iter().map(|kv| kv.key.clone()));
                    match (more, page.last()) {
                        (true, Some(last)) => {
                            let mut next = last.key.to_vec();
                            next.push(0);
                            from = next.into();
                        }
                        _ => break,
                    }
                }
                let want: Vec<Bytes> = model
                    .scan(&start, &end, 0)
                    .0
                    .into_iter()
                    .map(|kv| kv.key)
                    .collect();
                prop_assert_eq!(all, want);
            }
        }
    }
    h.ack(usize::MAX);
    prop_assert_eq!(h.store.revision(), model.rev);
    let got: Vec<KeyValue> = h.store.entries().map(|(k, e)| e.to_kv(k)).collect();
    let want: Vec<KeyValue> = model
        .map
        .keys()
        .map(|k| Model::kv(&model.map, k).unwrap())
        .collect();
    prop_assert_eq!(got, want);
    prop_assert_eq!(h.store.bytes(), Model::bytes_of(&model.map));
    prop_assert_eq!(h.machine.bytes(), h.store.bytes());
    prop_assert!(h.machine.overlay.is_empty());
    // Replay: the logged effects rebuild the same store, and replaying a prefix on top of a
    // "checkpoint" of the first half skips nothing it should not.
    let mut replayed = Store::new();
    for e in &h.log {
        replayed
            .apply(e)
            .map_err(|e| TestCaseError::fail(e.to_string()))?;
    }
    prop_assert_eq!(&replayed, &h.store);
    if let Some(e) = h.log.last() {
        let mut again = replayed.clone();
        prop_assert!(matches!(again.apply(e), Err(Error::Corrupt(_))));
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn machine_matches_model(
        steps in proptest::collection::vec(step(), 1..80),
        max_bytes in prop_oneof![Just(u64::MAX), 200u64..1200],
    ) {
        run(steps, max_bytes)?;
    }
}

#[test]
fn checkpoint_restore_checks_entries() {
    let e = Entry {
        value: Value::Number(1),
        version: 1,
        create_revision: 2,
        mod_revision: 2,
    };
    let s = Store::from_entries([(Bytes::from_static(b"a"), e.clone())], 2).unwrap();
    assert_eq!(s.keys(), 1);
    assert_eq!(s.bytes(), 1 + 8 + ENTRY_OVERHEAD);
    assert!(matches!(
        Store::from_entries([(Bytes::from_static(b"a"), e.clone())], 1),
        Err(Error::Corrupt(_))
    ));
    assert!(matches!(
        Store::from_entries(
            [
                (Bytes::from_static(b"a"), e.clone()),
                (Bytes::from_static(b"a"), e)
            ],
            2
        ),
        Err(Error::Corrupt(_))
    ));
}

#[test]
fn refused_commands_change_nothing() {
    let mut store = Store::new();
    let mut m = Machine::new(&store, Limits { max_bytes: 1000 });
    let put = |k: &'static [u8], v: Value| Command::Put {
        key: Bytes::from_static(k),
        value: v,
        expect: None,
        prev_kv: false,
    };
    let ev = m.evaluate(&store, &put(b"a", "x".into())).unwrap();
    m.sequence(&ev);
    store.apply(&ev.effect).unwrap();
    m.acked(&ev.effect);
    let before = store.clone();
    for (cmd, code) in [
        (put(b"", "x".into()), "INVALID_ARGUMENT"),
        (
            put(
                b"b",
                Value::Bytes(vec![0; crate::table::model::VALUE_MAX + 1].into()),
            ),
            "TOO_LARGE",
        ),
        (
            Command::Increment {
                key: Bytes::from_static(b"a"),
                amount: 1,
            },
            "WRONG_TYPE",
        ),
        (put(b"c", Value::Bytes(vec![0; 2000].into())), "RANGE_FULL"),
        (
            Command::Txn(Txn {
                success: vec![
                    TxnOp::Put {
                        key: Bytes::from_static(b"n"),
                        value: Value::Number(i64::MAX),
                    },
                    TxnOp::Increment {
                        key: Bytes::from_static(b"n"),
                        amount: 1,
                    },
                ],
                ..Default::default()
            }),
            "OVERFLOW",
        ),
    ] {
        let err = m.evaluate(&store, &cmd).unwrap_err();
        assert_eq!(err.code(), code, "{err}");
    }
    assert_eq!(store, before);
    assert_eq!(m.revision(), 1);
    // Deletes still work on a full range.
    let full = Machine::new(&store, Limits { max_bytes: 0 });
    let ev = full
        .evaluate(
            &store,
            &Command::Delete {
                key: Bytes::from_static(b"a"),
                expect: None,
                prev_kv: true,
            },
        )
        .unwrap();
    assert!(ev.effect.is_write());
}
