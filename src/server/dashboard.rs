//! The web dashboard at `GET /`, and the cluster throughput history it plots.
//!
//! The page is one askama template plus a script and a style sheet, all
//! compiled into the binary (no CDN, works offline). The page itself holds no
//! task data, so it is served without the bearer token; the script reads
//! everything through `/api/v1` and sends the token the user typed, which it
//! keeps in `sessionStorage` only. Task data (args, results, errors) is user
//! input: the script only ever writes it with `textContent`, and the
//! Content-Security-Policy below forbids inline scripts, so a `<script>` in
//! args shows as text and never runs.
//!
//! # Throughput history
//!
//! Each node publishes its outcome counters with its heartbeat
//! ([`crate::store::NodeStats`]). A [`History`] samples the cluster's nodes
//! every [`SAMPLE_EVERY`] and keeps the per-interval increase, summed over the
//! nodes, for [`KEEP`]. The sampler is the only writer of the history; the
//! `/api/v1/stats` handler only reads it, under a `std` mutex held for a copy.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use askama::Template;
use axum::Json;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use chrono::{DateTime, Utc};
use serde::Deserialize;

use super::{ApiError, AppState};
use crate::store::{NodeInfo, NodeStats};

/// How often the sampler reads the nodes' counters.
pub const SAMPLE_EVERY: Duration = Duration::from_secs(2);
/// How much history the sampler keeps.
pub const KEEP: Duration = Duration::from_secs(30 * 60);

/// The counters' increase over one sampling interval, summed over the nodes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, utoipa::ToSchema)]
pub struct Sample {
    pub at: DateTime<Utc>,
    pub completed: u64,
    pub failed: u64,
    pub retried: u64,
    pub cancelled: u64,
}

/// Per-interval throughput of the whole cluster (see the module docs).
#[derive(Debug, Default)]
pub struct History {
    inner: Mutex<HistoryInner>,
}

#[derive(Debug, Default)]
struct HistoryInner {
    /// Last counters seen per node, with the node's start time: a node that
    /// restarted (new start time, or counters that went down) counts from zero.
    last: HashMap<String, (DateTime<Utc>, NodeStats)>,
    last_at: Option<DateTime<Utc>>,
    samples: VecDeque<Sample>,
}

impl History {
    /// Record the increase of the nodes' counters (as just read) since the
    /// last sample.
    pub fn record(&self, nodes: Vec<NodeInfo>) {
        let now = Utc::now();
        let mut h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let mut s = Sample {
            at: now,
            ..Default::default()
        };
        let first = h.last_at.is_none();
        let since = h.last_at;
        let mut seen = HashMap::with_capacity(nodes.len());
        for n in nodes {
            let cur = n.stats;
            let base = match h.last.get(&n.name) {
                Some((started, prev)) if *started == n.started_at && ge(&cur, prev) => *prev,
                // Known node restarted, or a node that started since the last
                // sample: everything it counted happened in this interval.
                Some(_) => NodeStats::default(),
                None if since.is_some_and(|t| n.started_at >= t) => NodeStats::default(),
                // A node seen for the first time that was already running:
                // its counters span an unknown time, so start from them.
                None => cur,
            };
            s.completed += cur.completed - base.completed;
            s.failed += cur.failed - base.failed;
            s.retried += cur.retried - base.retried;
            s.cancelled += cur.cancelled - base.cancelled;
            seen.insert(n.name, (n.started_at, cur));
        }
        h.last = seen;
        h.last_at = Some(now);
        if !first {
            h.samples.push_back(s);
        }
        let keep = chrono::Duration::from_std(KEEP).unwrap_or_default();
        while h.samples.front().is_some_and(|f| now - f.at > keep) {
            h.samples.pop_front();
        }
    }

    /// The increase over `[from, to)` in buckets of `step`, oldest first.
    pub fn buckets(
        &self,
        from: DateTime<Utc>,
        to: DateTime<Utc>,
        step: chrono::Duration,
    ) -> Vec<Sample> {
        let step_ms = step.num_milliseconds().max(1);
        let n = ((to - from).num_milliseconds() / step_ms).max(0) as usize;
        let mut out: Vec<Sample> = (0..n)
            .map(|i| Sample {
                at: from + chrono::Duration::milliseconds(step_ms * i as i64),
                ..Default::default()
            })
            .collect();
        let h = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for s in &h.samples {
            if s.at < from || s.at >= to {
                continue;
            }
            let i = ((s.at - from).num_milliseconds() / step_ms) as usize;
            if let Some(b) = out.get_mut(i) {
                b.completed += s.completed;
                b.failed += s.failed;
                b.retried += s.retried;
                b.cancelled += s.cancelled;
            }
        }
        out
    }
}

fn ge(a: &NodeStats, b: &NodeStats) -> bool {
    a.completed >= b.completed
        && a.failed >= b.failed
        && a.retried >= b.retried
        && a.cancelled >= b.cancelled
}

/// Sample every [`SAMPLE_EVERY`] until `stop` fires. A failed read (store
/// down) is skipped: the next one covers the gap.
pub async fn run_sampler(state: AppState) {
    let mut tick = tokio::time::interval(SAMPLE_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = state.stopping.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = state.client.nodes().await.map(|n| state.history.record(n)) {
            tracing::debug!(error = %e, "throughput sample skipped");
        }
    }
}

