//! `quire table ...`: tables through the stream-table servers (the Rust client of
//! `quire_stream_table::client`): create, drop, info, list, and put, get, del, scan, incr, cas
//! on keys.
//!
//! Keys and byte values are given and printed as UTF-8 text (lossy on output; `--hex` prints
//! hex). A value is bytes unless `--number` makes it a 64-bit number, which is what `incr`
//! works on. `--json` prints objects with `key`, `value` (a string, or a number for numbers;
//! `key_base64` / `value_base64` when not UTF-8), `type`, `version`, `create_revision` and
//! `mod_revision`.
//!
//! Exit status: 0 done, 1 an error (`error: CODE: message`), 2 a condition that did not hold
//! (`get` of an absent key, a `cas` or conditional `del` that lost).

use std::io::Write;
use std::time::Duration;

use bytes::Bytes;
use clap::{Args, Subcommand};
use quire_stream_table::Name;
use quire_stream_table::stream::StreamConfig;
use quire_stream_table::table::{Expect, KeyValue, TableConfig, TableMeta, Value};

use crate::bench::parse_duration;
use crate::ledger::{Quorums, format_time_ms};
use crate::st_client::{NotMet, ServerTarget, bytes_json, bytes_text, is_broken_pipe, parse_bytes};

/// Keys asked for in one scan call.
const SCAN_PAGE: u32 = 1000;

#[derive(Subcommand)]
pub enum TableCommand {
    /// Create a table (and its ranges' changelog streams) and print its info.
    Create {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// Hash ranges (1 to 256), fixed for the table's life; each is owned by one server.
        #[arg(long, default_value_t = 4)]
        ranges: u32,
        /// Checkpoint a changing range at least this often.
        #[arg(long, default_value = "5m", value_parser = parse_duration)]
        checkpoint_interval: Duration,
        /// Checkpoint a range after this many updates.
        #[arg(long, default_value_t = 100_000)]
        checkpoint_every: u64,
        /// Memory one range may hold (k, m, g suffixes); puts fail with RANGE_FULL beyond.
        #[arg(long, default_value = "1g", value_parser = parse_bytes)]
        max_bytes: u64,
        /// The quorums of the changelog segments.
        #[command(flatten)]
        quorums: Quorums,
    },
    /// Delete a table: its metadata, checkpoints and changelogs.
    Drop {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
    },
    /// Show a table's settings.
    Info {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the tables of a namespace, one `namespace/name` per line.
    List {
        #[command(flatten)]
        target: ServerTarget,
        namespace: String,
    },
    /// Set a key; print the revision of the put.
    Put {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        key: String,
        #[arg(allow_negative_numbers = true)]
        value: String,
        /// Store the value as a 64-bit number (what `incr` adds to).
        #[arg(long)]
        number: bool,
    },
    /// Print a key's value, then `version V mod_revision R create_revision C` (exit status 2 when
    /// the key is absent).
    Get {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        key: String,
        #[command(flatten)]
        output: Output,
    },
    /// Delete a key (print `deleted` or `absent`).
    Del {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        key: String,
    },
    /// Print keys in order from --start (inclusive) to --end (exclusive): `key<TAB>value` lines,
    /// or JSON objects.
    Scan {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// First key (default: the smallest).
        #[arg(long, default_value = "")]
        start: String,
        /// Stop before this key (default: the end of the table).
        #[arg(long)]
        end: Option<String>,
        /// Print at most this many keys.
        #[arg(long)]
        limit: Option<u64>,
        #[command(flatten)]
        output: Output,
    },
    /// Add AMOUNT (default 1, may be negative) to a number key (absent counts as 0); print the
    /// new total.
    Incr {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        key: String,
        #[arg(default_value_t = 1, allow_negative_numbers = true)]
        amount: i64,
    },
    /// Compare-and-set: put VALUE only if the key is at EXPECTED_VERSION (0: only if absent).
    /// Prints the revision; exit status 2 when the version did not match.
    Cas {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        key: String,
        expected_version: u64,
        #[arg(allow_negative_numbers = true)]
        value: String,
        /// Store the value as a 64-bit number.
        #[arg(long)]
        number: bool,
    },
}

#[derive(Args)]
pub struct Output {
    /// One JSON object per key.
    #[arg(long)]
    json: bool,
    /// Byte values (and scanned keys) as hex instead of (lossy) UTF-8 text.
    #[arg(long, conflicts_with = "json")]
    hex: bool,
}

fn value_text(v: &Value, hex: bool) -> String {
    match v {
        Value::Bytes(b) => bytes_text(b, hex),
        Value::Number(n) => n.to_string(),
    }
}

fn kv_json(kv: &KeyValue) -> serde_json::Value {
    let mut o = serde_json::Map::new();
    bytes_json(&mut o, "key", "key_base64", &kv.key);
    match &kv.value {
        Value::Bytes(b) => {
            bytes_json(&mut o, "value", "value_base64", b);
            o.insert("type".into(), "bytes".into());
        }
        Value::Number(n) => {
            o.insert("value".into(), (*n).into());
            o.insert("type".into(), "number".into());
        }
    }
    o.insert("version".into(), kv.version.into());
    o.insert("create_revision".into(), kv.create_revision.into());
    o.insert("mod_revision".into(), kv.mod_revision.into());
    serde_json::Value::Object(o)
}

fn parse_value(value: String, number: bool) -> anyhow::Result<Value> {
    if number {
        let n: i64 = value
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("{value:?} is not a 64-bit integer (--number)"))?;
        Ok(Value::Number(n))
    } else {
        Ok(Value::Bytes(Bytes::from(value)))
    }
}

