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
//! # Durability
//!
//! With `synchronous = FULL` (the default) a commit is on disk before any
//! caller hears `Ok`, so an enqueue that returned `Ok` survives `kill -9` and
//! power loss. `NORMAL` survives a killed process but may lose the last
//! commits on power loss.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::{Connection, OpenFlags, OptionalExtension, Row, params};
use tokio::sync::{Notify, broadcast, oneshot};

use super::{
    ClaimParams, Completion, Inserted, ListParams, NodeInfo, Outcome, PruneParams, QueueLimits,
    RescueParams, Rescued, ScheduleRow, Store, StoreError, StoreEvent, TaskInsert, from_micros,
    to_micros,
};
use crate::task::{AttemptError, Dependency, Task, TaskId, TaskState};

/// Most jobs the writer folds into one transaction.
pub const MAX_GROUP: usize = 512;

/// The schema, one entry per `PRAGMA user_version`. Append; never edit a released entry.
const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    args             TEXT    NOT NULL,
    priority         INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    timeout_ms       INTEGER,
    unique_key       TEXT,
    run_at           INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    node             TEXT,
    result           TEXT,
    errors           TEXT    NOT NULL DEFAULT '[]',
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
-- Serves the claim: due tasks of one queue, most urgent first.
CREATE INDEX tasks_claim ON tasks (queue, priority, run_at, id)
    WHERE state IN ('available', 'scheduled', 'retryable');
-- At most one unfinished task per unique key.
CREATE UNIQUE INDEX tasks_unique_key ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state NOT IN ('completed', 'failed', 'cancelled');
-- Serves listing by state (newest first), rescue and cancel polling (state =
-- 'running'), and pruning (state = 'completed' ... in id order, which follows
-- finish order closely enough for a LIMITed delete).
CREATE INDEX tasks_state_id ON tasks (state, id);
CREATE TABLE nodes (
    name         TEXT PRIMARY KEY,
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    workers      INTEGER NOT NULL,
    workers_busy INTEGER NOT NULL,
    queues       TEXT    NOT NULL
);
CREATE TABLE queues (
    name   TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE leader (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    node       TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
"#,
    r#"
CREATE TABLE schedules (
    name      TEXT PRIMARY KEY,
    spec      TEXT    NOT NULL,
    source    TEXT    NOT NULL,
    last_tick INTEGER NOT NULL
);
"#,
    r#"
ALTER TABLE tasks ADD COLUMN depends_on TEXT;
ALTER TABLE tasks ADD COLUMN deps_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN has_dependents INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN dep_failure TEXT;
-- Parent -> child edges of workflows; walked from the parent when it finishes.
CREATE TABLE task_deps (
    parent INTEGER NOT NULL,
    child  INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
"#,
    r#"
ALTER TABLE tasks ADD COLUMN concurrency_key TEXT;
-- Serves cluster-wide limits: running tasks by queue and key.
CREATE INDEX tasks_running_key ON tasks (queue, concurrency_key) WHERE state = 'running';
-- Fixed-window counters of task starts for rate-limited queues.
CREATE TABLE queue_rate (
    queue        TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    started      INTEGER NOT NULL
);
"#,
    r#"
-- Serves bounded counts per queue and state, and listing one queue's tasks
-- (one range per state, merged), so neither walks the whole table.
CREATE INDEX tasks_queue_state ON tasks (queue, state, id);
-- What the node's pool did since it started (JSON, see NodeStats).
ALTER TABLE nodes ADD COLUMN stats TEXT NOT NULL DEFAULT '{}';
"#,
    r#"
-- Serves listing by kind (newest first) without walking the whole table.
CREATE INDEX tasks_kind ON tasks (kind, id);
"#,
];

/// The query behind `queue_counts`: the queues, one index probe each (a
/// loose index scan), then a count of each (queue, state) range that stops at
/// the cap (?1 unfinished, ?2 finished states).
fn queue_counts_sql() -> String {
    format!(
        "WITH RECURSIVE qs(q) AS ( \
           SELECT (SELECT min(queue) FROM tasks) \
           UNION ALL \
           SELECT (SELECT min(queue) FROM tasks WHERE queue > qs.q) FROM qs WHERE qs.q IS NOT NULL), \
         st(s) AS (VALUES {}) \
         SELECT q, s, n FROM (SELECT qs.q AS q, st.s AS s, \
           CASE WHEN st.s IN ('completed', 'failed', 'cancelled') \
           THEN (SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queue_state \
              WHERE queue = qs.q AND state = st.s LIMIT ?2)) \
           ELSE (SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queue_state \
              WHERE queue = qs.q AND state = st.s LIMIT ?1)) END AS n \
         FROM qs, st WHERE qs.q IS NOT NULL) WHERE n > 0",
        TaskState::ALL
            .iter()
            .map(|s| format!("('{}')", s.as_str()))
            .collect::<Vec<_>>()
            .join(", ")
    )
}

/// The query behind `task_list`, with its arguments.
fn list_sql(p: &ListParams) -> (String, Vec<rusqlite::types::Value>) {
    let limit = p.limit.max(1) as i64;
    // Filters other than state and queue, shared by every arm below.
    let mut rest = String::new();
    let mut rest_args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(k) = &p.kind {
        rest.push_str(" AND kind = ?");
        rest_args.push(k.clone().into());
    }
    if let Some(b) = p.before {
        rest.push_str(" AND id < ?");
        rest_args.push(b.0.into());
    }
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let sql = match (&p.state, &p.queue) {
        // One queue, any state: the newest `limit` of each state's
        // range of tasks_queue_state, merged. A plain `queue = ?
        // ORDER BY id DESC` would either walk the whole table by id
        // or sort every task of the queue.
        (None, Some(q)) => {
            let arms: Vec<String> = TaskState::ALL
                .iter()
                .map(|st| {
                    args.push(q.clone().into());
                    args.push(st.as_str().to_string().into());
                    args.extend(rest_args.iter().cloned());
                    args.push(limit.into());
                    format!(
                        "SELECT * FROM (SELECT {TASK_COLS} FROM tasks INDEXED BY tasks_queue_state \
                         WHERE queue = ? AND state = ?{rest} ORDER BY id DESC LIMIT ?)"
                    )
                })
                .collect();
            args.push(limit.into());
            format!("{} ORDER BY id DESC LIMIT ?", arms.join(" UNION ALL "))
        }
        _ => {
            let mut sql = format!("SELECT {TASK_COLS} FROM tasks WHERE 1 = 1");
            if let Some(s) = p.state {
                sql.push_str(" AND state = ?");
                args.push(s.as_str().to_string().into());
            }
            if let Some(q) = &p.queue {
                sql.push_str(" AND queue = ?");
                args.push(q.clone().into());
            }
            sql.push_str(&rest);
            args.extend(rest_args);
            sql.push_str(" ORDER BY id DESC LIMIT ?");
            args.push(limit.into());
            sql
        }
    };
    (sql, args)
}

const TASK_COLS: &str = "id, kind, queue, args, priority, state, attempt, max_attempts, timeout_ms, \
     unique_key, run_at, created_at, started_at, finished_at, node, result, errors, depends_on, \
     concurrency_key";

/// How hard SQLite works to make a commit durable.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
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

type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
type Job = Box<dyn FnOnce(&Connection) -> (Reply, bool) + Send>;

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
    /// Idle read connections. A std mutex: held only to push or pop.
    readers: Mutex<Vec<Connection>>,
    notify: Arc<Notify>,
    events: broadcast::Sender<StoreEvent>,
}

impl std::fmt::Debug for SqliteStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SqliteStore")
            .field("path", &self.inner.path)
            .finish()
    }
}

