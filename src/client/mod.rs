//! The front door: enqueue, inspect and steer tasks. The operator's side
//! (queues, nodes, schedules, the audit trail) is in `operator.rs`.

use std::sync::Arc;
use std::time::Duration;

use chrono::Utc;
use serde::Serialize;
use tracing::Instrument;

mod kinds;
mod operator;
mod waiters;

pub use operator::{MAX_DEPTH_LIMIT, MAX_RATE_PER_MS, MAX_SHARED_WORKERS, QueueInfo};
pub use waiters::FALLBACK_POLL;

use crate::registry::{KindDefaults, TaskRegistry};
use crate::store::{Inserted, ListParams, Store, StoreError, TaskInsert, UniqueRules};
use crate::task::{
    DEFAULT_MAX_ATTEMPTS, DEFAULT_QUEUE, Dependency, MAX_TAGS, NewTask, OnConflict, PRIORITY_MAX,
    PRIORITY_MIN, Task, TaskId, TaskOptions, TaskState, UNIQUE_STATES_REQUIRED,
};

/// Why a client call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ClientError {
    /// The request was wrong; `field` names the offending part.
    #[error("{field}: {message}")]
    Invalid { field: String, message: String },
    #[error(transparent)]
    Store(#[from] StoreError),
    /// `wait` gave up before the task finished.
    #[error("task {0} did not finish within the wait")]
    WaitTimeout(TaskId),
    /// What the call names does not exist (a schedule, say); the message
    /// says what.
    #[error("{0}")]
    NotFound(String),
}

/// A free worker of this client's pool for a task being enqueued.
struct StartAtOnce {
    reserved: crate::pool::handoff::Reserved,
    node: String,
}

impl Client {
    /// A free worker of `row`'s queue on this client's pool, when the task
    /// could start as it is inserted (see `pool/handoff.rs`).
    fn insert_started(&self, row: &TaskInsert, now: chrono::DateTime<Utc>) -> Option<StartAtOnce> {
        let h = self.handoff.as_ref()?;
        if !row.can_start_at_once(now) {
            return None;
        }
        let node = h.node()?;
        let reserved = h.reserve(&row.queue)?;
        Some(StartAtOnce { reserved, node })
    }
}

impl StartAtOnce {
    /// Insert `row`, started by this node when its queue allows, and hand
    /// it to the reserved worker; otherwise the worker is given back (the
    /// store inserted the task as any other and woke the claimers).
    async fn run(
        self,
        client: &Client,
        row: TaskInsert,
        now: chrono::DateTime<Utc>,
    ) -> Result<Inserted, ClientError> {
        let inserted = client
            .store
            .task_insert_started(row, &self.node, now)
            .await?;
        let ours = inserted.task.state == TaskState::Running
            && inserted.task.node.as_deref() == Some(self.node.as_str());
        if ours && let Err(task) = self.reserved.start(inserted.task.clone()).await {
            // The pool stopped meanwhile: give the task back unstarted.
            let back =
                crate::store::Completion::of(&task, Utc::now(), crate::store::Outcome::Released);
            if let Err(e) = client.store.task_complete_many(vec![back]).await {
                tracing::warn!(task = %task.id, error = %e, "could not give back a task started at enqueue; it is rescued later");
            }
        }
        Ok(inserted)
    }
}

/// The `task.enqueue` span of an insert of `tasks`, and, under an
/// OpenTelemetry layer, its context, which the tasks carry (the span is a
/// child of the first task's `traceparent` when given, else of the current
/// span). Without a layer, each task keeps the `traceparent` it was given.
fn enqueue_span(tasks: &[NewTask]) -> (tracing::Span, Option<String>) {
    let first = tasks.first();
    let span = tracing::info_span!(
        "task.enqueue",
        otel.kind = "producer",
        task.kind = first.map(|t| t.kind.as_str()).unwrap_or_default(),
        task.count = tasks.len(),
        task.id = tracing::field::Empty,
        task.queue = tracing::field::Empty,
    );
    let given = first
        .and_then(|t| t.options.traceparent.as_deref())
        .filter(|tp| crate::telemetry::parse_traceparent(tp).is_some());
    crate::telemetry::continue_trace(&span, given);
    let trace = crate::telemetry::traceparent_of(&span);
    (span, trace)
}

