//! Nothing run twice at once: real node processes on PostgreSQL, broken on
//! purpose (a silent partition, skewed clocks), with every execution of
//! every task recorded by the task itself; then the history is checked.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use fixtures::trust::{
    Node, NodeSpec, Proxy, history, overlaps, pg_addr, ticking_task, wait_until,
};
use proto_tasker::{Client, NewTask, Store, TaskRegistry, TaskState};

async fn states(store: &Arc<dyn Store>) -> Vec<proto_tasker::Task> {
    fixtures::all_tasks(store).await
}

async fn all_complete(store: &Arc<dyn Store>) {
    wait_until(
        "every task completes",
        Duration::from_secs(60),
        async || {
            states(store)
                .await
                .iter()
                .all(|t| t.state == TaskState::Completed)
        },
    )
    .await;
}

/// A node that reaches PostgreSQL through a proxy that starts holding
/// packets (no error, no reply) must stop its tasks before the other node,
/// which sees it go silent, runs them again; after the partition heals,
/// every task completes once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silently_partitioned_node_stops_its_tasks_before_they_run_elsewhere() {
    let (store, guard) = fixtures::pg_store().await;
    let proxy = Proxy::start(pg_addr(&guard.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let spec = |name: &'static str, url: String| NodeSpec {
        dir: dir.path(),
        name,
        url: Box::leak(url.into_boxed_str()),
        schema: &guard.schema,
        workers: 4,
        heartbeat_ms: 300,
        node_timeout_ms: 3000,
        wrapper: Vec::new(),
        queues: "",
        extra: "",
    };
    let _a = Node::start(spec("a", proxy.url(&guard.url)));
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let tasks = (0..4)
        .map(|i| NewTask::new("shell", ticking_task(&log, &format!("t{i}"), 100)))
        .collect();
    client.insert_many(tasks).await.unwrap();
    wait_until("a runs all four", Duration::from_secs(20), async || {
        history(&log)
            .values()
            .filter(|r| r.iter().any(|r| r.node == "a"))
            .count()
            == 4
    })
    .await;
    let _b = Node::start(spec("b", guard.url.clone()));
    wait_until("b registers", Duration::from_secs(20), async || {
        store
            .node_list(chrono::Utc::now())
            .await
            .map(|n| n.len() == 2)
            .unwrap_or(false)
    })
    .await;
    proxy.hold(true);
    // b takes a for dead after node_timeout and runs its tasks again.
    wait_until("b re-runs a's tasks", Duration::from_secs(30), async || {
        history(&log)
            .values()
            .filter(|r| r.iter().any(|r| r.node == "b"))
            .count()
            == 4
    })
    .await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    proxy.hold(false);
    all_complete(&store).await;
    let h = history(&log);
    let bad = overlaps(&h);
    if !bad.is_empty() {
        for n in ["a", "b"] {
            let text =
                std::fs::read_to_string(dir.path().join(format!("{n}.log"))).unwrap_or_default();
            eprintln!("--- {n}.log\n{text}");
        }
    }
    assert!(bad.is_empty(), "executions overlapped: {bad:#?}");
    for t in states(&store).await {
        assert_eq!(t.node.as_deref(), Some("b"), "{t:?}");
    }
    eprintln!("history: {h:#?}");
}

