//! Traces across nodes: two node processes on one PostgreSQL export their
//! spans by OTLP/HTTP to a receiver in this test, which decodes the
//! protobuf export. A task enqueued on one node and run (twice: a retry)
//! on the other is one trace: request -> `task.enqueue` -> each
//! `task.execute`.

mod fixtures;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{AnyValue, any_value};
use opentelemetry_proto::tonic::trace::v1::{Span, span::SpanKind, status::StatusCode};
use prost::Message;
use serde_json::{Value, json};

/// A span as received, with the node (`service.instance.id`) that sent it.
#[derive(Debug, Clone)]
struct Got {
    node: String,
    span: Span,
}

impl Got {
    fn attr(&self, key: &str) -> Option<Value> {
        let a = self.span.attributes.iter().find(|a| a.key == key)?;
        any(a.value.as_ref()?)
    }
}

fn any(v: &AnyValue) -> Option<Value> {
    Some(match v.value.as_ref()? {
        any_value::Value::StringValue(s) => json!(s),
        any_value::Value::IntValue(i) => json!(i),
        any_value::Value::BoolValue(b) => json!(b),
        any_value::Value::DoubleValue(d) => json!(d),
        _ => return None,
    })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// What the receiver and the executors' target saw.
#[derive(Clone, Default)]
struct Seen {
    spans: Arc<Mutex<Vec<Got>>>,
    /// Export requests that were not valid OTLP protobuf.
    bad_exports: Arc<Mutex<usize>>,
    /// `traceparent` headers of the calls the `http` executor made, by
    /// the `n` of the task.
    calls: Arc<Mutex<HashMap<i64, Vec<Option<String>>>>>,
}

impl Seen {
    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }
}

/// The OTLP receiver (`POST /v1/traces`) and the target of the tasks
/// (`POST /hit/{n}`: the first call of each task fails with 500).
async fn serve(seen: Seen) -> String {
    let otlp = seen.clone();
    let hits = seen.clone();
    let app = axum::Router::new()
        .route(
            "/v1/traces",
            axum::routing::post(move |body: axum::body::Bytes| {
                let seen = otlp.clone();
                async move {
                    let Ok(req) = ExportTraceServiceRequest::decode(body) else {
                        *seen.bad_exports.lock().unwrap() += 1;
                        return axum::http::StatusCode::BAD_REQUEST;
                    };
                    let mut out = seen.spans.lock().unwrap();
                    for rs in req.resource_spans {
                        let node = rs
                            .resource
                            .iter()
                            .flat_map(|r| r.attributes.iter())
                            .find(|a| a.key == "service.instance.id")
                            .and_then(|a| any(a.value.as_ref()?))
                            .and_then(|v| v.as_str().map(str::to_string))
                            .unwrap_or_default();
                        for ss in rs.scope_spans {
                            for span in ss.spans {
                                out.push(Got {
                                    node: node.clone(),
                                    span,
                                });
                            }
                        }
                    }
                    axum::http::StatusCode::OK
                }
            }),
        )
        .route(
            "/hit/{n}",
            axum::routing::post(
                move |axum::extract::Path(n): axum::extract::Path<i64>,
                      headers: axum::http::HeaderMap| {
                    let seen = hits.clone();
                    async move {
                        let tp = headers
                            .get("traceparent")
                            .and_then(|v| v.to_str().ok())
                            .map(str::to_string);
                        let mut calls = seen.calls.lock().unwrap();
                        let mine = calls.entry(n).or_default();
                        mine.push(tp);
                        if mine.len() == 1 {
                            axum::http::StatusCode::INTERNAL_SERVER_ERROR
                        } else {
                            axum::http::StatusCode::OK
                        }
                    }
                },
            ),
        );
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}")
}

fn node_config(name: &str, pg: &fixtures::PgSchema, queue: &str, receiver: &str) -> String {
    format!(
        "node:\n  name: {name}\nstore:\n  kind: postgres\n  url: {}\n  schema: {}\n\
         server:\n  listen: 127.0.0.1:0\nqueues:\n  {queue}: {{workers: 2}}\n\
         pool:\n  poll_interval: 200ms\n\
         executors:\n  http:\n    allow_hosts: [\"127.0.0.1:*\"]\n\
         telemetry:\n  otlp_endpoint: {receiver}\n  service_name: traced-test\n",
        pg.url, pg.schema
    )
}

