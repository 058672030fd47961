//! Progress reports of running tasks, coalesced.
//!
//! An executor may report progress as often as it likes
//! ([`TaskContext::progress`](crate::TaskContext::progress)); the reports go
//! to one writer per pool, which keeps only the latest per task and writes
//! what it holds every [`FLUSH`], in one store call for all tasks. So a task
//! costs at most a few progress writes a second however often it reports,
//! and nothing is written on the claim or completion path.
//!
//! Invariant: the writer is the only reader of the channel; reporters only
//! send. A report lands only under the claim token of the run that made it:
//! the last report of a run lands even after its outcome, one of an
//! earlier run never overwrites a later run's.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::executor::TaskError;
use crate::store::{ProgressUpdate, Store};
use crate::task::TaskId;

/// How often the writer writes what it holds.
pub const FLUSH: Duration = Duration::from_millis(250);

/// Largest progress value stored, serialized.
pub const MAX_PROGRESS_BYTES: usize = 4096;

/// Where an attempt reports its progress. Cheap to clone; the default one
/// (a context built by hand, e.g. in a test) reports nowhere.
#[derive(Clone, Default)]
pub struct ProgressReporter {
    to: Option<(mpsc::UnboundedSender<ProgressUpdate>, TaskId, i64)>,
}

impl std::fmt::Debug for ProgressReporter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ProgressReporter")
    }
}

impl ProgressReporter {
    pub(crate) fn new(tx: mpsc::UnboundedSender<ProgressUpdate>, id: TaskId, token: i64) -> Self {
        ProgressReporter {
            to: Some((tx, id, token)),
        }
    }

    /// Report `value` as the attempt's latest progress. Fails only when it
    /// does not serialize or is larger than [`MAX_PROGRESS_BYTES`].
    pub fn report(&self, value: impl Serialize) -> Result<(), TaskError> {
        let v = serde_json::to_value(value)
            .map_err(|e| TaskError::failed(format!("progress does not serialize: {e}")))?;
        let size = v.to_string().len();
        if size > MAX_PROGRESS_BYTES {
            return Err(TaskError::failed(format!(
                "progress is {size} bytes; at most {MAX_PROGRESS_BYTES} are kept"
            )));
        }
        if let Some((tx, id, token)) = &self.to {
            // The writer is gone only when the pool stopped: nothing to keep.
            let _ = tx.send(ProgressUpdate {
                id: *id,
                token: *token,
                progress: v,
            });
        }
        Ok(())
    }
}

/// The pool's progress writer (see the module docs).
pub(crate) struct ProgressWriter {
    pub store: Arc<dyn Store>,
    pub rx: mpsc::UnboundedReceiver<ProgressUpdate>,
    pub stop: CancellationToken,
    /// Its `counters.progress_writes` counts the store calls made.
    pub shared: Arc<crate::pool::WorkerPoolSharedData>,
}

impl ProgressWriter {
    pub(crate) async fn run(mut self) {
        let mut latest: HashMap<TaskId, ProgressUpdate> = HashMap::new();
        let mut tick = tokio::time::interval(FLUSH);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut batch = Vec::new();
        loop {
            tokio::select! {
                n = self.rx.recv_many(&mut batch, 1024) => {
                    for u in batch.drain(..) {
                        latest.insert(u.id, u);
                    }
                    if n == 0 {
                        break;
                    }
                }
                _ = tick.tick() => self.flush(&mut latest).await,
                _ = self.stop.cancelled() => break,
            }
        }
        // Stopping: take what is queued, write once more.
        while let Ok(u) = self.rx.try_recv() {
            latest.insert(u.id, u);
        }
        self.flush(&mut latest).await;
    }

    async fn flush(&self, latest: &mut HashMap<TaskId, ProgressUpdate>) {
        if latest.is_empty() {
            return;
        }
        let updates: Vec<ProgressUpdate> = latest.drain().map(|(_, u)| u).collect();
        crate::pool::shared::Counters::add(&self.shared.counters.progress_writes, 1);
        if let Err(e) = self.store.task_progress(updates).await {
            // Progress is advisory: a lost report is replaced by the next.
            tracing::debug!(error = %e, "progress not written");
        }
    }
}
