//! A chaos run, Jepsen's idea in miniature: three node processes on a
//! PostgreSQL cluster of our own, a stream of tasks that record every
//! execution, and a nemesis that at random crashes and restarts nodes (with
//! long `shell` tasks in flight), pauses them past their lease, black-holes
//! one node's connections, kills database backends, and restarts
//! PostgreSQL. Then a checker reads the history:
//!
//! - every acknowledged enqueue completed;
//! - no two executions of one task overlapped in time, unless the first
//!   one's node was paused (SIGSTOP) while it ran: a frozen node cannot stop
//!   its programs, which is the one case the guarantees leave open;
//! - nothing that completed ran again afterwards;
//! - each cron tick was enqueued once;
//! - a queue with cluster-wide limits (`global_concurrency` 3,
//!   `per_key_concurrency` 1) never ran more at once, on all nodes
//!   together, unless a paused node's programs explain it.
//!
//! `CHAOS_SECS` sets the length (60 s by default, as in `cargo test`):
//! `CHAOS_SECS=600 cargo test --release --test chaos -- --nocapture`.

mod fixtures;

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use fixtures::trust::{Node, NodeSpec, Proxy, Run, history, overlaps, ticking_task};
use proto_tasker::store::{PostgresOptions, PostgresStore};
use proto_tasker::{Client, NewTask, Store, TaskId, TaskRegistry, TaskState};
use rand::Rng;

