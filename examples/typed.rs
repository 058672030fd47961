//! Typed tasks: the args type names its kind and defaults; handlers get
//! decoded args and shared state; an executor struct needs no extra crate.
//!
//! Run with `cargo run --example typed`.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use proto_tasker::{
    Builder, KindDefaults, SqliteStore, Store, TaskArgs, TaskContext, TaskError, TaskExecutor,
    TaskOutput, TaskRegistry,
};
use serde::{Deserialize, Serialize};

/// The args of `send_email` tasks.
#[derive(Serialize, Deserialize)]
struct SendEmail {
    to: String,
    subject: String,
}

impl TaskArgs for SendEmail {
    const KIND: &'static str = "send_email";
    fn defaults() -> KindDefaults {
        KindDefaults {
            queue: Some("emails".into()),
            max_attempts: Some(5),
            timeout: Some(Duration::from_secs(30)),
            ..Default::default()
        }
    }
}

/// Shared by every executor (a real program would hold an SMTP pool here).
struct Mailer {
    from: String,
    sent: AtomicUsize,
}

/// An executor as a struct, with the crate's own `async_trait`.
struct Thumbnail {
    size: u32,
}

#[proto_tasker::async_trait]
impl TaskExecutor for Thumbnail {
    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        let path: String = ctx.args()?;
        Ok(serde_json::json!({ "thumbnail": format!("{path}@{}px", self.size) }))
    }
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = tempfile::tempdir()?;
    let store = Arc::new(SqliteStore::open_path(dir.path().join("typed.db"))?);
    store.migrate().await?;

    let mut registry = TaskRegistry::new();
    registry.register_typed(|email: SendEmail, ctx: TaskContext| async move {
        let mailer = ctx.data::<Mailer>()?;
        mailer.sent.fetch_add(1, Ordering::SeqCst);
        Ok::<_, TaskError>(format!(
            "{} -> {}: {}",
            mailer.from, email.to, email.subject
        ))
    });
    registry.register("thumbnail", Arc::new(Thumbnail { size: 128 }));

    let pool = Builder::new(store, registry)
        .queue("emails", 2)
        .queue("default", 2)
        .data(Mailer {
            from: "noreply@example.com".into(),
            sent: AtomicUsize::new(0),
        })
        .build()?;
    let client = pool.client();
    pool.start().await?;

    let email = client
        .enqueue_typed(SendEmail {
            to: "ada@example.com".into(),
            subject: "welcome".into(),
        })
        .await?;
    println!(
        "queued {} in {:?} with {} attempts",
        email.kind, email.queue, email.max_attempts
    );
    let thumb = client.enqueue("thumbnail", "cat.png").await?;
    // A misspelt kind is refused here, not retried for hours.
    if let Err(e) = client.enqueue("send_emial", "oops").await {
        println!("refused: {e}");
    }
    for id in [email.id, thumb.id] {
        let done = client.wait(id, Duration::from_secs(10)).await?;
        println!("{} -> {}", done.kind, done.result.unwrap_or_default());
    }
    pool.shutdown().await;
    Ok(())
}
