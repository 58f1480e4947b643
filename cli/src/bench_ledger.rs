//! `quire bench ledger`: sustained appends through the ledger client (quorum writes over the
//! bookies found in the metadata store) with a fixed number of appends in flight, reporting
//! throughput and per-append latency (HDR histogram) with the same keys as `bench bookie`.

use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use hdrhistogram::Histogram;
use quire_ledger_client::{Client, ClientConfig, CreateOptions, LedgerWriter};

/// Give up when no append completes for this long.
const STALL_MAX: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct LedgerBench {
    /// Metadata URI: quire://host:port,..., etcd://host:port,... or file:///path.
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: String,
    /// Bookies each ledger is striped over (E).
    #[arg(long, default_value_t = 3)]
    ensemble: u32,
    /// Bookies each entry is written to (Qw).
    #[arg(long, default_value_t = 3)]
    write_quorum: u32,
    /// Acknowledgements that complete an append (Qa).
    #[arg(long, default_value_t = 2)]
    ack_quorum: u32,
    /// Payload bytes per entry.
    #[arg(long, default_value_t = 1024)]
    entry_size: usize,
    /// Appends in flight (sent, not yet acknowledged) over all ledgers.
    #[arg(long, default_value_t = 256)]
    in_flight: usize,
    /// Ledgers written round-robin.
    #[arg(long, default_value_t = 1)]
    ledgers: u64,
    /// How long to send, e.g. 10s, 500ms, 1m.
    #[arg(long, default_value = "10s", value_parser = crate::bench::parse_duration)]
    duration: Duration,
    /// Print one JSON object instead of text.
    #[arg(long)]
    json: bool,
    /// Delete the ledgers at the end (they are closed either way).
    #[arg(long)]
    delete: bool,
}

pub async fn bench_ledger(args: LedgerBench) -> anyhow::Result<()> {
    anyhow::ensure!(args.in_flight > 0, "--in-flight must be positive");
    anyhow::ensure!(args.ledgers > 0, "--ledgers must be positive");
    let (ens, qw, qa) = (args.ensemble, args.write_quorum, args.ack_quorum);
    anyhow::ensure!(
        ens >= qw && qw >= qa && qa >= 1,
        "need --ensemble >= --write-quorum >= --ack-quorum >= 1, got {ens}, {qw}, {qa}"
    );
    let mut cfg = ClientConfig::new(args.metadata.clone());
    // The window is ours: the writer's own limits must not cut it.
    cfg.max_in_flight_entries = cfg.max_in_flight_entries.max(args.in_flight);
    cfg.max_in_flight_bytes = cfg
        .max_in_flight_bytes
        .max(args.in_flight.saturating_mul(args.entry_size));
    cfg.entry_size_max = cfg.entry_size_max.max(args.entry_size);
    let client = Client::connect(cfg)
        .await
        .with_context(|| format!("connecting to the metadata store {}", args.metadata))?;
    let opts = CreateOptions {
        ensemble: ens,
        write_quorum: qw,
        ack_quorum: qa,
        ..CreateOptions::default()
    };
    let writers: Vec<LedgerWriter> =
        futures::future::try_join_all((0..args.ledgers).map(|_| client.create(opts.clone())))
            .await
            .context("creating the ledgers")?;
    let ids: Vec<u64> = writers.iter().map(LedgerWriter::id).collect();
    eprintln!("writing ledgers {ids:?} (E={ens} Qw={qw} Qa={qa})");

    let payload = Bytes::from(vec![0x5au8; args.entry_size]);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let deadline = start + args.duration;
    let mut sending = true;
    let mut turn = 0usize;
    let (mut acked, mut errors) = (0u64, 0u64);
    let mut first_error: Option<String> = None;
    let mut last_progress = start;
    let mut last_count = 0u64;
    loop {
        if sending && Instant::now() >= deadline {
            sending = false;
        }
        while sending && pending.len() < args.in_flight {
            let w = &writers[turn % writers.len()];
            turn += 1;
            let sent = Instant::now();
            match w.append_async(payload.clone()).await {
                Ok(f) => pending.push(async move { (f.await, sent) }),
                Err(e) => {
                    // The writer is done for: stop sending and drain what is in flight.
                    errors += 1;
                    first_error.get_or_insert_with(|| format!("ledger {}: {e}", w.id()));
                    sending = false;
                }
            }
        }
        if pending.is_empty() {
            break;
        }
        let (r, sent) = match tokio::time::timeout(STALL_MAX, pending.next()).await {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(_) => anyhow::bail!(
                "no append acknowledged for {STALL_MAX:?} ({} in flight)",
                pending.len()
            ),
        };
        let now = Instant::now();
        match r {
            Ok(_) => {
                acked += 1;
                let us = now.duration_since(sent).as_micros().max(1) as u64;
                let _ = hist.record(us.min(120_000_000));
            }
            Err(e) => {
                errors += 1;
                first_error.get_or_insert_with(|| e.to_string());
                sending = false;
            }
        }
        if now.duration_since(last_progress) >= Duration::from_secs(1) {
            let rate =
                (acked - last_count) as f64 / now.duration_since(last_progress).as_secs_f64();
            eprint!(
                "\r[{:>5.1}s] {:>10} acked  {:>9.0} entries/s  p50 {} us  p99 {} us   ",
                now.duration_since(start).as_secs_f64(),
                acked,
                rate,
                hist.value_at_quantile(0.5),
                hist.value_at_quantile(0.99)
            );
            last_progress = now;
            last_count = acked;
        }
    }
    eprintln!();
    let elapsed = start.elapsed().as_secs_f64();

    let closed = futures::future::join_all(writers.iter().map(LedgerWriter::close)).await;
    for (id, r) in ids.iter().zip(&closed) {
        if let Err(e) = r {
            eprintln!("closing ledger {id} failed: {e}");
        }
    }
    if args.delete {
        for id in &ids {
            if let Err(e) = client.delete(*id).await {
                eprintln!("deleting ledger {id} failed: {e}");
            }
        }
    }

    let eps = acked as f64 / elapsed;
    let mbps = eps * args.entry_size as f64 / 1e6;
    if let Some(e) = &first_error {
        eprintln!("{errors} appends failed; first: {e}");
    }
    let (p50, p99, p999) = (
        hist.value_at_quantile(0.5),
        hist.value_at_quantile(0.99),
        hist.value_at_quantile(0.999),
    );
    if args.json {
        println!(
            "{}",
            serde_json::json!({
                "entries_per_sec": eps,
                "mb_per_sec": mbps,
                "p50_us": p50,
                "p99_us": p99,
                "p999_us": p999,
                "entries": acked,
                "errors": errors,
                "entry_size": args.entry_size,
                "in_flight": args.in_flight,
                "ledgers": args.ledgers,
                "duration_s": elapsed,
                "ensemble": ens,
                "write_quorum": qw,
                "ack_quorum": qa,
            })
        );
    } else {
        println!(
            "{acked} entries in {elapsed:.1} s: {eps:.0} entries/s, {mbps:.1} MB/s; latency p50 {p50} us, p99 {p99} us, p99.9 {p999} us; {errors} errors (E={ens} Qw={qw} Qa={qa})"
        );
    }
    anyhow::ensure!(errors == 0, "{errors} appends failed");
    anyhow::ensure!(
        closed.iter().all(Result::is_ok),
        "some ledgers could not be closed"
    );
    Ok(())
}
