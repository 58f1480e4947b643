//! `quire bench metadata`: load on a metadata store (any backend a metadata URI names).
//!
//! Two phases, each with `--clients` concurrent tasks:
//! - compare-and-set: every client owns one key and does read-modify-CAS on it (one `get` at the
//!   start, then one CAS per op, since each CAS returns the new version) until `--ops` CAS have
//!   succeeded in all;
//! - ledger creation, as a ledger client does it: `allocate_id("ledgers")`, then `create` of the
//!   ledger's key; `--ops / 4` ledgers (at least 1000).
//!
//! Everything lives under a fresh `/bench/<run>/` prefix, deleted at the end (best effort).
//! Latencies are per call (per allocate+create pair for ledgers), in microseconds.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use hdrhistogram::Histogram;
use parking_lot::Mutex;
use quire_metadata::store::list_all;
use quire_metadata::{DynStore, MetaError};
use tokio::task::JoinSet;

#[derive(Args)]
pub struct MetadataBench {
    /// Metadata URI: quire://host:port,..., etcd://host:port,..., file:///path or memory://.
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: String,
    /// Concurrent clients (tasks sharing one connection to the store).
    #[arg(long, default_value_t = 16)]
    clients: usize,
    /// Successful compare-and-set operations in all; the ledger phase creates ops/4 (>= 1000).
    #[arg(long, default_value_t = 20_000)]
    ops: u64,
    /// Value bytes per key.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
}

/// Longest latency the histograms hold (a call that takes longer is recorded as this).
const HIST_MAX_US: u64 = 120_000_000;

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, HIST_MAX_US, 3).expect("valid histogram bounds")
}

fn record(hist: &mut Histogram<u64>, since: Instant) {
    let us = (since.elapsed().as_micros() as u64).clamp(1, HIST_MAX_US);
    hist.record(us)
        .expect("value within the histogram's bounds");
}

/// What every client task of a phase shares.
struct Shared {
    store: DynStore,
    /// Operations claimed (started or done); a failed one is given back.
    claimed: AtomicU64,
    target: u64,
    errors: AtomicU64,
    /// The run aborts once errors exceed this (1% of the operations asked for).
    max_errors: u64,
    first_error: Mutex<Option<String>>,
    hist: Mutex<Histogram<u64>>,
}

impl Shared {
    fn new(store: DynStore, target: u64, max_errors: u64) -> Arc<Self> {
        Arc::new(Shared {
            store,
            claimed: AtomicU64::new(0),
            target,
            errors: AtomicU64::new(0),
            max_errors,
            first_error: Mutex::new(None),
            hist: Mutex::new(histogram()),
        })
    }

    /// Claims one operation; false once all are claimed or the run is failing.
    fn claim(&self) -> bool {
        if self.failing() {
            return false;
        }
        if self.claimed.fetch_add(1, Ordering::Relaxed) < self.target {
            return true;
        }
        self.claimed.fetch_sub(1, Ordering::Relaxed);
        false
    }

    /// Counts a failed operation and gives its claim back for another try.
    fn failed(&self, what: &str, e: &MetaError) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        self.claimed.fetch_sub(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .get_or_insert_with(|| format!("{what}: {e}"));
    }

    fn failing(&self) -> bool {
        self.errors.load(Ordering::Relaxed) > self.max_errors
    }

    fn errors(&self) -> u64 {
        self.errors.load(Ordering::Relaxed)
    }

    fn check(&self, phase: &str) -> anyhow::Result<()> {
        if self.failing() {
            bail!(
                "{phase}: {} operations failed, more than 1% of {} (first: {})",
                self.errors(),
                self.target,
                self.first_error.lock().as_deref().unwrap_or("?")
            );
        }
        Ok(())
    }
}

struct PhaseResult {
    done: u64,
    elapsed: Duration,
    hist: Histogram<u64>,
    errors: u64,
}

