//! Claiming due tasks from PostgreSQL: `FOR UPDATE SKIP LOCKED` batches, so
//! claimers on any number of nodes never take the same task; claimers of one
//! queue take turns on an advisory lock, so they do not walk each other's
//! locked rows either (limited queues count and claim under the same lock).

use std::time::Duration;

use super::rows::rows_to_tasks;
use super::statements::On;
use super::{ADVISORY_XACT_LOCK, PostgresStore};
use crate::store::{ClaimParams, QueueLimits, StoreError, truncate_micros};
use crate::task::Task;

/// How long a claim waits for its turn at a queue (see `claim`). A turn
/// lasts one claim statement, a few milliseconds; a hundred claimers in
/// line wait a few hundred. Past it, the holder is taken to hang (e.g. a
/// node stopped while PostgreSQL sends it its claim), and this handle's
/// claims skip their turns for [`TURNS_OFF`], so the queue stays claimable.
/// The wait holds a pooled connection; heartbeats can spare it (their
/// margin is seconds).
const TURN_WAIT: &str = "2s";

/// How many claims of one queue may run at once, each in a turn of its
/// own (a claim picks one at random). One at a time leaves the cores idle
/// while a turn changes hands (the next claimer's backend must be woken
/// and scheduled): measured on 2 cores, 50 nodes of 20 workers drained
/// 5.1k tasks/s with one turn, 8.6k with four (9.5k without turns), and
/// 100 nodes of 200 workers 13.0k with one, 13.8-15.0k with four (4.7-6.1k
/// without). Four claimers walk at most three others' locked rows.
const TURNS: u32 = 4;

/// Claims asking for fewer tasks than this take no turn. A small claim
/// holds few rows locked for others to walk past, and a turn costs it four
/// statements and a wait: 100 nodes of 2 workers drained 1.7k tasks/s with
/// turns for every claim, 3.4k with this; 50 nodes of 20 workers 10.6k and
/// 12.3k (figures in docs/benchmarks.md).
const TURN_MIN: usize = 32;

/// How long claims skip their turns after one waited past [`TURN_WAIT`].
const TURNS_OFF: Duration = Duration::from_secs(10);

/// Sets `lock_timeout` for the rest of the transaction only (a `SET LOCAL`
/// that takes a parameter; nothing outlives the transaction).
const LOCAL_LOCK_TIMEOUT: &str = "SELECT set_config('lock_timeout', $1, true)";

