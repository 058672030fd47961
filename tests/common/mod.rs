//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::sync::Arc;

use proto_tasker::store::{SqliteOptions, Synchronous, TaskInsert};
use proto_tasker::{SqliteStore, Store};

/// A migrated SQLite store in a fresh temp dir (kept alive by the returned guard).
pub async fn sqlite_store() -> (Arc<dyn Store>, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut opts = SqliteOptions::new(dir.path().join("tasks.db"));
    // Tests do not need power-loss durability; crash tests use FULL explicitly.
    opts.synchronous = Synchronous::Normal;
    let store = SqliteStore::open(opts).expect("open sqlite");
    store.migrate().await.expect("migrate");
    (Arc::new(store), dir)
}

pub fn insert(
    kind: &str,
    queue: &str,
    priority: i16,
    run_at: chrono::DateTime<chrono::Utc>,
) -> TaskInsert {
    TaskInsert {
        kind: kind.to_string(),
        args: serde_json::json!({}),
        queue: queue.to_string(),
        priority,
        run_at,
        max_attempts: 3,
        timeout_ms: None,
        unique_key: None,
        depends_on: Vec::new(),
        on_dependency_failure: Default::default(),
        concurrency_key: None,
    }
}

/// The PostgreSQL the tests use: `PROTO_TASKER_TEST_DATABASE_URL`, else the
/// machine's server on 127.0.0.1:5432, else a throwaway cluster started here
/// (initdb + pg_ctl under /tmp) when the PostgreSQL binaries exist. Fails
/// with one line saying what to install when none of that works.
pub fn pg_url() -> String {
    static URL: std::sync::OnceLock<Result<String, String>> = std::sync::OnceLock::new();
    URL.get_or_init(|| {
        let url = std::env::var("PROTO_TASKER_TEST_DATABASE_URL")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".to_string());
        if pg_answers(&url) {
            return Ok(url);
        }
        if std::env::var("CI").as_deref() == Ok("true")
            && std::env::var("PROTO_TASKER_TEST_DATABASE_URL").is_ok()
        {
            return Err(format!(
                "PostgreSQL at {url} does not answer (CI: PostgreSQL tests never skip)"
            ));
        }
        throwaway_cluster()
    })
    .clone()
    .unwrap_or_else(|e| panic!("{e}"))
}

fn pg_answers(url: &str) -> bool {
    let url = url.to_string();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .ok()?;
        rt.block_on(async {
            let cfg: tokio_postgres::Config = url.parse().ok()?;
            let fut = cfg.connect(tokio_postgres::NoTls);
            let (client, conn) = tokio::time::timeout(std::time::Duration::from_secs(3), fut)
                .await
                .ok()?
                .ok()?;
            tokio::spawn(conn);
            client.simple_query("SELECT 1").await.ok().map(|_| ())
        })
    })
    .join()
    .ok()
    .flatten()
    .is_some()
}

/// Start (or reuse) the shared throwaway cluster under /tmp. Returns its URL.
fn throwaway_cluster() -> Result<String, String> {
    let root = std::path::PathBuf::from("/tmp/proto_tasker-test-pg");
    if let Ok(port) = std::fs::read_to_string(root.join("port")) {
        let url = format!("postgres://postgres@127.0.0.1:{}/postgres", port.trim());
        if pg_answers(&url) {
            return Ok(url);
        }
    }
    let c = Cluster::create(&root)?;
    std::fs::write(root.join("port"), c.port.to_string()).map_err(|e| e.to_string())?;
    eprintln!(
        "started a throwaway PostgreSQL for the tests at {} (stop: pg_ctl -D {} stop)",
        c.url,
        c.data.display()
    );
    Ok(c.url.clone())
}

/// A PostgreSQL cluster of our own (initdb + pg_ctl), for tests that must
/// restart the database, or when no server answers.
pub struct Cluster {
    pub url: String,
    pub port: u16,
    pub root: std::path::PathBuf,
    pub data: std::path::PathBuf,
    bin: std::path::PathBuf,
    as_root: bool,
}

impl Cluster {
    /// initdb a new cluster in `root` (wiped first) and start it.
    pub fn create(root: &std::path::Path) -> Result<Cluster, String> {
        let install = "PostgreSQL does not answer and no initdb was found: install PostgreSQL (apt-get install postgresql) or set PROTO_TASKER_TEST_DATABASE_URL";
        let bin = std::fs::read_dir("/usr/lib/postgresql")
            .map_err(|_| install.to_string())?
            .filter_map(|e| e.ok())
            .map(|e| e.path().join("bin"))
            .find(|p| p.join("initdb").exists())
            .ok_or_else(|| install.to_string())?;
        let _ = std::fs::remove_dir_all(root);
        std::fs::create_dir_all(root).map_err(|e| format!("{}: {e}", root.display()))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        // initdb refuses to run as root: then the cluster runs as the postgres user.
        let as_root = std::process::Command::new("id")
            .arg("-u")
            .output()
            .map(|o| o.stdout == b"0\n")
            .unwrap_or(false);
        if as_root {
            let _ = std::process::Command::new("chown")
                .args(["postgres", &root.to_string_lossy()])
                .status();
        }
        let c = Cluster {
            url: format!("postgres://postgres@127.0.0.1:{port}/postgres"),
            port,
            root: root.to_path_buf(),
            data: root.join("data"),
            bin,
            as_root,
        };
        c.run(
            "initdb",
            &[
                "-D",
                &c.data.to_string_lossy(),
                "-U",
                "postgres",
                "--auth=trust",
                "-E",
                "UTF8",
            ],
        )?;
        c.start()?;
        Ok(c)
    }

