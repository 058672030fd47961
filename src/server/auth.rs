//! Who may call the API, and what each caller may do.
//!
//! # Roles
//!
//! - `read`: every `GET` route (tasks, queues, nodes, schedules, stats).
//! - `operate`: also create, cancel and retry tasks, pause and resume queues.
//! - `admin`: also add and remove schedules.
//!
//! Tokens come from `server.tokens` (each with a name, a role, and the secret
//! inline, in a file or in an environment variable) and from the single
//! `server.auth_token`, which is an `admin` token named `default`. Secrets are
//! compared in constant time and never logged: logs and errors name the
//! token. Without any token every caller is `admin` (loopback only, see the
//! guard).

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

use axum::Json;

use super::{ApiError, AppState};

/// What a token may do; each role may do all the ones before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Read,
    Operate,
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Read => "read",
            Role::Operate => "operate",
            Role::Admin => "admin",
        }
    }
}

/// A token the API accepts.
#[derive(Clone)]
pub struct ApiToken {
    pub name: String,
    pub secret: Arc<str>,
    pub role: Role,
}

impl std::fmt::Debug for ApiToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the secret.
        f.debug_struct("ApiToken")
            .field("name", &self.name)
            .field("role", &self.role)
            .finish()
    }
}

/// The caller of a request, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: String,
    pub role: Role,
}

/// The role a request needs.
pub fn needed(method: &Method, path: &str) -> Role {
    let path = path.trim_end_matches('/');
    if path.ends_with("/audit") {
        return Role::Admin;
    }
    if method == Method::GET || method == Method::HEAD || method == Method::OPTIONS {
        return Role::Read;
    }
    // Pausing, resuming and triggering a schedule are an operator's
    // actions (like pausing a queue or creating a task); adding and
    // removing schedules is an admin's.
    // Matched by shape (`POST .../schedules/{name}/{action}`), so that
    // deleting a schedule *named* `pause` still needs an admin.
    if let Some((_, rest)) = path.split_once("/schedules/")
        && method == Method::POST
        && let Some((name, action)) = rest.split_once('/')
        && !name.is_empty()
        && matches!(action, "pause" | "resume" | "trigger")
    {
        return Role::Operate;
    }
    if path.ends_with("/schedules") || path.contains("/schedules/") {
        return Role::Admin;
    }
    if path.ends_with("/audit") {
        return Role::Admin;
    }
    Role::Operate
}

/// Constant-time comparison: the time taken does not depend on where the
/// inputs differ (the length may show, which a token's length does anyway).
pub(crate) fn same_secret(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The middleware in front of `/api`: find the caller, check its role.
pub(crate) async fn require_token(
    State(state): State<AppState>,
    mut req: Request,
    next: Next,
) -> Response {
    let caller = if state.tokens.is_empty() {
        Caller {
            token: "anonymous".into(),
            role: Role::Admin,
        }
    } else {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim);
        let Some(given) = given else {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "missing Authorization: Bearer <token> header",
            )
            .into_response();
        };
        // Compare with every token, so the time taken does not tell which matched.
        let mut found = None;
        for t in state.tokens.iter() {
            if same_secret(given.as_bytes(), t.secret.as_bytes()) {
                found = Some(t);
            }
        }
        let Some(t) = found else {
            return ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "wrong bearer token",
            )
            .into_response();
        };
        Caller {
            token: t.name.clone(),
            role: t.role,
        }
    };
    let need = needed(req.method(), req.uri().path());
    if caller.role < need {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "this needs the {} role; token {:?} has {}",
                need.as_str(),
                caller.token,
                caller.role.as_str()
            ),
        )
        .into_response();
    }
    tracing::debug!(token = %caller.token, role = caller.role.as_str(), method = %req.method(), path = %req.uri().path(), "api call");
    req.extensions_mut().insert(caller);
    next.run(req).await
}

/// The caller's token name and role (the dashboard shows only what it may do).
/// Who the caller is: the token's name and role.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub(crate) struct Whoami {
    /// The token's name (`default` for `server.auth_token`, `anonymous`
    /// when the node sets no token).
    token: String,
    role: Role,
}

/// The caller's token name and role (the dashboard shows them).
#[utoipa::path(get, path = "/api/v1/whoami", tag = "cluster",
    responses((status = 200, description = "The caller", body = Whoami)))]
pub(crate) async fn whoami(axum::Extension(caller): axum::Extension<Caller>) -> Json<Whoami> {
    Json(Whoami {
        token: caller.token.to_string(),
        role: caller.role,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret(b"abc", b"abc"));
        assert!(!same_secret(b"abc", b"abd"));
        assert!(!same_secret(b"abc", b"ab"));
    }

    #[test]
    fn routes_need_their_roles() {
        assert_eq!(needed(&Method::GET, "/api/v1/tasks"), Role::Read);
        assert_eq!(needed(&Method::POST, "/api/v1/tasks"), Role::Operate);
        assert_eq!(
            needed(&Method::POST, "/api/v1/queues/q/pause"),
            Role::Operate
        );
        assert_eq!(needed(&Method::POST, "/api/v1/schedules"), Role::Admin);
        assert_eq!(needed(&Method::DELETE, "/api/v1/schedules/x"), Role::Admin);
        for action in ["pause", "resume", "trigger"] {
            assert_eq!(
                needed(&Method::POST, &format!("/api/v1/schedules/x/{action}")),
                Role::Operate
            );
            // A schedule named like an action is still removed by an admin only.
            assert_eq!(
                needed(&Method::DELETE, &format!("/api/v1/schedules/{action}")),
                Role::Admin
            );
        }
        assert_eq!(
            needed(&Method::POST, "/api/v1/schedules/x/y/trigger"),
            Role::Admin
        );
        assert!(Role::Read < Role::Operate && Role::Operate < Role::Admin);
    }
}
