//! The node's HTTP server: the API under `/api/v1`, `/healthz`, `/readyz`,
//! `/metrics` and the dashboard at `/`.
//!
//! # Security
//!
//! The API can run programs (through the `shell` executor, itself off until
//! configured). The server binds 127.0.0.1 by default; with
//! `server.auth_token` set, every `/api` route needs
//! `Authorization: Bearer <token>`, compared in constant time. `/healthz`,
//! `/readyz` and `/metrics` stay open so probes and Prometheus can reach them,
//! and so does the dashboard's page (it holds no data; its script asks for
//! the token and sends it to the API).

pub mod api;
pub mod audit;
pub mod auth;
pub mod dashboard;
pub mod guard;
#[cfg(feature = "stats")]
pub mod metrics;
pub mod openapi;

use std::future::Future;
use std::sync::Arc;

use axum::Router;

use axum::http::StatusCode;

use axum::response::{IntoResponse, Response};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::client::{Client, ClientError};
use crate::pool::WorkerPool;
use crate::registry::TaskRegistry;
use crate::store::StoreError;

/// Limits on what one request may carry.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_args_bytes: usize,
    pub max_batch: usize,
    /// Longest `?wait=` long-poll (`server.max_wait`).
    pub max_wait: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_body_bytes: 64 << 20,
            max_args_bytes: 1 << 20,
            max_batch: 10_000,
            max_wait: std::time::Duration::from_secs(300),
        }
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct AppState {
    pub(crate) client: Client,
    pub(crate) registry: Arc<TaskRegistry>,
    pub(crate) pool: Arc<WorkerPool>,
    pub(crate) limits: Limits,
    /// The tokens the API accepts (none: every caller is admin).
    pub(crate) tokens: Arc<Vec<auth::ApiToken>>,
    /// Fires when the server stops: long-polls return early.
    pub(crate) stopping: CancellationToken,
    /// Event streams (`/tasks/{id}/events`) open at once, at most
    /// [`MAX_EVENT_STREAMS`]: each reads its task about twice a second.
    pub(crate) streams: Arc<tokio::sync::Semaphore>,
    /// Cluster throughput over the last minutes, for the dashboard.
    pub(crate) history: Arc<dashboard::History>,
    /// What browsers may do (see [`guard`]).
    pub(crate) browser: Arc<guard::BrowserPolicy>,
    #[cfg(feature = "stats")]
    pub(crate) metrics: Option<Arc<metrics::Metrics>>,
}

impl std::fmt::Debug for AppState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("node", &self.pool.node_name())
            .field("limits", &self.limits)
            .field("tokens", &self.tokens)
            .finish()
    }
}

impl AppState {
    /// State for a server in front of `pool`. `token`: the bearer token, if any.
    pub fn new(pool: Arc<WorkerPool>, limits: Limits, token: Option<String>) -> Self {
        AppState {
            client: pool.client(),
            registry: pool.registry().clone(),
            pool,
            limits,
            tokens: Arc::new(
                token
                    .map(|t| auth::ApiToken {
                        name: "default".into(),
                        secret: Arc::from(t),
                        role: auth::Role::Admin,
                    })
                    .into_iter()
                    .collect(),
            ),
            stopping: CancellationToken::new(),
            streams: Arc::new(tokio::sync::Semaphore::new(MAX_EVENT_STREAMS)),
            history: Arc::default(),
            browser: Arc::default(),
            #[cfg(feature = "stats")]
            metrics: None,
        }
    }

    /// Accept browsers' requests as `policy` says (the node sets it from
    /// its listen address and config; without it, only `Origin` and
    /// `Content-Type` are checked).
    pub fn with_browser_policy(mut self, policy: guard::BrowserPolicy) -> Self {
        self.browser = Arc::new(policy);
        self
    }

    /// Accept these tokens too (each with its role).
    pub fn with_tokens(mut self, tokens: Vec<auth::ApiToken>) -> Self {
        let mut all = (*self.tokens).clone();
        all.extend(tokens);
        self.tokens = Arc::new(all);
        self
    }

    /// Whether requests need a bearer token.
    pub fn has_token(&self) -> bool {
        !self.tokens.is_empty()
    }

    /// Export metrics at /metrics (build the pool with [`metrics::Metrics`] as its observer).
    #[cfg(feature = "stats")]
    pub fn with_metrics(mut self, m: Arc<metrics::Metrics>) -> Self {
        self.metrics = Some(m);
        self
    }
}

