//! The completer: writes attempt outcomes to the store in batches.
//!
//! Slots hand outcomes over an unbounded channel and move on; the completer
//! takes everything waiting (up to `MAX_BATCH`) and writes it with one
//! store call. When the store fails, the batch is kept and retried with
//! backoff: outcomes are never dropped while the node runs (a task whose
//! outcome is lost would run again, which at-least-once allows but we avoid).

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;

use super::shared::{Counters, WorkerPoolSharedData};
use crate::store::{Completion, Outcome, Store};

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
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.store.task_complete_many(batch.clone()).await {
                    Ok(applied) => {
                        self.count(&batch, &applied);
                        self.shared.outcomes_written.notify_waiters();
                        if let Ok(mut m) = self.shared.running.lock() {
                            for c in &batch {
                                // Only this attempt's entry: a re-claim may hold a newer one.
                                if m.get(&c.id).is_some_and(|r| r.attempt == c.attempt) {
                                    m.remove(&c.id);
                                }
                            }
                        }
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, pending = batch.len(), "writing outcomes failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            batch.clear();
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
