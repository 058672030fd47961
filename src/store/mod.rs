//! The persistence seam.
//!
//! # Overview
//!
//! Everything a node knows about tasks, nodes and leadership lives in a
//! [`Store`]. [`SqliteStore`] is the embedded default (one machine, one
//! file); the PostgreSQL store shares one database between many nodes.
//! Both pass the same conformance suite (`tests/store_conformance.rs`).
//!
//! # Invariants every store keeps
//!
//! - An insert that returned `Ok` is committed (durable).
//! - A task is claimed by at most one claimer per attempt: claiming moves it
//!   to `running` and increments `attempt` in the same statement.
//! - A completion is applied only while the task is `running` with the same
//!   `attempt` it was claimed with (the attempt is the fencing token), so a
//!   node that lost a task to a rescue cannot overwrite the re-run's outcome.
//! - While a task with a `unique_key` is unfinished, no second unfinished task
//!   with that key exists.
//!
//! Methods take `now` in their params instead of reading the clock, so the
//! conformance suite can drive time by hand.

pub mod postgres;
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, broadcast};

pub use postgres::{PostgresOptions, PostgresStore};
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};

use crate::task::{Dependency, OnDependencyFailure, Task, TaskId, TaskState};

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or answered with an error that is not the
    /// caller's fault (I/O, lock, corrupt file, lost connection).
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// The schema is newer than this binary understands, or missing.
    #[error("store schema: {0}")]
    Schema(String),
    /// No such task.
    #[error("task {0} not found")]
    NotFound(TaskId),
    /// The task exists but is in a state that forbids the operation.
    #[error("task {id} is {state}: {message}")]
    Conflict {
        id: TaskId,
        state: TaskState,
        message: String,
    },
    /// The caller's input was rejected by the store.
    #[error("invalid: {0}")]
    Invalid(String),
}

/// A fully resolved task to insert (defaults already applied by the [`Client`](crate::Client)).
#[derive(Debug, Clone)]
pub struct TaskInsert {
    pub kind: String,
    pub args: serde_json::Value,
    pub queue: String,
    pub priority: i16,
    pub run_at: DateTime<Utc>,
    pub max_attempts: i32,
    pub timeout_ms: Option<i64>,
    pub unique_key: Option<String>,
    /// Parents: existing tasks, or earlier rows of the same insert
    /// (`Dependency::Batch(i)` with `i` below this row's index).
    pub depends_on: Vec<Dependency>,
    pub on_dependency_failure: OnDependencyFailure,
    /// Tasks sharing a key count together against `per_key_concurrency`.
    pub concurrency_key: Option<String>,
}

impl TaskInsert {
    /// The task this insert created, as stored with `id` at `now`.
    pub fn to_task(&self, id: TaskId, now: DateTime<Utc>) -> Task {
        Task {
            id,
            kind: self.kind.clone(),
            args: self.args.clone(),
            queue: self.queue.clone(),
            priority: self.priority,
            state: if self.run_at > now {
                TaskState::Scheduled
            } else {
                TaskState::Available
            },
            attempt: 0,
            max_attempts: self.max_attempts,
            run_at: self.run_at,
            created_at: now,
            started_at: None,
            finished_at: None,
            node: None,
            result: None,
            errors: Vec::new(),
            timeout_ms: self.timeout_ms,
            unique_key: self.unique_key.clone(),
            depends_on: Vec::new(),
            concurrency_key: self.concurrency_key.clone(),
        }
    }
}

/// Set a new task's state from its parents: `broken` is a parent that
/// already failed or was cancelled (the task then never runs, per its
/// policy), `pending` the parents not yet completed (the task waits).
pub(crate) fn apply_parents(
    task: &mut Task,
    policy: OnDependencyFailure,
    broken: Option<TaskId>,
    pending: i32,
    now: DateTime<Utc>,
) {
    if let Some(p) = broken {
        task.state = match policy {
            OnDependencyFailure::Cancel => TaskState::Cancelled,
            OnDependencyFailure::Fail => TaskState::Failed,
        };
        task.finished_at = Some(now);
        task.errors.push(crate::task::AttemptError {
            attempt: 0,
            at: now,
            message: format!("task {p}, which it depends on, did not complete"),
        });
    } else if pending > 0 {
        task.state = TaskState::Blocked;
    }
}

/// The result of inserting one task.
#[derive(Debug, Clone)]
pub struct Inserted {
    pub task: Task,
    /// True when `unique_key` matched an unfinished task, which is returned instead.
    pub existing: bool,
}

/// Claim up to `limit` due tasks of `queue` for `node`, most urgent first
/// (priority, then run_at, then id).
#[derive(Debug, Clone)]
pub struct ClaimParams {
    pub queue: String,
    pub node: String,
    pub limit: usize,
    pub now: DateTime<Utc>,
    /// Cluster-wide limits of the queue; `None` takes the fast path.
    pub limits: Option<QueueLimits>,
}

