//! Tasks due later start on time, not at the next poll: a delayed enqueue,
//! a retry's backoff and a snooze each start within a few milliseconds of
//! their `run_at` on both stores, with `poll_interval` at 5 s (where they
//! would start up to 5 s late without the timer for the next due task).
//! On PostgreSQL a delayed task enqueued through one node starts on time
//! on another.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto_tasker::task::TaskOptions;
use proto_tasker::{
    Builder, Client, KindDefaults, NewTask, RetryPolicy, Store, TaskError, TaskRegistry, TaskState,
    WorkerPool, executor_fn,
};
use serde_json::Value;

const POLL: Duration = Duration::from_secs(5);

fn registry() -> TaskRegistry {
    let mut r = TaskRegistry::new();
    r.register("probe", executor_fn(|_ctx| async { Ok(Value::Null) }));
    // Fails its first attempt; the retry comes 300 ms later.
    r.register_with(
        "flaky",
        executor_fn(|ctx| async move {
            if ctx.attempt == 1 {
                Err(TaskError::failed("first attempt fails"))
            } else {
                Ok(Value::Null)
            }
        }),
        KindDefaults {
            retry: Some(RetryPolicy {
                base: Duration::from_millis(300),
                max: Duration::from_millis(300),
                jitter: 0.0,
            }),
            ..Default::default()
        },
    );
    // Snoozes 300 ms once (args say whether it did), then succeeds.
    r.register(
        "snoozer",
        executor_fn(|ctx| async move {
            if ctx.args == Value::Bool(true) {
                return Ok(Value::Null);
            }
            Err(TaskError::Snooze(Duration::from_millis(300)))
        }),
    );
    r
}

fn pool(store: Arc<dyn Store>, name: &str) -> WorkerPool {
    Builder::new(store, registry())
        .node_name(name)
        .queue("q", 8)
        .poll_interval(POLL)
        .build()
        .expect("pool")
}

/// Enqueue a `probe` in queue `q`, due after `delay`.
async fn probe_in(client: &Client, delay: Duration) -> proto_tasker::Task {
    client
        .insert(NewTask::new("probe", Value::Null).with(TaskOptions {
            queue: Some("q".into()),
            delay: Some(delay),
            ..Default::default()
        }))
        .await
        .expect("enqueue")
        .task
}

/// When `id` started (its latest attempt), waiting for it to finish.
async fn finished(client: &Client, id: proto_tasker::TaskId) -> proto_tasker::Task {
    let t = client
        .wait(id, Duration::from_secs(30))
        .await
        .expect("the task finishes");
    assert_eq!(t.state, TaskState::Completed, "{t:?}");
    t
}

