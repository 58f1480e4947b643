//! `quire metadata`: run a metadata (raft) node, and the tools to create, inspect and change a
//! cluster (`init`, `status`, `add-node`, `remove-node`) or read its keys (`get`, `list`).

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use quire_metadata::client::RemoteStore;
use quire_metadata::{MetadataUri, store::list_all};
use quire_proto::metadata as pb;

use crate::bookie::{shutdown_signal, write_file_atomic};

#[derive(Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct MetadataArgs {
    #[command(subcommand)]
    command: Option<MetadataCommand>,
    /// This node's id (unique in the cluster, > 0).
    #[arg(long)]
    id: Option<u64>,
    /// Listen address for clients and peers (port 0 picks a free port; then use `add-node`).
    #[arg(long, default_value = "127.0.0.1:7000")]
    listen: SocketAddr,
    /// The initial members as ID=HOST:PORT,... (used by `init`); this node may be omitted.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// Raft log and snapshot directory.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Once serving, write the bound address here (line 1).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Snapshot the state and purge the log after this many entries.
    #[arg(long, default_value_t = 20_000)]
    snapshot_every: u64,
    /// Log entries kept behind a snapshot for lagging followers.
    #[arg(long, default_value_t = 1000)]
    keep_logs: u64,
}

#[derive(Subcommand)]
enum MetadataCommand {
    /// Create the cluster from the peers of the node reached (run once).
    Init(Target),
    /// Leader, term, members and last applied index, as each node sees them.
    Status {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        json: bool,
    },
    /// Add a node (it must be running) as a voter.
    AddNode {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: u64,
        #[arg(long)]
        addr: String,
    },
    /// Remove a node from the voters.
    RemoveNode {
        #[command(flatten)]
        target: Target,
        #[arg(long)]
        id: u64,
    },
    /// Print one key (value as text when it is UTF-8, else hex).
    Get {
        #[command(flatten)]
        target: Target,
        key: String,
    },
    /// Print the keys under a prefix with their versions.
    List {
        #[command(flatten)]
        target: Target,
        #[arg(default_value = "/")]
        prefix: String,
    },
}

#[derive(Args)]
struct Target {
    /// Metadata URI: quire://host:port,..., etcd://host:port,... or file:///path.
    #[arg(long, env = "QUIRE_METADATA")]
    metadata: String,
}

fn quire_endpoints(uri: &str) -> anyhow::Result<Vec<String>> {
    match uri.parse::<MetadataUri>()? {
        MetadataUri::Quire(hosts) => Ok(hosts),
        _ => bail!("{uri}: cluster commands need a quire:// URI"),
    }
}

fn parse_peers(peers: &[String]) -> anyhow::Result<BTreeMap<u64, String>> {
    let mut out = BTreeMap::new();
    for p in peers {
        let (id, addr) = p
            .split_once('=')
            .with_context(|| format!("peer {p:?} is not ID=HOST:PORT"))?;
        let id: u64 = id.parse().with_context(|| format!("peer {p:?}: bad id"))?;
        addr.parse::<SocketAddr>()
            .with_context(|| format!("peer {p:?}: bad address"))?;
        out.insert(id, addr.to_string());
    }
    Ok(out)
}

fn print_status(endpoint: &str, s: &pb::StatusResponse) {
    let members: Vec<String> = s
        .members
        .iter()
        .map(|m| {
            format!(
                "{}={}{}",
                m.id,
                m.addr,
                if m.voter { "" } else { " (learner)" }
            )
        })
        .collect();
    println!(
        "{endpoint}: node {} {} leader {} term {} applied {} log {} revision {} keys {} members [{}]",
        s.id,
        s.state,
        s.leader
            .map(|l| l.to_string())
            .unwrap_or_else(|| "-".into()),
        s.term,
        s.last_applied,
        s.last_log_index,
        s.revision,
        s.keys,
        members.join(", ")
    );
}

fn status_json(endpoint: &str, s: &pb::StatusResponse) -> serde_json::Value {
    serde_json::json!({
        "endpoint": endpoint,
        "id": s.id,
        "state": s.state,
        "leader": s.leader,
        "term": s.term,
        "last_applied": s.last_applied,
        "last_log_index": s.last_log_index,
        "revision": s.revision,
        "keys": s.keys,
        "members": s.members.iter().map(|m| serde_json::json!({"id": m.id, "addr": m.addr, "voter": m.voter})).collect::<Vec<_>>(),
    })
}

