//! Wake-ups between nodes: one coalesced NOTIFY sender and one LISTEN
//! connection per store, reconnected with backoff.
//!
//! NOTIFY takes a cluster-wide lock until commit, so it is never sent per
//! row or from a trigger: everything queued while one NOTIFY is in flight
//! goes out as one. Producers also poll, so a lost notification delays work
//! by at most the poll interval.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use deadpool_postgres::Pool;
use futures::StreamExt;
use tokio::sync::{Notify, broadcast, mpsc};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{db_err, pool_err};
use crate::store::{StoreError, StoreEvent};
use crate::task::TaskId;

/// The payload that says "new due work".
pub(super) const WORK: &str = "work";

/// The payload that asks the node running `id` to stop it.
pub(super) fn cancel_payload(id: TaskId, node: Option<&str>) -> String {
    format!("cancel:{}:{}", id.0, node.unwrap_or_default())
}

pub(super) fn channel_name(schema: &str) -> String {
    format!("{schema}_events")
}

/// Sends queued notifications, coalesced: everything queued while one
/// NOTIFY was in flight goes out as one, and at most one per 2 ms.
pub(super) async fn notify_loop(
    pool: Pool,
    channel: String,
    mut rx: mpsc::UnboundedReceiver<String>,
    stop: CancellationToken,
) {
    let mut batch = Vec::new();
    loop {
        tokio::select! {
            n = rx.recv_many(&mut batch, 1024) => if n == 0 { return },
            _ = stop.cancelled() => return,
        }
        let payloads: HashSet<String> = batch.drain(..).collect();
        let sent = async {
            let c = pool.get().await.map_err(pool_err)?;
            for p in &payloads {
                c.execute("SELECT pg_notify($1, $2)", &[&channel, p])
                    .await
                    .map_err(db_err)?;
            }
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

/// Keeps one LISTEN connection open, reconnecting with backoff; turns
/// notifications into local wake-ups and events.
pub(super) async fn listen_loop(
    cfg: tokio_postgres::Config,
    channel: String,
    notify: Arc<Notify>,
    events: broadcast::Sender<StoreEvent>,
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
                if let Err(e) = client.batch_execute(&format!("LISTEN {channel}")).await {
                    tracing::warn!(error = %e, "LISTEN failed; retrying");
                } else {
                    backoff = Duration::from_millis(100);
                    // Anything sent while we were not listening is lost: look now.
                    notify.notify_waiters();
                    loop {
                        tokio::select! {
                            _ = stop.cancelled() => { driver.abort(); return; }
                            p = rx.recv() => match p {
                                Some(p) => handle_payload(&p, &notify, &events),
                                None => break,
                            },
                        }
                    }
                    tracing::warn!("LISTEN connection lost; reconnecting");
                }
                driver.abort();
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

fn handle_payload(p: &str, notify: &Notify, events: &broadcast::Sender<StoreEvent>) {
    if p == WORK {
        notify.notify_waiters();
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
