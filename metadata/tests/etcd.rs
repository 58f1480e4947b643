//! The etcd backend against a real etcd server.
//!
//! Each test starts its own single-member etcd on 127.0.0.1 (ephemeral ports, data in a temporary
//! directory) and kills it when done, even on panic. The binary is `$QUIRE_ETCD_BIN`,
//! `/usr/bin/etcd` or `etcd` on the PATH (Debian: `apt-get install etcd-server`); without one the
//! tests print that they were skipped and pass.
//!
//! Run with `cargo test -p quire-metadata --features etcd --test etcd`.
#![cfg(feature = "etcd")]

use std::collections::BTreeSet;
use std::fs::File;
use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire_metadata::etcd::{EtcdOptions, EtcdStore};
use quire_metadata::store::{MAX_LIST_LIMIT, MAX_VALUE_LEN, list_all};
use quire_metadata::{KeyValue, MetaError, MetadataStore, Watch, WatchEvent, WatchTarget};

/// Longest wait for etcd to start answering.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// Longest wait for one call or one watch event.
const STEP_TIMEOUT: Duration = Duration::from_secs(15);

/// A running etcd, killed (and reaped) on drop.
struct Etcd {
    child: Child,
    endpoint: String,
    log: PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Etcd {
    /// Starts etcd and waits until it serves linearizable reads; `None` when there is no etcd
    /// binary.
    async fn start() -> Option<Etcd> {
        let Some(bin) = etcd_binary() else {
            println!("skipped: no etcd binary (install Debian's etcd-server)");
            return None;
        };
        // Ports are picked by binding port 0 and releasing it; if another process grabs one in
        // between, etcd exits and we try again on fresh ports.
        let mut log = String::new();
        for _ in 0..3 {
            let mut etcd = Etcd::spawn(&bin);
            if etcd.wait_ready().await {
                return Some(etcd);
            }
            log = etcd.log_text();
        }
        panic!("etcd exited at start 3 times; last log:\n{log}");
    }

    fn spawn(bin: &Path) -> Etcd {
        let dir = tempfile::tempdir().expect("temporary directory");
        let client = format!("http://127.0.0.1:{}", free_port());
        let peer = format!("http://127.0.0.1:{}", free_port());
        let log = dir.path().join("etcd.log");
        let out = File::create(&log).expect("etcd log file");
        let err = out.try_clone().expect("etcd log file");
        let mut cmd = Command::new(bin);
        cmd.arg("--name")
            .arg("quire-test")
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .arg("--listen-client-urls")
            .arg(&client)
            .arg("--advertise-client-urls")
            .arg(&client)
            .arg("--listen-peer-urls")
            .arg(&peer)
            .arg("--initial-advertise-peer-urls")
            .arg(&peer)
            .arg("--initial-cluster")
            .arg(format!("quire-test={peer}"))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err);
        if std::env::consts::ARCH == "aarch64" {
            // etcd 3.4 refuses to start on arm64 unless told that this is deliberate.
            cmd.env("ETCD_UNSUPPORTED_ARCH", "arm64");
        }
        let child = cmd.spawn().expect("start etcd");
        Etcd {
            child,
            endpoint: client,
            log,
            _dir: dir,
        }
    }

