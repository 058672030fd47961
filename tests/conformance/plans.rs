//! Conformance case: the dashboard's reads stay index walks with a million
//! tasks in the store. Each store explains the exact queries it runs
//! (`explain`), and every access to `tasks` must be an index search that
//! stops at the page size or the count cap, never a scan of the table or a
//! sort of all its rows. The timings printed are for the record (see
//! docs/benchmarks.md), not asserted.

use std::time::Instant;

use proto_tasker::store::{DashboardRead, ListParams};
use proto_tasker::{Store, TaskState};

use crate::fixtures::{Backend, BackendKind};

const ROWS: i64 = 1_000_000;

/// The list pages the dashboard shows: (name, params, merges per-state
/// or per-queue ranges: there is no index on (state, id), so one state
/// across queues is each queue's newest page, merged).
fn reads() -> Vec<(&'static str, DashboardRead, bool)> {
    let list = |state: Option<TaskState>, queue: Option<&str>, kind: Option<&str>, cursor: bool| {
        DashboardRead::TaskList(ListParams {
            state,
            queue: queue.map(String::from),
            kind: kind.map(String::from),
            before: cursor.then_some(proto_tasker::TaskId(ROWS / 2)),
            limit: 50,
            ..Default::default()
        })
    };
    let tagged = |state: Option<TaskState>, cursor: bool| {
        DashboardRead::TaskList(ListParams {
            state,
            tag: Some("customer:10".into()),
            before: cursor.then_some(proto_tasker::TaskId(ROWS / 2)),
            limit: 50,
            ..Default::default()
        })
    };
    vec![
        (
            "dead letters",
            list(Some(TaskState::Failed), None, None, false),
            true,
        ),
        (
            "dead letters, page 2",
            list(Some(TaskState::Failed), None, None, true),
            true,
        ),
        (
            "one state",
            list(Some(TaskState::Available), None, None, true),
            true,
        ),
        ("one queue", list(None, Some("q1"), None, false), true),
        (
            "one queue, page 2",
            list(None, Some("q1"), None, true),
            true,
        ),
        (
            "queue and state",
            list(Some(TaskState::Completed), Some("q2"), None, true),
            false,
        ),
        ("one kind", list(None, None, Some("k3"), true), false),
        (
            "kind and state",
            list(Some(TaskState::Failed), None, Some("k3"), false),
            true,
        ),
        ("one tag", tagged(None, false), false),
        ("one tag, page 2", tagged(None, true), false),
        (
            "tag and state",
            tagged(Some(TaskState::Completed), true),
            false,
        ),
        ("queue counts", DashboardRead::QueueCounts, false),
        (
            "queue lag",
            DashboardRead::QueueLag(chrono::Utc::now()),
            false,
        ),
    ]
}

/// SQLite's plan lines: every step on `tasks` is a SEARCH through an index.
fn check_sqlite(name: &str, plan: &[String], merges: bool) {
    for line in plan {
        if (line.contains("tasks") || line.contains("task_tags")) && !line.contains("CONSTANT") {
            assert!(
                (line.starts_with("SEARCH tasks USING")
                    && (line.contains("INDEX") || line.contains("INTEGER PRIMARY KEY")))
                    || line.starts_with("SEARCH task_tags USING PRIMARY KEY"),
                "{name}: {line} in {plan:#?}"
            );
        }
        // Only the merge of the per-state or per-queue pages (at most 8 or
        // 200 x 50 rows) sorts.
        if line.contains("TEMP B-TREE") {
            assert!(
                merges && line.contains("ORDER BY"),
                "{name}: {line} in {plan:#?}"
            );
        }
    }
}

/// PostgreSQL's plan: no sequential or bitmap scan of tasks, and no sort
/// except the merge of the per-state pages.
fn check_postgres(name: &str, plan: &[String], merges: bool) {
    for line in plan {
        assert!(
            !line.contains("Seq Scan on task") && !line.contains("Bitmap Heap Scan on task"),
            "{name}: {line} in {plan:#?}"
        );
        if line.contains("Sort") && !merges {
            panic!("{name}: {line} in {plan:#?}");
        }
    }
    assert!(
        plan.iter().any(|l| l.contains("Index")),
        "{name}: {plan:#?}"
    );
}

async fn run(store: &dyn Store, read: DashboardRead) -> usize {
    match read {
        DashboardRead::TaskList(p) => store.task_list(p).await.unwrap().len(),
        DashboardRead::QueueCounts => store.queue_counts().await.unwrap().len(),
        DashboardRead::QueueLag(now) => store.queue_oldest_due(now).await.unwrap().len(),
    }
}

pub async fn dashboard_reads_use_indexes_with_a_million_tasks(b: &Backend) {
    let _heavy = crate::fixtures::heavy().await;
    let t = Instant::now();
    b.execute_sql(
        &format!(
            "BEGIN;
             WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < {ROWS})
             INSERT INTO tasks (kind, queue, args, priority, state, attempt, max_attempts,
                                run_at, created_at, started_at, finished_at, node, errors)
             SELECT 'k' || (i % 7), 'q' || (i % 4), '{{\"n\":' || i || '}}', 0,
                    CASE WHEN i % 100 = 0 THEN 'failed' WHEN i % 50 = 1 THEN 'available'
                         WHEN i % 1000 = 7 THEN 'running' ELSE 'completed' END,
                    1, 3, 1700000000000000 + i, 1700000000000000 + i, 1700000000000000 + i,
                    1700000000000000 + i + 500, 'n1', '[]'
             FROM n;
             INSERT INTO task_tags (tag, task_id)
             SELECT 'customer:' || (id % 100), id FROM tasks WHERE id % 10 = 0;
             COMMIT;
             ANALYZE;"
        ),
        &[
            &format!(
            "INSERT INTO {{schema}}.tasks (kind, queue, args, priority, state, attempt, max_attempts,
                                    run_at, created_at, started_at, finished_at, node, errors)
             SELECT 'k' || (i % 7), 'q' || (i % 4), jsonb_build_object('n', i), 0,
                    CASE WHEN i % 100 = 0 THEN 'failed' WHEN i % 50 = 1 THEN 'available'
                         WHEN i % 1000 = 7 THEN 'running' ELSE 'completed' END,
                    1, 3, now(), now(), now(), now(), 'n1', '[]'
             FROM generate_series(1, {ROWS}) AS i"
            ),
            "INSERT INTO {schema}.task_tags (tag, task_id)
             SELECT 'customer:' || (id % 100), id FROM {schema}.tasks WHERE id % 10 = 0",
            "VACUUM ANALYZE {schema}.tasks",
            "VACUUM ANALYZE {schema}.task_tags",
        ],
    )
    .await;
    let store = &b.store;
    eprintln!("{:?}: {ROWS} rows in {:?}", b.kind, t.elapsed());
    for (name, read, merges) in reads() {
        let plan = b.explain(read.clone()).await;
        match b.kind {
            BackendKind::Sqlite => check_sqlite(name, &plan, merges),
            BackendKind::Postgres => check_postgres(name, &plan, merges),
        }
        let t = Instant::now();
        let n = run(&**store, read).await;
        eprintln!("{:?} {name}: {n} rows in {:?}", b.kind, t.elapsed());
    }
    let counts = store.queue_counts().await.unwrap();
    let completed_q0 = counts
        .iter()
        .find(|(q, s, _)| q == "q0" && *s == TaskState::Completed)
        .unwrap()
        .2;
    assert_eq!(
        completed_q0,
        proto_tasker::store::FINISHED_COUNT_CAP,
        "capped"
    );
}
