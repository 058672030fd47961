//! The embedded store: one SQLite file in WAL mode.
//!
//! # Overview
//!
//! SQLite allows one writer at a time, so this store gives it exactly one:
//! a dedicated OS thread owns the only read-write connection and every
//! write (insert, claim, complete, cancel, heartbeat...) is a job sent to it
//! over a channel. The thread takes every job that is waiting (up to
//! [`MAX_GROUP`]), runs them all in one `BEGIN IMMEDIATE ... COMMIT`, and only
//! then answers each caller: group commit, so one fsync covers many callers.
//! Each job runs inside its own SAVEPOINT, so one job's error rolls back that
//! job alone and the others still commit.
//!
//! Reads (`task_get`, `task_list`, ...) use a small pool of read-only
//! connections on blocking threads; WAL lets them run beside the writer.
//!
//! # Layout
//!
//! This file opens the store and maps each [`Store`] method to a write job
//! or a read; `writer.rs` is the writer thread; `claim.rs`, `insert.rs`,
//! `outcome.rs` and `cluster.rs` hold the statements; `rows.rs` decodes
//! tasks; `migrations/` the schema, one numbered file per version.
//!
//! # Durability
//!
//! With `synchronous = FULL` (the default) a commit is on disk before any
//! caller hears `Ok`, so an enqueue that returned `Ok` survives `kill -9` and
//! power loss. `NORMAL` survives a killed process but may lose the last
//! commits on power loss.

mod claim;
mod cluster;
mod insert;
mod outcome;
mod rows;
mod writer;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::Connection;
use tokio::sync::{Notify, broadcast, oneshot};

use super::{
    AuditEntry, ClaimParams, Completion, DashboardRead, FINISHED_COUNT_CAP, Inserted, ListParams,
    NodeInfo, PruneParams, QUEUE_COUNT_CAP, QueueSettings, RescueParams, Rescued, ScheduleFire,
    ScheduleRow, Store, StoreError, StoreEvent, TaskInsert, due::DueTimer, due_again, due_later,
    lifecycle, truncate_micros,
};
use crate::task::{Task, TaskId, TaskState};
use writer::{Job, Reply, open_conn, sql_err, unavailable, writer_loop};

/// The schema, one file per `PRAGMA user_version`. Append; never edit a released file.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_tasks.sql"),
    include_str!("migrations/0002_schedules.sql"),
    include_str!("migrations/0003_workflows.sql"),
    include_str!("migrations/0004_limits.sql"),
    include_str!("migrations/0005_queue_state_index.sql"),
    include_str!("migrations/0006_kind_index.sql"),
    include_str!("migrations/0007_claim_token.sql"),
    include_str!("migrations/0008_task_deps_child.sql"),
    include_str!("migrations/0009_node_instance.sql"),
    include_str!("migrations/0010_audit.sql"),
    include_str!("migrations/0011_unique_by_kind.sql"),
    include_str!("migrations/0012_node_schedules.sql"),
    include_str!("migrations/0013_node_kinds.sql"),
    include_str!("migrations/0014_task_ref.sql"),
    include_str!("migrations/0015_task_progress.sql"),
    include_str!("migrations/0016_schedule_paused.sql"),
    include_str!("migrations/0017_queue_settings.sql"),
    include_str!("migrations/0018_task_tags.sql"),
    include_str!("migrations/0019_unique_rules.sql"),
    include_str!("migrations/0020_queue_limits.sql"),
    include_str!("migrations/0021_fairness.sql"),
    include_str!("migrations/0022_traceparent.sql"),
    include_str!("migrations/0023_no_state_index.sql"),
];

/// How hard SQLite works to make a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum Synchronous {
    /// fsync on every commit: survives power loss.
    #[default]
    Full,
    /// fsync at checkpoints: survives a killed process, not a power cut.
    Normal,
}

/// How to open a [`SqliteStore`].
#[derive(Debug, Clone)]
pub struct SqliteOptions {
    pub path: PathBuf,
    pub synchronous: Synchronous,
    /// How long a connection waits for another process's lock.
    pub busy_timeout: Duration,
    /// Read-only connections kept for reads.
    pub readers: usize,
}

impl SqliteOptions {
    pub fn new(path: impl Into<PathBuf>) -> Self {
        SqliteOptions {
            path: path.into(),
            synchronous: Synchronous::Full,
            busy_timeout: Duration::from_secs(5),
            readers: 4,
        }
    }
}

