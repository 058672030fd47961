//! Node configuration: [`Config`] and [`config_load`].
//!
//! YAML (`.yaml`, `.yml`) or JSON (`.json`), chosen by extension. Every field
//! has a default, so an empty file is a valid config. Unknown fields are
//! errors. Errors name the file, the line and the field:
//!
//! ```text
//! node.yaml:7:14: queues.default.workers: invalid value: integer `-2`, expected usize
//! ```
//!
//! Environment overrides (applied after the file): `PROTO_TASKER_STORE_PATH`
//! (SQLite file), `PROTO_TASKER_STORE_URL` (a `postgres://` URL, which also
//! switches the store to PostgreSQL).

mod load;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use crate::duration::parse as parse_duration;
use crate::duration::text as dur_serde;
use crate::maintenance::Retention;
use crate::pool::settings::validate_queue;
use crate::pool::{Builder, PoolSettings};
use crate::sentinel::SentinelConfig;
use crate::store::{QueueLimits, Synchronous};
pub use load::config_load;

/// Which store a node uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum StoreKind {
    #[default]
    Sqlite,
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    pub kind: StoreKind,
    /// The SQLite file.
    pub path: PathBuf,
    /// The PostgreSQL URL (`kind: postgres`).
    pub url: Option<String>,
    /// The PostgreSQL schema holding the tables; clusters sharing a database use different ones.
    pub schema: String,
    /// PostgreSQL connections per node (plus one for LISTEN): a node holds
    /// at most `pool_size + 1` server connections.
    pub pool_size: usize,
    /// `session` (a direct connection, the default) or `transaction` (`url`
    /// is PgBouncer or another pooler in transaction mode).
    pub pool_mode: crate::store::PoolMode,
    /// A direct PostgreSQL URL for LISTEN/NOTIFY wake-ups when `url` goes
    /// through a transaction pooler; without it such a node polls.
    pub listen_url: Option<String>,
    /// SQLite durability: `full` (default) or `normal`.
    pub synchronous: Synchronous,
    /// How long a SQLite connection waits for another process's write lock
    /// before the request fails (503).
    #[serde(with = "dur_serde")]
    pub busy_timeout: Duration,
    /// Create or upgrade the schema at start.
    pub migrate: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        // The stores' own defaults, so each is written once.
        let sqlite = crate::store::SqliteOptions::new("proto_tasker.db");
        let postgres = crate::store::PostgresOptions::new("");
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: sqlite.path,
            url: None,
            schema: postgres.schema,
            pool_size: postgres.pool_size,
            pool_mode: postgres.pool_mode,
            listen_url: postgres.listen_url,
            synchronous: sqlite.synchronous,
            busy_timeout: sqlite.busy_timeout,
            migrate: true,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Unique among nodes sharing a store. Default `hostname-pid`.
    pub name: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Serve the HTTP API, /metrics and the dashboard.
    pub enabled: bool,
    /// Address to bind; loopback unless you mean otherwise (then set a token).
    pub listen: String,
    /// When set, every /api route needs `Authorization: Bearer <token>`.
    /// Env `PROTO_TASKER_TOKEN` overrides it.
    pub auth_token: Option<String>,
    /// Largest request body.
    pub max_body_bytes: usize,
    /// Largest `args` of one task, as JSON.
    pub max_args_bytes: usize,
    /// Most tasks in one batch.
    pub max_batch: usize,
    /// Longest `?wait=` long-poll a request may ask for (longer: 400).
    #[serde(with = "dur_serde")]
    pub max_wait: Duration,
    /// Origins (`https://app.example.com`) whose pages may call the API.
    /// Any other page's requests are refused (403).
    pub cors_origins: Vec<String>,
    /// Host names, besides localhost and the listen address, a loopback
    /// node answers to (a name that points here, e.g. behind a proxy).
    pub allowed_hosts: Vec<String>,
    /// API tokens with roles (`read`, `operate`, `admin`); see the README.
    pub tokens: Vec<TokenConfig>,
}

