//! Where streams and tables live in the metadata store. Values are typed records encoded with
//! [`quire_metadata::layout::encode`] (a magic and a version, then JSON).
//!
//! ```text
//! /quire/streams/<ns>/<name>               StreamMeta: config and segment list (CAS only)
//! /quire/stream-writers/<ns>/<name>        ephemeral: the writer lease (holder id and address)
//! /quire/tables/<ns>/<name>                TableMeta: range count and settings
//! /quire/table-checkpoints/<ns>/<name>/<r> the newest checkpoint of range r (CAS only)
//! /quire/stream-table/servers/<id>         ephemeral: a stream/table server and its address
//! ```
//! A range's changelog is the internal stream `_system/<ns>.<name>.<r>`
//! ([`crate::Name::changelog`]), and the owner of range r is the holder of that stream's writer
//! lease.

use crate::names::Name;

pub const STREAMS: &str = "/quire/streams/";
pub const STREAM_WRITERS: &str = "/quire/stream-writers/";
pub const TABLES: &str = "/quire/tables/";
pub const TABLE_CHECKPOINTS: &str = "/quire/table-checkpoints/";
pub const SERVERS: &str = "/quire/stream-table/servers/";

pub fn stream_key(n: &Name) -> String {
    format!("{STREAMS}{}", n.path())
}

pub fn writer_key(n: &Name) -> String {
    format!("{STREAM_WRITERS}{}", n.path())
}

pub fn table_key(n: &Name) -> String {
    format!("{TABLES}{}", n.path())
}

pub fn checkpoint_key(n: &Name, range: u32) -> String {
    format!("{TABLE_CHECKPOINTS}{}/{range}", n.path())
}

pub fn server_key(id: &str) -> String {
    format!("{SERVERS}{id}")
}

/// Parses the `<ns>/<name>` tail of a key under `prefix` (no checks: names in the store were
/// checked when created).
pub fn name_of(prefix: &str, key: &str) -> Option<Name> {
    let (namespace, name) = key.strip_prefix(prefix)?.split_once('/')?;
    Some(Name {
        namespace: namespace.into(),
        name: name.into(),
    })
}
