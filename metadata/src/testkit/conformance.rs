//! The [`MetadataStore`] contract as executable checks, for every backend.
//!
//! [`run_all`] runs each check in turn under a prefix of its own (`<prefix><check>/`), so a
//! backend shared with other tests (an etcd server, a raft cluster) can be used as long as the
//! prefix is unique, e.g. `/conformance-<random>/`. Each check is also exported on its own. A
//! deviation panics with a message naming the check and the call; every call is bounded by a
//! timeout ([`CALL_TIMEOUT`]) so a stuck backend fails instead of hanging.
//!
//! The checks need a tokio runtime with the time driver (`#[tokio::test]` has it). They take
//! about as long as two lease lifetimes (~6 s in all).
//!
//! Contract decisions made explicit here:
//! - `list` with `limit == 0` or `limit > MAX_LIST_LIMIT` is `InvalidArgument`;
//! - `list` treats `prefix` as a plain string prefix (`/a` lists `/a`, `/a/1` and `/ab`), and a
//!   `start_after` ordered before the prefix lists from the start of the prefix;
//! - a page holds `min(limit, keys left)` keys and `more` says exactly whether keys remain;
//! - a key longer than `MAX_KEY_LEN` or a value longer than `MAX_VALUE_LEN` is `TooLarge`, and
//!   exactly that length is accepted; a key not starting with `/` or containing NUL is
//!   `InvalidArgument`; a lease TTL outside `MIN_LEASE_TTL..=MAX_LEASE_TTL` is `InvalidArgument`;
//! - `allocate_id` on a fresh counter starts at 0 and, without failures, never goes back;
//! - a lease never expires before its TTL has passed since its grant was sent.

use std::collections::BTreeSet;
use std::future::Future;
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::future::join_all;

use crate::store::{
    KeyValue, LeaseId, MAX_KEY_LEN, MAX_LEASE_TTL, MAX_LIST_LIMIT, MAX_VALUE_LEN, MIN_LEASE_TTL,
    MetaError, MetadataStore, Result, Watch, WatchEvent, WatchTarget, list_all,
};

/// Longest wait for one store call or one expected watch event.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a watch must stay silent to show that an event was not delivered.
pub const QUIET_PERIOD: Duration = Duration::from_millis(300);
/// Lease time-to-live used by the lease checks.
pub const LEASE_TTL: Duration = Duration::from_secs(2);
/// Longest wait for an expired lease's keys to vanish.
pub const EXPIRY_TIMEOUT: Duration = Duration::from_secs(15);

/// Runs every check, one after the other, each under `<prefix><name>/`.
pub async fn run_all(store: &dyn MetadataStore, prefix: &str) {
    check_create_get(store, prefix).await;
    check_compare_and_set(store, prefix).await;
    check_delete(store, prefix).await;
    check_list(store, prefix).await;
    check_watch_key(store, prefix).await;
    check_watch_prefix(store, prefix).await;
    check_leases(store, prefix).await;
    check_allocate_id(store, prefix).await;
    check_bad_input(store, prefix).await;
}

/// `<prefix><name>/`, checking that `prefix` is a path.
fn dir(prefix: &str, name: &str) -> String {
    assert!(
        prefix.starts_with('/'),
        "conformance: the prefix {prefix:?} must start with '/'"
    );
    if prefix.ends_with('/') {
        format!("{prefix}{name}/")
    } else {
        format!("{prefix}/{name}/")
    }
}

fn b(s: &str) -> Bytes {
    Bytes::copy_from_slice(s.as_bytes())
}

async fn timed<T>(what: &str, fut: impl Future<Output = T>) -> T {
    match tokio::time::timeout(CALL_TIMEOUT, fut).await {
        Ok(v) => v,
        Err(_) => panic!("conformance: {what}: no answer within {CALL_TIMEOUT:?}"),
    }
}

/// Awaits a call that must succeed.
async fn ok<T>(what: &str, fut: impl Future<Output = Result<T>>) -> T {
    match timed(what, fut).await {
        Ok(v) => v,
        Err(e) => panic!("conformance: {what}: unexpected error: {e:?}"),
    }
}

/// Awaits a call that must fail.
async fn fails<T>(what: &str, fut: impl Future<Output = Result<T>>) -> MetaError {
    match timed(what, fut).await {
        Ok(_) => panic!("conformance: {what}: succeeded, but must fail"),
        Err(e) => e,
    }
}

async fn get(store: &dyn MetadataStore, key: &str) -> Option<KeyValue> {
    ok(&format!("get {key}"), store.get(key)).await
}

