-- A unique key is held per kind (as River and Oban scope it): a task of
-- another kind with the same key is a different task.
DROP INDEX {schema}.tasks_unique_key;
CREATE UNIQUE INDEX tasks_unique_key ON {schema}.tasks (kind, unique_key)
    WHERE unique_key IS NOT NULL AND state NOT IN ('completed', 'failed', 'cancelled');
