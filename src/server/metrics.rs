//! Prometheus metrics (cargo feature `stats`, on by default).
//!
//! Counters and histograms move as tasks run (through [`PoolObserver`]);
//! gauges (workers, queue depth, leadership) are read when /metrics is scraped.

use std::time::Duration;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::{ApiError, AppState};
use crate::pool::PoolObserver;
use crate::store::Outcome;
use crate::task::Task;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueKind {
    queue: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueKindOutcome {
    queue: String,
    kind: String,
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueLabel {
    queue: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QueueState {
    queue: String,
    state: String,
}

type HistFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn seconds_histogram() -> Histogram {
    // 1 ms .. ~65 s.
    Histogram::new(exponential_buckets(0.001, 2.0, 17))
}

/// Most distinct queue names, and kind names, that become label values;
/// past them, new names are counted under [`OTHER`], so tasks with made-up
/// names cannot grow the exposition without bound.
pub const MAX_LABEL_VALUES: usize = 100;

/// The label value of names past [`MAX_LABEL_VALUES`].
pub const OTHER: &str = "_other";

/// The label values seen so far for one label (a std mutex: held to look
/// up or insert one name).
#[derive(Default)]
struct LabelCap(std::sync::Mutex<std::collections::HashSet<String>>);

impl LabelCap {
    fn value(&self, name: &str) -> String {
        let Ok(mut seen) = self.0.lock() else {
            return OTHER.to_string();
        };
        if seen.contains(name) {
            return name.to_string();
        }
        if seen.len() < MAX_LABEL_VALUES {
            seen.insert(name.to_string());
            return name.to_string();
        }
        OTHER.to_string()
    }

    /// Every name given a label of its own so far.
    fn seen(&self) -> Vec<String> {
        self.0
            .lock()
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }
}

/// The node's metrics. Hand it to the pool as its observer and to the server.
pub struct Metrics {
    registry: Registry,
    queues: LabelCap,
    kinds: LabelCap,
    enqueued: Family<QueueKind, Counter>,
    refused: Family<QueueLabel, Counter>,
    completed: Family<QueueKindOutcome, Counter>,
    duration: HistFamily<QueueKind>,
    wait: HistFamily<QueueLabel>,
    workers: Family<StateLabel, Gauge>,
    depth: Family<QueueState, Gauge>,
    lag: Family<QueueLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    panics: Counter,
    rescued: Counter,
    leader: Gauge,
}

impl std::fmt::Debug for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Metrics")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let m = Metrics {
            enqueued: Family::default(),
            refused: Family::default(),
            completed: Family::default(),
            duration: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            wait: Family::new_with_constructor(seconds_histogram as fn() -> Histogram),
            workers: Family::default(),
            depth: Family::default(),
            lag: Family::default(),
            panics: Counter::default(),
            rescued: Counter::default(),
            leader: Gauge::default(),
            registry: Registry::default(),
            queues: LabelCap::default(),
            kinds: LabelCap::default(),
        };
        // Counters get the `_total` suffix from the encoder.
        registry.register(
            "proto_tasker_tasks_enqueued",
            "Tasks enqueued through this node",
            m.enqueued.clone(),
        );
        registry.register(
            "proto_tasker_enqueue_refused",
            "Enqueue requests this node refused because the queue was at its max_depth (429 queue_full)",
            m.refused.clone(),
        );
        registry.register(
            "proto_tasker_tasks_completed",
            "Attempts finished on this node, by outcome (completed, retried, failed, cancelled, snoozed, released)",
            m.completed.clone(),
        );
        registry.register(
            "proto_tasker_task_duration_seconds",
            "Run time of attempts",
            m.duration.clone(),
        );
        registry.register(
            "proto_tasker_task_wait_seconds",
            "Time from due (enqueue or run_at) to start",
            m.wait.clone(),
        );
        registry.register(
            "proto_tasker_workers",
            "Worker slots of this node by state",
            m.workers.clone(),
        );
        registry.register(
            "proto_tasker_queue_depth",
            "Tasks in the store by queue and state",
            m.depth.clone(),
        );
        registry.register(
            "proto_tasker_queue_lag_seconds",
            "Age of the oldest due task waiting to start, by queue (0 when none waits): scale on this",
            m.lag.clone(),
        );
        registry.register(
            "proto_tasker_worker_panics",
            "Executors that panicked on this node",
            m.panics.clone(),
        );
        registry.register(
            "proto_tasker_tasks_rescued",
            "Tasks of dead nodes rescued by this node",
            m.rescued.clone(),
        );
        registry.register(
            "proto_tasker_node_is_leader",
            "1 while this node leads the cluster",
            m.leader.clone(),
        );
        Metrics { registry, ..m }
    }

    /// Count a task enqueued through this node.
    /// Count an enqueue refused because `queue` was full.
    pub fn refused(&self, queue: &str) {
        self.refused
            .get_or_create(&QueueLabel {
                queue: self.queues.value(queue),
            })
            .inc();
    }

    pub fn enqueued(&self, queue: &str, kind: &str) {
        self.enqueued
            .get_or_create(&QueueKind {
                queue: self.queues.value(queue),
                kind: self.kinds.value(kind),
            })
            .inc();
    }
}

