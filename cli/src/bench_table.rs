//! `quire bench table` and `quire bench stream`: sustained load on the stream-table servers,
//! reporting throughput and latency (HDR histogram, microseconds).
//!
//! `bench table` runs `--concurrency` workers, each doing one operation at a time (put, get or
//! increment of a random key among `--keys`) until `--duration` is over. `--etcd ENDPOINTS` runs
//! the *same* loop, keys and values against an etcd cluster (plain puts and linearizable gets
//! through `quire_metadata`'s etcd backend), so the two compare like for like: one request in
//! flight per worker, latency from the call to its reply. Keys are `/bench/<n>`
//! (`/bench/counter/<n>` for increments); for `get` every key is written once before the timed
//! run.
//!
//! `bench stream` opens `--appenders` append streams to one stream and keeps `--concurrency`
//! records in flight on each; a record's latency runs from its send to its offset coming back.
//!
//! Both print one line of text, or with `--json` one object with `ops_per_sec`, `p50_us`,
//! `p99_us`, `p999_us`, `max_us`, `ops`, `errors`, `concurrency` (and `mb_per_sec` for
//! streams). The run fails (after the report) if any operation failed.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, ValueEnum};
use hdrhistogram::Histogram;
use parking_lot::Mutex;
#[cfg(feature = "etcd")]
use quire_metadata::MetadataStore;
use quire_stream_table::client::{StreamHandle, TableHandle};
use quire_stream_table::stream::StreamConfig;
use quire_stream_table::table::{TableConfig, Value};
use quire_stream_table::{Error, Name};
use tokio::task::JoinSet;

use crate::bench::parse_duration;
use crate::st_client::ServerTarget;

/// Longest latency the histograms hold (a call that takes longer is recorded as this).
const HIST_MAX_US: u64 = 120_000_000;
/// An operation still unanswered this long after it was sent fails the run.
const OP_STALL_MAX: Duration = Duration::from_secs(60);
/// A run stops early once this many operations failed (and more than 1% of them).
const ERRORS_MAX: u64 = 100;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, since: Instant, now: Instant) {
    let us = (now.duration_since(since).as_micros() as u64).clamp(1, HIST_MAX_US);
    hist.record(us)
        .expect("value within the histogram's bounds");
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Op {
    Put,
    Get,
    Incr,
}

impl Op {
    fn name(self) -> &'static str {
        match self {
            Op::Put => "put",
            Op::Get => "get",
            Op::Incr => "incr",
        }
    }
}

#[derive(Args)]
pub struct TableBench {
    #[command(flatten)]
    target: ServerTarget,
    /// Run the same workload against etcd instead: its client endpoints, comma-separated
    /// (host:port or http://host:port).
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// The operation: put, get or incr (incr is not available on etcd).
    #[arg(long, value_enum, default_value = "put")]
    op: Op,
    /// Distinct keys, picked at random.
    #[arg(long, default_value_t = 10_000)]
    keys: u64,
    /// Value bytes of a put.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Workers, each with one operation in flight.
    #[arg(long, default_value_t = 16)]
    concurrency: usize,
    /// How long to run, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Run the same load this long first, unmeasured (connections, range opening).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    warmup: Duration,
    /// Ranges of the table when the bench creates it.
    #[arg(long, default_value_t = 4)]
    ranges: u32,
    /// The table (created when missing).
    #[arg(long, default_value = "bench/table")]
    table: Name,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
pub struct StreamBench {
    #[command(flatten)]
    target: ServerTarget,
    /// The stream (created with default settings when missing).
    #[arg(long, default_value = "bench/stream")]
    stream: Name,
    /// Payload bytes per record.
    #[arg(long, default_value_t = 1024)]
    record_size: usize,
    /// Records in flight (sent, offset not yet back) on each append stream (1 to 1024).
    #[arg(long, default_value_t = 256)]
    concurrency: usize,
    /// Append streams opened to the stream (all reach its one writer).
    #[arg(long, default_value_t = 1)]
    appenders: usize,
    /// How long to send, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// What a load run measured.
struct LoadResult {
    hist: Histogram<u64>,
    ops: u64,
    errors: u64,
    first_error: Option<String>,
    elapsed: Duration,
}

impl LoadResult {
    fn rate(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// The common JSON keys.
    fn json(&self, concurrency: usize) -> serde_json::Map<String, serde_json::Value> {
        let q = |p: f64| self.hist.value_at_quantile(p);
        let o = serde_json::json!({
            "ops_per_sec": self.rate(),
            "p50_us": q(0.5),
            "p99_us": q(0.99),
            "p999_us": q(0.999),
            "max_us": self.hist.max(),
            "mean_us": self.hist.mean(),
            "ops": self.ops,
            "errors": self.errors,
            "concurrency": concurrency,
            "duration_s": self.elapsed.as_secs_f64(),
        });
        match o {
            serde_json::Value::Object(m) => m,
            _ => unreachable!("a JSON object literal"),
        }
    }

    fn text(&self, unit: &str) -> String {
        let q = |p: f64| self.hist.value_at_quantile(p);
        format!(
            "{} {unit} in {:.1} s: {:.0} {unit}/s; latency p50 {} us, p99 {} us, p99.9 {} us, max {} us; {} errors",
            self.ops,
            self.elapsed.as_secs_f64(),
            self.rate(),
            q(0.5),
            q(0.99),
            q(0.999),
            self.hist.max(),
            self.errors
        )
    }

    /// Fails when any operation failed (after the report was printed).
    fn check(&self, what: &str) -> anyhow::Result<()> {
        if let Some(e) = &self.first_error {
            bail!("{} {what} failed; first: {e}", self.errors);
        }
        Ok(())
    }
}

/// What the workers of a run share.
struct Shared {
    ops: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
    first_error: Mutex<Option<String>>,
}

impl Shared {
    fn failed(&self, e: String) {
        let errors = self.errors.fetch_add(1, Ordering::Relaxed) + 1;
        self.first_error.lock().get_or_insert(e);
        if errors >= ERRORS_MAX && errors * 100 > self.ops.load(Ordering::Relaxed) {
            self.stop.store(true, Ordering::Relaxed);
        }
    }
}

/// The progress line on stderr (rewritten in place, once a second).
struct Progress {
    start: Instant,
    last: Instant,
    last_ops: u64,
}

impl Progress {
    fn new(start: Instant) -> Self {
        Progress {
            start,
            last: start,
            last_ops: 0,
        }
    }

