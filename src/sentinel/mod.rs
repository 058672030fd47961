//! The Sentinel keeps one node and its cluster healthy.
//!
//! # Overview
//!
//! Every node runs one Sentinel. It:
//!
//! - replaces worker slots whose executor panicked, and slots that hang
//!   past their task's timeout (an executor that blocks its thread and never
//!   yields), so the pool keeps its full worker count;
//! - heartbeats the node every `heartbeat_interval`, on a task of its own
//!   (`lease.rs`), and holds its name against a second process;
//! - when it leads, rescues the running tasks of nodes whose heartbeat is
//!   older than `node_timeout` (they go back to `retryable`, the attempt
//!   counted);
//! - fences itself: when its last confirmed heartbeat was sent so long ago
//!   that other nodes may soon rescue its tasks, it stops claiming and stops
//!   its running tasks, two heartbeat intervals before anyone may re-run
//!   them;
//! - passes on cancel requests to the tasks running here;
//! - competes for leadership; the leader alone rescues and prunes.
//!
//! # State model
//!
//! A node is *live* while its heartbeat is newer than `node_timeout`. Rescue
//! changes only tasks that are `running` on a node that is not live, in one
//! conditional statement that skips rows another transaction holds, so two
//! Sentinels racing to rescue the same task (a leader and its successor, a
//! moment apart) rescue it once. Rescued tasks keep their attempt number; the stale node's
//! late outcome carries the old claim token and is refused by the store's
//! fencing.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::Utc;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use serde::{Deserialize, Serialize};

use crate::duration::text as dur_serde;
use crate::maintenance::{Retention, rescue, retention};
use crate::pool::shared::{Counters, StopReason, WorkerPoolSharedData};
use crate::pool::worker::{SlotCtx, run_slot};
use crate::store::{Completion, Outcome, Rescued, Store, StoreEvent};

pub(crate) mod lease;

/// Timings of the Sentinel. In a config file this is the `sentinel:`
/// section; `retention` is its own top-level section.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelConfig {
    #[serde(with = "dur_serde")]
    pub heartbeat_interval: Duration,
    /// A node silent for longer than this is dead; also this node's own lease.
    #[serde(with = "dur_serde")]
    pub node_timeout: Duration,
    /// How often worker slots are checked.
    #[serde(with = "dur_serde")]
    pub check_interval: Duration,
    /// How far past its deadline a busy slot may go before it counts as hung.
    #[serde(with = "dur_serde")]
    pub hung_grace: Duration,
    #[serde(skip)]
    pub retention: Retention,
}

impl SentinelConfig {
    /// Check what types alone cannot; `Err((field, message))`.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let e = |f: &str, m: &str| Err((format!("sentinel.{f}"), m.to_string()));
        if self.heartbeat_interval.is_zero() {
            return e("heartbeat_interval", "must be more than 0");
        }
        if self.check_interval.is_zero() {
            return e("check_interval", "must be more than 0");
        }
        if self.node_timeout <= self.heartbeat_interval {
            return e(
                "node_timeout",
                "must be longer than sentinel.heartbeat_interval (a node would be declared dead between two heartbeats)",
            );
        }
        if self.retention.interval.is_zero() {
            return Err(("retention.interval".into(), "must be more than 0".into()));
        }
        Ok(())
    }
}

impl Default for SentinelConfig {
    fn default() -> Self {
        SentinelConfig {
            heartbeat_interval: Duration::from_secs(2),
            node_timeout: Duration::from_secs(15),
            check_interval: Duration::from_millis(500),
            hung_grace: Duration::from_secs(2),
            retention: Retention::default(),
        }
    }
}

pub(crate) struct Slot {
    pub ctx: SlotCtx,
    pub handle: JoinHandle<()>,
}

/// See the module docs.
pub struct Sentinel {
    pub(crate) store: Arc<dyn Store>,
    pub(crate) shared: Arc<WorkerPoolSharedData>,
    pub(crate) config: SentinelConfig,
    pub(crate) slots: Vec<Slot>,
    /// Slots the settings watcher added (a queue's `workers` raised).
    pub(crate) new_slots: tokio::sync::mpsc::UnboundedReceiver<Slot>,
    pub(crate) queues: Vec<String>,
    /// The config (or code) schedules this node declares (see `NodeInfo::schedules`).
    pub(crate) schedules: Vec<String>,
    /// The kinds this node runs, with their defaults (see `NodeInfo::kinds`).
    pub(crate) kinds: std::collections::BTreeMap<String, crate::store::DeclaredKind>,
    pub(crate) version: String,
}

impl std::fmt::Debug for Sentinel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sentinel")
            .field("node", &self.shared.node)
            .field("config", &self.config)
            .field("slots", &self.slots.len())
            .finish()
    }
}

