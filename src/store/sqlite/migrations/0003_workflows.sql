-- Workflows: a task waits for the tasks it depends on.
ALTER TABLE tasks ADD COLUMN depends_on TEXT;
ALTER TABLE tasks ADD COLUMN deps_pending INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN has_dependents INTEGER NOT NULL DEFAULT 0;
ALTER TABLE tasks ADD COLUMN dep_failure TEXT;
-- Parent -> child edges of workflows; walked from the parent when it finishes.
CREATE TABLE task_deps (
    parent INTEGER NOT NULL,
    child  INTEGER NOT NULL,
    PRIMARY KEY (parent, child)
) WITHOUT ROWID;
