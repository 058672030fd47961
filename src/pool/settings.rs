//! The settings of a pool, as the library and the config file's `pool:`
//! and `queues:` sections share them: one default, one check.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::duration::text as dur_serde;
use crate::store::QueueLimits;

/// How a pool claims, runs and stops (the config file's `pool:` section).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolSettings {
    /// How often an idle producer looks for due work without a wake-up.
    #[serde(with = "dur_serde")]
    pub poll_interval: Duration,
    /// Most tasks one claim takes (never more than the free workers).
    pub claim_max: usize,
    /// How long shutdown lets running tasks finish before cancelling them.
    #[serde(with = "dur_serde")]
    pub shutdown_timeout: Duration,
    /// Cancel running tasks at once on shutdown.
    pub force_shutdown: bool,
    /// How long cancelled executors get to return before their tasks are
    /// released regardless.
    #[serde(with = "dur_serde")]
    pub cancel_grace: Duration,
    /// How often the leader looks for due schedules.
    #[serde(with = "dur_serde")]
    pub cron_interval: Duration,
    /// Largest task result kept, as JSON; a larger one fails the task.
    pub max_result_bytes: usize,
}

impl Default for PoolSettings {
    fn default() -> Self {
        PoolSettings {
            poll_interval: Duration::from_secs(1),
            claim_max: 100,
            shutdown_timeout: Duration::from_secs(30),
            force_shutdown: false,
            cancel_grace: Duration::from_secs(2),
            cron_interval: Duration::from_millis(500),
            max_result_bytes: 1 << 20,
        }
    }
}

impl PoolSettings {
    /// Check what types alone cannot; `Err((field, message))` with the
    /// field as the config file names it.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((format!("pool.{f}"), m.to_string()));
        if self.claim_max == 0 {
            return e("claim_max", "must be at least 1");
        }
        if self.poll_interval.is_zero() {
            return e("poll_interval", "must be more than 0");
        }
        if self.cron_interval.is_zero() {
            return e("cron_interval", "must be more than 0");
        }
        Ok(())
    }
}

/// Most workers one queue may have on one node.
pub const MAX_QUEUE_WORKERS: usize = 100_000;

/// Check one queue's name, worker count and limits; fields are named as in
/// the config file (`queues.NAME.workers`).
pub fn validate_queue(
    name: &str,
    workers: usize,
    limits: &QueueLimits,
) -> Result<(), (String, String)> {
    if name.trim().is_empty() {
        return Err(("queues".into(), "a queue name must not be empty".into()));
    }
    let field = |f: &str| format!("queues.{name}.{f}");
    if workers == 0 {
        return Err((field("workers"), "must be at least 1".into()));
    }
    if workers > MAX_QUEUE_WORKERS {
        return Err((
            field("workers"),
            format!("must be at most {MAX_QUEUE_WORKERS}"),
        ));
    }
    if limits.global_concurrency == Some(0) {
        return Err((field("global_concurrency"), "must be at least 1".into()));
    }
    if limits.per_key_concurrency == Some(0) {
        return Err((field("per_key_concurrency"), "must be at least 1".into()));
    }
    if let Some((max, per)) = limits.rate {
        if max == 0 {
            return Err((field("rate_limit.max"), "must be at least 1".into()));
        }
        if per.is_zero() {
            return Err((field("rate_limit.per"), "must be more than 0".into()));
        }
    }
    Ok(())
}
