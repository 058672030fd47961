//! A cron schedule declared in code: the leader enqueues one task per tick,
//! exactly once across the cluster.
//!
//! Run with `cargo run --example cron` (about four seconds).

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::cron::{CatchUp, Overlap};
use proto_tasker::{
    Builder, ScheduleSpec, SqliteStore, Store, TaskError, TaskRegistry, executor_fn,
};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open_path(dir.path().join("cron.db"))?);
    store.migrate().await?;

    let mut registry = TaskRegistry::new();
    registry.register(
        "tick",
        executor_fn(|ctx| async move {
            println!(
                "tick task {} at {}",
                ctx.id,
                chrono::Utc::now().format("%H:%M:%S%.3f")
            );
            Ok::<_, TaskError>(serde_json::Value::Null)
        }),
    );

    // Six fields: the first is seconds. Five fields start at minutes.
    let every_second = ScheduleSpec::new("heartbeat", "* * * * * *", "tick")
        .timezone("UTC")
        .overlap(Overlap::Skip) // no new tick while the last one's task is unfinished
        .catch_up(CatchUp::None); // ticks missed while down are dropped
    let pool = Builder::new(store, registry)
        .queue("default", 1)
        .schedule(every_second)
        .build()?;
    pool.start().await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    pool.shutdown().await;
    Ok(())
}
