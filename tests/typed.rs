//! The Rust library as its users meet it: typed tasks, kinds checked at
//! enqueue, kind defaults known to insert-only clients, executors written
//! without depending on `async-trait`.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::{
    Builder, Client, ClientError, KindDefaults, NewTask, TaskArgs, TaskContext, TaskError,
    TaskExecutor, TaskOutput, TaskRegistry, TaskState,
};
use serde::{Deserialize, Serialize};
use serde_json::json;

#[derive(Debug, Serialize, Deserialize)]
struct SendEmail {
    to: String,
}

impl TaskArgs for SendEmail {
    const KIND: &'static str = "send_email";
    fn defaults() -> KindDefaults {
        KindDefaults {
            queue: Some("emails".into()),
            max_attempts: Some(5),
            ..Default::default()
        }
    }
}

#[derive(Debug, Serialize, Deserialize, PartialEq)]
struct Sent {
    to: String,
    attempt: i32,
}

/// An executor struct, written with the crate's re-export of `async_trait`.
struct Resize;

#[proto_tasker::async_trait]
impl TaskExecutor for Resize {
    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        let width: u32 = ctx.args()?;
        Ok(json!({ "width": width / 2 }))
    }
}

fn registry() -> TaskRegistry {
    let mut r = TaskRegistry::new();
    r.register_typed(|email: SendEmail, ctx: TaskContext| async move {
        Ok::<_, TaskError>(Sent {
            to: email.to,
            attempt: ctx.attempt,
        })
    });
    r.register_with(
        "resize",
        Arc::new(Resize),
        KindDefaults {
            queue: Some("images".into()),
            max_attempts: Some(3),
            timeout: Some(Duration::from_secs(7)),
            ..Default::default()
        },
    );
    r
}

/// `b` polling every 50 ms, built and started.
async fn started(b: Builder) -> proto_tasker::WorkerPool {
    let pool = b.poll_interval(Duration::from_millis(50)).build().unwrap();
    pool.start().await.unwrap();
    pool
}

fn invalid_field(e: ClientError) -> (String, String) {
    match e {
        ClientError::Invalid { field, message } => (field, message),
        other => panic!("expected an invalid request, got {other:?}"),
    }
}

#[tokio::test]
async fn typed_tasks_run_with_their_kind_and_defaults() {
    let (store, _dir) = fixtures::sqlite_store().await;
    let pool = started(
        Builder::new(store.clone(), registry())
            .queue("emails", 2)
            .queue("images", 2),
    )
    .await;
    let client = pool.client();
    let task = client
        .enqueue_typed(SendEmail {
            to: "a@example.com".into(),
        })
        .await
        .unwrap();
    assert_eq!(task.kind, "send_email");
    assert_eq!(task.queue, "emails");
    assert_eq!(task.max_attempts, 5);
    let done = client.wait(task.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.state, TaskState::Completed, "{done:?}");
    let sent: Sent = serde_json::from_value(done.result.unwrap()).unwrap();
    assert_eq!(
        sent,
        Sent {
            to: "a@example.com".into(),
            attempt: 1
        }
    );
    // Args that do not decode are refused at the door, not discarded later.
    let (field, message) = invalid_field(
        client
            .insert(NewTask::new("send_email", json!({"too": "b@example.com"})))
            .await
            .unwrap_err(),
    );
    assert_eq!(field, "args");
    assert!(message.contains("missing field `to`"), "{message}");
    // An executor struct without the async-trait crate in user code.
    let t = client.enqueue("resize", 640).await.unwrap();
    assert_eq!(t.queue, "images");
    let done = client.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.result, Some(json!({"width": 320})));
    pool.shutdown().await;
}

