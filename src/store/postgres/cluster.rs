//! The small tables of a PostgreSQL store: paused queues, cron schedules,
//! nodes and the leader lease.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::insert::insert_rows;
use super::statements::{Db, On};
use super::wake::Member;
use super::{ADVISORY_XACT_LOCK, PostgresStore, db_err};
use crate::store::lifecycle;
use crate::store::{
    AuditEntry, FINISHED_COUNT_CAP, Inserted, NodeInfo, QUEUE_COUNT_CAP, ScheduleFire, ScheduleRow,
    StoreError, parse_state, truncate_micros,
};
use crate::task::TaskState;

/// One row of the node list.
fn node_row(r: &tokio_postgres::Row) -> Result<NodeInfo, StoreError> {
    let queues: serde_json::Value = r.try_get(6).map_err(db_err)?;
    let stats: serde_json::Value = r.try_get(8).map_err(db_err)?;
    Ok(NodeInfo {
        name: r.try_get(0).map_err(db_err)?,
        version: r.try_get(1).map_err(db_err)?,
        started_at: r.try_get(2).map_err(db_err)?,
        heartbeat_at: r.try_get(3).map_err(db_err)?,
        workers: r.try_get(4).map_err(db_err)?,
        workers_busy: r.try_get(5).map_err(db_err)?,
        queues: serde_json::from_value(queues).unwrap_or_default(),
        leader: r.try_get(7).map_err(db_err)?,
        stats: serde_json::from_value(stats).unwrap_or_default(),
        instance: r.try_get(9).map_err(db_err)?,
        schedules: r
            .try_get::<_, Option<serde_json::Value>>(10)
            .map_err(db_err)?
            .and_then(|v| serde_json::from_value(v).ok()),
        kinds: r
            .try_get::<_, Option<serde_json::Value>>(11)
            .map_err(db_err)?
            .and_then(|v| serde_json::from_value(v).ok()),
    })
}

impl PostgresStore {
    pub(super) async fn queue_counts(&self) -> Result<Vec<(String, TaskState, i64)>, StoreError> {
        let (_permit, c) = self.read_conn().await?;
        let rows = self
            .query(
                &c,
                &self.inner.sql.queue_counts,
                &[&QUEUE_COUNT_CAP, &FINISHED_COUNT_CAP],
            )
            .await?;
        rows.iter()
            .map(|r| {
                let state: String = r.try_get(1).map_err(db_err)?;
                Ok((
                    r.try_get(0).map_err(db_err)?,
                    parse_state(&state)?,
                    r.try_get(2).map_err(db_err)?,
                ))
            })
            .collect()
    }

    pub(super) async fn queue_oldest_due(
        &self,
        now: DateTime<Utc>,
    ) -> Result<Vec<(String, DateTime<Utc>)>, StoreError> {
        let (_permit, c) = self.read_conn().await?;
        let rows = self
            .query(&c, &self.inner.sql.queue_oldest_due, &[&now])
            .await?;
        let pairs = rows
            .iter()
            .map(|r| Ok((r.try_get(0).map_err(db_err)?, r.try_get(1).map_err(db_err)?)))
            .collect::<Result<Vec<(String, DateTime<Utc>)>, StoreError>>()?;
        Ok(crate::store::earliest_per_queue(pairs))
    }

    pub(super) async fn queue_set_paused(
        &self,
        queue: &str,
        paused: bool,
    ) -> Result<(), StoreError> {
        let c = self.conn().await?;
        self.execute(&c, &self.inner.sql.queue_set_paused, &[&queue, &paused])
            .await?;
        if !paused {
            self.announce_work();
        }
        Ok(())
    }

    pub(super) async fn queue_paused(&self) -> Result<Vec<String>, StoreError> {
        let c = self.conn().await?;
        let rows = self.query(&c, &self.inner.sql.queue_paused, &[]).await?;
        rows.iter().map(|r| r.try_get(0).map_err(db_err)).collect()
    }

