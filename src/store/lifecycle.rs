//! The task life cycle as data, written once for every store.
//!
//! # Overview
//!
//! Each store speaks its own SQL dialect, but the rules it applies are the
//! same and live here: which states a claim takes and in what order, what
//! each [`Outcome`] turns a running task into, when a cancel or a retry by
//! hand is allowed (and the words of the refusal), how the parents of a new
//! workflow task decide its first state, and the messages written into a
//! task's error list. A store turns a [`Transition`] into its own statement;
//! it never decides a state on its own.
//!
//! See `docs/state_machine.md` for the picture.

use std::borrow::Cow;

use chrono::{DateTime, Utc};

use super::{Completion, Outcome, Rescued, StoreError};
use crate::task::{AttemptError, Dependency, OnDependencyFailure, Task, TaskId, TaskState};

/// The states a claim takes tasks from (when their `run_at` is due).
pub const CLAIMABLE: [TaskState; 3] = [
    TaskState::Available,
    TaskState::Scheduled,
    TaskState::Retryable,
];

/// The finished states: a task in one of them never runs again unless retried by hand.
pub const FINISHED: [TaskState; 3] = [
    TaskState::Completed,
    TaskState::Failed,
    TaskState::Cancelled,
];

/// The states of a unique-key holder that an `on_conflict: replace` insert
/// updates in place (it has not started, or waits to run again).
pub const REPLACEABLE: [TaskState; 4] = [
    TaskState::Scheduled,
    TaskState::Available,
    TaskState::Retryable,
    TaskState::Blocked,
];

/// What an insert with a unique key does about the holder it found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnHolder {
    /// Return the holder; insert nothing.
    Keep,
    /// Refuse the insert ([`StoreError::Duplicate`]).
    Refuse,
    /// Update the holder in place with the insert's args, run_at, priority.
    Replace,
    /// The holder is running: it gives its key up and the insert goes in.
    Release,
}

/// The rule for a holder in `holder` state (found by an insert with
/// `rules`): written once for both stores.
pub fn on_holder(rules: &super::UniqueRules, holder: TaskState) -> OnHolder {
    use crate::task::OnConflict;
    match rules.on_conflict {
        OnConflict::Keep => OnHolder::Keep,
        OnConflict::Error => OnHolder::Refuse,
        OnConflict::Replace if REPLACEABLE.contains(&holder) => OnHolder::Replace,
        OnConflict::Replace if holder == TaskState::Running => OnHolder::Release,
        // A finished holder (unique_states) is kept: it already ran.
        OnConflict::Replace => OnHolder::Keep,
    }
}

/// The earliest `finished_at` of a finished holder that still counts for
/// an insert at `now` (`None`: any, however old).
pub fn holder_since(rules: &super::UniqueRules, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
    rules
        .for_ms
        .map(|ms| now - chrono::Duration::milliseconds(ms.max(0)))
}

/// The refusal of an `on_conflict: error` insert whose key `holder` holds.
pub fn duplicate(holder: &Task) -> StoreError {
    StoreError::Duplicate {
        kind: holder.kind.clone(),
        unique_key: holder.unique_key.clone().unwrap_or_default(),
        id: holder.id,
        state: holder.state,
    }
}

/// The fair_seq of a new task of a round-robin queue (start-time fair
/// queueing): one past the later of the queue's virtual time (the largest
/// fair_seq claimed) and its key's last fair_seq. A key with a long backlog
/// keeps its place at the back; a key new to the queue starts at the front.
pub fn fair_seq(vtime: i64, key_last: Option<i64>) -> i64 {
    vtime.max(key_last.unwrap_or(0)).saturating_add(1)
}

/// The order claims take due tasks in: most urgent first.
pub const CLAIM_ORDER: &str = "priority, run_at, id";

