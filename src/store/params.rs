//! The structs the [`Store`](super::Store) methods take and return.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::task::{Dependency, OnConflict, OnDependencyFailure, Task, TaskId, TaskState};

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
    /// How `unique_key` is held (ignored without one).
    pub unique: UniqueRules,
    /// Parents: existing tasks, or earlier rows of the same insert
    /// (`Dependency::Batch(i)` with `i` below this row's index).
    pub depends_on: Vec<Dependency>,
    pub on_dependency_failure: OnDependencyFailure,
    /// Tasks sharing a key count together against `per_key_concurrency`.
    pub concurrency_key: Option<String>,
    /// The task's name in its batch (`ref`).
    pub reference: Option<String>,
    /// Labels, checked and without repeats.
    pub tags: Vec<String>,
    /// The enqueue's W3C trace context (checked).
    pub traceparent: Option<String>,
}

impl TaskInsert {
    /// A plain task of `kind` for `queue`, due at `run_at`: priority 0,
    /// the default attempts, nothing else set (resolved rows come from the
    /// [`Client`](crate::Client); this is for benches and tests of a store).
    pub fn plain(
        kind: impl Into<String>,
        queue: impl Into<String>,
        args: serde_json::Value,
        run_at: DateTime<Utc>,
    ) -> Self {
        TaskInsert {
            kind: kind.into(),
            args,
            queue: queue.into(),
            priority: 0,
            run_at,
            max_attempts: crate::task::DEFAULT_MAX_ATTEMPTS,
            timeout_ms: None,
            unique_key: None,
            unique: UniqueRules::default(),
            depends_on: Vec::new(),
            on_dependency_failure: OnDependencyFailure::default(),
            concurrency_key: None,
            reference: None,
            tags: Vec::new(),
            traceparent: None,
        }
    }

    /// May this task start as it is inserted ([`Store::task_insert_started`])?
    /// Due by `now`, and nothing an insert or a claim does besides writing
    /// the row: no unique key, parents, concurrency key or tags.
    ///
    /// [`Store::task_insert_started`]: super::Store::task_insert_started
    pub fn can_start_at_once(&self, now: DateTime<Utc>) -> bool {
        self.run_at <= now
            && self.unique_key.is_none()
            && self.depends_on.is_empty()
            && self.concurrency_key.is_none()
            && self.tags.is_empty()
    }

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
            claim_token: 0,
            reference: self.reference.clone(),
            progress: None,
            tags: self.tags.clone(),
            traceparent: self.traceparent.clone(),
        }
    }
}

/// How an insert's `unique_key` is held, beyond "one unfinished task of a
/// kind per key" (which every store enforces with a unique index).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UniqueRules {
    /// Finished states whose tasks also hold the key (none by default).
    pub finished: Vec<TaskState>,
    /// A finished holder counts only while it finished less than this many
    /// ms ago (`None`: for as long as it is kept).
    pub for_ms: Option<i64>,
    pub on_conflict: OnConflict,
}

/// The result of inserting one task.
#[derive(Debug, Clone)]
pub struct Inserted {
    pub task: Task,
    /// True when a task holding `unique_key` is returned instead of a new one.
    pub existing: bool,
    /// With `existing`: the holder had not started and took this insert's
    /// args, run_at and priority (`on_conflict: replace`).
    pub replaced: bool,
}

impl Inserted {
    /// A task this insert created.
    pub fn new(task: Task) -> Self {
        Inserted {
            task,
            existing: false,
            replaced: false,
        }
    }

    /// A task that holds the key, returned instead.
    pub fn holder(task: Task) -> Self {
        Inserted {
            task,
            existing: true,
            replaced: false,
        }
    }
}

/// Claim up to `limit` due tasks of `queue` for `node`, most urgent first
/// (priority, then run_at, then id).
#[derive(Debug, Clone)]
pub struct ClaimParams {
    pub queue: String,
    pub node: String,
    pub limit: usize,
    pub now: DateTime<Utc>,
    /// Cluster-wide limits of the queue; `None` takes the fast path, which
    /// takes nothing while the queue has limits stored (the claimer has not
    /// read them yet).
    pub limits: Option<QueueLimits>,
    /// Room for more than `limit`, asked when the claim is about to run (a
    /// store whose claims wait their turn asks after the wait); `None`
    /// claims at most `limit`.
    pub room: Option<ClaimRoom>,
}

