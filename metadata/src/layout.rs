//! Where Quire keeps things in the metadata store, and how typed values are encoded.
//!
//! ```text
//! /quire/instanceid                      cluster instance id (created once)
//! /quire/ledgers/<id, 20 digits>         ledger metadata
//! /quire/bookies/writable/<bookie id>    ephemeral registration of a writable bookie
//! /quire/bookies/readonly/<bookie id>    ephemeral registration of a read-only bookie
//! /quire/cookies/<bookie id>             the bookie's cookie (identity <-> directories)
//! /quire/underreplicated/<ledger id>     a ledger with missing replicas
//! /quire/underreplicated-locks/<id>      ephemeral: a replication worker owns that ledger
//! /quire/autorecovery/auditor            ephemeral: the active auditor (its election key)
//! /quire/autorecovery/workers/<id>       ephemeral: a replication worker and its counters
//! /quire/autorecovery/decommissioning/<bookie id>  a bookie being emptied (no new replicas)
//! ```
//! Counter `ledgers` hands out ledger ids.
//!
//! Typed values are `<magic>\t<version>\n<JSON>`: readable with `quire metadata get`, and a
//! reader refuses a magic or version it does not know instead of misreading it.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::store::MetaError;

pub const ROOT: &str = "/quire";
pub const INSTANCE_ID: &str = "/quire/instanceid";
pub const LEDGERS: &str = "/quire/ledgers/";
pub const BOOKIES_WRITABLE: &str = "/quire/bookies/writable/";
pub const BOOKIES_READONLY: &str = "/quire/bookies/readonly/";
pub const COOKIES: &str = "/quire/cookies/";
pub const UNDER_REPLICATED: &str = "/quire/underreplicated/";
pub const UNDER_REPLICATED_LOCKS: &str = "/quire/underreplicated-locks/";
pub const AUDITOR: &str = "/quire/autorecovery/auditor";
pub const WORKERS: &str = "/quire/autorecovery/workers/";
pub const DECOMMISSIONING: &str = "/quire/autorecovery/decommissioning/";
pub const LEDGER_ID_COUNTER: &str = "ledgers";

pub fn ledger_key(id: u64) -> String {
    format!("{LEDGERS}{id:020}")
}

pub fn ledger_id_of(key: &str) -> Option<u64> {
    key.strip_prefix(LEDGERS)?.parse().ok()
}

/// Bookie ids become key segments: no '/', not empty, bounded.
pub fn check_bookie_id(id: &str) -> Result<(), MetaError> {
    if id.is_empty() || id.len() > 255 || id.contains('/') || id.chars().any(char::is_control) {
        return Err(MetaError::InvalidArgument(format!("bad bookie id {id:?}")));
    }
    Ok(())
}

pub fn encode<T: Serialize>(magic: &str, version: u32, value: &T) -> Bytes {
    let mut out = format!("{magic}\t{version}\n").into_bytes();
    serde_json::to_writer(&mut out, value).expect("typed metadata serializes");
    Bytes::from(out)
}

pub fn decode<T: DeserializeOwned>(
    magic: &str,
    version: u32,
    key: &str,
    bytes: &[u8],
) -> Result<T, MetaError> {
    let bad = |why: String| MetaError::InvalidArgument(format!("{key}: {why}"));
    let nl = bytes
        .iter()
        .position(|b| *b == b'\n')
        .ok_or_else(|| bad("no format header".into()))?;
    let header =
        std::str::from_utf8(&bytes[..nl]).map_err(|_| bad("format header is not UTF-8".into()))?;
    let (m, v) = header
        .split_once('\t')
        .ok_or_else(|| bad(format!("bad format header {header:?}")))?;
    if m != magic {
        return Err(bad(format!("holds {m:?}, expected {magic:?}")));
    }
    if v.parse::<u32>().ok() != Some(version) {
        return Err(bad(format!(
            "{magic} version {v}, this build reads version {version}"
        )));
    }
    serde_json::from_slice(&bytes[nl + 1..]).map_err(|e| bad(format!("{magic}: {e}")))
}

/// Hex for byte fields inside JSON values.
pub mod hex_bytes {
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&v.iter().map(|b| format!("{b:02x}")).collect::<String>())
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        let s = String::deserialize(d)?;
        if s.len() % 2 != 0 {
            return Err(serde::de::Error::custom("odd-length hex"));
        }
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).map_err(serde::de::Error::custom))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn typed_values_refuse_foreign_formats() {
        let b = encode("QuireTest", 1, &vec![1u32, 2]);
        assert_eq!(
            decode::<Vec<u32>>("QuireTest", 1, "/k", &b).unwrap(),
            vec![1, 2]
        );
        assert!(decode::<Vec<u32>>("QuireTest", 2, "/k", &b).is_err());
        assert!(decode::<Vec<u32>>("Other", 1, "/k", &b).is_err());
        assert!(decode::<Vec<u32>>("QuireTest", 1, "/k", b"garbage").is_err());
        assert_eq!(ledger_id_of(&ledger_key(42)), Some(42));
    }
}
