//! Reading tasks out of SQLite: the row decoder and the dashboard's reads
//! (task lists and bounded queue counts), built so they walk indexes.

use chrono::{DateTime, Utc};
use rusqlite::{Connection, OptionalExtension, Row};

use super::writer::sql_err;
use crate::store::{ListParams, StoreError, TASK_COLUMNS, col, from_micros, lifecycle};
use crate::task::{AttemptError, Task, TaskId, TaskState};

fn opt_micros(v: Option<i64>) -> Option<DateTime<Utc>> {
    v.map(from_micros)
}

/// One row of [`TASK_COLUMNS`] as a task.
pub(super) fn row_to_task(r: &Row<'_>) -> rusqlite::Result<Task> {
    let text = |i: usize| -> rusqlite::Result<String> { r.get(i) };
    let conv = |i: usize, e: Box<dyn std::error::Error + Send + Sync>| {
        rusqlite::Error::FromSqlConversionFailure(i, rusqlite::types::Type::Text, e)
    };
    let json = |i: usize, s: &str| -> rusqlite::Result<serde_json::Value> {
        serde_json::from_str(s).map_err(|e| conv(i, Box::new(e)))
    };
    let result: Option<String> = r.get(col::RESULT)?;
    let depends_on: Option<String> = r.get(col::DEPENDS_ON)?;
    let progress: Option<String> = r.get(col::PROGRESS)?;
    let tags: Option<String> = r.get(col::TAGS)?;
    Ok(Task {
        id: TaskId(r.get(col::ID)?),
        kind: r.get(col::KIND)?,
        queue: r.get(col::QUEUE)?,
        args: json(col::ARGS, &text(col::ARGS)?)?,
        priority: r.get(col::PRIORITY)?,
        state: text(col::STATE)?
            .parse()
            .map_err(|e| conv(col::STATE, Box::new(e)))?,
        attempt: r.get(col::ATTEMPT)?,
        max_attempts: r.get(col::MAX_ATTEMPTS)?,
        timeout_ms: r.get(col::TIMEOUT_MS)?,
        unique_key: r.get(col::UNIQUE_KEY)?,
        run_at: from_micros(r.get(col::RUN_AT)?),
        created_at: from_micros(r.get(col::CREATED_AT)?),
        started_at: opt_micros(r.get(col::STARTED_AT)?),
        finished_at: opt_micros(r.get(col::FINISHED_AT)?),
        node: r.get(col::NODE)?,
        result: result.map(|s| json(col::RESULT, &s)).transpose()?,
        errors: serde_json::from_str(&text(col::ERRORS)?)
            .map_err(|e| conv(col::ERRORS, Box::new(e)))?,
        depends_on: match depends_on {
            Some(d) => serde_json::from_str(&d).map_err(|e| conv(col::DEPENDS_ON, Box::new(e)))?,
            None => Vec::new(),
        },
        concurrency_key: r.get(col::CONCURRENCY_KEY)?,
        claim_token: r.get(col::CLAIM_TOKEN)?,
        reference: r.get(col::REF_NAME)?,
        progress: progress.map(|s| json(col::PROGRESS, &s)).transpose()?,
        tags: match tags {
            Some(t) => serde_json::from_str(&t).map_err(|e| conv(col::TAGS, Box::new(e)))?,
            None => Vec::new(),
        },
        traceparent: r.get(col::TRACEPARENT)?,
    })
}

pub(super) fn get_task(conn: &Connection, id: TaskId) -> Result<Option<Task>, StoreError> {
    conn.prepare_cached(&format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id = ?1"))
        .and_then(|mut st| st.query_row([id.0], row_to_task).optional())
        .map_err(sql_err)
}

/// The tasks of `ids` that exist (one statement for all).
pub(super) fn get_many(conn: &Connection, ids: &[TaskId]) -> Result<Vec<Task>, StoreError> {
    let list = serde_json::to_string(&ids.iter().map(|t| t.0).collect::<Vec<_>>())
        .map_err(|e| StoreError::invalid("ids", e.to_string()))?;
    fetch_tasks(
        conn,
        &format!("SELECT {TASK_COLUMNS} FROM tasks WHERE id IN (SELECT value FROM json_each(?1))"),
        [list],
    )
}

/// Which of `ids` exist and are not finished (one statement for all).
pub(super) fn unfinished(conn: &Connection, ids: &[TaskId]) -> Result<Vec<TaskId>, StoreError> {
    let list = serde_json::to_string(&ids.iter().map(|t| t.0).collect::<Vec<_>>())
        .map_err(|e| StoreError::invalid("ids", e.to_string()))?;
    conn.prepare_cached(&format!(
        "SELECT id FROM tasks WHERE id IN (SELECT value FROM json_each(?1)) \
         AND state NOT IN ({})",
        lifecycle::sql_states(&lifecycle::FINISHED)
    ))
    .and_then(|mut st| {
        st.query_map([list], |r| r.get::<_, i64>(0).map(TaskId))?
            .collect::<Result<Vec<_>, _>>()
    })
    .map_err(sql_err)
}

pub(super) fn fetch_tasks(
    conn: &Connection,
    sql: &str,
    p: impl rusqlite::Params,
) -> Result<Vec<Task>, StoreError> {
    let mut st = conn.prepare_cached(sql).map_err(sql_err)?;
    let rows = st
        .query_map(p, row_to_task)
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)?;
    Ok(rows)
}

