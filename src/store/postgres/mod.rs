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
//!   the schema, which is what lets [`PostgresStore::insert_in`] work on a
//!   caller's own connection whatever its `search_path`.
//! - Migrations run under a transaction-scoped advisory lock, so nodes that
//!   start together migrate once.
//!
//! # Layout
//!
//! This file connects and maps each [`Store`] method to the file that holds
//! it: `claim.rs`, `insert.rs`, `outcome.rs`, `cluster.rs`; `sql.rs` has
//! every statement; `rows.rs` decodes tasks; `notify.rs` is LISTEN/NOTIFY;
//! `migrations/` the schema, one numbered file per version.

mod claim;
pub use claim::claim_turn_relation;
mod clock;
mod cluster;
mod insert;
mod notify;
mod outcome;
mod rows;
mod sql;
mod statements;
mod wake;

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use deadpool_postgres::{Manager, ManagerConfig, Pool, RecyclingMethod};
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_postgres::{GenericClient, NoTls};
use tokio_util::sync::CancellationToken;

use super::{
    AuditEntry, ClaimParams, Completion, Inserted, ListParams, NodeInfo, PruneParams,
    QueueSettings, RescueParams, Rescued, ScheduleFire, ScheduleRow, Store, StoreError, StoreEvent,
    TaskInsert, due::DueTimer, due_again, due_later, truncate_micros, truncate_rows,
};
use crate::task::{Task, TaskId, TaskState};
use insert::insert_rows;
use notify::{
    channel_name, counted_work_payloads, done_payloads, due_payload, listen_loop, notify_loop,
    work_payload,
};
use rows::{Param, list_sql, row_to_task, rows_to_tasks};
use sql::Sql;
use statements::{Db, On, Params, Statements};

/// The schema, one file per version; `{schema}` stands for the schema's
/// name. Append; never edit a released file.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_tasks.sql"),
    include_str!("migrations/0002_schedules.sql"),
    include_str!("migrations/0003_workflows.sql"),
    include_str!("migrations/0004_limits.sql"),
    include_str!("migrations/0005_running_keys.sql"),
    include_str!("migrations/0006_queue_state_index.sql"),
    include_str!("migrations/0007_kind_index.sql"),
    include_str!("migrations/0008_claim_token.sql"),
    include_str!("migrations/0009_task_deps_child.sql"),
    include_str!("migrations/0010_node_instance.sql"),
    include_str!("migrations/0011_audit.sql"),
    include_str!("migrations/0012_unique_by_kind.sql"),
    include_str!("migrations/0013_node_schedules.sql"),
    include_str!("migrations/0014_node_kinds.sql"),
    include_str!("migrations/0015_task_ref.sql"),
    include_str!("migrations/0016_task_progress.sql"),
    include_str!("migrations/0017_schedule_paused.sql"),
    include_str!("migrations/0018_queue_settings.sql"),
    include_str!("migrations/0019_task_tags.sql"),
    include_str!("migrations/0020_unique_rules.sql"),
    include_str!("migrations/0021_queue_limits.sql"),
    include_str!("migrations/0022_fairness.sql"),
    include_str!("migrations/0023_traceparent.sql"),
    include_str!("migrations/0024_no_state_index.sql"),
    include_str!("migrations/0025_waiting.sql"),
    include_str!("migrations/0026_cancel_poll_index.sql"),
    include_str!("migrations/0027_claim_turns.sql"),
];

fn migrations(schema: &str) -> Vec<String> {
    MIGRATIONS
        .iter()
        .map(|m| m.replace("{schema}", schema))
        .collect()
}

/// How to reach the database.
#[derive(Debug, Clone)]
pub struct PostgresOptions {
    pub url: String,
    /// The schema that holds proto_tasker's tables.
    pub schema: String,
    /// Connections in the pool (the LISTEN connection, which also carries
    /// heartbeats, is extra). Dashboard and list reads use at most all but
    /// one of them, so claims and outcomes (and heartbeats, when there is
    /// no LISTEN connection) always have a connection.
    pub pool_size: usize,
    /// `Transaction` when `url` points at a transaction-mode pooler such as
    /// PgBouncer (see [`PoolMode`]).
    pub pool_mode: PoolMode,
    /// A direct connection to PostgreSQL for LISTEN (needed when `url` is a
    /// transaction-mode pooler, where LISTEN cannot work). Default: `url`
    /// in `Session` mode; no listener (polling only) in `Transaction` mode.
    pub listen_url: Option<String>,
    /// How long sent data may stay unacknowledged before a connection
    /// counts as broken (shorter than the nodes' `node_timeout`).
    pub tcp_user_timeout: Duration,
}

