-- Tags: labels to find tasks by. The task keeps its own (tags); task_tags
-- holds one row per (tag, task) so a tag's newest tasks are an index walk
-- (a GIN index on tags would need a bitmap scan and a sort of every match).
-- Only tagged tasks have rows; the prune deletes them with their tasks.
ALTER TABLE {schema}.tasks ADD COLUMN tags text[];
CREATE TABLE {schema}.task_tags (
    tag     text   NOT NULL,
    task_id bigint NOT NULL,
    PRIMARY KEY (tag, task_id)
);
