//! Waiting for a task costs nothing while it waits: thousands of HTTP
//! long-polls (`GET /tasks/{id}?wait=`) on delayed tasks add no store
//! traffic beyond what the node does with no waiters, and each returns
//! moments after its task finishes, also when another node ran it. On
//! PostgreSQL the database's own transaction counter is the judge; on
//! SQLite the store's count of reads.

mod fixtures;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use proto_tasker::config::{Config, QueueConfig, StoreKind};
use proto_tasker::store::Synchronous;
use proto_tasker::task::{NewTask, TaskOptions};
use proto_tasker::{Client, Node, SqliteStore, TaskId, WorkerPool};
use serde_json::Value;

struct TestNode {
    base: Option<String>,
    pool: Arc<WorkerPool>,
    stop: tokio_util::sync::CancellationToken,
    ran: tokio::task::JoinHandle<Result<(), proto_tasker::NodeError>>,
}

impl TestNode {
    async fn stop(self) {
        self.stop.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.ran).await;
    }
}

/// A node as `proto_tasker serve` assembles it, serving `queue`, with the
/// HTTP API on port 0 when `http`.
async fn start(mut cfg: Config, name: &str, queue: &str, http: bool) -> TestNode {
    cfg.node.name = Some(name.into());
    cfg.queues = BTreeMap::from([(
        queue.to_string(),
        QueueConfig {
            workers: 50,
            global_concurrency: None,
            per_key_concurrency: None,
            rate_limit: None,
            max_depth: None,
            fairness: None,
        },
    )]);
    cfg.server.enabled = http;
    cfg.server.listen = "127.0.0.1:0".into();
    cfg.pool.shutdown_timeout = Duration::from_secs(2);
    // Delayed tasks start when a producer next looks; looking often makes
    // them finish as a stream (1 a millisecond) rather than in bursts.
    cfg.pool.poll_interval = Duration::from_millis(50);
    let node = Node::from_config(&cfg).await.expect("node starts");
    let base = node.local_addr().map(|a| format!("http://{a}"));
    let pool = node.pool().clone();
    let stop = tokio_util::sync::CancellationToken::new();
    let s = stop.clone();
    let ran = tokio::spawn(node.run(async move { s.cancelled().await }));
    let t0 = Instant::now();
    while !pool
        .client()
        .nodes()
        .await
        .is_ok_and(|n| n.iter().any(|n| n.name == name))
    {
        assert!(!ran.is_finished(), "node {name} stopped at start");
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "node {name} did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    TestNode {
        base,
        pool,
        stop,
        ran,
    }
}

/// `n` no-op tasks in `queues` (taken in turn), due from `due` on, one
/// per millisecond so they finish as a stream rather than all at once.
async fn delayed_tasks(
    client: &Client,
    queues: &[&str],
    n: usize,
    due: DateTime<Utc>,
) -> Vec<TaskId> {
    let tasks = (0..n)
        .map(|i| {
            NewTask::new("noop", Value::Null).with(TaskOptions {
                queue: Some(queues[i % queues.len()].to_string()),
                run_at: Some(due + chrono::Duration::milliseconds(i as i64)),
                ..Default::default()
            })
        })
        .collect();
    client
        .insert_many(tasks)
        .await
        .expect("enqueue")
        .into_iter()
        .map(|i| i.task.id)
        .collect()
}

/// One long-poll per task; each answers with the task and when it came.
fn long_polls(
    base: &str,
    ids: &[TaskId],
    wait: &str,
) -> Vec<tokio::task::JoinHandle<(Value, DateTime<Utc>)>> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("http client");
    ids.iter()
        .map(|id| {
            let url = format!("{base}/api/v1/tasks/{id}?wait={wait}");
            let http = http.clone();
            tokio::spawn(async move {
                let resp = http.get(&url).send().await.expect("long-poll sent");
                assert_eq!(resp.status(), reqwest::StatusCode::OK);
                let body: Value = resp.json().await.expect("a task");
                (body, Utc::now())
            })
        })
        .collect()
}

