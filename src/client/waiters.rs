//! Waiting for tasks to finish without asking the store while waiting.
//!
//! A waiter registers its task's id here, reads the task once, and then
//! sleeps until it is handed its finished task or its deadline passes (then
//! it reads once more). Finishes come from the store's
//! [`StoreEvent::Finished`] events: the writer of an outcome announces the
//! tasks it finished in its own process at once, and (on PostgreSQL) to
//! every other node through one coalesced NOTIFY per outcome batch. The
//! dispatcher reads the announced tasks that someone waits for in one read
//! per event, however many waiters, and hands each waiter its task.
//!
//! Other processes announce finishes only while some process has said it
//! waits ([`Store::announce_waiting`]): a waiter says so (unless its
//! process said it in the last [`ANNOUNCE_AGAIN`]) after registering and
//! before its first read, and the dispatcher says it again while anyone
//! waits.
//!
//! An event can be missed: a lagging receiver, a LISTEN connection that was
//! down, a finish written by another process on the same SQLite file. For
//! those, the dispatcher asks the store which of *all* the waited ids are
//! still unfinished (one read, whatever the number of waiters) when the
//! store says events may have been lost, and every [`FALLBACK_POLL`]
//! otherwise, and hands over the others the same way.
//!
//! # Invariants
//!
//! - A waiter registers before its first read. A finish committed after
//!   that read is announced after its commit, so it finds the registration;
//!   a `watch` channel keeps the value until the waiter looks, so a hand-over
//!   while the waiter is reading is not lost.
//! - The dispatcher subscribes to the store's events before the first
//!   waiter registers (in [`Waiters::register`]), so no event sent after a
//!   registration is missed by the dispatcher either.
//! - Only the dispatcher's reads send on an entry's channel; what they send
//!   is a finished task, or `None` ("read it yourself") when the task is gone
//!   or the read failed. A waiter never trusts anything else.
//! - `map` is a std mutex, held only to insert, remove or look up entries,
//!   never across an await.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::Duration;

use tokio::sync::{broadcast, watch};

use crate::store::{Store, StoreEvent};
use crate::task::{Task, TaskId};

/// How often the dispatcher looks at the store for finishes it was not told
/// about, while anyone waits.
pub const FALLBACK_POLL: Duration = Duration::from_secs(2);

/// How long the store is told this process waits (see
/// [`Store::announce_waiting`]); said again by the dispatcher while anyone
/// waits, once [`ANNOUNCE_AGAIN`] has passed.
const ANNOUNCE_SPAN: Duration = Duration::from_secs(30);

/// How old an announcement may be before waiters say it again. Far inside
/// [`ANNOUNCE_SPAN`], so clocks that run at different rates, or a slow
/// round trip, never leave a waiter unannounced.
const ANNOUNCE_AGAIN: Duration = Duration::from_secs(10);

/// What a waiter is handed: its finished task, or `None` to read it itself.
pub(crate) type Handed = Option<Arc<Task>>;

struct Entry {
    wake: watch::Sender<Handed>,
    /// Registrations of this id alive now.
    count: usize,
}

/// The waiters of one [`Client`](super::Client) and its clones.
pub(crate) struct Waiters {
    store: Arc<dyn Store>,
    map: Mutex<HashMap<TaskId, Entry>>,
    /// Set once the dispatcher runs.
    dispatcher: OnceLock<()>,
    /// When the store was last told that this process waits. A Tokio
    /// mutex, held across that call, so waiters arriving together wait for
    /// one announcement rather than each making their own.
    announced: tokio::sync::Mutex<Option<tokio::time::Instant>>,
}

/// A waiter's place in the hub; leaving it (drop) removes the id when no
/// other waiter waits for it.
pub(crate) struct Registration {
    hub: Arc<Waiters>,
    id: TaskId,
    pub(crate) woken: watch::Receiver<Handed>,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Ok(mut map) = self.hub.map.lock()
            && let Some(e) = map.get_mut(&self.id)
        {
            e.count -= 1;
            if e.count == 0 {
                map.remove(&self.id);
            }
        }
    }
}

impl Waiters {
    pub(crate) fn new(store: Arc<dyn Store>) -> Arc<Self> {
        Arc::new(Waiters {
            store,
            map: Mutex::new(HashMap::new()),
            dispatcher: OnceLock::new(),
            announced: tokio::sync::Mutex::new(None),
        })
    }