/// States as an SQL list, `'available', 'scheduled', 'retryable'`, for
/// `state IN (...)`: both dialects quote strings alike.
pub fn sql_states(states: &[TaskState]) -> String {
    states
        .iter()
        .map(|s| format!("'{}'", s.as_str()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a rescued task's error says after `'node ' || node`: the stores
/// splice the node's name in SQL, where they select the tasks to rescue.
pub const RESCUED_SUFFIX: &str = " stopped while running the task; rescued";

/// The error written on a task that will never run because a task it
/// depends on failed or was cancelled (at insert or later, by cascade).
pub const DEPENDENCY_FAILED: &str = "a task it depends on did not complete";

/// The longest error message a task keeps; a longer one keeps its start
/// and says how much was cut.
pub const MAX_ERROR_BYTES: usize = 16 << 10;

/// The character NUL becomes in anything a store keeps: PostgreSQL's text
/// and jsonb refuse NUL, and both stores must keep the same value.
pub const NUL_REPLACEMENT: char = '\u{FFFD}';

/// `s` as every store can keep it: NUL replaced (invalid UTF-8 was already
/// replaced when the bytes became a string), at most `max` bytes.
pub fn storable_text(s: &str, max: usize) -> Cow<'_, str> {
    let mut out = if s.contains('\0') {
        Cow::Owned(s.replace('\0', &NUL_REPLACEMENT.to_string()))
    } else {
        Cow::Borrowed(s)
    };
    if out.len() > max {
        let mut cut = max;
        while !out.is_char_boundary(cut) {
            cut -= 1;
        }
        let total = out.len();
        out = Cow::Owned(format!(
            "{}... ({} of {total} bytes kept)",
            &out[..cut],
            cut
        ));
    }
    out
}

/// Whether any string or key of `v` holds a NUL (no allocation).
pub fn has_nul(v: &serde_json::Value) -> bool {
    match v {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(a) => a.iter().any(has_nul),
        serde_json::Value::Object(o) => o.iter().any(|(k, v)| k.contains('\0') || has_nul(v)),
        _ => false,
    }
}

/// `v` as every store can keep it: NUL replaced in every string and key.
pub fn storable_value(v: &serde_json::Value) -> Cow<'_, serde_json::Value> {
    fn clean(v: &serde_json::Value) -> serde_json::Value {
        let text = |s: &str| storable_text(s, usize::MAX).into_owned();
        match v {
            serde_json::Value::String(s) => serde_json::Value::String(text(s)),
            serde_json::Value::Array(a) => a.iter().map(clean).collect(),
            serde_json::Value::Object(o) => o.iter().map(|(k, v)| (text(k), clean(v))).collect(),
            other => other.clone(),
        }
    }
    if has_nul(v) {
        Cow::Owned(clean(v))
    } else {
        Cow::Borrowed(v)
    }
}

/// Does `target` contain `query`, as PostgreSQL's `jsonb @>` decides it?
/// (Objects: every key of `query` is in `target` with a contained value;
/// arrays: every element of `query` is contained by some element of
/// `target`; anything else: equal, numbers by value, so `1` and `1.0`
/// are equal.) PostgreSQL filters task args with `@>` itself; SQLite
/// calls this, so both stores find the same tasks.
pub fn json_contains(target: &serde_json::Value, query: &serde_json::Value) -> bool {
    use serde_json::Value as V;
    match (target, query) {
        (V::Object(t), V::Object(q)) => q
            .iter()
            .all(|(k, qv)| t.get(k).is_some_and(|tv| json_contains(tv, qv))),
        (V::Array(t), V::Array(q)) => q.iter().all(|qv| t.iter().any(|tv| json_contains(tv, qv))),
        (V::Number(a), V::Number(b)) => match (a.as_i64(), b.as_i64(), a.as_u64(), b.as_u64()) {
            (Some(x), Some(y), _, _) => x == y,
            (_, _, Some(x), Some(y)) => x == y,
            _ => a.as_f64() == b.as_f64(),
        },
        (V::String(a), V::String(b)) => a == b,
        (V::Bool(a), V::Bool(b)) => a == b,
        (V::Null, V::Null) => true,
        _ => false,
    }
}

/// What an outcome does to its task: the one place that maps outcomes to states.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition<'a> {
    /// The task's next state.
    pub state: TaskState,
    /// Set `finished_at` to the outcome's time (final states).
    pub finished: bool,
    /// The result to keep (completed tasks only), made storable.
    pub result: Option<Cow<'a, serde_json::Value>>,
    /// The new `run_at`; `None` keeps the task's own.
    pub run_at: Option<DateTime<Utc>>,
    /// An entry to append to the task's error list.
    pub error: Option<AttemptError>,
    /// Added to `attempt`: -1 gives the attempt back (snooze, release).
    pub attempt_delta: i32,
    /// What the task's dependents do now.
    pub dependents: Dependents,
    /// Cancel is final: when the task was asked to stop, this transition is
    /// replaced by [`Transition::cancelled`] (it would make the task runnable).
    pub yields_to_cancel: bool,
}

impl Transition<'_> {
    /// What an outcome that [`yields_to_cancel`](Transition::yields_to_cancel)
    /// becomes when the task was asked to stop: cancelled, the attempt kept.
    pub fn cancelled(c: &Completion) -> AttemptError {
        AttemptError {
            attempt: c.attempt,
            at: c.at,
            message: format!(
                "cancelled while running (the attempt ended as {})",
                transition(c).state
            ),
        }
    }
}

