//! Raft clusters of in-process nodes on loopback: snapshot transfer to a node that fell behind a
//! purged log, follower watches, sessions surviving a leader change, membership changes.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use quire_metadata::client::RemoteStore;
use quire_metadata::raft::node::NodeConfig;
use quire_metadata::server::{MetadataServerHandle, start_node};
use quire_metadata::{MetadataStore, WatchEvent, WatchTarget};

async fn node(id: u64, listen: SocketAddr, dir: &Path) -> MetadataServerHandle {
    let mut cfg = NodeConfig::member(id, BTreeMap::new(), dir.join(format!("n{id}")));
    cfg.snapshot_every = 50;
    cfg.keep_logs = 5;
    start_node(listen, cfg).await.unwrap()
}

async fn wait_for(what: &str, mut f: impl AsyncFnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !f().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Three nodes: node 1 initializes, 2 and 3 join.
async fn cluster(dir: &Path) -> Vec<MetadataServerHandle> {
    let any: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let n1 = node(1, any, dir).await;
    n1.node.init().await.unwrap();
    wait_for("node 1 to lead", async || {
        n1.node.status().leader == Some(1)
    })
    .await;
    let n2 = node(2, any, dir).await;
    let n3 = node(3, any, dir).await;
    n1.node.add_node(2, n2.addr.to_string()).await.unwrap();
    n1.node.add_node(3, n3.addr.to_string()).await.unwrap();
    vec![n1, n2, n3]
}

fn uri_of(nodes: &[&MetadataServerHandle]) -> Vec<String> {
    nodes.iter().map(|n| n.addr.to_string()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_behind_a_purged_log_catches_up_by_snapshot() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path()).await;
    let n3 = nodes.pop().unwrap();
    let n3_addr = n3.addr;
    n3.stop().await;
    let store = RemoteStore::connect(&uri_of(&[&nodes[0], &nodes[1]])).unwrap();
    for i in 0..300u32 {
        store
            .create(
                &format!("/snap/{i:04}"),
                Bytes::from(i.to_be_bytes().to_vec()),
                None,
            )
            .await
            .unwrap();
    }
    // Snapshots and purges run in the background, after the writes are acknowledged.
    wait_for("the leader to purge its log after a snapshot", async || {
        nodes[0].node.raft.metrics().borrow().purged.is_some()
    })
    .await;
    let leader_status = nodes[0].node.status();
    let n3 = node(3, n3_addr, dir.path()).await;
    wait_for("node 3 to catch up", async || {
        n3.node.status().last_applied >= leader_status.last_applied
    })
    .await;
    assert!(
        n3.node.raft.metrics().borrow().snapshot.is_some(),
        "node 3 installed a snapshot"
    );
    // Reads through node 3 alone see everything.
    let only3 = RemoteStore::connect(&[n3_addr.to_string()]).unwrap();
    let all = quire_metadata::store::list_all(&only3, "/snap/")
        .await
        .unwrap();
    assert_eq!(all.len(), 300);
    assert_eq!(all[299].value, Bytes::from(299u32.to_be_bytes().to_vec()));
    // And writes through it are forwarded to the leader.
    only3
        .create("/snap/after", Bytes::from_static(b"x"), None)
        .await
        .unwrap();
    assert!(store.get("/snap/after").await.unwrap().is_some());
    n3.stop().await;
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follower_watches_and_sessions_survive_a_leader_change() {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = cluster(dir.path()).await;
    let all = RemoteStore::connect(&uri_of(&[&nodes[0], &nodes[1], &nodes[2]])).unwrap();
    // Watch through a follower.
    let follower = RemoteStore::connect(&[nodes[2].addr.to_string()]).unwrap();
    let mut watch = follower
        .watch(WatchTarget::Prefix("/w/".into()))
        .await
        .unwrap();
    let lease = all.grant_lease(Duration::from_secs(2)).await.unwrap();
    all.create("/w/eph", Bytes::from_static(b"1"), Some(lease))
        .await
        .unwrap();
    let ev = tokio::time::timeout(Duration::from_secs(10), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, WatchEvent::Put(ref kv) if kv.key == "/w/eph"),
        "{ev:?}"
    );

    // Keep the lease alive while the leader (node 1) goes away.
    let keeper = {
        let s = Arc::new(RemoteStore::connect(&uri_of(&[&nodes[1], &nodes[2]])).unwrap());
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(300)).await;
                let _ = s.keep_alive(lease).await;
            }
        })
    };
    let n1 = nodes.remove(0);
    n1.stop().await;
    let rest = RemoteStore::connect(&uri_of(&[&nodes[0], &nodes[1]])).unwrap();
    wait_for(
        "a new leader",
        async || matches!(nodes[0].node.status().leader, Some(l) if l != 1),
    )
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert!(
        rest.get("/w/eph").await.unwrap().is_some(),
        "a kept-alive session outlives the leader change"
    );

    // Without keep-alives the lease expires under the new leader and the watcher sees it.
    keeper.abort();
    let ev = tokio::time::timeout(Duration::from_secs(15), watch.next())
        .await
        .unwrap()
        .unwrap();
    assert!(
        matches!(ev, WatchEvent::Delete { ref key, .. } if key == "/w/eph"),
        "{ev:?}"
    );
    assert!(rest.get("/w/eph").await.unwrap().is_none());
    assert!(matches!(
        rest.keep_alive(lease).await,
        Err(quire_metadata::MetaError::LeaseNotFound(_))
    ));
    for n in nodes {
        n.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn removed_nodes_leave_the_membership() {
    let dir = tempfile::tempdir().unwrap();
    let nodes = cluster(dir.path()).await;
    nodes[0].node.remove_node(3).await.unwrap();
    let members: Vec<u64> = nodes[0]
        .node
        .status()
        .members
        .iter()
        .map(|m| m.id)
        .collect();
    assert_eq!(members, vec![1, 2]);
    // The two remaining voters still commit writes.
    let store = RemoteStore::connect(&uri_of(&[&nodes[0], &nodes[1]])).unwrap();
    store
        .create("/m/x", Bytes::from_static(b"1"), None)
        .await
        .unwrap();
    for n in nodes {
        n.stop().await;
    }
}