/// How many tasks a claim may take at the moment it runs.
///
/// A claim that waits for its turn (the PostgreSQL store's claimers of one
/// queue claim one at a time) may find, once its turn comes, that the
/// claimer has more free workers than when it asked: with 100 nodes in
/// line, half the claims took 2 to 15 tasks that way, each paying a whole
/// turn. The store calls [`ClaimRoom::now`] at most once, just before the
/// claim statement, and takes at most what it returns; the caller keeps
/// whatever it granted until the claim returns.
#[derive(Clone)]
pub struct ClaimRoom {
    most: usize,
    now: std::sync::Arc<dyn Fn() -> usize + Send + Sync>,
}

impl ClaimRoom {
    /// `now` returns how many tasks the claim may take at that moment; it
    /// never returns more than `most`, the most this claimer ever takes
    /// in one claim (a store may use it to choose how to claim).
    pub fn new(most: usize, now: impl Fn() -> usize + Send + Sync + 'static) -> Self {
        ClaimRoom {
            most,
            now: std::sync::Arc::new(now),
        }
    }

    /// The most this claimer ever takes in one claim.
    pub fn most(&self) -> usize {
        self.most
    }

    /// How many tasks the claim may take now (see the type's docs).
    pub fn now(&self) -> usize {
        (self.now)().min(self.most)
    }
}

impl std::fmt::Debug for ClaimRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimRoom")
            .field("most", &self.most)
            .finish()
    }
}

/// Limits a queue keeps across the whole cluster, as a claim applies them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct QueueLimits {
    /// At most this many of the queue's tasks run at once, on all nodes together.
    pub global_concurrency: Option<u32>,
    /// At most this many tasks with the same `concurrency_key` run at once.
    pub per_key_concurrency: Option<u32>,
    /// At most `.0` task starts per `.1` (a fixed window).
    pub rate: Option<(u32, Duration)>,
    /// Claims take tasks across concurrency keys in turn (see [`Fairness`]).
    pub round_robin: bool,
}

impl QueueLimits {
    pub fn is_empty(&self) -> bool {
        self.global_concurrency.is_none()
            && self.per_key_concurrency.is_none()
            && self.rate.is_none()
            && !self.round_robin
    }
}

/// How claims share a queue between concurrency keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "snake_case")]
pub enum Fairness {
    /// Most urgent first (priority, run_at, id), whatever the key.
    #[default]
    None,
    /// Within a priority, a claim takes each key's oldest due task in turn
    /// (then each key's second, ...), so a key that enqueued 20,000 tasks
    /// does not hold up a key that enqueued 20 after it. Tasks without a
    /// key count as one key. Priority still comes first.
    RoundRobin,
}

/// At most `max` task starts per `per_ms` milliseconds (a fixed window).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Starts per window, 1 to 2,147,483,647.
    #[cfg_attr(feature = "server", schema(minimum = 1, maximum = 2_147_483_647))]
    pub max: u32,
    /// The window, 1 ms to a day.
    #[cfg_attr(feature = "server", schema(minimum = 1, maximum = 86_400_000))]
    pub per_ms: u64,
}

/// A queue's settings shared by the cluster (the `queue_settings` table),
/// changed at run time through the API; a node's config gives only the
/// starting values. `None` is no limit (for `workers`: each node's own
/// configured count).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct QueueSettings {
    /// At most this many unfinished tasks (scheduled, available, running,
    /// retryable, blocked) in the queue: an enqueue past it is refused
    /// ([`StoreError::QueueFull`](super::StoreError::QueueFull), HTTP 429).
    #[serde(default)]
    pub max_depth: Option<u32>,
    /// Workers on each node that serves the queue.
    #[serde(default)]
    pub workers: Option<u32>,
    /// At most this many of the queue's tasks run at once, on all nodes.
    #[serde(default)]
    pub global_concurrency: Option<u32>,
    /// At most this many tasks with one `concurrency_key` run at once.
    #[serde(default)]
    pub per_key_concurrency: Option<u32>,
    /// At most `max` task starts per `per_ms`, on all nodes together.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    #[serde(default)]
    pub fairness: Option<Fairness>,
}

impl QueueSettings {
    /// Does it set anything beside `max_depth`? (A node's starting values
    /// without any leave the stored limits unwritten, for a node that has
    /// some to fill in.)
    pub fn has_limits(&self) -> bool {
        self.workers.is_some()
            || self.global_concurrency.is_some()
            || self.per_key_concurrency.is_some()
            || self.rate_limit.is_some()
            || self.fairness.is_some()
    }

