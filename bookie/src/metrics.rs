//! Bookie metrics, exposed in Prometheus text format on the HTTP `/metrics` endpoint.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

type Source = Box<dyn Fn() -> String + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    sources: parking_lot::Mutex<Vec<Source>>,
    pub adds: Counter,
    pub add_errors: Counter,
    pub add_seconds: Histogram,
    pub reads: Counter,
    pub read_errors: Counter,
    pub journal_sync_seconds: Histogram,
    pub journal_batch_records: Histogram,
    pub journal_batch_bytes: Histogram,
    pub journal_queue_bytes: Gauge,
    pub write_cache_bytes: Gauge,
    pub write_cache_hits: Counter,
    pub read_cache_hits: Counter,
    pub read_cache_misses: Counter,
    pub read_cache_bytes: Gauge,
    pub checkpoints: Counter,
    pub checkpoint_seconds: Histogram,
    pub add_throttled: Counter,
    pub entry_logs_collected: Counter,
    pub read_only: Gauge,
    pub ledgers: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut r = Registry::with_prefix("quire_bookie");
        let seconds = || Histogram::new(exponential_buckets(0.000_025, 2.0, 18));
        let m = Metrics {
            adds: Counter::default(),
            add_errors: Counter::default(),
            add_seconds: seconds(),
            reads: Counter::default(),
            read_errors: Counter::default(),
            journal_sync_seconds: seconds(),
            journal_batch_records: Histogram::new(exponential_buckets(1.0, 2.0, 14)),
            journal_batch_bytes: Histogram::new(exponential_buckets(256.0, 2.0, 16)),
            journal_queue_bytes: Gauge::default(),
            write_cache_bytes: Gauge::default(),
            write_cache_hits: Counter::default(),
            read_cache_hits: Counter::default(),
            read_cache_misses: Counter::default(),
            read_cache_bytes: Gauge::default(),
            checkpoints: Counter::default(),
            checkpoint_seconds: seconds(),
            add_throttled: Counter::default(),
            entry_logs_collected: Counter::default(),
            read_only: Gauge::default(),
            ledgers: Gauge::default(),
            registry: Registry::default(),
            sources: Default::default(),
        };
        r.register(
            "adds",
            "Entries added (acknowledged durable)",
            m.adds.clone(),
        );
        r.register("add_errors", "Adds that failed", m.add_errors.clone());
        r.register(
            "add_seconds",
            "Add latency, request to durable",
            m.add_seconds.clone(),
        );
        r.register("reads", "Entry reads served", m.reads.clone());
        r.register(
            "read_errors",
            "Entry reads that failed",
            m.read_errors.clone(),
        );
        r.register(
            "journal_sync_seconds",
            "Journal batch write+fdatasync latency",
            m.journal_sync_seconds.clone(),
        );
        r.register(
            "journal_batch_records",
            "Records per journal batch",
            m.journal_batch_records.clone(),
        );
        r.register(
            "journal_batch_bytes",
            "Bytes per journal batch",
            m.journal_batch_bytes.clone(),
        );
        r.register(
            "journal_queue_bytes",
            "Bytes queued for the journal",
            m.journal_queue_bytes.clone(),
        );
        r.register(
            "write_cache_bytes",
            "Bytes in write caches",
            m.write_cache_bytes.clone(),
        );
        r.register(
            "write_cache_hits",
            "Reads served from the write cache",
            m.write_cache_hits.clone(),
        );
        r.register(
            "read_cache_hits",
            "Reads served from the read cache",
            m.read_cache_hits.clone(),
        );
        r.register(
            "read_cache_misses",
            "Reads that went to an entry log",
            m.read_cache_misses.clone(),
        );
        r.register(
            "read_cache_bytes",
            "Bytes in read caches",
            m.read_cache_bytes.clone(),
        );
        r.register(
            "checkpoints",
            "Checkpoints completed",
            m.checkpoints.clone(),
        );
        r.register(
            "checkpoint_seconds",
            "Checkpoint duration",
            m.checkpoint_seconds.clone(),
        );
        r.register(
            "add_throttled",
            "Adds that waited for room in a full write cache",
            m.add_throttled.clone(),
        );
        r.register(
            "entry_logs_collected",
            "Entry logs removed by garbage collection",
            m.entry_logs_collected.clone(),
        );
        r.register(
            "read_only",
            "1 when the bookie is read-only",
            m.read_only.clone(),
        );
        r.register("ledgers", "Ledgers held", m.ledgers.clone());
        Metrics { registry: r, ..m }
    }

    /// Adds metrics rendered elsewhere in the process (autorecovery beside the bookie) to
    /// `/metrics`: `source` returns an OpenMetrics text ending in `# EOF`.
    pub fn add_source(&self, source: impl Fn() -> String + Send + Sync + 'static) {
        self.sources.lock().push(Box::new(source));
    }

    /// The Prometheus text exposition: the bookie's metrics, then the added sources'.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        let sources = self.sources.lock();
        if !sources.is_empty() {
            // One exposition has one `# EOF`, at its end.
            let mut body = out.strip_suffix("# EOF\n").unwrap_or(&out).to_string();
            for source in sources.iter() {
                let text = source();
                body.push_str(text.strip_suffix("# EOF\n").unwrap_or(&text));
            }
            body.push_str("# EOF\n");
            out = body;
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn added_sources_join_one_exposition() {
        let m = Metrics::new();
        m.add_source(|| "# TYPE other_up gauge\nother_up 1\n# EOF\n".to_string());
        let text = m.render();
        assert!(text.contains("quire_bookie_adds_total"));
        assert!(text.contains("other_up 1\n"));
        assert_eq!(text.matches("# EOF").count(), 1);
        assert!(text.ends_with("other_up 1\n# EOF\n"));
    }
}