    /// Waits until etcd answers a linearizable read (so it has elected itself leader); false
    /// if it exited first.
    async fn wait_ready(&mut self) -> bool {
        let started = Instant::now();
        loop {
            if let Ok(store) =
                EtcdStore::connect_with(std::slice::from_ref(&self.endpoint), quick()).await
                && store.get("/").await.is_ok()
            {
                return true;
            }
            if self.exited() {
                return false;
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "etcd at {} not ready after {START_TIMEOUT:?}; log:\n{}",
                self.endpoint,
                self.log_text()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    async fn store(&self, namespace: Option<&str>) -> EtcdStore {
        let options = EtcdOptions {
            namespace: namespace.map(str::to_string),
            ..EtcdOptions::default()
        };
        within(
            "connect",
            EtcdStore::connect_with(std::slice::from_ref(&self.endpoint), options),
        )
        .await
        .expect("connect to etcd")
    }
}

fn quick() -> EtcdOptions {
    EtcdOptions {
        namespace: None,
        timeout: Duration::from_secs(2),
    }
}

fn etcd_binary() -> Option<PathBuf> {
    if let Some(bin) = std::env::var_os("QUIRE_ETCD_BIN") {
        return Some(PathBuf::from(bin)).filter(|p| p.is_file());
    }
    let default = PathBuf::from("/usr/bin/etcd");
    if default.is_file() {
        return Some(default);
    }
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind an ephemeral port")
        .port()
}

async fn within<T>(what: &str, fut: impl Future<Output = T>) -> T {
    tokio::time::timeout(STEP_TIMEOUT, fut)
        .await
        .unwrap_or_else(|_| panic!("{what}: no answer within {STEP_TIMEOUT:?}"))
}

async fn next_event(w: &mut Watch, what: &str) -> WatchEvent {
    within(what, w.next())
        .await
        .unwrap_or_else(|| panic!("{what}: the watch ended"))
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

#[tokio::test]
async fn create_cas_delete_follow_versions() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = etcd.store(None).await;

    assert_eq!(store.get("/kv/a").await, Ok(None));
    let a = store.create("/kv/a", b("1"), None).await.unwrap();
    assert_eq!((a.key.as_str(), a.version, a.lease), ("/kv/a", 1, 0));
    assert_eq!(a.value, b("1"));
    assert!(a.mod_revision > 0);
    assert_eq!(a.create_revision, a.mod_revision);
    assert_eq!(store.get("/kv/a").await.unwrap().as_ref(), Some(&a));
    assert_eq!(
        store.create("/kv/a", b("2"), None).await,
        Err(MetaError::AlreadyExists("/kv/a".into()))
    );
    assert_eq!(store.get("/kv/a").await.unwrap().as_ref(), Some(&a));

    // Compare-and-set at the right version, then at a stale one.
    let a2 = store.compare_and_set("/kv/a", b("2"), 1).await.unwrap();
    assert_eq!((a2.version, a2.create_revision), (2, a.create_revision));
    assert!(a2.mod_revision > a.mod_revision);
    assert_eq!(store.get("/kv/a").await.unwrap().as_ref(), Some(&a2));
    assert_eq!(
        store.compare_and_set("/kv/a", b("stale"), 1).await,
        Err(MetaError::BadVersion {
            key: "/kv/a".into(),
            expected: 1,
            actual: 2
        })
    );
    // Version 0 is what etcd reports for an absent key; it must not match a present one.
    assert!(matches!(
        store.compare_and_set("/kv/a", b("zero"), 0).await,
        Err(MetaError::BadVersion { actual: 2, .. })
    ));
    assert_eq!(store.get("/kv/a").await.unwrap().as_ref(), Some(&a2));
    assert_eq!(
        store.compare_and_set("/kv/missing", b("x"), 1).await,
        Err(MetaError::NotFound("/kv/missing".into()))
    );
    assert_eq!(
        store.compare_and_set("/kv/missing", b("x"), 0).await,
        Err(MetaError::NotFound("/kv/missing".into()))
    );
    assert_eq!(store.get("/kv/missing").await, Ok(None));

    // Delete at a stale version, at the right one, and of a missing key.
    assert_eq!(
        store.delete("/kv/a", Some(1)).await,
        Err(MetaError::BadVersion {
            key: "/kv/a".into(),
            expected: 1,
            actual: 2
        })
    );
    assert_eq!(store.get("/kv/a").await.unwrap().as_ref(), Some(&a2));
    store.delete("/kv/a", Some(2)).await.unwrap();
    assert_eq!(store.get("/kv/a").await, Ok(None));
    assert_eq!(
        store.delete("/kv/a", None).await,
        Err(MetaError::NotFound("/kv/a".into()))
    );
    assert_eq!(
        store.delete("/kv/a", Some(2)).await,
        Err(MetaError::NotFound("/kv/a".into()))
    );

    // Recreated, the key starts over at version 1; an unconditional delete removes it.
    let again = store.create("/kv/a", b("3"), None).await.unwrap();
    assert_eq!(again.version, 1);
    assert!(again.create_revision > a2.mod_revision);
    store.delete("/kv/a", None).await.unwrap();
    assert_eq!(store.get("/kv/a").await, Ok(None));
}

#[tokio::test]
async fn bad_input_is_refused_before_sending() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = etcd.store(None).await;

    // etcd itself would take this value (its request cap is 1.5 MiB), so TooLarge can only come
    // from the client-side check, and the key must not exist afterwards.
    let big = Bytes::from(vec![1u8; MAX_VALUE_LEN + 1]);
    assert!(matches!(
        store.create("/bad/big", big.clone(), None).await,
        Err(MetaError::TooLarge(_))
    ));
    assert_eq!(store.get("/bad/big").await, Ok(None));
    store.create("/bad/k", b("v"), None).await.unwrap();
    assert!(matches!(
        store.compare_and_set("/bad/k", big, 1).await,
        Err(MetaError::TooLarge(_))
    ));
    assert_eq!(store.get("/bad/k").await.unwrap().unwrap().version, 1);
    // The largest value is accepted and reads back whole.
    let full = Bytes::from(vec![2u8; MAX_VALUE_LEN]);
    let kv = store
        .compare_and_set("/bad/k", full.clone(), 1)
        .await
        .unwrap();
    assert_eq!(kv.version, 2);
    assert_eq!(store.get("/bad/k").await.unwrap().unwrap().value, full);

    for key in ["", "relative", "/nul\0"] {
        assert!(matches!(
            store.create(key, b("v"), None).await,
            Err(MetaError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.get(key).await,
            Err(MetaError::InvalidArgument(_))
        ));
        assert!(matches!(
            store.watch(WatchTarget::Key(key.into())).await,
            Err(MetaError::InvalidArgument(_))
        ));
    }
    for limit in [0, MAX_LIST_LIMIT + 1] {
        assert!(matches!(
            store.list("/bad/", None, limit).await,
            Err(MetaError::InvalidArgument(_))
        ));
    }
    assert!(matches!(
        store.grant_lease(Duration::from_millis(10)).await,
        Err(MetaError::InvalidArgument(_))
    ));
    let all = list_all(&store, "").await.unwrap();
    assert_eq!(keys(&all), ["/bad/k"]);
}

#[tokio::test]
async fn list_pages_in_key_order() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = etcd.store(None).await;

    let mut want = Vec::new();
    let mut last_rev = 0;
    for i in 0..25 {
        let key = format!("/l/{i:02}");
        last_rev = store.create(&key, b("v"), None).await.unwrap().mod_revision;
        want.push(key);
    }
    for outside in ["/l-x", "/m", "/k"] {
        store.create(outside, b("o"), None).await.unwrap();
    }

    let first = store.list("/l/", None, 10).await.unwrap();
    assert_eq!(
        keys(&first.kvs),
        want[..10].iter().map(String::as_str).collect::<Vec<_>>()
    );
    assert!(first.more);
    assert!(first.revision >= last_rev);

    // Paging by `start_after` reaches every key once, in order; the last page says no more.
    let mut seen = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = store.list("/l/", after.as_deref(), 7).await.unwrap();
        assert!(page.kvs.len() <= 7);
        seen.extend(page.kvs.iter().map(|kv| kv.key.clone()));
        after = page.kvs.last().map(|kv| kv.key.clone());
        if !page.more {
            break;
        }
    }
    assert_eq!(seen, want);
    let exact = store.list("/l/", Some("/l/14"), 10).await.unwrap();
    assert_eq!(exact.kvs.len(), 10);
    assert!(!exact.more, "exactly the last 10 keys: nothing more");

    // `start_after` before the prefix starts at the prefix; after it, nothing is left.
    let from_start = store.list("/l/", Some("/a"), 100).await.unwrap();
    assert_eq!(from_start.kvs.len(), 25);
    assert!(!from_start.more);
    let past = store.list("/l/", Some("/l/zz"), 100).await.unwrap();
    assert!(past.kvs.is_empty() && !past.more);
    let beyond = store.list("/l/", Some("/z"), 100).await.unwrap();
    assert!(beyond.kvs.is_empty() && !beyond.more);

    // A plain string prefix: `/l` holds `/l/..` and `/l-x`; the empty prefix holds everything.
    assert_eq!(store.list("/l", None, 100).await.unwrap().kvs.len(), 26);
    let all = list_all(&store, "").await.unwrap();
    assert_eq!(all.len(), 28);
    assert_eq!(all.first().map(|kv| kv.key.as_str()), Some("/k"));
    assert_eq!(all.last().map(|kv| kv.key.as_str()), Some("/m"));
}

#[tokio::test]
async fn namespaces_keep_stores_apart() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let a = etcd.store(Some("/tenant-a")).await;
    let a_too = etcd.store(Some("/tenant-a/")).await;
    let ab = etcd.store(Some("/tenant-ab")).await;
    let raw = etcd.store(None).await;

