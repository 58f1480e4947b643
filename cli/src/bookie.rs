//! `quire bookie`: runs a bookie until SIGTERM or SIGINT, then shuts it down cleanly.

use anyhow::Context;
use clap::Args;
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
}

#[derive(clap::Subcommand)]
enum BookieCommand {
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
    if let Some(BookieCommand::DumpJournal { dir }) = &args.command {
        return dump_journal(dir);
    }
    let cfg = args.config().context("invalid bookie configuration")?;
    let running = quire_bookie::start(cfg)
        .await
        .context("starting the bookie")?;
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
    running.stop().await;
    Ok(())
}