impl PostgresOptions {
    pub fn new(url: impl Into<String>) -> Self {
        PostgresOptions {
            url: url.into(),
            schema: "proto_tasker".into(),
            pool_size: 2,
            pool_mode: PoolMode::Session,
            listen_url: None,
            tcp_user_timeout: Duration::from_secs(8),
        }
    }

    pub fn schema(mut self, schema: impl Into<String>) -> Self {
        self.schema = schema.into();
        self
    }
}

/// Takes a transaction-scoped advisory lock on `hashtext($1)` (released at
/// commit or rollback, so it works through a transaction pooler).
pub(super) const ADVISORY_XACT_LOCK: &str = "SELECT pg_advisory_xact_lock(hashtext($1))";

/// A statement every task, or every node's heartbeat, goes through (see
/// [`PostgresStore::explain_generic`]).
#[doc(hidden)]
#[derive(Debug, Clone, Copy)]
pub enum HotStatement {
    Claim,
    Complete,
    /// Every node's poll for cancel requests of its running tasks.
    CancelPoll,
}

/// What sits between the store and PostgreSQL.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize, serde::Serialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum PoolMode {
    /// A direct connection (or a pooler in session mode): statements are
    /// prepared once per connection.
    #[default]
    Session,
    /// A pooler in transaction mode (PgBouncer `pool_mode = transaction`):
    /// nothing outlives a transaction, statements go unnamed, and LISTEN
    /// needs `listen_url`.
    Transaction,
}

/// The PostgreSQL store. Cheap to clone.
#[derive(Clone)]
pub struct PostgresStore {
    inner: Arc<Inner>,
}

struct Inner {
    pool: Pool,
    sql: Sql,
    stmts: Statements,
    /// Permits for dashboard and list reads: one fewer than the pool's
    /// connections, so a slow page never holds every connection while a
    /// heartbeat, claim or outcome waits.
    reads: tokio::sync::Semaphore,
    schema: String,
    channel: String,
    notify: Arc<Notify>,
    events: broadcast::Sender<StoreEvent>,
    /// Queued NOTIFY payloads; the notifier task coalesces them.
    outbox: mpsc::UnboundedSender<String>,
    stop: CancellationToken,
    /// The database's clock minus this process's, and when it was measured.
    /// A std mutex: held only to read or replace the pair.
    clock: std::sync::Mutex<Option<(chrono::Duration, std::time::Instant)>>,
    /// This handle's mark on the finishes it announces (see `done_payloads`).
    origin: String,
    /// Wakes producers when delayed, retried or snoozed tasks fall due.
    due: DueTimer,
    /// The live nodes, for choosing whom a NOTIFY of new work wakes.
    members: Arc<wake::Membership>,
    /// The queues that have a `max_depth` (or are round robin), when they
    /// were read, and the settings epoch then: an enqueue to any other queue
    /// takes the one-statement path and pays no lock. Read again after
    /// [`CAPS_FRESH`], after this handle changes settings, and when it hears
    /// (NOTIFY) that another process did, so a cap set elsewhere applies to
    /// this one's enqueues as soon as the notification arrives, and within
    /// [`CAPS_FRESH`] if it is lost. A std mutex: held only to read or
    /// replace the pair.
    capped: std::sync::Mutex<Option<(std::time::Instant, u64, Arc<QueueFlags>)>>,
    /// Moves when this handle hears that a queue's settings changed (a
    /// NOTIFY from any process): the cache above is then read again at
    /// once rather than up to [`CAPS_FRESH`] later.
    settings_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Until when this handle's claims skip their turn (see `claim.rs`):
    /// set when a claim waited past its turn's bound, i.e. a turn holder
    /// hangs. A std mutex: held only to read or replace the instant.
    turns_off_until: std::sync::Mutex<Option<std::time::Instant>>,
    /// The listening connection, lent to heartbeats while it is up.
    beat: Arc<notify::BeatConn>,
}

/// The queues whose enqueues take the transaction path: those with a
/// `max_depth` (locked and counted) and the round-robin ones (their tasks
/// get a fair_seq).
#[derive(Debug, Default)]
pub(super) struct QueueFlags {
    pub capped: std::collections::HashSet<String>,
    pub fair: std::collections::HashSet<String>,
}

/// How long a handle trusts its list of capped queues.
const CAPS_FRESH: std::time::Duration = std::time::Duration::from_secs(1);

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

