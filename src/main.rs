//! The `proto_tasker` command: run a node, manage its store, benchmark it.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use clap::{Parser, Subcommand};
use proto_tasker::bench::{self, BenchParams};
use proto_tasker::config::{Config, Dur, LogFormat, StoreKind};
use proto_tasker::executors::register_builtin;
use proto_tasker::store::{SqliteOptions, Synchronous};
use proto_tasker::{Builder, SqliteStore, Store, StoreError, TaskRegistry, config_load};

/// A durable, distributed task scheduler.
#[derive(Parser, Debug)]
#[command(
    name = "proto_tasker",
    version,
    about,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    /// Config file (YAML or JSON). Without it the node runs on built-in
    /// defaults: store ./proto_tasker.db.
    #[arg(long, global = true, env = "PROTO_TASKER_CONFIG")]
    config: Option<PathBuf>,
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
}

#[derive(Subcommand, Debug)]
enum ConfigAction {
    /// Validate a config file: exit 1 with file:line and the offending field.
    Check { file: PathBuf },
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
    /// SQLite file to use (default: a fresh file in a temp dir). Must be new or empty.
    #[arg(long)]
    store: Option<String>,
    /// SQLite durability: full (default) or normal.
    #[arg(long, default_value = "full", value_parser = parse_sync)]
    synchronous: Synchronous,
    /// Print the report as JSON.
    #[arg(long)]
    json: bool,
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

/// A failure with the exit code it maps to (1 user error, 2 store unreachable).
struct Failure {
    code: u8,
    message: String,
}

impl Failure {
    fn user(message: impl Into<String>) -> Self {
        Failure {
            code: 1,
            message: message.into(),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        // A bad SQLite file or schema is the user's to fix; an unreachable server is not.
        Failure {
            code: 1,
            message: e.to_string(),
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
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
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _ = match cfg.log.format {
        LogFormat::Text => builder.try_init(),
        LogFormat::Json => builder.json().try_init(),
    };
}

fn open_store(cfg: &Config) -> Result<Arc<dyn Store>, Failure> {
    match cfg.store.kind {
        StoreKind::Sqlite => {
            let mut o = SqliteOptions::new(cfg.store.path.clone());
            o.synchronous = cfg.store.synchronous;
            Ok(Arc::new(SqliteStore::open(o)?))
        }
        StoreKind::Postgres => Err(Failure::user(
            "store.kind: postgres is not available in this build yet; use sqlite",
        )),
    }
}

async fn run(cli: Cli) -> Result<(), Failure> {
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
            let store = open_store(&cfg)?;
            store.migrate().await?;
            println!("schema is up to date");
            Ok(())
        }
        Command::Serve => serve(load_config(cli.config.as_ref())?).await,
        Command::Bench(args) => run_bench(args).await,
    }
}

async fn serve(cfg: Config) -> Result<(), Failure> {
    init_logging(&cfg);
    let store = open_store(&cfg)?;
    if cfg.store.migrate {
        store.migrate().await?;
    }
    let mut registry = TaskRegistry::new();
    register_builtin(&mut registry);
    let pool = cfg
        .apply(Builder::new(store, registry))
        .build()
        .map_err(|e| Failure::user(e.to_string()))?;
    tracing::info!(
        node = pool.node_name(),
        store = %cfg.store.path.display(),
        "node starting"
    );
    pool.run_until_signal().await?;
    Ok(())
}

async fn run_bench(a: BenchArgs) -> Result<(), Failure> {
    let _dir;
    let path = match a.store {
        Some(p) => PathBuf::from(p),
        None => {
            let d = tempfile_dir()?;
            let p = d.join("bench.db");
            _dir = TempDirGuard(d);
            p
        }
    };
    let mut o = SqliteOptions::new(&path);
    o.synchronous = a.synchronous;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(o)?);
    store.migrate().await?;
    let report = bench::run(
        store,
        BenchParams {
            tasks: a.tasks,
            batch: a.batch,
            workers: a.workers,
            rate: a.rate,
            duration: a.duration,
        },
    )
    .await
    .map_err(|e| Failure {
        code: 2,
        message: format!("bench failed: {e}"),
    })?;
    if a.json {
        println!(
            "{}",
            serde_json::to_string_pretty(&report).unwrap_or_default()
        );
    } else {
        println!(
            "store: sqlite {} (synchronous={:?})",
            path.display(),
            a.synchronous
        );
        print!("{report}");
    }
    Ok(())
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
