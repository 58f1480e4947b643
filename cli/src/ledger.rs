//! `quire ledger ...`: ledger tools on the client library (`quire-ledger-client`): create, write
//! stdin as entries, read, tail, close (by recovery), delete, list and show metadata.
//!
//! Every command finds the bookies through the metadata store named by `--metadata` (or
//! `QUIRE_METADATA`), as the client library does.

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, Write};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt;
use quire_ledger_client::{
    Client, ClientConfig, CreateOptions, DigestType, Entry, LedgerMetadata, LedgerState,
};

/// Entries asked for in one read call (the client refuses more than 10000).
const READ_BATCH: u64 = 1000;
/// Ledger ids asked for in one list call.
const LIST_PAGE: u32 = 1000;
/// Lines read from stdin ahead of the writer.
const STDIN_QUEUE: usize = 1024;

#[derive(Subcommand)]
pub enum LedgerCommand {
    /// Create an empty ledger and print its id.
    ///
    /// The writer of the new ledger ends with this command, so the ledger stays OPEN (no entry
    /// can be added to it later). `quire ledger close ID` closes it by recovery, as BookKeeper's
    /// shell does for a ledger whose writer is gone.
    Create {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        layout: Layout,
    },
    /// Create a ledger, append each line of stdin as one entry, close the ledger and print its id
    /// (only the id, on stdout).
    ///
    /// Lines lose their line ending (`\n` or `\r\n`); an empty input makes an empty ledger.
    Write {
        #[command(flatten)]
        target: Target,
        #[command(flatten)]
        layout: Layout,
        /// Entries sent and not yet acknowledged at most.
        #[arg(long, default_value_t = 1024)]
        in_flight: usize,
    },
    /// Print the payloads of a range of confirmed entries, one per line.
    Read {
        #[command(flatten)]
        target: Target,
        /// Ledger id.
        id: u64,
        /// First entry id.
        #[arg(long, default_value_t = 0)]
        from: u64,
        /// Last entry id (default: the last confirmed entry).
        #[arg(long)]
        to: Option<u64>,
        #[command(flatten)]
        password: Password,
        #[command(flatten)]
        output: Output,
    },
    /// Print entries as they are confirmed, until the ledger is closed (or Ctrl-C).
    Tail {
        #[command(flatten)]
        target: Target,
        /// Ledger id.
        id: u64,
        /// First entry id.
        #[arg(long, default_value_t = 0)]
        from: u64,
        #[command(flatten)]
        password: Password,
        #[command(flatten)]
        output: Output,
    },
    /// Close a ledger whose writer is gone, by recovery.
    ///
    /// Recovery fences the ledger on its bookies (a writer that is still alive fails with
    /// "fenced" from then on), re-replicates the entries any writer may have seen acknowledged
    /// and closes the ledger after the last of them: what BookKeeper's shell does to close a
    /// ledger whose writer is gone. Closing a closed ledger changes nothing.
    Close {
        #[command(flatten)]
        target: Target,
        /// Ledger id.
        id: u64,
        #[command(flatten)]
        password: Password,
    },
    /// Delete a ledger: its metadata, then its data on the bookies.
    Delete {
        #[command(flatten)]
        target: Target,
        /// Ledger id.
        id: u64,
    },
    /// Print the ids of the ledgers, one per line, in order.
    List {
        #[command(flatten)]
        target: Target,
        /// Print at most this many ids (default: all).
        #[arg(long)]
        limit: Option<u64>,
    },
    /// Show a ledger's metadata: state, quorums, last entry, length, ensembles.
    ///
    /// For a ledger that is not closed, the last add confirmed (LAC) is also read from its
    /// bookies.
    Info {
        #[command(flatten)]
        target: Target,
        /// Ledger id.
        id: u64,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        password: Password,
    },
    /// Check every replica of every entry (up to the last entry, or the LAC of an open ledger):
    /// report bookies that miss an entry, hold a corrupt copy or cannot be reached. Exits
    /// non-zero when any is found.
    Check {
        #[command(flatten)]
        target: Target,
        /// Ledger id.
        id: u64,
        /// Print one JSON object (key `healthy`, `issues_total`, `issues`).
        #[arg(long)]
        json: bool,
    },
}

#[derive(Args)]
pub struct Target {
    /// Metadata URI: quire://host:port,..., etcd://host:port,... or file:///path.
    #[arg(long, env = "QUIRE_METADATA")]
    pub(crate) metadata: String,
}

#[derive(Args)]
pub struct Password {
    /// The ledger's password (set when it is created, needed again to read it).
    #[arg(
        long,
        env = "QUIRE_LEDGER_PASSWORD",
        hide_env_values = true,
        default_value = ""
    )]
    password: String,
}

