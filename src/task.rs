//! The task model: what a task is, the states it moves through, and the
//! options a caller sets when enqueuing one.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The id of a task: unique within one store, assigned at enqueue, never reused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(transparent)]
pub struct TaskId(pub i64);

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl FromStr for TaskId {
    type Err = std::num::ParseIntError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        s.parse().map(TaskId)
    }
}

/// Where a task is in its life cycle (see the state machine in the README).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum TaskState {
    /// Waiting for its `run_at` to arrive.
    Scheduled,
    /// Due and waiting for a free worker.
    Available,
    /// Claimed by a node and executing.
    Running,
    /// Failed an attempt and waits for its backoff before it runs again.
    Retryable,
    /// Finished successfully.
    Completed,
    /// Out of attempts (or discarded): the dead-letter list. `retry` brings it back.
    Failed,
    /// Cancelled before it finished.
    Cancelled,
    /// Waiting for the tasks it depends on.
    Blocked,
}

impl TaskState {
    /// All states, in life-cycle order.
    pub const ALL: [TaskState; 8] = [
        TaskState::Scheduled,
        TaskState::Available,
        TaskState::Running,
        TaskState::Retryable,
        TaskState::Completed,
        TaskState::Failed,
        TaskState::Cancelled,
        TaskState::Blocked,
    ];

    /// The lowercase name used in the store, the API and the CLI.
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Scheduled => "scheduled",
            TaskState::Available => "available",
            TaskState::Running => "running",
            TaskState::Retryable => "retryable",
            TaskState::Completed => "completed",
            TaskState::Failed => "failed",
            TaskState::Cancelled => "cancelled",
            TaskState::Blocked => "blocked",
        }
    }

    /// A final state: the task will not run again unless retried by hand.
    pub fn is_finished(self) -> bool {
        matches!(
            self,
            TaskState::Completed | TaskState::Failed | TaskState::Cancelled
        )
    }
}

impl fmt::Display for TaskState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The error returned when a string names no [`TaskState`].
#[derive(Debug, Clone, thiserror::Error)]
#[error(
    "unknown task state {0:?} (expected one of scheduled, available, running, retryable, completed, failed, cancelled, blocked)"
)]
pub struct UnknownState(pub String);

impl FromStr for TaskState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        TaskState::ALL
            .into_iter()
            .find(|st| st.as_str() == s)
            .ok_or_else(|| UnknownState(s.to_string()))
    }
}

/// One failed attempt, kept on the task.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct AttemptError {
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub message: String,
}

/// A task as stored. This is also its JSON shape in the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct Task {
    pub id: TaskId,
    pub kind: String,
    pub args: serde_json::Value,
    pub queue: String,
    pub priority: i16,
    pub state: TaskState,
    /// How many times the task has been started; the fencing token of the
    /// current run (a completion is written only for the attempt that is running).
    pub attempt: i32,
    pub max_attempts: i32,
    pub run_at: DateTime<Utc>,
    pub created_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// The node that ran (or runs) the latest attempt.
    pub node: Option<String>,
    pub result: Option<serde_json::Value>,
    pub errors: Vec<AttemptError>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unique_key: Option<String>,
    /// The tasks this one waits for (it is `blocked` until they all complete).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub depends_on: Vec<TaskId>,
    /// Tasks sharing a key count together against their queue's `per_key_concurrency`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub concurrency_key: Option<String>,
    /// The fencing token of the current (or last) run: every claim gives a
    /// larger one, and an outcome lands only under the token it was claimed
    /// with. Unlike `attempt`, a snooze or release never gives it back.
    #[serde(default)]
    pub claim_token: i64,
    /// The name the task was given in its batch (`ref`), under which the
    /// tasks that depend on it read its result.
    #[serde(default, rename = "ref", skip_serializing_if = "Option::is_none")]
    pub reference: Option<String>,
    /// The latest progress its executor reported (`ctx.progress`, or a
    /// `shell` program's `::progress <json>` lines), kept after it ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub progress: Option<serde_json::Value>,
    /// Labels to find the task by (`GET /api/v1/tasks?tag=...`), at most
    /// [`MAX_TAGS`]; in the order given, without repeats.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// The W3C trace context of the enqueue (see [`crate::telemetry`]):
    /// every attempt's `task.execute` span continues it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub traceparent: Option<String>,
}

