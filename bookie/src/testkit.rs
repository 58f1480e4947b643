//! An in-process cluster for tests of the crates above the bookie (cargo feature `testkit`): an
//! embedded metadata store served on loopback and real bookies (journal fsync on) on ephemeral
//! ports, each in its own temporary directories. Process-level faults (kill -9) belong to the
//! `quire-tests` crate; this is for fast protocol tests.

use std::time::{Duration, Instant};

use quire_metadata::DynStore;
use quire_metadata::bookies::BookieRegistry;

use crate::{BookieConfig, Running};

/// Bookie `i` is `bookie-i`.
pub struct Cluster {
    _dir: tempfile::TempDir,
    meta: Option<quire_metadata::server::MetadataServerHandle>,
    /// The metadata store's URI (`quire://...`).
    pub uri: String,
    pub store: DynStore,
    /// `None` once stopped.
    pub bookies: Vec<Option<Running>>,
}

impl Cluster {
    /// `n` bookies without zone labels.
    pub async fn start(n: usize) -> Cluster {
        Self::start_zoned(&vec![None; n]).await
    }

    /// One bookie per entry of `zones`, with that zone label; returns once all are writable.
    /// Sessions time out after 2 s, so a stopped bookie leaves the registry quickly.
    pub async fn start_zoned(zones: &[Option<&str>]) -> Cluster {
        let dir = tempfile::tempdir().expect("temporary directory");
        let meta = quire_metadata::server::serve_embedded(
            "127.0.0.1:0".parse().expect("address"),
            dir.path().join("meta"),
        )
        .await
        .expect("embedded metadata store");
        let uri = format!("quire://{}", meta.addr);
        let mut bookies = Vec::new();
        for (i, zone) in zones.iter().enumerate() {
            let mut cfg = BookieConfig {
                listen: "127.0.0.1:0".parse().expect("address"),
                http: "127.0.0.1:0".parse().expect("address"),
                bookie_id: Some(format!("bookie-{i}")),
                metadata: Some(uri.clone()),
                session_timeout_ms: 2000,
                zone: zone.map(String::from),
                ..Default::default()
            };
            cfg.journal.dir = dir.path().join(format!("b{i}/journal"));
            cfg.storage.ledger_dirs = vec![dir.path().join(format!("b{i}/ledgers"))];
            bookies.push(Some(crate::start(cfg).await.expect("bookie starts")));
        }
        let store = quire_metadata::connect(&uri).await.expect("metadata store");
        let registry = BookieRegistry::new(store.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        while registry.writable().await.map_or(0, |l| l.len()) != zones.len() {
            assert!(
                Instant::now() < deadline,
                "{} bookies never registered",
                zones.len()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        Cluster {
            _dir: dir,
            meta: Some(meta),
            uri,
            store,
            bookies,
        }
    }

    /// The running bookie `id` (`bookie-i`).
    pub fn bookie(&self, id: &str) -> &Running {
        self.bookies[Self::index(id)]
            .as_ref()
            .unwrap_or_else(|| panic!("{id} is stopped"))
    }

    /// Stops bookie `id` cleanly (it leaves the registry at once).
    pub async fn stop_bookie(&mut self, id: &str) {
        if let Some(b) = self.bookies[Self::index(id)].take() {
            b.stop().await;
        }
    }

    fn index(id: &str) -> usize {
        id.strip_prefix("bookie-")
            .and_then(|i| i.parse().ok())
            .unwrap_or_else(|| panic!("no bookie {id:?} in a test cluster"))
    }

    pub async fn stop(mut self) {
        for b in self.bookies.iter_mut().filter_map(Option::take) {
            b.stop().await;
        }
        if let Some(m) = self.meta.take() {
            m.stop().await;
        }
    }
}