    fn run(&self, prog: &str, args: &[&str]) -> Result<(), String> {
        let mut cmd = if self.as_root {
            let mut c = std::process::Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join(prog));
            c
        } else {
            std::process::Command::new(self.bin.join(prog))
        };
        let out = cmd
            .args(args)
            .output()
            .map_err(|e| format!("{prog}: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            Err(format!(
                "{prog} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    pub fn start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off",
            self.port,
            self.root.display()
        );
        let log = self.root.join("log");
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-o",
                &opts,
                "-l",
                &log.to_string_lossy(),
                "-w",
                "start",
            ],
        )
    }

    pub fn stop(&self) -> Result<(), String> {
        self.run(
            "pg_ctl",
            &[
                "-D",
                &self.data.to_string_lossy(),
                "-m",
                "fast",
                "-w",
                "stop",
            ],
        )
    }
}

/// Drops its schema when the test ends.
pub struct PgSchema {
    pub url: String,
    pub schema: String,
}

impl Drop for PgSchema {
    fn drop(&mut self) {
        let (url, schema) = (self.url.clone(), self.schema.clone());
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .ok()?;
            rt.block_on(async {
                let (client, conn) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn);
                client
                    .batch_execute(&format!("DROP SCHEMA IF EXISTS {schema} CASCADE"))
                    .await
                    .ok()
            })
        })
        .join();
    }
}

/// A fresh schema name for one test.
pub fn fresh_schema() -> String {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("pt_{}_{n}_{nanos}", std::process::id())
}

/// A migrated PostgreSQL store in its own schema.
pub async fn pg_store() -> (Arc<dyn Store>, PgSchema) {
    let (store, guard) = pg_store_typed().await;
    (store, guard)
}

pub async fn pg_store_typed() -> (Arc<proto_tasker::store::PostgresStore>, PgSchema) {
    let url = pg_url();
    let schema = fresh_schema();
    let store = proto_tasker::store::PostgresStore::connect(
        proto_tasker::store::PostgresOptions::new(url.clone()).schema(schema.clone()),
    )
    .await
    .expect("connect postgres");
    store.migrate().await.expect("migrate postgres");
    (Arc::new(store), PgSchema { url, schema })
}

/// A child process that leads its own process group, killed with everything
/// it started when dropped (a browser under its driver, say).
pub struct GroupProcess(pub std::process::Child);

impl GroupProcess {
    pub fn spawn(cmd: &mut std::process::Command) -> GroupProcess {
        use std::os::unix::process::CommandExt;
        GroupProcess(cmd.process_group(0).spawn().expect("spawn"))
    }
}

impl Drop for GroupProcess {
    fn drop(&mut self) {
        let pgid = nix::unistd::Pid::from_raw(self.0.id() as i32);
        let _ = nix::sys::signal::killpg(pgid, nix::sys::signal::Signal::SIGKILL);
        let _ = self.0.wait();
    }
}

/// A node process (the built binary) serving `config` (YAML, written to
/// `dir/node.yaml`; give it `server.listen: 127.0.0.1:0`). `url` is the
/// address the node printed once it listened.
pub struct NodeProcess {
    _proc: GroupProcess,
    pub url: String,
}

impl NodeProcess {
    pub fn start(dir: &std::path::Path, config: &str) -> NodeProcess {
        use std::io::BufRead;
        let cfg = dir.join("node.yaml");
        std::fs::write(&cfg, config).expect("write the node's config");
        let mut proc = GroupProcess::spawn(
            std::process::Command::new(env!("CARGO_BIN_EXE_proto_tasker"))
                .arg(format!("--config={}", cfg.display()))
                .env("PROTO_TASKER_LOG", "info")
                .env_remove("PROTO_TASKER_TOKEN")
                .stderr(std::process::Stdio::piped())
                .stdout(std::process::Stdio::null()),
        );
        let stderr = proc.0.stderr.take().expect("stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                if let Some(i) = line.find("listening on http://") {
                    let url: String = line[i + "listening on ".len()..]
                        .split_whitespace()
                        .next()
                        .unwrap_or("")
                        .to_string();
                    let _ = tx.send(url);
                }
            }
        });
        let url = rx
            .recv_timeout(std::time::Duration::from_secs(20))
            .expect("node printed its address");
        NodeProcess { _proc: proc, url }
    }
}