pub(super) fn db_err(e: tokio_postgres::Error) -> StoreError {
    match e.as_db_error() {
        Some(d) => {
            let code = d.code().code();
            // Connection trouble (08), serialization and deadlocks (40),
            // resources (53), shutdown and admin (57) may pass; any other
            // class (bad data, a constraint) will fail again the same way.
            let transient = ["08", "40", "53", "57"].iter().any(|c| code.starts_with(c));
            StoreError::Unavailable {
                message: format!("{code}: {}", d.message()),
                transient,
            }
        }
        None => StoreError::unavailable(e.to_string()),
    }
}

pub(super) fn pool_err(e: deadpool_postgres::PoolError) -> StoreError {
    use deadpool_postgres::PoolError;
    let why = match e {
        // PostgreSQL's own words ("53300: sorry, too many clients already"),
        // not the driver's "db error".
        PoolError::Backend(e) => match db_err(e) {
            StoreError::Unavailable { message, .. } => message,
            other => other.to_string(),
        },
        PoolError::Timeout(_) => {
            "every pooled connection stayed busy past the wait (raise store.pool_size?)".into()
        }
        e => e.to_string(),
    };
    StoreError::unavailable(format!("no database connection: {why}"))
}

pub(super) fn is_unique_violation(e: &tokio_postgres::Error) -> bool {
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
        Err(StoreError::invalid(
            "store.schema",
            format!(
                "{s:?}: use lowercase letters, digits and _ (at most 48, not starting with a digit)"
            ),
        ))
    }
}

