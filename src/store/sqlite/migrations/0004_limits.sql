-- Cluster-wide limits: running tasks by key, start counts per window.
ALTER TABLE tasks ADD COLUMN concurrency_key TEXT;
-- Serves cluster-wide limits: running tasks by queue and key.
CREATE INDEX tasks_running_key ON tasks (queue, concurrency_key) WHERE state = 'running';
-- Fixed-window counters of task starts for rate-limited queues.
CREATE TABLE queue_rate (
    queue        TEXT PRIMARY KEY,
    window_start INTEGER NOT NULL,
    started      INTEGER NOT NULL
);
