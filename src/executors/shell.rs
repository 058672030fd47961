//! The `shell` executor: runs a program without a shell.
//!
//! Args: `{"cmd": ["prog", "arg", ...], "env"?: {"K": "V"}, "cwd"?: "dir", "stdin"?: "text"}`.
//! Exit code 0 is success; the result holds the exit code and the tails of
//! stdout and stderr. When the attempt is cancelled or times out, or the
//! program ends, the program's whole process group is killed.
//!
//! # What a task cannot do
//!
//! - Run a program off the allow-list: each entry of `executors.shell.allow`
//!   is resolved once, when the node starts, to a canonical absolute path (a
//!   bare name through the node's own `PATH`); `cmd[0]` must be an entry as
//!   written or a path to the same file, and the resolved file is what runs,
//!   whatever `PATH` or `cwd` the task sends.
//! - Reach the program through its environment (`PATH`, `LD_PRELOAD`,
//!   `BASH_ENV`, `NODE_OPTIONS`...): the program's environment is cleared
//!   but for a fixed `PATH` and the names in `executors.shell.env_allow`
//!   (taken from the node's environment, or set by the task); a task that
//!   sets any other name is refused at enqueue, naming `args.env.NAME`.
//! - Run anywhere: `cwd` must lie inside a directory of
//!   `executors.shell.cwd_allow` once resolved (no `..` or link escapes).
//! - Hang the node: stdin is fed while the output is read, and output still
//!   held open by a process that left the program's group is not waited for.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use async_trait::async_trait;
use serde::Deserialize;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

use crate::executor::{ArgsError, TaskContext, TaskError, TaskExecutor, TaskOutput};

/// The `PATH` every program gets.
pub const FIXED_PATH: &str = "/usr/local/bin:/usr/bin:/bin";

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

/// A program of the allow-list: as written, and the file it resolved to.
#[derive(Debug, Clone)]
struct Allowed {
    written: String,
    path: PathBuf,
}

/// What the `shell` executor may do (the config's `executors.shell`).
#[derive(Debug, Clone, Default)]
pub struct ShellPolicy {
    /// Programs: bare names (looked up in the node's `PATH`) or paths.
    pub allow: Vec<String>,
    /// Environment names a program gets (from the node, or set by the task).
    pub env_allow: Vec<String>,
    /// Directories a task's `cwd` must lie inside.
    pub cwd_allow: Vec<PathBuf>,
    /// Bytes of each of stdout and stderr kept (the tail).
    pub max_output: usize,
}

/// Where `program` resolves: a path is canonicalised; a bare name is looked
/// up in `PATH` (the node's own).
pub fn resolve_program(program: &str) -> Option<PathBuf> {
    let found = if program.contains('/') {
        Some(PathBuf::from(program))
    } else {
        std::env::var_os("PATH").and_then(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join(program))
                .find(|p| p.is_file())
        })
    };
    found
        .and_then(|p| p.canonicalize().ok())
        .filter(|p| p.is_file())
}

/// See the module docs.
#[derive(Debug, Clone)]
pub struct ShellExecutor {
    allow: Vec<Allowed>,
    env_allow: HashSet<String>,
    cwd_allow: Vec<PathBuf>,
    max_output: usize,
}

impl ShellExecutor {
    /// `allow`: programs that may run; `max_output`: bytes of each of stdout
    /// and stderr kept (the tail). No environment names, no `cwd`.
    pub fn new(
        allow: impl IntoIterator<Item = String>,
        max_output: usize,
    ) -> Result<Self, (String, String)> {
        Self::from_policy(ShellPolicy {
            allow: allow.into_iter().collect(),
            max_output,
            ..ShellPolicy::default()
        })
    }

