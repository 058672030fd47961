//! Cron schedules: enqueue a task at every tick of a cron expression.
//!
//! # Overview
//!
//! Schedules live in the store (from the config, upserted by every node at
//! start, or added through the API). Only the leader fires them. Firing a
//! schedule is one atomic store call: it moves the schedule's `last_tick`
//! forward *only if* it still holds the value the leader read (compare and
//! set) and inserts the tick's tasks in the same transaction. So a tick is
//! enqueued exactly once across the cluster, through leader changes and
//! restarts, even if two nodes briefly both think they lead.
//!
//! # Missed ticks
//!
//! When no leader fired for a while (the cluster was down, a leader died),
//! `catch_up` decides: `none` drops missed ticks, `last` (default) enqueues
//! the latest one, `all` enqueues every one (at most [`MAX_CATCH_UP`]).
//!
//! # Overlap
//!
//! `overlap: allow` (default) enqueues every tick. `overlap: skip` gives all
//! of a schedule's tasks one unique key, so a tick is skipped while the
//! previous tick's task is unfinished.
//!
//! # Pause, resume, trigger
//!
//! A paused schedule's ticks pass without enqueuing (the leader still moves
//! its `last_tick`), so resuming it starts at the next tick and never
//! enqueues the ones missed while paused. A trigger enqueues the
//! schedule's task once, now, outside its ticks, paused or not (with
//! `overlap: skip`, not while the last one is unfinished).
//!
//! This file is the model (specs, ticks, the task a tick enqueues); the
//! leader's service that fires them is `maintenance/cron_firer.rs`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Utc};
use croner::Cron;
use serde::{Deserialize, Serialize};

use crate::store::ScheduleRow;
use crate::task::{NewTask, TaskOptions};

/// Most missed ticks `catch_up: all` enqueues at once.
pub const MAX_CATCH_UP: usize = 1000;

/// What to do when a schedule's tick comes while its last task is unfinished.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum Overlap {
    #[default]
    Allow,
    Skip,
}

/// Which missed ticks to enqueue.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(rename_all = "lowercase")]
pub enum CatchUp {
    None,
    #[default]
    Last,
    All,
}

fn default_tz() -> String {
    "UTC".into()
}

/// A schedule as written in the config or sent to the API.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
#[serde(deny_unknown_fields)]
pub struct ScheduleSpec {
    pub name: String,
    /// Five fields (minute first) or six (second first).
    pub cron: String,
    /// An IANA time zone, e.g. `Europe/Paris`. Default UTC.
    #[serde(default = "default_tz")]
    pub timezone: String,
    pub kind: String,
    #[serde(default)]
    pub args: serde_json::Value,
    #[serde(default)]
    pub queue: Option<String>,
    #[serde(default)]
    pub priority: Option<i16>,
    #[serde(default)]
    pub max_attempts: Option<i32>,
    #[serde(default)]
    pub overlap: Overlap,
    #[serde(default)]
    pub catch_up: CatchUp,
}

/// A spec that does not parse: which field, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct ScheduleError {
    pub field: String,
    pub message: String,
}

/// A parsed schedule.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub spec: ScheduleSpec,
    cron: Cron,
    tz: chrono_tz::Tz,
}

const FIELDS_6: [&str; 6] = [
    "second",
    "minute",
    "hour",
    "day of month",
    "month",
    "day of week",
];
const FIELDS_5: [&str; 5] = ["minute", "hour", "day of month", "month", "day of week"];

/// Parse a cron expression; the error names the expression, the failing
/// field and its position.
pub fn parse_cron(expr: &str) -> Result<Cron, String> {
    let parts: Vec<&str> = expr.split_whitespace().collect();
    let names: &[&str] = match parts.len() {
        5 => &FIELDS_5,
        6 => &FIELDS_6,
        n => {
            return Err(format!(
                "{expr:?} has {n} fields; write 5 (minute hour day-of-month month day-of-week) or 6 (second first)"
            ));
        }
    };
    match Cron::from_str(expr) {
        Ok(c) => Ok(c),
        Err(e) => {
            // Find the first field that fails on its own, the rest being `*`.
            for (i, part) in parts.iter().enumerate() {
                let probe: Vec<&str> = (0..parts.len())
                    .map(|j| if j == i { *part } else { "*" })
                    .collect();
                if Cron::from_str(&probe.join(" ")).is_err() {
                    return Err(format!(
                        "{expr:?}: field {} ({}) {part:?} is invalid: {e}",
                        i + 1,
                        names[i]
                    ));
                }
            }
            Err(format!("{expr:?}: {e}"))
        }
    }
}

