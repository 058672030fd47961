//! Built-in executors of the server.
//!
//! - [`shell`]: run an allow-listed program (off unless configured).
//! - [`http`]: call an allow-listed host (off unless configured).
//! - `noop`: succeeds at once with `null` (benchmarks, smoke tests).
//! - `sleep`: `{"ms": N}` sleeps N milliseconds, returning early with an
//!   error when cancelled.
//! - `fail`: `{"message": "..."}` fails every attempt with that message.

#[cfg(feature = "server")]
pub mod http;
pub mod orphans;
#[cfg(feature = "server")]
pub mod shell;

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::executor::{TaskError, executor_fn};
use crate::registry::TaskRegistry;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SleepArgs {
    ms: u64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct FailArgs {
    #[serde(default)]
    message: Option<String>,
}

/// Longest `sleep` accepted: one day.
const MAX_SLEEP_MS: u64 = 86_400_000;

/// Register `noop`, `sleep` and `fail` in `registry`.
pub fn register_builtin(registry: &mut TaskRegistry) {
    registry.register(
        "noop",
        executor_fn(|_ctx| async { Ok(serde_json::Value::Null) }),
    );
    registry.register(
        "sleep",
        executor_fn(|ctx| async move {
            let args: SleepArgs = ctx.args()?;
            if args.ms > MAX_SLEEP_MS {
                return Err(TaskError::discard(format!(
                    "args.ms: {} is more than {MAX_SLEEP_MS}",
                    args.ms
                )));
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(args.ms)) => Ok(serde_json::json!({"slept_ms": args.ms})),
                _ = ctx.cancel.cancelled() => Err(TaskError::failed("sleep interrupted")),
            }
        }),
    );
    registry.register(
        "fail",
        executor_fn(|ctx| async move {
            let args: FailArgs = ctx.args()?;
            Err(TaskError::Failed(
                args.message.unwrap_or_else(|| "failed on purpose".into()),
            ))
        }),
    );
}

/// A registry holding only the built-in executors.
pub fn builtin_registry() -> Arc<TaskRegistry> {
    let mut r = TaskRegistry::new();
    register_builtin(&mut r);
    Arc::new(r)
}
