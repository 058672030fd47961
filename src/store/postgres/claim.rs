//! Claiming due tasks from PostgreSQL: `FOR UPDATE SKIP LOCKED` batches, so
//! claimers on any number of nodes never take the same task nor wait on
//! each other; limited queues serialize their claims on an advisory lock.

use std::time::Duration;

use super::rows::rows_to_tasks;
use super::statements::On;
use super::{ADVISORY_XACT_LOCK, PostgresStore};
use crate::store::{ClaimParams, QueueLimits, StoreError, truncate_micros};
use crate::task::Task;

impl PostgresStore {
    /// Claim due tasks of `p.queue`, most urgent first (see [`ClaimParams`]).
    pub(super) async fn claim(&self, p: ClaimParams) -> Result<Vec<Task>, StoreError> {
        if let Some(limits) = p.limits.filter(|l| !l.is_empty()) {
            return self.claim_limited(&p, limits).await;
        }
        let c = self.conn().await?;
        let rows = self
            .query(
                &c,
                &self.inner.sql.claim,
                &[
                    &p.node,
                    &truncate_micros(p.now),
                    &p.queue,
                    &(p.limit as i64),
                ],
            )
            .await?;
        let mut tasks = rows_to_tasks(&rows)?;
        tasks.sort_by_key(|t| (t.priority, t.run_at, t.id));
        Ok(tasks)
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
        let key = format!("proto_tasker_claim:{}:{}", self.inner.schema, p.queue);
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
        let mut tasks = rows_to_tasks(&rows)?;
        tasks.sort_by_key(|t| (t.priority, t.run_at, t.id));
        Ok(tasks)
    }
}
