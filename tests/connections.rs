//! The connection budget: what a node holds on PostgreSQL, how its few
//! connections are shared, and many nodes through PgBouncer.

mod fixtures;

use std::sync::Arc;
use std::time::{Duration, Instant};

use proto_tasker::store::{ListParams, NodeInfo, PostgresOptions, PostgresStore};
use proto_tasker::{Store, StoreError};

fn node(name: &str) -> NodeInfo {
    let mut n = fixtures::node_info(name, chrono::Utc::now());
    n.workers = 1;
    n
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

/// A node's store on the default pool (two connections), registered as
/// `n1`; `listening: false` is transaction pooling without `listen_url`,
/// so the store has no LISTEN connection and heartbeats take a pooled one.
async fn registered_store(guard: &fixtures::PgSchema, listening: bool) -> Arc<PostgresStore> {
    let mut options = PostgresOptions::new(guard.url.clone()).schema(guard.schema.clone());
    if !listening {
        options.pool_mode = proto_tasker::store::PoolMode::Transaction;
    }
    let store = Arc::new(PostgresStore::connect(options).await.unwrap());
    assert!(
        store
            .node_register(node("n1"), chrono::Utc::now(), None)
            .await
            .unwrap()
            .is_none()
    );
    store
}

/// Another session, holding the tasks table locked: every statement on
/// tasks waits until it commits.
async fn lock_tasks(guard: &fixtures::PgSchema) -> tokio_postgres::Client {
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
    locker
}

/// A dashboard page stuck behind a lock holds at most all but one of the
/// pool's connections: a heartbeat that needs a pooled connection (the
/// store has no LISTEN connection) still gets one at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_dashboard_read_never_holds_every_connection() {
    let (_, guard) = fixtures::pg_store().await;
    let store = registered_store(&guard, false).await;
    let locker = lock_tasks(&guard).await;
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

/// A heartbeat never waits for a pooled connection: with claims stuck
/// behind a lock on every pooled connection (and more queued for one), the
/// heartbeat still lands at once, on the connection that listens. With a
/// hundred nodes draining one queue, heartbeats waited behind claims and
/// completions until healthy nodes were taken for dead. Without a
/// listening connection (transaction pooling, no `listen_url`) heartbeats
/// share the pool, as the dashboard test above shows they can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_never_waits_behind_pooled_work() {
    let (_, guard) = fixtures::pg_store().await;
    let store = registered_store(&guard, true).await;
    // Wait for the listening connection (its last statement is the LISTEN).
    let (admin, conn) = tokio_postgres::connect(&guard.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let listening: i64 = admin
            .query_one(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = $1 AND query LIKE 'LISTEN%'",
                &[&format!("proto_tasker:{}", guard.schema)],
            )
            .await
            .unwrap()
            .get(0);
        if listening == 1 {
            break;
        }
        assert!(Instant::now() < deadline, "the store never listened");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let locker = lock_tasks(&guard).await;
    let claims: Vec<_> = (0..3)
        .map(|_| {
            let s = store.clone();
            tokio::spawn(async move { s.task_claim(claim_of("q", 100)).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let beat = tokio::time::timeout(Duration::from_secs(10), store.node_heartbeat(node("n1")))
        .await
        .map(|b| b.map_err(|e| e.to_string()));
    let took = t.elapsed();
    locker.batch_execute("COMMIT").await.unwrap();
    assert!(matches!(beat, Ok(Ok(true))), "{beat:?}");
    assert!(
        took < Duration::from_secs(1),
        "the heartbeat waited {took:?} behind claims"
    );
    for c in claims {
        let got: Result<_, StoreError> = c.await.unwrap();
        assert!(got.is_ok(), "{got:?}");
    }
    assert!(connections_of(&guard.url, &guard.schema).await <= 3);
}

/// Twenty stores on one schema, each registered as a node serving `q` with
/// ten free workers and heartbeating: how many of them a NOTIFY of `tasks`
/// new tasks in `q` (from a store that is no node) wakes.
async fn woken_by(tasks: usize) -> usize {
    use std::sync::atomic::{AtomicUsize, Ordering};
    let (producer, guard) = fixtures::pg_store().await;
    let mut nodes = Vec::new();
    for i in 0..20 {
        let s = Arc::new(
            PostgresStore::connect(
                PostgresOptions::new(guard.url.clone()).schema(guard.schema.clone()),
            )
            .await
            .unwrap(),
        );
        let mut n = node(&format!("n-{i:02}"));
        n.workers = 10;
        n.queues = vec!["q".into()];
        assert!(
            s.node_register(n.clone(), chrono::Utc::now(), None)
                .await
                .unwrap()
                .is_none()
        );
        nodes.push((s, n));
    }
    for (s, n) in &nodes {
        assert!(s.node_heartbeat(n.clone()).await.unwrap());
    }
    // Every listener is connected (and has had its wake-up on connecting).
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let woken = Arc::new(AtomicUsize::new(0));
    let waiting: Vec<_> = nodes
        .iter()
        .map(|(s, _)| {
            let notify = s.work_notifier();
            let woken = woken.clone();
            tokio::spawn(async move {
                notify.notified().await;
                woken.fetch_add(1, Ordering::SeqCst);
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rows = (0..tasks)
        .map(|_| fixtures::insert("k", "q", 0, chrono::Utc::now()))
        .collect();
    producer
        .task_insert_many(rows, chrono::Utc::now())
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for w in waiting {
        w.abort();
    }
    woken.load(Ordering::SeqCst)
}

/// One new task wakes one node and a spare, not all twenty listening; a
/// batch that needs every node's free workers wakes every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_work_wakes_a_few_nodes_not_every_node() {
    let one = woken_by(1).await;
    assert!((1..=2).contains(&one), "one task woke {one} of 20 nodes");
    let many = woken_by(500).await;
    assert_eq!(many, 20, "500 tasks need every node's 10 free workers");
}

/// Whether `events` (a store's) tell that queue settings changed within
/// `within`.
async fn hears_settings_change(
    events: &mut tokio::sync::broadcast::Receiver<proto_tasker::store::StoreEvent>,
    within: Duration,
) -> bool {
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, events.recv()).await {
            Err(_) => return false,
            Ok(Ok(proto_tasker::store::StoreEvent::SettingsChanged)) => return true,
            Ok(_) => {}
        }
    }
}

/// Writing queue settings that are already stored tells no node: a
/// hundred nodes starting, each writing its config's starting values,
/// made every node read the settings again for each of them (4,540 reads
/// of the settings in a 100-node bench, about 45 a node). A change still
/// reaches every node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn settings_written_unchanged_wake_no_node() {
    let (writer, guard) = fixtures::pg_store().await;
    let listener = registered_store(&guard, true).await;
    let limits = proto_tasker::store::QueueLimits {
        global_concurrency: Some(10),
        ..Default::default()
    };
    let settings = proto_tasker::store::QueueSettings::default().with_limits(&limits);
    let mut events = listener.subscribe();
    // Every listener is connected (and has had its wake-up on connecting).
    tokio::time::sleep(Duration::from_millis(1000)).await;
    while events.try_recv().is_ok() {}
    writer
        .queue_settings_put("q", settings, true)
        .await
        .unwrap();
    assert!(
        hears_settings_change(&mut events, Duration::from_secs(5)).await,
        "a node did not hear of new settings"
    );
    // A starting node's values, and an update to the same values.
    writer
        .queue_settings_put("q", settings, true)
        .await
        .unwrap();
    writer
        .queue_settings_put("q", settings, false)
        .await
        .unwrap();
    assert!(
        !hears_settings_change(&mut events, Duration::from_millis(1500)).await,
        "settings written unchanged woke a node"
    );
    let changed = proto_tasker::store::QueueSettings {
        max_depth: Some(5),
        ..settings
    };
    writer
        .queue_settings_put("q", changed, false)
        .await
        .unwrap();
    assert!(
        hears_settings_change(&mut events, Duration::from_secs(5)).await,
        "a node did not hear of changed settings"
    );
}

/// A session of its own that holds `queue`'s claim turn (the table lock a
/// claim takes first) until dropped or released.
struct TurnHolder(tokio_postgres::Client);

impl TurnHolder {
    async fn take(url: &str, schema: &str, queue: &str) -> Self {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect postgres");
        tokio::spawn(conn);
        client.batch_execute("BEGIN").await.unwrap();
        let turn = proto_tasker::store::postgres::claim_turn_relation(schema, queue);
        client
            .batch_execute(&format!("LOCK TABLE {turn} IN EXCLUSIVE MODE"))
            .await
            .unwrap();
        TurnHolder(client)
    }

    async fn release(self) {
        self.0.batch_execute("COMMIT").await.unwrap();
    }

    /// Whether the claim `waiting` behind this holder waits without a
    /// snapshot (its backend's `backend_xmin` is empty), once it waits. The
    /// claim must not go ahead meanwhile.
    async fn waiter_has_no_snapshot(
        &self,
        url: &str,
        waiting: &tokio::task::JoinHandle<Result<Vec<proto_tasker::Task>, StoreError>>,
    ) -> bool {
        let holder_pid: i32 = self
            .0
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        let (watch, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect postgres");
        tokio::spawn(conn);
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            assert!(
                !waiting.is_finished(),
                "the claim went ahead while another claimer held the queue's turn"
            );
            let rows = watch
                .query(
                    "SELECT backend_xmin IS NULL FROM pg_stat_activity \
                     WHERE $1 = ANY(pg_blocking_pids(pid))",
                    &[&holder_pid],
                )
                .await
                .unwrap();
            if let Some(r) = rows.first() {
                return r.get::<_, bool>(0);
            }
            assert!(Instant::now() < deadline, "no claim waited for the turn");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Give the turn back, and the tasks `waiting` (a claim in line for
    /// it) then took.
    async fn release_to(
        self,
        waiting: tokio::task::JoinHandle<Result<Vec<proto_tasker::Task>, StoreError>>,
    ) -> Vec<proto_tasker::Task> {
        self.release().await;
        tokio::time::timeout(Duration::from_secs(10), waiting)
            .await
            .expect("the claim went ahead once the turn was given back")
            .unwrap()
            .unwrap()
    }
}

fn claim_of(queue: &str, limit: usize) -> proto_tasker::store::ClaimParams {
    proto_tasker::store::ClaimParams {
        queue: queue.into(),
        node: "n1".into(),
        limit,
        now: chrono::Utc::now(),
        limits: None,
        room: None,
    }
}

async fn enqueue(store: &Arc<dyn Store>, queue: &str, n: usize) {
    let rows = (0..n)
        .map(|_| fixtures::insert("k", queue, 0, chrono::Utc::now()))
        .collect();
    store
        .task_insert_many(rows, chrono::Utc::now())
        .await
        .unwrap();
}

/// Claimers of one queue take turns: while another claimer holds the
/// queue's turn, a claim waits (and does not walk past that claimer's
/// locked rows), then takes its tasks when the turn is given back. Other
/// queues are not held up.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claimers_of_one_queue_take_turns() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 5).await;
    enqueue(&store, "other", 1).await;
    let holder = TurnHolder::take(&guard.url, &guard.schema, "q").await;
    let s = store.clone();
    // Asking for 100: claimers that can never take 32 take no turn.
    let waiting = tokio::spawn(async move { s.task_claim(claim_of("q", 100)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the claim went ahead while another claimer held the queue's turn"
    );
    let other = store.task_claim(claim_of("other", 100)).await.unwrap();
    assert_eq!(other.len(), 1, "another queue's claim is not held up");
    let small = tokio::time::timeout(
        Duration::from_millis(1500),
        store.task_claim(claim_of("q", 2)),
    )
    .await
    .expect("a claim of two tasks waited for a turn")
    .unwrap();
    assert_eq!(small.len(), 2, "a small claim takes no turn");
    let got = holder.release_to(waiting).await;
    assert_eq!(got.len(), 3);
}

/// A turn holder that never gives the turn back (a node stopped while its
/// claim's rows were on their way) does not stop the queue: the claim
/// waits its bound (5 s) and claims anyway, and the next claims on that
/// store go ahead without waiting while the holder still hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_turn_holder_does_not_stop_the_queue() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 100).await;
    let holder = TurnHolder::take(&guard.url, &guard.schema, "q").await;
    let t = Instant::now();
    let first = tokio::time::timeout(Duration::from_secs(20), store.task_claim(claim_of("q", 50)))
        .await
        .expect("the claim gave up waiting for its turn")
        .unwrap();
    let waited = t.elapsed();
    assert_eq!(first.len(), 50);
    assert!(
        waited >= Duration::from_millis(4900),
        "the claim did not wait for its turn: {waited:?}"
    );
    let t = Instant::now();
    let next = store.task_claim(claim_of("q", 50)).await.unwrap();
    let waited = t.elapsed();
    assert_eq!(next.len(), 50);
    assert!(
        waited < Duration::from_millis(4900),
        "the next claim waited {waited:?} for a turn that hangs"
    );
    holder.release().await;
}

/// Claimers in line for their turn hold no snapshot: a waiting backend's
/// `backend_xmin` is empty, so dozens of claimers in line do not hold back
/// the cleanup of the index entries claims leave behind. (Waiting in
/// `SELECT pg_advisory_xact_lock(...)` held one for the whole wait, and so
/// did the first LOCK on a new connection, whose lookup of the turn's name
/// in the catalog took a snapshot: this store's connections are new.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waiting_for_its_turn_holds_no_snapshot() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 5).await;
    let holder = TurnHolder::take(&guard.url, &guard.schema, "q").await;
    let s = store.clone();
    let waiting = tokio::spawn(async move { s.task_claim(claim_of("q", 100)).await });
    let no_snapshot = holder.waiter_has_no_snapshot(&guard.url, &waiting).await;
    assert!(
        no_snapshot,
        "a claim waiting for its turn holds a snapshot (backend_xmin)"
    );
    let got = holder.release_to(waiting).await;
    assert_eq!(got.len(), 5);
}

/// A claim that waited for its turn takes what its claimer can take when
/// the turn comes (its room, asked after the wait), not only what it could
/// take when it got in line.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_takes_the_room_freed_while_it_waited() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 100).await;
    let holder = TurnHolder::take(&guard.url, &guard.schema, "q").await;
    let asked_at: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let room = {
        let asked_at = asked_at.clone();
        proto_tasker::store::ClaimRoom::new(50, move || {
            *asked_at.lock().unwrap() = Some(Instant::now());
            40
        })
    };
    let s = store.clone();
    let waiting = tokio::spawn(async move {
        s.task_claim(proto_tasker::store::ClaimParams {
            room: Some(room),
            ..claim_of("q", 2)
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !waiting.is_finished(),
        "the claim did not wait for its turn"
    );
    let released = Instant::now();
    let got = holder.release_to(waiting).await;
    assert_eq!(got.len(), 40, "the claim took what its room granted");
    let asked = asked_at.lock().unwrap().expect("the room was asked");
    assert!(asked >= released, "the room was asked before the turn came");
}

/// A claimer that stops between being given its turn and sending its claim
/// (a process stopped, or cut off from the database) loses the turn within
/// about a second (its transaction's idle timeout ends the session) instead
/// of holding up every claimer of the queue; its claim fails and takes
/// nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_claimer_stopped_holding_its_turn_loses_it() {
    let (store, _guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 20).await;
    // The room blocks its thread for 4 s, as a stopped process would.
    let room = proto_tasker::store::ClaimRoom::new(50, || {
        std::thread::sleep(Duration::from_secs(4));
        10
    });
    let s = store.clone();
    let stopped = tokio::spawn(async move {
        s.task_claim(proto_tasker::store::ClaimParams {
            room: Some(room),
            ..claim_of("q", 10)
        })
        .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t = Instant::now();
    let got = tokio::time::timeout(Duration::from_secs(10), store.task_claim(claim_of("q", 50)))
        .await
        .expect("the claim waited past its bound")
        .unwrap();
    let waited = t.elapsed();
    assert_eq!(got.len(), 20, "the stopped claimer took tasks");
    assert!(
        waited < Duration::from_millis(2500),
        "the next claim waited {waited:?} for a stopped claimer's turn"
    );
    let stopped = stopped.await.unwrap();
    assert!(stopped.is_err(), "the stopped claim went on: {stopped:?}");
}

/// A claim of a queue with cluster-wide limits (counting what runs, then
/// claiming, as one step across nodes).
fn limited_claim_of(queue: &str, limit: usize) -> proto_tasker::store::ClaimParams {
    proto_tasker::store::ClaimParams {
        limits: Some(proto_tasker::store::QueueLimits {
            global_concurrency: Some(1000),
            ..Default::default()
        }),
        ..claim_of(queue, limit)
    }
}

/// Claims of a queue with limits take the queue's turn too, whatever their
/// size, and wait for it as plain claims do: without a snapshot (they
/// waited in `SELECT pg_advisory_xact_lock(...)`, holding one for the whole
/// wait: 100 nodes' claimers in line held back the cleanup of claimed rows'
/// index entries) and taking the room freed while they waited (they took
/// what was free when they got in line: 59 tasks a claim with 100 nodes of
/// 200 workers).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_waits_its_turn_without_a_snapshot_and_takes_its_room() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 100).await;
    let holder = TurnHolder::take(&guard.url, &guard.schema, "q").await;
    let room = proto_tasker::store::ClaimRoom::new(50, || 40);
    let s = store.clone();
    let waiting = tokio::spawn(async move {
        s.task_claim(proto_tasker::store::ClaimParams {
            room: Some(room),
            ..limited_claim_of("q", 2)
        })
        .await
    });
    let no_snapshot = holder.waiter_has_no_snapshot(&guard.url, &waiting).await;
    assert!(
        no_snapshot,
        "a limited claim waiting for its turn holds a snapshot (backend_xmin)"
    );
    let got = holder.release_to(waiting).await;
    assert_eq!(
        got.len(),
        40,
        "the limited claim took what its room granted"
    );
}

/// A limited claim's wait for its turn is bounded: behind a holder that
/// hangs, it gives up after 5 s and takes nothing (its limits are only
/// kept one claimer at a time, so it cannot claim without the turn); once
/// the holder is gone, the queue's claims take its tasks again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_behind_a_hung_holder_gives_up_and_takes_nothing() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 10).await;
    let holder = TurnHolder::take(&guard.url, &guard.schema, "q").await;
    let t = Instant::now();
    let got = tokio::time::timeout(
        Duration::from_secs(20),
        store.task_claim(limited_claim_of("q", 50)),
    )
    .await
    .expect("the limited claim waited past its bound");
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(4900),
        "the limited claim did not wait for its turn: {waited:?}"
    );
    assert!(
        got.as_ref().is_ok_and(|t| t.is_empty()),
        "a limited claim without its turn: {got:?}"
    );
    holder.release().await;
    let got = store.task_claim(limited_claim_of("q", 50)).await.unwrap();
    assert_eq!(
        got.len(),
        10,
        "the queue claims again once the holder is gone"
    );
}

/// While a rolling upgrade runs nodes of earlier versions beside this
/// one, their claims of a limited queue (which take the queue's advisory
/// lock instead of its turn) and this version's still take turns, so the
/// queue's limits hold: a limited claim waits while a session holds that
/// lock, and goes ahead once it is let go.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_limited_claim_waits_for_an_earlier_versions_claimer() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 5).await;
    let (old, conn) = tokio_postgres::connect(&guard.url, tokio_postgres::NoTls)
        .await
        .expect("connect postgres");
    tokio::spawn(conn);
    old.batch_execute("BEGIN").await.unwrap();
    old.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("proto_tasker_claim:{}:q", guard.schema)],
    )
    .await
    .unwrap();
    let s = store.clone();
    let waiting = tokio::spawn(async move { s.task_claim(limited_claim_of("q", 50)).await });
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        !waiting.is_finished(),
        "the limited claim went ahead while an earlier version's claimer held the queue"
    );
    old.batch_execute("COMMIT").await.unwrap();
    let got = tokio::time::timeout(Duration::from_secs(10), waiting)
        .await
        .expect("the claim went ahead once the lock was let go")
        .unwrap()
        .unwrap();
    assert_eq!(got.len(), 5);
}

/// Claims and completions find their rows by index whatever the table's
/// statistics say: statistics gathered while 5 tasks ran, then 1,500
/// running (a hundred nodes' worth). The completion's generic plan used to
/// scan every running task (the partial index of running tasks, estimated
/// at 5 rows) for each batch it completed, and the claim's update hashed a
/// sequential scan of the table.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_and_completions_walk_indexes_whatever_the_statistics() {
    use proto_tasker::store::HotStatement;
    let (store, guard) = fixtures::pg_store_typed().await;
    let dyn_store: Arc<dyn Store> = store.clone();
    enqueue(&dyn_store, "q", 2000).await;
    let (admin, conn) = tokio_postgres::connect(&guard.url, tokio_postgres::NoTls)
        .await
        .unwrap();
    tokio::spawn(conn);
    admin
        .batch_execute(&format!(
            "ALTER TABLE {0}.tasks SET (autovacuum_enabled = false)",
            guard.schema
        ))
        .await
        .unwrap();
    assert_eq!(store.task_claim(claim_of("q", 5)).await.unwrap().len(), 5);
    admin
        .batch_execute(&format!("ANALYZE {}.tasks", guard.schema))
        .await
        .unwrap();
    for _ in 0..15 {
        assert_eq!(
            store.task_claim(claim_of("q", 100)).await.unwrap().len(),
            100
        );
    }
    let complete = store.explain_generic(HotStatement::Complete).await.unwrap();
    let plan = complete.join("\n");
    assert!(
        plan.contains("tasks_pkey") && !plan.contains("tasks_running_key"),
        "the completion does not find its tasks by primary key:\n{plan}"
    );
    let claim = store.explain_generic(HotStatement::Claim).await.unwrap();
    let plan = claim.join("\n");
    assert!(
        plan.contains("Index Scan using tasks_claim")
            && plan.contains("Index Scan using tasks_pkey"),
        "the claim does not walk the claim index:\n{plan}"
    );
    assert!(!plan.contains("Seq Scan"), "{plan}");
    // Every node polls for cancel requests each heartbeat: through the
    // index of running tasks, that read all 1,500 (40,000 with a hundred
    // nodes draining) where none had been asked to cancel.
    let poll = store
        .explain_generic(HotStatement::CancelPoll)
        .await
        .unwrap();
    let plan = poll.join("\n");
    assert!(
        plan.contains("tasks_cancel_poll"),
        "the cancel poll walks the running tasks:\n{plan}"
    );
}

/// A session of its own that holds `FOR UPDATE` locks on rows until it
/// commits.
struct RowLocker(tokio_postgres::Client);

impl RowLocker {
    async fn lock(url: &str, sql: &str) -> Self {
        let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .expect("connect postgres");
        tokio::spawn(conn);
        client.batch_execute("BEGIN").await.unwrap();
        let n = client.execute(sql, &[]).await.unwrap();
        assert_eq!(n, 1, "{sql}");
        RowLocker(client)
    }

    async fn release(self) {
        self.0.batch_execute("COMMIT").await.unwrap();
    }
}

/// The rescue of dead nodes' tasks skips rows another transaction holds (a
/// completion landing, another rescuer) instead of waiting for them: a
/// hundred nodes rescuing every heartbeat queued on the same rows, each
/// holding a pooled connection for seconds, until their own heartbeats
/// waited so long that healthy nodes were taken for dead. The skipped task
/// is rescued by the next rescue.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rescue_skips_tasks_another_transaction_holds() {
    let (store, guard) = fixtures::pg_store().await;
    enqueue(&store, "q", 2).await;
    // Claimed by a node that never registered: dead.
    let mut claim = claim_of("q", 2);
    claim.node = "gone".into();
    let tasks = store.task_claim(claim).await.unwrap();
    assert_eq!(tasks.len(), 2);
    let held = tasks[0].id;
    let locker = RowLocker::lock(
        &guard.url,
        &format!(
            "SELECT id FROM {}.tasks WHERE id = {} FOR UPDATE",
            guard.schema, held.0
        ),
    )
    .await;
    let rescue = || {
        store.node_rescue(proto_tasker::store::RescueParams {
            now: chrono::Utc::now(),
            node_timeout: Duration::from_secs(1),
            ..Default::default()
        })
    };
    let first = tokio::time::timeout(Duration::from_secs(5), rescue())
        .await
        .expect("the rescue waited for a row another transaction holds")
        .unwrap();
    let ids: Vec<_> = first.iter().map(|r| r.id).collect();
    assert_eq!(
        ids,
        vec![tasks[1].id],
        "the free task is rescued, the held one skipped"
    );
    locker.release().await;
    let second = rescue().await.unwrap();
    let ids: Vec<_> = second.iter().map(|r| r.id).collect();
    assert_eq!(ids, vec![held], "the next rescue takes the task it skipped");
}

/// A node that sees another node's leader lease still current says "not
/// leader" without locking the leader row: `ON CONFLICT DO UPDATE` locks
/// the row even when its WHERE fails, and a hundred nodes queued on it
/// every heartbeat. A lapsed lease is still taken.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_that_sees_a_live_leader_takes_no_lock() {
    let (store, guard) = fixtures::pg_store().await;
    let now = chrono::Utc::now();
    let ttl = Duration::from_secs(2);
    assert!(store.leader_try_elect("a", ttl, now).await.unwrap());
    let locker = RowLocker::lock(
        &guard.url,
        &format!("SELECT id FROM {}.leader FOR UPDATE", guard.schema),
    )
    .await;
    let b = tokio::time::timeout(
        Duration::from_secs(5),
        store.leader_try_elect("b", ttl, chrono::Utc::now()),
    )
    .await
    .expect("a node waited for the leader row to say it is not leader")
    .unwrap();
    assert!(!b, "b leads while a's lease is current");
    locker.release().await;
    assert!(
        store
            .leader_try_elect("a", ttl, chrono::Utc::now())
            .await
            .unwrap()
    );
    let later = chrono::Utc::now() + chrono::Duration::seconds(3);
    assert!(
        store.leader_try_elect("b", ttl, later).await.unwrap(),
        "b takes a lapsed lease"
    );
    assert!(!store.leader_try_elect("a", ttl, later).await.unwrap());
}
