//! Inserting tasks into SQLite, and what workflows do when a parent ends:
//! unblock its children, or end them by cascade.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, params};

use super::rows::{error_json, row_to_task};
use super::writer::sql_err;
use crate::store::lifecycle::{self, DEPENDENCY_FAILED};
use crate::store::{Inserted, StoreError, TASK_COLUMNS, TaskInsert, to_micros, truncate_rows};
use crate::task::{AttemptError, Task, TaskId};

/// Rows with their times cut to store precision, and their args serialized
/// here rather than on the writer thread, which is the bottleneck.
pub(super) fn prepare_rows(
    tasks: Vec<TaskInsert>,
) -> Result<(Vec<TaskInsert>, Vec<String>), StoreError> {
    let tasks = truncate_rows(tasks);
    let args = tasks
        .iter()
        .map(|t| serde_json::to_string(&t.args))
        .collect::<Result<_, _>>()
        .map_err(|e| StoreError::invalid("args", e.to_string()))?;
    Ok((tasks, args))
}

/// Insert rows in order; batch references point at earlier rows. A queue
/// with a `max_depth` that the rows would overfill refuses them all: the
/// job fails and its savepoint is rolled back. (One writer: nothing races
/// the count.)
pub(super) fn insert_all(
    conn: &Connection,
    tasks: &[TaskInsert],
    args: &[String],
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, StoreError> {
    let queues: std::collections::BTreeSet<&str> = tasks.iter().map(|t| t.queue.as_str()).collect();
    let mut caps = Vec::new();
    let mut seqs: Vec<Option<i64>> = vec![None; tasks.len()];
    for q in queues {
        let row: Option<(Option<i64>, Option<String>)> = conn
            .prepare_cached("SELECT max_depth, limits FROM queue_settings WHERE queue = ?1")
            .and_then(|mut st| st.query_row([q], |r| Ok((r.get(0)?, r.get(1)?))).optional())
            .map_err(sql_err)?;
        let (cap, limits) = row.unwrap_or((None, None));
        if let Some(cap) = cap {
            caps.push((q, cap));
        }
        let fair = limits
            .and_then(|l| serde_json::from_str::<crate::store::QueueSettings>(&l).ok())
            .is_some_and(|s| s.fairness == Some(crate::store::Fairness::RoundRobin));
        if fair {
            fair_seqs(conn, q, tasks, &mut seqs)?;
        }
    }
    let mut out: Vec<Inserted> = Vec::with_capacity(tasks.len());
    for ((t, a), seq) in tasks.iter().zip(args).zip(&seqs) {
        let i = insert_one(conn, t, a, now, &out, *seq)?;
        out.push(i);
    }
    for (queue, cap) in caps {
        let n: i64 = conn
            .prepare_cached(&format!(
                "SELECT count(*) FROM (SELECT 1 FROM tasks WHERE queue = ?1 \
                 AND state NOT IN ({}) LIMIT ?2)",
                lifecycle::sql_states(&lifecycle::FINISHED)
            ))
            .and_then(|mut st| st.query_row(params![queue, cap + 1], |r| r.get(0)))
            .map_err(sql_err)?;
        if n > cap {
            return Err(StoreError::QueueFull {
                queue: queue.to_string(),
                max_depth: u32::try_from(cap).unwrap_or(0),
            });
        }
    }
    Ok(out)
}

/// One task, inserted already claimed by `node` when its queue would hand
/// it to a claim at once (see [`Store::task_insert_started`]); else as
/// [`insert_all`] inserts it. (One writer: nothing races the checks.)
///
/// [`Store::task_insert_started`]: crate::Store::task_insert_started
pub(super) fn insert_started(
    conn: &Connection,
    t: &TaskInsert,
    args: &str,
    node: &str,
    now: DateTime<Utc>,
) -> Result<Inserted, StoreError> {
    let (cap, limits): (Option<i64>, Option<String>) = conn
        .prepare_cached("SELECT max_depth, limits FROM queue_settings WHERE queue = ?1")
        .and_then(|mut st| {
            st.query_row([&t.queue], |r| Ok((r.get(0)?, r.get(1)?)))
                .optional()
        })
        .map_err(sql_err)?
        .unwrap_or((None, None));
    // Limits stored for the queue (round robin among them) hold from the
    // moment they are written, also for a node that has not read them yet:
    // its task waits for a claim that applies them.
    let limited = limits
        .and_then(|l| serde_json::from_str::<crate::store::QueueSettings>(&l).ok())
        .is_some_and(|s| s.limits().is_some());
    let paused: bool = conn
        .prepare_cached("SELECT EXISTS (SELECT 1 FROM queues WHERE name = ?1 AND paused = 1)")
        .and_then(|mut st| st.query_row([&t.queue], |r| r.get(0)))
        .map_err(sql_err)?;
    if paused || limited || cap.is_some() || !t.can_start_at_once(now) {
        return insert_all(conn, std::slice::from_ref(t), &[args.to_string()], now)?
            .pop()
            .ok_or_else(|| StoreError::unavailable("insert returned no row"));
    }
    let task = conn
        .prepare_cached(&format!(
            "INSERT INTO tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, \
               run_at, created_at, traceparent, attempt, claim_token, node, started_at) \
             VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6, ?7, ?8, ?9, 1, 1, ?10, ?8) \
             RETURNING {TASK_COLUMNS}"
        ))
        .and_then(|mut st| {
            st.query_row(
                params![
                    t.kind,
                    t.queue,
                    args,
                    t.priority,
                    t.max_attempts,
                    t.timeout_ms,
                    to_micros(t.run_at),
                    to_micros(now),
                    t.traceparent,
                    node,
                ],
                row_to_task,
            )
        })
        .map_err(sql_err)?;
    Ok(Inserted::new(task))
}

fn insert_one(
    conn: &Connection,
    t: &TaskInsert,
    args_json: &str,
    now: DateTime<Utc>,
    batch: &[Inserted],
    fair_seq: Option<i64>,
) -> Result<Inserted, StoreError> {
    if let Some(key) = &t.unique_key
        && let Some(holder) = holder(conn, t, key, now)?
    {
        match lifecycle::on_holder(&t.unique, holder.state) {
            lifecycle::OnHolder::Keep => return Ok(Inserted::holder(holder)),
            lifecycle::OnHolder::Refuse => return Err(lifecycle::duplicate(&holder)),
            lifecycle::OnHolder::Replace => {
                let task = conn
                    .prepare_cached(&format!(
                        "UPDATE tasks SET args = ?2, priority = ?3, run_at = ?4, \
                           state = CASE WHEN state = 'blocked' THEN 'blocked' \
                                        WHEN ?4 > ?5 THEN 'scheduled' ELSE 'available' END \
                         WHERE id = ?1 RETURNING {TASK_COLUMNS}"
                    ))
                    .and_then(|mut st| {
                        st.query_row(
                            params![
                                holder.id.0,
                                args_json,
                                t.priority,
                                to_micros(t.run_at),
                                to_micros(now)
                            ],
                            row_to_task,
                        )
                    })
                    .map_err(sql_err)?;
                return Ok(Inserted {
                    task,
                    existing: true,
                    replaced: true,
                });
            }
            // The running holder leaves the unique index; this task goes in.
            lifecycle::OnHolder::Release => {
                conn.prepare_cached("UPDATE tasks SET unique_released = 1 WHERE id = ?1")
                    .and_then(|mut st| st.execute([holder.id.0]))
                    .map_err(sql_err)?;
            }
        }
    }
    let parents = lifecycle::parent_ids(&t.depends_on, |j| batch.get(j).map(|i| i.task.id))?;
    let mut states = Vec::with_capacity(parents.len());
    for p in &parents {
        let state: Option<String> = conn
            .prepare_cached("SELECT state FROM tasks WHERE id = ?1")
            .and_then(|mut st| st.query_row([p.0], |r| r.get(0)).optional())
            .map_err(sql_err)?;
        states.push(state.map(|s| crate::store::parse_state(&s)).transpose()?);
    }
    let standing = lifecycle::classify_parents(&parents, |id| {
        parents
            .iter()
            .position(|p| *p == id)
            .and_then(|i| states[i])
    })?;
    let mut task = t.to_task(TaskId(0), now);
    task.depends_on = parents.clone();
    lifecycle::apply_parents(&mut task, t.on_dependency_failure, standing, now);
    let deps_json = (!parents.is_empty())
        .then(|| serde_json::to_string(&parents).unwrap_or_else(|_| "[]".into()));
    let errors_json = serde_json::to_string(&task.errors).unwrap_or_else(|_| "[]".into());
    let tags_json = (!t.tags.is_empty())
        .then(|| serde_json::to_string(&t.tags).unwrap_or_else(|_| "[]".into()));
    let mut st = conn
        .prepare_cached(
            "INSERT INTO tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, \
             unique_key, run_at, created_at, depends_on, deps_pending, dep_failure, finished_at, errors, \
             concurrency_key, ref_name, tags, fair_seq, traceparent) \
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15, ?16, ?17, ?18, ?19, ?20)",
        )
        .map_err(sql_err)?;
    st.execute(params![
        t.kind,
        t.queue,
        args_json,
        t.priority,
        task.state.as_str(),
        t.max_attempts,
        t.timeout_ms,
        t.unique_key,
        to_micros(t.run_at),
        to_micros(now),
        deps_json,
        standing.pending,
        t.on_dependency_failure.as_str(),
        task.finished_at.map(to_micros),
        errors_json,
        t.concurrency_key,
        t.reference,
        tags_json,
        fair_seq,
        t.traceparent,
    ])
    .map_err(sql_err)?;
    task.id = TaskId(conn.last_insert_rowid());
    for tag in &t.tags {
        conn.prepare_cached("INSERT INTO task_tags (tag, task_id) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(params![tag, task.id.0]))
            .map_err(sql_err)?;
    }
    for p in &parents {
        conn.prepare_cached("INSERT OR IGNORE INTO task_deps (parent, child) VALUES (?1, ?2)")
            .and_then(|mut st| st.execute(params![p.0, task.id.0]))
            .map_err(sql_err)?;
        conn.prepare_cached("UPDATE tasks SET has_dependents = 1 WHERE id = ?1")
            .and_then(|mut st| st.execute([p.0]))
            .map_err(sql_err)?;
    }
    Ok(Inserted::new(task))
}

/// The fair_seq of each of `tasks` in round-robin `queue` (see
/// [`lifecycle::fair_seq`]), and the keys' last sequence numbers kept.
/// (One writer: nothing moves the virtual time meanwhile.)
fn fair_seqs(
    conn: &Connection,
    queue: &str,
    tasks: &[TaskInsert],
    seqs: &mut [Option<i64>],
) -> Result<(), StoreError> {
    let vtime: i64 = conn
        .prepare_cached("SELECT vtime FROM queue_fair WHERE queue = ?1")
        .and_then(|mut st| st.query_row([queue], |r| r.get(0)).optional())
        .map_err(sql_err)?
        .unwrap_or(0);
    let mut last: std::collections::HashMap<String, i64> = std::collections::HashMap::new();
    for (i, t) in tasks.iter().enumerate().filter(|(_, t)| t.queue == queue) {
        let key = t.concurrency_key.clone().unwrap_or_default();
        let prev = match last.get(&key) {
            Some(n) => Some(*n),
            None => conn
                .prepare_cached("SELECT last_seq FROM fair_keys WHERE queue = ?1 AND key = ?2")
                .and_then(|mut st| st.query_row(params![queue, key], |r| r.get(0)).optional())
                .map_err(sql_err)?,
        };
        let seq = lifecycle::fair_seq(vtime, prev);
        last.insert(key, seq);
        seqs[i] = Some(seq);
    }
    for (key, seq) in last {
        conn.prepare_cached(
            "INSERT INTO fair_keys (queue, key, last_seq) VALUES (?1, ?2, ?3) \
             ON CONFLICT (queue, key) DO UPDATE SET last_seq = max(last_seq, excluded.last_seq)",
        )
        .and_then(|mut st| st.execute(params![queue, key, seq]))
        .map_err(sql_err)?;
    }
    Ok(())
}

/// The task that holds `key` for an insert of `t` at `now`: the unfinished
/// one (unless it gave its key up), else, when `t`'s rules let finished
/// tasks hold it, the latest such within `unique_for`. (One writer: nothing
/// changes between this look-up and the insert.)
fn holder(
    conn: &Connection,
    t: &TaskInsert,
    key: &str,
    now: DateTime<Utc>,
) -> Result<Option<Task>, StoreError> {
    let unfinished = conn
        .prepare_cached(&format!(
            "SELECT {TASK_COLUMNS} FROM tasks WHERE kind = ?1 AND unique_key = ?2 \
             AND unique_released = 0 AND state NOT IN ({})",
            lifecycle::sql_states(&lifecycle::FINISHED)
        ))
        .and_then(|mut st| st.query_row([&t.kind, key], row_to_task).optional())
        .map_err(sql_err)?;
    if unfinished.is_some() || t.unique.finished.is_empty() {
        return Ok(unfinished);
    }
    let states = serde_json::to_string(
        &t.unique
            .finished
            .iter()
            .map(|s| s.as_str())
            .collect::<Vec<_>>(),
    )
    .unwrap_or_else(|_| "[]".into());
    let since = lifecycle::holder_since(&t.unique, now).map(to_micros);
    conn.prepare_cached(&format!(
        "SELECT {TASK_COLUMNS} FROM tasks WHERE kind = ?1 AND unique_key = ?2 \
         AND state IN ({}) AND state IN (SELECT value FROM json_each(?3)) \
         AND (?4 IS NULL OR finished_at >= ?4) ORDER BY finished_at DESC LIMIT 1",
        lifecycle::sql_states(&lifecycle::FINISHED)
    ))
    .and_then(|mut st| {
        st.query_row(params![t.kind, key, states, since], row_to_task)
            .optional()
    })
    .map_err(sql_err)
}

/// `parents` completed: their blocked children each wait for one parent
/// fewer, and run once they wait for none.
pub(super) fn unblock(conn: &Connection, parents: &[i64]) -> Result<(), StoreError> {
    if parents.is_empty() {
        return Ok(());
    }
    let ids = serde_json::to_string(parents).unwrap_or_else(|_| "[]".into());
    conn.prepare_cached(
        "UPDATE tasks SET \
           deps_pending = deps_pending - (SELECT count(*) FROM task_deps d \
             WHERE d.child = tasks.id AND d.parent IN (SELECT value FROM json_each(?1))), \
           state = CASE WHEN deps_pending - (SELECT count(*) FROM task_deps d \
             WHERE d.child = tasks.id AND d.parent IN (SELECT value FROM json_each(?1))) <= 0 \
             THEN 'available' ELSE state END \
         WHERE state = 'blocked' AND id IN \
           (SELECT child FROM task_deps WHERE parent IN (SELECT value FROM json_each(?1)))",
    )
    .and_then(|mut st| st.execute([ids]))
    .map_err(sql_err)?;
    Ok(())
}

/// `parents` failed for good or were cancelled: every blocked task that
/// waits for them, directly or through other blocked tasks, ends per its
/// `on_dependency_failure`.
pub(super) fn cascade(
    conn: &Connection,
    parents: &[i64],
    now: DateTime<Utc>,
) -> Result<Vec<TaskId>, StoreError> {
    if parents.is_empty() {
        return Ok(Vec::new());
    }
    let ids = serde_json::to_string(parents).unwrap_or_else(|_| "[]".into());
    // The entry's attempt is each task's own; `json_set` puts it in.
    let entry = error_json(&AttemptError {
        attempt: 0,
        at: now,
        message: DEPENDENCY_FAILED.to_string(),
    });
    conn.prepare_cached(
        "WITH RECURSIVE doomed(id) AS ( \
           SELECT child FROM task_deps WHERE parent IN (SELECT value FROM json_each(?1)) \
           UNION SELECT d.child FROM task_deps d JOIN doomed ON d.parent = doomed.id) \
         UPDATE tasks SET \
           state = CASE WHEN dep_failure = 'fail' THEN 'failed' ELSE 'cancelled' END, \
           finished_at = ?2, \
           errors = json_insert(errors, '$[#]', json_set(json(?3), '$.attempt', attempt)) \
         WHERE state = 'blocked' AND id IN (SELECT id FROM doomed) RETURNING id",
    )
    .and_then(|mut st| {
        st.query_map(params![ids, to_micros(now), entry], |r| {
            r.get::<_, i64>(0).map(TaskId)
        })?
        .collect::<Result<Vec<_>, _>>()
    })
    .map_err(sql_err)
}
