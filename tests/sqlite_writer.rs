//! The SQLite store's one writer thread survives what goes wrong inside it:
//! a write that panics rolls back alone, and a database locked by another
//! process fails each waiting write once, not once per write.

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::Utc;
use proto_tasker::store::{SqliteOptions, Synchronous};
use proto_tasker::{SqliteStore, Store};

mod fixtures;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panicking_write_rolls_back_alone_and_the_writer_goes_on() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteStore::open(SqliteOptions::new(dir.path().join("w.db"))).unwrap();
    store.migrate().await.unwrap();
    let e = store.write_that_panics().await.unwrap_err();
    assert!(e.to_string().contains("write was lost"), "{e}");
    store.ready().await.unwrap();
    let now = Utc::now();
    let got = store
        .task_insert_many(vec![fixtures::insert("a", "q", 0, now)], now)
        .await
        .unwrap();
    assert_eq!(got.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_locked_database_fails_waiting_writes_together() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("w.db");
    let mut o = SqliteOptions::new(&path);
    o.synchronous = Synchronous::Normal;
    o.busy_timeout = Duration::from_millis(300);
    let store = Arc::new(SqliteStore::open(o).unwrap());
    store.migrate().await.unwrap();
    // Another process takes the write lock and keeps it.
    let other = rusqlite::Connection::open(&path).unwrap();
    other.execute_batch("BEGIN IMMEDIATE").unwrap();
    let started = Instant::now();
    let writes: Vec<_> = (0..30)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move {
                let now = Utc::now();
                s.task_insert_many(vec![fixtures::insert("a", "q", 0, now)], now)
                    .await
            })
        })
        .collect();
    for w in writes {
        let e = w.await.unwrap().unwrap_err();
        assert!(e.is_transient(), "a busy database may pass: {e}");
    }
    let took = started.elapsed();
    // One busy timeout per group of waiting writes, not one per write
    // (30 x 300 ms = 9 s when each write waited out its own).
    assert!(took < Duration::from_secs(3), "{took:?}");
    other.execute_batch("COMMIT").unwrap();
    let now = Utc::now();
    store
        .task_insert_many(vec![fixtures::insert("a", "q", 0, now)], now)
        .await
        .unwrap();
}