async fn watch(store: &dyn MetadataStore, target: WatchTarget) -> Watch {
    match timed(&format!("watch {target:?}"), store.watch(target.clone())).await {
        Ok(w) => w,
        Err(e) => panic!("conformance: watch {target:?}: unexpected error: {e:?}"),
    }
}

/// The next event, which must come within the timeout and must not be `Resync`.
async fn next_event(w: &mut Watch, what: &str) -> WatchEvent {
    match timed(&format!("{what}: waiting for a watch event"), w.next()).await {
        Some(WatchEvent::Resync) => panic!("conformance: {what}: unexpected Resync"),
        Some(ev) => ev,
        None => panic!("conformance: {what}: the watch ended"),
    }
}

/// The watch delivers nothing for [`QUIET_PERIOD`].
async fn expect_quiet(w: &mut Watch, what: &str) {
    if let Ok(ev) = tokio::time::timeout(QUIET_PERIOD, w.next()).await {
        panic!("conformance: {what}: the watch delivered {ev:?}, but nothing was due");
    }
}

/// A `Put` of exactly `kv`, newer than `last_rev`; returns its revision.
async fn expect_put(w: &mut Watch, what: &str, kv: &KeyValue, last_rev: u64) -> u64 {
    match next_event(w, what).await {
        WatchEvent::Put(got) => {
            assert_eq!(&got, kv, "conformance: {what}: wrong Put event");
            assert!(
                got.mod_revision > last_rev,
                "conformance: {what}: event revision {} not above the previous {last_rev}",
                got.mod_revision
            );
            got.mod_revision
        }
        ev => panic!(
            "conformance: {what}: expected Put of {}, got {ev:?}",
            kv.key
        ),
    }
}

/// A `Delete` of `key`, newer than `last_rev`; returns its revision.
async fn expect_delete(w: &mut Watch, what: &str, key: &str, last_rev: u64) -> u64 {
    match next_event(w, what).await {
        WatchEvent::Delete {
            key: got,
            mod_revision,
        } => {
            assert_eq!(got, key, "conformance: {what}: Delete of the wrong key");
            assert!(
                mod_revision > last_rev,
                "conformance: {what}: delete revision {mod_revision} not above the previous \
                 {last_rev}"
            );
            mod_revision
        }
        ev => panic!("conformance: {what}: expected Delete of {key}, got {ev:?}"),
    }
}

/// `get`, `create`: versions and revisions of a new key; a second create is refused.
pub async fn check_create_get(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "create");
    let k = format!("{d}k");
    assert_eq!(
        get(store, &k).await,
        None,
        "conformance: get of a missing key"
    );

    let kv = ok("create", store.create(&k, b("v1"), None)).await;
    assert_eq!(kv.key, k, "conformance: create: key");
    assert_eq!(kv.value, b("v1"), "conformance: create: value");
    assert_eq!(
        kv.version, 1,
        "conformance: create: a new key is at version 1"
    );
    assert_eq!(kv.lease, 0, "conformance: create: no lease");
    assert!(kv.mod_revision > 0, "conformance: create: revision 0");
    assert_eq!(
        kv.create_revision, kv.mod_revision,
        "conformance: create: create_revision == mod_revision for a new key"
    );
    assert_eq!(
        get(store, &k).await.as_ref(),
        Some(&kv),
        "conformance: get after create returns what create returned"
    );

    let e = fails("second create", store.create(&k, b("v2"), None)).await;
    assert!(
        matches!(e, MetaError::AlreadyExists(_)),
        "conformance: second create: expected AlreadyExists, got {e:?}"
    );
    assert_eq!(
        get(store, &k).await.as_ref(),
        Some(&kv),
        "conformance: a refused create changes nothing"
    );

    let k2 = format!("{d}k2");
    let kv2 = ok(
        "create of a second key",
        store.create(&k2, Bytes::new(), None),
    )
    .await;
    assert!(
        kv2.create_revision > kv.mod_revision,
        "conformance: a later create has a higher revision ({} then {})",
        kv.mod_revision,
        kv2.create_revision
    );
    assert_eq!(
        get(store, &k2).await.map(|kv| kv.value),
        Some(Bytes::new()),
        "conformance: an empty value reads back empty"
    );
}

