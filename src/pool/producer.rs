//! The producer of one queue: claims due tasks and hands them to free slots.
//!
//! Invariant: the producer never claims more tasks than its queue has free
//! slots. Capacity is a semaphore with one permit per slot; the producer
//! acquires permits first and claims at most as many tasks as it holds, and
//! each claimed task carries its permit until its outcome is queued.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::queues::QueueControl;
use super::shared::{Counters, WorkerPoolSharedData};
use super::worker::Job;
use crate::store::{ClaimParams, ClaimRoom, Store};
use chrono::Utc;

pub(crate) struct Producer {
    pub queue: String,
    pub store: Arc<dyn Store>,
    pub shared: Arc<WorkerPoolSharedData>,
    /// The queue's capacity on this node and its cluster-wide limits, as
    /// the settings watcher keeps them (`queues.rs`).
    pub control: Arc<QueueControl>,
    pub jobs: async_channel::Sender<Job>,
    pub poll_interval: Duration,
    /// Most tasks one claim asks for.
    pub claim_max: usize,
}

impl Producer {
    pub(crate) async fn run(self) {
        let notify = self.store.work_notifier();
        let stop = self.shared.stop_claiming.clone();
        let mut backoff = Duration::from_millis(50);
        loop {
            // Register for wake-ups before looking, so an insert that lands
            // between the claim and the wait is not missed.
            let notified = notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            // Limited queues also wake when this node's outcomes land.
            let written = self.shared.outcomes_written.notified();
            tokio::pin!(written);
            written.as_mut().enable();

            let capacity = &self.control.capacity;
            let first = tokio::select! {
                p = capacity.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
                _ = stop.cancelled() => return,
            };
            if self.shared.fenced.load(Ordering::Acquire) {
                // Lease lost: claim nothing until the Sentinel restores it.
                drop(first);
                tokio::select! {
                    _ = tokio::time::sleep(self.poll_interval) => {},
                    _ = stop.cancelled() => return,
                }
                continue;
            }
            let mut permits = vec![first];
            // A lowered `workers` takes its permits back here.
            self.control.top_up(&mut permits, self.claim_max);
            if permits.is_empty() {
                continue;
            }
            let asked = permits.len();
            // The claim may take more once it runs (see `ClaimRoom`): the
            // permits move into `held`, which the room tops up, and come
            // back out when the claim returns. The room runs inside the
            // store's claim, on this task, while `held` is not otherwise
            // touched; the lock is never held across an await.
            let held = Arc::new(std::sync::Mutex::new(std::mem::take(&mut permits)));
            let room = {
                let held = held.clone();
                let control = self.control.clone();
                let most = self.claim_max.min(control.workers()).max(asked);
                ClaimRoom::new(most, move || {
                    let mut held = held.lock().unwrap_or_else(|e| e.into_inner());
                    control.top_up(&mut held, most);
                    held.len()
                })
            };
            // Read once per claim: the watcher may change them any time.
            let limits = self.control.limits();
            let claimed = self
                .store
                .task_claim(ClaimParams {
                    queue: self.queue.clone(),
                    node: self.shared.node.clone(),
                    limit: asked,
                    now: Utc::now(),
                    limits,
                    room: Some(room),
                })
                .await;
            let mut permits = std::mem::take(&mut *held.lock().unwrap_or_else(|e| e.into_inner()));
            let wanted = permits.len();
            match claimed {
                Ok(tasks) => {
                    backoff = Duration::from_millis(50);
                    let got = tasks.len();
                    Counters::add(&self.shared.counters.claimed, got as u64);
                    for task in tasks {
                        let Some(permit) = permits.pop() else { break };
                        if self.jobs.send(Job { task, permit }).await.is_err() {
                            return;
                        }
                    }
                    drop(permits);
                    if got == wanted {
                        continue; // likely more waiting
                    }
                    if got > 0 && limits.is_some() {
                        // What this claim took may have filled a key's limit;
                        // the next claim looks past that key's backlog.
                        continue;
                    }
                    // A limited queue frees up when tasks finish on any node,
                    // which sends no wake-up: look again soon.
                    let pause = match limits {
                        Some(_) => self.poll_interval.min(Duration::from_millis(50)),
                        None => self.poll_interval,
                    };
                    // The queue had fewer due tasks than free workers: until
                    // a wake-up says otherwise, this pool's client may start
                    // what it enqueues (see `handoff.rs`).
                    self.control.idle.store(true, Ordering::Release);
                    tokio::select! {
                        _ = &mut notified => {},
                        _ = &mut written, if limits.is_some() => {},
                        _ = tokio::time::sleep(pause) => {},
                        _ = stop.cancelled() => return,
                    }
                    self.control.idle.store(false, Ordering::Release);
                }
                Err(e) => {
                    drop(permits);
                    tracing::warn!(queue = %self.queue, error = %e, "claim failed; backing off");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {},
                        _ = stop.cancelled() => return,
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }
}
