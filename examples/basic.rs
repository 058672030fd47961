//! Build a pool with a custom executor, enqueue tasks and wait for results.
//!
//! Run with `cargo run --example basic`.

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::{
    Builder, NewTask, SqliteStore, Store, TaskError, TaskOptions, TaskRegistry, executor_fn,
};
use serde::Deserialize;
use serde_json::json;

#[derive(Deserialize)]
struct Greet {
    name: String,
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open_path(dir.path().join("example.db"))?);
    store.migrate().await?;

    let mut registry = TaskRegistry::new();
    registry.register(
        "greet",
        executor_fn(|ctx| async move {
            let args: Greet = ctx.args()?;
            if args.name.is_empty() {
                return Err(TaskError::discard("name must not be empty"));
            }
            Ok(json!(format!("hello, {}", args.name)))
        }),
    );

    let pool = Builder::new(store, registry).queue("default", 4).build()?;
    let client = pool.client();
    pool.start().await?;

    let now = client.enqueue("greet", json!({"name": "Ada"})).await?;
    let later = client
        .insert(
            NewTask::new("greet", json!({"name": "Grace"})).with(
                TaskOptions::default()
                    .delay(Duration::from_millis(200))
                    .priority(1),
            ),
        )
        .await?
        .task;
    for id in [now.id, later.id] {
        let done = client.wait(id, Duration::from_secs(10)).await?;
        println!(
            "task {} ({}) -> {:?}: {}",
            done.id,
            done.kind,
            done.state,
            done.result.unwrap_or_default()
        );
    }
    pool.shutdown().await;
    Ok(())
}
