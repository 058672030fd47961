//! `proto_tasker bench`: the end-to-end load tool.
//!
//! Three phases against a real store:
//! 1. enqueue `tasks` no-op tasks in batches (bulk insert rate);
//! 2. start a pool and drain them (claim + run + complete rate);
//! 3. offer `rate` tasks/s one at a time for `duration` and measure the
//!    enqueue-to-start latency of each.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::executor::executor_fn;
use crate::pool::{Builder, Counters};
use crate::registry::TaskRegistry;
use crate::store::Store;
use crate::task::NewTask;

#[derive(Debug, Clone)]
pub struct BenchParams {
    pub tasks: usize,
    pub batch: usize,
    pub workers: usize,
    /// Offered load of the latency phase in tasks/s (0 skips it).
    pub rate: u64,
    pub duration: Duration,
    /// Cluster-wide limits on the bench queue (measures their cost).
    pub limits: crate::store::QueueLimits,
    /// Spread tasks over this many concurrency keys (0: none).
    pub keys: usize,
    /// Clients waiting (`Client::wait`, what a long-poll does) on tasks
    /// due in an hour while the drain and latency phases run.
    pub waiters: usize,
    /// Tasks put in the table before measuring: half finished, half due
    /// tomorrow, over `prefill_queues` queues (the bench queue first).
    pub prefill: usize,
    pub prefill_queues: usize,
    /// Show a status line on stderr while it runs (the CLI sets it when
    /// stderr is a terminal; piped, it prints nothing but the report).
    pub progress: bool,
}

/// A status line on stderr for a person watching: rewritten in place at
/// most four times a second and erased when dropped. Off, it prints nothing.
#[derive(Debug)]
pub struct Progress {
    on: bool,
    last: Option<Instant>,
}

impl Progress {
    pub fn new(on: bool) -> Self {
        Progress { on, last: None }
    }