fn late_ms(started: Option<DateTime<Utc>>, due: DateTime<Utc>) -> f64 {
    let started = started.expect("started");
    (started - due).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

/// Start delays, sorted, and an assertion that none is near the poll.
fn check(what: &str, mut late: Vec<f64>) {
    late.sort_by(f64::total_cmp);
    let p50 = late[late.len() / 2];
    let max = late[late.len() - 1];
    eprintln!(
        "{what}: started {p50:.1} ms (p50) / {max:.1} ms (max) after due, {} tasks",
        late.len()
    );
    assert!(
        late[0] >= 0.0,
        "{what}: a task started {:.1} ms before it was due",
        -late[0]
    );
    assert!(
        max < 500.0,
        "{what}: started up to {max:.1} ms late (the poll is {POLL:?}): {late:?}"
    );
}

async fn due_tasks_start_on_time(store: Arc<dyn Store>, label: &str) {
    let p = pool(store.clone(), "due-node");
    p.start().await.expect("start");
    let client = p.client();
    // Let the producers go idle (waiting for their next poll).
    tokio::time::sleep(Duration::from_millis(300)).await;

    let mut delayed = Vec::new();
    for i in 0..10u64 {
        let t = probe_in(&client, Duration::from_millis(200 + 37 * i)).await;
        delayed.push((t.id, t.run_at));
    }
    let mut late = Vec::new();
    for (id, due) in delayed {
        let t = finished(&client, id).await;
        late.push(late_ms(t.started_at, due));
    }
    check(&format!("{label}, delayed enqueue"), late);

    // A retry after a 300 ms backoff.
    let t = client
        .insert(NewTask::new("flaky", Value::Null).with(TaskOptions::default().queue("q")))
        .await
        .expect("enqueue");
    let t = finished(&client, t.task.id).await;
    assert_eq!(t.attempt, 2);
    let failed_at = t.errors[0].at;
    let due = failed_at + chrono::Duration::milliseconds(300);
    check(
        &format!("{label}, retry backoff"),
        vec![late_ms(t.started_at, due)],
    );

    // A snooze of 300 ms: the snoozed run flips its args so the next succeeds.
    let t = client
        .insert(NewTask::new("snoozer", Value::Bool(false)).with(TaskOptions::default().queue("q")))
        .await
        .expect("enqueue");
    // The snooze keeps the args; wait until it is scheduled, then make the
    // next run succeed and see when it starts.
    let snoozed = loop {
        let now = client.get(t.task.id).await.expect("get").expect("task");
        if now.state == TaskState::Scheduled {
            break now;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    fixtures_set_args(&store, t.task.id).await;
    let done = finished(&client, t.task.id).await;
    check(
        &format!("{label}, snooze"),
        vec![late_ms(done.started_at, snoozed.run_at)],
    );
    p.shutdown().await;
}

/// Flip a snoozing task's args to `true` straight in its store.
async fn fixtures_set_args(store: &Arc<dyn Store>, id: proto_tasker::TaskId) {
    if let Some(pg) = store
        .as_any()
        .downcast_ref::<proto_tasker::store::PostgresStore>()
    {
        let url = fixtures::pg_url();
        let (c, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect");
        tokio::spawn(conn);
        c.execute(
            &format!(
                "UPDATE {}.tasks SET args = 'true' WHERE id = $1",
                pg.schema()
            ),
            &[&id.0],
        )
        .await
        .expect("update");
    } else if let Some(s) = store.as_any().downcast_ref::<proto_tasker::SqliteStore>() {
        let conn = rusqlite::Connection::open(s.path()).expect("open");
        conn.busy_timeout(Duration::from_secs(5))
            .expect("busy timeout");
        conn.execute("UPDATE tasks SET args = 'true' WHERE id = ?1", [id.0])
            .expect("update");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_tasks_start_on_time_on_sqlite() {
    let _t = fixtures::timing_sensitive().await;
    let (store, _dir) = fixtures::sqlite_store().await;
    due_tasks_start_on_time(store, "SQLite").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_tasks_start_on_time_on_postgres() {
    let _t = fixtures::timing_sensitive().await;
    let (store, _pg) = fixtures::pg_store().await;
    due_tasks_start_on_time(store, "PostgreSQL").await;
}

/// A task delayed through node A starts on time on node B, which serves
/// the queue: A announces the due time with its NOTIFY.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delayed_task_starts_on_time_on_another_node() {
    let _t = fixtures::timing_sensitive().await;
    let (a, pg) = fixtures::pg_store().await;
    let b: Arc<dyn Store> = Arc::new(
        proto_tasker::store::PostgresStore::connect(
            proto_tasker::store::PostgresOptions::new(pg.url.clone()).schema(pg.schema.clone()),
        )
        .await
        .expect("second node's store"),
    );
    let runner = pool(b, "due-b");
    runner.start().await.expect("start");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let client = Client::new(a, Arc::new(registry()));
    let mut late = Vec::new();
    for i in 0..5u64 {
        let t = probe_in(&client, Duration::from_millis(250 + 50 * i)).await;
        let done = finished(&client, t.id).await;
        assert_eq!(done.node.as_deref(), Some("due-b"));
        late.push(late_ms(done.started_at, t.run_at));
    }
    check("PostgreSQL, delayed through another node", late);
    runner.shutdown().await;
}
