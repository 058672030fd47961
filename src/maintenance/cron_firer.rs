//! The leader's service that fires due cron schedules (see [`crate::cron`]
//! for what a schedule is and why a tick is enqueued once cluster-wide).

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Leadership;
use crate::client::Client;
use crate::cron::ScheduleSpec;
use crate::store::{ScheduleFire, Store};

/// The leader-only service that fires due schedules.
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

    async fn fire_due(&self) -> Result<(), crate::store::StoreError> {
        let now = Utc::now();
        for row in self.store.schedule_list().await? {
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
            let tasks = ticks.iter().map(|t| schedule.task(*t)).collect();
            let rows = match self.client.prepare(tasks) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(schedule = %row.name, error = %e, "schedule's task is invalid");
                    Vec::new()
                }
            };
            let fire = ScheduleFire {
                name: row.name.clone(),
                expected: row.last_tick,
                new_last: newest,
                tasks: rows,
                now,
            };
            match self.store.schedule_fire(fire).await? {
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
