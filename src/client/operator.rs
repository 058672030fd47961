//! The operator's side of the [`Client`]: queues with their counts, pause
//! and resume, nodes, schedules, the audit trail, readiness. The HTTP layer
//! only translates these to JSON.

use std::collections::{BTreeMap, BTreeSet};

use chrono::Utc;
use serde::Serialize;

use super::{Client, ClientError, invalid};
use crate::cron::{ScheduleSpec, ScheduleView};
use crate::store::{NodeInfo, QueueSettings, ScheduleRow, StoreError, count_cap};
use crate::task::TaskState;

/// A queue as the operator sees it: counts by state (each stopped at
/// [`count_cap`]; `capped` names the states that reached it, i.e. "at
/// least"), and whether it is paused.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct QueueInfo {
    pub name: String,
    pub paused: bool,
    /// Every state, zero included.
    pub counts: BTreeMap<TaskState, i64>,
    pub capped: Vec<TaskState>,
    /// How long the oldest task that is due has waited to start, in
    /// seconds (0 when none waits): what an autoscaler scales on.
    pub lag_seconds: f64,
    /// The settings shared by the cluster, set at run time (`max_depth`,
    /// `workers`, `global_concurrency`, `per_key_concurrency`,
    /// `rate_limit`, `fairness`; `null`: none). A queue whose limits were
    /// never stored runs on each node's configured ones.
    #[serde(flatten)]
    pub settings: QueueSettings,
}

/// The most `workers` a run-time setting may give every node (a node's
/// config may give its own queue up to
/// [`MAX_QUEUE_WORKERS`](crate::pool::settings::MAX_QUEUE_WORKERS)): each
/// worker is a task on every node serving the queue.
pub const MAX_SHARED_WORKERS: u32 = 10_000;

/// The longest rate-limit window (a day, in ms).
pub const MAX_RATE_PER_MS: u64 = 24 * 3600 * 1000;

/// The largest `max_depth` a queue may have (PostgreSQL stores it as `integer`).
pub const MAX_DEPTH_LIMIT: u32 = i32::MAX as u32;

/// The operator's side of the front door: queues, nodes, schedules.
impl Client {
    /// Every queue anyone knows of: named in `also` (e.g. the queues this
    /// node serves), served by a registered node, paused, with settings, or
    /// holding tasks.
    pub async fn queues(
        &self,
        also: impl IntoIterator<Item = String>,
    ) -> Result<Vec<QueueInfo>, ClientError> {
        let mut counts: BTreeMap<String, BTreeMap<TaskState, i64>> =
            also.into_iter().map(|q| (q, BTreeMap::new())).collect();
        for n in self.store.node_list(Utc::now()).await? {
            for q in n.queues {
                counts.entry(q).or_default();
            }
        }
        for (q, st, n) in self.store.queue_counts().await? {
            counts.entry(q).or_default().insert(st, n);
        }
        let paused: BTreeSet<String> = self.store.queue_paused().await?.into_iter().collect();
        let settings = self.queue_settings().await?;
        for q in paused.iter().chain(settings.keys()) {
            counts.entry(q.clone()).or_default();
        }
        let lag: BTreeMap<String, f64> = self.queue_lag().await?.into_iter().collect();
        Ok(counts
            .into_iter()
            .map(|(name, found)| {
                let counts: BTreeMap<TaskState, i64> = TaskState::ALL
                    .iter()
                    .map(|s| (*s, found.get(s).copied().unwrap_or(0)))
                    .collect();
                QueueInfo {
                    paused: paused.contains(&name),
                    settings: settings.get(&name).copied().unwrap_or_default(),
                    lag_seconds: lag.get(&name).copied().unwrap_or(0.0),
                    capped: TaskState::ALL
                        .into_iter()
                        .filter(|s| counts[s] >= count_cap(*s))
                        .collect(),
                    counts,
                    name,
                }
            })
            .collect())
    }

    /// Every queue's settings (queues without any are absent).
    pub async fn queue_settings(&self) -> Result<BTreeMap<String, QueueSettings>, ClientError> {
        Ok(self.store.queue_settings().await?.into_iter().collect())
    }

    /// Replace a queue's settings for the whole cluster. A new `max_depth`
    /// applies to this process's next enqueue, and to other processes'
    /// within a second (PostgreSQL) or at once (SQLite).
    ///
    /// The limits written here replace every node's configured ones for
    /// the queue, also when they are all `None` (no limits): the stored
    /// `fairness` is then `none` rather than absent, which marks them as set.
    pub async fn queue_set_settings(
        &self,
        queue: &str,
        mut settings: QueueSettings,
    ) -> Result<(), ClientError> {
        settings
            .fairness
            .get_or_insert(crate::store::Fairness::None);
        super::check_name(queue).map_err(|m| invalid("queue", m))?;
        if queue.trim().is_empty() {
            return Err(invalid("queue", "must not be empty"));
        }
        match settings.max_depth {
            Some(0) => {
                return Err(invalid(
                    "max_depth",
                    "must be at least 1 (pause the queue to stop it)",
                ));
            }
            Some(n) if n > MAX_DEPTH_LIMIT => {
                return Err(invalid(
                    "max_depth",
                    format!("{n} is more than {MAX_DEPTH_LIMIT}"),
                ));
            }
            _ => {}
        }
        // Counts are stored and compared as PostgreSQL integers.
        let at_least_one = |field: &str, v: Option<u32>| match v {
            Some(0) => Err(invalid(
                field,
                "must be at least 1 (null removes the limit)",
            )),
            Some(n) if n > MAX_DEPTH_LIMIT => Err(invalid(
                field,
                format!("{n} is more than {MAX_DEPTH_LIMIT}"),
            )),
            _ => Ok(()),
        };
        at_least_one("global_concurrency", settings.global_concurrency)?;
        at_least_one("per_key_concurrency", settings.per_key_concurrency)?;
        at_least_one("workers", settings.workers)?;
        let max_workers = MAX_SHARED_WORKERS;
        if let Some(w) = settings.workers
            && w > max_workers
        {
            return Err(invalid(
                "workers",
                format!("{w} is more than {max_workers}"),
            ));
        }
        if let Some(r) = settings.rate_limit {
            at_least_one("rate_limit.max", Some(r.max))?;
            if r.per_ms == 0 || r.per_ms > MAX_RATE_PER_MS {
                return Err(invalid(
                    "rate_limit.per_ms",
                    format!("{} is out of range 1..={MAX_RATE_PER_MS}", r.per_ms),
                ));
            }
        }
        Ok(self
            .store
            .queue_settings_put(queue, settings, false)
            .await?)
    }

