//! End-to-end tests of the raft metadata service: `quire metadata` processes forming a cluster on
//! 127.0.0.1, driven through the client library (`quire://` URIs), the `quire metadata` CLI and
//! raw gRPC, with SIGKILL and SIGSTOP as faults; plus bookies registering in it.
//!
//! Each test owns its processes (dropped, hence killed, even when it panics) and runs under an
//! overall time limit, so nothing hangs or outlives it.

use bytes::Bytes;
use quire_metadata::bookies::BookieRegistry;
use quire_metadata::session::Session;
use quire_metadata::store::{MAX_VALUE_LEN, list_all};
use quire_metadata::testkit::conformance;
use quire_metadata::testkit::linearizability::{History, Op, Outcome, decode_value, encode_value};
use quire_metadata::{DynStore, KeyValue, MetaError, WatchEvent, WatchTarget};
use quire_proto::metadata as pb;
use quire_tests::*;
use rand::{Rng, SeedableRng};
use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Longest wait for one store call (the client itself gives up after 15 s).
const CALL: Duration = Duration::from_secs(20);
/// Longest wait for a leader after a kill, or for a node to catch up.
const ELECTION: Duration = Duration::from_secs(20);

/// Runs a whole test body under `limit`; on expiry the body (and every process it owns) is
/// dropped and the test fails.
async fn bounded<T>(name: &str, limit: Duration, body: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, body).await {
        Ok(v) => v,
        Err(_) => panic!("{name}: did not finish within {limit:?}"),
    }
}

/// One store call that must answer within [`CALL`].
async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL, fut).await {
        Ok(v) => v,
        Err(_) => panic!("{what}: no answer within {CALL:?}"),
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn list(store: &DynStore, prefix: &str) -> Vec<KeyValue> {
    within(&format!("list {prefix}"), list_all(store.as_ref(), prefix))
        .await
        .unwrap_or_else(|e| panic!("list {prefix}: {e:?}"))
}

// ------------------------------------------------------------------------------------------------
// a. The store contract on a real cluster.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn conformance_on_a_raft_cluster() {
    bounded(
        "conformance_on_a_raft_cluster",
        Duration::from_secs(120),
        async {
            let cluster = MetadataCluster::start(3).await;
            let leader = cluster.wait_for_leader(ELECTION).await;
            let follower = (leader + 1) % cluster.len();
            let all = cluster.store().await;
            let via_follower = quire_metadata::connect(&cluster.uri_of(&[follower]))
                .await
                .expect("connect to one follower");
            // Both at once (disjoint prefixes): every write through the follower is forwarded
            // to the leader while the other client writes to whichever node it reaches.
            tokio::join!(
                conformance::run_all(all.as_ref(), "/conf/"),
                conformance::run_all(via_follower.as_ref(), "/conf-follower/"),
            );
            // The follower really was a follower throughout (the writes were forwarded).
            let s = cluster
                .node(follower)
                .status()
                .await
                .expect("follower status");
            assert_eq!(
                s.leader,
                Some(cluster.node(leader).id()),
                "leadership moved during the run: {s:?}"
            );
            assert_eq!(s.state, "Follower", "{s:?}");
        },
    )
    .await;
}

/// A watch started through a follower right after a write was acknowledged must not replay
/// that write: "from now on" includes everything acknowledged before the call (the race the
/// conformance run above hits only now and then, made likely by repetition).
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn follower_watch_starts_after_acknowledged_writes() {
    bounded(
        "follower_watch_starts_after_acknowledged_writes",
        Duration::from_secs(90),
        async {
            let cluster = MetadataCluster::start(3).await;
            let leader = cluster.wait_for_leader(ELECTION).await;
            let follower = (leader + 1) % cluster.len();
            let store = quire_metadata::connect(&cluster.uri_of(&[follower]))
                .await
                .expect("connect to one follower");
            for i in 0..30 {
                let key = format!("/follower-watch/k{i}");
                within("create", store.create(&key, b("0"), None))
                    .await
                    .expect("create");
                let mut w = within("watch", store.watch(WatchTarget::Key(key.clone())))
                    .await
                    .expect("watch");
                let v2 = within("cas", store.compare_and_set(&key, b("1"), 1))
                    .await
                    .expect("cas");
                let ev = within("the watch event", w.next()).await;
                assert_eq!(
                    ev,
                    Some(WatchEvent::Put(v2)),
                    "round {i}: a watch started through follower {} after the create of {key} \
                     was acknowledged delivered that create",
                    cluster.node(follower).id()
                );
            }
        },
    )
    .await;
}

