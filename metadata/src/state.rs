//! The deterministic key-value state machine behind the embedded and raft backends.
//!
//! Commands are applied in log order; the result of a command depends only on the state and the
//! command, so every replica (and every replay after a crash) reaches the same state. Time never
//! enters: lease expiry is decided outside (by the leader's clock) and arrives as a
//! `RevokeLease` command.
//!
//! Invariants: `revision` grows by one per command that changes a key; a key's `version` counts
//! its updates since creation; every key with a lease is listed in that lease's key set and vice
//! versa; a counter never goes back.

use std::collections::{BTreeMap, BTreeSet};

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::store::{KeyValue, LeaseId, MetaError, WatchEvent};

/// A replicated mutation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Command {
    Create {
        key: String,
        value: Bytes,
        lease: LeaseId,
    },
    Cas {
        key: String,
        value: Bytes,
        expected: u64,
    },
    Delete {
        key: String,
        expected: Option<u64>,
    },
    GrantLease {
        ttl_ms: u64,
    },
    RevokeLease {
        lease: LeaseId,
    },
    AllocateId {
        counter: String,
    },
    /// Written by a new leader so that reads see everything committed before it; changes nothing.
    Noop,
    /// Several commands in one log entry (one fsync for all), applied in order, each with its own
    /// revision, events and result, exactly as if they had been separate entries.
    Batch(#[serde(deserialize_with = "unnested")] Vec<Command>),
}

thread_local! {
    static IN_BATCH: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Reads a batch's commands, refusing a batch inside a batch before descending into it: commands
/// arrive from the network, and unbounded nesting would overflow the stack while decoding.
fn unnested<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Command>, D::Error> {
    if IN_BATCH.with(|b| b.replace(true)) {
        return Err(serde::de::Error::custom("a batch inside a batch"));
    }
    let res = Vec::<Command>::deserialize(d);
    IN_BATCH.with(|b| b.set(false));
    res
}

impl std::fmt::Display for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Create { key, .. } => write!(f, "create {key}"),
            Command::Cas { key, expected, .. } => write!(f, "cas {key}@{expected}"),
            Command::Delete { key, .. } => write!(f, "delete {key}"),
            Command::GrantLease { ttl_ms } => write!(f, "grant-lease {ttl_ms}ms"),
            Command::RevokeLease { lease } => write!(f, "revoke-lease {lease}"),
            Command::AllocateId { counter } => write!(f, "allocate-id {counter}"),
            Command::Noop => write!(f, "noop"),
            Command::Batch(cmds) => write!(f, "batch of {}", cmds.len()),
        }
    }
}

/// What a command returns.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Output {
    Kv(KeyValue),
    Done,
    Lease { id: LeaseId, ttl_ms: u64 },
    Id(u64),
}

/// A command's outcome; errors are part of the replicated result (a failed CAS is a no-op).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    Ok(Output),
    Err(ApplyError),
    /// One response per command of a `Command::Batch`, in order.
    Batch(Vec<Response>),
}

/// The errors a command can meet when applied.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ApplyError {
    NotFound(String),
    AlreadyExists(String),
    BadVersion {
        key: String,
        expected: u64,
        actual: u64,
    },
    LeaseNotFound(LeaseId),
}

impl From<ApplyError> for MetaError {
    fn from(e: ApplyError) -> Self {
        match e {
            ApplyError::NotFound(k) => MetaError::NotFound(k),
            ApplyError::AlreadyExists(k) => MetaError::AlreadyExists(k),
            ApplyError::BadVersion {
                key,
                expected,
                actual,
            } => MetaError::BadVersion {
                key,
                expected,
                actual,
            },
            ApplyError::LeaseNotFound(l) => MetaError::LeaseNotFound(l),
        }
    }
}

