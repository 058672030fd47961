//! Which executor runs which kind, and the defaults each kind brings.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use rand::Rng;

use crate::executor::TaskExecutor;

/// When a failed attempt runs again: `base * 2^(attempt-1)`, capped at `max`,
/// then spread by up to `jitter` (a fraction, 0.0..=1.0) either way so that
/// tasks that failed together do not all come back together.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryPolicy {
    pub base: Duration,
    pub max: Duration,
    pub jitter: f64,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
            jitter: 0.1,
        }
    }
}

impl RetryPolicy {
    /// The delay before the run that follows failed attempt number `attempt` (1-based).
    pub fn backoff(&self, attempt: i32) -> Duration {
        let exp = attempt.clamp(1, 63) as u32 - 1;
        let raw = self
            .base
            .checked_mul(2u32.saturating_pow(exp.min(31)))
            .unwrap_or(self.max)
            .min(self.max);
        let jitter = self.jitter.clamp(0.0, 1.0);
        if jitter == 0.0 || raw.is_zero() {
            return raw;
        }
        let factor = rand::rng().random_range((1.0 - jitter)..=(1.0 + jitter));
        raw.mul_f64(factor)
    }
}

/// Per-kind settings applied when a caller leaves them unset.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct KindDefaults {
    pub queue: Option<String>,
    pub max_attempts: Option<i32>,
    pub timeout: Option<Duration>,
    pub retry: Option<RetryPolicy>,
    /// How long an attempt may run in all, however often it calls
    /// [`TaskContext::extend`](crate::TaskContext::extend) (default
    /// [`DEFAULT_MAX_RUN`](crate::executor::DEFAULT_MAX_RUN), 24 h).
    pub max_run: Option<Duration>,
}

impl KindDefaults {
    /// The part of these defaults an enqueuing client applies.
    pub fn declared(&self) -> crate::store::DeclaredKind {
        crate::store::DeclaredKind {
            queue: self.queue.clone(),
            max_attempts: self.max_attempts,
            timeout_ms: self
                .timeout
                .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        }
    }

    /// Defaults a node declared in the store (no retry policy: that is
    /// the running node's business).
    pub fn from_declared(d: &crate::store::DeclaredKind) -> Self {
        KindDefaults {
            queue: d.queue.clone(),
            max_attempts: d.max_attempts,
            timeout: d
                .timeout_ms
                .and_then(|ms| u64::try_from(ms).ok())
                .map(Duration::from_millis),
            retry: None,
            max_run: None,
        }
    }
}

#[derive(Clone)]
struct Entry {
    executor: Arc<dyn TaskExecutor>,
    defaults: KindDefaults,
}

/// Maps a task kind to the executor that runs it and that kind's defaults.
#[derive(Clone, Default)]
pub struct TaskRegistry {
    kinds: HashMap<String, Entry>,
    /// What every executor can read with `ctx.data::<T>()`.
    shared: crate::executor::SharedData,
}

impl std::fmt::Debug for TaskRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut kinds: Vec<_> = self.kinds.keys().collect();
        kinds.sort();
        f.debug_struct("TaskRegistry")
            .field("kinds", &kinds)
            .finish()
    }
}

impl TaskRegistry {
    pub fn new() -> Self {
        Self::default()
    }

    /// Register `executor` for `kind` with built-in defaults. A later
    /// registration of the same kind replaces the earlier one.
    pub fn register(
        &mut self,
        kind: impl Into<String>,
        executor: Arc<dyn TaskExecutor>,
    ) -> &mut Self {
        self.register_with(kind, executor, KindDefaults::default())
    }

    /// Register `executor` for `kind` with its own queue, attempts, timeout and backoff.
    pub fn register_with(
        &mut self,
        kind: impl Into<String>,
        executor: Arc<dyn TaskExecutor>,
        defaults: KindDefaults,
    ) -> &mut Self {
        self.kinds.insert(kind.into(), Entry { executor, defaults });
        self
    }

    pub fn executor(&self, kind: &str) -> Option<&Arc<dyn TaskExecutor>> {
        self.kinds.get(kind).map(|e| &e.executor)
    }

    pub fn defaults(&self, kind: &str) -> Option<&KindDefaults> {
        self.kinds.get(kind).map(|e| &e.defaults)
    }

    /// How long an attempt of `kind` may run in all (see [`KindDefaults::max_run`]).
    pub fn max_run(&self, kind: &str) -> Duration {
        self.defaults(kind)
            .and_then(|d| d.max_run)
            .unwrap_or(crate::executor::DEFAULT_MAX_RUN)
    }

    /// The retry policy of `kind` (the default one for unknown kinds).
    pub fn retry_policy(&self, kind: &str) -> RetryPolicy {
        self.defaults(kind)
            .and_then(|d| d.retry)
            .unwrap_or_default()
    }

    pub fn kinds(&self) -> impl Iterator<Item = &str> {
        self.kinds.keys().map(String::as_str)
    }

    pub fn contains(&self, kind: &str) -> bool {
        self.kinds.contains_key(kind)
    }

    /// Share `value` with every executor (read with
    /// [`TaskContext::data`](crate::TaskContext::data)); one value per type.
    pub fn data<T: Send + Sync + 'static>(&mut self, value: T) -> &mut Self {
        self.shared.insert(value);
        self
    }

    /// The values shared with every executor.
    pub fn shared(&self) -> &crate::executor::SharedData {
        &self.shared
    }

    /// What a node running this registry declares in the store about its
    /// kinds (see [`NodeInfo::kinds`](crate::store::NodeInfo::kinds)).
    pub fn declared(&self) -> std::collections::BTreeMap<String, crate::store::DeclaredKind> {
        self.kinds
            .iter()
            .map(|(k, e)| (k.clone(), e.defaults.declared()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_and_caps() {
        let p = RetryPolicy {
            base: Duration::from_millis(100),
            max: Duration::from_secs(1),
            jitter: 0.0,
        };
        assert_eq!(p.backoff(1), Duration::from_millis(100));
        assert_eq!(p.backoff(2), Duration::from_millis(200));
        assert_eq!(p.backoff(4), Duration::from_millis(800));
        assert_eq!(p.backoff(5), Duration::from_secs(1));
        assert_eq!(p.backoff(1000), Duration::from_secs(1));
    }

    #[test]
    fn jitter_stays_within_bounds() {
        let p = RetryPolicy {
            base: Duration::from_secs(10),
            max: Duration::from_secs(100),
            jitter: 0.2,
        };
        let mut seen = std::collections::HashSet::new();
        for _ in 0..200 {
            let d = p.backoff(1);
            assert!(
                d >= Duration::from_secs(8) && d <= Duration::from_secs(12),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 1, "jitter never moved the delay");
    }
}
