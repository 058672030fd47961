-- Fairness (round robin across concurrency keys), as start-time fair
-- queueing: a task of a round-robin queue gets fair_seq = max(the queue's
-- virtual time, its key's last fair_seq) + 1 at insert, and claims take
-- (priority, fair_seq, id); the virtual time is the largest fair_seq
-- claimed. So a key with 20,000 tasks waiting and a key that enqueues 20
-- after it take turns. Tasks of other queues keep fair_seq NULL and cost
-- nothing here: tasks_fair holds only claimable tasks that have a
-- fair_seq. When a queue becomes round robin, its waiting tasks are given
-- fair_seq 0 (they go first; see Store::queue_fair_adopt).
ALTER TABLE tasks ADD COLUMN fair_seq INTEGER;
CREATE INDEX tasks_fair ON tasks (queue, priority, fair_seq, id)
    WHERE fair_seq IS NOT NULL AND state IN ('available', 'scheduled', 'retryable');
CREATE TABLE queue_fair (
    queue TEXT PRIMARY KEY,
    vtime INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE fair_keys (
    queue    TEXT    NOT NULL,
    key      TEXT    NOT NULL,
    last_seq INTEGER NOT NULL,
    PRIMARY KEY (queue, key)
) WITHOUT ROWID;