/// Limits a queue keeps across the whole cluster (every node configures the same).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueLimits {
    /// At most this many of the queue's tasks run at once, on all nodes together.
    pub global_concurrency: Option<u32>,
    /// At most this many tasks with the same `concurrency_key` run at once.
    pub per_key_concurrency: Option<u32>,
    /// At most `.0` task starts per `.1` (a fixed window).
    pub rate: Option<(u32, Duration)>,
}

impl QueueLimits {
    pub fn is_empty(&self) -> bool {
        self.global_concurrency.is_none()
            && self.per_key_concurrency.is_none()
            && self.rate.is_none()
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Success, with the executor's output.
    Completed { result: serde_json::Value },
    /// The attempt failed and the task runs again at `run_at`.
    Retry {
        run_at: DateTime<Utc>,
        error: String,
    },
    /// The task failed for good (dead-letter list).
    Failed { error: String },
    /// The task was cancelled while running.
    Cancelled { error: String },
    /// Run again at `run_at` without using up an attempt.
    Snoozed { run_at: DateTime<Utc> },
    /// The node gave the task back (shutdown): available again now, attempt not used up.
    Released,
}

/// One attempt's outcome, fenced by `(id, attempt)`.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub id: TaskId,
    pub attempt: i32,
    pub at: DateTime<Utc>,
    pub outcome: Outcome,
}

/// Filters for listing tasks, newest first. `before` is the cursor: only ids below it.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub state: Option<TaskState>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    pub before: Option<TaskId>,
    pub limit: usize,
}

/// The reads behind the dashboard's pages, for checking their query plans
/// (`SqliteStore::explain`, `PostgresStore::explain`).
#[derive(Debug, Clone)]
pub enum DashboardRead {
    TaskList(ListParams),
    QueueCounts,
}

/// Delete finished tasks that finished before the given instants (`None` keeps them).
#[derive(Debug, Clone)]
pub struct PruneParams {
    pub completed_before: Option<DateTime<Utc>>,
    pub failed_before: Option<DateTime<Utc>>,
    pub cancelled_before: Option<DateTime<Utc>>,
    /// At most this many rows per call, so a prune never holds the writer long.
    pub limit: usize,
}

/// A node as registered in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NodeInfo {
    pub name: String,
    pub version: String,
    pub started_at: DateTime<Utc>,
    pub heartbeat_at: DateTime<Utc>,
    pub workers: i32,
    pub workers_busy: i32,
    pub queues: Vec<String>,
    #[serde(default)]
    pub leader: bool,
    /// What the node's pool did since it started (written with each heartbeat).
    #[serde(default)]
    pub stats: NodeStats,
}

/// Attempt outcomes a node's pool counted since it started. The dashboard
/// sums these over the cluster's nodes and plots the differences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeStats {
    #[serde(default)]
    pub completed: u64,
    /// Attempts that failed for good.
    #[serde(default)]
    pub failed: u64,
    /// Attempts that failed and will be retried.
    #[serde(default)]
    pub retried: u64,
    #[serde(default)]
    pub cancelled: u64,
}

/// [`Store::queue_counts`] counts at most this many tasks per queue and
/// unfinished state, so its cost stays bounded however many tasks the store
/// keeps; a count equal to the cap means "at least this many".
pub const QUEUE_COUNT_CAP: i64 = 100_000;

/// The same cap for the finished states (completed, failed, cancelled),
/// which retention rather than load decides the size of.
pub const FINISHED_COUNT_CAP: i64 = 10_000;

/// The cap [`Store::queue_counts`] applies to `state`.
pub fn count_cap(state: TaskState) -> i64 {
    if state.is_finished() {
        FINISHED_COUNT_CAP
    } else {
        QUEUE_COUNT_CAP
    }
}

/// Rescue the running tasks of nodes whose heartbeat is older than `now - node_timeout`
/// (and of nodes that have no row at all), or, with `node`, of that one node.
#[derive(Debug, Clone)]
pub struct RescueParams {
    pub now: DateTime<Utc>,
    pub node_timeout: Duration,
    /// Rescue this node's running tasks whatever its heartbeat says (used by
    /// a node at start-up: anything still running under its own name is an
    /// orphan of an earlier process; and by a live node for tasks it holds
    /// no record of, e.g. a claim whose answer was lost with its connection).
    pub node: Option<String>,
    /// With `node`: leave these tasks alone (the node holds them).
    pub keep: Vec<TaskId>,
    /// With `node`: only tasks started before this instant.
    pub started_before: Option<DateTime<Utc>>,
}

/// A task that was running on a dead node and was put back.
#[derive(Debug, Clone, PartialEq)]
pub struct Rescued {
    pub id: TaskId,
    pub node: Option<String>,
    pub state: TaskState,
}

/// A cron schedule as stored: its spec (JSON of [`ScheduleSpec`](crate::cron::ScheduleSpec)),
/// where it came from (`config` or `api`) and the last tick fired.
#[derive(Debug, Clone, PartialEq)]
pub struct ScheduleRow {
    pub name: String,
    pub spec: serde_json::Value,
    pub source: String,
    pub last_tick: DateTime<Utc>,
}

