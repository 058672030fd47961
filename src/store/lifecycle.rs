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

use chrono::{DateTime, Utc};

use super::{Completion, Outcome, StoreError};
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

/// What an outcome does to its task: the one place that maps outcomes to states.
#[derive(Debug, Clone, PartialEq)]
pub struct Transition<'a> {
    /// The task's next state.
    pub state: TaskState,
    /// Set `finished_at` to the outcome's time (final states).
    pub finished: bool,
    /// The result to keep (completed tasks only).
    pub result: Option<&'a serde_json::Value>,
    /// The new `run_at`; `None` keeps the task's own.
    pub run_at: Option<DateTime<Utc>>,
    /// An entry to append to the task's error list.
    pub error: Option<AttemptError>,
    /// Added to `attempt`: -1 gives the attempt back (snooze, release).
    pub attempt_delta: i32,
    /// What the task's dependents do now.
    pub dependents: Dependents,
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
            message: message.to_string(),
        })
    };
    let (state, result, run_at, error, attempt_delta) = match &c.outcome {
        Outcome::Completed { result } => (TaskState::Completed, Some(result), None, None, 0),
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
    }
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

/// The refusal of a retry whose task's `unique_key` another unfinished task holds.
pub fn unique_conflict(task: &Task) -> StoreError {
    StoreError::Conflict {
        id: task.id,
        state: task.state,
        message: format!(
            "another unfinished task holds unique_key {:?}",
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
    for d in deps {
        let id = match *d {
            Dependency::Task(id) => id,
            Dependency::Batch(j) => batch(j).ok_or_else(|| {
                StoreError::invalid("depends_on", format!("batch task {j} comes later"))
            })?,
        };
        if !parents.contains(&id) {
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
            at: DateTime::<Utc>::UNIX_EPOCH,
            outcome,
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
