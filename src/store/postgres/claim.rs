//! Claiming due tasks from PostgreSQL: `FOR UPDATE SKIP LOCKED` batches, so
//! claimers on any number of nodes never take the same task; claimers of one
//! queue take turns, one claim at a time, so no claim walks or re-locks the
//! rows of another (and claims of queues with limits count what runs and
//! claim as one step).

use std::time::Duration;

use super::rows::rows_to_tasks;
use super::statements::On;
use super::{ADVISORY_XACT_LOCK, PostgresStore};
use crate::store::{ClaimParams, QueueLimits, StoreError, truncate_micros};
use crate::task::Task;

/// How long a claim waits for its queue's turn. Claimers wait in line
/// (PostgreSQL grants a table lock first come, first served); a turn lasts
/// one claim, a few milliseconds, so 100 nodes in line waited 0.6 s on
/// average on 2 cores. Past this bound the holder is taken to hang (e.g. a
/// node stopped while PostgreSQL sent it its claim's rows), and this
/// handle's claims skip their turns for [`TURNS_OFF`], so the queue stays
/// claimable (a claim of a queue with limits takes nothing instead: its
/// limits need the turn). The wait holds a pooled connection; heartbeats
/// do not need it (they go on the listening connection).
const TURN_WAIT: &str = "5s";

/// How long a claimer may keep its turn without sending its claim (between
/// the lock being granted and the claim statement arriving, one round trip
/// and a look at the free workers). A claimer that stops there (a process
/// stopped or partitioned) loses its connection, and with it the turn,
/// after this long, instead of holding every claimer of the queue up.
const TURN_IDLE: &str = "1s";

/// How many turns the schema has (`claim_turn_0` .. `claim_turn_31`,
/// migration 0027): a queue's turn is the one its name hashes to.
const TURN_SLOTS: u32 = 32;

/// Claimers that can never take this many tasks at once take no turn (a
/// node running two workers of the queue), unless the queue has limits. A
/// small claim locks few rows for others to walk past, and a turn costs
/// two round trips and a wait: 100 nodes of 2 workers drained 1.7k tasks/s
/// with turns for every claim, 3.4k without (figures in docs/benchmarks.md).
const TURN_MIN: usize = 32;

/// How long claims skip their turns after one waited past [`TURN_WAIT`].
const TURNS_OFF: Duration = Duration::from_secs(10);

/// Bounds the rest of the transaction only (`SET LOCAL`s that take
/// parameters; nothing outlives the transaction): the wait for the turn,
/// and how long the transaction may sit idle while holding it. It reads
/// the turn's view (one row), so the LOCK that follows finds the view's
/// name already looked up: on a new connection the LOCK's own catalog
/// lookup took a snapshot that lasted its whole wait.
fn local_turn_timeouts(turn: &str) -> String {
    format!(
        "SELECT set_config('lock_timeout', $1, true), \
         set_config('idle_in_transaction_session_timeout', $2, true) FROM {turn}"
    )
}

/// The relation whose lock is `queue`'s turn in `schema`. FNV-1a, so every
/// node, whatever its build, picks the same one.
pub fn claim_turn_relation(schema: &str, queue: &str) -> String {
    let mut h: u32 = 0x811c_9dc5;
    for b in queue.bytes() {
        h ^= u32::from(b);
        h = h.wrapping_mul(0x0100_0193);
    }
    format!("{schema}.claim_turn_{}", h % TURN_SLOTS)
}

