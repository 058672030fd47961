//! # proto_tasker
//!
//! A durable task scheduler: a library you embed in a Rust service and a
//! standalone node (`proto_tasker --config=config.yaml`). Tasks live in a
//! store, survive restarts and crashes, and are shared by every node that
//! points at the same store. On one machine the store is an embedded SQLite
//! file; nothing to install.
//!
//! ## Concepts
//!
//! - A [`Task`] is one unit of work: a `kind`, JSON `args`, a `queue`, a
//!   `priority` (0 runs first), a `run_at`, and `attempt`/`max_attempts`.
//!   It moves through the [`TaskState`]s drawn in `docs/state_machine.md`.
//! - A [`TaskExecutor`] is the code for one kind; a [`TaskRegistry`] maps kinds
//!   to executors and holds per-kind defaults (queue, attempts, timeout, [`RetryPolicy`]).
//! - A [`WorkerPool`], built with [`Builder`], runs one node: a producer per
//!   queue claims due tasks (never more than its free workers), [`LocalWorker`]
//!   slots run them, a completer writes outcomes in batches, and the
//!   [`Sentinel`] replaces panicked or hung workers, heartbeats, rescues the
//!   tasks of dead nodes and elects the leader that prunes old tasks.
//! - A [`Client`] enqueues (one or many, all or nothing), gets, lists,
//!   cancels, retries and waits for tasks.
//! - A [`Store`] persists it all; [`SqliteStore`] is the embedded default and
//!   [`store::PostgresStore`] lets many nodes share one database.
//! - Tasks may wait for others (`depends_on`), be limited per queue or per
//!   `concurrency_key` across the cluster, or be enqueued by cron schedules.
//!
//! ## Guarantees
//!
//! - An enqueue that returned `Ok` is committed (with `synchronous: full`,
//!   the default, it survives power loss).
//! - At-least-once execution: a task whose node died runs again; its
//!   `attempt` says so.
//! - An attempt's outcome is written only while the task still runs that
//!   attempt, so a node that lost a task cannot overwrite a later run.
//!
//! ## Module map
//!
//! | module | holds |
//! |---|---|
//! | [`task`] | `Task`, `TaskId`, `TaskState`, `TaskOptions`, `NewTask` |
//! | [`executor`] | `TaskExecutor`, `TaskContext`, `TaskError`, [`executor_fn`] |
//! | [`registry`] | `TaskRegistry`, `KindDefaults`, `RetryPolicy` |
//! | [`client`] | `Client`: the front door for enqueueing and for everything the server does |
//! | [`node`] | `Node`: the one assembly of store, pool, sentinel and server from a `Config` |
//! | [`pool`] | `WorkerPool`, `Builder`, `PoolSettings`, `Worker`, `LocalWorker`, `WorkerPoolSharedData`, producer, completer |
//! | [`sentinel`] | `Sentinel`: worker health, heartbeats and the lease (self-fencing), leadership, one process per node name |
//! | [`maintenance`] | leader and cluster services: cron firing, retention, rescue |
//! | [`store`] | the `Store` trait, the life cycle written once ([`store::lifecycle`]), `SqliteStore` (one machine) and `PostgresStore` (a cluster) |
//! | [`cron`] | cron schedules, fired once per tick by the leader |
//! | [`server`] | the HTTP API (browser guard, tokens with roles, audit trail), probes and Prometheus metrics of a node |
//! | [`config`] | `Config` and [`config_load`] for the node |
//! | [`duration`] | `30s`-style durations |
//! | [`telemetry`] | trace context across nodes (W3C `traceparent`), OTLP export |
//! | [`executors`] | the node's built-in `shell`, `http`, `noop`, `sleep` and `fail`; programs die with their node |
//! | [`bench`](mod@bench) | the load tool behind `proto_tasker bench` |
//!
//! ## Example
//!
//! ```
//! use std::{sync::Arc, time::Duration};
//! use proto_tasker::{executor_fn, Builder, SqliteStore, Store, TaskRegistry, TaskState};
//!
//! # #[tokio::main] async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir()?;
//! # let path = dir.path().join("tasks.db");
//! let store = Arc::new(SqliteStore::open_path(path)?);
//! store.migrate().await?;
//!
//! let mut registry = TaskRegistry::new();
//! registry.register("add", executor_fn(|ctx| async move {
//!     let (a, b): (i64, i64) = ctx.args()?;
//!     Ok(serde_json::json!(a + b))
//! }));
//!
//! let pool = Builder::new(store, registry).queue("default", 4).build()?;
//! let client = pool.client();
//! pool.start().await?;
//!
//! let task = client.enqueue("add", (2, 3)).await?;
//! let done = client.wait(task.id, Duration::from_secs(5)).await?;
//! assert_eq!(done.state, TaskState::Completed);
//! assert_eq!(done.result, Some(serde_json::json!(5)));
//!
//! pool.shutdown().await;
//! # Ok(()) }
//! ```

#![warn(missing_debug_implementations)]
#![cfg_attr(not(test), deny(clippy::unwrap_used))]

#[cfg(feature = "cli")]
pub mod bench;
pub mod client;
#[cfg(feature = "server")]
pub mod config;
pub mod cron;
pub mod duration;
pub mod executor;
pub mod executors;
pub mod maintenance;
#[cfg(feature = "server")]
pub mod node;
pub mod pool;
pub mod registry;
pub mod sentinel;
#[cfg(feature = "server")]
pub mod server;
pub mod store;
pub mod task;
pub mod telemetry;
pub mod typed;

/// Implement [`TaskExecutor`] on your own type with it: `#[proto_tasker::async_trait]`
/// on the `impl` block (no need to depend on the `async-trait` crate).
pub use async_trait::async_trait;
pub use client::{Client, ClientError};
#[cfg(feature = "server")]
pub use config::{Config, ConfigError, config_load};
pub use cron::ScheduleSpec;
pub use executor::{
    ArgsError, SharedData, TaskContext, TaskError, TaskExecutor, TaskOutput, executor_fn,
};
pub use maintenance::Retention;
#[cfg(feature = "server")]
pub use node::{Node, NodeError};
pub use pool::PoolSettings;
pub use pool::{Builder, LocalWorker, Worker, WorkerPool, WorkerPoolSharedData};
pub use registry::{KindDefaults, RetryPolicy, TaskRegistry};
pub use sentinel::{Sentinel, SentinelConfig};
pub use store::{Inserted, ListParams, Store, StoreError};
#[cfg(feature = "postgres")]
pub use store::{PoolMode, PostgresOptions, PostgresStore};
#[cfg(feature = "sqlite")]
pub use store::{SqliteOptions, SqliteStore};
pub use task::{
    Dependency, NewTask, OnConflict, OnDependencyFailure, Task, TaskId, TaskOptions, TaskState,
};
pub use typed::TaskArgs;
