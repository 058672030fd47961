//! The node's lease: heartbeats on a task of their own, the lease counted
//! from when each confirmed heartbeat was *sent*, and the node's identity
//! under its name.
//!
//! # Invariants
//!
//! - Other nodes may rescue this node's tasks once its last written
//!   heartbeat is `node_timeout` old. A heartbeat's time is taken before it
//!   is sent, so the lease this node counts from never runs later than the
//!   one others judge by (on PostgreSQL both are in the database's time).
//! - This node fences itself (stops claiming, stops its running tasks) once
//!   its last confirmed heartbeat was sent `node_timeout - 2 x
//!   heartbeat_interval` ago: a margin of two intervals before anyone may
//!   rescue. The check runs every `check_interval` on a task of its own
//!   (`watch`), so no store call that hangs can delay it; each heartbeat
//!   call is also cut off after one interval.
//! - Only the heartbeat task writes `lease_sent`; the Sentinel reads it.
//! - One process holds a node's name at a time: an instance id
//!   (`host/pid/random`) is written with each heartbeat, a start under a
//!   name that a live instance heartbeats is refused, and a heartbeat that
//!   finds another instance holding the name fences this one.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::SentinelConfig;
use crate::pool::shared::{StopReason, WorkerPoolSharedData};
use crate::store::{NodeInfo, Store, StoreError};

/// Instances of pools running in this process (a name held by one of them
/// is held by a live node, even though the pid is ours).
static LIVE_HERE: Mutex<Option<HashSet<String>>> = Mutex::new(None);

fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_else(|| "node".to_string())
}

/// A new instance id: this process's mark (`host/pid/random`, which the
/// programs it starts carry) and a number for each pool of the process.
pub(crate) fn new_instance() -> String {
    static POOLS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let id = format!(
        "{}/{}",
        crate::executors::orphans::process_mark(),
        POOLS.fetch_add(1, Ordering::Relaxed)
    );
    if let Ok(mut live) = LIVE_HERE.lock() {
        live.get_or_insert_with(HashSet::new).insert(id.clone());
    }
    id
}

/// The instance has stopped (its pool shut down).
pub(crate) fn instance_ended(id: &str) {
    if let Ok(mut live) = LIVE_HERE.lock()
        && let Some(l) = live.as_mut()
    {
        l.remove(id);
    }
}

/// Is `instance` provably dead? Only a process of this machine can be
/// checked: one whose pid no longer runs, or whose pid is ours (a previous
/// life of this process, as after a container restart) but that is not one
/// of this process's live pools. Any other is taken as alive.
fn known_dead(instance: &str) -> bool {
    let mut parts = instance.split('/');
    let (Some(host), Some(pid)) = (parts.next(), parts.next()) else {
        return false;
    };
    if host != host_name() {
        return false;
    }
    let Ok(pid) = pid.parse::<u32>() else {
        return false;
    };
    if pid == std::process::id() {
        let live = LIVE_HERE
            .lock()
            .map(|l| l.as_ref().is_some_and(|l| l.contains(instance)))
            .unwrap_or(true);
        return !live;
    }
    !std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// How long after the last confirmed heartbeat was sent the node still
/// holds its lease (two intervals short of `node_timeout`, at least one).
pub(crate) fn lease(config: &SentinelConfig) -> Duration {
    config
        .node_timeout
        .saturating_sub(config.heartbeat_interval * 2)
        .max(config.heartbeat_interval)
}

/// Check the lease every `check_interval` until `stop`, on a task of its
/// own: nothing the Sentinel waits for (a store call that hangs in a
/// partition) may delay it.
pub(crate) async fn watch(
    shared: Arc<WorkerPoolSharedData>,
    config: SentinelConfig,
    stop: CancellationToken,
) {
    let mut tick = tokio::time::interval(config.check_interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => check_lease(&shared, &config),
        }
    }
}

/// May this node rescue other nodes' tasks? Only once it has held its own
/// lease without a break for `node_timeout`: after an outage every node's
/// heartbeat is stale, and the first node back must not take the others
/// for dead before they had the time to heartbeat again.
pub(crate) fn may_rescue(shared: &WorkerPoolSharedData, config: &SentinelConfig) -> bool {
    shared
        .lease_since
        .lock()
        .ok()
        .and_then(|s| *s)
        .is_some_and(|since| since.elapsed() >= config.node_timeout)
}

/// Fence this node when its lease ran out: stop claiming and stop every
/// running task (whole process groups for `shell`), before others may
/// rescue them.
pub(crate) fn check_lease(shared: &WorkerPoolSharedData, config: &SentinelConfig) {
    let silent = shared
        .lease_sent
        .lock()
        .map(|t| t.elapsed())
        .unwrap_or_default();
    if silent >= lease(config)
        && let Ok(mut s) = shared.lease_since.lock()
    {
        *s = None;
    }
    if silent >= lease(config) && !shared.fenced.swap(true, Ordering::AcqRel) {
        tracing::error!(
            silent_ms = silent.as_millis() as u64,
            "no confirmed heartbeat for {}ms: lease lost, stopping claims and running tasks",
            silent.as_millis()
        );
        shared.stop_all(StopReason::LeaseLost);
    }
}

