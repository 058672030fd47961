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
//! - A task is claimed by at most one claimer at a time: claiming moves it
//!   to `running` and increments `attempt` and `claim_token` in the same
//!   statement.
//! - A completion is applied only while the task is `running` under the
//!   `claim_token` it was claimed with. The token only grows (a snooze or
//!   release gives the attempt back, never the token), so a node that lost a
//!   task to a rescue, or a late outcome of an earlier run, cannot land on a
//!   later run. A batch applies at most one completion per task.
//! - Cancel is final: once a running task was asked to stop, an outcome that
//!   would make it runnable again (retry, snooze, release) cancels it instead.
//! - Values are made storable the same way on every store (see
//!   [`lifecycle::storable_value`]).
//! - While a task with a `unique_key` is unfinished, no second unfinished task
//!   with that key exists.
//!
//! Methods take `now` in their params instead of reading the clock, so the
//! conformance suite can drive time by hand.
//!
//! # Layout
//!
//! This file holds the trait and its errors; `params.rs` the structs its
//! methods take and return; `lifecycle.rs` the rules of the task life
//! cycle, written once; `sqlite/` and `postgres/` one wing per store, each
//! with its SQL and numbered migrations.

// Helpers the stores share; without a store feature (a `Store` of your
// own) they are unused.
#![cfg_attr(not(any(feature = "sqlite", feature = "postgres")), allow(dead_code))]

mod due;
pub mod lifecycle;
mod params;
#[cfg(feature = "postgres")]
pub mod postgres;
#[cfg(feature = "sqlite")]
mod sqlite;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use tokio::sync::{Notify, broadcast};

#[cfg(feature = "postgres")]
pub use postgres::{HotStatement, PoolMode, PostgresOptions, PostgresStore};
#[cfg(feature = "sqlite")]
pub use sqlite::{SqliteOptions, SqliteStore, Synchronous};

use crate::task::{Task, TaskId, TaskState};

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be reached or answered with an error that is not the
    /// caller's fault (I/O, lock, corrupt file, lost connection).
    #[error("store unavailable: {message}")]
    Unavailable {
        message: String,
        /// Trying again later may work (a lost connection, a busy lock); a
        /// write the store refuses for good (bad data) is not transient.
        transient: bool,
    },
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
    /// An enqueue with `on_conflict: error` found its `unique_key` held;
    /// nothing was inserted (a batch is refused whole).
    #[error("unique_key {unique_key:?} is held by task {id} ({state}) of kind {kind:?}")]
    Duplicate {
        kind: String,
        unique_key: String,
        id: TaskId,
        state: TaskState,
    },
    /// An enqueue would put more than the queue's `max_depth` unfinished
    /// tasks in it; nothing was inserted (a batch is refused whole).
    #[error(
        "queue {queue:?} is full: at most {max_depth} unfinished tasks (max_depth); try again later"
    )]
    QueueFull { queue: String, max_depth: u32 },
    /// The caller's input was rejected by the store; `field` names the part
    /// of the input at fault, when one does.
    #[error("invalid: {}{message}", field.as_deref().map(|f| format!("{f}: ")).unwrap_or_default())]
    Invalid {
        field: Option<String>,
        message: String,
    },
}

impl StoreError {
    /// Input rejected, naming the field at fault.
    pub fn invalid(field: impl Into<String>, message: impl Into<String>) -> Self {
        StoreError::Invalid {
            field: Some(field.into()),
            message: message.into(),
        }
    }

    /// Input rejected as a whole (e.g. a value that does not serialize).
    pub fn invalid_value(message: impl Into<String>) -> Self {
        StoreError::Invalid {
            field: None,
            message: message.into(),
        }
    }

    /// The store failed in a way that may pass (connection, lock).
    pub fn unavailable(message: impl Into<String>) -> Self {
        StoreError::Unavailable {
            message: message.into(),
            transient: true,
        }
    }

