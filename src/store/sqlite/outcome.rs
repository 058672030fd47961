//! Applying what happens to a task after its claim, in SQLite: outcomes
//! (fenced by attempt), cancel and retry by hand, rescue of dead nodes'
//! tasks, and pruning. The rules come from [`lifecycle`]; this file only
//! writes them as SQLite statements.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row, params};

use super::insert::{cascade, unblock};
use super::rows::{error_json, get_task};
use super::writer::sql_err;
use crate::store::lifecycle::{self, CancelAction, Dependents, RESCUED_SUFFIX, Transition};
use crate::store::{
    Completion, PruneParams, RescueParams, Rescued, StoreError, parse_state, to_micros,
};
use crate::task::{Task, TaskId, TaskState};

/// Write one outcome as its [`lifecycle::Transition`]. `None` when fencing
/// refused it; otherwise whether the task has dependents and the state it
/// reached (cancelled instead, when it was asked to stop and the outcome
/// would have made it runnable: cancel is final).
fn complete_one(
    conn: &Connection,
    c: &Completion,
) -> Result<Option<(bool, TaskState)>, StoreError> {
    let t = lifecycle::transition(c);
    let result = t
        .result
        .as_deref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(|e| StoreError::invalid("result", e.to_string()))?;
    let row: Option<(bool, String)> = conn
        .prepare_cached(
            "UPDATE tasks SET \
               state = CASE WHEN ?10 AND cancel_requested = 1 THEN 'cancelled' ELSE ?1 END, \
               finished_at = CASE WHEN ?10 AND cancel_requested = 1 THEN ?3 \
                                  WHEN ?2 THEN ?3 ELSE finished_at END, \
               result = CASE WHEN ?4 IS NULL THEN result ELSE ?4 END, \
               run_at = CASE WHEN ?10 AND cancel_requested = 1 THEN run_at ELSE coalesce(?5, run_at) END, \
               errors = CASE WHEN ?10 AND cancel_requested = 1 THEN json_insert(errors, '$[#]', json(?11)) \
                             WHEN ?6 IS NULL THEN errors ELSE json_insert(errors, '$[#]', json(?6)) END, \
               attempt = CASE WHEN ?10 AND cancel_requested = 1 THEN attempt ELSE attempt + ?7 END \
             WHERE id = ?8 AND state = 'running' AND claim_token = ?9 RETURNING has_dependents, state",
        )
        .and_then(|mut st| {
            st.query_row(
                params![
                    t.state.as_str(),
                    t.finished,
                    to_micros(c.at),
                    result,
                    t.run_at.map(to_micros),
                    t.error.as_ref().map(error_json),
                    t.attempt_delta,
                    c.id.0,
                    c.token,
                    t.yields_to_cancel,
                    // Only an outcome that yields to a cancel needs its entry
                    // (built on the writer thread, the store's bottleneck).
                    t.yields_to_cancel
                        .then(|| error_json(&Transition::cancelled(c))),
                ],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()
        })
        .map_err(sql_err)?;
    row.map(|(deps, state)| Ok((deps, parse_state(&state)?)))
        .transpose()
}

/// What a batch of outcomes did.
pub(super) struct Written {
    /// Per completion, whether it was applied.
    pub applied: Vec<bool>,
    /// Whether any completed task had dependents (which may now be runnable).
    pub unblocked: bool,
    /// The tasks that reached a final state: by their outcome, or by the
    /// failure of a task they depended on.
    pub finished: Vec<TaskId>,
}

/// Write outcomes and what they do to dependent tasks.
pub(super) fn complete_many(
    conn: &Connection,
    completions: &[Completion],
) -> Result<Written, StoreError> {
    let mut applied = Vec::with_capacity(completions.len());
    let mut finished = Vec::new();
    let (mut done, mut doomed) = (Vec::new(), Vec::new());
    let first = lifecycle::first_per_task(completions);
    for (c, first) in completions.iter().zip(first) {
        let r = if first { complete_one(conn, c)? } else { None };
        if let Some((deps, state)) = r {
            if state.is_finished() {
                finished.push(c.id);
            }
            if deps {
                match Dependents::of(state) {
                    Dependents::Unblock => done.push(c.id.0),
                    Dependents::Cascade => doomed.push(c.id.0),
                    Dependents::Wait => {}
                }
            }
        }
        applied.push(r.is_some());
    }
    unblock(conn, &done)?;
    if let Some(at) = completions.first().map(|c| c.at) {
        finished.extend(cascade(conn, &doomed, at)?);
    }
    Ok(Written {
        applied,
        unblocked: !done.is_empty(),
        finished,
    })
}

/// Cancel `id` as [`lifecycle::cancel_action`] says. Returns the task and
/// the tasks that this finished (it and its dependents, when it had not started).
pub(super) fn cancel(
    conn: &Connection,
    id: TaskId,
    now: DateTime<Utc>,
) -> Result<(Task, Vec<TaskId>), StoreError> {
    let mut finished = Vec::new();
    let task = get_task(conn, id)?.ok_or(StoreError::NotFound(id))?;
    match lifecycle::cancel_action(&task)? {
        CancelAction::RequestStop => {
            conn.execute(
                "UPDATE tasks SET cancel_requested = 1 WHERE id = ?1",
                [id.0],
            )
            .map_err(sql_err)?;
        }
        CancelAction::CancelNow => {
            conn.execute(
                "UPDATE tasks SET state = 'cancelled', finished_at = ?1 WHERE id = ?2",
                params![to_micros(now), id.0],
            )
            .map_err(sql_err)?;
            finished.push(id);
            finished.extend(cascade(conn, &[id.0], now)?);
        }
    }
    Ok((
        get_task(conn, id)?.ok_or(StoreError::NotFound(id))?,
        finished,
    ))
}

/// Retry `id` by hand, as [`lifecycle::check_retry`] allows.
pub(super) fn retry(conn: &Connection, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
    let task = get_task(conn, id)?.ok_or(StoreError::NotFound(id))?;
    lifecycle::check_retry(&task)?;
    let parents = parent_states(conn, &task)?;
    let state = lifecycle::retry_state(&task, parents)?;
    let r = conn.execute(
        "UPDATE tasks SET state = ?3, deps_pending = ?4, run_at = ?1, finished_at = NULL, \
         cancel_requested = 0, max_attempts = max(max_attempts, attempt + 1) WHERE id = ?2",
        params![to_micros(now), id.0, state.as_str(), parents.pending],
    );
    match r {
        Ok(_) => {}
        Err(rusqlite::Error::SqliteFailure(e, _))
            if e.code == rusqlite::ErrorCode::ConstraintViolation =>
        {
            return Err(lifecycle::unique_conflict(&task));
        }
        Err(e) => return Err(sql_err(e)),
    }
    get_task(conn, id)?.ok_or(StoreError::NotFound(id))
}

/// How the parents of `task` stand now (a pruned parent counts as completed).
fn parent_states(conn: &Connection, task: &Task) -> Result<lifecycle::ParentStates, StoreError> {
    let mut states = Vec::with_capacity(task.depends_on.len());
    for p in &task.depends_on {
        let s: Option<String> = conn
            .prepare_cached("SELECT state FROM tasks WHERE id = ?1")
            .and_then(|mut st| st.query_row([p.0], |r| r.get(0)).optional())
            .map_err(sql_err)?;
        states.push(match s {
            Some(s) => parse_state(&s)?,
            None => TaskState::Completed,
        });
    }
    lifecycle::classify_parents(&task.depends_on, |id| {
        task.depends_on
            .iter()
            .position(|p| *p == id)
            .map(|i| states[i])
    })
}

/// The ids and claim tokens of `node`'s running tasks that were asked to stop.
pub(super) fn cancel_requested(
    conn: &Connection,
    node: &str,
) -> Result<Vec<(TaskId, i64)>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "SELECT id, claim_token FROM tasks WHERE state = 'running' AND node = ?1 \
             AND cancel_requested = 1",
        )
        .map_err(sql_err)?;
    st.query_map([node], |r| Ok((TaskId(r.get(0)?), r.get(1)?)))
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)
}

