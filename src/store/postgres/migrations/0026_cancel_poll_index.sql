-- The running tasks of a node that were asked to cancel. Each node polls
-- for them every heartbeat (a NOTIFY can be lost), and without this index
-- the poll walked every running task of the cluster: with 100 nodes and
-- 40,000 tasks running, 3,750 buffers a poll, 50 polls a second. Entries
-- exist only between a cancel request and the task's end, so the index is
-- nearly always empty.
CREATE INDEX tasks_cancel_poll ON {schema}.tasks (node) WHERE state = 'running' AND cancel_requested;