/// What a task's outcome means for the tasks blocked on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dependents {
    /// Nothing yet (the task runs again).
    Wait,
    /// The task completed: its children wait for one parent fewer.
    Unblock,
    /// The task failed or was cancelled: its children end per their policy.
    Cascade,
}

impl Dependents {
    /// What a task that reached `state` does to its dependents.
    pub fn of(state: TaskState) -> Dependents {
        match state {
            TaskState::Completed => Dependents::Unblock,
            TaskState::Failed | TaskState::Cancelled => Dependents::Cascade,
            _ => Dependents::Wait,
        }
    }
}

/// The transition `c` asks for. Stores apply it only to a task that is
/// still `running` under `c.attempt` (fencing).
pub fn transition(c: &Completion) -> Transition<'_> {
    let error = |message: &str| {
        Some(AttemptError {
            attempt: c.attempt,
            at: c.at,
            message: storable_text(message, MAX_ERROR_BYTES).into_owned(),
        })
    };
    let (state, result, run_at, error, attempt_delta) = match &c.outcome {
        Outcome::Completed { result } => (
            TaskState::Completed,
            Some(storable_value(result)),
            None,
            None,
            0,
        ),
        Outcome::Retry { run_at, error: e } => {
            (TaskState::Retryable, None, Some(*run_at), error(e), 0)
        }
        Outcome::Failed { error: e } => (TaskState::Failed, None, None, error(e), 0),
        Outcome::Cancelled { error: e } => (TaskState::Cancelled, None, None, error(e), 0),
        Outcome::Snoozed { run_at } => (TaskState::Scheduled, None, Some(*run_at), None, -1),
        Outcome::Released => (TaskState::Available, None, Some(c.at), None, -1),
    };
    Transition {
        state,
        finished: state.is_finished(),
        result,
        run_at,
        error,
        attempt_delta,
        dependents: Dependents::of(state),
        yields_to_cancel: matches!(
            state,
            TaskState::Available | TaskState::Scheduled | TaskState::Retryable
        ),
    }
}

/// One completion per task in a batch: true for the first one queued for
/// its task. A second outcome for the same task (a slot's own outcome after
/// shutdown already released it) is refused like a fenced one.
pub fn first_per_task(completions: &[Completion]) -> Vec<bool> {
    let mut seen = std::collections::HashSet::with_capacity(completions.len());
    completions.iter().map(|c| seen.insert(c.id)).collect()
}

/// The latest instant a store keeps (the end of year 9999).
pub fn max_instant() -> DateTime<Utc> {
    DateTime::<Utc>::from_timestamp(253_402_300_799, 0).unwrap_or(DateTime::<Utc>::MAX_UTC)
}

/// `now + d`, saturating at [`max_instant`]: a snooze or backoff of any
/// size gives a time every store can keep, never an overflow.
pub fn after(now: DateTime<Utc>, d: std::time::Duration) -> DateTime<Utc> {
    chrono::Duration::from_std(d)
        .ok()
        .and_then(|d| now.checked_add_signed(d))
        .map_or_else(max_instant, |t| t.min(max_instant()))
}

/// Whether outcomes make due work appear at once (producers should look now).
pub fn wakes_producers(c: &Completion) -> bool {
    matches!(c.outcome, Outcome::Released)
}

/// What a cancel does to a task in its current state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelAction {
    /// Running: mark it and tell its node, which ends it.
    RequestStop,
    /// Not started: cancelled at once (and its dependents cascade).
    CancelNow,
}

/// May `task` be cancelled, and how? Finished tasks cannot.
pub fn cancel_action(task: &Task) -> Result<CancelAction, StoreError> {
    if task.state.is_finished() {
        return Err(StoreError::Conflict {
            id: task.id,
            state: task.state,
            message: "a finished task cannot be cancelled".into(),
        });
    }
    Ok(if task.state == TaskState::Running {
        CancelAction::RequestStop
    } else {
        CancelAction::CancelNow
    })
}

/// May `task` be retried by hand? Only failed or cancelled tasks can; the
/// retry makes it `available` now, with one more attempt if it had none left.
pub fn check_retry(task: &Task) -> Result<(), StoreError> {
    if matches!(task.state, TaskState::Failed | TaskState::Cancelled) {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            id: task.id,
            state: task.state,
            message: "only failed or cancelled tasks can be retried".into(),
        })
    }
}

