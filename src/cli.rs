//! The CLI's client commands: they talk to a node's HTTP API.

use std::time::Duration;

use proto_tasker::Task;
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

use crate::Failure;

/// Where the API is and how to prove who we are.
pub struct Remote {
    base: String,
    token: Option<String>,
    http: reqwest::Client,
}

impl Remote {
    pub fn new(server: &str, token: Option<String>) -> Result<Self, Failure> {
        let http = reqwest::Client::builder()
            .build()
            .map_err(|e| Failure::unreachable(format!("cannot build an HTTP client: {e}")))?;
        Ok(Remote {
            base: format!("{}/api/v1", server.trim_end_matches('/')),
            token: token.filter(|t| !t.is_empty()),
            http,
        })
    }

    /// Call the API; 4xx becomes a user error (exit 1), anything else exit 2.
    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> Result<(StatusCode, Value), Failure> {
        let url = format!("{}{}", self.base, path);
        let mut req = self.http.request(method, &url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::unreachable(format!("cannot reach {url}: {e}")))?;
        let status = resp.status();
        let text = resp
            .text()
            .await
            .map_err(|e| Failure::unreachable(format!("{url}: reading the answer: {e}")))?;
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok((status, value));
        }
        let err = &value["error"];
        let message = match (err["field"].as_str(), err["message"].as_str()) {
            (Some(f), Some(m)) => format!("{f}: {m}"),
            (None, Some(m)) => m.to_string(),
            _ => format!("HTTP {status}: {value}"),
        };
        if status.is_client_error() {
            Err(Failure::user(message))
        } else {
            Err(Failure::unreachable(message))
        }
    }
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Print rows under headers, columns padded to their widest cell.
pub fn table(headers: &[&str], rows: &[Vec<String>]) {
    let mut width: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            if let Some(w) = width.get_mut(i) {
                *w = (*w).max(c.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let parts: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = width.get(i).copied().unwrap_or(0)))
            .collect();
        println!("{}", parts.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r.clone());
    }
}

pub fn print_tasks(tasks: &[Value]) {
    let rows: Vec<Vec<String>> = tasks
        .iter()
        .map(|t| {
            vec![
                cell(&t["id"]),
                cell(&t["state"]),
                cell(&t["kind"]),
                cell(&t["queue"]),
                format!("{}/{}", cell(&t["attempt"]), cell(&t["max_attempts"])),
                cell(&t["run_at"]),
            ]
        })
        .collect();
    table(
        &["ID", "STATE", "KIND", "QUEUE", "ATTEMPT", "RUN_AT"],
        &rows,
    );
}

pub fn print_task(t: &Value) {
    for key in [
        "id",
        "kind",
        "state",
        "queue",
        "priority",
        "attempt",
        "max_attempts",
        "run_at",
        "created_at",
        "started_at",
        "finished_at",
        "node",
    ] {
        println!("{key:<13} {}", cell(&t[key]));
    }
    println!("{:<13} {}", "args", t["args"]);
    if !t["result"].is_null() {
        println!("{:<13} {}", "result", t["result"]);
    }
    if let Some(errors) = t["errors"].as_array() {
        for e in errors {
            println!(
                "{:<13} attempt {} at {}: {}",
                "error",
                cell(&e["attempt"]),
                cell(&e["at"]),
                cell(&e["message"])
            );
        }
    }
}

/// Long-poll until the task is finished.
pub async fn wait_task(remote: &Remote, id: &str, timeout: Duration) -> Result<Value, Failure> {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        let slice = left.min(Duration::from_secs(60)).as_millis().max(1);
        let (_, t) = remote
            .call(Method::GET, &format!("/tasks/{id}?wait={slice}ms"), None)
            .await?;
        let finished = serde_json::from_value::<Task>(t.clone())
            .map(|task| task.state.is_finished())
            .unwrap_or(false);
        if finished || tokio::time::Instant::now() >= deadline {
            return Ok(t);
        }
    }
}

impl Remote {
    /// Open the task's event stream (`GET /tasks/{id}/events`).
    async fn events(&self, id: &str) -> Result<reqwest::Response, Failure> {
        let url = format!("{}/tasks/{}/events", self.base, query_escape(id));
        let mut req = self.http.get(&url);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req
            .send()
            .await
            .map_err(|e| Failure::unreachable(format!("cannot reach {url}: {e}")))?;
        if resp.status().is_success() {
            Ok(resp)
        } else {
            Err(Failure::unreachable(format!(
                "{url}: HTTP {}",
                resp.status()
            )))
        }
    }
}