impl PostgresStore {
    /// Claim due tasks of `p.queue`, most urgent first (see [`ClaimParams`]).
    ///
    /// Claimers of one queue, on every node, claim one at a time (those
    /// that may take at least [`TURN_MIN`] tasks, and every claimer of a
    /// queue with limits: [`Self::claim_limited`]). A claim is a transaction
    /// in two round trips: BEGIN, the timeouts and `LOCK TABLE` on the
    /// queue's turn (waiting up to [`TURN_WAIT`]); then, the turn granted,
    /// the claim statement, sized by the claimer's room at that moment, and
    /// COMMIT. Invariants, and why each matters (measured with 100 nodes on
    /// one queue, docs/benchmarks.md):
    ///
    /// - Only the turn holder claims, so a claim's snapshot, taken after
    ///   the turn is granted and so after the previous holder committed,
    ///   never sees as claimable a row another claim has taken. Claims
    ///   running side by side did: READ COMMITTED re-checks the newest
    ///   version of a row updated after the snapshot, following the update
    ///   chain and waiting there even under `SKIP LOCKED`, and keeps its
    ///   lock on the row when the re-check fails, so completions of those
    ///   tasks waited for the slow claim; drains fell to 4-9k tasks/s in
    ///   some runs, claims taking seconds.
    /// - The wait takes no snapshot (a LOCK statement does not), so the
    ///   dozens of claimers in line do not hold back the cleanup of index
    ///   entries claims leave behind.
    /// - The claim takes what the claimer can take when its turn comes
    ///   ([`crate::store::ClaimRoom`]), not what it could take when it got
    ///   in line: half the claims were of 2-15 tasks, each costing a turn.
    pub(super) async fn claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        if let Some(limits) = p.limits.filter(|l| !l.is_empty()) {
            return self.claim_limited(&p, limits).await;
        }
        let now = truncate_micros(p.now);
        let c = self.conn().await?;
        let most = p.room.as_ref().map_or(p.limit, |r| r.most()).max(p.limit);
        if most < TURN_MIN || !self.turns_on() {
            return self.claim_now(&c, &p, now).await;
        }
        let on: On = (&c).into();
        let stmts = &self.inner.stmts;
        let claim = stmts.ready(on, &self.inner.sql.claim).await?;
        let commit = stmts.ready(on, "COMMIT").await?;
        if !self.take_turn(on, &p.queue).await? {
            // No turn within TURN_WAIT: claim without turns for a while.
            tracing::warn!(
                queue = %p.queue,
                "a claim waited {TURN_WAIT} for its turn at the queue (another claimer holds it); \
                 this node claims without turns for {}s",
                TURNS_OFF.as_secs()
            );
            self.turns_off();
            return self.claim_now(&c, &p, now).await;
        }
        let limit = room_now(&p) as i64;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&p.node, &now, &p.queue, &limit];
        // A failed claim turns the COMMIT into a rollback.
        let (rows, done) = tokio::join!(claim.query(on, &params), commit.execute(on, &[]));
        let rows = rows?;
        done?;
        claimed(&rows)
    }

    /// Claim without a turn, in one statement.
    async fn claim_now(
        &self,
        c: &deadpool_postgres::Object,
        p: &ClaimParams,
        now: chrono::DateTime<chrono::Utc>,
    ) -> Result<Vec<Task>, StoreError> {
        let limit = room_now(p) as i64;
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 4] =
            [&p.node, &now, &p.queue, &limit];
        let rows = self.query(c, &self.inner.sql.claim, &params).await?;
        claimed(&rows)
    }

    /// Begin a transaction on `on` and wait, up to [`TURN_WAIT`], for
    /// `queue`'s turn (see [`Self::claim`]). `Ok(true)`: the turn is this
    /// transaction's until it ends. `Ok(false)`: another claimer held it
    /// all that while; the transaction is rolled back, as on an error.
    async fn take_turn(&self, on: On<'_>, queue: &str) -> Result<bool, StoreError> {
        let stmts = &self.inner.stmts;
        let begin = stmts.ready(on, "BEGIN").await?;
        let turn = claim_turn_relation(&self.inner.schema, queue);
        let timeouts_sql = local_turn_timeouts(&turn);
        let timeouts = stmts.ready(on, &timeouts_sql).await?;
        let lock_sql = format!("LOCK TABLE {turn} IN EXCLUSIVE MODE");
        let lock = stmts.ready(on, &lock_sql).await?;
        let timeout_params: [&(dyn tokio_postgres::types::ToSql + Sync); 2] =
            [&TURN_WAIT, &TURN_IDLE];
        let (b, t, l) = tokio::join!(
            begin.execute(on, &[]),
            timeouts.query(on, &timeout_params),
            lock.execute(on, &[]),
        );
        let Err(e) = b.and(t).and(l) else {
            return Ok(true);
        };
        // The transaction failed (or never began): end it before the
        // connection goes back to the pool.
        let rolled_back = stmts.execute(on, "ROLLBACK", &[]).await;
        if !is_lock_timeout(&e) {
            return Err(e);
        }
        rolled_back?;
        Ok(false)
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

    /// Claim under cluster-wide limits. Every claim of a limited queue, of
    /// any size, takes the queue's turn first (as [`Self::claim`] does), so
    /// counting the running tasks and claiming happen as one step across
    /// all nodes; without the turn within [`TURN_WAIT`] it claims nothing.
    /// (They took a transaction-scoped advisory lock, in one round trip
    /// with the claim: the wait held a snapshot, had no bound, and the
    /// claim took what was free when it got in line. With 100 nodes of 200
    /// workers: claims of 59 tasks, 0.15 statements a task, 17k tasks/s
    /// against one node's 39k; docs/benchmarks.md.) It still takes that
    /// advisory lock too, with the claim, for nodes of those versions
    /// during a rolling upgrade.
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
        let claim = if limits.round_robin {
            stmts.ready(on, &sql.claim_limited_fair).await?
        } else {
            stmts.ready(on, &sql.claim_limited).await?
        };
        let commit = stmts.ready(on, "COMMIT").await?;
        let old_lock = stmts.ready(on, ADVISORY_XACT_LOCK).await?;
        let old_key = format!("proto_tasker_claim:{}:{}", self.inner.schema, p.queue);
        let max = i64::MAX;
        let global = limits.global_concurrency.map(i64::from).unwrap_or(max);
        let per_key = limits.per_key_concurrency.map(i64::from).unwrap_or(max);
        let (rate_max, rate_per) = match limits.rate {
            Some((n, per)) => (i64::from(n), per),
            None => (max, Duration::from_secs(1)),
        };
        let rate_per_us = i64::try_from(rate_per.as_micros()).unwrap_or(max);
        // Look a bounded way down the queue for tasks whose keys have room;
        // without a per-key limit the first `limit` tasks are enough.
        // (`allowed * scan_mul + scan_add` rows, computed in the statement).
        let (scan_mul, scan_add): (i64, i64) = if limits.per_key_concurrency.is_some() {
            (2, 16)
        } else {
            (1, 0)
        };
        let has_rate = limits.rate.is_some();
        if !self.take_turn(on, &p.queue).await? {
            // The limits hold only if claimers count and claim one at a
            // time: without the turn, this claim takes nothing.
            tracing::warn!(
                queue = %p.queue,
                "a claim of a queue with limits waited {TURN_WAIT} for its turn (another claimer \
                 holds it); it claims nothing this time"
            );
            return Ok(Vec::new());
        }
        let limit = room_now(p) as i64;
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
        // Nodes from before limited claims took the turn take this advisory
        // lock instead: taking it too (after the turn, so only such a node
        // can make it wait) keeps the limits while a rolling upgrade runs
        // both. A failed statement turns the COMMIT into a rollback.
        let old_params: [&(dyn tokio_postgres::types::ToSql + Sync); 1] = [&old_key];
        let (l, rows, done) = tokio::join!(
            old_lock.execute(on, &old_params),
            claim.query(on, &claim_params),
            commit.execute(on, &[])
        );
        l?;
        let rows = rows?;
        done?;
        claimed(&rows)
    }
}

/// How many tasks a claim takes now: what the claimer's room grants, or
/// its limit.
fn room_now(p: &ClaimParams) -> usize {
    p.room.as_ref().map_or(p.limit, |r| r.now())
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
