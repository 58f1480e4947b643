//! Fan-out of applied changes to a node's watchers.
//!
//! Publishing never blocks the apply path: a watcher whose buffer is full is removed and its
//! stream ends with `Resync` (see [`crate::store::Watch`]). The number of watchers is capped.

use parking_lot::Mutex;

use crate::store::{MetaError, Watch, WatchEvent, WatchSender, WatchTarget, watch_channel};

/// Most watchers one node serves at once.
pub const MAX_WATCHERS: usize = 10_000;

#[derive(Default)]
pub struct WatchHub {
    watchers: Mutex<Vec<(WatchTarget, WatchSender)>>,
}

impl WatchHub {
    pub fn subscribe(&self, target: WatchTarget) -> Result<Watch, MetaError> {
        let mut g = self.watchers.lock();
        g.retain(|(_, tx)| !tx.is_closed());
        if g.len() >= MAX_WATCHERS {
            return Err(MetaError::Unavailable(format!(
                "too many watchers (max {MAX_WATCHERS})"
            )));
        }
        let (tx, rx) = watch_channel();
        g.push((target, tx));
        Ok(rx)
    }

    pub fn publish(&self, events: &[WatchEvent]) {
        if events.is_empty() {
            return;
        }
        let mut g = self.watchers.lock();
        g.retain(|(target, tx)| {
            events.iter().all(|ev| {
                let key = match ev {
                    WatchEvent::Put(kv) => kv.key.as_str(),
                    WatchEvent::Delete { key, .. } => key.as_str(),
                    WatchEvent::Resync => return tx.send(WatchEvent::Resync),
                };
                !target.matches(key) || tx.send(ev.clone())
            })
        });
    }

    /// Ends every watch with `Resync` (the state was replaced by a snapshot).
    pub fn resync_all(&self) {
        for (_, tx) in self.watchers.lock().drain(..) {
            tx.fail();
        }
    }
}