fn show_value(v: &[u8]) -> String {
    match std::str::from_utf8(v) {
        Ok(s) => s.to_string(),
        Err(_) => v.iter().map(|b| format!("{b:02x}")).collect(),
    }
}

async fn run_tool(cmd: MetadataCommand) -> anyhow::Result<()> {
    match cmd {
        MetadataCommand::Init(t) => {
            let hosts = quire_endpoints(&t.metadata)?;
            let mut c = quire_metadata::raft::network::client(&hosts[0])?;
            let s = c
                .init(pb::InitRequest {})
                .await
                .map_err(|s| quire_metadata::wire::from_status(&s, true))?;
            print_status(&hosts[0], s.get_ref());
        }
        MetadataCommand::Status { target, json } => {
            let hosts = quire_endpoints(&target.metadata)?;
            let mut all = Vec::new();
            let mut reached = 0;
            for h in &hosts {
                let mut c = quire_metadata::raft::network::client(h)?;
                let mut req = tonic::Request::new(pb::StatusRequest {});
                req.set_timeout(std::time::Duration::from_secs(3));
                match c.status(req).await {
                    Ok(s) => {
                        reached += 1;
                        if json {
                            all.push(status_json(h, s.get_ref()));
                        } else {
                            print_status(h, s.get_ref());
                        }
                    }
                    Err(e) if json => {
                        all.push(serde_json::json!({"endpoint": h, "error": e.message()}))
                    }
                    Err(e) => println!("{h}: unreachable ({})", e.message()),
                }
            }
            if json {
                println!("{}", serde_json::Value::Array(all));
            }
            if reached == 0 {
                bail!("no metadata node answered");
            }
        }
        MetadataCommand::AddNode { target, id, addr } => {
            let store = RemoteStore::connect(&quire_endpoints(&target.metadata)?)?;
            let req = pb::AddNodeRequest { id, addr };
            let s = store
                .raw()
                .add_node(req)
                .await
                .map_err(|s| quire_metadata::wire::from_status(&s, true))?;
            print_status(&store.endpoints()[0], s.get_ref());
        }
        MetadataCommand::RemoveNode { target, id } => {
            let store = RemoteStore::connect(&quire_endpoints(&target.metadata)?)?;
            let s = store
                .raw()
                .remove_node(pb::RemoveNodeRequest { id })
                .await
                .map_err(|s| quire_metadata::wire::from_status(&s, true))?;
            print_status(&store.endpoints()[0], s.get_ref());
        }
        MetadataCommand::Get { target, key } => {
            let store = quire_metadata::connect(&target.metadata).await?;
            match store.get(&key).await? {
                Some(kv) => println!(
                    "{} version {} mod_revision {} lease {}\n{}",
                    kv.key,
                    kv.version,
                    kv.mod_revision,
                    kv.lease,
                    show_value(&kv.value)
                ),
                None => bail!("{key}: not found"),
            }
        }
        MetadataCommand::List { target, prefix } => {
            let store = quire_metadata::connect(&target.metadata).await?;
            for kv in list_all(store.as_ref(), &prefix).await? {
                println!(
                    "{} version {} ({} bytes)",
                    kv.key,
                    kv.version,
                    kv.value.len()
                );
            }
        }
    }
    Ok(())
}

pub async fn run(args: MetadataArgs) -> anyhow::Result<()> {
    if let Some(cmd) = args.command {
        return run_tool(cmd).await;
    }
    let id = args.id.context("--id is required to run a metadata node")?;
    if id == 0 {
        bail!("--id must be > 0");
    }
    let dir = args
        .data_dir
        .context("--data-dir is required to run a metadata node")?;
    let peers = parse_peers(&args.peers)?;
    let mut cfg = quire_metadata::raft::node::NodeConfig::member(id, peers, dir);
    cfg.snapshot_every = args.snapshot_every.max(1);
    cfg.keep_logs = args.keep_logs;
    let server = quire_metadata::server::start_node(args.listen, cfg).await?;
    if let Some(p) = &args.addr_file {
        write_file_atomic(p, &format!("{}\n", server.addr))?;
    }
    println!("metadata node {id} serving on {}", server.addr);
    shutdown_signal().await?;
    server.stop().await;
    Ok(())
}