/// Turn each task's `depends_on_refs` into positions in the batch, naming
/// a ref that no task or two tasks of the batch carry.
fn resolve_refs(mut tasks: Vec<NewTask>) -> Result<Vec<NewTask>, ClientError> {
    let mut names = std::collections::HashMap::new();
    for (i, t) in tasks.iter().enumerate() {
        if let Some(r) = &t.options.reference
            && names.insert(r.clone(), i).is_some()
        {
            return Err(invalid(
                format!("tasks[{i}].ref"),
                format!("{r:?} names another task of this batch too"),
            ));
        }
    }
    for (i, t) in tasks.iter_mut().enumerate() {
        for r in std::mem::take(&mut t.options.depends_on_refs) {
            let j = names.get(&r).ok_or_else(|| {
                invalid(
                    format!("tasks[{i}].depends_on"),
                    format!("no task in this batch has ref {r:?}"),
                )
            })?;
            t.options.depends_on.push(Dependency::Batch(*j));
        }
    }
    Ok(tasks)
}

/// Put results back in the caller's order.
fn unpermute(out: Vec<Inserted>, order: &[usize]) -> Vec<Inserted> {
    let mut slots: Vec<Option<Inserted>> = vec![None; out.len()];
    for (row, &i) in out.into_iter().zip(order) {
        slots[i] = Some(row);
    }
    slots.into_iter().flatten().collect()
}

/// A topological order of a batch (Kahn's algorithm), or the error naming
/// a reference out of range or a cycle.
fn dependency_order(rows: &[TaskInsert]) -> Result<Vec<usize>, ClientError> {
    let n = rows.len();
    let mut children: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut waiting = vec![0usize; n];
    for (i, row) in rows.iter().enumerate() {
        for d in &row.depends_on {
            if let Dependency::Batch(j) = *d {
                if j >= n || j == i {
                    return Err(invalid(
                        format!("tasks[{i}].depends_on"),
                        format!("{j} is not another task of this batch (it holds {n})"),
                    ));
                }
                children[j].push(i);
                waiting[i] += 1;
            }
        }
    }
    let mut ready: std::collections::VecDeque<usize> =
        (0..n).filter(|&i| waiting[i] == 0).collect();
    let mut order = Vec::with_capacity(n);
    while let Some(i) = ready.pop_front() {
        order.push(i);
        for &c in &children[i] {
            waiting[c] -= 1;
            if waiting[c] == 0 {
                ready.push_back(c);
            }
        }
    }
    if order.len() == n {
        return Ok(order);
    }
    // Walk parents from a task still waiting until one repeats: that is the cycle.
    let start = (0..n).find(|&i| waiting[i] > 0).unwrap_or(0);
    let mut path = vec![start];
    let mut at = start;
    loop {
        let next = rows[at].depends_on.iter().find_map(|d| match d {
            Dependency::Batch(j) if waiting[*j] > 0 => Some(*j),
            _ => None,
        });
        let Some(next) = next else { break };
        if let Some(p) = path.iter().position(|&x| x == next) {
            let cycle: Vec<String> = path[p..]
                .iter()
                .chain([&next])
                .map(|i| format!("tasks[{i}]"))
                .collect();
            return Err(invalid(
                format!("tasks[{next}].depends_on"),
                format!("a cycle: {} (each waits for the next)", cycle.join(" -> ")),
            ));
        }
        path.push(next);
        at = next;
    }
    Err(invalid(
        "depends_on",
        "the batch's dependencies form a cycle",
    ))
}

fn invalid(field: impl Into<String>, message: impl Into<String>) -> ClientError {
    ClientError::Invalid {
        field: field.into(),
        message: message.into(),
    }
}

/// Longest name (kind, queue, unique key, concurrency key, ref), in bytes:
/// PostgreSQL refuses index entries past about 2.7 KB, and no label needs more.
pub const MAX_NAME_BYTES: usize = 255;