/// Events a store publishes to the nodes that use it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// A running task was asked to stop.
    CancelRequested { id: TaskId, node: Option<String> },
}

/// The persistence seam. See the module docs for the invariants.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Create or upgrade the schema. Idempotent.
    async fn migrate(&self) -> Result<(), StoreError>;

    /// Insert tasks, all or nothing. Tasks whose `run_at` is after now are `scheduled`.
    async fn task_insert_many(
        &self,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Inserted>, StoreError>;

    /// Claim due tasks (see [`ClaimParams`]).
    async fn task_claim(&self, params: ClaimParams) -> Result<Vec<Task>, StoreError>;

    /// Write outcomes. Returns, per completion, whether it was applied (false
    /// when fencing rejected it: the task is no longer running that attempt).
    async fn task_complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<bool>, StoreError>;

    async fn task_get(&self, id: TaskId) -> Result<Option<Task>, StoreError>;

    async fn task_list(&self, params: ListParams) -> Result<Vec<Task>, StoreError>;

    /// Cancel a task. An unstarted task becomes `cancelled` at once; a running
    /// one is marked and a [`StoreEvent::CancelRequested`] goes to its node,
    /// which ends it. A finished task is a [`StoreError::Conflict`].
    async fn task_cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError>;

    /// Bring a failed or cancelled task back to `available`, granting one more
    /// attempt if it had none left. Other states are a [`StoreError::Conflict`].
    async fn task_retry(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError>;

    /// The ids and attempts of `node`'s running tasks that were asked to stop.
    async fn task_cancel_requested(&self, node: &str) -> Result<Vec<(TaskId, i32)>, StoreError>;

    /// Delete old finished tasks; returns how many went.
    async fn task_prune(&self, params: PruneParams) -> Result<u64, StoreError>;

    /// Count tasks by queue and state.
    ///
    /// Each count stops at [`count_cap`] of its state. Implementations walk an index
    /// on `(queue, state)` so the cost does not grow with the table.
    async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError>;

    /// Pause (no task of `queue` is claimed by any node) or resume a queue.
    async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError>;

    /// The queues that are paused.
    async fn queue_paused(&self) -> Result<Vec<String>, StoreError>;

    /// Add a schedule or replace its spec and source; a new schedule's
    /// `last_tick` is the row's (normally now), an existing one keeps its own.
    async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError>;

    /// Remove a schedule; false when there was none of that name.
    async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError>;

    async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError>;

    /// Fire a schedule, atomically: if its `last_tick` is still `expected`,
    /// set it to `new_last` and insert `tasks` (unique keys honoured) in the
    /// same transaction, returning them; otherwise change nothing and return
    /// `None` (another node fired it).
    async fn schedule_fire(
        &self,
        name: &str,
        expected: DateTime<Utc>,
        new_last: DateTime<Utc>,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Inserted>>, StoreError>;

    /// Register or refresh this node.
    async fn node_heartbeat(&self, node: NodeInfo) -> Result<(), StoreError>;

    /// Remove a node that stops cleanly.
    async fn node_remove(&self, name: &str) -> Result<(), StoreError>;

    async fn node_list(&self) -> Result<Vec<NodeInfo>, StoreError>;

    /// Put the running tasks of dead nodes back (see [`RescueParams`]); each
    /// becomes `retryable` (or `failed` if it has no attempts left).
    async fn node_rescue(&self, params: RescueParams) -> Result<Vec<Rescued>, StoreError>;

    /// Become or stay leader until `now + ttl`. True when `node` leads.
    async fn leader_try_elect(
        &self,
        node: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError>;

    /// Give up leadership if `node` holds it.
    async fn leader_resign(&self, node: &str) -> Result<(), StoreError>;

    /// Signalled when new due work may be waiting (after inserts, retries,
    /// releases). Producers wait on it, with polling as the fallback.
    fn work_notifier(&self) -> Arc<Notify>;

    /// Store events (cancel requests) for the nodes of this process.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;

    /// The schema of a PostgreSQL store (for enqueueing inside a caller's
    /// transaction); `None` for other stores.
    fn postgres_schema(&self) -> Option<&str> {
        None
    }
}

/// `t` cut to whole microseconds: the precision every store keeps.
pub fn truncate_micros(t: DateTime<Utc>) -> DateTime<Utc> {
    from_micros(to_micros(t))
}

/// Tasks with their `run_at` cut to the precision stores keep.
pub(crate) fn truncate_rows(rows: Vec<TaskInsert>) -> Vec<TaskInsert> {
    rows.into_iter()
        .map(|mut t| {
            t.run_at = truncate_micros(t.run_at);
            t
        })
        .collect()
}

pub(crate) fn to_micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

pub(crate) fn from_micros(us: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(us).unwrap_or(DateTime::<Utc>::MIN_UTC)
}
