//! `quire standalone`: everything in one process on one local directory, the embedded default.
//!
//! - the embedded metadata store (`DIR/metadata`), served over gRPC so that tools and the
//!   bookies connect to it with `quire://ADDR`;
//! - three bookies (`--bookies`), bookie N with its journal in `DIR/bookie-N/journal` and its
//!   ledger directory in `DIR/bookie-N/ledgers`, identified as `standalone-bookie-N`: the id
//!   is fixed rather than the listen address, so a restart on other ports (port 0) keeps every
//!   bookie's identity, cookie and ledgers; the client finds the current address in the registry;
//! - the gRPC ledger API, over a ledger client of that metadata store;
//! - a stream-table server (id `standalone`): the stream and table services, on the ledger
//!   API's port.
//!
//! It starts in that order, waits until every bookie is registered (so the first `Create`
//! finds them), prints the addresses and writes them to `--addr-file` as JSON; SIGTERM or
//! SIGINT stops it in the reverse order (the stream-table server with its final checkpoints,
//! the ledger API, the bookies with their clean journal and cache shutdown, the metadata store). Everything is durable: a restart on the same
//! directory, even after kill -9, serves all data acknowledged before.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::Args;
use quire_bookie::BookieConfig;
use quire_ledger_client::Client;
use quire_metadata::DynStore;
use quire_metadata::bookies::BookieRegistry;
use quire_stream_table::server::{ServerConfig, StreamTableServer};

use crate::bookie::{shutdown_signal, write_file_atomic};

