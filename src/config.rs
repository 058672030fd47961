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

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Deserializer, Serialize};

use crate::pool::Builder;
use crate::sentinel::{Retention, SentinelConfig};
use crate::store::Synchronous;

/// A duration written as `250ms`, `30s`, `5m`, `1h` or `7d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Dur(pub Duration);

impl Dur {
    pub fn parse(s: &str) -> Result<Duration, String> {
        let s = s.trim();
        let split = s
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(|| format!("{s:?} has no unit (use ms, s, m, h or d, e.g. 30s)"))?;
        let (num, unit) = s.split_at(split);
        let n: f64 = num
            .parse()
            .map_err(|_| format!("{s:?} does not start with a number"))?;
        let scale = match unit.trim() {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "d" => 86400.0,
            other => {
                return Err(format!(
                    "{s:?} has unknown unit {other:?} (use ms, s, m, h or d)"
                ));
            }
        };
        let secs = n * scale;
        if !secs.is_finite() || secs > 1e10 {
            return Err(format!("{s:?} is too large"));
        }
        Ok(Duration::from_secs_f64(secs))
    }
}

impl<'de> Deserialize<'de> for Dur {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Dur::parse(&s).map(Dur).map_err(serde::de::Error::custom)
    }
}

impl Serialize for Dur {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{}ms", self.0.as_millis()))
    }
}

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
    /// PostgreSQL connections per node (plus one for LISTEN).
    pub pool_size: usize,
    /// SQLite durability: `full` (default) or `normal`.
    pub synchronous: Synchronous,
    /// Create or upgrade the schema at start.
    pub migrate: bool,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            kind: StoreKind::Sqlite,
            path: PathBuf::from("proto_tasker.db"),
            url: None,
            schema: "proto_tasker".into(),
            pool_size: 16,
            synchronous: Synchronous::Full,
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            enabled: true,
            listen: "127.0.0.1:8080".into(),
            auth_token: None,
            max_body_bytes: 64 << 20,
            max_args_bytes: 1 << 20,
            max_batch: 10_000,
        }
    }
}

/// The `shell` executor: off while `allow` is empty.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ShellConfig {
    /// Programs (`cmd[0]`, exactly as written in tasks) that may run.
    pub allow: Vec<String>,
    /// Bytes of stdout and of stderr kept (the tail).
    pub max_output_bytes: usize,
}

impl Default for ShellConfig {
    fn default() -> Self {
        ShellConfig {
            allow: Vec::new(),
            max_output_bytes: 64 << 10,
        }
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
    pub timeout: Dur,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            allow_hosts: Vec::new(),
            max_response_bytes: 1 << 20,
            timeout: Dur(Duration::from_secs(30)),
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
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    pub max: u32,
    pub per: Dur,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoolConfig {
    pub poll_interval: Dur,
    pub claim_max: usize,
    pub shutdown_timeout: Dur,
    pub force_shutdown: bool,
    /// Largest task result kept, as JSON; a larger one fails the task.
    pub max_result_bytes: usize,
}

impl Default for PoolConfig {
    fn default() -> Self {
        PoolConfig {
            poll_interval: Dur(Duration::from_secs(1)),
            claim_max: 100,
            shutdown_timeout: Dur(Duration::from_secs(30)),
            force_shutdown: false,
            max_result_bytes: 1 << 20,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct SentinelSettings {
    pub heartbeat_interval: Dur,
    pub node_timeout: Dur,
    pub check_interval: Dur,
    pub hung_grace: Dur,
}

impl Default for SentinelSettings {
    fn default() -> Self {
        let d = SentinelConfig::default();
        SentinelSettings {
            heartbeat_interval: Dur(d.heartbeat_interval),
            node_timeout: Dur(d.node_timeout),
            check_interval: Dur(d.check_interval),
            hung_grace: Dur(d.hung_grace),
        }
    }
}

/// How long finished tasks are kept; `null` keeps them forever.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub completed: Option<Dur>,
    pub failed: Option<Dur>,
    pub cancelled: Option<Dur>,
    pub interval: Dur,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let r = Retention::default();
        RetentionConfig {
            completed: r.completed.map(Dur),
            failed: r.failed.map(Dur),
            cancelled: r.cancelled.map(Dur),
            interval: Dur(r.interval),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize, Default)]
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

/// The whole configuration of a node.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub node: NodeConfig,
    pub store: StoreConfig,
    pub server: ServerConfig,
    /// Queues this node serves, with their worker counts.
    pub queues: BTreeMap<String, QueueConfig>,
    pub pool: PoolConfig,
    pub sentinel: SentinelSettings,
    pub retention: RetentionConfig,
    pub log: LogConfig,
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
                },
            )]),
            pool: PoolConfig::default(),
            sentinel: SentinelSettings::default(),
            retention: RetentionConfig::default(),
            log: LogConfig::default(),
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

