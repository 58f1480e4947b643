//! The bookie's metadata half: the cookie check against the metadata store, and registration in
//! the bookie registry, kept alive by a session.
//!
//! Cookie: the first start with a metadata store records the local cookie there. Later starts
//! compare: a stored cookie from another incarnation (the local directories were wiped or
//! replaced, so their cookie has a new instance id) or other directories means the bookie would
//! serve holes where it once acknowledged entries; it refuses to start.
//!
//! Registration: ephemeral under the session's lease, in the writable or read-only list as the
//! bookie's state says (re-checked every half second). When the session is lost (the bookie was
//! paused or cut off past the timeout and its key is gone), a new session is started and the
//! bookie registers again. A clean shutdown revokes the session, so the bookie leaves the
//! registry at once.

use std::sync::Arc;
use std::time::Duration;

use quire_metadata::bookies::{BookieInfo, BookieRegistry, CookieStore, StoredCookie};
use quire_metadata::session::Session;
use quire_metadata::{DynStore, MetaError};

use crate::{Bookie, BookieError};

const STATE_POLL: Duration = Duration::from_millis(500);
const RETRY: Duration = Duration::from_secs(1);

fn startup(e: impl std::fmt::Display) -> BookieError {
    BookieError::Startup(e.to_string())
}

/// Compares the local cookie with the one in the metadata store (recording it the first time).
pub async fn check_cookie(bookie: &Bookie, store: &DynStore) -> Result<(), BookieError> {
    let local = bookie.cookie();
    let mine = StoredCookie {
        bookie_id: local.bookie_id.clone(),
        instance_id: local.instance_id.clone(),
        journal_dir: local.journal_dir.display().to_string(),
        ledger_dirs: local
            .ledger_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect(),
    };
    let cookies = CookieStore::new(store.clone());
    let stored = match cookies.read(&mine.bookie_id).await.map_err(startup)? {
        Some((c, _)) => c,
        None => match cookies.create(&mine).await {
            Ok(()) => {
                tracing::info!(bookie_id = %mine.bookie_id, "cookie recorded in the metadata store");
                return Ok(());
            }
            Err(MetaError::AlreadyExists(_)) => {
                cookies
                    .read(&mine.bookie_id)
                    .await
                    .map_err(startup)?
                    .ok_or_else(|| startup("cookie vanished"))?
                    .0
            }
            Err(e) => return Err(startup(e)),
        },
    };
    if stored.instance_id != mine.instance_id {
        return Err(startup(format!(
            "the metadata store holds a cookie for bookie {} from other directories (instance {} vs \
             local {}): these disks were wiped or replaced; refusing to serve a bookie whose data is gone \
             (decommission the old bookie first, or use another bookie id)",
            mine.bookie_id, stored.instance_id, mine.instance_id
        )));
    }
    if stored != mine {
        return Err(startup(format!(
            "the metadata store's cookie for bookie {} names journal {} and ledger dirs {:?}, but this \
             bookie runs on journal {} and ledger dirs {:?}",
            mine.bookie_id,
            stored.journal_dir,
            stored.ledger_dirs,
            mine.journal_dir,
            mine.ledger_dirs
        )));
    }
    Ok(())
}

/// Keeps the bookie registered until `stop` turns true, then leaves the registry.
pub async fn run(
    bookie: Arc<Bookie>,
    store: DynStore,
    info: BookieInfo,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let ttl = Duration::from_millis(bookie.config().session_timeout_ms);
    let registry = BookieRegistry::new(store.clone());
    let id = bookie.id().to_string();
    while !*stop.borrow() {
        let session = match Session::start(store.clone(), ttl).await {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!(error = %e, "cannot start a metadata session; retrying");
                tokio::select! {
                    _ = tokio::time::sleep(RETRY) => continue,
                    _ = stop.changed() => return,
                }
            }
        };
        let mut read_only = bookie.is_read_only();
        if let Err(e) = registry
            .register(&id, &info, read_only, session.lease())
            .await
        {
            tracing::warn!(error = %e, "cannot register the bookie; retrying");
            let _ = session.close().await;
            tokio::select! {
                _ = tokio::time::sleep(RETRY) => continue,
                _ = stop.changed() => return,
            }
        }
        tracing::info!(bookie_id = %id, read_only, lease = session.lease(), "registered in the metadata store");
        loop {
            tokio::select! {
                _ = session.lost() => {
                    tracing::warn!(bookie_id = %id, "metadata session lost; registering again");
                    break;
                }
                _ = stop.changed() => {
                    if let Err(e) = session.close().await {
                        tracing::warn!(error = %e, "could not end the metadata session; it will expire");
                    }
                    return;
                }
                _ = tokio::time::sleep(STATE_POLL) => {
                    let now = bookie.is_read_only();
                    if now != read_only {
                        match registry.register(&id, &info, now, session.lease()).await {
                            Ok(()) => {
                                tracing::info!(bookie_id = %id, read_only = now, "registration moved");
                                read_only = now;
                            }
                            Err(e) => tracing::warn!(error = %e, "could not move the registration"),
                        }
                    }
                }
            }
        }
    }
}