    pub(super) async fn schedule_upsert(&self, row: ScheduleRow) -> Result<(), StoreError> {
        let c = self.conn().await?;
        self.execute(
            &c,
            &self.inner.sql.schedule_upsert,
            &[
                &row.name,
                &row.spec,
                &row.source,
                &truncate_micros(row.last_tick),
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn schedule_delete(&self, name: &str) -> Result<bool, StoreError> {
        let c = self.conn().await?;
        let n = self
            .execute(&c, &self.inner.sql.schedule_delete, &[&name])
            .await?;
        Ok(n > 0)
    }

    pub(super) async fn schedule_set_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<bool, StoreError> {
        let c = self.conn().await?;
        let n = self
            .execute(&c, &self.inner.sql.schedule_set_paused, &[&paused, &name])
            .await?;
        Ok(n > 0)
    }

    pub(super) async fn schedule_list(&self) -> Result<Vec<ScheduleRow>, StoreError> {
        let c = self.conn().await?;
        let rows = self.query(&c, &self.inner.sql.schedule_list, &[]).await?;
        rows.iter()
            .map(|r| {
                Ok(ScheduleRow {
                    name: r.try_get(0).map_err(db_err)?,
                    spec: r.try_get(1).map_err(db_err)?,
                    source: r.try_get(2).map_err(db_err)?,
                    last_tick: r.try_get(3).map_err(db_err)?,
                    paused: r.try_get(4).map_err(db_err)?,
                })
            })
            .collect()
    }

    pub(super) async fn schedule_fire(
        &self,
        f: ScheduleFire,
    ) -> Result<Option<Vec<Inserted>>, StoreError> {
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        let moved = self
            .execute(
                &tx,
                &self.inner.sql.schedule_move,
                &[
                    &truncate_micros(f.new_last),
                    &f.name,
                    &truncate_micros(f.expected),
                ],
            )
            .await?;
        if moved == 0 {
            return Ok(None);
        }
        let db = Db::store(&tx, &self.inner.stmts);
        let caps =
            super::insert::lock_caps(db, &self.inner.sql, &super::insert::queues_of(&f.tasks))
                .await?;
        let out = insert_rows(db, &self.inner.sql, f.tasks, f.now, None).await?;
        super::insert::check_caps(db, &self.inner.sql, &caps).await?;
        tx.commit().await.map_err(db_err)?;
        self.announce_new(&out);
        self.announce_due(crate::store::due_later(&out));
        Ok(Some(out))
    }

    /// Write `n`'s row (its heartbeat in the database's time: `offset` is
    /// the database's clock minus ours, read before taking `on`, so one call
    /// never holds two connections); with `only_own`, only while the name is
    /// unheld or held by `n.instance`.
    async fn write_node(
        &self,
        on: On<'_>,
        n: &NodeInfo,
        offset: chrono::Duration,
        only_own: bool,
    ) -> Result<bool, StoreError> {
        let queues = serde_json::to_value(&n.queues)
            .map_err(|e| StoreError::invalid_value(e.to_string()))?;
        let stats =
            serde_json::to_value(n.stats).map_err(|e| StoreError::invalid_value(e.to_string()))?;
        let schedules: Option<serde_json::Value> = n
            .schedules
            .as_ref()
            .and_then(|v| serde_json::to_value(v).ok());
        let kinds: Option<serde_json::Value> =
            n.kinds.as_ref().and_then(|v| serde_json::to_value(v).ok());
        let sql = if only_own {
            &self.inner.sql.heartbeat
        } else {
            &self.inner.sql.node_take
        };
        let at = truncate_micros(n.heartbeat_at + offset);
        let row = self
            .query_opt(
                on,
                sql,
                &[
                    &n.name,
                    &n.version,
                    &n.started_at,
                    &at,
                    &n.workers,
                    &n.workers_busy,
                    &queues,
                    &stats,
                    &n.instance,
                    &schedules,
                    &kinds,
                ],
            )
            .await?;
        Ok(row.is_some())
    }

    /// Heartbeats go on the listening connection while it is up (see
    /// `notify::BeatConn`): no claim, completion or page holds it, so a
    /// heartbeat never queues behind them for a pooled connection. With a
    /// hundred nodes draining one queue, heartbeats queued that way aged
    /// past 17 s. Without it (connection down, or transaction pooling with
    /// no `listen_url`) they take a pooled one.
    pub(super) async fn node_heartbeat(&self, n: NodeInfo) -> Result<bool, StoreError> {
        let listening = self.inner.beat.get();
        let pooled;
        let c: On = match &listening {
            Some(l) => (&**l).into(),
            None => {
                pooled = self.conn().await?;
                (&pooled).into()
            }
        };
        let offset = self.clock_offset_on(c).await?;
        let own = self.write_node(c, &n, offset, true).await?;
        self.inner.members.beat(&n.name);
        if own && self.inner.members.stale() {
            // Whom new work wakes (see wake.rs): the nodes whose heartbeat
            // is recent, read at most every few seconds.
            let since = n.heartbeat_at + offset
                - chrono::Duration::from_std(self.inner.members.live_window()).unwrap_or_default();
            let rows = self
                .query(c, &self.inner.sql.node_list, &[&(Utc::now() + offset)])
                .await?;
            let members = rows
                .iter()
                .map(node_row)
                .filter_map(Result::ok)
                .filter(|m| m.heartbeat_at >= since)
                .map(|m| Member {
                    free: i64::from(m.workers) - i64::from(m.workers_busy),
                    name: m.name,
                    queues: m.queues,
                })
                .collect();
            self.inner.members.replace(members);
        }
        Ok(own)
    }

    pub(super) async fn node_register(
        &self,
        n: NodeInfo,
        live_since: DateTime<Utc>,
        take_from: Option<String>,
    ) -> Result<Option<NodeInfo>, StoreError> {
        let offset = self.clock_offset().await?;
        let live_since = live_since + offset;
        let mut c = self.conn().await?;
        let tx = c.transaction().await.map_err(db_err)?;
        // Nodes starting under one name at once: one at a time here.
        self.execute(
            &tx,
            ADVISORY_XACT_LOCK,
            &[&format!(
                "proto_tasker_node:{}:{}",
                self.inner.schema, n.name
            )],
        )
        .await?;
        let rows = self
            .query(&tx, &self.inner.sql.node_list, &[&Utc::now()])
            .await?;
        let holder = rows
            .iter()
            .map(node_row)
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .find(|h| h.name == n.name);
        if let Some(mut h) = holder
            && lifecycle::name_held_by_other(&h, &n, live_since, take_from.as_deref())
        {
            h.heartbeat_at -= offset;
            return Ok(Some(h));
        }
        self.write_node((&tx).into(), &n, offset, false).await?;
        tx.commit().await.map_err(db_err)?;
        Ok(None)
    }

    pub(super) async fn node_remove(&self, name: &str) -> Result<(), StoreError> {
        let c = self.conn().await?;
        self.execute(&c, &self.inner.sql.node_remove, &[&name])
            .await?;
        self.execute(&c, &self.inner.sql.leader_remove, &[&name])
            .await?;
        Ok(())
    }

    pub(super) async fn node_list(&self, now: DateTime<Utc>) -> Result<Vec<NodeInfo>, StoreError> {
        // Heartbeats are kept in the database's time and shown in ours.
        let offset = self.clock_offset().await?;
        let c = self.conn().await?;
        let rows = self
            .query(&c, &self.inner.sql.node_list, &[&(now + offset)])
            .await?;
        rows.iter()
            .map(|r| {
                let mut n = node_row(r)?;
                n.heartbeat_at -= offset;
                Ok(n)
            })
            .collect()
    }

    pub(super) async fn leader_try_elect(
        &self,
        node: &str,
        ttl: Duration,
        now: DateTime<Utc>,
    ) -> Result<bool, StoreError> {
        let now = self.db_time(now).await?;
        let expires = now + chrono::Duration::from_std(ttl).unwrap_or_default();
        let c = self.conn().await?;
        let row = self
            .query_opt(&c, &self.inner.sql.elect, &[&node, &expires, &now])
            .await?;
        Ok(row.and_then(|r| r.try_get::<_, String>(0).ok()).as_deref() == Some(node))
    }

    pub(super) async fn leader_resign(&self, node: &str) -> Result<(), StoreError> {
        let c = self.conn().await?;
        self.execute(&c, &self.inner.sql.leader_remove, &[&node])
            .await?;
        Ok(())
    }

    pub(super) async fn audit_append(&self, e: AuditEntry) -> Result<(), StoreError> {
        let c = self.conn().await?;
        self.execute(
            &c,
            &self.inner.sql.audit_append,
            &[
                &truncate_micros(e.at),
                &e.token,
                &e.remote,
                &e.action,
                &e.target,
                &e.status,
                &e.outcome,
            ],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn audit_list(
        &self,
        before: Option<i64>,
        limit: usize,
    ) -> Result<Vec<AuditEntry>, StoreError> {
        let (_permit, c) = self.read_conn().await?;
        let rows = self
            .query(
                &c,
                &self.inner.sql.audit_list,
                &[&before.unwrap_or(i64::MAX), &(limit.max(1) as i64)],
            )
            .await?;
        rows.iter()
            .map(|r| {
                Ok(AuditEntry {
                    id: r.try_get(0).map_err(db_err)?,
                    at: r.try_get(1).map_err(db_err)?,
                    token: r.try_get(2).map_err(db_err)?,
                    remote: r.try_get(3).map_err(db_err)?,
                    action: r.try_get(4).map_err(db_err)?,
                    target: r.try_get(5).map_err(db_err)?,
                    status: r.try_get(6).map_err(db_err)?,
                    outcome: r.try_get(7).map_err(db_err)?,
                })
            })
            .collect()
    }
}
