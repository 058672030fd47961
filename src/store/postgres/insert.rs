//! Inserting tasks into PostgreSQL (one `unnest` statement for plain rows,
//! one at a time for rows with a unique key or parents), also inside a
//! caller's own transaction; and what workflows do when a parent ends.

use std::collections::{BTreeSet, HashMap, HashSet};

use chrono::{DateTime, Utc};
use tokio_postgres::{GenericClient, Row};

use super::db_err;
use super::notify::{WORK, channel_name};
use super::rows::row_to_task;
use super::sql::Sql;
use super::statements::Db;
use crate::store::lifecycle;
use crate::store::{Inserted, StoreError, TaskInsert, parse_state, truncate_micros, truncate_rows};
use crate::task::{Task, TaskId};

/// Are all `rows` plain (no unique key, no parents)? Then one `unnest`
/// statement inserts them all, atomically without a transaction around it.
pub(super) fn all_plain(rows: &[TaskInsert]) -> bool {
    rows.iter()
        .all(|r| r.unique_key.is_none() && r.depends_on.is_empty())
}

/// Insert `rows` on the store's own connection or a caller's transaction
/// (see [`Db`]).
pub(super) async fn insert_rows<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    rows: Vec<TaskInsert>,
    now: DateTime<Utc>,
    fair: Option<&HashSet<String>>,
) -> Result<Vec<Inserted>, StoreError> {
    let now = truncate_micros(now);
    let rows = truncate_rows(rows);
    // Round-robin queues (`fair`, else read here): each row's fair_seq.
    let read;
    let fair = match fair {
        Some(f) => f,
        None => {
            read = fair_queues(db, sql).await?;
            &read
        }
    };
    let seqs = fair_seqs(db, sql, &rows, fair).await?;
    let mut out: Vec<Option<Inserted>> = vec![None; rows.len()];
    // Tasks without a unique key: one statement for all of them.
    let plain: Vec<usize> = (0..rows.len())
        .filter(|&i| rows[i].unique_key.is_none() && rows[i].depends_on.is_empty())
        .collect();
    if !plain.is_empty() {
        let kinds: Vec<&str> = plain.iter().map(|&i| rows[i].kind.as_str()).collect();
        let queues: Vec<&str> = plain.iter().map(|&i| rows[i].queue.as_str()).collect();
        let args: Vec<&serde_json::Value> = plain.iter().map(|&i| &rows[i].args).collect();
        let priorities: Vec<i16> = plain.iter().map(|&i| rows[i].priority).collect();
        let attempts: Vec<i32> = plain.iter().map(|&i| rows[i].max_attempts).collect();
        let timeouts: Vec<Option<i64>> = plain.iter().map(|&i| rows[i].timeout_ms).collect();
        let run_ats: Vec<DateTime<Utc>> = plain.iter().map(|&i| rows[i].run_at).collect();
        let keys: Vec<Option<&str>> = plain
            .iter()
            .map(|&i| rows[i].concurrency_key.as_deref())
            .collect();
        let refs: Vec<Option<&str>> = plain
            .iter()
            .map(|&i| rows[i].reference.as_deref())
            .collect();
        let tags: Vec<Option<serde_json::Value>> = plain
            .iter()
            .map(|&i| (!rows[i].tags.is_empty()).then(|| serde_json::json!(rows[i].tags)))
            .collect();
        let fseqs: Vec<Option<i64>> = plain.iter().map(|&i| seqs[i]).collect();
        let tps: Vec<Option<&str>> = plain
            .iter()
            .map(|&i| rows[i].traceparent.as_deref())
            .collect();
        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 13] = [
            &kinds,
            &queues,
            &args,
            &priorities,
            &attempts,
            &timeouts,
            &run_ats,
            &now,
            &keys,
            &refs,
            &tags,
            &fseqs,
            &tps,
        ];
        let ids = db.query(&sql.insert_many, &params).await?;
        let mut ids: Vec<i64> = ids
            .iter()
            .map(|r| r.try_get(0))
            .collect::<Result<_, _>>()
            .map_err(db_err)?;
        // Ids come from one sequence in insertion (ordinality) order.
        ids.sort_unstable();
        for (&i, id) in plain.iter().zip(ids) {
            out[i] = Some(Inserted::new(rows[i].to_task(TaskId(id), now)));
        }
    }
    // Tasks with a unique key or dependencies: one at a time, in order, so
    // each learns whether it was new and finds the batch tasks it waits for.
    for i in 0..rows.len() {
        if out[i].is_some() {
            continue;
        }
        let done: Vec<Option<TaskId>> = out.iter().map(|o| o.as_ref().map(|x| x.task.id)).collect();
        out[i] = Some(insert_single(db, sql, &rows[i], now, &done, seqs[i]).await?);
    }
    out.into_iter()
        .map(|o| o.ok_or_else(|| StoreError::unavailable("insert lost a row")))
        .collect()
}

