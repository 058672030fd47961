//! The OpenAPI 3.1 document of the HTTP API, built from the handlers'
//! `#[utoipa::path]` attributes and the types they take and answer with.
//!
//! Served at `GET /api/v1/openapi.json` (behind the same token as the rest of
//! the API) and written to `docs/openapi.json` by `proto_tasker openapi`; a
//! test checks that the two are the same, and CI runs Schemathesis against a
//! live node with it (`tests/openapi.rs`).

use axum::Json;
use serde::Serialize;
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{Content, RefOr, ResponseBuilder};
use utoipa::{Modify, OpenApi, ToSchema};

use crate::client::QueueInfo;
use crate::cron::ScheduleView;
use crate::store::NodeInfo;
use crate::task::Task;

/// Every error: `{"error": {"code", "message", "field"}}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorBody {
    error: ErrorDetail,
}

/// What went wrong.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ErrorDetail {
    /// Stable, for programs: `invalid`, `unknown_kind`, `not_found`,
    /// `conflict`, `too_large`, `queue_full`, `unauthorized`, `forbidden`,
    /// `unsupported_media_type`, `unavailable`.
    code: String,
    /// For people.
    message: String,
    /// The request field at fault, e.g. `tasks[3].priority` or `args.cmd`.
    field: Option<String>,
}

/// A page of tasks, newest first.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskPage {
    pub tasks: Vec<Task>,
    /// Pass as `?cursor=` for the next page; `null` on the last one.
    pub next_cursor: Option<String>,
}

/// The tasks of a batch, in the order they were sent.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct TaskBatch {
    pub tasks: Vec<Task>,
}

/// The answer to a bulk retry.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RetryManyResult {
    pub retried: Vec<Task>,
    pub errors: Vec<RetryError>,
}

/// Why one id of a bulk retry was not retried.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RetryError {
    pub id: String,
    pub code: String,
    pub message: String,
}

/// The cluster's queues.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueueList {
    pub queues: Vec<QueueView>,
}

/// A queue, with this node's worker count for it.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueueView {
    #[serde(flatten)]
    pub info: QueueInfo,
    /// Workers this node runs for the queue (`null`: it does not serve it).
    pub concurrency: Option<usize>,
}

/// A queue's pause state after a pause or resume.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct QueuePaused {
    pub name: String,
    pub paused: bool,
}

/// The cluster's live nodes.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NodeList {
    pub nodes: Vec<NodeView>,
}

/// A node, with how long ago it last wrote its heartbeat.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct NodeView {
    #[serde(flatten)]
    pub info: NodeInfo,
    pub heartbeat_age_ms: i64,
}

/// Every schedule.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct ScheduleList {
    pub schedules: Vec<ScheduleView>,
}

/// The name of what was deleted.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Deleted {
    pub deleted: String,
}

/// The name of a task event.
#[derive(Debug, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
#[allow(dead_code)] // Named for the document; the stream writes the names.
pub(crate) enum TaskEventName {
    State,
    Progress,
    Error,
}

/// One Server-Sent Event of `GET /tasks/{id}/events`, as an SSE parser
/// hands it over (keep-alive comments aside).
#[derive(Debug, Serialize, ToSchema)]
#[allow(dead_code)]
pub(crate) struct TaskEvent {
    event: TaskEventName,
    /// JSON text: the whole task (`state`), `{"id", "progress"}`
    /// (`progress`), or `{"code", "message"}` (`error`).
    data: String,
}

/// A probe's answer.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Health {
    /// `ok` (`/healthz`) or `ready` (`/readyz`).
    pub status: String,
}

#[derive(OpenApi)]
#[openapi(
    info(
        title = "proto_tasker",
        description = "The HTTP API of a proto_tasker node: create, watch and manage tasks, queues, \
            nodes and schedules. See docs/api.md for the rules (errors, long-polls, limits, security).",
        license(name = "MIT OR Apache-2.0", identifier = "MIT OR Apache-2.0"),
    ),
    paths(
        super::api::create_task,
        super::api::list_tasks,
        super::api::create_batch,
        super::api::retry_many,
        super::api::get_task,
        super::api::task_events,
        super::api::cancel_task,
        super::api::retry_task,
        super::api::list_queues,
        super::api::get_queue,
        super::api::patch_queue,
        super::api::pause_queue,
        super::api::resume_queue,
        super::api::list_nodes,
        super::api::list_schedules,
        super::api::put_schedule,
        super::api::delete_schedule,
        super::api::pause_schedule,
        super::api::resume_schedule,
        super::api::trigger_schedule,
        super::dashboard::stats,
        super::auth::whoami,
        super::audit::list,
        openapi_json,
        super::api::healthz,
        super::api::readyz,
    ),
    tags(
        (name = "tasks", description = "Create, find, cancel and retry tasks"),
        (name = "queues", description = "Queues and their counts; pause and resume"),
        (name = "nodes", description = "The cluster's nodes"),
        (name = "schedules", description = "Cron schedules"),
        (name = "cluster", description = "Throughput, the caller, the audit trail, this document"),
        (name = "probes", description = "Liveness, readiness and metrics (no token needed)"),
    ),
)]
struct ApiDoc;

