//! The real binary as a child process: crash recovery after SIGKILL, clean
//! shutdown on SIGTERM, and bad input that must exit 1 with a clear message.

mod fixtures;

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto_tasker::store::{ListParams, SqliteOptions};
use proto_tasker::{Client, NewTask, SqliteStore, Store, TaskRegistry, TaskState};

const BIN: &str = env!("CARGO_BIN_EXE_proto_tasker");

fn write(path: &Path, text: &str) {
    std::fs::write(path, text).expect("write file");
}

fn run(args: &[&str], cwd: &Path) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(cwd)
        .env_remove("PROTO_TASKER_STORE_PATH")
        .env_remove("PROTO_TASKER_STORE_URL")
        .output()
        .expect("run proto_tasker")
}

fn spawn_node(config: &Path, cwd: &Path) -> Child {
    Command::new(BIN)
        .arg(format!("--config={}", config.display()))
        .current_dir(cwd)
        .env("PROTO_TASKER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn node")
}

fn sigterm(child: &Child) {
    let ok = Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .expect("kill -TERM")
        .success();
    assert!(ok);
}

fn wait_exit(child: &mut Child, timeout: Duration) -> std::process::ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(st) = child.try_wait().expect("try_wait") {
            return st;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("node did not exit within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

async fn count(store: &Arc<dyn Store>, state: TaskState) -> i64 {
    store
        .queue_counts()
        .await
        .unwrap()
        .iter()
        .filter(|c| c.1 == state)
        .map(|c| c.2)
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_killed_mid_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("crash.db");
    let cfg = dir.path().join("node.yaml");
    write(
        &cfg,
        &format!(
            "store:\n  path: {}\nserver:\n  listen: 127.0.0.1:0\nqueues:\n  default:\n    workers: 8\npool:\n  poll_interval: 50ms\n\
             sentinel:\n  heartbeat_interval: 200ms\n  node_timeout: 1s\n",
            db.display()
        ),
    );
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteOptions::new(&db)).unwrap());
    store.migrate().await.unwrap();
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    let tasks = (0..1000)
        .map(|_| NewTask::new("sleep", serde_json::json!({"ms": 15})))
        .collect();
    client.insert_many(tasks).await.unwrap();

    let mut first = spawn_node(&cfg, dir.path());
    let deadline = Instant::now() + Duration::from_secs(60);
    while count(&store, TaskState::Completed).await < 200 {
        assert!(Instant::now() < deadline, "first node made no progress");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    first.kill().unwrap(); // SIGKILL
    first.wait().unwrap();
    let orphans: Vec<_> = store
        .task_list(ListParams {
            state: Some(TaskState::Running),
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert!(
        !orphans.is_empty(),
        "the kill landed while tasks were running"
    );
    // Not `<= 8`: a task stays `running` in the store until the completer has
    // written its outcome, and a worker takes its next task as soon as the
    // outcome is queued, so the kill can also catch outcomes still queued.
    // Every one of them must run again, which the checks below assert.

    let mut second = spawn_node(&cfg, dir.path());
    let deadline = Instant::now() + Duration::from_secs(90);
    while count(&store, TaskState::Completed).await < 1000 {
        assert!(
            Instant::now() < deadline,
            "second node did not finish every task"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    sigterm(&second);
    assert!(
        wait_exit(&mut second, Duration::from_secs(20)).success(),
        "clean exit on SIGTERM"
    );

    let all = fixtures::all_tasks(&store).await;
    assert_eq!(all.len(), 1000, "no task lost");
    for t in &all {
        assert_eq!(t.state, TaskState::Completed);
        if orphans.contains(&t.id) {
            assert_eq!(
                t.attempt, 2,
                "task {} was running at the kill: run again",
                t.id
            );
            assert!(
                t.errors[0].message.contains("stopped while running"),
                "{:?}",
                t.errors
            );
        } else {
            assert_eq!(t.attempt, 1, "task {} ran once", t.id);
        }
    }
    // The cleanly stopped node deregistered; only the killed one's row is left.
    let nodes = store.node_list(chrono::Utc::now()).await.unwrap();
    assert_eq!(nodes.len(), 1);
    assert!(
        nodes[0].name.ends_with(&format!("-{}", first.id())),
        "{nodes:?}"
    );
}

#[test]
fn no_arguments_runs_a_node_on_the_default_store_and_stops_on_sigterm() {
    let dir = tempfile::tempdir().unwrap();
    let mut node = Command::new(BIN)
        .current_dir(dir.path())
        .env_remove("PROTO_TASKER_STORE_PATH")
        .env_remove("PROTO_TASKER_CONFIG")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let db = dir.path().join("proto_tasker.db");
    let deadline = Instant::now() + Duration::from_secs(20);
    while !db.exists() {
        assert!(Instant::now() < deadline, "no ./proto_tasker.db created");
        std::thread::sleep(Duration::from_millis(20));
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(node.try_wait().unwrap().is_none(), "node keeps running");
    sigterm(&node);
    assert!(wait_exit(&mut node, Duration::from_secs(20)).success());
}

#[test]
fn migrate_honours_the_store_path_env_override() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .arg("migrate")
        .current_dir(dir.path())
        .env("PROTO_TASKER_STORE_PATH", "from_env.db")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dir.path().join("from_env.db").exists());
    assert!(!dir.path().join("proto_tasker.db").exists());
}

fn assert_user_error(out: &Output, needles: &[&str]) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code 1; stderr: {stderr}");
    for n in needles {
        assert!(stderr.contains(n), "stderr should mention {n:?}: {stderr}");
    }
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn config_check_names_file_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(&d.join("type.yaml"), "pool:\n  claim_max: many\n");
    write(
        &d.join("unknown.yaml"),
        "queues:\n  default:\n    workers: 2\nsentinal:\n  node_timeout: 5s\n",
    );
    write(
        &d.join("negative.yaml"),
        "queues:\n  default:\n    workers: -3\n",
    );
    write(
        &d.join("zero.json"),
        "{\n  \"queues\": {\"default\": {\"workers\": 0}}\n}\n",
    );
    write(
        &d.join("good.yaml"),
        "queues:\n  default:\n    workers: 3\n",
    );
    assert_user_error(
        &run(&["config", "check", "type.yaml"], d),
        &["type.yaml:2", "pool.claim_max"],
    );
    assert_user_error(
        &run(&["config", "check", "unknown.yaml"], d),
        &["unknown.yaml:4", "sentinal"],
    );
    assert_user_error(
        &run(&["config", "check", "negative.yaml"], d),
        &["negative.yaml:3", "queues.default.workers", "-3"],
    );
    assert_user_error(
        &run(&["config", "check", "zero.json"], d),
        &["zero.json:2", "queues.default.workers"],
    );
    assert_user_error(
        &run(&["config", "check", "missing.yaml"], d),
        &["missing.yaml", "cannot read"],
    );
    let ok = run(&["config", "check", "good.yaml"], d);
    assert!(ok.status.success());
    // serve refuses a bad config the same way.
    assert_user_error(&run(&["--config=negative.yaml"], d), &["negative.yaml:3"]);
}

#[test]
fn a_corrupt_or_unreadable_database_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(
        &d.join("garbage.db"),
        &"this is not a database ".repeat(400),
    );
    write(&d.join("garbage.yaml"), "store:\n  path: garbage.db\n");
    assert_user_error(
        &run(&["--config=garbage.yaml"], d),
        &["garbage.db", "not a database"],
    );
    write(
        &d.join("nowhere.yaml"),
        "store:\n  path: no/such/dir/x.db\n",
    );
    assert_user_error(
        &run(&["--config=nowhere.yaml"], d),
        &["no/such/dir/x.db", "unable to open"],
    );
    // A SQLite file that belongs to something else is not touched.
    let other = foreign_db(&d.join("foreign.db"));
    write(
        &d.join("foreign.yaml"),
        &format!("store:\n  path: {}\n", other.display()),
    );
    assert_user_error(
        &run(&["--config=foreign.yaml"], d),
        &["foreign.db", "no proto_tasker schema"],
    );
}

/// A SQLite file that holds someone else's table.
fn foreign_db(path: &Path) -> std::path::PathBuf {
    let conn = rusqlite::Connection::open(path).unwrap();
    conn.execute_batch("CREATE TABLE customers (id INTEGER PRIMARY KEY);")
        .unwrap();
    path.to_path_buf()
}

/// Two processes started with one `node.name` (one config on two replicas,
/// or a restart while the old process still drains) would rescue each
/// other's tasks: the second is refused while the first heartbeats. A
/// restart after the first crashed takes the name at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_live_processes_cannot_share_a_node_name_but_a_crash_restart_can() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("names.db");
    let cfg = dir.path().join("node.yaml");
    write(
        &cfg,
        &format!(
            "node:\n  name: fixed\nstore:\n  path: {}\nserver:\n  listen: 127.0.0.1:0\n\
             sentinel:\n  heartbeat_interval: 200ms\n  node_timeout: 5s\n",
            db.display()
        ),
    );
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(SqliteOptions::new(&db)).unwrap());
    store.migrate().await.unwrap();
    let holder = || async {
        store
            .node_list(chrono::Utc::now())
            .await
            .unwrap()
            .into_iter()
            .find(|n| n.name == "fixed")
            .map(|n| n.instance)
    };
    let mut first = spawn_node(&cfg, dir.path());
    let deadline = Instant::now() + Duration::from_secs(20);
    let first_instance = loop {
        if let Some(i) = holder().await {
            break i;
        }
        assert!(Instant::now() < deadline, "the first node never registered");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    // A second live process under the same name is refused, exit 1.
    let second = Command::new(BIN)
        .arg(format!("--config={}", cfg.display()))
        .current_dir(dir.path())
        .output()
        .expect("run a second node");
    let err = String::from_utf8_lossy(&second.stderr);
    assert_eq!(second.status.code(), Some(1), "{err}");
    assert!(err.contains("node.name") && err.contains("in use"), "{err}");
    assert!(
        first.try_wait().unwrap().is_none(),
        "the first node still runs"
    );
    assert_eq!(holder().await.as_deref(), Some(first_instance.as_str()));
    // After a crash, a restart under the name starts at once, well inside
    // node_timeout (the crashed process is known to be gone).
    first.kill().unwrap();
    first.wait().unwrap();
    let restarted = Instant::now();
    let mut again = spawn_node(&cfg, dir.path());
    loop {
        if holder().await.is_some_and(|i| i != first_instance) {
            break;
        }
        assert!(
            again.try_wait().unwrap().is_none(),
            "the restarted node exited"
        );
        assert!(
            restarted.elapsed() < Duration::from_secs(4),
            "the restart waited for the dead process's heartbeat to age"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    sigterm(&again);
    assert!(wait_exit(&mut again, Duration::from_secs(20)).success());
}
