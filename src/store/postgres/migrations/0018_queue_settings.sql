-- Queue settings shared by the cluster, changed at run time through the API
-- (a node's config gives only the starting values). max_depth: at most this
-- many unfinished tasks in the queue; an enqueue past it is refused.
CREATE TABLE {schema}.queue_settings (
    queue     text PRIMARY KEY,
    max_depth integer
);
