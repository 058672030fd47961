//! What a web page must not do to a node: drive its API from another
//! origin, or reach it by DNS rebinding.
//!
//! # Threat
//!
//! Any page the operator opens can send "simple" requests (a form post,
//! `fetch` with `text/plain`, `no-cors`) to `http://127.0.0.1:8080` without a
//! preflight, and a page on a domain that the attacker re-points at
//! 127.0.0.1 passes the same-origin rules and can read the answers.
//!
//! # Rules (every request)
//!
//! - `Host`: when the node listens on loopback, only `localhost`, a loopback
//!   address, the listen address or a name in `server.allowed_hosts` is
//!   served (403 otherwise): a rebound domain never matches.
//! - `Origin`: a request that carries one (browsers send it on every
//!   cross-origin request and on every POST) is served only when it is the
//!   node's own (`http(s)://` + the `Host` it was sent to) or listed in
//!   `server.cors_origins` (403 otherwise). Listed origins get CORS headers
//!   and preflights.
//! - Under `/api`, a request with a body must say `Content-Type:
//!   application/json` (415 otherwise), so no form or `text/plain` post can
//!   reach a handler.

use std::collections::HashSet;

use axum::extract::{Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::{ApiError, AppState};

/// Which hosts and origins a node accepts from browsers.
#[derive(Debug, Clone, Default)]
pub struct BrowserPolicy {
    /// Check `Host` (the node listens on loopback).
    pub check_host: bool,
    /// Host names (no port) accepted besides localhost and loopback addresses.
    pub hosts: HashSet<String>,
    /// Origins (`scheme://host[:port]`) allowed to call the API cross-origin.
    pub cors_origins: HashSet<String>,
}

impl BrowserPolicy {
    /// The policy of a node listening on `listen`.
    pub fn new(
        listen: std::net::SocketAddr,
        allowed_hosts: &[String],
        cors_origins: &[String],
    ) -> Self {
        let mut hosts: HashSet<String> = allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect();
        hosts.insert(host_only(&listen.ip().to_string()));
        BrowserPolicy {
            check_host: listen.ip().is_loopback(),
            hosts,
            cors_origins: cors_origins
                .iter()
                .map(|o| o.trim_end_matches('/').to_ascii_lowercase())
                .collect(),
        }
    }

    fn host_ok(&self, host: &str) -> bool {
        let h = host_only(host);
        h == "localhost"
            || h.parse::<std::net::IpAddr>()
                .is_ok_and(|ip| ip.is_loopback())
            || self.hosts.contains(&h)
    }
}

/// `host[:port]` or `[v6]:port` without the port, lowercase, no brackets.
fn host_only(host: &str) -> String {
    let h = host.trim().to_ascii_lowercase();
    if let Some(rest) = h.strip_prefix('[') {
        return rest.split(']').next().unwrap_or("").to_string();
    }
    match h.rsplit_once(':') {
        Some((name, port)) if !name.contains(':') && port.chars().all(|c| c.is_ascii_digit()) => {
            name.to_string()
        }
        _ => h,
    }
}

fn forbidden(message: String, field: &str) -> Response {
    ApiError::new(StatusCode::FORBIDDEN, "forbidden", message)
        .field(field)
        .into_response()
}

/// The middleware; see the module docs.
pub(crate) async fn guard(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let policy = &state.browser;
    let host = req
        .headers()
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string();
    if policy.check_host && !policy.host_ok(&host) {
        return forbidden(
            format!("Host {host:?} is not this node's (add it to server.allowed_hosts)"),
            "Host",
        );
    }
    let origin = req
        .headers()
        .get(header::ORIGIN)
        .and_then(|v| v.to_str().ok())
        .map(|o| o.trim_end_matches('/').to_ascii_lowercase());
    let mut cors = None;
    if let Some(origin) = &origin {
        let own = [
            format!("http://{}", host.to_ascii_lowercase()),
            format!("https://{}", host.to_ascii_lowercase()),
        ];
        if policy.cors_origins.contains(origin) {
            cors = Some(origin.clone());
        } else if !own.contains(origin) {
            return forbidden(
                format!("Origin {origin:?} may not call this node (add it to server.cors_origins)"),
                "Origin",
            );
        }
    }
    let api = req.uri().path().starts_with("/api/");
    if api
        && req.method() == Method::OPTIONS
        && let Some(o) = &cors
    {
        return preflight(o);
    }
    if api && has_body(&req) && !is_json(&req) {
        return ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "request bodies must be JSON (Content-Type: application/json)",
        )
        .field("Content-Type")
        .into_response();
    }
    let mut resp = next.run(req).await;
    if let Some(o) = cors
        && let Ok(v) = HeaderValue::from_str(&o)
    {
        resp.headers_mut()
            .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
        resp.headers_mut()
            .insert(header::VARY, HeaderValue::from_static("Origin"));
    }
    resp
}

fn has_body(req: &Request) -> bool {
    let len = req
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    match len {
        Some(n) => n > 0,
        None => req.headers().contains_key(header::TRANSFER_ENCODING),
    }
}

fn is_json(req: &Request) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|t| {
            let t = t.trim().to_ascii_lowercase();
            t == "application/json" || (t.starts_with("application/") && t.ends_with("+json"))
        })
}

fn preflight(origin: &str) -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let h = r.headers_mut();
    if let Ok(v) = HeaderValue::from_str(origin) {
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, v);
    }
    h.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, PATCH, DELETE"),
    );
    h.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static("authorization, content-type"),
    );
    h.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("600"),
    );
    h.insert(header::VARY, HeaderValue::from_static("Origin"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_compared_without_port_or_brackets() {
        assert_eq!(host_only("LocalHost:8080"), "localhost");
        assert_eq!(host_only("[::1]:80"), "::1");
        assert_eq!(host_only("127.0.0.1"), "127.0.0.1");
        let p = BrowserPolicy::new(
            "127.0.0.1:8080".parse().unwrap(),
            &["tasks.internal".into()],
            &[],
        );
        assert!(p.host_ok("localhost:8080") && p.host_ok("127.0.0.1:1") && p.host_ok("[::1]:8080"));
        assert!(p.host_ok("tasks.internal:8080"));
        assert!(!p.host_ok("evil.example:8080") && !p.host_ok("127.0.0.1.evil.example"));
    }
}