/// Field paths from serde_path_to_error, with `?` segments (unknown
/// positions) and the root `.` left out.
fn field_path(p: &serde_path_to_error::Path) -> Option<String> {
    let s = p.to_string();
    (s != "." && !s.is_empty()).then_some(s)
}

/// Read a config file (YAML or JSON by extension), apply env overrides and validate.
pub fn config_load(path: impl AsRef<Path>) -> Result<Config, ConfigError> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: path.to_path_buf(),
        line: None,
        column: None,
        field: None,
        message: format!("cannot read: {e}"),
    })?;
    let json = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("json"));
    let mut cfg = if json {
        parse_json(path, &text)?
    } else {
        parse_yaml(path, &text)?
    };
    apply_env(&mut cfg);
    validate(&cfg).map_err(|(field, message)| ConfigError {
        file: path.to_path_buf(),
        line: find_line(&text, &field),
        column: None,
        field: Some(field),
        message,
    })?;
    Ok(cfg)
}

fn parse_json(path: &Path, text: &str) -> Result<Config, ConfigError> {
    let de = &mut serde_json::Deserializer::from_str(text);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let field = field_path(e.path());
        let inner = e.into_inner();
        ConfigError {
            file: path.to_path_buf(),
            line: Some(inner.line() as u64),
            column: Some(inner.column() as u64),
            field,
            message: strip_location(&inner.to_string()),
        }
    })
}

fn parse_yaml(path: &Path, text: &str) -> Result<Config, ConfigError> {
    if text.trim().is_empty() {
        return Ok(Config::default());
    }
    let mut field = None;
    serde_saphyr::with_deserializer_from_str(text, |de| {
        serde_path_to_error::deserialize(de).map_err(|e| {
            field = field_path(e.path());
            e.into_inner()
        })
    })
    .map_err(|e| {
        let loc = e.location();
        let line = loc.map(|l| l.line());
        let column = loc.map(|l| l.column());
        let mut message = yaml_message(&e.to_string());
        if message.starts_with("invalid u") || message.starts_with("invalid i") {
            message = format!("expected a whole number in range ({message})");
        }
        if let (Some(l), Some(c)) = (line, column)
            && let Some(found) = token_at(text, l, c)
            && !message.contains(&found)
        {
            message = format!("{message} (found {found})");
        }
        ConfigError {
            file: path.to_path_buf(),
            line,
            column,
            field,
            message,
        }
    })
}

/// The scalar that starts at 1-based `line`:`column`, if any.
fn token_at(text: &str, line: u64, column: u64) -> Option<String> {
    let l = text.lines().nth(line.checked_sub(1)? as usize)?;
    let rest: String = l.chars().skip(column.checked_sub(1)? as usize).collect();
    let tok = rest
        .split(|c: char| c.is_whitespace() || c == ',' || c == '}' || c == ']' || c == '#')
        .next()?
        .trim();
    (!tok.is_empty() && !tok.ends_with(':')).then(|| tok.to_string())
}

/// serde_json appends " at line L column C"; we print the location up front.
fn strip_location(msg: &str) -> String {
    match msg.rfind(" at line ") {
        Some(i) => msg[..i].to_string(),
        None => msg.to_string(),
    }
}

/// serde-saphyr renders "error: line L column C: message" and then a
/// snippet; keep the message alone (the location is printed up front).
fn yaml_message(msg: &str) -> String {
    let mut line = msg.lines().next().unwrap_or(msg).trim();
    line = line.strip_prefix("error:").unwrap_or(line).trim_start();
    if let Some(rest) = line.strip_prefix("line ")
        && let Some(i) = rest.find(": ")
    {
        line = &rest[i + 2..];
    }
    match line.find(" at line ") {
        Some(i) => line[..i].to_string(),
        None => line.to_string(),
    }
}

