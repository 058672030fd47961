//! Handlers of the HTTP API. Each carries its `#[utoipa::path]`: the
//! OpenAPI document (`super::openapi`) is built from these, and answers are
//! typed structs (not `json!`) so the document shows what is sent.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::body::Body;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use chrono::{DateTime, Utc};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::openapi::{
    Deleted, Health, NodeList, NodeView, QueueList, QueuePaused, QueueView, RetryError,
    RetryManyResult, ScheduleList, TaskBatch, TaskPage,
};
use super::{ApiError, ApiPath as Path, ApiQuery as Query, AppState};
use crate::duration;
use crate::store::{Inserted, ListParams};
use crate::task::{NewTask, Task, TaskId, TaskOptions, TaskState};

/// Longest delay or timeout accepted (about 100 years, in ms).
const MAX_MS: u64 = 100 * 365 * 24 * 3600 * 1000;

pub(crate) fn routes() -> Router<AppState> {
    Router::new()
        .route("/tasks", post(create_task).get(list_tasks))
        .route("/tasks/batch", post(create_batch))
        .route("/tasks/retry", post(retry_many))
        .route("/stats", get(super::dashboard::stats))
        .route("/tasks/{id}", get(get_task))
        .route("/tasks/{id}/events", get(task_events))
        .route("/tasks/{id}/cancel", post(cancel_task))
        .route("/tasks/{id}/retry", post(retry_task))
        .route("/queues", get(list_queues))
        .route("/queues/{queue}", get(get_queue).patch(patch_queue))
        .route("/queues/{queue}/pause", post(pause_queue))
        .route("/queues/{queue}/resume", post(resume_queue))
        .route("/nodes", get(list_nodes))
        .route("/whoami", get(super::auth::whoami))
        .route("/audit", get(super::audit::list))
        .route("/schedules", get(list_schedules).post(put_schedule))
        .route("/schedules/{name}", axum::routing::delete(delete_schedule))
        .route("/schedules/{name}/pause", post(pause_schedule))
        .route("/schedules/{name}/resume", post(resume_schedule))
        .route("/schedules/{name}/trigger", post(trigger_schedule))
        .route("/openapi.json", get(super::openapi::openapi_json))
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
    // Every body is an object; serde would also fill a struct from an
    // array (`["noop"]` as a task, `[null]` as a patch that clears a cap).
    if bytes
        .iter()
        .find(|b| !b.is_ascii_whitespace())
        .is_some_and(|b| *b != b'{')
    {
        return Err(ApiError::bad("body", "the body must be a JSON object"));
    }
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

/// A task to create. Only `kind` is required; the rest default to the
/// kind's registered defaults, then the built-in ones.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateTask {
    /// A kind this node runs (else 400 `unknown_kind`).
    #[schema(example = "noop")]
    kind: String,
    /// Any JSON (at most `server.max_args_bytes`, 1 MiB by default).
    #[serde(default)]
    args: Value,
    /// Default: the kind's queue, else `default`.
    #[schema(min_length = 1, max_length = 255)]
    queue: Option<String>,
    /// 0 runs first (default 0).
    #[schema(minimum = 0, maximum = 9)]
    priority: Option<i16>,
    /// Run no earlier than this instant (not with `delay_ms`).
    run_at: Option<DateTime<Utc>>,
    /// Run no earlier than now + this many ms (not with `run_at`).
    #[schema(maximum = 3_153_600_000_000_u64)]
    delay_ms: Option<u64>,
    /// Attempts before the task fails for good (default: the kind's, else 25).
    #[schema(minimum = 1)]
    max_attempts: Option<i32>,
    /// An attempt running longer is cancelled and counts as failed.
    #[schema(minimum = 1, maximum = 3_153_600_000_000_u64)]
    timeout_ms: Option<u64>,
    /// While a task of the same kind with this key is unfinished, creating
    /// another returns that task (200) instead (see `on_conflict`).
    #[schema(min_length = 1, max_length = 255)]
    unique_key: Option<String>,
    /// The states whose tasks hold `unique_key`: every unfinished state
    /// (scheduled, available, running, retryable, blocked), plus any of
    /// completed, failed, cancelled. Default: the unfinished states (with
    /// `unique_for_ms` alone, also completed).
    unique_states: Option<Vec<TaskState>>,
    /// A finished holder counts for this many ms after it finished.
    #[schema(minimum = 1, maximum = 3_153_600_000_000_u64)]
    unique_for_ms: Option<u64>,
    /// When a task holds `unique_key`: `keep` (200 with it), `replace`
    /// (debounce: a holder that has not started takes this task's args,
    /// run_at/delay and priority, 200 with it; a running one is left alone
    /// and this task is queued after it, 201), or `error` (409 `duplicate`).
    on_conflict: Option<crate::task::OnConflict>,
    /// Task ids, or (in a batch) the `ref` of another task of the batch.
    #[serde(default)]
    depends_on: Vec<DepRef>,
    /// What happens to this task when one it waits for fails for good.
    on_dependency_failure: Option<crate::task::OnDependencyFailure>,
    /// Tasks sharing a key count together against the queue's `per_key_concurrency`.
    #[schema(max_length = 255)]
    concurrency_key: Option<String>,
    /// A name other tasks of the same batch use in `depends_on` (batches only).
    #[serde(rename = "ref")]
    #[schema(max_length = 255)]
    reference: Option<String>,
    /// Labels to find the task by (`GET /api/v1/tasks?tag=...`): at most
    /// 16, each 1 to 255 bytes; a repeat is dropped.
    #[serde(default)]
    #[schema(max_items = 16)]
    tags: Vec<String>,
}

