//! The small tables of a SQLite store: paused queues, cron schedules,
//! nodes and the leader lease.

use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::insert::insert_all;
use super::rows::queue_counts_sql;
use super::writer::sql_err;
use crate::store::{
    FINISHED_COUNT_CAP, Inserted, NodeInfo, QUEUE_COUNT_CAP, ScheduleFire, ScheduleRow, StoreError,
    from_micros, parse_state, to_micros,
};
use crate::task::TaskState;

pub(super) fn queue_counts(conn: &Connection) -> Result<Vec<(String, TaskState, i64)>, StoreError> {
    let mut st = conn.prepare_cached(&queue_counts_sql()).map_err(sql_err)?;
    let rows = st
        .query_map([QUEUE_COUNT_CAP, FINISHED_COUNT_CAP], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?, r.get(2)?))
        })
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    rows.into_iter()
        .map(|(q, s, n)| Ok((q, parse_state(&s)?, n)))
        .collect()
}

/// The two statements of [`queue_oldest_due`]: the next (queue, priority)
/// pair with claimable tasks after `(?1, ?2)`, and the earliest `run_at`
/// of the pair `(?1, ?2)`.
pub(super) fn oldest_due_sql() -> [String; 2] {
    let claimable = crate::store::lifecycle::sql_states(&crate::store::lifecycle::CLAIMABLE);
    [
        format!(
            "SELECT queue, priority FROM tasks WHERE state IN ({claimable}) \
             AND (queue, priority) > (?1, ?2) ORDER BY queue, priority LIMIT 1"
        ),
        format!(
            "SELECT run_at FROM tasks WHERE state IN ({claimable}) \
             AND queue = ?1 AND priority = ?2 ORDER BY run_at LIMIT 1"
        ),
    ]
}

/// See [`Store::queue_oldest_due`](crate::store::Store::queue_oldest_due):
/// a skip scan of the claim index over (queue, priority), then the earliest
/// `run_at` of each pair, one index probe each.
pub(super) fn queue_oldest_due(
    conn: &Connection,
    now: i64,
) -> Result<Vec<(String, i64)>, StoreError> {
    let [next, earliest] = oldest_due_sql();
    let mut next = conn.prepare_cached(&next).map_err(sql_err)?;
    let mut earliest = conn.prepare_cached(&earliest).map_err(sql_err)?;
    let mut due: Vec<(String, i64)> = Vec::new();
    // Below every real (queue, priority): the empty name sorts first and
    // priorities are i16.
    let (mut q, mut p) = (String::new(), i64::from(i16::MIN) - 1);
    loop {
        let pair: Option<(String, i64)> = next
            .query_row(params![q, p], |r| Ok((r.get(0)?, r.get(1)?)))
            .optional()
            .map_err(sql_err)?;
        let Some((nq, np)) = pair else { break };
        let at: i64 = earliest
            .query_row(params![nq, np], |r| r.get(0))
            .map_err(sql_err)?;
        if at <= now {
            due.push((nq.clone(), at));
        }
        (q, p) = (nq, np);
    }
    Ok(crate::store::earliest_per_queue(due))
}

pub(super) fn queue_set_paused(
    conn: &Connection,
    queue: &str,
    paused: bool,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO queues (name, paused) VALUES (?1, ?2) \
         ON CONFLICT (name) DO UPDATE SET paused = excluded.paused",
    )
    .and_then(|mut st| st.execute(params![queue, paused]))
    .map_err(sql_err)?;
    Ok(())
}

pub(super) fn queue_paused(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut st = conn
        .prepare_cached("SELECT name FROM queues WHERE paused = 1 ORDER BY name")
        .map_err(sql_err)?;
    st.query_map([], |r| r.get(0))
        .map_err(sql_err)?
        .collect::<Result<Vec<String>, _>>()
        .map_err(sql_err)
}

pub(super) fn schedule_upsert(
    conn: &Connection,
    row: &ScheduleRow,
    spec: &str,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO schedules (name, spec, source, last_tick) VALUES (?1, ?2, ?3, ?4) \
         ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, source = excluded.source",
    )
    .and_then(|mut st| {
        st.execute(params![
            row.name,
            spec,
            row.source,
            to_micros(row.last_tick)
        ])
    })
    .map_err(sql_err)?;
    Ok(())
}

pub(super) fn schedule_delete(conn: &Connection, name: &str) -> Result<bool, StoreError> {
    conn.execute("DELETE FROM schedules WHERE name = ?1", [name])
        .map(|n| n > 0)
        .map_err(sql_err)
}

/// A queue's stored `limits` column as settings (`max_depth` left out).
pub(super) fn parse_limits(
    queue: &str,
    limits: Option<&str>,
) -> Result<crate::store::QueueSettings, StoreError> {
    match limits {
        Some(l) => serde_json::from_str(l)
            .map_err(|e| StoreError::Schema(format!("queue_settings.limits of {queue:?}: {e}"))),
        None => Ok(crate::store::QueueSettings::default()),
    }
}

