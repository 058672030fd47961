//! Worker pool behaviour against a real SQLite store: end to end runs,
//! panics, timeouts, hung workers, shutdown, concurrency, cancel, retries.

mod fixtures;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use proto_tasker::pool::Counters;
use proto_tasker::{
    Builder, KindDefaults, NewTask, Retention, RetryPolicy, SentinelConfig, Store, TaskError,
    TaskOptions, TaskRegistry, TaskState, WorkerPool, executor_fn,
};
use serde_json::json;

fn fast_sentinel() -> SentinelConfig {
    SentinelConfig {
        heartbeat_interval: Duration::from_millis(100),
        node_timeout: Duration::from_secs(2),
        check_interval: Duration::from_millis(50),
        hung_grace: Duration::from_millis(200),
        retention: Retention::default(),
    }
}

fn quick_retry() -> KindDefaults {
    KindDefaults {
        retry: Some(RetryPolicy {
            base: Duration::from_millis(10),
            max: Duration::from_millis(50),
            jitter: 0.0,
        }),
        ..Default::default()
    }
}

fn builder(store: Arc<dyn Store>, registry: TaskRegistry) -> Builder {
    Builder::new(store, registry)
        .poll_interval(Duration::from_millis(50))
        .sentinel(fast_sentinel())
        .shutdown_timeout(Duration::from_secs(5))
        .cancel_grace(Duration::from_millis(300))
}

async fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `n` executors run at once: proves `n` live slots.
struct Rendezvous {
    arrived: AtomicUsize,
    notify: tokio::sync::Notify,
}

impl Rendezvous {
    fn new() -> Arc<Self> {
        Arc::new(Rendezvous {
            arrived: AtomicUsize::new(0),
            notify: tokio::sync::Notify::new(),
        })
    }
    async fn meet(&self, n: usize) {
        let notified = self.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.arrived.fetch_add(1, Ordering::SeqCst) + 1 >= n {
            self.notify.notify_waiters();
            return;
        }
        if self.arrived.load(Ordering::SeqCst) >= n {
            return;
        }
        notified.await;
    }
}

/// Registers `meet`: a task that finishes only once two of them run together.
fn register_meet(reg: &mut TaskRegistry, rendezvous: &Arc<Rendezvous>) {
    let r = rendezvous.clone();
    reg.register(
        "meet",
        executor_fn(move |_ctx| {
            let r = r.clone();
            async move {
                r.meet(2).await;
                Ok(json!(null))
            }
        }),
    );
}

