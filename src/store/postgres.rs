//! The distributed store: every node of a cluster points at one PostgreSQL
//! database.
//!
//! # Overview
//!
//! - Claims take a batch in one statement with `FOR UPDATE SKIP LOCKED`, so
//!   concurrent claimers on any number of nodes never take the same task and
//!   never wait on each other.
//! - Inserts of many tasks are one `INSERT ... SELECT FROM unnest(...)`;
//!   outcomes of many attempts are one `UPDATE ... FROM unnest(...)`.
//!   Statements are prepared once per connection (deadpool's statement cache).
//! - Wake-ups: after an insert commits, the store queues a NOTIFY; a notifier
//!   task coalesces what is queued into one `pg_notify` (NOTIFY takes a
//!   cluster-wide lock until commit, so it is never sent per row or from a
//!   trigger). Each store keeps one dedicated LISTEN connection, reconnected
//!   with backoff when it drops; producers also poll, so a lost notification
//!   delays work by at most the poll interval.
//! - Everything lives in one schema (default `proto_tasker`), so several
//!   clusters, or parallel tests, can share a database. Every statement names
//!   the schema, which is what lets [`insert_in`] work on a caller's own
//!   connection whatever its `search_path`.
//! - Migrations run under a transaction-scoped advisory lock, so nodes that
//!   start together migrate once.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use futures::StreamExt;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_postgres::{AsyncMessage, GenericClient, NoTls, Row};
use tokio_util::sync::CancellationToken;

use super::{
    ClaimParams, Completion, Inserted, ListParams, NodeInfo, Outcome, PruneParams, QueueLimits,
    RescueParams, Rescued, ScheduleRow, Store, StoreError, StoreEvent, TaskInsert, truncate_micros,
};
use crate::task::{AttemptError, Dependency, Task, TaskId, TaskState};

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub url: String,
    /// The schema that holds proto_tasker's tables.
    pub schema: String,
    /// Connections in the pool (the LISTEN connection is extra).
    pub pool_size: usize,
}

impl PostgresOptions {
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            schema: "proto_tasker".into(),
            pool_size: 16,
        }
    }

    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    sql: Sql,
    schema: String,
    channel: String,
    notify: Arc<Notify>,
    events: broadcast::Sender<StoreEvent>,
    /// Queued NOTIFY payloads; the notifier task coalesces them.
    outbox: mpsc::UnboundedSender<String>,
    stop: CancellationToken,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl std::fmt::Debug for PostgresStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresStore")
            .field("schema", &self.inner.schema)
            .finish()
    }
}

fn db_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => StoreError::Unavailable(format!("{}: {}", d.code().code(), d.message())),
        None => StoreError::Unavailable(e.to_string()),
    }
}

fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    StoreError::Unavailable(format!("no database connection: {e}"))
}

fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
    e.code() == Some(&tokio_postgres::error::SqlState::UNIQUE_VIOLATION)
}

/// A schema name is spliced into SQL, so only plain identifiers are accepted.
fn check_schema(s: &str) -> Result<(), StoreError> {
    let ok = !s.is_empty()
        && s.len() <= 48
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "store.schema {s:?}: use lowercase letters, digits and _ (at most 48, not starting with a digit)"
        )))
    }
}

const COLS: &str = "id, kind, queue, args, priority, state, attempt, max_attempts, timeout_ms, \
    unique_key, run_at, created_at, started_at, finished_at, node, result, errors, depends_on, \
    concurrency_key";

const UNFINISHED: &str = "state NOT IN ('completed', 'failed', 'cancelled')";

/// Every statement, with the schema spliced in once.
struct Sql {
    insert_many: String,
    insert_one: String,
    parents_lock: String,
    deps_insert: String,
    parents_mark: String,
    unblock: String,
    cascade: String,
    claim_limited: String,
    running_keys_sub: String,
    find_unique: String,
    claim: String,
    complete_many: String,
    get: String,
    get_for_update: String,
    cancel_running: String,
    cancel_queued: String,
    retry: String,
    cancel_requested: String,
    prune: String,
    queue_counts: String,
    queue_set_paused: String,
    queue_paused: String,
    heartbeat: String,
    node_remove: String,
    leader_remove: String,
    node_list: String,
    rescue_dead: String,
    rescue_node: String,
    elect: String,
    schedule_upsert: String,
    schedule_delete: String,
    schedule_list: String,
    schedule_move: String,
}