/// An error-list entry as the JSON text SQLite appends with `json_insert`.
pub(super) fn error_json(e: &AttemptError) -> String {
    serde_json::to_string(e).unwrap_or_else(|_| "{}".to_string())
}

/// The query behind `queue_counts`: the queues, one index probe each (a
/// loose index scan), then a count of each (queue, state) range that stops at
/// the cap (?1 unfinished, ?2 finished states).
pub(super) fn queue_counts_sql() -> String {
    format!(
        "WITH RECURSIVE qs(q) AS ( \
           SELECT (SELECT min(queue) FROM tasks) \
           UNION ALL \
           SELECT (SELECT min(queue) FROM tasks WHERE queue > qs.q) FROM qs WHERE qs.q IS NOT NULL), \
         st(s) AS (VALUES {}) \
         SELECT q, s, n FROM (SELECT qs.q AS q, st.s AS s, \
           CASE WHEN st.s IN ({finished}) \
           THEN (SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queue_state \
              WHERE queue = qs.q AND state = st.s LIMIT ?2)) \
           ELSE (SELECT count(*) FROM (SELECT 1 FROM tasks INDEXED BY tasks_queue_state \
              WHERE queue = qs.q AND state = st.s LIMIT ?1)) END AS n \
         FROM qs, st WHERE qs.q IS NOT NULL) WHERE n > 0",
        TaskState::ALL
            .iter()
            .map(|s| format!("('{}')", s.as_str()))
            .collect::<Vec<_>>()
            .join(", "),
        finished = lifecycle::sql_states(&lifecycle::FINISHED),
    )
}

/// The queues that have tasks, one probe of tasks_queue_state each (a
/// loose index scan).
pub(super) fn queues(conn: &Connection) -> Result<Vec<String>, StoreError> {
    let mut st = conn
        .prepare_cached(
            "WITH RECURSIVE qs(q) AS ( \
               SELECT (SELECT min(queue) FROM tasks) \
               UNION ALL \
               SELECT (SELECT min(queue) FROM tasks WHERE queue > qs.q) FROM qs WHERE qs.q IS NOT NULL) \
             SELECT q FROM qs WHERE q IS NOT NULL",
        )
        .map_err(sql_err)?;
    st.query_map([], |r| r.get(0))
        .map_err(sql_err)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(sql_err)
}

/// The newest page of one (queue, state) range of tasks_queue_state, with
/// `rest` (more filters), for a `UNION ALL` of such pages. Arguments: the
/// queue, the state, those of `rest`, the page size.
fn page_arm(rest: &str) -> String {
    format!(
        "SELECT * FROM (SELECT {TASK_COLUMNS} FROM tasks INDEXED BY tasks_queue_state \
         WHERE queue = ? AND state = ?{rest} ORDER BY id DESC LIMIT ?)"
    )
}

/// Arms of one compound SELECT: SQLite allows 500 by default.
const ARMS_PER_STATEMENT: usize = 200;