    let kv = a.create("/k", b("a"), None).await.unwrap();
    assert_eq!(kv.key, "/k");
    ab.create("/k", b("ab"), None).await.unwrap();
    assert_eq!(a_too.get("/k").await.unwrap().unwrap().value, b("a"));
    assert_eq!(ab.get("/k").await.unwrap().unwrap().value, b("ab"));
    assert_eq!(keys(&list_all(&a, "").await.unwrap()), ["/k"]);
    assert_eq!(keys(&list_all(&ab, "").await.unwrap()), ["/k"]);
    assert_eq!(
        keys(&list_all(&raw, "").await.unwrap()),
        ["/tenant-a/k", "/tenant-ab/k"]
    );
    assert_eq!(a.allocate_id("c").await, Ok(0));
    assert_eq!(ab.allocate_id("c").await, Ok(0));
    assert_eq!(a_too.allocate_id("c").await, Ok(1));

    let mut w = a.watch(WatchTarget::Prefix(String::new())).await.unwrap();
    ab.create("/other", b("x"), None).await.unwrap();
    let mine = a.create("/mine", b("y"), None).await.unwrap();
    assert_eq!(
        next_event(&mut w, "namespaced watch").await,
        WatchEvent::Put(mine)
    );
}

#[tokio::test]
async fn watches_see_changes_in_order_and_resync_when_etcd_dies() {
    let Some(mut etcd) = Etcd::start().await else {
        return;
    };
    let store = etcd.store(None).await;
    store.create("/w/before", b("0"), None).await.unwrap();

    let mut prefix = store
        .watch(WatchTarget::Prefix("/w/".into()))
        .await
        .unwrap();
    let mut key = store.watch(WatchTarget::Key("/w/a".into())).await.unwrap();
    let a1 = store.create("/w/a", b("1"), None).await.unwrap();
    store.create("/w-outside", b("o"), None).await.unwrap();
    let b1 = store.create("/w/b", b("1"), None).await.unwrap();
    let a2 = store.compare_and_set("/w/a", b("2"), 1).await.unwrap();
    store.delete("/w/b", Some(1)).await.unwrap();
    store.delete("/w/a", None).await.unwrap();
    let after = store.list("/w/", None, 10).await.unwrap();

    let want = [
        WatchEvent::Put(a1.clone()),
        WatchEvent::Put(b1),
        WatchEvent::Put(a2.clone()),
        WatchEvent::Delete {
            key: "/w/b".into(),
            mod_revision: a2.mod_revision + 1,
        },
        WatchEvent::Delete {
            key: "/w/a".into(),
            mod_revision: a2.mod_revision + 2,
        },
    ];
    for (i, ev) in want.iter().enumerate() {
        assert_eq!(
            &next_event(&mut prefix, "prefix watch").await,
            ev,
            "event {i}"
        );
    }
    assert_eq!(after.revision, a2.mod_revision + 2);
    for ev in [&want[0], &want[2], &want[4]] {
        assert_eq!(&next_event(&mut key, "key watch").await, ev);
    }
    // Nothing else was due on either watch.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), prefix.next())
            .await
            .is_err()
    );

    // Dropping one watcher leaves the others (and the store) working.
    drop(key);
    store.create("/w/c", b("1"), None).await.unwrap();
    assert!(matches!(
        next_event(&mut prefix, "after a watcher left").await,
        WatchEvent::Put(kv) if kv.key == "/w/c"
    ));

    // When the server goes away, the watch ends with Resync, and requests are Unavailable
    // (the connection is refused, so nothing was sent).
    etcd.stop();
    assert_eq!(
        next_event(&mut prefix, "etcd killed").await,
        WatchEvent::Resync
    );
    assert_eq!(within("after Resync", prefix.next()).await, None);
    assert!(matches!(
        within("create with etcd down", store.create("/w/d", b("1"), None)).await,
        Err(MetaError::Unavailable(_))
    ));
    assert!(matches!(
        within("get with etcd down", store.get("/w/c")).await,
        Err(MetaError::Unavailable(_))
    ));
}

