//! Autorecovery (DESIGN.md §5): the cluster restores full replication by itself.
//!
//! - [`auditor`]: one active at a time, elected through a metadata lease. It watches the bookie
//!   registry and, once a bookie has been gone for `lost_bookie_recovery_delay`, marks every
//!   ledger with a fragment on it under-replicated; periodic checks look for ledgers that still
//!   name unregistered bookies, for missing or corrupt replicas, and for zone rule violations.
//! - [`worker`]: replication workers lock a marked ledger, copy the lost replicas to a bookie
//!   chosen by the placement policy, swap it into the ensemble by CAS and clear the marker.
//! - [`decommission`]: empties a live bookie the same way, refusing when no bookie could take
//!   its replicas.
//! - [`status`]: what `quire autorecovery status` shows.
//!
//! [`AutoRecovery`] runs an auditor candidate and a worker in one process (the `quire
//! autorecovery` daemon, or inside a bookie).

pub mod auditor;
pub mod config;
pub mod decommission;
pub mod error;
pub mod metrics;
pub mod status;
pub mod worker;

use std::sync::Arc;

use quire_ledger_client::{Client, ClientConfig};
use quire_metadata::DynStore;
use tokio::sync::watch;
use tokio::task::JoinHandle;

pub use config::AutoRecoveryConfig;
pub use error::{Error, Result};
pub use metrics::Metrics;

/// How long [`AutoRecovery::stop`] waits for a role to finish its current step.
pub const STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(5);

/// A running auditor candidate and/or replication worker.
pub struct AutoRecovery {
    stop: watch::Sender<bool>,
    tasks: Vec<JoinHandle<()>>,
    metrics: Arc<Metrics>,
}

impl AutoRecovery {
    /// Starts the roles `cfg` enables over `store`.
    pub async fn start(store: DynStore, cfg: AutoRecoveryConfig) -> Result<AutoRecovery> {
        cfg.validate()?;
        let client = Client::with_store(store.clone(), ClientConfig::new("")).await?;
        let metrics = Arc::new(Metrics::new());
        let (stop, stopped) = watch::channel(false);
        let mut tasks = Vec::new();
        if cfg.auditor {
            tasks.push(tokio::spawn(auditor::run(
                store.clone(),
                client.clone(),
                cfg.clone(),
                metrics.clone(),
                stopped.clone(),
            )));
        }
        if cfg.worker {
            tasks.push(tokio::spawn(worker::run(
                store.clone(),
                client.clone(),
                cfg.clone(),
                metrics.clone(),
                stopped.clone(),
            )));
        }
        tracing::info!(id = %cfg.id, auditor = cfg.auditor, worker = cfg.worker,
            "autorecovery started");
        Ok(AutoRecovery {
            stop,
            tasks,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Stops both roles, giving up the auditor election and any ledger lock held. A copy in
    /// progress gets [`STOP_GRACE`]; then it is abandoned (its lock goes with the session, and
    /// metadata never names a copy that was not finished).
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        for mut t in self.tasks {
            if tokio::time::timeout(STOP_GRACE, &mut t).await.is_err() {
                t.abort();
                let _ = t.await;
            }
        }
    }
}
