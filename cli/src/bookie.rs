//! `quire bookie`: runs a bookie until SIGTERM or SIGINT, then shuts it down cleanly.

use anyhow::Context;
use clap::Args;
use quire_autorecovery::{AutoRecovery, AutoRecoveryConfig};
use quire_bookie::BookieConfig;
use quire_bookie::config::JournalIoKind;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BookieArgs {
    #[command(subcommand)]
    command: Option<BookieCommand>,
    /// TOML configuration file; the flags below override it.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Journal directory (put it on its own disk).
    #[arg(long)]
    journal_dir: Option<PathBuf>,
    /// Ledger directory; repeat for several disks.
    #[arg(long = "ledger-dir")]
    ledger_dirs: Vec<PathBuf>,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// HTTP address for /health, /metrics and the admin API (port 0 picks a free port).
    #[arg(long)]
    http: Option<SocketAddr>,
    /// Once serving, write the bound gRPC address (line 1) and HTTP address (line 2) here.
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Bookie identity recorded in the cookie (default: the cookie's, or for a new bookie the
    /// listen address).
    #[arg(long)]
    bookie_id: Option<String>,
    /// Metadata store URI (quire://host:port,..., etcd://..., file:///path): check the cookie
    /// there and register the bookie.
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: Option<String>,
    /// Registration session timeout in milliseconds (a dead bookie leaves the registry after it).
    #[arg(long)]
    session_timeout_ms: Option<u64>,
    /// Placement label (zone or rack) published with the registration.
    #[arg(long)]
    zone: Option<String>,
    /// Journal I/O backend: auto, io-uring or plain.
    #[arg(long, value_parser = parse_io)]
    journal_io: Option<JournalIoKind>,
    /// Do not fdatasync the journal. FOR BENCHMARKS ONLY: a crash loses acknowledged entries.
    #[arg(long)]
    no_journal_sync: bool,
    /// Do not run autorecovery (auditor candidate and replication worker) in this process.
    #[arg(long)]
    no_autorecovery: bool,
    #[command(flatten)]
    autorecovery: crate::autorecovery::Settings,
}

#[derive(clap::Subcommand)]
enum BookieCommand {
    /// Move every replica off a live bookie (placement gives it nothing new meanwhile); then it
    /// can be stopped and removed. Refused for an unknown bookie, or when no other bookie could
    /// take some of its replicas.
    Decommission {
        /// The bookie id.
        id: String,
        #[arg(long, env = "QUIRE_METADATA")]
        metadata: String,
        /// Give up after this long (the autorecovery workers go on with what is left).
        #[arg(long, default_value = "30m", value_parser = crate::bench::parse_duration)]
        timeout: std::time::Duration,
        /// An open ledger whose last fragment is on the bookie is recovered (fenced and closed)
        /// after this long, unless its writer moved off the bookie first.
        #[arg(long, default_value = "30s", value_parser = crate::bench::parse_duration)]
        open_ledger_grace: std::time::Duration,
        /// Copy bandwidth in bytes per second (0: unlimited).
        #[arg(long, default_value_t = 64 << 20)]
        throttle_bytes_per_sec: u64,
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
        /// Instead: end a decommission, so the bookie may receive replicas again.
        #[arg(long)]
        cancel: bool,
    },
    /// Print the records of a journal directory (offline; do not run on a live bookie's journal
    /// while you need exact output, as it may be mid-write).
    DumpJournal {
        /// The journal directory.
        dir: PathBuf,
    },
}

fn dump_journal(dir: &Path) -> anyhow::Result<()> {
    use quire_bookie::journal::{self, LogMark, Record};
    let mut n = 0u64;
    journal::replay(dir, LogMark::START, |rec, at| {
        n += 1;
        let line = match &rec {
            Record::Add {
                ledger_id,
                entry_id,
                body,
                ..
            } => {
                format!(
                    "add      ledger {ledger_id} entry {entry_id} body {} bytes",
                    body.len()
                )
            }
            Record::Fence { ledger_id, .. } => format!("fence    ledger {ledger_id}"),
            Record::ExplicitLac { ledger_id, lac, .. } => {
                format!("lac      ledger {ledger_id} explicit lac {lac}")
            }
            Record::Delete { ledger_id } => format!("delete   ledger {ledger_id}"),
            Record::Batch { seq, bytes } => format!("batch    {seq} ({bytes} bytes)"),
        };
        println!("{:016x}:{:<10} {line}", at.file_id, at.offset);
        Ok(())
    })?;
    println!("{n} records");
    Ok(())
}

fn parse_io(s: &str) -> Result<JournalIoKind, String> {
    match s {
        "auto" => Ok(JournalIoKind::Auto),
        "io-uring" | "io_uring" => Ok(JournalIoKind::IoUring),
        "plain" => Ok(JournalIoKind::Plain),
        _ => Err(format!(
            "unknown journal I/O backend {s:?}: use auto, io-uring or plain"
        )),
    }
}

impl BookieArgs {
    fn config(&self) -> anyhow::Result<BookieConfig> {
        let mut cfg = match &self.config {
            Some(p) => BookieConfig::from_file(p)?,
            None => BookieConfig::default(),
        };
        if let Some(d) = &self.journal_dir {
            cfg.journal.dir = d.clone();
        }
        if !self.ledger_dirs.is_empty() {
            cfg.storage.ledger_dirs = self.ledger_dirs.clone();
        }
        if let Some(a) = self.listen {
            cfg.listen = a;
        }
        if let Some(a) = self.http {
            cfg.http = a;
        }
        if let Some(id) = &self.bookie_id {
            cfg.bookie_id = Some(id.clone());
        }
        if let Some(m) = &self.metadata {
            cfg.metadata = Some(m.clone());
        }
        if let Some(t) = self.session_timeout_ms {
            cfg.session_timeout_ms = t;
        }
        if let Some(z) = &self.zone {
            cfg.zone = Some(z.clone());
        }
        if let Some(io) = self.journal_io {
            cfg.journal.io = io;
        }
        if self.no_journal_sync {
            cfg.journal.sync = false;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The autorecovery to run beside the bookie: the config file's `[autorecovery]` section,
    /// then the flags; none without a metadata store or when turned off.
    fn autorecovery(&self, cfg: &BookieConfig) -> anyhow::Result<Option<AutoRecoveryConfig>> {
        let mut table = cfg.autorecovery.clone();
        let enabled = match table.remove("enabled") {
            None => true,
            Some(toml::Value::Boolean(b)) => b,
            Some(v) => anyhow::bail!("[autorecovery] enabled must be true or false, not {v}"),
        };
        let mut ar: AutoRecoveryConfig = toml::Value::Table(table)
            .try_into()
            .context("invalid [autorecovery] section")?;
        if !cfg.autorecovery.contains_key("id") {
            // Named after the bookie once it is known.
            ar.id = String::new();
        }
        self.autorecovery.apply(&mut ar);
        if !enabled || self.no_autorecovery || cfg.metadata.is_none() || !(ar.auditor || ar.worker)
        {
            return Ok(None);
        }
        Ok(Some(ar))
    }
}

/// Starts autorecovery beside a running bookie, named after it unless configured otherwise.
async fn start_autorecovery(
    mut ar: AutoRecoveryConfig,
    uri: &str,
    bookie_id: &str,
) -> anyhow::Result<AutoRecovery> {
    if ar.id.is_empty() {
        ar.id = bookie_id.to_string();
    }
    let store = quire_metadata::connect(uri)
        .await
        .with_context(|| format!("connecting autorecovery to {uri}"))?;
    Ok(AutoRecovery::start(store, ar).await?)
}

#[allow(clippy::too_many_arguments)]
async fn decommission(
    id: &str,
    uri: &str,
    timeout: std::time::Duration,
    open_ledger_grace: std::time::Duration,
    throttle_bytes_per_sec: u64,
    json: bool,
    cancel: bool,
) -> anyhow::Result<()> {
    use quire_autorecovery::decommission as d;
    let store = quire_metadata::connect(uri)
        .await
        .with_context(|| format!("connecting to the metadata store {uri}"))?;
    if cancel {
        d::cancel(store, id).await?;
        println!("bookie {id} is no longer being decommissioned");
        return Ok(());
    }
    let client = quire_ledger_client::Client::with_store(
        store.clone(),
        quire_ledger_client::ClientConfig::new(uri),
    )
    .await?;
    let opts = d::DecommissionOptions {
        timeout,
        open_ledger_grace,
        throttle_bytes_per_sec,
    };
    let report = d::decommission(store, client, id, opts, |left, waiting| {
        if waiting > 0 {
            eprintln!(
                "{left} ledgers still have replicas on {id} ({waiting} open with it in their \
                 last ensemble: they wait for their writers to close them)"
            );
        } else {
            eprintln!("{left} ledgers still have replicas on {id}");
        }
    })
    .await
    .with_context(|| format!("decommissioning {id}"))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        println!(
            "bookie {id} holds no replicas: moved {} of {} ledgers ({} fragments, {} entries, \
             {} bytes) in {:.1} s. It gets no new ledgers; stop it and remove it.",
            report.ledgers_moved,
            report.ledgers,
            report.fragments_moved,
            report.entries_copied,
            report.bytes_copied,
            report.elapsed_ms as f64 / 1000.0
        );
    }
    Ok(())
}

fn write_addr_file(path: &Path, grpc: SocketAddr, http: SocketAddr) -> anyhow::Result<()> {
    write_file_atomic(path, &format!("{grpc}\n{http}\n"))
}

/// Writes `text` to `path` through a temporary file and a rename, so that a reader polling for
/// the file (an address file) never sees half of it.
pub(crate) fn write_file_atomic(path: &Path, text: &str) -> anyhow::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}

/// Waits for SIGTERM or SIGINT (the signals that stop a server cleanly).
pub(crate) async fn shutdown_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received"),
        _ = int.recv() => tracing::info!("SIGINT received"),
    }
    Ok(())
}

