-- Tags: labels to find tasks by. The task keeps its own (tags, a JSON
-- array); task_tags holds one row per (tag, task) so a tag's newest tasks
-- are an index walk. Only tagged tasks have rows; the prune deletes them
-- with their tasks.
ALTER TABLE tasks ADD COLUMN tags TEXT;
CREATE TABLE task_tags (
    tag     TEXT    NOT NULL,
    task_id INTEGER NOT NULL,
    PRIMARY KEY (tag, task_id)
) WITHOUT ROWID;