/// `compare_and_set`: success bumps version and revision; a stale version or a missing key is
/// refused without effect.
pub async fn check_compare_and_set(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "cas");
    let k = format!("{d}k");
    let v1 = ok("create", store.create(&k, b("a"), None)).await;

    let v2 = ok("cas at version 1", store.compare_and_set(&k, b("b"), 1)).await;
    assert_eq!(v2.key, k, "conformance: cas: key");
    assert_eq!(v2.value, b("b"), "conformance: cas: value");
    assert_eq!(v2.version, 2, "conformance: cas: version + 1");
    assert!(
        v2.mod_revision > v1.mod_revision,
        "conformance: cas: mod_revision must grow ({} then {})",
        v1.mod_revision,
        v2.mod_revision
    );
    assert_eq!(
        v2.create_revision, v1.create_revision,
        "conformance: cas: create_revision unchanged"
    );
    assert_eq!(
        get(store, &k).await.as_ref(),
        Some(&v2),
        "conformance: get after cas returns what cas returned"
    );

    let e = fails(
        "cas with a stale version",
        store.compare_and_set(&k, b("c"), 1),
    )
    .await;
    match e {
        MetaError::BadVersion {
            key,
            expected,
            actual,
        } => {
            assert_eq!(key, k, "conformance: stale cas: BadVersion key");
            assert_eq!(expected, 1, "conformance: stale cas: BadVersion expected");
            assert_eq!(actual, 2, "conformance: stale cas: BadVersion actual");
        }
        e => panic!("conformance: stale cas: expected BadVersion, got {e:?}"),
    }
    let e = fails(
        "cas with a future version",
        store.compare_and_set(&k, b("c"), 3),
    )
    .await;
    assert!(
        matches!(
            e,
            MetaError::BadVersion {
                expected: 3,
                actual: 2,
                ..
            }
        ),
        "conformance: cas at a future version: expected BadVersion, got {e:?}"
    );
    assert_eq!(
        get(store, &k).await.as_ref(),
        Some(&v2),
        "conformance: a refused cas changes nothing"
    );

    let v3 = ok("cas at version 2", store.compare_and_set(&k, b("c"), 2)).await;
    assert_eq!(
        (v3.version, v3.value.clone()),
        (3, b("c")),
        "conformance: second cas"
    );
    assert!(
        v3.mod_revision > v2.mod_revision,
        "conformance: second cas: mod_revision must grow"
    );

    let missing = format!("{d}missing");
    let e = fails(
        "cas on a missing key",
        store.compare_and_set(&missing, b("x"), 1),
    )
    .await;
    assert!(
        matches!(e, MetaError::NotFound(_)),
        "conformance: cas on a missing key: expected NotFound, got {e:?}"
    );
    assert_eq!(
        get(store, &missing).await,
        None,
        "conformance: cas on a missing key must not create it"
    );
}

/// `delete`: conditional and unconditional; a missing key is `NotFound`; a re-created key starts
/// over at version 1.
pub async fn check_delete(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "delete");
    let k = format!("{d}k");
    let v1 = ok("create", store.create(&k, b("a"), None)).await;

    let e = fails("delete with a wrong version", store.delete(&k, Some(2))).await;
    match e {
        MetaError::BadVersion {
            key,
            expected,
            actual,
        } => assert_eq!(
            (key.as_str(), expected, actual),
            (k.as_str(), 2, 1),
            "conformance: delete with a wrong version: BadVersion fields"
        ),
        e => panic!("conformance: delete with a wrong version: expected BadVersion, got {e:?}"),
    }
    assert_eq!(
        get(store, &k).await.as_ref(),
        Some(&v1),
        "conformance: a refused delete changes nothing"
    );

    ok("delete at the right version", store.delete(&k, Some(1))).await;
    assert_eq!(
        get(store, &k).await,
        None,
        "conformance: the key is gone after delete"
    );
    let e = fails("delete of a deleted key", store.delete(&k, Some(1))).await;
    assert!(
        matches!(e, MetaError::NotFound(_)),
        "conformance: conditional delete of a missing key: expected NotFound, got {e:?}"
    );
    let e = fails(
        "unconditional delete of a deleted key",
        store.delete(&k, None),
    )
    .await;
    assert!(
        matches!(e, MetaError::NotFound(_)),
        "conformance: unconditional delete of a missing key: expected NotFound, got {e:?}"
    );

    let again = ok("re-create", store.create(&k, b("b"), None)).await;
    assert_eq!(
        again.version, 1,
        "conformance: a re-created key starts at version 1"
    );
    assert!(
        again.create_revision > v1.mod_revision,
        "conformance: a re-created key has a new create_revision"
    );
    ok("cas", store.compare_and_set(&k, b("c"), 1)).await;
    ok("unconditional delete", store.delete(&k, None)).await;
    assert_eq!(
        get(store, &k).await,
        None,
        "conformance: the key is gone after an unconditional delete"
    );
}