/// A task a new task waits for: one that exists, or another task of the
/// same batch (by its position in the batch).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dependency {
    Task(TaskId),
    Batch(usize),
}

/// What happens to a blocked task when a task it depends on fails for good
/// (or is cancelled): it is cancelled (default) or failed, and so are the
/// tasks that depend on it in turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OnDependencyFailure {
    #[default]
    Cancel,
    Fail,
}

impl OnDependencyFailure {
    pub fn as_str(self) -> &'static str {
        match self {
            OnDependencyFailure::Cancel => "cancel",
            OnDependencyFailure::Fail => "fail",
        }
    }
}

/// What an enqueue with a `unique_key` does when a task holds the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum OnConflict {
    /// Insert nothing; the answer is the task that holds the key.
    #[default]
    Keep,
    /// Debounce: a holder that has not started takes the new args, run_at
    /// and priority (and is the answer); a running one is left alone, gives
    /// the key up, and the new task is queued after it. A finished holder
    /// (see `unique_states`) is kept as with `Keep`.
    Replace,
    /// Refuse the enqueue ([`StoreError::Duplicate`](crate::StoreError::Duplicate), HTTP 409).
    Error,
}

impl OnConflict {
    pub fn as_str(self) -> &'static str {
        match self {
            OnConflict::Keep => "keep",
            OnConflict::Replace => "replace",
            OnConflict::Error => "error",
        }
    }
}

/// The states every `unique_states` includes: a task moves between them
/// on its own (claims, retries, snoozes), so a key one of them did not hold
/// could be taken twice behind the enqueuer's back.
pub const UNIQUE_STATES_REQUIRED: [TaskState; 5] = [
    TaskState::Scheduled,
    TaskState::Available,
    TaskState::Running,
    TaskState::Retryable,
    TaskState::Blocked,
];

/// Lowest and highest priority. 0 runs first (as in Oban and River).
pub const PRIORITY_MIN: i16 = 0;
/// See [`PRIORITY_MIN`].
pub const PRIORITY_MAX: i16 = 9;
/// The most tags a task may carry.
pub const MAX_TAGS: usize = 16;
/// The queue a task goes to when neither the caller nor its kind names one.
pub const DEFAULT_QUEUE: &str = "default";
/// Attempts a task gets when neither the caller nor its kind says otherwise.
pub const DEFAULT_MAX_ATTEMPTS: i32 = 25;

/// What a caller asks for when enqueuing. Fields left `None` take the
/// defaults registered for the kind, then the built-in ones.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TaskOptions {
    pub queue: Option<String>,
    pub priority: Option<i16>,
    /// Run no earlier than this instant.
    pub run_at: Option<DateTime<Utc>>,
    /// Run no earlier than now + delay (ignored when `run_at` is set).
    #[serde(skip)]
    pub delay: Option<Duration>,
    pub max_attempts: Option<i32>,
    #[serde(skip)]
    pub timeout: Option<Duration>,
    /// While a task of the same kind with this key is unfinished, enqueuing
    /// the same key returns that task instead of creating another (see
    /// `unique_states`, `unique_for` and `on_conflict` for other rules).
    pub unique_key: Option<String>,
    /// The states whose tasks hold `unique_key`: always every unfinished
    /// state ([`UNIQUE_STATES_REQUIRED`]), plus any of `completed`, `failed`
    /// and `cancelled` (then a finished task still holds its key, for
    /// `unique_for` if set, else until it is pruned). Default: the
    /// unfinished states; with `unique_for` alone, also `completed`.
    pub unique_states: Option<Vec<TaskState>>,
    /// A finished holder (one of the finished `unique_states`) counts for
    /// this long after it finished.
    #[serde(skip)]
    pub unique_for: Option<Duration>,
    /// What happens when a task holds `unique_key`; see [`OnConflict`].
    #[serde(default)]
    pub on_conflict: OnConflict,
    /// Tasks to wait for; see [`Dependency`].
    #[serde(skip)]
    pub depends_on: Vec<Dependency>,
    /// See [`OnDependencyFailure`].
    #[serde(skip)]
    pub on_dependency_failure: OnDependencyFailure,
    /// Group for the queue's `per_key_concurrency` (e.g. one customer).
    pub concurrency_key: Option<String>,
    /// A name for this task in its batch: other tasks of the batch wait for
    /// it with [`TaskOptions::depends_on_ref`], and read its result with
    /// `ctx.parent("name")`. Kept on the task (`ref` in its JSON).
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    /// Tasks of the same batch to wait for, by their `reference`.
    #[serde(skip)]
    pub depends_on_refs: Vec<String>,
    /// Labels to find the task by, at most [`MAX_TAGS`] (a repeat is dropped).
    #[serde(default)]
    pub tags: Vec<String>,
    /// A W3C `traceparent` the enqueue continues (e.g. from an incoming
    /// request's header). The enqueue span becomes its child when an
    /// OpenTelemetry layer is installed; else it is stored as given.
    #[serde(skip)]
    pub traceparent: Option<String>,
}

