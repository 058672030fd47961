//! How statements reach the server.
//!
//! On a direct connection (`pool_mode: session`, the default) each statement
//! is prepared once per connection, kept in deadpool's cache, and reused:
//! one round trip per call.
//!
//! Behind a transaction-mode pooler (PgBouncer `pool_mode = transaction`) a
//! server connection is ours only until the current transaction ends; the
//! next statement may land on another one. So nothing named may outlive a
//! transaction: statements go unnamed, with their parameter types given
//! (`query_typed`: parse, bind and execute in one round trip, so still one
//! round trip per call). The types are learned once per process by
//! preparing the statement inside a transaction and closing it before the
//! transaction ends, which keeps PgBouncer 1.18 (no prepared-statement
//! support) and later versions alike.
//!
//! Invariant: in `transaction` mode no call here leaves a named statement,
//! a `SET` or a session lock on a server connection.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use deadpool_postgres::StatementCache;
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, Row, Statement};

use super::db_err;
use crate::store::StoreError;

/// Parameters of one call.
pub(super) type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// Most distinct statements whose types are remembered (the store has a
/// few dozen; list pages vary by filter). Past it the memory starts over.
const MAX_REMEMBERED: usize = 1024;

/// A pooled connection, or a transaction open on one, as statements see it.
#[derive(Clone, Copy)]
pub(super) struct On<'a> {
    client: &'a Client,
    cache: &'a StatementCache,
    in_transaction: bool,
}

impl<'a> From<&'a deadpool_postgres::Object> for On<'a> {
    fn from(o: &'a deadpool_postgres::Object) -> Self {
        On {
            client: o,
            cache: &o.statement_cache,
            in_transaction: false,
        }
    }
}

/// The listening connection, lent to heartbeats (see `notify::BeatConn`).
impl<'a> From<&'a deadpool_postgres::ClientWrapper> for On<'a> {
    fn from(c: &'a deadpool_postgres::ClientWrapper) -> Self {
        On {
            client: c,
            cache: &c.statement_cache,
            in_transaction: false,
        }
    }
}

impl<'a, 'b> From<&'a deadpool_postgres::Transaction<'b>> for On<'a> {
    fn from(t: &'a deadpool_postgres::Transaction<'b>) -> Self {
        On {
            client: t.client(),
            cache: &t.statement_cache,
            in_transaction: true,
        }
    }
}

/// How this store sends statements (see the module docs).
pub(super) struct Statements {
    unnamed: bool,
    /// Parameter types per statement, learned once (unnamed mode only).
    /// A std lock: held only to read or insert, never across an await.
    types: RwLock<HashMap<String, Arc<[Type]>>>,
}

/// A statement ready to run on the connection it was readied for.
pub(super) enum Ready<'s> {
    Named(Statement),
    Unnamed(&'s str, Arc<[Type]>),
}

impl Statements {
    pub(super) fn new(unnamed: bool) -> Self {
        Statements {
            unnamed,
            types: RwLock::new(HashMap::new()),
        }
    }

    /// Ready `sql` to run on `on`.
    pub(super) async fn ready<'s>(
        &self,
        on: On<'_>,
        sql: &'s str,
    ) -> Result<Ready<'s>, StoreError> {
        if !self.unnamed {
            let st = on.cache.prepare(on.client, sql).await.map_err(db_err)?;
            return Ok(Ready::Named(st));
        }
        let known = self.types.read().ok().and_then(|t| t.get(sql).cloned());
        if let Some(types) = known {
            return Ok(Ready::Unnamed(sql, types));
        }
        let types: Arc<[Type]> = learn_types(on, sql).await?.into();
        if let Ok(mut t) = self.types.write() {
            if t.len() >= MAX_REMEMBERED {
                t.clear();
            }
            t.insert(sql.to_string(), types.clone());
        }
        Ok(Ready::Unnamed(sql, types))
    }

    pub(super) async fn query(
        &self,
        on: On<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        self.ready(on, sql).await?.query(on, params).await
    }

    pub(super) async fn query_opt(
        &self,
        on: On<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        at_most_one(self.query(on, sql, params).await?)
    }

    pub(super) async fn query_one(
        &self,
        on: On<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Row, StoreError> {
        exactly_one(self.query_opt(on, sql, params).await?)
    }

    pub(super) async fn execute(
        &self,
        on: On<'_>,
        sql: &str,
        params: Params<'_>,
    ) -> Result<u64, StoreError> {
        self.ready(on, sql).await?.execute(on, params).await
    }
}