    /// Show `line()` unless a line was shown less than 250 ms ago.
    pub fn show(&mut self, line: impl FnOnce() -> String) {
        if !self.on
            || self
                .last
                .is_some_and(|t| t.elapsed() < Duration::from_millis(250))
        {
            return;
        }
        self.last = Some(Instant::now());
        use std::io::Write;
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r\x1b[2K{}", line());
        let _ = err.flush();
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if self.on && self.last.is_some() {
            eprint!("\r\x1b[2K");
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Percentiles {
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub tasks: usize,
    pub enqueue_secs: f64,
    pub enqueue_per_sec: f64,
    pub enqueue_batch_ms: Percentiles,
    pub drain_secs: f64,
    pub drain_per_sec: f64,
    pub latency_offered_per_sec: u64,
    pub latency: Option<Percentiles>,
    /// Tasks of the latency phase that started as they were enqueued
    /// (a free worker of the enqueuing pool took each; see `pool/handoff.rs`).
    pub started_at_enqueue: u64,
    pub waiters: usize,
}

fn percentiles(h: &Histogram<u64>) -> Percentiles {
    // Recorded in microseconds.
    let ms = |v: u64| v as f64 / 1000.0;
    Percentiles {
        p50_ms: ms(h.value_at_quantile(0.50)),
        p90_ms: ms(h.value_at_quantile(0.90)),
        p99_ms: ms(h.value_at_quantile(0.99)),
        max_ms: ms(h.max()),
        count: h.len(),
    }
}

fn new_hist() -> Histogram<u64> {
    // Microseconds from 1us to 1h at 3 significant figures: constant, valid bounds.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("constant histogram bounds are valid")
}

/// Run the benchmark with one pool (a simulated node) per store; the stores
/// must share one empty, migrated database.
pub async fn run(
    stores: Vec<Arc<dyn Store>>,
    p: BenchParams,
) -> Result<BenchReport, Box<dyn std::error::Error>> {
    let latency = Arc::new(Mutex::new(new_hist()));
    let measuring = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let mut registry = TaskRegistry::new();
    {
        let latency = latency.clone();
        let measuring = measuring.clone();
        registry.register(
            "noop",
            executor_fn(move |ctx| {
                if measuring.load(std::sync::atomic::Ordering::Relaxed) {
                    let waited = (Utc::now() - ctx.created_at)
                        .num_microseconds()
                        .unwrap_or(0)
                        .max(1);
                    if let Ok(mut h) = latency.lock() {
                        let _ = h.record(waited as u64);
                    }
                }
                async { Ok(serde_json::Value::Null) }
            }),
        );
    }
    let per_node = (p.workers / stores.len()).max(1);
    let pools = stores
        .iter()
        .enumerate()
        .map(|(i, st)| {
            Builder::new(st.clone(), registry.clone())
                .node_name(format!("bench-{}-{i}", std::process::id()))
                .queue("bench", per_node)
                .queue_limits("bench", p.limits)
                .claim_max(per_node)
                .build()
        })
        .collect::<Result<Vec<_>, _>>()?;
    let pool = &pools[0];
    let client = pool.client();

    let mut progress = Progress::new(p.progress);
    // The queue's limits are stored before the enqueue (a pool stores them
    // at start), so a round-robin queue's tasks get their fair_seq there.
    if !p.limits.is_empty() {
        let settings = crate::store::QueueSettings::default().with_limits(&p.limits);
        stores[0]
            .queue_settings_put("bench", settings, true)
            .await?;
    }
    if p.prefill > 0 {
        prefill(&stores[0], p.prefill, p.prefill_queues, &mut progress).await?;
    }
    // The bench queue stays paused until the drain's clock starts, so the
    // drain measures running nodes taking a backlog, not nodes starting
    // (starting 100 pools one after another took 2 s: the whole drain).
    stores[0].queue_set_paused("bench", true).await?;
    // Phase 1: bulk enqueue.
    let mut batch_hist = new_hist();
    let start = Instant::now();
    let mut left = p.tasks;
    while left > 0 {
        let n = left.min(p.batch.max(1));
        let batch: Vec<NewTask> = (0..n)
            .map(|i| {
                let mut o = crate::task::TaskOptions::default().queue("bench");
                if p.keys > 0 {
                    o = o.concurrency_key(format!("key-{}", i % p.keys));
                }
                NewTask::new("noop", serde_json::Value::Null).with(o)
            })
            .collect();
        let t = Instant::now();
        client.insert_many(batch).await?;
        let _ = batch_hist.record(t.elapsed().as_micros().max(1) as u64);
        left -= n;
        progress.show(|| format!("enqueue: {} of {} tasks", p.tasks - left, p.tasks));
    }
    let enqueue_secs = start.elapsed().as_secs_f64();

    // Waiters on tasks due later, open through phases 2 and 3.
    let mut waiting = tokio::task::JoinSet::new();
    if p.waiters > 0 {
        let later = Utc::now() + chrono::Duration::hours(1);
        let mut ids = Vec::with_capacity(p.waiters);
        for chunk in (0..p.waiters).collect::<Vec<_>>().chunks(p.batch.max(1)) {
            let batch = chunk
                .iter()
                .map(|_| {
                    let mut o = crate::task::TaskOptions::default().queue("bench");
                    o.run_at = Some(later);
                    NewTask::new("noop", serde_json::Value::Null).with(o)
                })
                .collect();
            ids.extend(
                client
                    .insert_many(batch)
                    .await?
                    .into_iter()
                    .map(|i| i.task.id),
            );
        }
        for id in ids {
            let c = client.clone();
            waiting.spawn(async move { c.wait(id, Duration::from_secs(7200)).await });
        }
        while client.waiting() < p.waiters {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    // Phase 2: drain. Every pool starts (the queue still paused), then the
    // resume wakes them all: through PostgreSQL's NOTIFY, which reaches
    // every node; SQLite stores wake only their own producers, so each of
    // them resumes the queue too.
    futures::future::try_join_all(pools.iter().map(|pl| pl.start())).await?;
    let start = Instant::now();
    stores[0].queue_set_paused("bench", false).await?;
    if !is_postgres(&stores[0]) {
        for st in &stores[1..] {
            st.queue_set_paused("bench", false).await?;
        }
    }
    let completed = || -> u64 {
        pools
            .iter()
            .map(|pl| Counters::get(&pl.shared().counters.completed))
            .sum()
    };
    while (completed() as usize) < p.tasks {
        tokio::time::sleep(Duration::from_millis(2)).await;
        progress.show(|| {
            let done = completed();
            format!(
                "drain: {done} of {} tasks, {:.0}/s",
                p.tasks,
                done as f64 / start.elapsed().as_secs_f64().max(1e-9)
            )
        });
    }
    let drain_secs = start.elapsed().as_secs_f64();

    // Phase 3: latency at an offered rate, one insert per task.
    let mut lat = None;
    let mut handed_before = 0;
    if p.rate > 0 && !p.duration.is_zero() {
        measuring.store(true, std::sync::atomic::Ordering::Relaxed);
        handed_before = crate::pool::Counters::get(&pool.shared().counters.started_at_enqueue);
        let total = (p.rate as f64 * p.duration.as_secs_f64()) as u64;
        let done_before = completed();
        let interval = Duration::from_secs_f64(1.0 / p.rate as f64);
        let begin = tokio::time::Instant::now();
        let mut inflight = tokio::task::JoinSet::new();
        for i in 0..total {
            tokio::time::sleep_until(begin + interval.mul_f64(i as f64)).await;
            progress.show(|| format!("latency: {i} of {total} tasks at {}/s", p.rate));
            let c = client.clone();
            inflight.spawn(async move {
                c.insert(
                    NewTask::new("noop", serde_json::Value::Null)
                        .with(crate::task::TaskOptions::default().queue("bench")),
                )
                .await
                .map(|_| ())
            });
        }
        while let Some(r) = inflight.join_next().await {
            r??;
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while completed() < done_before + total && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        lat = latency.lock().ok().map(|h| percentiles(&h));
    }
    waiting.abort_all();
    for pl in &pools {
        pl.shutdown().await;
    }
    Ok(BenchReport {
        tasks: p.tasks,
        enqueue_secs,
        enqueue_per_sec: p.tasks as f64 / enqueue_secs.max(1e-9),
        enqueue_batch_ms: percentiles(&batch_hist),
        drain_secs,
        drain_per_sec: p.tasks as f64 / drain_secs.max(1e-9),
        latency_offered_per_sec: p.rate,
        latency: lat,
        started_at_enqueue: crate::pool::Counters::get(&pool.shared().counters.started_at_enqueue)
            - handed_before,
        waiters: p.waiters,
    })
}

impl std::fmt::Display for BenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "enqueue: {} tasks in {:.3}s = {:.0} tasks/s (per batch p50 {:.2}ms p99 {:.2}ms)",
            self.tasks,
            self.enqueue_secs,
            self.enqueue_per_sec,
            self.enqueue_batch_ms.p50_ms,
            self.enqueue_batch_ms.p99_ms
        )?;
        writeln!(
            f,
            "drain:   {} tasks in {:.3}s = {:.0} tasks/s{}",
            self.tasks,
            self.drain_secs,
            self.drain_per_sec,
            if self.waiters > 0 {
                format!(" (with {} waiters open)", self.waiters)
            } else {
                String::new()
            }
        )?;
        if let Some(l) = &self.latency {
            writeln!(
                f,
                "latency at {} tasks/s offered (enqueue -> start, {} tasks, {} started at enqueue): p50 {:.2}ms p90 {:.2}ms p99 {:.2}ms max {:.2}ms",
                self.latency_offered_per_sec,
                l.count,
                self.started_at_enqueue,
                l.p50_ms,
                l.p90_ms,
                l.p99_ms,
                l.max_ms
            )?;
        }
        Ok(())
    }
}

fn is_postgres(store: &Arc<dyn Store>) -> bool {
    store
        .as_any()
        .downcast_ref::<crate::store::PostgresStore>()
        .is_some()
}

/// Fill the table with `n` tasks over `queues` queues (`bench`, then
/// `prefill-1`...): the first half claimed and completed through the store
/// (finished tasks the claims must never walk), the second due tomorrow
/// (waiting tasks ahead of nothing the drain claims). Not measured.
async fn prefill(
    store: &Arc<dyn Store>,
    n: usize,
    queues: usize,
    progress: &mut Progress,
) -> Result<(), Box<dyn std::error::Error>> {
    use crate::store::{ClaimParams, Completion, Outcome, TaskInsert};
    let queue = |i: usize| match i % queues {
        0 => "bench".to_string(),
        q => format!("prefill-{q}"),
    };
    let now = Utc::now();
    let tomorrow = now + chrono::Duration::days(1);
    // The finished half runs through queues of its own, so the claims
    // below take nothing else.
    let row = |i: usize, finished: bool| TaskInsert {
        max_attempts: 1,
        ..if finished {
            TaskInsert::plain(
                "noop",
                format!("done-{}", queue(i)),
                serde_json::Value::Null,
                now,
            )
        } else {
            TaskInsert::plain("noop", queue(i), serde_json::Value::Null, tomorrow)
        }
    };
    let half = n / 2;
    for (from, to, finished) in [(0, half, true), (half, n, false)] {
        let mut i = from;
        while i < to {
            let end = (i + 10_000).min(to);
            store
                .task_insert_many((i..end).map(|k| row(k, finished)).collect(), now)
                .await?;
            i = end;
            progress.show(|| format!("prefill: {i} of {n} tasks"));
        }
    }
    // Finish the first half: claim and complete each done- queue.
    for q in 0..queues.min(half.max(1)) {
        let name = format!("done-{}", queue(q));
        loop {
            let claimed = store
                .task_claim(ClaimParams {
                    queue: name.clone(),
                    node: "prefill".into(),
                    limit: 10_000,
                    now: Utc::now(),
                    limits: None,
                    room: None,
                })
                .await?;
            if claimed.is_empty() {
                break;
            }
            let done = claimed
                .iter()
                .map(|t| {
                    Completion::of(
                        t,
                        Utc::now(),
                        Outcome::Completed {
                            result: serde_json::Value::Null,
                        },
                    )
                })
                .collect();
            store.task_complete_many(done).await?;
        }
        progress.show(|| format!("prefill: finishing queue {q} of {queues}"));
    }
    Ok(())
}

/// What `bench --api` measures: task creation over the HTTP API.
#[derive(Debug, Clone)]
pub struct HttpBenchParams {
    pub server: String,
    pub token: Option<String>,
    /// See [`BenchParams::progress`].
    pub progress: bool,
    /// Tasks sent through POST /tasks/batch.
    pub tasks: usize,
    pub batch: usize,
    /// Single POST /tasks requests.
    pub singles: usize,
    /// Requests in flight at once.
    pub concurrency: usize,
    /// Task kind to create (the node must run it).
    pub kind: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct HttpBenchReport {
    pub batch_tasks_per_sec: f64,
    pub batch_request_ms: Percentiles,
    pub single_requests_per_sec: f64,
    pub single_request_ms: Percentiles,
}

impl std::fmt::Display for HttpBenchReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "batch route: {:.0} tasks/s (per request p50 {:.2}ms p99 {:.2}ms, {} requests)",
            self.batch_tasks_per_sec,
            self.batch_request_ms.p50_ms,
            self.batch_request_ms.p99_ms,
            self.batch_request_ms.count
        )?;
        writeln!(
            f,
            "single creates: {:.0} requests/s (p50 {:.2}ms p99 {:.2}ms, {} requests)",
            self.single_requests_per_sec,
            self.single_request_ms.p50_ms,
            self.single_request_ms.p99_ms,
            self.single_request_ms.count
        )
    }
}

/// Send `bodies` to `url` with `concurrency` requests in flight; returns elapsed seconds and per-request latency.
async fn blast(
    http: &reqwest::Client,
    url: &str,
    token: Option<&str>,
    bodies: Vec<serde_json::Value>,
    concurrency: usize,
    progress: &mut Progress,
) -> Result<(f64, Histogram<u64>), Box<dyn std::error::Error>> {
    let total = bodies.len();
    let mut sent = 0;
    use futures::StreamExt;
    let start = Instant::now();
    let mut hist = new_hist();
    let mut results = futures::stream::iter(bodies.into_iter().map(|b| {
        let mut req = http.post(url).json(&b);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        async move {
            let t = Instant::now();
            let resp = req.send().await?;
            let status = resp.status();
            let _ = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, t.elapsed()))
        }
    }))
    .buffer_unordered(concurrency.max(1));
    while let Some(r) = results.next().await {
        let (status, took) = r?;
        if !status.is_success() {
            return Err(format!("{url}: HTTP {status}").into());
        }
        let _ = hist.record(took.as_micros().max(1) as u64);
        sent += 1;
        progress.show(|| format!("{url}: {sent} of {total} requests"));
    }
    Ok((start.elapsed().as_secs_f64(), hist))
}