/// Both slots of a 2-worker pool are alive: two `meet` tasks complete.
async fn both_slots_alive(client: &proto_tasker::Client) {
    let a = client.enqueue("meet", json!(null)).await.unwrap().id;
    let b = client.enqueue("meet", json!(null)).await.unwrap().id;
    for id in [a, b] {
        let t = client.wait(id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(t.state, TaskState::Completed);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn runs_tasks_end_to_end_and_keeps_results() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    reg.register(
        "double",
        executor_fn(|ctx| async move {
            let n: i64 = ctx.args()?;
            Ok(json!(n * 2))
        }),
    );
    let pool = builder(store, reg).queue("default", 4).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let mut ids = Vec::new();
    for i in 0..50 {
        ids.push(client.enqueue("double", i).await.unwrap().id);
    }
    for (i, id) in ids.iter().enumerate() {
        let t = client.wait(*id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(t.state, TaskState::Completed);
        assert_eq!(t.result, Some(json!(i as i64 * 2)));
        assert_eq!(t.attempt, 1);
        assert!(t.started_at.is_some() && t.finished_at.is_some());
    }
    pool.shutdown().await;
    pool.shutdown().await; // twice is fine
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panicking_executor_fails_the_attempt_and_its_worker_is_replaced() {
    let (store, _d) = fixtures::sqlite_store().await;
    let rendezvous = Rendezvous::new();
    let mut reg = TaskRegistry::new();
    reg.register_with(
        "flaky",
        executor_fn(|ctx| async move {
            if ctx.attempt == 1 {
                panic!("boom on attempt {}", ctx.attempt);
            }
            Ok(json!("recovered"))
        }),
        quick_retry(),
    );
    register_meet(&mut reg, &rendezvous);
    let pool = builder(store, reg).queue("default", 2).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let id = client.enqueue("flaky", json!(null)).await.unwrap().id;
    let t = client.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed);
    assert_eq!(t.attempt, 2);
    assert!(
        t.errors[0].message.contains("panicked: boom on attempt 1"),
        "{:?}",
        t.errors
    );
    let shared = pool.shared().clone();
    assert_eq!(Counters::get(&shared.counters.panics), 1);
    // Both slots are alive: two tasks that only finish when they run together.
    both_slots_alive(&client).await;
    assert_eq!(shared.workers_total(), 2);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_overrunning_executor_is_cancelled_and_the_attempt_fails() {
    let (store, _d) = fixtures::sqlite_store().await;
    let token_fired = Arc::new(AtomicBool::new(false));
    let fired = token_fired.clone();
    let mut reg = TaskRegistry::new();
    reg.register(
        "slow",
        executor_fn(move |ctx| {
            let fired = fired.clone();
            async move {
                let token = ctx.cancel.clone();
                tokio::spawn(async move {
                    token.cancelled().await;
                    fired.store(true, Ordering::SeqCst);
                });
                tokio::time::sleep(Duration::from_secs(30)).await;
                Ok(json!(null))
            }
        }),
    );
    let pool = builder(store, reg).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let opts = TaskOptions::default()
        .timeout(Duration::from_millis(100))
        .max_attempts(1);
    let started = Instant::now();
    let id = client
        .insert(NewTask::new("slow", json!(null)).with(opts))
        .await
        .unwrap()
        .task
        .id;
    let t = client.wait(id, Duration::from_secs(10)).await.unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.errors[0].message.contains("timed out after 100ms"),
        "{:?}",
        t.errors
    );
    wait_until("the token to fire", Duration::from_secs(2), || {
        token_fired.load(Ordering::SeqCst)
    })
    .await;
    pool.shutdown().await;
}

/// `ctx.extend` keeps a long attempt alive past its timeout, and past the
/// Sentinel's hung check, for as long as it extends, up to the kind's
/// `max_run`; an attempt that stops extending times out as before.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn extend_keeps_a_long_attempt_alive_up_to_max_run() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    // Runs `ms` in all, extending by 300 ms every 100 ms; then `stop_after`
    // (if set) it stops extending and sleeps on.
    let beating = executor_fn(|ctx| async move {
        let ms = ctx.args["ms"].as_u64().unwrap_or(0);
        let stop = ctx.args["stop_after"].as_u64();
        let t0 = tokio::time::Instant::now();
        let mut last = None;
        while t0.elapsed() < Duration::from_millis(ms) {
            if stop.is_none_or(|s| t0.elapsed() < Duration::from_millis(s)) {
                last = ctx.extend(Duration::from_millis(300));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(json!({"extended": last.is_some()}))
    });
    reg.register("long", beating.clone());
    reg.register_with(
        "capped",
        beating,
        KindDefaults {
            max_run: Some(Duration::from_millis(700)),
            ..Default::default()
        },
    );
    let pool = builder(store, reg).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let run = |kind: &str, args: serde_json::Value| {
        let client = client.clone();
        let task = NewTask::new(kind, args).with(
            TaskOptions::default()
                .timeout(Duration::from_millis(300))
                .max_attempts(1),
        );
        async move {
            let id = client.insert(task).await.unwrap().task.id;
            client.wait(id, Duration::from_secs(20)).await.unwrap()
        }
    };
    // 1.5 s on a 300 ms timeout, well past hung_grace (200 ms): completes.
    let t = run("long", json!({"ms": 1500})).await;
    assert_eq!(t.state, TaskState::Completed, "{:?}", t.errors);
    assert_eq!(t.result, Some(json!({"extended": true})));
    // Stops extending at 400 ms: times out about 300 ms later.
    let t = run("long", json!({"ms": 5000, "stop_after": 400})).await;
    assert_eq!(t.state, TaskState::Failed);
    let msg = &t.errors[0].message;
    let ms: u64 = msg
        .split("timed out after ")
        .nth(1)
        .and_then(|r| r.strip_suffix("ms"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{msg}"));
    assert!((400..=1000).contains(&ms), "{msg}");
    // max_run 700 ms: extending forever still ends at 700 ms.
    let started = Instant::now();
    let t = run("capped", json!({"ms": 5000})).await;
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.errors[0].message.contains("timed out after 700ms"),
        "{:?}",
        t.errors
    );
    assert!(started.elapsed() < Duration::from_secs(4));
    let shared = pool.shared();
    assert_eq!(
        Counters::get(&shared.counters.hung_replaced),
        0,
        "a long task is not a hung worker"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_hung_worker_is_replaced_and_the_pool_keeps_its_size() {
    let (store, _d) = fixtures::sqlite_store().await;
    let rendezvous = Rendezvous::new();
    let mut reg = TaskRegistry::new();
    // Blocks its thread and never yields: only the Sentinel can take the slot back.
    reg.register(
        "hang",
        executor_fn(|_ctx| async move {
            std::thread::sleep(Duration::from_millis(1500));
            Ok(json!("too late"))
        }),
    );
    register_meet(&mut reg, &rendezvous);
    let pool = builder(store, reg).queue("default", 2).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let opts = TaskOptions::default()
        .timeout(Duration::from_millis(100))
        .max_attempts(1);
    let id = client
        .insert(NewTask::new("hang", json!(null)).with(opts))
        .await
        .unwrap()
        .task
        .id;
    let t = client.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert!(
        t.errors[0].message.contains("worker replaced"),
        "{:?}",
        t.errors
    );
    let shared = pool.shared().clone();
    assert_eq!(Counters::get(&shared.counters.hung_replaced), 1);
    both_slots_alive(&client).await;
    // The hung executor's late success is fenced out.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    assert_eq!(
        client.get(id).await.unwrap().unwrap().state,
        TaskState::Failed
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_never_runs_more_than_its_workers() {
    let (store, _d) = fixtures::sqlite_store().await;
    let now = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let mut reg = TaskRegistry::new();
    let (n2, m2) = (now.clone(), max.clone());
    reg.register(
        "busy",
        executor_fn(move |_ctx| {
            let (now, max) = (n2.clone(), m2.clone());
            async move {
                let cur = now.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(cur, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(15)).await;
                now.fetch_sub(1, Ordering::SeqCst);
                Ok(json!(null))
            }
        }),
    );
    let pool = builder(store, reg)
        .queue("limited", 3)
        .queue("other", 5)
        .build()
        .unwrap();
    let client = pool.client();
    let tasks = (0..60)
        .map(|_| NewTask::new("busy", json!(null)).with(TaskOptions::default().queue("limited")))
        .collect();
    let ids: Vec<_> = client
        .insert_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.task.id)
        .collect();
    pool.start().await.unwrap();
    for id in ids {
        client.wait(id, Duration::from_secs(20)).await.unwrap();
    }
    assert_eq!(
        max.load(Ordering::SeqCst),
        3,
        "concurrency reached but never exceeded"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn graceful_shutdown_lets_running_tasks_finish() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let pool = builder(store, reg).queue("default", 3).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let ids: Vec<_> = (0..3)
        .map(|_| NewTask::new("sleep", json!({"ms": 300})))
        .collect();
    let ids: Vec<_> = client
        .insert_many(ids)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.task.id)
        .collect();
    let shared = pool.shared().clone();
    wait_until("all three running", Duration::from_secs(5), || {
        shared.workers_busy() == 3
    })
    .await;
    pool.shutdown().await;
    for id in ids {
        let t = client.get(id).await.unwrap().unwrap();
        assert_eq!(
            t.state,
            TaskState::Completed,
            "finished within shutdown_timeout"
        );
    }
    // Nothing more is claimed after shutdown.
    let late = client.enqueue("noop", json!(null)).await.unwrap().id;
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        client.get(late).await.unwrap().unwrap().state,
        TaskState::Available
    );
    assert!(
        client.nodes().await.unwrap().is_empty(),
        "node deregistered"
    );
}

async fn shutdown_releases(force: bool, timeout: Duration, kind: &str) -> Duration {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    // Ignores its token entirely.
    reg.register(
        "stubborn",
        executor_fn(|_ctx| async move {
            tokio::time::sleep(Duration::from_secs(30)).await;
            Ok(json!(null))
        }),
    );
    let pool: WorkerPool = builder(store, reg)
        .queue("default", 2)
        .shutdown_timeout(timeout)
        .force_shutdown(force)
        .build()
        .unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let args = if kind == "sleep" {
        json!({"ms": 30_000})
    } else {
        json!(null)
    };
    let ids: Vec<_> = client
        .insert_many(vec![
            NewTask::new(kind, args.clone()),
            NewTask::new(kind, args),
        ])
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.task.id)
        .collect();
    let shared = pool.shared().clone();
    wait_until("both running", Duration::from_secs(5), || {
        shared.workers_busy() == 2
    })
    .await;
    let began = Instant::now();
    pool.shutdown().await;
    let took = began.elapsed();
    for id in ids {
        let t = client.get(id).await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Available, "released for another node");
        assert_eq!(t.attempt, 0, "the interrupted attempt is not used up");
        assert!(t.errors.is_empty());
    }
    took
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_cancels_tasks_after_the_timeout_and_releases_them() {
    let took = shutdown_releases(false, Duration::from_millis(500), "sleep").await;
    assert!(
        took >= Duration::from_millis(500),
        "waited for shutdown_timeout: {took:?}"
    );
    assert!(took < Duration::from_secs(5), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn force_shutdown_cancels_at_once() {
    let took = shutdown_releases(true, Duration::from_secs(60), "sleep").await;
    assert!(
        took < Duration::from_secs(2),
        "did not wait for shutdown_timeout: {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_releases_tasks_whose_executor_ignores_cancellation() {
    let took = shutdown_releases(true, Duration::from_secs(60), "stubborn").await;
    assert!(took < Duration::from_secs(3), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn cancel_reaches_a_running_task_and_a_queued_one_never_runs() {
    let (store, _d) = fixtures::sqlite_store().await;
    let ran = Arc::new(AtomicUsize::new(0));
    let mut reg = TaskRegistry::new();
    let r = ran.clone();
    reg.register(
        "wait_for_cancel",
        executor_fn(move |ctx| {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
                ctx.cancel.cancelled().await;
                Err(TaskError::failed("stopped by token"))
            }
        }),
    );
    let pool = builder(store, reg).queue("default", 1).build().unwrap();
    let client = pool.client();
    let first = client
        .enqueue("wait_for_cancel", json!(null))
        .await
        .unwrap()
        .id;
    let second = client
        .enqueue("wait_for_cancel", json!(null))
        .await
        .unwrap()
        .id;
    pool.start().await.unwrap();
    let shared = pool.shared().clone();
    wait_until("first running", Duration::from_secs(5), || {
        shared.workers_busy() == 1
    })
    .await;
    // The second waits behind the only worker: cancel it while queued.
    assert_eq!(
        client.cancel(second).await.unwrap().state,
        TaskState::Cancelled
    );
    client.cancel(first).await.unwrap();
    let t = client.wait(first, Duration::from_secs(5)).await.unwrap();
    assert_eq!(t.state, TaskState::Cancelled);
    assert!(t.errors[0].message.contains("stopped by token"));
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        ran.load(Ordering::SeqCst),
        1,
        "the cancelled queued task never ran"
    );
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn failures_retry_with_backoff_then_dead_letter_then_retry_by_hand() {
    let (store, _d) = fixtures::sqlite_store().await;
    let calls = Arc::new(AtomicUsize::new(0));
    let mut reg = TaskRegistry::new();
    let c = calls.clone();
    reg.register_with(
        "thrice",
        executor_fn(move |ctx| {
            let c = c.clone();
            async move {
                c.fetch_add(1, Ordering::SeqCst);
                if ctx.attempt < 4 {
                    Err(TaskError::failed(format!("attempt {} failed", ctx.attempt)))
                } else {
                    Ok(json!("finally"))
                }
            }
        }),
        KindDefaults {
            max_attempts: Some(3),
            ..quick_retry()
        },
    );
    let pool = builder(store, reg).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let id = client.enqueue("thrice", json!(null)).await.unwrap().id;
    let t = client.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.attempt, 3);
    let msgs: Vec<_> = t.errors.iter().map(|e| e.message.as_str()).collect();
    assert_eq!(
        msgs,
        ["attempt 1 failed", "attempt 2 failed", "attempt 3 failed"]
    );
    // Backoff: each retry waited at least the policy's delay (10ms, then 20ms).
    assert!(t.errors[1].at - t.errors[0].at >= chrono::Duration::milliseconds(10));
    assert!(t.errors[2].at - t.errors[1].at >= chrono::Duration::milliseconds(20));
    client.retry(id).await.unwrap();
    let t = client.wait(id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed);
    assert_eq!(t.attempt, 4);
    assert_eq!(calls.load(Ordering::SeqCst), 4);
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_args_unknown_kinds_and_snoozes() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let runs = Arc::new(AtomicUsize::new(0));
    let r = runs.clone();
    reg.register(
        "snoozer",
        executor_fn(move |ctx| {
            let r = r.clone();
            async move {
                if r.fetch_add(1, Ordering::SeqCst) == 0 {
                    // The first run asks to come back later without spending an attempt.
                    return Err(TaskError::Snooze(Duration::from_millis(50)));
                }
                Ok(json!(ctx.attempt))
            }
        }),
    );
    let pool = builder(store, reg).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    // Args the executor cannot decode: failed at once, not retried.
    let bad = client
        .enqueue("sleep", json!({"ms": "soon"}))
        .await
        .unwrap()
        .id;
    let t = client.wait(bad, Duration::from_secs(5)).await.unwrap();
    assert_eq!(t.state, TaskState::Failed);
    assert_eq!(t.attempt, 1);
    assert!(
        t.errors[0].message.contains("args do not decode"),
        "{:?}",
        t.errors
    );
    // A kind nobody registered is refused at enqueue...
    let refused = client.enqueue("nobody", json!(null)).await.unwrap_err();
    assert!(
        refused
            .to_string()
            .contains("kind: no executor runs kind \"nobody\""),
        "{refused}"
    );
    // ...and when let in anyway, the attempt fails with a message saying so.
    let opts = TaskOptions::default().max_attempts(1);
    let unknown = client
        .clone()
        .accept_unknown_kinds()
        .insert(NewTask::new("nobody", json!(null)).with(opts))
        .await
        .unwrap()
        .task
        .id;
    let t = client.wait(unknown, Duration::from_secs(5)).await.unwrap();
    assert!(
        t.errors[0]
            .message
            .contains("no executor is registered for kind \"nobody\"")
    );
    // Snooze: runs twice, and the second run is still attempt 1.
    let s = client.enqueue("snoozer", json!({})).await.unwrap().id;
    let t = client.wait(s, Duration::from_secs(5)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed);
    assert_eq!(runs.load(Ordering::SeqCst), 2);
    assert_eq!((t.attempt, t.result), (1, Some(json!(1))));
    assert!(t.errors.is_empty());
    pool.shutdown().await;
}

/// A snooze of any size ends the run (no overflow leaves the task
/// `running`), and a task that snoozes as its cancel arrives stays cancelled.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn huge_snoozes_and_snoozes_under_cancel() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    reg.register(
        "forever",
        executor_fn(|_ctx| async { Err(TaskError::Snooze(Duration::MAX)) }),
    );
    reg.register(
        "dodger",
        executor_fn(|ctx| async move {
            // Wait to be cancelled, then ask to come back later.
            ctx.cancel.cancelled().await;
            Err(TaskError::Snooze(Duration::from_millis(10)))
        }),
    );
    let pool = builder(store, reg).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let f = client.enqueue("forever", json!({})).await.unwrap().id;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let t = loop {
        let t = client.get(f).await.unwrap().unwrap();
        if t.state == TaskState::Scheduled || std::time::Instant::now() > deadline {
            break t;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(t.state, TaskState::Scheduled, "{t:?}");
    assert_eq!(t.run_at.format("%Y").to_string(), "9999");
    let d = client.enqueue("dodger", json!({})).await.unwrap().id;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while client.get(d).await.unwrap().unwrap().state != TaskState::Running {
        assert!(std::time::Instant::now() < deadline, "never started");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    client.cancel(d).await.unwrap();
    let t = client.wait(d, Duration::from_secs(5)).await.unwrap();
    assert_eq!(t.state, TaskState::Cancelled, "{t:?}");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = client.get(d).await.unwrap().unwrap();
    assert_eq!(t.state, TaskState::Cancelled, "ran again: {t:?}");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_leader_prunes_finished_tasks_past_retention() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let retention = Retention {
        completed: Some(Duration::ZERO),
        failed: None,
        cancelled: None,
        audit: None,
        interval: Duration::from_millis(100),
    };
    let pool = builder(store, reg).retention(retention).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let done = client.enqueue("noop", json!(null)).await.unwrap().id;
    let dead = client
        .insert(NewTask::new("fail", json!({})).with(TaskOptions::default().max_attempts(1)))
        .await
        .unwrap()
        .task
        .id;
    client.wait(dead, Duration::from_secs(5)).await.unwrap();
    let shared = pool.shared().clone();
    wait_until("leadership", Duration::from_secs(5), || shared.is_leader()).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while client.get(done).await.unwrap().is_some() {
        assert!(Instant::now() < deadline, "completed task was never pruned");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(
        client.get(dead).await.unwrap().is_some(),
        "failed tasks kept (retention off)"
    );
    let nodes = client.nodes().await.unwrap();
    assert!(nodes.iter().any(|n| n.leader && n.name == pool.node_name()));
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_schedule_enqueues_one_task_per_tick() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    proto_tasker::executors::register_builtin(&mut reg);
    let spec: proto_tasker::cron::ScheduleSpec = serde_json::from_value(json!({
        "name": "every-second", "cron": "* * * * * *", "kind": "noop", "queue": "default"
    }))
    .unwrap();
    let pool = builder(store, reg)
        .schedule(spec)
        .cron_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(3500)).await;
    pool.shutdown().await;
    let tasks = client
        .list(proto_tasker::store::ListParams {
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    assert!(
        (3..=4).contains(&tasks.len()),
        "about one per second: {}",
        tasks.len()
    );
    let keys: std::collections::HashSet<_> = tasks
        .iter()
        .map(|t| t.unique_key.clone().unwrap())
        .collect();
    assert_eq!(keys.len(), tasks.len(), "one task per tick");
    assert!(keys.iter().all(|k| k.starts_with("cron:every-second:")));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn results_are_kept_up_to_their_size_cap() {
    let (store, _d) = fixtures::sqlite_store().await;
    let mut reg = TaskRegistry::new();
    reg.register(
        "echo_len",
        executor_fn(|ctx| async move {
            let n = ctx.args["n"].as_u64().unwrap_or(0) as usize;
            Ok(json!("x".repeat(n)))
        }),
    );
    let pool = builder(store, reg).max_result_bytes(100).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let small = client
        .enqueue("echo_len", json!({"n": 10}))
        .await
        .unwrap()
        .id;
    let big = client
        .enqueue("echo_len", json!({"n": 500}))
        .await
        .unwrap()
        .id;
    let small = client.wait(small, Duration::from_secs(5)).await.unwrap();
    assert_eq!(small.result, Some(json!("x".repeat(10))));
    let big = client.wait(big, Duration::from_secs(5)).await.unwrap();
    assert_eq!(big.state, TaskState::Failed);
    assert_eq!(
        big.attempt, 1,
        "not retried: the same result would come back"
    );
    assert!(
        big.errors[0]
            .message
            .contains("502 bytes; the limit is 100"),
        "{:?}",
        big.errors
    );
    pool.shutdown().await;
}

/// A kind whose default queue the pool does not serve is named at build
/// (its tasks would wait for another node), and nothing is named when the
/// pool serves it.
#[tokio::test]
async fn kinds_whose_default_queue_has_no_workers_are_named() {
    let (store, _dir) = fixtures::sqlite_store().await;
    let registry = || {
        let mut r = TaskRegistry::new();
        r.register_with(
            "send_email",
            proto_tasker::executor_fn(|_ctx| async { Ok(serde_json::Value::Null) }),
            KindDefaults {
                queue: Some("emails".into()),
                ..Default::default()
            },
        );
        r.register(
            "plain",
            proto_tasker::executor_fn(|_ctx| async { Ok(serde_json::Value::Null) }),
        );
        r
    };
    let b = Builder::new(store.clone(), registry()).queue("default", 2);
    assert_eq!(
        b.unserved_kinds(),
        [("send_email".to_string(), "emails".to_string())]
    );
    b.build()
        .expect("an unserved kind is a warning, not an error");
    let b = Builder::new(store, registry())
        .queue("default", 2)
        .queue("emails", 1);
    assert!(b.unserved_kinds().is_empty());
}

/// A schedule declared in code lives while a node declares it: a pool
/// started without it on the same store leaves it alone while the declaring
/// node runs, and removes it (it no longer fires) once that node has
/// stopped. Schedules added through the API are never removed this way.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn config_schedules_go_when_no_node_declares_them() {
    let (store, _d) = fixtures::sqlite_store().await;
    let noop = || {
        let mut r = TaskRegistry::new();
        r.register(
            "noop",
            proto_tasker::executor_fn(|_ctx| async { Ok(json!(null)) }),
        );
        r
    };
    let spec = |name: &str| -> proto_tasker::ScheduleSpec {
        serde_json::from_value(json!({
            "name": name, "cron": "* * * * * *", "kind": "noop", "queue": "default"
        }))
        .unwrap()
    };
    let declaring = builder(store.clone(), noop())
        .node_name("declares")
        .schedule(spec("from-code"))
        .cron_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    declaring.start().await.unwrap();
    let client = declaring.client();
    client.schedule_put(spec("from-api")).await.unwrap();
    let other = builder(store.clone(), noop())
        .node_name("declares-nothing")
        .cron_interval(Duration::from_millis(100))
        .build()
        .unwrap();
    other.start().await.unwrap();
    let names = |c: proto_tasker::Client| async move {
        let mut v: Vec<String> = c
            .schedules()
            .await
            .unwrap()
            .into_iter()
            .filter_map(|s| s.spec["name"].as_str().map(String::from))
            .collect();
        v.sort();
        v
    };
    // Both nodes run: whoever leads keeps what the other declares.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(names(client.clone()).await, ["from-api", "from-code"]);
    declaring.shutdown().await;
    let t0 = Instant::now();
    while names(other.client())
        .await
        .contains(&"from-code".to_string())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the schedule no node declares was not removed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(names(other.client()).await, ["from-api"]);
    other.shutdown().await;
}

/// A pool that was shut down does not start again, and says so.
#[tokio::test]
async fn start_after_shutdown_is_an_error() {
    let (store, _d) = fixtures::sqlite_store().await;
    let pool = builder(store, TaskRegistry::new()).build().unwrap();
    pool.start().await.unwrap();
    pool.start()
        .await
        .expect("starting a started pool does nothing");
    pool.shutdown().await;
    let e = pool
        .start()
        .await
        .expect_err("a shut-down pool does not start");
    assert_eq!(e.field(), Some("pool"), "{e}");
}

/// A queue's `workers` changed at run time: lowered, the pool runs no more
/// than the new count once running tasks end (none is stopped); raised, it
/// adds slots and runs that many at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn workers_change_at_run_time_both_ways() {
    use proto_tasker::store::QueueSettings;
    let (store, _d) = fixtures::sqlite_store().await;
    let now_running = Arc::new(AtomicUsize::new(0));
    let most = Arc::new(AtomicUsize::new(0));
    let mut reg = TaskRegistry::new();
    let (n, m) = (now_running.clone(), most.clone());
    reg.register(
        "hold",
        executor_fn(move |_ctx| {
            let (n, m) = (n.clone(), m.clone());
            async move {
                let k = n.fetch_add(1, Ordering::SeqCst) + 1;
                m.fetch_max(k, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(150)).await;
                n.fetch_sub(1, Ordering::SeqCst);
                Ok(json!(null))
            }
        }),
    );
    let pool = builder(store, reg).queue("q", 3).build().unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    let tasks = (0..400)
        .map(|_| NewTask::new("hold", json!(null)).with(TaskOptions::default().queue("q")))
        .collect();
    client.insert_many(tasks).await.unwrap();
    wait_until("3 at once", Duration::from_secs(5), || {
        most.load(Ordering::SeqCst) == 3
    })
    .await;
    let workers = |n: Option<u32>| QueueSettings {
        workers: n,
        ..Default::default()
    };
    client
        .queue_set_settings("q", workers(Some(1)))
        .await
        .unwrap();
    // The running ones finish (150 ms); from then on, one at a time.
    tokio::time::sleep(Duration::from_millis(600)).await;
    most.store(now_running.load(Ordering::SeqCst), Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(most.load(Ordering::SeqCst), 1, "lowered to 1 worker");
    assert_eq!(pool.queue_workers(), [("q".to_string(), 1)]);
    client
        .queue_set_settings("q", workers(Some(6)))
        .await
        .unwrap();
    wait_until("6 at once", Duration::from_secs(5), || {
        most.load(Ordering::SeqCst) == 6
    })
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(most.load(Ordering::SeqCst), 6, "never more than 6");
    assert_eq!(pool.shared().workers_total(), 6);
    // null: back to the configured 3.
    client.queue_set_settings("q", workers(None)).await.unwrap();
    wait_until("3 again", Duration::from_secs(5), || {
        pool.queue_workers() == [("q".to_string(), 3)]
    })
    .await;
    pool.shutdown().await;
}

/// A queue switched to round robin at run time: the pool gives its waiting
/// tasks their turn (they were enqueued with no fair_seq) and runs them
/// first, then takes two keys in turn however long the first one's backlog.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_queue_switched_to_round_robin_runs_old_and_new_tasks_in_turn() {
    use proto_tasker::store::{Fairness, QueueSettings};
    let (store, _d) = fixtures::sqlite_store().await;
    let order = Arc::new(std::sync::Mutex::new(Vec::<String>::new()));
    let mut reg = TaskRegistry::new();
    let seen = order.clone();
    reg.register(
        "note",
        executor_fn(move |ctx| {
            let seen = seen.clone();
            async move {
                seen.lock()
                    .unwrap()
                    .push(ctx.args["k"].as_str().unwrap_or("?").to_string());
                Ok(json!(null))
            }
        }),
    );
    let pool = builder(store, reg).queue("f", 1).build().unwrap();
    let client = pool.client();
    client.queue_set_paused("f", true).await.unwrap();
    let task = |k: &str| {
        NewTask::new("note", json!({"k": k})).with(
            TaskOptions::default()
                .queue("f")
                .concurrency_key(k.to_string()),
        )
    };
    client
        .insert_many(vec![task("old"), task("old")])
        .await
        .unwrap();
    pool.start().await.unwrap();
    client
        .queue_set_settings(
            "f",
            QueueSettings {
                fairness: Some(Fairness::RoundRobin),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    let mut batch: Vec<NewTask> = (0..40).map(|_| task("big")).collect();
    batch.extend((0..4).map(|_| task("small")));
    client.insert_many(batch).await.unwrap();
    client.queue_set_paused("f", false).await.unwrap();
    wait_until("all 46 ran", Duration::from_secs(10), || {
        order.lock().unwrap().len() == 46
    })
    .await;
    let order = order.lock().unwrap().clone();
    assert_eq!(order[..2], ["old", "old"], "{order:?}");
    let last_small = order.iter().rposition(|k| k == "small").unwrap();
    assert!(last_small < 12, "small took turns with big: {order:?}");
    pool.shutdown().await;
}

/// The pool's own client starts a task as it enqueues it when a worker of
/// the queue is free (one store round trip, no claim), and never more
/// than the queue's workers at once; a paused queue or a busy one takes
/// the task as any other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_pools_client_starts_tasks_at_enqueue_within_its_workers() {
    let (store, _d) = fixtures::sqlite_store().await;
    let running = Arc::new(AtomicUsize::new(0));
    let max = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(tokio::sync::Semaphore::new(0));
    let mut reg = TaskRegistry::new();
    let (r2, m2, g2) = (running.clone(), max.clone(), gate.clone());
    reg.register(
        "hold",
        executor_fn(move |_ctx| {
            let (running, max, gate) = (r2.clone(), m2.clone(), g2.clone());
            async move {
                let cur = running.fetch_add(1, Ordering::SeqCst) + 1;
                max.fetch_max(cur, Ordering::SeqCst);
                let _ = gate.acquire().await.map(|p| p.forget());
                running.fetch_sub(1, Ordering::SeqCst);
                Ok(json!(null))
            }
        }),
    );
    // A long poll: the producer's poll holds the free workers for the
    // length of its claim, when nothing starts at enqueue.
    let pool = builder(store.clone(), reg)
        .poll_interval(Duration::from_secs(1))
        .queue("q", 2)
        .build()
        .unwrap();
    let client = pool.client();
    pool.start().await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let enqueue = || {
        let c = client.clone();
        async move {
            c.insert(NewTask::new("hold", json!(null)).with(TaskOptions::default().queue("q")))
                .await
                .unwrap()
                .task
        }
    };
    let first = enqueue().await;
    assert_eq!(
        first.state,
        TaskState::Running,
        "started as it was enqueued"
    );
    assert_eq!(first.node.as_deref(), Some(pool.node_name()));
    let counters = &pool.shared().counters;
    assert_eq!(Counters::get(&counters.started_at_enqueue), 1);
    // Eight more at once: one more starts at enqueue, the rest wait for a
    // worker and are claimed as they free up.
    let rest = futures::future::join_all((0..8).map(|_| enqueue())).await;
    let started = rest
        .iter()
        .filter(|t| t.state == TaskState::Running)
        .count();
    assert_eq!(started, 1, "only the one free worker took a task");
    assert_eq!(Counters::get(&counters.started_at_enqueue), 2);
    // One worker frees up: the producer, which knows of the backlog, takes
    // it for the oldest waiting task; a task enqueued now waits its turn.
    gate.add_permits(1);
    let waiting: Vec<_> = rest
        .iter()
        .filter(|t| t.state != TaskState::Running)
        .collect();
    let oldest = waiting.iter().map(|t| t.id).min().unwrap();
    fixtures::wait_for(
        "the oldest waiting task to start",
        Duration::from_secs(10),
        async || client.get(oldest).await.unwrap().unwrap().state == TaskState::Running,
    )
    .await;
    let behind = enqueue().await;
    assert_eq!(behind.state, TaskState::Available, "no jumping the backlog");
    assert_eq!(Counters::get(&counters.started_at_enqueue), 2);
    gate.add_permits(100);
    let done = client
        .wait(behind.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Completed);
    for t in std::iter::once(&first).chain(&rest) {
        let done = client.wait(t.id, Duration::from_secs(10)).await.unwrap();
        assert_eq!(done.state, TaskState::Completed);
        assert_eq!(done.attempt, 1);
    }
    assert_eq!(max.load(Ordering::SeqCst), 2, "never more than the workers");
    // A paused queue keeps what is enqueued, and gives the worker back.
    store.queue_set_paused("q", true).await.unwrap();
    let paused = enqueue().await;
    assert_eq!(paused.state, TaskState::Available);
    store.queue_set_paused("q", false).await.unwrap();
    let done = client
        .wait(paused.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Completed);
    pool.shutdown().await;
    // A stopped pool starts nothing.
    let after = enqueue().await;
    assert_eq!(after.state, TaskState::Available);
    assert_eq!(Counters::get(&counters.started_at_enqueue), 2);
}
