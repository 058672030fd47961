//! Wake-ups between nodes: one coalesced NOTIFY sender and one LISTEN
//! connection per store, reconnected with backoff.
//!
//! NOTIFY takes a cluster-wide lock until commit, so it is never sent per
//! row or from a trigger: everything queued while one NOTIFY is in flight
//! goes out as one. Producers also poll, so a lost notification delays work
//! by at most the poll interval.

use std::collections::{BTreeSet, HashSet};
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::{ClientWrapper, Pool};
use futures::StreamExt;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{db_err, pool_err};
use chrono::{DateTime, Utc};

use super::wake::Membership;
use crate::store::due::DueTimer;
use crate::store::{StoreError, StoreEvent};
use crate::task::TaskId;

/// The payload that says "new due work", from a caller's own transaction
/// (`insert_in`): every listener wakes.
pub(super) const WORK: &str = "work";

/// "New due work" from a store, which woke its own producers at once: its
/// own listener skips it (`work:<origin>`), every other wakes.
pub(super) fn work_payload(origin: &str) -> String {
    format!("{WORK}:{origin}")
}

/// Most queues one insert announces with counts; past it the insert wakes
/// every node instead.
const MAX_COUNTED_QUEUES: usize = 16;

/// "`n` new due tasks of `queue`" from a store: `work:<origin>:<nonce>:<n>:<queue>`
/// (the queue last, so any name fits). Each listener wakes only if chosen
/// (see `wake.rs`); `nonce` spreads the choice. `None`: too many queues, or a
/// name too long for a payload; then [`work_payload`] wakes every node.
pub(super) fn counted_work_payloads(
    origin: &str,
    counts: &std::collections::BTreeMap<String, usize>,
) -> Option<Vec<String>> {
    if counts.len() > MAX_COUNTED_QUEUES {
        return None;
    }
    let nonce = rand::random::<u32>();
    counts
        .iter()
        .map(|(q, n)| {
            let p = format!("{WORK}:{origin}:{nonce}:{n}:{q}");
            (p.len() <= MAX_PAYLOAD).then_some(p)
        })
        .collect()
}

/// The payload that says "a queue's settings changed": every pool reads
/// them again.
pub(super) const SETTINGS: &str = "settings";

/// The payload that asks the node running `id` to stop it.
pub(super) fn cancel_payload(id: TaskId, node: Option<&str>) -> String {
    format!("cancel:{}:{}", id.0, node.unwrap_or_default())
}

/// The prefix of a payload that lists finished tasks: `done:1,2,3`.
const DONE: &str = "done:";

/// Longest payload sent: PostgreSQL refuses one of 8000 bytes or more.
const MAX_PAYLOAD: usize = 7900;

/// `ids` as `done:<origin>:1,2,3` payloads, each under [`MAX_PAYLOAD`]
/// bytes (a batch of 2000 outcomes with 8-digit ids takes three). `origin`
/// names the sending store, whose own listener skips it: its process heard
/// of these finishes at commit.
pub(super) fn done_payloads(origin: &str, ids: &[TaskId]) -> Vec<String> {
    let head = format!("{DONE}{origin}:");
    let mut out = Vec::new();
    let mut p = head.clone();
    for id in ids {
        let s = id.0.to_string();
        if p.len() + s.len() + 1 > MAX_PAYLOAD {
            out.push(std::mem::replace(&mut p, head.clone()));
        }
        if p.len() > head.len() {
            p.push(',');
        }
        p.push_str(&s);
    }
    if p.len() > head.len() {
        out.push(p);
    }
    out
}

/// The prefix of a payload that lists instants (ms since the epoch) at
/// which tasks inserted for later fall due: `due:<origin>:1764...,1764...`.
const DUE: &str = "due:";

/// Most instants one `due:` payload carries: the earliest of a batch.
/// Tasks due at others start when a producer next polls, or when an
/// earlier wake-up finds them due.
const MAX_DUE: usize = 100;