#[tokio::test]
async fn a_kind_nobody_runs_is_refused_at_enqueue() {
    let (store, _dir) = fixtures::sqlite_store().await;
    // A client with a registry of its own, and no node running.
    let client = Client::new(store.clone(), Arc::new(registry()));
    let (field, message) = invalid_field(
        client
            .enqueue("send_emial", json!({"to": "x"}))
            .await
            .unwrap_err(),
    );
    assert_eq!(field, "kind");
    assert!(
        message.contains("\"send_emial\"") && message.contains("send_email"),
        "names the kind and the known ones: {message}"
    );
    // In a batch too; nothing is inserted.
    let err = client
        .insert_many(vec![
            NewTask::new("resize", json!(10)),
            NewTask::new("resise", json!(10)),
        ])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(err).0, "kind");
    assert!(fixtures::all_tasks(&store).await.is_empty());
    // An insert-only client with no node live cannot know: it accepts.
    let insert_only = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    insert_only.enqueue("anything", json!(1)).await.unwrap();
    // Once a node runs and declares its kinds, the insert-only client checks too.
    let pool = Builder::new(store.clone(), registry())
        .queue("emails", 1)
        .build()
        .unwrap();
    pool.start().await.unwrap();
    let insert_only = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let (field, _) = invalid_field(insert_only.enqueue("anything", json!(1)).await.unwrap_err());
    assert_eq!(field, "kind");
    // For workers deployed later, the check can be turned off.
    let later = Client::new(store.clone(), Arc::new(registry())).accept_unknown_kinds();
    let t = later.enqueue("deployed_later", json!(1)).await.unwrap();
    assert_eq!(t.state, TaskState::Available);
    pool.shutdown().await;
}

#[tokio::test]
async fn an_insert_only_client_applies_the_defaults_the_nodes_declare() {
    let (store, _dir) = fixtures::sqlite_store().await;
    let pool = Builder::new(store.clone(), registry())
        .queue("images", 1)
        .build()
        .unwrap();
    pool.start().await.unwrap();
    // A web process that only enqueues: its registry is empty.
    let web = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let t = web.enqueue("resize", 100).await.unwrap();
    assert_eq!(t.queue, "images", "the kind's queue, not `default`");
    assert_eq!(t.max_attempts, 3);
    assert_eq!(t.timeout_ms, Some(7000));
    // A typed task carries its defaults even to a client that knows nothing.
    let t = web
        .insert(NewTask::typed(&SendEmail { to: "c".into() }).unwrap())
        .await
        .unwrap()
        .task;
    assert_eq!((t.queue.as_str(), t.max_attempts), ("emails", 5));
    // What the caller sets wins over every default.
    let t = web
        .insert(
            NewTask::new("resize", json!(1)).with(
                proto_tasker::TaskOptions::default()
                    .queue("urgent")
                    .max_attempts(9),
            ),
        )
        .await
        .unwrap()
        .task;
    assert_eq!((t.queue.as_str(), t.max_attempts), ("urgent", 9));
    pool.shutdown().await;
}

/// What a handler needs from outside (a connection pool, a client).
struct Mailer {
    sent: std::sync::atomic::AtomicUsize,
    from: String,
}

#[derive(Serialize, Deserialize)]
struct Notify {
    who: String,
}

impl TaskArgs for Notify {
    const KIND: &'static str = "notify";
}

#[tokio::test]
async fn executors_read_the_data_given_to_the_builder() {
    let (store, _dir) = fixtures::sqlite_store().await;
    let mut r = TaskRegistry::new();
    r.register_typed(|n: Notify, ctx: TaskContext| async move {
        let mailer = ctx.data::<Mailer>()?;
        mailer
            .sent
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok::<_, TaskError>(format!("{} -> {}", mailer.from, n.who))
    });
    r.register(
        "lonely",
        proto_tasker::executor_fn(|ctx| async move {
            ctx.data::<String>()?;
            Ok::<_, TaskError>(json!(null))
        }),
    );
    let mailer = Mailer {
        sent: Default::default(),
        from: "noreply@example.com".into(),
    };
    let pool = started(Builder::new(store.clone(), r).data(mailer)).await;
    let client = pool.client();
    let t = client
        .enqueue_typed(Notify { who: "ann".into() })
        .await
        .unwrap();
    let done = client.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.result, Some(json!("noreply@example.com -> ann")));
    // A type nobody gave: the attempt fails naming it.
    let t = client
        .insert(
            NewTask::new("lonely", json!(null))
                .with(proto_tasker::TaskOptions::default().max_attempts(1)),
        )
        .await
        .unwrap()
        .task;
    let done = client.wait(t.id, Duration::from_secs(10)).await.unwrap();
    assert_eq!(done.state, TaskState::Failed);
    assert!(
        done.errors[0].message.contains("alloc::string::String"),
        "{:?}",
        done.errors
    );
    pool.shutdown().await;
}

