//! Starting a task as it is enqueued: when this pool's client enqueues one
//! task for a queue this node serves, and a worker of that queue is free,
//! the task is inserted already claimed by this node
//! ([`Store::task_insert_started`]) and goes straight to the worker. One
//! durable round trip instead of an insert, a wake-up and a claim: the
//! enqueue-to-start latency of a node that runs what it enqueues.
//!
//! Invariants, the producer's own (`producer.rs`):
//! - A worker's permit is taken *before* the insert, so this node never
//!   holds more running tasks of a queue than it has workers; the permit
//!   travels with the task to its slot, as a claimed task's does.
//! - Nothing is started here while the pool stops or is fenced (its lease
//!   lost), nor for a queue with cluster-wide limits (whose claims count
//!   running tasks under the store's rules), nor unless the queue's
//!   producer is idle: its last claim found fewer due tasks than free
//!   workers and no wake-up came since. So a backlog this node knows of is
//!   never jumped; a task another node enqueued in the same instant may be
//!   (its NOTIFY still on the way), as with any two concurrent enqueues.
//!   (A probe of the claim index for due tasks would be exact, but after a
//!   large drain it walks the index entries that vacuum has not yet
//!   removed: 0.35 ms per enqueue, measured.) The store adds its own checks
//!   (paused, capped, round robin) and otherwise inserts the task as usual.
//! - A task started here is this node's as a claimed one is: if the node
//!   dies, it is rescued; reconcile leaves recent starts alone.
//!
//! [`Store::task_insert_started`]: crate::Store::task_insert_started

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use tokio::sync::OwnedSemaphorePermit;

use super::queues::QueueControl;
use super::shared::{Counters, WorkerPoolSharedData};
use super::worker::Job;
use crate::task::Task;

/// The queues of a started pool that may take tasks as they are enqueued.
/// Written at start and shutdown only; read by each enqueue.
#[derive(Default)]
pub(crate) struct Handoff {
    queues: RwLock<HashMap<String, Entry>>,
    shared: RwLock<Option<Arc<WorkerPoolSharedData>>>,
}

#[derive(Clone)]
struct Entry {
    control: Arc<QueueControl>,
    jobs: async_channel::Sender<Job>,
}

/// A free worker of one queue, held for a task being enqueued.
pub(crate) struct Reserved {
    permit: OwnedSemaphorePermit,
    jobs: async_channel::Sender<Job>,
    shared: Arc<WorkerPoolSharedData>,
}

impl std::fmt::Debug for Handoff {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let queues: Vec<String> = self
            .queues
            .read()
            .map(|q| q.keys().cloned().collect())
            .unwrap_or_default();
        f.debug_struct("Handoff").field("queues", &queues).finish()
    }
}

impl Handoff {
    /// The pool started: its queues take tasks from now on.
    pub(crate) fn open(
        &self,
        shared: Arc<WorkerPoolSharedData>,
        queues: Vec<(String, Arc<QueueControl>, async_channel::Sender<Job>)>,
    ) {
        if let Ok(mut s) = self.shared.write() {
            *s = Some(shared);
        }
        if let Ok(mut q) = self.queues.write() {
            *q = queues
                .into_iter()
                .map(|(name, control, jobs)| (name, Entry { control, jobs }))
                .collect();
        }
    }

    /// The pool stops: nothing more is started here.
    pub(crate) fn close(&self) {
        if let Ok(mut q) = self.queues.write() {
            q.clear();
        }
    }

    /// The node's name, while the pool runs.
    pub(crate) fn node(&self) -> Option<String> {
        self.shared
            .read()
            .ok()
            .and_then(|s| s.as_ref().map(|s| s.node.clone()))
    }

    /// A free worker of `queue`, if this node may start a task of it now.
    pub(crate) fn reserve(&self, queue: &str) -> Option<Reserved> {
        let shared = self.shared.read().ok()?.clone()?;
        if shared.stop_claiming.is_cancelled()
            || shared.fenced.load(std::sync::atomic::Ordering::Acquire)
        {
            return None;
        }
        let entry = self.queues.read().ok()?.get(queue)?.clone();
        if entry.control.limits().is_some()
            || !entry
                .control
                .idle
                .load(std::sync::atomic::Ordering::Acquire)
        {
            return None;
        }
        let mut permits = vec![entry.control.capacity.clone().try_acquire_owned().ok()?];
        // A lowered `workers` takes its permits back first (as claims do).
        entry.control.pay_owed(&mut permits);
        Some(Reserved {
            permit: permits.pop()?,
            jobs: entry.jobs,
            shared,
        })
    }
}

impl Reserved {
    /// Hand `task` (inserted started by this node) to a worker. `Err` gives
    /// it back when the pool stopped meanwhile.
    pub(crate) async fn start(self, task: Task) -> Result<(), Task> {
        Counters::add(&self.shared.counters.claimed, 1);
        Counters::add(&self.shared.counters.started_at_enqueue, 1);
        self.jobs
            .send(Job {
                task,
                permit: self.permit,
            })
            .await
            .map_err(|e| e.into_inner().task)
    }
}