/// The line of a dotted field path (best effort): each segment is looked
/// for as a key after the previous one, so `queues.default.workers` finds
/// the `workers:` under `default:`, in YAML and JSON alike.
fn find_line(text: &str, field: &str) -> Option<u64> {
    let mut pos = 0;
    // `schedules[2]`: find `schedules`, then the next key's third occurrence.
    let mut repeat = 0;
    for seg in field.split('.') {
        let (key, index) = match seg.split_once('[') {
            Some((k, rest)) => (k, rest.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        for _ in 0..=repeat {
            pos = find_key(text, key, pos)? + key.len();
        }
        pos -= key.len();
        repeat = index.unwrap_or(0);
    }
    Some(text[..pos].matches('\n').count() as u64 + 1)
}

fn find_key(text: &str, key: &str, from: usize) -> Option<usize> {
    let mut at = from;
    while let Some(i) = text.get(at..)?.find(key) {
        let start = at + i;
        let end = start + key.len();
        let before_ok = text[..start]
            .chars()
            .next_back()
            .is_none_or(|c| !(c.is_alphanumeric() || c == '_'));
        let after = text[end..].trim_start_matches('"').trim_start();
        if before_ok && after.starts_with(':') {
            return Some(start);
        }
        at = end;
    }
    None
}

fn apply_env(cfg: &mut Config) {
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
}

/// Check what types alone cannot. Returns `(field, message)`.
pub fn validate(cfg: &Config) -> Result<(), (String, String)> {
    let e = |f: &str, m: &str| Err((f.to_string(), m.to_string()));
    if cfg.queues.is_empty() {
        return e("queues", "at least one queue is needed");
    }
    for (name, q) in &cfg.queues {
        if name.trim().is_empty() {
            return e("queues", "a queue name must not be empty");
        }
        if q.workers == 0 {
            return Err((
                format!("queues.{name}.workers"),
                "must be at least 1".into(),
            ));
        }
        if q.workers > 100_000 {
            return Err((
                format!("queues.{name}.workers"),
                "must be at most 100000".into(),
            ));
        }
    }
    if let Some(n) = &cfg.node.name
        && n.trim().is_empty()
    {
        return e("node.name", "must not be empty when set");
    }
    if cfg.pool.claim_max == 0 {
        return e("pool.claim_max", "must be at least 1");
    }
    if cfg.pool.poll_interval.0.is_zero() {
        return e("pool.poll_interval", "must be more than 0");
    }
    let s = &cfg.sentinel;
    if s.heartbeat_interval.0.is_zero() {
        return e("sentinel.heartbeat_interval", "must be more than 0");
    }
    if s.check_interval.0.is_zero() {
        return e("sentinel.check_interval", "must be more than 0");
    }
    if s.node_timeout.0 <= s.heartbeat_interval.0 {
        return e(
            "sentinel.node_timeout",
            "must be longer than sentinel.heartbeat_interval (a node would be declared dead between two heartbeats)",
        );
    }
    if cfg.retention.interval.0.is_zero() {
        return e("retention.interval", "must be more than 0");
    }
    match cfg.store.kind {
        StoreKind::Sqlite if cfg.store.path.as_os_str().is_empty() => {
            return e("store.path", "must not be empty");
        }
        StoreKind::Postgres if cfg.store.url.as_deref().is_none_or(str::is_empty) => {
            return e("store.url", "is required when store.kind is postgres");
        }
        StoreKind::Postgres if cfg.store.pool_size < 2 => {
            return e("store.pool_size", "must be at least 2");
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
        let sh = &self.executors.shell;
        r.register(
            "shell",
            std::sync::Arc::new(crate::executors::shell::ShellExecutor::new(
                sh.allow.clone(),
                sh.max_output_bytes,
            )),
        );
        let h = &self.executors.http;
        r.register(
            "http",
            std::sync::Arc::new(crate::executors::http::HttpExecutor::new(
                h.allow_hosts.clone(),
                h.max_response_bytes,
                h.timeout.0,
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

    /// Apply this config's pool, sentinel and retention settings to a builder.
    pub fn apply(&self, mut b: Builder) -> Builder {
        if let Some(n) = &self.node.name {
            b = b.node_name(n.clone());
        }
        for (q, c) in &self.queues {
            b = b.queue(q.clone(), c.workers).queue_limits(
                q.clone(),
                crate::store::QueueLimits {
                    global_concurrency: c.global_concurrency,
                    per_key_concurrency: c.per_key_concurrency,
                    rate: c.rate_limit.as_ref().map(|r| (r.max, r.per.0)),
                },
            );
        }
        let s = &self.sentinel;
        let r = &self.retention;
        for spec in &self.schedules {
            b = b.schedule(spec.clone());
        }
        b.poll_interval(self.pool.poll_interval.0)
            .claim_max(self.pool.claim_max)
            .shutdown_timeout(self.pool.shutdown_timeout.0)
            .force_shutdown(self.pool.force_shutdown)
            .max_result_bytes(self.pool.max_result_bytes)
            .sentinel(SentinelConfig {
                heartbeat_interval: s.heartbeat_interval.0,
                node_timeout: s.node_timeout.0,
                check_interval: s.check_interval.0,
                hung_grace: s.hung_grace.0,
                retention: Retention {
                    completed: r.completed.map(|d| d.0),
                    failed: r.failed.map(|d| d.0),
                    cancelled: r.cancelled.map(|d| d.0),
                    interval: r.interval.0,
                },
            })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load(name: &str, text: &str) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, text).unwrap();
        config_load(&p)
    }

    #[test]
    fn durations_parse() {
        assert_eq!(Dur::parse("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(Dur::parse("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(Dur::parse("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(Dur::parse("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(Dur::parse("7d").unwrap(), Duration::from_secs(7 * 86400));
        assert!(Dur::parse("30").unwrap_err().contains("no unit"));
        assert!(Dur::parse("3x").unwrap_err().contains("unknown unit"));
    }

    #[test]
    fn empty_file_is_all_defaults() {
        assert_eq!(load("c.yaml", "").unwrap(), Config::default());
        assert_eq!(load("c.json", "{}").unwrap(), Config::default());
    }

    #[test]
    fn full_yaml_loads() {
        let c = load(
            "c.yaml",
            "node:\n  name: n1\nstore:\n  path: /tmp/x.db\n  synchronous: normal\nqueues:\n  default:\n    workers: 4\n  emails:\n    workers: 2\npool:\n  shutdown_timeout: 5s\nsentinel:\n  heartbeat_interval: 1s\n  node_timeout: 5s\nretention:\n  completed: 1d\n  failed: null\n",
        )
        .unwrap();
        assert_eq!(c.node.name.as_deref(), Some("n1"));
        assert_eq!(c.queues.len(), 2);
        assert_eq!(c.queues["emails"].workers, 2);
        assert_eq!(c.pool.shutdown_timeout.0, Duration::from_secs(5));
        assert_eq!(c.retention.failed, None);
        assert_eq!(c.store.synchronous, Synchronous::Normal);
    }

    #[test]
    fn wrong_type_names_file_line_and_field() {
        let e = load("bad.yaml", "pool:\n  claim_max: lots\n").unwrap_err();
        let s = e.to_string();
        assert!(s.starts_with(&format!("{}:2", e.file.display())), "{s}");
        assert_eq!(e.field.as_deref(), Some("pool.claim_max"), "{s}");
    }

    #[test]
    fn unknown_field_is_an_error() {
        let e = load(
            "bad.yaml",
            "queues:\n  default:\n    workers: 2\n    wrokers: 3\n",
        )
        .unwrap_err();
        let s = e.to_string();
        assert!(s.contains("wrokers"), "{s}");
        assert_eq!(e.line, Some(4), "{s}");
        let e = load("bad.json", "{\n  \"pool\": {\"nope\": 1}\n}").unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
        assert_eq!(e.line, Some(2));
    }

    #[test]
    fn negative_workers_is_an_error() {
        let e = load("bad.yaml", "queues:\n  default:\n    workers: -2\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("queues.default.workers"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
        let e = load("bad.yaml", "queues:\n  default:\n    workers: 0\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("queues.default.workers"), "{e}");
        assert_eq!(e.line, Some(3), "{e}");
    }

    #[test]
    fn bad_duration_names_field() {
        let e = load("bad.yaml", "sentinel:\n  node_timeout: soon\n").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("sentinel.node_timeout"), "{e}");
        assert!(e.message.contains("soon"), "{e}");
    }

    #[test]
    fn bad_schedules_name_the_item_and_line() {
        let yaml = "schedules:\n  - name: a\n    cron: \"* * * * *\"\n    kind: noop\n  - name: b\n    cron: \"0 99 * * *\"\n    kind: noop\n";
        let e = load("s.yaml", yaml).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedules[1].cron"), "{e}");
        assert_eq!(e.line, Some(6), "{e}");
        assert!(e.message.contains("field 2 (hour)"), "{e}");
        let yaml = "schedules:\n  - name: a\n    cron: \"* * * * *\"\n    kind: noop\n    timezone: Nowhere/Special\n";
        let e = load("s.yaml", yaml).unwrap_err();
        assert_eq!(e.field.as_deref(), Some("schedules[0].timezone"), "{e}");
        assert_eq!(e.line, Some(5), "{e}");
    }

    #[test]
    fn missing_file_names_it() {
        let e = config_load("/nonexistent/proto.yaml").unwrap_err();
        assert!(
            e.to_string()
                .starts_with("/nonexistent/proto.yaml: cannot read"),
            "{e}"
        );
    }
}
