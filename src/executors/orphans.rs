//! Programs die with their node. A `shell` task's program runs in a process
//! group of its own (so a timeout or cancel kills the whole group), which is
//! also why nothing would reap it if the node died: it would run on, beside
//! the re-run of its task.
//!
//! # Mechanism
//!
//! - Every program this process starts carries `PROTO_TASKER_PROCESS=<mark>`
//!   in its environment, and so does everything it starts in turn (a
//!   background grandchild, a daemon that double-forks or leaves its group),
//!   unless it scrubs its environment.
//! - A guardian (`sh`, started with the first program, in a group of its own
//!   so a signal to the node's group does not reach it) holds the read end
//!   of a pipe whose write end only this process holds. When this process
//!   dies, for any reason, the kernel closes the pipe; the guardian reads
//!   end-of-file and kills every process carrying the mark, at once.
//! - A node that starts under the name of a process of this machine that is
//!   gone kills whatever still carries that process's mark *before* it
//!   rescues the tasks of its previous life ([`kill_marked`]).
//!
//! In-process executors (`http`) stop with the process by nature. What no
//! node can prevent: a whole machine frozen and resumed runs its programs
//! on for the moment it takes the node to see its lease is gone (see the
//! guarantees in the README).

use std::io::Write;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

/// This process's mark: `host/pid/random`, the prefix of its pools' instance ids.
pub fn process_mark() -> &'static str {
    static MARK: OnceLock<String> = OnceLock::new();
    MARK.get_or_init(|| {
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| "node".to_string());
        format!(
            "{host}/{}/{:016x}",
            std::process::id(),
            rand::random::<u64>()
        )
    })
}

/// The environment variable that carries the mark.
pub const MARK_VAR: &str = "PROTO_TASKER_PROCESS";

/// The guardian's script: wait for end-of-file on stdin (this process
/// died, or shut down), then kill every process that carries the mark.
/// First one `grep` over every environment at once (a few milliseconds),
/// then a sweep process by process for anything the first pass missed (a
/// child forked meanwhile, or a `grep` without `-z`). The sweep alone
/// starts two processes per process on the machine: with 300 others it
/// took about a second, and an orphaned program wrote on meanwhile.
const GUARDIAN: &str = r#"while read -r _; do :; done
for e in $(grep -lzxF "$1=$2" /proc/[0-9]*/environ 2>/dev/null); do
  p=${e%/environ}; p=${p#/proc/}; kill -KILL "$p" 2>/dev/null
done
for e in /proc/[0-9]*/environ; do
  p=${e%/environ}; p=${p#/proc/}
  if tr '\0' '\n' < "$e" 2>/dev/null | grep -qxF "$1=$2"; then kill -KILL "$p" 2>/dev/null; fi
done"#;

/// The guardian and the write end of its pipe, kept for the life of the
/// process (a std mutex: taken once, to start it).
static GUARDIAN_CHILD: Mutex<Option<Child>> = Mutex::new(None);

/// Start the guardian if it is not running yet. Programs started before it
/// is up are covered too: it kills by mark, whenever they started.
pub fn ensure_guardian() {
    let Ok(mut g) = GUARDIAN_CHILD.lock() else {
        return;
    };
    if g.as_mut().is_some_and(|c| matches!(c.try_wait(), Ok(None))) {
        return;
    }
    use std::os::unix::process::CommandExt;
    let spawned = Command::new("sh")
        .args(["-c", GUARDIAN, "guardian", MARK_VAR, process_mark()])
        .env_remove(MARK_VAR)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn();
    match spawned {
        Ok(mut c) => {
            // A line now and then is not needed: EOF is the only signal.
            if let Some(stdin) = c.stdin.as_mut() {
                let _ = stdin.flush();
            }
            *g = Some(c);
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot start the guardian that stops programs when the node dies")
        }
    }
}

/// Kill every process that carries `mark` (the leftovers of a process of
/// this machine that is gone) and wait, up to two seconds, until they are
/// gone. Returns how many were killed.
pub fn kill_marked(mark: &str) -> usize {
    let pids = signal_marked(mark);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(2);
    while pids.iter().any(|p| running(*p)) && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    pids.len()
}

/// Whether `pid` runs (a zombie has stopped running).
fn running(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| {
            s.rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next())
                .is_some_and(|state| state != "Z")
        })
        .unwrap_or(false)
}

fn signal_marked(mark: &str) -> Vec<i32> {
    let want = format!("{MARK_VAR}={mark}");
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut killed = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(env) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if env.split(|b| *b == 0).any(|v| v == want.as_bytes()) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
            killed.push(pid);
        }
    }
    killed
}
