//! `quire ledger-api`: serves the gRPC ledger API (`quire.ledger.v1.LedgerService`) as a
//! gateway over the ledger client, until SIGTERM or SIGINT.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use quire_ledger_api::GatewayConfig;
use quire_ledger_client::{Client, ClientConfig};

use crate::bookie::{shutdown_signal, write_file_atomic};

#[derive(Args)]
pub struct LedgerApiArgs {
    /// Metadata store URI (quire://host:port,..., etcd://..., file:///path).
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: String,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "127.0.0.1:4181")]
    listen: SocketAddr,
    /// Once serving, write the bound address here (line 1).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Writers (ledgers created here and not yet closed) held open at most.
    #[arg(long, default_value_t = 1024)]
    max_writers: usize,
}

/// The gateway limits that follow from a client configuration.
pub(crate) fn gateway_config(client: &ClientConfig, max_writers: usize) -> GatewayConfig {
    GatewayConfig {
        max_writers,
        entry_size_max: client.entry_size_max,
        ..GatewayConfig::default()
    }
}

pub async fn run(args: LedgerApiArgs) -> anyhow::Result<()> {
    let cfg = ClientConfig::new(args.metadata.clone());
    let gateway_cfg = gateway_config(&cfg, args.max_writers);
    let client = Client::connect(cfg)
        .await
        .with_context(|| format!("connecting to the metadata store {}", args.metadata))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let running = quire_ledger_api::start(client, listener, gateway_cfg)?;
    if let Some(p) = &args.addr_file {
        write_file_atomic(p, &format!("{}\n", running.addr))?;
    }
    println!("ledger API serving on {}", running.addr);
    shutdown_signal().await?;
    running.stop().await;
    Ok(())
}
