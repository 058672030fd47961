//! Schemas upgrade in place: a store made by the first migration, holding a
//! task written then, is migrated to today's schema by a newer binary and
//! the task is still there, claimable and completable, on both stores.

mod fixtures;

use std::sync::Arc;

use chrono::Utc;
use proto_tasker::store::{
    ClaimParams, Completion, Outcome, PostgresOptions, PostgresStore, SqliteOptions,
};
use proto_tasker::{SqliteStore, Store, TaskId, TaskState};

/// The task every old store holds: claim it, complete it, read it back.
async fn old_task_still_runs(store: Arc<dyn Store>, id: TaskId) {
    let t = store.task_get(id).await.unwrap().expect("the old task");
    assert_eq!(t.kind, "old");
    assert_eq!(t.state, TaskState::Available);
    assert!(t.depends_on.is_empty() && t.concurrency_key.is_none());
    let now = Utc::now();
    let claimed = store
        .task_claim(ClaimParams {
            queue: "default".into(),
            node: "n".into(),
            limit: 10,
            now,
            limits: None,
            room: None,
        })
        .await
        .unwrap();
    assert_eq!(claimed.len(), 1);
    let applied = store
        .task_complete_many(vec![Completion {
            id,
            attempt: 1,
            token: 1,
            at: now,
            outcome: Outcome::Completed {
                result: serde_json::json!("done"),
            },
        }])
        .await
        .unwrap();
    assert_eq!(applied, vec![true]);
    // And the new schema's features work on it: counts by queue and state.
    let counts = store.queue_counts().await.unwrap();
    assert!(counts.contains(&("default".into(), TaskState::Completed, 1)));
}

#[tokio::test]
async fn sqlite_upgrades_a_first_version_file_in_place() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("old.db");
    let store = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
    store.migrate_to(1).await.unwrap();
    drop(store);
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        let v: i64 = conn
            .query_row("PRAGMA user_version", [], |r| r.get(0))
            .unwrap();
        assert_eq!(v, 1);
        conn.execute(
            "INSERT INTO tasks (kind, queue, args, priority, state, max_attempts, run_at, created_at) \
             VALUES ('old', 'default', '{}', 1, 'available', 3, 0, 0)",
            [],
        )
        .unwrap();
    }
    let store = SqliteStore::open(SqliteOptions::new(&path)).unwrap();
    store.migrate().await.unwrap();
    // Migrating again is a no-op.
    store.migrate().await.unwrap();
    let id = TaskId(1);
    old_task_still_runs(Arc::new(store), id).await;
    let conn = rusqlite::Connection::open(&path).unwrap();
    let v: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert!(v > 1, "user_version {v}");
}

#[tokio::test]
async fn postgres_upgrades_a_first_version_schema_in_place() {
    let url = fixtures::pg_url();
    let schema = fixtures::fresh_schema();
    let _guard = fixtures::PgSchema {
        url: url.clone(),
        schema: schema.clone(),
    };
    let open = || PostgresStore::connect(PostgresOptions::new(url.clone()).schema(schema.clone()));
    let store = open().await.unwrap();
    store.migrate_to(1).await.unwrap();
    let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let v: i32 = client
        .query_one(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(v, 1);
    let id: i64 = client
        .query_one(
            &format!(
                "INSERT INTO {schema}.tasks (kind, queue, args, priority, state, max_attempts, run_at, created_at) \
                 VALUES ('old', 'default', '{{}}', 1, 'available', 3, now() - interval '1 second', now()) RETURNING id"
            ),
            &[],
        )
        .await
        .unwrap()
        .get(0);
    drop(store);
    let store = open().await.unwrap();
    store.migrate().await.unwrap();
    store.migrate().await.unwrap();
    old_task_still_runs(Arc::new(store), TaskId(id)).await;
    let v: i32 = client
        .query_one(&format!("SELECT version FROM {schema}.schema_version"), &[])
        .await
        .unwrap()
        .get(0);
    assert!(v > 1, "version {v}");
}