/// An API error: `{"error": {"code", "message", "field"}}` with its status.
#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    /// Seconds for a `Retry-After` header (429 and 503).
    pub retry_after: Option<u32>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }
    pub fn bad(field: impl Into<String>, message: impl Into<String>) -> Self {
        ApiError {
            status: StatusCode::BAD_REQUEST,
            code: "invalid",
            message: message.into(),
            field: Some(field.into()),
            retry_after: None,
        }
    }
    pub fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body =
            json!({"error": {"code": self.code, "message": self.message, "field": self.field}});
        let mut r = (self.status, axum::Json(body)).into_response();
        if let Some(secs) = self.retry_after {
            r.headers_mut()
                .insert(axum::http::header::RETRY_AFTER, secs.into());
        }
        r
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "not_found", e.to_string())
            }
            StoreError::Conflict { .. } => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            StoreError::Duplicate { .. } => {
                ApiError::new(StatusCode::CONFLICT, "duplicate", e.to_string()).field("unique_key")
            }
            StoreError::QueueFull { .. } => {
                let mut a =
                    ApiError::new(StatusCode::TOO_MANY_REQUESTS, "queue_full", e.to_string())
                        .field("queue");
                a.retry_after = Some(QUEUE_FULL_RETRY_AFTER);
                a
            }
            StoreError::Invalid { ref field, .. } => {
                let field = field.clone();
                let e = ApiError::new(StatusCode::BAD_REQUEST, "invalid", e.to_string());
                match field {
                    Some(f) => e.field(f),
                    None => e,
                }
            }
            StoreError::Unavailable { .. } | StoreError::Schema(_) => {
                tracing::warn!(error = %e, "store unavailable");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "unavailable",
                    e.to_string(),
                )
            }
        }
    }
}

impl From<ClientError> for ApiError {
    fn from(e: ClientError) -> Self {
        match e {
            ClientError::Invalid { field, message } => ApiError::bad(field, message),
            ClientError::Store(s) => s.into(),
            ClientError::NotFound(m) => ApiError::new(StatusCode::NOT_FOUND, "not_found", m),
            ClientError::WaitTimeout(id) => ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "timeout",
                format!("task {id} did not finish"),
            ),
        }
    }
}

/// `Query<T>` whose rejection is an [`ApiError`] (400, `field: "query"`),
/// so a bad query string gets the API's error shape, not axum's plain text.
pub(crate) struct ApiQuery<T>(pub T);

impl<T: serde::de::DeserializeOwned, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiQuery<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, ApiError> {
        // No store takes a NUL in a text value (PostgreSQL refuses it).
        if let Ok(axum::extract::Query(pairs)) =
            axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
            && let Some((k, _)) = pairs.iter().find(|(_, v)| v.contains('\0'))
        {
            return Err(ApiError::bad(k.clone(), "holds a NUL character"));
        }
        axum::extract::Query::<T>::try_from_uri(&parts.uri)
            .map(|axum::extract::Query(q)| ApiQuery(q))
            .map_err(|e| ApiError::bad("query", e.body_text()))
    }
}

/// `Path<T>` whose rejection is an [`ApiError`] (400, `field: "path"`).
pub(crate) struct ApiPath<T>(pub T);

impl<T: serde::de::DeserializeOwned + Send, S: Send + Sync> axum::extract::FromRequestParts<S>
    for ApiPath<T>
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, ApiError> {
        if let Ok(axum::extract::Path(params)) =
            axum::extract::Path::<Vec<(String, String)>>::from_request_parts(parts, state).await
            && let Some((k, _)) = params.iter().find(|(_, v)| v.contains('\0'))
        {
            return Err(ApiError::bad(k.clone(), "holds a NUL character"));
        }
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(p)| ApiPath(p))
            .map_err(|e| ApiError::bad("path", e.body_text()))
    }
}

/// Most task event streams one node serves at once (503 past it).
pub const MAX_EVENT_STREAMS: usize = 256;

/// The `Retry-After` (seconds) of a 429 `queue_full`: a full queue drains
/// at the speed of its workers, so a client should not hammer it.
pub const QUEUE_FULL_RETRY_AFTER: u32 = 1;

/// The whole app: API (behind the token), probes and metrics.
pub fn router(state: AppState) -> Router {
    // The token is checked first (outer), then actions are recorded with
    // the caller it found.
    let api = api::routes()
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            audit::record,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::require_token,
        ));
    let app = Router::new()
        .nest("/api/v1", api)
        .route("/healthz", axum::routing::get(api::healthz))
        .route("/readyz", axum::routing::get(api::readyz))
        .route("/", axum::routing::get(dashboard::page))
        .route(
            "/assets/dashboard.js",
            axum::routing::get(dashboard::script),
        )
        .route(
            "/assets/dashboard.css",
            axum::routing::get(dashboard::style),
        );
    #[cfg(feature = "stats")]
    let app = app.route("/metrics", axum::routing::get(metrics::handler));
    app.fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such route") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            guard::guard,
        ))
        .with_state(state)
}

/// Serve `state` on `listener` until `shutdown` resolves, then finish
/// in-flight requests (long-polls return at once).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let stopping = state.stopping.clone();
    tokio::spawn(dashboard::run_sampler(state.clone()));
    let app = router(state);
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(async move {
        shutdown.await;
        stopping.cancel();
    })
    .await
}

/// True for addresses only this machine can reach.
pub fn is_loopback(addr: &std::net::SocketAddr) -> bool {
    addr.ip().is_loopback()
}
