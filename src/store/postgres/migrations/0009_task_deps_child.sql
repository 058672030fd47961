-- Edges are also found by child (when a pruned task's edges go with it).
CREATE INDEX task_deps_child ON {schema}.task_deps (child);
