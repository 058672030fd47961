//! Claiming due tasks from SQLite, with and without cluster-wide limits.
//!
//! The writer thread is the only writer, so counting running tasks and
//! claiming in separate statements cannot race another claimer.

use rusqlite::{Connection, OptionalExtension, params};

use super::rows::fetch_tasks;
use super::writer::sql_err;
use crate::store::lifecycle::{self, CLAIM_ORDER};
use crate::store::{ClaimParams, QueueLimits, StoreError, TASK_COLUMNS, to_micros};
use crate::task::Task;

/// The claim: due tasks of the queue (unless it is paused), most urgent
/// first, under each limit the stored settings set, else the claimer's own
/// (see [`effective_limits`]).
pub(super) fn claim(conn: &Connection, p: &ClaimParams) -> Result<Vec<Task>, StoreError> {
    match effective_limits(conn, p)? {
        Some(limits) => claim_limited(conn, p, limits),
        None => fetch_tasks(
            conn,
            &format!(
                "UPDATE tasks SET state = 'running', attempt = attempt + 1, \
                 claim_token = claim_token + 1, node = ?1, started_at = ?2, cancel_requested = 0 \
                 WHERE id IN (SELECT id FROM tasks WHERE queue = ?3 \
                   AND state IN ({claimable}) AND run_at <= ?2 \
                   AND NOT EXISTS (SELECT 1 FROM queues WHERE name = ?3 AND paused = 1) \
                   ORDER BY {CLAIM_ORDER} LIMIT ?4) \
                 RETURNING {TASK_COLUMNS}",
                claimable = lifecycle::sql_states(&lifecycle::CLAIMABLE),
            ),
            params![p.node, to_micros(p.now), p.queue, p.limit as i64],
        ),
    }
}

/// The limits `p`'s claim applies: each one the queue's stored settings
/// set, else the claimer's own. So a limit set or changed by another
/// process holds from the moment it is written, before this one reads it
/// (at its next poll); one removed there holds on, the safe way, until
/// this one has read that. (The settings watcher gives claimers the stored
/// limits once it has read them, so this only matters in between.)
fn effective_limits(conn: &Connection, p: &ClaimParams) -> Result<Option<QueueLimits>, StoreError> {
    let stored: Option<String> = conn
        .prepare_cached("SELECT limits FROM queue_settings WHERE queue = ?1")
        .and_then(|mut st| st.query_row([&p.queue], |r| r.get(0)).optional())
        .map_err(sql_err)?
        .flatten();
    let own = p.limits.unwrap_or_default();
    let stored = super::cluster::parse_limits(&p.queue, stored.as_deref())?
        .limits()
        .unwrap_or_default();
    let l = QueueLimits {
        global_concurrency: stored.global_concurrency.or(own.global_concurrency),
        per_key_concurrency: stored.per_key_concurrency.or(own.per_key_concurrency),
        rate: stored.rate.or(own.rate),
        round_robin: stored.round_robin || own.round_robin,
    };
    Ok((!l.is_empty()).then_some(l))
}

