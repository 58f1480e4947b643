//! `quire bench ...`: sustained-load tools. `bench bookie` drives one bookie's add stream with a
//! fixed number of entries in flight and reports throughput and latency (HDR histogram).

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use quire_proto::bookie as pb;
use quire_proto::bookie::bookie_client::BookieClient;
use quire_proto::entry::{self, EntryHeader};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, mpsc};

#[derive(Subcommand)]
pub enum BenchCommand {
    /// Sustained adds against one bookie.
    Bookie(BookieBench),
    /// Compare-and-set and ledger-create load on a metadata store.
    Metadata(crate::bench_metadata::MetadataBench),
    /// Sustained quorum appends through the ledger client (bookies found via the metadata
    /// store).
    Ledger(crate::bench_ledger::LedgerBench),
    /// Put, get or increment load on a table (or the same load on etcd, --etcd).
    Table(crate::bench_table::TableBench),
    /// Sustained appends to a stream through the stream-table servers.
    Stream(crate::bench_table::StreamBench),
}

#[derive(Args)]
pub struct BookieBench {
    /// Bookie gRPC address.
    #[arg(long)]
    addr: String,
    #[command(flatten)]
    load: Load,
}

/// The load of `bench bookie` and `bench ledger`.
#[derive(Args)]
pub struct Load {
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 1024)]
    pub(crate) entry_size: usize,
    /// Entries in flight (sent, not yet acknowledged) over all ledgers.
    #[arg(long, default_value_t = 256)]
    pub(crate) in_flight: usize,
    /// Ledgers written round-robin.
    #[arg(long, default_value_t = 1)]
    pub(crate) ledgers: u64,
    /// How long to send, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    pub(crate) duration: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    pub(crate) json: bool,
}

impl Load {
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(self.in_flight > 0, "--in-flight must be positive");
        anyhow::ensure!(self.ledgers > 0, "--ledgers must be positive");
        Ok(())
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let n: f64 = num.parse().map_err(|_| format!("bad duration {s:?}"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("bad duration unit in {s:?}: use ms, s, m or h")),
    };
    Ok(Duration::from_secs_f64(secs))
}

pub async fn run(cmd: BenchCommand) -> anyhow::Result<()> {
    match cmd {
        BenchCommand::Bookie(b) => bench_bookie(b).await,
        BenchCommand::Metadata(m) => crate::bench_metadata::bench_metadata(m).await,
        BenchCommand::Ledger(l) => crate::bench_ledger::bench_ledger(l).await,
        BenchCommand::Table(t) => crate::bench_table::bench_table(t).await,
        BenchCommand::Stream(s) => crate::bench_table::bench_stream(s).await,
    }
}

/// Entries sent in one add-stream message at most.
const BATCH_MAX: usize = 128;
/// Payload bytes in one add-stream message at most (the bookie caps a message at its largest
/// entry plus 1 MiB).
const BATCH_BYTES_MAX: usize = 512 << 10;

