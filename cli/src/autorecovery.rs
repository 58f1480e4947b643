//! `quire autorecovery`: runs the autorecovery daemon (auditor candidate and replication worker),
//! or reports its state (`status`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Subcommand};
use quire_autorecovery::{AutoRecovery, AutoRecoveryConfig};

use crate::bench::parse_duration;
use crate::bookie::{shutdown_signal, write_file_atomic};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct AutoRecoveryArgs {
    #[command(subcommand)]
    command: Option<AutoRecoveryCommand>,
    /// Metadata store URI.
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: Option<String>,
    #[command(flatten)]
    settings: Settings,
    /// Do not take part in the auditor election.
    #[arg(long)]
    no_auditor: bool,
    /// Do not run a replication worker.
    #[arg(long)]
    no_worker: bool,
    /// HTTP address serving /metrics (Prometheus) and /status (JSON); port 0 picks one.
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Once serving, write the bound HTTP address here.
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// Settings shared by the daemon and the bookie's embedded autorecovery.
#[derive(Args, Clone, Default)]
pub struct Settings {
    /// Name in the auditor election, worker list and ledger locks (default: autorecovery-PID).
    #[arg(long)]
    id: Option<String>,
    /// How long a bookie must be gone before its ledgers are restored (0: at once).
    #[arg(long, value_parser = parse_duration)]
    lost_bookie_recovery_delay: Option<Duration>,
    /// An open ledger whose last fragment names a lost bookie is recovered (fenced and closed)
    /// this long after being marked, if its writer has not replaced the bookie by then.
    #[arg(long, value_parser = parse_duration)]
    open_ledger_grace: Option<Duration>,
    /// Interval of the scan for ledgers naming unregistered bookies (0: off).
    #[arg(long, value_parser = parse_duration)]
    bookie_check_interval: Option<Duration>,
    /// Interval of the replica check of closed ledgers (0: off).
    #[arg(long, value_parser = parse_duration)]
    replica_check_interval: Option<Duration>,
    /// Percentage of closed ledgers each replica check reads.
    #[arg(long)]
    replica_check_percent: Option<u8>,
    /// Interval of the zone rule check (0: off).
    #[arg(long, value_parser = parse_duration)]
    placement_check_interval: Option<Duration>,
    /// Copy bandwidth of the worker in bytes per second (0: unlimited).
    #[arg(long)]
    throttle_bytes_per_sec: Option<u64>,
}

impl Settings {
    pub fn apply(&self, cfg: &mut AutoRecoveryConfig) {
        if let Some(v) = &self.id {
            cfg.id = v.clone();
        }
        if let Some(v) = self.lost_bookie_recovery_delay {
            cfg.lost_bookie_recovery_delay = v;
        }
        if let Some(v) = self.open_ledger_grace {
            cfg.open_ledger_grace = v;
        }
        if let Some(v) = self.bookie_check_interval {
            cfg.bookie_check_interval = v;
        }
        if let Some(v) = self.replica_check_interval {
            cfg.replica_check_interval = v;
        }
        if let Some(v) = self.replica_check_percent {
            cfg.replica_check_percent = v;
        }
        if let Some(v) = self.placement_check_interval {
            cfg.placement_check_interval = v;
        }
        if let Some(v) = self.throttle_bytes_per_sec {
            cfg.throttle_bytes_per_sec = v;
        }
    }
}

#[derive(Subcommand)]
enum AutoRecoveryCommand {
    /// The active auditor, under-replicated ledgers and who works on them, workers' counters.
    Status {
        #[arg(long, env = "QUIRE_METADATA")]
        metadata: String,
        /// Print JSON (key `under_replicated` holds the count).
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(args: AutoRecoveryArgs) -> anyhow::Result<()> {
    if let Some(AutoRecoveryCommand::Status { metadata, json }) = &args.command {
        return status(metadata, *json).await;
    }
    let uri = args
        .metadata
        .clone()
        .context("--metadata URI is required to run the daemon")?;
    let mut cfg = AutoRecoveryConfig::default();
    args.settings.apply(&mut cfg);
    cfg.auditor = !args.no_auditor;
    cfg.worker = !args.no_worker;
    anyhow::ensure!(
        cfg.auditor || cfg.worker,
        "--no-auditor and --no-worker leave nothing to run"
    );
    let store = quire_metadata::connect(&uri)
        .await
        .with_context(|| format!("connecting to the metadata store {uri}"))?;
    let ar = AutoRecovery::start(store.clone(), cfg.clone()).await?;
    let mut http_task = None;
    if let Some(addr) = args.http {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding {addr}"))?;
        let bound = listener.local_addr()?;
        let app = http_router(ar.metrics().clone(), store.clone());
        http_task = Some(tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                tracing::error!(error = %e, "HTTP server failed");
            }
        }));
        if let Some(p) = &args.addr_file {
            write_file_atomic(p, &format!("{bound}\n"))?;
        }
        println!("autorecovery {} serving HTTP on {bound}", cfg.id);
    } else {
        println!("autorecovery {} running", cfg.id);
    }
    shutdown_signal().await?;
    ar.stop().await;
    if let Some(t) = http_task {
        t.abort();
    }
    Ok(())
}

fn http_router(
    metrics: std::sync::Arc<quire_autorecovery::Metrics>,
    store: quire_metadata::DynStore,
) -> axum::Router {
    use axum::routing::get;
    axum::Router::new()
        .route("/metrics", get(move || async move { metrics.render() }))
        .route(
            "/status",
            get(move || async move {
                match quire_autorecovery::status::status(&store).await {
                    Ok(s) => Ok(axum::Json(s)),
                    Err(e) => Err((axum::http::StatusCode::SERVICE_UNAVAILABLE, e.to_string())),
                }
            }),
        )
}

async fn status(uri: &str, json: bool) -> anyhow::Result<()> {
    let store = quire_metadata::connect(uri)
        .await
        .with_context(|| format!("connecting to the metadata store {uri}"))?;
    let s = quire_autorecovery::status::status(&store).await?;
    if json {
        println!("{}", serde_json::to_string_pretty(&s)?);
        return Ok(());
    }
    match &s.auditor {
        Some(a) => {
            println!("auditor: {} (since {} ms)", a.id, a.since_ms);
            if !a.lost_bookies.is_empty() {
                let lost: Vec<&String> = a.lost_bookies.keys().collect();
                println!("lost bookies: {lost:?}");
            }
            println!(
                "ledgers marked: {}, placement violations: {}",
                a.ledgers_marked, a.placement_violations
            );
        }
        None => println!("auditor: none elected"),
    }
    println!("under-replicated ledgers: {}", s.under_replicated);
    for l in &s.ledgers {
        let by = l.locked_by.as_deref().unwrap_or("-");
        println!(
            "  ledger {}: missing {:?}, worker {by}",
            l.ledger_id, l.missing
        );
    }
    println!("workers: {}", s.workers.len());
    for w in &s.workers {
        println!(
            "  {}: {} ledgers, {} fragments, {} entries, {} bytes replicated, {} failures{}",
            w.id,
            w.ledgers_replicated,
            w.fragments_replicated,
            w.entries_replicated,
            w.bytes_replicated,
            w.failures,
            w.current_ledger
                .map(|l| format!(", on ledger {l}"))
                .unwrap_or_default()
        );
    }
    if !s.decommissioning.is_empty() {
        println!("decommissioning: {:?}", s.decommissioning);
    }
    Ok(())
}