/// Most tasks one task may depend on.
pub const MAX_DEPENDS_ON: usize = 1000;

fn check_name(v: &str) -> Result<(), String> {
    if v.len() > MAX_NAME_BYTES {
        return Err(format!("is {} bytes; at most {MAX_NAME_BYTES}", v.len()));
    }
    if v.contains('\0') {
        return Err("holds a NUL character".into());
    }
    Ok(())
}

/// The store's form of the uniqueness options, checked; an error names the
/// option at fault.
fn unique_rules(o: &TaskOptions) -> Result<UniqueRules, (&'static str, String)> {
    if o.unique_key.is_none() {
        for (field, set) in [
            ("unique_states", o.unique_states.is_some()),
            ("unique_for", o.unique_for.is_some()),
            ("on_conflict", o.on_conflict != OnConflict::Keep),
        ] {
            if set {
                return Err((field, "needs a unique_key".into()));
            }
        }
        return Ok(UniqueRules::default());
    }
    let for_ms = match o.unique_for {
        Some(d) if d.is_zero() => return Err(("unique_for", "must be more than 0".into())),
        Some(d) if d > MAX_DELAY => {
            return Err(("unique_for", format!("{d:?} is more than 100 years")));
        }
        Some(d) => Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
        None => None,
    };
    let finished = match &o.unique_states {
        Some(states) => {
            if let Some(missing) = UNIQUE_STATES_REQUIRED.iter().find(|s| !states.contains(s)) {
                return Err((
                    "unique_states",
                    format!(
                        "lacks {missing}: it must include scheduled, available, running, retryable \
                         and blocked (a task moves between them by itself), and may add completed, \
                         failed or cancelled"
                    ),
                ));
            }
            crate::store::lifecycle::FINISHED
                .into_iter()
                .filter(|f| states.contains(f))
                .collect()
        }
        // A window alone makes a completed task hold its key for it.
        None if for_ms.is_some() => vec![TaskState::Completed],
        None => Vec::new(),
    };
    Ok(UniqueRules {
        finished,
        for_ms,
        on_conflict: o.on_conflict,
    })
}

