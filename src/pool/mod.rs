//! The worker pool of one node.
//!
//! # Overview
//!
//! ```text
//!  Store --claim (<= free slots)--> Producer (one per queue) --> dispatch channel --> slots (LocalWorker xN)
//!    ^                                                                                  |
//!    +------------------ Completer (batched outcome writes) <---------------------------+
//!  Sentinel: replaces dead/hung slots, heartbeats, rescues, elects the leader, prunes
//! ```
//!
//! # Shutdown
//!
//! 1. Producers stop claiming.
//! 2. Running tasks get `shutdown_timeout` to finish (skipped with `force_shutdown`).
//! 3. The tokens of tasks still running fire; executors get `cancel_grace` to return.
//! 4. Tasks still running after that are released (back to `available`, the
//!    attempt not used up) and their slots are aborted.
//! 5. The completer writes every queued outcome, then the node deregisters.
//!
//! `shutdown` may be called more than once; later calls return at once.

pub mod builder;
pub mod completer;
pub(crate) mod handoff;
pub mod producer;
pub mod progress;
pub(crate) mod queues;
pub mod settings;
pub mod shared;
pub mod worker;

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use tokio::sync::{Mutex, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::client::Client;
use crate::registry::TaskRegistry;
use crate::sentinel::{Sentinel, Slot};
use crate::store::{Completion, Outcome, Store, StoreError};
use builder::PoolSetup;
pub use builder::{BuildError, Builder, default_node_name};
use completer::Completer;
use producer::Producer;
pub use settings::PoolSettings;
pub use shared::{Counters, PoolObserver, StopReason, WorkerPoolSharedData};
pub use worker::{LocalWorker, Worker};
use worker::{SlotCtx, run_slot};

struct Running {
    producers: Vec<JoinHandle<()>>,
    watcher: JoinHandle<()>,
    cron: JoinHandle<()>,
    sentinel: JoinHandle<Vec<Slot>>,
    sentinel_stop: CancellationToken,
    completer: JoinHandle<()>,
    completions: mpsc::UnboundedSender<Completion>,
    progress: JoinHandle<()>,
    progress_stop: CancellationToken,
}

/// The workers of one node and the services around them. Build with [`Builder`].
pub struct WorkerPool {
    store: Arc<dyn Store>,
    registry: Arc<TaskRegistry>,
    /// Handed out by [`WorkerPool::client`]: its clones share one set of waiters.
    client: Client,
    shared: Arc<WorkerPoolSharedData>,
    config: PoolSetup,
    /// `None` before `start` and after `shutdown`. A tokio mutex: start and
    /// shutdown hold it across awaits so they never interleave.
    running: Mutex<Option<Running>>,
    stopped: std::sync::atomic::AtomicBool,
    /// Each served queue's control (set at start; see `queues.rs`).
    controls: std::sync::Mutex<Vec<(String, Arc<queues::QueueControl>)>>,
    /// Where this pool's client starts tasks as it enqueues them (see
    /// `handoff.rs`); open while the pool runs.
    handoff: Arc<handoff::Handoff>,
}

impl std::fmt::Debug for WorkerPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WorkerPool")
            .field("node", &self.shared.node)
            .field("queues", &self.config.queues)
            .finish()
    }
}

impl WorkerPool {
    fn new(
        store: Arc<dyn Store>,
        registry: Arc<TaskRegistry>,
        config: PoolSetup,
        observer: Option<Arc<dyn PoolObserver>>,
    ) -> Self {
        let slots = config.queues.iter().map(|(_, n)| n).sum();
        let mut shared = WorkerPoolSharedData::new(config.node.clone(), slots);
        shared.observer = observer;
        let handoff = Arc::new(handoff::Handoff::default());
        WorkerPool {
            shared: Arc::new(shared),
            client: Client::new(store.clone(), registry.clone()).with_handoff(handoff.clone()),
            handoff,
            store,
            registry,
            config,
            running: Mutex::new(None),
            stopped: std::sync::atomic::AtomicBool::new(false),
            controls: std::sync::Mutex::new(Vec::new()),
        }
    }

    /// A client over the same store, with this pool's kind defaults. Every
    /// call hands out a clone of one client, so all of them share one set of
    /// waiters (one fallback poll for the node).
    pub fn client(&self) -> Client {
        self.client.clone()
    }