impl Sql {
    fn new(s: &str) -> Self {
        // Keeps `running_keys` in step with claims of tasks that have a key
        // (read by per-key limits instead of counting running rows, whose
        // index fills with dead entries between vacuums).
        #[allow(non_snake_case)]
        let RUNNING_KEYS_ADD = format!(
            "INSERT INTO {s}.running_keys (queue, key, n) \
             SELECT queue, concurrency_key, count(*) FROM claimed WHERE concurrency_key IS NOT NULL \
             GROUP BY queue, concurrency_key \
             ON CONFLICT (queue, key) DO UPDATE SET n = {s}.running_keys.n + excluded.n"
        );
        let rescue_set = format!(
            "UPDATE {s}.tasks SET \
               state = CASE WHEN cancel_requested THEN 'cancelled' \
                            WHEN attempt >= max_attempts THEN 'failed' ELSE 'retryable' END, \
               finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts THEN $1::timestamptz ELSE NULL END, \
               run_at = $1::timestamptz, \
               errors = errors || jsonb_build_array(jsonb_build_object('attempt', attempt, 'at', $2::text, \
                 'message', 'node ' || coalesce(node, '?') || ' stopped while running the task; rescued'))"
        );
        Sql {
            insert_many: format!(
                "INSERT INTO {s}.tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, run_at, created_at, \
                   concurrency_key) \
                 SELECT kind, queue, args, priority, CASE WHEN run_at > $8 THEN 'scheduled' ELSE 'available' END, \
                        max_attempts, timeout_ms, run_at, $8, ckey \
                 FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::int4[], $6::int8[], $7::timestamptz[], \
                             $9::text[]) \
                   WITH ORDINALITY AS t(kind, queue, args, priority, max_attempts, timeout_ms, run_at, ckey, ord) \
                 ORDER BY ord RETURNING id"
            ),
            insert_one: format!(
                "INSERT INTO {s}.tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, unique_key, \
                   run_at, created_at, depends_on, deps_pending, dep_failure, finished_at, errors, concurrency_key) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16) \
                 ON CONFLICT (unique_key) WHERE unique_key IS NOT NULL AND {UNFINISHED} DO NOTHING \
                 RETURNING {COLS}"
            ),
            parents_lock: format!(
                "SELECT id, state FROM {s}.tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            ),
            deps_insert: format!(
                "INSERT INTO {s}.task_deps (parent, child) SELECT unnest($1::int8[]), $2 ON CONFLICT DO NOTHING"
            ),
            parents_mark: format!("UPDATE {s}.tasks SET has_dependents = true WHERE id = ANY($1)"),
            running_keys_sub: format!(
                "UPDATE {s}.running_keys r SET n = greatest(0, r.n - d.c) \
                 FROM (SELECT q, k, count(*) AS c FROM unnest($1::text[], $2::text[]) AS u(q, k) GROUP BY q, k) d \
                 WHERE r.queue = d.q AND r.key = d.k"
            ),
            claim_limited: format!(
                "WITH rl AS ( \
                   SELECT CASE WHEN q.window_start IS NULL OR $2 - q.window_start >= make_interval(secs => $6::bigint / 1e6) \
                               THEN $2 ELSE q.window_start END AS ws, \
                          CASE WHEN q.window_start IS NULL OR $2 - q.window_start >= make_interval(secs => $6::bigint / 1e6) \
                               THEN 0 ELSE q.started END AS st \
                   FROM (SELECT 1) one LEFT JOIN {s}.queue_rate q ON q.queue = $1), \
                 running AS (SELECT count(*) AS n FROM {s}.tasks WHERE queue = $1 AND state = 'running'), \
                 allowed AS (SELECT greatest(0, least($3::bigint, $4::bigint - (SELECT n FROM running), \
                                                      $5::bigint - (SELECT st FROM rl))) AS n), \
                 cand AS (SELECT id, priority, run_at, concurrency_key FROM {s}.tasks \
                   WHERE queue = $1 AND state IN ('available', 'scheduled', 'retryable') AND run_at <= $2 \
                     AND NOT EXISTS (SELECT 1 FROM {s}.queues WHERE name = $1 AND paused) \
                     AND (concurrency_key IS NULL OR concurrency_key NOT IN \
                       (SELECT key FROM {s}.running_keys WHERE queue = $1 AND n >= $8::bigint)) \
                   ORDER BY priority, run_at, id LIMIT (SELECT n * $7 + $11 FROM allowed)), \
                 ranked AS (SELECT c.*, row_number() OVER (PARTITION BY concurrency_key ORDER BY priority, run_at, id) AS rk \
                   FROM cand c), \
                 keyrun AS (SELECT key AS k, n FROM {s}.running_keys WHERE queue = $1), \
                 picked AS (SELECT r.id FROM ranked r LEFT JOIN keyrun ON keyrun.k = r.concurrency_key \
                   WHERE r.concurrency_key IS NULL OR r.rk + coalesce(keyrun.n, 0) <= $8 \
                   ORDER BY r.priority, r.run_at, r.id LIMIT (SELECT n FROM allowed)), \
                 claimed AS (UPDATE {s}.tasks t SET state = 'running', attempt = t.attempt + 1, node = $10, \
                   started_at = $2, cancel_requested = false \
                   WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) \
                     AND t.state IN ('available', 'scheduled', 'retryable') RETURNING t.*), \
                 counted AS ({RUNNING_KEYS_ADD}), \
                 saved AS (INSERT INTO {s}.queue_rate (queue, window_start, started) \
                   SELECT $1, ws, st + (SELECT count(*) FROM claimed) FROM rl WHERE $9 \
                   ON CONFLICT (queue) DO UPDATE SET window_start = excluded.window_start, started = excluded.started) \
                 SELECT {COLS} FROM claimed"
            ),
            unblock: format!(
                "UPDATE {s}.tasks c SET deps_pending = c.deps_pending - x.n, \
                   state = CASE WHEN c.deps_pending - x.n <= 0 THEN 'available' ELSE c.state END \
                 FROM (SELECT child, count(*)::int AS n FROM {s}.task_deps WHERE parent = ANY($1) GROUP BY child) x \
                 WHERE c.id = x.child AND c.state = 'blocked'"
            ),
            cascade: format!(
                "WITH RECURSIVE doomed(id) AS ( \
                   SELECT child FROM {s}.task_deps WHERE parent = ANY($1) \
                   UNION SELECT d.child FROM {s}.task_deps d JOIN doomed ON d.parent = doomed.id) \
                 UPDATE {s}.tasks SET state = CASE WHEN dep_failure = 'fail' THEN 'failed' ELSE 'cancelled' END, \
                   finished_at = $2, \
                   errors = errors || jsonb_build_array(jsonb_build_object('attempt', attempt, 'at', $3::text, \
                     'message', 'a task it depends on did not complete')) \
                 WHERE id IN (SELECT id FROM doomed) AND state = 'blocked'"
            ),
            find_unique: format!(
                "SELECT {COLS} FROM {s}.tasks WHERE unique_key = $1 AND {UNFINISHED}"
            ),
            claim: format!(
                "WITH next AS ( \
                   SELECT id FROM {s}.tasks \
                   WHERE queue = $3 AND state IN ('available', 'scheduled', 'retryable') AND run_at <= $2 \
                     AND NOT EXISTS (SELECT 1 FROM {s}.queues WHERE name = $3 AND paused) \
                   ORDER BY priority, run_at, id LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 , claimed AS (UPDATE {s}.tasks t SET state = 'running', attempt = t.attempt + 1, node = $1, \
                   started_at = $2, cancel_requested = false \
                 FROM next WHERE t.id = next.id RETURNING t.*), \
                 counted AS ({RUNNING_KEYS_ADD}) \
                 SELECT {COLS} FROM claimed"
            ),
            complete_many: format!(
                "UPDATE {s}.tasks t SET \
                   state = c.state, \
                   finished_at = c.finished_at, \
                   result = CASE WHEN c.state = 'completed' THEN c.result ELSE t.result END, \
                   run_at = coalesce(c.run_at, t.run_at), \
                   errors = CASE WHEN c.error IS NULL THEN t.errors ELSE t.errors || jsonb_build_array(c.error) END, \
                   attempt = t.attempt + c.delta \
                 FROM unnest($1::int8[], $2::int4[], $3::text[], $4::timestamptz[], $5::jsonb[], $6::timestamptz[], $7::jsonb[], $8::int4[]) \
                   AS c(id, attempt, state, finished_at, result, run_at, error, delta) \
                 WHERE t.id = c.id AND t.state = 'running' AND t.attempt = c.attempt \
                 RETURNING t.id, t.has_dependents, t.state, t.queue, t.concurrency_key"
            ),
            get: format!("SELECT {COLS} FROM {s}.tasks WHERE id = $1"),
            get_for_update: format!("SELECT {COLS} FROM {s}.tasks WHERE id = $1 FOR UPDATE"),
            cancel_running: format!(
                "UPDATE {s}.tasks SET cancel_requested = true WHERE id = $1 RETURNING {COLS}"
            ),
            cancel_queued: format!(
                "UPDATE {s}.tasks SET state = 'cancelled', finished_at = $2 WHERE id = $1 RETURNING {COLS}"
            ),
            retry: format!(
                "UPDATE {s}.tasks SET state = 'available', run_at = $2, finished_at = NULL, cancel_requested = false, \
                 max_attempts = greatest(max_attempts, attempt + 1) WHERE id = $1 RETURNING {COLS}"
            ),
            cancel_requested: format!(
                "SELECT id, attempt FROM {s}.tasks WHERE state = 'running' AND node = $1 AND cancel_requested"
            ),
            prune: format!(
                "DELETE FROM {s}.tasks WHERE id IN (SELECT id FROM {s}.tasks \
                 WHERE state = $1 AND finished_at < $2 LIMIT $3)"
            ),
            // The queues by a loose index scan (one probe each), then a
            // count of each (queue, state) range that stops at the cap ($1).
            queue_counts: format!(
                "WITH RECURSIVE qs(q) AS ( \
                   SELECT min(queue) FROM {s}.tasks \
                   UNION ALL \
                   SELECT (SELECT min(queue) FROM {s}.tasks WHERE queue > qs.q) FROM qs WHERE qs.q IS NOT NULL) \
                 SELECT qs.q, st.s, c.n FROM qs \
                 CROSS JOIN unnest(ARRAY['available','scheduled','running','retryable','completed','failed','cancelled','blocked']) AS st(s) \
                 CROSS JOIN LATERAL (SELECT count(*) AS n FROM \
                   (SELECT 1 FROM {s}.tasks WHERE queue = qs.q AND state = st.s \
                    LIMIT CASE WHEN st.s IN ('completed', 'failed', 'cancelled') THEN $2::bigint ELSE $1::bigint END) x) c \
                 WHERE qs.q IS NOT NULL AND c.n > 0"
            ),
            queue_set_paused: format!(
                "INSERT INTO {s}.queues (name, paused) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused"
            ),
            queue_paused: format!("SELECT name FROM {s}.queues WHERE paused ORDER BY name"),
            heartbeat: format!(
                "INSERT INTO {s}.nodes (name, version, started_at, heartbeat_at, workers, workers_busy, queues, stats) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (name) DO UPDATE SET \
                 version = excluded.version, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, \
                 workers = excluded.workers, workers_busy = excluded.workers_busy, queues = excluded.queues, \
                 stats = excluded.stats"
            ),
            node_remove: format!("DELETE FROM {s}.nodes WHERE name = $1"),
            leader_remove: format!("DELETE FROM {s}.leader WHERE node = $1"),
            node_list: format!(
                "SELECT n.name, n.version, n.started_at, n.heartbeat_at, n.workers, n.workers_busy, n.queues, \
                   (l.node IS NOT NULL), n.stats FROM {s}.nodes n \
                 LEFT JOIN {s}.leader l ON l.node = n.name AND l.expires_at > $1 ORDER BY n.name"
            ),
            rescue_dead: format!(
                "{rescue_set} WHERE state = 'running' AND (node IS NULL OR node NOT IN \
                   (SELECT name FROM {s}.nodes WHERE heartbeat_at >= $3)) RETURNING id, node, state, queue, concurrency_key"
            ),
            rescue_node: format!(
                "{rescue_set} WHERE state = 'running' AND node = $3 AND NOT (id = ANY($4)) \
                 AND started_at < $5 RETURNING id, node, state, queue, concurrency_key"
            ),
            schedule_upsert: format!(
                "INSERT INTO {s}.schedules (name, spec, source, last_tick) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, source = excluded.source"
            ),
            schedule_delete: format!("DELETE FROM {s}.schedules WHERE name = $1"),
            schedule_list: format!(
                "SELECT name, spec, source, last_tick FROM {s}.schedules ORDER BY name"
            ),
            schedule_move: format!(
                "UPDATE {s}.schedules SET last_tick = $1 WHERE name = $2 AND last_tick = $3"
            ),
            elect: format!(
                "INSERT INTO {s}.leader (id, node, expires_at) VALUES (1, $1, $2) \
                 ON CONFLICT (id) DO UPDATE SET node = excluded.node, expires_at = excluded.expires_at \
                 WHERE {s}.leader.node = excluded.node OR {s}.leader.expires_at <= $3 RETURNING node"
            ),
        }
    }
}

/// The schema, one entry per version. Append; never edit a released entry.
fn migrations(s: &str) -> Vec<String> {
    vec![
        format!(
        "CREATE TABLE {s}.tasks (
            id               bigserial PRIMARY KEY,
            kind             text        NOT NULL,
            queue            text        NOT NULL,
            args             jsonb       NOT NULL,
            priority         smallint    NOT NULL,
            state            text        NOT NULL,
            attempt          integer     NOT NULL DEFAULT 0,
            max_attempts     integer     NOT NULL,
            timeout_ms       bigint,
            unique_key       text,
            run_at           timestamptz NOT NULL,
            created_at       timestamptz NOT NULL,
            started_at       timestamptz,
            finished_at      timestamptz,
            node             text,
            result           jsonb,
            errors           jsonb       NOT NULL DEFAULT '[]',
            cancel_requested boolean     NOT NULL DEFAULT false
        ) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01,
                autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02,
                autovacuum_vacuum_cost_delay = 0);
        CREATE INDEX tasks_claim ON {s}.tasks (queue, priority, run_at, id)
            WHERE state IN ('available', 'scheduled', 'retryable');
        CREATE UNIQUE INDEX tasks_unique_key ON {s}.tasks (unique_key)
            WHERE unique_key IS NOT NULL AND {UNFINISHED};
        CREATE INDEX tasks_state_id ON {s}.tasks (state, id);
        CREATE TABLE {s}.nodes (
            name         text PRIMARY KEY,
            version      text        NOT NULL,
            started_at   timestamptz NOT NULL,
            heartbeat_at timestamptz NOT NULL,
            workers      integer     NOT NULL,
            workers_busy integer     NOT NULL,
            queues       jsonb       NOT NULL
        );
        CREATE TABLE {s}.queues (
            name   text PRIMARY KEY,
            paused boolean NOT NULL DEFAULT false
        );
        CREATE TABLE {s}.leader (
            id         integer PRIMARY KEY CHECK (id = 1),
            node       text        NOT NULL,
            expires_at timestamptz NOT NULL
        );"
        ),
        format!(
            "CREATE TABLE {s}.schedules (
            name      text PRIMARY KEY,
            spec      jsonb       NOT NULL,
            source    text        NOT NULL,
            last_tick timestamptz NOT NULL
        );"
        ),
        format!(
            "ALTER TABLE {s}.tasks
                ADD COLUMN depends_on jsonb,
                ADD COLUMN deps_pending integer NOT NULL DEFAULT 0,
                ADD COLUMN has_dependents boolean NOT NULL DEFAULT false,
                ADD COLUMN dep_failure text;
            CREATE TABLE {s}.task_deps (
                parent bigint NOT NULL,
                child  bigint NOT NULL,
                PRIMARY KEY (parent, child)
            );"
        ),
        format!(
            "ALTER TABLE {s}.tasks ADD COLUMN concurrency_key text;
            CREATE INDEX tasks_running_key ON {s}.tasks (queue, concurrency_key) WHERE state = 'running';
            CREATE TABLE {s}.queue_rate (
                queue        text PRIMARY KEY,
                window_start timestamptz NOT NULL,
                started      integer     NOT NULL
            );"
        ),
        format!(
            "CREATE TABLE {s}.running_keys (
                queue text    NOT NULL,
                key   text    NOT NULL,
                n     integer NOT NULL,
                PRIMARY KEY (queue, key)
            );
            INSERT INTO {s}.running_keys (queue, key, n)
                SELECT queue, concurrency_key, count(*) FROM {s}.tasks
                WHERE state = 'running' AND concurrency_key IS NOT NULL GROUP BY 1, 2;"
        ),
        format!(
            "-- Serves bounded counts per queue and state, and listing one queue's
            -- tasks (one range per state, merged): neither walks the whole table.
            CREATE INDEX tasks_queue_state ON {s}.tasks (queue, state, id);
            -- What the node's pool did since it started (see NodeStats).
            ALTER TABLE {s}.nodes ADD COLUMN stats jsonb NOT NULL DEFAULT '{{}}';"
        ),
        format!(
            "-- Serves listing by kind (newest first) without walking the whole table.
            CREATE INDEX tasks_kind ON {s}.tasks (kind, id);"
        ),
    ]
}

