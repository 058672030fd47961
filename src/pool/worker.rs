//! Worker slots: where claimed tasks run.
//!
//! A slot is a tokio task that takes claimed tasks from its queue's dispatch
//! channel one at a time and runs each through a [`Worker`]. The slot owns
//! what surrounds the executor: the timeout, catching a panic, turning the
//! result into an [`Outcome`], handing it to the completer, and only then
//! giving its queue capacity back.
//!
//! A slot whose executor panicked reports the failed attempt and then ends;
//! the [`Sentinel`](crate::Sentinel) sees it and starts a fresh slot in its
//! place, so the pool keeps its worker count.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use futures::FutureExt;
use tokio::sync::{OwnedSemaphorePermit, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::shared::{BusyInfo, RunningTask, StopReason, WorkerPoolSharedData};
use crate::executor::{TaskContext, TaskError, TaskOutput};
use crate::registry::TaskRegistry;
use crate::store::{Completion, Outcome};
use crate::task::Task;

/// One execution slot: runs one attempt at a time.
#[async_trait]
pub trait Worker: Send + Sync + 'static {
    /// Run one attempt. A panic in here is caught by the slot, fails the
    /// attempt with the panic message, and gets the worker replaced.
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError>;
}

/// Runs executors from a [`TaskRegistry`] in this process, on tokio.
#[derive(Debug, Clone)]
pub struct LocalWorker {
    registry: Arc<TaskRegistry>,
}

impl LocalWorker {
    pub fn new(registry: Arc<TaskRegistry>) -> Self {
        LocalWorker { registry }
    }
}

#[async_trait]
impl Worker for LocalWorker {
    async fn run(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        match self.registry.executor(&ctx.kind) {
            Some(executor) => executor.execute(ctx).await,
            None => Err(TaskError::Failed(format!(
                "no executor is registered for kind {:?} on this node",
                ctx.kind
            ))),
        }
    }
}

/// A claimed task on its way to a slot, with the queue capacity it holds.
pub(crate) struct Job {
    pub task: Task,
    pub permit: OwnedSemaphorePermit,
}

/// Everything a slot needs; cloned for each replacement.
#[derive(Clone)]
pub(crate) struct SlotCtx {
    pub id: usize,
    pub max_result_bytes: usize,
    pub store: Arc<dyn crate::store::Store>,
    pub worker: Arc<dyn Worker>,
    pub jobs: async_channel::Receiver<Job>,
    pub shared: Arc<WorkerPoolSharedData>,
    pub registry: Arc<TaskRegistry>,
    pub completions: mpsc::UnboundedSender<Completion>,
    /// To the pool's progress writer.
    pub progress: mpsc::UnboundedSender<crate::store::ProgressUpdate>,
}

/// How the executor call ended, before policy turns it into an [`Outcome`].
enum Ran {
    Returned(Result<TaskOutput, TaskError>),
    Panicked(String),
    TimedOut(Duration),
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = payload.downcast_ref::<&str>() {
        s.to_string()
    } else if let Some(s) = payload.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    }
}

/// Turn how an attempt ended into what the store should record.
fn decide(task: &Task, ran: Ran, reason: StopReason, registry: &TaskRegistry) -> Outcome {
    let now = Utc::now();
    let (message, discard) = match ran {
        Ran::Returned(Ok(result)) => return Outcome::Completed { result },
        // Asked to stop while it snoozed: the cancel wins (cancel is final).
        Ran::Returned(Err(TaskError::Snooze(_))) if reason == StopReason::Cancelled => {
            ("snoozed".to_string(), false)
        }
        Ran::Returned(Err(TaskError::Snooze(d))) => {
            return Outcome::Snoozed {
                run_at: crate::store::lifecycle::after(now, d),
            };
        }
        Ran::Returned(Err(TaskError::Failed(m))) => (m, false),
        Ran::Returned(Err(TaskError::Discard(m))) => (m, true),
        Ran::Panicked(m) => (format!("executor panicked: {m}"), false),
        Ran::TimedOut(d) => (format!("timed out after {}ms", d.as_millis()), false),
    };
    match reason {
        StopReason::Cancelled => Outcome::Cancelled {
            error: format!("cancelled: {message}"),
        },
        StopReason::Shutdown => Outcome::Released,
        // The node's trouble, maybe caused by this very task (a CPU hog that
        // starves the heartbeat): the attempt counts, as in a rescue, so such
        // a task runs out of attempts instead of running forever, and it may
        // run again at once, as a rescued task does.
        StopReason::LeaseLost => {
            let error = format!(
                "stopped: this node lost its lease (no heartbeat confirmed in time): {message}"
            );
            if task.attempt >= task.max_attempts {
                Outcome::Failed { error }
            } else {
                Outcome::Retry { run_at: now, error }
            }
        }
        StopReason::None | StopReason::Timeout => {
            if discard || task.attempt >= task.max_attempts {
                Outcome::Failed { error: message }
            } else {
                let delay = registry.retry_policy(&task.kind).backoff(task.attempt);
                Outcome::Retry {
                    run_at: crate::store::lifecycle::after(now, delay),
                    error: message,
                }
            }
        }
    }
}