/// Measure task creation through a running node's API.
pub async fn run_http(p: HttpBenchParams) -> Result<HttpBenchReport, Box<dyn std::error::Error>> {
    let http = reqwest::Client::builder()
        .pool_max_idle_per_host(p.concurrency.max(1))
        .build()?;
    let base = format!("{}/api/v1", p.server.trim_end_matches('/'));
    let mut progress = Progress::new(p.progress);
    let task = serde_json::json!({"kind": p.kind, "args": {}});
    let batches: Vec<serde_json::Value> = (0..p.tasks.div_ceil(p.batch.max(1)))
        .map(|i| {
            let n = p.batch.min(p.tasks - i * p.batch);
            serde_json::json!({"tasks": vec![task.clone(); n]})
        })
        .collect();
    let (secs, batch_hist) = blast(
        &http,
        &format!("{base}/tasks/batch"),
        p.token.as_deref(),
        batches,
        p.concurrency,
        &mut progress,
    )
    .await?;
    let singles = vec![task; p.singles];
    let (ssecs, single_hist) = blast(
        &http,
        &format!("{base}/tasks"),
        p.token.as_deref(),
        singles,
        p.concurrency,
        &mut progress,
    )
    .await?;
    Ok(HttpBenchReport {
        batch_tasks_per_sec: p.tasks as f64 / secs.max(1e-9),
        batch_request_ms: percentiles(&batch_hist),
        single_requests_per_sec: p.singles as f64 / ssecs.max(1e-9),
        single_request_ms: percentiles(&single_hist),
    })
}

