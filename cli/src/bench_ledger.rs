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

use crate::bench::{Load, Progress, Report};
use crate::ledger::{Quorums, Target};

/// Give up when no append completes for this long.
const STALL_MAX: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct LedgerBench {
    #[command(flatten)]
    target: Target,
    #[command(flatten)]
    quorums: Quorums,
    #[command(flatten)]
    load: Load,
    /// Delete the ledgers at the end (they are closed either way).
    #[arg(long)]
    delete: bool,
}

pub async fn bench_ledger(args: LedgerBench) -> anyhow::Result<()> {
    let load = &args.load;
    load.check()?;
    args.quorums.check()?;
    let (ens, qw, qa) = (
        args.quorums.ensemble,
        args.quorums.write_quorum,
        args.quorums.ack_quorum,
    );
    let metadata = &args.target.metadata;
    let mut cfg = ClientConfig::new(metadata.clone());
    // The window is ours: the writer's own limits must not cut it.
    cfg.max_in_flight_entries = cfg.max_in_flight_entries.max(load.in_flight);
    cfg.max_in_flight_bytes = cfg
        .max_in_flight_bytes
        .max(load.in_flight.saturating_mul(load.entry_size));
    cfg.entry_size_max = cfg.entry_size_max.max(load.entry_size);
    let client = Client::connect(cfg)
        .await
        .with_context(|| format!("connecting to the metadata store {metadata}"))?;
    let opts = CreateOptions {
        ensemble: ens,
        write_quorum: qw,
        ack_quorum: qa,
        ..CreateOptions::default()
    };
    let writers: Vec<LedgerWriter> =
        futures::future::try_join_all((0..load.ledgers).map(|_| client.create(opts.clone())))
            .await
            .context("creating the ledgers")?;
    let ids: Vec<u64> = writers.iter().map(LedgerWriter::id).collect();
    eprintln!("writing ledgers {ids:?} (E={ens} Qw={qw} Qa={qa})");

    let payload = Bytes::from(vec![0x5au8; load.entry_size]);
    let mut hist = Histogram::<u64>::new_with_bounds(1, 120_000_000, 3)?;
    let mut pending = FuturesUnordered::new();
    let start = Instant::now();
    let deadline = start + load.duration;
    let mut sending = true;
    let mut turn = 0usize;
    let (mut acked, mut errors) = (0u64, 0u64);
    let mut first_error: Option<String> = None;
    let mut progress = Progress::new(start);
    loop {
        if sending && Instant::now() >= deadline {
            sending = false;
        }
        while sending && pending.len() < load.in_flight {
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
        progress.tick(now, acked, &hist);
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

    if let Some(e) = &first_error {
        eprintln!("{errors} appends failed; first: {e}");
    }
    Report {
        load,
        hist: &hist,
        entries: acked,
        errors,
        elapsed,
    }
    .print(
        serde_json::json!({"ensemble": ens, "write_quorum": qw, "ack_quorum": qa}),
        &format!(" (E={ens} Qw={qw} Qa={qa})"),
    );
    anyhow::ensure!(errors == 0, "{errors} appends failed");
    anyhow::ensure!(
        closed.iter().all(Result::is_ok),
        "some ledgers could not be closed"
    );
    Ok(())
}
