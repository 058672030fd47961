//! Workflows end to end: a DAG of 1,000 tasks (diamonds) runs in dependency
//! order with results flowing to children, and a failed parent applies its
//! children's policy. Run on SQLite and on PostgreSQL.

mod fixtures;

use std::sync::Arc;
use std::time::Duration;

use proto_tasker::task::{Dependency, OnDependencyFailure};
use proto_tasker::{
    Builder, NewTask, Store, TaskError, TaskOptions, TaskRegistry, TaskState, executor_fn,
};
use serde_json::{Value, json};

fn registry() -> TaskRegistry {
    let mut r = TaskRegistry::new();
    r.register(
        "step",
        executor_fn(|ctx| async move {
            let parents: Vec<i64> = ctx
                .parent_results
                .values()
                .map(|v| v.as_i64().unwrap_or(0))
                .collect();
            let op = ctx.args["op"].as_str().unwrap_or_default().to_string();
            let out = match op.as_str() {
                "one" => 1,
                "plus1" => parents[0] + 1,
                "times10" => parents[0] * 10,
                "sum" => parents.iter().sum(),
                "fail" => return Err(TaskError::discard("this step fails")),
                _ => return Err(TaskError::discard(format!("unknown op {op}"))),
            };
            Ok(json!(out))
        }),
    );
    r
}

fn step(op: &str, deps: &[usize]) -> NewTask {
    let mut o = TaskOptions::default();
    for d in deps {
        o = o.depends_on(Dependency::Batch(*d));
    }
    NewTask::new("step", json!({"op": op})).with(o)
}

async fn dag_runs_in_order(store: Arc<dyn Store>) {
    let pool = Builder::new(store.clone(), registry())
        .queue("default", 16)
        .poll_interval(Duration::from_millis(50))
        .build()
        .unwrap();
    let client = pool.client();
    // 250 diamonds: a -> (b, c) -> d, listed children first to show order does not matter.
    let mut batch = Vec::new();
    for k in 0..250 {
        let base = 4 * k;
        batch.push(step("sum", &[base + 1, base + 2]));
        batch.push(step("plus1", &[base + 3]));
        batch.push(step("times10", &[base + 3]));
        batch.push(step("one", &[]));
    }
    // One diamond whose root fails: the cancel policy, and the fail policy for the sink.
    let f = batch.len();
    batch.push(
        NewTask::new("step", json!({"op": "fail"})).with(TaskOptions::default().max_attempts(1)),
    );
    batch.push(step("plus1", &[f]));
    batch.push(step("times10", &[f]));
    batch.push(
        NewTask::new("step", json!({"op": "sum"})).with(
            TaskOptions::default()
                .depends_on(Dependency::Batch(f + 1))
                .depends_on(Dependency::Batch(f + 2))
                .on_dependency_failure(OnDependencyFailure::Fail),
        ),
    );
    let inserted = client.insert_many(batch).await.unwrap();
    assert_eq!(inserted.len(), 1004);
    assert_eq!(inserted[0].task.state, TaskState::Blocked);
    assert_eq!(inserted[3].task.state, TaskState::Available);
    pool.start().await.unwrap();
    let ids: Vec<_> = inserted.iter().map(|i| i.task.id).collect();
    for id in &ids {
        client.wait(*id, Duration::from_secs(120)).await.unwrap();
    }
    let mut tasks = Vec::new();
    for id in &ids {
        tasks.push(client.get(*id).await.unwrap().unwrap());
    }
    for k in 0..250 {
        let (d, b, c, a) = (
            &tasks[4 * k],
            &tasks[4 * k + 1],
            &tasks[4 * k + 2],
            &tasks[4 * k + 3],
        );
        for t in [a, b, c, d] {
            assert_eq!(t.state, TaskState::Completed, "{t:?}");
        }
        assert_eq!(b.result, Some(json!(2)));
        assert_eq!(c.result, Some(json!(10)));
        assert_eq!(d.result, Some(Value::from(12)), "results flow to children");
        for (child, parents) in [(b, vec![a]), (c, vec![a]), (d, vec![b, c])] {
            for p in parents {
                assert!(
                    child.started_at >= p.finished_at,
                    "task {} started before its parent {} finished",
                    child.id,
                    p.id
                );
            }
        }
    }
    let (root, b, c, sink) = (&tasks[f], &tasks[f + 1], &tasks[f + 2], &tasks[f + 3]);
    assert_eq!(root.state, TaskState::Failed);
    assert_eq!(
        (b.state, c.state),
        (TaskState::Cancelled, TaskState::Cancelled)
    );
    assert_eq!(sink.state, TaskState::Failed, "its policy is fail");
    assert_eq!(sink.attempt, 0, "never ran");
    pool.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_of_1000_tasks_runs_in_dependency_order_on_sqlite() {
    let (store, _d) = fixtures::sqlite_store().await;
    dag_runs_in_order(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dag_of_1000_tasks_runs_in_dependency_order_on_postgres() {
    let (store, _g) = fixtures::pg_store().await;
    dag_runs_in_order(store).await;
}