fn unavailable(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(format!("{}: {e}", path.display()))
}

fn sql_err(e: rusqlite::Error) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

impl SqliteStore {
    /// `EXPLAIN QUERY PLAN` of one of the dashboard's reads, as the store
    /// runs it: one line per plan step. Tests use it to check that list
    /// pages and counts walk indexes, whatever the table holds.
    pub async fn explain(&self, read: super::DashboardRead) -> Result<Vec<String>, StoreError> {
        self.read(move |conn| {
            let (sql, args) = match read {
                super::DashboardRead::TaskList(p) => list_sql(&p),
                super::DashboardRead::QueueCounts => (
                    queue_counts_sql(),
                    vec![
                        super::QUEUE_COUNT_CAP.into(),
                        super::FINISHED_COUNT_CAP.into(),
                    ],
                ),
            };
            let mut st = conn
                .prepare(&format!("EXPLAIN QUERY PLAN {sql}"))
                .map_err(sql_err)?;
            st.query_map(rusqlite::params_from_iter(args), |r| r.get::<_, String>(3))
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)
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
        std::thread::Builder::new()
            .name("proto_tasker-sqlite-writer".into())
            .spawn(move || writer_loop(conn, rx))
            .map_err(|e| unavailable(&path, e))?;
        let (events, _) = broadcast::channel(1024);
        Ok(SqliteStore {
            inner: Arc::new(Inner {
                path,
                options,
                writer: Mutex::new(Some(tx)),
                readers: Mutex::new(Vec::new()),
                notify: Arc::new(Notify::new()),
                events,
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

    /// Run `f` on the writer thread inside the group transaction.
    async fn write<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let (tx, rx) = oneshot::channel();
        let job: Job = Box::new(move |conn| {
            let r = f(conn);
            let ok = r.is_ok();
            let reply: Reply = Box::new(move |commit_err| {
                let _ = tx.send(match commit_err {
                    None => r,
                    Some(e) => Err(e.clone()),
                });
            });
            (reply, ok)
        });
        let sender = self
            .inner
            .writer
            .lock()
            .map_err(|_| StoreError::Unavailable("writer lock poisoned".into()))?
            .clone()
            .ok_or_else(|| StoreError::Unavailable("store is closed".into()))?;
        sender
            .send(job)
            .map_err(|_| unavailable(&self.inner.path, "writer thread stopped"))?;
        rx.await
            .map_err(|_| unavailable(&self.inner.path, "writer thread stopped"))?
    }

    /// Run `f` on a read connection on a blocking thread.
    async fn read<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Connection) -> Result<T, StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
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
        .map_err(|e| StoreError::Unavailable(format!("read task failed: {e}")))?
    }
}

fn open_conn(options: &SqliteOptions, read_only: bool) -> Result<Connection, StoreError> {
    let path = &options.path;
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(|e| unavailable(path, e))?;
    conn.busy_timeout(options.busy_timeout)
        .map_err(|e| unavailable(path, e))?;
    conn.set_prepared_statement_cache_capacity(64);
    if !read_only {
        let sync = match options.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        // journal_mode returns a row; a file that is not a database fails here.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| unavailable(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(unavailable(path, format!("cannot enable WAL (got {mode})")));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(|e| unavailable(path, e))?;
    }
    Ok(conn)
}

/// The writer thread: group commit. See the module docs.
fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let err = sql_err(e);
            for job in batch.drain(..) {
                // The job never ran; answer its caller with the error.
                let (reply, _) = job_skip(job, &conn);
                reply(Some(&err));
            }
            continue;
        }
        for job in batch.drain(..) {
            let sp = conn.execute_batch("SAVEPOINT job");
            let (reply, ok) = job(&conn);
            let undo = if ok {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            if sp.is_ok() {
                let _ = conn.execute_batch(undo);
            }
            replies.push(reply);
        }
        match conn.execute_batch("COMMIT") {
            Ok(()) => replies.drain(..).for_each(|r| r(None)),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let err = sql_err(e);
                replies.drain(..).for_each(|r| r(Some(&err)));
            }
        }
    }
}