pub(super) fn queue_settings(
    conn: &Connection,
) -> Result<Vec<(String, crate::store::QueueSettings)>, StoreError> {
    let mut st = conn
        .prepare_cached("SELECT queue, max_depth, limits FROM queue_settings ORDER BY queue")
        .map_err(sql_err)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, Option<i64>>(1)?,
                r.get::<_, Option<String>>(2)?,
            ))
        })
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    rows.into_iter()
        .map(|(queue, max, limits)| {
            let mut s = parse_limits(&queue, limits.as_deref())?;
            s.max_depth = max.map(|m| u32::try_from(m).unwrap_or(0));
            Ok((queue, s))
        })
        .collect()
}

/// Write a queue's settings; with `only_if_absent`, a queue that has
/// settings keeps them (its limits are filled in only if never written).
pub(super) fn queue_settings_put(
    conn: &Connection,
    queue: &str,
    settings: crate::store::QueueSettings,
    only_if_absent: bool,
) -> Result<(), StoreError> {
    let limits = (!only_if_absent || settings.has_limits())
        .then(|| serde_json::to_string(&settings))
        .transpose()
        .map_err(|e| StoreError::invalid("settings", e.to_string()))?;
    let sql = if only_if_absent {
        "INSERT INTO queue_settings (queue, max_depth, limits) VALUES (?1, ?2, ?3) \
         ON CONFLICT (queue) DO UPDATE SET limits = excluded.limits WHERE queue_settings.limits IS NULL"
    } else {
        "INSERT INTO queue_settings (queue, max_depth, limits) VALUES (?1, ?2, ?3) \
         ON CONFLICT (queue) DO UPDATE SET max_depth = excluded.max_depth, limits = excluded.limits"
    };
    conn.execute(sql, params![queue, settings.max_depth, limits])
        .map(|_| ())
        .map_err(sql_err)
}

pub(super) fn schedule_set_paused(
    conn: &Connection,
    name: &str,
    paused: bool,
) -> Result<bool, StoreError> {
    conn.execute(
        "UPDATE schedules SET paused = ?1 WHERE name = ?2",
        params![paused, name],
    )
    .map(|n| n > 0)
    .map_err(sql_err)
}

pub(super) fn schedule_list(conn: &Connection) -> Result<Vec<ScheduleRow>, StoreError> {
    let mut st = conn
        .prepare_cached("SELECT name, spec, source, last_tick, paused FROM schedules ORDER BY name")
        .map_err(sql_err)?;
    let rows = st
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, String>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, bool>(4)?,
            ))
        })
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    rows.into_iter()
        .map(|(name, spec, source, last, paused)| {
            Ok(ScheduleRow {
                name,
                spec: serde_json::from_str(&spec)
                    .map_err(|e| StoreError::Schema(format!("schedules.spec: {e}")))?,
                source,
                last_tick: from_micros(last),
                paused,
            })
        })
        .collect()
}

/// Fire a schedule: move its `last_tick` if nobody else did, and insert its tasks.
pub(super) fn schedule_fire(
    conn: &Connection,
    f: &ScheduleFire,
    args: &[String],
) -> Result<Option<Vec<Inserted>>, StoreError> {
    let moved = conn
        .execute(
            "UPDATE schedules SET last_tick = ?1 WHERE name = ?2 AND last_tick = ?3",
            params![to_micros(f.new_last), f.name, to_micros(f.expected)],
        )
        .map_err(sql_err)?;
    if moved == 0 {
        return Ok(None);
    }
    insert_all(conn, &f.tasks, args, f.now).map(Some)
}

/// Write `n`'s row; with `only_own`, only while the name is unheld or held
/// by `n.instance`. True when the row was written.
pub(super) fn node_heartbeat(
    conn: &Connection,
    n: &NodeInfo,
    queues: &str,
    stats: &str,
    only_own: bool,
) -> Result<bool, StoreError> {
    let sql = format!(
        "INSERT INTO nodes (name, version, started_at, heartbeat_at, workers, workers_busy, queues, stats, instance, \
           schedules, kinds) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11) ON CONFLICT (name) DO UPDATE SET \
         version = excluded.version, started_at = excluded.started_at, \
         heartbeat_at = excluded.heartbeat_at, workers = excluded.workers, \
         workers_busy = excluded.workers_busy, queues = excluded.queues, stats = excluded.stats, \
         instance = excluded.instance, schedules = excluded.schedules, kinds = excluded.kinds \
         {} RETURNING name",
        if only_own {
            "WHERE nodes.instance = excluded.instance OR nodes.instance = ''"
        } else {
            ""
        }
    );
    conn.prepare_cached(&sql)
        .and_then(|mut st| {
            st.query_row(
                params![
                    n.name,
                    n.version,
                    to_micros(n.started_at),
                    to_micros(n.heartbeat_at),
                    n.workers,
                    n.workers_busy,
                    queues,
                    stats,
                    n.instance,
                    n.schedules
                        .as_ref()
                        .and_then(|v| serde_json::to_string(v).ok()),
                    n.kinds.as_ref().and_then(|v| serde_json::to_string(v).ok())
                ],
                |_| Ok(()),
            )
            .optional()
        })
        .map(|r| r.is_some())
        .map_err(sql_err)
}