/// How long the bookies get to appear in the registry.
const REGISTER_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Args)]
pub struct StandaloneArgs {
    /// Directory for all data: the metadata store and every bookie's journal and ledgers.
    #[arg(long)]
    data_dir: PathBuf,
    /// Once serving, write the addresses here as JSON: {"metadata": ..., "ledger_api": ...,
    /// "stream_table": ..., "bookies": [...]} (plus "bookie_ids" and "bookie_http").
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Metadata service address (tools connect with quire://ADDR).
    #[arg(long, default_value = "127.0.0.1:7000")]
    metadata_listen: SocketAddr,
    /// Ledger API (gRPC) address; the stream and table services are served there too.
    #[arg(long, default_value = "127.0.0.1:4181")]
    api_listen: SocketAddr,
    /// gRPC address of bookie 1; bookie N listens on the next ports (port 0: free ports).
    #[arg(long, default_value = "127.0.0.1:3181")]
    bookie_listen_base: SocketAddr,
    /// HTTP address (health, metrics, admin) of bookie 1; bookie N on the next ports.
    #[arg(long, default_value = "127.0.0.1:8000")]
    bookie_http_base: SocketAddr,
    /// Number of bookies.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u16).range(1..=16))]
    bookies: u16,
    /// Writers (ledgers created through the API and not yet closed) held open at most.
    #[arg(long, default_value_t = 1024)]
    max_writers: usize,
}

/// The address of the `i`-th (0-based) server of a series starting at `base`.
fn nth(base: SocketAddr, i: u16) -> anyhow::Result<SocketAddr> {
    if base.port() == 0 {
        return Ok(base);
    }
    let port = base
        .port()
        .checked_add(i)
        .with_context(|| format!("no port {i} after {base}"))?;
    Ok(SocketAddr::new(base.ip(), port))
}

fn bookie_config(
    args: &StandaloneArgs,
    dir: &Path,
    n: u16,
    metadata_uri: &str,
) -> anyhow::Result<BookieConfig> {
    let root = dir.join(format!("bookie-{n}"));
    let journal = root.join("journal");
    let ledgers = root.join("ledgers");
    for d in [&journal, &ledgers] {
        std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
    }
    let mut cfg = BookieConfig {
        bookie_id: Some(format!("standalone-bookie-{n}")),
        listen: nth(args.bookie_listen_base, n - 1)?,
        http: nth(args.bookie_http_base, n - 1)?,
        metadata: Some(metadata_uri.to_string()),
        ..BookieConfig::default()
    };
    cfg.journal.dir = journal;
    cfg.storage.ledger_dirs = vec![ledgers];
    // Three bookies share one machine: smaller caches than a dedicated bookie's defaults.
    cfg.storage.write_cache_bytes_max = 64 << 20;
    cfg.storage.read_cache_bytes_max = 32 << 20;
    // No polling between journal batches: here three journals share the cores with everything
    // else, and yielding loops cost more than the wake-ups they save (table puts at 16 in
    // flight: ~9,300/s without, ~8,800/s with).
    cfg.journal.spin_us = 0;
    cfg.validate()?;
    Ok(cfg)
}

/// Waits until every bookie is registered as writable at its current address.
async fn wait_registered(store: DynStore, bookies: &[(String, SocketAddr)]) -> anyhow::Result<()> {
    let registry = BookieRegistry::new(store);
    let deadline = Instant::now() + REGISTER_TIMEOUT;
    loop {
        let listed = registry.writable().await.unwrap_or_default();
        let missing: Vec<&str> = bookies
            .iter()
            .filter(|(id, addr)| {
                !listed
                    .iter()
                    .any(|b| &b.id == id && b.info.addr == addr.to_string())
            })
            .map(|(id, _)| id.as_str())
            .collect();
        if missing.is_empty() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "bookies not registered within {REGISTER_TIMEOUT:?}: {}",
                missing.join(", ")
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The servers started so far, stopped in reverse order.
#[derive(Default)]
struct Servers {
    metadata: Option<quire_metadata::server::MetadataServerHandle>,
    bookies: Vec<quire_bookie::Running>,
    api: Option<quire_ledger_api::Running>,
    stream_table: Option<StreamTableServer>,
    autorecovery: Option<quire_autorecovery::AutoRecovery>,
}

impl Servers {
    async fn stop(self) {
        if let Some(ar) = self.autorecovery {
            ar.stop().await;
        }
        // Writers and ranges close (final checkpoints, leases released) while the ledger
        // client, the bookies and the store still work.
        if let Some(st) = self.stream_table {
            st.shutdown().await;
            tracing::info!("stream-table server stopped");
        }
        if let Some(api) = self.api {
            api.stop().await;
            tracing::info!("ledger API stopped");
        }
        // The bookies leave the registry through the metadata store, so it stops last.
        futures::future::join_all(self.bookies.into_iter().map(|b| b.stop())).await;
        tracing::info!("bookies stopped");
        if let Some(m) = self.metadata {
            m.stop().await;
            tracing::info!("metadata store stopped");
        }
    }
}

/// Starts everything; returns the addresses as JSON and as text.
async fn start(
    args: &StandaloneArgs,
    servers: &mut Servers,
) -> anyhow::Result<(serde_json::Value, String)> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("creating {}", args.data_dir.display()))?;
    let dir = args
        .data_dir
        .canonicalize()
        .with_context(|| format!("resolving {}", args.data_dir.display()))?;
    let meta_dir = dir.join("metadata");
    std::fs::create_dir_all(&meta_dir)
        .with_context(|| format!("creating {}", meta_dir.display()))?;
    let metadata = quire_metadata::server::serve_embedded(args.metadata_listen, meta_dir)
        .await
        .context("starting the embedded metadata store")?;
    let meta_addr = metadata.addr;
    let store: DynStore = Arc::new(metadata.store());
    servers.metadata = Some(metadata);
    let uri = format!("quire://{meta_addr}");
    tracing::info!(%meta_addr, "metadata store serving");

    let mut bookies = Vec::new();
    for n in 1..=args.bookies {
        let cfg = bookie_config(args, &dir, n, &uri)?;
        let running = quire_bookie::start(cfg)
            .await
            .with_context(|| format!("starting bookie {n}"))?;
        bookies.push((running.bookie.id().to_string(), running.grpc_addr));
        servers.bookies.push(running);
    }
    wait_registered(store.clone(), &bookies).await?;

    // Shared by the ledger API and the stream-table server: both have tailing readers.
    let client_cfg = quire_stream_table::server::ledger_client_config(uri.clone());
    let gateway_cfg = crate::ledger_api::gateway_config(&client_cfg, args.max_writers);
    let client = Client::connect(client_cfg)
        .await
        .context("connecting the ledger client")?;
    let listener = tokio::net::TcpListener::bind(args.api_listen)
        .await
        .with_context(|| format!("binding the ledger API on {}", args.api_listen))?;
    let st_cfg = ServerConfig {
        id: "standalone".into(),
        advertised_addr: crate::stream_table::advertised(listener.local_addr()?),
        ..ServerConfig::default()
    };
    let st = StreamTableServer::start(store.clone(), client.clone(), st_cfg)
        .await
        .context("starting the stream-table server")?;
    let routes = st.routes();
    servers.stream_table = Some(st);
    let api = quire_ledger_api::start_with(client, listener, gateway_cfg, Some(routes))?;
    let api_addr = api.addr;
    servers.api = Some(api);
    // One auditor and worker for the bookies of this process (with as many bookies as the
    // ensemble, it can only put back replicas a bookie lost, not move them).
    let ar = quire_autorecovery::AutoRecoveryConfig {
        id: "standalone".into(),
        ..Default::default()
    };
    servers.autorecovery = Some(quire_autorecovery::AutoRecovery::start(store.clone(), ar).await?);

    let mut summary = format!("quire standalone serving (data in {})\n", dir.display());
    summary += &format!("  metadata    {meta_addr}  ({uri})\n");
    summary += &format!("  ledger API  {api_addr}  (streams and tables too)\n");
    for b in &servers.bookies {
        summary += &format!(
            "  bookie      {}  {} (HTTP {})\n",
            b.bookie.id(),
            b.grpc_addr,
            b.http_addr
        );
    }
    let json = serde_json::json!({
        "metadata": meta_addr.to_string(),
        "ledger_api": api_addr.to_string(),
        "stream_table": api_addr.to_string(),
        "bookies": servers.bookies.iter().map(|b| b.grpc_addr.to_string()).collect::<Vec<_>>(),
        "bookie_ids": servers.bookies.iter().map(|b| b.bookie.id().to_string()).collect::<Vec<_>>(),
        "bookie_http": servers.bookies.iter().map(|b| b.http_addr.to_string()).collect::<Vec<_>>(),
    });
    Ok((json, summary))
}

pub async fn run(args: StandaloneArgs) -> anyhow::Result<()> {
    // One signal listener for the whole run. A signal during start-up lets the start finish
    // (it is bounded, and a bookie half opened on a blocking thread cannot be abandoned
    // cleanly), then stops everything.
    let signal = shutdown_signal();
    tokio::pin!(signal);
    let mut signalled = false;
    let mut servers = Servers::default();
    let started = {
        let starting = start(&args, &mut servers);
        tokio::pin!(starting);
        loop {
            tokio::select! {
                r = &mut starting => break r,
                r = &mut signal, if !signalled => {
                    if let Err(e) = r {
                        tracing::error!(error = %e, "waiting for signals failed");
                    }
                    tracing::info!("stopping once start-up is over");
                    signalled = true;
                }
            }
        }
    };
    let (addrs, summary) = match started {
        Ok(a) => a,
        Err(e) => {
            servers.stop().await;
            return Err(e);
        }
    };
    if signalled {
        servers.stop().await;
        return Ok(());
    }
    print!("{summary}");
    if let Some(p) = &args.addr_file {
        let text = format!("{}\n", serde_json::to_string_pretty(&addrs)?);
        if let Err(e) = write_file_atomic(p, &text) {
            servers.stop().await;
            return Err(e);
        }
    }
    let r = signal.await;
    servers.stop().await;
    r
}