fn keys(kvs: &[KeyValue]) -> Vec<&str> {
    kvs.iter().map(|kv| kv.key.as_str()).collect()
}

/// `list` and `list_all`: order, prefix semantics, paging, `more`, revision.
pub async fn check_list(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "list");
    let mut names: Vec<String> = ["a", "a/1", "a/2", "ab", "b", "b/c/d"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    names.extend((0..15).map(|i| format!("k{i:02}")));
    // Created out of order, with an empty and a binary value among them.
    let mut order: Vec<&String> = names.iter().collect();
    order.reverse();
    order.rotate_left(7);
    let mut created = Vec::new();
    for n in order {
        let key = format!("{d}{n}");
        let value = match n.as_str() {
            "b" => Bytes::new(),
            "ab" => Bytes::from_static(&[0, 255, 1]),
            _ => b(&key),
        };
        created.push(ok(&format!("create {key}"), store.create(&key, value, None)).await);
    }
    // Keys sharing a string prefix with the directory but outside it.
    let d_trimmed = d.trim_end_matches('/');
    for sibling in [
        d_trimmed.to_string(),
        format!("{d_trimmed}0/x"),
        format!("{d_trimmed}-x"),
    ] {
        ok(
            &format!("create {sibling}"),
            store.create(&sibling, b("s"), None),
        )
        .await;
    }
    let mut expected: Vec<KeyValue> = created.clone();
    expected.sort_by(|a, b| a.key.cmp(&b.key));
    let max_rev = created.iter().map(|kv| kv.mod_revision).max().unwrap_or(0);
    let all_keys: Vec<&str> = keys(&expected);

    let page = ok("list all", store.list(&d, None, MAX_LIST_LIMIT)).await;
    assert_eq!(
        keys(&page.kvs),
        all_keys,
        "conformance: list returns exactly the keys under the prefix, in key order"
    );
    assert_eq!(
        page.kvs, expected,
        "conformance: list returns the keys as created"
    );
    assert!(!page.more, "conformance: list of everything: more = false");
    assert!(
        page.revision >= max_rev,
        "conformance: list revision {} below the last write's {max_rev}",
        page.revision
    );

    let sub = ok(
        "list of a string prefix",
        store.list(&format!("{d}a"), None, 100),
    )
    .await;
    let want: Vec<String> = ["a", "a/1", "a/2", "ab"]
        .iter()
        .map(|n| format!("{d}{n}"))
        .collect();
    assert_eq!(
        keys(&sub.kvs),
        want,
        "conformance: list prefix {d}a is a plain string prefix"
    );
    let sub = ok(
        "list of a sub-directory",
        store.list(&format!("{d}a/"), None, 100),
    )
    .await;
    assert_eq!(
        keys(&sub.kvs),
        [format!("{d}a/1"), format!("{d}a/2")],
        "conformance: list of {d}a/"
    );
    let none = ok(
        "list of an empty prefix",
        store.list(&format!("{d}zzz/"), None, 10),
    )
    .await;
    assert!(
        none.kvs.is_empty() && !none.more,
        "conformance: list of a prefix with no keys: got {:?}, more {}",
        keys(&none.kvs),
        none.more
    );

    for limit in [1u32, 2, 3, 5, 7, 20, 21, 22] {
        let mut seen: Vec<KeyValue> = Vec::new();
        let mut after: Option<String> = None;
        let mut last_rev = 0;
        loop {
            let what = format!("list limit {limit} after {after:?}");
            let page = ok(&what, store.list(&d, after.as_deref(), limit)).await;
            let left = expected.len() - seen.len();
            assert_eq!(
                page.kvs.len(),
                left.min(limit as usize),
                "conformance: {what}: a page holds min(limit, keys left)"
            );
            assert_eq!(
                page.kvs[..],
                expected[seen.len()..seen.len() + page.kvs.len()],
                "conformance: {what}: pages continue exactly where the last one ended"
            );
            assert_eq!(
                page.more,
                left > page.kvs.len(),
                "conformance: {what}: more = whether keys remain"
            );
            assert!(
                page.revision >= max_rev && page.revision >= last_rev,
                "conformance: {what}: revision {} went back (last {last_rev}, writes up to \
                 {max_rev})",
                page.revision
            );
            last_rev = page.revision;
            seen.extend(page.kvs);
            if !page.more {
                break;
            }
            after = seen.last().map(|kv| kv.key.clone());
        }
        assert_eq!(
            seen, expected,
            "conformance: paging by {limit} reaches every key exactly once"
        );
    }

    // start_after that is not a key, before the prefix, and past the end.
    let mid = ok(
        "list after a non-key",
        store.list(&d, Some(&format!("{d}a0")), 100),
    )
    .await;
    let want: Vec<&str> = all_keys
        .iter()
        .copied()
        .filter(|k| *k > format!("{d}a0").as_str())
        .collect();
    assert_eq!(
        keys(&mid.kvs),
        want,
        "conformance: list after {d}a0 starts at the next key"
    );
    let from_start = ok(
        "list after a key before the prefix",
        store.list(&d, Some("/"), 100),
    )
    .await;
    assert_eq!(
        keys(&from_start.kvs),
        all_keys,
        "conformance: list with start_after before the prefix lists the whole prefix (and \
         nothing outside it)"
    );
    let past = ok(
        "list after the last key",
        store.list(&d, Some(&format!("{d}zzz")), 100),
    )
    .await;
    assert!(
        past.kvs.is_empty() && !past.more,
        "conformance: list after the last key is empty with more = false"
    );

    let all = ok("list_all", list_all(store, &d)).await;
    assert_eq!(
        all, expected,
        "conformance: list_all returns every key under the prefix"
    );
}

