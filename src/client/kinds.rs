//! What a client knows about the kinds it enqueues.
//!
//! A kind registered in the client's own registry is known, with its
//! defaults. Any other kind is looked up among the kinds the live nodes
//! declare (`NodeInfo::kinds`, written with every heartbeat), which also
//! gives an insert-only client the defaults the running nodes registered.
//! A kind nobody runs is refused at enqueue, as River does, instead of
//! failing every attempt with "no executor is registered":
//!
//! - a client with a registry of its own (a node's, a pool's) refuses a
//!   kind that neither it nor any live node runs;
//! - an insert-only client (empty registry) refuses it only when some live
//!   node declares its kinds; with no such node (workers not started yet,
//!   or too old to say) it cannot know, and accepts.
//!
//! [`Client::accept_unknown_kinds`](super::Client::accept_unknown_kinds)
//! turns the check off (tasks for workers deployed later).
//!
//! The declared kinds are read from the store at most once per
//! [`REFRESH`] and only when a kind is missing; a std lock guards the copy,
//! never held across an await.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use chrono::Utc;

use crate::registry::{KindDefaults, TaskRegistry};
use crate::store::{DeclaredKind, Store, StoreError};

/// How stale the copy of the live nodes' kinds may be when a kind is missing from it.
pub const REFRESH: Duration = Duration::from_secs(1);

/// A heartbeat older than this does not make its node's kinds known.
const LIVE: Duration = Duration::from_secs(60);

/// The live nodes' kinds: `None` when no live node declares any.
type Declared = Option<BTreeMap<String, DeclaredKind>>;

#[derive(Default)]
pub(crate) struct KnownKinds {
    copy: RwLock<Option<(Instant, Declared)>>,
}

/// Why a kind was refused.
pub(crate) struct Unknown {
    pub kind: String,
    pub known: Vec<String>,
}

impl KnownKinds {
    /// Defaults for each of `kinds` the registry lacks, from the live
    /// nodes; or the first kind nobody runs.
    pub(crate) async fn resolve(
        &self,
        store: &Arc<dyn Store>,
        registry: &TaskRegistry,
        kinds: BTreeSet<&str>,
    ) -> Result<Result<BTreeMap<String, KindDefaults>, Unknown>, StoreError> {
        let missing: Vec<&str> = kinds
            .into_iter()
            .filter(|k| !registry.contains(k))
            .collect();
        if missing.is_empty() {
            return Ok(Ok(BTreeMap::new()));
        }
        let mut declared = self.cached();
        let stale = declared.as_ref().is_none_or(|(at, d)| {
            at.elapsed() >= REFRESH
                && missing
                    .iter()
                    .any(|k| d.as_ref().is_none_or(|d| !d.contains_key(*k)))
        });
        if stale {
            let fresh = read(store).await?;
            if let Ok(mut c) = self.copy.write() {
                *c = Some((Instant::now(), fresh.clone()));
            }
            declared = Some((Instant::now(), fresh));
        }
        let declared = declared.and_then(|(_, d)| d);
        let mut out = BTreeMap::new();
        for k in missing {
            match declared.as_ref().and_then(|d| d.get(k)) {
                Some(d) => {
                    out.insert(k.to_string(), KindDefaults::from_declared(d));
                }
                None if registry.kinds().next().is_none() && declared.is_none() => {}
                None => {
                    let mut known: BTreeSet<String> =
                        registry.kinds().map(str::to_string).collect();
                    known.extend(declared.iter().flat_map(|d| d.keys().cloned()));
                    return Ok(Err(Unknown {
                        kind: k.to_string(),
                        known: known.into_iter().collect(),
                    }));
                }
            }
        }
        Ok(Ok(out))
    }

    fn cached(&self) -> Option<(Instant, Declared)> {
        self.copy.read().ok().and_then(|c| c.clone())
    }
}

/// The kinds the live nodes declare (a node's later registration wins).
async fn read(store: &Arc<dyn Store>) -> Result<Declared, StoreError> {
    let now = Utc::now();
    let live_since = now - chrono::Duration::from_std(LIVE).unwrap_or_default();
    let mut out: Declared = None;
    for n in store.node_list(now).await? {
        if n.heartbeat_at < live_since {
            continue;
        }
        if let Some(kinds) = n.kinds {
            out.get_or_insert_with(BTreeMap::new).extend(kinds);
        }
    }
    Ok(out)
}
