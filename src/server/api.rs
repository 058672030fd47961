//! Handlers of the HTTP API (see CONTRACT.md for the routes).

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::{ApiError, AppState};
use crate::duration;
use crate::store::{Inserted, ListParams};
use crate::task::{NewTask, Task, TaskId, TaskOptions, TaskState};

/// Longest `?wait=` a client may ask for.
const MAX_WAIT: Duration = Duration::from_secs(300);
/// Longest delay or timeout accepted (about 100 years, in ms).
const MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/tasks", post(create_task).get(list_tasks))
        .route("/tasks/batch", post(create_batch))
        .route("/tasks/retry", post(retry_many))
        .route("/stats", get(super::dashboard::stats))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tasks/{id}/retry", post(retry_task))
        .route("/queues", get(list_queues))
        .route("/queues/{queue}/pause", post(pause_queue))
        .route("/queues/{queue}/resume", post(resume_queue))
        .route("/nodes", get(list_nodes))
        .route("/whoami", get(super::auth::whoami))
        .route("/audit", get(super::audit::list))
        .route("/schedules", get(list_schedules).post(put_schedule))
        .route("/schedules/{name}", axum::routing::delete(delete_schedule))
}

/// Read a JSON body of at most `limit` bytes; errors name the field.
async fn read_json<T: DeserializeOwned>(body: Body, limit: usize) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, limit).await.map_err(|_| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!("the request body is over {limit} bytes (server.max_body_bytes)"),
        )
    })?;
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let what = if inner.is_syntax() || inner.is_eof() {
            "malformed JSON"
        } else {
            "invalid body"
        };
        let err = ApiError::bad("body", format!("{what}: {inner}"));
        if what == "invalid body" && path != "." && !path.is_empty() {
            err.field(path)
        } else {
            err
        }
    })
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateTask {
    kind: String,
    #[serde(default)]
    args: Value,
    queue: Option<String>,
    priority: Option<i16>,
    run_at: Option<DateTime<Utc>>,
    delay_ms: Option<u64>,
    max_attempts: Option<i32>,
    timeout_ms: Option<u64>,
    unique_key: Option<String>,
    /// Task ids, or (in a batch) the `ref` of another task of the batch.
    #[serde(default)]
    depends_on: Vec<DepRef>,
    on_dependency_failure: Option<crate::task::OnDependencyFailure>,
    concurrency_key: Option<String>,
    /// A name other tasks of the same batch use in `depends_on`.
    #[serde(rename = "ref")]
    reference: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum DepRef {
    Id(i64),
    Ref(String),
}

/// Turn one request item into a `NewTask`, checking what only the API knows
/// (the kinds this node runs, args size, field spellings). `at` prefixes fields.
/// `refs`: the batch's `ref` names and positions (empty for a single create).
fn new_task(
    state: &AppState,
    c: CreateTask,
    at: &str,
    refs: &std::collections::HashMap<String, usize>,
) -> Result<NewTask, ApiError> {
    let f = |name: &str| format!("{at}{name}");
    let mut deps = Vec::new();
    for d in &c.depends_on {
        deps.push(match d {
            DepRef::Id(id) => crate::task::Dependency::Task(TaskId(*id)),
            DepRef::Ref(r) => match refs.get(r) {
                Some(i) => crate::task::Dependency::Batch(*i),
                None if refs.is_empty() => {
                    return Err(ApiError::bad(
                        f("depends_on"),
                        format!("{r:?}: a ref names a task of the same batch; use /tasks/batch"),
                    ));
                }
                None => {
                    return Err(ApiError::bad(
                        f("depends_on"),
                        format!("no task in this batch has ref {r:?}"),
                    ));
                }
            },
        });
    }
    if !state.registry.contains(&c.kind) {
        let mut kinds: Vec<_> = state.registry.kinds().collect();
        kinds.sort();
        return Err(ApiError::bad(
            f("kind"),
            format!(
                "unknown kind {:?}; this node runs {}",
                c.kind,
                kinds.join(", ")
            ),
        )
        .with_code("unknown_kind"));
    }
    let args_len = serde_json::to_vec(&c.args)
        .map(|v| v.len())
        .unwrap_or(usize::MAX);
    if args_len > state.limits.max_args_bytes {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "args are {args_len} bytes; the limit is {} (server.max_args_bytes)",
                state.limits.max_args_bytes
            ),
        )
        .field(f("args")));
    }
    if c.run_at.is_some() && c.delay_ms.is_some() {
        return Err(ApiError::bad(
            f("delay_ms"),
            "give run_at or delay_ms, not both",
        ));
    }
    let mut o = TaskOptions {
        queue: c.queue,
        priority: c.priority,
        run_at: c.run_at,
        max_attempts: c.max_attempts,
        unique_key: c.unique_key,
        depends_on: deps,
        on_dependency_failure: c.on_dependency_failure.unwrap_or_default(),
        concurrency_key: c.concurrency_key,
        reference: c.reference,
        ..Default::default()
    };
    if let Some(ms) = c.delay_ms {
        if ms > MAX_MS {
            return Err(ApiError::bad(
                f("delay_ms"),
                format!("{ms} is more than 100 years"),
            ));
        }
        o.delay = Some(Duration::from_millis(ms));
    }
    if let Some(ms) = c.timeout_ms {
        if ms == 0 || ms > MAX_MS {
            return Err(ApiError::bad(
                f("timeout_ms"),
                format!("{ms} is out of range 1..={MAX_MS}"),
            ));
        }
        o.timeout = Some(Duration::from_millis(ms));
    }
    Ok(NewTask::new(c.kind, c.args).with(o))
}

