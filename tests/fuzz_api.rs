//! Property-based fuzzing of a live node's HTTP API: generated methods,
//! paths, query strings, headers and bodies go to every route. Whatever
//! arrives, the node answers without a 5xx (the store is up), without a
//! panic and without hanging, and a normal task still completes afterwards.

mod fixtures;

use std::time::Duration;

use proptest::prelude::*;
use proptest::test_runner::{Config as PtConfig, TestRunner};

const ROUTES: &[&str] = &[
    "/api/v1/tasks",
    "/api/v1/tasks/batch",
    "/api/v1/tasks/retry",
    "/api/v1/stats",
    "/api/v1/tasks/1",
    "/api/v1/tasks/1/cancel",
    "/api/v1/tasks/1/retry",
    "/api/v1/queues",
    "/api/v1/queues/default/pause",
    "/api/v1/queues/default/resume",
    "/api/v1/nodes",
    "/api/v1/schedules",
    "/api/v1/schedules/x",
    "/healthz",
    "/readyz",
    "/metrics",
    "/",
];

#[derive(Debug, Clone)]
struct Req {
    method: &'static str,
    path: String,
    query: String,
    json_type: bool,
    body: String,
}

fn json_value() -> impl Strategy<Value = serde_json::Value> {
    let leaf = prop_oneof![
        Just(serde_json::Value::Null),
        any::<bool>().prop_map(serde_json::Value::from),
        any::<i64>().prop_map(serde_json::Value::from),
        any::<f64>().prop_map(|f| serde_json::json!(f)),
        ".{0,40}".prop_map(serde_json::Value::from),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(serde_json::Value::from),
            prop::collection::btree_map(
                prop_oneof![
                    Just("kind".to_string()),
                    Just("args".to_string()),
                    Just("queue".to_string()),
                    Just("priority".to_string()),
                    Just("run_at".to_string()),
                    Just("delay_ms".to_string()),
                    Just("depends_on".to_string()),
                    Just("tasks".to_string()),
                    Just("ids".to_string()),
                    Just("cron".to_string()),
                    Just("name".to_string()),
                    ".{0,12}"
                ],
                inner,
                0..6
            )
            .prop_map(|m| serde_json::Value::Object(m.into_iter().collect())),
        ]
    })
}

fn request() -> impl Strategy<Value = Req> {
    let path = prop_oneof![
        prop::sample::select(ROUTES).prop_map(|s| s.to_string()),
        (prop::sample::select(ROUTES), "[a-zA-Z0-9%./_~-]{0,20}")
            .prop_map(|(r, tail)| format!("{r}/{tail}")),
        "/api/v1/tasks/[-0-9a-z%]{0,25}(/cancel|/retry)?",
    ];
    let body = prop_oneof![
        json_value().prop_map(|v| v.to_string()),
        json_value().prop_map(|v| serde_json::json!({"kind": "noop", "args": v}).to_string()),
        ".{0,200}",
    ];
    (
        prop::sample::select(&["GET", "POST", "PUT", "DELETE", "PATCH"][..]),
        path,
        "[a-z_=&%0-9.:-]{0,40}",
        any::<bool>(),
        body,
    )
        .prop_map(|(method, path, query, json_type, body)| Req {
            method,
            path,
            query,
            json_type,
            body,
        })
}

#[test]
fn generated_requests_never_break_a_node_on_sqlite() {
    fuzz(false);
}

#[test]
fn generated_requests_never_break_a_node_on_postgres() {
    fuzz(true);
}

fn fuzz(postgres: bool) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut cfg = proto_tasker::Config::default();
    cfg.store.path = dir.path().join("fuzz.db");
    cfg.store.synchronous = proto_tasker::store::Synchronous::Normal;
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.pool.poll_interval = Duration::from_millis(50);
    let _pg = postgres.then(|| {
        let pg = fixtures::PgSchema {
            url: fixtures::pg_url(),
            schema: fixtures::fresh_schema(),
        };
        cfg.store.kind = proto_tasker::config::StoreKind::Postgres;
        cfg.store.url = Some(pg.url.clone());
        cfg.store.schema = pg.schema.clone();
        cfg.store.pool_size = 4;
        pg
    });
    let (base, stop) = rt.block_on(async {
        let node = proto_tasker::Node::from_config(&cfg).await.unwrap();
        let base = format!("http://{}", node.local_addr().unwrap());
        let stop = tokio_util::sync::CancellationToken::new();
        let s = stop.clone();
        tokio::spawn(node.run(async move { s.cancelled().await }));
        (base, stop)
    });
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let cases = std::env::var("FUZZ_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(400);
    let mut runner = TestRunner::new(PtConfig {
        cases,
        failure_persistence: None,
        ..PtConfig::default()
    });
    runner
        .run(&request(), |r| {
            let url = if r.query.is_empty() {
                format!("{base}{}", r.path)
            } else {
                format!("{base}{}?{}", r.path, r.query)
            };
            let status = rt.block_on(async {
                let mut req = http.request(r.method.parse().unwrap(), &url);
                if r.json_type {
                    req = req.header("Content-Type", "application/json");
                }
                if r.method != "GET" {
                    req = req.body(r.body.clone());
                }
                req.send().await.map(|resp| resp.status())
            });
            let status = status.map_err(|e| TestCaseError::fail(format!("no answer: {e}")))?;
            prop_assert!(
                !status.is_server_error(),
                "{} {} -> {status}",
                r.method,
                url
            );
            Ok(())
        })
        .unwrap();
    // And the node still works (the fuzzer may have paused the queue).
    rt.block_on(async {
        http.post(format!("{base}/api/v1/queues/default/resume"))
            .send()
            .await
            .unwrap();
        let t: serde_json::Value = http
            .post(format!("{base}/api/v1/tasks"))
            .json(&serde_json::json!({"kind": "noop"}))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let done: serde_json::Value = http
            .get(format!("{base}/api/v1/tasks/{}?wait=5s", t["id"]))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(done["state"], "completed", "{done}");
        stop.cancel();
    });
}
