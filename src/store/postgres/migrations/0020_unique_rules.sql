-- Uniqueness rules. unique_released: a running holder gave its key up to
-- an `on_conflict: replace` insert (the new task is queued after it), so
-- it no longer holds the key in any state. tasks_unique_finished finds a
-- finished holder for inserts whose unique_states include finished states;
-- only finished tasks with a key have entries.
ALTER TABLE {schema}.tasks ADD COLUMN unique_released boolean NOT NULL DEFAULT false;
DROP INDEX {schema}.tasks_unique_key;
CREATE UNIQUE INDEX tasks_unique_key ON {schema}.tasks (kind, unique_key)
    WHERE unique_key IS NOT NULL AND NOT unique_released
      AND state NOT IN ('completed', 'failed', 'cancelled');
CREATE INDEX tasks_unique_finished ON {schema}.tasks (kind, unique_key, finished_at)
    WHERE unique_key IS NOT NULL AND state IN ('completed', 'failed', 'cancelled');