/// The embedded store. Cheap to clone: clones share the writer thread.
#[derive(Clone)]
pub struct SqliteStore {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    options: SqliteOptions,
    /// Only the writer thread receives; dropping the last sender stops it.
    writer: Mutex<Option<mpsc::Sender<Job>>>,
    /// The writer thread, to tell whether it still runs.
    writer_thread: std::thread::JoinHandle<()>,
    /// Idle read connections. A std mutex: held only to push or pop.
    readers: Mutex<Vec<Connection>>,
    notify: Arc<Notify>,
    events: broadcast::Sender<StoreEvent>,
    /// Reads run so far (see [`SqliteStore::reads`]).
    reads: std::sync::atomic::AtomicU64,
    /// Wakes producers when delayed, retried or snoozed tasks fall due.
    due: DueTimer,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

impl SqliteStore {
    /// `EXPLAIN QUERY PLAN` of one of the dashboard's reads, as the store
    /// runs it: one line per plan step. Tests use it to check that list
    /// pages and counts walk indexes, whatever the table holds.
    pub async fn explain(&self, read: DashboardRead) -> Result<Vec<String>, StoreError> {
        self.read(move |conn| {
            let statements = match read {
                DashboardRead::TaskList(p) => rows::list_statements(&p, &rows::queues(conn)?),
                DashboardRead::QueueCounts => vec![(
                    rows::queue_counts_sql(),
                    vec![QUEUE_COUNT_CAP.into(), FINISHED_COUNT_CAP.into()],
                )],
                DashboardRead::QueueLag(_) => cluster::oldest_due_sql()
                    .into_iter()
                    .map(|sql| (sql, vec![String::from("q").into(), 0.into()]))
                    .collect(),
            };
            let mut lines = Vec::new();
            for (sql, args) in statements {
                let mut st = conn
                    .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                    .map_err(sql_err)?;
                let plan = st
                    .query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                    .map_err(sql_err)?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(sql_err)?;
                lines.extend(plan);
            }
            Ok(lines)
        })
        .await
    }