/// Claim under cluster-wide limits: no more than the queue's free global
/// slots, its rate window's remaining starts, and per key its free slots.
fn claim_limited(
    conn: &Connection,
    p: &ClaimParams,
    limits: QueueLimits,
) -> Result<Vec<Task>, StoreError> {
    let now = to_micros(p.now);
    let claimable = lifecycle::sql_states(&lifecycle::CLAIMABLE);
    let mut allowed = p.limit as i64;
    if let Some(g) = limits.global_concurrency {
        let running: i64 = conn
            .prepare_cached("SELECT count(*) FROM tasks WHERE queue = ?1 AND state = 'running'")
            .and_then(|mut st| st.query_row([&p.queue], |r| r.get(0)))
            .map_err(sql_err)?;
        allowed = allowed.min(i64::from(g) - running);
    }
    let mut window: Option<(i64, i64)> = None;
    if let Some((max, per)) = limits.rate {
        let row: Option<(i64, i64)> = conn
            .prepare_cached("SELECT window_start, started FROM queue_rate WHERE queue = ?1")
            .and_then(|mut st| {
                st.query_row([&p.queue], |r| Ok((r.get(0)?, r.get(1)?)))
                    .optional()
            })
            .map_err(sql_err)?;
        let per = i64::try_from(per.as_micros()).unwrap_or(i64::MAX);
        let (start, started) = match row {
            Some((start, started)) if now - start < per => (start, started),
            _ => (now, 0),
        };
        allowed = allowed.min(i64::from(max) - started);
        window = Some((start, started));
    }
    if allowed <= 0 {
        return Ok(Vec::new());
    }
    let per_key = limits
        .per_key_concurrency
        .map(i64::from)
        .unwrap_or(i64::MAX);
    // Look a bounded way down the queue for tasks whose keys have room;
    // without a per-key limit the first `allowed` tasks are the answer.
    let scan = if limits.per_key_concurrency.is_some() {
        allowed * 2 + 16
    } else {
        allowed
    };
    // Round robin: (priority, fair_seq, id) through tasks_fair, which holds
    // only tasks with a fair_seq (see Store::queue_fair_adopt).
    let (order, picked_order, only_fair) = if limits.round_robin {
        (
            "priority, fair_seq, id",
            "c.priority, c.fair_seq, c.id",
            " AND fair_seq IS NOT NULL",
        )
    } else {
        (CLAIM_ORDER, "c.priority, c.run_at, c.id", "")
    };
    let picked: Vec<(i64, Option<i64>)> = conn
        .prepare_cached(&format!(
            "SELECT c.id, c.fair_seq FROM ( \
               SELECT id, priority, run_at, concurrency_key, fair_seq, \
                 row_number() OVER (PARTITION BY concurrency_key ORDER BY {order}) AS rk \
               FROM (SELECT id, priority, run_at, concurrency_key, fair_seq FROM tasks WHERE queue = ?1 \
                       AND state IN ({claimable}) AND run_at <= ?2{only_fair} \
                       AND NOT EXISTS (SELECT 1 FROM queues WHERE name = ?1 AND paused = 1) \
                       AND (concurrency_key IS NULL OR concurrency_key NOT IN ( \
                         SELECT concurrency_key FROM tasks WHERE queue = ?1 AND state = 'running' \
                           AND concurrency_key IS NOT NULL GROUP BY concurrency_key HAVING count(*) >= ?4)) \
                     ORDER BY {order} LIMIT ?3)) c \
             LEFT JOIN (SELECT concurrency_key AS k, count(*) AS n FROM tasks \
                        WHERE queue = ?1 AND state = 'running' AND concurrency_key IS NOT NULL \
                        GROUP BY concurrency_key) r ON r.k = c.concurrency_key \
             WHERE c.concurrency_key IS NULL OR c.rk + coalesce(r.n, 0) <= ?4 \
             ORDER BY {picked_order} LIMIT ?5"
        ))
        .and_then(|mut st| {
            st.query_map(params![p.queue, now, scan, per_key, allowed], |r| {
                Ok((r.get(0)?, r.get(1)?))
            })?
            .collect::<Result<Vec<_>, _>>()
        })
        .map_err(sql_err)?;
    if picked.is_empty() {
        return Ok(Vec::new());
    }
    let ids: Vec<i64> = picked.iter().map(|(id, _)| *id).collect();
    let ids_json = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
    let tasks = fetch_tasks(
        conn,
        &format!(
            "UPDATE tasks SET state = 'running', attempt = attempt + 1, \
             claim_token = claim_token + 1, node = ?1, started_at = ?2, \
             cancel_requested = 0 WHERE id IN (SELECT value FROM json_each(?3)) \
             AND state IN ({claimable}) RETURNING {TASK_COLUMNS}"
        ),
        params![p.node, now, ids_json],
    )?;
    if limits.round_robin
        && let Some(top) = picked.iter().filter_map(|(_, seq)| *seq).max()
    {
        conn.prepare_cached(
            "INSERT INTO queue_fair (queue, vtime) VALUES (?1, ?2) \
             ON CONFLICT (queue) DO UPDATE SET vtime = max(vtime, excluded.vtime)",
        )
        .and_then(|mut st| st.execute(params![p.queue, top]))
        .map_err(sql_err)?;
    }
    if let Some((start, started)) = window {
        conn.prepare_cached(
            "INSERT INTO queue_rate (queue, window_start, started) VALUES (?1, ?2, ?3) \
             ON CONFLICT (queue) DO UPDATE SET window_start = excluded.window_start, started = excluded.started",
        )
        .and_then(|mut st| st.execute(params![p.queue, start, started + tasks.len() as i64]))
        .map_err(sql_err)?;
    }
    Ok(tasks)
}
