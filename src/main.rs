//! The `proto_tasker` command: run a node, talk to one, manage its store, benchmark it.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto_tasker::bench::{self, BenchParams};
use proto_tasker::config::{Config, Dur, LogFormat, StoreKind};
use proto_tasker::store::{PostgresOptions, PostgresStore, SqliteOptions, Synchronous};
use proto_tasker::{Builder, SqliteStore, Store, StoreError, config_load};
use reqwest::Method;
use serde_json::Value;

/// A durable, distributed task scheduler.
#[derive(Parser, Debug)]
#[command(name = "proto_tasker", version, about)]
struct Cli {
    /// Config file (YAML or JSON). Without it the node runs on built-in
    /// defaults: store ./proto_tasker.db, HTTP on 127.0.0.1:8080.
    #[arg(long, global = true, env = "PROTO_TASKER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format of a node: text or json (overrides log.format).
    #[arg(long, global = true, value_parser = ["text", "json"])]
    log_format: Option<String>,
    /// The node's API, for client commands.
    #[arg(
        long,
        global = true,
        env = "PROTO_TASKER_SERVER",
        default_value = "http://127.0.0.1:8080"
    )]
    server: String,
    /// Bearer token for the API.
    #[arg(
        long,
        global = true,
        env = "PROTO_TASKER_TOKEN",
        hide_env_values = true
    )]
    token: Option<String>,
    /// Print client command output as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (the default command).
    Serve,
    /// Create or upgrade the store's schema.
    Migrate,
    /// Work with config files.
    Config {
        #[command(subcommand)]
        action: ConfigAction,
    },
    /// Enqueue N no-op tasks, drain them, measure latency at an offered rate.
    Bench(BenchArgs),
    /// Enqueue a task through the API.
    Submit(SubmitArgs),
    /// Show one task.
    Status { id: String },
    /// List tasks, newest first.
    List {
        #[arg(long)]
        state: Option<String>,
        #[arg(long)]
        queue: Option<String>,
        #[arg(long)]
        kind: Option<String>,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a task (a running one is stopped on its node).
    Cancel { id: String },
    /// Run a failed or cancelled task again.
    Retry { id: String },
    /// Queues with counts by state.
    Queues,
    /// Stop every node from claiming a queue's tasks.
    Pause { queue: String },
    /// Let nodes claim a paused queue's tasks again.
    Resume { queue: String },
    /// Nodes of the cluster, their heartbeats and the leader.
    Nodes,
    /// Cron schedules with their next run.
    Schedules,
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Validate a config file: exit 1 with file:line and the offending field.
    Check { file: PathBuf },
}

