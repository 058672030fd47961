-- The kinds each node runs and the defaults it declares for them: clients
-- that do not register a kind take its defaults from here.
ALTER TABLE {schema}.nodes ADD COLUMN kinds jsonb;