    /// May the same call work later? (A lost connection or a busy lock may
    /// pass; data the store refuses, a schema it does not know, will not.)
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StoreError::Unavailable {
                transient: true,
                ..
            }
        )
    }

    /// The field an `Invalid` error names.
    pub fn field(&self) -> Option<&str> {
        match self {
            StoreError::Invalid { field, .. } => field.as_deref(),
            _ => None,
        }
    }
}

/// The task columns every store selects, in this order; the row decoders
/// read them by the positions in [`col`].
pub(crate) const TASK_COLUMNS: &str = "id, kind, queue, args, priority, state, attempt, \
    max_attempts, timeout_ms, unique_key, run_at, created_at, started_at, finished_at, node, \
    result, errors, depends_on, concurrency_key, claim_token, ref_name, progress, tags, traceparent";

/// Positions of [`TASK_COLUMNS`].
pub(crate) mod col {
    pub const ID: usize = 0;
    pub const KIND: usize = 1;
    pub const QUEUE: usize = 2;
    pub const ARGS: usize = 3;
    pub const PRIORITY: usize = 4;
    pub const STATE: usize = 5;
    pub const ATTEMPT: usize = 6;
    pub const MAX_ATTEMPTS: usize = 7;
    pub const TIMEOUT_MS: usize = 8;
    pub const UNIQUE_KEY: usize = 9;
    pub const RUN_AT: usize = 10;
    pub const CREATED_AT: usize = 11;
    pub const STARTED_AT: usize = 12;
    pub const FINISHED_AT: usize = 13;
    pub const NODE: usize = 14;
    pub const RESULT: usize = 15;
    pub const ERRORS: usize = 16;
    pub const DEPENDS_ON: usize = 17;
    pub const CONCURRENCY_KEY: usize = 18;
    pub const CLAIM_TOKEN: usize = 19;
    pub const REF_NAME: usize = 20;
    pub const PROGRESS: usize = 21;
    pub const TAGS: usize = 22;
    pub const TRACEPARENT: usize = 23;
}

/// The earliest due instant per queue from `(queue, earliest of one
/// priority)` pairs in queue order, as both stores' skip scans of the claim
/// index yield them (see [`Store::queue_oldest_due`]).
pub(crate) fn earliest_per_queue<T: Ord>(
    pairs: impl IntoIterator<Item = (String, T)>,
) -> Vec<(String, T)> {
    let mut out: Vec<(String, T)> = Vec::new();
    for (q, at) in pairs {
        match out.last_mut() {
            Some((lq, lat)) if *lq == q => {
                if at < *lat {
                    *lat = at;
                }
            }
            _ => out.push((q, at)),
        }
    }
    out
}

/// A state read back from a store, or a schema error naming the column.
pub(crate) fn parse_state(s: &str) -> Result<TaskState, StoreError> {
    s.parse()
        .map_err(|e: crate::task::UnknownState| StoreError::Schema(format!("tasks.state: {e}")))
}

pub use params::*;