impl Ready<'_> {
    pub(super) async fn query(
        &self,
        on: On<'_>,
        params: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        match self {
            Ready::Named(st) => on.client.query(st, params).await,
            Ready::Unnamed(sql, types) => on.client.query_typed(sql, &typed(params, types)?).await,
        }
        .map_err(db_err)
    }

    pub(super) async fn execute(&self, on: On<'_>, params: Params<'_>) -> Result<u64, StoreError> {
        match self {
            Ready::Named(st) => on.client.execute(st, params).await,
            Ready::Unnamed(sql, types) => {
                on.client.execute_typed(sql, &typed(params, types)?).await
            }
        }
        .map_err(db_err)
    }
}

/// The one row of a statement that returns at most one.
fn at_most_one(mut rows: Vec<Row>) -> Result<Option<Row>, StoreError> {
    match rows.len() {
        0 | 1 => Ok(rows.pop()),
        n => Err(StoreError::unavailable(format!(
            "expected at most one row, got {n}"
        ))),
    }
}

/// The row of a statement that returns exactly one.
fn exactly_one(row: Option<Row>) -> Result<Row, StoreError> {
    row.ok_or_else(|| StoreError::unavailable("expected one row, got none"))
}

/// `params` paired with the types the statement declared.
fn typed<'p>(
    params: Params<'p>,
    types: &[Type],
) -> Result<Vec<(&'p (dyn ToSql + Sync), Type)>, StoreError> {
    if params.len() != types.len() {
        return Err(StoreError::unavailable(format!(
            "statement takes {} parameters, given {}",
            types.len(),
            params.len()
        )));
    }
    Ok(params.iter().copied().zip(types.iter().cloned()).collect())
}

/// The parameter types of `sql`, learned by preparing it inside a
/// transaction (behind PgBouncer the named statement then lives and dies on
/// one server connection) and closing it before that transaction ends.
async fn learn_types(on: On<'_>, sql: &str) -> Result<Vec<Type>, StoreError> {
    let learn = async {
        let st = on.client.prepare(sql).await.map_err(db_err)?;
        let types = st.params().to_vec();
        // Dropping the statement queues its Close ahead of anything sent
        // after it, so it reaches the server inside the transaction.
        drop(st);
        Ok::<_, StoreError>(types)
    };
    if on.in_transaction {
        return learn.await;
    }
    on.client.batch_execute("BEGIN").await.map_err(db_err)?;
    let types = learn.await;
    let end = if types.is_ok() { "COMMIT" } else { "ROLLBACK" };
    on.client.batch_execute(end).await.map_err(db_err)?;
    types
}

/// Where the insert and workflow helpers (`insert.rs`) run a statement: on
/// the store's own connection or transaction, through its statements
/// (prepared once per connection, or unnamed behind a transaction-mode
/// pooler: one round trip per call); or on a caller's client, inside the
/// caller's own transaction (`insert_in`), as text (tokio-postgres prepares
/// each one, runs it and closes it: two round trips).
pub(super) enum Db<'a, C> {
    Store(On<'a>, &'a Statements),
    Caller(&'a C),
}

impl<C> Clone for Db<'_, C> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<C> Copy for Db<'_, C> {}

impl<'a> Db<'a, tokio_postgres::Client> {
    /// The store's own connection or transaction `on`.
    pub(super) fn store(on: impl Into<On<'a>>, stmts: &'a Statements) -> Self {
        Db::Store(on.into(), stmts)
    }
}

impl<C: tokio_postgres::GenericClient> Db<'_, C> {
    pub(super) async fn query(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Vec<Row>, StoreError> {
        match self {
            Db::Store(on, st) => st.query(*on, sql, params).await,
            Db::Caller(c) => c.query(sql, params).await.map_err(db_err),
        }
    }

    pub(super) async fn query_opt(
        &self,
        sql: &str,
        params: Params<'_>,
    ) -> Result<Option<Row>, StoreError> {
        at_most_one(self.query(sql, params).await?)
    }

    pub(super) async fn query_one(&self, sql: &str, params: Params<'_>) -> Result<Row, StoreError> {
        exactly_one(self.query_opt(sql, params).await?)
    }

    pub(super) async fn execute(&self, sql: &str, params: Params<'_>) -> Result<u64, StoreError> {
        match self {
            Db::Store(on, st) => st.execute(*on, sql, params).await,
            Db::Caller(c) => c.execute(sql, params).await.map_err(db_err),
        }
    }
}
