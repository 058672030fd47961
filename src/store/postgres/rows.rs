//! Reading tasks out of PostgreSQL: the row decoder and the dashboard's
//! list query, built so every page walks an index.

use tokio_postgres::Row;

use super::db_err;
use crate::store::{ListParams, StoreError, TASK_COLUMNS, col, parse_state};
use crate::task::{AttemptError, Task, TaskId, TaskState};

pub(super) type Param = Box<dyn tokio_postgres::types::ToSql + Sync + Send>;

/// The query behind `task_list` in schema `s`, with its parameters.
pub(super) fn list_sql(s: &str, p: ListParams) -> (String, Vec<Param>) {
    let mut params: Vec<Param> = Vec::new();
    let mut add = |v: Param| {
        params.push(v);
        format!("${}", params.len())
    };
    // Filters other than state, queue and tag, shared by every arm below.
    let mut rest = String::new();
    if let Some(k) = p.kind {
        rest.push_str(&format!(" AND kind = {}", add(Box::new(k))));
    }
    if let Some(a) = p.args {
        rest.push_str(&format!(" AND args @> {}", add(Box::new(a))));
    }
    let limit = add(Box::new(p.limit.max(1) as i64));
    let sql = match (p.tag, p.state, p.queue) {
        // One queue, any state: the newest `limit` of each state's range
        // of tasks_queue_state, merged. A plain `queue = $1 ORDER BY id
        // DESC` would walk the whole table by id or sort the queue's tasks.
        (None, None, Some(q)) => {
            if let Some(b) = p.before {
                rest.push_str(&format!(" AND id < {}", add(Box::new(b.0))));
            }
            let q = add(Box::new(q));
            let arms: Vec<String> = TaskState::ALL
                .iter()
                .map(|st| {
                    format!(
                        "(SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE queue = {q} AND state = '{}'{rest} \
                         ORDER BY id DESC LIMIT {limit})",
                        st.as_str()
                    )
                })
                .collect();
            format!(
                "{} ORDER BY id DESC LIMIT {limit}",
                arms.join(" UNION ALL ")
            )
        }
        // One state, any queue: the newest `limit` of that state in each
        // queue's range of tasks_queue_state, merged (at most queues x
        // `limit` rows sorted). There is no index on (state, id): it would
        // take an entry at every transition of every task.
        (None, Some(st), None) => {
            if let Some(b) = p.before {
                rest.push_str(&format!(" AND id < {}", add(Box::new(b.0))));
            }
            let st = add(Box::new(st.as_str().to_string()));
            format!(
                "WITH RECURSIVE {} \
                 SELECT t.* FROM qs CROSS JOIN LATERAL \
                   (SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE queue = qs.q AND state = {st}{rest} \
                    ORDER BY id DESC LIMIT {limit}) t \
                 WHERE qs.q IS NOT NULL ORDER BY t.id DESC LIMIT {limit}",
                super::sql::queues_cte(s)
            )
        }
        // Any other filters: newest first by id, through the task's own
        // indexes; or, with a tag, its rows of task_tags newest first (the
        // primary key's order), each task found by id and filtered.
        (tag, state, queue) => {
            let (from, id) = match tag {
                Some(tag) => (
                    format!(
                        "{s}.task_tags g JOIN {s}.tasks t ON t.id = g.task_id AND g.tag = {}",
                        add(Box::new(tag))
                    ),
                    "g.task_id",
                ),
                None => (format!("{s}.tasks"), "id"),
            };
            if let Some(b) = p.before {
                rest.push_str(&format!(" AND {id} < {}", add(Box::new(b.0))));
            }
            let mut sql = format!("SELECT {TASK_COLUMNS} FROM {from} WHERE true{rest}");
            if let Some(st) = state {
                sql.push_str(&format!(
                    " AND state = {}",
                    add(Box::new(st.as_str().to_string()))
                ));
            }
            if let Some(q) = queue {
                sql.push_str(&format!(" AND queue = {}", add(Box::new(q))));
            }
            sql.push_str(&format!(" ORDER BY {id} DESC LIMIT {limit}"));
            sql
        }
    };
    (sql, params)
}

/// One row of [`TASK_COLUMNS`] as a task.
pub(super) fn row_to_task(r: &Row) -> Result<Task, StoreError> {
    let errors: serde_json::Value = r.try_get(col::ERRORS).map_err(db_err)?;
    let depends_on: Option<serde_json::Value> = r.try_get(col::DEPENDS_ON).map_err(db_err)?;
    let state: String = r.try_get(col::STATE).map_err(db_err)?;
    Ok(Task {
        id: TaskId(r.try_get(col::ID).map_err(db_err)?),
        kind: r.try_get(col::KIND).map_err(db_err)?,
        queue: r.try_get(col::QUEUE).map_err(db_err)?,
        args: r.try_get(col::ARGS).map_err(db_err)?,
        priority: r.try_get(col::PRIORITY).map_err(db_err)?,
        state: parse_state(&state)?,
        attempt: r.try_get(col::ATTEMPT).map_err(db_err)?,
        max_attempts: r.try_get(col::MAX_ATTEMPTS).map_err(db_err)?,
        timeout_ms: r.try_get(col::TIMEOUT_MS).map_err(db_err)?,
        unique_key: r.try_get(col::UNIQUE_KEY).map_err(db_err)?,
        run_at: r.try_get(col::RUN_AT).map_err(db_err)?,
        created_at: r.try_get(col::CREATED_AT).map_err(db_err)?,
        started_at: r.try_get(col::STARTED_AT).map_err(db_err)?,
        finished_at: r.try_get(col::FINISHED_AT).map_err(db_err)?,
        node: r.try_get(col::NODE).map_err(db_err)?,
        result: r.try_get(col::RESULT).map_err(db_err)?,
        errors: serde_json::from_value::<Vec<AttemptError>>(errors)
            .map_err(|e| StoreError::Schema(format!("tasks.errors: {e}")))?,
        depends_on: match depends_on {
            Some(d) => serde_json::from_value(d)
                .map_err(|e| StoreError::Schema(format!("tasks.depends_on: {e}")))?,
            None => Vec::new(),
        },
        concurrency_key: r.try_get(col::CONCURRENCY_KEY).map_err(db_err)?,
        claim_token: r.try_get(col::CLAIM_TOKEN).map_err(db_err)?,
        reference: r.try_get(col::REF_NAME).map_err(db_err)?,
        progress: r.try_get(col::PROGRESS).map_err(db_err)?,
        tags: r
            .try_get::<_, Option<Vec<String>>>(col::TAGS)
            .map_err(db_err)?
            .unwrap_or_default(),
        traceparent: r.try_get(col::TRACEPARENT).map_err(db_err)?,
    })
}

pub(super) fn rows_to_tasks(rows: &[Row]) -> Result<Vec<Task>, StoreError> {
    rows.iter().map(row_to_task).collect()
}

pub(super) fn error_value(e: &AttemptError) -> serde_json::Value {
    serde_json::to_value(e).unwrap_or(serde_json::Value::Null)
}