type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

/// The query behind `task_list` in schema `s`, with its parameters.
fn list_sql(s: &str, p: ListParams) -> (String, Vec<Param>) {
    let mut params: Vec<Param> = Vec::new();
    let mut add = |v: Param| {
        params.push(v);
        format!("${}", params.len())
    };
    // Filters other than state and queue, shared by every arm below.
    let mut rest = String::new();
    if let Some(k) = p.kind {
        rest.push_str(&format!(" AND kind = {}", add(Box::new(k))));
    }
    if let Some(b) = p.before {
        rest.push_str(&format!(" AND id < {}", add(Box::new(b.0))));
    }
    let limit = add(Box::new(p.limit.max(1) as i64));
    let sql = match (p.state, p.queue) {
        // One queue, any state: the newest `limit` of each state's range
        // of tasks_queue_state, merged. A plain `queue = $1 ORDER BY id
        // DESC` would walk the whole table by id or sort the queue's tasks.
        (None, Some(q)) => {
            let q = add(Box::new(q));
            let arms: Vec<String> = TaskState::ALL
                .iter()
                .map(|st| {
                    format!(
                        "(SELECT {COLS} FROM {s}.tasks WHERE queue = {q} AND state = '{}'{rest} \
                         ORDER BY id DESC LIMIT {limit})",
                        st.as_str()
                    )
                })
                .collect();
            format!(
                "{} ORDER BY id DESC LIMIT {limit}",
                arms.join(" UNION ALL ")
            )
        }
        (state, queue) => {
            let mut sql = format!("SELECT {COLS} FROM {s}.tasks WHERE true{rest}");
            if let Some(st) = state {
                sql.push_str(&format!(
                    " AND state = {}",
                    add(Box::new(st.as_str().to_string()))
                ));
            }
            if let Some(q) = queue {
                sql.push_str(&format!(" AND queue = {}", add(Box::new(q))));
            }
            sql.push_str(&format!(" ORDER BY id DESC LIMIT {limit}"));
            sql
        }
    };
    (sql, params)
}

