-- Which process holds a node's name, so two processes with one name are told apart.
ALTER TABLE {schema}.nodes ADD COLUMN instance text NOT NULL DEFAULT '';
