//! The code that runs one kind of task.
//!
//! Implement [`TaskExecutor`] (or wrap an async closure with [`executor_fn`])
//! and register it in a [`TaskRegistry`](crate::TaskRegistry) under a kind.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::task::TaskId;

/// What an executor knows about the attempt it runs.
#[derive(Debug, Clone)]
pub struct TaskContext {
    pub id: TaskId,
    pub kind: String,
    pub queue: String,
    pub args: serde_json::Value,
    /// 1 on the first run, 2 on the first retry, ...
    pub attempt: i32,
    pub max_attempts: i32,
    pub created_at: DateTime<Utc>,
    /// Fires when the task is cancelled, times out, or the node shuts down.
    /// Long-running executors should `select!` on it and return early.
    pub cancel: CancellationToken,
    /// When the attempt times out, if it has a timeout; moved later by
    /// [`TaskContext::extend`]. Read it with [`TaskContext::deadline`].
    pub(crate) deadline: Option<Arc<Deadline>>,
    /// The results of the tasks this one depends on (all completed), by id.
    pub parent_results: std::collections::BTreeMap<TaskId, serde_json::Value>,
    /// The same, by the `ref` names the parents were given in their batch
    /// (those without one are only in `parent_results`); see [`TaskContext::parent`].
    pub parent_results_by_ref: std::collections::BTreeMap<String, serde_json::Value>,
    /// Where [`TaskContext::progress`] sends reports.
    pub reporter: crate::pool::progress::ProgressReporter,
    /// State shared by every executor of the pool (given to
    /// [`Builder::data`](crate::Builder::data)); read it with [`TaskContext::data`].
    pub shared: SharedData,
    /// The W3C trace context to pass on to what this attempt calls: the
    /// attempt's `task.execute` span under an OpenTelemetry layer, else the
    /// task's stored `traceparent` (the built-in `http` executor sends it
    /// as the `traceparent` header, `shell` as `TRACEPARENT`).
    pub traceparent: Option<String>,
}

/// The longest an attempt may run when its kind sets no
/// [`max_run`](crate::KindDefaults::max_run): how far
/// [`TaskContext::extend`] may move its deadline (from its start).
pub const DEFAULT_MAX_RUN: Duration = Duration::from_secs(24 * 3600);

/// The deadline of a running attempt that has a timeout. The slot running
/// the attempt sleeps until it and then reads it again; the Sentinel reads
/// it to tell a hung slot from a long task. Only the attempt's executor
/// moves it ([`TaskContext::extend`]), and only later, never past `limit`,
/// so a reader that saw an earlier value at worst wakes early and reads
/// again.
#[derive(Debug)]
pub struct Deadline {
    at: std::sync::Mutex<Instant>,
    /// The attempt's start plus its kind's `max_run` (at least its timeout).
    limit: Instant,
}

impl Deadline {
    /// The deadline of an attempt started at `started` with `timeout`,
    /// movable up to `started + max_run`.
    pub(crate) fn new(started: Instant, timeout: Duration, max_run: Duration) -> Self {
        let at = started + timeout;
        Deadline {
            at: std::sync::Mutex::new(at),
            limit: (started + max_run).max(at),
        }
    }

    /// When the attempt times out now.
    pub fn at(&self) -> Instant {
        self.at.lock().map(|g| *g).unwrap_or(self.limit)
    }

    /// The latest instant the deadline can move to.
    pub fn limit(&self) -> Instant {
        self.limit
    }

    /// Move the deadline to `now + d` (never earlier than it is, never past
    /// `limit`); the deadline it is then.
    pub(crate) fn extend(&self, d: Duration) -> Instant {
        let want = Instant::now()
            .checked_add(d)
            .unwrap_or(self.limit)
            .min(self.limit);
        match self.at.lock() {
            Ok(mut at) => {
                if want > *at {
                    *at = want;
                }
                *at
            }
            Err(_) => self.limit,
        }
    }
}

/// Values shared by every executor of a pool, one per type: a database
/// pool, an HTTP client, settings. Cheap to clone.
#[derive(Clone, Default)]
pub struct SharedData(
    Arc<std::collections::HashMap<std::any::TypeId, Arc<dyn std::any::Any + Send + Sync>>>,
);

impl std::fmt::Debug for SharedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SharedData({} values)", self.0.len())
    }
}

