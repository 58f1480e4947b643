//! The recovery driver: marks the ledger IN_RECOVERY, runs a [`RecoveryCore`] against the bookies
//! and closes the ledger where the core says it ends.
//!
//! Two recoveries may race: each CASes the metadata to IN_RECOVERY (the second takes over the
//! first), and the first close CAS wins; the other then finds the ledger CLOSED and returns that
//! result. A recovery that cannot decide (too few bookies answer) starts over after a pause, a
//! bounded number of times.

use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use quire_metadata::ledgers::{LedgerMetadata, LedgerState, Versioned};
use quire_proto::StatusCode;
use quire_proto::bookie as pb;
use tokio::sync::mpsc;

use crate::client::Shared;
use crate::core::recovery::{FenceOutcome, ReadOutcome, RecoveryCore, RecoveryOutput};
use crate::error::{LedgerError, Result};
use crate::pool::CallError;
use crate::writer::{CasError, cas, retry_metadata};

const ATTEMPTS: u32 = 5;
/// Longest one recovery attempt may take.
const ATTEMPT_MAX: Duration = Duration::from_secs(120);

/// Recovers and closes ledger `id`; returns the closed metadata.
pub(crate) async fn recover(
    shared: &Shared,
    id: u64,
    key: Bytes,
) -> Result<Versioned<LedgerMetadata>> {
    let mut last_err = None;
    for attempt in 0..ATTEMPTS {
        if attempt > 0 {
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        let v = retry_metadata(|| shared.read_metadata(id)).await?;
        if v.value.state == LedgerState::Closed {
            return Ok(v);
        }
        let mut meta = v.value.clone();
        meta.transition(LedgerState::InRecovery)
            .map_err(|e| LedgerError::InvalidArgument(e.to_string()))?;
        let marked = match cas(shared, id, &meta, v.version).await {
            Ok(m) => m,
            Err(CasError::Conflict(_)) => continue, // someone moved first: look again
            Err(CasError::Failed(e)) => return Err(e),
        };
        let outcome = tokio::time::timeout(ATTEMPT_MAX, run(shared, id, &key, &marked.value))
            .await
            .unwrap_or_else(|_| {
                Err(LedgerError::RecoveryIncomplete(
                    id,
                    format!("no decision within {ATTEMPT_MAX:?}"),
                ))
            });
        match outcome {
            Ok((last, length)) => {
                let mut base = marked;
                loop {
                    let mut closed = base.value.clone();
                    closed
                        .close(last, length)
                        .map_err(|e| LedgerError::InvalidArgument(e.to_string()))?;
                    match cas(shared, id, &closed, base.version).await {
                        Ok(v) => {
                            tracing::info!(
                                ledger_id = id,
                                last_entry_id = last,
                                length,
                                "ledger recovered"
                            );
                            return Ok(v);
                        }
                        Err(CasError::Conflict(cur)) if cur.value.state == LedgerState::Closed => {
                            return Ok(cur);
                        }
                        // Only earlier fragments changed (autorecovery moved a replica): the
                        // decision stands, close on top of them.
                        Err(CasError::Conflict(cur))
                            if cur.value.state == LedgerState::InRecovery
                                && cur.value != base.value
                                && cur.value.ensembles.iter().next_back()
                                    == base.value.ensembles.iter().next_back() =>
                        {
                            base = cur;
                        }
                        Err(CasError::Conflict(_)) => break, // another recovery took over
                        Err(CasError::Failed(e)) => return Err(e),
                    }
                }
            }
            Err(e @ LedgerError::RecoveryIncomplete(..)) => {
                tracing::warn!(ledger_id = id, attempt, error = %e, "recovery attempt failed");
                last_err = Some(e);
            }
            Err(e) => return Err(e),
        }
    }
    Err(last_err.unwrap_or_else(|| {
        LedgerError::RecoveryIncomplete(id, "metadata kept changing under the recovery".into())
    }))
}

enum Answer {
    Fence(String, FenceOutcome),
    Read(String, u64, ReadOutcome),
    Write(String, u64, std::result::Result<(), String>),
}

/// Runs the core to its decision: (last entry id, length).
async fn run(shared: &Shared, id: u64, key: &Bytes, meta: &LedgerMetadata) -> Result<(i64, u64)> {
    let mut core = RecoveryCore::new(id, meta.clone());
    let (replies_tx, mut replies) = mpsc::unbounded_channel();
    let mut calls = FuturesUnordered::new();
    let mut queue = core.start();
    loop {
        for o in queue.drain(..) {
            match o {
                RecoveryOutput::Fence { bookie } => {
                    let (pool, key) = (shared.pool.clone(), key.clone());
                    calls.push(tokio::spawn(async move {
                        let r = pool.fence(&bookie, id, key).await;
                        let o = match r {
                            Ok(lac) => FenceOutcome::Ok { lac },
                            Err(e) if e.code == StatusCode::Unauthorized => {
                                FenceOutcome::Unauthorized
                            }
                            Err(e) => FenceOutcome::Failed(e.to_string()),
                        };
                        Answer::Fence(bookie, o)
                    }));
                }
                RecoveryOutput::Read {
                    bookie,
                    entry_id,
                    fence,
                } => {
                    let (pool, key) = (shared.pool.clone(), key.clone());
                    calls.push(tokio::spawn(async move {
                        let r = pool.read(&bookie, id, entry_id, fence.then_some(key)).await;
                        Answer::Read(bookie, entry_id, read_outcome(r))
                    }));
                }
                RecoveryOutput::Write {
                    bookie,
                    entry_id,
                    body,
                } => {
                    let entry = pb::AddEntry {
                        ledger_id: id,
                        entry_id,
                        master_key: key.clone(),
                        recovery: true,
                        body,
                    };
                    shared
                        .pool
                        .send_add(&bookie, entry, replies_tx.clone())
                        .await;
                }
                RecoveryOutput::Close {
                    last_entry_id,
                    length,
                } => return Ok((last_entry_id, length)),
                RecoveryOutput::Failed(e) => return Err(e),
            }
        }
        let answer = tokio::select! {
            Some(joined) = calls.next() => match joined {
                Ok(a) => a,
                Err(e) => return Err(LedgerError::RecoveryIncomplete(id, format!("task failed: {e}"))),
            },
            // Every recovery write gets exactly one reply: the pool fails it after the add
            // timeout at the latest.
            Some(r) = replies.recv() => {
                Answer::Write(r.bookie.to_string(), r.entry_id, r.result.map_err(|e| e.to_string()))
            }
        };
        queue = match answer {
            Answer::Fence(b, o) => core.on_fence(&b, o),
            Answer::Read(b, e, o) => core.on_read(&b, e, o),
            Answer::Write(b, e, r) => core.on_write(&b, e, r),
        };
    }
}

fn read_outcome(r: std::result::Result<pb::ReadEntryResponse, CallError>) -> ReadOutcome {
    match r {
        Ok(resp) => ReadOutcome::Found(resp.body),
        Err(e) if e.is_missing() => ReadOutcome::Missing,
        Err(e) if e.code == StatusCode::Unauthorized => ReadOutcome::Unauthorized,
        Err(e) => ReadOutcome::Failed(e.to_string()),
    }
}