/// One API token: a name (what logs show), a role, and the secret itself,
/// the file that holds it, or the environment variable that does.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    pub name: String,
    pub role: crate::server::auth::Role,
    #[serde(default)]
    pub token: Option<String>,
    #[serde(default)]
    pub token_file: Option<PathBuf>,
    #[serde(default)]
    pub token_env: Option<String>,
}

impl TokenConfig {
    /// The secret, read from wherever it is kept.
    pub fn secret(&self) -> Result<String, String> {
        let s = match (&self.token, &self.token_file, &self.token_env) {
            (Some(t), None, None) => t.clone(),
            (None, Some(f), None) => std::fs::read_to_string(f)
                .map_err(|e| format!("token_file {}: {e}", f.display()))?
                .trim()
                .to_string(),
            (None, None, Some(v)) => {
                std::env::var(v).map_err(|_| format!("token_env {v}: the variable is not set"))?
            }
            _ => return Err("give exactly one of token, token_file or token_env".into()),
        };
        if s.trim().len() < 16 {
            return Err("the secret must be at least 16 characters".into());
        }
        Ok(s)
    }
}

impl ServerConfig {
    /// The tokens this section defines, secrets read.
    pub fn api_tokens(&self) -> Result<Vec<crate::server::auth::ApiToken>, (String, String)> {
        self.tokens
            .iter()
            .enumerate()
            .map(|(i, t)| {
                let secret = t.secret().map_err(|m| (format!("server.tokens[{i}]"), m))?;
                Ok(crate::server::auth::ApiToken {
                    name: t.name.clone(),
                    secret: std::sync::Arc::from(secret),
                    role: t.role,
                })
            })
            .collect()
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        let limits = crate::server::Limits::default();
        ServerConfig {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            auth_token: None,
            max_body_bytes: limits.max_body_bytes,
            max_args_bytes: limits.max_args_bytes,
            max_batch: limits.max_batch,
            max_wait: limits.max_wait,
            cors_origins: Vec::new(),
            allowed_hosts: Vec::new(),
            tokens: Vec::new(),
        }
    }
}

impl ServerConfig {
    /// What one request may carry.
    pub fn limits(&self) -> crate::server::Limits {
        crate::server::Limits {
            max_body_bytes: self.max_body_bytes,
            max_args_bytes: self.max_args_bytes,
            max_batch: self.max_batch,
            max_wait: self.max_wait,
        }
    }
}

/// The `shell` executor: off while `allow` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShellConfig {
    /// Programs that may run: bare names (looked up in the node's `PATH`
    /// when it starts) or paths. Each must exist.
    pub allow: Vec<String>,
    /// Environment names a program gets: from the node's environment, or
    /// set by the task in `args.env` (any other name is refused).
    pub env_allow: Vec<String>,
    /// Directories a task's `cwd` must lie inside (none: no task sets `cwd`).
    pub cwd_allow: Vec<std::path::PathBuf>,
    /// Bytes of stdout and of stderr kept (the tail).
    pub max_output_bytes: usize,
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            allow: Vec::new(),
            env_allow: Vec::new(),
            cwd_allow: Vec::new(),
            max_output_bytes: 64 << 10,
        }
    }
}

impl ShellConfig {
    /// The executor this section describes, its programs resolved now.
    pub fn executor(&self) -> Result<crate::executors::shell::ShellExecutor, (String, String)> {
        crate::executors::shell::ShellExecutor::from_policy(crate::executors::shell::ShellPolicy {
            allow: self.allow.clone(),
            env_allow: self.env_allow.clone(),
            cwd_allow: self.cwd_allow.clone(),
            max_output: self.max_output_bytes,
        })
    }
}