/// How the bench's stores connect (the node's `store.*` settings).
#[derive(Debug, Clone, Default)]
pub struct BenchStoreOptions {
    pub synchronous: crate::store::Synchronous,
    /// PostgreSQL connections per store (default: the node's default).
    pub pool_size: Option<usize>,
    pub pool_mode: crate::store::PoolMode,
    pub listen_url: Option<String>,
}

/// The stores a bench drains through: `nodes` stores over one SQLite file
/// (a fresh temp file when `target` is `None`), or over one fresh schema of
/// the PostgreSQL database `target` names. Dropping it removes what it made.
pub struct BenchStores {
    pub stores: Vec<Arc<dyn Store>>,
    /// What the report calls the store.
    pub label: String,
    temp_dir: Option<std::path::PathBuf>,
}

impl std::fmt::Debug for BenchStores {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BenchStores")
            .field("label", &self.label)
            .field("stores", &self.stores.len())
            .finish()
    }
}

impl BenchStores {
    pub async fn open(
        target: Option<&str>,
        nodes: usize,
        o: BenchStoreOptions,
    ) -> Result<Self, crate::NodeError> {
        use crate::config::{StoreConfig, StoreKind};
        let synchronous = o.synchronous;
        let mut cfg = StoreConfig {
            synchronous,
            pool_mode: o.pool_mode,
            listen_url: o.listen_url,
            ..StoreConfig::default()
        };
        if let Some(n) = o.pool_size {
            cfg.pool_size = n;
        }
        let (label, temp_dir) = match target {
            Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
                cfg.kind = StoreKind::Postgres;
                cfg.url = Some(url.to_string());
                cfg.schema = format!("proto_tasker_bench_{}", std::process::id());
                let label = format!("postgres schema {} (dropped afterwards)", cfg.schema);
                (label, None)
            }
            other => {
                let temp_dir = match other {
                    Some(p) => {
                        cfg.path = p.into();
                        None
                    }
                    None => {
                        let d = std::env::temp_dir()
                            .join(format!("proto_tasker-bench-{}", std::process::id()));
                        std::fs::create_dir_all(&d).map_err(|e| {
                            crate::NodeError::Config(format!("{}: {e}", d.display()))
                        })?;
                        cfg.path = d.join("bench.db");
                        Some(d)
                    }
                };
                let label = format!(
                    "sqlite {} (synchronous={synchronous:?})",
                    cfg.path.display()
                );
                (label, temp_dir)
            }
        };
        let mut stores = Vec::with_capacity(nodes.max(1));
        for _ in 0..nodes.max(1) {
            stores.push(crate::node::open_store(&cfg).await?);
        }
        Ok(BenchStores {
            stores,
            label,
            temp_dir,
        })
    }

    /// Remove the schema or file the bench made.
    pub async fn remove(self) {
        if let Some(pg) = self.stores[0]
            .as_any()
            .downcast_ref::<crate::store::PostgresStore>()
        {
            let _ = pg.drop_schema().await;
        }
        if let Some(d) = &self.temp_dir {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}
