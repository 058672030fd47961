-- Tasks, nodes, paused queues and the leader lease. {schema} is replaced by
-- the cluster's schema name (checked to be a plain identifier) before running.
CREATE TABLE {schema}.tasks (
    id               bigserial PRIMARY KEY,
    kind             text        NOT NULL,
    queue            text        NOT NULL,
    args             jsonb       NOT NULL,
    priority         smallint    NOT NULL,
    state            text        NOT NULL,
    attempt          integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL,
    timeout_ms       bigint,
    unique_key       text,
    run_at           timestamptz NOT NULL,
    created_at       timestamptz NOT NULL,
    started_at       timestamptz,
    finished_at      timestamptz,
    node             text,
    result           jsonb,
    errors           jsonb       NOT NULL DEFAULT '[]',
    cancel_requested boolean     NOT NULL DEFAULT false
) WITH (fillfactor = 70, autovacuum_vacuum_scale_factor = 0.01,
        autovacuum_vacuum_insert_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02,
        autovacuum_vacuum_cost_delay = 0);
CREATE INDEX tasks_claim ON {schema}.tasks (queue, priority, run_at, id)
    WHERE state IN ('available', 'scheduled', 'retryable');
CREATE UNIQUE INDEX tasks_unique_key ON {schema}.tasks (unique_key)
    WHERE unique_key IS NOT NULL AND state NOT IN ('completed', 'failed', 'cancelled');
CREATE INDEX tasks_state_id ON {schema}.tasks (state, id);
CREATE TABLE {schema}.nodes (
    name         text PRIMARY KEY,
    version      text        NOT NULL,
    started_at   timestamptz NOT NULL,
    heartbeat_at timestamptz NOT NULL,
    workers      integer     NOT NULL,
    workers_busy integer     NOT NULL,
    queues       jsonb       NOT NULL
);
CREATE TABLE {schema}.queues (
    name   text PRIMARY KEY,
    paused boolean NOT NULL DEFAULT false
);
CREATE TABLE {schema}.leader (
    id         integer PRIMARY KEY CHECK (id = 1),
    node       text        NOT NULL,
    expires_at timestamptz NOT NULL
);
