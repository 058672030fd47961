//! PostgreSQL: enqueue inside your own transaction, so the task exists if
//! and only if your transaction commits.
//!
//! Run with `cargo run --example postgres` against
//! `PROTO_TASKER_EXAMPLE_DATABASE_URL` (default
//! `postgres://postgres@127.0.0.1:5432/test`); it works in a schema of its
//! own and drops it at the end.

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::{
    Builder, NewTask, PostgresOptions, PostgresStore, Store, TaskError, TaskRegistry, executor_fn,
};
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let url = std::env::var("PROTO_TASKER_EXAMPLE_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into());
    let schema = format!("proto_tasker_example_{}", std::process::id());
    let store = Arc::new(PostgresStore::connect(PostgresOptions::new(&url).schema(&schema)).await?);
    store.migrate().await?;

    let mut registry = TaskRegistry::new();
    registry.register(
        "send_receipt",
        executor_fn(|ctx| async move {
            let order: i64 = ctx.args::<serde_json::Value>()?["order"]
                .as_i64()
                .unwrap_or(0);
            Ok::<_, TaskError>(json!(format!("receipt for order {order} sent")))
        }),
    );
    let pool = Builder::new(store.clone(), registry)
        .queue("default", 2)
        .build()?;
    let client = pool.client();
    pool.start().await?;

    let (mut pg, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    pg.batch_execute(&format!(
        "CREATE TABLE {schema}.orders (id bigint PRIMARY KEY)"
    ))
    .await?;

    // Committed: the order and its task appear together.
    let tx = pg.transaction().await?;
    tx.execute(&format!("INSERT INTO {schema}.orders VALUES (42)"), &[])
        .await?;
    let kept = client
        .insert_in(
            &tx,
            vec![NewTask::new("send_receipt", json!({"order": 42}))],
        )
        .await?;
    tx.commit().await?;

    // Rolled back: neither exists.
    let tx = pg.transaction().await?;
    tx.execute(&format!("INSERT INTO {schema}.orders VALUES (43)"), &[])
        .await?;
    let dropped = client
        .insert_in(
            &tx,
            vec![NewTask::new("send_receipt", json!({"order": 43}))],
        )
        .await?;
    tx.rollback().await?;

    let done = client
        .wait(kept[0].task.id, Duration::from_secs(10))
        .await?;
    println!("order 42: {}", done.result.unwrap_or_default());
    println!(
        "order 43's task exists: {}",
        client.get(dropped[0].task.id).await?.is_some()
    );
    pool.shutdown().await;
    store.drop_schema().await?;
    Ok(())
}