/// The driver's settings for `url` (`field` names it in errors; the URL
/// itself, which may hold a password, is never echoed).
fn connect_config(
    options: &PostgresOptions,
    url: &str,
    field: &str,
) -> Result<tokio_postgres::Config, StoreError> {
    let mut pg: tokio_postgres::Config = url.parse().map_err(|e: tokio_postgres::Error| {
        StoreError::invalid(field, format!("not a PostgreSQL URL: {e}"))
    })?;
    // Names our connections in pg_stat_activity (per schema, so tests can find theirs).
    pg.application_name(format!("proto_tasker:{}", options.schema));
    pg.connect_timeout(Duration::from_secs(5));
    // A silent partition (no error, no reply) must not hang a call
    // forever: keepalives find a dead peer, and the TCP user timeout
    // fails a connection whose sent data stays unacknowledged.
    pg.keepalives(true)
        .keepalives_idle(Duration::from_secs(5))
        .keepalives_interval(Duration::from_secs(1))
        .keepalives_retries(3)
        .tcp_user_timeout(options.tcp_user_timeout);
    Ok(pg)
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
            super::DashboardRead::QueueLag(now) => {
                (self.inner.sql.queue_oldest_due.clone(), vec![Box::new(now)])
            }
        };
        let (_permit, c) = self.read_conn().await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        let rows = self.query(&c, &format!("EXPLAIN {sql}"), &refs).await?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0).map_err(db_err))
            .collect()
    }

    /// The generic plan (the one a prepared statement settles on after a
    /// few runs, made from the table's statistics, not the call's values)
    /// of the claim or the completion statement, one line per plan line.
    /// Tests use it to check that both find their rows by index whatever
    /// the statistics say.
    #[doc(hidden)]
    pub async fn explain_generic(
        &self,
        statement: HotStatement,
    ) -> Result<Vec<String>, StoreError> {
        let (sql, args) = match statement {
            HotStatement::Claim => (&self.inner.sql.claim, 4),
            HotStatement::Complete => (&self.inner.sql.complete_many, 11),
            HotStatement::CancelPoll => (&self.inner.sql.cancel_requested, 1),
        };
        let nulls = vec!["NULL"; args].join(", ");
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        tx.batch_execute(&format!(
            "SET LOCAL plan_cache_mode = force_generic_plan; PREPARE proto_tasker_explain AS {sql}"
        ))
        .await
        .map_err(db_err)?;
        let rows = tx
            .query(
                &format!("EXPLAIN EXECUTE proto_tasker_explain({nulls})"),
                &[],
            )
            .await
            .map_err(db_err)?;
        tx.batch_execute("DEALLOCATE proto_tasker_explain")
            .await
            .map_err(db_err)?;
        tx.commit().await.map_err(db_err)?;
        rows.iter()
            .map(|r| r.try_get::<_, String>(0).map_err(db_err))
            .collect()
    }

    /// Connect (lazily: the pool opens connections on first use) and start
    /// the LISTEN and NOTIFY tasks. Call [`Store::migrate`] before use.
    pub async fn connect(options: PostgresOptions) -> Result<Self, StoreError> {
        check_schema(&options.schema)?;
        let pg = connect_config(&options, &options.url, "store.url")?;
        let listen = match (&options.listen_url, options.pool_mode) {
            (Some(url), _) => Some(connect_config(&options, url, "store.listen_url")?),
            (None, PoolMode::Session) => Some(pg.clone()),
            (None, PoolMode::Transaction) => {
                tracing::warn!(
                    schema = %options.schema,
                    "store.pool_mode is transaction and no store.listen_url is set: \
                     LISTEN cannot work through a transaction pooler, so this node finds \
                     new work by polling only (set store.listen_url to a direct connection)"
                );
                None
            }
        };
        let manager = Manager::from_config(
            pg,
            NoTls,
            ManagerConfig {
                recycling_method: RecyclingMethod::Fast,
            },
        );
        let size = options.pool_size.max(2);
        let pool = Pool::builder(manager)
            .max_size(size)
            .wait_timeout(Some(Duration::from_secs(10)))
            .create_timeout(Some(Duration::from_secs(5)))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .build()
            .map_err(|e| StoreError::invalid("store.url", e.to_string()))?;
        let (events, _) = broadcast::channel(1024);
        let (outbox, outbox_rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let notify = Arc::new(Notify::new());
        let channel = channel_name(&options.schema);
        let origin = format!("{:016x}", rand::random::<u64>());
        let due = DueTimer::new(notify.clone());
        let members = Arc::new(wake::Membership::default());
        let settings_epoch = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let beat = Arc::new(notify::BeatConn::default());
        let store = PostgresStore {
            inner: Arc::new(Inner {
                pool: pool.clone(),
                sql: Sql::new(&options.schema),
                stmts: Statements::new(options.pool_mode == PoolMode::Transaction),
                reads: tokio::sync::Semaphore::new(size - 1),
                schema: options.schema.clone(),
                channel: channel.clone(),
                notify: notify.clone(),
                events: events.clone(),
                outbox,
                stop: stop.clone(),
                clock: std::sync::Mutex::new(None),
                origin: origin.clone(),
                due: due.clone(),
                members: members.clone(),
                capped: std::sync::Mutex::new(None),
                settings_epoch: settings_epoch.clone(),
                turns_off_until: std::sync::Mutex::new(None),
                beat: beat.clone(),
            }),
        };
        if let Some(listen) = listen {
            let hearer = notify::Hearer {
                origin,
                members,
                due,
                notify,
                events,
                settings_epoch,
                beat,
            };
            tokio::spawn(listen_loop(listen, channel.clone(), hearer, stop.clone()));
        }
        let sender = notify::Sender {
            pool,
            channel,
            sql: store.inner.sql.notify_many.clone(),
            origin: store.inner.origin.clone(),
        };
        tokio::spawn(notify_loop(sender, outbox_rx, stop));
        Ok(store)
    }

    pub fn schema(&self) -> &str {
        &self.inner.schema
    }

    /// The queues that have a `max_depth` (see `Inner::capped`).
    async fn capped_queues(&self) -> Result<Arc<QueueFlags>, StoreError> {
        let epoch = self
            .inner
            .settings_epoch
            .load(std::sync::atomic::Ordering::Acquire);
        if let Some((at, seen, set)) = self
            .inner
            .capped
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_ref()
            && at.elapsed() < CAPS_FRESH
            && *seen == epoch
        {
            return Ok(set.clone());
        }
        let read_at = std::time::Instant::now();
        let c = self.conn().await?;
        let rows = self.query(&c, &self.inner.sql.capped_queues, &[]).await?;
        let mut flags = QueueFlags::default();
        for r in &rows {
            let q: String = r.try_get(0).map_err(db_err)?;
            if r.try_get::<_, bool>(1).map_err(db_err)? {
                flags.capped.insert(q.clone());
            }
            if r.try_get::<_, bool>(2).map_err(db_err)? {
                flags.fair.insert(q);
            }
        }
        let flags = Arc::new(flags);
        *self.inner.capped.lock().unwrap_or_else(|e| e.into_inner()) =
            Some((read_at, epoch, flags.clone()));
        Ok(flags)
    }

    async fn settings_list(&self) -> Result<Vec<(String, QueueSettings)>, StoreError> {
        let c = self.conn().await?;
        let rows = self.query(&c, &self.inner.sql.settings_list, &[]).await?;
        rows.iter()
            .map(|r| {
                let queue: String = r.try_get(0).map_err(db_err)?;
                let max: Option<i32> = r.try_get(1).map_err(db_err)?;
                let limits: Option<serde_json::Value> = r.try_get(2).map_err(db_err)?;
                let mut s: QueueSettings = match limits {
                    Some(l) => serde_json::from_value(l).map_err(|e| {
                        StoreError::Schema(format!("queue_settings.limits of {queue:?}: {e}"))
                    })?,
                    None => QueueSettings::default(),
                };
                s.max_depth = max.map(|m| u32::try_from(m).unwrap_or(0));
                Ok((queue, s))
            })
            .collect()
    }

    async fn settings_put(
        &self,
        queue: &str,
        settings: QueueSettings,
        only_if_absent: bool,
    ) -> Result<(), StoreError> {
        let max = settings
            .max_depth
            .map(|m| {
                i32::try_from(m)
                    .map_err(|_| StoreError::invalid("max_depth", format!("{m} is too large")))
            })
            .transpose()?;
        let sql = if only_if_absent {
            &self.inner.sql.settings_init
        } else {
            &self.inner.sql.settings_put
        };
        let limits = (!only_if_absent || settings.has_limits())
            .then(|| serde_json::to_value(settings))
            .transpose()
            .map_err(|e| StoreError::invalid("settings", e.to_string()))?;
        let c = self.conn().await?;
        if self.execute(&c, sql, &[&queue, &max, &limits]).await? == 0 {
            // Stored already (a starting node's values, most often): no
            // node needs to read them again. With 100 nodes starting, each
            // one's write woke all the others (docs/benchmarks.md).
            return Ok(());
        }
        // This handle's next enqueue reads the capped queues again.
        *self.inner.capped.lock().unwrap_or_else(|e| e.into_inner()) = None;
        // Every node's pool reads the settings again (this one's at once).
        let _ = self.inner.events.send(StoreEvent::SettingsChanged);
        let _ = self.inner.outbox.send(notify::SETTINGS.to_string());
        Ok(())
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
        Err(StoreError::unavailable(
            "every pooled connection was closed",
        ))
    }

    /// Enqueue `rows` inside the caller's own transaction (or on any
    /// client): the tasks exist if and only if that transaction commits,
    /// and the nodes are woken on commit. Normally reached through
    /// [`Client::insert_in`](crate::Client::insert_in).
    pub async fn insert_in<C: GenericClient>(
        &self,
        c: &C,
        rows: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Inserted>, StoreError> {
        insert::insert_in(c, &self.inner.schema, rows, now).await
    }

    /// Is the database there? (Fails when the server does not answer; a
    /// schema not yet migrated is fine.)
    pub async fn ping(&self) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.simple_query("SELECT 1").await.map_err(db_err)?;
        Ok(())
    }

    /// Drop this store's schema and everything in it (benchmarks and tests
    /// that made a schema of their own).
    pub async fn drop_schema(&self) -> Result<(), StoreError> {
        let c = self.conn().await?;
        c.batch_execute(&format!(
            "DROP SCHEMA IF EXISTS {} CASCADE",
            self.inner.schema
        ))
        .await
        .map_err(db_err)
    }

    /// Migrate only up to `version` (tests of in-place upgrades).
    #[doc(hidden)]
    pub async fn migrate_to(&self, target: usize) -> Result<(), StoreError> {
        let s = &self.inner.schema;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        // Nodes starting together: the first migrates, the others wait here
        // and then find nothing to do.
        self.execute(
            &tx,
            ADVISORY_XACT_LOCK,
            &[&format!("proto_tasker_migrate:{s}")],
        )
        .await?;
        tx.batch_execute(&format!(
            "CREATE SCHEMA IF NOT EXISTS {s}; \
             CREATE TABLE IF NOT EXISTS {s}.schema_version (version integer NOT NULL)"
        ))
        .await
        .map_err(db_err)?;
        let version: i32 = self
            .query_opt(&tx, &format!("SELECT version FROM {s}.schema_version"), &[])
            .await?
            .map(|r| r.try_get(0))
            .transpose()
            .map_err(db_err)?
            .unwrap_or(0);
        let all = migrations(s);
        let target = target.min(all.len());
        if version as usize > all.len() {
            return Err(StoreError::Schema(format!(
                "schema {s} is at version {version}, newer than this binary knows ({}); upgrade proto_tasker",
                all.len()
            )));
        }
        for (i, m) in all.iter().enumerate().take(target).skip(version as usize) {
            tx.batch_execute(m).await.map_err(|e| {
                StoreError::Schema(format!("schema {s}: migration {}: {}", i + 1, db_err(e)))
            })?;
        }
        self.execute(&tx, &format!("DELETE FROM {s}.schema_version"), &[])
            .await?;
        self.execute(
            &tx,
            &format!("INSERT INTO {s}.schema_version VALUES ($1)"),
            &[&(target.max(version as usize) as i32)],
        )
        .await?;
        tx.commit().await.map_err(db_err)
    }

    /// Run `sql` on a connection or transaction (see `statements.rs`).
    async fn query<'a>(
        &self,
        on: impl Into<On<'a>>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.inner.stmts.query(on.into(), sql, params).await
    }

    async fn query_opt<'a>(
        &self,
        on: impl Into<On<'a>>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<tokio_postgres::Row>, StoreError> {
        self.inner.stmts.query_opt(on.into(), sql, params).await
    }

    async fn query_one<'a>(
        &self,
        on: impl Into<On<'a>>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<tokio_postgres::Row, StoreError> {
        self.inner.stmts.query_one(on.into(), sql, params).await
    }

    async fn execute<'a>(
        &self,
        on: impl Into<On<'a>>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, StoreError> {
        self.inner.stmts.execute(on.into(), sql, params).await
    }

    /// A connection for a dashboard or list read: waits for one of the
    /// read permits first (see `Inner::reads`), held as long as the
    /// connection is.
    async fn read_conn(
        &self,
    ) -> Result<(tokio::sync::SemaphorePermit<'_>, deadpool_postgres::Object), StoreError> {
        let permit = tokio::time::timeout(Duration::from_secs(10), self.inner.reads.acquire())
            .await
            .map_err(|_| {
                StoreError::unavailable(
                    "no database connection: every read connection stayed busy past the wait (raise store.pool_size?)",
                )
            })?
            .map_err(|_| StoreError::unavailable("store closed"))?;
        Ok((permit, self.conn().await?))
    }

    /// Wake producers here now and on every node after the NOTIFY goes out.
    fn announce_work(&self) {
        self.inner.notify.notify_waiters();
        let _ = self.inner.outbox.send(work_payload(&self.inner.origin));
    }

    /// New due tasks were inserted: wake producers here now, and after the
    /// NOTIFY goes out the few nodes chosen to take them (see `wake.rs`).
    fn announce_new(&self, inserted: &[Inserted]) {
        let mut counts = std::collections::BTreeMap::<String, usize>::new();
        for i in inserted
            .iter()
            .filter(|i| crate::store::is_new_work(i) && i.task.state == TaskState::Available)
        {
            *counts.entry(i.task.queue.clone()).or_default() += 1;
        }
        if counts.is_empty() {
            return;
        }
        self.inner.notify.notify_waiters();
        match counted_work_payloads(&self.inner.origin, &counts) {
            Some(payloads) => {
                for p in payloads {
                    let _ = self.inner.outbox.send(p);
                }
            }
            None => {
                let _ = self.inner.outbox.send(work_payload(&self.inner.origin));
            }
        }
    }

    /// Wake producers here, and on every node through the next NOTIFY, when
    /// tasks just inserted for later fall due (the earliest few instants).
    fn announce_due(&self, times: Vec<DateTime<Utc>>) {
        if times.is_empty() {
            return;
        }
        if let Some(p) = due_payload(&self.inner.origin, &times) {
            let _ = self.inner.outbox.send(p);
        }
        self.inner.due.at(times);
    }

    /// Tell waiters here now, and on every node through the next NOTIFY,
    /// that `ids` finished (called after the commit that finished them).
    fn announce_finished(&self, ids: Vec<TaskId>) {
        if ids.is_empty() {
            return;
        }
        for p in done_payloads(&self.inner.origin, &ids) {
            let _ = self.inner.outbox.send(p);
        }
        let _ = self
            .inner
            .events
            .send(StoreEvent::Finished { ids: ids.into() });
    }
}