    /// Resolve `policy` now; `Err((field, message))` names the entry that
    /// resolves to nothing (`executors.shell.allow[i]`, `...cwd_allow[i]`).
    pub fn from_policy(policy: ShellPolicy) -> Result<Self, (String, String)> {
        let mut allow = Vec::new();
        for (i, written) in policy.allow.iter().enumerate() {
            let path = resolve_program(written).ok_or_else(|| {
                (
                    format!("executors.shell.allow[{i}]"),
                    format!("{written:?} is not a program on this machine (looked up in PATH when a bare name)"),
                )
            })?;
            allow.push(Allowed {
                written: written.clone(),
                path,
            });
        }
        let mut cwd_allow = Vec::new();
        for (i, d) in policy.cwd_allow.iter().enumerate() {
            let c = d
                .canonicalize()
                .ok()
                .filter(|c| c.is_dir())
                .ok_or_else(|| {
                    (
                        format!("executors.shell.cwd_allow[{i}]"),
                        format!("{} is not a directory", d.display()),
                    )
                })?;
            cwd_allow.push(c);
        }
        Ok(ShellExecutor {
            allow,
            env_allow: policy.env_allow.into_iter().collect(),
            cwd_allow,
            max_output: policy.max_output.max(1),
        })
    }

    /// The file `cmd[0]` runs, if it is allowed.
    fn program(&self, cmd0: &str) -> Option<&Path> {
        if let Some(a) = self.allow.iter().find(|a| a.written == cmd0) {
            return Some(&a.path);
        }
        if !cmd0.contains('/') {
            return None;
        }
        let c = Path::new(cmd0).canonicalize().ok()?;
        self.allow
            .iter()
            .find(|a| a.path == c)
            .map(|a| a.path.as_path())
    }

    /// The directory `cwd` resolves to, if it lies inside `cwd_allow`.
    fn cwd(&self, cwd: &str) -> Result<PathBuf, ArgsError> {
        let refuse = |why: String| ArgsError::new("args.cwd", why);
        if self.cwd_allow.is_empty() {
            return Err(refuse(
                "this node lets no task choose its directory (executors.shell.cwd_allow is empty)"
                    .into(),
            ));
        }
        let c = Path::new(cwd)
            .canonicalize()
            .map_err(|e| refuse(format!("{cwd:?}: {e}")))?;
        if self.cwd_allow.iter().any(|d| c.starts_with(d)) {
            Ok(c)
        } else {
            Err(refuse(format!(
                "{cwd:?} is not inside executors.shell.cwd_allow"
            )))
        }
    }