/// A new ledger's quorums (also `quire bench ledger`'s).
#[derive(Args)]
pub struct Quorums {
    /// Bookies the ledger's entries are striped over (E).
    #[arg(long, default_value_t = 3)]
    pub(crate) ensemble: u32,
    /// Bookies each entry is written to (Qw).
    #[arg(long, default_value_t = 3)]
    pub(crate) write_quorum: u32,
    /// Acknowledgements that make an entry durable (Qa).
    #[arg(long, default_value_t = 2)]
    pub(crate) ack_quorum: u32,
}

impl Quorums {
    /// Fails unless E >= Qw >= Qa >= 1.
    pub(crate) fn check(&self) -> anyhow::Result<()> {
        let (e, qw, qa) = (self.ensemble, self.write_quorum, self.ack_quorum);
        anyhow::ensure!(
            e >= qw && qw >= qa && qa >= 1,
            "need --ensemble >= --write-quorum >= --ack-quorum >= 1, got {e}, {qw}, {qa}"
        );
        Ok(())
    }
}

#[derive(Args)]
pub struct Layout {
    #[command(flatten)]
    quorums: Quorums,
    #[command(flatten)]
    password: Password,
    /// Custom metadata KEY=VALUE (repeatable).
    #[arg(long = "custom", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    custom: Vec<(String, String)>,
}

impl Layout {
    fn options(&self) -> anyhow::Result<CreateOptions> {
        self.quorums.check()?;
        Ok(CreateOptions {
            ensemble: self.quorums.ensemble,
            write_quorum: self.quorums.write_quorum,
            ack_quorum: self.quorums.ack_quorum,
            digest: DigestType::Crc32c,
            password: self.password.password.as_bytes().to_vec(),
            custom: self.custom.iter().cloned().collect(),
        })
    }
}

#[derive(Args)]
pub struct Output {
    /// Print payloads as hex instead of (lossy) UTF-8 text.
    #[arg(long)]
    hex: bool,
    /// Prefix each payload with its entry id and a tab.
    #[arg(long)]
    ids: bool,
}

impl Output {
    fn write(&self, out: &mut impl Write, e: &Entry) -> std::io::Result<()> {
        if self.ids {
            write!(out, "{}\t", e.entry_id)?;
        }
        if self.hex {
            for b in e.payload.iter() {
                write!(out, "{b:02x}")?;
            }
        } else {
            out.write_all(String::from_utf8_lossy(&e.payload).as_bytes())?;
        }
        out.write_all(b"\n")
    }
}

fn parse_key_value(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

async fn connect(target: &Target) -> anyhow::Result<Client> {
    Client::connect(ClientConfig::new(target.metadata.clone()))
        .await
        .with_context(|| format!("connecting to the metadata store {}", target.metadata))
}

pub async fn run(cmd: LedgerCommand) -> anyhow::Result<()> {
    let r = match cmd {
        LedgerCommand::Create { target, layout } => create(&target, &layout).await,
        LedgerCommand::Write {
            target,
            layout,
            in_flight,
        } => write(&target, &layout, in_flight).await,
        LedgerCommand::Read {
            target,
            id,
            from,
            to,
            password,
            output,
        } => read(&target, id, from, to, &password.password, &output).await,
        LedgerCommand::Tail {
            target,
            id,
            from,
            password,
            output,
        } => tail(&target, id, from, &password.password, &output).await,
        LedgerCommand::Close {
            target,
            id,
            password,
        } => close(&target, id, &password.password).await,
        LedgerCommand::Delete { target, id } => {
            connect(&target).await?.delete(id).await?;
            println!("ledger {id} deleted");
            Ok(())
        }
        LedgerCommand::List { target, limit } => list(&target, limit).await,
        LedgerCommand::Info {
            target,
            id,
            json,
            password,
        } => info(&target, id, json, &password.password).await,
        LedgerCommand::Check { target, id, json } => check(&target, id, json).await,
    };
    // A closed pipe (`quire ledger read ... | head`) is the reader's choice, not a failure.
    match r {
        Err(e)
            if e.downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe) =>
        {
            Ok(())
        }
        r => r,
    }
}

async fn create(target: &Target, layout: &Layout) -> anyhow::Result<()> {
    let opts = layout.options()?;
    let client = connect(target).await?;
    let w = client.create(opts).await?;
    println!("{}", w.id());
    Ok(())
}