    /// The limits a claim applies (`None`: none, the fast path).
    pub fn limits(&self) -> Option<QueueLimits> {
        let l = QueueLimits {
            global_concurrency: self.global_concurrency,
            per_key_concurrency: self.per_key_concurrency,
            rate: self
                .rate_limit
                .map(|r| (r.max, Duration::from_millis(r.per_ms))),
            round_robin: self.fairness == Some(Fairness::RoundRobin),
        };
        (!l.is_empty()).then_some(l)
    }

    /// These settings with the limits of `l` (a node's configured ones).
    pub fn with_limits(mut self, l: &QueueLimits) -> Self {
        self.global_concurrency = l.global_concurrency;
        self.per_key_concurrency = l.per_key_concurrency;
        self.rate_limit = l.rate.map(|(max, per)| RateLimit {
            max,
            per_ms: u64::try_from(per.as_millis()).unwrap_or(u64::MAX),
        });
        self.fairness = l.round_robin.then_some(Fairness::RoundRobin);
        self
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

impl Outcome {
    /// A word for the outcome: `completed`, `retried`, `failed`,
    /// `cancelled`, `snoozed` or `released` (a span's `task.outcome`, the
    /// `outcome` label of the metrics).
    pub fn name(&self) -> &'static str {
        match self {
            Outcome::Completed { .. } => "completed",
            Outcome::Retry { .. } => "retried",
            Outcome::Failed { .. } => "failed",
            Outcome::Cancelled { .. } => "cancelled",
            Outcome::Snoozed { .. } => "snoozed",
            Outcome::Released => "released",
        }
    }
}

/// One run's outcome, fenced by `(id, token)`: it lands only while the task
/// is still `running` under the claim token it was claimed with.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub id: TaskId,
    /// The attempt the run was (for the error list).
    pub attempt: i32,
    /// The claim token of the run ([`Task::claim_token`]).
    pub token: i64,
    pub at: DateTime<Utc>,
    pub outcome: Outcome,
}

impl Completion {
    /// The outcome of the run of `task` as claimed.
    pub fn of(task: &Task, at: DateTime<Utc>, outcome: Outcome) -> Self {
        Completion {
            id: task.id,
            attempt: task.attempt,
            token: task.claim_token,
            at,
            outcome,
        }
    }
}

/// Filters for listing tasks, newest first. `before` is the cursor: only ids below it.
#[derive(Debug, Clone, Default)]
pub struct ListParams {
    pub state: Option<TaskState>,
    pub queue: Option<String>,
    pub kind: Option<String>,
    /// Only tasks carrying this tag (walks the tag's own index, newest first).
    pub tag: Option<String>,
    /// Only tasks whose args contain this JSON object (as PostgreSQL's
    /// `jsonb @>`): a filter on the rows the other filters walk, so its
    /// cost is the number of rows it skips.
    pub args: Option<serde_json::Value>,
    pub before: Option<TaskId>,
    pub limit: usize,
}

/// The reads behind the dashboard's pages, for checking their query plans
/// (`SqliteStore::explain`, `PostgresStore::explain`).
#[derive(Debug, Clone)]
pub enum DashboardRead {
    TaskList(ListParams),
    QueueCounts,
    /// [`Store::queue_oldest_due`](super::Store::queue_oldest_due) at this instant.
    QueueLag(DateTime<Utc>),
}

/// Delete finished tasks that finished before the given instants (`None` keeps them).
#[derive(Debug, Clone)]
pub struct PruneParams {
    pub completed_before: Option<DateTime<Utc>>,
    pub failed_before: Option<DateTime<Utc>>,
    pub cancelled_before: Option<DateTime<Utc>>,
    /// At most this many rows per call, so a prune never holds the writer long.
    pub limit: usize,
    /// Audit entries recorded before this go too.
    pub audit_before: Option<DateTime<Utc>>,
}

impl PruneParams {
    /// Each finished state with the instant before which its tasks go.
    pub fn cutoffs(&self) -> [(TaskState, Option<DateTime<Utc>>); 3] {
        [
            (TaskState::Completed, self.completed_before),
            (TaskState::Failed, self.failed_before),
            (TaskState::Cancelled, self.cancelled_before),
        ]
    }
}

