//! Autorecovery settings (names after BookKeeper's, where it has them).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AutoRecoveryConfig {
    /// This process's name in the auditor election, the worker list and ledger locks.
    pub id: String,
    /// Take part in the auditor election. Default: true.
    pub auditor: bool,
    /// Run a replication worker. Default: true.
    pub worker: bool,
    /// How long a bookie must be gone before its ledgers are marked (BookKeeper's
    /// `lostBookieRecoveryDelay`). 0 marks them at once. Default: 30 s.
    #[serde(with = "ms")]
    pub lost_bookie_recovery_delay: Duration,
    /// Full scan for ledgers naming unregistered bookies (`auditorPeriodicBookieCheckInterval`).
    /// 0 turns it off (the registry watch still runs). Default: 1 h.
    #[serde(with = "ms")]
    pub bookie_check_interval: Duration,
    /// Replica check of closed ledgers: every entry on every bookie of its write set
    /// (`auditorPeriodicCheckInterval`; it reads every replica, so it is rare). 0 turns it off.
    /// Default: 1 week, as BookKeeper's.
    #[serde(with = "ms")]
    pub replica_check_interval: Duration,
    /// Percentage of closed ledgers each replica check reads (picked at random). Default: 100.
    pub replica_check_percent: u8,
    /// Zone rule check of every ledger's write sets (`auditorPeriodicPlacementPolicyCheckInterval`).
    /// 0 turns it off. Default: 1 day.
    #[serde(with = "ms")]
    pub placement_check_interval: Duration,
    /// A ledger not closed whose last fragment names a lost bookie is left to its writer's
    /// ensemble change this long after being marked; then it is recovered (fenced and closed)
    /// and repaired (`openLedgerRereplicationGracePeriod`). Default: 30 s.
    #[serde(with = "ms")]
    pub open_ledger_grace: Duration,
    /// Copy bandwidth of one worker, bytes per second; 0 is unlimited
    /// (`replicationRateByBytes`). Default: 64 MiB/s.
    pub throttle_bytes_per_sec: u64,
    /// How often an idle worker looks for marked ledgers. Default: 1 s.
    #[serde(with = "ms")]
    pub worker_poll_interval: Duration,
    /// Session (lease) timeout of the auditor election, the worker's locks and its published
    /// state: a dead process loses them this long after. Default: 10 s.
    #[serde(with = "ms")]
    pub session_timeout: Duration,
}

impl Default for AutoRecoveryConfig {
    fn default() -> Self {
        AutoRecoveryConfig {
            id: format!("autorecovery-{}", std::process::id()),
            auditor: true,
            worker: true,
            lost_bookie_recovery_delay: Duration::from_secs(30),
            bookie_check_interval: Duration::from_secs(3600),
            replica_check_interval: Duration::from_secs(7 * 86_400),
            replica_check_percent: 100,
            placement_check_interval: Duration::from_secs(86_400),
            open_ledger_grace: Duration::from_secs(30),
            throttle_bytes_per_sec: 64 << 20,
            worker_poll_interval: Duration::from_secs(1),
            session_timeout: Duration::from_secs(10),
        }
    }
}

impl AutoRecoveryConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidConfig(m));
        if self.id.is_empty() || self.id.contains('/') || self.id.len() > 255 {
            return bad(format!("bad autorecovery id {:?}", self.id));
        }
        if self.replica_check_percent == 0 || self.replica_check_percent > 100 {
            return bad(format!(
                "replica_check_percent must be 1..=100, got {}",
                self.replica_check_percent
            ));
        }
        if self.session_timeout < Duration::from_secs(1) {
            return bad("session_timeout must be at least 1 s".into());
        }
        if self.worker_poll_interval.is_zero() {
            return bad("worker_poll_interval must be above 0".into());
        }
        Ok(())
    }
}

/// Durations as milliseconds in TOML and JSON.
mod ms {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}