async fn write(target: &Target, layout: &Layout, in_flight: usize) -> anyhow::Result<()> {
    anyhow::ensure!(in_flight > 0, "--in-flight must be positive");
    let opts = layout.options()?;
    let client = connect(target).await?;
    let (tx, mut lines) = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(STDIN_QUEUE);
    stdin_lines(tx);
    let w = client.create(opts).await?;
    let id = w.id();
    let appended: anyhow::Result<()> = async {
        let mut pending = VecDeque::new();
        let mut n = 0u64;
        while let Some(line) = lines.recv().await {
            let line = line.context("reading stdin")?;
            if pending.len() >= in_flight
                && let Some(f) = pending.pop_front()
            {
                f.await?;
            }
            pending.push_back(w.append_async(line).await?);
            n += 1;
        }
        for f in pending {
            f.await?;
        }
        tracing::debug!(ledger_id = id, entries = n, "appended");
        Ok(())
    }
    .await;
    appended.with_context(|| {
        format!("writing ledger {id} (left open: `quire ledger close {id}` closes it)")
    })?;
    w.close()
        .await
        .with_context(|| format!("closing ledger {id}"))?;
    println!("{id}");
    Ok(())
}

async fn read(
    target: &Target,
    id: u64,
    from: u64,
    to: Option<u64>,
    password: &str,
    output: &Output,
) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let r = client.open(id, password.as_bytes()).await?;
    let mut lac = r.lac();
    if let Some(to) = to
        && to as i64 > lac
    {
        if !r.is_closed() {
            lac = r.read_lac().await?;
        }
        if r.is_closed() && to as i64 > lac {
            bail!("ledger {id} is closed at entry {lac}: there is no entry {to}");
        }
        if to as i64 > lac {
            bail!("entry {to} of ledger {id} is past its last confirmed entry {lac}");
        }
    }
    let last = to.map_or(lac, |t| t as i64);
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut next = from;
    while next as i64 <= last {
        let end = (last as u64).min(next + READ_BATCH - 1);
        let entries = r.read(next, end).await?;
        for e in &entries {
            output.write(&mut out, e)?;
        }
        next = end + 1;
    }
    out.flush()?;
    Ok(())
}

async fn tail(
    target: &Target,
    id: u64,
    from: u64,
    password: &str,
    output: &Output,
) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let r = client.open(id, password.as_bytes()).await?;
    let entries = r.tail(from);
    let mut entries = std::pin::pin!(entries);
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let stdout = std::io::stdout();
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            e = entries.next() => match e {
                None => return Ok(()),
                Some(e) => {
                    let e = e?;
                    let mut out = stdout.lock();
                    output.write(&mut out, &e)?;
                    out.flush()?;
                }
            },
        }
    }
}

async fn close(target: &Target, id: u64, password: &str) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let before = client.metadata(id).await?;
    if before.value.state == LedgerState::Closed {
        println!(
            "ledger {id} was already closed: last entry {}, {} bytes",
            before.value.last_entry_id, before.value.length
        );
        return Ok(());
    }
    let r = client
        .recover(id, password.as_bytes())
        .await
        .with_context(|| format!("recovering ledger {id}"))?;
    let m = r.metadata();
    println!(
        "ledger {id} closed: last entry {}, {} bytes",
        m.last_entry_id, m.length
    );
    Ok(())
}

async fn list(target: &Target, limit: Option<u64>) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    let mut after = None;
    let mut printed = 0u64;
    loop {
        let page = match limit {
            Some(l) => (l - printed).min(LIST_PAGE as u64) as u32,
            None => LIST_PAGE,
        };
        if page == 0 {
            break;
        }
        let (ids, more) = client.list(after, page).await?;
        for id in &ids {
            writeln!(out, "{id}")?;
        }
        printed += ids.len() as u64;
        after = ids.last().copied();
        if !more || after.is_none() {
            break;
        }
    }
    out.flush()?;
    Ok(())
}

async fn check(target: &Target, id: u64, json: bool) -> anyhow::Result<()> {
    use quire_ledger_client::check::ReplicaProblem;
    let client = connect(target).await?;
    let report = client.check(id).await?;
    let describe = |p: &ReplicaProblem| match p {
        ReplicaProblem::Missing => ("missing", String::new()),
        ReplicaProblem::Corrupt(m) => ("corrupt", m.clone()),
        ReplicaProblem::Unreachable(m) => ("unreachable", m.clone()),
    };
    if json {
        let issues: Vec<serde_json::Value> = report
            .issues
            .iter()
            .map(|i| {
                let (kind, detail) = describe(&i.problem);
                serde_json::json!({"entry": i.entry_id, "bookie": i.bookie, "problem": kind, "detail": detail})
            })
            .collect();
        println!(
            "{}",
            serde_json::json!({
                "ledger": id,
                "healthy": report.is_healthy(),
                "last_entry": report.last_entry_id,
                "replicas_checked": report.replicas_checked,
                "issues_total": report.issues_total,
                "issues": issues,
            })
        );
    } else {
        for i in &report.issues {
            let (kind, detail) = describe(&i.problem);
            println!("entry {} on {}: {kind} {detail}", i.entry_id, i.bookie);
        }
        println!(
            "ledger {id}: {} replicas of entries 0..={} checked, {} problems",
            report.replicas_checked, report.last_entry_id, report.issues_total
        );
    }
    anyhow::ensure!(
        report.is_healthy(),
        "ledger {id} has {} replica problems",
        report.issues_total
    );
    Ok(())
}

