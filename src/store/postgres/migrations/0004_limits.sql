-- Cluster-wide limits: running tasks by key, start counts per window.
ALTER TABLE {schema}.tasks ADD COLUMN concurrency_key text;
CREATE INDEX tasks_running_key ON {schema}.tasks (queue, concurrency_key) WHERE state = 'running';
CREATE TABLE {schema}.queue_rate (
    queue        text PRIMARY KEY,
    window_start timestamptz NOT NULL,
    started      integer     NOT NULL
);