/// A node that loses its lease stops its running tasks, and each of them
/// has used its attempt, as if the node had crashed: a task that keeps
/// costing nodes their lease runs out of attempts instead of running
/// forever, and `attempt` still counts the times a task started. (Only an
/// orderly shutdown gives a started task its attempt back.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_stopped_by_a_lost_lease_has_used_its_attempt() {
    let (store, guard) = fixtures::pg_store().await;
    let proxy = Proxy::start(pg_addr(&guard.url)).await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let url = proxy.url(&guard.url);
    let _a = Node::start(NodeSpec {
        dir: dir.path(),
        name: "a",
        url: &url,
        schema: &guard.schema,
        workers: 2,
        heartbeat_ms: 300,
        node_timeout_ms: 3000,
        wrapper: Vec::new(),
        queues: "",
        extra: "",
    });
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    // Long enough that the lease runs out while it runs (200 ticks, 10 s+).
    let id = client
        .insert(NewTask::new("shell", ticking_task(&log, "t", 200)))
        .await
        .unwrap()
        .task
        .id;
    wait_until("a starts the task", Duration::from_secs(20), async || {
        history(&log).contains_key("t")
    })
    .await;
    proxy.hold(true);
    // The lease (node_timeout less its margin) runs out; a says so and
    // stops the task (its ticks stop).
    let node_log = dir.path().join("a.log");
    wait_until("a stops the task", Duration::from_secs(20), async || {
        let said = std::fs::read_to_string(&node_log)
            .unwrap_or_default()
            .contains("lease lost");
        let before = history(&log).get("t").map(|r| r[0].last);
        tokio::time::sleep(Duration::from_millis(500)).await;
        said && before == history(&log).get("t").map(|r| r[0].last)
    })
    .await;
    proxy.hold(false);
    all_complete(&store).await;
    let runs = history(&log).get("t").cloned().unwrap_or_default();
    let task = store.task_get(id).await.unwrap().expect("the task");
    assert_eq!(runs.len(), 2, "started twice: {runs:#?}");
    assert_eq!(task.attempt, 2, "each start used an attempt: {task:?}");
    assert!(
        task.errors.iter().any(|e| e.message.contains("lease")),
        "the first attempt's error names the lost lease: {:?}",
        task.errors
    );
}

/// Nodes 30 s behind and 30 s ahead of the others: nothing of theirs is
/// rescued while they live, and one leader holds the lease at a time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skewed_clocks_neither_kill_live_nodes_nor_make_two_leaders() {
    if std::process::Command::new("faketime")
        .arg("--help")
        .output()
        .is_err()
    {
        assert_ne!(
            std::env::var("CI").as_deref(),
            Ok("true"),
            "faketime is missing (apt-get install faketime)"
        );
        eprintln!("SKIPPED: faketime is not installed (apt-get install faketime)");
        return;
    }
    let (store, guard) = fixtures::pg_store().await;
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let skew = |s: &str| {
        vec![
            "faketime".to_string(),
            "-m".into(),
            "--exclude-monotonic".into(),
            "-f".into(),
            s.into(),
        ]
    };
    let spec = |name: &'static str, wrapper: Vec<String>| NodeSpec {
        dir: dir.path(),
        name,
        url: &guard.url,
        schema: &guard.schema,
        workers: 3,
        heartbeat_ms: 300,
        node_timeout_ms: 2000,
        wrapper,
        queues: "",
        extra: "",
    };
    let _now = Node::start(spec("on-time", Vec::new()));
    let _behind = Node::start(spec("behind", skew("-30s")));
    let _ahead = Node::start(spec("ahead", skew("+30s")));
    wait_until(
        "three nodes register",
        Duration::from_secs(20),
        async || {
            store
                .node_list(chrono::Utc::now())
                .await
                .map(|n| n.len() == 3)
                .unwrap_or(false)
        },
    )
    .await;
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let tasks = (0..18)
        .map(|i| NewTask::new("shell", ticking_task(&log, &format!("t{i}"), 40)))
        .collect();
    client.insert_many(tasks).await.unwrap();
    let started = std::time::Instant::now();
    let mut leaders_seen = std::collections::BTreeSet::new();
    while started.elapsed() < Duration::from_secs(8) {
        let nodes = store.node_list(chrono::Utc::now()).await.unwrap();
        let leaders: Vec<_> = nodes
            .iter()
            .filter(|n| n.leader)
            .map(|n| n.name.clone())
            .collect();
        assert!(leaders.len() <= 1, "two leaders at once: {leaders:?}");
        leaders_seen.extend(leaders);
        assert_eq!(nodes.len(), 3, "a node was dropped: {nodes:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    all_complete(&store).await;
    let all = states(&store).await;
    let ran_on: std::collections::BTreeSet<_> = all.iter().filter_map(|t| t.node.clone()).collect();
    assert!(ran_on.len() >= 2, "tasks ran on {ran_on:?}");
    for t in &all {
        assert_eq!(t.attempt, 1, "rescued though its node lived: {t:?}");
        assert!(t.errors.is_empty(), "{t:?}");
    }
    assert!(overlaps(&history(&log)).is_empty());
    assert_eq!(leaders_seen.len(), 1, "the lease moved: {leaders_seen:?}");
}
