//! Distributed mode on the real PostgreSQL: node processes that die or
//! stall, connections killed under load, cancel across nodes, transactional
//! enqueue, and concurrent claimers.

mod fixtures;

use fixtures::{enqueue_http, wait_for};

use std::collections::HashMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proto_tasker::store::{ClaimParams, PostgresOptions, PostgresStore};
use proto_tasker::{
    Builder, Client, NewTask, SentinelConfig, Store, TaskError, TaskRegistry, TaskState,
    executor_fn,
};
use serde_json::{Value, json};

const BIN: &str = env!("CARGO_BIN_EXE_proto_tasker");

/// One request the execution-log server saw.
#[derive(Debug, Clone)]
struct Exec {
    n: i64,
    id: u64,
    at: Instant,
}

/// An HTTP endpoint the `http` executor calls: it records every execution
/// (the per-task execution log) and answers with a unique execution id.
#[derive(Clone, Default)]
struct ExecLog {
    execs: Arc<Mutex<Vec<Exec>>>,
    /// How long to hold the first execution of each task.
    hold_first: Arc<Mutex<Duration>>,
    /// How long to hold every other execution.
    hold: Arc<Mutex<Duration>>,
}

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
                    let (id, first) = {
                        let mut e = log.execs.lock().unwrap();
                        let first = !e.iter().any(|x| x.n == n);
                        let id = e.len() as u64 + 1;
                        e.push(Exec {
                            n,
                            id,
                            at: Instant::now(),
                        });
                        (id, first)
                    };
                    let hold = if first {
                        *log.hold_first.lock().unwrap()
                    } else {
                        *log.hold.lock().unwrap()
                    };
                    tokio::time::sleep(hold).await;
                    format!("exec-{id}")
                }
            }),
        );
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(l, app).await });
        format!("http://{addr}/run")
    }

    fn execs(&self) -> Vec<Exec> {
        self.execs.lock().unwrap().clone()
    }

    fn count_by_task(&self) -> HashMap<i64, usize> {
        let mut m = HashMap::new();
        for e in self.execs() {
            *m.entry(e.n).or_default() += 1;
        }
        m
    }
}

struct NodeProc {
    child: Child,
    name: String,
}

