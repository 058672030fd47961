//! The one assembly of a node: store, pool, sentinel and server, from a
//! [`Config`]. `proto_tasker serve`, the tests and the bench all build
//! nodes and stores here, so what runs in production is what is tested.
//!
//! ```no_run
//! # async fn f() -> Result<(), Box<dyn std::error::Error>> {
//! use proto_tasker::{Config, Node};
//! let node = Node::from_config(&Config::default()).await?;
//! node.run(proto_tasker::pool::wait_for_signal()).await?;
//! # Ok(()) }
//! ```

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;

use crate::config::{Config, StoreConfig, StoreKind};
use crate::pool::{Builder, WorkerPool};
use crate::server::AppState;
use crate::store::{PostgresOptions, PostgresStore, SqliteOptions, SqliteStore, Store, StoreError};

/// Why a node could not start: the operator's to fix (`Config`, exit 1) or
/// a store that does not answer (`Unreachable`, exit 2).
#[derive(Debug, Clone, thiserror::Error)]
pub enum NodeError {
    #[error("{0}")]
    Config(String),
    #[error("{0}")]
    Unreachable(String),
}

impl From<StoreError> for NodeError {
    fn from(e: StoreError) -> Self {
        // A bad SQLite file or schema is the operator's to fix.
        NodeError::Config(e.to_string())
    }
}

/// Open the store a config names. A PostgreSQL server that does not answer
/// is [`NodeError::Unreachable`]; the schema need not exist yet.
pub async fn open_store(cfg: &StoreConfig) -> Result<Arc<dyn Store>, NodeError> {
    match cfg.kind {
        StoreKind::Sqlite => {
            let mut o = SqliteOptions::new(cfg.path.clone());
            o.synchronous = cfg.synchronous;
            o.busy_timeout = cfg.busy_timeout;
            Ok(Arc::new(SqliteStore::open(o)?))
        }
        StoreKind::Postgres => {
            let url = cfg.url.clone().unwrap_or_default();
            let mut o = PostgresOptions::new(url).schema(cfg.schema.clone());
            o.pool_size = cfg.pool_size;
            o.pool_mode = cfg.pool_mode;
            o.listen_url = cfg.listen_url.clone();
            let store = PostgresStore::connect(o).await?;
            store
                .ping()
                .await
                .map_err(|e| NodeError::Unreachable(format!("store.url: {e}")))?;
            Ok(Arc::new(store))
        }
    }
}

/// What a log line calls the store.
pub fn store_label(cfg: &StoreConfig) -> String {
    match cfg.kind {
        StoreKind::Sqlite => format!("sqlite {}", cfg.path.display()),
        StoreKind::Postgres => format!("postgres schema {}", cfg.schema),
    }
}

/// A node, built and bound but not yet running.
#[derive(Debug)]
pub struct Node {
    pool: Arc<WorkerPool>,
    server: Option<(TcpListener, AppState)>,
    label: String,
}

impl Node {
    /// Open (and, with `store.migrate`, migrate) the store, build the pool
    /// with the node's executors, and bind the API's address.
    pub async fn from_config(cfg: &Config) -> Result<Node, NodeError> {
        let store = open_store(&cfg.store).await?;
        if cfg.store.migrate {
            store.migrate().await?;
        }
        // The config's settings are starting values: written only for a
        // queue that has none, so a change made at run time is kept. (The
        // pool writes the limits alone for queues without a max_depth.)
        for (queue, q) in &cfg.queues {
            if q.max_depth.is_some() {
                let settings = crate::store::QueueSettings {
                    max_depth: q.max_depth,
                    ..Default::default()
                }
                .with_limits(&q.limits());
                store.queue_settings_put(queue, settings, true).await?;
            }
        }
        let registry = cfg.registry().map_err(NodeError::Config)?;
        #[allow(unused_mut)]
        let mut builder = cfg.apply(Builder::new(store, registry));
        #[cfg(feature = "stats")]
        let metrics = Arc::new(crate::server::metrics::Metrics::new());
        #[cfg(feature = "stats")]
        {
            builder = builder.observer(metrics.clone());
        }
        let pool = Arc::new(
            builder
                .build()
                .map_err(|e| NodeError::Config(e.to_string()))?,
        );
        let mut server = None;
        if cfg.server.enabled {
            let listener = TcpListener::bind(&cfg.server.listen).await.map_err(|e| {
                NodeError::Config(format!(
                    "server.listen: cannot bind {}: {e}",
                    cfg.server.listen
                ))
            })?;
            let addr = listener
                .local_addr()
                .map_err(|e| NodeError::Config(e.to_string()))?;
            if !crate::server::is_loopback(&addr)
                && cfg.server.auth_token.is_none()
                && cfg.server.tokens.is_empty()
            {
                let warning = format!(
                    "WARNING: the API listens on {addr}, reachable from other machines, with no auth token: \
                     anyone who reaches it can enqueue tasks. Set server.auth_token (or PROTO_TASKER_TOKEN)."
                );
                eprintln!("{warning}");
                tracing::warn!("{warning}");
            }
            let tokens = cfg
                .server
                .api_tokens()
                .map_err(|(f, m)| NodeError::Config(format!("{f}: {m}")))?;
            let state = AppState::new(
                pool.clone(),
                cfg.server.limits(),
                cfg.server.auth_token.clone(),
            )
            .with_tokens(tokens);
            let state = state.with_browser_policy(crate::server::guard::BrowserPolicy::new(
                addr,
                &cfg.server.allowed_hosts,
                &cfg.server.cors_origins,
            ));
            #[cfg(feature = "stats")]
            let state = state.with_metrics(metrics);
            server = Some((listener, state));
        }
        Ok(Node {
            pool,
            server,
            label: store_label(&cfg.store),
        })
    }

    /// The node's pool (its client, registry, shared state).
    pub fn pool(&self) -> &Arc<WorkerPool> {
        &self.pool
    }

    /// Where the API listens, when the server is enabled.
    pub fn local_addr(&self) -> Option<SocketAddr> {
        self.server.as_ref().and_then(|(l, _)| l.local_addr().ok())
    }

    /// Start claiming and serving; when `shutdown` resolves, stop the server
    /// and then the pool (running tasks get the pool's shutdown timeout).
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), NodeError> {
        let pool = self.pool;
        tracing::info!(node = pool.node_name(), store = %self.label, "node starting");
        pool.start().await?;
        let stop = tokio_util::sync::CancellationToken::new();
        let server = self.server.map(|(listener, state)| {
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(
                    auth = state.has_token(),
                    "listening on http://{addr} (dashboard at http://{addr}/)"
                );
            }
            let stopped = stop.clone();
            tokio::spawn(crate::server::serve(listener, state, async move {
                stopped.cancelled().await
            }))
        });
        shutdown.await;
        stop.cancel();
        if let Some(s) = server {
            match tokio::time::timeout(Duration::from_secs(10), s).await {
                Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server stopped with an error"),
                Err(_) => tracing::warn!("HTTP server did not stop within 10s"),
                _ => {}
            }
        }
        pool.shutdown().await;
        Ok(())
    }
}
