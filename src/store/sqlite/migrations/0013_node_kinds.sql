-- The kinds each node runs and the defaults it declares for them (JSON):
-- clients that do not register a kind take its defaults from here.
ALTER TABLE nodes ADD COLUMN kinds TEXT;
