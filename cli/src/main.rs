//! `quire`: one binary for every role (`quire bookie`, `quire metadata`, later `quire standalone`,
//! ...) and for the client tools (`quire bench ...`). Each subcommand only parses flags and wires a
//! library crate; the work lives in the libraries.

mod autorecovery;
mod bench;
mod bench_ledger;
mod bench_metadata;
mod bench_table;
mod bookie;
mod ledger;
mod ledger_api;
mod metadata;
mod st_client;
mod standalone;
mod stream;
mod stream_table;
mod table;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "quire", version, about = "Quire: distributed log storage")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a bookie: the storage server for ledger entries.
    Bookie(Box<bookie::BookieArgs>),
    /// Run a metadata node (raft), or manage and inspect a metadata cluster.
    Metadata(metadata::MetadataArgs),
    /// Run everything in one process on one directory: metadata store, three bookies, the
    /// gRPC ledger API and the stream and table services.
    Standalone(standalone::StandaloneArgs),
    /// Serve the gRPC ledger API (a gateway over the ledger client).
    LedgerApi(ledger_api::LedgerApiArgs),
    /// Serve streams and tables (gRPC StreamService and TableService) over a metadata store.
    StreamTable(stream_table::StreamTableArgs),
    /// Run the autorecovery daemon (auditor and replication worker), or show its status.
    Autorecovery(autorecovery::AutoRecoveryArgs),
    /// Ledger tools: create, write stdin, read, tail, close, delete, list, info.
    #[command(subcommand)]
    Ledger(ledger::LedgerCommand),
    /// Stream tools: create, append, read, tail, truncate, delete, info, list.
    #[command(subcommand)]
    Stream(stream::StreamCommand),
    /// Table tools: create, drop, info, list; put, get, del, scan, incr, cas.
    #[command(subcommand)]
    Table(table::TableCommand),
    /// Load generators that measure throughput and latency.
    #[command(subcommand)]
    Bench(bench::BenchCommand),
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("QUIRE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Load generators run on one thread: their tasks then wake each other without crossing
    // threads, which keeps client overhead out of the latencies they measure and leaves the other
    // core to the server under test.
    let rt = match cli.command {
        Command::Bench(_) => tokio::runtime::Builder::new_current_thread(),
        _ => tokio::runtime::Builder::new_multi_thread(),
    }
    .enable_all()
    .build()?;
    let r = rt.block_on(async {
        match cli.command {
            Command::Bookie(args) => bookie::run(*args).await,
            Command::Metadata(args) => metadata::run(args).await,
            Command::Standalone(args) => standalone::run(args).await,
            Command::LedgerApi(args) => ledger_api::run(args).await,
            Command::StreamTable(args) => stream_table::run(args).await,
            Command::Stream(cmd) => stream::run(cmd).await,
            Command::Table(cmd) => table::run(cmd).await,
            Command::Autorecovery(args) => autorecovery::run(args).await,
            Command::Ledger(cmd) => ledger::run(cmd).await,
            Command::Bench(cmd) => bench::run(cmd).await,
        }
    });
    // Stream and table errors print as `error: CODE: message`, with their own exit status.
    if let Err(e) = &r
        && let Some(status) = st_client::report(e)
    {
        drop(rt);
        std::process::exit(status);
    }
    r
}