/// A key watch sees the key's creates, updates and deletes in order, and nothing else.
pub async fn check_watch_key(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "watch-key");
    let k = format!("{d}k");
    let other = format!("{d}other");
    let longer = format!("{d}kk");
    let before = ok("create before the watch", store.create(&k, b("0"), None)).await;

    let mut w = watch(store, WatchTarget::Key(k.clone())).await;
    ok("create another key", store.create(&other, b("x"), None)).await;
    ok(
        "create a key extending the watched one",
        store.create(&longer, b("x"), None),
    )
    .await;
    let v2 = ok("cas", store.compare_and_set(&k, b("1"), 1)).await;
    let what = "key watch";
    let rev = expect_put(&mut w, what, &v2, before.mod_revision).await;

    ok("delete", store.delete(&k, Some(2))).await;
    let rev = expect_delete(&mut w, what, &k, rev).await;
    let again = ok("re-create", store.create(&k, b("2"), None)).await;
    let rev = expect_put(&mut w, what, &again, rev).await;
    let v2 = ok("cas after re-create", store.compare_and_set(&k, b("3"), 1)).await;
    let rev = expect_put(&mut w, what, &v2, rev).await;

    ok(
        "cas of another key",
        store.compare_and_set(&other, b("y"), 1),
    )
    .await;
    ok(
        "cas of a key extending the watched one",
        store.compare_and_set(&longer, b("y"), 1),
    )
    .await;
    ok("delete of another key", store.delete(&other, None)).await;
    expect_quiet(&mut w, "key watch after writes to other keys").await;

    ok("delete", store.delete(&k, None)).await;
    expect_delete(&mut w, what, &k, rev).await;
}

/// A prefix watch sees every change under the prefix in order, and nothing outside it.
pub async fn check_watch_prefix(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "watch-prefix");
    let outside = format!("{}-x/o", d.trim_end_matches('/'));
    let (a, b_) = (format!("{d}a"), format!("{d}b/c"));
    let pre = ok("create before the watch", store.create(&a, b("0"), None)).await;
    ok("delete before the watch", store.delete(&a, None)).await;

    let mut w = watch(store, WatchTarget::Prefix(d.clone())).await;
    let mut expected: Vec<WatchEvent> = Vec::new();
    expected.push(WatchEvent::Put(
        ok("create a", store.create(&a, b("1"), None)).await,
    ));
    ok("create outside", store.create(&outside, b("o"), None)).await;
    expected.push(WatchEvent::Put(
        ok("cas a", store.compare_and_set(&a, b("2"), 1)).await,
    ));
    expected.push(WatchEvent::Put(
        ok("create b/c", store.create(&b_, b("3"), None)).await,
    ));
    ok("cas outside", store.compare_and_set(&outside, b("p"), 1)).await;
    ok("delete a", store.delete(&a, Some(2))).await;
    expected.push(WatchEvent::Delete {
        key: a.clone(),
        mod_revision: 0,
    });
    ok("delete outside", store.delete(&outside, None)).await;
    ok("delete b/c", store.delete(&b_, None)).await;
    expected.push(WatchEvent::Delete {
        key: b_.clone(),
        mod_revision: 0,
    });

    let mut rev = pre.mod_revision;
    for (i, want) in expected.iter().enumerate() {
        let what = format!("prefix watch, event {i}");
        rev = match want {
            WatchEvent::Put(kv) => expect_put(&mut w, &what, kv, rev).await,
            WatchEvent::Delete { key, .. } => expect_delete(&mut w, &what, key, rev).await,
            WatchEvent::Resync => unreachable!(),
        };
    }
    let page = ok("list after the watch", store.list(&d, None, 10)).await;
    assert!(
        page.kvs.is_empty() && page.revision >= rev,
        "conformance: after the prefix watch: list revision {} below the last event's {rev}",
        page.revision
    );
}

