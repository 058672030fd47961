//! Configures and builds a [`WorkerPool`].

use std::sync::Arc;
use std::time::Duration;

use super::WorkerPool;
use super::settings::{PoolSettings, validate_queue};
use crate::maintenance::Retention;
use crate::pool::shared::PoolObserver;
use crate::registry::TaskRegistry;
use crate::sentinel::SentinelConfig;
use crate::store::Store;

/// Why a pool could not be built.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{field}: {message}")]
pub struct BuildError {
    pub field: String,
    pub message: String,
}

/// Everything a [`Builder`] gathers for its pool.
#[derive(Debug, Clone)]
pub(crate) struct PoolSetup {
    pub node: String,
    pub queues: Vec<(String, usize)>,
    pub settings: PoolSettings,
    pub sentinel: SentinelConfig,
    /// Schedules this node registers at start.
    pub schedules: Vec<crate::cron::ScheduleSpec>,
    /// Cluster-wide limits by queue.
    pub limits: std::collections::HashMap<String, crate::store::QueueLimits>,
}

/// Builds a [`WorkerPool`].
///
/// ```no_run
/// # async fn f() -> Result<(), Box<dyn std::error::Error>> {
/// use std::sync::Arc;
/// use proto_tasker::{Builder, SqliteStore, TaskRegistry};
/// let store = Arc::new(SqliteStore::open_path("tasks.db")?);
/// let pool = Builder::new(store, TaskRegistry::new())
///     .queue("default", 10)
///     .queue("emails", 2)
///     .build()?;
/// # Ok(()) }
/// ```
pub struct Builder {
    store: Arc<dyn Store>,
    registry: TaskRegistry,
    config: PoolSetup,
    observer: Option<Arc<dyn PoolObserver>>,
}

impl std::fmt::Debug for Builder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Builder")
            .field("registry", &self.registry)
            .field("config", &self.config)
            .finish()
    }
}

/// A node name unique on this host: `hostname-pid`.
pub fn default_node_name() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_string());
    format!("{host}-{}", std::process::id())
}

impl Builder {
    pub fn new(store: Arc<dyn Store>, registry: TaskRegistry) -> Self {
        Builder {
            store,
            registry,
            config: PoolSetup {
                node: default_node_name(),
                queues: Vec::new(),
                settings: PoolSettings::default(),
                sentinel: SentinelConfig::default(),
                schedules: Vec::new(),
                limits: std::collections::HashMap::new(),
            },
            observer: None,
        }
    }

    /// The node's name: unique among the nodes sharing a store. Default `hostname-pid`.
    pub fn node_name(mut self, name: impl Into<String>) -> Self {
        self.config.node = name.into();
        self
    }

