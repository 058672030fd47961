//! The leader's service that fires due cron schedules (see [`crate::cron`]
//! for what a schedule is and why a tick is enqueued once cluster-wide).

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use crate::client::Client;
use crate::cron::ScheduleSpec;
use crate::store::{ScheduleFire, Store};

/// The `source` of schedules declared in a node's config or in code
/// (`Builder::schedule`), as opposed to `api`.
pub(crate) const CONFIG: &str = "config";

/// The leader-only service that fires due schedules, and removes config
/// schedules that no registered node declares any more.
pub(crate) struct CronFirer {
    pub store: Arc<dyn Store>,
    pub client: Client,
    pub leadership: Leadership,
    /// Fires when the node stops.
    pub stop: CancellationToken,
    pub interval: Duration,
}

impl CronFirer {
    pub(crate) async fn run(self) {
        let stop = self.stop.clone();
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.leadership.is_leader() {
                continue;
            }
            if let Err(e) = self.fire_due().await {
                tracing::warn!(error = %e, "firing schedules failed");
            }
        }
    }

    /// The config schedules some registered node declares; `None` when a
    /// node does not say (an older version), so nothing is removed.
    ///
    /// Every registered node counts, live or not: a node that stopped
    /// cleanly has removed its row, so its declarations go with it, while a
    /// node that is only slow or partitioned keeps its schedules (it would
    /// not put them back until it restarts). A crashed node that never comes
    /// back keeps its schedules until its row is removed.
    async fn declared(&self) -> Result<Option<HashSet<String>>, crate::store::StoreError> {
        let mut all = HashSet::new();
        for n in self.store.node_list(Utc::now()).await? {
            match n.schedules {
                Some(names) => all.extend(names),
                None => return Ok(None),
            }
        }
        Ok(Some(all))
    }

    async fn fire_due(&self) -> Result<(), crate::store::StoreError> {
        let now = Utc::now();
        let rows = self.store.schedule_list().await?;
        let declared = if rows.iter().any(|r| r.source == CONFIG) {
            self.declared().await?
        } else {
            None
        };
        for row in rows {
            if row.source == CONFIG
                && let Some(d) = &declared
                && !d.contains(&row.name)
            {
                // Declared in a config or in code that no node runs any more.
                if self.store.schedule_delete(&row.name).await? {
                    tracing::info!(schedule = %row.name, "removed a config schedule that no node declares any more");
                }
                continue;
            }
            let schedule = match serde_json::from_value::<ScheduleSpec>(row.spec.clone())
                .map_err(|e| e.to_string())
                .and_then(|s| s.parse("").map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::warn!(schedule = %row.name, error = %e, "skipping a schedule that does not parse");
                    continue;
                }
            };
            let (ticks, newest) = schedule.due(
                row.last_tick,
                now,
                self.interval * 2 + Duration::from_secs(1),
            );
            let Some(newest) = newest else { continue };
            // Paused: the ticks pass (last_tick moves) and nothing is enqueued.
            let tasks = if row.paused {
                Vec::new()
            } else {
                ticks.iter().map(|t| schedule.task(*t)).collect()
            };
            let rows = match self.client.prepare(tasks) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(schedule = %row.name, error = %e, "schedule's task is invalid");
                    Vec::new()
                }
            };
            let fire = |tasks| ScheduleFire {
                name: row.name.clone(),
                expected: row.last_tick,
                new_last: newest,
                tasks,
                now,
            };
            let fired = match self.store.schedule_fire(fire(rows)).await {
                // A full queue refuses the tick: it passes (last_tick moves)
                // rather than being tried again every interval.
                Err(crate::store::StoreError::QueueFull { queue, max_depth }) => {
                    tracing::warn!(schedule = %row.name, %queue, max_depth, "the schedule's queue is full (max_depth): tick skipped");
                    self.store
                        .schedule_fire(fire(Vec::new()))
                        .await?
                        .map(|_| Vec::new())
                }
                r => r?,
            };
            match fired {
                Some(_) if row.paused => {
                    tracing::debug!(schedule = %row.name, ticks = ticks.len(), "paused: ticks passed");
                }
                Some(inserted) => {
                    let new = inserted.iter().filter(|i| !i.existing).count();
                    tracing::info!(schedule = %row.name, ticks = ticks.len(), enqueued = new, "schedule fired");
                }
                None => tracing::debug!(schedule = %row.name, "another node fired this tick"),
            }
        }
        Ok(())
    }
}
