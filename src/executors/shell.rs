//! The `shell` executor: runs a program without a shell.
//!
//! Args: `{"cmd": ["prog", "arg", ...], "env"?: {"K": "V"}, "cwd"?: "dir", "stdin"?: "text"}`.
//! The program (`cmd[0]`, exactly as written) must be listed in
//! `executors.shell.allow`; with an empty list the executor refuses every
//! task. Exit code 0 is success; the result holds the exit code and the tails
//! of stdout and stderr. When the attempt is cancelled or times out, the
//! program's whole process group is killed.

use std::collections::{BTreeMap, HashSet};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::executor::{ArgsError, TaskContext, TaskError, TaskExecutor, TaskOutput};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ShellArgs {
    cmd: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    cwd: Option<String>,
    #[serde(default)]
    stdin: Option<String>,
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    allow: HashSet<String>,
    max_output: usize,
}

impl ShellExecutor {
    /// `allow`: programs that may run; `max_output`: bytes of each of stdout
    /// and stderr kept (the tail).
    pub fn new(allow: impl IntoIterator<Item = String>, max_output: usize) -> Self {
        ShellExecutor {
            allow: allow.into_iter().collect(),
            max_output: max_output.max(1),
        }
    }

    fn parse(&self, args: &serde_json::Value) -> Result<ShellArgs, ArgsError> {
        let a: ShellArgs = serde_json::from_value(args.clone())
            .map_err(|e| ArgsError::new("args", format!("not shell args: {e}")))?;
        let Some(program) = a.cmd.first() else {
            return Err(ArgsError::new("args.cmd", "must name a program"));
        };
        if self.allow.is_empty() {
            return Err(ArgsError::new(
                "args.cmd",
                "the shell executor is off: list the programs it may run in executors.shell.allow",
            ));
        }
        if !self.allow.contains(program) {
            return Err(ArgsError::new(
                "args.cmd",
                format!("program {program:?} is not in executors.shell.allow"),
            ));
        }
        Ok(a)
    }
}

/// Kills the child's process group when dropped (cancel, timeout, shutdown).
struct GroupKiller(Option<i32>);

impl Drop for GroupKiller {
    fn drop(&mut self) {
        if let Some(pgid) = self.0.take() {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pgid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
    }
}

/// Read everything, keep the last `max` bytes.
async fn tail<R: AsyncRead + Unpin>(mut r: R, max: usize) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut buf = [0u8; 8192];
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                kept.extend_from_slice(&buf[..n]);
                if kept.len() > 2 * max {
                    kept.drain(..kept.len() - max);
                }
            }
        }
    }
    if kept.len() > max {
        kept.drain(..kept.len() - max);
    }
    kept
}

#[async_trait]
impl TaskExecutor for ShellExecutor {
    fn check_args(&self, args: &serde_json::Value) -> Result<(), ArgsError> {
        self.parse(args).map(|_| ())
    }

    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        let a = self
            .parse(&ctx.args)
            .map_err(|e| TaskError::Discard(e.to_string()))?;
        // The program, and all it starts, dies with this process (see orphans.rs).
        super::orphans::ensure_guardian();
        let mut cmd = tokio::process::Command::new(&a.cmd[0]);
        cmd.args(&a.cmd[1..])
            .envs(&a.env)
            .env(super::orphans::MARK_VAR, super::orphans::process_mark())
            .stdin(if a.stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .process_group(0)
            .kill_on_drop(true);
        if let Some(dir) = &a.cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| TaskError::Failed(format!("cannot start {:?}: {e}", a.cmd[0])))?;
        let killer = GroupKiller(child.id().and_then(|p| i32::try_from(p).ok()));
        if let (Some(text), Some(mut stdin)) = (a.stdin, child.stdin.take()) {
            // A program that exits without reading its input is not an error.
            let _ = stdin.write_all(text.as_bytes()).await;
        }
        let out = child
            .stdout
            .take()
            .map(|o| tokio::spawn(tail(o, self.max_output)));
        let err = child
            .stderr
            .take()
            .map(|e| tokio::spawn(tail(e, self.max_output)));
        let status = tokio::select! {
            s = child.wait() => s.map_err(|e| TaskError::Failed(format!("waiting for {:?}: {e}", a.cmd[0])))?,
            _ = ctx.cancel.cancelled() => {
                drop(killer);
                return Err(TaskError::Failed(format!("{:?} killed: the task was stopped", a.cmd[0])));
            }
        };
        // The program ended: so does the task, and with it whatever the
        // program left running in its group (a background child would
        // otherwise outlive the task and hold its output open).
        drop(killer);
        let text = |v: Vec<u8>| String::from_utf8_lossy(&v).into_owned();
        // Output still in flight after the group is gone is read; a reader
        // held open by a process that left the group is not waited for.
        let collect = |h: Option<tokio::task::JoinHandle<Vec<u8>>>| async move {
            match h {
                Some(h) => match tokio::time::timeout(Duration::from_secs(1), h).await {
                    Ok(Ok(v)) => text(v),
                    _ => String::new(),
                },
                None => String::new(),
            }
        };
        let stdout = collect(out).await;
        let stderr = collect(err).await;
        match status.code() {
            Some(0) => Ok(serde_json::json!({"exit_code": 0, "stdout": stdout, "stderr": stderr})),
            Some(code) => Err(TaskError::Failed(format!(
                "{:?} exited with code {code}; stderr: {}",
                a.cmd[0],
                stderr.trim_end()
            ))),
            None => Err(TaskError::Failed(format!(
                "{:?} was killed by a signal; stderr: {}",
                a.cmd[0],
                stderr.trim_end()
            ))),
        }
    }
}