impl Sentinel {
    fn heartbeat(&self) -> lease::Heartbeat {
        lease::Heartbeat {
            store: self.store.clone(),
            shared: self.shared.clone(),
            config: self.config.clone(),
            version: self.version.clone(),
            queues: self.queues.clone(),
            schedules: self.schedules.clone(),
            kinds: self.kinds.clone(),
        }
    }

    /// Take the node's name (refused while another live process holds it)
    /// and rescue what an earlier process of the same name left running.
    /// Called before the first claim.
    pub(crate) async fn start(&self) -> Result<(), crate::store::StoreError> {
        self.heartbeat().register().await?;
        let rescued = rescue::rescue_own(
            &*self.store,
            &self.shared.node,
            Vec::new(),
            None,
            self.config.node_timeout,
            Utc::now(),
        )
        .await?;
        if !rescued.is_empty() {
            self.count_rescued(&rescued);
            tracing::info!(
                count = rescued.len(),
                "rescued tasks left running by an earlier process of this node"
            );
        }
        Ok(())
    }

    /// Run until `stop` fires; returns the worker slots so the pool can wind them down.
    pub(crate) async fn run(mut self, stop: CancellationToken) -> Vec<Slot> {
        let mut events = self.store.subscribe();
        // The heartbeat runs on its own: nothing here (a slow rescue or
        // prune) can delay it. See lease.rs.
        let beating = tokio::spawn(self.heartbeat().run(stop.clone()));
        let watching = tokio::spawn(lease::watch(
            self.shared.clone(),
            self.config.clone(),
            stop.clone(),
        ));
        let mut upkeep = tokio::time::interval(self.config.heartbeat_interval);
        upkeep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut check = tokio::time::interval(self.config.check_interval);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_prune: Option<Instant> = None;
        let mut last_reconcile = Instant::now();
        // Every other store call is cut off after node_timeout, so a hung
        // connection cannot stop the Sentinel from checking its lease.
        let limit = self.config.node_timeout;
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = upkeep.tick() => {
                    // The election first, since only the leader rescues and
                    // prunes; the cancel poll at the same time (on PostgreSQL,
                    // separate pooled connections).
                    let all = async {
                        tokio::join!(
                            async {
                                self.elect().await;
                                tokio::join!(self.rescue(), self.prune(&mut last_prune));
                            },
                            self.poll_cancels(),
                        );
                        self.reconcile(&mut last_reconcile).await;
                    };
                    if tokio::time::timeout(limit, all).await.is_err() {
                        tracing::warn!("the Sentinel's store calls got no answer within node_timeout");
                    }
                }
                _ = check.tick() => self.check_slots(),
                Some(slot) = self.new_slots.recv() => self.slots.push(slot),
                ev = events.recv() => match ev {
                    Ok(StoreEvent::CancelRequested { id, node }) => {
                        if node.as_deref() == Some(self.shared.node.as_str()) {
                            self.shared.stop_task(id, None, StopReason::Cancelled);
                        }
                    }
                    Ok(_) => {}
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => self.poll_cancels().await,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => {
                        events = self.store.subscribe();
                    }
                },
            }
        }
        beating.abort();
        watching.abort();
        if self.shared.is_leader() {
            let _ = tokio::time::timeout(limit, self.store.leader_resign(&self.shared.node)).await;
            self.shared.leader.set(false);
        }
        lease::instance_ended(&self.shared.instance);
        self.slots
    }

    fn count_rescued(&self, r: &[Rescued]) {
        Counters::add(&self.shared.counters.rescued, r.len() as u64);
        if let Some(o) = &self.shared.observer {
            o.tasks_rescued(r.len() as u64);
        }
    }

    /// Rescue the tasks of dead nodes: the leader's job alone. When every
    /// node did it, every heartbeat, a hundred nodes each scanned all the
    /// running tasks of the cluster every two seconds and queued on the
    /// same rows, holding pooled connections their heartbeats then waited
    /// for (until healthy nodes were taken for dead). A dead leader is
    /// replaced within `node_timeout`, when its tasks fall due for rescue.
    async fn rescue(&self) {
        if !self.shared.is_leader() || !lease::may_rescue(&self.shared, &self.config) {
            return;
        }
        match rescue::rescue_dead(&*self.store, self.config.node_timeout, Utc::now()).await {
            Ok(r) if !r.is_empty() => {
                self.count_rescued(&r);
                for t in &r {
                    tracing::warn!(task = %t.id, node = ?t.node, state = %t.state, "rescued task of a dead node");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "rescue failed"),
        }
    }

    /// Put back tasks the store says run here but this node holds no record
    /// of (a claim whose answer was lost with its connection). Tasks this node
    /// holds, and recent claims still on their way to a slot, are left alone.
    async fn reconcile(&self, last: &mut Instant) {
        if last.elapsed() < self.config.node_timeout || self.shared.fenced.load(Ordering::Acquire) {
            return;
        }
        *last = Instant::now();
        let keep: Vec<_> = self
            .shared
            .running
            .lock()
            .map(|m| m.keys().copied().collect())
            .unwrap_or_default();
        let now = Utc::now();
        let started_before =
            now - chrono::Duration::from_std(self.config.node_timeout).unwrap_or_default();
        let node = &self.shared.node;
        let timeout = self.config.node_timeout;
        match rescue::rescue_own(&*self.store, node, keep, Some(started_before), timeout, now).await
        {
            Ok(r) if !r.is_empty() => {
                Counters::add(&self.shared.counters.rescued, r.len() as u64);
                tracing::warn!(
                    count = r.len(),
                    "put back tasks marked running here that this node did not hold"
                );
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "reconcile failed"),
        }
    }

    async fn elect(&self) {
        let leader = match self
            .store
            .leader_try_elect(&self.shared.node, self.config.node_timeout, Utc::now())
            .await
        {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "leader election failed");
                false
            }
        };
        if self.shared.leader.set(leader) != leader {
            tracing::info!(leader, "leadership changed");
        }
    }

    async fn prune(&self, last_prune: &mut Option<Instant>) {
        let r = &self.config.retention;
        if !self.shared.is_leader() || last_prune.is_some_and(|t| t.elapsed() < r.interval) {
            return;
        }
        *last_prune = Some(Instant::now());
        match retention::prune(&*self.store, r, Utc::now()).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(pruned = n, "pruned finished tasks past retention"),
            Err(e) => tracing::warn!(error = %e, "pruning failed"),
        }
    }

    async fn poll_cancels(&self) {
        if self.shared.running_count() == 0 {
            return;
        }
        match self.store.task_cancel_requested(&self.shared.node).await {
            Ok(ids) => {
                for (id, token) in ids {
                    self.shared
                        .stop_task(id, Some(token), StopReason::Cancelled);
                }
            }
            Err(e) => tracing::warn!(error = %e, "reading cancel requests failed"),
        }
    }

    /// Replace slots that ended after a panic, and slots hung past their deadline.
    fn check_slots(&mut self) {
        if self.shared.stop_claiming.is_cancelled() {
            return;
        }
        let now = Instant::now();
        for slot in &mut self.slots {
            let Some(status) = self.shared.slot(slot.ctx.id) else {
                continue;
            };
            if slot.handle.is_finished() {
                let panicked = status
                    .lock()
                    .map(|mut s| std::mem::take(&mut s.panicked))
                    .unwrap_or(false);
                if panicked || !slot.ctx.jobs.is_closed() {
                    tracing::info!(slot = slot.ctx.id, "replacing a worker that stopped");
                    slot.handle = tokio::spawn(run_slot(slot.ctx.clone()));
                }
                continue;
            }
            let hung = status.lock().ok().and_then(|mut s| {
                let busy = s.busy.as_ref()?;
                // Read afresh each check: an attempt that extends moves it.
                let deadline = busy.deadline.as_ref()?.at();
                if now < deadline + self.config.hung_grace {
                    return None;
                }
                let info = busy.clone();
                s.busy = None;
                Some((info, s.permit.take()))
            });
            let Some((info, permit)) = hung else { continue };
            slot.handle.abort();
            // The hung slot can no longer return its capacity; do it here.
            drop(permit);
            // The entry stays in `running` until the completer writes the
            // outcome below (see reconcile).
            self.shared
                .stop_task(info.task, Some(info.claim_token), StopReason::Timeout);
            let error = format!(
                "executor did not stop within {}ms after its timeout; worker replaced",
                self.config.hung_grace.as_millis()
            );
            let outcome = if info.attempt >= info.max_attempts {
                Outcome::Failed { error }
            } else {
                let delay = slot
                    .ctx
                    .registry
                    .retry_policy(&info.kind)
                    .backoff(info.attempt);
                Outcome::Retry {
                    run_at: crate::store::lifecycle::after(Utc::now(), delay),
                    error,
                }
            };
            let _ = slot.ctx.completions.send(Completion {
                id: info.task,
                attempt: info.attempt,
                token: info.claim_token,
                at: Utc::now(),
                outcome,
            });
            Counters::add(&self.shared.counters.hung_replaced, 1);
            Counters::add(&self.shared.counters.timeouts, 1);
            tracing::warn!(slot = slot.ctx.id, task = %info.task, "worker hung past its task's timeout; replacing it");
            slot.handle = tokio::spawn(run_slot(slot.ctx.clone()));
        }
    }
}