/// Where a retry by hand puts a task, from its parents as they stand now
/// (parents already pruned count as completed): `blocked` while some have
/// not completed, `available` otherwise. A parent that failed or was
/// cancelled is a conflict: retry that one first.
pub fn retry_state(task: &Task, parents: ParentStates) -> Result<TaskState, StoreError> {
    if let Some(p) = parents.broken {
        return Err(StoreError::Conflict {
            id: task.id,
            state: task.state,
            message: format!("task {p}, which it depends on, did not complete; retry it first"),
        });
    }
    Ok(if parents.pending > 0 {
        TaskState::Blocked
    } else {
        TaskState::Available
    })
}

/// Does `holder` keep `node`'s name from it at start? Yes while it is
/// another instance whose heartbeat is at or after `live_since`, unless it
/// is `take_from` (an instance known to be dead).
pub fn name_held_by_other(
    holder: &super::NodeInfo,
    node: &super::NodeInfo,
    live_since: DateTime<Utc>,
    take_from: Option<&str>,
) -> bool {
    !holder.instance.is_empty()
        && holder.instance != node.instance
        && Some(holder.instance.as_str()) != take_from
        && holder.heartbeat_at >= live_since
}

/// The rescued tasks that ended (no attempt left, or asked to stop): their
/// dependents cascade, and they are announced as finished.
pub fn rescue_ended(rescued: &[Rescued]) -> Vec<i64> {
    rescued
        .iter()
        .filter(|r| Dependents::of(r.state) == Dependents::Cascade)
        .map(|r| r.id.0)
        .collect()
}

/// The refusal of a retry whose task's `unique_key` another unfinished task holds.
pub fn unique_conflict(task: &Task) -> StoreError {
    StoreError::Conflict {
        id: task.id,
        state: task.state,
        message: format!(
            "another unfinished task of kind {:?} holds unique_key {:?}",
            task.kind,
            task.unique_key.clone().unwrap_or_default()
        ),
    }
}

/// The parents of a new task, in order and without repeats: existing tasks,
/// or earlier rows of the same insert (`batch(j)` gives row `j`'s id once
/// it is written).
pub fn parent_ids(
    deps: &[Dependency],
    batch: impl Fn(usize) -> Option<TaskId>,
) -> Result<Vec<TaskId>, StoreError> {
    let mut parents: Vec<TaskId> = Vec::with_capacity(deps.len());
    let mut seen = std::collections::HashSet::with_capacity(deps.len());
    for d in deps {
        let id = match *d {
            Dependency::Task(id) => id,
            Dependency::Batch(j) => batch(j).ok_or_else(|| {
                StoreError::invalid("depends_on", format!("batch task {j} comes later"))
            })?,
        };
        // Linear in the number of parents (a Vec::contains was quadratic).
        if seen.insert(id) {
            parents.push(id);
        }
    }
    Ok(parents)
}

/// How the parents of a new task stand.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ParentStates {
    /// A parent that already failed or was cancelled.
    pub broken: Option<TaskId>,
    /// Parents not yet completed.
    pub pending: i32,
}

/// Classify the parents of a new task from their states (`None`: no such task).
pub fn classify_parents(
    parents: &[TaskId],
    state_of: impl Fn(TaskId) -> Option<TaskState>,
) -> Result<ParentStates, StoreError> {
    let mut out = ParentStates::default();
    for &p in parents {
        match state_of(p) {
            None => {
                return Err(StoreError::invalid(
                    "depends_on",
                    format!("task {p} does not exist"),
                ));
            }
            Some(TaskState::Completed) => {}
            Some(TaskState::Failed | TaskState::Cancelled) => out.broken = Some(p),
            Some(_) => out.pending += 1,
        }
    }
    Ok(out)
}