/// A task this one waits for: its id, or (in a batch) its `ref`.
#[derive(Debug, Deserialize, ToSchema)]
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
        tags: c.tags,
        unique_states: c.unique_states,
        on_conflict: c.on_conflict.unwrap_or_default(),
        ..Default::default()
    };
    if let Some(ms) = c.unique_for_ms {
        if o.unique_key.is_none() {
            return Err(ApiError::bad(f("unique_for_ms"), "needs a unique_key"));
        }
        if ms == 0 || ms > MAX_MS {
            return Err(ApiError::bad(
                f("unique_for_ms"),
                format!("{ms} is out of range 1..={MAX_MS}"),
            ));
        }
        o.unique_for = Some(Duration::from_millis(ms));
    }
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

/// The API error of a failed enqueue, counting a full queue's refusal.
fn enqueue_failed(state: &AppState, e: crate::client::ClientError) -> ApiError {
    #[cfg(feature = "stats")]
    if let crate::client::ClientError::Store(crate::store::StoreError::QueueFull { queue, .. }) = &e
        && let Some(m) = &state.metrics
    {
        m.refused(queue);
    }
    #[cfg(not(feature = "stats"))]
    let _ = state;
    ApiError::from(e)
}

/// The trace an enqueue request continues.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Header)]
#[allow(dead_code)] // read from the headers by `traced`; here for the API document
pub(crate) struct TraceHeader {
    /// A W3C trace context (`00-<32 hex trace id>-<16 hex span id>-<2 hex
    /// flags>`): the enqueue continues that trace, and every attempt of
    /// the task is a span of it. A malformed value is ignored (a new trace
    /// begins), as W3C Trace Context asks.
    traceparent: Option<String>,
}

/// `task` continuing the request's `traceparent` header, when it is one.
fn traced(mut task: NewTask, headers: &axum::http::HeaderMap) -> NewTask {
    let tp = headers
        .get("traceparent")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|tp| crate::telemetry::parse_traceparent(tp).is_some());
    if let Some(tp) = tp {
        task.options.traceparent = Some(tp.to_string());
    }
    task
}

/// Create a task.
#[utoipa::path(post, path = "/api/v1/tasks", tag = "tasks", request_body = CreateTask,
    params(TraceHeader),
    responses(
        (status = 201, description = "Created", body = Task),
        (status = 200, description = "A task of the same kind holds `unique_key`: that task (with `on_conflict: replace`, updated)", body = Task),
        (status = 409, description = "`on_conflict: error` and a task holds `unique_key` (`duplicate`)", body = super::openapi::ErrorBody),
        (status = 400, description = "Bad body: `field` names it (`unknown_kind` for a kind this node does not run)", body = super::openapi::ErrorBody),
        (status = 413, description = "Body or args too large", body = super::openapi::ErrorBody),
        (status = 429, description = "The queue is at its max_depth (`queue_full`); nothing was created", body = super::openapi::ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ))]
