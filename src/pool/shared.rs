//! State shared by the parts of one node's pool: worker slots, running
//! tasks, counters and shutdown signals.
//!
//! Locks here are `std::sync::Mutex`, never held across an `.await`: each
//! critical section only reads or swaps a few fields.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::task::TaskId;

/// Why a running task's cancellation token fired.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum StopReason {
    /// Not asked to stop.
    None = 0,
    /// A user cancelled the task.
    Cancelled = 1,
    /// The node is shutting down: give the task back.
    Shutdown = 2,
    /// The attempt ran past its timeout.
    Timeout = 3,
    /// The node lost its lease (or its name): the attempt is used, as when
    /// a node dies and its tasks are rescued.
    LeaseLost = 4,
}

impl StopReason {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => StopReason::Cancelled,
            2 => StopReason::Shutdown,
            3 => StopReason::Timeout,
            4 => StopReason::LeaseLost,
            _ => StopReason::None,
        }
    }
}

/// A task this node is running: enough to stop it and to fence its outcome.
#[derive(Debug)]
pub struct RunningTask {
    /// The claim token of this run: what its outcome is fenced by.
    pub claim_token: i64,
    pub token: CancellationToken,
    reason: AtomicU8,
}

impl RunningTask {
    pub fn new(claim_token: i64, token: CancellationToken) -> Self {
        RunningTask {
            claim_token,
            token,
            reason: AtomicU8::new(StopReason::None as u8),
        }
    }

    /// Fire the token. The first reason wins: a task cancelled by a user and
    /// then caught by shutdown still ends `cancelled`.
    pub fn stop(&self, reason: StopReason) {
        let _ = self.reason.compare_exchange(
            StopReason::None as u8,
            reason as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
        self.token.cancel();
    }

    pub fn reason(&self) -> StopReason {
        StopReason::from_u8(self.reason.load(Ordering::Acquire))
    }
}

/// What one worker slot is doing.
#[derive(Debug, Default)]
pub struct SlotStatus {
    /// The task in hand, if any.
    pub busy: Option<BusyInfo>,
    /// The queue capacity this slot holds while busy. Whoever ends the job
    /// (the slot itself, or the Sentinel replacing a hung slot) takes it out
    /// and drops it, so capacity is returned exactly once.
    pub permit: Option<OwnedSemaphorePermit>,
    /// Set by the slot when an executor panicked and the slot stopped.
    pub panicked: bool,
}

/// The task a busy slot is running.
#[derive(Debug, Clone)]
pub struct BusyInfo {
    pub task: TaskId,
    pub kind: String,
    pub attempt: i32,
    pub claim_token: i64,
    pub max_attempts: i32,
    pub since: Instant,
    pub deadline: Option<std::sync::Arc<crate::executor::Deadline>>,
}

/// Counters of what this node did since it started.
#[derive(Debug, Default)]
pub struct Counters {
    /// Tasks this node took to run: by claims, and started as this node's
    /// client enqueued them.
    pub claimed: AtomicU64,
    /// Of `claimed`, those started as they were enqueued (`handoff.rs`).
    pub started_at_enqueue: AtomicU64,
    pub completed: AtomicU64,
    pub retried: AtomicU64,
    pub failed: AtomicU64,
    pub cancelled: AtomicU64,
    pub snoozed: AtomicU64,
    pub released: AtomicU64,
    /// Completions the store refused because the attempt was no longer running.
    pub fenced: AtomicU64,
    pub panics: AtomicU64,
    pub timeouts: AtomicU64,
    pub hung_replaced: AtomicU64,
    pub rescued: AtomicU64,
    /// Store calls of the progress writer (each carries every report held).
    pub progress_writes: AtomicU64,
}

impl Counters {
    pub fn get(c: &AtomicU64) -> u64 {
        c.load(Ordering::Relaxed)
    }
    pub fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }
}

/// Hooks for metrics: told when attempts start and end. Called on the slot's
/// task, so implementations must be quick and must not block.
pub trait PoolObserver: Send + Sync + 'static {
    /// An attempt starts after the task waited `wait` since it was due.
    fn task_started(&self, _task: &crate::task::Task, _wait: Duration) {}
    /// An attempt ended with `outcome` after running for `run_time`.
    fn task_finished(
        &self,
        _task: &crate::task::Task,
        _outcome: &crate::store::Outcome,
        _run_time: Duration,
    ) {
    }
    /// An executor panicked (its worker is being replaced).
    fn worker_panicked(&self) {}
    /// This node's Sentinel rescued `n` tasks of dead nodes.
    fn tasks_rescued(&self, _n: u64) {}
}

