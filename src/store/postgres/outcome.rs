//! Applying what happens to a task after its claim, in PostgreSQL:
//! outcomes (one `UPDATE ... FROM unnest` per batch, fenced by attempt),
//! cancel and retry by hand, and rescue of dead nodes' tasks. The rules come
//! from [`lifecycle`]; this file only writes them as PostgreSQL statements.

use std::collections::HashSet;

use chrono::{DateTime, Utc};

use super::insert::{cascade, give_back_keys, locked_task};
use super::notify::cancel_payload;
use super::rows::{error_value, row_to_task};
use super::statements::Db;
use super::{PostgresStore, db_err, is_unique_violation};
use crate::store::lifecycle::{self, CancelAction, Dependents, Transition};
use crate::store::{Completion, RescueParams, Rescued, StoreError, parse_state, truncate_micros};
use crate::task::{Task, TaskId, TaskState};

impl PostgresStore {
    pub(super) async fn complete_many(
        &self,
        completions: Vec<Completion>,
    ) -> Result<Vec<bool>, StoreError> {
        if completions.is_empty() {
            return Ok(Vec::new());
        }
        let n = completions.len();
        let first = lifecycle::first_per_task(&completions);
        let mut ids = Vec::with_capacity(n);
        let mut tokens = Vec::with_capacity(n);
        let mut yields = Vec::with_capacity(n);
        let mut cancel_errors = Vec::with_capacity(n);
        let mut ats = Vec::with_capacity(n);
        let mut states = Vec::with_capacity(n);
        let mut finished: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut results: Vec<Option<serde_json::Value>> = Vec::with_capacity(n);
        let mut run_ats: Vec<Option<DateTime<Utc>>> = Vec::with_capacity(n);
        let mut errors: Vec<Option<serde_json::Value>> = Vec::with_capacity(n);
        let mut deltas: Vec<i32> = Vec::with_capacity(n);
        let wake = completions.iter().any(lifecycle::wakes_producers);
        for (c, _) in completions.iter().zip(&first).filter(|(_, first)| **first) {
            let t = lifecycle::transition(c);
            ids.push(c.id.0);
            tokens.push(c.token);
            yields.push(t.yields_to_cancel);
            cancel_errors.push(
                t.yields_to_cancel
                    .then(|| error_value(&Transition::cancelled(c))),
            );
            ats.push(truncate_micros(c.at));
            states.push(t.state.as_str());
            finished.push(t.finished.then(|| truncate_micros(c.at)));
            results.push(t.result.map(|r| r.into_owned()));
            run_ats.push(t.run_at.map(truncate_micros));
            errors.push(t.error.as_ref().map(error_value));
            deltas.push(t.attempt_delta);
        }
        let mut c = self.conn().await?;
        // One transaction: outcomes and what they do to dependent tasks land together.
        let tx = c.transaction().await.map_err(db_err)?;
        let rows = self
            .query(
                &tx,
                &self.inner.sql.complete_many,
                &[
                    &ids,
                    &tokens,
                    &states,
                    &finished,
                    &results,
                    &run_ats,
                    &errors,
                    &deltas,
                    &yields,
                    &cancel_errors,
                    &ats,
                ],
            )
            .await?;
        let applied: HashSet<i64> = rows.iter().filter_map(|r| r.try_get(0).ok()).collect();
        let (mut done, mut doomed, mut ended) = (Vec::new(), Vec::new(), Vec::new());
        // Every applied row left `running`: keyed ones give their count back.
        give_back_keys(
            Db::store(&tx, &self.inner.stmts),
            &self.inner.sql,
            &rows,
            3,
            4,
        )
        .await?;
        for r in &rows {
            let id: i64 = r.try_get(0).map_err(db_err)?;
            let state = parse_state(&r.try_get::<_, String>(2).map_err(db_err)?)?;
            if state.is_finished() {
                ended.push(TaskId(id));
            }
            if r.try_get::<_, bool>(1).unwrap_or(false) {
                match Dependents::of(state) {
                    Dependents::Unblock => done.push(id),
                    Dependents::Cascade => doomed.push(id),
                    Dependents::Wait => {}
                }
            }
        }
        if !done.is_empty() {
            self.execute(&tx, &self.inner.sql.unblock, &[&done]).await?;
        }
        if let Some(at) = completions
            .first()
            .map(|c| c.at)
            .filter(|_| !doomed.is_empty())
        {
            ended.extend(
                cascade(
                    Db::store(&tx, &self.inner.stmts),
                    &self.inner.sql,
                    &doomed,
                    at,
                )
                .await?,
            );
        }
        tx.commit().await.map_err(db_err)?;
        self.announce_finished(ended);
        if !done.is_empty() {
            self.announce_work();
        }
        if wake {
            self.announce_work();
        }
        Ok(completions
            .iter()
            .zip(first)
            .map(|(c, first)| first && applied.contains(&c.id.0))
            .collect())
    }

