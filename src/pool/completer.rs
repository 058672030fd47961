//! The completer: writes attempt outcomes to the store in batches.
//!
//! Slots hand outcomes over an unbounded channel and move on; the completer
//! takes everything waiting (up to `MAX_BATCH`) and writes it with one
//! store call. When the store fails in a way that may pass (a lost
//! connection, a busy lock), the batch is kept and retried with backoff:
//! outcomes are never dropped while the node runs (a task whose outcome is
//! lost would run again, which at-least-once allows but we avoid).
//!
//! When the store refuses the batch for good (bad data), the batch is split
//! and each outcome written alone, so one poison outcome never holds up the
//! others; one the store still refuses fails its task with the store's
//! reason instead.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::shared::{Counters, WorkerPoolSharedData};
use crate::store::{Completion, Outcome, Store, StoreError};

pub(crate) const MAX_BATCH: usize = 2000;

pub(crate) struct Completer {
    pub store: Arc<dyn Store>,
    pub shared: Arc<WorkerPoolSharedData>,
    pub rx: mpsc::UnboundedReceiver<Completion>,
}

impl Completer {
    /// Runs until every sender is gone and the channel is drained.
    pub(crate) async fn run(mut self) {
        let mut batch = Vec::with_capacity(MAX_BATCH);
        while self.rx.recv_many(&mut batch, MAX_BATCH).await > 0 {
            match self.write(&batch).await {
                Ok(()) => {}
                Err(e) => {
                    tracing::warn!(error = %e, count = batch.len(), "the store refused a batch of outcomes; writing them one by one");
                    for c in &batch {
                        self.write_alone(c.clone()).await;
                    }
                }
            }
            self.forget(&batch);
            batch.clear();
        }
    }

    /// Write `batch`, retrying while the failure may pass; `Err` when the
    /// store refused it for good.
    async fn write(&self, batch: &[Completion]) -> Result<(), StoreError> {
        let mut backoff = Duration::from_millis(50);
        loop {
            match self.store.task_complete_many(batch.to_vec()).await {
                Ok(applied) => {
                    self.count(batch, &applied);
                    self.shared.outcomes_written.notify_waiters();
                    return Ok(());
                }
                Err(e) if !e.is_transient() => return Err(e),
                Err(e) => {
                    tracing::warn!(error = %e, pending = batch.len(), "writing outcomes failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    /// Write one outcome of a refused batch; if the store refuses it too,
    /// fail its task with the store's reason (which it can take).
    async fn write_alone(&self, c: Completion) {
        let Err(e) = self.write(std::slice::from_ref(&c)).await else {
            return;
        };
        tracing::error!(task = %c.id, error = %e, "the store refused this task's outcome; failing the task");
        let failed = Completion {
            outcome: Outcome::Failed {
                error: format!("the store refused this attempt's outcome: {e}"),
            },
            ..c
        };
        if let Err(e) = self.write(std::slice::from_ref(&failed)).await {
            // Left running: the Sentinel's reconcile puts it back later.
            tracing::error!(task = %failed.id, error = %e, "the store refused the failure too");
        }
    }

    /// The outcomes of `batch` are written (or given up): their runs are no
    /// longer this node's to hold.
    fn forget(&self, batch: &[Completion]) {
        if let Ok(mut m) = self.shared.running.lock() {
            for c in batch {
                // Only this run's entry: a re-claim may hold a newer one.
                if m.get(&c.id).is_some_and(|r| r.claim_token == c.token) {
                    m.remove(&c.id);
                }
            }
        }
    }

    fn count(&self, batch: &[Completion], applied: &[bool]) {
        let c = &self.shared.counters;
        for (comp, ok) in batch.iter().zip(applied) {
            if !ok {
                Counters::add(&c.fenced, 1);
                tracing::info!(task = %comp.id, attempt = comp.attempt, "outcome not written: the attempt is no longer running here (rescued or cancelled)");
                continue;
            }
            let counter = match comp.outcome {
                Outcome::Completed { .. } => &c.completed,
                Outcome::Retry { .. } => &c.retried,
                Outcome::Failed { .. } => &c.failed,
                Outcome::Cancelled { .. } => &c.cancelled,
                Outcome::Snoozed { .. } => &c.snoozed,
                Outcome::Released => &c.released,
            };
            Counters::add(counter, 1);
        }
    }
}
