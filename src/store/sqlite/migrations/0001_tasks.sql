-- Tasks, nodes, paused queues and the leader lease.
CREATE TABLE tasks (
    id               INTEGER PRIMARY KEY AUTOINCREMENT,
    kind             TEXT    NOT NULL,
    queue            TEXT    NOT NULL,
    args             TEXT    NOT NULL,
    priority         INTEGER NOT NULL,
    state            TEXT    NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 0,
    max_attempts     INTEGER NOT NULL,
    timeout_ms       INTEGER,
    unique_key       TEXT,
    run_at           INTEGER NOT NULL,
    created_at       INTEGER NOT NULL,
    started_at       INTEGER,
    finished_at      INTEGER,
    node             TEXT,
    result           TEXT,
    errors           TEXT    NOT NULL DEFAULT '[]',
    cancel_requested INTEGER NOT NULL DEFAULT 0
);
-- Serves the claim: due tasks of one queue, most urgent first.
CREATE INDEX tasks_claim ON tasks (queue, priority, run_at, id)
    WHERE state IN ('available', 'scheduled', 'retryable');
-- At most one unfinished task per unique key.
CREATE UNIQUE INDEX tasks_unique_key ON tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state NOT IN ('completed', 'failed', 'cancelled');
-- Serves listing by state (newest first), rescue and cancel polling (state =
-- 'running'), and pruning (state = 'completed' ... in id order, which follows
-- finish order closely enough for a LIMITed delete).
CREATE INDEX tasks_state_id ON tasks (state, id);
CREATE TABLE nodes (
    name         TEXT PRIMARY KEY,
    version      TEXT    NOT NULL,
    started_at   INTEGER NOT NULL,
    heartbeat_at INTEGER NOT NULL,
    workers      INTEGER NOT NULL,
    workers_busy INTEGER NOT NULL,
    queues       TEXT    NOT NULL
);
CREATE TABLE queues (
    name   TEXT PRIMARY KEY,
    paused INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE leader (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    node       TEXT    NOT NULL,
    expires_at INTEGER NOT NULL
);
