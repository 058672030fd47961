//! A crashed node takes its programs with it: a `shell` task's program and
//! a background grandchild it started stop when their node is SIGKILLed,
//! so the task's re-run never runs beside them. Once with a restart under
//! the same name, once with another node rescuing after `node_timeout`.

mod fixtures;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use proto_tasker::store::{SqliteOptions, Synchronous};
use proto_tasker::{Client, NewTask, SqliteStore, Store, TaskRegistry, TaskState};

const BIN: &str = env!("CARGO_BIN_EXE_proto_tasker");

fn uptime_ms() -> i64 {
    let s = std::fs::read_to_string("/proc/uptime").unwrap();
    let up: f64 = s.split_whitespace().next().unwrap().parse().unwrap();
    (up * 1000.0) as i64
}

fn spawn(config: &Path) -> Child {
    use std::os::unix::process::CommandExt;
    Command::new(BIN)
        .arg(format!("--config={}", config.display()))
        .env("PROTO_TASKER_LOG", "warn")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .unwrap()
}

/// A script that writes `main PID UPTIME` every 200 ms for 8 s, after
/// starting a grandchild that writes `bg PID UPTIME` every 200 ms forever.
fn task(out: &Path) -> NewTask {
    let script = "sh -c 'while :; do read up i < /proc/uptime; echo \"bg $$ $up\" >> \"$1\"; sleep 0.2; done' bg \"$1\" &
i=0; while [ $i -lt 40 ]; do read up x < /proc/uptime; echo \"main $$ $up\" >> \"$1\"; i=$((i+1)); sleep 0.2; done";
    NewTask::new(
        "shell",
        serde_json::json!({"cmd": ["sh", "-c", script, "task", out.display().to_string()]}),
    )
}

/// Lines of `out` as (kind, pid, uptime ms).
fn lines(out: &Path) -> Vec<(String, u32, i64)> {
    std::fs::read_to_string(out)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let [kind, pid, up] = f[..] else { return None };
            Some((
                kind.to_string(),
                pid.parse().ok()?,
                (up.parse::<f64>().ok()? * 1000.0) as i64,
            ))
        })
        .collect()
}

fn alive(pid: u32) -> bool {
    // A zombie is dead: its state is Z.
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s.split_whitespace().nth(2).is_none_or(|st| st != "Z"))
        .unwrap_or(false)
}

/// Idle processes, killed when dropped.
struct Crowd(Vec<Child>);

impl Crowd {
    fn of(n: usize) -> Self {
        Crowd(
            (0..n)
                .map(|_| {
                    Command::new("sleep")
                        .arg("120")
                        .stdin(Stdio::null())
                        .spawn()
                        .unwrap()
                })
                .collect(),
        )
    }
}

impl Drop for Crowd {
    fn drop(&mut self) {
        for c in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

async fn crash_and_check(name_line: &str, second_node: bool) {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("orphans.db");
    let out = dir.path().join("out.log");
    let cfg = |n: &str| {
        let p = dir.path().join(format!("{n}.yaml"));
        std::fs::write(
            &p,
            format!(
                "{name_line}store:\n  path: {}\nserver:\n  enabled: false\n\
                 pool:\n  poll_interval: 100ms\nsentinel:\n  heartbeat_interval: 200ms\n  node_timeout: 2s\n\
                 executors:\n  shell:\n    allow: [\"sh\"]\n",
                db.display()
            ),
        )
        .unwrap();
        p
    };
    let mut o = SqliteOptions::new(&db);
    o.synchronous = Synchronous::Normal;
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(o).unwrap());
    store.migrate().await.unwrap();
    let client = Client::new(store.clone(), Arc::new(TaskRegistry::new()));
    // A busy machine: a few hundred other processes for the guardian to
    // look through, started before the node so most come first in /proc
    // (on a CI runner with PostgreSQL's backends and the other tests, the
    // guardian's scan took long enough for an orphaned program to write
    // after its node died).
    let _crowd = Crowd::of(300);
    let first_cfg = cfg("first");
    // Killed with their groups when dropped, even if an assertion fails.
    let mut first = fixtures::GroupProcess(spawn(&first_cfg));
    let id = client.insert(task(&out)).await.unwrap().task.id;
    let deadline = Instant::now() + Duration::from_secs(20);
    while lines(&out).iter().filter(|l| l.0 == "main").count() < 8 {
        assert!(Instant::now() < deadline, "the task never ran");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let second = second_node.then(|| fixtures::GroupProcess(spawn(&cfg("second"))));
    if second.is_some() {
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let before = lines(&out);
    let main_pid = before.iter().find(|l| l.0 == "main").unwrap().1;
    let bg_pid = before.iter().find(|l| l.0 == "bg").unwrap().1;
    first.0.kill().unwrap(); // SIGKILL of the node alone: a crash
    let killed_at = uptime_ms();
    first.0.wait().unwrap();
    let restarted = (!second_node).then(|| fixtures::GroupProcess(spawn(&first_cfg)));
    // The task runs again (at once after the restart, after node_timeout
    // on the other node) and completes.
    let t = client.wait(id, Duration::from_secs(30)).await.unwrap();
    assert_eq!(t.state, TaskState::Completed, "{t:?}");
    assert_eq!(t.attempt, 2, "{t:?}");
    let after = lines(&out);
    let late: Vec<_> = after
        .iter()
        .filter(|l| (l.1 == main_pid || l.1 == bg_pid) && l.2 > killed_at + 100)
        .collect();
    assert!(
        late.is_empty(),
        "the first run wrote after the crash: {late:?}"
    );
    assert!(
        !alive(main_pid),
        "the first run's program outlived its node"
    );
    assert!(
        !alive(bg_pid),
        "the first run's grandchild outlived its node"
    );
    let rerun: Vec<_> = after
        .iter()
        .filter(|l| l.0 == "main" && l.1 != main_pid)
        .collect();
    assert!(!rerun.is_empty(), "the re-run ran");
    drop((second, restarted));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_restarted_under_its_name_leaves_no_programs_running() {
    crash_and_check("node:\n  name: fixed\n", false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_node_rescued_by_another_leaves_no_programs_running() {
    crash_and_check("", true).await;
}
