//! Services that keep the cluster's data in order, one file each.
//!
//! # Overview
//!
//! - `cron_firer.rs`: fires due cron schedules (leader only).
//! - `retention.rs`: deletes finished tasks past their retention (leader only).
//! - `rescue.rs`: puts back the running tasks of dead nodes (every node;
//!   the store's conditional update makes racing rescuers rescue a task once).
//!
//! The [`Sentinel`](crate::Sentinel) elects the leader and drives retention
//! and rescue on its heartbeat; the pool starts the cron firer. None of them
//! knows about the pool: they get the store, the [`Leadership`] flag and a
//! stop token.

pub(crate) mod cron_firer;
pub mod rescue;
pub mod retention;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

pub use retention::Retention;

/// Whether this node leads the cluster now. Written by the Sentinel alone
/// (after each election); read by the leader-only services. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct Leadership(Arc<AtomicBool>);

impl Leadership {
    pub fn is_leader(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }

    /// Record the outcome of an election; returns the previous value.
    pub(crate) fn set(&self, leader: bool) -> bool {
        self.0.swap(leader, Ordering::AcqRel)
    }
}
