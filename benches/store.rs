//! Hot paths of the SQLite store: bulk insert, and one claim + complete cycle.
//!
//! `cargo bench --bench store`. The end-to-end figures come from
//! `proto_tasker bench`; these isolate the store calls.

use std::sync::Arc;

use chrono::Utc;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use proto_tasker::store::{
    ClaimParams, Completion, Outcome, SqliteOptions, Synchronous, TaskInsert,
};
use proto_tasker::{SqliteStore, Store};

fn row() -> TaskInsert {
    TaskInsert {
        max_attempts: 3,
        ..TaskInsert::plain("noop", "bench", serde_json::Value::Null, Utc::now())
    }
}

fn store(dir: &tempfile::TempDir, rt: &tokio::runtime::Runtime) -> Arc<dyn Store> {
    let mut o = SqliteOptions::new(dir.path().join("bench.db"));
    o.synchronous = Synchronous::Full;
    let s: Arc<dyn Store> = Arc::new(SqliteStore::open(o).expect("open"));
    rt.block_on(s.migrate()).expect("migrate");
    s
}

fn benches(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let s = store(&dir, &rt);

    let mut g = c.benchmark_group("insert");
    for batch in [1usize, 100, 1000] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &n| {
            b.to_async(&rt).iter(|| {
                let s = s.clone();
                async move {
                    s.task_insert_many((0..n).map(|_| row()).collect(), Utc::now())
                        .await
                        .expect("insert")
                }
            })
        });
    }
    g.finish();

    let mut g = c.benchmark_group("claim_complete");
    for batch in [1usize, 100] {
        g.throughput(Throughput::Elements(batch as u64));
        g.bench_with_input(BenchmarkId::from_parameter(batch), &batch, |b, &n| {
            b.to_async(&rt).iter(|| {
                let s = s.clone();
                async move {
                    let claimed = s
                        .task_claim(ClaimParams {
                            queue: "bench".into(),
                            node: "bench".into(),
                            limit: n,
                            now: Utc::now(),
                            limits: None,
                            room: None,
                        })
                        .await
                        .expect("claim");
                    let done = claimed
                        .into_iter()
                        .map(|t| Completion {
                            id: t.id,
                            attempt: t.attempt,
                            token: t.claim_token,
                            at: Utc::now(),
                            outcome: Outcome::Completed {
                                result: serde_json::Value::Null,
                            },
                        })
                        .collect();
                    s.task_complete_many(done).await.expect("complete")
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = store_benches;
    config = Criterion::default().sample_size(20);
    targets = benches
}
criterion_main!(store_benches);