    fn parse(&self, args: &serde_json::Value) -> Result<(ShellArgs, PathBuf), ArgsError> {
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
        let Some(path) = self.program(program).map(Path::to_path_buf) else {
            return Err(ArgsError::new(
                "args.cmd",
                format!("program {program:?} is not in executors.shell.allow"),
            ));
        };
        if let Some(name) = a.env.keys().find(|k| !self.env_allow.contains(*k)) {
            return Err(ArgsError::new(
                format!("args.env.{name}"),
                format!("{name} is not in executors.shell.env_allow"),
            ));
        }
        Ok((a, path))
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

/// The prefix of a stdout line that reports progress: `::progress <json>`.
pub const PROGRESS_PREFIX: &str = "::progress ";

/// Longest stdout line looked at for a progress report; longer lines are
/// plain output.
const MAX_LINE: usize = 64 * 1024;

/// Append `bytes` to `kept`, keeping about the last `max` bytes.
fn keep_tail(kept: &mut Vec<u8>, bytes: &[u8], max: usize) {
    kept.extend_from_slice(bytes);
    if kept.len() > 2 * max {
        kept.drain(..kept.len() - max);
    }
}

/// The prefix of a stdout line that extends the attempt's deadline:
/// `::extend <duration>` (e.g. `::extend 5m`), as `ctx.extend` does.
pub const EXTEND_PREFIX: &str = "::extend ";

/// Like [`tail`], for stdout: complete lines `::progress <json>` (valid JSON)
/// are reported as the task's progress, and lines `::extend <duration>` move
/// the attempt's deadline; both are left out of the output.
async fn tail_reporting<R: AsyncRead + Unpin>(
    mut r: R,
    max: usize,
    reporter: crate::pool::progress::ProgressReporter,
    ctx: TaskContext,
) -> Vec<u8> {
    let mut kept = Vec::new();
    let mut line: Vec<u8> = Vec::new();
    let mut buf = [0u8; 8192];
    // A progress line is reported; anything else is output.
    let finish = |kept: &mut Vec<u8>, line: &[u8]| {
        let progress = line
            .strip_prefix(PROGRESS_PREFIX.as_bytes())
            .and_then(|json| serde_json::from_slice::<serde_json::Value>(json.trim_ascii()).ok());
        let extend = line
            .strip_prefix(EXTEND_PREFIX.as_bytes())
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| crate::duration::parse(d.trim()).ok());
        match (progress, extend) {
            (Some(v), _) => {
                // Too large to keep: dropped, as a library executor's would be.
                let _ = reporter.report(v);
            }
            (None, Some(d)) => {
                ctx.extend(d);
            }
            (None, None) => keep_tail(kept, line, max),
        }
    };
    loop {
        match r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                for chunk in buf[..n].split_inclusive(|b| *b == b'\n') {
                    line.extend_from_slice(chunk);
                    if line.ends_with(b"\n") {
                        finish(&mut kept, &line);
                        line.clear();
                    } else if line.len() > MAX_LINE {
                        keep_tail(&mut kept, &line, max);
                        line.clear();
                    }
                }
            }
        }
    }
    if !line.is_empty() {
        finish(&mut kept, &line);
    }
    if kept.len() > max {
        kept.drain(..kept.len() - max);
    }
    kept
}

#[async_trait]
impl TaskExecutor for ShellExecutor {
    fn check_args(&self, args: &serde_json::Value) -> Result<(), ArgsError> {
        let (a, _) = self.parse(args)?;
        if let Some(c) = &a.cwd {
            self.cwd(c)?;
        }
        Ok(())
    }

    async fn execute(&self, ctx: TaskContext) -> Result<TaskOutput, TaskError> {
        let (a, path) = self
            .parse(&ctx.args)
            .map_err(|e| TaskError::Discard(e.to_string()))?;
        let cwd = match &a.cwd {
            Some(c) => Some(self.cwd(c).map_err(|e| TaskError::Discard(e.to_string()))?),
            None => None,
        };
        // The program, and all it starts, dies with this process (see orphans.rs).
        super::orphans::ensure_guardian();
        let mut cmd = tokio::process::Command::new(&path);
        cmd.arg0(&a.cmd[0])
            .args(&a.cmd[1..])
            .env_clear()
            .env("PATH", FIXED_PATH)
            .envs(
                self.env_allow
                    .iter()
                    .filter_map(|k| std::env::var_os(k).map(|v| (k.clone(), v))),
            )
            // The trace this attempt belongs to, for an instrumented
            // program (the OpenTelemetry environment carrier); the task's
            // own `env` may override it.
            .envs(ctx.traceparent.as_ref().map(|tp| ("TRACEPARENT", tp)))
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
        if let Some(dir) = &cwd {
            cmd.current_dir(dir);
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| TaskError::Failed(format!("cannot start {:?}: {e}", a.cmd[0])))?;
        let killer = GroupKiller(child.id().and_then(|p| i32::try_from(p).ok()));
        // Fed while the output is read: a program that fills its output
        // before reading all its input must not deadlock with us.
        if let (Some(text), Some(mut stdin)) = (a.stdin, child.stdin.take()) {
            tokio::spawn(async move {
                // A program that exits without reading its input is not an error.
                let _ = stdin.write_all(text.as_bytes()).await;
            });
        }
        let out = child.stdout.take().map(|o| {
            tokio::spawn(tail_reporting(
                o,
                self.max_output,
                ctx.reporter.clone(),
                ctx.clone(),
            ))
        });
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
