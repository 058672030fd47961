-- The names of the config (or code) schedules each node declares: a config
-- schedule that no node declares any more is removed by the leader.
ALTER TABLE nodes ADD COLUMN schedules TEXT;
