//! Autorecovery metrics, in Prometheus text format (served by the daemon's `/metrics`).

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

pub struct Metrics {
    registry: Registry,
    /// Ledgers marked under-replicated, as of the auditor's last look.
    pub under_replicated_ledgers: Gauge,
    /// 1 while this process is the active auditor.
    pub auditor_active: Gauge,
    pub ledgers_marked: Counter,
    pub placement_violations: Gauge,
    pub ledgers_replicated: Counter,
    pub fragments_replicated: Counter,
    pub entries_replicated: Counter,
    pub bytes_replicated: Counter,
    pub replication_failures: Counter,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("quire_autorecovery");
        let m = Metrics {
            under_replicated_ledgers: Gauge::default(),
            auditor_active: Gauge::default(),
            ledgers_marked: Counter::default(),
            placement_violations: Gauge::default(),
            ledgers_replicated: Counter::default(),
            fragments_replicated: Counter::default(),
            entries_replicated: Counter::default(),
            bytes_replicated: Counter::default(),
            replication_failures: Counter::default(),
            registry: Registry::default(),
        };
        r.register(
            "under_replicated_ledgers",
            "Ledgers marked under-replicated (auditor's view)",
            m.under_replicated_ledgers.clone(),
        );
        r.register(
            "auditor_active",
            "1 while this process is the active auditor",
            m.auditor_active.clone(),
        );
        r.register(
            "ledgers_marked",
            "Ledgers this auditor marked under-replicated",
            m.ledgers_marked.clone(),
        );
        r.register(
            "placement_violations",
            "Ledgers whose write sets break the zone rules, at the last check",
            m.placement_violations.clone(),
        );
        r.register(
            "ledgers_replicated",
            "Ledgers this worker restored",
            m.ledgers_replicated.clone(),
        );
        r.register(
            "fragments_replicated",
            "Fragment replicas this worker copied",
            m.fragments_replicated.clone(),
        );
        r.register(
            "entries_replicated",
            "Entries this worker copied",
            m.entries_replicated.clone(),
        );
        r.register(
            "bytes_replicated",
            "Entry bytes this worker copied",
            m.bytes_replicated.clone(),
        );
        r.register(
            "replication_failures",
            "Ledger replications that failed (retried later)",
            m.replication_failures.clone(),
        );
        Metrics { registry: r, ..m }
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}
