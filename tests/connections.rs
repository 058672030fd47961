//! The connection budget: what a node holds on PostgreSQL, how its few
//! connections are shared, and many nodes through PgBouncer.

mod fixtures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto_tasker::store::{ListParams, NodeInfo, PostgresOptions, PostgresStore};
use proto_tasker::{Store, StoreError};

fn node(name: &str) -> NodeInfo {
    let now = chrono::Utc::now();
    NodeInfo {
        name: name.into(),
        version: "test".into(),
        started_at: now,
        heartbeat_at: now,
        workers: 1,
        workers_busy: 0,
        queues: vec!["default".into()],
        leader: false,
        stats: Default::default(),
        instance: format!("test/{name}"),
        schedules: None,
    }
}

/// Server connections whose application name is the store's (`proto_tasker:<schema>`).
async fn connections_of(url: &str, schema: &str) -> i64 {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .expect("connect postgres");
    tokio::spawn(conn);
    client
        .query_one(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1",
            &[&format!("proto_tasker:{schema}")],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// A dashboard page stuck behind a lock holds at most all but one of the
/// pool's connections: the heartbeat still gets one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_dashboard_read_never_holds_every_connection() {
    let (_, guard) = fixtures::pg_store().await;
    // The default pool: two connections.
    let store = Arc::new(
        PostgresStore::connect(
            PostgresOptions::new(guard.url.clone()).schema(guard.schema.clone()),
        )
        .await
        .unwrap(),
    );
    assert!(
        store
            .node_register(node("n1"), chrono::Utc::now(), None)
            .await
            .unwrap()
            .is_none()
    );
    // Another session locks the tasks table: every list page waits on it.
    let (locker, conn) = tokio_postgres::connect(&guard.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    locker
        .batch_execute(&format!(
            "BEGIN; LOCK TABLE {}.tasks IN ACCESS EXCLUSIVE MODE",
            guard.schema
        ))
        .await
        .unwrap();
    let pages: Vec<_> = (0..3)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.task_list(ListParams::default()).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let beat = store.node_heartbeat(node("n1")).await;
    let took = t.elapsed();
    locker.batch_execute("COMMIT").await.unwrap();
    assert!(matches!(beat, Ok(true)), "{beat:?}");
    assert!(
        took < Duration::from_secs(2),
        "the heartbeat waited {took:?} behind dashboard reads"
    );
    for p in pages {
        let page: Result<_, StoreError> = p.await.unwrap();
        assert!(page.is_ok(), "{page:?}");
    }
    assert!(connections_of(&guard.url, &guard.schema).await <= 3);
}