impl Drop for NodeProc {
    fn drop(&mut self) {
        let _ = signal(&self.child, "CONT");
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn signal(child: &Child, sig: &str) -> bool {
    Command::new("kill")
        .args([&format!("-{sig}"), &child.id().to_string()])
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

const HEARTBEAT_MS: u64 = 300;
const NODE_TIMEOUT_MS: u64 = 2000;

fn start_node(dir: &Path, name: &str, url: &str, schema: &str, workers: usize) -> NodeProc {
    start_node_with(dir, name, url, schema, workers, "")
}

fn start_node_with(
    dir: &Path,
    name: &str,
    url: &str,
    schema: &str,
    workers: usize,
    extra: &str,
) -> NodeProc {
    start_node_on(
        dir,
        name,
        &format!("url: {url}\n  schema: {schema}"),
        workers,
        extra,
    )
}

/// A node whose `store:` section holds `store` (its lines after `kind`,
/// indented by two) and the default pool size.
fn start_node_on(dir: &Path, name: &str, store: &str, workers: usize, extra: &str) -> NodeProc {
    let cfg = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &cfg,
        format!(
            "node:\n  name: {name}\nstore:\n  kind: postgres\n  {store}\n\
             server:\n  listen: 127.0.0.1:0\nqueues:\n  default: {{workers: {workers}}}\n\
             pool:\n  poll_interval: 200ms\n  shutdown_timeout: 2s\n\
             sentinel:\n  heartbeat_interval: {HEARTBEAT_MS}ms\n  node_timeout: {NODE_TIMEOUT_MS}ms\n\
             executors:\n  http:\n    allow_hosts: [\"127.0.0.1:*\"]\n    timeout: 60s\n{extra}"
        ),
    )
    .unwrap();
    let child = Command::new(BIN)
        .arg(format!("--config={}", cfg.display()))
        .env("PROTO_TASKER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    NodeProc {
        child,
        name: name.to_string(),
    }
}

/// Tasks in `state`; a connection the test itself killed may fail one read, so retry.
async fn count(store: &Arc<dyn Store>, state: TaskState) -> i64 {
    for _ in 0..20 {
        if let Ok(counts) = store.queue_counts().await {
            return counts.iter().filter(|c| c.1 == state).map(|c| c.2).sum();
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("the store never answered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_killed_every_task_completes() {
    let (store, guard) = fixtures::pg_store().await;
    let on = format!("url: {}\n  schema: {}", guard.url, guard.schema);
    three_nodes_one_killed(store, &on).await;
}

/// The same through PgBouncer in transaction pooling mode, LISTEN going
/// straight to PostgreSQL; the nodes reach PgBouncer through the relay
/// that fails the test if anything a node sends outlives its transaction.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_one_killed_through_pgbouncer() {
    let (store, guard) = fixtures::pg_store().await;
    let b = fixtures::pgbouncer::pgbouncer();
    let watch = fixtures::pgbouncer::Watch::start().await;
    let on = format!(
        "url: {}\n  schema: {}\n  pool_mode: transaction\n  listen_url: {}",
        watch.options(&guard.schema).url,
        guard.schema,
        b.direct
    );
    three_nodes_one_killed(store, &on).await;
    let found = watch.breaches();
    assert!(found.is_empty(), "through PgBouncer:\n{}", found.join("\n"));
}

/// Three nodes (`store`: their `store:` lines) drain 10,000 tasks; one is
/// SIGKILLed mid-run; every task completes, and only the rescued ones ran
/// twice.
async fn three_nodes_one_killed(store: Arc<dyn Store>, on: &str) {
    let log = ExecLog::default();
    *log.hold.lock().unwrap() = Duration::from_millis(15);
    *log.hold_first.lock().unwrap() = Duration::from_millis(15);
    let url = log.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let nodes: Vec<NodeProc> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| start_node_on(dir.path(), n, on, 12, ""))
        .collect();
    wait_for("three nodes", Duration::from_secs(20), async || {
        store.node_list(chrono::Utc::now()).await.unwrap().len() == 3
    })
    .await;

    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let by_task = enqueue_http(&client, &url, 10_000).await;
    wait_for("progress", Duration::from_secs(60), async || {
        count(&store, TaskState::Completed).await >= 2000
    })
    .await;
    let mut nodes = nodes;
    let mut victim = nodes.remove(1);
    assert_eq!(victim.name, "node-b");
    victim.child.kill().unwrap(); // SIGKILL
    let killed_at: DateTime<Utc> = Utc::now();
    victim.child.wait().unwrap();
    wait_for(
        "every task completed",
        Duration::from_secs(180),
        async || count(&store, TaskState::Completed).await == 10_000,
    )
    .await;

    let tasks = fixtures::all_tasks(&store).await;
    assert_eq!(tasks.len(), 10_000);
    let execs = log.count_by_task();
    let mut rescued = 0;
    for t in &tasks {
        assert_eq!(t.state, TaskState::Completed);
        let n = by_task[&t.id.0];
        let ran = execs.get(&n).copied().unwrap_or(0);
        assert!(ran >= 1, "task {} never ran", t.id);
        if t.attempt > 1 {
            rescued += 1;
            let e = &t.errors[0];
            assert!(e.message.contains("node node-b stopped"), "{:?}", t.errors);
            let late = (e.at - killed_at).num_milliseconds();
            assert!(
                late <= (NODE_TIMEOUT_MS + HEARTBEAT_MS + 700) as i64,
                "task {} rescued {late}ms after the kill",
                t.id
            );
        } else {
            assert_eq!(
                ran, 1,
                "task {} ran {ran} times without being rescued",
                t.id
            );
        }
        assert!(
            ran as i32 <= t.attempt,
            "task {} ran {ran} times in {} attempts",
            t.id,
            t.attempt
        );
    }
    assert!(
        rescued > 0,
        "the kill landed while node-b was running tasks"
    );
    let live = store.node_list(chrono::Utc::now()).await.unwrap();
    assert_eq!(
        live.iter().filter(|n| n.leader).count(),
        1,
        "one leader: {live:?}"
    );
    drop(nodes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_node_cannot_complete_rescued_tasks() {
    let (store, guard) = fixtures::pg_store().await;
    let log = ExecLog::default();
    *log.hold_first.lock().unwrap() = Duration::from_millis(3500);
    let url = log.serve().await;
    let dir = tempfile::tempdir().unwrap();
    let a = start_node(dir.path(), "node-a", &guard.url, &guard.schema, 20);
    wait_for("node-a", Duration::from_secs(20), async || {
        store.node_list(chrono::Utc::now()).await.unwrap().len() == 1
    })
    .await;
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let by_task = enqueue_http(&client, &url, 20).await;
    wait_for(
        "node-a running all 20",
        Duration::from_secs(20),
        async || log.execs().len() == 20,
    )
    .await;
    assert!(signal(&a.child, "STOP"));
    let b = start_node(dir.path(), "node-b", &guard.url, &guard.schema, 20);
    wait_for(
        "node-b rescues and finishes all",
        Duration::from_secs(30),
        async || count(&store, TaskState::Completed).await == 20,
    )
    .await;
    assert!(signal(&a.child, "CONT"));
    // node-a wakes up; its first executions answer, and it tries to complete them.
    tokio::time::sleep(Duration::from_millis(4000)).await;
    let execs = log.execs();
    for t in fixtures::all_tasks(&store).await {
        let n = by_task[&t.id.0];
        let mine: Vec<&Exec> = execs.iter().filter(|e| e.n == n).collect();
        assert_eq!(mine.len(), 2, "task {} ran twice: once on each node", t.id);
        let second = mine.iter().max_by_key(|e| e.at).unwrap();
        assert_eq!(t.state, TaskState::Completed);
        assert_eq!(t.attempt, 2);
        assert_eq!(t.node.as_deref(), Some("node-b"));
        assert_eq!(
            t.result.as_ref().unwrap()["body"],
            format!("exec-{}", second.id),
            "the stale node's late result did not overwrite the re-run's"
        );
    }
    drop((a, b));
}

async fn terminate_backends(url: &str, schema: &str) -> u64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("proto_tasker:{schema}")],
        )
        .await
        .unwrap();
    rows.len() as u64
}

fn fast_sentinel() -> SentinelConfig {
    SentinelConfig {
        heartbeat_interval: Duration::from_millis(200),
        node_timeout: Duration::from_secs(3),
        check_interval: Duration::from_millis(100),
        ..SentinelConfig::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_connections_are_survived() {
    let (store, guard) = fixtures::pg_store_typed().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let pool = Builder::new(store.clone(), reg)
        .queue("default", 16)
        // Long on purpose: after the kills, wake-ups must come by NOTIFY, not polling.
        .poll_interval(Duration::from_secs(30))
        .sentinel(fast_sentinel())
        .build()
        .unwrap();
    let client = pool.client();
    let tasks = (0..3000)
        .map(|_| NewTask::new("sleep", json!({"ms": 2})))
        .collect();
    client.insert_many(tasks).await.unwrap();
    pool.start().await.unwrap();
    let dyn_store: Arc<dyn Store> = store.clone();
    let mut killed = 0;
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        killed += terminate_backends(&guard.url, &guard.schema).await;
    }
    assert!(killed > 0, "no backend was killed");
    wait_for("all 3000 completed", Duration::from_secs(120), async || {
        count(&dyn_store, TaskState::Completed).await == 3000
    })
    .await;
    // The LISTEN connection was killed too; once it is back, a new task is
    // picked up by notification well before the 30 s poll.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let began = Instant::now();
    let t = client.enqueue("noop", json!(null)).await.unwrap();
    let done = client.wait(t.id, Duration::from_secs(20)).await.unwrap();
    assert_eq!(done.state, TaskState::Completed);
    assert!(
        began.elapsed() < Duration::from_secs(10),
        "woken by NOTIFY after reconnecting: {:?}",
        began.elapsed()
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_reaches_a_task_running_on_another_node() {
    let (store_a, guard) = fixtures::pg_store_typed().await;
    let store_b = Arc::new(
        PostgresStore::connect(
            PostgresOptions::new(guard.url.clone()).schema(guard.schema.clone()),
        )
        .await
        .unwrap(),
    );
    let mut reg = TaskRegistry::new();
    reg.register(
        "wait_for_cancel",
        executor_fn(|ctx| async move {
            ctx.cancel.cancelled().await;
            Err(TaskError::failed("stopped"))
        }),
    );
    // Cancel polling runs at each heartbeat: make it slow, so a quick stop proves NOTIFY.
    let slow = SentinelConfig {
        heartbeat_interval: Duration::from_secs(5),
        node_timeout: Duration::from_secs(30),
        ..SentinelConfig::default()
    };
    let node_a = Builder::new(store_a.clone(), reg.clone())
        .node_name("a")
        .queue("a", 1)
        .poll_interval(Duration::from_millis(100))
        .sentinel(slow.clone())
        .build()
        .unwrap();
    let node_b = Builder::new(store_b.clone(), reg)
        .node_name("b")
        .queue("b", 1)
        .sentinel(slow)
        .build()
        .unwrap();
    node_a.start().await.unwrap();
    node_b.start().await.unwrap();
    let t = node_b
        .client()
        .insert(
            NewTask::new("wait_for_cancel", json!(null))
                .with(proto_tasker::TaskOptions::default().queue("a")),
        )
        .await
        .unwrap()
        .task;
    let shared = node_a.shared().clone();
    wait_for("running on a", Duration::from_secs(10), async || {
        shared.workers_busy() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let began = Instant::now();
    node_b.client().cancel(t.id).await.unwrap();
    let done = node_b
        .client()
        .wait(t.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Cancelled);
    assert_eq!(done.node.as_deref(), Some("a"));
    assert!(
        began.elapsed() < Duration::from_secs(3),
        "delivered by NOTIFY: {:?}",
        began.elapsed()
    );
    node_a.shutdown().await;
    node_b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_enqueued_in_a_transaction_exist_only_if_it_commits() {
    let (store, guard) = fixtures::pg_store_typed().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let pool = Builder::new(store.clone(), reg)
        .poll_interval(Duration::from_secs(30))
        .build()
        .unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let (mut pg, conn) = tokio_postgres::connect(&guard.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    pg.batch_execute(&format!("CREATE TABLE {}.orders (id int)", guard.schema))
        .await
        .unwrap();

    let tx = pg.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {}.orders VALUES (1)", guard.schema),
        &[],
    )
    .await
    .unwrap();
    let gone = client
        .insert_in(&tx, vec![NewTask::new("noop", json!({"order": 1}))])
        .await
        .unwrap();
    tx.rollback().await.unwrap();
    assert!(
        client.get(gone[0].task.id).await.unwrap().is_none(),
        "rolled back with the caller's transaction"
    );

    let tx = pg.transaction().await.unwrap();
    tx.execute(
        &format!("INSERT INTO {}.orders VALUES (2)", guard.schema),
        &[],
    )
    .await
    .unwrap();
    let kept = client
        .insert_in(&tx, vec![NewTask::new("noop", json!({"order": 2}))])
        .await
        .unwrap();
    assert!(
        client.get(kept[0].task.id).await.unwrap().is_none(),
        "invisible before commit"
    );
    let began = Instant::now();
    tx.commit().await.unwrap();
    let t = client
        .wait(kept[0].task.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(t.state, TaskState::Completed);
    assert!(
        began.elapsed() < Duration::from_secs(5),
        "the commit's NOTIFY woke the node"
    );
    pool.shutdown().await;
}

#[test]
fn concurrent_claimers_never_claim_the_same_task() {
    use proptest::prelude::*;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let (stores, _guard) = rt.block_on(async {
        let (first, guard) = fixtures::pg_store_typed().await;
        let mut stores: Vec<Arc<dyn Store>> = vec![first];
        for _ in 0..3 {
            let s = PostgresStore::connect(
                PostgresOptions::new(guard.url.clone()).schema(guard.schema.clone()),
            )
            .await
            .unwrap();
            stores.push(Arc::new(s));
        }
        (stores, guard)
    });
    let round = std::sync::atomic::AtomicU32::new(0);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases: 24,
        ..ProptestConfig::default()
    });
    runner
        .run(
            &(1usize..400, 2usize..8, 1usize..40),
            |(tasks, claimers, batch)| {
                let queue = format!(
                    "q{}",
                    round.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                );
                let claimed = rt.block_on(async {
                    let now = Utc::now();
                    let rows = (0..tasks)
                        .map(|_| fixtures::insert("x", &queue, 0, now))
                        .collect();
                    stores[0].task_insert_many(rows, now).await.unwrap();
                    let mut handles = Vec::new();
                    for c in 0..claimers {
                        let store = stores[c % stores.len()].clone();
                        let queue = queue.clone();
                        handles.push(tokio::spawn(async move {
                            let mut mine = Vec::new();
                            loop {
                                let got = store
                                    .task_claim(ClaimParams {
                                        queue: queue.clone(),
                                        node: format!("n{c}"),
                                        limit: batch,
                                        now: Utc::now(),
                                        limits: None,
                                        room: None,
                                    })
                                    .await
                                    .unwrap();
                                if got.is_empty() {
                                    return mine;
                                }
                                mine.extend(got.into_iter().map(|t| t.id));
                            }
                        }));
                    }
                    let mut all = Vec::new();
                    for h in handles {
                        all.extend(h.await.unwrap());
                    }
                    all
                });
                let unique: std::collections::HashSet<_> = claimed.iter().collect();
                prop_assert_eq!(claimed.len(), tasks, "every task claimed");
                prop_assert_eq!(unique.len(), tasks, "no task claimed twice");
                Ok(())
            },
        )
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_restart_loses_no_outcome() {
    let root = std::env::temp_dir().join(format!("proto_tasker-restart-{}", std::process::id()));
    let cluster = tokio::task::spawn_blocking(move || fixtures::Cluster::create(&root))
        .await
        .unwrap()
        .unwrap();
    let store = Arc::new(
        PostgresStore::connect(PostgresOptions::new(cluster.url.clone()).schema("restart"))
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let pool = Builder::new(store.clone(), reg)
        .queue("default", 16)
        .poll_interval(Duration::from_millis(100))
        .sentinel(SentinelConfig {
            heartbeat_interval: Duration::from_millis(300),
            node_timeout: Duration::from_secs(10),
            ..SentinelConfig::default()
        })
        .build()
        .unwrap();
    let client = pool.client();
    let tasks = (0..1500)
        .map(|_| NewTask::new("sleep", json!({"ms": 20})))
        .collect();
    client.insert_many(tasks).await.unwrap();
    pool.start().await.unwrap();
    let dyn_store: Arc<dyn Store> = store.clone();
    wait_for("progress", Duration::from_secs(60), async || {
        count(&dyn_store, TaskState::Completed).await >= 200
    })
    .await;
    // Down for two seconds with tasks running: their outcomes wait in the completer.
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().unwrap();
        std::thread::sleep(Duration::from_secs(2));
        cluster.start().unwrap();
        cluster
    })
    .await
    .unwrap();
    wait_for(
        "all 1500 completed after the restart",
        Duration::from_secs(120),
        async || count(&dyn_store, TaskState::Completed).await == 1500,
    )
    .await;
    let tasks = fixtures::all_tasks(&dyn_store).await;
    assert!(
        tasks
            .iter()
            .all(|t| t.state == TaskState::Completed && t.attempt == 1),
        "each ran once, none lost"
    );
    pool.shutdown().await;
    drop(store);
    let _ = tokio::task::spawn_blocking(move || {
        let _ = cluster.stop();
        let _ = std::fs::remove_dir_all(&cluster.root);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_cannot_heartbeat_fences_itself() {
    let root = std::env::temp_dir().join(format!("proto_tasker-fence-{}", std::process::id()));
    let cluster = tokio::task::spawn_blocking(move || fixtures::Cluster::create(&root))
        .await
        .unwrap()
        .unwrap();
    let store = Arc::new(
        PostgresStore::connect(PostgresOptions::new(cluster.url.clone()).schema("fence"))
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let stopped = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let s2 = stopped.clone();
    let mut reg = TaskRegistry::new();
    reg.register(
        "long",
        executor_fn(move |ctx| {
            let s2 = s2.clone();
            async move {
                ctx.cancel.cancelled().await;
                s2.store(true, std::sync::atomic::Ordering::SeqCst);
                Err(TaskError::failed("stopped: lease lost"))
            }
        }),
    );
    let heartbeat = Duration::from_millis(200);
    let lease = Duration::from_millis(1500);
    let pool = Builder::new(store.clone(), reg)
        .poll_interval(Duration::from_millis(100))
        .sentinel(SentinelConfig {
            heartbeat_interval: heartbeat,
            node_timeout: lease,
            ..SentinelConfig::default()
        })
        .shutdown_timeout(Duration::from_millis(200))
        .build()
        .unwrap();
    let client = pool.client();
    let t = client.enqueue("long", json!(null)).await.unwrap();
    pool.start().await.unwrap();
    let shared = pool.shared().clone();
    wait_for("running", Duration::from_secs(10), async || {
        shared.workers_busy() == 1
    })
    .await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop().unwrap();
        cluster
    })
    .await
    .unwrap();
    let down = Instant::now();
    wait_for(
        "the node to stop its task",
        Duration::from_secs(10),
        async || stopped.load(std::sync::atomic::Ordering::SeqCst),
    )
    .await;
    let took = down.elapsed();
    assert!(
        took < lease + heartbeat * 3,
        "fenced within its lease: {took:?}"
    );
    assert!(
        shared.fenced.load(std::sync::atomic::Ordering::SeqCst),
        "claims stopped"
    );
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.start().unwrap();
        cluster
    })
    .await
    .unwrap();
    // Back up: the node unfences and runs the task again, in its second
    // attempt (the stopped one counts, as a rescued one does).
    wait_for("the task to run again", Duration::from_secs(20), async || {
        matches!(store.task_get(t.id).await, Ok(Some(x)) if x.state == TaskState::Running && x.attempt == 2)
            && !shared.fenced.load(std::sync::atomic::Ordering::SeqCst)
    })
    .await;
    let again = store.task_get(t.id).await.unwrap().unwrap();
    assert!(
        matches!(&again.errors[..], [e] if e.attempt == 1 && e.message.contains("lost its lease")),
        "the first attempt's error names the lost lease: {:?}",
        again.errors
    );
    pool.shutdown().await;
    let _ = tokio::task::spawn_blocking(move || {
        let _ = cluster.stop();
        let _ = std::fs::remove_dir_all(&cluster.root);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_schedule_fires_each_tick_once_across_nodes_while_the_leader_dies() {
    let (store, guard) = fixtures::pg_store().await;
    let dir = tempfile::tempdir().unwrap();
    let schedule = "schedules:\n  - name: tick\n    cron: \"* * * * * *\"\n    kind: noop\n    catch_up: all\n";
    let mut nodes: Vec<NodeProc> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| start_node_with(dir.path(), n, &guard.url, &guard.schema, 4, schedule))
        .collect();
    wait_for(
        "a leader among three nodes",
        Duration::from_secs(20),
        async || {
            let n = store.node_list(chrono::Utc::now()).await.unwrap();
            n.len() == 3 && n.iter().any(|x| x.leader)
        },
    )
    .await;
    // Count the ticks of a 20-second window that starts at the next whole second.
    let start = Utc::now() + chrono::Duration::seconds(1);
    let start = start - chrono::Duration::nanoseconds(start.timestamp_subsec_nanos() as i64);
    let end = start + chrono::Duration::seconds(20);
    tokio::time::sleep((start - Utc::now()).to_std().unwrap_or_default() + Duration::from_secs(10))
        .await;
    let leader = store
        .node_list(chrono::Utc::now())
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.leader)
        .unwrap()
        .name;
    let i = nodes.iter().position(|n| n.name == leader).unwrap();
    let mut dead = nodes.remove(i);
    dead.child.kill().unwrap();
    dead.child.wait().unwrap();
    // Wait out the window, the failover (node_timeout) and a little more.
    tokio::time::sleep(
        (end - Utc::now()).to_std().unwrap_or_default()
            + Duration::from_millis(NODE_TIMEOUT_MS + 2000),
    )
    .await;
    let tasks = fixtures::all_tasks(&store).await;
    let mut ticks: Vec<DateTime<Utc>> = tasks
        .iter()
        .filter_map(|t| {
            t.unique_key
                .as_deref()?
                .strip_prefix("cron:tick:")?
                .parse()
                .ok()
        })
        .filter(|t| *t >= start && *t < end)
        .collect();
    let n = ticks.len();
    ticks.sort();
    ticks.dedup();
    assert_eq!(ticks.len(), n, "no tick enqueued twice");
    assert_eq!(
        n, 20,
        "one task per second over 20 s with the leader killed at 10 s: {ticks:?}"
    );
    let new_leader = store
        .node_list(chrono::Utc::now())
        .await
        .unwrap()
        .into_iter()
        .find(|n| n.leader)
        .map(|n| n.name);
    assert!(
        new_leader.is_some_and(|l| l != leader),
        "another node took over"
    );
    drop(nodes);
}

/// When PostgreSQL refuses a connection, the error says what PostgreSQL
/// said (here: too many connections for a role limited to one, held
/// elsewhere), not the driver's bare "db error".
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_connections_say_why() {
    let admin_url = fixtures::pg_url();
    let role = format!("pt_limited_{}", std::process::id());
    let (admin, conn) = tokio_postgres::connect(&admin_url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "DROP ROLE IF EXISTS {role}; CREATE ROLE {role} LOGIN CONNECTION LIMIT 1"
        ))
        .await
        .unwrap();
    let cfg: tokio_postgres::Config = admin_url.parse().unwrap();
    let url = format!(
        "postgres://{role}@{}:{}/{}",
        match &cfg.get_hosts()[0] {
            tokio_postgres::config::Host::Tcp(h) => h.clone(),
            _ => "127.0.0.1".into(),
        },
        cfg.get_ports().first().copied().unwrap_or(5432),
        cfg.get_dbname().unwrap_or("postgres"),
    );
    // Take the role's one connection first, so the store's cannot open.
    let (held, held_conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .expect("the role's one connection");
    tokio::spawn(held_conn);
    let store = PostgresStore::connect(PostgresOptions::new(url).schema("pt_never_made"))
        .await
        .expect("connecting makes no connection yet");
    let e = store
        .ping()
        .await
        .expect_err("no second connection for the role");
    let msg = e.to_string();
    drop(store);
    drop(held);
    let _ = admin
        .batch_execute(&format!("DROP ROLE IF EXISTS {role}"))
        .await;
    assert!(
        msg.contains("53300") && msg.contains("too many connections"),
        "the error names PostgreSQL's reason: {msg}"
    );
}

/// Queue settings changed at run time reach three node processes on one
/// PostgreSQL, whose configs set no limits: a global_concurrency written
/// once holds on all three together, raising it and the workers per node
/// lets them run more, and removing it (null) is kept, not undone by the
/// nodes' configs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_changed_at_run_time_reach_three_node_processes() {
    use proto_tasker::store::QueueSettings;
    let (store, guard) = fixtures::pg_store_typed().await;
    let store: Arc<dyn Store> = store;
    let dir = tempfile::tempdir().unwrap();
    let on = format!("url: {}\n  schema: {}", guard.url, guard.schema);
    let _nodes: Vec<NodeProc> = ["node-a", "node-b", "node-c"]
        .iter()
        .map(|n| start_node_on(dir.path(), n, &on, 2, ""))
        .collect();
    wait_for("three nodes", Duration::from_secs(20), async || {
        store.node_list(chrono::Utc::now()).await.unwrap().len() == 3
    })
    .await;
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let set = async |s: QueueSettings| client.queue_set_settings("default", s).await.unwrap();
    let cap = |n: Option<u32>, workers: Option<u32>| QueueSettings {
        global_concurrency: n,
        workers,
        ..Default::default()
    };
    set(cap(Some(1), None)).await;
    let tasks: Vec<NewTask> = (0..200)
        .map(|_| NewTask::new("sleep", json!({"ms": 300})))
        .collect();
    client.insert_many(tasks).await.unwrap();
    // Samples of the running count and of which nodes run tasks.
    let sample = async |secs: u64| {
        let mut most = 0;
        let mut nodes = std::collections::HashSet::new();
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            let running = store
                .task_list(proto_tasker::ListParams {
                    state: Some(TaskState::Running),
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap();
            most = most.max(running.len());
            nodes.extend(running.into_iter().filter_map(|t| t.node));
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
        (most, nodes)
    };
    let (most, _) = sample(2).await;
    assert_eq!(most, 1, "global_concurrency 1 across three nodes");
    // Raised to 4: all three nodes (2 workers each) share the 4.
    let changed = Instant::now();
    set(cap(Some(4), None)).await;
    wait_for("4 running", Duration::from_secs(3), async || {
        count(&store, TaskState::Running).await == 4
    })
    .await;
    let picked_up = changed.elapsed();
    let (most, nodes) = sample(2).await;
    assert_eq!(most, 4, "global_concurrency 4");
    assert!(
        nodes.len() >= 2,
        "the work is spread over the nodes: {nodes:?}"
    );
    // No cap and 3 workers per node: 9 at once; the nodes' configs (2
    // workers, no cap) do not take the change back.
    set(cap(None, Some(3))).await;
    wait_for("9 running", Duration::from_secs(3), async || {
        count(&store, TaskState::Running).await == 9
    })
    .await;
    // (A task whose outcome is queued but not yet written still counts as
    // running in the store while its worker takes the next: the nodes'
    // own busy counts bound the workers.)
    wait_for(
        "every node reports 3 workers",
        Duration::from_secs(3),
        async || {
            let listed = store.node_list(chrono::Utc::now()).await.unwrap();
            listed.iter().all(|n| n.workers == 3)
        },
    )
    .await;
    let end = Instant::now() + Duration::from_secs(2);
    while Instant::now() < end {
        let listed = store.node_list(chrono::Utc::now()).await.unwrap();
        assert!(
            listed.iter().all(|n| n.workers == 3 && n.workers_busy <= 3),
            "{listed:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let stored = client.queue_settings().await.unwrap()["default"];
    assert_eq!((stored.global_concurrency, stored.workers), (None, Some(3)));
    eprintln!("a raised global_concurrency was running on the nodes {picked_up:?} after the write");
}

/// Only the leader rescues the tasks of dead nodes. While another node
/// holds the leader lease, a live node whose own lease is old enough to
/// rescue leaves a dead node's task alone; once that lease lapses it leads,
/// and rescues the task. (When every node rescued, every heartbeat, a
/// hundred nodes each scanned all running tasks every two seconds and
/// queued on the same rows.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_the_leader_rescues_a_dead_nodes_tasks() {
    let (store, _guard) = fixtures::pg_store_typed().await;
    let dyn_store: Arc<dyn Store> = store.clone();
    dyn_store
        .task_insert_many(vec![fixtures::insert("k", "q", 0, Utc::now())], Utc::now())
        .await
        .unwrap();
    // Claimed by a node that never registered: dead from the start.
    let claimed = dyn_store
        .task_claim(ClaimParams {
            queue: "q".into(),
            node: "gone".into(),
            limit: 1,
            now: Utc::now(),
            limits: None,
            room: None,
        })
        .await
        .unwrap();
    let id = claimed[0].id;
    // "a" leads: its lease is renewed here, as its Sentinel would (every
    // 200 ms; a 5 s lease leaves room for a loaded machine).
    let ttl = Duration::from_secs(5);
    assert!(
        dyn_store
            .leader_try_elect("a", ttl, Utc::now())
            .await
            .unwrap()
    );
    let renew = {
        let s = dyn_store.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(200)).await;
                let _ = s.leader_try_elect("a", ttl, Utc::now()).await;
            }
        })
    };
    let b = Builder::new(store.clone(), TaskRegistry::new())
        .node_name("b")
        .queue("other", 1)
        .sentinel(fast_sentinel())
        .build()
        .unwrap();
    b.start().await.unwrap();
    // b may rescue once it has held its own lease for node_timeout (3 s);
    // give it that and a dozen heartbeats more.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let t = dyn_store.task_get(id).await.unwrap().unwrap();
    assert_eq!(
        t.state,
        TaskState::Running,
        "a node that does not lead rescued a dead node's task: {:?}",
        t.errors
    );
    assert!(!b.shared().is_leader());
    renew.abort();
    wait_for(
        "b leads and rescues the task",
        Duration::from_secs(20),
        async || dyn_store.task_get(id).await.unwrap().unwrap().state == TaskState::Retryable,
    )
    .await;
    assert!(b.shared().is_leader());
    b.shutdown().await;
}