    /// Open (creating if needed) the database file. Fails with a message that
    /// names the file when it cannot be opened or is not a proto_tasker database.
    /// Call [`Store::migrate`] before use (the node does it at start).
    pub fn open(options: SqliteOptions) -> Result<Self, StoreError> {
        let path = options.path.clone();
        let conn = open_conn(&options, false)?;
        // Touch the file now so a corrupt or foreign file fails here, not on first use.
        let _: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .map_err(|e| unavailable(&path, e))?;
        let (tx, rx) = mpsc::channel::<Job>();
        let writer_thread = std::thread::Builder::new()
            .name("proto_tasker-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| unavailable(&path, e))?;
        let (events, _) = broadcast::channel(1024);
        let notify = Arc::new(Notify::new());
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                options,
                writer: Mutex::new(Some(tx)),
                writer_thread,
                readers: Mutex::new(Vec::new()),
                due: DueTimer::new(notify.clone()),
                notify,
                events,
                reads: std::sync::atomic::AtomicU64::new(0),
            }),
        })
    }

    /// Open `path` with default options.
    pub fn open_path(path: impl Into<PathBuf>) -> Result<Self, StoreError> {
        Self::open(SqliteOptions::new(path))
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Migrate only up to `version` (tests of in-place upgrades).
    #[doc(hidden)]
    pub async fn migrate_to(&self, version: usize) -> Result<(), StoreError> {
        let path = self.inner.path.clone();
        self.write(move |conn| migrate(conn, &path, version)).await
    }

    /// Run `f` on the writer thread inside the group transaction.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        // The job answers through `run`'s reply, or through `fail` when its
        // group cannot begin; whichever comes first takes the sender.
        let tx = Arc::new(Mutex::new(Some(tx)));
        let fail_tx = tx.clone();
        let job = Job {
            run: Box::new(move |conn| {
                let r = f(conn);
                let ok = r.is_ok();
                let reply: Reply = Box::new(move |commit_err| {
                    if let Some(tx) = tx.lock().ok().and_then(|mut t| t.take()) {
                        let _ = tx.send(match commit_err {
                            None => r,
                            Some(e) => Err(e.clone()),
                        });
                    }
                });
                (reply, ok)
            }),
            fail: Box::new(move |e| {
                if let Some(tx) = fail_tx.lock().ok().and_then(|mut t| t.take()) {
                    let _ = tx.send(Err(e.clone()));
                }
            }),
        };
        let sender = self
            .inner
            .writer
            .lock()
            .map_err(|_| StoreError::unavailable("writer lock poisoned"))?
            .clone()
            .ok_or_else(|| StoreError::unavailable("store is closed"))?;
        sender
            .send(job)
            .map_err(|_| unavailable(&self.inner.path, "writer thread stopped"))?;
        rx.await.map_err(|_| {
            unavailable(
                &self.inner.path,
                "the write was lost (it failed inside the writer, or the writer stopped)",
            )
        })?
    }

    /// Run `f` on a read connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        inner
            .reads
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        tokio::task::spawn_blocking(move || {
            let pooled = inner.readers.lock().ok().and_then(|mut v| v.pop());
            let conn = match pooled {
                Some(c) => c,
                None => open_conn(&inner.options, true)?,
            };
            let r = f(&conn);
            if let Ok(mut v) = inner.readers.lock()
                && v.len() < inner.options.readers
            {
                v.push(conn);
            }
            r
        })
        .await
        .map_err(|e| StoreError::unavailable(format!("read task failed: {e}")))?
    }

    /// A write that panics inside the writer (tests: a panic must roll back
    /// that write alone and leave the writer running).
    #[doc(hidden)]
    pub async fn write_that_panics(&self) -> Result<(), StoreError> {
        self.write(|_conn| -> Result<(), StoreError> { panic!("a write that panics") })
            .await
    }

    fn wake(&self) {
        self.inner.notify.notify_waiters();
    }

    /// Tell this process's waiters that `ids` finished. Every write goes
    /// through this process's writer thread, so no other process's finish
    /// is announced; waiters in another process fall back to polling.
    fn finished(&self, ids: Vec<TaskId>) {
        if !ids.is_empty() {
            let _ = self
                .inner
                .events
                .send(StoreEvent::Finished { ids: ids.into() });
        }
    }

    /// How many reads this store ran (each a statement or a few on a read
    /// connection): what a waiter costs is measured with it.
    pub fn reads(&self) -> u64 {
        self.inner.reads.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// A node's queues and stats as the JSON text the table keeps.
fn node_json(n: &NodeInfo) -> Result<(String, String), StoreError> {
    let queues = serde_json::to_string(&n.queues)
        .map_err(|e| StoreError::invalid("queues", e.to_string()))?;
    let stats =
        serde_json::to_string(&n.stats).map_err(|e| StoreError::invalid("stats", e.to_string()))?;
    Ok((queues, stats))
}

/// Apply the migrations past the file's `user_version`, up to `target`.
fn migrate(conn: &Connection, path: &Path, target: usize) -> Result<(), StoreError> {
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|e| unavailable(path, e))?;
    let known = MIGRATIONS.len() as i64;
    if version > known {
        return Err(StoreError::Schema(format!(
            "{}: schema version {version} is newer than this binary knows ({known}); upgrade proto_tasker",
            path.display()
        )));
    }
    if version == 0 {
        // A file that has tables but no version is not ours.
        let tables: i64 = conn
            .query_row(
                "SELECT count(*) FROM sqlite_master WHERE type = 'table'",
                [],
                |r| r.get(0),
            )
            .map_err(|e| unavailable(path, e))?;
        if tables > 0 {
            return Err(StoreError::Schema(format!(
                "{}: the file holds tables but no proto_tasker schema; refusing to touch it",
                path.display()
            )));
        }
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .take(target)
        .skip(version as usize)
    {
        conn.execute_batch(sql).map_err(|e| {
            StoreError::Schema(format!("{}: migration {}: {e}", path.display(), i + 1))
        })?;
        conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
            .map_err(sql_err)?;
    }
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_to(MIGRATIONS.len()).await
    }

    async fn task_insert_many(
        &self,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Inserted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let now = truncate_micros(now);
        let (tasks, args) = insert::prepare_rows(tasks)?;
        let out = self
            .write(move |conn| insert::insert_all(conn, &tasks, &args, now))
            .await?;
        self.inner.due.at(due_later(&out));
        if out
            .iter()
            .any(|i| crate::store::is_new_work(i) && i.task.state == TaskState::Available)
        {
            self.wake();
        }
        Ok(out)
    }

    async fn task_insert_started(
        &self,
        task: TaskInsert,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<Inserted, StoreError> {
        let now = truncate_micros(now);
        let (mut tasks, mut args) = insert::prepare_rows(vec![task])?;
        let (Some(task), Some(args)) = (tasks.pop(), args.pop()) else {
            return Err(StoreError::unavailable("insert lost its row"));
        };
        let node = node.to_string();
        let out = self
            .write(move |conn| insert::insert_started(conn, &task, &args, &node, now))
            .await?;
        let out = [out];
        self.inner.due.at(due_later(&out));
        if crate::store::is_new_work(&out[0]) && out[0].task.state == TaskState::Available {
            self.wake();
        }
        let [out] = out;
        Ok(out)
    }

    async fn task_claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let mut tasks = self.write(move |conn| claim::claim(conn, &p)).await?;
        tasks.sort_by_key(|t| (t.priority, t.run_at, t.id));
        Ok(tasks)
    }

    async fn task_complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<bool>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let wake = completions.iter().any(lifecycle::wakes_producers);
        let again = due_again(&completions);
        let w = self
            .write(move |conn| outcome::complete_many(conn, &completions))
            .await?;
        if wake || w.unblocked {
            self.wake();
        }
        self.finished(w.finished);
        self.inner.due.at(again);
        Ok(w.applied)
    }

    async fn task_get(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.read(move |conn| rows::get_task(conn, id)).await
    }

    async fn task_get_many(&self, ids: Vec<TaskId>) -> Result<Vec<Task>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| rows::get_many(conn, &ids)).await
    }

    async fn task_unfinished(&self, ids: Vec<TaskId>) -> Result<Vec<TaskId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        self.read(move |conn| rows::unfinished(conn, &ids)).await
    }

    async fn task_list(&self, p: ListParams) -> Result<Vec<Task>, StoreError> {
        self.read(move |conn| rows::list(conn, &p)).await
    }

    async fn task_cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let (task, finished) = self
            .write(move |conn| outcome::cancel(conn, id, now))
            .await?;
        self.finished(finished);
        if task.state == TaskState::Running {
            let _ = self.inner.events.send(StoreEvent::CancelRequested {
                id,
                node: task.node.clone(),
            });
        }
        Ok(task)
    }

    async fn task_retry(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let task = self
            .write(move |conn| outcome::retry(conn, id, now))
            .await?;
        self.wake();
        Ok(task)
    }

    async fn task_cancel_requested(&self, node: &str) -> Result<Vec<(TaskId, i64)>, StoreError> {
        let node = node.to_string();
        self.read(move |conn| outcome::cancel_requested(conn, &node))
            .await
    }

    async fn task_prune(&self, p: PruneParams) -> Result<u64, StoreError> {
        self.write(move |conn| outcome::prune(conn, &p)).await
    }

    async fn audit_append(&self, e: AuditEntry) -> Result<(), StoreError> {
        self.write(move |conn| cluster::audit_append(conn, &e))
            .await
    }

    async fn audit_list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        self.read(move |conn| cluster::audit_list(conn, before, limit))
            .await
    }

    async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError> {
        self.read(cluster::queue_counts).await
    }

    async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError> {
        let queue = queue.to_string();
        self.write(move |conn| cluster::queue_set_paused(conn, &queue, paused))
            .await?;
        if !paused {
            self.wake();
        }
        Ok(())
    }

    async fn queue_paused(&self) -> Result<Vec<String>, StoreError> {
        self.read(cluster::queue_paused).await
    }

    async fn task_progress(
        &self,
        updates: Vec<crate::store::ProgressUpdate>,
    ) -> Result<usize, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        self.write(move |conn| {
            let mut st = conn
                .prepare_cached("UPDATE tasks SET progress = ?3 WHERE id = ?1 AND claim_token = ?2")
                .map_err(sql_err)?;
            let mut n = 0;
            for u in &updates {
                n += st
                    .execute(rusqlite::params![u.id.0, u.token, u.progress.to_string()])
                    .map_err(sql_err)?;
            }
            Ok(n)
        })
        .await
    }

    async fn queue_oldest_due(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let now = crate::store::to_micros(now);
        let rows = self
            .read(move |conn| cluster::queue_oldest_due(conn, now))
            .await?;
        Ok(rows
            .into_iter()
            .map(|(q, at)| (q, crate::store::from_micros(at)))
            .collect())
    }

    async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError> {
        let spec = serde_json::to_string(&row.spec)
            .map_err(|e| StoreError::invalid("spec", e.to_string()))?;
        self.write(move |conn| cluster::schedule_upsert(conn, &row, &spec))
            .await
    }

    async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |conn| cluster::schedule_delete(conn, &name))
            .await
    }

    async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.read(cluster::schedule_list).await
    }

    async fn queue_settings(&self) -> Result<Vec<(String, QueueSettings)>, StoreError> {
        self.read(cluster::queue_settings).await
    }

    async fn queue_fair_adopt(&self, queue: &str) -> Result<u64, StoreError> {
        let queue = queue.to_string();
        let n = self
            .write(move |conn| {
                conn.prepare_cached(&format!(
                    "UPDATE tasks SET fair_seq = 0 WHERE queue = ?1 AND fair_seq IS NULL \
                     AND state IN ({}, 'blocked')",
                    crate::store::lifecycle::sql_states(&crate::store::lifecycle::CLAIMABLE)
                ))
                .and_then(|mut st| st.execute([&queue]))
                .map_err(writer::sql_err)
            })
            .await?;
        if n > 0 {
            self.wake();
        }
        Ok(n as u64)
    }

    async fn queue_settings_put(
        &self,
        queue: &str,
        settings: QueueSettings,
        only_if_absent: bool,
    ) -> Result<(), StoreError> {
        let queue = queue.to_string();
        self.write(move |conn| cluster::queue_settings_put(conn, &queue, settings, only_if_absent))
            .await?;
        let _ = self.inner.events.send(StoreEvent::SettingsChanged);
        Ok(())
    }

    async fn schedule_set_paused(&self, name: &str, paused: bool) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |conn| cluster::schedule_set_paused(conn, &name, paused))
            .await
    }

    async fn schedule_fire(
        &self,
        mut f: ScheduleFire,
    ) -> Result<Option<Vec<Inserted>>, StoreError> {
        f.now = truncate_micros(f.now);
        let (tasks, args) = insert::prepare_rows(std::mem::take(&mut f.tasks))?;
        f.tasks = tasks;
        let out = self
            .write(move |conn| cluster::schedule_fire(conn, &f, &args))
            .await?;
        if let Some(v) = &out {
            self.inner.due.at(due_later(v));
        }
        if out.as_ref().is_some_and(|v| v.iter().any(|i| !i.existing)) {
            self.wake();
        }
        Ok(out)
    }

    async fn node_register(
        &self,
        n: NodeInfo,
        live_since: DateTime<Utc>,
        take_from: Option<String>,
    ) -> Result<Option<NodeInfo>, StoreError> {
        let (queues, stats) = node_json(&n)?;
        self.write(move |conn| {
            cluster::node_register(conn, &n, &queues, &stats, live_since, take_from.as_deref())
        })
        .await
    }

    async fn node_heartbeat(&self, n: NodeInfo) -> Result<bool, StoreError> {
        let (queues, stats) = node_json(&n)?;
        self.write(move |conn| cluster::node_heartbeat(conn, &n, &queues, &stats, true))
            .await
    }

    async fn node_remove(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.write(move |conn| cluster::node_remove(conn, &name))
            .await
    }

    async fn node_list(&self, now: DateTime<Utc>) -> Result<Vec<NodeInfo>, StoreError> {
        self.read(move |conn| cluster::node_list(conn, now)).await
    }

    async fn node_rescue(&self, p: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        let (rescued, finished) = self.write(move |conn| outcome::rescue(conn, &p)).await?;
        self.finished(finished);
        if !rescued.is_empty() {
            self.wake();
        }
        Ok(rescued)
    }

    async fn leader_try_elect(
        &self,
        node: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let node = node.to_string();
        self.write(move |conn| cluster::leader_try_elect(conn, &node, ttl, now))
            .await
    }

    async fn leader_resign(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_string();
        self.write(move |conn| cluster::leader_resign(conn, &node))
            .await
    }

    async fn ready(&self) -> Result<(), StoreError> {
        if self.inner.writer_thread.is_finished() {
            return Err(unavailable(&self.inner.path, "the writer thread stopped"));
        }
        self.queue_paused().await.map(|_| ())
    }

    fn work_notifier(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    fn as_any(&self) -> &dyn std::any::Any {
        self
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping the sender ends the writer thread after it drains its queue.
        if let Ok(mut w) = self.writer.lock() {
            w.take();
        }
    }
}