    pub fn registry(&self) -> &Arc<TaskRegistry> {
        &self.registry
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    pub fn shared(&self) -> &Arc<WorkerPoolSharedData> {
        &self.shared
    }

    pub fn node_name(&self) -> &str {
        &self.shared.node
    }

    /// The queues this pool serves and their configured worker counts.
    pub fn queues(&self) -> &[(String, usize)] {
        &self.config.queues
    }

    /// The limits this pool was configured with for `queue` (the cluster's
    /// starting values; see `queues.rs`).
    pub fn configured_limits(&self, queue: &str) -> crate::store::QueueLimits {
        self.config.limits.get(queue).copied().unwrap_or_default()
    }

    /// The queues this pool serves and the workers each runs now: the
    /// cluster's `workers` setting when one is stored, else the configured
    /// count (before `start`, the configured counts).
    pub fn queue_workers(&self) -> Vec<(String, usize)> {
        let controls = self.controls.lock().unwrap_or_else(|e| e.into_inner());
        if controls.is_empty() {
            return self.config.queues.clone();
        }
        controls
            .iter()
            .map(|(q, c)| (q.clone(), c.workers()))
            .collect()
    }

    /// Register the node, rescue what an earlier process of this node left
    /// running, and start claiming. Calling it on a started pool does
    /// nothing; on a pool that was shut down it is an error (field `pool`):
    /// build a new one.
    pub async fn start(&self) -> Result<(), StoreError> {
        let mut running = self.running.lock().await;
        if self.stopped.load(std::sync::atomic::Ordering::Acquire) {
            return Err(StoreError::invalid(
                "pool",
                "this pool was shut down and does not start again; build a new one",
            ));
        }
        if running.is_some() {
            return Ok(());
        }
        let (ctx_tx, rx) = mpsc::unbounded_channel();
        let (new_slots_tx, new_slots_rx) = mpsc::unbounded_channel();
        let mut sentinel = Sentinel {
            new_slots: new_slots_rx,
            store: self.store.clone(),
            shared: self.shared.clone(),
            config: self.config.sentinel.clone(),
            slots: Vec::new(),
            queues: self.config.queues.iter().map(|(q, _)| q.clone()).collect(),
            schedules: self
                .config
                .schedules
                .iter()
                .map(|s| s.name.clone())
                .collect(),
            kinds: self.registry.declared(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        };
        sentinel.start().await?;
        // This node's limits are the cluster's starting values: stored for
        // a queue whose limits were never written (see `queues.rs`).
        for (queue, _) in &self.config.queues {
            if let Some(l) = self.config.limits.get(queue).filter(|l| !l.is_empty()) {
                let settings = crate::store::QueueSettings::default().with_limits(l);
                self.store.queue_settings_put(queue, settings, true).await?;
            }
        }
        let stored: std::collections::HashMap<_, _> =
            self.store.queue_settings().await?.into_iter().collect();
        for spec in &self.config.schedules {
            let row = crate::store::ScheduleRow {
                name: spec.name.clone(),
                spec: serde_json::to_value(spec)
                    .map_err(|e| StoreError::invalid("schedules", e.to_string()))?,
                source: crate::maintenance::cron_firer::CONFIG.into(),
                last_tick: Utc::now(),
                paused: false,
            };
            self.store.schedule_upsert(row).await?;
        }
        let cron = tokio::spawn(
            crate::maintenance::cron_firer::CronFirer {
                store: self.store.clone(),
                client: self.client(),
                leadership: self.shared.leader.clone(),
                stop: self.shared.stop_claiming.clone(),
                interval: self.config.settings.cron_interval,
            }
            .run(),
        );
        let completer = tokio::spawn(
            Completer {
                store: self.store.clone(),
                shared: self.shared.clone(),
                rx,
            }
            .run(),
        );
        let (progress_tx, progress_rx) = mpsc::unbounded_channel();
        let progress_stop = CancellationToken::new();
        let progress = tokio::spawn(
            progress::ProgressWriter {
                store: self.store.clone(),
                rx: progress_rx,
                stop: progress_stop.clone(),
                shared: self.shared.clone(),
            }
            .run(),
        );
        let worker: Arc<dyn Worker> = Arc::new(LocalWorker::new(self.registry.clone()));
        let mut producers = Vec::new();
        let mut watched = Vec::new();
        let mut handed = Vec::new();
        for (queue, workers) in &self.config.queues {
            let configured_limits = self
                .config
                .limits
                .get(queue)
                .copied()
                .filter(|l| !l.is_empty());
            let control = Arc::new(queues::QueueControl::new(*workers, configured_limits));
            let (jobs_tx, jobs_rx) = async_channel::bounded(*workers);
            let mut template = None;
            for _ in 0..*workers {
                let ctx = SlotCtx {
                    id: sentinel.slots.len(),
                    max_result_bytes: self.config.settings.max_result_bytes,
                    store: self.store.clone(),
                    worker: worker.clone(),
                    jobs: jobs_rx.clone(),
                    shared: self.shared.clone(),
                    registry: self.registry.clone(),
                    completions: ctx_tx.clone(),
                    progress: progress_tx.clone(),
                };
                let handle = tokio::spawn(run_slot(ctx.clone()));
                template.get_or_insert_with(|| ctx.clone());
                sentinel.slots.push(Slot { ctx, handle });
            }
            handed.push((queue.clone(), control.clone(), jobs_tx.clone()));
            producers.push(Producer {
                queue: queue.clone(),
                store: self.store.clone(),
                shared: self.shared.clone(),
                control: control.clone(),
                jobs: jobs_tx,
                poll_interval: self.config.settings.poll_interval,
                claim_max: self.config.settings.claim_max,
            });
            self.controls
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((queue.clone(), control.clone()));
            if let Some(template) = template {
                watched.push(queues::WatchedQueue {
                    name: queue.clone(),
                    configured_workers: *workers,
                    configured_limits,
                    control,
                    template,
                    slots: *workers,
                });
            }
        }
        self.handoff.open(self.shared.clone(), handed);
        let mut watcher = queues::Watcher {
            store: self.store.clone(),
            shared: self.shared.clone(),
            queues: watched,
            new_slots: new_slots_tx,
            poll_interval: self.config.settings.poll_interval,
            stop: self.shared.stop_claiming.clone(),
        };
        // The stored settings apply before the first claim.
        watcher.apply(&stored);
        let watcher = tokio::spawn(watcher.run());
        let producers = producers
            .into_iter()
            .map(|p| tokio::spawn(p.run()))
            .collect();
        let sentinel_stop = CancellationToken::new();
        let sentinel = tokio::spawn(sentinel.run(sentinel_stop.clone()));
        tracing::info!(node = %self.shared.node, queues = ?self.config.queues, "worker pool started");
        *running = Some(Running {
            producers,
            watcher,
            cron,
            sentinel,
            sentinel_stop,
            completer,
            completions: ctx_tx,
            progress,
            progress_stop,
        });
        Ok(())
    }

    /// Stop the pool (see the module docs). Safe to call twice.
    pub async fn shutdown(&self) {
        let mut guard = self.running.lock().await;
        self.stopped
            .store(true, std::sync::atomic::Ordering::Release);
        let Some(run) = guard.take() else { return };
        let shared = &self.shared;
        tracing::info!(
            busy = shared.workers_busy(),
            "shutting down: no more claims"
        );
        self.handoff.close();
        shared.stop_claiming.cancel();
        for p in run.producers {
            let _ = p.await;
        }
        let _ = run.watcher.await;
        let _ = run.cron.await;
        if !self.config.settings.force_shutdown
            && !shared
                .wait_idle(self.config.settings.shutdown_timeout)
                .await
        {
            tracing::warn!(
                busy = shared.workers_busy(),
                "shutdown_timeout passed with tasks running; cancelling them"
            );
        }
        shared.stop_all(StopReason::Shutdown);
        shared.wait_idle(self.config.settings.cancel_grace).await;
        run.sentinel_stop.cancel();
        let slots = run.sentinel.await.unwrap_or_default();
        // Tasks whose executors ignored cancellation: give them back anyway.
        for slot in &slots {
            let taken = shared.slot(slot.ctx.id).and_then(|s| {
                let mut s = s.lock().ok()?;
                let busy = s.busy.take()?;
                Some((busy, s.permit.take()))
            });
            if let Some((busy, _permit)) = taken {
                slot.handle.abort();
                tracing::warn!(task = %busy.task, "executor ignored cancellation; releasing its task");
                let _ = run.completions.send(Completion {
                    id: busy.task,
                    attempt: busy.attempt,
                    token: busy.claim_token,
                    at: Utc::now(),
                    outcome: Outcome::Released,
                });
            }
        }
        // Slots end when their dispatch channel closes (producers are gone).
        for slot in slots {
            slot.ctx.jobs.close();
            drop(slot.ctx);
            let _ = tokio::time::timeout(Duration::from_secs(1), slot.handle).await;
        }
        // The last progress reports are written (they land under their
        // run's claim token even after its outcome).
        run.progress_stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(5), run.progress).await;
        drop(run.completions);
        if tokio::time::timeout(Duration::from_secs(30), run.completer)
            .await
            .is_err()
        {
            tracing::error!(
                "could not write every outcome within 30s; those tasks will be rescued"
            );
        }
        if let Err(e) = self.store.node_remove(&shared.node).await {
            tracing::warn!(error = %e, "could not deregister the node");
        }
        tracing::info!(node = %shared.node, "worker pool stopped");
    }

    /// Run until SIGINT or SIGTERM, then shut down.
    pub async fn run_until_signal(&self) -> Result<(), StoreError> {
        self.start().await?;
        wait_for_signal().await;
        self.shutdown().await;
        Ok(())
    }
}

/// Resolves on SIGINT (Ctrl-C) or, on Unix, SIGTERM.
pub async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {},
                    _ = term.recv() => {},
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
