//! Every statement of the PostgreSQL store, with the schema spliced in
//! once per store. The rules they apply (claimable states, claim order,
//! messages) come from [`lifecycle`].

use crate::store::TASK_COLUMNS;
use crate::store::lifecycle::{self, CLAIM_ORDER, DEPENDENCY_FAILED, RESCUED_SUFFIX};
use crate::task::TaskState;

/// True when the settings stored for the queue named by `queue` (an SQL
/// expression) carry cluster-wide limits, as
/// [`QueueSettings::limits`](crate::store::QueueSettings::limits) reads
/// them. The claims and starting inserts of nodes that take the queue for
/// unlimited check it, so a limit set on another node holds from the
/// moment it is written, before this node hears of it (a notification, or
/// its next poll): until then this node's claims of the queue take nothing.
fn stored_limits(s: &str, queue: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM {s}.queue_settings qs WHERE qs.queue = {queue} \
           AND (jsonb_typeof(qs.limits->'global_concurrency') = 'number' \
             OR jsonb_typeof(qs.limits->'per_key_concurrency') = 'number' \
             OR jsonb_typeof(qs.limits->'rate_limit') = 'object' \
             OR qs.limits->>'fairness' = 'round_robin'))"
    )
}

/// The limits a claim of a limited queue applies (`lim`: `g` global,
/// `pk` per key, `has_rate`, `rmax` and `rper` (µs) its rate): each one the
/// stored settings set, else the claimer's own ($4, $8, and $9, $5, $6 for
/// the rate). So a limit set or changed on another node holds from the
/// moment it is written, before this claimer has read it; one removed
/// there holds on, the safe way, until the claimer has read that.
fn effective_limits(s: &str) -> String {
    format!(
        "stored AS (SELECT qs.limits AS l FROM {s}.queue_settings qs WHERE qs.queue = $1), \
         lim AS (SELECT \
           coalesce((stored.l->>'global_concurrency')::bigint, $4::bigint) AS g, \
           coalesce((stored.l->>'per_key_concurrency')::bigint, $8::bigint) AS pk, \
           coalesce(jsonb_typeof(stored.l->'rate_limit') = 'object', false) OR $9::bool AS has_rate, \
           CASE WHEN jsonb_typeof(stored.l->'rate_limit') = 'object' \
                THEN (stored.l->'rate_limit'->>'max')::bigint ELSE $5::bigint END AS rmax, \
           CASE WHEN jsonb_typeof(stored.l->'rate_limit') = 'object' \
                THEN (stored.l->'rate_limit'->>'per_ms')::bigint * 1000 ELSE $6::bigint END AS rper \
         FROM (SELECT 1) one LEFT JOIN stored ON true)"
    )
}

/// Every statement, with the schema spliced in once.
pub(super) struct Sql {
    pub insert_many: String,
    pub insert_one: String,
    pub insert_started: String,
    pub parents_lock: String,
    pub deps_insert: String,
    pub parents_mark: String,
    pub unblock: String,
    pub cascade: String,
    pub claim_limited: String,
    pub claim_limited_fair: String,
    pub running_keys_sub: String,
    pub running_keys_drop: String,
    pub find_unique: String,
    pub find_finished: String,
    pub undo_insert: String,
    pub replace_pending: String,
    pub release_key: String,
    pub claim: String,
    pub notify_many: String,
    pub waiting_announce: String,
    pub complete_many: String,
    pub get: String,
    pub get_for_update: String,
    pub cancel_running: String,
    pub cancel_queued: String,
    pub retry: String,
    pub cancel_requested: String,
    pub prune: String,
    pub queue_counts: String,
    pub queue_oldest_due: String,
    pub queue_set_paused: String,
    pub queue_paused: String,
    pub heartbeat: String,
    pub node_take: String,
    pub node_remove: String,
    pub leader_remove: String,
    pub node_list: String,
    pub rescue_dead: String,
    pub unfinished: String,
    pub get_many: String,
    pub rescue_node: String,
    pub elect: String,
    pub schedule_upsert: String,
    pub schedule_delete: String,
    pub schedule_list: String,
    pub schedule_set_paused: String,
    pub settings_list: String,
    pub settings_put: String,
    pub settings_init: String,
    pub capped_queues: String,
    pub fair_queues: String,
    pub fair_vtime: String,
    pub fair_adopt: String,
    pub fair_keys_lock: String,
    pub fair_keys_put: String,
    pub fair_keys_prune: String,
    pub caps_lock: String,
    pub depth_upto: String,
    pub schedule_move: String,
    pub audit_append: String,
    pub audit_list: String,
    pub audit_prune: String,
    pub progress: String,
}