fn uptime_ms() -> i128 {
    let s = std::fs::read_to_string("/proc/uptime").unwrap();
    (s.split_whitespace().next().unwrap().parse::<f64>().unwrap() * 1000.0) as i128
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Fault {
    Crash,
    Pause,
    BlackHole,
    KillBackends,
    RestartDatabase,
}

/// When a node was paused (uptime ms), to explain overlaps.
#[derive(Default)]
struct Pauses(HashMap<String, Vec<(i128, i128)>>);

impl Pauses {
    fn explains(&self, first: &Run) -> bool {
        self.0.get(&first.node).is_some_and(|ps| {
            ps.iter()
                .any(|(a, b)| *a <= first.last && *b >= first.first)
        })
    }
}

/// The queue with limits every node serves: 9 workers on three nodes, of
/// which at most 3 run at once, at most 1 per concurrency key.
const LIMITED_QUEUE: &str =
    "  limited: {workers: 3, global_concurrency: 3, per_key_concurrency: 1}\n";
const LIMITED_GLOBAL: usize = 3;
const LIMITED_KEYS: u64 = 4;

/// The most runs of `runs` that ticked at one moment.
fn most_at_once(runs: &[&Run]) -> usize {
    // Starts sort before ends at the same millisecond: touching counts.
    let mut edges: Vec<(i128, i32)> = runs
        .iter()
        .flat_map(|r| [(r.first, -1), (r.last, 1)])
        .collect();
    edges.sort();
    let (mut now, mut most) = (0i32, 0i32);
    for (_, e) in edges {
        now -= e;
        most = most.max(now);
    }
    most as usize
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chaos_loses_nothing_and_runs_nothing_twice_at_once() {
    let secs: u64 = std::env::var("CHAOS_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let root = std::env::temp_dir().join(format!("proto_tasker-chaos-{}", std::process::id()));
    let cluster = Arc::new(
        tokio::task::spawn_blocking(move || fixtures::Cluster::create(&root))
            .await
            .unwrap()
            .unwrap(),
    );
    let schema = "chaos";
    let store: Arc<dyn Store> = Arc::new(
        PostgresStore::connect(PostgresOptions::new(cluster.url.clone()).schema(schema))
            .await
            .unwrap(),
    );
    store.migrate().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("history.log");
    let upstream: std::net::SocketAddr = format!("127.0.0.1:{}", cluster.port).parse().unwrap();
    let mut proxies = Vec::new();
    let mut nodes = Vec::new();
    let cron = format!(
        "schedules:\n  - name: tick\n    cron: \"* * * * * *\"\n    kind: shell\n    args: {}\n",
        serde_json::json!({"cmd": ["sh", "-c", "true"]})
    );
    for i in 0..3 {
        let proxy = Proxy::start(upstream).await;
        let url = proxy.url(&cluster.url);
        let name = Box::leak(format!("n{i}").into_boxed_str());
        nodes.push(Node::start(NodeSpec {
            dir: dir.path(),
            name,
            url: Box::leak(url.into_boxed_str()),
            schema,
            workers: 4,
            heartbeat_ms: 300,
            node_timeout_ms: 2500,
            wrapper: Vec::new(),
            queues: LIMITED_QUEUE,
            extra: Box::leak(cron.clone().into_boxed_str()),
        }));
        proxies.push(proxy);
    }
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let nodes_names: Vec<String> = nodes.iter().map(|n| n.name.clone()).collect();
    // The harness's own pulse: when a run fails, it tells "the cluster
    // stalled" from "the test process (and the proxies it runs) stalled".
    let pulse = Arc::new(std::sync::Mutex::new(Vec::<(i128, i128)>::new()));
    {
        let pulse = pulse.clone();
        tokio::spawn(async move {
            let mut last = uptime_ms();
            loop {
                tokio::time::sleep(Duration::from_millis(250)).await;
                let now = uptime_ms();
                if now - last > 1000 {
                    pulse.lock().unwrap().push((last, now));
                }
                last = now;
            }
        });
    }

    // Enqueue a steady stream; only enqueues that returned Ok count.
    let stop = tokio_util::sync::CancellationToken::new();
    let acked: Arc<std::sync::Mutex<Vec<(String, TaskId)>>> = Arc::default();
    // Labels of the limited queue's tasks, and their concurrency keys.
    let limited: Arc<std::sync::Mutex<HashMap<String, String>>> = Arc::default();
    let enqueuer = {
        let (client, acked, limited, stop, log) = (
            client.clone(),
            acked.clone(),
            limited.clone(),
            stop.clone(),
            log.clone(),
        );
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.is_cancelled() {
                let ticks = rand::rng().random_range(4..30);
                let label = format!("t{n}");
                let mut task = NewTask::new("shell", ticking_task(&log, &label, ticks));
                // Every fifth task (about 2 a second) to the limited queue.
                let key = n
                    .is_multiple_of(5)
                    .then(|| format!("k{}", (n / 5) % LIMITED_KEYS));
                if let Some(k) = &key {
                    task = task.with(
                        proto_tasker::TaskOptions::default()
                            .queue("limited")
                            .concurrency_key(k.clone()),
                    );
                }
                if let Ok(ins) = client.insert(task).await {
                    if let Some(k) = key {
                        limited.lock().unwrap().insert(label.clone(), k);
                    }
                    acked.lock().unwrap().push((label, ins.task.id));
                    n += 1;
                }
                // About 9 tasks a second (plus the cron tick): below what
                // three nodes of 4 workers run (about 14 a second with these
                // tasks), so the backlog after the faults is the faults', not
                // an ever-growing queue.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };

    // The nemesis.
    let mut faults: BTreeMap<Fault, usize> = BTreeMap::new();
    let mut pauses = Pauses::default();
    let started = Instant::now();
    while started.elapsed() < Duration::from_secs(secs) {
        let wait = rand::rng().random_range(1500..3500);
        tokio::time::sleep(Duration::from_millis(wait)).await;
        let victim = rand::rng().random_range(0..nodes.len());
        let fault = match rand::rng().random_range(0..10) {
            0..=2 => Fault::Crash,
            3..=4 => Fault::Pause,
            5..=6 => Fault::BlackHole,
            7..=8 => Fault::KillBackends,
            _ => Fault::RestartDatabase,
        };
        *faults.entry(fault).or_default() += 1;
        match fault {
            Fault::Crash => {
                nodes[victim].crash();
                tokio::time::sleep(Duration::from_millis(rand::rng().random_range(200..1500)))
                    .await;
                nodes[victim].restart();
            }
            Fault::Pause => {
                let from = uptime_ms();
                nodes[victim].signal(nix::sys::signal::Signal::SIGSTOP);
                tokio::time::sleep(Duration::from_millis(rand::rng().random_range(3000..4500)))
                    .await;
                nodes[victim].signal(nix::sys::signal::Signal::SIGCONT);
                // Its programs may tick until it wakes and sees its lease gone.
                let until = uptime_ms() + 1000;
                pauses
                    .0
                    .entry(nodes[victim].name.clone())
                    .or_default()
                    .push((from, until));
            }
            Fault::BlackHole => {
                proxies[victim].hold(true);
                tokio::time::sleep(Duration::from_millis(rand::rng().random_range(3000..5000)))
                    .await;
                proxies[victim].hold(false);
            }
            Fault::KillBackends => {
                let _ = terminate_backends(&cluster.url, schema).await;
            }
            Fault::RestartDatabase => {
                let c = cluster.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = c.stop();
                    std::thread::sleep(Duration::from_millis(1000));
                    c.start().unwrap();
                })
                .await
                .unwrap();
            }
        }
    }
    stop.cancel();
    enqueuer.await.unwrap();
    for p in &proxies {
        p.hold(false);
    }
    for n in &nodes {
        n.signal(nix::sys::signal::Signal::SIGCONT);
    }

    // Every acknowledged enqueue completes.
    let acked = acked.lock().unwrap().clone();
    // Liveness: the cluster keeps completing tasks until all are done. It
    // fails when 60 s pass without one more completed task, or after 10 min.
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut progress = (0usize, Instant::now());
    let faults_ended = Instant::now();
    let tasks = loop {
        let all = fixtures::all_tasks(&store).await;
        let done = all
            .iter()
            .filter(|t| t.state == TaskState::Completed)
            .count();
        let by_id: HashMap<TaskId, &proto_tasker::Task> = all.iter().map(|t| (t.id, t)).collect();
        if acked.iter().all(|(_, id)| {
            by_id
                .get(id)
                .is_some_and(|t| t.state == TaskState::Completed)
        }) {
            eprintln!(
                "every acknowledged task completed {:.0} s after the faults ended",
                faults_ended.elapsed().as_secs_f64()
            );
            break all;
        }
        if done > progress.0 {
            progress = (done, Instant::now());
        }
        let stalled = progress.1.elapsed() >= Duration::from_secs(60);
        if stalled || Instant::now() >= deadline {
            // What the stuck tasks look like, and what their nodes said.
            for (_, id) in &acked {
                if let Some(t) = by_id.get(id).filter(|t| t.state != TaskState::Completed) {
                    eprintln!("stuck: {}", serde_json::to_string(t).unwrap_or_default());
                }
            }
            let nodes = store
                .node_list(chrono::Utc::now())
                .await
                .unwrap_or_default();
            eprintln!("nodes: {nodes:#?}");
            eprintln!(
                "the test process stalled (uptime ms from, to): {:?}; now {}",
                pulse.lock().unwrap(),
                uptime_ms()
            );
            for n in &nodes_names {
                let text = std::fs::read_to_string(dir.path().join(format!("{n}.log")))
                    .unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!(
                    "--- {n}.log (last lines, newest first)\n{}",
                    tail.join("\n")
                );
            }
        }
        assert!(
            !stalled && Instant::now() < deadline,
            "acknowledged tasks not completed ({}): {:?} ({done} of {} tasks done)",
            if stalled {
                "no task completed for 60 s"
            } else {
                "10 min after the faults"
            },
            acked
                .iter()
                .filter(|(_, id)| by_id
                    .get(id)
                    .is_none_or(|t| t.state != TaskState::Completed))
                .map(|(l, id)| (l, id, by_id.get(id).map(|t| t.state)))
                .take(10)
                .collect::<Vec<_>>(),
            all.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    tokio::time::sleep(Duration::from_millis(500)).await;

    // The history.
    let h = history(&log);
    let executions: usize = h.values().map(Vec::len).sum();
    let all_overlaps = overlaps(&h);
    let (explained, violations): (Vec<_>, Vec<_>) = all_overlaps
        .into_iter()
        .partition(|(_, first, _)| pauses.explains(first));
    // Nothing that completed ran again: no execution starts after the
    // task's finish (uptime and wall clock of this one machine).
    let wall_minus_up = chrono::Utc::now().timestamp_millis() as i128 - uptime_ms();
    let label_of: HashMap<TaskId, &str> = acked.iter().map(|(l, id)| (*id, l.as_str())).collect();
    let mut ran_after_done = Vec::new();
    for t in &tasks {
        let (Some(label), Some(done)) = (label_of.get(&t.id), t.finished_at) else {
            continue;
        };
        let done_up = done.timestamp_millis() as i128 - wall_minus_up;
        for r in h.get(*label).into_iter().flatten() {
            if r.first > done_up + 200 {
                ran_after_done.push((label.to_string(), r.clone(), done));
            }
        }
    }
    // Each cron tick once.
    let mut ticks: HashMap<&str, usize> = HashMap::new();
    for t in &tasks {
        if let Some(k) = t
            .unique_key
            .as_deref()
            .filter(|k| k.starts_with("cron:tick:"))
        {
            *ticks.entry(k).or_default() += 1;
        }
    }
    let twice: Vec<_> = ticks.iter().filter(|(_, n)| **n > 1).collect();
    // The limited queue's runs (those of a paused node left out: its
    // programs tick on after its lease is gone), at once on all nodes and
    // per key.
    let limited = limited.lock().unwrap().clone();
    let mut limited_runs: Vec<&Run> = Vec::new();
    let mut by_key: HashMap<&str, Vec<&Run>> = HashMap::new();
    for (label, key) in &limited {
        for r in h.get(label).into_iter().flatten() {
            if !pauses.explains(r) {
                limited_runs.push(r);
                by_key.entry(key).or_default().push(r);
            }
        }
    }
    let limited_most = most_at_once(&limited_runs);
    let key_most = by_key
        .iter()
        .map(|(k, runs)| (*k, most_at_once(runs)))
        .max_by_key(|(_, n)| *n);
    eprintln!(
        "chaos {secs}s: faults {faults:?}; {} tasks acknowledged, {} in the store, {executions} executions, \
         {} cron ticks; overlaps explained by a paused node: {}; violations: {}, ran after completing: {}, ticks twice: {}; \
         limited queue: {} tasks, {} runs, at most {limited_most} at once, per key {key_most:?}",
        acked.len(),
        tasks.len(),
        ticks.len(),
        explained.len(),
        violations.len(),
        ran_after_done.len(),
        twice.len(),
        limited.len(),
        limited_runs.len(),
    );
    assert!(
        violations.is_empty(),
        "overlapping executions: {violations:#?}"
    );
    assert!(
        ran_after_done.is_empty(),
        "ran after completing: {ran_after_done:#?}"
    );
    assert!(twice.is_empty(), "cron ticks enqueued twice: {twice:?}");
    assert!(
        limited_most <= LIMITED_GLOBAL,
        "the limited queue ran {limited_most} at once (global_concurrency {LIMITED_GLOBAL})"
    );
    assert!(
        key_most.is_none_or(|(_, n)| n <= 1),
        "a concurrency key ran more than once at a time (per_key_concurrency 1): {key_most:?}"
    );
    assert!(
        limited_runs.len() >= 10,
        "the limited queue ran too little to judge: {} runs",
        limited_runs.len()
    );
    assert!(
        acked.len() > 50,
        "the run enqueued too little: {}",
        acked.len()
    );
    drop(nodes);
    drop(store);
    let c = cluster.clone();
    let _ = tokio::task::spawn_blocking(move || {
        let _ = c.stop();
        let _ = std::fs::remove_dir_all(&c.root);
    })
    .await;
}

/// Kill every backend of the schema's nodes (as an operator or a failover would).
async fn terminate_backends(url: &str, schema: &str) -> Result<u64, tokio_postgres::Error> {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    let rows = client
        .query(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("proto_tasker:{schema}")],
        )
        .await?;
    Ok(rows.len() as u64)
}
