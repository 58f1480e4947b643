//! Metadata URIs, one syntax everywhere (bookies, CLI, client library):
//!
//! - `quire://host:port[,host:port...]`: Quire's metadata API (a raft cluster, or the embedded
//!   store served by a process such as `quire standalone`);
//! - `etcd://host:port[,host:port...]`: an etcd v3 cluster (cargo feature `etcd`);
//! - `file:///path`: the embedded store inside the calling process (one process at a time);
//! - `memory://`: a fresh in-memory store (tests).

use std::sync::Arc;

use crate::client::RemoteStore;
use crate::local::LocalStore;
use crate::store::{DynStore, MetaError, Result};

/// A parsed metadata URI.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MetadataUri {
    Quire(Vec<String>),
    Etcd(Vec<String>),
    File(std::path::PathBuf),
    Memory,
}

fn hosts(rest: &str, uri: &str) -> Result<Vec<String>> {
    let hosts: Vec<String> = rest
        .trim_end_matches('/')
        .split(',')
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .map(str::to_string)
        .collect();
    if hosts.is_empty() {
        return Err(MetaError::InvalidArgument(format!(
            "{uri}: no host:port given"
        )));
    }
    for h in &hosts {
        let ok = h
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !ok {
            return Err(MetaError::InvalidArgument(format!(
                "{uri}: {h:?} is not host:port"
            )));
        }
    }
    Ok(hosts)
}

impl std::str::FromStr for MetadataUri {
    type Err = MetaError;

    fn from_str(uri: &str) -> Result<Self> {
        if let Some(rest) = uri.strip_prefix("quire://") {
            Ok(MetadataUri::Quire(hosts(rest, uri)?))
        } else if let Some(rest) = uri.strip_prefix("etcd://") {
            Ok(MetadataUri::Etcd(hosts(rest, uri)?))
        } else if let Some(path) = uri.strip_prefix("file://") {
            if !path.starts_with('/') {
                return Err(MetaError::InvalidArgument(format!(
                    "{uri}: file URIs take an absolute path (file:///dir)"
                )));
            }
            Ok(MetadataUri::File(path.into()))
        } else if uri == "memory://" {
            Ok(MetadataUri::Memory)
        } else {
            Err(MetaError::InvalidArgument(format!(
                "{uri:?}: unknown metadata URI (expected quire://host:port,..., etcd://host:port,... or file:///path)"
            )))
        }
    }
}

/// Opens the store a URI names.
pub async fn connect(uri: &str) -> Result<DynStore> {
    Ok(match uri.parse::<MetadataUri>()? {
        MetadataUri::Quire(hosts) => Arc::new(RemoteStore::connect(&hosts)?),
        MetadataUri::Etcd(hosts) => connect_etcd(&hosts).await?,
        MetadataUri::File(path) => Arc::new(LocalStore::open(path).await?),
        MetadataUri::Memory => Arc::new(LocalStore::memory().await?),
    })
}

#[cfg(feature = "etcd")]
async fn connect_etcd(hosts: &[String]) -> Result<DynStore> {
    Ok(Arc::new(crate::etcd::EtcdStore::connect(hosts).await?))
}

#[cfg(not(feature = "etcd"))]
async fn connect_etcd(_hosts: &[String]) -> Result<DynStore> {
    Err(MetaError::InvalidArgument(
        "this quire was built without the `etcd` feature".into(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_scheme_and_rejects_bad_ones() {
        assert_eq!(
            "quire://a:1,b:2".parse::<MetadataUri>().unwrap(),
            MetadataUri::Quire(vec!["a:1".into(), "b:2".into()])
        );
        assert_eq!(
            "etcd://127.0.0.1:2379".parse::<MetadataUri>().unwrap(),
            MetadataUri::Etcd(vec!["127.0.0.1:2379".into()])
        );
        assert_eq!(
            "file:///tmp/x".parse::<MetadataUri>().unwrap(),
            MetadataUri::File("/tmp/x".into())
        );
        for bad in [
            "zk://a:1",
            "quire://",
            "quire://a",
            "quire://a:notaport",
            "file://relative",
            "",
        ] {
            assert!(
                matches!(
                    bad.parse::<MetadataUri>(),
                    Err(MetaError::InvalidArgument(_))
                ),
                "{bad}"
            );
        }
    }
}
