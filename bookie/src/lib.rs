//! The Quire bookie: stores ledger entries durably and serves them.
//!
//! - [`journal`]: the write-ahead log (group commit, io_uring or plain I/O).
//! - [`storage`]: write cache, entry logs, index, read cache, checkpoints, garbage collection.
//! - [`ledger`]: per-ledger state (master key, fenced, LAC).
//! - [`bookie`]: the operations, tying the above together.
//! - [`cookie`]: the identity check of the bookie's directories.
//! - [`server`] and [`http`]: the gRPC service and the HTTP admin/metrics endpoints.

pub mod bookie;
pub mod config;
pub mod cookie;
pub mod durable;
pub mod error;
pub mod http;
pub mod journal;
pub mod ledger;
pub mod metrics;
pub mod registration;
pub mod server;
pub mod storage;
#[cfg(feature = "testkit")]
pub mod testkit;

pub use bookie::Bookie;
pub use config::BookieConfig;
pub use error::BookieError;

use std::net::SocketAddr;

/// A running bookie: its gRPC and HTTP servers and the addresses they are bound to.
pub struct Running {
    pub bookie: std::sync::Arc<Bookie>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    shutdown: tokio::sync::watch::Sender<bool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

/// Opens the bookie and starts serving gRPC and HTTP on the configured addresses (port 0 picks a
/// free port; see [`Running`] for the bound ones).
pub async fn start(cfg: BookieConfig) -> Result<Running, BookieError> {
    let grpc = tokio::net::TcpListener::bind(cfg.listen).await?;
    let http = tokio::net::TcpListener::bind(cfg.http).await?;
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.local_addr()?;
    let mut cfg = cfg;
    // The default identity of a new bookie is its address: the bound one when the port is 0.
    cfg.listen = grpc_addr;
    let bookie = tokio::task::spawn_blocking(move || Bookie::open(cfg))
        .await
        .map_err(|e| BookieError::Io(std::io::Error::other(e.to_string())))??;
    let metadata = match bookie.config().metadata.clone() {
        Some(uri) => {
            let store = quire_metadata::connect(&uri)
                .await
                .map_err(|e| BookieError::Startup(format!("metadata store {uri}: {e}")))?;
            if let Err(e) = registration::check_cookie(&bookie, &store).await {
                let b = bookie.clone();
                let _ = tokio::task::spawn_blocking(move || b.shutdown()).await;
                return Err(e);
            }
            Some(store)
        }
        None => None,
    };
    let (shutdown, rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    if let Some(store) = metadata {
        let info = quire_metadata::bookies::BookieInfo {
            addr: grpc_addr.to_string(),
            http: http_addr.to_string(),
            zone: bookie.config().zone.clone(),
        };
        tasks.push(tokio::spawn(registration::run(
            bookie.clone(),
            store,
            info,
            rx.clone(),
        )));
    }
    let svc = server::BookieService::new(bookie.clone())
        .with_shutdown(rx.clone())
        .into_server();
    let mut stop = rx.clone();
    tasks.push(tokio::spawn(async move {
        // Small add results must not wait for Nagle's algorithm.
        let incoming = tonic::transport::server::TcpIncoming::from(grpc)
            .with_nodelay(Some(true))
            .with_keepalive(Some(std::time::Duration::from_secs(60)));
        // HTTP/2 pings find peers that vanished without closing, so their streams end.
        let r = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(std::time::Duration::from_secs(30)))
            .http2_keepalive_timeout(Some(std::time::Duration::from_secs(10)))
            .max_concurrent_streams(Some(1024))
            .add_service(svc)
            .serve_with_incoming_shutdown(incoming, async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "gRPC server failed");
        }
    }));
    let mut stop = rx;
    let app = http::router(bookie.clone());
    tasks.push(tokio::spawn(async move {
        let r = axum::serve(http, app)
            .with_graceful_shutdown(async move {
                let _ = stop.wait_for(|s| *s).await;
            })
            .await;
        if let Err(e) = r {
            tracing::error!(error = %e, "HTTP server failed");
        }
    }));
    tracing::info!(%grpc_addr, %http_addr, bookie_id = %bookie.id(), "bookie serving");
    Ok(Running {
        bookie,
        grpc_addr,
        http_addr,
        shutdown,
        tasks,
    })
}

impl Running {
    /// Stops the servers (in-flight calls get a bounded grace period), then shuts the bookie
    /// down cleanly: journal drained, final checkpoint.
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        for t in self.tasks {
            let _ = tokio::time::timeout(std::time::Duration::from_secs(5), t).await;
        }
        let b = self.bookie;
        let _ = tokio::task::spawn_blocking(move || b.shutdown()).await;
    }
}
