//! One task's output never stops a node recording results: output holding
//! NUL or invalid UTF-8, from `shell` and from `http`, and output past the
//! caps, is stored the same way on both stores, and the tasks that run after
//! it complete. (On PostgreSQL a NUL in an outcome once made the completer
//! retry its batch forever, so every later task stayed `running`.)

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use axum::routing::get;
use fixtures::Backend;
use proto_tasker::executors::http::HttpExecutor;
use proto_tasker::executors::shell::ShellExecutor;
use proto_tasker::{Builder, NewTask, TaskOptions, TaskRegistry, TaskState};
use serde_json::json;

async fn binary_body() -> String {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/bin",
        get(|| async { axum::body::Bytes::from_static(b"PK\x00\x01\xff\xfe binary") }),
    );
    tokio::spawn(async move { axum::serve(l, app).await });
    format!("http://{addr}/bin")
}

async fn poison_does_not_block_other_outcomes(b: Backend) {
    let url = binary_body().await;
    let mut r = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut r);
    r.register(
        "shell",
        Arc::new(
            ShellExecutor::new(
                ["printf".to_string(), "sh".to_string(), "head".to_string()],
                4096,
            )
            .unwrap(),
        ),
    );
    r.register(
        "http",
        Arc::new(
            HttpExecutor::new(["127.0.0.1:*".to_string()], 1 << 20, Duration::from_secs(5))
                .unwrap(),
        ),
    );
    let pool = Builder::new(b.store.clone(), r)
        .queue("default", 4)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    pool.start().await.unwrap();
    let c = pool.client();
    let once = || TaskOptions::default().max_attempts(1);
    let tasks = vec![
        NewTask::new("shell", json!({"cmd": ["printf", "a\\0b\\377c"]})).with(once()),
        NewTask::new(
            "shell",
            json!({"cmd": ["sh", "-c", "printf 'e\\0rr\\377' >&2; exit 3"]}),
        )
        .with(once()),
        NewTask::new(
            "shell",
            json!({"cmd": ["head", "-c", "300000", "/dev/zero"]}),
        )
        .with(once()),
        NewTask::new("http", json!({"url": url})).with(once()),
    ];
    let mut ids: Vec<_> = c
        .insert_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.task.id)
        .collect();
    for _ in 0..20 {
        ids.push(c.enqueue("noop", json!({})).await.unwrap().id);
    }
    let mut done = Vec::new();
    for id in &ids {
        done.push(c.wait(*id, Duration::from_secs(20)).await.unwrap());
    }
    let printf = &done[0];
    assert_eq!(printf.state, TaskState::Completed, "{printf:?}");
    assert_eq!(
        printf.result.as_ref().unwrap()["stdout"],
        "a\u{FFFD}b\u{FFFD}c"
    );
    let failed = &done[1];
    assert_eq!(failed.state, TaskState::Failed, "{failed:?}");
    assert!(
        failed.errors[0].message.contains("e\u{FFFD}rr\u{FFFD}"),
        "{:?}",
        failed.errors
    );
    let zeros = &done[2];
    assert_eq!(zeros.state, TaskState::Completed, "{zeros:?}");
    let out = zeros.result.as_ref().unwrap()["stdout"].as_str().unwrap();
    assert!(
        out.chars().all(|ch| ch == '\u{FFFD}'),
        "NUL kept in {out:?}"
    );
    assert!(out.len() <= 4096 * 3, "{} bytes kept", out.len());
    let http = &done[3];
    assert_eq!(http.state, TaskState::Completed, "{http:?}");
    assert_eq!(
        http.result.as_ref().unwrap()["body"],
        "PK\u{FFFD}\u{1}\u{FFFD}\u{FFFD} binary"
    );
    assert!(
        done[4..].iter().all(|t| t.state == TaskState::Completed),
        "the tasks after the poison ran and were recorded"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_outputs_do_not_block_other_outcomes_on_sqlite() {
    poison_does_not_block_other_outcomes(Backend::sqlite().await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_outputs_do_not_block_other_outcomes_on_postgres() {
    poison_does_not_block_other_outcomes(Backend::postgres().await).await;
}