/// When BEGIN failed we still need each job's reply channel; running the job
/// outside a transaction would write without group semantics, so instead we
/// run it inside a savepoint that is always rolled back.
fn job_skip(job: Job, conn: &Connection) -> (Reply, bool) {
    let _ = conn.execute_batch("SAVEPOINT skip");
    let r = job(conn);
    let _ = conn.execute_batch("ROLLBACK TO skip; RELEASE skip");
    r
}

fn opt_micros(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_micros)
}

fn row_to_task(r: &Row<'_>) -> rusqlite::Result<Task> {
    let args: String = r.get(3)?;
    let state: String = r.get(5)?;
    let result: Option<String> = r.get(15)?;
    let errors: String = r.get(16)?;
    let depends_on: Option<String> = r.get(17)?;
    let conv = |i: usize, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
    };
    Ok(Task {
        id: TaskId(r.get(0)?),
        kind: r.get(1)?,
        queue: r.get(2)?,
        args: serde_json::from_str(&args).map_err(|e| conv(3, Box::new(e)))?,
        priority: r.get(4)?,
        state: state.parse().map_err(|e| conv(5, Box::new(e)))?,
        attempt: r.get(6)?,
        max_attempts: r.get(7)?,
        timeout_ms: r.get(8)?,
        unique_key: r.get(9)?,
        run_at: from_micros(r.get(10)?),
        created_at: from_micros(r.get(11)?),
        started_at: opt_micros(r.get(12)?),
        finished_at: opt_micros(r.get(13)?),
        node: r.get(14)?,
        result: match result {
            Some(s) => Some(serde_json::from_str(&s).map_err(|e| conv(15, Box::new(e)))?),
            None => None,
        },
        errors: serde_json::from_str(&errors).map_err(|e| conv(16, Box::new(e)))?,
        depends_on: match depends_on {
            Some(d) => serde_json::from_str(&d).map_err(|e| conv(17, Box::new(e)))?,
            None => Vec::new(),
        },
        concurrency_key: r.get(18)?,
    })
}

fn get_task(conn: &Connection, id: TaskId) -> Result<Option<Task>, StoreError> {
    conn.prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks WHERE id = ?1"))
        .and_then(|mut st| st.query_row([id.0], row_to_task).optional())
        .map_err(sql_err)
}

fn error_json(attempt: i32, at: DateTime<Utc>, message: &str) -> String {
    serde_json::to_string(&AttemptError {
        attempt,
        at,
        message: message.to_string(),
    })
    .unwrap_or_else(|_| "{}".to_string())
}