#[async_trait]
impl Store for PostgresStore {
    async fn migrate(&self) -> Result<(), StoreError> {
        self.migrate_to(MIGRATIONS.len()).await
    }

    async fn task_insert_started(
        &self,
        task: TaskInsert,
        node: &str,
        now: DateTime<Utc>,
    ) -> Result<Inserted, StoreError> {
        let flags = self.capped_queues().await?;
        if !task.can_start_at_once(now)
            || flags.capped.contains(&task.queue)
            || flags.fair.contains(&task.queue)
        {
            return super::insert_one(self, task, now).await;
        }
        let now = truncate_micros(now);
        let Some(t) = truncate_rows(vec![task]).pop() else {
            return Err(StoreError::unavailable("insert lost its row"));
        };
        let c = self.conn().await?;
        let row = self
            .query_one(
                &c,
                &self.inner.sql.insert_started,
                &[
                    &t.kind,
                    &t.queue,
                    &t.args,
                    &t.priority,
                    &t.max_attempts,
                    &t.timeout_ms,
                    &t.run_at,
                    &now,
                    &t.traceparent,
                    &node,
                ],
            )
            .await?;
        drop(c);
        let out = vec![Inserted::new(row_to_task(&row)?)];
        // Not started (the queue was busy or paused): wake claimers as any
        // insert does.
        self.announce_new(&out);
        out.into_iter()
            .next()
            .ok_or_else(|| StoreError::unavailable("insert returned no row"))
    }