/// Wait for a task like [`wait_task`], showing its progress on stderr as
/// it comes (a line rewritten in place: `progress` is for a terminal). The
/// task's event stream carries it; a node without one is long-polled.
pub async fn watch_task(remote: &Remote, id: &str, timeout: Duration) -> Result<Value, Failure> {
    use futures::StreamExt;
    let Ok(resp) = remote.events(id).await else {
        return wait_task(remote, id, timeout).await;
    };
    let deadline = tokio::time::Instant::now() + timeout;
    let mut body = resp.bytes_stream();
    let mut buf = String::new();
    let mut last: Option<Value> = None;
    let mut shown = false;
    let finished = |t: &Value| {
        serde_json::from_value::<Task>(t.clone()).is_ok_and(|task| task.state.is_finished())
    };
    loop {
        let chunk = match tokio::time::timeout_at(deadline, body.next()).await {
            Ok(Some(Ok(c))) => c,
            // Ended, broke, or out of time: the task as it is now.
            _ => break,
        };
        buf.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buf.find("\n\n") {
            let block: String = buf.drain(..end + 2).collect();
            let mut event = "";
            let mut data = String::new();
            for line in block.lines() {
                if let Some(e) = line.strip_prefix("event:") {
                    event = e.trim();
                } else if let Some(d) = line.strip_prefix("data:") {
                    data.push_str(d.trim_start());
                }
            }
            let Ok(v) = serde_json::from_str::<Value>(&data) else {
                continue;
            };
            match event {
                "progress" => {
                    let p = &v["progress"];
                    let line = match (p["pct"].as_f64(), p["message"].as_str()) {
                        (Some(pct), Some(m)) => format!("{pct:.0}% {m}"),
                        (Some(pct), None) => format!("{pct:.0}%"),
                        _ => p.to_string(),
                    };
                    eprint!("\r\x1b[2Ktask {id}: {line}");
                    shown = true;
                }
                "state" => {
                    let done = finished(&v);
                    last = Some(v);
                    if done {
                        if shown {
                            eprint!("\r\x1b[2K");
                        }
                        return Ok(last.unwrap_or_default());
                    }
                }
                _ => {}
            }
        }
    }
    if shown {
        eprint!("\r\x1b[2K");
    }
    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
    match last {
        Some(t) if left.is_zero() => Ok(t),
        _ => wait_task(remote, id, left).await,
    }
}

/// The fields of `submit`, turned into a POST /tasks body.
pub struct TaskBody {
    pub kind: String,
    pub args: Option<String>,
    pub queue: Option<String>,
    pub priority: Option<i16>,
    pub delay: Option<Duration>,
    pub max_attempts: Option<i32>,
    pub timeout: Option<Duration>,
    pub unique_key: Option<String>,
    pub unique_states: Vec<String>,
    pub unique_for: Option<Duration>,
    pub on_conflict: Option<String>,
    pub tags: Vec<String>,
}

