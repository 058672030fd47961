-- Bounded counts and per-queue listing for the dashboard; node counters.
-- Serves bounded counts per queue and state, and listing one queue's
-- tasks (one range per state, merged): neither walks the whole table.
CREATE INDEX tasks_queue_state ON {schema}.tasks (queue, state, id);
-- What the node's pool did since it started (see NodeStats).
ALTER TABLE {schema}.nodes ADD COLUMN stats jsonb NOT NULL DEFAULT '{}';
