//! Retries with backoff, the dead-letter list, retry by hand, unique keys
//! and cancelling a running task.
//!
//! Run with `cargo run --example retries_and_cancel`.

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::{
    Builder, KindDefaults, NewTask, RetryPolicy, SqliteStore, Store, TaskError, TaskOptions,
    TaskRegistry, executor_fn,
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open_path(dir.path().join("example.db"))?);
    store.migrate().await?;

    let mut registry = TaskRegistry::new();
    // Fails twice, then succeeds; retried after 50ms, then 100ms.
    registry.register_with(
        "flaky",
        executor_fn(|ctx| async move {
            if ctx.attempt < 3 {
                return Err(TaskError::failed(format!("attempt {} failed", ctx.attempt)));
            }
            Ok(json!("third time lucky"))
        }),
        KindDefaults {
            max_attempts: Some(5),
            retry: Some(RetryPolicy {
                base: Duration::from_millis(50),
                max: Duration::from_secs(1),
                jitter: 0.1,
            }),
            ..Default::default()
        },
    );
    // Runs until cancelled.
    registry.register(
        "long",
        executor_fn(|ctx| async move {
            ctx.cancel.cancelled().await;
            Err(TaskError::failed("stopped early"))
        }),
    );

    // Tasks still running at shutdown get one second, then are cancelled and released.
    let pool = Builder::new(store, registry)
        .shutdown_timeout(Duration::from_secs(1))
        .build()?;
    let client = pool.client();
    pool.start().await?;

    let flaky = client.enqueue("flaky", json!(null)).await?;
    let done = client.wait(flaky.id, Duration::from_secs(10)).await?;
    println!(
        "flaky: {:?} after {} attempts; errors: {:?}",
        done.state,
        done.attempt,
        done.errors.iter().map(|e| &e.message).collect::<Vec<_>>()
    );

    // The same unique key while the first is unfinished returns the first.
    let opts = TaskOptions::default().unique_key("report-2026-11-26");
    let a = client
        .insert(NewTask::new("long", json!(null)).with(opts.clone()))
        .await?;
    let b = client
        .insert(NewTask::new("long", json!(null)).with(opts))
        .await?;
    println!(
        "unique: second insert returned task {} (existing: {})",
        b.task.id, b.existing
    );
    assert_eq!(a.task.id, b.task.id);

    tokio::time::sleep(Duration::from_millis(200)).await;
    client.cancel(a.task.id).await?;
    let cancelled = client.wait(a.task.id, Duration::from_secs(5)).await?;
    println!("long: {:?}", cancelled.state);

    // A cancelled (or failed) task can be retried by hand.
    let again = client.retry(a.task.id).await?;
    println!("retried: {:?}", again.state);
    pool.shutdown().await;
    Ok(())
}
