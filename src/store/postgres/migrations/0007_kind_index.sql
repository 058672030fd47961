-- Listing by kind.
-- Serves listing by kind (newest first) without walking the whole table.
CREATE INDEX tasks_kind ON {schema}.tasks (kind, id);