    async fn task_insert_many(
        &self,
        tasks: Vec<TaskInsert>,
        now: DateTime<Utc>,
    ) -> Result<Vec<Inserted>, StoreError> {
        if tasks.is_empty() {
            return Ok(Vec::new());
        }
        let queues = insert::queues_of(&tasks);
        let flags = self.capped_queues().await?;
        let any_capped = queues.iter().any(|q| flags.capped.contains(*q));
        let any_fair = queues.iter().any(|q| flags.fair.contains(*q));
        let mut c = self.conn().await?;
        let out = if !any_capped && !any_fair && insert::all_plain(&tasks) {
            // One statement: atomic and durable on its own, in one round trip.
            let none = std::collections::HashSet::new();
            insert_rows(
                Db::store(&c, &self.inner.stmts),
                &self.inner.sql,
                tasks,
                now,
                Some(&none),
            )
            .await?
        } else {
            let tx = c.transaction().await.map_err(db_err)?;
            let db = Db::store(&tx, &self.inner.stmts);
            // A capped queue: take its lock, insert, count, and roll back
            // (dropping `tx`) when the count is past the cap.
            let caps = if any_capped {
                insert::lock_caps(db, &self.inner.sql, &queues).await?
            } else {
                Vec::new()
            };
            let out = insert_rows(db, &self.inner.sql, tasks, now, Some(&flags.fair)).await?;
            insert::check_caps(db, &self.inner.sql, &caps).await?;
            tx.commit().await.map_err(db_err)?;
            out
        };
        self.announce_new(&out);
        self.announce_due(due_later(&out));
        Ok(out)
    }

