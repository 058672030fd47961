//! The one writer thread of a SQLite store, its group commit, and the
//! connections it and the readers open.
//!
//! # Invariants
//!
//! - Only the writer thread holds a read-write connection, so no two writes
//!   ever race and a claim may count and update in separate statements.
//! - A job's reply is sent only after the transaction that holds it
//!   committed (or with the error that stopped it), so `Ok` means durable.
//! - Each job runs in its own SAVEPOINT: a job that fails rolls back alone
//!   and the others of its group still commit.

use std::path::Path;
use std::sync::mpsc;

use rusqlite::{Connection, OpenFlags};

use super::{SqliteOptions, Synchronous};
use crate::store::StoreError;

/// Most jobs the writer folds into one transaction.
pub const MAX_GROUP: usize = 512;

/// Answers a job's caller once its group's transaction has ended (with the
/// commit's error, if any).
pub(super) type Reply = Box<dyn FnOnce(Option<&StoreError>) + Send>;
/// A write: runs on the writer thread, returns its reply and whether it
/// succeeded (a failed job's savepoint is rolled back).
pub(super) type Job = Box<dyn FnOnce(&Connection) -> (Reply, bool) + Send>;

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
                // The job never ran; answer its caller with the error.
                let (reply, _) = job_skip(job, &conn);
                reply(Some(&err));
            }
            continue;
        }
        for job in batch.drain(..) {
            let sp = conn.execute_batch("SAVEPOINT job");
            let (reply, ok) = job(&conn);
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

/// When BEGIN failed we still need each job's reply channel; running the job
/// outside a transaction would write without group semantics, so instead we
/// run it inside a savepoint that is always rolled back.
fn job_skip(job: Job, conn: &Connection) -> (Reply, bool) {
    let _ = conn.execute_batch("SAVEPOINT skip");
    let r = job(conn);
    let _ = conn.execute_batch("ROLLBACK TO skip; RELEASE skip");
    r
}