fn row_to_task(r: &Row) -> Result<Task, StoreError> {
    let state: String = r.try_get(5).map_err(db_err)?;
    let errors: serde_json::Value = r.try_get(16).map_err(db_err)?;
    let depends_on: Option<serde_json::Value> = r.try_get(17).map_err(db_err)?;
    Ok(Task {
        id: TaskId(r.try_get(0).map_err(db_err)?),
        kind: r.try_get(1).map_err(db_err)?,
        queue: r.try_get(2).map_err(db_err)?,
        args: r.try_get(3).map_err(db_err)?,
        priority: r.try_get(4).map_err(db_err)?,
        state: state
            .parse()
            .map_err(|e: crate::task::UnknownState| StoreError::Schema(e.to_string()))?,
        attempt: r.try_get(6).map_err(db_err)?,
        max_attempts: r.try_get(7).map_err(db_err)?,
        timeout_ms: r.try_get(8).map_err(db_err)?,
        unique_key: r.try_get(9).map_err(db_err)?,
        run_at: r.try_get(10).map_err(db_err)?,
        created_at: r.try_get(11).map_err(db_err)?,
        started_at: r.try_get(12).map_err(db_err)?,
        finished_at: r.try_get(13).map_err(db_err)?,
        node: r.try_get(14).map_err(db_err)?,
        result: r.try_get(15).map_err(db_err)?,
        errors: serde_json::from_value::<Vec<AttemptError>>(errors)
            .map_err(|e| StoreError::Schema(format!("tasks.errors: {e}")))?,
        depends_on: match depends_on {
            Some(d) => serde_json::from_value(d)
                .map_err(|e| StoreError::Schema(format!("tasks.depends_on: {e}")))?,
            None => Vec::new(),
        },
        concurrency_key: r.try_get(18).map_err(db_err)?,
    })
}

fn rows_to_tasks(rows: &[Row]) -> Result<Vec<Task>, StoreError> {
    rows.iter().map(row_to_task).collect()
}

fn error_value(attempt: i32, at: DateTime<Utc>, message: &str) -> serde_json::Value {
    serde_json::to_value(AttemptError {
        attempt,
        at,
        message: message.to_string(),
    })
    .unwrap_or(serde_json::Value::Null)
}

/// Insert `rows` through any client (the store's pool or a caller's transaction).
async fn insert_rows<C: GenericClient>(
    c: &C,
    sql: &Sql,
    rows: Vec<TaskInsert>,
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, StoreError> {
    let now = truncate_micros(now);
    let rows = super::truncate_rows(rows);
    let mut out: Vec<Option<Inserted>> = vec![None; rows.len()];
    // Tasks without a unique key: one statement for all of them.
    let plain: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].unique_key.is_none() && rows[i].depends_on.is_empty())
        .collect();
    if !plain.is_empty() {
        let kinds: Vec<&str> = plain.iter().map(|&i| rows[i].kind.as_str()).collect();
        let queues: Vec<&str> = plain.iter().map(|&i| rows[i].queue.as_str()).collect();
        let args: Vec<&serde_json::Value> = plain.iter().map(|&i| &rows[i].args).collect();
        let priorities: Vec<i16> = plain.iter().map(|&i| rows[i].priority).collect();
        let attempts: Vec<i32> = plain.iter().map(|&i| rows[i].max_attempts).collect();
        let timeouts: Vec<Option<i64>> = plain.iter().map(|&i| rows[i].timeout_ms).collect();
        let run_ats: Vec<DateTime<Utc>> = plain.iter().map(|&i| rows[i].run_at).collect();
        let keys: Vec<Option<&str>> = plain
            .iter()
            .map(|&i| rows[i].concurrency_key.as_deref())
            .collect();
        let ids = c
            .query(
                &sql.insert_many,
                &[
                    &kinds,
                    &queues,
                    &args,
                    &priorities,
                    &attempts,
                    &timeouts,
                    &run_ats,
                    &now,
                    &keys,
                ],
            )
            .await
            .map_err(db_err)?;
        let mut ids: Vec<i64> = ids
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        // Ids come from one sequence in insertion (ordinality) order.
        ids.sort_unstable();
        for (&i, id) in plain.iter().zip(ids) {
            out[i] = Some(Inserted {
                task: rows[i].to_task(TaskId(id), now),
                existing: false,
            });
        }
    }
    // Tasks with a unique key or dependencies: one at a time, in order, so
    // each learns whether it was new and finds the batch tasks it waits for.
    for i in 0..rows.len() {
        if out[i].is_some() {
            continue;
        }
        let done: Vec<Option<TaskId>> = out.iter().map(|o| o.as_ref().map(|x| x.task.id)).collect();
        out[i] = Some(insert_single(c, sql, &rows[i], now, &done).await?);
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| StoreError::Unavailable("insert lost a row".into())))
        .collect()
}

/// Rows (with the queue in column `qi` and the key in `ki`) that left
/// `running`: give their places back in `running_keys`.
async fn give_back_keys<C: GenericClient>(
    c: &C,
    sql: &Sql,
    rows: &[Row],
    qi: usize,
    ki: usize,
) -> Result<(), StoreError> {
    let (mut queues, mut keys): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    for r in rows {
        if let Some(k) = r.try_get::<_, Option<String>>(ki).map_err(db_err)? {
            queues.push(r.try_get(qi).map_err(db_err)?);
            keys.push(k);
        }
    }
    if !keys.is_empty() {
        c.execute(&sql.running_keys_sub, &[&queues, &keys])
            .await
            .map_err(db_err)?;
    }
    Ok(())
}