/// `qs(q)`: the queues that have tasks in schema `s`, by a loose index scan
/// of tasks_queue_state (one probe each; the last row is NULL). For a
/// `WITH RECURSIVE` list.
pub(super) fn queues_cte(s: &str) -> String {
    format!(
        "qs(q) AS ( \
           SELECT min(queue) FROM {s}.tasks \
           UNION ALL \
           SELECT (SELECT min(queue) FROM {s}.tasks WHERE queue > qs.q) FROM qs WHERE qs.q IS NOT NULL)"
    )
}

impl Sql {
    pub(super) fn new(s: &str) -> Self {
        let claimable = lifecycle::sql_states(&lifecycle::CLAIMABLE);
        let finished = lifecycle::sql_states(&lifecycle::FINISHED);
        let pending = lifecycle::sql_states(&lifecycle::REPLACEABLE);
        let all_states = lifecycle::sql_states(&TaskState::ALL);
        let queues = queues_cte(s);
        let node_upsert = format!(
            "INSERT INTO {s}.nodes (name, version, started_at, heartbeat_at, workers, workers_busy, queues, \
               stats, instance, schedules, kinds) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) ON CONFLICT (name) DO UPDATE SET \
             version = excluded.version, started_at = excluded.started_at, heartbeat_at = excluded.heartbeat_at, \
             workers = excluded.workers, workers_busy = excluded.workers_busy, queues = excluded.queues, \
             stats = excluded.stats, instance = excluded.instance, schedules = excluded.schedules, \
             kinds = excluded.kinds"
        );
        // Keeps `running_keys` in step with claims of tasks that have a key
        // (read by per-key limits instead of counting running rows, whose
        // index fills with dead entries between vacuums).
        #[allow(non_snake_case)]
        let RUNNING_KEYS_ADD = format!(
            "INSERT INTO {s}.running_keys (queue, key, n) \
             SELECT queue, concurrency_key, count(*) FROM claimed WHERE concurrency_key IS NOT NULL \
             GROUP BY queue, concurrency_key \
             ON CONFLICT (queue, key) DO UPDATE SET n = {s}.running_keys.n + excluded.n"
        );
        let rescue_set = format!(
            "UPDATE {s}.tasks SET \
               state = CASE WHEN cancel_requested THEN 'cancelled' \
                            WHEN attempt >= max_attempts THEN 'failed' ELSE 'retryable' END, \
               finished_at = CASE WHEN cancel_requested OR attempt >= max_attempts THEN $1::timestamptz ELSE NULL END, \
               run_at = $1::timestamptz, \
               errors = errors || jsonb_build_array(jsonb_build_object('attempt', attempt, 'at', $2::text, \
                 'message', 'node ' || coalesce(node, '?') || '{RESCUED_SUFFIX}'))"
        );
        // The claim of a limited (or round-robin) queue; `fair` orders by
        // (priority, fair_seq, id) and moves the queue's virtual time.
        let claim_limited_sql = |fair: bool| {
            let order = if fair {
                "priority, fair_seq, id"
            } else {
                CLAIM_ORDER
            };
            let picked_order = if fair {
                "r.priority, r.fair_seq, r.id"
            } else {
                "r.priority, r.run_at, r.id"
            };
            // Round robin walks tasks_fair: tasks with a fair_seq only.
            let only_fair = if fair {
                " AND fair_seq IS NOT NULL"
            } else {
                ""
            };
            let vtime = if fair {
                format!(
                    ", fair AS (INSERT INTO {s}.queue_fair (queue, vtime) \
                       SELECT $1, max(fair_seq) FROM claimed HAVING max(fair_seq) IS NOT NULL \
                       ON CONFLICT (queue) DO UPDATE SET vtime = greatest({s}.queue_fair.vtime, excluded.vtime))"
                )
            } else {
                String::new()
            };
            format!(
                "WITH {lim}, \
                 rl AS ( \
                   SELECT CASE WHEN q.window_start IS NULL OR $2 - q.window_start >= make_interval(secs => (SELECT rper FROM lim) / 1e6) \
                               THEN $2 ELSE q.window_start END AS ws, \
                          CASE WHEN q.window_start IS NULL OR $2 - q.window_start >= make_interval(secs => (SELECT rper FROM lim) / 1e6) \
                               THEN 0 ELSE q.started END AS st \
                   FROM (SELECT 1) one LEFT JOIN {s}.queue_rate q ON q.queue = $1), \
                 running AS (SELECT count(*) AS n FROM {s}.tasks WHERE queue = $1 AND state = 'running'), \
                 allowed AS (SELECT greatest(0, least($3::bigint, (SELECT g FROM lim) - (SELECT n FROM running), \
                                                      (SELECT rmax FROM lim) - (SELECT st FROM rl))) AS n), \
                 cand AS (SELECT id, priority, run_at, concurrency_key, fair_seq FROM {s}.tasks \
                   WHERE queue = $1 AND state IN ({claimable}) AND run_at <= $2{only_fair} \
                     AND NOT EXISTS (SELECT 1 FROM {s}.queues WHERE name = $1 AND paused) \
                     AND (concurrency_key IS NULL OR concurrency_key NOT IN \
                       (SELECT key FROM {s}.running_keys WHERE queue = $1 AND n >= (SELECT pk FROM lim))) \
                   ORDER BY {order} LIMIT (SELECT n * $7 + $11 FROM allowed)), \
                 ranked AS (SELECT c.*, row_number() OVER (PARTITION BY concurrency_key ORDER BY {order}) AS rk \
                   FROM cand c), \
                 keyrun AS (SELECT key AS k, n FROM {s}.running_keys WHERE queue = $1), \
                 picked AS (SELECT r.id FROM ranked r LEFT JOIN keyrun ON keyrun.k = r.concurrency_key \
                   WHERE r.concurrency_key IS NULL OR r.rk + coalesce(keyrun.n, 0) <= (SELECT pk FROM lim) \
                   ORDER BY {picked_order} LIMIT (SELECT n FROM allowed)), \
                 claimed AS (UPDATE {s}.tasks t SET state = 'running', attempt = t.attempt + 1, claim_token = t.claim_token + 1, node = $10, \
                   started_at = $2, cancel_requested = false \
                   WHERE t.id = ANY(ARRAY(SELECT id FROM picked)) \
                     AND t.state IN ({claimable}) RETURNING t.*), \
                 counted AS ({RUNNING_KEYS_ADD}), \
                 saved AS (INSERT INTO {s}.queue_rate (queue, window_start, started) \
                   SELECT $1, ws, st + (SELECT count(*) FROM claimed) FROM rl WHERE (SELECT has_rate FROM lim) \
                   ON CONFLICT (queue) DO UPDATE SET window_start = excluded.window_start, started = excluded.started){vtime} \
                 SELECT {TASK_COLUMNS} FROM claimed",
                lim = effective_limits(s),
            )
        };
        Sql {
            // Tags come as one JSON array per row ($11, null for none): a
            // text[][] cannot hold rows of different lengths.
            insert_many: format!(
                "WITH ins AS (INSERT INTO {s}.tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, run_at, \
                   created_at, concurrency_key, ref_name, tags, fair_seq, traceparent) \
                 SELECT kind, queue, args, priority, CASE WHEN run_at > $8 THEN 'scheduled' ELSE 'available' END, \
                        max_attempts, timeout_ms, run_at, $8, ckey, rname, \
                        CASE WHEN tg IS NULL THEN NULL ELSE ARRAY(SELECT jsonb_array_elements_text(tg)) END, fseq, tp \
                 FROM unnest($1::text[], $2::text[], $3::jsonb[], $4::int2[], $5::int4[], $6::int8[], $7::timestamptz[], \
                             $9::text[], $10::text[], $11::jsonb[], $12::int8[], $13::text[]) \
                   WITH ORDINALITY AS t(kind, queue, args, priority, max_attempts, timeout_ms, run_at, ckey, rname, tg, fseq, tp, ord) \
                 ORDER BY ord RETURNING id, tags), \
                 tagged AS (INSERT INTO {s}.task_tags (tag, task_id) SELECT unnest(tags), id FROM ins WHERE tags IS NOT NULL) \
                 SELECT id FROM ins"
            ),
            insert_one: format!(
                "WITH ins AS (INSERT INTO {s}.tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, unique_key, \
                   run_at, created_at, depends_on, deps_pending, dep_failure, finished_at, errors, concurrency_key, \
                   ref_name, tags, fair_seq, traceparent) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, $20) \
                 ON CONFLICT (kind, unique_key) WHERE unique_key IS NOT NULL AND NOT unique_released \
                   AND state NOT IN ({finished}) DO NOTHING \
                 RETURNING {TASK_COLUMNS}), \
                 tagged AS (INSERT INTO {s}.task_tags (tag, task_id) SELECT unnest(tags), id FROM ins WHERE tags IS NOT NULL) \
                 SELECT * FROM ins"
            ),
            // One plain task, inserted already claimed by node $10 unless
            // its queue is paused or has limits (then as insert_many would).
            insert_started: format!(
                "WITH go AS (SELECT NOT EXISTS (SELECT 1 FROM {s}.queues WHERE name = $2::text AND paused) \
                   AND NOT {limited} AS now) \
                 INSERT INTO {s}.tasks (kind, queue, args, priority, state, max_attempts, timeout_ms, run_at, \
                   created_at, traceparent, attempt, claim_token, node, started_at) \
                 SELECT $1, $2, $3, $4, CASE WHEN go.now THEN 'running' WHEN $7::timestamptz > $8::timestamptz THEN 'scheduled' ELSE 'available' END, \
                   $5, $6, $7, $8, $9, CASE WHEN go.now THEN 1 ELSE 0 END, CASE WHEN go.now THEN 1 ELSE 0 END, \
                   CASE WHEN go.now THEN $10 END, CASE WHEN go.now THEN $8 END FROM go \
                 RETURNING {TASK_COLUMNS}",
                limited = stored_limits(s, "$2::text"),
            ),
            parents_lock: format!(
                "SELECT id, state FROM {s}.tasks WHERE id = ANY($1) ORDER BY id FOR UPDATE"
            ),
            deps_insert: format!(
                "INSERT INTO {s}.task_deps (parent, child) SELECT unnest($1::int8[]), $2 ON CONFLICT DO NOTHING"
            ),
            parents_mark: format!("UPDATE {s}.tasks SET has_dependents = true WHERE id = ANY($1)"),
            running_keys_sub: format!(
                "UPDATE {s}.running_keys r SET n = greatest(0, r.n - d.c) \
                 FROM (SELECT q, k, count(*) AS c FROM unnest($1::text[], $2::text[]) AS u(q, k) GROUP BY q, k) d \
                 WHERE r.queue = d.q AND r.key = d.k"
            ),
            // Keys with nothing running leave the table (a claim that races
            // this re-inserts its row; the delete re-checks n on the row it locks).
            running_keys_drop: format!(
                "DELETE FROM {s}.running_keys WHERE n <= 0 \
                 AND (queue, key) IN (SELECT * FROM unnest($1::text[], $2::text[]))"
            ),
            claim_limited: claim_limited_sql(false),
            claim_limited_fair: claim_limited_sql(true),
            unblock: format!(
                "UPDATE {s}.tasks c SET deps_pending = c.deps_pending - x.n, \
                   state = CASE WHEN c.deps_pending - x.n <= 0 THEN 'available' ELSE c.state END \
                 FROM (SELECT child, count(*)::int AS n FROM {s}.task_deps WHERE parent = ANY($1) GROUP BY child) x \
                 WHERE c.id = x.child AND c.state = 'blocked'"
            ),
            cascade: format!(
                "WITH RECURSIVE doomed(id) AS ( \
                   SELECT child FROM {s}.task_deps WHERE parent = ANY($1) \
                   UNION SELECT d.child FROM {s}.task_deps d JOIN doomed ON d.parent = doomed.id) \
                 UPDATE {s}.tasks SET state = CASE WHEN dep_failure = 'fail' THEN 'failed' ELSE 'cancelled' END, \
                   finished_at = $2, \
                   errors = errors || jsonb_build_array(jsonb_build_object('attempt', attempt, 'at', $3::text, \
                     'message', '{DEPENDENCY_FAILED}')) \
                 WHERE id IN (SELECT id FROM doomed) AND state = 'blocked' RETURNING id"
            ),
            find_unique: format!(
                "SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE kind = $1 AND unique_key = $2 \
                 AND NOT unique_released AND state NOT IN ({finished})"
            ),
            // The latest finished holder in states $3 (finished after $4,
            // when set), other than the task $5 just inserted.
            find_finished: format!(
                "SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE kind = $1 AND unique_key = $2 \
                 AND state IN ({finished}) AND state = ANY($3::text[]) \
                 AND ($4::timestamptz IS NULL OR finished_at >= $4) AND id <> $5 \
                 ORDER BY finished_at DESC LIMIT 1"
            ),
            undo_insert: format!(
                "WITH gone AS (DELETE FROM {s}.tasks WHERE id = $1 RETURNING id, tags) \
                 DELETE FROM {s}.task_tags WHERE (tag, task_id) IN \
                   (SELECT unnest(tags), id FROM gone WHERE tags IS NOT NULL)"
            ),
            replace_pending: format!(
                "UPDATE {s}.tasks SET args = $2, priority = $3, run_at = $4::timestamptz, \
                   state = CASE WHEN state = 'blocked' THEN 'blocked' \
                                WHEN $4::timestamptz > $5::timestamptz THEN 'scheduled' ELSE 'available' END \
                 WHERE id = $1 AND state IN ({pending}) AND NOT unique_released \
                 RETURNING {TASK_COLUMNS}"
            ),
            release_key: format!(
                "UPDATE {s}.tasks SET unique_released = true WHERE id = $1 AND state = 'running'"
            ),
            // `$2` are the payloads, `$3` the prefix of those that list
            // finished tasks: they are for waiters in other processes, so
            // they go out only while one of those (`$4` is this one's
            // mark) has said it waits. A process says so before its
            // waiters first read their tasks, and this runs after the
            // finishes it announces committed, so a waiter either reads
            // its task finished or is announced the finish.
            notify_many: format!(
                "SELECT pg_notify($1, p) FROM unnest($2::text[]) AS p \
                 WHERE NOT starts_with(p, $3) \
                    OR EXISTS (SELECT 1 FROM {s}.waiting WHERE until > now() AND origin <> $4)"
            ),
            // Marks of processes that stopped waiting a minute ago go.
            waiting_announce: format!(
                "WITH gone AS (DELETE FROM {s}.waiting WHERE until < now() - interval '1 minute' AND origin <> $1) \
                 INSERT INTO {s}.waiting (origin, until) VALUES ($1, now() + make_interval(secs => $2::float8)) \
                 ON CONFLICT (origin) DO UPDATE SET until = excluded.until"
            ),
            // The update finds the picked tasks by primary key (`= ANY` of
            // the picked ids): joined to `next` instead, the generic plan
            // (LIMIT $4 guessed at a tenth of the queue) hashed a sequential
            // scan of the whole table.
            claim: format!(
                "WITH next AS ( \
                   SELECT id FROM {s}.tasks \
                   WHERE queue = $3 AND state IN ({claimable}) AND run_at <= $2 \
                     AND NOT EXISTS (SELECT 1 FROM {s}.queues WHERE name = $3 AND paused) \
                     AND NOT {limited} \
                   ORDER BY {CLAIM_ORDER} LIMIT $4 FOR UPDATE SKIP LOCKED) \
                 , claimed AS (UPDATE {s}.tasks t SET state = 'running', attempt = t.attempt + 1, claim_token = t.claim_token + 1, node = $1, \
                   started_at = $2, cancel_requested = false \
                 WHERE t.id = ANY(ARRAY(SELECT id FROM next)) RETURNING t.*), \
                 counted AS ({RUNNING_KEYS_ADD}) \
                 SELECT {TASK_COLUMNS} FROM claimed",
                limited = stored_limits(s, "$3"),
            ),
            complete_many: format!(
                // `c.yields AND t.cancel_requested`: cancel is final (see
                // lifecycle::Transition::yields_to_cancel).
                //
                // Each task is found by its primary key. `t.state =
                // c.running` (a join clause, the subquery kept apart by
                // OFFSET 0) rather than `t.state = 'running'`, which lets the
                // planner answer with the partial index of running tasks:
                // estimated from a quiet moment's statistics, it scanned
                // every running task of the cluster (20,000 with 100 nodes)
                // to complete each batch of a hundred.
                "UPDATE {s}.tasks t SET \
                   state = CASE WHEN c.yields AND t.cancel_requested THEN 'cancelled' ELSE c.state END, \
                   finished_at = CASE WHEN c.yields AND t.cancel_requested THEN c.at ELSE c.finished_at END, \
                   result = CASE WHEN c.state = 'completed' THEN c.result ELSE t.result END, \
                   run_at = CASE WHEN c.yields AND t.cancel_requested THEN t.run_at \
                                 ELSE coalesce(c.run_at, t.run_at) END, \
                   errors = CASE WHEN c.yields AND t.cancel_requested THEN t.errors || jsonb_build_array(c.cancel_error) \
                                 WHEN c.error IS NULL THEN t.errors ELSE t.errors || jsonb_build_array(c.error) END, \
                   attempt = CASE WHEN c.yields AND t.cancel_requested THEN t.attempt ELSE t.attempt + c.delta END \
                 FROM (SELECT *, 'running' AS running FROM \
                         unnest($1::int8[], $2::int8[], $3::text[], $4::timestamptz[], $5::jsonb[], $6::timestamptz[], \
                                $7::jsonb[], $8::int4[], $9::bool[], $10::jsonb[], $11::timestamptz[]) \
                         AS c(id, token, state, finished_at, result, run_at, error, delta, yields, cancel_error, at) \
                       OFFSET 0) c \
                 WHERE t.id = c.id AND t.state = c.running AND t.claim_token = c.token \
                 RETURNING t.id, t.has_dependents, t.state, t.queue, t.concurrency_key"
            ),
            get: format!("SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE id = $1"),
            get_many: format!("SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE id = ANY($1)"),
            unfinished: format!(
                "SELECT id FROM {s}.tasks WHERE id = ANY($1) AND state NOT IN ({finished})"
            ),
            get_for_update: format!(
                "SELECT {TASK_COLUMNS} FROM {s}.tasks WHERE id = $1 FOR UPDATE"
            ),
            cancel_running: format!(
                "UPDATE {s}.tasks SET cancel_requested = true WHERE id = $1 RETURNING {TASK_COLUMNS}"
            ),
            cancel_queued: format!(
                "UPDATE {s}.tasks SET state = 'cancelled', finished_at = $2 WHERE id = $1 RETURNING {TASK_COLUMNS}"
            ),
            retry: format!(
                "UPDATE {s}.tasks SET state = $3, deps_pending = $4, run_at = $2, finished_at = NULL, \
                 cancel_requested = false, max_attempts = greatest(max_attempts, attempt + 1) \
                 WHERE id = $1 RETURNING {TASK_COLUMNS}"
            ),
            cancel_requested: format!(
                "SELECT id, claim_token FROM {s}.tasks WHERE state = 'running' AND node = $1 AND cancel_requested"
            ),
            // The pruned tasks' workflow edges go with them (an edge is
            // only walked while its child can still be blocked), and so do
            // their tags' rows.
            // The old tasks of state $1, oldest ids first, queue by queue
            // (a loose index scan of tasks_queue_state, as `queue_counts`).
            prune: format!(
                "WITH RECURSIVE {queues}, \
                 victims AS (SELECT v.id FROM qs CROSS JOIN LATERAL (SELECT id FROM {s}.tasks \
                   WHERE queue = qs.q AND state = $1 AND finished_at < $2 ORDER BY id LIMIT $3) v \
                   WHERE qs.q IS NOT NULL LIMIT $3), \
                 gone AS (DELETE FROM {s}.tasks WHERE id IN (SELECT id FROM victims) RETURNING id, tags), \
                 edges AS (DELETE FROM {s}.task_deps WHERE parent IN (SELECT id FROM gone) \
                   OR child IN (SELECT id FROM gone)), \
                 untagged AS (DELETE FROM {s}.task_tags WHERE (tag, task_id) IN \
                   (SELECT unnest(tags), id FROM gone WHERE tags IS NOT NULL)) \
                 SELECT count(*) FROM gone"
            ),
            // The queues by a loose index scan (one probe each), then a
            // count of each (queue, state) range that stops at the cap ($1).
            // `ORDER BY id` is the tasks_queue_state index's own order: it
            // keeps the count an index walk even when the planner thinks a
            // sequential scan would find `cap` rows sooner (stale visibility
            // after a VACUUM that a long transaction held back).
            queue_counts: format!(
                "WITH RECURSIVE {queues} \
                 SELECT qs.q, st.s, c.n FROM qs \
                 CROSS JOIN unnest(ARRAY[{all_states}]) AS st(s) \
                 CROSS JOIN LATERAL (SELECT count(*) AS n FROM \
                   (SELECT 1 FROM {s}.tasks WHERE queue = qs.q AND state = st.s ORDER BY id \
                    LIMIT CASE WHEN st.s IN ({finished}) THEN $2::bigint ELSE $1::bigint END) x) c \
                 WHERE qs.q IS NOT NULL AND c.n > 0"
            ),
            // A skip scan of the claim index over (queue, priority), then
            // the earliest run_at of each pair: one index probe per pair.
            // Rows come in (queue, priority) order; the store folds them per
            // queue (a GROUP BY here would sort).
            queue_oldest_due: format!(
                "WITH RECURSIVE qp(q, p) AS ( \
                   (SELECT queue, priority FROM {s}.tasks WHERE state IN ({claimable}) \
                    ORDER BY queue, priority LIMIT 1) \
                   UNION ALL \
                   SELECT n.queue, n.priority FROM qp CROSS JOIN LATERAL ( \
                     SELECT queue, priority FROM {s}.tasks WHERE state IN ({claimable}) \
                     AND (queue, priority) > (qp.q, qp.p) ORDER BY queue, priority LIMIT 1) n) \
                 SELECT qp.q, o.run_at FROM qp CROSS JOIN LATERAL ( \
                   SELECT run_at FROM {s}.tasks WHERE state IN ({claimable}) \
                   AND queue = qp.q AND priority = qp.p ORDER BY run_at LIMIT 1) o \
                 WHERE o.run_at <= $1"
            ),
            queue_set_paused: format!(
                "INSERT INTO {s}.queues (name, paused) VALUES ($1, $2) \
                 ON CONFLICT (name) DO UPDATE SET paused = excluded.paused"
            ),
            queue_paused: format!("SELECT name FROM {s}.queues WHERE paused ORDER BY name"),
            // Only while the name is unheld or this instance's.
            heartbeat: format!(
                "{node_upsert} WHERE {s}.nodes.instance = excluded.instance OR {s}.nodes.instance = '' \
                 RETURNING name"
            ),
            node_take: format!("{node_upsert} RETURNING name"),
            node_remove: format!("DELETE FROM {s}.nodes WHERE name = $1"),
            leader_remove: format!("DELETE FROM {s}.leader WHERE node = $1"),
            node_list: format!(
                "SELECT n.name, n.version, n.started_at, n.heartbeat_at, n.workers, n.workers_busy, n.queues, \
                   (l.node IS NOT NULL), n.stats, n.instance, n.schedules, n.kinds FROM {s}.nodes n \
                 LEFT JOIN {s}.leader l ON l.node = n.name AND l.expires_at > $1 ORDER BY n.name"
            ),
            // The tasks of dead nodes, skipping rows another transaction
            // holds: a completion that is landing (the task is not lost),
            // or another rescuer (it takes them). Waiting for those locks
            // instead queued rescuers behind each other, each holding a
            // pooled connection for seconds. A skipped task that is still
            // running on a dead node is taken by the next rescue.
            rescue_dead: format!(
                "WITH dead AS (SELECT id FROM {s}.tasks WHERE state = 'running' AND (node IS NULL OR node NOT IN \
                   (SELECT name FROM {s}.nodes WHERE heartbeat_at >= $3)) FOR UPDATE SKIP LOCKED) \
                 {rescue_set} WHERE id = ANY(ARRAY(SELECT id FROM dead)) AND state = 'running' \
                 RETURNING id, node, state, queue, concurrency_key"
            ),
            rescue_node: format!(
                "{rescue_set} WHERE state = 'running' AND node = $3 AND NOT (id = ANY($4)) \
                 AND started_at < $5 RETURNING id, node, state, queue, concurrency_key"
            ),
            schedule_upsert: format!(
                "INSERT INTO {s}.schedules (name, spec, source, last_tick) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (name) DO UPDATE SET spec = excluded.spec, source = excluded.source"
            ),
            schedule_delete: format!("DELETE FROM {s}.schedules WHERE name = $1"),
            schedule_list: format!(
                "SELECT name, spec, source, last_tick, paused FROM {s}.schedules ORDER BY name"
            ),
            settings_list: format!(
                "SELECT queue, max_depth, limits FROM {s}.queue_settings ORDER BY queue"
            ),
            // Settings written as they are change no row (so wake no node).
            settings_put: format!(
                "INSERT INTO {s}.queue_settings (queue, max_depth, limits) VALUES ($1, $2, $3) \
                 ON CONFLICT (queue) DO UPDATE SET max_depth = excluded.max_depth, limits = excluded.limits \
                 WHERE ({s}.queue_settings.max_depth, {s}.queue_settings.limits) \
                   IS DISTINCT FROM (excluded.max_depth, excluded.limits)"
            ),
            // A node's starting values: a queue with settings keeps them
            // (its limits are filled in only if never written).
            settings_init: format!(
                "INSERT INTO {s}.queue_settings (queue, max_depth, limits) VALUES ($1, $2, $3) \
                 ON CONFLICT (queue) DO UPDATE SET limits = excluded.limits \
                 WHERE {s}.queue_settings.limits IS NULL"
            ),
            fair_queues: format!(
                "SELECT queue FROM {s}.queue_settings WHERE limits->>'fairness' = 'round_robin'"
            ),
            fair_vtime: format!("SELECT vtime FROM {s}.queue_fair WHERE queue = $1"),
            fair_adopt: format!(
                "UPDATE {s}.tasks SET fair_seq = 0 WHERE queue = $1 AND fair_seq IS NULL \
                 AND state IN ({claimable}, 'blocked')"
            ),
            // The keys' rows lock in key order: inserts never deadlock on them.
            fair_keys_lock: format!(
                "SELECT key, last_seq FROM {s}.fair_keys WHERE queue = $1 AND key = ANY($2) \
                 ORDER BY key FOR UPDATE"
            ),
            fair_keys_put: format!(
                "INSERT INTO {s}.fair_keys (queue, key, last_seq) \
                 SELECT $1, k, n FROM unnest($2::text[], $3::int8[]) AS u(k, n) \
                 ON CONFLICT (queue, key) DO UPDATE SET last_seq = greatest({s}.fair_keys.last_seq, excluded.last_seq)"
            ),
            // A key whose last task is behind the virtual time counts as new.
            fair_keys_prune: format!(
                "DELETE FROM {s}.fair_keys f USING {s}.queue_fair q \
                 WHERE f.queue = q.queue AND f.last_seq <= q.vtime"
            ),
            capped_queues: format!(
                "SELECT queue, max_depth IS NOT NULL, coalesce(limits->>'fairness' = 'round_robin', false) \
                 FROM {s}.queue_settings WHERE max_depth IS NOT NULL OR limits->>'fairness' = 'round_robin'"
            ),
            // Locks each capped queue of $1 for the transaction, in name
            // order (two batches over the same queues cannot deadlock).
            caps_lock: format!(
                "SELECT q.queue, q.max_depth FROM (SELECT queue, max_depth FROM {s}.queue_settings \
                 WHERE queue = ANY($1) AND max_depth IS NOT NULL ORDER BY queue) q, \
                 LATERAL (SELECT pg_advisory_xact_lock(hashtext('proto_tasker_cap:{s}:' || q.queue))) l"
            ),
            // Unfinished tasks of queue $1, counted up to $2 (the cap + 1).
            depth_upto: format!(
                "SELECT count(*) FROM (SELECT 1 FROM {s}.tasks WHERE queue = $1 \
                 AND state NOT IN ({finished}) LIMIT $2) t"
            ),
            schedule_set_paused: format!("UPDATE {s}.schedules SET paused = $1 WHERE name = $2"),
            schedule_move: format!(
                "UPDATE {s}.schedules SET last_tick = $1 WHERE name = $2 AND last_tick = $3"
            ),
            // A node that sees another's lease still current inserts
            // nothing, so it takes no lock: `ON CONFLICT DO UPDATE` locks
            // the leader row even when its WHERE then fails, and a hundred
            // nodes queued on that one row every heartbeat. One that sees
            // the lease lapsed, or its own, goes through the upsert as
            // before, so of two takers only one wins.
            elect: format!(
                "INSERT INTO {s}.leader (id, node, expires_at) SELECT 1, $1::text, $2::timestamptz \
                 WHERE NOT EXISTS (SELECT 1 FROM {s}.leader WHERE id = 1 AND node <> $1::text AND expires_at > $3) \
                 ON CONFLICT (id) DO UPDATE SET node = excluded.node, expires_at = excluded.expires_at \
                 WHERE {s}.leader.node = excluded.node OR {s}.leader.expires_at <= $3 RETURNING node"
            ),
            audit_append: format!(
                "INSERT INTO {s}.audit (at, token, remote, action, target, status, outcome) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7)"
            ),
            audit_list: format!(
                "SELECT id, at, token, remote, action, target, status, outcome FROM {s}.audit \
                 WHERE id < $1 ORDER BY id DESC LIMIT $2"
            ),
            progress: format!(
                "UPDATE {s}.tasks t SET progress = x.p \
                 FROM unnest($1::int8[], $2::int8[], $3::jsonb[]) AS x(id, token, p) \
                 WHERE t.id = x.id AND t.claim_token = x.token"
            ),
            audit_prune: format!(
                "DELETE FROM {s}.audit WHERE id IN (SELECT id FROM {s}.audit WHERE at < $1 LIMIT $2)"
            ),
        }
    }
}
