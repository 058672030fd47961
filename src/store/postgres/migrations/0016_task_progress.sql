-- The latest progress a running task reported, kept after it ends.
ALTER TABLE {schema}.tasks ADD COLUMN progress jsonb;