/// Put back the running tasks of dead nodes (or of one node); see
/// [`RescueParams`]. Also returns the tasks this finished (rescued tasks
/// with no attempt left, and their dependents).
pub(super) fn rescue(
    conn: &Connection,
    p: &RescueParams,
) -> Result<(Vec<Rescued>, Vec<TaskId>), StoreError> {
    let now = to_micros(p.now);
    let cutoff = to_micros(p.now - chrono::Duration::from_std(p.node_timeout).unwrap_or_default());
    let now_text = p.now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    let set = "UPDATE tasks SET \
         state = CASE WHEN cancel_requested = 1 THEN 'cancelled' \
                      WHEN attempt >= max_attempts THEN 'failed' ELSE 'retryable' END, \
         finished_at = CASE WHEN cancel_requested = 1 OR attempt >= max_attempts THEN ?1 ELSE NULL END, \
         run_at = ?1, \
         errors = json_insert(errors, '$[#]', json_object('attempt', attempt, 'at', ?2, \
            'message', 'node ' || coalesce(node, '?') || ?3))";
    let sql = match &p.node {
        Some(_) => format!(
            "{set} WHERE state = 'running' AND node = ?4 \
             AND id NOT IN (SELECT value FROM json_each(?5)) AND started_at < ?6 \
             RETURNING id, node, state"
        ),
        None => format!(
            "{set} WHERE state = 'running' AND (node IS NULL OR node NOT IN \
             (SELECT name FROM nodes WHERE heartbeat_at >= ?4)) RETURNING id, node, state"
        ),
    };
    let mut st = conn.prepare_cached(&sql).map_err(sql_err)?;
    let map = |r: &Row<'_>| -> rusqlite::Result<(i64, Option<String>, String)> {
        Ok((r.get(0)?, r.get(1)?, r.get(2)?))
    };
    let rows = match &p.node {
        Some(n) => {
            let keep = serde_json::to_string(&p.keep.iter().map(|t| t.0).collect::<Vec<_>>())
                .unwrap_or_else(|_| "[]".into());
            let before = p.started_before.map(to_micros).unwrap_or(i64::MAX);
            st.query_map(params![now, now_text, RESCUED_SUFFIX, n, keep, before], map)
        }
        None => st.query_map(params![now, now_text, RESCUED_SUFFIX, cutoff], map),
    }
    .map_err(sql_err)?
    .collect::<Result<Vec<_>, _>>()
    .map_err(sql_err)?;
    let rescued = rows
        .into_iter()
        .map(|(id, node, state)| {
            Ok(Rescued {
                id: TaskId(id),
                node,
                state: parse_state(&state)?,
            })
        })
        .collect::<Result<Vec<_>, StoreError>>()?;
    let ended = lifecycle::rescue_ended(&rescued);
    let mut finished: Vec<TaskId> = ended.iter().copied().map(TaskId).collect();
    finished.extend(cascade(conn, &ended, p.now)?);
    Ok((rescued, finished))
}

