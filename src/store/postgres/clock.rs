//! Liveness and leases in the database's time: every node writes its
//! heartbeats and leases, and compares them, on PostgreSQL's clock, so a node
//! whose own clock is off by any amount is neither taken for dead nor able to
//! hold a lease longer.

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::statements::On;
use super::{PostgresStore, db_err};
use crate::store::StoreError;

/// How often the database's clock is read again.
const CLOCK_REFRESH: Duration = Duration::from_secs(10);

impl PostgresStore {
    /// `t` (this process's clock) in the database's time. Liveness and
    /// leases are judged by the database's clock: every node writes its
    /// heartbeats and leases, and compares them, in database time, so a node
    /// whose own clock is off by any amount is neither taken for dead nor
    /// able to hold a lease longer. The offset is read (half a round trip
    /// corrected) at most every [`CLOCK_REFRESH`].
    pub(super) async fn db_time(&self, t: DateTime<Utc>) -> Result<DateTime<Utc>, StoreError> {
        Ok(t + self.clock_offset().await?)
    }

    /// The database's clock minus this process's (see [`Self::db_time`]).
    pub(super) async fn clock_offset(&self) -> Result<chrono::Duration, StoreError> {
        match self.cached_clock() {
            Some(offset) => Ok(offset),
            None => {
                let c = self.conn().await?;
                self.measure_clock((&c).into()).await
            }
        }
    }

    /// [`Self::clock_offset`], read on `on` when the cached offset is stale
    /// (for heartbeats, which never wait for a pooled connection).
    pub(super) async fn clock_offset_on(&self, on: On<'_>) -> Result<chrono::Duration, StoreError> {
        match self.cached_clock() {
            Some(offset) => Ok(offset),
            None => self.measure_clock(on).await,
        }
    }

    fn cached_clock(&self) -> Option<chrono::Duration> {
        self.inner
            .clock
            .lock()
            .ok()
            .and_then(|c| *c)
            .filter(|(_, at)| at.elapsed() < CLOCK_REFRESH)
            .map(|(offset, _)| offset)
    }

    /// Read the database's clock on `on` and remember the offset.
    async fn measure_clock(&self, on: On<'_>) -> Result<chrono::Duration, StoreError> {
        let before = Utc::now();
        let row = self.query_one(on, "SELECT clock_timestamp()", &[]).await?;
        let after = Utc::now();
        let db: DateTime<Utc> = row.try_get(0).map_err(db_err)?;
        // Whole microseconds, the precision the store keeps, so a time
        // written and read back comes back unchanged.
        let offset = chrono::Duration::microseconds(
            (db - (before + (after - before) / 2))
                .num_microseconds()
                .unwrap_or(0),
        );
        if let Ok(mut c) = self.inner.clock.lock() {
            *c = Some((offset, std::time::Instant::now()));
        }
        Ok(offset)
    }
}
