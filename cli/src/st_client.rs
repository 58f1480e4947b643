//! What `quire stream`, `quire table` and `quire bench table|stream` share: how they find the
//! stream-table servers, how typed errors are reported, and how payloads and values print.

use std::time::Duration;

use anyhow::Context;
use bytes::Bytes;
use clap::Args;
use quire_stream_table::client::Client;

use crate::bench::parse_duration;

/// The address tried when neither `--server` nor `--metadata` is given: `quire standalone`'s
/// API port.
pub const DEFAULT_SERVER: &str = "127.0.0.1:4181";

/// Where the stream-table servers are.
#[derive(Args, Clone)]
pub struct ServerTarget {
    /// A stream-table server, host:port (repeatable, or comma-separated). Any one will do: a
    /// server that does not own a stream or range redirects. Default: 127.0.0.1:4181 (`quire
    /// standalone`), unless --metadata is given.
    #[arg(long = "server", env = "QUIRE_SERVER", value_delimiter = ',')]
    pub servers: Vec<String>,
    /// Find the servers registered in this metadata store instead (quire://..., etcd://...,
    /// file:///...). --server wins when both are given.
    #[arg(long, env = "QUIRE_METADATA")]
    pub metadata: Option<String>,
    /// Deadline of each call (redirects and retries included).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

impl ServerTarget {
    /// Connects the client library to the servers this target names.
    pub async fn connect(&self) -> anyhow::Result<Client> {
        let client = if !self.servers.is_empty() {
            Client::connect(self.servers.clone())
                .await
                .with_context(|| format!("connecting to {}", self.servers.join(",")))?
        } else if let Some(uri) = &self.metadata {
            let store = quire_metadata::connect(uri)
                .await
                .with_context(|| format!("connecting to the metadata store {uri}"))?;
            Client::from_metadata(store)
                .await
                .with_context(|| format!("finding the stream-table servers in {uri}"))?
        } else {
            Client::connect(vec![DEFAULT_SERVER.to_string()])
                .await
                .with_context(|| format!("connecting to {DEFAULT_SERVER}"))?
        };
        Ok(client.with_timeout(self.timeout))
    }
}

/// A condition a command checked did not hold (a compare-and-set that lost, a key that is
/// absent): the command says so on stderr and exits with status 2, apart from errors (1).
#[derive(Debug)]
pub struct NotMet(pub String);

impl std::fmt::Display for NotMet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for NotMet {}

/// How `main` reports a failed command: `Some(status)` when it printed the error itself.
///
/// A stream-table error prints as `error: CODE: message` (the stable code of
/// [`quire_stream_table::Error::code`], with any context after the message), status 1; a
/// [`NotMet`] prints as its message, status 2.
pub fn report(e: &anyhow::Error) -> Option<i32> {
    if let Some(n) = e.downcast_ref::<NotMet>() {
        eprintln!("{n}");
        return Some(2);
    }
    let st = e
        .chain()
        .find_map(|c| c.downcast_ref::<quire_stream_table::Error>())?;
    // The typed error first, then the contexts added on the way up (innermost last).
    let contexts: Vec<String> = e
        .chain()
        .take_while(|c| c.downcast_ref::<quire_stream_table::Error>().is_none())
        .map(ToString::to_string)
        .collect();
    if contexts.is_empty() {
        eprintln!("error: {}: {st}", st.code());
    } else {
        eprintln!("error: {}: {st} ({})", st.code(), contexts.join(": "));
    }
    Some(1)
}

/// Whether an error is a closed stdout (`quire stream read ... | head`): the reader's choice, not
/// a failure.
pub fn is_broken_pipe(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>()
            .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe)
    })
}

/// Standard base64 (RFC 4648, padded), for binary payloads in JSON output.
pub fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Bytes into a JSON object: under `text_field` as a string when they are UTF-8, else under
/// `base64_field` in base64.
pub fn bytes_json(
    o: &mut serde_json::Map<String, serde_json::Value>,
    text_field: &str,
    base64_field: &str,
    b: &Bytes,
) {
    match std::str::from_utf8(b) {
        Ok(s) => o.insert(text_field.into(), s.into()),
        Err(_) => o.insert(base64_field.into(), base64(b).into()),
    };
}

/// Bytes as text: UTF-8, lossy, or hex.
pub fn bytes_text(b: &[u8], hex: bool) -> String {
    if hex {
        b.iter().map(|x| format!("{x:02x}")).collect()
    } else {
        String::from_utf8_lossy(b).into_owned()
    }
}

/// Parses a byte count with an optional unit: 512, 64k, 64KiB, 1m, 1MiB, 1g.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num.parse().map_err(|_| format!("bad size {s:?}"))?;
    let mult: u64 = match unit.to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        _ => return Err(format!("bad size unit in {s:?}: use k, m or g")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o, "{i}");
        }
        assert_eq!(base64(&[0xff, 0xfe, 0x00]), "//4A");
    }

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_bytes("512"), Ok(512));
        assert_eq!(parse_bytes("64k"), Ok(64 << 10));
        assert_eq!(parse_bytes("1MiB"), Ok(1 << 20));
        assert_eq!(parse_bytes("2g"), Ok(2 << 30));
        assert!(parse_bytes("1x").is_err());
        assert!(parse_bytes("k").is_err());
    }
}