/// See [`Store::node_register`](crate::store::Store::node_register).
pub(super) fn node_register(
    conn: &Connection,
    n: &NodeInfo,
    queues: &str,
    stats: &str,
    live_since: DateTime<Utc>,
    take_from: Option<&str>,
) -> Result<Option<NodeInfo>, StoreError> {
    let holder = node_list(conn, n.heartbeat_at)?
        .into_iter()
        .find(|h| h.name == n.name);
    if let Some(h) = holder
        && crate::store::lifecycle::name_held_by_other(&h, n, live_since, take_from)
    {
        return Ok(Some(h));
    }
    node_heartbeat(conn, n, queues, stats, false)?;
    Ok(None)
}

pub(super) fn node_remove(conn: &Connection, name: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM nodes WHERE name = ?1", [name])
        .map_err(sql_err)?;
    conn.execute("DELETE FROM leader WHERE node = ?1", [name])
        .map_err(sql_err)?;
    Ok(())
}

pub(super) fn node_list(
    conn: &Connection,
    now: DateTime<Utc>,
) -> Result<Vec<NodeInfo>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT n.name, n.version, n.started_at, n.heartbeat_at, n.workers, n.workers_busy, \
             n.queues, (l.node IS NOT NULL), n.stats, n.instance, n.schedules, n.kinds FROM nodes n \
             LEFT JOIN leader l ON l.node = n.name AND l.expires_at > ?1 ORDER BY n.name",
        )
        .map_err(sql_err)?;
    st.query_map([to_micros(now)], |r| {
        let queues: String = r.get(6)?;
        let stats: String = r.get(8)?;
        Ok(NodeInfo {
            name: r.get(0)?,
            version: r.get(1)?,
            started_at: from_micros(r.get(2)?),
            heartbeat_at: from_micros(r.get(3)?),
            workers: r.get(4)?,
            workers_busy: r.get(5)?,
            queues: serde_json::from_str(&queues).unwrap_or_default(),
            leader: r.get(7)?,
            stats: serde_json::from_str(&stats).unwrap_or_default(),
            instance: r.get(9)?,
            schedules: r
                .get::<_, Option<String>>(10)?
                .and_then(|s| serde_json::from_str(&s).ok()),
            kinds: r
                .get::<_, Option<String>>(11)?
                .and_then(|s| serde_json::from_str(&s).ok()),
        })
    })
    .map_err(sql_err)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(sql_err)
}

pub(super) fn leader_try_elect(
    conn: &Connection,
    node: &str,
    ttl: Duration,
    now: DateTime<Utc>,
) -> Result<bool, StoreError> {
    let expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
    conn.prepare_cached(
        "INSERT INTO leader (id, node, expires_at) VALUES (1, ?1, ?2) \
         ON CONFLICT (id) DO UPDATE SET node = excluded.node, expires_at = excluded.expires_at \
         WHERE leader.node = excluded.node OR leader.expires_at <= ?3 RETURNING node",
    )
    .and_then(|mut st| {
        st.query_row(params![node, to_micros(expires), to_micros(now)], |r| {
            r.get::<_, String>(0)
        })
        .optional()
    })
    .map(|r| r.as_deref() == Some(node))
    .map_err(sql_err)
}

pub(super) fn leader_resign(conn: &Connection, node: &str) -> Result<(), StoreError> {
    conn.execute("DELETE FROM leader WHERE node = ?1", [node])
        .map_err(sql_err)?;
    Ok(())
}

pub(super) fn audit_append(
    conn: &Connection,
    e: &crate::store::AuditEntry,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO audit (at, token, remote, action, target, status, outcome) \
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
    )
    .and_then(|mut st| {
        st.execute(params![
            to_micros(e.at),
            e.token,
            e.remote,
            e.action,
            e.target,
            e.status,
            e.outcome
        ])
    })
    .map_err(sql_err)?;
    Ok(())
}

pub(super) fn audit_list(
    conn: &Connection,
    before: Option<i64>,
    limit: usize,
) -> Result<Vec<crate::store::AuditEntry>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT id, at, token, remote, action, target, status, outcome FROM audit \
             WHERE id < ?1 ORDER BY id DESC LIMIT ?2",
        )
        .map_err(sql_err)?;
    st.query_map(
        params![before.unwrap_or(i64::MAX), limit.max(1) as i64],
        |r| {
            Ok(crate::store::AuditEntry {
                id: r.get(0)?,
                at: from_micros(r.get(1)?),
                token: r.get(2)?,
                remote: r.get(3)?,
                action: r.get(4)?,
                target: r.get(5)?,
                status: r.get(6)?,
                outcome: r.get(7)?,
            })
        },
    )
    .map_err(sql_err)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(sql_err)
}
