pub mod bench;
pub mod client;
pub mod config;
pub mod executor;
pub mod executors;
pub mod pool;
pub mod registry;
pub mod sentinel;
pub mod store;
pub mod task;

pub use client::{Client, ClientError};
pub use executor::{TaskContext, TaskError, TaskExecutor, TaskOutput, executor_fn};
pub use pool::{Builder, LocalWorker, Worker, WorkerPool, WorkerPoolSharedData};
pub use registry::{KindDefaults, RetryPolicy, TaskRegistry};
pub use sentinel::{Retention, Sentinel, SentinelConfig};
pub use store::{SqliteStore, Store, StoreError};
pub use task::{NewTask, Task, TaskId, TaskOptions, TaskState};
pub use config::{Config, ConfigError, config_load};
