//! Which nodes a "new work" NOTIFY wakes.
//!
//! Every node LISTENs on one channel, so a NOTIFY reaches all of them. Were
//! each to claim on every one, fifty nodes would run fifty claims for one
//! new task, forty-nine finding nothing. Instead an insert announces, per
//! queue, how many tasks it made and a random nonce; each listener knows the
//! live nodes serving that queue (names sorted, free worker slots as of their
//! last heartbeat) and wakes only if it is among the first nodes of that list,
//! rotated by the nonce, whose free slots cover the new tasks, plus one spare.
//! Every listener computes the same choice from the same table, so the
//! chosen nodes wake without talking to each other; the rotation spreads
//! wake-ups over all of them.
//!
//! What it may cost: a chosen node that has filled up since its last
//! heartbeat claims less than counted, and the rest of the tasks wait for a
//! node's next poll (`pool.poll_interval`) or next freed worker. A node that
//! does not know the membership yet (before its first heartbeat), or a
//! payload without counts (`insert_in`, retries, unblocked dependents,
//! resumed queues), wakes every node, as before.
//!
//! Invariant: the membership is written only by this store's heartbeat path
//! (`node_heartbeat`, `node_register`) and read by its listener; a std lock,
//! held only to copy or replace it, never across an await.

use std::sync::RwLock;
use std::time::{Duration, Instant};

/// The membership is read again at most this often (on a heartbeat).
const REFRESH: Duration = Duration::from_secs(5);

/// Nodes woken beyond those whose free slots cover the new tasks.
const SPARE: usize = 1;

/// One live node, as its last heartbeat described it.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Member {
    pub name: String,
    pub queues: Vec<String>,
    pub free: i64,
}

#[derive(Default)]
struct State {
    me: Option<String>,
    /// Sorted by name.
    members: Vec<Member>,
    refreshed: Option<Instant>,
    last_beat: Option<Instant>,
    beat_gap: Option<Duration>,
}

#[derive(Default)]
pub(super) struct Membership(RwLock<State>);

impl Membership {
    /// This store serves node `name`; called on each of its heartbeats.
    pub(super) fn beat(&self, name: &str) {
        if let Ok(mut s) = self.0.write() {
            if s.me.as_deref() != Some(name) {
                s.me = Some(name.to_string());
            }
            let now = Instant::now();
            if let Some(last) = s.last_beat {
                s.beat_gap = Some(now - last);
            }
            s.last_beat = Some(now);
        }
    }

    /// Is the list due to be read again?
    pub(super) fn stale(&self) -> bool {
        self.0
            .read()
            .map(|s| s.refreshed.is_none_or(|at| at.elapsed() >= REFRESH))
            .unwrap_or(true)
    }

    /// How old a heartbeat may be for its node to count as live: three of
    /// this node's own heartbeat gaps (nodes of a cluster share settings),
    /// between 1 s and 60 s.
    pub(super) fn live_window(&self) -> Duration {
        let gap = self.0.read().ok().and_then(|s| s.beat_gap);
        (gap.unwrap_or(Duration::from_secs(5)) * 3)
            .clamp(Duration::from_secs(1), Duration::from_secs(60))
    }

    pub(super) fn replace(&self, mut members: Vec<Member>) {
        members.sort_by(|a, b| a.name.cmp(&b.name));
        if let Ok(mut s) = self.0.write() {
            s.members = members;
            s.refreshed = Some(Instant::now());
        }
    }

    /// Should this node wake for `n` new tasks of `queue` announced with `nonce`?
    pub(super) fn should_wake(&self, queue: &str, n: usize, nonce: u64) -> bool {
        let Ok(s) = self.0.read() else { return true };
        let Some(me) = s.me.as_deref() else {
            return true;
        };
        if !s.members.iter().any(|m| m.name == me) {
            // Not in the list yet: not known to the others either.
            return true;
        }
        let serving: Vec<&Member> = s
            .members
            .iter()
            .filter(|m| m.queues.iter().any(|q| q == queue))
            .collect();
        chosen(&serving, n, nonce).contains(&me)
    }
}

/// The nodes of `serving` (sorted by name) that wake for `n` new tasks:
/// from the nonce's place in the list, as many as it takes for their free
/// slots to cover `n`, plus [`SPARE`].
fn chosen<'a>(serving: &[&'a Member], n: usize, nonce: u64) -> Vec<&'a str> {
    let len = serving.len();
    if len == 0 {
        return Vec::new();
    }
    let start = (nonce % len as u64) as usize;
    let mut out = Vec::new();
    let mut covered = 0i64;
    let mut spare = 0;
    for i in 0..len {
        let m = serving[(start + i) % len];
        out.push(m.name.as_str());
        if covered >= n as i64 {
            spare += 1;
            if spare >= SPARE {
                break;
            }
        }
        covered += m.free.max(0);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn members(n: usize, free: i64) -> Vec<Member> {
        (0..n)
            .map(|i| Member {
                name: format!("n{i:02}"),
                queues: vec!["q".into()],
                free,
            })
            .collect()
    }

    #[test]
    fn one_task_wakes_one_node_and_a_spare() {
        let m = members(50, 10);
        let refs: Vec<&Member> = m.iter().collect();
        for nonce in [0, 7, 49, 12345] {
            let c = chosen(&refs, 1, nonce);
            assert_eq!(c.len(), 1 + SPARE, "{c:?}");
        }
        // 100 tasks over nodes with 10 free slots each: ten nodes and a spare.
        assert_eq!(chosen(&refs, 100, 3).len(), 10 + SPARE);
        // More than everyone can take: everyone.
        assert_eq!(chosen(&refs, 10_000, 3).len(), 50);
    }

    #[test]
    fn busy_nodes_are_passed_over_and_the_choice_rotates() {
        let mut m = members(4, 0);
        m[2].free = 5;
        let refs: Vec<&Member> = m.iter().collect();
        let c = chosen(&refs, 3, 0);
        assert_eq!(
            c,
            vec!["n00", "n01", "n02", "n03"],
            "walks to the free node, plus a spare"
        );
        let firsts: std::collections::HashSet<&str> =
            (0..4).map(|nonce| chosen(&refs, 0, nonce)[0]).collect();
        assert_eq!(firsts.len(), 4, "each nonce starts elsewhere");
    }

    #[test]
    fn every_node_agrees_on_who_wakes() {
        let all = members(20, 10);
        let woken: usize = (0..20)
            .filter(|i| {
                let me = Membership::default();
                me.beat(&format!("n{i:02}"));
                me.replace(all.clone());
                me.should_wake("q", 15, 99)
            })
            .count();
        assert_eq!(woken, 2 + SPARE);
        let other = Membership::default();
        other.beat("n03");
        other.replace(all.clone());
        assert!(
            !other.should_wake("another queue", 5, 1),
            "serves no such queue"
        );
        let newcomer = Membership::default();
        newcomer.beat("n99");
        newcomer.replace(all);
        assert!(newcomer.should_wake("q", 1, 1), "not listed yet: wakes");
    }
}