async fn post_task(node: &str, receiver: &str, n: i64, traceparent: Option<&str>) -> Value {
    let mut req = reqwest::Client::new()
        .post(format!("{node}/api/v1/tasks"))
        .json(&json!({
            "kind": "http",
            "args": {"url": format!("{receiver}/hit/{n}"), "method": "POST"},
            "max_attempts": 3,
        }));
    if let Some(tp) = traceparent {
        req = req.header("traceparent", tp);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 201);
    resp.json().await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_request_through_every_attempt_on_another_node() {
    let (_store, pg) = fixtures::pg_store().await;
    let seen = Seen::default();
    let receiver = serve(seen.clone()).await;
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    // Spans are sent every 200 ms rather than every 5 s.
    let env = [("OTEL_BSP_SCHEDULE_DELAY", "200")];
    // Node a takes requests and runs nothing of queue `default`; node b
    // runs the tasks.
    let a = fixtures::NodeProcess::start_env(
        &dir_a,
        &node_config("trace-a", &pg, "elsewhere", &receiver),
        &env,
    );
    let b = fixtures::NodeProcess::start_env(
        &dir_b,
        &node_config("trace-b", &pg, "default", &receiver),
        &env,
    );
    // The caller's own span, as its request carries it.
    let (trace, caller) = ("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7");
    let given = format!("00-{trace}-{caller}-01");
    let traced = post_task(&a.url, &receiver, 1, Some(&given)).await;
    // A malformed header is ignored: the enqueue begins a trace of its own.
    let fresh = post_task(&a.url, &receiver, 2, Some("00-not-a-trace-01")).await;
    let ids = [&traced, &fresh].map(|t| t["id"].as_i64().unwrap());

    // Each task: one enqueue span on a, two execution spans on b.
    let want = |s: &[Got], id: i64| {
        let mine = |name: &str| {
            s.iter()
                .filter(|g| g.span.name == name && g.attr("task.id") == Some(json!(id)))
                .count()
        };
        mine("task.enqueue") == 1 && mine("task.execute") == 2
    };
    fixtures::wait_for("both tasks' spans", Duration::from_secs(30), async || {
        let s = seen.spans();
        ids.iter().all(|&id| want(&s, id))
    })
    .await;
    let spans = seen.spans();
    assert_eq!(*seen.bad_exports.lock().unwrap(), 0, "every export decoded");
    let find = |name: &str, id: i64| -> Vec<Got> {
        let mut v: Vec<Got> = spans
            .iter()
            .filter(|g| g.span.name == name && g.attr("task.id") == Some(json!(id)))
            .cloned()
            .collect();
        v.sort_by_key(|g| g.attr("task.attempt").and_then(|a| a.as_i64()));
        v
    };

    // The traced task: the caller's span -> enqueue (on a) -> attempts (on b).
    let enqueue = &find("task.enqueue", ids[0])[0];
    assert_eq!(enqueue.node, "trace-a");
    assert_eq!(hex(&enqueue.span.trace_id), trace);
    assert_eq!(hex(&enqueue.span.parent_span_id), caller);
    assert_eq!(enqueue.span.kind, SpanKind::Producer as i32);
    assert_eq!(enqueue.attr("task.kind"), Some(json!("http")));
    assert_eq!(enqueue.attr("task.queue"), Some(json!("default")));
    let enqueue_id = hex(&enqueue.span.span_id);
    assert_eq!(
        traced["traceparent"],
        json!(format!("00-{trace}-{enqueue_id}-01")),
        "the task carries the enqueue span's context"
    );
    let runs = find("task.execute", ids[0]);
    for (i, run) in runs.iter().enumerate() {
        assert_eq!(run.node, "trace-b", "run {i} ran on the other node");
        assert_eq!(hex(&run.span.trace_id), trace, "run {i} is in the trace");
        assert_eq!(
            hex(&run.span.parent_span_id),
            enqueue_id,
            "run {i}'s parent is the enqueue span"
        );
        assert_eq!(run.span.kind, SpanKind::Consumer as i32);
        assert_eq!(run.attr("task.kind"), Some(json!("http")));
        assert_eq!(run.attr("task.queue"), Some(json!("default")));
        assert_eq!(run.attr("task.attempt"), Some(json!(i as i64 + 1)));
    }
    assert_eq!(runs[0].attr("task.outcome"), Some(json!("retried")));
    assert_eq!(
        runs[0].span.status.as_ref().map(|s| s.code),
        Some(StatusCode::Error as i32)
    );
    assert_eq!(runs[1].attr("task.outcome"), Some(json!("completed")));
    // What each attempt called was handed the attempt's own context.
    let calls = seen.calls.lock().unwrap().clone();
    let sent: Vec<Option<String>> = runs
        .iter()
        .map(|r| Some(format!("00-{trace}-{}-01", hex(&r.span.span_id))))
        .collect();
    assert_eq!(calls[&1], sent, "the http executor passes the trace on");

    // The task whose header was malformed: a trace begun at the enqueue.
    let enqueue = &find("task.enqueue", ids[1])[0];
    assert!(enqueue.span.parent_span_id.is_empty(), "a root span");
    assert_ne!(hex(&enqueue.span.trace_id), trace);
    for run in find("task.execute", ids[1]) {
        assert_eq!(run.span.trace_id, enqueue.span.trace_id);
        assert_eq!(run.span.parent_span_id, enqueue.span.span_id);
    }
    let logs = [a.log(), b.log()].concat();
    assert!(
        logs.iter().any(|l| l.contains("exporting traces by OTLP")),
        "the nodes say where traces go"
    );
    assert!(
        !logs.iter().any(|l| l.contains("Z ERROR ")),
        "no errors: {logs:#?}"
    );
}

#[tokio::test]
async fn a_bad_telemetry_section_is_refused_by_field() {
    let dir = tempfile::tempdir().unwrap();
    for (section, field) in [
        (
            "  otlp_endpoint: 127.0.0.1:4318\n",
            "telemetry.otlp_endpoint",
        ),
        (
            "  otlp_endpoint: ftp://collector\n",
            "telemetry.otlp_endpoint",
        ),
        ("  sample_ratio: 1.5\n", "telemetry.sample_ratio"),
        ("  service_name: \"\"\n", "telemetry.service_name"),
        ("  endpoint: http://c:4318\n", "endpoint"),
    ] {
        let cfg = dir.path().join("bad.yaml");
        std::fs::write(&cfg, format!("telemetry:\n{section}")).unwrap();
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_proto_tasker"))
            .args(["config", "check"])
            .arg(&cfg)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{section}: {err}");
        assert!(err.contains(field), "{section}: {err}");
    }
}

/// A library user's own OpenTelemetry pipeline sees the same tree: their
/// span -> `task.enqueue` -> `task.execute`, and a task enqueued by an
/// executor is a child of the attempt that enqueued it.
#[test]
fn a_library_users_pipeline_sees_enqueue_and_execution_as_one_tree() {
    use opentelemetry::trace::TracerProvider as _;
    use proto_tasker::{Builder, Client, SqliteStore, Store, TaskRegistry, executor_fn};
    use tracing_subscriber::layer::SubscriberExt;

    let exporter = opentelemetry_sdk::trace::InMemorySpanExporter::default();
    let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    let subscriber = tracing_subscriber::registry()
        .with(tracing_opentelemetry::layer().with_tracer(provider.tracer("app")));
    // One thread: every task of the pool runs under this subscriber.
    let _guard = tracing::subscriber::set_default(subscriber);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let ids = rt.block_on(async {
        let dir = tempfile::tempdir().unwrap();
        let store = Arc::new(SqliteStore::open_path(dir.path().join("t.db")).unwrap());
        store.migrate().await.unwrap();
        let client_cell: Arc<std::sync::OnceLock<Client>> = Arc::default();
        let mut registry = TaskRegistry::new();
        let cell = client_cell.clone();
        registry.register(
            "parent",
            executor_fn(move |_ctx| {
                let cell = cell.clone();
                async move {
                    let client = cell.get().expect("set before start");
                    let child = client.enqueue("child", json!({})).await?;
                    Ok(json!(child.id.0))
                }
            }),
        );
        registry.register("child", executor_fn(|_ctx| async { Ok(json!("done")) }));
        let pool = Builder::new(store, registry)
            .queue("default", 2)
            .build()
            .unwrap();
        let client = pool.client();
        let _ = client_cell.set(client.clone());
        pool.start().await.unwrap();
        let span = tracing::info_span!("checkout");
        let parent = {
            use tracing::Instrument;
            client
                .enqueue("parent", json!({}))
                .instrument(span)
                .await
                .unwrap()
        };
        let done = client
            .wait(parent.id, Duration::from_secs(10))
            .await
            .unwrap();
        let child = proto_tasker::TaskId(done.result.unwrap().as_i64().unwrap());
        client.wait(child, Duration::from_secs(10)).await.unwrap();
        pool.shutdown().await;
        [parent.id.0, child.0]
    });
    let spans = exporter.get_finished_spans().unwrap();
    let one = |name: &str, id: Option<i64>| {
        let found: Vec<_> = spans
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                id.is_none_or(|id| {
                    s.attributes.iter().any(|kv| {
                        kv.key.as_str() == "task.id" && kv.value == opentelemetry::Value::I64(id)
                    })
                })
            })
            .collect();
        assert_eq!(found.len(), 1, "{name} {id:?}: {spans:#?}");
        found[0].clone()
    };
    let checkout = one("checkout", None);
    let enqueue = one("task.enqueue", Some(ids[0]));
    let run = one("task.execute", Some(ids[0]));
    let child_enqueue = one("task.enqueue", Some(ids[1]));
    let child_run = one("task.execute", Some(ids[1]));
    let trace = checkout.span_context.trace_id();
    for s in [&enqueue, &run, &child_enqueue, &child_run] {
        assert_eq!(
            s.span_context.trace_id(),
            trace,
            "{} is in the trace",
            s.name
        );
    }
    assert_eq!(enqueue.parent_span_id, checkout.span_context.span_id());
    assert_eq!(run.parent_span_id, enqueue.span_context.span_id());
    assert_eq!(child_enqueue.parent_span_id, run.span_context.span_id());
    assert_eq!(
        child_run.parent_span_id,
        child_enqueue.span_context.span_id()
    );
}
