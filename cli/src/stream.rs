//! `quire stream ...`: streams through the stream-table servers (the Rust client of
//! `quire_stream_table::client`): create, append, read, tail, truncate, delete, info, list.
//!
//! Names are `namespace/name`. Payloads print as (lossy) UTF-8 text, one per line, or with
//! `--json` one object per line: `{"offset": N, "text": ...}`, or `"payload_base64"` instead of
//! `"text"` for a payload that is not UTF-8.

use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::{Args, Subcommand};
use futures::StreamExt;
use quire_stream_table::Name;
use quire_stream_table::client::StreamHandle;
use quire_stream_table::stream::{Record, StreamConfig, StreamInfo};

use crate::bench::parse_duration;
use crate::ledger::{Quorums, format_time_ms};
use crate::st_client::{ServerTarget, bytes_json, bytes_text, is_broken_pipe, parse_bytes};

/// Records asked for in one read call.
const READ_BATCH: usize = 1000;
/// Lines read from stdin ahead of the appender.
const STDIN_QUEUE: usize = 1024;

#[derive(Subcommand)]
pub enum StreamCommand {
    /// Create a stream and print its info.
    Create {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        #[command(flatten)]
        quorums: Quorums,
        /// Roll a segment before it passes this many payload bytes (k, m, g suffixes).
        #[arg(long, default_value = "1g", value_parser = parse_bytes)]
        segment_max_bytes: u64,
        /// Roll a segment at this many records.
        #[arg(long, default_value_t = 50_000)]
        segment_max_entries: u64,
        /// Roll a segment older than this at the next append (e.g. 4h, 10m).
        #[arg(long, default_value = "4h", value_parser = parse_duration)]
        segment_max_age: Duration,
    },
    /// Append records and print their offsets, one per line: each --data, or else each line of
    /// stdin (without its line ending).
    Append {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// A record to append (repeatable); stdin is not read when given.
        #[arg(long)]
        data: Vec<String>,
        /// Records sent and not yet acknowledged at most (1 to 1024).
        #[arg(long, default_value_t = 256)]
        in_flight: usize,
    },
    /// Print confirmed records from an offset to the end of the stream (or --max of them).
    Read {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// First offset (default: the stream's first retained offset).
        #[arg(long)]
        from: Option<u64>,
        /// Print at most this many records.
        #[arg(long)]
        max: Option<u64>,
        #[command(flatten)]
        output: Output,
    },
    /// Print records as they are confirmed, across segment rollovers, until Ctrl-C (or --max
    /// records).
    Tail {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// First offset (default: the stream's end, i.e. only records appended from now on).
        #[arg(long)]
        from: Option<u64>,
        /// Stop after this many records.
        #[arg(long)]
        max: Option<u64>,
        #[command(flatten)]
        output: Output,
    },
    /// Delete the whole segments that end at or before an offset; print the new first offset.
    Truncate {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// Records below this offset may go (only whole segments are deleted).
        #[arg(long)]
        before: u64,
    },
    /// Delete a stream and its segments.
    Delete {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
    },
    /// Show a stream: offsets, segments, writer, settings.
    Info {
        #[command(flatten)]
        target: ServerTarget,
        /// namespace/name
        name: Name,
        /// Print one JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Print the streams of a namespace, one `namespace/name` per line.
    List {
        #[command(flatten)]
        target: ServerTarget,
        namespace: String,
    },
}

#[derive(Args)]
pub struct Output {
    /// One JSON object per record: {"offset": N, "text": ...} (or "payload_base64").
    #[arg(long)]
    json: bool,
    /// Payloads as hex instead of (lossy) UTF-8 text.
    #[arg(long, conflicts_with = "json")]
    hex: bool,
    /// Prefix each payload with its offset and a tab.
    #[arg(long, conflicts_with = "json")]
    offsets: bool,
}

impl Output {
    fn write(&self, out: &mut impl Write, r: &Record) -> std::io::Result<()> {
        if self.json {
            let mut o = serde_json::Map::new();
            o.insert("offset".into(), r.offset.into());
            bytes_json(&mut o, "text", "payload_base64", &r.payload);
            return writeln!(out, "{}", serde_json::Value::Object(o));
        }
        if self.offsets {
            write!(out, "{}\t", r.offset)?;
        }
        writeln!(out, "{}", bytes_text(&r.payload, self.hex))
    }
}

pub async fn run(cmd: StreamCommand) -> anyhow::Result<()> {
    let r = match cmd {
        StreamCommand::Create {
            target,
            name,
            quorums,
            segment_max_bytes,
            segment_max_entries,
            segment_max_age,
        } => {
            quorums.check()?;
            let cfg = StreamConfig {
                segment_max_bytes,
                segment_max_entries,
                segment_max_age,
                ensemble: quorums.ensemble,
                write_quorum: quorums.write_quorum,
                ack_quorum: quorums.ack_quorum,
            };
            let info = target.connect().await?.stream(name).create(cfg).await?;
            print_info(&info, false);
            Ok(())
        }
        StreamCommand::Append {
            target,
            name,
            data,
            in_flight,
        } => {
            let s = target.connect().await?.stream(name);
            append(&s, data, in_flight).await
        }
        StreamCommand::Read {
            target,
            name,
            from,
            max,
            output,
        } => {
            let s = target.connect().await?.stream(name);
            read(&s, from, max, &output).await
        }
        StreamCommand::Tail {
            target,
            name,
            from,
            max,
            output,
        } => {
            let s = target.connect().await?.stream(name);
            tail(&s, from, max, &output).await
        }
        StreamCommand::Truncate {
            target,
            name,
            before,
        } => {
            let start = target
                .connect()
                .await?
                .stream(name)
                .truncate(before)
                .await?;
            println!("{start}");
            Ok(())
        }
        StreamCommand::Delete { target, name } => {
            target
                .connect()
                .await?
                .stream(name.clone())
                .delete()
                .await?;
            println!("stream {name} deleted");
            Ok(())
        }
        StreamCommand::Info { target, name, json } => {
            let info = target.connect().await?.stream(name).info().await?;
            print_info(&info, json);
            Ok(())
        }
        StreamCommand::List { target, namespace } => {
            let names = target.connect().await?.list_streams(&namespace).await?;
            let stdout = std::io::stdout();
            let mut out = stdout.lock();
            for n in names {
                writeln!(out, "{n}")?;
            }
            Ok(())
        }
    };
    match r {
        Err(e) if is_broken_pipe(&e) => Ok(()),
        r => r,
    }
}

async fn append(s: &StreamHandle, data: Vec<String>, in_flight: usize) -> anyhow::Result<()> {
    // The client queues up to 1024 records: a larger window could block a send on records
    // whose offsets are only taken after it.
    anyhow::ensure!(
        (1..=1024).contains(&in_flight),
        "--in-flight must be 1 to 1024"
    );
    let mut records = tokio::sync::mpsc::channel::<std::io::Result<Bytes>>(STDIN_QUEUE);
    if data.is_empty() {
        crate::ledger::stdin_lines(records.0.clone());
    } else {
        let tx = records.0.clone();
        tokio::spawn(async move {
            for d in data {
                if tx.send(Ok(Bytes::from(d))).await.is_err() {
                    return;
                }
            }
        });
    }
    drop(records.0);
    let rx = &mut records.1;

    let mut appender = s.appender().await?;
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    // Offsets come back in send order; `pending` counts the records not yet acknowledged.
    let mut pending = 0usize;
    let mut appended = 0u64;
    let result: anyhow::Result<()> = async {
        while let Some(r) = rx.recv().await {
            let payload = r.context("reading stdin")?;
            if pending >= in_flight {
                let offset = appender.next_offset().await?;
                pending -= 1;
                appended += 1;
                writeln!(out, "{offset}")?;
            }
            appender.send(payload).await?;
            pending += 1;
        }
        while pending > 0 {
            let offset = appender.next_offset().await?;
            pending -= 1;
            appended += 1;
            writeln!(out, "{offset}")?;
        }
        out.flush()?;
        Ok(())
    }
    .await;
    if let Err(e) = result {
        let _ = out.flush();
        return Err(e.context(format!(
            "{appended} records acknowledged before the failure (their offsets are printed); {} were in flight and may or may not be stored",
            pending
        )));
    }
    appender.finish().await?;
    Ok(())
}

async fn read(
    s: &StreamHandle,
    from: Option<u64>,
    max: Option<u64>,
    output: &Output,
) -> anyhow::Result<()> {
    let mut next = match from {
        Some(f) => f,
        None => s.info().await?.start_offset,
    };
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::with_capacity(1 << 16, stdout.lock());
    let mut printed = 0u64;
    loop {
        let want = match max {
            Some(m) if printed >= m => break,
            Some(m) => (m - printed).min(READ_BATCH as u64) as usize,
            None => READ_BATCH,
        };
        let records = s.read(next, want).await?;
        let Some(last) = records.last() else {
            break;
        };
        next = last.offset + 1;
        for r in records.iter().take(want) {
            output.write(&mut out, r)?;
            printed += 1;
        }
    }
    out.flush()?;
    Ok(())
}

async fn tail(
    s: &StreamHandle,
    from: Option<u64>,
    max: Option<u64>,
    output: &Output,
) -> anyhow::Result<()> {
    let from = match from {
        Some(f) => f,
        None => s.info().await?.end_offset,
    };
    if max == Some(0) {
        return Ok(());
    }
    let records = s.tail(from);
    let mut records = std::pin::pin!(records);
    let mut ctrl_c = std::pin::pin!(tokio::signal::ctrl_c());
    let stdout = std::io::stdout();
    let mut printed = 0u64;
    loop {
        tokio::select! {
            _ = &mut ctrl_c => return Ok(()),
            r = records.next() => match r {
                None => return Ok(()),
                Some(r) => {
                    let r = r?;
                    let mut out = stdout.lock();
                    output.write(&mut out, &r)?;
                    out.flush()?;
                    printed += 1;
                    if max.is_some_and(|m| printed >= m) {
                        return Ok(());
                    }
                }
            },
        }
    }
}

fn print_info(info: &StreamInfo, json: bool) {
    let c = &info.config;
    if json {
        let o = serde_json::json!({
            "name": info.name.to_string(),
            "start_offset": info.start_offset,
            "end_offset": info.end_offset,
            "created_ms": info.created_ms,
            "writer": info.writer.as_ref().map(|w| serde_json::json!({"id": w.id, "addr": w.addr})),
            "config": c,
            "segments": info.segments,
        });
        println!("{o}");
        return;
    }
    println!("stream {}", info.name);
    println!(
        "  offsets      {}..{} ({} records retained)",
        info.start_offset,
        info.end_offset,
        info.end_offset.saturating_sub(info.start_offset)
    );
    match &info.writer {
        Some(w) => println!("  writer       {} at {}", w.id, w.addr),
        None => println!("  writer       none"),
    }
    println!(
        "  quorums      E={} Qw={} Qa={}",
        c.ensemble, c.write_quorum, c.ack_quorum
    );
    println!(
        "  roll at      {} bytes, {} records, {:?}",
        c.segment_max_bytes, c.segment_max_entries, c.segment_max_age
    );
    println!(
        "  created      {} ({} ms)",
        format_time_ms(info.created_ms),
        info.created_ms
    );
    println!("  segments     (seq: ledger, first offset, records)");
    for s in &info.segments {
        match s.count {
            Some(n) => println!(
                "    {}: ledger {}, {}, {n}",
                s.seq, s.ledger, s.start_offset
            ),
            None => println!(
                "    {}: ledger {}, {}, open",
                s.seq, s.ledger, s.start_offset
            ),
        }
    }
}