impl SharedData {
    /// Add `value`, replacing an earlier value of the same type.
    pub fn insert<T: Send + Sync + 'static>(&mut self, value: T) {
        Arc::make_mut(&mut self.0).insert(std::any::TypeId::of::<T>(), Arc::new(value));
    }

    /// The value of type `T`, if one was given.
    pub fn get<T: Send + Sync + 'static>(&self) -> Option<Arc<T>> {
        self.0
            .get(&std::any::TypeId::of::<T>())
            .cloned()
            .and_then(|v| v.downcast::<T>().ok())
    }
}

impl TaskContext {
    /// Decode the args into `T`; a mismatch becomes a [`TaskError::Discard`]
    /// (retrying will not fix bad args) naming the task and what was wrong.
    pub fn args<T: DeserializeOwned>(&self) -> Result<T, TaskError> {
        serde_json::from_value(self.args.clone()).map_err(|e| {
            TaskError::Discard(format!(
                "task {} ({}): args do not decode: {e}",
                self.id, self.kind
            ))
        })
    }

    /// The shared value of type `T` given to [`Builder::data`](crate::Builder::data).
    /// Missing, it fails the attempt with a message naming the type (a
    /// wiring mistake, so it shows on the first task).
    ///
    /// ```
    /// use proto_tasker::{executor_fn, TaskError};
    /// struct Mailer { from: String }
    /// let send = executor_fn(|ctx| async move {
    ///     let mailer = ctx.data::<Mailer>()?;
    ///     Ok::<_, TaskError>(serde_json::json!(mailer.from.clone()))
    /// });
    /// // Builder::new(store, registry).data(Mailer { from: "noreply@example.com".into() })
    /// # let _ = send;
    /// ```
    pub fn data<T: Send + Sync + 'static>(&self) -> Result<Arc<T>, TaskError> {
        self.shared.get::<T>().ok_or_else(|| {
            TaskError::Failed(format!(
                "no shared value of type {} was given to the pool (Builder::data)",
                std::any::type_name::<T>()
            ))
        })
    }

    /// The result of the parent named `name` in the batch
    /// ([`TaskOptions::reference`](crate::TaskOptions::reference)), decoded
    /// into `T`. A parent of that name that is missing, or whose result does
    /// not decode, fails the attempt saying which.
    pub fn parent<T: DeserializeOwned>(&self, name: &str) -> Result<T, TaskError> {
        let v = self.parent_results_by_ref.get(name).ok_or_else(|| {
            TaskError::Failed(format!(
                "task {} has no parent named {name:?} (it has: {})",
                self.id,
                self.parent_results_by_ref
                    .keys()
                    .map(String::as_str)
                    .collect::<Vec<_>>()
                    .join(", ")
            ))
        })?;
        serde_json::from_value(v.clone()).map_err(|e| {
            TaskError::Failed(format!(
                "task {}: the result of parent {name:?} does not decode: {e}",
                self.id
            ))
        })
    }

    /// Report the attempt's progress (any JSON up to 4 KiB, e.g.
    /// `{"pct": 40, "step": "resize"}`): stored as the task's `progress`,
    /// the latest value winning. Call it as often as you like; the pool
    /// writes at most four times a second per task, off the claim path.
    pub fn progress(&self, value: impl serde::Serialize) -> Result<(), TaskError> {
        self.reporter.report(value)
    }

    /// When the attempt times out (`None`: it has no timeout). It moves
    /// with [`TaskContext::extend`].
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline.as_ref().map(|d| d.at())
    }

    /// Keep a long attempt alive: its deadline moves to now + `d` (it never
    /// moves earlier), up to its start plus the kind's
    /// [`max_run`](crate::KindDefaults::max_run) ([`DEFAULT_MAX_RUN`] when
    /// unset). Call it as the work goes on (a heartbeat); while it does,
    /// the attempt is neither timed out nor taken for a hung worker.
    /// Returns the deadline now (`None` for an attempt without a timeout,
    /// which has nothing to move); a deadline short of now + `d` means the
    /// attempt reached its `max_run`.
    pub fn extend(&self, d: Duration) -> Option<Instant> {
        self.deadline.as_ref().map(|dl| {
            let at = dl.extend(d);
            if at < Instant::now() + d {
                tracing::warn!(task = %self.id, kind = %self.kind, "extend capped: the attempt reached its kind's max_run");
            }
            at
        })
    }

    /// True once the task was asked to stop.
    pub fn is_cancelled(&self) -> bool {
        self.cancel.is_cancelled()
    }
}