/// Rows (with the queue in column `qi` and the key in `ki`) that left
/// `running`: give their places back in `running_keys`.
pub(super) async fn give_back_keys<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    rows: &[Row],
    qi: usize,
    ki: usize,
) -> Result<(), StoreError> {
    let (mut queues, mut keys): (Vec<String>, Vec<String>) = (Vec::new(), Vec::new());
    for r in rows {
        if let Some(k) = r.try_get::<_, Option<String>>(ki).map_err(db_err)? {
            queues.push(r.try_get(qi).map_err(db_err)?);
            keys.push(k);
        }
    }
    if !keys.is_empty() {
        db.execute(&sql.running_keys_sub, &[&queues, &keys]).await?;
        db.execute(&sql.running_keys_drop, &[&queues, &keys])
            .await?;
    }
    Ok(())
}

/// The task `id`, locked for update until the transaction ends.
pub(super) async fn locked_task<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    id: TaskId,
) -> Result<Task, StoreError> {
    let row = db.query_opt(&sql.get_for_update, &[&id.0]).await?;
    row.as_ref()
        .map(row_to_task)
        .transpose()?
        .ok_or(StoreError::NotFound(id))
}

/// Cancel or fail (per their policy) the blocked tasks that wait for `parents`.
pub(super) async fn cascade<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    parents: &[i64],
    now: DateTime<Utc>,
) -> Result<Vec<TaskId>, StoreError> {
    if parents.is_empty() {
        return Ok(Vec::new());
    }
    let now_text = now.to_rfc3339_opts(chrono::SecondsFormat::Micros, true);
    db.query(&sql.cascade, &[&parents, &truncate_micros(now), &now_text])
        .await?
        .iter()
        .map(|r| r.try_get(0).map(TaskId).map_err(db_err))
        .collect()
}

