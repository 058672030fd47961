-- tasks_state_id (state, id) took a new entry at every transition of every
-- task, on the writer thread that bounds the drain, for reads that
-- tasks_queue_state (queue, state, id) serves as well, one queue at a time:
-- lists of one state across queues and retention's pruning (see rows.rs).
DROP INDEX IF EXISTS tasks_state_id;
