//! The `http` executor: one HTTP request per attempt.
//!
//! Args: `{"url", "method"?: "GET", "headers"?: {"K": "V"}, "body"?: string or JSON}`.
//! The URL's host must be listed in `executors.http.allow_hosts`: an entry
//! `host` allows that host on its scheme's default port only, `host:port`
//! that port, `host:*` any port. With an empty list the executor refuses
//! every task. Redirects are not followed (they could leave the allow-list).
//! A task may not set `Host` (it would reach other virtual hosts behind an
//! allowed one), and credentials in a URL never appear in errors or logs.
//! A 2xx status is success; the result holds the status and the response
//! body, capped at `max_response_bytes`.

use std::collections::{BTreeMap, HashSet};
use std::time::Duration;

use async_trait::async_trait;
use futures::StreamExt;
use serde::Deserialize;

use crate::executor::{ArgsError, TaskContext, TaskError, TaskExecutor, TaskOutput};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct HttpArgs {
    url: String,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: Option<serde_json::Value>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct HttpExecutor {
    /// `(host, port)`: `None` for the scheme's default port only, `Some(0)` for any.
    allow_hosts: HashSet<(String, Option<u16>)>,
    max_response: usize,
    client: reqwest::Client,
}

impl HttpExecutor {
    pub fn new(
        allow_hosts: impl IntoIterator<Item = String>,
        max_response: usize,
        timeout: Duration,
    ) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {e}"))?;
        let mut allowed = HashSet::new();
        for h in allow_hosts {
            let h = h.to_ascii_lowercase();
            let entry = match h.rsplit_once(':') {
                Some((host, "*")) => (host.to_string(), Some(0)),
                Some((host, port)) if !host.contains(':') || host.ends_with(']') => {
                    let port: u16 = port.parse().map_err(|_| {
                        format!("executors.http.allow_hosts: {h:?}: the port must be a number or *")
                    })?;
                    (host.trim_matches(['[', ']']).to_string(), Some(port))
                }
                _ => (h.trim_matches(['[', ']']).to_string(), None),
            };
            allowed.insert(entry);
        }
        Ok(HttpExecutor {
            allow_hosts: allowed,
            max_response: max_response.max(1),
            client,
        })
    }

    fn parse(
        &self,
        args: &serde_json::Value,
    ) -> Result<(HttpArgs, reqwest::Url, reqwest::Method), ArgsError> {
        let a: HttpArgs = serde_json::from_value(args.clone())
            .map_err(|e| ArgsError::new("args", format!("not http args: {e}")))?;
        let url = reqwest::Url::parse(&a.url)
            .map_err(|e| ArgsError::new("args.url", format!("{:?} is not a URL: {e}", a.url)))?;
        if !matches!(url.scheme(), "http" | "https") {
            return Err(ArgsError::new("args.url", "only http and https URLs"));
        }
        let host = url.host_str().unwrap_or_default().to_ascii_lowercase();
        if self.allow_hosts.is_empty() {
            return Err(ArgsError::new(
                "args.url",
                "the http executor is off: list the hosts it may call in executors.http.allow_hosts",
            ));
        }
        let host = host.trim_matches(['[', ']']).to_string();
        // `url.port()` is None when the URL uses its scheme's default port.
        let allowed = self.allow_hosts.contains(&(host.clone(), Some(0)))
            || match url.port() {
                None => self.allow_hosts.contains(&(host.clone(), None)),
                Some(p) => self.allow_hosts.contains(&(host.clone(), Some(p))),
            };
        if !allowed {
            return Err(ArgsError::new(
                "args.url",
                format!("host {host:?} is not in executors.http.allow_hosts"),
            ));
        }
        if let Some(k) = a.headers.keys().find(|k| k.eq_ignore_ascii_case("host")) {
            return Err(ArgsError::new(
                format!("args.headers.{k}"),
                "a task may not set Host (the URL's host is sent)",
            ));
        }
        let method = a.method.as_deref().unwrap_or("GET").to_ascii_uppercase();
        let method = reqwest::Method::from_bytes(method.as_bytes()).map_err(|_| {
            ArgsError::new("args.method", format!("{method:?} is not an HTTP method"))
        })?;
        Ok((a, url, method))
    }
}

/// `url` without user name or password, for messages and logs.
fn shown(url: &reqwest::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_password(None);
    let _ = u.set_username("");
    u.to_string()
}

#[async_trait]
impl TaskExecutor for HttpExecutor {
    fn check_args(&self, args: &serde_json::Value) -> Result<(), ArgsError> {
        self.parse(args).map(|_| ())
    }

    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        let (a, url, method) = self
            .parse(&ctx.args)
            .map_err(|e| TaskError::Discard(e.to_string()))?;
        let mut req = self.client.request(method, url.clone());
        // What errors show: the URL without its credentials.
        let url = shown(&url);
        // The attempt's trace context, unless the task sets its own.
        if let Some(tp) = &ctx.traceparent
            && !a
                .headers
                .keys()
                .any(|k| k.eq_ignore_ascii_case("traceparent"))
        {
            req = req.header("traceparent", tp);
        }
        for (k, v) in &a.headers {
            req = req.header(k, v);
        }
        req = match a.body {
            None => req,
            Some(serde_json::Value::String(s)) => req.body(s),
            Some(v) => req.json(&v),
        };
        let send = async {
            let resp = req
                .send()
                .await
                .map_err(|e| TaskError::Failed(format!("{url}: {e}")))?;
            let status = resp.status();
            let mut body = Vec::new();
            let mut truncated = false;
            let mut stream = resp.bytes_stream();
            while let Some(chunk) = stream.next().await {
                let chunk =
                    chunk.map_err(|e| TaskError::Failed(format!("{url}: reading body: {e}")))?;
                let room = self.max_response - body.len();
                if chunk.len() > room {
                    body.extend_from_slice(&chunk[..room]);
                    truncated = true;
                    break;
                }
                body.extend_from_slice(&chunk);
            }
            let text = String::from_utf8_lossy(&body).into_owned();
            if status.is_success() {
                Ok(
                    serde_json::json!({"status": status.as_u16(), "body": text, "truncated": truncated}),
                )
            } else {
                let snippet: String = text.chars().take(1000).collect();
                Err(TaskError::Failed(format!(
                    "{url}: HTTP {}: {snippet}",
                    status.as_u16()
                )))
            }
        };
        tokio::select! {
            r = send => r,
            _ = ctx.cancel.cancelled() => Err(TaskError::Failed(format!("{url}: request stopped"))),
        }
    }
}