/// Insert one task that has a unique key or dependencies.
async fn insert_single<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    t: &TaskInsert,
    now: DateTime<Utc>,
    batch: &[Option<TaskId>],
    fair_seq: Option<i64>,
) -> Result<Inserted, StoreError> {
    let parents: Vec<i64> =
        lifecycle::parent_ids(&t.depends_on, |j| batch.get(j).copied().flatten())?
            .into_iter()
            .map(|p| p.0)
            .collect();
    let mut task = t.to_task(TaskId(0), now);
    let mut standing = lifecycle::ParentStates::default();
    if !parents.is_empty() {
        // Lock the parents: a parent finishing now waits for this insert, and
        // then sees the new edge when it unblocks or cancels its children.
        let rows = db.query(&sql.parents_lock, &[&parents]).await?;
        let mut states = std::collections::HashMap::with_capacity(rows.len());
        for r in &rows {
            let id: i64 = r.try_get(0).map_err(db_err)?;
            let state: String = r.try_get(1).map_err(db_err)?;
            states.insert(id, parse_state(&state)?);
        }
        let ids: Vec<TaskId> = parents.iter().map(|p| TaskId(*p)).collect();
        standing = lifecycle::classify_parents(&ids, |id| states.get(&id.0).copied())?;
        task.depends_on = ids;
        lifecycle::apply_parents(&mut task, t.on_dependency_failure, standing, now);
    }
    let deps = (!parents.is_empty()).then(|| serde_json::json!(parents));
    let errors = serde_json::to_value(&task.errors).unwrap_or_else(|_| serde_json::json!([]));
    let tags = (!t.tags.is_empty()).then_some(&t.tags);
    // A unique key held by a task that finishes between our insert and our
    // look-up frees the key: insert again (a few rounds at most, since each
    // round needs another task to take and give up the key meanwhile).
    let mut rounds = 0;
    let row = loop {
        let inserted = db
            .query_opt(
                &sql.insert_one,
                &[
                    &t.kind,
                    &t.queue,
                    &t.args,
                    &t.priority,
                    &task.state.as_str(),
                    &t.max_attempts,
                    &t.timeout_ms,
                    &t.unique_key,
                    &t.run_at,
                    &now,
                    &deps,
                    &standing.pending,
                    &t.on_dependency_failure.as_str(),
                    &task.finished_at,
                    &errors,
                    &t.concurrency_key,
                    &t.reference,
                    &tags,
                    &fair_seq,
                    &t.traceparent,
                ],
            )
            .await?;
        if let Some(row) = inserted {
            // A finished holder (unique_states) is looked for after the
            // insert, in a statement of its own: a holder that finished
            // while our insert waited on its row is seen then, and ours
            // is deleted again (see `finished_holder`).
            if let Some(holder) = finished_holder(db, sql, t, now, &row).await? {
                return match lifecycle::on_holder(&t.unique, holder.state) {
                    lifecycle::OnHolder::Refuse => Err(lifecycle::duplicate(&holder)),
                    _ => Ok(Inserted::holder(holder)),
                };
            }
            break row;
        }
        if let Some(row) = db
            .query_opt(&sql.find_unique, &[&t.kind, &t.unique_key])
            .await?
        {
            let holder = row_to_task(&row)?;
            match lifecycle::on_holder(&t.unique, holder.state) {
                lifecycle::OnHolder::Keep => return Ok(Inserted::holder(holder)),
                lifecycle::OnHolder::Refuse => return Err(lifecycle::duplicate(&holder)),
                lifecycle::OnHolder::Replace => {
                    // Lands only while the holder still waits; if it was
                    // claimed meanwhile, the next round finds it running.
                    if let Some(row) = db
                        .query_opt(
                            &sql.replace_pending,
                            &[&holder.id.0, &t.args, &t.priority, &t.run_at, &now],
                        )
                        .await?
                    {
                        return Ok(Inserted {
                            task: row_to_task(&row)?,
                            existing: true,
                            replaced: true,
                        });
                    }
                }
                lifecycle::OnHolder::Release => {
                    // The running holder leaves the unique index; the next
                    // round inserts (or finds whoever took the key first).
                    db.execute(&sql.release_key, &[&holder.id.0]).await?;
                }
            }
        }
        rounds += 1;
        if rounds >= 10 {
            return Err(StoreError::unavailable(format!(
                "unique_key {:?} kept changing hands; try again",
                t.unique_key.clone().unwrap_or_default()
            )));
        }
    };
    let task = row_to_task(&row)?;
    if !parents.is_empty() {
        db.execute(&sql.deps_insert, &[&parents, &task.id.0])
            .await?;
        db.execute(&sql.parents_mark, &[&parents]).await?;
    }
    Ok(Inserted::new(task))
}

/// For an insert whose `unique_states` include finished states: the latest
/// finished holder of its key (within `unique_for`), if any, in which case
/// the row just inserted (`row`) is deleted again. Checked after the insert
/// so it cannot be raced: a holder that was unfinished at the insert either
/// blocked it through the unique index or had finished (committed) before
/// this statement began, and this statement sees it.
async fn finished_holder<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    t: &TaskInsert,
    now: DateTime<Utc>,
    row: &Row,
) -> Result<Option<Task>, StoreError> {
    if t.unique_key.is_none() || t.unique.finished.is_empty() {
        return Ok(None);
    }
    let id: i64 = row.try_get(crate::store::col::ID).map_err(db_err)?;
    let states: Vec<&str> = t.unique.finished.iter().map(|s| s.as_str()).collect();
    let since = lifecycle::holder_since(&t.unique, now);
    let Some(holder) = db
        .query_opt(
            &sql.find_finished,
            &[&t.kind, &t.unique_key, &states, &since, &id],
        )
        .await?
    else {
        return Ok(None);
    };
    db.execute(&sql.undo_insert, &[&id]).await?;
    Ok(Some(row_to_task(&holder)?))
}

/// The round-robin queues, read in the caller's transaction.
pub(super) async fn fair_queues<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
) -> Result<HashSet<String>, StoreError> {
    db.query(&sql.fair_queues, &[])
        .await?
        .iter()
        .map(|r| r.try_get(0).map_err(db_err))
        .collect()
}

