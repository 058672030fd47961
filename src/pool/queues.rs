//! Queue settings at run time: every queue's limits, fairness and workers
//! live in the store (`queue_settings`), shared by the cluster; a node's
//! config gives only the starting values. The watcher here reads them
//! every poll interval, and at once when the store says they changed (on
//! PostgreSQL a NOTIFY from whichever node wrote them), and applies them
//! to this node's producers and slots.
//!
//! # Invariants
//!
//! - Only the watcher writes a [`QueueControl`]; producers read its limits
//!   once per claim (a short std mutex, never held across an await).
//! - A queue's semaphore holds `target + owed` permits in all (free and
//!   held). Raising `workers` cancels what is owed, then adds permits (and
//!   slots, if the queue has fewer than the new count); lowering it owes
//!   permits, which the producer (before each claim) and the watcher take
//!   out of the semaphore as running tasks give them back, so a lowered
//!   queue reaches its new size as its tasks end, never by stopping one.
//! - Slots are only added, never removed: a slot id stays valid for the
//!   pool's life (idle slots of a lowered queue wait on its channel).

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::{Semaphore, broadcast, mpsc};
use tokio_util::sync::CancellationToken;

use super::shared::WorkerPoolSharedData;
use super::worker::{SlotCtx, run_slot};
use crate::sentinel::Slot;
use crate::store::{QueueLimits, QueueSettings, Store, StoreEvent};

/// What this node applies to one queue now.
pub(crate) struct QueueControl {
    /// The limits claims apply (`None`: the fast path).
    limits: std::sync::Mutex<Option<QueueLimits>>,
    /// One permit per free worker of this queue on this node.
    pub capacity: Arc<Semaphore>,
    /// Set by the producer while it waits after a claim that found fewer
    /// due tasks than free workers, cleared when it wakes: no due task is
    /// known to wait (see `handoff.rs`). Only the producer writes it.
    pub idle: std::sync::atomic::AtomicBool,
    sizing: std::sync::Mutex<Sizing>,
}

struct Sizing {
    /// Workers this node should run for the queue.
    target: usize,
    /// Permits still to take out of `capacity` after a lowering.
    owed: usize,
}

impl QueueControl {
    pub(crate) fn new(workers: usize, limits: Option<QueueLimits>) -> Self {
        QueueControl {
            limits: std::sync::Mutex::new(limits),
            capacity: Arc::new(Semaphore::new(workers)),
            idle: std::sync::atomic::AtomicBool::new(false),
            sizing: std::sync::Mutex::new(Sizing {
                target: workers,
                owed: 0,
            }),
        }
    }

    /// The limits a claim applies now.
    pub(crate) fn limits(&self) -> Option<QueueLimits> {
        self.limits.lock().map(|l| *l).unwrap_or(None)
    }

    /// Add free permits to `permits` (the producer's) until it holds
    /// `most`, then pay what a lowering still owes out of them.
    pub(crate) fn top_up(&self, permits: &mut Vec<tokio::sync::OwnedSemaphorePermit>, most: usize) {
        while permits.len() < most {
            match self.capacity.clone().try_acquire_owned() {
                Ok(p) => permits.push(p),
                Err(_) => break,
            }
        }
        self.pay_owed(permits);
    }

    /// Take what a lowering still owes out of `permits` (the producer's,
    /// just acquired): those permits are forgotten, so the queue shrinks as
    /// its running tasks give theirs back.
    pub(crate) fn pay_owed(&self, permits: &mut Vec<tokio::sync::OwnedSemaphorePermit>) {
        let Ok(mut s) = self.sizing.lock() else {
            return;
        };
        while s.owed > 0 {
            let Some(p) = permits.pop() else { break };
            p.forget();
            s.owed -= 1;
        }
    }

    /// Workers this node runs for the queue now.
    pub(crate) fn workers(&self) -> usize {
        self.sizing.lock().map(|s| s.target).unwrap_or(0)
    }
}

/// One queue as the watcher sees it.
pub(crate) struct WatchedQueue {
    pub name: String,
    /// The node's own configured workers (used while the store sets none).
    pub configured_workers: usize,
    /// The node's own configured limits (used while the store has none).
    pub configured_limits: Option<QueueLimits>,
    pub control: Arc<QueueControl>,
    /// A slot of this queue, to clone for new slots.
    pub template: SlotCtx,
    /// Slots made for this queue so far.
    pub slots: usize,
}

pub(crate) struct Watcher {
    pub store: Arc<dyn Store>,
    pub shared: Arc<WorkerPoolSharedData>,
    pub queues: Vec<WatchedQueue>,
    /// New slots go to the Sentinel, which looks after every slot.
    pub new_slots: mpsc::UnboundedSender<Slot>,
    pub poll_interval: Duration,
    pub stop: CancellationToken,
}

/// How often, and for how long after a queue became round robin, the
/// leader gives its stragglers a fair_seq (tasks a process enqueued before
/// it read the switch, which it does within a second; see
/// [`Store::queue_fair_adopt`]). Each adoption walks the queue's waiting
/// tasks, so it is not repeated for ever.
const ADOPT_EVERY: Duration = Duration::from_secs(10);
const ADOPT_FOR: Duration = Duration::from_secs(60);

