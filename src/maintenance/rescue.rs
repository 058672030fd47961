//! Rescue: the running tasks of a node that stopped heartbeating go back to
//! `retryable` (or end, when out of attempts or cancelled), so another node
//! runs them. The leader rescues (see the Sentinel); the store's single
//! conditional update makes two racing rescuers rescue a task once.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::store::{RescueParams, Rescued, Store, StoreError};
use crate::task::TaskId;

/// Rescue the running tasks of every node silent for longer than `node_timeout`.
pub async fn rescue_dead(
    store: &dyn Store,
    node_timeout: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<Rescued>, StoreError> {
    store
        .node_rescue(RescueParams {
            now,
            node_timeout,
            ..RescueParams::default()
        })
        .await
}

/// Rescue what runs under `node` in the store but not in this process:
/// everything, at start (an earlier process of the same name left it), or,
/// later, the tasks it does not `keep` that started before `started_before`
/// (a claim whose answer was lost with its connection).
pub async fn rescue_own(
    store: &dyn Store,
    node: &str,
    keep: Vec<TaskId>,
    started_before: Option<DateTime<Utc>>,
    node_timeout: Duration,
    now: DateTime<Utc>,
) -> Result<Vec<Rescued>, StoreError> {
    store
        .node_rescue(RescueParams {
            now,
            node_timeout,
            node: Some(node.to_string()),
            keep,
            started_before,
        })
        .await
}