impl ScheduleSpec {
    /// A schedule named `name` that enqueues a task of `kind` (args `null`)
    /// at every tick of `cron` in UTC; set the rest with the methods below.
    ///
    /// ```
    /// use proto_tasker::ScheduleSpec;
    /// use proto_tasker::cron::{CatchUp, Overlap};
    /// let nightly = ScheduleSpec::new("nightly-report", "0 2 * * *", "report")
    ///     .args(serde_json::json!({"format": "pdf"}))
    ///     .timezone("Europe/Paris")
    ///     .overlap(Overlap::Skip)
    ///     .catch_up(CatchUp::None);
    /// assert!(nightly.parse("").is_ok());
    /// ```
    pub fn new(name: impl Into<String>, cron: impl Into<String>, kind: impl Into<String>) -> Self {
        ScheduleSpec {
            name: name.into(),
            cron: cron.into(),
            timezone: default_tz(),
            kind: kind.into(),
            args: serde_json::Value::Null,
            queue: None,
            priority: None,
            max_attempts: None,
            overlap: Overlap::default(),
            catch_up: CatchUp::default(),
        }
    }

    pub fn args(mut self, args: serde_json::Value) -> Self {
        self.args = args;
        self
    }

    /// An IANA time zone, e.g. `Europe/Paris`.
    pub fn timezone(mut self, tz: impl Into<String>) -> Self {
        self.timezone = tz.into();
        self
    }

    pub fn queue(mut self, queue: impl Into<String>) -> Self {
        self.queue = Some(queue.into());
        self
    }

    pub fn priority(mut self, p: i16) -> Self {
        self.priority = Some(p);
        self
    }

    pub fn max_attempts(mut self, n: i32) -> Self {
        self.max_attempts = Some(n);
        self
    }

    pub fn overlap(mut self, o: Overlap) -> Self {
        self.overlap = o;
        self
    }

    pub fn catch_up(mut self, c: CatchUp) -> Self {
        self.catch_up = c;
        self
    }

    /// Check and parse. `at` prefixes field names (e.g. `schedules[2].`).
    pub fn parse(&self, at: &str) -> Result<Schedule, ScheduleError> {
        let err = |f: &str, m: String| ScheduleError {
            field: format!("{at}{f}"),
            message: m,
        };
        if self.name.trim().is_empty() || self.name.len() > 200 {
            return Err(err("name", "must be 1 to 200 characters".into()));
        }
        if self.kind.trim().is_empty() {
            return Err(err("kind", "must not be empty".into()));
        }
        let cron = parse_cron(&self.cron).map_err(|m| err("cron", m))?;
        let tz: chrono_tz::Tz = self.timezone.parse().map_err(|_| {
            err(
                "timezone",
                format!(
                    "unknown time zone {:?} (use an IANA name like Europe/Paris)",
                    self.timezone
                ),
            )
        })?;
        Ok(Schedule {
            spec: self.clone(),
            cron,
            tz,
        })
    }
}