pub async fn run(cmd: TableCommand) -> anyhow::Result<()> {
    let r = run_inner(cmd).await;
    match r {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        r => r,
    }
}

async fn run_inner(cmd: TableCommand) -> anyhow::Result<()> {
    match cmd {
        TableCommand::Create {
            target,
            name,
            ranges,
            checkpoint_interval,
            checkpoint_every,
            max_bytes,
            quorums,
        } => {
            quorums.check()?;
            let cfg = TableConfig {
                ranges,
                changelog: StreamConfig {
                    ensemble: quorums.ensemble,
                    write_quorum: quorums.write_quorum,
                    ack_quorum: quorums.ack_quorum,
                    ..StreamConfig::changelog()
                },
                checkpoint_interval,
                checkpoint_every,
                max_bytes,
            };
            let meta = target.connect().await?.table(name).create(cfg).await?;
            print_meta(&meta, false);
        }
        TableCommand::Drop { target, name } => {
            target
                .connect()
                .await?
                .table(name.clone())
                .delete_table()
                .await?;
            println!("table {name} deleted");
        }
        TableCommand::Info { target, name, json } => {
            let meta = target.connect().await?.table(name).info().await?;
            print_meta(&meta, json);
        }
        TableCommand::List { target, namespace } => {
            let names = target.connect().await?.list_tables(&namespace).await?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for n in names {
                writeln!(out, "{n}")?;
            }
        }
        TableCommand::Put {
            target,
            name,
            key,
            value,
            number,
        } => {
            let value = parse_value(value, number)?;
            let r = target.connect().await?.table(name).put(key, value).await?;
            println!("{}", r.revision);
        }
        TableCommand::Get {
            target,
            name,
            key,
            output,
        } => {
            let kv = target.connect().await?.table(name).get(key.clone()).await?;
            match kv {
                None if output.json => {
                    println!("null");
                    return Err(NotMet(format!("no key {key:?}")).into());
                }
                None => return Err(NotMet(format!("no key {key:?}")).into()),
                Some(kv) if output.json => println!("{}", kv_json(&kv)),
                Some(kv) => {
                    println!("{}", value_text(&kv.value, output.hex));
                    println!(
                        "version {} mod_revision {} create_revision {}",
                        kv.version, kv.mod_revision, kv.create_revision
                    );
                }
            }
        }
        TableCommand::Del { target, name, key } => {
            let r = target.connect().await?.table(name).delete(key).await?;
            println!("{}", if r.deleted { "deleted" } else { "absent" });
        }
        TableCommand::Scan {
            target,
            name,
            start,
            end,
            limit,
            output,
        } => {
            let t = target.connect().await?.table(name);
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            let end = end.map(Bytes::from);
            let mut from = Bytes::from(start);
            let mut printed = 0u64;
            loop {
                let page = match limit {
                    Some(l) if printed >= l => break,
                    Some(l) => (l - printed).min(u64::from(SCAN_PAGE)) as u32,
                    None => SCAN_PAGE,
                };
                let (kvs, more) = t.scan(from.clone(), end.clone(), page).await?;
                for kv in &kvs {
                    if output.json {
                        writeln!(out, "{}", kv_json(kv))?;
                    } else {
                        writeln!(
                            out,
                            "{}\t{}",
                            bytes_text(&kv.key, output.hex),
                            value_text(&kv.value, output.hex)
                        )?;
                    }
                }
                printed += kvs.len() as u64;
                match kvs.last() {
                    // The next page starts just after the last key: the key with a 0 byte added.
                    Some(last) if more => {
                        let mut next = last.key.to_vec();
                        next.push(0);
                        from = Bytes::from(next);
                    }
                    _ => break,
                }
            }
            out.flush()?;
        }
        TableCommand::Incr {
            target,
            name,
            key,
            amount,
        } => {
            let total = target
                .connect()
                .await?
                .table(name)
                .increment(key, amount)
                .await?;
            println!("{total}");
        }
        TableCommand::Cas {
            target,
            name,
            key,
            expected_version,
            value,
            number,
        } => {
            let value = parse_value(value, number)?;
            let r = target
                .connect()
                .await?
                .table(name)
                .put_expect(key.clone(), value, Expect::Version(expected_version))
                .await?;
            if !r.succeeded {
                let now = match &r.prev_kv {
                    Some(kv) => format!("version {}", kv.version),
                    None if expected_version == 0 => "present".to_string(),
                    None => "at another version or absent".to_string(),
                };
                return Err(NotMet(format!(
                    "not stored: key {key:?} is {now}, not at version {expected_version}"
                ))
                .into());
            }
            println!("{}", r.revision);
        }
    }
    Ok(())
}

fn print_meta(meta: &TableMeta, json: bool) {
    let c = &meta.config;
    if json {
        let o = serde_json::json!({
            "name": meta.name.to_string(),
            "created_ms": meta.created_ms,
            "config": c,
        });
        println!("{o}");
        return;
    }
    println!("table {}", meta.name);
    println!("  ranges       {}", c.ranges);
    println!(
        "  checkpoints  every {:?} or {} updates",
        c.checkpoint_interval, c.checkpoint_every
    );
    println!("  range memory {} bytes at most", c.max_bytes);
    println!(
        "  changelogs   E={} Qw={} Qa={}, segments of {} records / {} bytes / {:?}",
        c.changelog.ensemble,
        c.changelog.write_quorum,
        c.changelog.ack_quorum,
        c.changelog.segment_max_entries,
        c.changelog.segment_max_bytes,
        c.changelog.segment_max_age
    );
    println!(
        "  created      {} ({} ms)",
        format_time_ms(meta.created_ms),
        meta.created_ms
    );
}