pub(crate) async fn create_task(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let req: CreateTask = read_json(body, state.limits.max_body_bytes).await?;
    if req.reference.is_some() {
        return Err(ApiError::bad(
            "ref",
            "ref names a task for others of the same batch; use /tasks/batch",
        ));
    }
    let task = new_task(&state, req, "", &std::collections::HashMap::new())?;
    let task = traced(task, &headers);
    let inserted = state
        .client
        .insert(task)
        .await
        .map_err(|e| enqueue_failed(&state, e))?;
    count_enqueued(&state, std::slice::from_ref(&inserted));
    let status = if inserted.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(inserted.task)).into_response())
}

/// Tasks created together, in one transaction: all or none.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct CreateBatch {
    /// 1 to `server.max_batch` (10,000 by default) tasks.
    #[schema(min_items = 1)]
    tasks: Vec<CreateTask>,
}

/// Create many tasks at once; they may depend on each other by `ref`.
#[utoipa::path(post, path = "/api/v1/tasks/batch", tag = "tasks", request_body = CreateBatch,
    params(TraceHeader),
    responses(
        (status = 201, description = "Created (a task whose `unique_key` was held is the existing one)", body = TaskBatch),
        (status = 409, description = "A task with `on_conflict: error` found its `unique_key` held (`duplicate`); nothing was created", body = super::openapi::ErrorBody),
        (status = 400, description = "Bad body: `field` names the task, e.g. `tasks[3].priority`", body = super::openapi::ErrorBody),
        (status = 413, description = "Body, args or batch too large", body = super::openapi::ErrorBody),
        (status = 429, description = "The queue is at its max_depth (`queue_full`); nothing was created", body = super::openapi::ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ))]
pub(crate) async fn create_batch(
    State(state): State<AppState>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
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
        .map(|t| t.map(|t| traced(t, &headers)))
        .collect::<Result<Vec<_>, _>>()?;
    let inserted = state
        .client
        .insert_many(tasks)
        .await
        .map_err(|e| enqueue_failed(&state, e))?;
    count_enqueued(&state, &inserted);
    let tasks: Vec<Task> = inserted.into_iter().map(|i| i.task).collect();
    Ok((StatusCode::CREATED, Json(TaskBatch { tasks })).into_response())
}

fn parse_id(raw: &str) -> Result<TaskId, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::bad("id", format!("{raw:?} is not a task id")))
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct GetQuery {
    /// Long-poll: answer when the task finishes or after this long
    /// (`30s`, `500ms`, `2m`; at most `server.max_wait`, 300 s by default),
    /// with the task as it is then.
    #[param(example = "30s", pattern = r"^[0-9]+(\.[0-9]+)?(ms|s|m|h|d)$")]
    wait: Option<String>,
}