    async fn task_get_many(&self, ids: Vec<TaskId>) -> Result<Vec<Task>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().map(|t| t.0).collect();
        let c = self.conn().await?;
        rows_to_tasks(&self.query(&c, &self.inner.sql.get_many, &[&ids]).await?)
    }

    async fn task_unfinished(&self, ids: Vec<TaskId>) -> Result<Vec<TaskId>, StoreError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<i64> = ids.iter().map(|t| t.0).collect();
        let c = self.conn().await?;
        self.query(&c, &self.inner.sql.unfinished, &[&ids])
            .await?
            .iter()
            .map(|r| r.try_get(0).map(TaskId).map_err(db_err))
            .collect()
    }

    async fn task_get(&self, id: TaskId) -> Result<Option<Task>, StoreError> {
        let c = self.conn().await?;
        self.query_opt(&c, &self.inner.sql.get, &[&id.0])
            .await?
            .as_ref()
            .map(row_to_task)
            .transpose()
    }

    async fn task_list(&self, p: ListParams) -> Result<Vec<Task>, StoreError> {
        let (sql, params) = list_sql(&self.inner.schema, p);
        let (_permit, c) = self.read_conn().await?;
        let refs: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> = params
            .iter()
            .map(|b| b.as_ref() as &(dyn tokio_postgres::types::ToSql + Sync))
            .collect();
        rows_to_tasks(&self.query(&c, &sql, &refs).await?)
    }

    async fn task_cancel_requested(&self, node: &str) -> Result<Vec<(TaskId, i64)>, StoreError> {
        let c = self.conn().await?;
        let rows = self
            .query(&c, &self.inner.sql.cancel_requested, &[&node])
            .await?;
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
        let limit = p.limit.max(1) as i64;
        let mut total = 0u64;
        for (state, before) in p.cutoffs() {
            if let Some(before) = before {
                let row = self
                    .query_one(
                        &c,
                        &self.inner.sql.prune,
                        &[&state.as_str(), &before, &limit],
                    )
                    .await?;
                total += row.try_get::<_, i64>(0).map_err(db_err)? as u64;
            }
        }
        if let Some(before) = p.audit_before {
            self.execute(&c, &self.inner.sql.audit_prune, &[&before, &limit])
                .await?;
        }
        self.execute(&c, &self.inner.sql.fair_keys_prune, &[])
            .await?;
        Ok(total)
    }
    async fn task_claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        self.claim(p).await
    }

    async fn audit_append(&self, e: AuditEntry) -> Result<(), StoreError> {
        PostgresStore::audit_append(self, e).await
    }

    async fn audit_list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        PostgresStore::audit_list(self, before, limit).await
    }

    async fn task_complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<bool>, StoreError> {
        // Retries and snoozes fall due here first: this node's producers
        // wake for them; other nodes find them when they next poll.
        let again = due_again(&completions);
        let out = self.complete_many(completions).await?;
        self.inner.due.at(again);
        Ok(out)
    }

    async fn task_cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        self.cancel(id, now).await
    }

    async fn task_retry(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        self.retry(id, now).await
    }

    async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError> {
        PostgresStore::queue_counts(self).await
    }

    async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), StoreError> {
        PostgresStore::queue_set_paused(self, queue, paused).await
    }

    async fn announce_waiting(&self, span: Duration) -> Result<(), StoreError> {
        let c = self.conn().await?;
        self.execute(
            &c,
            &self.inner.sql.waiting_announce,
            &[&self.inner.origin, &span.as_secs_f64()],
        )
        .await
        .map(|_| ())
    }

    async fn queue_paused(&self) -> Result<Vec<String>, StoreError> {
        PostgresStore::queue_paused(self).await
    }

    async fn queue_oldest_due(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        PostgresStore::queue_oldest_due(self, now).await
    }

    async fn task_progress(
        &self,
        updates: Vec<super::ProgressUpdate>,
    ) -> Result<usize, StoreError> {
        if updates.is_empty() {
            return Ok(0);
        }
        let ids: Vec<i64> = updates.iter().map(|u| u.id.0).collect();
        let tokens: Vec<i64> = updates.iter().map(|u| u.token).collect();
        let values: Vec<&serde_json::Value> = updates.iter().map(|u| &u.progress).collect();
        let c = self.conn().await?;
        let n = self
            .execute(&c, &self.inner.sql.progress, &[&ids, &tokens, &values])
            .await?;
        Ok(n as usize)
    }

    async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError> {
        PostgresStore::schedule_upsert(self, row).await
    }

    async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError> {
        PostgresStore::schedule_delete(self, name).await
    }

    async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        PostgresStore::schedule_list(self).await
    }

    async fn schedule_set_paused(&self, name: &str, paused: bool) -> Result<bool, StoreError> {
        PostgresStore::schedule_set_paused(self, name, paused).await
    }

    async fn queue_settings(&self) -> Result<Vec<(String, QueueSettings)>, StoreError> {
        self.settings_list().await
    }

    async fn queue_fair_adopt(&self, queue: &str) -> Result<u64, StoreError> {
        let c = self.conn().await?;
        self.execute(&c, &self.inner.sql.fair_adopt, &[&queue])
            .await
    }

    async fn queue_settings_put(
        &self,
        queue: &str,
        settings: QueueSettings,
        only_if_absent: bool,
    ) -> Result<(), StoreError> {
        self.settings_put(queue, settings, only_if_absent).await
    }

    async fn schedule_fire(&self, f: ScheduleFire) -> Result<Option<Vec<Inserted>>, StoreError> {
        let out = PostgresStore::schedule_fire(self, f).await?;
        if let Some(v) = &out {
            self.announce_due(due_later(v));
        }
        Ok(out)
    }

    async fn node_register(
        &self,
        n: NodeInfo,
        live_since: DateTime<Utc>,
        take_from: Option<String>,
    ) -> Result<Option<NodeInfo>, StoreError> {
        PostgresStore::node_register(self, n, live_since, take_from).await
    }

    async fn node_heartbeat(&self, n: NodeInfo) -> Result<bool, StoreError> {
        PostgresStore::node_heartbeat(self, n).await
    }

    async fn node_remove(&self, name: &str) -> Result<(), StoreError> {
        PostgresStore::node_remove(self, name).await
    }

    async fn node_list(&self, now: DateTime<Utc>) -> Result<Vec<NodeInfo>, StoreError> {
        PostgresStore::node_list(self, now).await
    }

    async fn node_rescue(&self, p: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        self.rescue(p).await
    }

    async fn leader_try_elect(
        &self,
        node: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        PostgresStore::leader_try_elect(self, node, ttl, now).await
    }

    async fn leader_resign(&self, node: &str) -> Result<(), StoreError> {
        PostgresStore::leader_resign(self, node).await
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