    fn tick(&mut self, unit: &str, ops: u64, errors: u64) {
        let now = Instant::now();
        let rate = (ops - self.last_ops) as f64 / now.duration_since(self.last).as_secs_f64();
        eprint!(
            "\r[{:>5.1}s] {ops:>10} {unit}  {rate:>9.0} {unit}/s  {errors} errors   ",
            now.duration_since(self.start).as_secs_f64(),
        );
        self.last = now;
        self.last_ops = ops;
    }
}

/// The load loop both targets of `bench table` share: `concurrency` workers, each calling
/// `op(worker, i)` one at a time until `duration` has passed (or too many failed), timing each
/// call from its start to its reply.
async fn run_load<F, Fut>(
    concurrency: usize,
    duration: Duration,
    unit: &str,
    op: F,
) -> anyhow::Result<LoadResult>
where
    F: Fn(usize, u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let op = Arc::new(op);
    let shared = Arc::new(Shared {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    });
    let start = Instant::now();
    let deadline = start + duration;
    let mut workers = JoinSet::new();
    for w in 0..concurrency {
        let (op, shared) = (op.clone(), shared.clone());
        workers.spawn(async move {
            let mut hist = histogram();
            let mut i = 0u64;
            while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
                let t = Instant::now();
                let r = tokio::time::timeout(OP_STALL_MAX, op(w, i)).await;
                i += 1;
                match r {
                    Ok(Ok(())) => {
                        record(&mut hist, t, Instant::now());
                        shared.ops.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => shared.failed(format!("{e:#}")),
                    Err(_) => {
                        shared.failed(format!("no reply within {OP_STALL_MAX:?}"));
                        shared.stop.store(true, Ordering::Relaxed);
                    }
                }
            }
            hist
        });
    }
    let mut hist = histogram();
    let mut progress = Progress::new(start);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            r = workers.join_next() => match r {
                None => break,
                Some(r) => hist.add(r.context("a load worker failed")?).expect("same bounds"),
            },
            _ = ticks.tick() => progress.tick(
                unit,
                shared.ops.load(Ordering::Relaxed),
                shared.errors.load(Ordering::Relaxed),
            ),
        }
    }
    let elapsed = start.elapsed();
    eprintln!();
    let first_error = shared.first_error.lock().take();
    Ok(LoadResult {
        hist,
        ops: shared.ops.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error,
        elapsed,
    })
}

/// What `bench table` drives.
#[derive(Clone)]
enum Target {
    Table(Arc<TableHandle>),
    #[cfg(feature = "etcd")]
    Etcd(Arc<quire_metadata::etcd::EtcdStore>),
}

impl Target {
    async fn put(&self, key: String, value: Bytes) -> anyhow::Result<()> {
        match self {
            Target::Table(t) => {
                t.put(key, Value::Bytes(value)).await?;
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(e) => {
                e.put(&key, value).await?;
            }
        }
        Ok(())
    }

    async fn get(&self, key: String) -> anyhow::Result<()> {
        match self {
            Target::Table(t) => {
                t.get(key).await?;
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(e) => {
                MetadataStore::get(e.as_ref(), &key).await?;
            }
        }
        Ok(())
    }

    async fn incr(&self, key: String) -> anyhow::Result<()> {
        match self {
            Target::Table(t) => {
                t.increment(key, 1).await?;
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(_) => bail!("etcd has no atomic increment"),
        }
        Ok(())
    }
}

#[cfg(feature = "etcd")]
async fn connect_etcd(endpoints: &[String]) -> anyhow::Result<Target> {
    let store = quire_metadata::etcd::EtcdStore::connect(endpoints)
        .await
        .with_context(|| format!("connecting to etcd {}", endpoints.join(",")))?;
    Ok(Target::Etcd(Arc::new(store)))
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(_endpoints: &[String]) -> anyhow::Result<Target> {
    bail!("this quire was built without the `etcd` feature")
}

/// Key `n` of the workload: `/bench/<n>`, and `/bench/counter/<n>` for increments (so that they
/// never meet the byte values a put run left).
fn key(op: Op, n: u64) -> String {
    match op {
        Op::Incr => format!("/bench/counter/{n}"),
        Op::Put | Op::Get => format!("/bench/{n}"),
    }
}

/// Opens the table, creating it when missing.
async fn open_table(args: &TableBench) -> anyhow::Result<TableHandle> {
    let client = args.target.connect().await?;
    let t = client.table(args.table.clone());
    match t.info().await {
        Ok(meta) => {
            if meta.config.ranges != args.ranges {
                eprintln!(
                    "table {} exists with {} ranges (not --ranges {})",
                    args.table, meta.config.ranges, args.ranges
                );
            }
        }
        Err(Error::NoSuchTable(_)) => {
            let cfg = TableConfig {
                ranges: args.ranges,
                ..TableConfig::default()
            };
            match t.create(cfg).await {
                Ok(_) | Err(Error::AlreadyExists(_)) => {}
                Err(e) => {
                    return Err(
                        anyhow::Error::new(e).context(format!("creating the table {}", args.table))
                    );
                }
            }
        }
        Err(e) => return Err(anyhow::Error::new(e).context(format!("opening {}", args.table))),
    }
    Ok(t)
}

pub async fn bench_table(args: TableBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be positive");
    anyhow::ensure!(args.keys > 0, "--keys must be positive");
    let (target, target_name) = if args.etcd.is_empty() {
        (
            Target::Table(Arc::new(open_table(&args).await?)),
            "quire-table",
        )
    } else {
        if args.op == Op::Incr {
            bail!("--op incr runs on tables only: etcd has no atomic increment");
        }
        (connect_etcd(&args.etcd).await?, "etcd")
    };
    let value = Bytes::from(
        (0..args.value_size)
            .map(|_| rand::random::<u8>())
            .collect::<Vec<u8>>(),
    );

    if args.op == Op::Get {
        // Every key exists before the timed gets: written once, by as many workers.
        eprintln!("writing {} keys for the gets", args.keys);
        let next = Arc::new(AtomicU64::new(0));
        let keys = args.keys;
        let mut writers = JoinSet::new();
        for _ in 0..args.concurrency {
            let (target, value, next) = (target.clone(), value.clone(), next.clone());
            writers.spawn(async move {
                loop {
                    let n = next.fetch_add(1, Ordering::Relaxed);
                    if n >= keys {
                        return Ok::<_, anyhow::Error>(());
                    }
                    target
                        .put(key(Op::Get, n), value.clone())
                        .await
                        .with_context(|| format!("writing key {}", key(Op::Get, n)))?;
                }
            });
        }
        while let Some(r) = writers.join_next().await {
            r.context("a writer task failed")??;
        }
    }

    let (op, keys) = (args.op, args.keys);
    let load = |duration: Duration| {
        let (t, v) = (target.clone(), value.clone());
        run_load(args.concurrency, duration, "ops", move |_, _| {
            let (t, v) = (t.clone(), v.clone());
            async move {
                let k = key(op, rand::random_range(0..keys));
                match op {
                    Op::Put => t.put(k, v).await,
                    Op::Get => t.get(k).await,
                    Op::Incr => t.incr(k).await,
                }
            }
        })
    };
    if !args.warmup.is_zero() {
        eprintln!("warming up for {:?}", args.warmup);
        load(args.warmup).await?.check("warm-up operations")?;
    }
    let result = load(args.duration).await?;

    if args.json {
        let mut o = result.json(args.concurrency);
        o.insert("target".into(), target_name.into());
        o.insert("op".into(), op.name().into());
        o.insert("keys".into(), keys.into());
        o.insert("value_size".into(), args.value_size.into());
        match &target {
            Target::Table(_) => {
                o.insert("table".into(), args.table.to_string().into());
            }
            #[cfg(feature = "etcd")]
            Target::Etcd(_) => {
                o.insert("etcd".into(), args.etcd.join(",").into());
            }
        }
        println!("{}", serde_json::Value::Object(o));
    } else {
        println!(
            "{target_name} {}: {} (concurrency {}, {} keys, {} B values)",
            op.name(),
            result.text("ops"),
            args.concurrency,
            keys,
            args.value_size
        );
    }
    result.check("operations")
}

/// Opens the stream, creating it when missing.
async fn open_stream(args: &StreamBench) -> anyhow::Result<StreamHandle> {
    let client = args.target.connect().await?;
    let s = client.stream(args.stream.clone());
    match s.info().await {
        Ok(_) => {}
        Err(Error::NoSuchStream(_)) => match s.create(StreamConfig::default()).await {
            Ok(_) | Err(Error::AlreadyExists(_)) => {}
            Err(e) => {
                return Err(
                    anyhow::Error::new(e).context(format!("creating the stream {}", args.stream))
                );
            }
        },
        Err(e) => return Err(anyhow::Error::new(e).context(format!("opening {}", args.stream))),
    }
    Ok(s)
}

pub async fn bench_stream(args: StreamBench) -> anyhow::Result<()> {
    // The client queues up to 1024 records per appender: a larger window could block a send on
    // records whose offsets are only taken after it.
    anyhow::ensure!(
        (1..=1024).contains(&args.concurrency),
        "--concurrency must be 1 to 1024"
    );
    anyhow::ensure!(args.appenders > 0, "--appenders must be positive");
    let s = Arc::new(open_stream(&args).await?);
    let payload = Bytes::from(
        (0..args.record_size)
            .map(|_| rand::random::<u8>())
            .collect::<Vec<u8>>(),
    );
    let shared = Arc::new(Shared {
        ops: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
        first_error: Mutex::new(None),
    });
    let start = Instant::now();
    let deadline = start + args.duration;
    let window = args.concurrency;
    let mut tasks = JoinSet::new();
    for _ in 0..args.appenders {
        let (s, payload, shared) = (s.clone(), payload.clone(), shared.clone());
        tasks.spawn(async move {
            let mut hist = histogram();
            let r: anyhow::Result<()> = async {
                let mut appender = s.appender().await?;
                // Send times of the records in flight, in send order (offsets come back in it).
                let mut sent = std::collections::VecDeque::with_capacity(window);
                loop {
                    let sending = Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed);
                    if sending && sent.len() < window {
                        sent.push_back(Instant::now());
                        appender.send(payload.clone()).await?;
                        continue;
                    }
                    let Some(t) = sent.pop_front() else {
                        break;
                    };
                    tokio::time::timeout(OP_STALL_MAX, appender.next_offset())
                        .await
                        .map_err(|_| anyhow::anyhow!("no offset within {OP_STALL_MAX:?}"))??;
                    record(&mut hist, t, Instant::now());
                    shared.ops.fetch_add(1, Ordering::Relaxed);
                }
                appender.finish().await?;
                Ok(())
            }
            .await;
            if let Err(e) = r {
                shared.failed(format!("{e:#}"));
            }
            hist
        });
    }
    let mut hist = histogram();
    let mut progress = Progress::new(start);
    let mut ticks = tokio::time::interval_at(
        tokio::time::Instant::now() + Duration::from_secs(1),
        Duration::from_secs(1),
    );
    loop {
        tokio::select! {
            r = tasks.join_next() => match r {
                None => break,
                Some(r) => hist.add(r.context("an appender task failed")?).expect("same bounds"),
            },
            _ = ticks.tick() => progress.tick(
                "records",
                shared.ops.load(Ordering::Relaxed),
                shared.errors.load(Ordering::Relaxed),
            ),
        }
    }
    eprintln!();
    let result = LoadResult {
        hist,
        ops: shared.ops.load(Ordering::Relaxed),
        errors: shared.errors.load(Ordering::Relaxed),
        first_error: shared.first_error.lock().take(),
        elapsed: start.elapsed(),
    };
    let mbps = result.rate() * args.record_size as f64 / 1e6;
    if args.json {
        let mut o = result.json(args.concurrency);
        o.insert("mb_per_sec".into(), mbps.into());
        o.insert("record_size".into(), args.record_size.into());
        o.insert("appenders".into(), args.appenders.into());
        o.insert("stream".into(), args.stream.to_string().into());
        println!("{}", serde_json::Value::Object(o));
    } else {
        println!(
            "stream append: {}; {mbps:.1} MB/s ({} appenders x {} in flight, {} B records)",
            result.text("records"),
            args.appenders,
            args.concurrency,
            args.record_size
        );
    }
    result.check("appenders")
}
