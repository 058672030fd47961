//! One conformance suite for every store: each case is a function over a
//! [`Backend`] (a store, and how to open more handles onto its data), run
//! once per store by the `conformance!` macro below. The cases of the life
//! cycle are in `mod cases` here; cluster-wide limits across nodes and the
//! dashboard's query plans in `conformance/`.

mod fixtures;
#[path = "conformance/limits.rs"]
mod limits;
#[path = "conformance/plans.rs"]
mod plans;

use std::collections::HashSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use proto_tasker::store::{
    ClaimParams, Completion, ListParams, NodeInfo, Outcome, PruneParams, RescueParams,
    ScheduleFire, StoreEvent,
};
use proto_tasker::{StoreError, TaskState};

use fixtures::{Backend, insert};

fn secs(n: i64) -> chrono::Duration {
    chrono::Duration::seconds(n)
}

/// Now, at the microsecond precision stores keep.
fn now() -> DateTime<Utc> {
    proto_tasker::store::truncate_micros(Utc::now())
}

fn claim(queue: &str, node: &str, limit: usize, now: DateTime<Utc>) -> ClaimParams {
    ClaimParams {
        queue: queue.into(),
        node: node.into(),
        limit,
        now,
        limits: None,
        room: None,
    }
}

fn node(name: &str, at: DateTime<Utc>) -> NodeInfo {
    fixtures::node_info(name, at)
}

/// Complete every one of `tasks` (as claimed) with result 1.
async fn complete_all(
    s: &std::sync::Arc<dyn proto_tasker::Store>,
    tasks: &[proto_tasker::Task],
    now: DateTime<Utc>,
) {
    let done = tasks
        .iter()
        .map(|t| {
            Completion::of(
                t,
                now,
                Outcome::Completed {
                    result: serde_json::json!(1),
                },
            )
        })
        .collect();
    s.task_complete_many(done).await.unwrap();
}

/// Insert `rows` and return their ids, in order.
async fn insert_ids(
    s: &std::sync::Arc<dyn proto_tasker::Store>,
    rows: Vec<proto_tasker::store::TaskInsert>,
    now: DateTime<Utc>,
) -> Vec<proto_tasker::TaskId> {
    s.task_insert_many(rows, now)
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.task.id)
        .collect()
}

pub mod cases {
    use super::*;

    pub async fn claim_orders_by_priority_then_run_at(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let rows = vec![
            insert("a", "q", 5, now - secs(1)),
            insert("b", "q", 1, now - secs(1)),
            insert("c", "q", 1, now - secs(5)),
            insert("d", "q", 0, now),
            insert("other-queue", "other", 0, now - secs(9)),
        ];
        s.task_insert_many(rows, now).await.unwrap();
        let got = s.task_claim(claim("q", "n1", 10, now)).await.unwrap();
        let kinds: Vec<_> = got.iter().map(|t| t.kind.as_str()).collect();
        assert_eq!(kinds, ["d", "c", "b", "a"]);
        assert!(
            got.iter()
                .all(|t| t.state == TaskState::Running && t.attempt == 1)
        );
        assert!(got.iter().all(|t| t.node.as_deref() == Some("n1")));
        // Limit is honoured.
        let rows = (0..5).map(|_| insert("x", "q2", 0, now)).collect();
        s.task_insert_many(rows, now).await.unwrap();
        assert_eq!(
            s.task_claim(claim("q2", "n1", 2, now)).await.unwrap().len(),
            2
        );
        assert_eq!(
            s.task_claim(claim("q2", "n1", 10, now))
                .await
                .unwrap()
                .len(),
            3
        );
        assert!(
            s.task_claim(claim("q2", "n1", 10, now))
                .await
                .unwrap()
                .is_empty()
        );
    }

    pub async fn concurrent_claimers_never_share_a_task(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let n = 2000;
        let rows = (0..n).map(|_| insert("x", "q", 0, now)).collect();
        s.task_insert_many(rows, now).await.unwrap();
        let mut handles = Vec::new();
        for c in 0..8 {
            let s = s.clone();
            handles.push(tokio::spawn(async move {
                let mut mine = Vec::new();
                loop {
                    let got = s
                        .task_claim(claim("q", &format!("n{c}"), 7, Utc::now()))
                        .await
                        .unwrap();
                    if got.is_empty() {
                        return mine;
                    }
                    mine.extend(got.into_iter().map(|t| t.id));
                }
            }));
        }
        let mut all = Vec::new();
        for h in handles {
            all.extend(h.await.unwrap());
        }
        let unique: HashSet<_> = all.iter().collect();
        assert_eq!(all.len(), n, "every task claimed once");
        assert_eq!(unique.len(), n, "no task claimed twice");
    }

