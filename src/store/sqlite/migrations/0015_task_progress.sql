-- The latest progress a running task reported (JSON), kept after it ends.
ALTER TABLE tasks ADD COLUMN progress TEXT;