#[tokio::test]
async fn a_step_reads_its_parents_by_the_names_given_in_the_batch() {
    use proto_tasker::TaskOptions;
    let (store, _dir) = fixtures::sqlite_store().await;
    let mut r = TaskRegistry::new();
    r.register(
        "fetch",
        proto_tasker::executor_fn(|ctx| async move {
            let url: String = ctx.args()?;
            Ok::<_, TaskError>(json!({ "bytes": url.len() }))
        }),
    );
    r.register(
        "compare",
        proto_tasker::executor_fn(|ctx| async move {
            let small: serde_json::Value = ctx.parent("small")?;
            let large: serde_json::Value = ctx.parent("large")?;
            Ok::<_, TaskError>(json!([small["bytes"], large["bytes"]]))
        }),
    );
    let pool = started(Builder::new(store.clone(), r)).await;
    let client = pool.client();
    // The parents come after the step in the batch: names, not positions.
    let out = client
        .insert_many(vec![
            NewTask::new("compare", json!(null)).with(
                TaskOptions::default()
                    .depends_on_ref("large")
                    .depends_on_ref("small"),
            ),
            NewTask::new("fetch", json!("https://example.com/a-much-longer-path"))
                .with(TaskOptions::default().reference("large")),
            NewTask::new("fetch", json!("https://e.com"))
                .with(TaskOptions::default().reference("small")),
        ])
        .await
        .unwrap();
    assert_eq!(out[1].task.reference.as_deref(), Some("large"));
    let done = client
        .wait(out[0].task.id, Duration::from_secs(10))
        .await
        .unwrap();
    assert_eq!(done.state, TaskState::Completed, "{done:?}");
    assert_eq!(done.result, Some(json!([13, 38])));
    // A ref nobody carries, or two tasks with one name, are refused.
    let err = client
        .insert_many(vec![
            NewTask::new("compare", json!(null))
                .with(TaskOptions::default().depends_on_ref("nope")),
        ])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(err).0, "tasks[0].depends_on");
    let err = client
        .insert_many(vec![
            NewTask::new("fetch", json!("a")).with(TaskOptions::default().reference("x")),
            NewTask::new("fetch", json!("b")).with(TaskOptions::default().reference("x")),
        ])
        .await
        .unwrap_err();
    assert_eq!(invalid_field(err).0, "tasks[1].ref");
    let err = client
        .insert(
            NewTask::new("compare", json!(null))
                .with(TaskOptions::default().depends_on_ref("small")),
        )
        .await
        .unwrap_err();
    assert_eq!(invalid_field(err).0, "depends_on");
    pool.shutdown().await;
}

/// `ctx.progress` as often as one likes: the store sees the latest value,
/// written a few times a second at most.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_reports_are_coalesced_and_the_latest_is_kept() {
    let (store, _dir) = fixtures::sqlite_store().await;
    let mut r = TaskRegistry::new();
    r.register(
        "crunch",
        proto_tasker::executor_fn(|ctx| async move {
            let started = std::time::Instant::now();
            let mut i = 0u64;
            // About a second of reports in a tight loop.
            while started.elapsed() < Duration::from_millis(1000) {
                i += 1;
                ctx.progress(json!({ "done": i }))?;
                if i.is_multiple_of(100) {
                    tokio::task::yield_now().await;
                }
            }
            // Too large to keep: refused, the attempt goes on.
            assert!(ctx.progress("x".repeat(5000)).is_err());
            Ok::<_, TaskError>(json!(i))
        }),
    );
    let pool = started(Builder::new(store.clone(), r)).await;
    let client = pool.client();
    let t = client.enqueue("crunch", json!(null)).await.unwrap();
    let done = client.wait(t.id, Duration::from_secs(10)).await.unwrap();
    let reports = done.result.clone().unwrap().as_u64().unwrap();
    assert!(reports > 1000, "only {reports} reports");
    pool.shutdown().await;
    let t = client.get(t.id).await.unwrap().unwrap();
    assert_eq!(
        t.progress,
        Some(json!({ "done": reports })),
        "the last report is kept"
    );
    let writes = proto_tasker::pool::Counters::get(&pool.shared().counters.progress_writes);
    eprintln!("{reports} progress reports, {writes} store writes");
    assert!(
        (2..=8).contains(&writes),
        "{reports} reports took {writes} store writes (one per 250 ms)"
    );
}