// ------------------------------------------------------------------------------------------------
// b. Linearizable CAS across a leader crash.

const COUNTER: &str = "/cas/counter";

#[derive(Default)]
struct CasStats {
    /// (new value, new version) of every acknowledged CAS.
    wins: Mutex<Vec<(u64, u64)>>,
    win_count: AtomicUsize,
    bad_version: AtomicUsize,
    /// Errors other than BadVersion, by kind.
    errors: Mutex<BTreeMap<String, usize>>,
    /// Failed reads: (count, first message) by kind.
    read_errors: Mutex<BTreeMap<String, (usize, String)>>,
}

fn kind(e: &MetaError) -> String {
    format!("{e:?}")
        .split('(')
        .next()
        .unwrap_or("?")
        .to_string()
}

/// One client: read the counter, CAS it to value + 1 at the version read, repeat; every call is
/// recorded in the history.
async fn cas_client(
    client: u64,
    store: DynStore,
    history: Arc<Mutex<History>>,
    stop: Arc<AtomicBool>,
    stats: Arc<CasStats>,
) {
    while !stop.load(Ordering::Relaxed) {
        let id = history.lock().unwrap().invoke(client, Op::Read);
        let r = tokio::time::timeout(CALL, store.get(COUNTER)).await;
        let r = r.unwrap_or_else(|_| Err(MetaError::Ambiguous("test timeout".into())));
        history.lock().unwrap().complete(id, Outcome::of_get(&r));
        let (value, version) = match r {
            Ok(Some(kv)) => (decode_value(&kv.value), kv.version),
            Ok(None) => panic!("client {client}: the counter vanished"),
            Err(e) => {
                {
                    let mut errs = stats.read_errors.lock().unwrap();
                    errs.entry(kind(&e)).or_insert_with(|| (0, e.to_string())).0 += 1;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            }
        };
        let op = Op::Cas {
            expected_version: version,
            new_value: value + 1,
        };
        let id = history.lock().unwrap().invoke(client, op);
        let r = tokio::time::timeout(
            CALL,
            store.compare_and_set(COUNTER, encode_value(value + 1), version),
        )
        .await;
        let r = r.unwrap_or_else(|_| Err(MetaError::Ambiguous("test timeout".into())));
        history.lock().unwrap().complete(id, Outcome::of_cas(&r));
        match r {
            Ok(kv) => {
                assert_eq!(
                    (decode_value(&kv.value), kv.version),
                    (value + 1, version + 1),
                    "client {client}: a CAS answered with another value or version"
                );
                stats.wins.lock().unwrap().push((value + 1, kv.version));
                stats.win_count.fetch_add(1, Ordering::Relaxed);
            }
            Err(MetaError::BadVersion { .. }) => {
                stats.bad_version.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                *stats.errors.lock().unwrap().entry(kind(&e)).or_default() += 1;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
}

/// The (value, version) of the counter, read through `store` and recorded in the history.
async fn read_counter(store: &DynStore, history: &Mutex<History>, client: u64) -> (u64, u64) {
    let id = history.lock().unwrap().invoke(client, Op::Read);
    let r = within("read the counter", store.get(COUNTER)).await;
    history.lock().unwrap().complete(id, Outcome::of_get(&r));
    let kv = r.expect("read the counter").expect("the counter exists");
    (decode_value(&kv.value), kv.version)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_leader_during_cas_stream() {
    bounded("kill_leader_during_cas_stream", Duration::from_secs(90), async {
        let started = Instant::now();
        let mut cluster = MetadataCluster::start(3).await;
        let store = cluster.store().await;
        let history = Arc::new(Mutex::new(History::new()));
        let id = history.lock().unwrap().invoke(0, Op::Create { value: 0 });
        let r = within("create the counter", store.create(COUNTER, encode_value(0), None)).await;
        history.lock().unwrap().complete(id, Outcome::of_create(&r));
        r.expect("create the counter");

        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(CasStats::default());
        let clients: Vec<_> = (1..=4u64)
            .map(|c| {
                tokio::spawn(cas_client(
                    c,
                    store.clone(),
                    history.clone(),
                    stop.clone(),
                    stats.clone(),
                ))
            })
            .collect();

        tokio::time::sleep(Duration::from_millis(1500)).await;
        let before_kill = stats.win_count.load(Ordering::Relaxed);
        assert!(before_kill > 0, "no CAS succeeded in 1.5 s before the kill");
        let old = cluster.wait_for_leader(ELECTION).await;
        let old_id = cluster.node(old).id();
        cluster.node_mut(old).kill9();
        let killed = Instant::now();
        eprintln!(
            "killed leader {old_id} after {before_kill} successful CAS ({:?} into the test)",
            started.elapsed()
        );

        // A new leader, as `quire metadata status --json` reports it.
        let mut new_leader = None;
        while new_leader.is_none() {
            let nodes = cluster.status_cli().await;
            let live: Vec<&serde_json::Value> =
                nodes.iter().filter(|n| n.get("error").is_none()).collect();
            let leaders: BTreeSet<Option<u64>> =
                live.iter().map(|n| n["leader"].as_u64()).collect();
            if live.len() == 2
                && leaders.len() == 1
                && let Some(Some(l)) = leaders.first()
                && *l != old_id
            {
                new_leader = Some(*l);
            } else {
                assert!(
                    killed.elapsed() < ELECTION,
                    "no new leader within {ELECTION:?} of killing {old_id}: {nodes:?}"
                );
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
        eprintln!(
            "node {} leads {:?} after the kill",
            new_leader.unwrap_or_default(),
            killed.elapsed()
        );

        // The clients go on.
        let at_election = stats.win_count.load(Ordering::Relaxed);
        let deadline = Instant::now() + ELECTION;
        while stats.win_count.load(Ordering::Relaxed) < at_election + 20 {
            assert!(
                Instant::now() < deadline,
                "no progress within {ELECTION:?} of the election: {} successful CAS since, \
                 CAS errors {:?}, read errors {:?}",
                stats.win_count.load(Ordering::Relaxed) - at_election,
                stats.errors.lock().unwrap(),
                stats.read_errors.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }

        // The old leader comes back on its address and data, while writes go on.
        cluster.node_mut(old).restart().await;
        tokio::time::sleep(Duration::from_millis(1000)).await;
        stop.store(true, Ordering::Relaxed);
        for c in clients {
            tokio::time::timeout(Duration::from_secs(30), c)
                .await
                .expect("a client did not stop")
                .expect("a client panicked");
        }
        let (final_value, final_version) = read_counter(&store, &history, 0).await;

        // It catches up with the leader and serves the final value by itself.
        let leader = cluster.wait_for_leader(ELECTION).await;
        let target = cluster
            .node(leader)
            .status()
            .await
            .expect("leader status")
            .last_applied;
        let restarted = cluster.node(old);
        wait_until(ELECTION, "the restarted node to catch up", || async {
            restarted
                .status()
                .await
                .is_ok_and(|s| s.last_applied >= target)
        })
        .await;
        let alone = quire_metadata::connect(&restarted.uri())
            .await
            .expect("connect to the restarted node");
        let seen = read_counter(&alone, &history, 5).await;
        assert_eq!(
            seen,
            (final_value, final_version),
            "the restarted node serves another counter"
        );

        // Invariants of the acknowledged CAS.
        let wins = stats.wins.lock().unwrap().clone();
        let after_kill = stats.win_count.load(Ordering::Relaxed) - before_kill;
        let errors = stats.errors.lock().unwrap().clone();
        let read_errors = stats.read_errors.lock().unwrap().clone();
        eprintln!(
            "{} successful CAS ({before_kill} before the kill, {after_kill} after), {} BadVersion, \
             other CAS errors {errors:?}, read errors {read_errors:?}; final value \
             {final_value} at version {final_version}",
            wins.len(),
            stats.bad_version.load(Ordering::Relaxed),
        );
        assert_eq!(
            final_version,
            final_value + 1,
            "every applied CAS adds 1 to the value and to the version"
        );
        let mut values = BTreeSet::new();
        for &(value, version) in &wins {
            assert!(
                value <= final_value,
                "acknowledged value {value} is above the final value {final_value}"
            );
            assert!(
                values.insert(value),
                "two writers won the CAS to value {value} (version {version})"
            );
        }
        assert!(
            wins.len() as u64 <= final_value,
            "{} acknowledged increments but the counter is at {final_value}",
            wins.len()
        );

        // The whole history is linearizable.
        let h = history.lock().unwrap().clone();
        let ops = h.len();
        let (tx, rx) = tokio::sync::oneshot::channel();
        std::thread::spawn(move || {
            let t = Instant::now();
            let _ = tx.send((h.check(), t.elapsed()));
        });
        let (verdict, took) = tokio::time::timeout(Duration::from_secs(60), rx)
            .await
            .expect("the linearizability check took over 60 s")
            .expect("checker thread");
        eprintln!(
            "checked {ops} operations in {took:?}; test took {:?}",
            started.elapsed()
        );
        if let Err(e) = verdict {
            panic!("the CAS history is not linearizable: {e}");
        }

        // Reads are always retried by the client until its deadline: a leader change must not
        // fail one.
        assert!(
            read_errors.is_empty(),
            "reads failed across the leader change: {read_errors:?}"
        );
    })
    .await;
}

// ------------------------------------------------------------------------------------------------
// c. Acknowledged creates survive a leader crash.

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn acknowledged_writes_survive_leader_kill() {
    bounded(
        "acknowledged_writes_survive_leader_kill",
        Duration::from_secs(90),
        async {
            let mut cluster = MetadataCluster::start(3).await;
            let store = cluster.store().await;
            let mut acked: BTreeMap<String, Bytes> = BTreeMap::new();
            let mut attempted: BTreeMap<String, Bytes> = BTreeMap::new();
            let mut failed: BTreeMap<String, usize> = BTreeMap::new();
            let mut samples: BTreeMap<String, String> = BTreeMap::new();
            let mut killed = None;
            let budget = Instant::now() + Duration::from_secs(45);
            for i in 0..200 {
                assert!(
                    Instant::now() < budget,
                    "creates stalled after the leader was killed: {} acknowledged, {} of 200 \
                     attempted in 45 s; failures {failed:?}",
                    acked.len(),
                    attempted.len()
                );
                if i == 100 {
                    let old = cluster.wait_for_leader(ELECTION).await;
                    cluster.node_mut(old).kill9();
                    killed = Some(old);
                }
                let key = format!("/acked/key-{i:03}");
                let value = b(&format!("value {i} {}", "x".repeat(i % 37)));
                attempted.insert(key.clone(), value.clone());
                match within("create", store.create(&key, value.clone(), None)).await {
                    Ok(kv) => {
                        assert_eq!((kv.key.as_str(), kv.version), (key.as_str(), 1));
                        acked.insert(key, value);
                    }
                    Err(e) => {
                        *failed.entry(kind(&e)).or_default() += 1;
                        samples
                            .entry(kind(&e))
                            .or_insert_with(|| format!("key {i}: {e}"));
                    }
                }
            }
            let old = killed.expect("killed midway");
            let leader = cluster.wait_for_leader(ELECTION).await;
            assert_ne!(leader, old, "the killed node cannot lead");
            let after_kill = acked
                .keys()
                .filter(|k| k.as_str() >= "/acked/key-100")
                .count();
            eprintln!(
                "{} of 200 creates acknowledged ({after_kill} after the kill); failures \
                 {failed:?}, e.g. {samples:?}",
                acked.len()
            );

            for (who, s) in [
                ("the cluster", store.clone()),
                (
                    "the new leader alone",
                    quire_metadata::connect(&cluster.node(leader).uri())
                        .await
                        .expect("connect"),
                ),
            ] {
                let listed: BTreeMap<String, KeyValue> = list(&s, "/acked/")
                    .await
                    .into_iter()
                    .map(|kv| (kv.key.clone(), kv))
                    .collect();
                for (key, value) in &acked {
                    let kv = listed
                        .get(key)
                        .unwrap_or_else(|| panic!("{who}: acknowledged key {key} is missing"));
                    assert_eq!(&kv.value, value, "{who}: {key} has another value");
                    assert_eq!(kv.version, 1, "{who}: {key}");
                }
                // Whatever else is there was attempted (an ambiguous create), with its value.
                for (key, kv) in &listed {
                    assert_eq!(
                        attempted.get(key),
                        Some(&kv.value),
                        "{who}: {key} was never written with this value"
                    );
                }
            }

            // Availability: the kill fell between two creates, so none was in flight on the dead
            // leader; every later create must wait out the election (the client retries what
            // certainly did not apply) instead of failing.
            let failures: usize = failed.values().sum();
            assert!(
                failures <= 2,
                "{failures} creates failed across the leader change, though none was in flight \
                 at the kill: {failed:?}, e.g. {samples:?}"
            );
        },
    )
    .await;
}

// ------------------------------------------------------------------------------------------------
// d, e. Bookie registration and sessions.

/// The ids in the writable and the read-only lists.
async fn registered(store: &DynStore) -> (BTreeSet<String>, BTreeSet<String>) {
    let all = within("list bookies", BookieRegistry::new(store.clone()).list())
        .await
        .expect("list bookies");
    let (ro, rw): (Vec<_>, Vec<_>) = all.into_iter().partition(|b| b.read_only);
    (
        rw.into_iter().map(|b| b.id).collect(),
        ro.into_iter().map(|b| b.id).collect(),
    )
}

/// A bookie registered in the metadata cluster with a 2 s session.
async fn bookie_with_metadata(name: &str, uri: &str) -> BookieProcess {
    BookieProcess::start(BookieOpts::new(name).config(&format!(
        "metadata = \"{uri}\"\nsession_timeout_ms = 2000\n"
    )))
    .await
}

async fn wait_registered(store: &DynStore, id: &str, read_only: bool, what: &str) {
    wait_until(ELECTION, what, || async {
        let (rw, ro) = registered(store).await;
        if read_only {
            ro.contains(id) && !rw.contains(id)
        } else {
            rw.contains(id) && !ro.contains(id)
        }
    })
    .await;
}

async fn wait_unregistered(store: &DynStore, id: &str, timeout: Duration, what: &str) {
    wait_until(timeout, what, || async {
        let (rw, ro) = registered(store).await;
        !rw.contains(id) && !ro.contains(id)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dead_bookie_leaves_the_registry() {
    bounded("dead_bookie_leaves_the_registry", Duration::from_secs(120), async {
        let cluster = MetadataCluster::start(3).await;
        let store = cluster.store().await;
        let mut bookie = bookie_with_metadata("registry", &cluster.uri()).await;
        let id = bookie.bookie_id().to_string();
        wait_registered(&store, &id, false, "the bookie in the writable list").await;

        let (code, body) =
            bookie.http_put("/api/v1/bookie/state/readonly", r#"{"readOnly": true}"#);
        assert_eq!(code, 200, "force read-only: {body}");
        wait_registered(&store, &id, true, "the bookie in the read-only list").await;

        bookie.kill9();
        let killed = Instant::now();
        let (rw, ro) = registered(&store).await;
        assert!(
            ro.contains(&id) && !rw.contains(&id),
            "the registration must outlive the process until its session times out (checked \
             {:?} after the kill): writable {rw:?}, read-only {ro:?}",
            killed.elapsed()
        );
        wait_unregistered(
            &store,
            &id,
            Duration::from_secs(15),
            "the dead bookie to leave the registry",
        )
        .await;
        let gone = killed.elapsed();
        eprintln!("registration gone {gone:?} after SIGKILL (session timeout 2 s)");
        assert!(
            gone >= Duration::from_millis(500),
            "the registration vanished {gone:?} after the kill: sooner than any 2 s session allows"
        );

        // Back on the same directories (and bookie id): registered again. Read-only was forced
        // at run time, so it comes back writable.
        bookie.restart().await;
        wait_registered(&store, &id, false, "the restarted bookie in the writable list").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn session_resuming_too_late_reregisters() {
    bounded(
        "session_resuming_too_late_reregisters",
        Duration::from_secs(90),
        async {
            let mut cluster = MetadataCluster::start(1).await;
            let store = cluster.store().await;
            let ttl = Duration::from_secs(1);
            let key = "/sessions/owner";

            let session = within("start a session", Session::start(store.clone(), ttl))
                .await
                .expect("start a session");
            let old_lease = session.lease();
            let kv = within("create", store.create(key, b("first"), Some(old_lease)))
                .await
                .expect("create an ephemeral key");
            assert_eq!(kv.lease, old_lease);
            // Kept alive past several TTLs, it stays.
            tokio::time::sleep(ttl * 3).await;
            assert!(!session.is_lost());
            let kv = within("get", store.get(key)).await.expect("get");
            assert_eq!(
                kv.map(|kv| kv.lease),
                Some(old_lease),
                "a live session's key"
            );

            // The process "pauses": no more keep-alives (dropping the session aborts them).
            drop(session);
            let paused = Instant::now();
            // Renewed at most a third of the TTL ago, the lease outlives the pause for a while.
            assert!(
                within("get", store.get(key)).await.expect("get").is_some(),
                "the key vanished {:?} after the last keep-alives stopped",
                paused.elapsed()
            );
            wait_until(ELECTION, "the ephemeral key to expire", || async {
                within("get", store.get(key)).await.expect("get").is_none()
            })
            .await;
            eprintln!("ephemeral key gone {:?} after the pause", paused.elapsed());
            tokio::time::sleep(ttl.saturating_sub(paused.elapsed())).await;
            match within("keep-alive", store.keep_alive(old_lease)).await {
                Err(MetaError::LeaseNotFound(l)) => assert_eq!(l, old_lease),
                other => panic!("keep-alive of an expired lease gave {other:?}"),
            }

            // Resuming: a new session, and the key again.
            let session = within("start a session", Session::start(store.clone(), ttl))
                .await
                .expect("start a new session");
            assert_ne!(session.lease(), old_lease);
            within(
                "create",
                store.create(key, b("second"), Some(session.lease())),
            )
            .await
            .expect("re-create the ephemeral key");
            tokio::time::sleep(ttl * 2).await;
            let kv = within("get", store.get(key))
                .await
                .expect("get")
                .expect("the re-created key lives on");
            assert_eq!((kv.value, kv.lease), (b("second"), session.lease()));
            within("close", session.close()).await.expect("close");
            assert_eq!(within("get", store.get(key)).await.expect("get"), None);

            // A clean restart (SIGTERM, same address and data) keeps the durable keys only.
            within("create", store.create("/sessions/durable", b("d"), None))
                .await
                .expect("create a durable key");
            let lease = within("grant", store.grant_lease(Duration::from_secs(60)))
                .await
                .expect("grant a lease");
            within("create", store.create(key, b("third"), Some(lease)))
                .await
                .expect("create an ephemeral key");
            cluster.node_mut(0).restart().await;
            let kv = within("get after restart", store.get("/sessions/durable"))
                .await
                .expect("get after restart");
            assert_eq!(kv.map(|kv| kv.value), Some(b("d")));
            // The lease survives the restart too (it is in the replicated state, with a fresh
            // TTL from the new leader), so its key is still there.
            let kv = within("get after restart", store.get(key))
                .await
                .expect("get after restart");
            assert_eq!(kv.map(|kv| kv.lease), Some(lease));
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn paused_bookie_reregisters_after_its_session_expired() {
    bounded(
        "paused_bookie_reregisters_after_its_session_expired",
        Duration::from_secs(120),
        async {
            let cluster = MetadataCluster::start(1).await;
            let store = cluster.store().await;
            let bookie = bookie_with_metadata("paused", &cluster.uri()).await;
            let id = bookie.bookie_id().to_string();
            wait_registered(&store, &id, false, "the bookie in the writable list").await;
            let lease_before = within("get", store.get(&format!("/quire/bookies/writable/{id}")))
                .await
                .expect("get")
                .expect("registered")
                .lease;

            let pid = bookie.pid().expect("running");
            send_signal(pid, libc::SIGSTOP);
            // Resume it whatever happens below (Drop kills it anyway, stopped or not).
            struct Resume(u32);
            impl Drop for Resume {
                fn drop(&mut self) {
                    // SAFETY: kill(2); the bookie is our unreaped child.
                    unsafe { libc::kill(self.0 as libc::pid_t, libc::SIGCONT) };
                }
            }
            let resume = Resume(pid);
            wait_unregistered(
                &store,
                &id,
                Duration::from_secs(15),
                "the paused bookie's registration to expire",
            )
            .await;
            // Well past the session timeout, it wakes up.
            tokio::time::sleep(Duration::from_millis(500)).await;
            drop(resume);
            let resumed = Instant::now();
            wait_registered(
                &store,
                &id,
                false,
                "the resumed bookie to register again by itself",
            )
            .await;
            let lease_after = within("get", store.get(&format!("/quire/bookies/writable/{id}")))
                .await
                .expect("get")
                .expect("registered")
                .lease;
            assert_ne!(
                lease_after, lease_before,
                "a new session after the old one expired"
            );
            eprintln!("re-registered {:?} after SIGCONT", resumed.elapsed());
            assert!(bookie.is_running());
            let (code, body) = bookie.http_get("/api/v1/bookie/state");
            assert_eq!(code, 200, "the resumed bookie serves: {body}");
        },
    )
    .await;
}

// ------------------------------------------------------------------------------------------------
// f. Bad input.

/// A raw gRPC status mapped to the store error it carries.
fn meta_err(s: &tonic::Status) -> MetaError {
    quire_metadata::wire::from_status(s, false)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_changes_nothing() {
    bounded("bad_input_changes_nothing", Duration::from_secs(120), async {
        let cluster = MetadataCluster::start(3).await;
        let store = cluster.store().await;
        let prefix = "/bad/";
        within("create", store.create("/bad/a", b("a1"), None))
            .await
            .expect("create /bad/a");
        within("create", store.create("/bad/b", b("b1"), None))
            .await
            .expect("create /bad/b");
        within("cas", store.compare_and_set("/bad/b", b("b2"), 1))
            .await
            .expect("cas /bad/b");
        let before = list(&store, prefix).await;
        assert_eq!(before.len(), 2);

        // Through the client library.
        let big = Bytes::from(vec![7u8; MAX_VALUE_LEN + 1]);
        match within("create", store.create("/bad/big", big.clone(), None)).await {
            Err(MetaError::TooLarge(_)) => {}
            other => panic!("oversized create gave {other:?}"),
        }
        match within("cas", store.compare_and_set("/bad/a", big.clone(), 1)).await {
            Err(MetaError::TooLarge(_)) => {}
            other => panic!("oversized CAS gave {other:?}"),
        }
        match within("create", store.create("bad/relative", b("x"), None)).await {
            Err(MetaError::InvalidArgument(_)) => {}
            other => panic!("create of a key without '/' gave {other:?}"),
        }
        match within("cas", store.compare_and_set("/bad/b", b("stale"), 1)).await {
            Err(MetaError::BadVersion {
                key,
                expected,
                actual,
            }) => assert_eq!((key.as_str(), expected, actual), ("/bad/b", 1, 2)),
            other => panic!("CAS at a stale version gave {other:?}"),
        }
        match within("delete", store.delete("/bad/b", Some(1))).await {
            Err(MetaError::BadVersion { .. }) => {}
            other => panic!("delete at a stale version gave {other:?}"),
        }
        match within("create", store.create("/bad/a", b("again"), None)).await {
            Err(MetaError::AlreadyExists(_)) => {}
            other => panic!("create of an existing key gave {other:?}"),
        }

        let leader = cluster.wait_for_leader(ELECTION).await;
        let before_status = cluster.node(leader).status().await.expect("leader status");

        // Raw gRPC to every node: the server checks too, and garbage raft traffic is refused.
        let seed: u64 = rand::random();
        eprintln!("garbage seed: {seed}");
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        for i in 0..cluster.len() {
            let addr = cluster.node(i).addr().to_string();
            let mut c = quire_metadata::raft::network::client(&addr).expect("client");
            let r = within(
                "raw create",
                c.create(pb::CreateRequest {
                    key: "/bad/big".into(),
                    value: big.clone(),
                    lease: 0,
                }),
            )
            .await;
            match r.map_err(|s| meta_err(&s)) {
                Err(MetaError::TooLarge(_)) => {}
                other => panic!("node {i}: raw oversized create gave {other:?}"),
            }
            let r = within(
                "raw create",
                c.create(pb::CreateRequest {
                    key: "no-slash".into(),
                    value: b("x"),
                    lease: 0,
                }),
            )
            .await;
            match r.map_err(|s| meta_err(&s)) {
                Err(MetaError::InvalidArgument(_)) => {}
                other => panic!("node {i}: raw create of a key without '/' gave {other:?}"),
            }
            let r = within(
                "raw cas",
                c.compare_and_set(pb::CompareAndSetRequest {
                    key: "/bad/a".into(),
                    value: b("stale"),
                    expected_version: 7,
                }),
            )
            .await;
            match r.map_err(|s| meta_err(&s)) {
                Err(MetaError::BadVersion { .. }) => {}
                other => panic!("node {i}: raw stale CAS gave {other:?}"),
            }

            // Random bytes; and every first byte followed by junk, which no node ever sends (a
            // decoder that stops early and ignores the rest would take some of these).
            let mut payloads: Vec<Vec<u8>> = vec![Vec::new()];
            for _ in 0..20 {
                let len = rng.random_range(16..200);
                payloads.push((0..len).map(|_| rng.random()).collect());
            }
            if i == leader {
                for first in 0..=255u8 {
                    let mut p = vec![0xff; 16];
                    p[0] = first;
                    payloads.push(p);
                }
            }
            for p in &payloads {
                for (rpc, kind) in [("Raft", "append"), ("Propose", "command")] {
                    let req = pb::RaftRequest {
                        kind: kind.into(),
                        payload: Bytes::copy_from_slice(p),
                    };
                    let r = if rpc == "Raft" {
                        within("raw raft", c.raft(req)).await
                    } else {
                        within("raw propose", c.propose(req)).await
                    };
                    if let Ok(ok) = r {
                        panic!(
                            "node {i}: {rpc}({kind}) accepted garbage {p:02x?}: replied {:02x?}",
                            ok.into_inner().payload
                        );
                    }
                }
            }
            for (rpc, kind) in [("Raft", "nonsense"), ("Propose", "nonsense")] {
                let req = pb::RaftRequest {
                    kind: kind.into(),
                    payload: b("x"),
                };
                let r = if rpc == "Raft" {
                    within("raw raft", c.raft(req)).await
                } else {
                    within("raw propose", c.propose(req)).await
                };
                assert_eq!(
                    r.expect_err("an unknown message kind").code(),
                    tonic::Code::InvalidArgument,
                    "node {i}: {rpc}({kind})"
                );
            }
            // The node keeps serving, alone.
            let alone = quire_metadata::connect(&cluster.node(i).uri())
                .await
                .expect("connect");
            let kv = within("get", alone.get("/bad/b"))
                .await
                .unwrap_or_else(|e| panic!("node {i} stopped serving: {e:?}"));
            assert_eq!(kv.map(|kv| kv.value), Some(b("b2")));
        }

        // The CLI with bad URIs: a non-zero exit and a message naming the problem.
        for (args, expect) in [
            (
                vec!["metadata", "list", "--metadata", "zk://127.0.0.1:2181", "/bad/"],
                "unknown metadata URI",
            ),
            (
                vec!["metadata", "get", "--metadata", "quire://no-port", "/bad/a"],
                "is not host:port",
            ),
            (
                vec!["metadata", "status", "--metadata", "quire://"],
                "no host:port given",
            ),
            (
                vec!["metadata", "status", "--metadata", "file:///tmp/x"],
                "need a quire:// URI",
            ),
        ] {
            let out = run_quire(&args, META_TIMEOUT).await;
            assert!(
                !out.status.success(),
                "quire {args:?} succeeded: {}",
                out.stdout
            );
            assert!(
                out.stderr.contains(expect),
                "quire {args:?}: expected {expect:?} in stderr:\n{}",
                out.stderr
            );
            assert!(
                !out.stderr.contains("panicked"),
                "quire {args:?} panicked:\n{}",
                out.stderr
            );
        }
        // A bad key through the CLI against the real cluster.
        let uri = cluster.uri();
        let args = ["metadata", "get", "--metadata", &uri, "relative"];
        let out = run_quire(&args, META_TIMEOUT).await;
        assert!(!out.status.success(), "get of a relative key succeeded");
        assert!(out.stderr.contains("must start with '/'"), "{}", out.stderr);

        let after = list(&store, prefix).await;
        assert_eq!(after, before, "bad input changed the keys under {prefix}");
        // Nothing else changed either, and no garbage vote or append disturbed the leader.
        assert_eq!(
            cluster.wait_for_leader(ELECTION).await,
            leader,
            "leadership moved"
        );
        let after_status = cluster.node(leader).status().await.expect("leader status");
        assert_eq!(
            (after_status.term, after_status.revision, after_status.keys),
            (before_status.term, before_status.revision, before_status.keys),
            "bad input changed the term, the store revision or the key count"
        );
    })
    .await;
}
