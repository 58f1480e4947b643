//! `quire stream-table`: the stream and table server role (`quire.stream.v1.StreamService` and
//! `quire.table.v1.TableService`), until SIGTERM or SIGINT.
//!
//! The server registers itself in the metadata store under `--id` with its advertised address
//! (where clients and other servers' redirects reach it), and owns stream writers and table
//! ranges on demand under its metadata session. Several servers share the work: a request for
//! a stream or range another server owns is redirected there. A stop (SIGTERM) closes every
//! writer and range (final checkpoints) and ends the session, so other servers take over at
//! once; a crash leaves them to be taken over once the session times out
//! (`--session-timeout`).

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use quire_ledger_client::Client;
use quire_stream_table::server::{ServerConfig, StreamTableServer};

use crate::bench::parse_duration;
use crate::bookie::{shutdown_signal, write_file_atomic};

/// How long the listener gets to stop after the server has shut down.
const SERVE_STOP_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Args)]
pub struct StreamTableArgs {
    /// Metadata store URI (quire://host:port,..., etcd://..., file:///path).
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: String,
    /// gRPC listen address (port 0 picks a free port).
    #[arg(long, default_value = "0.0.0.0:4181")]
    listen: SocketAddr,
    /// This server's id in the metadata store, unique among the servers (default:
    /// stream-table-<hostname>-<port>).
    #[arg(long)]
    id: Option<String>,
    /// The address clients reach this server at (default: the bound address, with 0.0.0.0
    /// replaced by 127.0.0.1).
    #[arg(long)]
    advertise: Option<String>,
    /// Metadata session timeout: how long after a crash before other servers may take over
    /// this one's streams and ranges.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    session_timeout: Duration,
    /// Bound on each request's work on the server.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    op_timeout: Duration,
    /// Once serving, write the bound address here (line 1), then the advertised one (line 2).
    #[arg(long)]
    addr_file: Option<PathBuf>,
}

/// The address to advertise for a bound address: an unspecified IP (0.0.0.0, ::) is not
/// reachable, so loopback stands in for it.
pub(crate) fn advertised(bound: SocketAddr) -> String {
    let ip = match bound.ip() {
        std::net::IpAddr::V4(v4) if v4.is_unspecified() => {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        }
        std::net::IpAddr::V6(v6) if v6.is_unspecified() => {
            std::net::IpAddr::V6(std::net::Ipv6Addr::LOCALHOST)
        }
        ip => ip,
    };
    SocketAddr::new(ip, bound.port()).to_string()
}

/// `stream-table-<hostname>-<port>`, or `stream-table-<pid>-<port>` without a hostname: stable
/// across restarts on a fixed port, unique among the servers of one machine.
fn default_id(port: u16) -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .map(|h| h.trim().to_string())
        .unwrap_or_default();
    let host: String = host
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
        .collect();
    if host.is_empty() {
        format!("stream-table-{}-{port}", std::process::id())
    } else {
        format!("stream-table-{host}-{port}")
    }
}

pub async fn run(args: StreamTableArgs) -> anyhow::Result<()> {
    let store = quire_metadata::connect(&args.metadata)
        .await
        .with_context(|| format!("connecting to the metadata store {}", args.metadata))?;
    let client = Client::with_store(
        store.clone(),
        quire_stream_table::server::ledger_client_config(args.metadata.clone()),
    )
    .await
    .context("starting the ledger client")?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| format!("binding {}", args.listen))?;
    let addr = listener.local_addr()?;
    let id = args.id.clone().unwrap_or_else(|| default_id(addr.port()));
    let advertised_addr = args.advertise.clone().unwrap_or_else(|| advertised(addr));
    let cfg = ServerConfig {
        id: id.clone(),
        advertised_addr: advertised_addr.clone(),
        session_ttl: args.session_timeout,
        op_timeout: args.op_timeout,
        ..ServerConfig::default()
    };
    let server = StreamTableServer::start(store, client, cfg)
        .await
        .with_context(|| format!("starting stream-table server {id}"))?;

    let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
    let mut serving = tokio::spawn(quire_stream_table::server::serve(
        server.clone(),
        listener,
        async move {
            let _ = stop_rx.wait_for(|s| *s).await;
        },
    ));
    if let Some(p) = &args.addr_file
        && let Err(e) = write_file_atomic(p, &format!("{addr}\n{advertised_addr}\n"))
    {
        server.shutdown().await;
        return Err(e);
    }
    println!("stream-table server {id} serving on {addr} (advertised as {advertised_addr})");

    let r = tokio::select! {
        r = shutdown_signal() => r,
        r = &mut serving => {
            // Serving ended on its own: the listener failed.
            server.shutdown().await;
            return match r {
                Ok(Ok(())) => Err(anyhow::anyhow!("the gRPC server stopped unexpectedly")),
                Ok(Err(e)) => Err(anyhow::Error::new(e).context("serving")),
                Err(e) => Err(anyhow::anyhow!("the gRPC server task failed: {e}")),
            };
        }
    };
    // Close the writers and ranges first (final checkpoints, leases released), so that clients
    // redirected elsewhere find them free; then stop accepting calls.
    server.shutdown().await;
    let _ = stop_tx.send(true);
    match tokio::time::timeout(SERVE_STOP_TIMEOUT, serving).await {
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "the gRPC server failed while stopping"),
        Ok(_) => {}
        Err(_) => tracing::warn!("the gRPC server did not stop within {SERVE_STOP_TIMEOUT:?}"),
    }
    tracing::info!("stream-table server stopped");
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unspecified_addresses_advertise_loopback() {
        assert_eq!(
            advertised("0.0.0.0:4181".parse().unwrap()),
            "127.0.0.1:4181"
        );
        assert_eq!(advertised("[::]:4181".parse().unwrap()), "[::1]:4181");
        assert_eq!(advertised("10.0.0.7:99".parse().unwrap()), "10.0.0.7:99");
        assert!(default_id(4181).starts_with("stream-table-"));
        assert!(default_id(4181).ends_with("-4181"));
    }
}