impl Schedule {
    /// The first tick strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last tick at or before `t`.
    pub fn at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// The last tick strictly before `t`.
    fn before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let local = t.with_timezone(&self.tz);
        self.cron
            .find_previous_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
    }

    /// Ticks in `(last, now]` to enqueue under the catch-up policy, and the
    /// newest tick in that range (the new `last_tick`, even when skipped).
    /// `grace`: how late a tick may be found and still count as on time.
    ///
    /// The newest tick is found by searching back from `now`, and only the
    /// ticks the policy keeps are walked (at most [`MAX_CATCH_UP`]), so a
    /// per-second schedule after a month down costs no more than after a
    /// second.
    pub fn due(
        &self,
        last: DateTime<Utc>,
        now: DateTime<Utc>,
        grace: Duration,
    ) -> (Vec<DateTime<Utc>>, Option<DateTime<Utc>>) {
        let Some(newest) = self.at_or_before(now).filter(|t| *t > last) else {
            return (Vec::new(), None);
        };
        let grace = chrono::Duration::from_std(grace).unwrap_or_default();
        let keep = |t: DateTime<Utc>| match self.spec.catch_up {
            CatchUp::All => true,
            CatchUp::Last => t == newest,
            CatchUp::None => t >= now - grace,
        };
        let mut ticks = Vec::new();
        let mut t = Some(newest);
        while let Some(tick) = t.filter(|t| *t > last && keep(*t)) {
            ticks.push(tick);
            if ticks.len() >= MAX_CATCH_UP || self.spec.catch_up == CatchUp::Last {
                break;
            }
            t = self.before(tick);
        }
        ticks.reverse();
        (ticks, Some(newest))
    }

    /// The task of one tick.
    pub fn task(&self, tick: DateTime<Utc>) -> NewTask {
        self.task_keyed(tick.to_rfc3339_opts(chrono::SecondsFormat::Secs, true))
    }

    /// The task of a trigger at `at`: the tick's task, under a key no tick
    /// has (with `overlap: skip`, the schedule's one key).
    pub fn triggered_task(&self, at: DateTime<Utc>) -> NewTask {
        self.task_keyed(format!(
            "trigger:{}",
            at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
        ))
    }

    fn task_keyed(&self, when: String) -> NewTask {
        let key = match self.spec.overlap {
            Overlap::Skip => format!("cron:{}", self.spec.name),
            Overlap::Allow => format!("cron:{}:{when}", self.spec.name),
        };
        let mut o = TaskOptions::default().unique_key(key);
        o.queue = self.spec.queue.clone();
        o.priority = self.spec.priority;
        o.max_attempts = self.spec.max_attempts;
        NewTask::new(self.spec.kind.clone(), self.spec.args.clone()).with(o)
    }
}

/// A schedule with its state, as the API shows it.
#[derive(Debug, Clone, Serialize)]
#[cfg_attr(feature = "server", derive(utoipa::ToSchema))]
pub struct ScheduleView {
    /// The spec as stored (a [`ScheduleSpec`]).
    #[serde(flatten)]
    #[cfg_attr(feature = "server", schema(value_type = ScheduleSpec))]
    pub spec: serde_json::Value,
    pub source: String,
    pub last_tick: DateTime<Utc>,
    /// The next tick; `null` while paused (or when the expression has none).
    pub next_run: Option<DateTime<Utc>>,
    /// Paused: ticks pass without enqueuing until resumed.
    pub paused: bool,
}