/// Wait until the node's client holds `n` waiters.
async fn until_waiting(client: &Client, n: usize) {
    let t0 = Instant::now();
    while client.waiting() < n {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "only {} of {n} long-polls are waiting",
            client.waiting()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// How long after its task finished each long-poll answered, in ms,
/// sorted; every answer must show its task finished.
async fn wake_latencies(polls: Vec<tokio::task::JoinHandle<(Value, DateTime<Utc>)>>) -> Vec<f64> {
    let mut out = Vec::with_capacity(polls.len());
    for p in polls {
        let (task, came) = p.await.expect("long-poll task");
        assert_eq!(task["state"], "completed", "{task}");
        let finished: DateTime<Utc> = task["finished_at"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("finished_at in {task}"));
        out.push((came - finished).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0);
    }
    out.sort_by(f64::total_cmp);
    out
}

fn pct(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// Every waiter answers moments after its task finished: well inside the
/// fallback poll, which would otherwise be what woke it.
fn check_latencies(what: &str, lat: &[f64]) {
    let (p50, p99, max) = (pct(lat, 0.5), pct(lat, 0.99), pct(lat, 1.0));
    eprintln!(
        "{what}: {} waiters woke {p50:.1} ms (p50) / {p99:.1} ms (p99) / {max:.1} ms (max) after their tasks finished",
        lat.len()
    );
    let fallback = proto_tasker::client::FALLBACK_POLL.as_millis() as f64;
    assert!(
        p99 <= 50.0 && max < fallback / 2.0,
        "{what}: waiters woke late: p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms"
    );
}

const WAITERS: usize = 2000;
const WINDOW: Duration = Duration::from_secs(10);
/// PostgreSQL backends report their counters at most every second, and an
/// idle one only after 10 s: a window starts after this much quiet.
const SETTLE: Duration = Duration::from_secs(11);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_cost_no_queries_on_postgres() {
    let _quiet = fixtures::heavy().await;
    let db = fixtures::PgDatabase::create().await;
    let mut cfg = Config::default();
    cfg.store.kind = StoreKind::Postgres;
    cfg.store.url = Some(db.url.clone());
    cfg.store.schema = "waiting".into();
    cfg.store.pool_size = 8;
    let a = start(cfg.clone(), "wait-a", "a", true).await;
    let b = start(cfg, "wait-b", "b", false).await;
    let client = a.pool.client();
    let due = Utc::now() + chrono::Duration::seconds(60);
    let ids = delayed_tasks(&client, &["a", "b"], WAITERS, due).await;
    let commits = format!(
        "SELECT xact_commit FROM pg_stat_database WHERE datname = '{}'",
        db.name
    );

    tokio::time::sleep(SETTLE).await;
    let c0 = db.number(&commits).await;
    tokio::time::sleep(WINDOW).await;
    let idle = db.number(&commits).await - c0;

    let polls = long_polls(a.base.as_deref().expect("node a serves HTTP"), &ids, "120s");
    until_waiting(&client, WAITERS).await;
    tokio::time::sleep(SETTLE).await;
    let c1 = db.number(&commits).await;
    tokio::time::sleep(WINDOW).await;
    let waiting = db.number(&commits).await - c1;
    eprintln!(
        "PostgreSQL: {idle} commits in {WINDOW:?} with no waiters, {waiting} with {WAITERS} long-polls"
    );
    assert!(
        waiting < idle + 100,
        "{WAITERS} waiters cost {} transactions in {WINDOW:?} ({idle} without, {waiting} with)",
        waiting - idle
    );
    assert!(
        Utc::now() < due,
        "the window ended before the tasks were due"
    );

    let lat = wake_latencies(polls).await;
    check_latencies("PostgreSQL, half run on another node", &lat);
    let by_b = b
        .pool
        .client()
        .list(proto_tasker::store::ListParams {
            queue: Some("b".into()),
            limit: 5,
            ..Default::default()
        })
        .await
        .expect("list");
    assert!(
        !by_b.is_empty() && by_b.iter().all(|t| t.node.as_deref() == Some("wait-b")),
        "queue b ran on the other node"
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_polls_cost_no_reads_on_sqlite() {
    let _quiet = fixtures::heavy().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let mut cfg = Config::default();
    cfg.store.path = dir.path().join("waiting.db");
    cfg.store.synchronous = Synchronous::Normal;
    let a = start(cfg, "wait-a", "a", true).await;
    let client = a.pool.client();
    let store = a.pool.store().clone();
    let reads = || {
        store
            .as_any()
            .downcast_ref::<SqliteStore>()
            .expect("a SQLite node")
            .reads()
    };
    let due = Utc::now() + chrono::Duration::seconds(30);
    let ids = delayed_tasks(&client, &["a"], WAITERS, due).await;

    let r0 = reads();
    tokio::time::sleep(WINDOW).await;
    let idle = reads() - r0;

    let polls = long_polls(a.base.as_deref().expect("node serves HTTP"), &ids, "120s");
    until_waiting(&client, WAITERS).await;
    // Let the waiters' first reads finish.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r1 = reads();
    tokio::time::sleep(WINDOW).await;
    let waiting = reads() - r1;
    eprintln!(
        "SQLite: {idle} reads in {WINDOW:?} with no waiters, {waiting} with {WAITERS} long-polls"
    );
    assert!(
        waiting < idle + 100,
        "{WAITERS} waiters cost {} reads in {WINDOW:?} ({idle} without, {waiting} with)",
        waiting.saturating_sub(idle)
    );
    assert!(
        Utc::now() < due,
        "the window ended before the tasks were due"
    );
    let lat = wake_latencies(polls).await;
    check_latencies("SQLite", &lat);
    a.stop().await;
}

/// A finish no event announced (written through another handle on the same
/// SQLite file, as another process would) is found by the one fallback
/// poll all waiters share: every waiter returns within a poll or two, and
/// the store is read once per waiter at start and at wake-up, plus once per
/// poll for all of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finish_nobody_announced_is_found_by_one_shared_poll() {
    let (store, dir) = fixtures::sqlite_store().await;
    let sqlite = || {
        store
            .as_any()
            .downcast_ref::<SqliteStore>()
            .expect("sqlite")
    };
    let other: Arc<dyn proto_tasker::Store> =
        Arc::new(SqliteStore::open_path(dir.path().join("tasks.db")).expect("second handle"));
    let registry = Arc::new(proto_tasker::TaskRegistry::new());
    let client = Client::new(store.clone(), registry.clone());
    let due = Utc::now() - chrono::Duration::seconds(1);
    let ids = delayed_tasks(&client, &["q"], 100, due).await;
    let r0 = sqlite().reads();
    let waits: Vec<_> = ids
        .iter()
        .map(|&id| {
            let c = client.clone();
            tokio::spawn(async move { c.wait(id, Duration::from_secs(30)).await })
        })
        .collect();
    until_waiting(&client, ids.len()).await;
    // Finish them all through the other handle: no event reaches `client`.
    let finished = Instant::now();
    assert_eq!(finish_all(&other, "q").await, ids.len());
    for w in waits {
        let t = w.await.expect("join").expect("the wait ends with the task");
        assert!(t.state.is_finished());
    }
    let took = finished.elapsed();
    let reads = sqlite().reads() - r0;
    let fallback = proto_tasker::client::FALLBACK_POLL;
    assert!(
        took <= fallback * 2,
        "the fallback poll found the finishes after {took:?} (poll every {fallback:?})"
    );
    assert!(
        reads <= 2 * ids.len() as u64 + 5,
        "{reads} reads for {} waiters: one each at start and at wake-up, one per poll for all",
        ids.len()
    );
}

/// When the LISTEN connection is lost and comes back, finishes announced in
/// between were missed: the store says so, and waiters look at once (the
/// shared poll) instead of at their deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listener_that_reconnects_says_announcements_were_missed() {
    let (store, pg) = fixtures::pg_store().await;
    let mut events = store.subscribe();
    let listening = format!("LISTEN {}_events", pg.schema);
    let (admin, conn) = tokio_postgres::connect(&pg.url, tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let missed =
        |events: &mut tokio::sync::broadcast::Receiver<proto_tasker::store::StoreEvent>| {
            std::iter::from_fn(|| events.try_recv().ok())
                .any(|e| e == proto_tasker::store::StoreEvent::Missed)
        };
    let t0 = Instant::now();
    loop {
        let n: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE query = $1",
                &[&listening],
            )
            .await
            .expect("pg_stat_activity")
            .get(0);
        if n == 1 {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "the store never listened"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    missed(&mut events);
    let killed: i64 = admin
        .query_one(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE query = $1",
            &[&listening],
        )
        .await
        .expect("terminate")
        .get(0);
    assert_eq!(killed, 1, "the store's listener");
    let t0 = Instant::now();
    while !missed(&mut events) {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the listener came back without saying announcements were missed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Claim and complete every due task of `queue` through `store`.
async fn finish_all(store: &Arc<dyn proto_tasker::Store>, queue: &str) -> usize {
    let claimed = store
        .task_claim(proto_tasker::store::ClaimParams {
            queue: queue.into(),
            node: "elsewhere".into(),
            limit: 1000,
            now: Utc::now(),
            limits: None,
            room: None,
        })
        .await
        .expect("claim");
    store
        .task_complete_many(
            claimed
                .iter()
                .map(|t| {
                    proto_tasker::store::Completion::of(
                        t,
                        Utc::now(),
                        proto_tasker::store::Outcome::Completed {
                            result: Value::Null,
                        },
                    )
                })
                .collect(),
        )
        .await
        .expect("complete");
    claimed.len()
}

/// The finished task ids `events` carried within `within`.
async fn finishes_heard(
    events: &mut tokio::sync::broadcast::Receiver<proto_tasker::store::StoreEvent>,
    within: Duration,
) -> Vec<TaskId> {
    let mut ids = Vec::new();
    let deadline = tokio::time::Instant::now() + within;
    while let Ok(Ok(ev)) = tokio::time::timeout_at(deadline, events.recv()).await {
        if let proto_tasker::store::StoreEvent::Finished { ids: more } = ev {
            ids.extend(more.iter().copied());
        }
    }
    ids
}

/// Finishes are announced to other processes only while one of them
/// waits: with a hundred nodes listening, each announcement made PostgreSQL
/// signal a hundred backends. A process that starts waiting says so before
/// it reads its task, and hears the finish.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn finishes_are_announced_only_while_another_process_waits() {
    let (writer, guard) = fixtures::pg_store().await;
    let other: Arc<dyn proto_tasker::Store> = Arc::new(
        proto_tasker::store::PostgresStore::connect(
            proto_tasker::store::PostgresOptions::new(guard.url.clone())
                .schema(guard.schema.clone()),
        )
        .await
        .expect("connect"),
    );
    let mut events = other.subscribe();
    // The listener is connected (and has had its wake-up on connecting).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let registry = Arc::new(proto_tasker::TaskRegistry::new());
    let writing = Client::new(writer.clone(), registry.clone());
    let due = Utc::now() - chrono::Duration::seconds(1);
    delayed_tasks(&writing, &["q"], 10, due).await;
    assert_eq!(finish_all(&writer, "q").await, 10);
    let heard = finishes_heard(&mut events, Duration::from_secs(1)).await;
    assert!(
        heard.is_empty(),
        "finishes were announced with nobody waiting: {heard:?}"
    );

    let waiting = Client::new(other.clone(), registry);
    let ids = delayed_tasks(&writing, &["q"], 1, due).await;
    let wait = {
        let c = waiting.clone();
        let id = ids[0];
        tokio::spawn(async move { c.wait(id, Duration::from_secs(30)).await })
    };
    until_waiting(&waiting, 1).await;
    // Past the waiter's first read (it found the task unfinished).
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(finish_all(&writer, "q").await, 1);
    let heard = finishes_heard(&mut events, Duration::from_secs(1)).await;
    assert_eq!(heard, ids, "the waiting process was not told of the finish");
    let task = wait
        .await
        .expect("join")
        .expect("the wait ends with the task");
    assert!(task.state.is_finished());
}