/// One task; with `?wait=`, once it finishes.
#[utoipa::path(get, path = "/api/v1/tasks/{id}", tag = "tasks",
    params(("id" = i64, Path, description = "Task id"), GetQuery),
    responses(
        (status = 200, description = "The task", body = Task),
        (status = 400, description = "Bad id or wait", body = super::openapi::ErrorBody),
        (status = 404, description = "No such task", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn get_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(q): Query<GetQuery>,
) -> Result<Json<Task>, ApiError> {
    let id = parse_id(&id)?;
    let wait = match q.wait.as_deref() {
        None => Duration::ZERO,
        Some(w) => {
            let d = duration::parse(w).map_err(|e| ApiError::bad("wait", e))?;
            if d > state.limits.max_wait {
                return Err(ApiError::bad(
                    "wait",
                    format!("at most {:?} (server.max_wait)", state.limits.max_wait),
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

/// How often an event stream looks at its task (a finish is seen at once).
const EVENTS_EVERY: Duration = Duration::from_secs(1);

/// What an event stream remembers between looks.
struct Watch {
    state: AppState,
    id: TaskId,
    /// The task as first read, sent as the first event.
    first: Option<Task>,
    last: Option<Task>,
    queued: std::collections::VecDeque<axum::response::sse::Event>,
    done: bool,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

fn sse_event(name: &str, data: &impl serde::Serialize) -> axum::response::sse::Event {
    axum::response::sse::Event::default()
        .event(name)
        .data(serde_json::to_string(data).unwrap_or_else(|_| "null".into()))
}

impl Watch {
    /// The events between `last` and `now`.
    fn diff(&mut self, now: Task) {
        let changed = |a: &Task, b: &Task| {
            a.state != b.state || a.attempt != b.attempt || a.claim_token != b.claim_token
        };
        match &self.last {
            Some(last) if !changed(last, &now) => {
                if last.progress != now.progress {
                    self.queued.push_back(sse_event(
                        "progress",
                        &serde_json::json!({"id": now.id, "progress": now.progress}),
                    ));
                }
            }
            _ => self.queued.push_back(sse_event("state", &now)),
        }
        if now.state.is_finished() {
            self.done = true;
        }
        self.last = Some(now);
    }

    async fn next(
        mut self,
    ) -> Option<(
        Result<axum::response::sse::Event, std::convert::Infallible>,
        Self,
    )> {
        loop {
            if let Some(e) = self.queued.pop_front() {
                return Some((Ok(e), self));
            }
            if self.done {
                return None;
            }
            let now = match self.first.take() {
                Some(t) => t,
                None => tokio::select! {
                    r = self.state.client.wait_for(self.id, EVENTS_EVERY) => match r {
                        Ok(t) => t,
                        Err(e) => {
                            let e = ApiError::from(e);
                            self.queued.push_back(sse_event(
                                "error",
                                &serde_json::json!({"code": e.code, "message": e.message}),
                            ));
                            self.done = true;
                            continue;
                        }
                    },
                    _ = self.state.stopping.cancelled() => return None,
                },
            };
            self.diff(now);
        }
    }
}

/// Server-Sent Events of one task until it finishes: `state` (the whole
/// task) first and whenever its state or attempt changes, `progress`
/// (`{"id", "progress"}`) when only its progress changes, then the stream
/// ends after the finished task's `state`. An `error` event
/// (`{"code", "message"}`) ends it early when the store fails.
#[utoipa::path(get, path = "/api/v1/tasks/{id}/events", tag = "tasks",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 200, description = "`text/event-stream` of `state`, `progress` and `error` events", content_type = "text/event-stream", body = super::openapi::TaskEvent),
        (status = 400, description = "Bad id", body = super::openapi::ErrorBody),
        (status = 404, description = "No such task", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn task_events(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let id = parse_id(&id)?;
    let permit = state.streams.clone().try_acquire_owned().map_err(|_| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            format!(
                "this node serves {} event streams already; use ?wait= on GET /tasks/{{id}}",
                super::MAX_EVENT_STREAMS
            ),
        )
    })?;
    let first = state.client.get(id).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("task {id} not found"),
        )
    })?;
    let watch = Watch {
        state,
        id,
        first: Some(first),
        last: None,
        queued: Default::default(),
        done: false,
        _permit: permit,
    };
    let stream = futures::stream::unfold(watch, Watch::next);
    Ok(axum::response::sse::Sse::new(stream)
        .keep_alive(axum::response::sse::KeepAlive::default())
        .into_response())
}

#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct ListQuery {
    /// Only tasks in this state.
    #[param(value_type = Option<TaskState>)]
    state: Option<String>,
    /// Only tasks of this queue (empty: any).
    queue: Option<String>,
    /// Only tasks of this kind (empty: any).
    kind: Option<String>,
    /// Only tasks carrying this tag (empty: any). Index-backed: the tag's
    /// tasks are walked newest first.
    tag: Option<String>,
    /// Only tasks whose args contain this JSON object (URL-encoded), as
    /// PostgreSQL's `jsonb @>` decides: `{"user":{"id":42}}` matches args
    /// with that user id whatever else they hold. It filters the tasks the
    /// other filters walk, so narrow it with `tag`, `kind`, `queue` or
    /// `state`: a page costs as many rows as it skips.
    #[param(value_type = Option<String>, example = json!("{\"user\":{\"id\":42}}"))]
    args: Option<String>,
    /// Page size, 1..=1000 (default 100).
    #[param(value_type = Option<u16>, minimum = 1, maximum = 1000)]
    limit: Option<String>,
    /// `next_cursor` of the previous page (empty or absent: the first page).
    #[param(pattern = "^[0-9]*$")]
    cursor: Option<String>,
}

/// Tasks, newest first, a page at a time.
#[utoipa::path(get, path = "/api/v1/tasks", tag = "tasks", params(ListQuery),
    responses(
        (status = 200, description = "A page of tasks", body = TaskPage),
        (status = 400, description = "Bad filter", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn list_tasks(
    State(state): State<AppState>,
    Query(q): Query<ListQuery>,
) -> Result<Json<TaskPage>, ApiError> {
    // An empty `state` or `limit` is an error like any other value they do
    // not take; an empty `queue` or `kind` filters nothing, and an empty
    // `cursor` is the first page.
    let st = match q.state.as_deref() {
        None => None,
        Some(s) => Some(
            s.parse::<TaskState>()
                .map_err(|e| ApiError::bad("state", e.to_string()))?,
        ),
    };
    let limit = match q.limit.as_deref() {
        None => 100,
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
    let args = match q.args.as_deref() {
        None | Some("") => None,
        Some(a) => match serde_json::from_str::<Value>(a) {
            Ok(v) if crate::store::lifecycle::has_nul(&v) => {
                return Err(ApiError::bad("args", "holds a NUL character"));
            }
            Ok(v @ Value::Object(_)) => Some(v),
            Ok(_) => return Err(ApiError::bad("args", "must be a JSON object")),
            Err(e) => return Err(ApiError::bad("args", format!("not JSON: {e}"))),
        },
    };
    let tasks = state
        .client
        .list(ListParams {
            state: st,
            queue: q.queue.filter(|s| !s.is_empty()),
            kind: q.kind.filter(|s| !s.is_empty()),
            tag: q.tag.filter(|s| !s.is_empty()),
            args,
            before,
            limit,
        })
        .await?;
    let next = (tasks.len() == limit)
        .then(|| tasks.last().map(|t| t.id.to_string()))
        .flatten();
    Ok(Json(TaskPage {
        tasks,
        next_cursor: next,
    }))
}

/// Cancel a task that has not finished (a running one is told to stop).
#[utoipa::path(post, path = "/api/v1/tasks/{id}/cancel", tag = "tasks",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task, cancelled", body = Task),
        (status = 400, description = "Bad id", body = super::openapi::ErrorBody),
        (status = 404, description = "No such task", body = super::openapi::ErrorBody),
        (status = 409, description = "The task has finished", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn cancel_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.client.cancel(parse_id(&id)?).await?))
}

/// Run a failed or cancelled task again, with a fresh set of attempts.
#[utoipa::path(post, path = "/api/v1/tasks/{id}/retry", tag = "tasks",
    params(("id" = i64, Path, description = "Task id")),
    responses(
        (status = 200, description = "The task, available again", body = Task),
        (status = 400, description = "Bad id", body = super::openapi::ErrorBody),
        (status = 404, description = "No such task", body = super::openapi::ErrorBody),
        (status = 409, description = "The task is not failed or cancelled", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn retry_task(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<Task>, ApiError> {
    Ok(Json(state.client.retry(parse_id(&id)?).await?))
}

/// Most ids one bulk retry may name.
const MAX_BULK: usize = 1000;

/// Task ids to retry.
#[derive(Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RetryMany {
    /// 1 to 1000 ids, as numbers or strings of digits.
    #[schema(value_type = Vec<i64>, min_items = 1, max_items = 1000)]
    ids: Vec<Value>,
}

/// Retry many tasks (the dashboard's "retry selected").
/// Each id succeeds or fails on its own; the answer lists both.
#[utoipa::path(post, path = "/api/v1/tasks/retry", tag = "tasks", request_body = RetryMany,
    responses(
        (status = 200, description = "What was retried, and why the others were not", body = RetryManyResult),
        (status = 400, description = "Bad body", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn retry_many(
    State(state): State<AppState>,
    body: Body,
) -> Result<Json<RetryManyResult>, ApiError> {
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
            // JSON has one number type: `7.0` is the integer 7 (as
            // JSON Schema's `integer` says), so clients that write
            // integers as floats are understood.
            Value::Number(n) => n.as_i64().or_else(|| integral(n.as_f64()?)).map(TaskId),
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
                errors.push(RetryError {
                    id: id.to_string(),
                    code: e.code.to_string(),
                    message: e.message,
                });
            }
        }
    }
    Ok(Json(RetryManyResult { retried, errors }))
}

/// `f` as an i64 when it is a whole number that a float holds exactly
/// (|f| <= 2^53: past that, a float names several integers).
fn integral(f: f64) -> Option<i64> {
    const EXACT: f64 = 9_007_199_254_740_992.0;
    (f.fract() == 0.0 && f.abs() <= EXACT).then_some(f as i64)
}

/// The queues this node serves, which are known even before they hold tasks.
fn local_queues(state: &AppState) -> impl Iterator<Item = String> + '_ {
    state.pool.queues().iter().map(|(q, _)| q.clone())
}

/// Every queue known to the cluster, with its counts by state.
#[utoipa::path(get, path = "/api/v1/queues", tag = "queues",
    responses((status = 200, description = "The queues", body = QueueList)))]
pub(crate) async fn list_queues(
    State(state): State<AppState>,
) -> Result<Json<QueueList>, ApiError> {
    let local: BTreeMap<_, _> = state.pool.queue_workers().into_iter().collect();
    let queues = state
        .client
        .queues(local_queues(&state))
        .await?
        .into_iter()
        .map(|info| QueueView {
            concurrency: local.get(&info.name).copied(),
            info,
        })
        .collect();
    Ok(Json(QueueList { queues }))
}

/// One queue: counts, pause, lag and settings.
#[utoipa::path(get, path = "/api/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "The queue", body = QueueView),
        (status = 404, description = "No such queue", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn get_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Json<QueueView>, ApiError> {
    let Json(list) = list_queues(State(state)).await?;
    list.queues
        .into_iter()
        .find(|q| q.info.name == queue)
        .map(Json)
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("unknown queue {queue:?}"),
            )
            .field("queue")
        })
}