/// Tags as a task keeps them: at most [`MAX_TAGS`], each a non-empty name,
/// a repeat dropped. An error names the position at fault, if one is.
fn check_tags(tags: Vec<String>) -> Result<Vec<String>, (Option<usize>, String)> {
    if tags.len() > MAX_TAGS {
        return Err((
            None,
            format!("{} tags; a task may carry at most {MAX_TAGS}", tags.len()),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(tags.len());
    for (i, t) in tags.into_iter().enumerate() {
        if t.is_empty() {
            return Err((Some(i), "must not be empty".into()));
        }
        check_name(&t).map_err(|m| (Some(i), m))?;
        if !out.contains(&t) {
            out.push(t);
        }
    }
    Ok(out)
}

/// Where `v` holds a NUL (in a string or a key): `args.a.b[2]`.
fn nul_in(v: &serde_json::Value, path: &str) -> Option<String> {
    match v {
        serde_json::Value::String(s) if s.contains('\0') => Some(path.to_string()),
        serde_json::Value::Array(a) => a
            .iter()
            .enumerate()
            .find_map(|(i, x)| nul_in(x, &format!("{path}[{i}]"))),
        serde_json::Value::Object(o) => o.iter().find_map(|(k, x)| {
            if k.contains('\0') {
                Some(path.to_string())
            } else {
                nul_in(x, &format!("{path}.{k}"))
            }
        }),
        _ => None,
    }
}

/// Longest allowed delay or distance of `run_at` into the future (about 100 years).
const MAX_DELAY: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Enqueues and manages tasks in a [`Store`]. Cheap to clone.
#[derive(Clone)]
pub struct Client {
    store: Arc<dyn Store>,
    registry: Arc<TaskRegistry>,
    /// Shared by clones: one dispatcher and one fallback poll for all.
    waiters: Arc<waiters::Waiters>,
    /// The kinds live nodes run (see `kinds.rs`), shared by clones.
    known: Arc<kinds::KnownKinds>,
    /// Refuse kinds nobody runs (see [`Client::accept_unknown_kinds`]).
    check_kinds: bool,
    /// The pool this client belongs to, which may start a task as it is
    /// enqueued (`pool/handoff.rs`).
    handoff: Option<Arc<crate::pool::handoff::Handoff>>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("registry", &self.registry)
            .finish()
    }
}

impl Client {
    /// A client over `store`. Kinds registered in `registry` get their defaults
    /// (queue, attempts, timeout) applied to tasks that leave them unset.
    pub fn new(store: Arc<dyn Store>, registry: Arc<TaskRegistry>) -> Self {
        Client {
            waiters: waiters::Waiters::new(store.clone()),
            store,
            registry,
            known: Arc::default(),
            check_kinds: true,
            handoff: None,
        }
    }

    /// This client belongs to a pool that may start what it enqueues.
    pub(crate) fn with_handoff(mut self, h: Arc<crate::pool::handoff::Handoff>) -> Self {
        self.handoff = Some(h);
        self
    }

    /// Accept tasks of kinds that neither this client's registry nor any
    /// live node runs (for workers deployed later). By default such a kind
    /// is refused at enqueue, naming the kinds that are known, when this
    /// client has a registry of its own or when live nodes declare theirs.
    pub fn accept_unknown_kinds(mut self) -> Self {
        self.check_kinds = false;
        self
    }

    /// Defaults of the kinds of `tasks` this client's registry lacks, as
    /// the live nodes declare them; or the error for a kind nobody runs.
    async fn kind_defaults<'a>(
        &self,
        tasks: impl Iterator<Item = &'a NewTask>,
    ) -> Result<std::collections::BTreeMap<String, KindDefaults>, ClientError> {
        let kinds: std::collections::BTreeSet<&str> = tasks
            .map(|t| t.kind.as_str())
            .filter(|k| !self.registry.contains(k))
            .collect();
        if kinds.is_empty() {
            return Ok(Default::default());
        }
        match self
            .known
            .resolve(&self.store, &self.registry, kinds)
            .await?
        {
            Ok(d) => Ok(d),
            Err(_) if !self.check_kinds => Ok(Default::default()),
            Err(u) => Err(invalid(
                "kind",
                format!(
                    "no executor runs kind {:?} here or on any live node (known kinds: {}); \
                     check the spelling, or start the workers first",
                    u.kind,
                    if u.known.is_empty() {
                        "none".to_string()
                    } else {
                        u.known.join(", ")
                    }
                ),
            )),
        }
    }

    pub fn store(&self) -> &Arc<dyn Store> {
        &self.store
    }

    /// Enqueue one task of `kind` with `args` and default options.
    pub async fn enqueue(&self, kind: &str, args: impl Serialize) -> Result<Task, ClientError> {
        let args = serde_json::to_value(args).map_err(|e| invalid("args", e.to_string()))?;
        Ok(self.insert(NewTask::new(kind, args)).await?.task)
    }

    /// Enqueue one typed task (see [`TaskArgs`](crate::TaskArgs)): its
    /// kind and defaults come from the type. For options, insert
    /// `NewTask::typed(&args)?.with(options)`.
    pub async fn enqueue_typed<A: crate::TaskArgs>(&self, args: A) -> Result<Task, ClientError> {
        let task = NewTask::typed(&args).map_err(|e| invalid("args", e.to_string()))?;
        Ok(self.insert(task).await?.task)
    }

    /// Enqueue one task. When its `unique_key` matches an unfinished task,
    /// that task is returned with `existing = true` and nothing is inserted.
    pub async fn insert(&self, task: NewTask) -> Result<Inserted, ClientError> {
        let (span, trace) = enqueue_span(std::slice::from_ref(&task));
        let inserted = async {
            let now = Utc::now();
            let declared = self.kind_defaults(std::iter::once(&task)).await?;
            let row = self.resolve(task, now, None, &declared, trace.as_deref())?;
            if row
                .depends_on
                .iter()
                .any(|d| matches!(d, Dependency::Batch(_)))
            {
                return Err(invalid("depends_on", "a batch reference needs insert_many"));
            }
            if let Some(started) = self.insert_started(&row, now) {
                return started.run(self, row, now).await;
            }
            Ok(crate::store::insert_one(&*self.store, row, now).await?)
        }
        .instrument(span.clone())
        .await?;
        span.record("task.id", inserted.task.id.0);
        span.record("task.queue", inserted.task.queue.as_str());
        Ok(inserted)
    }

    /// Enqueue many tasks in one transaction: all are inserted or none.
    pub async fn insert_many(&self, tasks: Vec<NewTask>) -> Result<Vec<Inserted>, ClientError> {
        let (span, trace) = enqueue_span(&tasks);
        async {
            let now = Utc::now();
            let declared = self.kind_defaults(tasks.iter()).await?;
            let (rows, order) = self.resolve_all(tasks, now, &declared, trace.as_deref())?;
            let out = self.store.task_insert_many(rows, now).await?;
            Ok(unpermute(out, &order))
        }
        .instrument(span)
        .await
    }

    /// Check a task as `insert` would, without inserting it.
    pub fn check(&self, task: NewTask) -> Result<(), ClientError> {
        self.resolve(task, Utc::now(), None, &Default::default(), None)
            .map(|_| ())
    }

    /// Apply defaults and check tasks without inserting them (no batch
    /// references: the rows keep their order).
    pub(crate) fn prepare(&self, tasks: Vec<NewTask>) -> Result<Vec<TaskInsert>, ClientError> {
        let now = Utc::now();
        tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| self.resolve(t, now, Some(i), &Default::default(), None))
            .collect()
    }

    /// Resolve a batch; errors name the offending task as `tasks[i]`. Rows
    /// come back ordered so every task follows the tasks of the batch it
    /// depends on; `order[k]` is the original index of row `k`.
    fn resolve_all(
        &self,
        tasks: Vec<NewTask>,
        now: chrono::DateTime<Utc>,
        declared: &std::collections::BTreeMap<String, KindDefaults>,
        trace: Option<&str>,
    ) -> Result<(Vec<TaskInsert>, Vec<usize>), ClientError> {
        let tasks = resolve_refs(tasks)?;
        let rows = tasks
            .into_iter()
            .enumerate()
            .map(|(i, t)| self.resolve(t, now, Some(i), declared, trace))
            .collect::<Result<Vec<_>, _>>()?;
        let order = dependency_order(&rows)?;
        let mut position = vec![0; rows.len()];
        for (k, &i) in order.iter().enumerate() {
            position[i] = k;
        }
        let mut slots: Vec<Option<TaskInsert>> = rows.into_iter().map(Some).collect();
        let sorted = order
            .iter()
            .filter_map(|&i| slots[i].take())
            .map(|mut row| {
                for d in &mut row.depends_on {
                    if let Dependency::Batch(j) = d {
                        *j = position[*j];
                    }
                }
                row
            })
            .collect();
        Ok((sorted, order))
    }

    /// Apply defaults and check one task. `index` names it in errors of a
    /// batch. A kind's defaults come from this client's registry, else the
    /// task's own (typed tasks carry theirs), else what live nodes declare
    /// (`declared`), else the built-in ones. `trace`: the enqueue span's
    /// context, which the task carries rather than its own `traceparent`.
    fn resolve(
        &self,
        t: NewTask,
        now: chrono::DateTime<Utc>,
        index: Option<usize>,
        declared: &std::collections::BTreeMap<String, KindDefaults>,
        trace: Option<&str>,
    ) -> Result<TaskInsert, ClientError> {
        let at = |f: &str| match index {
            None => f.to_string(),
            Some(i) => format!("tasks[{i}].{f}"),
        };
        if t.kind.trim().is_empty() {
            return Err(invalid(at("kind"), "must not be empty"));
        }
        // Bounds, the same whatever the store (each would otherwise fail in
        // one store and not the other, or hold the store up).
        check_name(&t.kind).map_err(|m| invalid(at("kind"), m))?;
        // The cheap walk first: paths are built only for args that hold a NUL.
        if let Some(path) = crate::store::lifecycle::has_nul(&t.args)
            .then(|| nul_in(&t.args, "args"))
            .flatten()
        {
            return Err(invalid(
                at(&path),
                "holds a NUL character, which tasks may not carry",
            ));
        }
        if t.options.depends_on.len() > MAX_DEPENDS_ON {
            return Err(invalid(
                at("depends_on"),
                format!(
                    "{} tasks; a task may depend on at most {MAX_DEPENDS_ON}",
                    t.options.depends_on.len()
                ),
            ));
        }
        if let Some(r) = t.options.depends_on_refs.first() {
            return Err(invalid(
                at("depends_on"),
                format!("{r:?}: a ref names a task of the same batch; use insert_many"),
            ));
        }
        for (f, v) in [
            ("ref", t.options.reference.as_deref()),
            ("queue", t.options.queue.as_deref()),
            ("unique_key", t.options.unique_key.as_deref()),
            ("concurrency_key", t.options.concurrency_key.as_deref()),
        ] {
            if let Some(v) = v {
                check_name(v).map_err(|m| invalid(at(f), m))?;
            }
        }
        if let Some(executor) = self.registry.executor(&t.kind) {
            executor
                .check_args(&t.args)
                .map_err(|e| invalid(at(&e.field), e.message))?;
        }
        let defaults = self
            .registry
            .defaults(&t.kind)
            .or(t.defaults.as_ref())
            .or_else(|| declared.get(&t.kind))
            .cloned()
            .unwrap_or_default();
        let unique = unique_rules(&t.options).map_err(|(f, m)| invalid(at(f), m))?;
        let o = t.options;
        let queue = o
            .queue
            .or(defaults.queue)
            .unwrap_or_else(|| DEFAULT_QUEUE.to_string());
        if queue.trim().is_empty() {
            return Err(invalid(at("queue"), "must not be empty"));
        }
        let priority = o.priority.unwrap_or(PRIORITY_MIN);
        if !(PRIORITY_MIN..=PRIORITY_MAX).contains(&priority) {
            return Err(invalid(
                at("priority"),
                format!(
                    "{priority} is out of range {PRIORITY_MIN}..={PRIORITY_MAX} (0 runs first)"
                ),
            ));
        }
        let max_attempts = o
            .max_attempts
            .or(defaults.max_attempts)
            .unwrap_or(DEFAULT_MAX_ATTEMPTS);
        if max_attempts < 1 {
            return Err(invalid(
                at("max_attempts"),
                format!("{max_attempts} must be at least 1"),
            ));
        }
        let run_at = match (o.run_at, o.delay) {
            (Some(t), _) => t,
            (None, Some(d)) => {
                if d > MAX_DELAY {
                    return Err(invalid(
                        at("delay"),
                        format!("{d:?} is more than 100 years"),
                    ));
                }
                now + chrono::Duration::from_std(d)
                    .map_err(|e| invalid(at("delay"), e.to_string()))?
            }
            (None, None) => now,
        };
        if run_at > now + chrono::Duration::from_std(MAX_DELAY).unwrap_or_default() {
            return Err(invalid(at("run_at"), "is more than 100 years away"));
        }
        if run_at < chrono::DateTime::<Utc>::UNIX_EPOCH {
            return Err(invalid(at("run_at"), "is before 1970"));
        }
        let timeout = o.timeout.or(defaults.timeout);
        let timeout_ms = match timeout {
            Some(d) if d.is_zero() => return Err(invalid(at("timeout"), "must be more than 0")),
            Some(d) => Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX)),
            None => None,
        };
        if let Some(k) = &o.unique_key
            && k.is_empty()
        {
            return Err(invalid(at("unique_key"), "must not be empty when set"));
        }
        if let Some(tp) = &o.traceparent
            && crate::telemetry::parse_traceparent(tp).is_none()
        {
            return Err(invalid(
                at("traceparent"),
                format!(
                    "{:?} {}",
                    tp.chars().take(64).collect::<String>(),
                    crate::telemetry::TRACEPARENT_FORMAT
                ),
            ));
        }
        let tags = check_tags(o.tags).map_err(|(i, m)| match i {
            Some(i) => invalid(at(&format!("tags[{i}]")), m),
            None => invalid(at("tags"), m),
        })?;
        Ok(TaskInsert {
            kind: t.kind,
            args: t.args,
            queue,
            priority,
            run_at,
            max_attempts,
            timeout_ms,
            unique_key: o.unique_key,
            unique,
            depends_on: o.depends_on,
            on_dependency_failure: o.on_dependency_failure,
            concurrency_key: o.concurrency_key,
            reference: o.reference,
            tags,
            traceparent: trace.map(str::to_string).or(o.traceparent),
        })
    }

    /// Enqueue tasks inside the caller's own PostgreSQL transaction: they
    /// exist if and only if that transaction commits, and nodes are woken
    /// when it does. The client's store must be a
    /// [`PostgresStore`](crate::store::PostgresStore) on the same database.
    ///
    /// ```no_run
    /// # async fn f(client: proto_tasker::Client, pg: &mut tokio_postgres::Client) -> Result<(), Box<dyn std::error::Error>> {
    /// use proto_tasker::NewTask;
    /// let tx = pg.transaction().await?;
    /// tx.execute("INSERT INTO orders (id) VALUES (42)", &[]).await?;
    /// client.insert_in(&tx, vec![NewTask::new("send_receipt", serde_json::json!({"order": 42}))]).await?;
    /// tx.commit().await?; // the task and the order appear together, or neither does
    /// # Ok(()) }
    /// ```
    #[cfg(feature = "postgres")]
    pub async fn insert_in<C: tokio_postgres::GenericClient>(
        &self,
        tx: &C,
        tasks: Vec<NewTask>,
    ) -> Result<Vec<Inserted>, ClientError> {
        let pg = self
            .store
            .as_any()
            .downcast_ref::<crate::store::PostgresStore>()
            .ok_or_else(|| {
                invalid(
                    "store",
                    "insert_in needs a PostgresStore (the caller's transaction is PostgreSQL)",
                )
            })?;
        let (span, trace) = enqueue_span(&tasks);
        async {
            let now = Utc::now();
            let declared = self.kind_defaults(tasks.iter()).await?;
            let (rows, order) = self.resolve_all(tasks, now, &declared, trace.as_deref())?;
            let out = pg.insert_in(tx, rows, now).await?;
            Ok(unpermute(out, &order))
        }
        .instrument(span)
        .await
    }

    pub async fn get(&self, id: TaskId) -> Result<Option<Task>, ClientError> {
        Ok(self.store.task_get(id).await?)
    }

    pub async fn list(&self, params: ListParams) -> Result<Vec<Task>, ClientError> {
        Ok(self.store.task_list(params).await?)
    }

    /// Cancel a task: one that has not started never runs; a running one sees
    /// its cancellation token fire on the node that runs it.
    pub async fn cancel(&self, id: TaskId) -> Result<Task, ClientError> {
        Ok(self.store.task_cancel(id, Utc::now()).await?)
    }

    /// Run a failed or cancelled task again (granting an attempt if none is left).
    pub async fn retry(&self, id: TaskId) -> Result<Task, ClientError> {
        Ok(self.store.task_retry(id, Utc::now()).await?)
    }

    /// Wait until the task reaches a final state, up to `timeout`
    /// ([`ClientError::WaitTimeout`] when it does not). See [`Client::wait_for`].
    pub async fn wait(&self, id: TaskId, timeout: Duration) -> Result<Task, ClientError> {
        let task = self.wait_for(id, timeout).await?;
        if task.state.is_finished() {
            Ok(task)
        } else {
            Err(ClientError::WaitTimeout(id))
        }
    }

    /// Wait up to `timeout` for the task to reach a final state, and return
    /// it as it is then (finished or not): what a long-poll answers.
    ///
    /// The task is read when the wait starts and at the deadline; nothing is
    /// read in between. Its finish is announced by the node that wrote it (at
    /// once on this node, through a notification from another), and the
    /// finished task is read once for all who wait for it at that moment.
    /// A missed announcement is covered by one read for all waiters every
    /// [`FALLBACK_POLL`].
    pub async fn wait_for(&self, id: TaskId, timeout: Duration) -> Result<Task, ClientError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut reg = self.waiters.register(id);
        self.waiters.announce().await;
        loop {
            let task = self
                .store
                .task_get(id)
                .await?
                .ok_or(StoreError::NotFound(id))?;
            if task.state.is_finished() || tokio::time::Instant::now() >= deadline {
                return Ok(task);
            }
            tokio::select! {
                r = reg.woken.changed() => match r {
                    Ok(()) => {
                        let handed = reg.woken.borrow_and_update().clone();
                        // Handed over by one read shared with other waiters;
                        // `None`: read it here.
                        if let Some(task) = handed {
                            return Ok((*task).clone());
                        }
                    }
                    // The sender lives while `reg` does, so this does not
                    // happen; if it did, the deadline read ends the wait.
                    Err(_) => tokio::time::sleep_until(deadline).await,
                },
                _ = tokio::time::sleep_until(deadline) => {}
            }
        }
    }

    /// How many tasks this client (and its clones) wait for now.
    pub fn waiting(&self) -> usize {
        self.waiters.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(deps: &[usize]) -> TaskInsert {
        TaskInsert {
            max_attempts: 1,
            depends_on: deps.iter().map(|&j| Dependency::Batch(j)).collect(),
            ..TaskInsert::plain("k", "q", serde_json::Value::Null, Utc::now())
        }
    }

    #[test]
    fn unique_rules_are_checked_and_defaulted() {
        let keyed = || TaskOptions::default().unique_key("k");
        let rules = unique_rules(&keyed()).unwrap();
        assert_eq!(rules, UniqueRules::default());
        let window = unique_rules(&keyed().unique_for(Duration::from_secs(60))).unwrap();
        assert_eq!(window.finished, [TaskState::Completed]);
        assert_eq!(window.for_ms, Some(60_000));
        let mut states = UNIQUE_STATES_REQUIRED.to_vec();
        states.extend([TaskState::Failed, TaskState::Cancelled]);
        let named = unique_rules(&keyed().unique_states(states)).unwrap();
        assert_eq!(named.finished, [TaskState::Failed, TaskState::Cancelled]);
        assert_eq!(named.for_ms, None);
        let (field, msg) =
            unique_rules(&keyed().unique_states([TaskState::Available, TaskState::Completed]))
                .unwrap_err();
        assert_eq!(field, "unique_states");
        assert!(msg.contains("scheduled"), "{msg}");
        for o in [
            TaskOptions::default().on_conflict(OnConflict::Replace),
            TaskOptions::default().unique_for(Duration::from_secs(1)),
            TaskOptions::default().unique_states(UNIQUE_STATES_REQUIRED),
        ] {
            assert_eq!(unique_rules(&o).unwrap_err().1, "needs a unique_key");
        }
        assert_eq!(
            unique_rules(&keyed().unique_for(Duration::ZERO))
                .unwrap_err()
                .0,
            "unique_for"
        );
    }

    #[test]
    fn batches_are_ordered_parents_first() {
        let rows = vec![row(&[2]), row(&[]), row(&[1]), row(&[0, 2])];
        let order = dependency_order(&rows).unwrap();
        let pos = |i| order.iter().position(|&x| x == i).unwrap();
        assert!(
            pos(1) < pos(2) && pos(2) < pos(0) && pos(0) < pos(3),
            "{order:?}"
        );
    }

    #[test]
    fn cycles_and_bad_references_are_named() {
        let e = dependency_order(&[row(&[]), row(&[2]), row(&[3]), row(&[1])]).unwrap_err();
        let s = e.to_string();
        assert!(
            s.contains("a cycle") && s.contains("tasks[1]") && s.contains("tasks[3]"),
            "{s}"
        );
        let e = dependency_order(&[row(&[5])]).unwrap_err();
        assert!(e.to_string().starts_with("tasks[0].depends_on"), "{e}");
        let e = dependency_order(&[row(&[0])]).unwrap_err();
        assert!(e.to_string().contains("not another task"), "{e}");
    }
}