/// The earliest distinct instants of `times` as one `due:` payload.
pub(super) fn due_payload(origin: &str, times: &[DateTime<Utc>]) -> Option<String> {
    let ms: BTreeSet<i64> = times.iter().map(|t| t.timestamp_millis()).collect();
    if ms.is_empty() {
        return None;
    }
    let list: Vec<String> = ms.iter().take(MAX_DUE).map(|m| m.to_string()).collect();
    Some(format!("{DUE}{origin}:{}", list.join(",")))
}

pub(super) fn channel_name(schema: &str) -> String {
    format!("{schema}_events")
}

/// Where the notifier sends, and how.
pub(super) struct Sender {
    pub pool: Pool,
    pub channel: String,
    /// `Sql::notify_many`.
    pub sql: String,
    /// This store's mark (see `Hearer::origin`).
    pub origin: String,
}

/// Sends queued notifications, coalesced: everything queued while one
/// NOTIFY was in flight goes out as one, and at most one per 2 ms.
pub(super) async fn notify_loop(
    sender: Sender,
    mut rx: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    let Sender {
        pool,
        channel,
        sql,
        origin,
    } = sender;
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 1024) => if n == 0 { return },
            _ = stop.cancelled() => return,
        }
        let mut seen = HashSet::new();
        let payloads: Vec<String> = batch.drain(..).filter(|p| seen.insert(p.clone())).collect();
        // One statement, so one transaction, for everything queued. Lists
        // of finished tasks go out only while another process waits (see
        // `Sql::notify_many`).
        let sent = async {
            let c = pool.get().await.map_err(pool_err)?;
            // Typed and unnamed: one round trip, and nothing left on the
            // server connection (safe behind a transaction pooler).
            c.execute_typed(
                &sql,
                &[
                    (&channel, Type::TEXT),
                    (&payloads, Type::TEXT_ARRAY),
                    (&DONE, Type::TEXT),
                    (&origin, Type::TEXT),
                ],
            )
            .await
            .map_err(db_err)?;
            Ok::<_, StoreError>(())
        }
        .await;
        if let Err(e) = sent {
            // Polling covers a lost wake-up; cancel requests are also polled.
            tracing::debug!(error = %e, "NOTIFY failed");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// The listening connection while it is up, for heartbeats (see
/// `PostgresStore::node_heartbeat`): a connection no claim, completion or
/// page ever holds, so a heartbeat never waits for one. The listen loop
/// alone puts it here and takes it away (at once when the connection is
/// lost); a heartbeat clones the `Arc` and runs one short statement or two.
/// A std mutex: held only to read or replace the slot.
#[derive(Default)]
pub(super) struct BeatConn(std::sync::Mutex<Option<Arc<ClientWrapper>>>);

impl BeatConn {
    /// The listening connection, if it is up.
    pub(super) fn get(&self) -> Option<Arc<ClientWrapper>> {
        let c = self.0.lock().ok()?.clone()?;
        (!c.is_closed()).then_some(c)
    }

    fn set(&self, c: Option<Arc<ClientWrapper>>) {
        if let Ok(mut slot) = self.0.lock() {
            *slot = c;
        }
    }
}

/// What a store does with what its listener hears.
pub(super) struct Hearer {
    /// This store's mark: its own payloads are skipped.
    pub origin: String,
    pub members: Arc<Membership>,
    pub due: DueTimer,
    pub notify: Arc<Notify>,
    pub events: broadcast::Sender<StoreEvent>,
    /// Counts the settings changes heard: a handle's cache of capped and
    /// round-robin queues is read again once it moves.
    pub settings_epoch: Arc<std::sync::atomic::AtomicU64>,
    /// Where the listening connection is lent to heartbeats.
    pub beat: Arc<BeatConn>,
}

/// Keeps one LISTEN connection open, reconnecting with backoff; turns
/// notifications into local wake-ups and events.
pub(super) async fn listen_loop(
    cfg: tokio_postgres::Config,
    channel: String,
    hearer: Hearer,
    stop: CancellationToken,
) {
    let mut backoff = Duration::from_millis(100);
    loop {
        if stop.is_cancelled() {
            return;
        }
        match cfg.connect(NoTls).await {
            Ok((client, mut connection)) => {
                let (tx, mut rx) = mpsc::unbounded_channel();
                let driver = tokio::spawn(async move {
                    let mut messages =
                        futures::stream::poll_fn(move |cx| connection.poll_message(cx));
                    while let Some(m) = messages.next().await {
                        match m {
                            Ok(AsyncMessage::Notification(n)) => {
                                let _ = tx.send(n.payload().to_string());
                            }
                            Ok(_) => {}
                            Err(_) => break,
                        }
                    }
                });
                // Dropping the last handle of the wrapper ends the driver.
                let client = Arc::new(ClientWrapper::new(client, driver));
                if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                } else {
                    backoff = Duration::from_millis(100);
                    hearer.beat.set(Some(client.clone()));
                    // Anything sent while we were not listening is lost: look now.
                    hearer.notify.notify_waiters();
                    let _ = hearer.events.send(StoreEvent::Missed);
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => { hearer.beat.set(None); return; }
                            p = rx.recv() => match p {
                                Some(p) => handle_payload(&p, &hearer),
                                None => break,
                            },
                        }
                    }
                    hearer.beat.set(None);
                    tracing::warn!("LISTEN connection lost; reconnecting");
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, backoff_ms = backoff.as_millis() as u64, "LISTEN connect failed")
            }
        }
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {},
            _ = stop.cancelled() => return,
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn handle_payload(p: &str, h: &Hearer) {
    let Hearer {
        origin,
        members,
        due,
        notify,
        events,
        settings_epoch,
        beat: _,
    } = h;
    if p == WORK {
        notify.notify_waiters();
    } else if p == SETTINGS {
        settings_epoch.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        let _ = events.send(StoreEvent::SettingsChanged);
    } else if let Some(rest) = p.strip_prefix(WORK).and_then(|r| r.strip_prefix(':')) {
        let mut parts = rest.splitn(4, ':');
        let from = parts.next().unwrap_or_default();
        if from == origin {
            return;
        }
        let counted = match (parts.next(), parts.next(), parts.next()) {
            (Some(nonce), Some(n), Some(queue)) => nonce
                .parse::<u64>()
                .ok()
                .zip(n.parse::<usize>().ok())
                .map(|(nonce, n)| (queue, n, nonce)),
            _ => None,
        };
        let wake = match counted {
            Some((queue, n, nonce)) => members.should_wake(queue, n, nonce),
            None => true,
        };
        if wake {
            notify.notify_waiters();
        }
    } else if let Some(rest) = p.strip_prefix(DUE) {
        let (from, list) = rest.split_once(':').unwrap_or(("", rest));
        if from != origin {
            // Rounded down to the ms by the sender: wake a ms later.
            due.at(list.split(',').filter_map(|s| {
                s.parse::<i64>()
                    .ok()
                    .and_then(|ms| DateTime::from_timestamp_millis(ms + 1))
            }));
        }
    } else if let Some(rest) = p.strip_prefix(DONE) {
        let (from, list) = rest.split_once(':').unwrap_or(("", rest));
        if from == origin {
            return;
        }
        let ids: Arc<[TaskId]> = list
            .split(',')
            .filter_map(|s| s.parse().ok().map(TaskId))
            .collect();
        if !ids.is_empty() {
            let _ = events.send(StoreEvent::Finished { ids });
        }
    } else if let Some(rest) = p.strip_prefix("cancel:") {
        let (id, node) = rest.split_once(':').unwrap_or((rest, ""));
        if let Ok(id) = id.parse::<i64>() {
            let _ = events.send(StoreEvent::CancelRequested {
                id: TaskId(id),
                node: (!node.is_empty()).then(|| node.to_string()),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_payloads_stay_under_the_limit_and_keep_every_id() {
        let ids: Vec<TaskId> = (10_000_000..10_002_000).map(TaskId).collect();
        let payloads = done_payloads("a1b2", &ids);
        assert_eq!(payloads.len(), 3, "2000 8-digit ids fit three payloads");
        let mut back = Vec::new();
        for p in &payloads {
            assert!(p.len() < 8000, "{} bytes", p.len());
            let list = p.strip_prefix("done:a1b2:").expect("prefix");
            back.extend(list.split(',').map(|s| TaskId(s.parse().expect("id"))));
        }
        assert_eq!(back, ids);
        assert!(done_payloads("a1b2", &[]).is_empty());
    }
}
