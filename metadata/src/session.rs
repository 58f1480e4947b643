//! Sessions: a lease kept alive in the background, for ephemeral keys (bookie registration,
//! auditor and owner elections).
//!
//! A session sends a keep-alive every third of its TTL. When the store says the lease is gone
//! (it expired while this process was paused or cut off), or when no keep-alive has got through
//! for a whole TTL (it may have expired), the session is *lost*: its ephemeral keys are gone or
//! going, and the owner must stop relying on them, start a new session and re-create them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use crate::store::{DynStore, LeaseId, MetaError, Result};

pub struct Session {
    store: DynStore,
    lease: LeaseId,
    ttl: Duration,
    lost: watch::Receiver<bool>,
    task: tokio::task::JoinHandle<()>,
}

impl Session {
    pub async fn start(store: DynStore, ttl: Duration) -> Result<Self> {
        let lease = store.grant_lease(ttl).await?;
        let (tx, lost) = watch::channel(false);
        let s = store.clone();
        let task = tokio::spawn(async move {
            let period = ttl / 3;
            // When the last keep-alive that succeeded was sent: the lease lives at most `ttl`
            // past it.
            let mut renewed = tokio::time::Instant::now();
            loop {
                tokio::time::sleep(period).await;
                let sent = tokio::time::Instant::now();
                match s.keep_alive(lease).await {
                    Ok(_) => renewed = sent,
                    Err(MetaError::LeaseNotFound(_)) => {
                        tracing::warn!(lease, "session lost: its lease expired");
                        let _ = tx.send(true);
                        return;
                    }
                    // Cut off from the store for a whole TTL: the lease may be gone, and with
                    // it the keys and locks it held, so the owner must stop relying on them.
                    Err(e) if renewed.elapsed() >= ttl => {
                        tracing::warn!(lease, error = %e,
                            "session lost: no keep-alive got through for a whole TTL");
                        let _ = tx.send(true);
                        return;
                    }
                    // Transient: keep trying.
                    Err(e) => tracing::warn!(lease, error = %e, "session keep-alive failed"),
                }
            }
        });
        Ok(Session {
            store,
            lease,
            ttl,
            lost,
            task,
        })
    }

    pub fn lease(&self) -> LeaseId {
        self.lease
    }

    pub fn ttl(&self) -> Duration {
        self.ttl
    }

    pub fn is_lost(&self) -> bool {
        *self.lost.borrow()
    }

    /// Resolves when the session is lost.
    pub async fn lost(&self) {
        let mut rx = self.lost.clone();
        let _ = rx.wait_for(|l| *l).await;
    }

    /// Ends the session now, deleting its ephemeral keys.
    pub async fn close(self) -> Result<()> {
        self.task.abort();
        match self.store.revoke_lease(self.lease).await {
            Ok(()) | Err(MetaError::LeaseNotFound(_)) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Shared handle for code that only needs to observe a session.
pub type SharedSession = Arc<Session>;