fn insert_one(
    conn: &Connection,
    t: &TaskInsert,
    args_json: &str,
    now: DateTime<Utc>,
    batch: &[Inserted],
) -> Result<Inserted, StoreError> {
    if let Some(key) = &t.unique_key {
        let existing = conn
            .prepare_cached(&format!(
                "SELECT {TASK_COLS} FROM tasks WHERE unique_key = ?1 \
                 AND state NOT IN ('completed', 'failed', 'cancelled')"
            ))
            .and_then(|mut st| st.query_row([key], row_to_task).optional())
            .map_err(sql_err)?;
        if let Some(task) = existing {
            return Ok(Inserted {
                task,
                existing: true,
            });
        }
    }
    // Parents: existing tasks, or rows of this insert already written.
    let mut parents: Vec<TaskId> = Vec::new();
    for d in &t.depends_on {
        let id = match *d {
            Dependency::Task(id) => id,
            Dependency::Batch(j) => batch.get(j).map(|i| i.task.id).ok_or_else(|| {
                StoreError::Invalid(format!("depends_on: batch task {j} comes later"))
            })?,
        };
        if !parents.contains(&id) {
            parents.push(id);
        }
    }
    let mut pending = 0;
    let mut broken = None;
    for p in &parents {
        let state: Option<String> = conn
            .prepare_cached("SELECT state FROM tasks WHERE id = ?1")
            .and_then(|mut st| st.query_row([p.0], |r| r.get(0)).optional())
            .map_err(sql_err)?;
        match state.as_deref() {
            None => {
                return Err(StoreError::Invalid(format!(
                    "depends_on: task {p} does not exist"
                )));
            }
            Some("completed") => {}
            Some("failed" | "cancelled") => broken = Some(*p),
            Some(_) => pending += 1,
        }
    }
    let mut task = t.to_task(TaskId(0), now);
    task.depends_on = parents.clone();
    super::apply_parents(&mut task, t.on_dependency_failure, broken, pending, now);
    let deps_json = (!parents.is_empty())
        .then(|| serde_json::to_string(&parents).unwrap_or_else(|_| "[]".into()));
    let errors_json = serde_json::to_string(&task.errors).unwrap_or_else(|_| "[]".into());
    let mut st = conn
        .prepare_cached(
            "INSERT INTO tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, \
             unique_key, run_at, created_at, depends_on, deps_pending, dep_failure, finished_at, errors, \
             concurrency_key) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16)",
        )
        .map_err(sql_err)?;
    st.execute(params![
        t.kind,
        t.queue,
        args_json,
        t.priority,
        task.state.as_str(),
        t.max_attempts,
        t.timeout_ms,
        t.unique_key,
        to_micros(t.run_at),
        to_micros(now),
        deps_json,
        pending,
        t.on_dependency_failure.as_str(),
        task.finished_at.map(to_micros),
        errors_json,
        t.concurrency_key,
    ])
    .map_err(sql_err)?;
    task.id = TaskId(conn.last_insert_rowid());
    for p in &parents {
        conn.prepare_cached("INSERT OR IGNORE INTO task_deps (parent, child) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(params![p.0, task.id.0]))
            .map_err(sql_err)?;
        conn.prepare_cached("UPDATE tasks SET has_dependents = 1 WHERE id = ?1")
            .and_then(|mut st| st.execute([p.0]))
            .map_err(sql_err)?;
    }
    Ok(Inserted {
        task,
        existing: false,
    })
}

/// Claim under cluster-wide limits: no more than the queue's free global
/// slots, its rate window's remaining starts, and per key its free slots.
fn claim_limited(
    conn: &Connection,
    p: &ClaimParams,
    limits: QueueLimits,
) -> Result<Vec<Task>, StoreError> {
    let now = to_micros(p.now);
    let mut allowed = p.limit as i64;
    if let Some(g) = limits.global_concurrency {
        let running: i64 = conn
            .prepare_cached("SELECT count(*) FROM tasks WHERE queue = ?1 AND state = 'running'")
            .and_then(|mut st| st.query_row([&p.queue], |r| r.get(0)))
            .map_err(sql_err)?;
        allowed = allowed.min(i64::from(g) - running);
    }
    let mut window: Option<(i64, i64)> = None;
    if let Some((max, per)) = limits.rate {
        let row: Option<(i64, i64)> = conn
            .prepare_cached("SELECT window_start, started FROM queue_rate WHERE queue = ?1")
            .and_then(|mut st| {
                st.query_row([&p.queue], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sql_err)?;
        let per = i64::try_from(per.as_micros()).unwrap_or(i64::MAX);
        let (start, started) = match row {
            Some((start, started)) if now - start < per => (start, started),
            _ => (now, 0),
        };
        allowed = allowed.min(i64::from(max) - started);
        window = Some((start, started));
    }
    if allowed <= 0 {
        return Ok(Vec::new());
    }
    let per_key = limits
        .per_key_concurrency
        .map(i64::from)
        .unwrap_or(i64::MAX);
    // Look a bounded way down the queue for tasks whose keys have room;
    // without a per-key limit the first `allowed` tasks are the answer.
    let scan = if limits.per_key_concurrency.is_some() {
        allowed * 2 + 16
    } else {
        allowed
    };
    let ids: Vec<i64> = conn
        .prepare_cached(
            "SELECT c.id FROM ( \
               SELECT id, priority, run_at, concurrency_key, \
                 row_number() OVER (PARTITION BY concurrency_key ORDER BY priority, run_at, id) AS rk \
               FROM (SELECT id, priority, run_at, concurrency_key FROM tasks WHERE queue = ?1 \
                       AND state IN ('available', 'scheduled', 'retryable') AND run_at <= ?2 \
                       AND NOT EXISTS (SELECT 1 FROM queues WHERE name = ?1 AND paused = 1) \
                       AND (concurrency_key IS NULL OR concurrency_key NOT IN ( \
                         SELECT concurrency_key FROM tasks WHERE queue = ?1 AND state = 'running' \
                           AND concurrency_key IS NOT NULL GROUP BY concurrency_key HAVING count(*) >= ?4)) \
                     ORDER BY priority, run_at, id LIMIT ?3)) c \
             LEFT JOIN (SELECT concurrency_key AS k, count(*) AS n FROM tasks \
                        WHERE queue = ?1 AND state = 'running' AND concurrency_key IS NOT NULL \
                        GROUP BY concurrency_key) r ON r.k = c.concurrency_key \
             WHERE c.concurrency_key IS NULL OR c.rk + coalesce(r.n, 0) <= ?4 \
             ORDER BY c.priority, c.run_at, c.id LIMIT ?5",
        )
        .and_then(|mut st| {
            st.query_map(params![p.queue, now, scan, per_key, allowed], |r| r.get(0))?
                .collect::<Result<Vec<i64>, _>>()
        })
        .map_err(sql_err)?;
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let ids_json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
    let tasks = fetch_tasks(
        conn,
        &format!(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, node = ?1, started_at = ?2, \
             cancel_requested = 0 WHERE id IN (SELECT value FROM json_each(?3)) \
             AND state IN ('available', 'scheduled', 'retryable') RETURNING {TASK_COLS}"
        ),
        params![p.node, now, ids_json],
    )?;
    if let Some((start, started)) = window {
        conn.prepare_cached(
            "INSERT INTO queue_rate (queue, window_start, started) VALUES (?1, ?2, ?3) \
             ON CONFLICT (queue) DO UPDATE SET window_start = excluded.window_start, started = excluded.started",
        )
        .and_then(|mut st| st.execute(params![p.queue, start, started + tasks.len() as i64]))
        .map_err(sql_err)?;
    }
    Ok(tasks)
}

/// Rows with their times cut to store precision, and their args serialized
/// here rather than on the writer thread, which is the bottleneck.
fn prepare_rows(tasks: Vec<TaskInsert>) -> Result<(Vec<TaskInsert>, Vec<String>), StoreError> {
    let tasks = super::truncate_rows(tasks);
    let args = tasks
        .iter()
        .map(|t| serde_json::to_string(&t.args))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::Invalid(e.to_string()))?;
    Ok((tasks, args))
}

/// Insert rows in order; batch references point at earlier rows.
fn insert_all(
    conn: &Connection,
    tasks: &[TaskInsert],
    args: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, StoreError> {
    let mut out: Vec<Inserted> = Vec::with_capacity(tasks.len());
    for (t, a) in tasks.iter().zip(args) {
        let i = insert_one(conn, t, a, now, &out)?;
        out.push(i);
    }
    Ok(out)
}

/// `parents` completed: their blocked children each wait for one parent
/// fewer, and run once they wait for none.
fn unblock(conn: &Connection, parents: &[i64]) -> Result<(), StoreError> {
    if parents.is_empty() {
        return Ok(());
    }
    let ids = serde_json::to_string(parents).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "UPDATE tasks SET \
           deps_pending = deps_pending - (SELECT count(*) FROM task_deps d \
             WHERE d.child = tasks.id AND d.parent IN (SELECT value FROM json_each(?1))), \
           state = CASE WHEN deps_pending - (SELECT count(*) FROM task_deps d \
             WHERE d.child = tasks.id AND d.parent IN (SELECT value FROM json_each(?1))) <= 0 \
             THEN 'available' ELSE state END \
         WHERE state = 'blocked' AND id IN \
           (SELECT child FROM task_deps WHERE parent IN (SELECT value FROM json_each(?1)))",
    )
    .and_then(|mut st| st.execute([ids]))
    .map_err(sql_err)?;
    Ok(())
}

/// `parents` failed for good or were cancelled: every blocked task that
/// waits for them, directly or through other blocked tasks, ends per its
/// `on_dependency_failure`.
fn cascade(conn: &Connection, parents: &[i64], now: DateTime<Utc>) -> Result<(), StoreError> {
    if parents.is_empty() {
        return Ok(());
    }
    let ids = serde_json::to_string(parents).unwrap_or_else(|_| "[]".into());
    let now_text = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    conn.prepare_cached(
        "WITH RECURSIVE doomed(id) AS ( \
           SELECT child FROM task_deps WHERE parent IN (SELECT value FROM json_each(?1)) \
           UNION SELECT d.child FROM task_deps d JOIN doomed ON d.parent = doomed.id) \
         UPDATE tasks SET \
           state = CASE WHEN dep_failure = 'fail' THEN 'failed' ELSE 'cancelled' END, \
           finished_at = ?2, \
           errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?3, \
             'message', 'a task it depends on did not complete')) \
         WHERE state = 'blocked' AND id IN (SELECT id FROM doomed)",
    )
    .and_then(|mut st| st.execute(params![ids, to_micros(now), now_text]))
    .map_err(sql_err)?;
    Ok(())
}

/// Write one outcome. `None` when fencing refused it; otherwise whether
/// the task has dependents (so the caller unblocks or cancels them).
fn complete_one(conn: &Connection, c: &Completion) -> Result<Option<bool>, StoreError> {
    let at = to_micros(c.at);
    let id = c.id.0;
    match &c.outcome {
        Outcome::Completed { result } => {
            let result =
                serde_json::to_string(result).map_err(|e| StoreError::Invalid(e.to_string()))?;
            conn.prepare_cached(
                "UPDATE tasks SET state = 'completed', finished_at = ?1, result = ?2 \
                 WHERE id = ?3 AND state = 'running' AND attempt = ?4 RETURNING has_dependents",
            )
            .and_then(|mut st| {
                st.query_row(params![at, result, id, c.attempt], |r| r.get::<_, bool>(0))
                    .optional()
            })
        }
        Outcome::Retry { run_at, error } => conn
            .prepare_cached(
                "UPDATE tasks SET state = 'retryable', run_at = ?1, \
                 errors = json_insert(errors, '$[#]', json(?2)) \
                 WHERE id = ?3 AND state = 'running' AND attempt = ?4 RETURNING has_dependents",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![
                        to_micros(*run_at),
                        error_json(c.attempt, c.at, error),
                        id,
                        c.attempt
                    ],
                    |r| r.get::<_, bool>(0),
                )
                .optional()
            }),
        Outcome::Failed { error } | Outcome::Cancelled { error } => {
            let state = if matches!(c.outcome, Outcome::Failed { .. }) {
                "failed"
            } else {
                "cancelled"
            };
            conn.prepare_cached(
                "UPDATE tasks SET state = ?1, finished_at = ?2, \
                 errors = json_insert(errors, '$[#]', json(?3)) \
                 WHERE id = ?4 AND state = 'running' AND attempt = ?5 RETURNING has_dependents",
            )
            .and_then(|mut st| {
                st.query_row(
                    params![state, at, error_json(c.attempt, c.at, error), id, c.attempt],
                    |r| r.get::<_, bool>(0),
                )
                .optional()
            })
        }
        Outcome::Snoozed { run_at } => conn
            .prepare_cached(
                "UPDATE tasks SET state = 'scheduled', run_at = ?1, attempt = attempt - 1 \
                 WHERE id = ?2 AND state = 'running' AND attempt = ?3 RETURNING has_dependents",
            )
            .and_then(|mut st| {
                st.query_row(params![to_micros(*run_at), id, c.attempt], |r| {
                    r.get::<_, bool>(0)
                })
                .optional()
            }),
        Outcome::Released => conn
            .prepare_cached(
                "UPDATE tasks SET state = 'available', run_at = ?1, attempt = attempt - 1 \
                 WHERE id = ?2 AND state = 'running' AND attempt = ?3 RETURNING has_dependents",
            )
            .and_then(|mut st| {
                st.query_row(params![at, id, c.attempt], |r| r.get::<_, bool>(0))
                    .optional()
            }),
    }
    .map_err(sql_err)
}