/// The pool's shared state.
pub struct WorkerPoolSharedData {
    pub node: String,
    /// One entry per worker slot, indexed by slot id. Grows when a queue's
    /// `workers` is raised at run time (see `pool::queues`), never shrinks:
    /// a slot id stays valid for the pool's life. Read by slots, the
    /// Sentinel and shutdown; written (pushed) only by the settings watcher.
    slots: std::sync::RwLock<Vec<std::sync::Arc<Mutex<SlotStatus>>>>,
    /// Workers this node runs now, all queues together (what it reports).
    pub workers_now: std::sync::atomic::AtomicUsize,
    /// Tasks running on this node, by id.
    pub running: Mutex<HashMap<TaskId, std::sync::Arc<RunningTask>>>,
    pub counters: Counters,
    /// Fires when the pool stops claiming (shutdown began).
    pub stop_claiming: CancellationToken,
    /// True while the node's lease is lost: producers do not claim.
    pub fenced: AtomicBool,
    /// Another process took this node's name: fenced for good.
    pub name_lost: AtomicBool,
    /// This process's instance id under the node's name.
    pub instance: String,
    /// When the last confirmed heartbeat was sent (the lease counts from
    /// there). Written by the heartbeat task only; a std mutex held to read
    /// or replace one `Instant`.
    pub lease_sent: Mutex<Instant>,
    /// Since when this node has held its lease without a break (`None`
    /// while fenced). Written by the heartbeat task and the lease watch.
    pub lease_since: Mutex<Option<Instant>>,
    /// True while this node holds leadership.
    pub leader: crate::maintenance::Leadership,
    pub started: chrono::DateTime<chrono::Utc>,
    /// Signalled after the completer writes outcomes: running tasks left the
    /// store's count, so producers of limited queues may claim again.
    pub outcomes_written: tokio::sync::Notify,
    /// Told about every attempt (metrics). Set once at build.
    pub(crate) observer: Option<std::sync::Arc<dyn PoolObserver>>,
}

impl std::fmt::Debug for WorkerPoolSharedData {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPoolSharedData")
            .field("node", &self.node)
            .field("slots", &self.slot_count())
            .field("counters", &self.counters)
            .finish()
    }
}

impl WorkerPoolSharedData {
    pub(crate) fn new(node: String, slots: usize) -> Self {
        WorkerPoolSharedData {
            node,
            slots: std::sync::RwLock::new(
                (0..slots)
                    .map(|_| std::sync::Arc::new(Mutex::new(SlotStatus::default())))
                    .collect(),
            ),
            workers_now: std::sync::atomic::AtomicUsize::new(slots),
            running: Mutex::new(HashMap::new()),
            counters: Counters::default(),
            stop_claiming: CancellationToken::new(),
            fenced: AtomicBool::new(false),
            name_lost: AtomicBool::new(false),
            instance: crate::sentinel::lease::new_instance(),
            lease_sent: Mutex::new(Instant::now()),
            lease_since: Mutex::new(None),
            leader: Default::default(),
            started: chrono::Utc::now(),
            outcomes_written: tokio::sync::Notify::new(),
            observer: None,
        }
    }

    /// The outcome counters, as the heartbeat publishes them.
    pub fn stats(&self) -> crate::store::NodeStats {
        let c = &self.counters;
        crate::store::NodeStats {
            completed: Counters::get(&c.completed),
            failed: Counters::get(&c.failed),
            retried: Counters::get(&c.retried),
            cancelled: Counters::get(&c.cancelled),
        }
    }

    /// How many slots are running a task now.
    pub fn workers_busy(&self) -> usize {
        self.slots
            .read()
            .map(|v| {
                v.iter()
                    .filter(|s| s.lock().map(|s| s.busy.is_some()).unwrap_or(false))
                    .count()
            })
            .unwrap_or(0)
    }

    /// Workers this node runs now (queue `workers` changed at run time included).
    pub fn workers_total(&self) -> usize {
        self.workers_now.load(Ordering::Relaxed)
    }

    /// The status of slot `id`.
    pub fn slot(&self, id: usize) -> Option<std::sync::Arc<Mutex<SlotStatus>>> {
        self.slots.read().ok().and_then(|v| v.get(id).cloned())
    }

    /// Slots made so far (idle ones of a queue whose `workers` went down included).
    pub fn slot_count(&self) -> usize {
        self.slots.read().map(|v| v.len()).unwrap_or(0)
    }

    /// A new slot's status; its id.
    pub(crate) fn add_slot(&self) -> usize {
        let mut v = self.slots.write().unwrap_or_else(|e| e.into_inner());
        v.push(std::sync::Arc::new(Mutex::new(SlotStatus::default())));
        v.len() - 1
    }

    pub fn is_leader(&self) -> bool {
        self.leader.is_leader()
    }

    /// Fire the token of a running task, if this node runs it (under
    /// `claim_token`, when given).
    pub fn stop_task(&self, id: TaskId, claim_token: Option<i64>, reason: StopReason) -> bool {
        let running = self.running.lock().ok().and_then(|m| m.get(&id).cloned());
        match running {
            Some(r) if claim_token.is_none_or(|t| t == r.claim_token) => {
                r.stop(reason);
                true
            }
            _ => false,
        }
    }

    /// Fire the tokens of every running task.
    pub fn stop_all(&self, reason: StopReason) {
        let all: Vec<_> = self
            .running
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default();
        for r in all {
            r.stop(reason);
        }
    }

    pub(crate) fn running_count(&self) -> usize {
        self.running.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// Wait until no slot is busy, up to `timeout`. True when all went idle.
    pub(crate) async fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.workers_busy() == 0 {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