/// `Option<Option<T>>` from a field: absent `None`, `null` `Some(None)`.
fn present<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(
    d: D,
) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

/// Settings to change for the whole cluster; a field left out keeps its
/// value, `null` removes a limit (for `workers`: back to each node's
/// configured count). Every node applies a change within one poll interval
/// (on PostgreSQL at once, by notification).
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct QueuePatch {
    /// At most this many unfinished tasks; an enqueue past it gets 429
    /// `queue_full`. `null` removes the cap.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 2_147_483_647)]
    max_depth: Option<Option<u32>>,
    /// Workers on each node that serves the queue.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 10_000)]
    workers: Option<Option<u32>>,
    /// At most this many of the queue's tasks run at once, on all nodes.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 2_147_483_647)]
    global_concurrency: Option<Option<u32>>,
    /// At most this many tasks with one `concurrency_key` run at once.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<u32>, minimum = 1, maximum = 2_147_483_647)]
    per_key_concurrency: Option<Option<u32>>,
    /// At most `max` task starts per `per_ms` ms, on all nodes together.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<crate::store::RateLimit>)]
    rate_limit: Option<Option<crate::store::RateLimit>>,
    /// `round_robin`: claims take tasks across concurrency keys in turn;
    /// `none` (or `null`): most urgent first.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<crate::store::Fairness>)]
    fairness: Option<Option<crate::store::Fairness>>,
    /// Pause (true) or resume (false) the queue on every node.
    paused: Option<bool>,
}