/// Writes this node's heartbeats.
pub(crate) struct Heartbeat {
    pub store: Arc<dyn Store>,
    pub shared: Arc<WorkerPoolSharedData>,
    pub config: SentinelConfig,
    pub version: String,
    pub queues: Vec<String>,
    /// The config (or code) schedules this node declares.
    pub schedules: Vec<String>,
    /// The kinds this node runs, with their defaults.
    pub kinds: std::collections::BTreeMap<String, crate::store::DeclaredKind>,
}

impl Heartbeat {
    pub(crate) fn info(&self) -> NodeInfo {
        NodeInfo {
            name: self.shared.node.clone(),
            version: self.version.clone(),
            started_at: self.shared.started,
            heartbeat_at: Utc::now(),
            workers: self.shared.workers_total() as i32,
            workers_busy: self.shared.workers_busy() as i32,
            queues: self.queues.clone(),
            leader: self.shared.is_leader(),
            stats: self.shared.stats(),
            instance: self.shared.instance.clone(),
            schedules: Some(self.schedules.clone()),
            kinds: Some(self.kinds.clone()),
        }
    }

    /// Take the node's name at start, refusing it while another live
    /// process heartbeats under it.
    pub(crate) async fn register(&self) -> Result<(), StoreError> {
        let info = self.info();
        let live_since = info.heartbeat_at
            - chrono::Duration::from_std(self.config.node_timeout).unwrap_or_default();
        let sent = Instant::now();
        // Who held the name before, so its programs can be stopped.
        let previous = self
            .store
            .node_list(Utc::now())
            .await?
            .into_iter()
            .find(|n| n.name == info.name && n.instance != info.instance);
        let mut holder = self
            .store
            .node_register(info.clone(), live_since, None)
            .await?;
        if let Some(h) = holder.take_if(|h| known_dead(&h.instance)) {
            tracing::info!(previous = %h.instance, "taking over the name of a process that is gone");
            holder = self
                .store
                .node_register(info, live_since, Some(h.instance))
                .await?;
        }
        if let Some(h) = holder {
            let age = (Utc::now() - h.heartbeat_at).num_milliseconds();
            return Err(StoreError::invalid(
                "node.name",
                format!(
                    "{:?} is in use by a running node (instance {}, heartbeat {age}ms ago); \
                     stop it, or give this node another name",
                    h.name, h.instance
                ),
            ));
        }
        // The name is ours. A previous process of this machine that is gone
        // may have left programs running (its guardian normally killed
        // them): kill them before its tasks are rescued (the caller rescues next).
        if let Some(p) = previous.filter(|p| known_dead(&p.instance))
            && let Some((mark, _)) = p.instance.rsplit_once('/')
        {
            let mark = mark.to_string();
            let killed =
                tokio::task::spawn_blocking(move || crate::executors::orphans::kill_marked(&mark))
                    .await
                    .unwrap_or(0);
            if killed > 0 {
                tracing::warn!(killed, previous = %p.instance, "killed programs left running by this node's previous process");
            }
        }
        if let Ok(mut t) = self.shared.lease_sent.lock() {
            *t = sent;
        }
        Ok(())
    }

    /// Heartbeat every interval until `stop`; each call is cut off after
    /// one interval so a hung connection never stalls the loop.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut tick = tokio::time::interval(self.config.heartbeat_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let sent = Instant::now();
            let beat = self.store.node_heartbeat(self.info());
            match tokio::time::timeout(self.config.heartbeat_interval, beat).await {
                Ok(Ok(true)) => {
                    if let Ok(mut t) = self.shared.lease_sent.lock() {
                        *t = sent;
                    }
                    if let Ok(mut s) = self.shared.lease_since.lock() {
                        s.get_or_insert(sent);
                    }
                    if !self.shared.name_lost.load(Ordering::Acquire)
                        && self.shared.fenced.swap(false, Ordering::AcqRel)
                    {
                        tracing::warn!("heartbeat restored; claiming again");
                    }
                }
                Ok(Ok(false)) => {
                    if !self.shared.name_lost.swap(true, Ordering::AcqRel) {
                        tracing::error!(
                            node = %self.shared.node,
                            "another process now runs under this node's name (this one was taken for dead); \
                             stopping claims and running tasks"
                        );
                        self.shared.fenced.store(true, Ordering::Release);
                        self.shared.stop_all(StopReason::LeaseLost);
                    }
                }
                Ok(Err(e)) => tracing::warn!(error = %e, "heartbeat failed"),
                Err(_) => tracing::warn!(
                    timeout_ms = self.config.heartbeat_interval.as_millis() as u64,
                    "heartbeat got no answer in time"
                ),
            }
        }
    }
}