pub async fn run(args: BookieArgs) -> anyhow::Result<()> {
    match &args.command {
        Some(BookieCommand::DumpJournal { dir }) => return dump_journal(dir),
        Some(BookieCommand::Decommission {
            id,
            metadata,
            timeout,
            open_ledger_grace,
            throttle_bytes_per_sec,
            json,
            cancel,
        }) => {
            return decommission(
                id,
                metadata,
                *timeout,
                *open_ledger_grace,
                *throttle_bytes_per_sec,
                *json,
                *cancel,
            )
            .await;
        }
        None => {}
    }
    let cfg = args.config().context("invalid bookie configuration")?;
    let autorecovery = args.autorecovery(&cfg)?;
    let uri = cfg.metadata.clone();
    let running = quire_bookie::start(cfg)
        .await
        .context("starting the bookie")?;
    let autorecovery = match (autorecovery, uri) {
        (Some(ar), Some(uri)) => {
            let ar = start_autorecovery(ar, &uri, running.bookie.id()).await?;
            let metrics = ar.metrics().clone();
            running
                .bookie
                .metrics()
                .add_source(move || metrics.render());
            Some(ar)
        }
        _ => None,
    };
    if let Some(p) = &args.addr_file {
        write_addr_file(p, running.grpc_addr, running.http_addr)?;
    }
    println!(
        "bookie {} serving gRPC on {} and HTTP on {}",
        running.bookie.id(),
        running.grpc_addr,
        running.http_addr
    );
    shutdown_signal().await?;
    if let Some(ar) = autorecovery {
        ar.stop().await;
    }
    running.stop().await;
    Ok(())
}