impl PostgresStore {
    /// Claim due tasks of `p.queue`, most urgent first (see [`ClaimParams`]).
    ///
    /// Claimers of one queue, on every node, take turns, [`TURNS`] at a
    /// time (claims of at least [`TURN_MIN`] tasks): a claim runs in a
    /// transaction that first takes one of the queue's turn locks
    /// (transaction advisory locks), waiting up to [`TURN_WAIT`], and the
    /// claim statement's snapshot is taken after the lock is granted. Without turns, `SKIP LOCKED` still keeps claimers
    /// from taking the same task, but with 100 nodes on one queue each
    /// claim walked the rows all the others held locked (16,600 buffers a
    /// claim, against about 1,600 alone) and locked rows a concurrent claim
    /// had just taken (READ COMMITTED re-checks the newest version of a row
    /// updated after the snapshot and keeps its lock even when the re-check
    /// fails), so completions of those tasks waited for the slow claim,
    /// about a second each. The five statements are pipelined: one round
    /// trip, as before.
    pub(super) async fn claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        if let Some(limits) = p.limits.filter(|l| !l.is_empty()) {
            return self.claim_limited(&p, limits).await;
        }
        let now = truncate_micros(p.now);
        let limit = p.limit as i64;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&p.node, &now, &p.queue, &limit];
        let c = self.conn().await?;
        if p.limit < TURN_MIN || !self.turns_on() {
            let rows = self.query(&c, &self.inner.sql.claim, &params).await?;
            return claimed(&rows);
        }
        let on: On = (&c).into();
        let stmts = &self.inner.stmts;
        let begin = stmts.ready(on, "BEGIN").await?;
        let timeout = stmts.ready(on, LOCAL_LOCK_TIMEOUT).await?;
        let lock = stmts.ready(on, ADVISORY_XACT_LOCK).await?;
        let claim = stmts.ready(on, &self.inner.sql.claim).await?;
        let commit = stmts.ready(on, "COMMIT").await?;
        let turn = rand::random::<u32>() % TURNS;
        let key = format!("{}:{turn}", self.claim_key(&p.queue));
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let wait_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&TURN_WAIT];
        let (b, t, l, rows, done) = tokio::join!(
            begin.execute(on, &[]),
            timeout.query(on, &wait_params),
            lock.execute(on, &lock_params),
            claim.query(on, &params),
            commit.execute(on, &[]),
        );
        let rows = match (b, t, l, rows, done) {
            (Ok(_), Ok(_), Ok(_), Ok(rows), Ok(_)) => rows,
            // No turn within TURN_WAIT: the transaction rolled back with
            // nothing claimed. Claim without turns for a while.
            (Ok(_), Ok(_), Err(e), _, Ok(_)) if is_lock_timeout(&e) => {
                tracing::warn!(
                    queue = %p.queue,
                    "a claim waited {TURN_WAIT} for its turn at the queue (another claimer holds it); \
                     this node claims without turns for {}s",
                    TURNS_OFF.as_secs()
                );
                self.turns_off();
                self.query(&c, &self.inner.sql.claim, &params).await?
            }
            (b, t, l, rows, done) => {
                b?;
                t?;
                l?;
                done?;
                rows?
            }
        };
        claimed(&rows)
    }

    fn turns_on(&self) -> bool {
        match self.inner.turns_off_until.lock() {
            Ok(until) => until.is_none_or(|t| std::time::Instant::now() >= t),
            Err(_) => true,
        }
    }

    fn turns_off(&self) {
        if let Ok(mut until) = self.inner.turns_off_until.lock() {
            *until = Some(std::time::Instant::now() + TURNS_OFF);
        }
    }

    /// The advisory lock key of `queue`'s claims in this schema: limited
    /// claims take it, one at a time; plain claims take one of [`TURNS`]
    /// keys made from it.
    fn claim_key(&self, queue: &str) -> String {
        format!("proto_tasker_claim:{}:{queue}", self.inner.schema)
    }

    /// Claim under cluster-wide limits. Claimers of one limited queue take a
    /// transaction-scoped advisory lock first, so counting the running tasks
    /// and claiming happen as one step across all nodes. The four statements
    /// (BEGIN, lock, count-pick-claim, COMMIT) are pipelined: one round trip.
    async fn claim_limited(
        &self,
        p: &ClaimParams,
        limits: QueueLimits,
    ) -> Result<Vec<Task>, StoreError> {
        let sql = &self.inner.sql;
        let now = truncate_micros(p.now);
        let c = self.conn().await?;
        let on: On = (&c).into();
        let stmts = &self.inner.stmts;
        let begin = stmts.ready(on, "BEGIN").await?;
        let lock = stmts.ready(on, ADVISORY_XACT_LOCK).await?;
        let claim = if limits.round_robin {
            stmts.ready(on, &sql.claim_limited_fair).await?
        } else {
            stmts.ready(on, &sql.claim_limited).await?
        };
        let commit = stmts.ready(on, "COMMIT").await?;
        let key = self.claim_key(&p.queue);
        let max = i64::MAX;
        let global = limits.global_concurrency.map(i64::from).unwrap_or(max);
        let per_key = limits.per_key_concurrency.map(i64::from).unwrap_or(max);
        let (rate_max, rate_per) = match limits.rate {
            Some((n, per)) => (i64::from(n), per),
            None => (max, Duration::from_secs(1)),
        };
        let rate_per_us = i64::try_from(rate_per.as_micros()).unwrap_or(max);
        let limit = p.limit as i64;
        // Look a bounded way down the queue for tasks whose keys have room;
        // without a per-key limit the first `limit` tasks are enough.
        // (`allowed * scan_mul + scan_add` rows, computed in the statement).
        let (scan_mul, scan_add): (i64, i64) = if limits.per_key_concurrency.is_some() {
            (2, 16)
        } else {
            (1, 0)
        };
        let has_rate = limits.rate.is_some();
        let lock_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&key];
        let claim_params: [&(dyn tokio_postgres::types::ToSql + Sync); 11] = [
            &p.queue,
            &now,
            &limit,
            &global,
            &rate_max,
            &rate_per_us,
            &scan_mul,
            &per_key,
            &has_rate,
            &p.node,
            &scan_add,
        ];
        // Behind a transaction pooler the BEGIN pins one server connection
        // until the COMMIT, so the four still run together there.
        let (b, l, rows, done) = tokio::join!(
            begin.execute(on, &[]),
            lock.execute(on, &lock_params),
            claim.query(on, &claim_params),
            commit.execute(on, &[]),
        );
        b?;
        l?;
        let rows = rows?;
        done?;
        claimed(&rows)
    }
}

/// Did a statement give up waiting for a lock (`lock_timeout`, 55P03)?
fn is_lock_timeout(e: &StoreError) -> bool {
    matches!(e, StoreError::Unavailable { message, .. } if message.starts_with("55P03"))
}

/// The claimed tasks of a claim's rows, most urgent first (the statement's
/// RETURNING gives them in no particular order).
fn claimed(rows: &[tokio_postgres::Row]) -> Result<Vec<Task>, StoreError> {
    let mut tasks = rows_to_tasks(rows)?;
    tasks.sort_by_key(|t| (t.priority, t.run_at, t.id));
    Ok(tasks)
}
