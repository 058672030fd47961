//! The audit trail: every state-changing operator action (cancel, retry,
//! bulk retry, pause, resume, schedule add and remove) is stored with its
//! time, the token's name, the caller's address, the action, its target and
//! how it went, in the node's store (so the whole cluster's trail is in one
//! place), and pruned by `retention.audit`. `GET /api/v1/audit` (admin)
//! reads it, newest first. Creating tasks is not recorded: it is the API's
//! everyday traffic, not an operator's intervention.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::Response;

use axum::Json;
use serde::Deserialize;

use super::auth::Caller;
use super::{ApiError, AppState};
use crate::store::AuditEntry;

/// Is `METHOD path-template` an operator action the trail records?
fn recorded(method: &Method, template: &str) -> bool {
    matches!(
        (method.as_str(), template),
        ("POST", "/api/v1/tasks/{id}/cancel")
            | ("POST", "/api/v1/tasks/{id}/retry")
            | ("POST", "/api/v1/tasks/retry")
            | ("POST", "/api/v1/queues/{queue}/pause")
            | ("POST", "/api/v1/queues/{queue}/resume")
            | ("POST", "/api/v1/schedules")
            | ("DELETE", "/api/v1/schedules/{name}")
            | ("PATCH", "/api/v1/queues/{queue}")
            | ("POST", "/api/v1/schedules/{name}/pause")
            | ("POST", "/api/v1/schedules/{name}/resume")
            | ("POST", "/api/v1/schedules/{name}/trigger")
    )
}

/// The middleware: run the request, then record it when it is an action.
pub(crate) async fn record(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    if !recorded(req.method(), &template) {
        return next.run(req).await;
    }
    let method = req.method().clone();
    let target = req.uri().path().to_string();
    let token = req
        .extensions()
        .get::<Caller>()
        .map(|c| c.token.clone())
        .unwrap_or_else(|| "anonymous".into());
    let remote = req
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.to_string())
        .unwrap_or_default();
    let resp = next.run(req).await;
    let status = resp.status();
    let entry = AuditEntry {
        id: 0,
        at: chrono::Utc::now(),
        token,
        remote,
        action: format!("{method} {}", template.trim_start_matches("/api/v1")),
        target: target.trim_start_matches("/api/v1").to_string(),
        status: i32::from(status.as_u16()),
        outcome: if status.is_success() {
            "ok".into()
        } else {
            status.canonical_reason().unwrap_or("error").to_lowercase()
        },
    };
    if let Err(e) = state.client.audit_append(entry).await {
        tracing::warn!(error = %e, "could not record an operator action in the audit trail");
    }
    resp
}

#[derive(Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub(crate) struct AuditQuery {
    /// Page size, 1..=500 (default 50; larger values are cut to 500).
    #[param(minimum = 0)]
    limit: Option<usize>,
    /// `next_cursor` of the previous page (empty or absent: the first page).
    #[param(pattern = "^[0-9]*$")]
    cursor: Option<String>,
}

/// A page of the audit trail.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct AuditPage {
    entries: Vec<AuditEntry>,
    /// Pass as `?cursor=` for the next page; `null` on the last one.
    next_cursor: Option<String>,
}

/// The audit trail of operator actions, newest first (admin role).
#[utoipa::path(get, path = "/api/v1/audit", tag = "cluster", params(AuditQuery),
    responses(
        (status = 200, description = "A page of the trail", body = AuditPage),
        (status = 400, description = "Bad cursor or limit", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn list(
    State(state): State<AppState>,
    super::ApiQuery(q): super::ApiQuery<AuditQuery>,
) -> Result<Json<AuditPage>, ApiError> {
    let limit = q.limit.unwrap_or(50).clamp(1, 500);
    let before = match q.cursor.as_deref() {
        None | Some("") => None,
        Some(c) => Some(
            c.parse::<i64>()
                .map_err(|_| ApiError::bad("cursor", format!("{c:?} is not a cursor")))?,
        ),
    };
    let entries = state.client.audit(before, limit).await?;
    let next = (entries.len() == limit)
        .then(|| entries.last().map(|e| e.id.to_string()))
        .flatten();
    Ok(Json(AuditPage {
        entries,
        next_cursor: next,
    }))
}
