//! A workflow: tasks that wait for others in the same batch, and read
//! their results.
//!
//! Run with `cargo run --example workflow`.

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::{
    Builder, NewTask, SqliteStore, Store, TaskError, TaskOptions, TaskRegistry, executor_fn,
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
            // Every parent completed; read their results by the names given
            // in the batch (or all of them, by id, in `ctx.parent_results`).
            let home: serde_json::Value = ctx.parent("home")?;
            let docs: serde_json::Value = ctx.parent("docs")?;
            let total = home["bytes"].as_u64().unwrap_or(0) + docs["bytes"].as_u64().unwrap_or(0);
            Ok::<_, TaskError>(json!({ "total_bytes": total }))
        }),
    );

    let pool = Builder::new(store, registry).queue("default", 4).build()?;
    let client = pool.client();
    pool.start().await?;

    // Names (or positions, `Dependency::Batch(i)`) in the batch tie the
    // steps together; one transaction inserts them all.
    let after_both = TaskOptions::default()
        .depends_on_ref("home")
        .depends_on_ref("docs");
    let tasks = client
        .insert_many(vec![
            NewTask::new("fetch", json!("https://example.com/"))
                .with(TaskOptions::default().reference("home")),
            NewTask::new("fetch", json!("https://example.com/docs"))
                .with(TaskOptions::default().reference("docs")),
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
