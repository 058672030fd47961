//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use proto_tasker::store::{SqliteOptions, Synchronous, TaskInsert};
use proto_tasker::{SqliteStore, Store};

/// A migrated SQLite store in a fresh temp dir (kept alive by the returned guard).
pub async fn sqlite_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = SqliteOptions::new(dir.path().join("tasks.db"));
    // Tests do not need power-loss durability; crash tests use FULL explicitly.
    opts.synchronous = Synchronous::Normal;
    let store = SqliteStore::open(opts).expect("open sqlite");
    store.migrate().await.expect("migrate");
    (Arc::new(store), dir)
}

pub fn insert(
    kind: &str,
    queue: &str,
    priority: i16,
    run_at: chrono::DateTime<chrono::Utc>,
) -> TaskInsert {
    TaskInsert {
        kind: kind.to_string(),
        args: serde_json::json!({}),
        queue: queue.to_string(),
        priority,
        run_at,
        max_attempts: 3,
        timeout_ms: None,
        unique_key: None,
    }
}