/// A node as registered in the store.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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
    /// Which process holds the name (`host/pid/random`): two processes
    /// configured with one `node.name` are told apart by it.
    #[serde(default)]
    pub instance: String,
    /// The config (or code) schedules this node declares; `None` from a
    /// node too old to say. A config schedule that no node declares is
    /// removed by the leader (see `maintenance::cron_firer`).
    #[serde(default)]
    pub schedules: Option<Vec<String>>,
    /// The kinds this node runs, with the defaults each declares; `None`
    /// from a node too old to say. Clients that do not register a kind
    /// themselves take its defaults from here, and refuse a kind that no
    /// live node runs.
    #[serde(default)]
    pub kinds: Option<std::collections::BTreeMap<String, DeclaredKind>>,
}

/// The latest progress of one running attempt (see [`Store::task_progress`](super::Store::task_progress)).
#[derive(Debug, Clone, PartialEq)]
pub struct ProgressUpdate {
    pub id: TaskId,
    /// The claim token of the attempt that reported it.
    pub token: i64,
    pub progress: serde_json::Value,
}

/// What a node declares about a kind it runs: the defaults an enqueuing
/// client applies when the caller leaves them unset.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct DeclaredKind {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_attempts: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<i64>,
}

/// Attempt outcomes a node's pool counted since it started. The dashboard
/// sums these over the cluster's nodes and plots the differences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
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

/// [`Store::queue_counts`](super::Store::queue_counts) counts at most this many tasks per queue and
/// unfinished state, so its cost stays bounded however many tasks the store
/// keeps; a count equal to the cap means "at least this many".
pub const QUEUE_COUNT_CAP: i64 = 100_000;

/// The same cap for the finished states (completed, failed, cancelled),
/// which retention rather than load decides the size of.
pub const FINISHED_COUNT_CAP: i64 = 10_000;

/// The cap [`Store::queue_counts`](super::Store::queue_counts) applies to `state`.
pub fn count_cap(state: TaskState) -> i64 {
    if state.is_finished() {
        FINISHED_COUNT_CAP
    } else {
        QUEUE_COUNT_CAP
    }
}

/// Rescue the running tasks of nodes whose heartbeat is older than `now - node_timeout`
/// (and of nodes that have no row at all), or, with `node`, of that one node.
#[derive(Debug, Clone, Default)]
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
    /// Paused by an operator: its ticks pass without enqueuing. An upsert
    /// (a node starting with the schedule in its config, or an API replace)
    /// leaves it as it is; only [`Store::schedule_set_paused`](super::Store::schedule_set_paused) changes it.
    pub paused: bool,
}

/// Events a store publishes to the nodes that use it.
#[derive(Debug, Clone, PartialEq)]
pub enum StoreEvent {
    /// A running task was asked to stop.
    CancelRequested { id: TaskId, node: Option<String> },
    /// These tasks reached a final state (an outcome, a cancel, a rescue
    /// that failed them, or a dependency's failure). Sent once per write
    /// that finished any, from this process or (on PostgreSQL) another node.
    Finished { ids: Arc<[TaskId]> },
    /// Events may have been lost (a listener reconnected): whoever waits
    /// on one should look at the store once.
    Missed,
    /// A queue's settings changed (here, or on PostgreSQL on any node):
    /// pools read them again now rather than at their next poll.
    SettingsChanged,
}

/// Fire a schedule: if its `last_tick` is still `expected`, set it to
/// `new_last` and insert `tasks` (unique keys honoured) in the same
/// transaction; otherwise change nothing (another node fired it).
#[derive(Debug, Clone)]
pub struct ScheduleFire {
    pub name: String,
    pub expected: DateTime<Utc>,
    pub new_last: DateTime<Utc>,
    pub tasks: Vec<TaskInsert>,
    pub now: DateTime<Utc>,
}

/// One operator action, as the audit trail keeps it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct AuditEntry {
    /// Assigned by the store (0 before).
    pub id: i64,
    pub at: DateTime<Utc>,
    /// The token's name (never its secret).
    pub token: String,
    /// The caller's address.
    pub remote: String,
    /// What was asked, e.g. `POST /tasks/{id}/cancel`.
    pub action: String,
    /// What it was asked of, e.g. the path `/tasks/42/cancel`.
    pub target: String,
    /// The HTTP status it got, and the error code when it failed.
    pub status: i32,
    pub outcome: String,
}