    /// Counts of tasks by queue and state, each stopped at [`count_cap`].
    pub async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, ClientError> {
        Ok(self.store.queue_counts().await?)
    }

    /// Per queue with a task due now: how long the oldest due task has
    /// waited to start, in seconds.
    pub async fn queue_lag(&self) -> Result<Vec<(String, f64)>, ClientError> {
        let now = Utc::now();
        Ok(self
            .store
            .queue_oldest_due(now)
            .await?
            .into_iter()
            .map(|(q, at)| {
                let waited = (now - at).num_microseconds().unwrap_or(i64::MAX);
                (q, waited.max(0) as f64 / 1e6)
            })
            .collect())
    }

    /// Pause (no node claims its tasks) or resume a queue.
    pub async fn queue_set_paused(&self, queue: &str, paused: bool) -> Result<(), ClientError> {
        Ok(self.store.queue_set_paused(queue, paused).await?)
    }

    /// The nodes of the cluster; `leader` marks the one holding the lease now.
    pub async fn nodes(&self) -> Result<Vec<NodeInfo>, ClientError> {
        Ok(self.store.node_list(Utc::now()).await?)
    }

    /// The schedules with their next run.
    pub async fn schedules(&self) -> Result<Vec<ScheduleView>, ClientError> {
        let rows = self.store.schedule_list().await?;
        Ok(rows.iter().map(ScheduleView::from_row).collect())
    }

    /// Add a schedule from the API, or replace the one of the same name.
    /// The spec and the task it enqueues are checked as an enqueue would be.
    pub async fn schedule_put(&self, spec: ScheduleSpec) -> Result<ScheduleView, ClientError> {
        let schedule = spec.parse("").map_err(|e| invalid(e.field, e.message))?;
        self.check(schedule.task(Utc::now()))?;
        let row = ScheduleRow {
            name: spec.name.clone(),
            spec: serde_json::to_value(&spec).map_err(|e| invalid("body", e.to_string()))?,
            source: "api".into(),
            last_tick: Utc::now(),
            paused: false,
        };
        self.store.schedule_upsert(row).await?;
        self.schedules()
            .await?
            .into_iter()
            .find(|v| v.spec["name"] == spec.name.as_str())
            .ok_or_else(|| ClientError::Store(StoreError::unavailable("schedule vanished")))
    }

    /// Remove a schedule; false when there was none of that name.
    pub async fn schedule_delete(&self, name: &str) -> Result<bool, ClientError> {
        Ok(self.store.schedule_delete(name).await?)
    }

    fn no_schedule(name: &str) -> ClientError {
        ClientError::NotFound(format!("no schedule {name:?}"))
    }

    /// Pause a schedule (its ticks pass without enqueuing) or resume it
    /// (from its next tick; the ones missed while paused are not enqueued).
    /// Every node sees it at once: the leader reads the flag at each tick.
    pub async fn schedule_set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<ScheduleView, ClientError> {
        if !self.store.schedule_set_paused(name, paused).await? {
            return Err(Self::no_schedule(name));
        }
        self.schedules()
            .await?
            .into_iter()
            .find(|v| v.spec["name"] == name)
            .ok_or_else(|| Self::no_schedule(name))
    }

    /// Enqueue a schedule's task now, once, outside its ticks (paused or
    /// not). With `overlap: skip` and its last task unfinished, that task
    /// is returned (`existing`) and nothing is enqueued.
    pub async fn schedule_trigger(
        &self,
        name: &str,
    ) -> Result<crate::store::Inserted, ClientError> {
        let row = self
            .store
            .schedule_list()
            .await?
            .into_iter()
            .find(|r| r.name == name)
            .ok_or_else(|| Self::no_schedule(name))?;
        let schedule = serde_json::from_value::<ScheduleSpec>(row.spec)
            .map_err(|e| invalid("spec", e.to_string()))?
            .parse("")
            .map_err(|e| invalid(e.field, e.message))?;
        self.insert(schedule.triggered_task(Utc::now())).await
    }

    /// Record an operator action in the audit trail.
    pub async fn audit_append(&self, entry: crate::store::AuditEntry) -> Result<(), ClientError> {
        Ok(self.store.audit_append(entry).await?)
    }

    /// The audit trail, newest first, ids below `before`.
    pub async fn audit(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<crate::store::AuditEntry>, ClientError> {
        Ok(self.store.audit_list(before, limit).await?)
    }

    /// Does the store answer? (What `/readyz` reports.)
    pub async fn ping(&self) -> Result<(), ClientError> {
        Ok(self.store.ready().await?)
    }
}