impl ScheduleView {
    pub fn from_row(row: &ScheduleRow) -> Self {
        let next_run = serde_json::from_value::<ScheduleSpec>(row.spec.clone())
            .ok()
            .and_then(|s| s.parse("").ok())
            .and_then(|s| s.next_after(row.last_tick.max(Utc::now())))
            .filter(|_| !row.paused);
        ScheduleView {
            spec: row.spec.clone(),
            source: row.source.clone(),
            last_tick: row.last_tick,
            next_run,
            paused: row.paused,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;

    fn spec(cron: &str, tz: &str, catch_up: CatchUp) -> ScheduleSpec {
        ScheduleSpec {
            name: "s".into(),
            cron: cron.into(),
            timezone: tz.into(),
            kind: "noop".into(),
            args: serde_json::Value::Null,
            queue: None,
            priority: None,
            max_attempts: None,
            overlap: Overlap::Allow,
            catch_up,
        }
    }

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32, s: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(y, mo, d, h, mi, s).single().unwrap()
    }

    #[test]
    fn invalid_cron_names_expression_field_and_position() {
        let e = parse_cron("0 61 * * *").unwrap_err();
        assert!(
            e.contains("\"0 61 * * *\"") && e.contains("field 2 (hour)") && e.contains("61"),
            "{e}"
        );
        let e = parse_cron("* * *").unwrap_err();
        assert!(e.contains("has 3 fields"), "{e}");
        let e = parse_cron("*/5 * * * * MOONDAY").unwrap_err();
        assert!(e.contains("field 6 (day of week)"), "{e}");
        assert!(parse_cron("*/10 * * * * *").is_ok());
        let e = spec("0 * * * *", "Mars/Olympus", CatchUp::Last)
            .parse("schedules[1].")
            .unwrap_err();
        assert_eq!(e.field, "schedules[1].timezone");
    }

    #[test]
    fn a_month_of_missed_seconds_is_not_walked() {
        let now = utc(2026, 3, 1, 0, 0, 0);
        let month_ago = now - chrono::Duration::days(30);
        for (catch_up, want) in [
            (CatchUp::Last, 1),
            (CatchUp::All, MAX_CATCH_UP),
            (CatchUp::None, 3),
        ] {
            let s = spec("* * * * * *", "UTC", catch_up).parse("").unwrap();
            let (ticks, newest) = s.due(month_ago, now, Duration::from_secs(2));
            assert_eq!(newest, Some(now), "{catch_up:?}");
            assert_eq!(ticks.len(), want, "{catch_up:?}");
            assert_eq!(ticks.last(), Some(&now), "{catch_up:?}");
            assert!(ticks.windows(2).all(|w| w[0] < w[1]), "{catch_up:?}");
        }
    }

    #[test]
    fn catch_up_policies() {
        let s = |c| spec("0 * * * *", "UTC", c).parse("").unwrap();
        let last = utc(2026, 1, 1, 0, 30, 0);
        let now = utc(2026, 1, 1, 5, 10, 0);
        let (all, newest) = s(CatchUp::All).due(last, now, Duration::from_secs(2));
        assert_eq!(all.len(), 5);
        assert_eq!(newest, Some(utc(2026, 1, 1, 5, 0, 0)));
        let (one, _) = s(CatchUp::Last).due(last, now, Duration::from_secs(2));
        assert_eq!(one, [utc(2026, 1, 1, 5, 0, 0)]);
        let (none, newest) = s(CatchUp::None).due(last, now, Duration::from_secs(2));
        assert!(none.is_empty(), "late ticks dropped");
        assert_eq!(
            newest,
            Some(utc(2026, 1, 1, 5, 0, 0)),
            "but last_tick still moves on"
        );
        let (on_time, _) =
            s(CatchUp::None).due(last, utc(2026, 1, 1, 1, 0, 1), Duration::from_secs(2));
        assert_eq!(on_time, [utc(2026, 1, 1, 1, 0, 0)]);
        let (nothing, newest) = s(CatchUp::All).due(now, now, Duration::from_secs(2));
        assert!(nothing.is_empty() && newest.is_none());
    }

    #[test]
    fn daylight_saving_transitions_follow_the_time_zone() {
        // New York springs forward on 2026-03-08: 02:30 does not exist that day.
        let s = spec("0 30 2 * * *", "America/New_York", CatchUp::All)
            .parse("")
            .unwrap();
        let ticks: Vec<_> = {
            let mut t = utc(2026, 3, 6, 12, 0, 0);
            (0..4)
                .map(|_| {
                    t = s.next_after(t).unwrap();
                    t
                })
                .collect()
        };
        // 02:30 EST = 07:30 UTC before the change, 02:30 EDT = 06:30 UTC after it.
        assert_eq!(ticks[0], utc(2026, 3, 7, 7, 30, 0));
        assert!(ticks.contains(&utc(2026, 3, 9, 6, 30, 0)), "{ticks:?}");
        // Every day, including the short one, gets at most one tick.
        let days: std::collections::HashSet<_> = ticks
            .iter()
            .map(|t| t.with_timezone(&chrono_tz::America::New_York).date_naive())
            .collect();
        assert_eq!(days.len(), ticks.len());
        // Falling back on 2026-11-01, 01:30 happens twice; the schedule fires once.
        let s = spec("0 30 1 * * *", "America/New_York", CatchUp::All)
            .parse("")
            .unwrap();
        let (ticks, _) = s.due(
            utc(2026, 11, 1, 0, 0, 0),
            utc(2026, 11, 1, 12, 0, 0),
            Duration::from_secs(1),
        );
        assert_eq!(ticks.len(), 1, "{ticks:?}");
    }

    #[test]
    fn overlap_decides_the_unique_key() {
        let mut sp = spec("* * * * *", "UTC", CatchUp::Last);
        let t = utc(2026, 1, 1, 0, 1, 0);
        let allow = sp.parse("").unwrap().task(t);
        assert_eq!(
            allow.options.unique_key.as_deref(),
            Some("cron:s:2026-01-01T00:01:00Z")
        );
        sp.overlap = Overlap::Skip;
        let skip = sp.parse("").unwrap().task(t);
        assert_eq!(skip.options.unique_key.as_deref(), Some("cron:s"));
    }
}