async fn wait_gone(store: &dyn MetadataStore, key: &str, since: Instant) -> Duration {
    let deadline = since + EXPIRY_TIMEOUT;
    loop {
        if get(store, key).await.is_none() {
            return since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "conformance: {key} under an expired lease still exists {EXPIRY_TIMEOUT:?} after \
             the grant (ttl {LEASE_TTL:?})"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Leases: ephemeral keys, keep-alive, revoke, expiry, unknown leases.
pub async fn check_leases(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "lease");

    // Revoke deletes the lease's keys, and only those.
    let lease = ok("grant", store.grant_lease(LEASE_TTL)).await;
    let e = format!("{d}revoked/e");
    let plain = format!("{d}revoked/plain");
    let kv = ok(
        "create under a lease",
        store.create(&e, b("1"), Some(lease)),
    )
    .await;
    assert_eq!(
        kv.lease, lease,
        "conformance: an ephemeral key carries its lease"
    );
    ok("create a plain key", store.create(&plain, b("1"), None)).await;
    let kv2 = ok(
        "cas of an ephemeral key",
        store.compare_and_set(&e, b("2"), 1),
    )
    .await;
    assert_eq!(kv2.lease, lease, "conformance: cas keeps the key's lease");
    assert_eq!(
        get(store, &e).await.map(|kv| kv.lease),
        Some(lease),
        "conformance: get shows the lease"
    );
    let ttl = ok("keep_alive", store.keep_alive(lease)).await;
    assert_eq!(
        ttl, LEASE_TTL,
        "conformance: keep_alive returns the lease's ttl"
    );

    let mut w = watch(store, WatchTarget::Key(e.clone())).await;
    ok("revoke", store.revoke_lease(lease)).await;
    assert_eq!(
        get(store, &e).await,
        None,
        "conformance: revoke deletes the lease's keys"
    );
    assert!(
        get(store, &plain).await.is_some(),
        "conformance: revoke leaves other keys alone"
    );
    expect_delete(&mut w, "watch of a revoked key", &e, kv2.mod_revision).await;
    let err = fails("keep_alive of a revoked lease", store.keep_alive(lease)).await;
    assert!(
        matches!(err, MetaError::LeaseNotFound(l) if l == lease),
        "conformance: keep_alive of a revoked lease: expected LeaseNotFound({lease}), got {err:?}"
    );
    let err = fails("revoke twice", store.revoke_lease(lease)).await;
    assert!(
        matches!(err, MetaError::LeaseNotFound(l) if l == lease),
        "conformance: revoking a revoked lease: expected LeaseNotFound({lease}), got {err:?}"
    );

    // A lease left alone expires; one kept alive does not.
    let expiring = async {
        let k = format!("{d}expired/e");
        let granted = Instant::now();
        let lease = ok("grant (left to expire)", store.grant_lease(LEASE_TTL)).await;
        ok(
            "create under the expiring lease",
            store.create(&k, b("1"), Some(lease)),
        )
        .await;
        let mut w = watch(store, WatchTarget::Key(k.clone())).await;
        let gone = wait_gone(store, &k, granted).await;
        assert!(
            gone + Duration::from_millis(100) >= LEASE_TTL,
            "conformance: a lease of {LEASE_TTL:?} expired after only {gone:?}"
        );
        expect_delete(&mut w, "watch of an expired key", &k, 0).await;
        let err = fails("keep_alive after expiry", store.keep_alive(lease)).await;
        assert!(
            matches!(err, MetaError::LeaseNotFound(l) if l == lease),
            "conformance: keep_alive of an expired lease: expected LeaseNotFound({lease}), got \
             {err:?}"
        );
        let k2 = format!("{d}expired/late");
        let err = fails(
            "create under an expired lease",
            store.create(&k2, b("1"), Some(lease)),
        )
        .await;
        assert!(
            matches!(err, MetaError::LeaseNotFound(l) if l == lease),
            "conformance: create under an expired lease: expected LeaseNotFound({lease}), got \
             {err:?}"
        );
        assert_eq!(
            get(store, &k2).await,
            None,
            "conformance: a refused create under an expired lease leaves no key"
        );
    };
    let kept = async {
        let k = format!("{d}kept/e");
        let lease = ok("grant (kept alive)", store.grant_lease(LEASE_TTL)).await;
        ok(
            "create under the kept lease",
            store.create(&k, b("1"), Some(lease)),
        )
        .await;
        let start = Instant::now();
        while start.elapsed() < LEASE_TTL * 5 / 2 {
            tokio::time::sleep(LEASE_TTL / 4).await;
            let ttl = ok("keep_alive (kept lease)", store.keep_alive(lease)).await;
            assert_eq!(ttl, LEASE_TTL, "conformance: keep_alive returns the ttl");
            assert!(
                get(store, &k).await.is_some(),
                "conformance: a key under a lease kept alive vanished after {:?}",
                start.elapsed()
            );
        }
        ok("revoke the kept lease", store.revoke_lease(lease)).await;
        assert_eq!(get(store, &k).await, None, "conformance: revoked");
    };
    futures::join!(expiring, kept);

    // Unknown leases.
    let unknown: LeaseId = 0x3fff_ffff_ffff_ff17;
    let k = format!("{d}unknown/e");
    let err = fails(
        "create under an unknown lease",
        store.create(&k, b("1"), Some(unknown)),
    )
    .await;
    assert!(
        matches!(err, MetaError::LeaseNotFound(l) if l == unknown),
        "conformance: create under an unknown lease: expected LeaseNotFound, got {err:?}"
    );
    assert_eq!(
        get(store, &k).await,
        None,
        "conformance: a refused create under an unknown lease leaves no key"
    );
    let err = fails("keep_alive of an unknown lease", store.keep_alive(unknown)).await;
    assert!(
        matches!(err, MetaError::LeaseNotFound(l) if l == unknown),
        "conformance: keep_alive of an unknown lease: expected LeaseNotFound, got {err:?}"
    );
}

/// `allocate_id`: a fresh counter starts at 0 and grows; concurrent callers never share a value.
pub async fn check_allocate_id(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "ids");
    let seq = format!("{d}seq");
    let mut last: Option<u64> = None;
    for i in 0..10 {
        let id = ok("allocate_id", store.allocate_id(&seq)).await;
        match last {
            None => assert_eq!(id, 0, "conformance: a fresh counter starts at 0"),
            Some(l) => assert!(
                id > l,
                "conformance: allocate_id call {i} gave {id} after {l}: must grow"
            ),
        }
        last = Some(id);
    }

    let shared = format!("{d}shared");
    let tasks = (0..8).map(|t| {
        let shared = shared.as_str();
        async move {
            let mut got = Vec::with_capacity(25);
            for _ in 0..25 {
                let id = ok(
                    &format!("allocate_id (task {t})"),
                    store.allocate_id(shared),
                )
                .await;
                if let Some(&prev) = got.last() {
                    assert!(
                        id > prev,
                        "conformance: task {t}: allocate_id gave {id} after {prev}"
                    );
                }
                got.push(id);
            }
            got
        }
    });
    let all: Vec<u64> = join_all(tasks).await.into_iter().flatten().collect();
    let distinct: BTreeSet<u64> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "conformance: 8 x 25 concurrent allocate_id calls gave duplicates"
    );

    let id = ok("allocate_id after another counter", store.allocate_id(&seq)).await;
    assert!(
        Some(id) > last,
        "conformance: counters are independent: {seq} gave {id} after {last:?}"
    );
}