#[derive(clap::Args, Debug)]
struct SubmitArgs {
    kind: String,
    /// The task's args as JSON.
    #[arg(long)]
    args: Option<String>,
    #[arg(long)]
    queue: Option<String>,
    /// 0 (runs first) to 9.
    #[arg(long)]
    priority: Option<i16>,
    /// Run no earlier than this from now, e.g. 10s.
    #[arg(long, value_parser = parse_dur)]
    delay: Option<Duration>,
    #[arg(long)]
    max_attempts: Option<i32>,
    /// Per-attempt timeout, e.g. 30s.
    #[arg(long, value_parser = parse_dur)]
    timeout: Option<Duration>,
    #[arg(long)]
    unique_key: Option<String>,
    /// Wait for the task to finish, print its result, exit 1 unless it completed.
    #[arg(long)]
    wait: bool,
    /// Longest wait with --wait.
    #[arg(long, default_value = "1h", value_parser = parse_dur)]
    wait_timeout: Duration,
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Tasks to enqueue and drain.
    #[arg(long, default_value_t = 100_000)]
    tasks: usize,
    /// Tasks per enqueue call.
    #[arg(long, default_value_t = 1000)]
    batch: usize,
    /// Worker slots of the draining pool.
    #[arg(long, default_value_t = 200)]
    workers: usize,
    /// Offered load (tasks/s) of the latency phase; 0 skips it.
    #[arg(long, default_value_t = 1000)]
    rate: u64,
    /// Length of the latency phase, e.g. 5s.
    #[arg(long, default_value = "5s", value_parser = parse_dur)]
    duration: Duration,
    /// SQLite file (default: a fresh file in a temp dir; must be new or
    /// empty), or a postgres:// URL (a fresh schema is made and dropped).
    #[arg(long)]
    store: Option<String>,
    /// Pools (simulated nodes, each with its own store connection) sharing the work.
    #[arg(long, default_value_t = 1)]
    nodes: usize,
    /// Limit the bench queue to N running tasks across the nodes.
    #[arg(long)]
    global_concurrency: Option<u32>,
    /// Limit each concurrency key to N running tasks (see --keys).
    #[arg(long)]
    per_key_concurrency: Option<u32>,
    /// Spread tasks over N concurrency keys.
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// Limit the bench queue to N task starts per second.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// SQLite durability: full (default) or normal.
    #[arg(long, default_value = "full", value_parser = parse_sync)]
    synchronous: Synchronous,
    /// Instead of a store, measure task creation through this node's API
    /// (e.g. http://127.0.0.1:8080): --tasks through the batch route in
    /// batches of --batch, then --singles single creates.
    #[arg(long = "api")]
    api: Option<String>,
    /// Single creates in the --api mode.
    #[arg(long, default_value_t = 20_000)]
    singles: usize,
    /// Requests in flight at once in the --api mode.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Task kind created in the --api mode.
    #[arg(long, default_value = "noop")]
    kind: String,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    Dur::parse(s)
}

fn parse_sync(s: &str) -> Result<Synchronous, String> {
    match s {
        "full" => Ok(Synchronous::Full),
        "normal" => Ok(Synchronous::Normal),
        _ => Err(format!("{s:?}: expected full or normal")),
    }
}

