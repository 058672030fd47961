//! Many nodes on one PostgreSQL through PgBouncer. A test binary of its
//! own: fifty node processes load this 2-core machine, and timing tests in
//! other binaries never run beside it.

mod fixtures;

use fixtures::{enqueue_http, wait_for};

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use proto_tasker::{Client, TaskRegistry, TaskState};
use serde_json::Value;

/// Counts the executions of each task (`{"n": ...}` bodies posted by the
/// `http` executor).
#[derive(Clone, Default)]
struct ExecLog(Arc<Mutex<HashMap<i64, usize>>>);

impl ExecLog {
    async fn serve(&self) -> String {
        let log = self.clone();
        let app = axum::Router::new().route(
            "/run",
            axum::routing::post(move |body: String| {
                let log = log.clone();
                async move {
                    let v: Value = serde_json::from_str(&body).unwrap_or_default();
                    let n = v["n"].as_i64().unwrap_or(-1);
                    *log.0.lock().unwrap().entry(n).or_default() += 1;
                    "ok"
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}/run")
    }

    fn count_by_task(&self) -> HashMap<i64, usize> {
        self.0.lock().unwrap().clone()
    }
}

struct NodeProc {
    child: Child,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_node_on(dir: &Path, name: &str, store: &str, workers: usize) -> NodeProc {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "node:\n  name: {name}\nstore:\n  kind: postgres\n  {store}\n\
             server:\n  listen: 127.0.0.1:0\nqueues:\n  default: {{workers: {workers}}}\n\
             pool:\n  poll_interval: 500ms\n  shutdown_timeout: 2s\n\
             sentinel:\n  heartbeat_interval: 1s\n  node_timeout: 5s\n\
             executors:\n  http:\n    allow_hosts: [\"127.0.0.1:*\"]\n    timeout: 60s\n"
        ),
    )
    .unwrap();
    let child = Command::new(env!("CARGO_BIN_EXE_proto_tasker"))
        .arg(format!("--config={}", cfg.display()))
        .env("PROTO_TASKER_LOG", "error")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    NodeProc { child }
}

/// Fifty node processes through PgBouncer (transaction mode) on one
/// PostgreSQL: 20,000 tasks all complete, five nodes SIGKILLed mid-run have
/// their tasks rescued, one leader, and PostgreSQL's connections stay within
/// PgBouncer's pool plus the LISTEN connections of the nodes that have one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_nodes_through_pgbouncer() {
    const NODES: usize = 50;
    const LISTENERS: usize = 10;
    const TASKS: usize = 20_000;
    let (store, guard) = fixtures::pg_store().await;
    let b = fixtures::pgbouncer::pgbouncer();
    let log = ExecLog::default();
    let url = log.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let mut nodes: Vec<NodeProc> = (0..NODES)
        .map(|i| {
            // The first few LISTEN on a direct connection; the rest poll.
            let listen = if i < LISTENERS {
                format!("\n  listen_url: {}", b.direct)
            } else {
                String::new()
            };
            let on = format!(
                "url: {}\n  schema: {}\n  pool_mode: transaction{listen}",
                b.url, guard.schema
            );
            start_node_on(dir.path(), &format!("n-{i:02}"), &on, 4)
        })
        .collect();
    wait_for("fifty nodes", Duration::from_secs(60), async || {
        store.node_list(Utc::now()).await.unwrap().len() == NODES
    })
    .await;
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let by_task = enqueue_http(&client, &url, TASKS).await;
    let mut most = 0;
    let server_connections = async || {
        let (c, conn) = tokio_postgres::connect(&b.direct, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("proto_tasker:{}", guard.schema)],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    // queue_counts stops at 10,000 finished tasks per state: count here.
    let finished = async || {
        let (c, conn) = tokio_postgres::connect(&b.direct, tokio_postgres::NoTls)
            .await
            .unwrap();
        tokio::spawn(conn);
        c.query_one(
            &format!(
                "SELECT count(*) FROM {}.tasks WHERE state IN ('completed', 'failed', 'cancelled')",
                guard.schema
            ),
            &[],
        )
        .await
        .unwrap()
        .get::<_, i64>(0)
    };
    wait_for("progress", Duration::from_secs(120), async || {
        most = most.max(server_connections().await);
        finished().await >= (TASKS / 5) as i64
    })
    .await;
    // Five nodes die mid-run, listeners and pollers alike.
    for i in [1, 7, 12, 30, 44] {
        let victim = &mut nodes[i];
        victim.child.kill().unwrap();
        victim.child.wait().unwrap();
    }
    wait_for(
        "every task finished",
        Duration::from_secs(300),
        async || {
            most = most.max(server_connections().await);
            finished().await == TASKS as i64
        },
    )
    .await;
    // PgBouncer's pool, the nodes' LISTEN connections, and this test's own
    // direct store (2 pooled + 1 listener).
    let budget = (fixtures::pgbouncer::SERVER_POOL + LISTENERS + 3) as i64;
    assert!(
        most <= budget,
        "{most} server connections, budget {budget} (without PgBouncer: {})",
        NODES * 3
    );
    let execs = log.count_by_task();
    let tasks = fixtures::all_tasks(&store).await;
    assert_eq!(tasks.len(), TASKS);
    let mut rescued = 0;
    for t in &tasks {
        assert_eq!(t.state, TaskState::Completed);
        let ran = execs.get(&by_task[&t.id.0]).copied().unwrap_or(0);
        assert!(ran >= 1, "task {} never ran", t.id);
        assert!(
            ran as i32 <= t.attempt,
            "task {} ran {ran} times in {} attempts",
            t.id,
            t.attempt
        );
        if t.attempt > 1 {
            rescued += 1;
        }
    }
    assert!(rescued > 0, "the kills landed while nodes ran tasks");
    let live = store.node_list(Utc::now()).await.unwrap();
    let beating = live
        .iter()
        .filter(|n| n.heartbeat_at > Utc::now() - chrono::Duration::seconds(5))
        .count();
    assert_eq!(beating, NODES - 5, "the killed nodes stopped heartbeating");
    assert_eq!(live.iter().filter(|n| n.leader).count(), 1, "one leader");
    eprintln!("fifty nodes: {TASKS} tasks, {rescued} rescued, at most {most} server connections");
    drop(nodes);
}