fn fetch_tasks(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<Task>, StoreError> {
    let mut st = conn.prepare_cached(sql).map_err(sql_err)?;
    let rows = st
        .query_map(p, row_to_task)
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    Ok(rows)
}

#[async_trait]
impl Store for SqliteStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let path = self.inner.path.clone();
        self.write(move |conn| {
            let version: i64 = conn
                .query_row("PRAGMA user_version", [], |r| r.get(0))
                .map_err(|e| unavailable(&path, e))?;
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
                    .query_row("SELECT count(*) FROM sqlite_master WHERE type = 'table'", [], |r| r.get(0))
                    .map_err(|e| unavailable(&path, e))?;
                if tables > 0 {
                    return Err(StoreError::Schema(format!(
                        "{}: the file holds tables but no proto_tasker schema; refusing to touch it",
                        path.display()
                    )));
                }
            }
            for (i, sql) in MIGRATIONS.iter().enumerate().skip(version as usize) {
                conn.execute_batch(sql)
                    .map_err(|e| StoreError::Schema(format!("{}: migration {}: {e}", path.display(), i + 1)))?;
                conn.execute_batch(&format!("PRAGMA user_version = {}", i + 1))
                    .map_err(sql_err)?;
            }
            Ok(())
        })
        .await
    }

    async fn task_insert_many(
        &self,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Inserted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let now = super::truncate_micros(now);
        let (tasks, args) = prepare_rows(tasks)?;
        let out = self
            .write(move |conn| insert_all(conn, &tasks, &args, now))
            .await?;
        if out
            .iter()
            .any(|i| !i.existing && i.task.state == TaskState::Available)
        {
            self.inner.notify.notify_waiters();
        }
        Ok(out)
    }

    async fn task_claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        let mut tasks = self
            .write(move |conn| match p.limits.filter(|l| !l.is_empty()) {
                None => fetch_tasks(
                    conn,
                    &format!(
                        "UPDATE tasks SET state = 'running', attempt = attempt + 1, node = ?1, \
                         started_at = ?2, cancel_requested = 0 \
                         WHERE id IN (SELECT id FROM tasks WHERE queue = ?3 \
                           AND state IN ('available', 'scheduled', 'retryable') AND run_at <= ?2 \
                           AND NOT EXISTS (SELECT 1 FROM queues WHERE name = ?3 AND paused = 1) \
                           ORDER BY priority, run_at, id LIMIT ?4) \
                         RETURNING {TASK_COLS}"
                    ),
                    params![p.node, to_micros(p.now), p.queue, p.limit as i64],
                ),
                // The writer thread is the only writer, so counting and claiming
                // here cannot race another claimer.
                Some(limits) => claim_limited(conn, &p, limits),
            })
            .await?;
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
        let wake = completions
            .iter()
            .any(|c| matches!(c.outcome, Outcome::Released));
        let (out, unblocked) = self
            .write(move |conn| {
                let mut applied = Vec::with_capacity(completions.len());
                let (mut done, mut doomed) = (Vec::new(), Vec::new());
                for c in &completions {
                    let r = complete_one(conn, c)?;
                    if r == Some(true) {
                        match c.outcome {
                            Outcome::Completed { .. } => done.push(c.id.0),
                            Outcome::Failed { .. } | Outcome::Cancelled { .. } => {
                                doomed.push(c.id.0)
                            }
                            _ => {}
                        }
                    }
                    applied.push(r.is_some());
                }
                unblock(conn, &done)?;
                if let Some(at) = completions.first().map(|c| c.at) {
                    cascade(conn, &doomed, at)?;
                }
                Ok((applied, !done.is_empty()))
            })
            .await?;
        if wake || unblocked {
            self.inner.notify.notify_waiters();
        }
        Ok(out)
    }

    async fn task_get(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        self.read(move |conn| get_task(conn, id)).await
    }

    async fn task_list(&self, p: ListParams) -> Result<Vec<Task>, StoreError> {
        self.read(move |conn| {
            let (sql, args) = list_sql(&p);
            fetch_tasks(conn, &sql, rusqlite::params_from_iter(args))
        })
        .await
    }

    async fn task_cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let task = self
            .write(move |conn| {
                let task = get_task(conn, id)?.ok_or(StoreError::NotFound(id))?;
                if task.state.is_finished() {
                    return Err(StoreError::Conflict {
                        id,
                        state: task.state,
                        message: "a finished task cannot be cancelled".into(),
                    });
                }
                if task.state == TaskState::Running {
                    conn.execute(
                        "UPDATE tasks SET cancel_requested = 1 WHERE id = ?1",
                        [id.0],
                    )
                    .map_err(sql_err)?;
                } else {
                    conn.execute(
                        "UPDATE tasks SET state = 'cancelled', finished_at = ?1 WHERE id = ?2",
                        params![to_micros(now), id.0],
                    )
                    .map_err(sql_err)?;
                    cascade(conn, &[id.0], now)?;
                }
                get_task(conn, id)?.ok_or(StoreError::NotFound(id))
            })
            .await?;
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
            .write(move |conn| {
                let task = get_task(conn, id)?.ok_or(StoreError::NotFound(id))?;
                if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
                    return Err(StoreError::Conflict {
                        id,
                        state: task.state,
                        message: "only failed or cancelled tasks can be retried".into(),
                    });
                }
                let r = conn.execute(
                    "UPDATE tasks SET state = 'available', run_at = ?1, finished_at = NULL, \
                     cancel_requested = 0, max_attempts = max(max_attempts, attempt + 1) WHERE id = ?2",
                    params![to_micros(now), id.0],
                );
                match r {
                    Ok(_) => {}
                    Err(rusqlite::Error::SqliteFailure(e, _))
                        if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                    {
                        return Err(StoreError::Conflict {
                            id,
                            state: task.state,
                            message: format!(
                                "another unfinished task holds unique_key {:?}",
                                task.unique_key.unwrap_or_default()
                            ),
                        });
                    }
                    Err(e) => return Err(sql_err(e)),
                }
                get_task(conn, id)?.ok_or(StoreError::NotFound(id))
            })
            .await?;
        self.inner.notify.notify_waiters();
        Ok(task)
    }

    async fn task_cancel_requested(&self, node: &str) -> Result<Vec<(TaskId, i32)>, StoreError> {
        let node = node.to_string();
        self.read(move |conn| {
            let mut st = conn
                .prepare_cached(
                    "SELECT id, attempt FROM tasks WHERE state = 'running' AND node = ?1 \
                     AND cancel_requested = 1",
                )
                .map_err(sql_err)?;
            st.query_map([node], |r| Ok((TaskId(r.get(0)?), r.get(1)?)))
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)
        })
        .await
    }

    async fn task_prune(&self, p: PruneParams) -> Result<u64, StoreError> {
        self.write(move |conn| {
            let mut total = 0u64;
            let limit = p.limit.max(1) as i64;
            for (state, before) in [
                ("completed", p.completed_before),
                ("failed", p.failed_before),
                ("cancelled", p.cancelled_before),
            ] {
                let Some(before) = before else { continue };
                let n = conn
                    .prepare_cached(
                        "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks \
                         WHERE state = ?1 AND finished_at < ?2 LIMIT ?3)",
                    )
                    .and_then(|mut st| st.execute(params![state, to_micros(before), limit]))
                    .map_err(sql_err)?;
                total += n as u64;
            }
            Ok(total)
        })
        .await
    }

    async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError> {
        self.read(|conn| {
            let mut st = conn.prepare_cached(&queue_counts_sql()).map_err(sql_err)?;
            let rows = st
                .query_map([super::QUEUE_COUNT_CAP, super::FINISHED_COUNT_CAP], |r| {
                    Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            rows.into_iter()
                .map(|(q, s, n)| {
                    let state = s.parse().map_err(|e: crate::task::UnknownState| {
                        StoreError::Schema(e.to_string())
                    })?;
                    Ok((q, state, n))
                })
                .collect()
        })
        .await
    }

    async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError> {
        let queue = queue.to_string();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO queues (name, paused) VALUES (?1, ?2) \
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
            )
            .and_then(|mut st| st.execute(params![queue, paused]))
            .map_err(sql_err)?;
            Ok(())
        })
        .await?;
        if !paused {
            self.inner.notify.notify_waiters();
        }
        Ok(())
    }

    async fn queue_paused(&self) -> Result<Vec<String>, StoreError> {
        self.read(|conn| {
            let mut st = conn
                .prepare_cached("SELECT name FROM queues WHERE paused = 1 ORDER BY name")
                .map_err(sql_err)?;
            st.query_map([], |r| r.get(0))
                .map_err(sql_err)?
                .collect::<Result<Vec<String>, _>>()
                .map_err(sql_err)
        })
        .await
    }

    async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError> {
        let spec =
            serde_json::to_string(&row.spec).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO schedules (name, spec, source, last_tick) VALUES (?1, ?2, ?3, ?4) \
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, source = excluded.source",
            )
            .and_then(|mut st| {
                st.execute(params![
                    row.name,
                    spec,
                    row.source,
                    to_micros(row.last_tick)
                ])
            })
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError> {
        let name = name.to_string();
        self.write(move |conn| {
            conn.execute("DELETE FROM schedules WHERE name = ?1", [name])
                .map(|n| n > 0)
                .map_err(sql_err)
        })
        .await
    }

    async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        self.read(|conn| {
            let mut st = conn
                .prepare_cached("SELECT name, spec, source, last_tick FROM schedules ORDER BY name")
                .map_err(sql_err)?;
            let rows = st
                .query_map([], |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get::<_, String>(1)?,
                        r.get::<_, String>(2)?,
                        r.get::<_, i64>(3)?,
                    ))
                })
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
            rows.into_iter()
                .map(|(name, spec, source, last)| {
                    Ok(ScheduleRow {
                        name,
                        spec: serde_json::from_str(&spec)
                            .map_err(|e| StoreError::Schema(format!("schedules.spec: {e}")))?,
                        source,
                        last_tick: from_micros(last),
                    })
                })
                .collect()
        })
        .await
    }

    async fn schedule_fire(
        &self,
        name: &str,
        expected: DateTime<Utc>,
        new_last: DateTime<Utc>,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Inserted>>, StoreError> {
        let name = name.to_string();
        let now = super::truncate_micros(now);
        let (tasks, args) = prepare_rows(tasks)?;
        let out = self
            .write(move |conn| {
                let moved = conn
                    .execute(
                        "UPDATE schedules SET last_tick = ?1 WHERE name = ?2 AND last_tick = ?3",
                        params![to_micros(new_last), name, to_micros(expected)],
                    )
                    .map_err(sql_err)?;
                if moved == 0 {
                    return Ok(None);
                }
                insert_all(conn, &tasks, &args, now).map(Some)
            })
            .await?;
        if out.as_ref().is_some_and(|v| v.iter().any(|i| !i.existing)) {
            self.inner.notify.notify_waiters();
        }
        Ok(out)
    }

    async fn node_heartbeat(&self, n: NodeInfo) -> Result<(), StoreError> {
        let queues =
            serde_json::to_string(&n.queues).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let stats =
            serde_json::to_string(&n.stats).map_err(|e| StoreError::Invalid(e.to_string()))?;
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO nodes (name, version, started_at, heartbeat_at, workers, workers_busy, queues, stats) \
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8) ON CONFLICT (name) DO UPDATE SET \
                 version = excluded.version, started_at = excluded.started_at, \
                 heartbeat_at = excluded.heartbeat_at, workers = excluded.workers, \
                 workers_busy = excluded.workers_busy, queues = excluded.queues, stats = excluded.stats",
            )
            .and_then(|mut st| {
                st.execute(params![
                    n.name,
                    n.version,
                    to_micros(n.started_at),
                    to_micros(n.heartbeat_at),
                    n.workers,
                    n.workers_busy,
                    queues,
                    stats
                ])
            })
            .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn node_remove(&self, name: &str) -> Result<(), StoreError> {
        let name = name.to_string();
        self.write(move |conn| {
            conn.execute("DELETE FROM nodes WHERE name = ?1", [&name])
                .map_err(sql_err)?;
            conn.execute("DELETE FROM leader WHERE node = ?1", [&name])
                .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    async fn node_list(&self) -> Result<Vec<NodeInfo>, StoreError> {
        self.read(|conn| {
            let now = to_micros(Utc::now());
            let mut st = conn
                .prepare_cached(
                    "SELECT n.name, n.version, n.started_at, n.heartbeat_at, n.workers, n.workers_busy, \
                     n.queues, (l.node IS NOT NULL), n.stats FROM nodes n \
                     LEFT JOIN leader l ON l.node = n.name AND l.expires_at > ?1 ORDER BY n.name",
                )
                .map_err(sql_err)?;
            st.query_map([now], |r| {
                let queues: String = r.get(6)?;
                let stats: String = r.get(8)?;
                Ok(NodeInfo {
                    name: r.get(0)?,
                    version: r.get(1)?,
                    started_at: from_micros(r.get(2)?),
                    heartbeat_at: from_micros(r.get(3)?),
                    workers: r.get(4)?,
                    workers_busy: r.get(5)?,
                    queues: serde_json::from_str(&queues).unwrap_or_default(),
                    leader: r.get(7)?,
                    stats: serde_json::from_str(&stats).unwrap_or_default(),
                })
            })
            .map_err(sql_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(sql_err)
        })
        .await
    }

    async fn node_rescue(&self, p: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        let rescued: Vec<Rescued> = self
            .write(move |conn| {
                let now = to_micros(p.now);
                let cutoff = to_micros(p.now - chrono::Duration::from_std(p.node_timeout).unwrap_or_default());
                let now_text = p.now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
                let set = "UPDATE tasks SET \
                     state = CASE WHEN cancel_requested = 1 THEN 'cancelled' \
                                  WHEN attempt >= max_attempts THEN 'failed' ELSE 'retryable' END, \
                     finished_at = CASE WHEN cancel_requested = 1 OR attempt >= max_attempts THEN ?1 ELSE NULL END, \
                     run_at = ?1, \
                     errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?2, \
                        'message', 'node ' || coalesce(node, '?') || ' stopped while running the task; rescued'))";
                let sql = match &p.node {
                    Some(_) => format!(
                        "{set} WHERE state = 'running' AND node = ?3 \
                         AND id NOT IN (SELECT value FROM json_each(?4)) AND started_at < ?5 \
                         RETURNING id, node, state"
                    ),
                    None => format!(
                        "{set} WHERE state = 'running' AND (node IS NULL OR node NOT IN \
                         (SELECT name FROM nodes WHERE heartbeat_at >= ?3)) RETURNING id, node, state"
                    ),
                };
                let mut st = conn.prepare_cached(&sql).map_err(sql_err)?;
                let map = |r: &Row<'_>| -> rusqlite::Result<(i64, Option<String>, String)> {
                    Ok((r.get(0)?, r.get(1)?, r.get(2)?))
                };
                let rows = match &p.node {
                    Some(n) => {
                        let keep = serde_json::to_string(&p.keep.iter().map(|t| t.0).collect::<Vec<_>>())
                            .unwrap_or_else(|_| "[]".into());
                        let before = p.started_before.map(to_micros).unwrap_or(i64::MAX);
                        st.query_map(params![now, now_text, n, keep, before], map)
                    }
                    None => st.query_map(params![now, now_text, cutoff], map),
                }
                .map_err(sql_err)?
                .collect::<Result<Vec<_>, _>>()
                .map_err(sql_err)?;
                let ended: Vec<i64> = rows
                    .iter()
                    .filter(|(_, _, st)| st == "failed" || st == "cancelled")
                    .map(|(id, _, _)| *id)
                    .collect();
                cascade(conn, &ended, p.now)?;
                rows.into_iter()
                    .map(|(id, node, state)| {
                        Ok(Rescued {
                            id: TaskId(id),
                            node,
                            state: state.parse().map_err(|e: crate::task::UnknownState| StoreError::Schema(e.to_string()))?,
                        })
                    })
                    .collect()
            })
            .await?;
        if !rescued.is_empty() {
            self.inner.notify.notify_waiters();
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
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        self.write(move |conn| {
            conn.prepare_cached(
                "INSERT INTO leader (id, node, expires_at) VALUES (1, ?1, ?2) \
                 ON CONFLICT (id) DO UPDATE SET node = excluded.node, expires_at = excluded.expires_at \
                 WHERE leader.node = excluded.node OR leader.expires_at <= ?3 RETURNING node",
            )
            .and_then(|mut st| {
                st.query_row(params![node, to_micros(expires), to_micros(now)], |r| {
                    r.get::<_, String>(0)
                })
                .optional()
            })
            .map(|r| r.as_deref() == Some(node.as_str()))
            .map_err(sql_err)
        })
        .await
    }

    async fn leader_resign(&self, node: &str) -> Result<(), StoreError> {
        let node = node.to_string();
        self.write(move |conn| {
            conn.execute("DELETE FROM leader WHERE node = ?1", [node])
                .map_err(sql_err)?;
            Ok(())
        })
        .await
    }

    fn work_notifier(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
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