/// Delete old finished tasks, at most `limit` per state per call.
pub(super) fn prune(conn: &Connection, p: &PruneParams) -> Result<u64, StoreError> {
    let mut total = 0u64;
    let limit = p.limit.max(1) as i64;
    // Queue by queue, oldest ids first, through tasks_queue_state (there
    // is no index on (state, id)).
    let queues = super::rows::queues(conn)?;
    for (state, before) in p.cutoffs() {
        let Some(before) = before else { continue };
        let mut gone: Vec<(i64, Option<String>)> = Vec::new();
        for q in &queues {
            let left = limit - gone.len() as i64;
            if left <= 0 {
                break;
            }
            let mut some: Vec<(i64, Option<String>)> = conn
                .prepare_cached(
                    "DELETE FROM tasks WHERE id IN (SELECT id FROM tasks INDEXED BY tasks_queue_state \
                     WHERE queue = ?1 AND state = ?2 AND finished_at < ?3 ORDER BY id LIMIT ?4) \
                     RETURNING id, tags",
                )
                .and_then(|mut st| {
                    st.query_map(params![q, state.as_str(), to_micros(before), left], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<Result<_, _>>()
                })
                .map_err(sql_err)?;
            gone.append(&mut some);
        }
        // Their workflow edges go with them (an edge is only walked while
        // its child can still be blocked), and so do their tags' rows.
        if !gone.is_empty() {
            let ids: Vec<i64> = gone.iter().map(|(id, _)| *id).collect();
            let ids = serde_json::to_string(&ids).unwrap_or_else(|_| "[]".into());
            conn.prepare_cached(
                "DELETE FROM task_deps WHERE parent IN (SELECT value FROM json_each(?1)) \
                 OR child IN (SELECT value FROM json_each(?1))",
            )
            .and_then(|mut st| st.execute([ids]))
            .map_err(sql_err)?;
        }
        for (id, tags) in &gone {
            let Some(tags) = tags else { continue };
            conn.prepare_cached(
                "DELETE FROM task_tags WHERE task_id = ?1 AND tag IN (SELECT value FROM json_each(?2))",
            )
            .and_then(|mut st| st.execute(params![id, tags]))
            .map_err(sql_err)?;
        }
        total += gone.len() as u64;
    }
    if let Some(before) = p.audit_before {
        conn.prepare_cached(
            "DELETE FROM audit WHERE id IN (SELECT id FROM audit WHERE at < ?1 LIMIT ?2)",
        )
        .and_then(|mut st| st.execute(params![to_micros(before), limit]))
        .map_err(sql_err)?;
    }
    // A key whose last task is behind the virtual time counts as new.
    conn.prepare_cached(
        "DELETE FROM fair_keys WHERE last_seq <= \
         (SELECT vtime FROM queue_fair WHERE queue_fair.queue = fair_keys.queue)",
    )
    .and_then(|mut st| st.execute([]))
    .map_err(sql_err)?;
    Ok(total)
}