/// The `http` executor: off while `allow_hosts` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Hosts (`example.com`) or `host:port` pairs tasks may call.
    pub allow_hosts: Vec<String>,
    /// Bytes of the response body kept.
    pub max_response_bytes: usize,
    /// Per-request timeout (the task's own timeout applies too).
    #[serde(with = "dur_serde")]
    pub timeout: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            allow_hosts: Vec::new(),
            max_response_bytes: 1 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct ExecutorsConfig {
    pub shell: ShellConfig,
    pub http: HttpConfig,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// Slots serving this queue on this node.
    pub workers: usize,
    /// At most this many of the queue's tasks run at once across the cluster.
    #[serde(default)]
    pub global_concurrency: Option<u32>,
    /// At most this many tasks with the same `concurrency_key` run at once across the cluster.
    #[serde(default)]
    pub per_key_concurrency: Option<u32>,
    /// At most `max` task starts per `per` across the cluster.
    #[serde(default)]
    pub rate_limit: Option<RateLimit>,
    /// Starting value of the queue's `max_depth` (at most this many
    /// unfinished tasks; enqueues past it are refused). Stored for the
    /// cluster when the queue has no settings yet; a change made at run
    /// time (`PATCH /api/v1/queues/{name}`) is kept over it.
    #[serde(default)]
    pub max_depth: Option<u32>,
    /// `round_robin`: claims take tasks across concurrency keys in turn.
    #[serde(default)]
    pub fairness: Option<crate::store::Fairness>,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub max: u32,
    #[serde(with = "dur_serde")]
    pub per: Duration,
}

impl QueueConfig {
    /// The queue's cluster-wide limits, as the store applies them.
    pub fn limits(&self) -> QueueLimits {
        QueueLimits {
            global_concurrency: self.global_concurrency,
            per_key_concurrency: self.per_key_concurrency,
            rate: self.rate_limit.as_ref().map(|r| (r.max, r.per)),
            round_robin: self.fairness == Some(crate::store::Fairness::RoundRobin),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    pub format: LogFormat,
    /// A tracing filter, e.g. `info` or `proto_tasker=debug`.
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: LogFormat::Text,
            level: "info".into(),
        }
    }
}

/// Traces (see [`crate::telemetry`]): off unless `otlp_endpoint` is set.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// An OTLP/HTTP collector's base URL (Jaeger, Tempo, the OpenTelemetry
    /// Collector: `http://127.0.0.1:4318`); spans go to `<url>/v1/traces`.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans.
    pub service_name: String,
    /// The share of new traces kept, 0.0 to 1.0; a trace begun elsewhere
    /// keeps its caller's decision.
    pub sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        TelemetryConfig {
            otlp_endpoint: None,
            service_name: "proto_tasker".into(),
            sample_ratio: 1.0,
        }
    }
}

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub store: StoreConfig,
    pub server: ServerConfig,
    /// Queues this node serves, with their worker counts.
    pub queues: BTreeMap<String, QueueConfig>,
    pub pool: PoolSettings,
    pub sentinel: SentinelConfig,
    pub retention: Retention,
    pub log: LogConfig,
    pub telemetry: TelemetryConfig,
    pub executors: ExecutorsConfig,
    /// Cron schedules this node registers at start.
    pub schedules: Vec<crate::cron::ScheduleSpec>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            node: NodeConfig::default(),
            store: StoreConfig::default(),
            server: ServerConfig::default(),
            queues: BTreeMap::from([(
                crate::task::DEFAULT_QUEUE.to_string(),
                QueueConfig {
                    workers: 10,
                    global_concurrency: None,
                    per_key_concurrency: None,
                    rate_limit: None,
                    max_depth: None,
                    fairness: None,
                },
            )]),
            pool: PoolSettings::default(),
            sentinel: SentinelConfig::default(),
            retention: Retention::default(),
            log: LogConfig::default(),
            telemetry: TelemetryConfig::default(),
            executors: ExecutorsConfig::default(),
            schedules: Vec::new(),
        }
    }
}

