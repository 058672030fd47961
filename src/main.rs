//! The `proto_tasker` command: run a node, talk to one, manage its store, benchmark it.

mod cli;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto_tasker::bench::{self, BenchParams, BenchStores};
use proto_tasker::config::{Config, LogFormat};
use proto_tasker::store::Synchronous;
use proto_tasker::{Node, NodeError, config_load, telemetry};
use reqwest::Method;
use serde_json::Value;

/// A durable, distributed task scheduler.
///
/// Without a command, runs a node (`serve`).
#[derive(Parser, Debug)]
#[command(name = "proto_tasker", version, about)]
struct Cli {
    #[command(flatten)]
    node: NodeOpts,
    // The client options are also taken before the command
    // (`proto_tasker --server URL list`), as earlier versions did, but
    // each command's --help shows only its own.
    #[arg(long, hide = true)]
    server: Option<String>,
    #[arg(long, hide = true)]
    token: Option<String>,
    #[arg(long, hide = true)]
    json: bool,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The options of a node (`serve`, and no command at all).
#[derive(clap::Args, Debug, Clone, Default)]
struct NodeOpts {
    /// Config file (YAML or JSON). Without it the node runs on built-in
    /// defaults: store ./proto_tasker.db, HTTP on 127.0.0.1:8080.
    #[arg(long, env = "PROTO_TASKER_CONFIG")]
    config: Option<PathBuf>,
    /// Log format of a node (overrides log.format).
    #[arg(long, value_enum)]
    log_format: Option<LogFormat>,
}

/// The API client commands and `health` talk to unless told otherwise
/// (a node's default `server.listen`).
const DEFAULT_SERVER: &str = "http://127.0.0.1:8080";

/// Where a client command sends its request, and how it shows the answer.
#[derive(clap::Args, Debug, Clone)]
struct ClientOpts {
    /// The node's API.
    #[arg(long, env = "PROTO_TASKER_SERVER", default_value = DEFAULT_SERVER)]
    server: String,
    /// Bearer token for the API.
    #[arg(long, env = "PROTO_TASKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the answer as JSON.
    #[arg(long)]
    json: bool,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a node (the default command).
    Serve(NodeOpts),
    /// Create or upgrade the store's schema.
    Migrate {
        /// Config file whose `store` to migrate (default: ./proto_tasker.db).
        #[arg(long, env = "PROTO_TASKER_CONFIG")]
        config: Option<PathBuf>,
    },
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
    Status {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// List tasks, newest first.
    List {
        #[command(flatten)]
        client: ClientOpts,
        /// Only tasks in this state (scheduled, available, running,
        /// retryable, completed, failed, cancelled, blocked).
        #[arg(long)]
        state: Option<String>,
        /// Only tasks of this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Only tasks of this kind.
        #[arg(long)]
        kind: Option<String>,
        /// Only tasks carrying this tag.
        #[arg(long)]
        tag: Option<String>,
        /// Only tasks whose args contain this JSON object, e.g.
        /// '{"user":{"id":42}}' (narrow it with another filter: it reads
        /// every task the others leave).
        #[arg(long)]
        args: Option<String>,
        /// Tasks per page (1 to 1000).
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// The page after this cursor (printed under the previous page).
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Cancel a task (a running one is stopped on its node).
    Cancel {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Run a failed or cancelled task again.
    Retry {
        id: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Queues with counts by state.
    Queues {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Stop every node from claiming a queue's tasks.
    Pause {
        queue: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Let nodes claim a paused queue's tasks again.
    Resume {
        queue: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Nodes of the cluster, their heartbeats and the leader.
    Nodes {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Cron schedules with their next run.
    Schedules {
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Show or change one queue's settings (shared by the cluster).
    Queue {
        #[command(subcommand)]
        action: QueueAction,
    },
    /// Pause, resume or trigger one cron schedule.
    Schedule {
        #[command(subcommand)]
        action: ScheduleAction,
    },
    /// Exit 0 when the node at --server is ready (its store answers), 1
    /// when it answers but is not ready, 2 when it does not answer: a
    /// container's HEALTHCHECK, or an exec probe.
    Health {
        /// The node.
        #[arg(long, env = "PROTO_TASKER_SERVER", default_value = DEFAULT_SERVER)]
        server: String,
        /// Give up after this long.
        #[arg(long, default_value = "3s", value_parser = parse_dur)]
        timeout: Duration,
    },
    /// Print a shell's completion script, e.g.
    /// `proto_tasker completions bash > /etc/bash_completion.d/proto_tasker`.
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff), or write one per command into --out.
    Man {
        /// A directory to write proto_tasker.1 and proto_tasker-COMMAND.1 into.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// Print the OpenAPI 3.1 document of the HTTP API (docs/openapi.json).
    Openapi {
        /// Write it to this file instead of standard output.
        #[arg(long)]
        out: Option<PathBuf>,
    },
    /// The audit trail of operator actions, newest first (admin token).
    Audit {
        #[command(flatten)]
        client: ClientOpts,
        #[arg(long, default_value_t = 50)]
        limit: usize,
        #[arg(long)]
        cursor: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum QueueAction {
    /// The queue's counts and settings.
    Show {
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Change the queue's settings for every node (each applies them
    /// within one poll interval). `none` removes a limit.
    Set {
        name: String,
        /// At most this many unfinished tasks (enqueues past it get 429
        /// queue_full), or none.
        #[arg(long)]
        max_depth: Option<String>,
        /// Workers on each node that serves the queue, or none (each
        /// node's configured count).
        #[arg(long)]
        workers: Option<String>,
        /// At most this many of the queue's tasks run at once, on all nodes, or none.
        #[arg(long)]
        global_concurrency: Option<String>,
        /// At most this many tasks with one concurrency key run at once, or none.
        #[arg(long)]
        per_key_concurrency: Option<String>,
        /// At most MAX starts per PERIOD, e.g. 100/1s or 5/1m, or none.
        #[arg(long)]
        rate_limit: Option<String>,
        /// round_robin (take tasks across concurrency keys in turn) or none.
        #[arg(long, value_parser = ["round_robin", "none"])]
        fairness: Option<String>,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand, Debug)]
enum ScheduleAction {
    /// Stop enqueuing the schedule's ticks until it is resumed.
    Pause {
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Enqueue its ticks again, from the next one (missed ones are not).
    Resume {
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
    /// Enqueue the schedule's task now, once; prints the task's id.
    Trigger {
        name: String,
        #[command(flatten)]
        client: ClientOpts,
    },
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Validate a config file: exit 1 with file:line and the offending field.
    Check { file: PathBuf },
}

#[derive(clap::Args, Debug)]
struct SubmitArgs {
    kind: String,
    #[command(flatten)]
    client: ClientOpts,
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
    /// States whose tasks hold the key (comma-separated): the unfinished
    /// ones always, plus any of completed, failed, cancelled.
    #[arg(long, value_delimiter = ',')]
    unique_states: Vec<String>,
    /// A finished holder counts this long after it finished, e.g. 10m.
    #[arg(long, value_parser = parse_dur)]
    unique_for: Option<Duration>,
    /// When a task holds the key: keep (default), replace (debounce) or error.
    #[arg(long, value_parser = ["keep", "replace", "error"])]
    on_conflict: Option<String>,
    /// A label to find the task by (repeat for more, at most 16).
    #[arg(long = "tag")]
    tags: Vec<String>,
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
    /// Claim round robin across the concurrency keys (fairness: round_robin).
    #[arg(long)]
    round_robin: bool,
    /// Spread tasks over N concurrency keys.
    #[arg(long, default_value_t = 0)]
    keys: usize,
    /// Limit the bench queue to N task starts per second.
    #[arg(long)]
    rate_limit: Option<u32>,
    /// Keep N clients waiting on tasks due in an hour (as long-polls do)
    /// while draining: what waiters cost the drain.
    #[arg(long, default_value_t = 0)]
    waiters: usize,
    /// Put N tasks in the table before measuring, half finished and half
    /// due tomorrow (over --prefill-queues queues, the bench queue one of
    /// them): what a full table costs the enqueue, the drain and the latency.
    #[arg(long, default_value_t = 0)]
    prefill: usize,
    /// Queues the --prefill tasks are spread over.
    #[arg(long, default_value_t = 1)]
    prefill_queues: usize,
    /// SQLite durability.
    #[arg(long, value_enum, default_value_t = Synchronous::Full)]
    synchronous: Synchronous,
    /// PostgreSQL connections per simulated node (default: a node's
    /// default, `store.pool_size`).
    #[arg(long)]
    pool_size: Option<usize>,
    /// `transaction` when --store is PgBouncer in transaction mode.
    #[arg(long, value_enum, default_value_t = proto_tasker::store::PoolMode::Session)]
    pool_mode: proto_tasker::store::PoolMode,
    /// A direct PostgreSQL URL for LISTEN (with --pool-mode transaction).
    #[arg(long)]
    listen_url: Option<String>,
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
    /// Bearer token of the node in the --api mode.
    #[arg(long, env = "PROTO_TASKER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
}

fn parse_dur(s: &str) -> Result<Duration, String> {
    proto_tasker::duration::parse(s)
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

impl From<NodeError> for Failure {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::Config(m) => Failure::user(m),
            NodeError::Unreachable(m) => Failure::unreachable(m),
        }
    }
}

impl From<proto_tasker::StoreError> for Failure {
    fn from(e: proto_tasker::StoreError) -> Self {
        NodeError::from(e).into()
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

/// Logs to stderr, filtered by `log.level` (or `PROTO_TASKER_LOG`); with
/// `telemetry.otlp_endpoint`, this crate's spans are also exported by OTLP
/// (their own filter: a quiet log level does not drop traces). The exporter
/// is returned to be shut down (flushed) on the way out.
fn init_logging(cfg: &Config) -> Result<Option<telemetry::Exporter>, Failure> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("PROTO_TASKER_LOG")
        .or_else(|_| EnvFilter::try_new(&cfg.log.level))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    let fmt = match cfg.log.format {
        LogFormat::Text => fmt.with_filter(filter).boxed(),
        LogFormat::Json => fmt.json().with_filter(filter).boxed(),
    };
    let exporter = match &cfg.telemetry.otlp_endpoint {
        Some(_) => {
            let instance = cfg
                .node
                .name
                .clone()
                .unwrap_or_else(proto_tasker::pool::default_node_name);
            Some(
                telemetry::Exporter::start(&cfg.telemetry, &instance)
                    .map_err(|e| Failure::user(e.to_string()))?,
            )
        }
        None => None,
    };
    let otel = exporter.as_ref().map(|x| {
        x.layer().with_filter(
            tracing_subscriber::filter::Targets::new()
                .with_target("proto_tasker", tracing::Level::INFO),
        )
    });
    let _ = tracing_subscriber::registry()
        .with(fmt)
        .with(otel)
        .try_init();
    if let (Some(u), Some(_)) = (&cfg.telemetry.otlp_endpoint, &exporter) {
        tracing::info!(endpoint = %u, "exporting traces by OTLP");
    }
    Ok(exporter)
}

fn show(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn run(cli: Cli) -> Result<(), Failure> {
    // A client command's options, with those given before the command.
    let early = (cli.server, cli.token, cli.json);
    let client = |c: ClientOpts| -> Result<(cli::Remote, bool), Failure> {
        let server = early.0.clone().unwrap_or(c.server);
        let token = early.1.clone().or(c.token);
        Ok((cli::Remote::new(&server, token)?, early.2 || c.json))
    };
    match cli
        .command
        .unwrap_or_else(|| Command::Serve(cli.node.clone()))
    {
        Command::Config {
            action: ConfigAction::Check { file },
        } => {
            config_load(&file).map_err(|e| Failure::user(e.to_string()))?;
            println!("{}: ok", file.display());
            Ok(())
        }
        Command::Health { server, timeout } => {
            let url = format!("{}/readyz", server.trim_end_matches('/'));
            let http = reqwest::Client::builder()
                .timeout(timeout)
                .build()
                .map_err(|e| Failure::unreachable(format!("cannot build an HTTP client: {e}")))?;
            let resp = http
                .get(&url)
                .send()
                .await
                .map_err(|e| Failure::unreachable(format!("{url}: {e}")))?;
            let status = resp.status();
            let body = resp.text().await.unwrap_or_default();
            if status.is_success() {
                println!("ready");
                Ok(())
            } else {
                Err(Failure::user(format!("{url}: {status} {body}")))
            }
        }
        Command::Completions { shell } => {
            let mut cmd = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut cmd, "proto_tasker", &mut std::io::stdout());
            Ok(())
        }
        Command::Man { out } => {
            let cmd = <Cli as clap::CommandFactory>::command();
            match out {
                None => clap_mangen::Man::new(cmd)
                    .render(&mut std::io::stdout())
                    .map_err(|e| Failure::user(format!("cannot print the man page: {e}"))),
                Some(dir) => clap_mangen::generate_to(cmd, &dir).map_err(|e| {
                    Failure::user(format!("cannot write man pages to {}: {e}", dir.display()))
                }),
            }
        }
        Command::Openapi { out } => {
            let doc = proto_tasker::server::openapi::document_json();
            match out {
                None => print!("{doc}"),
                Some(path) => std::fs::write(&path, doc)
                    .map_err(|e| Failure::user(format!("cannot write {}: {e}", path.display())))?,
            }
            Ok(())
        }
        Command::Migrate { config } => {
            let cfg = load_config(config.or(cli.node.config).as_ref())?;
            proto_tasker::node::open_store(&cfg.store)
                .await?
                .migrate()
                .await?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Serve(opts) => {
            let mut cfg = load_config(opts.config.or(cli.node.config).as_ref())?;
            if let Some(f) = opts.log_format.or(cli.node.log_format) {
                cfg.log.format = f;
            }
            let exporter = init_logging(&cfg)?;
            let ran = match Node::from_config(&cfg).await {
                Ok(node) => node.run(proto_tasker::pool::wait_for_signal()).await,
                Err(e) => Err(e),
            };
            if let Some(x) = exporter {
                x.shutdown().await;
            }
            ran?;
            Ok(())
        }
        Command::Bench(args) => match args.api.clone() {
            Some(api) => {
                let json = args.json || early.2;
                let report = bench::run_http(bench::HttpBenchParams {
                    server: api,
                    token: args.token.clone().or(early.1.clone()),
                    progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
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
            None => {
                let json = args.json || early.2;
                run_bench(args, json).await
            }
        },
        Command::Submit(a) => {
            let (remote, json) = client(a.client.clone())?;
            submit(&remote, a, json).await
        }
        Command::Status { id, client: c } => {
            let (remote, json) = client(c)?;
            let path = format!("/tasks/{}", cli::query_escape(&id));
            let (_, t) = remote.call(Method::GET, &path, None).await?;
            if json {
                show(&t)
            } else {
                cli::print_task(&t)
            }
            Ok(())
        }
        Command::List {
            client: c,
            state,
            queue,
            kind,
            tag,
            args,
            limit,
            cursor,
        } => {
            let mut q = vec![format!("limit={limit}")];
            for (k, v) in [
                ("state", state),
                ("queue", queue),
                ("kind", kind),
                ("tag", tag),
                ("args", args),
                ("cursor", cursor),
            ] {
                if let Some(v) = v {
                    q.push(format!("{k}={}", cli::query_escape(&v)));
                }
            }
            let (remote, json) = client(c)?;
            let (_, page) = remote
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
        Command::Cancel { id, client: c } => {
            let (remote, json) = client(c)?;
            task_action(&remote, &id, "cancel", json).await
        }
        Command::Retry { id, client: c } => {
            let (remote, json) = client(c)?;
            task_action(&remote, &id, "retry", json).await
        }
        Command::Queues { client: c } => {
            let (remote, json) = client(c)?;
            let (_, v) = remote.call(Method::GET, "/queues", None).await?;
            if json {
                show(&v)
            } else {
                cli::print_queues(&v)
            }
            Ok(())
        }
        Command::Pause { queue, client: c } => {
            let (remote, json) = client(c)?;
            queue_action(&remote, &queue, "pause", json).await
        }
        Command::Resume { queue, client: c } => {
            let (remote, json) = client(c)?;
            queue_action(&remote, &queue, "resume", json).await
        }
        Command::Audit {
            client: c,
            limit,
            cursor,
        } => {
            let (remote, json) = client(c)?;
            let mut path = format!("/audit?limit={limit}");
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={}", cli::query_escape(&c)));
            }
            let (_, page) = remote.call(Method::GET, &path, None).await?;
            if json {
                show(&page);
            } else {
                for e in page["entries"]
                    .as_array()
                    .map(Vec::as_slice)
                    .unwrap_or_default()
                {
                    println!(
                        "{}  {:<10} {:<22} {:<28} {:<24} {} {}",
                        e["at"].as_str().unwrap_or_default(),
                        e["token"].as_str().unwrap_or_default(),
                        e["remote"].as_str().unwrap_or_default(),
                        e["action"].as_str().unwrap_or_default(),
                        e["target"].as_str().unwrap_or_default(),
                        e["status"],
                        e["outcome"].as_str().unwrap_or_default(),
                    );
                }
                if let Some(c) = page["next_cursor"].as_str() {
                    println!("(more: --cursor {c})");
                }
            }
            Ok(())
        }
        Command::Queue { action } => {
            let (name, c, body) = match action {
                QueueAction::Show { name, client } => (name, client, None),
                QueueAction::Set {
                    name,
                    max_depth,
                    workers,
                    global_concurrency,
                    per_key_concurrency,
                    rate_limit,
                    fairness,
                    client,
                } => {
                    let mut body = serde_json::Map::new();
                    for (field, v) in [
                        ("max_depth", max_depth),
                        ("workers", workers),
                        ("global_concurrency", global_concurrency),
                        ("per_key_concurrency", per_key_concurrency),
                    ] {
                        if let Some(v) = v {
                            body.insert(field.into(), cli::number_or_none(field, &v)?);
                        }
                    }
                    if let Some(r) = rate_limit {
                        body.insert("rate_limit".into(), cli::rate_or_none(&r)?);
                    }
                    if let Some(f) = fairness {
                        body.insert("fairness".into(), Value::from(f));
                    }
                    if body.is_empty() {
                        return Err(Failure::user(
                            "queue set: give at least one of --max-depth, --workers, \
                             --global-concurrency, --per-key-concurrency, --rate-limit, --fairness",
                        ));
                    }
                    (name, client, Some(Value::Object(body)))
                }
            };
            let (remote, json) = client(c)?;
            let path = format!("/queues/{}", cli::query_escape(&name));
            let method = if body.is_some() {
                Method::PATCH
            } else {
                Method::GET
            };
            let (_, q) = remote.call(method, &path, body).await?;
            if json {
                show(&q);
            } else {
                cli::print_queues(&serde_json::json!({ "queues": [q] }));
            }
            Ok(())
        }
        Command::Schedule { action } => {
            let (name, c, verb) = match action {
                ScheduleAction::Pause { name, client } => (name, client, "pause"),
                ScheduleAction::Resume { name, client } => (name, client, "resume"),
                ScheduleAction::Trigger { name, client } => (name, client, "trigger"),
            };
            let (remote, json) = client(c)?;
            let path = format!("/schedules/{}/{verb}", cli::query_escape(&name));
            let (status, v) = remote.call(Method::POST, &path, None).await?;
            if json {
                show(&v);
            } else if verb == "trigger" {
                let note = if status == reqwest::StatusCode::OK {
                    " (its last task is unfinished and overlap is skip)"
                } else {
                    ""
                };
                println!("{}{note}", v["id"]);
            } else {
                println!("{name} {verb}d");
            }
            Ok(())
        }
        Command::Schedules { client: c } => {
            let (remote, json) = client(c)?;
            let (_, v) = remote.call(Method::GET, "/schedules", None).await?;
            if json {
                show(&v)
            } else {
                cli::print_schedules(&v)
            }
            Ok(())
        }
        Command::Nodes { client: c } => {
            let (remote, json) = client(c)?;
            let (_, v) = remote.call(Method::GET, "/nodes", None).await?;
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
    let replace = a.on_conflict.as_deref() == Some("replace");
    let body = cli::TaskBody {
        kind: a.kind,
        args: a.args,
        queue: a.queue,
        priority: a.priority,
        delay: a.delay,
        max_attempts: a.max_attempts,
        timeout: a.timeout,
        unique_key: a.unique_key,
        unique_states: a.unique_states,
        unique_for: a.unique_for,
        on_conflict: a.on_conflict,
        tags: a.tags,
    }
    .into_json()?;
    let (status, task) = r.call(Method::POST, "/tasks", Some(body)).await?;
    let id = cli::cell_id(&task)?;
    if !a.wait {
        if json {
            show(&task);
        } else if status == reqwest::StatusCode::OK && replace {
            println!("{id} (held this unique key: it takes these args unless it had finished)");
        } else if status == reqwest::StatusCode::OK {
            println!("{id} (already enqueued under this unique key)");
        } else {
            println!("{id}");
        }
        return Ok(());
    }
    // On a terminal, progress shows as it comes (from the task's events).
    let done = if std::io::IsTerminal::is_terminal(&std::io::stderr()) {
        cli::watch_task(r, &id, a.wait_timeout).await?
    } else {
        cli::wait_task(r, &id, a.wait_timeout).await?
    };
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
            round_robin: a.round_robin,
        },
        keys: a.keys,
        waiters: a.waiters,
        prefill: a.prefill,
        prefill_queues: a.prefill_queues.max(1),
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let nodes = a.nodes.max(1);
    let options = bench::BenchStoreOptions {
        synchronous: a.synchronous,
        pool_size: a.pool_size,
        pool_mode: a.pool_mode,
        listen_url: a.listen_url.clone(),
    };
    let stores = BenchStores::open(a.store.as_deref(), nodes, options).await?;
    let label = stores.label.clone();
    stores.stores[0]
        .migrate()
        .await
        .map_err(|e| Failure::unreachable(e.to_string()))?;
    let report = bench::run(stores.stores.clone(), params).await;
    stores.remove().await;
    let report = report.map_err(|e| Failure::unreachable(format!("bench failed: {e}")))?;
    if json {
        show(&serde_json::to_value(&report).unwrap_or_default());
    } else {
        println!("store: {label}, {nodes} node(s), {} workers", a.workers);
        print!("{report}");
    }
    Ok(())
}