impl ApiError {
    fn with_code(mut self, code: &'static str) -> Self {
        self.code = code;
        self
    }
}

#[cfg(feature = "stats")]
fn count_enqueued(state: &AppState, inserted: &[Inserted]) {
    if let Some(m) = &state.metrics {
        for i in inserted.iter().filter(|i| !i.existing) {
            m.enqueued(&i.task.queue, &i.task.kind);
        }
    }
}

#[cfg(not(feature = "stats"))]
fn count_enqueued(_state: &AppState, _inserted: &[Inserted]) {}

async fn create_task(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: CreateTask = read_json(body, state.limits.max_body_bytes).await?;
    if req.reference.is_some() {
        return Err(ApiError::bad(
            "ref",
            "ref names a task for others of the same batch; use /tasks/batch",
        ));
    }
    let task = new_task(&state, req, "", &std::collections::HashMap::new())?;
    let inserted = state.client.insert(task).await?;
    count_enqueued(&state, std::slice::from_ref(&inserted));
    let status = if inserted.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(inserted.task)).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateBatch {
    tasks: Vec<CreateTask>,
}

async fn create_batch(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let req: CreateBatch = read_json(body, state.limits.max_body_bytes).await?;
    if req.tasks.is_empty() {
        return Err(ApiError::bad("tasks", "must hold at least one task"));
    }
    if req.tasks.len() > state.limits.max_batch {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_large",
            format!(
                "{} tasks; a batch holds at most {} (server.max_batch)",
                req.tasks.len(),
                state.limits.max_batch
            ),
        )
        .field("tasks"));
    }
    let mut refs = std::collections::HashMap::new();
    for (i, t) in req.tasks.iter().enumerate() {
        if let Some(r) = &t.reference
            && r.len() > crate::client::MAX_NAME_BYTES
        {
            return Err(ApiError::bad(
                format!("tasks[{i}].ref"),
                format!(
                    "is {} bytes; at most {}",
                    r.len(),
                    crate::client::MAX_NAME_BYTES
                ),
            ));
        }
        if let Some(r) = &t.reference
            && refs.insert(r.clone(), i).is_some()
        {
            return Err(ApiError::bad(
                format!("tasks[{i}].ref"),
                format!("{r:?} is used twice in this batch"),
            ));
        }
    }
    let tasks = req
        .tasks
        .into_iter()
        .enumerate()
        .map(|(i, c)| new_task(&state, c, &format!("tasks[{i}]."), &refs))
        .collect::<Result<Vec<_>, _>>()?;
    let inserted = state.client.insert_many(tasks).await?;
    count_enqueued(&state, &inserted);
    let tasks: Vec<Task> = inserted.into_iter().map(|i| i.task).collect();
    Ok((StatusCode::CREATED, Json(json!({ "tasks": tasks }))).into_response())
}

fn parse_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not a task id")))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct GetQuery {
    wait: Option<String>,
}

async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(&id)?;
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => {
            let d = duration::parse(w).map_err(|e| ApiError::bad("wait", e))?;
            if d > MAX_WAIT {
                return Err(ApiError::bad(
                    "wait",
                    format!("at most {}s", MAX_WAIT.as_secs()),
                ));
            }
            d
        }
    };
    if wait.is_zero() {
        let task = state.client.get(id).await?;
        return task.map(Json).ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("task {id} not found"),
            )
        });
    }
    // Not finished in time (or the node stops): the task as it is then.
    let task = tokio::select! {
        r = state.client.wait_for(id, wait) => r?,
        _ = state.stopping.cancelled() => state.client.get(id).await?.ok_or_else(|| {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("task {id} not found"))
        })?,
    };
    Ok(Json(task))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    queue: Option<String>,
    kind: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn list_tasks(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<Value>, ApiError> {
    let st = match q.state.as_deref() {
        None | Some("") => None,
        Some(s) => Some(
            s.parse::<TaskState>()
                .map_err(|e| ApiError::bad("state", e.to_string()))?,
        ),
    };
    let limit = match q.limit.as_deref() {
        None | Some("") => 100,
        Some(l) => l
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| ApiError::bad("limit", format!("{l:?} is not in 1..=1000")))?,
    };
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.parse::<TaskId>()
                .map_err(|_| ApiError::bad("cursor", format!("{c:?} is not a cursor")))?,
        ),
    };
    let tasks = state
        .client
        .list(ListParams {
            state: st,
            queue: q.queue.filter(|s| !s.is_empty()),
            kind: q.kind.filter(|s| !s.is_empty()),
            before,
            limit,
        })
        .await?;
    let next = (tasks.len() == limit)
        .then(|| tasks.last().map(|t| t.id.to_string()))
        .flatten();
    Ok(Json(json!({ "tasks": tasks, "next_cursor": next })))
}

