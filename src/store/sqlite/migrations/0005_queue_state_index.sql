-- Bounded counts and per-queue listing for the dashboard; node counters.
-- Serves bounded counts per queue and state, and listing one queue's tasks
-- (one range per state, merged), so neither walks the whole table.
CREATE INDEX tasks_queue_state ON tasks (queue, state, id);
-- What the node's pool did since it started (JSON, see NodeStats).
ALTER TABLE nodes ADD COLUMN stats TEXT NOT NULL DEFAULT '{}';