/// Set a new task's state from its parents: with a broken parent it never
/// runs (cancelled or failed, per its policy); with pending ones it waits
/// (`blocked`); otherwise it keeps the state its `run_at` gave it.
pub fn apply_parents(
    task: &mut Task,
    policy: OnDependencyFailure,
    parents: ParentStates,
    now: DateTime<Utc>,
) {
    if parents.broken.is_some() {
        task.state = match policy {
            OnDependencyFailure::Cancel => TaskState::Cancelled,
            OnDependencyFailure::Fail => TaskState::Failed,
        };
        task.finished_at = Some(now);
        task.errors.push(AttemptError {
            attempt: 0,
            at: now,
            message: DEPENDENCY_FAILED.to_string(),
        });
    } else if parents.pending > 0 {
        task.state = TaskState::Blocked;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn completion(outcome: Outcome) -> Completion {
        Completion {
            id: TaskId(1),
            attempt: 2,
            token: 3,
            at: DateTime::<Utc>::UNIX_EPOCH,
            outcome,
        }
    }

    #[test]
    fn containment_is_postgres_jsonb_containment() {
        use serde_json::json;
        let args =
            json!({"user": {"id": 42, "plan": "pro"}, "tags": ["a", "b"], "n": 1.0, "x": null});
        for (q, want) in [
            (json!({}), true),
            (json!({"user": {"id": 42}}), true),
            (json!({"user": {"id": 42.0}}), true),
            (json!({"user": {"id": "42"}}), false),
            (json!({"user": {"id": 42, "plan": "free"}}), false),
            (json!({"tags": ["b"]}), true),
            (json!({"tags": ["b", "a", "a"]}), true),
            (json!({"tags": ["c"]}), false),
            (json!({"tags": "a"}), false),
            (json!({"n": 1}), true),
            (json!({"x": null}), true),
            (json!({"missing": null}), false),
            (json!({"user": {}}), true),
            (json!({"user": []}), false),
        ] {
            assert_eq!(json_contains(&args, &q), want, "{q}");
        }
    }

    #[test]
    fn every_outcome_has_one_transition() {
        let t = DateTime::<Utc>::UNIX_EPOCH + chrono::Duration::seconds(5);
        let cases = [
            (
                Outcome::Completed {
                    result: serde_json::json!(1),
                },
                TaskState::Completed,
                0,
                Dependents::Unblock,
            ),
            (
                Outcome::Retry {
                    run_at: t,
                    error: "e".into(),
                },
                TaskState::Retryable,
                0,
                Dependents::Wait,
            ),
            (
                Outcome::Failed { error: "e".into() },
                TaskState::Failed,
                0,
                Dependents::Cascade,
            ),
            (
                Outcome::Cancelled { error: "e".into() },
                TaskState::Cancelled,
                0,
                Dependents::Cascade,
            ),
            (
                Outcome::Snoozed { run_at: t },
                TaskState::Scheduled,
                -1,
                Dependents::Wait,
            ),
            (
                Outcome::Released,
                TaskState::Available,
                -1,
                Dependents::Wait,
            ),
        ];
        for (outcome, state, delta, dependents) in cases {
            let c = completion(outcome);
            let tr = transition(&c);
            assert_eq!(tr.state, state);
            assert_eq!(tr.attempt_delta, delta);
            assert_eq!(tr.dependents, dependents);
            assert_eq!(tr.finished, state.is_finished());
            assert_eq!(tr.result.is_some(), state == TaskState::Completed);
        }
    }

    #[test]
    fn huge_delays_saturate_instead_of_overflowing() {
        let now = Utc::now();
        assert_eq!(after(now, std::time::Duration::MAX), max_instant());
        assert_eq!(
            after(now, std::time::Duration::from_secs(u64::MAX / 2)),
            max_instant()
        );
        let soon = after(now, std::time::Duration::from_millis(1500));
        assert_eq!((soon - now).num_milliseconds(), 1500);
    }

    #[test]
    fn text_is_made_storable() {
        assert_eq!(storable_text("a\0b", 100), "a\u{FFFD}b");
        assert!(matches!(storable_text("plain", 100), Cow::Borrowed(_)));
        let cut = storable_text("ééééé", 3);
        assert_eq!(cut, "é... (2 of 10 bytes kept)");
        let v = serde_json::json!({"k\u{0}": ["x\u{0}", 1]});
        assert_eq!(
            storable_value(&v).into_owned(),
            serde_json::json!({"k\u{FFFD}": ["x\u{FFFD}", 1]})
        );
    }

    #[test]
    fn parents_are_deduplicated_and_batch_refs_must_come_first() {
        let deps = [
            Dependency::Task(TaskId(3)),
            Dependency::Batch(0),
            Dependency::Task(TaskId(3)),
        ];
        let ids = parent_ids(&deps, |j| (j == 0).then_some(TaskId(9))).unwrap();
        assert_eq!(ids, vec![TaskId(3), TaskId(9)]);
        let e = parent_ids(&[Dependency::Batch(4)], |_| None).unwrap_err();
        assert_eq!(
            e.to_string(),
            "invalid: depends_on: batch task 4 comes later"
        );
    }

    #[test]
    fn parent_states_decide_the_first_state() {
        let p = classify_parents(&[TaskId(1), TaskId(2)], |id| {
            Some(if id.0 == 1 {
                TaskState::Completed
            } else {
                TaskState::Running
            })
        })
        .unwrap();
        assert_eq!(
            p,
            ParentStates {
                broken: None,
                pending: 1
            }
        );
        let e = classify_parents(&[TaskId(7)], |_| None).unwrap_err();
        assert_eq!(e.field(), Some("depends_on"));
    }
}
