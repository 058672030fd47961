//! Wake-ups at known due times: a delayed task, a retry's backoff or a
//! snooze starts within milliseconds of its `run_at`, not at the next poll.
//!
//! A store hands each future `run_at` it writes (and, on PostgreSQL, those
//! that other nodes announce) to its [`DueTimer`]. One task per store keeps
//! the distinct instants, sleeps until the earliest, and then wakes the
//! store's producers through the work notifier; they claim as they do after
//! any wake-up. Producers still poll, so an instant the timer does not keep
//! (past [`MAX_PENDING`], or written by a process that announces nothing)
//! starts at the next poll, as before.
//!
//! Invariants: only the timer task reads `pending`; senders only queue
//! instants on an unbounded channel, so a store call never waits for it.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{Notify, mpsc};

/// Most distinct instants kept; the latest are dropped past it (polling
/// finds their tasks).
pub(crate) const MAX_PENDING: usize = 10_000;

/// Instants are kept to the millisecond, rounded up: a wake-up is never
/// before its task is due.
fn ms_ceil(t: DateTime<Utc>) -> i64 {
    let us = t.timestamp_micros();
    us.div_euclid(1000) + i64::from(us.rem_euclid(1000) != 0)
}

/// The timer task's inputs, until it starts.
type Unstarted = Option<(mpsc::UnboundedReceiver<i64>, Arc<Notify>)>;

/// Wakes a store's producers at the due times handed to it. Cheap to clone.
#[derive(Clone)]
pub(crate) struct DueTimer {
    tx: mpsc::UnboundedSender<i64>,
    /// The receiver, until the timer task takes it (on first use inside a
    /// Tokio runtime: stores may be opened outside one).
    rx: Arc<Mutex<Unstarted>>,
}

impl DueTimer {
    pub(crate) fn new(notify: Arc<Notify>) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        DueTimer {
            tx,
            rx: Arc::new(Mutex::new(Some((rx, notify)))),
        }
    }

    /// Wake the producers at each of `times` that is in the future.
    pub(crate) fn at(&self, times: impl IntoIterator<Item = DateTime<Utc>>) {
        let now = Utc::now();
        let mut any = false;
        for t in times {
            if t > now {
                any = true;
                let _ = self.tx.send(ms_ceil(t));
            }
        }
        if any {
            self.start();
        }
    }

    fn start(&self) {
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if let Some((rx, notify)) = self.rx.lock().ok().and_then(|mut r| r.take()) {
            handle.spawn(run(rx, notify));
        }
    }
}

/// The timer task: ends when every [`DueTimer`] clone is gone.
async fn run(mut rx: mpsc::UnboundedReceiver<i64>, notify: Arc<Notify>) {
    let mut pending: BTreeSet<i64> = BTreeSet::new();
    let mut got = Vec::new();
    loop {
        let wait = pending.first().map(|&ms| {
            let left = ms - Utc::now().timestamp_millis();
            Duration::from_millis(left.max(0) as u64)
        });
        tokio::select! {
            n = rx.recv_many(&mut got, 1024) => {
                if n == 0 {
                    return;
                }
                pending.extend(got.drain(..));
                while pending.len() > MAX_PENDING {
                    pending.pop_last();
                }
            }
            _ = tokio::time::sleep(wait.unwrap_or_default()), if wait.is_some() => {
                let now = Utc::now().timestamp_millis();
                while pending.first().is_some_and(|&ms| ms <= now) {
                    pending.pop_first();
                }
                notify.notify_waiters();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instants_round_up_to_the_millisecond() {
        let t = DateTime::from_timestamp_micros(1_000_500).expect("valid");
        assert_eq!(ms_ceil(t), 1001);
        let t = DateTime::from_timestamp_micros(1_000_000).expect("valid");
        assert_eq!(ms_ceil(t), 1000);
    }

    #[tokio::test]
    async fn producers_wake_at_the_due_time() {
        let notify = Arc::new(Notify::new());
        let timer = DueTimer::new(notify.clone());
        let due = Utc::now() + chrono::Duration::milliseconds(150);
        let woken = notify.notified();
        tokio::pin!(woken);
        woken.as_mut().enable();
        timer.at([due]);
        tokio::time::timeout(Duration::from_secs(5), woken)
            .await
            .expect("woken");
        assert!(Utc::now() >= due, "woken before the task was due");
    }
}