    pub(super) async fn cancel(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let sql = &self.inner.sql;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let task = locked_task(Db::store(&tx, &self.inner.stmts), sql, id).await?;
        let mut ended = Vec::new();
        let row = if lifecycle::cancel_action(&task)? == CancelAction::RequestStop {
            let row = self.query_one(&tx, &sql.cancel_running, &[&id.0]).await?;
            // Delivered on commit, to whichever node runs the task.
            let payload = cancel_payload(id, task.node.as_deref());
            tx.execute("SELECT pg_notify($1, $2)", &[&self.inner.channel, &payload])
                .await
                .map_err(db_err)?;
            row
        } else {
            let row = self
                .query_one(&tx, &sql.cancel_queued, &[&id.0, &truncate_micros(now)])
                .await?;
            ended.push(id);
            ended.extend(cascade(Db::store(&tx, &self.inner.stmts), sql, &[id.0], now).await?);
            row
        };
        let out = row_to_task(&row)?;
        tx.commit().await.map_err(db_err)?;
        self.announce_finished(ended);
        Ok(out)
    }

    pub(super) async fn retry(&self, id: TaskId, now: DateTime<Utc>) -> Result<Task, StoreError> {
        let sql = &self.inner.sql;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let task = locked_task(Db::store(&tx, &self.inner.stmts), sql, id).await?;
        lifecycle::check_retry(&task)?;
        // Lock the parents: one finishing now waits, then sees this task
        // blocked and unblocks it (see insert_single).
        let parent_ids: Vec<i64> = task.depends_on.iter().map(|p| p.0).collect();
        let mut states = std::collections::HashMap::new();
        if !parent_ids.is_empty() {
            for r in tx
                .query(&sql.parents_lock, &[&parent_ids])
                .await
                .map_err(db_err)?
            {
                let state: String = r.try_get(1).map_err(db_err)?;
                states.insert(
                    r.try_get::<_, i64>(0).map_err(db_err)?,
                    parse_state(&state)?,
                );
            }
        }
        // A parent pruned since counts as completed.
        let parents = lifecycle::classify_parents(&task.depends_on, |p| {
            Some(states.get(&p.0).copied().unwrap_or(TaskState::Completed))
        })?;
        let state = lifecycle::retry_state(&task, parents)?;
        let row = match tx
            .query_one(
                &sql.retry,
                &[
                    &id.0,
                    &truncate_micros(now),
                    &state.as_str(),
                    &parents.pending,
                ],
            )
            .await
        {
            Ok(r) => r,
            Err(e) if is_unique_violation(&e) => return Err(lifecycle::unique_conflict(&task)),
            Err(e) => return Err(db_err(e)),
        };
        let out = row_to_task(&row)?;
        // The row holds its named statement, whose Close goes out when the
        // row drops: before COMMIT, or behind PgBouncer it reaches another
        // server connection and this one keeps the name.
        drop(row);
        tx.commit().await.map_err(db_err)?;
        self.announce_work();
        Ok(out)
    }

    pub(super) async fn rescue(&self, p: RescueParams) -> Result<Vec<Rescued>, StoreError> {
        let now = truncate_micros(p.now);
        let now_text = p.now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
        let sql = &self.inner.sql;
        // Heartbeats are in the database's time (see db_time); read before
        // taking a connection, so this call never holds two.
        let cutoff = truncate_micros(self.db_time(p.now).await?)
            - chrono::Duration::from_std(p.node_timeout).unwrap_or_default();
        let mut c = self.conn().await?;
        // One transaction: the rescue, the running counts it gives back and
        // what it does to dependent tasks land together.
        let tx = c.transaction().await.map_err(db_err)?;
        let rows = match &p.node {
            Some(n) => {
                let keep: Vec<i64> = p.keep.iter().map(|t| t.0).collect();
                let before = p.started_before.unwrap_or(DateTime::<Utc>::MAX_UTC);
                self.query(&tx, &sql.rescue_node, &[&now, &now_text, n, &keep, &before])
                    .await?
            }
            None => {
                self.query(&tx, &sql.rescue_dead, &[&now, &now_text, &cutoff])
                    .await?
            }
        };
        let rescued: Vec<Rescued> = rows
            .iter()
            .map(|r| {
                let state: String = r.try_get(2).map_err(db_err)?;
                Ok(Rescued {
                    id: TaskId(r.try_get(0).map_err(db_err)?),
                    node: r.try_get(1).map_err(db_err)?,
                    state: parse_state(&state)?,
                })
            })
            .collect::<Result<_, StoreError>>()?;
        give_back_keys(Db::store(&tx, &self.inner.stmts), sql, &rows, 3, 4).await?;
        let ended = lifecycle::rescue_ended(&rescued);
        let mut finished: Vec<TaskId> = ended.iter().copied().map(TaskId).collect();
        finished.extend(cascade(Db::store(&tx, &self.inner.stmts), sql, &ended, p.now).await?);
        tx.commit().await.map_err(db_err)?;
        self.announce_finished(finished);
        if !rescued.is_empty() {
            self.announce_work();
        }
        Ok(rescued)
    }
}