/// The statements behind `task_list`, with their arguments: one, or for
/// one state across queues one per 200 queues (of `queues`), whose rows
/// are merged newest first. There is no index on (state, id): it would
/// take an entry at every transition of every task, on the writer thread.
pub(super) fn list_statements(
    p: &ListParams,
    queues: &[String],
) -> Vec<(String, Vec<rusqlite::types::Value>)> {
    let (None, Some(st), None) = (&p.tag, &p.state, &p.queue) else {
        return vec![list_sql(p)];
    };
    let limit = p.limit.max(1) as i64;
    queues
        .chunks(ARMS_PER_STATEMENT)
        .map(|chunk| {
            let mut args: Vec<rusqlite::types::Value> = Vec::new();
            let arms: Vec<String> = chunk
                .iter()
                .map(|q| {
                    args.push(q.clone().into());
                    args.push(st.as_str().to_string().into());
                    let mut rest = String::new();
                    if let Some(k) = &p.kind {
                        rest.push_str(" AND kind = ?");
                        args.push(k.clone().into());
                    }
                    if let Some(a) = &p.args {
                        rest.push_str(" AND pt_json_contains(args, ?)");
                        args.push(a.to_string().into());
                    }
                    if let Some(b) = p.before {
                        rest.push_str(" AND id < ?");
                        args.push(b.0.into());
                    }
                    args.push(limit.into());
                    page_arm(&rest)
                })
                .collect();
            args.push(limit.into());
            (
                format!("{} ORDER BY id DESC LIMIT ?", arms.join(" UNION ALL ")),
                args,
            )
        })
        .collect()
}

/// `task_list`: its statements run and merged, newest first.
pub(super) fn list(conn: &Connection, p: &ListParams) -> Result<Vec<Task>, StoreError> {
    let queues = match (&p.tag, &p.state, &p.queue) {
        (None, Some(_), None) => queues(conn)?,
        _ => Vec::new(),
    };
    let mut out = Vec::new();
    for (sql, args) in list_statements(p, &queues) {
        out.extend(fetch_tasks(conn, &sql, rusqlite::params_from_iter(args))?);
    }
    out.sort_unstable_by_key(|t| std::cmp::Reverse(t.id));
    out.truncate(p.limit.max(1));
    Ok(out)
}

/// The query behind `task_list` (but one state across queues, see
/// [`list_statements`]), with its arguments.
fn list_sql(p: &ListParams) -> (String, Vec<rusqlite::types::Value>) {
    let limit = p.limit.max(1) as i64;
    // Filters other than state, queue and tag, shared by every arm below.
    let mut rest = String::new();
    let mut rest_args: Vec<rusqlite::types::Value> = Vec::new();
    if let Some(k) = &p.kind {
        rest.push_str(" AND kind = ?");
        rest_args.push(k.clone().into());
    }
    if let Some(a) = &p.args {
        rest.push_str(" AND pt_json_contains(args, ?)");
        rest_args.push(a.to_string().into());
    }
    let mut args: Vec<rusqlite::types::Value> = Vec::new();
    let sql = match (&p.tag, &p.state, &p.queue) {
        // One queue, any state: the newest `limit` of each state's
        // range of tasks_queue_state, merged. A plain `queue = ?
        // ORDER BY id DESC` would either walk the whole table by id
        // or sort every task of the queue.
        (None, None, Some(q)) => {
            if let Some(b) = p.before {
                rest.push_str(" AND id < ?");
                rest_args.push(b.0.into());
            }
            let arms: Vec<String> = TaskState::ALL
                .iter()
                .map(|st| {
                    args.push(q.clone().into());
                    args.push(st.as_str().to_string().into());
                    args.extend(rest_args.iter().cloned());
                    args.push(limit.into());
                    page_arm(&rest)
                })
                .collect();
            args.push(limit.into());
            format!("{} ORDER BY id DESC LIMIT ?", arms.join(" UNION ALL "))
        }
        // Any other filters: newest first by id, through the task's own
        // indexes; or, with a tag, its rows of task_tags newest first (the
        // primary key's order), each task found by id and filtered.
        (tag, state, queue) => {
            let (from, id) = match tag {
                Some(tag) => {
                    args.push(tag.clone().into());
                    (
                        "task_tags CROSS JOIN tasks \
                         ON tasks.id = task_tags.task_id AND task_tags.tag = ?",
                        "task_tags.task_id",
                    )
                }
                None => ("tasks", "id"),
            };
            let mut sql = format!("SELECT {TASK_COLUMNS} FROM {from} WHERE 1 = 1");
            if let Some(s) = state {
                sql.push_str(" AND state = ?");
                args.push(s.as_str().to_string().into());
            }
            if let Some(q) = queue {
                sql.push_str(" AND queue = ?");
                args.push(q.clone().into());
            }
            if let Some(b) = p.before {
                sql.push_str(&format!(" AND {id} < ?"));
                args.push(b.0.into());
            }
            sql.push_str(&rest);
            args.extend(rest_args);
            sql.push_str(&format!(" ORDER BY {id} DESC LIMIT ?"));
            args.push(limit.into());
            sql
        }
    };
    (sql, args)
}