/// The task `id`, locked for update until the transaction ends.
async fn locked_task<C: GenericClient>(c: &C, sql: &Sql, id: TaskId) -> Result<Task, StoreError> {
    let row = c
        .query_opt(&sql.get_for_update, &[&id.0])
        .await
        .map_err(db_err)?;
    row.as_ref()
        .map(row_to_task)
        .transpose()?
        .ok_or(StoreError::NotFound(id))
}

/// Cancel or fail (per their policy) the blocked tasks that wait for `parents`.
async fn cascade<C: GenericClient>(
    c: &C,
    sql: &Sql,
    parents: &[i64],
    now: DateTime<Utc>,
) -> Result<(), StoreError> {
    if parents.is_empty() {
        return Ok(());
    }
    let now_text = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    c.execute(&sql.cascade, &[&parents, &truncate_micros(now), &now_text])
        .await
        .map_err(db_err)?;
    Ok(())
}

/// Insert one task that has a unique key or dependencies.
async fn insert_single<C: GenericClient>(
    c: &C,
    sql: &Sql,
    t: &TaskInsert,
    now: DateTime<Utc>,
    batch: &[Option<TaskId>],
) -> Result<Inserted, StoreError> {
    let mut parents: Vec<i64> = Vec::new();
    for d in &t.depends_on {
        let id = match *d {
            Dependency::Task(id) => id,
            Dependency::Batch(j) => batch.get(j).copied().flatten().ok_or_else(|| {
                StoreError::Invalid(format!("depends_on: batch task {j} comes later"))
            })?,
        };
        if !parents.contains(&id.0) {
            parents.push(id.0);
        }
    }
    let mut task = t.to_task(TaskId(0), now);
    let mut pending = 0i32;
    if !parents.is_empty() {
        // Lock the parents: a parent finishing now waits for this insert, and
        // then sees the new edge when it unblocks or cancels its children.
        let rows = c
            .query(&sql.parents_lock, &[&parents])
            .await
            .map_err(db_err)?;
        let mut broken = None;
        for p in &parents {
            let state = rows
                .iter()
                .find(|r| r.get::<_, i64>(0) == *p)
                .map(|r| r.get::<_, String>(1))
                .ok_or_else(|| {
                    StoreError::Invalid(format!("depends_on: task {p} does not exist"))
                })?;
            match state.as_str() {
                "completed" => {}
                "failed" | "cancelled" => broken = Some(*p),
                _ => pending += 1,
            }
        }
        task.depends_on = parents.iter().map(|p| TaskId(*p)).collect();
        super::apply_parents(
            &mut task,
            t.on_dependency_failure,
            broken.map(TaskId),
            pending,
            now,
        );
    }
    let deps = (!parents.is_empty()).then(|| serde_json::json!(parents));
    let errors = serde_json::to_value(&task.errors).unwrap_or_else(|_| serde_json::json!([]));
    let inserted = c
        .query_opt(
            &sql.insert_one,
            &[
                &t.kind,
                &t.queue,
                &t.args,
                &t.priority,
                &task.state.as_str(),
                &t.max_attempts,
                &t.timeout_ms,
                &t.unique_key,
                &t.run_at,
                &now,
                &deps,
                &pending,
                &t.on_dependency_failure.as_str(),
                &task.finished_at,
                &errors,
                &t.concurrency_key,
            ],
        )
        .await
        .map_err(db_err)?;
    let Some(row) = inserted else {
        let row = c
            .query_one(&sql.find_unique, &[&t.unique_key])
            .await
            .map_err(db_err)?;
        return Ok(Inserted {
            task: row_to_task(&row)?,
            existing: true,
        });
    };
    let task = row_to_task(&row)?;
    if !parents.is_empty() {
        c.execute(&sql.deps_insert, &[&parents, &task.id.0])
            .await
            .map_err(db_err)?;
        c.execute(&sql.parents_mark, &[&parents])
            .await
            .map_err(db_err)?;
    }
    Ok(Inserted {
        task,
        existing: false,
    })
}