async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.client.cancel(parse_id(&id)?).await?))
}

async fn retry_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.client.retry(parse_id(&id)?).await?))
}

/// Most ids one bulk retry may name.
const MAX_BULK: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RetryMany {
    ids: Vec<Value>,
}

/// Retry many tasks (the dashboard's "retry selected"): `{"ids": [...]}`.
/// Each id succeeds or fails on its own; the answer lists both.
async fn retry_many(State(state): State<AppState>, body: Body) -> Result<Json<Value>, ApiError> {
    let req: RetryMany = read_json(body, state.limits.max_body_bytes).await?;
    if req.ids.is_empty() || req.ids.len() > MAX_BULK {
        return Err(ApiError::bad(
            "ids",
            format!("give 1 to {MAX_BULK} ids, not {}", req.ids.len()),
        ));
    }
    let mut ids = Vec::with_capacity(req.ids.len());
    for (i, v) in req.ids.iter().enumerate() {
        let id = match v {
            Value::String(s) => s.parse::<TaskId>().ok(),
            Value::Number(n) => n.as_i64().map(TaskId),
            _ => None,
        };
        ids.push(
            id.ok_or_else(|| ApiError::bad(format!("ids[{i}]"), format!("{v} is not a task id")))?,
        );
    }
    let mut retried = Vec::new();
    let mut errors = Vec::new();
    for id in ids {
        match state.client.retry(id).await {
            Ok(t) => retried.push(t),
            Err(e) => {
                let e = ApiError::from(e);
                if e.status == StatusCode::SERVICE_UNAVAILABLE {
                    return Err(e);
                }
                errors.push(json!({"id": id.to_string(), "code": e.code, "message": e.message}));
            }
        }
    }
    Ok(Json(json!({ "retried": retried, "errors": errors })))
}

/// The queues this node serves, which are known even before they hold tasks.
fn local_queues(state: &AppState) -> impl Iterator<Item = String> + '_ {
    state.pool.queues().iter().map(|(q, _)| q.clone())
}

async fn list_queues(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let local: BTreeMap<_, _> = state.pool.queues().iter().cloned().collect();
    let out: Vec<Value> = state
        .client
        .queues(local_queues(&state))
        .await?
        .into_iter()
        .map(|q| {
            json!({
                "name": q.name,
                "paused": q.paused,
                "concurrency": local.get(&q.name),
                "counts": q.counts,
                "capped": q.capped,
                "lag_seconds": q.lag_seconds,
            })
        })
        .collect();
    Ok(Json(json!({ "queues": out })))
}

async fn set_paused(state: AppState, queue: String, paused: bool) -> Result<Json<Value>, ApiError> {
    let known = state.client.queues(local_queues(&state)).await?;
    if !known.iter().any(|q| q.name == queue) {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("unknown queue {queue:?}"),
        )
        .field("queue"));
    }
    state.client.queue_set_paused(&queue, paused).await?;
    tracing::info!(queue = %queue, paused, "queue {}", if paused { "paused" } else { "resumed" });
    Ok(Json(json!({ "name": queue, "paused": paused })))
}

async fn pause_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, queue, true).await
}

async fn resume_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_paused(state, queue, false).await
}

async fn list_nodes(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let now = Utc::now();
    let nodes: Vec<Value> = state
        .client
        .nodes()
        .await?
        .into_iter()
        .map(|n| {
            let age = (now - n.heartbeat_at).num_milliseconds().max(0);
            let mut v = serde_json::to_value(&n).unwrap_or(Value::Null);
            if let Some(o) = v.as_object_mut() {
                o.insert("heartbeat_age_ms".into(), json!(age));
            }
            v
        })
        .collect();
    Ok(Json(json!({ "nodes": nodes })))
}

async fn list_schedules(State(state): State<AppState>) -> Result<Json<Value>, ApiError> {
    let views = state.client.schedules().await?;
    Ok(Json(json!({ "schedules": views })))
}

/// Add a schedule, or replace the one of the same name.
async fn put_schedule(State(state): State<AppState>, body: Body) -> Result<Response, ApiError> {
    let spec: crate::cron::ScheduleSpec = read_json(body, state.limits.max_body_bytes).await?;
    if !state.registry.contains(&spec.kind) {
        return Err(
            ApiError::bad("kind", format!("unknown kind {:?}", spec.kind))
                .with_code("unknown_kind"),
        );
    }
    let view = state.client.schedule_put(spec).await?;
    Ok((StatusCode::CREATED, Json(json!(view))).into_response())
}

async fn delete_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    if state.client.schedule_delete(&name).await? {
        Ok(Json(json!({ "deleted": name })))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no schedule {name:?}"),
        )
        .field("name"))
    }
}

pub(crate) async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    match state.client.ping().await {
        Ok(_) => Json(json!({"status": "ready"})).into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