impl Response {
    pub fn into_result(self) -> Result<Output, MetaError> {
        match self {
            Response::Ok(o) => Ok(o),
            Response::Err(e) => Err(e.into()),
            Response::Batch(rs) => Err(MetaError::Internal(format!(
                "a batch of {} results where one was expected",
                rs.len()
            ))),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Record {
    value: Bytes,
    version: u64,
    create_revision: u64,
    mod_revision: u64,
    lease: LeaseId,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
struct LeaseState {
    ttl_ms: u64,
    keys: BTreeSet<String>,
}

/// The whole replicated state; serialized as is into snapshots.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KvState {
    revision: u64,
    kvs: BTreeMap<String, Record>,
    leases: BTreeMap<LeaseId, LeaseState>,
    next_lease: LeaseId,
    counters: BTreeMap<String, u64>,
}

impl KvState {
    pub fn revision(&self) -> u64 {
        self.revision
    }

    pub fn len(&self) -> usize {
        self.kvs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.kvs.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.kvs.get(key).map(|r| to_kv(key, r))
    }

    /// Keys under `prefix` after `start_after`, at most `limit`; the flag says whether more follow.
    pub fn list(
        &self,
        prefix: &str,
        start_after: Option<&str>,
        limit: usize,
    ) -> (Vec<KeyValue>, bool) {
        use std::ops::Bound;
        let lower = match start_after {
            Some(a) if a >= prefix => Bound::Excluded(a.to_string()),
            _ => Bound::Included(prefix.to_string()),
        };
        let mut out = Vec::new();
        for (k, r) in self.kvs.range((lower, Bound::Unbounded)) {
            if !k.starts_with(prefix) {
                break;
            }
            if out.len() == limit {
                return (out, true);
            }
            out.push(to_kv(k, r));
        }
        (out, false)
    }

    /// Live leases with their time-to-live (for the leader's expiry clock).
    pub fn leases(&self) -> impl Iterator<Item = (LeaseId, u64)> + '_ {
        self.leases.iter().map(|(id, l)| (*id, l.ttl_ms))
    }

    pub fn lease_ttl_ms(&self, lease: LeaseId) -> Option<u64> {
        self.leases.get(&lease).map(|l| l.ttl_ms)
    }

    /// Applies one command; returns its result and the watch events it caused.
    pub fn apply(&mut self, cmd: &Command) -> (Response, Vec<WatchEvent>) {
        let mut events = Vec::new();
        let res = match cmd {
            Command::Batch(cmds) => {
                let mut out = Vec::with_capacity(cmds.len());
                for c in cmds {
                    let (r, ev) = self.apply(c);
                    out.push(r);
                    events.extend(ev);
                }
                return (Response::Batch(out), events);
            }
            Command::Create { key, value, lease } => self.create(key, value, *lease, &mut events),
            Command::Cas {
                key,
                value,
                expected,
            } => self.cas(key, value, *expected, &mut events),
            Command::Delete { key, expected } => self.delete(key, *expected, &mut events),
            Command::GrantLease { ttl_ms } => {
                self.next_lease += 1;
                let id = self.next_lease;
                self.leases.insert(
                    id,
                    LeaseState {
                        ttl_ms: *ttl_ms,
                        keys: BTreeSet::new(),
                    },
                );
                Ok(Output::Lease {
                    id,
                    ttl_ms: *ttl_ms,
                })
            }
            Command::RevokeLease { lease } => match self.leases.remove(lease) {
                None => Err(ApplyError::LeaseNotFound(*lease)),
                Some(l) => {
                    for key in l.keys {
                        if self.kvs.remove(&key).is_some() {
                            self.revision += 1;
                            events.push(WatchEvent::Delete {
                                key,
                                mod_revision: self.revision,
                            });
                        }
                    }
                    Ok(Output::Done)
                }
            },
            Command::AllocateId { counter } => {
                let next = self.counters.entry(counter.clone()).or_insert(0);
                let id = *next;
                *next += 1;
                Ok(Output::Id(id))
            }
            Command::Noop => Ok(Output::Done),
        };
        let res = match res {
            Ok(o) => Response::Ok(o),
            Err(e) => Response::Err(e),
        };
        (res, events)
    }

    fn create(
        &mut self,
        key: &str,
        value: &Bytes,
        lease: LeaseId,
        ev: &mut Vec<WatchEvent>,
    ) -> Result<Output, ApplyError> {
        if self.kvs.contains_key(key) {
            return Err(ApplyError::AlreadyExists(key.to_string()));
        }
        if lease != 0 {
            let l = self
                .leases
                .get_mut(&lease)
                .ok_or(ApplyError::LeaseNotFound(lease))?;
            l.keys.insert(key.to_string());
        }
        self.revision += 1;
        let rec = Record {
            value: value.clone(),
            version: 1,
            create_revision: self.revision,
            mod_revision: self.revision,
            lease,
        };
        let kv = to_kv(key, &rec);
        self.kvs.insert(key.to_string(), rec);
        ev.push(WatchEvent::Put(kv.clone()));
        Ok(Output::Kv(kv))
    }

    fn cas(
        &mut self,
        key: &str,
        value: &Bytes,
        expected: u64,
        ev: &mut Vec<WatchEvent>,
    ) -> Result<Output, ApplyError> {
        let rec = self
            .kvs
            .get_mut(key)
            .ok_or_else(|| ApplyError::NotFound(key.to_string()))?;
        if rec.version != expected {
            return Err(ApplyError::BadVersion {
                key: key.to_string(),
                expected,
                actual: rec.version,
            });
        }
        self.revision += 1;
        rec.value = value.clone();
        rec.version += 1;
        rec.mod_revision = self.revision;
        let kv = to_kv(key, rec);
        ev.push(WatchEvent::Put(kv.clone()));
        Ok(Output::Kv(kv))
    }

    fn delete(
        &mut self,
        key: &str,
        expected: Option<u64>,
        ev: &mut Vec<WatchEvent>,
    ) -> Result<Output, ApplyError> {
        let rec = self
            .kvs
            .get(key)
            .ok_or_else(|| ApplyError::NotFound(key.to_string()))?;
        if let Some(expected) = expected
            && rec.version != expected
        {
            return Err(ApplyError::BadVersion {
                key: key.to_string(),
                expected,
                actual: rec.version,
            });
        }
        let lease = rec.lease;
        self.kvs.remove(key);
        if let Some(l) = self.leases.get_mut(&lease) {
            l.keys.remove(key);
        }
        self.revision += 1;
        ev.push(WatchEvent::Delete {
            key: key.to_string(),
            mod_revision: self.revision,
        });
        Ok(Output::Done)
    }
}

fn to_kv(key: &str, r: &Record) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: r.value.clone(),
        version: r.version,
        create_revision: r.create_revision,
        mod_revision: r.mod_revision,
        lease: r.lease,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn b(s: &str) -> Bytes {
        Bytes::copy_from_slice(s.as_bytes())
    }

    #[test]
    fn create_cas_delete_bump_versions_and_revisions() {
        let mut s = KvState::default();
        let (r, ev) = s.apply(&Command::Create {
            key: "/a".into(),
            value: b("1"),
            lease: 0,
        });
        assert!(
            matches!(r, Response::Ok(Output::Kv(ref kv)) if kv.version == 1 && kv.mod_revision == 1)
        );
        assert_eq!(ev.len(), 1);
        let (r, _) = s.apply(&Command::Create {
            key: "/a".into(),
            value: b("2"),
            lease: 0,
        });
        assert_eq!(r, Response::Err(ApplyError::AlreadyExists("/a".into())));
        let (r, ev) = s.apply(&Command::Cas {
            key: "/a".into(),
            value: b("2"),
            expected: 2,
        });
        assert_eq!(
            r,
            Response::Err(ApplyError::BadVersion {
                key: "/a".into(),
                expected: 2,
                actual: 1
            })
        );
        assert!(ev.is_empty());
        assert_eq!(s.revision(), 1, "a failed command changes nothing");
        let (r, _) = s.apply(&Command::Cas {
            key: "/a".into(),
            value: b("2"),
            expected: 1,
        });
        assert!(
            matches!(r, Response::Ok(Output::Kv(ref kv)) if kv.version == 2 && kv.mod_revision == 2 && kv.create_revision == 1)
        );
        let (r, _) = s.apply(&Command::Delete {
            key: "/a".into(),
            expected: Some(1),
        });
        assert!(matches!(r, Response::Err(ApplyError::BadVersion { .. })));
        let (r, ev) = s.apply(&Command::Delete {
            key: "/a".into(),
            expected: Some(2),
        });
        assert_eq!(r, Response::Ok(Output::Done));
        assert_eq!(
            ev,
            vec![WatchEvent::Delete {
                key: "/a".into(),
                mod_revision: 3
            }]
        );
        assert!(s.get("/a").is_none());
    }

    #[test]
    fn nested_batches_are_refused_on_decode() {
        let one = Command::Batch(vec![Command::Noop]);
        let bytes = postcard::to_stdvec(&one).unwrap();
        assert_eq!(postcard::from_bytes::<Command>(&bytes).unwrap(), one);
        let nested = Command::Batch(vec![Command::Batch(vec![Command::Noop])]);
        assert!(postcard::from_bytes::<Command>(&postcard::to_stdvec(&nested).unwrap()).is_err());
        // Deep nesting is refused at the second level instead of overflowing the stack.
        let mut deep = Vec::new();
        for _ in 0..1_000_000 {
            deep.extend_from_slice(&[7, 1]); // Batch, one element
        }
        assert!(postcard::from_bytes::<Command>(&deep).is_err());
        assert_eq!(
            postcard::from_bytes::<Command>(&bytes).unwrap(),
            one,
            "the guard resets"
        );
    }

    #[test]
    fn a_batch_applies_like_its_commands_one_by_one() {
        let cmds = vec![
            Command::Create {
                key: "/a".into(),
                value: b("1"),
                lease: 0,
            },
            Command::Create {
                key: "/a".into(),
                value: b("2"),
                lease: 0,
            },
            Command::Cas {
                key: "/a".into(),
                value: b("3"),
                expected: 1,
            },
            Command::AllocateId {
                counter: "c".into(),
            },
            Command::Delete {
                key: "/zz".into(),
                expected: None,
            },
        ];
        let mut one_by_one = KvState::default();
        let mut expected = Vec::new();
        let mut expected_events = Vec::new();
        for c in &cmds {
            let (r, ev) = one_by_one.apply(c);
            expected.push(r);
            expected_events.extend(ev);
        }
        let mut batched = KvState::default();
        let (r, ev) = batched.apply(&Command::Batch(cmds));
        assert_eq!(r, Response::Batch(expected));
        assert_eq!(ev, expected_events);
        assert_eq!(batched, one_by_one);
    }

    #[test]
    fn revoking_a_lease_deletes_its_keys_only() {
        let mut s = KvState::default();
        let (r, _) = s.apply(&Command::GrantLease { ttl_ms: 1000 });
        let Response::Ok(Output::Lease { id, .. }) = r else {
            panic!("{r:?}")
        };
        s.apply(&Command::Create {
            key: "/e".into(),
            value: b("x"),
            lease: id,
        });
        s.apply(&Command::Create {
            key: "/p".into(),
            value: b("y"),
            lease: 0,
        });
        let (r, _) = s.apply(&Command::Create {
            key: "/q".into(),
            value: b("y"),
            lease: id + 7,
        });
        assert_eq!(r, Response::Err(ApplyError::LeaseNotFound(id + 7)));
        let (r, ev) = s.apply(&Command::RevokeLease { lease: id });
        assert_eq!(r, Response::Ok(Output::Done));
        assert_eq!(ev.len(), 1);
        assert!(s.get("/e").is_none());
        assert!(s.get("/p").is_some());
        let (r, _) = s.apply(&Command::RevokeLease { lease: id });
        assert_eq!(r, Response::Err(ApplyError::LeaseNotFound(id)));
    }

    #[test]
    fn list_pages_in_order_within_the_prefix() {
        let mut s = KvState::default();
        for k in ["/a/1", "/a/2", "/a/3", "/b/1", "/a"] {
            s.apply(&Command::Create {
                key: k.into(),
                value: b(k),
                lease: 0,
            });
        }
        let (p, more) = s.list("/a/", None, 2);
        assert_eq!(
            p.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
            ["/a/1", "/a/2"]
        );
        assert!(more);
        let (p, more) = s.list("/a/", Some("/a/2"), 2);
        assert_eq!(
            p.iter().map(|kv| kv.key.as_str()).collect::<Vec<_>>(),
            ["/a/3"]
        );
        assert!(!more);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Create(u8, u8),
        Cas(u8, u8, u64),
        Delete(u8, Option<u64>),
        Alloc(u8),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (0..6u8, any::<u8>()).prop_map(|(k, v)| Op::Create(k, v)),
            (0..6u8, any::<u8>(), 0..4u64).prop_map(|(k, v, e)| Op::Cas(k, v, e)),
            (0..6u8, proptest::option::of(0..4u64)).prop_map(|(k, e)| Op::Delete(k, e)),
            (0..2u8).prop_map(Op::Alloc),
        ]
    }