#[derive(Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub(crate) struct StatsQuery {
    /// How far back, 1..=30 (default 10).
    #[param(value_type = Option<u8>, minimum = 1, maximum = 30)]
    minutes: Option<String>,
    /// Seconds per bucket, 1..=3600 (default 10).
    #[param(value_type = Option<u16>, minimum = 1, maximum = 3600)]
    step: Option<String>,
}

/// Cluster throughput (the dashboard's chart).
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub(crate) struct Stats {
    step_seconds: i64,
    /// How often the serving node samples the nodes' counters.
    sample_every_ms: u64,
    /// Oldest first; each counts what happened from its `at` for `step_seconds`.
    buckets: Vec<Sample>,
    /// The live nodes' counters since each started.
    totals: NodeStats,
}

/// Tasks completed, failed for good, retried and cancelled per `step`
/// seconds over the last `minutes`, summed over the cluster's nodes, with
/// the cluster's current totals.
#[utoipa::path(get, path = "/api/v1/stats", tag = "cluster", params(StatsQuery),
    responses(
        (status = 200, description = "Throughput", body = Stats),
        (status = 400, description = "Bad minutes or step", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn stats(
    State(state): State<AppState>,
    super::ApiQuery(q): super::ApiQuery<StatsQuery>,
) -> Result<Json<Stats>, ApiError> {
    let num = |v: &Option<String>, field: &str, default: i64, max: i64| match v.as_deref() {
        None => Ok(default),
        Some(s) => s
            .parse::<i64>()
            .ok()
            .filter(|n| (1..=max).contains(n))
            .ok_or_else(|| ApiError::bad(field, format!("{s:?} is not in 1..={max}"))),
    };
    let minutes = num(&q.minutes, "minutes", 10, (KEEP.as_secs() / 60) as i64)?;
    let step = num(&q.step, "step", 10, 3600)?;
    let step = chrono::Duration::seconds(step);
    let now = Utc::now();
    // Buckets aligned on multiples of the step, the last one holding `now`.
    let step_ms = step.num_milliseconds();
    let end_ms = (now.timestamp_millis() / step_ms + 1) * step_ms;
    let to = DateTime::<Utc>::from_timestamp_millis(end_ms).unwrap_or(now);
    let from = to - chrono::Duration::minutes(minutes);
    let buckets = state.history.buckets(from, to, step);
    let mut totals = NodeStats::default();
    for n in state.client.nodes().await? {
        totals.completed += n.stats.completed;
        totals.failed += n.stats.failed;
        totals.retried += n.stats.retried;
        totals.cancelled += n.stats.cancelled;
    }
    Ok(Json(Stats {
        step_seconds: step.num_seconds(),
        sample_every_ms: SAMPLE_EVERY.as_millis() as u64,
        buckets,
        totals,
    }))
}

#[derive(Template)]
#[template(path = "dashboard.html")]
struct Page<'a> {
    node: &'a str,
    version: &'a str,
    auth: bool,
}

/// Headers every dashboard response carries: no inline script, nothing from
/// elsewhere, no framing.
fn secure(mut r: Response, content_type: &'static str, cache: &'static str) -> Response {
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(cache));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
             connect-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
        ),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// `GET /`: the page (data comes from the API).
pub(crate) async fn page(State(state): State<AppState>) -> Response {
    let page = Page {
        node: state.pool.node_name(),
        version: env!("CARGO_PKG_VERSION"),
        auth: state.has_token(),
    };
    match page.render() {
        Ok(html) => secure(html.into_response(), "text/html; charset=utf-8", "no-store"),
        Err(e) => ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("dashboard template: {e}"),
        )
        .into_response(),
    }
}

const SCRIPT: &str = include_str!("../../assets/dashboard.js");
const STYLE: &str = include_str!("../../assets/dashboard.css");

pub(crate) async fn script() -> Response {
    secure(
        SCRIPT.into_response(),
        "text/javascript; charset=utf-8",
        "no-cache",
    )
}

pub(crate) async fn style() -> Response {
    secure(STYLE.into_response(), "text/css; charset=utf-8", "no-cache")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_sum_samples_in_their_step() {
        let h = History::default();
        let t0 = DateTime::<Utc>::from_timestamp(1_700_000_000, 0).unwrap();
        {
            let mut g = h.inner.lock().unwrap();
            for (i, c) in [(0, 1), (3, 2), (10, 4), (25, 8)] {
                g.samples.push_back(Sample {
                    at: t0 + chrono::Duration::seconds(i),
                    completed: c,
                    ..Default::default()
                });
            }
        }
        let b = h.buckets(
            t0,
            t0 + chrono::Duration::seconds(20),
            chrono::Duration::seconds(10),
        );
        assert_eq!(b.len(), 2);
        assert_eq!(b[0].completed, 3);
        assert_eq!(b[1].completed, 4);
        assert_eq!(b[1].at, t0 + chrono::Duration::seconds(10));
    }
}