impl TaskOptions {
    pub fn queue(mut self, q: impl Into<String>) -> Self {
        self.queue = Some(q.into());
        self
    }
    pub fn priority(mut self, p: i16) -> Self {
        self.priority = Some(p);
        self
    }
    pub fn run_at(mut self, at: DateTime<Utc>) -> Self {
        self.run_at = Some(at);
        self
    }
    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = Some(d);
        self
    }
    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }
    pub fn unique_key(mut self, k: impl Into<String>) -> Self {
        self.unique_key = Some(k.into());
        self
    }
    /// See [`TaskOptions::unique_states`].
    pub fn unique_states(mut self, states: impl IntoIterator<Item = TaskState>) -> Self {
        self.unique_states = Some(states.into_iter().collect());
        self
    }
    /// See [`TaskOptions::unique_for`].
    pub fn unique_for(mut self, d: Duration) -> Self {
        self.unique_for = Some(d);
        self
    }
    /// See [`OnConflict`].
    pub fn on_conflict(mut self, c: OnConflict) -> Self {
        self.on_conflict = c;
        self
    }
    /// Wait for `dep` to complete before running.
    pub fn depends_on(mut self, dep: Dependency) -> Self {
        self.depends_on.push(dep);
        self
    }
    pub fn concurrency_key(mut self, k: impl Into<String>) -> Self {
        self.concurrency_key = Some(k.into());
        self
    }
    /// Name this task in its batch (see [`TaskOptions::reference`]).
    pub fn reference(mut self, name: impl Into<String>) -> Self {
        self.reference = Some(name.into());
        self
    }
    /// Wait for the task of the same batch named `name`.
    pub fn depends_on_ref(mut self, name: impl Into<String>) -> Self {
        self.depends_on_refs.push(name.into());
        self
    }
    /// Add a label to find the task by (see [`TaskOptions::tags`]).
    /// Continue the trace `traceparent` (W3C, `00-<trace>-<span>-<flags>`).
    pub fn traceparent(mut self, tp: impl Into<String>) -> Self {
        self.traceparent = Some(tp.into());
        self
    }

    pub fn tag(mut self, t: impl Into<String>) -> Self {
        self.tags.push(t.into());
        self
    }
    pub fn on_dependency_failure(mut self, p: OnDependencyFailure) -> Self {
        self.on_dependency_failure = p;
        self
    }
}

/// A task to enqueue: a kind, its JSON args and options.
#[derive(Debug, Clone, PartialEq)]
pub struct NewTask {
    pub kind: String,
    pub args: serde_json::Value,
    pub options: TaskOptions,
    /// The kind's defaults, used when the enqueuing client's registry does
    /// not register the kind (set by [`NewTask::typed`]).
    pub defaults: Option<crate::registry::KindDefaults>,
}

impl NewTask {
    pub fn new(kind: impl Into<String>, args: serde_json::Value) -> Self {
        NewTask {
            kind: kind.into(),
            args,
            options: TaskOptions::default(),
            defaults: None,
        }
    }
    pub fn with(mut self, options: TaskOptions) -> Self {
        self.options = options;
        self
    }
}
