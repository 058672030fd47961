-- Workflows: a task waits for the tasks it depends on.
ALTER TABLE {schema}.tasks
    ADD COLUMN depends_on jsonb,
    ADD COLUMN deps_pending integer NOT NULL DEFAULT 0,
    ADD COLUMN has_dependents boolean NOT NULL DEFAULT false,
    ADD COLUMN dep_failure text;
CREATE TABLE {schema}.task_deps (
    parent bigint NOT NULL,
    child  bigint NOT NULL,
    PRIMARY KEY (parent, child)
);
