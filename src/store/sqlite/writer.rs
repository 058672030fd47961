//! The one writer thread of a SQLite store, its group commit, and the
//! connections it and the readers open.
//!
//! # Invariants
//!
//! - Only the writer thread holds a read-write connection, so no two writes
//!   ever race and a claim may count and update in separate statements.
//! - A job's reply is sent only after the transaction that holds it
//!   committed (or with the error that stopped it), so `Ok` means durable.
//! - Each job runs in its own SAVEPOINT: a job that fails (or panics) rolls
//!   back alone and the others of its group still commit; a panic never
//!   ends the thread.
//! - When the group's transaction cannot begin (another process holds the
//!   write lock past the busy timeout), every job of the group is answered
//!   with that error without running: none waits out a timeout of its own.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, OpenFlags};

use super::{SqliteOptions, Synchronous};
use crate::store::{StoreError, lifecycle};

/// Most jobs the writer folds into one transaction.
pub const MAX_GROUP: usize = 512;

/// Answers a job's caller once its group's transaction has ended (with the
/// commit's error, if any).
pub(super) type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;

/// Runs a write; returns its reply and whether it succeeded (a failed job's
/// savepoint is rolled back).
pub(super) type Run = Box<dyn FnOnce(&Connection) -> (Reply, bool) + Send>;

/// A write for the writer thread.
pub(super) struct Job {
    pub run: Run,
    /// Answers the caller without running (the group could not begin).
    pub fail: Box<dyn FnOnce(&StoreError) + Send>,
}

pub(super) fn unavailable(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::unavailable(format!("{}: {e}", path.display()))
}

/// A SQLite error as a store error: a busy or locked database may pass; any
/// other error (a constraint, bad data, a corrupt file) will not by waiting.
pub(super) fn sql_err(e: rusqlite::Error) -> StoreError {
    let transient = matches!(
        e.sqlite_error_code(),
        Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
    );
    StoreError::Unavailable {
        message: e.to_string(),
        transient,
    }
}

pub(super) fn open_conn(
    options: &SqliteOptions,
    read_only: bool,
) -> Result<Connection, StoreError> {
    let path = &options.path;
    let flags = if read_only {
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX
    } else {
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX
    };
    let conn = Connection::open_with_flags(path, flags).map_err(|e| unavailable(path, e))?;
    conn.busy_timeout(options.busy_timeout)
        .map_err(|e| unavailable(path, e))?;
    conn.set_prepared_statement_cache_capacity(64);
    register_functions(&conn).map_err(|e| unavailable(path, e))?;
    if !read_only {
        let sync = match options.synchronous {
            Synchronous::Full => "FULL",
            Synchronous::Normal => "NORMAL",
        };
        // journal_mode returns a row; a file that is not a database fails here.
        let mode: String = conn
            .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
            .map_err(|e| unavailable(path, e))?;
        if !mode.eq_ignore_ascii_case("wal") {
            return Err(unavailable(path, format!("cannot enable WAL (got {mode})")));
        }
        conn.execute_batch(&format!(
            "PRAGMA synchronous = {sync}; PRAGMA foreign_keys = ON; PRAGMA temp_store = MEMORY;"
        ))
        .map_err(|e| unavailable(path, e))?;
    }
    Ok(conn)
}

/// `pt_json_contains(args, query)`: PostgreSQL's `jsonb @>` for the task
/// list's `args` filter (see [`lifecycle::json_contains`]). The query is
/// parsed once per statement (SQLite keeps it as the argument's aux data);
/// text that is not JSON is an error of the statement, never a panic.
fn register_functions(conn: &Connection) -> rusqlite::Result<()> {
    use rusqlite::functions::FunctionFlags;
    conn.create_scalar_function(
        "pt_json_contains",
        2,
        FunctionFlags::SQLITE_UTF8 | FunctionFlags::SQLITE_DETERMINISTIC,
        |ctx| {
            type BoxError = Box<dyn std::error::Error + Send + Sync>;
            let query = ctx.get_or_create_aux(1, |v| -> Result<serde_json::Value, BoxError> {
                Ok(serde_json::from_slice(v.as_bytes()?)?)
            })?;
            let target = ctx.get_raw(0);
            let target: serde_json::Value = serde_json::from_slice(target.as_bytes()?)
                .map_err(|e| rusqlite::Error::UserFunctionError(Box::new(e)))?;
            Ok(lifecycle::json_contains(&target, &query))
        },
    )
}

/// The writer thread: group commit. See the module docs.
pub(super) fn writer_loop(conn: Connection, rx: mpsc::Receiver<Job>) {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_GROUP);
    let mut replies: Vec<Reply> = Vec::with_capacity(MAX_GROUP);
    while let Ok(first) = rx.recv() {
        batch.push(first);
        while batch.len() < MAX_GROUP {
            match rx.try_recv() {
                Ok(j) => batch.push(j),
                Err(_) => break,
            }
        }
        if let Err(e) = conn.execute_batch("BEGIN IMMEDIATE") {
            let err = sql_err(e);
            for job in batch.drain(..) {
                (job.fail)(&err);
            }
            continue;
        }
        for job in batch.drain(..) {
            let sp = conn.execute_batch("SAVEPOINT job");
            let ran = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (job.run)(&conn)));
            let (reply, ok) = match ran {
                Ok(r) => r,
                Err(panic) => {
                    // The job's reply went with it: its caller hears that
                    // the write was lost. The others go on.
                    tracing::error!(panic = ?panic.downcast_ref::<&str>(), "a store write panicked; rolled back");
                    (Box::new(|_: Option<&StoreError>| {}) as Reply, false)
                }
            };
            let undo = if ok {
                "RELEASE job"
            } else {
                "ROLLBACK TO job; RELEASE job"
            };
            if sp.is_ok() {
                let _ = conn.execute_batch(undo);
            }
            replies.push(reply);
        }
        match conn.execute_batch("COMMIT") {
            Ok(()) => replies.drain(..).for_each(|r| r(None)),
            Err(e) => {
                let _ = conn.execute_batch("ROLLBACK");
                let err = sql_err(e);
                replies.drain(..).for_each(|r| r(Some(&err)));
            }
        }
    }
}
