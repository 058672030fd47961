-- Which process holds a node's name, so two processes with one name are told apart.
ALTER TABLE nodes ADD COLUMN instance TEXT NOT NULL DEFAULT '';
