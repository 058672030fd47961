//! A workflow: tasks that wait for others in the same batch, and read
//! their results.
//!
//! Run with `cargo run --example workflow`.

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::{
    Builder, Dependency, NewTask, SqliteStore, Store, TaskError, TaskOptions, TaskRegistry,
    executor_fn,
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open_path(dir.path().join("workflow.db"))?);
    store.migrate().await?;

    let mut registry = TaskRegistry::new();
    registry.register(
        "fetch",
        executor_fn(|ctx| async move {
            let url: String = ctx.args()?;
            Ok::<_, TaskError>(json!({ "url": url, "bytes": url.len() * 100 }))
        }),
    );
    registry.register(
        "sum",
        executor_fn(|ctx| async move {
            // Every parent completed; their results, by id.
            let total: u64 = ctx
                .parent_results
                .values()
                .filter_map(|r| r["bytes"].as_u64())
                .sum();
            Ok::<_, TaskError>(json!({ "total_bytes": total }))
        }),
    );

    let pool = Builder::new(store, registry).queue("default", 4).build()?;
    let client = pool.client();
    pool.start().await?;

    // Positions in the batch name the parents; one transaction inserts all.
    let after_both = TaskOptions::default()
        .depends_on(Dependency::Batch(0))
        .depends_on(Dependency::Batch(1));
    let tasks = client
        .insert_many(vec![
            NewTask::new("fetch", json!("https://example.com/a")),
            NewTask::new("fetch", json!("https://example.com/bb")),
            NewTask::new("sum", json!(null)).with(after_both),
        ])
        .await?;
    let sum = &tasks[2].task;
    println!("sum is {:?} until both fetches complete", sum.state);
    let done = client.wait(sum.id, Duration::from_secs(10)).await?;
    println!("sum -> {}", done.result.unwrap_or_default());
    pool.shutdown().await;
    Ok(())
}