/// Results of the task's parents by id, and by the `ref` names of those
/// that have one (empty without dependencies). A parent that cannot be read
/// is left out; the executor sees which ones it got.
async fn parent_results(
    ctx: &SlotCtx,
    task: &Task,
) -> (
    std::collections::BTreeMap<crate::task::TaskId, serde_json::Value>,
    std::collections::BTreeMap<String, serde_json::Value>,
) {
    let mut out = std::collections::BTreeMap::new();
    let mut by_ref = std::collections::BTreeMap::new();
    for p in &task.depends_on {
        match ctx.store.task_get(*p).await {
            Ok(Some(parent)) => {
                let result = parent.result.unwrap_or(serde_json::Value::Null);
                if let Some(name) = parent.reference {
                    by_ref.insert(name, result.clone());
                }
                out.insert(*p, result);
            }
            Ok(None) => {}
            Err(e) => {
                tracing::warn!(task = %task.id, parent = %p, error = %e, "cannot read a parent's result")
            }
        }
    }
    (out, by_ref)
}

/// The slot loop. Returns when the dispatch channel closes (shutdown) or
/// after an executor panicked (the Sentinel then replaces the slot).
pub(crate) async fn run_slot(ctx: SlotCtx) {
    let shared = &ctx.shared;
    let Some(status) = shared.slot(ctx.id) else {
        return;
    };
    while let Ok(Job { task, permit }) = ctx.jobs.recv().await {
        if shared.stop_claiming.is_cancelled()
            || shared.fenced.load(std::sync::atomic::Ordering::Acquire)
        {
            // Claimed just before shutdown began, or before this node lost
            // its lease (others may run it now): give it back unstarted.
            let _ = ctx
                .completions
                .send(Completion::of(&task, Utc::now(), Outcome::Released));
            drop(permit);
            continue;
        }
        let token = CancellationToken::new();
        let running = Arc::new(RunningTask::new(task.claim_token, token.clone()));
        if let Ok(mut m) = shared.running.lock() {
            m.insert(task.id, running.clone());
        }
        let timeout = task
            .timeout_ms
            .filter(|ms| *ms > 0)
            .map(|ms| Duration::from_millis(ms as u64));
        let started = Instant::now();
        let deadline = timeout.map(|d| {
            Arc::new(crate::executor::Deadline::new(
                started,
                d,
                ctx.registry.max_run(&task.kind),
            ))
        });
        if let Ok(mut s) = status.lock() {
            s.busy = Some(BusyInfo {
                task: task.id,
                kind: task.kind.clone(),
                attempt: task.attempt,
                claim_token: task.claim_token,
                max_attempts: task.max_attempts,
                since: started,
                deadline: deadline.clone(),
            });
            s.permit = Some(permit);
        }
        if let Some(o) = &shared.observer {
            let due = task.run_at.max(task.created_at);
            let wait = (Utc::now() - due).to_std().unwrap_or_default();
            o.task_started(&task, wait);
        }
        // Each attempt's span continues the enqueue's trace (see
        // `crate::telemetry`), on whichever node runs it.
        let span = tracing::info_span!(
            "task.execute",
            otel.kind = "consumer",
            task.id = task.id.0,
            task.kind = %task.kind,
            task.queue = %task.queue,
            task.attempt = task.attempt,
            task.outcome = tracing::field::Empty,
            otel.status_code = tracing::field::Empty,
        );
        crate::telemetry::continue_trace(&span, task.traceparent.as_deref());
        let traceparent =
            crate::telemetry::traceparent_of(&span).or_else(|| task.traceparent.clone());
        let (parent_results, parent_results_by_ref) = parent_results(&ctx, &task).await;
        let tctx = TaskContext {
            id: task.id,
            kind: task.kind.clone(),
            queue: task.queue.clone(),
            args: task.args.clone(),
            attempt: task.attempt,
            max_attempts: task.max_attempts,
            created_at: task.created_at,
            cancel: token,
            deadline: deadline.clone(),
            parent_results,
            parent_results_by_ref,
            shared: ctx.registry.shared().clone(),
            reporter: crate::pool::progress::ProgressReporter::new(
                ctx.progress.clone(),
                task.id,
                task.claim_token,
            ),
            traceparent,
        };
        let call = AssertUnwindSafe(ctx.worker.run(tctx).instrument(span.clone())).catch_unwind();
        let caught = match &deadline {
            // Sleep to the deadline, then read it again: `ctx.extend` may
            // have moved it (only ever later) meanwhile.
            Some(dl) => {
                let mut call = std::pin::pin!(call);
                loop {
                    tokio::select! {
                        r = &mut call => break Some(r),
                        _ = tokio::time::sleep_until(dl.at()) => {
                            if Instant::now() >= dl.at() {
                                break None;
                            }
                        }
                    }
                }
            }
            None => Some(call.await),
        };
        let ran = match caught {
            Some(Ok(r)) => Ran::Returned(r),
            Some(Err(payload)) => Ran::Panicked(panic_message(payload.as_ref())),
            None => {
                // The executor future was dropped by the select: it is stopped.
                running.stop(StopReason::Timeout);
                crate::pool::shared::Counters::add(&shared.counters.timeouts, 1);
                Ran::TimedOut(
                    deadline
                        .as_ref()
                        .map(|d| d.at() - started)
                        .unwrap_or_default(),
                )
            }
        };
        let panicked = matches!(ran, Ran::Panicked(_));
        let mut outcome = decide(&task, ran, running.reason(), &ctx.registry);
        if let Outcome::Completed { result } = &outcome {
            let size = serde_json::to_vec(result)
                .map(|v| v.len())
                .unwrap_or(usize::MAX);
            if size > ctx.max_result_bytes {
                outcome = Outcome::Failed {
                    error: format!(
                        "the result is {size} bytes; the limit is {} (pool.max_result_bytes)",
                        ctx.max_result_bytes
                    ),
                };
            }
        }
        span.record("task.outcome", outcome.name());
        // The error itself is in the span's event below.
        if let Outcome::Retry { .. } | Outcome::Failed { .. } = &outcome {
            span.record("otel.status_code", "ERROR");
        }
        span.in_scope(|| match &outcome {
            Outcome::Completed { .. } => tracing::debug!("completed"),
            Outcome::Retry { error, run_at } => {
                tracing::info!(%error, %run_at, "attempt failed; will retry")
            }
            Outcome::Failed { error } => tracing::warn!(%error, "task failed"),
            Outcome::Cancelled { .. } => tracing::info!("cancelled"),
            Outcome::Snoozed { run_at } => tracing::debug!(%run_at, "snoozed"),
            Outcome::Released => tracing::info!("released at shutdown"),
        });
        if let Some(o) = &shared.observer {
            o.task_finished(&task, &outcome, started.elapsed());
        }
        // The task stays in `running` until the completer has written its
        // outcome, so the Sentinel's reconcile never puts it back meanwhile.
        let _ = ctx
            .completions
            .send(Completion::of(&task, Utc::now(), outcome));
        // The outcome is queued: only now is the capacity given back.
        let permit = status.lock().ok().and_then(|mut s| {
            s.busy = None;
            if panicked {
                s.panicked = true;
            }
            s.permit.take()
        });
        drop(permit);
        if panicked {
            crate::pool::shared::Counters::add(&shared.counters.panics, 1);
            if let Some(o) = &shared.observer {
                o.worker_panicked();
            }
            tracing::warn!(slot = ctx.id, task = %task.id, "worker's executor panicked; the Sentinel replaces the worker");
            return;
        }
    }
}