    /// Register a waiter for `id`. Call inside a Tokio runtime.
    pub(crate) fn register(self: &Arc<Self>, id: TaskId) -> Registration {
        self.dispatcher.get_or_init(|| {
            // Subscribe here, before the first registration (see the invariants).
            let events = self.store.subscribe();
            tokio::spawn(dispatch(Arc::downgrade(self), events));
        });
        let woken = match self.map.lock() {
            Ok(mut map) => {
                let e = map.entry(id).or_insert_with(|| Entry {
                    wake: watch::channel(None).0,
                    count: 0,
                });
                e.count += 1;
                e.wake.subscribe()
            }
            // Poisoned (a panic while holding it, which the code above cannot
            // do): a receiver that is never woken leaves the deadline read.
            Err(_) => watch::channel(None).1,
        };
        Registration {
            hub: self.clone(),
            id,
            woken,
        }
    }

    /// Tell the store this process waits, unless it was told recently.
    /// A waiter calls it after registering and before its first read: a
    /// finish committed after that read is then announced here (see
    /// `notify_many` in the PostgreSQL store). A failure is logged and left
    /// to the fallback poll.
    pub(crate) async fn announce(&self) {
        let mut at = self.announced.lock().await;
        if at.is_some_and(|t| t.elapsed() < ANNOUNCE_AGAIN) {
            return;
        }
        match self.store.announce_waiting(ANNOUNCE_SPAN).await {
            Ok(()) => *at = Some(tokio::time::Instant::now()),
            Err(e) => tracing::debug!(error = %e, "telling the store this process waits failed"),
        }
    }

    /// How many tasks are waited for now.
    pub(crate) fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    /// The ids of `ids` that someone waits for.
    fn waited(&self, ids: &[TaskId]) -> Vec<TaskId> {
        match self.map.lock() {
            Ok(map) if !map.is_empty() => ids
                .iter()
                .copied()
                .filter(|i| map.contains_key(i))
                .collect(),
            _ => Vec::new(),
        }
    }

    /// Read `ids` (all waited for, believed finished) in one read and hand
    /// each waiter its task. A task not finished (a stale event: retried
    /// since) is not handed; a missing one, or a failed read, tells the
    /// waiters to read for themselves.
    async fn hand_over(&self, ids: Vec<TaskId>) {
        if ids.is_empty() {
            return;
        }
        let read = self.store.task_get_many(ids.clone()).await;
        let Ok(map) = self.map.lock() else { return };
        let send = |id: &TaskId, v: Handed| {
            if let Some(e) = map.get(id) {
                e.wake.send_replace(v);
            }
        };
        match read {
            Ok(tasks) => {
                let mut missing: HashSet<TaskId> = ids.into_iter().collect();
                for t in tasks {
                    let id = t.id;
                    missing.remove(&id);
                    if t.state.is_finished() {
                        send(&id, Some(Arc::new(t)));
                    }
                }
                for id in &missing {
                    send(id, None);
                }
            }
            Err(e) => {
                tracing::debug!(error = %e, "reading finished tasks for their waiters failed");
                for id in &ids {
                    send(id, None);
                }
            }
        }
    }

    /// One read for all waited ids; hand over those that finished (or are gone).
    async fn poll(&self) {
        let ids: Vec<TaskId> = match self.map.lock() {
            Ok(m) if !m.is_empty() => m.keys().copied().collect(),
            _ => return,
        };
        match self.store.task_unfinished(ids.clone()).await {
            Ok(open) => {
                let open: HashSet<TaskId> = open.into_iter().collect();
                let done: Vec<TaskId> = ids.into_iter().filter(|i| !open.contains(i)).collect();
                self.hand_over(done).await;
            }
            // The next poll tries again; each waiter still reads at its deadline.
            Err(e) => tracing::debug!(error = %e, "the waiters' fallback poll failed"),
        }
    }
}

/// Turns store events into wake-ups, and polls when events may be missing.
/// Ends when the hub is gone.
async fn dispatch(hub: Weak<Waiters>, mut events: broadcast::Receiver<StoreEvent>) {
    let mut tick = tokio::time::interval(FALLBACK_POLL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let poll = tokio::select! {
            ev = events.recv() => match ev {
                Ok(StoreEvent::Finished { ids }) => {
                    let Some(h) = hub.upgrade() else { return };
                    let waited = h.waited(&ids);
                    if !waited.is_empty() {
                        // Off the loop: the next event need not wait for this read.
                        tokio::spawn(async move { h.hand_over(waited).await });
                    }
                    false
                }
                Ok(StoreEvent::Missed) | Err(broadcast::error::RecvError::Lagged(_)) => true,
                Ok(StoreEvent::CancelRequested { .. } | StoreEvent::SettingsChanged) => false,
                Err(broadcast::error::RecvError::Closed) => {
                    let Some(h) = hub.upgrade() else { return };
                    events = h.store.subscribe();
                    true
                }
            },
            _ = tick.tick() => true,
        };
        let Some(h) = hub.upgrade() else { return };
        if poll {
            if h.len() > 0 {
                h.announce().await;
            }
            h.poll().await;
        }
    }
}