async fn bench_bookie(args: BookieBench) -> anyhow::Result<()> {
    let load = &args.load;
    load.check()?;
    let url = if args.addr.starts_with("http") {
        args.addr.clone()
    } else {
        format!("http://{}", args.addr)
    };
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
        .with_context(|| format!("connecting to bookie {}", args.addr))?;
    let mut client = BookieClient::new(channel)
        .max_decoding_message_size(64 << 20)
        .max_encoding_message_size(64 << 20);

    let (tx, rx) = mpsc::channel::<pb::AddRequest>(64);
    let mut responses = client
        .add(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .context("opening the add stream")?
        .into_inner();

    let window = Arc::new(Semaphore::new(load.in_flight));
    let sent_at: Arc<Mutex<HashMap<(u64, u64), Instant>>> = Arc::default();
    let base: u64 = rand::random::<u32>() as u64 * 1_000_000;
    let key = Bytes::from_static(b"quire-bench-master-key");
    let payload = vec![0x5au8; load.entry_size];
    let start = Instant::now();
    let deadline = start + load.duration;

    let sender = {
        let window = window.clone();
        let sent_at = sent_at.clone();
        let ledgers = load.ledgers;
        tokio::spawn(async move {
            let mut next = vec![0u64; ledgers as usize];
            let mut turn = 0usize;
            while Instant::now() < deadline {
                let Ok(first) = window.acquire().await else {
                    break;
                };
                first.forget();
                let mut n = 1;
                while n < BATCH_MAX && (n + 1) * payload.len() <= BATCH_BYTES_MAX {
                    match window.try_acquire() {
                        Ok(p) => {
                            p.forget();
                            n += 1;
                        }
                        Err(_) => break,
                    }
                }
                let mut entries = Vec::with_capacity(n);
                let now = Instant::now();
                {
                    let mut sent = sent_at.lock();
                    for _ in 0..n {
                        let l = turn % ledgers as usize;
                        turn += 1;
                        let ledger_id = base + l as u64;
                        let entry_id = next[l];
                        next[l] += 1;
                        let header = EntryHeader {
                            ledger_id,
                            entry_id,
                            lac: entry_id as i64 - 1,
                            length: (entry_id + 1) * payload.len() as u64,
                        };
                        entries.push(pb::AddEntry {
                            ledger_id,
                            entry_id,
                            master_key: key.clone(),
                            recovery: false,
                            body: entry::encode(&header, &payload),
                        });
                        sent.insert((ledger_id, entry_id), now);
                    }
                }
                if tx.send(pb::AddRequest { entries }).await.is_err() {
                    break;
                }
            }
        })
    };

    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let acked = Arc::new(AtomicU64::new(0));
    let mut errors = 0u64;
    let mut first_error: Option<String> = None;
    let mut progress = Progress::new(start);
    loop {
        let outstanding = load.in_flight - window.available_permits();
        if Instant::now() >= deadline && (sender.is_finished() && outstanding == 0) {
            break;
        }
        let msg = match tokio::time::timeout(Duration::from_secs(10), responses.message()).await {
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => anyhow::bail!("add stream failed: {e}"),
            Err(_) => anyhow::bail!("no add response for 10 s"),
        };
        let now = Instant::now();
        {
            let mut sent = sent_at.lock();
            for r in &msg.results {
                if let Some(t) = sent.remove(&(r.ledger_id, r.entry_id)) {
                    let us = now.duration_since(t).as_micros().max(1) as u64;
                    let _ = hist.record(us.min(120_000_000));
                }
                if r.code != quire_proto::StatusCode::Ok as i32 {
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("{:?}: {}", r.code, r.message));
                } else {
                    acked.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
        window.add_permits(msg.results.len());
        progress.tick(now, acked.load(Ordering::Relaxed), &hist);
        if now >= deadline + Duration::from_secs(30) {
            anyhow::bail!("entries still unacknowledged 30 s after the end");
        }
    }
    eprintln!();
    let elapsed = start.elapsed().as_secs_f64();
    let total = acked.load(Ordering::Relaxed);
    if let Some(e) = &first_error {
        eprintln!("{errors} adds failed; first: {e}");
    }
    Report {
        load,
        hist: &hist,
        entries: total,
        errors,
        elapsed,
    }
    .print(serde_json::json!({}), "");
    anyhow::ensure!(errors == 0, "{errors} adds failed");
    Ok(())
}

/// The progress line on stderr (rewritten in place), at most once a second.
pub(crate) struct Progress {
    start: Instant,
    last: Instant,
    last_count: u64,
}

impl Progress {
    pub(crate) fn new(start: Instant) -> Self {
        Self {
            start,
            last: start,
            last_count: 0,
        }
    }

    /// Prints the line when a second has passed since the last one: `total` entries acked so
    /// far, the rate since the last line, and the latency quantiles so far.
    pub(crate) fn tick(&mut self, now: Instant, total: u64, hist: &Histogram<u64>) {
        let since = now.duration_since(self.last);
        if since < Duration::from_secs(1) {
            return;
        }
        let rate = (total - self.last_count) as f64 / since.as_secs_f64();
        eprint!(
            "\r[{:>5.1}s] {:>10} acked  {:>9.0} entries/s  p50 {} us  p99 {} us   ",
            now.duration_since(self.start).as_secs_f64(),
            total,
            rate,
            hist.value_at_quantile(0.5),
            hist.value_at_quantile(0.99)
        );
        self.last = now;
        self.last_count = total;
    }
}

/// The end-of-run report of `bench bookie` and `bench ledger`.
pub(crate) struct Report<'a> {
    pub load: &'a Load,
    /// Latencies in microseconds.
    pub hist: &'a Histogram<u64>,
    /// Entries acknowledged.
    pub entries: u64,
    pub errors: u64,
    /// Seconds the run took.
    pub elapsed: f64,
}

impl Report<'_> {
    /// Prints one JSON object (with `extra`'s keys added) or one line of text (ending in
    /// `text_suffix`) on stdout.
    pub(crate) fn print(&self, extra: serde_json::Value, text_suffix: &str) {
        let (load, total, errors, elapsed) = (self.load, self.entries, self.errors, self.elapsed);
        let eps = total as f64 / elapsed;
        let mbps = eps * load.entry_size as f64 / 1e6;
        let (p50, p99, p999) = (
            self.hist.value_at_quantile(0.5),
            self.hist.value_at_quantile(0.99),
            self.hist.value_at_quantile(0.999),
        );
        if load.json {
            let mut o = serde_json::json!({
                "entries_per_sec": eps,
                "mb_per_sec": mbps,
                "p50_us": p50,
                "p99_us": p99,
                "p999_us": p999,
                "entries": total,
                "errors": errors,
                "entry_size": load.entry_size,
                "in_flight": load.in_flight,
                "ledgers": load.ledgers,
                "duration_s": elapsed,
            });
            if let (Some(o), serde_json::Value::Object(extra)) = (o.as_object_mut(), extra) {
                o.extend(extra);
            }
            println!("{o}");
        } else {
            println!(
                "{total} entries in {elapsed:.1} s: {eps:.0} entries/s, {mbps:.1} MB/s; latency p50 {p50} us, p99 {p99} us, p99.9 {p999} us; {errors} errors{text_suffix}"
            );
        }
    }
}
