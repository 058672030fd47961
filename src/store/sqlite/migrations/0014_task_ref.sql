-- The name a task was given in its batch (`ref`): the tasks that depend on
-- it read its result under that name.
ALTER TABLE tasks ADD COLUMN ref_name TEXT;