    pub async fn delayed_tasks_are_not_claimed_early(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let t = s
            .task_insert_many(vec![insert("later", "q", 0, now + secs(60))], now)
            .await
            .unwrap();
        assert_eq!(t[0].task.state, TaskState::Scheduled);
        assert!(
            s.task_claim(claim("q", "n", 10, now))
                .await
                .unwrap()
                .is_empty()
        );
        assert!(
            s.task_claim(claim("q", "n", 10, now + secs(59)))
                .await
                .unwrap()
                .is_empty()
        );
        let got = s
            .task_claim(claim("q", "n", 10, now + secs(60)))
            .await
            .unwrap();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].id, t[0].task.id);
    }

    pub async fn retries_follow_the_backoff(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        s.task_insert_many(vec![insert("flaky", "q", 0, now)], now)
            .await
            .unwrap();
        let t = s
            .task_claim(claim("q", "n", 1, now))
            .await
            .unwrap()
            .remove(0);
        let retry_at = now + secs(30);
        let applied = s
            .task_complete_many(vec![Completion {
                id: t.id,
                attempt: 1,
                token: 1,
                at: now,
                outcome: Outcome::Retry {
                    run_at: retry_at,
                    error: "boom".into(),
                },
            }])
            .await
            .unwrap();
        assert_eq!(applied, [true]);
        let got = s.task_get(t.id).await.unwrap().unwrap();
        assert_eq!(got.state, TaskState::Retryable);
        assert_eq!(got.run_at, retry_at);
        assert_eq!(got.errors.len(), 1);
        assert_eq!(got.errors[0].message, "boom");
        assert_eq!(got.errors[0].attempt, 1);
        assert!(
            s.task_claim(claim("q", "n", 1, now + secs(29)))
                .await
                .unwrap()
                .is_empty()
        );
        let again = s.task_claim(claim("q", "n", 1, retry_at)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].attempt, 2);
        // Last attempt fails for good: dead-letter, finished_at set.
        s.task_complete_many(vec![Completion {
            id: t.id,
            attempt: 2,
            token: 2,
            at: retry_at,
            outcome: Outcome::Failed {
                error: "still broken".into(),
            },
        }])
        .await
        .unwrap();
        let dead = s.task_get(t.id).await.unwrap().unwrap();
        assert_eq!(dead.state, TaskState::Failed);
        assert_eq!(dead.errors.len(), 2);
        assert!(dead.finished_at.is_some());
        let listed = s
            .task_list(ListParams {
                state: Some(TaskState::Failed),
                limit: 10,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(listed.len(), 1);
    }

    pub async fn unique_keys_dedupe_unfinished_tasks(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let one = |t: proto_tasker::store::TaskInsert| {
            let s = s.clone();
            async move { s.task_insert_many(vec![t], now).await.unwrap().remove(0) }
        };
        let mut a = insert("u", "q", 0, now);
        a.unique_key = Some("k1".into());
        let first = one(a.clone()).await;
        assert!(!first.existing);
        let second = one(a.clone()).await;
        assert!(second.existing);
        assert_eq!(second.task.id, first.task.id);
        // Duplicates inside one batch collapse too.
        let mut b = insert("u", "q", 0, now);
        b.unique_key = Some("k2".into());
        let batch = s
            .task_insert_many(vec![b.clone(), b.clone()], now)
            .await
            .unwrap();
        assert_eq!(batch[0].task.id, batch[1].task.id);
        assert!(batch[1].existing);
        // Still unique while running.
        let running = s.task_claim(claim("q", "n", 10, now)).await.unwrap();
        assert_eq!(running.len(), 2);
        assert!(s.task_insert_many(vec![a.clone()], now).await.unwrap()[0].existing);
        // Once finished, the key is free again.
        s.task_complete_many(vec![Completion {
            id: first.task.id,
            attempt: 1,
            token: 1,
            at: now,
            outcome: Outcome::Completed {
                result: serde_json::json!(1),
            },
        }])
        .await
        .unwrap();
        let third = s.task_insert_many(vec![a], now).await.unwrap().remove(0);
        assert!(!third.existing);
        assert_ne!(third.task.id, first.task.id);
        // A key is held per kind: another kind with the same key is another
        // task, and the two kinds keep deduplicating apart.
        let mut other = insert("v", "q", 0, now);
        other.unique_key = Some("k1".into());
        let v = one(other.clone()).await;
        assert!(!v.existing, "kind v does not share kind u's key");
        assert_eq!(v.task.kind, "v");
        let again = one(other).await;
        assert!(again.existing);
        assert_eq!(again.task.id, v.task.id);
    }

    pub async fn cancel_stops_queued_and_flags_running(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let ids = insert_ids(
            &s,
            vec![insert("a", "q", 0, now), insert("b", "q", 1, now)],
            now,
        )
        .await;
        let mut events = s.subscribe();
        let running = s
            .task_claim(claim("q", "n1", 1, now))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(running.id, ids[0]);
        // Queued task: cancelled at once and never claimed.
        let c = s.task_cancel(ids[1], now).await.unwrap();
        assert_eq!(c.state, TaskState::Cancelled);
        assert!(
            s.task_claim(claim("q", "n1", 10, now))
                .await
                .unwrap()
                .is_empty()
        );
        // Running task: stays running, its node hears about it.
        let c = s.task_cancel(ids[0], now).await.unwrap();
        assert_eq!(c.state, TaskState::Running);
        // The queued task's cancel announced its finish first.
        let ev = loop {
            let ev = tokio::time::timeout(Duration::from_secs(5), events.recv())
                .await
                .unwrap()
                .unwrap();
            match ev {
                StoreEvent::Finished { ids: f } => assert_eq!(&*f, [ids[1]]),
                ev => break ev,
            }
        };
        assert_eq!(
            ev,
            StoreEvent::CancelRequested {
                id: ids[0],
                node: Some("n1".into())
            }
        );
        assert_eq!(s.task_cancel_requested("n1").await.unwrap(), [(ids[0], 1)]);
        assert!(s.task_cancel_requested("n2").await.unwrap().is_empty());
        s.task_complete_many(vec![Completion {
            id: ids[0],
            attempt: 1,
            token: 1,
            at: now,
            outcome: Outcome::Cancelled {
                error: "cancelled".into(),
            },
        }])
        .await
        .unwrap();
        assert_eq!(
            s.task_get(ids[0]).await.unwrap().unwrap().state,
            TaskState::Cancelled
        );
        // Finished: conflict. Unknown: not found.
        assert!(matches!(
            s.task_cancel(ids[0], now).await,
            Err(StoreError::Conflict { .. })
        ));
        assert!(matches!(
            s.task_cancel(proto_tasker::TaskId(999_999), now).await,
            Err(StoreError::NotFound(_))
        ));
    }

    pub async fn retry_by_hand_revives_dead_tasks(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let mut row = insert("x", "q", 0, now);
        row.max_attempts = 1;
        let id = s.task_insert_many(vec![row], now).await.unwrap()[0].task.id;
        s.task_claim(claim("q", "n", 1, now)).await.unwrap();
        s.task_complete_many(vec![Completion {
            id,
            attempt: 1,
            token: 1,
            at: now,
            outcome: Outcome::Failed { error: "no".into() },
        }])
        .await
        .unwrap();
        let t = s.task_retry(id, now).await.unwrap();
        assert_eq!(t.state, TaskState::Available);
        assert_eq!(t.max_attempts, 2, "one more attempt granted");
        assert!(t.finished_at.is_none());
        let again = s.task_claim(claim("q", "n", 1, now)).await.unwrap();
        assert_eq!(again[0].attempt, 2);
        assert!(matches!(
            s.task_retry(id, now).await,
            Err(StoreError::Conflict { .. })
        ));
    }

    pub async fn completions_are_fenced_by_attempt(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let id = s
            .task_insert_many(vec![insert("x", "q", 0, now)], now)
            .await
            .unwrap()[0]
            .task
            .id;
        s.task_claim(claim("q", "n", 1, now)).await.unwrap();
        let stale = Completion {
            id,
            attempt: 7,
            token: 7,
            at: now,
            outcome: Outcome::Completed {
                result: serde_json::json!("late"),
            },
        };
        assert_eq!(s.task_complete_many(vec![stale]).await.unwrap(), [false]);
        assert_eq!(
            s.task_get(id).await.unwrap().unwrap().state,
            TaskState::Running
        );
        let ok = Completion {
            id,
            attempt: 1,
            token: 1,
            at: now,
            outcome: Outcome::Completed {
                result: serde_json::json!({"v": 1}),
            },
        };
        assert_eq!(
            s.task_complete_many(vec![ok.clone()]).await.unwrap(),
            [true]
        );
        // A second write of the same attempt is refused: the task is no longer running.
        assert_eq!(s.task_complete_many(vec![ok]).await.unwrap(), [false]);
        let t = s.task_get(id).await.unwrap().unwrap();
        assert_eq!(t.state, TaskState::Completed);
        assert_eq!(t.result, Some(serde_json::json!({"v": 1})));
    }

    pub async fn snooze_and_release_do_not_use_attempts(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let ids: Vec<_> = s
            .task_insert_many(
                vec![insert("a", "q", 0, now), insert("b", "q", 1, now)],
                now,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.task.id)
            .collect();
        s.task_claim(claim("q", "n", 2, now)).await.unwrap();
        s.task_complete_many(vec![
            Completion {
                id: ids[0],
                attempt: 1,
                token: 1,
                at: now,
                outcome: Outcome::Snoozed {
                    run_at: now + secs(10),
                },
            },
            Completion {
                id: ids[1],
                attempt: 1,
                token: 1,
                at: now,
                outcome: Outcome::Released,
            },
        ])
        .await
        .unwrap();
        let a = s.task_get(ids[0]).await.unwrap().unwrap();
        assert_eq!((a.state, a.attempt), (TaskState::Scheduled, 0));
        let b = s.task_get(ids[1]).await.unwrap().unwrap();
        assert_eq!((b.state, b.attempt), (TaskState::Available, 0));
        let again = s.task_claim(claim("q", "n", 5, now)).await.unwrap();
        assert_eq!(again.len(), 1);
        assert_eq!((again[0].id, again[0].attempt), (ids[1], 1));
    }

    pub async fn rescue_returns_tasks_of_dead_nodes_once(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        s.node_heartbeat(node("live", now)).await.unwrap();
        s.node_heartbeat(node("dead", now - secs(60)))
            .await
            .unwrap();
        let mut last = insert("x", "q", 0, now);
        last.max_attempts = 1;
        let rows = vec![insert("x", "q", 0, now), insert("x", "q", 0, now), last];
        s.task_insert_many(rows, now).await.unwrap();
        let on_live = s.task_claim(claim("q", "live", 1, now)).await.unwrap();
        let on_dead = s.task_claim(claim("q", "dead", 2, now)).await.unwrap();
        let params = RescueParams {
            now,
            node_timeout: Duration::from_secs(15),
            node: None,
            keep: Vec::new(),
            started_before: None,
        };
        let rescued = s.node_rescue(params.clone()).await.unwrap();
        let ids: HashSet<_> = rescued.iter().map(|r| r.id).collect();
        assert_eq!(ids, on_dead.iter().map(|t| t.id).collect());
        for r in &rescued {
            let t = s.task_get(r.id).await.unwrap().unwrap();
            let expect = if t.max_attempts == 1 {
                TaskState::Failed
            } else {
                TaskState::Retryable
            };
            assert_eq!(t.state, expect);
            assert!(t.errors.last().unwrap().message.contains("dead"));
        }
        assert!(
            s.node_rescue(params).await.unwrap().is_empty(),
            "rescued once"
        );
        assert_eq!(
            s.task_get(on_live[0].id).await.unwrap().unwrap().state,
            TaskState::Running
        );
        // A stale outcome from the dead node is refused.
        let stale = Completion {
            id: on_dead[0].id,
            attempt: on_dead[0].attempt,
            token: on_dead[0].claim_token,
            at: now,
            outcome: Outcome::Completed {
                result: serde_json::Value::Null,
            },
        };
        assert_eq!(s.task_complete_many(vec![stale]).await.unwrap(), [false]);
        // Rescue of a named node (start-up of a node with the same name).
        let more = s.task_claim(claim("q", "live", 5, now)).await.unwrap();
        assert!(!more.is_empty());
        let named = |keep: Vec<proto_tasker::TaskId>, started_before| RescueParams {
            now,
            node_timeout: Duration::from_secs(15),
            node: Some("live".into()),
            keep,
            started_before,
        };
        // Claims newer than started_before are left alone (still on their way to a slot).
        let fresh = s
            .node_rescue(named(Vec::new(), Some(now - secs(1))))
            .await
            .unwrap();
        assert!(fresh.is_empty());
        // Tasks the node says it holds are kept; the rest of its running tasks go back.
        let kept = on_live[0].id;
        let put_back = s
            .node_rescue(named(vec![kept], Some(now + secs(1))))
            .await
            .unwrap();
        assert_eq!(put_back.len(), more.len());
        assert!(put_back.iter().all(|r| r.id != kept));
        assert_eq!(
            s.task_get(kept).await.unwrap().unwrap().state,
            TaskState::Running
        );
        // Start-up of a node with the same name: everything of that name goes back.
        let all = s.node_rescue(named(Vec::new(), None)).await.unwrap();
        assert_eq!(all.iter().map(|r| r.id).collect::<Vec<_>>(), [kept]);
    }

    pub async fn retention_prunes_only_old_finished_tasks(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let rows = (0..4).map(|_| insert("x", "q", 0, now)).collect();
        let ids: Vec<_> = s
            .task_insert_many(rows, now)
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.task.id)
            .collect();
        s.task_claim(claim("q", "n", 3, now)).await.unwrap();
        let old = now - secs(3600);
        s.task_complete_many(vec![
            Completion {
                id: ids[0],
                attempt: 1,
                token: 1,
                at: old,
                outcome: Outcome::Completed {
                    result: serde_json::Value::Null,
                },
            },
            Completion {
                id: ids[1],
                attempt: 1,
                token: 1,
                at: now,
                outcome: Outcome::Completed {
                    result: serde_json::Value::Null,
                },
            },
            Completion {
                id: ids[2],
                attempt: 1,
                token: 1,
                at: old,
                outcome: Outcome::Failed { error: "x".into() },
            },
        ])
        .await
        .unwrap();
        let cutoff = Some(now - secs(60));
        let n = s
            .task_prune(PruneParams {
                completed_before: cutoff,
                failed_before: None,
                cancelled_before: cutoff,
                audit_before: None,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(
            s.task_get(ids[0]).await.unwrap().is_none(),
            "old completed pruned"
        );
        assert!(
            s.task_get(ids[1]).await.unwrap().is_some(),
            "recent completed kept"
        );
        assert!(
            s.task_get(ids[2]).await.unwrap().is_some(),
            "failed kept when its retention is off"
        );
        assert!(
            s.task_get(ids[3]).await.unwrap().is_some(),
            "unfinished never pruned"
        );
        let n = s
            .task_prune(PruneParams {
                completed_before: cutoff,
                failed_before: cutoff,
                cancelled_before: cutoff,
                audit_before: None,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(n, 1);
        assert!(s.task_get(ids[2]).await.unwrap().is_none());
    }

    pub async fn one_leader_at_a_time(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let ttl = Duration::from_secs(10);
        assert!(s.leader_try_elect("a", ttl, now).await.unwrap());
        assert!(!s.leader_try_elect("b", ttl, now + secs(1)).await.unwrap());
        assert!(
            s.leader_try_elect("a", ttl, now + secs(2)).await.unwrap(),
            "leader renews"
        );
        assert!(
            s.leader_try_elect("b", ttl, now + secs(13)).await.unwrap(),
            "expired lease is taken over"
        );
        assert!(!s.leader_try_elect("a", ttl, now + secs(14)).await.unwrap());
        s.leader_resign("b").await.unwrap();
        assert!(s.leader_try_elect("a", ttl, now + secs(15)).await.unwrap());
    }

    pub async fn list_filters_and_paginates(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let mut rows = Vec::new();
        for i in 0..25 {
            rows.push(insert(
                if i % 2 == 0 { "even" } else { "odd" },
                if i < 10 { "a" } else { "b" },
                0,
                now,
            ));
        }
        s.task_insert_many(rows, now).await.unwrap();
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = s
                .task_list(ListParams {
                    before,
                    limit: 10,
                    ..Default::default()
                })
                .await
                .unwrap();
            if page.is_empty() {
                break;
            }
            before = page.last().map(|t| t.id);
            seen.extend(page.into_iter().map(|t| t.id));
        }
        assert_eq!(seen.len(), 25);
        assert!(
            seen.windows(2).all(|w| w[0] > w[1]),
            "newest first, no repeats"
        );
        let evens_in_a = s
            .task_list(ListParams {
                queue: Some("a".into()),
                kind: Some("even".into()),
                limit: 100,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(evens_in_a.len(), 5);
        let counts = s.queue_counts().await.unwrap();
        let a: i64 = counts
            .iter()
            .filter(|(q, st, _)| q == "a" && *st == TaskState::Available)
            .map(|c| c.2)
            .sum();
        assert_eq!(a, 10);
    }

    pub async fn paused_queues_are_not_claimed(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        s.task_insert_many(
            vec![insert("x", "q", 0, now), insert("x", "other", 0, now)],
            now,
        )
        .await
        .unwrap();
        s.queue_set_paused("q", true).await.unwrap();
        assert_eq!(s.queue_paused().await.unwrap(), ["q"]);
        assert!(
            s.task_claim(claim("q", "n", 10, now))
                .await
                .unwrap()
                .is_empty()
        );
        assert_eq!(
            s.task_claim(claim("other", "n", 10, now))
                .await
                .unwrap()
                .len(),
            1
        );
        s.queue_set_paused("q", false).await.unwrap();
        assert!(s.queue_paused().await.unwrap().is_empty());
        assert_eq!(
            s.task_claim(claim("q", "n", 10, now)).await.unwrap().len(),
            1
        );
    }

    pub async fn schedules_fire_each_tick_once(b: &Backend) {
        let s = b.store.clone();
        use proto_tasker::store::ScheduleRow;
        let now = now();
        let row = |last| ScheduleRow {
            name: "nightly".into(),
            spec: serde_json::json!({"name": "nightly", "cron": "0 0 * * *", "kind": "x"}),
            source: "config".into(),
            last_tick: last,
            paused: false,
        };
        s.schedule_upsert(row(now)).await.unwrap();
        // Upserting again keeps the schedule's progress.
        s.schedule_upsert(row(now + secs(500))).await.unwrap();
        let listed = s.schedule_list().await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].last_tick, now);
        let mut task = insert("x", "cron", 0, now);
        task.unique_key = Some("cron:nightly:t1".into());
        let fired = s
            .schedule_fire(ScheduleFire {
                name: "nightly".into(),
                expected: now,
                new_last: now + secs(60),
                tasks: vec![task.clone()],
                now,
            })
            .await
            .unwrap();
        assert_eq!(fired.unwrap().len(), 1);
        // A second node that read the old last_tick fires nothing.
        let again = s
            .schedule_fire(ScheduleFire {
                name: "nightly".into(),
                expected: now,
                new_last: now + secs(60),
                tasks: vec![task],
                now,
            })
            .await
            .unwrap();
        assert!(again.is_none());
        assert_eq!(
            s.task_claim(claim("cron", "n", 10, now))
                .await
                .unwrap()
                .len(),
            1
        );
        assert_eq!(
            s.schedule_list().await.unwrap()[0].last_tick,
            now + secs(60)
        );
        assert!(s.schedule_delete("nightly").await.unwrap());
        assert!(!s.schedule_delete("nightly").await.unwrap());
        assert!(s.schedule_list().await.unwrap().is_empty());
    }

    pub async fn schedules_pause_and_resume(b: &Backend) {
        let s = b.store.clone();
        use proto_tasker::store::ScheduleRow;
        let now = now();
        let row = ScheduleRow {
            name: "hourly".into(),
            spec: serde_json::json!({"name": "hourly", "cron": "0 * * * *", "kind": "x"}),
            source: "config".into(),
            last_tick: now,
            paused: false,
        };
        s.schedule_upsert(row.clone()).await.unwrap();
        assert!(!s.schedule_list().await.unwrap()[0].paused);
        assert!(s.schedule_set_paused("hourly", true).await.unwrap());
        assert!(s.schedule_list().await.unwrap()[0].paused);
        // A node restarting with the schedule in its config (an upsert)
        // does not resume what an operator paused.
        s.schedule_upsert(row).await.unwrap();
        assert!(s.schedule_list().await.unwrap()[0].paused);
        assert!(s.schedule_set_paused("hourly", false).await.unwrap());
        assert!(!s.schedule_list().await.unwrap()[0].paused);
        assert!(!s.schedule_set_paused("nope", true).await.unwrap());
        assert_eq!(s.schedule_list().await.unwrap().len(), 1);
    }

    pub async fn queue_max_depth_caps_unfinished_tasks(b: &Backend) {
        use proto_tasker::store::QueueSettings;
        let s = b.store.clone();
        let now = now();
        let cap = |n| QueueSettings {
            max_depth: n,
            ..Default::default()
        };
        s.queue_settings_put("capped", cap(Some(5)), false)
            .await
            .unwrap();
        // A config's starting value does not undo a run-time change.
        s.queue_settings_put("capped", cap(Some(99)), true)
            .await
            .unwrap();
        assert_eq!(
            s.queue_settings().await.unwrap(),
            vec![("capped".to_string(), cap(Some(5)))]
        );
        let batch = |n: usize| {
            (0..n)
                .map(|_| insert("x", "capped", 0, now))
                .collect::<Vec<_>>()
        };
        let full = |r: Result<Vec<proto_tasker::store::Inserted>, StoreError>| match r {
            Err(StoreError::QueueFull { queue, max_depth }) => {
                assert_eq!((queue.as_str(), max_depth), ("capped", 5));
                true
            }
            Err(e) => panic!("{e}"),
            Ok(_) => false,
        };
        let depth = |s: std::sync::Arc<dyn proto_tasker::Store>| async move {
            s.queue_counts()
                .await
                .unwrap()
                .iter()
                .filter(|(q, st, _)| q == "capped" && !st.is_finished())
                .map(|(_, _, n)| *n)
                .sum::<i64>()
        };
        let first = s.task_insert_many(batch(3), now).await.unwrap();
        // A batch that would overfill is refused whole.
        assert!(full(s.task_insert_many(batch(3), now).await));
        assert_eq!(depth(s.clone()).await, 3);
        s.task_insert_many(batch(2), now).await.unwrap();
        assert!(full(s.task_insert_many(batch(1), now).await));
        // A delayed task counts too; other queues are not capped.
        let mut later = insert("x", "capped", 0, now + secs(3600));
        later.run_at = now + secs(3600);
        assert!(full(s.task_insert_many(vec![later], now).await));
        s.task_insert_many((0..10).map(|_| insert("x", "free", 0, now)).collect(), now)
            .await
            .unwrap();
        // Finished tasks make room.
        s.task_cancel(first[0].task.id, now).await.unwrap();
        s.task_insert_many(batch(1), now).await.unwrap();
        assert!(full(s.task_insert_many(batch(1), now).await));
        // Removing the cap lets enqueues through again.
        s.queue_settings_put("capped", cap(None), false)
            .await
            .unwrap();
        s.task_insert_many(batch(4), now).await.unwrap();
        assert_eq!(depth(s.clone()).await, 9);
    }

    pub async fn queue_max_depth_holds_under_concurrent_batches(b: &Backend) {
        use proto_tasker::store::QueueSettings;
        let now = now();
        b.store
            .queue_settings_put(
                "race",
                QueueSettings {
                    max_depth: Some(10),
                    ..Default::default()
                },
                false,
            )
            .await
            .unwrap();
        // Four handles (four nodes' worth of connections) send 24 batches
        // of 3 at once under a cap of 10: three batches land, never a fourth.
        let handles = b.nodes(4).await;
        let mut set = tokio::task::JoinSet::new();
        for i in 0..24 {
            let s = handles[i % handles.len()].clone();
            set.spawn(async move {
                s.task_insert_many((0..3).map(|_| insert("x", "race", 0, now)).collect(), now)
                    .await
            });
        }
        let mut landed = 0;
        while let Some(r) = set.join_next().await {
            match r.unwrap() {
                Ok(v) => landed += v.len() as i64,
                Err(StoreError::QueueFull { .. }) => {}
                Err(e) => panic!("{e}"),
            }
        }
        let stored: i64 = b
            .store
            .queue_counts()
            .await
            .unwrap()
            .iter()
            .filter(|(q, _, _)| q == "race")
            .map(|(_, _, n)| *n)
            .sum();
        assert_eq!(stored, landed, "refused batches left rows behind");
        assert_eq!(stored, 9, "three whole batches of 3 fit under 10");
    }

    pub async fn workflows_unblock_and_cascade(b: &Backend) {
        let s = b.store.clone();
        use proto_tasker::task::{Dependency, OnDependencyFailure};
        let now = now();
        let complete = |id, attempt| Completion {
            id,
            attempt,
            token: attempt as i64,
            at: now,
            outcome: Outcome::Completed {
                result: serde_json::json!(1),
            },
        };
        let ids: Vec<_> = s
            .task_insert_many(
                vec![insert("a", "w", 0, now), insert("b", "w", 5, now)],
                now,
            )
            .await
            .unwrap()
            .into_iter()
            .map(|i| i.task.id)
            .collect();
        let (a, b) = (ids[0], ids[1]);
        let mut c = insert("c", "w", 0, now);
        c.depends_on = vec![Dependency::Task(a), Dependency::Task(b)];
        // A batch: d waits for c's batch sibling... here for c itself via a batch ref.
        let mut d = insert("d", "w", 0, now);
        d.depends_on = vec![Dependency::Batch(0)];
        let mut e = insert("e", "w", 0, now);
        e.depends_on = vec![Dependency::Task(a)];
        e.on_dependency_failure = OnDependencyFailure::Fail;
        let out = s.task_insert_many(vec![c, d, e], now).await.unwrap();
        let (c, d, e) = (out[0].task.id, out[1].task.id, out[2].task.id);
        assert!(
            out.iter().all(|i| i.task.state == TaskState::Blocked),
            "{out:?}"
        );
        assert_eq!(out[1].task.depends_on, [c]);
        assert_eq!(s.task_get(c).await.unwrap().unwrap().depends_on, [a, b]);
        // Only a and b can run.
        let first = s.task_claim(claim("w", "n", 10, now)).await.unwrap();
        assert_eq!(first.iter().map(|t| t.id).collect::<Vec<_>>(), [a, b]);
        s.task_complete_many(vec![complete(a, 1)]).await.unwrap();
        assert_eq!(
            s.task_get(c).await.unwrap().unwrap().state,
            TaskState::Blocked,
            "still waits for b"
        );
        assert_eq!(
            s.task_get(e).await.unwrap().unwrap().state,
            TaskState::Available
        );
        s.task_complete_many(vec![complete(b, 1)]).await.unwrap();
        assert_eq!(
            s.task_get(c).await.unwrap().unwrap().state,
            TaskState::Available
        );
        let mut f = insert("f", "w", 0, now);
        f.depends_on = vec![Dependency::Task(d)];
        let f = s.task_insert_many(vec![f], now).await.unwrap()[0].task.id;
        // c fails for good: d (cancel policy) and f, which waits for d, are cancelled.
        let running = s.task_claim(claim("w", "n", 10, now)).await.unwrap();
        assert_eq!(running.iter().map(|t| t.id).collect::<Vec<_>>(), [c, e]);
        s.task_complete_many(vec![Completion {
            id: c,
            attempt: 1,
            token: 1,
            at: now,
            outcome: Outcome::Failed { error: "no".into() },
        }])
        .await
        .unwrap();
        for id in [d, f] {
            let t = s.task_get(id).await.unwrap().unwrap();
            assert_eq!(t.state, TaskState::Cancelled, "task {id}");
            assert!(t.errors[0].message.contains("depends on"), "{:?}", t.errors);
        }
        // Depending on a task that already failed: never runs, per its policy.
        let mut g = insert("g", "w", 0, now);
        g.depends_on = vec![Dependency::Task(c)];
        g.on_dependency_failure = OnDependencyFailure::Fail;
        let g = s
            .task_insert_many(vec![g], now)
            .await
            .unwrap()
            .remove(0)
            .task;
        assert_eq!(g.state, TaskState::Failed);
        // Cancelling a queued parent cancels its blocked children.
        let h = s
            .task_insert_many(vec![insert("h", "w2", 0, now + secs(60))], now)
            .await
            .unwrap()[0]
            .task
            .id;
        let mut i = insert("i", "w2", 0, now);
        i.depends_on = vec![Dependency::Task(h)];
        let i = s.task_insert_many(vec![i], now).await.unwrap()[0].task.id;
        s.task_cancel(h, now).await.unwrap();
        assert_eq!(
            s.task_get(i).await.unwrap().unwrap().state,
            TaskState::Cancelled
        );
        // A missing parent is an error and inserts nothing.
        let mut bad = insert("bad", "w3", 0, now);
        bad.depends_on = vec![Dependency::Task(proto_tasker::TaskId(987_654))];
        let err = s
            .task_insert_many(vec![insert("ok", "w3", 0, now), bad], now)
            .await
            .unwrap_err();
        assert!(
            err.to_string()
                .contains("depends_on: task 987654 does not exist"),
            "{err}"
        );
        assert!(
            s.task_claim(claim("w3", "n", 10, now))
                .await
                .unwrap()
                .is_empty(),
            "all or nothing"
        );
    }

    pub async fn per_key_claims_skip_keys_at_their_limit(b: &Backend) {
        let s = b.store.clone();
        use proto_tasker::store::QueueLimits;
        let now = now();
        let keyed = |k: &str| {
            let mut t = insert("x", "pk", 0, now);
            t.concurrency_key = Some(k.into());
            t
        };
        let mut rows: Vec<_> = (0..100).map(|_| keyed("big")).collect();
        rows.extend((0..3).map(|_| keyed("small")));
        s.task_insert_many(rows, now).await.unwrap();
        let limited = |limit| ClaimParams {
            limits: Some(QueueLimits {
                round_robin: false,
                per_key_concurrency: Some(1),
                ..Default::default()
            }),
            ..claim("pk", "n", limit, now)
        };
        let first = s.task_claim(limited(4)).await.unwrap();
        assert_eq!(
            first.len(),
            1,
            "one of the big key; the small ones are beyond the lookahead"
        );
        assert_eq!(first[0].concurrency_key.as_deref(), Some("big"));
        // The big key is at its limit: the claim looks past its backlog.
        let second = s.task_claim(limited(4)).await.unwrap();
        assert_eq!(second.len(), 1);
        assert_eq!(second[0].concurrency_key.as_deref(), Some("small"));
        assert!(
            s.task_claim(limited(4)).await.unwrap().is_empty(),
            "both keys at their limit"
        );
        // A rescue gives the keys' places back.
        let rescued = s
            .node_rescue(RescueParams {
                now,
                node_timeout: Duration::from_secs(15),
                node: Some("n".into()),
                keep: Vec::new(),
                started_before: None,
            })
            .await
            .unwrap();
        assert_eq!(rescued.len(), 2);
        let later = || ClaimParams {
            now: now + secs(1),
            ..limited(4)
        };
        let again = s.task_claim(later()).await.unwrap();
        assert_eq!(again.len(), 1, "the big key has room again");
        assert_eq!(
            s.task_claim(later()).await.unwrap().len(),
            1,
            "and so has the small one"
        );
    }

    /// Listing one queue merges its states in id order, pages by cursor, and
    /// queue counts match the tasks as they are.
    pub async fn references_are_kept_on_both_insert_paths(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let mut plain = insert("k", "q", 0, now);
        plain.reference = Some("fetch-a".into());
        let mut child = insert("k", "q", 0, now);
        child.reference = Some("sum".into());
        child.depends_on = vec![proto_tasker::Dependency::Batch(0)];
        let ids = insert_ids(&s, vec![plain, child, insert("k", "q", 0, now)], now).await;
        let read = |i: usize| {
            let s = s.clone();
            let id = ids[i];
            async move { s.task_get(id).await.unwrap().unwrap().reference }
        };
        assert_eq!(read(0).await.as_deref(), Some("fetch-a"));
        assert_eq!(read(1).await.as_deref(), Some("sum"));
        assert_eq!(read(2).await, None);
        let claimed = s.task_claim(claim("q", "n", 10, now)).await.unwrap();
        assert!(
            claimed
                .iter()
                .any(|t| t.reference.as_deref() == Some("fetch-a")),
            "claims return it too: {claimed:?}"
        );
    }

    pub async fn a_task_starts_as_inserted_only_where_a_claim_could_take_it(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        // An idle queue: inserted running, claimed by n1, attempt and
        // token 1, as a claim would have left it.
        let t = s
            .task_insert_started(insert("k", "idle", 0, now), "n1", now)
            .await
            .unwrap()
            .task;
        assert_eq!(t.state, TaskState::Running);
        assert_eq!((t.attempt, t.claim_token), (1, 1));
        assert_eq!(t.node.as_deref(), Some("n1"));
        assert_eq!(t.started_at, Some(now));
        assert_eq!(s.task_get(t.id).await.unwrap().unwrap(), t);
        assert!(
            s.task_claim(claim("idle", "n2", 10, now))
                .await
                .unwrap()
                .is_empty(),
            "nobody else claims it"
        );
        let done = Completion::of(
            &t,
            now,
            Outcome::Completed {
                result: serde_json::json!(1),
            },
        );
        assert_eq!(s.task_complete_many(vec![done]).await.unwrap(), [true]);
        // A paused queue, a task for later, and a task with a unique key
        // are inserted as usual.
        s.queue_set_paused("paused", true).await.unwrap();
        let t = s
            .task_insert_started(insert("k", "paused", 0, now), "n1", now)
            .await
            .unwrap()
            .task;
        assert_eq!(t.state, TaskState::Available);
        let mut later = insert("k", "idle", 0, now);
        later.run_at = now + chrono::Duration::seconds(60);
        let t = s.task_insert_started(later, "n1", now).await.unwrap().task;
        assert_eq!(t.state, TaskState::Scheduled);
        let mut unique = insert("k", "idle", 0, now);
        unique.unique_key = Some("u".into());
        let t = s.task_insert_started(unique, "n1", now).await.unwrap().task;
        assert_eq!(t.state, TaskState::Available);
    }

    pub async fn one_state_lists_merge_every_queue(b: &Backend) {
        // More queues than one statement's arms on SQLite (200): lists of
        // one state across queues merge each queue's newest page.
        let s = b.store.clone();
        let now = now();
        let rows = (0..450)
            .map(|i| insert("k", &format!("q{:03}", (i * 7) % 450), 0, now))
            .collect();
        let mut ids = insert_ids(&s, rows, now).await;
        ids.reverse();
        let list = |before: Option<proto_tasker::TaskId>| {
            let s = s.clone();
            async move {
                s.task_list(ListParams {
                    state: Some(TaskState::Available),
                    before,
                    limit: 100,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_iter()
                .map(|t| t.id)
                .collect::<Vec<_>>()
            }
        };
        let mut seen = Vec::new();
        let mut before = None;
        loop {
            let page = list(before).await;
            assert!(page.len() <= 100);
            let Some(last) = page.last().copied() else {
                break;
            };
            seen.extend(page);
            before = Some(last);
        }
        assert_eq!(seen, ids, "every task once, newest first");
        // Retention walks the queues the same way.
        let done: Vec<_> = ids.iter().take(300).copied().collect();
        let claimed = {
            let mut all = Vec::new();
            for q in 0..450 {
                all.extend(
                    s.task_claim(claim(&format!("q{q:03}"), "n", 10, now))
                        .await
                        .unwrap(),
                );
            }
            all
        };
        let finished: Vec<_> = claimed
            .into_iter()
            .filter(|t| done.contains(&t.id))
            .collect();
        complete_all(&s, &finished, now).await;
        let prune = |limit: usize| {
            let s = s.clone();
            async move {
                s.task_prune(PruneParams {
                    completed_before: Some(now + chrono::Duration::seconds(1)),
                    failed_before: None,
                    cancelled_before: None,
                    audit_before: None,
                    limit,
                })
                .await
                .unwrap()
            }
        };
        assert_eq!(prune(120).await, 120, "the limit holds across queues");
        assert_eq!(prune(1000).await, 180);
        assert_eq!(prune(1000).await, 0);
        let running = s
            .task_list(ListParams {
                state: Some(TaskState::Running),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(running.len(), 150, "the running tasks stay");
    }

    pub async fn trace_context_is_kept_on_every_insert_path(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let tp = |n: u8| format!("00-4bf92f3577b34da6a3ce929d0e0e47{n:02x}-00f067aa0ba902b7-01");
        // The statement for many plain rows, and the one-at-a-time path
        // (a unique key; a parent of the same batch).
        let mut plain = insert("k", "q", 0, now);
        plain.traceparent = Some(tp(1));
        let mut unique = insert("k", "q", 0, now);
        unique.traceparent = Some(tp(2));
        unique.unique_key = Some("u".into());
        let mut child = insert("k", "q", 0, now);
        child.traceparent = Some(tp(3));
        child.depends_on = vec![proto_tasker::Dependency::Batch(0)];
        let ids = insert_ids(
            &s,
            vec![plain, unique, child, insert("k", "q", 0, now)],
            now,
        )
        .await;
        for (i, want) in [Some(tp(1)), Some(tp(2)), Some(tp(3)), None]
            .into_iter()
            .enumerate()
        {
            let got = s.task_get(ids[i]).await.unwrap().unwrap().traceparent;
            assert_eq!(got, want, "task {i}");
        }
        let claimed = s.task_claim(claim("q", "n", 10, now)).await.unwrap();
        for t in &claimed {
            let i = ids.iter().position(|id| *id == t.id).unwrap();
            assert_eq!(
                t.traceparent,
                [Some(tp(1)), Some(tp(2)), None, None][i],
                "a claim returns it (the blocked child is not claimed)"
            );
        }
        assert_eq!(claimed.len(), 3);
        // Through a client with no OpenTelemetry layer: a caller's context
        // is stored as given; a malformed one is refused by name.
        let client = proto_tasker::Client::new(
            s.clone(),
            std::sync::Arc::new(proto_tasker::TaskRegistry::new()),
        );
        let given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let task = client
            .insert(
                proto_tasker::NewTask::new("k", serde_json::json!({})).with(
                    proto_tasker::TaskOptions::default()
                        .queue("q2")
                        .traceparent(given),
                ),
            )
            .await
            .unwrap()
            .task;
        assert_eq!(task.traceparent.as_deref(), Some(given));
        assert_eq!(
            s.task_get(task.id)
                .await
                .unwrap()
                .unwrap()
                .traceparent
                .as_deref(),
            Some(given)
        );
        for bad in [
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331",
            "00-00000000000000000000000000000000-b7ad6b7169203331-01",
            "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        ] {
            let e = client
                .insert(
                    proto_tasker::NewTask::new("k", serde_json::json!({})).with(
                        proto_tasker::TaskOptions::default()
                            .queue("q2")
                            .traceparent(bad),
                    ),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(&e, proto_tasker::ClientError::Invalid { field, .. } if field == "traceparent"),
                "{bad}: {e}"
            );
        }
    }

    pub async fn progress_lands_under_its_runs_claim_token(b: &Backend) {
        use proto_tasker::store::ProgressUpdate;
        let s = b.store.clone();
        let now = now();
        let id = insert_ids(&s, vec![insert("k", "q", 0, now)], now).await[0];
        let t = s
            .task_claim(claim("q", "n", 1, now))
            .await
            .unwrap()
            .remove(0);
        let report = |token: i64, pct: i64| ProgressUpdate {
            id,
            token,
            progress: serde_json::json!({ "pct": pct }),
        };
        assert_eq!(
            s.task_progress(vec![report(t.claim_token, 10)])
                .await
                .unwrap(),
            1
        );
        let got = s.task_get(id).await.unwrap().unwrap();
        assert_eq!(got.progress, Some(serde_json::json!({"pct": 10})));
        // Another run's token changes nothing.
        assert_eq!(
            s.task_progress(vec![report(t.claim_token + 7, 99)])
                .await
                .unwrap(),
            0
        );
        // Released and claimed again: the earlier run's late report is dropped.
        let released = Completion::of(&t, now, Outcome::Released);
        s.task_complete_many(vec![released]).await.unwrap();
        let again = s
            .task_claim(claim("q", "n", 1, now))
            .await
            .unwrap()
            .remove(0);
        assert!(again.claim_token > t.claim_token);
        assert_eq!(
            s.task_progress(vec![report(t.claim_token, 50)])
                .await
                .unwrap(),
            0
        );
        // The current run's last report lands, even after its outcome.
        let done = Completion::of(
            &again,
            now,
            Outcome::Completed {
                result: serde_json::json!(null),
            },
        );
        s.task_complete_many(vec![done]).await.unwrap();
        assert_eq!(
            s.task_progress(vec![report(again.claim_token, 100)])
                .await
                .unwrap(),
            1
        );
        let got = s.task_get(id).await.unwrap().unwrap();
        assert_eq!(got.state, TaskState::Completed);
        assert_eq!(got.progress, Some(serde_json::json!({"pct": 100})));
        assert_eq!(s.task_progress(Vec::new()).await.unwrap(), 0);
    }

    pub async fn queue_lag_is_the_wait_of_the_oldest_due_task(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let rows = vec![
            // Queue a: the oldest due task is the low-priority one.
            insert("k", "a", 0, now - secs(10)),
            insert("k", "a", 5, now - secs(30)),
            insert("k", "a", 9, now + secs(60)),
            // Queue b: nothing due yet.
            insert("k", "b", 0, now + secs(60)),
            // Queue c: its oldest task is running, so it no longer waits.
            insert("k", "c", 0, now - secs(50)),
            insert("k", "c", 0, now - secs(5)),
        ];
        s.task_insert_many(rows, now - secs(60)).await.unwrap();
        let running = s.task_claim(claim("c", "n", 1, now)).await.unwrap();
        assert_eq!(running.len(), 1);
        assert_eq!(running[0].run_at, now - secs(50));
        let lag = s.queue_oldest_due(now).await.unwrap();
        assert_eq!(
            lag,
            vec![
                ("a".to_string(), now - secs(30)),
                ("c".to_string(), now - secs(5))
            ]
        );
        // Later, queue b's task is due too.
        let later = now + secs(61);
        let lag = s.queue_oldest_due(later).await.unwrap();
        assert_eq!(lag.len(), 3, "{lag:?}");
        assert_eq!(lag[1], ("b".to_string(), now + secs(60)));
    }

    pub async fn queue_listing_and_counts_span_states(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let mut rows = Vec::new();
        for i in 0..60 {
            let q = ["a", "b", "c"][i % 3];
            let mut r = insert(if i % 4 == 0 { "k1" } else { "k2" }, q, 0, now);
            if i % 7 == 0 {
                r.run_at = now + secs(3600);
            }
            rows.push(r);
        }
        s.task_insert_many(rows, now).await.unwrap();
        // Move tasks of every queue through running, completed, failed and cancelled.
        for q in ["a", "b", "c"] {
            let claimed = s.task_claim(claim(q, "n", 9, now)).await.unwrap();
            let done: Vec<Completion> = claimed
                .iter()
                .enumerate()
                .filter(|(i, _)| i % 3 != 2)
                .map(|(i, t)| Completion {
                    id: t.id,
                    attempt: t.attempt,
                    token: t.claim_token,
                    at: now,
                    outcome: if i % 3 == 0 {
                        Outcome::Completed {
                            result: serde_json::json!(null),
                        }
                    } else {
                        Outcome::Failed {
                            error: "boom".into(),
                        }
                    },
                })
                .collect();
            s.task_complete_many(done).await.unwrap();
        }
        let all = s
            .task_list(ListParams {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(all.len(), 60);
        let victim = all
            .iter()
            .find(|t| t.queue == "b" && t.state == TaskState::Available)
            .unwrap();
        s.task_cancel(victim.id, now).await.unwrap();
        let all = s
            .task_list(ListParams {
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        for q in ["a", "b", "c"] {
            for kind in [None, Some("k1")] {
                let want: Vec<_> = all
                    .iter()
                    .filter(|t| t.queue == q && kind.is_none_or(|k| t.kind == k))
                    .map(|t| t.id)
                    .collect();
                let mut got = Vec::new();
                let mut before = None;
                loop {
                    let page = s
                        .task_list(ListParams {
                            queue: Some(q.into()),
                            kind: kind.map(String::from),
                            before,
                            limit: 4,
                            ..Default::default()
                        })
                        .await
                        .unwrap();
                    if page.is_empty() {
                        break;
                    }
                    assert!(page.len() <= 4);
                    before = page.last().map(|t| t.id);
                    got.extend(page.into_iter().map(|t| t.id));
                }
                assert_eq!(got, want, "queue {q} kind {kind:?}");
            }
        }
        let mut want = std::collections::BTreeMap::new();
        for t in &all {
            *want
                .entry((t.queue.clone(), t.state.as_str()))
                .or_insert(0i64) += 1;
        }
        let got: std::collections::BTreeMap<_, _> = s
            .queue_counts()
            .await
            .unwrap()
            .into_iter()
            .map(|(q, st, n)| ((q, st.as_str()), n))
            .collect();
        assert_eq!(got, want);
        let states: HashSet<TaskState> = all.iter().map(|t| t.state).collect();
        for st in [
            TaskState::Available,
            TaskState::Scheduled,
            TaskState::Running,
            TaskState::Completed,
            TaskState::Failed,
            TaskState::Cancelled,
        ] {
            assert!(states.contains(&st), "the case covers {st}");
        }
    }

    /// The claim token only grows: a snooze gives the attempt back, so the
    /// next run has the same attempt number, but the late outcome of the
    /// first run carries the old token and is refused.
    pub async fn late_outcomes_of_an_earlier_run_are_fenced_by_the_claim_token(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let id = s
            .task_insert_many(vec![insert("a", "q", 0, now)], now)
            .await
            .unwrap()[0]
            .task
            .id;
        let first = s
            .task_claim(claim("q", "n1", 1, now))
            .await
            .unwrap()
            .remove(0);
        let snooze = Completion::of(
            &first,
            now,
            Outcome::Snoozed {
                run_at: now + secs(5),
            },
        );
        assert_eq!(s.task_complete_many(vec![snooze]).await.unwrap(), [true]);
        let later = now + secs(6);
        let second = s
            .task_claim(claim("q", "n2", 1, later))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(
            second.attempt, first.attempt,
            "the snooze gave the attempt back"
        );
        assert!(second.claim_token > first.claim_token, "{second:?}");
        let late = Completion::of(
            &first,
            later,
            Outcome::Completed {
                result: serde_json::json!("stale"),
            },
        );
        assert_eq!(s.task_complete_many(vec![late]).await.unwrap(), [false]);
        let t = s.task_get(id).await.unwrap().unwrap();
        assert_eq!(
            (t.state, t.node.as_deref()),
            (TaskState::Running, Some("n2"))
        );
        let done = Completion::of(
            &second,
            later,
            Outcome::Completed {
                result: serde_json::json!("ok"),
            },
        );
        assert_eq!(s.task_complete_many(vec![done]).await.unwrap(), [true]);
    }

    /// Two outcomes for one run in one batch: the first queued lands, the
    /// second is refused.
    pub async fn a_batch_applies_one_outcome_per_task(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        s.task_insert_many(vec![insert("a", "q", 0, now)], now)
            .await
            .unwrap();
        let t = s
            .task_claim(claim("q", "n", 1, now))
            .await
            .unwrap()
            .remove(0);
        let released = Completion::of(&t, now, Outcome::Released);
        let own = Completion::of(
            &t,
            now,
            Outcome::Completed {
                result: serde_json::json!(1),
            },
        );
        assert_eq!(
            s.task_complete_many(vec![released, own]).await.unwrap(),
            [true, false]
        );
        let got = s.task_get(t.id).await.unwrap().unwrap();
        assert_eq!((got.state, got.result), (TaskState::Available, None));
    }

    /// Once a cancel was acknowledged, no outcome makes the task runnable:
    /// a retry, a snooze or a release of a task asked to stop cancels it.
    pub async fn cancel_is_final_whatever_the_attempt_reports(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let outcomes = [
            Outcome::Retry {
                run_at: now + secs(1),
                error: "boom".into(),
            },
            Outcome::Snoozed {
                run_at: now + secs(1),
            },
            Outcome::Released,
        ];
        for outcome in outcomes {
            s.task_insert_many(vec![insert("a", "cq", 0, now)], now)
                .await
                .unwrap();
            let t = s
                .task_claim(claim("cq", "n", 1, now))
                .await
                .unwrap()
                .remove(0);
            let asked = s.task_cancel(t.id, now).await.unwrap();
            assert_eq!(asked.state, TaskState::Running);
            let c = Completion::of(&t, now, outcome.clone());
            assert_eq!(s.task_complete_many(vec![c]).await.unwrap(), [true]);
            let got = s.task_get(t.id).await.unwrap().unwrap();
            assert_eq!(
                got.state,
                TaskState::Cancelled,
                "{outcome:?} undid the cancel"
            );
            assert!(got.finished_at.is_some());
            assert_eq!(got.attempt, 1, "{outcome:?}");
            let last = got.errors.last().expect("an error entry");
            assert!(last.message.contains("cancelled"), "{last:?}");
            // And nothing claims it again.
            assert!(
                s.task_claim(claim("cq", "n", 1, now + secs(5)))
                    .await
                    .unwrap()
                    .is_empty()
            );
        }
    }

    /// An outcome holding NUL (shell output `printf 'a\0b'`) or a huge error
    /// is made storable the same way on every store, and never holds up the
    /// other outcomes of its batch.
    pub async fn outcomes_with_nul_or_huge_errors_are_stored_alike(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let rows = (0..3).map(|_| insert("a", "nq", 0, now)).collect();
        s.task_insert_many(rows, now).await.unwrap();
        let ts = s.task_claim(claim("nq", "n", 3, now)).await.unwrap();
        let huge = "e".repeat(100_000);
        let batch = vec![
            Completion::of(
                &ts[0],
                now,
                Outcome::Completed {
                    result: serde_json::json!({"stdout": "a\u{0}b", "k\u{0}": ["\u{0}"]}),
                },
            ),
            Completion::of(
                &ts[1],
                now,
                Outcome::Failed {
                    error: format!("x\u{0}y{huge}"),
                },
            ),
            Completion::of(
                &ts[2],
                now,
                Outcome::Completed {
                    result: serde_json::json!(3),
                },
            ),
        ];
        assert_eq!(
            s.task_complete_many(batch).await.unwrap(),
            [true, true, true]
        );
        let r = s.task_get(ts[0].id).await.unwrap().unwrap();
        assert_eq!(
            r.result,
            Some(serde_json::json!({"stdout": "a\u{FFFD}b", "k\u{FFFD}": ["\u{FFFD}"]}))
        );
        let f = s.task_get(ts[1].id).await.unwrap().unwrap();
        let m = &f.errors[0].message;
        assert!(m.starts_with("x\u{FFFD}yeee"), "{}", &m[..20]);
        assert!(
            m.len() < 17_000 && m.contains("bytes kept"),
            "{} bytes",
            m.len()
        );
        let c = s.task_get(ts[2].id).await.unwrap().unwrap();
        assert_eq!(c.state, TaskState::Completed);
    }

    /// A task cancelled while it waited for its parents goes back to
    /// waiting when retried by hand, not straight to `available`.
    pub async fn retry_of_a_cancelled_blocked_task_waits_for_its_parents(b: &Backend) {
        use proto_tasker::task::Dependency;
        let s = b.store.clone();
        let now = now();
        let parent = s
            .task_insert_many(vec![insert("p", "rq", 0, now)], now)
            .await
            .unwrap()[0]
            .task
            .clone();
        let mut child = insert("c", "rq", 0, now);
        child.depends_on = vec![Dependency::Task(parent.id)];
        let child = s.task_insert_many(vec![child], now).await.unwrap()[0]
            .task
            .clone();
        assert_eq!(child.state, TaskState::Blocked);
        s.task_cancel(child.id, now).await.unwrap();
        let retried = s.task_retry(child.id, now).await.unwrap();
        assert_eq!(retried.state, TaskState::Blocked, "{retried:?}");
        let claimed = s.task_claim(claim("rq", "n", 10, now)).await.unwrap();
        assert_eq!(claimed.len(), 1, "only the parent runs");
        assert_eq!(claimed[0].id, parent.id);
        let done = Completion::of(
            &claimed[0],
            now,
            Outcome::Completed {
                result: serde_json::json!(1),
            },
        );
        s.task_complete_many(vec![done]).await.unwrap();
        let c = s.task_get(child.id).await.unwrap().unwrap();
        assert_eq!(c.state, TaskState::Available, "{c:?}");
        // A child whose parent failed cannot be retried before the parent.
        let p2 = s
            .task_insert_many(vec![insert("p2", "rq2", 0, now)], now)
            .await
            .unwrap()[0]
            .task
            .clone();
        let mut c2 = insert("c2", "rq2", 0, now);
        c2.depends_on = vec![Dependency::Task(p2.id)];
        let c2 = s.task_insert_many(vec![c2], now).await.unwrap()[0]
            .task
            .clone();
        let t = s
            .task_claim(claim("rq2", "n", 1, now))
            .await
            .unwrap()
            .remove(0);
        let fail = Completion::of(&t, now, Outcome::Failed { error: "no".into() });
        s.task_complete_many(vec![fail]).await.unwrap();
        assert_eq!(
            s.task_get(c2.id).await.unwrap().unwrap().state,
            TaskState::Cancelled
        );
        match s.task_retry(c2.id, now).await {
            Err(StoreError::Conflict { message, .. }) => {
                assert!(message.contains("retry it first"), "{message}")
            }
            other => panic!("{other:?}"),
        }
    }

    /// Bookkeeping rows leave with what they describe: a pruned task's
    /// workflow edges, and a concurrency key's running count once nothing
    /// with that key runs (PostgreSQL keeps those counts in a table).
    pub async fn pruning_and_finishing_leave_no_bookkeeping_rows(b: &Backend) {
        use proto_tasker::task::Dependency;
        let s = b.store.clone();
        let now = now();
        let parent = s
            .task_insert_many(vec![insert("p", "bq", 0, now)], now)
            .await
            .unwrap()[0]
            .task
            .clone();
        let mut child = insert("c", "bq", 0, now);
        child.depends_on = vec![Dependency::Task(parent.id)];
        child.concurrency_key = Some("k1".into());
        child.tags = vec!["t1".into(), "t2".into()];
        s.task_insert_many(vec![child], now).await.unwrap();
        for _ in 0..2 {
            let claimed = s.task_claim(claim("bq", "n", 10, now)).await.unwrap();
            complete_all(&s, &claimed, now).await;
        }
        let edges = || {
            b.count(
                Some("SELECT count(*) FROM task_deps"),
                Some("SELECT count(*) FROM {schema}.task_deps"),
            )
        };
        assert_eq!(edges().await, Some(1));
        let keys = b
            .count(None, Some("SELECT count(*) FROM {schema}.running_keys"))
            .await;
        assert!(
            keys.is_none_or(|n| n == 0),
            "{keys:?} running_keys rows left"
        );
        let pruned = s
            .task_prune(PruneParams {
                completed_before: Some(now + secs(1)),
                failed_before: None,
                cancelled_before: None,
                audit_before: None,
                limit: 100,
            })
            .await
            .unwrap();
        assert_eq!(pruned, 2);
        assert_eq!(edges().await, Some(0));
        let tags = b
            .count(
                Some("SELECT count(*) FROM task_tags"),
                Some("SELECT count(*) FROM {schema}.task_tags"),
            )
            .await;
        assert_eq!(tags, Some(0), "the pruned task's tags stay behind");
    }

    /// Tags and args filters, alone and with the others, page newest first
    /// without repeats on both insert paths (plain rows, and rows with a
    /// unique key that go one at a time); args match as `jsonb @>` does.
    pub async fn tags_and_args_filter_with_paging(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let mut rows = Vec::new();
        for i in 0..30i64 {
            let mut r = insert("k", if i < 15 { "a" } else { "b" }, 0, now);
            r.args = serde_json::json!({
                "user": {"id": i % 5, "plan": if i % 2 == 0 { "free" } else { "pro" }},
                "items": [i, i + 1],
            });
            r.tags = match i % 3 {
                0 => vec!["customer:42".into()],
                1 => vec!["customer:42".into(), "vip".into()],
                _ => Vec::new(),
            };
            if i >= 24 {
                r.unique_key = Some(format!("u{i}"));
            }
            rows.push(r);
        }
        let ids = insert_ids(&s, rows, now).await;
        let task = s.task_get(ids[1]).await.unwrap().unwrap();
        assert_eq!(task.tags, ["customer:42", "vip"]);
        let task = s.task_get(ids[25]).await.unwrap().unwrap();
        assert_eq!(task.tags, ["customer:42", "vip"], "one-at-a-time path");
        assert!(s.task_get(ids[2]).await.unwrap().unwrap().tags.is_empty());
        // Walk every page of a filter; the ids (as indexes into `ids`).
        let pages = |p: ListParams| {
            let s = s.clone();
            let ids = ids.clone();
            async move {
                let mut seen = Vec::new();
                let mut before = None;
                loop {
                    let page = s
                        .task_list(ListParams {
                            before,
                            limit: 4,
                            ..p.clone()
                        })
                        .await
                        .unwrap();
                    if page.is_empty() {
                        break;
                    }
                    assert!(page.len() <= 4);
                    before = page.last().map(|t| t.id);
                    seen.extend(
                        page.iter()
                            .map(|t| ids.iter().position(|i| *i == t.id).unwrap()),
                    );
                }
                assert!(
                    seen.windows(2).all(|w| w[0] > w[1]),
                    "newest first, no repeats: {seen:?}"
                );
                seen
            }
        };
        let want = |f: &dyn Fn(usize) -> bool| (0..30).rev().filter(|&i| f(i)).collect::<Vec<_>>();
        let tag = |t: &str| ListParams {
            tag: Some(t.into()),
            ..Default::default()
        };
        assert_eq!(pages(tag("customer:42")).await, want(&|i| i % 3 != 2));
        assert_eq!(pages(tag("vip")).await, want(&|i| i % 3 == 1));
        assert!(pages(tag("nobody")).await.is_empty());
        assert_eq!(
            pages(ListParams {
                queue: Some("b".into()),
                ..tag("vip")
            })
            .await,
            want(&|i| i % 3 == 1 && i >= 15)
        );
        let args = |v: serde_json::Value| ListParams {
            args: Some(v),
            ..Default::default()
        };
        assert_eq!(
            pages(args(serde_json::json!({"user": {"id": 3}}))).await,
            want(&|i| i % 5 == 3)
        );
        assert_eq!(
            pages(args(
                serde_json::json!({"user": {"id": 3.0, "plan": "pro"}})
            ))
            .await,
            want(&|i| i % 5 == 3 && i % 2 == 1)
        );
        assert_eq!(
            pages(args(serde_json::json!({"items": [7]}))).await,
            want(&|i| i == 6 || i == 7)
        );
        assert!(
            pages(args(serde_json::json!({"items": 7})))
                .await
                .is_empty()
        );
        assert_eq!(
            pages(ListParams {
                args: Some(serde_json::json!({"user": {"plan": "free"}})),
                ..tag("vip")
            })
            .await,
            want(&|i| i % 3 == 1 && i % 2 == 0)
        );
        assert_eq!(
            pages(ListParams {
                queue: Some("a".into()),
                args: Some(serde_json::json!({"user": {"id": 0}})),
                ..Default::default()
            })
            .await,
            want(&|i| i < 15 && i % 5 == 0)
        );
        // With a state: claim queue a's tasks, then ask for the running vips.
        s.task_claim(claim("a", "n1", 100, now)).await.unwrap();
        assert_eq!(
            pages(ListParams {
                state: Some(TaskState::Running),
                ..tag("vip")
            })
            .await,
            want(&|i| i % 3 == 1 && i < 15)
        );
    }

    /// Unique rules: finished states that hold a key (within a window),
    /// `on_conflict: error` refusing by name, and `replace` (debounce):
    /// a waiting holder takes the new args, run_at and priority; a running
    /// one gives its key up and the new task is queued after it.
    pub async fn unique_rules_hold_finished_keys_refuse_and_replace(b: &Backend) {
        use proto_tasker::OnConflict;
        use proto_tasker::store::UniqueRules;
        let s = b.store.clone();
        let t0 = now();
        let keyed = |key: &str, rules: UniqueRules| {
            let mut t = insert("u", "uq", 0, t0);
            t.unique_key = Some(key.into());
            t.unique = rules;
            t
        };
        let put = |t: proto_tasker::store::TaskInsert, at: DateTime<Utc>| {
            let s = s.clone();
            async move {
                s.task_insert_many(vec![t], at)
                    .await
                    .map(|mut v| v.remove(0))
            }
        };
        let finish = |outcome: Outcome| {
            let s = s.clone();
            async move {
                let got = s.task_claim(claim("uq", "n", 1, t0)).await.unwrap();
                assert_eq!(got.len(), 1);
                s.task_complete_many(vec![Completion::of(&got[0], t0, outcome)])
                    .await
                    .unwrap();
                got[0].clone()
            }
        };
        let done = || Outcome::Completed {
            result: serde_json::json!(1),
        };
        let completed_for = |ms: Option<i64>, on_conflict| UniqueRules {
            finished: vec![TaskState::Completed],
            for_ms: ms,
            on_conflict,
        };
        // `error` names the unfinished holder.
        let w1 = put(keyed("w", UniqueRules::default()), t0).await.unwrap();
        let refuse = UniqueRules {
            on_conflict: OnConflict::Error,
            ..Default::default()
        };
        match put(keyed("w", refuse.clone()), t0).await {
            Err(StoreError::Duplicate {
                id,
                unique_key,
                state,
                ..
            }) => {
                assert_eq!(
                    (id, unique_key.as_str(), state),
                    (w1.task.id, "w", TaskState::Available)
                );
            }
            other => panic!("{other:?}"),
        }
        // Completed: by default the key is free, but a completed holder
        // counts for inserts that say so, within their window.
        finish(done()).await;
        match put(
            keyed("w", completed_for(Some(60_000), OnConflict::Error)),
            t0 + secs(1),
        )
        .await
        {
            Err(StoreError::Duplicate { id, state, .. }) => {
                assert_eq!((id, state), (w1.task.id, TaskState::Completed));
            }
            other => panic!("{other:?}"),
        }
        let kept = put(
            keyed("w", completed_for(None, OnConflict::Keep)),
            t0 + secs(3600),
        )
        .await
        .unwrap();
        assert!(
            kept.existing && kept.task.id == w1.task.id,
            "no window: held until pruned"
        );
        let replaced = put(
            keyed("w", completed_for(Some(60_000), OnConflict::Replace)),
            t0,
        )
        .await
        .unwrap();
        assert!(
            replaced.existing && !replaced.replaced,
            "a finished holder is kept"
        );
        let w2 = put(
            keyed("w", completed_for(Some(1000), OnConflict::Error)),
            t0 + secs(5),
        )
        .await
        .unwrap();
        assert!(!w2.existing, "the window has passed");
        let again = put(keyed("w", UniqueRules::default()), t0).await.unwrap();
        assert_eq!(again.task.id, w2.task.id);
        finish(done()).await;
        // A cancelled task holds its key only where cancelled is named.
        let c1 = put(keyed("c", UniqueRules::default()), t0).await.unwrap();
        s.task_cancel(c1.task.id, t0).await.unwrap();
        let c2 = put(keyed("c", completed_for(None, OnConflict::Keep)), t0)
            .await
            .unwrap();
        assert!(!c2.existing);
        s.task_cancel(c2.task.id, t0).await.unwrap();
        let held = put(
            keyed(
                "c",
                UniqueRules {
                    finished: vec![TaskState::Cancelled, TaskState::Failed],
                    ..Default::default()
                },
            ),
            t0,
        )
        .await
        .unwrap();
        assert_eq!(held.task.id, c2.task.id, "the latest cancelled holder");

        // Debounce: the waiting holder takes the new args, run_at, priority.
        let debounce = UniqueRules {
            on_conflict: OnConflict::Replace,
            ..Default::default()
        };
        let mut d = keyed("d", debounce.clone());
        d.args = serde_json::json!({"v": 1});
        d.run_at = t0 + secs(60);
        d.priority = 5;
        let d1 = put(d.clone(), t0).await.unwrap();
        assert_eq!(d1.task.state, TaskState::Scheduled);
        d.args = serde_json::json!({"v": 2});
        d.run_at = t0;
        d.priority = 1;
        let r = put(d.clone(), t0).await.unwrap();
        assert!(r.existing && r.replaced);
        assert_eq!(r.task.id, d1.task.id);
        assert_eq!(
            (
                r.task.args.clone(),
                r.task.state,
                r.task.priority,
                r.task.run_at
            ),
            (serde_json::json!({"v": 2}), TaskState::Available, 1, t0)
        );
        let stored = s.task_get(d1.task.id).await.unwrap().unwrap();
        assert_eq!(stored.args, serde_json::json!({"v": 2}));
        // Running: left alone; the new task is queued after it.
        let running = s.task_claim(claim("uq", "n", 1, t0)).await.unwrap();
        assert_eq!(running[0].id, d1.task.id);
        d.args = serde_json::json!({"v": 3});
        let d2 = put(d.clone(), t0).await.unwrap();
        assert!(!d2.existing && d2.task.id != d1.task.id);
        let still = s.task_get(d1.task.id).await.unwrap().unwrap();
        assert_eq!(
            (still.state, still.args),
            (TaskState::Running, serde_json::json!({"v": 2}))
        );
        d.args = serde_json::json!({"v": 4});
        let r = put(d.clone(), t0).await.unwrap();
        assert!(
            r.replaced && r.task.id == d2.task.id,
            "the new one is the holder now"
        );
        // The old run failing back to retryable breaks nothing: it gave the key up.
        s.task_complete_many(vec![Completion::of(
            &running[0],
            t0,
            Outcome::Retry {
                run_at: t0 + secs(30),
                error: "boom".into(),
            },
        )])
        .await
        .unwrap();
        assert_eq!(
            s.task_get(d1.task.id).await.unwrap().unwrap().state,
            TaskState::Retryable
        );
        let keep = put(keyed("d", UniqueRules::default()), t0).await.unwrap();
        assert_eq!(keep.task.id, d2.task.id);
        // A refusal inside a batch refuses the batch.
        let fresh = insert("u", "uq", 0, t0);
        let in_queue = || async {
            s.task_list(ListParams {
                queue: Some("uq".into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap()
            .len()
        };
        let n_before = in_queue().await;
        let e = s
            .task_insert_many(vec![fresh, keyed("d", refuse)], t0)
            .await
            .unwrap_err();
        assert!(matches!(e, StoreError::Duplicate { .. }), "{e:?}");
        let n_after = in_queue().await;
        assert_eq!(n_before, n_after, "nothing of the batch went in");
    }

    /// Replace and refuse under concurrent enqueues of one key, with a
    /// claimer taking tasks meanwhile: every enqueue succeeds (replace) or
    /// is refused by name (error), and at most one task with the key ever
    /// waits; an insert racing its finished-holder's completion returns
    /// the holder, never a second task.
    pub async fn unique_rules_hold_under_concurrent_enqueues(b: &Backend) {
        use proto_tasker::OnConflict;
        use proto_tasker::store::UniqueRules;
        let s = b.store.clone();
        let t0 = now();
        let keyed = |key: &str, on_conflict, i: usize| {
            let mut t = insert("u", "cq", 0, t0);
            t.unique_key = Some(key.into());
            t.args = serde_json::json!({"i": i});
            t.unique = UniqueRules {
                on_conflict,
                ..Default::default()
            };
            t
        };
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let claimer = {
            let (s, stop) = (s.clone(), stop.clone());
            tokio::spawn(async move {
                let mut n = 0;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    n += s
                        .task_claim(claim("cq", "n", 1, Utc::now()))
                        .await
                        .unwrap()
                        .len();
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
                n
            })
        };
        let mut handles = Vec::new();
        for w in 0..6 {
            let s = s.clone();
            let one = keyed("r", OnConflict::Replace, 0);
            handles.push(tokio::spawn(async move {
                for i in 0..15 {
                    let mut t = one.clone();
                    t.args = serde_json::json!({"i": w * 100 + i});
                    s.task_insert_many(vec![t], Utc::now()).await.unwrap();
                }
            }));
        }
        for h in handles {
            h.await.unwrap();
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let claimed = claimer.await.unwrap();
        let all = s
            .task_list(ListParams {
                queue: Some("cq".into()),
                limit: 1000,
                ..Default::default()
            })
            .await
            .unwrap();
        let waiting = all.iter().filter(|t| t.state != TaskState::Running).count();
        assert!(waiting <= 1, "{waiting} tasks wait with one key: {all:#?}");
        assert_eq!(
            all.len(),
            claimed + waiting,
            "every task was claimed or is the one waiting"
        );
        // Refuse: exactly one of the racers gets in.
        let mut handles = Vec::new();
        for i in 0..8 {
            let s = s.clone();
            let t = keyed("e", OnConflict::Error, i);
            handles.push(tokio::spawn(async move {
                s.task_insert_many(vec![t], Utc::now()).await
            }));
        }
        let mut ok = 0;
        for h in handles {
            match h.await.unwrap() {
                Ok(v) => {
                    assert!(!v[0].existing);
                    ok += 1;
                }
                Err(StoreError::Duplicate { unique_key, .. }) => assert_eq!(unique_key, "e"),
                Err(e) => panic!("{e:?}"),
            }
        }
        assert_eq!(ok, 1);
        // A completed holder within the window holds the key even when the
        // insert races its completion.
        for round in 0..20 {
            let key = format!("f{round}");
            let mut h = keyed(&key, OnConflict::Keep, round);
            h.queue = "fq".into();
            let holder = s
                .task_insert_many(vec![h.clone()], t0)
                .await
                .unwrap()
                .remove(0)
                .task;
            let run = s
                .task_claim(claim("fq", "n", 1, t0))
                .await
                .unwrap()
                .remove(0);
            assert_eq!(run.id, holder.id);
            h.unique.finished = vec![TaskState::Completed];
            h.unique.for_ms = Some(60_000);
            let (s1, s2) = (s.clone(), s.clone());
            let finishing = tokio::spawn(async move {
                s1.task_complete_many(vec![Completion::of(
                    &run,
                    Utc::now(),
                    Outcome::Completed {
                        result: serde_json::json!(1),
                    },
                )])
                .await
                .unwrap()
            });
            let inserting =
                tokio::spawn(
                    async move { s2.task_insert_many(vec![h], Utc::now()).await.unwrap() },
                );
            let got = inserting.await.unwrap().remove(0);
            finishing.await.unwrap();
            assert!(
                got.existing && got.task.id == holder.id,
                "round {round}: {got:?}"
            );
        }
    }

    /// Round robin (`fairness: round_robin`): a key that enqueued many tasks
    /// and a key that enqueued a few after it take turns; priority still
    /// comes first; tasks from before the switch go first; a plain queue
    /// keeps the plain order.
    pub async fn round_robin_claims_take_keys_in_turn(b: &Backend) {
        use proto_tasker::store::{Fairness, QueueLimits, QueueSettings};
        let s = b.store.clone();
        let t0 = now();
        let rr = QueueLimits {
            round_robin: true,
            ..Default::default()
        };
        let fair = |q: &str| {
            let s = s.clone();
            let q = q.to_string();
            async move {
                s.queue_settings_put(
                    &q,
                    QueueSettings {
                        fairness: Some(Fairness::RoundRobin),
                        ..Default::default()
                    },
                    false,
                )
                .await
                .unwrap()
            }
        };
        let keyed = |kind: &str, q: &str, key: &str, prio: i16| {
            let mut t = insert(kind, q, prio, t0 - secs(1));
            t.concurrency_key = Some(key.into());
            t
        };
        let take = |q: &str, n: usize, limits: Option<QueueLimits>| {
            let s = s.clone();
            let q = q.to_string();
            async move {
                let mut p = claim(&q, "n1", n, t0);
                p.limits = limits;
                let mut got = s.task_claim(p).await.unwrap();
                got.sort_by_key(|t| t.id);
                got.iter()
                    .map(|t| t.concurrency_key.clone().unwrap_or_default())
                    .collect::<Vec<_>>()
            }
        };
        // A task from before the switch, then the switch: round-robin
        // claims take it once it is adopted (a pool does that on seeing
        // the switch), first.
        s.task_insert_many(vec![keyed("old", "rr", "big", 5)], t0)
            .await
            .unwrap();
        fair("rr").await;
        assert!(take("rr", 5, Some(rr)).await.is_empty(), "not adopted yet");
        assert_eq!(s.queue_fair_adopt("rr").await.unwrap(), 1);
        assert_eq!(s.queue_fair_adopt("rr").await.unwrap(), 0);
        let big: Vec<_> = (0..200).map(|_| keyed("k", "rr", "big", 5)).collect();
        s.task_insert_many(big, t0).await.unwrap();
        let mut small: Vec<_> = (0..5).map(|_| keyed("k", "rr", "small", 5)).collect();
        // One goes in alone, by the one-at-a-time path (a unique key).
        small[4].unique_key = Some("u".into());
        s.task_insert_many(small[..4].to_vec(), t0).await.unwrap();
        s.task_insert_many(small[4..].to_vec(), t0).await.unwrap();
        let first = take("rr", 11, Some(rr)).await;
        let n_small = first.iter().filter(|k| *k == "small").count();
        assert_eq!(
            n_small, 5,
            "the 5 small tasks share the first claim: {first:?}"
        );
        assert_eq!(first.len(), 11);
        // A key arriving now is interleaved with big's backlog at once.
        let late: Vec<_> = (0..3).map(|_| keyed("k", "rr", "late", 5)).collect();
        s.task_insert_many(late, t0).await.unwrap();
        let second = take("rr", 6, Some(rr)).await;
        assert_eq!(
            second.iter().filter(|k| *k == "late").count(),
            3,
            "{second:?}"
        );
        // Priority first: an urgent task of the big key goes before all.
        s.task_insert_many(vec![keyed("urgent", "rr", "big", 0)], t0)
            .await
            .unwrap();
        let mut p = claim("rr", "n1", 1, t0);
        p.limits = Some(rr);
        let got = s.task_claim(p).await.unwrap();
        assert_eq!(got[0].kind, "urgent");
        // The old task (before the switch) went in the first claim.
        let old = s
            .task_list(ListParams {
                kind: Some("old".into()),
                limit: 1,
                ..Default::default()
            })
            .await
            .unwrap();
        assert_eq!(old[0].state, TaskState::Running);
        // The same backlog in a plain queue: the small key waits its turn.
        let big: Vec<_> = (0..50).map(|_| keyed("k", "plain", "big", 5)).collect();
        s.task_insert_many(big, t0).await.unwrap();
        let small: Vec<_> = (0..5).map(|_| keyed("k", "plain", "small", 5)).collect();
        s.task_insert_many(small, t0).await.unwrap();
        let plain = take("plain", 10, None).await;
        assert!(plain.iter().all(|k| k == "big"), "{plain:?}");
        // Round robin with a per-key limit: both hold.
        fair("both").await;
        let mut rows: Vec<_> = (0..30).map(|_| keyed("k", "both", "big", 5)).collect();
        rows.extend((0..30).map(|_| keyed("k", "both", "small", 5)));
        s.task_insert_many(rows, t0).await.unwrap();
        let limited = QueueLimits {
            round_robin: true,
            per_key_concurrency: Some(2),
            ..Default::default()
        };
        let got = take("both", 10, Some(limited)).await;
        assert_eq!(got.iter().filter(|k| *k == "big").count(), 2, "{got:?}");
        assert_eq!(got.iter().filter(|k| *k == "small").count(), 2, "{got:?}");
    }

    /// A cap set through one handle (another node) refuses the next
    /// enqueues of every other handle at once, not when their cached list of
    /// capped queues runs out (on PostgreSQL the change is announced by
    /// NOTIFY; SQLite's writer reads the cap itself).
    pub async fn a_cap_set_elsewhere_applies_at_once(b: &Backend) {
        use proto_tasker::store::QueueSettings;
        let handles = b.nodes(2).await;
        let (here, there) = (&handles[0], &handles[1]);
        let now = now();
        // This handle has just looked: no cap on `soon`.
        here.task_insert_many(vec![insert("x", "soon", 0, now)], now)
            .await
            .unwrap();
        there
            .queue_settings_put(
                "soon",
                QueueSettings {
                    max_depth: Some(1),
                    ..Default::default()
                },
                false,
            )
            .await
            .unwrap();
        let set = std::time::Instant::now();
        let mut let_through = 0;
        loop {
            match here
                .task_insert_many(vec![insert("x", "soon", 0, now)], now)
                .await
            {
                Err(StoreError::QueueFull { .. }) => break,
                Ok(_) => let_through += 1,
                Err(e) => panic!("{e:?}"),
            }
            assert!(
                set.elapsed() < Duration::from_millis(500),
                "{let_through} enqueues went past the new cap in {:?}",
                set.elapsed()
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    /// A limit written by another node holds at once, before this node
    /// reads it: whatever limits a claim brings (none, or the ones it read
    /// before the change), what runs afterwards stays within the stored
    /// ones, and a starting insert starts nothing past them. (PostgreSQL
    /// claims that bring none take nothing until they read them; SQLite's
    /// apply the stored ones.)
    pub async fn a_limit_set_elsewhere_applies_at_once(b: &Backend) {
        use proto_tasker::store::{Fairness, QueueSettings, RateLimit};
        let handles = b.nodes(2).await;
        let (here, there) = (&handles[0], &handles[1]);
        let now = now();
        let keyed = |k: &str| {
            let mut t = insert("x", "lim", 0, now);
            t.concurrency_key = Some(k.into());
            t
        };
        here.task_insert_many((0..4).flat_map(|_| [keyed("a"), keyed("b")]).collect(), now)
            .await
            .unwrap();
        let put = async |settings: QueueSettings| {
            there
                .queue_settings_put("lim", settings, false)
                .await
                .unwrap();
        };
        // A claim that has not read the settings: no limits.
        let unaware = |limit| claim("lim", "n1", limit, now);
        let mut running: Vec<proto_tasker::Task> = Vec::new();
        let workers_only = QueueSettings {
            workers: Some(3),
            fairness: Some(Fairness::None),
            ..Default::default()
        };
        put(workers_only).await;
        running.extend(here.task_claim(unaware(1)).await.unwrap());
        assert_eq!(running.len(), 1, "no limit stored: a claim takes");

        // A global limit of 2, set elsewhere.
        let global = QueueSettings {
            global_concurrency: Some(2),
            ..workers_only
        };
        put(global).await;
        running.extend(here.task_claim(unaware(10)).await.unwrap());
        assert!(
            running.len() <= 2,
            "a claim that had not read global_concurrency 2 left {} running",
            running.len()
        );
        let started = here
            .task_insert_started(keyed("c"), "n1", now)
            .await
            .unwrap()
            .task;
        assert_eq!(
            started.state,
            TaskState::Available,
            "a node that had not read the limit started a task as it was inserted"
        );
        // Lowered to 1: a claim that still brings 2 takes nothing more.
        put(QueueSettings {
            global_concurrency: Some(1),
            ..global
        })
        .await;
        let stale = ClaimParams {
            limits: global.limits(),
            ..unaware(10)
        };
        let got = here.task_claim(stale).await.unwrap();
        assert!(
            got.is_empty(),
            "a claim that brought global_concurrency 2 took {} past the new 1 ({} running)",
            got.len(),
            running.len()
        );
        complete_all(here, &std::mem::take(&mut running), now).await;

        // One per key.
        let per_key = QueueSettings {
            per_key_concurrency: Some(1),
            ..workers_only
        };
        put(per_key).await;
        running.extend(here.task_claim(unaware(10)).await.unwrap());
        let mut keys: Vec<_> = running.iter().map(|t| t.concurrency_key.clone()).collect();
        keys.sort();
        let n = keys.len();
        keys.dedup();
        assert_eq!(
            keys.len(),
            n,
            "a claim that had not read per_key_concurrency 1 ran a key twice"
        );
        complete_all(here, &std::mem::take(&mut running), now).await;

        // One start a minute.
        put(QueueSettings {
            rate_limit: Some(RateLimit {
                max: 1,
                per_ms: 60_000,
            }),
            ..workers_only
        })
        .await;
        let mut starts = 0;
        for _ in 0..2 {
            let got = here.task_claim(unaware(10)).await.unwrap();
            starts += got.len();
            running.extend(got);
        }
        assert!(
            starts <= 1,
            "claims that had not read a rate of 1 a minute started {starts}"
        );
        complete_all(here, &std::mem::take(&mut running), now).await;

        // Removed at run time (a write with no limits, as the API makes):
        // claims that bring none take the rest.
        put(workers_only).await;
        let rest = here.task_claim(unaware(20)).await.unwrap();
        assert!(
            rest.len() > 1,
            "limits removed at run time, yet a claim took {}",
            rest.len()
        );
    }

    /// An insert whose unique key is held by a task finishing at that very
    /// moment either returns that task or inserts a new one; it never fails.
    pub async fn unique_inserts_racing_a_finishing_holder_never_fail(b: &Backend) {
        let stores = b.nodes(3).await;
        let mut racers = Vec::new();
        for (i, s) in stores.into_iter().enumerate() {
            racers.push(tokio::spawn(async move {
                for round in 0..150 {
                    let now = now();
                    let mut row = insert("u", "uq", 0, now);
                    row.unique_key = Some("the-key".into());
                    let got = s
                        .task_insert_many(vec![row], now)
                        .await
                        .unwrap_or_else(|e| panic!("racer {i} round {round}: {e}"));
                    assert_eq!(got.len(), 1);
                    // Finish whatever holds the key, so the others race a
                    // holder that is leaving.
                    for t in s.task_claim(claim("uq", "n", 5, now)).await.unwrap() {
                        let c = Completion::of(
                            &t,
                            now,
                            Outcome::Completed {
                                result: serde_json::json!(null),
                            },
                        );
                        s.task_complete_many(vec![c]).await.unwrap();
                    }
                }
            }));
        }
        for r in racers {
            r.await.unwrap();
        }
    }

    /// One process holds a node's name: a second instance is refused while
    /// the first heartbeats, may take over a dead one, and the first then
    /// learns from its next heartbeat that the name is gone.
    pub async fn one_instance_holds_a_node_name(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        let first = node("same", now);
        let mut second = node("same", now + secs(1));
        second.instance = "test/same/second".into();
        let live_since = now - secs(15);
        assert!(
            s.node_register(first.clone(), live_since, None)
                .await
                .unwrap()
                .is_none()
        );
        assert!(s.node_heartbeat(first.clone()).await.unwrap());
        let holder = s
            .node_register(second.clone(), live_since, None)
            .await
            .unwrap()
            .expect("the first instance holds the name");
        assert_eq!(holder.instance, first.instance);
        // Its heartbeat has gone stale: the name is free.
        let later = now + secs(30);
        let mut second_later = second.clone();
        second_later.heartbeat_at = later;
        assert!(
            s.node_register(second_later.clone(), later - secs(15), None)
                .await
                .unwrap()
                .is_none()
        );
        // The first, back from a pause, finds its name taken.
        assert!(!s.node_heartbeat(first.clone()).await.unwrap());
        assert!(s.node_heartbeat(second_later.clone()).await.unwrap());
        // A holder known to be dead is taken over at once.
        let mut third = node("same", later);
        third.instance = "test/same/third".into();
        assert!(
            s.node_register(third.clone(), later - secs(15), None)
                .await
                .unwrap()
                .is_some()
        );
        assert!(
            s.node_register(third, later - secs(15), Some(second.instance.clone()))
                .await
                .unwrap()
                .is_none()
        );
        assert!(!s.node_heartbeat(second_later).await.unwrap());
    }

    /// The audit trail keeps entries in order, pages by cursor, and the
    /// prune of its retention removes old ones.
    pub async fn the_audit_trail_appends_pages_and_prunes(b: &Backend) {
        use proto_tasker::store::AuditEntry;
        let s = b.store.clone();
        let now = now();
        for i in 0..5 {
            s.audit_append(AuditEntry {
                id: 0,
                at: now - secs(100 - i),
                token: format!("t{i}"),
                remote: "127.0.0.1:1".into(),
                action: "POST /tasks/{id}/cancel".into(),
                target: format!("/tasks/{i}/cancel"),
                status: 200,
                outcome: "ok".into(),
            })
            .await
            .unwrap();
        }
        let page = s.audit_list(None, 3).await.unwrap();
        let tokens: Vec<_> = page.iter().map(|e| e.token.as_str()).collect();
        assert_eq!(tokens, ["t4", "t3", "t2"]);
        assert_eq!(page[0].at, now - secs(96));
        let rest = s.audit_list(Some(page[2].id), 10).await.unwrap();
        assert_eq!(rest.len(), 2);
        s.task_prune(PruneParams {
            completed_before: None,
            failed_before: None,
            cancelled_before: None,
            audit_before: Some(now - secs(97)),
            limit: 100,
        })
        .await
        .unwrap();
        assert_eq!(s.audit_list(None, 10).await.unwrap().len(), 2);
    }

    /// Every write that finishes tasks announces them (outcomes, a cancel,
    /// a rescue with no attempt left, and the dependents they end); on
    /// PostgreSQL other nodes that said they wait hear it too. `task_unfinished` lists, in one
    /// read, which ids still wait.
    pub async fn finishes_are_announced(b: &Backend) {
        use proto_tasker::task::Dependency;
        let s = b.store.clone();
        let other = b.another().await;
        let now = now();
        let mut parent = insert("parent", "q", 0, now);
        parent.max_attempts = 1;
        let ids = insert_ids(
            &s,
            vec![
                parent,
                insert("queued", "q2", 0, now),
                insert("later", "q", 0, now + secs(3600)),
            ],
            now,
        )
        .await;
        let mut child = insert("child", "q", 0, now);
        child.depends_on = vec![Dependency::Task(ids[0])];
        let child = s.task_insert_many(vec![child], now).await.unwrap()[0]
            .task
            .id;
        let mut mine = s.subscribe();
        let mut theirs = other.subscribe();
        // The other handle's process waits for tasks (so it is told of
        // finishes: see `finishes_are_announced_only_while_another_process_waits`
        // in tests/waiting.rs).
        other
            .announce_waiting(Duration::from_secs(30))
            .await
            .unwrap();
        // Give the other handle's listener time to be listening.
        tokio::time::sleep(Duration::from_millis(300)).await;
        while theirs.try_recv().is_ok() {}

        async fn finished(
            rx: &mut tokio::sync::broadcast::Receiver<StoreEvent>,
        ) -> HashSet<proto_tasker::TaskId> {
            loop {
                match tokio::time::timeout(Duration::from_secs(5), rx.recv()).await {
                    Ok(Ok(StoreEvent::Finished { ids })) => return ids.iter().copied().collect(),
                    Ok(Ok(_)) => continue,
                    other => panic!("no finish announced: {other:?}"),
                }
            }
        }

        let run = s
            .task_claim(claim("q", "n1", 1, now))
            .await
            .unwrap()
            .remove(0);
        assert_eq!(run.id, ids[0]);
        s.task_complete_many(vec![Completion::of(
            &run,
            now,
            Outcome::Failed {
                error: "boom".into(),
            },
        )])
        .await
        .unwrap();
        let expect: HashSet<_> = [ids[0], child].into();
        assert_eq!(
            finished(&mut mine).await,
            expect,
            "the failure and its dependent"
        );
        if b.kind == fixtures::BackendKind::Postgres {
            assert_eq!(finished(&mut theirs).await, expect, "heard on another node");
        }

        s.task_cancel(ids[1], now).await.unwrap();
        assert_eq!(finished(&mut mine).await, [ids[1]].into());

        let mut last = insert("last", "q3", 0, now);
        last.max_attempts = 1;
        let last = s.task_insert_many(vec![last], now).await.unwrap()[0]
            .task
            .id;
        s.task_claim(claim("q3", "dead", 1, now)).await.unwrap();
        s.node_rescue(RescueParams {
            node: Some("dead".into()),
            now,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(
            finished(&mut mine).await,
            [last].into(),
            "rescued with no attempt left"
        );

        let gone = proto_tasker::TaskId(i64::MAX - 7);
        let open = s
            .task_unfinished(vec![ids[0], ids[1], ids[2], child, last, gone])
            .await
            .unwrap();
        assert_eq!(open, [ids[2]], "only the delayed task is unfinished");
        assert!(s.task_unfinished(Vec::new()).await.unwrap().is_empty());
    }

    pub async fn nodes_register_and_deregister(b: &Backend) {
        let s = b.store.clone();
        let now = now();
        s.node_heartbeat(node("n1", now)).await.unwrap();
        s.node_heartbeat(node("n2", now)).await.unwrap();
        let mut later = node("n1", now + secs(2));
        later.stats.completed = 41;
        later.stats.failed = 2;
        s.node_heartbeat(later).await.unwrap();
        assert!(
            s.leader_try_elect("n2", Duration::from_secs(30), Utc::now())
                .await
                .unwrap()
        );
        let nodes = s.node_list(chrono::Utc::now()).await.unwrap();
        assert_eq!(nodes.len(), 2);
        assert_eq!(nodes[0].heartbeat_at, now + secs(2));
        assert_eq!(nodes[0].stats.completed, 41);
        assert_eq!(nodes[0].stats.failed, 2);
        assert!(nodes.iter().any(|n| n.name == "n2" && n.leader));
        s.node_remove("n2").await.unwrap();
        assert_eq!(s.node_list(chrono::Utc::now()).await.unwrap().len(), 1);
    }
}

macro_rules! conformance {
    ($backend:expr; $($module:ident :: $case:ident),* $(,)?) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let backend = $backend.await;
                crate::$module::$case(&backend).await;
                backend.assert_nothing_outlived_a_transaction();
            }
        )*
    };
}

macro_rules! all_cases {
    ($backend:expr) => {
        conformance!($backend;
            cases::claim_orders_by_priority_then_run_at,
            cases::concurrent_claimers_never_share_a_task,
            cases::delayed_tasks_are_not_claimed_early,
            cases::retries_follow_the_backoff,
            cases::unique_keys_dedupe_unfinished_tasks,
            cases::unique_rules_hold_finished_keys_refuse_and_replace,
            cases::unique_rules_hold_under_concurrent_enqueues,
            cases::cancel_stops_queued_and_flags_running,
            cases::retry_by_hand_revives_dead_tasks,
            cases::completions_are_fenced_by_attempt,
            cases::snooze_and_release_do_not_use_attempts,
            cases::rescue_returns_tasks_of_dead_nodes_once,
            cases::retention_prunes_only_old_finished_tasks,
            cases::one_leader_at_a_time,
            cases::list_filters_and_paginates,
            cases::tags_and_args_filter_with_paging,
            cases::queue_listing_and_counts_span_states,
            cases::queue_lag_is_the_wait_of_the_oldest_due_task,
            cases::references_are_kept_on_both_insert_paths,
            cases::trace_context_is_kept_on_every_insert_path,
            cases::one_state_lists_merge_every_queue,
            cases::a_task_starts_as_inserted_only_where_a_claim_could_take_it,
            cases::progress_lands_under_its_runs_claim_token,
            cases::nodes_register_and_deregister,
            cases::paused_queues_are_not_claimed,
            cases::schedules_fire_each_tick_once,
            cases::schedules_pause_and_resume,
            cases::queue_max_depth_caps_unfinished_tasks,
            cases::queue_max_depth_holds_under_concurrent_batches,
            cases::a_cap_set_elsewhere_applies_at_once,
            cases::a_limit_set_elsewhere_applies_at_once,
            cases::workflows_unblock_and_cascade,
            cases::per_key_claims_skip_keys_at_their_limit,
            cases::round_robin_claims_take_keys_in_turn,
            cases::late_outcomes_of_an_earlier_run_are_fenced_by_the_claim_token,
            cases::a_batch_applies_one_outcome_per_task,
            cases::cancel_is_final_whatever_the_attempt_reports,
            cases::outcomes_with_nul_or_huge_errors_are_stored_alike,
            cases::retry_of_a_cancelled_blocked_task_waits_for_its_parents,
            cases::pruning_and_finishing_leave_no_bookkeeping_rows,
            cases::unique_inserts_racing_a_finishing_holder_never_fail,
            cases::one_instance_holds_a_node_name,
            cases::the_audit_trail_appends_pages_and_prunes,
            cases::finishes_are_announced,
            limits::limits_per_key_and_global_hold_across_nodes,
            limits::limits_rate_holds_across_nodes,
            limits::limits_a_saturated_key_does_not_starve_others,
            plans::dashboard_reads_use_indexes_with_a_million_tasks,
        );
    };
}

/// A case written in `cases` or `conformance/` but left off `all_cases!`
/// would never run: this fails until it is listed.
#[test]
fn every_case_runs_on_every_store() {
    let this = include_str!("store_conformance.rs");
    let (cases, rest) = this
        .split_once("macro_rules! conformance")
        .expect("the macros follow the cases");
    let listed = rest
        .split_once("macro_rules! all_cases")
        .map(|(_, l)| l)
        .unwrap_or_default();
    let sources = [
        ("cases", cases),
        ("limits", include_str!("conformance/limits.rs")),
        ("plans", include_str!("conformance/plans.rs")),
    ];
    let mut defined = 0;
    for (module, src) in sources {
        for f in src.split("pub async fn ").skip(1) {
            let Some((name, _)) = f.split_once('(') else {
                continue;
            };
            defined += 1;
            assert!(
                listed.contains(&format!("{module}::{name},")),
                "case {module}::{name} is not in all_cases!"
            );
        }
    }
    assert!(defined > 20, "found only {defined} cases");
}

mod sqlite {
    all_cases!(crate::fixtures::Backend::sqlite());
}

mod postgres {
    all_cases!(crate::fixtures::Backend::postgres());
}

/// The PostgreSQL store through PgBouncer in transaction pooling mode:
/// nothing the store does may outlive a transaction.
mod pgbouncer {
    all_cases!(crate::fixtures::Backend::pgbouncer());

    /// The relay the cases above go through sees a statement that outlives
    /// its transaction, and passes one that does not.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_relay_sees_what_outlives_a_transaction() {
        let watch = crate::fixtures::pgbouncer::Watch::start().await;
        let url = watch.options("public").url;
        let (mut client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .expect("connect through the relay");
        tokio::spawn(conn);

        // Prepared, used and closed inside one transaction: allowed.
        let tx = client.transaction().await.expect("begin");
        let rows = tx.query("SELECT $1::int", &[&1i32]).await.expect("query");
        drop(rows);
        tx.commit().await.expect("commit");
        client.simple_query("SELECT 1").await.expect("sync");
        assert_eq!(watch.breaches(), Vec::<String>::new());

        // Rows keep their statement: held past COMMIT, its Close comes after.
        let tx = client.transaction().await.expect("begin");
        let rows = tx
            .query("SELECT $1::int + 1", &[&1i32])
            .await
            .expect("query");
        tx.commit().await.expect("commit");
        drop(rows);
        client
            .prepare("SELECT 2")
            .await
            .expect("prepare outside a transaction");
        client
            .batch_execute("SET work_mem = '8MB'")
            .await
            .expect("set");
        let found = watch.breaches();
        assert_eq!(found.len(), 3, "{found:#?}");
        assert!(
            found[0].contains("still open at COMMIT: SELECT $1::int + 1"),
            "{found:#?}"
        );
        assert!(
            found[1].contains("prepared outside a transaction: SELECT 2"),
            "{found:#?}"
        );
        assert!(found[2].contains("a session SET"), "{found:#?}");
    }
}