    proptest! {
        /// The state machine agrees with a plain map of (value, version), and a snapshot round
        /// trip reproduces it exactly.
        #[test]
        fn matches_a_model(ops in proptest::collection::vec(op(), 1..200)) {
            let mut s = KvState::default();
            let mut model: BTreeMap<String, (u8, u64)> = BTreeMap::new();
            let mut counters = [0u64; 2];
            for op in ops {
                match op {
                    Op::Create(k, v) => {
                        let key = format!("/k{k}");
                        let (r, _) = s.apply(&Command::Create { key: key.clone(), value: Bytes::from(vec![v]), lease: 0 });
                        match model.entry(key) {
                            std::collections::btree_map::Entry::Occupied(_) => {
                                prop_assert!(matches!(r, Response::Err(ApplyError::AlreadyExists(_))));
                            }
                            std::collections::btree_map::Entry::Vacant(slot) => {
                                prop_assert!(matches!(r, Response::Ok(_)));
                                slot.insert((v, 1));
                            }
                        }
                    }
                    Op::Cas(k, v, e) => {
                        let key = format!("/k{k}");
                        let (r, _) = s.apply(&Command::Cas { key: key.clone(), value: Bytes::from(vec![v]), expected: e });
                        match model.get_mut(&key) {
                            Some(m) if m.1 == e => { prop_assert!(matches!(r, Response::Ok(_))); *m = (v, e + 1); }
                            Some(_) => prop_assert!(matches!(r, Response::Err(ApplyError::BadVersion { .. })), "expected BadVersion, got {:?}", r),
                            None => prop_assert!(matches!(r, Response::Err(ApplyError::NotFound(_)))),
                        }
                    }
                    Op::Delete(k, e) => {
                        let key = format!("/k{k}");
                        let (r, _) = s.apply(&Command::Delete { key: key.clone(), expected: e });
                        match model.get(&key) {
                            Some(m) if e.is_none() || e == Some(m.1) => { prop_assert!(matches!(r, Response::Ok(_))); model.remove(&key); }
                            Some(_) => prop_assert!(matches!(r, Response::Err(ApplyError::BadVersion { .. })), "expected BadVersion, got {:?}", r),
                            None => prop_assert!(matches!(r, Response::Err(ApplyError::NotFound(_)))),
                        }
                    }
                    Op::Alloc(c) => {
                        let (r, _) = s.apply(&Command::AllocateId { counter: format!("c{c}") });
                        prop_assert_eq!(r, Response::Ok(Output::Id(counters[c as usize])));
                        counters[c as usize] += 1;
                    }
                }
            }
            let listed: BTreeMap<String, (u8, u64)> = s.list("/", None, usize::MAX).0.into_iter()
                .map(|kv| (kv.key, (kv.value[0], kv.version))).collect();
            prop_assert_eq!(&listed, &model);
            let bytes = postcard::to_stdvec(&s).unwrap();
            let back: KvState = postcard::from_bytes(&bytes).unwrap();
            prop_assert_eq!(back, s);
        }
    }
}