impl PhaseResult {
    fn rate(&self) -> f64 {
        self.done as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// One line of text: count, rate and latency percentiles.
    fn summary(&self, phase: &str, unit: &str) -> String {
        let q = |p: f64| self.hist.value_at_quantile(p);
        format!(
            "{phase}: {} {unit} in {:.2} s: {:.0} {unit}/s; latency p50 {} us, p99 {} us, p99.9 {} us, max {} us",
            self.done,
            self.elapsed.as_secs_f64(),
            self.rate(),
            q(0.5),
            q(0.99),
            q(0.999),
            self.hist.max()
        )
    }
}

/// Runs `clients` tasks of `body` until they all return; each returns how many ops it did.
async fn run_phase<F, Fut>(
    shared: &Arc<Shared>,
    clients: usize,
    phase: &str,
    body: F,
) -> anyhow::Result<PhaseResult>
where
    F: Fn(Arc<Shared>, usize) -> Fut,
    Fut: std::future::Future<Output = u64> + Send + 'static,
{
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for c in 0..clients {
        tasks.spawn(body(shared.clone(), c));
    }
    let mut done = 0;
    while let Some(r) = tasks.join_next().await {
        done += r.with_context(|| format!("{phase}: a client task failed"))?;
    }
    let elapsed = start.elapsed();
    shared.check(phase)?;
    Ok(PhaseResult {
        done,
        elapsed,
        hist: shared.hist.lock().clone(),
        errors: shared.errors(),
    })
}

/// A value of `size` bytes starting with `n` (big-endian, as far as it fits).
fn value(size: usize, n: u64) -> Bytes {
    let mut v = vec![0x5au8; size];
    let b = n.to_be_bytes();
    let k = size.min(8);
    v[..k].copy_from_slice(&b[8 - k..]);
    Bytes::from(v)
}

/// One client of the CAS phase: read its key once, then CAS with the version it holds.
async fn cas_client(s: Arc<Shared>, key: String, value_size: usize) -> u64 {
    let mut hist = histogram();
    let mut done = 0;
    let mut version: Option<u64> = None;
    while s.claim() {
        let v = match version {
            Some(v) => v,
            None => match s.store.get(&key).await {
                Ok(Some(kv)) => kv.version,
                Ok(None) => {
                    s.failed("get", &MetaError::NotFound(key.clone()));
                    continue;
                }
                Err(e) => {
                    s.failed("get", &e);
                    continue;
                }
            },
        };
        let t = Instant::now();
        match s
            .store
            .compare_and_set(&key, value(value_size, v + 1), v)
            .await
        {
            Ok(kv) => {
                record(&mut hist, t);
                version = Some(kv.version);
                done += 1;
            }
            Err(e) => {
                // Re-read the key before the next try (the CAS may have taken effect).
                version = None;
                s.failed("compare_and_set", &e);
            }
        }
    }
    s.hist.lock().add(&hist).expect("same bounds");
    done
}

/// One client of the ledger phase: allocate an id, then create the ledger's key.
async fn create_client(s: Arc<Shared>, prefix: String, value_size: usize) -> u64 {
    let mut hist = histogram();
    let mut done = 0;
    while s.claim() {
        let t = Instant::now();
        let id = match s.store.allocate_id("ledgers").await {
            Ok(id) => id,
            Err(e) => {
                s.failed("allocate_id", &e);
                continue;
            }
        };
        match s
            .store
            .create(&format!("{prefix}{id:020}"), value(value_size, id), None)
            .await
        {
            Ok(_) => {
                record(&mut hist, t);
                done += 1;
            }
            Err(e) => s.failed("create", &e),
        }
    }
    s.hist.lock().add(&hist).expect("same bounds");
    done
}

/// Deletes every key under `prefix` with `clients` tasks; returns (deleted, failed).
async fn cleanup(store: &DynStore, prefix: &str, clients: usize) -> anyhow::Result<(u64, u64)> {
    let keys = list_all(store.as_ref(), prefix)
        .await
        .with_context(|| format!("listing {prefix} for cleanup"))?;
    let keys = Arc::new(Mutex::new(keys));
    let deleted = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for _ in 0..clients {
        let (store, keys) = (store.clone(), keys.clone());
        let (deleted, failed) = (deleted.clone(), failed.clone());
        tasks.spawn(async move {
            loop {
                let Some(kv) = keys.lock().pop() else { return };
                match store.delete(&kv.key, None).await {
                    Ok(()) | Err(MetaError::NotFound(_)) => deleted.fetch_add(1, Ordering::Relaxed),
                    Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    Ok((
        deleted.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    ))
}

pub async fn bench_metadata(args: MetadataBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.clients > 0, "--clients must be positive");
    anyhow::ensure!(args.ops > 0, "--ops must be positive");
    let store = quire_metadata::connect(&args.metadata)
        .await
        .with_context(|| format!("connecting to metadata store {}", args.metadata))?;
    let run = format!("{:016x}", rand::random::<u64>());
    let root = format!("/bench/{run}/");
    let cas_keys: Vec<String> = (0..args.clients)
        .map(|c| format!("{root}cas/{c:05}"))
        .collect();
    let ledger_prefix = format!("{root}ledgers/");
    let log = |msg: String| {
        if !args.json {
            eprintln!("{msg}");
        }
    };

    log(format!(
        "setup: {} keys under {root} on {}",
        args.clients, args.metadata
    ));
    {
        let mut tasks = JoinSet::new();
        for key in &cas_keys {
            let (store, key) = (store.clone(), key.clone());
            let v = value(args.value_size, 0);
            tasks.spawn(async move { store.create(&key, v, None).await.map(|_| ()) });
        }
        while let Some(r) = tasks.join_next().await {
            r?.with_context(|| format!("setup: creating the bench keys on {}", args.metadata))?;
        }
    }

    let result = async {
        log(format!(
            "compare-and-set: {} clients, {} ops",
            args.clients, args.ops
        ));
        let cas = Shared::new(store.clone(), args.ops, args.ops / 100);
        let cas = run_phase(&cas, args.clients, "compare-and-set", |s, c| {
            cas_client(s, cas_keys[c].clone(), args.value_size)
        })
        .await?;

        let creates = (args.ops / 4).max(1000);
        log(format!(
            "ledger create: {} clients, {creates} ledgers",
            args.clients
        ));
        let lc = Shared::new(store.clone(), creates, creates / 100);
        let lc = run_phase(&lc, args.clients, "ledger create", |s, _| {
            create_client(s, ledger_prefix.clone(), args.value_size)
        })
        .await
        .inspect_err(|_| {
            eprintln!(
                "{} (before the failure)",
                cas.summary("compare-and-set", "ops")
            )
        })?;
        anyhow::Ok((cas, lc))
    }
    .await;

    log(format!("cleanup: deleting {root}"));
    match cleanup(&store, &root, args.clients).await {
        Ok((_, 0)) => {}
        Ok((_, failed)) => eprintln!("cleanup: {failed} keys under {root} could not be deleted"),
        Err(e) => eprintln!("cleanup: {e:#}"),
    }
    let (cas, lc) = result?;

    let q = |h: &Histogram<u64>, p: f64| h.value_at_quantile(p);
    let errors = cas.errors + lc.errors;
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "ops_per_sec": cas.rate(),
                "p50_us": q(&cas.hist, 0.5),
                "p99_us": q(&cas.hist, 0.99),
                "p999_us": q(&cas.hist, 0.999),
                "max_us": cas.hist.max(),
                "ledger_creates_per_sec": lc.rate(),
                "create_p50_us": q(&lc.hist, 0.5),
                "create_p99_us": q(&lc.hist, 0.99),
                "clients": args.clients,
                "ops": cas.done,
                "ledger_creates": lc.done,
                "value_size": args.value_size,
                "errors": errors,
                "cas_seconds": cas.elapsed.as_secs_f64(),
                "create_seconds": lc.elapsed.as_secs_f64(),
            })
        );
    } else {
        println!("{}", cas.summary("compare-and-set", "ops"));
        println!("{}", lc.summary("ledger create", "creates"));
        println!("{} clients, {errors} errors", args.clients);
    }
    Ok(())
}