/// Enqueue `rows` inside the caller's own transaction (or on any client):
/// the tasks exist if and only if that transaction commits, and a NOTIFY
/// sent in the same transaction wakes the nodes on commit.
/// Normally reached through [`Client::insert_in`](crate::Client::insert_in).
pub async fn insert_in<C: GenericClient>(
    c: &C,
    schema: &str,
    rows: Vec<TaskInsert>,
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, StoreError> {
    check_schema(schema)?;
    let sql = Sql::new(schema);
    let out = insert_rows(c, &sql, rows, now).await?;
    c.execute("SELECT pg_notify($1, 'work')", &[&channel_name(schema)])
        .await
        .map_err(db_err)?;
    Ok(out)
}

fn channel_name(schema: &str) -> String {
    format!("{schema}_events")
}

impl PostgresStore {
    /// `EXPLAIN` of one of the dashboard's reads, as the store runs it: one
    /// line per plan line. Tests use it to check that list pages and counts
    /// walk indexes, whatever the table holds.
    pub async fn explain(&self, read: super::DashboardRead) -> Result<Vec<String>, StoreError> {
        let (sql, params): (String, Vec<Param>) = match read {
            super::DashboardRead::TaskList(p) => list_sql(&self.inner.schema, p),
            super::DashboardRead::QueueCounts => (
                self.inner.sql.queue_counts.clone(),
                vec![
                    Box::new(super::QUEUE_COUNT_CAP),
                    Box::new(super::FINISHED_COUNT_CAP),
                ],
            ),
        };
        let c = self.conn().await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = c
            .query(&format!("EXPLAIN {sql}"), &refs)
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0).map_err(db_err))
            .collect()
    }

    /// Connect (lazily: the pool opens connections on first use) and start
    /// the LISTEN and NOTIFY tasks. Call [`Store::migrate`] before use.
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        check_schema(&options.schema)?;
        let mut pg: tokio_postgres::Config = options
            .url
            .parse()
            .map_err(|e| StoreError::Invalid(format!("store.url: {e}")))?;
        // Names our connections in pg_stat_activity (per schema, so tests can find theirs).
        pg.application_name(format!("proto_tasker:{}", options.schema));
        pg.connect_timeout(Duration::from_secs(5));
        let manager = Manager::from_config(
            pg.clone(),
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::Invalid(format!("store.url: {e}")))?;
        let (events, _) = broadcast::channel(1024);
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let notify = Arc::new(Notify::new());
        let channel = channel_name(&options.schema);
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool: pool.clone(),
                sql: Sql::new(&options.schema),
                schema: options.schema.clone(),
                channel: channel.clone(),
                notify: notify.clone(),
                events: events.clone(),
                outbox,
                stop: stop.clone(),
            }),
        };
        tokio::spawn(listen_loop(
            pg,
            channel.clone(),
            notify,
            events,
            stop.clone(),
        ));
        tokio::spawn(notify_loop(pool, channel, outbox_rx, stop));
        Ok(store)
    }

    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// A pooled connection. Connections the server closed (restart,
    /// `pg_terminate_backend`) are thrown away rather than handed out.
    async fn conn(&self) -> Result<deadpool_postgres::Object, StoreError> {
        for _ in 0..self.inner.pool.status().max_size + 1 {
            let c = self.inner.pool.get().await.map_err(pool_err)?;
            if !c.is_closed() {
                return Ok(c);
            }
            drop(deadpool_postgres::Object::take(c));
        }
        Err(StoreError::Unavailable(
            "every pooled connection was closed".into(),
        ))
    }

    /// Claim under cluster-wide limits. Claimers of one limited queue take a
    /// transaction-scoped advisory lock first, so counting the running tasks
    /// and claiming happen as one step across all nodes. The four statements
    /// (BEGIN, lock, count-pick-claim, COMMIT) are pipelined: one round trip.
    async fn claim_limited(
        &self,
        p: &ClaimParams,
        limits: QueueLimits,
    ) -> Result<Vec<Task>, StoreError> {
        let sql = &self.inner.sql;
        let now = truncate_micros(p.now);
        let c = self.conn().await?;
        let begin = c.prepare_cached("BEGIN").await.map_err(db_err)?;
        let lock = c
            .prepare_cached("SELECT pg_advisory_xact_lock(hashtext($1))")
            .await
            .map_err(db_err)?;
        let claim = c.prepare_cached(&sql.claim_limited).await.map_err(db_err)?;
        let commit = c.prepare_cached("COMMIT").await.map_err(db_err)?;
        let key = format!("proto_tasker_claim:{}:{}", self.inner.schema, p.queue);
        let max = i64::MAX;
        let global = limits.global_concurrency.map(i64::from).unwrap_or(max);
        let per_key = limits.per_key_concurrency.map(i64::from).unwrap_or(max);
        let (rate_max, rate_per) = match limits.rate {
            Some((n, per)) => (i64::from(n), per),
            None => (max, Duration::from_secs(1)),
        };
        let rate_per_us = i64::try_from(rate_per.as_micros()).unwrap_or(max);
        let limit = p.limit as i64;
        // Look a bounded way down the queue for tasks whose keys have room;
        // without a per-key limit the first `limit` tasks are enough.
        // (`allowed * scan_mul + scan_add` rows, computed in the statement).
        let (scan_mul, scan_add): (i64, i64) = if limits.per_key_concurrency.is_some() {
            (2, 16)
        } else {
            (1, 0)
        };
        let has_rate = limits.rate.is_some();
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &p.queue,
            &now,
            &limit,
            &global,
            &rate_max,
            &rate_per_us,
            &scan_mul,
            &per_key,
            &has_rate,
            &p.node,
            &scan_add,
        ];
        let (b, l, rows, done) = tokio::join!(
            c.execute(&begin, &[]),
            c.execute(&lock, &lock_params),
            c.query(&claim, &claim_params),
            c.execute(&commit, &[]),
        );
        b.map_err(db_err)?;
        l.map_err(db_err)?;
        let rows = rows.map_err(db_err)?;
        done.map_err(db_err)?;
        let mut tasks = rows_to_tasks(&rows)?;
        tasks.sort_by_key(|t| (t.priority, t.run_at, t.id));
        Ok(tasks)
    }

    /// Wake producers here now and on every node after the NOTIFY goes out.
    fn announce_work(&self) {
        self.inner.notify.notify_waiters();
        let _ = self.inner.outbox.send("work".into());
    }
}

