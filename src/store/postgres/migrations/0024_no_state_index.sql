-- tasks_state_id (state, id) took a new entry on every transition of every
-- task (insert, claim, completion: none of them is a HOT update, since
-- state is indexed), for reads that tasks_queue_state (queue, state, id)
-- serves as well, one queue at a time: lists of one state across queues
-- and retention's pruning walk the queues by a loose index scan. Without
-- it the drain does about a fifth fewer index insertions (docs/benchmarks.md).
DROP INDEX IF EXISTS {schema}.tasks_state_id;