    /// Share `value` with every executor of the pool: they read it with
    /// [`TaskContext::data`](crate::TaskContext::data) (one value per type;
    /// wrap what is not `Sync`, e.g. in a `Mutex`).
    pub fn data<T: Send + Sync + 'static>(mut self, value: T) -> Self {
        self.registry.data(value);
        self
    }

    /// Serve `queue` with `workers` slots (its concurrency on this node).
    /// With no queue named, the pool serves `default` with 10 workers.
    pub fn queue(mut self, queue: impl Into<String>, workers: usize) -> Self {
        let queue = queue.into();
        self.config.queues.retain(|(q, _)| *q != queue);
        self.config.queues.push((queue, workers));
        self
    }

    /// Limit `queue` across the whole cluster (running tasks, per key, starts
    /// per interval, round robin). These are starting values: stored for the
    /// cluster when the queue's limits were never stored, and replaced by
    /// what is set at run time ([`Client::queue_set_settings`](crate::Client::queue_set_settings),
    /// `PATCH /api/v1/queues/{name}`), which every node applies.
    pub fn queue_limits(
        mut self,
        queue: impl Into<String>,
        limits: crate::store::QueueLimits,
    ) -> Self {
        self.config.limits.insert(queue.into(), limits);
        self
    }

    /// How often an idle producer looks for due work without a wake-up.
    pub fn poll_interval(mut self, d: Duration) -> Self {
        self.config.settings.poll_interval = d;
        self
    }

    /// Most tasks one claim takes (never more than the free workers).
    pub fn claim_max(mut self, n: usize) -> Self {
        self.config.settings.claim_max = n;
        self
    }

    /// How long shutdown lets running tasks finish before cancelling them.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.config.settings.shutdown_timeout = d;
        self
    }

    /// Cancel running tasks at once on shutdown.
    pub fn force_shutdown(mut self, yes: bool) -> Self {
        self.config.settings.force_shutdown = yes;
        self
    }

    /// How long cancelled executors get to return before their tasks are
    /// released regardless.
    pub fn cancel_grace(mut self, d: Duration) -> Self {
        self.config.settings.cancel_grace = d;
        self
    }

    /// Register a cron schedule at start (replacing one of the same name).
    /// Only the leader fires schedules; see [`crate::cron`].
    pub fn schedule(mut self, spec: crate::cron::ScheduleSpec) -> Self {
        self.config.schedules.retain(|s| s.name != spec.name);
        self.config.schedules.push(spec);
        self
    }

    /// How often the leader looks for due schedules (default 500ms).
    pub fn cron_interval(mut self, d: Duration) -> Self {
        self.config.settings.cron_interval = d;
        self
    }

    /// Largest result an executor may return, as JSON (default 1 MiB). A
    /// larger one fails the task (returning it again would not help).
    pub fn max_result_bytes(mut self, n: usize) -> Self {
        self.config.settings.max_result_bytes = n;
        self
    }

    pub fn sentinel(mut self, config: SentinelConfig) -> Self {
        self.config.sentinel = config;
        self
    }

    pub fn retention(mut self, retention: Retention) -> Self {
        self.config.sentinel.retention = retention;
        self
    }

    /// Be told about every attempt (e.g. to export metrics).
    pub fn observer(mut self, observer: Arc<dyn PoolObserver>) -> Self {
        self.observer = Some(observer);
        self
    }

    /// Every setting of `settings` at once (a config file's `pool:` section).
    pub fn settings(mut self, settings: PoolSettings) -> Self {
        self.config.settings = settings;
        self
    }

    /// Check the settings (the same checks `config check` makes, with the
    /// same field names) and build the pool.
    /// Registered kinds whose default queue this pool does not serve, with
    /// that queue.
    pub fn unserved_kinds(&self) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = self
            .registry
            .kinds()
            .filter_map(|k| {
                let q = self.registry.defaults(k)?.queue.clone()?;
                let served = self.config.queues.iter().any(|(name, _)| *name == q)
                    || (self.config.queues.is_empty() && q == crate::task::DEFAULT_QUEUE);
                (!served).then(|| (k.to_string(), q))
            })
            .collect();
        out.sort();
        out
    }

    pub fn build(mut self) -> Result<WorkerPool, BuildError> {
        let err = |(field, message): (String, String)| BuildError { field, message };
        if self.config.node.trim().is_empty() {
            return Err(err(("node.name".into(), "must not be empty".into())));
        }
        if self.config.queues.is_empty() {
            self.config
                .queues
                .push((crate::task::DEFAULT_QUEUE.to_string(), 10));
        }
        for (q, n) in &self.config.queues {
            let limits = self.config.limits.get(q).copied().unwrap_or_default();
            validate_queue(q, *n, &limits).map_err(err)?;
        }
        for (q, l) in &self.config.limits {
            validate_queue(q, 1, l).map_err(err)?;
        }
        self.config.settings.validate().map_err(err)?;
        self.config.sentinel.validate().map_err(err)?;
        for (i, spec) in self.config.schedules.iter().enumerate() {
            spec.parse(&format!("schedules[{i}]."))
                .map_err(|e| err((e.field, e.message)))?;
        }
        for (kind, queue) in self.unserved_kinds() {
            // Another node may serve it; said once at build, not an error.
            tracing::warn!(
                kind,
                queue,
                "this pool has no workers for the default queue of a kind it registers;                  its tasks wait for a node that serves that queue"
            );
        }
        Ok(WorkerPool::new(
            self.store,
            Arc::new(self.registry),
            self.config,
            self.observer,
        ))
    }
}