impl Watcher {
    pub(crate) async fn run(mut self) {
        // Round-robin queues seen so far (since when), and when the leader
        // last adopted.
        let mut fair_seen: HashMap<String, tokio::time::Instant> = HashMap::new();
        let mut adopted_at: Option<tokio::time::Instant> = None;
        let mut events = self.store.subscribe();
        let mut tick = tokio::time::interval(self.poll_interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = self.stop.cancelled() => return,
                _ = tick.tick() => {}
                ev = events.recv() => match ev {
                    Ok(StoreEvent::SettingsChanged | StoreEvent::Missed)
                    | Err(broadcast::error::RecvError::Lagged(_)) => {}
                    Ok(_) => {
                        self.settle();
                        continue;
                    }
                    Err(broadcast::error::RecvError::Closed) => {
                        events = self.store.subscribe();
                        continue;
                    }
                },
            }
            match self.store.queue_settings().await {
                Ok(all) => {
                    let all: HashMap<String, QueueSettings> = all.into_iter().collect();
                    self.apply(&all);
                    let fair: std::collections::HashSet<String> = all
                        .iter()
                        .filter(|(_, s)| s.fairness == Some(crate::store::Fairness::RoundRobin))
                        .map(|(q, _)| q.clone())
                        .collect();
                    // A queue that just became round robin (or that this
                    // pool sees for the first time): its waiting tasks now.
                    // Then, for a minute, the leader now and then, for tasks
                    // enqueued by a process that had not read the switch.
                    let periodic = self.shared.is_leader()
                        && adopted_at.is_none_or(|at| at.elapsed() >= ADOPT_EVERY);
                    for q in &fair {
                        let first = !fair_seen.contains_key(q);
                        let since = *fair_seen
                            .entry(q.clone())
                            .or_insert_with(tokio::time::Instant::now);
                        if first || (periodic && since.elapsed() < ADOPT_FOR) {
                            match self.store.queue_fair_adopt(q).await {
                                Ok(0) => {}
                                Ok(n) => {
                                    tracing::info!(queue = %q, tasks = n, "round robin: waiting tasks given their turn")
                                }
                                Err(e) => {
                                    tracing::warn!(queue = %q, error = %e, "round robin: could not adopt waiting tasks")
                                }
                            }
                        }
                    }
                    if periodic {
                        adopted_at = Some(tokio::time::Instant::now());
                    }
                    fair_seen.retain(|q, _| fair.contains(q));
                }
                Err(e) => tracing::warn!(error = %e, "could not read the queue settings"),
            }
            self.settle();
        }
    }

    /// Apply the stored settings to every queue this node serves.
    pub(crate) fn apply(&mut self, all: &HashMap<String, QueueSettings>) {
        let mut changed = false;
        for q in &mut self.queues {
            let stored = all.get(&q.name);
            // A queue whose limits were never stored runs on the node's own
            // (a run-time change always stores `fairness`, so "no limits"
            // set at run time is kept; see `Client::queue_set_settings`).
            let limits = match stored {
                Some(s) if s.has_limits() => s.limits(),
                _ => q.configured_limits,
            };
            if let Ok(mut l) = q.control.limits.lock()
                && *l != limits
            {
                tracing::info!(queue = %q.name, ?limits, "queue limits changed");
                *l = limits;
                changed = true;
            }
            let workers = stored
                .and_then(|s| s.workers)
                .map(|w| w as usize)
                .unwrap_or(q.configured_workers)
                .clamp(1, super::settings::MAX_QUEUE_WORKERS);
            resize(q, workers, &self.shared, &self.new_slots);
        }
        if changed {
            // Claims made before this node heard of a new limit took
            // nothing (the store checks the stored limits); its producers
            // look again now, with the limits, instead of at their next poll.
            self.store.work_notifier().notify_waiters();
        }
    }

    /// Take owed permits out of the queues' semaphores as tasks give them back.
    fn settle(&mut self) {
        for q in &self.queues {
            if let Ok(mut s) = q.control.sizing.lock()
                && s.owed > 0
            {
                let gone = q.control.capacity.forget_permits(s.owed);
                s.owed -= gone;
            }
        }
    }
}

/// Run `workers` workers for `q` on this node (see the module invariants).
fn resize(
    q: &mut WatchedQueue,
    workers: usize,
    shared: &Arc<WorkerPoolSharedData>,
    new_slots: &mpsc::UnboundedSender<Slot>,
) {
    let Ok(mut s) = q.control.sizing.lock() else {
        return;
    };
    if workers == s.target {
        return;
    }
    tracing::info!(queue = %q.name, from = s.target, to = workers, "queue workers changed");
    if workers > s.target {
        let mut add = workers - s.target;
        let cancelled = add.min(s.owed);
        s.owed -= cancelled;
        add -= cancelled;
        while q.slots < workers {
            let mut ctx = q.template.clone();
            ctx.id = shared.add_slot();
            let handle = tokio::spawn(run_slot(ctx.clone()));
            if new_slots.send(Slot { ctx, handle }).is_err() {
                break;
            }
            q.slots += 1;
        }
        q.control.capacity.add_permits(add);
        shared
            .workers_now
            .fetch_add(workers - s.target, Ordering::Relaxed);
    } else {
        s.owed += s.target - workers;
        shared
            .workers_now
            .fetch_sub(s.target - workers, Ordering::Relaxed);
    }
    s.target = workers;
}