/// A config that cannot be used, with where and why.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<u64>,
    pub column: Option<u64>,
    /// The dotted path of the offending field, when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": ")?;
        if let Some(field) = &self.field {
            write!(f, "{field}: ")?;
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for ConfigError {}

pub(crate) fn apply_env(cfg: &mut Config) {
    if let Ok(t) = std::env::var("PROTO_TASKER_TOKEN")
        && !t.is_empty()
    {
        cfg.server.auth_token = Some(t);
    }
    if let Ok(p) = std::env::var("PROTO_TASKER_STORE_PATH")
        && !p.is_empty()
    {
        cfg.store.path = PathBuf::from(p);
    }
    if let Ok(u) = std::env::var("PROTO_TASKER_STORE_URL")
        && !u.is_empty()
    {
        cfg.store.kind = StoreKind::Postgres;
        cfg.store.url = Some(u);
    }
    if let Ok(u) = std::env::var("PROTO_TASKER_OTLP_ENDPOINT")
        && !u.is_empty()
    {
        cfg.telemetry.otlp_endpoint = Some(u);
    }
    if let Ok(u) = std::env::var("PROTO_TASKER_STORE_LISTEN_URL")
        && !u.is_empty()
    {
        cfg.store.listen_url = Some(u);
    }
}

/// Check what types alone cannot. Returns `(field, message)`.
pub fn validate(cfg: &Config) -> Result<(), (String, String)> {
    let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
    if cfg.queues.is_empty() {
        return e("queues", "at least one queue is needed");
    }
    for (name, q) in &cfg.queues {
        validate_queue(name, q.workers, &q.limits())?;
        match q.max_depth {
            Some(0) => {
                return Err((
                    format!("queues.{name}.max_depth"),
                    "must be at least 1 (pause the queue to stop it)".into(),
                ));
            }
            Some(n) if n > crate::client::MAX_DEPTH_LIMIT => {
                return Err((
                    format!("queues.{name}.max_depth"),
                    format!("must be at most {}", crate::client::MAX_DEPTH_LIMIT),
                ));
            }
            _ => {}
        }
    }
    if let Some(n) = &cfg.node.name
        && n.trim().is_empty()
    {
        return e("node.name", "must not be empty when set");
    }
    cfg.pool.validate()?;
    let mut sentinel = cfg.sentinel.clone();
    sentinel.retention = cfg.retention.clone();
    sentinel.validate()?;
    match cfg.store.kind {
        StoreKind::Sqlite if cfg.store.path.as_os_str().is_empty() => {
            return e("store.path", "must not be empty");
        }
        StoreKind::Postgres if cfg.store.url.as_deref().is_none_or(str::is_empty) => {
            return e("store.url", "is required when store.kind is postgres");
        }
        StoreKind::Postgres
            if cfg
                .store
                .listen_url
                .as_deref()
                .is_some_and(|u| u.parse::<tokio_postgres::Config>().is_err()) =>
        {
            return e("store.listen_url", "is not a PostgreSQL URL");
        }
        StoreKind::Postgres if cfg.store.pool_size < 2 => {
            return e("store.pool_size", "must be at least 2");
        }
        StoreKind::Postgres if cfg.store.pool_size > 1000 => {
            return e(
                "store.pool_size",
                "must be at most 1000 (a node needs a few; see the README on connections)",
            );
        }
        _ => {}
    }
    if let Some(t) = &cfg.server.auth_token
        && t.trim().is_empty()
    {
        return e("server.auth_token", "must not be empty when set");
    }
    if cfg.server.listen.parse::<std::net::SocketAddr>().is_err() {
        return e("server.listen", "must be an address like 127.0.0.1:8080");
    }
    if cfg.server.max_batch == 0 || cfg.server.max_args_bytes == 0 || cfg.server.max_body_bytes == 0
    {
        return e(
            "server",
            "max_batch, max_args_bytes and max_body_bytes must be more than 0",
        );
    }
    if cfg.server.max_wait.is_zero() {
        return e("server.max_wait", "must be more than 0");
    }
    let mut names = std::collections::HashSet::new();
    for (i, spec) in cfg.schedules.iter().enumerate() {
        spec.parse(&format!("schedules[{i}]."))
            .map_err(|e| (e.field, e.message))?;
        if !names.insert(spec.name.as_str()) {
            return Err((
                format!("schedules[{i}].name"),
                format!("{:?} is used twice", spec.name),
            ));
        }
    }
    cfg.executors.shell.executor()?;
    let tokens = cfg.server.api_tokens()?;
    let mut names = std::collections::HashSet::new();
    for (i, t) in tokens.iter().enumerate() {
        if t.name.trim().is_empty() || !names.insert(t.name.clone()) {
            return Err((
                format!("server.tokens[{i}].name"),
                format!("{:?} is empty or used twice", t.name),
            ));
        }
    }
    for (i, o) in cfg.server.cors_origins.iter().enumerate() {
        let ok = o.starts_with("http://") || o.starts_with("https://");
        if !ok || o.trim_end_matches('/').matches('/').count() != 2 {
            return Err((
                format!("server.cors_origins[{i}]"),
                format!("{o:?} is not an origin like https://app.example.com"),
            ));
        }
    }
    if let Some(u) = &cfg.telemetry.otlp_endpoint {
        let scheme = u.starts_with("http://") || u.starts_with("https://");
        if !scheme || u.len() > 2048 || u.parse::<axum::http::Uri>().is_err() {
            return Err((
                "telemetry.otlp_endpoint".into(),
                format!("{u:?} is not an http(s) URL like http://127.0.0.1:4318"),
            ));
        }
    }
    if cfg.telemetry.service_name.trim().is_empty() || cfg.telemetry.service_name.len() > 255 {
        return e("telemetry.service_name", "must be 1 to 255 bytes");
    }
    if !(0.0..=1.0).contains(&cfg.telemetry.sample_ratio) {
        return Err((
            "telemetry.sample_ratio".into(),
            format!("{} is not between 0.0 and 1.0", cfg.telemetry.sample_ratio),
        ));
    }
    if cfg.log.level.trim().is_empty() {
        return e("log.level", "must not be empty");
    }
    Ok(())
}

impl Config {
    /// The registry of a node: `noop`, `sleep`, `fail`, and `shell`/`http`
    /// as configured (they refuse every task while their allow-lists are empty).
    pub fn registry(&self) -> Result<crate::registry::TaskRegistry, String> {
        let mut r = crate::registry::TaskRegistry::new();
        crate::executors::register_builtin(&mut r);
        let shell = self
            .executors
            .shell
            .executor()
            .map_err(|(field, message)| format!("{field}: {message}"))?;
        r.register("shell", std::sync::Arc::new(shell));
        let h = &self.executors.http;
        r.register(
            "http",
            std::sync::Arc::new(crate::executors::http::HttpExecutor::new(
                h.allow_hosts.clone(),
                h.max_response_bytes,
                h.timeout,
            )?),
        );
        Ok(r)
    }

    /// The defaults plus env overrides: what a node runs on without a file.
    pub fn from_env() -> Self {
        let mut c = Config::default();
        apply_env(&mut c);
        c
    }

    /// Apply this config's node name, queues, pool, sentinel, retention and
    /// schedules to a builder.
    pub fn apply(&self, mut b: Builder) -> Builder {
        if let Some(n) = &self.node.name {
            b = b.node_name(n.clone());
        }
        for (q, c) in &self.queues {
            b = b
                .queue(q.clone(), c.workers)
                .queue_limits(q.clone(), c.limits());
        }
        for spec in &self.schedules {
            b = b.schedule(spec.clone());
        }
        let mut sentinel = self.sentinel.clone();
        sentinel.retention = self.retention.clone();
        b.settings(self.pool.clone()).sentinel(sentinel)
    }
}
