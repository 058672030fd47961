//! Conformance cases for cluster-wide concurrency and rate limits, held
//! across three pools (nodes) that share one store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use proto_tasker::store::QueueLimits;
use proto_tasker::{Builder, NewTask, Store, TaskOptions, TaskRegistry, WorkerPool, executor_fn};
use serde_json::json;

use crate::fixtures::Backend;

type Log = Arc<Mutex<Vec<(String, Instant, Instant)>>>;

fn registry(log: Log, hold: Duration) -> TaskRegistry {
    let mut r = TaskRegistry::new();
    r.register(
        "work",
        executor_fn(move |ctx| {
            let log = log.clone();
            async move {
                let start = Instant::now();
                tokio::time::sleep(hold).await;
                let key = ctx.args["key"].as_str().unwrap_or_default().to_string();
                log.lock().unwrap().push((key, start, Instant::now()));
                Ok(json!(null))
            }
        }),
    );
    r
}

/// The most intervals of `log` (filtered by `key`) open at one instant.
fn max_overlap(log: &[(String, Instant, Instant)], key: Option<&str>) -> usize {
    let mut events: Vec<(Instant, i32)> = Vec::new();
    for (k, s, e) in log {
        if key.is_none_or(|want| want == k) {
            events.push((*s, 1));
            events.push((*e, -1));
        }
    }
    // Ends before starts at the same instant: touching intervals do not overlap.
    events.sort_by_key(|(t, d)| (*t, *d));
    let (mut cur, mut max) = (0i32, 0i32);
    for (_, d) in events {
        cur += d;
        max = max.max(cur);
    }
    max as usize
}

async fn three_nodes(
    stores: &[Arc<dyn Store>],
    log: &Log,
    hold: Duration,
    limits: QueueLimits,
) -> Vec<WorkerPool> {
    let mut pools = Vec::new();
    for (i, st) in stores.iter().enumerate() {
        let p = Builder::new(st.clone(), registry(log.clone(), hold))
            .node_name(format!("node-{i}"))
            .queue("limited", 4)
            .queue_limits("limited", limits)
            .poll_interval(Duration::from_millis(50))
            .build()
            .unwrap();
        pools.push(p);
    }
    pools
}

async fn run_all(pools: &[WorkerPool], tasks: Vec<NewTask>) {
    let client = pools[0].client();
    let ids: Vec<_> = client
        .insert_many(tasks)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.task.id)
        .collect();
    for p in pools {
        p.start().await.unwrap();
    }
    for id in ids {
        client.wait(id, Duration::from_secs(60)).await.unwrap();
    }
    for p in pools {
        p.shutdown().await;
    }
}

fn client_of(store: &Arc<dyn Store>) -> proto_tasker::Client {
    proto_tasker::Client::new(store.clone(), Arc::new(TaskRegistry::new()))
}

fn task(key: &str) -> NewTask {
    NewTask::new("work", json!({"key": key}))
        .with(TaskOptions::default().queue("limited").concurrency_key(key))
}

pub async fn limits_per_key_and_global_hold_across_nodes(b: &Backend) {
    let _quiet = crate::fixtures::timing_sensitive().await;
    let stores = b.nodes(3).await;
    let log: Log = Arc::default();
    let limits = QueueLimits {
        round_robin: false,
        per_key_concurrency: Some(2),
        ..Default::default()
    };
    let pools = three_nodes(&stores, &log, Duration::from_millis(30), limits).await;
    let tasks = (0..60)
        .map(|i| task(["acme", "globex", "initech"][i % 3]))
        .collect();
    run_all(&pools, tasks).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(l.len(), 60);
    for key in ["acme", "globex", "initech"] {
        assert_eq!(
            max_overlap(&l, Some(key)),
            2,
            "per-key limit of 2 for {key}, reached but never exceeded"
        );
    }
    assert!(
        max_overlap(&l, None) > 2,
        "other keys ran beside each other"
    );

    // A global limit of 3 over 3 nodes x 4 workers. The first pools
    // stored their limits for the queue; a node's own are only starting
    // values, so the change is made as an operator would, at run time.
    let log: Log = Arc::default();
    let limits = QueueLimits {
        round_robin: false,
        global_concurrency: Some(3),
        ..Default::default()
    };
    client_of(&stores[0])
        .queue_set_settings(
            "limited",
            proto_tasker::store::QueueSettings::default().with_limits(&limits),
        )
        .await
        .unwrap();
    let pools = three_nodes(&stores, &log, Duration::from_millis(30), limits).await;
    run_all(&pools, (0..45).map(|_| task("any")).collect()).await;
    let l = log.lock().unwrap().clone();
    assert_eq!(
        max_overlap(&l, None),
        3,
        "global limit of 3, reached but never exceeded"
    );
}

/// A key at its limit with a deep backlog must not starve the keys queued
/// behind it.
pub async fn limits_a_saturated_key_does_not_starve_others(b: &Backend) {
    let _quiet = crate::fixtures::timing_sensitive().await;
    let stores = b.nodes(3).await;
    let log: Log = Arc::default();
    let limits = QueueLimits {
        round_robin: false,
        per_key_concurrency: Some(1),
        ..Default::default()
    };
    let pools = three_nodes(&stores[..1], &log, Duration::from_millis(20), limits).await;
    // 150 x 20 ms one at a time: the big key alone takes about 3 s.
    let mut tasks: Vec<NewTask> = (0..150).map(|_| task("big")).collect();
    tasks.extend((0..5).map(|_| task("small")));
    run_all(&pools, tasks).await;
    let l = log.lock().unwrap().clone();
    let first_big = l
        .iter()
        .filter(|e| e.0 == "big")
        .map(|e| e.1)
        .min()
        .unwrap();
    let last_small = l
        .iter()
        .filter(|e| e.0 == "small")
        .map(|e| e.2)
        .max()
        .unwrap();
    assert!(
        last_small - first_big < Duration::from_millis(1000),
        "the small key ran beside the big one, not after its backlog: {:?}",
        last_small - first_big
    );
    assert_eq!(max_overlap(&l, Some("big")), 1);
    assert_eq!(max_overlap(&l, Some("small")), 1);
}

pub async fn limits_rate_holds_across_nodes(b: &Backend) {
    let _quiet = crate::fixtures::timing_sensitive().await;
    let stores = b.nodes(3).await;
    let log: Log = Arc::default();
    let limits = QueueLimits {
        round_robin: false,
        rate: Some((20, Duration::from_secs(1))),
        ..Default::default()
    };
    let pools = three_nodes(&stores, &log, Duration::ZERO, limits).await;
    run_all(&pools, (0..80).map(|_| task("r")).collect()).await;
    let l = log.lock().unwrap().clone();
    let first = l.iter().map(|e| e.1).min().unwrap();
    let in_3s = l
        .iter()
        .filter(|e| e.1 < first + Duration::from_secs(3))
        .count();
    assert!(
        (54..=66).contains(&in_3s),
        "20 starts/s for 3 s is 60 within 10%: {in_3s}"
    );
}