impl PoolObserver for Metrics {
    fn task_started(&self, task: &Task, wait: Duration) {
        self.wait
            .get_or_create(&QueueLabel {
                queue: self.queues.value(&task.queue),
            })
            .observe(wait.as_secs_f64());
    }

    fn task_finished(&self, task: &Task, outcome: &Outcome, run_time: Duration) {
        let qk = QueueKind {
            queue: self.queues.value(&task.queue),
            kind: self.kinds.value(&task.kind),
        };
        self.duration
            .get_or_create(&qk)
            .observe(run_time.as_secs_f64());
        self.completed
            .get_or_create(&QueueKindOutcome {
                queue: qk.queue,
                kind: qk.kind,
                outcome: outcome.name(),
            })
            .inc();
    }

    fn worker_panicked(&self) {
        self.panics.inc();
    }

    fn tasks_rescued(&self, n: u64) {
        self.rescued.inc_by(n);
    }
}

/// Prometheus metrics in the text exposition format (the README's
/// "Metrics" lists the series). No token needed.
#[utoipa::path(get, path = "/metrics", tag = "probes", security(),
    responses(
        (status = 200, description = "The metrics", content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8", body = String),
        (status = 404, description = "Metrics are off on this node", body = super::openapi::ErrorBody),
    ))]
pub(crate) async fn handler(State(state): State<AppState>) -> Response {
    let Some(m) = state.metrics.clone() else {
        return ApiError::new(StatusCode::NOT_FOUND, "not_found", "metrics are off")
            .into_response();
    };
    let shared = state.pool.shared();
    let busy = shared.workers_busy() as i64;
    let total = shared.workers_total() as i64;
    m.workers
        .get_or_create(&StateLabel { state: "busy" })
        .set(busy);
    m.workers
        .get_or_create(&StateLabel { state: "idle" })
        .set(total - busy);
    m.leader.set(i64::from(shared.is_leader()));
    match state.client.queue_counts().await {
        Ok(counts) => {
            m.depth.clear();
            for (queue, st, n) in counts {
                let queue = m.queues.value(&queue);
                let state = st.to_string();
                // Queues past the cap add up under one label value.
                let g = m.depth.get_or_create(&QueueState { queue, state });
                g.set(g.get() + n);
            }
        }
        Err(e) => tracing::warn!(error = %e, "queue depth unavailable for /metrics"),
    }
    match state.client.queue_lag().await {
        Ok(lags) => {
            // Queues that had lag keep their series, at 0, once drained
            // (an autoscaler then scales in rather than seeing no data).
            let mut fresh: std::collections::HashMap<String, f64> = Default::default();
            for (queue, secs) in lags {
                let q = m.queues.value(&queue);
                let e = fresh.entry(q).or_default();
                *e = e.max(secs);
            }
            m.lag.clear();
            for q in m.queues.seen() {
                let secs = fresh.remove(&q).unwrap_or(0.0);
                m.lag.get_or_create(&QueueLabel { queue: q }).set(secs);
            }
            for (queue, secs) in fresh {
                m.lag.get_or_create(&QueueLabel { queue }).set(secs);
            }
        }
        Err(e) => tracing::warn!(error = %e, "queue lag unavailable for /metrics"),
    }
    let mut out = String::new();
    if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &m.registry) {
        return ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            .into_response();
    }
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn made_up_names_do_not_grow_the_labels_without_bound() {
        let m = Metrics::new();
        for i in 0..(MAX_LABEL_VALUES + 50) {
            m.enqueued(&format!("q{i}"), "k");
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &m.registry).unwrap();
        let series = out
            .lines()
            .filter(|l| l.starts_with("proto_tasker_tasks_enqueued_total{"))
            .count();
        assert_eq!(series, MAX_LABEL_VALUES + 1, "{out}");
        assert!(out.contains(&format!("queue=\"{OTHER}\"")), "{out}");
        assert!(
            out.contains("proto_tasker_tasks_enqueued_total{queue=\"_other\",kind=\"k\"} 50"),
            "{out}"
        );
    }
}