#[tokio::test]
async fn leases_bind_keys_and_expire() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = etcd.store(None).await;

    // Revoke deletes the lease's keys, and only those.
    let lease = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    let e = store.create("/lease/e", b("1"), Some(lease)).await.unwrap();
    assert_eq!(e.lease, lease);
    store.create("/lease/plain", b("1"), None).await.unwrap();
    let e2 = store.compare_and_set("/lease/e", b("2"), 1).await.unwrap();
    assert_eq!(e2.lease, lease, "cas keeps the key's lease");
    assert_eq!(
        store.get("/lease/e").await.unwrap().map(|kv| kv.lease),
        Some(lease)
    );
    assert_eq!(store.keep_alive(lease).await, Ok(Duration::from_secs(2)));
    let mut w = store
        .watch(WatchTarget::Key("/lease/e".into()))
        .await
        .unwrap();
    store.revoke_lease(lease).await.unwrap();
    assert_eq!(store.get("/lease/e").await, Ok(None));
    assert!(store.get("/lease/plain").await.unwrap().is_some());
    assert!(matches!(
        next_event(&mut w, "revoked key").await,
        WatchEvent::Delete { key, mod_revision } if key == "/lease/e" && mod_revision > e2.mod_revision
    ));
    assert_eq!(
        store.keep_alive(lease).await,
        Err(MetaError::LeaseNotFound(lease))
    );
    assert_eq!(
        store.revoke_lease(lease).await,
        Err(MetaError::LeaseNotFound(lease))
    );

    // A lease left alone expires (etcd rounds 1 s up to its minimum TTL); one kept alive lives.
    let granted = Instant::now();
    let short = store.grant_lease(Duration::from_secs(1)).await.unwrap();
    store
        .create("/lease/short", b("1"), Some(short))
        .await
        .unwrap();
    let kept = store.grant_lease(Duration::from_secs(2)).await.unwrap();
    store
        .create("/lease/kept", b("1"), Some(kept))
        .await
        .unwrap();
    let mut w = store
        .watch(WatchTarget::Key("/lease/short".into()))
        .await
        .unwrap();
    loop {
        assert_eq!(store.keep_alive(kept).await, Ok(Duration::from_secs(2)));
        if store.get("/lease/short").await.unwrap().is_none() {
            break;
        }
        assert!(
            granted.elapsed() < STEP_TIMEOUT,
            "a 1 s lease still holds its key after {STEP_TIMEOUT:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(granted.elapsed() >= Duration::from_secs(1), "expired early");
    assert!(matches!(
        next_event(&mut w, "expired key").await,
        WatchEvent::Delete { key, .. } if key == "/lease/short"
    ));
    assert_eq!(
        store.keep_alive(short).await,
        Err(MetaError::LeaseNotFound(short))
    );
    assert_eq!(
        store.create("/lease/late", b("1"), Some(short)).await,
        Err(MetaError::LeaseNotFound(short))
    );
    assert_eq!(store.get("/lease/late").await, Ok(None));
    // The kept lease outlived the short one and still holds its key.
    assert!(store.get("/lease/kept").await.unwrap().is_some());
    store.revoke_lease(kept).await.unwrap();
    assert_eq!(store.get("/lease/kept").await, Ok(None));

    // Leases etcd never granted.
    let unknown = 0x3fff_ffff_ffff_ff17;
    assert_eq!(
        store.create("/lease/unknown", b("1"), Some(unknown)).await,
        Err(MetaError::LeaseNotFound(unknown))
    );
    assert_eq!(
        store.keep_alive(unknown).await,
        Err(MetaError::LeaseNotFound(unknown))
    );
    assert_eq!(
        store.keep_alive(u64::MAX).await,
        Err(MetaError::LeaseNotFound(u64::MAX))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn allocate_id_is_monotonic_and_unique() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = std::sync::Arc::new(etcd.store(None).await);

    for want in 0..5 {
        assert_eq!(store.allocate_id("seq").await, Ok(want));
    }
    assert_eq!(store.allocate_id("other").await, Ok(0));

    const TASKS: u64 = 4;
    const PER_TASK: u64 = 50;
    let tasks: Vec<_> = (0..TASKS)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move {
                let mut got = Vec::new();
                for _ in 0..PER_TASK {
                    let id = store.allocate_id("shared").await.unwrap();
                    if let Some(&prev) = got.last() {
                        assert!(id > prev, "{id} after {prev}");
                    }
                    got.push(id);
                }
                got
            })
        })
        .collect();
    let mut all = Vec::new();
    for t in tasks {
        all.extend(within("allocating task", t).await.unwrap());
    }
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(distinct.len(), all.len(), "duplicate ids");
    // No failures, so no value was skipped either.
    assert_eq!(distinct, (0..TASKS * PER_TASK).collect());

    assert_eq!(store.allocate_id("seq").await, Ok(5));
    // Counters live outside the key space.
    assert!(list_all(store.as_ref(), "").await.unwrap().is_empty());
}