/// Change a queue's settings for the whole cluster, at run time.
#[utoipa::path(patch, path = "/api/v1/queues/{queue}", tag = "queues",
    params(("queue" = String, Path, description = "Queue name")),
    request_body = QueuePatch,
    responses(
        (status = 200, description = "The queue with its new settings", body = QueueView),
        (status = 400, description = "Bad body: `field` names it", body = super::openapi::ErrorBody),
        (status = 404, description = "The patch sets nothing and the queue is unknown", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn patch_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
    body: Body,
) -> Result<Json<QueueView>, ApiError> {
    let patch: QueuePatch = read_json(body, state.limits.max_body_bytes).await?;
    let changes_settings = patch.max_depth.is_some()
        || patch.workers.is_some()
        || patch.global_concurrency.is_some()
        || patch.per_key_concurrency.is_some()
        || patch.rate_limit.is_some()
        || patch.fairness.is_some();
    if changes_settings {
        let stored = state.client.queue_settings().await?.remove(&queue);
        // A queue whose limits were never stored runs on this node's
        // configured ones: the patch starts from those.
        let mut settings = match stored {
            Some(s) if s.has_limits() => s,
            other => {
                let configured = state.pool.configured_limits(&queue);
                crate::store::QueueSettings {
                    max_depth: other.and_then(|s| s.max_depth),
                    ..Default::default()
                }
                .with_limits(&configured)
            }
        };
        if let Some(v) = patch.max_depth {
            settings.max_depth = v;
        }
        if let Some(v) = patch.workers {
            settings.workers = v;
        }
        if let Some(v) = patch.global_concurrency {
            settings.global_concurrency = v;
        }
        if let Some(v) = patch.per_key_concurrency {
            settings.per_key_concurrency = v;
        }
        if let Some(v) = patch.rate_limit {
            settings.rate_limit = v;
        }
        if let Some(v) = patch.fairness {
            settings.fairness = v.filter(|f| *f != crate::store::Fairness::None);
        }
        state.client.queue_set_settings(&queue, settings).await?;
        tracing::info!(queue = %queue, ?settings, "queue settings changed");
    }
    if let Some(paused) = patch.paused {
        check_queue_name(&queue)?;
        state.client.queue_set_paused(&queue, paused).await?;
        tracing::info!(queue = %queue, paused, "queue {}", if paused { "paused" } else { "resumed" });
    }
    get_queue(State(state), Path(queue)).await
}

/// A queue name a setting may be stored under.
fn check_queue_name(queue: &str) -> Result<(), ApiError> {
    if queue.trim().is_empty() || queue.len() > crate::client::MAX_NAME_BYTES {
        return Err(ApiError::bad(
            "queue",
            format!(
                "{queue:?} is not a queue name (1 to {} bytes)",
                crate::client::MAX_NAME_BYTES
            ),
        ));
    }
    Ok(())
}

async fn set_paused(
    state: AppState,
    queue: String,
    paused: bool,
) -> Result<Json<QueuePaused>, ApiError> {
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
    Ok(Json(QueuePaused {
        name: queue,
        paused,
    }))
}

/// Stop every node claiming from a queue (running tasks finish).
#[utoipa::path(post, path = "/api/v1/queues/{queue}/pause", tag = "queues",
    params(("queue" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "Paused", body = QueuePaused),
        (status = 404, description = "No such queue", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn pause_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Json<QueuePaused>, ApiError> {
    set_paused(state, queue, true).await
}

/// Let nodes claim from a paused queue again.
#[utoipa::path(post, path = "/api/v1/queues/{queue}/resume", tag = "queues",
    params(("queue" = String, Path, description = "Queue name")),
    responses(
        (status = 200, description = "Resumed", body = QueuePaused),
        (status = 404, description = "No such queue", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn resume_queue(
    State(state): State<AppState>,
    Path(queue): Path<String>,
) -> Result<Json<QueuePaused>, ApiError> {
    set_paused(state, queue, false).await
}

/// The live nodes of the cluster.
#[utoipa::path(get, path = "/api/v1/nodes", tag = "nodes",
    responses((status = 200, description = "The nodes", body = NodeList)))]
pub(crate) async fn list_nodes(State(state): State<AppState>) -> Result<Json<NodeList>, ApiError> {
    let now = Utc::now();
    let nodes = state
        .client
        .nodes()
        .await?
        .into_iter()
        .map(|info| NodeView {
            heartbeat_age_ms: (now - info.heartbeat_at).num_milliseconds().max(0),
            info,
        })
        .collect();
    Ok(Json(NodeList { nodes }))
}

/// Every schedule, from the config files and the API.
#[utoipa::path(get, path = "/api/v1/schedules", tag = "schedules",
    responses((status = 200, description = "The schedules", body = ScheduleList)))]
pub(crate) async fn list_schedules(
    State(state): State<AppState>,
) -> Result<Json<ScheduleList>, ApiError> {
    let schedules = state.client.schedules().await?;
    Ok(Json(ScheduleList { schedules }))
}

/// Add a schedule, or replace the one of the same name.
#[utoipa::path(post, path = "/api/v1/schedules", tag = "schedules",
    request_body = crate::cron::ScheduleSpec,
    responses(
        (status = 201, description = "Stored", body = crate::cron::ScheduleView),
        (status = 400, description = "Bad spec: `field` names it", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn put_schedule(
    State(state): State<AppState>,
    body: Body,
) -> Result<Response, ApiError> {
    let spec: crate::cron::ScheduleSpec = read_json(body, state.limits.max_body_bytes).await?;
    if !state.registry.contains(&spec.kind) {
        return Err(
            ApiError::bad("kind", format!("unknown kind {:?}", spec.kind))
                .with_code("unknown_kind"),
        );
    }
    let view = state.client.schedule_put(spec).await?;
    Ok((StatusCode::CREATED, Json(view)).into_response())
}

/// Remove a schedule (tasks it already enqueued stay).
#[utoipa::path(delete, path = "/api/v1/schedules/{name}", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 200, description = "Removed", body = Deleted),
        (status = 404, description = "No such schedule", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn delete_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<Deleted>, ApiError> {
    if state.client.schedule_delete(&name).await? {
        Ok(Json(Deleted { deleted: name }))
    } else {
        Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no schedule {name:?}"),
        )
        .field("name"))
    }
}

/// Pause a schedule: its ticks pass without enqueuing until it is resumed
/// (the leader reads the flag at every tick, so the whole cluster stops at once).
#[utoipa::path(post, path = "/api/v1/schedules/{name}/pause", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 200, description = "Paused", body = crate::cron::ScheduleView),
        (status = 404, description = "No such schedule", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn pause_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<crate::cron::ScheduleView>, ApiError> {
    set_schedule_paused(state, name, true).await
}

async fn set_schedule_paused(
    state: AppState,
    name: String,
    paused: bool,
) -> Result<Json<crate::cron::ScheduleView>, ApiError> {
    let view = state.client.schedule_set_paused(&name, paused).await?;
    tracing::info!(schedule = %name, paused, "schedule {}", if paused { "paused" } else { "resumed" });
    Ok(Json(view))
}

/// Resume a paused schedule from its next tick (ticks missed while paused
/// are not enqueued).
#[utoipa::path(post, path = "/api/v1/schedules/{name}/resume", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 200, description = "Resumed", body = crate::cron::ScheduleView),
        (status = 404, description = "No such schedule", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn resume_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<crate::cron::ScheduleView>, ApiError> {
    set_schedule_paused(state, name, false).await
}

/// Run a schedule's task now, once, outside its ticks (paused or not).
#[utoipa::path(post, path = "/api/v1/schedules/{name}/trigger", tag = "schedules",
    params(("name" = String, Path, description = "Schedule name")),
    responses(
        (status = 201, description = "The task enqueued", body = Task),
        (status = 200, description = "`overlap: skip` and the schedule's last task is unfinished: that task", body = Task),
        (status = 404, description = "No such schedule", body = super::openapi::ErrorBody),
        (status = 429, description = "The queue is at its max_depth (`queue_full`); nothing was created", body = super::openapi::ErrorBody,
            headers(("Retry-After" = u32, description = "Seconds to wait before trying again"))),
    ))]
pub(crate) async fn trigger_schedule(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Response, ApiError> {
    let inserted = state
        .client
        .schedule_trigger(&name)
        .await
        .map_err(|e| enqueue_failed(&state, e))?;
    count_enqueued(&state, std::slice::from_ref(&inserted));
    tracing::info!(schedule = %name, task = %inserted.task.id, existing = inserted.existing, "schedule triggered");
    let status = if inserted.existing {
        StatusCode::OK
    } else {
        StatusCode::CREATED
    };
    Ok((status, Json(inserted.task)).into_response())
}

/// Liveness: the process answers.
#[utoipa::path(get, path = "/healthz", tag = "probes", security(),
    responses((status = 200, description = "Alive", body = Health)))]
pub(crate) async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}

/// Readiness: the store answers.
#[utoipa::path(get, path = "/readyz", tag = "probes", security(),
    responses(
        (status = 200, description = "Ready", body = Health),
        (status = 503, description = "The store does not answer", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn readyz(State(state): State<AppState>) -> Response {
    match state.client.ping().await {
        Ok(_) => Json(Health {
            status: "ready".into(),
        })
        .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}