/// Sends queued notifications, coalesced: everything queued while one
/// NOTIFY was in flight goes out as one, and at most one per 2 ms.
async fn notify_loop(
    pool: Pool,
    channel: String,
    mut rx: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 1024) => if n == 0 { return },
            _ = stop.cancelled() => return,
        }
        let payloads: HashSet<String> = batch.drain(..).collect();
        let sent = async {
            let c = pool.get().await.map_err(pool_err)?;
            for p in &payloads {
                c.execute("SELECT pg_notify($1, $2)", &[&channel, p])
                    .await
                    .map_err(db_err)?;
            }
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = sent {
            // Polling covers a lost wake-up; cancel requests are also polled.
            tracing::debug!(error = %e, "NOTIFY failed");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Keeps one LISTEN connection open, reconnecting with backoff; turns
/// notifications into local wake-ups and events.
async fn listen_loop(
    cfg: tokio_postgres::Config,
    channel: String,
    notify: Arc<Notify>,
    events: broadcast::Sender<StoreEvent>,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match cfg.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                let _ = tx.send(n.payload().to_string());
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                } else {
                    backoff = Duration::from_millis(100);
                    // Anything sent while we were not listening is lost: look now.
                    notify.notify_waiters();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => { driver.abort(); return; }
                            p = rx.recv() => match p {
                                Some(p) => handle_payload(&p, &notify, &events),
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("LISTEN connection lost; reconnecting");
                }
                driver.abort();
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "LISTEN connect failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {},
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn handle_payload(p: &str, notify: &Notify, events: &broadcast::Sender<StoreEvent>) {
    if p == "work" {
        notify.notify_waiters();
    } else if let Some(rest) = p.strip_prefix("cancel:") {
        let (id, node) = rest.split_once(':').unwrap_or((rest, ""));
        if let Ok(id) = id.parse::<i64>() {
            let _ = events.send(StoreEvent::CancelRequested {
                id: TaskId(id),
                node: (!node.is_empty()).then(|| node.to_string()),
            });
        }
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        let s = &self.inner.schema;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        // Nodes starting together: the first migrates, the others wait here
        // and then find nothing to do.
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&format!("proto_tasker_migrate:{s}")],
        )
        .await
        .map_err(db_err)?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s}; \
             CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL)"
        ))
        .await
        .map_err(db_err)?;
        let version: i32 = tx
            .query_opt(&format!("SELECT version FROM {s}.schema_version"), &[])
            .await
            .map_err(db_err)?
            .map(|r| r.get(0))
            .unwrap_or(0);
        let all = migrations(s);
        if version as usize > all.len() {
            return Err(StoreError::Schema(format!(
                "schema {s} is at version {version}, newer than this binary knows ({}); upgrade proto_tasker",
                all.len()
            )));
        }
        for (i, m) in all.iter().enumerate().skip(version as usize) {
            tx.batch_execute(m).await.map_err(|e| {
                StoreError::Schema(format!("schema {s}: migration {}: {}", i + 1, db_err(e)))
            })?;
        }
        tx.execute(&format!("DELETE FROM {s}.schema_version"), &[])
            .await
            .map_err(db_err)?;
        tx.execute(
            &format!("INSERT INTO {s}.schema_version VALUES ($1)"),
            &[&(all.len() as i32)],
        )
        .await
        .map_err(db_err)?;
        tx.commit().await.map_err(db_err)
    }

    async fn task_insert_many(
        &self,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Inserted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let out = insert_rows(&*tx, &self.inner.sql, tasks, now).await?;
        tx.commit().await.map_err(db_err)?;
        if out
            .iter()
            .any(|i| !i.existing && i.task.state == TaskState::Available)
        {
            self.announce_work();
        }
        Ok(out)
    }

    async fn task_claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        if p.limit == 0 {
            return Ok(Vec::new());
        }
        if let Some(limits) = p.limits.filter(|l| !l.is_empty()) {
            return self.claim_limited(&p, limits).await;
        }
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.claim)
            .await
            .map_err(db_err)?;
        let rows = c
            .query(
                &st,
                &[
                    &p.node,
                    &truncate_micros(p.now),
                    &p.queue,
                    &(p.limit as i64),
                ],
            )
            .await
            .map_err(db_err)?;
        let mut tasks = rows_to_tasks(&rows)?;
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
        let n = completions.len();
        let mut ids = Vec::with_capacity(n);
        let mut attempts = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut finished: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut results: Vec<Option<serde_json::Value>> = Vec::with_capacity(n);
        let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut errors: Vec<Option<serde_json::Value>> = Vec::with_capacity(n);
        let mut deltas: Vec<i32> = Vec::with_capacity(n);
        let mut wake = false;
        for c in &completions {
            let at = truncate_micros(c.at);
            ids.push(c.id.0);
            attempts.push(c.attempt);
            let (state, fin, result, run_at, error, delta) = match &c.outcome {
                Outcome::Completed { result } => {
                    ("completed", Some(at), Some(result.clone()), None, None, 0)
                }
                Outcome::Retry { run_at, error } => (
                    "retryable",
                    None,
                    None,
                    Some(truncate_micros(*run_at)),
                    Some(error_value(c.attempt, c.at, error)),
                    0,
                ),
                Outcome::Failed { error } | Outcome::Cancelled { error } => (
                    if matches!(c.outcome, Outcome::Failed { .. }) {
                        "failed"
                    } else {
                        "cancelled"
                    },
                    Some(at),
                    None,
                    None,
                    Some(error_value(c.attempt, c.at, error)),
                    0,
                ),
                Outcome::Snoozed { run_at } => (
                    "scheduled",
                    None,
                    None,
                    Some(truncate_micros(*run_at)),
                    None,
                    -1,
                ),
                Outcome::Released => {
                    wake = true;
                    ("available", None, None, Some(at), None, -1)
                }
            };
            states.push(state);
            finished.push(fin);
            results.push(result);
            run_ats.push(run_at);
            errors.push(error);
            deltas.push(delta);
        }
        let mut c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.complete_many)
            .await
            .map_err(db_err)?;
        // One transaction: outcomes and what they do to dependent tasks land together.
        let tx = c.transaction().await.map_err(db_err)?;
        let rows = tx
            .query(
                &st,
                &[
                    &ids, &attempts, &states, &finished, &results, &run_ats, &errors, &deltas,
                ],
            )
            .await
            .map_err(db_err)?;
        let applied: HashSet<i64> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        let (mut done, mut doomed) = (Vec::new(), Vec::new());
        // Every applied row left `running`: keyed ones give their count back.
        give_back_keys(&*tx, &self.inner.sql, &rows, 3, 4).await?;
        for r in &rows {
            if r.try_get::<_, bool>(1).unwrap_or(false) {
                let id: i64 = r.try_get(0).map_err(db_err)?;
                match r.try_get::<_, String>(2).map_err(db_err)?.as_str() {
                    "completed" => done.push(id),
                    "failed" | "cancelled" => doomed.push(id),
                    _ => {}
                }
            }
        }
        if !done.is_empty() {
            tx.execute(&self.inner.sql.unblock, &[&done])
                .await
                .map_err(db_err)?;
        }
        if let Some(at) = completions
            .first()
            .map(|c| c.at)
            .filter(|_| !doomed.is_empty())
        {
            cascade(&*tx, &self.inner.sql, &doomed, at).await?;
        }
        tx.commit().await.map_err(db_err)?;
        if !done.is_empty() {
            self.announce_work();
        }
        if wake {
            self.announce_work();
        }
        Ok(completions
            .iter()
            .map(|c| applied.contains(&c.id.0))
            .collect())
    }

    async fn task_get(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.get)
            .await
            .map_err(db_err)?;
        c.query_opt(&st, &[&id.0])
            .await
            .map_err(db_err)?
            .as_ref()
            .map(row_to_task)
            .transpose()
    }

    async fn task_list(&self, p: ListParams) -> Result<Vec<Task>, StoreError> {
        let (sql, params) = list_sql(&self.inner.schema, p);
        let c = self.conn().await?;
        let st = c.prepare_cached(&sql).await.map_err(db_err)?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = c.query(&st, &refs).await.map_err(db_err)?;
        rows_to_tasks(&rows)
    }

    async fn task_cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let sql = &self.inner.sql;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let task = locked_task(&*tx, sql, id).await?;
        if task.state.is_finished() {
            return Err(StoreError::Conflict {
                id,
                state: task.state,
                message: "a finished task cannot be cancelled".into(),
            });
        }
        let row = if task.state == TaskState::Running {
            let row = tx
                .query_one(&sql.cancel_running, &[&id.0])
                .await
                .map_err(db_err)?;
            // Delivered on commit, to whichever node runs the task.
            let payload = format!("cancel:{}:{}", id.0, task.node.clone().unwrap_or_default());
            tx.execute("SELECT pg_notify($1, $2)", &[&self.inner.channel, &payload])
                .await
                .map_err(db_err)?;
            row
        } else {
            let row = tx
                .query_one(&sql.cancel_queued, &[&id.0, &truncate_micros(now)])
                .await
                .map_err(db_err)?;
            cascade(&*tx, sql, &[id.0], now).await?;
            row
        };
        let out = row_to_task(&row)?;
        tx.commit().await.map_err(db_err)?;
        Ok(out)
    }

    async fn task_retry(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let sql = &self.inner.sql;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let task = locked_task(&*tx, sql, id).await?;
        if !matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
            return Err(StoreError::Conflict {
                id,
                state: task.state,
                message: "only failed or cancelled tasks can be retried".into(),
            });
        }
        let row = match tx
            .query_one(&sql.retry, &[&id.0, &truncate_micros(now)])
            .await
        {
            Ok(r) => r,
            Err(e) if is_unique_violation(&e) => {
                return Err(StoreError::Conflict {
                    id,
                    state: task.state,
                    message: format!(
                        "another unfinished task holds unique_key {:?}",
                        task.unique_key.unwrap_or_default()
                    ),
                });
            }
            Err(e) => return Err(db_err(e)),
        };
        let out = row_to_task(&row)?;
        tx.commit().await.map_err(db_err)?;
        self.announce_work();
        Ok(out)
    }

    async fn task_cancel_requested(&self, node: &str) -> Result<Vec<(TaskId, i32)>, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.cancel_requested)
            .await
            .map_err(db_err)?;
        let rows = c.query(&st, &[&node]).await.map_err(db_err)?;
        rows.iter()
            .map(|r| {
                Ok((
                    TaskId(r.try_get(0).map_err(db_err)?),
                    r.try_get(1).map_err(db_err)?,
                ))
            })
            .collect()
    }

    async fn task_prune(&self, p: PruneParams) -> Result<u64, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.prune)
            .await
            .map_err(db_err)?;
        let limit = p.limit.max(1) as i64;
        let mut total = 0;
        for (state, before) in [
            ("completed", p.completed_before),
            ("failed", p.failed_before),
            ("cancelled", p.cancelled_before),
        ] {
            if let Some(before) = before {
                total += c
                    .execute(&st, &[&state, &before, &limit])
                    .await
                    .map_err(db_err)?;
            }
        }
        Ok(total)
    }

    async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.queue_counts)
            .await
            .map_err(db_err)?;
        let rows = c
            .query(&st, &[&super::QUEUE_COUNT_CAP, &super::FINISHED_COUNT_CAP])
            .await
            .map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get(1).map_err(db_err)?;
                Ok((
                    r.try_get(0).map_err(db_err)?,
                    state.parse().map_err(|e: crate::task::UnknownState| {
                        StoreError::Schema(e.to_string())
                    })?,
                    r.try_get(2).map_err(db_err)?,
                ))
            })
            .collect()
    }

    async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.queue_set_paused)
            .await
            .map_err(db_err)?;
        c.execute(&st, &[&queue, &paused]).await.map_err(db_err)?;
        if !paused {
            self.announce_work();
        }
        Ok(())
    }

    async fn queue_paused(&self) -> Result<Vec<String>, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.queue_paused)
            .await
            .map_err(db_err)?;
        let rows = c.query(&st, &[]).await.map_err(db_err)?;
        rows.iter().map(|r| r.try_get(0).map_err(db_err)).collect()
    }

    async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.schedule_upsert)
            .await
            .map_err(db_err)?;
        c.execute(
            &st,
            &[
                &row.name,
                &row.spec,
                &row.source,
                &truncate_micros(row.last_tick),
            ],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.conn().await?;
        let n = c
            .execute(&self.inner.sql.schedule_delete, &[&name])
            .await
            .map_err(db_err)?;
        Ok(n > 0)
    }

    async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.schedule_list)
            .await
            .map_err(db_err)?;
        let rows = c.query(&st, &[]).await.map_err(db_err)?;
        rows.iter()
            .map(|r| {
                Ok(ScheduleRow {
                    name: r.try_get(0).map_err(db_err)?,
                    spec: r.try_get(1).map_err(db_err)?,
                    source: r.try_get(2).map_err(db_err)?,
                    last_tick: r.try_get(3).map_err(db_err)?,
                })
            })
            .collect()
    }

    async fn schedule_fire(
        &self,
        name: &str,
        expected: DateTime<Utc>,
        new_last: DateTime<Utc>,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Option<Vec<Inserted>>, StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let moved = tx
            .execute(
                &self.inner.sql.schedule_move,
                &[
                    &truncate_micros(new_last),
                    &name,
                    &truncate_micros(expected),
                ],
            )
            .await
            .map_err(db_err)?;
        if moved == 0 {
            return Ok(None);
        }
        let out = insert_rows(&*tx, &self.inner.sql, tasks, now).await?;
        tx.commit().await.map_err(db_err)?;
        if out.iter().any(|i| !i.existing) {
            self.announce_work();
        }
        Ok(Some(out))
    }

    async fn node_heartbeat(&self, n: NodeInfo) -> Result<(), StoreError> {
        let queues =
            serde_json::to_value(&n.queues).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let stats =
            serde_json::to_value(n.stats).map_err(|e| StoreError::Invalid(e.to_string()))?;
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.heartbeat)
            .await
            .map_err(db_err)?;
        c.execute(
            &st,
            &[
                &n.name,
                &n.version,
                &n.started_at,
                &truncate_micros(n.heartbeat_at),
                &n.workers,
                &n.workers_busy,
                &queues,
                &stats,
            ],
        )
        .await
        .map_err(db_err)?;
        Ok(())
    }

    async fn node_remove(&self, name: &str) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.execute(&self.inner.sql.node_remove, &[&name])
            .await
            .map_err(db_err)?;
        c.execute(&self.inner.sql.leader_remove, &[&name])
            .await
            .map_err(db_err)?;
        Ok(())
    }

    async fn node_list(&self) -> Result<Vec<NodeInfo>, StoreError> {
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.node_list)
            .await
            .map_err(db_err)?;
        let rows = c.query(&st, &[&Utc::now()]).await.map_err(db_err)?;
        rows.iter()
            .map(|r| {
                let queues: serde_json::Value = r.try_get(6).map_err(db_err)?;
                let stats: serde_json::Value = r.try_get(8).map_err(db_err)?;
                Ok(NodeInfo {
                    name: r.try_get(0).map_err(db_err)?,
                    version: r.try_get(1).map_err(db_err)?,
                    started_at: r.try_get(2).map_err(db_err)?,
                    heartbeat_at: r.try_get(3).map_err(db_err)?,
                    workers: r.try_get(4).map_err(db_err)?,
                    workers_busy: r.try_get(5).map_err(db_err)?,
                    queues: serde_json::from_value(queues).unwrap_or_default(),
                    leader: r.try_get(7).map_err(db_err)?,
                    stats: serde_json::from_value(stats).unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn node_rescue(&self, p: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        let now = truncate_micros(p.now);
        let now_text = p.now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let sql = &self.inner.sql;
        let mut c = self.conn().await?;
        // One transaction: the rescue, the running counts it gives back and
        // what it does to dependent tasks land together.
        let tx = c.transaction().await.map_err(db_err)?;
        let rows = match &p.node {
            Some(n) => {
                let keep: Vec<i64> = p.keep.iter().map(|t| t.0).collect();
                let before = p.started_before.unwrap_or(DateTime::<Utc>::MAX_UTC);
                tx.query(&sql.rescue_node, &[&now, &now_text, n, &keep, &before])
                    .await
            }
            None => {
                let cutoff = now - chrono::Duration::from_std(p.node_timeout).unwrap_or_default();
                tx.query(&sql.rescue_dead, &[&now, &now_text, &cutoff])
                    .await
            }
        }
        .map_err(db_err)?;
        let rescued: Vec<Rescued> = rows
            .iter()
            .map(|r| {
                let state: String = r.try_get(2).map_err(db_err)?;
                Ok(Rescued {
                    id: TaskId(r.try_get(0).map_err(db_err)?),
                    node: r.try_get(1).map_err(db_err)?,
                    state: state.parse().map_err(|e: crate::task::UnknownState| {
                        StoreError::Schema(e.to_string())
                    })?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        give_back_keys(&*tx, sql, &rows, 3, 4).await?;
        let ended: Vec<i64> = rescued
            .iter()
            .filter(|r| r.state.is_finished())
            .map(|r| r.id.0)
            .collect();
        cascade(&*tx, sql, &ended, p.now).await?;
        tx.commit().await.map_err(db_err)?;
        if !rescued.is_empty() {
            self.announce_work();
        }
        Ok(rescued)
    }

    async fn leader_try_elect(
        &self,
        node: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let c = self.conn().await?;
        let st = c
            .prepare_cached(&self.inner.sql.elect)
            .await
            .map_err(db_err)?;
        let row = c
            .query_opt(&st, &[&node, &expires, &now])
            .await
            .map_err(db_err)?;
        Ok(row.and_then(|r| r.try_get::<_, String>(0).ok()).as_deref() == Some(node))
    }

    async fn leader_resign(&self, node: &str) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.execute(&self.inner.sql.leader_remove, &[&node])
            .await
            .map_err(db_err)?;
        Ok(())
    }

    fn work_notifier(&self) -> Arc<Notify> {
        self.inner.notify.clone()
    }

    fn subscribe(&self) -> broadcast::Receiver<StoreEvent> {
        self.inner.events.subscribe()
    }

    fn postgres_schema(&self) -> Option<&str> {
        Some(&self.inner.schema)
    }
}