impl TaskBody {
    pub fn into_json(self) -> Result<Value, Failure> {
        let args: Value = match self.args.as_deref() {
            Some(a) => serde_json::from_str(a)
                .map_err(|e| Failure::user(format!("--args is not JSON: {e}")))?,
            None => json!({}),
        };
        let ms = |d: Duration| json!(u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
        let mut body = serde_json::Map::new();
        body.insert("kind".into(), json!(self.kind));
        body.insert("args".into(), args);
        let optional = [
            ("queue", self.queue.map(|q| json!(q))),
            ("priority", self.priority.map(|p| json!(p))),
            ("delay_ms", self.delay.map(ms)),
            ("max_attempts", self.max_attempts.map(|m| json!(m))),
            ("timeout_ms", self.timeout.map(ms)),
            ("unique_key", self.unique_key.map(|k| json!(k))),
            (
                "unique_states",
                (!self.unique_states.is_empty()).then(|| json!(self.unique_states)),
            ),
            ("unique_for_ms", self.unique_for.map(ms)),
            ("on_conflict", self.on_conflict.map(|c| json!(c))),
            ("tags", (!self.tags.is_empty()).then(|| json!(self.tags))),
        ];
        for (k, v) in optional {
            if let Some(v) = v {
                body.insert(k.into(), v);
            }
        }
        Ok(Value::Object(body))
    }
}

/// A setting's value from the command line: a whole number, or `none` (null).
pub fn number_or_none(field: &str, v: &str) -> Result<Value, Failure> {
    if v == "none" {
        return Ok(Value::Null);
    }
    v.parse::<u32>().map(Value::from).map_err(|_| {
        Failure::user(format!(
            "--{}: {v:?} is not a number or none",
            field.replace('_', "-")
        ))
    })
}

/// `--rate-limit MAX/PERIOD` (e.g. `100/1s`) as the API's
/// `{"max", "per_ms"}`, or `none` (null).
pub fn rate_or_none(v: &str) -> Result<Value, Failure> {
    if v == "none" {
        return Ok(Value::Null);
    }
    let bad = || {
        Failure::user(format!(
            "--rate-limit: {v:?} is not MAX/PERIOD (e.g. 100/1s) or none"
        ))
    };
    let (max, per) = v.split_once('/').ok_or_else(bad)?;
    let max: u32 = max.trim().parse().map_err(|_| bad())?;
    let per = proto_tasker::duration::parse(per.trim()).map_err(|_| bad())?;
    Ok(json!({"max": max, "per_ms": u64::try_from(per.as_millis()).unwrap_or(u64::MAX)}))
}

fn limit_cell(q: &Value) -> String {
    let mut parts = Vec::new();
    if let Some(n) = q["global_concurrency"].as_u64() {
        parts.push(format!("global {n}"));
    }
    if let Some(n) = q["per_key_concurrency"].as_u64() {
        parts.push(format!("per key {n}"));
    }
    if let (Some(m), Some(p)) = (
        q["rate_limit"]["max"].as_u64(),
        q["rate_limit"]["per_ms"].as_u64(),
    ) {
        parts.push(format!("{m}/{p}ms"));
    }
    if q["fairness"] == "round_robin" {
        parts.push("round robin".into());
    }
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

pub fn print_queues(v: &Value) {
    let rows: Vec<Vec<String>> = v["queues"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|q| {
            let capped = |s: &str| {
                q["capped"]
                    .as_array()
                    .is_some_and(|c| c.iter().any(|v| v.as_str() == Some(s)))
            };
            let n = |s: &str| {
                let n = q["counts"][s].as_i64().unwrap_or(0).to_string();
                if capped(s) { format!("{n}+") } else { n }
            };
            let status = if q["paused"].as_bool().unwrap_or(false) {
                "paused"
            } else {
                "active"
            };
            vec![
                cell(&q["name"]),
                status.to_string(),
                cell(&q["concurrency"]),
                n("scheduled"),
                n("available"),
                n("running"),
                n("retryable"),
                n("completed"),
                n("failed"),
                n("cancelled"),
                cell(&q["max_depth"]),
                limit_cell(q),
            ]
        })
        .collect();
    table(
        &[
            "QUEUE",
            "STATUS",
            "WORKERS",
            "SCHEDULED",
            "AVAILABLE",
            "RUNNING",
            "RETRYABLE",
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "MAX_DEPTH",
            "LIMITS",
        ],
        &rows,
    );
}

pub fn print_schedules(v: &Value) {
    let rows: Vec<Vec<String>> = v["schedules"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|s| {
            vec![
                cell(&s["name"]),
                cell(&s["cron"]),
                cell(&s["timezone"]),
                cell(&s["kind"]),
                if s["paused"] == true {
                    "paused".to_string()
                } else {
                    cell(&s["next_run"])
                },
                cell(&s["source"]),
            ]
        })
        .collect();
    table(
        &["SCHEDULE", "CRON", "TIMEZONE", "KIND", "NEXT_RUN", "SOURCE"],
        &rows,
    );
}

pub fn print_nodes(v: &Value) {
    let rows: Vec<Vec<String>> = v["nodes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
        .iter()
        .map(|n| {
            let role = if n["leader"].as_bool().unwrap_or(false) {
                "leader"
            } else {
                ""
            };
            vec![
                cell(&n["name"]),
                role.to_string(),
                format!("{}/{}", cell(&n["workers_busy"]), cell(&n["workers"])),
                format!("{}ms", cell(&n["heartbeat_age_ms"])),
                cell(&n["version"]),
            ]
        })
        .collect();
    table(
        &["NODE", "ROLE", "BUSY/WORKERS", "HEARTBEAT_AGE", "VERSION"],
        &rows,
    );
}

/// The id of a task answer, as text.
pub fn cell_id(task: &Value) -> Result<String, Failure> {
    match &task["id"] {
        Value::Number(n) => Ok(n.to_string()),
        other => Err(Failure::unreachable(format!(
            "the server answered without a task id: {other}"
        ))),
    }
}

/// Percent-encode a path segment or query value.
pub fn query_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
