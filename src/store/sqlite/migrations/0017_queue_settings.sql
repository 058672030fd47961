-- Queue settings shared by the cluster, changed at run time through the API
-- (a node's config gives only the starting values). max_depth: at most this
-- many unfinished tasks in the queue; an enqueue past it is refused.
CREATE TABLE queue_settings (
    queue     TEXT PRIMARY KEY,
    max_depth INTEGER
);