/// A failure with the exit code it maps to (1 user error, 2 store or server unreachable).
pub(crate) struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    pub(crate) fn user(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
    pub(crate) fn unreachable(message: impl Into<String>) -> Self {
        Failure {
            code: 2,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        // A bad SQLite file or schema is the user's to fix (exit 1).
        Failure::user(e.to_string())
    }
}

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            // Help and version go to stdout with 0; bad arguments are a user error: 1.
            let code = if e.use_stderr() { 1 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("proto_tasker: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("proto_tasker: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

fn load_config(path: Option<&PathBuf>) -> Result<Config, Failure> {
    match path {
        Some(p) => config_load(p).map_err(|e| Failure::user(e.to_string())),
        None => Ok(Config::from_env()),
    }
}

fn init_logging(cfg: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("PROTO_TASKER_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

async fn open_store(cfg: &Config) -> Result<Arc<dyn Store>, Failure> {
    match cfg.store.kind {
        StoreKind::Sqlite => {
            let mut o = SqliteOptions::new(cfg.store.path.clone());
            o.synchronous = cfg.store.synchronous;
            Ok(Arc::new(SqliteStore::open(o)?))
        }
        StoreKind::Postgres => {
            let url = cfg.store.url.clone().unwrap_or_default();
            let mut o = PostgresOptions::new(url).schema(cfg.store.schema.clone());
            o.pool_size = cfg.store.pool_size;
            let store = PostgresStore::connect(o).await?;
            // Fail now, with exit 2, if the server does not answer.
            store
                .queue_paused()
                .await
                .or_else(|e| match e {
                    // The schema may not exist before the first migrate.
                    StoreError::Unavailable(m) if m.starts_with("42P01") => Ok(Vec::new()),
                    other => Err(other),
                })
                .map_err(|e| Failure::unreachable(format!("store.url: {e}")))?;
            Ok(Arc::new(store))
        }
    }
}

fn store_label(cfg: &Config) -> String {
    match cfg.store.kind {
        StoreKind::Sqlite => format!("sqlite {}", cfg.store.path.display()),
        StoreKind::Postgres => format!("postgres schema {}", cfg.store.schema),
    }
}

fn show(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<(), Failure> {
    let remote = || cli::Remote::new(&cli.server, cli.token.clone());
    let json = cli.json;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Config {
            action: ConfigAction::Check { file },
        } => {
            config_load(&file).map_err(|e| Failure::user(e.to_string()))?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Migrate => {
            let cfg = load_config(cli.config.as_ref())?;
            open_store(&cfg).await?.migrate().await?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Serve => {
            let mut cfg = load_config(cli.config.as_ref())?;
            match cli.log_format.as_deref() {
                Some("json") => cfg.log.format = LogFormat::Json,
                Some("text") => cfg.log.format = LogFormat::Text,
                _ => {}
            }
            serve(cfg).await
        }
        Command::Bench(args) => match args.api.clone() {
            Some(api) => {
                let report = bench::run_http(bench::HttpBenchParams {
                    server: api,
                    token: cli.token.clone(),
                    tasks: args.tasks,
                    batch: args.batch,
                    singles: args.singles,
                    concurrency: args.concurrency,
                    kind: args.kind,
                })
                .await
                .map_err(|e| Failure::unreachable(format!("bench failed: {e}")))?;
                if json {
                    show(&serde_json::to_value(&report).unwrap_or_default());
                } else {
                    print!("{report}");
                }
                Ok(())
            }
            None => run_bench(args, json).await,
        },
        Command::Submit(a) => submit(&remote()?, a, json).await,
        Command::Status { id } => {
            let path = format!("/tasks/{}", cli::query_escape(&id));
            let (_, t) = remote()?.call(Method::GET, &path, None).await?;
            if json {
                show(&t)
            } else {
                cli::print_task(&t)
            }
            Ok(())
        }
        Command::List {
            state,
            queue,
            kind,
            limit,
            cursor,
        } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [
                ("state", state),
                ("queue", queue),
                ("kind", kind),
                ("cursor", cursor),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", cli::query_escape(&v)));
                }
            }
            let (_, page) = remote()?
                .call(Method::GET, &format!("/tasks?{}", q.join("&")), None)
                .await?;
            if json {
                show(&page);
            } else {
                cli::print_tasks(
                    page["tasks"]
                        .as_array()
                        .map(Vec::as_slice)
                        .unwrap_or_default(),
                );
                if let Some(c) = page["next_cursor"].as_str() {
                    println!("(more: --cursor {c})");
                }
            }
            Ok(())
        }
        Command::Cancel { id } => task_action(&remote()?, &id, "cancel", json).await,
        Command::Retry { id } => task_action(&remote()?, &id, "retry", json).await,
        Command::Queues => {
            let (_, v) = remote()?.call(Method::GET, "/queues", None).await?;
            if json {
                show(&v)
            } else {
                cli::print_queues(&v)
            }
            Ok(())
        }
        Command::Pause { queue } => queue_action(&remote()?, &queue, "pause", json).await,
        Command::Resume { queue } => queue_action(&remote()?, &queue, "resume", json).await,
        Command::Schedules => {
            let (_, v) = remote()?.call(Method::GET, "/schedules", None).await?;
            if json {
                show(&v)
            } else {
                cli::print_schedules(&v)
            }
            Ok(())
        }
        Command::Nodes => {
            let (_, v) = remote()?.call(Method::GET, "/nodes", None).await?;
            if json {
                show(&v)
            } else {
                cli::print_nodes(&v)
            }
            Ok(())
        }
    }
}

async fn submit(r: &cli::Remote, a: SubmitArgs, json: bool) -> Result<(), Failure> {
    let body = cli::TaskBody {
        kind: a.kind,
        args: a.args,
        queue: a.queue,
        priority: a.priority,
        delay: a.delay,
        max_attempts: a.max_attempts,
        timeout: a.timeout,
        unique_key: a.unique_key,
    }
    .into_json()?;
    let (status, task) = r.call(Method::POST, "/tasks", Some(body)).await?;
    let id = cli::cell_id(&task)?;
    if !a.wait {
        if json {
            show(&task);
        } else if status == reqwest::StatusCode::OK {
            println!("{id} (already enqueued under this unique key)");
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    let done = cli::wait_task(r, &id, a.wait_timeout).await?;
    if json {
        show(&done);
    } else if done["state"] == "completed" {
        show(&done["result"]);
    } else {
        cli::print_task(&done);
    }
    match done["state"].as_str() {
        Some("completed") => Ok(()),
        Some(s @ ("failed" | "cancelled")) => Err(Failure::user(format!("task {id} {s}"))),
        _ => Err(Failure::user(format!(
            "task {id} did not finish within {:?}",
            a.wait_timeout
        ))),
    }
}

async fn task_action(r: &cli::Remote, id: &str, action: &str, json: bool) -> Result<(), Failure> {
    let path = format!("/tasks/{}/{action}", cli::query_escape(id));
    let (_, t) = r.call(Method::POST, &path, None).await?;
    if json {
        show(&t);
    } else {
        println!("{} {}", t["id"], t["state"].as_str().unwrap_or_default());
    }
    Ok(())
}

async fn queue_action(
    r: &cli::Remote,
    queue: &str,
    action: &str,
    json: bool,
) -> Result<(), Failure> {
    let path = format!("/queues/{}/{action}", cli::query_escape(queue));
    let (_, v) = r.call(Method::POST, &path, None).await?;
    if json {
        show(&v);
    } else {
        let paused = v["paused"].as_bool().unwrap_or(false);
        println!("{queue} {}", if paused { "paused" } else { "resumed" });
    }
    Ok(())
}

async fn serve(cfg: Config) -> Result<(), Failure> {
    init_logging(&cfg);
    let store = open_store(&cfg).await?;
    if cfg.store.migrate {
        store.migrate().await?;
    }
    let registry = cfg.registry().map_err(Failure::user)?;
    #[allow(unused_mut)]
    let mut builder = cfg.apply(Builder::new(store, registry));
    #[cfg(feature = "stats")]
    let metrics = Arc::new(proto_tasker::server::metrics::Metrics::new());
    #[cfg(feature = "stats")]
    {
        builder = builder.observer(metrics.clone());
    }
    let pool = Arc::new(builder.build().map_err(|e| Failure::user(e.to_string()))?);
    tracing::info!(node = pool.node_name(), store = %store_label(&cfg), "node starting");
    pool.start().await?;

    let stop = tokio_util::sync::CancellationToken::new();
    let mut server = None;
    if cfg.server.enabled {
        let listener = match tokio::net::TcpListener::bind(&cfg.server.listen).await {
            Ok(l) => l,
            Err(e) => {
                pool.shutdown().await;
                return Err(Failure::user(format!(
                    "server.listen: cannot bind {}: {e}",
                    cfg.server.listen
                )));
            }
        };
        let addr = listener
            .local_addr()
            .map_err(|e| Failure::user(e.to_string()))?;
        if !proto_tasker::server::is_loopback(&addr) && cfg.server.auth_token.is_none() {
            let warning = format!(
                "WARNING: the API listens on {addr}, reachable from other machines, with no auth token: \
                 anyone who reaches it can enqueue tasks. Set server.auth_token (or PROTO_TASKER_TOKEN)."
            );
            eprintln!("{warning}");
            tracing::warn!("{warning}");
        }
        let limits = proto_tasker::server::Limits {
            max_body_bytes: cfg.server.max_body_bytes,
            max_args_bytes: cfg.server.max_args_bytes,
            max_batch: cfg.server.max_batch,
        };
        let state = proto_tasker::server::AppState::new(
            pool.clone(),
            limits,
            cfg.server.auth_token.clone(),
        );
        #[cfg(feature = "stats")]
        let state = state.with_metrics(metrics.clone());
        tracing::info!(
            auth = cfg.server.auth_token.is_some(),
            "listening on http://{addr} (dashboard at http://{addr}/)"
        );
        let stopped = stop.clone();
        server = Some(tokio::spawn(proto_tasker::server::serve(
            listener,
            state,
            async move { stopped.cancelled().await },
        )));
    }
    proto_tasker::pool::wait_for_signal().await;
    stop.cancel();
    if let Some(s) = server {
        match tokio::time::timeout(Duration::from_secs(10), s).await {
            Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server stopped with an error"),
            Err(_) => tracing::warn!("HTTP server did not stop within 10s"),
            _ => {}
        }
    }
    pool.shutdown().await;
    Ok(())
}

async fn run_bench(a: BenchArgs, json: bool) -> Result<(), Failure> {
    let params = BenchParams {
        tasks: a.tasks,
        batch: a.batch,
        workers: a.workers,
        rate: a.rate,
        duration: a.duration,
        limits: proto_tasker::store::QueueLimits {
            global_concurrency: a.global_concurrency,
            per_key_concurrency: a.per_key_concurrency,
            rate: a.rate_limit.map(|n| (n, Duration::from_secs(1))),
        },
        keys: a.keys,
    };
    let nodes = a.nodes.max(1);
    let store_arg = a.store.clone().unwrap_or_default();
    let (stores, label, _guard): (Vec<Arc<dyn Store>>, String, Option<TempDirGuard>) = match a.store
    {
        Some(url) if url.starts_with("postgres://") || url.starts_with("postgresql://") => {
            let schema = format!("proto_tasker_bench_{}", std::process::id());
            let mut stores: Vec<Arc<dyn Store>> = Vec::new();
            for _ in 0..nodes {
                let o = PostgresOptions::new(url.clone()).schema(schema.clone());
                stores.push(Arc::new(PostgresStore::connect(o).await?));
            }
            (
                stores,
                format!("postgres schema {schema} (dropped afterwards)"),
                None,
            )
        }
        other => {
            let (path, guard) = match other {
                Some(p) => (PathBuf::from(p), None),
                None => {
                    let d = tempfile_dir()?;
                    (d.join("bench.db"), Some(TempDirGuard(d)))
                }
            };
            let mut stores: Vec<Arc<dyn Store>> = Vec::new();
            for _ in 0..nodes {
                let mut o = SqliteOptions::new(&path);
                o.synchronous = a.synchronous;
                stores.push(Arc::new(SqliteStore::open(o)?));
            }
            (
                stores,
                format!(
                    "sqlite {} (synchronous={:?})",
                    path.display(),
                    a.synchronous
                ),
                guard,
            )
        }
    };
    stores[0]
        .migrate()
        .await
        .map_err(|e| Failure::unreachable(e.to_string()))?;
    let report = bench::run(stores.clone(), params).await;
    if let Some(schema) = stores[0].postgres_schema() {
        drop_bench_schema(&store_arg, schema).await;
    }
    let report = report.map_err(|e| Failure::unreachable(format!("bench failed: {e}")))?;
    if json {
        show(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        println!("store: {label}, {nodes} node(s), {} workers", a.workers);
        print!("{report}");
    }
    Ok(())
}

async fn drop_bench_schema(url: &str, schema: &str) {
    if let Ok((client, conn)) = tokio_postgres::connect(url, tokio_postgres::NoTls).await {
        tokio::spawn(conn);
        let _ = client
            .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
            .await;
    }
}

/// A temp dir removed on drop (the bench's default store).
struct TempDirGuard(PathBuf);

impl Drop for TempDirGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn tempfile_dir() -> Result<PathBuf, Failure> {
    let d = std::env::temp_dir().join(format!("proto_tasker-bench-{}", std::process::id()));
    std::fs::create_dir_all(&d).map_err(|e| Failure::user(format!("{}: {e}", d.display())))?;
    Ok(d)
}