fn expect_kind(what: &str, e: MetaError, want: &str) {
    let kind = match e {
        MetaError::InvalidArgument(_) => "InvalidArgument",
        MetaError::TooLarge(_) => "TooLarge",
        _ => "other",
    };
    assert_eq!(kind, want, "conformance: {what}: got {e:?}");
}

/// Bad keys, values, limits and TTLs are refused with typed errors and change nothing.
pub async fn check_bad_input(store: &dyn MetadataStore, prefix: &str) {
    let d = dir(prefix, "bad");
    let existing = format!("{d}k");
    ok("create", store.create(&existing, b("v"), None)).await;
    let before = ok("list_all before", list_all(store, &d)).await;

    const INVALID: &str = "InvalidArgument";
    const TOO_LARGE: &str = "TooLarge";

    for key in ["no-slash", "", "relative/key"] {
        let what = |op: &str| format!("{op} of key {key:?}");
        expect_kind(
            &what("get"),
            fails(&what("get"), store.get(key)).await,
            INVALID,
        );
        let e = fails(&what("create"), store.create(key, b("v"), None)).await;
        expect_kind(&what("create"), e, INVALID);
        let e = fails(&what("cas"), store.compare_and_set(key, b("v"), 1)).await;
        expect_kind(&what("cas"), e, INVALID);
        let e = fails(&what("delete"), store.delete(key, None)).await;
        expect_kind(&what("delete"), e, INVALID);
        if let Err(e) = timed(&what("watch"), store.watch(WatchTarget::Key(key.into()))).await {
            expect_kind(&what("watch"), e, INVALID);
        } else {
            panic!("conformance: {}: succeeded, but must fail", what("watch"));
        }
    }
    let e = fails("list of a relative prefix", store.list("rel/", None, 10)).await;
    expect_kind("list of a relative prefix", e, INVALID);

    let nul = format!("{d}nul\0byte");
    let e = fails("create of a key with NUL", store.create(&nul, b("v"), None)).await;
    expect_kind("create of a key with NUL", e, INVALID);

    let long = format!("{d}{}", "x".repeat(MAX_KEY_LEN + 1 - d.len()));
    assert_eq!(long.len(), MAX_KEY_LEN + 1);
    let what = "create of a key over MAX_KEY_LEN";
    expect_kind(
        what,
        fails(what, store.create(&long, b("v"), None)).await,
        TOO_LARGE,
    );
    let what = "get of a key over MAX_KEY_LEN";
    expect_kind(what, fails(what, store.get(&long)).await, TOO_LARGE);
    let what = "cas of a key over MAX_KEY_LEN";
    let e = fails(what, store.compare_and_set(&long, b("v"), 1)).await;
    expect_kind(what, e, TOO_LARGE);
    let what = "delete of a key over MAX_KEY_LEN";
    expect_kind(
        what,
        fails(what, store.delete(&long, None)).await,
        TOO_LARGE,
    );

    let big = Bytes::from(vec![7u8; MAX_VALUE_LEN + 1]);
    let what = "create of a value over MAX_VALUE_LEN";
    let e = fails(what, store.create(&format!("{d}big"), big.clone(), None)).await;
    expect_kind(what, e, TOO_LARGE);
    let what = "cas to a value over MAX_VALUE_LEN";
    let e = fails(what, store.compare_and_set(&existing, big, 1)).await;
    expect_kind(what, e, TOO_LARGE);

    for limit in [0, MAX_LIST_LIMIT + 1, u32::MAX] {
        let what = format!("list with limit {limit}");
        let e = fails(&what, store.list(&d, None, limit)).await;
        expect_kind(&what, e, INVALID);
    }

    for ttl in [
        Duration::ZERO,
        MIN_LEASE_TTL - Duration::from_millis(1),
        MAX_LEASE_TTL + Duration::from_secs(1),
    ] {
        let what = format!("grant_lease with ttl {ttl:?}");
        let e = fails(&what, store.grant_lease(ttl)).await;
        expect_kind(&what, e, INVALID);
    }

    let after = ok("list_all after", list_all(store, &d)).await;
    assert_eq!(
        after, before,
        "conformance: refused requests must leave the store unchanged"
    );

    // The limits themselves are accepted.
    let edge = format!("{d}{}", "y".repeat(MAX_KEY_LEN - d.len()));
    assert_eq!(edge.len(), MAX_KEY_LEN);
    let kv = ok(
        "create of a key of MAX_KEY_LEN",
        store.create(&edge, b("v"), None),
    )
    .await;
    assert_eq!(
        get(store, &edge).await.as_ref(),
        Some(&kv),
        "conformance: a key of MAX_KEY_LEN reads back"
    );
    ok(
        "delete of a key of MAX_KEY_LEN",
        store.delete(&edge, Some(1)),
    )
    .await;
    let full = Bytes::from(vec![9u8; MAX_VALUE_LEN]);
    let kv = ok(
        "cas to a value of MAX_VALUE_LEN",
        store.compare_and_set(&existing, full.clone(), 1),
    )
    .await;
    assert_eq!(kv.value.len(), MAX_VALUE_LEN);
    assert_eq!(
        get(store, &existing).await.map(|kv| kv.value),
        Some(full),
        "conformance: a value of MAX_VALUE_LEN reads back"
    );
    let page = ok(
        "list with limit MAX_LIST_LIMIT",
        store.list(&d, None, MAX_LIST_LIMIT),
    )
    .await;
    assert_eq!(keys(&page.kvs), [existing.as_str()]);
}