/// The fair_seq of each row: `max(vtime, the key's last) + 1` for rows of a
/// round-robin queue (see migration 0022), in row order, `None` for the
/// rest. The keys' rows are locked (in key order) until the transaction
/// ends, so one key's sequence only grows; the virtual time is read
/// without a lock (a claim moving it meanwhile only makes these tasks
/// look a little older, which is fair).
async fn fair_seqs<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    rows: &[TaskInsert],
    fair: &HashSet<String>,
) -> Result<Vec<Option<i64>>, StoreError> {
    let mut out = vec![None; rows.len()];
    if fair.is_empty() {
        return Ok(out);
    }
    let queues: BTreeSet<&str> = rows
        .iter()
        .map(|r| r.queue.as_str())
        .filter(|q| fair.contains(*q))
        .collect();
    for q in queues {
        let vtime: i64 = match db.query_opt(&sql.fair_vtime, &[&q]).await? {
            Some(r) => r.try_get(0).map_err(db_err)?,
            None => 0,
        };
        let key = |r: &TaskInsert| r.concurrency_key.clone().unwrap_or_default();
        let keys: BTreeSet<String> = rows.iter().filter(|r| r.queue == q).map(key).collect();
        let keys: Vec<String> = keys.into_iter().collect();
        let mut last: HashMap<String, i64> = HashMap::new();
        for r in db.query(&sql.fair_keys_lock, &[&q, &keys]).await? {
            last.insert(r.try_get(0).map_err(db_err)?, r.try_get(1).map_err(db_err)?);
        }
        for (i, r) in rows.iter().enumerate().filter(|(_, r)| r.queue == q) {
            let seq = lifecycle::fair_seq(vtime, last.get(&key(r)).copied());
            last.insert(key(r), seq);
            out[i] = Some(seq);
        }
        let (ks, ns): (Vec<String>, Vec<i64>) = last.into_iter().unzip();
        db.execute(&sql.fair_keys_put, &[&q, &ks, &ns]).await?;
    }
    Ok(out)
}

/// The capped queues among `queues` with their caps, each locked for the
/// rest of the transaction: enqueues to one capped queue take turns, so
/// what [`check_caps`] counts after the insert is not raced.
pub(super) async fn lock_caps<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    queues: &[&str],
) -> Result<Vec<(String, u32)>, StoreError> {
    db.query(&sql.caps_lock, &[&queues])
        .await?
        .iter()
        .map(|r| {
            let q: String = r.try_get(0).map_err(db_err)?;
            let cap: i32 = r.try_get(1).map_err(db_err)?;
            Ok((q, u32::try_from(cap).unwrap_or(0)))
        })
        .collect()
}

/// After an insert under [`lock_caps`]: refuse (the caller rolls back)
/// when a queue holds more unfinished tasks than its cap.
pub(super) async fn check_caps<C: GenericClient>(
    db: Db<'_, C>,
    sql: &Sql,
    caps: &[(String, u32)],
) -> Result<(), StoreError> {
    for (queue, cap) in caps {
        let n: i64 = db
            .query_one(&sql.depth_upto, &[queue, &(i64::from(*cap) + 1)])
            .await?
            .try_get(0)
            .map_err(db_err)?;
        if n > i64::from(*cap) {
            return Err(StoreError::QueueFull {
                queue: queue.clone(),
                max_depth: *cap,
            });
        }
    }
    Ok(())
}

/// The distinct queues of `rows`.
pub(super) fn queues_of(rows: &[TaskInsert]) -> Vec<&str> {
    let set: std::collections::BTreeSet<&str> = rows.iter().map(|r| r.queue.as_str()).collect();
    set.into_iter().collect()
}

/// Enqueue `rows` inside the caller's own transaction (or on any client):
/// the tasks exist if and only if that transaction commits, and a NOTIFY
/// sent in the same transaction wakes the nodes on commit.
pub(super) async fn insert_in<C: GenericClient>(
    c: &C,
    schema: &str,
    rows: Vec<TaskInsert>,
    now: DateTime<Utc>,
) -> Result<Vec<Inserted>, StoreError> {
    let sql = Sql::new(schema);
    let db = Db::Caller(c);
    let caps = lock_caps(db, &sql, &queues_of(&rows)).await?;
    let out = insert_rows(db, &sql, rows, now, None).await?;
    check_caps(db, &sql, &caps).await?;
    db.execute("SELECT pg_notify($1, $2)", &[&channel_name(schema), &WORK])
        .await?;
    Ok(out)
}
