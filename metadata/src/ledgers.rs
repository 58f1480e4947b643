//! Ledger metadata (DESIGN.md §2) and its store: create with a fresh id, read, CAS updates,
//! delete, list, watch.
//!
//! State machine: OPEN -> IN_RECOVERY -> CLOSED, or OPEN -> CLOSED. A recovery may take over
//! another recovery (IN_RECOVERY -> IN_RECOVERY); nothing leaves CLOSED. Closing records the
//! last entry id and the length. Every update is a CAS on the version read, so a writer adding
//! an ensemble and a recovery closing the ledger cannot both win.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::layout::{self, LEDGER_ID_COUNTER, decode, encode, ledger_id_of, ledger_key};
use crate::store::{DynStore, MetaError, Result, Watch, WatchTarget};

const MAGIC: &str = "QuireLedgerMetadata";
const VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum LedgerState {
    Open,
    InRecovery,
    Closed,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DigestType {
    Crc32c,
    Dummy,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerMetadata {
    pub ensemble_size: u32,
    pub write_quorum: u32,
    pub ack_quorum: u32,
    pub digest: DigestType,
    /// A hash of the ledger password (the client derives the bookies' master key from it).
    #[serde(with = "layout::hex_bytes")]
    pub password_hash: Vec<u8>,
    /// The master key bookies tie the ledger's entries to. Kept so that autorecovery can fence,
    /// recover and re-replicate a ledger without its password (BookKeeper keeps the password
    /// itself in the metadata for the same reason). Empty in metadata written before it was kept.
    #[serde(default, with = "layout::hex_bytes")]
    pub master_key: Vec<u8>,
    pub state: LedgerState,
    /// Last entry id when closed (-1: empty); -1 while open.
    pub last_entry_id: i64,
    /// Bytes written when closed.
    pub length: u64,
    /// First entry id -> the ensemble (bookie ids) from that entry on.
    pub ensembles: BTreeMap<u64, Vec<String>>,
    /// Creation time, milliseconds since the Unix epoch.
    pub ctime_ms: u64,
    pub custom: BTreeMap<String, String>,
}

impl LedgerMetadata {
    pub fn new(
        ensemble: Vec<String>,
        write_quorum: u32,
        ack_quorum: u32,
        digest: DigestType,
        password_hash: Vec<u8>,
        master_key: Vec<u8>,
        custom: BTreeMap<String, String>,
    ) -> Result<Self> {
        let m = LedgerMetadata {
            ensemble_size: ensemble.len() as u32,
            write_quorum,
            ack_quorum,
            digest,
            password_hash,
            master_key,
            state: LedgerState::Open,
            last_entry_id: -1,
            length: 0,
            ensembles: BTreeMap::from([(0, ensemble)]),
            ctime_ms: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            custom,
        };
        m.validate()?;
        Ok(m)
    }

    /// Checks the invariants of DESIGN.md §2.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(MetaError::InvalidArgument(m));
        let (e, qw, qa) = (self.ensemble_size, self.write_quorum, self.ack_quorum);
        if !(e >= qw && qw >= qa && qa >= 1) {
            return bad(format!(
                "need E >= Qw >= Qa >= 1, got E={e} Qw={qw} Qa={qa}"
            ));
        }
        if self.ensembles.keys().next() != Some(&0) {
            return bad("the first ensemble must start at entry 0".into());
        }
        for (first, ens) in &self.ensembles {
            if ens.len() != e as usize {
                return bad(format!(
                    "ensemble at entry {first} has {} bookies, expected {e}",
                    ens.len()
                ));
            }
            let mut uniq = ens.clone();
            uniq.sort();
            uniq.dedup();
            if uniq.len() != ens.len() {
                return bad(format!("ensemble at entry {first} names a bookie twice"));
            }
            for b in ens {
                layout::check_bookie_id(b)?;
            }
        }
        if self.state != LedgerState::Closed && self.last_entry_id != -1 {
            return bad("only a closed ledger has a last entry id".into());
        }
        if self.last_entry_id < -1 {
            return bad(format!("last entry id {} < -1", self.last_entry_id));
        }
        Ok(())
    }

    /// The ensemble that stores `entry`.
    pub fn ensemble_for(&self, entry: u64) -> &[String] {
        self.ensembles
            .range(..=entry)
            .next_back()
            .map(|(_, e)| e.as_slice())
            .unwrap_or(&[])
    }

    /// Bookies of `entry`'s write set: ensemble[(entry + i) mod E] for i in 0..Qw.
    pub fn write_set(&self, entry: u64) -> Vec<&str> {
        let ens = self.ensemble_for(entry);
        let e = ens.len() as u64;
        (0..self.write_quorum as u64)
            .map(|i| ens[((entry + i) % e) as usize].as_str())
            .collect()
    }

    /// Moves to `to`, refusing the transitions the state machine forbids.
    pub fn transition(&mut self, to: LedgerState) -> Result<()> {
        use LedgerState::*;
        let ok = matches!(
            (self.state, to),
            (Open, InRecovery) | (Open, Closed) | (InRecovery, InRecovery) | (InRecovery, Closed)
        );
        if !ok {
            return Err(MetaError::InvalidArgument(format!(
                "ledger state {:?} -> {to:?} is not allowed",
                self.state
            )));
        }
        self.state = to;
        Ok(())
    }

    pub fn close(&mut self, last_entry_id: i64, length: u64) -> Result<()> {
        self.transition(LedgerState::Closed)?;
        self.last_entry_id = last_entry_id;
        self.length = length;
        self.validate()
    }

    pub fn encode(&self) -> bytes::Bytes {
        encode(MAGIC, VERSION, self)
    }

    pub fn decode(key: &str, bytes: &[u8]) -> Result<Self> {
        let m: LedgerMetadata = decode(MAGIC, VERSION, key, bytes)?;
        m.validate()?;
        Ok(m)
    }
}

/// A value with the store version it was read at (the CAS token).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: u64,
}