fn state_name(s: LedgerState) -> &'static str {
    match s {
        LedgerState::Open => "OPEN",
        LedgerState::InRecovery => "IN_RECOVERY",
        LedgerState::Closed => "CLOSED",
    }
}

fn digest_name(d: DigestType) -> &'static str {
    match d {
        DigestType::Crc32c => "CRC32C",
        DigestType::Dummy => "DUMMY",
    }
}

async fn info(target: &Target, id: u64, json: bool, password: &str) -> anyhow::Result<()> {
    let client = connect(target).await?;
    let v = client.metadata(id).await?;
    let m: &LedgerMetadata = &v.value;
    // An open ledger's last entry is only known to its bookies (best effort: a wrong password
    // or unreachable bookies leave it unknown).
    let lac: Option<Result<i64, String>> = (m.state != LedgerState::Closed).then_some(match client
        .open(id, password.as_bytes())
        .await
    {
        Ok(r) => Ok(r.lac()),
        Err(e) => Err(e.to_string()),
    });
    if json {
        let ensembles: Vec<serde_json::Value> = m
            .ensembles
            .iter()
            .map(|(first, bookies)| serde_json::json!({"first_entry": first, "bookies": bookies}))
            .collect();
        let mut o = serde_json::json!({
            "ledger_id": id,
            "state": state_name(m.state),
            "ensemble_size": m.ensemble_size,
            "write_quorum": m.write_quorum,
            "ack_quorum": m.ack_quorum,
            "digest": digest_name(m.digest),
            "last_entry_id": m.last_entry_id,
            "length": m.length,
            "ctime_ms": m.ctime_ms,
            "ctime": format_time_ms(m.ctime_ms),
            "custom": m.custom,
            "ensembles": ensembles,
            "version": v.version,
        });
        match &lac {
            None => {}
            Some(Ok(l)) => o["lac"] = serde_json::json!(l),
            Some(Err(e)) => {
                o["lac"] = serde_json::Value::Null;
                o["lac_error"] = serde_json::json!(e);
            }
        }
        println!("{o}");
        return Ok(());
    }
    println!("ledger {id}");
    println!("  state        {}", state_name(m.state));
    println!(
        "  quorums      E={} Qw={} Qa={}",
        m.ensemble_size, m.write_quorum, m.ack_quorum
    );
    println!("  digest       {}", digest_name(m.digest));
    match &lac {
        None => {
            println!("  last entry   {}", m.last_entry_id);
            println!("  length       {} bytes", m.length);
        }
        Some(Ok(l)) => println!("  LAC          {l} (as its bookies report it; still open)"),
        Some(Err(e)) => println!("  LAC          unknown ({e})"),
    }
    println!(
        "  created      {} ({} ms)",
        format_time_ms(m.ctime_ms),
        m.ctime_ms
    );
    println!("  version      {}", v.version);
    if !m.custom.is_empty() {
        let kv: Vec<String> = m.custom.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("  custom       {}", kv.join(", "));
    }
    println!("  ensembles    (first entry: bookies)");
    let ensembles: &BTreeMap<u64, Vec<String>> = &m.ensembles;
    for (first, bookies) in ensembles {
        println!("    {first}: {}", bookies.join(", "));
    }
    Ok(())
}

/// Milliseconds since the Unix epoch as an RFC 3339 UTC time.
pub(crate) fn format_time_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = ((secs / 86_400) as i64, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Reads stdin line by line (without the `\n` or `\r\n`) into `tx`, on a blocking thread so
/// that a slow producer never stalls the runtime; stops at the end, at a read error (sent on),
/// or when the receiver is gone.
pub(crate) fn stdin_lines(tx: tokio::sync::mpsc::Sender<std::io::Result<Bytes>>) {
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut line = Vec::new();
            let r = match stdin.read_until(b'\n', &mut line) {
                Ok(0) => return,
                Ok(_) => {
                    if line.last() == Some(&b'\n') {
                        line.pop();
                        if line.last() == Some(&b'\r') {
                            line.pop();
                        }
                    }
                    Ok(Bytes::from(line))
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => Err(e),
            };
            let failed = r.is_err();
            if tx.blocking_send(r).is_err() || failed {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_format_as_rfc3339() {
        assert_eq!(format_time_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_time_ms(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(
            format_time_ms(1_700_000_000_000),
            "2023-11-14T22:13:20.000Z"
        );
    }

    #[test]
    fn key_values_parse() {
        assert_eq!(parse_key_value("a=b=c"), Ok(("a".into(), "b=c".into())));
        assert!(parse_key_value("=x").is_err());
        assert!(parse_key_value("x").is_err());
    }
}
