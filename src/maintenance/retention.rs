//! Retention: the leader deletes finished tasks once they are older than
//! their state's retention, a bounded batch at a time.

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use crate::duration::{opt_text as opt_serde, text as dur_serde};
use crate::store::{PruneParams, Store, StoreError};

/// How long finished tasks are kept before the leader prunes them (`None`: forever).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retention {
    #[serde(with = "opt_serde")]
    pub completed: Option<Duration>,
    #[serde(with = "opt_serde")]
    pub failed: Option<Duration>,
    #[serde(with = "opt_serde")]
    pub cancelled: Option<Duration>,
    /// Audit entries of operator actions.
    #[serde(with = "opt_serde")]
    pub audit: Option<Duration>,
    /// How often the leader prunes.
    #[serde(with = "dur_serde")]
    pub interval: Duration,
}

impl Default for Retention {
    fn default() -> Self {
        let week = Some(Duration::from_secs(7 * 24 * 3600));
        Retention {
            completed: week,
            failed: week,
            cancelled: week,
            audit: Some(Duration::from_secs(90 * 24 * 3600)),
            interval: Duration::from_secs(60),
        }
    }
}

/// Most tasks one prune deletes per state, so it never holds the store long.
pub const PRUNE_BATCH: usize = 10_000;

/// Delete what `retention` no longer keeps at `now`; returns how many went.
pub async fn prune(
    store: &dyn Store,
    retention: &Retention,
    now: DateTime<Utc>,
) -> Result<u64, StoreError> {
    let before =
        |d: Option<Duration>| d.map(|d| now - chrono::Duration::from_std(d).unwrap_or_default());
    store
        .task_prune(PruneParams {
            completed_before: before(retention.completed),
            failed_before: before(retention.failed),
            cancelled_before: before(retention.cancelled),
            audit_before: before(retention.audit),
            limit: PRUNE_BATCH,
        })
        .await
}
