//! The gRPC ledger API (`quire.ledger.v1.LedgerService`, `proto/quire/ledger/v1/ledger.proto`):
//! Quire ledgers for applications in any language, served by `quire standalone` and by the
//! `quire ledger-api` role.
//!
//! The gateway is a thin layer over [`quire_ledger_client::Client`]. It is stateless except for
//! the writers it holds open: `Create` makes a ledger and keeps its writer here, so that `Append`
//! streams (on this gateway) can write to it, until `Close`, `Delete`, a fatal append error
//! (fenced, closed, writer stopped) or the gateway stopping drops it. A gateway that stops (or
//! dies) leaves its ledgers OPEN: open them with recovery to close them, as with any writer that
//! went away. Reads open a reader per call.
//!
//! Decisions:
//! - Open writers are bounded ([`GatewayConfig::max_writers`], RESOURCE_EXHAUSTED /
//!   `TOO_MANY_WRITERS` beyond), and so are streams (`Append`, `Read`, `Tail`) in progress
//!   ([`GatewayConfig::max_streams`], `TOO_MANY_REQUESTS`).
//! - An `Append` stream keeps at most [`GatewayConfig::append_in_flight_max`] entries waiting
//!   for acknowledgement and then stops reading requests (backpressure reaches the caller through
//!   HTTP/2 flow control); responses queue in a small bounded channel too.
//! - A request is checked whole before any of its payloads is appended: a request with no
//!   payload, or with a payload above [`GatewayConfig::entry_size_max`], fails the stream
//!   (`INVALID_ARGUMENT` / `TOO_LARGE`) with nothing of it written. Zero-byte payloads are
//!   valid entries.
//! - `Delete` takes no password (as in BookKeeper); every other call that touches a ledger's
//!   entries needs it. `Info` and `List` show metadata only.
//! - Every wait has a bound: unary calls [`GatewayConfig::op_timeout`], acknowledgement of an
//!   appended entry [`GatewayConfig::append_timeout`], LAC long polls at most 60 s. `Tail`
//!   runs until the ledger is closed and fully read, or the caller cancels.
//! - Read responses carry at most [`GatewayConfig::read_batch_entries`] entries and about
//!   [`GatewayConfig::read_batch_bytes`] bytes (kept under the 4 MiB message limit that many
//!   gRPC clients apply by default; one larger entry still travels alone).

pub mod error;
mod service;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use quire_ledger_client::Client;
use tokio::net::TcpListener;

pub use error::{ApiError, CODE_KEY, code_of, to_status};
pub use service::LedgerGateway;

/// Limits of a gateway.
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Writers held open at once. Default: 1024.
    pub max_writers: usize,
    /// `Append`, `Read` and `Tail` streams in progress at once. Default: 1024.
    pub max_streams: usize,
    /// Entries of one `Append` stream waiting for acknowledgement. Default: 1024.
    pub append_in_flight_max: usize,
    /// Largest payload. Default: 5 MiB - 1 KiB (the client's default).
    pub entry_size_max: usize,
    /// Largest request or response message. Default: 16 MiB.
    pub message_size_max: usize,
    /// Payloads in one `Append` request. Default: 10000.
    pub payloads_per_request_max: usize,
    /// Entries per read response. Default: 256.
    pub read_batch_entries: usize,
    /// Bytes per read response (a single larger entry is sent alone). Default: 1 MiB.
    pub read_batch_bytes: usize,
    /// Bound on each unary call (open with recovery included). Default: 60 s.
    pub op_timeout: Duration,
    /// Bound on the acknowledgement of one appended entry. Default: 60 s.
    pub append_timeout: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            max_writers: 1024,
            max_streams: 1024,
            append_in_flight_max: 1024,
            entry_size_max: (5 << 20) - 1024,
            message_size_max: 16 << 20,
            payloads_per_request_max: 10_000,
            read_batch_entries: 256,
            read_batch_bytes: 1 << 20,
            op_timeout: Duration::from_secs(60),
            append_timeout: Duration::from_secs(60),
        }
    }
}

/// A gateway serving in the background.
pub struct Running {
    /// The bound address.
    pub addr: SocketAddr,
    gateway: LedgerGateway,
    shutdown: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<Result<(), ApiError>>,
}

impl Running {
    /// Stops serving: streams in progress end with `SHUTTING_DOWN`, in-flight unary calls get a
    /// bounded grace period, and the writers held open are dropped (their ledgers stay OPEN).
    pub async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.gateway.shut_down();
        match tokio::time::timeout(Duration::from_secs(10), self.task).await {
            Ok(Ok(Err(e))) => tracing::error!(error = %e, "ledger API server failed"),
            Ok(_) => {}
            Err(_) => tracing::warn!("ledger API server did not stop within 10 s"),
        }
        self.gateway.shut_down();
    }
}

/// Starts serving the ledger API on `listener` in the background.
pub fn start(
    client: Client,
    listener: TcpListener,
    cfg: GatewayConfig,
) -> Result<Running, ApiError> {
    start_with(client, listener, cfg, None)
}

/// [`start`], also serving the services of `extra` on the same port (`quire standalone` puts
/// the stream and table services there). Their owner stops them: [`Running::stop`] only stops
/// accepting calls for them.
pub fn start_with(
    client: Client,
    listener: TcpListener,
    cfg: GatewayConfig,
    extra: Option<tonic::service::Routes>,
) -> Result<Running, ApiError> {
    let addr = listener.local_addr()?;
    let (shutdown, mut rx) = tokio::sync::watch::channel(false);
    let gateway = LedgerGateway::new(client, cfg);
    let g = gateway.clone();
    let task = tokio::spawn(async move {
        serve_with(g, listener, extra, async move {
            let _ = rx.wait_for(|s| *s).await;
        })
        .await
    });
    tracing::info!(%addr, "ledger API serving");
    Ok(Running {
        addr,
        gateway,
        shutdown,
        task,
    })
}

/// Serves the ledger API on `listener` until `shutdown` completes; then drops the writers held
/// open.
pub async fn serve(
    client: Client,
    listener: TcpListener,
    cfg: GatewayConfig,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let gateway = LedgerGateway::new(client, cfg);
    let r = serve_with(gateway.clone(), listener, None, shutdown).await;
    gateway.shut_down();
    r
}

async fn serve_with(
    gateway: LedgerGateway,
    listener: TcpListener,
    extra: Option<tonic::service::Routes>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), ApiError> {
    let incoming = tonic::transport::server::TcpIncoming::from(listener)
        .with_nodelay(Some(true))
        .with_keepalive(Some(Duration::from_secs(60)));
    let g = gateway.clone();
    let shutdown = async move {
        shutdown.await;
        // Streams that would otherwise run on (tails, idle appends) end now.
        g.shut_down();
    };
    tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(1024))
        .add_routes(extra.unwrap_or_default().add_service(gateway.into_server()))
        .serve_with_incoming_shutdown(incoming, shutdown)
        .await?;
    Ok(())
}