/// Why an attempt did not succeed.
///
/// Any error converts into it with `?` (as [`TaskError::Failed`], its
/// message the error's chain of causes), so an executor can write
/// `let v: Order = serde_json::from_value(raw)?;` or `file.read_to_string(&mut s)?`.
/// For that, `TaskError` is not itself a [`std::error::Error`] (as
/// `anyhow::Error` is not); it displays as its message.
#[derive(Debug, Clone, PartialEq)]
pub enum TaskError {
    /// Fails this attempt; the task is retried with backoff while attempts remain.
    Failed(String),
    /// Fails the task for good, whatever attempts remain (e.g. bad args).
    Discard(String),
    /// Not a failure: run the task again after this delay without using up an attempt.
    Snooze(Duration),
}

impl std::fmt::Display for TaskError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TaskError::Failed(m) | TaskError::Discard(m) => f.write_str(m),
            TaskError::Snooze(d) => write!(f, "snoozed for {d:?}"),
        }
    }
}

impl<E: std::error::Error> From<E> for TaskError {
    /// A failed attempt (retried while attempts remain) whose message is
    /// `e` and its causes, `outer: inner: innermost`.
    fn from(e: E) -> Self {
        let mut msg = e.to_string();
        let mut cause = e.source();
        while let Some(c) = cause {
            msg.push_str(": ");
            msg.push_str(&c.to_string());
            cause = c.source();
        }
        TaskError::Failed(msg)
    }
}

impl TaskError {
    pub fn failed(msg: impl Into<String>) -> Self {
        TaskError::Failed(msg.into())
    }
    pub fn discard(msg: impl Into<String>) -> Self {
        TaskError::Discard(msg.into())
    }
}

/// The output of a successful attempt: any JSON (stored as the task's result).
pub type TaskOutput = serde_json::Value;

/// Why an executor refused a task's args at enqueue time.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ArgsError {
    /// Where in the task the problem is, e.g. `args.cmd`.
    pub field: String,
    pub message: String,
}

impl ArgsError {
    pub fn new(field: impl Into<String>, message: impl Into<String>) -> Self {
        ArgsError {
            field: field.into(),
            message: message.into(),
        }
    }
}

/// Runs tasks of one kind. Shared by every worker of a node, so it must be
/// `Send + Sync`; per-attempt state belongs in the future, not in `self`.
#[async_trait]
pub trait TaskExecutor: Send + Sync + 'static {
    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError>;

    /// Check args when a task is enqueued, so bad input is refused at the
    /// door instead of failing later. The default accepts anything.
    fn check_args(&self, _args: &serde_json::Value) -> Result<(), ArgsError> {
        Ok(())
    }
}

/// An executor made from an async function or closure.
pub struct FnExecutor<F>(F);

impl<F> std::fmt::Debug for FnExecutor<F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("FnExecutor")
    }
}

#[async_trait]
impl<F, Fut> TaskExecutor for FnExecutor<F>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TaskOutput, TaskError>> + Send + 'static,
{
    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        (self.0)(ctx).await
    }
}

/// Wrap `async fn(TaskContext) -> Result<TaskOutput, TaskError>` as an executor.
///
/// ```
/// use proto_tasker::{executor_fn, TaskError};
/// let hello = executor_fn(|ctx| async move {
///     let name: String = ctx.args()?;
///     Ok::<_, TaskError>(serde_json::json!(format!("hello {name}")))
/// });
/// # let _ = hello;
/// ```
pub fn executor_fn<F, Fut>(f: F) -> Arc<dyn TaskExecutor>
where
    F: Fn(TaskContext) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<TaskOutput, TaskError>> + Send + 'static,
{
    Arc::new(FnExecutor(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Outer(std::io::Error);
    impl std::fmt::Display for Outer {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("reading the order")
        }
    }
    impl std::error::Error for Outer {
        fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
            Some(&self.0)
        }
    }

    fn parse(raw: &str) -> Result<i64, TaskError> {
        Ok(serde_json::from_str::<i64>(raw)?)
    }

    fn read() -> Result<(), TaskError> {
        Err(Outer(std::io::Error::other("disk on fire")))?
    }

    #[test]
    fn any_error_becomes_a_failed_attempt_with_its_causes() {
        assert_eq!(parse("42"), Ok(42));
        match parse("forty-two") {
            Err(TaskError::Failed(m)) => assert!(m.contains("line 1 column"), "{m}"),
            other => panic!("{other:?}"),
        }
        assert_eq!(
            read(),
            Err(TaskError::Failed("reading the order: disk on fire".into()))
        );
        assert_eq!(
            TaskError::Snooze(Duration::from_secs(1)).to_string(),
            "snoozed for 1s"
        );
        assert_eq!(TaskError::discard("bad args").to_string(), "bad args");
    }
}