#[tokio::test]
async fn unreachable_endpoints_are_unavailable_and_skipped() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    // Nothing listens on a port just released.
    let dead = format!("127.0.0.1:{}", free_port());
    let err = EtcdStore::connect_with(std::slice::from_ref(&dead), quick())
        .await
        .unwrap_err();
    assert!(matches!(err, MetaError::Unavailable(_)), "{err:?}");
    assert!(err.is_retryable());

    // With a dead endpoint first, requests go to the live one.
    let store = EtcdStore::connect_with(&[dead, etcd.endpoint.clone()], quick())
        .await
        .unwrap();
    let kv = store.create("/failover", b("1"), None).await.unwrap();
    assert_eq!(store.get("/failover").await.unwrap(), Some(kv));

    assert!(matches!(
        EtcdStore::connect(&[]).await,
        Err(MetaError::InvalidArgument(_))
    ));
    assert!(matches!(
        EtcdStore::connect(&["https://127.0.0.1:1".into()]).await,
        Err(MetaError::InvalidArgument(_))
    ));
}

/// The backend-agnostic conformance suite, as run against every other backend.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_passes_the_conformance_suite() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let plain = etcd.store(None).await;
    quire_metadata::testkit::conformance::run_all(&plain, "/conformance/").await;
    let namespaced = etcd.store(Some("/tenant")).await;
    quire_metadata::testkit::conformance::run_all(&namespaced, "/conformance/").await;
}

#[tokio::test]
async fn plain_put_writes_and_bumps_the_version() {
    let Some(etcd) = Etcd::start().await else {
        return;
    };
    let store = etcd.store(None).await;
    let r1 = store.put("/bench/k", b("v1")).await.unwrap();
    let kv = store
        .get("/bench/k")
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!((kv.value, kv.version, kv.mod_revision), (b("v1"), 1, r1));
    let r2 = store.put("/bench/k", b("v2")).await.unwrap();
    assert!(r2 > r1);
    let kv = store
        .get("/bench/k")
        .await
        .unwrap()
        .expect("the key exists");
    assert_eq!((kv.value, kv.version, kv.mod_revision), (b("v2"), 2, r2));
    assert!(matches!(
        store.put("no-slash", b("x")).await,
        Err(MetaError::InvalidArgument(_))
    ));
}