/// Ledger metadata in a metadata store.
#[derive(Clone)]
pub struct LedgerStore {
    store: DynStore,
}

impl LedgerStore {
    pub fn new(store: DynStore) -> Self {
        LedgerStore { store }
    }

    /// Allocates a ledger id (never reused) and stores the metadata under it.
    pub async fn create(&self, meta: &LedgerMetadata) -> Result<(u64, Versioned<LedgerMetadata>)> {
        meta.validate()?;
        let id = self.store.allocate_id(LEDGER_ID_COUNTER).await?;
        let kv = self
            .store
            .create(&ledger_key(id), meta.encode(), None)
            .await?;
        Ok((
            id,
            Versioned {
                value: meta.clone(),
                version: kv.version,
            },
        ))
    }

    pub async fn read(&self, id: u64) -> Result<Versioned<LedgerMetadata>> {
        let key = ledger_key(id);
        let kv = self
            .store
            .get(&key)
            .await?
            .ok_or(MetaError::NotFound(key.clone()))?;
        Ok(Versioned {
            value: LedgerMetadata::decode(&key, &kv.value)?,
            version: kv.version,
        })
    }

    /// Writes `meta` if the ledger is still at `version`; `BadVersion` means re-read and retry.
    pub async fn update(
        &self,
        id: u64,
        meta: &LedgerMetadata,
        version: u64,
    ) -> Result<Versioned<LedgerMetadata>> {
        meta.validate()?;
        let kv = self
            .store
            .compare_and_set(&ledger_key(id), meta.encode(), version)
            .await?;
        Ok(Versioned {
            value: meta.clone(),
            version: kv.version,
        })
    }

    pub async fn delete(&self, id: u64, version: Option<u64>) -> Result<()> {
        self.store.delete(&ledger_key(id), version).await
    }

    /// Ledger ids in order, after `start_after`, at most `limit`.
    pub async fn list(&self, start_after: Option<u64>, limit: u32) -> Result<(Vec<u64>, bool)> {
        let after = start_after.map(ledger_key);
        let page = self
            .store
            .list(layout::LEDGERS, after.as_deref(), limit)
            .await?;
        Ok((
            page.kvs
                .iter()
                .filter_map(|kv| ledger_id_of(&kv.key))
                .collect(),
            page.more,
        ))
    }

    /// Follows one ledger's metadata (ensemble changes, close, delete).
    pub async fn watch(&self, id: u64) -> Result<Watch> {
        self.store.watch(WatchTarget::Key(ledger_key(id))).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> LedgerMetadata {
        let ens = vec!["b1".to_string(), "b2".into(), "b3".into()];
        LedgerMetadata::new(
            ens,
            3,
            2,
            DigestType::Crc32c,
            vec![1, 2, 3],
            vec![],
            BTreeMap::new(),
        )
        .unwrap()
    }

    #[test]
    fn quorums_and_ensembles_are_validated() {
        let ens = vec!["b1".to_string(), "b2".into()];
        assert!(
            LedgerMetadata::new(
                ens.clone(),
                3,
                2,
                DigestType::Crc32c,
                vec![],
                vec![],
                BTreeMap::new()
            )
            .is_err()
        );
        assert!(
            LedgerMetadata::new(
                ens.clone(),
                2,
                3,
                DigestType::Crc32c,
                vec![],
                vec![],
                BTreeMap::new()
            )
            .is_err()
        );
        assert!(
            LedgerMetadata::new(
                vec!["a".into(), "a".into()],
                2,
                2,
                DigestType::Crc32c,
                vec![],
                vec![],
                BTreeMap::new()
            )
            .is_err()
        );
        let mut m = meta();
        m.ensembles.insert(5, vec!["b1".into()]);
        assert!(m.validate().is_err(), "an ensemble of the wrong size");
    }

    #[test]
    fn state_machine_and_striping() {
        let mut m = meta();
        assert_eq!(m.write_set(4), ["b2", "b3", "b1"]);
        m.ensembles
            .insert(10, vec!["b4".into(), "b2".into(), "b3".into()]);
        assert_eq!(m.ensemble_for(9), ["b1", "b2", "b3"]);
        assert_eq!(m.ensemble_for(10), ["b4", "b2", "b3"]);
        m.transition(LedgerState::InRecovery).unwrap();
        m.transition(LedgerState::InRecovery).unwrap();
        m.close(41, 4200).unwrap();
        assert!(m.transition(LedgerState::Open).is_err());
        assert!(m.transition(LedgerState::InRecovery).is_err());
        let back = LedgerMetadata::decode("/k", &m.encode()).unwrap();
        assert_eq!(back, m);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn create_update_with_cas() {
        let store: DynStore =
            std::sync::Arc::new(crate::local::LocalStore::memory().await.unwrap());
        let ls = LedgerStore::new(store);
        let (a, v) = ls.create(&meta()).await.unwrap();
        let (b, _) = ls.create(&meta()).await.unwrap();
        assert_ne!(a, b);
        let mut m = v.value.clone();
        m.close(9, 90).unwrap();
        let v2 = ls.update(a, &m, v.version).await.unwrap();
        let mut stale = v.value.clone();
        stale.transition(LedgerState::InRecovery).unwrap();
        assert!(matches!(
            ls.update(a, &stale, v.version).await,
            Err(MetaError::BadVersion { .. })
        ));
        assert_eq!(ls.read(a).await.unwrap(), v2);
        assert_eq!(ls.list(None, 10).await.unwrap().0, vec![a, b]);
    }
}