/// Insert one row as [`Store::task_insert_many`] does.
pub(crate) async fn insert_one<S: Store + ?Sized>(
    store: &S,
    task: TaskInsert,
    now: DateTime<Utc>,
) -> Result<Inserted, StoreError> {
    store
        .task_insert_many(vec![task], now)
        .await?
        .pop()
        .ok_or_else(|| StoreError::unavailable("insert returned no row"))
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

    /// Insert one task already claimed by `node` (`running`, attempt 1,
    /// claim token 1, started `now`) when a claim could take it at once:
    /// due now, a plain task ([`TaskInsert::can_start_at_once`]), its queue
    /// not paused, capped, or with limits stored (round robin among them).
    /// Otherwise it is inserted as [`Store::task_insert_many`] would. The
    /// caller holds a free worker of `node`'s for it and knows of no due
    /// task waiting in the queue (see `pool/handoff.rs`): one round trip
    /// instead of an insert, a wake-up and a claim. The default inserts it
    /// without claiming.
    async fn task_insert_started(
        &self,
        task: TaskInsert,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<Inserted, StoreError> {
        let _ = node;
        insert_one(self, task, now).await
    }

    /// Claim due tasks (see [`ClaimParams`]).
    async fn task_claim(&self, params: ClaimParams) -> Result<Vec<Task>, StoreError>;

    /// Write outcomes. Returns, per completion, whether it was applied (false
    /// when fencing rejected it: the task is no longer running that attempt).
    async fn task_complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<bool>, StoreError>;

    async fn task_get(&self, id: TaskId) -> Result<Option<Task>, StoreError>;

    /// The tasks of `ids` that exist, in one read (in no particular order).
    async fn task_get_many(&self, ids: Vec<TaskId>) -> Result<Vec<Task>, StoreError>;

    /// Which of `ids` exist and are not finished: one read however many
    /// ids (the waiters' fallback when a finish event may have been missed).
    async fn task_unfinished(&self, ids: Vec<TaskId>) -> Result<Vec<TaskId>, StoreError>;

    /// Someone in this process waits for tasks to finish, for the next
    /// `span`: finishes that other processes write are announced to this
    /// one until then ([`StoreEvent::Finished`]). The waiters say so before
    /// their first read, and again while they wait. A store whose finishes
    /// only this process writes, or that announces every finish to every
    /// process anyway, has nothing to do.
    async fn announce_waiting(&self, span: std::time::Duration) -> Result<(), StoreError> {
        let _ = span;
        Ok(())
    }

    async fn task_list(&self, params: ListParams) -> Result<Vec<Task>, StoreError>;

    /// Cancel a task. An unstarted task becomes `cancelled` at once; a running
    /// one is marked and a [`StoreEvent::CancelRequested`] goes to its node,
    /// which ends it. A finished task is a [`StoreError::Conflict`].
    async fn task_cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError>;

    /// Bring a failed or cancelled task back to `available`, granting one more
    /// attempt if it had none left. Other states are a [`StoreError::Conflict`].
    async fn task_retry(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError>;

    /// The ids and claim tokens of `node`'s running tasks that were asked to stop.
    async fn task_cancel_requested(&self, node: &str) -> Result<Vec<(TaskId, i64)>, StoreError>;

    /// Delete old finished tasks; returns how many went.
    async fn task_prune(&self, params: PruneParams) -> Result<u64, StoreError>;

    /// Append an operator action to the audit trail.
    async fn audit_append(&self, entry: AuditEntry) -> Result<(), StoreError>;

    /// Audit entries, newest first, with ids below `before` (the cursor).
    async fn audit_list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError>;

    /// Count tasks by queue and state.
    ///
    /// Each count stops at [`count_cap`] of its state. Implementations walk an index
    /// on `(queue, state)` so the cost does not grow with the table.
    async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError>;

    /// Per queue with a task due by `now` (claimable, `run_at <= now`): the
    /// earliest such `run_at`. `now` minus it is the queue's lag, what an
    /// autoscaler watches. Walks the claim index, one probe per (queue,
    /// priority), so the cost does not grow with the table.
    async fn queue_oldest_due(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError>;

    /// Store the latest progress of attempts: each update lands only while
    /// the task's claim token is the one it names, so a report of an earlier
    /// run changes nothing once the task was claimed again, while the last
    /// report of a run lands even if its outcome was written first. Returns
    /// how many landed. Called by the pool's progress writer, which coalesces.
    async fn task_progress(&self, updates: Vec<ProgressUpdate>) -> Result<usize, StoreError>;

    /// Pause (no task of `queue` is claimed by any node) or resume a queue.
    async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError>;

    /// The queues that are paused.
    async fn queue_paused(&self) -> Result<Vec<String>, StoreError>;

    /// Add a schedule or replace its spec and source; a new schedule's
    /// `last_tick` is the row's (normally now), an existing one keeps its own.
    async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError>;

    /// Remove a schedule; false when there was none of that name.
    async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError>;

    /// Every queue's stored settings (queues without any are absent).
    async fn queue_settings(&self) -> Result<Vec<(String, QueueSettings)>, StoreError>;

    /// Write a queue's settings; with `only_if_absent`, only when the queue
    /// has none yet (a node's config gives starting values, which do not
    /// undo a change made at run time).
    async fn queue_settings_put(
        &self,
        queue: &str,
        settings: QueueSettings,
        only_if_absent: bool,
    ) -> Result<(), StoreError>;

    /// Give the waiting tasks of round-robin `queue` that have no fair_seq
    /// (enqueued before it became round robin, or by a process that had
    /// not yet read the change) fair_seq 0, so round-robin claims, which
    /// take only tasks with one, take them, first. Returns how many.
    async fn queue_fair_adopt(&self, queue: &str) -> Result<u64, StoreError>;

    /// Pause or resume a schedule; false when there is none of that name.
    async fn schedule_set_paused(&self, name: &str, paused: bool) -> Result<bool, StoreError>;

    async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError>;

    /// Fire a schedule, atomically (see [`ScheduleFire`]): returns the
    /// inserted tasks, or `None` when another node fired it first.
    async fn schedule_fire(&self, fire: ScheduleFire) -> Result<Option<Vec<Inserted>>, StoreError>;

    /// Take `node.name` for `node.instance` at start, unless another
    /// instance holds it with a heartbeat at or after `live_since` (then
    /// nothing changes and the holder is returned). `take_from`: an instance
    /// known to be dead, whose recent heartbeat does not count.
    async fn node_register(
        &self,
        node: NodeInfo,
        live_since: DateTime<Utc>,
        take_from: Option<String>,
    ) -> Result<Option<NodeInfo>, StoreError>;

    /// Refresh this node's registration. False when another instance holds
    /// the name now (this one was taken for dead and must stop).
    async fn node_heartbeat(&self, node: NodeInfo) -> Result<bool, StoreError>;

    /// Remove a node that stops cleanly.
    async fn node_remove(&self, name: &str) -> Result<(), StoreError>;

    /// The registered nodes; `leader` is set for the one whose lease is
    /// still valid at `now`.
    async fn node_list(&self, now: DateTime<Utc>) -> Result<Vec<NodeInfo>, StoreError>;

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

    /// Can the store serve reads and writes now? (What `/readyz` reports.)
    async fn ready(&self) -> Result<(), StoreError> {
        self.queue_paused().await.map(|_| ())
    }

    /// Signalled when new due work may be waiting (after inserts, retries,
    /// releases). Producers wait on it, with polling as the fallback.
    fn work_notifier(&self) -> Arc<Notify>;

    /// Store events (cancel requests, finished tasks) for this process.
    fn subscribe(&self) -> broadcast::Receiver<StoreEvent>;

    /// The concrete store, for features only one store has (enqueueing
    /// inside a caller's PostgreSQL transaction).
    fn as_any(&self) -> &dyn std::any::Any;
}

/// The future instants at which `completions` make their tasks due again
/// (retries' backoff, snoozes): what a store hands its [`due::DueTimer`].
pub(crate) fn due_again(completions: &[Completion]) -> Vec<DateTime<Utc>> {
    completions
        .iter()
        .filter_map(|c| match c.outcome {
            Outcome::Retry { run_at, .. } | Outcome::Snoozed { run_at } => Some(run_at),
            _ => None,
        })
        .collect()
}

/// Whether an insert put `i` in the queue as new work (a new task, or a
/// holder that took the insert's args and run_at).
pub(crate) fn is_new_work(i: &Inserted) -> bool {
    !i.existing || i.replaced
}

/// The `run_at` of the newly inserted (or replaced) tasks that wait for it.
pub(crate) fn due_later(inserted: &[Inserted]) -> Vec<DateTime<Utc>> {
    inserted
        .iter()
        .filter(|i| is_new_work(i) && i.task.state == TaskState::Scheduled)
        .map(|i| i.task.run_at)
        .collect()
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