/// Adds what every `/api/v1` route shares: the bearer token, and the
/// answers any of them may give before or around its handler (the token
/// and browser checks, a body that is not JSON, a store that is down).
struct Common;

impl Modify for Common {
    fn modify(&self, doc: &mut utoipa::openapi::OpenApi) {
        let components = doc.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .description(Some(
                        "`server.auth_token` or a token of `server.tokens` (roles read, \
                         operate, admin); no token is needed when the node sets none",
                    ))
                    .build(),
            ),
        );
        let error = |text: &str| -> RefOr<utoipa::openapi::Response> {
            RefOr::T(
                ResponseBuilder::new()
                    .description(text)
                    .content(
                        "application/json",
                        Content::new(Some(RefOr::Ref(utoipa::openapi::Ref::from_schema_name(
                            "ErrorBody",
                        )))),
                    )
                    .build(),
            )
        };
        for (path, item) in doc.paths.paths.iter_mut() {
            let api = path.starts_with("/api/v1");
            let ops = [
                (&mut item.get, false),
                (&mut item.post, true),
                (&mut item.patch, true),
                (&mut item.delete, false),
            ];
            for (op, has_body) in ops {
                let Some(op) = op.as_mut() else { continue };
                let r = &mut op.responses.responses;
                if api {
                    r.entry("401".into()).or_insert_with(|| {
                        error("A token is set and the request has none, or a wrong one")
                    });
                    r.entry("503".into())
                        .or_insert_with(|| error("The store cannot answer"));
                }
                // Any route: the browser rules of `guard`.
                r.entry("403".into()).or_insert_with(|| {
                    error("The token's role may not do this, or a browser's Origin or Host is not accepted")
                });
                if api && has_body {
                    r.entry("415".into())
                        .or_insert_with(|| error("The body is not `application/json`"));
                }
                if api {
                    // `security: [{bearer: []}, {}]`: the token when the node has one.
                    op.security = Some(vec![
                        utoipa::openapi::security::SecurityRequirement::new::<&str, [&str; 0], &str>(
                            "bearer",
                            [],
                        ),
                        utoipa::openapi::security::SecurityRequirement::default(),
                    ]);
                }
            }
        }
    }
}

#[cfg(feature = "stats")]
#[derive(OpenApi)]
#[openapi(paths(super::metrics::handler))]
struct MetricsDoc;

/// OpenAPI links: what a created task or schedule answers with feeds the
/// routes that take its id or name (generated clients and Schemathesis's
/// stateful phase follow them).
fn add_links(doc: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::link::LinkBuilder;
    let task_links = [
        ("GetTask", "get_task"),
        ("CancelTask", "cancel_task"),
        ("RetryTask", "retry_task"),
    ];
    let mut add = |path: &str, status: &str, links: &[(&str, &str)], param: &str, from: &str| {
        let Some(op) = doc
            .paths
            .paths
            .get_mut(path)
            .and_then(|item| item.post.as_mut())
        else {
            return;
        };
        if let Some(RefOr::T(resp)) = op.responses.responses.get_mut(status) {
            for (name, op_id) in links {
                resp.links.insert(
                    (*name).to_string(),
                    RefOr::T(
                        LinkBuilder::new()
                            .operation_id(*op_id)
                            .parameter(param, from)
                            .build(),
                    ),
                );
            }
        }
    };
    add(
        "/api/v1/tasks",
        "201",
        &task_links,
        "id",
        "$response.body#/id",
    );
    add(
        "/api/v1/tasks",
        "200",
        &task_links,
        "id",
        "$response.body#/id",
    );
    add(
        "/api/v1/schedules",
        "201",
        &[
            ("DeleteSchedule", "delete_schedule"),
            ("PauseSchedule", "pause_schedule"),
            ("ResumeSchedule", "resume_schedule"),
            ("TriggerSchedule", "trigger_schedule"),
        ],
        "name",
        "$response.body#/name",
    );
}

/// The document, as served and as written to `docs/openapi.json`.
pub fn document() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    #[cfg(feature = "stats")]
    doc.merge(MetricsDoc::openapi());
    Common.modify(&mut doc);
    add_links(&mut doc);
    doc.info.version = env!("CARGO_PKG_VERSION").to_string();
    doc
}

/// The document as pretty JSON with a final newline (`docs/openapi.json`).
pub fn document_json() -> String {
    let mut s = document()
        .to_pretty_json()
        .unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"));
    s.push('\n');
    s
}

/// This document.
#[utoipa::path(get, path = "/api/v1/openapi.json", tag = "cluster",
    responses((status = 200, description = "The OpenAPI 3.1 document of this API", content_type = "application/json")))]
pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(document())
}
